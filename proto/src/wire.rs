//! The wire format: framed, versioned, crc32c-checksummed messages.
//!
//! Every message travels as one frame (all integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 magic        0x52494D4C ("LMIR" as bytes on the wire)
//!      4    1 version      PROTOCOL_VERSION (4)
//!      5    1 kind         MessageKind
//!      6    2 reserved     must be 0
//!      8    4 body_len     bytes of body that follow the header (<= MAX_BODY_LEN)
//!     12    4 crc32c       over header bytes 0..12 followed by the body
//!     16    .. body        per kind, see below and docs/FORMAT.md
//! ```
//!
//! A decoder never trusts a length before checking it against [`MAX_BODY_LEN`] and the body size the
//! kind requires, and never panics on any input: every problem is a [`WireError`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::crc::crc32c_append_known;
use crate::payload::Payload;
use crate::term::{TermEntry, TermHistory, TermHistoryError, MAX_TERM_ENTRIES};

/// Frame magic ("LMIR" read as little-endian u32).
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"LMIR");
/// The protocol version this build speaks. A peer with another version is refused at the frame
/// level, before any message of it is interpreted.
///
/// Version 2 added terms: `Write` carries the term of the seq, `Hello` the speaker's current term
/// and term history, and the repair messages (`RepairRequest`, `RepairData`, `RepairDone`).
/// Version 3 added failover: `Hello` carries where the speaker began writing without its
/// peer (`alone_from`, for split-brain detection) and an operator's split-brain resolution
/// (`discard_node`); `Reject` has the code `SplitBrain`.
/// Version 4 added the dirty-chunk bitmap: `Hello` carries `resync_from` and a flags word
/// (`initial_sync`), the chunk messages (`ChunkDigest`, `ChunkVerdict`, `ChunkData`,
/// `ChunkHeld`) and `ResyncBegin`/`ResyncDone` exist, and `Reject` has `NeedsInitialSync`.
pub const PROTOCOL_VERSION: u8 = 4;
/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest body accepted: the largest write payload plus the write message's own fields.
pub const MAX_BODY_LEN: usize = MAX_WRITE_LEN + WRITE_FIXED_LEN;
/// Largest payload of one write request (16 MiB).
pub const MAX_WRITE_LEN: usize = 16 << 20;
/// Longest reason text a `Reject` carries.
pub const MAX_REASON_LEN: usize = 1024;
/// Most byte ranges one `RepairRequest` carries (a longer list is sent as several messages).
pub const MAX_REPAIR_RANGES: usize = 65_536;

/// Which node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireRole {
    /// The node that takes application writes.
    Primary,
    /// The node that keeps the second copy.
    Backup,
}

impl WireRole {
    fn to_byte(self) -> u8 {
        match self {
            WireRole::Primary => 1,
            WireRole::Backup => 2,
        }
    }
    fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            1 => Ok(WireRole::Primary),
            2 => Ok(WireRole::Backup),
            other => Err(WireError::BadField {
                field: "hello.role",
                value: u64::from(other),
            }),
        }
    }
}

/// What a node says about itself when a connection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The speaker's role.
    pub role: WireRole,
    /// The speaker's node id (random, chosen when its queue was created; never 0).
    pub node_id: u64,
    /// The node id the speaker is bound to (0: not bound yet).
    pub peer_node_id: u64,
    /// Region size in bytes; both nodes must agree.
    pub region_size: u64,
    /// Queue file format version of the speaker.
    pub queue_format_version: u32,
    /// Highest sequence number durably applied to the speaker's region.
    pub applied_through: u64,
    /// Highest sequence number held in (or trimmed from) the speaker's queue.
    pub last_seq: u64,
    /// Oldest sequence number still held in the speaker's queue (0: queue empty).
    pub first_seq: u64,
    /// Capacity of the speaker's queue in bytes (the backup's must be at least the primary's).
    pub queue_capacity: u64,
    /// The speaker drops the connection after this long without a frame from the peer, so the
    /// peer sends something at least every quarter of it (its heartbeat). Announcing it lets
    /// the two nodes run different `ack_timeout_ms` without one of them taking the other's idle
    /// silence for a death. 0: not announced, as by a node from before the primary's heartbeat
    /// (these bytes were reserved): the peer paces its heartbeat by its own ack timeout, and a
    /// backup expects no heartbeat from such a primary.
    pub silence_timeout_us: u32,
    /// The highest term the speaker has persisted (a primary's is the term of its new writes).
    pub current_term: u64,
    /// The terms along the speaker's log (see [`crate::term`]); validated on decode against
    /// `last_seq`.
    pub term_history: TermHistory,
    /// The first seq the speaker applied (and completed) as a primary without its peer's
    /// acknowledgement that the peer has not confirmed holding since (0: none). Writes from
    /// here on were completed to callers and may exist on this node only: a handshake that
    /// would discard them is a split brain.
    pub alone_from: u64,
    /// An operator's split-brain resolution: the node id whose divergent writes are to be
    /// discarded (0: none).
    pub discard_node: u64,
    /// A primary's: its dirty-chunk bitmap covers every record it folded out of its queue from
    /// this seq on (0: it folded none since its last completed resync). A backup that holds
    /// the log through `resync_from - 1` or further can be resynced from the bitmap.
    pub resync_from: u64,
    /// A backup's consent to an initial sync: the primary may rebind to it (when it is bound
    /// to no primary) and bring its whole region over, chunk by chunk (only differing chunks
    /// move), when its queue cannot catch it up.
    pub initial_sync: bool,
    /// A backup's: its region is all zeros (its file was created at this start and nothing
    /// was written to it since). A resync into it (an initial sync, say) sends each chunk's
    /// bytes without comparing digests first, and no chunk that is all zeros on the primary.
    pub region_blank: bool,
}

/// The bit of a Hello's flags word that carries [`Hello::initial_sync`].
const HELLO_FLAG_INITIAL_SYNC: u32 = 1;
/// The bit of a Hello's flags word that carries [`Hello::region_blank`].
const HELLO_FLAG_REGION_BLANK: u32 = 2;

/// A byte range of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
}

