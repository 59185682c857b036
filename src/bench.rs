//! Latency measurement shared by `mirror bench` and the criterion benches: the engine's
//! synchronous write next to the raw transport floor, measured in the same run and interleaved.
//!
//! The floor is a busy-polled TCP ping-pong over loopback shaped like one mirrored write: the
//! client sends one frame of the size a `Write` of that payload has on the wire, the server reads
//! it whole and answers with a frame the size of an `Ack`. Both sides use non-blocking sockets with
//! TCP_NODELAY, like the engine's transport.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{ConfigBuilder, Mirror, MirrorError};

/// Frame overhead of a `Write` message on the wire (frame header + seq, offset, length).
pub const WRITE_OVERHEAD: usize = 16 + 20;
/// Size of an `Ack` frame on the wire.
pub const ACK_LEN: usize = 16 + 16;

/// Latency percentiles of one series, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub samples: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

impl Percentiles {
    /// Percentiles of `samples_ns` (nanoseconds); sorts them.
    pub fn of(samples_ns: &mut [u64]) -> Percentiles {
        samples_ns.sort_unstable();
        let at = |p: f64| -> f64 {
            if samples_ns.is_empty() {
                return 0.0;
            }
            let i = ((samples_ns.len() - 1) as f64 * p).round() as usize;
            samples_ns[i] as f64 / 1000.0
        };
        Percentiles {
            samples: samples_ns.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
        }
    }
}

/// The median of `values` (the mean of the middle two when their number is even); `None` when
/// there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The machine a run measured: every figure is a ratio within one machine, and the same
/// engine's ratios differ between CPUs (docs/PERFORMANCE.md), so a report names its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`), if the kernel gives one.
    pub cpu: Option<String>,
    /// Its vendor id (`GenuineIntel`, `AuthenticAMD`, ...), if given.
    pub vendor: Option<String>,
    /// Its family and model numbers (x86), if given.
    pub family: Option<u32>,
    /// See `family`.
    pub model: Option<u32>,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// The kernel's release (`uname -r`), if readable.
    pub kernel: Option<String>,
}

impl Machine {
    /// This machine, from `/proc/cpuinfo`, `/proc/sys/kernel/osrelease` and the CPUs this
    /// process may use. What cannot be read is left out, never an error: a report without its
    /// machine's name still holds its ratios.
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Machine::from_cpuinfo(&cpuinfo, kernel.as_deref(), cpus)
    }

    /// The machine `cpuinfo` (the text of `/proc/cpuinfo`) describes; its first processor's
    /// entries are taken (the others repeat them on the machines this runs on).
    pub fn from_cpuinfo(cpuinfo: &str, kernel: Option<&str>, cpus: usize) -> Machine {
        let first = |key: &str| {
            cpuinfo.lines().find_map(|line| {
                let (k, v) = line.split_once(':')?;
                (k.trim() == key)
                    .then(|| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
            })
        };
        let number = |key: &str| first(key).and_then(|v| v.parse().ok());
        Machine {
            cpu: first("model name"),
            vendor: first("vendor_id"),
            family: number("cpu family"),
            model: number("model"),
            cpus,
            kernel: kernel
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cpu.as_deref().unwrap_or("an unnamed CPU"))?;
        let numbers = [("family", self.family), ("model", self.model)]
            .into_iter()
            .filter_map(|(name, n)| n.map(|n| format!("{name} {n}")))
            .collect::<Vec<_>>();
        let details: Vec<String> = self
            .vendor
            .iter()
            .cloned()
            .chain((!numbers.is_empty()).then(|| numbers.join(" ")))
            .collect();
        if !details.is_empty() {
            write!(f, " ({})", details.join(", "))?;
        }
        let plural = if self.cpus == 1 { "" } else { "s" };
        write!(f, ", {} CPU{plural}", self.cpus)?;
        match &self.kernel {
            Some(k) => write!(f, ", kernel {k}"),
            None => Ok(()),
        }
    }
}

fn spin_write(s: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match s.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn spin_read(s: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                std::hint::spin_loop()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A busy-polled TCP ping-pong over loopback: the transport floor for one write of `payload` bytes.
pub struct PingPong {
    client: TcpStream,
    request: Vec<u8>,
    reply: Vec<u8>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl PingPong {
    /// Starts the echo server thread and connects to it.
    pub fn start(payload: usize) -> io::Result<PingPong> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let server_stop = Arc::clone(&stop);
        let req_len = payload + WRITE_OVERHEAD;
        let server = std::thread::Builder::new()
            .name("pingpong-server".into())
            .spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_nonblocking(true);
                let mut req = vec![0u8; req_len];
                let ack = vec![7u8; ACK_LEN];
                while let Ok(true) = spin_read(&mut s, &mut req, &server_stop) {
                    if spin_write(&mut s, &ack).is_err() {
                        return;
                    }
                }
            })?;
        let client = TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        Ok(PingPong {
            client,
            request: vec![1u8; req_len],
            reply: vec![0u8; ACK_LEN],
            stop,
            server: Some(server),
        })
    }

    /// One round trip; returns its duration in nanoseconds.
    pub fn round_trip(&mut self) -> io::Result<u64> {
        let t = Instant::now();
        spin_write(&mut self.client, &self.request)?;
        if !spin_read(&mut self.client, &mut self.reply, &self.stop)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(t.elapsed().as_nanos() as u64)
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
    }
}

/// The config of one benchmark node with files `<role>.region` and `<role>.queue` in `dir`.
fn node_config(
    dir: &Path,
    role: &str,
    region_size: u64,
    queue_size: &str,
) -> Result<ConfigBuilder, MirrorError> {
    let mut b = ConfigBuilder::new();
    b.set("role", role)?;
    let file = |ext: &str| dir.join(format!("{role}.{ext}")).display().to_string();
    b.set("region", &file("region"))?;
    b.set("queue", &file("queue"))?;
    b.set("region_size", &region_size.to_string())?;
    b.set("queue_size", queue_size)?;
    Ok(b)
}

/// A primary and a backup in this process over loopback TCP, for latency measurements.
pub struct LocalPair {
    /// The primary.
    pub primary: Mirror,
    /// The backup.
    pub backup: Mirror,
}

impl LocalPair {
    /// Opens a pair with files in `dir`; `extra` are additional config keys for both nodes.
    pub fn open(dir: &Path, region_size: u64, extra: &[(&str, &str)]) -> Result<Self, MirrorError> {
        let node = |role: &str| -> Result<ConfigBuilder, MirrorError> {
            let mut b = node_config(dir, role, region_size, "64MiB")?;
            for (k, v) in extra {
                b.set(k, v)?;
            }
            Ok(b)
        };
        let mut b = node("backup")?;
        b.set("listen", "127.0.0.1:0")?;
        let backup = Mirror::open(b.build()?)?;
        let mut p = node("primary")?;
        let addr = backup
            .listen_addr()
            .ok_or_else(|| MirrorError::Unsupported("backup has no listen address".into()))?;
        p.set("peer", &addr.to_string())?;
        p.set("on_peer_loss", "block")?;
        let primary = Mirror::open(p.build()?)?;
        primary.wait_synchronous(Duration::from_secs(10))?;
        Ok(LocalPair { primary, backup })
    }

    /// One synchronous write of `data` at `offset`; returns its duration in nanoseconds.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<u64, MirrorError> {
        let t = Instant::now();
        self.primary.write(offset, data)?;
        Ok(t.elapsed().as_nanos() as u64)
    }
}

/// One size's result of [`compare_sync_write`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Payload bytes per write.
    pub payload: usize,
    /// The raw TCP ping-pong.
    pub floor: Percentiles,
    /// The engine's synchronous write.
    pub engine: Percentiles,
    /// Raw round-trip samples of the floor, in nanoseconds (sorted).
    #[serde(skip)]
    pub floor_ns: Vec<u64>,
    /// Raw samples of the engine's writes, in nanoseconds (sorted).
    #[serde(skip)]
    pub engine_ns: Vec<u64>,
    /// The independent reference ping-pong (`benches/pingpong.c`, two processes), run in blocks
    /// interleaved with the floor's and the engine's, when given.
    pub reference: Option<Percentiles>,
    /// The first write of each of the engine's blocks, not in `engine`: it finds both pollers
    /// parked (the engine was idle during the floor's block) and pays their wake-up. Each block
    /// then warms up with a tenth more unmeasured writes, as the floor's and the reference's do.
    pub after_idle: Percentiles,
}

impl Comparison {
    /// engine p50 / floor p50.
    pub fn ratio_p50(&self) -> f64 {
        self.engine.p50_us / self.floor.p50_us.max(f64::MIN_POSITIVE)
    }
    /// floor p50 / reference p50, when a reference ran (within 10 % is the floor to trust).
    pub fn floor_vs_reference_p50(&self) -> Option<f64> {
        self.reference
            .map(|r| self.floor.p50_us / r.p50_us.max(f64::MIN_POSITIVE))
    }
    /// engine p99 / floor p99.
    pub fn ratio_p99(&self) -> f64 {
        self.engine.p99_us / self.floor.p99_us.max(f64::MIN_POSITIVE)
    }
}

