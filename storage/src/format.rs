//! Byte layout of the queue file, as specified in `docs/FORMAT.md`
//! ("Queue file (format version 2)"). Pure encode/decode functions: no I/O, no `unsafe`.
//!
//! Every multi-byte integer is little-endian. Every length or offset read from disk is
//! validated here before anyone slices with it.

use mirror_proto::{TermEntry, TermHistory, MAX_TERM_ENTRIES};

use crate::{CutReason, Role};

/// Magic at byte 0 of a queue file.
pub const QUEUE_MAGIC: [u8; 8] = *b"LMIRQUE\0";
/// The queue file format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the queue file header; the ring's data area starts at this file offset.
pub const HEADER_BYTES: u64 = 4096;
/// Magic at byte 0 of every record (`b"LMR1"` read as a little-endian u32).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"LMR1");
/// Size of a record header; the payload follows it.
pub const RECORD_HEADER_BYTES: u64 = 56;
/// Smallest accepted ring capacity (the data area), in bytes.
pub const MIN_CAPACITY_BYTES: u64 = 4096;
/// The ring capacity must be a multiple of this.
pub const CAPACITY_ALIGN_BYTES: u64 = 4096;
/// Largest accepted ring capacity (16 TiB): keeps every virtual position far from u64 overflow
/// and every physical offset inside `usize` on 64-bit targets.
pub const MAX_CAPACITY_BYTES: u64 = 1 << 44;
/// Upper bound of one record (header + payload + padding), whatever the capacity.
pub const MAX_RECORD_BYTES: u64 = 1 << 30;

// ---- static block: bytes 0..64, written once at creation, covered by the header crc ----
pub(crate) const STATIC_BYTES: usize = 64;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_CRC: usize = 12;
const OFF_NODE_ID: usize = 16;
const OFF_REGION_SIZE: usize = 24;
const OFF_CAPACITY: usize = 32;
const OFF_DATA_OFFSET: usize = 40;
/// The role of format version 1; reserved (0) since version 2, where the role is state kept in
/// the metadata slots.
const OFF_RESERVED_ROLE: usize = 48;
const OFF_FLAGS: usize = 52;
/// The header crc covers bytes `HEADER_CRC_FROM..STATIC_BYTES`.
const HEADER_CRC_FROM: usize = 16;

// ---- meta slots: two 1024-byte slots (A at 1024, B at 2048), each self-checksummed ----
pub(crate) const META_SLOT_OFF: [usize; 2] = [1024, 2048];
pub(crate) const META_SLOT_BYTES: usize = 1024;
pub(crate) const META_GEN: usize = 0;
pub(crate) const META_PEER: usize = 8;
pub(crate) const META_APPLIED: usize = 16;
pub(crate) const META_EPOCH: usize = 24;
pub(crate) const META_CURRENT_TERM: usize = 32;
/// u32 role code in the low half of this u64 word, u32 entry count in the high half.
pub(crate) const META_ROLE: usize = 40;
pub(crate) const META_ENTRY_COUNT: usize = 44;
/// u32 crc in the low half of this u64 word; the high half is zero. The crc is computed with
/// the whole word taken as zero.
pub(crate) const META_CRC: usize = 48;
/// The first seq the node completed as a primary without its peer (0: none; a word that was
/// zero before failover existed).
pub(crate) const META_ALONE_FROM: usize = 56;
/// Term history entries: `entry_count` pairs (term u64, first_seq u64); the rest is zero.
pub(crate) const META_ENTRIES: usize = 64;
const META_ENTRY_BYTES: usize = 16;

// ---- cursor line: bytes 192..256, single u64 words, not checksummed ----
pub(crate) const OFF_SCAN_START: usize = 192;
pub(crate) const OFF_TRIMMED_THROUGH: usize = 200;
pub(crate) const OFF_HEAD: usize = 208;
pub(crate) const OFF_TAIL: usize = 216;
pub(crate) const OFF_NEXT_SEQ: usize = 224;
/// The history floor: while non-zero, the term history keeps the entry covering seq
/// `history_floor - 1` and every later one, whatever the trim point (see FORMAT.md).
pub(crate) const OFF_HISTORY_FLOOR: usize = 232;
/// The cursor line: the header bytes an ordinary barrier flushes (a metadata update also
/// flushes the slot it wrote).
pub(crate) const CURSOR_LINE: (usize, usize) = (192, 64);

