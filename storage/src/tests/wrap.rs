//! Wrap-around: many laps of the ring, pads, and the short lap end without a pad.

use std::collections::VecDeque;

use super::{new_queue, offset_for, payload, push, records, Rng};
use crate::{Durability, PersistentQueue, StorageError};

#[test]
fn many_laps_with_trims_and_reopens_keep_every_live_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let cap = q.capacity_bytes();
    let max = q.max_payload() as u64;
    let mut model: VecDeque<(u64, u64, Vec<u8>)> = VecDeque::new();
    let mut rng = Rng(0x5eed);
    for step in 0..4000u64 {
        let len = (if rng.below(4) == 0 {
            1 + rng.below(max)
        } else {
            1 + rng.below(64)
        }) as usize;
        let seq = q.next_seq();
        let p = payload(seq, len, 0);
        match q.append(seq, 1, offset_for(seq), &p) {
            Ok(()) => model.push_back((seq, offset_for(seq), p)),
            Err(StorageError::Full { needed, free }) => {
                assert!(needed > free);
                // Backpressure: the peer confirms some of the oldest records.
                let k = 1 + rng.below(model.len() as u64) as usize;
                let through = model[k - 1].0;
                q.trim_through(through).unwrap();
                model.drain(..k);
            }
            Err(e) => panic!("step {step}: {e}"),
        }
        if step % 97 == 0 {
            drop(q);
            let (q2, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
            q = q2;
            assert_eq!(
                rep.torn_tail_cut_bytes, 0,
                "step {step}: a clean reopen cuts nothing"
            );
            assert_eq!(rep.records, model.len() as u64, "step {step}");
        }
        assert_eq!(records(&q), Vec::from(model.clone()), "step {step}");
        assert_eq!(q.first_seq(), model.front().map(|r| r.0));
        assert_eq!(q.len_records(), model.len() as u64);
    }
    assert!(q.tail > 100 * cap, "only {} laps", q.tail / cap);
}

#[test]
fn equal_sized_records_over_many_laps_never_accept_the_previous_lap() {
    // With equal sizes every lap puts records at the same physical places, so the bytes just
    // past the tail are always a complete, checksum-valid record from the previous lap.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    for lap in 0..60 {
        for _ in 0..5 {
            push(&mut q, 200, lap);
        }
        q.trim_through(q.last_seq() - 2).unwrap();
        drop(q);
        let (q2, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
        q = q2;
        assert_eq!(rep.records, 2, "lap {lap}");
        assert_eq!(rep.torn_tail_cut_bytes, 0);
        let r = records(&q);
        assert_eq!(r[0].2, payload(r[0].0, 200, lap));
        assert_eq!(r[1].2, payload(r[1].0, 200, lap));
    }
}

#[test]
fn a_lap_end_too_short_for_a_header_is_skipped_without_a_pad() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0); // 3 * 1024
    }
    push(&mut q, 928, 0); // 984 bytes: tail at 4056, 40 bytes left (< 56-byte header)
    assert_eq!(q.tail, 4056);
    q.trim_through(2).unwrap();
    push(&mut q, 100, 0); // skips the 40 bytes, lands at 4096
    assert_eq!(q.tail, 4096 + 160);
    let want = records(&q);
    assert_eq!(want.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4, 5]);
    drop(q);
    let good = std::fs::read(&path).unwrap();
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(records(&q), want);
    assert_eq!(rep.bytes, 4256 - 2048);
    drop(q);
    // Tear the record after the skip: the 40 skipped bytes count towards the cut.
    let mut img = good;
    img[4096 + 60] ^= 1;
    std::fs::write(&path, &img).unwrap();
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(records(&q), want[..2]);
    assert_eq!(rep.torn_tail_cut_bytes, 200);
    assert_eq!(q.next_seq(), 5);
}

#[test]
fn records_in_warmed_lines_read_back_as_streamed_ones_do_over_many_laps() {
    // An idle node warms the ring past its tail; a record landing there is copied into the
    // cached lines instead of streamed past the cache. Both kinds, over many laps (the warmed
    // stretch wrapping at the ring's end), must read back the same, before and after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 256 << 10);
    let cap = q.capacity_bytes();
    let max = q.max_payload() as u64;
    assert!(
        crate::record_total(max) > crate::WARM_AHEAD_MIN,
        "the ring must take records larger than the least warm-up: {max}"
    );
    let mut model: VecDeque<(u64, u64, Vec<u8>)> = VecDeque::new();
    let mut rng = Rng(0xa11ce);
    let (mut warmed_large, mut streamed_large) = (0, 0);
    // Ring bytes of the last record appended: the warm-up reaches at least that far (within
    // its bounds), so that a writer of large records finds the next one's lines warm.
    let mut last_record = 0u64;
    for step in 0..3000u64 {
        if rng.below(2) == 0 {
            q.warm_ahead();
            let ahead = last_record.clamp(crate::WARM_AHEAD_MIN, crate::WARM_AHEAD_MAX);
            assert!(
                q.warmed_to() >= q.tail + ahead.min(cap),
                "step {step}: warmed to {} with the tail at {} after a record of {last_record} bytes",
                q.warmed_to(),
                q.tail
            );
        }
        let len = [1, 64, 4095, 4096, 6000, 12_345, 40_000, max as usize][rng.below(8) as usize];
        let seq = q.next_seq();
        let p = payload(seq, len, 3);
        let in_warmed_lines = q.tail + crate::RECORD_HEADER_BYTES + len as u64 <= q.warmed_to();
        match q.append(seq, 1, offset_for(seq), &p) {
            Ok(()) => {
                last_record = crate::record_total(len as u64);
                model.push_back((seq, offset_for(seq), p));
                if len >= 4096 {
                    if in_warmed_lines {
                        warmed_large += 1;
                    } else {
                        streamed_large += 1;
                    }
                }
            }
            Err(StorageError::Full { .. }) => {
                let k = 1 + rng.below(model.len() as u64) as usize;
                q.trim_through(model[k - 1].0).unwrap();
                model.drain(..k);
            }
            Err(e) => panic!("step {step}: {e}"),
        }
        if step % 101 == 0 {
            drop(q);
            q = PersistentQueue::open(&path, Durability::Process).unwrap().0;
            // A reopened queue warms the least until its next record.
            last_record = 0;
        }
        assert_eq!(records(&q), Vec::from(model.clone()), "step {step}");
    }
    assert!(q.tail > 20 * cap, "only {} laps", q.tail / cap);
    assert!(
        warmed_large > 100 && streamed_large > 100,
        "both copies taken: {warmed_large} warmed, {streamed_large} streamed"
    );
}

#[test]
fn a_power_queue_warms_nothing() {
    // Under `power` records go to the file with `pwrite`, not through the mapping.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let mut q =
        PersistentQueue::create(&path, &super::params(64 << 10), Durability::Power).unwrap();
    push(&mut q, 4096, 0);
    q.warm_ahead();
    assert_eq!(q.warmed_to(), 0);
}
