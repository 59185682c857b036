//! The primary's side of the protocol: it assigns seqs (in its term), keeps the delay buffer,
//! applies a write only once the backup acknowledged it (and, in `power`/`pmem`, once its own
//! queue holds it durably), drives the handshake from its side and resends what the backup
//! lacks.

use std::collections::VecDeque;

use super::transfer::{Step, Transfer};
use super::*;
use crate::handshake::{check_compatible, ResyncKind};

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
        /// Our queue cannot catch the backup up: a resync follows the handshake.
        resync: Option<ResyncKind>,
    },
    /// Chunks go to the backup (the transfer); writes go on degraded meanwhile, into the queue
    /// (and the bitmap, should the queue fill up), and follow once the chunks are over.
    Resyncing {
        last_rx_us: u64,
    },
    Synchronous,
    Failed,
}

/// The primary's log as its `Hello` announced it: the backup plans from this view, so the
/// primary evaluates the same rule on it.
#[derive(Debug, Clone)]
struct AnnouncedView {
    view: LogView,
    /// The operator's split-brain resolution it announced.
    discard_node: u64,
}

/// The primary's side of a [`Replica`]: the state only that role has.
#[derive(Debug)]
pub(super) struct PrimarySide {
    state: PrimaryState,
    reported_through: u64,
    /// Delay buffer: requests in the queue that are not yet applied, in sequence order.
    delay: VecDeque<Pending>,
    /// Records of this pass applied once the pass's one queue sync holds them (in seq order):
    /// degraded writes, and the records a backup replays to us. The region never holds a
    /// record our queue could still lose: a power loss that kept some of its words and lost
    /// the record would leave words no record explains once new writes take its seq.
    synced_batch: Vec<Pending>,
    /// The first degraded write in `synced_batch` (the backup lacks it and what follows).
    degraded_from: Option<u64>,
    acked_through: u64,
    sent_through: u64,
    /// Our log as the Hello of the current handshake announced it.
    announced: Option<AnnouncedView>,
    /// Highest seq of our own queue known durable (per the durability mode): a record is
    /// applied, and its caller completed, only once it is.
    durable_through: u64,
    awaiting_since_us: Option<u64>,
    /// When we last sent the backup anything: our heartbeat is due a quarter of its silence
    /// timeout later.
    last_sent_us: u64,
    degraded: bool,
    /// Bytes of region sent for the backup's repair requests in this handshake.
    repair_bytes_sent: u64,
    /// Once the backup acknowledges this seq, it holds every write this node completed alone.
    alone_clear_at: Option<u64>,
    /// Once the backup acknowledges this seq, it holds everything the dirty-chunk bitmap
    /// describes: the bitmap is reset.
    bitmap_clear_at: Option<u64>,
    /// A resync or verify in progress (boxed: most of a primary's life has none).
    transfer: Option<Box<Transfer>>,
    /// The backup of the current handshake said its region is blank ([`Hello::region_blank`]).
    peer_region_blank: bool,
}

impl PrimarySide {
    pub(super) fn new(rec: &Recovered) -> PrimarySide {
        let delay = rec
            .unapplied
            .iter()
            .map(|record| Pending {
                record: record.clone(),
                ticket: None,
            })
            .collect();
        PrimarySide {
            state: PrimaryState::Disconnected,
            reported_through: 0,
            delay,
            synced_batch: Vec::new(),
            degraded_from: None,
            acked_through: 0,
            sent_through: 0,
            announced: None,
            durable_through: rec.last_seq,
            awaiting_since_us: None,
            last_sent_us: 0,
            degraded: false,
            repair_bytes_sent: 0,
            alone_clear_at: None,
            bitmap_clear_at: None,
            transfer: None,
            peer_region_blank: false,
        }
    }

    /// A backup just promoted: its log is the history so far (applied through its last seq),
    /// and no write is delayed.
    pub(super) fn promoted(c: &Common) -> PrimarySide {
        debug_assert_eq!(c.applied_through, c.last_seq(), "promoted before applying");
        PrimarySide::new(&Recovered {
            last_seq: c.last_seq(),
            ..Recovered::default()
        })
    }

    pub(super) fn stop(&mut self) {
        self.state = PrimaryState::Failed;
    }

    pub(super) fn is_degraded(&self) -> bool {
        self.degraded
    }

    pub(super) fn is_failed(&self) -> bool {
        self.state == PrimaryState::Failed
    }

    /// Whether `msg` says a newer primary exists: its term (when it names one) and the node
    /// that said it. Any message of any peer counts: a backup's Hello or a replayed write of a
    /// higher term, a primary's Hello, or a refusal as stale.
    pub(super) fn superseded_by(&self, c: &Common, msg: &Message) -> Option<(Option<u64>, u64)> {
        if self.is_failed() {
            return None;
        }
        match msg {
            Message::Hello(h) if h.current_term > c.current_term => {
                Some((Some(h.current_term), h.node_id))
            }
            Message::Write { term, .. } if *term > c.current_term => {
                Some((Some(*term), c.peer_node_id))
            }
            Message::Reject {
                code: RejectCode::StaleTerm,
                ..
            } => Some((None, c.peer_node_id)),
            _ => None,
        }
    }

