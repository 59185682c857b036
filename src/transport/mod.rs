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

use bytes::BytesMut;
use mirror_proto::{encode_write, Message, WireError};
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

/// Unsent bytes beyond which the peer is considered stuck (it does not read).
const SEND_BACKLOG_LIMIT: usize = 512 << 20;

/// The frames a connection has encoded and how far the network has taken them: one batch,
/// handed over by `flush`, whatever carries it (a socket, RDMA writes).
#[derive(Debug)]
pub(crate) struct SendBatch {
    buf: BytesMut,
    sent: usize,
}

impl SendBatch {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        SendBatch {
            buf: BytesMut::with_capacity(bytes),
            sent: 0,
        }
    }

    fn check_backlog(&self) -> Result<(), TransportError> {
        if self.pending() > SEND_BACKLOG_LIMIT {
            return Err(TransportError::Backlog {
                limit: SEND_BACKLOG_LIMIT,
            });
        }
        Ok(())
    }

    /// Encodes `msg` into the batch (refused when the peer has stopped taking bytes).
    pub(crate) fn push(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.check_backlog()?;
        msg.encode(&mut self.buf);
        Ok(())
    }

    /// Encodes a `Write` from borrowed parts into the batch.
    pub(crate) fn push_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.check_backlog()?;
        encode_write(seq, term, offset, data, &mut self.buf);
        Ok(())
    }

    /// The bytes the network has not taken yet.
    pub(crate) fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    /// The network took `n` more bytes.
    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.pending());
        self.sent += n;
    }

    /// Bytes not taken yet.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Whether the network took everything; if so the batch starts empty again.
    pub(crate) fn settle(&mut self) -> bool {
        if self.pending() == 0 {
            self.buf.clear();
            self.sent = 0;
            true
        } else {
            false
        }
    }
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
    fn send_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError>;
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
