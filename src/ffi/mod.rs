//! The C API (`include/mirror.h`, generated from this module by cbindgen).
//!
//! Conventions (see `docs/FFI.md`): opaque handles (`mirror_config`, `mirror`), `_new`/`_free`
//! and `open`/`close` pairs where freeing NULL is fine, buffer then length, outputs written only
//! on success, 0 for success and negative `MIRROR_E*` codes for failure with a per-thread message
//! (`mirror_last_error`), and a panic boundary around every export ([`boundary`]).
//!
//! Everything here is a thin adapter over the Rust API ([`crate::Mirror`],
//! [`crate::ConfigBuilder`]); no engine logic lives in this module.

mod boundary;
mod codes;

pub use codes::*;

/// The C API's code (a negative `MIRROR_E*` value) of an engine error: also what the control
/// endpoint reports with a refusal.
pub fn error_code(e: &crate::MirrorError) -> c_int {
    codes::code_of(e)
}

use std::ffi::{c_char, c_int, c_void};
use std::time::Duration;

use crate::config::{ConfigBuilder, Role};
use crate::node::{Mirror, Ticket};
use crate::Phase;

use boundary::{
    arg_mut, arg_ref, arg_str, boundary, check_buffer, check_out, copy_last_error, ffi_call,
    write_out, FfiError,
};

/// A node configuration being built (opaque). Create with `mirror_config_new`, fill with
/// `mirror_config_set`, pass to `mirror_open`, free with `mirror_config_free`.
#[allow(non_camel_case_types)]
pub struct mirror_config {
    builder: ConfigBuilder,
}

/// A running node, primary or backup (opaque). Create with `mirror_open`, free with
/// `mirror_close`.
#[allow(non_camel_case_types)]
pub struct mirror {
    node: Mirror,
}

impl mirror {
    /// The node behind the handle (the benchmark times the Rust API on the same node).
    pub(crate) fn node(&self) -> &Mirror {
        &self.node
    }
}

// The header promises that write, submit, wait, read, region, stats and the extensions may run
// concurrently on one handle; they only ever take `&mirror`, so this is what makes that sound.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<mirror>();
};

/// A snapshot of a node's state and counters, filled by `mirror_stats`. Write it as
/// `struct mirror_stats` (the function of the same name rules out a typedef, as with stat(2)).
///
/// ABI growth: set `size = sizeof(struct mirror_stats)` before the call. The library fills at most
/// `size` bytes (fields of a newer header that this library does not know stay untouched) and
/// sets `size` to the number of bytes it filled. Fields are only ever appended.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Default)]
pub struct mirror_stats {
    /// In: `sizeof(struct mirror_stats)` as the caller knows it. Out: bytes filled by the library.
    pub size: u32,
    /// `MIRROR_ROLE_PRIMARY` or `MIRROR_ROLE_BACKUP`.
    pub role: c_int,
    /// One of `MIRROR_PHASE_*`.
    pub phase: c_int,
    /// 1 while a primary applies writes without its backup (`on_peer_loss=continue`), else 0.
    pub degraded: c_int,
    /// Next sequence number to be assigned (primary) or received (backup).
    pub next_seq: u64,
    /// Highest sequence number applied to this node's region.
    pub applied_through: u64,
    /// Primary: highest sequence number the backup acknowledged. Backup: highest received.
    pub acked_through: u64,
    /// Highest sequence number the peer reported durably applied.
    pub peer_applied_through: u64,
    /// Records in this node's queue.
    pub queue_records: u64,
    /// Bytes used in this node's queue.
    pub queue_bytes: u64,
    /// Capacity of this node's queue in bytes.
    pub queue_capacity: u64,
    /// Primary: writes sent or held and not yet applied.
    pub in_flight: u64,
    /// Completed recovery handshakes since the node opened.
    pub recoveries: u64,
    /// Payload bytes moved by the last recovery (never a copy of the region).
    pub last_recovery_bytes: u64,
    /// Records moved by the last recovery.
    pub last_recovery_records: u64,
    /// Tickets issued (primary).
    pub writes_submitted: u64,
    /// Highest completed ticket (primary).
    pub writes_completed: u64,
    /// Size of the region in bytes.
    pub region_size: u64,
    /// The node's current term (a primary's: the term of its writes). Appended in version 2.
    pub current_term: u64,
    /// Backup: records dropped by the last divergent-suffix repair since the node opened (0:
    /// none). They were saved first to `<queue>.discarded-after-<seq>-<ms>` beside the queue
    /// (`mirror status` lists those files).
    pub diverged_records: u64,
    /// Their payload bytes.
    pub diverged_bytes: u64,
    /// The common point of that repair: every dropped record had a higher seq.
    pub diverged_after_seq: u64,
    /// This node's id (from its queue). Appended in version 3 (failover).
    pub node_id: u64,
    /// The node id of the peer it is bound to (0: none yet).
    pub peer_node_id: u64,
    /// 1 if this node was fenced (a newer primary exists) and has not been promoted since:
    /// writes fail with `MIRROR_EFENCED`. `mirror_last_error` after such a write says why.
    pub fenced: c_int,
    /// Backup: 1 while a resync or catch-up into it has not finished (its region is inconsistent; it is
    /// not promoted). Appended in version 4 (beyond the queue).
    pub resync_target: c_int,
    /// Chunks marked in the dirty-chunk bitmap (writes folded out of a full queue while the
    /// backup was away, or what a resync has yet to bring over).
    pub dirty_chunks: u64,
    /// The chunk size of the bitmap, resyncs and verifies.
    pub chunk_size: u64,
    /// A transfer in progress (`MIRROR_TRANSFER_*`; `MIRROR_TRANSFER_NONE` when none).
    pub transfer_kind: c_int,
    /// Its chunks to go through, and done.
    pub transfer_chunks_total: u64,
    /// See `transfer_chunks_total`.
    pub transfer_chunks_done: u64,
    /// Bytes of region it still has to go through.
    pub transfer_bytes_left: u64,
    /// Bytes of region per second since it began.
    pub transfer_rate_bytes_per_s: u64,
}

