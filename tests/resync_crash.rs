//! SIGKILL during resyncs and initial syncs, with real processes on loopback and the primary
//! writing throughout: at 20 random points of resyncs (after outages longer than the queue)
//! and at 20 of initial syncs (of a node whose files were lost), either node dies. Every
//! completed write must be on both nodes at the end, the regions identical, and a resync
//! killed part way must resume from what was left, never from the start.

mod common;

use std::time::Duration;

use common::*;

/// The region is large enough, and the resync slow enough (`resync_rate`), for a kill to land
/// in the middle; the queue small enough to fold within a short outage.
const REGION: u64 = 32 << 20;
const CHUNK: u64 = 64 << 10;
/// Chunks that writes may dirty between a kill and the resumed resync (at the campaign's write
/// rate, for a restart and a reconnect): the tolerance of the "resumes, not restarts" check,
/// a quarter of the region.
const SLACK_CHUNKS: u64 = 128;
const STEP: Duration = Duration::from_secs(60);

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn campaign_pair(dir: &std::path::Path) -> Pair {
    let mut pair = Pair::new(dir, "continue");
    pair.region_size = REGION;
    // Writes go on throughout; a resync converges while it brings chunks over faster than
    // folds of the (small) queue dirty new ones.
    pair.rate = 200;
    for kv in [
        "queue_size=64KiB",
        "chunk_size=64KiB",
        "resync_rate=32MiB",
        "ack_timeout_ms=300",
    ] {
        pair.extra.extend(["--set".to_string(), kv.to_string()]);
    }
    pair
}

/// A backup, with consent to an initial sync when `initial_sync`.
fn start_backup(pair: &Pair, run: usize, initial_sync: bool) -> Node {
    let mut args = pair.backup_args();
    if initial_sync {
        args.push("--initial-sync".into());
    }
    let mut b = Node::spawn("backup", &args, &pair.path(&format!("backup-{run}.log")));
    b.wait_until("backup to listen", Duration::from_secs(10), |b| {
        b.has("backup") || b.has("status")
    });
    b
}

fn resyncing(p: &Node) -> bool {
    p.get("progress", "phase").as_deref() == Some("resyncing")
        && p.num("progress", "resync_left") > 0
}

/// One kill during the resync the primary is running now: waits a random moment, kills a
/// random node, restarts it, and checks that the next resync starts from what was left.
/// Returns the new processes.
fn kill_during_resync(
    pair: &Pair,
    rng: &mut u64,
    mut primary: Node,
    mut backup: Node,
    runs: &mut (usize, usize),
    initial_sync: bool,
) -> (Node, Node) {
    primary.wait_until("a resync in progress", STEP, resyncing);
    std::thread::sleep(Duration::from_millis(xorshift(rng) % 400));
    let left_at_kill = primary.num("progress", "resync_left");
    if xorshift(rng).is_multiple_of(2) {
        backup.kill9();
        backup = start_backup(pair, runs.1, initial_sync);
        runs.1 += 1;
    } else {
        primary.kill9();
        primary = pair.start_primary(runs.0, 0, 4);
        runs.0 += 1;
    }
    // The next resync (if anything is left) starts from the bitmap the kill left behind.
    primary.wait_until("the resync to resume or end", STEP, |p| {
        resyncing(p) || p.get("progress", "phase").as_deref() == Some("synchronous")
    });
    if resyncing(&primary) {
        let resumed = primary.num("progress", "resync_left");
        assert!(
            resumed <= left_at_kill + SLACK_CHUNKS * CHUNK,
            "the resync restarted from {resumed} bytes left, {left_at_kill} were left at the kill"
        );
    }
    (primary, backup)
}

#[test]
fn sigkill_at_twenty_points_of_resyncs_and_twenty_of_initial_syncs_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pair = campaign_pair(dir.path());
    let mut rng = 0x005e_ed0f_7e57_u64;
    let mut runs = (1, 1);
    let mut backup = start_backup(&pair, 0, false);
    let mut primary = pair.start_primary(0, 0, 4);
    primary.wait_until("synchronous", STEP, |p| {
        p.get("progress", "phase").as_deref() == Some("synchronous")
            && p.num("progress", "completed") > 200
    });
    // Resyncs: an outage longer than the queue, then a kill while the dirty chunks move.
    let mut resync_kills = 0;
    while resync_kills < 20 {
        backup.kill9();
        let before = primary.num("progress", "completed");
        primary.wait_until(
            "writes past the queue while the backup is away",
            STEP,
            |p| {
                p.num("progress", "dirty_chunks") > 32
                    && p.num("progress", "completed") > before + 400
            },
        );
        backup = start_backup(&pair, runs.1, false);
        runs.1 += 1;
        (primary, backup) = kill_during_resync(&pair, &mut rng, primary, backup, &mut runs, false);
        resync_kills += 1;
    }
    // Initial syncs: the backup's files are lost; it comes back with consent, and dies (or
    // its primary does) part way.
    let mut initial_kills = 0;
    while initial_kills < 20 {
        primary.wait_until("synchronous again", STEP, |p| {
            p.get("progress", "phase").as_deref() == Some("synchronous")
        });
        backup.kill9();
        for f in ["backup.queue", "backup.queue.bitmap", "backup.region"] {
            let _ = std::fs::remove_file(pair.path(f));
        }
        backup = start_backup(&pair, runs.1, true);
        runs.1 += 1;
        (primary, backup) = kill_during_resync(&pair, &mut rng, primary, backup, &mut runs, true);
        initial_kills += 1;
    }
    eprintln!(
        "{resync_kills} kills during resyncs, {initial_kills} during initial syncs; {} primary and {} backup runs",
        runs.0, runs.1
    );
    // Every completed write on both nodes, identical regions (a last run under `block`).
    finish_and_verify(&pair, primary, Some(backup), runs.1);
}
