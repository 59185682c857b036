//! The node: the public handle ([`Mirror`]) and its pinned polling thread.
//!
//! Application threads call [`Mirror::submit`] / [`Mirror::write`]; a submission goes through the
//! lock-free [`mirror_ring`] to the poller, which is the only thread that touches the protocol core,
//! the queue, the connection, and (for writes) the region. Completions come back as one
//! cumulative watermark (tickets complete in order), which callers spin on briefly and then sleep
//! on. The poller busy-polls while there is work and for `idle_spin` after it, then sleeps in
//! `poll(2)` on the connection, the listener and an eventfd that submitters ring.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
pub use mirror_proto::core::VerifyReport;
use mirror_proto::{check_write, Payload, Phase, WireRole};
use mirror_ring::{Doorbell, Producer};
use mirror_storage::Region;

use crate::config::{Config, Role};
use crate::error::{MirrorError, Result};
use crate::stamps::{self, Point};

mod control;
pub mod events;
mod metrics;
mod open;
mod poller;

use control::NodeOps;

use poller::{poller_thread, Poller, Step};

/// Identifies a submitted write; tickets complete in the order they were issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// A snapshot of a node's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Primary or backup, now (a failover changes it).
    pub role: Role,
    /// Why this node stopped taking writes as a primary, if it was fenced (a newer primary
    /// exists) and has not been promoted since.
    pub fenced: Option<String>,
    /// This node's id (from its queue).
    pub node_id: u64,
    /// The node id of the peer it is bound to (0: none yet).
    pub peer_node_id: u64,
    /// Connection phase.
    pub phase: Phase,
    /// Next sequence number to be assigned (primary) or received (backup).
    pub next_seq: u64,
    /// Highest sequence number applied to this node's region.
    pub applied_through: u64,
    /// When `applied_through` last moved: the end of the poller's pass that moved it (`None`:
    /// not since the node opened).
    pub applied_at: Option<Instant>,
    /// Primary: highest sequence number the backup acknowledged. Backup: highest received.
    pub acked_through: u64,
    /// Highest sequence number the peer reported durably applied.
    pub peer_applied_through: u64,
    /// Records in this node's queue.
    pub queue_records: u64,
    /// Bytes used in this node's queue.
    pub queue_bytes: u64,
    /// Capacity of this node's queue.
    pub queue_capacity: u64,
    /// Primary: writes sent or held and not yet applied.
    pub in_flight: u64,
    /// Primary: applying writes without the backup (on_peer_loss = continue).
    pub degraded: bool,
    /// Completed recovery handshakes since the node opened.
    pub recoveries: u64,
    /// When the last of them completed: the start of the poller's pass that completed it
    /// (`None`: none yet). With [`Stats::applied_at`], a catch-up's duration as the node saw
    /// it, whenever the snapshot is read.
    pub last_recovery_at: Option<Instant>,
    /// Payload bytes moved by the last recovery (catch-up of the backup, or replay into a
    /// restarted primary). Never a copy of the region.
    pub last_recovery_bytes: u64,
    /// Records moved by the last recovery.
    pub last_recovery_records: u64,
    /// Tickets issued.
    pub writes_submitted: u64,
    /// Highest completed ticket.
    pub writes_completed: u64,
    /// Why the node failed, if it did.
    pub failure: Option<String>,
    /// The node's current term (a primary's: the term of its writes).
    pub current_term: u64,
    /// The address of the peer connection, if there is one.
    pub peer_address: Option<String>,
    /// The last divergent suffix this node dropped (backup), if any since it opened.
    pub last_divergence: Option<Divergence>,
    /// A split brain that keeps this node apart from its peer (see
    /// [`Mirror::resolve_split_brain`]), if the last handshake found one.
    pub split_brain: Option<String>,
    /// How this node authenticates its peers (see `Auth::describe`: `"secret"`, or why none).
    pub auth: &'static str,
    /// Chunks marked in the dirty-chunk bitmap: writes folded out of the queue while the
    /// backup was away (primary), or what a resync has yet to bring over.
    pub dirty_chunks: u64,
    /// The chunk size of the bitmap, resyncs and verifies.
    pub chunk_size: u64,
    /// A resync, initial sync or online verify in progress (primary).
    pub transfer: Option<TransferStats>,
    /// Backup: a resync or catch-up into this node has not finished (its region is inconsistent until it
    /// does; it is not promoted meanwhile).
    pub resync_target: bool,
}

