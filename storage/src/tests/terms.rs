//! Format version 2: terms on records, the role, the current term and the term history in the
//! metadata, and what open does with each of them when they are damaged.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mirror_proto::TermHistoryError;

use super::{history, new_queue, offset_for, params, push, push_term, records, terms};
use crate::format::{
    META_CRC, META_CURRENT_TERM, META_ENTRIES, META_ENTRY_COUNT, META_GEN, META_ROLE,
    META_SLOT_BYTES, META_SLOT_OFF, OFF_SCAN_START,
};
use crate::queue::CrashEvent;
use crate::{
    inspect_queue, CutReason, Durability, PersistentQueue, QueueParams, Role, StorageError,
};

const DATA: usize = crate::format::HEADER_BYTES as usize;
/// Offset of the term in a record header.
const REC_TERM: usize = 48;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// File offset of the metadata slot a reader would pick (the larger generation).
fn current_slot(img: &[u8]) -> usize {
    let [a, b] = META_SLOT_OFF;
    if u64_at(img, a + META_GEN) > u64_at(img, b + META_GEN) {
        a
    } else {
        b
    }
}

/// Recomputes the crc of the slot at `base`, as a faulty writer that stored a bad field would.
fn reseal_slot(img: &mut [u8], base: usize) {
    let slot = &mut img[base..base + META_SLOT_BYTES];
    put_u64(slot, META_CRC, 0);
    let crc = crc32c::crc32c(slot);
    put_u32(slot, META_CRC, crc);
}

/// Recomputes the crc of the DATA record of `total` bytes at file offset `at`.
fn reseal_record(img: &mut [u8], at: usize, total: usize) {
    let crc = crc32c::crc32c(&img[at + 8..at + total]);
    put_u32(img, at + 4, crc);
}

/// A change to the bytes of a metadata slot.
type SlotPatch<'a> = &'a dyn Fn(&mut [u8]);

/// The file with `patch` applied to its current metadata slot, resealed.
fn patch_current_slot(path: &Path, patch: impl Fn(&mut [u8])) {
    let mut img = std::fs::read(path).unwrap();
    let base = current_slot(&img);
    patch(&mut img[base..base + META_SLOT_BYTES]);
    reseal_slot(&mut img, base);
    std::fs::write(path, &img).unwrap();
}

/// A queue file as format version 1 wrote it: the role in the static block, 64-byte slots.
fn version_1_file(path: &Path) {
    let mut img = vec![0u8; 4096 + 4096];
    img[0..8].copy_from_slice(b"LMIRQUE\0");
    put_u32(&mut img, 8, 1);
    put_u64(&mut img, 16, 11); // node_id
    put_u64(&mut img, 24, super::REGION);
    put_u64(&mut img, 32, 4096); // capacity
    put_u64(&mut img, 40, 4096); // data offset
    put_u32(&mut img, 48, 1); // role: primary
    let crc = crc32c::crc32c(&img[16..64]);
    put_u32(&mut img, 12, crc);
    put_u64(&mut img, 64, 1); // slot A: generation 1
    let crc = crc32c::crc32c(&img[64..96]);
    put_u64(&mut img, 96, u64::from(crc));
    put_u64(&mut img, 224, 1); // next_seq hint
    std::fs::write(path, &img).unwrap();
}

#[test]
fn a_version_1_file_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    version_1_file(&path);
    let before = std::fs::read(&path).unwrap();
    let check = |e: StorageError| {
        assert!(
            matches!(
                e,
                StorageError::UnsupportedVersion {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 1") && msg.contains("version 2"),
            "{msg}"
        );
    };
    check(PersistentQueue::open(&path, Durability::Process).unwrap_err());
    check(PersistentQueue::open_or_create(&path, &params(4096), Durability::Process).unwrap_err());
    check(inspect_queue(&path).unwrap_err());
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing migrated");
}

#[test]
fn a_new_queue_keeps_its_role_and_no_terms_in_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let p = QueueParams {
        role: Role::Backup,
        ..params(4096)
    };
    let q = PersistentQueue::create(&path, &p, Durability::Process).unwrap();
    assert_eq!(q.role(), Role::Backup);
    assert_eq!(q.current_term(), 0);
    assert!(q.term_history().is_empty());
    drop(q);
    let img = std::fs::read(&path).unwrap();
    assert_eq!(&img[48..52], &[0; 4], "the v1 role field is reserved");
    let slot = current_slot(&img);
    assert_eq!(u64_at(&img, slot + META_ROLE) as u32, 2);
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        (info.role, info.current_term, info.term_history.is_empty()),
        (Role::Backup, 0, true)
    );
}

