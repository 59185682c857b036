//! Every queue API call and every error variant the queue can produce.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::{new_queue, offset_for, params, payload, push, records, REGION};
use crate::format::{META_SLOT_OFF, OFF_TAIL};
use crate::{inspect_queue, Durability, PersistentQueue, QueueParams, Role, StorageError};

fn patch(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn new_queue_is_empty_and_starts_at_seq_1() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 8192);
    assert_eq!(q.path(), path);
    assert_eq!(q.durability(), Durability::Process);
    assert_eq!(q.node_id(), 11);
    assert_eq!(q.role(), Role::Primary);
    assert_eq!(q.region_size(), REGION);
    assert_eq!(q.capacity_bytes(), 8192);
    assert_eq!(q.peer_node_id(), 0);
    assert_eq!(q.applied_through(), 0);
    assert_eq!(q.next_seq(), 1);
    assert_eq!(q.first_seq(), None);
    assert_eq!(q.last_seq(), 0);
    assert_eq!(q.len_records(), 0);
    assert_eq!(q.used_bytes(), 0);
    assert_eq!(q.free_bytes(), 8192);
    assert_eq!(q.max_payload(), 8192 / 4 - 56);
    assert_eq!(q.current_term(), 0);
    assert!(q.term_history().is_empty());
    assert_eq!(q.iter_from(0).count(), 0);
    assert_eq!(q.epoch(), 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096 + 8192);
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    drop(q);
    let e = PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap_err();
    assert!(
        matches!(e, StorageError::AlreadyExists { path: ref p } if *p == path),
        "{e}"
    );
    let other = dir.path().join("not-a-queue");
    std::fs::write(&other, b"hello").unwrap();
    let e = PersistentQueue::create(&other, &params(4096), Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), b"hello");
}

#[test]
fn create_refuses_invalid_params() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let bad = [
        QueueParams {
            capacity_bytes: 0,
            ..params(4096)
        },
        QueueParams {
            capacity_bytes: 5000,
            ..params(4096)
        },
        QueueParams {
            capacity_bytes: 1 << 50,
            ..params(4096)
        },
        QueueParams {
            node_id: 0,
            ..params(4096)
        },
        QueueParams {
            region_size: 0,
            ..params(4096)
        },
    ];
    for p in bad {
        let e = PersistentQueue::create(&path, &p, Durability::Process).unwrap_err();
        assert!(
            matches!(e, StorageError::InvalidArgument { .. }),
            "{p:?}: {e}"
        );
        assert!(!path.exists());
    }
}

#[test]
fn appended_records_read_back_in_order_from_any_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 8192);
    let max = q.max_payload();
    for len in [1usize, 7, 8, 9, 100, 5000] {
        push(&mut q, len.min(max), 0);
    }
    let all = records(&q);
    assert_eq!(all.len(), 6);
    for (i, (seq, off, p)) in all.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(*off, offset_for(*seq));
        assert_eq!(*p, payload(*seq, p.len(), 0));
    }
    let from4: Vec<u64> = q.iter_from(4).map(|r| r.unwrap().seq).collect();
    assert_eq!(from4, vec![4, 5, 6]);
    assert_eq!(q.iter_from(7).count(), 0);
    assert_eq!(q.first_seq(), Some(1));
    assert_eq!(q.last_seq(), 6);
    assert_eq!(q.next_seq(), 7);
    assert_eq!(q.len_records(), 6);
    assert_eq!(q.used_bytes() + q.free_bytes(), 8192);
}