/// What an online verify found, filled by `mirror_verify`. Set `size = sizeof(struct
/// mirror_verify_report)` before the call (size-versioned like `mirror_stats`).
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct mirror_verify_report {
    /// In: `sizeof(struct mirror_verify_report)` as the caller knows it. Out: bytes filled.
    pub size: u32,
    /// Chunks compared (every chunk of the region).
    pub chunks_compared: u64,
    /// Chunks that differed.
    pub chunks_differing: u64,
    /// Of those, chunks brought over from the primary (`repair`).
    pub chunks_repaired: u64,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// How long it took, in microseconds.
    pub elapsed_us: u64,
    /// The chunk size (a differing chunk is `chunk_size` bytes at its offset, the last one
    /// possibly shorter).
    pub chunk_size: u64,
}

/// The smallest `mirror_stats.size` accepted: the size of the first version of the struct.
const STATS_V1_SIZE: usize = std::mem::offset_of!(mirror_stats, current_term);

fn phase_code(p: Phase) -> c_int {
    match p {
        Phase::Disconnected => MIRROR_PHASE_DISCONNECTED,
        Phase::Handshaking => MIRROR_PHASE_HANDSHAKING,
        Phase::Recovering => MIRROR_PHASE_RECOVERING,
        Phase::Synchronous => MIRROR_PHASE_SYNCHRONOUS,
        Phase::Failed => MIRROR_PHASE_FAILED,
        Phase::Resyncing => MIRROR_PHASE_RESYNCING,
    }
}

/// `timeout_us < 0` means no timeout.
fn timeout_of(timeout_us: i64) -> Option<Duration> {
    u64::try_from(timeout_us).ok().map(Duration::from_micros)
}

/// The C API's log: nothing unless asked for (`MIRROR_LOG`, or `log_level`/`log_format` in the
/// configuration); then the engine's lines go to stderr, once per process.
fn init_logging(config: &crate::Config) {
    let asked = std::env::var_os("MIRROR_LOG").is_some()
        || config.log_level.is_some()
        || config.log_format != crate::logging::LogFormat::Text;
    if asked {
        let level = config.log_level.as_deref().unwrap_or("info");
        crate::logging::init(config.log_format, level);
    }
}

/// Creates an empty configuration (every key unset; defaults apply at `mirror_open`).
///
/// Returns NULL only if the library failed internally (see `mirror_last_error`).
/// Thread safety: any thread. A `mirror_config` must not be used by two threads at once.
#[no_mangle]
pub extern "C" fn mirror_config_new() -> *mut mirror_config {
    boundary(|| {
        Box::into_raw(Box::new(mirror_config {
            builder: ConfigBuilder::new(),
        }))
    })
}

/// Sets one configuration key from its text form. The keys and value syntax are exactly those of
/// the engine's TOML configuration (one parser; the README lists every key), e.g. `role`
/// (primary | backup), `region`, `region_size` (bytes, or with KiB/MiB/GiB), `queue`,
/// `queue_size`, `listen` (backup), `peer` (primary), `transport`, `durability` (process | power |
/// pmem), `on_peer_loss` (continue | block), `cpu`, `idle_spin_us`, `wait_spin_us`,
/// `write_timeout_ms`, `max_write`. A later set of the same key wins.
///
/// Returns 0, `MIRROR_EKEY` (unknown key), `MIRROR_EVALUE` (bad value; the message names the key)
/// or `MIRROR_EINVAL` (a NULL argument). Checks that involve several keys happen in `mirror_open`.
/// Thread safety: not concurrently with any other call on the same `cfg`.
///
/// # Safety
/// `cfg` is NULL or from `mirror_config_new` and not freed; `key` and `value` are NULL or
/// NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn mirror_config_set(
    cfg: *mut mirror_config,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let cfg = unsafe { arg_mut(cfg, "cfg") }?;
        // SAFETY: per this function's contract.
        let key = unsafe { arg_str(key, "key") }?;
        // SAFETY: per this function's contract.
        let value = unsafe { arg_str(value, "value") }?;
        let Some(key) = key else {
            return Err(FfiError::new(
                MIRROR_EKEY,
                "config key is not valid UTF-8 (no such key)",
            ));
        };
        let Some(value) = value else {
            return Err(FfiError::new(
                MIRROR_EVALUE,
                format!("config key '{key}' has a value that is not valid UTF-8"),
            ));
        };
        cfg.builder.set(key, value)?;
        Ok(())
    })
}

/// Frees a configuration. NULL is fine. A node opened from it does not need it any more.
///
/// Thread safety: not concurrently with any other call on the same `cfg`.
///
/// # Safety
/// `cfg` is NULL or from `mirror_config_new` and not freed yet; it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn mirror_config_free(cfg: *mut mirror_config) {
    boundary(|| {
        if !cfg.is_null() {
            // SAFETY: `cfg` came from `Box::into_raw` in `mirror_config_new` and is freed once,
            // per this function's contract.
            drop(unsafe { Box::from_raw(cfg) });
        }
    })
}

