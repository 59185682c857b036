//! Checker 11, split-brain outcomes. Each handshake is read from outside, from the two Hellos
//! on the wire (the primary's, as the backup's core took it, and the backup's answer), with
//! the protocol's own rule (`reconcile_resolving`, `decide_split_brain`): when the two logs make
//! a split brain, both nodes must do what the verdict for those two suffixes says (the backup
//! discards its suffix, both stay apart, or they swap roles), a discard must drop exactly the
//! backup's records after the common point, and the winner's records must be what both hold
//! at the next convergence. Under `disconnect` with no operator's choice in either Hello the
//! verdict is to stay apart: a split-brain suffix discarded then fails here.

use mirror_proto::handshake::{
    decide_split_brain, reconcile_resolving, LogView, Reconciliation, Unreconcilable,
};
use mirror_proto::{Hello, PeerId, SplitBrain, Verdict, WireRole, WritesRefused};

use super::Sim;
use crate::net::NodeName;
use crate::report::{Checker, SimFailure};

/// What a node's batch did that the split-brain checker judges once the batch ran whole.
#[derive(Debug, Default)]
pub(super) struct BatchSeen {
    /// The node, as a backup, answered the Hello of this connection with its own.
    pub answered: Option<u64>,
    /// The node, as a handshaking primary, got the backup's Hello on this connection.
    pub answer_delivered: Option<u64>,
    /// It saved a divergent suffix to drop.
    pub discarded: bool,
    /// It sent a split-brain reject.
    pub rejected_split_brain: bool,
    /// Its core dropped the connection for a split brain.
    pub closed_split_brain: bool,
    /// Its core stopped taking writes.
    pub refused: Option<WritesRefused>,
    /// Its core stopped it, fenced (`on_fenced = stop`).
    pub stopped_fenced: bool,
}

/// One handshake as its two Hellos say it must go.
pub(super) struct Judged {
    /// The primary's term, as it announced it.
    primary_term: u64,
    /// The backup's last seq, as it announced it.
    backup_last: u64,
    /// The split brain the two logs make, and its verdict.
    split: Option<(SplitBrain, Verdict)>,
    /// The plan both sides must follow (None: the verdict keeps them apart or swaps them).
    plan: Option<Reconciliation>,
    /// The primary's records after the common point (seq, term), when there is a split brain.
    primary_suffix: Vec<(u64, u64)>,
}

/// A verdict that discarded a side.
pub(super) struct VerdictRecord {
    /// The node whose suffix went.
    loser: NodeName,
    /// The common point.
    common: u64,
    /// The winner's records after it.
    winner_suffix: Vec<(u64, u64)>,
    /// The run's disturbances right after the discard.
    disturbances: u64,
    /// Judged at a convergence already (or no longer judgeable).
    settled: bool,
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::StayApart => "stay apart",
        Verdict::DiscardBackup => "discard the backup's writes",
        Verdict::DiscardPrimary => "discard the primary's writes",
    }
}

