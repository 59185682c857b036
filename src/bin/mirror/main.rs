//! `mirror`: run libmirror nodes, inspect their files, and demonstrate crash recovery.
//!
//! This file is the command line's shape (the subcommands and their one-line help) and the exit
//! code policy; each command lives in its own module under `cmd/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod node_process;

use cmd::{backup, bench, check_workload, control, demo, keys, primary, status, top, verify};

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
    /// Show what a node's queue file says (the node may be running or stopped), or with
    /// --live what the running node says.
    Status(status::StatusArgs),
    /// Failover: make a running backup the primary (a new term). Refused while it is connected
    /// to a live primary, unless --force (which fences that primary).
    Promote(control::PromoteArgs),
    /// Failover: make a running primary a backup (its pending writes fail; it waits for the new
    /// primary, which repairs and catches it up).
    Demote(control::DemoteArgs),
    /// Split brain: name the node whose divergent writes are discarded at the next handshake
    /// (saved to a file first).
    Resolve(control::ResolveArgs),
    /// Compare two region files chunk by chunk and list the chunks that differ.
    Verify(verify::VerifyArgs),
    /// Check a region file against a workload and a completions file.
    CheckWorkload(check_workload::CheckWorkloadArgs),
    /// Follow a running node's events (connected, peer lost, degraded, recovering,
    /// synchronous, promoted, demoted, fenced, split brain, failed) as JSON lines, like tail -f.
    Events(control::EventsArgs),
    /// A live view of running nodes, refreshed every second: role, term, phase, peer, write
    /// rate, latency, queue fill, recoveries.
    Top(top::TopArgs),
    /// Write a new random secret for a pair (secret_file), private to its owner.
    Secret(keys::SecretArgs),
    /// Print a certificate's SHA-256 fingerprint, as the peer's tls_peer_fingerprint takes it.
    Fingerprint(keys::FingerprintArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node's own settings decide its log (log_format, log_level; MIRROR_LOG overrides the
    // level). The benchmark runs its nodes in this process: at error, their lines do not land
    // between its tables (it takes backups away on purpose: their warnings are its scenario).
    let (format, level) = match &cli.command {
        Command::Backup(a) => cmd::shared::log_settings(&a.node, mirror::Role::Backup),
        Command::Primary(a) => cmd::shared::log_settings(&a.node, mirror::Role::Primary),
        Command::Bench(_) => (mirror::logging::LogFormat::Text, "error".to_string()),
        _ => (mirror::logging::LogFormat::Text, "info".to_string()),
    };
    mirror::logging::init(format, &level);
    silence_closed_output_panics();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&cli.command)));
    let result = match ran {
        Ok(result) => result,
        // What the command held was dropped on the way here (a benchmark's files, its
        // in-process nodes): end as a tool killed by SIGPIPE ends, quietly.
        Err(payload) if is_closed_output(payload.as_ref()) => {
            return ExitCode::from(cmd::shared::OUTPUT_CLOSED)
        }
        Err(payload) => std::panic::resume_unwind(payload),
    };
    // Exit codes: 0 done (or a check passed), 1 a check found a difference (the command's own
    // code), 2 an error (here) or a bad command line (clap), 141 the output's reader went away.
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mirror: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: &Command) -> cmd::shared::CliResult {
    match command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Backup(args) => backup::run(args),
        Command::Primary(args) => primary::run(args),
        Command::Status(args) => status::run(args),
        Command::Promote(args) => control::promote(args),
        Command::Demote(args) => control::demote(args),
        Command::Resolve(args) => control::resolve(args),
        Command::Verify(args) => verify::run(args),
        Command::CheckWorkload(args) => check_workload::run(args),
        Command::Events(args) => control::events(args),
        Command::Top(args) => top::run(args),
        Command::Secret(args) => keys::secret(args),
        Command::Fingerprint(args) => keys::fingerprint(args),
    }
}

/// Whether a panic is `print!`'s on an output whose reader went away (`mirror bench | head`):
/// Rust ignores SIGPIPE, so the write fails with EPIPE and `println!` panics with this message.
fn is_closed_output(payload: &(dyn std::any::Any + Send)) -> bool {
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    message.starts_with("failed printing to std")
        && message.ends_with(&format!("(os error {})", libc::EPIPE))
}

/// Keeps the closed-output panic (see [`is_closed_output`]) from printing its message and
/// backtrace: every other panic still prints as before.
fn silence_closed_output_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_output(info.payload()) {
            default(info)
        }
    }));
}