#[test]
fn each_damaged_term_field_is_refused_at_open_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    push_term(&mut q, 1, 20, 0);
    push_term(&mut q, 3, 20, 0);
    drop(q);
    let good = std::fs::read(&path).unwrap();
    let cases: [(&str, SlotPatch); 6] = [
        ("role", &|s| put_u32(s, META_ROLE, 0)),
        ("role", &|s| put_u32(s, META_ROLE, 7)),
        ("term_history", &|s| put_u32(s, META_ENTRY_COUNT, 61)),
        // [(1, 1), (3, 2)] becomes [(1, 1), (0, 2)], then [(3, 1), (3, 2)].
        ("term_history", &|s| put_u64(s, META_ENTRIES + 16, 0)),
        ("term_history", &|s| put_u64(s, META_ENTRIES, 3)),
        ("current_term", &|s| put_u64(s, META_CURRENT_TERM, 2)),
    ];
    for (field, patch) in cases {
        std::fs::write(&path, &good).unwrap();
        patch_current_slot(&path, patch);
        let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
        assert!(
            matches!(e, StorageError::CorruptMeta { field: f, .. } if f == field),
            "{field}: {e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("metadata field {field} is invalid"))
                && msg.contains(&path.display().to_string()),
            "{msg}"
        );
        let e = inspect_queue(&path).unwrap_err();
        assert!(matches!(e, StorageError::CorruptMeta { .. }), "{e}");
    }
    // A slot that fails its crc is skipped as before: the other, older one is used. It does
    // not have the entry of term 3 yet, so record 2 is not part of its log.
    let mut img = good.clone();
    let base = current_slot(&img);
    img[base + META_CURRENT_TERM] ^= 1;
    std::fs::write(&path, &img).unwrap();
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(terms(&q), vec![(1, 1)]);
    assert_eq!(
        rep.cut_reason,
        Some(CutReason::Term {
            seq: 2,
            found: 3,
            expected: 1
        })
    );
    assert_eq!(q.current_term(), 1);
}

#[test]
fn an_append_below_the_last_term_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    let e = q.append(1, 0, 0, b"x").unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Term {
                source: TermHistoryError::Zero { .. },
                ..
            }
        ),
        "{e}"
    );
    push_term(&mut q, 3, 20, 0);
    let before = std::fs::read(&path).unwrap();
    let e = q.append(2, 2, offset_for(2), b"lower").unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Term {
                source: TermHistoryError::TermRegression {
                    seq: 2,
                    term: 2,
                    last_term: 3
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("term history"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    assert_eq!((q.next_seq(), q.current_term()), (2, 3));
    assert_eq!(*q.term_history(), history(&[(3, 1)]));
    // A record of the new term that does not fit writes no history entry either.
    let max = q.max_payload();
    for _ in 0..3 {
        push(&mut q, max, 0);
    }
    let before = std::fs::read(&path).unwrap();
    let e = q.append(5, 4, 0, &vec![1; max]).unwrap_err();
    assert!(matches!(e, StorageError::Full { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    assert_eq!(
        (q.term_history().clone(), q.current_term()),
        (history(&[(3, 1)]), 3)
    );
}

#[test]
fn a_new_terms_first_append_persists_the_history_before_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..3 {
        push_term(&mut q, 1, 30, 0);
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    q.test_hook = Some(Box::new(move |e| {
        seen.lock().unwrap().push(match e {
            CrashEvent::Stored => None,
            CrashEvent::Barrier(ranges) => Some(ranges.to_vec()),
        })
    }));
    push_term(&mut q, 4, 30, 0);
    let events = events.lock().unwrap().clone();
    // The slot store, a barrier that flushes that slot, then the record store.
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0], None);
    let flushed = events[1].as_ref().expect("a barrier");
    assert!(
        flushed
            .iter()
            .any(|&(off, len)| META_SLOT_OFF.contains(&off) && len == META_SLOT_BYTES),
        "{flushed:?}"
    );
    assert_eq!(events[2], None);
    // An ordinary append in the same term stores only the record, and an ordinary barrier
    // flushes no metadata slot.
    q.test_hook = None;
    push_term(&mut q, 4, 30, 0);
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ranges);
    q.test_hook = Some(Box::new(move |e| {
        if let CrashEvent::Barrier(r) = e {
            seen.lock().unwrap().extend_from_slice(r);
        }
    }));
    q.sync().unwrap();
    let ranges = ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().all(|&(off, _)| !META_SLOT_OFF.contains(&off)),
        "{ranges:?}"
    );
    assert_eq!(q.current_term(), 4);
    assert_eq!(*q.term_history(), history(&[(1, 1), (4, 4)]));
    drop(q);
    let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(*q.term_history(), history(&[(1, 1), (4, 4)]));
    assert_eq!(q.current_term(), 4);
    assert_eq!(terms(&q), vec![(1, 1), (2, 1), (3, 1), (4, 4), (5, 4)]);
    let state = {
        let mut q = q;
        q.replay_state().unwrap()
    };
    assert_eq!(state.current_term, 4);
    assert_eq!(state.term_history, history(&[(1, 1), (4, 4)]));
    assert_eq!(
        state
            .unapplied
            .iter()
            .map(|r| (r.seq, r.term))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 1), (4, 4), (5, 4)]
    );
}

