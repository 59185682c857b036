//! The only module with `unsafe`: memory mappings, cache-line flushes, file locks and
//! preallocation.
//!
//! A [`Mapping`] is a `MAP_SHARED` view of a whole file. Its bytes are shared memory: the
//! kernel writes them back to the file, other processes may map the same file, and (for the
//! region) other threads of this process read them while the poller writes. We therefore never
//! hand out references to mapped bytes from this module except through the explicitly
//! exclusive [`Mapping::bytes`]/[`Mapping::bytes_mut`] (used by the queue, whose writer is
//! unique by `&mut` plus an exclusive `flock`), and through `&AtomicU64` for header words.
//! Everything else copies with raw pointers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use crate::{Durability, StorageError};

/// Size of a cache line for flushing purposes (x86-64).
pub(crate) const CACHE_LINE: usize = 64;

enum Inner {
    /// Process and Power modes, and read-only views: memmap2 owns the mapping.
    Memmap(memmap2::MmapRaw),
    /// Pmem mode: `MAP_SHARED_VALIDATE | MAP_SYNC`, mapped and unmapped by us.
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64")),
        allow(dead_code)
    )]
    Sync { ptr: NonNull<u8> },
}

/// A shared mapping of a whole file.
pub(crate) struct Mapping {
    inner: Inner,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value until Drop; the raw pointer in
// `Inner::Sync` is not tied to a thread. Concurrent access discipline is documented on each
// accessor (atomics for header words, exclusive borrows for queue bytes, raw copies for
// region bytes).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only allows atomic header access, raw copies with documented
// shared-memory semantics, and `bytes()` whose callers exclude concurrent writers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` (which must be at least that long) read-write, with the
    /// flags `durability` calls for.
    pub(crate) fn map_rw(
        file: &File,
        len: usize,
        durability: Durability,
        path: &Path,
    ) -> Result<Self, StorageError> {
        assert!(len > 0, "zero-length mapping");
        match durability {
            Durability::Process | Durability::Power => {
                let raw = memmap2::MmapOptions::new()
                    .len(len)
                    .map_raw(file)
                    .map_err(|e| StorageError::io(path, "mmap", e))?;
                populate(raw.as_mut_ptr(), len, durability);
                Ok(Mapping {
                    inner: Inner::Memmap(raw),
                    len,
                    writable: true,
                })
            }
            Durability::Pmem => Self::map_sync(file, len, path),
        }
    }

    /// Maps `len` bytes of `file` read-only (for inspection; never written).
    pub(crate) fn map_ro(file: &File, len: usize, path: &Path) -> Result<Self, StorageError> {
        assert!(len > 0, "zero-length mapping");
        let raw = memmap2::MmapOptions::new()
            .len(len)
            .map_raw_read_only(file)
            .map_err(|e| StorageError::io(path, "mmap (read-only)", e))?;
        Ok(Mapping {
            inner: Inner::Memmap(raw),
            len,
            writable: false,
        })
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn map_sync(file: &File, len: usize, path: &Path) -> Result<Self, StorageError> {
        // libc does not export MAP_SYNC for every Linux target; the value is the same on all
        // architectures that define it (include/uapi/asm-generic/mman-common.h).
        const MAP_SYNC: libc::c_int = 0x80000;
        // SAFETY: a fresh mapping (addr = NULL) of a file descriptor we own, with a length the
        // caller checked against the file size. mmap has no memory-safety preconditions
        // beyond not clobbering existing mappings, which a NULL hint never does.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED_VALIDATE | MAP_SYNC,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // EOPNOTSUPP: the filesystem does not support MAP_SYNC (not DAX).
                // EINVAL: a kernel older than 4.15 that does not know MAP_SHARED_VALIDATE.
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Err(StorageError::NotDax {
                    path: path.to_path_buf(),
                }),
                _ => Err(StorageError::io(path, "mmap (MAP_SYNC)", e)),
            };
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| {
            StorageError::io(
                path,
                "mmap (MAP_SYNC)",
                io::Error::other("mmap returned NULL"),
            )
        })?;
        Ok(Mapping {
            inner: Inner::Sync { ptr },
            len,
            writable: true,
        })
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    fn map_sync(_file: &File, _len: usize, _path: &Path) -> Result<Self, StorageError> {
        Err(StorageError::Unsupported {
            what: "durability \"pmem\" (needs Linux on x86-64)",
        })
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        match &self.inner {
            Inner::Memmap(m) => m.as_ptr(),
            Inner::Sync { ptr } => ptr.as_ptr(),
        }
    }

