//! The node: the public handle ([`Mirror`]) and its pinned polling thread.
//!
//! Application threads call [`Mirror::submit`] / [`Mirror::write`]; a submission goes through the
//! lock-free [`mirror_ring`] to the poller, which is the only thread that touches the protocol core,
//! the queue, the connection, and (for writes) the region. Completions come back as one
//! cumulative watermark (tickets complete in order), which callers spin on briefly and then sleep
//! on. The poller busy-polls while there is work and for `idle_spin` after it, then sleeps in
//! `poll(2)` on the connection, the listener and an eventfd that submitters ring.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use mirror_proto::{check_write, Phase};
use mirror_ring::Producer;
use mirror_storage::Region;

use crate::config::{Config, Role};
use crate::error::{MirrorError, Result};

mod open;
mod poller;

use poller::{poller_thread, CallerDriving, Poller, Step};

/// Identifies a submitted write; tickets complete in the order they were issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// A snapshot of a node's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Primary or backup.
    pub role: Role,
    /// Connection phase.
    pub phase: Phase,
    /// Next sequence number to be assigned (primary) or received (backup).
    pub next_seq: u64,
    /// Highest sequence number applied to this node's region.
    pub applied_through: u64,
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
    /// The last divergent suffix this node dropped (backup), if any since it opened.
    pub last_divergence: Option<Divergence>,
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
    data: Bytes,
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
    /// The poller sleeps in poll(2); submitters must ring `wake_fd` (Dekker pairing with the ring).
    poller_sleeping: AtomicBool,
    wake_fd: OwnedFd,
    stats: Mutex<Stats>,
    /// Testing aid: kill the process before the next apply (see `arm_crash_before_next_apply`).
    #[cfg(feature = "fail-points")]
    crash_armed: Arc<AtomicBool>,
    /// Callers currently running the poller's loop themselves (run to completion).
    callers_driving: AtomicUsize,
}

impl Shared {
    fn wake_poller(&self) {
        // SeqCst fence pairs with the one in the poller's park path: either the poller sees our
        // push in the ring, or we see its `poller_sleeping = true` and ring the eventfd.
        fence(Ordering::SeqCst);
        if self.poller_sleeping.load(Ordering::Relaxed) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own; the result is ignored
            // on purpose (EAGAIN means the counter is already non-zero, i.e. already woken).
            unsafe {
                libc::write(
                    self.wake_fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
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
    listen_addr: Option<SocketAddr>,
    /// Largest write: `max_write` from the config, capped by what one queue record can hold.
    max_write: usize,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("role", &self.cfg.role)
            .field("region", &self.cfg.region)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// The configuration this node runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Backup: the address it listens on (useful with port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(MirrorError::Closed);
        }
        Ok(())
    }

    /// Submits a write and returns at once with its ticket (pipelining). The bytes are copied.
    ///
    /// When the submission ring is full this waits for room (backpressure), for at most
    /// `write_timeout` if one is configured.
    pub fn submit(&self, offset: u64, data: &[u8]) -> Result<Ticket> {
        let producer = self.producer.as_ref().ok_or(MirrorError::WrongRole {
            role: self.cfg.role,
            what: "writing",
            needs: Role::Primary,
        })?;
        check_write(offset, data.len(), self.cfg.region_size, self.max_write)?;
        self.check_usable()?;
        let mut item = Submission {
            offset,
            data: Bytes::copy_from_slice(data),
        };
        let deadline = self.cfg.write_timeout.map(|t| Instant::now() + t);
        let mut spins = 0u32;
        loop {
            match producer.try_push(item) {
                Ok(position) => {
                    self.shared.wake_poller();
                    return Ok(Ticket(position + 1));
                }
                Err(back) => {
                    item = back;
                    self.check_usable()?;
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

    /// Waits until the write with this ticket (and every earlier one) is acknowledged by the
    /// backup and applied here. `None` waits for as long as it takes.
    ///
    /// On [`MirrorError::Timeout`] the write stays pending and may still complete; wait again.
    pub fn wait(&self, ticket: Ticket, timeout: Option<Duration>) -> Result<()> {
        let issued = self.producer.as_ref().map_or(0, |p| p.pushed());
        if ticket.0 == 0 || ticket.0 > issued {
            return Err(MirrorError::UnknownTicket {
                ticket: ticket.0,
                last: issued,
            });
        }
        let done = || self.shared.completed.load(Ordering::Acquire) >= ticket.0;
        if done() {
            return Ok(());
        }
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        if self.cfg.caller_drives && self.drive_while_waiting(&done, deadline)? {
            return Ok(());
        }
        while start.elapsed() < self.cfg.wait_spin {
            if done() {
                return Ok(());
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
                if done() {
                    return Ok(());
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

    /// Run to completion: the waiting caller runs the poller's steps itself (when no other thread
    /// is in one), so that on a machine with few cores the caller, not a third thread, sends the
    /// write and takes the ack. Gives up after `idle_spin` without progress (the polling thread
    /// then takes over). Returns whether `done` became true.
    fn drive_while_waiting(
        &self,
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        self.shared.callers_driving.fetch_add(1, Ordering::AcqRel);
        let _driving = CallerDriving(&self.shared);
        let mut now = Instant::now();
        let mut last_progress = now;
        let mut spins = 0u32;
        loop {
            if done() {
                return Ok(true);
            }
            self.check_usable()?;
            if deadline.is_some_and(|d| now >= d) {
                return Err(MirrorError::Timeout);
            }
            if now.duration_since(last_progress) >= self.cfg.idle_spin {
                return Ok(false);
            }
            if let Ok(mut p) = self.driver.try_lock() {
                let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.step()));
                match step {
                    // Idle time counts from the end of the last step that did work (a long
                    // working step must not eat the spin budget).
                    Ok(Step::Worked) => {
                        now = Instant::now();
                        last_progress = now;
                    }
                    // Otherwise the step's own clock reading is recent enough.
                    Ok(Step::Spinning | Step::Idle | Step::Stopped) => now = p.last_step_at,
                    Err(_) => self.shared.fail("poller step panicked (a bug)".into()),
                }
            } else {
                std::hint::spin_loop();
                spins += 1;
                if spins % 64 == 0 {
                    now = Instant::now();
                }
            }
        }
    }

    /// Writes `data` at `offset` and returns once the backup acknowledged it and it is applied
    /// here (or, under `on_peer_loss = continue` while the backup is away, once it is queued and
    /// applied here). Waits at most `write_timeout` if one is configured.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let ticket = self.submit(offset, data)?;
        self.wait(ticket, self.cfg.write_timeout)
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
        let mut s = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.writes_completed = self.shared.completed.load(Ordering::Acquire);
        s.writes_submitted = self.producer.as_ref().map_or(0, |p| p.pushed());
        if let Some(MirrorError::Failed { reason }) = self.shared.failure() {
            s.failure = Some(reason);
            s.phase = Phase::Failed;
        }
        s
    }

    /// Stops the poller (after its current pass) and releases the files. Writes not completed by
    /// then fail with [`MirrorError::Closed`]; what they queued stays in the queue and is recovered
    /// at the next open. Idempotent.
    pub fn close(&self) -> Result<()> {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.poller_sleeping.store(true, Ordering::Relaxed);
        self.shared.wake_poller();
        self.shared.notify_waiters();
        let handle = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                return Err(MirrorError::Failed {
                    reason: "poller thread panicked".into(),
                });
            }
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