// ---- record header ----
const REC_MAGIC: usize = 0;
const REC_CRC: usize = 4;
const REC_KIND: usize = 8;
const REC_RESERVED: usize = 10;
const REC_LEN: usize = 12;
const REC_SEQ: usize = 16;
const REC_VPOS: usize = 24;
const REC_OFFSET: usize = 32;
const REC_EPOCH: usize = 40;
const REC_TERM: usize = 48;
/// The record crc starts after the magic and crc fields.
pub(crate) const REC_CRC_FROM: usize = 8;

pub(crate) const HDR: usize = RECORD_HEADER_BYTES as usize;

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Rounds up to a multiple of 8. Callers pass values bounded by `MAX_RECORD_BYTES`.
pub(crate) fn align8(n: u64) -> u64 {
    debug_assert!(n <= u64::MAX - 7);
    (n + 7) & !7
}

/// Largest record (header + payload + padding) a ring of `capacity` bytes accepts: a quarter
/// of the ring, capped. The quarter bound is what keeps the "anchor" record (the last record
/// written, kept intact while the queue is empty) clear of the next append; see FORMAT.md.
pub(crate) fn max_record_bytes(capacity: u64) -> u64 {
    (capacity / 4).min(MAX_RECORD_BYTES) & !7
}

/// Largest payload a DATA record can carry in a ring of `capacity` bytes.
pub(crate) fn max_payload(capacity: u64) -> u64 {
    max_record_bytes(capacity).saturating_sub(RECORD_HEADER_BYTES)
}

/// Bytes a DATA or RESET record with a `payload_len`-byte payload occupies in the ring.
pub fn record_total(payload_len: u64) -> u64 {
    align8(RECORD_HEADER_BYTES + payload_len)
}

/// Checks a capacity requested at creation or read from a header.
pub(crate) fn check_capacity(capacity: u64) -> Result<(), String> {
    if capacity < MIN_CAPACITY_BYTES {
        return Err(format!(
            "capacity {capacity} bytes is below the minimum of {MIN_CAPACITY_BYTES}"
        ));
    }
    if !capacity.is_multiple_of(CAPACITY_ALIGN_BYTES) {
        return Err(format!(
            "capacity {capacity} bytes is not a multiple of {CAPACITY_ALIGN_BYTES}"
        ));
    }
    if capacity > MAX_CAPACITY_BYTES {
        return Err(format!(
            "capacity {capacity} bytes exceeds the maximum of {MAX_CAPACITY_BYTES}"
        ));
    }
    if usize::try_from(capacity + HEADER_BYTES).is_err() {
        return Err(format!(
            "capacity {capacity} bytes does not fit this platform's address space"
        ));
    }
    Ok(())
}

/// Role encoding in the metadata slots: 1 primary, 2 backup; 3 and 4 the same roles of a node
/// that was superseded as a primary (fenced: it learned of a newer primary) and has not been
/// promoted since. Such a node is refused as a primary at open.
pub(crate) fn role_to_u32(role: Role, superseded: bool) -> u32 {
    match (role, superseded) {
        (Role::Primary, false) => 1,
        (Role::Backup, false) => 2,
        (Role::Primary, true) => 3,
        (Role::Backup, true) => 4,
    }
}

pub(crate) fn role_from_u32(v: u32) -> Option<(Role, bool)> {
    match v {
        1 => Some((Role::Primary, false)),
        2 => Some((Role::Backup, false)),
        3 => Some((Role::Primary, true)),
        4 => Some((Role::Backup, true)),
        _ => None,
    }
}

/// The immutable part of the header (bytes 0..64): the queue's identity and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StaticHeader {
    pub node_id: u64,
    pub region_size: u64,
    pub capacity: u64,
}

/// Why a static header was refused; turned into a `StorageError` by the caller (who knows the
/// path).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StaticError {
    BadMagic([u8; 8]),
    Version(u32),
    Checksum { stored: u32, computed: u32 },
    Field(String),
}

