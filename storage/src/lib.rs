//! libmirror's on-disk state: the mirrored **region** and the **persistent queue** of write
//! requests, both mmapped files, with three durability modes.
//!
//! Each node (primary or backup) has:
//!
//! - a [`Region`]: the mirrored memory, a file of exactly `region_size` bytes mapped shared.
//!   Nothing else is in that file, so any tool can compare two regions.
//! - a [`PersistentQueue`]: a ring of records, one per write request (`seq`, term, region
//!   offset, payload), with strictly consecutive sequence numbers. The node appends a record per
//!   write and trims records once the *other* node confirms it applied them. After a crash,
//!   reopening the queue verifies every record from the head (magic, position, crc32c, epoch,
//!   seq continuity, term against the term history) and cuts a torn tail. The queue header also
//!   keeps the small metadata the engine needs across restarts (peer id, `applied_through`,
//!   role, current term, term history).
//! - a [`DirtyBitmap`] beside the queue ([`bitmap_path`]): the chunks of the region a primary
//!   folded out of its full queue while its backup was away (to resync when it returns), and
//!   on a backup whether a resync or catch-up into it has not finished.
//!
//! ```text
//!   engine poller ──append(seq, term, off, bytes)──▶ PersistentQueue ──sync()──▶ durable
//!        │                                              ▲   │
//!        │ write(off, bytes) + sync()                   │   └─ trim_through(seq) when the peer confirms
//!        ▼                                              │
//!     Region ◀── read()/as_ptr() from app threads       │
//!                                                       └─ open(): scan, verify, cut torn tail
//! ```
//!
//! # Durability modes
//!
//! | mode | mapping | `sync()` | survives |
//! |---|---|---|---|
//! | [`Durability::Process`] | `MAP_SHARED` | no-op | a crash of the process (the kernel's page cache keeps every store); **not** a kernel crash or power loss |
//! | [`Durability::Power`] | `MAP_SHARED` | `fdatasync` of the file | additionally a kernel crash or power loss, for everything written before the last completed `sync()` (assuming the device honours flushes) |
//! | [`Durability::Pmem`] | `MAP_SHARED_VALIDATE \| MAP_SYNC` (DAX only) | write back each written cache line (`clwb`, else `clflushopt`, else `clflush`) then `sfence` | like Power, on persistent memory, without a system call |
//!
//! Pmem refuses files that are not on a DAX filesystem with [`StorageError::NotDax`], and is
//! [`StorageError::Unsupported`] outside Linux on x86-64.
//!
//! # Formats
//!
//! The files are specified byte by byte in `docs/FORMAT.md` (the queue and the bitmap:
//! little-endian, versioned, crc32c-checksummed), including the crash-safety argument for the
//! queue and what a bitmap's open does with each kind of damage.
//!
//! # Concurrency
//!
//! Only one thread (the node's poller) mutates a queue or a region. The queue's `head`,
//! `tail` and `next_seq` live in the mapped header and are stored with Release and loaded with
//! Acquire, so another process can watch a live queue ([`inspect_queue`]). Region bytes are
//! read by application threads while the poller writes them: see [`Region`].
//!
//! Each open handle takes an exclusive `flock` on its file: a second writer (in this or another
//! process) gets [`StorageError::Locked`]. Dropping a handle does not sync: drop is
//! indistinguishable from a crash, on purpose.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod bitmap;
mod discarded;
mod error;
mod format;
mod map;
mod queue;
mod region;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use bitmap::{
    bitmap_path, inspect_bitmap, BitmapInfo, BitmapOpenReport, DirtyBitmap, BITMAP_CHUNKS_PER_PAGE,
    BITMAP_MAGIC, BITMAP_PAGE_BYTES, BITMAP_VERSION,
};
pub use discarded::{
    discarded_path, list_discarded, read_discarded, save_discarded, unfinished_repair,
    DiscardedFile, DiscardedRecord, DISCARDED_MAGIC, DISCARDED_VERSION,
};
pub use error::{BitmapDamage, CutReason, StorageError};
pub use format::record_total;
pub use format::{
    CAPACITY_ALIGN_BYTES, FORMAT_VERSION, HEADER_BYTES, MAX_CAPACITY_BYTES, MAX_RECORD_BYTES,
    MIN_CAPACITY_BYTES, QUEUE_MAGIC, RECORD_HEADER_BYTES, RECORD_MAGIC,
};
pub use map::write_zeros;
pub use queue::{
    inspect_queue, PersistentQueue, QueueInfo, QueueParams, RecordRef, Records, RecoveryReport,
};
#[cfg(feature = "crash-hooks")]
pub use queue::{CrashEvent, CrashHook};
pub use queue::{
    OwnedRecord, ReplayState, RUN_BUFFER_MAX, RUN_RECORD_MAX, WARM_AHEAD_MAX, WARM_AHEAD_MIN,
};
pub use region::{file_chunk_checksums, Region, RegionWriter, GATHER_MAX_PIECES};

/// What a completed `sync()` survives. See the table in the crate docs and `docs/FORMAT.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Survives a process crash, not power loss. `sync()` is a no-op.
    Process,
    /// Survives power loss for everything synced: `sync()` is an `fdatasync`.
    Power,
    /// Survives power loss on persistent memory (DAX + `MAP_SYNC`): `sync()` writes back the
    /// written cache lines and fences.
    Pmem,
}

impl Durability {
    /// The name used in configuration: `"process"`, `"power"` or `"pmem"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Power => "power",
            Durability::Pmem => "pmem",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing a [`Durability`] or [`Role`] name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {input:?} (expected one of: {expected})")]
pub struct ParseNameError {
    what: &'static str,
    input: String,
    expected: &'static str,
}

impl FromStr for Durability {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(Durability::Process),
            "power" => Ok(Durability::Power),
            "pmem" => Ok(Durability::Pmem),
            _ => Err(ParseNameError {
                what: "durability",
                input: s.to_owned(),
                expected: "process, power, pmem",
            }),
        }
    }
}

/// A node's role, stored in its queue's metadata (it changes at a failover).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The node applications write to.
    Primary,
    /// The node that mirrors the primary.
    Backup,
}

impl Role {
    /// `"primary"` or `"backup"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Role::Primary),
            "backup" => Ok(Role::Backup),
            _ => Err(ParseNameError {
                what: "role",
                input: s.to_owned(),
                expected: "primary, backup",
            }),
        }
    }
}
