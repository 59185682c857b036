//! The process's log: where a node's lines go and in which form (`log_format`, `log_level`).
//!
//! A library does not take over its host's logging: `Mirror::open` installs nothing, a Rust
//! program sets up its own `tracing` subscriber. The `mirror` command and the C API
//! (`mirror_open`, which has no other way to get the engine's lines out) install one subscriber
//! per process, writing to stderr, the first time they are asked to; `MIRROR_LOG` (an
//! `EnvFilter` directive such as `debug` or `mirror=trace`) overrides the level when set.

use std::sync::OnceLock;

/// The form of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for log shippers.
    Json,
}

/// The levels `log_level` takes.
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

/// What the process's subscriber was installed with (the first caller wins).
static INSTALLED: OnceLock<(LogFormat, String)> = OnceLock::new();

/// Installs the process's subscriber (stderr; `format`; `level`, or `MIRROR_LOG` when set),
/// unless one is installed already (by this function or by the program itself). Returns the
/// settings in force when this call installed them.
pub fn init(format: LogFormat, level: &str) -> Option<(LogFormat, String)> {
    let mut installed = None;
    INSTALLED.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MIRROR_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false);
        let ok = match format {
            LogFormat::Text => builder.with_ansi(ansi).try_init().is_ok(),
            LogFormat::Json => builder.json().with_ansi(false).try_init().is_ok(),
        };
        if ok {
            installed = Some((format, level.to_string()));
        }
        (format, level.to_string())
    });
    installed
}
