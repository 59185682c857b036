//! The node's local control endpoint: a Unix stream socket beside the queue file through which
//! an operator's tools (`mirror promote`, `demote`, `resolve`, `status --live`) ask a running
//! node to act or report.
//!
//! ```text
//!  CLI ── request(path, Request) ──► <queue>.ctl ──► ControlServer thread ──► dyn ControlTarget
//!      ◄──────── Response ─────────  (one JSON line each way, then close)     (the node)
//! ```
//!
//! The module knows nothing of the node: the node implements [`ControlTarget`] and hands it to
//! [`ControlServer::start`]. The wire format (one line of JSON each way, versioned) is specified
//! byte for byte in `docs/CONTROL.md`; the tests (`tests.rs`) check the code against the
//! examples there.
//!
//! Who may connect: the socket file is mode 0600, and every accepted connection's peer uid
//! (`SO_PEERCRED`) must be the node's effective uid or root. The file mode alone leaves a window
//! between `bind` and `chmod` (the file is created with the process umask), and does nothing
//! against a peer that got a descriptor some other way; the uid check alone would let any local
//! user fill the accept queue. Together they cover each other.
//!
//! Layout: this file holds the public types; `wire` encodes and parses the lines, `socket` holds
//! the low-level socket calls (all of the module's `unsafe`), `server` is [`ControlServer`] and
//! its thread, `client` is [`request`] and its helpers.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ffi::MIRROR_EINVAL;

mod client;
mod server;
mod socket;
mod wire;

#[cfg(test)]
mod tests;

pub use client::{demote, follow_events, promote, request, resolve, status, verify};
pub use server::ControlServer;

/// The protocol version this build speaks; a request or response with another is refused.
pub const CONTROL_PROTOCOL_VERSION: u64 = 1;
/// Longest request line the server reads, counting its terminating `\n`.
pub const REQUEST_LINE_MAX_BYTES: usize = 4096;
/// Longest response line a server sends and a client reads, counting its terminating `\n`.
pub const RESPONSE_LINE_MAX_BYTES: usize = 64 * 1024;
/// How long the server waits for a complete request line, and for each response write, so that
/// a stuck client cannot hold the (single) control thread for longer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Refusal kind: the request itself was malformed (the message says what was wrong).
pub const KIND_BAD_REQUEST: &str = "bad_request";
/// Refusal kind: the connecting process runs as a user other than the node's (or root).
pub const KIND_PERMISSION_DENIED: &str = "permission_denied";
/// Refusal kind: the node failed while handling the request (a bug: it panicked).
pub const KIND_INTERNAL: &str = "internal";
/// Refusal kind: too many clients already follow the node's events.
pub const KIND_BUSY: &str = "busy";

/// How long the accept loop backs off after an accept error it cannot fix (out of descriptors,
/// out of memory), so that a listener that stays readable does not spin the thread.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How long, and how many bytes, the server reads and discards after its answer while waiting
/// for the client to hang up (see `drain_unread`).
const DRAIN_GRACE: Duration = Duration::from_millis(100);
const DRAIN_MAX_BYTES: usize = 64 * 1024;
/// How long `start` waits for an existing socket's owner to answer before calling it stale.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a node keeps its control socket: the queue path with `.ctl` appended
/// (`/var/lib/x/node.queue` → `/var/lib/x/node.queue.ctl`).
pub fn control_socket_path(queue: &Path) -> PathBuf {
    let mut path = queue.as_os_str().to_owned();
    path.push(".ctl");
    PathBuf::from(path)
}