/// Validates the configuration and starts a node: opens (and after a crash recovers) its queue and
/// region files and starts its polling thread. A backup listens on `listen` before this returns
/// and serves its primary until `mirror_close`. A primary connects to `peer` in the background;
/// until the backup answers, writes wait (`on_peer_loss=block`) or proceed degraded (`continue`).
///
/// On success stores the handle in `*out` and returns 0; on failure `*out` is untouched and the
/// result is `MIRROR_EINVAL` (NULL argument), `MIRROR_EMISSING`, `MIRROR_EVALUE`,
/// `MIRROR_ESTORAGE`, `MIRROR_EBUSY`, `MIRROR_EIO` or `MIRROR_EUNSUPPORTED`. `cfg` stays owned by
/// the caller either way.
/// Thread safety: any thread; `cfg` is only read (no `mirror_config_set` on it meanwhile).
///
/// # Safety
/// `cfg` is NULL or a live `mirror_config`; `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn mirror_open(cfg: *const mirror_config, out: *mut *mut mirror) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let cfg = unsafe { arg_ref(cfg, "cfg") }?;
        check_out(out, "out")?;
        let config = cfg.builder.build()?;
        init_logging(&config);
        let node = Mirror::open(config)?;
        let handle = Box::into_raw(Box::new(mirror { node }));
        // SAFETY: `out` passed check_out and is valid for a write per the contract.
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Writes `len` bytes from `buf` at `offset` of the region and returns 0 once the backup
/// acknowledged the write and it is applied here (or, under `on_peer_loss=continue` while the
/// backup is away, once it is queued and applied here). Waits at most `write_timeout_ms` if set.
///
/// Errors: `MIRROR_EINVAL` (NULL), `MIRROR_ERANGE` (outside the region, empty, longer than
/// `max_write`), `MIRROR_EROLE` (a backup), `MIRROR_ETIMEDOUT`, `MIRROR_EFAILED`.
/// Thread safety: any number of threads at once on the same handle (with submit, wait, read,
/// region, stats). Concurrent writes complete in the order they were submitted.
///
/// # Safety
/// `m` is NULL or a live handle; `buf` is NULL or valid for reading `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn mirror_write(
    m: *mut mirror,
    offset: u64,
    buf: *const c_void,
    len: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract; only shared references are ever made.
        let m = unsafe { arg_ref(m, "m") }?;
        check_buffer(buf, len, "buf")?;
        // SAFETY: non-NULL with a sane length (checked), readable for `len` bytes per the contract.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        m.node.write(offset, data)?;
        Ok(())
    })
}

/// Submits a write and returns at once (the bytes are copied), storing its ticket in `*ticket`.
/// Tickets start at 1 and complete in the order they were issued; pass one to `mirror_wait`.
/// When the submission ring is full this waits for room (at most `write_timeout_ms` if set).
/// With `caller_drives` (the default), a submit that makes half the caller's window unsent
/// (at least 16 writes) sends them on the calling thread: one step of the poll loop, never a
/// wait for the backup.
///
/// Errors: as `mirror_write`; `*ticket` is written only on success.
/// Thread safety: any number of threads at once on the same handle.
///
/// # Safety
/// `m` is NULL or a live handle; `buf` is NULL or valid for reading `len` bytes; `ticket` is NULL
/// or valid for writing a `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn mirror_submit(
    m: *mut mirror,
    offset: u64,
    buf: *const c_void,
    len: usize,
    ticket: *mut u64,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract; only shared references are ever made.
        let m = unsafe { arg_ref(m, "m") }?;
        check_buffer(buf, len, "buf")?;
        check_out(ticket, "ticket")?;
        // SAFETY: non-NULL with a sane length (checked), readable for `len` bytes per the contract.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        let t = m.node.submit(offset, data)?;
        // SAFETY: `ticket` passed check_out and is writable per the contract.
        unsafe { write_out(ticket, t.0) };
        Ok(())
    })
}

/// Waits until the write with this ticket (and every earlier one) is acknowledged by the backup
/// and applied here. `timeout_us < 0` waits for as long as it takes; 0 only checks.
///
/// Returns 0, `MIRROR_ETIMEDOUT` (the write stays pending and may still complete: wait again),
/// `MIRROR_ETICKET` (never issued), `MIRROR_EFAILED` or `MIRROR_EINVAL` (NULL handle).
/// Thread safety: any number of threads at once on the same handle, on the same or other tickets.
///
/// # Safety
/// `m` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn mirror_wait(m: *mut mirror, ticket: u64, timeout_us: i64) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract; only shared references are ever made.
        let m = unsafe { arg_ref(m, "m") }?;
        m.node.wait(Ticket(ticket), timeout_of(timeout_us))?;
        Ok(())
    })
}

/// Copies `len` bytes of the region at `offset` into `buf`. Bytes of completed writes are always
/// seen; a read overlapping a write in progress may see part of it. Works on both roles (on a
/// backup it shows what the backup applied so far).
///
/// Errors: `MIRROR_EINVAL` (NULL), `MIRROR_ERANGE` (outside the region); `buf` is written only on
/// success. Thread safety: any number of threads at once on the same handle.
///
/// # Safety
/// `m` is NULL or a live handle; `buf` is NULL or valid for writing `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn mirror_read(
    m: *const mirror,
    offset: u64,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        check_buffer(buf, len, "buf")?;
        let size = m.node.region_len();
        if offset > size || len as u64 > size - offset {
            return Err(FfiError::new(
                MIRROR_ERANGE,
                format!("read at offset {offset} of {len} bytes does not fit in the region of {size} bytes"),
            ));
        }
        // SAFETY: non-NULL with a sane length (checked), writable for `len` bytes and not accessed
        // by anyone else during the call per the contract. The slice is only written, never read.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        m.node.read(offset, out)?;
        Ok(())
    })
}

