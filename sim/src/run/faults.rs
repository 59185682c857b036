//! Faults and crashes: what goes wrong in a step (crashes, cuts, half-open connections,
//! partitions), a node going down and coming back, and the role it comes back in.

use super::{Down, Sim};
use crate::net::NodeName;
use crate::node::{Recovery, SimNode, StartAs};
use crate::report::{Checker, SimFailure};

impl Sim<'_> {
    /// Faults of this step (fault phase only).
    pub(super) fn inject_faults(&mut self) -> Result<(), SimFailure> {
        for r in NodeName::BOTH {
            if self.nodes[r.index()].is_some() && self.chance(self.swarm.crash_ppm) {
                if self.armed[r.index()] || self.rng.bool() {
                    self.crash(r, Down::Crash)?;
                } else {
                    // Half the crashes happen inside the node's next batch of actions.
                    self.armed[r.index()] = true;
                    self.trace(format_args!("{r} will die mid-batch"));
                }
            }
        }
        let any_link = !self.net.links.is_empty();
        if any_link && self.chance(self.swarm.cut_ppm) {
            let delays = [self.rng.u64(0..10), self.rng.u64(0..10)];
            let step = self.step;
            for link in &mut self.net.links {
                link.conn.cut(step, delays);
            }
            self.report.cuts += 1;
            self.trace("cut");
        }
        if any_link && self.chance(self.swarm.half_open_ppm) {
            let to = if self.rng.bool() {
                NodeName::A
            } else {
                NodeName::B
            };
            for link in &mut self.net.links {
                link.conn.blackhole(to);
            }
            self.report.half_opens += 1;
            self.trace(format_args!("half-open: nothing reaches {to}"));
        }
        if self.step >= self.net.partitioned_until && self.chance(self.swarm.partition_ppm) {
            let len = self.rng.u64(1..=self.swarm.partition_max_steps);
            self.partition(len);
        }
        Ok(())
    }

    /// No connection gets through for `len` steps; those up go silent.
    pub(super) fn partition(&mut self, len: u64) {
        self.net.partitioned_until = self.net.partitioned_until.max(self.step + len);
        for link in &mut self.net.links {
            link.conn.blackhole(NodeName::A);
            link.conn.blackhole(NodeName::B);
        }
        self.report.partitions += 1;
        self.trace(format_args!("partition for {len} steps"));
    }

    /// Crashed nodes whose time has come start again (their files were recovered at the crash).
    pub(super) fn restart_due(&mut self) -> Result<(), SimFailure> {
        for r in NodeName::BOTH {
            if self.nodes[r.index()].is_none() && self.step >= self.down_until[r.index()] {
                if let Some(n) = self.restarting[r.index()].take() {
                    self.trace(format_args!("{r} up again as {:?}", n.role()));
                    self.nodes[r.index()] = Some(n);
                    self.client.next_ticket[r.index()] = 1;
                    self.came_up(r)?;
                }
            }
        }
        Ok(())
    }

    /// One node goes down now (its connections' ends vanish: the peer learns of it later or
    /// times out) and comes back after a while. Actions the core asked for and the node did
    /// not execute are lost with it.
    pub(super) fn crash(&mut self, r: NodeName, how: Down) -> Result<(), SimFailure> {
        self.armed[r.index()] = false;
        let Some(node) = self.nodes[r.index()].take() else {
            return Ok(());
        };
        // Every node, every policy: a `continue` primary's power loss too (terms and log
        // matching keep the two histories apart; checkers 8 and 9 hold them to it).
        let power = how == Down::Crash && self.rng.u32(0..100) < self.swarm.power_loss_percent;
        match how {
            Down::Crash => self.report.crashes[r.index()] += 1,
            Down::Stopped => self.report.fenced_stops += 1,
            Down::Restarted => {}
        }
        self.roles.told[r.index()] = None;
        if power {
            self.report.power_losses += 1;
        }
        let role = node.role();
        let what = match how {
            Down::Crash => "crash",
            Down::Stopped => "stop",
            Down::Restarted => "restart",
        };
        self.trace(format_args!(
            "{what} {r} ({role:?}, {})",
            if power { "power loss" } else { "process" }
        ));
        self.drop_ends(r, how);
        // The client's waits fail with the process (and a restarted driver knows its role).
        self.client.pending[r.index()].clear();
        self.client.canary_believed_term[r.index()] = None;
        let last_before = node.exec.queue.last_seq();
        if node.exec.durable().last_seq < last_before {
            self.trace(format_args!(
                "{r} holds seqs {}..={last_before} not yet durable",
                node.exec.durable().last_seq + 1
            ));
        }
        let start_as = self.restart_role(r, &node, how);
        let (node, tear, recovery) = node
            .crash_and_restart(power, start_as, &mut self.rng)
            .map_err(|e| self.fail(Checker::DurabilityLost, e))?;
        self.trace_recovery(r, last_before, &recovery, start_as);
        self.check_recovery(r, &node, &recovery)?;
        self.check_dropped_completed(r, &recovery)?;
        self.watch.went_down(r);
        self.report.torn_words += tear.written_words;
        self.down_until[r.index()] = self.step + self.rng.u64(0..300);
        if how == Down::Crash && self.rng.u32(0..100) < self.swarm.isolated_restart_percent {
            // It comes back to an unreachable peer.
            let until = self.down_until[r.index()] + self.rng.u64(1..=600);
            self.net.partitioned_until = self.net.partitioned_until.max(until);
            self.report.isolated_restarts += 1;
            self.trace(format_args!("the network is down until step {until}"));
        }
        self.restarting[r.index()] = Some(node);
        Ok(())
    }

    /// The role `r` restarts in: its queue's, or for some crashes the other one (never a
    /// primary that the node's rules keep from being one).
    fn restart_role(&mut self, r: NodeName, node: &SimNode, how: Down) -> StartAs {
        let flip = how == Down::Crash
            && self.role_rng.u32(0..100) < self.swarm.failover.other_role_restart_percent;
        match (flip, node.exec.queue.role()) {
            (false, _) => StartAs::PersistedRole,
            (true, mirror_storage::Role::Backup) if self.kept_from_primary_at_crash(r) => {
                StartAs::PersistedRole
            }
            (true, _) => {
                self.report.other_role_restarts += 1;
                StartAs::OtherRole
            }
        }
    }

    /// What `r`'s recovery kept, for the trace.
    fn trace_recovery(&mut self, r: NodeName, last_before: u64, rec: &Recovery, as_: StartAs) {
        if rec.last_seq < last_before {
            self.trace(format_args!(
                "{r} lost seqs {}..={last_before}",
                rec.last_seq + 1
            ));
        }
        if rec.refused_primary {
            self.report.refused_primary_starts += 1;
            self.trace(format_args!(
                "{r} cannot start as a primary (superseded, or a transfer into it unfinished): started as a backup"
            ));
        }
        self.trace(format_args!(
            "{r} recovered through seq {} with terms {:?}, to start as {:?} ({as_:?})",
            rec.last_seq,
            rec.terms.entries(),
            rec.role
        ));
    }

    /// Whether `r`, crashing, must not restart as a primary (see `kept_from_primary`).
    pub(super) fn kept_from_primary_at_crash(&self, r: NodeName) -> bool {
        self.watch.repairing[r.index()].is_some()
    }
}
