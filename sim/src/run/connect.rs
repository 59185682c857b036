//! The pair's connections, made as the real node makes them (`src/node/poller/connection.rs`):
//! a primary whose core is disconnected dials its peer every reconnect interval; every node
//! accepts; the first message of an accepted connection must be a Hello, which goes to
//! `Replica::admit` (a primary hearing a newer primary is fenced there and, demoted, judges the
//! Hello as a backup would); once admitted, the connection replaces the one the node talked to.
//! Two primaries may dial each other at once.

use mirror_proto::{Hello, Message, PeerFault, PeerId, Phase, RejectCode, WireRole};

use super::split_brain::Judged;
use super::Sim;
use crate::net::{Connection, Delivery, NodeName};

/// How long an accepted connection may wait for its first Hello before the node drops it. The
/// real node waits 5 s; a pending connection costs nothing here, so this only bounds what a
/// dialer that died or went silent leaves behind.
const HELLO_DEADLINE_STEPS: u64 = 1_000;

/// The real node's reconnect interval, in steps.
const RECONNECT_STEPS: u64 = 25;

/// One connection and what the simulation knows of it.
pub(super) struct Link {
    pub conn: Connection,
    /// The node that dialed (a primary when it did).
    pub dialer: NodeName,
    /// Whether the acceptor's core took it (its first Hello was admitted).
    pub admitted: bool,
    /// The step by which the acceptor drops it if no Hello came.
    hello_deadline: u64,
    /// The dialer's Hello, as the acceptor's core took it.
    pub primary_hello: Option<Hello>,
    /// The split-brain checker's reading of this handshake, once the backup answered.
    pub judged: Option<Judged>,
    /// Whether the dialer's handling of the backup's Hello was judged already.
    pub answer_judged: bool,
}

/// The connections, and which one each node's core talks to.
#[derive(Default)]
pub(super) struct Network {
    pub links: Vec<Link>,
    /// The connection (its id is the core's `PeerId`) each node's core talks to.
    pub current: [Option<u64>; 2],
    next_id: u64,
    /// When each node may dial again.
    next_dial_step: [u64; 2],
    /// No connection gets through before this step.
    pub partitioned_until: u64,
}

impl Network {
    /// Whether `peer` names `r`'s current connection (effects for an older one are dropped).
    pub fn is_current(&self, r: NodeName, peer: PeerId) -> bool {
        self.current[r.index()] == Some(peer.0)
    }

    pub fn link(&self, id: u64) -> Option<&Link> {
        self.links.iter().find(|l| l.conn.id == id)
    }

    pub fn link_mut(&mut self, id: u64) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.conn.id == id)
    }

    /// `r` dials at its next chance (a new primary, an operator's resolution), as the real node
    /// does after a role change.
    pub fn dial_soon(&mut self, r: NodeName) {
        self.next_dial_step[r.index()] = 0;
    }

    /// Whether `r`'s end of `link` is a connection it accepted and has not admitted yet.
    fn awaits_hello(link: &Link, r: NodeName) -> bool {
        link.dialer != r && !link.admitted
    }
}

