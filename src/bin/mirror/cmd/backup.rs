//! `mirror backup`: run a backup node until SIGINT/SIGTERM, printing `status` lines.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use mirror::{Mirror, MirrorError, Role};

use super::shared::{build_config, stats_line, stop_flag, CliResult, NodeArgs};

/// The flags of `mirror backup`.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Print a status line this often (milliseconds; 0: never)
    #[arg(long, default_value_t = 1000)]
    pub report_ms: u64,
}

pub fn run(args: &BackupArgs) -> CliResult {
    let cfg = build_config(&args.node, Role::Backup)?;
    let stop = stop_flag()?;
    let m = Mirror::open(cfg)?;
    // The demo and the tests wait for this first line (its first word, `backup`) before they
    // start a primary.
    println!(
        "backup listening on {}",
        m.listen_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        let s = m.stats();
        if let Some(f) = &s.failure {
            return Err(MirrorError::Failed { reason: f.clone() });
        }
        if args.report_ms > 0 && last.elapsed() >= Duration::from_millis(args.report_ms) {
            println!("status {}", stats_line(&s));
            let _ = std::io::stdout().flush();
            last = Instant::now();
        }
    }
    m.close()?;
    println!("status {}", stats_line(&m.stats()));
    Ok(ExitCode::SUCCESS)
}
