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
//!   return), or the value being set if the crash hit inside the setter; the current term lies
//!   between the values before and after the operation the crash hit;
//! - every recovered record's term is the one the recovered term history gives its seq (a new
//!   term's entry is durable before its first record), and the history has no entry beyond
//!   the log;
//! - after `truncate_after`, a crash inside it recovers either the old or the truncated log,
//!   and a crash after it never recovers a discarded record (also not behind records appended
//!   later with the same seqs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::{offset_for, params, payload, Rng};
use crate::format::OFF_TRIMMED_THROUGH;
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
    /// Every record with a smaller seq has been stored (survives a process crash).
    stored_next: u64,
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
    /// Every record with a smaller seq has been stored (see `Point`).
    stored_next: u64,
    op: usize,
    /// The mode the queue runs (and recovers) in.
    durability: Durability,
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
        self.stored_next = next;
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
            stored_next: self.stored_next,
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

    /// What the medium holds after a crash at `p`: a power loss (each unit its durable value or
    /// a later one), or, one time in five, a process crash (every store up to `p`). The flag
    /// says which.
    fn crash_image(&self, p: &Point, rng: &mut Rng) -> (Vec<u8>, bool) {
        if rng.below(5) == 0 {
            return (self.snaps[p.snaps_len - 1].clone(), true);
        }
        (self.power_loss_image(p, rng), false)
    }

    fn power_loss_image(&self, p: &Point, rng: &mut Rng) -> Vec<u8> {
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
    Append {
        size: usize,
    },
    /// Later appends carry a new term (higher than any seen).
    NewTerm,
    /// Raise the current term without appending (a node that saw a newer term).
    SetTerm {
        ahead: u64,
    },
    Sync,
    Trim {
        percent: u64,
    },
    /// Drop the newest `back` records (at least one record is always kept when possible).
    Truncate {
        back: u64,
    },
    Applied(u64),
    Peer(u64),
    Reset {
        ahead: u64,
    },
    Crash {
        seed: u64,
    },
    /// A crash at point `point` of the session (the last one if there are fewer).
    CrashAt {
        point: usize,
        seed: u64,
    },
}

/// Operation mix, drawn per test case (swarm testing): some cases sync after nearly every
/// append, some almost never, some trim eagerly, some crash often, some truncate often.
fn op(sync_w: u32, trim_w: u32, crash_w: u32, truncate_w: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..SIZES.len()).prop_map(|i| Op::Append { size: SIZES[i] }),
        1 => Just(Op::NewTerm),
        1 => (1u64..3).prop_map(|ahead| Op::SetTerm { ahead }),
        sync_w => Just(Op::Sync),
        trim_w => (0u64..=100).prop_map(|percent| Op::Trim { percent }),
        truncate_w => (1u64..5).prop_map(|back| Op::Truncate { back }),
        1 => (0u64..1000).prop_map(Op::Applied),
        1 => (0u64..3).prop_map(Op::Peer),
        1 => (0u64..3).prop_map(|ahead| Op::Reset { ahead }),
        crash_w => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    (0u32..=8, 1u32..=8, 1u32..=4, 0u32..=3).prop_flat_map(
        |(sync_w, trim_w, crash_w, truncate_w)| {
            proptest::collection::vec(op(sync_w, trim_w, crash_w, truncate_w), 1..150)
        },
    )
}

/// The model before and after one operation.
#[derive(Clone, Copy, Debug)]
struct Step {
    /// The highest `next_seq` the queue had during the operation (a crash inside a
    /// truncation may recover the log from before it).
    next_max: u64,
    trimmed_after: u64,
    floor_before: u64,
    applied: (u64, u64),
    peer: (u64, u64),
    current_term: (u64, u64),
}

/// One record appended with a seq: the bytes, and the steps at which a crash may recover it.
struct Version {
    seq: u64,
    offset: u64,
    payload: Vec<u8>,
    term: u64,
    /// Index (into `steps`) of the operation that appended it.
    from: usize,
    /// The last step whose crash points may still recover it (`usize::MAX`: still current).
    until: usize,
}

