//! Tests that cross modules or need crate internals (the barrier hook, the mapping).
//! Named for the scenario they check.

mod adopt;
mod bitmap;
mod crash;
mod model;
mod queue_api;
mod region_api;
mod room;
mod runs;
mod terms;
mod torn;
mod truncate;
mod wrap;

use std::path::{Path, PathBuf};

use crate::{Durability, PersistentQueue, QueueParams, Role};

pub(crate) const REGION: u64 = 1 << 20;

pub(crate) fn params(capacity_bytes: u64) -> QueueParams {
    QueueParams {
        node_id: 11,
        role: Role::Primary,
        region_size: REGION,
        capacity_bytes,
    }
}

/// Deterministic payload for `seq`, with a `salt` so that the same seq written in another
/// timeline (after a crash) has different bytes.
pub(crate) fn payload(seq: u64, len: usize, salt: u64) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ len as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Region offset used for `seq` (keeps records in range of `REGION`).
pub(crate) fn offset_for(seq: u64) -> u64 {
    (seq * 4096) % (REGION / 2)
}

/// All live records as (seq, term) pairs, panicking on a verification error.
pub(crate) fn terms(q: &PersistentQueue) -> Vec<(u64, u64)> {
    q.iter_from(0)
        .map(|r| {
            let r = r.expect("live record fails verification");
            (r.seq, r.term)
        })
        .collect()
}

/// All live records as owned tuples, panicking on a verification error.
pub(crate) fn records(q: &PersistentQueue) -> Vec<(u64, u64, Vec<u8>)> {
    q.iter_from(0)
        .map(|r| {
            let r = r.expect("live record fails verification");
            (r.seq, r.offset, r.payload.to_vec())
        })
        .collect()
}

pub(crate) fn new_queue(dir: &Path, capacity: u64) -> (PersistentQueue, PathBuf) {
    let path = dir.join("q");
    let q = PersistentQueue::create(&path, &params(capacity), Durability::Process).unwrap();
    (q, path)
}

/// Appends `seq = next_seq()` with a payload of `len` bytes, in the log's last term (term 1 for
/// the first record).
pub(crate) fn push(q: &mut PersistentQueue, len: usize, salt: u64) -> u64 {
    let term = q.term_history().last_term().max(1);
    push_term(q, term, len, salt)
}

/// Appends `seq = next_seq()` of `term` with a payload of `len` bytes.
pub(crate) fn push_term(q: &mut PersistentQueue, term: u64, len: usize, salt: u64) -> u64 {
    let seq = q.next_seq();
    q.append(seq, term, offset_for(seq), &payload(seq, len, salt))
        .unwrap();
    seq
}

/// A term history from `(term, first_seq)` pairs.
pub(crate) fn history(entries: &[(u64, u64)]) -> mirror_proto::TermHistory {
    mirror_proto::TermHistory::from_entries(
        entries
            .iter()
            .map(|&(term, first_seq)| mirror_proto::TermEntry { term, first_seq })
            .collect(),
    )
    .unwrap()
}

/// Simple xorshift PRNG for tests that need many cheap random choices from one seed.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
