//! Authenticated peers: the attack catalogue. A legitimate pair (primary A, backup B, one
//! secret) mirrors through a fault proxy while attackers hit B's listen port: without the
//! secret, with a wrong one, replaying a recorded handshake, reflecting B's own challenge,
//! sending truncated, garbled or oversized authentication messages, tampering with an
//! authenticated stream in flight, or connecting and staying silent. Each is refused with a log
//! line that says why; B's region and queue files are unchanged by it; the pair mirrors on.
//!
//! Plus the configuration rules: a secret file must be private and long enough, and a node on a
//! non-loopback address needs a secret or an explicit `auth = none`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mirror::{Mirror, MirrorError, Phase};
use mirror_proto::auth::{AuthMessage, Challenge, FailureCode, Side, NONCE_LEN};

mod common;
use common::proxy::{FaultProxy, Tamper};
use common::{failover_node, free_port};

const RECORD: usize = 4096;

/// Everything the nodes of this test process log, to check the refusals are explained.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&writer)))
            .try_init();
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        // Also to the test's output, shown when it fails.
        eprint!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until one log line holds all of `parts`.
fn wait_for_log(parts: &[&str]) {
    wait_until(&format!("a log line with {parts:?}"), || {
        let l = logs().lock().unwrap();
        String::from_utf8_lossy(&l)
            .lines()
            .any(|line| parts.iter().all(|p| line.contains(p)))
    });
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A secret file with `len` random bytes and `mode`.
fn secret(dir: &Path, name: &str, len: usize, mode: u32) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Writes `bytes` as a private secret file at `path` (in place, as an operator would).
fn put_secret(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A legitimate pair: A (primary) reaches B (backup) through a proxy; each node has its own
/// copy of the secret (`a.key`, `b.key`) and, with `rotation`, a second accepted one
/// (`a.next`, `b.next`, initially the same secret).
struct Pair {
    dir: tempfile::TempDir,
    a: Mirror,
    b: Mirror,
    to_b: FaultProxy,
    b_addr: SocketAddr,
    written: u64,
}

impl Pair {
    fn new(extra: &[(&str, &str)]) -> Pair {
        Self::with(extra, false)
    }

    fn with(extra: &[(&str, &str)], rotation: bool) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        for f in ["a.key", "b.key", "a.next", "b.next"] {
            put_secret(&dir.path().join(f), &key);
        }
        let files = dir.path().to_path_buf();
        Self::custom(dir, |name| {
            let file = |ext: &str| {
                files
                    .join(format!("{name}.{ext}"))
                    .to_string_lossy()
                    .to_string()
            };
            let mut opts = vec![("secret_file".to_string(), file("key"))];
            if rotation {
                opts.push(("accept_secret_file".to_string(), file("next")));
            }
            opts.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            opts
        })
    }

    /// A pair in `dir` whose nodes (`"a"`, `"b"`) get the options `opts` returns for them.
    fn custom(dir: tempfile::TempDir, opts: impl Fn(&str) -> Vec<(String, String)>) -> Pair {
        logs();
        let (pa, pb) = (free_port(), free_port());
        let b_addr: SocketAddr = format!("127.0.0.1:{pb}").parse().unwrap();
        let to_b = FaultProxy::start(b_addr);
        let node = |name: &str, role: &str, listen: String, peer: String| {
            let owned = opts(name);
            let opts: Vec<(&str, &str)> = owned
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            failover_node(dir.path(), name, role, &listen, &peer, &opts)
        };
        let b = node("b", "backup", b_addr.to_string(), format!("127.0.0.1:{pa}"));
        let a = node(
            "a",
            "primary",
            format!("127.0.0.1:{pa}"),
            to_b.addr.to_string(),
        );
        a.wait_synchronous(Duration::from_secs(20)).unwrap();
        let mut p = Pair {
            dir,
            a,
            b,
            to_b,
            b_addr,
            written: 0,
        };
        p.write(20);
        p.settle();
        p
    }

    fn record(at: u64) -> Vec<u8> {
        let mut d = vec![(at % 251) as u8; RECORD];
        d[..8].copy_from_slice(&at.to_le_bytes());
        d
    }

    /// `n` more synchronous writes, each to its own block (wrapping in the 1 MiB region).
    fn write(&mut self, n: u64) {
        for _ in 0..n {
            let at = self.written;
            let off = (at % 256) * RECORD as u64;
            self.a.write(off, &Self::record(at)).unwrap();
            self.written += 1;
        }
    }

    /// Waits until B applied everything A did.
    fn settle(&self) {
        wait_until("the backup to apply everything", || {
            let (a, b) = (self.a.stats(), self.b.stats());
            a.phase == Phase::Synchronous && b.applied_through == a.applied_through
        });
    }

    /// Waits until the pair is idle (both queues trimmed) and B's files stop changing; returns
    /// their checksums.
    fn quiesce(&self) -> (u32, u32) {
        self.settle();
        wait_until("both queues to be trimmed", || {
            self.a.stats().queue_records == 0 && self.b.stats().queue_records == 0
        });
        let mut last = self.backup_files();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.backup_files();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// crc32c of B's region and queue files, as on disk.
    fn backup_files(&self) -> (u32, u32) {
        let crc = |name: &str| crc32c::crc32c(&std::fs::read(self.dir.path().join(name)).unwrap());
        (crc("b.region"), crc("b.queue"))
    }

    /// The regions are identical and hold exactly what A wrote.
    fn assert_identical(&self) {
        self.settle();
        let len = self.a.region_len() as usize;
        let (mut ra, mut rb) = (vec![0u8; len], vec![0u8; len]);
        self.a.read(0, &mut ra).unwrap();
        self.b.read(0, &mut rb).unwrap();
        assert!(ra == rb, "regions differ");
        let first = self.written.saturating_sub(256);
        for at in first..self.written {
            let off = ((at % 256) as usize) * RECORD;
            assert_eq!(&rb[off..off + RECORD], &Self::record(at)[..], "write {at}");
        }
    }

    /// Runs `attack` against B with the pair idle, and checks B's files did not change and the
    /// pair mirrors on afterwards.
    fn attacked(&mut self, attack: impl FnOnce(&Pair)) {
        let before = self.quiesce();
        let peer_before = self.b.stats().peer_node_id;
        attack(self);
        assert_eq!(self.backup_files(), before, "the attack changed B's files");
        assert_eq!(self.b.stats().peer_node_id, peer_before);
        self.write(10);
        self.assert_identical();
    }
}

/// A raw attacker connection to `addr`.
fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

/// Reads until the peer closes (or `within` passes: then panics). Returns what arrived.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return got,
        }
        assert!(
            Instant::now() < deadline,
            "the node kept the connection open"
        );
    }
}

