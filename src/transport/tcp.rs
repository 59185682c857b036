//! TCP transport: non-blocking sockets with TCP_NODELAY, busy-polled; many messages per `write`.
//!
//! A new connection is established in layers, each optional, each non-blocking (see
//! [`Establishing`]): the TLS handshake (`tls = on`, [`super::tls`]), then the secret's
//! challenge-response (`secret_file`, [`super::auth`]). Without TLS, an authenticated
//! connection then carries its frames in tagged records; with TLS, TLS protects them.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_proto::auth::{Session, Side};
use mirror_proto::{chunk_data_header, write_header, Message};

use super::auth::{AuthContext, Authenticating};
use super::tls::TlsContext;
use super::{
    BorrowedWrite, Connecting, Connection, FrameReader, Listener, SendBatch, TransportError,
};
use crate::stamps;

/// Bytes read per `read` call, and the receive buffer's growth step.
const RECV_CHUNK: usize = 256 << 10;

/// A TCP connection to the peer.
#[derive(Debug)]
pub struct TcpConnection {
    stream: TcpStream,
    peer: SocketAddr,
    tx: SendBatch,
    rx: FrameReader,
    authenticated: Option<u64>,
    /// TLS on this connection (`tls = on`): frames go through it.
    tls: Option<Box<rustls::Connection>>,
    /// Where TLS decrypts into (rustls reads into initialized memory; allocated once).
    tls_scratch: Vec<u8>,
}

/// What one read into the receive buffer found.
enum Filled {
    /// Nothing (the socket had nothing, or the buffer is full of undecoded frames).
    Nothing,
    /// Bytes, and maybe more behind them.
    More,
    /// Bytes, fewer than there was room for: the socket held no more just then.
    Drained,
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { context, source }
}

impl TcpConnection {
    /// Wraps an established stream: non-blocking, TCP_NODELAY.
    pub fn new(stream: TcpStream) -> Result<Self, TransportError> {
        stream
            .set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))?;
        stream
            .set_nodelay(true)
            .map_err(io_err("setting TCP_NODELAY"))?;
        let peer = stream.peer_addr().map_err(io_err("reading peer address"))?;
        Ok(TcpConnection {
            stream,
            peer,
            tx: SendBatch::with_capacity(RECV_CHUNK),
            rx: FrameReader::with_capacity(RECV_CHUNK),
            authenticated: None,
            tls: None,
            tls_scratch: Vec::new(),
        })
    }

    /// Wraps a stream whose layers are established: `tls` if it runs TLS, `session` if the
    /// peer proved the secret (without TLS its frames then travel in tagged records); `early`
    /// are the peer's bytes that arrived with the end of the handshake.
    fn established(
        stream: TcpStream,
        tls: Option<Box<rustls::Connection>>,
        session: Option<Session>,
        early: &[u8],
    ) -> Result<Self, TransportError> {
        let mut c = Self::new(stream)?;
        c.authenticated = session.as_ref().map(|s| s.peer_node_id);
        match session {
            Some(session) if tls.is_none() => super::secure(&mut c.tx, &mut c.rx, session, early),
            _ => c.rx.raw().extend_from_slice(early),
        }
        if tls.is_some() {
            c.tls_scratch = vec![0; TLS_SCRATCH];
        }
        c.tls = tls;
        Ok(c)
    }

    /// Hands the batch to TLS and TLS's records to the socket, as far as it takes them.
    fn flush_tls(&mut self) -> Result<bool, TransportError> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(self.tx.settle());
        };
        loop {
            while self.tx.pending() > 0 {
                let n = tls
                    .writer()
                    .write(self.tx.unsent())
                    .map_err(io_err("encrypting for the peer"))?;
                if n == 0 {
                    break; // TLS's buffer is full: send what it holds first
                }
                self.tx.advance(n);
            }
            let mut blocked = false;
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(TransportError::Closed),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err("sending to peer")(e)),
                }
            }
            if blocked || self.tx.pending() == 0 {
                return Ok(self.tx.settle() && !tls.wants_write());
            }
        }
    }

    /// Appends what arrived to the receive buffer; says whether anything did, and whether the
    /// socket may hold more. With `holding` (frames decoded from the buffer are still alive,
    /// their payloads pointing into it), a buffer short of room is left as is: growing it now
    /// would move the bytes to fresh memory (page faults on every new page, the old block freed
    /// and trimmed when the frames drop); once they dropped, the next call reuses the same block.
    fn fill(&mut self, holding: bool) -> Result<Filled, TransportError> {
        let raw = self.rx.raw();
        if raw.capacity() - raw.len() < RECV_CHUNK / 4 {
            if holding {
                return Ok(Filled::Nothing);
            }
            raw.reserve(RECV_CHUNK);
        }
        if let Some(tls) = self.tls.as_mut() {
            let got = fill_from_tls(tls, &mut self.stream, &mut self.tls_scratch, self.rx.raw())?;
            return Ok(if got { Filled::More } else { Filled::Nothing });
        }
        let spare = raw.spare_capacity_mut();
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `self.rx`, and
        // recv(2) writes at most that many bytes into it. No Rust reference to those bytes is
        // read before `set_len` below covers exactly the `n` bytes recv initialized.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                0,
            )
        };
        let room = spare.len();
        match n {
            0 => Err(TransportError::Closed),
            n if n > 0 => {
                let len = raw.len();
                // SAFETY: recv initialized bytes len..len+n (n <= spare capacity, checked by
                // the kernel against the length we passed).
                unsafe { raw.set_len(len + n as usize) };
                stamps::received();
                Ok(if (n as usize) < room {
                    Filled::Drained
                } else {
                    Filled::More
                })
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(Filled::Nothing),
                    io::ErrorKind::Interrupted => Ok(Filled::More),
                    _ => Err(io_err("receiving from peer")(e)),
                }
            }
        }
    }

    /// Connects to `addr` (blocking for at most `timeout`).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, TransportError> {
        let mut last = None;
        let addrs = addr
            .to_socket_addrs()
            .map_err(io_err("resolving peer address"))?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => return Self::new(s),
                Err(e) => last = Some(e),
            }
        }
        Err(TransportError::Io {
            context: "connecting to peer",
            source: last.unwrap_or_else(|| io::Error::other("address resolves to nothing")),
        })
    }
}

