//! Typed errors. Each variant says whose fault it is (the environment, the file on disk, or the
//! caller) and carries the path when a file is involved.

use std::fmt;
use std::io;
use std::path::PathBuf;

use mirror_proto::TermHistoryError;

/// Errors from the queue and region files.
///
/// Grouped by whose fault it is:
/// - environment: [`Io`](Self::Io), [`Locked`](Self::Locked), [`NotDax`](Self::NotDax),
///   [`Unsupported`](Self::Unsupported);
/// - the file on disk: [`BadMagic`](Self::BadMagic),
///   [`UnsupportedVersion`](Self::UnsupportedVersion),
///   [`HeaderChecksum`](Self::HeaderChecksum), [`MetaChecksum`](Self::MetaChecksum),
///   [`CorruptMeta`](Self::CorruptMeta), [`CorruptHeader`](Self::CorruptHeader),
///   [`CorruptRecord`](Self::CorruptRecord), [`BitmapDamaged`](Self::BitmapDamaged);
/// - configuration: [`AlreadyExists`](Self::AlreadyExists),
///   [`RegionSizeMismatch`](Self::RegionSizeMismatch),
///   [`BitmapMismatch`](Self::BitmapMismatch);
/// - the caller: [`SeqOutOfOrder`](Self::SeqOutOfOrder), [`PayloadSize`](Self::PayloadSize),
///   [`ResetBackwards`](Self::ResetBackwards), [`OutOfRange`](Self::OutOfRange),
///   [`Term`](Self::Term), [`CurrentTermBackwards`](Self::CurrentTermBackwards),
///   [`TruncateBelowTrim`](Self::TruncateBelowTrim),
///   [`InvalidArgument`](Self::InvalidArgument);
/// - flow control, not a fault: [`Full`](Self::Full).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A system call on `path` failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// File the operation was on.
        path: PathBuf,
        /// What was being done (`"open"`, `"mmap"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `create` found a file already at `path`.
    #[error("{}: already exists (refusing to overwrite it)", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Another handle (in this or another process) has the file open for writing.
    #[error("{}: already open for writing by another handle or process (exclusive flock held)", path.display())]
    Locked {
        /// The locked file.
        path: PathBuf,
    },
    /// The file does not start with the queue magic: it is not a libmirror queue file.
    #[error("{}: not a libmirror queue file (magic {found:02x?}, expected \"LMIRQUE\\0\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes found (zero-filled if the file is shorter).
        found: [u8; 8],
    },
    /// The queue file was written in a format version this build does not read.
    #[error("{}: queue format version {found} is not supported (this build reads version {supported})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// The immutable header block fails its crc32c: the header is damaged.
    #[error("{}: queue header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is damaged", path.display())]
    HeaderChecksum {
        /// The file.
        path: PathBuf,
        /// crc stored in the header.
        stored: u32,
        /// crc computed over the header bytes.
        computed: u32,
    },
    /// Neither metadata slot (peer id, applied_through, epoch, role, terms) passes its crc32c.
    #[error("{}: both queue metadata slots fail their checksum: the header is damaged", path.display())]
    MetaChecksum {
        /// The file.
        path: PathBuf,
    },
    /// The current metadata slot passes its crc32c but one of its fields is invalid (written by
    /// a faulty writer, or damaged and re-checksummed): the queue cannot be trusted.
    #[error("queue {}: metadata field {field} is invalid: {why}", path.display())]
    CorruptMeta {
        /// The file.
        path: PathBuf,
        /// The field: `"role"`, `"term_history"` or `"current_term"`.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A header field or the file size is inconsistent.
    #[error("{}: corrupt queue header: {why}", path.display())]
    CorruptHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The region size in the file (queue header, or region file length) differs from the
    /// configured one.
    #[error("{}: region size in the file is {file} bytes, but {expected} bytes are configured", path.display())]
    RegionSizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size according to the file.
        file: u64,
        /// Size the caller asked for.
        expected: u64,
    },
    /// No room for the record now; trim (after the peer confirms) and retry. Not a fault.
    #[error("queue full: the record needs {needed} bytes, {free} bytes are free")]
    Full {
        /// Bytes the append needs (record, plus the pad to the end of the ring if it wraps).
        needed: u64,
        /// Bytes free now.
        free: u64,
    },
    /// `append` was given a sequence number other than `next_seq()`.
    #[error("append out of order: expected seq {expected}, got {got}")]
    SeqOutOfOrder {
        /// The seq the queue expects (`next_seq()`).
        expected: u64,
        /// The seq passed in.
        got: u64,
    },
    /// Payload empty or larger than `max_payload()`.
    #[error("payload of {len} bytes refused: must be 1..={max} bytes")]
    PayloadSize {
        /// Length passed in.
        len: usize,
        /// `max_payload()` of this queue.
        max: usize,
    },
    /// `reset_to` may only move `next_seq` forwards.
    #[error(
        "reset_to({requested}) refused: next_seq is already {current} and never goes backwards"
    )]
    ResetBackwards {
        /// Current `next_seq()`.
        current: u64,
        /// The value passed in.
        requested: u64,
    },
    /// `append` was given a term that the queue's term history refuses (lower than the log's
    /// last term, a new term that would not start after the last one, term 0, or a history
    /// already holding the maximum number of entries). Nothing was written.
    #[error("{}: append refused by the term history: {source}", path.display())]
    Term {
        /// The queue file.
        path: PathBuf,
        /// The rule the append breaks.
        #[source]
        source: TermHistoryError,
    },
    /// `set_current_term` may only raise the current term.
    #[error("set_current_term({requested}) refused: the current term is already {current} and terms never go backwards")]
    CurrentTermBackwards {
        /// Current term.
        current: u64,
        /// The value passed in.
        requested: u64,
    },
    /// `truncate_after` was asked to keep the log through a seq whose records are already
    /// gone (trimmed, or skipped by a reset): it cannot be the point two logs have in common.
    #[error("truncate_after({requested}) refused: the records through seq {trimmed_through} are already gone (trimmed), so seq {requested} cannot be where the log is cut")]
    TruncateBelowTrim {
        /// The seq passed in.
        requested: u64,
        /// The highest seq already gone: `first_seq - 1`, or `last_seq` for an empty queue.
        trimmed_through: u64,
    },
    /// A byte range does not fit in the region (checked without overflow).
    #[error("range at offset {offset} with length {len} exceeds the region size of {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// A record in the live part of the queue fails verification when read back.
    #[error("{}: corrupt record at data-area offset {at}: {why}", path.display())]
    CorruptRecord {
        /// The queue file.
        path: PathBuf,
        /// Offset of the record inside the data area (not the file).
        at: u64,
        /// What failed.
        why: String,
    },
    /// `Durability::Pmem` needs a file on a DAX filesystem; the kernel refused `MAP_SYNC`.
    #[error("{}: durability \"pmem\" needs a file on a DAX filesystem (persistent memory mounted with -o dax); the kernel refused MAP_SYNC for this file", path.display())]
    NotDax {
        /// The file.
        path: PathBuf,
    },
    /// The requested feature does not exist on this platform.
    #[error("{what} is not supported on this platform")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
    /// A parameter is outside what this crate accepts (caller's fault).
    #[error("invalid argument: {why}")]
    InvalidArgument {
        /// What is wrong.
        why: String,
    },
    /// The dirty-chunk bitmap file is not one, or its header, its length or its current state
    /// slot breaks the format's rules (docs/FORMAT.md, "Dirty-chunk bitmap file"). Damage that
    /// an over-approximation repairs (a bit page, or both state slots, failing their crc) is
    /// not refused: the open rebuilds it and reports it. Deleting the file is only right while
    /// the pair is synchronous: a new bitmap starts all clear, forgetting the chunks it held.
    #[error("bitmap {}: {damage}: stop the pair while it is synchronous, delete {}, restart", path.display(), path.display())]
    BitmapDamaged {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong with it.
        damage: BitmapDamage,
    },
    /// The dirty-chunk bitmap was made for another node, region size or chunk size than the
    /// node is configured with: its bits mean other chunks.
    #[error("bitmap {} was made for {field} {file}, the node is configured with {configured}: {}", path.display(), mismatch_advice(field))]
    BitmapMismatch {
        /// The bitmap file.
        path: PathBuf,
        /// `"node_id"`, `"region_size"` or `"chunk_size"`.
        field: &'static str,
        /// The value in the file.
        file: u64,
        /// The value the node is configured with.
        configured: u64,
    },
}

