//! A fault-injecting TCP proxy for tests that need no root: placed between the primary and the
//! backup, it can pass traffic, stall it (hold every byte, keep connections open: a silent
//! partition or a peer stuck in SIGSTOP), hold one direction only (a connection half-open toward
//! the upstream), black-hole new connections (accepted, never forwarded: a half-open peer), delay
//! it, and cut every connection (reset). It can also tamper with the bytes toward the upstream
//! (flip, drop or insert bytes once, mid-stream: an attacker on the path) and record what each
//! connection sent first (for replay attacks).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Hold every byte in both directions; connections stay open.
    Stall,
    /// Hold the bytes from the client to the upstream (primary to backup) only; the other
    /// direction flows: the backup hears nothing while the primary hears everything.
    StallTowardUpstream,
    /// New connections are accepted but never forwarded (existing ones keep their mode).
    Blackhole,
}

/// A one-time change to the bytes flowing toward the upstream, made in the middle of the next
/// chunk that passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    /// Flip the low bit of one byte.
    Flip,
    /// Remove this many bytes.
    Drop(usize),
    /// Insert these bytes.
    Insert(Vec<u8>),
    /// Rewrite the payload of the first whole `Write` frame in a chunk to 0xEE bytes and fix
    /// its checksum: a forgery the frame checksum cannot see (waits for a chunk that holds one).
    RewriteWrite,
}

/// Rewrites the first complete `Write` frame in `chunk` (payload to 0xEE, checksum recomputed);
/// returns whether there was one.
fn rewrite_write(chunk: &mut [u8]) -> bool {
    let magic = mirror_proto::wire::FRAME_MAGIC.to_le_bytes();
    for at in 0..chunk.len().saturating_sub(4) {
        if chunk[at..at + 4] != magic {
            continue;
        }
        let mut rest = bytes::BytesMut::from(&chunk[at..]);
        let before = rest.len();
        if let Ok(Some(mirror_proto::Message::Write {
            seq,
            term,
            offset,
            data,
        })) = mirror_proto::Message::decode(&mut rest)
        {
            let len = before - rest.len();
            let mut forged = bytes::BytesMut::new();
            mirror_proto::Message::Write {
                seq,
                term,
                offset,
                data: vec![0xEE; data.len()].into(),
            }
            .encode(&mut forged);
            if forged.len() == len {
                chunk[at..at + len].copy_from_slice(&forged);
                return true;
            }
        }
    }
    false
}

/// Bytes kept of what each connection sent toward the upstream first.
const RECORDED: usize = 64 << 10;

struct Shared {
    tamper: Mutex<Option<Tamper>>,
    tampered: AtomicU64,
    recorded: Mutex<Vec<Vec<u8>>>,
    mode: Mutex<Mode>,
    changed: Condvar,
    delay_us: AtomicU64,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    forwarded: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            tamper: Mutex::new(None),
            tampered: AtomicU64::new(0),
            recorded: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Pass),
            changed: Condvar::new(),
            delay_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            forwarded: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => continue,
                };
                client.set_nonblocking(false).unwrap();
                s.conns.lock().unwrap().push(client.try_clone().unwrap());
                if *s.mode.lock().unwrap() == Mode::Blackhole {
                    continue; // held open, never forwarded: half-open from the client's view
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                s.conns.lock().unwrap().push(server.try_clone().unwrap());
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to, toward_upstream) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let s = Arc::clone(&s);
                    std::thread::spawn(move || forward(from, to, toward_upstream, s));
                }
            }
        });
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        self.shared.changed.notify_all();
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Resets every connection through the proxy (both ends see it close).
    pub fn cut(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// Tampers once with the next chunk toward the upstream.
    pub fn tamper(&self, t: Tamper) {
        *self.shared.tamper.lock().unwrap() = Some(t);
    }

    /// How many tamperings were made.
    pub fn tampered(&self) -> u64 {
        self.shared.tampered.load(Ordering::Relaxed)
    }

    /// The first bytes each connection sent toward the upstream (up to 64 KiB each), in the
    /// order the connections were made.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.shared.recorded.lock().unwrap().clone()
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, toward_upstream: bool, s: Arc<Shared>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    let slot = toward_upstream.then(|| {
        let mut r = s.recorded.lock().unwrap();
        r.push(Vec::new());
        r.len() - 1
    });
    loop {
        if s.stop.load(Ordering::Relaxed) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        // Hold the bytes while stalled.
        {
            let mut mode = s.mode.lock().unwrap();
            let held = |mode: Mode| {
                mode == Mode::Stall || (mode == Mode::StallTowardUpstream && toward_upstream)
            };
            while held(*mode) && !s.stop.load(Ordering::Relaxed) {
                mode = s
                    .changed
                    .wait_timeout(mode, Duration::from_millis(20))
                    .unwrap()
                    .0;
            }
        }
        let d = s.delay_us.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        let mut chunk = buf[..n].to_vec();
        if let Some(slot) = slot {
            let mut r = s.recorded.lock().unwrap();
            let room = RECORDED.saturating_sub(r[slot].len());
            r[slot].extend_from_slice(&chunk[..room.min(n)]);
            let mut armed = s.tamper.lock().unwrap();
            if let Some(t) = armed.take() {
                let at = n / 2;
                match t {
                    Tamper::RewriteWrite => {
                        if !rewrite_write(&mut chunk) {
                            *armed = Some(Tamper::RewriteWrite);
                        }
                    }
                    Tamper::Flip => chunk[at] ^= 1,
                    Tamper::Drop(len) => {
                        chunk.drain(at..(at + len).min(n));
                    }
                    Tamper::Insert(bytes) => {
                        chunk.splice(at..at, bytes);
                    }
                }
                if armed.is_none() {
                    s.tampered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
        s.forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.cut();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}