    /// The records appended and not applied (none of them completed): a primary that becomes
    /// a backup keeps them in its log.
    pub(super) fn take_unapplied(&mut self) -> Vec<Record> {
        let mut held: Vec<Record> = self
            .delay
            .drain(..)
            .chain(self.synced_batch.drain(..))
            .map(|p| p.record)
            .collect();
        held.sort_by_key(|r| r.seq);
        self.state = PrimaryState::Failed;
        held
    }

    /// Fenced under `on_fenced = stop`: the connection ends and the node stops.
    pub(super) fn fail_fenced(&mut self, c: &mut Common, fence: Fence) {
        if let Some(peer) = c.peer {
            c.actions.push(Action::Disconnect {
                peer,
                fault: PeerFault::RoleChanged {
                    now: WireRole::Primary,
                },
            });
        }
        self.delay.clear();
        self.synced_batch.clear();
        self.degraded_from = None;
        self.fail(c, FatalError::Fenced(fence));
    }

    /// Whether `submit` may be called now. While it is false the driver leaves submissions in
    /// its ring (backpressure).
    pub fn accepts_submissions(&self, c: &Common) -> bool {
        // A full term history (many restarts that wrote while the backup was away) waits for
        // the backup to catch up and trim, as a full queue does.
        if c.history.check_append(c.next_seq, c.current_term).is_err() {
            return false;
        }
        match self.state {
            PrimaryState::Synchronous => true,
            // Under `continue`, a handshake with a peer that does not answer (half-open, stalled)
            // must not stop writes: they go on degraded until the Hello arrives.
            PrimaryState::Disconnected
            | PrimaryState::Handshaking { .. }
            | PrimaryState::Resyncing { .. } => {
                c.cfg.on_peer_loss == PeerLossPolicy::Continue && self.delay.is_empty()
            }
            PrimaryState::Recovering { .. } | PrimaryState::Failed => false,
        }
    }

    /// Takes one write from a caller. `ticket`s must increase by one per call.
    pub fn submit(
        &mut self,
        c: &mut Common,
        ticket: u64,
        offset: u64,
        data: Payload,
    ) -> Result<u64, SubmitError> {
        check_write(offset, data.len(), c.cfg.region_size, c.cfg.max_write_len)?;
        if !self.accepts_submissions(c) {
            return Err(SubmitError::NotAccepting);
        }
        let seq = c.next_seq;
        let term = c.current_term;
        if c.history.note_append(seq, term).is_err() {
            return Err(SubmitError::NotAccepting);
        }
        c.next_seq += 1;
        if !c.cfg.sync_queue_before_ack {
            // Durable as written (process mode: the page cache survives a process crash).
            self.durable_through = seq;
        }
        let record = Record {
            seq,
            term,
            offset,
            data,
        };
        c.first_seq.get_or_insert(seq);
        let append = Action::Append {
            record: record.clone(),
            recovery: false,
        };
        if self.state == PrimaryState::Synchronous {
            if c.committed_through > self.reported_through {
                // Our apply progress rides with the write (one message batch, one system
                // call): the driver hands a pass's writes to the network before it receives,
                // so a report made at the end of the pass would leave in a second one.
                self.report_applied(c);
            }
            // The backup's copy goes first: our own append (a checksum and a copy of the
            // payload, 10 µs at 64 KiB) then overlaps its trip instead of preceding it. Nothing
            // before the ack depends on the order, and the ack is a later input: a crash in
            // between leaves the backup holding a record our queue lacks, which the next
            // handshake takes back from it, as after a power loss of an unsynced tail.
            self.send(
                c,
                Message::Write {
                    seq,
                    term,
                    offset,
                    data: record.data.clone(),
                },
            );
            c.write_region(append);
            self.sent_through = seq;
            self.awaiting_since_us.get_or_insert(c.now_us);
            self.delay.push_back(Pending {
                record,
                ticket: Some(ticket),
            });
        } else {
            c.write_region(append);
            // Disconnected under `continue`: applied at the end of the batch, after one sync.
            self.degraded = true;
            self.degraded_from.get_or_insert(seq);
            self.synced_batch.push(Pending {
                record,
                ticket: Some(ticket),
            });
        }
        Ok(seq)
    }

