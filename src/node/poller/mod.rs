//! The polling thread: one pass reads the connection, takes submissions, lets the core tick,
//! executes its actions and flushes; it busy-polls while there is work and sleeps in poll(2)
//! when idle. Connection management is in `connection.rs`, the action executor in `actions.rs`.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirror_proto::{Action, Message, PeerId, WireRole, WritesRefused};
use mirror_ring::{Consumer, Standby};
use mirror_storage::{RegionWriter, StorageError};

use super::events::Event;
use crate::config::Config;
use crate::error::{MirrorError, Result};
use crate::transport::tcp::Security;
use crate::transport::{Connecting, Connection, Listener};

use super::*;
use mirror_exec::{Executor, Hooks};

mod actions;
mod connection;
mod transfer;

/// Largest number of messages taken from the connection per pass.
const RECV_BATCH: usize = 512;
/// Largest number of submissions taken from the ring per pass.
const SUBMIT_BATCH: usize = 256;
/// During a catch-up, hand queued records to the network in chunks of about this size.
const CATCH_UP_CHUNK: usize = 256 << 10;
/// Stop taking submissions while this much is waiting to be sent.
const SEND_BACKLOG_PAUSE: usize = 8 << 20;
/// How often a transfer in progress publishes a progress event.
const TRANSFER_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A new connection must say Hello within this time.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

pub(super) struct Poller {
    pub(super) cfg: Config,
    /// The core, the queue and the region, and the rules that execute the core's actions on
    /// them (shared with the simulator).
    pub(super) exec: Executor<RegionWriter, NodeHooks>,
    pub(super) shared: Arc<Shared>,
    pub(super) consumer: Option<Consumer<Submission>>,
    /// A submission taken from the ring that did not fit in the queue yet.
    pub(super) stash: Option<(u64, Submission)>,
    pub(super) conn: Option<Box<dyn Connection>>,
    /// Primary over TCP: a connection attempt in progress, and when it gives up (us).
    pub(super) connecting: Option<(Box<dyn Connecting>, u64)>,
    pub(super) acceptor: Option<Box<dyn Listener>>,
    /// What a new connection establishes first: TLS, the secret's challenge-response, both
    /// or neither.
    pub(super) security: Security,
    pub(super) pending: Vec<(Box<dyn Connection>, Instant)>,
    pub(super) actions: Vec<Action>,
    pub(super) inbox: Vec<Message>,
    pub(super) start: Instant,
    pub(super) last_work: Instant,
    pub(super) last_stats: Instant,
    /// When the current (or last) step read the clock.
    pub(super) last_step_at: Instant,
    /// Set when a step failed the node.
    pub(super) stopped: bool,
    pub(super) next_connect_at_us: u64,
    /// Primary: a connection reached its listener since its last attempt to reach its backup
    /// (a returning backup's knock): the next attempt comes early (see `connect_to_peer`).
    pub(super) knocked: bool,
    /// Backup with `peer`: the knock at its primary's address when it opens (see `knock`).
    pub(super) knock: Knock,
    /// Backup: next time to look for new connections while one is established.
    pub(super) next_accept_at_us: u64,
    pub(super) last_divergence: Option<Divergence>,
    /// A catch-up (or replay) being streamed to the peer.
    pub(super) catch_up: Option<CatchUp>,
    /// The id of the current connection (or of the last one).
    pub(super) conn_peer: PeerId,
    pub(super) recoveries_seen: u64,
    pub(super) submitted: u64,
    /// The role last published to callers.
    pub(super) published_role: WireRole,
    /// The `degraded` flag last published to callers.
    pub(super) published_degraded: bool,
    /// The `next_seq` last published to callers.
    pub(super) published_next_seq: u64,
    /// The connection whose address was last published.
    pub(super) published_connection: Option<PeerId>,
    /// A split brain was reported since the pair was last synchronous (a divergent suffix saved
    /// now is what it discarded).
    pub(super) split_brain_reported: bool,
    /// The connection whose first Hello carried the node id it authenticated as.
    pub(super) hello_checked: Option<PeerId>,
    /// The connection whose loss was last published (see `publish_peer_lost`).
    pub(super) peer_lost_published: Option<PeerId>,
    /// When a failure to authenticate with the peer was last logged (see `connect_to_peer`).
    pub(super) auth_failure_logged_at: Option<Instant>,
    /// The queue was folded into the bitmap since the pair was last synchronous.
    pub(super) folding: bool,
    /// The transfer in progress was announced (log, event).
    pub(super) transfer_published: bool,
    /// When its last progress event went out.
    pub(super) transfer_progress_at: Option<Instant>,
    /// The submission being taken is the last one waiting: its write goes to the network
    /// before our own append of it (see `take_submissions`).
    pub(super) send_before_own_append: bool,
}

