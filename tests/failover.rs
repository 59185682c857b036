//! Failover through the Rust API, both nodes in this process over loopback TCP: promotion of
//! the backup, rejoin of the old primary as a backup (exact repair, no remirror), live demotion,
//! fencing of a stale primary, and every refusal.

use std::path::Path;
use std::time::{Duration, Instant};

use mirror::{Mirror, MirrorError, Phase, Role};

mod common;
use common::{failover_node, free_port};

const REGION: &str = "1MiB";

/// Node `name` in `dir`: it listens on `own` and knows `peer`, so it can take either role.
fn node(dir: &Path, name: &str, role: &str, own: u16, peer: u16, extra: &[(&str, &str)]) -> Mirror {
    failover_node(
        dir,
        name,
        role,
        &format!("127.0.0.1:{own}"),
        &format!("127.0.0.1:{peer}"),
        extra,
    )
}

/// A primary `a` and a backup `b` in `dir`, each knowing the other's address, and their ports.
fn pair(
    dir: &Path,
    a_extra: &[(&str, &str)],
    b_extra: &[(&str, &str)],
) -> (Mirror, Mirror, (u16, u16)) {
    let (pa, pb) = (free_port(), free_port());
    let a = node(dir, "a", "primary", pa, pb, a_extra);
    let b = node(dir, "b", "backup", pb, pa, b_extra);
    (a, b, (pa, pb))
}

/// Writes `n` 64-byte records, record `i` at `(base + i) * 64 % region` with bytes `tag, i`.
fn write_some(m: &Mirror, base: u64, n: u64, tag: u8) {
    for i in 0..n {
        let mut data = [tag; 64];
        data[..8].copy_from_slice(&(base + i).to_le_bytes());
        m.write(((base + i) * 64) % (1 << 20), &data).unwrap();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `backup` applied everything `primary` did, then compares the two regions.
fn assert_mirrored(primary: &Mirror, backup: &Mirror) {
    primary.wait_synchronous(Duration::from_secs(20)).unwrap();
    wait_until("the backup to apply what the primary did", || {
        let (p, b) = (primary.stats(), backup.stats());
        b.applied_through == p.applied_through && b.next_seq == p.next_seq
    });
    let len = primary.region_len() as usize;
    let (mut pb, mut bb) = (vec![0u8; len], vec![0u8; len]);
    primary.read(0, &mut pb).unwrap();
    backup.read(0, &mut bb).unwrap();
    assert!(pb == bb, "regions differ");
}

#[test]
fn promoted_backup_takes_writes_and_the_old_primary_rejoins_without_remirror() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, (pa, pb)) = pair(
        dir.path(),
        &[("on_peer_loss", "block")],
        &[("on_peer_loss", "continue")],
    );
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    write_some(&a, 0, 200, 1);
    let old_term = a.stats().current_term;
    // The primary dies (its machine is gone).
    drop(a);
    wait_until("the backup to see the primary gone", || {
        b.stats().phase == Phase::Disconnected
    });
    let t0 = Instant::now();
    let term = b.promote(false).unwrap();
    assert!(term > old_term, "new term {term} above {old_term}");
    b.write(0, b"first write of the new primary").unwrap();
    eprintln!(
        "failover: promote -> first completed write {:?}",
        t0.elapsed()
    );
    assert_eq!(
        (b.stats().role, b.stats().current_term),
        (Role::Primary, term)
    );
    write_some(&b, 1000, 100, 2);
    // The old primary comes back as a backup: it meets the higher term and catches up.
    let a = node(dir.path(), "a", "backup", pa, pb, &[]);
    assert_mirrored(&b, &a);
    let s = b.stats();
    assert!(
        s.last_recovery_records <= 101,
        "moved only what was missed: {s:?}"
    );
    assert_eq!(a.stats().role, Role::Backup);
    assert!(matches!(
        a.write(0, b"x"),
        Err(MirrorError::WrongRole { .. })
    ));
}

#[test]
fn live_demote_and_promote_swap_the_roles_back_and_forth() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _) = pair(
        dir.path(),
        &[("on_peer_loss", "block")],
        &[("on_peer_loss", "block")],
    );
    let (mut primary, mut backup) = (&a, &b);
    for round in 0..4u64 {
        primary.wait_synchronous(Duration::from_secs(20)).unwrap();
        write_some(primary, round * 100, 50, round as u8);
        assert_mirrored(primary, backup);
        primary.demote().unwrap();
        assert!(matches!(
            primary.write(0, b"x"),
            Err(MirrorError::WrongRole { .. })
        ));
        wait_until("the old backup to see its primary go", || {
            backup.stats().phase == Phase::Disconnected
        });
        backup.promote(false).unwrap();
        std::mem::swap(&mut primary, &mut backup);
        assert_eq!(primary.stats().role, Role::Primary);
        assert_eq!(backup.stats().role, Role::Backup);
    }
    primary.wait_synchronous(Duration::from_secs(20)).unwrap();
    write_some(primary, 5000, 10, 9);
    assert_mirrored(primary, backup);
}

