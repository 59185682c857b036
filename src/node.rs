//! The node: the public handle ([`Mirror`]) and its pinned polling thread.
//!
//! Application threads call [`Mirror::submit`] / [`Mirror::write`]; a submission goes through the
//! lock-free [`mirror_ring`] to the poller, which is the only thread that touches the protocol core,
//! the queue, the connection, and (for writes) the region. Completions come back as one
//! cumulative watermark (tickets complete in order), which callers spin on briefly and then sleep
//! on. The poller busy-polls while there is work and for `idle_spin` after it, then sleeps in
//! `poll(2)` on the connection, the listener and an eventfd that submitters ring.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use mirror_proto::handshake::{merged_ranges, repair_pieces, repair_requests};
use mirror_proto::{
    check_write, Action, Backup, Core, CoreConfig, Message, Phase, Primary, RegionRange, RejectCode,
};
use mirror_ring::{Consumer, Producer, SubmitRing};
use mirror_storage::{
    discarded_path, save_discarded, DiscardedRecord, Durability, PersistentQueue, QueueParams,
    Region, StorageError,
};

use crate::config::{Config, Role, TransportKind};
use crate::error::{MirrorError, Result};
use crate::transport::tcp::{TcpAcceptor, TcpConnecting};
use crate::transport::{Connecting, Connection, Listener, TransportError};

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
    crash_armed: AtomicBool,
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
    /// Opens the node's queue and region (recovering them after a crash) and starts its poller.
    ///
    /// A backup binds its listen address before this returns. A primary connects in the
    /// background; until the backup answers, writes wait (`block`) or proceed degraded
    /// (`continue`).
    pub fn open(cfg: Config) -> Result<Mirror> {
        #[cfg(not(feature = "rdma"))]
        if cfg.transport == TransportKind::Rdma {
            return Err(MirrorError::Unsupported(
                "transport 'rdma' is not available in this build: build with `--features rdma` (needs libibverbs-dev, librdmacm-dev and libclang), or use 'tcp'".into(),
            ));
        }
        #[cfg(feature = "rdma")]
        if cfg.transport == TransportKind::Rdma && cfg.role == Role::Primary {
            // The backup checks its device when it binds; the primary connects in the background,
            // so check its device here: a wrong name or a port that is down is a clear error at
            // open, not a primary that silently never connects.
            let s = crate::transport::rdma::RdmaSettings::from_config(&cfg);
            let found = crate::transport::rdma::probe(&s).map_err(|e| MirrorError::Io {
                context: "opening the RDMA device".into(),
                source: std::io::Error::other(e),
            })?;
            tracing::info!(device = %found, "RDMA transport");
        }
        let storage_role = match cfg.role {
            Role::Primary => mirror_storage::Role::Primary,
            Role::Backup => mirror_storage::Role::Backup,
        };
        let params = QueueParams {
            node_id: loop {
                let id = fastrand::u64(..);
                if id != 0 {
                    break id;
                }
            },
            role: storage_role,
            region_size: cfg.region_size,
            capacity_bytes: cfg.queue_size,
        };
        let (queue, report) = PersistentQueue::open_or_create(&cfg.queue, &params, cfg.durability)?;
        if report.torn_tail_cut_bytes > 0 {
            tracing::warn!(
                queue = %cfg.queue.display(),
                cut_bytes = report.torn_tail_cut_bytes,
                "cut records from the queue's tail that did not verify (appends not yet durable when the node stopped, or torn); the peer replays any of them it holds, and a new term tells new writes at those seqs apart"
            );
        }
        let region = Arc::new(Region::open_or_create(
            &cfg.region,
            cfg.region_size,
            cfg.durability,
        )?);
        let mut queue = queue;
        let replay = queue.replay_state()?;
        if let Some(after) = replay.renumbered_after {
            tracing::warn!(
                queue = %cfg.queue.display(),
                cut_through = after,
                "records cut from the queue were already applied to the region; renumbering after them"
            );
        }
        let recovered = mirror_proto::Recovered::from(replay);
        let max_write = cfg.max_write.min(queue.max_payload());
        let core_cfg = CoreConfig {
            node_id: queue.node_id(),
            region_size: cfg.region_size,
            queue_format_version: mirror_storage::FORMAT_VERSION,
            on_peer_loss: cfg.on_peer_loss,
            ack_timeout_us: cfg.ack_timeout.as_micros() as u64,
            handshake_timeout_us: cfg.handshake_timeout.as_micros() as u64,
            sync_queue_before_ack: cfg.durability != Durability::Process,
            max_write_len: max_write,
            queue_capacity: queue.capacity_bytes(),
            // In `power`/`pmem`, syncing the region per batch would cost a system call per
            // batch on top of the ack's queue sync: commits are checkpointed instead.
            deferred_commit: cfg.durability != Durability::Process,
        };
        let core = match cfg.role {
            Role::Primary => Core::Primary(Primary::new(core_cfg, recovered)),
            Role::Backup => Core::Backup(Backup::new(core_cfg, recovered)),
        };
        let (acceptor, listen_addr) =
            match cfg.role {
                Role::Backup => {
                    let addr = cfg.listen.ok_or(MirrorError::Config(
                        crate::error::ConfigError::Missing { key: "listen" },
                    ))?;
                    let listening = |e: TransportError| MirrorError::Io {
                        context: format!("listening on {addr}"),
                        source: std::io::Error::other(e.to_string()),
                    };
                    let local = |e: TransportError| MirrorError::Io {
                        context: "reading the listen address".into(),
                        source: std::io::Error::other(e.to_string()),
                    };
                    let (acceptor, bound): (Box<dyn Listener>, SocketAddr) = match cfg.transport {
                        TransportKind::Tcp => {
                            let a = TcpAcceptor::bind(addr).map_err(listening)?;
                            let bound = a.local_addr().map_err(local)?;
                            (Box::new(a), bound)
                        }
                        #[cfg(feature = "rdma")]
                        TransportKind::Rdma => {
                            use crate::transport::rdma::{RdmaAcceptor, RdmaSettings};
                            let a = RdmaAcceptor::bind(addr, RdmaSettings::from_config(&cfg))
                                .map_err(listening)?;
                            let bound = a.local_addr().map_err(local)?;
                            tracing::info!(device = %a.describe, "RDMA transport");
                            (Box::new(a), bound)
                        }
                        #[cfg(not(feature = "rdma"))]
                        TransportKind::Rdma => unreachable!("refused at the top of open"),
                    };
                    (Some(acceptor), Some(bound))
                }
                Role::Primary => (None, None),
            };
        // SAFETY: eventfd(2) with valid flags; we check the result before wrapping it.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(MirrorError::Io {
                context: "creating the poller's eventfd".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `efd` is a fresh, valid file descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let (producer, consumer) = match cfg.role {
            Role::Primary => {
                let (p, c) = SubmitRing::with_capacity(cfg.submit_ring).map_err(|e| {
                    MirrorError::Config(crate::error::ConfigError::BadValue {
                        key: "submit_ring".into(),
                        value: cfg.submit_ring.to_string(),
                        why: e.to_string(),
                    })
                })?;
                (Some(p), Some(c))
            }
            Role::Backup => (None, None),
        };
        let stats = Stats {
            role: cfg.role,
            phase: core.phase(),
            next_seq: queue.next_seq(),
            applied_through: queue.applied_through(),
            acked_through: 0,
            peer_applied_through: 0,
            queue_records: queue.len_records(),
            queue_bytes: queue.used_bytes(),
            queue_capacity: queue.capacity_bytes(),
            in_flight: 0,
            degraded: false,
            recoveries: 0,
            last_recovery_bytes: 0,
            last_recovery_records: 0,
            writes_submitted: 0,
            writes_completed: 0,
            failure: None,
            current_term: queue.current_term(),
            last_divergence: None,
        };
        let shared = Arc::new(Shared {
            completed: CachePadded::new(AtomicU64::new(0)),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            poller_sleeping: AtomicBool::new(false),
            wake_fd,
            stats: Mutex::new(stats),
            crash_armed: AtomicBool::new(false),
            callers_driving: AtomicUsize::new(0),
        });
        tracing::info!(
            role = %cfg.role,
            node_id = format_args!("{:#x}", queue.node_id()),
            next_seq = queue.next_seq(),
            applied_through = queue.applied_through(),
            recovered_records = report.records,
            "node opened"
        );
        let poller = Poller {
            cfg: cfg.clone(),
            core,
            queue,
            region: Arc::clone(&region),
            shared: Arc::clone(&shared),
            consumer,
            stash: None,
            conn: None,
            connecting: None,
            acceptor,
            pending: Vec::new(),
            actions: Vec::new(),
            inbox: Vec::new(),
            start: Instant::now(),
            last_work: Instant::now(),
            last_stats: Instant::now(),
            last_step_at: Instant::now(),
            stopped: false,
            next_connect_at_us: 0,
            next_accept_at_us: 0,
            commit_pending: None,
            last_checkpoint_us: 0,
            recovery_bytes: 0,
            recovery_records: 0,
            last_divergence: None,
            catch_up: None,
            recoveries_seen: 0,
            submitted: 0,
        };
        let driver = Arc::new(Mutex::new(poller));
        let cpu = cfg.cpu;
        let thread_driver = Arc::clone(&driver);
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("mirror-{}", cfg.role))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!(cpu, "could not pin the poller to this CPU");
                    }
                }
                let shared = Arc::clone(&thread_shared);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    poller_thread(thread_driver, thread_shared);
                }));
                if result.is_err() {
                    shared.fail("poller thread panicked (a bug)".into());
                }
            })
            .map_err(|source| MirrorError::Io {
                context: "starting the poller thread".into(),
                source,
            })?;
        Ok(Mirror {
            cfg,
            shared,
            region,
            producer,
            driver,
            poller: Mutex::new(Some(handle)),
            listen_addr,
            max_write,
        })
    }

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
    /// backup acknowledged a write and before the primary applied it.
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

