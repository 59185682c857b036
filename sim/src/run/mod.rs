//! One simulated run: the fault phase, the liveness phase and the checkers.
//!
//! Split by job: this file holds the step loop, submissions and the execution of each node's
//! actions; `faults.rs` the faults, crashes and restarts; `connect.rs` the connections (a
//! primary dials, any node accepts, the first Hello goes through `admit`); `roles.rs` the role
//! events and the simulated operator; `checks.rs` the checkers of data and durability,
//! `fencing.rs` and `split_brain.rs` those of failover.

mod checks;
mod connect;
mod faults;
mod fencing;
mod roles;
mod split_brain;

use std::fmt;
use std::path::Path;

use mirror_proto::{CoreConfig, FatalError, Message, PeerFault, Phase, SplitBrainPolicy, WireRole};

use crate::client::{payload, Client, Pending, Write};
use crate::net::{frame, NodeName};
use crate::node::{Canaries, Effect, Executed, SimNode};
use crate::report::{streams, Checker, SimFailure, SimOptions, SimReport, Swarm};
use crate::{MAX_WRITE, QUEUE_BYTES, REGION_BYTES, STEP_US};

use connect::Network;
use fencing::Watch;
use roles::RolePlan;
use split_brain::BatchSeen;

struct Sim<'o> {
    seed: u64,
    opts: &'o SimOptions,
    swarm: Swarm,
    /// The fault stream: every draw the fixed-role campaign made, in the same order.
    rng: fastrand::Rng,
    /// The failover stream: role events and the operator's choices.
    role_rng: fastrand::Rng,
    step: u64,
    /// The nodes' ids.
    ids: [u64; 2],
    /// Both nodes' `after_split_brain` (configured the same on both).
    split_brain_policy: SplitBrainPolicy,
    /// The running nodes (None while crashed).
    nodes: [Option<SimNode>; 2],
    /// A crashed node, already recovered from its files, waiting to come back.
    restarting: [Option<SimNode>; 2],
    /// Step at which a crashed node comes back.
    down_until: [u64; 2],
    /// A node that will die in the middle of its next non-empty execution of actions (or of
    /// its next checkpoint).
    armed: [bool; 2],
    net: Network,
    faults: bool,
    client: Client,
    report: SimReport,
    /// The converged state checker 8 last compared (see `check_no_silent_divergence`).
    divergence_checked: Option<[u64; 5]>,
    roles: RolePlan,
    /// What the failover checkers remember.
    watch: Watch,
}

/// How a node goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// A fault: a process crash or a power loss, drawn.
    Crash,
    /// Its core stopped it (fenced under `on_fenced = stop`): the process exits, and the
    /// operator starts it again in the role its queue says (a superseded primary: a backup).
    Stopped,
    /// The operator restarts it (the process exits cleanly and starts again in its role).
    Restarted,
}

impl<'o> Sim<'o> {
    fn fail(&self, checker: Checker, message: impl Into<String>) -> SimFailure {
        SimFailure {
            seed: self.seed,
            step: self.step,
            checker,
            message: message.into(),
        }
    }