    fn apply_pending(&mut self, c: &mut Common, p: Pending) {
        if p.record.seq > c.applied_through {
            debug_assert_eq!(p.record.seq, c.applied_through + 1, "apply out of order");
            c.applied_through = p.record.seq;
            c.write_region(Action::Apply(p.record));
        }
        if let Some(ticket) = p.ticket {
            c.actions.push(Action::Complete { ticket });
        }
    }

    /// Makes every appended record durable (one sync for the whole pass), so that records
    /// may be applied and their callers completed.
    fn sync_own_queue(&mut self, c: &mut Common) {
        if self.durable_through < c.last_seq() {
            c.actions.push(Action::SyncQueue);
            self.durable_through = c.last_seq();
        }
    }

    /// Syncs our queue and applies `synced_batch` (see there).
    fn apply_synced_batch(&mut self, c: &mut Common) {
        if self.synced_batch.is_empty() {
            return;
        }
        self.sync_own_queue(c);
        if let Some(first) = self.degraded_from.take() {
            c.note_alone(first);
        }
        for p in std::mem::take(&mut self.synced_batch) {
            self.apply_pending(c, p);
        }
    }

    /// Applies the delayed records through `through` that our own queue holds durably.
    fn apply_delayed_through(&mut self, c: &mut Common, through: u64) {
        let through = through.min(self.durable_through);
        while self.delay.front().is_some_and(|p| p.record.seq <= through) {
            let p = self.delay.pop_front().expect("front checked");
            self.apply_pending(c, p);
        }
    }

