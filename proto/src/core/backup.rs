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

/// The backup's side of a [`Replica`]: the state only that role has.
#[derive(Debug)]
pub(super) struct BackupSide {
    state: BackupState,
    to_apply: Vec<Record>,
    /// Records of this connection's catch-up that the primary had applied before it began
    /// (seq <= `unqueued_through`): applied without a queue copy, then adopted into the log
    /// ([`Action::ApplyCaughtUp`]). Not acknowledged until then.
    caught_up: Vec<Record>,
    /// The primary's apply point at this connection's handshake, when its records may take
    /// that path (0: none may).
    unqueued_through: u64,
    /// The log reaches this seq before the resync-target mark may go: it was set (here or
    /// before a crash) while the region may hold records beyond the log, which the primary's
    /// log holds through its last seq at the handshake.
    clear_target_at: Option<u64>,
    /// This process set the mark (`mark_region_ahead`, none before it): once what it wrote
    /// ahead of the log is adopted, at the connection's end, nothing is ahead any more.
    marked_here: bool,
    ack_due: bool,
    reported_applied: u64,
    /// Since when applied progress beyond `reported_applied` has waited for an ack to ride on.
    unreported_since_us: Option<u64>,
    /// When this backup last sent an ack (its heartbeat is due a quarter of the primary's
    /// silence timeout later).
    last_ack_us: u64,
    /// Bytes of `RepairData` received for the repair in progress (checked at `RepairDone`).
    repair_bytes_received: u64,
    /// A repair of our divergent suffix after this common point began and has not finished
    /// (the connection may have ended since): our region holds part of the primary's bytes
    /// while our log still holds the suffix, so we are not a history to promote as is.
    repair_unfinished_after: Option<u64>,
    /// A resync into us (from this primary) began and has not finished: our region is
    /// inconsistent (persisted in the bitmap file).
    resync_target: Option<u64>,
    /// The resync of the current connection: the primary's history, to continue our log with.
    resync_in: Option<ResyncInto>,
    /// The log the primary of the current connection announced.
    primary_log: Option<ResyncInto>,
    /// Chunks installed since the region was last made durable: confirmed (`ChunkHeld`) once
    /// it is.
    held: Vec<ChunkRange>,
}

/// What a backup knows of the resync it is the target of.
#[derive(Debug, Clone)]
struct ResyncInto {
    /// The primary's history as its Hello announced it.
    history: TermHistory,
    /// The primary's last seq then.
    last_seq: u64,
    /// The primary's term (any later record carries it).
    term: u64,
}

impl BackupSide {
    pub(super) fn new(rec: Recovered) -> BackupSide {
        let repair_unfinished_after = rec.repair_unfinished_after;
        let resync_target = rec.resync_target;
        BackupSide {
            resync_target,
            resync_in: None,
            primary_log: None,
            held: Vec::new(),
            state: BackupState::Idle,
            to_apply: rec.unapplied,
            caught_up: Vec::new(),
            unqueued_through: 0,
            clear_target_at: None,
            marked_here: false,
            ack_due: false,
            reported_applied: 0,
            unreported_since_us: None,
            last_ack_us: 0,
            repair_bytes_received: 0,
            repair_unfinished_after,
        }
    }

    /// A primary that became a backup, holding the records it appended and never applied
    /// (they are applied now, as a backup applies what it holds).
    pub(super) fn holding(records: Vec<Record>) -> BackupSide {
        BackupSide::new(Recovered {
            unapplied: records,
            ..Recovered::default()
        })
    }

    pub(super) fn stop(&mut self) {
        self.state = BackupState::Failed;
    }

    /// A promotion (forced, past an unfinished resync) takes the region as it is: the mark
    /// goes. Returns whether there was one.
    pub(super) fn take_resync_target(&mut self) -> bool {
        self.resync_in = None;
        self.clear_target_at = None;
        self.marked_here = false;
        self.resync_target.take().is_some()
    }

