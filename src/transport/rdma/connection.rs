//! The connection: [`RdmaConnection`] (a [`Connection`]), [`RdmaConnecting`] (the primary's
//! non-blocking setup, a [`Connecting`]) and [`RdmaAcceptor`] (the backup's [`Listener`]). They
//! tie the verbs objects (`verbs.rs`), the setup record (`setup.rs`) and the credit arithmetic
//! (`credit.rs`) together, with the TCP setup and liveness channel and the epoll descriptor the
//! poller sleeps on.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use mirror_proto::auth::{
    RecordOpener, RecordSealer, Session, Side, RECORD_HEADER_LEN, RECORD_TAG_LEN,
};
use mirror_proto::Message;
use rdma_sys::ibv_wc;

use super::super::auth::{AuthContext, Authenticating};
use super::super::tcp::TcpConnecting;
use super::super::{
    new_epoll, secure, Connecting, Connection, EventFd, FrameReader, Listener, SendBatch,
    TransportError,
};
use super::credit::{Credit, RecvCredits, SendCredits, CREDIT_LEN};
use super::setup::{gid_text, Info, INFO_LEN};
use super::verbs::{
    probe, status_text, zeroed_wc, zeroed_wcs, Arrival, Parts, RecvQueue, SendQueue, Verbs,
    CQ_BATCH, CREDIT_WR, DATA_WRS, RECV_DEPTH,
};
use super::{RdmaError, RdmaSettings, RING_BYTES};

/// The liveness socket is checked every this many receive polls (and after every sleep).
const LIVENESS_EVERY: u32 = 256;
/// How long either side waits for the other's setup record.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connect timeout of the setup channel.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { context, source }
}

/// One established RDMA connection to the peer.
pub struct RdmaConnection {
    v: Verbs,
    /// The setup connection, kept as the liveness channel (the peer never writes to it again).
    tcp: TcpStream,
    /// epoll over the completion channel, `tcp` and `kick`.
    wake: OwnedFd,
    /// Made readable by `wait_fd` when it found completions that raise no event.
    kick: EventFd,
    peer_desc: String,
    // The peer's ring.
    peer_ring: u64,
    // Send side: encoded frames not yet written, the send queue, credits.
    tx: SendBatch,
    /// Slot 0: credit write; 1 and 2: data writes (the second after a wrap). Pre-built.
    sq: SendQueue,
    send: SendCredits,
    // Receive side.
    rq: RecvQueue,
    recv: RecvCredits,
    rx: FrameReader,
    /// The node id the peer proved on the setup channel (none: not authenticated).
    authenticated: Option<u64>,
    wcs: Box<[ibv_wc]>,
    polls: u32,
    // Touched by `wait_fd(&self)`.
    stash: RefCell<Vec<Arrival>>,
    kicked: Cell<bool>,
    notify_armed: Cell<bool>,
    check_peer: Cell<bool>,
}

impl fmt::Debug for RdmaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaConnection")
            .field("peer", &self.peer_desc)
            .field("sent_bytes", &self.send.sent_bytes())
            .field("arrived_bytes", &self.recv.arrived_bytes())
            .finish_non_exhaustive()
    }
}

/// Bytes of the setup record on the wire: on an authenticated channel it travels in a record
/// (its tag makes the QP number, ring address and key it announces trustworthy).
fn setup_wire_len(sealed: bool) -> usize {
    if sealed {
        RECORD_HEADER_LEN + INFO_LEN + RECORD_TAG_LEN
    } else {
        INFO_LEN
    }
}

/// Our setup record as it travels.
fn encode_setup(info: &Info, sealer: Option<&mut RecordSealer>) -> BytesMut {
    let mut b = BytesMut::with_capacity(setup_wire_len(true));
    match sealer {
        Some(sealer) => {
            b.put_bytes(0, RECORD_HEADER_LEN);
            b.extend_from_slice(&info.encode());
            sealer.seal(&mut b, 0);
        }
        None => b.extend_from_slice(&info.encode()),
    }
    b
}