/// Largest number of messages taken from the connection per pass.
const RECV_BATCH: usize = 512;
/// Largest number of submissions taken from the ring per pass.
const SUBMIT_BATCH: usize = 256;
/// During a catch-up, hand queued records to the network in chunks of about this size.
const CATCH_UP_CHUNK: usize = 256 << 10;
/// Stop taking submissions while this much is waiting to be sent.
const SEND_BACKLOG_PAUSE: usize = 8 << 20;
/// `power`/`pmem`: the longest a durable-applied checkpoint waits while the node is busy.
const CHECKPOINT_INTERVAL_US: u64 = 2_000;
/// A new connection must say Hello within this time.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

struct Poller {
    cfg: Config,
    core: Core,
    queue: PersistentQueue,
    region: Arc<Region>,
    shared: Arc<Shared>,
    consumer: Option<Consumer<Submission>>,
    /// A submission taken from the ring that did not fit in the queue yet.
    stash: Option<(u64, Submission)>,
    conn: Option<Box<dyn Connection>>,
    /// Primary over TCP: a connection attempt in progress, and when it gives up (us).
    connecting: Option<(Box<dyn Connecting>, u64)>,
    acceptor: Option<Box<dyn Listener>>,
    pending: Vec<(Box<dyn Connection>, Instant)>,
    actions: Vec<Action>,
    inbox: Vec<Message>,
    start: Instant,
    last_work: Instant,
    last_stats: Instant,
    /// When the current (or last) step read the clock.
    last_step_at: Instant,
    /// Set when a step failed the node.
    stopped: bool,
    next_connect_at_us: u64,
    /// Backup: next time to look for new connections while one is established.
    next_accept_at_us: u64,
    /// `power`/`pmem`: applied through this seq, not yet checkpointed.
    commit_pending: Option<u64>,
    last_checkpoint_us: u64,
    recovery_bytes: u64,
    recovery_records: u64,
    last_divergence: Option<Divergence>,
    /// A catch-up (or replay) being streamed to the peer.
    catch_up: Option<CatchUp>,
    recoveries_seen: u64,
    submitted: u64,
}

