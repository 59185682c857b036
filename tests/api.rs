//! The Rust API end to end, with a primary and a backup in this process over loopback TCP.

use std::path::Path;
use std::time::{Duration, Instant};

use mirror::{Mirror, MirrorError, Phase, Ticket};

mod common;
use common::base;

fn backup(dir: &Path) -> Mirror {
    let mut b = base(dir, "backup", "1MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    Mirror::open(b.build().unwrap()).unwrap()
}

/// The backup opened again on its files, listening on `addr` (where it listened before).
fn backup_again(dir: &Path, addr: std::net::SocketAddr) -> Mirror {
    let mut b = base(dir, "backup", "1MiB");
    b.set("listen", &addr.to_string()).unwrap();
    Mirror::open(b.build().unwrap()).unwrap()
}

fn primary(dir: &Path, backup: &Mirror, extra: &[(&str, &str)]) -> Mirror {
    let mut b = base(dir, "primary", "1MiB");
    b.set("peer", &backup.listen_addr().unwrap().to_string())
        .unwrap();
    for (k, v) in extra {
        b.set(k, v).unwrap();
    }
    Mirror::open(b.build().unwrap()).unwrap()
}

/// A backup and a primary (`extra` its options) in `dir`, mirroring synchronously.
fn synchronous_pair(dir: &Path, extra: &[(&str, &str)]) -> (Mirror, Mirror) {
    let b = backup(dir);
    let p = primary(dir, &b, extra);
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    (b, p)
}

#[test]
fn write_submit_wait_read_stats_close() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = synchronous_pair(dir.path(), &[("on_peer_loss", "block")]);
    p.write(0, b"hello, mirror").unwrap();
    let mut buf = [0u8; 13];
    p.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"hello, mirror");
    // Pipelined.
    let tickets: Vec<Ticket> = (0..100u64)
        .map(|i| p.submit(1000 + i * 8, &i.to_le_bytes()).unwrap())
        .collect();
    for t in &tickets {
        p.wait(*t, Some(Duration::from_secs(10))).unwrap();
    }
    // Zero-copy view.
    // SAFETY: the region stays mapped while `p` is open, and every write above completed (the
    // poller no longer writes those bytes).
    let view = unsafe { std::slice::from_raw_parts(p.region_ptr(), p.region_len() as usize) };
    assert_eq!(&view[1000 + 99 * 8..1000 + 100 * 8], &99u64.to_le_bytes());
    let s = p.stats();
    assert_eq!(s.phase, Phase::Synchronous);
    assert_eq!(s.writes_completed, 101);
    assert_eq!(s.next_seq, 102);
    assert!(!s.degraded);
    // The backup has every completed write.
    let mut bbuf = [0u8; 13];
    b.read(0, &mut bbuf).unwrap();
    assert_eq!(&bbuf, b"hello, mirror");
    p.close().unwrap();
    p.close().unwrap(); // idempotent
    assert!(matches!(p.write(0, b"x"), Err(MirrorError::Closed)));
    b.close().unwrap();
    let pr = std::fs::read(dir.path().join("primary.region")).unwrap();
    let br = std::fs::read(dir.path().join("backup.region")).unwrap();
    assert_eq!(pr, br);
}

#[test]
fn invalid_calls_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = backup(dir.path());
    assert!(matches!(
        b.write(0, b"x"),
        Err(MirrorError::WrongRole { .. })
    ));
    let p = primary(dir.path(), &b, &[]);
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        p.write(1 << 20, b"x"),
        Err(MirrorError::InvalidWrite(_))
    ));
    assert!(matches!(
        p.write((1 << 20) - 1, b"xy"),
        Err(MirrorError::InvalidWrite(_))
    ));
    assert!(matches!(p.write(0, b""), Err(MirrorError::InvalidWrite(_))));
    assert!(matches!(
        p.write(u64::MAX, b"x"),
        Err(MirrorError::InvalidWrite(_))
    ));
    assert!(matches!(
        p.write(0, &vec![0u8; 2 << 20]),
        Err(MirrorError::InvalidWrite(_))
    ));
    assert!(matches!(
        p.wait(Ticket(0), None),
        Err(MirrorError::UnknownTicket { .. })
    ));
    assert!(matches!(
        p.wait(Ticket(99), None),
        Err(MirrorError::UnknownTicket { .. })
    ));
    let mut big = vec![0u8; 16];
    assert!(p.read((1 << 20) - 8, &mut big).is_err());
    // The region is untouched by all of that.
    assert_eq!(p.stats().next_seq, 1);
}