/// Measures `iterations` synchronous writes of `payload` bytes and as many ping-pong round trips,
/// interleaved in blocks so that both see the same machine conditions; with `reference` (the
/// built `benches/pingpong.c`), as many round trips of that independent two-process ping-pong
/// too, in blocks between the others.
pub fn compare_sync_write(
    pair: &LocalPair,
    payload: usize,
    iterations: usize,
    reference: Option<&Path>,
) -> Result<Comparison, MirrorError> {
    let io = |source: io::Error| MirrorError::Io {
        context: "ping-pong floor".into(),
        source,
    };
    compare_with_floor(pair, payload, iterations, reference, |n| {
        tcp_floor_block(payload, n).map_err(io)
    })
}

/// `n` round trips of a fresh [`PingPong`] (it exists only during its block), after a tenth
/// more to warm it up, as the reference does; their nanoseconds.
fn tcp_floor_block(payload: usize, n: usize) -> io::Result<Vec<u64>> {
    let mut pp = PingPong::start(payload)?;
    for _ in 0..n / 10 {
        pp.round_trip()?;
    }
    (0..n).map(|_| pp.round_trip()).collect()
}

/// `n` round trips of the reference ping-pong at `path` (`benches/pingpong.c` built; run with
/// `raw`, it prints each round trip's nanoseconds on a line).
fn reference_block(path: &Path, payload: usize, n: usize) -> Result<Vec<u64>, MirrorError> {
    let failed = |why: String| MirrorError::Io {
        context: format!("reference ping-pong {}", path.display()),
        source: io::Error::other(why),
    };
    let out = std::process::Command::new(path)
        .args([payload.to_string(), n.to_string(), "raw".to_string()])
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!(
            "exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let samples: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| failed(format!("printed something other than nanoseconds: {e}")))?;
    if samples.len() != n {
        return Err(failed(format!(
            "printed {} round trips, not {n}",
            samples.len()
        )));
    }
    Ok(samples)
}

/// [`compare_sync_write`] with another floor: `floor_block(n)` sets one up, times `n` round
/// trips in nanoseconds and takes it down (it exists only during its own blocks).
fn compare_with_floor(
    pair: &LocalPair,
    payload: usize,
    iterations: usize,
    reference: Option<&Path>,
    mut floor_block: impl FnMut(usize) -> Result<Vec<u64>, MirrorError>,
) -> Result<Comparison, MirrorError> {
    let data = vec![0xA5u8; payload];
    let slots = (pair.primary.region_len() / payload as u64).max(1);
    let block = 500.min(iterations.max(1));
    let mut floor = Vec::with_capacity(iterations);
    let mut engine = Vec::with_capacity(iterations);
    let mut reference_ns = Vec::new();
    let mut after_idle_ns = Vec::new();
    // The floor's threads busy-poll: they exist only during their own blocks, so that they
    // never compete with the engine's threads for the CPU. A warm-up of both first.
    floor_block(block.min(200))?;
    for i in 0..block.min(200) {
        pair.write((i as u64 % slots) * payload as u64, &data)?;
    }
    let mut i = 0u64;
    while floor.len() < iterations {
        // The engine's pollers spin for `idle_spin` after the last write, then park: the
        // floor's blocks do not share the CPUs with them.
        std::thread::sleep(Duration::from_millis(2));
        floor.extend(floor_block(block)?);
        if let Some(path) = reference {
            reference_ns.extend(reference_block(path, payload, block)?);
        }
        let mut write = || -> Result<u64, MirrorError> {
            let ns = pair.write((i % slots) * payload as u64, &data)?;
            i += 1;
            Ok(ns)
        };
        after_idle_ns.push(write()?);
        for _ in 0..block / 10 {
            write()?;
        }
        for _ in 0..block {
            engine.push(write()?);
        }
    }
    Ok(Comparison {
        payload,
        floor: Percentiles::of(&mut floor),
        engine: Percentiles::of(&mut engine),
        floor_ns: floor,
        engine_ns: engine,
        reference: reference.map(|_| Percentiles::of(&mut reference_ns)),
        after_idle: Percentiles::of(&mut after_idle_ns),
    })
}

/// The RDMA floor: a busy-polled ping-pong over the RDMA transport itself (the same queue pairs,
/// ring, credits and completion handling as the engine's connection), shaped like one mirrored
/// write: the client sends a `Write` frame of `payload` bytes, the server answers with an `Ack`.
#[cfg(feature = "rdma")]
pub struct RdmaPingPong {
    client: crate::transport::rdma::RdmaConnection,
    data: Vec<u8>,
    /// The crc32c of `data` (computed once, as a write's payload's is).
    data_crc: u32,
    inbox: Vec<mirror_proto::Message>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

#[cfg(feature = "rdma")]
impl RdmaPingPong {
    /// Starts the echo server thread (an RDMA acceptor on loopback TCP for setup) and connects.
    pub fn start(
        payload: usize,
        settings: &crate::transport::rdma::RdmaSettings,
    ) -> Result<RdmaPingPong, crate::transport::TransportError> {
        use crate::transport::rdma::{RdmaAcceptor, RdmaConnection};
        use crate::transport::Listener;
        let mut acceptor = RdmaAcceptor::bind(([127, 0, 0, 1], 0).into(), settings.clone())?;
        let addr = acceptor.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let server_stop = Arc::clone(&stop);
        let server = std::thread::Builder::new()
            .name("rdma-pingpong-server".into())
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut conn = loop {
                    match acceptor.try_accept() {
                        Ok(Some(c)) => break c,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_micros(200))
                        }
                        _ => return,
                    }
                };
                let mut inbox = Vec::new();
                let ack = mirror_proto::Message::Ack {
                    received_through: 1,
                    applied_through: 1,
                };
                while !server_stop.load(Ordering::Relaxed) {
                    match conn.poll_recv(&mut inbox, 64) {
                        Ok(0) => std::hint::spin_loop(),
                        Ok(_) => {
                            for _ in inbox.drain(..) {
                                if conn.send(&ack).is_err() {
                                    return;
                                }
                            }
                            while let Ok(false) = conn.flush() {}
                        }
                        Err(_) => return,
                    }
                }
            })
            .map_err(|source| crate::transport::TransportError::Io {
                context: "starting the ping-pong server",
                source,
            })?;
        let client = RdmaConnection::connect(&addr.to_string(), settings)?;
        Ok(RdmaPingPong {
            client,
            data: vec![0xA5; payload],
            data_crc: mirror_proto::crc::crc32c(&vec![0xA5; payload]),
            inbox: Vec::new(),
            stop,
            server: Some(server),
        })
    }

    /// One round trip; returns its duration in nanoseconds.
    pub fn round_trip(&mut self) -> Result<u64, crate::transport::TransportError> {
        use crate::transport::Connection;
        let t = Instant::now();
        self.client.send_write(1, 1, 0, &self.data, self.data_crc)?;
        while !self.client.flush()? {}
        self.inbox.clear();
        while self.client.poll_recv(&mut self.inbox, 1)? == 0 {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(crate::transport::TransportError::Closed);
            }
        }
        Ok(t.elapsed().as_nanos() as u64)
    }
}

#[cfg(feature = "rdma")]
impl Drop for RdmaPingPong {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
    }
}

/// [`compare_sync_write`] with the RDMA floor ([`RdmaPingPong`]); `pair` should run over
/// `transport = rdma` on the same device.
#[cfg(feature = "rdma")]
pub fn compare_sync_write_rdma(
    pair: &LocalPair,
    payload: usize,
    iterations: usize,
    settings: &crate::transport::rdma::RdmaSettings,
) -> Result<Comparison, MirrorError> {
    let rdma = |e: crate::transport::TransportError| MirrorError::Io {
        context: "RDMA ping-pong floor".into(),
        source: io::Error::other(e.to_string()),
    };
    compare_with_floor(pair, payload, iterations, None, |n| {
        // A tenth of warm-up round trips first, as the TCP floor's and the engine's blocks do.
        let mut pp = RdmaPingPong::start(payload, settings).map_err(rdma)?;
        for _ in 0..n / 10 {
            pp.round_trip().map_err(rdma)?;
        }
        (0..n).map(|_| pp.round_trip().map_err(rdma)).collect()
    })
}

/// Synchronous writes over RDMA next to [`RdmaPingPong`], one [`Comparison`] per payload: a
/// pair with `transport = rdma` and `extra` (the device keys: `rdma_device`, `rdma_port`,
/// `rdma_gid_index`), files in `dir`. What `mirror bench --rdma-iterations` measures, in the
/// build that runs it: the figures are a release build's, not a test build's.
#[cfg(feature = "rdma")]
pub fn rdma_sync_writes(
    dir: &Path,
    extra: &[(&str, &str)],
    payloads: &[usize],
    iterations: usize,
) -> Result<Vec<Comparison>, MirrorError> {
    let mut extra = extra.to_vec();
    extra.push(("transport", "rdma"));
    const REGION: u64 = 1 << 20;
    // A backup's config: the device keys are checked as the pair's nodes will check them.
    let mut settings = node_config(dir, "backup", REGION, "64MiB")?;
    settings.set("listen", "127.0.0.1:0")?;
    for (key, value) in &extra {
        settings.set(key, value)?;
    }
    let settings = crate::transport::rdma::RdmaSettings::from_config(&settings.build()?);
    let pair = LocalPair::open(dir, REGION, &extra)?;
    let comparisons = payloads
        .iter()
        .map(|&payload| compare_sync_write_rdma(&pair, payload, iterations, &settings))
        .collect::<Result<Vec<_>, _>>()?;
    pair.primary.close()?;
    pair.backup.close()?;
    Ok(comparisons)
}