/// A resync, an initial sync or an online verify in progress, for the stats (and, as is, the
/// `transfer` object of the control endpoint's `status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransferStats {
    /// `resync`, `initial-sync`, `verify` or `verify-repair`.
    pub kind: String,
    /// Chunks to go through (grows if writes fold into the bitmap meanwhile).
    pub chunks_total: u64,
    /// Chunks done.
    pub chunks_done: u64,
    /// Chunks found differing (a verify), or brought over (a resync).
    pub chunks_differing: u64,
    /// Bytes of region still to go through.
    pub bytes_left: u64,
    /// Chunk bytes sent to the backup.
    pub bytes_sent: u64,
    /// Bytes of region gone through per second, since it started.
    pub rate_bytes_per_s: u64,
    /// Seconds left at that rate (None: no rate yet).
    pub eta_s: Option<u64>,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
}

impl TransferStats {
    fn of(p: &mirror_proto::core::TransferProgress, now_us: u64) -> TransferStats {
        let elapsed_us = now_us.saturating_sub(p.started_us).max(1);
        let rate = (u128::from(p.bytes_done) * 1_000_000 / u128::from(elapsed_us)) as u64;
        TransferStats {
            kind: p.purpose.name().to_string(),
            chunks_total: p.chunks_total,
            chunks_done: p.chunks_done,
            chunks_differing: p.chunks_differing,
            bytes_left: p.bytes_left,
            bytes_sent: p.bytes_sent,
            rate_bytes_per_s: rate,
            eta_s: (rate > 0).then(|| p.bytes_left.div_ceil(rate)),
            elapsed_ms: elapsed_us / 1000,
        }
    }
}

/// A divergent suffix a backup dropped at a handshake: records a primary whose history is newer
/// never completed to any caller (see docs/PROTOCOL.md, "Log matching"), saved before they went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The common point: every dropped record had a higher seq.
    pub common_seq: u64,
    /// The last dropped seq.
    pub through_seq: u64,
    /// Records dropped.
    pub records: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Region bytes repaired from the primary (the ranges the records wrote, merged).
    pub repaired_bytes: u64,
    /// The file they were saved to (format: docs/FORMAT.md, "Discarded-records file").
    pub file: PathBuf,
}

struct Submission {
    offset: u64,
    /// The bytes, copied from the caller with their crc in one sweep (see `Payload`).
    data: Payload,
}

/// How a caller's drive of the loop ended (`Mirror::drive_while_waiting`).
enum Driven {
    /// The wait is over: when, if the step that ended it read the clock after itself.
    Settled(Option<Instant>),
    /// No progress for `idle_spin`: the polling thread takes over.
    GaveUp,
}

/// State shared by the handle, the callers and the poller.
struct Shared {
    /// Highest completed ticket. Written by the poller (Release, after the region write it
    /// completes), read by waiters (Acquire), so a caller that sees its ticket complete also sees
    /// the applied bytes in the region.
    completed: CachePadded<AtomicU64>,
    /// Set once; the reason is in `failure`.
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    shutdown: AtomicBool,
    /// Callers sleeping in `wait` (see the Dekker pairing in `notify_waiters`).
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
    /// Whether the polling thread sleeps (parked, or standing by while callers drive the
    /// loop: run to completion) and must be woken through `wake_fd`; the callers that drive;
    /// the submissions nobody waits for, which keep its standby short. Model-checked with the
    /// ring (`ring/tests/loom.rs`).
    doorbell: Doorbell,
    wake_fd: crate::transport::EventFd,
    stats: Mutex<Stats>,
    /// The node's role now (`ROLE_*`): written by the poller after a role change (Release),
    /// read by submitters (Acquire) to refuse writes on a backup at once.
    role: AtomicU8,
    /// Tickets that will never complete: the writes a primary had not completed when it stopped
    /// being one (demoted or fenced), and submissions that reached it afterwards.
    refused: Mutex<Vec<RefusedTickets>>,
    /// Highest refused ticket (0: none), so that waiters look at `refused` only when it can
    /// concern them. Written under the `refused` lock (Release), read by waiters (Acquire).
    refused_through: AtomicU64,
    /// Why the node was fenced, until it is promoted again.
    fenced: Mutex<Option<String>>,
    /// Whether `fenced` holds a reason (so that submitters need not take its lock).
    is_fenced: AtomicBool,
    /// Testing aid: kill the process before the next apply (see `arm_crash_before_next_apply`).
    #[cfg(feature = "fail-points")]
    crash_armed: Arc<AtomicBool>,
    /// The event stream's subscribers ([`Mirror::events`]).
    events: events::EventBus,
    /// What the metrics count beyond the stats (`metrics_listen`).
    counters: metrics::Counters,
    /// Online verifies that ended, and the last one's report (for [`Mirror::verify_online`]).
    verifies: Mutex<(u64, Option<mirror_proto::core::VerifyReport>)>,
    verify_done: Condvar,
}