/// A backup's knock at its primary: a TCP connection to the primary's address (`peer`),
/// closed once established. A primary that has lost its backup dials it at once when a
/// connection reaches its listener, instead of at its next `reconnect_interval_ms`: a backup
/// that restarts is caught up without waiting for that (100 ms by default).
pub(super) enum Knock {
    /// To knock at the first pass (the listener is bound by then, so that the primary's
    /// dial finds it).
    Due,
    /// Connecting; gives up at the deadline (us).
    Connecting(Box<dyn Connecting>, u64),
    /// Knocked, or nothing to knock at.
    Done,
}

/// The earliest a knock brings a primary's next attempt, after its last one began: bounds the
/// attempts a stream of connections to its listener can cause.
pub(super) const KNOCK_GAP_US: u64 = 500;

/// The node's hooks into the executor: the test fail point (feature `fail-points` only).
pub(super) struct NodeHooks {
    #[cfg(feature = "fail-points")]
    pub(super) crash_before_apply_seq: Option<u64>,
    #[cfg(feature = "fail-points")]
    pub(super) crash_armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Hooks for NodeHooks {
    /// The test fail point (cargo feature `fail-points`, never in a release build): die between
    /// the backup's ack and our apply.
    #[cfg(feature = "fail-points")]
    fn before_apply(&mut self, seq: u64) {
        // Relaxed: a test arms it and the next apply may see it a pass later; nothing else is
        // published through it.
        if self.crash_before_apply_seq == Some(seq)
            || self.crash_armed.load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(seq, "fail point: killing this process before applying");
            // SAFETY: kill(2) on our own pid with a valid signal number.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

/// A stream of queued records to the peer that goes on across passes, and what the core sent
/// after it (which must follow it on the connection).
pub(super) struct CatchUp {
    next_seq: u64,
    through_seq: u64,
    behind: VecDeque<Outgoing>,
}

/// Something the core sent while a catch-up was being streamed.
pub(super) enum Outgoing {
    Message(Message),
    Queued { from_seq: u64, through_seq: u64 },
}

/// Why a pass stopped the node.
pub(super) enum Stop {
    Fatal(String),
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        Stop::Fatal(e.to_string())
    }
}

impl Poller {
    /// One pass of the event loop plus its bookkeeping. After [`Step::Stopped`] the node has
    /// failed and further steps do nothing.
    pub(super) fn step(&mut self) -> Step {
        if self.stopped {
            return Step::Stopped;
        }
        // The clock is read once per pass (it showed up at ~10 % of a pipelined profile when read
        // several times per pass).
        let t = Instant::now();
        self.last_step_at = t;
        let now = t.duration_since(self.start).as_micros() as u64;
        self.exec.core.set_now(now);
        let worked = match self.pass(now) {
            Ok(w) => w,
            Err(Stop::Fatal(reason)) => {
                self.stop_node(reason);
                return Step::Stopped;
            }
        };
        if worked {
            self.last_work = t;
        }
        if worked || t.duration_since(self.last_stats) > Duration::from_millis(1) {
            self.publish_stats();
            self.last_stats = t;
        }
        if worked {
            stamps::at(Point::StepEnded);
            return Step::Worked;
        }
        stamps::idle();
        // Idle time is the cheapest time to fetch the lines the next append lands on.
        self.exec.queue.warm_ahead();
        if t.duration_since(self.last_work) >= self.cfg.idle_spin {
            Step::Idle
        } else {
            Step::Spinning
        }
    }

    /// The node cannot go on: fail it (callers see why).
    fn stop_node(&mut self, reason: String) {
        self.shared.events.publish(Event::Failed {
            reason: reason.clone(),
        });
        self.exec.core.fail();
        self.conn = None;
        self.stopped = true;
        self.publish_stats();
        self.shared.fail(reason);
    }

    /// [`Mirror::promote`], between two passes.
    pub(super) fn promote(&mut self, force: bool) -> Result<u64> {
        self.check_running()?;
        let term = self.exec.core.promote(force)?;
        self.after_role_change()?;
        tracing::warn!(
            term,
            force,
            "promoted to primary: a new term; connecting to the peer to make it this node's backup"
        );
        Ok(term)
    }

    /// [`Mirror::resolve_split_brain`], between two passes.
    pub(super) fn resolve_split_brain(&mut self, discard_node: u64) -> Result<()> {
        self.check_running()?;
        let own = self.exec.queue.node_id();
        let peer = self.exec.queue.peer_node_id();
        if discard_node != own && discard_node != peer {
            return Err(MirrorError::Config(crate::error::ConfigError::BadValue {
                key: "discard".into(),
                value: format!("{discard_node:#x}"),
                why: format!("names neither this node ({own:#x}) nor its peer ({peer:#x})"),
            }));
        }
        self.exec.core.resolve_split_brain(discard_node);
        tracing::warn!(
            discard = format_args!("{discard_node:#x}"),
            "split brain: the operator chose whose divergent writes go at the next handshake"
        );
        // Meet the peer again now rather than at the next retry.
        self.next_connect_at_us = 0;
        Ok(())
    }

    /// [`Mirror::demote`], between two passes.
    pub(super) fn demote(&mut self) -> Result<()> {
        self.check_running()?;
        self.exec.core.demote()?;
        self.after_role_change()?;
        tracing::warn!("demoted to backup: waiting for the new primary");
        Ok(())
    }

    fn check_running(&self) -> Result<()> {
        match self.shared.failure() {
            Some(e) => Err(e),
            None if self.stopped => Err(MirrorError::Closed),
            None => Ok(()),
        }
    }

    /// Executes what a role change asked for and publishes the new role.
    fn after_role_change(&mut self) -> Result<()> {
        if let Err(Stop::Fatal(reason)) = self.execute_actions() {
            self.stop_node(reason.clone());
            return Err(MirrorError::Failed { reason });
        }
        self.role_changed();
        Ok(())
    }

    /// The core's role may have changed: publish it, and start the connection life of the
    /// new role (a primary connects at once; a backup drops an attempt in progress).
    pub(super) fn role_changed(&mut self) {
        let role = self.exec.core.role();
        if role == self.published_role {
            return;
        }
        self.published_role = role;
        self.shared.set_role(role);
        self.shared.events.publish(match role {
            WireRole::Primary => Event::Promoted {
                term: self.exec.core.stats().current_term,
            },
            WireRole::Backup => Event::Demoted,
        });
        self.connecting = None;
        self.next_connect_at_us = 0;
        self.publish_stats();
    }

    /// The core stopped taking writes (`RefuseWrites`): every ticket not completed fails, and
    /// so does every submission still in the ring.
    pub(super) fn refuse_pending(&mut self, why: WritesRefused) {
        let fenced = match why {
            WritesRefused::Fenced(f) => {
                let reason = format!(
                    "{f}; start this node as a backup (or demote it) to rejoin the new primary"
                );
                tracing::error!(%reason, "fenced");
                self.shared.events.publish(Event::Fenced {
                    reason: reason.clone(),
                });
                self.shared.set_fenced(Some(reason.clone()));
                Some(reason)
            }
            WritesRefused::LostSplitBrain(sb) => {
                let reason = format!(
                    "{sb}; resolved against this primary (after_split_brain = {}, or an operator): its writes after seq {} are discarded (saved to a file beside the queue) and the other node becomes the primary",
                    mirror_proto::policy_name(self.cfg.after_split_brain),
                    sb.common
                );
                tracing::error!(%reason, "lost a split brain");
                self.shared.events.publish(Event::Fenced {
                    reason: reason.clone(),
                });
                self.shared.set_fenced(Some(reason.clone()));
                Some(reason)
            }
            WritesRefused::Demoted => None,
        };
        let completed = self.shared.completed.load(Ordering::Acquire);
        self.shared
            .refuse(completed + 1, self.submitted, fenced.clone());
        self.refuse_ring(fenced);
    }

    /// Refuses every submission waiting in the ring (the node is not a primary now).
    fn refuse_ring(&mut self, fenced: Option<String>) {
        let first = self.submitted + 1;
        if self.stash.take().is_some() {
            self.submitted += 1;
        }
        while let Some((position, _)) = self.consumer.as_mut().and_then(|c| c.try_pop()) {
            self.submitted = position + 1;
        }
        self.shared.refuse(first, self.submitted, fenced);
    }

    fn shutdown(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            let _ = c.flush();
        }
        if let Err(e) = self.exec.queue.sync() {
            tracing::warn!(error = %e, "final queue sync failed");
        }
        if let Err(e) = self.exec.checkpoint(0) {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
        self.publish_stats();
        self.shared.notify_waiters();
    }

    /// One pass of the event loop. Returns whether anything happened.
    fn pass(&mut self, now: u64) -> Result<bool, Stop> {
        let mut worked = false;
        // Writes waiting in the ring go out before we look for what arrived: otherwise a
        // receive (finding nothing, at depth 1) would come before every write's send.
        if self.exec.core.role() == WireRole::Primary && self.take_submissions()? {
            worked = true;
            self.flush_connection();
        }
        worked |= self.manage_connection(now);
        if let Some(conn) = self.conn.as_mut() {
            match conn.poll_recv(&mut self.inbox, RECV_BATCH) {
                Ok(n) => worked |= n > 0,
                Err(e) => {
                    self.drop_connection(&e.to_string());
                    worked = true;
                }
            }
        }
        stamps::at(Point::Decoded);
        if self.catch_up.is_some() {
            let mut broken = None;
            worked |= self.continue_catch_up(&mut broken)?;
            if let Some(why) = broken {
                self.drop_connection(&why);
                worked = true;
            }
        }
        let mut no_room = false;
        if self.exec.core.role() == WireRole::Backup {
            // Take writes only while the queue has room for them. The primary's headroom covers
            // its own queue; ours can hold more (records the primary already trimmed while its
            // applied report to us is in flight). Rather than fail, drop the connection: the
            // primary reconnects, its Hello lets us trim, and the catch-up resends the rest.
            let full_at = self
                .exec
                .queue
                .first_write_without_room(self.inbox.iter().map(|m| match m {
                    Message::Write { seq, data, .. } => Some((*seq, data.len())),
                    _ => None,
                }));
            if let Some(at) = full_at {
                self.inbox.truncate(at);
                no_room = true;
            }
        }
        if let Some(forged) = self.hello_not_from_authenticated_peer() {
            self.inbox.clear();
            self.drop_connection(&forged);
            worked = true;
        }
        for msg in self.inbox.drain(..) {
            self.exec.core.on_message(self.conn_peer, msg);
        }
        stamps::at(Point::CoreHandled);
        if no_room {
            self.drop_connection(
                "the queue has no room for the next write (it trims after the reconnect)",
            );
            worked = true;
        }
        worked |= self.take_submissions()?;
        self.role_changed();
        if !worked {
            self.exec.core.on_tick();
        }
        self.exec.core.end_batch();
        stamps::at(Point::BatchEnded);
        worked |= self.execute_actions()?;
        worked |= self.flush_connection();
        // Actions from a dropped connection (e.g. degraded applies) run in the same pass.
        worked |= self.execute_actions()?;
        if self.exec.checkpoint_due(now, !worked) {
            self.exec.checkpoint(now)?;
            worked |= self.execute_actions()?;
        }
        stamps::at(Point::PassEnded);
        Ok(worked)
    }

    /// Hands what the connection holds to the network; a failure drops it. Returns whether it
    /// did (that is work).
    fn flush_connection(&mut self) -> bool {
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.flush() {
                self.drop_connection(&e.to_string());
                return true;
            }
        }
        false
    }

    /// On an authenticated connection, the first Hello must come from the node that proved the
    /// secret (the proof covers its node id; the Hello is only a claim). Checked until that
    /// Hello passed: what follows it arrives in records only that node can seal.
    pub(super) fn hello_not_from_authenticated_peer(&mut self) -> Option<String> {
        if self.hello_checked == Some(self.conn_peer) {
            return None;
        }
        let proven = self.conn.as_ref()?.authenticated_peer()?;
        let first = self.inbox.iter().find_map(|m| match m {
            Message::Hello(h) => Some(h.node_id),
            _ => None,
        })?;
        if first == proven {
            self.hello_checked = Some(self.conn_peer);
            return None;
        }
        Some(format!(
            "Hello claims node {first:#x} but the connection authenticated as node {proven:#x}"
        ))
    }

    /// Publishes the loss of the current connection, once per connection.
    pub(super) fn publish_peer_lost(&mut self, why: &str) {
        if self.peer_lost_published != Some(self.conn_peer) {
            self.peer_lost_published = Some(self.conn_peer);
            self.shared.events.publish(Event::PeerLost {
                reason: why.to_string(),
            });
        }
    }

    fn drop_connection(&mut self, why: &str) {
        self.catch_up = None;
        if let Some(c) = self.conn.take() {
            tracing::warn!(peer = %c.peer(), reason = why, "connection lost");
            self.publish_peer_lost(why);
        }
        self.exec.core.on_disconnected(self.conn_peer);
    }

    /// A new id for the connection just made current: the core and this poller name every
    /// connection apart, so nothing meant for an old one reaches a new one.
    pub(super) fn next_peer(&mut self) -> PeerId {
        self.conn_peer = PeerId(self.conn_peer.0 + 1);
        self.conn_peer
    }

    /// Whether `peer` is the current connection (what is for another one is dropped).
    pub(super) fn is_current(&self, peer: PeerId) -> bool {
        self.conn.is_some() && self.conn_peer == peer
    }

    fn take_submissions(&mut self) -> Result<bool, Stop> {
        if self.stash.is_none() && self.consumer.as_ref().is_none_or(|c| c.is_empty()) {
            return Ok(false);
        }
        if self.exec.core.role() != WireRole::Primary {
            // Submitted while the node stopped being a primary (the submitter checked the
            // role just before it changed). The change's own actions first: a fence among
            // them says why these fail.
            self.execute_actions()?;
            self.refuse_ring(self.shared.fenced());
            return Ok(true);
        }
        let mut worked = false;
        for _ in 0..SUBMIT_BATCH {
            if !self.exec.core.accepts_submissions() {
                break;
            }
            // New writes follow a catch-up in progress, and wait while the peer lags.
            if self.catch_up.is_some()
                || self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.pending_send_bytes() > SEND_BACKLOG_PAUSE)
            {
                break;
            }
            let popped = match self.stash.take() {
                Some(s) => Some(s),
                None => self.consumer.as_mut().and_then(|c| c.try_pop()),
            };
            let Some((position, sub)) = popped else {
                break;
            };
            if !self.exec.queue.admits_new_write(sub.data.len()) && self.exec.core.fold() {
                // The backup is away and the queue full: its records go into the dirty-chunk
                // bitmap, and writes go on.
                self.execute_actions()?;
            }
            if !self.exec.queue.admits_new_write(sub.data.len()) {
                // Backpressure until the backup confirms applying and we can trim.
                self.stash = Some((position, sub));
                break;
            }
            let ticket = position + 1;
            debug_assert_eq!(ticket, self.submitted + 1, "tickets out of order");
            self.submitted = ticket;
            // Validated in `submit`; a failure here would be a bug, which stops the node.
            self.exec
                .core
                .submit(ticket, sub.offset, sub.data)
                .map_err(|e| Stop::Fatal(format!("submission refused by the core: {e}")))?;
            stamps::at(Point::Submitted);
            worked = true;
            // Execute as we go so that queue space is accounted for the next submission. The
            // last write waiting leaves before our own append of it (the append, a copy of the
            // payload, then overlaps the trip instead of preceding it); earlier ones gather in
            // the send batch and leave with it.
            self.send_before_own_append =
                self.stash.is_none() && self.consumer.as_ref().is_none_or(|c| c.is_empty());
            let executed = self.execute_actions_in_run();
            self.send_before_own_append = false;
            executed?;
        }
        self.end_of_actions()?;
        Ok(worked)
    }

