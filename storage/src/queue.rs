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

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use mirror_proto::TermHistory;

use crate::format::{
    self, check_header, header_crc_start, max_payload, max_record_bytes, record_total, seal,
    stored_crc, Kind, Limits, Meta, RecHeader, StaticError, StaticHeader, CURSOR_LINE, HDR,
    HEADER_BYTES, META_SLOT_BYTES, META_SLOT_OFF, OFF_HEAD, OFF_NEXT_SEQ, OFF_SCAN_START, OFF_TAIL,
    OFF_TRIMMED_THROUGH, RECORD_HEADER_BYTES, STATIC_BYTES,
};
use crate::map::{self, Mapping};
use crate::{CutReason, Durability, Role, StorageError};

const DATA_OFF: usize = HEADER_BYTES as usize;

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

/// A record borrowed from the queue's mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Term of the primary that assigned `seq` (never 0).
    pub term: u64,
    /// Region offset the payload is to be written at.
    pub offset: u64,
    /// The bytes to write.
    pub payload: &'a [u8],
}

/// What recovery found when a queue was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Live records kept (not yet trimmed).
    pub records: u64,
    /// Ring bytes they occupy (`used_bytes()` after open).
    pub bytes: u64,
    /// Bytes between the end of the verified log and the tail recorded in the header: a torn
    /// append, or records lost behind a damaged one. 0 when the log ends where the header says.
    pub torn_tail_cut_bytes: u64,
    /// Seq of the oldest live record.
    pub first_seq: Option<u64>,
    /// `next_seq - 1` after recovery.
    pub last_seq: u64,
    /// Seq the next append must carry.
    pub next_seq: u64,
    /// Why the scan stopped short of the header's tail (None when nothing was cut).
    pub cut_reason: Option<CutReason>,
    /// Recovery epoch of this open (incremented, durably, by every read-write open).
    pub epoch: u64,
    /// Whether recovery appended a RESET record because the durable `trimmed_through` was
    /// ahead of the last surviving record (see FORMAT.md, "Recovery").
    pub reset_marker_written: bool,
}

/// A record copied out of the queue (see [`ReplayState`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRecord {
    /// Sequence number.
    pub seq: u64,
    /// Term of the primary that assigned `seq` (never 0).
    pub term: u64,
    /// Region offset.
    pub offset: u64,
    /// The bytes to write.
    pub payload: Vec<u8>,
}

/// What a restarting node takes from its queue (see [`PersistentQueue::replay_state`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayState {
    /// The peer this queue is bound to (0: none yet).
    pub peer_node_id: u64,
    /// Highest seq durably applied to the region.
    pub applied_through: u64,
    /// Oldest live record.
    pub first_seq: Option<u64>,
    /// Newest record (or the seq numbering continues after).
    pub last_seq: u64,
    /// The records after `applied_through`, in order: to apply again.
    pub unapplied: Vec<OwnedRecord>,
    /// Set when the newest records were cut (damaged) although the region already held them:
    /// the queue was renumbered to continue after this seq.
    pub renumbered_after: Option<u64>,
    /// Highest term this node has seen (durable).
    pub current_term: u64,
    /// Terms along the log (durable; no entry starts after `last_seq`).
    pub term_history: TermHistory,
}

