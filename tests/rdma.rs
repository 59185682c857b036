//! The RDMA verbs transport for real: loopback transport checks, the engine's scenarios over
//! `transport = rdma` (sync writes, SIGKILL of either node under load, recovery, byte-identical
//! regions), the error paths, and the write latency next to the verbs floor.
//!
//! Needs an RDMA device: `ci/softroce-test.sh` runs this binary inside an emulated guest with a
//! soft-RoCE device and sets `MIRROR_RDMA_DEVICE` (and `MIRROR_RDMA_GID_INDEX`). Without that
//! variable every test returns at once, saying why (the host kernel has no RDMA).
//!
//! The two-ended tests (the transport's, and the authenticated pair's) also run with one end on
//! each of two machines (two kernels, the network between them): with
//! `MIRROR_RDMA_ACROSS=server:HOST:PORT` on one machine and `client:HOST:PORT` on the other,
//! each runs its half (the two-machine lab's `rdma` scenario, ci/lab/lab.sh, does this). The
//! engine's other scenarios across machines are the lab's own: nodes on two machines, power
//! cuts over RDMA, the installed library.
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

/// The device's config keys (`rdma_device`, `rdma_gid_index`), for nodes opened in this process.
fn device_keys(s: &RdmaSettings) -> Vec<(&'static str, String)> {
    let mut keys = Vec::new();
    if let Some(d) = &s.device {
        keys.push(("rdma_device", d.clone()));
    }
    if let Some(g) = s.gid_index {
        keys.push(("rdma_gid_index", g.to_string()));
    }
    keys
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

/// Where the two ends of a transport test run. Unset `MIRROR_RDMA_ACROSS`: both here, over the
/// local device. `server:HOST:PORT` / `client:HOST:PORT`: one end on each of two machines (the
/// two-machine lab runs this binary on both, ci/lab/lab.sh `rdma`), the server accepting at
/// HOST:PORT + the test's offset, the client connecting there; each runs its half of the test.
enum Ends {
    Both,
    Server(std::net::SocketAddr),
    Client(String),
}

fn ends(port_offset: u16) -> Ends {
    let Ok(across) = std::env::var("MIRROR_RDMA_ACROSS") else {
        return Ends::Both;
    };
    let (side, addr) = across
        .split_once(':')
        .expect("MIRROR_RDMA_ACROSS is server:HOST:PORT or client:HOST:PORT");
    let mut addr: std::net::SocketAddr = addr
        .parse()
        .expect("MIRROR_RDMA_ACROSS names HOST:PORT (an IP address)");
    addr.set_port(addr.port() + port_offset);
    match side {
        "server" => Ends::Server(addr),
        "client" => Ends::Client(addr.to_string()),
        other => panic!("MIRROR_RDMA_ACROSS: side '{other}' is neither server nor client"),
    }
}

/// The server end at `addr`, once a client connected (within `within`).
fn accept_at(
    addr: std::net::SocketAddr,
    s: &RdmaSettings,
    within: Duration,
) -> Box<dyn Connection> {
    let mut acceptor = RdmaAcceptor::bind(addr, s.clone()).unwrap();
    accept_within(&mut acceptor, within)
}

/// The first connection `acceptor` takes within `within`.
fn accept_within(acceptor: &mut RdmaAcceptor, within: Duration) -> Box<dyn Connection> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(c) = acceptor.try_accept().unwrap() {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no RDMA connection accepted at {:?}",
            acceptor.local_addr()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The client end, connected to `addr` (retried while the other machine's server starts).
fn connect_to(addr: &str, s: &RdmaSettings) -> RdmaConnection {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match RdmaConnection::connect(addr, s) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no RDMA connection to {addr}: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A connected (client, server) pair over the device, both ends here.
fn connected(s: &RdmaSettings) -> (RdmaConnection, Box<dyn Connection>) {
    let mut acceptor = RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), s.clone()).unwrap();
    let addr = acceptor.local_addr().unwrap().to_string();
    let cs = s.clone();
    let client = std::thread::spawn(move || RdmaConnection::connect(&addr, &cs));
    let server = accept_within(&mut acceptor, Duration::from_secs(20));
    (client.join().unwrap().unwrap(), server)
}

fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize * 31 + i * 7 + (i >> 8)) as u8)
        .collect()
}

