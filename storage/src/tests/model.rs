//! Random append/trim/reset/metadata sequences against a `VecDeque` model; the queue is
//! closed and reopened after every step and must come back identical.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::{offset_for, params, payload, records};
use crate::{Durability, PersistentQueue, StorageError};

#[derive(Clone, Debug)]
enum Op {
    Append { len: usize },
    Trim { back: u64 },
    Reset { ahead: u64 },
    Applied(u64),
    Peer(u64),
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..=976).prop_map(|len| Op::Append { len }),
        4 => (1usize..=40).prop_map(|len| Op::Append { len }),
        3 => (0u64..6).prop_map(|back| Op::Trim { back }),
        1 => (0u64..4).prop_map(|ahead| Op::Reset { ahead }),
        1 => any::<u64>().prop_map(Op::Applied),
        1 => (0u64..4).prop_map(Op::Peer),
        1 => Just(Op::Sync),
    ]
}

#[derive(Default)]
struct Model {
    records: VecDeque<(u64, u64, Vec<u8>)>,
    next_seq: u64,
    applied: u64,
    peer: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reopen_after_every_step_gives_back_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let mut q = PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap();
        let mut m = Model { next_seq: 1, ..Model::default() };
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Append { len } => {
                    let seq = m.next_seq;
                    let p = payload(seq, len, 0);
                    match q.append(seq, offset_for(seq), &p) {
                        Ok(()) => {
                            m.records.push_back((seq, offset_for(seq), p));
                            m.next_seq += 1;
                        }
                        Err(StorageError::Full { needed, free }) => {
                            prop_assert!(needed > free);
                            prop_assert_eq!(free, q.free_bytes());
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Trim { back } => {
                    let through = (m.next_seq - 1).saturating_sub(back);
                    q.trim_through(through).unwrap();
                    m.records.retain(|r| r.0 > through);
                }
                Op::Reset { ahead } => {
                    q.reset_to(m.next_seq + ahead).unwrap();
                    m.records.clear();
                    m.next_seq += ahead;
                }
                Op::Applied(v) => {
                    q.set_applied_through(v).unwrap();
                    m.applied = v;
                }
                Op::Peer(v) => {
                    q.set_peer_node_id(v).unwrap();
                    m.peer = v;
                }
                Op::Sync => q.sync().unwrap(),
            }
            let used = q.used_bytes();
            drop(q);
            let (q2, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
            q = q2;
            let want: Vec<_> = m.records.iter().cloned().collect();
            prop_assert_eq!(records(&q), want, "after op {} {:?}", i, op);
            prop_assert_eq!(q.next_seq(), m.next_seq);
            prop_assert_eq!(q.first_seq(), m.records.front().map(|r| r.0));
            prop_assert_eq!(q.len_records(), m.records.len() as u64);
            prop_assert_eq!(q.used_bytes(), used);
            prop_assert_eq!(q.applied_through(), m.applied);
            prop_assert_eq!(q.peer_node_id(), m.peer);
            prop_assert_eq!(rep.torn_tail_cut_bytes, 0);
            prop_assert_eq!(rep.records, m.records.len() as u64);
        }
    }
}
