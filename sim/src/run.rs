//! One simulated run: the fault phase, the liveness phase and the checkers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use bytes::Bytes;
use mirror_proto::{Message, PeerId, PeerLossPolicy, Phase};

use crate::net::{frame, Connection, Delivery, End};
use crate::node::{Canaries, Effect, Executed, Recovery, Role, SimNode};
use crate::{MAX_WRITE, REGION_BYTES, STEP_US};

/// How a run is shaped (the faults themselves are drawn from the seed: [`Swarm`]).
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Steps with faults.
    pub fault_steps: u64,
    /// Bound on the steps the pair may take to converge once the faults stop.
    pub liveness_steps: u64,
    /// The canary: the primary applies each write at submission, before the backup's ack.
    pub canary_apply_before_ack: bool,
    /// The second canary: both nodes match logs by seq alone, as before terms (the backup
    /// takes a record of another term at the same seq for the same write).
    pub canary_seq_only_matching: bool,
    /// Print every fault and phase change (for replaying one seed).
    pub trace: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            fault_steps: 3_000,
            liveness_steps: 20_000,
            canary_apply_before_ack: false,
            canary_seq_only_matching: false,
            trace: false,
        }
    }
}

/// The fault parameters of one seed (swarm testing: each seed draws its own mix, so that some
/// runs are dominated by crashes, others by partitions or by a broken transport).
#[derive(Debug, Clone)]
pub struct Swarm {
    /// What the primary does without its backup.
    pub policy: PeerLossPolicy,
    /// Per step, in millionths: a node crashes.
    pub crash_ppm: u32,
    /// Percent of crashes that are power losses (else process crashes).
    pub power_loss_percent: u32,
    /// Per step, in millionths: the connection is cut.
    pub cut_ppm: u32,
    /// Per step, in millionths: one direction of the connection goes silent.
    pub half_open_ppm: u32,
    /// Per step, in millionths: a partition starts.
    pub partition_ppm: u32,
    /// Largest partition, in steps.
    pub partition_max_steps: u64,
    /// Largest delay of a frame, in steps.
    pub delay_max_steps: u64,
    /// Per frame sent, in millionths: frames in flight are duplicated or swapped.
    pub mangle_ppm: u32,
    /// Writes the client keeps in flight at most.
    pub depth: usize,
    /// The client stops submitting this many steps before the faults stop, so that faults also
    /// hit an idle pair, and the liveness phase starts from whatever they left (an apply report
    /// lost on a connection that stays half-open, say). 0: it writes to the end.
    pub idle_tail_steps: u64,
    /// Percent of crashes after which the node comes back to find its peer unreachable for a
    /// while (a power cut that also took the network, a peer slow to answer): a `continue`
    /// primary then writes degraded before any Hello, at seqs its peer may hold.
    pub isolated_restart_percent: u32,
}

impl Swarm {
    /// Draws the parameters for one seed.
    pub fn draw(rng: &mut fastrand::Rng) -> Swarm {
        let pick = |rng: &mut fastrand::Rng, max: u32| {
            if rng.bool() {
                0
            } else {
                rng.u32(0..=max)
            }
        };
        Swarm {
            policy: if rng.bool() {
                PeerLossPolicy::Block
            } else {
                PeerLossPolicy::Continue
            },
            crash_ppm: pick(rng, 3_000),
            power_loss_percent: rng.u32(0..=100),
            cut_ppm: pick(rng, 3_000),
            half_open_ppm: pick(rng, 1_000),
            partition_ppm: pick(rng, 1_000),
            partition_max_steps: rng.u64(10..=1_500),
            delay_max_steps: rng.u64(0..=20),
            // A broken transport in a quarter of the seeds only: it mostly tests refusals.
            mangle_ppm: if rng.u32(0..4) == 0 {
                rng.u32(0..=20_000)
            } else {
                0
            },
            depth: rng.usize(1..=32),
            idle_tail_steps: if rng.bool() { 0 } else { rng.u64(1..=1_500) },
            isolated_restart_percent: rng.u32(0..=100),
        }
    }
}

/// Which checker failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checker {
    /// A write whose completion the client saw is lost (or its seq reused).
    CompletedWriteLost,
    /// The primary applied a write the backup did not durably hold.
    PrimaryAheadOfBackup,
    /// The backup acknowledged a write its queue had not made durable.
    AckBeforeDurable,
    /// A restarted node's region and queue do not hold the history through its `last_seq`.
    RecoveryWrong,
    /// The pair did not converge in time after the faults stopped.
    NoConvergence,
    /// A catch-up sent a record the peer already held.
    CatchUpResent,
    /// The queue lost what it had made durable.
    DurabilityLost,
    /// Regions differ from each other or from the replay of the history.
    RegionsDiffer,
    /// A node discarded (as a divergent suffix) a record whose write a caller saw complete.
    CompletedWriteDiscarded,
    /// Both nodes are synchronous with nothing in flight, yet their regions differ.
    SilentDivergence,
    /// A node stopped (storage error, fatal error of the core, a full backup queue).
    NodeStopped,
}