/// Writes of at least this many bytes go to the socket without being copied into the send
/// batch (when nothing is queued before them): at 64 KiB the copy cost more than the system call
/// it saves.
const WRITE_BYPASS_MIN: usize = 16 << 10;

impl TcpConnection {
    /// Whether a frame may skip the batch: nothing queued before it, frames in the clear.
    fn may_bypass(&self) -> bool {
        self.tls.is_none() && self.tx.may_bypass()
    }

    /// Sends frames made of borrowed `parts` as they are, in one vectored write (the kernel's
    /// copy is the only one); what the socket does not take now is queued. Only when
    /// [`may_bypass`](Self::may_bypass), and with at most [`MAX_IOVECS`] parts.
    fn send_unbatched(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        debug_assert!(parts.len() <= MAX_IOVECS);
        // One frame (a header and its data) is the common case: no allocation for it.
        let mut one = [IoSlice::new(&[]), IoSlice::new(&[])];
        let many: Vec<IoSlice<'_>>;
        let slices: &[IoSlice<'_>] = if parts.len() <= one.len() {
            for (slice, part) in one.iter_mut().zip(parts) {
                *slice = IoSlice::new(part);
            }
            &one[..parts.len()]
        } else {
            many = parts.iter().map(|p| IoSlice::new(p)).collect();
            &many
        };
        stamps::sent();
        let taken = loop {
            match self.stream.write_vectored(slices) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("sending to peer")(e)),
            }
        };
        if taken < parts.iter().map(|p| p.len()).sum::<usize>() {
            self.tx.push_untaken(parts, taken)?;
        }
        Ok(())
    }
}

/// Most buffers one vectored write takes (Linux's `UIO_MAXIOV`; more is refused with EINVAL).
const MAX_IOVECS: usize = 1024;

/// Writes' payloads of at least this many bytes are not copied into the send batch: they
/// follow it by reference and go out in vectored writes (over TCP in the clear). Below it
/// the copy costs less than a buffer of its own in the kernel's walk over the vector and
/// the shared count that keeps the payload alive until sent.
const SHARE_MIN: usize = 2048;

