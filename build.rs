//! Build script of the `mirror` crate: gives the C library (cdylib) its SONAME.
//!
//! ABI policy (docs/FFI.md): the SONAME is `libmirror.so.<major>`; while the crate is 0.x it is
//! `libmirror.so.0`, and 0.x releases only add to the ABI. Applies to the cdylib only (the rlib,
//! the staticlib and the `mirror` binary are not affected).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" || os.ends_with("bsd") {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmirror.so.{major}");
    }
}