/// The peer's setup record from exactly [`setup_wire_len`] bytes (verified first when sealed).
fn decode_setup(
    got: &mut BytesMut,
    opener: Option<&mut RecordOpener>,
) -> Result<Info, TransportError> {
    let body = match opener {
        Some(opener) => opener.open(got)?.ok_or(RdmaError::PeerSetup(
            "the sealed setup record is incomplete".into(),
        ))?,
        None => got.split_to(INFO_LEN),
    };
    let record: &[u8; INFO_LEN] = body[..].try_into().map_err(|_| {
        RdmaError::PeerSetup(format!(
            "setup record of {} bytes, expected {INFO_LEN}",
            body.len()
        ))
    })?;
    Ok(Info::decode(record)?)
}

/// The shared descriptor helpers' errors, as an RDMA setup error naming the call.
fn os(op: &'static str) -> impl FnOnce(io::Error) -> RdmaError {
    move |source| RdmaError::Verbs { op, source }
}

fn epoll_add(ep: &OwnedFd, fd: RawFd) -> Result<(), RdmaError> {
    super::super::epoll_add(ep, fd).map_err(os("epoll_ctl"))
}

impl RdmaConnection {
    /// Connects to the backup at `addr` (primary side), blocking until the QP is ready or the
    /// setup timeouts pass. The engine uses the non-blocking [`RdmaConnecting`] instead.
    pub fn connect(addr: &str, s: &RdmaSettings) -> Result<Self, TransportError> {
        let mut attempt = RdmaConnecting::start(addr, s.clone())?;
        let deadline = Instant::now() + CONNECT_TIMEOUT + EXCHANGE_TIMEOUT;
        loop {
            if let Some(c) = attempt.poll_connection()? {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RdmaError::SetupTimeout.into());
            }
            if let Some((fd, events)) = Connecting::wait_fd(&attempt) {
                let mut pfd = libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                };
                let ms = (deadline - now).as_millis().clamp(1, 100) as i32;
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
        }
    }

    /// Backup side: the primary's setup record arrived on `tcp`; answer and go to RTS.
    fn accept(
        mut tcp: TcpStream,
        peer: Info,
        s: &RdmaSettings,
        mut session: Option<Session>,
    ) -> Result<Self, TransportError> {
        let parts = Parts::new(Verbs::prepare(s)?)?;
        let psn = fastrand::u32(..0x100_0000);
        // RTR before answering: the primary writes only after it has our record.
        parts.v.connect_qp(&peer, psn)?;
        tcp.set_nonblocking(false)
            .map_err(io_err("setting socket blocking"))?;
        tcp.set_write_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(io_err("setting a socket timeout"))?;
        let record = encode_setup(&parts.v.info(psn), session.as_mut().map(|s| &mut s.sealer));
        tcp.write_all(&record)
            .map_err(io_err("sending RDMA setup to peer"))?;
        RdmaConnection::finish(parts, tcp, peer, session)
    }

    fn finish(
        p: Parts,
        tcp: TcpStream,
        peer: Info,
        session: Option<Session>,
    ) -> Result<Self, TransportError> {
        tcp.set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))?;
        let wake = new_epoll().map_err(os("epoll_create1"))?;
        let kick = EventFd::new().map_err(os("eventfd"))?;
        epoll_add(&wake, p.v.channel_fd())?;
        epoll_add(&wake, tcp.as_raw_fd())?;
        epoll_add(&wake, kick.as_raw_fd())?;
        let tcp_peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let peer_desc = format!(
            "rdma://{}/{} (qp {:#x} -> {:#x}, GID {})",
            p.v.device(),
            tcp_peer,
            p.v.qp_num(),
            peer.qpn,
            gid_text(&peer.gid)
        );
        let Parts { v, mut sq, rq } = p;
        sq.build(&v, peer.rkey, peer.credit_addr);
        let mut tx = SendBatch::with_capacity(256 << 10);
        let mut rx = FrameReader::with_capacity(256 << 10);
        let authenticated = session.as_ref().map(|s| s.peer_node_id);
        if let Some(session) = session {
            secure(&mut tx, &mut rx, session, &[]);
        }
        Ok(RdmaConnection {
            v,
            tcp,
            wake,
            kick,
            peer_desc,
            peer_ring: peer.ring_addr,
            tx,
            sq,
            send: SendCredits::new(peer.ring_len, u64::from(peer.recv_depth)),
            rq,
            recv: RecvCredits::new(RING_BYTES, u64::from(RECV_DEPTH)),
            rx,
            authenticated,
            wcs: zeroed_wcs(CQ_BATCH),
            polls: 0,
            stash: RefCell::new(Vec::with_capacity(CQ_BATCH)),
            kicked: Cell::new(false),
            notify_armed: Cell::new(false),
            check_peer: Cell::new(false),
        })
    }

    /// Reaps send completions: any error fails the connection; a success retires every work
    /// request up to the signalled one.
    fn reap_sends(&mut self) -> Result<(), TransportError> {
        Ok(self.sq.reap(&self.v, &mut self.wcs)?)
    }

    /// Reads the peer's latest credit record, if a whole one is there.
    fn read_credits(&mut self) -> Result<(), TransportError> {
        let Some(credit) = Credit::decode(self.v.read_credit_slot()) else {
            return Ok(());
        };
        // Pairs with the peer's ordering: its credit covers bytes whose transfer completed, so
        // our staging area is free up to there. Nothing we read after this is older.
        fence(Ordering::Acquire);
        Ok(self.send.accept(credit)?)
    }

    /// Writes our consumption counters into the credit source (read by the next credit WR).
    fn prepare_credit(&mut self) {
        let credit = self.recv.report();
        self.v.write_credit_source(credit.encode());
        self.sq
            .set_credit_inline(self.v.max_inline() as usize >= CREDIT_LEN);
    }

    /// Posts a credit on its own when a quarter of the ring or of the receive depth is
    /// unreported (the bound that keeps the sender from stalling forever).
    fn credit_if_overdue(&mut self) -> Result<(), TransportError> {
        if !self.recv.overdue() {
            return Ok(());
        }
        self.reap_sends()?;
        if self.sq.room() > 0 {
            self.prepare_credit();
            // SAFETY: only the credit WR, whose source is our registered credit source.
            unsafe { self.sq.post(&self.v, &[CREDIT_WR]) }?;
        }
        Ok(())
    }

    /// Takes one receive completion into account.
    fn absorb(&mut self, a: Arrival) -> Result<(), TransportError> {
        if !a.ok() {
            return Err(RdmaError::Completion {
                queue: "receive",
                status: status_text(a.status),
                vendor_err: a.vendor_err,
            }
            .into());
        }
        if !a.is_write_with_imm() {
            return Err(
                RdmaError::PeerProtocol(format!("unexpected receive opcode {}", a.opcode)).into(),
            );
        }
        Ok(self.recv.arrived(a.imm, a.byte_len)?)
    }

    /// Re-posts `n` receives (a prefix of the pre-chained list, cut after `n`).
    fn repost(&mut self, n: usize) -> Result<(), TransportError> {
        self.rq.post(&self.v, n)?;
        self.recv.reposted(n as u64);
        Ok(())
    }

    /// Copies the bytes that arrived in the ring into `rx`; their ring space is free afterwards.
    fn drain_ring(&mut self) {
        // The completions were read before this point; the data they announce is in place.
        fence(Ordering::Acquire);
        while let Some(chunk) = self.recv.next_chunk() {
            // SAFETY: [pos, pos+len) lies in the receive ring; the peer wrote it completely
            // (its completion arrived) and writes there again only after we credit it, which
            // happens after this copy.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    self.v.ring().add(chunk.pos as usize),
                    chunk.len as usize,
                )
            };
            self.rx.raw().extend_from_slice(bytes);
            self.recv.consumed(chunk.len);
        }
    }

    /// Whether the peer closed the liveness socket (or broke the protocol by writing to it).
    fn check_liveness(&self) -> Result<(), TransportError> {
        let mut b = [0u8; 1];
        // SAFETY: one writable byte; MSG_PEEK leaves the socket as it is.
        let n = unsafe {
            libc::recv(
                self.tcp.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Err(TransportError::Closed),
            n if n > 0 => Err(RdmaError::PeerProtocol(
                "peer wrote to the liveness channel after setup".into(),
            )
            .into()),
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(io_err("liveness channel")(e)),
                }
            }
        }
    }

    /// The maximum inline payload the QP accepts (0: none).
    pub fn max_inline(&self) -> u32 {
        self.v.max_inline()
    }
}

