//! The primary/backup state machine.
//!
//! Inputs are method calls (`submit`, `on_message`, `on_connected`, `on_tick`, ...); outputs are
//! [`Action`]s that the driver (the real node or a simulator) must execute **in order** before it
//! feeds the next input. The core never touches a socket, a file or a clock: time comes in through
//! [`Core::set_now`], and everything persistent is done by the driver on the core's request.
//!
//! The safety rules of the mechanism fall out of the structure:
//! - the primary emits `Apply` for a client write only from the ack transition (or, under
//!   `on_peer_loss = continue`, from the peer-loss transition, which marks the node degraded);
//! - the backup emits `Send(Ack)` only after the `Append`s (and, in `power`/`pmem` modes, the
//!   `SyncQueue`) of every request it acknowledges;
//! - a node emits `Trim` only up to what the *other* node reported durably applied, and never past
//!   what it applied itself.

use bytes::Bytes;
use thiserror::Error;

use crate::chunks::{ChunkGeometry, ChunkSet};
use crate::handshake::{
    decide_split_brain, reconcile_resolving, Identity, LogView, SplitBrain, SplitBrainPolicy,
    Unreconcilable, Verdict,
};
use crate::payload::Payload;
use crate::term::{next_term, TermHistory};
use crate::wire::{ChunkRange, Hello, Message, RegionRange, RejectCode, WireRole, MAX_WRITE_LEN};

mod backup;
mod primary;
mod transfer;

use backup::BackupSide;

/// How long a node's applied progress may wait for a message it can ride with (a backup's next
/// ack, a primary's next write) before it is reported on its own. A report only lets the peer
/// trim its queue, which is never urgent, while sending it right after each apply doubled the
/// sends per synchronous write (one system call and one wake-up of the peer each, just before
/// the next write's).
pub const APPLIED_REPORT_DELAY_US: u64 = 100;
use primary::PrimarySide;
pub use transfer::{transfer_window, TRANSFER_WINDOW_BYTES};
pub use transfer::{TransferProgress, TransferPurpose, VerifyError, VerifyReport};

/// What the primary does with writes while the backup is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Apply locally without an ack and keep the requests in the primary's queue (degraded mode);
    /// they are replayed into the backup when it returns.
    Continue,
    /// Hold writes until the backup returns; callers see their own timeout expire meanwhile.
    Block,
}

/// What a primary does once it learns that a newer primary exists (a higher term, from any
/// message of any peer): it never applies or completes another write of its old term either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedPolicy {
    /// Become a backup: the newer primary then repairs this node's divergent suffix and
    /// catches it up (the default: the node rejoins without an operator).
    Demote,
    /// Stop the node (it fails with the fenced error); its queue remembers that it was
    /// superseded, so reopening it as a primary is refused.
    Stop,
}

/// Settings of a core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's id (from its queue header; never 0).
    pub node_id: u64,
    /// Size of the mirrored region in bytes.
    pub region_size: u64,
    /// Queue file format version of this node; peers must match.
    pub queue_format_version: u32,
    /// Primary only: behaviour while the backup is unreachable.
    pub on_peer_loss: PeerLossPolicy,
    /// Primary only: what to do once superseded by a newer primary.
    pub on_fenced: FencedPolicy,
    /// What to do when a handshake finds a split brain (both nodes completed writes the other
    /// lacks). Configure the same on both nodes: where they differ, the stricter holds.
    pub after_split_brain: SplitBrainPolicy,
    /// Primary: an outstanding write not acknowledged within this time, or a backup silent this
    /// long, means the backup is lost. Backup: a primary silent this long is dropped. Both
    /// announce it in their Hello (`silence_timeout_us`) so that the peer heartbeats in time.
    pub ack_timeout_us: u64,
    /// Both: a handshake (or the replay that follows it) that makes no progress for this long fails.
    pub handshake_timeout_us: u64,
    /// Whether the queue must be made durable (`SyncQueue`) before a request is acknowledged
    /// (backup) or applied (primary: with or without an ack, so that every write completed to a
    /// caller is in the primary's own durable queue and survives its power loss). True in
    /// `power` and `pmem` modes. The primary's sync runs after the pass's sends, so it overlaps
    /// the round trip to the backup.
    pub sync_queue_before_ack: bool,
    /// Largest payload of one write (bounded by the queue's record size and the wire).
    pub max_write_len: usize,
    /// Capacity of this node's queue in bytes (announced in the handshake).
    pub queue_capacity: u64,
    /// When false, executing `CommitApplied` (in order) makes it durable, and the core counts it
    /// durable at once. When true, `CommitApplied` is a request that the driver may batch (a
    /// periodic checkpoint); the core reports to the peer and trims only up to what the driver
    /// confirms with [`Core::on_applied_durable`]. Nodes in `power`/`pmem` mode defer, so that a
    /// region sync is not paid per batch.
    pub deferred_commit: bool,
    /// The region's chunk size (a power of two, see [`ChunkGeometry`]): the unit of the
    /// dirty-chunk bitmap, of a resync and of an online verify.
    pub chunk_size: u64,
    /// Bytes of region per second a resync or a verify may process (0: no limit).
    pub resync_rate: u64,
    /// A backup's consent to an initial sync (announced in its Hello): when the primary's queue
    /// cannot catch it up, its whole region is compared chunk by chunk and the differing
    /// chunks are brought over; a new backup bound to nobody may also replace the node the
    /// primary is bound to.
    pub initial_sync: bool,
}

/// What a node recovered from its own queue when it started.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Node id of the peer this node is bound to (0: none yet).
    pub peer_node_id: u64,
    /// Highest sequence number durably applied to this node's region.
    pub applied_through: u64,
    /// Oldest sequence number held in the queue, if any.
    pub first_seq: Option<u64>,
    /// Highest sequence number ever appended (0 if none).
    pub last_seq: u64,
    /// Records held in the queue with `seq > applied_through`, in order.
    pub unapplied: Vec<Record>,
    /// The highest term the node persisted.
    pub current_term: u64,
    /// Terms along the node's log.
    pub term_history: TermHistory,
    /// The first seq the node completed as a primary without its peer (0: none; see
    /// [`Hello::alone_from`]).
    pub alone_from: u64,
    /// A repair of this node's divergent suffix after this common point began and did not
    /// finish (its discarded-records file says so): it is not promoted until one does.
    pub repair_unfinished_after: Option<u64>,
    /// The chunks of the node's dirty-chunk bitmap (empty when it has none).
    pub dirty: ChunkSet,
    /// The bitmap covers every record folded out of the queue from this seq on (0: none).
    pub resync_from: u64,
    /// A resync into this node (from the primary with this id, 0 if unknown), or a catch-up
    /// that writes records into its region ahead of its log, began and did not finish: its
    /// region is inconsistent, so it is not promoted until one does.
    pub resync_target: Option<u64>,
    /// The region is all zeros: its file was created at this start (see
    /// [`Hello::region_blank`]). False when unknown.
    pub region_blank: bool,
}

