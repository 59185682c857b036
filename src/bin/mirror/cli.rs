//! The `mirror` subcommands.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use mirror::config::parse_size;
use mirror::workload::Workload;
use mirror::{ConfigBuilder, Mirror, MirrorError, Role, Stats};

use crate::{NodeArgs, WorkloadArgs};

pub type CliResult = Result<ExitCode, MirrorError>;

fn usage(msg: impl Into<String>) -> MirrorError {
    MirrorError::Config(mirror::ConfigError::BadValue {
        key: "command line".into(),
        value: String::new(),
        why: msg.into(),
    })
}

/// Builds a node config: file, then flags, then --set.
pub fn build_config(node: &NodeArgs, role: Role) -> Result<mirror::Config, MirrorError> {
    let mut b = ConfigBuilder::new();
    if let Some(path) = &node.config {
        b.load_toml(path)?;
    }
    b.set("role", &role.to_string())?;
    let flags = [
        ("region", &node.region),
        ("region_size", &node.region_size),
        ("queue", &node.queue),
        ("queue_size", &node.queue_size),
        ("listen", &node.listen),
        ("peer", &node.peer),
        ("transport", &node.transport),
        ("durability", &node.durability),
        ("on_peer_loss", &node.on_peer_loss),
        ("cpu", &node.cpu),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            b.set(key, v)?;
        }
    }
    for kv in &node.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| usage(format!("--set expects KEY=VALUE, got '{kv}'")))?;
        b.set(k.trim(), v)?;
    }
    Ok(b.build()?)
}

fn stop_flag() -> Result<Arc<AtomicBool>, MirrorError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|source| MirrorError::Io {
            context: "installing signal handlers".into(),
            source,
        })?;
    }
    Ok(stop)
}

fn phase_name(s: &Stats) -> String {
    format!("{:?}", s.phase).to_lowercase()
}

fn stats_line(s: &Stats) -> String {
    format!(
        "next_seq={} applied={} acked={} peer_applied={} queue_records={} queue_bytes={} phase={} degraded={} recoveries={} rec_records={} rec_bytes={}",
        s.next_seq,
        s.applied_through,
        s.acked_through,
        s.peer_applied_through,
        s.queue_records,
        s.queue_bytes,
        phase_name(s),
        u8::from(s.degraded),
        s.recoveries,
        s.last_recovery_records,
        s.last_recovery_bytes
    )
}

