//! The credit arithmetic of the ring: how many bytes and writes a sender may put into the peer's
//! ring, where they go (the ring offset and the split at its end), when the receiver must report
//! what it consumed, and the check word of that report. Pure code, no verbs: the connection
//! calls it around its posts and polls, and `credit/tests.rs` drives it through a model of two
//! peers with no RDMA device.
//!
//! The rules (docs/ARCHITECTURE.md, "RDMA transport", "Ring and credits"):
//!
//! - A sender may have at most the peer's ring length of unconsumed bytes and the peer's
//!   receive depth of unconsumed writes outstanding, as far as the last credit it accepted says
//!   ([`SendCredits::room`], [`SendCredits::writes_room`]).
//! - It writes the byte stream at `sent_bytes % ring`, never across the end: a write that would
//!   cross it is cut there and the rest goes in the next write, at offset 0
//!   ([`SendCredits::next_write`]).
//! - The receiver reports `{consumed_bytes, consumed_writes}` in front of its own data once
//!   1/[`PIGGYBACK_DIV`] of its ring or of its receive depth is unreported
//!   ([`RecvCredits::piggyback_due`]), and on its own once 1/[`OVERDUE_DIV`] is
//!   ([`RecvCredits::overdue`]). The second rule is the liveness argument: a sender stalls only
//!   when its view of the ring (or of the receives) is full, that is when all of it, so at least
//!   a quarter, is unreported; the receiver then sends a credit on its next poll.
//! - A credit is three little-endian words, the third a check word ([`Credit::decode`]).

use super::RdmaError;

/// A credit rides in front of outgoing data once 1/PIGGYBACK_DIV of the ring or of the receive
/// depth is unreported (on its own at 1/[`OVERDUE_DIV`]).
pub(super) const PIGGYBACK_DIV: u64 = 16;
/// A credit goes out on its own once 1/OVERDUE_DIV of the ring or of the receive depth is
/// unreported (the bound that keeps a sender from stalling forever).
pub(super) const OVERDUE_DIV: u64 = 4;
/// Bytes of a credit record: consumed bytes, consumed writes, check word.
pub(super) const CREDIT_LEN: usize = 24;
/// Mixed into the credit check word, so that a zeroed slot is not a valid record.
const CREDIT_MAGIC: u64 = u64::from_le_bytes(*b"LMRDCRED");

/// What a receiver has consumed: the content of a credit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Credit {
    /// Bytes copied out of the ring (their space is free again).
    pub(super) bytes: u64,
    /// Writes whose receive was re-posted.
    pub(super) writes: u64,
}

impl Credit {
    fn check(bytes: u64, writes: u64) -> u64 {
        bytes ^ writes.rotate_left(32) ^ CREDIT_MAGIC
    }

    /// The record's three words, in slot order: bytes, writes, check.
    pub(super) fn encode(self) -> [u64; 3] {
        [
            self.bytes,
            self.writes,
            Credit::check(self.bytes, self.writes),
        ]
    }

    /// The credit in a slot's three words, or `None` when the check word does not match: a
    /// zeroed slot, or a record torn by a write racing the read (read again later). The rotation
    /// makes a tear between records whose counters differ by less than 2^32 (writes below 2^32)
    /// match only when it equals the record its check word came from: the check then needs
    /// `bytes ^ bytes' == (writes ^ writes').rotate_left(32)`, whose low half forces equal bytes
    /// and then equal writes.
    pub(super) fn decode(words: [u64; 3]) -> Option<Credit> {
        let [bytes, writes, check] = words;
        (check == Credit::check(bytes, writes)).then_some(Credit { bytes, writes })
    }
}

/// One write into the ring: `len` bytes at offset `pos`, never across the ring's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    /// Offset in the ring.
    pub(super) pos: u64,
    /// Bytes (at least 1).
    pub(super) len: u64,
}

/// The sending side of one direction: the peer's ring and receive depth, what we wrote into
/// them, and what the peer's latest accepted credit says it consumed.
#[derive(Debug, Clone)]
pub(super) struct SendCredits {
    /// The peer's ring length (its setup record).
    ring: u64,
    /// The peer's receive depth (its setup record).
    depth: u64,
    sent_bytes: u64,
    sent_writes: u64,
    peer_consumed_bytes: u64,
    peer_consumed_writes: u64,
}

impl SendCredits {
    /// Nothing sent yet into a peer ring of `ring` bytes with `depth` posted receives.
    pub(super) fn new(ring: u64, depth: u64) -> SendCredits {
        SendCredits {
            ring,
            depth,
            sent_bytes: 0,
            sent_writes: 0,
            peer_consumed_bytes: 0,
            peer_consumed_writes: 0,
        }
    }

    /// Takes a credit the peer wrote into our slot. Counters are monotonic: an older record
    /// (read after a newer one) changes nothing; a credit for more than was sent is a peer error.
    pub(super) fn accept(&mut self, c: Credit) -> Result<(), RdmaError> {
        let Credit { bytes, writes } = c;
        if bytes > self.sent_bytes || writes > self.sent_writes {
            return Err(RdmaError::PeerProtocol(format!(
                "credit for {bytes} bytes / {writes} writes, only {} / {} were sent",
                self.sent_bytes, self.sent_writes
            )));
        }
        if bytes >= self.peer_consumed_bytes && writes >= self.peer_consumed_writes {
            self.peer_consumed_bytes = bytes;
            self.peer_consumed_writes = writes;
        }
        Ok(())
    }

