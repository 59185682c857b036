//! What shapes a run (options, the seed's swarm of fault and failover parameters) and what it
//! tells (a report, or the failure of one checker).

use std::fmt;

use mirror_exec::CheckpointPacing;
use mirror_proto::{FencedPolicy, PeerLossPolicy, SplitBrainPolicy};

use crate::net::NodeName;

/// How a run is shaped (the faults themselves are drawn from the seed: [`Swarm`]).
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Steps with faults.
    pub fault_steps: u64,
    /// Bound on the steps the pair may take to converge once the faults stop.
    pub liveness_steps: u64,
    /// The canary: a primary applies each write at submission, before the backup's ack.
    pub canary_apply_before_ack: bool,
    /// The second canary: both nodes match logs by seq alone, as before terms (the backup
    /// takes a record of another term at the same seq for the same write).
    pub canary_seq_only_matching: bool,
    /// The third canary: the driver ignores a fence's `RefuseWrites`: it reports the fenced
    /// primary's pending tickets complete, and keeps taking writes for it as the primary it
    /// was, reporting them complete although the core refuses them (checker 10 must catch it).
    pub canary_fencing: bool,
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
            canary_fencing: false,
            trace: false,
        }
    }
}

/// The fault parameters of one seed (swarm testing: each seed draws its own mix, so that some
/// runs are dominated by crashes, others by partitions, a broken transport or failovers).
#[derive(Debug, Clone)]
pub struct Swarm {
    /// What a primary does without its backup.
    pub policy: PeerLossPolicy,
    /// Per step, in millionths: a node crashes.
    pub crash_ppm: u32,
    /// Percent of crashes that are power losses (else process crashes).
    pub power_loss_percent: u32,
    /// Per step, in millionths: a connection is cut.
    pub cut_ppm: u32,
    /// Per step, in millionths: one direction of a connection goes silent.
    pub half_open_ppm: u32,
    /// Per step, in millionths: a partition starts.
    pub partition_ppm: u32,
    /// Largest partition, in steps.
    pub partition_max_steps: u64,
    /// Largest delay of a frame, in steps.
    pub delay_max_steps: u64,
    /// Per frame sent, in millionths: frames in flight are duplicated or swapped.
    pub mangle_ppm: u32,
    /// Writes the client keeps in flight at most (per primary).
    pub depth: usize,
    /// The client stops submitting this many steps before the faults stop, so that faults also
    /// hit an idle pair, and the liveness phase starts from whatever they left (an apply report
    /// lost on a connection that stays half-open, say). 0: it writes to the end.
    pub idle_tail_steps: u64,
    /// Percent of crashes after which the node comes back to find its peer unreachable for a
    /// while (a power cut that also took the network, a peer slow to answer): a `continue`
    /// primary then writes degraded before any Hello, at seqs its peer may hold.
    pub isolated_restart_percent: u32,
    /// Role changes: promotions, demotions, fences, split brains.
    pub failover: Failover,
    /// A `continue` primary whose queue is full while its backup is away folds the queue into
    /// its dirty-chunk bitmap (as the real node does) instead of making the client wait; the
    /// backup's return is then a resync. Drawn from a stream of its own (half the seeds), so
    /// that the other draws of a seed are what they were before the bitmap existed; only in
    /// seeds without role changes: a node whose folded writes become a divergent suffix (it
    /// lost a split brain, or was fenced) is refused until an operator rebuilds it with an
    /// initial sync (docs/PROTOCOL.md), which the simulated operator does not do.
    pub fold_when_full: bool,
    /// How the nodes pace their checkpoints: as a `process` node (at the first idle moment) or
    /// as a `power`/`pmem` one (every 50 ms). The simulated queue keeps what a barrier made
    /// durable either way; the pacing moves when checkpoints fall. Drawn from a stream of its
    /// own (half the seeds each).
    pub checkpoint_pacing: CheckpointPacing,
    /// The nodes write a batch's records and applies as a `power` node does: the queue holds
    /// a batch's appends in a run, written at once when the batch's appends end (the
    /// simulated queues are `process` ones, which write each record through the mapping
    /// otherwise), and the executor gathers a batch's applies, holding their completions back
    /// until they are written; so that crashes fall inside both. Drawn from a stream of its
    /// own (half the seeds).
    pub batched_writes: bool,
}