    /// Whether this backup may become a primary now (see [`Replica::promote`]).
    pub(super) fn check_promotable(&self, c: &Common, force: bool) -> Result<(), PromoteError> {
        match self.state {
            BackupState::Failed => Err(PromoteError::Failed),
            BackupState::Connected {
                repair_after: Some(common),
                ..
            } => Err(PromoteError::NotCaughtUp {
                why: format!(
                    "it is repairing its divergent suffix after seq {common} from primary {:#x}; wait until `phase` is synchronous (or the connection ends), then promote",
                    c.peer_node_id
                ),
            }),
            BackupState::Connected { primary_id, .. } if !force => {
                Err(PromoteError::PeerAlive {
                    primary: primary_id,
                })
            }
            _ if self.resync_target.is_some() && !force => Err(PromoteError::NotCaughtUp {
                why: format!(
                    "a resync or catch-up into it from primary {:#x} has not finished: its region is inconsistent (part old, part new). Let it reconnect to that primary to finish, or force the promotion (its region then stays as it is)",
                    self.resync_target.unwrap_or(0)
                ),
            }),
            _ => match self.repair_unfinished_after {
                Some(common) if !force => Err(PromoteError::NotCaughtUp {
                    why: format!(
                        "a repair of its divergent suffix after seq {common} was interrupted: its region holds part of the primary's bytes while its log still holds the suffix; let it reconnect to a primary to finish, or force the promotion (its history then keeps the suffix, and the next rejoin repairs the other node from this region)"
                    ),
                }),
                _ => Ok(()),
            },
        }
    }

    /// Where this backup's log matches the connected primary's: its last seq, or the common
    /// point while a divergent suffix awaits repair. Acks and apply reports never go past it.
    fn matched_through(&self, c: &Common) -> u64 {
        match self.state {
            BackupState::Connected {
                repair_after: Some(common),
                ..
            } => common,
            _ => c.last_seq(),
        }
    }

    /// The plan for a primary that announced `h` (the same rule the primary applies).
    fn plan(&self, c: &Common, h: &Hello) -> Planned {
        plan_with_policy(
            c,
            &LogView::of_hello(h),
            h.discard_node,
            &c.view(),
            c.resolve_discard,
        )
    }

    pub(super) fn apply_received(&mut self, c: &mut Common) {
        for record in std::mem::take(&mut self.to_apply) {
            if record.seq > c.applied_through {
                debug_assert_eq!(record.seq, c.applied_through + 1);
                c.applied_through = record.seq;
                c.write_region(Action::Apply(record));
            }
        }
        if c.commit_applied() {
            self.trim(c, 0);
        }
    }

    /// The driver made everything applied through `through` durable (see
    /// [`CoreConfig::deferred_commit`]).
    pub fn on_applied_durable(&mut self, c: &mut Common, through: u64) {
        if c.applied_durable(through) {
            self.trim(c, 0);
        }
    }

    /// Decides whether a primary that sent `h` may connect. Pure: the driver uses it to refuse a
    /// second primary without disturbing the current connection.
    pub fn check_hello(&self, c: &Common, h: &Hello) -> Result<(), (RejectCode, String)> {
        if self.state == BackupState::Failed {
            return Err((RejectCode::ProtocolViolation, "backup has failed".into()));
        }
        check_compatible(
            &identity(&c.cfg, WireRole::Backup, c.peer_node_id, c.last_seq()),
            h,
        )?;
        match self.plan(c, h) {
            // A split brain is answered by `on_hello` (our Hello first, so that the primary
            // reaches the same verdict).
            Planned::Plan(_) | Planned::SplitBrain(..) => Ok(()),
            Planned::Refused(u) => Err(u.reject()),
        }
    }