#[test]
fn a_forced_promotion_fences_the_old_primary_which_rejoins_as_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _) = pair(
        dir.path(),
        &[("on_peer_loss", "block")],
        &[("on_peer_loss", "block")],
    );
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    write_some(&a, 0, 20, 1);
    wait_until("the backup to be connected", || {
        b.stats().phase == Phase::Synchronous
    });
    let e = b.promote(false).unwrap_err();
    assert!(
        matches!(
            e,
            MirrorError::Promote(mirror_proto::PromoteError::PeerAlive { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("force"), "{e}");
    let term = b.promote(true).unwrap();
    // The old primary learns of the newer term at its first contact: no write of its old term
    // completes after that.
    wait_until("the old primary to be fenced", || {
        a.stats().fenced.is_some()
    });
    let e = a.write(0, b"stale").unwrap_err();
    assert!(matches!(e, MirrorError::Fenced { .. }), "{e}");
    assert!(
        e.to_string().contains(&term.to_string()) || e.to_string().contains("newer"),
        "{e}"
    );
    // Demoted (the default `on_fenced`), it rejoins the new primary.
    wait_until("the old primary to become a backup", || {
        a.stats().role == Role::Backup
    });
    write_some(&b, 100, 20, 2);
    assert_mirrored(&b, &a);
    // Still fenced until promoted again.
    assert!(matches!(a.write(0, b"x"), Err(MirrorError::Fenced { .. })));
}

#[test]
fn a_fenced_primary_that_stops_is_refused_as_a_primary_at_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let stop = [("on_peer_loss", "block"), ("on_fenced", "stop")];
    let (a, b, (pa, pb)) = pair(dir.path(), &stop, &[("on_peer_loss", "block")]);
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    write_some(&a, 0, 10, 1);
    wait_until("the backup to be connected", || {
        b.stats().phase == Phase::Synchronous
    });
    b.promote(true).unwrap();
    wait_until("the old primary to stop", || {
        a.stats().phase == Phase::Failed
    });
    let e = a.write(0, b"x").unwrap_err();
    assert!(matches!(e, MirrorError::Fenced { .. }), "{e}");
    drop(a);
    let mut cfg = mirror::ConfigBuilder::new();
    for (k, v) in [
        ("role", "primary"),
        ("region", &dir.path().join("a.region").to_string_lossy()),
        ("queue", &dir.path().join("a.queue").to_string_lossy()),
        ("region_size", REGION),
        ("queue_size", "4MiB"),
        ("peer", &format!("127.0.0.1:{pb}")),
    ] {
        cfg.set(k, v).unwrap();
    }
    let e = Mirror::open(cfg.build().unwrap()).unwrap_err();
    assert!(matches!(e, MirrorError::Fenced { .. }), "{e}");
    assert!(e.to_string().contains("backup"), "says what to do: {e}");
    // As a backup it rejoins.
    let a = node(dir.path(), "a", "backup", pa, pb, &[]);
    write_some(&b, 100, 10, 2);
    assert_mirrored(&b, &a);
}

#[test]
fn promotions_and_demotions_that_cannot_be_done_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _) = pair(dir.path(), &[("on_peer_loss", "block")], &[]);
    let e = a.promote(false).unwrap_err();
    assert!(
        matches!(
            e,
            MirrorError::Promote(mirror_proto::PromoteError::AlreadyPrimary { .. })
        ),
        "{e}"
    );
    let e = b.demote().unwrap_err();
    assert!(
        matches!(
            e,
            MirrorError::Demote(mirror_proto::DemoteError::AlreadyBackup)
        ),
        "{e}"
    );
    drop((a, b));
    // A backup without `peer` has nobody to connect to as a primary; a primary without
    // `listen` cannot be reached as a backup.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = mirror::ConfigBuilder::new();
    for (k, v) in [
        ("role", "backup"),
        ("region", &dir.path().join("c.region").to_string_lossy()),
        ("queue", &dir.path().join("c.queue").to_string_lossy()),
        ("region_size", REGION),
        ("listen", "127.0.0.1:0"),
    ] {
        cfg.set(k, v).unwrap();
    }
    let c = Mirror::open(cfg.build().unwrap()).unwrap();
    let e = c.promote(false).unwrap_err();
    assert!(e.to_string().contains("peer"), "{e}");
    let mut cfg = mirror::ConfigBuilder::new();
    for (k, v) in [
        ("role", "primary"),
        ("region", &dir.path().join("d.region").to_string_lossy()),
        ("queue", &dir.path().join("d.queue").to_string_lossy()),
        ("region_size", REGION),
        ("peer", "127.0.0.1:9"),
    ] {
        cfg.set(k, v).unwrap();
    }
    let d = Mirror::open(cfg.build().unwrap()).unwrap();
    let e = d.demote().unwrap_err();
    assert!(e.to_string().contains("listen"), "{e}");
}