impl Connection for RdmaConnection {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.tx.push(msg)
    }

    fn send_write(
        &mut self,
        seq: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        data_crc: u32,
    ) -> Result<(), TransportError> {
        self.tx.push_write(seq, term, offset, data, data_crc)
    }

    fn send_chunk_data(&mut self, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        self.tx.push_chunk_data(offset, data)
    }

    fn flush(&mut self) -> Result<bool, TransportError> {
        self.tx.close_record();
        if self.tx.settle() {
            return Ok(true);
        }
        self.reap_sends()?;
        self.read_credits()?;
        while self.tx.pending() > 0 {
            if self.send.blocked() || self.sq.room() < 3 {
                break;
            }
            let mut chain = [0usize; 3];
            let mut n = 0;
            if self.recv.piggyback_due() {
                // Piggyback our credit in front of the data (same doorbell). Not on every
                // flush: on a software device every work request is a packet the CPUs process.
                self.prepare_credit();
                chain[n] = CREDIT_WR;
                n += 1;
            }
            for slot in DATA_WRS {
                let Some(w) = self.send.next_write(self.tx.pending() as u64) else {
                    break;
                };
                let src = self.tx.unsent().as_ptr();
                let inline = w.len <= u64::from(self.v.max_inline());
                let addr = if inline {
                    src as u64
                } else {
                    // SAFETY: [pos, pos+len) of the staging area is free: the peer's credit
                    // covers everything written there before (room > 0 was computed from it),
                    // so no earlier work request still reads it. `src` has `len` readable bytes.
                    unsafe {
                        let dst = self.v.staging().add(w.pos as usize);
                        ptr::copy_nonoverlapping(src, dst, w.len as usize);
                        dst as u64
                    }
                };
                self.sq
                    .set_data(slot, addr, w.len as u32, inline, self.peer_ring + w.pos);
                self.tx.advance(w.len as usize);
                self.send.wrote(w.len);
                chain[n] = slot;
                n += 1;
            }
            // SAFETY: each data WR in the chain was patched just above with the staging area
            // (registered, and not written again until the peer's credit covers it) or, inline,
            // with `tx`'s unsent bytes, which stay in place until the next push (`advance` only
            // moves an index): both readable for the call.
            unsafe { self.sq.post(&self.v, &chain[..n]) }?;
        }
        Ok(self.tx.settle())
    }

    fn pending_send_bytes(&self) -> usize {
        self.tx.pending()
    }

    fn poll_recv(&mut self, out: &mut Vec<Message>, max: usize) -> Result<usize, TransportError> {
        let before = out.len();
        let mut arrived = 0usize;
        if self.kicked.replace(false) {
            self.kick.drain();
        }
        let stashed = self.stash.get_mut().len();
        for i in 0..stashed {
            let a = self.stash.get_mut()[i];
            self.absorb(a)?;
            arrived += 1;
        }
        self.stash.get_mut().clear();
        let n = self.v.poll_recv_cq(&mut self.wcs)?;
        for i in 0..n {
            let a = Arrival::of(&self.wcs[i]);
            self.absorb(a)?;
            arrived += 1;
        }
        if arrived > 0 {
            self.repost(arrived)?;
            self.drain_ring();
        }
        // Also when nothing arrived: an overdue credit that found the send queue full last time
        // must still go out, or a sender waiting for it would wait forever.
        self.credit_if_overdue()?;
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(LIVENESS_EVERY) || self.check_peer.replace(false) {
            self.check_liveness()?;
        }
        while out.len() - before < max {
            match self.rx.next()? {
                Some(m) => out.push(m),
                None => break,
            }
        }
        Ok(out.len() - before)
    }

    /// Arms the receive CQ, catches completions that raced the arming (they raise no event:
    /// stashed, and the kick eventfd made readable), and returns the epoll descriptor over the
    /// completion channel, the liveness socket and the kick eventfd.
    fn wait_fd(&self) -> RawFd {
        // An event left over from an earlier arming (its completion was already polled) would
        // make every sleep return at once: read it first.
        if self.notify_armed.get() && self.v.drain_events() {
            self.notify_armed.set(false);
        }
        if !self.notify_armed.get() {
            self.notify_armed.set(self.v.arm_recv_cq());
        }
        let mut wcs: [ibv_wc; 8] = std::array::from_fn(|_| zeroed_wc());
        // A failed poll is left for `poll_recv`, which polls again and reports it.
        if let Ok(n) = self.v.poll_recv_cq(&mut wcs) {
            self.stash
                .borrow_mut()
                .extend(wcs[..n].iter().map(Arrival::of));
        }
        if !self.stash.borrow().is_empty() && !self.kicked.get() {
            self.kick.signal();
            self.kicked.set(true);
        }
        self.check_peer.set(true);
        self.wake.as_raw_fd()
    }

    fn send_ready_fd(&self) -> Option<(RawFd, i16)> {
        None
    }

    fn peer(&self) -> String {
        self.peer_desc.clone()
    }

    fn authenticated_peer(&self) -> Option<u64> {
        self.authenticated
    }
}