/// The client's last frame in the frames test: the server may go once it has it (so that the
/// client sees the peer go only after every ack reached it).
const GOODBYE: u64 = u64::MAX;

/// Sizes from 1 byte (inline) to 3 MiB (most of the ring), about 4 rings in total, then many
/// tiny frames (exercises the receive-depth credits and the piggybacked credit writes).
fn frame_sizes() -> Vec<usize> {
    let mut sizes: Vec<usize> = Vec::new();
    for round in 0..6 {
        sizes.extend([1, 63, 200, 4096, 65_537, 1 << 20, 3 << 20, 17 + round]);
    }
    sizes.extend(std::iter::repeat_n(64, 5000));
    assert!(sizes.iter().sum::<usize>() as u64 > 4 * RING_BYTES);
    sizes
}

/// The sending half: keeps a few frames queued (like the engine's batches), checks the acks'
/// order, and says goodbye once every frame is acknowledged.
struct FrameSender<'a> {
    sizes: &'a [usize],
    next_send: usize,
    acked: u64,
    acks: Vec<Message>,
    said_goodbye: bool,
}

impl FrameSender<'_> {
    /// One round of sending and reaping acks; true once everything is acknowledged.
    fn step(&mut self, client: &mut RdmaConnection) -> bool {
        while self.next_send < self.sizes.len() && client.pending_send_bytes() < (4 << 20) {
            let seq = self.next_send as u64 + 1;
            let data = pattern(seq, self.sizes[self.next_send]);
            client
                .send_write(seq, 1, seq * 8, &data, crc32c::crc32c(&data))
                .unwrap();
            self.next_send += 1;
        }
        client.flush().unwrap();
        client.poll_recv(&mut self.acks, 512).unwrap();
        for m in self.acks.drain(..) {
            let Message::Ack {
                received_through, ..
            } = m
            else {
                panic!("unexpected {m:?}")
            };
            assert_eq!(received_through, self.acked + 1, "acks out of order");
            self.acked = received_through;
        }
        if self.acked == self.sizes.len() as u64 && !self.said_goodbye {
            client.send(&Message::Applied { through: GOODBYE }).unwrap();
            self.said_goodbye = true;
        }
        self.said_goodbye && client.flush().unwrap()
    }
}

/// The receiving half: checks every frame's order and bytes and acknowledges it.
struct FrameReceiver<'a> {
    sizes: &'a [usize],
    next_recv: usize,
    got: Vec<Message>,
    goodbye: bool,
}