    fn as_mut_ptr(&self) -> *mut u8 {
        assert!(self.writable, "write through a read-only mapping");
        match &self.inner {
            Inner::Memmap(m) => m.as_mut_ptr(),
            Inner::Sync { ptr } => ptr.as_ptr(),
        }
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off <= self.len && len <= self.len - off,
            "mapping access {off}+{len} outside {} bytes",
            self.len
        );
    }

    /// The u64 header word at `off` (8-aligned), for atomic access.
    pub(crate) fn word(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert_eq!(off % 8, 0, "unaligned header word");
        // SAFETY: in bounds (checked) and 8-aligned (mappings are page-aligned and `off` is a
        // multiple of 8), valid for the lifetime of `&self` (unmapped only in Drop). AtomicU64
        // has the size and alignment of u64 and permits shared mutation, including by other
        // processes mapping the same file. Header words are never accessed non-atomically
        // while a Mapping exists (the static block is read with pread, not through here).
        // On a read-only mapping only loads are issued, which for u64 on 64-bit targets are
        // plain loads (no read-modify-write that would fault).
        unsafe { &*self.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Shared view of `len` bytes at `off`. Callers guarantee that nobody writes these bytes
    /// while the borrow lives: the queue only calls this on its data area, which is written
    /// only through `&mut self` (bytes_mut), and an exclusive flock keeps other processes from
    /// opening the queue for writing; the region's writer only while it cannot write
    /// (`RegionWriter::with_bytes`).
    pub(crate) fn bytes(&self, off: usize, len: usize) -> &[u8] {
        self.check(off, len);
        // SAFETY: in bounds (checked), mapped for the lifetime of &self; the no-writer
        // requirement is the caller's, stated above.
        unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) }
    }

    /// Exclusive view of `len` bytes at `off` (see [`Mapping::bytes`]).
    pub(crate) fn bytes_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        self.check(off, len);
        // SAFETY: in bounds, mapped read-write (as_mut_ptr asserts), and `&mut self` excludes
        // every other borrow from this Mapping for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr().add(off), len) }
    }

    /// Copies `out.len()` bytes at `off` out of the mapping, racing writers permitted.
    pub(crate) fn read_raw(&self, off: usize, out: &mut [u8]) {
        self.check(off, out.len());
        // SAFETY: source in bounds (checked) and mapped; destination is a distinct Rust
        // buffer. No reference to the mapped bytes is created. If another thread or process
        // writes the same bytes concurrently, the copy may observe a mix of old and new
        // bytes: shared-memory semantics, as with memory shared with another process (strictly
        // a data race in the Rust memory model; callers get happens-before through their own
        // synchronization, e.g. the engine's completion watermark or a Release/Acquire cursor).
        unsafe { copy_ordinary(self.as_ptr().add(off), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into the mapping at `off`, concurrent readers permitted (same semantics as
    /// [`Mapping::read_raw`]). From [`STREAM_MIN`] bytes the copy streams past the cache (see
    /// [`copy_streaming`]); when it returns, the bytes are ordered before this thread's later
    /// stores as with an ordinary copy.
    pub(crate) fn write_raw(&self, off: usize, data: &[u8]) {
        self.write_raw_as(off, data, data.len() >= STREAM_MIN)
    }

    /// [`Mapping::write_raw`], streamed or not as `stream` says.
    pub(crate) fn write_raw_as(&self, off: usize, data: &[u8], stream: bool) {
        self.check(off, data.len());
        let dst = self.as_mut_ptr();
        // SAFETY: destination in bounds (checked), mapped read-write (asserted in
        // as_mut_ptr); the source is a distinct Rust buffer. No reference to the mapped bytes
        // is created; concurrent readers see shared-memory semantics (see read_raw). Writers
        // are single by contract of the caller (Region documents it).
        unsafe {
            let dst = dst.add(off);
            if stream {
                copy_streaming(data, dst);
            } else {
                copy_ordinary(data.as_ptr(), dst, data.len());
            }
        }
    }

    /// Brings the lines of `off..off + len` into the cache ahead of a write, so that the
    /// write finds them (and their page's translation) there.
    pub(crate) fn prefetch(&self, off: usize, len: usize) {
        self.check(off, len);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let base = self.as_ptr();
            let mut line = off - off % CACHE_LINE;
            while line < off + len {
                // SAFETY: `line` lies inside the mapping (bounds checked above; mappings are
                // page-aligned); a prefetch reads nothing the program sees and never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(line).cast::<i8>()) };
                line += CACHE_LINE;
            }
        }
    }

    /// crc32c of `len` bytes at `off` continued from `crc`, via raw copies in bounded chunks
    /// (no reference to possibly concurrently written bytes).
    pub(crate) fn crc_raw(&self, crc: u32, off: usize, len: usize, scratch: &mut [u8]) -> u32 {
        self.check(off, len);
        assert!(!scratch.is_empty());
        let mut crc = crc;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(scratch.len());
            self.read_raw(off + done, &mut scratch[..n]);
            crc = mirror_proto::crc::crc32c_append(crc, &scratch[..n]);
            done += n;
        }
        crc
    }

    /// Writes back the cache lines covering `off..off+len` towards persistent memory (no
    /// fence; call [`fence`] once after a batch of flushes).
    pub(crate) fn flush_lines(&self, off: usize, len: usize) {
        self.check(off, len);
        if len == 0 {
            return;
        }
        flush_lines_raw(self.as_ptr(), off, len);
    }
}

/// Copies `len` bytes from `src` to `dst` with ordinary stores, as `memcpy` does, except where
/// `memcpy` would take `rep movsb` at a distance at which it runs 15-30 times slower
/// ([`mirror_proto::rep_movsb_is_slow`]: AMD Zen 3). A record copied into the ring or a region
/// read lands at any distance from its source; there 16-byte vector moves copy instead (on
/// the AMD VM 4 KiB in 89-101 ns and 64 KiB in 1.6 µs, where `memcpy` took 74 ns and 1.6 µs
/// at a good distance, 2.0 and 23 µs at such a one).
///
/// # Safety
///
/// `src..src + len` is valid for reads, `dst..dst + len` for writes, and they do not overlap.
unsafe fn copy_ordinary(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= mirror_proto::REP_MOVSB_MIN && mirror_proto::rep_movsb_is_slow(src, dst) {
        // SAFETY: as the caller guarantees (`copy_by_lanes` asks the same). A volatile store
        // to the aligned lane `copy_by_lanes` passes, so that the compiler does not turn the
        // loop back into a `memcpy` call.
        unsafe { copy_by_lanes(src, dst, len, |to, lane| std::ptr::write_volatile(to, lane)) };
        return;
    }
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// Writes of at least this many bytes into a mapping stream past the cache ([`copy_streaming`]).
pub(crate) const STREAM_MIN: usize = 4096;

/// Copies `src` to `dst` with non-temporal stores (x86-64; an ordinary copy elsewhere), for the
/// region's writes: a region is large and written at scattered offsets, so the lines a write
/// lands on are rarely cached, and an ordinary store first reads each of them from memory
/// (read for ownership) only to overwrite it whole, and then evicts lines the node will use
/// again (its receive buffer, its queue's tail). Measured (docs/PERFORMANCE.md): a catch-up of
/// 5 % of a 1 GiB region 5-26 % faster, pipelined 4 KiB writes 13-18 % more per second, an
/// initial sync 77-85 → 94-109 % of streaming; sync latency unchanged at 4 KiB, lower at
/// 64 KiB.
///
/// Non-temporal stores are weakly ordered, even against this thread's later ordinary stores:
/// the closing `sfence` orders them before everything that follows, so a Release store that
/// publishes these bytes (a completion, an applied point) publishes them as it would an
/// ordinary copy's, and a later `msync`, `fdatasync` or cache-line write-back finds them in
/// memory.
///
/// # Safety
///
/// `dst..dst + src.len()` is valid for writes and does not overlap `src`.
unsafe fn copy_streaming(src: &[u8], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_sfence, _mm_stream_si128};
        // SAFETY: as the caller guarantees (`copy_by_lanes` asks the same); each lane it
        // passes is 16-byte aligned, as `_mm_stream_si128` requires. SSE2 (the streamed store
        // and `sfence`) is part of the x86-64 baseline.
        unsafe {
            copy_by_lanes(src.as_ptr(), dst, src.len(), |to, lane| {
                _mm_stream_si128(to, lane)
            });
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as the caller guarantees.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())
    }
}

