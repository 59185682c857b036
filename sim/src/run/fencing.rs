//! Checker 10, fencing: once a node has seen a term above the one it writes in as a primary
//! (it persisted it, its core's `current_term` holds it, or a fence told it that a newer one
//! exists), it applies nothing more as a primary and completes no ticket of its old term; and
//! no two nodes ever start the same term. Also the bookkeeping of role changes this needs.

use std::collections::{BTreeMap, BTreeSet};

use mirror_proto::{WireRole, WritesRefused};

use super::split_brain::{BatchSeen, VerdictRecord};
use super::Sim;
use crate::client::Pending;
use crate::net::NodeName;
use crate::node::SimNode;
use crate::report::{Checker, SimFailure};

/// What the failover checkers remember of the run.
#[derive(Default)]
pub(super) struct Watch {
    /// The highest term each node has seen: persisted, held by its core between batches, or
    /// (a fence that named no term) one above its own, which stands for "a newer one".
    seen_term: [u64; 2],
    /// The term each node writes in while it is a primary (None: not a primary).
    writing_term: [Option<u64>; 2],
    /// Every term a primary started, and the node that started it.
    started_terms: BTreeMap<u64, NodeName>,
    /// Records (seq, term) a split-brain verdict discarded, once their node dropped them: only
    /// these completed writes may be missing from the final history.
    pub verdict_discarded: BTreeSet<(u64, u64)>,
    /// Records each node saved to drop by a split-brain verdict, until it drops them (a repair
    /// cut short keeps them, and a later handshake decides again).
    pub condemned: [Vec<(u64, u64)>; 2],
    /// Verdicts that discarded a side, for the final check.
    pub verdicts: Vec<VerdictRecord>,
    /// Crashes, role changes and discards so far: a verdict's outcome is confirmed at the next
    /// convergence only if none came in between.
    pub disturbances: u64,
    /// A divergent suffix each node saved and has not dropped yet (its common point): its
    /// region may hold the primary's repair bytes where those records wrote.
    pub repairing: [Option<u64>; 2],
    /// What each node's batch in progress did that the split-brain checker judges.
    pub batch: [BatchSeen; 2],
    /// A split brain found under `block` (it fails the run once the batch ran).
    pub block_split_brain: Option<mirror_proto::SplitBrain>,
}

impl Watch {
    /// Node `r` learned of `term`.
    pub fn saw_term(&mut self, r: NodeName, term: u64) {
        let seen = &mut self.seen_term[r.index()];
        *seen = (*seen).max(term);
    }

    /// Before a batch of `r`: everything its core raised its term for has run.
    pub fn between_batches(&mut self, r: NodeName, node: Option<&SimNode>) {
        if let Some(n) = node {
            self.saw_term(r, n.exec.core.stats().current_term);
        }
    }

    /// The term `r` writes in, if it is a primary.
    pub fn writing_term(&self, r: NodeName) -> Option<u64> {
        self.writing_term[r.index()]
    }

    /// `r` dropped its divergent suffix after `after`: what a verdict condemned is discarded.
    pub fn truncated(&mut self, r: NodeName, after: u64) {
        if self.repairing[r.index()].is_some_and(|common| common <= after) {
            self.repairing[r.index()] = None;
        }
        let condemned = std::mem::take(&mut self.condemned[r.index()]);
        self.verdict_discarded
            .extend(condemned.into_iter().filter(|&(seq, _)| seq > after));
    }

    /// `r` went down (what a verdict condemned stays in its queue: the next handshake decides
    /// again).
    pub fn went_down(&mut self, r: NodeName) {
        self.writing_term[r.index()] = None;
        self.batch[r.index()] = BatchSeen::default();
        self.condemned[r.index()].clear();
        self.disturbances += 1;
    }
}

