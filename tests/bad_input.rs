//! Bad input of every kind gets a one-line error and a non-zero exit, never a panic, and never
//! disturbs a healthy pair: config, files, wire bytes, a second primary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn assert_clean_error(st: std::process::ExitStatus, err: &str, needle: &str) {
    assert!(!st.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("mirror: error:"), "no one-line error: {err}");
    assert!(
        err.contains(needle),
        "error does not mention '{needle}': {err}"
    );
}

#[test]
fn missing_and_bad_config_values_name_the_key() {
    let (st, _, err) = run(&["backup", "--region", "/tmp/x.region"]);
    assert_clean_error(st, &err, "region_size");
    let (st, _, err) = run(&[
        "backup",
        "--region",
        "/tmp/x.region",
        "--region-size",
        "12 parsecs",
        "--queue",
        "/tmp/x.queue",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_clean_error(st, &err, "region_size");
    let (st, _, err) = run(&["backup", "--set", "colour=blue"]);
    assert_clean_error(st, &err, "colour");
    let (st, _, err) = run(&["primary", "--set", "durability=sometimes"]);
    assert_clean_error(st, &err, "durability");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "role = \"backup\"\nregion_size = [1]\n").unwrap();
    let (st, _, err) = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_clean_error(st, &err, "region_size");
    let (st, _, err) = run(&["backup", "--config", "/nonexistent/mirror.toml"]);
    assert_clean_error(st, &err, "/nonexistent/mirror.toml");
    // The workload's flags too: no writes in flight is no workload (it used to mean one).
    let dir = tempfile::tempdir().unwrap();
    let (region, queue) = (dir.path().join("r"), dir.path().join("q"));
    let (st, _, err) = run(&[
        "primary",
        "--region",
        region.to_str().unwrap(),
        "--region-size",
        "1MiB",
        "--queue",
        queue.to_str().unwrap(),
        "--peer",
        "127.0.0.1:1",
        "--writes",
        "10",
        "--depth",
        "0",
    ]);
    assert_clean_error(st, &err, "--depth 0");
}

#[test]
fn bitmaps_of_another_geometry_are_refused_and_a_damaged_page_is_taken_as_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    let mut b = pair.start_backup(0);
    assert!(b.stop().success());
    let with = |kv: &[&str]| {
        let mut args = pair.backup_args();
        for kv in kv {
            args.extend(["--set".to_string(), kv.to_string()]);
        }
        args
    };
    // A chunk size that is not a power of two, or out of range: a config error.
    for bad in ["chunk_size=3000", "chunk_size=2MiB", "chunk_size=1KiB"] {
        let args = with(&[bad]);
        let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
        let (st, _, err) = run(&args_ref);
        assert_clean_error(st, &err, "chunk_size");
    }
    // The bitmap was made for 64 KiB chunks: another chunk size is refused, naming both.
    let args = with(&["chunk_size=4KiB"]);
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "65536");
    assert!(err.contains("4096"), "{err}");
    // Another region size: the queue refuses first (its own check), naming the region.
    let mut args = pair.backup_args();
    let i = args.iter().position(|a| a == "--region-size").unwrap();
    args[i + 1] = "2MiB".into();
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "region");
    // A damaged bit page (a torn write, a bad sector): the node opens, warns, and takes every
    // chunk of that page as dirty (a later resync compares them).
    let bitmap = pair.path("backup.queue.bitmap");
    let mut bytes = std::fs::read(&bitmap).unwrap();
    bytes[4096 + 100] ^= 0x5a;
    std::fs::write(&bitmap, &bytes).unwrap();
    let mut b = pair.start_backup(1);
    assert!(b.stop().success());
    assert!(
        tail(&pair.path("backup-1.log")).contains("did not verify"),
        "{}",
        tail(&pair.path("backup-1.log"))
    );
    let (st, out, _) = run(&["status", pair.path("backup.queue").to_str().unwrap()]);
    assert!(st.success(), "{out}");
    assert!(
        out.contains("16 dirty chunks"),
        "every chunk of the 1 MiB region: {out}"
    );
    // A node that was the target of an unfinished resync is not opened as a primary.
    {
        let node_id = mirror_storage::inspect_queue(&pair.path("backup.queue"))
            .unwrap()
            .node_id;
        let geometry = mirror_proto::ChunkGeometry::new(pair.region_size, 64 << 10).unwrap();
        let (mut bm, _) = mirror_storage::DirtyBitmap::open_or_create(
            &bitmap,
            node_id,
            geometry,
            mirror_storage::Durability::Process,
        )
        .unwrap();
        bm.set_resync_target(Some(0x77)).unwrap();
    }
    let region_size = pair.region_size.to_string();
    let (region, queue) = (pair.path("backup.region"), pair.path("backup.queue"));
    let args = [
        "primary",
        "--region",
        region.to_str().unwrap(),
        "--region-size",
        &region_size,
        "--queue",
        queue.to_str().unwrap(),
        "--queue-size",
        "8MiB",
        "--peer",
        &pair.addr,
    ];
    let (st, _, err) = run(&args);
    assert_clean_error(st, &err, "resync");
    // Not a bitmap at all: refused, naming the file and what to do.
    std::fs::write(&bitmap, b"hello").unwrap();
    let args = pair.backup_args();
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "bitmap");
}

