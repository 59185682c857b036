//! The wire format: framed, versioned, crc32c-checksummed messages.
//!
//! Every message travels as one frame (all integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 magic        0x52494D4C ("LMIR" as bytes on the wire)
//!      4    1 version      PROTOCOL_VERSION (1)
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

/// Frame magic ("LMIR" read as little-endian u32).
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"LMIR");
/// The protocol version this build speaks. A peer with another version is refused at the frame
/// level, before any message of it is interpreted.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest body accepted: the largest write payload plus the write message's own fields.
pub const MAX_BODY_LEN: usize = MAX_WRITE_LEN + 20;
/// Largest payload of one write request (16 MiB).
pub const MAX_WRITE_LEN: usize = 16 << 20;
/// Longest reason text a `Reject` carries.
pub const MAX_REASON_LEN: usize = 1024;

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
    /// First message on a connection, in both directions.
    Hello(Hello),
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
        /// Byte offset in the region.
        offset: u64,
        /// The bytes to write (1..=MAX_WRITE_LEN).
        data: Bytes,
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
        /// Last sequence number replayed (the backup's last_seq at the handshake).
        through: u64,
    },
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
}

const HELLO_BODY_LEN: usize = 1 + 3 + 8 * 7 + 4 + 4;
const WRITE_FIXED_LEN: usize = 8 + 8 + 4;

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
    /// A reserved field is not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// A reject reason is not UTF-8.
    #[error("reject reason is not valid UTF-8")]
    BadUtf8,
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
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Message::Hello(_) => HELLO_BODY_LEN,
            Message::Reject { reason, .. } => 2 + 2 + reason.len().min(MAX_REASON_LEN),
            Message::Write { data, .. } => WRITE_FIXED_LEN + data.len(),
            Message::Ack { .. } => 16,
            Message::Applied { .. } | Message::ReplayDone { .. } => 8,
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
        if let Message::Write { seq, offset, data } = self {
            return encode_write(*seq, *offset, data, out);
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
            }
            Message::Reject { code, reason } => {
                let reason = truncate_utf8(reason, MAX_REASON_LEN);
                out.put_u16_le(*code as u16);
                out.put_u16_le(reason.len() as u16);
                out.put_slice(reason.as_bytes());
            }
            Message::Write { .. } => unreachable!("encoded above"),
            Message::Ack {
                received_through,
                applied_through,
            } => {
                out.put_u64_le(*received_through);
                out.put_u64_le(*applied_through);
            }
            Message::Applied { through } | Message::ReplayDone { through } => {
                out.put_u64_le(*through)
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
            other => return Err(WireError::UnknownKind { kind: other }),
        };
        if buf.len() < FRAME_HEADER_LEN + body_len {
            return Ok(None);
        }
        let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let mut computed = crc32c::crc32c(&header[..12]);
        computed = crc32c::crc32c_append(
            computed,
            &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len],
        );
        if computed != expected {
            return Err(WireError::Checksum { expected, computed });
        }
        let msg = decode_body(kind, &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len])?;
        let mut frame = buf.split_to(FRAME_HEADER_LEN + body_len);
        Ok(Some(match msg {
            Body::Done(m) => m,
            Body::Write { seq, offset } => {
                frame.advance(FRAME_HEADER_LEN + WRITE_FIXED_LEN);
                Message::Write {
                    seq,
                    offset,
                    data: frame.freeze(),
                }
            }
        }))
    }
}

/// Appends a framed `Write` message built from borrowed parts (no intermediate allocation).
///
/// `data` must be 1..=[`MAX_WRITE_LEN`] bytes; the engine validates writes before they get here
/// (debug-asserted).
pub fn encode_write(seq: u64, offset: u64, data: &[u8], out: &mut BytesMut) {
    debug_assert!(!data.is_empty() && data.len() <= MAX_WRITE_LEN);
    let start = begin_frame(out, MessageKind::Write, WRITE_FIXED_LEN + data.len());
    out.put_u64_le(seq);
    out.put_u64_le(offset);
    out.put_u32_le(data.len() as u32);
    out.put_slice(data);
    finish_frame(out, start);
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

fn finish_frame(out: &mut BytesMut, start: usize) {
    let mut crc = crc32c::crc32c(&out[start..start + 12]);
    crc = crc32c::crc32c_append(crc, &out[start + FRAME_HEADER_LEN..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

enum Body {
    Done(Message),
    /// A write whose payload is taken from the frame without a copy by the caller.
    Write {
        seq: u64,
        offset: u64,
    },
}

fn decode_body(kind: MessageKind, mut body: &[u8]) -> Result<Body, WireError> {
    let len = body.len();
    let bad_len = || WireError::BadLength { kind, len };
    Ok(match kind {
        MessageKind::Hello => {
            if len != HELLO_BODY_LEN {
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
            Body::Done(Message::Hello(Hello {
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
            Body::Write { seq, offset }
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
        Message::Hello(Hello {
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
        })
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
                offset: 4096,
                data: Bytes::from_static(b"hello"),
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
            offset: 0,
            data: Bytes::from(vec![1u8; 100]),
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
        buf[4] = 2;
        assert_eq!(
            Message::decode(&mut buf),
            Err(WireError::UnsupportedVersion { found: 2 })
        );
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
                    Message::Hello(Hello {
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
                    })
                }),
            (
                1..u64::MAX,
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 1..300)
            )
                .prop_map(|(seq, offset, d)| Message::Write {
                    seq,
                    offset,
                    data: Bytes::from(d)
                }),
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
            kind in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..120)
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
