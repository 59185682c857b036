//! The panic boundary, the per-thread last error, and the checks every pointer from C goes
//! through.
//!
//! Every exported function's body is one call to [`ffi_call`] (functions that return a result
//! code) or [`boundary`] (the few that return something else). Both run the body inside
//! `catch_unwind`, so a panic (a bug in libmirror) never unwinds into C: it becomes
//! `MIRROR_EPANIC`, or the documented fallback of the function's return type ([`PanicFallback`]).
//! `tests/header_drift.rs` checks that every `extern "C" fn` starts that way.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{ConfigError, MirrorError};

use super::codes::{self, MIRROR_EINVAL, MIRROR_EPANIC, MIRROR_OK};

// The boundary catches panics; with `panic = "abort"` a panic would abort the process instead
// of becoming MIRROR_EPANIC. Never UB either way (Rust aborts rather than unwind out of an
// `extern "C"` function), but the documented contract needs unwinding.
#[cfg(panic = "abort")]
compile_error!("the C API's panic boundary needs panic = \"unwind\" (the default)");

thread_local! {
    /// The message of the last failed call on this thread (empty: none yet).
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `message` as this thread's last error. Never panics (also not during thread exit,
/// when the thread-local may already be gone).
pub(crate) fn set_last_error(message: &str) {
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            s.clear();
            s.push_str(message);
        }
    });
}

/// Copies this thread's last error into `buf` with `snprintf` semantics; returns its full length.
///
/// # Safety
/// `buf` is NULL or valid for writes of `len` bytes.
pub(crate) unsafe fn copy_last_error(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR
        .try_with(|slot| {
            let Ok(s) = slot.try_borrow() else { return 0 };
            let bytes = s.as_bytes();
            if !buf.is_null() && len > 0 {
                let n = bytes.len().min(len - 1);
                // SAFETY: the caller guarantees `buf` is valid for `len` bytes and `n + 1 <= len`;
                // `bytes` is a live Rust string that cannot overlap the caller's buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            bytes.len()
        })
        .unwrap_or(0)
}

/// A failed call: the result code returned to C and the message kept for `mirror_last_error`.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub(crate) code: c_int,
    pub(crate) message: String,
}

impl FfiError {
    /// A caller error: a NULL or misaligned pointer, a bad length or struct size.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        FfiError {
            code: MIRROR_EINVAL,
            message: message.into(),
        }
    }

    pub(crate) fn new(code: c_int, message: impl Into<String>) -> Self {
        debug_assert!(code < 0, "an error code is negative");
        FfiError {
            code,
            message: message.into(),
        }
    }
}

impl From<MirrorError> for FfiError {
    fn from(e: MirrorError) -> Self {
        FfiError {
            code: codes::code_of(&e),
            message: e.to_string(),
        }
    }
}

impl From<ConfigError> for FfiError {
    fn from(e: ConfigError) -> Self {
        FfiError {
            code: codes::config_code(&e),
            message: e.to_string(),
        }
    }
}

/// What an export returns when its body panicked.
pub(crate) trait PanicFallback {
    /// The fallback value (documented per function in the header).
    fn on_panic() -> Self;
}

impl PanicFallback for c_int {
    fn on_panic() -> Self {
        MIRROR_EPANIC
    }
}

impl PanicFallback for usize {
    fn on_panic() -> Self {
        0
    }
}

impl PanicFallback for () {
    fn on_panic() -> Self {}
}

impl PanicFallback for *const c_void {
    fn on_panic() -> Self {
        std::ptr::null()
    }
}

/// Strings from `mirror_strerror` and `mirror_version` are never NULL, also after a panic.
impl PanicFallback for *const c_char {
    fn on_panic() -> Self {
        c"libmirror internal error".as_ptr()
    }
}

impl PanicFallback for *mut super::mirror_config {
    fn on_panic() -> Self {
        std::ptr::null_mut()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs `body`; a panic becomes `R::on_panic()` and this thread's last error says so.
///
/// `AssertUnwindSafe`: after a panic the only state C can observe is through the handle, whose
/// locks recover from poisoning and whose documented contract after `MIRROR_EPANIC` is "close it".
pub(crate) fn boundary<R: PanicFallback>(body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            set_last_error(&format!(
                "libmirror internal error (a bug; please report it): panic: {}",
                panic_message(payload.as_ref())
            ));
            R::on_panic()
        }
    }
}

/// [`boundary`] for functions that return a result code: `Ok` is `MIRROR_OK`; an error records
/// its message as this thread's last error and returns its (negative) code.
pub(crate) fn ffi_call(body: impl FnOnce() -> Result<(), FfiError>) -> c_int {
    boundary(|| match body() {
        Ok(()) => MIRROR_OK,
        Err(e) => {
            debug_assert!(e.code < 0);
            set_last_error(&e.message);
            e.code
        }
    })
}

/// A shared reference from a pointer C passed in: NULL and misaligned pointers are refused.
///
/// # Safety
/// A non-NULL `p` points to a live `T` for `'a`, not mutated through another path meanwhile
/// except through interior mutability.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T, FfiError> {
    if p.is_null() {
        return Err(FfiError::invalid(format!("'{name}' is NULL")));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format!("'{name}' is misaligned")));
    }
    // SAFETY: non-NULL and aligned (checked above); live and unaliased per the caller.
    Ok(unsafe { &*p })
}

