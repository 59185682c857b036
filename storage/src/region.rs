//! The mirrored memory region: a file of exactly `size` bytes, mapped shared.
//!
//! The file holds nothing but the region's bytes, so two regions can be compared with any tool
//! (`cmp`, or [`file_chunk_checksums`]). See "Region file" in `docs/FORMAT.md`.
//!
//! # Concurrency
//!
//! One writer, the [`RegionWriter`] (the engine's poller holds it), writes; any number of
//! threads may call [`Region::read`], [`Region::sync`], [`Region::chunk_checksums`] or read
//! through [`Region::as_ptr`] at the same time. Bytes are copied with raw pointer copies, never
//! through references (except by the writer itself, [`RegionWriter::with_bytes`]: nothing else
//! writes meanwhile), and have shared-memory semantics: a read racing a write to the same bytes
//! may return a mix of old and new bytes. The engine orders reads after writes through its own
//! completion watermark (Release store after the write, Acquire load before the read).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::map::{self, Mapping};
use crate::{Durability, StorageError};

/// Bound on the dirty ranges remembered for a Pmem sync; when exceeded, the remembered ranges
/// are written back early (without a fence) and forgotten, so memory stays bounded and nothing
/// is flushed twice.
const PENDING_RANGES_MAX: usize = 64;

/// Pieces per `pwritev` of [`RegionWriter::write_gathered`]: Linux's `IOV_MAX`.
pub const GATHER_MAX_PIECES: usize = 1024;

/// `power`: bytes written into the region after which the writer starts their write-back
/// ([`map::start_write_back`]) instead of leaving them dirty in the page cache until the next
/// checkpoint's `fdatasync`. Left to the checkpoint, that sync wrote everything since the last
/// one back at once, 10-20 ms on the development VM with the node's loop stopped meanwhile
/// (docs/PERFORMANCE.md, "`power`"). Small enough to start write-back after each batch of a
/// pipelined stream; large enough that a synchronous writer does not start one per write.
pub(crate) const WRITE_BEHIND_BYTES: u64 = 64 << 10;

/// The mirrored memory region. `Send + Sync`; see the module docs for the single-writer rule.
pub struct Region {
    path: PathBuf,
    /// Holds the exclusive flock; used for fdatasync.
    file: File,
    map: Mapping,
    len: u64,
    durability: Durability,
    /// This open created the file (zero-filled).
    created: bool,
    /// A [`RegionWriter`] exists.
    writer_taken: AtomicBool,
    /// Power: something was written since the last sync.
    dirty: AtomicBool,
    /// Pmem: byte ranges written since the last sync.
    pending: Mutex<Vec<(usize, usize)>>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("durability", &self.durability)
            .finish()
    }
}

/// The region's single writer ([`Region::writer`]): writes go through it (`&mut self`), so
/// while it lends bytes in place ([`RegionWriter::with_bytes`], `&self`) nothing writes them.
#[derive(Debug)]
pub struct RegionWriter {
    region: Arc<Region>,
    /// `power`: bytes written since write-back was last started ([`WRITE_BEHIND_BYTES`]).
    written_behind: u64,
}

impl RegionWriter {
    /// Writes `data` at `offset` (bounds-checked without overflow) and remembers the range for
    /// the next sync; readers on other threads are fine (see the module docs).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.region.write(offset, data)?;
        self.wrote(data.len() as u64)
    }

    /// Counts `power` bytes written and starts their write-back every [`WRITE_BEHIND_BYTES`].
    /// Durability still comes from [`Region::sync`] alone: this only spreads its work.
    fn wrote(&mut self, bytes: u64) -> Result<(), StorageError> {
        if self.region.durability != Durability::Power {
            return Ok(());
        }
        self.written_behind += bytes;
        if self.written_behind >= WRITE_BEHIND_BYTES {
            self.written_behind = 0;
            map::start_write_back(&self.region.file, &self.region.path)?;
        }
        Ok(())
    }

    /// Writes `writes` in order (a later one wins where two overlap). Under `power` each run
    /// of neighbours (one's end the next one's offset) is one `pwritev` (up to
    /// [`GATHER_MAX_PIECES`] pieces), not one system call each: a batch of sequential writes,
    /// such as a log's appends, costs one. Other modes copy each into the mapping.
    pub fn write_gathered(&mut self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        if self.region.durability != Durability::Power {
            for &(offset, data) in writes {
                self.region.write(offset, data)?;
            }
            return Ok(());
        }
        let mut rest = writes;
        while let Some(&(first, _)) = rest.first() {
            let mut end = first;
            let mut n = 0;
            while n < rest.len().min(GATHER_MAX_PIECES) && rest[n].0 == end {
                self.region.check(rest[n].0, rest[n].1.len())?;
                end += rest[n].1.len() as u64;
                n += 1;
            }
            let pieces: Vec<&[u8]> = rest[..n].iter().map(|&(_, data)| data).collect();
            map::write_file_at(&self.region.file, first, &pieces, &self.region.path)?;
            rest = &rest[n..];
            // Release: as in `Region::write`.
            self.region.dirty.store(true, Ordering::Release);
            self.wrote(end - first)?;
        }
        Ok(())
    }

    /// Whether [`write_gathered`](Self::write_gathered) saves system calls over writing one
    /// by one (under `power`).
    pub fn gathers_writes(&self) -> bool {
        self.region.durability == Durability::Power
    }

    /// Calls `f` with the `len` bytes at `offset` in place, without copying them (a resync
    /// hashes gigabytes of chunks: a copy each cost more than the hash).
    pub fn with_bytes<T>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, StorageError> {
        let off = self.region.check(offset, len)?;
        // `Mapping::bytes` asks that nothing writes these bytes while the borrow lives: writes
        // in this process go through this handle (there is one), with `&mut self`, which the
        // `&self` here excludes. Another process writing the file is outside the contract, as
        // for any mapped store.
        Ok(f(self.region.map.bytes(off, len)))
    }
}

