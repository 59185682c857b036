//! Typed errors. Each says whose fault it is: the caller (bad argument, API misuse), the
//! configuration, the environment (files, sockets), or the peer.

use std::path::PathBuf;

use mirror_proto::SubmitError;
use mirror_storage::StorageError;
use thiserror::Error;

/// A configuration problem; always names the key (or the file) at fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key this version does not know.
    #[error("unknown config key '{key}'")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A key's value cannot be used.
    #[error("config key '{key}' has bad value '{value}': {why}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A required key is not set.
    #[error("config key '{key}' is required")]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// The TOML text does not parse.
    #[error("config is not valid TOML: {message}")]
    Toml {
        /// Parser message.
        message: String,
    },
    /// A command-line flag of the `mirror` tool that cannot be used (config keys given there
    /// have their own errors, which name the key).
    #[error("bad command line: {why}")]
    CommandLine {
        /// What is wrong, naming the flag.
        why: String,
    },
    /// A problem in a config file.
    #[error("{}: {inner}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The problem.
        inner: Box<ConfigError>,
    },
}

/// Everything that can go wrong in the engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A queue or region file problem (I/O, corruption, mismatch).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An operating-system error outside the storage files.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The caller asked for an invalid write (empty, too large, outside the region).
    #[error("invalid write: {0}")]
    InvalidWrite(#[from] SubmitError),
    /// Caller error: the call needs the other role (writes go to the primary).
    #[error("this node is a {role}; {what} needs a {needs}")]
    WrongRole {
        /// This node's role.
        role: crate::config::Role,
        /// The operation.
        what: &'static str,
        /// The role it needs.
        needs: crate::config::Role,
    },
    /// Caller error: the ticket was never issued by this node.
    #[error("ticket {ticket} was never issued (last issued: {last})")]
    UnknownTicket {
        /// The ticket.
        ticket: u64,
        /// Highest ticket issued so far.
        last: u64,
    },
    /// The wait ended before the write completed; the write stays pending and may still complete.
    #[error("timed out waiting for the write to complete")]
    Timeout,
    /// The node was closed.
    #[error("node is closed")]
    Closed,
    /// The node stopped because continuing could lose data, or the peer is incompatible.
    #[error("node failed: {reason}")]
    Failed {
        /// Why.
        reason: String,
    },
    /// This node was a primary and a newer primary exists (a failover happened): it completes
    /// no more writes of its old term. Its pending and later writes fail with this until it
    /// is promoted again (after it rejoined as a backup).
    #[error("{reason}")]
    Fenced {
        /// What fenced it, and what to do.
        reason: String,
    },
    /// A promotion was refused (the message says why and what to do).
    #[error("promotion refused: {0}")]
    Promote(#[from] mirror_proto::PromoteError),
    /// A demotion was refused.
    #[error("demotion refused: {0}")]
    Demote(#[from] mirror_proto::DemoteError),
    /// The build or machine does not support the requested feature.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An online verify could not run, or ended before comparing every chunk.
    #[error("online verify: {0}")]
    Verify(String),
}

/// Result alias.
pub type Result<T, E = MirrorError> = std::result::Result<T, E>;
