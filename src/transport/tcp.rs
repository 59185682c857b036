//! TCP transport: non-blocking sockets with TCP_NODELAY, busy-polled; many messages per `write`.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::BytesMut;
use mirror_proto::Message;

use super::{Connecting, Connection, Listener, SendBatch, TransportError};

/// Bytes read per `read` call, and the receive buffer's growth step.
const RECV_CHUNK: usize = 256 << 10;

/// A TCP connection to the peer.
#[derive(Debug)]
pub struct TcpConnection {
    stream: TcpStream,
    peer: SocketAddr,
    tx: SendBatch,
    rx: BytesMut,
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
            rx: BytesMut::with_capacity(RECV_CHUNK),
        })
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
                match Message::decode(&mut self.rx)? {
                    Some(m) => out.push(m),
                    None => break,
                }
            }
            if out.len() - before >= max {
                break;
            }
            if self.rx.capacity() - self.rx.len() < RECV_CHUNK / 4 {
                self.rx.reserve(RECV_CHUNK);
            }
            let spare = self.rx.spare_capacity_mut();
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
                    let len = self.rx.len();
                    // SAFETY: recv initialized bytes len..len+n (n <= spare capacity, checked by
                    // the kernel against the length we passed).
                    unsafe { self.rx.set_len(len + n as usize) };
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
}

/// The backup's listening socket.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
}

impl TcpAcceptor {
    /// Binds `addr` (non-blocking accepts).
    pub fn bind(addr: SocketAddr) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr).map_err(io_err("binding listen address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("setting listener non-blocking"))?;
        Ok(TcpAcceptor { listener })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(io_err("reading listen address"))
    }

    /// Accepts one pending connection, if any.
    pub fn try_accept(&self) -> Result<Option<TcpConnection>, TransportError> {
        match self.listener.accept() {
            Ok((s, _)) => TcpConnection::new(s).map(Some),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(io_err("accepting a connection")(e)),
        }
    }

    /// Readable when a connection is pending.
    pub fn wait_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
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
        })
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
        match self.poll_stream()? {
            Some(stream) => Ok(Some(Box::new(TcpConnection::new(stream)?))),
            None => Ok(None),
        }
    }

    /// Becomes writable when the attempt finishes (either way).
    fn wait_fd(&self) -> Option<(RawFd, i16)> {
        self.socket.as_ref().map(|s| (s.as_raw_fd(), libc::POLLOUT))
    }
}
