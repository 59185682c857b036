//! Prometheus metrics (`metrics_listen = ADDR`): the node's counters, gauges and write latency
//! histogram in the text exposition format (version 0.0.4), served over plain HTTP at
//! `/metrics` by a thread of its own. Names follow Prometheus conventions: the `mirror_` prefix,
//! base units (seconds, bytes), `_total` for counters; a state (role, phase) is one series per
//! value, 1 for the current one.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mirror_proto::Phase;

use super::Stats;
use crate::config::Role;

/// Upper bounds of the write latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 15] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 1.0,
];

/// A scrape request must arrive within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters the node keeps for its metrics, beyond its [`Stats`]. Relaxed throughout: each is
/// an independent count read by a scrape; none publishes other memory.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Payload bytes of writes submitted.
    pub(crate) write_bytes: AtomicU64,
    /// Records and bytes every recovery moved, summed.
    pub(crate) recovered_records: AtomicU64,
    pub(crate) recovered_bytes: AtomicU64,
    /// Connections to the peer established.
    pub(crate) connections: AtomicU64,
    /// Connections refused (unauthenticated, or refused at the handshake).
    pub(crate) rejected_peers: Arc<AtomicU64>,
    /// Write latency histogram: a count per bucket (the last one: above every bound), the sum
    /// in nanoseconds.
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
}

impl Counters {
    /// Counters whose refused-connections count is `rejected` (shared with the listener).
    pub(crate) fn with_rejected(rejected: Arc<AtomicU64>) -> Self {
        Counters {
            rejected_peers: rejected,
            ..Counters::default()
        }
    }