/// The primary's side of connection setup, one non-blocking step per [`Connecting::poll`]:
/// TCP connect, then send our setup record, then read the backup's answer and bring the QP to
/// RTS. The engine bounds the whole attempt with its handshake timeout.
pub struct RdmaConnecting {
    settings: RdmaSettings,
    auth: Option<Arc<AuthContext>>,
    stage: SetupStage,
}

enum SetupStage {
    Tcp(TcpConnecting),
    Authenticating(TcpStream, Box<Authenticating>),
    Answer {
        tcp: TcpStream,
        // Boxed: the verbs objects and work requests are large, the other stages small.
        parts: Box<Parts>,
        psn: u32,
        session: Option<Box<Session>>,
        got: BytesMut,
    },
    Done,
}

impl RdmaConnecting {
    /// Starts connecting to the backup's setup address `addr`.
    pub fn start(addr: &str, settings: RdmaSettings) -> Result<Self, TransportError> {
        Ok(RdmaConnecting {
            stage: SetupStage::Tcp(TcpConnecting::start(addr)?),
            settings,
            auth: None,
        })
    }

    /// Authenticate on the setup channel with `ctx`'s secrets before the setup records are
    /// exchanged (they then travel sealed, and so does every frame on the data path).
    pub fn with_auth(mut self, ctx: Option<Arc<AuthContext>>) -> Self {
        self.auth = ctx;
        self
    }

