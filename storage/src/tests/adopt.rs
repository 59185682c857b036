//! What a resync needs of the queue: `adopt_log` (a backup's log continues after the seqs a
//! resync brought over as chunks) and the history floor (a primary that folded records keeps
//! their terms, against which the returning backup's log is matched).

use super::{history, new_queue, push_term, records};
use crate::{Durability, PersistentQueue, StorageError};

fn reopen(path: &std::path::Path) -> PersistentQueue {
    let (q, rep) = PersistentQueue::open(path, Durability::Process).unwrap();
    assert_eq!(rep.torn_tail_cut_bytes, 0, "{rep:?}");
    q
}

#[test]
fn adopt_log_continues_after_the_resynced_seqs_with_the_primarys_history() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..5 {
        push_term(&mut q, 1, 40, 0);
    }
    q.set_applied_through(5).unwrap();
    let primary = history(&[(1, 1), (2, 9)]);
    q.adopt_log(20, primary.clone()).unwrap();
    let check = |q: &PersistentQueue| {
        assert_eq!((q.next_seq(), q.last_seq(), q.first_seq()), (21, 20, None));
        assert_eq!(q.applied_through(), 20);
        // What lies below the new trim point is forgotten, as after any trim: the entry
        // covering `through` is what the next handshake compares.
        assert_eq!(*q.term_history(), history(&[(2, 9)]));
        assert_eq!(q.term_history().term_at(20), primary.term_at(20));
        assert!(q.current_term() >= 2);
    };
    check(&q);
    drop(q);
    let mut q = reopen(&path);
    check(&q);
    // The primary's records after the resync follow, in its term.
    push_term(&mut q, 2, 40, 1);
    drop(q);
    let q = reopen(&path);
    assert_eq!(
        records(&q).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![21]
    );
    assert_eq!(q.term_history().term_at(21), Some(2));
}

#[test]
fn adopts_in_the_term_the_log_ends_with_keep_every_adopted_seqs_term_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for term in [1, 2, 2] {
        push_term(&mut q, term, 40, 0);
    }
    q.set_applied_through(3).unwrap();
    // Catch-up batches, one adopt each, all in term 2 (as a backup's records would carry).
    let ours = q.term_history().clone();
    for through in [10, 17, 30] {
        q.adopt_log(through, ours.clone()).unwrap();
        assert_eq!((q.last_seq(), q.applied_through()), (through, through));
    }
    // Reopened: empty, applied through `through`, which has `term` (the current term too).
    let reopened = |through: u64, term: u64| {
        let q = reopen(&path);
        assert_eq!(
            (q.next_seq(), q.first_seq(), q.applied_through()),
            (through + 1, None, through)
        );
        assert_eq!(q.term_history().term_at(through), Some(term));
        assert_eq!(q.current_term(), term);
        q
    };
    drop(q);
    let mut q = reopened(30, 2);
    // Then a batch whose last records begin term 5.
    let mut newer = q.term_history().clone();
    newer.note_append(31, 5).unwrap();
    q.adopt_log(40, newer).unwrap();
    drop(q);
    let mut q = reopened(40, 5);
    // And the next append continues the log in that term.
    push_term(&mut q, 5, 40, 1);
    drop(q);
    let q = reopen(&path);
    assert_eq!(
        records(&q).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![41]
    );
}

#[test]
fn adopt_log_below_the_last_seq_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _path) = new_queue(dir.path(), 8192);
    for _ in 0..5 {
        push_term(&mut q, 1, 40, 0);
    }
    assert!(matches!(
        q.adopt_log(3, history(&[(1, 1)])),
        Err(StorageError::ResetBackwards { .. })
    ));
    assert_eq!(q.last_seq(), 5, "nothing changed");
}

#[test]
fn the_history_floor_keeps_the_terms_of_folded_seqs_across_trims_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for term in [1, 1, 2, 2, 3, 3] {
        push_term(&mut q, term, 40, 0);
    }
    q.set_applied_through(6).unwrap();
    // Folded from seq 2 on: the entry covering seq 1 (a backup holding through it) stays.
    q.set_history_floor(2).unwrap();
    q.trim_through(6).unwrap();
    q.set_applied_through(6).unwrap();
    assert_eq!(*q.term_history(), history(&[(1, 1), (2, 3), (3, 5)]));
    drop(q);
    let mut q = reopen(&path);
    assert_eq!(q.history_floor(), 2);
    assert_eq!(*q.term_history(), history(&[(1, 1), (2, 3), (3, 5)]));
    // Without the floor, trimmed history is forgotten as before.
    q.set_history_floor(0).unwrap();
    q.set_applied_through(6).unwrap();
    assert_eq!(*q.term_history(), history(&[(3, 5)]));
}