impl FrameReceiver<'_> {
    /// One round of receiving and acknowledging; true once the client said goodbye.
    fn step(&mut self, server: &mut dyn Connection) -> bool {
        server.poll_recv(&mut self.got, 512).unwrap();
        for m in self.got.drain(..) {
            match m {
                Message::Write {
                    seq, offset, data, ..
                } => {
                    assert_eq!(seq, self.next_recv as u64 + 1, "frames out of order");
                    assert_eq!(offset, seq * 8);
                    assert!(
                        data[..] == pattern(seq, self.sizes[self.next_recv])[..],
                        "frame {seq} damaged"
                    );
                    self.next_recv += 1;
                    server
                        .send(&Message::Ack {
                            received_through: seq,
                            applied_through: seq,
                        })
                        .unwrap();
                }
                Message::Applied { through: GOODBYE } => {
                    assert_eq!(
                        self.next_recv,
                        self.sizes.len(),
                        "goodbye before the last frame"
                    );
                    self.goodbye = true;
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        server.flush().unwrap();
        self.goodbye
    }
}

/// The peer going away is an error on the other side (liveness socket or QP), never a hang.
fn expect_peer_loss(client: &mut RdmaConnection) {
    let t = Instant::now();
    let mut acks = Vec::new();
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
fn transport_carries_frames_intact_and_in_order_across_ring_wraps() {
    let Some(s) = device() else { return };
    let sizes = frame_sizes();
    let total: usize = sizes.iter().sum();
    let mut sender = FrameSender {
        sizes: &sizes,
        next_send: 0,
        acked: 0,
        acks: Vec::new(),
        said_goodbye: false,
    };
    let mut receiver = FrameReceiver {
        sizes: &sizes,
        next_recv: 0,
        got: Vec::new(),
        goodbye: false,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let stalled = |sender: &FrameSender, receiver: &FrameReceiver| {
        format!(
            "stalled: {} frames received, {} acknowledged, of {}",
            receiver.next_recv,
            sender.acked,
            sizes.len()
        )
    };
    let t = Instant::now();
    match ends(0) {
        Ends::Both => {
            let (mut client, mut server) = connected(&s);
            eprintln!(
                "connected: {} / {} (max inline {} B)",
                client.peer(),
                server.peer(),
                client.max_inline()
            );
            let (mut sent, mut received) = (false, false);
            while !(sent && received) {
                assert!(Instant::now() < deadline, "{}", stalled(&sender, &receiver));
                sent = sender.step(&mut client);
                received = receiver.step(&mut *server);
            }
            drop(server);
            report_frames(&sizes, total, t);
            expect_peer_loss(&mut client);
        }
        Ends::Server(addr) => {
            let mut server = accept_at(addr, &s, Duration::from_secs(300));
            eprintln!("server end at {addr}, client {}", server.peer());
            while !receiver.step(&mut *server) {
                assert!(Instant::now() < deadline, "{}", stalled(&sender, &receiver));
            }
            report_frames(&sizes, total, t);
        }
        Ends::Client(addr) => {
            let mut client = connect_to(&addr, &s);
            eprintln!(
                "client end, server {} (max inline {} B)",
                client.peer(),
                client.max_inline()
            );
            while !sender.step(&mut client) {
                assert!(Instant::now() < deadline, "{}", stalled(&sender, &receiver));
            }
            report_frames(&sizes, total, t);
            expect_peer_loss(&mut client);
        }
    }
}

fn report_frames(sizes: &[usize], total: usize, t: Instant) {
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} frames, {:.1} MiB through a {} MiB ring in {secs:.2} s ({:.1} MiB/s), all acknowledged",
        sizes.len(),
        total as f64 / (1 << 20) as f64,
        RING_BYTES >> 20,
        total as f64 / (1 << 20) as f64 / secs
    );
}

/// The server end's half of the wake test: `rounds` times, its wait fd is not readable while
/// nothing is pending, and becomes readable when the next frame lands.
fn wait_fd_wakes_on_each_frame(
    server: &mut dyn Connection,
    rounds: u64,
    wake_within_ms: i32,
    mut send_round: impl FnMut(u64),
) {
    let mut got = Vec::new();
    for round in 0..rounds {
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
        // ...and become readable when a frame lands (sent here by `send_round`, or by the other
        // machine on its own clock).
        send_round(round);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, wake_within_ms) };
        assert_eq!(n, 1, "wait fd did not wake on arrival (round {round})");
        let t = Instant::now();
        while server.poll_recv(&mut got, 8).unwrap() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5));
        }
        assert!(matches!(got.pop(), Some(Message::Applied { through }) if through == round + 1));
    }
}