    /// Bytes of the peer's ring we may still write (free as far as we know).
    pub(super) fn room(&self) -> u64 {
        self.ring - (self.sent_bytes - self.peer_consumed_bytes)
    }

    /// Writes we may still make (receives the peer has posted as far as we know).
    pub(super) fn writes_room(&self) -> u64 {
        self.depth - (self.sent_writes - self.peer_consumed_writes)
    }

    /// Whether nothing may be written until a newer credit arrives.
    pub(super) fn blocked(&self) -> bool {
        self.room() == 0 || self.writes_room() == 0
    }

    /// Where the next write of at most `left` bytes goes and how long it is (cut at the ring's
    /// end and at the room), or `None` when there is nothing to write or no room.
    pub(super) fn next_write(&self, left: u64) -> Option<Span> {
        let room = self.room();
        if left == 0 || room == 0 || self.writes_room() == 0 {
            return None;
        }
        let pos = self.sent_bytes % self.ring;
        let len = left.min(room).min(self.ring - pos);
        Some(Span { pos, len })
    }

    /// The write [`next_write`](Self::next_write) proposed, of `len` bytes, was made.
    pub(super) fn wrote(&mut self, len: u64) {
        debug_assert!(len >= 1 && len <= self.room() && self.writes_room() >= 1);
        self.sent_bytes += len;
        self.sent_writes += 1;
    }

    /// Bytes written into the peer's ring since the connection started.
    pub(super) fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }
}

/// The receiving side of one direction: our ring and receive depth, what arrived, what we
/// consumed (copied out, receives re-posted) and what we reported.
#[derive(Debug, Clone)]
pub(super) struct RecvCredits {
    /// Our ring length.
    ring: u64,
    /// Our receive depth.
    depth: u64,
    arrived_bytes: u64,
    consumed_bytes: u64,
    consumed_writes: u64,
    reported_bytes: u64,
    reported_writes: u64,
}

impl RecvCredits {
    /// Nothing arrived yet in our ring of `ring` bytes with `depth` posted receives.
    pub(super) fn new(ring: u64, depth: u64) -> RecvCredits {
        RecvCredits {
            ring,
            depth,
            arrived_bytes: 0,
            consumed_bytes: 0,
            consumed_writes: 0,
            reported_bytes: 0,
            reported_writes: 0,
        }
    }

    /// A write of `byte_len` bytes announced by the immediate `imm` arrived; refused when the
    /// two differ, when it is empty, or when it overran unread bytes.
    pub(super) fn arrived(&mut self, imm: u32, byte_len: u32) -> Result<(), RdmaError> {
        if imm != byte_len || imm == 0 {
            return Err(RdmaError::PeerProtocol(format!(
                "write of {byte_len} bytes announced as {imm}"
            )));
        }
        self.arrived_bytes += u64::from(imm);
        if self.arrived_bytes - self.consumed_bytes > self.ring {
            return Err(RdmaError::PeerProtocol(
                "peer overran the receive ring".into(),
            ));
        }
        Ok(())
    }

    /// The next stretch of arrived, unread bytes in the ring (cut at its end), if any.
    pub(super) fn next_chunk(&self) -> Option<Span> {
        if self.consumed_bytes >= self.arrived_bytes {
            return None;
        }
        let pos = self.consumed_bytes % self.ring;
        let len = (self.arrived_bytes - self.consumed_bytes).min(self.ring - pos);
        Some(Span { pos, len })
    }

    /// The chunk [`next_chunk`](Self::next_chunk) proposed, of `len` bytes, was copied out: its
    /// ring space is free.
    pub(super) fn consumed(&mut self, len: u64) {
        debug_assert!(len <= self.arrived_bytes - self.consumed_bytes);
        self.consumed_bytes += len;
    }

    /// `n` receives were re-posted.
    pub(super) fn reposted(&mut self, n: u64) {
        self.consumed_writes += n;
    }

    /// Whether a credit should ride in front of the data we send now (1/[`PIGGYBACK_DIV`]
    /// unreported). Not on every send: on a software device every work request is a packet the
    /// CPUs process.
    pub(super) fn piggyback_due(&self) -> bool {
        self.consumed_bytes - self.reported_bytes >= self.ring / PIGGYBACK_DIV
            || self.consumed_writes - self.reported_writes >= self.depth / PIGGYBACK_DIV
    }

    /// Whether a credit must go out on its own (1/[`OVERDUE_DIV`] unreported): the bound that
    /// keeps the sender from stalling forever.
    pub(super) fn overdue(&self) -> bool {
        self.consumed_bytes - self.reported_bytes >= self.ring / OVERDUE_DIV
            || self.consumed_writes - self.reported_writes >= self.depth / OVERDUE_DIV
    }

    /// The credit to send now; everything consumed counts as reported from here on.
    pub(super) fn report(&mut self) -> Credit {
        self.reported_bytes = self.consumed_bytes;
        self.reported_writes = self.consumed_writes;
        Credit {
            bytes: self.consumed_bytes,
            writes: self.consumed_writes,
        }
    }

    /// Bytes that arrived in our ring since the connection started.
    pub(super) fn arrived_bytes(&self) -> u64 {
        self.arrived_bytes
    }
}

#[cfg(test)]
mod tests;