/// One write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Term of the primary incarnation that assigned `seq`.
    pub term: u64,
    /// Byte offset in the region.
    pub offset: u64,
    /// Bytes to write, with their crc.
    pub data: Payload,
}

/// Why a connection was dropped by the core.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PeerFault {
    /// The backup did not acknowledge an outstanding write in time.
    #[error("backup did not acknowledge within {timeout_us} us")]
    AckTimeout {
        /// The configured timeout.
        timeout_us: u64,
    },
    /// The peer sent nothing, not even its heartbeat, for this long: its host died or restarted
    /// without our connection noticing, or the connection is half-open (our frames or theirs
    /// vanish on the way).
    #[error("peer silent for {timeout_us} us (no frame, not even a heartbeat)")]
    Silent {
        /// This node's ack timeout, which bounds the silence.
        timeout_us: u64,
    },
    /// The handshake or replay stalled.
    #[error("handshake made no progress within {timeout_us} us")]
    HandshakeTimeout {
        /// The configured timeout.
        timeout_us: u64,
    },
    /// The peer broke the protocol.
    #[error("peer broke the protocol: {0}")]
    Violation(String),
    /// The peer refused us.
    #[error("peer rejected the connection ({code:?}): {reason}")]
    Rejected {
        /// Code from the peer.
        code: RejectCode,
        /// Reason text from the peer.
        reason: String,
    },
    /// The primary wrote degraded while the backup, which planned from the primary's `Hello`,
    /// started replaying records at the same seqs: reconnect, and the next handshake sees the
    /// new writes (whose newer term wins).
    #[error("the primary wrote through seq {wrote_through} during the handshake while the backup replays from seq {replay_from}; reconnecting")]
    HandshakeRaced {
        /// The primary's last seq now.
        wrote_through: u64,
        /// The first seq the backup replays.
        replay_from: u64,
    },
    /// A split brain keeps the two nodes apart (the text says which writes each holds, and
    /// what the operator may do).
    #[error("{0}")]
    SplitBrain(String),
    /// This node changed its role (promoted, demoted or fenced): the conversation of the old
    /// role ends; the next one starts with a new handshake.
    #[error("this node is now a {now:?}; the connection of its old role ends")]
    RoleChanged {
        /// The new role.
        now: WireRole,
    },
}

/// Conditions that stop a node: continuing could lose or corrupt data, or the configuration is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FatalError {
    /// The peer refused this node for a reason retrying cannot fix.
    #[error("peer rejected this node ({code:?}): {reason}")]
    Rejected {
        /// Code from the peer.
        code: RejectCode,
        /// Reason text.
        reason: String,
    },
    /// The peer is not compatible with this node.
    #[error("incompatible peer: {0}")]
    Incompatible(String),
    /// The two queues cannot be reconciled without a full copy of the region.
    #[error("cannot recover without a full remirror: {0}")]
    Unrecoverable(String),
    /// A newer primary exists and this primary's policy (`on_fenced = stop`) is to stop.
    #[error("{0}")]
    Fenced(Fence),
}

/// Why a primary was fenced: the newer term it learned of, and from whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The newer term (None: a peer refused this primary as stale without naming it).
    pub term: Option<u64>,
    /// The node that told (0: unknown).
    pub by_node: u64,
    /// This primary's own term.
    pub own_term: u64,
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fenced: a newer primary exists (")?;
        match self.term {
            Some(t) => write!(f, "term {t}")?,
            None => write!(f, "a newer term")?,
        }
        if self.by_node != 0 {
            write!(f, ", learned from node {:#x}", self.by_node)?;
        }
        write!(
            f,
            ", above this primary's term {}); it completes no more writes",
            self.own_term
        )
    }
}

/// Why writes stop being taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritesRefused {
    /// The operator demoted this primary.
    Demoted,
    /// A newer primary exists.
    Fenced(Fence),
    /// A split brain was resolved against this primary's writes (by the policy or an
    /// operator): they are discarded (saved first) and the other node becomes the primary.
    LostSplitBrain(SplitBrain),
}

/// Why a promotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PromoteError {
    /// The node is already a primary.
    #[error("this node is already a primary (term {term})")]
    AlreadyPrimary {
        /// Its term.
        term: u64,
    },
    /// The backup is connected to a primary that is alive: promoting it would make two.
    #[error("this backup is connected to primary {primary:#x}, which is alive: demote that primary first, or force the promotion (which fences it: it completes no more writes once it meets this node)")]
    PeerAlive {
        /// The live primary.
        primary: u64,
    },
    /// The backup's log or region is not in a state a primary can start from.
    #[error("this backup is not caught up with what it acknowledged: {why}")]
    NotCaughtUp {
        /// What is missing, and what to do.
        why: String,
    },
    /// The node has failed.
    #[error("this node has failed; reopen it")]
    Failed,
}

/// Why a demotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DemoteError {
    /// The node is already a backup.
    #[error("this node is already a backup")]
    AlreadyBackup,
    /// The node has failed.
    #[error("this node has failed; reopen it (as a backup to rejoin)")]
    Failed,
}

impl From<Unreconcilable> for FatalError {
    fn from(u: Unreconcilable) -> Self {
        match u {
            Unreconcilable::StaleTerm { .. } => {
                let (code, reason) = u.reject();
                FatalError::Rejected { code, reason }
            }
            Unreconcilable::Unrecoverable(why) | Unreconcilable::NeedsInitialSync(why) => {
                FatalError::Unrecoverable(why)
            }
            // Answered by the split-brain policy where it arises; were it to stop a node, it
            // would say what it is.
            Unreconcilable::SplitBrain(sb) => FatalError::Unrecoverable(sb.to_string()),
        }
    }
}

/// Names one peer connection. Inputs say which connection they come from and actions which one
/// they are for, so that a driver never hands a stale connection's frames to the core, nor the
/// core's words for one connection to another (and so that a replica can later serve more
/// than one peer). The driver chooses the ids: a new one for every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

// Each write makes several actions, moved by value from the core to its driver: keep them no
// larger than a `Send` of a `Write` (see `Message::Hello`).
const _: () = assert!(std::mem::size_of::<Action>() <= 88);

