//! Role events of the fault phase and the simulated operator.
//!
//! Events, each at its seed's rate (drawn from the failover stream): a failover (the primary
//! crashes or is cut off, and the backup is promoted with `promote(false)` once it notices it
//! is disconnected), a forced promotion of a connected backup (`promote(true)`), a live
//! demotion of the primary (then a backup is promoted once it notices: usually the other node,
//! a switchover), and a long partition during which the backup is promoted (two primaries:
//! under `continue` both write, and they meet in a split brain). Restarts in the other role are
//! drawn at each crash (see `Sim::crash`).
//!
//! The operator acts in both phases: after its delay, it resolves a split brain that keeps the
//! nodes apart (naming a node whose writes go, and telling the node it keeps), and promotes a
//! backup when both nodes are up and neither is a primary (again and again, promptly, a
//! split-brain winner that its loser refused as stale, until its term passes the loser's).
//! A node that a fence stopped is started again as a backup by the crash path (`Down`).

use mirror_proto::{Phase, WireRole};

use super::{Down, Sim};
use crate::net::NodeName;
use crate::report::SimFailure;

/// How long an armed promotion waits for its backup to notice it is disconnected, in steps.
const PROMOTION_WAIT_STEPS: u64 = 3_000;

/// Role changes waiting for their moment.
#[derive(Default)]
pub(super) struct RolePlan {
    /// A node to promote (`promote(false)`) once it is an up backup that is disconnected, until
    /// this step.
    promote_when_alone: [Option<u64>; 2],
    /// Since when a split brain has kept the nodes apart.
    split_brain_since: Option<u64>,
    /// The node whose writes the operator chose to discard, kept while the split brain lasts
    /// (two different choices on the two nodes keep them apart, by design).
    discard_choice: Option<NodeName>,
    /// Since when both nodes have been up and neither a primary.
    no_primary_since: Option<u64>,
    /// The node each node was told to discard, until it restarts (a core keeps it in memory
    /// until a handshake uses it).
    pub told: [Option<NodeName>; 2],
}

impl RolePlan {
    /// The liveness phase: no new role events; what is armed is dropped (the operator still
    /// acts).
    pub fn faults_stop(&mut self) {
        self.promote_when_alone = [None, None];
    }
}