/// The failover parameters of one seed. Drawn from a random stream of their own, so that a
/// seed without failover draws its faults exactly as before failover existed: those seeds keep
/// the fixed-role campaign's coverage.
#[derive(Debug, Clone)]
pub struct Failover {
    /// What a primary does once it learns of a newer primary.
    pub on_fenced: FencedPolicy,
    /// What a handshake does with a split brain (the node ids are the seed's).
    pub after_split_brain: SplitBrainChoice,
    /// Per step, in millionths: the primary crashes or is cut off, and the backup is promoted
    /// (`promote(false)`) once it notices it is disconnected.
    pub failover_ppm: u32,
    /// Per step, in millionths: a connected backup is promoted by force (`promote(true)`).
    pub forced_promotion_ppm: u32,
    /// Per step, in millionths: the primary is demoted live, and a backup promoted once it
    /// notices (usually the other node: a switchover; sometimes the same one).
    pub demotion_ppm: u32,
    /// Per step, in millionths: a long partition during which the backup is promoted: two
    /// primaries (both write under `continue`), a split brain when they meet.
    pub split_brain_ppm: u32,
    /// Percent of crash restarts in the other role than the queue persisted.
    pub other_role_restart_percent: u32,
    /// How long the simulated operator takes to act on a split brain that keeps the nodes apart,
    /// or on a pair without a primary, in steps.
    pub operator_delay_steps: u64,
}

/// [`SplitBrainPolicy`] with the node named by identity (ids are drawn after the swarm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitBrainChoice {
    /// `disconnect`: an operator decides.
    Disconnect,
    /// `discard-younger-primary`.
    DiscardYoungerPrimary,
    /// `discard-least-changes`.
    DiscardLeastChanges,
    /// `discard-node:<id of this node>`.
    DiscardNode(NodeName),
}

impl SplitBrainChoice {
    /// The policy, for nodes with these ids.
    pub fn policy(self, ids: [u64; 2]) -> SplitBrainPolicy {
        match self {
            SplitBrainChoice::Disconnect => SplitBrainPolicy::Disconnect,
            SplitBrainChoice::DiscardYoungerPrimary => SplitBrainPolicy::DiscardYoungerPrimary,
            SplitBrainChoice::DiscardLeastChanges => SplitBrainPolicy::DiscardLeastChanges,
            SplitBrainChoice::DiscardNode(n) => SplitBrainPolicy::DiscardNode(ids[n.index()]),
        }
    }
}

/// The two random streams of a seed: faults, and failover.
pub(crate) fn streams(seed: u64) -> (fastrand::Rng, fastrand::Rng) {
    // Any constant works; it only keeps the failover stream apart from the fault stream.
    const FAILOVER_STREAM: u64 = 0x6661_696c_6f76_6572;
    (
        fastrand::Rng::with_seed(seed),
        fastrand::Rng::with_seed(seed ^ FAILOVER_STREAM),
    )
}

impl Swarm {
    /// The parameters of `seed` (as [`crate::run_seed`] draws them).
    pub fn for_seed(seed: u64) -> Swarm {
        let (mut faults, mut failover) = streams(seed);
        Swarm::draw(&mut faults, &mut failover).with_own_streams(seed)
    }

    /// The parameters of `seed` drawn from streams of their own (the bitmap's, the checkpoint
    /// pacing's, the batched writes'): other draws of a seed stay what they were before each existed.
    pub(crate) fn with_own_streams(mut self, seed: u64) -> Swarm {
        // Any constant works; it only keeps this stream apart from the others.
        const BITMAP_STREAM: u64 = 0x6269_746d_6170_0001;
        let f = &self.failover;
        let fixed_roles = f.failover_ppm == 0
            && f.forced_promotion_ppm == 0
            && f.demotion_ppm == 0
            && f.split_brain_ppm == 0
            && f.other_role_restart_percent == 0;
        self.fold_when_full = fixed_roles && fastrand::Rng::with_seed(seed ^ BITMAP_STREAM).bool();
        const PACING_STREAM: u64 = 0x7061_6369_6e67_0001;
        self.checkpoint_pacing = if fastrand::Rng::with_seed(seed ^ PACING_STREAM).bool() {
            CheckpointPacing::WhenIdle
        } else {
            CheckpointPacing::Interval
        };
        const BATCHED_WRITES_STREAM: u64 = 0x7275_6e73_0000_0001;
        self.batched_writes = fastrand::Rng::with_seed(seed ^ BATCHED_WRITES_STREAM).bool();
        self
    }

