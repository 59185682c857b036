//! Torn and damaged records: recovery keeps exactly the verified prefix and reports the cut.

use std::path::Path;

use super::{new_queue, push, records};
use crate::{CutReason, Durability, PersistentQueue};

const DATA: usize = crate::format::HEADER_BYTES as usize;
/// Payload length used here: 56 + 37 = 93, padded to 96, so the record has 3 padding bytes
/// (which the crc covers).
const LEN: usize = 37;
const TOTAL: usize = 96;
/// The record header's size.
const HDR: usize = crate::RECORD_HEADER_BYTES as usize;

type Recs = Vec<(u64, u64, Vec<u8>)>;

fn image_with(dir: &Path, n: usize) -> (Vec<u8>, Recs) {
    let (mut q, path) = new_queue(dir, 8192);
    for _ in 0..n {
        push(&mut q, LEN, 0);
    }
    let recs = records(&q);
    drop(q);
    (std::fs::read(path).unwrap(), recs)
}

/// Writes `img`, opens it, and checks that exactly `keep` records survive and `cut` bytes were
/// reported; then checks the queue is usable: an append lands after the prefix and survives
/// a reopen.
fn check_recovery(
    path: &Path,
    img: &[u8],
    want: &[(u64, u64, Vec<u8>)],
    keep: usize,
    cut: u64,
    what: &str,
) {
    std::fs::write(path, img).unwrap();
    let (mut q, rep) = PersistentQueue::open(path, Durability::Process).unwrap();
    assert_eq!(records(&q), want[..keep], "{what}");
    assert_eq!(rep.records, keep as u64, "{what}");
    assert_eq!(rep.torn_tail_cut_bytes, cut, "{what}");
    assert_eq!(
        rep.cut_reason.is_some(),
        cut > 0,
        "{what}: {:?}",
        rep.cut_reason
    );
    let last = if keep > 0 {
        want[keep - 1].0
    } else {
        want[0].0 - 1
    };
    assert_eq!(rep.last_seq, last, "{what}");
    assert_eq!(q.next_seq(), last + 1, "{what}");
    push(&mut q, 11, 99);
    drop(q);
    let (q, rep) = PersistentQueue::open(path, Durability::Process).unwrap();
    assert_eq!(
        rep.torn_tail_cut_bytes, 0,
        "{what}: the new record replaced the torn one"
    );
    let got = records(&q);
    assert_eq!(got.len(), keep + 1, "{what}");
    assert_eq!(got[..keep], want[..keep], "{what}");
}

#[test]
fn recovery_keeps_exactly_the_complete_prefix_when_the_last_record_is_torn_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (good, want) = image_with(dir.path(), 5);
    let last = DATA + 4 * TOTAL;
    let path = dir.path().join("t");
    for p in 0..TOTAL {
        // The write stopped at byte p: the rest of the record is still zero.
        let mut img = good.clone();
        img[last + p..last + TOTAL].fill(0);
        // (Zeroing the zero padding changes nothing: then the record is complete.)
        let torn = img != good;
        assert_eq!(torn, p < LEN + HDR, "byte {p}");
        if torn {
            check_recovery(
                &path,
                &img,
                &want,
                4,
                TOTAL as u64,
                &format!("zeroed from byte {p}"),
            );
        }
        // A single flipped bit anywhere in the record (header, payload, padding).
        for bit in 0..8 {
            let mut img = good.clone();
            img[last + p] ^= 1 << bit;
            check_recovery(
                &path,
                &img,
                &want,
                4,
                TOTAL as u64,
                &format!("bit {bit} of byte {p} flipped"),
            );
        }
    }
}

#[test]
fn the_reported_reason_names_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = image_with(dir.path(), 3);
    let last = DATA + 2 * TOTAL;
    let path = dir.path().join("t");
    let cases: [(usize, CutReason); 8] = [
        (0, CutReason::BadMagic),
        (8, CutReason::BadKind),
        (48, CutReason::BadKind), // term 1 -> 0: a DATA record without a term
        (49, CutReason::Checksum), // term 1 -> 257: the term is covered by the crc
        (13, CutReason::BadLength), // payload_len += 256: the record no longer fits the max
        (24, CutReason::StalePosition),
        (16, CutReason::Checksum), // seq is covered by the crc
        (60, CutReason::Checksum), // payload
    ];
    for (at, why) in cases {
        let mut img = good.clone();
        img[last + at] ^= 1;
        if at == 13 {
            img[last + at] ^= 1 ^ 0x10;
        }
        std::fs::write(&path, &img).unwrap();
        let (_, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
        assert_eq!(rep.cut_reason, Some(why), "byte {at}");
    }
}

#[test]
fn a_damaged_record_in_the_middle_ends_the_log_there() {
    // Chosen behaviour: recovery cannot tell a record damaged after it was written from a torn
    // append (both are "a record that does not verify"), and what follows it cannot be reached
    // safely (its position depends on the damaged length). So the log ends at the damaged
    // record, everything after it is reported as cut, and the engine recovers those writes
    // from the peer (that is what the queue on the other node is for).
    let dir = tempfile::tempdir().unwrap();
    let (good, want) = image_with(dir.path(), 6);
    let path = dir.path().join("t");
    for k in 0..6 {
        let mut img = good.clone();
        img[DATA + k * TOTAL + HDR + 5] ^= 0x80;
        check_recovery(
            &path,
            &img,
            &want,
            k,
            ((6 - k) * TOTAL) as u64,
            &format!("record {k} of 6 damaged"),
        );
    }
}

#[test]
fn a_torn_record_right_after_a_wrap_pad_is_cut_and_the_pad_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0); // 3 * 1024
    }
    push(&mut q, 500, 0); // 560 bytes: tail at 3632, 464 left in the lap
    q.trim_through(2).unwrap();
    push(&mut q, 900, 0); // 960 bytes: pad 464, record at 4096 (physical 0)
    let want = records(&q);
    assert_eq!(want.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4, 5]);
    drop(q);
    let good = std::fs::read(&path).unwrap();
    for p in [0usize, 20, 55, 56, 500, 955] {
        let mut img = good.clone();
        img[DATA + p] ^= 0x04;
        check_recovery(
            &path,
            &img,
            &want,
            2,
            960,
            &format!("wrapped record, byte {p}"),
        );
    }
}

#[test]
fn recovery_does_not_resurrect_a_record_cut_by_an_earlier_recovery() {
    // Power loss with out-of-order write-back: record 3 reached the disk, record 2 did not.
    // Recovery 1 cuts the log after record 1; record 3 stays on disk beyond the cut. The new
    // session writes a different record 2 of the same size, which ends exactly where the old
    // record 3 begins, with a valid crc, the right position and the right seq. Only the epoch
    // tells it apart: it was written before recovery 1, so it must not follow a record of a
    // later epoch.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..3 {
        push(&mut q, LEN, 0);
    }
    drop(q);
    let mut img = std::fs::read(&path).unwrap();
    img[DATA + TOTAL..DATA + 2 * TOTAL].fill(0); // record 2 never written back
    std::fs::write(&path, &img).unwrap();
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(rep.cut_reason, Some(CutReason::BadMagic));
    let two = push(&mut q, LEN, 1); // same size, new bytes
    assert_eq!(two, 2);
    let want = records(&q);
    drop(q);
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(records(&q), want, "the old record 3 must stay dead");
    assert_eq!(q.next_seq(), 3);
    assert_eq!(rep.torn_tail_cut_bytes, 0);
}
