//! Live operations: what the node does to an open queue.
//!
//! Appending (with the history entry a new term needs first), trimming, `reset_to`,
//! `truncate_after` and its crash-ordered steps, the metadata setters (role, term, peer,
//! applied watermark), and reading records back (`iter_from`, [`Records`]); `write_record` is
//! the one place a record is put into the ring (recovery's RESET marker goes through it too).
//! Kept apart from the rules these operations rely on: what becomes durable when is in
//! `barriers.rs`, whether a record fits and where is in `room.rs`, so that each operation here
//! reads as its sequence of steps.

use std::fmt;
use std::sync::atomic::Ordering;

use super::room::Placement;
use super::{PersistentQueue, DATA_OFF, WARM_AHEAD_MAX, WARM_AHEAD_MIN};
use crate::format::{
    check_header, header_crc_start, max_record_bytes, seal, stored_crc, Kind, Meta, RecHeader, HDR,
    OFF_HISTORY_FLOOR, OFF_TRIMMED_THROUGH, RECORD_HEADER_BYTES,
};
use crate::map;
use crate::{CutReason, Durability, Role, StorageError};
use mirror_proto::TermHistory;

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
    /// The crc32c of `payload` (computed while the record was verified; a sender reuses it).
    pub payload_crc: u32,
}