    fn on_hello(&mut self, c: &mut Common, h: Hello) {
        if let Err((code, reason)) = self.check_hello(c, &h) {
            if code == RejectCode::StaleTerm {
                // Our Hello first: the stale primary learns the exact term that superseded it.
                c.send(Message::hello(
                    c.own_hello(WireRole::Backup, c.resolve_discard),
                ));
            }
            c.actions.push(Action::Reject {
                peer: c.to(),
                code,
                reason,
            });
            return;
        }
        let plan = match self.plan(c, &h) {
            Planned::Plan(plan) => plan,
            Planned::SplitBrain(sb, verdict) => return self.answer_split_brain(c, &h, sb, verdict),
            Planned::Refused(u) => {
                let (code, reason) = u.reject();
                c.actions.push(Action::Reject {
                    peer: c.to(),
                    code,
                    reason,
                });
                return;
            }
        };
        let resolution = c.resolve_discard;
        if h.discard_node != 0 || resolution != 0 {
            // An operator's resolution is used once.
            c.resolve_discard = 0;
        }
        c.split_brain = None;
        debug_assert!(self.to_apply.is_empty(), "applied at on_connected");
        if c.peer_node_id != h.node_id {
            // Our first primary (with our consent to an initial sync, we were bound to nobody).
            c.peer_node_id = h.node_id;
            c.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        if h.current_term > c.current_term {
            // Durable before we acknowledge anything of that term: a stale primary we meet
            // later is then refused even after our restart.
            c.current_term = h.current_term;
            c.actions.push(Action::PersistTerm {
                term: h.current_term,
            });
        }
        c.actions.push(Action::RecoveryStarted);
        let b_last = c.last_seq();
        // Our Hello tells the truth (our whole log); the primary derives the same plan.
        // It announces the resolution this plan used, so that the primary reaches the same one.
        c.send(Message::hello(c.own_hello(WireRole::Backup, resolution)));
        let repair_after = plan.backup_discards.then_some(plan.common);
        // What the primary applied before this connection comes back without a copy in our
        // queue: the primary keeps it until we report it applied, and never needs ours. Not
        // over a divergent suffix (the repair decides what our region holds) nor before a
        // resync (whose end adopts the primary's log anyway).
        self.unqueued_through = if repair_after.is_none() && plan.resync.is_none() {
            h.applied_through.min(h.last_seq)
        } else {
            0
        };
        self.repair_bytes_received = 0;
        if repair_after.is_some() {
            self.repair_unfinished_after = repair_after;
        }
        if let Some(common) = repair_after {
            c.actions.push(Action::RequestRepair {
                peer: c.to(),
                after: common,
                through: b_last,
            });
        } else if b_last > h.last_seq {
            c.actions.push(Action::SendQueued {
                to: c.to(),
                from_seq: h.last_seq + 1,
                through_seq: b_last,
            });
        }
        // A resync, if the primary starts one (`ResyncBegin`), continues our log with its.
        self.resync_in = None;
        self.primary_log = Some(ResyncInto {
            history: h.term_history.clone(),
            last_seq: h.last_seq,
            term: h.current_term,
        });
        self.clear_target_at = None;
        if plan.resync.is_none() && !plan.backup_discards && self.resync_target.is_some() {
            if b_last >= h.last_seq {
                // Our log is caught up as is (a crash after a resync's adopt step, before its
                // mark was cleared): the catch-up that follows needs no resync.
                self.unmark(c);
            } else {
                // Or a crash in a catch-up left our region holding records our log does not
                // (see `mark_region_ahead`), all of them at or below the primary's last seq:
                // the mark goes once our log holds that.
                self.clear_target_at = Some(h.last_seq);
            }
        }
        if plan.resync.is_none()
            && !plan.backup_discards
            && (!c.dirty.is_empty() || c.resync_from != 0)
        {
            // Bits of ours, from a time we were a primary, describe writes on the history we
            // share: nothing of them is ours alone.
            c.dirty.clear();
            c.resync_from = 0;
            c.actions.push(Action::ResetDirty);
        }
        c.send(Message::ReplayDone {
            through: plan.backup_holds_through,
        });
        c.peer_silence_timeout_us = h.silence_timeout_us;
        self.state = BackupState::Connected {
            primary_id: h.node_id,
            catchup_through: h.last_seq,
            primary_term: h.current_term,
            repair_after,
        };
        // The primary's apply point counts only on the history both logs hold now.
        self.trim(c, h.applied_through.min(plan.common));
        self.reported_applied = c.committed_through.min(self.matched_through(c));
        self.last_ack_us = c.now_us;
        c.recoveries += 1;
    }

    /// A split brain the policy did not resolve by discarding our suffix: our Hello (so that
    /// the primary reaches the same verdict), then the refusal. Resolved in our favour, we
    /// become the primary; the old primary, a backup then, is repaired by us.
    fn answer_split_brain(&mut self, c: &mut Common, h: &Hello, sb: SplitBrain, verdict: Verdict) {
        if h.current_term > c.current_term {
            // We know of that term now: a promotion of ours must start above it.
            c.current_term = h.current_term;
            c.actions.push(Action::PersistTerm {
                term: h.current_term,
            });
        }
        c.send(Message::hello(
            c.own_hello(WireRole::Backup, c.resolve_discard),
        ));
        let reason = if verdict == Verdict::DiscardPrimary {
            c.resolve_discard = 0;
            c.split_brain = None;
            c.role_change = Some(RoleChange::WinSplitBrain);
            format!(
                "{sb}; resolved: the writes of primary {:#x} after seq {} are discarded (saved), and backup {:#x} becomes the primary",
                h.node_id, sb.common, c.cfg.node_id
            )
        } else {
            let why = split_brain_text(&sb, c.cfg.after_split_brain);
            c.split_brain = Some(why.clone());
            why
        };
        c.actions.push(Action::Reject {
            peer: c.to(),
            code: RejectCode::SplitBrain,
            reason,
        });
    }

    fn trim(&mut self, c: &mut Common, primary_applied: u64) {
        let last = c.last_seq();
        // Never past the history we share with the primary: its apply report speaks of its
        // records, not of a divergent suffix of ours with the same seqs.
        let matched = self.matched_through(c);
        trim_queue(
            &mut c.peer_applied,
            primary_applied.min(matched),
            c.committed_through.min(matched),
            &mut c.first_seq,
            last,
            &mut c.actions,
        );
        c.history
            .forget_before(c.peer_applied.min(c.committed_through));
    }

    fn violation(&mut self, c: &mut Common, what: String) {
        // Records appended before the violation stay valid: acknowledge and apply them first.
        self.leave_connection(c);
        c.actions.push(Action::Reject {
            peer: c.to(),
            code: RejectCode::ProtocolViolation,
            reason: what,
        });
        self.state = BackupState::Idle;
    }

    /// A new connection from a primary (the driver calls this before feeding its `Hello`).
    pub fn on_connected(&mut self, c: &mut Common) {
        c.forget_peer_reports();
        if self.state != BackupState::Failed {
            self.leave_connection(c);
            self.state = BackupState::Idle;
        }
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self, c: &mut Common) {
        c.forget_peer_reports();
        if self.state != BackupState::Failed {
            self.leave_connection(c);
            self.state = BackupState::Idle;
        }
    }

    /// A message from the primary.
    pub fn on_message(&mut self, c: &mut Common, msg: Message) {
        c.last_heard_us = c.now_us;
        match (self.state, msg) {
            (BackupState::Failed, _) => {}
            (BackupState::Idle, Message::Hello(h)) => self.on_hello(c, *h),
            (BackupState::Idle, other) => {
                self.violation(c, format!("{:?} before Hello", other.kind()))
            }
            (
                BackupState::Connected {
                    repair_after: Some(common),
                    ..
                },
                m,
            ) if !matches!(m, Message::Applied { .. } | Message::Reject { .. }) => {
                self.on_repair_message(c, common, m)
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
                c,
                Record {
                    seq,
                    term,
                    offset,
                    data,
                },
                catchup_through,
                primary_term,
            ),
            (BackupState::Connected { .. }, Message::Applied { through }) => self.trim(c, through),
            (BackupState::Connected { .. }, Message::ChunkDigest { range, digest }) => {
                self.on_chunk_digest(c, range, digest)
            }
            (BackupState::Connected { .. }, Message::ChunkData { offset, data }) => {
                self.on_chunk_data(c, offset, data)
            }
            (BackupState::Connected { .. }, Message::ResyncDone { through }) => {
                self.on_resync_done(c, through)
            }
            (BackupState::Connected { primary_id, .. }, Message::ResyncBegin { .. }) => {
                self.on_resync_begin(c, primary_id)
            }
            (BackupState::Connected { .. }, Message::Reject { code, reason }) => {
                self.hang_up(c, PeerFault::Rejected { code, reason })
            }
            (BackupState::Connected { .. }, other) => {
                self.violation(c, format!("unexpected {:?} from the primary", other.kind()))
            }
        }
    }

    fn on_write(
        &mut self,
        c: &mut Common,
        record: Record,
        catchup_through: u64,
        primary_term: u64,
    ) {
        let seq = record.seq;
        if self.resync_in.is_some() {
            return self.violation(c, format!("write {seq} before the resync is done"));
        }
        if seq < c.next_seq {
            // A duplicate (resent after a reconnect) is the same write only if the terms
            // match (log matching); then acknowledge it again.
            let held = c.history.term_at(seq);
            if held == Some(record.term) || c.seq_only_matching {
                self.ack_due = true;
            } else {
                self.violation(c, format!(
                    "write {seq} of term {} is a duplicate of a record of term {held:?}: two histories",
                    record.term
                ));
            }
        } else if seq > c.next_seq {
            self.violation(
                c,
                format!("write {seq} leaves a gap after {}", c.last_seq()),
            );
        } else if let Err(e) = check_write(
            record.offset,
            record.data.len(),
            c.cfg.region_size,
            usize::MAX,
        ) {
            self.violation(c, format!("write {seq}: {e}"));
        } else if record.term > primary_term {
            self.violation(
                c,
                format!(
                "write {seq} carries term {}, above the primary's announced term {primary_term}",
                record.term
            ),
            );
        } else if let Err(e) = c.history.note_append(seq, record.term) {
            self.violation(c, format!("write {seq}: {e}"));
        } else if seq <= self.unqueued_through && self.to_apply.is_empty() {
            self.mark_region_ahead(c, catchup_through);
            c.next_seq += 1;
            self.caught_up.push(record);
            self.ack_due = true;
        } else {
            // The log takes appends only after it adopted what came back unqueued.
            self.adopt_caught_up(c);
            c.next_seq += 1;
            c.first_seq.get_or_insert(seq);
            c.write_region(Action::Append {
                record: record.clone(),
                recovery: seq <= catchup_through,
            });
            self.to_apply.push(record);
            self.ack_due = true;
        }
    }

    /// While a divergent suffix awaits repair, the primary sends the bytes of its ranges and
    /// then `RepairDone`; nothing else.
    fn on_repair_message(&mut self, c: &mut Common, common: u64, msg: Message) {
        match msg {
            Message::RepairData { offset, data } => {
                if let Err(e) = check_write(offset, data.len(), c.cfg.region_size, usize::MAX) {
                    return self.violation(c, format!("repair data: {e}"));
                }
                self.repair_bytes_received += data.len() as u64;
                c.write_region(Action::RepairRegion { offset, data });
            }
            // Every byte of the repair arrived (a transport that lost or reordered a frame
            // must not leave a range unrepaired behind a dropped suffix; simulator seed 3070).
            Message::RepairDone { through, bytes }
                if through == common && bytes == self.repair_bytes_received =>
            {
                self.mark_repaired_ahead(c, common);
                self.drop_divergent(c, common)
            }
            other => self.violation(
                c,
                format!(
                    "unexpected {:?} while repairing after seq {common}",
                    other.kind()
                ),
            ),
        }
    }

    /// The repair is complete: our records after `common` go (they were saved at the
    /// handshake), and the primary's follow.
    fn drop_divergent(&mut self, c: &mut Common, common: u64) {
        if c.alone_from > common {
            // What we completed alone was saved (at the handshake) and goes now. Cleared
            // first: a crash in between leaves a suffix that the next handshake discards again.
            c.clear_alone();
        }
        c.actions.push(Action::TruncateAfter { after: common });
        self.repair_unfinished_after = None;
        c.next_seq = common + 1;
        c.history.truncate_after(common);
        c.first_seq = c.first_seq.filter(|&f| f <= common);
        c.applied_through = c.applied_through.min(common);
        c.commit_requested = c.commit_requested.min(common);
        c.committed_through = c.committed_through.min(common);
        self.reported_applied = self.reported_applied.min(common);
        if let BackupState::Connected { repair_after, .. } = &mut self.state {
            *repair_after = None;
        }
    }

    /// A resync into us begins: nothing of our queue may be applied again over a resynced
    /// chunk, so the region and our apply point are durable before the first chunk lands,
    /// and we are marked as the target of an unfinished resync.
    fn on_resync_begin(&mut self, c: &mut Common, primary: u64) {
        let Some(log) = self.primary_log.clone() else {
            return self.violation(c, "ResyncBegin before the handshake".into());
        };
        if self.resync_in.is_some() || !self.to_apply.is_empty() || !self.caught_up.is_empty() {
            return self.violation(
                c,
                "ResyncBegin in the middle of a resync or of writes".into(),
            );
        }
        self.mark_target(c, primary);
        self.resync_in = Some(log);
    }

    /// Marks this node, durably, as the target of an unfinished transfer from `primary` (a
    /// resync, or a catch-up writing ahead of the log), with everything applied so far made
    /// durable first: nothing of the queue may be applied again over what the transfer
    /// writes after a crash.
    fn mark_target(&mut self, c: &mut Common, primary: u64) {
        self.resync_target = Some(primary);
        c.commit_requested = c.applied_through;
        c.committed_through = c.applied_through;
        c.actions.push(Action::BeginResyncTarget {
            primary,
            applied_through: c.applied_through,
        });
    }

    /// The primary's digest of a chunk: compare ours, with every write received before it
    /// applied (and, while a resync runs, every chunk installed before it durable).
    fn on_chunk_digest(&mut self, c: &mut Common, range: ChunkRange, digest: [u8; 16]) {
        if let Err(e) = self.check_chunk(c, range.offset, u64::from(range.len)) {
            return self.violation(c, format!("chunk digest: {e}"));
        }
        if !self.to_apply.is_empty() || !self.caught_up.is_empty() {
            self.finish_batch(c);
        }
        let overlaps = |r: &ChunkRange| {
            r.offset < range.offset + u64::from(range.len)
                && range.offset < r.offset + u64::from(r.len)
        };
        if self.held.iter().any(overlaps) {
            // A match must speak of durable bytes: a chunk installed in this pass is synced.
            self.sync_installed(c);
        }
        c.actions.push(Action::CompareChunk {
            to: c.to(),
            range,
            digest,
        });
    }

    /// A chunk's bytes from the primary (a resync, or a verify's repair): written after every
    /// write received before them; confirmed once durable.
    fn on_chunk_data(&mut self, c: &mut Common, offset: u64, data: Bytes) {
        let len = data.len() as u64;
        if let Err(e) = self.check_chunk(c, offset, len) {
            return self.violation(c, format!("chunk data: {e}"));
        }
        if !self.to_apply.is_empty() || !self.caught_up.is_empty() {
            // Writes received before the chunk land before it (a verify's repair).
            self.finish_batch(c);
        }
        self.held.push(ChunkRange {
            offset,
            len: len as u32,
        });
        c.write_region(Action::InstallChunk { offset, data });
    }

    fn check_chunk(&self, c: &Common, offset: u64, len: u64) -> Result<(), String> {
        // The primary's chunk size may differ from ours: a chunk lies within the region.
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > c.cfg.region_size)
        {
            return Err(format!(
                "bytes {offset}+{len} are outside the region of {} bytes",
                c.cfg.region_size
            ));
        }
        Ok(())
    }