/// The authentication messages in `bytes` (stops at the first thing that is not one).
fn messages(mut bytes: &[u8]) -> Vec<AuthMessage> {
    let mut out = Vec::new();
    while let Ok(Some((m, n))) = AuthMessage::decode(bytes) {
        out.push(m);
        bytes = &bytes[n..];
    }
    out
}

fn challenge(node_id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    AuthMessage::Challenge(Challenge {
        side: Side::Initiator,
        node_id,
        bound_peer: 0,
        nonce: [fastrand::u8(..); NONCE_LEN],
    })
    .encode(&mut out);
    out
}

fn local(s: &TcpStream) -> String {
    s.local_addr().unwrap().to_string()
}

#[test]
fn a_node_without_the_secret_or_with_another_is_refused() {
    let mut p = Pair::new(&[]);
    p.attacked(|p| {
        // A primary without any secret (allowed on loopback) aims at B.
        let dir = tempfile::tempdir().unwrap();
        let intruder = failover_node(
            dir.path(),
            "x",
            "primary",
            &format!("127.0.0.1:{}", free_port()),
            &p.b_addr.to_string(),
            &[],
        );
        wait_for_log(&[
            "refusing an unauthenticated connection",
            "does not authenticate",
        ]);
        assert_ne!(intruder.stats().phase, Phase::Synchronous);
        intruder.close().unwrap();
    });
    p.attacked(|p| {
        // One with a secret of its own.
        let dir = tempfile::tempdir().unwrap();
        let other = secret(dir.path(), "other.key", 32, 0o600);
        let intruder = failover_node(
            dir.path(),
            "x",
            "primary",
            &format!("127.0.0.1:{}", free_port()),
            &p.b_addr.to_string(),
            &[("secret_file", &other.to_string_lossy())],
        );
        // B's proof did not verify at the intruder, which said so before it hung up.
        wait_for_log(&[
            "refusing an unauthenticated connection",
            "the secrets differ",
        ]);
        // The intruder's own log says why it cannot connect.
        wait_for_log(&["cannot authenticate with the peer", "proof does not verify"]);
        assert_ne!(intruder.stats().phase, Phase::Synchronous);
        intruder.close().unwrap();
    });
}

