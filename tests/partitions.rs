//! Link faults between two real processes, through a fault-injecting proxy (no root needed):
//! stalls (silent partition: bytes held, connections open), cuts (resets), half-open peers
//! (connections accepted and never answered) and delay. Every scenario ends with every completed
//! write on both nodes and byte-identical regions.

mod common;

use std::time::Duration;

use common::proxy::{FaultProxy, Mode};
use common::*;

fn pair_through_proxy(dir: &std::path::Path, policy: &'static str) -> (Pair, FaultProxy) {
    let mut pair = Pair::new(dir, policy);
    // Under `continue`, writes made while the link is down fill the primary's queue until it
    // pushes back; a bounded rate keeps these scenarios about faults, not about a full queue.
    pair.rate = 5_000;
    let proxy = FaultProxy::start(pair.addr.parse().unwrap());
    pair.peer = Some(proxy.addr.to_string());
    pair.extra.extend([
        "--set".to_string(),
        "ack_timeout_ms=300".to_string(),
        "--set".to_string(),
        "handshake_timeout_ms=300".to_string(),
    ]);
    (pair, proxy)
}

fn wait_writes(primary: &mut Node, more: u64) {
    let from = primary.num("progress", "completed");
    primary.wait_until("writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") >= from + more
    });
}

#[test]
fn stalled_link_with_continue_goes_degraded_then_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, proxy) = pair_through_proxy(dir.path(), "continue");
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    wait_writes(&mut primary, 500);
    proxy.set_mode(Mode::Stall);
    primary.wait_until("ack timeout -> degraded", Duration::from_secs(10), |p| {
        p.get("progress", "degraded").as_deref() == Some("1")
    });
    wait_writes(&mut primary, 500); // writes go on while the link is stalled
    let recoveries = primary.num("progress", "recoveries");
    proxy.set_mode(Mode::Pass);
    primary.wait_until("catch-up after the stall", Duration::from_secs(30), |p| {
        p.num("progress", "recoveries") > recoveries
            && p.get("progress", "phase").as_deref() == Some("synchronous")
    });
    assert!(primary.num("progress", "rec_records") > 0);
    wait_writes(&mut primary, 200);
    finish_and_verify(&pair, primary, Some(backup), 0);
}

#[test]
fn stalled_link_with_block_holds_writes_then_completes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, proxy) = pair_through_proxy(dir.path(), "block");
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    wait_writes(&mut primary, 500);
    proxy.set_mode(Mode::Stall);
    primary.wait_until("ack timeout", Duration::from_secs(10), |p| {
        p.get("progress", "phase").as_deref() != Some("synchronous")
    });
    std::thread::sleep(Duration::from_millis(300));
    let held = primary.num("progress", "completed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        primary.num("progress", "completed") <= held + 4,
        "writes completed through a stalled link under block"
    );
    proxy.set_mode(Mode::Pass);
    wait_writes(&mut primary, 500);
    finish_and_verify(&pair, primary, Some(backup), 0);
}

#[test]
fn half_open_backup_is_abandoned_by_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, proxy) = pair_through_proxy(dir.path(), "continue");
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 1);
    wait_writes(&mut primary, 200);
    // New connections are accepted and never answered; the current one is reset.
    proxy.set_mode(Mode::Blackhole);
    proxy.cut();
    primary.wait_until("degraded", Duration::from_secs(10), |p| {
        p.get("progress", "degraded").as_deref() == Some("1")
    });
    // The handshake with the half-open peer times out (and is retried) ...
    let log_path = primary.log.clone();
    primary.wait_until("a handshake timeout", Duration::from_secs(10), |_| {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("handshake made no progress")
    });
    // ... while the primary keeps writing.
    wait_writes(&mut primary, 300);
    proxy.set_mode(Mode::Pass);
    proxy.cut();
    primary.wait_until("synchronous again", Duration::from_secs(30), |p| {
        p.get("progress", "phase").as_deref() == Some("synchronous")
            && p.get("progress", "degraded").as_deref() == Some("0")
    });
    finish_and_verify(&pair, primary, Some(backup), 0);
}

#[test]
fn repeated_cuts_and_delay_under_load_lose_nothing() {
    for policy in ["continue", "block"] {
        let dir = tempfile::tempdir().unwrap();
        let (pair, proxy) = pair_through_proxy(dir.path(), policy);
        let backup = pair.start_backup(0);
        let mut primary = pair.start_primary(0, 0, 8);
        let mut rng = 0x9e37_79b9_u64;
        for round in 0..12 {
            wait_writes(&mut primary, 50);
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            proxy.set_delay(Duration::from_micros(if round % 3 == 0 { 500 } else { 0 }));
            proxy.cut();
            std::thread::sleep(Duration::from_millis(rng % 40));
        }
        proxy.set_delay(Duration::ZERO);
        wait_writes(&mut primary, 100);
        assert!(proxy.forwarded() > 0);
        finish_and_verify(&pair, primary, Some(backup), 0);
    }
}

