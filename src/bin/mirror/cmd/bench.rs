//! `mirror bench`: sync write latency next to the raw TCP ping-pong floor (interleaved),
//! pipelined throughput next to raw TCP streaming, and recovery (catch-up after K missed writes
//! next to a full remirror of the region); a table per part, or one JSON document with `--json`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use mirror::MirrorError;
use mirror_proto::wire::MAX_WRITE_LEN;

use super::shared::{parse_size_arg, scratch_base_dir, split_set, usage, CliResult};

/// The flags of `mirror bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Payload sizes for the latency comparison
    #[arg(long, value_delimiter = ',', default_value = "64,512,4096,65536")]
    sizes: Vec<String>,
    /// Writes (and round trips) per size
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Runs of the latency comparison, each with a fresh pair of nodes; the targets judge the
    /// median of the runs' ratios (one run's p99 moves with this machine's own tail)
    #[arg(long, default_value_t = 5)]
    latency_runs: usize,
    /// Queue depths for pipelined throughput
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    depths: Vec<usize>,
    /// Payload sizes for pipelined throughput
    #[arg(long, value_delimiter = ',', default_value = "64,4096")]
    pipelined_sizes: Vec<String>,
    /// Writes per pipelined measurement
    #[arg(long, default_value_t = 200_000)]
    pipelined_writes: u64,
    /// Writes per trial for `durability = power` at depth 64 (4 KiB) next to a raw group-commit
    /// floor on the same filesystem (0: skip)
    #[arg(long, default_value_t = 20_000)]
    power_writes: u64,
    /// Interleaved trials of the `power` figures (the best of each is kept)
    #[arg(long, default_value_t = 3)]
    power_trials: usize,
    /// Directory for the `power` figures' files: a disk-backed filesystem (on tmpfs a sync is
    /// free and the figure says nothing)
    #[arg(long, default_value = "/var/tmp")]
    power_dir: PathBuf,
    /// Region sizes for the recovery benchmark ("": skip it)
    #[arg(long, value_delimiter = ',', default_value = "256MiB,1GiB")]
    recovery_regions: Vec<String>,
    /// Missed writes for the recovery benchmark, as fractions of the region's 4 KiB slots
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01")]
    recovery_missed: Vec<f64>,
    /// Interleaved trials of each recovery figure (a catch-up, then the region streamed; the
    /// best of each is kept)
    #[arg(long, default_value_t = 3)]
    recovery_trials: usize,
    /// Region size for the bitmap figures: initial sync vs TCP streaming, online verify vs a
    /// checksum pass, catch-up through the queue and through the bitmap ("": skip them)
    #[arg(long, default_value = "1GiB")]
    resync_region: String,
    /// Percent of the region's chunks rewritten while the backup is away (bitmap figures)
    #[arg(long, default_value_t = 1.0)]
    resync_dirty_percent: f64,
    /// Failover rounds (promote → first completed write, and the rejoin's bytes; 0: skip)
    #[arg(long, default_value_t = 10)]
    failover_rounds: usize,
    /// Region size for the failover benchmark
    #[arg(long, default_value = "256MiB")]
    failover_region: String,
    /// Writes per size for the cost of peer authentication (none, secret, TLS; 0: skip)
    #[arg(long, default_value_t = 5_000)]
    security_iterations: usize,
    /// Machine-readable output (one JSON document on stdout)
    #[arg(long)]
    json: bool,
    /// Write a latency CDF chart (SVG) of every size, floor and engine
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Any config key for both nodes: --set key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Writes per size and way for the cost of the C API over the Rust API (0: skip)
    #[arg(long, default_value_t = 5_000)]
    c_api_iterations: usize,
    /// The reference ping-pong to run beside the floor, in the same run (`benches/pingpong.c`
    /// built: `cc -O2 -o target/pingpong benches/pingpong.c`); the floor is trusted when its p50
    /// is within 10 % of the reference's
    #[arg(long, value_name = "PATH")]
    reference: Option<std::path::PathBuf>,
    /// Directory for the nodes' files (default /dev/shm when present, else the temp dir)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Synchronous writes over RDMA per size (64 B and 4 KiB), next to a verbs ping-pong over
    /// the same transport; needs a build with the `rdma` feature and a device (`--set
    /// rdma_device=rxe0`, `rdma_gid_index`, `rdma_port`). 0: skip
    #[arg(long, default_value_t = 0)]
    rdma_iterations: usize,
    /// A raw verbs round trip of 64 B measured outside (`ibv_rc_pingpong -s 64`'s usec/iter), in
    /// µs: the RDMA row of 64 B prints the engine's p50 over it too
    #[arg(long, value_name = "US")]
    rdma_raw_floor_us: Option<f64>,
}

/// Payload sizes (`--sizes`, `--pipelined-sizes`; "" skips a list's section).
fn listed_sizes(list: &[String]) -> Result<Vec<usize>, MirrorError> {
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Ok(parse_size_arg(s)? as usize))
        .collect()
}

/// The smallest region each section can run in: one 4 KiB write (recovery, failover), one
/// 64 KiB chunk (the bitmap figures).
const RECOVERY_REGION_MIN: u64 = 4 << 10;
const RESYNC_REGION_MIN: u64 = 64 << 10;
/// The nodes' `max_write` unless set (their 64 MiB queues hold the config's default).
const DEFAULT_MAX_WRITE: usize = mirror::config::DEFAULT_MAX_WRITE as usize;

