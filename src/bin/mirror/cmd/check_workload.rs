//! `mirror check-workload`: check a region file against a seeded workload and a completions file
//! (every completed write present, no torn or foreign slot).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use mirror::workload::Workload;
use mirror::MirrorError;

use super::primary::read_completions;
use super::shared::{parse_size_arg, usage, CliResult};

/// The flags of `mirror check-workload`.
#[derive(Args, Debug, Clone)]
pub struct CheckWorkloadArgs {
    /// Region file
    pub region: PathBuf,
    /// Completions file written by `mirror primary --completions`
    #[arg(long)]
    pub completions: Option<PathBuf>,
    /// Workload seed
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Bytes per write
    #[arg(long, default_value = "64")]
    pub write_size: String,
}

pub fn run(args: &CheckWorkloadArgs) -> CliResult {
    let write_size = parse_size_arg(&args.write_size)? as usize;
    let bytes = std::fs::read(&args.region).map_err(|source| MirrorError::Io {
        context: format!("reading region {}", args.region.display()),
        source,
    })?;
    let w = Workload::new(args.seed, write_size, bytes.len() as u64).map_err(usage)?;
    let completed = match &args.completions {
        Some(p) => read_completions(p)?,
        None => Vec::new(),
    };
    match w.check(&bytes, &completed) {
        Ok(()) => {
            println!(
                "OK: {} completed writes present, no torn or foreign slot",
                completed.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAILED: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
