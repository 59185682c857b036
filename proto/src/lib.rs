//! libmirror's protocol: the sans-IO primary/backup state machine ([`core`]) and the wire codec
//! ([`wire`]).
//!
//! Nothing in this crate performs I/O or reads a clock. The real node (TCP or RDMA) and the
//! deterministic simulator drive the same [`core::Replica`]: they feed it inputs (client writes,
//! messages from the peer, connection events, the time) and execute the [`core::Action`]s it emits,
//! in order. See `docs/PROTOCOL.md` for the protocol and the argument for why it never loses an
//! acknowledged write.
// No unsafe code but `crc::small_append`'s call of the `crc32` instruction (checked for at run
// time): `deny`, with that one `allow`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod chunks;
pub mod crc;
pub use crate::chunks::{
    chunk_digest, zero_runs, BadChunkSize, ChunkGeometry, ChunkSet, DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub mod core;
pub mod handshake;
pub mod payload;
pub use crate::handshake::{SplitBrain, SplitBrainPolicy, Suffix, Verdict};
pub use crate::payload::{rep_movsb_is_slow, Payload, REP_MOVSB_MIN};
pub mod term;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;

pub use crate::core::{
    check_write, policy_name, Action, CoreConfig, CoreStats, DemoteError, FatalError, Fence,
    FencedPolicy, PeerFault, PeerId, PeerLossPolicy, Phase, PromoteError, Record, Recovered,
    Replica, SubmitError, WritesRefused,
};
pub use crate::term::{
    common_point, next_term, term_tag, TermEntry, TermHistory, TermHistoryError, MAX_TERM_ENTRIES,
    TERM_TAG_BITS,
};
pub use crate::wire::{
    chunk_data_header, encode_chunk_data, encode_write, write_header, Hello, Message, RegionRange,
    RejectCode, WireError, WireRole, CHUNK_DATA_HEADER_LEN, MAX_REPAIR_RANGES, PROTOCOL_VERSION,
    WRITE_HEADER_LEN,
};

#[cfg(test)]
mod tests;