/// A read-only view of the whole region for zero-copy reads, valid until `mirror_close`; stores
/// its length in `*len`. The node writes into it concurrently: bytes of completed writes are
/// stable, bytes under a write in progress may be a mix of old and new. Never write through it.
///
/// Returns NULL (and `*len` untouched) if `m` or `len` is NULL; see `mirror_last_error`.
/// Thread safety: any number of threads at once on the same handle.
///
/// # Safety
/// `m` is NULL or a live handle; `len` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn mirror_region(m: *const mirror, len: *mut usize) -> *const c_void {
    boundary(|| {
        let result = (|| {
            // SAFETY: per this function's contract.
            let m = unsafe { arg_ref(m, "m") }?;
            check_out(len, "len")?;
            let size = usize::try_from(m.node.region_len())
                .map_err(|_| FfiError::invalid("the region is larger than this address space"))?;
            // SAFETY: `len` passed check_out and is writable per the contract.
            unsafe { write_out(len, size) };
            Ok::<_, FfiError>(m.node.region_ptr().cast::<c_void>())
        })();
        result.unwrap_or_else(|e| {
            boundary::set_last_error(&e.message);
            std::ptr::null()
        })
    })
}

/// Fills `*out` with a snapshot of the node's state and counters. Set `out->size =
/// sizeof(struct mirror_stats)` first (see `mirror_stats`).
///
/// Errors: `MIRROR_EINVAL` (NULL, or `out->size` smaller than the first version of the struct);
/// `*out` is written only on success. Thread safety: any number of threads at once.
///
/// # Safety
/// `m` is NULL or a live handle; `out` is NULL or valid for reading and writing `out->size` bytes.
#[no_mangle]
pub unsafe extern "C" fn mirror_stats(m: *const mirror, out: *mut mirror_stats) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        check_out(out, "out")?;
        // SAFETY: non-NULL and aligned (checked); the caller's struct starts with `size`.
        let caller_size = unsafe { std::ptr::addr_of!((*out).size).read() } as usize;
        if caller_size < STATS_V1_SIZE {
            return Err(FfiError::invalid(format!(
                "out->size is {caller_size}; set it to sizeof(struct mirror_stats) (at least {STATS_V1_SIZE})"
            )));
        }
        let s = m.node.stats();
        let filled = caller_size.min(std::mem::size_of::<mirror_stats>());
        let snapshot = mirror_stats {
            size: filled as u32,
            role: match s.role {
                Role::Primary => MIRROR_ROLE_PRIMARY,
                Role::Backup => MIRROR_ROLE_BACKUP,
            },
            phase: phase_code(s.phase),
            degraded: c_int::from(s.degraded),
            next_seq: s.next_seq,
            applied_through: s.applied_through,
            acked_through: s.acked_through,
            peer_applied_through: s.peer_applied_through,
            queue_records: s.queue_records,
            queue_bytes: s.queue_bytes,
            queue_capacity: s.queue_capacity,
            in_flight: s.in_flight,
            recoveries: s.recoveries,
            last_recovery_bytes: s.last_recovery_bytes,
            last_recovery_records: s.last_recovery_records,
            writes_submitted: s.writes_submitted,
            writes_completed: s.writes_completed,
            region_size: m.node.region_len(),
            current_term: s.current_term,
            diverged_records: s.last_divergence.as_ref().map_or(0, |d| d.records),
            diverged_bytes: s.last_divergence.as_ref().map_or(0, |d| d.bytes),
            diverged_after_seq: s.last_divergence.as_ref().map_or(0, |d| d.common_seq),
            node_id: s.node_id,
            peer_node_id: s.peer_node_id,
            fenced: c_int::from(s.fenced.is_some()),
            resync_target: c_int::from(s.resync_target),
            dirty_chunks: s.dirty_chunks,
            chunk_size: s.chunk_size,
            transfer_kind: s.transfer.as_ref().map_or(MIRROR_TRANSFER_NONE, |t| {
                match t.kind.as_str() {
                    "resync" => MIRROR_TRANSFER_RESYNC,
                    "initial-sync" => MIRROR_TRANSFER_INITIAL_SYNC,
                    "verify-repair" => MIRROR_TRANSFER_VERIFY_REPAIR,
                    _ => MIRROR_TRANSFER_VERIFY,
                }
            }),
            transfer_chunks_total: s.transfer.as_ref().map_or(0, |t| t.chunks_total),
            transfer_chunks_done: s.transfer.as_ref().map_or(0, |t| t.chunks_done),
            transfer_bytes_left: s.transfer.as_ref().map_or(0, |t| t.bytes_left),
            transfer_rate_bytes_per_s: s.transfer.as_ref().map_or(0, |t| t.rate_bytes_per_s),
        };
        // SAFETY: the caller's struct is valid for `caller_size >= filled` bytes (contract);
        // `snapshot` is a local of `size_of::<mirror_stats>() >= filled` bytes; they cannot
        // overlap. Byte copy, so a newer caller's larger struct keeps its unknown tail.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&snapshot as *const mirror_stats).cast::<u8>(),
                out.cast::<u8>(),
                filled,
            )
        };
        Ok(())
    })
}

/// The smallest `mirror_verify_report.size` accepted: the size of the struct's first version
/// (fields appended later are filled only for callers that know them).
const VERIFY_REPORT_V1_SIZE: usize = std::mem::size_of::<mirror_verify_report>();