#[test]
fn a_recorded_handshake_replayed_is_refused() {
    let mut p = Pair::new(&[]);
    let recorded = p.to_b.recorded()[0].clone();
    assert!(recorded.len() > 200, "the proxy recorded A's first bytes");
    p.attacked(|p| {
        let mut s = raw(p.b_addr);
        s.write_all(&recorded).unwrap();
        let answer = read_until_closed(&mut s, Duration::from_secs(10));
        let got = messages(&answer);
        assert!(
            got.contains(&AuthMessage::Failure(FailureCode::BadProof)),
            "B answered {got:?}"
        );
        wait_for_log(&[
            "refusing an unauthenticated connection",
            &local(&s),
            "proof does not verify",
        ]);
    });
}

#[test]
fn a_reflected_challenge_or_proof_is_refused() {
    let mut p = Pair::new(&[]);
    p.attacked(|p| {
        // B's own challenge and proof, for a transcript the attacker opened.
        let mut first = raw(p.b_addr);
        first.write_all(&challenge(0x77)).unwrap();
        let mut answer = Vec::new();
        wait_until("B's challenge and proof", || {
            let mut buf = [0u8; 512];
            if let Ok(n) = first.read(&mut buf) {
                answer.extend_from_slice(&buf[..n]);
            }
            messages(&answer).len() >= 2
        });
        let got = messages(&answer);
        let (AuthMessage::Challenge(theirs), AuthMessage::Proof(proof)) = (got[0], got[1]) else {
            panic!("B answered {got:?}");
        };
        // Its proof offered back as ours: the sides' labels differ.
        let mut back = Vec::new();
        AuthMessage::Proof(proof).encode(&mut back);
        first.write_all(&back).unwrap();
        let end = messages(&read_until_closed(&mut first, Duration::from_secs(10)));
        assert_eq!(end, vec![AuthMessage::Failure(FailureCode::BadProof)]);
        wait_for_log(&[&local(&first), "proof does not verify"]);

        // Its challenge sent back on a new connection: as it is (a responder's), and
        // relabelled as an initiator's (B's own node id).
        for relabel in [false, true] {
            let mut c = theirs;
            if relabel {
                c.side = Side::Initiator;
            }
            let mut bytes = Vec::new();
            AuthMessage::Challenge(c).encode(&mut bytes);
            let mut s = raw(p.b_addr);
            s.write_all(&bytes).unwrap();
            let end = messages(&read_until_closed(&mut s, Duration::from_secs(10)));
            assert_eq!(end, vec![AuthMessage::Failure(FailureCode::Reflected)]);
            wait_for_log(&[&local(&s), "reflected this node's own challenge"]);
        }
    });
}

#[test]
fn truncated_garbled_and_oversized_messages_are_refused() {
    let mut p = Pair::new(&[("handshake_timeout_ms", "1000")]);
    p.attacked(|p| {
        let good = challenge(0x99);
        // Garbled: one bit flipped.
        let mut garbled = good.clone();
        garbled[30] ^= 0x10;
        let mut s = raw(p.b_addr);
        s.write_all(&garbled).unwrap();
        let end = messages(&read_until_closed(&mut s, Duration::from_secs(10)));
        assert_eq!(end, vec![AuthMessage::Failure(FailureCode::Malformed)]);
        wait_for_log(&[&local(&s), "checksum mismatch"]);
        // Oversized: a header announcing 60 000 bytes is refused before any wait.
        let mut oversized = good[..8].to_vec();
        oversized[6..8].copy_from_slice(&60_000u16.to_le_bytes());
        let mut s = raw(p.b_addr);
        s.write_all(&oversized).unwrap();
        read_until_closed(&mut s, Duration::from_millis(900));
        wait_for_log(&[&local(&s), "oversized or malformed"]);
        // Not our protocol at all.
        let mut s = raw(p.b_addr);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        read_until_closed(&mut s, Duration::from_millis(900));
        wait_for_log(&[&local(&s), "not an authentication message"]);
        // Truncated: half a challenge, then silence, until the handshake timeout.
        let mut s = raw(p.b_addr);
        s.write_all(&good[..30]).unwrap();
        let started = Instant::now();
        read_until_closed(&mut s, Duration::from_secs(10));
        assert!(started.elapsed() >= Duration::from_millis(800));
        wait_for_log(&[&local(&s), "no authentication in time"]);
    });
}