impl Connection for TcpConnection {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        match msg {
            Message::Write {
                seq,
                term,
                offset,
                data,
            } if data.len() >= WRITE_BYPASS_MIN && self.may_bypass() => {
                let header = write_header(*seq, *term, *offset, data, data.crc());
                self.send_unbatched(&[&header, data])
            }
            Message::Write {
                seq,
                term,
                offset,
                data,
            } if data.len() >= SHARE_MIN && self.sends_in_place() => {
                self.tx.push_write_shared(*seq, *term, *offset, data)
            }
            _ => self.tx.push(msg),
        }
    }

    fn send_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        crc: u32,
    ) -> Result<(), TransportError> {
        // Small writes are batched (one system call for a pass's frames); a large one costs
        // more to copy into the batch than a system call of its own.
        if data.len() < WRITE_BYPASS_MIN || !self.may_bypass() {
            return self.tx.push_write(seq, term, offset, data, crc);
        }
        self.send_unbatched(&[&write_header(seq, term, offset, data, crc), data])
    }

    fn send_writes(&mut self, writes: &[BorrowedWrite<'_>]) -> Result<(), TransportError> {
        // Each write is two buffers: its header and its payload.
        for group in writes.chunks(MAX_IOVECS / 2) {
            if !self.may_bypass() {
                // Behind bytes the socket has not taken: queued in order after them.
                for w in group {
                    self.tx
                        .push_write(w.seq, w.term, w.offset, w.data, w.data_crc)?;
                }
                continue;
            }
            let headers: Vec<_> = group
                .iter()
                .map(|w| write_header(w.seq, w.term, w.offset, w.data, w.data_crc))
                .collect();
            let parts: Vec<&[u8]> = headers
                .iter()
                .zip(group)
                .flat_map(|(h, w)| [&h[..], w.data])
                .collect();
            self.send_unbatched(&parts)?;
        }
        Ok(())
    }

    fn sends_in_place(&self) -> bool {
        self.tls.is_none() && !self.tx.sealed()
    }

    fn send_chunk_data(&mut self, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        if !self.may_bypass() {
            return self.tx.push_chunk_data(offset, data);
        }
        self.send_unbatched(&[&chunk_data_header(offset, data), data])
    }

    fn flush(&mut self) -> Result<bool, TransportError> {
        self.tx.close_record();
        if self.tls.is_some() {
            return self.flush_tls();
        }
        if self.tx.pending() > 0 {
            stamps::sent();
        }
        while self.tx.pending() > 0 {
            let written = if self.tx.has_shared() {
                let mut parts = Vec::new();
                self.tx.unsent_parts(MAX_IOVECS, &mut parts);
                self.stream.write_vectored(&parts)
            } else {
                self.stream.write(self.tx.unsent())
            };
            match written {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => self.tx.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("sending to peer")(e)),
            }
        }
        Ok(self.tx.settle())
    }

    fn pending_send_bytes(&self) -> usize {
        self.tx.pending()
    }

    fn poll_recv(&mut self, out: &mut Vec<Message>, max: usize) -> Result<usize, TransportError> {
        let before = out.len();
        let mut drained = false;
        loop {
            while out.len() - before < max {
                match self.rx.next()? {
                    Some(m) => out.push(m),
                    None => break,
                }
            }
            // A read that did not fill the buffer took everything the socket held: another
            // would only say EAGAIN (a system call per receive, on every write's path).
            if drained || out.len() - before >= max {
                break;
            }
            match self.fill(out.len() > before)? {
                Filled::Nothing => break,
                Filled::Drained => drained = true,
                Filled::More => {}
            }
        }
        Ok(out.len() - before)
    }

    fn wait_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn send_ready_fd(&self) -> Option<(RawFd, i16)> {
        Some((self.stream.as_raw_fd(), libc::POLLOUT))
    }

    fn peer(&self) -> String {
        format!("tcp://{}", self.peer)
    }

    fn authenticated_peer(&self) -> Option<u64> {
        self.authenticated
    }
}

/// Connections authenticating at once on a listener; beyond it the oldest is dropped, so a
/// crowd of silent clients cannot grow memory, and a legitimate peer's retry gets in.
const MAX_AUTHENTICATING: usize = 64;