    /// Makes installed chunks durable and confirms them.
    fn sync_installed(&mut self, c: &mut Common) {
        if !self.held.is_empty() {
            c.actions.push(Action::SyncRegion);
        }
        for range in std::mem::take(&mut self.held) {
            c.send(Message::ChunkHeld { range });
        }
    }

    /// The resync is over: our region holds the primary's history through `through`, and our
    /// log continues after it.
    fn on_resync_done(&mut self, c: &mut Common, through: u64) {
        let Some(into) = self.resync_in.take() else {
            return self.violation(c, "ResyncDone with no resync running".into());
        };
        if through < c.last_seq() {
            return self.violation(
                c,
                format!(
                    "resync done through seq {through}, below our last seq {}",
                    c.last_seq()
                ),
            );
        }
        self.sync_installed(c);
        let mut history = into.history;
        if through > into.last_seq && history.last_term() != into.term {
            // Records the primary wrote since its Hello carry its term.
            if let Err(e) = history.note_append(into.last_seq + 1, into.term) {
                return self.violation(c, format!("resync done through seq {through}: {e}"));
            }
        }
        history.truncate_after(through);
        c.actions.push(Action::AdoptLog {
            through,
            history: history.clone(),
        });
        self.unmark(c);
        c.history = history;
        c.next_seq = through + 1;
        c.first_seq = None;
        c.applied_through = through;
        c.commit_requested = through;
        c.committed_through = through;
        self.reported_applied = self.reported_applied.min(through);
        if let BackupState::Connected {
            catchup_through, ..
        } = &mut self.state
        {
            *catchup_through = (*catchup_through).max(through);
        }
        // Acknowledge at once: the primary resets its bitmap when it hears it.
        self.ack_due = true;
    }