/// A request the core makes of its driver. Execute in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to the peer.
    Send {
        /// The peer connection.
        to: PeerId,
        /// The message.
        msg: Message,
    },
    /// Send a `Write` message for every record in the local queue with `from_seq <= seq <= through_seq`,
    /// in order (catch-up of a peer that missed them). Count their bytes as recovery traffic.
    SendQueued {
        /// The peer connection.
        to: PeerId,
        /// First sequence number to send.
        from_seq: u64,
        /// Last sequence number to send.
        through_seq: u64,
    },
    /// Append this record to the local persistent queue.
    Append {
        /// The record.
        record: Record,
        /// Part of a recovery (catch-up or replay): count its bytes as recovery traffic.
        recovery: bool,
    },
    /// Make every appended record durable per the durability mode (group commit).
    SyncQueue,
    /// Write this record into the local region.
    Apply(Record),
    /// Backup, during a catch-up: write this record into the local region without queueing
    /// it. The primary applied it before this connection (it never needs our copy back), and
    /// keeps it until we report it applied, so a crash before our region holds it durably
    /// only makes the primary send it again. An [`Action::AdoptLog`] through it follows once
    /// the region is durable (after an [`Action::SyncRegion`]); only then do we acknowledge
    /// it. Count its bytes as recovery traffic.
    ApplyCaughtUp(Record),
    /// Make the region durable through every `Apply` so far and record `through` as the queue
    /// header's `applied_through`.
    CommitApplied {
        /// Highest applied sequence number.
        through: u64,
    },
    /// Delete local queue records with `seq <= through`.
    Trim {
        /// Sequence number to trim through.
        through: u64,
    },
    /// Persist the peer's node id in the queue header: from now on only that peer is accepted.
    BindPeer {
        /// The peer's node id.
        node_id: u64,
    },
    /// Every submission with a ticket `<= ticket` is complete.
    Complete {
        /// Highest completed ticket.
        ticket: u64,
    },
    /// Close this peer's connection (the driver then reconnects as usual).
    Disconnect {
        /// The peer connection.
        peer: PeerId,
        /// Why.
        fault: PeerFault,
    },
    /// Send this reject to the peer and close its connection.
    Reject {
        /// The peer connection.
        peer: PeerId,
        /// The code.
        code: RejectCode,
        /// Human-readable detail.
        reason: String,
    },
    /// A recovery handshake started: reset the "bytes moved by the last recovery" counter.
    RecoveryStarted,
    /// Persist `term` as the node's current term (durable before the next action): a primary's
    /// new term before its first write, a backup's record of the newest primary it met.
    PersistTerm {
        /// The term.
        term: u64,
    },
    /// Backup: the queue's records in `(after, through]` are a divergent suffix. Save them
    /// (durably, beside the queue) and send `RepairRequest`s naming the byte ranges they wrote.
    RequestRepair {
        /// The peer to ask.
        peer: PeerId,
        /// The common point.
        after: u64,
        /// The last divergent seq.
        through: u64,
    },
    /// Primary: send the current bytes of these region ranges as `RepairData` messages.
    SendRegion {
        /// The peer that asked.
        to: PeerId,
        /// The ranges the backup asked for.
        ranges: Vec<RegionRange>,
    },
    /// Backup: write repair bytes into the region (not through the queue).
    RepairRegion {
        /// Byte offset.
        offset: u64,
        /// The primary's bytes.
        data: Bytes,
    },
    /// Backup: make the region durable (it holds the repaired ranges), then drop every queue
    /// record after `after` (the saved divergent suffix).
    TruncateAfter {
        /// The common point.
        after: u64,
    },
    /// This node stops being a primary: every submission not yet completed (and every later
    /// one, until it is a primary again) fails with `reason`. Emitted before anything that
    /// follows from the change; no `Complete` follows it for those tickets.
    RefuseWrites {
        /// Why.
        reason: WritesRefused,
    },
    /// Persist where this node began completing writes without its peer (0: clear), durable
    /// before the next action (an apply whose caller completes).
    PersistAloneFrom {
        /// The first such seq.
        seq: u64,
    },
    /// Persist the node's role in its queue (durable before the next action). `superseded`:
    /// the node learned, as a primary, of a newer primary (it was fenced) and has not been
    /// promoted since: reopening it as a primary is refused.
    PersistRole {
        /// The role.
        role: WireRole,
        /// Fenced and stopped.
        superseded: bool,
    },
    /// Stop the node with this error.
    Fatal(FatalError),
    /// Primary, its peer away and its queue out of room: fold the queue's records through
    /// `through` (all of them, applied) into the dirty-chunk bitmap, then drop them. In order:
    /// make the region durable and record `applied_through = through`; mark the chunks every
    /// record wrote, and the bitmap's `resync_from` if it had none, durably; trim the queue
    /// through `through`; then tell the core the chunks ([`Replica::on_folded`]).
    Fold {
        /// The last seq to fold.
        through: u64,
    },
    /// Primary: mark every chunk dirty and set the bitmap's `resync_from` (durably): an initial
    /// sync begins (and resumes from the bitmap after a crash).
    MarkAllDirty {
        /// The first seq the bitmap now covers.
        resync_from: u64,
    },
    /// Primary: the backup holds this chunk durably: clear its bit (losing the clear in a
    /// crash only resends the chunk, so it need not be synced).
    ClearDirty {
        /// The chunk index.
        chunk: u64,
    },
    /// Primary: the backup holds everything the bitmap describes: clear every bit and
    /// `resync_from`, durably.
    ResetDirty,
    /// Primary: send `ChunkDigest` for `range`, the digest of the region's bytes with the
    /// queue's records `overlay_from..=overlay_through` (sent, not yet applied) written over
    /// them: the bytes as of this point of the stream.
    SendDigest {
        /// The peer connection.
        to: PeerId,
        /// The chunk.
        range: ChunkRange,
        /// First queued record to lay over the region's bytes.
        overlay_from: u64,
        /// Last one (below `overlay_from`: none).
        overlay_through: u64,
    },
    /// Primary: send `ChunkData` for `range`, the region's bytes with the same overlay as
    /// [`Action::SendDigest`].
    SendChunk {
        /// The peer connection.
        to: PeerId,
        /// The chunk.
        range: ChunkRange,
        /// First queued record to lay over the region's bytes.
        overlay_from: u64,
        /// Last one (below `overlay_from`: none).
        overlay_through: u64,
        /// The backup's region is blank there (a resync into a blank region): if the bytes
        /// are all zeros, send nothing and tell [`Replica::on_chunk_elided`] instead.
        elide_zero: bool,
    },
    /// Backup: compare the region's bytes of `range` with `digest` and send `ChunkVerdict`.
    CompareChunk {
        /// The peer connection.
        to: PeerId,
        /// The chunk.
        range: ChunkRange,
        /// The primary's digest.
        digest: [u8; 16],
    },
    /// Backup: write a resync's chunk bytes into the region (not through the queue).
    InstallChunk {
        /// Byte offset.
        offset: u64,
        /// The primary's bytes.
        data: Bytes,
    },
    /// Backup: make the region durable (chunks installed before a `ChunkHeld`).
    SyncRegion,
    /// Backup: a resync into this node begins, or a catch-up that writes records into its
    /// region ahead of its log ([`Action::ApplyCaughtUp`]): make the region and
    /// `applied_through` durable (nothing in the queue may be applied again over a resynced
    /// chunk after a crash), then record durably that the node is a resync target of
    /// `primary` (its region may be inconsistent until the transfer ends).
    BeginResyncTarget {
        /// The primary.
        primary: u64,
        /// Everything through this seq is applied (to be recorded).
        applied_through: u64,
    },
    /// Backup: the transfer the resync-target mark stood for is over (a resync adopted its
    /// log; a catch-up's log holds every record it wrote ahead of it; a handshake found the
    /// log caught up): clear the mark, durably.
    ClearResyncTarget,
    /// Backup: the region holds (durably) every record through `through`: after a resync,
    /// or after the records of a catch-up it applied without queueing them
    /// ([`Action::ApplyCaughtUp`]). The log continues after `through` with `history` (the
    /// primary's through it). Persist the history, drop the queue's records and make the
    /// next seq `through + 1` with everything through it applied, each step durable before
    /// the next. (After a resync a `ClearResyncTarget` follows.)
    AdoptLog {
        /// The last seq the region holds.
        through: u64,
        /// The primary's term history through it.
        history: TermHistory,
    },
    /// A resync or a verify finished (the driver reports it).
    TransferFinished(VerifyReport),
}

