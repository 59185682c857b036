//! Core bugs the simulator found, one seed each, played with the workaround that steers the
//! campaign around it turned off (see `Workarounds`). Each test asserts that the bug still
//! shows, and that the seed passes with the workaround: when one fails because its seed now
//! passes without the workaround, the bug is fixed, and the workaround (and the test) can go.
//! Changes to the simulator's random draws move a scenario to another seed: find it again with
//! `mirror-sim --seeds 2000 --keep-going --without-workaround NAME`.

use mirror_sim::{run_seed, Checker, SimFailure, SimOptions, SimReport, Workarounds};

fn run(seed: u64, workarounds: Workarounds) -> Result<SimReport, SimFailure> {
    let dir = tempfile::tempdir().unwrap();
    let opts = SimOptions {
        workarounds,
        ..SimOptions::default()
    };
    run_seed(seed, &opts, dir.path())
}

/// Plays `seed` without the workaround `off` turns off: it must fail with `checker`, saying
/// `what`; with every workaround it must pass.
fn still_shows(seed: u64, off: fn(&mut Workarounds), checker: Checker, what: &str) {
    let mut without = Workarounds::default();
    off(&mut without);
    match run(seed, without) {
        Err(f) if f.checker == checker && f.message.contains(what) => {}
        other => panic!("seed {seed} no longer shows the bug ({checker:?}, {what:?}): {other:?}"),
    }
    if let Err(f) = run(seed, Workarounds::default()) {
        panic!("seed {seed} fails even with the workarounds: {f}");
    }
}

/// Seed 1680, `continue`: at step 487 A, now a backup, saves its divergent suffix and takes the
/// repair bytes of its ranges from B (its region then holds B's writes there), and B crashes
/// (519) before `RepairDone`: A still holds the suffix, with a region that is neither its log's
/// nor B's. The core now refuses `promote(false)` of a node whose repair was interrupted while
/// it runs, but nothing persists it across a restart, and a restart as a primary is accepted
/// (the operator starts A when no node is a primary, 1703); A, which wrote more as a primary,
/// later wins a split brain (1799) and serves its region, which is not its log's, repairing B
/// from it. The pair converges with regions that differ (checker 8), the primary's from the
/// replay of its own log.
#[test]
fn known_core_bug_a_backup_promoted_after_an_interrupted_repair_serves_a_region_not_its_log() {
    still_shows(
        1680,
        |w| w.no_promotion_mid_repair = false,
        Checker::SilentDivergence,
        "the replay of the primary's log agrees with the primary: false",
    );
}
