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
#[derive(Debug, Clone, Copy, PartialEq)]
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
            let mut b = ConfigBuilder::new();
            b.set("role", role)?;
            b.set(
                "region",
                &dir.join(format!("{role}.region")).display().to_string(),
            )?;
            b.set(
                "queue",
                &dir.join(format!("{role}.queue")).display().to_string(),
            )?;
            b.set("region_size", &region_size.to_string())?;
            b.set("queue_size", "64MiB")?;
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
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    /// Payload bytes per write.
    pub payload: usize,
    /// The raw TCP ping-pong.
    pub floor: Percentiles,
    /// The engine's synchronous write.
    pub engine: Percentiles,
}

impl Comparison {
    /// engine p50 / floor p50.
    pub fn ratio_p50(&self) -> f64 {
        self.engine.p50_us / self.floor.p50_us.max(f64::MIN_POSITIVE)
    }
    /// engine p99 / floor p99.
    pub fn ratio_p99(&self) -> f64 {
        self.engine.p99_us / self.floor.p99_us.max(f64::MIN_POSITIVE)
    }
}

/// Measures `iterations` synchronous writes of `payload` bytes and as many ping-pong round trips,
/// interleaved in blocks so that both see the same machine conditions.
pub fn compare_sync_write(
    pair: &LocalPair,
    payload: usize,
    iterations: usize,
) -> Result<Comparison, MirrorError> {
    let io = |source: io::Error| MirrorError::Io {
        context: "ping-pong floor".into(),
        source,
    };
    let mut pp = PingPong::start(payload).map_err(io)?;
    let data = vec![0xA5u8; payload];
    let slots = (pair.primary.region_len() / payload as u64).max(1);
    let block = 500.min(iterations.max(1));
    let mut floor = Vec::with_capacity(iterations);
    let mut engine = Vec::with_capacity(iterations);
    // Warm-up of both.
    for i in 0..block.min(200) {
        pp.round_trip().map_err(io)?;
        pair.write((i as u64 % slots) * payload as u64, &data)?;
    }
    let mut i = 0u64;
    while floor.len() < iterations {
        for _ in 0..block {
            floor.push(pp.round_trip().map_err(io)?);
        }
        for _ in 0..block {
            engine.push(pair.write((i % slots) * payload as u64, &data)?);
            i += 1;
        }
    }
    Ok(Comparison {
        payload,
        floor: Percentiles::of(&mut floor),
        engine: Percentiles::of(&mut engine),
    })
}