pub fn run_backup(node: &NodeArgs, report_ms: u64) -> CliResult {
    let cfg = build_config(node, Role::Backup)?;
    let stop = stop_flag()?;
    let m = Mirror::open(cfg)?;
    println!(
        "backup listening on {}",
        m.listen_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        let s = m.stats();
        if let Some(f) = &s.failure {
            return Err(MirrorError::Failed { reason: f.clone() });
        }
        if report_ms > 0 && last.elapsed() >= Duration::from_millis(report_ms) {
            println!("status {}", stats_line(&s));
            let _ = std::io::stdout().flush();
            last = Instant::now();
        }
    }
    m.close()?;
    println!("status {}", stats_line(&m.stats()));
    Ok(ExitCode::SUCCESS)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `p50_us=.. p99_us=.. p999_us=.. max_us=..` of latencies in nanoseconds.
fn latency_summary(lat_ns: &[u64]) -> String {
    let mut v = lat_ns.to_vec();
    v.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    format!(
        "samples={} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        v.len(),
        us(percentile(&v, 0.50)),
        us(percentile(&v, 0.90)),
        us(percentile(&v, 0.99)),
        us(percentile(&v, 0.999)),
        us(v.last().copied().unwrap_or(0))
    )
}

pub fn run_primary(node: &NodeArgs, w: &WorkloadArgs) -> CliResult {
    let cfg = build_config(node, Role::Primary)?;
    let write_size = parse_size(&w.write_size).map_err(usage)? as usize;
    let workload = Workload::new(w.seed, write_size, cfg.region_size).map_err(usage)?;
    let stop = stop_flag()?;
    let crash = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&crash)).map_err(
        |source| MirrorError::Io {
            context: "installing SIGUSR1 handler".into(),
            source,
        },
    )?;
    let mut completions = match &w.completions {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| MirrorError::Io {
                    context: format!("opening completions file {}", p.display()),
                    source,
                })?,
        ),
        None => None,
    };
    let m = Mirror::open(cfg)?;
    println!("primary started");
    let _ = std::io::stdout().flush();
    let depth = w.depth.max(1) as usize;
    let mut buf = vec![0u8; write_size];
    let mut lat_ns: Vec<u64> = Vec::new();
    let mut inflight: std::collections::VecDeque<(u64, mirror::Ticket, Instant)> =
        Default::default();
    let mut next_id = w.start_id;
    let end_id = if w.writes == 0 {
        u64::MAX
    } else {
        w.start_id + w.writes
    };
    let started = Instant::now();
    let mut last_report = Instant::now();
    type InFlight = std::collections::VecDeque<(u64, mirror::Ticket, Instant)>;
    // Waits (at most 100 ms) for the oldest write in flight; once it completed, logs it and its
    // latency.
    let mut complete_oldest =
        |m: &Mirror, inflight: &mut InFlight, lat_ns: &mut Vec<u64>| -> Result<(), MirrorError> {
            let Some(&(id, ticket, t0)) = inflight.front() else {
                return Ok(());
            };
            match m.wait(ticket, Some(Duration::from_millis(100))) {
                Ok(()) => {}
                Err(MirrorError::Timeout) => return Ok(()),
                Err(e) => return Err(e),
            }
            inflight.pop_front();
            lat_ns.push(t0.elapsed().as_nanos() as u64);
            if let Some(f) = completions.as_mut() {
                // One write(2) per line, so that a SIGKILL never leaves half a line for the
                // next run to continue.
                f.write_all(format!("{id}\n").as_bytes())
                    .map_err(|source| MirrorError::Io {
                        context: "writing completions file".into(),
                        source,
                    })?;
            }
            Ok(())
        };
    let report = |m: &Mirror, lat_ns: &[u64]| {
        let s = m.stats();
        println!(
            "progress completed={} {} {}",
            s.writes_completed,
            stats_line(&s),
            latency_summary(lat_ns)
        );
        let _ = std::io::stdout().flush();
    };
    while !stop.load(Ordering::Relaxed) && (next_id < end_id || !inflight.is_empty()) {
        if crash.swap(false, Ordering::Relaxed) {
            m.arm_crash_before_next_apply();
        }
        if next_id < end_id && inflight.len() < depth {
            if w.rate > 0 {
                let due = started
                    + Duration::from_secs_f64((next_id - w.start_id) as f64 / w.rate as f64);
                let now = Instant::now();
                if due > now && inflight.is_empty() {
                    std::thread::sleep((due - now).min(Duration::from_millis(5)));
                    continue;
                }
            }
            workload.fill(next_id, &mut buf);
            let t0 = Instant::now();
            let ticket = m.submit(workload.offset_of(next_id), &buf)?;
            inflight.push_back((next_id, ticket, t0));
            next_id += 1;
        }
        if inflight.len() >= depth || next_id >= end_id || w.rate > 0 {
            complete_oldest(&m, &mut inflight, &mut lat_ns)?;
        }
        if w.report_ms > 0 && last_report.elapsed() >= Duration::from_millis(w.report_ms) {
            report(&m, &lat_ns);
            last_report = Instant::now();
        }
    }
    // Drain what is in flight (bounded), so every completed write is logged.
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while !inflight.is_empty() && Instant::now() < drain_deadline {
        complete_oldest(&m, &mut inflight, &mut lat_ns)?;
    }
    report(&m, &lat_ns);
    m.close()?;
    println!("done writes={} {}", lat_ns.len(), latency_summary(&lat_ns));
    Ok(ExitCode::SUCCESS)
}