struct Model {
    /// Every record ever appended, oldest first.
    versions: Vec<Version>,
    /// seq -> index in `versions` of the record the current timeline holds (trimmed ones too).
    current: BTreeMap<u64, usize>,
    next: u64,
    /// Highest trim point issued since the last recovery (records at or below it may or may
    /// not come back).
    trimmed: u64,
    /// next_seq set by the last completed reset_to.
    floor: u64,
    applied: u64,
    peer: u64,
    /// Term of the next appends.
    term: u64,
    current_term: u64,
    /// Timeline number, mixed into payloads so that a reused seq has different bytes.
    salt: u64,
}

impl Model {
    /// Ends the records with seq >= `from` of the current timeline: a crash may recover them
    /// up to step `until`, never later.
    fn end_from(&mut self, from: u64, until: usize) {
        for (_, i) in self.current.split_off(&from) {
            self.versions[i].until = until;
        }
    }

    /// The record a crash at a point of step `at` may recover with these contents, if any.
    fn recoverable(
        &self,
        seq: u64,
        offset: u64,
        payload: &[u8],
        term: u64,
        at: usize,
    ) -> Option<usize> {
        self.versions.iter().position(|v| {
            v.seq == seq
                && v.offset == offset
                && v.payload == payload
                && v.term == term
                && v.from <= at
                && at <= v.until
        })
    }

    /// After the recovery of the crash at step `k`: the recovered records (`versions` indices)
    /// are the current timeline (a crash inside a truncation may bring back the discarded
    /// ones), and nothing from `next` on survives.
    fn adopt(&mut self, recovered: &[(u64, usize)], next: u64, k: usize) {
        for &(seq, i) in recovered {
            if let Some(old) = self.current.insert(seq, i) {
                if old != i {
                    self.versions[old].until = k - 1;
                }
            }
            self.versions[i].until = usize::MAX;
        }
        self.end_from(next, k - 1);
    }
}

/// Runs `ops` in `Process` mode; returns how many crash points the last session has.
fn run(ops: &[Op]) -> Result<usize, TestCaseError> {
    run_in(ops, Durability::Process)
}

