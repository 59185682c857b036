//! What several commands share: the result type and command-line errors, sizes and
//! `--set KEY=VALUE` pairs from the command line, a node's config (file, then flags, then
//! `--set`), the stop signals and the status line of the node-running commands, and the default
//! directory of the benchmark's and the simulator's files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;
use mirror::{Config, ConfigBuilder, MirrorError, Role, Stats};

/// What a command returns: its exit code (0, or 1 when a check found a difference), or an error
/// that `main` prints on one line before exiting with 2.
pub type CliResult = Result<ExitCode, MirrorError>;

/// The exit code of a command whose output's reader went away (`mirror bench | head`): what a
/// shell reports for a tool killed by SIGPIPE (128 + 13). Printed nothing more, cleaned up.
pub const OUTPUT_CLOSED: u8 = 141;

/// An error in the command line itself (config keys have their own errors, which name the key).
pub fn usage(msg: impl Into<String>) -> MirrorError {
    MirrorError::Config(mirror::ConfigError::CommandLine { why: msg.into() })
}

/// A size given on the command line: bytes, or with KiB/MiB/GiB.
pub fn parse_size_arg(text: &str) -> Result<u64, MirrorError> {
    mirror::config::parse_size(text).map_err(usage)
}

/// One `--set KEY=VALUE`: the key (trimmed) and the value (as given).
pub fn split_set(pair: &str) -> Result<(&str, &str), MirrorError> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| usage(format!("--set expects KEY=VALUE, got '{pair}'")))?;
    Ok((key.trim(), value))
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
    /// Address to listen on (a backup needs it; give both nodes both addresses for failover)
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of the other node (a primary needs it)
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
    /// The pair's shared secret (`mirror secret FILE` makes one): peers authenticate with it
    #[arg(long)]
    pub secret_file: Option<String>,
    /// Backup: consent to an initial sync (a new, replaced or stale node): the primary
    /// compares every chunk and brings over those that differ (`initial_sync = true`)
    #[arg(long)]
    pub initial_sync: bool,
    /// Bytes of region per second a resync or verify may process, e.g. 200MiB (`resync_rate`)
    #[arg(long)]
    pub resync_rate: Option<String>,
    /// Any config key: --set key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The log settings of a node's config (defaults if it does not build: the command reports
/// why when it builds it again).
pub fn log_settings(node: &NodeArgs, role: Role) -> (mirror::logging::LogFormat, String) {
    match build_config(node, role) {
        Ok(cfg) => (
            cfg.log_format,
            cfg.log_level.unwrap_or_else(|| "info".to_string()),
        ),
        Err(_) => (mirror::logging::LogFormat::Text, "info".to_string()),
    }
}

/// Builds a node's config: the file, then the flags, then `--set`.
pub fn build_config(node: &NodeArgs, role: Role) -> Result<Config, MirrorError> {
    let mut b = ConfigBuilder::new();
    if let Some(path) = &node.config {
        b.load_toml(path)?;
    }
    b.set("role", &role.to_string())?;
    let flags = [
        ("region", &node.region),
        ("region_size", &node.region_size),
        ("queue", &node.queue),
        ("queue_size", &node.queue_size),
        ("listen", &node.listen),
        ("peer", &node.peer),
        ("transport", &node.transport),
        ("durability", &node.durability),
        ("on_peer_loss", &node.on_peer_loss),
        ("cpu", &node.cpu),
        ("secret_file", &node.secret_file),
        ("resync_rate", &node.resync_rate),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            b.set(key, v)?;
        }
    }
    if node.initial_sync {
        b.set("initial_sync", "true")?;
    }
    for pair in &node.set {
        let (key, value) = split_set(pair)?;
        b.set(key, value)?;
    }
    Ok(b.build()?)
}

/// A flag that SIGINT and SIGTERM raise, so that a node closes cleanly on either.
pub fn stop_flag() -> Result<Arc<AtomicBool>, MirrorError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|source| MirrorError::Io {
            context: "installing signal handlers".into(),
            source,
        })?;
    }
    Ok(stop)
}

/// A node's figures as `key=value` words, for the `status` and `progress` lines that the demo
/// and the tests parse (src/bin/mirror/node_process.rs): renaming a key breaks them.
pub fn stats_line(s: &Stats) -> String {
    format!(
        "next_seq={} applied={} acked={} peer_applied={} queue_records={} queue_bytes={} phase={} degraded={} recoveries={} rec_records={} rec_bytes={} dirty_chunks={} resync_left={} resync_sent={}",
        s.next_seq,
        s.applied_through,
        s.acked_through,
        s.peer_applied_through,
        s.queue_records,
        s.queue_bytes,
        phase_name(s),
        u8::from(s.degraded),
        s.recoveries,
        s.last_recovery_records,
        s.last_recovery_bytes,
        s.dirty_chunks,
        s.transfer.as_ref().map_or(0, |t| t.bytes_left),
        s.transfer.as_ref().map_or(0, |t| t.bytes_sent)
    )
}

/// The phase as the report lines spell it: `synchronous`, `recovering`, ...
fn phase_name(s: &Stats) -> String {
    format!("{:?}", s.phase).to_lowercase()
}

/// Where the benchmark and the simulator put their nodes' files: `chosen`, else /dev/shm when
/// present (memory-backed, so runs measure the engine rather than this machine's disk writeback),
/// else the temp dir.
pub fn scratch_base_dir(chosen: Option<&Path>) -> PathBuf {
    if let Some(dir) = chosen {
        return dir.to_path_buf();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
