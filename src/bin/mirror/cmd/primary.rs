//! `mirror primary`: run a primary node with a built-in seeded write workload, printing
//! `progress` lines, appending completed write ids to a completions file, and a `done` line at
//! the end. SIGUSR1 arms a crash between the next ack and its apply (the demo's and the tests'
//! fail point).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use mirror::workload::Workload;
use mirror::{Mirror, MirrorError, Role, Ticket};

use super::shared::{
    build_config, parse_size_arg, stats_line, stop_flag, usage, CliResult, NodeArgs,
};

/// The flags of `mirror primary`.
#[derive(Args, Debug, Clone)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
}

/// The built-in workload: seeded writes (the same seed gives the same bytes at the same offsets,
/// which `mirror check-workload` checks), their pace and their depth.
#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Number of writes (0: until SIGINT/SIGTERM)
    #[arg(long, default_value_t = 0)]
    pub writes: u64,
    /// Bytes per write
    #[arg(long, default_value = "64")]
    pub write_size: String,
    /// Workload seed (the same seed gives the same writes)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Id of the first write (use a fresh range after a restart)
    #[arg(long, default_value_t = 0)]
    pub start_id: u64,
    /// Writes per second (0: as fast as possible)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Writes in flight at once (1: synchronous write calls)
    #[arg(long, default_value_t = 1)]
    pub depth: u64,
    /// Append the id of every completed write to this file (one per line, written at once)
    #[arg(long)]
    pub completions: Option<PathBuf>,
    /// Print a progress line this often (milliseconds; 0: never)
    #[arg(long, default_value_t = 500)]
    pub report_ms: u64,
}

/// Writes submitted and not yet completed, oldest first: (write id, ticket, submit time).
type InFlight = VecDeque<(u64, Ticket, Instant)>;

pub fn run(args: &PrimaryArgs) -> CliResult {
    let cfg = build_config(&args.node, Role::Primary)?;
    let mut writer = Writer::new(&args.workload, cfg.region_size)?;
    let stop = stop_flag()?;
    // SIGUSR1 arms the test fail point (feature `fail-points` only: a release build keeps the
    // signal's default action).
    #[cfg(feature = "fail-points")]
    let crash = {
        let crash = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, std::sync::Arc::clone(&crash))
            .map_err(|source| MirrorError::Io {
                context: "installing SIGUSR1 handler".into(),
                source,
            })?;
        crash
    };
    let m = Mirror::open(cfg)?;
    println!("primary started");
    let _ = std::io::stdout().flush();
    let mut last_report = Instant::now();
    while !stop.load(Ordering::Relaxed) && writer.has_work() {
        #[cfg(feature = "fail-points")]
        if crash.swap(false, Ordering::Relaxed) {
            m.arm_crash_before_next_apply();
        }
        writer.step(&m)?;
        if writer.report_due(&mut last_report) {
            writer.report(&m);
        }
    }
    writer.drain(&m)?;
    writer.report(&m);
    m.close()?;
    println!(
        "done writes={} {} {}",
        writer.lat_ns.len(),
        latency_summary(&writer.lat_ns),
        writer.throughput_summary()
    );
    Ok(ExitCode::SUCCESS)
}

/// The built-in workload's writer: submits seeded writes (at most `depth` in flight, at `rate`),
/// logs each completion, and measures latency. Used by `mirror primary`, and by `mirror backup
/// --write-when-primary` once it is promoted.
pub struct Writer {
    workload: Workload,
    buf: Vec<u8>,
    inflight: InFlight,
    next_id: u64,
    end_id: u64,
    first_id: u64,
    depth: usize,
    rate: u64,
    started: Instant,
    report_ms: u64,
    /// Latencies of completed writes, in nanoseconds.
    pub lat_ns: Vec<u64>,
    /// When the first and the latest write completed: the throughput's span (from the first
    /// completion, so that starting up and connecting are not counted).
    completed_span: Option<(Instant, Instant)>,
    completions: Option<std::fs::File>,
}

