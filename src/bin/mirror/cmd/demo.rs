//! `mirror demo`: a backup and a primary process of this binary on loopback, writes, a SIGKILL of
//! each node and its recovery, a byte-for-byte check of both regions, then a failover (the
//! primary dies, the backup is promoted, the old primary rejoins as a backup) and the check
//! again. The nodes are driven
//! through their report lines by the harness the integration tests use too
//! (src/bin/mirror/node_process.rs).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::Args;
use mirror::bench::free_loopback_port;
use mirror::config::DEFAULT_MAX_WRITE;
use mirror::workload::Workload;
use mirror::{ConfigBuilder, MirrorError};

use super::primary::read_completions;
use super::shared::{parse_size_arg, split_set, usage, CliResult};
use crate::node_process::{self, LogMode, NodeProcess, WaitError};

/// The flags of `mirror demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory for the region and queue files (default: a new directory under /tmp)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Region size [default: 16MiB, or four phases' bytes (--writes × --write-size) when
    /// that is more]; at least four phases' bytes, so that replaying an outage has a full copy
    /// of the region to be compared with
    #[arg(long)]
    region_size: Option<String>,
    /// Bytes per write
    #[arg(long, default_value = "64")]
    write_size: String,
    /// Writes per phase of the demo
    #[arg(long, default_value_t = 20000)]
    writes: u64,
    /// Transport between the two processes: tcp | rdma (rdma needs a build with `--features rdma`
    /// and an RDMA device; pick it with --set rdma_device=NAME --set rdma_gid_index=N)
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Any config key for both nodes: --set key=value (repeatable), e.g. rdma_device=rxe0
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Keep the working directory afterwards
    #[arg(long)]
    keep: bool,
}

