//! Beyond the queue, end to end on live in-process pairs over TCP: a backup away while the
//! primary writes ten times its queue (the dirty-chunk bitmap takes over, no write waits, and
//! the return moves only dirty chunks and queued records), the initial sync of a blank node and
//! of a stale copy (with consent only), and the online verify (a flipped byte found and
//! repaired; no false difference under load).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror::{Mirror, MirrorError, Phase};

mod common;
use common::{failover_node, free_port};

/// A small queue (writes beyond it must fold) and a 4 MiB region of 64 KiB chunks.
const QUEUE: &str = "64KiB";
const REGION: u64 = 4 << 20;
const CHUNK: u64 = 64 << 10;

struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            a: format!("127.0.0.1:{}", free_port()),
            b: format!("127.0.0.1:{}", free_port()),
        }
    }

    fn opts<'a>(extra: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![
            ("on_peer_loss", "continue"),
            ("queue_size", QUEUE),
            ("region_size", "4MiB"),
            ("chunk_size", "64KiB"),
            // A write that waited for queue room would fail the test instead of hanging it.
            ("write_timeout_ms", "20000"),
        ];
        v.extend_from_slice(extra);
        v
    }

    fn primary(&self, dir: &Path, extra: &[(&str, &str)]) -> Mirror {
        failover_node(dir, "a", "primary", &self.a, &self.b, &Self::opts(extra))
    }

    fn backup(&self, dir: &Path, extra: &[(&str, &str)]) -> Mirror {
        failover_node(dir, "b", "backup", &self.b, &self.a, &Self::opts(extra))
    }
}

fn wait(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `count` writes of 4 KiB at pseudo-random chunk-aligned-ish offsets (seeded), each
/// filled with a byte that names it.
fn write_some(m: &Mirror, seed: u64, count: u64) {
    let mut x = seed | 1;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x % (REGION / 4096)) * 4096;
        let byte = (i as u8).wrapping_add(seed as u8) | 1;
        m.write(offset, &[byte; 4096]).unwrap();
    }
}

fn region(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("{name}.region"))).unwrap()
}

/// Both regions are identical once the primary is synchronous and the backup applied all.
fn assert_identical(dir: &Path, p: &Mirror, b: &Mirror) {
    p.wait_synchronous(Duration::from_secs(60)).unwrap();
    let last = p.stats().next_seq - 1;
    wait(
        "the backup to apply everything",
        Duration::from_secs(30),
        || b.stats().applied_through >= last,
    );
    assert!(
        region(dir, "a") == region(dir, "b"),
        "regions differ after the resync"
    );
}

#[test]
fn a_backup_away_while_the_primary_writes_ten_times_its_queue_gets_only_dirty_chunks_then_the_queue(
) {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let b = pair.backup(dir.path(), &[]);
    let p = pair.primary(dir.path(), &[]);
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    write_some(&p, 1, 50);
    let events = p.events().unwrap();
    b.close().unwrap();
    drop(b);
    // Ten times the queue's capacity, in 4 KiB writes, while the backup is away: without the
    // bitmap the queue fills at three quarters and every later write waits (and times out).
    let capacity = p.stats().queue_capacity;
    let writes = 10 * capacity / 4096;
    let started = Instant::now();
    write_some(&p, 2, writes);
    let s = p.stats();
    assert!(s.degraded, "the backup is away");
    assert!(s.dirty_chunks > 0, "the queue folded into the bitmap");
    assert!(s.queue_bytes < capacity, "the queue never overflowed");
    eprintln!(
        "{writes} writes of 4 KiB ({}x the queue) in {:?} with the backup away; {} dirty chunks, {} bytes queued",
        writes * 4096 / capacity,
        started.elapsed(),
        s.dirty_chunks,
        s.queue_bytes
    );
    // The return: the dirty chunks, then the queued records, then synchronous mirroring.
    let bound = s.dirty_chunks * CHUNK + s.queue_bytes;
    let b = pair.backup(dir.path(), &[]);
    assert_identical(dir.path(), &p, &b);
    let moved = p.stats().last_recovery_bytes;
    assert!(
        moved <= bound,
        "moved {moved} bytes, more than {} dirty chunks of {CHUNK} and {} queued bytes",
        s.dirty_chunks,
        s.queue_bytes
    );
    assert!(moved > 0);
    let after = p.stats();
    assert_eq!(
        after.dirty_chunks, 0,
        "the bitmap is reset once the backup holds it"
    );
    // The events told it as it happened: the fallback, the resync's start and end.
    let mut kinds = Vec::new();
    while let Some(e) = events.next_timeout(Duration::from_millis(200)) {
        kinds.push(match e.event {
            mirror::Event::BitmapFallback { .. } => "bitmap_fallback",
            mirror::Event::TransferStarted { kind, .. } => kind,
            mirror::Event::TransferFinished {
                abandoned: None, ..
            } => "finished",
            mirror::Event::Synchronous => "synchronous",
            _ => "other",
        });
    }
    let at = |k: &str| kinds.iter().position(|x| *x == k);
    assert!(
        at("bitmap_fallback").is_some() && at("synchronous").is_some(),
        "{kinds:?}"
    );
    assert!(
        at("bitmap_fallback") < at("resync") && at("resync") < at("finished"),
        "{kinds:?}"
    );
    // And mirroring is synchronous again.
    write_some(&p, 3, 20);
    assert_identical(dir.path(), &p, &b);
}