#[test]
fn bytes_flipped_dropped_or_inserted_in_flight_are_refused_and_nothing_forged_is_applied() {
    let mut p = Pair::new(&[]);
    for (i, t) in [
        Tamper::Flip,
        Tamper::Drop(1),
        Tamper::Insert(vec![0x42; 7]),
        // A whole forged frame (a valid Write, crc and all, but no record tag).
        Tamper::Insert(forged_write()),
        // A Write's payload rewritten, its checksum fixed: only the record tag sees it.
        Tamper::RewriteWrite,
    ]
    .into_iter()
    .enumerate()
    {
        let recoveries = p.b.stats().recoveries;
        p.to_b.tamper(t.clone());
        // Writes flow until the tampered chunk passes and the connection is dropped.
        while p.to_b.tampered() <= i as u64 {
            p.write(1);
        }
        wait_for_log(&["failed authentication"]);
        p.write(5);
        p.assert_identical();
        assert!(
            p.b.stats().recoveries > recoveries,
            "{t:?}: B did not drop the connection and recover"
        );
    }
    // The forged frame's bytes never reached the region.
    let mut rb = vec![0u8; p.b.region_len() as usize];
    p.b.read(0, &mut rb).unwrap();
    assert!(!rb.windows(16).any(|w| w == [0xEE; 16]));
}

/// The control: the same rewrite on a pair without a secret is applied silently, so the test
/// above would catch a record layer that let it through.
#[test]
fn without_a_secret_a_rewritten_write_is_applied_unnoticed() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let to_b = FaultProxy::start(format!("127.0.0.1:{pb}").parse().unwrap());
    let b = failover_node(
        dir.path(),
        "b",
        "backup",
        &format!("127.0.0.1:{pb}"),
        &format!("127.0.0.1:{pa}"),
        &[],
    );
    let a = failover_node(
        dir.path(),
        "a",
        "primary",
        &format!("127.0.0.1:{pa}"),
        &to_b.addr.to_string(),
        &[],
    );
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    to_b.tamper(Tamper::RewriteWrite);
    let mut at = 0u64;
    while to_b.tampered() == 0 {
        a.write((at % 256) * RECORD as u64, &Pair::record(at))
            .unwrap();
        at += 1;
    }
    wait_until("B to apply what A sent", || {
        b.stats().applied_through == a.stats().applied_through
    });
    let mut rb = vec![0u8; b.region_len() as usize];
    b.read(0, &mut rb).unwrap();
    assert!(
        rb.windows(64).any(|w| w == [0xEE; 64]),
        "the unauthenticated backup should hold the forged bytes"
    );
}

/// A complete, checksummed `Write` frame of 0xEE bytes at offset 0.
fn forged_write() -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    mirror_proto::Message::Write {
        seq: 1_000_000,
        term: 1,
        offset: 0,
        data: vec![0xEE; 64].into(),
    }
    .encode(&mut buf);
    buf.to_vec()
}

#[test]
fn silent_and_trickling_clients_block_neither_the_backup_nor_a_reconnection() {
    let mut p = Pair::new(&[("handshake_timeout_ms", "5000")]);
    let before = p.backup_files();
    let _ = before;
    let mut squatters: Vec<TcpStream> = (0..20).map(|_| raw(p.b_addr)).collect();
    let trickle = challenge(0x55);
    // Writes go on while they sit there.
    let started = Instant::now();
    p.write(50);
    // The legitimate link breaks; A must be back well before the squatters' deadline.
    p.to_b.cut();
    for (i, s) in squatters.iter_mut().enumerate().take(5) {
        let _ = s.write_all(&trickle[i..i + 1]);
    }
    p.a.wait_synchronous(Duration::from_secs(3)).unwrap();
    p.write(10);
    p.assert_identical();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the reconnection waited for the squatters ({:?})",
        started.elapsed()
    );
    // And they are dropped at their deadline.
    for s in &mut squatters {
        read_until_closed(s, Duration::from_secs(10));
    }
    wait_for_log(&["no authentication in time"]);
}

