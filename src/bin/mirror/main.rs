//! `mirror`: run libmirror nodes, inspect their files, and demonstrate crash recovery.
//!
//! This file is the command line's shape (the subcommands and their one-line help) and the exit
//! code policy; each command lives in its own module under `cmd/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod node_process;

use cmd::{backup, bench, check_workload, demo, primary, status, verify};

#[derive(Parser)]
#[command(
    name = "mirror",
    version,
    about = "Synchronous primary/backup replication of a memory region, with crash recovery without a complete remirror"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Live demo on this machine: a backup and a primary process on loopback, writes, a SIGKILL of
    /// each node and its recovery, then a byte-for-byte check of both regions.
    Demo(demo::DemoArgs),
    /// Benchmarks in one run: sync write latency next to the raw TCP ping-pong floor
    /// (interleaved), pipelined throughput next to raw TCP streaming, and recovery (catch-up
    /// after K missed writes next to a full remirror of the region).
    Bench(bench::BenchArgs),
    /// Run a backup node until SIGINT/SIGTERM.
    Backup(backup::BackupArgs),
    /// Run a primary node with a built-in seeded write workload.
    Primary(primary::PrimaryArgs),
    /// Show what a node's queue file says (the node may be running or stopped).
    Status(status::StatusArgs),
    /// Compare two region files chunk by chunk and list the chunks that differ.
    Verify(verify::VerifyArgs),
    /// Check a region file against a workload and a completions file.
    CheckWorkload(check_workload::CheckWorkloadArgs),
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIRROR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Backup(args) => backup::run(args),
        Command::Primary(args) => primary::run(args),
        Command::Status(args) => status::run(args),
        Command::Verify(args) => verify::run(args),
        Command::CheckWorkload(args) => check_workload::run(args),
    };
    // Exit codes: 0 done (or a check passed), 1 a check found a difference (the command's own
    // code), 2 an error (here) or a bad command line (clap).
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mirror: error: {e}");
            ExitCode::from(2)
        }
    }
}