/// An accepted connection that has not authenticated yet.
#[derive(Debug)]
struct PendingAuth {
    establishing: Establishing,
    peer: SocketAddr,
    deadline: Instant,
}

/// A listener's authentication: what to establish, the handshakes in progress, and an epoll
/// instance over the listener and their sockets (the poller sleeps on one descriptor).
#[derive(Debug)]
struct AcceptAuth {
    security: Security,
    timeout: Duration,
    pending: Vec<PendingAuth>,
    wake: OwnedFd,
}

/// Bytes decrypted per read: a TLS record's largest plaintext.
const TLS_SCRATCH: usize = 16 << 10;

/// Decrypted bytes from `tls` into `raw`, through `scratch` (reading TLS records from the socket
/// when none is decrypted); returns whether anything arrived.
fn fill_from_tls(
    tls: &mut rustls::Connection,
    stream: &mut TcpStream,
    scratch: &mut [u8],
    raw: &mut bytes::BytesMut,
) -> Result<bool, TransportError> {
    loop {
        match tls.reader().read(scratch) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(n) => {
                raw.extend_from_slice(&scratch[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err("decrypting from peer")(e)),
        }
        if !super::tls::read_records(tls, stream)? {
            return Ok(false);
        }
    }
}

/// What a new connection must establish before it carries frames: TLS, the secret's
/// challenge-response, both or neither (shared by a node's listener and its dialer).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The secrets (`secret_file`).
    pub auth: Option<Arc<AuthContext>>,
    /// TLS (`tls = on`).
    pub tls: Option<Arc<TlsContext>>,
    /// Counts the connections a listener refuses (the metrics), if set.
    pub rejected: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Security {
    fn is_required(&self) -> bool {
        self.auth.is_some() || self.tls.is_some()
    }
}

/// A connected socket on its way to carrying frames: the TLS handshake, then the secret's
/// challenge-response (inside TLS when both are on), each as configured, never blocking.
#[derive(Debug)]
pub struct Establishing {
    stream: TcpStream,
    tls: Option<Box<rustls::Connection>>,
    tls_done: bool,
    auth: Option<Authenticating>,
    /// The peer's proof and the bytes that came after it, once the secret's layer is done.
    authenticated: Option<(Session, bytes::BytesMut)>,
}

impl Establishing {
    /// Starts establishing `stream` as `side` (the dialer is TLS's client).
    pub fn start(
        stream: TcpStream,
        side: Side,
        security: &Security,
    ) -> Result<Self, TransportError> {
        stream
            .set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))?;
        let tls = match &security.tls {
            Some(t) => Some(Box::new(match side {
                Side::Initiator => t.client()?,
                Side::Responder => t.server()?,
            })),
            None => None,
        };
        let auth = match &security.auth {
            Some(a) => Some(a.start(side)?),
            None => None,
        };
        Ok(Establishing {
            stream,
            tls_done: tls.is_none(),
            tls,
            auth,
            authenticated: None,
        })
    }

    /// Moves every layer on; returns whether all are established (then [`Self::finish`]).
    pub fn poll(&mut self) -> Result<bool, TransportError> {
        if !self.tls_done {
            let tls = self.tls.as_mut().ok_or(TransportError::Closed)?;
            if !super::tls::handshake(tls, &mut self.stream)? {
                return Ok(false);
            }
            self.tls_done = true;
        }
        if let Some(auth) = self.auth.as_mut() {
            let done = match self.tls.as_mut() {
                Some(tls) => auth.poll(&mut super::tls::TlsIo {
                    tls: tls.as_mut(),
                    sock: &mut self.stream,
                })?,
                None => auth.poll(&mut self.stream)?,
            };
            let Some(done) = done else {
                return Ok(false);
            };
            self.auth = None;
            self.authenticated = Some(done);
        }
        Ok(true)
    }

    /// The connection, once [`Self::poll`] said every layer is established.
    pub fn finish(self) -> Result<TcpConnection, TransportError> {
        let (session, early) = match self.authenticated {
            Some((s, early)) => (Some(s), early),
            None => (None, bytes::BytesMut::new()),
        };
        TcpConnection::established(self.stream, self.tls, session, &early)
    }

    /// The socket and the `poll(2)` events to wait for.
    fn wait_fd(&self) -> (RawFd, i16) {
        let writing = self.tls.as_ref().is_some_and(|t| t.wants_write())
            || self.auth.as_ref().is_some_and(|a| a.wants_write());
        let events = if writing {
            libc::POLLIN | libc::POLLOUT
        } else {
            libc::POLLIN
        };
        (self.stream.as_raw_fd(), events)
    }
}

