//! TCP transport: non-blocking sockets with TCP_NODELAY, busy-polled; many messages per `write`.
//! With a secret, every connection authenticates first (see [`super::auth`]) and then carries
//! its frames in authenticated records.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_proto::auth::{Session, Side};
use mirror_proto::Message;

use super::auth::{AuthContext, Authenticating};
use super::{Connecting, Connection, FrameReader, Listener, SendBatch, TransportError};

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
        })
    }

    /// Wraps a stream whose peer authenticated: frames travel in records from here on; `early`
    /// are the peer's bytes that arrived with the end of the handshake.
    pub fn authenticated(
        stream: TcpStream,
        session: Session,
        early: &[u8],
    ) -> Result<Self, TransportError> {
        let mut c = Self::new(stream)?;
        c.authenticated = Some(session.peer_node_id);
        super::secure(&mut c.tx, &mut c.rx, session, early);
        Ok(c)
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

impl Connection for TcpConnection {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.tx.push(msg)
    }

    fn send_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.tx.push_write(seq, term, offset, data)
    }

    fn flush(&mut self) -> Result<bool, TransportError> {
        self.tx.close_record();
        while self.tx.pending() > 0 {
            match self.stream.write(self.tx.unsent()) {
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
        loop {
            while out.len() - before < max {
                match self.rx.next()? {
                    Some(m) => out.push(m),
                    None => break,
                }
            }
            if out.len() - before >= max {
                break;
            }
            let raw = self.rx.raw();
            if raw.capacity() - raw.len() < RECV_CHUNK / 4 {
                raw.reserve(RECV_CHUNK);
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
            match n {
                0 => return Err(TransportError::Closed),
                n if n > 0 => {
                    let raw = self.rx.raw();
                    let len = raw.len();
                    // SAFETY: recv initialized bytes len..len+n (n <= spare capacity, checked by
                    // the kernel against the length we passed).
                    unsafe { raw.set_len(len + n as usize) };
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => {}
                        _ => return Err(io_err("receiving from peer")(e)),
                    }
                }
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
    stream: TcpStream,
    peer: SocketAddr,
    auth: Authenticating,
    deadline: Instant,
}

/// A listener's authentication: the secrets, the handshakes in progress, and an epoll
/// instance over the listener and their sockets (the poller sleeps on one descriptor).
#[derive(Debug)]
struct AcceptAuth {
    ctx: Arc<AuthContext>,
    timeout: Duration,
    pending: Vec<PendingAuth>,
    wake: OwnedFd,
}

/// The backup's listening socket.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
    auth: Option<AcceptAuth>,
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
        })
    }

    /// Every accepted connection must authenticate with `ctx`'s secrets within `timeout`
    /// before it is handed over; until then it costs the poller one non-blocking read per pass.
    pub fn require_auth(
        &mut self,
        ctx: Arc<AuthContext>,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let wake = super::new_epoll().map_err(io_err("creating an epoll instance"))?;
        super::epoll_add(&wake, self.listener.as_raw_fd())
            .map_err(io_err("watching the listener"))?;
        self.auth = Some(AcceptAuth {
            ctx,
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
                Ok((s, _)) => TcpConnection::new(s).map(Some),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
                Err(e) => Err(io_err("accepting a connection")(e)),
            };
        };
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => auth.admit(stream, peer),
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
        let started = stream
            .set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))
            .and_then(|()| {
                super::epoll_add(&self.wake, stream.as_raw_fd())
                    .map_err(io_err("watching a connection"))
            })
            .and_then(|()| self.ctx.start(Side::Responder));
        let auth = match started {
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
            stream,
            peer,
            auth,
            deadline: Instant::now() + self.timeout,
        });
    }

    /// Moves every handshake on; returns the first connection that authenticated.
    fn progress(&mut self) -> Option<TcpConnection> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let why = match p.auth.poll(&mut p.stream) {
                Ok(None) if now < p.deadline => {
                    i += 1;
                    continue;
                }
                Ok(None) => "no authentication in time (silent or too slow)".to_string(),
                Ok(Some((session, early))) => {
                    let p = self.pending.swap_remove(i);
                    let peer_id = session.peer_node_id;
                    match TcpConnection::authenticated(p.stream, session, &early) {
                        Ok(c) => {
                            tracing::info!(peer = %p.peer, node = format_args!("{peer_id:#x}"), "peer authenticated");
                            return Some(c);
                        }
                        Err(e) => {
                            tracing::warn!(peer = %p.peer, error = %e, "closing an authenticated connection that failed setup");
                            continue;
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            let p = self.pending.swap_remove(i);
            tracing::warn!(peer = %p.peer, reason = %why, "refusing an unauthenticated connection");
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
}

/// A connection attempt in progress: a non-blocking `connect`, so that an unreachable backup
/// (packets dropped, not refused) never stalls the poller (and, under `continue`, the writes it
/// applies meanwhile).
#[derive(Debug)]
pub struct TcpConnecting {
    socket: Option<socket2::Socket>,
    auth: Option<Arc<AuthContext>>,
    /// Connected, authenticating.
    authenticating: Option<(TcpStream, Authenticating)>,
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
            auth: None,
            authenticating: None,
        })
    }

    /// Once connected, authenticate with `ctx`'s secrets before the connection is handed over.
    pub fn with_auth(mut self, ctx: Option<Arc<AuthContext>>) -> Self {
        self.auth = ctx;
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
        if self.authenticating.is_none() {
            let Some(stream) = self.poll_stream()? else {
                return Ok(None);
            };
            let Some(ctx) = self.auth.as_ref() else {
                return Ok(Some(Box::new(TcpConnection::new(stream)?)));
            };
            stream
                .set_nonblocking(true)
                .map_err(io_err("setting socket non-blocking"))?;
            self.authenticating = Some((stream, ctx.start(Side::Initiator)?));
        }
        let Some((stream, auth)) = self.authenticating.as_mut() else {
            return Ok(None);
        };
        let Some((session, early)) = auth.poll(stream)? else {
            return Ok(None);
        };
        let (stream, _) = self.authenticating.take().ok_or(TransportError::Closed)?;
        Ok(Some(Box::new(TcpConnection::authenticated(
            stream, session, &early,
        )?)))
    }

    /// Becomes writable when the connect finishes (either way); then, while authenticating,
    /// readable when the peer answers.
    fn wait_fd(&self) -> Option<(RawFd, i16)> {
        if let Some((stream, auth)) = &self.authenticating {
            let events = if auth.wants_write() {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            };
            return Some((stream.as_raw_fd(), events));
        }
        self.socket.as_ref().map(|s| (s.as_raw_fd(), libc::POLLOUT))
    }
}