/// Runs `ops` with the queue in `durability` (see [`run`]). `Power` writes records through the
/// file rather than the mapping and defers the cursor hints to the next barrier that writes
/// the header: the same crash points and checks must hold.
fn run_in(ops: &[Op], durability: Durability) -> Result<usize, TestCaseError> {
    // The simulation never needs a real disk; tmpfs keeps it fast when the disk is busy.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("q");
    let mut q = PersistentQueue::create(&path, &params(4096), durability).unwrap();
    let mut m = Model {
        versions: Vec::new(),
        current: BTreeMap::new(),
        next: 1,
        trimmed: 0,
        floor: 1,
        applied: 0,
        peer: 0,
        term: 1,
        current_term: 0,
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
        stored_next: 1,
        op: 0,
        durability,
    }));
    // Point 0 belongs to a virtual "op 0" that is the creation.
    steps.push(Step {
        next_max: 1,
        trimmed_after: 0,
        floor_before: 1,
        applied: (0, 0),
        peer: (0, 0),
        current_term: (0, 0),
    });
    sim.lock().unwrap().restart(1, 0);
    install_hook(&mut q, &sim);
    for (i, op) in ops.iter().enumerate() {
        let k = i + 1; // index into `steps`
        let before = (m.floor, m.applied, m.peer, m.current_term, m.next);
        let truncate_to = match *op {
            Op::Truncate { back } => Some(truncation_seq(&q, back)),
            _ => None,
        };
        {
            let mut s = sim.lock().unwrap();
            s.op = k;
            s.op_durable_next = match *op {
                // A barrier inside reset_to comes after trimmed_through = n - 1 was stored, so
                // it makes next_seq >= n durable.
                Op::Reset { ahead } => m.next + ahead,
                _ => m.next,
            };
            if let Some(seq) = truncate_to {
                // Only the records truncate_after keeps are promised from now on.
                s.op_durable_next = s.op_durable_next.min(seq + 1);
                s.durable_next = s.durable_next.min(seq + 1);
                s.stored_next = s.stored_next.min(seq + 1);
            }
        }
        match *op {
            Op::Append { size } => {
                let seq = m.next;
                let p = payload(seq, size, m.salt);
                match q.append(seq, m.term, offset_for(seq), &p) {
                    Ok(()) => {
                        m.current.insert(seq, m.versions.len());
                        m.versions.push(Version {
                            seq,
                            offset: offset_for(seq),
                            payload: p,
                            term: m.term,
                            from: k,
                            until: usize::MAX,
                        });
                        m.next += 1;
                        m.current_term = m.current_term.max(m.term);
                    }
                    Err(StorageError::Full { .. }) => {}
                    Err(e) => panic!("op {i}: {e}"),
                }
            }
            Op::NewTerm => m.term = m.term.max(m.current_term) + 1,
            Op::SetTerm { ahead } => {
                let t = m.current_term + ahead;
                q.set_current_term(t).unwrap();
                m.current_term = t;
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
            Op::Truncate { .. } => {
                let seq = truncate_to.unwrap_or(0);
                let empties = q.first_seq() == Some(seq + 1);
                q.truncate_after(seq)
                    .unwrap_or_else(|e| panic!("op {i}: {e}"));
                if seq < m.next - 1 {
                    m.end_from(seq + 1, k);
                    m.next = seq + 1;
                    m.applied = m.applied.min(seq);
                    m.salt += 1;
                    if empties {
                        m.trimmed = m.trimmed.max(seq);
                    }
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
                q = crash_and_check(&path, &sim, &mut m, &mut steps, (k, i), None, seed)?;
                continue;
            }
            Op::CrashAt { point, seed } => {
                drop(q);
                let at = Some(point);
                q = crash_and_check(&path, &sim, &mut m, &mut steps, (k, i), at, seed)?;
                continue;
            }
        }
        steps.push(Step {
            next_max: before.4.max(m.next),
            trimmed_after: m.trimmed,
            floor_before: before.0,
            applied: (before.1, m.applied),
            peer: (before.2, m.peer),
            current_term: (before.3, m.current_term),
        });
        let mut s = sim.lock().unwrap();
        s.stored_next = m.next;
        s.snapshot();
    }
    let points = sim.lock().unwrap().points.len();
    Ok(points)
}

/// The seq a `Truncate { back }` keeps through: `back` records fewer, but never below what
/// `truncate_after` accepts.
fn truncation_seq(q: &PersistentQueue, back: u64) -> u64 {
    let lowest = q.first_seq().map_or(q.last_seq(), |first| first - 1);
    q.last_seq().saturating_sub(back).max(lowest)
}

/// Crashes at a point of the current session (`at`, or one drawn from `seed`), recovers,
/// checks the recovered queue against the model, and makes the recovered state the model's
/// new truth. `(k, i)`: the crash's index in `steps` and in the op list.
fn crash_and_check(
    path: &std::path::Path,
    sim: &Arc<Mutex<Sim>>,
    m: &mut Model,
    steps: &mut Vec<Step>,
    (k, i): (usize, usize),
    at: Option<usize>,
    seed: u64,
) -> Result<PersistentQueue, TestCaseError> {
    let mut rng = Rng(seed);
    let (img, p) = {
        let s = sim.lock().unwrap();
        // Half the crashes hit the latest point, half any point of this session (possibly
        // inside an operation).
        let last = s.points.len() - 1;
        let index = match at {
            Some(point) => point.min(last),
            None if rng.below(2) == 0 => last,
            None => rng.below(s.points.len() as u64) as usize,
        };
        let p = s.points[index].clone();
        let (img, process_crash) = s.crash_image(&p, &mut rng);
        (
            (img, s.durability),
            Point {
                // A process crash keeps every store: what was stored is what is durable.
                durable_next: if process_crash {
                    p.stored_next
                } else {
                    p.durable_next
                },
                ..p
            },
        )
    };
    let ((img, durability), st) = (img, steps[p.op]);
    std::fs::write(path, &img).unwrap();
    let (mut q, rep) = PersistentQueue::open(path, durability)
        .unwrap_or_else(|e| panic!("op {i}: recovery failed: {e}"));
    let got: Vec<(u64, u64, Vec<u8>, u64)> = q
        .iter_from(0)
        .map(|r| {
            let r = r.expect("live record fails verification");
            (r.seq, r.offset, r.payload.to_vec(), r.term)
        })
        .collect();
    let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
    let history = q.term_history().clone();
    let ctx = format!(
        "op {i}, crash at a point of op {}: {st:?} durable_next {}, got {seqs:?}, {history:?}, {rep:?}",
        p.op, p.durable_next
    );
    let mut recovered = Vec::with_capacity(got.len());
    for (seq, off, pl, term) in &got {
        let version = m.recoverable(*seq, *off, pl, *term, p.op);
        prop_assert!(
            version.is_some(),
            "recovered seq {} (term {}) is not a record appended with that seq at that point (ghost, discarded or invented); {}",
            seq,
            term,
            ctx
        );
        recovered.extend(version.map(|i| (*seq, i)));
        prop_assert!(
            *seq >= st.floor_before,
            "seq {} from before a completed reset; {}",
            seq,
            ctx
        );
        prop_assert_eq!(
            history.term_at(*seq),
            Some(*term),
            "record {}'s term is not the recovered history's; {}",
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
    prop_assert!(next <= st.next_max, "next_seq {} invented; {}", next, ctx);
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
    let current_term = q.current_term();
    prop_assert!(
        st.current_term.0 <= current_term && current_term <= st.current_term.1,
        "current term {}; {}",
        current_term,
        ctx
    );
    prop_assert!(history.last_term() <= current_term, "{}", ctx);
    prop_assert!(
        mirror_proto::TermHistory::for_log(history.entries().to_vec(), q.last_seq()).is_ok(),
        "history beyond the log; {}",
        ctx
    );
    prop_assert_eq!(rep.next_seq, next);
    // The recovered state is the new durable truth; seqs from next_seq on will be reused with
    // new bytes.
    m.adopt(&recovered, next, k);
    m.next = next;
    m.trimmed = q.first_seq().map_or(next - 1, |f| f - 1);
    // A reset_to the crash point lies inside (or before) may not have happened.
    m.floor = st.floor_before;
    m.applied = applied;
    m.peer = peer;
    m.current_term = current_term;
    m.term = m.term.max(history.last_term());
    m.salt += 1;
    steps.push(Step {
        next_max: next,
        trimmed_after: m.trimmed,
        floor_before: m.floor,
        applied: (applied, applied),
        peer: (peer, peer),
        current_term: (current_term, current_term),
    });
    sim.lock().unwrap().restart(next, k);
    install_hook(&mut q, sim);
    Ok(q)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn power_loss_at_any_point_keeps_synced_records_and_never_resurrects_old_ones(ops in ops()) {
        run(&ops)?;
    }

    #[test]
    fn power_mode_loses_no_synced_record_and_resurrects_none_at_any_point(ops in ops()) {
        run_in(&ops, Durability::Power)?;
    }
}

/// Every crash point of a session that truncates a log of two terms and then appends records
/// of a third term in the freed seqs, with records of the same sizes (so that new records end
/// exactly where discarded ones begin), synced or not.
#[test]
fn truncation_recovers_the_old_or_the_truncated_log_at_every_crash_point() {
    for (sync_after, durability) in [false, true]
        .into_iter()
        .flat_map(|s| [(s, Durability::Process), (s, Durability::Power)])
    {
        let mut prefix = Vec::new();
        for n in 0..8 {
            if n == 4 {
                prefix.push(Op::NewTerm);
            }
            prefix.push(Op::Append { size: SIZES[n % 2] });
        }
        prefix.extend([
            Op::Applied(7),
            Op::Sync,
            Op::Trim { percent: 25 },
            Op::Truncate { back: 4 },
            Op::NewTerm,
        ]);
        for n in 4..7 {
            prefix.push(Op::Append { size: SIZES[n % 2] });
        }
        if sync_after {
            prefix.push(Op::Sync);
        }
        let points = run_in(&prefix, durability).unwrap();
        assert!(points > 10, "{points} crash points");
        for point in 0..points {
            for seed in 0..6 {
                let mut ops = prefix.clone();
                ops.push(Op::CrashAt { point, seed });
                // A second crash after appends in the recovered timeline: a discarded record
                // must not come back behind them either.
                ops.extend([
                    Op::Append { size: SIZES[0] },
                    Op::Append { size: SIZES[1] },
                    Op::Crash { seed },
                ]);
                if let Err(e) = run_in(&ops, durability) {
                    panic!(
                        "{durability:?}, sync_after {sync_after}, point {point}, seed {seed}: {e}"
                    );
                }
            }
        }
    }
}

/// Runs `prefix`, then again crashed at each of its crash points with `seeds` seeds each, in
/// `process` and in `power`.
fn crash_at_every_point(prefix: &[Op], seeds: u64) {
    for durability in [Durability::Process, Durability::Power] {
        let points = run_in(prefix, durability).unwrap();
        for point in 0..points {
            for seed in 0..seeds {
                let mut ops = prefix.to_vec();
                ops.push(Op::CrashAt { point, seed });
                if let Err(e) = run_in(&ops, durability) {
                    panic!("{durability:?}, point {point}, seed {seed}: {e}");
                }
            }
        }
    }
}

/// Truncating every live record, with `scan_start` on the first of them: recovery must keep the
/// numbering from the trim point (which `truncate_after` makes durable first).
#[test]
fn truncating_every_live_record_keeps_the_numbering_at_every_crash_point() {
    let mut prefix = vec![];
    for n in 0..6 {
        prefix.push(Op::Append { size: SIZES[n % 3] });
    }
    prefix.extend([
        Op::Sync,
        Op::Trim { percent: 50 },
        Op::Sync,
        Op::Truncate { back: 3 },
        Op::Append { size: SIZES[2] },
    ]);
    crash_at_every_point(&prefix, 8);
}

/// A metadata update right after a trim that is not durable yet: the history it writes must
/// keep the entries of the records the old trim point leaves live, since the slot can reach
/// the media while the new trim point does not.
#[test]
fn a_history_forgets_only_below_a_durable_trim_point_at_every_crash_point() {
    let prefix = vec![
        Op::Append { size: SIZES[0] },
        Op::Append { size: SIZES[1] },
        Op::NewTerm,
        Op::Append { size: SIZES[0] },
        Op::Append { size: SIZES[1] },
        Op::NewTerm,
        Op::Append { size: SIZES[0] },
        Op::Sync,
        Op::Trim { percent: 80 },
        Op::Applied(1),
        Op::Append { size: SIZES[1] },
    ];
    crash_at_every_point(&prefix, 32);
}

/// The state a power loss can leave when it tears the cursor line inside a sync that moved
/// `scan_start` onto the head: `scan_start` new (on record 4), `trimmed_through` old (0).
/// Truncating every live record then erases the record `scan_start` points at; at every crash
/// point, recovery must still continue the numbering at 4 (or keep the old log).
#[test]
fn truncating_every_live_record_under_a_lagging_trim_point_keeps_the_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let mut q = PersistentQueue::create(&path, &params(4096), Durability::Process).unwrap();
    for seq in 1..=6 {
        q.append(seq, 1, offset_for(seq), &payload(seq, SIZES[0], 0))
            .unwrap();
    }
    q.trim_through(3).unwrap();
    q.sync().unwrap();
    q.sync().unwrap(); // record 4 is durable now: scan_start moves onto it
    drop(q);
    let mut img = std::fs::read(&path).unwrap();
    img[OFF_TRIMMED_THROUGH..OFF_TRIMMED_THROUGH + 8].fill(0);
    std::fs::write(&path, &img).unwrap();
    let (mut q, rep) = PersistentQueue::open(&path, Durability::Process).unwrap();
    assert_eq!((rep.first_seq, rep.next_seq), (Some(4), 7));
    let sim = Arc::new(Mutex::new(Sim {
        path: path.clone(),
        snaps: Vec::new(),
        points: Vec::new(),
        durable: Arc::new(Vec::new()),
        flushed_at: Arc::new(Vec::new()),
        durable_next: 7,
        op_durable_next: 4,
        stored_next: 7,
        op: 0,
        durability: Durability::Process,
    }));
    sim.lock().unwrap().restart(7, 0);
    install_hook(&mut q, &sim);
    q.truncate_after(3).unwrap();
    drop(q);
    let sim = sim.lock().unwrap();
    for (point, p) in sim.points.iter().enumerate() {
        for seed in 0..64 {
            let mut rng = Rng(seed);
            std::fs::write(&path, sim.crash_image(p, &mut rng).0).unwrap();
            let (q, _) = PersistentQueue::open(&path, Durability::Process).unwrap();
            let seqs: Vec<u64> = q.iter_from(0).map(|r| r.unwrap().seq).collect();
            let ctx = format!(
                "point {point}, seed {seed}: {seqs:?}, next {}",
                q.next_seq()
            );
            assert!(
                (q.next_seq(), seqs.is_empty()) == (4, true) || q.next_seq() == 7,
                "{ctx}"
            );
            assert!(seqs.iter().all(|s| (4..=6).contains(s)), "{ctx}");
        }
    }
}

#[test]
fn queue_and_region_are_send() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<PersistentQueue>();
    send_sync::<crate::Region>();
}
