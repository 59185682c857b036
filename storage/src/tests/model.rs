//! Random append/trim/reset/truncate/metadata/term sequences against a `VecDeque` model; the
//! queue is closed and reopened after every step and must come back identical.

use std::collections::VecDeque;

use mirror_proto::TermHistory;
use proptest::prelude::*;

use super::{offset_for, params, payload};
use crate::{Durability, PersistentQueue, Role, StorageError};

#[derive(Clone, Debug)]
enum Op {
    Append {
        len: usize,
    },
    /// An append in a term below the log's last one: refused, nothing written.
    StaleAppend,
    /// Later appends carry a new term.
    NewTerm {
        ahead: u64,
    },
    SetTerm {
        ahead: u64,
    },
    Trim {
        back: u64,
    },
    Truncate {
        back: u64,
    },
    Reset {
        ahead: u64,
    },
    Applied(u64),
    Peer(u64),
    SwapRole,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..=968).prop_map(|len| Op::Append { len }),
        4 => (1usize..=40).prop_map(|len| Op::Append { len }),
        1 => Just(Op::StaleAppend),
        2 => (1u64..3).prop_map(|ahead| Op::NewTerm { ahead }),
        1 => (0u64..3).prop_map(|ahead| Op::SetTerm { ahead }),
        3 => (0u64..6).prop_map(|back| Op::Trim { back }),
        2 => (0u64..8).prop_map(|back| Op::Truncate { back }),
        1 => (0u64..4).prop_map(|ahead| Op::Reset { ahead }),
        1 => any::<u64>().prop_map(Op::Applied),
        1 => (0u64..4).prop_map(Op::Peer),
        1 => Just(Op::SwapRole),
        1 => Just(Op::Sync),
    ]
}

/// (seq, term, offset, payload)
type Rec = (u64, u64, u64, Vec<u8>);