/// Refuses what would make a section measure nothing, divide by zero or print a verdict from
/// no samples, before anything runs: a flag that skips a section says so (0 or "").
fn check_args(a: &BenchArgs) -> Result<(), MirrorError> {
    // The benchmark's nodes take writes up to their `max_write`: its default, or a `--set`.
    let mut max_write = DEFAULT_MAX_WRITE;
    for pair in &a.set {
        if let ("max_write", value) = split_set(pair)? {
            max_write = parse_size_arg(value)?.min(MAX_WRITE_LEN as u64) as usize;
        }
    }
    let write_sizes = |flag: &str, list: &[String]| -> Result<bool, MirrorError> {
        let sizes = listed_sizes(list)?;
        if let Some(bad) = sizes.iter().find(|&&n| n == 0 || n > max_write) {
            return Err(usage(format!(
                "{flag} {bad}: a write is 1 byte to the nodes' max_write, {max_write} bytes (--set max_write=... raises it, to {} MiB at most)",
                MAX_WRITE_LEN >> 20
            )));
        }
        Ok(!sizes.is_empty())
    };
    if a.c_api_iterations > 0 {
        // The C API's pair is configured through the C API, with the default limit.
        if let Some(bad) = listed_sizes(&a.sizes)?
            .into_iter()
            .find(|&n| n > DEFAULT_MAX_WRITE)
        {
            return Err(usage(format!(
                "--sizes {bad}: the C API's figures take writes of up to {DEFAULT_MAX_WRITE} bytes (--c-api-iterations 0 skips them)"
            )));
        }
    }
    let at_least_one = |flag: &str, n: u64, why: &str| {
        if n == 0 {
            return Err(usage(format!("{flag} must be at least 1 ({why})")));
        }
        Ok(())
    };
    if write_sizes("--sizes", &a.sizes)? {
        at_least_one(
            "--iterations",
            a.iterations as u64,
            "--sizes '' skips the latency",
        )?;
        at_least_one(
            "--latency-runs",
            a.latency_runs as u64,
            "--sizes '' skips the latency",
        )?;
    }
    if write_sizes("--pipelined-sizes", &a.pipelined_sizes)? {
        at_least_one(
            "--pipelined-writes",
            a.pipelined_writes,
            "--pipelined-sizes '' skips the throughput",
        )?;
        if a.depths.is_empty() || a.depths.contains(&0) {
            return Err(usage(
                "--depths lists writes in flight, each at least 1 (--pipelined-sizes '' skips the throughput)",
            ));
        }
    }
    if a.power_writes > 0 {
        at_least_one(
            "--power-trials",
            a.power_trials as u64,
            "--power-writes 0 skips `power`",
        )?;
    }
    let recovery_regions: Vec<&String> = a
        .recovery_regions
        .iter()
        .filter(|r| !r.trim().is_empty())
        .collect();
    if !recovery_regions.is_empty() {
        at_least_one(
            "--recovery-trials",
            a.recovery_trials as u64,
            "--recovery-regions '' skips the recovery",
        )?;
        for region in recovery_regions {
            if parse_size_arg(region)? < RECOVERY_REGION_MIN {
                return Err(usage(format!(
                    "--recovery-regions {region}: at least 4 KiB (one write)"
                )));
            }
        }
        if let Some(bad) = a
            .recovery_missed
            .iter()
            .find(|f| !(f.is_finite() && **f > 0.0 && **f <= 1.0))
        {
            return Err(usage(format!(
                "--recovery-missed {bad}: a fraction of the region's 4 KiB slots, above 0 and at most 1"
            )));
        }
    }
    if !a.resync_region.trim().is_empty() {
        if parse_size_arg(&a.resync_region)? < RESYNC_REGION_MIN {
            return Err(usage(format!(
                "--resync-region {}: at least 64 KiB (one chunk)",
                a.resync_region
            )));
        }
        let dirty = a.resync_dirty_percent;
        if !(dirty.is_finite() && dirty > 0.0 && dirty <= 100.0) {
            return Err(usage(format!(
                "--resync-dirty-percent {dirty}: above 0 and at most 100"
            )));
        }
    }
    if a.failover_rounds > 0 && parse_size_arg(&a.failover_region)? < RECOVERY_REGION_MIN {
        return Err(usage(format!(
            "--failover-region {}: at least 4 KiB (one write)",
            a.failover_region
        )));
    }
    if let Some(us) = a.rdma_raw_floor_us {
        if !(us.is_finite() && us > 0.0) {
            return Err(usage(format!(
                "--rdma-raw-floor-us {us}: a round trip's time, above 0"
            )));
        }
    }
    Ok(())
}

