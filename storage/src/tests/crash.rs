//! Power-loss simulation, after redb's crash-consistency tests: "written" and "durable" bytes
//! are kept apart, and a crash rebuilds an image the medium could really hold.
//!
//! The queue runs in Process mode with a test hook (`CrashEvent`) that fires after every store
//! of a record or a trusted header word, and on every barrier with the file ranges the barrier
//! makes durable: exactly the cache lines a Pmem barrier writes back (a Power barrier,
//! fdatasync, covers more, so this is the stricter model). The simulator snapshots the file at
//! every such point and after every operation.
//!
//! A crash happens at one of those points, also in the middle of an operation (between a
//! store and the barrier after it). Between barriers the kernel or the CPU may write anything
//! back at any time and in any order, so each unit of the file (an 8-byte word, a cache line,
//! a sector or a page; the unit is drawn per crash) independently holds its last durable value
//! or any value it held later, up to the crash point.
//!
//! After recovery, an outside checker verifies against a model:
//! - every record appended before the last barrier and not trimmed since is there (durability);
//! - every record that is there has exactly the bytes appended with that seq in the current
//!   timeline (no ghosts from before an earlier crash, no invented records);
//! - `next_seq` is at least the durable one and at most the one in memory, and never below a
//!   completed `reset_to`;
//! - `applied_through` and `peer_node_id` are the last values set (they are durable on
//!   return), or the value being set if the crash hit inside the setter.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::{offset_for, params, payload, records, Rng};
use crate::queue::CrashEvent;
use crate::{Durability, PersistentQueue, StorageError};

/// Few sizes, so that records of different timelines land on the same positions (the setting
/// in which a record left over from before a crash could pass for a current one).
const SIZES: [usize; 3] = [40, 200, 500];
/// Write-back units: word (pmem power-fail atomicity), cache line, sector, page. Sectors twice
/// as likely: with the 4 KiB ring they separate records most often.
const UNITS: [usize; 5] = [8, 64, 512, 512, 4096];

/// The medium's state at one point in time.
#[derive(Clone)]
struct Point {
    /// Snapshots `snaps[..snaps_len]` exist at this point.
    snaps_len: usize,
    /// What the medium is guaranteed to hold.
    durable: Arc<Vec<u8>>,
    /// Per 8-byte word: index in `snaps` of the barrier that last made it durable; the word may
    /// hold any version from there on.
    flushed_at: Arc<Vec<usize>>,
    /// Every record with a smaller seq is durable.
    durable_next: u64,
    /// Operation (index into the op list) during or after which this point lies.
    op: usize,
}

struct Sim {
    path: PathBuf,
    /// File images, oldest first, for this session.
    snaps: Vec<Vec<u8>>,
    points: Vec<Point>,
    durable: Arc<Vec<u8>>,
    flushed_at: Arc<Vec<usize>>,
    durable_next: u64,
    /// What a barrier inside the running operation makes durable: every seq below this.
    op_durable_next: u64,
    op: usize,
}

impl Sim {
    /// A new session: the file as it is now is durable.
    fn restart(&mut self, next: u64, op: usize) {
        let img = std::fs::read(&self.path).unwrap();
        self.flushed_at = Arc::new(vec![0; img.len() / 8]);
        self.durable = Arc::new(img.clone());
        self.snaps = vec![img];
        self.durable_next = next;
        self.op_durable_next = next;
        self.op = op;
        self.points.clear();
        self.push_point();
    }

    fn push_point(&mut self) {
        self.points.push(Point {
            snaps_len: self.snaps.len(),
            durable: Arc::clone(&self.durable),
            flushed_at: Arc::clone(&self.flushed_at),
            durable_next: self.durable_next,
            op: self.op,
        });
    }

    fn snapshot(&mut self) {
        let img = std::fs::read(&self.path).unwrap();
        self.snaps.push(img);
        self.push_point();
    }

    fn barrier(&mut self, ranges: &[(usize, usize)]) {
        let img = std::fs::read(&self.path).unwrap();
        let idx = self.snaps.len();
        let durable = Arc::make_mut(&mut self.durable);
        let flushed_at = Arc::make_mut(&mut self.flushed_at);
        for &(off, len) in ranges {
            // Hardware writes back whole cache lines.
            let start = off / 64 * 64;
            let end = ((off + len).div_ceil(64) * 64).min(img.len());
            durable[start..end].copy_from_slice(&img[start..end]);
            flushed_at[start / 8..end / 8].fill(idx);
        }
        self.snaps.push(img);
        self.durable_next = self.durable_next.max(self.op_durable_next);
        self.push_point();
    }