#[test]
fn payload_bytes_counts_a_seq_range_from_the_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 8192);
    let max = q.max_payload();
    let lens: Vec<usize> = [1usize, 7, 8, 9, 100, 5000]
        .iter()
        .map(|l| (*l).min(max))
        .collect();
    for len in &lens {
        push(&mut q, *len, 0);
    }
    let sum = |from: usize, through: usize| lens[from - 1..through].iter().sum::<usize>() as u64;
    assert_eq!(q.payload_bytes(1, 6), sum(1, 6));
    assert_eq!(q.payload_bytes(2, 4), sum(2, 4));
    assert_eq!(q.payload_bytes(6, 6), sum(6, 6));
    assert_eq!(q.payload_bytes(7, 9), 0);
    // The same as reading the bodies.
    let read: u64 = q
        .iter_from(3)
        .map(|r| r.unwrap().payload.len() as u64)
        .sum();
    assert_eq!(q.payload_bytes(3, 6), read);
    q.trim_through(2).unwrap();
    assert_eq!(q.payload_bytes(1, 6), sum(3, 6));
}

#[test]
fn append_with_wrong_seq_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    push(&mut q, 10, 0);
    for bad in [0, 1, 3, u64::MAX] {
        let e = q.append(bad, 1, 0, b"x").unwrap_err();
        assert!(
            matches!(e, StorageError::SeqOutOfOrder { expected: 2, got } if got == bad),
            "{e}"
        );
    }
    assert_eq!(q.next_seq(), 2);
}

#[test]
fn payload_must_be_1_to_max_payload_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    let e = q.append(1, 1, 0, &[]).unwrap_err();
    assert!(
        matches!(e, StorageError::PayloadSize { len: 0, max: m } if m == max),
        "{e}"
    );
    let e = q.append(1, 1, 0, &vec![1u8; max + 1]).unwrap_err();
    assert!(
        matches!(e, StorageError::PayloadSize { len, .. } if len == max + 1),
        "{e}"
    );
    q.append(1, 1, 0, &vec![1u8; max]).unwrap();
    assert_eq!(records(&q)[0].2.len(), max);
}

#[test]
fn append_outside_the_region_is_refused_without_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    for (off, len) in [
        (REGION, 1usize),
        (REGION - 1, 2),
        (u64::MAX, 1),
        (u64::MAX - 3, 8),
    ] {
        let e = q.append(1, 1, off, &vec![0u8; len]).unwrap_err();
        assert!(
            matches!(e, StorageError::OutOfRange { offset, len: l, size: REGION } if offset == off && l == len as u64),
            "{e}"
        );
    }
    q.append(1, 1, REGION - 1, b"z").unwrap();
}

#[test]
fn full_queue_reports_needed_and_free_and_recovers_after_trim() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    let len = q.max_payload(); // 1024-byte records: exactly 4 fit
    for _ in 0..4 {
        push(&mut q, len, 0);
    }
    assert_eq!(q.free_bytes(), 0);
    let e = q.append(5, 1, 0, &vec![0u8; len]).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Full {
                needed: 1024,
                free: 0
            }
        ),
        "{e}"
    );
    assert_eq!(q.next_seq(), 5, "a refused append changes nothing");
    assert_eq!(q.len_records(), 4);
    q.trim_through(1).unwrap();
    assert_eq!(q.free_bytes(), 1024);
    push(&mut q, len, 0);
    assert_eq!(
        records(&q).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
}

#[test]
fn a_record_that_must_wrap_needs_the_rest_of_the_lap_too() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    let max = q.max_payload();
    push(&mut q, 100, 0); // 160 bytes at 0
    for _ in 0..3 {
        push(&mut q, max, 0); // 1024 bytes each: tail at 3232, 864 bytes left in the lap
    }
    q.trim_through(1).unwrap(); // head at 160: 1024 bytes free, but split 864 + 160
    assert_eq!(q.free_bytes(), 1024);
    // A backup's room check sees it coming; a write of 800 bytes (856 with its header) fits in
    // the rest of the lap and leaves 168 bytes, so the next one of 200 bytes (256 with its
    // header, after a skip of 8) does not fit, but one of 100 (160 + 8) does. Duplicates and
    // non-writes take no room.
    assert_eq!(q.first_write_without_room([Some((5, max))]), Some(0));
    assert_eq!(
        q.first_write_without_room([None, Some((5, 800)), Some((4, 9)), Some((6, 200))]),
        Some(3)
    );
    assert_eq!(
        q.first_write_without_room([Some((5, 800)), Some((6, 100))]),
        None
    );
    let e = q.append(5, 1, 0, &vec![0u8; max]).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Full {
                needed: 1888,
                free: 1024
            }
        ),
        "{e}"
    );
    // A record that fits in the rest of the lap does not wrap.
    q.append(5, 1, 0, &vec![0u8; 800]).unwrap();
    assert_eq!(q.used_bytes(), 3 * 1024 + 856);
}

