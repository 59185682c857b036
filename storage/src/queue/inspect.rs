//! Inspect: a read-only view of a queue file, for `mirror status`.
//!
//! [`inspect_queue`] maps the file read-only, takes no lock and never writes, so it works on a
//! queue a running node has open, and it validates everything it reads so that garbage cannot
//! make it panic. Kept apart from recovery because of those constraints (it may race a live
//! writer), while it reuses recovery's `scan` and `conclude` so that it reports what a recovery
//! would conclude right now.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

use mirror_proto::TermHistory;

use super::recovery::{check_scan_start, conclude, scan};
use super::{limits_of, read_meta, read_static};
use crate::format::{
    self, HEADER_BYTES, OFF_HEAD, OFF_NEXT_SEQ, OFF_SCAN_START, OFF_TAIL, OFF_TRIMMED_THROUGH,
};
use crate::map::{self, Mapping};
use crate::{CutReason, Role, StorageError};

/// Read-only view of a queue file, from [`inspect_queue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// Format version in the file.
    pub format_version: u32,
    /// Owner node id.
    pub node_id: u64,
    /// Owner's role (from the current metadata slot).
    pub role: Role,
    /// Superseded as a primary (fenced) and not promoted since.
    pub superseded: bool,
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
    /// The first seq the owner completed as a primary without its peer (0: none).
    pub alone_from: u64,
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
        superseded: meta.superseded,
        region_size: stat.region_size,
        capacity_bytes: stat.capacity,
        peer_node_id: meta.peer_node_id,
        applied_through: meta.applied_through,
        epoch: meta.epoch,
        current_term: meta.current_term,
        alone_from: if meta.alone_from > c.next_seq - 1 {
            0
        } else {
            meta.alone_from
        },
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
