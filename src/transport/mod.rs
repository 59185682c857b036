//! Transports: how framed protocol messages travel between the nodes.
//!
//! The poller drives one [`Connection`] at a time. The interface is shaped for busy polling and
//! batching, so that TCP and RDMA fit it alike: `send` only queues a message into the current
//! batch, `flush` hands the batch to the network (one system call or one posted work request per
//! burst), and `poll_recv` drains whatever has arrived without blocking. When the poller has
//! nothing to do for a while it sleeps on [`Connection::wait_fd`] (a socket, or a completion
//! channel for RDMA) together with its own wake-up eventfd.

#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;

use std::os::fd::RawFd;

use mirror_proto::{Message, WireError};
use thiserror::Error;

/// A connection failure. Any of these ends the connection; the engine's ordinary reconnection and
/// recovery take over.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The peer sent bytes that are not a valid frame.
    #[error("peer sent invalid data: {0}")]
    Wire(#[from] WireError),
    /// An OS-level error on the connection.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The peer does not drain what we send.
    #[error("send buffer over {limit} bytes: peer is not reading")]
    Backlog {
        /// The limit.
        limit: usize,
    },
}

/// The backup's listening endpoint.
pub trait Listener: Send {
    /// Accepts one pending connection, if any (never blocks).
    fn try_accept(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError>;
    /// A file descriptor that becomes readable when a connection may be pending.
    fn wait_fd(&self) -> RawFd;
}

/// An outgoing connection attempt in progress; never blocks, so a primary keeps taking writes
/// (policy `continue`) while its backup is slow to answer. The caller bounds it with its
/// handshake timeout.
pub trait Connecting: Send {
    /// The connection once established, `Ok(None)` while still in progress, or why it failed.
    fn poll(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError>;
    /// A descriptor and the `poll(2)` events that signal progress, if there is one to wait on.
    fn wait_fd(&self) -> Option<(RawFd, i16)>;
}

/// One established connection to the peer.
pub trait Connection: Send {
    /// Queues `msg` into the current send batch (no system call).
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;
    /// Queues a `Write` message built from borrowed parts (no intermediate allocation).
    fn send_write(&mut self, seq: u64, offset: u64, data: &[u8]) -> Result<(), TransportError>;
    /// Hands the batch to the network as far as it takes it. Returns whether nothing is left queued.
    fn flush(&mut self) -> Result<bool, TransportError>;
    /// Bytes queued and not yet handed to the network.
    fn pending_send_bytes(&self) -> usize;
    /// Receives without blocking; appends complete messages to `out` (at most about `max`).
    /// Returns how many it appended.
    fn poll_recv(&mut self, out: &mut Vec<Message>, max: usize) -> Result<usize, TransportError>;
    /// A file descriptor that becomes readable when `poll_recv` may have work.
    fn wait_fd(&self) -> RawFd;
    /// How a sender held back by flow control learns it may go on: a descriptor and the
    /// `poll(2)` events to wait for (TCP: the socket, `POLLOUT`), or `None` when room is only
    /// seen by polling (RDMA: the peer's credits land in memory and raise no event).
    fn send_ready_fd(&self) -> Option<(RawFd, i16)>;
    /// A one-line description of the peer, for logs.
    fn peer(&self) -> String;
}
