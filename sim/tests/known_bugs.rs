//! Core bugs the simulator found, one seed each, played with the workaround that steers the
//! campaign around it turned off (see `Workarounds`). Each test asserts that the bug still
//! shows, and that the seed passes with the workaround: when one fails because its seed now
//! passes without the workaround, the bug is fixed, and the workaround (and the test) can go.
//! One bug has no workaround (the simulated driver and operator cannot avoid it): its seeds
//! fail in the default campaign, which is why that campaign is quoted over seeds it passes.
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

/// Seed 47, `on_fenced = stop`: B, promoted, dials A, still a primary of an older term. A's
/// `admit` fences A (it stops: `Fatal(Fenced)`), then judges the Hello as the stopped primary
/// it now is and returns `Err(Role, "this node is a primary: it takes no connections")`; the
/// driver sends that reject, and B, the new primary, takes `Reject{Role}` in its handshake for
/// a fatal refusal: it stops too. One fence stops both nodes.
#[test]
fn known_core_bug_a_stopped_primarys_reject_stops_the_new_primary() {
    still_shows(
        47,
        |w| w.stopped_primary_does_not_answer = false,
        Checker::NodeStopped,
        "(Role): this node is a primary: it takes no connections",
    );
}

/// Seed 92, `after_split_brain = disconnect`: B (primary) and A (backup, holding writes it
/// completed alone) stay apart; at step 2670 the operator runs `resolve_split_brain(A)` on A.
/// At the next handshake (2683) A's plan uses its own choice (verdict: discard the backup's
/// writes), so it saves its suffix and asks for a repair; but the Hello it answers with carries
/// `discard_node = 0` (`backup.rs`, `on_hello`: the normal path's Hello hard-codes 0, and the
/// choice is cleared), so B, applying the same rule to the two Hellos, decides to stay apart
/// and drops the connection. The choice is spent and the nodes stay apart; the documentation
/// says running it on either node is enough.
#[test]
fn known_core_bug_a_resolution_run_on_the_node_it_names_is_not_announced() {
    still_shows(
        92,
        |w| w.resolve_on_the_survivor = false,
        Checker::SplitBrainOutcomeWrong,
        "discards its records (656, 723], but the two Hellos plan None",
    );
}

/// Seed 13, `continue`: A wrote alone from seq 1 before B ever held a record; a switchover (A
/// demoted at step 556) promotes B, empty, which writes alone from seq 1 in its own term. When they meet, the two
/// histories cover seq 1 with different terms, `common_point` returns None, and the handshake
/// refuses them as unrecoverable ("the two queues share no term on any seq") instead of seeing
/// a split brain after seq 0: the dialing primary stops on the reject.
#[test]
fn known_core_bug_logs_that_part_at_seq_1_are_unrecoverable() {
    still_shows(
        13,
        |w| w.no_promotion_of_an_empty_node = false,
        Checker::NodeStopped,
        "share no term on any seq",
    );
}

/// Seed 1680, `continue`: at step 487 A, now a backup, saves its divergent suffix and takes the
/// repair bytes of its ranges from B (its region then holds B's writes there), and B crashes
/// (519) before `RepairDone`: A still holds the suffix, with a region that is neither its log's
/// nor B's. Nothing remembers the interrupted repair: `promote(false)` is accepted (the
/// operator promotes A when no node is a primary, 1703), and A, which wrote more as a primary,
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

/// Seed 174, `discard-younger-primary`: A (backup) wins a split brain against B (primary of
/// term 0x3a005) and promotes itself; its new term is the next of its own knowledge (0x2669a),
/// not above the loser's, because answering a split brain does not raise its term to the
/// primary's Hello. B, now its backup, refuses A as stale, which fences A: under `stop` A
/// stops, under `demote` both are backups until an operator promotes one.
#[test]
fn known_core_bug_a_split_brain_winner_can_start_a_term_below_the_losers() {
    still_shows(
        174,
        |w| w.tolerate_stale_split_brain_winner = false,
        Checker::SplitBrainOutcomeWrong,
        "below the term 0x3a005 of the loser",
    );
}

/// Seed 19021, `continue`, no workaround: B, promoted by force (term 0x208e4), appends seq 119
/// and crashes before completing it; A, cut off, completes writes alone after seq 118. B
/// restarts as a primary (0x308e4) and dials A, which is fenced and, as a backup, finds a split
/// brain (its suffix holds completed writes); the verdict discards the primary's suffix, so A
/// wins and becomes the primary (0x40cb6). At the next handshake B, now the backup, holds no
/// completed write after seq 118, so it is no split brain any more, and the plain rule refuses
/// its suffix, whose first term (0x208e4) is newer than A's at seq 119: "Unrecoverable: the
/// backup's history is newer ... a newer primary wrote it". A stops on the reject: the
/// verdict did not survive the role swap it caused. (Seeds 11966 and 13054 play it too.)
#[test]
fn known_core_bug_a_split_brain_loser_with_nothing_completed_is_unrecoverable_after_the_swap() {
    match run(19021, Workarounds::default()) {
        Err(f)
            if f.checker == Checker::NodeStopped
                && f.message
                    .contains("the backup's history is newer from seq 119 on") => {}
        other => panic!("seed 19021 no longer shows the bug: {other:?}"),
    }
}
