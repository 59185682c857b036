//! Sequences of protocol operations on a primary and a backup core (writes, deliveries, drops,
//! reconnects, crashes, ticks), checked against a simple model: the primary applies only what the
//! backup acknowledged or what it applied degraded, completions come in order, and after a final
//! reconnect both regions equal the model.
#![no_main]
use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mirror_proto::{
    Action, Backup, Core, CoreConfig, Message, PeerLossPolicy, Primary, Record, Recovered,
};

const REGION: u64 = 1024;

#[derive(Clone, Default)]
struct Disk {
    queue: BTreeMap<u64, Record>,
    next_seq: u64,
    applied: u64,
    peer: u64,
    region: Vec<u8>,
}

struct Node {
    primary: bool,
    cfg: CoreConfig,
    core: Core,
    disk: Disk,
    out: Vec<Message>,
    hung_up: bool,
    completed: u64,
    next_ticket: u64,
    failed: bool,
}

fn cfg(id: u64, policy: PeerLossPolicy) -> CoreConfig {
    CoreConfig {
        node_id: id,
        region_size: REGION,
        queue_format_version: 1,
        on_peer_loss: policy,
        ack_timeout_us: 100,
        handshake_timeout_us: 500,
        sync_queue_before_ack: false,
        max_write_len: 64,
        queue_capacity: 1 << 20,
        deferred_commit: false,
    }
}

impl Node {
    fn start(primary: bool, cfg: CoreConfig, disk: Disk) -> Node {
        let rec = Recovered {
            peer_node_id: disk.peer,
            applied_through: disk.applied,
            first_seq: disk.queue.keys().next().copied(),
            last_seq: disk.next_seq - 1,
            unapplied: disk.queue.range(disk.applied + 1..).map(|(_, r)| r.clone()).collect(),
        };
        let core = if primary {
            Core::Primary(Primary::new(cfg.clone(), rec))
        } else {
            Core::Backup(Backup::new(cfg.clone(), rec))
        };
        let mut n = Node { primary, cfg, core, disk, out: vec![], hung_up: false, completed: 0, next_ticket: 1, failed: false };
        n.run();
        n
    }

    fn run(&mut self) {
        let mut actions = Vec::new();
        self.core.drain_actions(&mut actions);
        for a in actions {
            match a {
                Action::Send(m) => self.out.push(m),
                Action::SendQueued { from_seq, through_seq } => {
                    for s in from_seq..=through_seq {
                        let r = self.disk.queue.get(&s).expect("asked to send a record it does not hold");
                        self.out.push(Message::Write { seq: s, offset: r.offset, data: r.data.clone() });
                    }
                }
                Action::Append { record, .. } => {
                    assert_eq!(record.seq, self.disk.next_seq);
                    self.disk.next_seq += 1;
                    self.disk.queue.insert(record.seq, record);
                }
                Action::SyncQueue => {}
                Action::Apply(r) => {
                    let o = r.offset as usize;
                    self.disk.region[o..o + r.data.len()].copy_from_slice(&r.data);
                }
                Action::CommitApplied { through } => {
                    assert!(through >= self.disk.applied);
                    self.disk.applied = through;
                }
                Action::Trim { through } => {
                    assert!(through <= self.disk.applied);
                    self.disk.queue.retain(|&s, _| s > through);
                }
                Action::BindPeer { node_id } => self.disk.peer = node_id,
                Action::Complete { ticket } => {
                    assert!(ticket > self.completed);
                    self.completed = ticket;
                }
                Action::Disconnect(_) => self.hung_up = true,
                Action::Reject { .. } => self.hung_up = true,
                Action::RecoveryStarted => {}
                Action::Fatal(_) => self.failed = true,
            }
        }
    }

    fn crash(&mut self) {
        let disk = self.disk.clone();
        *self = Node::start(self.primary, self.cfg.clone(), disk);
    }
}

