//! `mirror-sim`: the deterministic simulator over many seeds, or one seed replayed with its
//! trace. A binary of its own, so that the `mirror` binary and `libmirror.so` carry none of the
//! simulator's crash hooks (`cargo run --release -p mirror-sim -- --seeds 3000`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mirror_sim::{run_seed, SimOptions, SimReport};

/// Deterministic simulation of a libmirror pair: the real protocol core and queue under seeded
/// crashes, power losses, partitions and a broken transport, checked from outside.
#[derive(Parser, Debug, Clone)]
#[command(name = "mirror-sim")]
struct SimArgs {
    /// Number of seeds to run
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// First seed
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replay this one seed, printing every fault and phase change
    #[arg(long)]
    seed: Option<u64>,
    /// Steps with faults per seed
    #[arg(long, default_value_t = SimOptions::default().fault_steps)]
    fault_steps: u64,
    /// The canary: the primary applies writes before the backup's ack (the checkers must fail)
    #[arg(long)]
    canary: bool,
    /// The second canary: the backup matches logs by seq alone, ignoring terms (the checkers
    /// must fail)
    #[arg(long)]
    canary_log_matching: bool,
    /// The third canary: the driver ignores a fence and reports the fenced primary's pending
    /// writes complete (the fencing checker must fail on seeds that fence)
    #[arg(long)]
    canary_fencing: bool,
    /// Run every seed even after a failure (each failure is printed; the exit status says
    /// whether any seed failed)
    #[arg(long)]
    keep_going: bool,
    /// Directory for the simulated nodes' queue files (default /dev/shm when present)
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let a = SimArgs::parse();
    match run(&a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mirror-sim: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Where the nodes' queue files go: `--dir`, else /dev/shm when present (memory-backed: the
/// simulator's own barriers model durability), else the temporary directory.
fn scratch_dir(chosen: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(d) = chosen {
        return d.to_path_buf();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn run(a: &SimArgs) -> Result<ExitCode, String> {
    let base = scratch_dir(a.dir.as_deref());
    let opts = SimOptions {
        fault_steps: a.fault_steps,
        canary_apply_before_ack: a.canary,
        canary_seq_only_matching: a.canary_log_matching,
        canary_fencing: a.canary_fencing,
        trace: a.seed.is_some(),
        ..SimOptions::default()
    };
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => (a.start..a.start.saturating_add(a.seeds)).collect(),
    };
    let started = Instant::now();
    let mut total = SimReport::default();
    let mut failed = 0u64;
    for (i, &seed) in seeds.iter().enumerate() {
        let dir = base.join(format!("mirror-sim-{}-{seed}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let result = run_seed(seed, &opts, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(r) => total.add(&r),
            Err(f) => {
                println!("FAILED: {f}");
                println!(
                    "replay: mirror-sim --seed {seed}{}{}{}{}",
                    if a.canary { " --canary" } else { "" },
                    if a.canary_log_matching {
                        " --canary-log-matching"
                    } else {
                        ""
                    },
                    if a.canary_fencing {
                        " --canary-fencing"
                    } else {
                        ""
                    },
                    if a.fault_steps != SimOptions::default().fault_steps {
                        format!(" --fault-steps {}", a.fault_steps)
                    } else {
                        String::new()
                    }
                );
                if a.keep_going {
                    failed += 1;
                    continue;
                }
                println!("({} seeds passed before it)", i);
                return Ok(ExitCode::from(1));
            }
        }
        if seeds.len() > 1 && (i + 1) % 100 == 0 {
            eprintln!(
                "{} seeds ok ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    print_totals(&total, seeds.len(), started.elapsed().as_secs_f64());
    if failed > 0 {
        println!("{failed} of {} seeds failed", seeds.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The campaign's figures: faults, then failover.
fn print_totals(total: &SimReport, seeds: usize, seconds: f64) {
    println!(
        "{} seeds run in {:.1} s: {} steps, {} completed writes ({} refused), crashes A {} / B {} ({} mid-batch, {} power losses, {} words torn), {} cuts, {} half-open, {} partitions, {} frames mangled, {} backup-full drops, {} records moved by catch-ups, {} divergent records dropped; slowest convergence {} steps",
        seeds,
        seconds,
        total.steps,
        total.completed_writes,
        total.refused_writes,
        total.crashes[0],
        total.crashes[1],
        total.mid_action_crashes,
        total.power_losses,
        total.torn_words,
        total.cuts,
        total.half_opens,
        total.partitions,
        total.mangled,
        total.room_drops,
        total.recovery_records,
        total.discarded_records,
        total.convergence_steps
    );
    let sb = total.split_brains;
    println!(
        "failover: {} promotions, {} forced promotions, {} demotions, {} fences ({} pending writes refused by them, {} fenced nodes stopped), {} restarts in the other role ({} refused as primary: superseded or mid-transfer), handshakes finding a split brain, by verdict: {} stay apart, {} discard the backup, {} discard the primary, {} completed writes discarded by verdicts; {} operator resolutions",
        total.promotions,
        total.forced_promotions,
        total.demotions,
        total.fences,
        total.fenced_tickets,
        total.fenced_stops,
        total.other_role_restarts,
        total.refused_primary_starts,
        sb.stay_apart,
        sb.discard_backup,
        sb.discard_primary,
        total.completed_writes_discarded,
        total.operator_resolutions
    );
    println!(
        "beyond the queue: {} folds of a full queue into the bitmap, {} resyncs completed ({} chunk bytes sent)",
        total.folds, total.resyncs, total.resync_bytes
    );
}