#[test]
fn damaged_or_foreign_queue_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    // Create valid files once.
    let mut b = pair.start_backup(0);
    assert!(b.stop().success());
    let queue = pair.path("backup.queue");
    let (st, out, _) = run(&["status", queue.to_str().unwrap()]);
    assert!(st.success(), "{out}");
    // Another region size with the same files.
    let mut args = pair.backup_args();
    let i = args.iter().position(|a| a == "--region-size").unwrap();
    args[i + 1] = "2MiB".into();
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "region");
    // A corrupted header.
    let mut bytes = std::fs::read(&queue).unwrap();
    bytes[20] ^= 0xFF;
    std::fs::write(&queue, &bytes).unwrap();
    let args = pair.backup_args();
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "queue");
    let (st, _, err) = run(&["status", queue.to_str().unwrap()]);
    assert_clean_error(st, &err, "queue");
    // Not a queue file at all.
    std::fs::write(&queue, b"hello").unwrap();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "queue");
}

#[test]
fn garbage_other_versions_and_a_second_primary_are_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(dir.path(), "block");
    let mut backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 1);
    primary.wait_until("writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") >= 100
    });

    // Garbage bytes.
    let mut s = TcpStream::connect(&pair.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    drop(s);

    // A frame of another protocol version (1: a node from before terms): the reply is a
    // Reject frame (kind 2) with code ProtocolVersion (1) naming both versions.
    let mut frame = Vec::new();
    frame.extend_from_slice(b"LMIR");
    frame.push(1); // version 1
    frame.push(1); // Hello
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    let mut s = TcpStream::connect(&pair.addr).unwrap();
    s.write_all(&frame).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        reply.len() >= 20 && &reply[0..4] == b"LMIR" && reply[5] == 2 && reply[16] == 1,
        "reply {reply:?}"
    );
    let reason = String::from_utf8_lossy(&reply[20..]);
    assert!(
        reason.contains("version 1")
            && reason.contains(&format!("version {}", mirror_proto::PROTOCOL_VERSION)),
        "{reason}"
    );
    drop(s);

    // A second primary with its own files: refused, exits with a clear error.
    let other = tempfile::tempdir().unwrap();
    let mut second = Pair::new(other.path(), "block");
    second.addr = pair.addr.clone();
    let args = second.primary_args(0, 10, 1);
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _, err) = run(&args_ref);
    assert_clean_error(st, &err, "bound to primary");

    // The first pair never noticed.
    let before = primary.num("progress", "completed");
    primary.wait_until("more writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") >= before + 100
    });
    assert_eq!(
        primary.get("progress", "phase").as_deref(),
        Some("synchronous")
    );
    assert!(primary.stop().success());
    assert!(backup.stop().success());
    let log = std::fs::read_to_string(pair.path("backup-0.log")).unwrap();
    assert!(
        log.contains("bad magic") || log.contains("bad first bytes"),
        "{log}"
    );
    assert!(log.contains("refusing"), "{log}");
}

