//! The simulator's own suite: a few hundred seeds, exact replay, and the canaries.

use mirror_sim::{run_seed, Checker, SimFailure, SimOptions, SimReport};

fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, SimFailure> {
    let dir = tempfile::tempdir().unwrap();
    run_seed(seed, opts, dir.path())
}

/// Seeds for `cargo test` (`mirror-sim --seeds N` runs many more).
const SEEDS: u64 = 300;

#[test]
fn a_few_hundred_seeds_lose_no_completed_write_and_converge() {
    let opts = SimOptions::default();
    let mut totals = SimReport::default();
    for seed in 0..SEEDS {
        let r = run(seed, &opts).unwrap_or_else(|f| {
            panic!("{f}\nreplay: cargo run --release -p mirror-sim -- --seed {seed}")
        });
        totals.add(&r);
    }
    eprintln!("{SEEDS} seeds: {totals:?}");
    // The campaign must actually exercise what it claims to.
    assert!(
        totals.crashes[0] > 100 && totals.crashes[1] > 100,
        "{totals:?}"
    );
    assert!(
        totals.power_losses > 50 && totals.torn_words > 0,
        "{totals:?}"
    );
    // Crashes inside a batch of actions or a checkpoint, not only between steps.
    assert!(totals.mid_action_crashes > 100, "{totals:?}");
    assert!(totals.partitions > 50 && totals.mangled > 0, "{totals:?}");
    assert!(
        totals.recovery_records > 0 && totals.room_drops > 0,
        "{totals:?}"
    );
    assert!(totals.cuts > 50 && totals.half_opens > 50, "{totals:?}");
    // And failover: every role event, fences under both policies, every verdict.
    assert!(
        totals.promotions > 50 && totals.forced_promotions > 5 && totals.demotions > 20,
        "{totals:?}"
    );
    assert!(
        totals.fences > 50 && totals.fenced_tickets > 100 && totals.fenced_stops > 5,
        "{totals:?}"
    );
    assert!(
        totals.other_role_restarts > 20 && totals.refused_primary_starts > 5,
        "{totals:?}"
    );
    let sb = totals.split_brains;
    assert!(
        sb.stay_apart > 20 && sb.discard_backup > 10 && sb.discard_primary > 10,
        "{totals:?}"
    );
    assert!(
        totals.operator_resolutions > 5 && totals.completed_writes_discarded > 0,
        "{totals:?}"
    );
    // Beyond the queue: full queues fold into the bitmap, and resyncs complete under the
    // same faults (crashes of either node in the middle included).
    assert!(
        totals.folds > 100 && totals.resyncs > 10 && totals.resync_bytes > 0,
        "{totals:?}"
    );
}

#[test]
fn a_seed_replays_exactly() {
    let opts = SimOptions::default();
    for seed in [1, 28, 4242] {
        let a = run(seed, &opts).unwrap();
        let b = run(seed, &opts).unwrap();
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(
            (a.steps, a.completed_writes, a.torn_words),
            (b.steps, b.completed_writes, b.torn_words)
        );
    }
    let other = run(2, &opts).unwrap();
    assert_ne!(other.trace_hash, run(1, &opts).unwrap().trace_hash);
}

#[test]
fn the_canary_applying_before_the_ack_is_caught() {
    let opts = SimOptions {
        canary_apply_before_ack: true,
        ..SimOptions::default()
    };
    let mut policies = [0u32; 2];
    let mut missed = Vec::new();
    for seed in 0..40 {
        match run(seed, &opts) {
            Err(f) if f.checker == Checker::PrimaryAheadOfBackup => {}
            Err(f) => panic!("canary failed another checker: {f}"),
            // A seed whose pair never writes synchronously in its fault phase (seed 1: the
            // primary's crashes and isolated restarts keep it degraded) cannot show it.
            Ok(_) => {
                missed.push(seed);
                continue;
            }
        }
        match mirror_sim::Swarm::for_seed(seed).policy {
            mirror_proto::PeerLossPolicy::Block => policies[0] += 1,
            mirror_proto::PeerLossPolicy::Continue => policies[1] += 1,
        }
    }
    assert!(missed.len() <= 2, "canary not caught by seeds {missed:?}");
    // Caught under both policies: under `continue` too, as long as the primary is not
    // degraded.
    assert!(policies[0] > 5 && policies[1] > 5, "{policies:?}");
}

