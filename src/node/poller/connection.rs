//! The connection's life: a primary connects (and reconnects) to its peer; a node with a
//! `listen` address accepts connections in either role, reads their first `Hello` without
//! blocking, and lets the core judge it (a backup refuses a second primary without disturbing
//! the current one; a primary meeting another primary fences it or is fenced by it).

use std::time::Instant;

use mirror_proto::{Message, Phase, RejectCode, WireRole};

use crate::config::{Config, TransportKind};
use crate::error::Result;
use crate::transport::tcp::{Security, TcpConnecting};
use crate::transport::{Connecting, TransportError};

use super::*;

/// An authentication failure toward the peer is logged at most this often (it repeats at
/// every reconnection attempt).
const AUTH_FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a connection attempt failed.
enum Failure {
    Timeout,
    Other(TransportError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("no answer in time"),
            Failure::Other(e) => e.fmt(f),
        }
    }
}

/// How often a connected backup looks for new connections (see `accept_and_greet`): a
/// newcomer while a peer is connected is rare (the peer died unseen, or an intruder), and each
/// look is an accept(2) that finds nothing, on the data path's loop (between two emulated
/// machines, 3.5 of the backup's 14 system calls per synchronous write at 1 ms).
const ACCEPT_INTERVAL_CONNECTED_US: u64 = 20_000;

impl Poller {
    pub(super) fn manage_connection(&mut self, now: u64) -> bool {
        let mut worked = self.accept_and_greet(now);
        worked |= self.knock(now);
        if self.exec.core.role() == WireRole::Primary && self.cfg.peer.is_some() {
            worked |= self.connect_to_peer(now);
        }
        worked
    }

