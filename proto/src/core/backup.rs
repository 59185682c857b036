//! The backup's side of the protocol: it appends what the primary sends and acknowledges it
//! (after its sync in `power`/`pmem`), applies after acknowledging, plans each handshake with
//! the same rule as the primary, and replays or repairs its log as the plan says.

use super::*;
use crate::handshake::check_compatible;

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

impl Backup {
    pub(super) fn set_now(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
    }

    pub(super) fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    pub(super) fn stop(&mut self) {
        self.state = BackupState::Failed;
    }

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

    pub(super) fn phase(&self) -> Phase {
        match self.state {
            BackupState::Idle => Phase::Disconnected,
            BackupState::Connected { .. } => Phase::Synchronous,
            BackupState::Failed => Phase::Failed,
        }
    }

    pub(super) fn stats(&self) -> CoreStats {
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