impl StaticHeader {
    pub(crate) fn encode(&self) -> [u8; STATIC_BYTES] {
        let mut b = [0u8; STATIC_BYTES];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&QUEUE_MAGIC);
        put_u32(&mut b, OFF_VERSION, FORMAT_VERSION);
        put_u64(&mut b, OFF_NODE_ID, self.node_id);
        put_u64(&mut b, OFF_REGION_SIZE, self.region_size);
        put_u64(&mut b, OFF_CAPACITY, self.capacity);
        put_u64(&mut b, OFF_DATA_OFFSET, HEADER_BYTES);
        put_u32(&mut b, OFF_RESERVED_ROLE, 0);
        put_u32(&mut b, OFF_FLAGS, 0);
        let crc = mirror_proto::crc::crc32c(&b[HEADER_CRC_FROM..]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Decodes and validates bytes 0..64. Order of checks: magic, version, crc, then fields,
    /// so that a file that is not a queue at all says so, and another format version says so
    /// before its crc is judged.
    pub(crate) fn decode(b: &[u8; STATIC_BYTES]) -> Result<Self, StaticError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[OFF_MAGIC..OFF_MAGIC + 8]);
        if magic != QUEUE_MAGIC {
            return Err(StaticError::BadMagic(magic));
        }
        let version = u32_at(b, OFF_VERSION);
        if version != FORMAT_VERSION {
            return Err(StaticError::Version(version));
        }
        let stored = u32_at(b, OFF_HEADER_CRC);
        let computed = mirror_proto::crc::crc32c(&b[HEADER_CRC_FROM..]);
        if stored != computed {
            return Err(StaticError::Checksum { stored, computed });
        }
        let reserved_role = u32_at(b, OFF_RESERVED_ROLE);
        if reserved_role != 0 {
            return Err(StaticError::Field(format!(
                "reserved field at offset {OFF_RESERVED_ROLE} is {reserved_role} (format version \
                 {FORMAT_VERSION} keeps the role in the metadata slots; this field must be 0)"
            )));
        }
        let capacity = u64_at(b, OFF_CAPACITY);
        check_capacity(capacity).map_err(StaticError::Field)?;
        let data_offset = u64_at(b, OFF_DATA_OFFSET);
        if data_offset != HEADER_BYTES {
            return Err(StaticError::Field(format!(
                "data offset {data_offset} (format version {FORMAT_VERSION} requires {HEADER_BYTES})"
            )));
        }
        let flags = u32_at(b, OFF_FLAGS);
        if flags != 0 {
            return Err(StaticError::Field(format!(
                "unknown flags {flags:#x} (format version {FORMAT_VERSION} defines none)"
            )));
        }
        let node_id = u64_at(b, OFF_NODE_ID);
        if node_id == 0 {
            return Err(StaticError::Field("node id 0".into()));
        }
        let region_size = u64_at(b, OFF_REGION_SIZE);
        if region_size == 0 {
            return Err(StaticError::Field("region size 0".into()));
        }
        Ok(StaticHeader {
            node_id,
            region_size,
            capacity,
        })
    }
}

/// Contents of one metadata slot: the node's mutable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Generation: the slot with the larger generation and a valid crc is current. 0 = never
    /// written.
    pub generation: u64,
    pub peer_node_id: u64,
    pub applied_through: u64,
    pub epoch: u64,
    /// Highest term this node has seen (never below `history.last_term()`).
    pub current_term: u64,
    pub role: Role,
    /// Superseded as a primary (fenced) and not promoted since (role codes 3 and 4).
    pub superseded: bool,
    /// The first seq this node completed as a primary without its peer (0: none).
    pub alone_from: u64,
    /// Terms along the log (see `mirror_proto::term`).
    pub history: TermHistory,
}

/// Why the current metadata slot (crc valid) was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaFieldError {
    pub field: &'static str,
    pub why: String,
}

