//! Barriers: what becomes durable when, and in what order.
//!
//! `sync` and the barrier under it (per durability mode, over the ranges written since the last
//! one), the bookkeeping a barrier updates (`flushed_upto`, the durable `scan_start` and trim
//! point, the history pruned below it), the advancement of `scan_start` that lets appends
//! overwrite an old lap, metadata slot writes (each slot durable before the other may be
//! overwritten), and the crash hook's events. Kept in one file because every crash-safety
//! argument of `docs/FORMAT.md` comes down to "this is durable before that is stored", and
//! these are the functions that make it so.

use std::sync::atomic::Ordering;

#[cfg(any(test, feature = "crash-hooks"))]
use super::CrashEvent;
use super::{PersistentQueue, DATA_OFF};
use crate::format::{Meta, CURSOR_LINE, META_SLOT_BYTES, META_SLOT_OFF, OFF_SCAN_START};
use crate::map;
use crate::{Durability, StorageError};

impl PersistentQueue {
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
    pub(super) fn make_room_durable(&mut self, new_end: u64) -> Result<(), StorageError> {
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

    /// Writes the other metadata slot with `m` (generation + 1, and its history without the
    /// entries below the durable trim point) and makes it durable.
    pub(super) fn write_meta(&mut self, mut m: Meta) -> Result<(), StorageError> {
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
        m.history.forget_before(self.history_prune_point());
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

    /// Where the term history may be pruned: below the durable trim point, but never past the
    /// history floor (the seqs a dirty-chunk bitmap stands for, which a resync compares).
    fn history_prune_point(&self) -> u64 {
        match self.history_floor {
            0 => self.trimmed_through_durable,
            floor => self.trimmed_through_durable.min(floor - 1),
        }
    }

    /// Test hook: a store just happened (the crash simulation snapshots here).
    #[inline]
    pub(super) fn stored(&mut self) {
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
    pub(super) fn barrier(&mut self) -> Result<(), StorageError> {
        // A run's records are part of what the barrier makes durable (`flushed_upto` below).
        self.write_run()?;
        if self.cursors_pending && (self.header_dirty || self.meta_dirty) {
            // The header page is written by this barrier anyway: the hints ride along.
            self.publish_cursors();
        }
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
        let prune = self.history_prune_point();
        self.meta.history.forget_before(prune);
        self.header_dirty = false;
        self.meta_dirty = false;
        Ok(())
    }
}