    /// The connection once ready, `Ok(None)` while setup is in progress, or why it failed.
    pub fn poll_connection(&mut self) -> Result<Option<RdmaConnection>, TransportError> {
        if let SetupStage::Tcp(t) = &mut self.stage {
            let Some(tcp) = t.poll_stream()? else {
                return Ok(None);
            };
            tcp.set_nodelay(true)
                .map_err(io_err("setting TCP_NODELAY"))?;
            tcp.set_nonblocking(true)
                .map_err(io_err("setting socket non-blocking"))?;
            self.stage = match &self.auth {
                Some(ctx) => SetupStage::Authenticating(tcp, Box::new(ctx.start(Side::Initiator)?)),
                None => return self.send_setup(tcp, None, BytesMut::new()),
            };
        }
        if let SetupStage::Authenticating(tcp, auth) = &mut self.stage {
            let Some((session, early)) = auth.poll(tcp)? else {
                return Ok(None);
            };
            let SetupStage::Authenticating(tcp, _) =
                std::mem::replace(&mut self.stage, SetupStage::Done)
            else {
                unreachable!("matched above");
            };
            return self.send_setup(tcp, Some(session), early);
        }
        self.read_answer()
    }

    /// Prepares the verbs objects and sends our setup record.
    fn send_setup(
        &mut self,
        mut tcp: TcpStream,
        mut session: Option<Session>,
        early: BytesMut,
    ) -> Result<Option<RdmaConnection>, TransportError> {
        {
            let parts = Box::new(Parts::new(Verbs::prepare(&self.settings)?)?);
            let psn = fastrand::u32(..0x100_0000);
            // 64 (or 84, sealed) bytes into a fresh socket's empty send buffer: written whole
            // or not at all.
            let record = encode_setup(&parts.v.info(psn), session.as_mut().map(|s| &mut s.sealer));
            match tcp.write(&record) {
                Ok(n) if n == record.len() => {}
                Ok(_) => {
                    return Err(TransportError::Io {
                        context: "sending RDMA setup to peer",
                        source: io::Error::other("setup record only partly sent"),
                    })
                }
                Err(e) => return Err(io_err("sending RDMA setup to peer")(e)),
            }
            self.stage = SetupStage::Answer {
                tcp,
                parts,
                psn,
                session: session.map(Box::new),
                got: early,
            };
        }
        self.read_answer()
    }

