//! RDMA verbs transport: reliable-connected queue pairs through libibverbs (`rdma-sys`).
//!
//! The engine sees exactly what the TCP transport gives it: the same `mirror_proto` frames,
//! decoded into the same [`Message`]s. Only the bytes travel differently:
//!
//! - **Setup** goes over TCP on the configured `listen`/`peer` addresses: each side sends a 64-byte
//!   `Info` (QP number, PSN, GID, MTU, the address and rkey of its receive ring and credit slot,
//!   its receive depth), both queue pairs go INIT → RTR → RTS, and the TCP connection stays open
//!   as the **liveness channel**: the peer process dying closes it at once, whatever the QP says.
//! - **Data**: each side owns a receive ring of [`RING_BYTES`] in registered anonymous memory.
//!   The sender treats the peer's ring as a byte stream: it RDMA-WRITEs-WITH-IMMEDIATE the encoded
//!   frames at `sent_bytes % RING_BYTES` (a write that would cross the end is split in two), the
//!   immediate carrying the byte count. The receiver's poller polls its receive CQ (no system
//!   call), adds the counts, copies the new bytes out of the ring and decodes frames from them,
//!   and re-posts one (buffer-less) receive per completion.
//! - **Credits**: a sender never overruns unread bytes or the peer's posted receives. Each side
//!   writes `{consumed_bytes, consumed_writes, check}` with a plain RDMA WRITE (no completion at
//!   the peer) into the other's credit slot: piggybacked in front of its own data once a
//!   sixteenth of the ring or of the receive depth is unreported, and on its own once a quarter
//!   is (this bound is what makes the scheme deadlock-free: a sender stalls only when
//!   at least a quarter is unreported, which the receiver then reports). The slot is read with
//!   volatile loads and accepted only when its check word matches (a write racing the read is
//!   simply read again later; counters are monotonic).
//! - **Hot path**: the three send work requests (credit, data, data after the wrap) are built
//!   once and only patched per flush (addresses, lengths, immediate, flags), then posted as one
//!   chain; every `SIGNAL_EVERY`-th (32nd) request is signalled; payloads up to the QP's
//!   `max_inline_data` go inline straight from the encode buffer, larger ones are copied to a
//!   registered staging area that mirrors the peer's ring offsets (its space is free exactly when
//!   the peer's credit says so).
//! - **Sleeping**: [`Connection::wait_fd`] arms the receive CQ's completion channel, polls the CQ
//!   once more (a completion that landed before the arming raises no event; such completions are
//!   stashed and an eventfd is kicked), and returns an epoll descriptor over the completion
//!   channel, the TCP liveness socket and that eventfd: it becomes readable when data arrives,
//!   when the peer goes away, or at once when data already arrived.
//! - **Failures**: an error completion (a QP in error, retries exhausted), the liveness socket
//!   closing, or a peer that violates the ring or credit bounds is a [`TransportError`]; the
//!   engine then drops the connection, and its reconnection and recovery take over.
//!
//! Why anonymous memory: on current kernels a writable file-backed `MAP_SHARED` mapping (and an
//! FS-DAX mapping) cannot be long-term pinned for a memory region, so the ring is not the
//! persistent queue; the backup copies frames out of the ring and appends them to its queue like
//! any other. See docs/ARCHITECTURE.md, "RDMA transport".

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mirror_proto::Message;
use rdma_sys::*;
use thiserror::Error;

use super::tcp::TcpConnecting;
use super::{Connecting, Connection, Listener, SendBatch, TransportError};
use crate::config::Config;

/// Bytes of each side's receive ring (and of its send staging area).
pub const RING_BYTES: u64 = 4 << 20;
/// Receive work requests each side keeps posted (one per incoming RDMA WRITE WITH IMMEDIATE).
const RECV_DEPTH: u32 = 256;
/// Send queue depth.
const SQ_DEPTH: u64 = 128;
/// Every this many send work requests, one is signalled (the others complete silently).
const SIGNAL_EVERY: u64 = 32;
/// Completions read per `ibv_poll_cq`.
const CQ_BATCH: usize = 32;
/// Inline data asked for at QP creation (the device may grant less, or none).
const WANT_INLINE: [u32; 3] = [256, 64, 0];
/// A credit rides in front of outgoing data once 1/PIGGYBACK_DIV of the ring or of the receive
/// depth is unreported (on its own at 1/4, see `credit_if_overdue`).
const PIGGYBACK_DIV: u64 = 16;
/// Bytes of a credit record: consumed bytes, consumed writes, check word.
const CREDIT_LEN: usize = 24;
/// Mixed into the credit check word, so that a zeroed slot is not a valid record.
const CREDIT_MAGIC: u64 = u64::from_le_bytes(*b"LMRDCRED");
/// Magic of the setup record.
const INFO_MAGIC: u32 = u32::from_le_bytes(*b"LMRD");
/// Version of the setup record and of the ring/credit scheme.
const INFO_VERSION: u16 = 1;
/// Bytes of the setup record.
const INFO_LEN: usize = 64;
/// The liveness socket is checked every this many receive polls (and after every sleep).
const LIVENESS_EVERY: u32 = 256;
/// How long either side waits for the other's setup record.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connect timeout of the setup channel.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Which device, port and GID to use (from the `rdma_*` config keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    /// Device name as `ibv_devices` lists it (none: the first device).
    pub device: Option<String>,
    /// Port number (from 1).
    pub port: u8,
    /// GID table index (none: the first IPv4-mapped GID of the port, else the first non-zero one).
    pub gid_index: Option<u8>,
}

impl RdmaSettings {
    /// The settings of a node config.
    pub fn from_config(cfg: &Config) -> Self {
        RdmaSettings {
            device: cfg.rdma_device.clone(),
            port: cfg.rdma_port,
            gid_index: cfg.rdma_gid_index,
        }
    }
}