/// Read-only view of a queue file, from [`inspect_queue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// Format version in the file.
    pub format_version: u32,
    /// Owner node id.
    pub node_id: u64,
    /// Owner's role (from the current metadata slot).
    pub role: Role,
    /// Region size the queue was created for.
    pub region_size: u64,
    /// Ring capacity in bytes.
    pub capacity_bytes: u64,
    /// Bound peer (0 = none).
    pub peer_node_id: u64,
    /// Engine-maintained applied watermark.
    pub applied_through: u64,
    /// Recovery epoch of the last read-write open (or `truncate_after`).
    pub epoch: u64,
    /// Highest term the owner has seen.
    pub current_term: u64,
    /// The term history a recovery would keep: the stored one without the entries that start
    /// after `last_seq` (persisted ahead of records that did not survive).
    pub term_history: TermHistory,
    /// Header word `scan_start` (where recovery starts scanning).
    pub scan_start: u64,
    /// Header word `trimmed_through`.
    pub trimmed_through: u64,
    /// Hint word `head` as stored.
    pub head_hint: u64,
    /// Hint word `tail` as stored.
    pub tail_hint: u64,
    /// Hint word `next_seq` as stored.
    pub next_seq_hint: u64,
    /// Live records a recovery would keep.
    pub records: u64,
    /// Ring bytes they occupy.
    pub bytes: u64,
    /// Seq of the oldest live record.
    pub first_seq: Option<u64>,
    /// Last seq a recovery would report.
    pub last_seq: u64,
    /// `next_seq` a recovery would report.
    pub next_seq: u64,
    /// Bytes a recovery would cut.
    pub torn_tail_cut_bytes: u64,
    /// Why the scan would stop short of the tail hint.
    pub cut_reason: Option<CutReason>,
    /// Whether a read-write handle currently has the queue open (exclusive flock held), in
    /// which case the numbers above are a snapshot of a moving target.
    pub in_use: bool,
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
    /// Value of the `scan_start` word in memory, and the value known durable (after the last
    /// barrier). Durable media hold a value in `scan_start_durable..=scan_start`.
    scan_start: u64,
    scan_start_durable: u64,
    /// Position of the last record written or recovered (any kind): the anchor that keeps
    /// `next_seq` recoverable while the queue is empty.
    last_rec_pos: Option<u64>,
    /// Everything below this virtual position was covered by the last barrier.
    flushed_upto: u64,
    /// A header word changed since the last barrier.
    header_dirty: bool,
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

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.creating-{}", std::process::id()))
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
            if best.map_or(true, |(g, _, _)| generation > g) {
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

/// Whether a DATA record's `term` belongs at `seq` in the log the `history` describes, after a
/// DATA record of term `previous` (0: none): terms never decrease along the log, and equal the
/// history's where it covers `seq`; below its first entry (forgotten with the trim point) any
/// term up to its first term fits. `Err` carries the term called for (see `CutReason::Term`).
fn check_record_term(history: &TermHistory, previous: u64, seq: u64, term: u64) -> Result<(), u64> {
    if term < previous {
        return Err(previous);
    }
    match (history.term_at(seq), history.entries().first()) {
        (Some(t), _) if t == term => Ok(()),
        (Some(t), _) => Err(t),
        (None, Some(first)) if term <= first.term => Ok(()),
        (None, Some(first)) => Err(first.term),
        // An empty history describes a log without DATA records.
        (None, None) => Err(0),
    }
}

/// Result of the recovery scan.
#[derive(Clone, Debug)]
struct Scan {
    /// Position after the last accepted record.
    end: u64,
    /// Seq the next DATA record must carry according to the log (None: no record accepted).
    log_next: Option<u64>,
    last_rec_pos: Option<u64>,
    /// First live DATA record (seq > trimmed_through), or `end`.
    head: u64,
    live_records: u64,
    first_live_seq: Option<u64>,
    /// Why the record at `end` was refused (None: stopped at the one-lap bound).
    stop: Option<CutReason>,
}

/// Scans the ring from `scan_start`, verifying each record; stops at the first that fails.
/// Reads with raw copies, so it is also safe on a live queue written by another process (a
/// record overwritten mid-read fails its crc). Bounded: never looks past one lap.
fn scan(map: &Mapping, lim: &Limits, scan_start: u64, trimmed_through: u64, meta: &Meta) -> Scan {
    let cap = lim.capacity;
    let lap_end = scan_start.saturating_add(cap);
    let mut scratch = [0u8; 4096];
    let mut pos = scan_start;
    let mut s = Scan {
        end: pos,
        log_next: None,
        last_rec_pos: None,
        head: pos,
        live_records: 0,
        first_live_seq: None,
        stop: None,
    };
    let mut head: Option<u64> = None;
    let mut last_epoch = 0u64;
    let mut last_data_term = 0u64;
    loop {
        let room = cap - pos % cap;
        let rec_pos = if room < RECORD_HEADER_BYTES {
            pos + room
        } else {
            pos
        };
        if rec_pos.saturating_add(RECORD_HEADER_BYTES) > lap_end {
            break;
        }
        let off = DATA_OFF + (rec_pos % cap) as usize;
        let mut hb = [0u8; HDR];
        map.read_raw(off, &mut hb);
        let h = match check_header(&hb, rec_pos, lim) {
            Ok(h) => h,
            Err(why) => {
                s.stop = Some(why);
                break;
            }
        };
        let total = h.total();
        if rec_pos + total > lap_end {
            // A valid log never spans more than one lap from scan_start.
            s.stop = Some(CutReason::BadLength);
            break;
        }
        let body = h.crc_body_len() as usize;
        let mut crc = header_crc_start(&hb);
        if body > 0 {
            crc = map.crc_raw(crc, off + HDR, body, &mut scratch);
        }
        if crc != stored_crc(&hb) {
            s.stop = Some(CutReason::Checksum);
            break;
        }
        if h.epoch > meta.epoch || h.epoch < last_epoch {
            s.stop = Some(CutReason::Epoch { found: h.epoch });
            break;
        }
        let next = match (h.kind, s.log_next) {
            (Kind::Data | Kind::Pad, Some(e)) if h.seq != e => Err(e),
            (Kind::Reset, Some(e)) if h.seq < e => Err(e),
            (Kind::Data, _) => h.seq.checked_add(1).ok_or(h.seq),
            (Kind::Pad | Kind::Reset, _) => Ok(h.seq),
        };
        let next = match next {
            Ok(n) => n,
            Err(expected) => {
                s.stop = Some(CutReason::SeqGap {
                    expected,
                    found: h.seq,
                });
                break;
            }
        };
        if h.kind == Kind::Data {
            if let Err(expected) = check_record_term(&meta.history, last_data_term, h.seq, h.term) {
                s.stop = Some(CutReason::Term {
                    seq: h.seq,
                    found: h.term,
                    expected,
                });
                break;
            }
            last_data_term = h.term;
        }
        last_epoch = h.epoch;
        s.log_next = Some(next);
        s.last_rec_pos = Some(rec_pos);
        match h.kind {
            Kind::Data if h.seq > trimmed_through => {
                s.live_records += 1;
                if head.is_none() {
                    head = Some(rec_pos);
                    s.first_live_seq = Some(h.seq);
                }
            }
            // A RESET drops every record before it, whatever trimmed_through says (the trim
            // point may not have reached the media, the RESET record did).
            Kind::Reset => {
                s.live_records = 0;
                head = None;
                s.first_live_seq = None;
            }
            Kind::Data | Kind::Pad => {}
        }
        pos = rec_pos + total;
        s.end = pos;
    }
    s.head = head.unwrap_or(s.end);
    s
}

/// What a recovery concludes from a scan and the header words.
struct Conclusion {
    next_seq: u64,
    needs_marker: bool,
    cut: u64,
    cut_reason: Option<CutReason>,
}

fn conclude(
    s: &Scan,
    cap: u64,
    scan_start: u64,
    trimmed_through: u64,
    tail_hint: u64,
) -> Conclusion {
    let floor = trimmed_through.saturating_add(1);
    let (next_seq, needs_marker) = match s.log_next {
        Some(n) => (n.max(floor), floor > n),
        None => (floor, false),
    };
    // The tail hint is only believed as far as one lap from scan_start.
    let cut = if tail_hint > s.end && tail_hint <= scan_start.saturating_add(cap) {
        tail_hint - s.end
    } else {
        0
    };
    Conclusion {
        next_seq,
        needs_marker,
        cut,
        cut_reason: if cut > 0 { s.stop } else { None },
    }
}

/// Refuses a `scan_start` word that cannot be a ring position (the scan relies on alignment
/// and on room for a lap above it).
fn check_scan_start(path: &Path, scan_start: u64) -> Result<(), StorageError> {
    if scan_start % 8 != 0 || scan_start > u64::MAX / 2 {
        return Err(StorageError::CorruptHeader {
            path: path.to_path_buf(),
            why: format!("scan_start word {scan_start} is not a valid ring position"),
        });
    }
    Ok(())
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
        let tmp = tmp_path(path);
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

    /// Opens the queue at `path` if it exists, after checking that its role and region size
    /// match `params` ([`StorageError::RoleMismatch`], [`StorageError::RegionSizeMismatch`];
    /// checked before anything is written); otherwise creates it. For an existing file, its
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
    /// anything is written: the role (from the metadata) and the region size.
    fn check_expected(
        path: &Path,
        stat: &StaticHeader,
        meta: &Meta,
        params: &QueueParams,
    ) -> Result<(), StorageError> {
        if meta.role != params.role {
            return Err(StorageError::RoleMismatch {
                path: path.to_path_buf(),
                file: meta.role,
                expected: params.role,
            });
        }
        if stat.region_size != params.region_size {
            return Err(StorageError::RegionSizeMismatch {
                path: path.to_path_buf(),
                file: stat.region_size,
                expected: params.region_size,
            });
        }
        Ok(())
    }

    /// Recovers the queue in the locked `file`, after checking it against `expect` (if given).
    /// `before_barrier` runs on the recovered queue before the first thing recovery writes (the
    /// new epoch and its barrier), so that a crash hook installed there sees that barrier too.
    fn open_locked(
        path: &Path,
        file: File,
        durability: Durability,
        expect: Option<&QueueParams>,
        before_barrier: impl FnOnce(&mut Self),
    ) -> Result<(Self, RecoveryReport), StorageError> {
        let stat = read_static(&file, path)?;
        let limits = limits_of(&stat);
        let len = (HEADER_BYTES + stat.capacity) as usize;
        let map = Mapping::map_rw(&file, len, durability, path)?;
        let (mut meta, meta_slot) = read_meta(&map, path)?;
        if let Some(params) = expect {
            Self::check_expected(path, &stat, &meta, params)?;
        }
        // Acquire on the cursor words: pairs with this queue's own Release stores in an
        // earlier session of this process; across a crash the values simply are what the file
        // holds. Recovery never trusts head/tail/next_seq beyond reporting.
        let scan_start = map.word(OFF_SCAN_START).load(Ordering::Acquire);
        let trimmed_through = map.word(OFF_TRIMMED_THROUGH).load(Ordering::Acquire);
        let tail_hint = map.word(OFF_TAIL).load(Ordering::Acquire);
        check_scan_start(path, scan_start)?;
        let s = scan(&map, &limits, scan_start, trimmed_through, &meta);
        let c = conclude(&s, stat.capacity, scan_start, trimmed_through, tail_hint);
        // An entry persisted ahead of its first record, which then did not survive, covers
        // nothing (see FORMAT.md, "Recovery"); the new-epoch write below persists the cut.
        meta.history.truncate_after(c.next_seq - 1);

        let mut q = PersistentQueue {
            path: path.to_path_buf(),
            file,
            map,
            durability,
            stat,
            limits,
            meta,
            meta_slot,
            meta_dirty: false,
            head: s.head,
            tail: s.end,
            next_seq: s.log_next.unwrap_or(c.next_seq),
            len_records: s.live_records,
            trimmed_through,
            // After a process crash the word read may not be on the media yet.
            trimmed_through_durable: 0,
            scan_start,
            scan_start_durable: scan_start,
            last_rec_pos: s.last_rec_pos,
            // Everything scanned is re-flushed by the first barrier: in Power/Pmem mode it may
            // still sit in the page cache / CPU cache after a process crash.
            flushed_upto: scan_start,
            header_dirty: true,
            #[cfg(any(test, feature = "crash-hooks"))]
            test_hook: None,
        };
        debug_assert_eq!(q.head == q.tail, q.len_records == 0);
        before_barrier(&mut q);

        // New epoch, durable before any record of this session can be (see FORMAT.md,
        // "Ghost records").
        let new_meta = Meta {
            epoch: q.next_epoch()?,
            ..q.meta.clone()
        };
        q.write_meta(new_meta)?;
        if c.needs_marker {
            // Durable trims went past the last surviving record: the log must say where the
            // numbering continues, or the next appended record would look like a gap.
            debug_assert_eq!(q.len_records, 0);
            q.write_record(Kind::Reset, c.next_seq, 0, 0, &[])?;
            q.head = q.tail;
            q.next_seq = c.next_seq;
            q.barrier()?;
        }
        debug_assert_eq!(q.next_seq, c.next_seq);
        q.publish_cursors();
        let report = RecoveryReport {
            records: q.len_records,
            bytes: q.used_bytes(),
            torn_tail_cut_bytes: c.cut,
            first_seq: q.first_seq(),
            last_seq: q.last_seq(),
            next_seq: q.next_seq,
            cut_reason: c.cut_reason,
            epoch: q.meta.epoch,
            reset_marker_written: c.needs_marker,
        };
        Ok((q, report))
    }

    /// What a node restarting on this queue must know and replay: everything after
    /// `applied_through`. When the newest records were damaged and cut although the region
    /// already holds their writes (`applied_through > last_seq`), the numbering continues after
    /// them (`reset_to`) rather than refusing: nothing unapplied was lost.
    pub fn replay_state(&mut self) -> Result<ReplayState, StorageError> {
        let mut renumbered_after = None;
        if self.applied_through() > self.last_seq() {
            renumbered_after = Some(self.applied_through());
            self.reset_to(self.applied_through() + 1)?;
        }
        let mut unapplied = Vec::new();
        for rec in self.iter_from(self.applied_through() + 1) {
            let rec = rec?;
            unapplied.push(OwnedRecord {
                seq: rec.seq,
                term: rec.term,
                offset: rec.offset,
                payload: rec.payload.to_vec(),
            });
        }
        Ok(ReplayState {
            peer_node_id: self.peer_node_id(),
            applied_through: self.applied_through(),
            first_seq: self.first_seq(),
            last_seq: self.last_seq(),
            unapplied,
            renumbered_after,
            current_term: self.current_term(),
            term_history: self.term_history().clone(),
        })
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

    /// Changes this node's role (a failover). Durable per mode before returning.
    pub fn set_role(&mut self, role: Role) -> Result<(), StorageError> {
        if role == self.meta.role {
            return Ok(());
        }
        self.write_meta(Meta {
            role,
            ..self.meta.clone()
        })
    }

    /// The highest term this node has seen (durable): never below the last term of
    /// [`term_history`](Self::term_history).
    pub fn current_term(&self) -> u64 {
        self.meta.current_term
    }

    /// Raises the current term (the node saw, or starts, a newer term). Equal: a no-op; lower:
    /// [`StorageError::CurrentTermBackwards`]. Durable per mode before returning.
    pub fn set_current_term(&mut self, term: u64) -> Result<(), StorageError> {
        if term < self.meta.current_term {
            return Err(StorageError::CurrentTermBackwards {
                current: self.meta.current_term,
                requested: term,
            });
        }
        if term == self.meta.current_term {
            return Ok(());
        }
        self.write_meta(Meta {
            current_term: term,
            ..self.meta.clone()
        })
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

    /// Binds (or, with 0, unbinds) the peer. Durable per mode before returning.
    pub fn set_peer_node_id(&mut self, id: u64) -> Result<(), StorageError> {
        if id == self.meta.peer_node_id {
            return Ok(());
        }
        self.write_meta(Meta {
            peer_node_id: id,
            ..self.meta.clone()
        })
    }

    /// Highest seq whose write is durably in this node's region (maintained by the engine).
    pub fn applied_through(&self) -> u64 {
        self.meta.applied_through
    }

    /// Records the applied watermark. Durable per mode before returning (this is a barrier:
    /// in Power mode one fdatasync of the queue file, which also covers pending appends).
    pub fn set_applied_through(&mut self, seq: u64) -> Result<(), StorageError> {
        if seq == self.meta.applied_through {
            return Ok(());
        }
        self.write_meta(Meta {
            applied_through: seq,
            ..self.meta.clone()
        })
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

    /// Whether a primary may take a new write of `payload_len` bytes: room for it (with a
    /// generous 64 bytes of header and padding) while a quarter of the ring stays free. A
    /// backup's queue of the same size may hold more than the primary's (records the primary
    /// trimmed while its apply report is in flight); the quarter keeps room for them.
    pub fn admits_new_write(&self, payload_len: usize) -> bool {
        self.free_bytes() >= payload_len as u64 + 64 + self.capacity_bytes() / 4
    }

    /// Of `incoming` items in order (`Some((seq, payload_len))` for a write, `None` for anything
    /// else), the index of the first write that [`append`](Self::append) would refuse for want
    /// of room, were all before it appended; `None` when all fit. The records are placed exactly
    /// as `append` places them (with the lap skipped at the end of the ring). Only the writes
    /// that would be appended count: `next_seq()` and the ones following it in order, not
    /// duplicates or writes after a gap. A backup checks incoming writes with it before taking
    /// them.
    pub fn first_write_without_room(
        &self,
        incoming: impl IntoIterator<Item = Option<(u64, usize)>>,
    ) -> Option<usize> {
        let mut room = self.room_check();
        let mut next = self.next_seq;
        incoming.into_iter().position(|item| match item {
            Some((seq, payload_len)) if seq == next => {
                next += 1;
                room.take(payload_len).is_err()
            }
            _ => false,
        })
    }

    /// `capacity_bytes() - used_bytes()`. An append needs the record size rounded up to 8
    /// plus, when it would cross the end of the ring, the rest of the lap.
    pub fn free_bytes(&self) -> u64 {
        self.stat.capacity - self.used_bytes()
    }

    /// Appends a record of `term`. `seq` must equal [`next_seq`](Self::next_seq); `payload`
    /// must be `1..=max_payload()` bytes and `offset..offset+len` must lie inside the region;
    /// `term` must be allowed by the term history ([`TermHistory::check_append`]: not 0, not
    /// below the log's last term), else [`StorageError::Term`]. Nothing is written on an error.
    ///
    /// The first record of a new term first persists the history entry naming it (and raises
    /// the current term to `term` if it is higher): a metadata update, durable before the
    /// record is written, so every durable record's term is in the durable history.
    ///
    /// Returns [`StorageError::Full`] when there is no room (nothing is written; trim and
    /// retry). The record is durable after the next [`sync`](Self::sync) (Power/Pmem), or at
    /// once against a process crash (all modes).
    pub fn append(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        payload: &[u8],
    ) -> Result<(), StorageError> {
        self.check_append_args(seq, offset, payload)?;
        let starts_term = self
            .meta
            .history
            .check_append(seq, term)
            .map_err(|source| StorageError::Term {
                path: self.path.clone(),
                source,
            })?;
        if starts_term {
            // Room first: an entry must not be persisted for a record that is then refused.
            self.room_check().take(payload.len())?;
            self.persist_term_start(seq, term)?;
        }
        let written = self.write_record(Kind::Data, seq, term, offset, payload);
        if written.is_err() && starts_term {
            // The room was checked, so a barrier failed: the new entry covers no record.
            // Recovery drops it from the durable history the same way.
            self.meta.history.truncate_after(self.last_seq());
        }
        written?;
        self.next_seq += 1;
        self.len_records += 1;
        self.publish_cursors();
        Ok(())
    }

    /// The checks of [`append`](Self::append) that do not involve terms or room.
    fn check_append_args(&self, seq: u64, offset: u64, payload: &[u8]) -> Result<(), StorageError> {
        if seq != self.next_seq {
            return Err(StorageError::SeqOutOfOrder {
                expected: self.next_seq,
                got: seq,
            });
        }
        if payload.is_empty() || payload.len() > self.max_payload() {
            return Err(StorageError::PayloadSize {
                len: payload.len(),
                max: self.max_payload(),
            });
        }
        let len = payload.len() as u64;
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.stat.region_size)
        {
            return Err(StorageError::OutOfRange {
                offset,
                len,
                size: self.stat.region_size,
            });
        }
        if seq == u64::MAX {
            return Err(StorageError::InvalidArgument {
                why: "sequence numbers exhausted".into(),
            });
        }
        Ok(())
    }

    /// Persists the history entry `(term, seq)` (and `current_term >= term`) before the record
    /// `seq` that starts the term is written.
    fn persist_term_start(&mut self, seq: u64, term: u64) -> Result<(), StorageError> {
        let mut m = self.meta.clone();
        m.history
            .note_append(seq, term)
            .map_err(|source| StorageError::Term {
                path: self.path.clone(),
                source,
            })?;
        m.current_term = m.current_term.max(term);
        self.write_meta(m)
    }

    /// Durability barrier for everything appended, trimmed or reset since the last one:
    /// - Process: nothing to do (the page cache survives a process crash);
    /// - Power: one `fdatasync` of the queue file;
    /// - Pmem: write back every cache line written since the last barrier (data and header),
    ///   then `sfence`.
    ///
    /// Cheap when nothing changed. The engine calls it once per batch (group commit).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        // Let scan_start follow the head when the record there is already durable: it rides
        // along with this barrier, so later appends rarely need the extra barrier of
        // `make_room_durable`.
        let cand = self.scan_candidate();
        if cand > self.scan_start && cand < self.flushed_upto {
            self.set_scan_start(cand);
        }
        if self.flushed_upto == self.tail && !self.header_dirty {
            return Ok(());
        }
        self.barrier()
    }

    /// Drops every record with seq `<= seq` (a no-op for seqs already gone; values beyond
    /// `last_seq()` are clamped to it).
    ///
    /// Lazy: the new trim point reaches the media with the next barrier (or earlier, by
    /// write-back). A crash before that may bring trimmed records back after recovery; the
    /// engine replays them, which is idempotent because a record is a plain "write these bytes
    /// at this offset" and its successors are replayed after it, in order.
    pub fn trim_through(&mut self, seq: u64) -> Result<(), StorageError> {
        let limit = seq.min(self.last_seq());
        if limit <= self.trimmed_through {
            return Ok(());
        }
        let mut head = self.head;
        let mut dropped = 0u64;
        while head < self.tail {
            let (pos, h) = self.record_at(head)?;
            if h.kind == Kind::Data {
                if h.seq > limit {
                    head = pos;
                    break;
                }
                dropped += 1;
            }
            head = pos + h.total();
        }
        // head may have stopped on an implicit wrap skip; normalise to the tail.
        let head = head.min(self.tail);
        // Order (Process-mode crash safety): trimmed_through before the head hint.
        self.raise_trim_point(limit);
        self.head = head;
        self.len_records -= dropped;
        self.header_dirty = true;
        self.publish_cursors();
        debug_assert_eq!(self.head == self.tail, self.len_records == 0);
        Ok(())
    }

    /// Drops all records and makes the next append carry `next_seq` (used when this node
    /// adopts the peer's numbering). Only forwards ([`StorageError::ResetBackwards`]);
    /// durable per mode before returning.
    pub fn reset_to(&mut self, next_seq: u64) -> Result<(), StorageError> {
        if next_seq < self.next_seq {
            return Err(StorageError::ResetBackwards {
                current: self.next_seq,
                requested: next_seq,
            });
        }
        if next_seq == u64::MAX {
            return Err(StorageError::InvalidArgument {
                why: "reset_to(u64::MAX) leaves no sequence numbers".into(),
            });
        }
        // Order matters for a crash in the middle (see FORMAT.md, "reset_to"):
        // 1. trimmed_through = next_seq - 1: from here on, recovery yields next_seq or later.
        let tt = next_seq - 1;
        self.raise_trim_point(tt);
        self.head = self.tail;
        self.len_records = 0;
        // 2. a RESET record, so records appended after it continue the log without a gap.
        if next_seq > self.next_seq {
            self.write_record(Kind::Reset, next_seq, 0, 0, &[])?;
            self.head = self.tail;
            self.next_seq = next_seq;
        }
        self.header_dirty = true;
        self.publish_cursors();
        // 3. durable before returning.
        self.barrier()
    }

    /// Discards every record with seq `> seq`: a divergent suffix the protocol decided to drop
    /// (the caller saved what it needs of them first). Afterwards `next_seq() == seq + 1`, the
    /// term history has no entry after `seq`, `applied_through() <= seq`, and a new epoch has
    /// begun. Durable per mode before returning, and crash-safe at every point: a crash
    /// recovers either the old log or the truncated one, and a discarded record never comes
    /// back after records appended later (see FORMAT.md, "Truncation").
    ///
    /// A no-op when `seq >= last_seq()`. Refused with [`StorageError::TruncateBelowTrim`] when
    /// the records through `seq` are already gone: `seq < first_seq() - 1`, or, for an empty
    /// queue, `seq < last_seq()` (in particular whenever `seq` is below the trim point).
    pub fn truncate_after(&mut self, seq: u64) -> Result<(), StorageError> {
        let gone_through = self.first_seq().map_or(self.last_seq(), |first| first - 1);
        if seq < gone_through {
            return Err(StorageError::TruncateBelowTrim {
                requested: seq,
                trimmed_through: gone_through,
            });
        }
        if seq >= self.last_seq() {
            return Ok(());
        }
        // From here the queue holds records, and seq + 1 ..= last_seq are live.
        if self.meta.applied_through > seq {
            // Lowering applied_through is always safe (replay is idempotent); it must be
            // durable before the records it covers can disappear, or a crash could recover a
            // log that ends below applied_through (and would be renumbered past it).
            self.write_meta(Meta {
                applied_through: seq,
                ..self.meta.clone()
            })?;
        }
        let first = self.next_seq - self.len_records;
        let cut = self.truncation_point(seq)?;
        if !cut.keeps_live && self.trimmed_through_durable < seq {
            // Every live record goes, and scan_start may point at the first of them: then
            // recovery takes the numbering from trimmed_through alone, so it must say `seq`,
            // durably, before that record is erased. (The trim point can lag `first_seq - 1`
            // after a crash tore the cursor line, or after a RESET whose trim point was lost.)
            self.raise_trim_point(seq);
            self.barrier()?;
        }
        // (a) Erase the header of the first discarded record (the log now ends at `cut.at`).
        self.erase_header_at(cut.at)?;
        // (b) The cursors.
        self.end_log_at(&cut, seq, first);
        // (c) A new epoch, so that records written from now on are newer than every discarded
        // one (which the scan's epoch rule then refuses after them), and the history without
        // the discarded terms.
        let mut m = Meta {
            epoch: self.next_epoch()?,
            ..self.meta.clone()
        };
        m.history.truncate_after(seq);
        self.write_meta(m)
    }

    /// Where the log ends if it keeps the records through `seq` (live or not). Requires
    /// `first_seq() - 1 <= seq < last_seq()`.
    fn truncation_point(&self, seq: u64) -> Result<TruncationPoint, StorageError> {
        let keeps_live = self.first_seq() != Some(seq + 1);
        // Keeping live records: the cut follows record `seq`. Keeping none: it follows the
        // last record before the head (the records from scan_start on are intact), or is the
        // head itself when scan_start is there.
        let (from, until) = if keeps_live {
            (self.head, self.tail)
        } else {
            (self.scan_start, self.head)
        };
        let mut pos = from;
        let mut last = None;
        while pos < until {
            let (rec_pos, h) = self.record_at(pos)?;
            if rec_pos >= until {
                break; // a lap-end skip right before the head
            }
            let end = rec_pos + h.total();
            if keeps_live && h.kind == Kind::Data && h.seq == seq {
                return Ok(TruncationPoint {
                    at: end,
                    anchor: Some(rec_pos),
                    keeps_live,
                });
            }
            last = Some((rec_pos, end));
            pos = end;
        }
        if keeps_live {
            return Err(StorageError::CorruptRecord {
                path: self.path.clone(),
                at: self.head % self.cap(),
                why: format!("record seq {seq} is not between the head and the tail"),
            });
        }
        Ok(match last {
            Some((anchor, end)) => TruncationPoint {
                at: end,
                anchor: Some(anchor),
                keeps_live,
            },
            None => TruncationPoint {
                at: self.head,
                anchor: None,
                keeps_live,
            },
        })
    }

    /// Step (b) of `truncate_after`: the log in memory ends at `cut`, after record `seq`; the
    /// live records were `first..`.
    fn end_log_at(&mut self, cut: &TruncationPoint, seq: u64, first: u64) {
        self.tail = cut.at;
        // The barrier of step (a) covered everything below the old tail.
        self.flushed_upto = cut.at;
        self.next_seq = seq + 1;
        if cut.keeps_live {
            self.len_records = seq + 1 - first;
        } else {
            self.head = cut.at;
            self.len_records = 0;
        }
        // The anchor is a kept record; with none known, trimmed_through carries the numbering.
        // Either way scan_start cannot move onto a discarded record.
        self.last_rec_pos = cut.anchor;
        self.header_dirty = true;
        self.publish_cursors();
        debug_assert_eq!(self.head == self.tail, self.len_records == 0);
    }

    /// Zeroes the record header that starts at `pos` (after an implicit lap-end skip, as a
    /// scan would read it), then runs a barrier that makes it and everything before the tail
    /// durable.
    fn erase_header_at(&mut self, pos: u64) -> Result<(), StorageError> {
        let cap = self.cap();
        let room = cap - pos % cap;
        let at = if room < RECORD_HEADER_BYTES {
            pos + room
        } else {
            pos
        };
        debug_assert!(at + RECORD_HEADER_BYTES <= self.tail);
        let off = DATA_OFF + (at % cap) as usize;
        self.map.bytes_mut(off, HDR).fill(0);
        self.stored();
        self.flushed_upto = self.flushed_upto.min(at);
        self.barrier()
    }

    /// Stores a higher trim point (no barrier). Release: observers that Acquire-load the head
    /// hint stored after it also see the trim point it follows from; crash order comes from
    /// program order and barriers, not from this.
    fn raise_trim_point(&mut self, through: u64) {
        if through > self.trimmed_through {
            self.trimmed_through = through;
            self.map
                .word(OFF_TRIMMED_THROUGH)
                .store(through, Ordering::Release);
            self.stored();
            self.header_dirty = true;
        }
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

    /// Live records with seq `>= seq`, in order. Each record's crc is verified as it is read;
    /// a record that fails yields [`StorageError::CorruptRecord`] and ends the iteration.
    pub fn iter_from(&self, seq: u64) -> Records<'_> {
        Records {
            q: self,
            pos: self.head,
            from: seq,
            done: false,
        }
    }

    // ---- internals ----

    fn cap(&self) -> u64 {
        self.stat.capacity
    }

    /// Header of the record at or after `pos` (skipping an implicit wrap), validated but crc
    /// unchecked. Only used between scan_start and tail, where every record was written or
    /// verified by this handle and nothing is overwritten; a failure there means the mapping
    /// was modified behind our back.
    fn record_at(&self, pos: u64) -> Result<(u64, RecHeader), StorageError> {
        let cap = self.cap();
        let room = cap - pos % cap;
        let rec_pos = if room < RECORD_HEADER_BYTES {
            pos + room
        } else {
            pos
        };
        let off = DATA_OFF + (rec_pos % cap) as usize;
        let mut hb = [0u8; HDR];
        hb.copy_from_slice(self.map.bytes(off, HDR));
        let h = check_header(&hb, rec_pos, &self.limits).map_err(|why| {
            StorageError::CorruptRecord {
                path: self.path.clone(),
                at: rec_pos % cap,
                why: why.to_string(),
            }
        })?;
        Ok((rec_pos, h))
    }

    /// Verifies the crc of the record at `pos` and returns its body.
    fn verified_body(&self, pos: u64, h: &RecHeader) -> Result<&[u8], StorageError> {
        let off = DATA_OFF + (pos % self.cap()) as usize;
        let rec = self.map.bytes(off, h.total() as usize);
        let mut hb = [0u8; HDR];
        hb.copy_from_slice(&rec[..HDR]);
        let body_len = h.crc_body_len() as usize;
        let crc = crc32c::crc32c_append(header_crc_start(&hb), &rec[HDR..HDR + body_len]);
        if crc != stored_crc(&hb) {
            return Err(StorageError::CorruptRecord {
                path: self.path.clone(),
                at: pos % self.cap(),
                why: CutReason::Checksum.to_string(),
            });
        }
        Ok(&rec[HDR..HDR + h.payload_len as usize])
    }

    /// Stores head, tail and next_seq for observers. Release: a reader that Acquire-loads
    /// `tail` or `next_seq` sees the bytes of every record below that tail (they were written
    /// before these stores).
    fn publish_cursors(&self) {
        self.map.word(OFF_HEAD).store(self.head, Ordering::Release);
        self.map.word(OFF_TAIL).store(self.tail, Ordering::Release);
        self.map
            .word(OFF_NEXT_SEQ)
            .store(self.next_seq, Ordering::Release);
    }

    fn set_scan_start(&mut self, v: u64) {
        debug_assert!(v >= self.scan_start);
        // The record scan_start points at must already be durable (covered by a barrier), or
        // there must be nothing there yet.
        assert!(
            v < self.flushed_upto || v == self.tail,
            "scan_start {v} would point at a record not yet durable (flushed up to {})",
            self.flushed_upto
        );
        self.scan_start = v;
        // Release: pairs with Acquire loads by observers; for crash safety what matters is
        // that the record at `v` was made durable before this store (callers ensure it).
        self.map.word(OFF_SCAN_START).store(v, Ordering::Release);
        self.header_dirty = true;
        self.stored();
    }

    /// Where recovery could start scanning now: the first live record, or while empty the
    /// last record written (the anchor carrying the numbering).
    fn scan_candidate(&self) -> u64 {
        if self.head < self.tail {
            self.head
        } else {
            self.last_rec_pos.unwrap_or(self.tail)
        }
    }

    /// Before bytes up to virtual position `new_end` are written (overwriting `new_end - cap`
    /// and below), make sure the durable `scan_start` is past them.
    /// A dry run of appends from the ring's current positions.
    fn room_check(&self) -> RoomCheck {
        RoomCheck {
            capacity: self.cap(),
            head: self.head,
            tail: self.tail,
        }
    }

    fn make_room_durable(&mut self, new_end: u64) -> Result<(), StorageError> {
        let cap = self.cap();
        if new_end <= self.scan_start_durable + cap {
            return Ok(());
        }
        let cand = self.scan_candidate();
        assert!(
            new_end <= cand + cap,
            "ring invariant violated: write up to {new_end} would overwrite the scan candidate {cand}"
        );
        if cand > self.scan_start {
            if cand >= self.flushed_upto {
                // The record at `cand` must be durable before scan_start may point at it.
                self.barrier()?;
            }
            self.set_scan_start(cand);
        }
        self.barrier()?;
        debug_assert!(new_end <= self.scan_start_durable + cap);
        Ok(())
    }

    /// Writes one record (preceded by a wrap pad if it does not fit before the end of the
    /// ring) at the tail. Does not touch `next_seq` or `len_records`.
    fn write_record(
        &mut self,
        kind: Kind,
        seq: u64,
        term: u64,
        region_offset: u64,
        payload: &[u8],
    ) -> Result<(), StorageError> {
        let mut ring = self.room_check();
        let Placement { skip, total } = ring.take(payload.len())?;
        debug_assert!(total <= max_record_bytes(self.cap()));
        self.make_room_durable(ring.tail)?;
        if skip >= RECORD_HEADER_BYTES {
            let pad = RecHeader {
                kind: Kind::Pad,
                payload_len: (skip - RECORD_HEADER_BYTES) as u32,
                seq: self.next_seq,
                vpos: self.tail,
                region_offset: 0,
                epoch: self.meta.epoch,
                term: 0,
            };
            self.put_record(&pad, &[]);
            self.last_rec_pos = Some(self.tail);
        }
        // The head moves along with the skip only when the ring was empty.
        self.head = ring.head;
        self.tail += skip;
        let h = RecHeader {
            kind,
            payload_len: payload.len() as u32,
            seq,
            vpos: self.tail,
            region_offset,
            epoch: self.meta.epoch,
            term,
        };
        self.put_record(&h, payload);
        self.last_rec_pos = Some(self.tail);
        self.tail += total;
        self.header_dirty = true;
        Ok(())
    }

    /// Encodes a record into the ring at `h.vpos`: body (payload + zero padding) first, then
    /// the header with the crc.
    fn put_record(&mut self, h: &RecHeader, payload: &[u8]) {
        const ZEROS: [u8; 8] = [0; 8];
        let cap = self.cap();
        let off = DATA_OFF + (h.vpos % cap) as usize;
        let mut hb = h.encode();
        let mut crc = header_crc_start(&hb);
        let body_len = h.crc_body_len() as usize;
        if body_len > 0 {
            let pad = body_len - payload.len();
            debug_assert!(pad < 8);
            crc = crc32c::crc32c_append(crc, payload);
            crc = crc32c::crc32c_append(crc, &ZEROS[..pad]);
            let dst = self.map.bytes_mut(off + HDR, body_len);
            dst[..payload.len()].copy_from_slice(payload);
            dst[payload.len()..].fill(0);
        }
        seal(&mut hb, crc);
        self.map.bytes_mut(off, HDR).copy_from_slice(&hb);
        self.stored();
    }

    /// Writes the other metadata slot with `m` (generation + 1, and its history without the
    /// entries below the durable trim point) and makes it durable.
    fn write_meta(&mut self, mut m: Meta) -> Result<(), StorageError> {
        let slot = 1 - self.meta_slot;
        m.generation =
            self.meta
                .generation
                .checked_add(1)
                .ok_or_else(|| StorageError::CorruptHeader {
                    path: self.path.clone(),
                    why: "metadata generation exhausted".into(),
                })?;
        // So that the slot never fills up with entries nobody compares any more. Only below the
        // durable trim point: if this slot reaches the media and a newer trim point does not,
        // the records above the older one are live again and their entries must be there.
        m.history.forget_before(self.trimmed_through_durable);
        let bytes = m.encode();
        let base = META_SLOT_OFF[slot];
        // Release on each store: an observer that reads a matching crc (Acquire) reads a
        // consistent slot; a half-written slot fails its crc and the observer uses the other.
        // Crash safety comes from the crc and from the other slot being durable already.
        for (i, word) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.map
                .word(base + i * 8)
                .store(u64::from_le_bytes(w), Ordering::Release);
        }
        self.stored();
        self.meta = m;
        self.meta_slot = slot;
        self.meta_dirty = true;
        // The slot must be durable before the next meta write may overwrite the other one.
        self.barrier()
    }

    /// Test hook: a store just happened (the crash simulation snapshots here).
    #[inline]
    fn stored(&mut self) {
        #[cfg(any(test, feature = "crash-hooks"))]
        if let Some(hook) = self.test_hook.as_mut() {
            hook(CrashEvent::Stored);
        }
    }

    /// File ranges written since the last barrier: the cursor line, the metadata slot if one
    /// was written, and the data between `flushed_upto` and `tail` (at most two pieces around
    /// the wrap).
    fn dirty_ranges(&self) -> ([(usize, usize); 4], usize) {
        let mut r = [(0usize, 0usize); 4];
        let mut n = 0;
        r[n] = CURSOR_LINE;
        n += 1;
        if self.meta_dirty {
            r[n] = (META_SLOT_OFF[self.meta_slot], META_SLOT_BYTES);
            n += 1;
        }
        let cap = self.cap();
        let len = self.tail - self.flushed_upto.min(self.tail);
        if len >= cap {
            r[n] = (DATA_OFF, cap as usize);
            n += 1;
        } else if len > 0 {
            let start = self.flushed_upto % cap;
            let first = len.min(cap - start);
            r[n] = (DATA_OFF + start as usize, first as usize);
            n += 1;
            if first < len {
                r[n] = (DATA_OFF, (len - first) as usize);
                n += 1;
            }
        }
        (r, n)
    }

    /// Makes everything written so far durable per mode (see [`sync`](Self::sync)).
    fn barrier(&mut self) -> Result<(), StorageError> {
        let (ranges, n) = self.dirty_ranges();
        match self.durability {
            Durability::Process => {}
            Durability::Power => self
                .file
                .sync_data()
                .map_err(|e| StorageError::io(&self.path, "fdatasync", e))?,
            Durability::Pmem => {
                for &(off, len) in &ranges[..n] {
                    self.map.flush_lines(off, len);
                }
                map::fence();
            }
        }
        #[cfg(any(test, feature = "crash-hooks"))]
        if let Some(hook) = self.test_hook.as_mut() {
            hook(CrashEvent::Barrier(&ranges[..n]));
        }
        self.flushed_upto = self.tail;
        self.scan_start_durable = self.scan_start;
        self.trimmed_through_durable = self.trimmed_through;
        // Nothing below the durable trim point is compared any more (see write_meta).
        self.meta
            .history
            .forget_before(self.trimmed_through_durable);
        self.header_dirty = false;
        self.meta_dirty = false;
        Ok(())
    }
}

/// Iterator returned by [`PersistentQueue::iter_from`].
pub struct Records<'a> {
    q: &'a PersistentQueue,
    pos: u64,
    from: u64,
    done: bool,
}

