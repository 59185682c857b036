//! The node's role operations (promote, demote, resolve a split brain), one implementation for
//! the Rust API ([`Mirror`]) and the local control endpoint (`mirror promote`, `mirror status
//! --live`, ...; see `crate::control` and docs/CONTROL.md).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::control::{ControlRefusal, ControlTarget, DiscardNode, LiveStatus, Promoted};
use crate::error::{ConfigError, MirrorError, Result};
use crate::ffi::error_code;

use super::poller::{lock_poller, Poller};
use super::{Mirror, Shared, Stats};

/// What the role operations need of a node: its shared state and its poller, not the handle
/// (the control endpoint holds this, and the handle holds the endpoint).
pub(super) struct NodeOps {
    pub(super) shared: Arc<Shared>,
    pub(super) driver: Arc<Mutex<Poller>>,
    /// `peer` is configured: the node can connect to a backup as a primary.
    pub(super) can_dial: bool,
    /// `listen` is bound: the node can be reached as a backup.
    pub(super) can_listen: bool,
}

impl NodeOps {
    /// The node runs: not failed, not closing.
    pub(super) fn check_usable(&self) -> Result<()> {
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(MirrorError::Closed);
        }
        Ok(())
    }

    /// Runs `f` on the poller's state between two passes: the polling thread yields the state
    /// to a caller that announces itself (as a caller that drives the loop does).
    fn with_poller<T>(&self, f: impl FnOnce(&mut Poller) -> T) -> T {
        let _driving = self.shared.doorbell.start_driving();
        self.shared.wake_poller();
        let mut p = lock_poller(&self.driver);
        f(&mut p)
    }

    pub(super) fn promote(&self, force: bool) -> Result<u64> {
        self.check_usable()?;
        if !self.can_dial {
            return Err(MirrorError::Config(ConfigError::Missing { key: "peer" }));
        }
        self.with_poller(|p| p.promote(force))
    }

    pub(super) fn demote(&self) -> Result<()> {
        self.check_usable()?;
        if !self.can_listen {
            return Err(MirrorError::Config(ConfigError::Missing { key: "listen" }));
        }
        self.with_poller(|p| p.demote())
    }

    pub(super) fn verify_online(&self, repair: bool) -> Result<super::VerifyReport> {
        self.check_usable()?;
        let before = self
            .shared
            .verifies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0;
        self.with_poller(|p| p.start_verify(repair))?;
        let report = self
            .shared
            .wait_verify(before)
            .ok_or_else(|| self.shared.failure().unwrap_or(MirrorError::Closed))?;
        match &report.abandoned {
            Some(why) => Err(MirrorError::Verify(format!(
                "ended after {} of the region's chunks: {why}",
                report.chunks_compared
            ))),
            None => Ok(report),
        }
    }

    pub(super) fn resolve_split_brain(&self, discard_node: u64) -> Result<()> {
        self.check_usable()?;
        self.with_poller(|p| p.resolve_split_brain(discard_node))
    }

    /// The published snapshot, with the callers' counters.
    pub(super) fn stats(&self) -> Stats {
        let mut s = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.writes_completed = self.shared.completed.load(Ordering::Acquire);
        s.role = self.shared.role();
        s.fenced = self.shared.fenced();
        if let Some(MirrorError::Failed { reason }) = self.shared.failure() {
            s.failure = Some(reason);
            s.phase = mirror_proto::Phase::Failed;
        }
        s
    }
}

/// A node's error as the control endpoint reports it: the C API's code, a short kind, the
/// message.
fn refusal(e: MirrorError) -> ControlRefusal {
    use mirror_proto::{DemoteError, PromoteError};
    let kind = match &e {
        MirrorError::Promote(PromoteError::AlreadyPrimary { .. })
        | MirrorError::Demote(DemoteError::AlreadyBackup)
        | MirrorError::WrongRole { .. } => "wrong_role",
        MirrorError::Promote(PromoteError::PeerAlive { .. }) => "peer_alive",
        MirrorError::Promote(PromoteError::NotCaughtUp { .. }) => "not_caught_up",
        MirrorError::Fenced { .. } => "fenced",
        MirrorError::Config(ConfigError::Missing { .. }) => "missing_config",
        MirrorError::Config(_) => "bad_request",
        MirrorError::Closed => "closed",
        _ => "failed",
    };
    ControlRefusal::new(error_code(&e), kind, e.to_string())
}

