//! The persistent queue: a ring of write-request records in an mmapped file.
//!
//! The byte layout and the crash-safety argument are in `docs/FORMAT.md` ("Queue file (format
//! version 2)"); this module implements them. In short:
//!
//! - the static header block (identity, sizes) is written once and crc-protected;
//! - peer id, `applied_through`, the recovery epoch, the role, the current term and the term
//!   history live in two crc-protected metadata slots written alternately, each write made
//!   durable before the next may start;
//! - the ring cursors are single u64 words. `scan_start` and `trimmed_through` are trusted by
//!   recovery but are safe at any value they ever held; `head`, `tail` and `next_seq` are hints
//!   for observers and are never trusted;
//! - every DATA record carries the term that assigned its seq; a record that starts a new term is
//!   written only after the history entry naming it is durable;
//! - recovery scans from `scan_start`, verifying every record (magic, position, length, crc,
//!   epoch, seq continuity, term against the history), and cuts the log at the first record
//!   that fails.
//!
//! Concurrency: one mutator (`&mut self`). Other threads or processes may read the header
//! words with Acquire loads; see [`inspect_queue`].
//!
//! This file holds what every part shares: the [`PersistentQueue`] struct and its crash hook,
//! reading the header (static block, metadata slots), creating and opening the file, and the
//! plain accessors. Each other job has its own file, so that its rules can be read in one place:
//!
//! - `recovery.rs`: the scan that verifies the log, what it concludes, what `open` does to
//!   recover, and [`PersistentQueue::replay_state`];
//! - `live.rs`: the operations of an open queue (append, trim, reset, truncate, the metadata
//!   setters) and reading records back ([`Records`]);
//! - `barriers.rs`: what becomes durable when (sync, barriers, metadata slot writes, the
//!   advancement of `scan_start`);
//! - `room.rs`: whether and where a record fits in the ring (the one rule behind `append`, the
//!   primary's admission and the backup's check);
//! - `run.rs`: runs of appends, whose records reach a `power` queue's file in one write;
//! - `inspect.rs`: the read-only view of a queue file for `mirror status`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use mirror_proto::TermHistory;

use crate::format::{
    self, max_payload, Limits, Meta, StaticError, StaticHeader, HEADER_BYTES, META_SLOT_BYTES,
    META_SLOT_OFF, OFF_HEAD, OFF_NEXT_SEQ, OFF_TAIL, STATIC_BYTES,
};
use crate::map::{self, Mapping};
use crate::{Durability, Role, StorageError};

mod barriers;
mod inspect;
mod live;
mod recovery;
mod room;
mod run;

pub use inspect::{inspect_queue, QueueInfo};
pub use live::{RecordRef, Records};
pub use recovery::{OwnedRecord, RecoveryReport, ReplayState};
pub use run::{RUN_BUFFER_MAX, RUN_RECORD_MAX};

const DATA_OFF: usize = HEADER_BYTES as usize;

/// How far past the tail an idle node warms the ring at least ([`PersistentQueue::warm_ahead`]):
/// the next records of a synchronous writer of up to 4 KiB a write, 256 prefetched lines.
pub const WARM_AHEAD_MIN: u64 = 16 << 10;
/// How far at most: as far as the last record reached, up to this (an eighth of a core's 1 MiB
/// L2 here); a larger record streams past the cache as before.
pub const WARM_AHEAD_MAX: u64 = 128 << 10;

/// Parameters fixed when a queue file is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueParams {
    /// This node's id (non-zero; 0 means "unbound" in `peer_node_id`).
    pub node_id: u64,
    /// This node's role at creation; kept in the metadata (it changes at a failover, see
    /// [`PersistentQueue::set_role`]) and checked by `open_or_create`.
    pub role: Role,
    /// Size of the mirrored region in bytes; records must address bytes below it.
    pub region_size: u64,
    /// Size of the ring (data area) in bytes: a multiple of 4096, at least 4096.
    pub capacity_bytes: u64,
}

