//! Transports: how framed protocol messages travel between the nodes.
//!
//! The poller drives one [`Connection`] at a time. The interface is shaped for busy polling and
//! batching, so that TCP and RDMA fit it alike: `send` only queues a message into the current
//! batch, `flush` hands the batch to the network (one system call or one posted work request per
//! burst), and `poll_recv` drains whatever has arrived without blocking. When the poller has
//! nothing to do for a while it sleeps on [`Connection::wait_fd`] (a socket, or a completion
//! channel for RDMA) together with its own wake-up eventfd.

pub mod auth;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;
pub mod tls;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bytes::{BufMut, Bytes, BytesMut};
use mirror_proto::auth::{
    AuthError, RecordOpener, RecordSealer, Session, RECORD_HEADER_LEN, RECORD_TARGET_BODY,
};
use mirror_proto::{encode_chunk_data, encode_write, write_header, Message, Payload, WireError};
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
    /// Authentication failed, or an authenticated stream carried a forged or altered record.
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    /// TLS failed (a certificate refused, a record that does not decrypt, …).
    #[error("TLS: {}", tls::describe(.0))]
    Tls(rustls::Error),
}

/// Unsent bytes beyond which the peer is considered stuck (it does not read).
const SEND_BACKLOG_LIMIT: usize = 512 << 20;

/// Bytes taken by the network beyond which a batch that is not empty yet drops them (see
/// `SendBatch::reclaim_sent`).
const SEND_COMPACT_MIN: usize = 256 << 10;

/// The frames a connection has encoded and how far the network has taken them: one batch,
/// handed over by `flush`, whatever carries it (a socket, RDMA writes). On an authenticated
/// connection the frames are encoded straight into records (a length reserved in front, the
/// tag appended when the record closes), so sealing copies nothing.
///
/// A write's payload may also follow the batch's bytes without being copied into them
/// ([`SendBatch::push_write_shared`], TCP in the clear): the frames to send are then the batch's
/// bytes with each shared payload inserted at its position, handed to the network in vectored
/// writes ([`SendBatch::unsent_parts`]).
#[derive(Debug)]
pub(crate) struct SendBatch {
    buf: BytesMut,
    sent: usize,
    sealer: Option<RecordSealer>,
    /// Where the record being filled starts (its reserved length), if one is open.
    open_record: Option<usize>,
    /// Shared payloads not taken yet, in order; each follows `buf[..at]` (positions never
    /// below `sent`, and not decreasing).
    shared: VecDeque<SharedPayload>,
    /// Bytes of the first shared payload the network took already.
    shared_taken: usize,
    /// Bytes of all shared payloads the network has not taken.
    shared_pending: usize,
}

/// A payload in a [`SendBatch`] by reference, after the batch's first `at` bytes.
#[derive(Debug)]
struct SharedPayload {
    at: usize,
    bytes: Bytes,
}