    fn publish_stats(&mut self) {
        let core = self.exec.core.stats();
        if core.recoveries != self.recoveries_seen {
            self.recoveries_seen = core.recoveries;
            let c = &self.shared.counters;
            // Relaxed: counts for the metrics, published by nothing else.
            c.recovered_records
                .fetch_add(self.exec.recovery().records, Ordering::Relaxed);
            c.recovered_bytes
                .fetch_add(self.exec.recovery().bytes, Ordering::Relaxed);
            tracing::info!(
                records = self.exec.recovery().records,
                bytes = self.exec.recovery().bytes,
                "recovery complete: moved only the missed requests"
            );
        }
        let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        // What changed since the last publication, as events (in the order a reader expects).
        let phase = self.exec.core.phase();
        if core.degraded && !s.degraded {
            self.shared.events.publish(Event::Degraded);
        }
        if phase == mirror_proto::Phase::Synchronous && s.phase != phase {
            self.split_brain_reported = false;
            self.folding = false;
            self.shared.events.publish(Event::Synchronous);
        }
        if let (Some(sb), None) = (&core.split_brain, &s.split_brain) {
            self.split_brain_reported = true;
            self.shared.events.publish(Event::SplitBrain {
                description: sb.clone(),
                discarded: None,
            });
        }
        s.role = match self.exec.core.role() {
            WireRole::Primary => crate::config::Role::Primary,
            WireRole::Backup => crate::config::Role::Backup,
        };
        s.peer_node_id = self.exec.queue.peer_node_id();
        s.phase = self.exec.core.phase();
        s.next_seq = core.next_seq;
        if s.applied_through != core.applied_through {
            // Read here, not per pass: only a pass that applied pays for the clock.
            s.applied_at = Some(Instant::now());
        }
        s.applied_through = core.applied_through;
        s.acked_through = core.acked_through;
        s.peer_applied_through = core.peer_applied_through;
        s.queue_records = self.exec.queue.len_records();
        s.queue_bytes = self.exec.queue.used_bytes();
        s.in_flight = core.in_flight;
        s.degraded = core.degraded;
        self.published_degraded = core.degraded;
        self.published_next_seq = core.next_seq;
        if s.recoveries != core.recoveries {
            s.last_recovery_at = Some(self.last_step_at);
        }
        s.recoveries = core.recoveries;
        s.last_recovery_bytes = self.exec.recovery().bytes;
        s.last_recovery_records = self.exec.recovery().records;
        s.current_term = core.current_term;
        s.split_brain.clone_from(&core.split_brain);
        s.dirty_chunks = core.dirty_chunks;
        s.chunk_size = core.chunk_size;
        s.resync_target = core.resync_target;
        if core.transfer.is_some() && !self.transfer_published {
            drop(s);
            self.publish_transfer_start();
            s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        } else if let Some(t) = &core.transfer {
            let due = self
                .transfer_progress_at
                .is_none_or(|at| self.last_step_at.duration_since(at) >= TRANSFER_PROGRESS_EVERY);
            if due {
                self.transfer_progress_at = Some(self.last_step_at);
                self.shared.events.publish(Event::TransferProgress {
                    kind: t.purpose.name(),
                    chunks_total: t.chunks_total,
                    chunks_done: t.chunks_done,
                    bytes_left: t.bytes_left,
                });
            }
        }
        let now_us = self.last_step_at.duration_since(self.start).as_micros() as u64;
        s.transfer = core.transfer.map(|t| TransferStats::of(&t, now_us));
        // Formatted only when the connection changes (this runs after every working pass).
        let connection = self.conn.as_ref().map(|_| self.conn_peer);
        if connection != self.published_connection {
            self.published_connection = connection;
            s.peer_address = self.conn.as_ref().map(|c| c.peer().to_string());
        }
        s.last_divergence.clone_from(&self.last_divergence);
    }