    /// Drops the connection for `fault`, after acknowledging and applying what it delivered.
    fn hang_up(&mut self, c: &mut Common, fault: PeerFault) {
        self.leave_connection(c);
        c.actions.push(Action::Disconnect {
            peer: c.to(),
            fault,
        });
        self.state = BackupState::Idle;
    }

    /// Before the first record written into the region ahead of the log (a catch-up's
    /// unqueued ones): a crash from here until the log holds them leaves region bytes of
    /// records the log lacks. The primary sends them again, but a promotion before that would
    /// start a history on a region holding writes outside it. So the node is marked as the
    /// target of an unfinished transfer (durably, with its applied point: as at a resync's
    /// begin), which refuses an unforced promotion, until its log holds `primary_last` (the
    /// primary's last seq at the handshake, at or above every record it sends unqueued).
    fn mark_region_ahead(&mut self, c: &mut Common, primary_last: u64) {
        if self.resync_target.is_some() {
            // Set before a crash, or earlier in this connection: its clear point is set.
            return;
        }
        let Some(primary) = self.connected_primary() else {
            return;
        };
        self.mark_target(c, primary);
        self.clear_target_at = Some(primary_last);
        self.marked_here = true;
    }

    /// Before a repaired suffix goes: the repaired ranges hold the primary's bytes as they are
    /// now, written by its records up to its last seq, of which our log holds only those
    /// through `common` once the suffix is dropped. While the suffix stayed, an unfinished
    /// repair refused a promotion; from its drop until our log holds the primary's last seq at
    /// the handshake, the mark does (found by the simulator, reproduced by the proto test
    /// `a_backup_cut_off_after_a_repair_is_marked_until_its_log_holds_the_repaired_bytes`: a
    /// backup repaired, then cut off after three of the primary's records, was promoted and went
    /// on from a region holding bytes of records its history never had). Unlike a catch-up's
    /// mark, the end of the connection does not clear it: the region stays ahead of the log.
    fn mark_repaired_ahead(&mut self, c: &mut Common, common: u64) {
        let Some(primary_last) = self.primary_log.as_ref().map(|log| log.last_seq) else {
            return;
        };
        if primary_last <= common {
            return;
        }
        if self.resync_target.is_none() {
            let Some(primary) = self.connected_primary() else {
                return;
            };
            self.mark_target(c, primary);
        }
        self.clear_target_at = Some(
            self.clear_target_at
                .map_or(primary_last, |at| at.max(primary_last)),
        );
        self.marked_here = false;
    }