impl Meta {
    /// The slot as written: every field, the entries, zeros after them, and the crc over the
    /// whole slot computed with the crc word taken as zero.
    pub(crate) fn encode(&self) -> [u8; META_SLOT_BYTES] {
        let mut b = [0u8; META_SLOT_BYTES];
        put_u64(&mut b, META_GEN, self.generation);
        put_u64(&mut b, META_PEER, self.peer_node_id);
        put_u64(&mut b, META_APPLIED, self.applied_through);
        put_u64(&mut b, META_EPOCH, self.epoch);
        put_u64(&mut b, META_CURRENT_TERM, self.current_term);
        put_u32(&mut b, META_ROLE, role_to_u32(self.role, self.superseded));
        put_u64(&mut b, META_ALONE_FROM, self.alone_from);
        let entries = self.history.entries();
        // A TermHistory never holds more than MAX_TERM_ENTRIES, which fill the slot exactly.
        debug_assert!(entries.len() <= MAX_TERM_ENTRIES);
        put_u32(&mut b, META_ENTRY_COUNT, entries.len() as u32);
        for (i, e) in entries.iter().enumerate() {
            let at = META_ENTRIES + i * META_ENTRY_BYTES;
            put_u64(&mut b, at, e.term);
            put_u64(&mut b, at + 8, e.first_seq);
        }
        let crc = mirror_proto::crc::crc32c(&b);
        put_u32(&mut b, META_CRC, crc);
        b
    }

    /// The generation of a slot whose bytes verify (non-zero generation, crc matches, the high
    /// half of the crc word zero); `None` for a slot never written, torn or damaged.
    pub(crate) fn valid_generation(b: &[u8; META_SLOT_BYTES]) -> Option<u64> {
        let generation = u64_at(b, META_GEN);
        let crc_word = u64_at(b, META_CRC);
        let mut zeroed = *b;
        put_u64(&mut zeroed, META_CRC, 0);
        let computed = u64::from(mirror_proto::crc::crc32c(&zeroed));
        (generation != 0 && crc_word == computed).then_some(generation)
    }

    /// Decodes the fields of a slot that verified ([`Meta::valid_generation`]) and checks them:
    /// a known role, a valid term history, and `current_term` not below its last term.
    pub(crate) fn decode(b: &[u8; META_SLOT_BYTES]) -> Result<Self, MetaFieldError> {
        let role_code = u32_at(b, META_ROLE);
        let (role, superseded) = role_from_u32(role_code).ok_or_else(|| MetaFieldError {
            field: "role",
            why: format!(
                "unknown role code {role_code} (1 = primary, 2 = backup, 3/4 = the same, superseded)"
            ),
        })?;
        let history = decode_history(b)?;
        let current_term = u64_at(b, META_CURRENT_TERM);
        if current_term < history.last_term() {
            return Err(MetaFieldError {
                field: "current_term",
                why: format!(
                    "current term {current_term} is below the last term {} of the term history",
                    history.last_term()
                ),
            });
        }
        Ok(Meta {
            generation: u64_at(b, META_GEN),
            peer_node_id: u64_at(b, META_PEER),
            applied_through: u64_at(b, META_APPLIED),
            epoch: u64_at(b, META_EPOCH),
            current_term,
            role,
            superseded,
            alone_from: u64_at(b, META_ALONE_FROM),
            history,
        })
    }
}

fn decode_history(b: &[u8; META_SLOT_BYTES]) -> Result<TermHistory, MetaFieldError> {
    let count = u32_at(b, META_ENTRY_COUNT) as usize;
    if count > MAX_TERM_ENTRIES {
        return Err(MetaFieldError {
            field: "term_history",
            why: format!("entry count {count} exceeds the maximum of {MAX_TERM_ENTRIES}"),
        });
    }
    let entries = (0..count)
        .map(|i| {
            let at = META_ENTRIES + i * META_ENTRY_BYTES;
            TermEntry {
                term: u64_at(b, at),
                first_seq: u64_at(b, at + 8),
            }
        })
        .collect();
    TermHistory::from_entries(entries).map_err(|e| MetaFieldError {
        field: "term_history",
        why: e.to_string(),
    })
}

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A write request: `payload_len` bytes to apply at `region_offset`.
    Data = 1,
    /// Filler to the end of the data area; the next record starts the next lap.
    Pad = 2,
    /// Sequence jump: the next DATA record carries `seq` (used by `reset_to` and recovery).
    Reset = 3,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Kind::Data),
            2 => Some(Kind::Pad),
            3 => Some(Kind::Reset),
            _ => None,
        }
    }
}