#[test]
fn verify_lists_the_chunks_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::write(&a, vec![0u8; 256 << 10]).unwrap();
    let mut other = vec![0u8; 256 << 10];
    other[70_000] = 1; // chunk 1 of 64 KiB
    other[200_000] = 1; // chunk 3
    std::fs::write(&b, &other).unwrap();
    let (st, out, _) = run(&["verify", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(out.contains("2 of 4 chunks differ"), "{out}");
    assert!(
        out.contains("chunk 1:") && out.contains("chunk 3:"),
        "{out}"
    );
    let (st, out, _) = run(&["verify", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(st.success() && out.contains("IDENTICAL"), "{out}");
    let (st, _, err) = run(&["verify", a.to_str().unwrap(), "/nonexistent"]);
    assert_clean_error(st, &err, "/nonexistent");
}

/// `mirror bench` with every section off prints the targets table, each row saying which flag
/// would run it; the RDMA rows without the `rdma` feature are a clear error, not a silent skip.
#[test]
fn bench_sections_skip_on_empty_lists_and_rdma_needs_its_feature() {
    let off = bench_args(&[]);
    let (st, out, err) = run(&off);
    assert!(st.success(), "{err}");
    assert!(!out.contains("sync write latency vs"), "{out}");
    assert!(!out.contains("pipelined throughput"), "{out}");
    for row in [
        "sync write p50 / floor, 64 B",
        "RDMA sync write p50 / verbs ping-pong, 64 B",
        "RDMA sync write p50 / verbs ping-pong, 4096 B",
    ] {
        let line = out.lines().find(|l| l.starts_with(row)).unwrap_or_default();
        assert!(line.contains("not run ("), "{row}: {out}");
    }
    let with_rdma: Vec<&str> = off
        .iter()
        .copied()
        .chain(["--rdma-iterations", "5"])
        .collect();
    let (st, _, err) = run(&with_rdma);
    if cfg!(feature = "rdma") {
        // A build with the feature needs a device: without one the error names the RDMA stack.
        assert!(!err.contains("panicked"), "{err}");
    } else {
        assert_clean_error(st, &err, "`rdma` feature");
    }
}

#[test]
fn bench_flags_that_would_measure_nothing_are_refused_before_anything_runs() {
    // Each case: flags on top of every section skipped but the one they concern, and a word the
    // error must name. Before the checks these divided by zero, aborted on a 1 TB allocation or
    // printed "met" for a latency of no writes.
    let cases: [(&[&str], &str); 15] = [
        (&["--sizes", "0"], "--sizes 0"),
        (&["--sizes", "64", "--latency-runs", "0"], "--latency-runs"),
        (&["--sizes", "2MiB"], "max_write"),
        (&["--sizes", "64,999999999999"], "--sizes 999999999999"),
        (&["--sizes", "64", "--iterations", "0"], "--iterations"),
        (&["--pipelined-sizes", "0"], "--pipelined-sizes 0"),
        (&["--pipelined-sizes", "64", "--depths", "8,0"], "--depths"),
        (
            &["--pipelined-sizes", "64", "--pipelined-writes", "0"],
            "--pipelined-writes",
        ),
        (
            &["--power-writes", "10", "--power-trials", "0"],
            "--power-trials",
        ),
        (&["--recovery-regions", "1KiB"], "--recovery-regions 1KiB"),
        (
            &["--recovery-regions", "1MiB", "--recovery-missed", "1.5"],
            "--recovery-missed",
        ),
        (
            &["--recovery-regions", "1MiB", "--recovery-trials", "0"],
            "--recovery-trials",
        ),
        (&["--resync-region", "4KiB"], "--resync-region 4KiB"),
        (
            &["--resync-region", "1MiB", "--resync-dirty-percent", "0"],
            "--resync-dirty-percent",
        ),
        (
            &["--failover-rounds", "1", "--failover-region", "0"],
            "--failover-region",
        ),
    ];
    for (flags, needle) in cases {
        let (st, out, err) = run(&bench_args(flags));
        assert_clean_error(st, &err, needle);
        assert!(err.contains("bad command line"), "{flags:?}: {err}");
        assert!(out.is_empty(), "{flags:?}: something ran: {out}");
    }
}