/// Why a node refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectCode {
    /// The peer runs another protocol version.
    ProtocolVersion = 1,
    /// The two nodes were configured with different region sizes.
    RegionSize = 2,
    /// Two primaries, two backups, or an unexpected role.
    Role = 3,
    /// This backup is bound to another primary (a second primary tried to connect).
    WrongPeer = 4,
    /// The peer's queue cannot serve what this node is missing (a full resync would be needed).
    Unrecoverable = 5,
    /// The peer sent something that breaks the protocol.
    ProtocolViolation = 6,
    /// Queue format versions differ.
    QueueFormat = 7,
    /// The backup's queue is smaller than the primary's.
    QueueCapacity = 8,
    /// The speaker has seen a higher term than the peer's: the peer is a stale primary.
    StaleTerm = 9,
    /// Both nodes completed writes the other lacks (a split brain) and the policy keeps them
    /// apart, or resolves it by changing roles (the reason says which).
    SplitBrain = 10,
    /// The speaker cannot take a connection now (a primary that stopped, fenced): the peer
    /// retries later, and an operator restarts the speaker (as a backup).
    Unavailable = 11,
    /// The backup lacks records the primary no longer holds and did not consent to an
    /// initial sync: the primary keeps serving and retries; an operator restarts the backup
    /// with `initial_sync`.
    NeedsInitialSync = 12,
}

impl RejectCode {
    fn from_u16(v: u16) -> Result<Self, WireError> {
        Ok(match v {
            1 => RejectCode::ProtocolVersion,
            2 => RejectCode::RegionSize,
            3 => RejectCode::Role,
            4 => RejectCode::WrongPeer,
            5 => RejectCode::Unrecoverable,
            6 => RejectCode::ProtocolViolation,
            7 => RejectCode::QueueFormat,
            8 => RejectCode::QueueCapacity,
            9 => RejectCode::StaleTerm,
            10 => RejectCode::SplitBrain,
            11 => RejectCode::Unavailable,
            12 => RejectCode::NeedsInitialSync,
            other => {
                return Err(WireError::BadField {
                    field: "reject.code",
                    value: u64::from(other),
                })
            }
        })
    }
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message on a connection, in both directions. Boxed: the largest message by far and
    /// one per connection, it would otherwise size every message and every core action (each
    /// one moved on every write's path) to its 128 bytes.
    Hello(Box<Hello>),
    /// The connection is refused; the sender closes it after this.
    Reject {
        /// Machine-readable reason.
        code: RejectCode,
        /// Human-readable detail (UTF-8, at most [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
    /// One write request. Primary to backup normally; backup to primary while it replays what a
    /// restarted primary is missing.
    Write {
        /// Sequence number (consecutive, from 1).
        seq: u64,
        /// Term of the primary incarnation that assigned `seq` (never 0).
        term: u64,
        /// Byte offset in the region.
        offset: u64,
        /// The bytes to write (1..=MAX_WRITE_LEN), with their crc.
        data: Payload,
    },
    /// Backup to primary: cumulative acknowledgement and apply progress.
    Ack {
        /// Every request up to this sequence number is in the backup's queue (durably, per mode).
        received_through: u64,
        /// Every request up to this sequence number is durably applied to the backup's region.
        applied_through: u64,
    },
    /// Primary to backup: the primary durably applied everything up to `through`, so the backup may
    /// trim those records from its queue.
    Applied {
        /// Sequence number applied through.
        through: u64,
    },
    /// Backup to primary: the replay of records the primary was missing is complete.
    ReplayDone {
        /// The seq the primary's log ends at once the replay is applied: the backup's last seq
        /// when it replayed, the common point when it replayed nothing.
        through: u64,
    },
    /// Backup to primary, during the handshake: the byte ranges the backup's divergent suffix
    /// wrote (merged). The primary answers with their current bytes (`RepairData`).
    RepairRequest {
        /// The ranges (1..=[`MAX_REPAIR_RANGES`]).
        ranges: Vec<RegionRange>,
    },
    /// Primary to backup: the current bytes of a region range the backup asked to repair.
    RepairData {
        /// Byte offset in the region.
        offset: u64,
        /// The bytes (1..=MAX_WRITE_LEN).
        data: Bytes,
    },
    /// Primary to backup: every requested range was sent; the backup may now drop its divergent
    /// suffix (every record after `through`) and take the primary's records after it.
    RepairDone {
        /// The common point of the two histories.
        through: u64,
        /// Bytes of `RepairData` sent for this repair: the backup drops its suffix only if it
        /// received exactly these (a broken transport that lost or reordered one must not
        /// leave a range unrepaired).
        bytes: u64,
    },
    /// Primary to backup (a resync or a verify): the digest of the primary's bytes of this
    /// range as of this point of the stream (every write sent before it included). The backup
    /// compares with its own bytes, having applied every write received before it, and
    /// answers `ChunkVerdict`.
    ChunkDigest {
        /// The range (one chunk).
        range: ChunkRange,
        /// 128-bit digest (XXH3-128, little-endian).
        digest: [u8; 16],
    },
    /// Backup to primary: whether its bytes of the range match the digest. A match during a
    /// resync also says the backup holds those bytes durably.
    ChunkVerdict {
        /// The range of the digest.
        range: ChunkRange,
        /// Whether the bytes match.
        same: bool,
    },
    /// Primary to backup: the primary's bytes of a chunk as of this point of the stream (a
    /// resync, a verify's repair). The backup writes them after every write received before.
    ChunkData {
        /// Byte offset in the region.
        offset: u64,
        /// The bytes (1..=MAX_WRITE_LEN).
        data: Bytes,
    },
    /// Backup to primary: the backup's region holds the chunk data of this range durably.
    ChunkHeld {
        /// The range.
        range: ChunkRange,
    },
    /// Primary to backup: a resync begins (after the handshake, before any chunk): the
    /// backup's region is inconsistent until `ResyncDone`.
    ResyncBegin {
        /// Chunks the primary will compare (more may follow if writes fold meanwhile).
        chunks: u64,
    },
    /// Primary to backup: the resync is complete; the backup's region holds the primary's
    /// history through `through`, and its log continues after it (the primary's records
    /// after it follow).
    ResyncDone {
        /// The last seq the resync covered.
        through: u64,
    },
}

// Every write moves messages by value several times (encoded, decoded, inside actions): a
// variant that outgrows a `Write` makes all of them pay (see `Message::Hello`).
const _: () = assert!(std::mem::size_of::<Message>() <= 72);

impl Message {
    /// A `Hello` (boxed, see [`Message::Hello`]).
    pub fn hello(hello: Hello) -> Message {
        Message::Hello(Box::new(hello))
    }
}

/// A chunk of the region, as the resync and verify messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (1..=[`crate::MAX_CHUNK_SIZE`]).
    pub len: u32,
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// [`Message::Hello`]
    Hello = 1,
    /// [`Message::Reject`]
    Reject = 2,
    /// [`Message::Write`]
    Write = 3,
    /// [`Message::Ack`]
    Ack = 4,
    /// [`Message::Applied`]
    Applied = 5,
    /// [`Message::ReplayDone`]
    ReplayDone = 6,
    /// [`Message::RepairRequest`]
    RepairRequest = 7,
    /// [`Message::RepairData`]
    RepairData = 8,
    /// [`Message::RepairDone`]
    RepairDone = 9,
    /// [`Message::ChunkDigest`]
    ChunkDigest = 10,
    /// [`Message::ChunkVerdict`]
    ChunkVerdict = 11,
    /// [`Message::ChunkData`]
    ChunkData = 12,
    /// [`Message::ChunkHeld`]
    ChunkHeld = 13,
    /// [`Message::ResyncDone`]
    ResyncDone = 14,
    /// [`Message::ResyncBegin`]
    ResyncBegin = 15,
}