#[test]
fn a_sleeping_receiver_wakes_on_its_wait_fd_when_data_arrives() {
    let Some(s) = device() else { return };
    let frame = |round: u64| Message::Applied { through: round + 1 };
    match ends(1) {
        Ends::Both => {
            let (mut client, mut server) = connected(&s);
            wait_fd_wakes_on_each_frame(&mut *server, 20, 5000, |round| {
                client.send(&frame(round)).unwrap();
                assert!(client.flush().unwrap());
            });
        }
        Ends::Server(addr) => {
            let mut server = accept_at(addr, &s, Duration::from_secs(300));
            // The client sends a frame every ACROSS_GAP: long after the check for nothing
            // pending, which follows the previous frame at once.
            let wake_within = (ACROSS_GAP.as_millis() + 5000) as i32;
            wait_fd_wakes_on_each_frame(&mut *server, ACROSS_ROUNDS, wake_within, |_| {});
            server.send(&Message::Applied { through: GOODBYE }).unwrap();
            while !server.flush().unwrap() {}
            // The client goes once it has the goodbye; its going ends this connection.
            let t = Instant::now();
            while server.poll_recv(&mut Vec::new(), 8).is_ok()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ends::Client(addr) => {
            let mut client = connect_to(&addr, &s);
            for round in 0..ACROSS_ROUNDS {
                std::thread::sleep(ACROSS_GAP);
                client.send(&frame(round)).unwrap();
                assert!(client.flush().unwrap());
            }
            let (t, mut got) = (Instant::now(), Vec::new());
            while !got
                .iter()
                .any(|m| matches!(m, Message::Applied { through: GOODBYE }))
            {
                client.poll_recv(&mut got, 8).unwrap();
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "no goodbye from the server"
                );
            }
        }
    }
}

/// The wake test across machines: rounds, and the time between the client's frames.
const ACROSS_ROUNDS: u64 = 10;
const ACROSS_GAP: Duration = Duration::from_secs(1);

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

/// A returning backup knocks at an RDMA primary's setup listener (a TCP connection closed at
/// once, no setup record): the primary dials at once instead of at its next reconnect
/// interval (a minute here).
#[test]
fn a_returning_backup_knocks_at_an_rdma_primary() {
    let Some(s) = device() else { return };
    let mut keys = device_keys(&s);
    keys.push(("transport", "rdma".to_string()));
    let extra: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let back = returning_backup(&extra, true, Duration::from_secs(20));
    assert!(
        back.is_some(),
        "the primary did not dial the knocking backup in time"
    );
}

/// What `mirror bench --rdma-iterations` measures (its figures come from the release build;
/// this test build is compiled at opt-level 1): both the engine's writes and the verbs
/// ping-pong run, every sample is kept, and the pair stays synchronous.
#[test]
fn rdma_sync_writes_run_beside_the_verbs_ping_pong() {
    let Some(s) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let keys = device_keys(&s);
    let extra: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let comparisons =
        mirror::bench::rdma_sync_writes(dir.path(), &extra, &[64, 4096], 200).unwrap();
    assert_eq!(comparisons.len(), 2);
    for c in &comparisons {
        assert_eq!(
            c.floor_ns.len(),
            200,
            "{} B: every ping-pong sample",
            c.payload
        );
        assert_eq!(
            c.engine_ns.len(),
            200,
            "{} B: every write's sample",
            c.payload
        );
        assert!(c.floor.p50_us > 0.0 && c.engine.p50_us > 0.0);
        println!(
            "{} B (test build): verbs ping-pong p50 {:.1} us, sync write p50 {:.1} us",
            c.payload, c.floor.p50_us, c.engine.p50_us
        );
    }
}

/// The writes of the authenticated pair's test: 4 KiB at slot `i % 256` of the 1 MiB region.
const AUTH_TEST_WRITES: u64 = 400;

/// The region those writes leave (each slot holds the last write to it), so that each machine
/// can check its own region without the other's.
fn auth_test_region() -> Vec<u8> {
    let mut region = vec![0u8; 1 << 20];
    for i in 0..AUTH_TEST_WRITES {
        let at = ((i % 256) * 4096) as usize;
        region[at..at + 4096].copy_from_slice(&pattern(i, 4096));
    }
    region
}