/// The knock of a returning backup goes through an authenticating listener, the secret's and
/// TLS's (it closes before authenticating, and is no refusal): the primary dials at once.
#[test]
fn a_returning_backup_knocks_at_an_authenticating_primary() {
    let dir = tempfile::tempdir().unwrap();
    let key = secret(dir.path(), "key", 32, 0o600);
    let key = key.to_string_lossy();
    let extra = [("secret_file", key.as_ref())];
    let back_within = Duration::from_secs(5);
    let back = common::returning_backup(&extra, true, back_within);
    assert_eq!(back, Some("secret"));
    // TLS: both nodes with one certificate, each pinning it.
    tls_files(dir.path());
    let tls = tls_opts(dir.path(), "a", "a", true);
    let extra: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let back = common::returning_backup(&extra, true, back_within);
    assert_eq!(back, Some("tls"));
}

#[test]
fn secret_files_must_be_private_and_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    let open = |key: &Path| {
        let mut b = common::base(dir.path(), "backup", "1MiB");
        b.set("listen", &format!("127.0.0.1:{}", free_port()))
            .unwrap();
        b.set("secret_file", &key.to_string_lossy()).unwrap();
        Mirror::open(b.build().unwrap())
    };
    for (name, len, mode, says) in [
        ("loose.key", 32, 0o644, "group or others"),
        ("group.key", 32, 0o640, "group or others"),
        ("short.key", 31, 0o600, "32 to 4096 bytes"),
        ("empty.key", 0, 0o600, "32 to 4096 bytes"),
    ] {
        let key = secret(dir.path(), name, len, mode);
        let Err(err) = open(&key) else {
            panic!("{name}: opened with a bad secret");
        };
        let msg = err.to_string();
        assert!(
            matches!(err, MirrorError::Config(_))
                && msg.contains("secret_file")
                && msg.contains(says),
            "{name}: {msg}"
        );
    }
    let missing = dir.path().join("missing.key");
    let msg = open(&missing).err().unwrap().to_string();
    assert!(
        msg.contains("secret_file") && msg.contains("cannot read"),
        "{msg}"
    );
    let good = secret(dir.path(), "good.key", 32, 0o600);
    let m = open(&good).unwrap();
    assert_eq!(m.stats().auth, "secret");
}

#[test]
fn a_node_reachable_from_other_machines_needs_a_secret_or_auth_none() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let builder = |extra: &[(&str, &str)]| {
        let mut b = common::base(dir.path(), "backup", "1MiB");
        b.set("listen", &format!("0.0.0.0:{port}")).unwrap();
        for (k, v) in extra {
            b.set(k, v).unwrap();
        }
        b
    };
    let msg = builder(&[]).build().unwrap_err().to_string();
    assert!(
        msg.contains("listen") && msg.contains("secret_file") && msg.contains("auth = none"),
        "{msg}"
    );
    // A primary whose peer is elsewhere, likewise.
    let mut b = common::base(dir.path(), "primary", "1MiB");
    b.set("peer", "192.0.2.1:7400").unwrap();
    let msg = b.build().unwrap_err().to_string();
    assert!(msg.contains("peer") && msg.contains("secret_file"), "{msg}");
    // Explicitly unauthenticated: opens, and says so.
    let m = Mirror::open(builder(&[("auth", "none")]).build().unwrap()).unwrap();
    assert!(
        m.stats().auth.starts_with("none (auth = none"),
        "{}",
        m.stats().auth
    );
    m.close().unwrap();
    // Contradictions are refused.
    let key = secret(dir.path(), "k", 32, 0o600);
    let msg = builder(&[("auth", "none"), ("secret_file", &key.to_string_lossy())])
        .build()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("auth") && msg.contains("contradicts"), "{msg}");
    let msg = builder(&[("auth", "secret")])
        .build()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("secret_file"), "{msg}");
    // Loopback needs nothing.
    let mut b = common::base(dir.path(), "backup", "1MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    assert_eq!(b.build().unwrap().auth, mirror::Auth::Loopback);
}