/// Copies `len` bytes from `src` to `dst`: `store` writes each 16-byte lane from `dst`'s first
/// 16-byte boundary on (an aligned address, unaligned loads from `src`), and the bytes before
/// and after the lanes are copied as they are. The one lane loop of [`copy_streaming`] and
/// [`copy_ordinary`], which differ in the store.
///
/// # Safety
///
/// `src..src + len` is valid for reads, `dst..dst + len` for writes, and they do not overlap;
/// `store` writes exactly the 16 bytes at the aligned pointer it is given.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn copy_by_lanes(
    src: *const u8,
    dst: *mut u8,
    len: usize,
    store: impl Fn(*mut std::arch::x86_64::__m128i, std::arch::x86_64::__m128i),
) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128};
    const LANE: usize = std::mem::size_of::<__m128i>();
    let head = dst.align_offset(LANE).min(len);
    let lanes = (len - head) / LANE;
    let tail = head + lanes * LANE;
    // SAFETY: every access stays inside `src..src + len` and `dst..dst + len` (head <= tail
    // <= len), which the caller guarantees valid and disjoint. The lanes start at `dst +
    // head`, 16-byte aligned by construction (align_offset); the loads are unaligned loads
    // (SSE2, in the x86-64 baseline).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let from = src.add(head).cast::<__m128i>();
        let to = dst.add(head).cast::<__m128i>();
        for i in 0..lanes {
            store(to.add(i), _mm_loadu_si128(from.add(i)));
        }
        std::ptr::copy_nonoverlapping(src.add(tail), dst.add(tail), len - tail);
    }
}