/// Online verify (primary): compares every chunk (`chunk_size`) of this region with the
/// backup's while writes go on (each chunk at the same point of the write stream on both
/// nodes, so writes in flight are never a difference); with `repair` non-zero, differing chunks
/// are brought over from this node. Paced by `resync_rate`; progress is in `mirror_stats`
/// (`transfer_*`). Blocks until done. Fills `*out`, and the byte offsets of the first
/// `max_offsets` differing chunks into `offsets` (may be NULL when `max_offsets` is 0).
///
/// Returns 0; `MIRROR_ENOTREADY` (not a primary with a connected, synchronous backup, a resync
/// or verify already running, or the connection ended part way: `mirror_last_error` says
/// which); `MIRROR_EINVAL` (NULL, `out->size` too small); `MIRROR_EFAILED`/`MIRROR_ECLOSED`.
/// Thread safety: any thread; one verify at a time per node.
///
/// # Safety
/// `m` is NULL or a live handle; `out` is NULL or valid for reading and writing `out->size`
/// bytes; `offsets` is valid for writing `max_offsets` `uint64_t`s when `max_offsets > 0`.
#[no_mangle]
pub unsafe extern "C" fn mirror_verify(
    m: *const mirror,
    repair: c_int,
    out: *mut mirror_verify_report,
    offsets: *mut u64,
    max_offsets: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        check_out(out, "out")?;
        if max_offsets > 0 {
            check_out(offsets, "offsets")?;
        }
        // SAFETY: non-NULL and aligned (checked); the caller's struct starts with `size`.
        let caller_size = unsafe { std::ptr::addr_of!((*out).size).read() } as usize;
        let full = std::mem::size_of::<mirror_verify_report>();
        if caller_size < VERIFY_REPORT_V1_SIZE {
            return Err(FfiError::invalid(format!(
                "out->size is {caller_size}; set it to sizeof(struct mirror_verify_report) (at least {VERIFY_REPORT_V1_SIZE})"
            )));
        }
        let filled_size = caller_size.min(full);
        let report = m.node.verify_online(repair != 0)?;
        let filled = mirror_verify_report {
            size: filled_size as u32,
            chunks_compared: report.chunks_compared,
            chunks_differing: report.differing.len() as u64,
            chunks_repaired: report.chunks_repaired,
            bytes_sent: report.bytes_sent,
            elapsed_us: report.elapsed_us,
            chunk_size: m.node.stats().chunk_size,
        };
        for (i, range) in report.differing.iter().take(max_offsets).enumerate() {
            // SAFETY: `offsets` is valid for `max_offsets` writes (contract, checked non-NULL
            // and aligned above) and `i < max_offsets`.
            unsafe { offsets.add(i).write(range.offset) };
        }
        // SAFETY: the caller's struct is valid for `caller_size >= filled_size` bytes
        // (contract, checked above); `filled` is a local of at least `filled_size` bytes; they
        // cannot overlap. A byte copy, so that a newer caller's larger struct keeps its tail.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&filled as *const mirror_verify_report).cast::<u8>(),
                out.cast::<u8>(),
                filled_size,
            )
        };
        Ok(())
    })
}

/// Stops the node and frees the handle: the polling thread finishes its current pass and is
/// joined, the files are released. Writes not completed by then stay in the queue and are
/// recovered at the next open. Returns the result of the close (0, or `MIRROR_EFAILED` if the
/// polling thread had crashed); the handle is freed either way, so a second close of the same
/// pointer is a use after free (set your pointer to NULL). NULL is fine (returns 0).
///
/// Thread safety: only when no other call on this handle is running or will start; the pointers
/// from `mirror_region` are invalid afterwards.
///
/// # Safety
/// `m` is NULL or a live handle from `mirror_open`, closed only once.
#[no_mangle]
pub unsafe extern "C" fn mirror_close(m: *mut mirror) -> c_int {
    ffi_call(|| {
        if m.is_null() {
            return Ok(());
        }
        // SAFETY: `m` came from `Box::into_raw` in `mirror_open`, is live, and nothing else uses
        // it now (contract); it is freed exactly once, here.
        let handle = unsafe { Box::from_raw(m) };
        let result = handle.node.close();
        drop(handle);
        result?;
        Ok(())
    })
}

/// A fixed description of a result code ("success" for 0). Never NULL: codes libmirror does not
/// define give "unknown libmirror result code". The string is static; do not free it.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn mirror_strerror(code: c_int) -> *const c_char {
    boundary(|| codes::describe(code))
}

/// Copies the message of this thread's last failed libmirror call into `buf`, like `snprintf`:
/// at most `len - 1` bytes and a terminating NUL (nothing if `buf` is NULL or `len` is 0). Returns
/// the full length of the message without the NUL (0 if no call failed on this thread yet), so a
/// result `>= len` means it was truncated. Successful calls leave the message as it was.
///
/// Thread safety: any thread; each thread has its own message.
///
/// # Safety
/// `buf` is NULL or valid for writing `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn mirror_last_error(buf: *mut c_char, len: usize) -> usize {
    // SAFETY: per this function's contract.
    boundary(|| unsafe { copy_last_error(buf, len) })
}

/// Extension. Backup: stores the TCP port it listens on in `*port` (useful with `listen` port 0).
///
/// Errors: `MIRROR_EINVAL` (NULL), `MIRROR_EROLE` (a primary). Thread safety: any thread.
///
/// # Safety
/// `m` is NULL or a live handle; `port` is NULL or valid for writing a `uint16_t`.
#[no_mangle]
pub unsafe extern "C" fn mirror_listen_port(m: *const mirror, port: *mut u16) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        check_out(port, "port")?;
        let addr = m.node.listen_addr().ok_or_else(|| {
            FfiError::new(
                MIRROR_EROLE,
                "this node does not listen: a backup must, and a primary does when `listen` is set",
            )
        })?;
        // SAFETY: `port` passed check_out and is writable per the contract.
        unsafe { write_out(port, addr.port()) };
        Ok(())
    })
}

