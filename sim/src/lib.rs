//! A deterministic simulator of a libmirror pair.
//!
//! It drives the real protocol core (`mirror_proto::Replica`) and the real persistent queue
//! (`mirror_storage::PersistentQueue`, on files) of a primary and a backup on one thread, under
//! faults drawn from a seed, and checks the outcome from outside:
//!
//! - **Network** ([`net`]): frames encoded with the real wire codec, delivered after a per-frame
//!   delay but in order within a connection (as TCP or an RC queue pair would); connections that
//!   are cut (both sides told, at different moments), half-open (one direction silently
//!   blackholed until a timeout fires), partitioned (no connection succeeds), and, for some
//!   seeds, a broken transport that duplicates or swaps frames within a connection.
//! - **Persistent memory** ([`media`]): the queue file's *durable* image is kept apart from
//!   what was *written*: only the byte ranges of a queue barrier (reported by the queue's crash
//!   hook) become durable, and the region becomes durable at a checkpoint. A power loss rebuilds
//!   each file word by word (8 bytes): the durable value, or any later written one where they
//!   differ. A process crash keeps everything written (the page cache survives) but makes
//!   nothing durable: only the barrier of the queue's recovery at restart does, for what it
//!   covers (the hook is installed before it), so a later power loss may still tear the rest.
//! - **Clock**: virtual microseconds, [`STEP_US`] per step, fed to the core with `set_now`.
//! - **Crashes** of either node at any step; half of them in the middle of the node's next
//!   non-empty batch of actions (a random strict prefix runs: after the append and before its
//!   sync, after the ack arrived and before the apply...) or of its next checkpoint (after the
//!   region sync, or after the queue's barrier before the core hears of it). The node restarts
//!   some steps later.
//! - **Swarm testing**: the fault rates themselves are drawn from the seed ([`Swarm`]).
//!
//! After the fault phase comes a **liveness phase**: no new faults, both nodes up; the pair must
//! converge within [`SimOptions::liveness_steps`].
//!
//! Checkers ([`Checker`]):
//! 1. every write whose completion the client saw survives: no completed seq is ever given to
//!    another write, and at the end both regions equal the replay, in seq order, of the writes
//!    of the final history;
//! 2. the primary never applies a write the backup does not durably hold, except degraded
//!    writes under `continue`;
//! 3. after the faults stop the pair converges (synchronous, everything completed, applied and
//!    trimmed, byte-identical regions) within a bounded number of steps;
//! 4. a catch-up moves only what the peer lacks: every record sent by `SendQueued` is beyond
//!    the peer's queue at that moment (never the region);
//! 5. the queue keeps what it made durable: after a power loss, recovery holds at least every
//!    record synced and the last `applied_through` checkpointed.
//! 6. the backup acknowledges only what its queue made durable (judged when the ack's action
//!    runs, not after the rest of its batch);
//! 7. right after a restart, the node's region with its queue's unapplied records replayed
//!    holds the history's writes through its queue's `last_seq`.
//!
//! A canary ([`SimOptions::canary_apply_before_ack`]) makes the simulated primary write to its
//! region before the backup's ack; checker 2 catches it in every seed (see the tests), which
//! shows the checkers can fail.
//!
//! What it does not model: the real node's threads, sockets and timers (`src/node.rs` executes
//! the same actions with the same rules: queue headroom before submitting, deferred commits
//! checkpointed in `power`/`pmem`); bytes corrupted on the wire (the frame crc is tested by the
//! fuzzers); a power loss of a `continue` primary (a known limitation, see `docs/PROTOCOL.md`:
//! the sim crashes such a primary as a process only).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod media;
pub mod net;
mod node;
mod run;

pub use run::{run_seed, Checker, SimFailure, SimOptions, SimReport, Swarm};

/// Virtual time per simulation step, in microseconds.
pub const STEP_US: u64 = 20;
/// Size of the simulated region.
pub const REGION_BYTES: u64 = 64 << 10;
/// Capacity of each node's queue ring (small, so that it wraps and fills).
pub const QUEUE_BYTES: u64 = 128 << 10;
/// Largest write the client submits.
pub const MAX_WRITE: usize = 2048;