    /// How long a parked poller may sleep: until its next reconnect attempt when it is a
    /// primary without its backup, else [`PARK_MAX`] (its other timers: acks, heartbeats,
    /// stats). Sleeping the whole 5 ms past a 2 ms `reconnect_interval_ms` made every recovery
    /// start up to 5 ms late (most of a 1 % catch-up of a 1 GiB region in `mirror bench`).
    fn park_timeout(&self) -> Duration {
        let reconnects = self.exec.core.role() == WireRole::Primary
            && self.cfg.peer.is_some()
            && self.conn.is_none()
            && self.connecting.is_none()
            && self.exec.core.phase() == Phase::Disconnected;
        if !reconnects {
            return PARK_MAX;
        }
        let now_us = self.last_step_at.duration_since(self.start).as_micros() as u64;
        PARK_MAX.min(Duration::from_micros(
            self.next_connect_at_us.saturating_sub(now_us),
        ))
    }

    /// Prepares to sleep: announces it to submitters and returns the descriptors to sleep on and
    /// for how long at most, or `None` when there is work after all.
    fn prepare_park(&mut self) -> Option<(Vec<libc::pollfd>, Duration)> {
        self.shared.doorbell.announce_park();
        let has_submissions = self.stash.is_none()
            && self
                .consumer
                .as_ref()
                .is_some_and(|c| !c.is_empty() && self.exec.core.accepts_submissions());
        // A catch-up waits for the peer to drain the send buffer: wake when it has room. Over
        // RDMA room shows up in memory (credits), not on a descriptor: poll again instead.
        let catch_up_ready = match (&self.catch_up, &self.conn) {
            (Some(_), Some(c)) => c.send_ready_fd().map(Some),
            _ => Some(None),
        };
        let timeout = self.park_timeout();
        // A caller that started driving after the loop's last look either sees the park and
        // rings (after its first step), or is seen here: then stand by instead of parking on
        // the connection.
        let callers_drive = self.shared.doorbell.callers_driving();
        if has_submissions
            || callers_drive
            || self.shared.shutdown.load(Ordering::Acquire)
            || catch_up_ready.is_none()
            || timeout.is_zero()
        {
            self.shared.doorbell.end_park();
            return None;
        }
        let mut fds = Vec::with_capacity(3 + self.pending.len());
        let mut watch = |fd: i32| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        watch(self.shared.wake_fd.as_raw_fd());
        if let Some(c) = &self.conn {
            watch(c.wait_fd());
        }
        if let Some(a) = &self.acceptor {
            watch(a.wait_fd());
        }
        for (c, _) in &self.pending {
            watch(c.wait_fd());
        }
        if let Some((fd, events)) = catch_up_ready.flatten() {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
        }
        if let Some((fd, events)) = self.connecting.as_ref().and_then(|(c, _)| c.wait_fd()) {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
        }
        Some((fds, timeout))
    }
}

