//! Split brain, made with a partition through the fault proxy: both nodes complete writes as
//! primaries in different terms (the old primary under `continue`, the backup promoted while
//! cut off), then the link heals. Under each `after_split_brain` policy the expected side wins,
//! the loser's discard file holds exactly its writes after the common point, and the regions
//! end identical. Under `disconnect` the nodes stay apart, say so, and an operator resolves it.

use std::path::Path;
use std::time::{Duration, Instant};

use mirror::{Mirror, MirrorError, Role};

mod common;
use common::proxy::{FaultProxy, Mode};
use common::{failover_node, free_port};

const RECORD: usize = 64;

/// Two nodes whose links both go through a fault proxy.
struct Cluster {
    dir: tempfile::TempDir,
    a: Mirror,
    b: Mirror,
    to_a: FaultProxy,
    to_b: FaultProxy,
    ports: (u16, u16),
}

impl Cluster {
    /// A primary (`continue`) and B backup, mirroring, both with `policy`.
    fn new(policy: &str) -> Cluster {
        // The nodes' logs, shown for a failing test (MIRROR_LOG=debug for more).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("MIRROR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (free_port(), free_port());
        let to_a = FaultProxy::start(format!("127.0.0.1:{pa}").parse().unwrap());
        let to_b = FaultProxy::start(format!("127.0.0.1:{pb}").parse().unwrap());
        let extra = [("on_peer_loss", "continue"), ("after_split_brain", policy)];
        let b = Self::open(dir.path(), "b", "backup", pb, &to_a, &extra);
        let a = Self::open(dir.path(), "a", "primary", pa, &to_b, &extra);
        a.wait_synchronous(Duration::from_secs(20)).unwrap();
        Cluster {
            dir,
            a,
            b,
            to_a,
            to_b,
            ports: (pa, pb),
        }
    }

    fn open(
        dir: &Path,
        name: &str,
        role: &str,
        own: u16,
        peer: &FaultProxy,
        extra: &[(&str, &str)],
    ) -> Mirror {
        failover_node(
            dir,
            name,
            role,
            &format!("127.0.0.1:{own}"),
            &peer.addr.to_string(),
            extra,
        )
    }

    fn partition(&self) {
        for p in [&self.to_a, &self.to_b] {
            p.set_mode(Mode::Blackhole);
            p.cut();
        }
    }

    fn heal(&self) {
        for p in [&self.to_a, &self.to_b] {
            p.set_mode(Mode::Pass);
        }
    }

    /// Both nodes complete writes alone: A `na` (tag 2) as the old primary, B `nb` (tag 3)
    /// once promoted. Returns B's term.
    fn split(&self, na: u64, nb: u64) -> u64 {
        write(&self.a, 0, 20, 1);
        wait_until("the backup to hold the first writes", || {
            self.b.stats().applied_through == self.a.stats().applied_through
        });
        self.partition();
        wait_until("both sides to notice the partition", || {
            self.a.stats().phase != mirror::Phase::Synchronous
                && self.b.stats().phase == mirror::Phase::Disconnected
        });
        write(&self.a, 100, na, 2);
        assert!(self.a.stats().degraded, "A wrote alone");
        let term = self.b.promote(false).unwrap();
        write(&self.b, 300, nb, 3);
        term
    }

    fn discarded_by(&self, name: &str) -> Vec<mirror_storage::DiscardedRecord> {
        let queue = self.dir.path().join(format!("{name}.queue"));
        mirror_storage::list_discarded(&queue)
            .unwrap()
            .iter()
            .flat_map(|p| mirror_storage::read_discarded(p).unwrap().records)
            .collect()
    }
}

/// Writes `n` records of `RECORD` bytes, record `i` at `(base + i) * RECORD` with bytes
/// `tag` after its index.
fn write(m: &Mirror, base: u64, n: u64, tag: u8) {
    for i in 0..n {
        m.write((base + i) * RECORD as u64, &record(base + i, tag))
            .unwrap();
    }
}

fn record(at: u64, tag: u8) -> [u8; RECORD] {
    let mut data = [tag; RECORD];
    data[..8].copy_from_slice(&at.to_le_bytes());
    data
}

