//! Recovery: what opening a queue concludes from the file, and what a restarting node takes from
//! it.
//!
//! The scan from `scan_start` verifies every record (magic, position, length, crc, epoch, seq
//! continuity, term against the history) and stops at the first that fails; `conclude` weighs
//! it against the header words (where the numbering continues, how much of the tail is cut);
//! `PersistentQueue::open_locked` builds the queue from both and durably starts a new epoch
//! (with a RESET record when durable trims went past the log); `replay_state` hands the
//! unapplied records to the node. Kept apart because this is the code that trusts the file
//! least (the argument is in `docs/FORMAT.md`, "Recovery"), and because `inspect_queue` runs
//! the same `scan` and `conclude`, so that `mirror status` reports exactly what a recovery
//! would keep.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

use mirror_proto::TermHistory;

use super::{limits_of, read_meta, read_static, PersistentQueue, QueueParams, DATA_OFF};
use crate::format::{
    check_header, header_crc_start, stored_crc, Kind, Limits, Meta, HDR, HEADER_BYTES,
    OFF_HISTORY_FLOOR, OFF_SCAN_START, OFF_TAIL, OFF_TRIMMED_THROUGH, RECORD_HEADER_BYTES,
};
use crate::map::Mapping;
use crate::{CutReason, Durability, StorageError};

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
    /// See [`PersistentQueue::alone_from`].
    pub alone_from: u64,
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
pub(super) struct Scan {
    /// Position after the last accepted record.
    pub(super) end: u64,
    /// Seq the next DATA record must carry according to the log (None: no record accepted).
    log_next: Option<u64>,
    last_rec_pos: Option<u64>,
    /// First live DATA record (seq > trimmed_through), or `end`.
    pub(super) head: u64,
    pub(super) live_records: u64,
    pub(super) first_live_seq: Option<u64>,
    /// Why the record at `end` was refused (None: stopped at the one-lap bound).
    stop: Option<CutReason>,
}

/// Scans the ring from `scan_start`, verifying each record; stops at the first that fails.
/// Reads with raw copies, so it is also safe on a live queue written by another process (a
/// record overwritten mid-read fails its crc). Bounded: never looks past one lap.
pub(super) fn scan(
    map: &Mapping,
    lim: &Limits,
    scan_start: u64,
    trimmed_through: u64,
    meta: &Meta,
) -> Scan {
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
pub(super) struct Conclusion {
    pub(super) next_seq: u64,
    pub(super) needs_marker: bool,
    pub(super) cut: u64,
    pub(super) cut_reason: Option<CutReason>,
}

pub(super) fn conclude(
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
pub(super) fn check_scan_start(path: &Path, scan_start: u64) -> Result<(), StorageError> {
    if !scan_start.is_multiple_of(8) || scan_start > u64::MAX / 2 {
        return Err(StorageError::CorruptHeader {
            path: path.to_path_buf(),
            why: format!("scan_start word {scan_start} is not a valid ring position"),
        });
    }
    Ok(())
}

impl PersistentQueue {
    /// Recovers the queue in the locked `file`, after checking it against `expect` (if given).
    /// `before_barrier` runs on the recovered queue before the first thing recovery writes (the
    /// new epoch and its barrier), so that a crash hook installed there sees that barrier too.
    pub(super) fn open_locked(
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
            Self::check_expected(path, &stat, params)?;
        }
        // Acquire on the cursor words: pairs with this queue's own Release stores in an
        // earlier session of this process; across a crash the values simply are what the file
        // holds. Recovery never trusts head/tail/next_seq beyond reporting.
        let scan_start = map.word(OFF_SCAN_START).load(Ordering::Acquire);
        let trimmed_through = map.word(OFF_TRIMMED_THROUGH).load(Ordering::Acquire);
        let tail_hint = map.word(OFF_TAIL).load(Ordering::Acquire);
        let history_floor = map.word(OFF_HISTORY_FLOOR).load(Ordering::Acquire);
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
            cursors_pending: false,
            run: Default::default(),
            head: s.head,
            tail: s.end,
            next_seq: s.log_next.unwrap_or(c.next_seq),
            len_records: s.live_records,
            trimmed_through,
            // After a process crash the word read may not be on the media yet.
            trimmed_through_durable: 0,
            history_floor,
            scan_start,
            scan_start_durable: scan_start,
            last_rec_pos: s.last_rec_pos,
            // Everything scanned is re-flushed by the first barrier: in Power/Pmem mode it may
            // still sit in the page cache / CPU cache after a process crash.
            flushed_upto: scan_start,
            warmed_to: 0,
            last_record_bytes: 0,
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
            q.write_record(Kind::Reset, c.next_seq, 0, 0, &[], 0)?;
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
        self.write_run()?;
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
            alone_from: self.alone_from(),
        })
    }
}