/// The primary's half: waits to be synchronous (authenticated), makes 300 writes, lets an
/// intruder with another secret try the same backup for 3 s (it must get nowhere), makes the
/// last 100 writes, and checks its own region. Returns the primary's node id.
fn authenticated_primary_half(
    dir: &std::path::Path,
    addr: &str,
    key: &str,
    other_key: &str,
    s: &RdmaSettings,
) -> u64 {
    let mut a = node_builder(dir, "primary", s);
    a.set("peer", addr).unwrap();
    a.set("secret_file", key).unwrap();
    let primary = Mirror::open(a.build().unwrap()).unwrap();
    primary.wait_synchronous(Duration::from_secs(120)).unwrap();
    assert_eq!(primary.stats().auth, "secret");
    for i in 0..300u64 {
        primary.write((i % 256) * 4096, &pattern(i, 4096)).unwrap();
    }
    // An intruder with another secret aims at the same backup.
    let idir = tempfile::tempdir().unwrap();
    let mut x = node_builder(idir.path(), "primary", s);
    x.set("peer", addr).unwrap();
    x.set("secret_file", other_key).unwrap();
    let intruder = Mirror::open(x.build().unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(intruder.stats().phase, mirror::Phase::Synchronous);
    intruder.close().unwrap();
    for i in 300..AUTH_TEST_WRITES {
        primary.write((i % 256) * 4096, &pattern(i, 4096)).unwrap();
    }
    assert!(!primary.stats().degraded, "the pair must stay synchronous");
    let mut region = vec![0u8; primary.region_len() as usize];
    primary.read(0, &mut region).unwrap();
    assert!(
        region == auth_test_region(),
        "the primary's region is not what it wrote"
    );
    let node_id = primary.stats().node_id;
    primary.close().unwrap();
    node_id
}

/// The backup's half: once its region holds every write (within `within`), it is exactly the
/// region the primary's writes leave, and the peer it knows is the authenticated one.
fn authenticated_backup_wait(backup: &Mirror, within: Duration) {
    let expected = auth_test_region();
    let mut region = vec![0u8; backup.region_len() as usize];
    let deadline = Instant::now() + within;
    loop {
        backup.read(0, &mut region).unwrap();
        if region == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backup's region never became the primary's (applied through {})",
            backup.stats().applied_through
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(backup.stats().peer_node_id, 0);
}

/// With a secret, the setup channel authenticates and every frame on the data path travels in
/// a tagged record: a pair mirrors byte-identical, and a node with another secret gets nowhere.
/// Across two machines (`MIRROR_RDMA_ACROSS`) the pair's secret is the file both machines name
/// in `MIRROR_RDMA_ACROSS_SECRET`, the backup runs on the server's machine, the primary and the
/// intruder on the client's, and each machine checks its own region against the writes.
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
    let other_key = key("other.key");
    let open_backup = |addr: &str, pair_key: &str| {
        let mut b = node_builder(dir.path(), "backup", &s);
        b.set("listen", addr).unwrap();
        b.set("secret_file", pair_key).unwrap();
        Mirror::open(b.build().unwrap()).unwrap()
    };
    let across_key = || {
        std::env::var("MIRROR_RDMA_ACROSS_SECRET")
            .expect("across machines, MIRROR_RDMA_ACROSS_SECRET names the pair's secret file")
    };
    match ends(2) {
        Ends::Both => {
            let pair_key = key("pair.key");
            let addr = format!("127.0.0.1:{}", free_port());
            let backup = open_backup(&addr, &pair_key);
            let primary_id =
                authenticated_primary_half(dir.path(), &addr, &pair_key, &other_key, &s);
            authenticated_backup_wait(&backup, Duration::from_secs(30));
            assert_eq!(backup.stats().peer_node_id, primary_id);
        }
        Ends::Server(addr) => {
            let backup = open_backup(&addr.to_string(), &across_key());
            authenticated_backup_wait(&backup, Duration::from_secs(300));
            // The primary checks it stayed synchronous before it goes: stay until it went.
            let deadline = Instant::now() + Duration::from_secs(120);
            while backup.stats().phase == mirror::Phase::Synchronous {
                assert!(Instant::now() < deadline, "the primary never went");
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("server end: the backup's region is the primary's writes, byte for byte");
        }
        Ends::Client(addr) => {
            authenticated_primary_half(dir.path(), &addr, &across_key(), &other_key, &s);
            eprintln!(
                "client end: 400 authenticated writes; an intruder with another secret got nowhere"
            );
        }
    }
}