/// A running node's state, as `mirror status --live` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStatus {
    /// This node's id.
    pub node_id: u64,
    /// `"primary"` or `"backup"`.
    pub role: String,
    /// The node's current term.
    pub term: u64,
    /// Connection phase (the node's name for it, e.g. `"synchronous"`).
    pub phase: String,
    /// The connected (or last known) peer's node id; 0 if none is known.
    pub peer_node_id: u64,
    /// The peer's address, if known.
    pub peer_address: Option<String>,
    /// Primary: applying writes without the backup (`on_peer_loss = continue`).
    pub degraded: bool,
    /// Why the node is fenced (refuses writes), if it is.
    pub fenced: Option<String>,
    /// Records in this node's queue.
    pub queue_records: u64,
    /// Bytes used in this node's queue.
    pub queue_bytes: u64,
    /// Capacity of this node's queue, in bytes.
    pub queue_capacity: u64,
    /// Next sequence number to be assigned (primary) or received (backup).
    pub next_seq: u64,
    /// Highest sequence number applied to this node's region.
    pub applied_through: u64,
    /// Primary: highest sequence number the backup acknowledged. Backup: highest received.
    pub acked_through: u64,
    /// Writes completed since the node opened.
    pub writes_completed: u64,
    /// Bytes moved by the most recent recovery (catch-up or repair).
    pub last_recovery_bytes: u64,
    /// Records moved by the most recent recovery.
    pub last_recovery_records: u64,
    /// Recoveries since the node opened.
    pub recoveries: u64,
    /// A detected split brain awaiting the operator's `resolve`, described, if any.
    pub split_brain: Option<String>,
    /// Why the node stopped, if it failed.
    pub failure: Option<String>,
    /// How the node authenticates its peers: `"secret"`, or why it does not (added to version
    /// 1 later: absent from an older node's answer).
    #[serde(default)]
    pub auth: String,
    /// Payload bytes of writes submitted since the node opened (added within version 1).
    #[serde(default)]
    pub write_bytes: u64,
    /// Synchronous write latency, median and 99th percentile in microseconds, as the upper
    /// bound of the histogram bucket it falls in (null before the first write; added within
    /// version 1).
    #[serde(default)]
    pub write_latency_p50_us: Option<u64>,
    /// See `write_latency_p50_us`.
    #[serde(default)]
    pub write_latency_p99_us: Option<u64>,
    /// Chunks marked in the dirty-chunk bitmap (added within version 1).
    #[serde(default)]
    pub dirty_chunks: u64,
    /// The chunk size of the bitmap, resyncs and verifies (added within version 1).
    #[serde(default)]
    pub chunk_size: u64,
    /// A resync, initial sync or online verify in progress (added within version 1).
    #[serde(default)]
    pub transfer: Option<crate::TransferStats>,
    /// Backup: a resync or catch-up into it has not finished (added within version 1).
    #[serde(default)]
    pub resync_target: bool,
    /// Online verifies finished since the node opened (added within version 1).
    #[serde(default)]
    pub verifies_finished: u64,
    /// What the last online verify found (added within version 1).
    #[serde(default)]
    pub last_verify: Option<VerifySummary>,
}

/// Differing chunks a `status` answer lists at most (the count says how many there were).
pub const LISTED_DIFFERING_CHUNKS: usize = 100;

/// What an online verify found, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    /// `verify` or `verify-repair`.
    pub kind: String,
    /// Chunks compared.
    pub chunks_compared: u64,
    /// Chunks that differed.
    pub chunks_differing: u64,
    /// The first of them (at most [`LISTED_DIFFERING_CHUNKS`]), as `[offset, length]`.
    pub differing: Vec<[u64; 2]>,
    /// Chunks brought over from the primary (`--repair`).
    pub chunks_repaired: u64,
    /// Milliseconds it took.
    pub elapsed_ms: u64,
    /// Why it ended before comparing every chunk (null: it completed).
    pub abandoned: Option<String>,
}

impl VerifySummary {
    /// The summary of a verify's report.
    pub fn of(report: &crate::VerifyReport) -> VerifySummary {
        VerifySummary {
            kind: report.purpose.name().to_string(),
            chunks_compared: report.chunks_compared,
            chunks_differing: report.differing.len() as u64,
            differing: report
                .differing
                .iter()
                .take(LISTED_DIFFERING_CHUNKS)
                .map(|r| [r.offset, u64::from(r.len)])
                .collect(),
            chunks_repaired: report.chunks_repaired,
            elapsed_ms: report.elapsed_us / 1000,
            abandoned: report.abandoned.clone(),
        }
    }
}

impl LiveStatus {
    /// The peer as people read it: `none yet`, or its id and, if known, its address.
    pub fn peer_description(&self) -> String {
        if self.peer_node_id == 0 {
            return "none yet".to_string();
        }
        match self.peer_address.as_deref() {
            Some(a) => format!("{:#x} at {a}", self.peer_node_id),
            None => format!("{:#x}", self.peer_node_id),
        }
    }

