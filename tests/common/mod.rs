//! Helpers for tests that run real `mirror` processes on loopback.
#![allow(dead_code)]

use std::borrow::{Borrow, BorrowMut};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mirror::workload::Workload;

pub mod campaign;
// The child-process harness of `mirror demo`, shared rather than copied.
#[path = "../../src/bin/mirror/node_process.rs"]
mod node_process;
pub mod proxy;

use node_process::{LogMode, NodeProcess, WaitError};

pub const BIN: &str = env!("CARGO_BIN_EXE_mirror");

/// The configuration of an in-process test node in `dir` (files `{role}.region` and
/// `{role}.queue`), with short spins for two cores.
pub fn base(dir: &Path, role: &str, region_size: &str) -> mirror::ConfigBuilder {
    let mut b = mirror::ConfigBuilder::new();
    b.set("role", role).unwrap();
    b.set(
        "region",
        dir.join(format!("{role}.region")).to_str().unwrap(),
    )
    .unwrap();
    b.set("queue", dir.join(format!("{role}.queue")).to_str().unwrap())
        .unwrap();
    b.set("region_size", region_size).unwrap();
    b.set("queue_size", "4MiB").unwrap();
    b.set("idle_spin_us", "20").unwrap();
    b
}

/// An in-process node `name` in `dir` (files `{name}.region`, `{name}.queue`) that listens on
/// `listen` and knows `peer`, so that it can take either role (failover tests).
pub fn failover_node(
    dir: &Path,
    name: &str,
    role: &str,
    listen: &str,
    peer: &str,
    extra: &[(&str, &str)],
) -> mirror::Mirror {
    let mut b = mirror::ConfigBuilder::new();
    for (k, v) in [
        ("role", role),
        (
            "region",
            &dir.join(format!("{name}.region")).to_string_lossy(),
        ),
        (
            "queue",
            &dir.join(format!("{name}.queue")).to_string_lossy(),
        ),
        ("region_size", "1MiB"),
        ("queue_size", "4MiB"),
        ("idle_spin_us", "20"),
        ("listen", listen),
        ("peer", peer),
        ("ack_timeout_ms", "500"),
        ("handshake_timeout_ms", "1000"),
        ("reconnect_interval_ms", "20"),
    ] {
        b.set(k, v).unwrap();
    }
    for (k, v) in extra {
        b.set(k, v).unwrap();
    }
    mirror::Mirror::open(b.build().unwrap()).unwrap()
}

pub fn free_port() -> u16 {
    mirror::bench::free_loopback_port().expect("a free loopback port")
}

/// A child `mirror` process whose stdout lines are parsed as `kind key=value ...`: the harness
/// `mirror demo` uses too (src/bin/mirror/node_process.rs), whose failures panic here with the
/// tail of the node's log. Everything else (`get`, `num`, `has`, `signal`, `kill9`, the `name`,
/// `child` and `log` fields) is the shared [`NodeProcess`]'s, through `Deref`.
pub struct Node(NodeProcess);

impl Deref for Node {
    type Target = NodeProcess;
    fn deref(&self) -> &NodeProcess {
        &self.0
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut NodeProcess {
        &mut self.0
    }
}

// For `node_process::wait_until`, so that conditions get the `Node` itself.
impl Borrow<NodeProcess> for Node {
    fn borrow(&self) -> &NodeProcess {
        &self.0
    }
}

impl BorrowMut<NodeProcess> for Node {
    fn borrow_mut(&mut self) -> &mut NodeProcess {
        &mut self.0
    }
}

impl Node {
    pub fn spawn(name: &str, args: &[String], log: &Path) -> Node {
        Node::spawn_in(None, name, args, log)
    }

    /// Like `spawn`, inside network namespace `netns` (`ip netns exec`, which execs in place:
    /// the child's pid is the node's).
    pub fn spawn_in(netns: Option<&str>, name: &str, args: &[String], log: &Path) -> Node {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let log_filter = std::env::var("MIRROR_TEST_NODE_LOG").unwrap_or_else(|_| "info".into());
        command.args(args).env("MIRROR_LOG", log_filter);
        // Appended: a test may restart a node into the log of its previous run.
        match NodeProcess::spawn(name, command, log, LogMode::Append) {
            Ok(process) => Node(process),
            Err(e) => panic!("spawn mirror ({name}): {e}"),
        }
    }