#[test]
fn trim_is_idempotent_clamped_and_never_moves_next_seq_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..10 {
        push(&mut q, 50, 0);
    }
    q.trim_through(0).unwrap();
    assert_eq!(q.first_seq(), Some(1));
    q.trim_through(4).unwrap();
    q.trim_through(4).unwrap();
    q.trim_through(2).unwrap();
    assert_eq!(q.first_seq(), Some(5));
    assert_eq!(q.len_records(), 6);
    assert_eq!(records(&q).first().unwrap().0, 5);
    q.trim_through(1000).unwrap(); // clamped to last_seq
    assert_eq!(q.first_seq(), None);
    assert_eq!(q.len_records(), 0);
    assert_eq!(q.used_bytes(), 0);
    assert_eq!(q.next_seq(), 11);
    assert_eq!(q.last_seq(), 10);
    drop(q);
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(
        q.next_seq(),
        11,
        "empty queue keeps its numbering across reopen"
    );
    assert_eq!(rep.records, 0);
    assert_eq!(rep.last_seq, 10);
    assert_eq!(rep.first_seq, None);
    push(&mut q, 5, 0);
    assert_eq!(q.first_seq(), Some(11));
}

#[test]
fn reset_to_jumps_forward_only_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..3 {
        push(&mut q, 20, 0);
    }
    let e = q.reset_to(2).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::ResetBackwards {
                current: 4,
                requested: 2
            }
        ),
        "{e}"
    );
    q.reset_to(4).unwrap(); // same number: just drops the records
    assert_eq!((q.len_records(), q.next_seq()), (0, 4));
    q.reset_to(100).unwrap();
    assert_eq!(
        (q.len_records(), q.next_seq(), q.first_seq()),
        (0, 100, None)
    );
    drop(q);
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((rep.records, rep.next_seq), (0, 100));
    assert!(!rep.reset_marker_written);
    push(&mut q, 20, 1);
    push(&mut q, 20, 1);
    drop(q);
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(
        records(&q).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![100, 101]
    );
    assert_eq!(rep.first_seq, Some(100));
    let mut q = q;
    let e = q.reset_to(u64::MAX).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
}

#[test]
fn a_reset_record_drops_earlier_records_even_if_the_trim_point_was_lost() {
    // Power loss after reset_to: the RESET record reached the media, the trimmed_through word
    // (same barrier, other cache line) did not.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    push(&mut q, 20, 0);
    push(&mut q, 20, 0);
    q.reset_to(10).unwrap();
    drop(q);
    patch(
        &path,
        crate::format::OFF_TRIMMED_THROUGH as u64,
        &0u64.to_le_bytes(),
    );
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((rep.records, rep.first_seq, rep.next_seq), (0, None, 10));
    assert_eq!(records(&q), vec![]);
    assert_eq!(q.first_seq(), None);
}

#[test]
fn durable_trims_past_the_surviving_log_get_a_reset_record() {
    // Power loss: trimmed_through = 5 reached the media, records 3..=5 did not. Recovery must
    // continue at 6 and say so in the log, or record 6 would look like a gap after record 2.
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..5 {
        push(&mut q, 20, 0); // 80 bytes each
    }
    q.trim_through(5).unwrap();
    drop(q);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0u8; 3 * 80], 4096 + 2 * 80).unwrap();
    drop(f);
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert!(rep.reset_marker_written);
    assert_eq!(
        (rep.records, rep.next_seq, rep.torn_tail_cut_bytes),
        (0, 6, 3 * 80)
    );
    push(&mut q, 20, 1);
    drop(q);
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert!(!rep.reset_marker_written);
    assert_eq!(records(&q).iter().map(|r| r.0).collect::<Vec<_>>(), vec![6]);
}