#[cfg(target_arch = "x86_64")]
fn flush_lines_raw(base: *const u8, off: usize, len: usize) {
    let start = (off / CACHE_LINE) * CACHE_LINE;
    let end = off + len;
    let how = flush_instruction();
    let mut line = start;
    while line < end {
        // Mappings are page-aligned, so `base + line` is a line start inside the mapping
        // (line >= start >= 0, line < end <= mapping length).
        let p = base.wrapping_add(line);
        match how {
            FlushInsn::Clwb => {
                // SAFETY: CPUID reported CLWB; `p` points into a live mapping (checked by the
                // caller's bounds check). CLWB only writes back a line; it has no effect on
                // program-visible memory contents.
                unsafe {
                    std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
            }
            FlushInsn::Clflushopt => {
                // SAFETY: CPUID reported CLFLUSHOPT; `p` is inside a live mapping (as above).
                unsafe {
                    std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
            }
            FlushInsn::Clflush => {
                // SAFETY: CLFLUSH is part of SSE2, baseline on x86-64; `p` is inside a live
                // mapping (as above).
                unsafe { core::arch::x86_64::_mm_clflush(p) }
            }
        }
        line += CACHE_LINE;
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn flush_lines_raw(_base: *const u8, _off: usize, _len: usize) {
    // Unreachable: Pmem mappings are refused at open on other architectures.
    unreachable!("cache-line flush requested on a non-x86-64 target");
}

/// Orders the preceding flushes before any later store (makes them durable on pmem).
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE is part of SSE, baseline on x86-64; it has no memory-safety preconditions.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushInsn {
    Clwb,
    Clflushopt,
    Clflush,
}

/// The best available cache-line write-back instruction, detected once with CPUID.
#[cfg(target_arch = "x86_64")]
pub(crate) fn flush_instruction() -> FlushInsn {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0 = not yet detected, 1 = clwb, 2 = clflushopt, 3 = clflush.
    static DETECTED: AtomicU8 = AtomicU8::new(0);
    // Relaxed: the value is a pure function of the CPU; racing detections store the same
    // value and nothing else is published through it.
    match DETECTED.load(Ordering::Relaxed) {
        1 => return FlushInsn::Clwb,
        2 => return FlushInsn::Clflushopt,
        3 => return FlushInsn::Clflush,
        _ => {}
    }
    // SAFETY: CPUID is available on every x86-64 CPU; leaf 0 returns the highest leaf.
    // (`__cpuid` is a safe fn in newer Rust; the block keeps the MSRV compiling.)
    #[allow(unused_unsafe)]
    let max_leaf = unsafe { core::arch::x86_64::__cpuid(0) }.eax;
    let insn = if max_leaf >= 7 {
        // SAFETY: leaf 7 exists (checked above); CPUID has no other preconditions.
        #[allow(unused_unsafe)]
        let ebx = unsafe { core::arch::x86_64::__cpuid_count(7, 0) }.ebx;
        if ebx & (1 << 24) != 0 {
            FlushInsn::Clwb
        } else if ebx & (1 << 23) != 0 {
            FlushInsn::Clflushopt
        } else {
            FlushInsn::Clflush
        }
    } else {
        FlushInsn::Clflush
    };
    let code = match insn {
        FlushInsn::Clwb => 1,
        FlushInsn::Clflushopt => 2,
        FlushInsn::Clflush => 3,
    };
    DETECTED.store(code, Ordering::Relaxed);
    insn
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Inner::Sync { ptr } = self.inner {
            // SAFETY: `ptr`/`len` are exactly what mmap returned/was given; no borrow of the
            // mapping outlives `self` (all accessors borrow `self`).
            let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), self.len) };
            debug_assert_eq!(rc, 0, "munmap failed");
        }
        // Inner::Memmap unmaps in its own Drop.
    }
}

