//! A bounded, lock-free, multi-producer single-consumer ring: the submission queue through
//! which application threads hand write requests to libmirror's polling thread.
//!
//! ```text
//!  app thread ──Producer::try_push(req)──► ┌──────────────────────┐
//!  app thread ──Producer::try_push(req)──► │ SubmitRing<T>        │ ──Consumer::try_pop()──► poller
//!  app thread ──Producer::try_push(req)──► │ 2^k slots, allocated │      (one thread, &mut)
//!        ▲                                 │ once, never resized  │
//!        └── Ok(position) = ticket         └──────────────────────┘
//! ```
//!
//! [`SubmitRing::with_capacity`] returns one cloneable, `Sync` [`Producer`] and the one
//! [`Consumer`] (not `Clone`, pops through `&mut self`): the single-consumer rule is enforced by
//! the types, so misuse is impossible in safe code. Every successful push returns its
//! **position**: a `u64` counting pushes from 0. The consumer pops values strictly in position
//! order, 0, 1, 2, ... with no gaps, so the engine uses the position as the caller's ticket.
//! Positions are not reused and cannot wrap in practice (2^63 pushes at one per nanosecond take
//! 292 years).
//!
//! # Algorithm
//!
//! Dmitry Vyukov's bounded MPMC queue, simplified to a single consumer:
//! D. Vyukov, "Bounded MPMC queue", 1024cores.net,
//! <https://www.1024cores.net/home/lock-free-algorithms/queues/bounded-mpmc-queue>.
//! The same algorithm underlies crossbeam's `ArrayQueue` (`crossbeam-queue/src/array_queue.rs`).
//!
//! Position `p` lives in slot `p mod capacity`. Each slot carries a *stamp* (Vyukov's
//! "sequence"), an `AtomicU64` saying which position the slot currently serves and whether it
//! is empty or full. A producer claims a position by CAS on `tail` after checking that the
//! slot's stamp says "empty, waiting for this position"; then it writes the value and stores the
//! "full" stamp. The consumer owns `head`: it pops position `head` once the slot's stamp says
//! "full, holding `head`", moves the value out, and stores the stamp that hands the slot to the
//! next lap, `head + capacity`. Because the consumer is alone, it needs no CAS on `head`.
//!
//! ## Stamp values
//!
//! One change from Vyukov's encoding: the position is shifted left by one and the low bit says
//! full (the original uses `p` and `p + 1`, which collide with the next lap's `p + capacity`
//! when the capacity is 1). For the slot of position `p`:
//!
//! | stamp    | meaning                                                | stored by                     |
//! |----------|--------------------------------------------------------|-------------------------------|
//! | `2p`     | empty, waiting for the producer of `p` (if `tail > p`, | construction (`p < capacity`) |
//! |          | that producer has claimed `p` and is still writing)    | or the consumer, after popping `p - capacity` |
//! | `2p + 1` | full, holds the value pushed at `p`                    | the producer of `p`, after writing it |
//!
//! A producer with guess `t` of `tail` reads the stamp of `t`'s slot: `2t` → try to claim `t`;
//! below `2t` → the slot still serves `t - capacity`, which is not popped: the ring is full;
//! above `2t` → `t` was claimed already, reread `tail`. The consumer reads the stamp of `head`'s
//! slot: `2·head + 1` → pop; otherwise it is `2·head` (nothing there yet, or a producer is
//! mid-write), which is asserted.
//!
//! A claimed but unwritten position blocks the consumer at that position even if later ones
//! are written (`try_pop` returns `None`): that is what keeps positions in order. The window is
//! the few instructions between a producer's CAS and its stamp store, but a producer preempted
//! inside it stalls the consumer until it runs again (and, once the ring wraps, the other
//! producers, which then see it full). That is inherent to Vyukov's algorithm.
//!
//! ## Memory ordering
//!
//! The cell of a slot is accessed by one thread at a time, in the order: producer of `p`
//! writes, consumer reads (moves out), producer of `p + capacity` writes, ... Each hand-over is
//! a Release store of the stamp paired with an Acquire load of it:
//!
//! * producer → consumer: `store(2p + 1, Release)` after the write; the consumer's
//!   `load(Acquire)` that sees `2p + 1` makes the write happen-before its read.
//! * consumer → next producer: `store(2(p + capacity), Release)` after the read; the producer's
//!   `load(Acquire)` that sees it makes the read happen-before its overwrite.
//!
//! `tail` carries no data: its CAS only decides which producer owns a position (read-modify-
//! writes on one atomic are totally ordered, so exactly one wins), hence `Relaxed`. A producer
//! whose guess of `tail` is stale finds a stamp above `2·tail`; that stamp was stored with
//! Release after (a chain of acquires from) the CAS that moved `tail` on, so acquiring it makes
//! that CAS visible and the reread of `tail` makes progress.
//!
//! A producer that finds a stamp below `2·tail` reports full, as Vyukov's queue does: the pop
//! that would free the slot has not happened, or does not happen-before this push. So "full"
//! accounts for every pop that happens-before the push. Unlike crossbeam's `ArrayQueue`, which
//! rereads `head` after a `SeqCst` fence, we do not pay to also order it against pops that
//! merely race with it (the engine treats full as back-pressure and retries).
//!
//! `head` is the consumer's counter, published (Release) only for `len()` and read back when the
//! ring is dropped. Each ordering in the code carries a comment naming what it publishes and
//! what it pairs with.
//!
//! `len()` and `is_empty()` read `head` and `tail` separately, so they are snapshots that may be
//! stale as soon as they return; they are meant for metrics and heuristics, and nothing in the
//! ring relies on them. The only authoritative answers are `try_push` and `try_pop`. One use
//! is exact: the consumer's `is_empty()` after a `SeqCst` fence sees every push whose
//! producer's fence came before it (the claim of `tail` precedes that fence), which is what
//! the doorbell's park relies on (below).
//!
//! # The doorbell
//!
//! [`Doorbell`] is how producers, and callers that run the consumer's loop themselves, know
//! whether the consumer sleeps (parked, or standing by while callers drive) and must be woken:
//! Dekker pairings of flags and `SeqCst` fences, documented in `src/doorbell.rs`. The wake-up
//! itself (an eventfd in libmirror) is the user's.
//!
//! ## Values left behind
//!
//! The ring is freed when the last handle (producer or consumer) is dropped, and drops every
//! value that was pushed but not popped. A push cannot be left half-done: the producer holds its
//! handle for the whole of `try_push`, and nothing between its CAS and its stamp store can panic.
//!
//! # Testing
//!
//! * unit tests and a property test against a `VecDeque` model (`tests/model.rs`), and a
//!   multi-threaded stress test (`tests/stress.rs`): `cargo test -p mirror-ring`;
//! * loom model checking of the same code, the doorbell's pairings included (`tests/loom.rs`).
//!   The module `primitive` swaps std's atomics, `Arc` and `UnsafeCell` for loom's under `--cfg loom` (crossbeam-epoch's pattern), so
//!   the algorithm is written once. Run in release mode, in a separate target directory so the
//!   normal build cache survives:
//!
//!   ```text
//!   RUSTFLAGS="--cfg loom" cargo test -p mirror-ring --release --target-dir target/loom
//!   ```
//!
//!   The other test targets compile to nothing under `cfg(loom)` and the doc examples return
//!   early (rustdoc does not see `--cfg loom`, so they check the hidden `__LOOM_BUILD`); add
//!   `--test loom` to skip them, `-- --nocapture` to see how many executions each model
//!   explored.
//!
//!   Two things to know about loom here. First, loom 0.7's partial-order reduction skips the
//!   interleavings in which a thread's load-then-store of an atomic (every push does that to a
//!   stamp) overtakes another thread's earlier load (tokio-rs/loom#166, #392): unaided, loom
//!   never even lets the consumer see a concurrent push. Under `cfg(loom)` the shim's
//!   `AtomicU64` therefore carries per-thread "reader witness" counters that make every such
//!   load/store race visible to loom without changing what the loads may return (see
//!   `primitive.rs`). Second, with those races visible the unbounded models take minutes, so
//!   the tests bound preemptions at 3 unless `LOOM_MAX_PREEMPTIONS` is set; the file then runs
//!   in about 15 seconds. Deliberately broken variants (each stamp ordering weakened to
//!   `Relaxed`, a wrong lap in the freeing stamp, a claim without CAS, a `Drop` that leaks) all
//!   fail these tests; so does the doorbell with any one of its four fences left out, a
//!   submission that does not ring a long standby, a standby that ignores the submissions
//!   counted, or a give-up that does not ring a standby. One such variant stays in the file as
//!   a control that must fail (`control_a_park_without_its_fence_loses_a_push`).
//!
//! # Example
//!
//! ```
//! use mirror_ring::SubmitRing;
//! # if mirror_ring::__LOOM_BUILD { return Ok(()); }
//!
//! let (producer, mut consumer) = SubmitRing::<String>::with_capacity(1024)?;
//! let app = std::thread::spawn({
//!     let producer = producer.clone();
//!     move || producer.try_push("write 4 KiB at 0x1000".to_owned()).expect("ring full")
//! });
//! let ticket = app.join().unwrap();
//! assert_eq!(consumer.try_pop(), Some((ticket, "write 4 KiB at 0x1000".to_owned())));
//! # Ok::<(), mirror_ring::RingError>(())
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod doorbell;
mod primitive;
mod ring;

pub use doorbell::{Doorbell, Driving, Standby};
pub use ring::{Consumer, Producer, SubmitRing, MAX_CAPACITY};

/// `true` when built with `--cfg loom`. Not API: the doc examples check it and return early,
/// because under loom every ring must live inside a `loom::model` and rustdoc does not pass
/// `--cfg loom` to the examples themselves, so they cannot use `#[cfg(loom)]`.
#[doc(hidden)]
pub const __LOOM_BUILD: bool = cfg!(loom);

use core::fmt;

/// Why a ring could not be created. Both variants are the caller's mistake, usually a
/// configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// A capacity of 0 was requested; a ring needs at least one slot.
    ZeroCapacity,
    /// The requested capacity is above [`MAX_CAPACITY`].
    CapacityTooLarge {
        /// The capacity that was asked for.
        requested: usize,
        /// The largest capacity accepted ([`MAX_CAPACITY`]).
        max: usize,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroCapacity => f.write_str("submit ring capacity must be at least 1"),
            Self::CapacityTooLarge { requested, max } => write!(
                f,
                "submit ring capacity {requested} is above the maximum of {max} slots"
            ),
        }
    }
}

impl std::error::Error for RingError {}