/// A run of tickets that will never complete, and the error their callers get.
#[derive(Debug, Clone)]
struct RefusedTickets {
    from: u64,
    through: u64,
    /// `Some(reason)`: fenced; `None`: demoted by the operator.
    fenced: Option<String>,
}

/// Fewest unsent submissions a `submit` sends itself (see `submissions_make_a_half_window`):
/// a step costs a receive and a send system call, worth it for this many writes. Sending at
/// every 8 unsent writes whatever was in flight made pipelined 64 B at depth 64 slower than
/// not sending at all on this VM (0.62-0.79 M writes/s against 0.93-1.05 M).
const SUBMIT_SENDS_FROM: u64 = 16;

/// `Mirror::submit`'s rule on its snapshots (see `Mirror::submissions_make_a_half_window`):
/// `unsent` submissions not taken by the loop yet, `window` the writes outstanding when a
/// caller last began to wait, `in_flight` those taken and not completed (asked only once the
/// first two pass: it reads the completions' cache line).
fn half_window_unsent(unsent: u64, window: u64, in_flight: impl FnOnce() -> u64) -> bool {
    unsent >= SUBMIT_SENDS_FROM.max(window / 2) && unsent >= in_flight()
}

const ROLE_PRIMARY: u8 = 1;
const ROLE_BACKUP: u8 = 2;

impl Shared {
    fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            ROLE_PRIMARY => Role::Primary,
            _ => Role::Backup,
        }
    }

    fn set_role(&self, role: WireRole) {
        let code = match role {
            WireRole::Primary => ROLE_PRIMARY,
            WireRole::Backup => ROLE_BACKUP,
        };
        self.role.store(code, Ordering::Release);
    }

    /// Why the node is fenced, if it is. Every submission asks: a lock-free check first.
    fn fenced(&self) -> Option<String> {
        // Acquire: pairs with the Release in `set_fenced`, so the reason is there to read.
        if !self.is_fenced.load(Ordering::Acquire) {
            return None;
        }
        self.fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records (or, promoted again, clears) why the node is fenced.
    fn set_fenced(&self, reason: Option<String>) {
        let mut f = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        self.is_fenced.store(reason.is_some(), Ordering::Release);
        *f = reason;
    }

    /// Tickets `from..=through` will never complete; their waiters get the fenced error (with
    /// `fenced`) or the role error.
    fn refuse(&self, from: u64, through: u64, fenced: Option<String>) {
        if from > through {
            return;
        }
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.push(RefusedTickets {
            from,
            through,
            fenced,
        });
        // Release: a waiter that sees the new bound then finds the run under the lock.
        self.refused_through.fetch_max(through, Ordering::Release);
        drop(r);
        self.notify_waiters();
    }

    /// The error of a ticket that will never complete, if it is one.
    fn refusal(&self, ticket: u64) -> Option<MirrorError> {
        if ticket > self.refused_through.load(Ordering::Acquire) {
            return None;
        }
        let r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let run = r.iter().find(|t| (t.from..=t.through).contains(&ticket))?;
        Some(match &run.fenced {
            Some(reason) => MirrorError::Fenced {
                reason: reason.clone(),
            },
            None => MirrorError::WrongRole {
                role: Role::Backup,
                what: "completing a write (it was pending when the node was demoted)",
                needs: Role::Primary,
            },
        })
    }

    /// After a push, or anything else the polling thread must look at: wakes it if parked.
    fn wake_poller(&self) {
        if self.doorbell.must_ring_after_push() {
            self.wake_fd.signal();
        }
    }

    /// After a [`Mirror::submit`]: wakes a parked polling thread, or one in a long standby. A
    /// short standby (`STANDBY_MAX`) is not rung: the next caller that waits takes the write in
    /// its first step, and the thread within that standby if none does. (Ringing it whenever
    /// nothing was in flight cost pipelined writes at depth 8 a third of their rate: the thread
    /// woke onto the caller's CPU at every empty window.)
    fn wake_poller_for_submission(&self) {
        if self.doorbell.must_ring_after_submission() {
            self.wake_fd.signal();
        }
    }

    /// Wakes the polling thread whether parked or standing by for callers that drive the loop:
    /// a caller stopped driving before its write settled (it made no progress for
    /// `idle_spin`, or it failed).
    fn wake_poller_now(&self) {
        // The caller's count of driving callers dropped before this (its guard did).
        if self.doorbell.must_ring_after_giving_up() {
            self.wake_fd.signal();
        }
    }

    fn notify_waiters(&self) {
        // SeqCst fence pairs with the waiter's increment of `waiters` followed by its re-check of
        // `completed`/`failed`: either it sees our update, or we see it waiting and notify under
        // the lock (so the notification cannot fall between its check and its sleep).
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cond.notify_all();
        }
    }

    fn complete(&self, ticket: u64) {
        // Release: publishes the region writes of every ticket <= `ticket` to Acquire readers.
        self.completed.fetch_max(ticket, Ordering::Release);
        self.notify_waiters();
    }

    /// An online verify ended: its caller wakes.
    fn verify_finished(&self, report: mirror_proto::core::VerifyReport) {
        let mut v = self.verifies.lock().unwrap_or_else(|e| e.into_inner());
        v.0 += 1;
        v.1 = Some(report);
        self.verify_done.notify_all();
    }

    /// Waits for the verify after the `before`-th to end; None once the node fails or closes.
    fn wait_verify(&self, before: u64) -> Option<mirror_proto::core::VerifyReport> {
        let mut v = self.verifies.lock().unwrap_or_else(|e| e.into_inner());
        while v.0 <= before {
            if self.failed.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            // Timed: a node that fails or closes meanwhile does not notify this condvar.
            v = self
                .verify_done
                .wait_timeout(v, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        v.1.clone()
    }

    fn fail(&self, reason: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(%reason, "node failed");
            *f = Some(reason);
        }
        drop(f);
        self.failed.store(true, Ordering::Release);
        self.notify_waiters();
    }

    fn failure(&self) -> Option<MirrorError> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        let reason = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        Some(MirrorError::Failed { reason })
    }
}