#[test]
fn stats_stamp_a_catch_up_handshake_and_its_last_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = synchronous_pair(
        dir.path(),
        &[("on_peer_loss", "continue"), ("reconnect_interval_ms", "5")],
    );
    let addr = b.listen_addr().unwrap();
    p.write(0, b"before").unwrap();
    b.close().unwrap();
    drop(b);
    for i in 0..50u64 {
        p.write(64 + i * 8, &i.to_le_bytes()).unwrap();
    }
    let target = p.stats().next_seq - 1;
    let opened = Instant::now();
    let b = backup_again(dir.path(), addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = b.stats();
        if s.applied_through >= target {
            break s;
        }
        assert!(Instant::now() < deadline, "the backup did not catch up");
        std::thread::sleep(Duration::from_millis(1));
    };
    let seen = Instant::now();
    let handshake = s.last_recovery_at.expect("a recovery handshake is stamped");
    let applied = s.applied_at.expect("the catch-up's applies are stamped");
    assert!(opened <= handshake && handshake <= applied && applied <= seen);
    // The stamp is when the applied point last moved, not when the stats were last published.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.stats().applied_at, Some(applied));
    p.close().unwrap();
    b.close().unwrap();
}

#[test]
fn block_policy_write_times_out_without_a_backup_and_completes_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = synchronous_pair(
        dir.path(),
        &[
            ("on_peer_loss", "block"),
            ("ack_timeout_ms", "200"),
            ("reconnect_interval_ms", "20"),
        ],
    );
    let addr = b.listen_addr().unwrap();
    p.write(0, b"first").unwrap();
    b.close().unwrap();
    drop(b);
    let t = p.submit(8, b"second").unwrap();
    assert!(matches!(
        p.wait(t, Some(Duration::from_millis(300))),
        Err(MirrorError::Timeout)
    ));
    let mut buf = [0u8; 6];
    p.read(8, &mut buf).unwrap();
    assert_eq!(
        &buf, &[0u8; 6],
        "a held write is not applied without the backup"
    );
    // The backup returns on the same address and files.
    let b = backup_again(dir.path(), addr);
    p.wait(t, Some(Duration::from_secs(10))).unwrap();
    p.read(8, &mut buf).unwrap();
    assert_eq!(&buf, b"second");
    p.close().unwrap();
    b.close().unwrap();
}

#[test]
fn continue_policy_completes_without_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = base(dir.path(), "primary", "1MiB");
    b.set("peer", "127.0.0.1:1").unwrap(); // nothing listens there
    b.set("on_peer_loss", "continue").unwrap();
    let p = Mirror::open(b.build().unwrap()).unwrap();
    p.write(0, b"alone").unwrap();
    let s = p.stats();
    assert!(s.degraded);
    assert_eq!(s.writes_completed, 1);
    assert!(s.queue_records >= 1, "kept in the queue for the backup");
}

#[test]
fn region_size_mismatch_stops_the_primary_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = backup(dir.path());
    let mut pb = base(dir.path(), "primary", "2MiB");
    pb.set("peer", &b.listen_addr().unwrap().to_string())
        .unwrap();
    let p = Mirror::open(pb.build().unwrap()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.stats().failure.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let f = p.stats().failure.expect("primary failed");
    assert!(f.contains("region") && f.contains("bytes"), "{f}");
    assert!(matches!(p.write(0, b"x"), Err(MirrorError::Failed { .. })));
}