/// Pipelined throughput: `total` writes of `payload` bytes with at most `depth` in flight.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Throughput {
    /// Payload bytes per write.
    pub payload: usize,
    /// Writes in flight at most.
    pub depth: usize,
    /// Writes completed.
    pub writes: u64,
    /// Completed writes per second.
    pub writes_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
}

/// Measures pipelined writes through `pair`'s primary.
pub fn pipelined(
    pair: &LocalPair,
    payload: usize,
    depth: usize,
    total: u64,
) -> Result<Throughput, MirrorError> {
    let data = vec![0x5Au8; payload];
    let slots = (pair.primary.region_len() / payload as u64).max(1);
    let mut window = std::collections::VecDeque::with_capacity(depth.max(1));
    let t = Instant::now();
    for i in 0..total {
        if window.len() >= depth.max(1) {
            let ticket = window.pop_front().expect("window is full");
            pair.primary.wait(ticket, None)?;
        }
        window.push_back(pair.primary.submit((i % slots) * payload as u64, &data)?);
    }
    while let Some(ticket) = window.pop_front() {
        pair.primary.wait(ticket, None)?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Throughput {
        payload,
        depth,
        writes: total,
        writes_per_s: total as f64 / secs,
        mb_per_s: total as f64 * payload as f64 / secs / 1e6,
    })
}

/// `power` durability's throughput next to a raw group-commit floor on the same filesystem (see
/// [`power_group_commit`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PowerRun {
    /// Where the nodes' files and the floor's file were.
    pub dir: String,
    /// That directory's filesystem (`statfs` magic, named when known).
    pub filesystem: String,
    /// Payload bytes per write.
    pub payload: usize,
    /// Writes in flight at most, and records per `fdatasync` in the floor.
    pub depth: usize,
    /// Bytes each record occupies in a queue (header and padding included): the floor's unit.
    pub record_bytes: u64,
    /// The engine under `durability = power`, best of the trials: completed writes per second.
    pub engine_writes_per_s: f64,
    /// One loop appending `depth` records per `fdatasync` to one file, best of the trials:
    /// records per second. The target's floor (one machine's disk, one node's queue).
    pub floor_writes_per_s: f64,
    /// Two such loops at once, each on its own file (what this one-machine pair asks of one
    /// disk: both nodes' queues sync here): records per second of each, best of the trials.
    pub floor_two_writers_per_s: f64,
    /// engine_writes_per_s / floor_writes_per_s.
    pub vs_floor: f64,
    /// engine_writes_per_s / floor_two_writers_per_s.
    pub vs_two_writer_floor: f64,
    /// Bytes the pair puts on this one disk per write: each node's queue record and its region
    /// write (under `power` the region's writes are written back as they go); the floor's loop
    /// puts one record per write.
    pub disk_bytes_per_write: u64,
    /// engine_writes_per_s × disk_bytes_per_write, in megabytes (10^6) per second.
    pub engine_disk_mb_per_s: f64,
    /// What the two loops at once wrote together, in megabytes (10^6) per second, counted as
    /// twice the slower loop's rate ([`PowerRun::floor_two_writers_per_s`]): at least what this
    /// disk takes from two writers that sync per batch.
    pub two_writers_disk_mb_per_s: f64,
    /// Each trial's figures in the order run (engine, floor, two-writer floor; per second).
    pub trials: Vec<[f64; 3]>,
}

/// Measures a pair under `durability = power` with files in `dir` (a disk-backed filesystem:
/// on tmpfs `fdatasync` costs nothing and the figure means nothing) writing `payload` bytes at
/// `depth` in flight, `writes` per trial, in `trials` interleaved trials next to the raw
/// group-commit floor: a loop that writes `depth` of the same records (each
/// [`record_total`](mirror_storage::record_total) bytes) to a preallocated, written file and
/// `fdatasync`s once per batch, wrapping at the end as a queue does. Before the trials the
/// engine writes its region once over, so that no trial pays for a first write into a block
/// the filesystem still holds unwritten (the floor's file is written before its trials too).
pub fn power_group_commit(
    dir: &Path,
    payload: usize,
    depth: usize,
    writes: u64,
    trials: usize,
    extra: &[(&str, &str)],
) -> Result<PowerRun, MirrorError> {
    let io = |context: &str| {
        let context = context.to_owned();
        move |source| MirrorError::Io { context, source }
    };
    let filesystem = filesystem_name(dir).map_err(io("statfs of the power bench dir"))?;
    let region_bytes = 16u64 << 20;
    let mut settings: Vec<(&str, &str)> = vec![("durability", "power")];
    settings.extend_from_slice(extra);
    let pair = LocalPair::open(dir, region_bytes, &settings)?;
    pipelined(&pair, payload, depth, region_bytes / payload.max(1) as u64)?;
    let record_bytes = mirror_storage::record_total(payload as u64);
    let ring_bytes = 64u64 << 20;
    let files = [dir.join("floor-a.log"), dir.join("floor-b.log")];
    for f in &files {
        written_file(f, ring_bytes).map_err(io("writing the group-commit floor's file"))?;
    }
    let mut all = Vec::new();
    for _ in 0..trials.max(1) {
        let engine = pipelined(&pair, payload, depth, writes)?.writes_per_s;
        let one = group_commit_floor(&files[0], record_bytes, depth, writes)
            .map_err(io("group-commit floor"))?;
        let two = std::thread::scope(|s| {
            let b = s.spawn(|| group_commit_floor(&files[1], record_bytes, depth, writes));
            let a = group_commit_floor(&files[0], record_bytes, depth, writes);
            let b = b
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("floor thread panicked")));
            Ok::<f64, io::Error>(a?.min(b?))
        })
        .map_err(io("two-writer group-commit floor"))?;
        all.push([engine, one, two]);
    }
    pair.primary.close()?;
    pair.backup.close()?;
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let best = |i: usize| all.iter().map(|t| t[i]).fold(0.0f64, f64::max);
    let (engine, one, two) = (best(0), best(1), best(2));
    let disk_bytes_per_write = 2 * (record_bytes + payload as u64);
    Ok(PowerRun {
        dir: dir.display().to_string(),
        filesystem,
        payload,
        depth,
        record_bytes,
        engine_writes_per_s: engine,
        floor_writes_per_s: one,
        floor_two_writers_per_s: two,
        vs_floor: engine / one.max(1e-9),
        vs_two_writer_floor: engine / two.max(1e-9),
        disk_bytes_per_write,
        engine_disk_mb_per_s: engine * disk_bytes_per_write as f64 / 1e6,
        two_writers_disk_mb_per_s: 2.0 * two * record_bytes as f64 / 1e6,
        trials: all,
    })
}

/// The raw group-commit loop of [`power_group_commit`]: `total` records of `record_bytes` into
/// `path` (already `len` bytes, written), `batch` per `pwrite` + `fdatasync`, wrapping to the
/// start where the next batch would pass the end. Records per second.
fn group_commit_floor(path: &Path, record_bytes: u64, batch: usize, total: u64) -> io::Result<f64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    let batch_bytes = record_bytes * batch.max(1) as u64;
    if batch_bytes > len {
        return Err(io::Error::other(format!(
            "a batch of {batch_bytes} bytes does not fit the {len}-byte floor file"
        )));
    }
    let buf = vec![0xA5u8; batch_bytes as usize];
    let mut at = 0u64;
    let mut done = 0u64;
    let t = Instant::now();
    while done < total {
        let n = (batch.max(1) as u64).min(total - done);
        if at + n * record_bytes > len {
            at = 0;
        }
        file.write_all_at(&buf[..(n * record_bytes) as usize], at)?;
        file.sync_data()?;
        at += n * record_bytes;
        done += n;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// Creates (or truncates) `path` as `len` bytes of zeros written and synced, as a `power`
/// queue's ring is at creation: no unwritten extents left for the first lap to convert.
fn written_file(path: &Path, len: u64) -> io::Result<()> {
    let file = std::fs::File::create(path)?;
    mirror_storage::write_zeros(&file, 0, len, path).map_err(io::Error::other)?;
    file.sync_all()
}

/// The filesystem `dir` is on, by its `statfs` magic: a name for the common ones, else the
/// magic in hex.
pub fn filesystem_name(dir: &Path) -> io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `statfs` is plain data, so all zeros is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs that outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as u64;
    Ok(match magic {
        0xEF53 => "ext2/3/4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("{other:#x}"),
    })
}

/// Raw TCP streaming bandwidth over loopback: `bytes` sent in `chunk`-sized writes to a thread
/// that reads and discards them. The floor for pipelined writes of large payloads. Returns
/// megabytes (10^6 bytes) per second.
pub fn tcp_stream_mb_per_s(bytes: u64, chunk: usize) -> io::Result<f64> {
    let buf = vec![0xC3u8; chunk];
    tcp_stream_with(|s| {
        let mut sent = 0u64;
        while sent < bytes {
            let n = chunk.min((bytes - sent) as usize);
            s.write_all(&buf[..n])?;
            sent += n as u64;
        }
        Ok(())
    })
}

/// Raw TCP streaming of a file's bytes over loopback: the file mapped, written to the socket
/// in 1 MiB `write`s straight from the mapping (one copy, by the kernel), to a thread that
/// reads and discards them. The floor for moving a region's bytes (a full remirror, a
/// resync): unlike [`tcp_stream_mb_per_s`], whose one buffer stays in the cache, the sender
/// reads the bytes from memory, as any copy of a region must. Megabytes (10^6 bytes) per
/// second.
pub fn tcp_stream_file_mb_per_s(path: &Path) -> io::Result<f64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    if len == 0 {
        return Err(io::Error::other("the file is empty"));
    }
    // SAFETY: a fresh read-only shared mapping of `len` bytes of an open file; checked for
    // MAP_FAILED below, unmapped below, and read only through `bytes` while it lives.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is `len` readable bytes until the munmap below. The primary that
    // owns the file may write it meanwhile: the bytes then mix old and new, which a
    // throughput floor does not mind (they are only sent).
    let bytes = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) };
    let streamed = tcp_stream_with(|s| {
        for piece in bytes.chunks(1 << 20) {
            s.write_all(piece)?;
        }
        Ok(())
    });
    // SAFETY: the mapping made above, no longer borrowed (`bytes` is not used past here).
    unsafe { libc::munmap(map, len) };
    streamed
}