/// A running node: a primary that takes writes, or a backup that serves one primary.
///
/// All methods take `&self`; `submit`, `write`, `wait`, `read` and `stats` may be called from many
/// threads at once.
pub struct Mirror {
    cfg: Config,
    shared: Arc<Shared>,
    region: Arc<Region>,
    producer: Option<Producer<Submission>>,
    /// The poller's state; the polling thread and, while they wait, callers run its steps.
    driver: Arc<Mutex<Poller>>,
    poller: Mutex<Option<JoinHandle<()>>>,
    /// Promote, demote, resolve: shared with the control endpoint.
    ops: Arc<NodeOps>,
    /// The local control endpoint (a Unix socket beside the queue), unless configured off.
    control: Mutex<Option<crate::control::ControlServer>>,
    /// The Prometheus endpoint (`metrics_listen`), if configured.
    metrics: Mutex<Option<metrics::MetricsServer>>,
    listen_addr: Option<SocketAddr>,
    /// Largest write: `max_write` from the config, capped by what one queue record can hold.
    max_write: usize,
    /// Writes outstanding (submitted, not completed) when a caller last began to wait for one:
    /// a pipelining caller's window, as `submit`'s half-window rule reads it.
    waited_window: AtomicU64,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("role", &self.shared.role())
            .field("region", &self.cfg.region)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// The configuration this node runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This node's role now (a failover changes it).
    pub fn role(&self) -> Role {
        self.shared.role()
    }