    /// Clears the mark of `mark_region_ahead` once the log (durably) holds its clear point.
    fn clear_region_ahead(&mut self, c: &mut Common) {
        if self
            .clear_target_at
            .is_some_and(|at| c.last_seq() >= at && self.caught_up.is_empty())
        {
            self.unmark(c);
        }
    }

    /// The transfer the mark stood for is over: it goes, durably.
    fn unmark(&mut self, c: &mut Common) {
        self.resync_target = None;
        self.clear_target_at = None;
        self.marked_here = false;
        c.actions.push(Action::ClearResyncTarget);
    }

    /// The connection ends: what it delivered is acknowledged and applied (what went into the
    /// region ahead of the log adopted), so a mark this process set stands for nothing any
    /// more and goes: a backup whose primary died in a catch-up stays promotable. A mark
    /// found at start stays until the log reaches its clear point (what a crash left in the
    /// region is unknown).
    fn leave_connection(&mut self, c: &mut Common) {
        self.finish_batch(c);
        if self.marked_here {
            debug_assert!(self.caught_up.is_empty());
            self.unmark(c);
        }
    }

    /// Applies the catch-up's unqueued records, makes the region durable and continues the
    /// log after them: from then on they count as received, applied and durable.
    fn adopt_caught_up(&mut self, c: &mut Common) {
        let Some(last) = self.caught_up.last().map(|r| r.seq) else {
            return;
        };
        debug_assert!(
            self.to_apply.is_empty(),
            "queued records wait behind unqueued ones"
        );
        for record in std::mem::take(&mut self.caught_up) {
            debug_assert_eq!(record.seq, c.applied_through + 1);
            c.applied_through = record.seq;
            c.write_region(Action::ApplyCaughtUp(record));
        }
        c.actions.push(Action::SyncRegion);
        c.actions.push(Action::AdoptLog {
            through: last,
            history: c.history.clone(),
        });
        c.first_seq = None;
        c.commit_requested = last;
        c.committed_through = last;
    }