/// The backup's listening socket.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
    auth: Option<AcceptAuth>,
    /// Connections taken from the socket (see `Listener::accepted`).
    accepted: u64,
}

impl TcpAcceptor {
    /// Binds `addr` (non-blocking accepts).
    pub fn bind(addr: SocketAddr) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr).map_err(io_err("binding listen address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("setting listener non-blocking"))?;
        Ok(TcpAcceptor {
            listener,
            auth: None,
            accepted: 0,
        })
    }

    /// Every accepted connection must establish `security` (TLS, the secret, or both) within
    /// `timeout` before it is handed over; until then it costs the poller one non-blocking
    /// read per pass, and it holds up nobody.
    pub fn require(&mut self, security: Security, timeout: Duration) -> Result<(), TransportError> {
        if !security.is_required() {
            return Ok(());
        }
        let wake = super::new_epoll().map_err(io_err("creating an epoll instance"))?;
        super::epoll_add(&wake, self.listener.as_raw_fd())
            .map_err(io_err("watching the listener"))?;
        self.auth = Some(AcceptAuth {
            security,
            timeout,
            pending: Vec::new(),
            wake,
        });
        Ok(())
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(io_err("reading listen address"))
    }

    /// Accepts one pending connection, if any (with authentication: one that has proved the
    /// secret; the others wait, or are refused with a log line saying why).
    pub fn try_accept(&mut self) -> Result<Option<TcpConnection>, TransportError> {
        let Some(auth) = self.auth.as_mut() else {
            return match self.listener.accept() {
                Ok((s, _)) => {
                    self.accepted += 1;
                    TcpConnection::new(s).map(Some)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
                Err(e) => Err(io_err("accepting a connection")(e)),
            };
        };
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.accepted += 1;
                    auth.admit(stream, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("accepting a connection")(e)),
            }
        }
        Ok(auth.progress())
    }

    /// Readable when a connection is pending (or, with authentication, when one of the
    /// handshakes in progress has bytes).
    pub fn wait_fd(&self) -> RawFd {
        match &self.auth {
            Some(a) => a.wake.as_raw_fd(),
            None => self.listener.as_raw_fd(),
        }
    }
}

impl AcceptAuth {
    /// Starts authenticating a new connection.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let started = super::epoll_add(&self.wake, stream.as_raw_fd())
            .map_err(io_err("watching a connection"))
            .and_then(|()| Establishing::start(stream, Side::Responder, &self.security));
        let establishing = match started {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot authenticate a connection; closing it");
                return;
            }
        };
        if self.pending.len() >= MAX_AUTHENTICATING {
            let oldest = self.pending.remove(0);
            tracing::warn!(peer = %oldest.peer, "too many connections authenticating at once; dropping the oldest");
        }
        self.pending.push(PendingAuth {
            establishing,
            peer,
            deadline: Instant::now() + self.timeout,
        });
    }

    /// Moves every handshake on; returns the first connection that authenticated.
    fn progress(&mut self) -> Option<TcpConnection> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let why = match p.establishing.poll() {
                Ok(false) if now < p.deadline => {
                    i += 1;
                    continue;
                }
                Ok(false) => "no authentication in time (silent or too slow)".to_string(),
                Ok(true) => {
                    let p = self.pending.swap_remove(i);
                    // The connection leaves this listener's epoll (the poller watches it now).
                    let _ = super::epoll_del(&self.wake, p.establishing.stream.as_raw_fd());
                    match p.establishing.finish() {
                        Ok(c) => {
                            let node = c.authenticated.map(|id| format!("{id:#x}"));
                            tracing::info!(peer = %p.peer, node = ?node, "peer authenticated");
                            return Some(c);
                        }
                        Err(e) => {
                            tracing::warn!(peer = %p.peer, error = %e, "closing an authenticated connection that failed setup");
                            continue;
                        }
                    }
                }
                Err(e) if super::closed_by_peer(&e) => {
                    let p = self.pending.swap_remove(i);
                    tracing::debug!(peer = %p.peer, "closed by its peer before it authenticated (a knock, or a peer that gave up)");
                    continue;
                }
                Err(e) => e.to_string(),
            };
            let p = self.pending.swap_remove(i);
            tracing::warn!(peer = %p.peer, reason = %why, "refusing an unauthenticated connection");
            if let Some(r) = &self.security.rejected {
                // Relaxed: a count for the metrics.
                r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        None
    }
}