/// An exclusive reference from a pointer C passed in (NULL and misaligned are refused).
///
/// # Safety
/// A non-NULL `p` points to a live `T` for `'a` that nothing else accesses meanwhile.
pub(crate) unsafe fn arg_mut<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, FfiError> {
    if p.is_null() {
        return Err(FfiError::invalid(format!("'{name}' is NULL")));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format!("'{name}' is misaligned")));
    }
    // SAFETY: non-NULL and aligned (checked above); live and exclusive per the caller.
    Ok(unsafe { &mut *p })
}

/// Checks an output pointer before any work is done; the value is written later with
/// [`write_out`], only on success.
pub(crate) fn check_out<T>(p: *mut T, name: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(FfiError::invalid(format!("'{name}' is NULL")));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format!("'{name}' is misaligned")));
    }
    Ok(())
}

/// Writes an output once the call succeeded.
///
/// # Safety
/// `p` passed [`check_out`] and is valid for a write of a `T` (it may be uninitialised).
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T) {
    debug_assert!(!p.is_null() && p.is_aligned());
    // SAFETY: non-NULL and aligned (check_out), valid for writes per the caller; `write` does
    // not read or drop the old (possibly uninitialised) value.
    unsafe { p.write(value) }
}

/// A `&str` from a NUL-terminated C string. NULL is refused; invalid UTF-8 gives `None`.
///
/// # Safety
/// A non-NULL `p` points to a NUL-terminated string that stays unchanged for `'a`.
pub(crate) unsafe fn arg_str<'a>(
    p: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, FfiError> {
    if p.is_null() {
        return Err(FfiError::invalid(format!("'{name}' is NULL")));
    }
    // SAFETY: non-NULL; NUL-terminated and unchanged for 'a per the caller.
    let s = unsafe { CStr::from_ptr(p) };
    Ok(s.to_str().ok())
}

/// Checks a caller buffer: non-NULL, and a length Rust slices can describe.
pub(crate) fn check_buffer(p: *const c_void, len: usize, name: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(FfiError::invalid(format!("'{name}' is NULL")));
    }
    if len > isize::MAX as usize {
        return Err(FfiError::invalid(format!(
            "'{name}' length {len} is larger than any buffer"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: NULL buffer with length 0 only asks for the length; then a buffer of that size.
        let n = unsafe { copy_last_error(std::ptr::null_mut(), 0) };
        let mut buf = vec![0 as c_char; n + 1];
        // SAFETY: `buf` is valid for `n + 1` bytes.
        let m = unsafe { copy_last_error(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(m, n);
        // SAFETY: copy_last_error NUL-terminated the buffer.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_the_fallback_and_a_last_error() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {})); // keep the test output quiet
        let rc = ffi_call(|| panic!("boom {}", 42));
        let ptr: *const c_void = boundary(|| panic!("boom"));
        let n: usize = boundary(|| panic!("boom"));
        let s: *const c_char = boundary(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(rc, MIRROR_EPANIC);
        assert!(ptr.is_null());
        assert_eq!(n, 0);
        assert!(!s.is_null());
        assert!(last_error().contains("panic: boom"), "{}", last_error());
    }

    #[test]
    fn errors_set_the_last_error_and_success_leaves_it() {
        let rc = ffi_call(|| Err(FfiError::invalid("'x' is NULL")));
        assert_eq!(rc, MIRROR_EINVAL);
        assert_eq!(last_error(), "'x' is NULL");
        assert_eq!(ffi_call(|| Ok(())), MIRROR_OK);
        assert_eq!(last_error(), "'x' is NULL");
    }

    #[test]
    fn last_error_truncates_like_snprintf() {
        set_last_error("abcdef");
        let mut buf = [0x55 as c_char; 4];
        // SAFETY: `buf` is valid for 4 bytes.
        let n = unsafe { copy_last_error(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, 6);
        assert_eq!(buf.map(|c| c as u8), *b"abc\0");
        let mut one = [0x55 as c_char; 1];
        // SAFETY: `one` is valid for 1 byte.
        assert_eq!(unsafe { copy_last_error(one.as_mut_ptr(), 1) }, 6);
        assert_eq!(one[0], 0);
        // SAFETY: NULL with a non-zero length writes nothing.
        assert_eq!(unsafe { copy_last_error(std::ptr::null_mut(), 10) }, 6);
    }

    #[test]
    fn the_last_error_is_per_thread() {
        set_last_error("main thread");
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            set_last_error("other thread");
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), "main thread");
    }

    #[test]
    fn null_and_misaligned_pointers_are_refused() {
        // SAFETY: NULL is refused before any dereference.
        let e = unsafe { arg_ref::<u64>(std::ptr::null(), "m") }.unwrap_err();
        assert_eq!(e.code, MIRROR_EINVAL);
        let mut words = [0u64; 2];
        let odd = (words.as_mut_ptr() as *mut u8).wrapping_add(1) as *mut u64;
        assert!(check_out(odd, "out").is_err());
        // SAFETY: a misaligned pointer is refused before any dereference.
        assert!(unsafe { arg_mut(odd, "out") }.is_err());
        assert!(check_buffer(std::ptr::null(), 1, "buf").is_err());
        assert!(check_buffer(words.as_ptr().cast(), usize::MAX, "buf").is_err());
        // SAFETY: NULL is refused before any dereference.
        assert!(unsafe { arg_str(std::ptr::null(), "key") }.is_err());
    }
}
