//! RDMA verbs transport: reliable-connected queue pairs through libibverbs (`rdma-sys`).
//!
//! The engine sees exactly what the TCP transport gives it: the same `mirror_proto` frames,
//! decoded into the same [`Message`](mirror_proto::Message)s. Only the bytes travel differently:
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
//! - **Sleeping**: [`Connection::wait_fd`](super::Connection::wait_fd) arms the receive CQ's
//!   completion channel, polls the CQ once more (a completion that landed before the arming raises
//!   no event; such completions are stashed and an eventfd is kicked), and returns an epoll
//!   descriptor over the completion channel, the TCP liveness socket and that eventfd: it becomes
//!   readable when data arrives, when the peer goes away, or at once when data already arrived.
//! - **Failures**: an error completion (a QP in error, retries exhausted), the liveness socket
//!   closing, or a peer that violates the ring or credit bounds is a
//!   [`TransportError`]; the engine then drops the connection, and its
//!   reconnection and recovery take over.
//!
//! Why anonymous memory: on current kernels a writable file-backed `MAP_SHARED` mapping (and an
//! FS-DAX mapping) cannot be long-term pinned for a memory region, so the ring is not the
//! persistent queue; the backup copies frames out of the ring and appends them to its queue like
//! any other. See docs/ARCHITECTURE.md, "RDMA transport".
//!
//! One job per file:
//!
//! - `verbs.rs`: the verbs calls, thin unsafe wrappers over `rdma-sys` (device, port and GID
//!   lookup; PD, CQ, QP and MR creation; QP state transitions; posting and polling; the
//!   registered mapping with its ring, staging area and credit slots).
//! - `setup.rs`: the 64-byte versioned setup record exchanged over TCP (pure code).
//! - `credit.rs`: the credit arithmetic (room, when a credit is due, the check word, ring offsets
//!   and the wrap split), pure code with property tests that need no RDMA device.
//! - `connection.rs`: [`RdmaConnection`], [`RdmaConnecting`] and [`RdmaAcceptor`], which tie
//!   them together behind the transport traits.

mod connection;
mod credit;
mod setup;
mod verbs;

use std::io;

use thiserror::Error;

use super::TransportError;
use crate::config::Config;

pub use connection::{RdmaAcceptor, RdmaConnecting, RdmaConnection};
pub use verbs::probe;

/// Bytes of each side's receive ring (and of its send staging area).
pub const RING_BYTES: u64 = 4 << 20;

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