    fn trace(&mut self, what: impl fmt::Display) {
        let line = format!("{} {what}", self.step);
        for b in line.bytes() {
            self.report.trace_hash =
                (self.report.trace_hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        if self.opts.trace {
            eprintln!("[sim {:>6}] {what}", self.step);
        }
    }

    fn now_us(&self) -> u64 {
        self.step * STEP_US
    }

    fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.rng.u32(0..1_000_000) < ppm
    }

    fn node(&self, r: NodeName) -> Option<&SimNode> {
        self.nodes[r.index()].as_ref()
    }

    fn node_mut(&mut self, r: NodeName) -> Option<&mut SimNode> {
        self.nodes[r.index()].as_mut()
    }

    /// A node's files and log whether it is up or waiting to restart.
    fn node_or_restarting(&self, r: NodeName) -> Option<&SimNode> {
        self.nodes[r.index()]
            .as_ref()
            .or(self.restarting[r.index()].as_ref())
    }

    /// The core's role of an up node.
    fn role_of(&self, r: NodeName) -> Option<WireRole> {
        self.node(r).map(SimNode::role)
    }

    /// Executes `r`'s pending actions and what they ask of the simulation. An armed node dies
    /// part way through: after an append and before its sync, after the ack arrived and before
    /// the apply, after the apply and before the completion... Returns whether it is still up.
    fn execute(&mut self, r: NodeName) -> Result<bool, SimFailure> {
        self.execute_or_defer_crash(r, false)
    }

    /// `execute`, where an armed crash may wait for a later batch (`defer`). In a submission's
    /// own batch the core sends the write before the primary's own append of it, the order the
    /// real node hands them to the network and the queue in, so a crash there may fall between
    /// the two (the backup holds a record the primary's queue lacks); deferred, it may land in
    /// the pass's closing batch, after the sends and before the primary's own sync (a power cut
    /// while the sync overlaps the round trip).
    fn execute_or_defer_crash(&mut self, r: NodeName, defer: bool) -> Result<bool, SimFailure> {
        let crash = if self.armed[r.index()] && !defer {
            Some(&mut self.rng)
        } else {
            None
        };
        let Some(node) = self.nodes[r.index()].as_mut() else {
            return Ok(false);
        };
        let Executed { effects, cut } = match node.execute(crash) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(Checker::NodeStopped, e)),
        };
        let mut seen = std::mem::take(&mut self.watch.batch[r.index()]);
        // What ran before the crash happened: its frames left, its completions were seen.
        self.handle_effects(r, effects, &mut seen)?;
        if let Some((n, of)) = cut {
            self.trace(format_args!("{r} dies after {n} of {of} actions"));
            self.report.mid_action_crashes += 1;
            self.crash(r, Down::Crash)?;
            return Ok(false);
        }
        // A whole batch ran: the split-brain checker judges what the node did with a Hello.
        self.judge_batch(r, &seen)?;
        if seen.stopped_fenced {
            self.crash(r, Down::Stopped)?;
            return Ok(false);
        }
        Ok(self.nodes[r.index()].is_some())
    }

    fn handle_effects(
        &mut self,
        r: NodeName,
        effects: Vec<Effect>,
        seen: &mut BatchSeen,
    ) -> Result<(), SimFailure> {
        for e in effects {
            // What the core decided is judged even when the connection it is for ended first
            // (the peer's close arrived in the same batch).
            self.observe(r, &e, seen);
            match e {
                Effect::Send { to, .. }
                | Effect::SendQueued { to, .. }
                | Effect::Close { to, .. }
                    if !self.net.is_current(r, to) =>
                {
                    // For a connection that is gone.
                }
                Effect::Send {
                    msg, durable, role, ..
                } => {
                    if let (
                        WireRole::Backup,
                        Message::Ack {
                            received_through, ..
                        },
                    ) = (role, &msg)
                    {
                        self.check_ack_durable(*received_through, durable)?;
                    }
                    self.send(r, &msg);
                }
                Effect::SendQueued {
                    from_seq,
                    through_seq,
                    writes,
                    ..
                } => self.send_catch_up(r, (from_seq, through_seq), &writes)?,
                Effect::Close { to, fault } => self.close_current(r, to, fault.as_ref()),
                Effect::Complete(ticket) => self.complete_through(r, ticket)?,
                Effect::Apply {
                    seq,
                    term,
                    as_primary,
                } => {
                    if as_primary {
                        self.check_apply_as_primary(r, seq, term)?;
                        self.check_backup_holds(r, seq, term)?;
                    }
                }
                Effect::Discard {
                    after,
                    through,
                    records,
                } => {
                    self.check_discard(r, (after, through), &records, seen.answered)?;
                    seen.discarded = true;
                }
                Effect::Truncated { after } => self.watch.truncated(r, after),
                Effect::Adopted { through } => self.adopt_peer_log(r, through)?,
                Effect::Resynced { bytes } => {
                    self.report.resyncs += 1;
                    self.report.resync_bytes += bytes;
                }
                Effect::TermPersisted(term) => self.watch.saw_term(r, term),
                Effect::RoleChanged {
                    role,
                    superseded,
                    new_term,
                } => self.role_changed(r, role, superseded, new_term)?,
                Effect::RefuseWrites(why) => {
                    seen.refused = Some(why);
                    self.refuse_writes(r, why)?;
                }
                Effect::Fatal(FatalError::Fenced(fence)) => {
                    self.trace(format_args!("{r} stops: {fence}"));
                    seen.stopped_fenced = true;
                }
                Effect::Fatal(why) => {
                    return Err(self.fail(Checker::NodeStopped, format!("{r}: {why}")));
                }
            }
        }
        Ok(())
    }

    /// What the split-brain checker notes of one effect of `r`'s batch: a backup's answer to a
    /// Hello (the handshake is judged from the two Hellos), split-brain rejects and closes.
    fn observe(&mut self, r: NodeName, e: &Effect, seen: &mut BatchSeen) {
        match e {
            Effect::Send {
                to,
                msg: Message::Hello(h),
                role: WireRole::Backup,
                ..
            } => {
                self.judge_handshake(r, *to, h);
                seen.answered = Some(to.0);
            }
            Effect::Send {
                msg:
                    Message::Reject {
                        code: mirror_proto::RejectCode::SplitBrain,
                        ..
                    },
                ..
            } => seen.rejected_split_brain = true,
            Effect::Close {
                fault: Some(PeerFault::SplitBrain(_)),
                ..
            } => seen.closed_split_brain = true,
            _ => {}
        }
    }

    /// `r` streams a catch-up of its records `from..=through` (checker 4 first).
    fn send_catch_up(
        &mut self,
        r: NodeName,
        (from_seq, through_seq): (u64, u64),
        writes: &[Message],
    ) -> Result<(), SimFailure> {
        self.check_catch_up(r, from_seq, through_seq)?;
        self.trace(format_args!("{r} catch-up {from_seq}..={through_seq}"));
        for m in writes {
            if let Message::Write { data, .. } = m {
                self.report.recovery_records += 1;
                self.report.recovery_bytes += data.len() as u64;
            }
            self.send(r, m);
        }
        Ok(())
    }

    /// `r` completed every ticket through `ticket`.
    /// `r` adopted its primary's log through `through` (a resync's end): its model log holds
    /// the primary's terms there, as its region holds the primary's writes.
    fn adopt_peer_log(&mut self, r: NodeName, through: u64) -> Result<(), SimFailure> {
        let peer_log = match self.node_or_restarting(r.other()) {
            Some(peer) if peer.log.len() as u64 >= through => peer.log[..through as usize].to_vec(),
            _ => {
                return Err(self.fail(
                    Checker::NodeStopped,
                    format!("{r} adopted a log through seq {through} that its peer does not hold"),
                ))
            }
        };
        let node = self.nodes[r.index()].as_mut().expect("it executed");
        node.log[..through as usize].copy_from_slice(&peer_log);
        Ok(())
    }

    fn complete_through(&mut self, r: NodeName, ticket: u64) -> Result<(), SimFailure> {
        let done: Vec<u64> = self.client.pending[r.index()]
            .range(..=ticket)
            .map(|(t, _)| *t)
            .collect();
        for t in done {
            let p = self.client.pending[r.index()].remove(&t).expect("listed");
            self.complete(r, p)?;
        }
        Ok(())
    }

    /// The client saw write `p` complete at node `r`.
    fn complete(&mut self, r: NodeName, p: Pending) -> Result<(), SimFailure> {
        self.check_completion(r, p)?;
        self.client.completed.insert(
            (p.seq, p.term),
            crate::client::Completion { id: p.id, node: r },
        );
        self.report.completed_writes += 1;
        Ok(())
    }

    fn send(&mut self, from: NodeName, m: &Message) {
        let delay = if self.faults {
            self.rng.u64(0..=self.swarm.delay_max_steps)
        } else {
            self.rng.u64(0..=2)
        };
        let at = self.step + 1 + delay;
        let mangle = self.faults && self.chance(self.swarm.mangle_ppm);
        let dup = self.rng.bool();
        let Some(id) = self.net.current[from.index()] else {
            return;
        };
        self.send_on(id, from, m, at, mangle.then_some(dup));
    }

    /// Puts `m` on connection `id` from `from`, arriving at `at`; `mangle` duplicates (true) or
    /// swaps (false) frames in flight toward the peer.
    fn send_on(&mut self, id: u64, from: NodeName, m: &Message, at: u64, mangle: Option<bool>) {
        let Some(link) = self.net.link_mut(id) else {
            return;
        };
        link.conn.send(from, frame(m), at);
        if let Some(dup) = mangle {
            if link.conn.mangle(from.other(), dup) {
                self.report.mangled += 1;
                self.trace(format_args!(
                    "transport {} frames toward {}",
                    if dup { "duplicates" } else { "swaps" },
                    from.other()
                ));
            }
        }
    }

    /// The client submits to every primary that takes writes, with the real node's queue
    /// headroom (in the fault phase but its idle tail; in the liveness phase it only waits for
    /// what it submitted). Each submission's actions run before the next, as in the real node,
    /// so that queue space is accounted for.
    fn submit(&mut self) -> Result<(), SimFailure> {
        let idle_tail = self.swarm.idle_tail_steps.min(self.opts.fault_steps / 2);
        if !self.faults || self.step + idle_tail >= self.opts.fault_steps {
            return Ok(());
        }
        for r in NodeName::BOTH {
            self.submit_to(r)?;
        }
        Ok(())
    }

    fn submit_to(&mut self, r: NodeName) -> Result<(), SimFailure> {
        let now = self.now_us();
        if let Some(p) = self.node_mut(r) {
            p.exec.core.set_now(now);
        }
        if let Some(term) = self.client.canary_believed_term[r.index()] {
            return self.canary_submit_to_fenced(r, term);
        }
        while self.client.pending[r.index()].len() < self.swarm.depth {
            let Some(p) = self.nodes[r.index()].as_mut() else {
                return Ok(());
            };
            if !p.exec.core.accepts_submissions() {
                break;
            }
            let len = self.rng.usize(1..=MAX_WRITE);
            if !p.exec.queue.admits_new_write(len) {
                // The real node's rule (src/node/poller/mod.rs): a full queue folds into the
                // bitmap when the backup is away, and the write goes on.
                if self.swarm.fold_when_full && p.exec.core.fold() {
                    self.report.folds += 1;
                    self.execute_or_defer_crash(r, false)?;
                    continue;
                }
                break;
            }
            let offset = self.rng.u64(0..=REGION_BYTES - len as u64);
            let id = self.client.writes.len();
            let data = payload(id, len);
            self.client.writes.push(Write {
                offset,
                data: data.clone(),
            });
            let ticket = self.client.next_ticket[r.index()];
            let synchronous = p.exec.core.phase() == Phase::Synchronous;
            let term = p.exec.core.stats().current_term;
            let seq = match p.exec.core.submit(ticket, offset, data.into()) {
                Ok(seq) => seq,
                Err(e) => {
                    return Err(self.fail(
                        Checker::NodeStopped,
                        format!("{r}: submission refused: {e}"),
                    ))
                }
            };
            self.client.next_ticket[r.index()] += 1;
            self.check_seq_reuse(r, seq, term, id)?;
            self.client.assigned.insert((seq, term), id);
            self.client.pending[r.index()].insert(ticket, Pending { seq, term, id });
            if synchronous {
                self.client.degraded.remove(&(seq, term));
            } else {
                self.client.degraded.insert((seq, term));
            }
            let defer = self.rng.bool();
            self.execute_or_defer_crash(r, defer)?;
        }
        Ok(())
    }

    /// The fencing canary's broken driver feeds a write to `r`, which it still takes for the
    /// primary of `term`: the core refuses it (the node was fenced), and the driver reports it
    /// complete all the same.
    fn canary_submit_to_fenced(&mut self, r: NodeName, term: u64) -> Result<(), SimFailure> {
        let Some(node) = self.nodes[r.index()].as_mut() else {
            return Ok(());
        };
        let id = self.client.writes.len();
        let data = payload(id, 1);
        self.client.writes.push(Write {
            offset: 0,
            data: data.clone(),
        });
        let ticket = self.client.next_ticket[r.index()];
        let refused = node.exec.core.submit(ticket, 0, data.into()).is_err();
        self.client.next_ticket[r.index()] += 1;
        if refused {
            // No seq: the write never reached a log; only checker 10 can judge it.
            self.report.canary_fenced_completions += 1;
            self.check_completion(r, Pending { seq: 0, term, id })?;
        }
        Ok(())
    }

    /// One step of one node: its connections' inputs, the core, its actions, a checkpoint
    /// when due.
    fn run_node(&mut self, r: NodeName) -> Result<bool, SimFailure> {
        if self.nodes[r.index()].is_none() {
            return Ok(false);
        }
        let now = self.now_us();
        let batched_writes = self.swarm.batched_writes;
        if let Some(node) = self.node_mut(r) {
            node.exec.core.set_now(now);
            if batched_writes {
                // Set on every step: it covers a node that restarted since.
                node.exec.queue.stage_appends_in_every_mode();
                node.exec.region.gathers = true;
            }
        }
        self.watch
            .between_batches(r, self.nodes[r.index()].as_ref());
        let worked = self.take_inputs(r)?;
        let node = self.nodes[r.index()].as_mut().expect("checked");
        if !worked {
            node.exec.core.on_tick();
        }
        node.exec.core.end_batch();
        // A power cut while the node syncs records it has already sent (the sync overlaps the
        // round trip): rare for a crash drawn per step, as the window is one batch wide, so
        // this batch draws its own, twenty times as likely. Seeds without crashes stay so.
        let sends_unsynced = node.exec.durable().last_seq < node.exec.queue.last_seq();
        if sends_unsynced && self.chance(self.swarm.crash_ppm.saturating_mul(20)) {
            self.armed[r.index()] = true;
            self.trace(format_args!("{r} will die during its sync"));
        }
        if !self.execute(r)? {
            return Ok(worked);
        }
        // Checkpoint by the real node's rule (the shared executor's).
        let now = self.now_us();
        let node = self.nodes[r.index()].as_mut().expect("still up");
        node.exec.checkpoint_pacing = self.swarm.checkpoint_pacing;
        let due = node.exec.checkpoint_due(now, !worked);
        if due {
            // An armed node may die inside the checkpoint instead of in its next batch.
            let die_after = (self.armed[r.index()] && self.rng.bool()).then(|| self.rng.u8(0..2));
            let node = self.nodes[r.index()].as_mut().expect("still up");
            match node.checkpoint(now, die_after) {
                Ok(true) => {
                    self.execute(r)?;
                }
                Ok(false) => {
                    self.trace(format_args!("{r} dies in a checkpoint ({die_after:?})"));
                    self.report.mid_action_crashes += 1;
                    self.crash(r, Down::Crash)?;
                }
                Err(e) => return Err(self.fail(Checker::NodeStopped, format!("{r}: {e}"))),
            }
        }
        Ok(worked)
    }

    fn step_once(&mut self) -> Result<(), SimFailure> {
        if self.faults {
            self.inject_faults()?;
            self.role_events()?;
        }
        self.operator()?;
        self.restart_due()?;
        self.manage_connections();
        self.submit()?;
        // The order in which the two nodes run varies, as two machines' would.
        let first = if self.rng.bool() {
            NodeName::A
        } else {
            NodeName::B
        };
        self.run_node(first)?;
        self.run_node(first.other())?;
        self.check_no_silent_divergence()?;
        self.step += 1;
        Ok(())
    }

    /// The primary and the backup, when the pair has exactly one of each up.
    fn pair(&self) -> Option<(&SimNode, &SimNode)> {
        let (Some(a), Some(b)) = (self.node(NodeName::A), self.node(NodeName::B)) else {
            return None;
        };
        match (a.role(), b.role()) {
            (WireRole::Primary, WireRole::Backup) => Some((a, b)),
            (WireRole::Backup, WireRole::Primary) => Some((b, a)),
            _ => None,
        }
    }

    /// Whether the pair has converged: both up, one primary synchronous with the other as its
    /// backup, every submission answered, everything applied, checkpointed and trimmed on both
    /// sides.
    fn converged(&self) -> bool {
        let Some((p, b)) = self.pair() else {
            return false;
        };
        let (ps, bs) = (p.exec.core.stats(), b.exec.core.stats());
        let last = ps.next_seq - 1;
        p.exec.core.phase() == Phase::Synchronous
            && self.client.pending.iter().all(|p| p.is_empty())
            && ps.applied_through == last
            && bs.applied_through == last
            && bs.next_seq == ps.next_seq
            && p.exec.queue.len_records() == 0
            && b.exec.queue.len_records() == 0
    }
}