impl Sim<'_> {
    /// `r`, a backup, answers the Hello of connection `to` with `answer`: what the two Hellos
    /// make of the handshake.
    pub(super) fn judge_handshake(&mut self, r: NodeName, to: PeerId, answer: &Hello) {
        if self.opts.canary_seq_only_matching {
            // That canary's cores match logs by seq alone; this checker reads terms.
            return;
        }
        let Some(ph) = self.net.link(to.0).and_then(|l| l.primary_hello.clone()) else {
            return;
        };
        let (p, b) = (LogView::of_hello(&ph), LogView::of_hello(answer));
        let split = match reconcile_resolving(&p, &b, false) {
            Err(Unreconcilable::SplitBrain(sb)) => {
                let discards = [ph.discard_node, answer.discard_node];
                Some((
                    sb,
                    decide_split_brain(self.split_brain_policy, &sb, discards),
                ))
            }
            _ => None,
        };
        let discard = matches!(split, Some((_, Verdict::DiscardBackup)));
        let plan = reconcile_resolving(&p, &b, discard).ok();
        let primary_suffix = match split {
            Some((sb, _)) => (sb.common + 1..=ph.last_seq)
                .filter_map(|s| ph.term_history.term_at(s).map(|t| (s, t)))
                .collect(),
            None => Vec::new(),
        };
        if let Some((sb, v)) = split {
            self.trace(format_args!(
                "{r} meets a split brain: {sb}; operator choices {:#x} {:#x}; verdict: {}",
                ph.discard_node,
                answer.discard_node,
                verdict_name(v)
            ));
            if self.swarm.policy == mirror_proto::PeerLossPolicy::Block {
                // Under `block` no node completes a write without its peer: nothing can make one.
                self.watch.block_split_brain.get_or_insert(sb);
            }
        }
        if let Some(link) = self.net.link_mut(to.0) {
            link.judged = Some(Judged {
                primary_term: ph.current_term,
                backup_last: answer.last_seq,
                split,
                plan,
                primary_suffix,
            });
        }
    }

    /// Checkers 9 and 11: `r` saved the records `(after, through]` to drop them, in the batch
    /// that answered the Hello of connection `answered`. They are exactly its suffix after the
    /// common point the two Hellos give; completed writes among them go only by a split-brain
    /// verdict against `r`.
    pub(super) fn check_discard(
        &mut self,
        r: NodeName,
        (after, through): (u64, u64),
        records: &[(u64, u64)],
        answered: Option<u64>,
    ) -> Result<(), SimFailure> {
        self.report.discarded_records += records.len() as u64;
        self.trace(format_args!("{r} discards {records:?}"));
        self.watch.disturbances += 1;
        self.watch.repairing[r.index()] = Some(after);
        let held: Vec<(u64, u64)> = self.node(r).map_or_else(Vec::new, |n| {
            (after + 1..=through)
                .filter_map(|s| n.term_at(s).map(|t| (s, t)))
                .collect()
        });
        if held != records {
            return Err(self.fail(
                Checker::SplitBrainOutcomeWrong,
                format!("{r} discards {records:?}, but its log after seq {after} is {held:?}"),
            ));
        }
        let judged = answered
            .and_then(|id| self.net.link(id))
            .and_then(|l| l.judged.as_ref());
        self.watch.condemned[r.index()].clear();
        let Some(j) = judged else {
            return self.check_no_completed_discarded(r, records);
        };
        match j.plan {
            Some(plan) if plan.backup_discards && plan.common == after && through == j.backup_last => {}
            plan => {
                return Err(self.fail(
                    Checker::SplitBrainOutcomeWrong,
                    format!(
                        "{r} discards its records ({after}, {through}], but the two Hellos plan {plan:?} (backup through {})",
                        j.backup_last
                    ),
                ))
            }
        }
        match j.split {
            None => self.check_no_completed_discarded(r, records),
            Some((_, Verdict::DiscardBackup)) => {
                let record = VerdictRecord {
                    loser: r,
                    common: after,
                    winner_suffix: j.primary_suffix.clone(),
                    disturbances: self.watch.disturbances,
                    settled: false,
                };
                self.watch.condemned[r.index()] = records.to_vec();
                self.watch.verdicts.push(record);
                Ok(())
            }
            Some((sb, v)) => Err(self.fail(
                Checker::SplitBrainOutcomeWrong,
                format!(
                    "{r} discards its suffix after seq {after}, but the verdict for {sb} is to {}",
                    verdict_name(v)
                ),
            )),
        }
    }

    /// Checker 9: no record whose write a caller saw complete is discarded (outside a
    /// split-brain verdict): a completed write is in its primary's durable queue, so its
    /// history wins.
    fn check_no_completed_discarded(
        &self,
        r: NodeName,
        records: &[(u64, u64)],
    ) -> Result<(), SimFailure> {
        for key in records {
            if self.watch.verdict_discarded.contains(key) {
                continue;
            }
            if let Some(c) = self.client.completed.get(key) {
                return Err(self.fail(
                    Checker::CompletedWriteDiscarded,
                    format!(
                        "{r} discards seq {} of term {:#x}, write {} that {} completed, with no split-brain verdict against it",
                        key.0, key.1, c.id, c.node
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checker 11 after a whole batch of `r`: what it did with a Hello is what the verdict
    /// says, on both sides.
    pub(super) fn judge_batch(&mut self, r: NodeName, seen: &BatchSeen) -> Result<(), SimFailure> {
        if let Some(sb) = self.watch.block_split_brain {
            return Err(self.fail(
                Checker::SplitBrainOutcomeWrong,
                format!("{sb}, under on_peer_loss = block, where no node completes a write alone"),
            ));
        }
        if let Some(id) = seen.answered {
            self.judge_backup_side(r, id, seen)?;
        }
        if let Some(id) = seen.answer_delivered {
            self.judge_primary_side(r, id, seen)?;
        }
        Ok(())
    }

    fn judge_backup_side(
        &mut self,
        r: NodeName,
        id: u64,
        seen: &BatchSeen,
    ) -> Result<(), SimFailure> {
        let Some(j) = self.net.link(id).and_then(|l| l.judged.as_ref()) else {
            return Ok(());
        };
        let role = self.role_of(r);
        let discards = j.plan.is_some_and(|p| p.backup_discards);
        let (ok, expected) = match j.split {
            Some((_, Verdict::StayApart)) => (
                seen.rejected_split_brain && !seen.discarded && role == Some(WireRole::Backup),
                "a split-brain reject, no discard, and to stay a backup",
            ),
            Some((_, Verdict::DiscardPrimary)) => (
                seen.rejected_split_brain && !seen.discarded && role == Some(WireRole::Primary),
                "a split-brain reject and to become the primary",
            ),
            Some((_, Verdict::DiscardBackup)) | None => (
                j.plan.is_some() && !seen.rejected_split_brain && seen.discarded == discards,
                "the plan of the two Hellos",
            ),
        };
        if let Some((_, v)) = j.split {
            let counts = &mut self.report.split_brains;
            match v {
                Verdict::StayApart => counts.stay_apart += 1,
                Verdict::DiscardBackup => counts.discard_backup += 1,
                Verdict::DiscardPrimary => counts.discard_primary += 1,
            }
        }
        if ok {
            return self.check_winner_term(r, j.split, j.primary_term);
        }
        let what = format!(
            "backup {r} answered connection {id}: the Hellos call for {expected} ({:?}, plan {:?}), but it {} a split-brain reject, {} discard, and is a {role:?}",
            j.split.map(|(sb, v)| (sb.to_string(), verdict_name(v))),
            j.plan,
            if seen.rejected_split_brain { "sent" } else { "sent no" },
            if seen.discarded { "saved a suffix to" } else { "did not" },
        );
        Err(self.fail(Checker::SplitBrainOutcomeWrong, what))
    }

    /// A backup `r` that won a split brain (`split`) against a primary of `loser_term` writes
    /// in a term above it: else the loser, now its backup, refuses it as stale.
    fn check_winner_term(
        &mut self,
        r: NodeName,
        split: Option<(SplitBrain, Verdict)>,
        loser_term: u64,
    ) -> Result<(), SimFailure> {
        let Some((sb, Verdict::DiscardPrimary)) = split else {
            return Ok(());
        };
        let Some(term) = self.watch.writing_term(r) else {
            return Ok(());
        };
        if term > loser_term {
            return Ok(());
        }
        self.trace(format_args!(
            "{r} won {sb} with term {term:#x}, below the loser's term {loser_term:#x}"
        ));
        Err(self.fail(
            Checker::SplitBrainOutcomeWrong,
            format!(
                "{r} won a split brain ({sb}) and writes in term {term:#x}, below the term {loser_term:#x} of the loser, which will refuse it as stale"
            ),
        ))
    }

    fn judge_primary_side(
        &mut self,
        r: NodeName,
        id: u64,
        seen: &BatchSeen,
    ) -> Result<(), SimFailure> {
        let Some(j) = self.net.link(id).and_then(|l| l.judged.as_ref()) else {
            return Ok(());
        };
        let lost = match seen.refused {
            Some(WritesRefused::LostSplitBrain(sb)) => Some(sb),
            _ => None,
        };
        let role = self.role_of(r);
        let ok = match j.split {
            Some((sb, Verdict::DiscardPrimary)) => {
                lost == Some(sb) && role == Some(WireRole::Backup)
            }
            Some((_, Verdict::StayApart)) => seen.closed_split_brain && lost.is_none(),
            Some((_, Verdict::DiscardBackup)) | None => !seen.closed_split_brain && lost.is_none(),
        };
        if ok {
            return Ok(());
        }
        let what = format!(
            "primary {r} got the backup's Hello on connection {id}: the verdict is {:?}, but it {}, {}, and is a {role:?}",
            j.split.map(|(sb, v)| (sb.to_string(), verdict_name(v))),
            match lost {
                Some(sb) => format!("gave up its writes to {sb}"),
                None => "kept its writes".into(),
            },
            if seen.closed_split_brain {
                "dropped the connection for a split brain"
            } else {
                "did not drop the connection for a split brain"
            },
        );
        Err(self.fail(Checker::SplitBrainOutcomeWrong, what))
    }

    /// Checker 11 at a convergence: after a verdict, with no crash, role change or other
    /// discard since, both nodes hold the winner's records.
    pub(super) fn confirm_verdicts(&mut self) -> Result<(), SimFailure> {
        let now = self.watch.disturbances;
        for i in 0..self.watch.verdicts.len() {
            let v = &self.watch.verdicts[i];
            if v.settled {
                continue;
            }
            if v.disturbances == now {
                for r in NodeName::BOTH {
                    let Some(n) = self.node(r) else { continue };
                    if let Some(&(s, t)) = v
                        .winner_suffix
                        .iter()
                        .find(|&&(s, t)| n.term_at(s) != Some(t))
                    {
                        return Err(self.fail(
                            Checker::SplitBrainOutcomeWrong,
                            format!(
                                "{} lost a split brain after seq {}, but at the next convergence {r} lacks the winner's seq {s} of term {t:#x}",
                                v.loser, v.common
                            ),
                        ));
                    }
                }
            }
            self.watch.verdicts[i].settled = true;
        }
        Ok(())
    }

    /// Checker 11 at the end: no record a verdict discarded is in the final history.
    pub(super) fn check_discarded_stay_gone(&self, log: &[u64]) -> Result<(), SimFailure> {
        for &(s, t) in &self.watch.verdict_discarded {
            if s >= 1 && log.get(s as usize - 1) == Some(&t) {
                return Err(self.fail(
                    Checker::SplitBrainOutcomeWrong,
                    format!("seq {s} of term {t:#x} was discarded by a split-brain verdict, yet it is in the final history"),
                ));
            }
        }
        Ok(())
    }
}
