//! `first_write_without_room` predicts exactly which append of a batch would fail for want of
//! room, from any ring position: a backup relies on it to take only writes that fit.

use proptest::prelude::*;

use super::{new_queue, offset_for, payload};
use crate::StorageError;

/// An item a backup may find among incoming messages.
#[derive(Clone, Debug)]
enum Incoming {
    /// The next write in sequence, with this payload length.
    Next(usize),
    /// A write the queue already holds (a duplicate): appends nothing.
    Duplicate,
    /// A write after a gap: refused by the core, appends nothing.
    AfterGap(usize),
    /// Not a write.
    Other,
}

fn incoming() -> impl Strategy<Value = Incoming> {
    prop_oneof![
        6 => (1usize..=968).prop_map(Incoming::Next),
        3 => (1usize..=40).prop_map(Incoming::Next),
        1 => Just(Incoming::Duplicate),
        1 => (1usize..=968).prop_map(Incoming::AfterGap),
        1 => Just(Incoming::Other),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_prediction_matches_the_first_append_that_fails(
        // Fill and trim first, so that the ring's head and tail sit anywhere on the lap.
        warmup in proptest::collection::vec((1usize..=968, 0u64..4), 0..40),
        batch in proptest::collection::vec(incoming(), 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _path) = new_queue(dir.path(), 4096);
        for (len, keep) in warmup {
            let seq = q.last_seq() + 1;
            if q.append(seq, 1, offset_for(seq), &payload(seq, len, 0)).is_err() {
                let last = q.last_seq();
                q.trim_through(last.saturating_sub(keep)).unwrap();
            }
        }
        let items: Vec<Option<(u64, usize)>> = {
            let mut next = q.last_seq() + 1;
            batch
                .iter()
                .map(|i| match *i {
                    Incoming::Next(len) => {
                        next += 1;
                        Some((next - 1, len))
                    }
                    Incoming::Duplicate => Some((next.saturating_sub(1).max(1), 500)),
                    Incoming::AfterGap(len) => Some((next + 1, len)),
                    Incoming::Other => None,
                })
                .collect()
        };
        let predicted = q.first_write_without_room(items.iter().copied());
        // Append what the core would append, in order, until one fails.
        let mut failed_at = None;
        for (at, item) in items.iter().enumerate() {
            let Some((seq, len)) = *item else { continue };
            if seq != q.last_seq() + 1 {
                continue;
            }
            match q.append(seq, 1, offset_for(seq), &payload(seq, len, 1)) {
                Ok(()) => {}
                Err(StorageError::Full { .. }) => {
                    failed_at = Some(at);
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        prop_assert_eq!(predicted, failed_at);
    }
}