/// Takes an exclusive, non-blocking `flock` on `file` (released when the file is closed).
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), StorageError> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(StorageError::Locked {
            path: path.to_path_buf(),
        })
    } else {
        Err(StorageError::io(path, "flock", e))
    }
}

/// Whether some other open file description holds an exclusive lock on the file (a live
/// writer). Probes with a shared lock and releases it at once; never blocks.
pub(crate) fn is_locked_by_writer(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above; releases the shared lock we just took.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        false
    } else {
        io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
    }
}

/// Pre-faults a fresh writable shared mapping (Linux 5.14+), so that the data path never takes
/// a full page fault on first touch of a queue or region page (measured: a 4 KiB mirrored write
/// took 2.6x the TCP floor with faults, mostly from four first-touch faults per write). Best
/// effort: older kernels answer EINVAL and the pages fault in lazily as before.
///
/// `process`: `MADV_POPULATE_WRITE`, as a write would. `power`: `MADV_POPULATE_READ`: a write
/// fault dirties its page, so populating for writing would dirty the whole file, and the first
/// `fdatasync` (a region's first checkpoint, on the node's loop) would write all of it back, a
/// region's every byte after every open (64 MiB in the lab's DRBD rows; gigabytes for a large
/// region). Under `power` a page is write-protected again after every sync anyway, so a write
/// takes that minor fault whatever was populated.
fn populate(ptr: *mut u8, len: usize, durability: Durability) {
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_READ: libc::c_int = 22;
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let advice = if durability == Durability::Power {
            MADV_POPULATE_READ
        } else {
            MADV_POPULATE_WRITE
        };
        // SAFETY: `ptr..ptr+len` is a mapping we just created and own; MADV_POPULATE_READ and
        // MADV_POPULATE_WRITE only fault its pages in (as a read or a write would, without
        // changing their contents).
        unsafe { libc::madvise(ptr.cast(), len, advice) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, durability);
}

/// Extends `file` to `len` bytes with allocated, zeroed blocks (so that writing through the
/// mapping later cannot hit ENOSPC, which would arrive as SIGBUS). Falls back to a sparse
/// `set_len` where the filesystem cannot preallocate.
pub(crate) fn allocate(file: &File, len: u64, path: &Path) -> Result<(), StorageError> {
    let len_off = libc::off_t::try_from(len).map_err(|_| StorageError::InvalidArgument {
        why: format!("file length {len} does not fit off_t"),
    })?;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: fallocate on a descriptor we own, mode 0 (allocate and extend); no memory is
        // passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(StorageError::io(path, "fallocate", e));
        }
    }
    let _ = len_off;
    file.set_len(len)
        .map_err(|e| StorageError::io(path, "set_len", e))
}

