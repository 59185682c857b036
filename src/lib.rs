//! libmirror: synchronous primary/backup replication of a memory region, with crash recovery of
//! either node without a complete remirror (the mechanism of US patent 6,338,126).
//!
//! ```text
//!  application threads          primary node                          backup node
//!  ───────────────────          ────────────                          ───────────
//!  submit(offset, bytes) ──► submit ring ──► poller ── Write(seq) ──► poller ─► queue (append[, sync])
//!                                            │  queue (append)                 │
//!                                            │  delay buffer      ◄── Ack ─────┤
//!  wait(ticket) ◄── completion ◄── apply ◄───┘  (only on the ack)              └─► apply to region
//! ```
//!
//! - [`Mirror`] is the handle: [`Mirror::open`] a node from a [`Config`], then `write`, or
//!   `submit` + `wait`, `read`/`region_ptr`, `stats`, `close`.
//! - The protocol itself is the sans-IO state machine of [`mirror_proto`]; the persistent queue and
//!   the region file are [`mirror_storage`]; the submission ring is [`mirror_ring`].
//! - See `docs/ARCHITECTURE.md`, `docs/PROTOCOL.md` and `docs/FORMAT.md`.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod config;
pub mod control;
pub mod error;
pub mod ffi;
pub mod logging;
pub mod node;
pub(crate) mod stamps;
pub mod transport;
pub mod workload;

pub use config::{Auth, Config, ConfigBuilder, Role, TransportKind};
pub use error::{ConfigError, MirrorError, Result};
pub use mirror_proto::{PeerLossPolicy, Phase};
pub use mirror_storage::Durability;
pub use node::events::{Event, EventRecord, Events};
pub use node::{Mirror, Stats, Ticket, TransferStats, VerifyReport};