#[test]
fn an_entry_whose_first_record_was_lost_is_dropped_at_recovery() {
    // Power loss: the entry (2, 3) reached the media (it is durable before its record), record
    // 3 did not.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    push_term(&mut q, 1, 20, 0); // 80 bytes each
    push_term(&mut q, 1, 20, 0);
    push_term(&mut q, 2, 20, 0);
    drop(q);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0u8; 80], 4096 + 2 * 80).unwrap();
    drop(f);
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(rep.last_seq, 2);
    assert_eq!(*q.term_history(), history(&[(1, 1)]));
    assert_eq!(q.current_term(), 2, "the current term is not taken back");
    // Seq 3 can now start term 2 (or a later one) again.
    push_term(&mut q, 5, 20, 1);
    drop(q);
    let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(*q.term_history(), history(&[(1, 1), (5, 3)]));
    assert_eq!(q.current_term(), 5);
}

#[test]
fn a_record_whose_term_contradicts_the_history_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    push_term(&mut q, 1, 20, 0);
    push_term(&mut q, 1, 20, 0);
    push_term(&mut q, 2, 20, 0);
    push_term(&mut q, 2, 20, 0);
    drop(q);
    // History [(1, 1), (2, 3)] rewritten as [(1, 1), (2, 4)]: record 3 (term 2) is not the
    // record the history describes at seq 3.
    patch_current_slot(&path, |s| put_u64(s, META_ENTRIES + 24, 4));
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        info.cut_reason,
        Some(CutReason::Term {
            seq: 3,
            found: 2,
            expected: 1
        })
    );
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(rep.cut_reason, info.cut_reason);
    assert!(rep.cut_reason.unwrap().to_string().contains("term 2"));
    assert_eq!(terms(&q), vec![(1, 1), (2, 1)]);
    assert_eq!(*q.term_history(), history(&[(1, 1)]));
}

#[test]
fn records_below_the_first_entry_may_carry_any_earlier_term() {
    // Records 1, 2 (term 1) and 3, 4 (term 2); trimmed through 3, so the durable history
    // forgets (1, 1). A scan that starts at an older scan_start (a value the word held
    // before) meets records 1 and 2 below the history's first entry.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for term in [1, 1, 2, 2] {
        push_term(&mut q, term, 20, 0); // 80 bytes each
    }
    q.trim_through(3).unwrap();
    q.sync().unwrap();
    q.set_applied_through(3).unwrap();
    assert_eq!(*q.term_history(), history(&[(2, 3)]));
    drop(q);
    let mut img = std::fs::read(&path).unwrap();
    put_u64(&mut img, OFF_SCAN_START, 0);
    std::fs::write(&path, &img).unwrap();
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((rep.cut_reason, terms(&q)), (None, vec![(4, 2)]));
    drop(q);
    // But not a term above the first entry's: record 1 rewritten with term 3.
    let mut img = std::fs::read(&path).unwrap();
    put_u64(&mut img, DATA + REC_TERM, 3);
    reseal_record(&mut img, DATA, 80);
    std::fs::write(&path, &img).unwrap();
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        info.cut_reason,
        Some(CutReason::Term {
            seq: 1,
            found: 3,
            expected: 2
        })
    );
    // Nor a term that goes down along the log: record 1 with term 2, then record 2 with term 1.
    put_u64(&mut img, DATA + REC_TERM, 2);
    reseal_record(&mut img, DATA, 80);
    std::fs::write(&path, &img).unwrap();
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        info.cut_reason,
        Some(CutReason::Term {
            seq: 2,
            found: 1,
            expected: 2
        })
    );
}