/// What went wrong with RDMA, and whose fault it is (the machine's setup, the peer, or a verb).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// The machine has no RDMA device (or no RDMA stack at all).
    #[error(
        "no RDMA device found (is an RDMA driver loaded? `ibv_devices` and `rdma link` show them)"
    )]
    NoDevice,
    /// The configured device does not exist.
    #[error("no RDMA device named '{name}' (found: {found})")]
    UnknownDevice {
        /// The configured name.
        name: String,
        /// The devices that exist.
        found: String,
    },
    /// The port does not exist or is not active.
    #[error("RDMA device {device} port {port}: {why}")]
    Port {
        /// Device.
        device: String,
        /// Port.
        port: u8,
        /// What is wrong.
        why: String,
    },
    /// The GID cannot be used.
    #[error("RDMA device {device} port {port}: {why}")]
    Gid {
        /// Device.
        device: String,
        /// Port.
        port: u8,
        /// What is wrong.
        why: String,
    },
    /// A verb failed.
    #[error("{op} failed: {source}")]
    Verbs {
        /// The verb.
        op: &'static str,
        /// The errno it reported.
        source: io::Error,
    },
    /// The peer's setup record is not acceptable.
    #[error("peer's RDMA setup is invalid: {0}")]
    PeerSetup(String),
    /// The peer broke the ring or credit rules.
    #[error("peer broke the RDMA ring protocol: {0}")]
    PeerProtocol(String),
    /// The backup accepted the setup connection but did not answer in time.
    #[error("no RDMA setup answer from the peer in time")]
    SetupTimeout,
    /// A work request completed with an error (the QP is in error: peer gone, retries exhausted).
    #[error("RDMA {queue} completion failed: {status} (vendor error {vendor_err:#x})")]
    Completion {
        /// "send" or "receive".
        queue: &'static str,
        /// The status, as libibverbs spells it.
        status: String,
        /// The device's own code.
        vendor_err: u32,
    },
}

impl From<RdmaError> for TransportError {
    fn from(e: RdmaError) -> Self {
        TransportError::Io {
            context: "RDMA",
            source: io::Error::other(e),
        }
    }
}

fn verbs_err(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::last_os_error(),
    }
}

fn verbs_rc(op: &'static str, rc: i32) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::from_raw_os_error(rc.abs()),
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { context, source }
}

/// The setup record each side sends over TCP (little-endian, [`INFO_LEN`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Info {
    mtu: u16,
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
    ring_addr: u64,
    ring_len: u64,
    credit_addr: u64,
    rkey: u32,
    recv_depth: u32,
}

impl Info {
    fn encode(&self) -> [u8; INFO_LEN] {
        let mut b = [0u8; INFO_LEN];
        b[0..4].copy_from_slice(&INFO_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&INFO_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.mtu.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..40].copy_from_slice(&self.ring_addr.to_le_bytes());
        b[40..48].copy_from_slice(&self.ring_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.credit_addr.to_le_bytes());
        b[56..60].copy_from_slice(&self.rkey.to_le_bytes());
        b[60..64].copy_from_slice(&self.recv_depth.to_le_bytes());
        b
    }

    fn decode(b: &[u8; INFO_LEN]) -> Result<Info, RdmaError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let magic = u32_at(0);
        if magic != INFO_MAGIC {
            return Err(RdmaError::PeerSetup(format!(
                "bad magic {magic:#x} (not a libmirror RDMA peer, or the peer uses transport = tcp)"
            )));
        }
        let version = u16_at(4);
        if version != INFO_VERSION {
            return Err(RdmaError::PeerSetup(format!(
                "version {version}, this node speaks {INFO_VERSION}"
            )));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let info = Info {
            mtu: u16_at(6),
            qpn: u32_at(8),
            psn: u32_at(12),
            gid,
            ring_addr: u64_at(32),
            ring_len: u64_at(40),
            credit_addr: u64_at(48),
            rkey: u32_at(56),
            recv_depth: u32_at(60),
        };
        if !(1..=5).contains(&info.mtu) {
            return Err(RdmaError::PeerSetup(format!("MTU code {}", info.mtu)));
        }
        if !(4096..=1 << 30).contains(&info.ring_len) {
            return Err(RdmaError::PeerSetup(format!(
                "ring of {} bytes",
                info.ring_len
            )));
        }
        if !(1..=1 << 16).contains(&info.recv_depth) {
            return Err(RdmaError::PeerSetup(format!(
                "receive depth {}",
                info.recv_depth
            )));
        }
        if info.gid == [0; 16] || info.qpn == 0 || info.psn > 0xff_ffff {
            return Err(RdmaError::PeerSetup(
                "empty GID, QP number 0 or PSN over 24 bits".into(),
            ));
        }
        Ok(info)
    }
}

/// A GID as text (IPv4-mapped GIDs as `::ffff:a.b.c.d`).
fn gid_text(gid: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*gid).to_string()
}

/// The verbs objects of one connection, released in reverse order on drop. Every pointer is
/// either null (not created) or owned by this struct.
struct Verbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mr: *mut ibv_mr,
    /// Anonymous mapping: receive ring | send staging | credit slot | credit source.
    mem: *mut u8,
    mem_len: usize,
    device: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    mtu: ibv_mtu::Type,
    max_inline: u32,
}

// SAFETY: the verbs objects are thread-safe per libibverbs; the mapping is owned by this struct.
// A `Verbs` is used by one thread at a time (the connection that owns it is moved between
// threads as a whole, behind `&mut` or the poller's mutex).
unsafe impl Send for Verbs {}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or a live object created by the matching verb and owned by
        // us; destruction follows the dependency order (QP before its CQs, MR and CQs before the
        // PD and channel, everything before the context), and each is destroyed once. Completion
        // events are acknowledged as they are read, so destroying the CQ cannot block.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.mr.is_null() {
                ibv_dereg_mr(self.mr);
            }
            if !self.send_cq.is_null() {
                ibv_destroy_cq(self.send_cq);
            }
            if !self.recv_cq.is_null() {
                ibv_destroy_cq(self.recv_cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ibv_close_device(self.ctx);
            }
            if !self.mem.is_null() {
                libc::munmap(self.mem.cast(), self.mem_len);
            }
        }
    }
}

