//! `mirror top` as a person sees it: run in a terminal multiplexer (tmux) against a live pair
//! taking writes, and the screen read back: both nodes, their roles and phase, a write rate,
//! latency, queue fill, and figures that move between refreshes. Plus its plain-text mode.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{failover_node, free_port};

/// A tmux server of this test's own (its own socket), killed at the end.
struct Tmux(String);

impl Tmux {
    fn new() -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("skipping: no tmux (ci/setup.sh installs it)");
            return None;
        }
        // One server per test: `cargo test` runs this file's tests as threads of one process.
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        Some(Tmux(format!("mirror-top-test-{}-{n}", std::process::id())))
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server leaves its socket file behind when killed: asked for its path first, so
        // that a run of the tests leaves nothing in tmux's directory.
        let socket = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(["display-message", "-p", "#{socket_path}"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|path| !path.is_empty());
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .arg("kill-server")
            .output();
        if let Some(socket) = socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

#[test]
fn a_test_tmux_server_leaves_no_socket_behind() {
    let Some(tmux) = Tmux::new() else { return };
    tmux.run(&["new-session", "-d", "-s", "idle", "sleep 60"]);
    let socket = tmux.run(&["display-message", "-p", "#{socket_path}"]);
    let socket = std::path::PathBuf::from(socket.trim());
    assert!(socket.exists(), "{}", socket.display());
    drop(tmux);
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[test]
fn mirror_top_in_a_terminal_shows_a_live_pair_and_refreshes() {
    let Some(tmux) = Tmux::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let b = failover_node(dir.path(), "b", "backup", &lb, &la, &[]);
    let a = Arc::new(failover_node(dir.path(), "a", "primary", &la, &lb, &[]));
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.write((i % 1000) * 512, &[i as u8; 512]).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let command = format!(
        "{} top --interval-ms 500 {} {}",
        common::BIN,
        dir.path().join("a.queue").display(),
        dir.path().join("b.queue").display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "50",
        &command,
    ]);
    // Two refreshes in: rates are known.
    std::thread::sleep(Duration::from_millis(1600));
    let first = tmux.screen();
    let (sa, sb) = (a.stats(), b.stats());
    for want in [
        format!("node {:#x}  primary", sa.node_id),
        format!("node {:#x}  backup", sb.node_id),
        "synchronous".to_string(),
        "/s".to_string(),
        "MB/s".to_string(),
        "p50 <= ".to_string(),
        "queue      [".to_string(),
        "auth none (loopback only)".to_string(),
    ] {
        assert!(first.contains(&want), "no {want:?} on the screen:\n{first}");
    }
    // The screen is redrawn in place (one header), and the figures move.
    assert_eq!(first.matches("mirror top:").count(), 1, "{first}");
    let writes = |screen: &str| -> u64 {
        let line = screen
            .lines()
            .find(|l| l.trim_start().starts_with("writes"))
            .expect("a writes line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    std::thread::sleep(Duration::from_millis(1100));
    let second = tmux.screen();
    assert!(writes(&second) > writes(&first), "{first}\n---\n{second}");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn mirror_top_shows_a_verify_in_progress_with_its_bar() {
    let Some(tmux) = Tmux::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let _b = failover_node(dir.path(), "b", "backup", &lb, &la, &[]);
    // 16 chunks of 64 KiB at 128 KiB/s: a verify of about eight seconds.
    let a = Arc::new(failover_node(
        dir.path(),
        "a",
        "primary",
        &la,
        &lb,
        &[("resync_rate", "128KiB")],
    ));
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let verify = {
        let a = Arc::clone(&a);
        std::thread::spawn(move || a.verify_online(false))
    };
    let command = format!(
        "{} top --interval-ms 300 {}",
        common::BIN,
        dir.path().join("a.queue").display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "30",
        &command,
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    let screen = tmux.screen();
    let line = screen
        .lines()
        .find(|l| l.trim_start().starts_with("verify"))
        .unwrap_or_else(|| panic!("no verify line on the screen:\n{screen}"));
    assert!(line.contains("[#") && line.contains("/16 chunks"), "{line}");
    let report = verify.join().unwrap().unwrap();
    assert_eq!(report.chunks_compared, 16);
    assert!(report.differing.is_empty());
}

#[test]
fn mirror_top_without_a_terminal_prints_plain_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let _b = failover_node(dir.path(), "b", "backup", &lb, &la, &[]);
    let a = failover_node(dir.path(), "a", "primary", &la, &lb, &[]);
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let queue = dir.path().join("a.queue");
    let missing = dir.path().join("nobody.queue");
    let (st, out, err) = common::run(&[
        "top",
        "--count",
        "2",
        "--interval-ms",
        "100",
        &queue.to_string_lossy(),
        &missing.to_string_lossy(),
    ]);
    assert!(st.success(), "{err}");
    assert!(
        !out.contains('\x1b'),
        "escape codes without a terminal: {out:?}"
    );
    assert_eq!(out.matches("mirror top:").count(), 2, "{out}");
    assert!(
        out.contains("primary") && out.contains("not answering"),
        "{out}"
    );
}