fuzz_target!(|ops: &[u8]| {
    let policy = if ops.first().is_some_and(|b| b & 1 == 1) { PeerLossPolicy::Block } else { PeerLossPolicy::Continue };
    let fresh = || Disk { next_seq: 1, region: vec![0; REGION as usize], ..Disk::default() };
    let mut p = Node::start(true, cfg(1, policy), fresh());
    let mut b = Node::start(false, cfg(2, policy), fresh());
    let mut up = false;
    let mut now = 0u64;
    let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
    let connect = |p: &mut Node, b: &mut Node| {
        p.out.clear();
        b.out.clear();
        p.hung_up = false;
        b.hung_up = false;
        b.core.on_connected();
        b.run();
        p.core.on_connected();
        p.run();
    };
    let deliver = |p: &mut Node, b: &mut Node, rounds: usize| {
        for _ in 0..rounds {
            let to_b: Vec<_> = p.out.drain(..).collect();
            let to_p: Vec<_> = b.out.drain(..).collect();
            if to_b.is_empty() && to_p.is_empty() { break; }
            for m in to_b { b.core.on_message(m); }
            b.core.end_batch();
            b.run();
            for m in to_p { p.core.on_message(m); }
            p.core.end_batch();
            p.run();
        }
    };
    for chunk in ops.chunks(3).take(200) {
        if p.failed { return; }
        let (op, x, y) = (chunk[0] % 8, *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0));
        now += 37;
        p.core.set_now(now);
        b.core.set_now(now);
        match op {
            0 | 1 => {
                if p.core.accepts_submissions() {
                    let len = (y % 32 + 1) as usize;
                    let off = (u64::from(x) * 4) % (REGION - len as u64);
                    let data = vec![y.wrapping_add(1); len];
                    let t = p.next_ticket;
                    p.next_ticket += 1;
                    p.core.submit(t, off, Bytes::from(data.clone())).unwrap();
                    p.core.end_batch();
                    p.run();
                    model.push((off, data));
                }
            }
            2 => if up { deliver(&mut p, &mut b, (x % 4 + 1) as usize) },
            3 => if !up { connect(&mut p, &mut b); up = true; },
            4 => {
                up = false;
                p.core.on_disconnected(); p.core.end_batch(); p.run();
                b.core.on_disconnected(); b.core.end_batch(); b.run();
            }
            5 => {
                up = false;
                b.core.on_disconnected(); b.run();
                if x & 1 == 0 { p.crash() } else { p.core.on_disconnected(); p.run(); b.crash() }
            }
            6 => { p.core.on_tick(); p.core.end_batch(); p.run(); b.core.on_tick(); b.core.end_batch(); b.run(); }
            _ => if !up { p.core.on_connect_failed(); p.run(); },
        }
        if p.hung_up || b.hung_up {
            up = false;
            p.core.on_disconnected(); p.run();
            b.core.on_disconnected(); b.run();
        }
    }
    if p.failed { return; }
    // Liveness: reconnect and settle; everything submitted converges on both nodes. Time moves
    // in steps shorter than a heartbeat interval (a quarter of the ack timeout), so a live
    // connection never looks silent; one that idled past a timeout before is replaced once.
    for round in 0..2 {
        if !up || p.hung_up || b.hung_up {
            p.core.on_disconnected(); p.core.end_batch(); p.run();
            b.core.on_disconnected(); b.core.end_batch(); b.run();
            connect(&mut p, &mut b);
            up = true;
        }
        for _ in 0..8 {
            deliver(&mut p, &mut b, 50);
            now += 20;
            p.core.set_now(now);
            b.core.set_now(now);
            p.core.on_tick(); p.core.end_batch(); p.run();
            deliver(&mut p, &mut b, 50);
            b.core.on_tick(); b.core.end_batch(); b.run();
        }
        deliver(&mut p, &mut b, 50);
        if p.failed { return; }
        assert!(round == 0 || !(p.hung_up || b.hung_up), "a fresh connection dropped while settling");
        if !(p.hung_up || b.hung_up) { break; }
    }
    let mut expect = vec![0u8; REGION as usize];
    for (off, data) in &model {
        expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(p.disk.region, b.disk.region, "regions differ");
    assert_eq!(p.disk.region, expect, "region differs from the model");
});