    fn crash_image(&self, p: &Point, rng: &mut Rng) -> Vec<u8> {
        let unit = UNITS[rng.below(UNITS.len() as u64) as usize];
        // Bias per crash: how often a unit keeps its durable value.
        let p_durable = rng.below(101);
        let mut img = (*p.durable).clone();
        for start in (0..img.len()).step_by(unit) {
            if rng.below(100) < p_durable {
                continue;
            }
            // Later versions are possible only from the barrier that last flushed the unit;
            // take the latest such barrier among its words (a unit is written back whole, so
            // it cannot be older than any of its words' last flush).
            let from = (start / 8..(start + unit) / 8)
                .map(|w| p.flushed_at[w])
                .max()
                .unwrap();
            let k = from + rng.below((p.snaps_len - from) as u64) as usize;
            img[start..start + unit].copy_from_slice(&self.snaps[k][start..start + unit]);
        }
        img
    }
}

fn install_hook(q: &mut PersistentQueue, sim: &Arc<Mutex<Sim>>) {
    let sim = Arc::clone(sim);
    q.test_hook = Some(Box::new(move |event| {
        let mut s = sim.lock().unwrap();
        match event {
            // An intermediate state the medium may capture by early write-back.
            CrashEvent::Stored => s.snapshot(),
            CrashEvent::Barrier(ranges) => s.barrier(ranges),
        }
    }));
}

#[derive(Clone, Debug)]
enum Op {
    Append { size: usize },
    Sync,
    Trim { percent: u64 },
    Applied(u64),
    Peer(u64),
    Reset { ahead: u64 },
    Crash { seed: u64 },
}

/// Operation mix, drawn per test case (swarm testing): some cases sync after nearly every
/// append, some almost never, some trim eagerly, some crash often.
fn op(sync_w: u32, trim_w: u32, crash_w: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..SIZES.len()).prop_map(|i| Op::Append { size: SIZES[i] }),
        sync_w => Just(Op::Sync),
        trim_w => (0u64..=100).prop_map(|percent| Op::Trim { percent }),
        1 => (0u64..1000).prop_map(Op::Applied),
        1 => (0u64..3).prop_map(Op::Peer),
        1 => (0u64..3).prop_map(|ahead| Op::Reset { ahead }),
        crash_w => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    (0u32..=8, 1u32..=8, 1u32..=4).prop_flat_map(|(sync_w, trim_w, crash_w)| {
        proptest::collection::vec(op(sync_w, trim_w, crash_w), 1..150)
    })
}

/// The model before and after one operation.
#[derive(Clone, Copy, Debug)]
struct Step {
    next_after: u64,
    trimmed_after: u64,
    floor_before: u64,
    applied: (u64, u64),
    peer: (u64, u64),
}