/// Decoded record header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecHeader {
    pub kind: Kind,
    pub payload_len: u32,
    pub seq: u64,
    pub vpos: u64,
    pub region_offset: u64,
    pub epoch: u64,
    /// DATA: the term of the primary that assigned the seq (never 0). PAD, RESET: 0.
    pub term: u64,
}

impl RecHeader {
    /// Bytes the record occupies in the ring.
    pub(crate) fn total(&self) -> u64 {
        match self.kind {
            Kind::Pad => RECORD_HEADER_BYTES + u64::from(self.payload_len),
            Kind::Data | Kind::Reset => record_total(u64::from(self.payload_len)),
        }
    }

    /// Bytes covered by the crc after the header (payload + zero padding); 0 for PAD.
    pub(crate) fn crc_body_len(&self) -> u64 {
        match self.kind {
            Kind::Pad => 0,
            Kind::Data | Kind::Reset => self.total() - RECORD_HEADER_BYTES,
        }
    }

    /// Encodes with the crc field zero; see [`seal`].
    pub(crate) fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        put_u32(&mut b, REC_MAGIC, RECORD_MAGIC);
        b[REC_KIND..REC_KIND + 2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[REC_RESERVED..REC_RESERVED + 2].copy_from_slice(&0u16.to_le_bytes());
        put_u32(&mut b, REC_LEN, self.payload_len);
        put_u64(&mut b, REC_SEQ, self.seq);
        put_u64(&mut b, REC_VPOS, self.vpos);
        put_u64(&mut b, REC_OFFSET, self.region_offset);
        put_u64(&mut b, REC_EPOCH, self.epoch);
        put_u64(&mut b, REC_TERM, self.term);
        b
    }
}

/// Stores the crc into an encoded header: `crc32c(header[8..56] ++ body)`, where `body_crc` is
/// the caller's running crc state after the header part (see [`header_crc_start`]).
pub(crate) fn seal(b: &mut [u8; HDR], crc: u32) {
    put_u32(b, REC_CRC, crc);
}

/// crc32c state after the header part of a record (bytes 8..56); continue it over the body.
pub(crate) fn header_crc_start(b: &[u8; HDR]) -> u32 {
    mirror_proto::crc::crc32c(&b[REC_CRC_FROM..])
}

/// Stored crc of an encoded header.
pub(crate) fn stored_crc(b: &[u8; HDR]) -> u32 {
    u32_at(b, REC_CRC)
}

/// Limits a record header is checked against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub capacity: u64,
    pub max_payload: u64,
    pub region_size: u64,
}

