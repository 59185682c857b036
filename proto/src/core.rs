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

use std::collections::VecDeque;

use bytes::Bytes;
use thiserror::Error;

use crate::handshake::{check_compatible, reconcile, Identity, LogView, Unreconcilable};
use crate::term::TermHistory;
use crate::wire::{Hello, Message, RegionRange, RejectCode, WireRole, MAX_WRITE_LEN};

/// What the primary does with writes while the backup is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Apply locally without an ack and keep the requests in the primary's queue (degraded mode);
    /// they are replayed into the backup when it returns.
    Continue,
    /// Hold writes until the backup returns; callers see their own timeout expire meanwhile.
    Block,
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
    /// Bytes to write.
    pub data: Bytes,
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
}

impl From<Unreconcilable> for FatalError {
    fn from(u: Unreconcilable) -> Self {
        match u {
            Unreconcilable::StaleTerm { .. } => {
                let (code, reason) = u.reject();
                FatalError::Rejected { code, reason }
            }
            Unreconcilable::Unrecoverable(why) => FatalError::Unrecoverable(why),
        }
    }
}

/// A request the core makes of its driver. Execute in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message on the current connection.
    Send(Message),
    /// Send a `Write` message for every record in the local queue with `from_seq <= seq <= through_seq`,
    /// in order (catch-up of a peer that missed them). Count their bytes as recovery traffic.
    SendQueued {
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
    /// Close the current connection (the driver then reconnects as usual).
    Disconnect(PeerFault),
    /// Send this reject and close the current connection.
    Reject {
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
        /// The common point.
        after: u64,
        /// The last divergent seq.
        through: u64,
    },
    /// Primary: send the current bytes of these region ranges as `RepairData` messages.
    SendRegion {
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
    /// Stop the node with this error.
    Fatal(FatalError),
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
    /// Writes are mirrored synchronously.
    Synchronous,
    /// Stopped by a fatal error.
    Failed,
}

/// A snapshot of the core's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

#[derive(Debug)]
struct Pending {
    record: Record,
    ticket: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrimaryState {
    Disconnected,
    Handshaking {
        since_us: u64,
    },
    Recovering {
        last_rx_us: u64,
        /// Where the backup holds the primary's history once the handshake is done: the
        /// primary takes a replay up to it (if it is above our last seq), `ReplayDone` carries
        /// it, and the primary sends the records after it.
        backup_holds_through: u64,
        /// The backup drops a divergent suffix after this common point: it sends
        /// `RepairRequest`s, the primary answers them and then sends `RepairDone`.
        repair_after: Option<u64>,
    },
    Synchronous,
    Failed,
}

/// The primary's log as its `Hello` announced it: the backup plans from this view, so the
/// primary evaluates the same rule on it.
#[derive(Debug, Clone)]
struct AnnouncedView {
    view: LogView,
}

/// The primary's state machine.
#[derive(Debug)]
pub struct Primary {
    cfg: CoreConfig,
    state: PrimaryState,
    now_us: u64,
    next_seq: u64,
    first_seq: Option<u64>,
    applied_through: u64,
    /// Highest applied seq the driver was asked to make durable.
    commit_requested: u64,
    /// Highest applied seq known durable: what is reported to the peer and bounds trims.
    committed_through: u64,
    reported_through: u64,
    peer_node_id: u64,
    peer_applied: u64,
    /// Delay buffer: requests in the queue that are not yet applied, in sequence order.
    delay: VecDeque<Pending>,
    /// Degraded writes of this batch, applied at the end of the batch after one queue sync.
    degraded_batch: Vec<Pending>,
    acked_through: u64,
    sent_through: u64,
    /// Our log as the Hello of the current handshake announced it.
    announced: Option<AnnouncedView>,
    /// The term of this incarnation: every seq it assigns carries it.
    current_term: u64,
    history: TermHistory,
    /// Highest seq of our own queue known durable (per the durability mode): a record is
    /// applied, and its caller completed, only once it is.
    durable_through: u64,
    /// Test-only breakage (the simulator's canary): match logs by seq alone.
    seq_only_matching: bool,
    awaiting_since_us: Option<u64>,
    /// When the backup was last heard from (any message).
    last_heard_us: u64,
    /// When we last sent the backup anything: our heartbeat is due a quarter of its silence
    /// timeout later.
    last_sent_us: u64,
    /// The silence timeout the backup announced in its Hello (0: not announced).
    peer_silence_timeout_us: u32,
    wrote_this_batch: bool,
    degraded: bool,
    recoveries: u64,
    actions: Vec<Action>,
}

impl Primary {
    /// A primary that recovered `rec` from its queue.
    pub fn new(cfg: CoreConfig, rec: Recovered) -> Self {
        assert!(cfg.node_id != 0, "node id 0 is reserved");
        assert!(rec.applied_through <= rec.last_seq, "applied beyond queue");
        // Any start may have lost the unsynced tail of our queue, whose seqs we are about to
        // assign again: a new term tells those writes apart from the lost ones.
        let current_term = rec.current_term.max(rec.term_history.last_term()) + 1;
        let delay = rec
            .unapplied
            .into_iter()
            .map(|record| Pending {
                record,
                ticket: None,
            })
            .collect();
        Primary {
            cfg,
            state: PrimaryState::Disconnected,
            now_us: 0,
            next_seq: rec.last_seq + 1,
            first_seq: rec.first_seq,
            applied_through: rec.applied_through,
            commit_requested: rec.applied_through,
            committed_through: rec.applied_through,
            reported_through: 0,
            peer_node_id: rec.peer_node_id,
            peer_applied: 0,
            delay,
            degraded_batch: Vec::new(),
            acked_through: 0,
            sent_through: 0,
            announced: None,
            current_term,
            history: rec.term_history,
            durable_through: rec.last_seq,
            seq_only_matching: false,
            awaiting_since_us: None,
            last_heard_us: 0,
            last_sent_us: 0,
            peer_silence_timeout_us: 0,
            wrote_this_batch: false,
            degraded: false,
            recoveries: 0,
            actions: vec![Action::PersistTerm { term: current_term }],
        }
    }

    fn view(&self) -> LogView {
        LogView {
            current_term: self.current_term,
            history: self.history.clone(),
            last_seq: self.last_seq(),
            first_seq: self.first_seq,
        }
    }

    /// The simulator's second canary, primary side: see
    /// [`Backup::break_log_matching_for_canary`].
    #[cfg(feature = "canary")]
    pub fn break_log_matching_for_canary(&mut self) {
        self.seq_only_matching = true;
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether `submit` may be called now. While it is false the driver leaves submissions in
    /// its ring (backpressure).
    pub fn accepts_submissions(&self) -> bool {
        // A full term history (many restarts that wrote while the backup was away) waits for
        // the backup to catch up and trim, as a full queue does.
        if self
            .history
            .check_append(self.next_seq, self.current_term)
            .is_err()
        {
            return false;
        }
        match self.state {
            PrimaryState::Synchronous => true,
            // Under `continue`, a handshake with a peer that does not answer (half-open, stalled)
            // must not stop writes: they go on degraded until the Hello arrives.
            PrimaryState::Disconnected | PrimaryState::Handshaking { .. } => {
                self.cfg.on_peer_loss == PeerLossPolicy::Continue && self.delay.is_empty()
            }
            PrimaryState::Recovering { .. } | PrimaryState::Failed => false,
        }
    }

    /// Takes one write from a caller. `ticket`s must increase by one per call.
    pub fn submit(&mut self, ticket: u64, offset: u64, data: Bytes) -> Result<u64, SubmitError> {
        check_write(
            offset,
            data.len(),
            self.cfg.region_size,
            self.cfg.max_write_len,
        )?;
        if !self.accepts_submissions() {
            return Err(SubmitError::NotAccepting);
        }
        let seq = self.next_seq;
        let term = self.current_term;
        if self.history.note_append(seq, term).is_err() {
            return Err(SubmitError::NotAccepting);
        }
        self.next_seq += 1;
        if !self.cfg.sync_queue_before_ack {
            // Durable as written (process mode: the page cache survives a process crash).
            self.durable_through = seq;
        }
        let record = Record {
            seq,
            term,
            offset,
            data,
        };
        self.first_seq.get_or_insert(seq);
        self.actions.push(Action::Append {
            record: record.clone(),
            recovery: false,
        });
        if self.state == PrimaryState::Synchronous {
            self.send(Message::Write {
                seq,
                term,
                offset,
                data: record.data.clone(),
            });
            self.sent_through = seq;
            self.wrote_this_batch = true;
            self.awaiting_since_us.get_or_insert(self.now_us);
            self.delay.push_back(Pending {
                record,
                ticket: Some(ticket),
            });
        } else {
            // Disconnected under `continue`: applied at the end of the batch, after one sync.
            self.degraded = true;
            self.degraded_batch.push(Pending {
                record,
                ticket: Some(ticket),
            });
        }
        Ok(seq)
    }

    fn apply_pending(&mut self, p: Pending) {
        if p.record.seq > self.applied_through {
            debug_assert_eq!(p.record.seq, self.applied_through + 1, "apply out of order");
            self.applied_through = p.record.seq;
            self.actions.push(Action::Apply(p.record));
        }
        if let Some(ticket) = p.ticket {
            self.actions.push(Action::Complete { ticket });
        }
    }

    /// Makes every appended record durable (one sync for the whole pass), so that records
    /// may be applied and their callers completed.
    fn sync_own_queue(&mut self) {
        if self.durable_through < self.last_seq() {
            self.actions.push(Action::SyncQueue);
            self.durable_through = self.last_seq();
        }
    }

    fn flush_degraded_batch(&mut self) {
        if self.degraded_batch.is_empty() {
            return;
        }
        self.sync_own_queue();
        for p in std::mem::take(&mut self.degraded_batch) {
            self.apply_pending(p);
        }
    }

    /// Applies the delayed records through `through` that our own queue holds durably.
    fn apply_delayed_through(&mut self, through: u64) {
        let through = through.min(self.durable_through);
        while self.delay.front().is_some_and(|p| p.record.seq <= through) {
            let p = self.delay.pop_front().expect("front checked");
            self.apply_pending(p);
        }
    }

    fn commit_applied(&mut self) {
        if let Some(durable) = request_commit(
            self.applied_through,
            &mut self.commit_requested,
            self.cfg.deferred_commit,
            &mut self.actions,
        ) {
            self.on_applied_durable(durable);
        }
    }

    /// The driver made everything applied through `through` durable (see
    /// [`CoreConfig::deferred_commit`]).
    pub fn on_applied_durable(&mut self, through: u64) {
        let through = through.min(self.commit_requested);
        if through > self.committed_through {
            self.committed_through = through;
            // Records the backup already confirmed may have waited for our own apply.
            self.trim(0);
        }
    }

    fn trim(&mut self, peer_applied: u64) {
        let last = self.last_seq();
        trim_queue(
            &mut self.peer_applied,
            peer_applied,
            self.committed_through,
            &mut self.first_seq,
            last,
            &mut self.actions,
        );
        self.history
            .forget_before(self.peer_applied.min(self.committed_through));
    }

    fn lose_peer(&mut self, fault: Option<PeerFault>) {
        if let Some(fault) = fault {
            self.actions.push(Action::Disconnect(fault));
        }
        self.state = PrimaryState::Disconnected;
        self.awaiting_since_us = None;
        self.acked_through = 0;
        self.sent_through = 0;
        if self.cfg.on_peer_loss == PeerLossPolicy::Continue && !self.delay.is_empty() {
            // Every delayed request is in our own queue; apply it without the ack and go degraded.
            self.degraded = true;
            self.sync_own_queue();
            self.apply_delayed_through(u64::MAX);
            self.commit_applied();
        }
    }

    fn fail(&mut self, err: FatalError) {
        self.state = PrimaryState::Failed;
        self.actions.push(Action::Fatal(err));
    }

    fn violation(&mut self, what: String) {
        self.lose_peer(Some(PeerFault::Violation(what)));
    }

    /// A connection to the backup was established.
    pub fn on_connected(&mut self) {
        if self.state != PrimaryState::Disconnected {
            return;
        }
        self.state = PrimaryState::Handshaking {
            since_us: self.now_us,
        };
        let view = self.view();
        // The Hello reports our applied point; progress reports continue from there.
        self.reported_through = self.committed_through;
        let hello = hello_of(
            &identity(&self.cfg, WireRole::Primary, self.peer_node_id),
            &view,
            self.committed_through,
            self.cfg.ack_timeout_us,
        );
        self.announced = Some(AnnouncedView { view });
        self.send(Message::Hello(hello));
    }

    /// An attempt to connect to the backup failed. Under `continue`, requests recovered from our
    /// own queue at start-up are then applied without the backup (degraded), so that new writes
    /// can proceed; under `block` they wait for the backup.
    pub fn on_connect_failed(&mut self) {
        if self.state == PrimaryState::Disconnected {
            self.lose_peer(None);
        }
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self) {
        if matches!(
            self.state,
            PrimaryState::Disconnected | PrimaryState::Failed
        ) {
            return;
        }
        self.lose_peer(None);
    }

    fn on_hello(&mut self, h: Hello) {
        let own = identity(&self.cfg, WireRole::Primary, self.peer_node_id);
        if let Err((_, why)) = check_compatible(&own, &h) {
            return self.fail(FatalError::Incompatible(why));
        }
        let Some(announced) = self.announced.take() else {
            return self.violation("Hello before ours was sent".into());
        };
        // The same rule the backup applied, on the same two views.
        let plan = match reconcile_as_built(
            &announced.view,
            &LogView::of_hello(&h),
            self.seq_only_matching,
        ) {
            Ok(plan) => plan,
            Err(u) => return self.fail(u.into()),
        };
        let p_last = self.last_seq();
        let holds = plan.backup_holds_through;
        if holds > announced.view.last_seq && p_last > announced.view.last_seq {
            // The backup replays seqs that we gave to degraded writes since our Hello. Its
            // records were never completed to a caller (they are not in our durable queue);
            // ours were. The next handshake sees ours, whose term is newer, and the backup
            // drops its copies instead.
            return self.lose_peer(Some(PeerFault::HandshakeRaced {
                wrote_through: p_last,
                replay_from: announced.view.last_seq + 1,
            }));
        }
        if self.peer_node_id == 0 {
            self.peer_node_id = h.node_id;
            self.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        self.peer_silence_timeout_us = h.silence_timeout_us;
        self.actions.push(Action::RecoveryStarted);
        // What the backup holds of our history is acknowledged: apply what we hold of it.
        self.apply_delayed_through(holds.min(p_last));
        self.commit_applied();
        // The backup's apply point counts only on the history we share: never trim a record
        // because the backup applied its own, divergent record of the same seq.
        self.trim(h.applied_through.min(holds));
        self.state = PrimaryState::Recovering {
            last_rx_us: self.now_us,
            backup_holds_through: holds,
            repair_after: plan.backup_discards.then_some(plan.common),
        };
    }

    fn on_replayed_write(&mut self, record: Record, backup_holds_through: u64) {
        let seq = record.seq;
        if seq != self.next_seq || seq > backup_holds_through {
            return self.violation(format!(
                "replayed write {seq}, expected {} (backup announced through {backup_holds_through})",
                self.next_seq
            ));
        }
        if let Err(e) = check_write(
            record.offset,
            record.data.len(),
            self.cfg.region_size,
            usize::MAX,
        ) {
            return self.violation(format!("replayed write {seq}: {e}"));
        }
        if record.term > self.current_term {
            return self.violation(format!(
                "replayed write {seq} carries term {}, above this primary's term {}",
                record.term, self.current_term
            ));
        }
        if let Err(e) = self.history.note_append(seq, record.term) {
            return self.violation(format!("replayed write {seq}: {e}"));
        }
        self.next_seq += 1;
        // Durable (for completion purposes) as soon as written: it completes no caller.
        self.durable_through = self.durable_through.max(seq);
        self.first_seq.get_or_insert(seq);
        self.actions.push(Action::Append {
            record: record.clone(),
            recovery: true,
        });
        self.apply_pending(Pending {
            record,
            ticket: None,
        });
    }

    fn on_replay_done(
        &mut self,
        through: u64,
        backup_holds_through: u64,
        repair_after: Option<u64>,
    ) {
        if through != backup_holds_through || self.last_seq() < backup_holds_through {
            return self.violation(format!(
                "replay ended at {through}, expected {backup_holds_through} (primary now at {})",
                self.last_seq()
            ));
        }
        self.commit_applied();
        if let Some(common) = repair_after {
            // Every range asked for was answered (in order) before this: the backup may drop
            // its divergent suffix now, and takes our records after the common point.
            self.send(Message::RepairDone { through: common });
        }
        let p_last = self.last_seq();
        let holds = backup_holds_through;
        self.acked_through = holds;
        self.sent_through = p_last;
        if holds < p_last {
            self.actions.push(Action::SendQueued {
                from_seq: holds + 1,
                through_seq: p_last,
            });
            self.last_sent_us = self.now_us;
            self.awaiting_since_us = Some(self.now_us);
        }
        self.state = PrimaryState::Synchronous;
        self.degraded = false;
        self.recoveries += 1;
    }

    fn on_ack(&mut self, received_through: u64, applied_through: u64) {
        if received_through < self.acked_through || received_through > self.sent_through {
            return self.violation(format!(
                "ack through {received_through}, but {} were acked and {} sent",
                self.acked_through, self.sent_through
            ));
        }
        let progressed = received_through > self.acked_through;
        self.acked_through = received_through;
        self.apply_delayed_through(received_through);
        // The timeout restarts only on progress: a heartbeat (an ack of nothing new) must not
        // hide writes lost on their way to a backup that is otherwise alive.
        self.awaiting_since_us = if self.acked_through == self.sent_through {
            None
        } else if progressed {
            Some(self.now_us)
        } else {
            self.awaiting_since_us.or(Some(self.now_us))
        };
        self.commit_applied();
        self.trim(applied_through);
    }

    /// A message from the backup.
    pub fn on_message(&mut self, msg: Message) {
        self.last_heard_us = self.now_us;
        match (self.state, msg) {
            (PrimaryState::Failed, _) => {}
            // The backup saw a gap or a write out of range: this connection delivered something
            // wrong (a broken transport, or a bug we would rather see repeat in the logs than
            // stop on). Nothing wrong was appended; reconnect and recover as after any fault.
            (
                _,
                Message::Reject {
                    code: RejectCode::ProtocolViolation,
                    reason,
                },
            ) => {
                self.lose_peer(Some(PeerFault::Rejected {
                    code: RejectCode::ProtocolViolation,
                    reason,
                }));
            }
            // Configuration mismatches (version, region size, roles, binding, capacity) and an
            // unrecoverable history do not heal by reconnecting.
            (_, Message::Reject { code, reason }) => {
                self.fail(FatalError::Rejected { code, reason });
            }
            (PrimaryState::Handshaking { .. }, Message::Hello(h)) => self.on_hello(h),
            (
                PrimaryState::Recovering {
                    backup_holds_through,
                    repair_after,
                    ..
                },
                m,
            ) => {
                self.state = PrimaryState::Recovering {
                    last_rx_us: self.now_us,
                    backup_holds_through,
                    repair_after,
                };
                match m {
                    Message::Write {
                        seq,
                        term,
                        offset,
                        data,
                    } => self.on_replayed_write(
                        Record {
                            seq,
                            term,
                            offset,
                            data,
                        },
                        backup_holds_through,
                    ),
                    Message::RepairRequest { ranges } if repair_after.is_some() => {
                        self.on_repair_request(ranges)
                    }
                    Message::ReplayDone { through } => {
                        self.on_replay_done(through, backup_holds_through, repair_after)
                    }
                    other => self.violation(format!("unexpected {:?} during replay", other.kind())),
                }
                // A long replay keeps the driver busy, and it ticks only when idle.
                self.heartbeat_while_recovering();
            }
            (
                PrimaryState::Synchronous,
                Message::Ack {
                    received_through,
                    applied_through,
                },
            ) => self.on_ack(received_through, applied_through),
            (PrimaryState::Disconnected, _) => {}
            (state, other) => {
                self.violation(format!("unexpected {:?} in state {state:?}", other.kind()))
            }
        }
    }

    /// Time passes; called at least once per poll pass while idle.
    pub fn on_tick(&mut self) {
        match self.state {
            PrimaryState::Synchronous => {
                if let Some(since) = self.awaiting_since_us {
                    if self.now_us.saturating_sub(since) > self.cfg.ack_timeout_us {
                        return self.lose_peer(Some(PeerFault::AckTimeout {
                            timeout_us: self.cfg.ack_timeout_us,
                        }));
                    }
                } else if self.now_us.saturating_sub(self.last_heard_us) > self.cfg.ack_timeout_us {
                    // Idle, and not even the backup's heartbeat arrived: a dead or restarted
                    // peer whose connection never broke on our side.
                    return self.lose_peer(Some(PeerFault::Silent {
                        timeout_us: self.cfg.ack_timeout_us,
                    }));
                }
                if self.committed_through > self.reported_through || self.heartbeat_due() {
                    self.report_applied();
                }
            }
            PrimaryState::Handshaking { since_us: t }
            | PrimaryState::Recovering { last_rx_us: t, .. } => {
                if self.now_us.saturating_sub(t) > self.cfg.handshake_timeout_us {
                    return self.lose_peer(Some(PeerFault::HandshakeTimeout {
                        timeout_us: self.cfg.handshake_timeout_us,
                    }));
                }
                self.heartbeat_while_recovering();
            }
            PrimaryState::Disconnected | PrimaryState::Failed => {}
        }
    }

    fn on_repair_request(&mut self, ranges: Vec<RegionRange>) {
        if let Some(bad) = ranges
            .iter()
            .find(|r| r.offset.saturating_add(r.len) > self.cfg.region_size)
        {
            return self.violation(format!(
                "repair of {} bytes at offset {} is outside the region of {} bytes",
                bad.len, bad.offset, self.cfg.region_size
            ));
        }
        self.actions.push(Action::SendRegion { ranges });
    }

    /// The driver finished one pass of inputs: group-commit what the pass produced.
    pub fn end_batch(&mut self) {
        self.flush_degraded_batch();
        // The pass's writes are on their way to the backup (the sends come first): make our
        // own copies durable meanwhile, so that the ack finds them applicable.
        self.sync_own_queue();
        self.apply_delayed_through(self.acked_through);
        self.commit_applied();
        if self.wrote_this_batch
            && self.state == PrimaryState::Synchronous
            && self.committed_through > self.reported_through
        {
            // Piggyback the apply progress on a pass that sends anyway (no extra round trip).
            self.report_applied();
        }
        self.wrote_this_batch = false;
    }

    fn send(&mut self, msg: Message) {
        self.last_sent_us = self.now_us;
        self.actions.push(Action::Send(msg));
    }

    /// Sends our durable apply point. Also the heartbeat: repeating it costs the backup nothing
    /// (trims are monotonic) and repairs a report that a broken connection lost.
    fn report_applied(&mut self) {
        self.reported_through = self.committed_through;
        self.send(Message::Applied {
            through: self.committed_through,
        });
    }

    /// The backup is connected from its Hello on, and its silence timer runs while it replays
    /// to us: keep it fed.
    fn heartbeat_while_recovering(&mut self) {
        if matches!(self.state, PrimaryState::Recovering { .. }) && self.heartbeat_due() {
            self.report_applied();
        }
    }

    fn heartbeat_due(&self) -> bool {
        self.now_us.saturating_sub(self.last_sent_us)
            >= heartbeat_interval_us(self.peer_silence_timeout_us, self.cfg.ack_timeout_us)
    }

    fn phase(&self) -> Phase {
        match self.state {
            PrimaryState::Disconnected => Phase::Disconnected,
            PrimaryState::Handshaking { .. } => Phase::Handshaking,
            PrimaryState::Recovering { .. } => Phase::Recovering,
            PrimaryState::Synchronous => Phase::Synchronous,
            PrimaryState::Failed => Phase::Failed,
        }
    }

    fn stats(&self) -> CoreStats {
        CoreStats {
            next_seq: self.next_seq,
            applied_through: self.applied_through,
            acked_through: self.acked_through,
            peer_applied_through: self.peer_applied,
            in_flight: self.delay.len() as u64,
            degraded: self.degraded,
            recoveries: self.recoveries,
            current_term: self.current_term,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupState {
    Idle,
    Connected {
        primary_id: u64,
        catchup_through: u64,
        /// The primary's term: no write of this connection may carry a higher one.
        primary_term: u64,
        /// Our records after this common point are a divergent suffix, kept (and still in
        /// the queue) until the primary's `RepairDone`; meanwhile we acknowledge only through
        /// it and take no write.
        repair_after: Option<u64>,
    },
    Failed,
}

/// The backup's state machine.
#[derive(Debug)]
pub struct Backup {
    cfg: CoreConfig,
    state: BackupState,
    now_us: u64,
    next_seq: u64,
    first_seq: Option<u64>,
    applied_through: u64,
    /// Highest applied seq the driver was asked to make durable.
    commit_requested: u64,
    /// Highest applied seq known durable: reported to the peer, bounds trims.
    committed_through: u64,
    peer_node_id: u64,
    peer_applied: u64,
    to_apply: Vec<Record>,
    ack_due: bool,
    reported_applied: u64,
    /// Since when applied progress beyond `reported_applied` has waited for an ack to ride on.
    unreported_since_us: Option<u64>,
    /// When this backup last sent an ack (its heartbeat is due a quarter of the primary's
    /// silence timeout later).
    last_ack_us: u64,
    /// When the primary was last heard from (any message).
    last_heard_us: u64,
    /// The silence timeout the primary announced in its Hello (0: not announced).
    peer_silence_timeout_us: u32,
    recoveries: u64,
    /// The highest primary term met (persisted before anything of that term is acknowledged).
    current_term: u64,
    history: TermHistory,
    /// Test-only breakage (the simulator's canary): match logs by seq alone.
    seq_only_matching: bool,
    actions: Vec<Action>,
}

/// How long a backup's applied progress may wait for the next ack before it is reported on its
/// own. Every ack carries it; a standalone report only lets the primary trim its queue, which
/// is never urgent, while sending it right after each apply doubled the backup's sends per
/// synchronous write (one system call and one wake-up of the primary each).
pub const APPLIED_REPORT_DELAY_US: u64 = 100;

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
) -> Result<crate::handshake::Reconciliation, Unreconcilable> {
    if !seq_only_matching {
        return reconcile(primary, backup);
    }
    let blind = |v: &LogView| {
        let mut v = v.clone();
        v.history = TermHistory::new();
        if v.last_seq > 0 {
            let _ = v.history.note_append(1, 1);
        }
        v
    };
    reconcile(&blind(primary), &blind(backup))
}

/// What a node says of itself in the compatibility check and its Hello.
fn identity(cfg: &CoreConfig, role: WireRole, peer_node_id: u64) -> Identity {
    Identity {
        role,
        node_id: cfg.node_id,
        peer_node_id,
        region_size: cfg.region_size,
        queue_format_version: cfg.queue_format_version,
        queue_capacity: cfg.queue_capacity,
    }
}

/// The Hello of either role.
fn hello_of(own: &Identity, view: &LogView, applied_through: u64, ack_timeout_us: u64) -> Hello {
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

impl Backup {
    /// A backup that recovered `rec` from its queue. Records not yet applied are applied at once
    /// (the first batch of actions).
    pub fn new(cfg: CoreConfig, rec: Recovered) -> Self {
        assert!(cfg.node_id != 0, "node id 0 is reserved");
        assert!(rec.applied_through <= rec.last_seq, "applied beyond queue");
        let mut b = Backup {
            cfg,
            state: BackupState::Idle,
            now_us: 0,
            next_seq: rec.last_seq + 1,
            first_seq: rec.first_seq,
            applied_through: rec.applied_through,
            commit_requested: rec.applied_through,
            committed_through: rec.applied_through,
            peer_node_id: rec.peer_node_id,
            peer_applied: 0,
            to_apply: rec.unapplied,
            ack_due: false,
            reported_applied: 0,
            unreported_since_us: None,
            last_ack_us: 0,
            last_heard_us: 0,
            peer_silence_timeout_us: 0,
            recoveries: 0,
            current_term: rec.current_term.max(rec.term_history.last_term()),
            history: rec.term_history,
            seq_only_matching: false,
            actions: Vec::new(),
        };
        b.apply_received();
        b
    }

    /// The simulator's second canary: a backup that matches logs by seq alone (it takes a
    /// record of another term at the same seq for the same write, as before terms existed).
    /// The simulator's checkers must catch the silent divergence that follows.
    #[cfg(feature = "canary")]
    pub fn break_log_matching_for_canary(&mut self) {
        self.seq_only_matching = true;
    }

    fn view(&self) -> LogView {
        LogView {
            current_term: self.current_term,
            history: self.history.clone(),
            last_seq: self.last_seq(),
            first_seq: self.first_seq,
        }
    }

    /// Where this backup's log matches the connected primary's: its last seq, or the common
    /// point while a divergent suffix awaits repair. Acks and apply reports never go past it.
    fn matched_through(&self) -> u64 {
        match self.state {
            BackupState::Connected {
                repair_after: Some(common),
                ..
            } => common,
            _ => self.last_seq(),
        }
    }

    /// The plan for a primary that announced `h` (the same rule the primary applies).
    fn plan(&self, h: &Hello) -> Result<crate::handshake::Reconciliation, Unreconcilable> {
        reconcile_as_built(&LogView::of_hello(h), &self.view(), self.seq_only_matching)
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn apply_received(&mut self) {
        for record in std::mem::take(&mut self.to_apply) {
            if record.seq > self.applied_through {
                debug_assert_eq!(record.seq, self.applied_through + 1);
                self.applied_through = record.seq;
                self.actions.push(Action::Apply(record));
            }
        }
        if let Some(durable) = request_commit(
            self.applied_through,
            &mut self.commit_requested,
            self.cfg.deferred_commit,
            &mut self.actions,
        ) {
            self.on_applied_durable(durable);
        }
    }

    /// The driver made everything applied through `through` durable (see
    /// [`CoreConfig::deferred_commit`]).
    pub fn on_applied_durable(&mut self, through: u64) {
        let through = through.min(self.commit_requested);
        if through > self.committed_through {
            self.committed_through = through;
            // Records the primary already confirmed may have waited for our own apply.
            self.trim(0);
        }
    }

    /// Decides whether a primary that sent `h` may connect. Pure: the driver uses it to refuse a
    /// second primary without disturbing the current connection.
    pub fn check_hello(&self, h: &Hello) -> Result<(), (RejectCode, String)> {
        if self.state == BackupState::Failed {
            return Err((RejectCode::ProtocolViolation, "backup has failed".into()));
        }
        check_compatible(&identity(&self.cfg, WireRole::Backup, self.peer_node_id), h)?;
        self.plan(h).map(|_| ()).map_err(|u| u.reject())
    }

    fn on_hello(&mut self, h: Hello) {
        if let Err((code, reason)) = self.check_hello(&h) {
            self.actions.push(Action::Reject { code, reason });
            return;
        }
        let plan = match self.plan(&h) {
            Ok(plan) => plan,
            Err(u) => {
                let (code, reason) = u.reject();
                self.actions.push(Action::Reject { code, reason });
                return;
            }
        };
        debug_assert!(self.to_apply.is_empty(), "applied at on_connected");
        if self.peer_node_id == 0 {
            self.peer_node_id = h.node_id;
            self.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        if h.current_term > self.current_term {
            // Durable before we acknowledge anything of that term: a stale primary we meet
            // later is then refused even after our restart.
            self.current_term = h.current_term;
            self.actions.push(Action::PersistTerm {
                term: h.current_term,
            });
        }
        self.actions.push(Action::RecoveryStarted);
        let b_last = self.last_seq();
        // Our Hello tells the truth (our whole log); the primary derives the same plan.
        let hello = hello_of(
            &identity(&self.cfg, WireRole::Backup, self.peer_node_id),
            &self.view(),
            self.committed_through,
            self.cfg.ack_timeout_us,
        );
        self.actions.push(Action::Send(Message::Hello(hello)));
        let repair_after = plan.backup_discards.then_some(plan.common);
        if let Some(common) = repair_after {
            self.actions.push(Action::RequestRepair {
                after: common,
                through: b_last,
            });
        } else if b_last > h.last_seq {
            self.actions.push(Action::SendQueued {
                from_seq: h.last_seq + 1,
                through_seq: b_last,
            });
        }
        self.actions.push(Action::Send(Message::ReplayDone {
            through: plan.backup_holds_through,
        }));
        self.peer_silence_timeout_us = h.silence_timeout_us;
        self.state = BackupState::Connected {
            primary_id: h.node_id,
            catchup_through: h.last_seq,
            primary_term: h.current_term,
            repair_after,
        };
        // The primary's apply point counts only on the history we share.
        self.trim(h.applied_through.min(plan.backup_holds_through));
        self.reported_applied = self.committed_through.min(self.matched_through());
        self.last_ack_us = self.now_us;
        self.recoveries += 1;
    }

    fn trim(&mut self, primary_applied: u64) {
        let last = self.last_seq();
        // Never past the history we share with the primary: its apply report speaks of its
        // records, not of a divergent suffix of ours with the same seqs.
        let matched = self.matched_through();
        trim_queue(
            &mut self.peer_applied,
            primary_applied.min(matched),
            self.committed_through.min(matched),
            &mut self.first_seq,
            last,
            &mut self.actions,
        );
        self.history
            .forget_before(self.peer_applied.min(self.committed_through));
    }

    fn violation(&mut self, what: String) {
        // Records appended before the violation stay valid: acknowledge and apply them first.
        self.finish_batch();
        self.actions.push(Action::Reject {
            code: RejectCode::ProtocolViolation,
            reason: what,
        });
        self.state = BackupState::Idle;
    }

    /// A new connection from a primary (the driver calls this before feeding its `Hello`).
    pub fn on_connected(&mut self) {
        if self.state != BackupState::Failed {
            self.finish_batch();
            self.state = BackupState::Idle;
        }
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self) {
        if self.state != BackupState::Failed {
            self.finish_batch();
            self.state = BackupState::Idle;
        }
    }

    /// A message from the primary.
    pub fn on_message(&mut self, msg: Message) {
        self.last_heard_us = self.now_us;
        match (self.state, msg) {
            (BackupState::Failed, _) => {}
            (BackupState::Idle, Message::Hello(h)) => self.on_hello(h),
            (BackupState::Idle, other) => {
                self.violation(format!("{:?} before Hello", other.kind()))
            }
            (
                BackupState::Connected {
                    repair_after: Some(common),
                    ..
                },
                m,
            ) if !matches!(m, Message::Applied { .. } | Message::Reject { .. }) => {
                self.on_repair_message(common, m)
            }
            (
                BackupState::Connected {
                    catchup_through,
                    primary_term,
                    ..
                },
                Message::Write {
                    seq,
                    term,
                    offset,
                    data,
                },
            ) => self.on_write(
                Record {
                    seq,
                    term,
                    offset,
                    data,
                },
                catchup_through,
                primary_term,
            ),
            (BackupState::Connected { .. }, Message::Applied { through }) => self.trim(through),
            (BackupState::Connected { .. }, Message::Reject { code, reason }) => {
                self.hang_up(PeerFault::Rejected { code, reason })
            }
            (BackupState::Connected { .. }, other) => {
                self.violation(format!("unexpected {:?} from the primary", other.kind()))
            }
        }
    }

    fn on_write(&mut self, record: Record, catchup_through: u64, primary_term: u64) {
        let seq = record.seq;
        if seq < self.next_seq {
            // A duplicate (resent after a reconnect) is the same write only if the terms
            // match (log matching); then acknowledge it again.
            let held = self.history.term_at(seq);
            if held == Some(record.term) || self.seq_only_matching {
                self.ack_due = true;
            } else {
                self.violation(format!(
                    "write {seq} of term {} is a duplicate of a record of term {held:?}: two histories",
                    record.term
                ));
            }
        } else if seq > self.next_seq {
            self.violation(format!(
                "write {seq} leaves a gap after {}",
                self.last_seq()
            ));
        } else if let Err(e) = check_write(
            record.offset,
            record.data.len(),
            self.cfg.region_size,
            usize::MAX,
        ) {
            self.violation(format!("write {seq}: {e}"));
        } else if record.term > primary_term {
            self.violation(format!(
                "write {seq} carries term {}, above the primary's announced term {primary_term}",
                record.term
            ));
        } else if let Err(e) = self.history.note_append(seq, record.term) {
            self.violation(format!("write {seq}: {e}"));
        } else {
            self.next_seq += 1;
            self.first_seq.get_or_insert(seq);
            self.actions.push(Action::Append {
                record: record.clone(),
                recovery: seq <= catchup_through,
            });
            self.to_apply.push(record);
            self.ack_due = true;
        }
    }

    /// While a divergent suffix awaits repair, the primary sends the bytes of its ranges and
    /// then `RepairDone`; nothing else.
    fn on_repair_message(&mut self, common: u64, msg: Message) {
        match msg {
            Message::RepairData { offset, data } => {
                if let Err(e) = check_write(offset, data.len(), self.cfg.region_size, usize::MAX) {
                    return self.violation(format!("repair data: {e}"));
                }
                self.actions.push(Action::RepairRegion { offset, data });
            }
            Message::RepairDone { through } if through == common => self.drop_divergent(common),
            other => self.violation(format!(
                "unexpected {:?} while repairing after seq {common}",
                other.kind()
            )),
        }
    }

    /// The repair is complete: our records after `common` go (they were saved at the
    /// handshake), and the primary's follow.
    fn drop_divergent(&mut self, common: u64) {
        self.actions.push(Action::TruncateAfter { after: common });
        self.next_seq = common + 1;
        self.history.truncate_after(common);
        self.first_seq = self.first_seq.filter(|&f| f <= common);
        self.applied_through = self.applied_through.min(common);
        self.commit_requested = self.commit_requested.min(common);
        self.committed_through = self.committed_through.min(common);
        self.reported_applied = self.reported_applied.min(common);
        if let BackupState::Connected { repair_after, .. } = &mut self.state {
            *repair_after = None;
        }
    }

    /// Drops the connection for `fault`, after acknowledging and applying what it delivered.
    fn hang_up(&mut self, fault: PeerFault) {
        self.finish_batch();
        self.actions.push(Action::Disconnect(fault));
        self.state = BackupState::Idle;
    }

    fn finish_batch(&mut self) {
        if self.ack_due {
            self.ack_due = false;
            if self.cfg.sync_queue_before_ack {
                self.actions.push(Action::SyncQueue);
            }
            if matches!(self.state, BackupState::Connected { .. }) {
                let matched = self.matched_through();
                self.reported_applied = self.committed_through.min(matched);
                self.unreported_since_us = None;
                self.last_ack_us = self.now_us;
                self.actions.push(Action::Send(Message::Ack {
                    received_through: matched,
                    applied_through: self.reported_applied,
                }));
            }
        }
        // The backup applies after acknowledging: the ack does not wait for the region.
        self.apply_received();
    }

    /// Time passes; called at least once per poll pass while idle.
    pub fn on_tick(&mut self) {
        if !matches!(self.state, BackupState::Connected { .. }) {
            return;
        }
        // A primary that announced no silence timeout predates the primary's heartbeat: its
        // idle silence means nothing.
        let primary_heartbeats = self.peer_silence_timeout_us != 0;
        if primary_heartbeats
            && self.now_us.saturating_sub(self.last_heard_us) > self.cfg.ack_timeout_us
        {
            // The primary heartbeats too: this silence is a dead primary or a connection whose
            // primary-to-backup direction is gone (our acks may still arrive, so the primary
            // cannot tell). Dropping it makes the primary reconnect, and its Hello carries the
            // apply point it could not deliver, so our queue is trimmed.
            return self.hang_up(PeerFault::Silent {
                timeout_us: self.cfg.ack_timeout_us,
            });
        }
        let report_due = self.committed_through.min(self.matched_through()) > self.reported_applied
            && {
                let since = *self.unreported_since_us.get_or_insert(self.now_us);
                self.now_us.saturating_sub(since) >= APPLIED_REPORT_DELAY_US
            };
        // The heartbeat: an idle primary takes a silence of its whole silence timeout for a dead
        // backup (`PeerFault::Silent`); a repeated ack says we are here.
        let heartbeat_due = self.now_us.saturating_sub(self.last_ack_us)
            >= heartbeat_interval_us(self.peer_silence_timeout_us, self.cfg.ack_timeout_us);
        if report_due || heartbeat_due {
            self.ack_due = true;
            self.finish_batch();
        }
    }

    /// The driver finished one pass of inputs: acknowledge (group commit) and apply.
    pub fn end_batch(&mut self) {
        self.finish_batch();
    }

    /// The primary this backup is connected to, if any.
    pub fn connected_primary(&self) -> Option<u64> {
        match self.state {
            BackupState::Connected { primary_id, .. } => Some(primary_id),
            _ => None,
        }
    }

    fn phase(&self) -> Phase {
        match self.state {
            BackupState::Idle => Phase::Disconnected,
            BackupState::Connected { .. } => Phase::Synchronous,
            BackupState::Failed => Phase::Failed,
        }
    }

    fn stats(&self) -> CoreStats {
        CoreStats {
            next_seq: self.next_seq,
            applied_through: self.applied_through,
            acked_through: self.matched_through(),
            peer_applied_through: self.peer_applied,
            in_flight: self.to_apply.len() as u64,
            degraded: false,
            recoveries: self.recoveries,
            current_term: self.current_term,
        }
    }
}

/// Either role's state machine, with the inputs both share.
#[derive(Debug)]
pub enum Core {
    /// A primary.
    Primary(Primary),
    /// A backup.
    Backup(Backup),
}

impl Core {
    /// Sets the current time (microseconds on any monotonic clock). Call once per poll pass.
    pub fn set_now(&mut self, now_us: u64) {
        match self {
            Core::Primary(p) => p.now_us = p.now_us.max(now_us),
            Core::Backup(b) => b.now_us = b.now_us.max(now_us),
        }
    }
    /// See [`Primary::on_connected`] / [`Backup::on_connected`].
    pub fn on_connected(&mut self) {
        match self {
            Core::Primary(p) => p.on_connected(),
            Core::Backup(b) => b.on_connected(),
        }
    }
    /// A connection attempt failed (primary only; the backup listens).
    pub fn on_connect_failed(&mut self) {
        if let Core::Primary(p) = self {
            p.on_connect_failed()
        }
    }
    /// The connection is gone.
    pub fn on_disconnected(&mut self) {
        match self {
            Core::Primary(p) => p.on_disconnected(),
            Core::Backup(b) => b.on_disconnected(),
        }
    }
    /// A message from the peer.
    pub fn on_message(&mut self, msg: Message) {
        match self {
            Core::Primary(p) => p.on_message(msg),
            Core::Backup(b) => b.on_message(msg),
        }
    }
    /// The driver made everything applied through `through` durable (only needed with
    /// [`CoreConfig::deferred_commit`]).
    pub fn on_applied_durable(&mut self, through: u64) {
        match self {
            Core::Primary(p) => p.on_applied_durable(through),
            Core::Backup(b) => b.on_applied_durable(through),
        }
    }
    /// Time passes.
    pub fn on_tick(&mut self) {
        match self {
            Core::Primary(p) => p.on_tick(),
            Core::Backup(b) => b.on_tick(),
        }
    }
    /// End of one poll pass.
    pub fn end_batch(&mut self) {
        match self {
            Core::Primary(p) => p.end_batch(),
            Core::Backup(b) => b.end_batch(),
        }
    }
    /// Takes one client write (primary only).
    pub fn submit(&mut self, ticket: u64, offset: u64, data: Bytes) -> Result<u64, SubmitError> {
        match self {
            Core::Primary(p) => p.submit(ticket, offset, data),
            Core::Backup(_) => Err(SubmitError::NotPrimary),
        }
    }
    /// Whether `submit` may be called now.
    pub fn accepts_submissions(&self) -> bool {
        match self {
            Core::Primary(p) => p.accepts_submissions(),
            Core::Backup(_) => false,
        }
    }
    /// Moves the pending actions to the end of `out`, in order.
    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        match self {
            Core::Primary(p) => out.append(&mut p.actions),
            Core::Backup(b) => out.append(&mut b.actions),
        }
    }
    /// Connection phase.
    pub fn phase(&self) -> Phase {
        match self {
            Core::Primary(p) => p.phase(),
            Core::Backup(b) => b.phase(),
        }
    }
    /// Counters.
    pub fn stats(&self) -> CoreStats {
        match self {
            Core::Primary(p) => p.stats(),
            Core::Backup(b) => b.stats(),
        }
    }
    /// The driver hit an error it cannot continue from (e.g. the queue device failed).
    pub fn fail(&mut self) {
        match self {
            Core::Primary(p) => p.state = PrimaryState::Failed,
            Core::Backup(b) => b.state = BackupState::Failed,
        }
    }
}