/// Why a submission was refused by the core (the driver validates first; these are API misuse).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The node is not a primary.
    #[error("writes are only accepted by a primary")]
    NotPrimary,
    /// The node cannot take writes now (see [`Core::accepts_submissions`]).
    #[error("node is not accepting writes now")]
    NotAccepting,
    /// Empty or oversized write.
    #[error("write of {len} bytes is outside 1..={max}")]
    BadLength {
        /// Length given.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The write does not fit in the region.
    #[error(
        "write at offset {offset} of {len} bytes does not fit in the region of {region_size} bytes"
    )]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Region size.
        region_size: u64,
    },
}

/// Checks that a write of `len` bytes at `offset` is valid for a region of `region_size` bytes.
pub fn check_write(
    offset: u64,
    len: usize,
    region_size: u64,
    max_write_len: usize,
) -> Result<(), SubmitError> {
    let max = max_write_len.min(MAX_WRITE_LEN);
    if len == 0 || len > max {
        return Err(SubmitError::BadLength { len, max });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= region_size => Ok(()),
        _ => Err(SubmitError::OutOfRange {
            offset,
            len,
            region_size,
        }),
    }
}

/// The commit rule, for both roles: asks the driver to make applies through `applied` durable
/// (once per new point). Returns the point to count durable at once when commits are not deferred.
fn request_commit(
    applied: u64,
    requested: &mut u64,
    deferred: bool,
    actions: &mut Vec<Action>,
) -> Option<u64> {
    if applied <= *requested {
        return None;
    }
    *requested = applied;
    actions.push(Action::CommitApplied { through: applied });
    (!deferred).then_some(applied)
}

/// The trim rule, for both roles: records go once the *peer* reported them durably applied, and
/// never past what this node applied itself. `peer_applied` only grows.
fn trim_queue(
    peer_applied: &mut u64,
    reported: u64,
    own_applied: u64,
    first_seq: &mut Option<u64>,
    last_seq: u64,
    actions: &mut Vec<Action>,
) {
    *peer_applied = (*peer_applied).max(reported);
    let through = (*peer_applied).min(own_applied);
    if let Some(first) = *first_seq {
        if through >= first {
            actions.push(Action::Trim { through });
            *first_seq = if through >= last_seq {
                None
            } else {
                Some(through + 1)
            };
        }
    }
}

/// Connection phase, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No peer connection.
    Disconnected,
    /// Hellos being exchanged.
    Handshaking,
    /// The primary is taking the records it missed from the backup.
    Recovering,
    /// A primary brings the chunks its backup lacks over (after a long outage, or an initial
    /// sync); writes go on without the backup meanwhile.
    Resyncing,
    /// Writes are mirrored synchronously.
    Synchronous,
    /// Stopped by a fatal error.
    Failed,
}

/// A snapshot of the core's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Next sequence number to be assigned or received.
    pub next_seq: u64,
    /// Highest sequence number applied locally.
    pub applied_through: u64,
    /// Highest sequence number the peer acknowledged receiving (primary) / this node received (backup).
    pub acked_through: u64,
    /// Highest sequence number the peer reported durably applied.
    pub peer_applied_through: u64,
    /// Writes sent and not yet acknowledged, plus held writes (primary).
    pub in_flight: u64,
    /// The primary is applying writes without the backup (on_peer_loss = continue).
    pub degraded: bool,
    /// Number of completed recoveries (handshakes that reached the synchronous phase).
    pub recoveries: u64,
    /// The node's current term.
    pub current_term: u64,
    /// The split brain that keeps this node from its peer, if the last handshake found one
    /// the policy did not resolve.
    pub split_brain: Option<String>,
    /// Chunks marked in the dirty-chunk bitmap (writes folded out of the queue, or chunks a
    /// resync has yet to bring over).
    pub dirty_chunks: u64,
    /// The chunk size of the bitmap, a resync and a verify.
    pub chunk_size: u64,
    /// A resync or verify in progress (a primary's).
    pub transfer: Option<TransferProgress>,
    /// A backup that is the target of an unfinished resync or catch-up (its region is
    /// inconsistent).
    pub resync_target: bool,
}

/// The silence timeout a node announces in its Hello: its ack timeout, clamped to the field
/// (a shorter announcement only makes the peer heartbeat more often).
fn announced_silence_timeout(ack_timeout_us: u64) -> u32 {
    u32::try_from(ack_timeout_us).unwrap_or(u32::MAX)
}

/// [`reconcile`], or for the simulator's canary a build that matches logs by seq alone (every
/// seq carries the same term on both sides, as before terms existed).
fn reconcile_as_built(
    primary: &LogView,
    backup: &LogView,
    seq_only_matching: bool,
    discard_backup: bool,
) -> Result<crate::handshake::Reconciliation, Unreconcilable> {
    if !seq_only_matching {
        return reconcile_resolving(primary, backup, discard_backup);
    }
    let blind = |v: &LogView| {
        let mut v = v.clone();
        v.history = TermHistory::new();
        if v.last_seq > 0 {
            let _ = v.history.note_append(1, 1);
        }
        v
    };
    reconcile_resolving(&blind(primary), &blind(backup), discard_backup)
}

/// How a handshake's two logs come together: the plan, or a split brain and its verdict (the
/// same on both sides: see [`decide_split_brain`]).
enum Planned {
    Plan(crate::handshake::Reconciliation),
    SplitBrain(SplitBrain, Verdict),
    Refused(Unreconcilable),
}