/// The configuration of node `name`'s core: the real node's in `power`/`pmem` mode.
fn core_config(swarm: &Swarm, id: u64, split_brain: SplitBrainPolicy) -> CoreConfig {
    CoreConfig {
        node_id: id,
        region_size: REGION_BYTES,
        queue_format_version: mirror_storage::FORMAT_VERSION,
        on_peer_loss: swarm.policy,
        on_fenced: swarm.failover.on_fenced,
        after_split_brain: split_brain,
        ack_timeout_us: 2_000,
        handshake_timeout_us: 4_000,
        // The simulated crash is a power loss: the `power`/`pmem` configuration.
        sync_queue_before_ack: true,
        max_write_len: MAX_WRITE,
        queue_capacity: QUEUE_BYTES,
        deferred_commit: true,
        chunk_size: mirror_proto::MIN_CHUNK_SIZE,
        resync_rate: 0,
        initial_sync: false,
    }
}

/// The nodes' ids: the fault stream's draws, with B's redrawn (from the failover stream) in
/// the rare seed where both share a term tag. The core's docs say such a pair is refused at the
/// handshake, but nothing refuses it yet (reported); two nodes starting the same term is what
/// the fencing checker would then see.
fn draw_ids(rng: &mut fastrand::Rng, role_rng: &mut fastrand::Rng) -> [u64; 2] {
    let a = rng.u64(1..u64::MAX);
    let mut b = rng.u64(1..u64::MAX);
    while mirror_proto::term_tag(a) == mirror_proto::term_tag(b) {
        b = role_rng.u64(1..u64::MAX);
    }
    [a, b]
}