/// How long the polling thread first stands by while callers drive the loop: what a caller
/// that returned left to do (acks and submissions nobody waits for, a checkpoint) waits at most
/// this long. Each look is a third thread woken onto the driving caller's CPUs: at two
/// milliseconds a synchronous writer (10-15 µs a write) meets one in 130-200 writes.
const STANDBY_MAX: Duration = Duration::from_millis(2);

/// The standby after one that callers drove through with no [`Mirror::submit`] meanwhile
/// (a synchronous writer's): looks every 2 ms put about one write in 150 of it behind a
/// context switch, one in its p99. A submission rings it; what else a caller that stopped
/// driving left (acks and heartbeats nobody else drives) waits at most this long, and at most
/// an eighth of `ack_timeout` so that heartbeats keep their pace. Submissions (pipelined
/// writers) keep the standby short, and a short one is not rung for them: ringing long
/// standbys for every submission, without keeping the standby short for them, cost pipelined
/// writes at depth 1 and 8 about a tenth.
///
/// [`Mirror::submit`]: crate::Mirror::submit
const STANDBY_LONG: Duration = Duration::from_millis(8);

/// The longest a parked poller sleeps: it wakes at least this often for its timers (ack
/// timeouts, heartbeats, stats; reconnects sooner, see `Poller::park_timeout`).
const PARK_MAX: Duration = Duration::from_millis(5);

