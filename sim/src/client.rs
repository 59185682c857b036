//! The simulated client: the writes it submitted, what each primary owes it, and what it saw
//! complete. A write is named by its id (its index in [`Client::writes`]); a record by its
//! (seq, term): one term's seqs are assigned once, by one primary incarnation.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::net::NodeName;

/// A write the client submitted.
pub(crate) struct Write {
    pub offset: u64,
    pub data: Bytes,
}

/// A ticket a primary has not answered yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub seq: u64,
    pub term: u64,
    pub id: usize,
}

/// A write the client saw complete: which, and from which node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub id: usize,
    pub node: NodeName,
}

#[derive(Default)]
pub(crate) struct Client {
    pub writes: Vec<Write>,
    /// Tickets of each node's current primary incarnation awaiting an answer: ticket ->
    /// pending write. Two nodes may both be primaries (a split brain): the client writes to
    /// whichever takes writes.
    pub pending: [BTreeMap<u64, Pending>; 2],
    /// The next ticket of each node (one per call, from 1 at each start of the node).
    pub next_ticket: [u64; 2],
    /// Every write ever given a seq: (seq, term) -> id.
    pub assigned: BTreeMap<(u64, u64), usize>,
    /// Records whose completion the client saw.
    pub completed: BTreeMap<(u64, u64), Completion>,
    /// Records submitted while their primary was not synchronous (degraded writes under
    /// `continue`): applied without an ack by design, even when a recovery that completes in
    /// the same batch has already cleared the primary's `degraded` flag.
    pub degraded: BTreeSet<(u64, u64)>,
    /// The fencing canary's broken driver: a node it still takes for the primary of this term
    /// although the core fenced it.
    pub canary_believed_term: [Option<u64>; 2],
}

impl Client {
    pub fn new() -> Client {
        Client {
            next_ticket: [1, 1],
            ..Client::default()
        }
    }

    /// The bytes write `id` covers, as a range of the region.
    pub fn range_of(&self, id: usize) -> std::ops::Range<usize> {
        let w = &self.writes[id];
        w.offset as usize..w.offset as usize + w.data.len()
    }
}

/// The unique bytes of write `id`.
pub(crate) fn payload(id: usize, len: usize) -> Bytes {
    let mut state = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