struct Model {
    records: VecDeque<Rec>,
    next_seq: u64,
    applied: u64,
    peer: u64,
    role: Role,
    /// Term of the next appends.
    term: u64,
    current_term: u64,
    /// Never pruned: the queue's history must be a suffix of it.
    history: TermHistory,
    /// Bumped by every truncation, so that a reused seq gets new bytes.
    salt: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            records: VecDeque::new(),
            next_seq: 1,
            applied: 0,
            peer: 0,
            role: Role::Primary,
            term: 1,
            current_term: 0,
            history: TermHistory::new(),
            salt: 0,
        }
    }

    /// The lowest seq `truncate_after` accepts.
    fn truncation_floor(&self) -> u64 {
        self.records.front().map_or(self.next_seq - 1, |r| r.0 - 1)
    }

    fn apply(&mut self, q: &mut PersistentQueue, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Append { len } => self.append(q, len)?,
            Op::StaleAppend => {
                let last = self.history.last_term();
                let before = std::fs::read(q.path()).unwrap();
                let seq = self.next_seq;
                let e = q
                    .append(seq, last.saturating_sub(1), offset_for(seq), b"stale")
                    .unwrap_err();
                prop_assert!(matches!(e, StorageError::Term { .. }), "{}", e);
                prop_assert_eq!(std::fs::read(q.path()).unwrap(), before, "nothing written");
            }
            Op::NewTerm { ahead } => self.term = self.term.max(self.current_term) + ahead,
            Op::SetTerm { ahead } => {
                let t = self.current_term + ahead;
                q.set_current_term(t).unwrap();
                self.current_term = t;
            }
            Op::Trim { back } => {
                let through = (self.next_seq - 1).saturating_sub(back);
                q.trim_through(through).unwrap();
                self.records.retain(|r| r.0 > through);
            }
            Op::Truncate { back } => self.truncate(q, (self.next_seq - 1).saturating_sub(back))?,
            Op::Reset { ahead } => {
                q.reset_to(self.next_seq + ahead).unwrap();
                self.records.clear();
                self.next_seq += ahead;
            }
            Op::Applied(v) => {
                q.set_applied_through(v).unwrap();
                self.applied = v;
            }
            Op::Peer(v) => {
                q.set_peer_node_id(v).unwrap();
                self.peer = v;
            }
            Op::SwapRole => {
                self.role = match self.role {
                    Role::Primary => Role::Backup,
                    Role::Backup => Role::Primary,
                };
                q.set_role(self.role, false).unwrap();
            }
            Op::Sync => q.sync().unwrap(),
        }
        Ok(())
    }

    fn append(&mut self, q: &mut PersistentQueue, len: usize) -> Result<(), TestCaseError> {
        let seq = self.next_seq;
        let p = payload(seq, len, self.salt);
        match q.append(seq, self.term, offset_for(seq), &p) {
            Ok(()) => {
                self.records.push_back((seq, self.term, offset_for(seq), p));
                self.next_seq += 1;
                self.history.note_append(seq, self.term).unwrap();
                self.current_term = self.current_term.max(self.term);
            }
            Err(StorageError::Full { needed, free }) => {
                prop_assert!(needed > free);
                prop_assert_eq!(free, q.free_bytes());
            }
            Err(e) => panic!("{e}"),
        }
        Ok(())
    }

    fn truncate(&mut self, q: &mut PersistentQueue, seq: u64) -> Result<(), TestCaseError> {
        let floor = self.truncation_floor();
        match q.truncate_after(seq) {
            Ok(()) => {
                prop_assert!(seq >= floor);
                if seq < self.next_seq - 1 {
                    self.records.retain(|r| r.0 <= seq);
                    self.next_seq = seq + 1;
                    self.applied = self.applied.min(seq);
                    self.history.truncate_after(seq);
                    self.salt += 1;
                }
            }
            Err(StorageError::TruncateBelowTrim {
                requested,
                trimmed_through,
            }) => {
                prop_assert!(seq < floor);
                prop_assert_eq!((requested, trimmed_through), (seq, floor));
            }
            Err(e) => panic!("{e}"),
        }
        Ok(())
    }

    fn check(&self, q: &PersistentQueue) -> Result<(), TestCaseError> {
        let got: Vec<Rec> = q
            .iter_from(0)
            .map(|r| {
                let r = r.unwrap();
                (r.seq, r.term, r.offset, r.payload.to_vec())
            })
            .collect();
        let want: Vec<Rec> = self.records.iter().cloned().collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(q.next_seq(), self.next_seq);
        prop_assert_eq!(q.first_seq(), self.records.front().map(|r| r.0));
        prop_assert_eq!(q.len_records(), self.records.len() as u64);
        prop_assert_eq!(q.applied_through(), self.applied);
        prop_assert_eq!(q.peer_node_id(), self.peer);
        prop_assert_eq!(q.role(), self.role);
        prop_assert_eq!(q.current_term(), self.current_term);
        let h = q.term_history();
        prop_assert!(
            self.history.entries().ends_with(h.entries()),
            "{:?} is not a suffix of {:?}",
            h,
            self.history
        );
        prop_assert_eq!(h.last_term(), self.history.last_term());
        for r in &self.records {
            prop_assert_eq!(h.term_at(r.0), Some(r.1), "seq {}", r.0);
        }
        prop_assert!(TermHistory::for_log(h.entries().to_vec(), q.last_seq()).is_ok());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reopen_after_every_step_gives_back_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let mut q = PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap();
        let mut m = Model::new();
        for (i, op) in ops.iter().enumerate() {
            m.apply(&mut q, op)?;
            m.check(&q)?;
            let used = q.used_bytes();
            let epoch = q.epoch();
            drop(q);
            let (q2, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
            q = q2;
            m.check(&q).map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}")))?;
            prop_assert_eq!(q.used_bytes(), used);
            prop_assert_eq!(q.epoch(), epoch + 1);
            prop_assert_eq!(rep.torn_tail_cut_bytes, 0);
            prop_assert_eq!(rep.records, m.records.len() as u64);
        }
    }
}