/// The persistent queue. See the module docs and `docs/FORMAT.md`.
pub struct PersistentQueue {
    path: PathBuf,
    /// Holds the exclusive flock; used for fdatasync.
    file: File,
    pub(crate) map: Mapping,
    durability: Durability,
    stat: StaticHeader,
    limits: Limits,
    /// Current metadata and the slot (0 = A, 1 = B) it is stored in. `meta.history` is the
    /// durable history (an entry is persisted before its first record) without the entries
    /// below the durable trim point, which every barrier forgets in memory.
    meta: Meta,
    meta_slot: usize,
    /// The current slot was written since the last barrier (which must then flush it).
    meta_dirty: bool,
    /// Virtual position of the first live DATA record, or `tail` when empty.
    head: u64,
    /// Virtual position where the next record goes.
    pub(crate) tail: u64,
    next_seq: u64,
    len_records: u64,
    trimmed_through: u64,
    /// `trimmed_through` as of the last barrier (0 at open, before the first one): the media
    /// hold it or a later value. Histories are pruned only below it, so that whatever slot and
    /// trim point a crash leaves, the history covers every record recovery keeps live.
    trimmed_through_durable: u64,
    /// See [`PersistentQueue::set_history_floor`] (0: none).
    history_floor: u64,
    /// Value of the `scan_start` word in memory, and the value known durable (after the last
    /// barrier). Durable media hold a value in `scan_start_durable..=scan_start`.
    scan_start: u64,
    scan_start_durable: u64,
    /// Position of the last record written or recovered (any kind): the anchor that keeps
    /// `next_seq` recoverable while the queue is empty.
    last_rec_pos: Option<u64>,
    /// Everything below this virtual position was covered by the last barrier.
    flushed_upto: u64,
    /// The ring's lines below this virtual position were prefetched
    /// ([`PersistentQueue::warm_ahead`]); a record below it is copied, not streamed.
    warmed_to: u64,
    /// Ring bytes the last record took (its header and padding included): how far
    /// [`PersistentQueue::warm_ahead`] looks ahead.
    last_record_bytes: u64,
    /// A header word changed since the last barrier.
    header_dirty: bool,
    /// `power`: an append moved the cursor hints (head, tail, next_seq) and they are not stored
    /// yet. Storing them on every append would put the header page into every fdatasync, a
    /// second page write per sync (+200 to 400 µs on a 400 to 1000 µs sync in the lab's emulated
    /// machine, docs/LAB.md). They are hints (recovery and observers scan the records), so they
    /// follow with the next barrier that writes the header page anyway, and at drop.
    cursors_pending: bool,
    /// The open run of appends and the records it holds (`run.rs`).
    run: run::AppendRun,
    /// Crash hook: told about every barrier (with the file ranges it makes durable) and about
    /// every point where a trusted word or a record has just been stored.
    #[cfg(any(test, feature = "crash-hooks"))]
    pub(crate) test_hook: Option<CrashHook>,
}

/// The crash hook's type (see [`PersistentQueue::open_with_crash_hook`]).
#[cfg(any(test, feature = "crash-hooks"))]
pub type CrashHook = Box<dyn FnMut(CrashEvent<'_>) + Send>;

/// What the crash hook is told.
#[cfg(any(test, feature = "crash-hooks"))]
#[derive(Debug)]
pub enum CrashEvent<'a> {
    /// Something was stored into the mapping; nothing new is durable.
    Stored,
    /// A barrier completed; these file ranges (offset, length) are durable. This is exactly what
    /// a `pmem` barrier writes back; a `power` barrier (fdatasync) covers more, so a simulator
    /// that trusts only these ranges is the stricter model.
    Barrier(&'a [(usize, usize)]),
}

impl Drop for PersistentQueue {
    /// The cursor hints an append left pending (`power`) reach the page cache, so that a
    /// queue closed cleanly reads exactly (`mirror status`); a crash leaves them behind, which
    /// recovery and inspection tolerate (they scan the records).
    fn drop(&mut self) {
        // An open run's records are not written: a queue dropped inside a run (a node that
        // stopped on an error in the middle of a batch) loses them as a crash there would,
        // and nothing relied on them (see `run.rs`).
        if self.cursors_pending {
            self.publish_cursors();
        }
    }
}

impl fmt::Debug for PersistentQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistentQueue")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("node_id", &self.stat.node_id)
            .field("role", &self.meta.role)
            .field("capacity_bytes", &self.stat.capacity)
            .field("head", &self.head)
            .field("tail", &self.tail)
            .field("next_seq", &self.next_seq)
            .field("len_records", &self.len_records)
            .field("epoch", &self.meta.epoch)
            .field("current_term", &self.meta.current_term)
            .finish()
    }
}

fn static_error(path: &Path, e: StaticError) -> StorageError {
    let path = path.to_path_buf();
    match e {
        StaticError::BadMagic(found) => StorageError::BadMagic { path, found },
        StaticError::Version(found) => StorageError::UnsupportedVersion {
            path,
            found,
            supported: format::FORMAT_VERSION,
        },
        StaticError::Checksum { stored, computed } => StorageError::HeaderChecksum {
            path,
            stored,
            computed,
        },
        StaticError::Field(why) => StorageError::CorruptHeader { path, why },
    }
}