/// Loopback streaming: `send` writes to a connected socket whose peer thread reads and
/// discards; megabytes per second of what the peer read, from the first byte sent to the last
/// read.
fn tcp_stream_with(send: impl FnOnce(&mut TcpStream) -> io::Result<()>) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let t = Instant::now();
    send(&mut s)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let got = reader
        .join()
        .map_err(|_| io::Error::other("reader thread panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    Ok(got as f64 / secs / 1e6)
}

/// What the C API costs over the Rust API on the same node (see [`c_api_cost`]).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CApiCost {
    /// Payload bytes per write.
    pub payload: usize,
    /// `mirror_write`, p50 µs.
    pub c_write_p50_us: f64,
    /// `Mirror::write` on the same node, p50 µs.
    pub rust_write_p50_us: f64,
    /// `mirror_submit` then `mirror_wait`, p50 µs.
    pub c_submit_p50_us: f64,
    /// `Mirror::submit` then `Mirror::wait`, p50 µs.
    pub rust_submit_p50_us: f64,
}

impl CApiCost {
    /// How much more the C write costs than the Rust one, as a fraction (0.05: 5 %).
    pub fn write_overhead(&self) -> f64 {
        self.c_write_p50_us / self.rust_write_p50_us.max(f64::MIN_POSITIVE) - 1.0
    }
    /// The same for submit + wait.
    pub fn submit_overhead(&self) -> f64 {
        self.c_submit_p50_us / self.rust_submit_p50_us.max(f64::MIN_POSITIVE) - 1.0
    }
}

/// Opens a primary through the C API (`mirror_config_*`, `mirror_open`) with a backup in this
/// process, then times `iterations` writes of `payload` bytes each way, in interleaved blocks on
/// the same node: `mirror_write` against `Mirror::write`, `mirror_submit` + `mirror_wait`
/// against `Mirror::submit` + `Mirror::wait`.
pub fn c_api_cost(dir: &Path, payload: usize, iterations: usize) -> Result<CApiCost, MirrorError> {
    use crate::ffi::{
        mirror, mirror_close, mirror_config_free, mirror_config_new, mirror_config_set,
        mirror_open, mirror_submit, mirror_wait, mirror_wait_synchronous, mirror_write,
    };
    use std::ffi::CString;
    let region_size: u64 = 16 << 20;
    let failed = |call: &str, rc: i32| {
        MirrorError::Unsupported(format!("C API benchmark: {call} returned {rc}"))
    };
    let mut b = node_config(dir, "backup", region_size, "64MiB")?;
    b.set("listen", "127.0.0.1:0")?;
    let backup = Mirror::open(b.build()?)?;
    let addr = backup
        .listen_addr()
        .ok_or_else(|| MirrorError::Unsupported("backup has no listen address".into()))?;
    let file = |ext: &str| dir.join(format!("primary.{ext}")).display().to_string();
    let keys = [
        ("role", "primary".to_string()),
        ("region", file("region")),
        ("queue", file("queue")),
        ("region_size", region_size.to_string()),
        ("queue_size", "64MiB".to_string()),
        ("peer", addr.to_string()),
        ("on_peer_loss", "block".to_string()),
    ];
    let cfg = mirror_config_new();
    let mut handle: *mut mirror = std::ptr::null_mut();
    let opened = (|| {
        for (k, v) in &keys {
            let (k, v) = (CString::new(*k), CString::new(v.as_str()));
            let (Ok(k), Ok(v)) = (k, v) else {
                return Err(failed("mirror_config_set (a NUL in a path)", -1));
            };
            // SAFETY: `cfg` is the live config made above; both strings are NUL-terminated and
            // outlive the call.
            let rc = unsafe { mirror_config_set(cfg, k.as_ptr(), v.as_ptr()) };
            if rc != 0 {
                return Err(failed("mirror_config_set", rc));
            }
        }
        // SAFETY: `cfg` is live; `handle` is a valid place for the handle.
        let rc = unsafe { mirror_open(cfg, &mut handle) };
        if rc != 0 {
            return Err(failed("mirror_open", rc));
        }
        Ok(())
    })();
    // SAFETY: the config made above, freed once (the handle does not keep it).
    unsafe { mirror_config_free(cfg) };
    opened?;
    // SAFETY: `handle` is the live handle mirror_open returned, closed at the end of this
    // function and not before; it is only ever borrowed shared meanwhile.
    let node = unsafe { &*handle }.node();
    let measured = (|| {
        // SAFETY: `handle` is live (see above).
        let rc = unsafe { mirror_wait_synchronous(handle, 10_000_000) };
        if rc != 0 {
            return Err(failed("mirror_wait_synchronous", rc));
        }
        let data = vec![0x3Cu8; payload];
        let slots = (region_size / payload as u64).max(1);
        let block = 500.min(iterations.max(1));
        let (mut c_write, mut rust_write, mut c_submit, mut rust_submit) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut i = 0u64;
        let mut offset = || {
            i += 1;
            (i % slots) * payload as u64
        };
        while c_write.len() < iterations {
            for _ in 0..block {
                let at = offset();
                let t = Instant::now();
                // SAFETY: `handle` is live; `data` is readable for its length.
                let rc = unsafe { mirror_write(handle, at, data.as_ptr().cast(), data.len()) };
                c_write.push(t.elapsed().as_nanos() as u64);
                if rc != 0 {
                    return Err(failed("mirror_write", rc));
                }
            }
            for _ in 0..block {
                let at = offset();
                let t = Instant::now();
                node.write(at, &data)?;
                rust_write.push(t.elapsed().as_nanos() as u64);
            }
            for _ in 0..block {
                let at = offset();
                let mut ticket = 0u64;
                let t = Instant::now();
                // SAFETY: `handle` is live; `data` is readable; `ticket` is writable.
                let rc = unsafe {
                    mirror_submit(handle, at, data.as_ptr().cast(), data.len(), &mut ticket)
                };
                let rc = if rc == 0 {
                    // SAFETY: `handle` is live.
                    unsafe { mirror_wait(handle, ticket, -1) }
                } else {
                    rc
                };
                c_submit.push(t.elapsed().as_nanos() as u64);
                if rc != 0 {
                    return Err(failed("mirror_submit / mirror_wait", rc));
                }
            }
            for _ in 0..block {
                let at = offset();
                let t = Instant::now();
                let ticket = node.submit(at, &data)?;
                node.wait(ticket, None)?;
                rust_submit.push(t.elapsed().as_nanos() as u64);
            }
        }
        let p50 = |v: &mut Vec<u64>| Percentiles::of(v).p50_us;
        Ok(CApiCost {
            payload,
            c_write_p50_us: p50(&mut c_write),
            rust_write_p50_us: p50(&mut rust_write),
            c_submit_p50_us: p50(&mut c_submit),
            rust_submit_p50_us: p50(&mut rust_submit),
        })
    })();
    // SAFETY: the live handle from mirror_open, closed once; `node` is not used after this.
    let rc = unsafe { mirror_close(handle) };
    backup.close()?;
    let cost = measured?;
    if rc != 0 {
        return Err(failed("mirror_close", rc));
    }
    Ok(cost)
}

