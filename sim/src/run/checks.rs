//! The checkers of data and durability (1 to 9): each judges the node in the role it acts in
//! at that moment, so they hold whichever node is the primary.

use mirror_proto::PeerLossPolicy;

use super::Sim;
use crate::net::NodeName;
use crate::node::{Recovery, SimNode};
use crate::report::{Checker, SimFailure};
use crate::REGION_BYTES;

/// Whether a node whose durable queue ends at `last` and whose checkpoint is `applied` holds
/// record `seq` across a power loss.
fn durably_holds((last, applied): (u64, u64), seq: u64) -> bool {
    last >= seq || applied >= seq
}

impl Sim<'_> {
    /// The region the writes of `log` (terms by seq) leave, replayed in seq order; `Err` names
    /// a seq whose (seq, term) no write was given.
    fn replay(&self, log: &[u64]) -> Result<Vec<u8>, (u64, u64)> {
        let mut region = vec![0u8; REGION_BYTES as usize];
        for (i, &term) in log.iter().enumerate() {
            let seq = i as u64 + 1;
            let Some(&id) = self.client.assigned.get(&(seq, term)) else {
                return Err((seq, term));
            };
            let range = self.client.range_of(id);
            region[range].copy_from_slice(&self.client.writes[id].data);
        }
        Ok(region)
    }

    /// The last record of `log` whose write covers region byte `at`: (seq, term, write id),
    /// to say where two regions part.
    fn last_writer(&self, log: &[u64], at: usize) -> Option<(u64, u64, usize)> {
        log.iter().enumerate().rev().find_map(|(i, &term)| {
            let seq = i as u64 + 1;
            let id = *self.client.assigned.get(&(seq, term))?;
            self.client
                .range_of(id)
                .contains(&at)
                .then_some((seq, term, id))
        })
    }

    /// Checker 7: a restarted node's region, once it replayed its own queue, holds the writes
    /// of its log through its queue's `last_seq` (`applied_through` never claims more than the
    /// region durably holds, and the queue keeps everything after it). Checked at once,
    /// because the final comparison alone misses a lost write that later writes covered (the
    /// region is small and rewritten many times over).
    ///
    /// Left out: the bytes of every write given a higher seq (a primary may have applied a
    /// write, acked by the backup, whose record its queue then lost in a power loss while some
    /// of the region's words kept it; a backup in a repair holds the primary's bytes of writes
    /// it has not received yet), and, while the node repairs a divergent suffix it saved, the
    /// ranges those records wrote (the repair writes the primary's bytes there before the
    /// records go; the next handshake repairs them again).
    pub(super) fn check_recovery(
        &self,
        r: NodeName,
        node: &SimNode,
        rec: &Recovery,
    ) -> Result<(), SimFailure> {
        let expect = self.replay(&node.log).map_err(|(seq, term)| {
            self.fail(
                Checker::RecoveryWrong,
                format!("{r} holds seq {seq} of term {term:#x}, which no write was given"),
            )
        })?;
        let mut masked = vec![false; REGION_BYTES as usize];
        for (_, &id) in self.client.assigned.range((rec.last_seq + 1, 0)..) {
            masked[self.client.range_of(id)].fill(true);
        }
        if let Some(common) = self.watch.repairing[r.index()] {
            for seq in common + 1..=rec.last_seq {
                let term = node.term_at(seq).unwrap_or_default();
                if let Some(&id) = self.client.assigned.get(&(seq, term)) {
                    masked[self.client.range_of(id)].fill(true);
                }
            }
        }
        let bad = (0..expect.len()).find(|&i| !masked[i] && rec.rebuilt[i] != expect[i]);
        if let Some(at) = bad {
            return Err(self.fail(
                Checker::RecoveryWrong,
                format!(
                    "{r} restarted with its queue through seq {}, but its region and queue do not hold its log's writes through it (byte {at})",
                    rec.last_seq
                ),
            ));
        }
        Ok(())
    }

    /// Checker 1 at a crash: a completed write the node no longer holds is still held by its
    /// peer (a backup may lose records it had not synced yet; the completing primary and the
    /// backup that acked hold it durably), or a split-brain verdict discarded it.
    pub(super) fn check_dropped_completed(
        &self,
        r: NodeName,
        rec: &Recovery,
    ) -> Result<(), SimFailure> {
        let peer = self.node_or_restarting(r.other());
        for (i, &term) in rec.dropped.iter().enumerate() {
            let key = (rec.last_seq + 1 + i as u64, term);
            let Some(c) = self.client.completed.get(&key) else {
                continue;
            };
            let held = peer.is_some_and(|p| p.term_at(key.0) == Some(term));
            if !held && !self.watch.verdict_discarded.contains(&key) {
                return Err(self.fail(
                    Checker::CompletedWriteLost,
                    format!(
                        "{r} lost seq {} of term {term:#x} (write {} that {} completed) in a crash, and its peer does not hold it",
                        key.0, c.id, c.node
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checker 1 at a submission: `r` gives `seq` to write `id` while a completed write holds
    /// it. A node never reuses a seq of a write it completed (it holds it durably) unless a
    /// split-brain verdict discarded it; under `block` no node writes alone, so no completed
    /// seq is ever reused.
    pub(super) fn check_seq_reuse(
        &self,
        r: NodeName,
        seq: u64,
        term: u64,
        id: usize,
    ) -> Result<(), SimFailure> {
        let block = self.swarm.policy == PeerLossPolicy::Block;
        for (&key, c) in self.client.completed.range((seq, 0)..=(seq, u64::MAX)) {
            if key.1 == term || self.watch.verdict_discarded.contains(&key) {
                continue;
            }
            if block || c.node == r {
                return Err(self.fail(
                    Checker::CompletedWriteLost,
                    format!(
                        "{r} gave seq {seq} (term {term:#x}) to write {id}, but write {} of term {:#x} completed at that seq by {}: the completed write is gone",
                        c.id, key.1, c.node
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checker 4: a catch-up moves only what the peer lacks: every record sent by `SendQueued`
    /// is beyond what the peer holds of this node's history. The two logs agree through their
    /// common point (a seq the peer holds with another term is not the same record: a
    /// divergent suffix, or degraded writes of a newer term).
    pub(super) fn check_catch_up(
        &self,
        r: NodeName,
        from_seq: u64,
        through_seq: u64,
    ) -> Result<(), SimFailure> {
        let peer_last = match (self.node(r), self.node(r.other())) {
            (Some(me), Some(peer)) => mirror_proto::common_point(
                me.exec.queue.term_history(),
                me.exec.queue.last_seq(),
                peer.exec.queue.term_history(),
                peer.exec.queue.last_seq(),
            ),
            _ => None,
        };
        match peer_last {
            Some(peer_last) if from_seq <= peer_last => Err(self.fail(
                Checker::CatchUpResent,
                format!(
                    "{r} sends {from_seq}..={through_seq} but the peer holds through {peer_last}"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Checker 6: a backup acknowledges only what its queue made durable (it syncs before the
    /// ack, in the same batch). Checker 2 alone can miss an early ack: a checkpoint in the
    /// same pass (due at once when the queue is half full) makes the records durable before
    /// the ack arrives, unless the backup loses power in between.
    pub(super) fn check_ack_durable(
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

    /// Checker 2: a write the primary `r` applies is durably held by its backup (the other
    /// node), except under `continue` once the primary declared the backup lost (degraded: it
    /// applies without acks by design, until a recovery completes).
    ///
    /// "Durably held": the backup acks only after syncing its queue, so its durable state
    /// (what survives even a power loss) must have the seq, in its queue (`last_seq`) or in its
    /// checkpointed region (`applied_through`): its written state is not enough. And it must
    /// be the same record: the backup's log has the primary's term at that seq.
    pub(super) fn check_backup_holds(
        &self,
        r: NodeName,
        seq: u64,
        term: u64,
    ) -> Result<(), SimFailure> {
        let Some(p) = self.node(r) else {
            return Ok(());
        };
        if p.policy() == PeerLossPolicy::Continue
            && (p.exec.core.stats().degraded || self.client.degraded.contains(&(seq, term)))
        {
            return Ok(());
        }
        let backup = self.node_or_restarting(r.other());
        let (last, applied) = backup.map_or((0, 0), |b| {
            (b.exec.durable().last_seq, b.exec.durable().applied)
        });
        let held_term = backup.and_then(|b| b.term_at(seq));
        if !durably_holds((last, applied), seq) || held_term != Some(term) {
            return Err(self.fail(
                Checker::PrimaryAheadOfBackup,
                format!(
                    "primary {r} applies seq {seq} of term {term:#x}; the backup durably holds through {last} (applied {applied}), with term {held_term:?} there"
                ),
            ));
        }
        Ok(())
    }

    /// Checker 8: whenever the pair is converged (one primary synchronous with its backup,
    /// everything applied, nothing in flight), their regions are identical (the end of the run
    /// also compares them with the replay of the history). A pair that disagrees on what a
    /// seq means stays synchronous while its regions differ: this catches it at once.
    pub(super) fn check_no_silent_divergence(&mut self) -> Result<(), SimFailure> {
        if !self.converged() {
            return Ok(());
        }
        let Some((p, b)) = self.pair() else {
            return Ok(());
        };
        // Compare once per converged state, not once per idle step.
        let (ps, bs) = (p.exec.core.stats(), b.exec.core.stats());
        let state = [
            ps.applied_through,
            bs.applied_through,
            ps.recoveries,
            bs.recoveries,
            self.report.crashes[0] + self.report.crashes[1] + self.watch.disturbances,
        ];
        if self.divergence_checked == Some(state) {
            return Ok(());
        }
        let differ = p.region().iter().zip(b.region()).position(|(x, y)| x != y);
        let names = (p.name, b.name);
        let writers = differ.map(|at| {
            let expect = self.replay(&p.log).ok().map(|e| e[at]);
            (
                self.last_writer(&p.log, at),
                self.last_writer(&b.log, at),
                (
                    expect == Some(p.region()[at]),
                    expect == Some(b.region()[at]),
                ),
            )
        });
        self.divergence_checked = Some(state);
        if let (Some(at), Some((pw, bw, (p_ok, b_ok)))) = (differ, writers) {
            return Err(self.fail(
                Checker::SilentDivergence,
                format!(
                    "primary {} and backup {} are synchronous and idle, but their regions differ at byte {at} (last written there, by their logs: {pw:?} and {bw:?}; the replay of the primary's log agrees with the primary: {p_ok}, with the backup: {b_ok})",
                    names.0, names.1
                ),
            ));
        }
        self.confirm_verdicts()
    }

    /// Checkers 1, 3 and 11 at the end: both nodes hold the same history, both regions equal
    /// its replay, every completed write is in it unless a split-brain verdict discarded it,
    /// and no discarded record came back.
    pub(super) fn check_final(&self) -> Result<(), SimFailure> {
        let Some((p, b)) = self.pair() else {
            return Err(self.fail(
                Checker::NoConvergence,
                "no primary with a backup at the end",
            ));
        };
        let shorter = p.log.len().min(b.log.len());
        let differ = p.log.iter().zip(&b.log).position(|(x, y)| x != y);
        let differ = differ.or((p.log.len() != b.log.len()).then_some(shorter));
        if let Some(at) = differ {
            return Err(self.fail(
                Checker::RegionsDiffer,
                format!(
                    "primary {} and backup {} hold different records at seq {}",
                    p.name,
                    b.name,
                    at + 1
                ),
            ));
        }
        let log = &p.log;
        let expect = self.replay(log).map_err(|(seq, term)| {
            self.fail(
                Checker::RegionsDiffer,
                format!("seq {seq} of term {term:#x} was applied but no write was ever given it"),
            )
        })?;
        for (&(seq, term), c) in &self.client.completed {
            let kept = log.get(seq as usize - 1) == Some(&term);
            if !kept && !self.watch.verdict_discarded.contains(&(seq, term)) {
                return Err(self.fail(
                    Checker::CompletedWriteLost,
                    format!(
                        "write {} (seq {seq}, term {term:#x}), completed by {}, is not in the final history (last seq {})",
                        c.id,
                        c.node,
                        log.len()
                    ),
                ));
            }
        }
        self.check_discarded_stay_gone(log)?;
        for n in [p, b] {
            if let Some(at) = n.region().iter().zip(&expect).position(|(a, e)| a != e) {
                return Err(self.fail(
                    Checker::RegionsDiffer,
                    format!(
                        "{}'s region ({:?}) differs from the replay of the history at byte {at}",
                        n.name,
                        n.role()
                    ),
                ));
            }
        }
        Ok(())
    }
}