/// Validates a record header found at virtual position `vpos` (everything except the crc and
/// the sequence/epoch/term continuity, which need context). Guarantees on success: the record lies
/// entirely inside the data area without wrapping, and its region range is in bounds.
pub(crate) fn check_header(b: &[u8; HDR], vpos: u64, lim: &Limits) -> Result<RecHeader, CutReason> {
    if u32_at(b, REC_MAGIC) != RECORD_MAGIC {
        return Err(CutReason::BadMagic);
    }
    let kind_raw = u16::from_le_bytes([b[REC_KIND], b[REC_KIND + 1]]);
    let kind = Kind::from_u16(kind_raw).ok_or(CutReason::BadKind)?;
    if b[REC_RESERVED] != 0 || b[REC_RESERVED + 1] != 0 {
        return Err(CutReason::BadKind);
    }
    let h = RecHeader {
        kind,
        payload_len: u32_at(b, REC_LEN),
        seq: u64_at(b, REC_SEQ),
        vpos: u64_at(b, REC_VPOS),
        region_offset: u64_at(b, REC_OFFSET),
        epoch: u64_at(b, REC_EPOCH),
        term: u64_at(b, REC_TERM),
    };
    // A DATA record always carries the term that assigned its seq; PAD and RESET carry none.
    if (kind == Kind::Data) != (h.term != 0) {
        return Err(CutReason::BadKind);
    }
    // vpos ties the record to one lap: a record left over from an earlier lap at the same
    // physical place carries a smaller vpos.
    if h.vpos != vpos {
        return Err(CutReason::StalePosition);
    }
    let phys = vpos % lim.capacity;
    let room = lim.capacity - phys;
    let len = u64::from(h.payload_len);
    match kind {
        Kind::Data => {
            if len == 0 || len > lim.max_payload {
                return Err(CutReason::BadLength);
            }
            match h.region_offset.checked_add(len) {
                Some(end) if end <= lim.region_size => {}
                _ => return Err(CutReason::BadLength),
            }
        }
        Kind::Reset => {
            if len != 0 || h.region_offset != 0 {
                return Err(CutReason::BadLength);
            }
        }
        Kind::Pad => {
            // A pad runs exactly to the end of the data area.
            if RECORD_HEADER_BYTES + len != room || h.region_offset != 0 {
                return Err(CutReason::BadLength);
            }
        }
    }
    if h.total() > room {
        return Err(CutReason::BadLength);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            capacity: 4096,
            max_payload: max_payload(4096),
            region_size: 1 << 20,
        }
    }

    fn history(entries: &[(u64, u64)]) -> TermHistory {
        TermHistory::from_entries(
            entries
                .iter()
                .map(|&(term, first_seq)| TermEntry { term, first_seq })
                .collect(),
        )
        .unwrap()
    }

    fn meta() -> Meta {
        Meta {
            generation: 9,
            peer_node_id: 22,
            applied_through: 31,
            epoch: 4,
            current_term: 7,
            role: Role::Backup,
            superseded: false,
            alone_from: 29,
            history: history(&[(2, 5), (7, 30)]),
        }
    }

    /// Re-seals a slot after a field was patched, as a writer with a bug would.
    fn reseal(b: &mut [u8; META_SLOT_BYTES]) {
        put_u64(b, META_CRC, 0);
        let crc = crc32c::crc32c(b);
        put_u32(b, META_CRC, crc);
    }

    #[test]
    fn static_header_round_trips_and_checks_each_field() {
        let h = StaticHeader {
            node_id: 7,
            region_size: 1 << 20,
            capacity: 8192,
        };
        let b = h.encode();
        assert_eq!(StaticHeader::decode(&b), Ok(h));

        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            StaticHeader::decode(&bad),
            Err(StaticError::BadMagic(_))
        ));

        for version in [1u8, 3] {
            let mut bad = b;
            bad[OFF_VERSION] = version;
            assert_eq!(
                StaticHeader::decode(&bad),
                Err(StaticError::Version(u32::from(version)))
            );
        }

        let mut bad = b;
        bad[OFF_NODE_ID] ^= 1;
        assert!(matches!(
            StaticHeader::decode(&bad),
            Err(StaticError::Checksum { .. })
        ));
    }

    #[test]
    fn static_header_refuses_bad_fields_even_with_a_valid_crc() {
        let good = StaticHeader {
            node_id: 1,
            region_size: 4096,
            capacity: 4096,
        }
        .encode();
        for (off, val) in [
            (OFF_RESERVED_ROLE, 1u64),
            (OFF_RESERVED_ROLE, 9),
            (OFF_CAPACITY, 5000),
            (OFF_DATA_OFFSET, 0),
            (OFF_REGION_SIZE, 0),
            (OFF_NODE_ID, 0),
            (OFF_FLAGS, 1),
        ] {
            let mut b = good;
            if off == OFF_RESERVED_ROLE || off == OFF_FLAGS {
                put_u32(&mut b, off, val as u32);
            } else {
                put_u64(&mut b, off, val);
            }
            let crc = crc32c::crc32c(&b[HEADER_CRC_FROM..]);
            put_u32(&mut b, OFF_HEADER_CRC, crc);
            assert!(
                matches!(StaticHeader::decode(&b), Err(StaticError::Field(_))),
                "field at {off} = {val} accepted"
            );
        }
    }

    #[test]
    fn meta_slot_round_trips_and_its_crc_covers_every_byte() {
        let m = meta();
        let b = m.encode();
        assert_eq!(Meta::valid_generation(&b), Some(9));
        assert_eq!(Meta::decode(&b), Ok(m.clone()));
        // A full history fills the slot exactly.
        let full = Meta {
            current_term: 100,
            history: history(&(1..=60u64).map(|t| (t, t * 10)).collect::<Vec<_>>()),
            ..m
        };
        let b = full.encode();
        assert_eq!(Meta::decode(&b), Ok(full));
        for i in 0..META_SLOT_BYTES {
            let mut bad = b;
            bad[i] ^= 0x20;
            assert_eq!(Meta::valid_generation(&bad), None, "byte {i}");
        }
        // Never written.
        assert_eq!(Meta::valid_generation(&[0u8; META_SLOT_BYTES]), None);
    }

    #[test]
    fn meta_slot_fields_are_checked_even_with_a_valid_crc() {
        let good = meta().encode();
        let field_of = |patch: &dyn Fn(&mut [u8; META_SLOT_BYTES])| {
            let mut b = good;
            patch(&mut b);
            reseal(&mut b);
            assert!(Meta::valid_generation(&b).is_some());
            Meta::decode(&b).unwrap_err().field
        };
        assert_eq!(field_of(&|b| put_u32(b, META_ROLE, 0)), "role");
        assert_eq!(field_of(&|b| put_u32(b, META_ROLE, 5)), "role");
        // Roles 3 and 4: superseded primary and backup.
        for (code, role) in [(3, Role::Primary), (4, Role::Backup)] {
            let mut b = good;
            put_u32(&mut b, META_ROLE, code);
            reseal(&mut b);
            let m = Meta::decode(&b).unwrap();
            assert_eq!((m.role, m.superseded), (role, true));
            assert!(Meta::decode(&m.encode()).unwrap().superseded);
        }
        assert_eq!(
            field_of(&|b| put_u32(b, META_ENTRY_COUNT, 61)),
            "term_history"
        );
        // Second entry (7, 30) turned into (1, 30): backwards.
        assert_eq!(
            field_of(&|b| put_u64(b, META_ENTRIES + 16, 1)),
            "term_history"
        );
        // First entry's term 0.
        assert_eq!(field_of(&|b| put_u64(b, META_ENTRIES, 0)), "term_history");
        assert_eq!(
            field_of(&|b| put_u64(b, META_CURRENT_TERM, 6)),
            "current_term"
        );
    }

    #[test]
    fn crc32c_is_the_castagnoli_crc_named_in_the_spec() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Continuing a crc over pieces equals the crc of the whole.
        let a = crc32c::crc32c_append(crc32c::crc32c(b"1234"), b"56789");
        assert_eq!(a, 0xE306_9283);
    }

    #[test]
    fn layout_constants_match_the_spec() {
        // The numbers here are the ones written in docs/FORMAT.md; changing one is a format change.
        assert_eq!(&QUEUE_MAGIC, b"LMIRQUE\0");
        assert_eq!(FORMAT_VERSION, 2);
        assert_eq!(RECORD_MAGIC.to_le_bytes(), *b"LMR1");
        assert_eq!(HEADER_BYTES, 4096);
        assert_eq!(RECORD_HEADER_BYTES, 56);
        assert_eq!(OFF_RESERVED_ROLE, 48);
        assert_eq!(META_SLOT_OFF, [1024, 2048]);
        assert_eq!(META_SLOT_BYTES, 1024);
        assert_eq!(
            [
                META_GEN,
                META_PEER,
                META_APPLIED,
                META_EPOCH,
                META_CURRENT_TERM,
                META_ROLE,
                META_ENTRY_COUNT,
                META_CRC,
                META_ENTRIES
            ],
            [0, 8, 16, 24, 32, 40, 44, 48, 64]
        );
        assert_eq!(META_ENTRIES + MAX_TERM_ENTRIES * 16, META_SLOT_BYTES);
        assert_eq!(
            [
                OFF_SCAN_START,
                OFF_TRIMMED_THROUGH,
                OFF_HEAD,
                OFF_TAIL,
                OFF_NEXT_SEQ
            ],
            [192, 200, 208, 216, 224]
        );
        assert_eq!(CURSOR_LINE, (192, 64));
        assert_eq!(max_payload(4096), 1024 - 56);
        assert_eq!(max_record_bytes(1 << 40), MAX_RECORD_BYTES);
        // Encoded record header fields sit where the spec says.
        let h = RecHeader {
            kind: Kind::Data,
            payload_len: 0x0102_0304,
            seq: 0x1111,
            vpos: 0x2222,
            region_offset: 0x3333,
            epoch: 0x4444,
            term: 0x5555,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"LMR1");
        assert_eq!(&b[8..10], &[1, 0]);
        assert_eq!(&b[12..16], &[4, 3, 2, 1]);
        assert_eq!(u64_at(&b, 16), 0x1111);
        assert_eq!(u64_at(&b, 24), 0x2222);
        assert_eq!(u64_at(&b, 32), 0x3333);
        assert_eq!(u64_at(&b, 40), 0x4444);
        assert_eq!(u64_at(&b, 48), 0x5555);
        // Encoded metadata slot fields too.
        let b = meta().encode();
        assert_eq!(u64_at(&b, 0), 9);
        assert_eq!(u64_at(&b, 8), 22);
        assert_eq!(u64_at(&b, 16), 31);
        assert_eq!(u64_at(&b, 24), 4);
        assert_eq!(u64_at(&b, 32), 7);
        assert_eq!(u32_at(&b, 40), 2);
        assert_eq!(u32_at(&b, 44), 2);
        assert_eq!(u32_at(&b, 52), 0);
        assert_eq!(u64_at(&b, 56), 29, "alone_from");
        assert_eq!([u64_at(&b, 64), u64_at(&b, 72)], [2, 5]);
        assert_eq!([u64_at(&b, 80), u64_at(&b, 88)], [7, 30]);
        assert!(b[96..].iter().all(|&x| x == 0));
    }

    #[test]
    fn check_header_rejects_garbage_without_panicking() {
        let l = lim();
        // Every single-byte value at every header position, on top of a valid header.
        let good = RecHeader {
            kind: Kind::Data,
            payload_len: 10,
            seq: 5,
            vpos: 4096 + 64,
            region_offset: 0,
            epoch: 1,
            term: 1,
        }
        .encode();
        assert!(check_header(&good, 4096 + 64, &l).is_ok());
        for i in 0..HDR {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good;
                b[i] = v;
                let _ = check_header(&b, 4096 + 64, &l);
            }
        }
        // Wrong lap.
        assert_eq!(check_header(&good, 64, &l), Err(CutReason::StalePosition));
        // Does not fit before the end of the data area.
        let near_end = RecHeader {
            vpos: 4096 - 56,
            ..RecHeader::decode_for_test(&good)
        }
        .encode();
        assert_eq!(
            check_header(&near_end, 4096 - 56, &l),
            Err(CutReason::BadLength)
        );
        // Region range overflow.
        let wild = RecHeader {
            region_offset: u64::MAX,
            ..RecHeader::decode_for_test(&good)
        }
        .encode();
        assert_eq!(
            check_header(&wild, 4096 + 64, &l),
            Err(CutReason::BadLength)
        );
    }

    #[test]
    fn the_term_must_fit_the_record_kind() {
        let l = lim();
        let data = RecHeader {
            kind: Kind::Data,
            payload_len: 10,
            seq: 5,
            vpos: 64,
            region_offset: 0,
            epoch: 1,
            term: 3,
        };
        assert!(check_header(&data.encode(), 64, &l).is_ok());
        let untermed = RecHeader { term: 0, ..data };
        assert_eq!(
            check_header(&untermed.encode(), 64, &l),
            Err(CutReason::BadKind)
        );
        let reset = RecHeader {
            kind: Kind::Reset,
            payload_len: 0,
            ..data
        };
        assert_eq!(
            check_header(&reset.encode(), 64, &l),
            Err(CutReason::BadKind)
        );
        assert!(check_header(&RecHeader { term: 0, ..reset }.encode(), 64, &l).is_ok());
    }

    impl RecHeader {
        fn decode_for_test(b: &[u8; HDR]) -> RecHeader {
            RecHeader {
                kind: Kind::from_u16(u16::from_le_bytes([b[8], b[9]])).unwrap(),
                payload_len: u32_at(b, REC_LEN),
                seq: u64_at(b, REC_SEQ),
                vpos: u64_at(b, REC_VPOS),
                region_offset: u64_at(b, REC_OFFSET),
                epoch: u64_at(b, REC_EPOCH),
                term: u64_at(b, REC_TERM),
            }
        }
    }
}
