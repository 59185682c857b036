//! The RDMA verbs transport for real: loopback transport checks, the engine's scenarios over
//! `transport = rdma` (sync writes, SIGKILL of either node under load, recovery, byte-identical
//! regions), the error paths, and the write latency next to the verbs floor.
//!
//! Needs an RDMA device: `ci/softroce-test.sh` runs this binary inside an emulated guest with a
//! soft-RoCE device and sets `MIRROR_RDMA_DEVICE` (and `MIRROR_RDMA_GID_INDEX`). Without that
//! variable every test returns at once, saying why (the host kernel has no RDMA).
#![cfg(feature = "rdma")]

mod common;

use std::time::{Duration, Instant};

use common::campaign::{kill_campaign, Campaign};
use common::*;
use mirror::transport::rdma::{RdmaAcceptor, RdmaConnection, RdmaSettings, RING_BYTES};
use mirror::transport::{Connection, Listener};
use mirror::{ConfigBuilder, Mirror};
use mirror_proto::Message;

/// The device to test on, from the environment; `None` (test skipped, reason printed) without.
fn device() -> Option<RdmaSettings> {
    let Ok(device) = std::env::var("MIRROR_RDMA_DEVICE") else {
        eprintln!(
            "skipped: MIRROR_RDMA_DEVICE is not set (no RDMA here; ci/softroce-test.sh runs these \
             tests in a guest with soft-RoCE)"
        );
        return None;
    };
    let gid_index = std::env::var("MIRROR_RDMA_GID_INDEX")
        .ok()
        .map(|g| g.parse().expect("MIRROR_RDMA_GID_INDEX is a number"));
    Some(RdmaSettings {
        device: Some(device),
        port: 1,
        gid_index,
    })
}

/// `--transport rdma` and the device keys, for test nodes (tests/common Pair's `extra`).
fn rdma_args(s: &RdmaSettings) -> Vec<String> {
    let mut v = vec!["--transport".to_string(), "rdma".to_string()];
    if let Some(d) = &s.device {
        v.extend(["--set".into(), format!("rdma_device={d}")]);
    }
    if let Some(g) = s.gid_index {
        v.extend(["--set".into(), format!("rdma_gid_index={g}")]);
    }
    v
}

/// A connected (client, server) pair over the device.
fn connected(s: &RdmaSettings) -> (RdmaConnection, Box<dyn Connection>) {
    let mut acceptor = RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), s.clone()).unwrap();
    let addr = acceptor.local_addr().unwrap().to_string();
    let cs = s.clone();
    let client = std::thread::spawn(move || RdmaConnection::connect(&addr, &cs));
    let deadline = Instant::now() + Duration::from_secs(20);
    let server = loop {
        if let Some(c) = acceptor.try_accept().unwrap() {
            break c;
        }
        assert!(Instant::now() < deadline, "no RDMA connection accepted");
        std::thread::sleep(Duration::from_millis(1));
    };
    (client.join().unwrap().unwrap(), server)
}

fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize * 31 + i * 7 + (i >> 8)) as u8)
        .collect()
}

