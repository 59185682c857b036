//! The kill campaign shared by the TCP suite (tests/crash_recovery.rs) and the RDMA suite
//! (tests/rdma.rs): SIGKILL of one node per round at a random moment under load, restart, and at
//! the end every completed write on both nodes and byte-identical regions.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use mirror::workload::{Slot, Workload};

use super::{finish_and_verify, tail, Pair};

/// How a campaign runs.
pub struct Campaign {
    /// Kill points.
    pub rounds: usize,
    /// Seed of the moments and of the choice of victim.
    pub seed: u64,
    /// Every fourth round, freeze both processes and check that the primary's region holds no
    /// write the backup lacks (only with policy `block`: a degraded `continue` primary does).
    pub freeze_checks: bool,
    /// Longest wait for progress, a phase or an exit (slower under emulation).
    pub step_timeout: Duration,
    /// Upper bound of the random load time before a kill, in ms.
    pub max_load_ms: u64,
}

/// Ids of the write records held in a queue file (read from a copy, so the live file is untouched).
fn queue_write_ids(queue: &Path, scratch: &Path) -> HashSet<u64> {
    std::fs::copy(queue, scratch).unwrap();
    let (q, _) =
        mirror_storage::PersistentQueue::open(scratch, mirror_storage::Durability::Process)
            .unwrap();
    q.iter_from(0)
        .map(|r| {
            let r = r.unwrap();
            u64::from_le_bytes(r.payload[8..16].try_into().unwrap())
        })
        .collect()
}

/// With both processes frozen (SIGSTOP), every write in the primary's region must be known to the
/// backup: in its region (that write or a later one in the same slot) or in its queue.
fn check_primary_never_ahead(pair: &Pair, w: &Workload) -> usize {
    let p_region = std::fs::read(pair.path("primary.region")).unwrap();
    let b_region = std::fs::read(pair.path("backup.region")).unwrap();
    let b_queue = queue_write_ids(&pair.path("backup.queue"), &pair.path("scratch.queue"));
    let mut checked = 0;
    for slot in 0..w.slots() {
        if let Slot::Write(id) = w.slot(&p_region, slot) {
            checked += 1;
            let in_region = matches!(w.slot(&b_region, slot), Slot::Write(b) if b >= id);
            assert!(
                in_region || b_queue.contains(&id),
                "primary applied write {id} (slot {slot}) that the backup does not hold"
            );
        }
    }
    checked
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Writes in flight of the primary's `run`th start: 4, or 64 in every other run, where the
/// writer's `submit` sends half its window itself (a step of the loop on the caller's thread)
/// rather than only its waits doing so: both paths under the kills.
fn primary_depth(run: usize) -> u64 {
    if run.is_multiple_of(2) {
        4
    } else {
        64
    }
}

/// Runs the campaign on `pair`: the first three rounds kill the backup, the primary, and the
/// primary exactly between an ack and its apply (the SIGUSR1 fail point); the rest at random.
pub fn kill_campaign(pair: &Pair, c: &Campaign) {
    let w = Workload::new(1, pair.write_size as usize, pair.region_size).unwrap();
    let mut rng = c.seed;
    let mut backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, primary_depth(0));
    let (mut primary_runs, mut backup_runs) = (1, 1);
    let mut kills = [0usize; 3];
    let mut frozen_checks = 0;
    for round in 0..c.rounds {
        let before = primary.num("progress", "completed");
        primary.wait_until("progress under load", c.step_timeout, |p| {
            p.num("progress", "completed") > before
        });
        std::thread::sleep(Duration::from_millis(
            xorshift(&mut rng) % c.max_load_ms.max(1) + 5,
        ));
        if c.freeze_checks && round % 4 == 0 {
            primary.freeze(c.step_timeout);
            backup.freeze(c.step_timeout);
            frozen_checks += check_primary_never_ahead(pair, &w);
            primary.signal(libc::SIGCONT);
            backup.signal(libc::SIGCONT);
        }
        let kind = if round < 3 {
            round as u64
        } else {
            xorshift(&mut rng) % 3
        };
        match kind {
            0 => {
                backup.kill9();
                kills[0] += 1;
                std::thread::sleep(Duration::from_millis(xorshift(&mut rng) % 50));
                backup = pair.start_backup(backup_runs);
                backup_runs += 1;
            }
            1 => {
                primary.kill9();
                kills[1] += 1;
                primary = pair.start_primary(primary_runs, 0, primary_depth(primary_runs));
                primary_runs += 1;
            }
            _ => {
                // Between the backup's ack and the primary's apply.
                primary.wait_until("synchronous mode", c.step_timeout, |p| {
                    p.get("progress", "phase").as_deref() == Some("synchronous")
                });
                primary.signal(libc::SIGUSR1);
                let st = primary.wait_exit(c.step_timeout);
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&st),
                    Some(libc::SIGKILL),
                    "primary should die at the fail point\n{}",
                    tail(&primary.log)
                );
                kills[2] += 1;
                primary = pair.start_primary(primary_runs, 0, primary_depth(primary_runs));
                primary_runs += 1;
            }
        }
    }
    eprintln!(
        "{}: {} kill points: backup {}, primary {}, primary between ack and apply {}; {frozen_checks} primary slots checked against the backup while frozen",
        pair.policy, c.rounds, kills[0], kills[1], kills[2]
    );
    assert!(
        c.rounds < 3 || kills.iter().all(|&k| k > 0),
        "every kind of kill happened"
    );
    finish_and_verify(pair, primary, Some(backup), 1000);
}
