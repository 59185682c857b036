//! The discarded-records file: where a node saves a divergent suffix of its queue before the
//! protocol drops it (docs/FORMAT.md, "Discarded-records file"). Nothing the repair removes is
//! lost without a trace: an operator can list the records, see which seqs, terms and byte
//! ranges they wrote, and take their bytes back.
//!
//! Layout (little-endian): a 64-byte header, then one entry per record, in seq order.
//!
//! ```text
//! header   0  8 magic "LMIRDIS\0"
//!          8  4 version (1)
//!         12  4 crc32c of header bytes 16..64
//!         16  8 node_id           the node that discarded them
//!         24  8 common_seq        the common point: every record here has a higher seq
//!         32  8 record_count
//!         40  8 payload_bytes     sum of the records' lengths
//!         48  8 saved_unix_ms     when it was written
//!         56  8 reserved (0)
//! entry    0  8 seq
//!          8  8 term
//!         16  8 region_offset
//!         24  4 len               1.. bytes of payload that follow the entry header
//!         28  4 crc32c of entry bytes 0..28 followed by the payload
//!         32 .. payload
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::StorageError;

/// Magic at byte 0 of a discarded-records file.
pub const DISCARDED_MAGIC: [u8; 8] = *b"LMIRDIS\0";
/// Its format version.
pub const DISCARDED_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const ENTRY_LEN: usize = 32;

/// One saved record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardedRecord {
    /// Its seq.
    pub seq: u64,
    /// Its term.
    pub term: u64,
    /// Where it wrote in the region.
    pub region_offset: u64,
    /// What it wrote.
    pub payload: Vec<u8>,
}

/// What a discarded-records file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardedFile {
    /// The file.
    pub path: PathBuf,
    /// The node that discarded the records.
    pub node_id: u64,
    /// The common point; every record has a higher seq.
    pub common_seq: u64,
    /// When it was saved (milliseconds since the Unix epoch).
    pub saved_unix_ms: u64,
    /// The records, in seq order.
    pub records: Vec<DiscardedRecord>,
}

/// The file a node with queue `queue` saves a suffix after `common_seq` to: beside the queue,
/// named after it, the common point and the time, so that several repairs never collide.
pub fn discarded_path(queue: &Path, common_seq: u64, saved_unix_ms: u64) -> PathBuf {
    let name = queue
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    queue.with_file_name(format!(
        "{name}.discarded-after-{common_seq}-{saved_unix_ms}"
    ))
}

