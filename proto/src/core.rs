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

use crate::wire::{Hello, Message, RejectCode, WireRole, MAX_WRITE_LEN};

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
    /// (backup) or applied without an ack (degraded primary). True in `power` and `pmem` modes.
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
}

/// One write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
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
        backup_last: u64,
        primary_last: u64,
    },
    Synchronous,
    Failed,
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
    /// Our last_seq when we sent the Hello of the current handshake.
    hello_last_seq: u64,
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
            hello_last_seq: 0,
            awaiting_since_us: None,
            last_heard_us: 0,
            last_sent_us: 0,
            peer_silence_timeout_us: 0,
            wrote_this_batch: false,
            degraded: false,
            recoveries: 0,
            actions: Vec::new(),
        }
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether `submit` may be called now. While it is false the driver leaves submissions in
    /// its ring (backpressure).
    pub fn accepts_submissions(&self) -> bool {
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
        self.next_seq += 1;
        let record = Record { seq, offset, data };
        self.first_seq.get_or_insert(seq);
        self.actions.push(Action::Append {
            record: record.clone(),
            recovery: false,
        });
        if self.state == PrimaryState::Synchronous {
            self.send(Message::Write {
                seq,
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

    fn flush_degraded_batch(&mut self) {
        if self.degraded_batch.is_empty() {
            return;
        }
        if self.cfg.sync_queue_before_ack {
            self.actions.push(Action::SyncQueue);
        }
        for p in std::mem::take(&mut self.degraded_batch) {
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
            if self.cfg.sync_queue_before_ack {
                self.actions.push(Action::SyncQueue);
            }
            while let Some(p) = self.delay.pop_front() {
                self.apply_pending(p);
            }
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
        self.hello_last_seq = self.last_seq();
        // The Hello reports our applied point; progress reports continue from there.
        self.reported_through = self.committed_through;
        self.send(Message::Hello(Hello {
            role: WireRole::Primary,
            node_id: self.cfg.node_id,
            peer_node_id: self.peer_node_id,
            region_size: self.cfg.region_size,
            queue_format_version: self.cfg.queue_format_version,
            applied_through: self.committed_through,
            last_seq: self.last_seq(),
            first_seq: self.first_seq.unwrap_or(0),
            queue_capacity: self.cfg.queue_capacity,
            silence_timeout_us: announced_silence_timeout(self.cfg.ack_timeout_us),
        }));
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
        if h.role != WireRole::Backup {
            return self.fail(FatalError::Incompatible(format!(
                "peer {} is a {:?}, expected a backup",
                h.node_id, h.role
            )));
        }
        if h.region_size != self.cfg.region_size {
            return self.fail(FatalError::Incompatible(format!(
                "backup region is {} bytes, this primary's is {} bytes",
                h.region_size, self.cfg.region_size
            )));
        }
        if h.queue_format_version != self.cfg.queue_format_version {
            return self.fail(FatalError::Incompatible(format!(
                "backup queue format version {}, this primary's is {}",
                h.queue_format_version, self.cfg.queue_format_version
            )));
        }
        if self.peer_node_id != 0 && h.node_id != self.peer_node_id {
            return self.fail(FatalError::Incompatible(format!(
                "backup node id is {:#x}, this primary is bound to {:#x} (was the backup's queue recreated?)",
                h.node_id, self.peer_node_id
            )));
        }
        let p_last = self.last_seq();
        if h.last_seq > self.hello_last_seq && p_last > self.hello_last_seq {
            // The backup holds records we lost, and we gave their sequence numbers to degraded
            // writes since our Hello: two different histories.
            return self.fail(FatalError::Unrecoverable(format!(
                "backup holds records through {} that this primary lacks, but it wrote {} .. {} degraded meanwhile",
                h.last_seq,
                self.hello_last_seq + 1,
                p_last
            )));
        }
        if h.last_seq < p_last {
            // The backup misses (h.last_seq, p_last]; our queue must still hold all of them.
            let p_first = self.first_seq.unwrap_or(p_last + 1);
            if p_first > h.last_seq + 1 {
                return self.fail(FatalError::Unrecoverable(format!(
                    "backup has records through {}, but this primary's queue starts at {}",
                    h.last_seq, p_first
                )));
            }
        } else if h.last_seq > p_last {
            let b_first = if h.first_seq == 0 {
                h.last_seq + 1
            } else {
                h.first_seq
            };
            if b_first > p_last + 1 {
                return self.fail(FatalError::Unrecoverable(format!(
                    "this primary has records through {p_last}, but the backup's queue starts at {b_first}"
                )));
            }
        }
        if self.peer_node_id == 0 {
            self.peer_node_id = h.node_id;
            self.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        self.peer_silence_timeout_us = h.silence_timeout_us;
        self.actions.push(Action::RecoveryStarted);
        // Everything the backup holds is acknowledged: apply what we hold of it.
        let known = h.last_seq.min(p_last);
        while self.delay.front().is_some_and(|p| p.record.seq <= known) {
            let p = self.delay.pop_front().expect("front checked");
            self.apply_pending(p);
        }
        self.commit_applied();
        self.trim(h.applied_through);
        self.state = PrimaryState::Recovering {
            last_rx_us: self.now_us,
            backup_last: h.last_seq,
            primary_last: p_last,
        };
    }

    fn on_replayed_write(&mut self, seq: u64, offset: u64, data: Bytes, backup_last: u64) {
        if seq != self.next_seq || seq > backup_last {
            return self.violation(format!(
                "replayed write {seq}, expected {} (backup announced through {backup_last})",
                self.next_seq
            ));
        }
        if let Err(e) = check_write(offset, data.len(), self.cfg.region_size, usize::MAX) {
            return self.violation(format!("replayed write {seq}: {e}"));
        }
        self.next_seq += 1;
        self.first_seq.get_or_insert(seq);
        let record = Record { seq, offset, data };
        self.actions.push(Action::Append {
            record: record.clone(),
            recovery: true,
        });
        self.apply_pending(Pending {
            record,
            ticket: None,
        });
    }

    fn on_replay_done(&mut self, through: u64, backup_last: u64, primary_last: u64) {
        if through != backup_last || self.last_seq() != backup_last.max(primary_last) {
            return self.violation(format!(
                "replay ended at {through}, expected {backup_last} (primary now at {})",
                self.last_seq()
            ));
        }
        self.commit_applied();
        self.acked_through = backup_last.min(self.last_seq());
        self.sent_through = self.last_seq();
        if backup_last < primary_last {
            self.actions.push(Action::SendQueued {
                from_seq: backup_last + 1,
                through_seq: primary_last,
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
        while self
            .delay
            .front()
            .is_some_and(|p| p.record.seq <= received_through)
        {
            let p = self.delay.pop_front().expect("front checked");
            self.apply_pending(p);
        }
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
                    backup_last,
                    primary_last,
                    ..
                },
                m,
            ) => {
                self.state = PrimaryState::Recovering {
                    last_rx_us: self.now_us,
                    backup_last,
                    primary_last,
                };
                match m {
                    Message::Write { seq, offset, data } => {
                        self.on_replayed_write(seq, offset, data, backup_last)
                    }
                    Message::ReplayDone { through } => {
                        self.on_replay_done(through, backup_last, primary_last)
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

    /// The driver finished one pass of inputs: group-commit what the pass produced.
    pub fn end_batch(&mut self) {
        self.flush_degraded_batch();
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupState {
    Idle,
    Connected {
        primary_id: u64,
        catchup_through: u64,
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
            actions: Vec::new(),
        };
        b.apply_received();
        b
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
        if h.role != WireRole::Primary {
            return Err((
                RejectCode::Role,
                format!(
                    "this node is a backup and peer {:#x} is not a primary",
                    h.node_id
                ),
            ));
        }
        if h.node_id == self.cfg.node_id {
            return Err((
                RejectCode::Role,
                "peer has this backup's own node id".into(),
            ));
        }
        if h.region_size != self.cfg.region_size {
            return Err((
                RejectCode::RegionSize,
                format!(
                    "backup region is {} bytes, primary's is {} bytes",
                    self.cfg.region_size, h.region_size
                ),
            ));
        }
        if h.queue_format_version != self.cfg.queue_format_version {
            return Err((
                RejectCode::QueueFormat,
                format!(
                    "backup queue format version {}, primary's {}",
                    self.cfg.queue_format_version, h.queue_format_version
                ),
            ));
        }
        if h.queue_capacity > self.cfg.queue_capacity {
            return Err((
                RejectCode::QueueCapacity,
                format!(
                    "backup queue holds {} bytes, less than the primary's {} bytes; set queue_size on the backup at least as large",
                    self.cfg.queue_capacity, h.queue_capacity
                ),
            ));
        }
        if self.peer_node_id != 0 && h.node_id != self.peer_node_id {
            return Err((
                RejectCode::WrongPeer,
                format!(
                    "this backup is bound to primary {:#x}; refusing primary {:#x}",
                    self.peer_node_id, h.node_id
                ),
            ));
        }
        if h.peer_node_id != 0 && h.peer_node_id != self.cfg.node_id {
            return Err((
                RejectCode::WrongPeer,
                format!(
                    "primary {:#x} is bound to backup {:#x}, this is {:#x}",
                    h.node_id, h.peer_node_id, self.cfg.node_id
                ),
            ));
        }
        let b_last = self.last_seq();
        if b_last > h.last_seq {
            let b_first = self.first_seq.unwrap_or(b_last + 1);
            if b_first > h.last_seq + 1 {
                return Err((
                    RejectCode::Unrecoverable,
                    format!(
                        "primary has records through {}, but this backup's queue starts at {b_first}",
                        h.last_seq
                    ),
                ));
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, h: Hello) {
        if let Err((code, reason)) = self.check_hello(&h) {
            self.actions.push(Action::Reject { code, reason });
            return;
        }
        if self.peer_node_id == 0 {
            self.peer_node_id = h.node_id;
            self.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        self.actions.push(Action::RecoveryStarted);
        let b_last = self.last_seq();
        self.actions.push(Action::Send(Message::Hello(Hello {
            role: WireRole::Backup,
            node_id: self.cfg.node_id,
            peer_node_id: self.peer_node_id,
            region_size: self.cfg.region_size,
            queue_format_version: self.cfg.queue_format_version,
            applied_through: self.committed_through,
            last_seq: b_last,
            first_seq: self.first_seq.unwrap_or(0),
            queue_capacity: self.cfg.queue_capacity,
            silence_timeout_us: announced_silence_timeout(self.cfg.ack_timeout_us),
        })));
        if b_last > h.last_seq {
            self.actions.push(Action::SendQueued {
                from_seq: h.last_seq + 1,
                through_seq: b_last,
            });
        }
        self.actions
            .push(Action::Send(Message::ReplayDone { through: b_last }));
        self.trim(h.applied_through);
        self.reported_applied = self.committed_through;
        self.last_ack_us = self.now_us;
        self.peer_silence_timeout_us = h.silence_timeout_us;
        self.recoveries += 1;
        self.state = BackupState::Connected {
            primary_id: h.node_id,
            catchup_through: h.last_seq,
        };
    }

    fn trim(&mut self, primary_applied: u64) {
        let last = self.last_seq();
        trim_queue(
            &mut self.peer_applied,
            primary_applied,
            self.committed_through,
            &mut self.first_seq,
            last,
            &mut self.actions,
        );
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
                    catchup_through, ..
                },
                Message::Write { seq, offset, data },
            ) => {
                if seq < self.next_seq {
                    self.ack_due = true; // a duplicate (resent after a reconnect); ack again
                } else if seq > self.next_seq {
                    self.violation(format!(
                        "write {seq} leaves a gap after {}",
                        self.last_seq()
                    ));
                } else if let Err(e) =
                    check_write(offset, data.len(), self.cfg.region_size, usize::MAX)
                {
                    self.violation(format!("write {seq}: {e}"));
                } else {
                    self.next_seq += 1;
                    self.first_seq.get_or_insert(seq);
                    let record = Record { seq, offset, data };
                    self.actions.push(Action::Append {
                        record: record.clone(),
                        recovery: seq <= catchup_through,
                    });
                    self.to_apply.push(record);
                    self.ack_due = true;
                }
            }
            (BackupState::Connected { .. }, Message::Applied { through }) => self.trim(through),
            (BackupState::Connected { .. }, Message::Reject { code, reason }) => {
                self.hang_up(PeerFault::Rejected { code, reason })
            }
            (BackupState::Connected { .. }, other) => {
                self.violation(format!("unexpected {:?} from the primary", other.kind()))
            }
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
                self.reported_applied = self.committed_through;
                self.unreported_since_us = None;
                self.last_ack_us = self.now_us;
                self.actions.push(Action::Send(Message::Ack {
                    received_through: self.last_seq(),
                    applied_through: self.committed_through,
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
        let report_due = self.committed_through > self.reported_applied && {
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
            acked_through: self.last_seq(),
            peer_applied_through: self.peer_applied,
            in_flight: self.to_apply.len() as u64,
            degraded: false,
            recoveries: self.recoveries,
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