#[test]
fn peer_and_applied_through_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    q.set_peer_node_id(42).unwrap();
    q.set_applied_through(7).unwrap();
    q.set_applied_through(9).unwrap();
    assert_eq!((q.peer_node_id(), q.applied_through()), (42, 9));
    drop(q);
    let (mut q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((q.peer_node_id(), q.applied_through()), (42, 9));
    q.set_peer_node_id(0).unwrap();
    drop(q);
    let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(q.peer_node_id(), 0);
}

#[test]
fn every_open_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    assert_eq!(q.epoch(), 1);
    drop(q);
    for want in 2..5 {
        let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
        assert_eq!((q.epoch(), rep.epoch), (want, want));
    }
}

#[test]
fn open_of_a_missing_file_is_an_io_not_found_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("absent"), "{e}");
}

#[test]
fn open_refuses_a_file_that_is_not_a_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    for content in [
        &b""[..],
        b"abc",
        b"LMIRQUE\0",
        &[0u8; 100][..],
        &[0xffu8; 5000][..],
    ] {
        std::fs::write(&path, content).unwrap();
        let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
        let ok = matches!(e, StorageError::BadMagic { .. })
            || (content.starts_with(b"LMIRQUE\0")
                && matches!(e, StorageError::CorruptHeader { .. }));
        assert!(ok, "{content:?}: {e}");
        assert!(inspect_queue(&path).is_err());
    }
}

#[test]
fn open_refuses_another_format_version() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    drop(q);
    patch(&path, 8, &3u32.to_le_bytes());
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 3"), "{e}");
}

#[test]
fn open_detects_a_damaged_header() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    drop(q);
    // Every byte of the crc-covered static block and of the stored crc itself.
    for at in 12..64u64 {
        let orig = std::fs::read(&path).unwrap();
        patch(&path, at, &[orig[at as usize] ^ 0x10]);
        let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
        assert!(
            matches!(e, StorageError::HeaderChecksum { .. }),
            "byte {at}: {e}"
        );
        std::fs::write(&path, &orig).unwrap();
    }
    PersistentQueue::open(&path, Durability::Process).unwrap();
}

#[test]
fn one_damaged_meta_slot_falls_back_to_the_other_and_two_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    q.set_applied_through(5).unwrap(); // gen 3, slot A (create gen 1 = A, open gen 2 = B)
    q.set_applied_through(6).unwrap(); // gen 4, slot B
    drop(q);
    // Damage slot B (the newest): falls back to A (applied_through 5, the previous durable
    // value). Which slot is newest is read from the file, not assumed.
    let img = std::fs::read(&path).unwrap();
    let gen = |slot: usize| {
        u64::from_le_bytes(
            img[META_SLOT_OFF[slot]..META_SLOT_OFF[slot] + 8]
                .try_into()
                .unwrap(),
        )
    };
    let newest = if gen(0) > gen(1) { 0 } else { 1 };
    patch(&path, META_SLOT_OFF[newest] as u64 + 16, &[0xAA]);
    let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(q.applied_through(), 5);
    drop(q);
    for slot in META_SLOT_OFF {
        patch(&path, slot as u64 + 24, &[0xAA, 0xBB]);
    }
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::MetaChecksum { .. }), "{e}");
    let e = inspect_queue(&path).unwrap_err();
    assert!(matches!(e, StorageError::MetaChecksum { .. }), "{e}");
}