impl PersistentQueue {
    /// Changes this node's role (a failover) and its superseded mark: set when a primary
    /// learns of a newer primary (fenced), cleared when it is promoted again. A node with the
    /// mark must not take writes as a primary (reopened as one, it is refused; as a backup it
    /// rejoins). Durable per mode before returning.
    pub fn set_role(&mut self, role: Role, superseded: bool) -> Result<(), StorageError> {
        if role == self.meta.role && superseded == self.meta.superseded {
            return Ok(());
        }
        self.write_meta(Meta {
            role,
            superseded,
            ..self.meta.clone()
        })
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

    /// Records where this node began completing writes without its peer (0: clears it). Durable
    /// per mode before returning (before the completion it guards).
    pub fn set_alone_from(&mut self, seq: u64) -> Result<(), StorageError> {
        if seq == self.meta.alone_from {
            return Ok(());
        }
        self.write_meta(Meta {
            alone_from: seq,
            ..self.meta.clone()
        })
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

    /// Appends a record of `term`. `seq` must equal [`next_seq`](Self::next_seq); `payload`
    /// must be `1..=max_payload()` bytes and `offset..offset+len` must lie inside the region;
    /// `term` must be allowed by the term history
    /// ([`TermHistory::check_append`](mirror_proto::TermHistory::check_append): not 0, not
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
        self.append_with_crc(
            seq,
            term,
            offset,
            payload,
            mirror_proto::crc::crc32c(payload),
        )
    }

    /// [`append`](Self::append) of a payload whose crc32c the caller has (a frame's, verified):
    /// the record's crc combines it with the header's instead of reading the payload again. A
    /// wrong `payload_crc` makes a record that recovery cuts as damaged.
    pub fn append_with_crc(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        payload: &[u8],
        payload_crc: u32,
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
        let written = self.write_record(Kind::Data, seq, term, offset, payload, payload_crc);
        if written.is_err() && starts_term {
            // The room was checked, so a barrier failed: the new entry covers no record.
            // Recovery drops it from the durable history the same way.
            self.meta.history.truncate_after(self.last_seq());
        }
        written?;
        self.next_seq += 1;
        self.len_records += 1;
        self.cursors_moved();
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
            .is_none_or(|end| end > self.stat.region_size)
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

    /// Drops every record with seq `<= seq` (a no-op for seqs already gone; values beyond
    /// `last_seq()` are clamped to it).
    ///
    /// Lazy: the new trim point reaches the media with the next barrier (or earlier, by
    /// write-back). A crash before that may bring trimmed records back after recovery; the
    /// engine replays them, which is idempotent because a record is a plain "write these bytes
    /// at this offset" and its successors are replayed after it, in order.
    pub fn trim_through(&mut self, seq: u64) -> Result<(), StorageError> {
        self.write_run()?;
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
            self.write_record(Kind::Reset, next_seq, 0, 0, &[], 0)?;
            self.head = self.tail;
            self.next_seq = next_seq;
        }
        self.header_dirty = true;
        self.publish_cursors();
        // 3. durable before returning.
        self.barrier()
    }

    /// Keeps the term history's entries from the one covering `floor - 1` on, whatever the
    /// trim point (0: no floor). A node that folds records into its dirty-chunk bitmap sets it
    /// to the first folded seq before trimming them: a resync later compares the backup's last
    /// seq (at or after `floor - 1`) with this history. Durable before returning; a crash
    /// keeps this value or the one before, and a lower (older) floor only keeps more.
    pub fn set_history_floor(&mut self, floor: u64) -> Result<(), StorageError> {
        if floor == self.history_floor {
            return Ok(());
        }
        self.history_floor = floor;
        // Release: an observer that sees the trim it guards sees it too (the barrier orders
        // it before the trim on the media).
        self.map
            .word(OFF_HISTORY_FLOOR)
            .store(floor, Ordering::Release);
        self.stored();
        self.header_dirty = true;
        self.barrier()
    }

    /// The history floor (see [`PersistentQueue::set_history_floor`]; 0: none).
    pub fn history_floor(&self) -> u64 {
        self.history_floor
    }

    /// Continues the log after `through` with `history` (the log a resync or a catch-up
    /// brought over: the region holds everything through `through`, and the records after it
    /// will follow): the records held go, the next append carries `through + 1`, and
    /// `applied_through` becomes `through`. `history` must agree with this queue's through its
    /// last seq (a resync starts from where the two logs agree). Durable per mode before
    /// returning, and crash-safe at every step: the history is written first, unless it names
    /// no term after the last seq (recovery cuts whatever it says past the log it finds),
    /// then the records are dropped and the numbering moved
    /// (`reset_to`), then `applied_through` recorded (a queue left empty holds nothing to
    /// apply, which the reader of a replay state takes as applied through its last seq).
    /// Refused with [`StorageError::ResetBackwards`] when `through` is below the last seq.
    pub fn adopt_log(&mut self, through: u64, history: TermHistory) -> Result<(), StorageError> {
        if through < self.last_seq() {
            return Err(StorageError::ResetBackwards {
                current: self.next_seq,
                requested: through.saturating_add(1),
            });
        }
        let current_term = self.meta.current_term.max(history.last_term());
        // A catch-up adopts in the term the log already ends with, batch after batch: when
        // `history` names no term after our last seq (it agrees with ours through it), the
        // durable history already gives every adopted seq its term, and the slot is not
        // rewritten (a barrier saved per adopt).
        let new_terms = history
            .entries()
            .iter()
            .any(|e| e.first_seq > self.last_seq());
        if new_terms || current_term != self.meta.current_term {
            self.write_meta(Meta {
                history,
                current_term,
                ..self.meta.clone()
            })?;
        }
        self.reset_to(through + 1)?;
        self.set_applied_through(through)
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
        self.write_run()?;
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

    /// Payload bytes of the live records with seq in `from..=through`, from their headers
    /// alone (no body is read or checksummed: for reports, such as what a catch-up will move).
    /// A header that does not validate ends the count there.
    pub fn payload_bytes(&self, from: u64, through: u64) -> u64 {
        let mut pos = self.head;
        let mut bytes = 0;
        while pos < self.tail {
            let Ok((at, h)) = self.record_at(pos) else {
                break;
            };
            pos = at + h.total();
            if h.kind != Kind::Data || h.seq < from {
                continue;
            }
            if h.seq > through {
                break;
            }
            bytes += u64::from(h.payload_len);
        }
        bytes
    }

    /// Header of the record at or after `pos` (skipping an implicit wrap), validated but crc
    /// unchecked. Only used between scan_start and tail, where every record was written or
    /// verified by this handle and nothing is overwritten; a failure there means the mapping
    /// was modified behind our back.
    fn record_at(&self, pos: u64) -> Result<(u64, RecHeader), StorageError> {
        debug_assert!(
            !self.run_holds_records(),
            "the ring is read while a run of appends holds records not written yet"
        );
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

    /// Verifies the crc of the DATA record at `pos` and returns its payload and the payload's
    /// crc (computed on its own and combined into the record's: one pass either way).
    fn verified_body(&self, pos: u64, h: &RecHeader) -> Result<(&[u8], u32), StorageError> {
        let off = DATA_OFF + (pos % self.cap()) as usize;
        let rec = self.map.bytes(off, h.total() as usize);
        let mut hb = [0u8; HDR];
        hb.copy_from_slice(&rec[..HDR]);
        let body_len = h.crc_body_len() as usize;
        let payload = &rec[HDR..HDR + h.payload_len as usize];
        let payload_crc = mirror_proto::crc::crc32c(payload);
        let mut crc =
            mirror_proto::crc::crc32c_append_known(header_crc_start(&hb), payload, payload_crc);
        crc = mirror_proto::crc::crc32c_append(crc, &rec[HDR + payload.len()..HDR + body_len]);
        if crc != stored_crc(&hb) {
            return Err(StorageError::CorruptRecord {
                path: self.path.clone(),
                at: pos % self.cap(),
                why: CutReason::Checksum.to_string(),
            });
        }
        Ok((payload, payload_crc))
    }

    /// Prefetches the ring past the tail (what an earlier call has not), for a node with
    /// nothing else to do: as far as the last record took, at least [`WARM_AHEAD_MIN`] and at
    /// most [`WARM_AHEAD_MAX`]. A ring larger than the caches has long lost the lines its next
    /// records land on, and a record that lands in warmed lines is copied into them (see
    /// `put_record`) instead of streamed past the cache. A synchronous write's ack waits for
    /// its backup's append; this takes the cold lines off that path. Under `power` records go
    /// through the file, not the mapping, and nothing is warmed.
    pub fn warm_ahead(&mut self) {
        if self.durability == Durability::Power {
            return;
        }
        let cap = self.cap();
        let ahead = self.last_record_bytes.clamp(WARM_AHEAD_MIN, WARM_AHEAD_MAX);
        let to = self.tail + ahead.min(cap);
        let mut from = self.tail.max(self.warmed_to);
        while from < to {
            let at = from % cap;
            let n = (to - from).min(cap - at);
            self.map.prefetch(DATA_OFF + at as usize, n as usize);
            from += n;
        }
        self.warmed_to = self.warmed_to.max(to);
    }

    /// The ring's lines below this virtual position were warmed ([`Self::warm_ahead`]).
    #[cfg(test)]
    pub(crate) fn warmed_to(&self) -> u64 {
        self.warmed_to
    }

    /// Writes one record (preceded by a wrap pad if it does not fit before the end of the
    /// ring) at the tail. Does not touch `next_seq` or `len_records`.
    pub(super) fn write_record(
        &mut self,
        kind: Kind,
        seq: u64,
        term: u64,
        region_offset: u64,
        payload: &[u8],
        payload_crc: u32,
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
            self.put_record(&pad, &[], 0)?;
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
        self.put_record(&h, payload, payload_crc)?;
        self.last_rec_pos = Some(self.tail);
        self.tail += total;
        self.last_record_bytes = total;
        self.header_dirty = true;
        Ok(())
    }

    /// Encodes a record into the ring at `h.vpos`. Through the mapping: body (payload + zero
    /// padding) first, then the header with the crc. Under `power`: header, body and padding in
    /// one write to the file, not through the mapping (see [`map::write_file_at`]), or into the
    /// open run of appends, written with its neighbours (`run.rs`); a crash inside the write
    /// leaves a record whose crc fails, which recovery cuts as a torn tail.
    /// `payload_crc` is the payload's crc32c (combined into the record's: no second pass).
    fn put_record(
        &mut self,
        h: &RecHeader,
        payload: &[u8],
        payload_crc: u32,
    ) -> Result<(), StorageError> {
        const ZEROS: [u8; 8] = [0; 8];
        let cap = self.cap();
        let off = DATA_OFF + (h.vpos % cap) as usize;
        let mut hb = h.encode();
        let mut crc = header_crc_start(&hb);
        let body_len = h.crc_body_len() as usize;
        let pad = body_len.saturating_sub(payload.len());
        debug_assert!(pad < 8);
        if body_len > 0 {
            debug_assert_eq!(
                payload_crc,
                mirror_proto::crc::crc32c(payload),
                "wrong payload crc"
            );
            crc = mirror_proto::crc::crc32c_append_known(crc, payload, payload_crc);
            crc = mirror_proto::crc::crc32c_append(crc, &ZEROS[..pad]);
        }
        seal(&mut hb, crc);
        let body: &[u8] = if body_len > 0 { payload } else { &[] };
        let pieces = [&hb[..], body, &ZEROS[..pad]];
        if self.stage_in_run(off as u64, &pieces)? {
            // Stored when the run is written (`run.rs`).
            return Ok(());
        }
        if self.durability == Durability::Power {
            map::write_file_at(&self.file, off as u64, &pieces, &self.path)?;
        } else {
            if body_len > 0 {
                // From `STREAM_MIN` bytes the payload streams past the cache, as a region write
                // does: the ring is larger than the cache and its lines are written once per lap,
                // so an ordinary copy would first read each line it overwrites whole, and the
                // record is read back only by a catch-up or a replay, long after. The streamed
                // stores are ordered before the header's below (write_raw ends with a fence).
                // Unless an idle node warmed the lines (`warm_ahead`): then a copy into the
                // cache is the faster one, and ordered before the header's stores as any is.
                let warmed = h.vpos + (HDR + payload.len()) as u64 <= self.warmed_to;
                let stream = payload.len() >= map::STREAM_MIN && !warmed;
                self.map.write_raw_as(off + HDR, payload, stream);
                self.map.write_raw(off + HDR + payload.len(), &ZEROS[..pad]);
            }
            self.map.bytes_mut(off, HDR).copy_from_slice(&hb);
        }
        self.stored();
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
                Ok((payload, payload_crc)) => Some(Ok(RecordRef {
                    seq: h.seq,
                    term: h.term,
                    offset: h.region_offset,
                    payload,
                    payload_crc,
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