#[test]
fn a_blank_node_is_refused_without_consent_then_synced_online_while_the_primary_writes() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let b = pair.backup(dir.path(), &[]);
    let p = Arc::new(pair.primary(dir.path(), &[]));
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    write_some(&p, 4, 300);
    // Both nodes apply and trim: the primary's queue no longer starts at seq 1.
    wait("the primary to trim", Duration::from_secs(10), || {
        p.stats().queue_records < 300
    });
    b.close().unwrap();
    drop(b);
    // The backup's disk died: a new node with empty files (a new node id).
    for f in ["b.region", "b.queue", "b.queue.bitmap"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    let blank = pair.backup(dir.path(), &[]);
    // Without consent: refused (again at each reconnect), and the primary keeps serving.
    std::thread::sleep(Duration::from_millis(500));
    write_some(&p, 5, 10);
    let s = p.stats();
    assert!(s.failure.is_none(), "{:?}", s.failure);
    assert!(s.degraded && s.phase != Phase::Synchronous, "{s:?}");
    assert_ne!(blank.stats().phase, Phase::Synchronous);
    assert_eq!(
        blank.stats().peer_node_id,
        0,
        "the blank node bound to nobody"
    );
    blank.close().unwrap();
    drop(blank);
    // With consent, while a writer goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                write_some(&p, seed, 8);
                seed += 1;
            }
        })
    };
    let b = pair.backup(dir.path(), &[("initial_sync", "true")]);
    wait("the initial sync", Duration::from_secs(60), || {
        b.stats().peer_node_id != 0 && p.stats().phase == Phase::Synchronous
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_identical(dir.path(), &p, &b);
    assert_eq!(
        p.stats().peer_node_id,
        b.stats().node_id,
        "rebound to the new node"
    );
}

#[test]
fn a_stale_copy_moves_only_the_chunks_that_changed_since() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let b = pair.backup(dir.path(), &[]);
    let p = pair.primary(dir.path(), &[]);
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    // Fill the whole region, then snapshot the backup's region.
    for c in 0..REGION / CHUNK {
        p.write(c * CHUNK, &[c as u8 | 1; 4096]).unwrap();
    }
    let last = p.stats().next_seq - 1;
    wait("the backup to apply", Duration::from_secs(30), || {
        b.stats().applied_through >= last
    });
    b.close().unwrap();
    drop(b);
    let snapshot = region(dir.path(), "b");
    // Later writes touch three chunks only.
    for c in [3u64, 17, 40] {
        p.write(c * CHUNK + 100, &[0xee; 64]).unwrap();
    }
    // The node is rebuilt from the snapshot: its region restored, its queue new.
    for f in ["b.queue", "b.queue.bitmap"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("b.region"), &snapshot).unwrap();
    // What moves besides chunks: the records still in the primary's queue (the catch-up).
    let queued = p.stats().queue_bytes;
    let b = pair.backup(dir.path(), &[("initial_sync", "true")]);
    assert_identical(dir.path(), &p, &b);
    let moved = p.stats().last_recovery_bytes;
    assert!(
        moved <= 3 * CHUNK + queued,
        "an initial sync of a stale copy moved {moved} bytes for three changed chunks and {queued} queued bytes"
    );
    assert!(moved >= 3 * CHUNK, "the three changed chunks moved");
}

#[test]
fn an_online_verify_finds_a_flipped_byte_and_repairs_it_and_sees_no_false_difference_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let b = pair.backup(dir.path(), &[]);
    let p = Arc::new(pair.primary(dir.path(), &[]));
    p.wait_synchronous(Duration::from_secs(10)).unwrap();
    write_some(&p, 7, 200);
    // Under load: writes in flight while chunks are compared are never a difference.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seed = 1000;
            while !stop.load(Ordering::Relaxed) {
                write_some(&p, seed, 4);
                seed += 1;
            }
        })
    };
    for _ in 0..3 {
        let report = p.verify_online(false).unwrap();
        assert_eq!(report.chunks_compared, REGION / CHUNK);
        assert!(report.differing.is_empty(), "false difference: {report:?}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let last = p.stats().next_seq - 1;
    wait("the backup to apply", Duration::from_secs(30), || {
        b.stats().applied_through >= last
    });
    // Behind the engine's back: one byte of the backup's region file flips.
    let flipped_at = 5 * CHUNK + 1234;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("b.region"))
        .unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, flipped_at).unwrap();
    byte[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&file, &byte, flipped_at).unwrap();
    let report = p.verify_online(false).unwrap();
    assert_eq!(report.differing.len(), 1, "{report:?}");
    assert_eq!(report.differing[0].offset, 5 * CHUNK);
    assert_ne!(region(dir.path(), "a"), region(dir.path(), "b"));
    let report = p.verify_online(true).unwrap();
    assert_eq!(report.chunks_repaired, 1);
    assert_eq!(region(dir.path(), "a"), region(dir.path(), "b"));
    assert!(p.verify_online(false).unwrap().differing.is_empty());
    // A verify needs the primary and a synchronous backup.
    assert!(matches!(
        b.verify_online(false),
        Err(MirrorError::Verify(_))
    ));
    b.close().unwrap();
    wait("the primary to notice", Duration::from_secs(10), || {
        p.stats().phase != Phase::Synchronous
    });
    assert!(matches!(
        p.verify_online(false),
        Err(MirrorError::Verify(_))
    ));
}