    /// The dirty-chunk bitmap and a transfer in progress, in one line for people: `clean`,
    /// `N dirty chunks of S bytes`, and `resync: D/T chunks, R MB/s, eta Es` or the like.
    pub fn bitmap_description(&self) -> String {
        let mut out = if self.dirty_chunks == 0 {
            "clean".to_string()
        } else {
            format!(
                "{} dirty chunks of {} bytes",
                self.dirty_chunks, self.chunk_size
            )
        };
        if self.resync_target {
            out.push_str("; a resync or catch-up into this node is unfinished (not promotable)");
        }
        if let Some(t) = &self.transfer {
            out.push_str(&format!(
                "; {}: {}/{} chunks, {} differing, {} bytes left, {:.1} MB/s, eta {}",
                t.kind,
                t.chunks_done,
                t.chunks_total,
                t.chunks_differing,
                t.bytes_left,
                t.rate_bytes_per_s as f64 / 1e6,
                t.eta_s.map_or("?".into(), |s| format!("{s}s"))
            ));
        }
        out
    }

    /// How full the queue is, in percent of its capacity (0 when the capacity is 0).
    pub fn queue_fill_percent(&self) -> f64 {
        if self.queue_capacity == 0 {
            return 0.0;
        }
        self.queue_bytes as f64 * 100.0 / self.queue_capacity as f64
    }
}

/// The answer to a successful promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The term the node now leads.
    pub term: u64,
    /// Whether it was forced past a live primary (which is fenced at its first contact).
    pub forced: bool,
}

/// The node's refusal of a request, as the C API would report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{message}")]
pub struct ControlRefusal {
    /// The C API's code for the error: a negative `MIRROR_E*` value.
    pub code: i32,
    /// A short, stable name for the kind of refusal (`"wrong_role"`, `"bad_request"`, ...).
    pub kind: String,
    /// The full human message.
    pub message: String,
}

impl ControlRefusal {
    /// A refusal with the given code, kind and message.
    pub fn new(code: i32, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// The server's answer to a malformed request: the client's fault, so `MIRROR_EINVAL`.
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(MIRROR_EINVAL, KIND_BAD_REQUEST, message)
    }
}

/// A request to the node, one per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the node's [`LiveStatus`].
    Status,
    /// Make this node the primary.
    Promote {
        /// Promote even if the node cannot confirm the peer is down or caught up. Absent means
        /// `false`, the safe default.
        #[serde(default)]
        force: bool,
    },
    /// Make this node a backup.
    Demote,
    /// Resolve a split brain: discard the named node's divergent writes at the next handshake.
    Resolve {
        /// The node whose writes are discarded: see [`DiscardNode`] for the syntax.
        discard: String,
    },
    /// Follow the node's events: after the answer line, one JSON line per event (an
    /// [`crate::EventRecord`]) until the client hangs up or the node closes.
    Events,
    /// Start an online verify (primary); its progress and result are in `status`.
    Verify {
        /// Bring differing chunks over from the primary. Absent means `false`.
        #[serde(default)]
        repair: bool,
    },
}

impl Request {
    /// The op name, as on the wire.
    fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Promote { .. } => "promote",
            Request::Demote => "demote",
            Request::Resolve { .. } => "resolve",
            Request::Events => "events",
            Request::Verify { .. } => "verify",
        }
    }
}

/// The node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The answer to `status`.
    Status(Box<LiveStatus>),
    /// The answer to a successful `promote`.
    Promoted(Promoted),
    /// The answer to a successful `demote` or `resolve`.
    Done,
    /// The request was refused (by the node, or by the server as malformed or not permitted).
    Refused(ControlRefusal),
}

/// Which node's divergent writes `resolve` discards: the syntax of [`Request::Resolve`]'s
/// `discard` and of [`ControlTarget::resolve`]'s argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardNode {
    /// The node that receives the request (`local`).
    Local,
    /// Its peer (`peer`).
    Peer,
    /// The node with this id (`0x1f`, or decimal `31`; never 0, which names no node).
    Id(u64),
}

