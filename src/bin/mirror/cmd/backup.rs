//! `mirror backup`: run a backup node until SIGINT/SIGTERM, printing `status` lines.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use mirror::{Mirror, MirrorError, Role};

use super::primary::{WorkloadArgs, Writer};
use super::shared::{build_config, stats_line, stop_flag, CliResult, NodeArgs};

/// The flags of `mirror backup`.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Once promoted (`mirror promote`), write the built-in workload while this node is the
    /// primary (ids from the new term's range: term << 24), printing `progress` lines as
    /// `mirror primary` does
    #[arg(long)]
    pub write_when_primary: bool,
    #[command(flatten)]
    pub workload: WorkloadArgs,
}

pub fn run(args: &BackupArgs) -> CliResult {
    let cfg = build_config(&args.node, Role::Backup)?;
    let mut writer = if args.write_when_primary {
        Some(Writer::new(&args.workload, cfg.region_size)?)
    } else {
        None
    };
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
    let mut last_check = Instant::now();
    let mut last_progress = Instant::now();
    let mut writing_term = 0;
    while !stop.load(Ordering::Relaxed) {
        let primary = m.role() == Role::Primary;
        match writer.as_mut() {
            Some(w) if primary && w.has_work() => {
                let term = m.stats().current_term;
                if term != writing_term {
                    writing_term = term;
                    w.skip_to(term.saturating_mul(1 << 24));
                }
                w.step(&m)?;
                if w.report_due(&mut last_progress) {
                    w.report(&m);
                }
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
        if last_check.elapsed() < Duration::from_millis(10) {
            continue;
        }
        last_check = Instant::now();
        let s = m.stats();
        if let Some(f) = &s.failure {
            return Err(MirrorError::Failed { reason: f.clone() });
        }
        // `--report-ms` (the workload's flag) paces the status lines too.
        let report_ms = args.workload.report_ms;
        if report_ms > 0 && last.elapsed() >= Duration::from_millis(report_ms) {
            println!("status {}", stats_line(&s));
            let _ = std::io::stdout().flush();
            last = Instant::now();
        }
    }
    if let Some(w) = writer.as_mut() {
        w.drain(&m)?;
        w.report(&m);
    }
    m.close()?;
    println!("status {}", stats_line(&m.stats()));
    Ok(ExitCode::SUCCESS)
}
