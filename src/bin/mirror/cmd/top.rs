//! `mirror top`: a live view of one or more running nodes, refreshed every second: role, term,
//! phase, peer, write rate and bandwidth, latency percentiles, queue fill, recoveries. On a
//! terminal the screen is redrawn in place; otherwise each refresh is printed as plain lines.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use mirror::control::{self, control_socket_path, LiveStatus};

use super::shared::{stop_flag, usage, CliResult};

/// The flags of `mirror top`.
#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// The nodes' queue files (their control sockets are `<queue>.ctl`)
    #[arg(required = true)]
    queues: Vec<PathBuf>,
    /// Refresh interval in milliseconds
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Refreshes before exiting (0: until interrupted)
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// What a node said last time, for rates.
struct Previous {
    at: Instant,
    writes: u64,
    bytes: u64,
}

pub fn run(a: &TopArgs) -> CliResult {
    if a.interval_ms == 0 {
        return Err(usage("--interval-ms must be at least 1"));
    }
    let stop = stop_flag()?;
    let terminal = std::io::stdout().is_terminal();
    let mut previous: Vec<Option<Previous>> = a.queues.iter().map(|_| None).collect();
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut screen = String::new();
        if terminal {
            screen.push_str("\x1b[H\x1b[2J");
        }
        screen.push_str(&format!(
            "mirror top: {} node(s), every {} ms (Ctrl-C quits)\n\n",
            a.queues.len(),
            a.interval_ms
        ));
        for (queue, prev) in a.queues.iter().zip(previous.iter_mut()) {
            let socket = control_socket_path(queue);
            match control::status(&socket, Duration::from_secs(2)) {
                Ok(s) => {
                    let now = Instant::now();
                    screen.push_str(&render(&s, prev.as_ref(), now));
                    *prev = Some(Previous {
                        at: now,
                        writes: s.writes_completed,
                        bytes: s.write_bytes,
                    });
                }
                Err(e) => {
                    screen.push_str(&format!("{}\n  not answering: {e}\n\n", queue.display()));
                    *prev = None;
                }
            }
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(screen.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            break; // stdout went away
        }
        drop(out);
        round += 1;
        if a.count > 0 && round >= a.count {
            break;
        }
        let until = Instant::now() + Duration::from_millis(a.interval_ms);
        while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One node's block.
fn render(s: &LiveStatus, prev: Option<&Previous>, now: Instant) -> String {
    let (rate, bandwidth) = match prev {
        Some(p) => {
            let secs = now.duration_since(p.at).as_secs_f64().max(1e-3);
            (
                format!(
                    "{:.0}/s",
                    s.writes_completed.saturating_sub(p.writes) as f64 / secs
                ),
                format!(
                    "{:.2} MB/s",
                    s.write_bytes.saturating_sub(p.bytes) as f64 / secs / 1e6
                ),
            )
        }
        None => ("-".into(), "-".into()),
    };
    let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("<= {v} us"));
    let fill = s.queue_fill_percent();
    let bar_width = 30usize;
    let filled = ((fill / 100.0) * bar_width as f64).round() as usize;
    let bar: String =
        "#".repeat(filled.min(bar_width)) + &".".repeat(bar_width - filled.min(bar_width));
    let peer = s.peer_description();
    let flag = |b: bool| if b { "YES" } else { "no" };
    // A resync or verify in progress: its own bar.
    let transfer = s
        .transfer
        .as_ref()
        .map(|t| {
            let done = if t.chunks_total == 0 {
                0.0
            } else {
                t.chunks_done as f64 / t.chunks_total as f64
            };
            let filled = ((done * bar_width as f64).round() as usize).min(bar_width);
            format!(
                "  {:<10} [{}{}] {:.1}%   {}/{} chunks, {:.1} MB/s, eta {}\n",
                t.kind,
                "#".repeat(filled),
                ".".repeat(bar_width - filled),
                done * 100.0,
                t.chunks_done,
                t.chunks_total,
                t.rate_bytes_per_s as f64 / 1e6,
                t.eta_s.map_or("?".into(), |s| format!("{s}s"))
            )
        })
        .unwrap_or_default();
    let dirty = if s.dirty_chunks > 0 || s.resync_target {
        format!("  bitmap     {}\n", s.bitmap_description())
    } else {
        String::new()
    };
    format!(
        "node {:#x}  {}  term {}  {}\n  peer       {}   auth {}\n  writes     {} total   {}   {}\n  latency    p50 {}   p99 {}   (synchronous writes)\n  queue      [{bar}] {fill:.1}%   {} records, {} of {} bytes\n{dirty}{transfer}  state      degraded {}   fenced {}   split brain {}   recoveries {} (last {} records, {} bytes)\n{}\n",
        s.node_id,
        s.role,
        s.term,
        s.phase,
        peer,
        if s.auth.is_empty() { "?" } else { &s.auth },
        s.writes_completed,
        rate,
        bandwidth,
        us(s.write_latency_p50_us),
        us(s.write_latency_p99_us),
        s.queue_records,
        s.queue_bytes,
        s.queue_capacity,
        flag(s.degraded),
        flag(s.fenced.is_some()),
        flag(s.split_brain.is_some()),
        s.recoveries,
        s.last_recovery_records,
        s.last_recovery_bytes,
        s.failure
            .as_deref()
            .map(|f| format!("  FAILED     {f}\n"))
            .unwrap_or_default(),
    )
}