#[test]
fn set_current_term_only_raises_and_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    q.set_current_term(5).unwrap();
    q.set_current_term(5).unwrap();
    let e = q.set_current_term(4).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::CurrentTermBackwards {
                current: 5,
                requested: 4
            }
        ),
        "{e}"
    );
    // Records may carry an older term than the current one (a backup taking a primary's).
    push_term(&mut q, 2, 10, 0);
    assert_eq!(q.current_term(), 5);
    drop(q);
    let (mut q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(q.current_term(), 5);
    push_term(&mut q, 9, 10, 0);
    assert_eq!(q.current_term(), 9);
    assert_eq!(inspect_queue(&path).unwrap().current_term, 9);
}

#[test]
fn set_role_and_the_superseded_mark_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    push(&mut q, 10, 0);
    q.set_role(Role::Primary, true).unwrap();
    assert_eq!((q.role(), q.superseded()), (Role::Primary, true));
    drop(q);
    // Opened with any configured role, the file says what the node was.
    let (mut q, _) =
        PersistentQueue::open_or_create(&path, &params(4096), Durability::Process).unwrap();
    assert_eq!((q.role(), q.superseded()), (Role::Primary, true));
    assert!(inspect_queue(&path).unwrap().superseded);
    q.set_role(Role::Backup, true).unwrap();
    assert_eq!((q.role(), q.superseded()), (Role::Backup, true));
    q.set_role(Role::Backup, false).unwrap();
    q.set_role(Role::Backup, false).unwrap();
    assert_eq!((q.role(), q.superseded()), (Role::Backup, false));
    drop(q);
    let p = QueueParams {
        role: Role::Backup,
        ..params(4096)
    };
    let (q, rep) = PersistentQueue::open_or_create(&path, &p, Durability::Process).unwrap();
    assert_eq!((q.role(), rep.records), (Role::Backup, 1));
    assert_eq!(inspect_queue(&path).unwrap().role, Role::Backup);
}

#[test]
fn persisted_histories_forget_the_terms_below_the_trim_point() {
    // Many more terms than a slot holds: each record its own term, trimmed as the peer
    // confirms. The history never overflows, and holds the live terms plus one.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for term in 1..=200u64 {
        push_term(&mut q, term, 10, 0);
        if term > 5 {
            q.trim_through(term - 5).unwrap();
        }
        q.sync().unwrap();
    }
    let entries = q.term_history().entries().to_vec();
    assert!(entries.len() <= 6, "{entries:?}");
    assert_eq!(entries.first().unwrap().first_seq, 195);
    drop(q);
    let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(q.term_history().entries(), &entries[..]);
    assert_eq!(terms(&q), (196..=200).map(|s| (s, s)).collect::<Vec<_>>());
    assert_eq!(records(&q).len(), 5);
}

#[test]
fn a_repair_is_unfinished_while_the_queue_still_holds_the_saved_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..2 {
        push_term(&mut q, 3, 10, 0);
    }
    for _ in 0..3 {
        push_term(&mut q, 5, 10, 1);
    }
    assert_eq!(crate::unfinished_repair(&q), None, "nothing saved");
    // A handshake saved the divergent suffix (seqs 3..=5, term 5) and began its repair.
    let saved: Vec<crate::DiscardedRecord> = (3..=5)
        .map(|seq| crate::DiscardedRecord {
            seq,
            term: 5,
            region_offset: offset_for(seq),
            payload: vec![1; 10],
        })
        .collect();
    crate::save_discarded(&crate::discarded_path(&path, 2, 7), 1, 2, 7, &saved).unwrap();
    assert_eq!(
        crate::unfinished_repair(&q),
        Some(2),
        "the suffix is still held"
    );
    // The repair finished: the suffix went and the primary's records (a newer term) follow.
    q.truncate_after(2).unwrap();
    assert_eq!(crate::unfinished_repair(&q), None);
    push_term(&mut q, 9, 10, 2);
    assert_eq!(
        crate::unfinished_repair(&q),
        None,
        "seq 3 is the primary's now"
    );
}