/// The reconciliation of both roles with the split-brain policy applied.
fn plan_with_policy(
    c: &Common,
    primary: &LogView,
    primary_discard: u64,
    backup: &LogView,
    backup_discard: u64,
) -> Planned {
    match reconcile_as_built(primary, backup, c.seq_only_matching, false) {
        Ok(plan) => Planned::Plan(plan),
        Err(Unreconcilable::SplitBrain(sb)) => {
            let verdict = decide_split_brain(
                c.cfg.after_split_brain,
                &sb,
                [primary_discard, backup_discard],
            );
            if verdict == Verdict::DiscardBackup {
                match reconcile_as_built(primary, backup, c.seq_only_matching, true) {
                    Ok(plan) => Planned::Plan(plan),
                    Err(u) => Planned::Refused(u),
                }
            } else {
                Planned::SplitBrain(sb, verdict)
            }
        }
        Err(u) => Planned::Refused(u),
    }
}

/// What a node says of itself in the compatibility check and its Hello.
fn identity(cfg: &CoreConfig, role: WireRole, peer_node_id: u64, last_seq: u64) -> Identity {
    Identity {
        last_seq,
        role,
        node_id: cfg.node_id,
        peer_node_id,
        region_size: cfg.region_size,
        queue_format_version: cfg.queue_format_version,
        queue_capacity: cfg.queue_capacity,
        initial_sync: role == WireRole::Backup && cfg.initial_sync,
    }
}

/// The Hello of either role.
fn hello_of(
    own: &Identity,
    view: &LogView,
    applied_through: u64,
    ack_timeout_us: u64,
    discard_node: u64,
) -> Hello {
    Hello {
        role: own.role,
        node_id: own.node_id,
        peer_node_id: own.peer_node_id,
        region_size: own.region_size,
        queue_format_version: own.queue_format_version,
        applied_through: applied_through.min(view.last_seq),
        last_seq: view.last_seq,
        first_seq: view.first_seq.unwrap_or(0),
        queue_capacity: own.queue_capacity,
        silence_timeout_us: announced_silence_timeout(ack_timeout_us),
        current_term: view.current_term,
        term_history: view.history.clone(),
        alone_from: view.alone_from,
        discard_node,
        resync_from: view.resync_from,
        initial_sync: own.initial_sync,
        region_blank: false,
    }
}

/// How often a node must send something so that its peer, which announced
/// `peer_silence_timeout_us`, never takes it for dead: four heartbeats per timeout leave room
/// for scheduling delays. A peer that announced nothing is paced by our own ack timeout.
fn heartbeat_interval_us(peer_silence_timeout_us: u32, own_ack_timeout_us: u64) -> u64 {
    let timeout = match peer_silence_timeout_us {
        0 => own_ack_timeout_us,
        announced => u64::from(announced),
    };
    (timeout / 4).max(1)
}

/// What both roles keep: the node's log (its seqs, terms, apply and trim points), the peer it
/// is bound to, time, and the actions waiting for the driver.
#[derive(Debug)]
struct Common {
    cfg: CoreConfig,
    now_us: u64,
    next_seq: u64,
    first_seq: Option<u64>,
    applied_through: u64,
    /// Highest applied seq the driver was asked to make durable.
    commit_requested: u64,
    /// Highest applied seq known durable: what is reported to the peer and bounds trims.
    committed_through: u64,
    peer_node_id: u64,
    peer_applied: u64,
    /// A primary's: the term of its writes. A backup's: the highest primary term it met
    /// (persisted before anything of that term is acknowledged).
    current_term: u64,
    history: TermHistory,
    /// Test-only breakage (the simulator's canary): match logs by seq alone.
    seq_only_matching: bool,
    /// When the peer was last heard from (any message).
    last_heard_us: u64,
    /// The silence timeout the peer announced in its Hello (0: not announced).
    peer_silence_timeout_us: u32,
    recoveries: u64,
    actions: Vec<Action>,
    /// The connection the replica talks to (None: none).
    peer: Option<PeerId>,
    /// See [`Recovered::alone_from`] (persisted on every change).
    alone_from: u64,
    /// An operator's split-brain resolution: the node whose divergent writes go (0: none).
    /// Announced in every Hello until a resolution used it.
    resolve_discard: u64,
    /// The split brain found at the last handshake, while it keeps the nodes apart.
    split_brain: Option<String>,
    /// A role change a handshake decided, done once the current input is.
    role_change: Option<RoleChange>,
    /// The region's chunks.
    geometry: ChunkGeometry,
    /// The dirty-chunk bitmap, as the driver persists it.
    dirty: ChunkSet,
    /// See [`Recovered::resync_from`] (persisted by `Fold` and `MarkAllDirty`).
    resync_from: u64,
    /// The region is all zeros: nothing was written to it since its file was created at this
    /// start (see [`Common::write_region`]).
    region_blank: bool,
}

/// A role change decided inside a handshake (a split-brain verdict).
#[derive(Debug, Clone, Copy)]
enum RoleChange {
    /// This backup's writes won: it becomes the primary.
    WinSplitBrain,
    /// This primary's writes lost: it becomes a backup.
    LoseSplitBrain(SplitBrain),
}

/// The refusal of a primary that stopped (fenced under `on_fenced = stop`, or failed).
fn stopped_primary() -> (RejectCode, String) {
    (
        RejectCode::Unavailable,
        "this primary has stopped (fenced, or failed); restart it as a backup to rejoin".into(),
    )
}

/// What a node says of a split brain that keeps it apart from its peer.
fn split_brain_text(sb: &SplitBrain, policy: SplitBrainPolicy) -> String {
    format!(
        "{sb}. The policy (after_split_brain = {}) keeps the nodes apart: choose the node whose writes after seq {} are discarded (they are saved to a file first) with `mirror resolve --discard NODE` (or Mirror::resolve_split_brain)",
        policy_name(policy),
        sb.common
    )
}

/// A policy as the configuration spells it.
pub fn policy_name(policy: SplitBrainPolicy) -> String {
    match policy {
        SplitBrainPolicy::Disconnect => "disconnect".into(),
        SplitBrainPolicy::DiscardYoungerPrimary => "discard-younger-primary".into(),
        SplitBrainPolicy::DiscardLeastChanges => "discard-least-changes".into(),
        SplitBrainPolicy::DiscardNode(id) => format!("discard-node:{id:#x}"),
    }
}

impl Common {
    fn new(cfg: CoreConfig, rec: &Recovered, current_term: u64) -> Common {
        assert!(cfg.node_id != 0, "node id 0 is reserved");
        assert!(rec.applied_through <= rec.last_seq, "applied beyond queue");
        let geometry = ChunkGeometry::new(cfg.region_size, cfg.chunk_size)
            .expect("chunk size validated by the driver's configuration");
        let mut dirty = ChunkSet::new(geometry.chunk_count());
        if rec.dirty.capacity() == geometry.chunk_count() {
            dirty = rec.dirty.clone();
        }
        Common {
            geometry,
            dirty,
            resync_from: rec.resync_from,
            region_blank: rec.region_blank,
            cfg,
            now_us: 0,
            next_seq: rec.last_seq + 1,
            first_seq: rec.first_seq,
            applied_through: rec.applied_through,
            commit_requested: rec.applied_through,
            committed_through: rec.applied_through,
            peer_node_id: rec.peer_node_id,
            peer_applied: 0,
            current_term,
            history: rec.term_history.clone(),
            seq_only_matching: false,
            last_heard_us: 0,
            peer_silence_timeout_us: 0,
            recoveries: 0,
            actions: Vec::new(),
            peer: None,
            alone_from: rec.alone_from,
            resolve_discard: 0,
            split_brain: None,
            role_change: None,
        }
    }