impl fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("pos", &self.pos)
            .field("from", &self.from)
            .finish()
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordRef<'a>, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Bounded: each step advances by at least one record header, and the walk stops at
        // the tail, at most one lap from the head.
        while !self.done && self.pos < self.q.tail {
            let (pos, h) = match self.q.record_at(self.pos) {
                Ok(x) => x,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.pos = pos + h.total();
            if h.kind != Kind::Data || h.seq < self.from {
                continue;
            }
            return match self.q.verified_body(pos, &h) {
                Ok(payload) => Some(Ok(RecordRef {
                    seq: h.seq,
                    term: h.term,
                    offset: h.region_offset,
                    payload,
                })),
                Err(e) => {
                    self.done = true;
                    Some(Err(e))
                }
            };
        }
        None
    }
}

/// Offline, read-only inspection of a queue file (for `mirror status`).
///
/// Maps the file read-only and never writes it, takes no lock (so it works on a queue that a
/// running node has open; then the result is a snapshot of a moving target and `in_use` is
/// true), and never panics on garbage: every field read from the file is validated. Reports the
/// header fields and what a recovery would conclude right now (records, bytes, cut).
pub fn inspect_queue(path: &Path) -> Result<QueueInfo, StorageError> {
    let file = File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let stat = read_static(&file, path)?;
    let limits = limits_of(&stat);
    let map = Mapping::map_ro(&file, (HEADER_BYTES + stat.capacity) as usize, path)?;
    // A live writer may be rewriting a slot; retry a few times before calling it damaged.
    let mut meta = read_meta(&map, path);
    for _ in 0..8 {
        if !matches!(meta, Err(StorageError::MetaChecksum { .. })) {
            break;
        }
        std::thread::yield_now();
        meta = read_meta(&map, path);
    }
    let (meta, _) = meta?;
    // Acquire: pairs with the writer's Release stores (publish_cursors, trim_through,
    // set_scan_start), so records below an observed tail are completely written.
    let scan_start = map.word(OFF_SCAN_START).load(Ordering::Acquire);
    let trimmed_through = map.word(OFF_TRIMMED_THROUGH).load(Ordering::Acquire);
    let head_hint = map.word(OFF_HEAD).load(Ordering::Acquire);
    let tail_hint = map.word(OFF_TAIL).load(Ordering::Acquire);
    let next_seq_hint = map.word(OFF_NEXT_SEQ).load(Ordering::Acquire);
    check_scan_start(path, scan_start)?;
    let s = scan(&map, &limits, scan_start, trimmed_through, &meta);
    let c = conclude(&s, stat.capacity, scan_start, trimmed_through, tail_hint);
    let (records, bytes, first_seq) = if c.needs_marker {
        (0, 0, None)
    } else {
        (s.live_records, s.end - s.head, s.first_live_seq)
    };
    let mut term_history = meta.history;
    term_history.truncate_after(c.next_seq - 1);
    Ok(QueueInfo {
        format_version: format::FORMAT_VERSION,
        node_id: stat.node_id,
        role: meta.role,
        region_size: stat.region_size,
        capacity_bytes: stat.capacity,
        peer_node_id: meta.peer_node_id,
        applied_through: meta.applied_through,
        epoch: meta.epoch,
        current_term: meta.current_term,
        term_history,
        scan_start,
        trimmed_through,
        head_hint,
        tail_hint,
        next_seq_hint,
        records,
        bytes,
        first_seq,
        last_seq: c.next_seq - 1,
        next_seq: c.next_seq,
        torn_tail_cut_bytes: c.cut,
        cut_reason: c.cut_reason,
        in_use: map::is_locked_by_writer(&file),
    })
}

