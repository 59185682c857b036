//! The committed C header (`include/mirror.h`) is exactly what the pinned cbindgen generates from
//! `src/ffi/` with `cbindgen.toml`, and the C API keeps its written conventions.
//!
//! Regenerate the header after changing `src/ffi/`:
//!
//! ```sh
//! MIRROR_REGEN_HEADER=1 cargo test --test header_drift
//! ```

use std::path::{Path, PathBuf};

const REGEN: &str = "MIRROR_REGEN_HEADER=1 cargo test --test header_drift";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen could not generate the header from src/ffi/");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn committed_header_matches_generated() {
    let generated = generate();
    let path = root().join("include/mirror.h");
    if std::env::var_os("MIRROR_REGEN_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/mirror.h differs from what cbindgen generates from src/ffi/ (first difference \
             at line {}):\n  committed: {:?}\n  generated: {:?}\nRegenerate it with:\n  {REGEN}\n\
             and commit the result.",
            first + 1,
            committed.lines().nth(first).unwrap_or("<end of file>"),
            generated.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

/// Collapses whitespace so declarations compare independently of line wrapping.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The signatures of the issue, as cbindgen writes them: handles are `struct mirror *` (the same
/// type as `mirror *` through the typedefs at the top of the header), and `struct mirror_stats`
/// keeps its tag because the function `mirror_stats` has the same name.
#[test]
fn header_declares_the_documented_api() {
    let header = squash(&read(&root().join("include/mirror.h")));
    for decl in [
        "typedef struct mirror_config mirror_config;",
        "typedef struct mirror mirror;",
        "struct mirror_config *mirror_config_new(void);",
        "int mirror_config_set(struct mirror_config *cfg, const char *key, const char *value);",
        "void mirror_config_free(struct mirror_config *cfg);",
        "int mirror_open(const struct mirror_config *cfg, struct mirror **out);",
        "int mirror_write(struct mirror *m, uint64_t offset, const void *buf, size_t len);",
        "int mirror_submit(struct mirror *m, uint64_t offset, const void *buf, size_t len, uint64_t *ticket);",
        "int mirror_wait(struct mirror *m, uint64_t ticket, int64_t timeout_us);",
        "int mirror_read(const struct mirror *m, uint64_t offset, void *buf, size_t len);",
        "const void *mirror_region(const struct mirror *m, size_t *len);",
        "int mirror_stats(const struct mirror *m, struct mirror_stats *out);",
        "int mirror_close(struct mirror *m);",
        "const char *mirror_strerror(int code);",
        "size_t mirror_last_error(char *buf, size_t len);",
        "#ifdef __cplusplus extern \"C\" {",
        "#define MIRROR_OK 0",
        "#define MIRROR_EINVAL -1001",
        "#define MIRROR_ETIMEDOUT -1011",
        "#define MIRROR_EPANIC -1015",
    ] {
        assert!(
            header.contains(&squash(decl)),
            "include/mirror.h lacks `{decl}`"
        );
    }
}

/// `struct mirror_stats` is a plain struct whose first field is its own size (ABI growth).
#[test]
fn stats_struct_starts_with_its_size() {
    let header = read(&root().join("include/mirror.h"));
    let start = header
        .find("struct mirror_stats {")
        .expect("struct mirror_stats");
    let end = start
        + header[start..]
            .find("};")
            .expect("end of struct mirror_stats");
    let fields: Vec<&str> = header[start..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("/*") && !l.starts_with('*'))
        .collect();
    assert_eq!(fields.first(), Some(&"uint32_t size;"), "{fields:?}");
    for f in &fields {
        assert!(
            f.starts_with("uint64_t ") || f.starts_with("int ") || f.starts_with("uint32_t "),
            "mirror_stats has only plain integer fields: {f}"
        );
    }
}

/// Every export is `#[no_mangle]`, documented with its thread safety, and its body is one call to
/// the panic boundary (`ffi_call` or `boundary`), so no panic can unwind into C.
#[test]
fn every_export_is_inside_the_panic_boundary() {
    let src = read(&root().join("src/ffi/mod.rs"));
    let src = src.split("#[cfg(test)]").next().unwrap();
    let mut exports = 0;
    let mut rest = src;
    while let Some(at) = rest.find("extern \"C\" fn ") {
        let before = &rest[..at];
        let after = &rest[at + "extern \"C\" fn ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The item's attributes and docs: everything since the previous item ended.
        let item_start = before.rfind("\n}\n").map_or(0, |i| i + 3);
        let preamble = &before[item_start..];
        assert!(
            preamble.contains("#[no_mangle]"),
            "{name}: not #[no_mangle]"
        );
        assert!(
            preamble.contains("Thread safety"),
            "{name}: its docs do not state its thread safety"
        );
        let open = after.find('{').expect("function body");
        let body = after[open + 1..]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            body.starts_with("ffi_call(") || body.starts_with("boundary("),
            "{name}: the body must be one call to ffi_call(..) or boundary(..), found `{}`",
            &body[..body.len().min(60)]
        );
        exports += 1;
        rest = &after[open..];
    }
    assert!(exports >= 15, "found only {exports} exports");
}