/// What one [`Poller::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Something happened.
    Worked,
    /// Nothing happened, within the idle spin.
    Spinning,
    /// Nothing happened for longer than the idle spin: time to sleep.
    Idle,
    /// The node failed.
    Stopped,
}

/// Sleeps in ppoll(2) on `fds` (the first is the wake eventfd) for at most `timeout`, then
/// clears the wake-up (if there was one: a read that finds nothing is a system call for
/// nothing, on every sleep). A ring that lands after poll returned stays readable and ends the
/// next sleep at once. Returns whether it was rung. The caller lowers its doorbell flag after.
fn sleep_on(shared: &Shared, fds: &mut [libc::pollfd], timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs and `ts` a valid timespec,
    // both alive for the duration of the call; a null signal mask leaves the mask unchanged.
    let ready = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    let rung = ready > 0 && fds[0].revents != 0;
    if rung {
        shared.wake_fd.drain();
    }
    rung
}

pub(super) fn lock_poller(driver: &Mutex<Poller>) -> std::sync::MutexGuard<'_, Poller> {
    // A panic inside a step marks the node failed before unwinding; the state is not used again
    // for anything but shutdown.
    driver.lock().unwrap_or_else(|e| e.into_inner())
}

/// The polling thread: runs steps while no caller drives the loop itself, sleeps when idle.
pub(super) fn poller_thread(driver: Arc<Mutex<Poller>>, shared: Arc<Shared>) {
    let long = (lock_poller(&driver).cfg.ack_timeout / 8).clamp(STANDBY_MAX, STANDBY_LONG);
    let mut standby = STANDBY_MAX;
    let doorbell = &shared.doorbell;
    let mut submissions_seen = doorbell.unwaited_submissions();
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            lock_poller(&driver).shutdown();
            return;
        }
        if doorbell.callers_driving() {
            // A waiting caller runs the loop (run to completion): stay off its CPU until a
            // caller gives up driving (it rings: `Shared::wake_poller_now`), or `STANDBY_MAX`
            // passes (what a caller whose write completed left to do: acks of writes nobody
            // waits for, submissions nobody waits for, a checkpoint). Looking
            // every millisecond instead woke a third thread onto the two busy CPUs of a
            // synchronous writer each time: 1 % of its writes took 30-35 µs rather than 10-15
            // (docs/PERFORMANCE.md). The standby is longer once callers drove through one
            // with nothing submitted meanwhile (`STANDBY_LONG`); a ring or a submission makes
            // it short again.
            let mut fds = [libc::pollfd {
                fd: shared.wake_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let seen_before = submissions_seen;
            match doorbell.announce_standby(standby > STANDBY_MAX, &mut submissions_seen) {
                Standby::Sleep { long: stands } => {
                    if !stands {
                        // Submitted since the length was chosen, perhaps without ringing.
                        standby = STANDBY_MAX;
                    }
                    let rung = sleep_on(&shared, &mut fds, standby);
                    let submissions = doorbell.unwaited_submissions();
                    standby = if rung || submissions != submissions_seen {
                        STANDBY_MAX
                    } else if doorbell.callers_driving() {
                        long
                    } else {
                        standby
                    };
                    submissions_seen = submissions;
                }
                // Nobody drives any more; a submission seen still makes the next one short.
                Standby::Skip if submissions_seen != seen_before => standby = STANDBY_MAX,
                Standby::Skip => {}
            }
            doorbell.end_standby();
            continue;
        }
        let mut p = lock_poller(&driver);
        let park = loop {
            if shared.shutdown.load(Ordering::Acquire) || doorbell.callers_driving() {
                break None;
            }
            match p.step() {
                Step::Stopped => return,
                Step::Idle => {
                    if let Some(fds) = p.prepare_park() {
                        break Some(fds);
                    }
                }
                // Work no caller drove (acks or submissions nobody waits for): the next
                // standby starts short again.
                Step::Worked => standby = STANDBY_MAX,
                Step::Spinning => {}
            }
        };
        drop(p);
        if let Some((mut fds, timeout)) = park {
            sleep_on(&shared, &mut fds, timeout);
            doorbell.end_park();
        }
    }
}