#[test]
fn open_refuses_a_file_of_the_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    drop(q);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096 + 4000).unwrap();
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::CorruptHeader { .. }), "{e}");
    assert!(e.to_string().contains("8096 bytes"), "{e}");
    f.set_len(100).unwrap();
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::CorruptHeader { .. }), "{e}");
}

#[test]
fn open_or_create_creates_then_reopens_and_checks_role_and_region_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let p = params(4096);
    let (mut q, rep) = PersistentQueue::open_or_create(&path, &p, Durability::Process).unwrap();
    assert_eq!(
        (rep.records, rep.next_seq, rep.torn_tail_cut_bytes),
        (0, 1, 0)
    );
    push(&mut q, 10, 0);
    drop(q);
    let (q, rep) = PersistentQueue::open_or_create(&path, &p, Durability::Process).unwrap();
    assert_eq!(rep.records, 1);
    drop(q);

    // The role of an existing file is state, not identity: opening it "as a backup" opens it,
    // and the file says what it was (the node decides what that means).
    let (q, _) = PersistentQueue::open_or_create(
        &path,
        &QueueParams {
            role: Role::Backup,
            ..p
        },
        Durability::Process,
    )
    .unwrap();
    assert_eq!((q.role(), q.superseded()), (Role::Primary, false));
    drop(q);

    let e = PersistentQueue::open_or_create(
        &path,
        &QueueParams {
            region_size: 4096,
            ..p
        },
        Durability::Process,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::RegionSizeMismatch {
                file: REGION,
                expected: 4096,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains(&REGION.to_string()) && e.to_string().contains("4096"),
        "{e}"
    );
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let (q, path) = new_queue(dir.path(), 4096);
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::Locked { .. }), "{e}");
    let info = inspect_queue(&path).unwrap();
    assert!(info.in_use);
    drop(q);
    assert!(!inspect_queue(&path).unwrap().in_use);
    PersistentQueue::open(&path, Durability::Process).unwrap();
}

#[test]
fn pmem_refuses_a_file_that_is_not_on_dax() {
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if std::path::Path::new("/dev/shm").is_dir() {
        dirs.push(tempfile::tempdir_in("/dev/shm").unwrap()); // tmpfs
    }
    for dir in &dirs {
        let path = dir.path().join("q");
        let e = PersistentQueue::create(&path, &params(4096), Durability::Pmem).unwrap_err();
        assert!(
            matches!(e, StorageError::NotDax { .. }),
            "{}: {e}",
            dir.path().display()
        );
        assert!(e.to_string().contains("DAX"), "{e}");
        assert!(
            !path.exists(),
            "a refused pmem create must not leave a file"
        );
        // An existing queue opened in pmem mode.
        drop(PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap());
        let e = PersistentQueue::open(&path, Durability::Pmem).unwrap_err();
        assert!(matches!(e, StorageError::NotDax { .. }), "{e}");
    }
}

#[test]
fn power_mode_syncs_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let mut q = PersistentQueue::create(&path, &params(4096), Durability::Power).unwrap();
    for _ in 0..20 {
        push(&mut q, 100, 0);
        if q.len_records() > 10 {
            q.trim_through(q.last_seq() - 5).unwrap();
        }
        q.sync().unwrap();
    }
    q.sync().unwrap(); // nothing dirty: cheap
    q.set_applied_through(3).unwrap();
    let want = records(&q);
    drop(q);
    let (q, rep) = PersistentQueue::open(&path, Durability::Power).unwrap();
    assert_eq!(records(&q), want);
    assert_eq!(rep.torn_tail_cut_bytes, 0);
    assert_eq!(q.applied_through(), 3);
}