    /// Draws the parameters for one seed from its two streams.
    pub(crate) fn draw(rng: &mut fastrand::Rng, failover_rng: &mut fastrand::Rng) -> Swarm {
        Swarm {
            policy: if rng.bool() {
                PeerLossPolicy::Block
            } else {
                PeerLossPolicy::Continue
            },
            crash_ppm: maybe(rng, 3_000),
            power_loss_percent: rng.u32(0..=100),
            cut_ppm: maybe(rng, 3_000),
            half_open_ppm: maybe(rng, 1_000),
            partition_ppm: maybe(rng, 1_000),
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
            failover: Failover::draw(failover_rng),
            fold_when_full: false,
            checkpoint_pacing: CheckpointPacing::Interval,
            batched_writes: false,
        }
    }
}

impl Failover {
    fn draw(rng: &mut fastrand::Rng) -> Failover {
        // A third of the seeds have no role events (nor restarts in the other role): the
        // fixed-role campaign, whose pair keeps its roles.
        let on = rng.u32(0..3) != 0;
        let mut rate = |max: u32| if on { maybe(rng, max) } else { 0 };
        let failover_ppm = rate(600);
        let forced_promotion_ppm = rate(400);
        let demotion_ppm = rate(400);
        let split_brain_ppm = rate(400);
        Failover {
            on_fenced: if rng.u32(0..4) == 0 {
                FencedPolicy::Stop
            } else {
                FencedPolicy::Demote
            },
            after_split_brain: match rng.u32(0..4) {
                0 => SplitBrainChoice::Disconnect,
                1 => SplitBrainChoice::DiscardYoungerPrimary,
                2 => SplitBrainChoice::DiscardLeastChanges,
                _ if rng.bool() => SplitBrainChoice::DiscardNode(NodeName::A),
                _ => SplitBrainChoice::DiscardNode(NodeName::B),
            },
            failover_ppm,
            forced_promotion_ppm,
            demotion_ppm,
            split_brain_ppm,
            other_role_restart_percent: if on && rng.bool() { rng.u32(0..=50) } else { 0 },
            operator_delay_steps: rng.u64(20..=1_500),
        }
    }
}

/// A rate of 0 half of the time, else up to `max`.
fn maybe(rng: &mut fastrand::Rng, max: u32) -> u32 {
    if rng.bool() {
        0
    } else {
        rng.u32(0..=max)
    }
}

/// Which checker failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checker {
    /// A write whose completion the client saw is lost (or its seq reused).
    CompletedWriteLost,
    /// A primary applied a write its backup did not durably hold.
    PrimaryAheadOfBackup,
    /// A backup acknowledged a write its queue had not made durable.
    AckBeforeDurable,
    /// A restarted node's region and queue do not hold its history through its `last_seq`.
    RecoveryWrong,
    /// The pair did not converge in time after the faults stopped.
    NoConvergence,
    /// A catch-up sent a record the peer already held.
    CatchUpResent,
    /// The queue lost what it had made durable.
    DurabilityLost,
    /// Regions differ from each other or from the replay of the history.
    RegionsDiffer,
    /// A node discarded (as a divergent suffix) a record whose write a caller saw complete,
    /// with no split-brain verdict against it.
    CompletedWriteDiscarded,
    /// Both nodes are synchronous with nothing in flight, yet their regions differ.
    SilentDivergence,
    /// A node stopped (storage error, fatal error of the core, a full backup queue).
    NodeStopped,
    /// A primary applied or completed a write after it learned of a newer term, or two
    /// primaries started the same term.
    FencedPrimaryWrote,
    /// A split brain was decided against the policy, not the same way on both sides, or
    /// discarded other records than the loser's suffix.
    SplitBrainOutcomeWrong,
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

