//! Opening a node: recover its queue and region, build the protocol core from what they hold,
//! bind the listener (backup), and start the polling thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_utils::CachePadded;
use mirror_proto::CoreConfig;
use mirror_ring::{Doorbell, SubmitRing};
use mirror_storage::{Durability, PersistentQueue, QueueParams, Region};

use crate::config::{Config, Role, TransportKind};
use crate::error::{MirrorError, Result};
use crate::transport::auth::AuthContext;
use crate::transport::tcp::{Security, TcpAcceptor};
use crate::transport::tls::TlsContext;
use crate::transport::{Listener, TransportError};

use super::poller::{Knock, NodeHooks};
use super::*;
use mirror_exec::Executor;

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
        // Checked before any file is touched: a missing, loose or short secret is a clear error
        // naming its key.
        let auth = match &cfg.auth {
            crate::config::Auth::Secret {
                secret_file,
                accept_secret_file,
            } => Some(Arc::new(
                AuthContext::new(secret_file.clone(), accept_secret_file.clone())
                    .map_err(MirrorError::Config)?,
            )),
            crate::config::Auth::Disabled => {
                tracing::warn!(
                    listen = ?cfg.listen,
                    peer = ?cfg.peer,
                    "auth = none: peers are not authenticated; anyone who reaches these addresses can write into the region"
                );
                None
            }
            crate::config::Auth::Loopback | crate::config::Auth::TlsOnly => None,
        };
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(TlsContext::new(t).map_err(MirrorError::Config)?)),
            None => None,
        };
        let rejected = Arc::new(AtomicU64::new(0));
        let security = Security {
            auth: auth.clone(),
            tls,
            rejected: Some(Arc::clone(&rejected)),
        };
        let storage_role = match cfg.role {
            Role::Primary => mirror_storage::Role::Primary,
            Role::Backup => mirror_storage::Role::Backup,
        };
        let wire_role = match cfg.role {
            Role::Primary => mirror_proto::WireRole::Primary,
            Role::Backup => mirror_proto::WireRole::Backup,
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
        // The configured role decides (a queue's role is state: a failover changes it), except
        // that a node superseded as a primary never takes writes as one again by a restart.
        if cfg.role == Role::Primary && queue.superseded() {
            return Err(MirrorError::Fenced {
                reason: format!(
                    "queue {}: this node was a primary superseded by a newer primary (it knows term {}); it takes no writes as a primary: start it as a backup to rejoin the new primary, and promote it once it has rejoined",
                    cfg.queue.display(),
                    queue.current_term()
                ),
            });
        }
        if cfg.role == Role::Primary {
            if let Some(primary) = bitmap_resync_target(&cfg.queue)? {
                return Err(MirrorError::Promote(mirror_proto::PromoteError::NotCaughtUp {
                    why: format!(
                        "queue {}: a resync or catch-up into this node from primary {primary:#x} began and did not finish (its region is part old, part new): start it as a backup so that it finishes, then promote it",
                        cfg.queue.display()
                    ),
                }));
            }
            if let Some(common) = mirror_storage::unfinished_repair(&queue) {
                return Err(MirrorError::Promote(mirror_proto::PromoteError::NotCaughtUp {
                    why: format!(
                        "queue {}: a repair of its divergent suffix after seq {common} began and did not finish (its region holds part of a primary's bytes while its log still holds the suffix): start it as a backup so that a primary finishes the repair, then promote it",
                        cfg.queue.display()
                    ),
                }));
            }
        }
        if queue.role() != storage_role {
            tracing::warn!(
                queue = %cfg.queue.display(),
                was = ?queue.role(),
                now = %cfg.role,
                "the queue was last used in the other role; the configuration decides"
            );
        }
        queue.set_role(storage_role, queue.superseded())?;
        let replay = queue.replay_state()?;
        if let Some(after) = replay.renumbered_after {
            tracing::warn!(
                queue = %cfg.queue.display(),
                cut_through = after,
                "records cut from the queue were already applied to the region; renumbering after them"
            );
        }
        let max_write = cfg.max_write.min(queue.max_payload());
        let core_cfg = CoreConfig {
            node_id: queue.node_id(),
            region_size: cfg.region_size,
            queue_format_version: mirror_storage::FORMAT_VERSION,
            on_peer_loss: cfg.on_peer_loss,
            on_fenced: cfg.on_fenced,
            after_split_brain: cfg.after_split_brain,
            ack_timeout_us: cfg.ack_timeout.as_micros() as u64,
            handshake_timeout_us: cfg.handshake_timeout.as_micros() as u64,
            sync_queue_before_ack: cfg.durability != Durability::Process,
            max_write_len: max_write,
            queue_capacity: queue.capacity_bytes(),
            // Commits are checkpointed, not made per batch: in `power`/`pmem` each would cost
            // a region sync on top of the ack's queue sync, in `process` a metadata write on
            // every synchronous write's path (see `Executor::checkpoint_due` for the pacing).
            deferred_commit: true,
            chunk_size: cfg.chunk_size,
            resync_rate: cfg.resync_rate,
            initial_sync: cfg.initial_sync,
        };
        let geometry =
            mirror_proto::ChunkGeometry::new(cfg.region_size, cfg.chunk_size).map_err(|e| {
                MirrorError::Config(crate::error::ConfigError::BadValue {
                    key: "chunk_size".into(),
                    value: cfg.chunk_size.to_string(),
                    why: e.to_string(),
                })
            })?;
        let (bitmap, bitmap_report) = mirror_storage::DirtyBitmap::open_or_create(
            &mirror_storage::bitmap_path(&cfg.queue),
            queue.node_id(),
            geometry,
            cfg.durability,
        )?;
        if bitmap_report.pages_rebuilt > 0 || bitmap_report.state_rebuilt {
            tracing::warn!(
                bitmap = %bitmap.path().display(),
                pages_rebuilt = bitmap_report.pages_rebuilt,
                state_rebuilt = bitmap_report.state_rebuilt,
                "parts of the dirty-chunk bitmap did not verify (a torn write or a damaged disk): their chunks are taken as dirty, and the next resync compares them"
            );
        }
        #[cfg(feature = "fail-points")]
        let crash_armed = Arc::new(AtomicBool::new(false));
        let hooks = NodeHooks {
            #[cfg(feature = "fail-points")]
            crash_before_apply_seq: cfg.crash_before_apply_seq,
            #[cfg(feature = "fail-points")]
            crash_armed: Arc::clone(&crash_armed),
        };
        let role = match cfg.role {
            Role::Primary => mirror_exec::Role::Primary,
            Role::Backup => mirror_exec::Role::Backup,
        };
        let exec = Executor::with_replay(
            role,
            core_cfg,
            queue,
            replay,
            region.writer()?,
            Box::new(bitmap),
            hooks,
        );
        if let Some(a) = &auth {
            a.set_identity(exec.queue.node_id(), exec.queue.peer_node_id());
        }
        let (acceptor, listen_addr) = match cfg.listen {
            Some(addr) => {
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
                        let mut a = TcpAcceptor::bind(addr).map_err(listening)?;
                        a.require(security.clone(), cfg.handshake_timeout)
                            .map_err(listening)?;
                        let bound = a.local_addr().map_err(local)?;
                        (Box::new(a), bound)
                    }
                    #[cfg(feature = "rdma")]
                    TransportKind::Rdma => {
                        use crate::transport::rdma::{RdmaAcceptor, RdmaSettings};
                        let mut a = RdmaAcceptor::bind(addr, RdmaSettings::from_config(&cfg))
                            .map_err(listening)?;
                        if let Some(ctx) = &auth {
                            a.require_auth(Arc::clone(ctx));
                        }
                        let bound = a.local_addr().map_err(local)?;
                        tracing::info!(device = %a.describe, "RDMA transport");
                        (Box::new(a), bound)
                    }
                    #[cfg(not(feature = "rdma"))]
                    TransportKind::Rdma => unreachable!("refused at the top of open"),
                };
                (Some(acceptor), Some(bound))
            }
            None => (None, None),
        };
        let wake_fd = crate::transport::EventFd::new().map_err(|source| MirrorError::Io {
            context: "creating the poller's eventfd".into(),
            source,
        })?;
        // Either role has the ring: a backup can be promoted live.
        let (producer, consumer) = SubmitRing::with_capacity(cfg.submit_ring).map_err(|e| {
            MirrorError::Config(crate::error::ConfigError::BadValue {
                key: "submit_ring".into(),
                value: cfg.submit_ring.to_string(),
                why: e.to_string(),
            })
        })?;
        let (producer, consumer) = (Some(producer), Some(consumer));
        let stats = Stats {
            role: cfg.role,
            fenced: None,
            node_id: exec.queue.node_id(),
            peer_node_id: exec.queue.peer_node_id(),
            phase: exec.core.phase(),
            next_seq: exec.queue.next_seq(),
            applied_through: exec.queue.applied_through(),
            applied_at: None,
            acked_through: 0,
            peer_applied_through: 0,
            queue_records: exec.queue.len_records(),
            queue_bytes: exec.queue.used_bytes(),
            queue_capacity: exec.queue.capacity_bytes(),
            in_flight: 0,
            degraded: false,
            recoveries: 0,
            last_recovery_at: None,
            last_recovery_bytes: 0,
            last_recovery_records: 0,
            writes_submitted: 0,
            writes_completed: 0,
            failure: None,
            current_term: exec.queue.current_term(),
            last_divergence: None,
            split_brain: None,
            peer_address: None,
            auth: crate::config::describe_security(&cfg.auth, cfg.tls.as_ref()),
            dirty_chunks: exec.core.stats().dirty_chunks,
            chunk_size: cfg.chunk_size,
            transfer: None,
            resync_target: exec.core.stats().resync_target,
        };
        let shared = Arc::new(Shared {
            completed: CachePadded::new(AtomicU64::new(0)),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            doorbell: Doorbell::new(),
            wake_fd,
            stats: Mutex::new(stats),
            role: AtomicU8::new(match cfg.role {
                Role::Primary => ROLE_PRIMARY,
                Role::Backup => ROLE_BACKUP,
            }),
            refused: Mutex::new(Vec::new()),
            refused_through: AtomicU64::new(0),
            fenced: Mutex::new(None),
            is_fenced: AtomicBool::new(false),
            #[cfg(feature = "fail-points")]
            crash_armed,
            events: super::events::EventBus::default(),
            counters: super::metrics::Counters::with_rejected(rejected),
            verifies: Mutex::new((0, None)),
            verify_done: Condvar::new(),
        });
        tracing::info!(
            role = %cfg.role,
            node_id = format_args!("{:#x}", exec.queue.node_id()),
            next_seq = exec.queue.next_seq(),
            applied_through = exec.queue.applied_through(),
            recovered_records = report.records,
            "node opened"
        );
        let poller = Poller {
            cfg: cfg.clone(),
            exec,
            shared: Arc::clone(&shared),
            consumer,
            stash: None,
            conn: None,
            connecting: None,
            acceptor,
            security,
            pending: Vec::new(),
            actions: Vec::new(),
            inbox: Vec::new(),
            start: Instant::now(),
            last_work: Instant::now(),
            last_stats: Instant::now(),
            last_step_at: Instant::now(),
            stopped: false,
            next_connect_at_us: 0,
            knocked: false,
            knock: if cfg.role == Role::Backup && cfg.peer.is_some() && cfg.listen.is_some() {
                Knock::Due
            } else {
                Knock::Done
            },
            next_accept_at_us: 0,
            last_divergence: None,
            catch_up: None,
            conn_peer: mirror_proto::PeerId(0),
            recoveries_seen: 0,
            submitted: 0,
            published_role: wire_role,
            published_degraded: false,
            published_next_seq: 0,
            published_connection: None,
            auth_failure_logged_at: None,
            split_brain_reported: false,
            folding: false,
            transfer_published: false,
            transfer_progress_at: None,
            send_before_own_append: false,
            peer_lost_published: None,
            hello_checked: None,
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
        let ops = Arc::new(NodeOps {
            shared: Arc::clone(&shared),
            driver: Arc::clone(&driver),
            can_dial: cfg.peer.is_some(),
            can_listen: listen_addr.is_some(),
        });
        // After the queue's lock: no other node uses this socket path.
        let control = if cfg.control_socket {
            let path = crate::control::control_socket_path(&cfg.queue);
            let target: Arc<dyn crate::control::ControlTarget> = ops.clone();
            match crate::control::ControlServer::start(&path, target) {
                Ok(server) => Some(server),
                Err(e) => {
                    tracing::warn!(error = %e, "no control endpoint: `mirror promote`, `demote`, `resolve` and `status --live` cannot reach this node (the Rust and C APIs can)");
                    None
                }
            }
        } else {
            None
        };
        let metrics_listen = cfg.metrics_listen;
        let auth = crate::config::describe_security(&cfg.auth, cfg.tls.as_ref());
        let mirror = Mirror {
            cfg,
            shared,
            region,
            producer,
            driver,
            poller: Mutex::new(Some(handle)),
            ops: Arc::clone(&ops),
            control: Mutex::new(control),
            metrics: Mutex::new(None),
            listen_addr,
            max_write,
            waited_window: AtomicU64::new(0),
        };
        if let Some(addr) = metrics_listen {
            let scrape = move || super::metrics::render(&ops.stats(), &ops.shared.counters, auth);
            match super::metrics::MetricsServer::start(addr, scrape) {
                Ok(server) => {
                    tracing::info!(addr = %server.addr(), "metrics at http://{}/metrics", server.addr());
                    *mirror.metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
                }
                Err(source) => {
                    let _ = mirror.close();
                    return Err(MirrorError::Io {
                        context: format!("serving metrics on {addr} (metrics_listen)"),
                        source,
                    });
                }
            }
        }
        Ok(mirror)
    }
}

/// The primary a resync into this node began from and did not finish, as the node's
/// dirty-chunk bitmap says (none without a bitmap file yet).
fn bitmap_resync_target(queue: &std::path::Path) -> Result<Option<u64>> {
    match mirror_storage::inspect_bitmap(&mirror_storage::bitmap_path(queue)) {
        Ok(info) => Ok(info.resync_target),
        Err(mirror_storage::StorageError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
