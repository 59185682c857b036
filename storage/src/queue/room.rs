//! Room rules: whether a record fits in the ring, and where it goes.
//!
//! [`RoomCheck`] places records exactly as `append` does (the lap-end skip, the fit, an empty
//! ring's head moving along), and the admission rules are built on it: a primary's
//! `admits_new_write` (a quarter of the ring kept free) and a backup's
//! `first_write_without_room` (a dry run of a batch of incoming writes). Kept in one file
//! because `append`, the primary, the backup and the simulator must agree on these exactly: a
//! backup that predicted room an append then lacks would break the protocol.

use super::PersistentQueue;
use crate::format::record_total;
use crate::StorageError;

impl PersistentQueue {
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

    /// A dry run of appends from the ring's current positions.
    pub(super) fn room_check(&self) -> RoomCheck {
        RoomCheck {
            capacity: self.cap(),
            head: self.head,
            tail: self.tail,
        }
    }
}

/// Where a record goes when appended at ring position `tail`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    /// Bytes skipped to the end of the lap first (0 unless the record would cross it).
    pub(super) skip: u64,
    /// The record's own size in the ring.
    pub(super) total: u64,
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
pub(super) struct RoomCheck {
    capacity: u64,
    pub(super) head: u64,
    pub(super) tail: u64,
}

impl RoomCheck {
    /// Takes the room of one more record with `payload_len` bytes after those already taken:
    /// where it goes, or `Full` when it does not fit.
    pub(super) fn take(&mut self, payload_len: usize) -> Result<Placement, StorageError> {
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