/// One recovery measurement: a backup that missed `missed` writes catches up, next to a full
/// remirror (the whole region streamed over TCP from the primary's region file), in
/// interleaved trials.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryRun {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Writes the backup missed (in each trial).
    pub missed: u64,
    /// Payload bytes per write.
    pub payload: usize,
    /// Seconds from the backup's restart until it holds every write it missed: the trial
    /// where this was shortest.
    pub catch_up_s: f64,
    /// Of `catch_up_s`, the part before the transfer: the returning backup's knock, the
    /// primary's dial it brings on (rather than its next attempt, `reconnect_interval_ms`, 2
    /// here) and the handshake (same trial).
    pub reconnect_s: f64,
    /// Of `catch_up_s`, the transfer: from the handshake's end (the primary sends the missed
    /// records from then on) until the backup holds them all (same trial).
    pub transfer_s: f64,
    /// Payload bytes the catch-up moved (from the primary's stats).
    pub catch_up_bytes: u64,
    /// Seconds to stream the whole region over loopback TCP from the primary's region file
    /// ([`tcp_stream_file_mb_per_s`]: a full remirror reads the region from memory), at the
    /// best of the trials' streaming rates.
    pub full_remirror_s: f64,
    /// full_remirror_s / catch_up_s.
    pub speedup: f64,
    /// Each trial in the order run: a catch-up, then the region streamed.
    pub trials: Vec<RecoveryTrial>,
}

/// One trial of [`RecoveryRun`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RecoveryTrial {
    /// The catch-up, end to end (seconds).
    pub catch_up_s: f64,
    /// Its reconnect and handshake (seconds).
    pub reconnect_s: f64,
    /// Its transfer (seconds).
    pub transfer_s: f64,
    /// The region streamed right after it, MB/s.
    pub stream_mb_per_s: f64,
}

/// Measures catch-up after `missed` writes on a region of `region_bytes` (files in `dir`), in
/// `trials` interleaved trials: in each, the backup closes, the primary takes `missed` writes
/// without it (degraded), the backup reopens and catches up, then the primary's region file is
/// streamed over TCP (the full remirror's floor). A trial's figures and its floor come from
/// the same minutes, so the machine's changes of speed weigh on both; the best of each is kept.
pub fn recovery(
    dir: &Path,
    region_bytes: u64,
    missed: u64,
    payload: usize,
    trials: usize,
) -> Result<RecoveryRun, MirrorError> {
    let io = |source: io::Error| MirrorError::Io {
        context: "recovery benchmark".into(),
        source,
    };
    let queue_needed = missed * (payload as u64 + 64) * 2 + (16 << 20);
    let queue_size = queue_needed.next_power_of_two().max(64 << 20).to_string();
    let node = |role: &str| -> Result<ConfigBuilder, MirrorError> {
        let mut b = node_config(dir, role, region_bytes, &queue_size)?;
        b.set("reconnect_interval_ms", "2")?;
        Ok(b)
    };
    let mut bcfg = node("backup")?;
    bcfg.set("listen", "127.0.0.1:0")?;
    let mut backup = Mirror::open(bcfg.build()?)?;
    let addr = backup
        .listen_addr()
        .ok_or_else(|| MirrorError::Unsupported("backup has no listen address".into()))?;
    let mut pcfg = node("primary")?;
    pcfg.set("peer", &addr.to_string())?;
    pcfg.set("on_peer_loss", "continue")?;
    // Listening, so that the returning backup's knock reaches it (as a pair set up for
    // failover has it).
    pcfg.set("listen", "127.0.0.1:0")?;
    let primary = Mirror::open(pcfg.build()?)?;
    let primary_addr = primary
        .listen_addr()
        .ok_or_else(|| MirrorError::Unsupported("primary has no listen address".into()))?;
    primary.wait_synchronous(Duration::from_secs(10))?;
    let data = vec![0x77u8; payload];
    let slots = (region_bytes / payload as u64).max(1);
    let write_some = |from: u64, n: u64| -> Result<(), MirrorError> {
        let mut last = None;
        for i in from..from + n {
            last =
                Some(primary.submit((i.wrapping_mul(2654435761) % slots) * payload as u64, &data)?);
        }
        if let Some(t) = last {
            primary.wait(t, None)?;
        }
        Ok(())
    };
    write_some(0, 1000)?;
    let mut written = 1000;
    let mut runs = Vec::new();
    let mut catch_up_bytes = 0;
    for _ in 0..trials.max(1) {
        backup.close()?;
        drop(backup);
        // Wait until the primary noticed, then write while the backup is away (degraded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !primary.stats().degraded && primary.stats().phase != crate::Phase::Disconnected {
            if Instant::now() > deadline {
                return Err(MirrorError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        write_some(written, missed)?;
        written += missed;
        let recoveries = primary.stats().recoveries;
        let mut bcfg = node("backup")?;
        bcfg.set("listen", &addr.to_string())?;
        bcfg.set("peer", &primary_addr.to_string())?;
        // The clock starts once the backup process is up again: restarting it costs the same
        // whether it then catches up or takes a full copy.
        backup = Mirror::open(bcfg.build()?)?;
        let t = Instant::now();
        // The transfer starts when the backup's handshake ends: the primary sends the missed
        // records right after its own.
        let (reconnect_s, catch_up_s) =
            wait_caught_up(&primary, &backup, recoveries)?.seconds_since(t);
        catch_up_bytes = primary.stats().last_recovery_bytes;
        let stream_mb_per_s = tcp_stream_file_mb_per_s(&dir.join("primary.region")).map_err(io)?;
        runs.push(RecoveryTrial {
            catch_up_s,
            reconnect_s,
            transfer_s: catch_up_s - reconnect_s,
            stream_mb_per_s,
        });
    }
    primary.close()?;
    backup.close()?;
    let best = runs
        .iter()
        .copied()
        .min_by(|a, b| a.catch_up_s.total_cmp(&b.catch_up_s))
        .ok_or_else(|| MirrorError::Unsupported("no recovery trial ran".into()))?;
    let stream_mb_per_s = runs.iter().map(|r| r.stream_mb_per_s).fold(0.0, f64::max);
    let full_remirror_s = region_bytes as f64 / (stream_mb_per_s * 1e6);
    Ok(RecoveryRun {
        region_bytes,
        missed,
        payload,
        catch_up_s: best.catch_up_s,
        reconnect_s: best.reconnect_s,
        transfer_s: best.transfer_s,
        catch_up_bytes,
        full_remirror_s,
        speedup: full_remirror_s / best.catch_up_s,
        trials: runs,
    })
}

/// One peer-authentication mode's cost (see [`security`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecurityRun {
    /// `"none"`, `"secret"` (challenge-response, then HMAC-tagged records), `"tls"` or
    /// `"tls+secret"`.
    pub mode: String,
    /// Synchronous writes of 64 bytes.
    pub sync_64: Percentiles,
    /// Synchronous writes of 4 KiB.
    pub sync_4k: Percentiles,
    /// Pipelined 4 KiB writes at depth 64.
    pub pipelined_4k: Throughput,
}

/// The cost of peer authentication: one pair per mode in this process over loopback, the
/// same workload on each, in interleaved blocks so that every mode sees the same machine
/// conditions. `dir` gets the pairs' files and the throwaway secret and certificates.
pub fn security(
    dir: &Path,
    iterations: usize,
    pipelined_writes: u64,
) -> Result<Vec<SecurityRun>, MirrorError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |context: &str| {
        let context = context.to_string();
        move |source: io::Error| MirrorError::Io { context, source }
    };
    let private = |path: &Path, bytes: &[u8]| -> Result<(), MirrorError> {
        std::fs::write(path, bytes).map_err(io("writing a bench credential"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("writing a bench credential"))
    };
    let secret: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    private(&dir.join("pair.key"), &secret)?;
    let cert_err =
        |e: rcgen::Error| MirrorError::Unsupported(format!("making a bench certificate: {e}"));
    let ca = crate::transport::tls::testing::TestCa::new("bench CA").map_err(cert_err)?;
    let issued = ca.issue("localhost").map_err(cert_err)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).map_err(io("writing a bench certificate"))?;
    std::fs::write(dir.join("node.crt"), &issued.cert_pem)
        .map_err(io("writing a bench certificate"))?;
    private(&dir.join("node.tlskey"), issued.key_pem.as_bytes())?;
    let path = |n: &str| dir.join(n).display().to_string();
    let tls = [
        ("tls", "on".to_string()),
        ("tls_cert", path("node.crt")),
        ("tls_key", path("node.tlskey")),
        ("tls_ca", path("ca.pem")),
    ];
    let key = ("secret_file", path("pair.key"));
    let modes: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("none", vec![]),
        ("secret", vec![key.clone()]),
        ("tls", tls.to_vec()),
        ("tls+secret", tls.iter().cloned().chain([key]).collect()),
    ];
    let mut pairs = Vec::new();
    for (mode, opts) in &modes {
        let pdir = dir.join(mode.replace('+', "-"));
        std::fs::create_dir_all(&pdir).map_err(io("creating bench dir"))?;
        let opts: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pairs.push((mode.to_string(), LocalPair::open(&pdir, 64 << 20, &opts)?));
    }
    let block = 500.min(iterations.max(1));
    // Per pair: samples at 64 B, then at 4 KiB.
    let mut samples: Vec<[Vec<u64>; 2]> = vec![[Vec::new(), Vec::new()]; pairs.len()];
    for (which, payload) in [64usize, 4096].into_iter().enumerate() {
        let data = vec![0xC3u8; payload];
        let slots = (64u64 << 20) / payload as u64;
        let mut done = 0usize;
        while done < iterations {
            for (k, (_, pair)) in pairs.iter().enumerate() {
                for j in 0..block {
                    let at = ((done + j) as u64 % slots) * payload as u64;
                    samples[k][which].push(pair.write(at, &data)?);
                }
            }
            done += block;
        }
    }
    let mut out = Vec::new();
    for ((mode, pair), [mut s64, mut s4k]) in pairs.iter().zip(samples) {
        out.push(SecurityRun {
            mode: mode.clone(),
            sync_64: Percentiles::of(&mut s64),
            sync_4k: Percentiles::of(&mut s4k),
            pipelined_4k: pipelined(pair, 4096, 64, pipelined_writes)?,
        });
    }
    for (_, pair) in pairs {
        pair.primary.close()?;
        pair.backup.close()?;
    }
    Ok(out)
}

