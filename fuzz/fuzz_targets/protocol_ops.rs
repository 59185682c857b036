//! Sequences of protocol operations on a primary and a backup core (writes, deliveries, drops,
//! reconnects, crashes, ticks), checked against a simple model: the primary applies only what the
//! backup acknowledged or what it applied degraded, completions come in order, and after a final
//! reconnect both regions equal the model.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mirror_proto::testing::{Durable, Node, Role, PEER};
use mirror_proto::{CoreConfig, PeerLossPolicy};

const REGION: u64 = 1024;

fn cfg(id: u64, policy: PeerLossPolicy) -> CoreConfig {
    CoreConfig {
        node_id: id,
        region_size: REGION,
        queue_format_version: 1,
        on_peer_loss: policy,
        on_fenced: mirror_proto::FencedPolicy::Demote,
        after_split_brain: mirror_proto::SplitBrainPolicy::Disconnect,
        ack_timeout_us: 100,
        handshake_timeout_us: 500,
        sync_queue_before_ack: false,
        max_write_len: 64,
        queue_capacity: 1 << 20,
        deferred_commit: false,
        chunk_size: mirror_proto::MIN_CHUNK_SIZE,
        resync_rate: 0,
        initial_sync: false,
    }
}

fuzz_target!(|ops: &[u8]| {
    let policy = if ops.first().is_some_and(|b| b & 1 == 1) { PeerLossPolicy::Block } else { PeerLossPolicy::Continue };
    let mut p = Node::start(Role::Primary, cfg(1, policy), Durable::fresh(REGION));
    let mut b = Node::start(Role::Backup, cfg(2, policy), Durable::fresh(REGION));
    let mut up = false;
    let mut now = 0u64;
    let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
    let connect = |p: &mut Node, b: &mut Node| {
        p.outbox.clear();
        b.outbox.clear();
        p.hung_up = false;
        b.hung_up = false;
        b.core.on_connected(PEER);
        b.run();
        p.core.on_connected(PEER);
        p.run();
    };
    let deliver = |p: &mut Node, b: &mut Node, rounds: usize| {
        for _ in 0..rounds {
            let to_b: Vec<_> = p.outbox.drain(..).collect();
            let to_p: Vec<_> = b.outbox.drain(..).collect();
            if to_b.is_empty() && to_p.is_empty() { break; }
            for m in to_b { b.core.on_message(PEER, m); }
            b.core.end_batch();
            b.run();
            for m in to_p { p.core.on_message(PEER, m); }
            p.core.end_batch();
            p.run();
        }
    };
    for chunk in ops.chunks(3).take(200) {
        if p.fatal.is_some() { return; }
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
                    p.core.submit(t, off, Bytes::from(data.clone()).into()).unwrap();
                    p.core.end_batch();
                    p.run();
                    model.push((off, data));
                    // Now and then the queue is taken as full: a primary writing without its
                    // backup folds it into the dirty-chunk bitmap (the backup's return is then
                    // a resync).
                    if x & 0x80 != 0 && p.core.fold() {
                        p.run();
                    }
                }
            }
            2 => if up { deliver(&mut p, &mut b, (x % 4 + 1) as usize) },
            3 => if !up { connect(&mut p, &mut b); up = true; },
            4 => {
                up = false;
                p.core.on_disconnected(PEER); p.core.end_batch(); p.run();
                b.core.on_disconnected(PEER); b.core.end_batch(); b.run();
            }
            5 => {
                up = false;
                b.core.on_disconnected(PEER); b.run();
                if x & 1 == 0 { p.crash_and_restart() } else { p.core.on_disconnected(PEER); p.run(); b.crash_and_restart() }
            }
            6 => { p.core.on_tick(); p.core.end_batch(); p.run(); b.core.on_tick(); b.core.end_batch(); b.run(); }
            _ => if !up { p.core.on_connect_failed(); p.run(); },
        }
        if p.hung_up || b.hung_up {
            up = false;
            p.core.on_disconnected(PEER); p.run();
            b.core.on_disconnected(PEER); b.run();
        }
    }
    if p.fatal.is_some() { return; }
    // Liveness: reconnect and settle; everything submitted converges on both nodes. Time moves
    // in steps shorter than a heartbeat interval (a quarter of the ack timeout), so a live
    // connection never looks silent; one that idled past a timeout before is replaced once.
    for round in 0..2 {
        if !up || p.hung_up || b.hung_up {
            p.core.on_disconnected(PEER); p.core.end_batch(); p.run();
            b.core.on_disconnected(PEER); b.core.end_batch(); b.run();
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
        if p.fatal.is_some() { return; }
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