/// Every discarded-records file beside `queue`, oldest name first.
pub fn list_discarded(queue: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let prefix = match queue.file_name() {
        Some(n) => format!("{}.discarded-after-", n.to_string_lossy()),
        None => return Ok(Vec::new()),
    };
    let dir = match queue.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let entries = fs::read_dir(&dir).map_err(|e| StorageError::io(&dir, "list", e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

fn entry_crc(head: &[u8; ENTRY_LEN], payload: &[u8]) -> u32 {
    mirror_proto::crc::crc32c_append(mirror_proto::crc::crc32c(&head[..28]), payload)
}

/// Writes the file durably (temporary name, fsync, rename, fsync of the directory): when it
/// returns, the records survive a power loss, so the caller may drop them from its queue.
pub fn save_discarded(
    path: &Path,
    node_id: u64,
    common_seq: u64,
    saved_unix_ms: u64,
    records: &[DiscardedRecord],
) -> Result<(), StorageError> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&DISCARDED_MAGIC);
    header[8..12].copy_from_slice(&DISCARDED_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&node_id.to_le_bytes());
    header[24..32].copy_from_slice(&common_seq.to_le_bytes());
    header[32..40].copy_from_slice(&(records.len() as u64).to_le_bytes());
    let bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
    header[40..48].copy_from_slice(&bytes.to_le_bytes());
    header[48..56].copy_from_slice(&saved_unix_ms.to_le_bytes());
    let crc = mirror_proto::crc::crc32c(&header[16..]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());

    let tmp = path.with_extension("tmp");
    let io = |what: &'static str| move |e| StorageError::io(path, what, e);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("create"))?;
    let mut out = BufWriter::new(file);
    out.write_all(&header).map_err(io("write"))?;
    for r in records {
        let mut head = [0u8; ENTRY_LEN];
        head[..8].copy_from_slice(&r.seq.to_le_bytes());
        head[8..16].copy_from_slice(&r.term.to_le_bytes());
        head[16..24].copy_from_slice(&r.region_offset.to_le_bytes());
        let len = u32::try_from(r.payload.len()).map_err(|_| StorageError::CorruptHeader {
            path: path.to_path_buf(),
            why: format!("record {} is larger than 4 GiB", r.seq),
        })?;
        head[24..28].copy_from_slice(&len.to_le_bytes());
        let crc = entry_crc(&head, &r.payload);
        head[28..32].copy_from_slice(&crc.to_le_bytes());
        out.write_all(&head).map_err(io("write"))?;
        out.write_all(&r.payload).map_err(io("write"))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| StorageError::io(path, "write", e.into_error()))?;
    file.sync_all().map_err(io("fsync"))?;
    fs::rename(&tmp, path).map_err(io("rename"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(dir, "fsync directory", e))?;
    }
    Ok(())
}

/// The common point of a repair that saved a divergent suffix and did not finish: `queue`
/// still holds that suffix's first record (the same seq with the same term; a finished repair
/// replaced it with the primary's record of a newer term). Such a node holds part of the
/// primary's bytes in its region while its log still holds the suffix, so it must not start a
/// history of its own (be promoted, or opened as a primary) before a primary finishes the
/// repair. A file that cannot be read says nothing and is skipped.
pub fn unfinished_repair(queue: &crate::PersistentQueue) -> Option<u64> {
    let files = list_discarded(queue.path()).ok()?;
    files.iter().find_map(|path| {
        let file = read_discarded(path).ok()?;
        let first = file.records.first()?;
        let still_held = first.seq <= queue.last_seq()
            && queue.term_history().term_at(first.seq) == Some(first.term);
        still_held.then_some(file.common_seq)
    })
}

/// Reads and verifies a discarded-records file (magic, version, crcs, lengths).
pub fn read_discarded(path: &Path) -> Result<DiscardedFile, StorageError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| StorageError::io(path, "read", e))?;
    let corrupt = |why: String| StorageError::CorruptHeader {
        path: path.to_path_buf(),
        why,
    };
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if bytes.len() < HEADER_LEN || bytes[..8] != DISCARDED_MAGIC {
        return Err(corrupt("not a discarded-records file (magic)".into()));
    }
    let version = u32_at(&bytes, 8);
    if version != DISCARDED_VERSION {
        return Err(StorageError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: DISCARDED_VERSION,
        });
    }
    if u32_at(&bytes, 12) != mirror_proto::crc::crc32c(&bytes[16..HEADER_LEN]) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let count = u64_at(&bytes, 32);
    let mut records = Vec::new();
    let mut pos = HEADER_LEN;
    for i in 0..count {
        if bytes.len() < pos + ENTRY_LEN {
            return Err(corrupt(format!("entry {i} is cut short")));
        }
        let head: [u8; ENTRY_LEN] = bytes[pos..pos + ENTRY_LEN].try_into().expect("32 bytes");
        let len = u32_at(&head, 24) as usize;
        let body = pos + ENTRY_LEN;
        if bytes.len() < body + len {
            return Err(corrupt(format!("entry {i} is cut short")));
        }
        let payload = bytes[body..body + len].to_vec();
        if u32_at(&head, 28) != entry_crc(&head, &payload) {
            return Err(corrupt(format!("entry {i} checksum mismatch")));
        }
        records.push(DiscardedRecord {
            seq: u64_at(&head, 0),
            term: u64_at(&head, 8),
            region_offset: u64_at(&head, 16),
            payload,
        });
        pos = body + len;
    }
    if pos != bytes.len() {
        return Err(corrupt(format!(
            "{} bytes after the last entry",
            bytes.len() - pos
        )));
    }
    Ok(DiscardedFile {
        path: path.to_path_buf(),
        node_id: u64_at(&bytes, 16),
        common_seq: u64_at(&bytes, 24),
        saved_unix_ms: u64_at(&bytes, 48),
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_suffix_reads_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("b.queue");
        let path = discarded_path(&queue, 41, 1234);
        let records = vec![
            DiscardedRecord {
                seq: 42,
                term: 1,
                region_offset: 8,
                payload: b"lost".to_vec(),
            },
            DiscardedRecord {
                seq: 43,
                term: 1,
                region_offset: 100,
                payload: vec![7; 300],
            },
        ];
        save_discarded(&path, 9, 41, 1234, &records).unwrap();
        assert_eq!(list_discarded(&queue).unwrap(), vec![path.clone()]);
        let back = read_discarded(&path).unwrap();
        assert_eq!((back.node_id, back.common_seq), (9, 41));
        assert_eq!(back.records, records);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_discarded(&path),
            Err(StorageError::CorruptHeader { .. })
        ));
    }
}
