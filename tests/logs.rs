//! The log's form and level: `log_format = json` gives one JSON object per stderr line,
//! `log_level` filters, a bad value names its key, and `mirror bench`'s tables are not
//! interleaved with its in-process nodes' INFO lines.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::BIN;

/// Runs a backup with `extra` flags until it prints its first status line, then stops it;
/// returns its stderr.
fn backup_stderr(dir: &Path, extra: &[&str]) -> String {
    let err = dir.join("stderr");
    let out = dir.join("stdout");
    let mut child = Command::new(BIN)
        .args([
            "backup",
            "--region",
            &dir.join("b.region").to_string_lossy(),
            "--region-size",
            "1MiB",
            "--queue",
            &dir.join("b.queue").to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env_remove("MIRROR_LOG")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&out).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "the backup printed nothing");
        assert!(child.try_wait().unwrap().is_none(), "the backup exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid with a valid signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    std::fs::read_to_string(&err).unwrap()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let err = backup_stderr(dir.path(), &["--set", "log_format=json"]);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("node opened")), "{err}");
}

#[test]
fn log_level_filters_and_text_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let err = backup_stderr(dir.path(), &[]);
    assert!(err.contains("INFO") && err.contains("node opened"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = backup_stderr(dir.path(), &["--set", "log_level=warn"]);
    assert!(!err.contains("INFO"), "{err}");
}

#[test]
fn bad_log_settings_name_their_key() {
    for (key, value) in [("log_format", "xml"), ("log_level", "loud")] {
        let (st, _, err) = common::run(&[
            "backup",
            "--region",
            "/tmp/never.region",
            "--region-size",
            "1MiB",
            "--queue",
            "/tmp/never.queue",
            "--listen",
            "127.0.0.1:0",
            "--set",
            &format!("{key}={value}"),
        ]);
        assert_eq!(st.code(), Some(2));
        assert!(err.contains(key) && err.contains(value), "{err}");
    }
}

#[test]
fn the_benchmark_tables_are_not_interleaved_with_node_logs() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--sizes",
            "64",
            "--iterations",
            "100",
            "--depths",
            "1",
            "--pipelined-sizes",
            "64",
            "--pipelined-writes",
            "200",
            "--recovery-regions",
            "",
            "--failover-rounds",
            "0",
            "--security-iterations",
            "100",
            // Takes a backup away on purpose (its warnings are the scenario, not news).
            "--resync-region",
            "4MiB",
        ])
        .env_remove("MIRROR_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("sync write latency"), "{stdout}");
    assert!(stdout.contains("beyond the queue"), "{stdout}");
    for level in ["INFO", "WARN"] {
        assert!(
            !stderr.contains(level) && !stdout.contains(level),
            "{stderr}"
        );
    }
}