/// Why a seed failed.
#[derive(Debug, Clone)]
pub struct SimFailure {
    /// The seed.
    pub seed: u64,
    /// The step at which the checker fired.
    pub step: u64,
    /// Which checker.
    pub checker: Checker,
    /// What it saw.
    pub message: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {:?}: {}",
            self.seed, self.step, self.checker, self.message
        )
    }
}

impl std::error::Error for SimFailure {}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Steps taken in all.
    pub steps: u64,
    /// Steps the liveness phase took to converge.
    pub convergence_steps: u64,
    /// Writes the client saw complete.
    pub completed_writes: u64,
    /// Crashes of the primary / of the backup.
    pub crashes: [u64; 2],
    /// Of those, crashes in the middle of executing the core's actions or a checkpoint.
    pub mid_action_crashes: u64,
    /// Of those, power losses (queue and region rebuilt from durable bytes).
    pub power_losses: u64,
    /// Words torn between durable and written by power losses.
    pub torn_words: u64,
    /// Connections cut, half-opened, partitions.
    pub cuts: u64,
    /// Half-open connections.
    pub half_opens: u64,
    /// Partitions.
    pub partitions: u64,
    /// Frames duplicated or swapped by a broken transport.
    pub mangled: u64,
    /// Connections the backup dropped because its queue had no room for the next write.
    pub room_drops: u64,
    /// Records and payload bytes moved by catch-ups.
    pub recovery_records: u64,
    /// Payload bytes moved by catch-ups.
    pub recovery_bytes: u64,
    /// Records dropped as divergent suffixes (saved, then repaired from the primary).
    pub discarded_records: u64,
    /// Crashes after which the node came back to an unreachable peer.
    pub isolated_restarts: u64,
    /// Hash of everything that happened: the same seed must give the same hash.
    pub trace_hash: u64,
}

impl SimReport {
    /// Adds `other`'s counts to these (for totals over many seeds; `convergence_steps` keeps
    /// the slowest).
    pub fn add(&mut self, other: &SimReport) {
        self.steps += other.steps;
        self.convergence_steps = self.convergence_steps.max(other.convergence_steps);
        self.completed_writes += other.completed_writes;
        self.crashes[0] += other.crashes[0];
        self.crashes[1] += other.crashes[1];
        self.mid_action_crashes += other.mid_action_crashes;
        self.power_losses += other.power_losses;
        self.torn_words += other.torn_words;
        self.cuts += other.cuts;
        self.half_opens += other.half_opens;
        self.partitions += other.partitions;
        self.mangled += other.mangled;
        self.room_drops += other.room_drops;
        self.recovery_records += other.recovery_records;
        self.recovery_bytes += other.recovery_bytes;
        self.discarded_records += other.discarded_records;
        self.isolated_restarts += other.isolated_restarts;
    }
}

/// A write the client submitted: its id is the index into `Client::writes`.
struct Write {
    offset: u64,
    data: Bytes,
}

#[derive(Default)]
struct Client {
    writes: Vec<Write>,
    /// Tickets of the current primary incarnation awaiting completion: ticket -> (seq, id).
    pending: BTreeMap<u64, (u64, usize)>,
    next_ticket: u64,
    /// The history: seq -> (term, id of the write) that holds it now.
    history: BTreeMap<u64, (u64, usize)>,
    /// Every write ever given a seq: (seq, term) -> id.
    assigned: BTreeMap<(u64, u64), usize>,
    /// Seqs whose completion the client saw.
    completed: BTreeMap<u64, usize>,
    /// Seqs submitted while the primary was not synchronous (degraded writes under
    /// `continue`): applied without an ack by design, even when a recovery that completes in
    /// the same batch has already cleared the primary's `degraded` flag.
    degraded: BTreeSet<u64>,
}

/// The unique bytes of write `id`.
fn payload(id: usize, len: usize) -> Bytes {
    let mut state = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

struct Sim<'o> {
    seed: u64,
    opts: &'o SimOptions,
    swarm: Swarm,
    rng: fastrand::Rng,
    step: u64,
    /// The running nodes (None while crashed).
    nodes: [Option<SimNode>; 2],
    /// A crashed node, already recovered from its files, waiting to come back.
    restarting: [Option<SimNode>; 2],
    /// Step at which a crashed node comes back.
    down_until: [u64; 2],
    /// A node that will die in the middle of its next non-empty execution of actions (or of
    /// its next checkpoint).
    armed: [bool; 2],
    conn: Option<Connection>,
    next_conn_id: u64,
    next_connect_step: u64,
    partitioned_until: u64,
    faults: bool,
    client: Client,
    report: SimReport,
    /// The converged state checker 8 last compared (see `check_no_silent_divergence`).
    divergence_checked: Option<[u64; 5]>,
}

fn idx(r: Role) -> usize {
    match r {
        Role::Primary => 0,
        Role::Backup => 1,
    }
}