/// Writes zeros over `len` bytes of `file` from `from`, turning blocks that `allocate` reserved
/// into written ones. A `power` queue needs this: ext4 (and XFS) preallocate as *unwritten*
/// extents, and the first write into each block then makes `fdatasync` commit the journal to
/// convert the extent. Measured in the lab's emulated machine (ext4 on a `cache=none` disk):
/// 4 KiB through a shared mapping then `fdatasync`, 2.8 ms into fallocated blocks, 0.8 ms into
/// blocks written once before; that was most of what `power` cost over `process`.
pub fn write_zeros(file: &File, from: u64, len: u64, path: &Path) -> Result<(), StorageError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], from + done)
            .map_err(|e| StorageError::io(path, "write zeros", e))?;
        done += n;
    }
    Ok(())
}

/// Writes `pieces`, back to back, into `file` at `off` through the page cache (`pwritev`, one
/// system call in the common case), for a mapped file whose writes should not go through the
/// mapping. The mapping sees the bytes at once (one page cache). Why `power` appends take this
/// way: `fdatasync` of pages dirtied through a shared mapping write-protects every such page
/// again (and flushes TLBs), and the next store into the page takes a fault; measured on the
/// development VM (ext4), 4 KiB records then `fdatasync`: 3.2-3.7 k/s one record per sync and
/// 51-55 k/s 64 per sync through a mapping, 17-21 k/s and 230-260 k/s through `pwrite`.
pub(crate) fn write_file_at(
    file: &File,
    off: u64,
    pieces: &[&[u8]],
    path: &Path,
) -> Result<(), StorageError> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let iov: Vec<libc::iovec> = pieces
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let at = libc::off_t::try_from(off).map_err(|_| StorageError::InvalidArgument {
        why: format!("file offset {off} does not fit off_t"),
    })?;
    let iov_count =
        libc::c_int::try_from(iov.len()).map_err(|_| StorageError::InvalidArgument {
            why: format!("{} pieces are too many for one pwritev", iov.len()),
        })?;
    // SAFETY: `iov` describes `iov_count` live, readable Rust buffers (the kernel only reads
    // them; the `*mut` is the C type's); the descriptor is ours and open for writing.
    let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov_count, at) };
    if n < 0 {
        return Err(StorageError::io(
            path,
            "pwritev",
            io::Error::last_os_error(),
        ));
    }
    let written = n as usize;
    if written < total {
        // A short write (a signal, a full device): write the rest from one buffer.
        let rest: Vec<u8> = pieces.concat().split_off(written);
        file.write_all_at(&rest, off + written as u64)
            .map_err(|e| StorageError::io(path, "pwrite", e))?;
    }
    Ok(())
}