impl Sim<'_> {
    /// Node `r` (re)started: what it knows, and its term if it starts as a primary.
    pub(super) fn came_up(&mut self, r: NodeName) -> Result<(), SimFailure> {
        let Some(n) = self.node(r) else {
            return Ok(());
        };
        let (role, term) = (n.role(), n.exec.core.stats().current_term);
        self.watch.saw_term(r, term);
        if role == WireRole::Primary {
            self.new_primary(r, term)?;
        }
        Ok(())
    }

    /// `r` starts writing in `term` (a start as a primary, a promotion).
    fn new_primary(&mut self, r: NodeName, term: u64) -> Result<(), SimFailure> {
        if let Some(&other) = self.watch.started_terms.get(&term) {
            if other != r {
                return Err(self.fail(
                    Checker::FencedPrimaryWrote,
                    format!("{r} starts term {term:#x}, which {other} started before"),
                ));
            }
        }
        self.watch.started_terms.insert(term, r);
        self.watch.writing_term[r.index()] = Some(term);
        self.watch.saw_term(r, term);
        self.trace(format_args!("{r} writes in term {term:#x}"));
        Ok(())
    }

    /// `r` persisted a new role.
    pub(super) fn role_changed(
        &mut self,
        r: NodeName,
        role: WireRole,
        superseded: bool,
        new_term: Option<u64>,
    ) -> Result<(), SimFailure> {
        self.watch.disturbances += 1;
        self.trace(format_args!(
            "{r} is now a {role:?}{}",
            if superseded { " (superseded)" } else { "" }
        ));
        match (role, superseded) {
            (WireRole::Primary, false) => {
                let Some(term) = new_term else {
                    return Err(self.fail(
                        Checker::FencedPrimaryWrote,
                        format!("{r} became a primary without persisting a new term first"),
                    ));
                };
                self.new_primary(r, term)?;
                self.net.dial_soon(r);
                // Even the fencing canary's broken driver sees a new role.
                self.client.canary_believed_term[r.index()] = None;
            }
            // Fenced under `stop`: it keeps its term until it stops.
            (WireRole::Primary, true) => {}
            (WireRole::Backup, _) => self.watch.writing_term[r.index()] = None,
        }
        Ok(())
    }

    /// `r`'s core stopped taking writes: its pending tickets fail (the fencing canary reports
    /// a fenced primary's complete instead).
    pub(super) fn refuse_writes(
        &mut self,
        r: NodeName,
        why: WritesRefused,
    ) -> Result<(), SimFailure> {
        let pending: Vec<Pending> = std::mem::take(&mut self.client.pending[r.index()])
            .into_values()
            .collect();
        let n = pending.len() as u64;
        match why {
            WritesRefused::Fenced(fence) => {
                self.report.fences += 1;
                self.report.fenced_tickets += n;
                // A fence that names no term still says a newer one exists.
                let newer = fence.term.unwrap_or(fence.own_term + 1);
                self.watch.saw_term(r, newer);
                self.trace(format_args!("{r} refuses {n} pending writes: {fence}"));
                if self.opts.canary_fencing {
                    // The broken driver takes the refusal for success, and the node for the
                    // primary it was.
                    self.client.canary_believed_term[r.index()] = Some(fence.own_term);
                    for p in pending {
                        self.report.canary_fenced_completions += 1;
                        self.complete(r, p)?;
                    }
                    return Ok(());
                }
            }
            WritesRefused::Demoted => {
                self.trace(format_args!("{r} refuses {n} pending writes: demoted"));
            }
            WritesRefused::LostSplitBrain(sb) => {
                self.trace(format_args!("{r} refuses {n} pending writes: lost {sb}"));
            }
        }
        self.report.refused_writes += n;
        Ok(())
    }

    /// Checker 10: `r` applies (`seq`, `term`) acting as a primary: it has seen no term above
    /// the one it writes in. (The records it applies may carry older terms: what it recovered
    /// or took from a replay.)
    pub(super) fn check_apply_as_primary(
        &self,
        r: NodeName,
        seq: u64,
        term: u64,
    ) -> Result<(), SimFailure> {
        let seen = self.watch.seen_term[r.index()];
        match self.watch.writing_term[r.index()] {
            Some(own) if own >= seen => Ok(()),
            Some(own) => Err(self.fail(
                Checker::FencedPrimaryWrote,
                format!(
                    "{r} applies seq {seq} (term {term:#x}) as the primary of term {own:#x} after it saw term {seen:#x}"
                ),
            )),
            None => Err(self.fail(
                Checker::FencedPrimaryWrote,
                format!("{r} applies seq {seq} (term {term:#x}) as a primary of no known term"),
            )),
        }
    }

    /// Checker 10: `r` completes write `p`: it has seen no term above the write's.
    pub(super) fn check_completion(&self, r: NodeName, p: Pending) -> Result<(), SimFailure> {
        let seen = self.watch.seen_term[r.index()];
        if seen > p.term {
            return Err(self.fail(
                Checker::FencedPrimaryWrote,
                format!(
                    "{r} completes write {} (seq {}, term {:#x}) after it saw term {seen:#x}",
                    p.id, p.seq, p.term
                ),
            ));
        }
        Ok(())
    }
}