#[test]
fn a_secret_rotates_without_a_restart_or_a_gap() {
    // docs/SECURITY.md "Rotating the secret": each node proves with secret_file and also
    // accepts accept_secret_file; both files are read again at every handshake.
    let mut p = Pair::with(&[], true);
    let dir = p.dir.path().to_path_buf();
    let path = |f: &str| dir.join(f);
    let old = std::fs::read(path("a.key")).unwrap();
    let new: Vec<u8> = (0..48).map(|_| fastrand::u8(..)).collect();
    let steps: [&[(&str, &Vec<u8>)]; 4] = [
        // 1. Both nodes accept the new secret.
        &[("a.next", &new), ("b.next", &new)],
        // 2. A proves with the new one (and still accepts the old).
        &[("a.key", &new), ("a.next", &old)],
        // 3. B likewise.
        &[("b.key", &new), ("b.next", &old)],
        // 4. The old secret is gone everywhere.
        &[("a.next", &new), ("b.next", &new)],
    ];
    for (i, step) in steps.iter().enumerate() {
        for (f, bytes) in step.iter() {
            put_secret(&path(f), bytes);
        }
        // The next handshake (forced here by cutting the link) uses the files as they are now.
        let recoveries = p.b.stats().recoveries;
        p.to_b.cut();
        wait_until(&format!("step {} to reconnect", i + 1), || {
            p.b.stats().recoveries > recoveries && p.a.stats().phase == Phase::Synchronous
        });
        p.write(5);
        p.assert_identical();
    }
    // And a node still on the old secret alone is now refused.
    put_secret(&path("b.key"), &old);
    put_secret(&path("b.next"), &old);
    let recoveries = p.b.stats().recoveries;
    p.to_b.cut();
    wait_until("A to lose B", || p.a.stats().phase != Phase::Synchronous);
    std::thread::sleep(Duration::from_secs(1));
    assert_ne!(p.a.stats().phase, Phase::Synchronous);
    assert_eq!(p.b.stats().recoveries, recoveries);
}

/// TLS credentials in `dir`: a CA, a certificate and key per node name, and a second CA's
/// certificate for an intruder (`x`).
fn tls_files(dir: &Path) {
    use mirror::transport::tls::testing::TestCa;
    let ca = TestCa::new("pair CA").unwrap();
    let rogue = TestCa::new("rogue CA").unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    for (name, issuer) in [("a", &ca), ("b", &ca), ("x", &rogue)] {
        let issued = issuer.issue(name).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), &issued.cert_pem).unwrap();
        put_secret(
            &dir.join(format!("{name}.tlskey")),
            issued.key_pem.as_bytes(),
        );
    }
}

/// A node's TLS options: its certificate and key, and the CA (or, with `pin`, the peer's
/// certificate fingerprint).
fn tls_opts(dir: &Path, name: &str, peer: &str, pin: bool) -> Vec<(String, String)> {
    let f = |n: &str| dir.join(n).to_string_lossy().to_string();
    let mut v = vec![
        ("tls".to_string(), "on".to_string()),
        ("tls_cert".to_string(), f(&format!("{name}.crt"))),
        ("tls_key".to_string(), f(&format!("{name}.tlskey"))),
    ];
    if pin {
        let fp =
            mirror::transport::tls::fingerprint_of_file(&dir.join(format!("{peer}.crt"))).unwrap();
        v.push(("tls_peer_fingerprint".to_string(), fp));
    } else {
        v.push(("tls_ca".to_string(), f("ca.pem")));
    }
    v
}