impl Writer {
    pub fn new(w: &WorkloadArgs, region_size: u64) -> Result<Writer, MirrorError> {
        let write_size = parse_size_arg(&w.write_size)? as usize;
        let workload = Workload::new(w.seed, write_size, region_size).map_err(usage)?;
        if w.depth == 0 {
            return Err(usage(
                "--depth 0: writes in flight at once are at least 1 (1: synchronous write calls)",
            ));
        }
        let completions = match &w.completions {
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
        Ok(Writer {
            workload,
            buf: vec![0u8; write_size],
            inflight: InFlight::new(),
            next_id: w.start_id,
            end_id: if w.writes == 0 {
                u64::MAX
            } else {
                w.start_id.saturating_add(w.writes)
            },
            first_id: w.start_id,
            depth: w.depth as usize,
            rate: w.rate,
            started: Instant::now(),
            report_ms: w.report_ms,
            lat_ns: Vec::new(),
            completed_span: None,
            completions,
        })
    }

    /// Writes remain to submit or to complete.
    pub fn has_work(&self) -> bool {
        self.next_id < self.end_id || !self.inflight.is_empty()
    }

    /// Continues at id `at` at least: a node promoted in term `t` writes from `t << 24` on, so
    /// that the ids of a later primary are above every earlier one (as `check-workload` expects).
    pub fn skip_to(&mut self, at: u64) {
        if at > self.next_id {
            self.end_id = self.end_id.saturating_add(at - self.next_id);
            self.next_id = at;
        }
    }

    /// Submits one write, or waits (at most 100 ms) for the oldest in flight.
    pub fn step(&mut self, m: &Mirror) -> Result<(), MirrorError> {
        if self.next_id < self.end_id && self.inflight.len() < self.depth {
            if self.rate > 0 {
                let due = self.started
                    + Duration::from_secs_f64(
                        (self.next_id - self.first_id) as f64 / self.rate as f64,
                    );
                let now = Instant::now();
                if due > now && self.inflight.is_empty() {
                    std::thread::sleep((due - now).min(Duration::from_millis(5)));
                    return Ok(());
                }
            }
            self.workload.fill(self.next_id, &mut self.buf);
            let t0 = Instant::now();
            let ticket = match m.submit(self.workload.offset_of(self.next_id), &self.buf) {
                Ok(t) => t,
                // The node is not the primary now: nothing to do until it is one again.
                Err(e) if not_the_primary(&e) => {
                    std::thread::sleep(Duration::from_millis(5));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            self.inflight.push_back((self.next_id, ticket, t0));
            self.next_id += 1;
        }
        if self.inflight.len() >= self.depth || self.next_id >= self.end_id || self.rate > 0 {
            self.complete_oldest(m)?;
        }
        Ok(())
    }

    /// Waits (at most 100 ms) for the oldest write in flight; once it completed, logs it and
    /// its latency.
    fn complete_oldest(&mut self, m: &Mirror) -> Result<(), MirrorError> {
        let Some(&(id, ticket, t0)) = self.inflight.front() else {
            return Ok(());
        };
        match m.wait(ticket, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(MirrorError::Timeout) => return Ok(()),
            // Pending when the node was demoted or fenced: it never completes (not logged).
            Err(e) if not_the_primary(&e) => {
                self.inflight.pop_front();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.inflight.pop_front();
        let now = Instant::now();
        self.lat_ns.push(now.duration_since(t0).as_nanos() as u64);
        self.completed_span = Some((self.completed_span.map_or(now, |(first, _)| first), now));
        if let Some(f) = self.completions.as_mut() {
            // One write(2) per line, so that a SIGKILL never leaves half a line for the next
            // run to continue.
            f.write_all(format!("{id}\n").as_bytes())
                .map_err(|source| MirrorError::Io {
                    context: "writing completions file".into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Completes what is in flight (bounded), so that every completed write is logged.
    pub fn drain(&mut self, m: &Mirror) -> Result<(), MirrorError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.inflight.is_empty() && Instant::now() < deadline {
            self.complete_oldest(m)?;
        }
        Ok(())
    }

    /// `writes_per_s=.. mb_per_s=..` between the first and the latest completion.
    pub fn throughput_summary(&self) -> String {
        let (writes_per_s, span_s) = match self.completed_span {
            Some((first, last)) if last > first => {
                let span = last.duration_since(first).as_secs_f64();
                ((self.lat_ns.len() - 1) as f64 / span, span)
            }
            _ => (0.0, 0.0),
        };
        format!(
            "span_s={span_s:.3} writes_per_s={writes_per_s:.0} mb_per_s={:.2}",
            writes_per_s * self.buf.len() as f64 / 1e6
        )
    }

    /// Whether a progress line is due (and, if so, restarts the period).
    pub fn report_due(&self, last: &mut Instant) -> bool {
        let due = self.report_ms > 0 && last.elapsed() >= Duration::from_millis(self.report_ms);
        if due {
            *last = Instant::now();
        }
        due
    }

    /// `progress completed=.. <stats> <latencies>`.
    pub fn report(&self, m: &Mirror) {
        let s = m.stats();
        println!(
            "progress completed={} {} {}",
            s.writes_completed,
            stats_line(&s),
            latency_summary(&self.lat_ns)
        );
        let _ = std::io::stdout().flush();
    }
}

/// The node is not (or no longer) the primary: a demotion, a fence, a lost split brain.
fn not_the_primary(e: &MirrorError) -> bool {
    matches!(
        e,
        MirrorError::WrongRole { .. } | MirrorError::Fenced { .. }
    )
}

/// The ids in a completions file (written by `run` above, one per line).
pub fn read_completions(path: &Path) -> Result<Vec<u64>, MirrorError> {
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

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `samples=.. p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=..` of latencies in nanoseconds.
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
