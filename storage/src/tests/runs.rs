//! Runs of appends (`power`: a run's records reach the file in one write) and gathered region
//! writes.

use std::sync::Arc;

use super::{offset_for, params, payload, push, records};
use crate::{
    Durability, PersistentQueue, Region, StorageError, GATHER_MAX_PIECES, RUN_BUFFER_MAX,
    RUN_RECORD_MAX,
};

fn power_queue(dir: &std::path::Path, capacity: u64) -> (PersistentQueue, std::path::PathBuf) {
    let path = dir.join("q");
    let q = PersistentQueue::create(&path, &params(capacity), Durability::Power).unwrap();
    (q, path)
}

/// What a process crash now would leave: the file as the page cache holds it, opened as a new
/// process would (a copy, so that the live queue's lock and mapping stay as they are).
fn records_after_crash(path: &std::path::Path) -> Vec<(u64, u64, Vec<u8>)> {
    let copy = path.with_extension("crash");
    std::fs::copy(path, &copy).unwrap();
    let (q, _) = PersistentQueue::open(&copy, Durability::Power).unwrap();
    let r = records(&q);
    drop(q);
    std::fs::remove_file(&copy).unwrap();
    r
}

#[test]
fn a_runs_records_reach_the_file_when_it_ends_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = power_queue(dir.path(), 1 << 20);
    push(&mut q, 100, 0);
    q.begin_append_run();
    assert!(q.append_run_open());
    for _ in 0..10 {
        push(&mut q, 4096, 0);
    }
    assert_eq!(q.len_records(), 11, "counted at once");
    assert_eq!(records_after_crash(&path).len(), 1, "still in memory only");
    q.end_append_run().unwrap();
    assert!(!q.append_run_open());
    let after = records_after_crash(&path);
    assert_eq!(after.len(), 11);
    assert_eq!(after, records(&q));
}

#[test]
fn a_sync_inside_a_run_makes_its_records_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = power_queue(dir.path(), 1 << 20);
    q.begin_append_run();
    for _ in 0..5 {
        push(&mut q, 512, 0);
    }
    q.sync().unwrap();
    assert_eq!(records_after_crash(&path).len(), 5);
    // The run stays open: what follows is staged again.
    push(&mut q, 512, 0);
    assert_eq!(records_after_crash(&path).len(), 5);
    q.end_append_run().unwrap();
    assert_eq!(records_after_crash(&path).len(), 6);
}

#[test]
fn a_queue_dropped_inside_a_run_loses_the_runs_records_as_a_crash_would() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = power_queue(dir.path(), 1 << 20);
    push(&mut q, 64, 0);
    q.sync().unwrap();
    q.begin_append_run();
    push(&mut q, 64, 0);
    push(&mut q, 64, 0);
    drop(q);
    let (q, report) = PersistentQueue::open(&path, Durability::Power).unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(q.next_seq(), 2, "the lost records' seqs are free again");
}

#[test]
fn large_records_keep_their_order_around_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = power_queue(dir.path(), 1 << 20);
    q.begin_append_run();
    push(&mut q, 100, 0);
    // Larger than a run copies: written by itself, after what the run held.
    push(&mut q, RUN_RECORD_MAX + 1, 0);
    assert_eq!(records_after_crash(&path).len(), 2);
    push(&mut q, 100, 0);
    q.end_append_run().unwrap();
    assert_eq!(records_after_crash(&path), records(&q));
    assert_eq!(records(&q).len(), 3);
}