impl SendBatch {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        SendBatch {
            buf: BytesMut::with_capacity(bytes),
            sent: 0,
            sealer: None,
            open_record: None,
            shared: VecDeque::new(),
            shared_taken: 0,
            shared_pending: 0,
        }
    }

    /// From now on every frame travels in an authenticated record.
    pub(crate) fn seal_with(&mut self, sealer: RecordSealer) {
        debug_assert!(self.buf.is_empty(), "sealing starts before the first frame");
        self.sealer = Some(sealer);
    }

    /// Before a frame: opens a record if frames are sealed and none is open.
    fn begin_frame(&mut self) {
        if self.sealer.is_some() && self.open_record.is_none() {
            self.open_record = Some(self.buf.len());
            self.buf.put_bytes(0, RECORD_HEADER_LEN);
        }
    }

    /// After a frame: closes the record once it is large enough (records hold whole frames).
    fn end_frame(&mut self) {
        if let Some(start) = self.open_record {
            if self.buf.len() - start - RECORD_HEADER_LEN >= RECORD_TARGET_BODY {
                self.close_record();
            }
        }
    }

    /// Seals the open record, if any, so that everything encoded can be sent. Transports call
    /// it at the start of `flush`.
    pub(crate) fn close_record(&mut self) {
        if let (Some(sealer), Some(start)) = (self.sealer.as_mut(), self.open_record.take()) {
            sealer.seal(&mut self.buf, start);
        }
    }

    /// Refuses a push once the peer stopped taking bytes, and makes room for it.
    fn before_push(&mut self) -> Result<(), TransportError> {
        self.check_backlog()?;
        self.reclaim_sent();
        Ok(())
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
        self.before_push()?;
        self.begin_frame();
        msg.encode(&mut self.buf);
        self.end_frame();
        Ok(())
    }

    /// Encodes a `Write` from borrowed parts (`data_crc`: the crc32c of `data`) into the batch.
    pub(crate) fn push_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        data_crc: u32,
    ) -> Result<(), TransportError> {
        self.before_push()?;
        self.begin_frame();
        encode_write(seq, term, offset, data, data_crc, &mut self.buf);
        self.end_frame();
        Ok(())
    }

    /// Queues a `Write` whose payload is not copied: its header goes into the batch and the
    /// payload follows it by reference (kept alive until the network took it). Only for frames
    /// in the clear, sent with [`Self::unsent_parts`].
    pub(crate) fn push_write_shared(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &Payload,
    ) -> Result<(), TransportError> {
        debug_assert!(!self.sealed(), "a sealed record holds its frames' bytes");
        self.before_push()?;
        self.buf
            .put_slice(&write_header(seq, term, offset, data, data.crc()));
        self.shared.push_back(SharedPayload {
            at: self.buf.len(),
            bytes: data.bytes().clone(),
        });
        self.shared_pending += data.len();
        Ok(())
    }

    /// Encodes a `ChunkData` from borrowed bytes (a chunk lent by the region) into the batch.
    pub(crate) fn push_chunk_data(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.before_push()?;
        self.begin_frame();
        encode_chunk_data(offset, data, &mut self.buf);
        self.end_frame();
        Ok(())
    }

    /// Whether frames can go to the network as they are, bypassing the batch: nothing is
    /// queued before them, and they are not sealed into records.
    pub(crate) fn may_bypass(&self) -> bool {
        !self.sealed() && self.pending() == 0
    }

    /// Whether frames are sealed into authenticated records (they never bypass the batch).
    pub(crate) fn sealed(&self) -> bool {
        self.sealer.is_some()
    }

    /// Queues what a write that bypassed the batch did not take: the frame `parts` less its
    /// first `taken` bytes (see [`Self::may_bypass`]).
    pub(crate) fn push_untaken(
        &mut self,
        parts: &[&[u8]],
        mut taken: usize,
    ) -> Result<(), TransportError> {
        debug_assert!(self.may_bypass());
        self.before_push()?;
        for part in parts {
            let skip = taken.min(part.len());
            taken -= skip;
            self.buf.extend_from_slice(&part[skip..]);
        }
        Ok(())
    }

    /// The bytes ready for the network and not taken yet (not the open record's), when no
    /// payload is shared (see [`Self::unsent_parts`]).
    pub(crate) fn unsent(&self) -> &[u8] {
        debug_assert!(self.shared.is_empty(), "shared payloads are sent in parts");
        &self.buf[self.sent..self.open_record.unwrap_or(self.buf.len())]
    }

    /// Whether a payload is shared: the unsent bytes are then [`Self::unsent_parts`].
    pub(crate) fn has_shared(&self) -> bool {
        !self.shared.is_empty()
    }

    /// The bytes ready for the network and not taken yet, in order, as up to `max` slices (the
    /// batch's bytes with the shared payloads between them): what a vectored write takes.
    pub(crate) fn unsent_parts<'a>(&'a self, max: usize, out: &mut Vec<std::io::IoSlice<'a>>) {
        debug_assert!(
            self.open_record.is_none(),
            "shared payloads are never sealed"
        );
        let mut pos = self.sent;
        for (i, s) in self.shared.iter().enumerate() {
            if out.len() + 2 > max {
                return;
            }
            if s.at > pos {
                out.push(std::io::IoSlice::new(&self.buf[pos..s.at]));
                pos = s.at;
            }
            let skip = if i == 0 { self.shared_taken } else { 0 };
            out.push(std::io::IoSlice::new(&s.bytes[skip..]));
        }
        if pos < self.buf.len() && out.len() < max {
            out.push(std::io::IoSlice::new(&self.buf[pos..]));
        }
    }

    /// The network took `n` more bytes. Only indexes move: the unsent bytes stay where they
    /// are until the next push (the RDMA transport posts inline sends from them).
    pub(crate) fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.pending());
        while n > 0 {
            match self.shared.front() {
                // The first shared payload is next: the batch's bytes before it were taken.
                Some(s) if s.at == self.sent => {
                    let took = n.min(s.bytes.len() - self.shared_taken);
                    self.shared_taken += took;
                    self.shared_pending -= took;
                    n -= took;
                    if self.shared_taken == s.bytes.len() {
                        self.shared.pop_front();
                        self.shared_taken = 0;
                    }
                }
                Some(s) => {
                    let took = n.min(s.at - self.sent);
                    self.sent += took;
                    n -= took;
                }
                None => {
                    self.sent += n;
                    n = 0;
                }
            }
        }
    }

    /// Before a push: drops the bytes the network took from the front of the batch once they
    /// are [`SEND_COMPACT_MIN`] or more and no fewer than what is left, moving what is left to
    /// the front (so the copying costs at most what the sending did). A batch empties only
    /// when the network took all of it: a sender that keeps it non-empty (a catch-up streaming
    /// into a full socket) would otherwise grow it by everything it ever sent, a new page
    /// faulted in every 4 KiB (a fifth of a primary's catch-up) and the whole stream resident.
    fn reclaim_sent(&mut self) {
        if self.sent < SEND_COMPACT_MIN || self.sent < self.pending() {
            return;
        }
        let left = self.buf.len() - self.sent;
        self.buf.copy_within(self.sent.., 0);
        self.buf.truncate(left);
        if let Some(start) = self.open_record.as_mut() {
            // The open record is behind everything ready for the network, taken or not.
            debug_assert!(*start >= self.sent);
            *start -= self.sent;
        }
        for s in &mut self.shared {
            // Shared payloads follow bytes not taken yet (or the taken ones' end).
            s.at -= self.sent;
        }
        self.sent = 0;
    }

    /// Bytes not taken yet.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.sent + self.shared_pending
    }

    /// Whether the network took everything; if so the batch starts empty again.
    pub(crate) fn settle(&mut self) -> bool {
        if self.pending() == 0 {
            debug_assert!(self.shared.is_empty());
            self.buf.clear();
            self.sent = 0;
            true
        } else {
            false
        }
    }
}