/// Split brains found by handshakes, by the verdict the policy (or an operator) gave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitBrains {
    /// The nodes stayed apart.
    pub stay_apart: u64,
    /// The backup's suffix was discarded.
    pub discard_backup: u64,
    /// The primary's suffix lost: the two swapped roles.
    pub discard_primary: u64,
}

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
    /// Tickets a primary refused (`RefuseWrites`: demoted, fenced, lost a split brain).
    pub refused_writes: u64,
    /// Crashes of node A / of node B.
    pub crashes: [u64; 2],
    /// Of those, crashes in the middle of executing the core's actions or a checkpoint.
    pub mid_action_crashes: u64,
    /// Of those, power losses (queue and region rebuilt from durable bytes).
    pub power_losses: u64,
    /// Words torn between durable and written by power losses.
    pub torn_words: u64,
    /// Connections cut.
    pub cuts: u64,
    /// Half-open connections.
    pub half_opens: u64,
    /// Partitions.
    pub partitions: u64,
    /// Frames duplicated or swapped by a broken transport.
    pub mangled: u64,
    /// Connections a backup dropped because its queue had no room for the next write.
    pub room_drops: u64,
    /// Records moved by catch-ups.
    pub recovery_records: u64,
    /// Payload bytes moved by catch-ups.
    pub recovery_bytes: u64,
    /// Records dropped as divergent suffixes (saved, then repaired from the primary).
    pub discarded_records: u64,
    /// Crashes after which the node came back to an unreachable peer.
    pub isolated_restarts: u64,
    /// Backups promoted while disconnected (`promote(false)`), by the operator or a verdict's
    /// role swap aside.
    pub promotions: u64,
    /// Backups promoted by force while connected to a live primary.
    pub forced_promotions: u64,
    /// Primaries demoted live.
    pub demotions: u64,
    /// Primaries fenced (they learned of a newer term).
    pub fences: u64,
    /// Tickets pending at a primary when it was fenced (what the fencing canary completes).
    pub fenced_tickets: u64,
    /// Fenced primaries stopped (`on_fenced = stop`) and restarted as backups.
    pub fenced_stops: u64,
    /// Crash restarts in the other role than the queue persisted.
    pub other_role_restarts: u64,
    /// Restarts as a primary refused because the queue was superseded (started as backups).
    pub refused_primary_starts: u64,
    /// Split brains, by verdict.
    pub split_brains: SplitBrains,
    /// Split-brain resolutions given by the simulated operator.
    pub operator_resolutions: u64,
    /// Completed writes that split-brain verdicts discarded (saved by the loser).
    pub completed_writes_discarded: u64,
    /// Writes the fencing canary reported complete for a fenced primary (a run that reports
    /// any was not caught).
    pub canary_fenced_completions: u64,
    /// Folds of a full queue into the dirty-chunk bitmap.
    pub folds: u64,
    /// Resyncs and initial syncs that completed.
    pub resyncs: u64,
    /// Chunk bytes those resyncs sent.
    pub resync_bytes: u64,
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
        self.refused_writes += other.refused_writes;
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
        self.promotions += other.promotions;
        self.forced_promotions += other.forced_promotions;
        self.demotions += other.demotions;
        self.fences += other.fences;
        self.fenced_tickets += other.fenced_tickets;
        self.fenced_stops += other.fenced_stops;
        self.other_role_restarts += other.other_role_restarts;
        self.refused_primary_starts += other.refused_primary_starts;
        self.split_brains.stay_apart += other.split_brains.stay_apart;
        self.split_brains.discard_backup += other.split_brains.discard_backup;
        self.split_brains.discard_primary += other.split_brains.discard_primary;
        self.operator_resolutions += other.operator_resolutions;
        self.completed_writes_discarded += other.completed_writes_discarded;
        self.canary_fenced_completions += other.canary_fenced_completions;
        self.folds += other.folds;
        self.resyncs += other.resyncs;
        self.resync_bytes += other.resync_bytes;
    }
}