#[test]
fn reopening_with_another_region_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = base(dir.path(), "backup", "1MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    Mirror::open(b.build().unwrap()).unwrap().close().unwrap();
    let mut b = base(dir.path(), "backup", "2MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    let e = Mirror::open(b.build().unwrap()).unwrap_err();
    assert!(matches!(e, MirrorError::Storage(_)), "{e}");
    assert!(e.to_string().contains("region"), "{e}");
}

#[test]
fn rdma_transport_is_refused_clearly_until_built() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = base(dir.path(), "backup", "1MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    b.set("transport", "rdma").unwrap();
    let e = Mirror::open(b.build().unwrap()).unwrap_err();
    assert!(matches!(e, MirrorError::Unsupported(_)), "{e}");
}

#[test]
fn power_durability_mirrors_and_pmem_is_refused_off_dax() {
    let dir = tempfile::tempdir().unwrap();
    let mut bb = base(dir.path(), "backup", "1MiB");
    bb.set("listen", "127.0.0.1:0").unwrap();
    bb.set("durability", "power").unwrap();
    let b = Mirror::open(bb.build().unwrap()).unwrap();
    let p = primary(dir.path(), &b, &[("durability", "power")]);
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    for i in 0..50u64 {
        p.write(i * 16, &i.to_le_bytes()).unwrap();
    }
    // Past the region's write-behind (every 64 KiB written starts a write-back), sixteen deep.
    let mut pending = std::collections::VecDeque::new();
    for i in 0..96u64 {
        pending.push_back(p.submit(65_536 + i * 4096, &[i as u8 + 1; 4096]).unwrap());
        if pending.len() == 16 {
            p.wait(pending.pop_front().unwrap(), None).unwrap();
        }
    }
    for t in pending {
        p.wait(t, None).unwrap();
    }
    p.close().unwrap();
    b.close().unwrap();
    let primary_region = std::fs::read(dir.path().join("primary.region")).unwrap();
    assert_eq!(
        primary_region,
        std::fs::read(dir.path().join("backup.region")).unwrap()
    );
    for i in 0..96usize {
        let at = 65_536 + i * 4096;
        assert!(
            primary_region[at..at + 4096]
                .iter()
                .all(|&x| x == i as u8 + 1),
            "write {i}"
        );
    }
    let other = tempfile::tempdir().unwrap();
    let mut pm = base(other.path(), "backup", "1MiB");
    pm.set("listen", "127.0.0.1:0").unwrap();
    pm.set("durability", "pmem").unwrap();
    let e = Mirror::open(pm.build().unwrap()).unwrap_err();
    assert!(matches!(e, MirrorError::Storage(_)), "{e}");
    assert!(e.to_string().contains("DAX"), "{e}");
}

/// Four threads pipeline on one handle at once, each 64 writes deep (waiting for its oldest),
/// so that their `submit`s take steps of the loop themselves while the others wait, submit or
/// step (a `submit` that finds the loop taken leaves its writes to the holder): every write
/// completes, in order per thread, and both regions hold each thread's last value in each of
/// its slots.
#[test]
fn threads_pipelining_on_one_handle_each_see_every_write_completed() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = synchronous_pair(dir.path(), &[("on_peer_loss", "block")]);
    const THREADS: u64 = 4;
    const WRITES: u64 = 3000;
    const SLOTS: u64 = 512; // per thread, 8 bytes each
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let p = &p;
            s.spawn(move || {
                let mut window = std::collections::VecDeque::new();
                let mut last_done = 0;
                for i in 0..WRITES {
                    if window.len() == 64 {
                        let ticket: Ticket = window.pop_front().unwrap();
                        p.wait(ticket, Some(Duration::from_secs(10))).unwrap();
                        assert!(ticket.0 > last_done, "tickets complete in order");
                        last_done = ticket.0;
                    }
                    let offset = (t * SLOTS + i % SLOTS) * 8;
                    window.push_back(p.submit(offset, &(t << 32 | i).to_le_bytes()).unwrap());
                }
                for ticket in window {
                    p.wait(ticket, Some(Duration::from_secs(10))).unwrap();
                }
            });
        }
    });
    assert_eq!(p.stats().writes_completed, p.stats().writes_submitted);
    // The backup applies behind its acks: give it the moment it needs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.stats().applied_through < p.stats().applied_through {
        assert!(
            Instant::now() < deadline,
            "the backup never applied every write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for t in 0..THREADS {
        for slot in 0..SLOTS {
            // The last write to a slot is the highest i with i % SLOTS == slot.
            let i = (WRITES - 1) - ((WRITES - 1 - slot) % SLOTS);
            let want = (t << 32 | i).to_le_bytes();
            let offset = (t * SLOTS + slot) * 8;
            let (mut on_p, mut on_b) = ([0u8; 8], [0u8; 8]);
            p.read(offset, &mut on_p).unwrap();
            b.read(offset, &mut on_b).unwrap();
            assert_eq!((on_p, on_b), (want, want), "thread {t} slot {slot}");
        }
    }
}
