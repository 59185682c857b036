//! Append runs: under `power`, the records of a run of appends reach the file together.
//!
//! A record written by itself is one `pwritev` into the page cache: 2 to 3 µs of system call
//! and page-cache work per 4 KiB record on the development VM (ext4, 64 records per
//! `fdatasync`: 178-182 k records/s written one `pwritev` each, 295-323 k/s written with one
//! `pwrite` per 64). A node appends a batch at a time (a pass's submissions, a received batch)
//! and then syncs, so a batch can reach the file as one write. Between
//! [`begin_append_run`](PersistentQueue::begin_append_run) and
//! [`end_append_run`](PersistentQueue::end_append_run) the queue copies each record of at most
//! [`RUN_RECORD_MAX`] bytes into one buffer and writes each contiguous stretch with one
//! `pwrite`: at the run's end, before any barrier, before any operation that reads or rewrites
//! the ring, when the next record does not follow the last (the ring's wrap), when the buffer
//! holds [`RUN_BUFFER_MAX`] bytes, and before a larger record (written by itself, as outside a
//! run: its copy would cost more than the system call it saves).
//!
//! What it changes for a crash: a record of an open run is in this process's memory, not in
//! the page cache, until the run's bytes are written; a process crash loses it with the run.
//! Nothing may rely on such a record before then. Under `power` nothing does (an ack, and a
//! primary's apply, follow a sync, and a barrier writes the run first); the executor
//! (`mirror_exec`) ends a run before any action other than another append or the send of a
//! write, so a run never outlives the batch of actions it belongs to.
//!
//! Other modes write each record straight into the mapping (a copy, no system call): a run
//! changes nothing there, except in the simulator, which stages in every mode
//! ([`PersistentQueue::stage_appends_in_every_mode`]) so that its crashes fall inside runs.

use super::PersistentQueue;
use crate::map;
use crate::{Durability, StorageError};

/// Records larger than this (header and padding included) are written by themselves, even in a
/// run.
pub const RUN_RECORD_MAX: usize = 16 << 10;

/// A run writes what it holds once it holds this many bytes.
pub const RUN_BUFFER_MAX: usize = 1 << 20;

/// The records of the open run not yet in the file (see the module docs).
#[derive(Debug, Default)]
pub(super) struct AppendRun {
    /// Between `begin_append_run` and `end_append_run`, in a mode that stages.
    open: bool,
    /// Stage in every mode, not only under `power`.
    every_mode: bool,
    /// File offset of `bytes[0]`.
    file_off: u64,
    /// Records put since the run's last write, back to back as the ring holds them. Kept
    /// across runs so that its allocation is reused.
    bytes: Vec<u8>,
}

impl PersistentQueue {
    /// Opens a run of appends: under `power`, the records appended until
    /// [`end_append_run`](Self::end_append_run) reach the file in as few writes as the ring's
    /// layout allows, not one each (see the module docs for what that changes on a crash). A
    /// no-op in other modes, and when a run is open.
    #[inline]
    pub fn begin_append_run(&mut self) {
        if self.durability == Durability::Power || self.run.every_mode {
            self.run.open = true;
        }
    }

    /// Writes the open run's records to the file and closes the run. A no-op without one.
    pub fn end_append_run(&mut self) -> Result<(), StorageError> {
        self.run.open = false;
        self.write_run()
    }

    /// Whether a run is open.
    #[inline]
    pub fn append_run_open(&self) -> bool {
        self.run.open
    }

    /// Makes runs stage records in every durability mode (they are written through the file,
    /// not the mapping), so that a test's crashes can fall inside a run whatever the mode.
    #[cfg(any(test, feature = "crash-hooks"))]
    pub fn stage_appends_in_every_mode(&mut self) {
        self.run.every_mode = true;
    }

    /// Takes the record `pieces` (its header, body and padding, `off` its offset in the file)
    /// into the open run. False when the caller must write it itself: no run is open, or the
    /// record is too large to copy (what the run held is written first, to keep the order).
    pub(super) fn stage_in_run(
        &mut self,
        off: u64,
        pieces: &[&[u8]],
    ) -> Result<bool, StorageError> {
        if !self.run.open {
            return Ok(false);
        }
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let follows = self.run.file_off + self.run.bytes.len() as u64 == off;
        if len > RUN_RECORD_MAX || !follows || self.run.bytes.len() + len > RUN_BUFFER_MAX {
            self.write_run()?;
        }
        if len > RUN_RECORD_MAX {
            return Ok(false);
        }
        if self.run.bytes.is_empty() {
            self.run.file_off = off;
        }
        for piece in pieces {
            self.run.bytes.extend_from_slice(piece);
        }
        Ok(true)
    }

    /// Writes what the run holds (one `pwrite`), keeping the run open.
    pub(super) fn write_run(&mut self) -> Result<(), StorageError> {
        if self.run.bytes.is_empty() {
            return Ok(());
        }
        map::write_file_at(
            &self.file,
            self.run.file_off,
            &[&self.run.bytes],
            &self.path,
        )?;
        self.run.bytes.clear();
        self.stored();
        Ok(())
    }

    /// Whether records appended to the run are still only in memory (readers of the ring must
    /// not meet them).
    pub(super) fn run_holds_records(&self) -> bool {
        !self.run.bytes.is_empty()
    }
}