    fn finish_batch(&mut self, c: &mut Common) {
        self.adopt_caught_up(c);
        self.sync_installed(c);
        if self.ack_due {
            self.ack_due = false;
            if c.cfg.sync_queue_before_ack {
                c.actions.push(Action::SyncQueue);
            }
            // After the sync: what the log holds is durable.
            self.clear_region_ahead(c);
            if matches!(self.state, BackupState::Connected { .. }) {
                let matched = self.matched_through(c);
                self.reported_applied = c.committed_through.min(matched);
                self.unreported_since_us = None;
                self.last_ack_us = c.now_us;
                c.send(Message::Ack {
                    received_through: matched,
                    applied_through: self.reported_applied,
                });
            }
        }
        // The backup applies after acknowledging: the ack does not wait for the region.
        self.apply_received(c);
    }

    /// Time passes; called at least once per poll pass while idle.
    pub fn on_tick(&mut self, c: &mut Common) {
        if !matches!(self.state, BackupState::Connected { .. }) {
            return;
        }
        // A primary that announced no silence timeout predates the primary's heartbeat: its
        // idle silence means nothing.
        let primary_heartbeats = c.peer_silence_timeout_us != 0;
        if primary_heartbeats && c.now_us.saturating_sub(c.last_heard_us) > c.cfg.ack_timeout_us {
            // The primary heartbeats too: this silence is a dead primary or a connection whose
            // primary-to-backup direction is gone (our acks may still arrive, so the primary
            // cannot tell). Dropping it makes the primary reconnect, and its Hello carries the
            // apply point it could not deliver, so our queue is trimmed.
            return self.hang_up(
                c,
                PeerFault::Silent {
                    timeout_us: c.cfg.ack_timeout_us,
                },
            );
        }
        let report_due = c.committed_through.min(self.matched_through(c)) > self.reported_applied
            && {
                let since = *self.unreported_since_us.get_or_insert(c.now_us);
                c.now_us.saturating_sub(since) >= APPLIED_REPORT_DELAY_US
            };
        // The heartbeat: an idle primary takes a silence of its whole silence timeout for a dead
        // backup (`PeerFault::Silent`); a repeated ack says we are here.
        let heartbeat_due = c.now_us.saturating_sub(self.last_ack_us)
            >= heartbeat_interval_us(c.peer_silence_timeout_us, c.cfg.ack_timeout_us);
        if report_due || heartbeat_due {
            self.ack_due = true;
            self.finish_batch(c);
        }
    }

    /// The driver finished one pass of inputs: acknowledge (group commit) and apply.
    pub fn end_batch(&mut self, c: &mut Common) {
        self.finish_batch(c);
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

    pub(super) fn stats(&self, c: &Common) -> CoreStats {
        CoreStats {
            next_seq: c.next_seq,
            applied_through: c.applied_through,
            acked_through: self.matched_through(c),
            peer_applied_through: c.peer_applied,
            in_flight: (self.to_apply.len() + self.caught_up.len()) as u64,
            degraded: false,
            recoveries: c.recoveries,
            current_term: c.current_term,
            split_brain: c.split_brain.clone(),
            dirty_chunks: c.dirty.len(),
            chunk_size: c.geometry.chunk_size(),
            transfer: None,
            resync_target: self.resync_target.is_some(),
        }
    }
}
