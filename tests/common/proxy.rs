//! A fault-injecting TCP proxy for tests that need no root: placed between the primary and the
//! backup, it can pass traffic, stall it (hold every byte, keep connections open: a silent
//! partition or a peer stuck in SIGSTOP), hold one direction only (a connection half-open toward
//! the upstream), black-hole new connections (accepted, never forwarded: a half-open peer), delay
//! it, and cut every connection (reset).
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

struct Shared {
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

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, toward_upstream: bool, s: Arc<Shared>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
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
        if to.write_all(&buf[..n]).is_err() {
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