    /// Waits for `cond`; panics with the node's log on timeout or early exit.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, cond: impl Fn(&Node) -> bool) {
        match node_process::wait_until(self, timeout, cond) {
            Ok(()) => {}
            Err(WaitError::Exited(st)) => panic!(
                "{} exited ({st}) while waiting for {what}\n{}",
                self.name,
                tail(&self.log)
            ),
            Err(_) => panic!(
                "timed out waiting for {what} on {}\n{}",
                self.name,
                tail(&self.log)
            ),
        }
    }

    /// SIGSTOP, then waits until every thread of the node is stopped. kill(2) returns before the
    /// threads stop, so a caller that reads the node's files right after `signal(SIGSTOP)` races
    /// a node that is still applying and trimming (this made a frozen check see a write in
    /// neither the backup's region, read first, nor its queue, copied after the trim).
    pub fn freeze(&self, timeout: Duration) {
        self.signal(libc::SIGSTOP);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<String> = std::fs::read_dir(&tasks)
                .map(|dir| {
                    dir.filter_map(|e| e.ok())
                        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                        .filter(|stat| !thread_is_stopped(stat))
                        .collect()
                })
                .unwrap_or_default();
            if running.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {timeout:?}: {running:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, then the exit status (within 20 s, else SIGKILL and a panic).
    pub fn stop(&mut self) -> ExitStatus {
        match self.0.stop(Duration::from_secs(20)) {
            Ok(st) => st,
            Err(WaitError::Io(e)) => panic!("waiting for {}: {e}", self.name),
            Err(_) => panic!("{} did not stop\n{}", self.name, tail(&self.log)),
        }
    }

    /// The exit status (within `timeout`, else SIGKILL and a panic).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.0.wait_exit(timeout) {
            Ok(st) => st,
            Err(WaitError::Io(e)) => panic!("waiting for {}: {e}", self.name),
            Err(_) => panic!("{} did not exit\n{}", self.name, tail(&self.log)),
        }
    }
}