/// Hello without its term entries.
const HELLO_FIXED_LEN: usize = 1 + 3 + 8 * 7 + 4 + 4 + 8 + 4 + 4 + 8 + 8 + 8;
const CHUNK_RANGE_LEN: usize = 8 + 4;
const TERM_ENTRY_LEN: usize = 16;
const WRITE_FIXED_LEN: usize = 8 + 8 + 8 + 4;
const REPAIR_DATA_FIXED_LEN: usize = 8 + 4;
const REPAIR_RANGE_LEN: usize = 16;

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The frame does not start with the magic: the peer is not a libmirror node, or the stream
    /// lost framing.
    #[error("peer sent a frame with bad magic {found:#010x} (not a libmirror peer, or a corrupted stream)")]
    BadMagic {
        /// What was found.
        found: u32,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {found}, this node speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        found: u8,
    },
    /// A kind this version does not know.
    #[error("peer sent unknown message kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A frame announces a body larger than allowed.
    #[error("peer sent a frame of {len} bytes, more than the maximum {MAX_BODY_LEN}")]
    FrameTooLarge {
        /// Announced body length.
        len: usize,
    },
    /// The checksum does not match the bytes.
    #[error("frame checksum mismatch (expected {expected:#010x}, computed {computed:#010x}): corrupted in transit")]
    Checksum {
        /// crc32c carried by the frame.
        expected: u32,
        /// crc32c of the bytes received.
        computed: u32,
    },
    /// The body's length does not fit the kind.
    #[error("{kind:?} body has {len} bytes, which does not fit its layout")]
    BadLength {
        /// The kind.
        kind: MessageKind,
        /// The body length.
        len: usize,
    },
    /// A field carries a value outside its domain.
    #[error("field {field} has invalid value {value}")]
    BadField {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A reserved field (of the header or a body), or a flag bit this version does not know,
    /// is not zero.
    #[error("reserved bytes or unknown flag bits are not zero")]
    Reserved,
    /// A reject reason is not UTF-8.
    #[error("reject reason is not valid UTF-8")]
    BadUtf8,
    /// A Hello's term history is malformed or goes backwards.
    #[error("peer's term history is invalid: {0}")]
    BadTermHistory(#[source] TermHistoryError),
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Reject { .. } => MessageKind::Reject,
            Message::Write { .. } => MessageKind::Write,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Applied { .. } => MessageKind::Applied,
            Message::ReplayDone { .. } => MessageKind::ReplayDone,
            Message::RepairRequest { .. } => MessageKind::RepairRequest,
            Message::RepairData { .. } => MessageKind::RepairData,
            Message::RepairDone { .. } => MessageKind::RepairDone,
            Message::ChunkDigest { .. } => MessageKind::ChunkDigest,
            Message::ChunkVerdict { .. } => MessageKind::ChunkVerdict,
            Message::ChunkData { .. } => MessageKind::ChunkData,
            Message::ChunkHeld { .. } => MessageKind::ChunkHeld,
            Message::ResyncDone { .. } => MessageKind::ResyncDone,
            Message::ResyncBegin { .. } => MessageKind::ResyncBegin,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Message::Hello(h) => HELLO_FIXED_LEN + TERM_ENTRY_LEN * h.term_history.entries().len(),
            Message::Reject { reason, .. } => 2 + 2 + reason.len().min(MAX_REASON_LEN),
            Message::Write { data, .. } => WRITE_FIXED_LEN + data.len(),
            Message::Ack { .. } => 16,
            Message::Applied { .. } | Message::ReplayDone { .. } => 8,
            Message::RepairDone { .. } => 16,
            Message::RepairRequest { ranges } => 8 + REPAIR_RANGE_LEN * ranges.len(),
            Message::RepairData { data, .. } | Message::ChunkData { data, .. } => {
                REPAIR_DATA_FIXED_LEN + data.len()
            }
            Message::ChunkDigest { .. } => CHUNK_RANGE_LEN + 4 + 16,
            Message::ChunkVerdict { .. } => CHUNK_RANGE_LEN + 4,
            Message::ChunkHeld { .. } => CHUNK_RANGE_LEN + 4,
            Message::ResyncDone { .. } | Message::ResyncBegin { .. } => 8,
        }
    }

    /// Size of this message once framed.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len()
    }

    /// Appends this message, framed, to `out`.
    ///
    /// # Panics
    /// Never for messages built by the engine: a `Write` longer than [`MAX_WRITE_LEN`] is a caller
    /// bug that the engine rejects before it builds the message; this function debug-asserts it.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Message::Write {
            seq,
            term,
            offset,
            data,
        } = self
        {
            return encode_write(*seq, *term, *offset, data, data.crc(), out);
        }
        if let Message::ChunkData { offset, data } = self {
            // One place for a chunk's frame: a sender that lends the region's bytes builds the
            // same header (`chunk_data_header`).
            return encode_chunk_data(*offset, data, out);
        }
        let body_len = self.body_len();
        let start = begin_frame(out, self.kind(), body_len);
        match self {
            Message::Hello(h) => {
                out.put_u8(h.role.to_byte());
                out.put_bytes(0, 3);
                out.put_u64_le(h.node_id);
                out.put_u64_le(h.peer_node_id);
                out.put_u64_le(h.region_size);
                out.put_u64_le(h.applied_through);
                out.put_u64_le(h.last_seq);
                out.put_u64_le(h.first_seq);
                out.put_u64_le(h.queue_capacity);
                out.put_u32_le(h.queue_format_version);
                out.put_u32_le(h.silence_timeout_us);
                out.put_u64_le(h.current_term);
                let entries = h.term_history.entries();
                out.put_u32_le(entries.len() as u32);
                let flag = |on: bool, bit: u32| if on { bit } else { 0 };
                out.put_u32_le(
                    flag(h.initial_sync, HELLO_FLAG_INITIAL_SYNC)
                        | flag(h.region_blank, HELLO_FLAG_REGION_BLANK),
                );
                out.put_u64_le(h.alone_from);
                out.put_u64_le(h.discard_node);
                out.put_u64_le(h.resync_from);
                for e in entries {
                    out.put_u64_le(e.term);
                    out.put_u64_le(e.first_seq);
                }
            }
            Message::Reject { code, reason } => {
                let reason = truncate_utf8(reason, MAX_REASON_LEN);
                out.put_u16_le(*code as u16);
                out.put_u16_le(reason.len() as u16);
                out.put_slice(reason.as_bytes());
            }
            Message::Write { .. } | Message::ChunkData { .. } => unreachable!("encoded above"),
            Message::Ack {
                received_through,
                applied_through,
            } => {
                out.put_u64_le(*received_through);
                out.put_u64_le(*applied_through);
            }
            Message::Applied { through }
            | Message::ReplayDone { through }
            | Message::ResyncDone { through } => out.put_u64_le(*through),
            Message::ResyncBegin { chunks } => out.put_u64_le(*chunks),
            Message::ChunkDigest { range, digest } => {
                put_chunk_range(out, range);
                out.put_u32_le(0);
                out.put_slice(digest);
            }
            Message::ChunkVerdict { range, same } => {
                put_chunk_range(out, range);
                out.put_u32_le(u32::from(*same));
            }
            Message::ChunkHeld { range } => {
                put_chunk_range(out, range);
                out.put_u32_le(0);
            }
            Message::RepairDone { through, bytes } => {
                out.put_u64_le(*through);
                out.put_u64_le(*bytes);
            }
            Message::RepairRequest { ranges } => {
                debug_assert!(!ranges.is_empty() && ranges.len() <= MAX_REPAIR_RANGES);
                out.put_u32_le(ranges.len() as u32);
                out.put_u32_le(0);
                for r in ranges {
                    out.put_u64_le(r.offset);
                    out.put_u64_le(r.len);
                }
            }
            Message::RepairData { offset, data } => {
                debug_assert!(!data.is_empty() && data.len() <= MAX_WRITE_LEN);
                out.put_u64_le(*offset);
                out.put_u32_le(data.len() as u32);
                out.put_slice(data);
            }
        }
        finish_frame(out, start);
    }

    /// Decodes one frame from the front of `buf`, if a whole frame is there.
    ///
    /// Returns `Ok(None)` when more bytes are needed (nothing is consumed), `Ok(Some(msg))` after
    /// consuming exactly one frame, and an error (nothing consumed) when the bytes are not a valid
    /// frame; the connection is then unusable. The payload of a `Write` shares `buf`'s allocation
    /// (no copy).
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if buf.len() < FRAME_HEADER_LEN {
            // Check the magic early so a non-libmirror peer is reported at once.
            if buf.len() >= 4 {
                let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if magic != FRAME_MAGIC {
                    return Err(WireError::BadMagic { found: magic });
                }
            }
            return Ok(None);
        }
        let header = &buf[..FRAME_HEADER_LEN];
        let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        if header[4] != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { found: header[4] });
        }
        let kind_byte = header[5];
        if header[6] != 0 || header[7] != 0 {
            return Err(WireError::Reserved);
        }
        let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if body_len > MAX_BODY_LEN {
            return Err(WireError::FrameTooLarge { len: body_len });
        }
        let kind = match kind_byte {
            1 => MessageKind::Hello,
            2 => MessageKind::Reject,
            3 => MessageKind::Write,
            4 => MessageKind::Ack,
            5 => MessageKind::Applied,
            6 => MessageKind::ReplayDone,
            7 => MessageKind::RepairRequest,
            8 => MessageKind::RepairData,
            9 => MessageKind::RepairDone,
            10 => MessageKind::ChunkDigest,
            11 => MessageKind::ChunkVerdict,
            12 => MessageKind::ChunkData,
            13 => MessageKind::ChunkHeld,
            14 => MessageKind::ResyncDone,
            15 => MessageKind::ResyncBegin,
            other => return Err(WireError::UnknownKind { kind: other }),
        };
        if buf.len() < FRAME_HEADER_LEN + body_len {
            return Ok(None);
        }
        let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let body = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
        let mut computed = crate::crc::crc32c(&header[..12]);
        // A write's payload gets a crc of its own, combined into the frame's: the record that
        // stores it reuses it (see `Payload`).
        let mut payload_crc = 0;
        if kind == MessageKind::Write && body_len > WRITE_FIXED_LEN {
            let (fixed, payload) = body.split_at(WRITE_FIXED_LEN);
            payload_crc = crate::crc::crc32c(payload);
            computed = crate::crc::crc32c_append(computed, fixed);
            computed = crc32c_append_known(computed, payload, payload_crc);
        } else {
            computed = crate::crc::crc32c_append(computed, body);
        }
        if computed != expected {
            return Err(WireError::Checksum { expected, computed });
        }
        let msg = decode_body(kind, &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len])?;
        let mut frame = buf.split_to(FRAME_HEADER_LEN + body_len);
        Ok(Some(match msg {
            Body::Done(m) => m,
            Body::Write { seq, term, offset } => {
                frame.advance(FRAME_HEADER_LEN + WRITE_FIXED_LEN);
                Message::Write {
                    seq,
                    term,
                    offset,
                    data: Payload::with_crc(frame.freeze(), payload_crc),
                }
            }
            Body::RepairData { offset } => {
                frame.advance(FRAME_HEADER_LEN + REPAIR_DATA_FIXED_LEN);
                Message::RepairData {
                    offset,
                    data: frame.freeze(),
                }
            }
            Body::ChunkData { offset } => {
                frame.advance(FRAME_HEADER_LEN + REPAIR_DATA_FIXED_LEN);
                Message::ChunkData {
                    offset,
                    data: frame.freeze(),
                }
            }
        }))
    }
}