#[test]
fn transport_carries_frames_intact_and_in_order_across_ring_wraps() {
    let Some(s) = device() else { return };
    let (mut client, mut server) = connected(&s);
    eprintln!(
        "connected: {} / {} (max inline {} B)",
        client.peer(),
        server.peer(),
        client.max_inline()
    );
    // Sizes from 1 byte (inline) to 3 MiB (most of the ring), about 4 rings in total, then many
    // tiny frames (exercises the receive-depth credits and the piggybacked credit writes).
    let mut sizes: Vec<usize> = Vec::new();
    for round in 0..6 {
        sizes.extend([1, 63, 200, 4096, 65_537, 1 << 20, 3 << 20, 17 + round]);
    }
    sizes.extend(std::iter::repeat(64).take(5000));
    let total: usize = sizes.iter().sum();
    assert!(total as u64 > 4 * RING_BYTES);
    let t = Instant::now();
    let mut next_send = 0usize;
    let mut next_recv = 0usize;
    let mut acked = 0u64;
    let (mut got, mut acks) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while next_recv < sizes.len() || acked < sizes.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "stalled at {next_recv}/{}",
            sizes.len()
        );
        // Keep a few frames queued, like the engine's batches.
        while next_send < sizes.len() && client.pending_send_bytes() < (4 << 20) {
            let seq = next_send as u64 + 1;
            client
                .send_write(seq, 1, seq * 8, &pattern(seq, sizes[next_send]))
                .unwrap();
            next_send += 1;
        }
        client.flush().unwrap();
        server.poll_recv(&mut got, 512).unwrap();
        for m in got.drain(..) {
            let Message::Write {
                seq, offset, data, ..
            } = m
            else {
                panic!("unexpected {m:?}")
            };
            assert_eq!(seq, next_recv as u64 + 1, "frames out of order");
            assert_eq!(offset, seq * 8);
            assert!(
                data[..] == pattern(seq, sizes[next_recv])[..],
                "frame {seq} damaged"
            );
            next_recv += 1;
            server
                .send(&Message::Ack {
                    received_through: seq,
                    applied_through: seq,
                })
                .unwrap();
        }
        server.flush().unwrap();
        client.poll_recv(&mut acks, 512).unwrap();
        for m in acks.drain(..) {
            let Message::Ack {
                received_through, ..
            } = m
            else {
                panic!("unexpected {m:?}")
            };
            assert_eq!(received_through, acked + 1, "acks out of order");
            acked = received_through;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} frames, {:.1} MiB through a {} MiB ring in {secs:.2} s ({:.1} MiB/s), all acknowledged",
        sizes.len(),
        total as f64 / (1 << 20) as f64,
        RING_BYTES >> 20,
        total as f64 / (1 << 20) as f64 / secs
    );
    // The peer going away is an error on the other side (liveness socket or QP), never a hang.
    drop(server);
    let t = Instant::now();
    let err = loop {
        match client.poll_recv(&mut acks, 16) {
            Ok(_) => {
                if client.flush().is_err() {
                    break "flush failed".to_string();
                }
            }
            Err(e) => break e.to_string(),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "peer loss not detected"
        );
    };
    eprintln!(
        "peer loss detected in {:.1} ms: {err}",
        t.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn a_sleeping_receiver_wakes_on_its_wait_fd_when_data_arrives() {
    let Some(s) = device() else { return };
    let (mut client, mut server) = connected(&s);
    let mut got = Vec::new();
    for round in 0..20u64 {
        // Nothing pending: the server's wait fd must not be readable...
        let fd = server.wait_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(
            n, 0,
            "wait fd readable with nothing to read (round {round})"
        );
        // ...and become readable when a frame lands.
        client
            .send(&Message::Applied { through: round + 1 })
            .unwrap();
        assert!(client.flush().unwrap());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "wait fd did not wake on arrival (round {round})");
        let t = Instant::now();
        while server.poll_recv(&mut got, 8).unwrap() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5));
        }
        assert!(matches!(got.pop(), Some(Message::Applied { through }) if through == round + 1));
    }
}

fn node_builder(dir: &std::path::Path, role: &str, s: &RdmaSettings) -> ConfigBuilder {
    let mut b = ConfigBuilder::new();
    b.set("role", role).unwrap();
    b.set(
        "region",
        &dir.join(format!("{role}.region")).display().to_string(),
    )
    .unwrap();
    b.set(
        "queue",
        &dir.join(format!("{role}.queue")).display().to_string(),
    )
    .unwrap();
    b.set("region_size", "1MiB").unwrap();
    b.set("queue_size", "8MiB").unwrap();
    b.set("transport", "rdma").unwrap();
    if let Some(d) = &s.device {
        b.set("rdma_device", d).unwrap();
    }
    if let Some(g) = s.gid_index {
        b.set("rdma_gid_index", &g.to_string()).unwrap();
    }
    b
}