/// Starts the write-back of `file`'s dirty pages and returns without waiting for it
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE` over the whole file): an `fdatasync` later
/// finds them written or under way. Durability is still that `fdatasync`'s: this neither waits
/// for the device nor flushes its cache, and a write-back error is reported by it too.
pub(crate) fn start_write_back(file: &File, path: &Path) -> Result<(), StorageError> {
    // SAFETY: plain system call on a descriptor we own; offset 0 and length 0 mean "to the end
    // of the file", no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        return Err(StorageError::io(
            path,
            "sync_file_range",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The temporary name a file of this crate is built under before it is linked into place
/// (hidden, beside it, tagged with the process id).
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.creating-{}", std::process::id()))
}

/// fsyncs the directory containing `path`, making a just-created name durable.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), StorageError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let f = File::open(dir).map_err(|e| StorageError::io(dir, "open directory", e))?;
    f.sync_all()
        .map_err(|e| StorageError::io(dir, "fsync directory", e))
}

/// Refuses durability modes this platform cannot provide.
pub(crate) fn check_platform(durability: Durability) -> Result<(), StorageError> {
    if durability == Durability::Pmem && !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(StorageError::Unsupported {
            what: "durability \"pmem\" (needs Linux on x86-64)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh file of `len` bytes mapped read-write (`process`), and the directory that holds it.
    fn mapped(len: usize) -> (tempfile::TempDir, Mapping) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(len as u64).unwrap();
        let m = Mapping::map_rw(&f, len, Durability::Process, &p).unwrap();
        (dir, m)
    }

    #[test]
    fn flush_lines_work_on_ordinary_memory() {
        // CLWB/CLFLUSHOPT/CLFLUSH on DRAM-backed mappings are valid (no-op durability-wise);
        // this exercises the instruction selection and the line loop, including unaligned
        // ranges and the last partial line.
        let (_dir, m) = mapped(8192);
        m.write_raw(100, &[7u8; 300]);
        m.flush_lines(100, 300);
        m.flush_lines(0, 8192);
        m.flush_lines(8191, 1);
        m.flush_lines(5, 0);
        fence();
        let mut out = [0u8; 300];
        m.read_raw(100, &mut out);
        assert_eq!(out, [7u8; 300]);
        #[cfg(target_arch = "x86_64")]
        {
            // Detection is stable.
            assert_eq!(flush_instruction(), flush_instruction());
        }
    }

    #[test]
    fn streamed_writes_land_exactly_at_every_alignment_and_length() {
        // Lengths below, at and above STREAM_MIN, at offsets that put the head, the 16-byte
        // lanes and the tail in every position; the bytes around each write stay as they were.
        const LEN: usize = 3 * 65536;
        let (_dir, m) = mapped(LEN);
        let mut want = vec![0u8; LEN];
        let mut round = 0u8;
        for len in [
            STREAM_MIN - 1,
            STREAM_MIN,
            STREAM_MIN + 1,
            STREAM_MIN + 15,
            65536 + 7,
        ] {
            for off in [0usize, 1, 7, 15, 16, 17, 4095, 65536 - 3] {
                round = round.wrapping_add(1);
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
                    .collect();
                m.write_raw(off, &data);
                want[off..off + len].copy_from_slice(&data);
                let mut got = vec![0u8; LEN];
                m.read_raw(0, &mut got);
                assert!(got == want, "write of {len} bytes at {off}");
            }
        }
    }

    #[test]
    fn ordinary_copies_land_exactly_at_every_distance_from_their_source() {
        // Writes and reads with ordinary stores whose destination sits 0-80 bytes past the
        // source modulo a page (1-63 take the vector moves) and a page apart, at lengths around
        // the point where `memcpy` would take `rep movsb`; the bytes around each stay as they
        // were.
        const LEN: usize = 4 * 4096 + 70_000;
        let (_dir, m) = mapped(LEN);
        let mut want = vec![0u8; LEN];
        let mut source: Vec<u8> = (0..2 * 4096 + 70_000)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let page_start = source.as_ptr().align_offset(4096);
        let mut round = 0u8;
        let mut taken_slowly = 0;
        for len in [
            mirror_proto::REP_MOVSB_MIN - 1,
            mirror_proto::REP_MOVSB_MIN,
            4096 + 15,
            65_536 + 7,
        ] {
            for apart in (0..=80).chain([4096]) {
                round = round.wrapping_add(1);
                // The destination `off` is `apart` bytes past the source within a page.
                let off = 4096 + 3;
                let src_at = page_start + (4096 + off - apart) % 4096;
                for b in &mut source[src_at..src_at + len] {
                    *b = b.wrapping_add(round);
                }
                let src = &source[src_at..src_at + len];
                let dst = m.as_ptr().wrapping_add(off);
                taken_slowly += usize::from(
                    len >= mirror_proto::REP_MOVSB_MIN
                        && mirror_proto::rep_movsb_is_slow(src.as_ptr(), dst),
                );
                m.write_raw_as(off, src, false);
                want[off..off + len].copy_from_slice(src);
                let mut got = vec![0u8; LEN];
                m.read_raw(0, &mut got);
                assert!(got == want, "write of {len} bytes {apart} past its source");
                // And back out, to a buffer at the same distance.
                let mut out = vec![0u8; len + 4096];
                let out_at = (out.as_ptr().align_offset(4096) + off % 4096 + apart) % 4096;
                m.read_raw(off, &mut out[out_at..out_at + len]);
                assert!(out[out_at..out_at + len] == *src, "read of {len}, {apart}");
            }
        }
        assert!(
            taken_slowly >= 3 * 63,
            "the vector path ran {taken_slowly} times"
        );
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_bounds_access_is_a_panic_not_ub() {
        let (_dir, m) = mapped(4096);
        let mut out = [0u8; 8];
        m.read_raw(4090, &mut out);
    }
}