/// A `discard` value that names no node.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "discard '{input}' names no node: expected a node id (decimal, or hex with 0x) \
     or the word local or peer"
)]
pub struct DiscardParseError {
    /// The text given.
    pub input: String,
}

impl FromStr for DiscardNode {
    type Err = DiscardParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = || DiscardParseError {
            input: input.to_owned(),
        };
        let id = match input {
            "local" => return Ok(DiscardNode::Local),
            "peer" => return Ok(DiscardNode::Peer),
            _ => match input
                .strip_prefix("0x")
                .or_else(|| input.strip_prefix("0X"))
            {
                // `from_str_radix` would also take a sign; a node id has none.
                Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    u64::from_str_radix(hex, 16).map_err(|_| bad())?
                }
                Some(_) => return Err(bad()),
                None if !input.is_empty() && input.bytes().all(|b| b.is_ascii_digit()) => {
                    input.parse::<u64>().map_err(|_| bad())?
                }
                None => return Err(bad()),
            },
        };
        if id == 0 {
            return Err(bad());
        }
        Ok(DiscardNode::Id(id))
    }
}

impl fmt::Display for DiscardNode {
    /// The wire form: `local`, `peer`, or the id in hex with `0x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscardNode::Local => f.write_str("local"),
            DiscardNode::Peer => f.write_str("peer"),
            DiscardNode::Id(id) => write!(f, "{id:#x}"),
        }
    }
}

/// What the control endpoint asks of a node. The node implements it; the server calls it on its
/// own thread, one request at a time, so a slow call (a promote that waits for the backup)
/// delays the requests behind it.
///
/// The target must not own the [`ControlServer`] that serves it: the server holds the target,
/// and that cycle would keep both alive.
pub trait ControlTarget: Send + Sync + 'static {
    /// The node's state now.
    fn live_status(&self) -> LiveStatus;
    /// Make this node the primary; `force` skips the checks that the peer is down or caught up.
    fn promote(&self, force: bool) -> Result<Promoted, ControlRefusal>;
    /// Make this node a backup.
    fn demote(&self) -> Result<(), ControlRefusal>;
    /// Operator's split-brain resolution: discard the named node's divergent writes at the next
    /// handshake. `discard` is a node id (hex `0x...` or decimal) or the words `local` / `peer`;
    /// the server has already checked that it parses as a [`DiscardNode`].
    fn resolve(&self, discard: &str) -> Result<(), ControlRefusal>;
    /// A subscription to the node's events (for `events`).
    fn subscribe(&self) -> Result<crate::Events, ControlRefusal>;
    /// Start an online verify; it runs on, and `status` reports its progress and result.
    fn verify(&self, repair: bool) -> Result<(), ControlRefusal>;
}

/// What went wrong on the local side of the control endpoint (starting a server, or a client's
/// request). A refusal by the node is [`ControlError::Refused`] (from the helpers) or
/// [`Response::Refused`] (from [`request`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Environment: no server answers at the path.
    #[error("cannot connect to the control socket {}: {source} ({hint})", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
        /// What probably went wrong.
        hint: &'static str,
    },
    /// The node did not answer in time.
    #[error(
        "the node at {} did not answer within {timeout:?} (while {waiting_for})",
        path.display()
    )]
    TimedOut {
        /// The socket path.
        path: PathBuf,
        /// The caller's timeout for the whole exchange.
        timeout: Duration,
        /// What was being waited for.
        waiting_for: &'static str,
    },
    /// Environment: an operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// Peer's fault: the server's answer does not follow the protocol.
    #[error("bad response from the control socket {}: {why}", path.display())]
    BadResponse {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The node refused the request (from the helpers [`status`], [`promote`], ...).
    #[error("the node refused: {} [{}, code {}]", .0.message, .0.kind, .0.code)]
    Refused(ControlRefusal),
    /// Starting a server: a live server already answers at the path.
    #[error("another node is running: its control socket {} answers", path.display())]
    LiveSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Starting a server: something other than a socket is at the path; it is never removed.
    #[error(
        "{} is a {what}, not a socket; refusing to replace it with the control socket",
        path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there (`"regular file"`, `"directory"`, `"symbolic link"`, ...).
        what: &'static str,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ControlError {
    move |source| ControlError::Io {
        context: context.into(),
        source,
    }
}