/// Appends a framed `Write` message built from borrowed parts (no intermediate allocation).
/// `data_crc` is the crc32c of `data` ([`Payload::crc`]; callers without one compute it).
///
/// `data` must be 1..=[`MAX_WRITE_LEN`] bytes; the engine validates writes before they get here
/// (debug-asserted).
pub fn encode_write(
    seq: u64,
    term: u64,
    offset: u64,
    data: &[u8],
    data_crc: u32,
    out: &mut BytesMut,
) {
    out.reserve(WRITE_HEADER_LEN + data.len());
    out.put_slice(&write_header(seq, term, offset, data, data_crc));
    out.put_slice(data);
}

/// Bytes of a `Write` frame before its data: the frame header, then seq, term, offset and length.
pub const WRITE_HEADER_LEN: usize = FRAME_HEADER_LEN + WRITE_FIXED_LEN;

/// The start of a `Write` frame carrying `data` (whose crc32c is `data_crc`): the frame is these
/// bytes followed by `data`, exactly as [`Message::encode`] writes it. A sender may hand both to
/// the network as they are (a vectored write: `data` is not copied by us). The data's crc is
/// combined into the frame's rather than computed again (see [`Payload`]).
pub fn write_header(
    seq: u64,
    term: u64,
    offset: u64,
    data: &[u8],
    data_crc: u32,
) -> [u8; WRITE_HEADER_LEN] {
    let mut h = [0u8; WRITE_HEADER_LEN];
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&term.to_le_bytes());
    h[32..40].copy_from_slice(&offset.to_le_bytes());
    h[40..44].copy_from_slice(&(data.len() as u32).to_le_bytes());
    seal_borrowed_frame(&mut h, MessageKind::Write, data, data_crc);
    h
}