/// The receiving half: bytes from the network in, frames out. On an authenticated connection
/// each record's tag is checked before any of its frames is decoded.
#[derive(Debug)]
pub(crate) struct FrameReader {
    raw: BytesMut,
    opener: Option<RecordOpener>,
    /// The verified body of the current record, not decoded yet.
    plain: BytesMut,
}

impl FrameReader {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        FrameReader {
            raw: BytesMut::with_capacity(bytes),
            opener: None,
            plain: BytesMut::new(),
        }
    }

    /// From now on the peer's frames arrive in records; `early` are bytes that arrived with
    /// the end of the handshake.
    pub(crate) fn open_with(&mut self, opener: RecordOpener, early: &[u8]) {
        self.opener = Some(opener);
        self.raw.extend_from_slice(early);
    }

    /// Where the transport appends what arrives.
    pub(crate) fn raw(&mut self) -> &mut BytesMut {
        &mut self.raw
    }

    /// The next complete frame, if one has arrived (and, when authenticated, been verified).
    pub(crate) fn next(&mut self) -> Result<Option<Message>, TransportError> {
        let Some(opener) = self.opener.as_mut() else {
            return Ok(Message::decode(&mut self.raw)?);
        };
        loop {
            if !self.plain.is_empty() {
                return match Message::decode(&mut self.plain)? {
                    Some(m) => Ok(Some(m)),
                    None => Err(AuthError::RecordSplitsFrame {
                        counter: opener.counter() - 1,
                    }
                    .into()),
                };
            }
            match opener.open(&mut self.raw)? {
                Some(body) => self.plain = body,
                None => return Ok(None),
            }
        }
    }
}

/// Sets up a connection's two halves for an authenticated session.
pub(crate) fn secure(tx: &mut SendBatch, rx: &mut FrameReader, session: Session, early: &[u8]) {
    tx.seal_with(session.sealer);
    rx.open_with(session.opener, early);
}