/// Opens the configured device and checks its port and GID. Returns the context and what was
/// found; the caller owns the context (stored in a `Verbs` at once).
fn open_device(s: &RdmaSettings, v: &mut Verbs) -> Result<ibv_port_attr, RdmaError> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a live i32 the call writes the device count into.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENOENT) => RdmaError::NoDevice,
            _ => RdmaError::Verbs {
                op: "ibv_get_device_list",
                source: e,
            },
        });
    }
    let mut names = Vec::new();
    let mut chosen = None;
    for i in 0..n.max(0) as usize {
        // SAFETY: `list` holds `n` valid device pointers (then a null).
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a valid device; the name is a NUL-terminated string it owns.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        let wanted = s.device.as_deref().map_or(true, |w| w == name);
        if wanted && chosen.is_none() {
            chosen = Some((dev, name.clone()));
        }
        names.push(name);
    }
    let result = match chosen {
        None if names.is_empty() => Err(RdmaError::NoDevice),
        None => Err(RdmaError::UnknownDevice {
            name: s.device.clone().unwrap_or_default(),
            found: names.join(", "),
        }),
        Some((dev, name)) => {
            // SAFETY: `dev` comes from the live list (freed only below).
            let ctx = unsafe { ibv_open_device(dev) };
            if ctx.is_null() {
                Err(verbs_err("ibv_open_device"))
            } else {
                v.ctx = ctx;
                v.device = name;
                Ok(())
            }
        }
    };
    // SAFETY: the list came from ibv_get_device_list and is freed once; the opened context does
    // not depend on it.
    unsafe { ibv_free_device_list(list) };
    result?;
    // SAFETY: ibv_port_attr is plain data; all-zero is a valid value to be overwritten.
    let mut attr: ibv_port_attr = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: `v.ctx` is open; `attr` is a live struct of the size the call is told.
    let rc = unsafe { ___ibv_query_port(v.ctx, s.port, &mut attr) };
    if rc != 0 {
        return Err(RdmaError::Port {
            device: v.device.clone(),
            port: s.port,
            why: format!(
                "cannot query it ({}); does the device have that port?",
                io::Error::from_raw_os_error(rc.abs())
            ),
        });
    }
    if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
        let state = match attr.state {
            ibv_port_state::IBV_PORT_DOWN => "DOWN",
            ibv_port_state::IBV_PORT_INIT => "INIT",
            ibv_port_state::IBV_PORT_ARMED => "ARMED",
            _ => "not active",
        };
        return Err(RdmaError::Port {
            device: v.device.clone(),
            port: s.port,
            why: format!("port is {state}, not ACTIVE (is its network link up?)"),
        });
    }
    v.port = s.port;
    let query = |i: u8| -> Option<[u8; 16]> {
        // SAFETY: ibv_gid is plain bytes; all-zero is valid.
        let mut gid: ibv_gid = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: `v.ctx` is open; `gid` is a live ibv_gid.
        let rc = unsafe { ibv_query_gid(v.ctx, s.port, i32::from(i), &mut gid) };
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        let raw = unsafe { gid.raw };
        (rc == 0 && raw != [0; 16]).then_some(raw)
    };
    let (index, gid) = match s.gid_index {
        Some(i) => match query(i) {
            Some(g) => (i, g),
            None => {
                return Err(RdmaError::Gid {
                    device: v.device.clone(),
                    port: s.port,
                    why: format!(
                        "GID index {i} is empty or does not exist (the port has {} entries; `ibv_devinfo -v` lists them)",
                        attr.gid_tbl_len
                    ),
                })
            }
        },
        None => {
            let len = attr.gid_tbl_len.clamp(0, 256) as u16;
            let gids: Vec<(u8, [u8; 16])> = (0..len)
                .filter_map(|i| query(i as u8).map(|g| (i as u8, g)))
                .collect();
            let v4 = |g: &[u8; 16]| g[..10] == [0; 10] && g[10..12] == [0xff, 0xff];
            match gids.iter().find(|(_, g)| v4(g)).or(gids.first()) {
                Some(&(i, g)) => (i, g),
                None => {
                    return Err(RdmaError::Gid {
                        device: v.device.clone(),
                        port: s.port,
                        why: "the port has no GID (no IP address on its network device?)".into(),
                    })
                }
            }
        }
    };
    v.gid_index = index;
    v.gid = gid;
    v.mtu = attr.active_mtu;
    Ok(attr)
}

/// Checks that the configured device, port and GID are usable (for a clear error at open time).
pub fn probe(s: &RdmaSettings) -> Result<String, RdmaError> {
    let mut v = Verbs::empty();
    open_device(s, &mut v)?;
    Ok(format!(
        "{} port {} GID[{}] {}",
        v.device,
        v.port,
        v.gid_index,
        gid_text(&v.gid)
    ))
}

impl Verbs {
    fn empty() -> Verbs {
        Verbs {
            ctx: ptr::null_mut(),
            pd: ptr::null_mut(),
            channel: ptr::null_mut(),
            send_cq: ptr::null_mut(),
            recv_cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            mr: ptr::null_mut(),
            mem: ptr::null_mut(),
            mem_len: 0,
            device: String::new(),
            port: 0,
            gid_index: 0,
            gid: [0; 16],
            mtu: ibv_mtu::IBV_MTU_1024,
            max_inline: 0,
        }
    }

