//! `truncate_after`: dropping a divergent suffix. Crash safety at every point is checked by the
//! power-loss simulator (`crash.rs`); these tests pin the rules and the layout cases.

use super::{history, new_queue, payload, push, push_term, records, terms};
use crate::format::OFF_TAIL;
use crate::{inspect_queue, CutReason, Durability, PersistentQueue, StorageError};

const DATA: usize = crate::format::HEADER_BYTES as usize;
const HDR: usize = crate::RECORD_HEADER_BYTES as usize;
/// Offsets in a record header.
const REC_EPOCH: usize = 40;
const REC_TERM: usize = 48;

fn reopen(path: &std::path::Path) -> PersistentQueue {
    let (q, rep) = PersistentQueue::open(path, Durability::Process).unwrap();
    assert_eq!(rep.torn_tail_cut_bytes, 0, "{rep:?}");
    q
}

fn seqs(q: &PersistentQueue) -> Vec<u64> {
    records(q).iter().map(|r| r.0).collect()
}

#[test]
fn truncate_after_drops_the_suffix_its_terms_and_what_was_applied_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for term in [1, 1, 1, 2, 2, 2] {
        push_term(&mut q, term, 40, 0);
    }
    q.set_applied_through(5).unwrap();
    let epoch = q.epoch();
    q.truncate_after(3).unwrap();
    assert_eq!(seqs(&q), vec![1, 2, 3]);
    assert_eq!((q.next_seq(), q.last_seq(), q.len_records()), (4, 3, 3));
    assert_eq!(q.applied_through(), 3);
    assert_eq!(q.epoch(), epoch + 1);
    assert_eq!(*q.term_history(), history(&[(1, 1)]));
    assert_eq!(q.current_term(), 2, "the current term stays");
    assert_eq!(q.used_bytes(), 3 * 96);
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        (info.last_seq, info.records, info.torn_tail_cut_bytes),
        (3, 3, 0)
    );
    drop(q);
    let mut q = reopen(&path);
    assert_eq!(seqs(&q), vec![1, 2, 3]);
    assert_eq!((q.applied_through(), q.next_seq()), (3, 4));
    assert_eq!(*q.term_history(), history(&[(1, 1)]));
    // The freed seqs take the records of a newer term.
    push_term(&mut q, 3, 40, 1);
    drop(q);
    let q = reopen(&path);
    assert_eq!(terms(&q), vec![(1, 1), (2, 1), (3, 1), (4, 3)]);
    assert_eq!(*q.term_history(), history(&[(1, 1), (3, 4)]));
}

#[test]
fn truncate_after_below_the_records_that_are_gone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..6 {
        push(&mut q, 40, 0);
    }
    q.trim_through(3).unwrap();
    for below in [0, 1, 2] {
        let e = q.truncate_after(below).unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::TruncateBelowTrim {
                    requested,
                    trimmed_through: 3
                } if requested == below
            ),
            "{e}"
        );
    }
    assert!(q
        .truncate_after(2)
        .unwrap_err()
        .to_string()
        .contains("seq 3"));
    assert_eq!(
        seqs(&q),
        vec![4, 5, 6],
        "a refused truncation changes nothing"
    );
    // The trim point itself is a valid cut: every live record goes.
    q.truncate_after(3).unwrap();
    assert_eq!((q.first_seq(), q.next_seq(), q.len_records()), (None, 4, 0));
    assert_eq!(q.used_bytes(), 0);
    drop(q);
    let mut q = reopen(&path);
    assert_eq!((q.first_seq(), q.next_seq()), (None, 4));
    // An empty queue has nothing to cut below its last seq.
    let e = q.truncate_after(2).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::TruncateBelowTrim {
                requested: 2,
                trimmed_through: 3
            }
        ),
        "{e}"
    );
    push(&mut q, 40, 1);
    drop(q);
    assert_eq!(seqs(&reopen(&path)), vec![4]);
}

#[test]
fn truncate_after_the_last_seq_or_beyond_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..3 {
        push(&mut q, 40, 0);
    }
    let before = std::fs::read(&path).unwrap();
    let epoch = q.epoch();
    for seq in [3, 4, u64::MAX] {
        q.truncate_after(seq).unwrap();
    }
    assert_eq!((q.epoch(), q.next_seq()), (epoch, 4));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // And on a new queue.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    q.truncate_after(0).unwrap();
    assert_eq!(q.next_seq(), 1);
}

#[test]
fn a_cut_before_a_short_lap_end_erases_the_first_header_of_the_next_lap() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0); // 3 * 1024
    }
    push(&mut q, 928, 0); // 984 bytes: tail at 4056, 40 bytes left (< 56-byte header)
    q.trim_through(2).unwrap();
    push(&mut q, 100, 0); // seq 5 skips the 40 bytes and lands at 4096 (physical 0)
    push(&mut q, 100, 0); // seq 6
    q.truncate_after(4).unwrap();
    assert_eq!(q.tail, 4056);
    let img = std::fs::read(&path).unwrap();
    assert!(
        img[DATA..DATA + HDR].iter().all(|&b| b == 0),
        "seq 5's header"
    );
    assert_ne!(
        img[DATA + 160..DATA + 160 + HDR],
        [0; HDR],
        "seq 6 is left as it was"
    );
    drop(q);
    let mut q = reopen(&path);
    assert_eq!(seqs(&q), vec![3, 4]);
    // A new seq 5 of another size: seq 6 is not reached, and would be refused if it were.
    push(&mut q, 300, 1);
    drop(q);
    let q = reopen(&path);
    assert_eq!(seqs(&q), vec![3, 4, 5]);
    assert_eq!(records(&q)[2].2, payload(5, 300, 1));
}