/// Reads and validates the static block with pread (never through a mapping), and checks the
/// file length against it.
fn read_static(file: &File, path: &Path) -> Result<StaticHeader, StorageError> {
    let file_len = file
        .metadata()
        .map_err(|e| StorageError::io(path, "stat", e))?
        .len();
    let mut b = [0u8; STATIC_BYTES];
    let avail = file_len.min(STATIC_BYTES as u64) as usize;
    file.read_exact_at(&mut b[..avail], 0)
        .map_err(|e| StorageError::io(path, "read header", e))?;
    if avail < STATIC_BYTES {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[..8]);
        if found != format::QUEUE_MAGIC {
            return Err(StorageError::BadMagic {
                path: path.to_path_buf(),
                found,
            });
        }
        return Err(StorageError::CorruptHeader {
            path: path.to_path_buf(),
            why: format!("file is only {file_len} bytes, shorter than the header"),
        });
    }
    let stat = StaticHeader::decode(&b).map_err(|e| static_error(path, e))?;
    let expected = HEADER_BYTES + stat.capacity;
    if file_len != expected {
        return Err(StorageError::CorruptHeader {
            path: path.to_path_buf(),
            why: format!(
                "file is {file_len} bytes, but a capacity of {} bytes needs exactly {expected}",
                stat.capacity
            ),
        });
    }
    Ok(stat)
}

fn limits_of(stat: &StaticHeader) -> Limits {
    Limits {
        capacity: stat.capacity,
        max_payload: max_payload(stat.capacity),
        region_size: stat.region_size,
    }
}