impl Sim<'_> {
    /// Forgets finished connections, closes ends no core talks to, and lets primaries dial.
    pub(super) fn manage_connections(&mut self) {
        self.net.links.retain(|l| !l.conn.is_finished());
        let step = self.step;
        let current = self.net.current;
        for link in &mut self.net.links {
            for r in NodeName::BOTH {
                let talks = current[r.index()] == Some(link.conn.id);
                if link.conn.is_open(r) && !talks && !Network::awaits_hello(link, r) {
                    // A node drops a connection once its core no longer talks on it.
                    link.conn.close(r, step, 1);
                }
            }
        }
        for r in NodeName::BOTH {
            self.dial(r);
        }
    }

    /// A primary whose core is disconnected connects to its peer, as the real node does every
    /// reconnect interval; it fails while the peer is down or the network partitioned.
    fn dial(&mut self, r: NodeName) {
        let step = self.step;
        let Some(n) = self.node(r) else {
            return;
        };
        if n.role() != WireRole::Primary
            || n.exec.core.phase() != Phase::Disconnected
            || step < self.net.next_dial_step[r.index()]
        {
            return;
        }
        let talking = self.net.current[r.index()]
            .and_then(|id| self.net.link(id))
            .is_some_and(|l| l.conn.is_open(r));
        if talking {
            return;
        }
        self.net.next_dial_step[r.index()] = step + RECONNECT_STEPS;
        let reachable =
            self.nodes[r.other().index()].is_some() && step >= self.net.partitioned_until;
        if !reachable {
            if let Some(n) = self.node_mut(r) {
                n.exec.core.on_connect_failed();
            }
            return;
        }
        self.net.next_id += 1;
        let id = self.net.next_id;
        self.net.links.push(Link {
            conn: Connection::new(id),
            dialer: r,
            admitted: false,
            hello_deadline: step + HELLO_DEADLINE_STEPS,
            primary_hello: None,
            judged: None,
            answer_judged: false,
        });
        self.net.current[r.index()] = Some(id);
        self.trace(format_args!("connection {id} from {r}"));
        if let Some(n) = self.node_mut(r) {
            n.exec.core.on_connected(PeerId(id));
        }
    }

    /// Feeds `r`'s core what its connections delivered this step: first the admission of
    /// accepted connections (their first Hello), then the messages of the connection it talks
    /// to. Returns whether anything arrived.
    pub(super) fn take_inputs(&mut self, r: NodeName) -> Result<bool, super::SimFailure> {
        let step = self.step;
        let current = self.net.current[r.index()];
        let mut admissions = Vec::new();
        let mut inputs = Vec::new();
        for link in &mut self.net.links {
            let accepting = Network::awaits_hello(link, r);
            if !link.conn.is_open(r) || (!accepting && current != Some(link.conn.id)) {
                continue;
            }
            let mut out = Vec::new();
            link.conn.deliver(r, step, &mut out);
            if !accepting {
                inputs = out;
            } else if !out.is_empty() || step >= link.hello_deadline {
                admissions.push((link.conn.id, out));
            }
        }
        let mut worked = !inputs.is_empty();
        for (id, out) in admissions {
            worked |= !out.is_empty();
            if let Some(rest) = self.admit(r, id, out) {
                // The frames of the connection it replaced go with it, unread.
                inputs = rest;
            }
        }
        self.feed(r, inputs);
        Ok(worked)
    }

    /// The first frames of connection `id`, accepted by `r`: a Hello that `admit` takes makes
    /// it `r`'s connection (what followed the Hello is returned, for the core); anything else
    /// is refused.
    fn admit(&mut self, r: NodeName, id: u64, out: Vec<Delivery>) -> Option<Vec<Delivery>> {
        let mut rest = out.into_iter();
        let hello = match rest.next() {
            Some(Delivery::Message(Message::Hello(h))) => h,
            Some(Delivery::Message(other)) => {
                let why = format!("first message was {:?}, expected Hello", other.kind());
                self.refuse_connection(r, id, RejectCode::ProtocolViolation, why);
                return None;
            }
            Some(Delivery::Garbage(e)) => {
                self.refuse_connection(r, id, RejectCode::ProtocolViolation, e.to_string());
                return None;
            }
            // The dialer gave up before its Hello arrived.
            Some(Delivery::Disconnected) => return None,
            None => {
                self.trace(format_args!("{r} drops connection {id}: no Hello in time"));
                self.close_end(id, r, 1);
                return None;
            }
        };
        let node = self.nodes[r.index()]
            .as_mut()
            .expect("inputs of an up node");
        if let Err((code, reason)) = node.exec.core.admit(&hello) {
            self.refuse_connection(r, id, code, reason);
            return None;
        }
        let replaced = self.net.current[r.index()].replace(id);
        if let Some(link) = self.net.link_mut(id) {
            link.admitted = true;
            link.primary_hello = Some((*hello).clone());
        }
        if let Some(old) = replaced {
            self.close_end(old, r, 1);
        }
        let node = self.nodes[r.index()]
            .as_mut()
            .expect("inputs of an up node");
        if let Some(old) = replaced {
            node.exec.core.on_disconnected(PeerId(old));
        }
        node.exec.core.on_connected(PeerId(id));
        node.exec.core.on_message(PeerId(id), Message::Hello(hello));
        self.trace(format_args!(
            "{r} admits connection {id}{}",
            replaced.map_or(String::new(), |old| format!(" (replacing {old})"))
        ));
        Some(rest.collect())
    }

    /// `r` answers connection `id` with a reject and closes it, as the real node does with a
    /// Hello its core does not admit.
    fn refuse_connection(&mut self, r: NodeName, id: u64, code: RejectCode, reason: String) {
        self.trace(format_args!(
            "{r} refuses connection {id} ({code:?}): {reason}"
        ));
        let delay = if self.faults {
            self.rng.u64(0..=self.swarm.delay_max_steps)
        } else {
            self.rng.u64(0..=2)
        };
        let at = self.step + 1 + delay;
        self.send_on(
            id,
            r,
            &mirror_proto::Message::Reject { code, reason },
            at,
            None,
        );
        let close_delay = self.rng.u64(0..5);
        self.close_end(id, r, close_delay);
    }

    /// The messages of `r`'s current connection go to its core, as the real node's inbox.
    fn feed(&mut self, r: NodeName, mut inputs: Vec<Delivery>) {
        let Some(id) = self.net.current[r.index()] else {
            return;
        };
        if inputs.is_empty() {
            return;
        }
        let peer = PeerId(id);
        let mut close = self.drop_writes_without_room(r, &mut inputs);
        // Said once the node is no longer borrowed.
        let mut events = Vec::new();
        let node = self.nodes[r.index()]
            .as_mut()
            .expect("inputs of an up node");
        let dialer = self.net.link(id).map(|l| l.dialer);
        let mut answer = None;
        for d in inputs {
            match d {
                Delivery::Message(m) => {
                    let handshaking = node.exec.core.phase() == Phase::Handshaking;
                    if matches!(m, Message::Hello(_)) && dialer == Some(r) && handshaking {
                        answer = Some(id);
                    }
                    node.exec.core.on_message(peer, m);
                }
                Delivery::Disconnected => node.exec.core.on_disconnected(peer),
                Delivery::Garbage(e) => {
                    close = true;
                    node.exec.core.on_disconnected(peer);
                    events.push(format!("{r} drops the connection: {e}"));
                }
            }
        }
        for e in events {
            self.trace(e);
        }
        if let Some(id) = answer {
            self.note_answer_delivered(r, id);
        }
        let open = self
            .net
            .link(id)
            .is_some_and(|l| l.conn.is_open(r) && !close);
        if close {
            self.close_end(id, r, 1);
        }
        if !open {
            self.net.current[r.index()] = None;
        }
    }

    /// As the real backup: a backup takes writes only while its queue has room for them; at
    /// the first that would not fit, it drops the connection (the primary reconnects, its
    /// Hello lets it trim, and the catch-up resends the rest) instead of failing. Cuts
    /// `inputs` there; returns whether it did.
    fn drop_writes_without_room(&mut self, r: NodeName, inputs: &mut Vec<Delivery>) -> bool {
        let Some(node) = self.nodes[r.index()].as_ref() else {
            return false;
        };
        if node.role() != WireRole::Backup {
            return false;
        }
        let q = &node.exec.queue;
        let full_at = q.first_write_without_room(inputs.iter().map(|d| match d {
            Delivery::Message(Message::Write { seq, data, .. }) => Some((*seq, data.len())),
            _ => None,
        }));
        let Some(at) = full_at else {
            return false;
        };
        let why = format!(
            "{r}'s queue has no room ({} records from {:?}, {} of {} bytes free): dropping the connection",
            q.len_records(),
            q.first_seq(),
            q.free_bytes(),
            q.capacity_bytes()
        );
        inputs.truncate(at);
        inputs.push(Delivery::Disconnected);
        self.report.room_drops += 1;
        self.trace(why);
        true
    }

    /// `r` closes its end of connection `id`: the peer learns `delay` steps after the frames
    /// in flight.
    fn close_end(&mut self, id: u64, r: NodeName, delay: u64) {
        let step = self.step;
        if let Some(link) = self.net.link_mut(id) {
            link.conn.close(r, step, delay);
        }
    }

    /// The core of `r` dropped its connection `to` (after what it sent before): its own end is
    /// gone at once.
    pub(super) fn close_current(&mut self, r: NodeName, to: PeerId, fault: Option<&PeerFault>) {
        let delay = self.rng.u64(0..5);
        let step = self.step;
        let open = self.net.link(to.0).is_some_and(|l| l.conn.is_open(r));
        if open {
            if let Some(link) = self.net.link_mut(to.0) {
                link.conn.close(r, step, delay);
            }
            match fault {
                Some(f) => self.trace(format_args!("{r} closes connection {}: {f}", to.0)),
                None => self.trace(format_args!("{r} closes connection {}", to.0)),
            }
            if let Some(n) = self.node_mut(r) {
                n.exec.core.on_disconnected(to);
            }
        }
        self.net.current[r.index()] = None;
    }

    /// `r` goes down: its ends vanish. A crash resets them (the peer learns soon) or, a dead
    /// host, leaves the peer hearing nothing (its timeouts must notice); a stopped process's
    /// kernel resets them.
    pub(super) fn drop_ends(&mut self, r: NodeName, how: super::Down) {
        let step = self.step;
        for i in 0..self.net.links.len() {
            if !self.net.links[i].conn.is_open(r) {
                continue;
            }
            if how != super::Down::Crash || self.rng.bool() {
                let d = self.rng.u64(0..5);
                self.net.links[i].conn.close(r, step, d);
            } else {
                let conn = &mut self.net.links[i].conn;
                conn.blackhole(r.other());
                conn.close(r, step, u64::MAX / 2);
            }
        }
        self.net.current[r.index()] = None;
    }

    /// The dialer `r` got the backup's Hello on connection `id` while handshaking: the
    /// split-brain checker judges what it does with it once its batch ran.
    fn note_answer_delivered(&mut self, r: NodeName, id: u64) {
        if let Some(link) = self.net.link_mut(id) {
            if !link.answer_judged {
                link.answer_judged = true;
                self.watch.batch[r.index()].answer_delivered = Some(id);
            }
        }
    }
}