/// Extension. Waits until the node is mirroring synchronously (connected and recovered), for at
/// most `timeout_us` (< 0: no limit). Useful before a latency-sensitive phase, in tests and demos.
///
/// Returns 0, `MIRROR_ETIMEDOUT`, `MIRROR_EFAILED` or `MIRROR_EINVAL`. Thread safety: any thread.
///
/// # Safety
/// `m` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn mirror_wait_synchronous(m: *const mirror, timeout_us: i64) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        let timeout = timeout_of(timeout_us).unwrap_or(Duration::from_secs(u64::MAX / 4));
        m.node.wait_synchronous(timeout)?;
        Ok(())
    })
}

/// Failover: promotes this backup to primary, live. It starts a new term (durable before its
/// first write), connects to its `peer`, and takes writes alone (`on_peer_loss=continue`) or
/// once the other node rejoins as its backup (`block`). `force` (non-zero) promotes even while
/// connected to a live primary, which is then fenced at its first contact with this node. On
/// success writes the new term to `*term` (if `term` is not NULL).
///
/// The library never decides *when* to fail over (two nodes cannot tell a dead peer from a
/// partition): a cluster manager or an operator calls this.
///
/// Returns 0; `MIRROR_EROLE` (already a primary); `MIRROR_EPEERALIVE` (connected to a live
/// primary and `force` is 0); `MIRROR_ENOTREADY` (a repair is in progress); `MIRROR_EMISSING`
/// (no `peer` configured); `MIRROR_EFAILED`; `MIRROR_EINVAL`. The message says what to do.
/// Thread safety: any thread.
///
/// # Safety
/// `m` is NULL or a live handle; `term` is NULL or valid for writing a `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn mirror_promote(m: *const mirror, force: c_int, term: *mut u64) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        if !term.is_null() {
            check_out(term, "term")?;
        }
        let new_term = m.node.promote(force != 0)?;
        if !term.is_null() {
            // SAFETY: non-NULL and aligned (checked above), writable per the contract.
            unsafe { write_out(term, new_term) };
        }
        Ok(())
    })
}

/// Failover: demotes this primary to a backup, live. Writes not completed fail with
/// `MIRROR_EROLE`; it listens for the new primary, which repairs what of its log the new
/// history lacks and catches it up.
///
/// Returns 0; `MIRROR_EROLE` (already a backup); `MIRROR_EMISSING` (no `listen` configured);
/// `MIRROR_EFAILED`; `MIRROR_EINVAL`. Thread safety: any thread.
///
/// # Safety
/// `m` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn mirror_demote(m: *const mirror) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        m.node.demote()?;
        Ok(())
    })
}

/// A subscription to a node's events (opaque): create with `mirror_events_subscribe`, poll
/// `mirror_events_fd`, take events with `mirror_events_next`, free with `mirror_events_free`.
#[allow(non_camel_case_types)]
pub struct mirror_events {
    events: crate::Events,
}

/// Bytes of `struct mirror_event::detail` (a NUL-terminated string, truncated to fit).
pub const MIRROR_EVENT_DETAIL_LEN: usize = 512;

/// One event, filled by `mirror_events_next`. Set `size = sizeof(struct mirror_event)` before
/// the call (as with `mirror_stats`: fields a newer header adds at the end are left alone by an
/// older library). Fields that do not apply to `kind` are 0 (and `detail` empty).
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct mirror_event {
    /// In: `sizeof(struct mirror_event)` as the caller knows it. Out: bytes filled.
    pub size: u32,
    /// `MIRROR_EVENT_*`.
    pub kind: c_int,
    /// Position in the node's stream (from 1; a gap is what a `MIRROR_EVENT_LOST` counted).
    pub seq: u64,
    /// Wall-clock time, microseconds since the Unix epoch.
    pub unix_us: u64,
    /// `MIRROR_EVENT_CONNECTED`: the peer's node id (0 while unknown).
    pub peer_node_id: u64,
    /// `MIRROR_EVENT_PROMOTED`: the new term.
    pub term: u64,
    /// `MIRROR_EVENT_RECOVERING`: records to go. `MIRROR_EVENT_BITMAP_FALLBACK`: records
    /// folded. `MIRROR_EVENT_TRANSFER_STARTED`: chunks to go through.
    /// `MIRROR_EVENT_TRANSFER_FINISHED`: chunks compared.
    pub records: u64,
    /// `MIRROR_EVENT_RECOVERING`: their payload bytes. `MIRROR_EVENT_TRANSFER_FINISHED`:
    /// chunk bytes sent.
    pub bytes: u64,
    /// `MIRROR_EVENT_LOST`: events dropped. `MIRROR_EVENT_BITMAP_FALLBACK`: chunks dirty now.
    /// `MIRROR_EVENT_TRANSFER_FINISHED`: chunks that differed or were brought over.
    pub lost: u64,
    /// The address, reason or description, NUL-terminated (truncated to fit).
    pub detail: [c_char; MIRROR_EVENT_DETAIL_LEN],
}

/// Subscribes to the node's events: every event from now on, in order, until the node closes.
/// Each subscription has its own queue of 1024 events; one that falls behind gets a
/// `MIRROR_EVENT_LOST` event with the count, and never slows the node. Nothing is ever called
/// from the library's threads. The subscription stays valid after `mirror_close` (it then ends).
///
/// Returns 0 and stores the handle in `*out`; `MIRROR_EINVAL` (NULL); `MIRROR_EIO` (no
/// descriptor could be made). Thread safety: any thread.
///
/// # Safety
/// `m` is NULL or a live handle; `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn mirror_events_subscribe(
    m: *const mirror,
    out: *mut *mut mirror_events,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg_ref(m, "m") }?;
        check_out(out, "out")?;
        let events = m.node.events()?;
        let handle = Box::into_raw(Box::new(mirror_events { events }));
        // SAFETY: `out` passed check_out and is valid for a write per the contract.
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// A descriptor that is readable while an event is waiting, or once the stream has ended (then
/// `mirror_events_next` returns `MIRROR_ECLOSED`): for `poll(2)`, `select(2)` or `epoll`. Do not
/// read from it or close it; it belongs to the subscription. Returns the descriptor (>= 0) or
/// `MIRROR_EINVAL` (NULL). Thread safety: any thread.
///
/// # Safety
/// `e` is NULL or a live subscription.
#[no_mangle]
pub unsafe extern "C" fn mirror_events_fd(e: *const mirror_events) -> c_int {
    boundary(|| {
        // SAFETY: per this function's contract.
        match unsafe { arg_ref(e, "e") } {
            Ok(e) => e.events.fd(),
            Err(err) => {
                boundary::set_last_error(&err.message);
                err.code
            }
        }
    })
}

