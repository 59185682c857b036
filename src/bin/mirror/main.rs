//! `mirror`: run libmirror nodes, inspect their files, and demonstrate crash recovery.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod cli;
mod sim_cmd;

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

/// Node settings: a TOML file, then flags, then `--set key=value` (later ones win).
#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// TOML config file (flat table of the keys below)
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Region file
    #[arg(long)]
    pub region: Option<String>,
    /// Region size (bytes, or with KiB/MiB/GiB)
    #[arg(long)]
    pub region_size: Option<String>,
    /// Persistent queue file
    #[arg(long)]
    pub queue: Option<String>,
    /// Queue capacity (default 64MiB)
    #[arg(long)]
    pub queue_size: Option<String>,
    /// Backup: address to listen on
    #[arg(long)]
    pub listen: Option<String>,
    /// Primary: address of the backup
    #[arg(long)]
    pub peer: Option<String>,
    /// tcp | rdma
    #[arg(long)]
    pub transport: Option<String>,
    /// process | power | pmem
    #[arg(long)]
    pub durability: Option<String>,
    /// continue | block
    #[arg(long)]
    pub on_peer_loss: Option<String>,
    /// CPU to pin the poller to
    #[arg(long)]
    pub cpu: Option<String>,
    /// Any config key: --set key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Number of writes (0: until SIGINT/SIGTERM)
    #[arg(long, default_value_t = 0)]
    pub writes: u64,
    /// Bytes per write
    #[arg(long, default_value = "64")]
    pub write_size: String,
    /// Workload seed (the same seed gives the same writes)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Id of the first write (use a fresh range after a restart)
    #[arg(long, default_value_t = 0)]
    pub start_id: u64,
    /// Writes per second (0: as fast as possible)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Writes in flight at once (1: synchronous write calls)
    #[arg(long, default_value_t = 1)]
    pub depth: u64,
    /// Append the id of every completed write to this file (one per line, written at once)
    #[arg(long)]
    pub completions: Option<PathBuf>,
    /// Print a progress line this often (milliseconds; 0: never)
    #[arg(long, default_value_t = 500)]
    pub report_ms: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Live demo on this machine: a backup and a primary process on loopback, writes, a SIGKILL of
    /// each node and its recovery, then a byte-for-byte check of both regions.
    Demo(cli::DemoArgs),
    /// Benchmarks in one run: sync write latency next to the raw TCP ping-pong floor
    /// (interleaved), pipelined throughput next to raw TCP streaming, and recovery (catch-up
    /// after K missed writes next to a full remirror of the region).
    Bench(cli::BenchArgs),
    /// Deterministic simulation: the real protocol core and queue under seeded crashes, power
    /// losses, partitions and a broken transport, checked from outside; prints the failing seed.
    Sim(sim_cmd::SimArgs),
    /// Run a backup node until SIGINT/SIGTERM.
    Backup {
        #[command(flatten)]
        node: NodeArgs,
        /// Print a status line this often (milliseconds; 0: never)
        #[arg(long, default_value_t = 1000)]
        report_ms: u64,
    },
    /// Run a primary node with a built-in seeded write workload.
    Primary {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Show what a node's queue file says (the node may be running or stopped).
    Status {
        /// Queue file
        queue: PathBuf,
    },
    /// Compare two region files chunk by chunk and list the chunks that differ.
    Verify {
        /// First region file
        a: PathBuf,
        /// Second region file
        b: PathBuf,
        /// Chunk size
        #[arg(long, default_value = "64KiB")]
        chunk: String,
    },
    /// Check a region file against a workload and a completions file.
    CheckWorkload {
        /// Region file
        region: PathBuf,
        /// Completions file written by `mirror primary --completions`
        #[arg(long)]
        completions: Option<PathBuf>,
        /// Workload seed
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Bytes per write
        #[arg(long, default_value = "64")]
        write_size: String,
    },
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
    let result = match cli.command {
        Command::Demo(args) => cli::demo(args),
        Command::Bench(args) => cli::bench(&args),
        Command::Sim(args) => sim_cmd::sim(&args),
        Command::Backup { node, report_ms } => cli::run_backup(&node, report_ms),
        Command::Primary { node, workload } => cli::run_primary(&node, &workload),
        Command::Status { queue } => cli::status(&queue),
        Command::Verify { a, b, chunk } => cli::verify(&a, &b, &chunk),
        Command::CheckWorkload {
            region,
            completions,
            seed,
            write_size,
        } => cli::check_workload(&region, completions.as_deref(), seed, &write_size),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mirror: error: {e}");
            ExitCode::from(2)
        }
    }
}