    /// Opens the device and creates everything up to a QP in INIT with registered memory.
    fn prepare(s: &RdmaSettings) -> Result<Verbs, RdmaError> {
        let mut v = Verbs::empty();
        open_device(s, &mut v)?;
        // SAFETY (whole block): every call gets live objects created just above (non-null is
        // checked after each creation) and plain-data attribute structs that outlive the call.
        unsafe {
            v.pd = ibv_alloc_pd(v.ctx);
            if v.pd.is_null() {
                return Err(verbs_err("ibv_alloc_pd"));
            }
            v.channel = ibv_create_comp_channel(v.ctx);
            if v.channel.is_null() {
                return Err(verbs_err("ibv_create_comp_channel"));
            }
            let fd = (*v.channel).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(verbs_err("making the completion channel non-blocking"));
            }
            v.send_cq = ibv_create_cq(v.ctx, SQ_DEPTH as i32, ptr::null_mut(), ptr::null_mut(), 0);
            if v.send_cq.is_null() {
                return Err(verbs_err("ibv_create_cq (send)"));
            }
            v.recv_cq = ibv_create_cq(v.ctx, RECV_DEPTH as i32, ptr::null_mut(), v.channel, 0);
            if v.recv_cq.is_null() {
                return Err(verbs_err("ibv_create_cq (receive)"));
            }
            for want in WANT_INLINE {
                let mut init: ibv_qp_init_attr = MaybeUninit::zeroed().assume_init();
                init.send_cq = v.send_cq;
                init.recv_cq = v.recv_cq;
                init.qp_type = ibv_qp_type::IBV_QPT_RC;
                init.sq_sig_all = 0;
                init.cap.max_send_wr = SQ_DEPTH as u32;
                init.cap.max_recv_wr = RECV_DEPTH;
                init.cap.max_send_sge = 1;
                init.cap.max_recv_sge = 1;
                init.cap.max_inline_data = want;
                v.qp = ibv_create_qp(v.pd, &mut init);
                if !v.qp.is_null() {
                    // The device may grant more inline data than asked; use what it reports.
                    v.max_inline = init.cap.max_inline_data;
                    break;
                }
            }
            if v.qp.is_null() {
                return Err(verbs_err("ibv_create_qp"));
            }
            // Anonymous private memory, populated now: registered (pinned) once per connection.
            // Not a file-backed MAP_SHARED mapping, which the kernel refuses to pin long-term.
            v.mem_len = 2 * RING_BYTES as usize + 4096;
            let m = libc::mmap(
                ptr::null_mut(),
                v.mem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            );
            if m == libc::MAP_FAILED {
                return Err(verbs_err("mmap of the RDMA buffers"));
            }
            v.mem = m.cast();
            let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            v.mr = ibv_reg_mr(v.pd, v.mem.cast(), v.mem_len, access as i32);
            if v.mr.is_null() {
                return Err(verbs_err("ibv_reg_mr"));
            }
            let mut attr: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = v.port;
            attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            let rc = ibv_modify_qp(v.qp, &mut attr, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (INIT)", rc));
            }
        }
        Ok(v)
    }

    fn ring(&self) -> *mut u8 {
        self.mem
    }

    fn staging(&self) -> *mut u8 {
        // SAFETY: the mapping is 2 * RING_BYTES + 4096 bytes long.
        unsafe { self.mem.add(RING_BYTES as usize) }
    }

    fn credit_slot(&self) -> *mut u8 {
        // SAFETY: as above; the slot is 8-byte aligned (page-aligned mapping + 2 * RING_BYTES).
        unsafe { self.mem.add(2 * RING_BYTES as usize) }
    }

    fn credit_source(&self) -> *mut u8 {
        // SAFETY: as above (64 bytes after the slot, inside the last page).
        unsafe { self.mem.add(2 * RING_BYTES as usize + 64) }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is live once `prepare` returned.
        unsafe { (*self.mr).lkey }
    }

    fn info(&self, psn: u32) -> Info {
        Info {
            mtu: self.mtu as u16,
            // SAFETY: `qp` and `mr` are live once `prepare` returned.
            qpn: unsafe { (*self.qp).qp_num },
            psn,
            gid: self.gid,
            ring_addr: self.ring() as u64,
            ring_len: RING_BYTES,
            credit_addr: self.credit_slot() as u64,
            // SAFETY: as above.
            rkey: unsafe { (*self.mr).rkey },
            recv_depth: RECV_DEPTH,
        }
    }

    /// INIT → RTR → RTS towards `peer`.
    fn connect_qp(&self, peer: &Info, psn: u32) -> Result<(), RdmaError> {
        // SAFETY: `qp` is live; the attribute struct is plain data that outlives each call.
        unsafe {
            let mut a: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            a.qp_state = ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = self.mtu.min(u32::from(peer.mtu));
            a.dest_qp_num = peer.qpn;
            a.rq_psn = peer.psn;
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12;
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = peer.gid;
            a.ah_attr.grh.sgid_index = self.gid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.dlid = 0;
            a.ah_attr.sl = 0;
            a.ah_attr.src_path_bits = 0;
            a.ah_attr.port_num = self.port;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            let rc = ibv_modify_qp(self.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (RTR)", rc));
            }
            let mut a: ibv_qp_attr = MaybeUninit::zeroed().assume_init();
            a.qp_state = ibv_qp_state::IBV_QPS_RTS;
            // 4.096 us * 2^14 = 67 ms per retry, 7 retries: a silent peer fails the QP in ~0.5 s
            // (the liveness socket usually reports a dead process sooner).
            a.timeout = 14;
            a.retry_cnt = 7;
            // Receives are always posted ahead of the credits we grant; 7 = retry forever.
            a.rnr_retry = 7;
            a.sq_psn = psn;
            a.max_rd_atomic = 1;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            let rc = ibv_modify_qp(self.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(verbs_rc("ibv_modify_qp (RTS)", rc));
            }
        }
        Ok(())
    }
}

/// One receive completion, copied out of an `ibv_wc`.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    status: ibv_wc_status::Type,
    opcode: ibv_wc_opcode::Type,
    byte_len: u32,
    imm: u32,
    vendor_err: u32,
}

impl Arrival {
    fn of(wc: &ibv_wc) -> Arrival {
        Arrival {
            status: wc.status,
            opcode: wc.opcode,
            byte_len: wc.byte_len,
            // SAFETY: both union members are u32; for a write with immediate it is the immediate.
            imm: u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }),
            vendor_err: wc.vendor_err,
        }
    }
}

fn status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

fn zeroed_wcs(n: usize) -> Box<[ibv_wc]> {
    // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is valid.
    (0..n)
        .map(|_| unsafe { MaybeUninit::<ibv_wc>::zeroed().assume_init() })
        .collect()
}

/// One established RDMA connection to the peer.
pub struct RdmaConnection {
    v: Verbs,
    /// The setup connection, kept as the liveness channel (the peer never writes to it again).
    tcp: TcpStream,
    /// epoll over the completion channel, `tcp` and `kick`.
    wake: OwnedFd,
    /// Made readable by `wait_fd` when it found completions that raise no event.
    kick: OwnedFd,
    peer_desc: String,
    // The peer's ring and credit slot.
    peer_ring: u64,
    peer_ring_len: u64,
    peer_credit: u64,
    peer_rkey: u32,
    peer_depth: u64,
    // Send side: encoded frames not yet written, stream position, credits.
    tx: SendBatch,
    sent_bytes: u64,
    sent_writes: u64,
    peer_consumed_bytes: u64,
    peer_consumed_writes: u64,
    sq_posted: u64,
    sq_done: u64,
    /// Slot 0: credit write; 1 and 2: data writes (the second after a wrap). Pre-built.
    send_wrs: Box<[ibv_send_wr; 3]>,
    send_sges: Box<[ibv_sge; 3]>,
    // Receive side.
    recv_wrs: Box<[ibv_recv_wr]>,
    arrived_bytes: u64,
    consumed_bytes: u64,
    consumed_writes: u64,
    reported_bytes: u64,
    reported_writes: u64,
    rx: BytesMut,
    wcs: Box<[ibv_wc]>,
    polls: u32,
    // Touched by `wait_fd(&self)`.
    stash: RefCell<Vec<Arrival>>,
    kicked: Cell<bool>,
    notify_armed: Cell<bool>,
    check_peer: Cell<bool>,
}

// SAFETY: the raw pointers in the work requests point into boxes this struct owns (or into its
// registered mapping); the verbs objects are thread-safe. The connection is used by one thread at
// a time (`Connection` methods take `&mut self`; `wait_fd` is called by the thread that owns it).
unsafe impl Send for RdmaConnection {}