    /// This node completes `seq` (and what follows) without its peer: remember, durably
    /// before the completion, where that began.
    fn note_alone(&mut self, seq: u64) {
        if self.alone_from == 0 {
            self.alone_from = seq;
            self.actions.push(Action::PersistAloneFrom { seq });
        }
    }

    /// The peer confirmed holding everything this node completed alone (or those records
    /// left the log): nothing is this node's only.
    fn clear_alone(&mut self) {
        if self.alone_from != 0 {
            self.alone_from = 0;
            self.actions.push(Action::PersistAloneFrom { seq: 0 });
        }
    }

    /// The connection the replica talks to; `PeerId(0)` when there is none (a driver drops
    /// what is addressed to a connection it does not have).
    fn to(&self) -> PeerId {
        self.peer.unwrap_or(PeerId(0))
    }

    /// The commit rule of both roles: asks the driver to make the applies so far durable (once
    /// per new point). Returns whether the durable point advanced (commits not deferred).
    fn commit_applied(&mut self) -> bool {
        match request_commit(
            self.applied_through,
            &mut self.commit_requested,
            self.cfg.deferred_commit,
            &mut self.actions,
        ) {
            Some(durable) => self.applied_durable(durable),
            None => false,
        }
    }

    /// The driver made everything applied through `through` durable. Returns whether the
    /// durable point advanced: records the peer already confirmed may have waited for it.
    fn applied_durable(&mut self, through: u64) -> bool {
        let through = through.min(self.commit_requested);
        let advanced = through > self.committed_through;
        if advanced {
            self.committed_through = through;
        }
        advanced
    }

    /// A peer's apply report speaks of the history shared on its connection: once the
    /// connection is gone, it no longer bounds trims (the next handshake restates it, clamped
    /// to the common point).
    fn forget_peer_reports(&mut self) {
        self.peer_applied = 0;
    }

    /// This node's Hello in `role`, announcing the operator's resolution `discard_node`.
    fn own_hello(&self, role: WireRole, discard_node: u64) -> Hello {
        Hello {
            region_blank: role == WireRole::Backup && self.region_blank,
            ..hello_of(
                &identity(&self.cfg, role, self.peer_node_id, self.last_seq()),
                &self.view(),
                self.committed_through,
                self.cfg.ack_timeout_us,
                discard_node,
            )
        }
    }

    /// Asks the driver to write the region (`action` does): it is no longer blank.
    fn write_region(&mut self, action: Action) {
        self.region_blank = false;
        self.actions.push(action);
    }

    fn send(&mut self, msg: Message) {
        let to = self.to();
        self.actions.push(Action::Send { to, msg });
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn view(&self) -> LogView {
        LogView {
            current_term: self.current_term,
            history: self.history.clone(),
            last_seq: self.last_seq(),
            first_seq: self.first_seq,
            alone_from: self.alone_from,
            node_id: self.cfg.node_id,
            resync_from: self.resync_from,
            initial_sync: self.cfg.initial_sync,
        }
    }
}

/// Which role a replica plays, and the state only that role has.
#[derive(Debug)]
enum Side {
    Primary(PrimarySide),
    Backup(BackupSide),
}

/// One replica of the mirrored log: a primary or a backup, the role being state of the replica
/// (as a QUIC connection carries its side). Both roles share the log state, the commit and trim
/// rules, the term history, the heartbeat and the handshake rule (`handshake.rs`); the role's
/// own transitions are in `primary.rs` and `backup.rs`.
///
/// Inputs are the `on_*` methods, `submit`, `set_now` and `end_batch`; outputs are the
/// [`Action`]s that [`Replica::drain_actions`] hands over, to be executed in order before the
/// next input.
#[derive(Debug)]
pub struct Replica {
    common: Common,
    side: Side,
}

impl Replica {
    /// A primary that recovered `rec` from its queue. Any start may have lost the unsynced tail
    /// of its queue, whose seqs it is about to assign again: it starts a new term (its first
    /// action persists it) so that those writes can be told apart from the lost ones.
    pub fn primary(cfg: CoreConfig, rec: Recovered) -> Replica {
        let known = rec.current_term.max(rec.term_history.last_term());
        let current_term = next_term(known, cfg.node_id);
        let mut common = Common::new(cfg, &rec, current_term);
        common
            .actions
            .push(Action::PersistTerm { term: current_term });
        let side = PrimarySide::new(&rec);
        Replica {
            common,
            side: Side::Primary(side),
        }
    }

    /// A backup that recovered `rec` from its queue. Records not yet applied are applied at once
    /// (the first batch of actions).
    pub fn backup(cfg: CoreConfig, rec: Recovered) -> Replica {
        let current_term = rec.current_term.max(rec.term_history.last_term());
        let mut common = Common::new(cfg, &rec, current_term);
        let mut side = BackupSide::new(rec);
        side.apply_received(&mut common);
        Replica {
            common,
            side: Side::Backup(side),
        }
    }

    /// The simulator's second canary: a replica that matches logs by seq alone (it takes a
    /// record of another term at the same seq for the same write, as before terms existed).
    /// The simulator's checkers must catch the silent divergence that follows.
    #[cfg(feature = "canary")]
    pub fn break_log_matching_for_canary(&mut self) {
        self.common.seq_only_matching = true;
    }

    /// Promotes this backup to primary: it starts a new term (persisted before its first
    /// write) and takes writes, alone under `continue` or once a backup joins under `block`.
    /// Refused while connected to a live primary unless `force` (the connection is dropped,
    /// and that primary is fenced when it next meets this node), while a repair of a divergent
    /// suffix is in progress, and on a primary. Returns the new term.
    pub fn promote(&mut self, force: bool) -> Result<u64, PromoteError> {
        let c = &mut self.common;
        let b = match &mut self.side {
            Side::Primary(_) => {
                return Err(PromoteError::AlreadyPrimary {
                    term: c.current_term,
                })
            }
            Side::Backup(b) => b,
        };
        b.check_promotable(c, force)?;
        // What the last pass received is acknowledged and applied before the role changes.
        b.end_batch(c);
        if b.take_resync_target() {
            c.actions.push(Action::ClearResyncTarget);
        }
        self.end_conversation(WireRole::Primary);
        let c = &mut self.common;
        let known = c.current_term.max(c.history.last_term());
        let term = next_term(known, c.cfg.node_id);
        c.current_term = term;
        c.actions.push(Action::PersistTerm { term });
        c.actions.push(Action::PersistRole {
            role: WireRole::Primary,
            superseded: false,
        });
        self.side = Side::Primary(PrimarySide::promoted(c));
        Ok(term)
    }