pub fn status(queue: &Path) -> CliResult {
    let i = mirror::node::inspect(queue)?;
    println!("queue {}", queue.display());
    println!("  format_version   {}", i.format_version);
    println!("  role             {}", i.role);
    println!("  node_id          {:#x}", i.node_id);
    println!(
        "  bound peer       {}",
        if i.peer_node_id == 0 {
            "none yet".to_string()
        } else {
            format!("{:#x}", i.peer_node_id)
        }
    );
    println!("  region_size      {} bytes", i.region_size);
    println!("  capacity         {} bytes", i.capacity_bytes);
    println!(
        "  records          {} ({} bytes, {:.1}% full)",
        i.records,
        i.bytes,
        100.0 * i.bytes as f64 / i.capacity_bytes.max(1) as f64
    );
    match i.first_seq {
        Some(f) => println!("  seqs held        {f}..={}", i.last_seq),
        None => println!("  seqs held        none (last seq {})", i.last_seq),
    }
    println!("  applied_through  {}", i.applied_through);
    println!("  next_seq         {}", i.next_seq);
    println!("  current_term     {}", i.current_term);
    let history: Vec<String> = i
        .term_history
        .entries()
        .iter()
        .map(|e| format!("term {} from seq {}", e.term, e.first_seq))
        .collect();
    println!(
        "  term history     {}",
        if history.is_empty() {
            "empty".to_string()
        } else {
            history.join(", ")
        }
    );
    // Divergent suffixes this node dropped (saved before the repair removed them).
    for path in mirror_storage::list_discarded(queue).map_err(mirror::MirrorError::from)? {
        match mirror_storage::read_discarded(&path) {
            Ok(d) => println!(
                "  discarded        {} records after seq {} ({} bytes) in {}",
                d.records.len(),
                d.common_seq,
                d.records.iter().map(|r| r.payload.len()).sum::<usize>(),
                path.display()
            ),
            Err(e) => println!("  discarded        {} (unreadable: {e})", path.display()),
        }
    }
    if i.torn_tail_cut_bytes > 0 {
        println!(
            "  torn tail        {} bytes would be cut at the next open ({:?})",
            i.torn_tail_cut_bytes, i.cut_reason
        );
    }
    println!(
        "  in use           {}",
        if i.in_use {
            "yes (a running node holds it; figures are a snapshot)"
        } else {
            "no"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: &Path, b: &Path, chunk: &str) -> CliResult {
    let chunk = parse_size(chunk).map_err(usage)?;
    if chunk == 0 {
        return Err(usage("--chunk must be at least 1 byte"));
    }
    let ca = mirror_storage::file_chunk_checksums(a, chunk)?;
    let cb = mirror_storage::file_chunk_checksums(b, chunk)?;
    let la = std::fs::metadata(a).map(|m| m.len()).unwrap_or(0);
    let lb = std::fs::metadata(b).map(|m| m.len()).unwrap_or(0);
    if la != lb {
        println!(
            "DIFFERENT sizes: {} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        );
        return Ok(ExitCode::from(1));
    }
    let differing: Vec<usize> = ca
        .iter()
        .zip(&cb)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    if differing.is_empty() {
        println!(
            "IDENTICAL: {} chunks of {chunk} bytes ({la} bytes)",
            ca.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "DIFFERENT: {} of {} chunks differ",
        differing.len(),
        ca.len()
    );
    for i in differing.iter().take(100) {
        let start = *i as u64 * chunk;
        println!("  chunk {i}: bytes {start}..{}", (start + chunk).min(la));
    }
    if differing.len() > 100 {
        println!("  ... and {} more", differing.len() - 100);
    }
    Ok(ExitCode::from(1))
}

fn read_completions(path: &Path) -> Result<Vec<u64>, MirrorError> {
    let text = std::fs::read_to_string(path).map_err(|source| MirrorError::Io {
        context: format!("reading completions file {}", path.display()),
        source,
    })?;
    // A SIGKILL can leave the last line cut: ignore a final line without its newline.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| usage(format!("bad line '{l}' in {}", path.display())))
        })
        .collect()
}

pub fn check_workload(
    region: &Path,
    completions: Option<&Path>,
    seed: u64,
    write_size: &str,
) -> CliResult {
    let write_size = parse_size(write_size).map_err(usage)? as usize;
    let bytes = std::fs::read(region).map_err(|source| MirrorError::Io {
        context: format!("reading region {}", region.display()),
        source,
    })?;
    let w = Workload::new(seed, write_size, bytes.len() as u64).map_err(usage)?;
    let completed = match completions {
        Some(p) => read_completions(p)?,
        None => Vec::new(),
    };
    match w.check(&bytes, &completed) {
        Ok(()) => {
            println!(
                "OK: {} completed writes present, no torn or foreign slot",
                completed.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAILED: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Payload sizes for the latency comparison
    #[arg(long, value_delimiter = ',', default_value = "64,512,4096,65536")]
    sizes: Vec<String>,
    /// Writes (and round trips) per size
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Queue depths for pipelined throughput
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    depths: Vec<usize>,
    /// Payload sizes for pipelined throughput
    #[arg(long, value_delimiter = ',', default_value = "64,4096")]
    pipelined_sizes: Vec<String>,
    /// Writes per pipelined measurement
    #[arg(long, default_value_t = 200_000)]
    pipelined_writes: u64,
    /// Region sizes for the recovery benchmark ("": skip it)
    #[arg(long, value_delimiter = ',', default_value = "256MiB,1GiB")]
    recovery_regions: Vec<String>,
    /// Missed writes for the recovery benchmark, as fractions of the region's 4 KiB slots
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01")]
    recovery_missed: Vec<f64>,
    /// Machine-readable output (one JSON document on stdout)
    #[arg(long)]
    json: bool,
    /// Write a latency CDF chart (SVG) of every size, floor and engine
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Any config key for both nodes: --set key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Directory for the nodes' files (default /dev/shm when present, else the temp dir)
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn bench(a: &BenchArgs) -> CliResult {
    use mirror::bench;
    // Memory-backed files by default: the benchmark measures the engine, not the page cache's
    // writeback to this machine's disk (which throttles long runs of file-backed writes).
    let base = a.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let dir = base.join(format!("mirror-bench-{}", std::process::id()));
    let io = |context: String| move |source| MirrorError::Io { context, source };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut extra = Vec::new();
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| usage(format!("--set expects KEY=VALUE, got '{kv}'")))?;
        extra.push((k.trim().to_owned(), v.to_owned()));
    }
    let extra_ref: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let say = |line: String| {
        if !a.json {
            println!("{line}");
        }
    };
    let result = (|| -> CliResult {
        let mut report = serde_json::Map::new();
        // 1. Latency, interleaved with the floor.
        let pair_dir = dir.join("latency");
        std::fs::create_dir_all(&pair_dir).map_err(io("creating bench dir".into()))?;
        let pair = bench::LocalPair::open(&pair_dir, 64 << 20, &extra_ref)?;
        say(
            "sync write latency vs raw TCP ping-pong floor (loopback, same run, interleaved; us)"
                .into(),
        );
        say(format!(
            "{:>8} {:>10} {:>10} {:>11} {:>10} {:>10} {:>11} {:>7} {:>7}",
            "bytes",
            "floor p50",
            "floor p99",
            "floor p99.9",
            "sync p50",
            "sync p99",
            "sync p99.9",
            "x p50",
            "x p99"
        ));
        say(format!("(node files in {})", dir.display()));
        let mut latency = Vec::new();
        let mut plot_series = Vec::new();
        for size in &a.sizes {
            let payload = parse_size(size).map_err(usage)? as usize;
            let c = bench::compare_sync_write(&pair, payload, a.iterations)?;
            say(format!(
                "{:>8} {:>10.1} {:>10.1} {:>11.1} {:>10.1} {:>10.1} {:>11.1} {:>7.2} {:>7.2}",
                payload,
                c.floor.p50_us,
                c.floor.p99_us,
                c.floor.p999_us,
                c.engine.p50_us,
                c.engine.p99_us,
                c.engine.p999_us,
                c.ratio_p50(),
                c.ratio_p99()
            ));
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("ratio_p50".into(), c.ratio_p50().into());
                o.insert("ratio_p99".into(), c.ratio_p99().into());
            }
            latency.push(v);
            plot_series.push((format!("floor {payload} B"), c.floor_ns.clone()));
            plot_series.push((format!("sync write {payload} B"), c.engine_ns.clone()));
        }
        report.insert("sync_latency".into(), latency.into());
        if let Some(p) = &a.plot {
            bench::write_cdf_svg(
                p,
                "libmirror sync write vs TCP ping-pong floor (CDF)",
                &plot_series,
            )
            .map_err(io(format!("writing {}", p.display())))?;
            say(format!("latency CDF written to {}", p.display()));
        }
        // 2. Pipelined throughput next to raw TCP streaming.
        say(String::new());
        say("pipelined throughput (loopback)".into());
        say(format!(
            "{:>8} {:>6} {:>12} {:>10} {:>14} {:>8}",
            "bytes", "depth", "writes/s", "MB/s", "TCP floor MB/s", "x floor"
        ));
        let mut pipelined = Vec::new();
        for size in &a.pipelined_sizes {
            let payload = parse_size(size).map_err(usage)? as usize;
            let frame = payload + bench::WRITE_OVERHEAD;
            let floor = bench::tcp_stream_mb_per_s(
                (frame as u64 * a.pipelined_writes.min(100_000)).max(64 << 20),
                frame * 64,
            )
            .map_err(io("TCP streaming floor".into()))?
                * payload as f64
                / frame as f64;
            for &depth in &a.depths {
                let t = bench::pipelined(&pair, payload, depth, a.pipelined_writes)?;
                say(format!(
                    "{:>8} {:>6} {:>12.0} {:>10.1} {:>14.1} {:>8.2}",
                    payload,
                    depth,
                    t.writes_per_s,
                    t.mb_per_s,
                    floor,
                    t.mb_per_s / floor
                ));
                let mut v = serde_json::to_value(t).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("tcp_floor_mb_per_s".into(), floor.into());
                }
                pipelined.push(v);
            }
        }
        report.insert("pipelined".into(), pipelined.into());
        pair.primary.close()?;
        pair.backup.close()?;
        drop(pair);
        let _ = std::fs::remove_dir_all(&pair_dir);
        // 3. Recovery: catch-up after K missed writes vs a full remirror.
        let mut recovery = Vec::new();
        if a.recovery_regions.iter().any(|r| !r.trim().is_empty()) && !a.recovery_missed.is_empty()
        {
            say(String::new());
            say("recovery: catch-up after K missed 4 KiB writes vs streaming the whole region (loopback)".into());
            say(format!(
                "{:>10} {:>9} {:>12} {:>14} {:>13} {:>9}",
                "region", "missed", "catch-up s", "catch-up bytes", "full copy s", "speedup"
            ));
            for region in a.recovery_regions.iter().filter(|r| !r.trim().is_empty()) {
                let region_bytes = parse_size(region).map_err(usage)?;
                for &frac in &a.recovery_missed {
                    let missed = ((region_bytes / 4096) as f64 * frac).round().max(1.0) as u64;
                    let rdir = dir.join("recovery");
                    let _ = std::fs::remove_dir_all(&rdir);
                    std::fs::create_dir_all(&rdir).map_err(io("creating bench dir".into()))?;
                    let r = bench::recovery(&rdir, region_bytes, missed, 4096)?;
                    let _ = std::fs::remove_dir_all(&rdir);
                    say(format!(
                        "{:>10} {:>9} {:>12.4} {:>14} {:>13.4} {:>8.1}x",
                        region,
                        missed,
                        r.catch_up_s,
                        r.catch_up_bytes,
                        r.full_remirror_s,
                        r.speedup
                    ));
                    recovery.push(serde_json::to_value(r).unwrap_or_default());
                }
            }
        }
        report.insert("recovery".into(), recovery.into());
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::Value::Object(report))
                    .unwrap_or_default()
            );
        }
        Ok(ExitCode::SUCCESS)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// ───────────────────────────── demo ─────────────────────────────

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory for the region and queue files (default: a new directory under /tmp)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Region size
    #[arg(long, default_value = "16MiB")]
    region_size: String,
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

/// The latest key=value line a child printed, by its first word.
#[derive(Default)]
struct Lines {
    latest: HashMap<String, HashMap<String, String>>,
    all: Vec<String>,
}

struct Proc {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Lines>>,
}

impl Proc {
    fn spawn(name: &'static str, args: &[String], log: &Path) -> Result<Proc, MirrorError> {
        let exe = std::env::current_exe().map_err(|source| MirrorError::Io {
            context: "finding the mirror executable".into(),
            source,
        })?;
        let stderr = std::fs::File::create(log).map_err(|source| MirrorError::Io {
            context: format!("creating {}", log.display()),
            source,
        })?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| MirrorError::Io {
                context: format!("starting the {name} process"),
                source,
            })?;
        let lines = Arc::new(Mutex::new(Lines::default()));
        let out = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                let mut words = line.split_whitespace();
                if let Some(kind) = words.next() {
                    let map = words
                        .filter_map(|w| w.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    l.latest.insert(kind.to_owned(), map);
                }
                l.all.push(line);
            }
        });
        Ok(Proc { name, child, lines })
    }

    fn get(&self, kind: &str, key: &str) -> Option<String> {
        let l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.latest.get(kind)?.get(key).cloned()
    }

    fn num(&self, kind: &str, key: &str) -> u64 {
        self.get(kind, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Proc) -> bool,
    ) -> Result<(), MirrorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(MirrorError::Failed {
                    reason: format!("{} exited ({status}) while waiting for {what}", self.name),
                });
            }
            if Instant::now() > deadline {
                return Err(MirrorError::Failed {
                    reason: format!("timed out waiting for {what}"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, MirrorError> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|source| MirrorError::Io {
                context: format!("waiting for {}", self.name),
                source,
            })? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(MirrorError::Failed {
                    reason: format!("{} did not stop within {timeout:?}", self.name),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn free_port() -> Result<u16, MirrorError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| MirrorError::Io {
        context: "finding a free loopback port".into(),
        source,
    })?;
    Ok(l.local_addr()
        .map_err(|source| MirrorError::Io {
            context: "finding a free loopback port".into(),
            source,
        })?
        .port())
}

struct Check {
    failures: Vec<String>,
}

impl Check {
    fn ok(&mut self, cond: bool, what: impl Into<String>) {
        let what = what.into();
        if cond {
            println!("  [ok]   {what}");
        } else {
            println!("  [FAIL] {what}");
            self.failures.push(what);
        }
    }
}

pub fn demo(a: DemoArgs) -> CliResult {
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
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| usage(format!("--set expects KEY=VALUE, got '{kv}'")))?;
        probe.set(k.trim(), v)?;
    }
    let region_size = parse_size(&a.region_size).map_err(usage)?;
    let write_size = parse_size(&a.write_size).map_err(usage)?;
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
    let result = run_demo(&a, &dir, region_size, write_size);
    if a.keep || result.as_ref().map_or(true, |c| *c != ExitCode::SUCCESS) {
        println!("files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_demo(a: &DemoArgs, dir: &Path, region_size: u64, write_size: u64) -> CliResult {
    let port = free_port()?;
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
            "64MiB".into(),
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
    let mut check = Check {
        failures: Vec::new(),
    };
    let n = a.writes;
    let t_demo = Instant::now();
    let link = if a.transport == "rdma" {
        "RDMA verbs; setup and liveness over TCP"
    } else {
        "TCP loopback"
    };
    println!("libmirror demo: primary + backup on {addr} ({link}), region {region_size} bytes, {write_size}-byte writes");
    println!("files in {}", dir.display());

    println!("\n1. start the backup and the primary; mirror {n} writes synchronously");
    let mut backup = Proc::spawn("backup", &backup_args, &dir.join("backup.log"))?;
    backup.wait_until("the backup to listen", Duration::from_secs(10), |b| {
        b.lines
            .lock()
            .map(|l| l.all.iter().any(|x| x.starts_with("backup listening")))
            .unwrap_or(false)
    })?;
    let mut primary = Proc::spawn("primary", &primary_args(0), &dir.join("primary-1.log"))?;
    // Under `continue` the primary writes (degraded) while it connects; count from the moment
    // it mirrors synchronously.
    primary.wait_until(
        "the primary to mirror synchronously",
        Duration::from_secs(60),
        |p| p.get("progress", "phase").as_deref() == Some("synchronous"),
    )?;
    let at_sync = primary.num("progress", "completed");
    primary.wait_until(
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
    check.ok(
        primary.get("progress", "phase").as_deref() == Some("synchronous"),
        "primary is mirroring synchronously",
    );

    println!("\n2. SIGKILL the backup mid-stream; the primary keeps writing (degraded)");
    backup.kill9();
    let at_kill = primary.num("progress", "completed");
    primary.wait_until("degraded mode", Duration::from_secs(10), |p| {
        p.get("progress", "degraded").as_deref() == Some("1")
    })?;
    primary.wait_until("writes in degraded mode", Duration::from_secs(60), |p| {
        p.num("progress", "completed") >= at_kill + n
    })?;
    let backup_info = mirror::node::inspect(&dir.join("backup.queue"))?;
    let backup_last = backup_info.last_seq;
    println!(
        "   backup killed after {at_kill} completions; it holds requests through seq {backup_last}; primary went on to {} completions",
        primary.num("progress", "completed")
    );
    check.ok(true, "primary kept writing while the backup was down");

    println!("\n3. restart the backup: catch-up replays exactly the requests it missed");
    let recoveries_before = primary.num("progress", "recoveries");
    let mut backup = Proc::spawn("backup", &backup_args, &dir.join("backup-2.log"))?;
    primary.wait_until("the backup's catch-up", Duration::from_secs(30), |p| {
        p.num("progress", "recoveries") > recoveries_before
            && p.get("progress", "phase").as_deref() == Some("synchronous")
    })?;
    let rec_records = primary.num("progress", "rec_records");
    let rec_bytes = primary.num("progress", "rec_bytes");
    let primary_next = primary.num("progress", "next_seq");
    println!(
        "   catch-up moved {rec_records} requests = {rec_bytes} payload bytes (region: {region_size} bytes; a full remirror would copy all of it)"
    );
    check.ok(
        rec_records > 0 && rec_bytes == rec_records * write_size,
        "catch-up moved whole requests only",
    );
    check.ok(
        rec_records <= primary_next.saturating_sub(1 + backup_last),
        format!(
            "catch-up moved no request the backup already had (moved {rec_records}, missing at most {})",
            primary_next.saturating_sub(1 + backup_last)
        ),
    );
    check.ok(
        rec_bytes < region_size,
        "catch-up moved less than the region",
    );

    println!("\n4. SIGKILL the primary between an ack and its apply; restart it");
    let completed_before = primary.num("progress", "completed");
    primary.wait_until("more synchronous writes", Duration::from_secs(60), |p| {
        p.num("progress", "completed") >= completed_before + n / 2
    })?;
    primary.signal(libc::SIGUSR1);
    let status = loop {
        if let Some(st) = primary.child.try_wait().map_err(|source| MirrorError::Io {
            context: "waiting for the primary".into(),
            source,
        })? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    check.ok(
        status.signal() == Some(libc::SIGKILL),
        format!("primary died by SIGKILL at the fail point ({status})"),
    );
    let pq = mirror::node::inspect(&dir.join("primary.queue"))?;
    let bq = mirror::node::inspect(&dir.join("backup.queue"))?;
    println!(
        "   at the crash: primary applied through seq {}, backup holds through seq {}",
        pq.applied_through, bq.last_seq
    );
    check.ok(
        bq.last_seq > pq.applied_through,
        "the backup had acknowledged a write the primary had not applied",
    );
    let mut primary = Proc::spawn(
        "primary",
        &primary_args(10_000_000),
        &dir.join("primary-2.log"),
    )?;
    primary.wait_until("the primary's recovery", Duration::from_secs(30), |p| {
        p.get("progress", "phase").as_deref() == Some("synchronous")
    })?;
    let applied = primary.num("progress", "applied");
    println!(
        "   restarted primary recovered: applied through seq {applied}, recovery moved {} requests",
        primary.num("progress", "rec_records")
    );
    check.ok(
        applied >= bq.last_seq,
        "restarted primary applied every request the backup acknowledged",
    );

    println!("\n5. write {n} more, stop both, compare the regions");
    primary.wait_until(&format!("{n} more writes"), Duration::from_secs(120), |p| {
        p.num("progress", "completed") >= n
    })?;
    let st = primary.stop(Duration::from_secs(20))?;
    check.ok(st.success(), format!("primary stopped cleanly ({st})"));
    let final_line = primary
        .lines
        .lock()
        .map(|l| l.latest.get("done").cloned().unwrap_or_default())
        .unwrap_or_default();
    let pq = mirror::node::inspect(&dir.join("primary.queue"))?;
    backup.wait_until(
        "the backup to apply everything",
        Duration::from_secs(20),
        |_| {
            mirror::node::inspect(&dir.join("backup.queue"))
                .map(|b| b.applied_through >= pq.last_seq)
                .unwrap_or(false)
        },
    )?;
    let st = backup.stop(Duration::from_secs(20))?;
    check.ok(st.success(), format!("backup stopped cleanly ({st})"));
    let pr = dir.join("primary.region");
    let br = dir.join("backup.region");
    let ca = mirror_storage::file_chunk_checksums(&pr, 64 << 10)?;
    let cb = mirror_storage::file_chunk_checksums(&br, 64 << 10)?;
    let differing = ca.iter().zip(&cb).filter(|(x, y)| x != y).count();
    check.ok(
        differing == 0 && ca.len() == cb.len(),
        format!(
            "regions are byte-identical ({} chunks of 64 KiB compared, {differing} differ)",
            ca.len()
        ),
    );
    let completed = read_completions(&completions)?;
    let w = Workload::new(1, write_size as usize, region_size).map_err(usage)?;
    for (name, path) in [("primary", &pr), ("backup", &br)] {
        let bytes = std::fs::read(path).map_err(|source| MirrorError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        let r = w.check(&bytes, &completed);
        check.ok(
            r.is_ok(),
            format!(
                "{name} region holds all {} completed writes, none torn{}",
                completed.len(),
                r.err().map(|e| format!(": {e}")).unwrap_or_default()
            ),
        );
    }
    let f = |k: &str| final_line.get(k).cloned().unwrap_or_default();
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