fn end(r: Role) -> End {
    match r {
        Role::Primary => End::Primary,
        Role::Backup => End::Backup,
    }
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

    /// One node crashes now (its connection end vanishes: the peer learns of it later or
    /// times out) and comes back after a while. Actions the core asked for and the node did
    /// not execute are lost with it.
    fn crash(&mut self, r: Role) -> Result<(), SimFailure> {
        self.armed[idx(r)] = false;
        let Some(node) = self.nodes[idx(r)].take() else {
            return Ok(());
        };
        // Every node, every policy: a `continue` primary's power loss too (terms and log
        // matching keep the two histories apart; checkers 8 and 9 hold them to it).
        let power = self.rng.u32(0..100) < self.swarm.power_loss_percent;
        self.report.crashes[idx(r)] += 1;
        if power {
            self.report.power_losses += 1;
        }
        self.trace(format_args!(
            "crash {r:?} ({})",
            if power { "power loss" } else { "process" }
        ));
        if let Some(c) = self.conn.as_mut() {
            if self.rng.bool() {
                // The kernel resets the connection: the peer learns soon.
                let d = self.rng.u64(0..5);
                c.close(end(r), self.step, d);
            } else {
                // A dead host: the peer hears nothing (its timeouts must notice).
                c.blackhole(end(r).other());
                c.close(end(r), self.step, u64::MAX / 2);
            }
        }
        if r == Role::Primary {
            // The client's waits fail with the process.
            self.client.pending.clear();
        }
        let last_before = node.exec.queue.last_seq();
        if node.exec.durable().last_seq < last_before {
            self.trace(format_args!(
                "{r:?} holds seqs {}..={last_before} not yet durable",
                node.exec.durable().last_seq + 1
            ));
        }
        let (node, tear, recovery) = node
            .crash_and_restart(power, &mut self.rng)
            .map_err(|e| self.fail(Checker::DurabilityLost, e))?;
        if recovery.last_seq < last_before {
            self.trace(format_args!(
                "{r:?} lost seqs {}..={last_before}",
                recovery.last_seq + 1
            ));
        }
        self.trace(format_args!(
            "{r:?} recovered through seq {} with terms {:?}",
            recovery.last_seq,
            recovery.terms.entries()
        ));
        self.check_recovery(r, &recovery)?;
        self.report.torn_words += tear.written_words;
        self.nodes[idx(r)] = None;
        self.down_until[idx(r)] = self.step + self.rng.u64(0..300);
        if self.rng.u32(0..100) < self.swarm.isolated_restart_percent {
            // It comes back to an unreachable peer.
            let until = self.down_until[idx(r)] + self.rng.u64(1..=600);
            self.partitioned_until = self.partitioned_until.max(until);
            self.report.isolated_restarts += 1;
            self.trace(format_args!("the network is down until step {until}"));
        }
        self.restarting[idx(r)] = Some(node);
        Ok(())
    }

    /// Executes `r`'s pending actions and what they ask of the simulation. An armed node dies
    /// part way through: after an append and before its sync, after the ack arrived and before
    /// the apply, after the apply and before the completion... Returns whether it is still up.
    fn execute(&mut self, r: Role) -> Result<bool, SimFailure> {
        self.execute_or_defer_crash(r, false)
    }

    /// `execute`, where an armed crash may wait for a later batch (`defer`): a submission's
    /// batch sends its write last, so a crash landing in it never follows the send; deferring
    /// lets crashes also land in the pass's closing batch, after the sends and before the
    /// primary's own sync (a power cut while the sync overlaps the round trip).
    fn execute_or_defer_crash(&mut self, r: Role, defer: bool) -> Result<bool, SimFailure> {
        let crash = if self.armed[idx(r)] && !defer {
            Some(&mut self.rng)
        } else {
            None
        };
        let Some(node) = self.nodes[idx(r)].as_mut() else {
            return Ok(false);
        };
        let Executed { effects, cut } = match node.execute(crash) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(Checker::NodeStopped, e)),
        };
        // What ran before the crash happened: its frames left, its completions were seen.
        self.handle_effects(r, effects)?;
        if let Some((n, of)) = cut {
            self.trace(format_args!("{r:?} dies after {n} of {of} actions"));
            self.report.mid_action_crashes += 1;
            self.crash(r)?;
            return Ok(false);
        }
        Ok(self.nodes[idx(r)].is_some())
    }

    /// Whether `peer` names the current connection (effects for an older one are dropped).
    fn is_current(&self, peer: PeerId) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == peer.0)
    }

    fn handle_effects(&mut self, r: Role, effects: Vec<Effect>) -> Result<(), SimFailure> {
        for e in effects {
            match e {
                Effect::Send { to, .. } | Effect::SendQueued { to, .. } | Effect::Close(to)
                    if !self.is_current(to) =>
                {
                    // For a connection that is gone.
                }
                Effect::Send { msg, durable, .. } => {
                    if let (
                        Role::Backup,
                        Message::Ack {
                            received_through, ..
                        },
                    ) = (r, &msg)
                    {
                        self.check_ack_durable(*received_through, durable)?;
                    }
                    self.send(r, &msg)
                }
                Effect::SendQueued {
                    from_seq,
                    through_seq,
                    writes,
                    ..
                } => {
                    // Checker 4: only what the peer lacks.
                    // What the peer holds of this node's history: the two logs agree through
                    // their common point (a seq the peer holds with another term is not the
                    // same record: a divergent suffix, or degraded writes of a newer term).
                    let peer_last = match (&self.nodes[idx(r)], &self.nodes[idx(other(r))]) {
                        (Some(me), Some(peer)) => mirror_proto::common_point(
                            me.exec.queue.term_history(),
                            me.exec.queue.last_seq(),
                            peer.exec.queue.term_history(),
                            peer.exec.queue.last_seq(),
                        ),
                        _ => None,
                    };
                    if let Some(peer_last) = peer_last {
                        if from_seq <= peer_last {
                            return Err(self.fail(
                                Checker::CatchUpResent,
                                format!(
                                    "{r:?} sends {from_seq}..={through_seq} but the peer holds through {peer_last}"
                                ),
                            ));
                        }
                    }
                    self.trace(format_args!("{r:?} catch-up {from_seq}..={through_seq}"));
                    for m in &writes {
                        if let Message::Write { data, .. } = m {
                            self.report.recovery_records += 1;
                            self.report.recovery_bytes += data.len() as u64;
                        }
                        self.send(r, m);
                    }
                }
                Effect::Close(peer) => {
                    let delay = self.rng.u64(0..5);
                    let step = self.step;
                    if let Some(c) = self.conn.as_mut() {
                        if c.is_open(end(r)) {
                            c.close(end(r), step, delay);
                            // The node's own end is gone at once.
                            self.trace(format_args!("{r:?} closes"));
                            if let Some(n) = self.nodes[idx(r)].as_mut() {
                                n.exec.core.on_disconnected(peer);
                            }
                        }
                    }
                }
                Effect::Complete(ticket) => {
                    let done: Vec<u64> = self
                        .client
                        .pending
                        .range(..=ticket)
                        .map(|(t, _)| *t)
                        .collect();
                    for t in done {
                        let (seq, id) = self.client.pending.remove(&t).expect("listed");
                        self.client.completed.insert(seq, id);
                        self.report.completed_writes += 1;
                    }
                }
                Effect::Apply(seq) => {
                    if r == Role::Primary {
                        self.check_backup_holds(seq)?;
                    }
                }
                Effect::Discard(records) => self.check_discarded(r, &records)?,
                Effect::Fatal(why) => {
                    return Err(self.fail(Checker::NodeStopped, format!("{r:?}: {why}")));
                }
            }
        }
        Ok(())
    }

    /// Checker 7: a restarted node's region, once it replayed its own queue, holds the writes
    /// of the history through its queue's `last_seq` (`applied_through` never claims more
    /// than the region durably holds, and the queue keeps everything after it). Checked at
    /// once, because the final comparison alone misses a lost write that later writes covered
    /// (the region is small and rewritten many times over).
    ///
    /// Bytes of writes with a higher seq are left out: a primary may have applied a write
    /// (acked by the backup) whose record its queue then lost in a power loss while some of
    /// the region's words kept it; the backup replays that record in the handshake.
    fn check_recovery(&self, r: Role, rec: &Recovery) -> Result<(), SimFailure> {
        let mut expect = vec![0u8; REGION_BYTES as usize];
        let mut masked = vec![false; REGION_BYTES as usize];
        let mut next = 1;
        for (&seq, &(term, id)) in &self.client.history {
            let w = &self.client.writes[id];
            let range = w.offset as usize..w.offset as usize + w.data.len();
            let held_term = rec.terms.term_at(seq).filter(|&t| t != term);
            if let (true, Some(held_term)) = (seq <= rec.last_seq, held_term) {
                // The node holds another write at this seq: a divergent suffix that the next
                // handshake saves, repairs and drops (checkers 8 and 9 judge that). Neither
                // write's bytes say anything here.
                masked[range].fill(true);
                if let Some(&held) = self.client.assigned.get(&(seq, held_term)) {
                    let w = &self.client.writes[held];
                    masked[w.offset as usize..w.offset as usize + w.data.len()].fill(true);
                }
                next += 1;
                continue;
            }
            if seq <= rec.last_seq {
                if seq != next {
                    return Err(self.fail(
                        Checker::RecoveryWrong,
                        format!(
                            "{r:?} recovered through seq {}, but no write was given seq {next}",
                            rec.last_seq
                        ),
                    ));
                }
                next += 1;
                expect[range].copy_from_slice(&w.data);
            } else {
                masked[range].fill(true);
            }
        }
        let bad = (0..expect.len()).find(|&i| !masked[i] && rec.rebuilt[i] != expect[i]);
        if let Some(at) = bad {
            return Err(self.fail(
                Checker::RecoveryWrong,
                format!(
                    "{r:?} restarted with its queue through seq {}, but its region and queue do not hold the history's writes through it (byte {at})",
                    rec.last_seq
                ),
            ));
        }
        Ok(())
    }

    /// Checker 9: a node discards (as a divergent suffix) only records whose writes no caller
    /// saw complete: a completed write is in the primary's durable queue, so its history wins.
    fn check_discarded(&mut self, r: Role, records: &[(u64, u64)]) -> Result<(), SimFailure> {
        self.report.discarded_records += records.len() as u64;
        self.trace(format_args!("{r:?} discards {records:?}"));
        for &(seq, term) in records {
            let id = self.client.assigned.get(&(seq, term)).copied();
            if id.is_some() && self.client.completed.get(&seq) == id.as_ref() {
                return Err(self.fail(
                    Checker::CompletedWriteDiscarded,
                    format!(
                        "{r:?} discards seq {seq} of term {term}, completed write {}",
                        id.unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checker 6: the backup acknowledges only what its queue made durable (it syncs before
    /// the ack, in the same batch). Checker 2 alone can miss an early ack: a checkpoint in the
    /// same pass (due at once when the queue is half full) makes the records durable before
    /// the ack arrives, unless the backup loses power in between.
    fn check_ack_durable(
        &self,
        received_through: u64,
        (last, applied): (u64, u64),
    ) -> Result<(), SimFailure> {
        if !durably_holds((last, applied), received_through) {
            return Err(self.fail(
                Checker::AckBeforeDurable,
                format!(
                    "backup acks through {received_through}; its queue is durable through {last} (applied {applied})"
                ),
            ));
        }
        Ok(())
    }

    /// Checker 2: a write the primary applies is durably held by the backup, except under
    /// `continue` once the primary declared the backup lost (degraded: it applies without acks
    /// by design, until a recovery completes).
    ///
    /// "Durably held": the backup acks only after syncing its queue, so its durable state
    /// (what survives even a power loss) must have the seq, in its queue (`last_seq`) or in its
    /// checkpointed region (`applied_through`): its written state is not enough.
    fn check_backup_holds(&self, seq: u64) -> Result<(), SimFailure> {
        let Some(p) = self.nodes[0].as_ref() else {
            return Ok(());
        };
        if p.policy() == PeerLossPolicy::Continue
            && (p.exec.core.stats().degraded || self.client.degraded.contains(&seq))
        {
            return Ok(());
        }
        let (last, applied) = match (&self.nodes[1], &self.restarting[1]) {
            (Some(b), _) | (None, Some(b)) => (b.exec.durable().last_seq, b.exec.durable().applied),
            (None, None) => (0, 0),
        };
        if !durably_holds((last, applied), seq) {
            return Err(self.fail(
                Checker::PrimaryAheadOfBackup,
                format!(
                    "primary applies seq {seq}; the backup durably holds through {last} (applied {applied})"
                ),
            ));
        }
        Ok(())
    }

    fn send(&mut self, from: Role, m: &Message) {
        let delay = if self.faults {
            self.rng.u64(0..=self.swarm.delay_max_steps)
        } else {
            self.rng.u64(0..=2)
        };
        let at = self.step + 1 + delay;
        let mangle = self.faults && self.chance(self.swarm.mangle_ppm);
        let dup = self.rng.bool();
        if let Some(c) = self.conn.as_mut() {
            c.send(end(from), frame(m), at);
            if mangle && c.mangle(end(from).other(), dup) {
                self.report.mangled += 1;
                self.trace(format_args!(
                    "transport {} frames toward {:?}",
                    if dup { "duplicates" } else { "swaps" },
                    end(from).other()
                ));
            }
        }
    }
}

/// Whether a node whose durable queue ends at `last` and whose checkpoint is `applied` holds
/// record `seq` across a power loss.
fn durably_holds((last, applied): (u64, u64), seq: u64) -> bool {
    last >= seq || applied >= seq
}

fn other(r: Role) -> Role {
    match r {
        Role::Primary => Role::Backup,
        Role::Backup => Role::Primary,
    }
}

impl Sim<'_> {
    /// Faults of this step (fault phase only).
    fn inject_faults(&mut self) -> Result<(), SimFailure> {
        for r in [Role::Primary, Role::Backup] {
            if self.nodes[idx(r)].is_some() && self.chance(self.swarm.crash_ppm) {
                if self.armed[idx(r)] || self.rng.bool() {
                    self.crash(r)?;
                } else {
                    // Half the crashes happen inside the node's next batch of actions.
                    self.armed[idx(r)] = true;
                    self.trace(format_args!("{r:?} will die mid-batch"));
                }
            }
        }
        if self.conn.is_some() && self.chance(self.swarm.cut_ppm) {
            let (dp, db) = (self.rng.u64(0..10), self.rng.u64(0..10));
            let step = self.step;
            if let Some(c) = self.conn.as_mut() {
                c.cut(step, dp, db);
            }
            self.report.cuts += 1;
            self.trace("cut");
        }
        if self.conn.is_some() && self.chance(self.swarm.half_open_ppm) {
            let to = if self.rng.bool() {
                End::Primary
            } else {
                End::Backup
            };
            if let Some(c) = self.conn.as_mut() {
                c.blackhole(to);
            }
            self.report.half_opens += 1;
            self.trace(format_args!("half-open: nothing reaches {to:?}"));
        }
        if self.step >= self.partitioned_until && self.chance(self.swarm.partition_ppm) {
            let len = self.rng.u64(1..=self.swarm.partition_max_steps);
            self.partitioned_until = self.step + len;
            if let Some(c) = self.conn.as_mut() {
                c.blackhole(End::Primary);
                c.blackhole(End::Backup);
            }
            self.report.partitions += 1;
            self.trace(format_args!("partition for {len} steps"));
        }
        Ok(())
    }

    /// Crashed nodes whose time has come start again (their files were recovered at the crash).
    fn restart_due(&mut self) {
        for r in [Role::Primary, Role::Backup] {
            if self.nodes[idx(r)].is_none() && self.step >= self.down_until[idx(r)] {
                if let Some(n) = self.restarting[idx(r)].take() {
                    self.trace(format_args!("{r:?} up again"));
                    self.nodes[idx(r)] = Some(n);
                    if r == Role::Primary {
                        self.client.next_ticket = 1;
                    }
                }
            }
        }
    }

    /// The primary connects when its core is disconnected, as the real node does every
    /// reconnect interval; it fails while the backup is down or the network partitioned.
    fn manage_connection(&mut self) {
        if self.conn.as_ref().is_some_and(|c| c.is_finished()) {
            self.conn = None;
        }
        let Some(p) = self.nodes[0].as_ref() else {
            return;
        };
        if p.exec.core.phase() != Phase::Disconnected || self.step < self.next_connect_step {
            return;
        }
        if self.conn.as_ref().is_some_and(|c| c.is_open(End::Primary)) {
            return;
        }
        self.next_connect_step = self.step + 25;
        let reachable = self.nodes[1].is_some() && self.step >= self.partitioned_until;
        if !reachable {
            if let Some(p) = self.nodes[0].as_mut() {
                p.exec.core.on_connect_failed();
            }
            return;
        }
        // The backup replaces a connection it still believes in (its peer restarted).
        if let Some(old) = self.conn.as_ref().filter(|c| c.is_open(End::Backup)) {
            let old = PeerId(old.id);
            if let Some(b) = self.nodes[1].as_mut() {
                b.exec.core.on_disconnected(old);
            }
        }
        self.next_conn_id += 1;
        self.conn = Some(Connection::new(self.next_conn_id));
        let id = self.next_conn_id;
        self.trace(format_args!("connection {id}"));
        for i in [1, 0] {
            if let Some(n) = self.nodes[i].as_mut() {
                n.exec.core.on_connected(PeerId(id));
            }
        }
    }

    /// The client submits while the primary takes writes, with the real node's queue headroom
    /// (in the fault phase but its idle tail; in the liveness phase it only waits for what it
    /// submitted). Each
    /// submission's actions run before the next, as in the real node, so that queue space is
    /// accounted for.
    fn submit(&mut self) -> Result<(), SimFailure> {
        let idle_tail = self.swarm.idle_tail_steps.min(self.opts.fault_steps / 2);
        if !self.faults || self.step + idle_tail >= self.opts.fault_steps {
            return Ok(());
        }
        let now = self.now_us();
        if let Some(p) = self.nodes[0].as_mut() {
            p.exec.core.set_now(now);
        }
        while self.client.pending.len() < self.swarm.depth {
            let Some(p) = self.nodes[0].as_mut() else {
                return Ok(());
            };
            if !p.exec.core.accepts_submissions() {
                break;
            }
            let len = self.rng.usize(1..=MAX_WRITE);
            if !p.exec.queue.admits_new_write(len) {
                break;
            }
            let offset = self.rng.u64(0..=REGION_BYTES - len as u64);
            let id = self.client.writes.len();
            let data = payload(id, len);
            self.client.writes.push(Write {
                offset,
                data: data.clone(),
            });
            let ticket = self.client.next_ticket;
            let synchronous = p.exec.core.phase() == Phase::Synchronous;
            let term = p.exec.core.stats().current_term;
            let seq = match p.exec.core.submit(ticket, offset, data) {
                Ok(seq) => seq,
                Err(e) => {
                    return Err(self.fail(Checker::NodeStopped, format!("submission refused: {e}")))
                }
            };
            self.client.next_ticket += 1;
            if let Some(&old) = self.client.completed.get(&seq) {
                return Err(self.fail(
                    Checker::CompletedWriteLost,
                    format!(
                        "seq {seq} of completed write {old} was given to write {id}: the completed write is gone"
                    ),
                ));
            }
            self.client.history.insert(seq, (term, id));
            self.client.assigned.insert((seq, term), id);
            self.client.pending.insert(ticket, (seq, id));
            if synchronous {
                self.client.degraded.remove(&seq);
            } else {
                self.client.degraded.insert(seq);
            }
            let defer = self.rng.bool();
            self.execute_or_defer_crash(Role::Primary, defer)?;
        }
        Ok(())
    }

    /// One step of one node: inputs, the core, its actions, a checkpoint when due.
    fn run_node(&mut self, r: Role) -> Result<bool, SimFailure> {
        if self.nodes[idx(r)].is_none() {
            return Ok(false);
        }
        let mut inputs = Vec::new();
        let step = self.step;
        // Everything delivered comes from the current connection (no connection: nothing).
        let peer = PeerId(self.conn.as_ref().map_or(0, |c| c.id));
        if let Some(c) = self.conn.as_mut() {
            c.deliver(end(r), step, &mut inputs);
        }
        let now = self.now_us();
        let node = self.nodes[idx(r)].as_mut().expect("checked");
        node.exec.core.set_now(now);
        let worked = !inputs.is_empty();
        let mut close = false;
        // Said once the node is no longer borrowed.
        let mut events = Vec::new();
        if r == Role::Backup {
            // As the real backup: take writes only while the queue has room for them; at the
            // first that would not fit, drop the connection (the primary reconnects, its Hello
            // lets us trim, and the catch-up resends the rest) instead of failing.
            let fits = node
                .exec
                .queue
                .first_write_without_room(inputs.iter().map(|d| match d {
                    Delivery::Message(Message::Write { seq, data, .. }) => Some((*seq, data.len())),
                    _ => None,
                }));
            if let Some(at) = fits {
                inputs.truncate(at);
                inputs.push(Delivery::Disconnected);
                close = true;
                self.report.room_drops += 1;
                events.push(format!(
                    "backup queue has no room ({} records from {:?}, {} of {} bytes free): dropping the connection",
                    node.exec.queue.len_records(),
                    node.exec.queue.first_seq(),
                    node.exec.queue.free_bytes(),
                    node.exec.queue.capacity_bytes()
                ));
            }
        }
        for d in inputs {
            match d {
                Delivery::Message(m) => node.exec.core.on_message(peer, m),
                Delivery::Disconnected => node.exec.core.on_disconnected(peer),
                Delivery::Garbage(e) => {
                    close = true;
                    node.exec.core.on_disconnected(peer);
                    events.push(format!("{r:?} drops the connection: {e}"));
                }
            }
        }
        for e in events {
            self.trace(e);
        }
        if close {
            if let Some(c) = self.conn.as_mut() {
                c.close(end(r), step, 1);
            }
        }
        let node = self.nodes[idx(r)].as_mut().expect("checked");
        if !worked {
            node.exec.core.on_tick();
        }
        node.exec.core.end_batch();
        // A power cut while the node syncs records it has already sent (the sync overlaps the
        // round trip): rare for a crash drawn per step, as the window is one batch wide, so
        // this batch draws its own, twenty times as likely. Seeds without crashes stay so.
        let sends_unsynced = node.exec.durable().last_seq < node.exec.queue.last_seq();
        if sends_unsynced && self.chance(self.swarm.crash_ppm.saturating_mul(20)) {
            self.armed[idx(r)] = true;
            self.trace(format_args!("{r:?} will die during its sync"));
        }
        if !self.execute(r)? {
            return Ok(worked);
        }
        // Checkpoint by the real node's rule (the shared executor's).
        let now = self.now_us();
        let node = self.nodes[idx(r)].as_mut().expect("still up");
        let due = node.exec.checkpoint_due(now, worked);
        if due {
            // An armed node may die inside the checkpoint instead of in its next batch.
            let die_after = (self.armed[idx(r)] && self.rng.bool()).then(|| self.rng.u8(0..2));
            let node = self.nodes[idx(r)].as_mut().expect("still up");
            match node.checkpoint(now, die_after) {
                Ok(true) => {
                    self.execute(r)?;
                }
                Ok(false) => {
                    self.trace(format_args!("{r:?} dies in a checkpoint ({die_after:?})"));
                    self.report.mid_action_crashes += 1;
                    self.crash(r)?;
                }
                Err(e) => return Err(self.fail(Checker::NodeStopped, e)),
            }
        }
        Ok(worked)
    }

    fn step_once(&mut self) -> Result<(), SimFailure> {
        if self.faults {
            self.inject_faults()?;
        }
        self.restart_due();
        self.manage_connection();
        self.submit()?;
        // The order in which the two nodes run varies, as two machines' would.
        let first = if self.rng.bool() {
            Role::Primary
        } else {
            Role::Backup
        };
        self.run_node(first)?;
        self.run_node(other(first))?;
        self.check_no_silent_divergence()?;
        self.step += 1;
        Ok(())
    }

    /// Checker 8: whenever both nodes are synchronous with everything applied and nothing in
    /// flight, their regions are identical (the end of the run also compares them with the
    /// replay of the history). A pair that disagrees on what a seq means stays synchronous
    /// while its regions differ: this catches it at once.
    fn check_no_silent_divergence(&mut self) -> Result<(), SimFailure> {
        if !self.converged() {
            return Ok(());
        }
        let (Some(p), Some(b)) = (&self.nodes[0], &self.nodes[1]) else {
            return Ok(());
        };
        // Compare once per converged state, not once per idle step.
        let (ps, bs) = (p.exec.core.stats(), b.exec.core.stats());
        let state = [
            ps.applied_through,
            bs.applied_through,
            ps.recoveries,
            bs.recoveries,
            self.report.crashes[0] + self.report.crashes[1],
        ];
        if self.divergence_checked == Some(state) {
            return Ok(());
        }
        self.divergence_checked = Some(state);
        if let Some(at) = p.region().iter().zip(b.region()).position(|(x, y)| x != y) {
            return Err(self.fail(
                Checker::SilentDivergence,
                format!(
                    "both nodes are synchronous and idle, but their regions differ at byte {at}"
                ),
            ));
        }
        Ok(())
    }

    /// Whether the pair has converged: both up and synchronous, every submission complete,
    /// everything applied, checkpointed and trimmed on both sides.
    fn converged(&self) -> bool {
        let (Some(p), Some(b)) = (&self.nodes[0], &self.nodes[1]) else {
            return false;
        };
        let (ps, bs) = (p.exec.core.stats(), b.exec.core.stats());
        let last = ps.next_seq - 1;
        p.exec.core.phase() == Phase::Synchronous
            && self.client.pending.is_empty()
            && ps.applied_through == last
            && bs.applied_through == last
            && bs.next_seq == ps.next_seq
            && p.exec.queue.len_records() == 0
            && b.exec.queue.len_records() == 0
    }

    /// Checkers 1 and regions: both regions equal the replay of the final history, and every
    /// completed write is in it.
    fn check_final(&self) -> Result<(), SimFailure> {
        let (Some(p), Some(b)) = (&self.nodes[0], &self.nodes[1]) else {
            return Err(self.fail(Checker::NoConvergence, "a node is down at the end"));
        };
        let last = p.exec.core.stats().next_seq - 1;
        let mut expect = vec![0u8; REGION_BYTES as usize];
        for seq in 1..=last {
            let Some(&(_, id)) = self.client.history.get(&seq) else {
                return Err(self.fail(
                    Checker::RegionsDiffer,
                    format!("seq {seq} was applied but no write was ever given that seq"),
                ));
            };
            let w = &self.client.writes[id];
            expect[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        for (&seq, &id) in &self.client.completed {
            if seq > last || self.client.history.get(&seq).map(|h| h.1) != Some(id) {
                return Err(self.fail(
                    Checker::CompletedWriteLost,
                    format!("completed write {id} (seq {seq}) is not in the final history (last seq {last})"),
                ));
            }
        }
        for (name, region) in [("primary", p.region()), ("backup", b.region())] {
            if let Some(at) = region.iter().zip(&expect).position(|(a, e)| a != e) {
                return Err(self.fail(
                    Checker::RegionsDiffer,
                    format!(
                        "the {name}'s region differs from the replay of the history at byte {at}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Runs one seed in `dir` (which must be empty; the nodes' queue files go there).
pub fn run_seed(seed: u64, opts: &SimOptions, dir: &Path) -> Result<SimReport, SimFailure> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let swarm = Swarm::draw(&mut rng);
    let setup = |e: String| SimFailure {
        seed,
        step: 0,
        checker: Checker::NodeStopped,
        message: format!("setting up: {e}"),
    };
    let ids = (rng.u64(1..u64::MAX), rng.u64(1..u64::MAX));
    let primary = SimNode::create(
        dir,
        Role::Primary,
        ids.0,
        swarm.policy,
        Canaries {
            apply_before_ack: opts.canary_apply_before_ack,
            seq_only_matching: opts.canary_seq_only_matching,
        },
    )
    .map_err(setup)?;
    let backup = SimNode::create(
        dir,
        Role::Backup,
        ids.1,
        swarm.policy,
        Canaries {
            apply_before_ack: false,
            seq_only_matching: opts.canary_seq_only_matching,
        },
    )
    .map_err(setup)?;
    let mut sim = Sim {
        seed,
        opts,
        swarm,
        rng,
        step: 0,
        nodes: [Some(primary), Some(backup)],
        restarting: [None, None],
        down_until: [0, 0],
        armed: [false, false],
        conn: None,
        next_conn_id: 0,
        next_connect_step: 0,
        partitioned_until: 0,
        divergence_checked: None,
        faults: true,
        client: Client {
            next_ticket: 1,
            ..Client::default()
        },
        report: SimReport {
            seed,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            ..SimReport::default()
        },
    };
    let swarm_line = format!("swarm {:?}", sim.swarm);
    sim.trace(swarm_line);
    while sim.step < opts.fault_steps {
        sim.step_once()?;
    }
    // Liveness: faults stop, crashed nodes come back, the network heals.
    sim.faults = false;
    sim.partitioned_until = 0;
    sim.down_until = [0, 0];
    sim.armed = [false, false];
    sim.trace("faults stop");
    let start = sim.step;
    while !sim.converged() {
        if sim.step - start >= opts.liveness_steps {
            let detail = match (&sim.nodes[0], &sim.nodes[1]) {
                (Some(p), Some(b)) => format!(
                    "primary {:?} {:?} (queue {} records), backup {:?} (queue {} records), {} writes pending",
                    p.exec.core.phase(),
                    p.exec.core.stats(),
                    p.exec.queue.len_records(),
                    b.exec.core.stats(),
                    b.exec.queue.len_records(),
                    sim.client.pending.len()
                ),
                _ => "a node is down".into(),
            };
            return Err(sim.fail(
                Checker::NoConvergence,
                format!(
                    "not converged {} steps after the faults stopped: {detail}",
                    opts.liveness_steps
                ),
            ));
        }
        sim.step_once()?;
    }
    sim.report.convergence_steps = sim.step - start;
    sim.check_final()?;
    sim.report.steps = sim.step;
    sim.trace("converged");
    Ok(sim.report)
}