    /// Demotes this primary to a backup: writes not completed fail (`RefuseWrites`), the
    /// connection to its backup ends, and it waits for a primary, which will repair whatever
    /// of its log the new history does not hold.
    pub fn demote(&mut self) -> Result<(), DemoteError> {
        match &self.side {
            Side::Backup(_) => Err(DemoteError::AlreadyBackup),
            Side::Primary(p) if p.is_failed() => Err(DemoteError::Failed),
            Side::Primary(_) => {
                self.common.actions.push(Action::RefuseWrites {
                    reason: WritesRefused::Demoted,
                });
                self.become_backup(false);
                Ok(())
            }
        }
    }

    /// A peer told this primary of a newer primary (`term`, when it named it): refuse every
    /// write of the old term, then demote or stop as configured.
    fn fence(&mut self, term: Option<u64>, by_node: u64) {
        let Side::Primary(p) = &mut self.side else {
            return;
        };
        if p.is_failed() {
            return;
        }
        let fence = Fence {
            term,
            by_node,
            own_term: self.common.current_term,
        };
        // Durable in this order, each before the next: the superseded mark (from then on a
        // restart as a primary is refused), the newer term (a primary restarted with it but
        // without the mark would write in the other primary's term), and only then the
        // refusal its callers see (a crash before the mark would have it take writes again
        // in its old term after telling them it was fenced; simulator seed 2911).
        let stop = match self.common.cfg.on_fenced {
            FencedPolicy::Demote => {
                self.become_backup(true);
                false
            }
            FencedPolicy::Stop => {
                self.common.actions.push(Action::PersistRole {
                    role: WireRole::Primary,
                    superseded: true,
                });
                true
            }
        };
        let c = &mut self.common;
        if let Some(t) = term.filter(|&t| t > c.current_term) {
            // A backup now: persisted before it acknowledges anything of that term. Stopped:
            // its restart knows what superseded it.
            c.current_term = t;
            c.actions.push(Action::PersistTerm { term: t });
        }
        c.actions.push(Action::RefuseWrites {
            reason: WritesRefused::Fenced(fence),
        });
        if let (true, Side::Primary(p)) = (stop, &mut self.side) {
            p.fail_fenced(c, fence);
        }
    }

    /// The role switch of `demote` and of a fence under `demote`: the delayed and unflushed
    /// records stay in the log (a backup applies what it holds; the next handshake repairs
    /// what the new history lacks), and the conversation of the old role ends.
    fn become_backup(&mut self, superseded: bool) {
        let Side::Primary(p) = &mut self.side else {
            return;
        };
        let held = p.take_unapplied();
        self.end_conversation(WireRole::Backup);
        let c = &mut self.common;
        c.actions.push(Action::PersistRole {
            role: WireRole::Backup,
            superseded,
        });
        let mut side = BackupSide::holding(held);
        side.apply_received(c);
        self.side = Side::Backup(side);
    }

    /// Ends the connection of the role this node is leaving.
    fn end_conversation(&mut self, now: WireRole) {
        let c = &mut self.common;
        if let Some(peer) = c.peer.take() {
            c.actions.push(Action::Disconnect {
                peer,
                fault: PeerFault::RoleChanged { now },
            });
        }
        c.forget_peer_reports();
        c.peer_silence_timeout_us = 0;
    }

    /// A connection that this node accepted says `h` first: may it go on? A backup applies
    /// [`Replica::check_hello`]. A primary hearing a primary of a newer term is fenced (and,
    /// demoted, then judges `h` as a backup would); one of an older term is refused as stale
    /// (it is fenced by the refusal); anything else is refused by role.
    pub fn admit(&mut self, h: &Hello) -> Result<(), (RejectCode, String)> {
        if let Side::Primary(p) = &self.side {
            if p.is_failed() {
                return Err(stopped_primary());
            }
            if h.role == WireRole::Primary && h.node_id != self.common.cfg.node_id {
                if h.current_term > self.common.current_term {
                    self.fence(Some(h.current_term), h.node_id);
                    if matches!(&self.side, Side::Primary(p) if p.is_failed()) {
                        // Fenced and stopped (`on_fenced = stop`): the newer primary retries
                        // until an operator restarts this node as its backup.
                        return Err(stopped_primary());
                    }
                } else {
                    return Err((
                        RejectCode::StaleTerm,
                        format!(
                            "primary {:#x} of term {} met primary {:#x} of the newer term {}: it is stale",
                            h.node_id, h.current_term, self.common.cfg.node_id, self.common.current_term
                        ),
                    ));
                }
            }
        }
        self.check_hello(h)
    }

    /// What this node says of itself now: sent ahead of a `StaleTerm` refusal, so that the
    /// stale primary learns the exact term that superseded it (and persists it).
    pub fn hello(&self) -> Hello {
        let c = &self.common;
        c.own_hello(self.role(), c.resolve_discard)
    }

    /// This replica's role.
    pub fn role(&self) -> WireRole {
        match self.side {
            Side::Primary(_) => WireRole::Primary,
            Side::Backup(_) => WireRole::Backup,
        }
    }

    /// Sets the current time (microseconds on any monotonic clock). Call once per poll pass.
    pub fn set_now(&mut self, now_us: u64) {
        self.common.now_us = self.common.now_us.max(now_us);
    }

    /// A connection to the peer was established (a primary then sends its Hello; a backup
    /// is called before the primary's Hello is fed to it).
    pub fn on_connected(&mut self, peer: PeerId) {
        self.common.peer = Some(peer);
        match &mut self.side {
            Side::Primary(p) => p.on_connected(&mut self.common),
            Side::Backup(b) => b.on_connected(&mut self.common),
        }
    }

    /// An attempt to connect failed (a primary's; a backup listens). Under `continue`, requests
    /// recovered from the primary's own queue are then applied without the backup (degraded)
    /// so that new writes can proceed; under `block` they wait.
    pub fn on_connect_failed(&mut self) {
        if let Side::Primary(p) = &mut self.side {
            p.on_connect_failed(&mut self.common)
        }
    }

    /// The connection to `peer` is gone (a connection the replica no longer talks to changes
    /// nothing).
    pub fn on_disconnected(&mut self, peer: PeerId) {
        if self.common.peer != Some(peer) {
            return;
        }
        match &mut self.side {
            Side::Primary(p) => p.on_disconnected(&mut self.common),
            Side::Backup(b) => b.on_disconnected(&mut self.common),
        }
        self.common.peer = None;
    }