    /// The address this node listens on (useful with port 0): a backup's, and a primary's that
    /// has `listen` configured (for failover).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    fn check_usable(&self) -> Result<()> {
        self.ops.check_usable()
    }

    /// Submits a write and returns at once with its ticket (pipelining). The bytes are copied.
    ///
    /// When the submission ring is full this waits for room (backpressure), for at most
    /// `write_timeout` if one is configured.
    ///
    /// Under `caller_drives`, a caller that holds half its window unsent (and at least 16
    /// writes, and as many as are in flight) sends them itself: it takes one step of the loop
    /// here, if no other thread is taking one (microseconds; never a wait for the backup).
    pub fn submit(&self, offset: u64, data: &[u8]) -> Result<Ticket> {
        let ticket = self.push_submission(offset, data, true)?;
        if self.cfg.caller_drives && self.submissions_make_a_half_window() {
            let _driving = self.shared.doorbell.start_driving();
            let stepped = match self.driver.try_lock() {
                Ok(p) => Some(p),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                // Another thread steps the loop now: its next step takes these.
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if let Some(mut p) = stepped {
                self.caller_step(&mut p);
            }
        }
        Ok(ticket)
    }

    /// Whether the writes submitted and not yet taken by the loop make half the caller's
    /// window (the writes outstanding when a caller last began to wait), at least
    /// [`SUBMIT_SENDS_FROM`], and as many as those in flight (sent, not completed). A
    /// pipelining caller under `caller_drives` otherwise sends only when it waits: after an ack
    /// completes its window it submits the whole window again before its next wait sends it,
    /// and the two nodes take turns, each idle while the other works on the window (pipelined
    /// 64 B at depth 64 about 1.1 M writes/s on this 2-core VM, the backup making 24 empty
    /// receives for each that found data). Sending at half a window keeps one half on the
    /// wire, or in the backup's hands, while the caller fills the other. Without the window
    /// (sending whenever the unsent matched those in flight), a caller slower than the round
    /// trip (4 KiB at depth 256) kept few writes in flight and sent them ~19 at a time, at half
    /// the rate in some runs. Racy snapshots: a heuristic, not a guarantee; a wrong guess costs
    /// one step or one write's wait.
    fn submissions_make_a_half_window(&self) -> bool {
        let Some(producer) = self.producer.as_ref() else {
            return false;
        };
        let unsent = producer.len() as u64;
        // Relaxed (both): snapshots for the heuristic; no data is read through them.
        let window = self.waited_window.load(Ordering::Relaxed);
        half_window_unsent(unsent, window, || {
            let completed = self.shared.completed.load(Ordering::Relaxed);
            producer
                .pushed()
                .saturating_sub(unsent)
                .saturating_sub(completed)
        })
    }

    /// One step of the loop on a caller's thread: a panic in it fails the node rather than
    /// unwind into the caller. `None` after such a panic.
    fn caller_step(&self, p: &mut Poller) -> Option<Step> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.step())) {
            Ok(step) => Some(step),
            Err(_) => {
                self.shared.fail("poller step panicked (a bug)".into());
                None
            }
        }
    }

    /// Submits, waking a parked polling thread if `wake_poller` (a caller about to drive the
    /// loop itself, as [`Mirror::write`] does, takes the write in its own first step: a wake-up
    /// then only costs a system call and puts a third thread on two busy CPUs).
    fn push_submission(&self, offset: u64, data: &[u8], wake_poller: bool) -> Result<Ticket> {
        let producer = self.producer.as_ref().ok_or(MirrorError::Closed)?;
        check_write(offset, data.len(), self.cfg.region_size, self.max_write)?;
        self.check_writable()?;
        let mut item = Submission {
            offset,
            data: Payload::copy_from_slice(data),
        };
        let deadline = self.cfg.write_timeout.map(|t| Instant::now() + t);
        let mut spins = 0u32;
        loop {
            match producer.try_push(item) {
                Ok(position) => {
                    if wake_poller {
                        self.shared.wake_poller_for_submission();
                    }
                    // Relaxed: a count for the metrics, published by nothing else.
                    self.shared
                        .counters
                        .write_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Ok(Ticket(position + 1));
                }
                Err(back) => {
                    item = back;
                    self.check_writable()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(MirrorError::Timeout);
                    }
                    self.shared.wake_poller();
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            }
        }
    }

    /// Whether a write may be submitted now: the node is a primary, was not fenced, and runs.
    fn check_writable(&self) -> Result<()> {
        if let Some(reason) = self.shared.fenced() {
            return Err(MirrorError::Fenced { reason });
        }
        self.check_usable()?;
        match self.shared.role() {
            Role::Primary => Ok(()),
            role => Err(MirrorError::WrongRole {
                role,
                what: "writing",
                needs: Role::Primary,
            }),
        }
    }

    /// Waits until the write with this ticket (and every earlier one) is acknowledged by the
    /// backup and applied here. `None` waits for as long as it takes.
    ///
    /// On [`MirrorError::Timeout`] the write stays pending and may still complete; wait again.
    /// A write pending when the node stopped being a primary never completes: fenced (a newer
    /// primary exists), [`MirrorError::Fenced`]; demoted, [`MirrorError::WrongRole`]. Either
    /// way the new primary may hold it, if it received it before the failover (as with any
    /// write whose outcome was unknown when a connection broke).
    pub fn wait(&self, ticket: Ticket, timeout: Option<Duration>) -> Result<()> {
        self.wait_since(ticket, timeout, None).map(|_| ())
    }

    /// [`Mirror::wait`], for a caller that read the clock already (`started`, when it
    /// submitted: the wait's spin and timeout count from there). Returns when the write was
    /// seen settled, if a clock reading of that moment was at hand (a caller that drove the
    /// step that completed it), so that `write` needs no reading of its own: each is a few
    /// tens of nanoseconds on a write's path, and a system call where the clock source has no
    /// user-space reading.
    fn wait_since(
        &self,
        ticket: Ticket,
        timeout: Option<Duration>,
        started: Option<Instant>,
    ) -> Result<Option<Instant>> {
        let issued = self.producer.as_ref().map_or(0, |p| p.pushed());
        if ticket.0 == 0 || ticket.0 > issued {
            return Err(MirrorError::UnknownTicket {
                ticket: ticket.0,
                last: issued,
            });
        }
        // A refused ticket may lie below a later completion (the node was promoted again and
        // completes new tickets): look at the refusals first, and again whenever it wakes.
        let refused = || self.shared.refusal(ticket.0);
        let done = || self.shared.completed.load(Ordering::Acquire) >= ticket.0;
        if let Some(e) = refused() {
            return Err(e);
        }
        if done() {
            return Ok(None);
        }
        // Relaxed: a snapshot for `submissions_make_a_half_window`'s heuristic.
        let outstanding = issued.saturating_sub(self.shared.completed.load(Ordering::Relaxed));
        if self.waited_window.load(Ordering::Relaxed) != outstanding {
            self.waited_window.store(outstanding, Ordering::Relaxed);
        }
        let start = started.unwrap_or_else(Instant::now);
        let deadline = timeout.map(|t| start + t);
        let settled = || refused().is_some() || done();
        if self.cfg.caller_drives {
            let driven = self.drive_while_waiting(&settled, deadline, start);
            if !matches!(driven, Ok(Driven::Settled(_))) {
                // The polling thread takes over: `write` did not wake it for its submission.
                self.shared.wake_poller_now();
            }
            if let Driven::Settled(at) = driven? {
                return refused().map_or(Ok(at), Err);
            }
        }
        while start.elapsed() < self.cfg.wait_spin {
            if let Some(e) = refused() {
                return Err(e);
            }
            if done() {
                return Ok(None);
            }
            self.check_usable()?;
            std::hint::spin_loop();
        }
        self.shared.waiters.fetch_add(1, Ordering::Relaxed);
        // Pairs with the fence in `notify_waiters` (see there).
        fence(Ordering::SeqCst);
        let result = (|| {
            let mut guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(e) = refused() {
                    return Err(e);
                }
                if done() {
                    return Ok(None);
                }
                self.check_usable()?;
                let wait_for = match deadline {
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            return Err(MirrorError::Timeout);
                        }
                        (d - now).min(Duration::from_millis(50))
                    }
                    None => Duration::from_millis(50),
                };
                guard = self
                    .shared
                    .cond
                    .wait_timeout(guard, wait_for)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        })();
        self.shared.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Run to completion: the waiting caller runs the poller's steps itself (after the step of
    /// another thread in one), so that on a machine with few cores the caller, not a third
    /// thread, sends the write and takes the ack. Gives up after `idle_spin` without progress
    /// (the polling thread then takes over at once: `Shared::wake_poller_now`). `start` is when
    /// the wait began (for `write`, its start): the deadline and the idle time count from it,
    /// so a write that first waited longer than `idle_spin` for room in the submission ring
    /// gives up after one step without progress (the polling thread, awake for the backlog,
    /// takes over).
    fn drive_while_waiting(
        &self,
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
        start: Instant,
    ) -> Result<Driven> {
        let _driving = self.shared.doorbell.start_driving();
        let mut now = start;
        // `now` was read after the last step, which worked: it is when `done` is next checked.
        let mut read_after_work = false;
        let mut last_progress = now;
        let mut rang = false;
        loop {
            if done() {
                stamps::at(Point::WaitDone);
                return Ok(Driven::Settled(read_after_work.then_some(now)));
            }
            self.check_usable()?;
            if deadline.is_some_and(|d| now >= d) {
                return Err(MirrorError::Timeout);
            }
            if now.duration_since(last_progress) >= self.cfg.idle_spin {
                return Ok(Driven::GaveUp);
            }
            let mut p = match self.driver.try_lock() {
                Ok(p) => p,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                // Taken by the polling thread (it yields after its step: it sees this caller
                // counted) or by another caller: wait for it rather than spin. On two busy
                // CPUs a spinning caller keeps a preempted holder off the CPU it needs, and
                // gives up driving after `idle_spin`, which wakes the polling thread into the
                // same fight.
                Err(std::sync::TryLockError::WouldBlock) => poller::lock_poller(&self.driver),
            };
            match self.caller_step(&mut p) {
                // Idle time counts from the end of the last step that did work (a long
                // working step must not eat the spin budget).
                Some(Step::Worked) => {
                    now = Instant::now();
                    last_progress = now;
                    read_after_work = true;
                }
                // Otherwise the step's own clock reading is recent enough.
                Some(Step::Spinning | Step::Idle | Step::Stopped) => {
                    now = p.last_step_at;
                    read_after_work = false;
                }
                None => read_after_work = false,
            }
            drop(p);
            if !rang {
                // A polling thread parked with the connection in its poll set wakes inside
                // poll(2) at every ack this caller takes first, finds it gone and sleeps again,
                // each time on the CPU the peer's thread needs: writes it woke for took 30-45 µs
                // instead of 10, and set the p99 of back-to-back writes after a pause. Rung, it
                // stands by on its eventfd alone. Only after the first step, which sent the
                // write: rung before, it took the idle CPU just as the send woke a same-machine
                // peer's thread, which the kernel then queued behind this spinning caller (each
                // write 250-550 µs, for whole blocks).
                rang = true;
                self.shared.wake_poller();
            }
        }
    }

    /// Writes `data` at `offset` and returns once the backup acknowledged it and it is applied
    /// here (or, under `on_peer_loss = continue` while the backup is away, once it is queued and
    /// applied here). Waits at most `write_timeout` if one is configured.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let started = Instant::now();
        stamps::at(Point::WriteEntered);
        let ticket = self.push_submission(offset, data, !self.cfg.caller_drives)?;
        stamps::at(Point::Pushed);
        let settled_at = self.wait_since(ticket, self.cfg.write_timeout, Some(started))?;
        stamps::at(Point::WriteReturned);
        let settled_at = settled_at.unwrap_or_else(Instant::now);
        self.shared
            .counters
            .observe_write(settled_at.duration_since(started));
        Ok(())
    }

    /// Where the Prometheus metrics are served (`metrics_listen`; with port 0, the one bound).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.addr())
    }

    /// Promotes this backup to primary, live: it starts a new term (durable before its first
    /// write), connects to `peer`, and takes writes alone (`on_peer_loss = continue`) or once
    /// the other node rejoins as its backup (`block`). Returns the new term.
    ///
    /// Refused ([`MirrorError::Promote`]) on a primary, while a repair is in progress, and
    /// while connected to a live primary unless `force`: a forced promotion drops that
    /// connection, and the old primary is fenced at its first contact with this node (its
    /// pending and later writes fail with [`MirrorError::Fenced`]). Needs `peer` configured.
    ///
    /// The library never decides *when* to fail over (two nodes cannot tell a dead peer from
    /// a partition): an operator or a cluster manager calls this.
    pub fn promote(&self, force: bool) -> Result<u64> {
        self.ops.promote(force)
    }

    /// Online verify (primary): compares the checksum of every chunk (`chunk_size`) of this
    /// region with the backup's, while writes go on (each chunk is compared at the same point
    /// of the write stream on both nodes, so a write in flight is never taken for a
    /// difference), and returns the differing chunks. With `repair`, differing chunks are
    /// brought over from this node (as a resync would). Paced by `resync_rate`; progress is in
    /// [`Stats::transfer`]. Blocks until done.
    ///
    /// Fails with [`MirrorError::Verify`] when the backup is not connected and synchronous, a
    /// resync or verify is running, or the connection ends before every chunk was compared.
    pub fn verify_online(&self, repair: bool) -> Result<VerifyReport> {
        self.ops.verify_online(repair)
    }

    /// Demotes this primary to a backup, live: writes not completed fail
    /// ([`MirrorError::WrongRole`]), the connection to its backup ends, and it listens for the
    /// new primary, which repairs what of its log the new history lacks and catches it up.
    /// Needs `listen` configured.
    pub fn demote(&self) -> Result<()> {
        self.ops.demote()
    }

    /// Resolves a split brain by hand (the `disconnect` policy leaves it to an operator): the
    /// divergent writes of `discard_node` (this node's id or its peer's, as `mirror status`
    /// shows them) are discarded at the next handshake, saved to a file beside that node's queue
    /// first. The choice travels in this node's Hello, so running it on either node is enough.
    pub fn resolve_split_brain(&self, discard_node: u64) -> Result<()> {
        self.ops.resolve_split_brain(discard_node)
    }

    /// Copies region bytes out. A read that overlaps a write in progress may see part of it (as
    /// with any shared memory); bytes of completed writes are always seen.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.region.read(offset, buf)?)
    }

    /// The region's size in bytes.
    pub fn region_len(&self) -> u64 {
        self.region.len()
    }

    /// Start of the mapped region for zero-copy reads (`region_len` bytes, read-only to callers).
    /// The poller writes into it concurrently: reading bytes that a write in progress covers gives
    /// an unspecified mix of old and new bytes, never a fault.
    pub fn region_ptr(&self) -> *const u8 {
        self.region.as_ptr()
    }

    /// A snapshot of the node's counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.ops.stats();
        s.writes_submitted = self.producer.as_ref().map_or(0, |p| p.pushed());
        s
    }

    /// Subscribes to this node's events (see [`events::Event`]): every event from now on, in
    /// order, until the node closes. A subscriber that falls behind by more than
    /// [`events::EVENT_QUEUE_CAPACITY`] events is told how many it lost; it never slows the node.
    pub fn events(&self) -> Result<events::Events> {
        self.shared
            .events
            .subscribe()
            .map_err(|source| MirrorError::Io {
                context: "creating an event subscription".into(),
                source,
            })
    }

    /// Stops the poller (after its current pass) and releases the files. Writes not completed by
    /// then fail with [`MirrorError::Closed`]; what they queued stays in the queue and is recovered
    /// at the next open. Idempotent.
    pub fn close(&self) -> Result<()> {
        // No operator request arrives while the node goes.
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = control {
            if let Err(e) = c.stop() {
                tracing::warn!(error = %e, "stopping the control endpoint");
            }
        }
        drop(
            self.metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.shared.shutdown.store(true, Ordering::Release);
        // Whether parked, standing by or about to sleep: it sees `shutdown` once awake.
        self.shared.wake_fd.signal();
        self.shared.notify_waiters();
        let handle = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take();
        let joined = handle.map(|h| h.join());
        self.shared.events.close();
        if let Some(Err(_)) = joined {
            return Err(MirrorError::Failed {
                reason: "poller thread panicked".into(),
            });
        }
        Ok(())
    }

    /// Testing aid for crash tests and the demo: the node kills its own process (SIGKILL) just
    /// before its next apply. On a primary in synchronous mode that is the instant after the
    /// backup acknowledged a write and before the primary applied it. Only in builds with the
    /// cargo feature `fail-points` (tests and the demo), never in a release build.
    #[cfg(feature = "fail-points")]
    #[doc(hidden)]
    pub fn arm_crash_before_next_apply(&self) {
        self.shared.crash_armed.store(true, Ordering::Relaxed);
        self.shared.wake_poller();
    }

    /// Waits until the node is mirroring synchronously (connected and recovered), for at most
    /// `timeout`. Useful for tests and demos.
    pub fn wait_synchronous(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_usable()?;
            if self.stats().phase == Phase::Synchronous {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MirrorError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Reads the queue file of a node that is not running and reports what it holds (for `mirror status`).
pub fn inspect(queue: &Path) -> Result<mirror_storage::QueueInfo> {
    Ok(mirror_storage::inspect_queue(queue)?)
}

#[cfg(test)]
mod half_window_tests {
    use super::half_window_unsent;

    #[test]
    fn a_caller_sends_half_its_window_and_never_fewer_than_sixteen() {
        // No window seen yet (or a synchronous writer's, 1): 16 unsent writes go.
        assert!(!half_window_unsent(15, 0, || 0));
        assert!(half_window_unsent(16, 0, || 0));
        assert!(half_window_unsent(16, 1, || 0));
        // A window of 64: its half, 32, and not sooner.
        assert!(!half_window_unsent(31, 64, || 0));
        assert!(half_window_unsent(32, 64, || 32));
        // A window of 256 whose acks came back fast (few in flight): still its half, not
        // small halves of what is in flight (4 KiB writes at depth 256 ran at half the rate).
        assert!(!half_window_unsent(20, 256, || 19));
        assert!(half_window_unsent(128, 256, || 20));
        // More in flight than unsent: the wire is busy; wait for the half to build up.
        assert!(!half_window_unsent(32, 64, || 40));
        // Below the threshold the writes in flight are not even asked for.
        assert!(!half_window_unsent(8, 0, || unreachable!(
            "asked below the threshold"
        )));
    }
}