/// Whether a `/proc/<pid>/task/<tid>/stat` line shows a thread that runs no more: stopped (`T`),
/// traced (`t`), or gone (`Z`, `X`). The state follows the command name's closing parenthesis
/// (the name itself may hold spaces and parentheses).
fn thread_is_stopped(stat: &str) -> bool {
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    matches!(state, Some("T" | "t" | "Z" | "X"))
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs `mirror` to completion and returns (exit status, stdout, stderr).
pub fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("MIRROR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run mirror");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mirror bench` with every section skipped but those `flags` name, then `flags` themselves:
/// each test runs only the section it is about.
pub fn bench_args<'a>(flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["bench"];
    for (flag, off) in [
        ("--sizes", ""),
        ("--pipelined-sizes", ""),
        ("--power-writes", "0"),
        ("--recovery-regions", ""),
        ("--resync-region", ""),
        ("--failover-rounds", "0"),
        ("--security-iterations", "0"),
        ("--c-api-iterations", "0"),
    ] {
        if !flags.contains(&flag) {
            args.extend([flag, off]);
        }
    }
    args.extend(flags);
    args
}

/// Ids listed in a completions file (a cut last line is ignored).
pub fn read_completions(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Settings for a pair of test nodes in `dir`.
pub struct Pair {
    pub dir: PathBuf,
    pub addr: String,
    pub region_size: u64,
    pub write_size: u64,
    pub policy: &'static str,
    pub extra: Vec<String>,
    /// Primary writes per second (0: as fast as possible).
    pub rate: u64,
    /// Where the primary connects, when not straight to the backup (e.g. a fault proxy).
    pub peer: Option<String>,
    /// Network namespaces to run the primary and the backup in.
    pub netns: Option<(String, String)>,
    /// The primary's listen address, given to the backup as its `peer`: every backup start
    /// knocks at the primary (docs/PROTOCOL.md, "Handshake and recovery").
    pub knock: Option<String>,
}

impl Pair {
    pub fn new(dir: &Path, policy: &'static str) -> Pair {
        Pair {
            dir: dir.to_owned(),
            addr: format!("127.0.0.1:{}", free_port()),
            region_size: 1 << 20,
            write_size: 64,
            policy,
            extra: Vec::new(),
            rate: 0,
            peer: None,
            netns: None,
            knock: None,
        }
    }

    /// The primary listens and the backup knocks at it whenever it starts.
    pub fn knocking(mut self) -> Pair {
        self.knock = Some(format!("127.0.0.1:{}", free_port()));
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn common(&self, role: &str) -> Vec<String> {
        let mut v = vec![
            "--region".into(),
            self.path(&format!("{role}.region")).display().to_string(),
            "--region-size".into(),
            self.region_size.to_string(),
            "--queue".into(),
            self.path(&format!("{role}.queue")).display().to_string(),
            "--queue-size".into(),
            "8MiB".into(),
            // Two cores: spin briefly, then sleep.
            "--set".into(),
            "idle_spin_us=20".into(),
            "--set".into(),
            "wait_spin_us=5".into(),
        ];
        v.extend(self.extra.iter().cloned());
        v
    }

    pub fn backup_args(&self) -> Vec<String> {
        let mut v = vec!["backup".to_string()];
        v.extend(self.common("backup"));
        v.extend([
            "--listen".into(),
            self.addr.clone(),
            "--report-ms".into(),
            "20".into(),
        ]);
        if let Some(primary) = &self.knock {
            v.extend(["--peer".into(), primary.clone()]);
        }
        v
    }

    pub fn primary_args(&self, start_id: u64, writes: u64, depth: u64) -> Vec<String> {
        self.primary_args_with(start_id, writes, depth, self.policy)
    }

    pub fn primary_args_with(
        &self,
        start_id: u64,
        writes: u64,
        depth: u64,
        policy: &str,
    ) -> Vec<String> {
        let mut v = vec!["primary".to_string()];
        v.extend(self.common("primary"));
        v.extend([
            "--peer".into(),
            self.peer.clone().unwrap_or_else(|| self.addr.clone()),
            "--on-peer-loss".into(),
            policy.into(),
            "--rate".into(),
            self.rate.to_string(),
            "--set".into(),
            "ack_timeout_ms=500".into(),
            "--set".into(),
            "reconnect_interval_ms=20".into(),
            "--write-size".into(),
            self.write_size.to_string(),
            "--start-id".into(),
            start_id.to_string(),
            "--writes".into(),
            writes.to_string(),
            "--depth".into(),
            depth.to_string(),
            "--completions".into(),
            self.path("completions").display().to_string(),
            "--report-ms".into(),
            "20".into(),
        ]);
        if let Some(own) = &self.knock {
            v.extend(["--listen".into(), own.clone()]);
        }
        v
    }

    pub fn start_backup(&self, n: usize) -> Node {
        let mut b = Node::spawn_in(
            self.netns.as_ref().map(|n| n.1.as_str()),
            "backup",
            &self.backup_args(),
            &self.path(&format!("backup-{n}.log")),
        );
        b.wait_until("backup to listen", Duration::from_secs(10), |b| {
            b.has("backup") || b.has("status")
        });
        b
    }

    pub fn start_primary(&self, n: usize, writes: u64, depth: u64) -> Node {
        Node::spawn_in(
            self.netns.as_ref().map(|n| n.0.as_str()),
            "primary",
            &self.primary_args(n as u64 * 10_000_000, writes, depth),
            &self.path(&format!("primary-{n}.log")),
        )
    }
}

/// Write ids of the last primary run in `finish_and_verify`: above those of every earlier run
/// (run `n` starts at `n * 10_000_000`), because the checker takes the highest id per slot as
/// the newest write.
const LAST_RUN_START_ID: u64 = 1 << 60;

/// Stops the primary, runs a last short primary under `block` (so that the backup has caught up
/// and acknowledged everything), stops the backup, then checks byte-identical regions and every
/// completed write on both.
pub fn finish_and_verify(pair: &Pair, mut primary: Node, backup: Option<Node>, backup_run: usize) {
    let mut backup = backup.unwrap_or_else(|| pair.start_backup(backup_run + 100));
    // A primary stops cleanly on SIGTERM once its handler is installed (it says "primary started").
    primary.wait_until("primary start", Duration::from_secs(30), |p| {
        p.has("primary")
    });
    let st = primary.stop();
    assert!(st.success(), "primary exit {st}\n{}", tail(&primary.log));
    // The primary may have stopped degraded (continue, after an ack timeout under load): a last
    // short run under `block` completes only after the backup caught up and acknowledged.
    let mut last = Node::spawn_in(
        pair.netns.as_ref().map(|n| n.0.as_str()),
        "primary",
        &pair.primary_args_with(LAST_RUN_START_ID, 20, 1, "block"),
        &pair.path("primary-last.log"),
    );
    let st = last.wait_exit(Duration::from_secs(60));
    assert!(
        st.success(),
        "last primary run exit {st}\n{}",
        tail(&last.log)
    );
    let p_info = mirror::node::inspect(&pair.path("primary.queue")).unwrap();
    backup.wait_until("backup applies everything", Duration::from_secs(30), |_| {
        mirror::node::inspect(&pair.path("backup.queue"))
            .map(|b| b.applied_through >= p_info.last_seq)
            .unwrap_or(false)
    });
    let st = backup.stop();
    assert!(st.success(), "backup exit {st}\n{}", tail(&backup.log));
    let p_region = std::fs::read(pair.path("primary.region")).unwrap();
    let b_region = std::fs::read(pair.path("backup.region")).unwrap();
    assert!(p_region == b_region, "regions differ after recovery");
    let completed = read_completions(&pair.path("completions"));
    assert!(!completed.is_empty());
    let w = Workload::new(1, pair.write_size as usize, pair.region_size).unwrap();
    w.check(&p_region, &completed).unwrap();
    w.check(&b_region, &completed).unwrap();
    let (st, out, _) = run(&[
        "verify",
        pair.path("primary.region").to_str().unwrap(),
        pair.path("backup.region").to_str().unwrap(),
    ]);
    assert!(st.success() && out.contains("IDENTICAL"), "{out}");
}

/// A backup closes while its primary (`reconnect_interval_ms` = 60 s, with `listen`) writes on
/// without it, and reopens on the same port, with the primary's address as its `peer` if
/// `knocks`. Returns, if the pair was synchronous again within `within` (having caught up the
/// write the backup missed), how the reconnection authenticated (`Stats::auth`: "none",
/// "secret", "tls", ...), so that a caller knows its keys were in force. `extra` are keys for
/// both nodes (authentication, say).
pub fn returning_backup(
    extra: &[(&str, &str)],
    knocks: bool,
    within: Duration,
) -> Option<&'static str> {
    let dir = tempfile::tempdir().unwrap();
    let node = |role: &str| {
        let mut b = base(dir.path(), role, "1MiB");
        b.set("reconnect_interval_ms", "60000").unwrap();
        for (k, v) in extra {
            b.set(k, v).unwrap();
        }
        b
    };
    let backup_addr = format!("127.0.0.1:{}", free_port());
    let mut b = node("backup");
    b.set("listen", &backup_addr).unwrap();
    let backup = mirror::Mirror::open(b.build().unwrap()).unwrap();
    let mut p = node("primary");
    p.set("peer", &backup_addr).unwrap();
    p.set("listen", "127.0.0.1:0").unwrap();
    p.set("on_peer_loss", "continue").unwrap();
    let primary = mirror::Mirror::open(p.build().unwrap()).unwrap();
    let primary_addr = primary.listen_addr().unwrap().to_string();
    primary.wait_synchronous(Duration::from_secs(10)).unwrap();
    primary.write(0, &[1; 512]).unwrap();
    backup.close().unwrap();
    drop(backup);
    // The primary notices, tries once at once (refused), and waits out its interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.stats().phase != mirror::Phase::Disconnected {
        assert!(Instant::now() < deadline, "the primary never noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    primary.write(512, &[2; 512]).unwrap();
    let mut b = node("backup");
    b.set("listen", &backup_addr).unwrap();
    if knocks {
        b.set("peer", &primary_addr).unwrap();
    }
    let backup = mirror::Mirror::open(b.build().unwrap()).unwrap();
    let back = primary.wait_synchronous(within).is_ok().then(|| {
        let stats = primary.stats();
        assert_eq!(
            stats.last_recovery_records, 1,
            "the missed write, caught up"
        );
        stats.auth
    });
    primary.close().unwrap();
    backup.close().unwrap();
    back
}