    /// A message from `peer` (frames of a connection the replica no longer talks to are
    /// dropped: they belong to a finished conversation).
    pub fn on_message(&mut self, peer: PeerId, msg: Message) {
        if self.common.peer != Some(peer) {
            return;
        }
        match &mut self.side {
            Side::Primary(p) => {
                if let Some((term, by_node)) = p.superseded_by(&self.common, &msg) {
                    return self.fence(term, by_node);
                }
                p.on_message(&mut self.common, msg)
            }
            Side::Backup(b) => b.on_message(&mut self.common, msg),
        }
        match self.common.role_change.take() {
            Some(RoleChange::WinSplitBrain) => {
                if let Err(e) = self.promote(true) {
                    self.common.split_brain = Some(format!(
                        "won a split brain but could not become the primary: {e}"
                    ));
                }
            }
            Some(RoleChange::LoseSplitBrain(sb)) => {
                self.common.actions.push(Action::RefuseWrites {
                    reason: WritesRefused::LostSplitBrain(sb),
                });
                self.become_backup(false);
            }
            None => {}
        }
    }

    /// An operator's split-brain resolution: the writes of node `discard_node` (this node's
    /// id or its peer's) after the common point go at the next handshake (saved first).
    pub fn resolve_split_brain(&mut self, discard_node: u64) {
        self.common.resolve_discard = discard_node;
    }

    /// The driver made everything applied through `through` durable (only needed with
    /// [`CoreConfig::deferred_commit`]).
    pub fn on_applied_durable(&mut self, through: u64) {
        match &mut self.side {
            Side::Primary(p) => p.on_applied_durable(&mut self.common, through),
            Side::Backup(b) => b.on_applied_durable(&mut self.common, through),
        }
    }

    /// Time passes; called at least once per poll pass while idle.
    pub fn on_tick(&mut self) {
        match &mut self.side {
            Side::Primary(p) => p.on_tick(&mut self.common),
            Side::Backup(b) => b.on_tick(&mut self.common),
        }
    }

    /// The driver finished one pass of inputs: group-commit what the pass produced.
    pub fn end_batch(&mut self) {
        match &mut self.side {
            Side::Primary(p) => p.end_batch(&mut self.common),
            Side::Backup(b) => b.end_batch(&mut self.common),
        }
    }

    /// Takes one client write (primary only). `ticket`s must increase by one per call.
    pub fn submit(&mut self, ticket: u64, offset: u64, data: Payload) -> Result<u64, SubmitError> {
        match &mut self.side {
            Side::Primary(p) => p.submit(&mut self.common, ticket, offset, data),
            Side::Backup(_) => Err(SubmitError::NotPrimary),
        }
    }

    /// Whether `submit` may be called now. While it is false the driver leaves submissions in
    /// its ring (backpressure).
    pub fn accepts_submissions(&self) -> bool {
        match &self.side {
            Side::Primary(p) => p.accepts_submissions(&self.common),
            Side::Backup(_) => false,
        }
    }

    /// Whether a primary that sent `h` may connect to this backup. Pure: the driver uses it to
    /// refuse a second primary without disturbing the current connection.
    pub fn check_hello(&self, h: &Hello) -> Result<(), (RejectCode, String)> {
        match &self.side {
            Side::Backup(b) => b.check_hello(&self.common, h),
            Side::Primary(_) => Err((
                RejectCode::Role,
                "this node is a primary: it takes no connections".into(),
            )),
        }
    }

    /// The primary this backup is connected to, if any (None on a primary).
    pub fn connected_primary(&self) -> Option<u64> {
        match &self.side {
            Side::Backup(b) => b.connected_primary(),
            Side::Primary(_) => None,
        }
    }

    /// Moves the pending actions to the end of `out`, in order.
    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.common.actions);
    }

    /// Connection phase.
    pub fn phase(&self) -> Phase {
        match &self.side {
            Side::Primary(p) => p.phase(),
            Side::Backup(b) => b.phase(),
        }
    }

    /// Whether this node is a primary applying writes without its backup (cheaper than
    /// [`Replica::stats`]).
    pub fn degraded(&self) -> bool {
        match &self.side {
            Side::Primary(p) => p.is_degraded(),
            Side::Backup(_) => false,
        }
    }

    /// The seq the next write will take (cheaper than [`Replica::stats`]).
    pub fn next_seq(&self) -> u64 {
        self.common.next_seq
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        match &self.side {
            Side::Primary(p) => p.stats(&self.common),
            Side::Backup(b) => b.stats(&self.common),
        }
    }

    /// Whether the driver may fold the queue into the dirty-chunk bitmap now ([`Replica::fold`]):
    /// a primary writing without its backup under `continue` (disconnected, waiting for the
    /// backup's Hello, or resyncing), with no write waiting for an ack.
    pub fn may_fold(&self) -> bool {
        match &self.side {
            Side::Primary(p) => p.may_fold(&self.common),
            Side::Backup(_) => false,
        }
    }

    /// The queue has no room for the next write while the backup is away: fold every record
    /// it holds into the dirty-chunk bitmap ([`Action::Fold`]) so that writes go on. Returns
    /// whether a fold was asked for (see [`Replica::may_fold`]).
    pub fn fold(&mut self) -> bool {
        match &mut self.side {
            Side::Primary(p) => p.fold(&mut self.common),
            Side::Backup(_) => false,
        }
    }

    /// The driver executed [`Action::Fold`]: these chunks (index ranges) are now dirty.
    pub fn on_folded(&mut self, chunks: &[std::ops::Range<u64>]) {
        match &mut self.side {
            Side::Primary(p) => p.on_folded(&mut self.common, chunks),
            Side::Backup(_) => {
                for range in chunks {
                    self.common.dirty.insert_range(range.clone());
                }
            }
        }
    }

    /// The chunk of an [`Action::SendChunk`] to `to` with `elide_zero` is all zeros, as the
    /// blank backup's is: it is done without sending it (for a connection that is gone:
    /// nothing).
    pub fn on_chunk_elided(&mut self, to: PeerId, range: ChunkRange) {
        if self.common.peer != Some(to) {
            return;
        }
        if let Side::Primary(p) = &mut self.side {
            p.on_chunk_elided(&mut self.common, range);
        }
    }

    /// Starts an online verify: every chunk of the region is compared with the backup's at a
    /// consistent point of the stream, while writes go on; with `repair`, differing chunks are
    /// brought over. The result comes as [`Action::TransferFinished`].
    pub fn start_verify(&mut self, repair: bool) -> Result<(), VerifyError> {
        match &mut self.side {
            Side::Primary(p) => p.start_verify(&mut self.common, repair),
            Side::Backup(_) => Err(VerifyError::NotPrimary),
        }
    }

    /// Chunks marked in the dirty-chunk bitmap (cheaper than [`Replica::stats`]).
    pub fn dirty_chunks(&self) -> u64 {
        self.common.dirty.len()
    }

    /// The region's chunk geometry.
    pub fn geometry(&self) -> ChunkGeometry {
        self.common.geometry
    }

    /// The driver hit an error it cannot continue from (e.g. the queue device failed).
    pub fn fail(&mut self) {
        match &mut self.side {
            Side::Primary(p) => p.stop(),
            Side::Backup(b) => b.stop(),
        }
    }
}