/// A stream of queued records to the peer that goes on across passes, and what the core sent
/// after it (which must follow it on the connection).
struct CatchUp {
    next_seq: u64,
    through_seq: u64,
    behind: VecDeque<Outgoing>,
}

/// Something the core sent while a catch-up was being streamed.
enum Outgoing {
    Message(Message),
    Queued { from_seq: u64, through_seq: u64 },
}

/// Why a pass stopped the node.
enum Stop {
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
    fn step(&mut self) -> Step {
        if self.stopped {
            return Step::Stopped;
        }
        // The clock is read once per pass (it showed up at ~10 % of a pipelined profile when read
        // several times per pass).
        let t = Instant::now();
        self.last_step_at = t;
        let now = t.duration_since(self.start).as_micros() as u64;
        self.core.set_now(now);
        let worked = match self.pass(now) {
            Ok(w) => w,
            Err(Stop::Fatal(reason)) => {
                self.core.fail();
                self.conn = None;
                self.stopped = true;
                self.publish_stats();
                self.shared.fail(reason);
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
            Step::Worked
        } else if t.duration_since(self.last_work) >= self.cfg.idle_spin {
            Step::Idle
        } else {
            Step::Spinning
        }
    }

    fn shutdown(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            let _ = c.flush();
        }
        if let Err(e) = self.queue.sync() {
            tracing::warn!(error = %e, "final queue sync failed");
        }
        if let Err(Stop::Fatal(e)) = self.checkpoint(0) {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
        self.publish_stats();
        self.shared.notify_waiters();
    }

    /// One pass of the event loop. Returns whether anything happened.
    fn pass(&mut self, now: u64) -> Result<bool, Stop> {
        let mut worked = false;
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
        if self.catch_up.is_some() {
            let mut broken = None;
            worked |= self.continue_catch_up(&mut broken)?;
            if let Some(why) = broken {
                self.drop_connection(&why);
                worked = true;
            }
        }
        let mut no_room = false;
        if self.cfg.role == Role::Backup {
            // Take writes only while the queue has room for them. The primary's headroom covers
            // its own queue; ours can hold more (records the primary already trimmed while its
            // applied report to us is in flight). Rather than fail, drop the connection: the
            // primary reconnects, its Hello lets us trim, and the catch-up resends the rest.
            let full_at = self
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
        for msg in self.inbox.drain(..) {
            self.core.on_message(msg);
        }
        if no_room {
            self.drop_connection(
                "the queue has no room for the next write (it trims after the reconnect)",
            );
            worked = true;
        }
        worked |= self.take_submissions()?;
        if !worked {
            self.core.on_tick();
        }
        self.core.end_batch();
        worked |= self.execute_actions()?;
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.flush() {
                self.drop_connection(&e.to_string());
                worked = true;
            }
        }
        // Actions from a dropped connection (e.g. degraded applies) run in the same pass.
        worked |= self.execute_actions()?;
        if self.checkpoint_due(now, worked) {
            self.checkpoint(now)?;
            worked |= self.execute_actions()?;
        }
        Ok(worked)
    }

    /// `power`/`pmem`: whether to make pending applies durable now — every
    /// `CHECKPOINT_INTERVAL_US`, as soon as the node is idle, or when the queue is half full
    /// (trims wait for checkpoints).
    fn checkpoint_due(&self, now: u64, worked: bool) -> bool {
        self.commit_pending.is_some()
            && (!worked
                || now.saturating_sub(self.last_checkpoint_us) >= CHECKPOINT_INTERVAL_US
                || self.queue.used_bytes() > self.queue.capacity_bytes() / 2)
    }

    /// Syncs the region, then records `applied_through` with a full barrier of the queue (which
    /// also makes every earlier append durable, keeping `last_seq >= applied_through` on disk),
    /// and tells the core: only now may the peer trim what we applied.
    fn checkpoint(&mut self, now: u64) -> Result<(), Stop> {
        if let Some(through) = self.commit_pending.take() {
            self.region.sync()?;
            self.queue.set_applied_through(through)?;
            self.core.on_applied_durable(through);
            self.last_checkpoint_us = now;
        }
        Ok(())
    }

    fn drop_connection(&mut self, why: &str) {
        self.catch_up = None;
        if let Some(c) = self.conn.take() {
            tracing::warn!(peer = %c.peer(), reason = why, "connection lost");
        }
        self.core.on_disconnected();
    }

    fn manage_connection(&mut self, now: u64) -> bool {
        match self.cfg.role {
            Role::Primary => {
                if self.conn.is_some() || self.core.phase() != Phase::Disconnected {
                    return false;
                }
                if let Some((attempt, deadline_us)) = self.connecting.as_mut() {
                    let failure = match attempt.poll() {
                        Ok(Some(c)) => {
                            tracing::info!(peer = %c.peer(), "connected to backup");
                            self.connecting = None;
                            self.conn = Some(c);
                            self.core.on_connected();
                            return true;
                        }
                        Ok(None) if now < *deadline_us => return false,
                        Ok(None) => "no answer in time".to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::debug!(peer = ?self.cfg.peer, error = %failure, "backup not reachable");
                    self.connecting = None;
                    self.core.on_connect_failed();
                    return true;
                }
                if now < self.next_connect_at_us {
                    return false;
                }
                self.next_connect_at_us = now + self.cfg.reconnect_interval.as_micros() as u64;
                let peer = self.cfg.peer.clone().unwrap_or_default();
                match start_connecting(&self.cfg, &peer) {
                    Ok(attempt) => {
                        let deadline = now + self.cfg.handshake_timeout.as_micros() as u64;
                        self.connecting = Some((attempt, deadline));
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "backup not reachable");
                        self.core.on_connect_failed();
                    }
                }
                true
            }
            Role::Backup => self.accept_and_greet(now),
        }
    }

    /// Backup: accepts new connections and adopts one once its Hello passes the checks. A Hello
    /// from the primary already connected (same node id) replaces the old connection (the
    /// primary restarted or its link broke); any other is refused without disturbing it.
    fn accept_and_greet(&mut self, now: u64) -> bool {
        let mut worked = false;
        // accept(2) is a system call: while connected, look for newcomers every millisecond
        // rather than on every pass, so the data path's receive loop stays tight (a restarted
        // primary waits that much longer; its handshake takes longer anyway).
        let accept_due = self.conn.is_none() || now >= self.next_accept_at_us;
        if let Some(acceptor) = self.acceptor.as_mut().filter(|_| accept_due) {
            self.next_accept_at_us = now + ACCEPT_INTERVAL_CONNECTED_US;
            loop {
                match acceptor.try_accept() {
                    Ok(Some(c)) => {
                        tracing::info!(peer = %c.peer(), "incoming connection");
                        self.pending.push((c, Instant::now() + HELLO_DEADLINE));
                        worked = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let mut first = Vec::new();
            let result = self.pending[i].0.poll_recv(&mut first, 1);
            match result {
                Ok(0) if Instant::now() < self.pending[i].1 => {
                    i += 1;
                    continue;
                }
                Ok(0) => {
                    let (c, _) = self.pending.swap_remove(i);
                    tracing::warn!(peer = %c.peer(), "no Hello in time; closing");
                }
                Ok(_) => {
                    let (mut c, _) = self.pending.swap_remove(i);
                    worked = true;
                    let Core::Backup(backup) = &self.core else {
                        unreachable!("only backups accept")
                    };
                    let verdict = match first.first() {
                        Some(Message::Hello(h)) => backup.check_hello(h),
                        Some(other) => Err((
                            RejectCode::ProtocolViolation,
                            format!("first message was {:?}, expected Hello", other.kind()),
                        )),
                        None => unreachable!("poll_recv returned 1"),
                    };
                    match verdict {
                        Ok(()) => {
                            if let Some(old) = self.conn.take() {
                                tracing::info!(old = %old.peer(), new = %c.peer(), "primary reconnected; replacing its old connection");
                                self.core.on_disconnected();
                            }
                            self.core.on_connected();
                            for m in first {
                                self.core.on_message(m);
                            }
                            self.conn = Some(c);
                        }
                        Err((code, reason)) => {
                            tracing::warn!(peer = %c.peer(), ?code, %reason, "refusing connection");
                            let _ = c.send(&Message::Reject { code, reason });
                            let _ = c.flush();
                        }
                    }
                }
                Err(e) => {
                    let (c, _) = self.pending.swap_remove(i);
                    tracing::warn!(peer = %c.peer(), error = %e, "bad first bytes; closing");
                    let code = match e {
                        TransportError::Wire(mirror_proto::WireError::UnsupportedVersion {
                            ..
                        }) => Some(RejectCode::ProtocolVersion),
                        TransportError::Wire(_) => Some(RejectCode::ProtocolViolation),
                        _ => None,
                    };
                    if let Some(code) = code {
                        let mut c = c;
                        let _ = c.send(&Message::Reject {
                            code,
                            reason: e.to_string(),
                        });
                        let _ = c.flush();
                    }
                }
            }
        }
        worked
    }

    fn take_submissions(&mut self) -> Result<bool, Stop> {
        if self.consumer.is_none() {
            return Ok(false);
        }
        let mut worked = false;
        for _ in 0..SUBMIT_BATCH {
            if !self.core.accepts_submissions() {
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
            if !self.queue.admits_new_write(sub.data.len()) {
                // Backpressure until the backup confirms applying and we can trim.
                self.stash = Some((position, sub));
                break;
            }
            let ticket = position + 1;
            debug_assert_eq!(ticket, self.submitted + 1, "tickets out of order");
            self.submitted = ticket;
            // Validated in `submit`; a failure here would be a bug, which stops the node.
            self.core
                .submit(ticket, sub.offset, sub.data)
                .map_err(|e| Stop::Fatal(format!("submission refused by the core: {e}")))?;
            worked = true;
            // Execute as we go so that queue space is accounted for the next submission.
            self.execute_actions()?;
        }
        Ok(worked)
    }

    fn execute_actions(&mut self) -> Result<bool, Stop> {
        let mut actions = std::mem::take(&mut self.actions);
        self.core.drain_actions(&mut actions);
        let worked = !actions.is_empty();
        let mut broken: Option<String> = None;
        for action in actions.drain(..) {
            match action {
                Action::Send(msg) => self.send_in_order(msg, &mut broken),
                Action::SendQueued {
                    from_seq,
                    through_seq,
                } => self.send_queued(from_seq, through_seq, &mut broken)?,
                Action::Append { record, recovery } => {
                    match self
                        .queue
                        .append(record.seq, record.term, record.offset, &record.data)
                    {
                        Ok(()) => {}
                        Err(StorageError::Full { needed, free }) => {
                            return Err(Stop::Fatal(format!(
                                "queue {} is full ({needed} bytes needed, {free} free); a backup's queue_size must be at least its primary's",
                                self.cfg.queue.display()
                            )))
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if recovery {
                        self.recovery_bytes += record.data.len() as u64;
                        self.recovery_records += 1;
                    }
                }
                Action::SyncQueue => {
                    // Hand what this pass sends to the network first: a primary's own sync then
                    // overlaps the round trip to the backup instead of adding to it.
                    if let Some(c) = self.conn.as_mut() {
                        if let Err(e) = c.flush() {
                            broken.get_or_insert(e.to_string());
                        }
                    }
                    self.queue.sync()?
                }
                Action::PersistTerm { term } => self.queue.set_current_term(term)?,
                Action::RequestRepair { after, through } => {
                    self.save_divergent_suffix(after, through, &mut broken)?
                }
                Action::SendRegion { ranges } => self.send_region(&ranges, &mut broken)?,
                Action::RepairRegion { offset, data } => {
                    self.region.write(offset, &data)?;
                    self.recovery_bytes += data.len() as u64;
                }
                Action::TruncateAfter { after } => {
                    // The repaired ranges must be durable before the records that explain them
                    // leave the queue (a crash in between redoes the whole repair).
                    if self.cfg.durability != Durability::Process {
                        self.region.sync()?;
                    }
                    self.queue.truncate_after(after)?;
                    tracing::warn!(
                        common_seq = after,
                        "dropped this backup's divergent suffix; the primary's records follow"
                    );
                }
                Action::Apply(record) => {
                    if self.cfg.crash_before_apply_seq == Some(record.seq)
                        || self.shared.crash_armed.load(Ordering::Relaxed)
                    {
                        tracing::warn!(
                            seq = record.seq,
                            "fail point: killing this process before applying"
                        );
                        // SAFETY: kill(2) on our own pid with a valid signal number.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    }
                    self.region.write(record.offset, &record.data)?;
                }
                Action::CommitApplied { through } => {
                    if self.cfg.durability == Durability::Process {
                        // The page cache keeps it across a process crash: durable as written.
                        self.queue.set_applied_through(through)?;
                    } else {
                        // Checkpointed soon (see `checkpoint`), not per batch.
                        self.commit_pending = Some(through);
                    }
                }
                Action::Trim { through } => self.queue.trim_through(through)?,
                Action::BindPeer { node_id } => {
                    tracing::info!(peer = format_args!("{node_id:#x}"), "bound to peer");
                    self.queue.set_peer_node_id(node_id)?;
                }
                Action::Complete { ticket } => self.shared.complete(ticket),
                Action::Disconnect(fault) => {
                    broken.get_or_insert(fault.to_string());
                }
                Action::Reject { code, reason } => {
                    if let Some(c) = self.conn.as_mut() {
                        let _ = c.send(&Message::Reject {
                            code,
                            reason: reason.clone(),
                        });
                        let _ = c.flush();
                    }
                    broken.get_or_insert(format!("rejected peer ({code:?}): {reason}"));
                }
                Action::RecoveryStarted => {
                    self.recovery_bytes = 0;
                    self.recovery_records = 0;
                }
                Action::Fatal(e) => return Err(Stop::Fatal(e.to_string())),
            }
        }
        self.actions = actions;
        if let Some(why) = broken {
            self.drop_connection(&why);
        }
        Ok(worked)
    }

    /// Saves the divergent suffix `(after, through]` durably beside the queue, then asks the
    /// primary for the current bytes of every range it wrote.
    fn save_divergent_suffix(
        &mut self,
        after: u64,
        through: u64,
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        let mut records = Vec::new();
        for rec in self.queue.iter_from(after + 1) {
            let rec = rec?;
            if rec.seq > through {
                break;
            }
            records.push(DiscardedRecord {
                seq: rec.seq,
                term: rec.term,
                region_offset: rec.offset,
                payload: rec.payload.to_vec(),
            });
        }
        if records.len() as u64 != through - after {
            return Err(Stop::Fatal(format!(
                "queue {} lacks records of its divergent suffix ({after}, {through}]",
                self.cfg.queue.display()
            )));
        }
        let saved_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let file = discarded_path(&self.cfg.queue, after, saved_unix_ms);
        save_discarded(&file, self.queue.node_id(), after, saved_unix_ms, &records)?;
        let ranges = merged_ranges(
            records
                .iter()
                .map(|r| (r.region_offset, r.payload.len() as u64)),
        );
        let divergence = Divergence {
            common_seq: after,
            through_seq: through,
            records: records.len() as u64,
            bytes: records.iter().map(|r| r.payload.len() as u64).sum(),
            repaired_bytes: ranges.iter().map(|r| r.len).sum(),
            file,
        };
        tracing::warn!(
            common_seq = after,
            through_seq = through,
            records = divergence.records,
            bytes = divergence.bytes,
            file = %divergence.file.display(),
            "this backup's queue diverges from the primary's newer history after the common point: saved the divergent records; repairing their byte ranges from the primary"
        );
        self.last_divergence = Some(divergence);
        if let Some(c) = self.conn.as_mut() {
            for m in repair_requests(&ranges) {
                if let Err(e) = c.send(&m) {
                    broken.get_or_insert(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Sends the current bytes of `ranges` (a backup repairing a divergent suffix).
    fn send_region(
        &mut self,
        ranges: &[RegionRange],
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        for (offset, len) in repair_pieces(ranges) {
            let mut data = vec![0u8; len as usize];
            self.region.read(offset, &mut data)?;
            self.recovery_bytes += len;
            if let Err(e) = conn.send(&Message::RepairData {
                offset,
                data: Bytes::from(data),
            }) {
                broken.get_or_insert(e.to_string());
                return Ok(());
            }
        }
        Ok(())
    }

    /// Starts streaming the queue's records `from_seq..=through_seq` to the peer (a catch-up or
    /// a replay). The stream is resumable: it stops whenever the send buffer is over
    /// `SEND_BACKLOG_PAUSE` and goes on in later passes, so a slow peer never holds the poller
    /// (and a caller driving it); what the core sends meanwhile waits behind it, in order.
    fn send_queued(
        &mut self,
        from_seq: u64,
        through_seq: u64,
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        if self.conn.is_none() {
            return Ok(());
        }
        match self.catch_up.as_mut() {
            // The core streams one catch-up per connection; one that follows waits its turn.
            Some(c) => c.behind.push_back(Outgoing::Queued {
                from_seq,
                through_seq,
            }),
            None => {
                self.catch_up = Some(CatchUp {
                    next_seq: from_seq,
                    through_seq,
                    behind: VecDeque::new(),
                })
            }
        }
        self.continue_catch_up(broken).map(|_| ())
    }

    /// Sends `msg`, or queues it behind a catch-up in progress.
    fn send_in_order(&mut self, msg: Message, broken: &mut Option<String>) {
        if let Some(c) = self.catch_up.as_mut() {
            c.behind.push_back(Outgoing::Message(msg));
        } else if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.send(&msg) {
                broken.get_or_insert(e.to_string());
            }
        }
    }

    /// Hands more of the catch-up in progress to the network, then what waits behind it.
    /// Returns whether it sent anything.
    fn continue_catch_up(&mut self, broken: &mut Option<String>) -> Result<bool, Stop> {
        let mut worked = false;
        while let Some(c) = self.catch_up.as_mut() {
            let Some(conn) = self.conn.as_mut() else {
                self.catch_up = None;
                break;
            };
            if c.next_seq <= c.through_seq {
                for rec in self.queue.iter_from(c.next_seq) {
                    let rec = rec?;
                    if rec.seq != c.next_seq || rec.seq > c.through_seq {
                        break;
                    }
                    // Stream: hand each chunk to the network as it is encoded (the peer works
                    // on it meanwhile), and stop while the peer lags (resumed next pass).
                    if conn.pending_send_bytes() > CATCH_UP_CHUNK {
                        if let Err(e) = conn.flush() {
                            broken.get_or_insert(e.to_string());
                            return Ok(worked);
                        }
                        if conn.pending_send_bytes() > SEND_BACKLOG_PAUSE {
                            return Ok(worked);
                        }
                    }
                    if let Err(e) = conn.send_write(rec.seq, rec.term, rec.offset, rec.payload) {
                        broken.get_or_insert(e.to_string());
                        return Ok(worked);
                    }
                    worked = true;
                    self.recovery_bytes += rec.payload.len() as u64;
                    self.recovery_records += 1;
                    c.next_seq += 1;
                }
                if c.next_seq <= c.through_seq {
                    return Err(Stop::Fatal(format!(
                        "queue {} lacks record {} needed to catch up the peer (through {})",
                        self.cfg.queue.display(),
                        c.next_seq,
                        c.through_seq
                    )));
                }
            }
            match c.behind.pop_front() {
                Some(Outgoing::Message(m)) => {
                    worked = true;
                    if let Err(e) = conn.send(&m) {
                        broken.get_or_insert(e.to_string());
                        return Ok(worked);
                    }
                }
                Some(Outgoing::Queued {
                    from_seq,
                    through_seq,
                }) => {
                    c.next_seq = from_seq;
                    c.through_seq = through_seq;
                }
                None => self.catch_up = None,
            }
        }
        Ok(worked)
    }

    fn publish_stats(&mut self) {
        let core = self.core.stats();
        if core.recoveries != self.recoveries_seen {
            self.recoveries_seen = core.recoveries;
            tracing::info!(
                records = self.recovery_records,
                bytes = self.recovery_bytes,
                "recovery complete: moved only the missed requests"
            );
        }
        let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.phase = self.core.phase();
        s.next_seq = core.next_seq;
        s.applied_through = core.applied_through;
        s.acked_through = core.acked_through;
        s.peer_applied_through = core.peer_applied_through;
        s.queue_records = self.queue.len_records();
        s.queue_bytes = self.queue.used_bytes();
        s.in_flight = core.in_flight;
        s.degraded = core.degraded;
        s.recoveries = core.recoveries;
        s.last_recovery_bytes = self.recovery_bytes;
        s.last_recovery_records = self.recovery_records;
        s.current_term = core.current_term;
        s.last_divergence.clone_from(&self.last_divergence);
    }

    /// Prepares to sleep: announces it to submitters and returns the descriptors to sleep on, or
    /// `None` when there is work after all.
    fn prepare_park(&mut self) -> Option<Vec<libc::pollfd>> {
        self.shared.poller_sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `wake_poller`.
        fence(Ordering::SeqCst);
        let has_submissions = self.stash.is_none()
            && self
                .consumer
                .as_ref()
                .is_some_and(|c| !c.is_empty() && self.core.accepts_submissions());
        // A catch-up waits for the peer to drain the send buffer: wake when it has room. Over
        // RDMA room shows up in memory (credits), not on a descriptor: poll again instead.
        let catch_up_ready = match (&self.catch_up, &self.conn) {
            (Some(_), Some(c)) => c.send_ready_fd().map(Some),
            _ => Some(None),
        };
        if has_submissions
            || self.shared.shutdown.load(Ordering::Acquire)
            || catch_up_ready.is_none()
        {
            self.shared.poller_sleeping.store(false, Ordering::Relaxed);
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
        Some(fds)
    }
}

/// How often a connected backup looks for new connections (see `accept_and_greet`).
const ACCEPT_INTERVAL_CONNECTED_US: u64 = 1_000;

/// What one [`Poller::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Something happened.
    Worked,
    /// Nothing happened, within the idle spin.
    Spinning,
    /// Nothing happened for longer than the idle spin: time to sleep.
    Idle,
    /// The node failed.
    Stopped,
}

/// Sleeps in poll(2) on `fds` (the first is the wake eventfd) for at most `timeout_ms`, then
/// clears the wake-up and the sleeping flag.
fn sleep_on(shared: &Shared, fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    let mut counter = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd (clears it).
    unsafe {
        libc::read(
            shared.wake_fd.as_raw_fd(),
            (&mut counter as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    shared.poller_sleeping.store(false, Ordering::Relaxed);
}

fn lock_poller(driver: &Mutex<Poller>) -> std::sync::MutexGuard<'_, Poller> {
    // A panic inside a step marks the node failed before unwinding; the state is not used again
    // for anything but shutdown.
    driver.lock().unwrap_or_else(|e| e.into_inner())
}

/// The polling thread: runs steps while no caller drives the loop itself, sleeps when idle.
fn poller_thread(driver: Arc<Mutex<Poller>>, shared: Arc<Shared>) {
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            lock_poller(&driver).shutdown();
            return;
        }
        if shared.callers_driving.load(Ordering::Acquire) > 0 {
            // A waiting caller runs the loop (run to completion): stay off its CPU, but check
            // back soon in case it stops.
            let mut fds = [libc::pollfd {
                fd: shared.wake_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            sleep_on(&shared, &mut fds, 1);
            continue;
        }
        let mut p = lock_poller(&driver);
        let park = loop {
            if shared.shutdown.load(Ordering::Acquire)
                || shared.callers_driving.load(Ordering::Acquire) > 0
            {
                break None;
            }
            match p.step() {
                Step::Stopped => return,
                Step::Idle => {
                    if let Some(fds) = p.prepare_park() {
                        break Some(fds);
                    }
                }
                Step::Worked | Step::Spinning => {}
            }
        };
        drop(p);
        if let Some(mut fds) = park {
            // Wake at least every 5 ms for timers (ack timeout, reconnects, stats).
            sleep_on(&shared, &mut fds, 5);
        }
    }
}

/// Counts a caller that drives the loop; the count drops when the guard does.
struct CallerDriving<'a>(&'a Shared);

impl Drop for CallerDriving<'_> {
    fn drop(&mut self) {
        self.0.callers_driving.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts connecting to the backup over the configured transport (never blocks; the caller
/// bounds the attempt with `handshake_timeout`).
fn start_connecting(cfg: &Config, peer: &str) -> Result<Box<dyn Connecting>, TransportError> {
    match cfg.transport {
        TransportKind::Tcp => Ok(Box::new(TcpConnecting::start(peer)?)),
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => Ok(Box::new(crate::transport::rdma::RdmaConnecting::start(
            peer,
            crate::transport::rdma::RdmaSettings::from_config(cfg),
        )?)),
        #[cfg(not(feature = "rdma"))]
        TransportKind::Rdma => Err(TransportError::Io {
            context: "connecting over RDMA",
            source: std::io::Error::other(
                "the RDMA transport is not built (build with --features rdma)",
            ),
        }),
    }
}

/// Reads the queue file of a node that is not running and reports what it holds (for `mirror status`).
pub fn inspect(queue: &Path) -> Result<mirror_storage::QueueInfo> {
    Ok(mirror_storage::inspect_queue(queue)?)
}