/// The third canary: a driver that ignores a fence (it takes `RefuseWrites` for success and
/// the node for the primary it was) completes writes of a superseded term. Checker 10 catches
/// it every time it acts: wherever a fenced primary had writes pending, or the client went on
/// writing to it. That is most seeds that fence; the others fence a node that stops (`stop`)
/// or crashes in the same batch, or fence in the liveness phase or the client's idle tail,
/// when the client writes nothing.
#[test]
fn the_canary_completing_a_fenced_primarys_writes_is_caught() {
    let canary = SimOptions {
        canary_fencing: true,
        ..SimOptions::default()
    };
    let (mut fencing, mut caught) = (0, 0);
    for seed in 0..200 {
        let fenced = run(seed, &SimOptions::default()).unwrap().fences > 0;
        match run(seed, &canary) {
            Err(f) if f.checker == Checker::FencedPrimaryWrote => {
                assert!(fenced, "seed {seed} caught the canary without a fence: {f}");
                caught += 1;
            }
            Err(f) => panic!("canary failed another checker: {f}"),
            Ok(r) => assert_eq!(
                r.canary_fenced_completions, 0,
                "seed {seed}: the canary completed fenced writes and nothing caught it"
            ),
        }
        fencing += u32::from(fenced);
    }
    assert!(fencing > 40, "only {fencing} seeds fence");
    assert!(
        caught * 2 > fencing,
        "the fencing canary was caught by {caught} of the {fencing} seeds that fence"
    );
}

/// The second canary: a backup that matches logs by seq alone (a duplicate seq of another term
/// is taken for the same write, as before terms). Only seeds where a primary loses the unsynced
/// tail of its queue and reuses those seqs before its backup answers can show it, so this runs
/// seeds until the first such one; the checkers must then see the silent divergence.
#[test]
fn the_canary_matching_logs_by_seq_alone_is_caught() {
    let opts = SimOptions {
        canary_seq_only_matching: true,
        ..SimOptions::default()
    };
    for seed in 0..2_000 {
        if let Err(f) = run(seed, &opts) {
            assert!(
                matches!(
                    f.checker,
                    Checker::SilentDivergence
                        | Checker::RegionsDiffer
                        | Checker::RecoveryWrong
                        | Checker::CompletedWriteLost
                        | Checker::CompletedWriteDiscarded
                        | Checker::NoConvergence
                ),
                "canary failed an unrelated checker: {f}"
            );
            eprintln!("canary caught by seed {seed}: {f}");
            return;
        }
    }
    panic!("no seed in 0..2000 caught the canary that ignores terms");
}

/// Seed 26 plays the four steps the terms exist for: a `continue` primary sends seqs
/// 202..=222, the backup holds them, the primary loses power during its own sync (they are lost
/// from its queue, never completed), comes back and, the network down, writes degraded at
/// those seqs in a new term, and the backup returns. With terms the backup drops its 21 records
/// of the old term (saved, repaired) and the pair converges; matching by seq alone (the canary,
/// i.e. the code before terms) leaves both synchronous with different regions. Changes to the
/// simulator's random draws or to the nodes' timing move the scenario to another seed (the
/// checkpoint pacing moved it from seed 24 to 1329; the primary's apply reports riding with its
/// writes, to 289; `process`-style idle checkpoints, drawn per seed, to 26): find it again
/// among the seeds the canary catches
/// (`mirror-sim --canary-log-matching --seeds 1500 --keep-going`), then with `--seed N | grep
/// -E "lost seqs|discards|split brain"` (a primary's lost seqs, then one discard, no split brain).
#[test]
fn seed_26_is_the_four_step_divergence_and_only_terms_survive_it() {
    let report = run(26, &SimOptions::default()).unwrap();
    assert!(
        report.discarded_records >= 21,
        "seed 26 no longer plays the scenario: {report:?}"
    );
    let canary = SimOptions {
        canary_seq_only_matching: true,
        ..SimOptions::default()
    };
    match run(26, &canary) {
        Err(f) if f.checker == Checker::SilentDivergence => {}
        other => panic!("matching by seq alone must diverge silently on seed 26: {other:?}"),
    }
}