#[test]
fn wrong_device_bad_port_bad_gid_and_unreachable_peer_are_clear_errors() {
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let open_err = |key: &str, value: &str, role: &str| -> String {
        let mut b = node_builder(dir.path(), role, &s);
        b.set(key, value).unwrap();
        if role == "backup" {
            b.set("listen", "127.0.0.1:0").unwrap();
        } else {
            b.set("peer", "127.0.0.1:9").unwrap();
        }
        match Mirror::open(b.build().unwrap()) {
            Ok(_) => panic!("{key}={value} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    for role in ["backup", "primary"] {
        let e = open_err("rdma_device", "mlx5_99", role);
        assert!(e.contains("no RDMA device named 'mlx5_99'"), "{e}");
        let e = open_err("rdma_port", "7", role);
        assert!(e.contains("port 7"), "{e}");
        let e = open_err("rdma_gid_index", "200", role);
        assert!(e.contains("GID index 200"), "{e}");
        eprintln!("{role}: {e}");
    }
    // The port going down (the veth's peer end loses its link): a clear error at open.
    if let Ok(netdev) = std::env::var("MIRROR_RDMA_PEER_NETDEV") {
        let ip = |state: &str| {
            let st = std::process::Command::new("ip")
                .args(["link", "set", &netdev, state])
                .status()
                .unwrap();
            assert!(st.success());
        };
        ip("down");
        std::thread::sleep(Duration::from_millis(300));
        let e = open_err("rdma_port", "1", "backup");
        ip("up");
        assert!(e.contains("DOWN"), "{e}");
        eprintln!("port down: {e}");
        let t = Instant::now();
        while mirror::transport::rdma::probe(&s).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "port did not come back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // An unreachable backup: the primary keeps trying, goes degraded under `continue` and writes.
    let mut b = node_builder(dir.path(), "primary", &s);
    b.set("peer", &format!("127.0.0.1:{}", free_port()))
        .unwrap();
    b.set("reconnect_interval_ms", "20").unwrap();
    let p = Mirror::open(b.build().unwrap()).unwrap();
    p.write(0, b"degraded but alive").unwrap();
    assert!(p.stats().degraded);
    // The CLI: a wrong device is a failed exit with the reason, not a panic or an abort.
    let dir2 = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir2.path(), "continue");
    let mut args = pair.backup_args();
    args.extend([
        "--transport".into(),
        "rdma".into(),
        "--set".into(),
        "rdma_device=nosuchdev0".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("no RDMA device named 'nosuchdev0'"), "{err}");
}

#[test]
fn synchronous_writes_over_rdma_end_byte_identical() {
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path(), "block");
    pair.extra = rdma_args(&s);
    pair.write_size = 1000;
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 1);
    primary.wait_until("3000 synchronous writes", Duration::from_secs(120), |p| {
        p.num("progress", "completed") >= 3000
            && p.get("progress", "phase").as_deref() == Some("synchronous")
    });
    assert_eq!(primary.get("progress", "degraded").as_deref(), Some("0"));
    eprintln!(
        "sync writes over RDMA: {} completed, p50 {} us, p99 {} us",
        primary.num("progress", "completed"),
        primary.get("progress", "p50_us").unwrap_or_default(),
        primary.get("progress", "p99_us").unwrap_or_default()
    );
    finish_and_verify(&pair, primary, Some(backup), 0);
}

/// A reduced kill campaign (the full one is tests/crash_recovery.rs over TCP), over RDMA.
fn rdma_kill_campaign(policy: &'static str, rounds: usize, seed: u64) {
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path(), policy);
    pair.extra = rdma_args(&s);
    let campaign = Campaign {
        rounds,
        seed,
        // Under `continue` a degraded primary applies writes the backup does not hold, by design.
        freeze_checks: policy == "block",
        step_timeout: Duration::from_secs(60),
        max_load_ms: 80,
    };
    kill_campaign(&pair, &campaign);
}

#[test]
fn sigkill_of_either_node_under_load_over_rdma_loses_no_completed_write() {
    rdma_kill_campaign("continue", 6, 0x5eed_0d1a);
}

#[test]
fn sigkill_under_load_over_rdma_with_block() {
    rdma_kill_campaign("block", 4, 0x5eed_0d1b);
}