#[test]
fn iter_from_reports_a_record_damaged_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = new_queue(dir.path(), 4096);
    for _ in 0..3 {
        push(&mut q, 30, 0);
    }
    // Damage the second record's payload behind the queue's back (as bit rot would).
    let second = 56 + 32; // first record: 56 + 30 -> 88 bytes
    let at = crate::format::HEADER_BYTES as usize + second + 56 + 3;
    q.map.bytes_mut(at, 1)[0] ^= 0xFF;
    let got: Vec<_> = q.iter_from(0).collect();
    assert_eq!(got.len(), 2, "the iterator stops after the error");
    assert!(got[0].is_ok());
    let e = got[1].as_ref().unwrap_err();
    assert!(
        matches!(e, StorageError::CorruptRecord { at: 88, .. }),
        "{e}"
    );
    // Skipping over it without reading it is fine.
    assert_eq!(
        q.iter_from(3).map(|r| r.unwrap().seq).collect::<Vec<_>>(),
        vec![3]
    );
}

#[test]
fn inspect_reports_what_recovery_would_do_without_modifying_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    q.set_peer_node_id(5).unwrap();
    for _ in 0..6 {
        push(&mut q, 60, 0);
    }
    q.trim_through(2).unwrap();
    drop(q);
    // Tear the last record (60 bytes of payload: 120-byte records).
    let last_at = 4096 + 5 * 120;
    patch(&path, last_at + 60, &[0x55]);
    let before = std::fs::read(&path).unwrap();
    let info = inspect_queue(&path).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "inspect must not write"
    );
    assert_eq!(info.format_version, 2);
    assert_eq!(
        (
            info.node_id,
            info.role,
            info.region_size,
            info.capacity_bytes
        ),
        (11, Role::Primary, REGION, 4096)
    );
    assert_eq!((info.peer_node_id, info.applied_through), (5, 0));
    assert_eq!(
        (info.records, info.first_seq, info.last_seq, info.next_seq),
        (3, Some(3), 5, 6)
    );
    assert_eq!(info.torn_tail_cut_bytes, 120);
    assert_eq!(info.cut_reason, Some(crate::CutReason::Checksum));
    assert_eq!(info.tail_hint, 6 * 120);
    assert_eq!(info.current_term, 1);
    assert_eq!(info.term_history, super::history(&[(1, 1)]));
    assert!(!info.in_use);
    let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!(
        (rep.records, rep.bytes, rep.first_seq, rep.last_seq),
        (info.records, info.bytes, info.first_seq, info.last_seq)
    );
    assert_eq!(
        (rep.torn_tail_cut_bytes, rep.cut_reason),
        (info.torn_tail_cut_bytes, info.cut_reason)
    );
    assert_eq!(q.used_bytes(), info.bytes);
}

#[test]
fn inspect_never_panics_on_garbage_behind_a_valid_header() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 8192);
    for _ in 0..10 {
        push(&mut q, 300, 0);
    }
    drop(q);
    let good = std::fs::read(&path).unwrap();
    let mut rng = super::Rng(7);
    for round in 0..200 {
        let mut img = good.clone();
        // Random bytes over the cursor line and/or the data area.
        let n = 1 + rng.below(64) as usize;
        for _ in 0..n {
            let at = if round % 4 == 0 {
                192 + rng.below(64) as usize
            } else {
                4096 + rng.below(8192) as usize
            };
            img[at] = rng.next() as u8;
        }
        std::fs::write(&path, &img).unwrap();
        let _ = inspect_queue(&path);
        if let Ok((q, _)) = PersistentQueue::open(&path, Durability::Process) {
            // Whatever survived verifies.
            let _ = records(&q);
        }
    }
}

#[test]
fn the_tail_hint_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, path) = new_queue(dir.path(), 4096);
    for _ in 0..3 {
        push(&mut q, 10, 0);
    }
    drop(q);
    for bogus in [0u64, 8, 1 << 40, u64::MAX] {
        patch(&path, OFF_TAIL as u64, &bogus.to_le_bytes());
        let (q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
        assert_eq!(rep.records, 3, "tail hint {bogus}");
        assert_eq!(q.next_seq(), 4);
    }
}