    fn commit_applied(&mut self, c: &mut Common) {
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

    fn trim(&mut self, c: &mut Common, peer_applied: u64) {
        let last = c.last_seq();
        trim_queue(
            &mut c.peer_applied,
            peer_applied,
            c.committed_through,
            &mut c.first_seq,
            last,
            &mut c.actions,
        );
        c.history
            .forget_before(c.peer_applied.min(c.committed_through));
    }

    fn lose_peer(&mut self, c: &mut Common, fault: Option<PeerFault>) {
        c.forget_peer_reports();
        if let Some(fault) = fault {
            c.actions.push(Action::Disconnect {
                peer: c.to(),
                fault,
            });
        }
        self.state = PrimaryState::Disconnected;
        self.awaiting_since_us = None;
        self.acked_through = 0;
        self.sent_through = 0;
        self.bitmap_clear_at = None;
        if let Some(t) = self.transfer.take() {
            // The chunks not confirmed stay dirty: the next resync resumes from them.
            let report = t.report(c.now_us, Some("the connection to the backup ended".into()));
            c.actions.push(Action::TransferFinished(report));
        }
        if c.cfg.on_peer_loss == PeerLossPolicy::Continue && !self.delay.is_empty() {
            // Every delayed request is in our own queue; apply it without the ack and go degraded.
            self.degraded = true;
            self.sync_own_queue(c);
            if let Some(front) = self.delay.front() {
                c.note_alone(front.record.seq);
            }
            self.apply_delayed_through(c, u64::MAX);
            self.commit_applied(c);
        }
    }

    fn fail(&mut self, c: &mut Common, err: FatalError) {
        self.state = PrimaryState::Failed;
        c.actions.push(Action::Fatal(err));
    }

    fn violation(&mut self, c: &mut Common, what: String) {
        self.lose_peer(c, Some(PeerFault::Violation(what)));
    }

    /// A connection to the backup was established.
    pub fn on_connected(&mut self, c: &mut Common) {
        if self.state != PrimaryState::Disconnected {
            return;
        }
        self.state = PrimaryState::Handshaking { since_us: c.now_us };
        let view = c.view();
        // The Hello reports our applied point; progress reports continue from there.
        self.reported_through = c.committed_through;
        let hello = c.own_hello(WireRole::Primary, c.resolve_discard);
        self.announced = Some(AnnouncedView {
            view,
            discard_node: c.resolve_discard,
        });
        self.send(c, Message::hello(hello));
    }

    /// An attempt to connect to the backup failed. Under `continue`, requests recovered from our
    /// own queue at start-up are then applied without the backup (degraded), so that new writes
    /// can proceed; under `block` they wait for the backup.
    pub fn on_connect_failed(&mut self, c: &mut Common) {
        if self.state == PrimaryState::Disconnected {
            self.lose_peer(c, None);
        }
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self, c: &mut Common) {
        if matches!(
            self.state,
            PrimaryState::Disconnected | PrimaryState::Failed
        ) {
            return;
        }
        self.lose_peer(c, None);
    }

    fn on_hello(&mut self, c: &mut Common, h: Hello) {
        let own = identity(&c.cfg, WireRole::Primary, c.peer_node_id, c.last_seq());
        match check_compatible(&own, &h) {
            Ok(()) => {}
            // A fresh backup without consent to replace ours: we keep serving and retry.
            Err((code @ RejectCode::NeedsInitialSync, reason)) => {
                return self.lose_peer(c, Some(PeerFault::Rejected { code, reason }));
            }
            Err((_, why)) => return self.fail(c, FatalError::Incompatible(why)),
        }
        let Some(announced) = self.announced.take() else {
            return self.violation(c, "Hello before ours was sent".into());
        };
        self.peer_region_blank = h.region_blank;
        // The same rule the backup applied, on the same two views.
        let plan = match plan_with_policy(
            c,
            &announced.view,
            announced.discard_node,
            &LogView::of_hello(&h),
            h.discard_node,
        ) {
            Planned::Plan(plan) => plan,
            Planned::SplitBrain(sb, Verdict::DiscardPrimary) => {
                // Our writes after the common point lose: the backup becomes the primary
                // (it decided the same) and repairs us once we are its backup.
                c.resolve_discard = 0;
                c.role_change = Some(RoleChange::LoseSplitBrain(sb));
                return;
            }
            Planned::SplitBrain(sb, _) => {
                let why = split_brain_text(&sb, c.cfg.after_split_brain);
                c.split_brain = Some(why.clone());
                return self.lose_peer(c, Some(PeerFault::SplitBrain(why)));
            }
            Planned::Refused(Unreconcilable::NeedsInitialSync(why)) => {
                // The backup refuses too; we keep serving and retry, until an operator
                // restarts it with its consent.
                return self.lose_peer(
                    c,
                    Some(PeerFault::Rejected {
                        code: RejectCode::NeedsInitialSync,
                        reason: why,
                    }),
                );
            }
            Planned::Refused(u) => return self.fail(c, u.into()),
        };
        if announced.discard_node != 0 || h.discard_node != 0 {
            // An operator's resolution is used once.
            c.resolve_discard = 0;
        }
        c.split_brain = None;
        let p_last = c.last_seq();
        let holds = plan.backup_holds_through;
        if holds > announced.view.last_seq && p_last > announced.view.last_seq {
            // The backup replays seqs that we gave to degraded writes since our Hello. Its
            // records were never completed to a caller (they are not in our durable queue);
            // ours were. The next handshake sees ours, whose term is newer, and the backup
            // drops its copies instead.
            return self.lose_peer(
                c,
                Some(PeerFault::HandshakeRaced {
                    wrote_through: p_last,
                    replay_from: announced.view.last_seq + 1,
                }),
            );
        }
        if c.peer_node_id != h.node_id {
            // Our first backup, or (with its consent to an initial sync) a new node that
            // replaces the one we were bound to.
            c.peer_node_id = h.node_id;
            c.actions.push(Action::BindPeer { node_id: h.node_id });
        }
        c.peer_silence_timeout_us = h.silence_timeout_us;
        c.actions.push(Action::RecoveryStarted);
        self.repair_bytes_sent = 0;
        // What the backup holds of our history is acknowledged: apply what we hold of it.
        self.apply_delayed_through(c, holds.min(p_last));
        self.commit_applied(c);
        // The backup's apply point counts only on the history both logs hold now: never trim a
        // record because the backup applied its own, divergent record of the same seq, nor
        // because it applied records it is about to replay to us (a replay cut short leaves
        // our log to go on differently there; simulator seed 1527).
        self.trim(c, h.applied_through.min(plan.common));
        self.state = PrimaryState::Recovering {
            last_rx_us: c.now_us,
            backup_holds_through: holds,
            repair_after: plan.backup_discards.then_some(plan.common),
            resync: plan.resync,
        };
    }

    fn on_replayed_write(&mut self, c: &mut Common, record: Record, backup_holds_through: u64) {
        let seq = record.seq;
        if seq != c.next_seq || seq > backup_holds_through {
            return self.violation(c, format!(
                "replayed write {seq}, expected {} (backup announced through {backup_holds_through})",
                c.next_seq
            ));
        }
        if let Err(e) = check_write(
            record.offset,
            record.data.len(),
            c.cfg.region_size,
            usize::MAX,
        ) {
            return self.violation(c, format!("replayed write {seq}: {e}"));
        }
        if record.term > c.current_term {
            return self.violation(
                c,
                format!(
                    "replayed write {seq} carries term {}, above this primary's term {}",
                    record.term, c.current_term
                ),
            );
        }
        if let Err(e) = c.history.note_append(seq, record.term) {
            return self.violation(c, format!("replayed write {seq}: {e}"));
        }
        c.next_seq += 1;
        c.first_seq.get_or_insert(seq);
        c.write_region(Action::Append {
            record: record.clone(),
            recovery: true,
        });
        // Applied after this pass's sync (see `synced_batch`), though it completes no caller.
        self.synced_batch.push(Pending {
            record,
            ticket: None,
        });
    }

    fn on_replay_done(
        &mut self,
        c: &mut Common,
        through: u64,
        backup_holds_through: u64,
        repair_after: Option<u64>,
        resync: Option<ResyncKind>,
    ) {
        if through != backup_holds_through || c.last_seq() < backup_holds_through {
            return self.violation(
                c,
                format!(
                "replay ended at {through}, expected {backup_holds_through} (primary now at {})",
                c.last_seq()
            ),
            );
        }
        // The replayed records are ours from here on: durable and applied before anything
        // that follows them (the catch-up, the next writes and their applies).
        self.apply_synced_batch(c);
        self.commit_applied(c);
        if let Some(common) = repair_after {
            // Every range asked for was answered (in order) before this: the backup may drop
            // its divergent suffix now, and takes our records after the common point.
            let bytes = self.repair_bytes_sent;
            self.send(
                c,
                Message::RepairDone {
                    through: common,
                    bytes,
                },
            );
        }
        // A fold since our Hello may have taken records the plan counted on: the bitmap, which
        // covers them (it began at or below the queue's start then), brings them over.
        let resync = resync.or_else(|| {
            let holds_all = backup_holds_through >= c.last_seq()
                || c.first_seq.is_some_and(|f| f <= backup_holds_through + 1);
            (!holds_all).then_some(ResyncKind::Dirty)
        });
        match resync {
            Some(kind) => self.start_resync(c, kind, backup_holds_through),
            None => {
                if !c.dirty.is_empty() || c.resync_from != 0 {
                    // The backup holds every record the bitmap describes: it goes once the
                    // backup confirms (its Hello may count records not yet durable).
                    self.bitmap_clear_at = Some(backup_holds_through);
                }
                self.start_catch_up(c, backup_holds_through);
            }
        }
    }

    /// A resync begins: the backup's region takes the chunks its missing records wrote (all
    /// chunks that differ, for an initial sync), while writes go on here (degraded).
    fn start_resync(&mut self, c: &mut Common, kind: ResyncKind, holds: u64) {
        let purpose = match kind {
            ResyncKind::Dirty => TransferPurpose::Resync,
            ResyncKind::Full => {
                // Persisted, so that a crash of either node resumes from what is left.
                c.dirty = ChunkSet::full(c.geometry.chunk_count());
                c.resync_from = holds + 1;
                c.actions.push(Action::MarkAllDirty {
                    resync_from: holds + 1,
                });
                TransferPurpose::InitialSync
            }
        };
        self.state = PrimaryState::Resyncing {
            last_rx_us: c.now_us,
        };
        self.acked_through = 0;
        self.sent_through = 0;
        let mut transfer = Transfer::new(purpose, c);
        if self.peer_region_blank {
            // Nothing to compare: every chunk's bytes go, except those of zeros (the blank
            // region's bytes plus the writes of this stream are the primary's then).
            transfer.skip_digests();
        }
        self.send(
            c,
            Message::ResyncBegin {
                chunks: transfer.progress(c).chunks_total,
            },
        );
        self.transfer = Some(Box::new(transfer));
        self.pump_transfer(c);
    }

    /// The bytes laid over the region when a chunk is read: the records sent and not applied.
    fn overlay(&self, c: &Common) -> (u64, u64) {
        match self.state {
            PrimaryState::Synchronous => (c.applied_through + 1, self.sent_through),
            _ => (1, 0),
        }
    }

    /// Moves the transfer along (window, rate), and ends it when every chunk is done.
    fn pump_transfer(&mut self, c: &mut Common) {
        let overlay = self.overlay(c);
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if t.pump(c, overlay) == Step::Finished {
            let t = self.transfer.take().expect("checked");
            let resync = matches!(
                t.purpose(),
                TransferPurpose::Resync | TransferPurpose::InitialSync
            );
            c.actions
                .push(Action::TransferFinished(t.report(c.now_us, None)));
            if resync {
                self.finish_resync(c);
            }
        }
    }

    /// Every dirty chunk is on the backup: it continues its log after the last seq our queue
    /// no longer holds, and takes the records after it.
    fn finish_resync(&mut self, c: &mut Common) {
        // Degraded writes of this pass are in the queue (the catch-up sends them).
        self.apply_synced_batch(c);
        let through = c.first_seq.map_or(c.last_seq(), |first| first - 1);
        self.send(c, Message::ResyncDone { through });
        self.bitmap_clear_at = Some(through);
        self.start_catch_up(c, through);
    }

    /// The backup holds our history through `holds`: send it the rest and mirror from now on.
    fn start_catch_up(&mut self, c: &mut Common, holds: u64) {
        let p_last = c.last_seq();
        self.acked_through = holds;
        self.sent_through = p_last;
        if holds < p_last {
            c.actions.push(Action::SendQueued {
                to: c.to(),
                from_seq: holds + 1,
                through_seq: p_last,
            });
            self.last_sent_us = c.now_us;
            self.awaiting_since_us = Some(c.now_us);
        }
        self.state = PrimaryState::Synchronous;
        self.degraded = false;
        if holds >= p_last {
            c.clear_alone();
        } else if c.alone_from != 0 {
            self.alone_clear_at = Some(p_last);
        }
        c.recoveries += 1;
    }

    fn on_ack(&mut self, c: &mut Common, received_through: u64, applied_through: u64) {
        if received_through < self.acked_through || received_through > self.sent_through {
            return self.violation(
                c,
                format!(
                    "ack through {received_through}, but {} were acked and {} sent",
                    self.acked_through, self.sent_through
                ),
            );
        }
        let progressed = received_through > self.acked_through;
        self.acked_through = received_through;
        if self
            .bitmap_clear_at
            .is_some_and(|through| received_through >= through)
        {
            self.bitmap_clear_at = None;
            c.dirty.clear();
            c.resync_from = 0;
            c.actions.push(Action::ResetDirty);
        }
        if self
            .alone_clear_at
            .is_some_and(|through| received_through >= through)
        {
            self.alone_clear_at = None;
            c.clear_alone();
        }
        self.apply_delayed_through(c, received_through);
        // The timeout restarts only on progress: a heartbeat (an ack of nothing new) must not
        // hide writes lost on their way to a backup that is otherwise alive.
        self.awaiting_since_us = if self.acked_through == self.sent_through {
            None
        } else if progressed {
            Some(c.now_us)
        } else {
            self.awaiting_since_us.or(Some(c.now_us))
        };
        self.commit_applied(c);
        self.trim(c, applied_through);
    }

    /// A message from the backup.
    pub fn on_message(&mut self, c: &mut Common, msg: Message) {
        c.last_heard_us = c.now_us;
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
                self.lose_peer(
                    c,
                    Some(PeerFault::Rejected {
                        code: RejectCode::ProtocolViolation,
                        reason,
                    }),
                );
            }
            // A split brain the policy keeps apart, or a peer that cannot take us now: retry
            // (an operator may resolve it, or restart the peer, meanwhile).
            (
                _,
                Message::Reject {
                    code: code @ (RejectCode::Unavailable | RejectCode::NeedsInitialSync),
                    reason,
                },
            ) => {
                if !matches!(self.state, PrimaryState::Disconnected) {
                    self.lose_peer(c, Some(PeerFault::Rejected { code, reason }));
                }
            }
            (
                _,
                Message::Reject {
                    code: RejectCode::SplitBrain,
                    reason,
                },
            ) => {
                if !matches!(self.state, PrimaryState::Disconnected) {
                    c.split_brain = Some(reason.clone());
                    self.lose_peer(c, Some(PeerFault::SplitBrain(reason)));
                }
            }
            // Configuration mismatches (version, region size, roles, binding, capacity) and an
            // unrecoverable history do not heal by reconnecting.
            (_, Message::Reject { code, reason }) => {
                self.fail(c, FatalError::Rejected { code, reason });
            }
            (PrimaryState::Handshaking { .. }, Message::Hello(h)) => self.on_hello(c, *h),
            (
                PrimaryState::Recovering {
                    backup_holds_through,
                    repair_after,
                    resync,
                    ..
                },
                m,
            ) => {
                self.state = PrimaryState::Recovering {
                    last_rx_us: c.now_us,
                    backup_holds_through,
                    repair_after,
                    resync,
                };
                match m {
                    Message::Write {
                        seq,
                        term,
                        offset,
                        data,
                    } => self.on_replayed_write(
                        c,
                        Record {
                            seq,
                            term,
                            offset,
                            data,
                        },
                        backup_holds_through,
                    ),
                    Message::RepairRequest { ranges } if repair_after.is_some() => {
                        self.on_repair_request(c, ranges)
                    }
                    Message::ReplayDone { through } => {
                        self.on_replay_done(c, through, backup_holds_through, repair_after, resync)
                    }
                    other => {
                        self.violation(c, format!("unexpected {:?} during replay", other.kind()))
                    }
                }
                // A long replay keeps the driver busy, and it ticks only when idle.
                self.heartbeat_while_recovering(c);
            }
            (PrimaryState::Resyncing { .. }, m) => {
                self.state = PrimaryState::Resyncing {
                    last_rx_us: c.now_us,
                };
                match m {
                    // The backup's heartbeat: its log is where the handshake left it.
                    Message::Ack { .. } => {}
                    m @ (Message::ChunkVerdict { .. } | Message::ChunkHeld { .. }) => {
                        self.on_transfer_message(c, m)
                    }
                    other => {
                        self.violation(c, format!("unexpected {:?} during a resync", other.kind()))
                    }
                }
                self.heartbeat_while_recovering(c);
            }
            (
                PrimaryState::Synchronous,
                Message::Ack {
                    received_through,
                    applied_through,
                },
            ) => self.on_ack(c, received_through, applied_through),
            (
                PrimaryState::Synchronous,
                m @ (Message::ChunkVerdict { .. } | Message::ChunkHeld { .. }),
            ) => self.on_transfer_message(c, m),
            (PrimaryState::Disconnected, _) => {}
            (state, other) => self.violation(
                c,
                format!("unexpected {:?} in state {state:?}", other.kind()),
            ),
        }
    }

    /// Time passes; called at least once per poll pass while idle.
    pub fn on_tick(&mut self, c: &mut Common) {
        match self.state {
            PrimaryState::Synchronous => {
                if let Some(since) = self.awaiting_since_us {
                    if c.now_us.saturating_sub(since) > c.cfg.ack_timeout_us {
                        return self.lose_peer(
                            c,
                            Some(PeerFault::AckTimeout {
                                timeout_us: c.cfg.ack_timeout_us,
                            }),
                        );
                    }
                } else if c.now_us.saturating_sub(c.last_heard_us) > c.cfg.ack_timeout_us {
                    // Idle, and not even the backup's heartbeat arrived: a dead or restarted
                    // peer whose connection never broke on our side.
                    return self.lose_peer(
                        c,
                        Some(PeerFault::Silent {
                            timeout_us: c.cfg.ack_timeout_us,
                        }),
                    );
                }
                // Progress goes with the next write (`submit`); alone only once writes have
                // paused: reported after every apply, it was a second message per synchronous
                // write, and the backup woke for it just before the next write arrived.
                let report_alone = c.committed_through > self.reported_through
                    && c.now_us.saturating_sub(self.last_sent_us) >= APPLIED_REPORT_DELAY_US;
                if report_alone || self.heartbeat_due(c) {
                    self.report_applied(c);
                }
            }
            PrimaryState::Resyncing { last_rx_us } => {
                if c.now_us.saturating_sub(last_rx_us) > c.cfg.ack_timeout_us {
                    return self.lose_peer(
                        c,
                        Some(PeerFault::Silent {
                            timeout_us: c.cfg.ack_timeout_us,
                        }),
                    );
                }
                self.heartbeat_while_recovering(c);
                self.pump_transfer(c);
            }
            PrimaryState::Handshaking { since_us: t }
            | PrimaryState::Recovering { last_rx_us: t, .. } => {
                if c.now_us.saturating_sub(t) > c.cfg.handshake_timeout_us {
                    return self.lose_peer(
                        c,
                        Some(PeerFault::HandshakeTimeout {
                            timeout_us: c.cfg.handshake_timeout_us,
                        }),
                    );
                }
                self.heartbeat_while_recovering(c);
            }
            PrimaryState::Disconnected | PrimaryState::Failed => {}
        }
    }

    fn on_repair_request(&mut self, c: &mut Common, ranges: Vec<RegionRange>) {
        if let Some(bad) = ranges
            .iter()
            .find(|r| r.offset.saturating_add(r.len) > c.cfg.region_size)
        {
            return self.violation(
                c,
                format!(
                    "repair of {} bytes at offset {} is outside the region of {} bytes",
                    bad.len, bad.offset, c.cfg.region_size
                ),
            );
        }
        self.repair_bytes_sent += ranges.iter().map(|r| r.len).sum::<u64>();
        c.actions.push(Action::SendRegion { to: c.to(), ranges });
    }

    /// See [`Replica::on_chunk_elided`].
    pub(super) fn on_chunk_elided(&mut self, c: &mut Common, range: ChunkRange) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        match t.on_elided(c, range) {
            Ok(()) => self.pump_transfer(c),
            Err(why) => self.violation(c, why),
        }
    }

    /// A verdict or a held chunk of the transfer in progress.
    fn on_transfer_message(&mut self, c: &mut Common, msg: Message) {
        let Some(t) = self.transfer.as_mut() else {
            return self.violation(
                c,
                format!("{:?} with no resync or verify running", msg.kind()),
            );
        };
        let result = match msg {
            Message::ChunkVerdict { range, same } => t.on_verdict(c, range, same),
            Message::ChunkHeld { range } => t.on_held(c, range),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.pump_transfer(c),
            Err(why) => self.violation(c, why),
        }
    }

    /// Whether the driver may fold the queue into the bitmap now: writes go on without the
    /// backup (`continue`) and none waits for an ack, and no handshake planned from the
    /// queue's present shape is under way.
    pub(super) fn may_fold(&self, c: &Common) -> bool {
        c.cfg.on_peer_loss == PeerLossPolicy::Continue
            && self.delay.is_empty()
            && c.first_seq.is_some()
            && matches!(
                self.state,
                PrimaryState::Disconnected
                    | PrimaryState::Handshaking { .. }
                    | PrimaryState::Resyncing { .. }
            )
    }

    /// Folds every record of the queue into the dirty-chunk bitmap (see [`Action::Fold`]).
    /// Returns whether it did.
    pub(super) fn fold(&mut self, c: &mut Common) -> bool {
        if !self.may_fold(c) {
            return false;
        }
        // This pass's degraded writes are applied first: only applied records fold.
        self.apply_synced_batch(c);
        let Some(first) = c.first_seq else {
            return false;
        };
        let through = c.last_seq();
        debug_assert_eq!(c.applied_through, through, "folding unapplied records");
        if c.resync_from == 0 {
            c.resync_from = first;
        }
        c.actions.push(Action::Fold { through });
        c.first_seq = None;
        // The fold makes the region durable through them first.
        c.commit_requested = c.commit_requested.max(through);
        c.committed_through = c.committed_through.max(through);
        true
    }

    /// The fold's chunks, from the driver: they join the bitmap.
    pub(super) fn on_folded(&mut self, c: &mut Common, chunks: &[std::ops::Range<u64>]) {
        let mut new = 0;
        for range in chunks {
            new += c.dirty.insert_range(range.clone());
        }
        if let Some(t) = self.transfer.as_mut() {
            t.on_folded(chunks);
            t.grew(new);
        }
    }

    /// Starts an online verify of the connected, synchronous backup.
    pub(super) fn start_verify(&mut self, c: &mut Common, repair: bool) -> Result<(), VerifyError> {
        if self.state != PrimaryState::Synchronous {
            return Err(VerifyError::NotSynchronous {
                phase: self.phase(),
            });
        }
        if let Some(t) = &self.transfer {
            return Err(VerifyError::Busy {
                running: t.purpose().name(),
            });
        }
        self.transfer = Some(Box::new(Transfer::new(
            TransferPurpose::Verify { repair },
            c,
        )));
        self.pump_transfer(c);
        Ok(())
    }

    /// The driver finished one pass of inputs: group-commit what the pass produced.
    pub fn end_batch(&mut self, c: &mut Common) {
        self.apply_synced_batch(c);
        // The pass's writes are on their way to the backup (the sends come first): make our
        // own copies durable meanwhile, so that the ack finds them applicable.
        self.sync_own_queue(c);
        self.apply_delayed_through(c, self.acked_through);
        self.commit_applied(c);
        if self.transfer.is_some() {
            self.pump_transfer(c);
            // The batch's chunks whose bytes go, in runs of neighbours.
            let overlay = self.overlay(c);
            if let Some(t) = self.transfer.as_mut() {
                t.send_ready(c, overlay);
            }
        }
    }

    fn send(&mut self, c: &mut Common, msg: Message) {
        self.last_sent_us = c.now_us;
        c.send(msg);
    }

    /// Sends our durable apply point. Also the heartbeat: repeating it costs the backup nothing
    /// (trims are monotonic) and repairs a report that a broken connection lost.
    fn report_applied(&mut self, c: &mut Common) {
        self.reported_through = c.committed_through;
        self.send(
            c,
            Message::Applied {
                through: c.committed_through,
            },
        );
    }

    /// The backup is connected from its Hello on, and its silence timer runs while it replays
    /// to us: keep it fed.
    fn heartbeat_while_recovering(&mut self, c: &mut Common) {
        if matches!(
            self.state,
            PrimaryState::Recovering { .. } | PrimaryState::Resyncing { .. }
        ) && self.heartbeat_due(c)
        {
            self.report_applied(c);
        }
    }

    fn heartbeat_due(&self, c: &Common) -> bool {
        c.now_us.saturating_sub(self.last_sent_us)
            >= heartbeat_interval_us(c.peer_silence_timeout_us, c.cfg.ack_timeout_us)
    }

    pub(super) fn phase(&self) -> Phase {
        match self.state {
            PrimaryState::Disconnected => Phase::Disconnected,
            PrimaryState::Handshaking { .. } => Phase::Handshaking,
            PrimaryState::Recovering { .. } => Phase::Recovering,
            PrimaryState::Resyncing { .. } => Phase::Resyncing,
            PrimaryState::Synchronous => Phase::Synchronous,
            PrimaryState::Failed => Phase::Failed,
        }
    }

    pub(super) fn stats(&self, c: &Common) -> CoreStats {
        CoreStats {
            next_seq: c.next_seq,
            applied_through: c.applied_through,
            acked_through: self.acked_through,
            peer_applied_through: c.peer_applied,
            in_flight: self.delay.len() as u64,
            degraded: self.degraded,
            recoveries: c.recoveries,
            current_term: c.current_term,
            split_brain: c.split_brain.clone(),
            dirty_chunks: c.dirty.len(),
            chunk_size: c.geometry.chunk_size(),
            transfer: self.transfer.as_ref().map(|t| t.progress(c)),
            resync_target: false,
        }
    }
}