#[test]
fn write_latency_over_rdma_next_to_the_verbs_floor() {
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec![("transport", "rdma".to_string())];
    if let Some(d) = &s.device {
        extra.push(("rdma_device", d.clone()));
    }
    if let Some(g) = s.gid_index {
        extra.push(("rdma_gid_index", g.to_string()));
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pair = mirror::bench::LocalPair::open(dir.path(), 1 << 20, &extra).unwrap();
    let iterations: usize = std::env::var("MIRROR_RDMA_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let raw_floor_us: Option<f64> = std::env::var("MIRROR_IBV_RC_PINGPONG_US")
        .ok()
        .and_then(|v| v.parse().ok());
    println!("\nsync write latency over RDMA (rxe) next to the verbs floor, {iterations} samples each, interleaved:");
    println!(
        "{:>7}  {:>24}  {:>24}  {:>14}",
        "payload", "verbs ping-pong p50/p99", "engine write p50/p99", "ratio p50/p99"
    );
    for payload in [64usize, 4096] {
        let c = mirror::bench::compare_sync_write_rdma(&pair, payload, iterations, &s).unwrap();
        println!(
            "{:>6}B  {:>11.1} / {:>8.1} us  {:>11.1} / {:>8.1} us  {:>6.2} / {:>5.2}",
            payload,
            c.floor.p50_us,
            c.floor.p99_us,
            c.engine.p50_us,
            c.engine.p99_us,
            c.ratio_p50(),
            c.ratio_p99()
        );
        if let (Some(raw), 64) = (raw_floor_us, payload) {
            println!(
                "         ibv_rc_pingpong 64 B (raw verbs, SEND/RECV): {raw:.1} us/round trip; engine p50 / that = {:.2}",
                c.engine.p50_us / raw
            );
        }
    }
    println!("(emulated CPU: absolute times are inflated; the ratios are what count)");
    let stats = pair.primary.stats();
    assert!(!stats.degraded, "the pair must stay synchronous");
}

/// With a secret, the setup channel authenticates and every frame on the data path travels in
/// a tagged record: a pair mirrors byte-identical, and a node with another secret gets nowhere.
#[test]
fn an_authenticated_pair_mirrors_over_rdma_and_a_wrong_secret_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = dir.path().join(name);
        let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.display().to_string()
    };
    let (pair_key, other_key) = (key("pair.key"), key("other.key"));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut b = node_builder(dir.path(), "backup", &s);
    b.set("listen", &addr).unwrap();
    b.set("secret_file", &pair_key).unwrap();
    let backup = Mirror::open(b.build().unwrap()).unwrap();
    let mut a = node_builder(dir.path(), "primary", &s);
    a.set("peer", &addr).unwrap();
    a.set("secret_file", &pair_key).unwrap();
    let primary = Mirror::open(a.build().unwrap()).unwrap();
    primary.wait_synchronous(Duration::from_secs(60)).unwrap();
    assert_eq!(primary.stats().auth, "secret");
    for i in 0..300u64 {
        primary.write((i % 256) * 4096, &pattern(i, 4096)).unwrap();
    }
    // An intruder with another secret aims at the same backup.
    let idir = tempfile::tempdir().unwrap();
    let mut x = node_builder(idir.path(), "primary", &s);
    x.set("peer", &addr).unwrap();
    x.set("secret_file", &other_key).unwrap();
    let intruder = Mirror::open(x.build().unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(intruder.stats().phase, mirror::Phase::Synchronous);
    intruder.close().unwrap();
    for i in 300..400u64 {
        primary.write((i % 256) * 4096, &pattern(i, 4096)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while backup.stats().applied_through != primary.stats().applied_through {
        assert!(Instant::now() < deadline, "the backup did not catch up");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(backup.stats().peer_node_id, primary.stats().node_id);
    let len = primary.region_len() as usize;
    let (mut ra, mut rb) = (vec![0u8; len], vec![0u8; len]);
    primary.read(0, &mut ra).unwrap();
    backup.read(0, &mut rb).unwrap();
    assert!(ra == rb, "regions differ");
}