pub fn run(a: &BenchArgs) -> CliResult {
    use mirror::bench;
    check_args(a)?;
    // Memory-backed files by default: the benchmark measures the engine, not the page cache's
    // writeback to this machine's disk (which throttles long runs of file-backed writes).
    let base = scratch_base_dir(a.dir.as_deref());
    let dir = base.join(format!("mirror-bench-{}", std::process::id()));
    let io = |context: String| move |source| MirrorError::Io { context, source };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    // Removed however the run ends: its files are hundreds of megabytes, often in memory
    // (/dev/shm), and `mirror bench | head` ends it by unwinding from a print to the closed
    // pipe (quietly, status 141: main.rs).
    let _files = RemoveOnDrop(dir.clone());
    let mut extra = Vec::new();
    for pair in &a.set {
        let (key, value) = split_set(pair)?;
        extra.push((key.to_owned(), value.to_owned()));
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
        let sizes = listed_sizes(&a.sizes)?;
        let pipelined_sizes = listed_sizes(&a.pipelined_sizes)?;
        // Ratios compare within one machine: the report names its own.
        let machine = bench::Machine::this();
        say(format!("machine: {machine}"));
        report.insert("machine".into(), serde_json::json!(machine));
        // Which crc32c pass this CPU runs over payloads: the per-byte figures depend on it.
        let crc_pass = mirror_proto::crc::WidePass::of_this_cpu().describe();
        say(format!(
            "crc32c passes over {} bytes or more: {crc_pass}",
            mirror_proto::crc::WIDE_MIN
        ));
        report.insert("crc_pass".into(), serde_json::json!(crc_pass));
        // 1. Latency, interleaved with the floor.
        let pair_dir = dir.join("latency");
        std::fs::create_dir_all(&pair_dir).map_err(io("creating bench dir".into()))?;
        let pair = bench::LocalPair::open(&pair_dir, 64 << 20, &extra_ref)?;
        if !sizes.is_empty() {
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
        }
        let mut latency = Vec::new();
        // Per size (in `sizes`' order): every run's ratios, and its samples for the plot.
        let mut ratios = vec![RunRatios::default(); sizes.len()];
        let mut plot_samples = vec![(Vec::new(), Vec::new()); sizes.len()];
        let runs = if sizes.is_empty() { 0 } else { a.latency_runs };
        for run in 1..=runs {
            if runs > 1 {
                say(format!("run {run} of {runs} (a fresh pair of nodes)"));
            }
            // The first run's pair goes on to the pipelined figures; the others close after it.
            let fresh_dir = pair_dir.join(format!("run-{run}"));
            let fresh = if run == 1 {
                None
            } else {
                std::fs::create_dir_all(&fresh_dir).map_err(io("creating bench dir".into()))?;
                Some(bench::LocalPair::open(&fresh_dir, 64 << 20, &extra_ref)?)
            };
            for (i, &payload) in sizes.iter().enumerate() {
                let c = bench::compare_sync_write(
                    fresh.as_ref().unwrap_or(&pair),
                    payload,
                    a.iterations,
                    a.reference.as_deref(),
                )?;
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
                if let (Some(r), Some(ratio)) = (c.reference, c.floor_vs_reference_p50()) {
                    say(format!(
                        "{:>8} reference ping-pong (two processes): p50 {:.1} p99 {:.1} p99.9 {:.1}; floor p50 / reference p50 = {:.2} (within 10 %: {})",
                        "",
                        r.p50_us,
                        r.p99_us,
                        r.p999_us,
                        ratio,
                        met((0.9..=1.1).contains(&ratio))
                    ));
                }
                say(format!(
                    "{:>8} first write after idle (pollers parked; one per block, not above): p50 {:.1} p99 {:.1} ({} writes)",
                    "",
                    c.after_idle.p50_us,
                    c.after_idle.p99_us,
                    c.after_idle.samples
                ));
                ratios[i].note(&c);
                let mut v = serde_json::to_value(&c).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("run".into(), run.into());
                    o.insert("ratio_p50".into(), c.ratio_p50().into());
                    o.insert("ratio_p99".into(), c.ratio_p99().into());
                    if let Some(ratio) = c.floor_vs_reference_p50() {
                        o.insert("floor_vs_reference_p50".into(), ratio.into());
                    }
                }
                latency.push(v);
                plot_samples[i].0.extend_from_slice(&c.floor_ns);
                plot_samples[i].1.extend_from_slice(&c.engine_ns);
            }
            if let Some(fresh) = fresh {
                fresh.primary.close()?;
                fresh.backup.close()?;
                drop(fresh);
                let _ = std::fs::remove_dir_all(&fresh_dir);
            }
        }
        let mut plot_series = Vec::new();
        for (&payload, (mut floor_ns, mut engine_ns)) in sizes.iter().zip(plot_samples) {
            floor_ns.sort_unstable();
            engine_ns.sort_unstable();
            plot_series.push((format!("floor {payload} B"), floor_ns));
            plot_series.push((format!("sync write {payload} B"), engine_ns));
        }
        if runs > 1 {
            say(format!(
                "medians of the {runs} runs (the targets judge these; each run's in brackets)"
            ));
            for (&payload, r) in sizes.iter().zip(&ratios) {
                say(format!(
                    "{payload:>8} x p50 {} [{}]; x p99 {} [{}]",
                    shown_median(&r.p50),
                    listed(&r.p50),
                    shown_median(&r.p99),
                    listed(&r.p99)
                ));
            }
        }
        let medians: Vec<serde_json::Value> = sizes
            .iter()
            .zip(&ratios)
            .map(|(&payload, r)| {
                serde_json::json!({
                    "payload": payload,
                    "runs": r.p50.len(),
                    "ratio_p50": bench::median(&r.p50),
                    "ratio_p99": bench::median(&r.p99),
                    "floor_vs_reference_p50": bench::median(&r.floor_vs_reference),
                    "ratio_p50_each_run": r.p50,
                    "ratio_p99_each_run": r.p99,
                    "floor_vs_reference_p50_each_run": r.floor_vs_reference,
                })
            })
            .collect();
        report.insert("sync_latency_medians".into(), medians.into());
        report.insert("sync_latency".into(), latency.into());
        // 1b. The C API next to the Rust API, on the same node.
        if a.c_api_iterations > 0 && !sizes.is_empty() {
            say(String::new());
            say(
                "C API vs Rust API, same node, interleaved (p50 us; target: at most 5 % more)"
                    .into(),
            );
            let mut rows = Vec::new();
            for &payload in &sizes {
                let cdir = dir.join("c-api");
                let _ = std::fs::remove_dir_all(&cdir);
                std::fs::create_dir_all(&cdir).map_err(io("creating bench dir".into()))?;
                let c = bench::c_api_cost(&cdir, payload, a.c_api_iterations)?;
                let _ = std::fs::remove_dir_all(&cdir);
                say(format!(
                    "{:>8} mirror_write {:.1} vs Mirror::write {:.1} ({:+.1} %: {}); mirror_submit+wait {:.1} vs submit+wait {:.1} ({:+.1} %: {})",
                    payload,
                    c.c_write_p50_us,
                    c.rust_write_p50_us,
                    c.write_overhead() * 100.0,
                    met(c.write_overhead() <= 0.05),
                    c.c_submit_p50_us,
                    c.rust_submit_p50_us,
                    c.submit_overhead() * 100.0,
                    met(c.submit_overhead() <= 0.05)
                ));
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("write_overhead".into(), c.write_overhead().into());
                    o.insert("submit_overhead".into(), c.submit_overhead().into());
                }
                rows.push(v);
            }
            report.insert("c_api".into(), rows.into());
        }
        if let Some(p) = &a.plot {
            bench::write_cdf_svg(
                p,
                "libmirror sync write vs TCP ping-pong floor (CDF)",
                &plot_series,
            )
            .map_err(io(format!("writing {}", p.display())))?;
            say(format!("latency CDF written to {}", p.display()));
        }
        // 1c. Over RDMA, next to a verbs ping-pong over the same transport.
        if a.rdma_iterations > 0 {
            let rdma_dir = dir.join("rdma");
            std::fs::create_dir_all(&rdma_dir).map_err(io("creating bench dir".into()))?;
            let rows = rdma_latency(a, &rdma_dir, &extra_ref, &say)?;
            report.insert("rdma_latency".into(), rows.into());
        }
        // 2. Pipelined throughput next to raw TCP streaming.
        if !pipelined_sizes.is_empty() {
            say(String::new());
            say(
                "pipelined throughput (loopback; the floor streamed before each depth, the best kept)"
                    .into(),
            );
            say(format!(
                "{:>8} {:>6} {:>12} {:>10} {:>14} {:>8}",
                "bytes", "depth", "writes/s", "MB/s", "TCP floor MB/s", "x floor"
            ));
        }
        let mut pipelined = Vec::new();
        for &payload in &pipelined_sizes {
            let frame = payload + bench::WRITE_OVERHEAD;
            // The floor is streamed before each depth's run and the best kept: one measurement
            // of it moved 2.3-4.1 GB/s between two runs minutes apart, enough to turn a verdict.
            let mut floors = Vec::new();
            let mut runs = Vec::new();
            for &depth in &a.depths {
                floors.push(
                    bench::tcp_stream_mb_per_s(
                        (frame as u64 * a.pipelined_writes.min(100_000)).max(64 << 20),
                        frame * 64,
                    )
                    .map_err(io("TCP streaming floor".into()))?
                        * payload as f64
                        / frame as f64,
                );
                runs.push((
                    depth,
                    bench::pipelined(&pair, payload, depth, a.pipelined_writes)?,
                ));
            }
            let floor = floors.iter().copied().fold(0.0, f64::max);
            for (depth, t) in runs {
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
                    o.insert("tcp_floor_trials_mb_per_s".into(), floors.clone().into());
                }
                pipelined.push(v);
            }
        }
        report.insert("pipelined".into(), pipelined.into());
        pair.primary.close()?;
        pair.backup.close()?;
        drop(pair);
        let _ = std::fs::remove_dir_all(&pair_dir);
        // 2b. `power`: pipelined 4 KiB at depth 64 next to a raw group-commit loop, same disk.
        if a.power_writes > 0 {
            let pdir = a
                .power_dir
                .join(format!("mirror-bench-power-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&pdir);
            std::fs::create_dir_all(&pdir).map_err(io(format!("creating {}", pdir.display())))?;
            let _power_files = RemoveOnDrop(pdir.clone());
            let r = bench::power_group_commit(
                &pdir,
                4096,
                64,
                a.power_writes,
                a.power_trials,
                &extra_ref,
            )?;
            say(String::new());
            say(format!(
                "durability = power, 4 KiB at depth 64 ({}, {}; best of {} interleaved trials of {} writes):",
                r.dir,
                r.filesystem,
                r.trials.len(),
                a.power_writes
            ));
            if r.filesystem == "tmpfs" {
                say("  (tmpfs: fdatasync costs nothing here, so these figures say nothing about a disk; --power-dir)".into());
            }
            say(format!(
                "  engine {:.0} writes/s; raw group commit ({} records of {} bytes per fdatasync) {:.0}/s = {:.0} % (target 80 %: {}); two such loops at once (both nodes' queues on this one disk) {:.0}/s each = {:.0} %",
                r.engine_writes_per_s,
                r.depth,
                r.record_bytes,
                r.floor_writes_per_s,
                r.vs_floor * 100.0,
                met(r.vs_floor >= 0.8),
                r.floor_two_writers_per_s,
                r.vs_two_writer_floor * 100.0
            ));
            say(format!(
                "  to this one disk the pair writes {} bytes per write (each node's queue record and region write), the loop {}: engine {:.0} MB/s, the two loops together {:.0} MB/s (twice the slower one's)",
                r.disk_bytes_per_write,
                r.record_bytes,
                r.engine_disk_mb_per_s,
                r.two_writers_disk_mb_per_s
            ));
            report.insert("power".into(), serde_json::to_value(&r).unwrap_or_default());
        }
        // 3. Recovery: catch-up after K missed writes vs a full remirror.
        let mut recovery = Vec::new();
        if a.recovery_regions.iter().any(|r| !r.trim().is_empty()) && !a.recovery_missed.is_empty()
        {
            say(String::new());
            say(format!(
                "recovery: catch-up after K missed 4 KiB writes vs streaming the whole region from its file (loopback; best of {} interleaved trials)",
                a.recovery_trials.max(1)
            ));
            say(format!(
                "{:>10} {:>9} {:>12} {:>12} {:>11} {:>14} {:>13} {:>9}",
                "region",
                "missed",
                "catch-up s",
                "reconnect s",
                "transfer s",
                "catch-up bytes",
                "full copy s",
                "speedup"
            ));
            for region in a.recovery_regions.iter().filter(|r| !r.trim().is_empty()) {
                let region_bytes = parse_size_arg(region)?;
                for &frac in &a.recovery_missed {
                    let missed = ((region_bytes / 4096) as f64 * frac).round().max(1.0) as u64;
                    let rdir = dir.join("recovery");
                    let _ = std::fs::remove_dir_all(&rdir);
                    std::fs::create_dir_all(&rdir).map_err(io("creating bench dir".into()))?;
                    let r = bench::recovery(&rdir, region_bytes, missed, 4096, a.recovery_trials)?;
                    let _ = std::fs::remove_dir_all(&rdir);
                    say(format!(
                        "{:>10} {:>9} {:>12.4} {:>12.4} {:>11.4} {:>14} {:>13.4} {:>8.1}x",
                        region,
                        missed,
                        r.catch_up_s,
                        r.reconnect_s,
                        r.transfer_s,
                        r.catch_up_bytes,
                        r.full_remirror_s,
                        r.speedup
                    ));
                    if r.trials.len() > 1 {
                        say(format!(
                            "{:>10} trials (catch-up s / transfer s / region stream MB/s): {}",
                            "",
                            r.trials
                                .iter()
                                .map(|t| format!(
                                    "{:.4}/{:.4}/{:.0}",
                                    t.catch_up_s, t.transfer_s, t.stream_mb_per_s
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    recovery.push(serde_json::to_value(r).unwrap_or_default());
                }
            }
        }
        report.insert("recovery".into(), recovery.into());
        // 3b. Beyond the queue: resyncs, initial sync, online verify.
        if !a.resync_region.trim().is_empty() {
            let region_bytes = parse_size_arg(&a.resync_region)?;
            let rdir = dir.join("resync");
            let _ = std::fs::remove_dir_all(&rdir);
            std::fs::create_dir_all(&rdir).map_err(io("creating bench dir".into()))?;
            let r = bench::beyond_the_queue(&rdir, region_bytes, a.resync_dirty_percent)?;
            let _ = std::fs::remove_dir_all(&rdir);
            say(String::new());
            say(format!(
                "beyond the queue (region {}, 64 KiB chunks, loopback):",
                a.resync_region
            ));
            say(format!(
                "  initial sync of a blank node {:.0} MB/s vs raw TCP streaming of the region's bytes {:.0} MB/s (from one cached buffer: {:.0} MB/s) = {:.0}% (target 70%: {})",
                r.initial_sync_mb_per_s,
                r.tcp_stream_mb_per_s,
                r.tcp_stream_hot_mb_per_s,
                r.initial_sync_vs_tcp * 100.0,
                met(r.initial_sync_vs_tcp >= 0.7)
            ));
            say(format!(
                "  resync of a stale copy (every chunk compared, then sent) {:.0} MB/s = {:.0}% (target 70%: {})",
                r.resync_mb_per_s,
                r.resync_vs_tcp * 100.0,
                met(r.resync_vs_tcp >= 0.7)
            ));
            say(format!(
                "  (best of {} interleaved trials, MB/s region stream/cached stream/initial sync/resync: {})",
                r.trials.len(),
                r.trials
                    .iter()
                    .map(|t| {
                        format!(
                            "{:.0}/{:.0}/{:.0}/{:.0}",
                            t.tcp_stream, t.tcp_stream_hot, t.initial_sync, t.resync
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            say(format!(
                "  online verify {:.0} MB/s vs one checksum pass over the region {:.0} MB/s = {:.0}%",
                r.verify_mb_per_s,
                r.checksum_pass_mb_per_s,
                r.verify_vs_checksum * 100.0
            ));
            say(format!(
                "  {}% of the chunks rewritten during an outage: catch-up through the queue {:.3} s ({} bytes), through the bitmap {:.3} s ({} bytes, {} dirty chunks), full remirror {:.3} s",
                r.dirty_percent,
                r.catch_up_queue_s,
                r.catch_up_queue_bytes,
                r.catch_up_bitmap_s,
                r.catch_up_bitmap_bytes,
                r.dirty_chunks_at_return,
                r.full_remirror_s
            ));
            say(format!(
                "  writes during that outage with a 256 KiB queue (folding, never waiting): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                r.outage_write_latency.p50_us,
                r.outage_write_latency.p99_us,
                r.outage_write_max_us
            ));
            report.insert(
                "beyond_the_queue".into(),
                serde_json::to_value(&r).unwrap_or_default(),
            );
        }
        // 4. Failover: promote → first completed write, and what each rejoin moved.
        if a.failover_rounds > 0 {
            let region_bytes = parse_size_arg(&a.failover_region)?;
            let fdir = dir.join("failover");
            let _ = std::fs::remove_dir_all(&fdir);
            std::fs::create_dir_all(&fdir).map_err(io("creating bench dir".into()))?;
            let f = bench::failover(&fdir, region_bytes, a.failover_rounds, 1000)?;
            let _ = std::fs::remove_dir_all(&fdir);
            let mut bytes = f.rejoin_bytes.clone();
            bytes.sort_unstable();
            let median_bytes = bytes.get(bytes.len() / 2).copied().unwrap_or(0);
            say(String::new());
            say(format!(
                "failover ({} rounds, region {}, 1000 4 KiB writes between): promote -> first completed write p50 {:.1} us p99 {:.1} us; each rejoin moved median {} bytes = {:.3}% of the region",
                f.rounds,
                a.failover_region,
                f.failover.p50_us,
                f.failover.p99_us,
                median_bytes,
                median_bytes as f64 * 100.0 / region_bytes as f64
            ));
            report.insert(
                "failover".into(),
                serde_json::to_value(&f).unwrap_or_default(),
            );
        }
        // 5. Peer authentication: none, secret, TLS, TLS+secret, interleaved.
        if a.security_iterations > 0 {
            let sdir = dir.join("security");
            let _ = std::fs::remove_dir_all(&sdir);
            std::fs::create_dir_all(&sdir).map_err(io("creating bench dir".into()))?;
            let runs = bench::security(
                &sdir,
                a.security_iterations,
                a.pipelined_writes.min(100_000),
            )?;
            let _ = std::fs::remove_dir_all(&sdir);
            say(String::new());
            say(
                "cost of peer authentication (loopback, same run, interleaved; us and MB/s)".into(),
            );
            say(format!(
                "{:>11} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9}",
                "mode", "64B p50", "64B p99", "4KiB p50", "4KiB p99", "4KiB d64 MB/s", "x none"
            ));
            let none_mb = runs.first().map_or(1.0, |r| r.pipelined_4k.mb_per_s);
            for r in &runs {
                say(format!(
                    "{:>11} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>9.2}",
                    r.mode,
                    r.sync_64.p50_us,
                    r.sync_64.p99_us,
                    r.sync_4k.p50_us,
                    r.sync_4k.p99_us,
                    r.pipelined_4k.mb_per_s,
                    r.pipelined_4k.mb_per_s / none_mb
                ));
            }
            report.insert(
                "security".into(),
                serde_json::to_value(&runs).unwrap_or_default(),
            );
        }
        // Last: every figure that has a target, with it.
        let rows = targets(&report);
        say(String::new());
        say("targets (ratios from this run)".into());
        say(format!(
            "{:<52} {:>19} {:>14} {:>20}",
            "figure", "measured", "target", "verdict"
        ));
        for r in &rows {
            say(format!(
                "{:<52} {:>19} {:>14} {:>20}",
                r.figure, r.measured, r.target, r.verdict
            ));
        }
        report.insert(
            "targets".into(),
            serde_json::to_value(&rows).unwrap_or_default(),
        );
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::Value::Object(report))
                    .unwrap_or_default()
            );
        }
        Ok(ExitCode::SUCCESS)
    })();
    result
}

/// The RDMA section: synchronous writes of 64 B and 4 KiB over `transport = rdma` next to a
/// verbs ping-pong over the same transport, interleaved; one JSON value per size.
#[cfg(feature = "rdma")]
fn rdma_latency(
    a: &BenchArgs,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
    say: &dyn Fn(String),
) -> Result<Vec<serde_json::Value>, MirrorError> {
    say(String::new());
    say(format!(
        "sync write latency over RDMA vs a verbs ping-pong over the same transport (queue pairs, ring, credits; {} writes per size, interleaved; us)",
        a.rdma_iterations
    ));
    say(format!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "bytes", "floor p50", "floor p99", "sync p50", "sync p99", "x p50", "x p99"
    ));
    let comparisons = mirror::bench::rdma_sync_writes(dir, extra, &[64, 4096], a.rdma_iterations)?;
    let mut rows = Vec::new();
    for c in comparisons {
        say(format!(
            "{:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2} {:>7.2}",
            c.payload,
            c.floor.p50_us,
            c.floor.p99_us,
            c.engine.p50_us,
            c.engine.p99_us,
            c.ratio_p50(),
            c.ratio_p99()
        ));
        let mut v = serde_json::to_value(&c).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("ratio_p50".into(), c.ratio_p50().into());
            o.insert("ratio_p99".into(), c.ratio_p99().into());
            if let Some(raw) = a
                .rdma_raw_floor_us
                .filter(|us| *us > 0.0 && c.payload == 64)
            {
                say(format!(
                    "{:>8} raw verbs round trip measured outside: {raw:.1}; sync p50 / that = {:.2}",
                    "",
                    c.engine.p50_us / raw
                ));
                o.insert("raw_floor_us".into(), raw.into());
                o.insert("ratio_p50_raw".into(), (c.engine.p50_us / raw).into());
            }
        }
        rows.push(v);
    }
    Ok(rows)
}

/// Without the `rdma` feature there is no RDMA transport to measure.
#[cfg(not(feature = "rdma"))]
fn rdma_latency(
    _: &BenchArgs,
    _: &std::path::Path,
    _: &[(&str, &str)],
    _: &dyn Fn(String),
) -> Result<Vec<serde_json::Value>, MirrorError> {
    Err(MirrorError::Unsupported(
        "--rdma-iterations: this mirror was built without the `rdma` feature \
         (cargo build --release --features rdma)"
            .into(),
    ))
}

/// Removes a directory when dropped (unwinding included).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A target's verdict, as the tables print it.
fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "not met"
    }
}

/// One size's ratios over the latency runs.
#[derive(Clone, Default)]
struct RunRatios {
    p50: Vec<f64>,
    p99: Vec<f64>,
    floor_vs_reference: Vec<f64>,
}

impl RunRatios {
    fn note(&mut self, c: &mirror::bench::Comparison) {
        self.p50.push(c.ratio_p50());
        self.p99.push(c.ratio_p99());
        self.floor_vs_reference.extend(c.floor_vs_reference_p50());
    }
}

fn shown_median(values: &[f64]) -> String {
    mirror::bench::median(values).map_or("-".into(), |m| format!("{m:.2}"))
}

fn listed(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One row of the targets table.
#[derive(serde::Serialize)]
struct TargetRow {
    figure: String,
    measured: String,
    target: String,
    verdict: &'static str,
}

/// The figures of this run that have a target (docs/PERFORMANCE.md), each with its verdict; a
/// target this run did not measure says so, and where it is measured.
fn targets(report: &serde_json::Map<String, serde_json::Value>) -> Vec<TargetRow> {
    use serde_json::Value;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let list = |k: &str| {
        report
            .get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    let mut row = |figure: String,
                   measured: Option<(f64, String)>,
                   target: &str,
                   ok: &dyn Fn(f64) -> bool,
                   elsewhere: &'static str| {
        let (measured, verdict) = match measured {
            Some((x, shown)) => (shown, met(ok(x))),
            None => ("-".to_string(), elsewhere),
        };
        rows.push(TargetRow {
            figure,
            measured,
            target: target.to_string(),
            verdict,
        });
    };
    // The latency rows judge the median over the runs (`--latency-runs`).
    let latency = list("sync_latency_medians");
    let at = |payload: u64| {
        latency
            .iter()
            .find(|v| v.get("payload").and_then(Value::as_u64) == Some(payload))
            .cloned()
    };
    let over_runs = match latency
        .first()
        .and_then(|v| v.get("runs").and_then(Value::as_u64))
    {
        Some(runs) if runs > 1 => format!(" (median of {runs})"),
        _ => String::new(),
    };
    for (payload, limit) in [(64u64, 1.10), (4096, 1.10), (65536, 1.3)] {
        let ratio = at(payload).and_then(|v| num(&v, "ratio_p50"));
        row(
            format!("sync write p50 / floor, {payload} B"),
            ratio.map(|x| (x, format!("{x:.2}x{over_runs}"))),
            &format!("<= {limit:.2}x"),
            &|x| x <= limit,
            "not run (--sizes)",
        );
    }
    for payload in [64u64, 4096] {
        let ratio = at(payload).and_then(|v| num(&v, "ratio_p99"));
        row(
            format!("sync write p99 / floor, {payload} B"),
            ratio.map(|x| (x, format!("{x:.2}x{over_runs}"))),
            "<= 1.50x",
            &|x| x <= 1.5,
            "not run (--sizes)",
        );
    }
    for payload in [64u64, 4096] {
        let ratio = at(payload).and_then(|v| num(&v, "floor_vs_reference_p50"));
        row(
            format!("floor p50 / reference ping-pong p50, {payload} B"),
            ratio.map(|x| (x, format!("{x:.2}{over_runs}"))),
            "0.90 .. 1.10",
            &|x| (0.9..=1.1).contains(&x),
            "not run (--reference)",
        );
    }
    let pipelined = list("pipelined");
    let best_4k = pipelined
        .iter()
        .filter(|v| v.get("payload").and_then(Value::as_u64) == Some(4096))
        .filter_map(|v| Some(num(v, "mb_per_s")? / num(v, "tcp_floor_mb_per_s")?))
        .fold(None, |best: Option<f64>, x| {
            Some(best.map_or(x, |b| b.max(x)))
        });
    row(
        "pipelined 4 KiB, best depth / TCP streaming".into(),
        best_4k.map(|x| (x, format!("{:.0} %", x * 100.0))),
        ">= 70 %",
        &|x| x >= 0.7,
        "not run (--pipelined-sizes)",
    );
    let small_64 = pipelined
        .iter()
        .find(|v| {
            v.get("payload").and_then(Value::as_u64) == Some(64)
                && v.get("depth").and_then(Value::as_u64) == Some(64)
        })
        .and_then(|v| num(v, "writes_per_s"));
    row(
        "pipelined 64 B at depth 64, writes/s".into(),
        small_64.map(|x| (x, format!("{:.2} M", x / 1e6))),
        ">= 2 M",
        &|x| x >= 2e6,
        "not run (--depths)",
    );
    // The largest catch-up next to streaming the whole region: its transfer's throughput, and
    // the whole of it (the reconnect and the handshake too), which is what "comes back N times
    // faster than a full remirror" measures.
    let recoveries = list("recovery");
    let largest_catch_up = recoveries.iter().fold(None, |best: Option<&Value>, v| {
        match (
            best.and_then(|b| num(b, "catch_up_bytes")),
            num(v, "catch_up_bytes"),
        ) {
            (Some(b), Some(x)) if b >= x => best,
            (_, Some(_)) => Some(v),
            _ => best,
        }
    });
    for (seconds, name) in [
        ("transfer_s", "catch-up transfer (largest) / streaming"),
        ("catch_up_s", "catch-up end to end (largest) / streaming"),
    ] {
        let ratio = largest_catch_up.and_then(|v| {
            let rate = num(v, "catch_up_bytes")? / num(v, seconds)?.max(1e-9);
            let stream = num(v, "region_bytes")? / num(v, "full_remirror_s")?.max(1e-9);
            Some(rate / stream)
        });
        row(
            name.into(),
            ratio.map(|x| (x, format!("{:.0} %", x * 100.0))),
            ">= 70 %",
            &|x| x >= 0.7,
            "not run (--recovery-regions)",
        );
    }
    let beyond = report.get("beyond_the_queue");
    for (key, name) in [
        (
            "initial_sync_vs_tcp",
            "initial sync of a blank node / streaming",
        ),
        ("resync_vs_tcp", "resync of a stale copy / streaming"),
    ] {
        row(
            name.into(),
            beyond
                .and_then(|v| num(v, key))
                .map(|x| (x, format!("{:.0} %", x * 100.0))),
            ">= 70 %",
            &|x| x >= 0.7,
            "not run (--resync-region)",
        );
    }
    let c_api = list("c_api");
    let worst = |k: &str| {
        c_api
            .iter()
            .filter_map(|v| num(v, k))
            .fold(None, |w: Option<f64>, x| Some(w.map_or(x, |w| w.max(x))))
    };
    for (key, name) in [
        (
            "write_overhead",
            "C API over Rust API, mirror_write (worst size)",
        ),
        (
            "submit_overhead",
            "C API over Rust API, mirror_submit (worst size)",
        ),
    ] {
        row(
            name.into(),
            worst(key).map(|x| (x, format!("{:+.1} %", x * 100.0))),
            "<= +5 %",
            &|x| x <= 0.05,
            "not run (--c-api-iterations)",
        );
    }
    let power = report.get("power");
    let tmpfs = power
        .and_then(|v| v.get("filesystem"))
        .and_then(Value::as_str)
        == Some("tmpfs");
    row(
        "power 4 KiB at depth 64 / raw group-commit floor".into(),
        power
            .filter(|_| !tmpfs)
            .and_then(|v| num(v, "vs_floor"))
            .map(|x| (x, format!("{:.0} %", x * 100.0))),
        ">= 80 %",
        &|x| x >= 0.8,
        if tmpfs {
            "not judged (tmpfs)"
        } else {
            "not run (--power-writes)"
        },
    );
    let rdma = list("rdma_latency");
    for (payload, limit) in [(64u64, 1.5), (4096, 2.0)] {
        let ratio = rdma
            .iter()
            .find(|v| v.get("payload").and_then(Value::as_u64) == Some(payload))
            .and_then(|v| num(v, "ratio_p50"));
        row(
            format!("RDMA sync write p50 / verbs ping-pong, {payload} B"),
            ratio.map(|x| (x, format!("{x:.2}x"))),
            &format!("<= {limit:.2}x"),
            &|x| x <= limit,
            "not run (--rdma-iterations)",
        );
    }
    rows
}