fn has(m: &Mirror, base: u64, n: u64, tag: u8) -> bool {
    (0..n).all(|i| {
        let mut buf = [0u8; RECORD];
        m.read((base + i) * RECORD as u64, &mut buf).unwrap();
        buf == record(base + i, tag)
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `winner` is a synchronous primary and `loser` holds what it does, then checks
/// the regions byte for byte.
fn assert_converged(winner: &Mirror, loser: &Mirror) {
    wait_until("the winner to be the primary, mirroring", || {
        let s = winner.stats();
        s.role == Role::Primary && s.phase == mirror::Phase::Synchronous
    });
    wait_until("the loser to catch up", || {
        let (w, l) = (winner.stats(), loser.stats());
        l.role == Role::Backup && l.applied_through == w.applied_through && l.next_seq == w.next_seq
    });
    let len = winner.region_len() as usize;
    let (mut wb, mut lb) = (vec![0u8; len], vec![0u8; len]);
    winner.read(0, &mut wb).unwrap();
    loser.read(0, &mut lb).unwrap();
    assert!(wb == lb, "regions differ");
}

/// The loser's discard file holds exactly its `n` writes of `tag` after the common point.
fn assert_discarded_exactly(c: &Cluster, loser: &str, base: u64, n: u64, tag: u8) {
    let records = c.discarded_by(loser);
    assert_eq!(records.len() as u64, n, "{loser} discarded {records:?}");
    for (i, r) in records.iter().enumerate() {
        let at = base + i as u64;
        assert_eq!(r.region_offset, at * RECORD as u64);
        assert_eq!(r.payload, record(at, tag));
    }
}

#[test]
fn discard_younger_primary_keeps_the_old_primarys_writes() {
    let c = Cluster::new("discard-younger-primary");
    c.split(30, 10);
    c.heal();
    // B became primary last: its writes go, A becomes the primary.
    assert_converged(&c.a, &c.b);
    assert!(has(&c.a, 100, 30, 2) && has(&c.b, 100, 30, 2));
    assert_discarded_exactly(&c, "b", 300, 10, 3);
    assert!(c.discarded_by("a").is_empty());
    // B's writes failed over to A's side: B writes nothing any more.
    let e = c.b.write(0, b"x").unwrap_err();
    assert!(matches!(e, MirrorError::Fenced { .. }), "{e}");
    c.a.write(0, b"the winner writes on").unwrap();
}

#[test]
fn discard_least_changes_keeps_the_side_with_more_writes() {
    // A wrote more: B's writes go.
    let c = Cluster::new("discard-least-changes");
    c.split(30, 10);
    c.heal();
    assert_converged(&c.a, &c.b);
    assert_discarded_exactly(&c, "b", 300, 10, 3);
    assert!(c.discarded_by("a").is_empty());
    // B wrote more: A's writes go (A, fenced by B's newer term, is already the backup).
    let c = Cluster::new("discard-least-changes");
    c.split(10, 30);
    c.heal();
    assert_converged(&c.b, &c.a);
    assert!(has(&c.b, 300, 30, 3) && has(&c.a, 300, 30, 3));
    assert_discarded_exactly(&c, "a", 100, 10, 2);
    assert!(c.discarded_by("b").is_empty());
}

#[test]
fn discard_node_discards_the_named_nodes_writes() {
    // Node ids are made when the queues are: the policy that names A (by its id, as `mirror
    // status` prints it) is configured after the first open, by restarting both nodes.
    let c = Cluster::new("disconnect");
    let a_id = c.a.stats().node_id;
    let Cluster {
        dir,
        a,
        b,
        to_a,
        to_b,
        ports: (pa, pb),
    } = c;
    drop((a, b));
    let extra_policy = format!("discard-node:{a_id:#x}");
    let extra = [
        ("on_peer_loss", "continue"),
        ("after_split_brain", extra_policy.as_str()),
    ];
    let b = Cluster::open(dir.path(), "b", "backup", pb, &to_a, &extra);
    let a = Cluster::open(dir.path(), "a", "primary", pa, &to_b, &extra);
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let c = Cluster {
        dir,
        a,
        b,
        to_a,
        to_b,
        ports: (pa, pb),
    };
    // A wrote more and is the older primary: only the named node decides it.
    c.split(30, 10);
    c.heal();
    assert_converged(&c.b, &c.a);
    assert_discarded_exactly(&c, "a", 100, 30, 2);
    assert!(has(&c.a, 300, 10, 3));
}

#[test]
fn disconnect_keeps_them_apart_until_an_operator_resolves_it() {
    for resolve_on_the_primary in [true, false] {
        disconnect_then_resolve(resolve_on_the_primary);
    }
}

fn disconnect_then_resolve(resolve_on_the_primary: bool) {
    let c = Cluster::new("disconnect");
    c.split(30, 10);
    c.heal();
    wait_until("both nodes to report the split brain", || {
        c.a.stats().split_brain.is_some() && c.b.stats().split_brain.is_some()
    });
    let why = c.b.stats().split_brain.unwrap();
    assert!(why.contains("mirror resolve"), "says what to do: {why}");
    // They stay apart: nothing is discarded, both regions keep their own writes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.discarded_by("a").is_empty() && c.discarded_by("b").is_empty());
    assert!(has(&c.a, 100, 30, 2) && !has(&c.b, 100, 30, 2));
    assert!(has(&c.b, 300, 10, 3) && !has(&c.a, 300, 10, 3));
    // B, the primary, keeps taking writes meanwhile (`continue`).
    write(&c.b, 400, 5, 4);
    // A name that is neither node is refused.
    let e = c.b.resolve_split_brain(0x1234_5678).unwrap_err();
    assert!(e.to_string().contains("neither"), "{e}");
    // The operator discards A's writes, from either node.
    let a_id = c.a.stats().node_id;
    if resolve_on_the_primary {
        c.b.resolve_split_brain(a_id).unwrap();
    } else {
        c.a.resolve_split_brain(a_id).unwrap();
    }
    assert_converged(&c.b, &c.a);
    assert_discarded_exactly(&c, "a", 100, 30, 2);
    assert!(has(&c.a, 400, 5, 4));
    assert!(c.b.stats().split_brain.is_none() && c.a.stats().split_brain.is_none());
}