/// Copies one metadata slot out of the mapping with Acquire loads of its words.
fn load_slot(map: &Mapping, base: usize) -> [u8; META_SLOT_BYTES] {
    let mut b = [0u8; META_SLOT_BYTES];
    for (i, chunk) in b.chunks_exact_mut(8).enumerate() {
        // Acquire: pairs with the Release stores in `write_meta`; the crc, not the ordering,
        // is what rejects a half-written slot.
        let w = map.word(base + i * 8).load(Ordering::Acquire);
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Reads both metadata slots and picks the valid one with the larger generation, then checks
/// its fields. A slot being rewritten concurrently (live queue) fails its crc and is skipped;
/// both failing is [`StorageError::MetaChecksum`], a valid slot with an invalid field
/// [`StorageError::CorruptMeta`].
fn read_meta(map: &Mapping, path: &Path) -> Result<(Meta, usize), StorageError> {
    let mut best: Option<(u64, usize, [u8; META_SLOT_BYTES])> = None;
    for (i, &base) in META_SLOT_OFF.iter().enumerate() {
        let b = load_slot(map, base);
        if let Some(generation) = Meta::valid_generation(&b) {
            if best.is_none_or(|(g, _, _)| generation > g) {
                best = Some((generation, i, b));
            }
        }
    }
    let (_, slot, b) = best.ok_or_else(|| StorageError::MetaChecksum {
        path: path.to_path_buf(),
    })?;
    let meta = Meta::decode(&b).map_err(|e| StorageError::CorruptMeta {
        path: path.to_path_buf(),
        field: e.field,
        why: e.why,
    })?;
    Ok((meta, slot))
}

impl PersistentQueue {
    /// Creates a new queue file at `path` (fails with [`StorageError::AlreadyExists`] if
    /// anything exists there) and opens it.
    ///
    /// The file is built under a temporary name, made durable (Power/Pmem), then linked into
    /// place, so a crash never leaves a half-written queue at `path`.
    pub fn create(
        path: &Path,
        params: &QueueParams,
        durability: Durability,
    ) -> Result<Self, StorageError> {
        Self::create_with_report(path, params, durability).map(|(q, _)| q)
    }

    fn create_with_report(
        path: &Path,
        params: &QueueParams,
        durability: Durability,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        map::check_platform(durability)?;
        if params.node_id == 0 {
            return Err(StorageError::InvalidArgument {
                why: "node_id 0 is reserved (it means \"no peer bound\")".into(),
            });
        }
        if params.region_size == 0 {
            return Err(StorageError::InvalidArgument {
                why: "region_size must be greater than 0".into(),
            });
        }
        format::check_capacity(params.capacity_bytes)
            .map_err(|why| StorageError::InvalidArgument { why })?;
        if path.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        let stat = StaticHeader {
            node_id: params.node_id,
            region_size: params.region_size,
            capacity: params.capacity_bytes,
        };
        let tmp = crate::map::tmp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StorageError::io(&tmp, "create", e))?;
        let built = Self::build_new_file(&file, &tmp, path, &stat, params.role, durability);
        // The temporary name goes away whether or not the link happened.
        let _ = std::fs::remove_file(&tmp);
        built?;
        if durability != Durability::Process {
            map::sync_parent_dir(path)?;
        }
        Self::open_locked(path, file, durability, None, |_| {})
    }

    fn build_new_file(
        file: &File,
        tmp: &Path,
        path: &Path,
        stat: &StaticHeader,
        role: Role,
        durability: Durability,
    ) -> Result<(), StorageError> {
        map::lock_exclusive(file, tmp)?;
        let len = HEADER_BYTES + stat.capacity;
        map::allocate(file, len, tmp)?;
        if durability == Durability::Power {
            // Every append is followed by an fdatasync: blocks must not need converting then.
            map::write_zeros(file, HEADER_BYTES, stat.capacity, tmp)?;
        }
        let mut page = vec![0u8; HEADER_BYTES as usize];
        page[..STATIC_BYTES].copy_from_slice(&stat.encode());
        // Slot A, generation 1: no peer, nothing applied, epoch 0, term 0, empty history (slot
        // B stays zero: invalid).
        let meta = Meta {
            generation: 1,
            peer_node_id: 0,
            applied_through: 0,
            epoch: 0,
            current_term: 0,
            role,
            superseded: false,
            alone_from: 0,
            history: TermHistory::new(),
        };
        let a = META_SLOT_OFF[0];
        page[a..a + META_SLOT_BYTES].copy_from_slice(&meta.encode());
        // scan_start = trimmed_through = head = tail = 0 (already zero); next_seq hint = 1.
        page[OFF_NEXT_SEQ..OFF_NEXT_SEQ + 8].copy_from_slice(&1u64.to_le_bytes());
        file.write_all_at(&page, 0)
            .map_err(|e| StorageError::io(tmp, "write header", e))?;
        if durability == Durability::Pmem {
            // Refuse a non-DAX file before the name appears at `path`.
            drop(Mapping::map_rw(file, len as usize, durability, path)?);
        }
        if durability != Durability::Process {
            file.sync_all()
                .map_err(|e| StorageError::io(tmp, "fsync", e))?;
        }
        std::fs::hard_link(tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StorageError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                StorageError::io(path, "link", e)
            }
        })
    }

    /// Opens an existing queue: validates the header (magic, version, header crc, sizes),
    /// takes an exclusive lock, scans and verifies the log from `scan_start`, cuts a torn
    /// tail, and durably starts a new recovery epoch.
    pub fn open(
        path: &Path,
        durability: Durability,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        Self::open_checked(path, durability, None)
    }

    /// Opens the queue at `path` if it exists, after checking that its region size matches
    /// `params` ([`StorageError::RegionSizeMismatch`], checked before anything is written);
    /// otherwise creates it with `params.role`. The role of an existing file is not checked:
    /// it is state (a failover changes it), and the node decides what its configured role
    /// means against it ([`role`](Self::role), [`superseded`](Self::superseded)). For an existing file, its
    /// `node_id` and `capacity_bytes` win over `params` (compare [`node_id`](Self::node_id) if
    /// that matters to you).
    pub fn open_or_create(
        path: &Path,
        params: &QueueParams,
        durability: Durability,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        match Self::open_checked(path, durability, Some(params)) {
            Err(e) if e.is_not_found() => {
                match Self::create_with_report(path, params, durability) {
                    // Lost a creation race: the other creator's file is there now.
                    Err(StorageError::AlreadyExists { .. }) => {
                        Self::open_checked(path, durability, Some(params))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    fn open_checked(
        path: &Path,
        durability: Durability,
        expect: Option<&QueueParams>,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        let file = Self::open_file_locked(path, durability)?;
        Self::open_locked(path, file, durability, expect, |_| {})
    }

    /// The checks of [`open_or_create`](Self::open_or_create) on an existing queue, before
    /// anything is written: the region size.
    fn check_expected(
        path: &Path,
        stat: &StaticHeader,
        params: &QueueParams,
    ) -> Result<(), StorageError> {
        if stat.region_size != params.region_size {
            return Err(StorageError::RegionSizeMismatch {
                path: path.to_path_buf(),
                file: stat.region_size,
                expected: params.region_size,
            });
        }
        Ok(())
    }

    /// [`open`](Self::open) with the crash hook installed from the start, so that it also sees
    /// the barrier of recovery itself, which makes every record recovery scanned durable (after
    /// a process crash they may have been only in the page cache). A simulator that keeps
    /// durable bytes across a process crash needs this to know what became durable at restart.
    #[cfg(feature = "crash-hooks")]
    pub fn open_with_crash_hook(
        path: &Path,
        durability: Durability,
        hook: CrashHook,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        let file = Self::open_file_locked(path, durability)?;
        Self::open_locked(path, file, durability, None, |q| q.test_hook = Some(hook))
    }

    /// Opens an existing queue file read-write and takes its exclusive lock.
    fn open_file_locked(path: &Path, durability: Durability) -> Result<File, StorageError> {
        map::check_platform(durability)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io(path, "open", e))?;
        map::lock_exclusive(&file, path)?;
        Ok(file)
    }

    /// Path of the queue file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durability mode this handle was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// This node's id (from the header).
    pub fn node_id(&self) -> u64 {
        self.stat.node_id
    }

    /// This node's role (from the metadata).
    pub fn role(&self) -> Role {
        self.meta.role
    }

    /// Whether this node was superseded as a primary (fenced) and not promoted since (see
    /// [`PersistentQueue::set_role`]): it must not take writes as a primary.
    pub fn superseded(&self) -> bool {
        self.meta.superseded
    }

    /// The first seq this node completed as a primary without its peer, that the peer has not
    /// confirmed holding since (0: none): records from there on may exist here only (see
    /// [`PersistentQueue::set_alone_from`]). Never above the last seq.
    pub fn alone_from(&self) -> u64 {
        if self.meta.alone_from > self.last_seq() {
            // Those records did not survive (an unsynced tail): none of them completed.
            0
        } else {
            self.meta.alone_from
        }
    }

    /// The highest term this node has seen (durable): never below the last term of
    /// [`term_history`](Self::term_history).
    pub fn current_term(&self) -> u64 {
        self.meta.current_term
    }

    /// The terms along the log: no entry starts after [`last_seq`](Self::last_seq), and the
    /// entries below the (durable) trim point are forgotten (the one covering it stays).
    pub fn term_history(&self) -> &TermHistory {
        &self.meta.history
    }

    /// Region size the queue was created for.
    pub fn region_size(&self) -> u64 {
        self.stat.region_size
    }

    /// Ring capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.stat.capacity
    }

    /// Recovery epoch of this open.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// Bound peer node id; 0 = not yet bound.
    pub fn peer_node_id(&self) -> u64 {
        self.meta.peer_node_id
    }

    /// Highest seq whose write is durably in this node's region (maintained by the engine).
    pub fn applied_through(&self) -> u64 {
        self.meta.applied_through
    }

    /// Seq the next append must carry. Starts at 1; never decreases, also when trims empty
    /// the queue (and across reopen, for everything made durable).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seq of the oldest live record, `None` if the queue is empty.
    pub fn first_seq(&self) -> Option<u64> {
        (self.len_records > 0).then(|| self.next_seq - self.len_records)
    }

    /// `next_seq() - 1`: 0 if nothing was ever appended.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Largest payload one record can carry in this queue: a quarter of the capacity minus the
    /// 56-byte record header, capped at 1 GiB - 56.
    pub fn max_payload(&self) -> usize {
        self.limits.max_payload as usize
    }

    /// Live (untrimmed) records.
    pub fn len_records(&self) -> u64 {
        self.len_records
    }

    /// Ring bytes between head and tail (records, their headers and padding, wrap pads).
    pub fn used_bytes(&self) -> u64 {
        self.tail - self.head
    }

    /// The epoch after the current one.
    fn next_epoch(&self) -> Result<u64, StorageError> {
        self.meta
            .epoch
            .checked_add(1)
            .ok_or_else(|| StorageError::CorruptHeader {
                path: self.path.clone(),
                why: "recovery epoch exhausted".into(),
            })
    }

    // ---- internals ----

    fn cap(&self) -> u64 {
        self.stat.capacity
    }

    /// An append moved the cursors: stored at once, or under `power` with the next barrier
    /// that writes the header page (see `cursors_pending`).
    fn cursors_moved(&mut self) {
        if self.durability == Durability::Power {
            self.cursors_pending = true;
        } else {
            self.publish_cursors();
        }
    }

    /// Stores head, tail and next_seq for observers. Release: a reader that Acquire-loads
    /// `tail` or `next_seq` sees the bytes of every record below that tail (they were written
    /// before these stores).
    fn publish_cursors(&mut self) {
        self.cursors_pending = false;
        self.map.word(OFF_HEAD).store(self.head, Ordering::Release);
        self.map.word(OFF_TAIL).store(self.tail, Ordering::Release);
        self.map
            .word(OFF_NEXT_SEQ)
            .store(self.next_seq, Ordering::Release);
    }
}
