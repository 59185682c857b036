//! A deterministic simulator of a libmirror pair.
//!
//! It drives the real protocol core (`mirror_proto::Replica`) and the real persistent queue
//! (`mirror_storage::PersistentQueue`, on files) of two nodes, A and B, on one thread, under
//! faults drawn from a seed, and checks the outcome from outside. A node is named by its
//! identity ([`NodeName`], queue files `a.queue` and `b.queue`); its role is its core's
//! (`Replica::role`), A's primary and B's backup at first, then whatever promotions,
//! demotions, fences and split-brain verdicts make of them:
//!
//! - **Network** ([`net`]): connections made as the real node makes them
//!   (`src/node/poller/connection.rs`): a primary whose core is disconnected dials its peer
//!   every reconnect interval; every node accepts; the first message of an accepted connection
//!   must be a Hello, which goes to `Replica::admit` (a primary hearing a newer primary is
//!   fenced there and judges the Hello as a backup); an admitted connection replaces the one
//!   the node talked to. Two primaries may dial each other at once. Frames are encoded with the
//!   real wire codec and delivered after a per-frame delay but in order within a connection;
//!   connections are cut (both sides told, at different moments), half-open (one direction
//!   silently blackholed until a timeout fires), partitioned (no connection succeeds), and, for
//!   some seeds, a broken transport duplicates or swaps frames within a connection.
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
//!   some steps later, in the role its queue persisted or, for some seeds, in the other one (as
//!   `src/node/open.rs` does, a queue superseded as a primary is not started as one: the node
//!   starts as a backup).
//! - **Role events** (some seeds have none, which keeps the fixed-role campaign's coverage):
//!   failovers (the primary crashes or is cut off, and its backup is promoted with
//!   `promote(false)` once it notices it is disconnected), forced promotions of a connected
//!   backup (`promote(true)`), live demotions of the primary (then a backup is promoted once it
//!   notices), and long partitions during which the backup is promoted (two primaries; under
//!   `continue` both write, and they meet in a split brain). `on_fenced` and `after_split_brain`
//!   (all four policies) are drawn per seed.
//! - **The operator**, in both phases: after a delay drawn per seed, it resolves a split brain
//!   that keeps the nodes apart (`resolve_split_brain`, naming one node, again while it lasts),
//!   promotes a backup when both nodes are up and neither is a primary, and starts a node that
//!   a fence stopped (`on_fenced = stop`) again as a backup.
//! - **The client** submits to every node whose core takes writes (two in a split brain); a
//!   ticket refused by `RefuseWrites` fails, it is not lost.
//! - **Swarm testing**: the fault and failover rates themselves are drawn from the seed
//!   ([`Swarm`]; the failover ones from a random stream of their own, so that a seed without
//!   failover draws its faults exactly as before failover existed).
//!
//! After the fault phase comes a **liveness phase**: no new faults or role events, both nodes
//! up; the pair must converge within [`SimOptions::liveness_steps`].
//!
//! Each checker judges a node in the role it acted in when it did what is judged (the executor
//! reports role changes in the order of the actions), so they hold whichever node is the
//! primary at that moment. The checkers ([`Checker`]):
//! 1. every write whose completion the client saw survives, unless a split-brain verdict (the
//!    policy's or the operator's) discarded it, and then it is in the loser's `Io::Discard`
//!    records: a node never gives a seq it completed to another write (under `block`, no node
//!    does), a crash never drops a completed write that the peer does not hold, and at the end
//!    both nodes hold the same history, in which every other completed write is; under `block`
//!    no node writes alone, so no verdict can discard anything and every completed write
//!    survives every failover;
//! 2. a primary never applies a write its backup does not durably hold (with the same term),
//!    except degraded writes under `continue`;
//! 3. after the faults stop the pair converges (one primary synchronous with its backup,
//!    whichever nodes those are, everything completed, applied and trimmed, byte-identical
//!    regions equal to the replay of the final history) within a bounded number of steps;
//! 4. a catch-up moves only what the peer lacks: every record sent by `SendQueued` is beyond
//!    the peer's queue at that moment (never the region);
//! 5. the queue keeps what it made durable: after a power loss, recovery holds at least every
//!    record synced and the last `applied_through` checkpointed;
//! 6. a backup acknowledges only what its queue made durable (judged when the ack's action
//!    runs, not after the rest of its batch);
//! 7. right after a restart, the node's region with its queue's unapplied records replayed
//!    holds the writes of its log through its queue's `last_seq`;
//! 8. whenever the pair is converged, the two regions are identical;
//! 9. a node discards (as a divergent suffix) a record whose write a caller saw complete only
//!    by a split-brain verdict against it;
//! 10. **fencing**: once a node has seen a term above the one it writes in as a primary (it
//!     persisted it, its core's `current_term` holds it, or a fence said a newer one exists),
//!     it applies nothing more as a primary and completes no ticket of a lower term; and no two
//!     nodes ever start the same term;
//! 11. **split-brain outcomes**: each handshake is read from its two Hellos with the protocol's
//!     own rule (`reconcile_resolving`, `decide_split_brain`); where they make a split brain,
//!     both nodes do what the verdict for those two suffixes says (the backup discards, both
//!     stay apart, or they swap roles), a discard drops exactly the backup's records after the
//!     common point, both nodes hold the winner's records at the next convergence, and no
//!     discarded record ever comes back; under `disconnect` with no operator's choice the
//!     verdict is to stay apart, so nothing is discarded until the operator's step; under
//!     `block` no split brain arises at all.
//!
//! Canaries, deliberately broken nodes, show that the checkers can fail:
//! [`SimOptions::canary_apply_before_ack`] (a primary writes its region before the backup's
//! ack; checker 2 catches it in nearly every seed), [`SimOptions::canary_seq_only_matching`]
//! (nodes match logs by seq alone; see the tests) and [`SimOptions::canary_fencing`] (the
//! driver ignores a fence and reports the fenced primary's writes complete; checker 10 catches
//! it in most seeds that fence).
//!
//! The core bugs this simulator found when failover came (a stopped primary's refusal stopped
//! the new primary; an operator's resolution told to the node it names went unannounced; logs
//! that differ from seq 1 were unrecoverable; a split-brain winner could start a term below
//! the loser's; a loser's suffix with nothing completed was refused after the role swap; a
//! backup whose repair was interrupted could be promoted) are fixed in the core and the node;
//! the simulated operator follows the node's rule for the last (a node whose repair is
//! unfinished is neither promoted nor started as a primary).
//!
//! What it does not model: the real node's threads, sockets and timers (`src/node/` executes
//! the same actions with the same rules through the shared executor); bytes corrupted on the
//! wire (the frame crc is tested by the fuzzers); two nodes whose ids share a term tag (the
//! core does not refuse them yet; the simulator draws distinct tags).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod media;
pub mod net;
mod node;
mod report;
mod run;

pub use net::NodeName;
pub use report::{
    Checker, Failover, SimFailure, SimOptions, SimReport, SplitBrainChoice, SplitBrains, Swarm,
};
pub use run::run_seed;

/// Virtual time per simulation step, in microseconds.
pub const STEP_US: u64 = 20;
/// Size of the simulated region.
pub const REGION_BYTES: u64 = 64 << 10;
/// Capacity of each node's queue ring (small, so that it wraps and fills).
pub const QUEUE_BYTES: u64 = 128 << 10;
/// Largest write the client submits.
pub const MAX_WRITE: usize = 2048;