impl Sim<'_> {
    fn role_chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.role_rng.u32(0..1_000_000) < ppm
    }

    /// An up node in `role`, if any (drawn, when both are).
    fn up_in(&mut self, role: WireRole) -> Option<NodeName> {
        let both: Vec<NodeName> = NodeName::BOTH
            .into_iter()
            .filter(|&r| self.role_of(r) == Some(role))
            .collect();
        match both.as_slice() {
            [] => None,
            [one] => Some(*one),
            _ => Some(both[self.role_rng.usize(0..both.len())]),
        }
    }

    /// The role events of this step (fault phase only).
    pub(super) fn role_events(&mut self) -> Result<(), SimFailure> {
        let f = self.swarm.failover.clone();
        if self.role_chance(f.failover_ppm) {
            self.fail_over()?;
        }
        if self.role_chance(f.forced_promotion_ppm) {
            self.force_promotion();
        }
        if self.role_chance(f.demotion_ppm) {
            self.demote_primary();
        }
        if self.role_chance(f.split_brain_ppm) {
            if let Some(b) = self.up_in(WireRole::Backup) {
                let len = self.role_rng.u64(300..=2_500);
                self.trace(format_args!(
                    "split-brain partition: {b} is promoted once alone"
                ));
                self.partition(len);
                self.arm_promotion(b);
            }
        }
        self.promote_armed();
        Ok(())
    }

    /// The primary crashes or is cut off; its backup is promoted once it notices.
    fn fail_over(&mut self) -> Result<(), SimFailure> {
        let Some(p) = self.up_in(WireRole::Primary) else {
            return Ok(());
        };
        let b = p.other();
        if self.role_rng.bool() {
            self.trace(format_args!(
                "failover: {p} crashes, {b} is promoted once alone"
            ));
            self.crash(p, Down::Crash)?;
        } else {
            let len = self.role_rng.u64(10..=600);
            self.trace(format_args!(
                "failover: {p} is cut off, {b} is promoted once alone"
            ));
            self.partition(len);
        }
        self.arm_promotion(b);
        Ok(())
    }

    fn arm_promotion(&mut self, r: NodeName) {
        self.roles.promote_when_alone[r.index()] = Some(self.step + PROMOTION_WAIT_STEPS);
    }

    /// Why `r` must not become a primary now (None: it may): the node's rule, a node whose
    /// repair of a divergent suffix is unfinished is neither promoted (the core refuses
    /// `promote(false)`) nor opened as a primary (`src/node/open.rs`). The simulated nodes save
    /// no discarded-records file, so the simulator tracks the repair itself.
    pub(super) fn kept_from_primary(&self, r: NodeName) -> Option<&'static str> {
        self.node_or_restarting(r)?;
        if self.watch.repairing[r.index()].is_some() {
            return Some("its repair of a divergent suffix was interrupted");
        }
        None
    }

    /// A backup connected to a live primary is promoted by force (that primary is fenced when
    /// it next meets it).
    fn force_promotion(&mut self) {
        let connected = |n: &crate::node::SimNode| {
            n.role() == WireRole::Backup && n.exec.core.connected_primary().is_some()
        };
        let Some(b) = NodeName::BOTH
            .into_iter()
            .find(|&r| self.node(r).is_some_and(connected))
        else {
            return;
        };
        if let Some(why) = self.kept_from_primary(b) {
            self.trace(format_args!("{b} not promoted by force: {why}"));
            return;
        }
        let Some(node) = self.node_mut(b) else {
            return;
        };
        if node.exec.core.stats().resync_target {
            // Forced, the region is taken as it is, and it may hold writes outside the log
            // (what a crash in a catch-up or a resync left): an operator who wants no write
            // lost does not force it, and neither does the simulation.
            self.trace(format_args!(
                "{b} not promoted by force: a resync or catch-up into it is unfinished"
            ));
            return;
        }
        match node.exec.core.promote(true) {
            Ok(term) => {
                self.report.forced_promotions += 1;
                self.trace(format_args!("{b} promoted by force: term {term:#x}"));
            }
            Err(e) => self.trace(format_args!("{b} not promoted by force: {e}")),
        }
    }

    /// The primary is demoted live; a backup is promoted once it notices it is alone.
    fn demote_primary(&mut self) {
        let Some(p) = self.up_in(WireRole::Primary) else {
            return;
        };
        let Some(node) = self.node_mut(p) else {
            return;
        };
        match node.exec.core.demote() {
            Ok(()) => {
                self.report.demotions += 1;
                // Usually a switchover to the other node; sometimes the same node comes back.
                let next = if self.role_rng.u32(0..4) == 0 {
                    p
                } else {
                    p.other()
                };
                self.trace(format_args!("{p} demoted; {next} is promoted once alone"));
                self.arm_promotion(next);
            }
            Err(e) => self.trace(format_args!("{p} not demoted: {e}")),
        }
    }

    /// Armed promotions whose backup is now disconnected happen.
    fn promote_armed(&mut self) {
        for r in NodeName::BOTH {
            let Some(until) = self.roles.promote_when_alone[r.index()] else {
                continue;
            };
            let Some(node) = self.node(r) else {
                continue;
            };
            if self.step > until || node.role() == WireRole::Primary {
                self.roles.promote_when_alone[r.index()] = None;
                continue;
            }
            if node.exec.core.phase() != Phase::Disconnected {
                continue;
            }
            self.roles.promote_when_alone[r.index()] = None;
            self.promote(r, "alone");
        }
    }

    /// `r`, a disconnected backup, is promoted (`promote(false)`). Returns its new term.
    fn promote(&mut self, r: NodeName, why: &str) -> Option<u64> {
        if let Some(not) = self.kept_from_primary(r) {
            self.trace(format_args!("{r} not promoted ({why}): {not}"));
            return None;
        }
        let node = self.node_mut(r)?;
        match node.exec.core.promote(false) {
            Ok(term) => {
                self.report.promotions += 1;
                self.trace(format_args!("{r} promoted ({why}): term {term:#x}"));
                Some(term)
            }
            Err(e) => {
                self.trace(format_args!("{r} not promoted ({why}): {e}"));
                None
            }
        }
    }

    /// The simulated operator, in both phases.
    pub(super) fn operator(&mut self) -> Result<(), SimFailure> {
        self.resolve_split_brain_after_delay()?;
        self.promote_when_no_primary();
        Ok(())
    }

    /// A split brain that keeps the nodes apart (either node reports it) is resolved after the
    /// operator's delay, and again after another while it persists: the operator names one of
    /// the two nodes, whose writes after the common point go.
    fn resolve_split_brain_after_delay(&mut self) -> Result<(), SimFailure> {
        let apart = NodeName::BOTH.into_iter().any(|r| {
            self.node(r)
                .is_some_and(|n| n.exec.core.stats().split_brain.is_some())
        });
        if !apart {
            self.roles.split_brain_since = None;
            self.roles.discard_choice = None;
            return Ok(());
        }
        let since = *self.roles.split_brain_since.get_or_insert(self.step);
        if self.step - since < self.swarm.failover.operator_delay_steps {
            return Ok(());
        }
        self.roles.split_brain_since = Some(self.step);
        let drawn = if self.role_rng.bool() {
            NodeName::A
        } else {
            NodeName::B
        };
        // A node whose repair was interrupted must not win (see `kept_from_primary`): its
        // suffix goes.
        let repairing = NodeName::BOTH
            .into_iter()
            .find(|&r| self.watch.repairing[r.index()].is_some());
        let drawn = match repairing {
            Some(r) => r,
            _ => drawn,
        };
        let discard = *self.roles.discard_choice.get_or_insert(drawn);
        self.operator_resolves(discard)
    }

    /// The operator names `discard` as the node whose writes after the common point go.
    ///
    /// It tells one node, either, as the documentation says is enough (waiting while that node
    /// is down). A choice it told the loser earlier, naming the other node, would keep the two
    /// apart (two different choices do, by design), and the API cannot withdraw one: the
    /// operator restarts the loser first.
    fn operator_resolves(&mut self, discard: NodeName) -> Result<(), SimFailure> {
        let on = if self.role_rng.bool() {
            discard
        } else {
            discard.other()
        };
        if self.node(on).is_none() {
            return Ok(());
        }
        let lingering = self.roles.told[discard.index()];
        if lingering == Some(discard.other()) {
            self.trace(format_args!(
                "operator restarts {discard} to withdraw its earlier choice ({} discarded)",
                discard.other()
            ));
            self.crash(discard, Down::Restarted)?;
        }
        let id = self.ids[discard.index()];
        if let Some(node) = self.node_mut(on) {
            node.exec.core.resolve_split_brain(id);
        }
        self.roles.told[on.index()] = Some(discard);
        self.net.dial_soon(on);
        self.report.operator_resolutions += 1;
        self.trace(format_args!(
            "operator resolves the split brain on {on}: {discard}'s writes go"
        ));
        Ok(())
    }

    /// Both nodes up and neither a primary (after a demotion, say) for the operator's delay: a
    /// backup is promoted.
    fn promote_when_no_primary(&mut self) {
        let both_backups = NodeName::BOTH
            .into_iter()
            .all(|r| self.role_of(r) == Some(WireRole::Backup));
        let armed = self.roles.promote_when_alone.iter().any(Option::is_some);
        if !both_backups || armed {
            self.roles.no_primary_since = None;
            return;
        }
        let since = *self.roles.no_primary_since.get_or_insert(self.step);
        if self.step - since < self.swarm.failover.operator_delay_steps {
            return;
        }
        self.roles.no_primary_since = None;
        let first = if self.role_rng.bool() {
            NodeName::A
        } else {
            NodeName::B
        };
        // The other one when the first must not (see `kept_from_primary`).
        let r = if self.kept_from_primary(first).is_some() {
            first.other()
        } else {
            first
        };
        self.promote(r, "no primary");
    }
}