impl std::ops::Deref for RegionWriter {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.region
    }
}

impl Drop for RegionWriter {
    fn drop(&mut self) {
        // Release: the next writer (Acquire in `Region::writer`) sees what this one wrote.
        self.region.writer_taken.store(false, Ordering::Release);
    }
}

/// Creates the region file under a temporary name (zero-filled, preallocated, durable per
/// mode) and links it into place. Returns the open file; if someone else created `path`
/// meanwhile, opens theirs instead.
fn create_file(path: &Path, size: u64, durability: Durability) -> Result<File, StorageError> {
    let tmp = crate::map::tmp_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StorageError::io(&tmp, "create", e))?;
    let linked = (|| {
        map::allocate(&file, size, &tmp)?;
        if durability == Durability::Pmem {
            // Refuse a non-DAX file before the name appears at `path`.
            let len = usize::try_from(size).map_err(|_| StorageError::InvalidArgument {
                why: format!("region size {size} does not fit this platform's address space"),
            })?;
            drop(Mapping::map_rw(&file, len, durability, path)?);
        }
        if durability != Durability::Process {
            file.sync_all()
                .map_err(|e| StorageError::io(&tmp, "fsync", e))?;
        }
        std::fs::hard_link(&tmp, path).map_err(|e| StorageError::io(path, "link", e))
    })();
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if durability != Durability::Process {
                map::sync_parent_dir(path)?;
            }
            Ok(file)
        }
        Err(StorageError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            open_existing(path)
        }
        Err(e) => Err(e),
    }
}

fn open_existing(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io(path, "open", e))
}