pub fn run(a: &DemoArgs) -> CliResult {
    match a.transport.as_str() {
        "tcp" => {}
        "rdma" if cfg!(feature = "rdma") => {}
        "rdma" => return Err(MirrorError::Unsupported(
            "demo transport 'rdma' is not available in this build: build with `--features rdma`"
                .into(),
        )),
        other => {
            return Err(usage(format!(
                "--transport expects 'tcp' or 'rdma', got '{other}'"
            )))
        }
    }
    // Check the keys once here, so that a typo is one clear error rather than two failed children.
    let mut probe = ConfigBuilder::new();
    for pair in &a.set {
        let (key, value) = split_set(pair)?;
        probe.set(key, value)?;
    }
    let write_size = parse_size_arg(&a.write_size)?;
    let (region_size, queue_size) = demo_sizes(a, write_size)?;
    Workload::new(1, write_size as usize, region_size).map_err(usage)?;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| MirrorError::Io {
                context: format!("creating {}", d.display()),
                source,
            })?;
            d.clone()
        }
        None => {
            let d = std::env::temp_dir().join(format!("mirror-demo-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).map_err(|source| MirrorError::Io {
                context: format!("creating {}", d.display()),
                source,
            })?;
            d
        }
    };
    let result = run_in(a, &dir, region_size, queue_size, write_size);
    if a.keep || result.as_ref().map_or(true, |c| *c != ExitCode::SUCCESS) {
        println!("files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The region's size when none is given.
const DEFAULT_REGION: u64 = 16 << 20;
/// Each node's queue, at least.
const DEFAULT_QUEUE: u64 = 64 << 20;
/// Phases of writes the region and the queue hold at least: an outage writes `--writes`, and
/// its records must fit the queue (a primary folds them into its bitmap at three quarters full)
/// and their catch-up be smaller than the region, for the checks to be about the engine rather
/// than about the sizes.
const PHASES_HELD: u64 = 4;
/// An outage also goes on while the demo notices it and the backup restarts (about 0.1 s: on
/// a 2-core VM a degraded primary's 64 MiB queue was full, 15 152 records of 4 KiB, 93 ms after
/// it lost its backup): the region and the queues hold this long of writes more, at up to
/// `FAST_BYTES_PER_S` or `FAST_WRITES_PER_S`.
const OVERRUN_S: f64 = 0.25;
const FAST_BYTES_PER_S: f64 = 1e9;
const FAST_WRITES_PER_S: f64 = 5e5;

/// The region's and the queues' sizes for `--writes` writes of `write_size` bytes per phase.
fn demo_sizes(a: &DemoArgs, write_size: u64) -> Result<(u64, u64), MirrorError> {
    let largest = mirror_proto::wire::MAX_WRITE_LEN as u64;
    if write_size > largest {
        return Err(usage(format!(
            "--write-size {write_size}: a write is at most {} MiB",
            largest >> 20
        )));
    }
    let round_up_to_mib = |bytes: u64| bytes.div_ceil(1 << 20) << 20;
    let overrun =
        |item: u64| (OVERRUN_S * FAST_BYTES_PER_S.min(FAST_WRITES_PER_S * item as f64)) as u64;
    let phases = PHASES_HELD.saturating_mul(a.writes);
    let region_needs = phases
        .saturating_mul(write_size)
        .saturating_add(overrun(write_size));
    let region = match &a.region_size {
        None => DEFAULT_REGION.max(round_up_to_mib(region_needs)),
        Some(given) => {
            let region = parse_size_arg(given)?;
            if region < region_needs {
                return Err(usage(format!(
                    "--region-size {given} is less than an outage of --writes {} × --write-size {write_size} could write ({region_needs} bytes with the demo's margins): its catch-up could not be compared with a full copy of the region; give at least {}MiB, or fewer --writes",
                    a.writes,
                    round_up_to_mib(region_needs) >> 20
                )));
            }
            region
        }
    };
    // A record is its payload, a header and up to 7 bytes of padding.
    let record = write_size + mirror_storage::RECORD_HEADER_BYTES + 7;
    let queue = DEFAULT_QUEUE.max(round_up_to_mib(
        phases
            .saturating_mul(record)
            .saturating_add(overrun(record)),
    ));
    if region.max(queue) > DEMO_FILE_MAX {
        let fitting = (DEMO_FILE_MAX - overrun(record)) / (PHASES_HELD * record);
        return Err(usage(format!(
            "--writes {} of --write-size {write_size} would need a region of {} MiB and queues of {} MiB (the demo's files stay within {} GiB each): give at most --writes {fitting}",
            a.writes,
            region >> 20,
            queue >> 20,
            DEMO_FILE_MAX >> 30
        )));
    }
    Ok((region, queue))
}

/// The largest region or queue file the demo makes (in its directory, under /tmp by default).
const DEMO_FILE_MAX: u64 = 4 << 30;

/// The five steps, with the nodes' files in `dir`.
fn run_in(
    a: &DemoArgs,
    dir: &Path,
    region_size: u64,
    queue_size: u64,
    write_size: u64,
) -> CliResult {
    let port = free_loopback_port()?;
    let addr = format!("127.0.0.1:{port}");
    let p = |name: &str| dir.join(name).display().to_string();
    let common = |region: &str, queue: &str| -> Vec<String> {
        let mut v = vec![
            "--region".into(),
            p(region),
            "--region-size".into(),
            region_size.to_string(),
            "--queue".into(),
            p(queue),
            "--queue-size".into(),
            queue_size.to_string(),
            // Writes above the default limit (1 MiB) are allowed up to theirs (a `--set` of
            // the user's, after it, still wins).
            "--set".into(),
            format!("max_write={}", write_size.max(DEFAULT_MAX_WRITE)),
        ];
        v.extend(["--transport".to_string(), a.transport.clone()]);
        for kv in &a.set {
            v.extend(["--set".to_string(), kv.clone()]);
        }
        v
    };
    let mut backup_args = vec!["backup".to_string()];
    backup_args.extend(common("backup.region", "backup.queue"));
    backup_args.extend([
        "--listen".into(),
        addr.clone(),
        "--report-ms".into(),
        "100".into(),
    ]);
    let completions = dir.join("completions");
    let primary_args = |start_id: u64| -> Vec<String> {
        let mut v = vec!["primary".to_string()];
        v.extend(common("primary.region", "primary.queue"));
        v.extend([
            "--peer".into(),
            addr.clone(),
            "--on-peer-loss".into(),
            "continue".into(),
            "--set".into(),
            "ack_timeout_ms=300".into(),
            "--set".into(),
            "reconnect_interval_ms=50".into(),
            "--write-size".into(),
            write_size.to_string(),
            "--start-id".into(),
            start_id.to_string(),
            "--completions".into(),
            completions.display().to_string(),
            "--report-ms".into(),
            "50".into(),
        ]);
        v
    };
    let mut check = Checklist {
        failures: Vec::new(),
    };
    let n = a.writes;
    let t_demo = Instant::now();
    let link = if a.transport == "rdma" {
        "RDMA verbs; setup and liveness over TCP"
    } else {
        "TCP loopback"
    };
    println!("libmirror demo: primary + backup on {addr} ({link}), region {region_size} bytes, queues of {queue_size} bytes, {write_size}-byte writes");
    println!("files in {}", dir.display());

    println!("\n1. start the backup and the primary; mirror {n} writes synchronously");
    let mut backup = spawn_node("backup", &backup_args, &dir.join("backup.log"))?;
    // Its first line: "backup listening on ...".
    wait_for(
        &mut backup,
        "the backup to listen",
        Duration::from_secs(10),
        |b| b.has("backup"),
    )?;
    let mut primary = spawn_node("primary", &primary_args(0), &dir.join("primary-1.log"))?;
    // Under `continue` the primary writes (degraded) while it connects; count from the moment
    // it mirrors synchronously.
    wait_for(
        &mut primary,
        "the primary to mirror synchronously",
        Duration::from_secs(60),
        |p| p.get("progress", "phase").as_deref() == Some("synchronous"),
    )?;
    let at_sync = primary.num("progress", "completed");
    wait_for(
        &mut primary,
        &format!("{n} completed synchronous writes"),
        Duration::from_secs(120),
        |p| p.num("progress", "completed") >= at_sync + n,
    )?;
    let sync_p50 = primary.get("progress", "p50_us").unwrap_or_default();
    let sync_p99 = primary.get("progress", "p99_us").unwrap_or_default();
    println!(
        "   {} writes completed; sync write latency so far p50={sync_p50} us p99={sync_p99} us",
        primary.num("progress", "completed")
    );
    check.check(
        primary.get("progress", "phase").as_deref() == Some("synchronous"),
        "primary is mirroring synchronously",
    );

    println!("\n2. SIGKILL the backup mid-stream; the primary keeps writing (degraded)");
    backup.kill9();
    let at_kill = primary.num("progress", "completed");
    wait_for(
        &mut primary,
        "degraded mode",
        Duration::from_secs(10),
        |p| p.get("progress", "degraded").as_deref() == Some("1"),
    )?;
    wait_for(
        &mut primary,
        "writes in degraded mode",
        Duration::from_secs(60),
        |p| p.num("progress", "completed") >= at_kill + n,
    )?;
    let backup_info = mirror::node::inspect(&dir.join("backup.queue"))?;
    let backup_last = backup_info.last_seq;
    println!(
        "   backup killed after {at_kill} completions; it holds requests through seq {backup_last}; primary went on to {} completions",
        primary.num("progress", "completed")
    );
    check.check(true, "primary kept writing while the backup was down");

    println!("\n3. restart the backup: catch-up replays exactly the requests it missed");
    let recoveries_before = primary.num("progress", "recoveries");
    let mut backup = spawn_node("backup", &backup_args, &dir.join("backup-2.log"))?;
    wait_for(
        &mut primary,
        "the backup's catch-up",
        Duration::from_secs(30),
        |p| {
            p.num("progress", "recoveries") > recoveries_before
                && p.get("progress", "phase").as_deref() == Some("synchronous")
        },
    )?;
    let rec_records = primary.num("progress", "rec_records");
    let rec_bytes = primary.num("progress", "rec_bytes");
    let primary_next = primary.num("progress", "next_seq");
    println!(
        "   catch-up moved {rec_records} requests = {rec_bytes} payload bytes (region: {region_size} bytes; a full remirror would copy all of it)"
    );
    check.check(
        rec_records > 0 && rec_bytes == rec_records * write_size,
        "catch-up moved whole requests only",
    );
    check.check(
        rec_records <= primary_next.saturating_sub(1 + backup_last),
        format!(
            "catch-up moved no request the backup already had (moved {rec_records}, missing at most {})",
            primary_next.saturating_sub(1 + backup_last)
        ),
    );
    check.check(
        rec_bytes < region_size,
        "catch-up moved less than the region",
    );

    println!("\n4. SIGKILL the primary between an ack and its apply; restart it");
    let completed_before = primary.num("progress", "completed");
    wait_for(
        &mut primary,
        "more synchronous writes",
        Duration::from_secs(60),
        |p| p.num("progress", "completed") >= completed_before + n / 2,
    )?;
    if cfg!(feature = "fail-points") {
        primary.signal(libc::SIGUSR1);
    } else {
        println!(
            "   (this build has no fail points, feature fail-points: SIGKILL at a random instant instead)"
        );
        primary.signal(libc::SIGKILL);
    }
    // No time limit: the fail point fires at the primary's next apply, and it is writing.
    let status = primary.child.wait().map_err(|source| MirrorError::Io {
        context: "waiting for the primary".into(),
        source,
    })?;
    check.check(
        status.signal() == Some(libc::SIGKILL),
        format!("primary died by SIGKILL at the fail point ({status})"),
    );
    let pq = mirror::node::inspect(&dir.join("primary.queue"))?;
    let bq = mirror::node::inspect(&dir.join("backup.queue"))?;
    println!(
        "   at the crash: primary applied through seq {}, backup holds through seq {}",
        pq.applied_through, bq.last_seq
    );
    if cfg!(feature = "fail-points") {
        check.check(
            bq.last_seq > pq.applied_through,
            "the backup had acknowledged a write the primary had not applied",
        );
    }
    let mut primary = spawn_node(
        "primary",
        &primary_args(10_000_000),
        &dir.join("primary-2.log"),
    )?;
    wait_for(
        &mut primary,
        "the primary's recovery",
        Duration::from_secs(30),
        |p| p.get("progress", "phase").as_deref() == Some("synchronous"),
    )?;
    let applied = primary.num("progress", "applied");
    println!(
        "   restarted primary recovered: applied through seq {applied}, recovery moved {} requests",
        primary.num("progress", "rec_records")
    );
    check.check(
        applied >= bq.last_seq,
        "restarted primary applied every request the backup acknowledged",
    );

    println!("\n5. write {n} more, stop both, compare the regions");
    wait_for(
        &mut primary,
        &format!("{n} more writes"),
        Duration::from_secs(120),
        |p| p.num("progress", "completed") >= n,
    )?;
    let st = stop(&mut primary, Duration::from_secs(20))?;
    check.check(st.success(), format!("primary stopped cleanly ({st})"));
    let pq = mirror::node::inspect(&dir.join("primary.queue"))?;
    wait_for(
        &mut backup,
        "the backup to apply everything",
        Duration::from_secs(20),
        |_| {
            mirror::node::inspect(&dir.join("backup.queue"))
                .map(|b| b.applied_through >= pq.last_seq)
                .unwrap_or(false)
        },
    )?;
    let st = stop(&mut backup, Duration::from_secs(20))?;
    check.check(st.success(), format!("backup stopped cleanly ({st})"));
    check_regions(dir, &completions, write_size, region_size, &mut check)?;
    failover_act(
        a,
        dir,
        region_size,
        queue_size,
        write_size,
        &completions,
        &mut check,
    )?;

    // The primary's last line (of step 5): "done writes=.. samples=.. p50_us=..".
    let f = |k: &str| primary.get("done", k).unwrap_or_default();
    println!(
        "\nsync write latency ({write_size} B, {link}, last primary run of {} writes): p50={} us p90={} us p99={} us p99.9={} us max={} us",
        f("samples"),
        f("p50_us"),
        f("p90_us"),
        f("p99_us"),
        f("p999_us"),
        f("max_us")
    );
    println!("demo took {:.1} s", t_demo.elapsed().as_secs_f64());
    if check.failures.is_empty() {
        println!("\nDEMO PASSED: every check held");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nDEMO FAILED: {} check(s) failed", check.failures.len());
        Ok(ExitCode::from(1))
    }
}

/// Step 6: failover. Both nodes now know each other's address. The primary dies, the backup is
/// promoted (`mirror promote`, through its control socket) and writes alone; the old primary
/// comes back as a backup and rejoins, moving only what it missed (and repairing what it held
/// that the new history does not); then both regions are checked again.
fn failover_act(
    a: &DemoArgs,
    dir: &Path,
    region_size: u64,
    queue_size: u64,
    write_size: u64,
    completions: &Path,
    check: &mut Checklist,
) -> Result<(), MirrorError> {
    let n = a.writes / 4;
    println!("\n6. failover: kill the primary, promote the backup, write, rejoin the old primary as a backup");
    let (pa, pb) = (free_loopback_port()?, free_loopback_port()?);
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let p = |name: &str| dir.join(name).display().to_string();
    let node_args = |files: &str, listen: &str, peer: &str| -> Vec<String> {
        let mut v = vec![
            "--region".into(),
            p(&format!("{files}.region")),
            "--region-size".into(),
            region_size.to_string(),
            "--queue".into(),
            p(&format!("{files}.queue")),
            "--queue-size".into(),
            queue_size.to_string(),
            "--set".into(),
            format!("max_write={}", write_size.max(DEFAULT_MAX_WRITE)),
            "--transport".into(),
            a.transport.clone(),
            "--listen".into(),
            listen.into(),
            "--peer".into(),
            peer.into(),
            "--set".into(),
            "ack_timeout_ms=300".into(),
            "--set".into(),
            "reconnect_interval_ms=50".into(),
        ];
        for kv in &a.set {
            v.extend(["--set".to_string(), kv.clone()]);
        }
        v
    };
    let workload = |start_id: u64| -> Vec<String> {
        vec![
            "--write-size".into(),
            write_size.to_string(),
            "--start-id".into(),
            start_id.to_string(),
            "--completions".into(),
            completions.display().to_string(),
            "--report-ms".into(),
            "50".into(),
        ]
    };
    // B (the backup's files) writes once it is promoted: alone, under `continue`.
    let mut b_args = vec!["backup".to_string()];
    b_args.extend(node_args("backup", &addr_b, &addr_a));
    b_args.extend([
        "--on-peer-loss".into(),
        "continue".into(),
        "--write-when-primary".into(),
    ]);
    b_args.extend(workload(0));
    let mut b = spawn_node("backup", &b_args, &dir.join("backup-3.log"))?;
    wait_for(
        &mut b,
        "the backup to listen",
        Duration::from_secs(10),
        |b| b.has("backup"),
    )?;
    let mut a_args = vec!["primary".to_string()];
    a_args.extend(node_args("primary", &addr_a, &addr_b));
    a_args.extend([
        "--on-peer-loss".into(),
        "block".into(),
        "--depth".into(),
        "8".into(),
    ]);
    a_args.extend(workload(20_000_000));
    let mut primary = spawn_node("primary", &a_args, &dir.join("primary-3.log"))?;
    wait_for(
        &mut primary,
        "the primary to mirror synchronously",
        Duration::from_secs(60),
        |p| p.get("progress", "phase").as_deref() == Some("synchronous"),
    )?;
    let from = primary.num("progress", "completed");
    wait_for(&mut primary, "writes", Duration::from_secs(60), |p| {
        p.num("progress", "completed") >= from + n
    })?;
    primary.kill9();
    let aq = mirror::node::inspect(&dir.join("primary.queue"))?;
    println!(
        "   primary killed mid-stream (on_peer_loss=block, 8 writes in flight): its queue holds through seq {}",
        aq.last_seq
    );
    let t_promote = Instant::now();
    let exe = std::env::current_exe().map_err(|source| MirrorError::Io {
        context: "finding the mirror executable".into(),
        source,
    })?;
    let promoted = loop {
        // Refused ("connected to a live primary") until the backup sees the primary gone.
        let out = Command::new(&exe)
            .args(["promote", &p("backup.queue")])
            .output()
            .map_err(|source| MirrorError::Io {
                context: "running mirror promote".into(),
                source,
            })?;
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        if t_promote.elapsed() > Duration::from_secs(10) {
            return Err(MirrorError::Failed {
                reason: format!(
                    "mirror promote kept failing: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    wait_for(
        &mut b,
        "the new primary's first writes",
        Duration::from_secs(30),
        |b| b.num("progress", "completed") > 0,
    )?;
    println!(
        "   `mirror promote` -> {promoted}; the new primary completed its first writes {:.0} ms after the promote command started (alone: on_peer_loss=continue)",
        t_promote.elapsed().as_secs_f64() * 1000.0
    );
    check.check(
        promoted.starts_with("promoted term="),
        "the backup was promoted",
    );
    wait_for(
        &mut b,
        "writes on the new primary",
        Duration::from_secs(60),
        |b| b.num("progress", "completed") >= n,
    )?;
    let bq = mirror::node::inspect(&dir.join("backup.queue"))?;
    println!(
        "   the new primary is at seq {} (term {}); restart the old primary as a backup",
        bq.last_seq, bq.current_term
    );
    let recoveries_before = b.num("progress", "recoveries");
    let mut old_args = vec!["backup".to_string()];
    old_args.extend(node_args("primary", &addr_a, &addr_b));
    old_args.extend(["--report-ms".into(), "50".into()]);
    let mut old = spawn_node("old primary", &old_args, &dir.join("primary-4.log"))?;
    wait_for(
        &mut b,
        "the old primary's rejoin",
        Duration::from_secs(30),
        |b| {
            b.num("progress", "recoveries") > recoveries_before
                && b.get("progress", "phase").as_deref() == Some("synchronous")
        },
    )?;
    let rec_records = b.num("progress", "rec_records");
    let rec_bytes = b.num("progress", "rec_bytes");
    let diverged: Vec<mirror_storage::DiscardedFile> =
        mirror_storage::list_discarded(&dir.join("primary.queue"))?
            .iter()
            .map(|f| mirror_storage::read_discarded(f))
            .collect::<Result<_, _>>()?;
    let diverged_records: usize = diverged.iter().map(|d| d.records.len()).sum();
    let diverged_bytes: usize = diverged
        .iter()
        .flat_map(|d| &d.records)
        .map(|r| r.payload.len())
        .sum();
    println!(
        "   rejoin moved {rec_records} requests = {rec_bytes} payload bytes (and repaired its {diverged_records} divergent records, {diverged_bytes} bytes, saved first); region: {region_size} bytes"
    );
    check.check(
        rec_bytes + diverged_bytes as u64 * 2 < region_size,
        "the rejoin moved only what diverged or was missed, far less than the region",
    );
    let st = stop(&mut b, Duration::from_secs(20))?;
    check.check(st.success(), format!("new primary stopped cleanly ({st})"));
    let last = mirror::node::inspect(&dir.join("backup.queue"))?.last_seq;
    wait_for(
        &mut old,
        "the old primary to apply everything",
        Duration::from_secs(20),
        |_| {
            mirror::node::inspect(&dir.join("primary.queue"))
                .map(|q| q.applied_through >= last)
                .unwrap_or(false)
        },
    )?;
    let st = stop(&mut old, Duration::from_secs(20))?;
    check.check(st.success(), format!("old primary stopped cleanly ({st})"));
    check_regions(dir, completions, write_size, region_size, check)?;
    Ok(())
}

/// The demo's final checks, after a step that stopped both nodes: the two region files are
/// byte-identical (chunk checksums) and each holds every completed write, none torn.
fn check_regions(
    dir: &Path,
    completions: &Path,
    write_size: u64,
    region_size: u64,
    check: &mut Checklist,
) -> Result<(), MirrorError> {
    let pr = dir.join("primary.region");
    let br = dir.join("backup.region");
    let ca = mirror_storage::file_chunk_checksums(&pr, 64 << 10)?;
    let cb = mirror_storage::file_chunk_checksums(&br, 64 << 10)?;
    let differing = ca.iter().zip(&cb).filter(|(x, y)| x != y).count();
    check.check(
        differing == 0 && ca.len() == cb.len(),
        format!(
            "regions are byte-identical ({} chunks of 64 KiB compared, {differing} differ)",
            ca.len()
        ),
    );
    let completed = read_completions(completions)?;
    let w = Workload::new(1, write_size as usize, region_size).map_err(usage)?;
    for (name, path) in [("primary.region", &pr), ("backup.region", &br)] {
        let bytes = std::fs::read(path).map_err(|source| MirrorError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        let r = w.check(&bytes, &completed);
        check.check(
            r.is_ok(),
            format!(
                "{name} holds all {} completed writes (of every primary), none torn{}",
                completed.len(),
                r.err().map(|e| format!(": {e}")).unwrap_or_default()
            ),
        );
    }
    Ok(())
}

/// Starts a node: this same binary, whatever path it was started by.
fn spawn_node(name: &str, args: &[String], log: &Path) -> Result<NodeProcess, MirrorError> {
    let exe = std::env::current_exe().map_err(|source| MirrorError::Io {
        context: "finding the mirror executable".into(),
        source,
    })?;
    let mut command = Command::new(exe);
    command.args(args);
    NodeProcess::spawn(name, command, log, LogMode::Truncate)
}

/// Waits until `cond` holds on `node`; the error names `what` it waited for.
fn wait_for(
    node: &mut NodeProcess,
    what: &str,
    timeout: Duration,
    cond: impl FnMut(&NodeProcess) -> bool,
) -> Result<(), MirrorError> {
    node_process::wait_until(node, timeout, cond).map_err(|e| {
        let reason = match e {
            WaitError::Exited(status) => {
                format!("{} exited ({status}) while waiting for {what}", node.name)
            }
            WaitError::TimedOut | WaitError::Io(_) => format!("timed out waiting for {what}"),
        };
        MirrorError::Failed { reason }
    })
}

/// SIGTERM, then waits (at most `timeout`, then SIGKILL) for the node to exit.
fn stop(node: &mut NodeProcess, timeout: Duration) -> Result<ExitStatus, MirrorError> {
    node.stop(timeout).map_err(|e| match e {
        WaitError::Io(source) => MirrorError::Io {
            context: format!("waiting for {}", node.name),
            source,
        },
        WaitError::TimedOut | WaitError::Exited(_) => MirrorError::Failed {
            reason: format!("{} did not stop within {timeout:?}", node.name),
        },
    })
}

/// The demo's checks: each prints `[ok]` or `[FAIL]`; the failures decide the exit code.
struct Checklist {
    failures: Vec<String>,
}

impl Checklist {
    fn check(&mut self, cond: bool, what: impl Into<String>) {
        let what = what.into();
        if cond {
            println!("  [ok]   {what}");
        } else {
            println!("  [FAIL] {what}");
            self.failures.push(what);
        }
    }
}