impl ControlTarget for NodeOps {
    fn live_status(&self) -> LiveStatus {
        let s = self.stats();
        let verifies = self
            .shared
            .verifies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        LiveStatus {
            node_id: s.node_id,
            role: s.role.to_string(),
            term: s.current_term,
            phase: format!("{:?}", s.phase).to_lowercase(),
            peer_node_id: s.peer_node_id,
            peer_address: s.peer_address.clone(),
            degraded: s.degraded,
            fenced: s.fenced.clone(),
            queue_records: s.queue_records,
            queue_bytes: s.queue_bytes,
            queue_capacity: s.queue_capacity,
            next_seq: s.next_seq,
            applied_through: s.applied_through,
            acked_through: s.acked_through,
            writes_completed: s.writes_completed,
            last_recovery_bytes: s.last_recovery_bytes,
            last_recovery_records: s.last_recovery_records,
            recoveries: s.recoveries,
            split_brain: s.split_brain.clone(),
            failure: s.failure.clone(),
            auth: s.auth.to_string(),
            write_bytes: self.shared.counters.write_bytes(),
            write_latency_p50_us: self.shared.counters.latency_quantile_us(0.5),
            write_latency_p99_us: self.shared.counters.latency_quantile_us(0.99),
            dirty_chunks: s.dirty_chunks,
            chunk_size: s.chunk_size,
            transfer: s.transfer.clone(),
            resync_target: s.resync_target,
            verifies_finished: verifies.0,
            last_verify: verifies.1.as_ref().map(crate::control::VerifySummary::of),
        }
    }

    fn verify(&self, repair: bool) -> Result<(), ControlRefusal> {
        self.check_usable().map_err(refusal)?;
        self.with_poller(|p| p.start_verify(repair))
            .map_err(refusal)
    }

    fn promote(&self, force: bool) -> Result<Promoted, ControlRefusal> {
        let term = NodeOps::promote(self, force).map_err(refusal)?;
        Ok(Promoted {
            term,
            forced: force,
        })
    }

    fn demote(&self) -> Result<(), ControlRefusal> {
        NodeOps::demote(self).map_err(refusal)
    }

    fn subscribe(&self) -> Result<crate::Events, ControlRefusal> {
        self.shared.events.subscribe().map_err(|source| {
            refusal(MirrorError::Io {
                context: "creating an event subscription".into(),
                source,
            })
        })
    }

    fn resolve(&self, discard: &str) -> Result<(), ControlRefusal> {
        let s = self.stats();
        let node = match discard.parse::<DiscardNode>() {
            Ok(DiscardNode::Local) => s.node_id,
            Ok(DiscardNode::Peer) if s.peer_node_id == 0 => {
                return Err(refusal(MirrorError::Config(ConfigError::BadValue {
                    key: "discard".into(),
                    value: discard.into(),
                    why: "this node is not bound to a peer yet".into(),
                })))
            }
            Ok(DiscardNode::Peer) => s.peer_node_id,
            Ok(DiscardNode::Id(id)) => id,
            Err(e) => {
                return Err(refusal(MirrorError::Config(ConfigError::BadValue {
                    key: "discard".into(),
                    value: discard.into(),
                    why: e.to_string(),
                })))
            }
        };
        self.resolve_split_brain(node).map_err(refusal)
    }
}

impl Mirror {
    /// The path of this node's control socket, if its endpoint runs (see docs/CONTROL.md).
    pub fn control_socket(&self) -> Option<std::path::PathBuf> {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.path().to_path_buf())
    }
}
