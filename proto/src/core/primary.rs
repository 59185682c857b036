//! The primary's side of the protocol: it assigns seqs (in its term), keeps the delay buffer,
//! applies a write only once the backup acknowledged it (and, in `power`/`pmem`, once its own
//! queue holds it durably), drives the handshake from its side and resends what the backup
//! lacks.

use std::collections::VecDeque;

use bytes::Bytes;

use super::*;
use crate::handshake::check_compatible;

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
    pub(super) fn set_now(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
    }

    pub(super) fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    pub(super) fn stop(&mut self) {
        self.state = PrimaryState::Failed;
    }

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

    pub(super) fn phase(&self) -> Phase {
        match self.state {
            PrimaryState::Disconnected => Phase::Disconnected,
            PrimaryState::Handshaking { .. } => Phase::Handshaking,
            PrimaryState::Recovering { .. } => Phase::Recovering,
            PrimaryState::Synchronous => Phase::Synchronous,
            PrimaryState::Failed => Phase::Failed,
        }
    }

    pub(super) fn stats(&self) -> CoreStats {
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