/// Takes the next event into `*out` without waiting. Returns 0; `MIRROR_EAGAIN` (none waiting:
/// poll the descriptor); `MIRROR_ECLOSED` (the node closed and every event was taken);
/// `MIRROR_EINVAL` (NULL, or `out->size` smaller than this struct's first version). `*out` is
/// written only on success. Thread safety: any thread; one event goes to one caller.
///
/// # Safety
/// `e` is NULL or a live subscription; `out` is NULL or valid for reading and writing
/// `out->size` bytes.
#[no_mangle]
pub unsafe extern "C" fn mirror_events_next(
    e: *const mirror_events,
    out: *mut mirror_event,
) -> c_int {
    ffi_call(|| {
        // SAFETY: per this function's contract.
        let e = unsafe { arg_ref(e, "e") }?;
        check_out(out, "out")?;
        // SAFETY: non-NULL and aligned (checked); the caller's struct starts with `size`.
        let caller_size = unsafe { std::ptr::addr_of!((*out).size).read() } as usize;
        let full = std::mem::size_of::<mirror_event>();
        if caller_size < full {
            return Err(FfiError::invalid(format!(
                "out->size is {caller_size}; set it to sizeof(struct mirror_event) ({full})"
            )));
        }
        let Some(record) = e.events.try_next() else {
            return Err(if e.events.ended() {
                FfiError::new(MIRROR_ECLOSED, "the node closed; no more events")
            } else {
                FfiError::new(MIRROR_EAGAIN, "no event waiting")
            });
        };
        let event = c_event(&record);
        // SAFETY: `out` is valid for writing `caller_size >= size_of::<mirror_event>()` bytes.
        unsafe { out.write(event) };
        Ok(())
    })
}

/// The C form of an event.
fn c_event(r: &crate::EventRecord) -> mirror_event {
    use crate::Event;
    let mut ev = mirror_event {
        size: std::mem::size_of::<mirror_event>() as u32,
        kind: 0,
        seq: r.seq,
        unix_us: r.unix_us,
        peer_node_id: 0,
        term: 0,
        records: 0,
        bytes: 0,
        lost: 0,
        detail: [0; MIRROR_EVENT_DETAIL_LEN],
    };
    let detail = match &r.event {
        Event::Connected {
            peer_node_id,
            peer_address,
        } => {
            ev.kind = MIRROR_EVENT_CONNECTED;
            ev.peer_node_id = *peer_node_id;
            peer_address.clone()
        }
        Event::PeerLost { reason } => {
            ev.kind = MIRROR_EVENT_PEER_LOST;
            reason.clone()
        }
        Event::Degraded => {
            ev.kind = MIRROR_EVENT_DEGRADED;
            String::new()
        }
        Event::Recovering { records, bytes } => {
            ev.kind = MIRROR_EVENT_RECOVERING;
            ev.records = *records;
            ev.bytes = *bytes;
            String::new()
        }
        Event::Synchronous => {
            ev.kind = MIRROR_EVENT_SYNCHRONOUS;
            String::new()
        }
        Event::Promoted { term } => {
            ev.kind = MIRROR_EVENT_PROMOTED;
            ev.term = *term;
            String::new()
        }
        Event::Demoted => {
            ev.kind = MIRROR_EVENT_DEMOTED;
            String::new()
        }
        Event::Fenced { reason } => {
            ev.kind = MIRROR_EVENT_FENCED;
            reason.clone()
        }
        Event::SplitBrain {
            description,
            discarded,
        } => {
            ev.kind = MIRROR_EVENT_SPLIT_BRAIN;
            match discarded {
                Some(p) => format!("{description}; saved to {}", p.display()),
                None => description.clone(),
            }
        }
        Event::Failed { reason } => {
            ev.kind = MIRROR_EVENT_FAILED;
            reason.clone()
        }
        Event::Lost { count } => {
            ev.kind = MIRROR_EVENT_LOST;
            ev.lost = *count;
            String::new()
        }
        Event::BitmapFallback {
            records,
            dirty_chunks,
        } => {
            ev.kind = MIRROR_EVENT_BITMAP_FALLBACK;
            ev.records = *records;
            ev.lost = *dirty_chunks;
            String::new()
        }
        Event::TransferStarted { kind, chunks } => {
            ev.kind = MIRROR_EVENT_TRANSFER_STARTED;
            ev.records = *chunks;
            (*kind).to_string()
        }
        Event::TransferProgress {
            kind,
            chunks_total,
            chunks_done,
            bytes_left,
        } => {
            ev.kind = MIRROR_EVENT_TRANSFER_PROGRESS;
            ev.records = *chunks_total;
            ev.lost = *chunks_done;
            ev.bytes = *bytes_left;
            (*kind).to_string()
        }
        Event::TransferFinished {
            kind,
            chunks_compared,
            chunks_differing,
            bytes_sent,
            abandoned,
        } => {
            ev.kind = MIRROR_EVENT_TRANSFER_FINISHED;
            ev.records = *chunks_compared;
            ev.lost = *chunks_differing;
            ev.bytes = *bytes_sent;
            match abandoned {
                Some(why) => format!("{kind}: ended early: {why}"),
                None => (*kind).to_string(),
            }
        }
    };
    // Truncated on a character boundary, NUL-terminated, no interior NUL.
    let mut end = detail.len().min(MIRROR_EVENT_DETAIL_LEN - 1);
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    for (slot, b) in ev.detail.iter_mut().zip(detail[..end].bytes()) {
        *slot = if b == 0 { b' ' } else { b } as c_char;
    }
    ev
}