    /// A backup that opens knocks at its primary's address (see `Knock`): it connects and
    /// closes, nothing more. Never blocks; a primary that is not there, or does not listen, is
    /// no error (it dials this backup when it can, as without the knock).
    fn knock(&mut self, now: u64) -> bool {
        match &mut self.knock {
            Knock::Done => false,
            Knock::Due => {
                let peer = self.cfg.peer.clone().unwrap_or_default();
                self.knock = match TcpConnecting::start(&peer) {
                    Ok(attempt) => Knock::Connecting(
                        Box::new(attempt),
                        now + self.cfg.handshake_timeout.as_micros() as u64,
                    ),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cannot knock at the primary");
                        Knock::Done
                    }
                };
                true
            }
            Knock::Connecting(attempt, deadline_us) => match attempt.poll() {
                Ok(None) if now < *deadline_us => false,
                outcome => {
                    match outcome {
                        Ok(Some(_)) => {
                            tracing::debug!(peer = ?self.cfg.peer, "knocked at the primary")
                        }
                        Ok(None) => {
                            tracing::debug!(peer = ?self.cfg.peer, "no answer to the knock at the primary")
                        }
                        Err(e) => {
                            tracing::debug!(peer = ?self.cfg.peer, error = %e, "the knock at the primary found nobody")
                        }
                    }
                    // The established connection (if any) closes here.
                    self.knock = Knock::Done;
                    true
                }
            },
        }
    }

    /// Counts a refused incoming connection (the metrics).
    fn count_rejected(&self) {
        // Relaxed: a count for the metrics.
        self.shared
            .counters
            .rejected_peers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells the event stream a connection is now the node's.
    fn publish_connected(&self, c: &dyn crate::transport::Connection) {
        // Relaxed: a count for the metrics.
        self.shared
            .counters
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peer_node_id = c
            .authenticated_peer()
            .unwrap_or_else(|| self.exec.queue.peer_node_id());
        self.shared.events.publish(super::Event::Connected {
            peer_node_id,
            peer_address: c.peer(),
        });
    }

    /// A primary: connects to its peer, again after every loss.
    fn connect_to_peer(&mut self, now: u64) -> bool {
        if self.conn.is_some() || self.exec.core.phase() != Phase::Disconnected {
            return false;
        }
        if let Some((attempt, deadline_us)) = self.connecting.as_mut() {
            let failure = match attempt.poll() {
                Ok(Some(c)) => {
                    tracing::info!(peer = %c.peer(), "connected to backup");
                    self.publish_connected(c.as_ref());
                    self.connecting = None;
                    self.knocked = false;
                    self.conn = Some(c);
                    let peer = self.next_peer();
                    self.exec.core.on_connected(peer);
                    return true;
                }
                Ok(None) if now < *deadline_us => return false,
                Ok(None) => Failure::Timeout,
                Err(e) => Failure::Other(e),
            };
            let security = matches!(
                failure,
                Failure::Other(TransportError::Auth(_) | TransportError::Tls(_))
            );
            if security
                && self
                    .auth_failure_logged_at
                    .is_none_or(|t| t.elapsed() >= AUTH_FAILURE_LOG_EVERY)
            {
                // An operator must see this (the nodes' secrets or certificates do not match, or
                // someone else answers at the peer's address), but not at every retry.
                tracing::warn!(peer = ?self.cfg.peer, error = %failure, "cannot authenticate with the peer");
                self.auth_failure_logged_at = Some(Instant::now());
            } else {
                tracing::debug!(peer = ?self.cfg.peer, error = %failure, "backup not reachable");
            }
            self.connecting = None;
            self.exec.core.on_connect_failed();
            return true;
        }
        let interval_us = self.cfg.reconnect_interval.as_micros() as u64;
        if std::mem::take(&mut self.knocked) {
            // A returning backup knocked: try now rather than at the next interval (no sooner
            // than KNOCK_GAP_US after the last attempt began).
            let last_attempt_us = self.next_connect_at_us.saturating_sub(interval_us);
            self.next_connect_at_us = self
                .next_connect_at_us
                .min(last_attempt_us + super::KNOCK_GAP_US);
        }
        if now < self.next_connect_at_us {
            return false;
        }
        self.next_connect_at_us = now + interval_us;
        let peer = self.cfg.peer.clone().unwrap_or_default();
        if let Some(a) = &self.security.auth {
            a.set_identity(self.exec.queue.node_id(), self.exec.queue.peer_node_id());
        }
        match start_connecting(&self.cfg, &peer, &self.security) {
            Ok(attempt) => {
                let deadline = now + self.cfg.handshake_timeout.as_micros() as u64;
                self.connecting = Some((attempt, deadline));
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "backup not reachable");
                self.exec.core.on_connect_failed();
            }
        }
        true
    }

    /// Accepts new connections (a node with `listen`, in either role) and adopts one once the
    /// core admits its Hello. On a backup, a Hello from the primary already connected (same
    /// node id) replaces the old connection (the primary restarted or its link broke); any
    /// other is refused without disturbing it. On a primary, a primary of a newer term fences
    /// this node (which, demoted, adopts the connection as a backup); an older one is refused
    /// as stale, which fences it.
    pub(super) fn accept_and_greet(&mut self, now: u64) -> bool {
        let mut worked = false;
        // accept(2) is a system call: while connected, look for newcomers every
        // ACCEPT_INTERVAL_CONNECTED_US rather than on every pass, so the data path's receive
        // loop stays tight (a restarted primary waits that much longer; its handshake takes
        // longer anyway).
        let accept_due = self.conn.is_none() || now >= self.next_accept_at_us;
        if let Some(acceptor) = self.acceptor.as_mut().filter(|_| accept_due) {
            let accepted_before = acceptor.accepted();
            self.next_accept_at_us = now + ACCEPT_INTERVAL_CONNECTED_US;
            if let Some(a) = &self.security.auth {
                a.set_identity(self.exec.queue.node_id(), self.exec.queue.peer_node_id());
            }
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
            if acceptor.accepted() != accepted_before
                && self.exec.core.role() == WireRole::Primary
                && self.conn.is_none()
            {
                self.knocked = true;
                worked = true;
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
                    let verdict = match first.first() {
                        Some(Message::Hello(h))
                            if c.authenticated_peer().is_some_and(|id| id != h.node_id) =>
                        {
                            Err((
                                RejectCode::ProtocolViolation,
                                format!(
                                    "Hello claims node {:#x} but the connection authenticated as another node",
                                    h.node_id
                                ),
                            ))
                        }
                        // A primary hearing a newer primary is fenced here (and, demoted,
                        // judges the Hello as a backup).
                        Some(Message::Hello(h)) => self.exec.core.admit(h),
                        Some(other) => Err((
                            RejectCode::ProtocolViolation,
                            format!("first message was {:?}, expected Hello", other.kind()),
                        )),
                        None => unreachable!("poll_recv returned 1"),
                    };
                    match verdict {
                        Ok(()) => {
                            if let Some(old) = self.conn.take() {
                                let old_peer = self.conn_peer;
                                tracing::info!(old = %old.peer(), new = %c.peer(), "primary reconnected; replacing its old connection");
                                self.exec.core.on_disconnected(old_peer);
                            }
                            let peer = self.next_peer();
                            // Its Hello was checked against the proven id above.
                            self.hello_checked = Some(peer);
                            self.publish_connected(c.as_ref());
                            self.exec.core.on_connected(peer);
                            for m in first {
                                self.exec.core.on_message(peer, m);
                            }
                            self.conn = Some(c);
                        }
                        Err((code, reason)) => {
                            tracing::warn!(peer = %c.peer(), ?code, %reason, "refusing connection");
                            self.count_rejected();
                            if code == RejectCode::StaleTerm {
                                // Our Hello first: the stale primary learns the exact term that
                                // superseded it (it is fenced by either message).
                                let _ = c.send(&Message::hello(self.exec.core.hello()));
                            }
                            let _ = c.send(&Message::Reject { code, reason });
                            let _ = c.flush();
                        }
                    }
                }
                Err(e) if crate::transport::closed_by_peer(&e) => {
                    let (c, _) = self.pending.swap_remove(i);
                    tracing::debug!(peer = %c.peer(), "closed by its peer before its Hello (a knock, or a peer that gave up)");
                }
                Err(e) => {
                    let (c, _) = self.pending.swap_remove(i);
                    self.count_rejected();
                    let auth_magic = u32::from_le_bytes(mirror_proto::auth::AUTH_MAGIC);
                    if matches!(e, TransportError::Wire(mirror_proto::WireError::BadMagic { found }) if found == auth_magic)
                    {
                        tracing::warn!(peer = %c.peer(), "refusing a peer that authenticates (it has secret_file or tls) while this node has neither: set the same on both nodes");
                        continue;
                    }
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
}

/// Starts connecting to the backup over the configured transport (never blocks; the caller
/// bounds the attempt with `handshake_timeout`).
fn start_connecting(
    cfg: &Config,
    peer: &str,
    security: &Security,
) -> Result<Box<dyn Connecting>, TransportError> {
    match cfg.transport {
        TransportKind::Tcp => Ok(Box::new(
            TcpConnecting::start(peer)?.with_security(security.clone()),
        )),
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => Ok(Box::new(
            crate::transport::rdma::RdmaConnecting::start(
                peer,
                crate::transport::rdma::RdmaSettings::from_config(cfg),
            )?
            .with_auth(security.auth.clone()),
        )),
        #[cfg(not(feature = "rdma"))]
        TransportKind::Rdma => Err(TransportError::Io {
            context: "connecting over RDMA",
            source: std::io::Error::other(
                "the RDMA transport is not built (build with --features rdma)",
            ),
        }),
    }
}