/// What to do about a [`StorageError::BitmapMismatch`] on `field`.
fn mismatch_advice(field: &str) -> String {
    if field == "node_id" {
        // The node id is the queue's, not a configuration key.
        "the bitmap belongs to another queue: put that queue back, or delete the bitmap while \
         the pair is synchronous"
            .into()
    } else {
        format!("set {field} back, or delete the file while the pair is synchronous")
    }
}

/// Why a dirty-chunk bitmap file is refused ([`StorageError::BitmapDamaged`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitmapDamage {
    /// The file does not start with `"LMIRBMP\0"` (or is shorter than its 64-byte header).
    NotABitmap {
        /// The first 8 bytes found (zero-filled if the file is shorter).
        found: [u8; 8],
    },
    /// A format version this build does not read.
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The static block fails its crc32c.
    HeaderChecksum {
        /// crc stored in the header.
        stored: u32,
        /// crc computed over bytes 16..64.
        computed: u32,
    },
    /// A static-block field breaks its rule.
    Field(String),
    /// The file length is not the one its chunk count calls for.
    Length {
        /// Length of the file.
        found: u64,
        /// Length the header calls for.
        expected: u64,
    },
    /// The current state slot passes its crc but a field breaks its rule (written by a faulty
    /// writer, or damaged and checksummed again: nothing says which state is right).
    State(String),
}