/// Node A, a primary, and node B, its backup, with fresh queues in `dir`.
fn create_nodes(
    dir: &Path,
    opts: &SimOptions,
    swarm: &Swarm,
    ids: [u64; 2],
    split_brain: SplitBrainPolicy,
) -> Result<[Option<SimNode>; 2], String> {
    let canaries = Canaries {
        apply_before_ack: opts.canary_apply_before_ack,
        seq_only_matching: opts.canary_seq_only_matching,
    };
    let mut nodes = [None, None];
    for (name, role) in [
        (NodeName::A, WireRole::Primary),
        (NodeName::B, WireRole::Backup),
    ] {
        let cfg = core_config(swarm, ids[name.index()], split_brain);
        nodes[name.index()] = Some(SimNode::create(dir, name, role, cfg, canaries)?);
    }
    Ok(nodes)
}

/// Runs one seed in `dir` (which must be empty; the nodes' queue files go there).
pub fn run_seed(seed: u64, opts: &SimOptions, dir: &Path) -> Result<SimReport, SimFailure> {
    let (mut rng, mut role_rng) = streams(seed);
    let swarm = Swarm::draw(&mut rng, &mut role_rng).with_own_streams(seed);
    let setup = |e: String| SimFailure {
        seed,
        step: 0,
        checker: Checker::NodeStopped,
        message: format!("setting up: {e}"),
    };
    let ids = draw_ids(&mut rng, &mut role_rng);
    let split_brain_policy = swarm.failover.after_split_brain.policy(ids);
    let nodes = create_nodes(dir, opts, &swarm, ids, split_brain_policy).map_err(setup)?;
    let mut sim = Sim {
        seed,
        opts,
        swarm,
        rng,
        role_rng,
        step: 0,
        ids,
        split_brain_policy,
        nodes,
        restarting: [None, None],
        down_until: [0, 0],
        armed: [false, false],
        net: Network::default(),
        divergence_checked: None,
        faults: true,
        client: Client::new(),
        report: SimReport {
            seed,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            folds: 0,
            resyncs: 0,
            resync_bytes: 0,
            ..SimReport::default()
        },
        roles: RolePlan::default(),
        watch: Watch::default(),
    };
    let swarm_line = format!("swarm {:?}, ids {:#x} {:#x}", sim.swarm, ids[0], ids[1]);
    sim.trace(swarm_line);
    for r in NodeName::BOTH {
        sim.came_up(r)?;
    }
    while sim.step < opts.fault_steps {
        sim.step_once()?;
    }
    // Liveness: faults stop, crashed nodes come back, the network heals; the operator still
    // resolves split brains and promotes a backup when there is no primary.
    sim.faults = false;
    sim.net.partitioned_until = 0;
    sim.down_until = [0, 0];
    sim.armed = [false, false];
    sim.roles.faults_stop();
    sim.trace("faults stop");
    sim.converge()?;
    sim.check_final()?;
    sim.report.completed_writes_discarded = sim
        .client
        .completed
        .keys()
        .filter(|k| sim.watch.verdict_discarded.contains(k))
        .count() as u64;
    sim.report.steps = sim.step;
    sim.trace("converged");
    Ok(sim.report)
}

impl Sim<'_> {
    /// The liveness phase: steps until the pair converges, within the bound (checker 3).
    fn converge(&mut self) -> Result<(), SimFailure> {
        let start = self.step;
        while !self.converged() {
            if self.step - start >= self.opts.liveness_steps {
                let detail = self.describe_pair();
                return Err(self.fail(
                    Checker::NoConvergence,
                    format!(
                        "not converged {} steps after the faults stopped: {detail}",
                        self.opts.liveness_steps
                    ),
                ));
            }
            self.step_once()?;
        }
        self.report.convergence_steps = self.step - start;
        Ok(())
    }

    /// Both nodes as the liveness failure describes them.
    fn describe_pair(&self) -> String {
        let mut out = String::new();
        for r in NodeName::BOTH {
            match self.node(r) {
                Some(n) => out.push_str(&format!(
                    "{r}: {:?} {:?} {:?} (queue {} records); ",
                    n.role(),
                    n.exec.core.phase(),
                    n.exec.core.stats(),
                    n.exec.queue.len_records()
                )),
                None => out.push_str(&format!("{r}: down; ")),
            }
        }
        let pending: usize = self.client.pending.iter().map(|p| p.len()).sum();
        out.push_str(&format!("{pending} writes pending"));
        out
    }
}