/// Fills in the frame header (bytes 0..16) of `h`, a frame's header and fixed body fields that
/// `data` (crc32c `data_crc`) follows: magic, version, `kind`, body length and the crc over all
/// of it and the data.
fn seal_borrowed_frame(h: &mut [u8], kind: MessageKind, data: &[u8], data_crc: u32) {
    debug_assert!(!data.is_empty() && data.len() <= MAX_WRITE_LEN);
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4] = PROTOCOL_VERSION;
    h[5] = kind as u8;
    // Bytes 6..8: flags, zero.
    let body_len = h.len() - FRAME_HEADER_LEN + data.len();
    h[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let mut crc = crate::crc::crc32c(&h[..12]);
    crc = crate::crc::crc32c_append(crc, &h[FRAME_HEADER_LEN..]);
    crc = crc32c_append_known(crc, data, data_crc);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes of a `ChunkData` frame before its data: the frame header, then the body's offset and
/// length.
pub const CHUNK_DATA_HEADER_LEN: usize = FRAME_HEADER_LEN + REPAIR_DATA_FIXED_LEN;

/// The start of a `ChunkData` frame carrying `data`, its crc covering `data`: the frame is these
/// bytes followed by `data`, exactly as [`Message::encode`] writes it. A sender hands both to
/// the network as they are (a vectored write: `data` is not copied by us).
pub fn chunk_data_header(offset: u64, data: &[u8]) -> [u8; CHUNK_DATA_HEADER_LEN] {
    let mut h = [0u8; CHUNK_DATA_HEADER_LEN];
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
    // A chunk comes with no crc: one pass over it here.
    seal_borrowed_frame(
        &mut h,
        MessageKind::ChunkData,
        data,
        crate::crc::crc32c(data),
    );
    h
}

/// Encodes a `ChunkData` frame from borrowed bytes (a chunk lent by the region), exactly as
/// [`Message::encode`] would.
pub fn encode_chunk_data(offset: u64, data: &[u8], out: &mut BytesMut) {
    out.reserve(CHUNK_DATA_HEADER_LEN + data.len());
    out.put_slice(&chunk_data_header(offset, data));
    out.put_slice(data);
}

fn begin_frame(out: &mut BytesMut, kind: MessageKind, body_len: usize) -> usize {
    debug_assert!(body_len <= MAX_BODY_LEN, "message body too large");
    out.reserve(FRAME_HEADER_LEN + body_len);
    let start = out.len();
    out.put_u32_le(FRAME_MAGIC);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(kind as u8);
    out.put_u16_le(0);
    out.put_u32_le(body_len as u32);
    out.put_u32_le(0); // crc, patched by finish_frame
    start
}

fn put_chunk_range(out: &mut BytesMut, range: &ChunkRange) {
    out.put_u64_le(range.offset);
    out.put_u32_le(range.len);
}

/// A chunk range from a body, checked: 1..=MAX_CHUNK_SIZE bytes, not past u64.
fn get_chunk_range(body: &mut &[u8]) -> Result<ChunkRange, WireError> {
    let offset = body.get_u64_le();
    let len = body.get_u32_le();
    if len == 0
        || u64::from(len) > crate::MAX_CHUNK_SIZE
        || offset.checked_add(u64::from(len)).is_none()
    {
        return Err(WireError::BadField {
            field: "chunk.len",
            value: u64::from(len),
        });
    }
    Ok(ChunkRange { offset, len })
}

fn finish_frame(out: &mut BytesMut, start: usize) {
    let mut crc = crate::crc::crc32c(&out[start..start + 12]);
    crc = crate::crc::crc32c_append(crc, &out[start + FRAME_HEADER_LEN..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

enum Body {
    Done(Message),
    /// A write whose payload is taken from the frame without a copy by the caller.
    Write {
        seq: u64,
        term: u64,
        offset: u64,
    },
    /// Likewise for repair bytes.
    RepairData {
        offset: u64,
    },
    /// Likewise for a resync's chunk bytes.
    ChunkData {
        offset: u64,
    },
}

fn decode_body(kind: MessageKind, mut body: &[u8]) -> Result<Body, WireError> {
    let len = body.len();
    let bad_len = || WireError::BadLength { kind, len };
    Ok(match kind {
        MessageKind::Hello => {
            if len < HELLO_FIXED_LEN || !(len - HELLO_FIXED_LEN).is_multiple_of(TERM_ENTRY_LEN) {
                return Err(bad_len());
            }
            let role = WireRole::from_byte(body.get_u8())?;
            body.advance(3);
            let node_id = body.get_u64_le();
            let peer_node_id = body.get_u64_le();
            let region_size = body.get_u64_le();
            let applied_through = body.get_u64_le();
            let last_seq = body.get_u64_le();
            let first_seq = body.get_u64_le();
            let queue_capacity = body.get_u64_le();
            let queue_format_version = body.get_u32_le();
            let silence_timeout_us = body.get_u32_le();
            let current_term = body.get_u64_le();
            let entry_count = body.get_u32_le() as usize;
            let flags = body.get_u32_le();
            if flags & !(HELLO_FLAG_INITIAL_SYNC | HELLO_FLAG_REGION_BLANK) != 0 {
                return Err(WireError::Reserved);
            }
            let alone_from = body.get_u64_le();
            let discard_node = body.get_u64_le();
            let resync_from = body.get_u64_le();
            if entry_count > MAX_TERM_ENTRIES {
                return Err(WireError::BadTermHistory(TermHistoryError::TooMany {
                    count: entry_count,
                    max: MAX_TERM_ENTRIES,
                }));
            }
            if body.len() != entry_count * TERM_ENTRY_LEN {
                return Err(bad_len());
            }
            let entries = (0..entry_count)
                .map(|_| TermEntry {
                    term: body.get_u64_le(),
                    first_seq: body.get_u64_le(),
                })
                .collect();
            let term_history =
                TermHistory::for_log(entries, last_seq).map_err(WireError::BadTermHistory)?;
            if term_history.last_term() > current_term {
                return Err(WireError::BadField {
                    field: "hello.current_term",
                    value: current_term,
                });
            }
            if node_id == 0 {
                return Err(WireError::BadField {
                    field: "hello.node_id",
                    value: 0,
                });
            }
            if applied_through > last_seq {
                return Err(WireError::BadField {
                    field: "hello.applied_through",
                    value: applied_through,
                });
            }
            if first_seq > last_seq {
                return Err(WireError::BadField {
                    field: "hello.first_seq",
                    value: first_seq,
                });
            }
            if resync_from > last_seq.saturating_add(1) {
                return Err(WireError::BadField {
                    field: "hello.resync_from",
                    value: resync_from,
                });
            }
            if alone_from > last_seq {
                return Err(WireError::BadField {
                    field: "hello.alone_from",
                    value: alone_from,
                });
            }
            Body::Done(Message::hello(Hello {
                role,
                node_id,
                peer_node_id,
                region_size,
                queue_format_version,
                applied_through,
                last_seq,
                first_seq,
                queue_capacity,
                silence_timeout_us,
                current_term,
                term_history,
                alone_from,
                discard_node,
                resync_from,
                initial_sync: flags & HELLO_FLAG_INITIAL_SYNC != 0,
                region_blank: flags & HELLO_FLAG_REGION_BLANK != 0,
            }))
        }
        MessageKind::Reject => {
            if len < 4 {
                return Err(bad_len());
            }
            let code = RejectCode::from_u16(body.get_u16_le())?;
            let reason_len = body.get_u16_le() as usize;
            if reason_len != body.len() || reason_len > MAX_REASON_LEN {
                return Err(bad_len());
            }
            let reason = std::str::from_utf8(body)
                .map_err(|_| WireError::BadUtf8)?
                .to_owned();
            Body::Done(Message::Reject { code, reason })
        }
        MessageKind::Write => {
            if len < WRITE_FIXED_LEN {
                return Err(bad_len());
            }
            let seq = body.get_u64_le();
            let term = body.get_u64_le();
            let offset = body.get_u64_le();
            let data_len = body.get_u32_le() as usize;
            if data_len != body.len() || data_len == 0 || data_len > MAX_WRITE_LEN {
                return Err(bad_len());
            }
            if seq == 0 {
                return Err(WireError::BadField {
                    field: "write.seq",
                    value: 0,
                });
            }
            if term == 0 {
                return Err(WireError::BadField {
                    field: "write.term",
                    value: 0,
                });
            }
            Body::Write { seq, term, offset }
        }
        MessageKind::RepairData | MessageKind::ChunkData => {
            if len < REPAIR_DATA_FIXED_LEN {
                return Err(bad_len());
            }
            let offset = body.get_u64_le();
            let data_len = body.get_u32_le() as usize;
            if data_len != body.len() || data_len == 0 || data_len > MAX_WRITE_LEN {
                return Err(bad_len());
            }
            if kind == MessageKind::RepairData {
                Body::RepairData { offset }
            } else {
                if data_len as u64 > crate::MAX_CHUNK_SIZE {
                    return Err(bad_len());
                }
                Body::ChunkData { offset }
            }
        }
        MessageKind::ChunkDigest => {
            if len != CHUNK_RANGE_LEN + 4 + 16 {
                return Err(bad_len());
            }
            let range = get_chunk_range(&mut body)?;
            if body.get_u32_le() != 0 {
                return Err(WireError::Reserved);
            }
            let mut digest = [0u8; 16];
            body.copy_to_slice(&mut digest);
            Body::Done(Message::ChunkDigest { range, digest })
        }
        MessageKind::ChunkVerdict => {
            if len != CHUNK_RANGE_LEN + 4 {
                return Err(bad_len());
            }
            let range = get_chunk_range(&mut body)?;
            let same = match body.get_u32_le() {
                0 => false,
                1 => true,
                other => {
                    return Err(WireError::BadField {
                        field: "chunk_verdict.same",
                        value: u64::from(other),
                    })
                }
            };
            Body::Done(Message::ChunkVerdict { range, same })
        }
        MessageKind::ChunkHeld => {
            if len != CHUNK_RANGE_LEN + 4 {
                return Err(bad_len());
            }
            let range = get_chunk_range(&mut body)?;
            if body.get_u32_le() != 0 {
                return Err(WireError::Reserved);
            }
            Body::Done(Message::ChunkHeld { range })
        }
        MessageKind::ResyncDone => {
            if len != 8 {
                return Err(bad_len());
            }
            Body::Done(Message::ResyncDone {
                through: body.get_u64_le(),
            })
        }
        MessageKind::ResyncBegin => {
            if len != 8 {
                return Err(bad_len());
            }
            Body::Done(Message::ResyncBegin {
                chunks: body.get_u64_le(),
            })
        }
        MessageKind::RepairRequest => {
            if len < 8 {
                return Err(bad_len());
            }
            let count = body.get_u32_le() as usize;
            if body.get_u32_le() != 0 {
                return Err(WireError::Reserved);
            }
            if count == 0 || count > MAX_REPAIR_RANGES || body.len() != count * REPAIR_RANGE_LEN {
                return Err(bad_len());
            }
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                let offset = body.get_u64_le();
                let len = body.get_u64_le();
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(WireError::BadField {
                        field: "repair_request.len",
                        value: len,
                    });
                }
                ranges.push(RegionRange { offset, len });
            }
            Body::Done(Message::RepairRequest { ranges })
        }
        MessageKind::RepairDone => {
            if len != 16 {
                return Err(bad_len());
            }
            Body::Done(Message::RepairDone {
                through: body.get_u64_le(),
                bytes: body.get_u64_le(),
            })
        }
        MessageKind::Ack => {
            if len != 16 {
                return Err(bad_len());
            }
            let received_through = body.get_u64_le();
            let applied_through = body.get_u64_le();
            if applied_through > received_through {
                return Err(WireError::BadField {
                    field: "ack.applied_through",
                    value: applied_through,
                });
            }
            Body::Done(Message::Ack {
                received_through,
                applied_through,
            })
        }
        MessageKind::Applied => {
            if len != 8 {
                return Err(bad_len());
            }
            Body::Done(Message::Applied {
                through: body.get_u64_le(),
            })
        }
        MessageKind::ReplayDone => {
            if len != 8 {
                return Err(bad_len());
            }
            Body::Done(Message::ReplayDone {
                through: body.get_u64_le(),
            })
        }
    })
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(msg: &Message) -> Message {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        assert_eq!(buf.len(), msg.encoded_len());
        let out = Message::decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    fn sample_hello() -> Message {
        Message::hello(Hello {
            role: WireRole::Backup,
            node_id: 7,
            peer_node_id: 9,
            region_size: 1 << 20,
            queue_format_version: 1,
            applied_through: 10,
            last_seq: 12,
            first_seq: 3,
            queue_capacity: 1 << 20,
            silence_timeout_us: 1_000_000,
            alone_from: 0,
            discard_node: 0,
            resync_from: 0,
            initial_sync: false,
            region_blank: true,
            current_term: 4,
            term_history: TermHistory::from_entries(vec![
                TermEntry {
                    term: 1,
                    first_seq: 1,
                },
                TermEntry {
                    term: 3,
                    first_seq: 11,
                },
            ])
            .unwrap(),
        })
    }

    #[test]
    fn a_chunk_encoded_from_borrowed_bytes_or_in_two_parts_is_the_message_s_frame() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let msg = Message::ChunkData {
            offset: 1 << 20,
            data: Bytes::from(data.clone()),
        };
        let mut whole = BytesMut::new();
        msg.encode(&mut whole);
        let mut borrowed = BytesMut::new();
        encode_chunk_data(1 << 20, &data, &mut borrowed);
        assert_eq!(borrowed, whole);
        let header = chunk_data_header(1 << 20, &data);
        assert_eq!(&whole[..CHUNK_DATA_HEADER_LEN], &header[..]);
        assert_eq!(&whole[CHUNK_DATA_HEADER_LEN..], &data[..]);
        assert_eq!(roundtrip(&msg), msg);
    }

    #[test]
    fn a_write_sent_as_header_and_borrowed_bytes_decodes_as_the_message() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let msg = Message::Write {
            seq: 7,
            term: 3,
            offset: 1 << 20,
            data: Bytes::from(data.clone()).into(),
        };
        let mut two_parts = BytesMut::new();
        let crc = crc32c::crc32c(&data);
        two_parts.extend_from_slice(&write_header(7, 3, 1 << 20, &data, crc));
        two_parts.extend_from_slice(&data);
        let mut received = two_parts.clone();
        assert_eq!(Message::decode(&mut received).unwrap(), Some(msg.clone()));
        assert!(received.is_empty());
        let mut whole = BytesMut::new();
        msg.encode(&mut whole);
        assert_eq!(whole, two_parts);
    }

    #[test]
    fn every_kind_roundtrips() {
        let msgs = [
            sample_hello(),
            Message::Reject {
                code: RejectCode::WrongPeer,
                reason: "bound to 5".into(),
            },
            Message::Write {
                seq: 1,
                term: 2,
                offset: 4096,
                data: Bytes::from_static(b"hello").into(),
            },
            Message::RepairRequest {
                ranges: vec![
                    RegionRange { offset: 0, len: 5 },
                    RegionRange {
                        offset: 100,
                        len: 4096,
                    },
                ],
            },
            Message::RepairData {
                offset: 100,
                data: Bytes::from_static(b"bytes"),
            },
            Message::RepairDone {
                through: 7,
                bytes: 4101,
            },
            Message::Ack {
                received_through: 5,
                applied_through: 4,
            },
            Message::Applied { through: 3 },
            Message::ReplayDone { through: 8 },
        ];
        for m in &msgs {
            assert_eq!(&roundtrip(m), m);
        }
    }

    #[test]
    fn partial_frames_need_more_bytes_and_consume_nothing() {
        let mut full = BytesMut::new();
        Message::Write {
            seq: 3,
            term: 1,
            offset: 0,
            data: Bytes::from(vec![1u8; 100]).into(),
        }
        .encode(&mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(Message::decode(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut full = BytesMut::new();
        sample_hello().encode(&mut full);
        for byte in 0..full.len() {
            for bit in 0..8 {
                let mut damaged = full.clone();
                damaged[byte] ^= 1 << bit;
                match Message::decode(&mut damaged) {
                    Err(_) | Ok(None) => {}
                    Ok(Some(m)) => panic!("flip at {byte}.{bit} decoded as {m:?}"),
                }
            }
        }
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let mut buf = BytesMut::new();
        Message::Applied { through: 1 }.encode(&mut buf);
        buf[4] = 1;
        assert_eq!(
            Message::decode(&mut buf),
            Err(WireError::UnsupportedVersion { found: 1 })
        );
    }

    /// Re-frames `msg` after `patch` edited its body (the crc is recomputed, so only the
    /// field checks can refuse it).
    fn reframed(msg: &Message, patch: impl FnOnce(&mut Vec<u8>)) -> BytesMut {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let mut body = buf[FRAME_HEADER_LEN..].to_vec();
        patch(&mut body);
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, msg.kind(), body.len());
        out.put_slice(&body);
        finish_frame(&mut out, start);
        out
    }

    #[test]
    fn a_term_history_that_goes_backwards_or_past_the_log_is_refused() {
        let hello = sample_hello();
        // Entry 1's term (3) becomes 1: not above entry 0's.
        let entry1_term = HELLO_FIXED_LEN + TERM_ENTRY_LEN;
        let mut buf = reframed(&hello, |b| b[entry1_term] = 1);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::BadTermHistory(TermHistoryError::Backwards {
                index: 1,
                ..
            }))
        ));
        // Entry 1 starts at seq 13, after last_seq 12.
        let entry1_seq = entry1_term + 8;
        let mut buf = reframed(&hello, |b| b[entry1_seq] = 13);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::BadTermHistory(TermHistoryError::BeyondLog {
                index: 1,
                ..
            }))
        ));
        // current_term (4) below the history's last term (3 -> 5).
        let mut buf = reframed(&hello, |b| b[entry1_term] = 5);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::BadField {
                field: "hello.current_term",
                ..
            })
        ));
        // A term of 0 in a write.
        let write = Message::Write {
            seq: 1,
            term: 1,
            offset: 0,
            data: Bytes::from_static(b"x").into(),
        };
        let mut buf = reframed(&write, |b| b[8] = 0);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::BadField {
                field: "write.term",
                ..
            })
        ));
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut buf = BytesMut::new();
        Message::Applied { through: 1 }.encode(&mut buf);
        buf[5] = 99;
        assert_eq!(
            Message::decode(&mut buf),
            Err(WireError::UnknownKind { kind: 99 })
        );
    }

    #[test]
    fn garbage_is_refused_at_once() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering_it() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(FRAME_MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(MessageKind::Write as u8);
        buf.put_u16_le(0);
        buf.put_u32_le(u32::MAX);
        buf.put_u32_le(0);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn long_reject_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let out = roundtrip(&Message::Reject {
            code: RejectCode::Role,
            reason,
        });
        let Message::Reject { reason, .. } = out else {
            panic!()
        };
        assert!(reason.len() <= MAX_REASON_LEN);
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<bool>(),
                1..u64::MAX,
                any::<u64>(),
                any::<u64>(),
                0..1000u64,
                0..1000u64,
                any::<u32>()
            )
                .prop_map(|(p, id, peer, size, a, extra, v)| {
                    let last = a + extra;
                    Message::hello(Hello {
                        role: if p {
                            WireRole::Primary
                        } else {
                            WireRole::Backup
                        },
                        node_id: id,
                        peer_node_id: peer,
                        region_size: size,
                        queue_format_version: v,
                        applied_through: a,
                        last_seq: last,
                        first_seq: last.min(a),
                        queue_capacity: size / 2,
                        silence_timeout_us: v.rotate_left(7),
                        alone_from: extra.min(last),
                        discard_node: peer,
                        resync_from: 0,
                        initial_sync: false,
                        region_blank: extra % 2 == 1,
                        current_term: 9,
                        term_history: if last == 0 {
                            TermHistory::new()
                        } else {
                            TermHistory::from_entries(vec![TermEntry {
                                term: 9,
                                first_seq: last,
                            }])
                            .unwrap()
                        },
                    })
                }),
            (
                1..u64::MAX,
                1..u64::MAX,
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 1..300)
            )
                .prop_map(|(seq, term, offset, d)| Message::Write {
                    seq,
                    term,
                    offset,
                    data: Bytes::from(d).into()
                }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..100)).prop_map(
                |(offset, d)| Message::RepairData {
                    offset,
                    data: Bytes::from(d)
                }
            ),
            proptest::collection::vec((0..u64::MAX / 2, 1..u64::MAX / 2), 1..20).prop_map(|r| {
                Message::RepairRequest {
                    ranges: r
                        .into_iter()
                        .map(|(offset, len)| RegionRange { offset, len })
                        .collect(),
                }
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(through, bytes)| Message::RepairDone { through, bytes }),
            (0..u64::MAX / 2, 0..u64::MAX / 2).prop_map(|(a, b)| Message::Ack {
                received_through: a.max(b),
                applied_through: a.min(b)
            }),
            any::<u64>().prop_map(|t| Message::Applied { through: t }),
            any::<u64>().prop_map(|t| Message::ReplayDone { through: t }),
            ".{0,40}".prop_map(|r| Message::Reject {
                code: RejectCode::Unrecoverable,
                reason: r
            }),
        ]
    }

    proptest! {
        #[test]
        fn streams_of_messages_roundtrip_in_any_chunking(
            msgs in proptest::collection::vec(arb_message(), 1..20),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs { m.encode(&mut wire); }
            let mut rx = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                rx.extend_from_slice(piece);
                while let Some(m) = Message::decode(&mut rx).unwrap() { out.push(m); }
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(rx.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Message::decode(&mut buf);
        }

        #[test]
        fn valid_header_with_arbitrary_body_never_panics(
            kind in 0u8..11, body in proptest::collection::vec(any::<u8>(), 0..120)
        ) {
            let mut buf = BytesMut::new();
            buf.put_u32_le(FRAME_MAGIC);
            buf.put_u8(PROTOCOL_VERSION);
            buf.put_u8(kind);
            buf.put_u16_le(0);
            buf.put_u32_le(body.len() as u32);
            let mut crc = crc32c::crc32c(&buf[..12]);
            crc = crc32c::crc32c_append(crc, &body);
            buf.put_u32_le(crc);
            buf.put_slice(&body);
            let _ = Message::decode(&mut buf);
        }
    }
}