impl Listener for TcpAcceptor {
    fn try_accept(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError> {
        Ok(TcpAcceptor::try_accept(self)?.map(|c| Box::new(c) as Box<dyn Connection>))
    }

    fn wait_fd(&self) -> RawFd {
        TcpAcceptor::wait_fd(self)
    }

    fn accepted(&self) -> u64 {
        self.accepted
    }
}

/// A connection attempt in progress: a non-blocking `connect`, so that an unreachable backup
/// (packets dropped, not refused) never stalls the poller (and, under `continue`, the writes it
/// applies meanwhile); then the layers of [`Security`], likewise without blocking.
#[derive(Debug)]
pub struct TcpConnecting {
    socket: Option<socket2::Socket>,
    security: Security,
    /// Connected, establishing TLS and the secret (boxed: the handshakes' state is large).
    establishing: Option<Box<Establishing>>,
}

impl TcpConnecting {
    /// Starts connecting to `addr` (an IP literal resolves without blocking; a host name is
    /// resolved here, once per attempt).
    pub fn start(addr: &str) -> Result<Self, TransportError> {
        let target = addr
            .to_socket_addrs()
            .map_err(io_err("resolving peer address"))?
            .next()
            .ok_or_else(|| TransportError::Io {
                context: "resolving peer address",
                source: io::Error::other("address resolves to nothing"),
            })?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(io_err("creating a socket"))?;
        socket
            .set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))?;
        match socket.connect(&target.into()) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINPROGRESS)
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err("connecting to peer")(e)),
        }
        Ok(TcpConnecting {
            socket: Some(socket),
            security: Security::default(),
            establishing: None,
        })
    }

    /// Once connected, establish `security` before the connection is handed over.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The socket once connected, `Ok(None)` while still in progress, or why it failed.
    pub fn poll_stream(&mut self) -> Result<Option<TcpStream>, TransportError> {
        let Some(socket) = self.socket.as_ref() else {
            return Err(TransportError::Closed);
        };
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; timeout 0 (never blocks).
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n <= 0 || pfd.revents == 0 {
            return Ok(None);
        }
        if let Some(e) = socket.take_error().map_err(io_err("connecting to peer"))? {
            return Err(io_err("connecting to peer")(e));
        }
        let socket = self.socket.take().ok_or(TransportError::Closed)?;
        Ok(Some(TcpStream::from(socket)))
    }
}

impl Connecting for TcpConnecting {
    fn poll(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError> {
        if self.establishing.is_none() {
            let Some(stream) = self.poll_stream()? else {
                return Ok(None);
            };
            if !self.security.is_required() {
                return Ok(Some(Box::new(TcpConnection::new(stream)?)));
            }
            self.establishing = Some(Box::new(Establishing::start(
                stream,
                Side::Initiator,
                &self.security,
            )?));
        }
        let Some(establishing) = self.establishing.as_mut() else {
            return Ok(None);
        };
        if !establishing.poll()? {
            return Ok(None);
        }
        let establishing = self.establishing.take().ok_or(TransportError::Closed)?;
        Ok(Some(Box::new(establishing.finish()?)))
    }

    /// Becomes writable when the connect finishes (either way); then, while establishing,
    /// readable when the peer answers.
    fn wait_fd(&self) -> Option<(RawFd, i16)> {
        if let Some(e) = &self.establishing {
            return Some(e.wait_fd());
        }
        self.socket.as_ref().map(|s| (s.as_raw_fd(), libc::POLLOUT))
    }
}