impl fmt::Display for BitmapDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapDamage::NotABitmap { found } => write!(
                f,
                "not a dirty-chunk bitmap file (magic {found:02x?}, expected \"LMIRBMP\\0\")"
            ),
            BitmapDamage::UnsupportedVersion { found, supported } => write!(
                f,
                "bitmap format version {found} is not supported (this build reads version {supported})"
            ),
            BitmapDamage::HeaderChecksum { stored, computed } => write!(
                f,
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is damaged"
            ),
            BitmapDamage::Field(why) => write!(f, "corrupt header: {why}"),
            BitmapDamage::Length { found, expected } => write!(
                f,
                "file is {found} bytes, but its header calls for exactly {expected}: the file is corrupt"
            ),
            BitmapDamage::State(why) => write!(f, "corrupt state slot: {why}"),
        }
    }
}

impl StorageError {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: io::Error) -> Self {
        StorageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Why the recovery scan stopped before the tail recorded in the header.
///
/// The scan cannot tell a torn append (crash during the write) from a record damaged later
/// (bit rot): both end the log at that record. See "Recovery" in `docs/FORMAT.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CutReason {
    /// The record magic is wrong (torn, zeroed, or never written).
    BadMagic,
    /// Unknown record kind, a non-zero reserved field, or a term that does not fit the kind
    /// (0 on a DATA record, non-zero on a PAD or RESET record).
    BadKind,
    /// Length or region range out of bounds, or the record would cross the end of the ring.
    BadLength,
    /// The record belongs to an earlier lap of the ring (its stored position differs).
    StalePosition,
    /// The crc32c over the record does not match.
    Checksum,
    /// A DATA record's term contradicts the term history in the metadata, or is lower than the
    /// term of the DATA record before it: it is not part of the log the history describes (for
    /// example a record discarded by `truncate_after`).
    Term {
        /// The record's seq.
        seq: u64,
        /// The term it carries.
        found: u64,
        /// The term the history gives that seq; where the history does not reach down to it,
        /// the bound the record exceeds (the history's first term) or falls below (the previous
        /// record's term); 0 when the history is empty (a log without DATA records).
        expected: u64,
    },
    /// The sequence number does not continue the log.
    SeqGap {
        /// Seq the scan expected.
        expected: u64,
        /// Seq found.
        found: u64,
    },
    /// The record's epoch is older than its predecessor's, or newer than the header's: it was
    /// written before an earlier recovery cut the log here (a "ghost") or is garbage.
    Epoch {
        /// Epoch found in the record.
        found: u64,
    },
}

impl fmt::Display for CutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CutReason::BadMagic => f.write_str("bad record magic"),
            CutReason::BadKind => {
                f.write_str("unknown record kind, non-zero reserved field, or a term unfit for the kind")
            }
            CutReason::BadLength => f.write_str("record length or region range out of bounds"),
            CutReason::StalePosition => f.write_str("record from an earlier lap of the ring"),
            CutReason::Checksum => f.write_str("record checksum mismatch"),
            CutReason::SeqGap { expected, found } => {
                write!(f, "sequence gap: expected seq {expected}, found {found}")
            }
            CutReason::Epoch { found } => write!(f, "record epoch {found} out of order"),
            CutReason::Term {
                seq,
                found,
                expected,
            } => write!(
                f,
                "record seq {seq} carries term {found}, but the term history and the log before it call for term {expected}"
            ),
        }
    }
}