/// Ends a subscription and frees it. NULL is fine. Thread safety: only when no other call on
/// this subscription is running or will start.
///
/// # Safety
/// `e` is NULL or a live subscription from `mirror_events_subscribe`, freed only once.
#[no_mangle]
pub unsafe extern "C" fn mirror_events_free(e: *mut mirror_events) {
    boundary(|| {
        if !e.is_null() {
            // SAFETY: `e` came from `Box::into_raw` in `mirror_events_subscribe`, is live, and
            // nothing else uses it now (contract); it is freed exactly once, here.
            drop(unsafe { Box::from_raw(e) });
        }
    })
}

/// Extension. The library's version, e.g. "0.1.0" (static; never NULL). The ABI is that of
/// `libmirror.so.0` for every 0.x version (see docs/FFI.md).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn mirror_version() -> *const c_char {
    boundary(|| {
        const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
        VERSION.as_ptr().cast::<c_char>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn every_pointer_argument_is_checked() {
        // SAFETY: every call below passes NULL where a pointer is expected, which each export
        // must refuse before dereferencing anything.
        unsafe {
            assert_eq!(
                mirror_config_set(std::ptr::null_mut(), c"role".as_ptr(), c"primary".as_ptr()),
                MIRROR_EINVAL
            );
            let cfg = mirror_config_new();
            assert!(!cfg.is_null());
            assert_eq!(
                mirror_config_set(cfg, std::ptr::null(), c"x".as_ptr()),
                MIRROR_EINVAL
            );
            assert_eq!(
                mirror_config_set(cfg, c"role".as_ptr(), std::ptr::null()),
                MIRROR_EINVAL
            );
            assert_eq!(
                mirror_config_set(cfg, c"rol".as_ptr(), c"primary".as_ptr()),
                MIRROR_EKEY
            );
            assert_eq!(
                mirror_config_set(cfg, c"role".as_ptr(), c"prime".as_ptr()),
                MIRROR_EVALUE
            );
            assert_eq!(
                mirror_config_set(cfg, c"role".as_ptr(), c"\xff".as_ptr()),
                MIRROR_EVALUE
            );
            let mut m: *mut mirror = std::ptr::null_mut();
            assert_eq!(mirror_open(std::ptr::null(), &mut m), MIRROR_EINVAL);
            assert_eq!(mirror_open(cfg, std::ptr::null_mut()), MIRROR_EINVAL);
            assert_eq!(mirror_open(cfg, &mut m), MIRROR_EMISSING);
            assert!(m.is_null(), "no output on failure");
            mirror_config_free(cfg);
            mirror_config_free(std::ptr::null_mut());
            let mut sub: *mut mirror_events = std::ptr::null_mut();
            assert_eq!(
                mirror_events_subscribe(std::ptr::null(), &mut sub),
                MIRROR_EINVAL
            );
            assert!(sub.is_null());
            assert_eq!(mirror_events_fd(std::ptr::null()), MIRROR_EINVAL);
            assert_eq!(
                mirror_events_next(std::ptr::null(), std::ptr::null_mut()),
                MIRROR_EINVAL
            );
            mirror_events_free(std::ptr::null_mut());
            let byte = 0u8;
            let mut t = 0u64;
            let nm = std::ptr::null_mut::<mirror>();
            assert_eq!(
                mirror_write(nm, 0, (&byte as *const u8).cast(), 1),
                MIRROR_EINVAL
            );
            assert_eq!(
                mirror_submit(nm, 0, (&byte as *const u8).cast(), 1, &mut t),
                MIRROR_EINVAL
            );
            assert_eq!(mirror_wait(nm, 1, 0), MIRROR_EINVAL);
            let mut b = [0u8; 4];
            assert_eq!(mirror_read(nm, 0, b.as_mut_ptr().cast(), 4), MIRROR_EINVAL);
            let mut len = 7usize;
            assert!(mirror_region(nm, &mut len).is_null());
            assert_eq!(len, 7);
            let mut s = mirror_stats {
                size: std::mem::size_of::<mirror_stats>() as u32,
                ..Default::default()
            };
            assert_eq!(mirror_stats(nm, &mut s), MIRROR_EINVAL);
            let mut port = 0u16;
            assert_eq!(mirror_listen_port(nm, &mut port), MIRROR_EINVAL);
            assert_eq!(mirror_wait_synchronous(nm, 0), MIRROR_EINVAL);
            assert_eq!(mirror_close(nm), MIRROR_OK);
            let n = mirror_last_error(std::ptr::null_mut(), 0);
            assert!(n > 0);
            assert!(!mirror_strerror(12345).is_null());
            let v = CStr::from_ptr(mirror_version()).to_str().unwrap();
            assert_eq!(v, env!("CARGO_PKG_VERSION"));
        }
    }

    #[test]
    fn negative_timeouts_mean_forever() {
        assert_eq!(timeout_of(-1), None);
        assert_eq!(timeout_of(i64::MIN), None);
        assert_eq!(timeout_of(0), Some(Duration::ZERO));
        assert_eq!(timeout_of(1500), Some(Duration::from_micros(1500)));
    }
}