#[test]
fn tls_pairs_mirror_with_a_ca_with_a_pinned_fingerprint_and_with_a_secret_inside() {
    for (pin, secret) in [(false, false), (true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        tls_files(dir.path());
        put_secret(&dir.path().join("pair.key"), &[7u8; 32]);
        let files = dir.path().to_path_buf();
        let mut p = Pair::custom(dir, |name| {
            let peer = if name == "a" { "b" } else { "a" };
            let mut v = tls_opts(&files, name, peer, pin);
            if secret {
                v.push((
                    "secret_file".into(),
                    files.join("pair.key").to_string_lossy().to_string(),
                ));
            }
            v
        });
        let expected = if secret { "tls+secret" } else { "tls" };
        assert_eq!(p.a.stats().auth, expected);
        assert_eq!(p.b.stats().auth, expected);
        p.write(50);
        p.assert_identical();
        // A reconnection goes through the whole handshake again.
        let recoveries = p.b.stats().recoveries;
        p.to_b.cut();
        wait_until("the reconnection", || {
            p.b.stats().recoveries > recoveries && p.a.stats().phase == Phase::Synchronous
        });
        p.write(10);
        p.assert_identical();
    }
}

#[test]
fn tls_refuses_a_certificate_of_another_ca_or_another_fingerprint() {
    for pin in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        tls_files(dir.path());
        let files = dir.path().to_path_buf();
        let mut p = Pair::custom(dir, |name| {
            let peer = if name == "a" { "b" } else { "a" };
            tls_opts(&files, name, peer, pin)
        });
        p.attacked(|p| {
            // The intruder trusts B (it has B's CA or B's fingerprint) but presents a
            // certificate B does not accept.
            let idir = tempfile::tempdir().unwrap();
            let mut opts = tls_opts(&files, "x", "b", pin);
            if !pin {
                // x's own cert is from the rogue CA; it trusts the pair's CA to reach B.
                opts.retain(|(k, _)| k != "tls_ca");
                opts.push((
                    "tls_ca".into(),
                    files.join("ca.pem").to_string_lossy().to_string(),
                ));
            }
            let opts: Vec<(&str, &str)> =
                opts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let intruder = failover_node(
                idir.path(),
                "x",
                "primary",
                &format!("127.0.0.1:{}", free_port()),
                &p.b_addr.to_string(),
                &opts,
            );
            let says = if pin {
                "not the pinned tls_peer_fingerprint"
            } else {
                "UnknownIssuer"
            };
            wait_for_log(&["refusing an unauthenticated connection", says]);
            assert_ne!(intruder.stats().phase, Phase::Synchronous);
            intruder.close().unwrap();
        });
    }
}

#[test]
fn tls_detects_bytes_altered_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    let files = dir.path().to_path_buf();
    let mut p = Pair::custom(dir, |name| {
        let peer = if name == "a" { "b" } else { "a" };
        tls_opts(&files, name, peer, false)
    });
    let recoveries = p.b.stats().recoveries;
    p.to_b.tamper(Tamper::Flip);
    while p.to_b.tampered() == 0 {
        p.write(1);
    }
    p.write(5);
    p.assert_identical();
    assert!(
        p.b.stats().recoveries > recoveries,
        "B did not drop the connection"
    );
}

#[test]
fn tls_configuration_errors_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    let f = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let build = |opts: &[(&str, String)]| {
        let mut b = common::base(dir.path(), "backup", "1MiB");
        b.set("listen", "127.0.0.1:0").unwrap();
        for (k, v) in opts {
            b.set(k, v).unwrap();
        }
        b.build().map(|c| Mirror::open(c).map(|_| ()))
    };
    let on = ("tls", "on".to_string());
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![on.clone()], "tls_cert"),
        (vec![on.clone(), ("tls_cert", f("b.crt"))], "tls_key"),
        (
            vec![
                on.clone(),
                ("tls_cert", f("b.crt")),
                ("tls_key", f("b.tlskey")),
            ],
            "tls_ca",
        ),
        (vec![("tls_cert", f("b.crt"))], "without tls = on"),
        (
            vec![
                on.clone(),
                ("tls_cert", f("ca.pem")),
                ("tls_key", f("b.crt")),
                ("tls_ca", f("ca.pem")),
            ],
            "tls_key",
        ),
        (
            vec![
                on.clone(),
                ("tls_cert", f("nope.crt")),
                ("tls_key", f("b.tlskey")),
                ("tls_ca", f("ca.pem")),
            ],
            "tls_cert",
        ),
        (
            vec![
                on.clone(),
                ("transport", "rdma".into()),
                ("tls_cert", f("b.crt")),
                ("tls_key", f("b.tlskey")),
                ("tls_ca", f("ca.pem")),
            ],
            "TCP transport only",
        ),
    ];
    for (opts, says) in cases {
        let msg = match build(&opts) {
            Err(e) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(())) => panic!("{opts:?} opened"),
        };
        assert!(msg.contains(says), "{opts:?}: {msg}");
    }
    // A private key readable by others.
    std::fs::set_permissions(
        dir.path().join("b.tlskey"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let opts = vec![
        on,
        ("tls_cert", f("b.crt")),
        ("tls_key", f("b.tlskey")),
        ("tls_ca", f("ca.pem")),
    ];
    let Ok(Err(e)) = build(&opts) else {
        panic!("opened with a loose key")
    };
    assert!(
        e.to_string().contains("tls_key") && e.to_string().contains("group or others"),
        "{e}"
    );
    // A bad fingerprint.
    let mut b = common::base(dir.path(), "backup", "1MiB");
    let e = b
        .set("tls_peer_fingerprint", "12:34")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tls_peer_fingerprint") && e.contains("64 hex digits"),
        "{e}"
    );
}