    /// Reads the backup's setup record and brings the QP to RTS.
    fn read_answer(&mut self) -> Result<Option<RdmaConnection>, TransportError> {
        let SetupStage::Answer {
            tcp, got, session, ..
        } = &mut self.stage
        else {
            return Err(TransportError::Closed);
        };
        let want = setup_wire_len(session.is_some());
        if !read_exactly(tcp, got, want)? {
            return Ok(None);
        }
        let SetupStage::Answer {
            tcp,
            parts,
            psn,
            mut session,
            mut got,
        } = std::mem::replace(&mut self.stage, SetupStage::Done)
        else {
            unreachable!("matched above");
        };
        let peer = decode_setup(&mut got, session.as_mut().map(|s| &mut s.opener))?;
        parts.v.connect_qp(&peer, psn)?;
        RdmaConnection::finish(*parts, tcp, peer, session.map(|s| *s)).map(Some)
    }
}

/// Reads from `tcp` until `got` holds `want` bytes (never more: the setup channel carries
/// nothing after the setup record). Returns whether it does.
fn read_exactly(
    tcp: &mut TcpStream,
    got: &mut BytesMut,
    want: usize,
) -> Result<bool, TransportError> {
    if got.len() > want {
        return Err(RdmaError::PeerProtocol("peer sent more than its setup record".into()).into());
    }
    let mut buf = [0u8; 128];
    while got.len() < want {
        let room = (want - got.len()).min(buf.len());
        match tcp.read(&mut buf[..room]) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading the peer's RDMA setup")(e)),
        }
    }
    Ok(true)
}

impl Connecting for RdmaConnecting {
    fn poll(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError> {
        Ok(self
            .poll_connection()?
            .map(|c| Box::new(c) as Box<dyn Connection>))
    }

    fn wait_fd(&self) -> Option<(RawFd, i16)> {
        match &self.stage {
            SetupStage::Tcp(t) => Connecting::wait_fd(t),
            SetupStage::Authenticating(tcp, _) | SetupStage::Answer { tcp, .. } => {
                Some((tcp.as_raw_fd(), libc::POLLIN))
            }
            SetupStage::Done => None,
        }
    }
}

/// A connection whose setup record is still arriving (after its authentication, if required).
struct Handshake {
    tcp: TcpStream,
    auth: Option<Authenticating>,
    session: Option<Session>,
    got: BytesMut,
    deadline: Instant,
}

/// The backup's listening endpoint: a TCP listener for setup, then RDMA.
pub struct RdmaAcceptor {
    listener: TcpListener,
    settings: RdmaSettings,
    pending: Vec<Handshake>,
    /// The secrets a connection must prove before its setup record is read (none: no
    /// authentication).
    auth: Option<Arc<AuthContext>>,
    /// epoll over the listener and the pending setup connections.
    wake: OwnedFd,
    /// What `bind` found (device, port, GID), for logs.
    pub describe: String,
    /// Setup connections taken from the socket (see `Listener::accepted`).
    accepted: u64,
}

impl fmt::Debug for RdmaAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaAcceptor")
            .field("listener", &self.listener)
            .field("device", &self.describe)
            .finish_non_exhaustive()
    }
}