struct Model {
    /// seq -> (offset, payload) for every seq of the current timeline (trimmed ones too).
    content: BTreeMap<u64, (u64, Vec<u8>)>,
    next: u64,
    /// Highest trim point issued since the last recovery (records at or below it may or may
    /// not come back).
    trimmed: u64,
    /// next_seq set by the last completed reset_to.
    floor: u64,
    applied: u64,
    peer: u64,
    /// Timeline number, mixed into payloads so that a reused seq has different bytes.
    salt: u64,
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    // The simulation never needs a real disk; tmpfs keeps it fast when the disk is busy.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("q");
    let mut q = PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap();
    let mut m = Model {
        content: BTreeMap::new(),
        next: 1,
        trimmed: 0,
        floor: 1,
        applied: 0,
        peer: 0,
        salt: 0,
    };
    let mut steps: Vec<Step> = Vec::with_capacity(ops.len());
    let sim = Arc::new(Mutex::new(Sim {
        path: path.clone(),
        snaps: Vec::new(),
        points: Vec::new(),
        durable: Arc::new(Vec::new()),
        flushed_at: Arc::new(Vec::new()),
        durable_next: 1,
        op_durable_next: 1,
        op: 0,
    }));
    // Point 0 belongs to a virtual "op 0" that is the creation.
    steps.push(Step {
        next_after: 1,
        trimmed_after: 0,
        floor_before: 1,
        applied: (0, 0),
        peer: (0, 0),
    });
    sim.lock().unwrap().restart(1, 0);
    install_hook(&mut q, &sim);
    for (i, op) in ops.iter().enumerate() {
        let k = i + 1; // index into `steps`
        let before = (m.floor, m.applied, m.peer);
        {
            let mut s = sim.lock().unwrap();
            s.op = k;
            s.op_durable_next = match *op {
                // A barrier inside reset_to comes after trimmed_through = n - 1 was stored, so
                // it makes next_seq >= n durable.
                Op::Reset { ahead } => m.next + ahead,
                _ => m.next,
            };
        }
        match *op {
            Op::Append { size } => {
                let seq = m.next;
                let p = payload(seq, size, m.salt);
                match q.append(seq, offset_for(seq), &p) {
                    Ok(()) => {
                        m.content.insert(seq, (offset_for(seq), p));
                        m.next += 1;
                    }
                    Err(StorageError::Full { .. }) => {}
                    Err(e) => panic!("op {i}: {e}"),
                }
            }
            Op::Sync => q.sync().unwrap(),
            Op::Trim { percent } => {
                let k = q.len_records() * percent / 100;
                if let (Some(first), true) = (q.first_seq(), k > 0) {
                    let through = first + k - 1;
                    q.trim_through(through).unwrap();
                    m.trimmed = m.trimmed.max(through);
                }
            }
            Op::Applied(v) => {
                q.set_applied_through(v).unwrap();
                m.applied = v;
            }
            Op::Peer(v) => {
                q.set_peer_node_id(v).unwrap();
                m.peer = v;
            }
            Op::Reset { ahead } => {
                let n = m.next + ahead;
                q.reset_to(n).unwrap();
                m.next = n;
                m.trimmed = m.trimmed.max(n - 1);
                m.floor = n;
            }
            Op::Crash { seed } => {
                drop(q);
                let mut rng = Rng(seed);
                let (img, p) = {
                    let s = sim.lock().unwrap();
                    // Half the crashes hit the latest point, half any point of this session
                    // (possibly inside an operation).
                    let p = if rng.below(2) == 0 {
                        s.points.last().unwrap().clone()
                    } else {
                        s.points[rng.below(s.points.len() as u64) as usize].clone()
                    };
                    (s.crash_image(&p, &mut rng), p)
                };
                let st = steps[p.op];
                std::fs::write(&path, &img).unwrap();
                let (q2, rep) = PersistentQueue::open(&path, Durability::Process)
                    .unwrap_or_else(|e| panic!("op {i}: recovery failed: {e}"));
                q = q2;
                let got = records(&q);
                let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
                let ctx = format!("op {i}, crash at a point of op {}: {st:?} durable_next {}, got {seqs:?}, {rep:?}", p.op, p.durable_next);
                for (seq, off, pl) in &got {
                    prop_assert!(
                        m.content.get(seq) == Some(&(*off, pl.clone())),
                        "recovered seq {} is not the record appended with that seq (ghost or invention); {}",
                        seq,
                        ctx
                    );
                    prop_assert!(
                        *seq >= st.floor_before,
                        "seq {} from before a completed reset; {}",
                        seq,
                        ctx
                    );
                }
                for w in seqs.windows(2) {
                    prop_assert_eq!(w[0] + 1, w[1]);
                }
                for s in st.trimmed_after + 1..p.durable_next {
                    prop_assert!(seqs.contains(&s), "durable seq {} lost; {}", s, ctx);
                }
                let next = q.next_seq();
                prop_assert!(
                    next >= p.durable_next,
                    "next_seq {} below the durable one; {}",
                    next,
                    ctx
                );
                prop_assert!(
                    next >= st.floor_before,
                    "next_seq {} below a completed reset; {}",
                    next,
                    ctx
                );
                prop_assert!(next <= st.next_after, "next_seq {} invented; {}", next, ctx);
                let applied = q.applied_through();
                prop_assert!(
                    applied == st.applied.0 || applied == st.applied.1,
                    "applied {}; {}",
                    applied,
                    ctx
                );
                let peer = q.peer_node_id();
                prop_assert!(
                    peer == st.peer.0 || peer == st.peer.1,
                    "peer {}; {}",
                    peer,
                    ctx
                );
                prop_assert_eq!(rep.next_seq, next);
                // The recovered state is the new durable truth; seqs from next_seq on will be
                // reused with new bytes.
                m.next = next;
                m.content.retain(|s, _| *s < next);
                m.trimmed = q.first_seq().map_or(next - 1, |f| f - 1);
                // A reset_to the crash point lies inside (or before) may not have happened.
                m.floor = st.floor_before;
                m.applied = applied;
                m.peer = peer;
                m.salt += 1;
                steps.push(Step {
                    next_after: next,
                    trimmed_after: m.trimmed,
                    floor_before: m.floor,
                    applied: (applied, applied),
                    peer: (peer, peer),
                });
                sim.lock().unwrap().restart(next, k);
                install_hook(&mut q, &sim);
                continue;
            }
        }
        steps.push(Step {
            next_after: m.next,
            trimmed_after: m.trimmed,
            floor_before: before.0,
            applied: (before.1, m.applied),
            peer: (before.2, m.peer),
        });
        sim.lock().unwrap().snapshot();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn power_loss_at_any_point_keeps_synced_records_and_never_resurrects_old_ones(ops in ops()) {
        run(&ops)?;
    }
}

#[test]
fn queue_and_region_are_send() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<PersistentQueue>();
    send_sync::<crate::Region>();
}