#[test]
fn a_full_queue_while_degraded_folds_into_the_bitmap_and_writes_go_on_then_resyncs_when_the_link_heals(
) {
    let dir = tempfile::tempdir().unwrap();
    let (mut pair, proxy) = pair_through_proxy(dir.path(), "continue");
    pair.rate = 0;
    pair.extra
        .extend(["--set".to_string(), "queue_size=256KiB".to_string()]);
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    wait_writes(&mut primary, 200);
    proxy.set_mode(Mode::Stall);
    primary.wait_until("degraded", Duration::from_secs(10), |p| {
        p.get("progress", "degraded").as_deref() == Some("1")
    });
    // About 1,800 records of 64 B fill three quarters of 256 KiB: ten times that many writes
    // complete while the link stalls (each reconnect's handshake stalls too), because the
    // queue folds into the dirty-chunk bitmap instead of making writes wait.
    let start = primary.num("progress", "completed");
    primary.wait_until("writes past ten queues", Duration::from_secs(120), |p| {
        p.num("progress", "completed") >= start + 18_000
    });
    assert!(
        primary.num("progress", "dirty_chunks") > 0,
        "the bitmap took over"
    );
    let queued = primary.num("progress", "queue_bytes");
    assert!(queued <= 256 << 10, "queue_bytes {queued}");
    proxy.set_mode(Mode::Pass);
    primary.wait_until("resynced and synchronous", Duration::from_secs(60), |p| {
        p.get("progress", "phase").as_deref() == Some("synchronous")
            && p.get("progress", "dirty_chunks").as_deref() == Some("0")
    });
    wait_writes(&mut primary, 2000);
    finish_and_verify(&pair, primary, Some(backup), 0);
}

/// A connection half-open toward the backup while the primary is idle. The primary still hears
/// the backup's heartbeats, so only the backup can notice, by the primary's heartbeats going
/// missing; it drops the connection, and the reconnect's Hello carries the apply point that the
/// held bytes could not deliver. (Simulator seed 21520 found the state this left behind: a
/// backup that kept records it should have trimmed, for good.)
#[test]
fn an_idle_connection_half_open_toward_the_backup_is_dropped_by_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    let node = |role: &str| {
        let mut b = base(dir.path(), role, "1MiB");
        for (k, v) in [
            ("ack_timeout_ms", "300"),
            ("handshake_timeout_ms", "300"),
            ("reconnect_interval_ms", "20"),
        ] {
            b.set(k, v).unwrap();
        }
        b
    };
    let mut b_cfg = node("backup");
    b_cfg.set("listen", "127.0.0.1:0").unwrap();
    let backup = mirror::Mirror::open(b_cfg.build().unwrap()).unwrap();
    let proxy = FaultProxy::start(backup.listen_addr().unwrap());
    let mut p_cfg = node("primary");
    p_cfg.set("peer", &proxy.addr.to_string()).unwrap();
    p_cfg.set("on_peer_loss", "block").unwrap();
    let primary = mirror::Mirror::open(p_cfg.build().unwrap()).unwrap();
    primary.wait_synchronous(Duration::from_secs(10)).unwrap();
    for i in 0..20u64 {
        primary.write(i * 8, &i.to_le_bytes()).unwrap();
    }
    let wait = |what: &str, timeout: Duration, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + timeout;
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Idle from here on; whatever the primary sends is held.
    let recoveries = backup.stats().recoveries;
    proxy.set_mode(Mode::StallTowardUpstream);
    wait(
        "the backup drops the silent primary",
        Duration::from_secs(10),
        &|| backup.stats().phase != mirror::Phase::Synchronous,
    );
    proxy.set_mode(Mode::Pass);
    wait(
        "reconnected, and the backup trimmed everything",
        Duration::from_secs(10),
        &|| {
            let s = backup.stats();
            s.recoveries > recoveries && s.peer_applied_through == 20 && s.queue_records == 0
        },
    );
    primary.wait_synchronous(Duration::from_secs(10)).unwrap();
    primary.write(4096, b"after").unwrap();
    primary.close().unwrap();
    backup.close().unwrap();
    let p_region = std::fs::read(dir.path().join("primary.region")).unwrap();
    let b_region = std::fs::read(dir.path().join("backup.region")).unwrap();
    assert!(p_region == b_region, "regions differ");
}

/// A catch-up far larger than the send pause (8 MiB) into a link that stalls in the middle of
/// it: the primary streams what the network takes, keeps its poller free, notices the silent
/// backup within its ack timeout and goes on degraded. (It used to flush in a blocking loop
/// for up to 30 s, holding the poller, and then reported a send backlog "over 0 bytes".)
#[test]
fn a_catch_up_into_a_stalled_link_does_not_hold_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pair, proxy) = pair_through_proxy(dir.path(), "continue");
    pair.rate = 0;
    pair.write_size = 4096;
    pair.extra
        .extend(["--set".to_string(), "queue_size=256MiB".to_string()]);
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 16);
    wait_writes(&mut primary, 200);
    proxy.set_mode(Mode::Stall);
    primary.wait_until("degraded", Duration::from_secs(10), |p| {
        p.get("progress", "degraded").as_deref() == Some("1")
    });
    // About 120 MiB of degraded writes for the catch-up, which the proxy then slows to about
    // 13 MB/s (64 KiB per 5 ms): it takes seconds.
    wait_writes(&mut primary, 30_000);
    proxy.cut();
    proxy.set_delay(Duration::from_millis(5));
    let recoveries = primary.num("progress", "recoveries");
    proxy.set_mode(Mode::Pass);
    primary.wait_until("the catch-up starts", Duration::from_secs(30), |p| {
        p.num("progress", "recoveries") > recoveries
    });
    std::thread::sleep(Duration::from_millis(300));
    proxy.set_mode(Mode::Stall);
    let stalled_at = std::time::Instant::now();
    primary.wait_until(
        "degraded within the ack timeout",
        Duration::from_secs(5),
        |p| p.get("progress", "degraded").as_deref() == Some("1"),
    );
    eprintln!(
        "degraded {:?} after the link stalled mid catch-up",
        stalled_at.elapsed()
    );
    wait_writes(&mut primary, 200);
    proxy.set_delay(Duration::ZERO);
    proxy.set_mode(Mode::Pass);
    finish_and_verify(&pair, primary, Some(backup), 0);
}