impl RdmaAcceptor {
    /// Checks the device, port and GID, then binds `addr` for setup connections.
    pub fn bind(addr: SocketAddr, settings: RdmaSettings) -> Result<Self, TransportError> {
        let describe = probe(&settings)?;
        let listener = TcpListener::bind(addr).map_err(io_err("binding listen address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("setting listener non-blocking"))?;
        let wake = new_epoll().map_err(os("epoll_create1"))?;
        epoll_add(&wake, listener.as_raw_fd())?;
        Ok(RdmaAcceptor {
            listener,
            settings,
            pending: Vec::new(),
            auth: None,
            wake,
            describe,
            accepted: 0,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(io_err("reading listen address"))
    }

    /// Every setup connection must authenticate with `ctx`'s secrets first.
    pub fn require_auth(&mut self, ctx: Arc<AuthContext>) {
        self.auth = Some(ctx);
    }
}

impl Handshake {
    /// Moves authentication and the setup record on; returns whether the record is complete.
    fn progress(&mut self) -> Result<bool, TransportError> {
        if let Some(auth) = self.auth.as_mut() {
            let Some((session, early)) = auth.poll(&mut self.tcp)? else {
                return Ok(false);
            };
            self.auth = None;
            self.session = Some(session);
            self.got = early;
        }
        read_exactly(
            &mut self.tcp,
            &mut self.got,
            setup_wire_len(self.session.is_some()),
        )
    }
}

impl Listener for RdmaAcceptor {
    fn try_accept(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError> {
        loop {
            match self.listener.accept() {
                Ok((tcp, _)) => {
                    self.accepted += 1;
                    tcp.set_nonblocking(true)
                        .map_err(io_err("setting socket non-blocking"))?;
                    let _ = tcp.set_nodelay(true);
                    epoll_add(&self.wake, tcp.as_raw_fd())?;
                    let auth = match &self.auth {
                        Some(ctx) => Some(ctx.start(Side::Responder)?),
                        None => None,
                    };
                    self.pending.push(Handshake {
                        tcp,
                        auth,
                        session: None,
                        got: BytesMut::new(),
                        deadline: Instant::now() + EXCHANGE_TIMEOUT,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("accepting a connection")(e)),
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let h = &mut self.pending[i];
            let complete = match h.progress() {
                Ok(complete) => complete,
                Err(e) if crate::transport::closed_by_peer(&e) => {
                    let h = self.pending.swap_remove(i);
                    tracing::debug!(peer = ?h.tcp.peer_addr().ok(), "setup connection closed by its peer (a knock, or a peer that gave up)");
                    continue;
                }
                Err(e) => {
                    let h = self.pending.swap_remove(i);
                    let what = if h.auth.is_some() {
                        "refusing an unauthenticated connection"
                    } else {
                        "dropping RDMA setup connection"
                    };
                    tracing::warn!(peer = ?h.tcp.peer_addr().ok(), reason = %e, "{what}");
                    continue;
                }
            };
            if complete {
                let mut h = self.pending.swap_remove(i);
                let info = match decode_setup(&mut h.got, h.session.as_mut().map(|s| &mut s.opener))
                {
                    Ok(info) => info,
                    Err(e) => {
                        tracing::warn!(peer = ?h.tcp.peer_addr().ok(), error = %e, "refusing RDMA setup");
                        continue;
                    }
                };
                let c = RdmaConnection::accept(h.tcp, info, &self.settings, h.session)?;
                return Ok(Some(Box::new(c)));
            }
            if Instant::now() > h.deadline {
                let h = self.pending.swap_remove(i);
                let why = if h.auth.is_some() {
                    "no authentication in time (silent or too slow); closing"
                } else {
                    "no RDMA setup in time; closing"
                };
                tracing::warn!(peer = ?h.tcp.peer_addr().ok(), "{why}");
                continue;
            }
            i += 1;
        }
        Ok(None)
    }

    fn wait_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn accepted(&self) -> u64 {
        self.accepted
    }
}