/// Failover measured over rounds (see [`failover`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverRun {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Rounds (each: the primary goes, the backup is promoted, the old primary rejoins).
    pub rounds: usize,
    /// Promote call → first completed write on the new primary, per round (ns).
    pub failover_ns: Vec<u64>,
    /// Its percentiles.
    pub failover: Percentiles,
    /// Payload bytes each rejoin moved (the writes the old primary missed; a divergent suffix
    /// would add its repaired ranges), per round.
    pub rejoin_bytes: Vec<u64>,
}

/// Failover on a region of `region_bytes`: a pair in this process over loopback TCP (the new
/// primary writes alone, `on_peer_loss = continue`). Each round the primary goes (closed: to
/// the backup a dead peer), the backup is promoted and writes `writes_between` 4 KiB writes, then
/// the old primary is reopened as a backup and rejoins; the roles swap for the next round.
pub fn failover(
    dir: &Path,
    region_bytes: u64,
    rounds: usize,
    writes_between: u64,
) -> Result<FailoverRun, MirrorError> {
    let payload = 4096usize;
    let port = |p: u16| format!("127.0.0.1:{p}");
    let ports = [free_loopback_port()?, free_loopback_port()?];
    let open = |i: usize, role: &str| -> Result<Mirror, MirrorError> {
        let name = ["a", "b"][i];
        let mut b = ConfigBuilder::new();
        b.set("role", role)?;
        b.set(
            "region",
            &dir.join(format!("{name}.region")).display().to_string(),
        )?;
        b.set(
            "queue",
            &dir.join(format!("{name}.queue")).display().to_string(),
        )?;
        b.set("region_size", &region_bytes.to_string())?;
        b.set("queue_size", "256MiB")?;
        b.set("listen", &port(ports[i]))?;
        b.set("peer", &port(ports[1 - i]))?;
        b.set("on_peer_loss", "continue")?;
        b.set("reconnect_interval_ms", "2")?;
        b.set("control_socket", "off")?;
        Mirror::open(b.build()?)
    };
    let wait = |what: &dyn Fn() -> bool| -> Result<(), MirrorError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !what() {
            if Instant::now() > deadline {
                return Err(MirrorError::Timeout);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    let data = vec![0x5au8; payload];
    let slots = (region_bytes / payload as u64).max(1);
    let mut primary = open(0, "primary")?;
    let mut backup = open(1, "backup")?;
    let mut p_idx = 0;
    primary.wait_synchronous(Duration::from_secs(30))?;
    let mut failover_ns = Vec::with_capacity(rounds);
    let mut rejoin_bytes = Vec::with_capacity(rounds);
    let mut at = 0u64;
    for _ in 0..rounds {
        for _ in 0..writes_between {
            primary.write(
                (at.wrapping_mul(2654435761) % slots) * payload as u64,
                &data,
            )?;
            at += 1;
        }
        drop(primary);
        wait(&|| backup.stats().phase == crate::Phase::Disconnected)?;
        let t = Instant::now();
        backup.promote(false)?;
        backup.write((at % slots) * payload as u64, &data)?;
        failover_ns.push(t.elapsed().as_nanos() as u64);
        at += 1;
        for _ in 0..writes_between {
            backup.write(
                (at.wrapping_mul(2654435761) % slots) * payload as u64,
                &data,
            )?;
            at += 1;
        }
        let recoveries = backup.stats().recoveries;
        let old = open(p_idx, "backup")?;
        wait(&|| {
            let s = backup.stats();
            s.recoveries > recoveries
                && s.phase == crate::Phase::Synchronous
                && old.stats().applied_through + 1 >= s.next_seq
        })?;
        rejoin_bytes.push(backup.stats().last_recovery_bytes);
        primary = backup;
        backup = old;
        p_idx = 1 - p_idx;
    }
    let failover = Percentiles::of(&mut failover_ns.clone());
    Ok(FailoverRun {
        region_bytes,
        rounds,
        failover_ns,
        failover,
        rejoin_bytes,
    })
}

/// Writes a latency CDF (one line per series) as an SVG chart with a log-scaled time axis.
pub fn write_cdf_svg(path: &Path, title: &str, series: &[(String, Vec<u64>)]) -> io::Result<()> {
    const W: f64 = 800.0;
    const H: f64 = 480.0;
    const L: f64 = 70.0;
    const B: f64 = 50.0;
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let all: Vec<u64> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let lo = (all.iter().copied().min().unwrap_or(1).max(1) as f64 / 1000.0)
        .log10()
        .floor();
    let hi = (all.iter().copied().max().unwrap_or(1).max(1) as f64 / 1000.0)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let x = |us: f64| L + (us.max(1e-3).log10() - lo) / (hi - lo) * (W - L - 20.0);
    let y = |q: f64| H - B - q * (H - B - 30.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        W / 2.0,
        title
    );
    for d in (lo as i32)..=(hi as i32) {
        let us = 10f64.powi(d);
        let px = x(us);
        svg += &format!("<line x1=\"{px}\" y1=\"30\" x2=\"{px}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">{us} us</text>\n", H - B, H - B + 16.0);
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let py = y(q);
        svg += &format!("<line x1=\"{L}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{q}</text>\n", W - 20.0, L - 6.0, py + 4.0);
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">latency (log scale)</text>\n",
        (W + L) / 2.0,
        H - 10.0
    );
    for (i, (name, v)) in series.iter().enumerate() {
        let mut v = v.clone();
        v.sort_unstable();
        let n = v.len().max(1);
        let step = (n / 400).max(1);
        let mut pts = String::new();
        for (k, ns) in v
            .iter()
            .enumerate()
            .step_by(step)
            .chain(v.iter().enumerate().next_back())
        {
            pts += &format!(
                "{:.1},{:.1} ",
                x(*ns as f64 / 1000.0),
                y((k + 1) as f64 / n as f64)
            );
        }
        let c = colors[i % colors.len()];
        svg += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{pts}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>\n", L + 10.0, 45.0 + 16.0 * i as f64);
    }
    svg += "</svg>\n";
    std::fs::write(path, svg)
}

/// The figures of the dirty-chunk bitmap, resyncs and online verify (see [`beyond_the_queue`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BeyondTheQueueRun {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Initial sync of a blank backup (every chunk differs): MB/s of region brought over,
    /// the best of the trials.
    pub initial_sync_mb_per_s: f64,
    /// Raw TCP streaming of the same bytes over loopback (written from the region file's
    /// mapping), MB/s, the best of the trials.
    pub tcp_stream_mb_per_s: f64,
    /// Streaming as many bytes from one buffer that stays in the cache, MB/s, the best of the
    /// trials.
    pub tcp_stream_hot_mb_per_s: f64,
    /// initial_sync_mb_per_s / tcp_stream_mb_per_s.
    pub initial_sync_vs_tcp: f64,
    /// Resync of a backup holding a stale copy (every chunk rewritten while it was away, so
    /// every chunk's digests are compared and its bytes sent): MB/s, the best of the trials.
    pub resync_mb_per_s: f64,
    /// resync_mb_per_s / tcp_stream_mb_per_s.
    pub resync_vs_tcp: f64,
    /// Each trial's figures, MB/s, in the order run (trials interleave the three, so that a
    /// slow spell of this shared machine does not fall on one of them only).
    pub trials: Vec<TransferTrial>,
    /// Online verify of the synchronous pair, MB/s of region compared.
    pub verify_mb_per_s: f64,
    /// One plain pass of the digest over the region in memory, MB/s.
    pub checksum_pass_mb_per_s: f64,
    /// verify_mb_per_s / checksum_pass_mb_per_s.
    pub verify_vs_checksum: f64,
    /// Percent of the region's chunks rewritten while the backup was away.
    pub dirty_percent: f64,
    /// Catch-up of those writes through the queue (it held them all): seconds, bytes moved.
    pub catch_up_queue_s: f64,
    /// See `catch_up_queue_s`.
    pub catch_up_queue_bytes: u64,
    /// Catch-up of the same writes through the bitmap (a queue too small for them): seconds,
    /// bytes moved.
    pub catch_up_bitmap_s: f64,
    /// See `catch_up_bitmap_s`.
    pub catch_up_bitmap_bytes: u64,
    /// Streaming the whole region over loopback TCP (a full remirror), seconds.
    pub full_remirror_s: f64,
    /// Writes while the backup was away with the small queue (they fold, never wait): their
    /// latency in microseconds.
    pub outage_write_latency: Percentiles,
    /// The longest of them, microseconds (a fold included).
    pub outage_write_max_us: f64,
    /// Chunks the bitmap marked when the backup returned.
    pub dirty_chunks_at_return: u64,
}

/// One trial of the transfer figures (see [`BeyondTheQueueRun::trials`]), MB/s.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TransferTrial {
    /// Raw TCP streaming of the region's bytes ([`tcp_stream_file_mb_per_s`] of the primary's
    /// region file).
    pub tcp_stream: f64,
    /// Raw TCP streaming of one buffer that stays in the cache ([`tcp_stream_mb_per_s`]), as
    /// many bytes: what the network alone takes.
    pub tcp_stream_hot: f64,
    /// Initial sync of a blank backup.
    pub initial_sync: f64,
    /// Resync of a stale copy.
    pub resync: f64,
}

/// Trials of the transfer figures: the best of each is reported.
const TRANSFER_TRIALS: usize = 3;

/// A pair for the bitmap figures: `queue_size` decides whether an outage folds.
fn resync_pair(
    dir: &Path,
    region_bytes: u64,
    queue_size: &str,
    backup_extra: &[(&str, &str)],
) -> Result<(Mirror, Mirror, String), MirrorError> {
    let node = |role: &str| -> Result<ConfigBuilder, MirrorError> {
        let mut b = node_config(dir, role, region_bytes, queue_size)?;
        b.set("reconnect_interval_ms", "2")?;
        b.set("chunk_size", "64KiB")?;
        b.set("max_write", "16KiB")?;
        Ok(b)
    };
    let mut bcfg = node("backup")?;
    bcfg.set("listen", "127.0.0.1:0")?;
    for (k, v) in backup_extra {
        bcfg.set(k, v)?;
    }
    let backup = Mirror::open(bcfg.build()?)?;
    let addr = backup
        .listen_addr()
        .ok_or_else(|| MirrorError::Unsupported("backup has no listen address".into()))?
        .to_string();
    let mut pcfg = node("primary")?;
    pcfg.set("peer", &addr)?;
    pcfg.set("on_peer_loss", "continue")?;
    let primary = Mirror::open(pcfg.build()?)?;
    Ok((primary, backup, addr))
}

/// When a returning backup caught up, as the backup stamped it (see [`wait_caught_up`]).
#[derive(Debug, Clone, Copy)]
struct CaughtUp {
    /// Its recovery handshake completed (the start of the pass that completed it).
    handshake_at: Instant,
    /// It had applied everything (the end of the pass that applied the last of it).
    applied_at: Instant,
}

impl CaughtUp {
    /// Seconds from `since` to the handshake and to the end.
    fn seconds_since(&self, since: Instant) -> (f64, f64) {
        let s = |at: Instant| at.saturating_duration_since(since).as_secs_f64();
        (s(self.handshake_at), s(self.applied_at))
    }
}

/// Waits until the primary is synchronous (after `recoveries`) and the backup applied all it
/// had; returns when that happened by the backup's own stamps, not this thread's clock: it
/// looks between sleeps, and with both pollers busy on two cores it waits for a core (0.05-0.3
/// ms behind the stamps in most looks, once 3 ms behind the handshake, in a small catch-up's
/// 5 ms). (A stamp the backup has not set, as an applied point that did not move, falls back
/// to this thread's clock: later, never earlier, than the event.)
fn wait_caught_up(
    primary: &Mirror,
    backup: &Mirror,
    recoveries: u64,
) -> Result<CaughtUp, MirrorError> {
    let t = Instant::now();
    loop {
        let s = primary.stats();
        if s.recoveries > recoveries && s.phase == crate::Phase::Synchronous {
            let b = backup.stats();
            if b.applied_through >= s.next_seq - 1 {
                let seen = Instant::now();
                let applied_at = b.applied_at.unwrap_or(seen);
                return Ok(CaughtUp {
                    handshake_at: b.last_recovery_at.unwrap_or(seen).min(applied_at),
                    applied_at,
                });
            }
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(MirrorError::Timeout);
        }
        // Sleep, not spin: the two pollers need the CPUs.
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Rewrites `chunks` whole chunks (4 KiB writes) spread over the region; returns the write
/// latencies in nanoseconds.
fn rewrite_chunks(
    m: &Mirror,
    region_bytes: u64,
    chunks: u64,
    byte: u8,
) -> Result<Vec<u64>, MirrorError> {
    const CHUNK: u64 = 64 << 10;
    let total = region_bytes / CHUNK;
    let step = (total / chunks.max(1)).max(1);
    let data = vec![byte; 4096];
    let mut latencies = Vec::with_capacity((chunks * CHUNK / 4096) as usize);
    for c in 0..chunks.min(total) {
        for piece in 0..CHUNK / 4096 {
            let t = Instant::now();
            m.write(c * step * CHUNK + piece * 4096, &data)?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(latencies)
}

/// Measures, on a region of `region_bytes` (files in `dir`): an initial sync of a blank node
/// next to raw TCP streaming of the same bytes; an online verify next to one digest pass over
/// the region; and the catch-up of `dirty_percent` of the chunks rewritten while the backup
/// was away, through the queue (large enough to hold them) and through the bitmap (a queue
/// too small), next to a full remirror; and the writes' latency during that outage.
pub fn beyond_the_queue(
    dir: &Path,
    region_bytes: u64,
    dirty_percent: f64,
) -> Result<BeyondTheQueueRun, MirrorError> {
    const CHUNK: u64 = 64 << 10;
    let io = |source: io::Error| MirrorError::Io {
        context: "resync benchmark".into(),
        source,
    };
    let fresh = |name: &str| -> Result<std::path::PathBuf, MirrorError> {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(io)?;
        Ok(d)
    };
    // 1. Transfers: an initial sync of a blank backup and a resync of a stale one, next to raw
    // TCP streaming of the same bytes, in interleaved trials.
    let d = fresh("initial")?;
    let (primary, backup, addr) = resync_pair(&d, region_bytes, "64MiB", &[])?;
    primary.wait_synchronous(Duration::from_secs(10))?;
    backup.close()?;
    drop(backup);
    // Every chunk differs from a blank one, and from the previous fill.
    let fill = |byte: u8| -> Result<(), MirrorError> {
        let filler = vec![byte; 16 << 10];
        let mut last = None;
        for off in (0..region_bytes).step_by(filler.len()) {
            let n = (region_bytes - off).min(filler.len() as u64) as usize;
            last = Some(primary.submit(off, &filler[..n])?);
        }
        if let Some(t) = last {
            primary.wait(t, None)?;
        }
        Ok(())
    };
    let open_backup = |initial_sync: bool| -> Result<Mirror, MirrorError> {
        let mut bcfg = node_config(&d, "backup", region_bytes, "64MiB")?;
        for (k, v) in [
            ("listen", addr.as_str()),
            ("chunk_size", "64KiB"),
            ("max_write", "16KiB"),
            ("initial_sync", if initial_sync { "true" } else { "false" }),
        ] {
            bcfg.set(k, v)?;
        }
        Mirror::open(bcfg.build()?)
    };
    // MB/s of region from the backup's start until it is caught up.
    let caught_up = |backup: &Mirror, since: Instant, recoveries: u64| {
        wait_caught_up(&primary, backup, recoveries)
            .map(|c| region_bytes as f64 / c.seconds_since(since).1.max(1e-9) / 1e6)
    };
    fill(0x5a)?;
    let mut trials = Vec::new();
    let mut backup = None;
    for trial in 0..TRANSFER_TRIALS {
        let tcp_stream = tcp_stream_file_mb_per_s(&d.join("primary.region")).map_err(io)?;
        let tcp_stream_hot = tcp_stream_mb_per_s(region_bytes, 1 << 20).map_err(io)?;
        // A blank node: its files are new.
        if let Some(b) = backup.take() {
            Mirror::close(&b)?;
        }
        for f in ["backup.region", "backup.queue", "backup.queue.bitmap"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        let recoveries = primary.stats().recoveries;
        let b = open_backup(true)?;
        let initial_sync = caught_up(&b, Instant::now(), recoveries)?;
        // A stale copy: every chunk rewritten while it is away.
        b.close()?;
        drop(b);
        while primary.stats().phase == crate::Phase::Synchronous {
            std::thread::sleep(Duration::from_millis(1));
        }
        fill(if trial % 2 == 0 { 0xa5 } else { 0x5a })?;
        let recoveries = primary.stats().recoveries;
        let b = open_backup(false)?;
        let resync = caught_up(&b, Instant::now(), recoveries)?;
        backup = Some(b);
        trials.push(TransferTrial {
            tcp_stream,
            tcp_stream_hot,
            initial_sync,
            resync,
        });
    }
    let best = |f: fn(&TransferTrial) -> f64| trials.iter().map(f).fold(0.0, f64::max);
    let tcp = best(|t| t.tcp_stream);
    let tcp_hot = best(|t| t.tcp_stream_hot);
    let initial_sync_mb_per_s = best(|t| t.initial_sync);
    let resync_mb_per_s = best(|t| t.resync);
    let backup = backup.expect("at least one trial");
    // 2. Online verify of the synchronous pair, next to one digest pass over the region.
    let t = Instant::now();
    let report = primary.verify_online(false)?;
    let verify_s = t.elapsed().as_secs_f64();
    if !report.differing.is_empty() {
        return Err(MirrorError::Verify(format!(
            "{} chunks differ after the resync",
            report.differing.len()
        )));
    }
    let region = std::fs::read(d.join("primary.region")).map_err(io)?;
    let t = Instant::now();
    let mut folded = 0u8;
    for chunk in region.chunks(CHUNK as usize) {
        folded ^= mirror_proto::chunk_digest(chunk)[0];
    }
    let checksum_s = t.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(folded);
    drop(region);
    primary.close()?;
    backup.close()?;
    drop((primary, backup));
    let _ = std::fs::remove_dir_all(&d);
    // 3. Catch-up of the same rewrites through the queue, then through the bitmap.
    let chunks = ((region_bytes / CHUNK) as f64 * dirty_percent / 100.0)
        .round()
        .max(1.0) as u64;
    let queue_for_all = (chunks * CHUNK * 2 + (16 << 20)).next_power_of_two();
    let mut outage = Vec::new();
    let mut dirty_at_return = 0;
    let mut catch_up = |queue_size: String, bitmap: bool| -> Result<(f64, u64), MirrorError> {
        let d = fresh(if bitmap { "bitmap" } else { "queue" })?;
        let (primary, backup, addr) = resync_pair(&d, region_bytes, &queue_size, &[])?;
        primary.wait_synchronous(Duration::from_secs(10))?;
        backup.close()?;
        drop(backup);
        while primary.stats().phase == crate::Phase::Synchronous {
            std::thread::sleep(Duration::from_millis(1));
        }
        let latencies = rewrite_chunks(&primary, region_bytes, chunks, 0x33)?;
        if bitmap {
            outage = latencies;
            dirty_at_return = primary.stats().dirty_chunks;
        }
        let recoveries = primary.stats().recoveries;
        let mut bcfg = node_config(&d, "backup", region_bytes, &queue_size)?;
        for (k, v) in [
            ("listen", addr.as_str()),
            ("chunk_size", "64KiB"),
            ("max_write", "16KiB"),
        ] {
            bcfg.set(k, v)?;
        }
        let backup = Mirror::open(bcfg.build()?)?;
        let t = Instant::now();
        let (_, s) = wait_caught_up(&primary, &backup, recoveries)?.seconds_since(t);
        let bytes = primary.stats().last_recovery_bytes;
        primary.close()?;
        backup.close()?;
        let _ = std::fs::remove_dir_all(&d);
        Ok((s, bytes))
    };
    let (catch_up_queue_s, catch_up_queue_bytes) = catch_up(queue_for_all.to_string(), false)?;
    let (catch_up_bitmap_s, catch_up_bitmap_bytes) = catch_up("256KiB".to_string(), true)?;
    let outage_write_max_us = outage.iter().copied().max().unwrap_or(0) as f64 / 1000.0;
    let checksum_pass_mb_per_s = region_bytes as f64 / checksum_s / 1e6;
    let verify_mb_per_s = region_bytes as f64 / verify_s / 1e6;
    Ok(BeyondTheQueueRun {
        region_bytes,
        chunk_bytes: CHUNK,
        initial_sync_mb_per_s,
        tcp_stream_mb_per_s: tcp,
        tcp_stream_hot_mb_per_s: tcp_hot,
        initial_sync_vs_tcp: initial_sync_mb_per_s / tcp,
        resync_mb_per_s,
        resync_vs_tcp: resync_mb_per_s / tcp,
        trials,
        verify_mb_per_s,
        checksum_pass_mb_per_s,
        verify_vs_checksum: verify_mb_per_s / checksum_pass_mb_per_s,
        dirty_percent,
        catch_up_queue_s,
        catch_up_queue_bytes,
        catch_up_bitmap_s,
        catch_up_bitmap_bytes,
        full_remirror_s: region_bytes as f64 / (tcp * 1e6),
        outage_write_latency: Percentiles::of(&mut outage),
        outage_write_max_us,
        dirty_chunks_at_return: dirty_at_return,
    })
}

/// A loopback port that was free a moment ago, for a node to listen on. (Another process may
/// take it before the node binds; the tests and the demo accept that small race.) Drawn at
/// random from below the kernel's ephemeral range: every outgoing connection on the machine
/// takes its local port from that range, as `bind` to port 0 does, so a port found that way
/// can go to some connection before the node binds it (a test run beside busy benchmarks saw
/// "Address already in use"); below it only another listener can take it.
pub fn free_loopback_port() -> Result<u16, MirrorError> {
    let io = |source| MirrorError::Io {
        context: "finding a free loopback port".into(),
        source,
    };
    let ephemeral_start = ephemeral_port_start().unwrap_or(32768);
    if let Some(span) = ephemeral_start
        .checked_sub(FIRST_CHOSEN_PORT)
        .filter(|&n| n >= 1000)
    {
        let mut draw = port_draw_seed();
        for _ in 0..64 {
            // xorshift64: cheap, and seeded per call, so parallel callers draw apart.
            draw ^= draw << 13;
            draw ^= draw >> 7;
            draw ^= draw << 17;
            let port = FIRST_CHOSEN_PORT + (draw % u64::from(span)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok(listener.local_addr().map_err(io)?.port())
}

/// The first port of the kernel's ephemeral range (Linux's `ip_local_port_range`), if known.
fn ephemeral_port_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// The lowest port [`free_loopback_port`] draws: above the well-known and most services' ports.
const FIRST_CHOSEN_PORT: u16 = 10_000;

/// Differs per process, per call and over time (never zero: xorshift would stay at zero).
fn port_draw_seed() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Relaxed: only a distinct number per call is wanted, no ordering with other memory.
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32) ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_come_from_below_the_ephemeral_range_and_can_be_bound() {
        let Some(ephemeral_start) = ephemeral_port_start() else {
            return; // Not Linux: nothing to compare with.
        };
        if ephemeral_start < FIRST_CHOSEN_PORT + 1000 {
            return; // No room below the range: the kernel's choice is the fallback.
        }
        let ports: Vec<u16> = (0..50).map(|_| free_loopback_port().unwrap()).collect();
        for &port in &ports {
            assert!(
                (FIRST_CHOSEN_PORT..ephemeral_start).contains(&port),
                "port {port} is outside {FIRST_CHOSEN_PORT}..{ephemeral_start}"
            );
        }
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert!(distinct.len() > 40, "draws repeat: {ports:?}");
        let port = free_loopback_port().unwrap();
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn a_machine_is_named_from_its_first_processor() {
        // Shaped like this project's development VMs' /proc/cpuinfo, shortened.
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                   model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2\n\n\
                   processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                   model name\t: AMD EPYC\n";
        let m = Machine::from_cpuinfo(amd, Some("6.18.44-fc-v1272\n"), 2);
        assert_eq!(
            m,
            Machine {
                cpu: Some("AMD EPYC".into()),
                vendor: Some("AuthenticAMD".into()),
                family: Some(25),
                model: Some(1),
                cpus: 2,
                kernel: Some("6.18.44-fc-v1272".into()),
            }
        );
        assert_eq!(
            m.to_string(),
            "AMD EPYC (AuthenticAMD, family 25 model 1), 2 CPUs, kernel 6.18.44-fc-v1272"
        );
        // `model name` is not `model`, and `model` is not `model name`, in either order (a
        // prefix match would take the name, listed first here, for the model).
        let intel = "vendor_id\t: GenuineIntel\ncpu family\t: 6\n\
                     model name\t: Intel(R) Xeon(R) Processor\nmodel\t\t: 207\n";
        let m = Machine::from_cpuinfo(intel, None, 1);
        assert_eq!(m.model, Some(207));
        assert_eq!(
            m.to_string(),
            "Intel(R) Xeon(R) Processor (GenuineIntel, family 6 model 207), 1 CPU"
        );
    }

    #[test]
    fn a_machine_without_x86_entries_or_a_kernel_name_is_still_described() {
        // An arm64 kernel's cpuinfo has neither a model name nor a family.
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n";
        let m = Machine::from_cpuinfo(arm, Some("  "), 4);
        assert_eq!(m.cpu, None);
        assert_eq!(m.family, None);
        assert_eq!(m.kernel, None);
        assert_eq!(m.to_string(), "an unnamed CPU, 4 CPUs");
        // Unreadable numbers are left out, not guessed.
        let odd = "cpu family\t: ?\nmodel\t\t: 1\nmodel name\t: \n";
        let m = Machine::from_cpuinfo(odd, None, 1);
        assert_eq!((m.cpu, m.family, m.model), (None, None, Some(1)));
        assert_eq!(
            Machine::from_cpuinfo("", None, 1).to_string(),
            "an unnamed CPU, 1 CPU"
        );
    }
}