#[test]
fn the_cli_makes_secrets_prints_fingerprints_and_shows_how_a_live_node_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("pair.key");
    let key_s = key.to_string_lossy().to_string();
    let (st, out, err) = common::run(&["secret", &key_s]);
    assert!(st.success(), "{err}");
    assert!(out.contains("mode 600"), "{out}");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Never over an existing secret.
    let (st, _, err) = common::run(&["secret", &key_s]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("exists"), "{err}");
    let (st, _, err) = common::run(&[
        "secret",
        "--bytes",
        "8",
        &dir.path().join("k2").to_string_lossy(),
    ]);
    assert_eq!(st.code(), Some(2), "{err}");
    // Fingerprints as tls_peer_fingerprint takes them.
    tls_files(dir.path());
    let crt = dir.path().join("b.crt");
    let (st, out, err) = common::run(&["fingerprint", &crt.to_string_lossy()]);
    assert!(st.success(), "{err}");
    assert_eq!(
        out.trim(),
        mirror::transport::tls::fingerprint_of_file(&crt).unwrap()
    );
    assert_eq!(out.trim().len(), 32 * 3 - 1);
    let (st, _, err) = common::run(&["fingerprint", &key_s]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("tls_cert"), "{err}");
    // A live node says how it authenticates.
    let mut b = common::base(dir.path(), "backup", "1MiB");
    b.set("listen", "127.0.0.1:0").unwrap();
    b.set("secret_file", &key_s).unwrap();
    let node = Mirror::open(b.build().unwrap()).unwrap();
    let queue = dir.path().join("backup.queue");
    let (st, out, err) = common::run(&["status", "--live", &queue.to_string_lossy()]);
    assert!(st.success(), "{err}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("auth"))
        .unwrap_or_default();
    assert!(line.ends_with("secret"), "{out}");
    // So does `mirror status` of its queue file while it runs.
    let (st, out, err) = common::run(&["status", &queue.to_string_lossy()]);
    assert!(st.success(), "{err}");
    assert!(out.contains("secret (said by the running node)"), "{out}");
    node.close().unwrap();
    // `auth = none` is logged and shown for a node on an exposed address.
    let file = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let node_args = |name: &str, listen: String, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "backup",
            "--region",
            &file(&format!("{name}.region")),
            "--region-size",
            "1MiB",
            "--queue",
            &file(&format!("{name}.queue")),
            "--listen",
            &listen,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let exposed = format!("0.0.0.0:{}", free_port());
    let mut backup = common::Node::spawn(
        "backup",
        &node_args("x", exposed.clone(), &["--set", "auth=none"]),
        &dir.path().join("x.log"),
    );
    backup.wait_until("the backup to listen", Duration::from_secs(10), |b| {
        b.has("backup") || b.has("status")
    });
    let (_, out, _) = common::run(&["status", "--live", &file("x.queue")]);
    assert!(out.contains("none (auth = none"), "{out}");
    backup.stop();
    let log = std::fs::read_to_string(dir.path().join("x.log")).unwrap();
    assert!(
        log.contains("auth = none: peers are not authenticated"),
        "{log}"
    );
    // Without it, refused naming the address and the key; `--secret-file` is the key.
    let args = node_args("y", exposed, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = common::run(&args);
    assert_eq!(st.code(), Some(2));
    assert!(
        err.contains("secret_file") && err.contains("listen"),
        "{err}"
    );
    let args = node_args(
        "y",
        "127.0.0.1:0".into(),
        &["--secret-file", &file("nope.key")],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = common::run(&args);
    assert_eq!(st.code(), Some(2));
    assert!(
        err.contains("secret_file") && err.contains("cannot read"),
        "{err}"
    );
}
