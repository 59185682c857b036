//! Faults of the node's own files and of its scheduling: queue files truncated, torn, swapped
//! between the nodes or taken from another pair; a filesystem too small for the files; SIGSTOP and
//! SIGCONT of either process under load. Each is refused with a clear error or repaired (a damaged
//! tail is cut; records already applied are renumbered around, the rest come back from the
//! peer) — never silently replayed wrong.

mod common;

use std::time::Duration;

use common::*;

fn assert_refused(st: std::process::ExitStatus, err: &str, needle: &str) {
    assert!(!st.success(), "expected a refusal, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("mirror: error:"), "no one-line error: {err}");
    assert!(
        err.contains(needle),
        "error does not mention '{needle}': {err}"
    );
}

fn run_args(args: &[String]) -> (std::process::ExitStatus, String, String) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

/// Runs a pair for a while and stops it cleanly, leaving valid files behind.
fn make_files(pair: &Pair) {
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    primary.wait_until("writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") >= 500
    });
    finish_and_verify(pair, primary, Some(backup), 0);
}

#[test]
fn a_foreign_queue_file_is_refused() {
    // (A queue of the other role is not refused any more: a queue's role is state that a
    // failover changes, and a former primary rejoins as a backup with its own queue.)
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    make_files(&pair);
    let bq = pair.path("backup.queue");
    let other = tempfile::tempdir().unwrap();
    let other_pair = Pair::new(other.path(), "block");
    make_files(&other_pair);
    std::fs::copy(other_pair.path("backup.queue"), &bq).unwrap();
    // The backup's dirty-chunk bitmap belongs to its own queue: the node refuses to open.
    let (st, _, err) = run_args(&pair.backup_args());
    assert_refused(st, &err, "belongs to another queue");
    // With the foreign node's bitmap too, the backup opens (its files are consistent), but the
    // primary is bound to another backup and the foreign backup to another primary: the
    // primary stops with a clear error.
    std::fs::copy(
        other_pair.path("backup.queue.bitmap"),
        pair.path("backup.queue.bitmap"),
    )
    .unwrap();
    let mut backup = pair.start_backup(5);
    let (st, _, err) = run_args(&pair.primary_args(50_000_000, 10, 1));
    assert_refused(st, &err, "bound to");
    assert!(backup.stop().success());
}

#[test]
fn a_truncated_queue_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    make_files(&pair);
    let q = pair.path("backup.queue");
    let len = std::fs::metadata(&q).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let (st, _, err) = run_args(&pair.backup_args());
    assert_refused(st, &err, "queue");
}

#[test]
fn a_damaged_tail_is_cut_and_the_pair_recovers_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    let mut backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 1);
    // Kill the backup under load (its newest records are not trimmed yet: the primary reports
    // applying a write on its next write), freeze the primary, then damage the newest record.
    let mut attempt = 0;
    let info = loop {
        let from = primary.num("progress", "completed");
        primary.wait_until("writes", Duration::from_secs(30), |p| {
            p.num("progress", "completed") >= from + 300
        });
        backup.kill9();
        primary.freeze(Duration::from_secs(30));
        let info = mirror::node::inspect(&pair.path("backup.queue")).unwrap();
        if info.records > 0 {
            break info;
        }
        attempt += 1;
        assert!(
            attempt < 5,
            "the backup never held an untrimmed record when killed"
        );
        primary.signal(libc::SIGCONT);
        backup = pair.start_backup(10 + attempt);
    };
    let mut bytes = std::fs::read(pair.path("backup.queue")).unwrap();
    // The last record's payload sits just below the tail hint; flip bytes there.
    let tail = 4096 + (info.tail_hint % info.capacity_bytes) as usize;
    for b in &mut bytes[tail.saturating_sub(40)..tail.saturating_sub(8)] {
        *b ^= 0x5A;
    }
    std::fs::write(pair.path("backup.queue"), &bytes).unwrap();
    let after = mirror::node::inspect(&pair.path("backup.queue")).unwrap();
    assert!(
        after.torn_tail_cut_bytes > 0,
        "the damage is not where a recovery would see it: {after:?}"
    );
    primary.signal(libc::SIGCONT);
    let backup = pair.start_backup(1);
    primary.wait_until("more writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") >= 600
    });
    let cut_logged = std::fs::read_to_string(pair.path("backup-1.log"))
        .unwrap()
        .contains("cut records from the queue's tail");
    assert!(cut_logged, "the cut was not reported");
    finish_and_verify(&pair, primary, Some(backup), 0);
}

#[test]
fn sigstop_and_sigcont_of_either_node_under_load_lose_nothing() {
    for policy in ["block", "continue"] {
        let dir = tempfile::tempdir().unwrap();
        let mut pair = Pair::new(dir.path(), policy);
        pair.rate = 5_000;
        pair.extra
            .extend(["--set".to_string(), "ack_timeout_ms=200".to_string()]);
        let backup = pair.start_backup(0);
        let mut primary = pair.start_primary(0, 0, 4);
        let mut rng = 0x2545_f491_u64;
        for round in 0..8 {
            let from = primary.num("progress", "completed");
            primary.wait_until("writes", Duration::from_secs(30), |p| {
                p.num("progress", "completed") > from + 50
            });
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pause = Duration::from_millis(50 + rng % 400);
            let target = if round % 2 == 0 { &backup } else { &primary };
            target.signal(libc::SIGSTOP);
            std::thread::sleep(pause);
            target.signal(libc::SIGCONT);
        }
        finish_and_verify(&pair, primary, Some(backup), 0);
    }
}

#[test]
fn a_filesystem_too_small_for_the_files_is_refused_cleanly_and_works_once_space_returns() {
    // Needs root to mount a small tmpfs; skipped (with the reason) otherwise.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let pair = Pair::new(&mnt, "block");
    // Region 1 MiB fits; the 8 MiB queue does not: refused at open, naming the file. The files
    // are preallocated when created, so once a node runs, its appends never meet a full disk.
    let (st, _, err) = run_args(&pair.backup_args());
    assert_refused(st, &err, "backup.queue");
    assert!(
        !pair.path("backup.queue").exists(),
        "a half-created queue file was left behind"
    );
    // Space returns (a larger filesystem): the same command works.
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", mnt.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    make_files(&pair);
}