impl Region {
    /// Opens the region file at `path`, or creates it zero-filled with exactly `size` bytes.
    /// An existing file of another size is refused with
    /// [`StorageError::RegionSizeMismatch`]; `size` 0 is refused. Takes an exclusive `flock`
    /// ([`StorageError::Locked`] if another handle has the region open).
    pub fn open_or_create(
        path: &Path,
        size: u64,
        durability: Durability,
    ) -> Result<Self, StorageError> {
        if size == 0 {
            return Err(StorageError::InvalidArgument {
                why: "region size must be greater than 0".into(),
            });
        }
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| StorageError::InvalidArgument {
                why: format!("region size {size} does not fit this platform's address space"),
            })?;
        map::check_platform(durability)?;
        let (file, created) = match open_existing(path) {
            Ok(f) => (f, false),
            Err(e) if e.is_not_found() => (create_file(path, size, durability)?, true),
            Err(e) => return Err(e),
        };
        map::lock_exclusive(&file, path)?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io(path, "stat", e))?
            .len();
        if file_len != size {
            return Err(StorageError::RegionSizeMismatch {
                path: path.to_path_buf(),
                file: file_len,
                expected: size,
            });
        }
        let map = Mapping::map_rw(&file, len, durability, path)?;
        Ok(Region {
            path: path.to_path_buf(),
            file,
            map,
            len: size,
            durability,
            created,
            writer_taken: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            pending: Mutex::new(Vec::with_capacity(PENDING_RANGES_MAX)),
        })
    }

    /// Whether this open created the file (zero-filled): the region was blank then.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Path of the region file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durability mode.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty regions are refused at open.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, StorageError> {
        let len64 = len as u64;
        match offset.checked_add(len64) {
            Some(end) if end <= self.len => Ok(offset as usize),
            _ => Err(StorageError::OutOfRange {
                offset,
                len: len64,
                size: self.len,
            }),
        }
    }

    /// The region's writer, if no other handle holds it: while it lives, it alone writes.
    pub fn writer(self: &Arc<Self>) -> Result<RegionWriter, StorageError> {
        // Acquire: pairs with the Release of a writer dropped on another thread.
        if self
            .writer_taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(StorageError::InvalidArgument {
                why: format!(
                    "region {} already has a writer (one handle writes at a time)",
                    self.path.display()
                ),
            });
        }
        Ok(RegionWriter {
            region: Arc::clone(self),
            written_behind: 0,
        })
    }

    /// Writes `data` at `offset` (bounds-checked without overflow) and remembers the range for
    /// the next [`sync`](Self::sync). Only the [`RegionWriter`] calls this.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let off = self.check(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if self.durability == Durability::Power {
            // Through the page cache, not the mapping: see `map::write_file_at`.
            map::write_file_at(&self.file, off as u64, &[data], &self.path)?;
        } else {
            self.map.write_raw(off, data);
        }
        match self.durability {
            Durability::Process => {}
            // Release: pairs with the AcqRel swap in `sync`, so a sync on another thread that
            // sees the flag also sees these bytes before it calls fdatasync.
            Durability::Power => self.dirty.store(true, Ordering::Release),
            Durability::Pmem => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(last) = pending.last_mut() {
                    if last.0 + last.1 == off {
                        last.1 += data.len();
                        return Ok(());
                    }
                }
                if pending.len() == PENDING_RANGES_MAX {
                    // Write back early (the fence in `sync` still orders them) and forget.
                    for &(o, l) in pending.iter() {
                        self.map.flush_lines(o, l);
                    }
                    pending.clear();
                }
                pending.push((off, data.len()));
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` (bounds-checked without overflow).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let off = self.check(offset, buf.len())?;
        self.map.read_raw(off, buf);
        Ok(())
    }

    /// Start of the mapped region, for zero-copy reads (valid while `self` lives; read-only:
    /// writes must go through [`write`](Self::write) so they are tracked for `sync`).
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Makes every byte written before this call durable per mode:
    /// - Process: nothing to do;
    /// - Power: `fdatasync` of the region file (skipped if nothing was written);
    /// - Pmem: write back each cache line written since the last sync, then `sfence`.
    pub fn sync(&self) -> Result<(), StorageError> {
        match self.durability {
            Durability::Process => Ok(()),
            Durability::Power => {
                // AcqRel: Acquire pairs with the Release in `write` (see there); Release keeps
                // a concurrent writer's later `true` from being lost behind our `false`.
                if self.dirty.swap(false, Ordering::AcqRel) {
                    if let Err(e) = self.file.sync_data() {
                        // Not durable: the next sync must retry.
                        self.dirty.store(true, Ordering::Release);
                        return Err(StorageError::io(&self.path, "fdatasync", e));
                    }
                }
                Ok(())
            }
            Durability::Pmem => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for &(o, l) in pending.iter() {
                    self.map.flush_lines(o, l);
                }
                pending.clear();
                drop(pending);
                map::fence();
                Ok(())
            }
        }
    }

    /// crc32c of each `chunk_size`-byte chunk of the region (the last chunk may be short),
    /// for `mirror verify`. Equal to [`file_chunk_checksums`] of the same bytes.
    ///
    /// # Panics
    /// If `chunk_size` is 0 (like [`slice::chunks`]).
    pub fn chunk_checksums(&self, chunk_size: u64) -> Vec<u32> {
        assert!(chunk_size > 0, "chunk_size must be greater than 0");
        let mut scratch = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(self.len.div_ceil(chunk_size).min(1 << 20) as usize);
        let mut off = 0u64;
        while off < self.len {
            let n = chunk_size.min(self.len - off);
            out.push(self.map.crc_raw(0, off as usize, n as usize, &mut scratch));
            off += n;
        }
        out
    }
}

/// crc32c of each `chunk_size`-byte chunk of the file at `path` (the last chunk may be short):
/// the same values as [`Region::chunk_checksums`] for a region file. Reads the file with plain
/// reads (no mapping, no lock, never writes).
pub fn file_chunk_checksums(path: &Path, chunk_size: u64) -> Result<Vec<u32>, StorageError> {
    if chunk_size == 0 {
        return Err(StorageError::InvalidArgument {
            why: "chunk_size must be greater than 0".into(),
        });
    }
    let mut file = File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    let mut crc = 0u32;
    let mut in_chunk = 0u64;
    loop {
        let want = (chunk_size - in_chunk).min(buf.len() as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StorageError::io(path, "read", e)),
        };
        if n == 0 {
            break;
        }
        crc = mirror_proto::crc::crc32c_append(crc, &buf[..n]);
        in_chunk += n as u64;
        if in_chunk == chunk_size {
            out.push(crc);
            crc = 0;
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        out.push(crc);
    }
    Ok(out)
}