    /// The `q` quantile (0..=1) of the write latency, in microseconds: the upper bound of the
    /// bucket it falls in (the largest bound for the overflow bucket); none before any write.
    pub(crate) fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let bound = LATENCY_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]);
                return Some((bound * 1e6).round() as u64);
            }
        }
        None
    }

    /// Payload bytes of writes submitted.
    pub(crate) fn write_bytes(&self) -> u64 {
        self.write_bytes.load(Ordering::Relaxed)
    }

    /// Records one synchronous write's latency.
    pub(crate) fn observe_write(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The exposition text of a node's metrics.
pub(crate) fn render(s: &Stats, c: &Counters, auth: &str) -> String {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let info = format!(
        "{{node_id=\"{:#x}\",peer_node_id=\"{:#x}\",auth=\"{}\",version=\"{}\"}}",
        s.node_id,
        s.peer_node_id,
        auth,
        env!("CARGO_PKG_VERSION")
    );
    metric(
        "mirror_node_info",
        "gauge",
        "The node's identity (always 1).",
        &[(&info, 1.0)],
    );
    let role = |r: Role| if s.role == r { 1.0 } else { 0.0 };
    metric(
        "mirror_role",
        "gauge",
        "The node's role: 1 for the current one.",
        &[
            ("{role=\"primary\"}", role(Role::Primary)),
            ("{role=\"backup\"}", role(Role::Backup)),
        ],
    );
    let phases = [
        ("disconnected", Phase::Disconnected),
        ("handshaking", Phase::Handshaking),
        ("recovering", Phase::Recovering),
        ("resyncing", Phase::Resyncing),
        ("synchronous", Phase::Synchronous),
        ("failed", Phase::Failed),
    ];
    let phase_labels: Vec<(String, f64)> = phases
        .iter()
        .map(|(name, p)| {
            (
                format!("{{phase=\"{name}\"}}"),
                if s.phase == *p { 1.0 } else { 0.0 },
            )
        })
        .collect();
    let phase_samples: Vec<(&str, f64)> =
        phase_labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "mirror_phase",
        "gauge",
        "The connection phase: 1 for the current one.",
        &phase_samples,
    );
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    metric(
        "mirror_term",
        "gauge",
        "The node's current term.",
        &[("", s.current_term as f64)],
    );
    metric(
        "mirror_degraded",
        "gauge",
        "1 while a primary completes writes without its backup (on_peer_loss = continue).",
        &[("", flag(s.degraded))],
    );
    metric(
        "mirror_fenced",
        "gauge",
        "1 while the node is fenced (a newer primary exists; its writes are refused).",
        &[("", flag(s.fenced.is_some()))],
    );
    metric(
        "mirror_split_brain",
        "gauge",
        "1 while a split brain keeps the node apart from its peer.",
        &[("", flag(s.split_brain.is_some()))],
    );
    metric(
        "mirror_queue_bytes",
        "gauge",
        "Bytes used in the node's persistent queue.",
        &[("", s.queue_bytes as f64)],
    );
    metric(
        "mirror_queue_capacity_bytes",
        "gauge",
        "Capacity of the node's persistent queue.",
        &[("", s.queue_capacity as f64)],
    );
    metric(
        "mirror_queue_records",
        "gauge",
        "Records in the node's persistent queue.",
        &[("", s.queue_records as f64)],
    );
    metric(
        "mirror_dirty_chunks",
        "gauge",
        "Chunks marked in the dirty-chunk bitmap (writes folded out of a full queue while the backup was away, or what a resync has yet to bring over).",
        &[("", s.dirty_chunks as f64)],
    );
    metric(
        "mirror_out_of_sync_bytes",
        "gauge",
        "Bytes of region the backup may lack beyond the queue: the dirty chunks, whole.",
        &[("", (s.dirty_chunks * s.chunk_size) as f64)],
    );
    metric(
        "mirror_resync_target",
        "gauge",
        "Backup: 1 while a resync or catch-up into it is unfinished (its region is inconsistent).",
        &[("", flag(s.resync_target))],
    );
    let transfer = |kind: &str| {
        s.transfer
            .as_ref()
            .filter(|t| t.kind == kind)
            .map_or(0.0, |_| 1.0)
    };
    metric(
        "mirror_transfer_running",
        "gauge",
        "1 for the kind of chunk transfer in progress (resync, initial-sync, verify, verify-repair).",
        &[
            ("{kind=\"resync\"}", transfer("resync")),
            ("{kind=\"initial-sync\"}", transfer("initial-sync")),
            ("{kind=\"verify\"}", transfer("verify")),
            ("{kind=\"verify-repair\"}", transfer("verify-repair")),
        ],
    );
    let t = |f: fn(&crate::node::TransferStats) -> u64| {
        s.transfer.as_ref().map_or(0.0, |t| f(t) as f64)
    };
    metric(
        "mirror_transfer_chunks_total",
        "gauge",
        "Chunks the transfer in progress goes through (0: none running).",
        &[("", t(|t| t.chunks_total))],
    );
    metric(
        "mirror_transfer_chunks_done",
        "gauge",
        "Chunks the transfer in progress went through.",
        &[("", t(|t| t.chunks_done))],
    );
    metric(
        "mirror_transfer_bytes_left",
        "gauge",
        "Bytes of region the transfer in progress has still to go through.",
        &[("", t(|t| t.bytes_left))],
    );
    metric(
        "mirror_transfer_rate_bytes_per_second",
        "gauge",
        "Bytes of region per second the transfer in progress goes through, since it began.",
        &[("", t(|t| t.rate_bytes_per_s))],
    );
    let unacked = s.next_seq.saturating_sub(1).saturating_sub(s.acked_through);
    metric(
        "mirror_unacknowledged_records",
        "gauge",
        "Primary: writes the backup has not acknowledged (what it would miss now).",
        &[(
            "",
            if s.role == Role::Primary {
                unacked as f64
            } else {
                0.0
            },
        )],
    );
    metric(
        "mirror_writes_total",
        "counter",
        "Writes completed since the node opened.",
        &[("", s.writes_completed as f64)],
    );
    metric(
        "mirror_write_bytes_total",
        "counter",
        "Payload bytes of writes submitted since the node opened.",
        &[("", load(&c.write_bytes))],
    );
    metric(
        "mirror_recoveries_total",
        "counter",
        "Recoveries (catch-ups and repairs) since the node opened.",
        &[("", s.recoveries as f64)],
    );
    metric(
        "mirror_recovery_records_total",
        "counter",
        "Records moved by recoveries since the node opened.",
        &[("", load(&c.recovered_records))],
    );
    metric(
        "mirror_recovery_bytes_total",
        "counter",
        "Payload bytes moved by recoveries since the node opened.",
        &[("", load(&c.recovered_bytes))],
    );
    metric(
        "mirror_connections_total",
        "counter",
        "Connections to the peer established (the first one and every reconnection).",
        &[("", load(&c.connections))],
    );
    metric(
        "mirror_rejected_peers_total",
        "counter",
        "Incoming connections refused: unauthenticated, or refused at the handshake.",
        &[("", load(&c.rejected_peers))],
    );
    // The histogram: cumulative buckets, then sum and count.
    let name = "mirror_write_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Latency of synchronous writes (write(), mirror_write), submission to completion."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += c.latency_buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += c.latency_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum = c.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {cumulative}");
    out
}

/// The HTTP endpoint: a thread that answers `GET /metrics` with [`render`]'s text.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `scrape()` until dropped.
    pub(crate) fn start(
        addr: SocketAddr,
        scrape: impl Fn() -> String + Send + 'static,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stop_watch) = UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name("mirror-metrics".into())
            .spawn(move || serve(&listener, &stop_watch, &scrape))?;
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound address (useful with port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &UnixStream, scrape: &dyn Fn() -> String) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return; // the stop signal: its other end was dropped
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, scrape) {
                    tracing::debug!(error = %e, "metrics: a scrape failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request (its head, at most 8 KiB, within [`REQUEST_TIMEOUT`]) and answers it.
fn answer(mut stream: TcpStream, scrape: &dyn Fn() -> String) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 || head.len() > 8192 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            scrape(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())
}
