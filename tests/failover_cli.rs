//! Failover from the command line, with real `mirror` processes: `mirror promote`, `demote`,
//! `resolve` and `status --live` through the nodes' control sockets, every refusal with a clear
//! message and exit code 2, and the keepalived notify script (examples/failover/) driving the
//! roles as a cluster manager would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

mod common;
use common::{free_port, Node, BIN};

/// A `mirror backup --write-when-primary` node `name` in `dir`: either role, writing the
/// workload while it is the primary.
fn node(dir: &Path, name: &str, own: u16, peer: u16) -> Node {
    let p = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
    let args: Vec<String> = [
        "backup",
        "--region",
        &p("region"),
        "--region-size",
        "1MiB",
        "--queue",
        &p("queue"),
        "--queue-size",
        "4MiB",
        "--listen",
        &format!("127.0.0.1:{own}"),
        "--peer",
        &format!("127.0.0.1:{peer}"),
        "--on-peer-loss",
        "block",
        "--set",
        "ack_timeout_ms=500",
        "--set",
        "reconnect_interval_ms=20",
        "--set",
        "idle_spin_us=20",
        "--write-when-primary",
        "--depth",
        "4",
        "--completions",
        &p("completions"),
        "--report-ms",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut n = Node::spawn(name, &args, &dir.join(format!("{name}.log")));
    n.wait_until("it to listen", Duration::from_secs(10), |n| n.has("backup"));
    n
}

fn mirror(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run mirror")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn queue(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.queue")).display().to_string()
}

/// `mirror status --live QUEUE` as label -> value.
fn live(dir: &Path, name: &str) -> Vec<(String, String)> {
    let o = mirror(&["status", "--live", &queue(dir, name)]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_at(l.find("  ")?);
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn field(dir: &Path, name: &str, key: &str) -> String {
    live(dir, name)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no '{key}' in status --live"))
        .1
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        if std::time::Instant::now() >= deadline {
            // The nodes' logs, for the failure report.
            if let Ok(dir) = std::env::var("FAILOVER_CLI_DIR") {
                for name in ["a", "b"] {
                    let log = std::fs::read_to_string(Path::new(&dir).join(format!("{name}.log")));
                    eprintln!("--- {name}.log ---\n{}", log.unwrap_or_default());
                }
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/failover/keepalived-notify.sh")
}

/// keepalived's call: `SCRIPT QUEUE TYPE NAME STATE PRIORITY`.
fn notify(dir: &Path, name: &str, state: &str) -> Output {
    Command::new("bash")
        .arg(script())
        .args([&queue(dir, name), "INSTANCE", "mirror", state, "100"])
        .env("MIRROR_BIN", BIN)
        .output()
        .expect("run the notify script")
}

#[test]
fn commands_change_roles_and_refuse_what_cannot_be_done() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::env::set_var("FAILOVER_CLI_DIR", d);
    let (pa, pb) = (free_port(), free_port());
    let mut a = node(d, "a", pa, pb);
    let mut b = node(d, "b", pb, pa);
    assert_eq!(field(d, "a", "role"), "backup");
    // A node that is not running: a clear error, exit code 2.
    let o = mirror(&["promote", &queue(d, "nobody")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is the node running"), "{}", text(&o));
    // Two backups: promote a (nobody's primary), which then connects to b.
    let o = mirror(&["promote", &queue(d, "a")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).starts_with("promoted term="), "{}", text(&o));
    wait_for("a to write, mirrored", || {
        field(d, "a", "phase") == "synchronous" && a.num("progress", "completed") > 200
    });
    assert_eq!(field(d, "b", "phase"), "synchronous");
    // Refusals, each with its kind in the message and exit code 2.
    for (args, says) in [
        (vec!["promote", &queue(d, "b")], "peer_alive"),
        (vec!["promote", &queue(d, "a")], "wrong_role"),
        (vec!["demote", &queue(d, "b")], "wrong_role"),
        (
            vec!["resolve", "--discard", "0x1", &queue(d, "b")],
            "neither",
        ),
    ] {
        let o = mirror(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
    let o = mirror(&["resolve", "--discard", "nobody", &queue(d, "b")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("names no node"), "{}", text(&o));
    // A live switch: demote a, promote b; b writes and a follows.
    let o = mirror(&["demote", &queue(d, "a")]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("b to see a go", || field(d, "b", "phase") == "disconnected");
    let o = mirror(&["promote", &queue(d, "b")]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("b to write, mirrored", || {
        field(d, "b", "phase") == "synchronous" && b.num("progress", "completed") > 200
    });
    let status = live(d, "b");
    for label in [
        "role",
        "term",
        "phase",
        "peer",
        "degraded",
        "fenced",
        "split brain",
        "queue",
        "last recovery",
    ] {
        assert!(
            status.iter().any(|(k, _)| k == label),
            "no '{label}': {status:?}"
        );
    }
    assert_eq!(field(d, "b", "role"), "primary");
    assert_eq!(field(d, "a", "role"), "backup");
    // A forced promotion of a while b is alive: b is fenced.
    let o = mirror(&["promote", "--force", &queue(d, "a")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("forced=yes"), "{}", text(&o));
    wait_for("b to be fenced", || field(d, "b", "fenced") != "no");
    wait_for("b to rejoin as a's backup", || {
        field(d, "b", "role") == "backup" && field(d, "a", "phase") == "synchronous"
    });
    assert!(a.stop().success());
    assert!(b.stop().success());
    assert_eq!(
        std::fs::read(d.join("a.region")).unwrap(),
        std::fs::read(d.join("b.region")).unwrap()
    );
}

#[test]
fn the_keepalived_notify_script_follows_the_vrrp_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::env::set_var("FAILOVER_CLI_DIR", d);
    let (pa, pb) = (free_port(), free_port());
    let mut a = node(d, "a", pa, pb);
    let mut b = node(d, "b", pb, pa);
    // keepalived elects a.
    let o = notify(d, "a", "MASTER");
    assert!(o.status.success(), "{}", text(&o));
    let o = notify(d, "b", "BACKUP");
    assert!(o.status.success(), "already a backup is fine: {}", text(&o));
    wait_for("a to write, mirrored", || {
        field(d, "a", "phase") == "synchronous" && a.num("progress", "completed") > 100
    });
    // A MASTER notice while the other is alive is refused (the script does not force).
    let o = notify(d, "b", "MASTER");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("live primary"), "{}", text(&o));
    // a's machine dies: keepalived moves the address to b.
    a.kill9();
    let o = notify(d, "b", "MASTER");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(field(d, "b", "role"), "primary");
    // a comes back as a backup (its process starts as one) and rejoins.
    let mut a = node(d, "a", pa, pb);
    let o = notify(d, "a", "BACKUP");
    assert!(o.status.success(), "{}", text(&o));
    wait_for("b to write, mirrored by a", || {
        field(d, "b", "phase") == "synchronous" && b.num("progress", "completed") > 100
    });
    let o = notify(d, "a", "SOMETHING");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(b.stop().success());
    assert!(a.stop().success());
}