#[test]
fn a_cut_right_before_a_wrap_pad_erases_the_pad() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0); // 3 * 1024
    }
    push(&mut q, 500, 0); // seq 4: 560 bytes, tail at 3632, 464 left in the lap
    q.trim_through(2).unwrap();
    push(&mut q, 900, 0); // seq 5: pad of 464 at 3632, record at 4096
    q.truncate_after(4).unwrap();
    assert_eq!(q.tail, 3632);
    let img = std::fs::read(&path).unwrap();
    assert!(img[DATA + 3632..DATA + 3632 + HDR].iter().all(|&b| b == 0));
    drop(q);
    let mut q = reopen(&path);
    assert_eq!(seqs(&q), vec![3, 4]);
    push(&mut q, 20, 1); // fits before the lap end now
    assert_eq!(q.tail, 3632 + 80);
    drop(q);
    assert_eq!(seqs(&reopen(&path)), vec![3, 4, 5]);
}

#[test]
fn truncating_every_record_of_a_new_lap_ends_the_log_before_the_lap_end_skip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0); // 3 * 1024
    }
    push(&mut q, 928, 0); // seq 4: tail at 4056, 40 bytes left (< 56-byte header)
    q.trim_through(4).unwrap();
    push(&mut q, 100, 0); // seq 5 at 4096
    push(&mut q, 100, 0); // seq 6
    q.truncate_after(4).unwrap();
    // The log ends after seq 4 (the anchor), not at the start of the next lap.
    assert_eq!((q.tail, q.first_seq(), q.next_seq()), (4056, None, 5));
    drop(q);
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((rep.torn_tail_cut_bytes, rep.cut_reason), (0, None));
    assert_eq!((rep.next_seq, rep.records), (5, 0));
    push(&mut q, 300, 1);
    drop(q);
    assert_eq!(seqs(&reopen(&path)), vec![5]);
}

/// Records of equal sizes: after the cut, the new record `seq + 1` ends exactly where the
/// discarded record `seq + 2` begins (right position, right seq, valid crc).
fn equal_sized_log_truncated_and_refilled(dir: &std::path::Path) -> std::path::PathBuf {
    let (mut q, path) = new_queue(dir, 8192);
    for _ in 0..5 {
        push_term(&mut q, 1, 40, 0); // 96 bytes each
    }
    q.truncate_after(2).unwrap();
    push_term(&mut q, 1, 40, 1); // a new seq 3, same size, same term, other bytes
    drop(q);
    path
}

#[test]
fn a_discarded_record_never_comes_back_behind_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = equal_sized_log_truncated_and_refilled(dir.path());
    let img = std::fs::read(&path).unwrap();
    let old4 = DATA + 3 * 96;
    assert_eq!(
        img[old4..old4 + 4],
        *b"LMR1",
        "the discarded seq 4 is still there"
    );
    let q = reopen(&path);
    assert_eq!(seqs(&q), vec![1, 2, 3]);
    assert_eq!(records(&q)[2].2, payload(3, 40, 1));
}

/// Truncates five equal-sized records of term 1 after seq 2, appends a new seq 3 of
/// `new_term`, then forges the discarded seq 4's epoch to the new one (crc and all) and points
/// the tail hint past it (so that a cut is reported). What does recovery keep?
fn forged_ghost(dir: &std::path::Path, new_term: u64) -> (Vec<u64>, Option<CutReason>) {
    let (mut q, path) = new_queue(dir, 8192);
    for _ in 0..5 {
        push_term(&mut q, 1, 40, 0);
    }
    q.truncate_after(2).unwrap();
    push_term(&mut q, new_term, 40, 1);
    let epoch = q.epoch();
    drop(q);
    let mut img = std::fs::read(&path).unwrap();
    let old4 = DATA + 3 * 96;
    assert_eq!(img[old4 + REC_TERM], 1);
    img[old4 + REC_EPOCH..old4 + REC_EPOCH + 8].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&img[old4 + 8..old4 + 96]);
    img[old4 + 4..old4 + 8].copy_from_slice(&crc.to_le_bytes());
    img[OFF_TAIL..OFF_TAIL + 8].copy_from_slice(&(5 * 96u64).to_le_bytes());
    std::fs::write(&path, &img).unwrap();
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    std::fs::remove_file(&path).unwrap();
    (seqs(&q), rep.cut_reason)
}

#[test]
fn the_term_rule_alone_refuses_a_discarded_record() {
    // Defence in depth. The epoch is what keeps a discarded record out; with it forged, a
    // discarded record of the same term as the new one passes (the control)...
    let dir = tempfile::tempdir().unwrap();
    let (kept, _) = forged_ghost(dir.path(), 1);
    assert_eq!(kept, vec![1, 2, 3, 4]);
    // ...but once the freed seqs hold a newer term, its term contradicts the log before it.
    let (kept, why) = forged_ghost(dir.path(), 2);
    assert_eq!(kept, vec![1, 2, 3]);
    assert_eq!(
        why,
        Some(CutReason::Term {
            seq: 4,
            found: 1,
            expected: 2
        })
    );
}