/// Where `truncate_after` cuts the log.
#[derive(Debug, Clone, Copy)]
struct TruncationPoint {
    /// The new tail: the position right after the last record kept.
    at: u64,
    /// The last record kept (the new anchor), if one is known.
    anchor: Option<u64>,
    /// Whether live records are kept (else the queue ends up empty).
    keeps_live: bool,
}

/// Where a record goes when appended at ring position `tail`.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// Bytes skipped to the end of the lap first (0 unless the record would cross it).
    skip: u64,
    /// The record's own size in the ring.
    total: u64,
}

impl Placement {
    fn at(capacity: u64, tail: u64, payload_len: usize) -> Placement {
        let total = record_total(payload_len as u64);
        let room = capacity - tail % capacity;
        Placement {
            skip: if room < total { room } else { 0 },
            total,
        }
    }
}

/// Ring positions for placing appends: the queue's own, or a dry run's (see
/// [`PersistentQueue::first_write_without_room`]).
#[derive(Debug, Clone)]
struct RoomCheck {
    capacity: u64,
    head: u64,
    tail: u64,
}

impl RoomCheck {
    /// Takes the room of one more record with `payload_len` bytes after those already taken:
    /// where it goes, or `Full` when it does not fit.
    fn take(&mut self, payload_len: usize) -> Result<Placement, StorageError> {
        let placement = Placement::at(self.capacity, self.tail, payload_len);
        let needed = placement.skip + placement.total;
        let free = self.capacity - (self.tail - self.head);
        if needed > free {
            return Err(StorageError::Full { needed, free });
        }
        // An empty ring's skip moves its head along, so it costs nothing.
        if self.head == self.tail {
            self.head += placement.skip;
        }
        self.tail += needed;
        Ok(placement)
    }
}