#[test]
fn a_run_is_written_when_its_buffer_fills_and_across_the_rings_wrap() {
    let dir = tempfile::tempdir().unwrap();
    // A small ring: runs of many records wrap it again and again, with trims between.
    let (mut q, path) = power_queue(dir.path(), 64 << 10);
    let mut expected = Vec::new();
    for round in 0..40u64 {
        q.begin_append_run();
        for _ in 0..(3 + round % 5) {
            let seq = q.next_seq();
            let len = 1000 + (round as usize * 37) % 3000;
            q.append(seq, 1, offset_for(seq), &payload(seq, len, round))
                .unwrap();
            expected.push((seq, offset_for(seq), payload(seq, len, round)));
        }
        q.end_append_run().unwrap();
        assert_eq!(records_after_crash(&path), expected, "round {round}");
        // The peer confirms all but the last two.
        let keep_from = expected.len().saturating_sub(2);
        if keep_from > 0 {
            q.trim_through(expected[keep_from - 1].0).unwrap();
            expected.drain(..keep_from);
        }
    }
    // A run larger than its buffer is written in pieces, each whole.
    let (mut big, big_path) = {
        let d = dir.path().join("big");
        std::fs::create_dir(&d).unwrap();
        power_queue(&d, 8 << 20)
    };
    big.begin_append_run();
    let n = RUN_BUFFER_MAX / 4096 + 10;
    for _ in 0..n {
        push(&mut big, 4000, 1);
    }
    let written = records_after_crash(&big_path).len();
    assert!(
        written > 0 && written < n,
        "{written} of {n} written before the end"
    );
    big.end_append_run().unwrap();
    assert_eq!(records_after_crash(&big_path).len(), n);
}

#[test]
fn operations_that_read_the_ring_inside_a_run_write_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _path) = power_queue(dir.path(), 1 << 20);
    q.begin_append_run();
    for _ in 0..4 {
        push(&mut q, 300, 0);
    }
    q.trim_through(2).unwrap();
    assert_eq!(q.first_seq(), Some(3));
    push(&mut q, 300, 0);
    q.truncate_after(4).unwrap();
    assert_eq!(q.last_seq(), 4);
    q.end_append_run().unwrap();
    assert_eq!(
        records(&q).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

#[test]
fn runs_change_nothing_outside_power() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = super::new_queue(dir.path(), 1 << 20);
    q.begin_append_run();
    assert!(
        !q.append_run_open(),
        "a process queue writes through its mapping"
    );
    push(&mut q, 100, 0);
    assert_eq!(records(&q).len(), 1);
}

#[test]
fn gathered_region_writes_land_as_written_one_by_one() {
    for durability in [Durability::Process, Durability::Power] {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            Arc::new(Region::open_or_create(&dir.path().join(name), 1 << 20, durability).unwrap())
                .writer()
                .unwrap()
        };
        let (mut gathered, mut one_by_one) = (open("a"), open("b"));
        assert_eq!(gathered.gathers_writes(), durability == Durability::Power);
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        // Neighbours, a gap, an overlap of an earlier write, an empty write, and a run longer
        // than one pwritev takes.
        for i in 0..8u64 {
            writes.push((i * 100, payload(i, 100, 1)));
        }
        writes.push((5000, payload(9, 10, 1)));
        writes.push((150, payload(10, 200, 1)));
        writes.push((350, Vec::new()));
        for i in 0..(GATHER_MAX_PIECES as u64 + 5) {
            writes.push((100_000 + i * 16, payload(i, 16, 2)));
        }
        let pieces: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
        gathered.write_gathered(&pieces).unwrap();
        for (o, d) in &pieces {
            one_by_one.write(*o, d).unwrap();
        }
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        gathered.read(0, &mut a).unwrap();
        one_by_one.read(0, &mut b).unwrap();
        assert!(a == b, "{durability:?}: gathered writes differ");
        assert_eq!(
            &a[150..350],
            &payload(10, 200, 1)[..],
            "the later write wins"
        );
    }
}

#[test]
fn a_gathered_write_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r =
        Arc::new(Region::open_or_create(&dir.path().join("r"), 4096, Durability::Power).unwrap())
            .writer()
            .unwrap();
    let err = r
        .write_gathered(&[(0, &[1u8; 10][..]), (10, &[2u8; 5000][..])])
        .unwrap_err();
    assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
}