/// Wraps a descriptor a system call just returned (negative: the call failed).
pub(crate) fn new_fd(fd: i32) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking eventfd: a descriptor that `signal` makes readable and `drain` makes
/// unreadable again (the poller's wake-up, an RDMA connection's kick, an event subscription).
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; the result is checked by `new_fd`.
        new_fd(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }).map(EventFd)
    }

    /// Makes it readable. A failure can only be a full counter (EAGAIN), which is readable
    /// already: ignored.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own open eventfd.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Makes it unreadable (a no-op when it is not readable: the read fails with EAGAIN).
    pub(crate) fn drain(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking eventfd.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A new epoll instance (close-on-exec).
pub(crate) fn new_epoll() -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call with valid flags.
    new_fd(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// Stops watching `fd` in the epoll instance `ep`.
pub(crate) fn epoll_del(ep: &OwnedFd, fd: RawFd) -> std::io::Result<()> {
    // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
    let rc = unsafe {
        libc::epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Watches `fd` for readability in the epoll instance `ep` (a closed descriptor leaves it by
/// itself).
pub(crate) fn epoll_add(ep: &OwnedFd, fd: RawFd) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: both descriptors are open; `ev` is a live epoll_event.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The backup's listening endpoint.
pub trait Listener: Send {
    /// Accepts one pending connection, if any (never blocks).
    fn try_accept(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError>;
    /// A file descriptor that becomes readable when a connection may be pending.
    fn wait_fd(&self) -> RawFd;
    /// Connections taken from the socket so far, counted before any handshake: a returning
    /// backup's knock (a connection closed at once) shows here and nowhere else.
    fn accepted(&self) -> u64;
}

/// Whether an incoming connection that failed before it was established was closed by its
/// peer: a returning backup's knock (it connects and closes at once, see `Poller::knock`), or a
/// peer that gave up. Logged quietly, not as a refusal.
pub(crate) fn closed_by_peer(e: &TransportError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e {
        TransportError::Closed => true,
        // The handshakes (TLS, the secret's) report an early close as an I/O error; a knock
        // that closes with our first handshake bytes unread resets the connection.
        TransportError::Io { source, .. } => {
            matches!(source.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
        }
        _ => false,
    }
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

/// A `Write` message's parts, borrowed (a queued record's, for [`Connection::send_writes`]).
#[derive(Debug, Clone, Copy)]
pub struct BorrowedWrite<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// Its term.
    pub term: u64,
    /// Where it goes in the region.
    pub offset: u64,
    /// Its payload.
    pub data: &'a [u8],
    /// The crc32c of `data` (the record's, from its verification).
    pub data_crc: u32,
}

/// One established connection to the peer.
pub trait Connection: Send {
    /// Queues `msg` into the current send batch (no system call).
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;
    /// Queues a `Write` message built from borrowed parts (no intermediate allocation);
    /// `data_crc` is the crc32c of `data` (a queued record's, from its verification).
    fn send_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        data_crc: u32,
    ) -> Result<(), TransportError>;
    /// Sends `Write` messages built from borrowed parts (a catch-up's queued records), in
    /// order: queued like [`Connection::send_write`], or handed to the network at once where
    /// [`Connection::sends_in_place`] says so (their bytes then copied by the kernel alone).
    fn send_writes(&mut self, writes: &[BorrowedWrite<'_>]) -> Result<(), TransportError> {
        for w in writes {
            self.send_write(w.seq, w.term, w.offset, w.data, w.data_crc)?;
        }
        Ok(())
    }
    /// Whether [`Connection::send_writes`] hands its writes to the network straight from the
    /// caller's memory while nothing is queued before them (TCP with frames in the clear). A
    /// streaming sender (a catch-up) then waits for the network to take what is queued before
    /// it sends more, rather than queue more: what the batch holds is copied once more.
    fn sends_in_place(&self) -> bool {
        false
    }
    /// Queues a `ChunkData` message of borrowed bytes (a chunk lent by the region in place), or
    /// hands it to the network at once where it can (see `SendBatch::may_bypass`).
    fn send_chunk_data(&mut self, offset: u64, data: &[u8]) -> Result<(), TransportError>;
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
    /// The node id the peer proved with the shared secret (`None`: not authenticated). Its
    /// Hello must carry the same id.
    fn authenticated_peer(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests;