impl fmt::Debug for RdmaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaConnection")
            .field("peer", &self.peer_desc)
            .field("sent_bytes", &self.sent_bytes)
            .field("arrived_bytes", &self.arrived_bytes)
            .finish_non_exhaustive()
    }
}

fn new_fd(fd: i32, op: &'static str) -> Result<OwnedFd, RdmaError> {
    if fd < 0 {
        return Err(verbs_err(op));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_add(ep: &OwnedFd, fd: RawFd) -> Result<(), RdmaError> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: both descriptors are open; `ev` is a live epoll_event.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if rc < 0 {
        return Err(verbs_err("epoll_ctl"));
    }
    Ok(())
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
    fn accept(mut tcp: TcpStream, peer: Info, s: &RdmaSettings) -> Result<Self, TransportError> {
        let parts = Parts::new(Verbs::prepare(s)?)?;
        let psn = fastrand::u32(..0x100_0000);
        // RTR before answering: the primary writes only after it has our record.
        parts.v.connect_qp(&peer, psn)?;
        tcp.set_nonblocking(false)
            .map_err(io_err("setting socket blocking"))?;
        tcp.set_write_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(io_err("setting a socket timeout"))?;
        tcp.write_all(&parts.v.info(psn).encode())
            .map_err(io_err("sending RDMA setup to peer"))?;
        RdmaConnection::finish(parts, tcp, peer)
    }

    fn finish(p: Parts, tcp: TcpStream, peer: Info) -> Result<Self, TransportError> {
        tcp.set_nonblocking(true)
            .map_err(io_err("setting socket non-blocking"))?;
        let wake = new_fd(
            // SAFETY: plain system call with valid flags.
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
            "epoll_create1",
        )?;
        let kick = new_fd(
            // SAFETY: plain system call with valid flags.
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd",
        )?;
        // SAFETY: `channel` is live for the life of `p.v`.
        epoll_add(&wake, unsafe { (*p.v.channel).fd })?;
        epoll_add(&wake, tcp.as_raw_fd())?;
        epoll_add(&wake, kick.as_raw_fd())?;
        let tcp_peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        // SAFETY: `qp` is live.
        let qpn = unsafe { (*p.v.qp).qp_num };
        let peer_desc = format!(
            "rdma://{}/{} (qp {:#x} -> {:#x}, GID {})",
            p.v.device,
            tcp_peer,
            qpn,
            peer.qpn,
            gid_text(&peer.gid)
        );
        let mut c = RdmaConnection {
            v: p.v,
            tcp,
            wake,
            kick,
            peer_desc,
            peer_ring: peer.ring_addr,
            peer_ring_len: peer.ring_len,
            peer_credit: peer.credit_addr,
            peer_rkey: peer.rkey,
            peer_depth: u64::from(peer.recv_depth),
            tx: SendBatch::with_capacity(256 << 10),
            sent_bytes: 0,
            sent_writes: 0,
            peer_consumed_bytes: 0,
            peer_consumed_writes: 0,
            sq_posted: 0,
            sq_done: 0,
            send_wrs: p.send_wrs,
            send_sges: p.send_sges,
            recv_wrs: p.recv_wrs,
            arrived_bytes: 0,
            consumed_bytes: 0,
            consumed_writes: 0,
            reported_bytes: 0,
            reported_writes: 0,
            rx: BytesMut::with_capacity(256 << 10),
            wcs: zeroed_wcs(CQ_BATCH),
            polls: 0,
            stash: RefCell::new(Vec::with_capacity(CQ_BATCH)),
            kicked: Cell::new(false),
            notify_armed: Cell::new(false),
            check_peer: Cell::new(false),
        };
        c.build_send_wrs();
        Ok(c)
    }

    /// Fills the fixed fields of the three send work requests once.
    fn build_send_wrs(&mut self) {
        let lkey = self.v.lkey();
        for i in 0..3 {
            let sge: *mut ibv_sge = &mut self.send_sges[i];
            let wr = &mut self.send_wrs[i];
            wr.sg_list = sge;
            wr.num_sge = 1;
            wr.next = ptr::null_mut();
            wr.wr.rdma.rkey = self.peer_rkey;
            self.send_sges[i].lkey = lkey;
        }
        // Credit write: a plain RDMA WRITE of the credit source into the peer's credit slot.
        self.send_wrs[0].opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        self.send_wrs[0].wr.rdma.remote_addr = self.peer_credit;
        self.send_sges[0].addr = self.v.credit_source() as u64;
        self.send_sges[0].length = CREDIT_LEN as u32;
        for i in 1..3 {
            self.send_wrs[i].opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        }
    }

    /// Reaps send completions: any error fails the connection; a success retires every work
    /// request up to the signalled one.
    fn reap_sends(&mut self) -> Result<(), TransportError> {
        loop {
            // SAFETY: `send_cq` is live; `wcs` holds CQ_BATCH writable entries.
            let n = unsafe { ibv_poll_cq(self.v.send_cq, CQ_BATCH as i32, self.wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(verbs_rc("ibv_poll_cq (send)", n).into());
            }
            for wc in &self.wcs[..n as usize] {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(RdmaError::Completion {
                        queue: "send",
                        status: status_text(wc.status),
                        vendor_err: wc.vendor_err,
                    }
                    .into());
                }
                self.sq_done = self.sq_done.max(wc.wr_id);
            }
            if (n as usize) < CQ_BATCH {
                return Ok(());
            }
        }
    }

    /// Reads the peer's latest credit record, if a whole one is there.
    fn read_credits(&mut self) -> Result<(), TransportError> {
        let slot = self.v.credit_slot() as *const u64;
        // SAFETY: the slot is 24 aligned bytes of our live mapping that the peer's NIC may write
        // at any time: volatile reads, and a torn record fails the check below.
        let (bytes, writes, check) = unsafe {
            (
                ptr::read_volatile(slot),
                ptr::read_volatile(slot.add(1)),
                ptr::read_volatile(slot.add(2)),
            )
        };
        if check != bytes ^ writes.rotate_left(32) ^ CREDIT_MAGIC {
            return Ok(());
        }
        // Pairs with the peer's ordering: its credit covers bytes whose transfer completed, so
        // our staging area is free up to there. Nothing we read after this is older.
        fence(Ordering::Acquire);
        if bytes > self.sent_bytes || writes > self.sent_writes {
            return Err(RdmaError::PeerProtocol(format!(
                "credit for {bytes} bytes / {writes} writes, only {} / {} were sent",
                self.sent_bytes, self.sent_writes
            ))
            .into());
        }
        if bytes >= self.peer_consumed_bytes && writes >= self.peer_consumed_writes {
            self.peer_consumed_bytes = bytes;
            self.peer_consumed_writes = writes;
        }
        Ok(())
    }

    /// Writes our consumption counters into the credit source (read by the next credit WR).
    fn prepare_credit(&mut self) {
        let src = self.v.credit_source() as *mut u64;
        let (b, w) = (self.consumed_bytes, self.consumed_writes);
        // SAFETY: 24 aligned bytes of our mapping. When the credit WR is not inline, an earlier
        // credit WR may still be reading it: the peer then sees a torn record, which its check
        // word rejects, and the WR posted after this write carries the whole record.
        unsafe {
            ptr::write_volatile(src, b);
            ptr::write_volatile(src.add(1), w);
            ptr::write_volatile(src.add(2), b ^ w.rotate_left(32) ^ CREDIT_MAGIC);
        }
        self.reported_bytes = b;
        self.reported_writes = w;
        self.send_wrs[0].send_flags = if self.v.max_inline as usize >= CREDIT_LEN {
            ibv_send_flags::IBV_SEND_INLINE.0
        } else {
            0
        };
    }

    /// Posts the prepared work requests `slots` as one chain (one doorbell).
    fn post_chain(&mut self, slots: &[usize]) -> Result<(), TransportError> {
        debug_assert!(!slots.is_empty() && slots.len() <= 3);
        debug_assert!(self.sq_posted - self.sq_done + slots.len() as u64 <= SQ_DEPTH);
        for (j, &slot) in slots.iter().enumerate() {
            let k = self.sq_posted + j as u64 + 1;
            let next: *mut ibv_send_wr = match slots.get(j + 1) {
                Some(&n) => &mut self.send_wrs[n],
                None => ptr::null_mut(),
            };
            let wr = &mut self.send_wrs[slot];
            wr.wr_id = k;
            wr.next = next;
            if k % SIGNAL_EVERY == 0 {
                wr.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            } else {
                wr.send_flags &= !ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain links live work requests in `send_wrs`, each with one SGE in
        // `send_sges` that points at registered memory (lkey) or, when inline, at bytes that stay
        // valid for the call; the QP is live.
        let rc = unsafe { ibv_post_send(self.v.qp, &mut self.send_wrs[slots[0]], &mut bad) };
        if rc != 0 {
            return Err(verbs_rc("ibv_post_send", rc).into());
        }
        self.sq_posted += slots.len() as u64;
        Ok(())
    }

    /// Posts a credit on its own when a quarter of the ring or of the receive depth is
    /// unreported (the bound that keeps the sender from stalling forever).
    fn credit_if_overdue(&mut self) -> Result<(), TransportError> {
        let ring = RING_BYTES;
        let overdue = self.consumed_bytes - self.reported_bytes >= ring / 4
            || self.consumed_writes - self.reported_writes >= u64::from(RECV_DEPTH) / 4;
        if !overdue {
            return Ok(());
        }
        self.reap_sends()?;
        if self.sq_posted - self.sq_done < SQ_DEPTH {
            self.prepare_credit();
            self.post_chain(&[0])?;
        }
        Ok(())
    }

    /// Takes one receive completion into account.
    fn absorb(&mut self, a: Arrival) -> Result<(), TransportError> {
        if a.status != ibv_wc_status::IBV_WC_SUCCESS {
            return Err(RdmaError::Completion {
                queue: "receive",
                status: status_text(a.status),
                vendor_err: a.vendor_err,
            }
            .into());
        }
        if a.opcode != ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
            return Err(
                RdmaError::PeerProtocol(format!("unexpected receive opcode {}", a.opcode)).into(),
            );
        }
        if a.imm != a.byte_len || a.imm == 0 {
            return Err(RdmaError::PeerProtocol(format!(
                "write of {} bytes announced as {}",
                a.byte_len, a.imm
            ))
            .into());
        }
        self.arrived_bytes += u64::from(a.imm);
        if self.arrived_bytes - self.consumed_bytes > RING_BYTES {
            return Err(RdmaError::PeerProtocol("peer overran the receive ring".into()).into());
        }
        Ok(())
    }

    /// Re-posts `n` receives (a prefix of the pre-chained list, cut after `n`).
    fn repost(&mut self, n: usize) -> Result<(), TransportError> {
        debug_assert!(n >= 1 && n <= self.recv_wrs.len());
        let saved = self.recv_wrs[n - 1].next;
        self.recv_wrs[n - 1].next = ptr::null_mut();
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the first `n` entries of `recv_wrs` form a null-terminated chain of live,
        // buffer-less receive work requests; the QP is live.
        let rc = unsafe { ibv_post_recv(self.v.qp, self.recv_wrs.as_mut_ptr(), &mut bad) };
        self.recv_wrs[n - 1].next = saved;
        if rc != 0 {
            return Err(verbs_rc("ibv_post_recv", rc).into());
        }
        self.consumed_writes += n as u64;
        Ok(())
    }

    /// Copies the bytes that arrived in the ring into `rx`; their ring space is free afterwards.
    fn drain_ring(&mut self) {
        // The completions were read before this point; the data they announce is in place.
        fence(Ordering::Acquire);
        while self.consumed_bytes < self.arrived_bytes {
            let pos = self.consumed_bytes % RING_BYTES;
            let len = (self.arrived_bytes - self.consumed_bytes).min(RING_BYTES - pos);
            // SAFETY: [pos, pos+len) lies in the receive ring; the peer wrote it completely
            // (its completion arrived) and writes there again only after we credit it, which
            // happens after this copy.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.v.ring().add(pos as usize), len as usize)
            };
            self.rx.extend_from_slice(bytes);
            self.consumed_bytes += len;
        }
    }

    /// Reads pending completion-channel events (non-blocking); returns whether there was one.
    fn drain_events(&self) -> bool {
        let mut got = false;
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; the out-pointers are live.
            let rc = unsafe { ibv_get_cq_event(self.v.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                return got;
            }
            // SAFETY: `cq` is the CQ the event was for (ours); one event read, one acknowledged.
            unsafe { ibv_ack_cq_events(cq, 1) };
            got = true;
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
        self.v.max_inline
    }
}

/// The parts of a connection prepared before the peer's record is known.
struct Parts {
    v: Verbs,
    send_wrs: Box<[ibv_send_wr; 3]>,
    send_sges: Box<[ibv_sge; 3]>,
    recv_wrs: Box<[ibv_recv_wr]>,
}

// SAFETY: as for `RdmaConnection`: the raw pointers in the work requests point into boxes this
// value owns or into the verbs objects `v` owns, none of which is tied to a thread.
unsafe impl Send for Parts {}

impl Parts {
    /// Pre-chains the receive work requests and posts all of them (before the peer can write).
    fn new(v: Verbs) -> Result<Parts, TransportError> {
        // SAFETY: work requests and SGEs are plain data (integers, pointers, unions of those);
        // all-zero (null pointers) is valid.
        let zero_wr = || unsafe { MaybeUninit::<ibv_send_wr>::zeroed().assume_init() };
        // SAFETY: as above.
        let zero_sge = || unsafe { MaybeUninit::<ibv_sge>::zeroed().assume_init() };
        let mut recv_wrs: Box<[ibv_recv_wr]> = (0..RECV_DEPTH as usize)
            .map(|i| ibv_recv_wr {
                wr_id: i as u64,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            })
            .collect();
        for i in 0..recv_wrs.len() - 1 {
            let next: *mut ibv_recv_wr = &mut recv_wrs[i + 1];
            recv_wrs[i].next = next;
        }
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: a null-terminated chain of live, buffer-less receive WRs; the QP is in INIT.
        let rc = unsafe { ibv_post_recv(v.qp, recv_wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            return Err(verbs_rc("ibv_post_recv", rc).into());
        }
        Ok(Parts {
            v,
            send_wrs: Box::new([zero_wr(), zero_wr(), zero_wr()]),
            send_sges: Box::new([zero_sge(), zero_sge(), zero_sge()]),
            recv_wrs,
        })
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
    ) -> Result<(), TransportError> {
        self.tx.push_write(seq, term, offset, data)
    }

    fn flush(&mut self) -> Result<bool, TransportError> {
        if self.tx.settle() {
            return Ok(true);
        }
        self.reap_sends()?;
        self.read_credits()?;
        let ring = self.peer_ring_len;
        while self.tx.pending() > 0 {
            let mut room = ring - (self.sent_bytes - self.peer_consumed_bytes);
            let mut writes_room = self.peer_depth - (self.sent_writes - self.peer_consumed_writes);
            let sq_room = SQ_DEPTH - (self.sq_posted - self.sq_done);
            if room == 0 || writes_room == 0 || sq_room < 3 {
                break;
            }
            let mut chain = [0usize; 3];
            let mut n = 0;
            if self.consumed_bytes - self.reported_bytes >= RING_BYTES / PIGGYBACK_DIV
                || self.consumed_writes - self.reported_writes
                    >= u64::from(RECV_DEPTH) / PIGGYBACK_DIV
            {
                // Piggyback our credit in front of the data (same doorbell). Not on every
                // flush: on a software device every work request is a packet the CPUs process.
                self.prepare_credit();
                chain[n] = 0;
                n += 1;
            }
            for slot in 1..3 {
                let left = self.tx.pending() as u64;
                if left == 0 || room == 0 || writes_room == 0 {
                    break;
                }
                let pos = self.sent_bytes % ring;
                let len = left.min(room).min(ring - pos);
                let src = self.tx.unsent().as_ptr();
                let inline = len <= u64::from(self.v.max_inline);
                let addr = if inline {
                    src as u64
                } else {
                    // SAFETY: [pos, pos+len) of the staging area is free: the peer's credit
                    // covers everything written there before (room > 0 was computed from it),
                    // so no earlier work request still reads it. `src` has `len` readable bytes.
                    unsafe {
                        let dst = self.v.staging().add(pos as usize);
                        ptr::copy_nonoverlapping(src, dst, len as usize);
                        dst as u64
                    }
                };
                self.send_sges[slot].addr = addr;
                self.send_sges[slot].length = len as u32;
                let wr = &mut self.send_wrs[slot];
                wr.send_flags = if inline {
                    ibv_send_flags::IBV_SEND_INLINE.0
                } else {
                    0
                };
                wr.imm_data_invalidated_rkey_union.imm_data = (len as u32).to_be();
                wr.wr.rdma.remote_addr = self.peer_ring + pos;
                self.tx.advance(len as usize);
                self.sent_bytes += len;
                self.sent_writes += 1;
                room -= len;
                writes_room -= 1;
                chain[n] = slot;
                n += 1;
            }
            self.post_chain(&chain[..n])?;
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
            let mut counter = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd (clears it).
            unsafe {
                libc::read(
                    self.kick.as_raw_fd(),
                    (&mut counter as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
        let stashed = self.stash.get_mut().len();
        for i in 0..stashed {
            let a = self.stash.get_mut()[i];
            self.absorb(a)?;
            arrived += 1;
        }
        self.stash.get_mut().clear();
        // SAFETY: `recv_cq` is live; `wcs` holds CQ_BATCH writable entries.
        let n = unsafe { ibv_poll_cq(self.v.recv_cq, CQ_BATCH as i32, self.wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs_rc("ibv_poll_cq (receive)", n).into());
        }
        for i in 0..n as usize {
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
        if self.polls % LIVENESS_EVERY == 0 || self.check_peer.replace(false) {
            self.check_liveness()?;
        }
        while out.len() - before < max {
            match Message::decode(&mut self.rx)? {
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
        if self.notify_armed.get() && self.drain_events() {
            self.notify_armed.set(false);
        }
        if !self.notify_armed.get() {
            // SAFETY: `recv_cq` is live and was created with our completion channel.
            let rc = unsafe { ibv_req_notify_cq(self.v.recv_cq, 0) };
            self.notify_armed.set(rc == 0);
        }
        // SAFETY: ibv_wc is plain data; all-zero is valid.
        let mut wcs: [ibv_wc; 8] = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: `recv_cq` is live; `wcs` holds 8 writable entries.
        let n = unsafe { ibv_poll_cq(self.v.recv_cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n > 0 {
            self.stash
                .borrow_mut()
                .extend(wcs[..n as usize].iter().map(Arrival::of));
        }
        if !self.stash.borrow().is_empty() && !self.kicked.get() {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe {
                libc::write(
                    self.kick.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
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
}

/// The primary's side of connection setup, one non-blocking step per [`Connecting::poll`]:
/// TCP connect, then send our setup record, then read the backup's answer and bring the QP to
/// RTS. The engine bounds the whole attempt with its handshake timeout.
pub struct RdmaConnecting {
    settings: RdmaSettings,
    stage: SetupStage,
}

enum SetupStage {
    Tcp(TcpConnecting),
    Answer {
        tcp: TcpStream,
        // Boxed: the verbs objects and work requests are large, the other stages small.
        parts: Box<Parts>,
        psn: u32,
        got: [u8; INFO_LEN],
        len: usize,
    },
    Done,
}

impl RdmaConnecting {
    /// Starts connecting to the backup's setup address `addr`.
    pub fn start(addr: &str, settings: RdmaSettings) -> Result<Self, TransportError> {
        Ok(RdmaConnecting {
            stage: SetupStage::Tcp(TcpConnecting::start(addr)?),
            settings,
        })
    }

    /// The connection once ready, `Ok(None)` while setup is in progress, or why it failed.
    pub fn poll_connection(&mut self) -> Result<Option<RdmaConnection>, TransportError> {
        if let SetupStage::Tcp(t) = &mut self.stage {
            let Some(mut tcp) = t.poll_stream()? else {
                return Ok(None);
            };
            tcp.set_nodelay(true)
                .map_err(io_err("setting TCP_NODELAY"))?;
            let parts = Box::new(Parts::new(Verbs::prepare(&self.settings)?)?);
            let psn = fastrand::u32(..0x100_0000);
            // 64 bytes into a fresh socket's empty send buffer: written whole or not at all.
            let record = parts.v.info(psn).encode();
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
                got: [0; INFO_LEN],
                len: 0,
            };
        }
        let SetupStage::Answer { tcp, got, len, .. } = &mut self.stage else {
            return Err(TransportError::Closed);
        };
        while *len < INFO_LEN {
            match tcp.read(&mut got[*len..]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => *len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading the peer's RDMA setup")(e)),
            }
        }
        let SetupStage::Answer {
            tcp,
            parts,
            psn,
            got,
            ..
        } = std::mem::replace(&mut self.stage, SetupStage::Done)
        else {
            unreachable!("matched above");
        };
        let peer = Info::decode(&got)?;
        parts.v.connect_qp(&peer, psn)?;
        RdmaConnection::finish(*parts, tcp, peer).map(Some)
    }
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
            SetupStage::Answer { tcp, .. } => Some((tcp.as_raw_fd(), libc::POLLIN)),
            SetupStage::Done => None,
        }
    }
}

/// A connection whose setup record is still arriving.
struct Handshake {
    tcp: TcpStream,
    got: [u8; INFO_LEN],
    len: usize,
    deadline: Instant,
}

/// The backup's listening endpoint: a TCP listener for setup, then RDMA.
pub struct RdmaAcceptor {
    listener: TcpListener,
    settings: RdmaSettings,
    pending: Vec<Handshake>,
    /// epoll over the listener and the pending setup connections.
    wake: OwnedFd,
    /// What `bind` found (device, port, GID), for logs.
    pub describe: String,
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
        let wake = new_fd(
            // SAFETY: plain system call with valid flags.
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
            "epoll_create1",
        )?;
        epoll_add(&wake, listener.as_raw_fd())?;
        Ok(RdmaAcceptor {
            listener,
            settings,
            pending: Vec::new(),
            wake,
            describe,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(io_err("reading listen address"))
    }
}

impl Listener for RdmaAcceptor {
    fn try_accept(&mut self) -> Result<Option<Box<dyn Connection>>, TransportError> {
        loop {
            match self.listener.accept() {
                Ok((tcp, _)) => {
                    tcp.set_nonblocking(true)
                        .map_err(io_err("setting socket non-blocking"))?;
                    let _ = tcp.set_nodelay(true);
                    epoll_add(&self.wake, tcp.as_raw_fd())?;
                    self.pending.push(Handshake {
                        tcp,
                        got: [0; INFO_LEN],
                        len: 0,
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
            let read = h.tcp.read(&mut h.got[h.len..]);
            let drop_it = match read {
                Ok(0) => Some("closed before its RDMA setup".to_string()),
                Ok(n) => {
                    h.len += n;
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = drop_it {
                let h = self.pending.swap_remove(i);
                tracing::warn!(peer = ?h.tcp.peer_addr().ok(), reason = %why, "dropping RDMA setup connection");
                continue;
            }
            if h.len == INFO_LEN {
                let h = self.pending.swap_remove(i);
                let info = match Info::decode(&h.got) {
                    Ok(info) => info,
                    Err(e) => {
                        tracing::warn!(peer = ?h.tcp.peer_addr().ok(), error = %e, "refusing RDMA setup");
                        continue;
                    }
                };
                let c = RdmaConnection::accept(h.tcp, info, &self.settings)?;
                return Ok(Some(Box::new(c)));
            }
            if Instant::now() > h.deadline {
                let h = self.pending.swap_remove(i);
                tracing::warn!(peer = ?h.tcp.peer_addr().ok(), "no RDMA setup in time; closing");
                continue;
            }
            i += 1;
        }
        Ok(None)
    }

    fn wait_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_record_roundtrips_and_rejects_garbage() {
        let info = Info {
            mtu: 3,
            qpn: 0x11,
            psn: 0x12_3456,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1],
            ring_addr: 0x7f00_0000_0000,
            ring_len: RING_BYTES,
            credit_addr: 0x7f00_0080_0000,
            rkey: 0x1234,
            recv_depth: RECV_DEPTH,
        };
        assert_eq!(Info::decode(&info.encode()).unwrap(), info);
        let mut bad = info.encode();
        bad[0] ^= 1;
        assert!(matches!(Info::decode(&bad), Err(RdmaError::PeerSetup(_))));
        let mut bad = info.encode();
        bad[4] = 9;
        assert!(Info::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let zero_gid = Info {
            gid: [0; 16],
            ..info
        };
        assert!(Info::decode(&zero_gid.encode()).is_err());
        let huge = Info {
            ring_len: 1 << 40,
            ..info
        };
        assert!(Info::decode(&huge.encode()).is_err());
        assert_eq!(gid_text(&info.gid), "::ffff:10.77.0.1");
    }

    #[test]
    fn a_wrong_device_name_is_a_clear_error() {
        let s = RdmaSettings {
            device: Some("no-such-rdma-device".into()),
            port: 1,
            gid_index: None,
        };
        let e = probe(&s).unwrap_err().to_string();
        assert!(
            e.contains("no RDMA device"),
            "unexpected error for a missing device: {e}"
        );
    }
}