#[test]
fn durability_and_role_parse_and_print() {
    for d in [Durability::Process, Durability::Power, Durability::Pmem] {
        assert_eq!(d.to_string().parse::<Durability>().unwrap(), d);
    }
    assert_eq!("power".parse::<Durability>().unwrap(), Durability::Power);
    let e = "fast".parse::<Durability>().unwrap_err();
    assert!(e.to_string().contains("process, power, pmem"), "{e}");
    for r in [Role::Primary, Role::Backup] {
        assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
    }
    assert!("leader".parse::<Role>().is_err());
}

#[test]
fn error_messages_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue-file-name");
    std::fs::write(&path, [0u8; 64]).unwrap();
    let e = PersistentQueue::open(&path, Durability::Process).unwrap_err();
    assert!(e.to_string().contains("queue-file-name"), "{e}");
}

/// Ranges of `path` that the filesystem keeps as preallocated-but-unwritten extents (FIEMAP),
/// or `None` where it cannot say (no FIEMAP: tmpfs, say).
fn unwritten_extents(path: &std::path::Path) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    const EXTENTS: usize = 256;
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [Extent; EXTENTS],
    }
    let file = std::fs::File::open(path).unwrap();
    let empty = Extent {
        logical: 0,
        physical: 0,
        length: 0,
        reserved64: [0; 2],
        flags: 0,
        reserved: [0; 3],
    };
    let mut map = Box::new(Fiemap {
        start: 0,
        length: u64::MAX,
        flags: FIEMAP_FLAG_SYNC,
        mapped_extents: 0,
        extent_count: EXTENTS as u32,
        reserved: 0,
        extents: [empty; EXTENTS],
    });
    // SAFETY: FS_IOC_FIEMAP reads the header of `map` and writes at most `extent_count`
    // extents into the array that follows it, which `map` owns for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
    if rc != 0 {
        return None;
    }
    let n = (map.mapped_extents as usize).min(EXTENTS);
    Some(
        map.extents[..n]
            .iter()
            .filter(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN != 0)
            .map(|e| (e.logical, e.length))
            .collect(),
    )
}

/// A `power` queue syncs after every append, and a first write into a preallocated
/// ("unwritten") block makes that sync commit the filesystem's journal too (3.4x the sync's
/// time in the lab's emulated machine): its record area is written once at creation. A `power`
/// region is not (it can be far larger; it syncs at checkpoints), and opening it must not dirty
/// it either (populating its mapping for writing did: the first checkpoint then wrote the whole
/// region back): its preallocated blocks are still unwritten after open and a sync. A plain
/// preallocated file beside them shows that the check sees unwritten blocks where the
/// filesystem keeps them.
#[test]
fn power_files_keep_no_unwritten_queue_blocks_and_open_dirties_no_region_page() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("preallocated");
    let f = std::fs::File::create(&control).unwrap();
    crate::map::allocate(&f, 1 << 20, &control).unwrap();
    match unwritten_extents(&control) {
        Some(u) if !u.is_empty() => {}
        _ => {
            eprintln!(
                "skipped: the filesystem of {} keeps no unwritten extents (or has no FIEMAP)",
                dir.path().display()
            );
            return;
        }
    }
    let queue = dir.path().join("power.queue");
    let q = PersistentQueue::create(&queue, &params(1 << 20), Durability::Power).unwrap();
    let unwritten = unwritten_extents(&queue).unwrap();
    assert!(
        unwritten.is_empty(),
        "queue blocks left unwritten: {unwritten:?}"
    );
    drop(q);
    let region = dir.path().join("power.region");
    let r = crate::Region::open_or_create(&region, 4 << 20, Durability::Power).unwrap();
    r.sync().unwrap();
    // FIEMAP_FLAG_SYNC writes back whatever is dirty: a dirtied page would turn its block
    // into a written one.
    let unwritten: u64 = unwritten_extents(&region)
        .unwrap()
        .iter()
        .map(|e| e.1)
        .sum();
    assert_eq!(unwritten, 4 << 20, "open dirtied region pages");
}
