//! The dirty-chunk bitmap file: which chunks of the region a node must resync, kept across
//! crashes (docs/FORMAT.md, "Dirty-chunk bitmap file (version 1)").
//!
//! A primary whose queue fills while its backup is away *folds* the oldest records into this
//! bitmap (marks the chunks they wrote, durably) and then trims them from the queue; when the
//! backup returns, the dirty chunks are resynced. A backup uses the same file to remember that
//! a resync or catch-up into it has not finished (its region is inconsistent until it does).
//!
//! Layout (little-endian; the byte tables are in FORMAT.md):
//!
//! ```text
//! 0     64   static block: magic "LMIRBMP\0", version 1, crc, node_id, region_size,
//!            chunk_size, chunk_count (written once at creation)
//! 1024  64   state slot A  } generation, covers_from, resync_target, peer, crc: the valid
//! 2048  64   state slot B  } slot with the larger generation is current
//! 4096  4096 × pages: bit pages, each crc32c (4 bytes) + 4092 bytes of bits (32736 chunks)
//! ```
//!
//! Crash safety, in short: bits are set in the mapping and the touched pages made durable
//! before [`DirtyBitmap::mark`] returns; a page torn by a crash fails its crc and the next open
//! takes every chunk of it as dirty (an over-approximation: those chunks are compared by
//! checksum and resent if they differ). Clears are not synced: losing one resends a chunk. The
//! state slots are written alternately, each durable before the other may be rewritten (the
//! queue's metadata-slot discipline); both invalid is rebuilt as the most conservative state.
//!
//! The in-memory [`ChunkSet`] is the truth while the file is open: every page written is
//! rendered from it, so the file's bits are always a function of it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mirror_proto::{ChunkGeometry, ChunkSet};

use crate::map::{self, Mapping};
use crate::{BitmapDamage, Durability, StorageError};

/// Magic at byte 0 of a dirty-chunk bitmap file.
pub const BITMAP_MAGIC: [u8; 8] = *b"LMIRBMP\0";
/// The bitmap file format version this build reads and writes.
pub const BITMAP_VERSION: u32 = 1;
/// Size of one bit page, and file offset of the first one.
pub const BITMAP_PAGE_BYTES: u64 = 4096;
/// Chunks one bit page holds: 8 per byte of its 4092 bytes after the page crc.
pub const BITMAP_CHUNKS_PER_PAGE: u64 = (BITMAP_PAGE_BYTES - PAGE_CRC_BYTES as u64) * 8;

// ---- static block: bytes 0..64, written once, covered by the header crc ----
const STATIC_BYTES: usize = 64;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_CRC: usize = 12;
const OFF_NODE_ID: usize = 16;
const OFF_REGION_SIZE: usize = 24;
const OFF_CHUNK_SIZE: usize = 32;
const OFF_CHUNK_COUNT: usize = 40;
const OFF_STATIC_RESERVED: usize = 48;
const HEADER_CRC_FROM: usize = 16;

// ---- state slots: A at 1024, B at 2048, 64 bytes each, self-checksummed ----
const SLOT_OFF: [usize; 2] = [1024, 2048];
const SLOT_BYTES: usize = 64;
const SLOT_GEN: usize = 0;
const SLOT_COVERS_FROM: usize = 8;
const SLOT_RESYNC_TARGET: usize = 16;
const SLOT_FLAGS: usize = 20;
const SLOT_PEER: usize = 24;
const SLOT_RESERVED: usize = 32;
/// crc32c of slot bytes `0..SLOT_CRC`.
const SLOT_CRC: usize = 60;

// ---- bit pages ----
const PAGES_OFF: u64 = BITMAP_PAGE_BYTES;
const PAGE: usize = BITMAP_PAGE_BYTES as usize;
const PAGE_CRC_BYTES: usize = 4;
/// Pages written per `pwrite` at creation (256 KiB).
const CREATE_BATCH_PAGES: usize = 64;
/// How often `inspect_bitmap` rereads what a live writer may be rewriting before calling it
/// damaged.
const INSPECT_RETRIES: usize = 8;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The bitmap file of the queue at `queue`: beside it, its name + `.bitmap`
/// (`node.queue` → `node.queue.bitmap`).
pub fn bitmap_path(queue: &Path) -> PathBuf {
    let mut name = queue.file_name().unwrap_or_default().to_os_string();
    name.push(".bitmap");
    queue.with_file_name(name)
}

/// Bit pages a bitmap of `chunk_count` chunks has.
fn pages_for(chunk_count: u64) -> u64 {
    chunk_count.div_ceil(BITMAP_CHUNKS_PER_PAGE)
}

/// Exact file length of a bitmap of `chunk_count` chunks (no overflow: `chunk_count` is at
/// most `u64::MAX / 4096 + 1`, so there are fewer than 2^38 pages).
fn file_len_for(chunk_count: u64) -> u64 {
    PAGES_OFF + pages_for(chunk_count) * BITMAP_PAGE_BYTES
}

fn page_off(page: u64) -> usize {
    (PAGES_OFF + page * BITMAP_PAGE_BYTES) as usize
}

/// The chunks of bit page `page`.
fn page_chunks(page: u64, chunk_count: u64) -> Range<u64> {
    let first = page * BITMAP_CHUNKS_PER_PAGE;
    first..(first + BITMAP_CHUNKS_PER_PAGE).min(chunk_count)
}

/// The static block: whose bitmap, of which geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StaticBlock {
    node_id: u64,
    geometry: ChunkGeometry,
}

impl StaticBlock {
    fn encode(&self) -> [u8; STATIC_BYTES] {
        let mut b = [0u8; STATIC_BYTES];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&BITMAP_MAGIC);
        put_u32(&mut b, OFF_VERSION, BITMAP_VERSION);
        put_u64(&mut b, OFF_NODE_ID, self.node_id);
        put_u64(&mut b, OFF_REGION_SIZE, self.geometry.region_size());
        put_u64(&mut b, OFF_CHUNK_SIZE, self.geometry.chunk_size());
        put_u64(&mut b, OFF_CHUNK_COUNT, self.geometry.chunk_count());
        let crc = mirror_proto::crc::crc32c(&b[HEADER_CRC_FROM..]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Checks in the order magic, version, crc, fields (as the queue's static block).
    fn decode(b: &[u8; STATIC_BYTES]) -> Result<Self, BitmapDamage> {
        let found: [u8; 8] = b[OFF_MAGIC..OFF_MAGIC + 8].try_into().expect("8 bytes");
        if found != BITMAP_MAGIC {
            return Err(BitmapDamage::NotABitmap { found });
        }
        let version = u32_at(b, OFF_VERSION);
        if version != BITMAP_VERSION {
            return Err(BitmapDamage::UnsupportedVersion {
                found: version,
                supported: BITMAP_VERSION,
            });
        }
        let stored = u32_at(b, OFF_HEADER_CRC);
        let computed = mirror_proto::crc::crc32c(&b[HEADER_CRC_FROM..]);
        if stored != computed {
            return Err(BitmapDamage::HeaderChecksum { stored, computed });
        }
        let field = |why: String| BitmapDamage::Field(why);
        let node_id = u64_at(b, OFF_NODE_ID);
        if node_id == 0 {
            return Err(field("node_id 0".into()));
        }
        let region_size = u64_at(b, OFF_REGION_SIZE);
        if region_size == 0 {
            return Err(field("region_size 0".into()));
        }
        let geometry = ChunkGeometry::new(region_size, u64_at(b, OFF_CHUNK_SIZE))
            .map_err(|e| field(e.to_string()))?;
        let chunk_count = u64_at(b, OFF_CHUNK_COUNT);
        if chunk_count != geometry.chunk_count() {
            return Err(field(format!(
                "chunk_count {chunk_count}, but region_size {region_size} in chunks of {} \
                 bytes makes {}",
                geometry.chunk_size(),
                geometry.chunk_count()
            )));
        }
        if b[OFF_STATIC_RESERVED..].iter().any(|&x| x != 0) {
            return Err(field(format!(
                "reserved bytes {OFF_STATIC_RESERVED}..{STATIC_BYTES} are not zero"
            )));
        }
        Ok(StaticBlock { node_id, geometry })
    }
}

/// Contents of one state slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    /// The valid slot with the larger generation is current; 0 = never written.
    generation: u64,
    /// The first queue seq folded into the bits since the last completed resync (0: none).
    covers_from: u64,
    /// `Some(primary)` while this node is the target of an unfinished resync (its region is
    /// inconsistent); the primary's node id, 0 if unknown.
    resync_target: Option<u64>,
}

impl State {
    /// What both slots invalid is taken as: every chunk dirty, and an unfinished resync from an
    /// unknown primary (whatever was going on must complete again).
    const REBUILT: State = State {
        generation: 0,
        covers_from: 1,
        resync_target: Some(0),
    };

    fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        put_u64(&mut b, SLOT_GEN, self.generation);
        put_u64(&mut b, SLOT_COVERS_FROM, self.covers_from);
        put_u32(
            &mut b,
            SLOT_RESYNC_TARGET,
            u32::from(self.resync_target.is_some()),
        );
        put_u64(&mut b, SLOT_PEER, self.resync_target.unwrap_or(0));
        let crc = mirror_proto::crc::crc32c(&b[..SLOT_CRC]);
        put_u32(&mut b, SLOT_CRC, crc);
        b
    }

    /// The generation of a slot that verifies (non-zero generation, crc matches); `None` for a
    /// slot never written, torn or damaged.
    fn valid_generation(b: &[u8]) -> Option<u64> {
        let generation = u64_at(b, SLOT_GEN);
        let ok =
            generation != 0 && u32_at(b, SLOT_CRC) == mirror_proto::crc::crc32c(&b[..SLOT_CRC]);
        ok.then_some(generation)
    }

    /// The fields of a slot that verified, checked against their rules.
    fn decode(b: &[u8]) -> Result<Self, String> {
        let target = u32_at(b, SLOT_RESYNC_TARGET);
        let peer = u64_at(b, SLOT_PEER);
        let resync_target = match target {
            0 if peer != 0 => {
                return Err(format!("peer {peer} while not a resync target (must be 0)"))
            }
            0 => None,
            1 => Some(peer),
            _ => return Err(format!("resync_target {target} (must be 0 or 1)")),
        };
        let flags = u32_at(b, SLOT_FLAGS);
        if flags != 0 {
            return Err(format!("flags {flags:#x} (version 1 defines none)"));
        }
        if b[SLOT_RESERVED..SLOT_CRC].iter().any(|&x| x != 0) {
            return Err(format!(
                "reserved bytes {SLOT_RESERVED}..{SLOT_CRC} are not zero"
            ));
        }
        Ok(State {
            generation: u64_at(b, SLOT_GEN),
            covers_from: u64_at(b, SLOT_COVERS_FROM),
            resync_target,
        })
    }
}

/// Picks the current slot out of the first 4096 bytes of the file: `Ok(None)` when neither
/// verifies, [`BitmapDamage::State`] when the current one verifies with a field out of rule.
fn choose_state(head: &[u8]) -> Result<Option<(State, usize)>, BitmapDamage> {
    let slot = |i: usize| &head[SLOT_OFF[i]..SLOT_OFF[i] + SLOT_BYTES];
    let best = (0..2)
        .filter_map(|i| State::valid_generation(slot(i)).map(|g| (g, i)))
        .max();
    let Some((_, i)) = best else {
        return Ok(None);
    };
    let state = State::decode(slot(i)).map_err(BitmapDamage::State)?;
    Ok(Some((state, i)))
}

/// The crc a page stores: crc32c of its bytes after the crc field.
fn page_crc(page: &[u8]) -> u32 {
    mirror_proto::crc::crc32c(&page[PAGE_CRC_BYTES..])
}

/// Whether bit page `index` verifies: its crc matches and no bit past `chunk_count` is set.
fn page_verifies(page: &[u8], index: u64, chunk_count: u64) -> bool {
    debug_assert_eq!(page.len(), PAGE);
    if u32_at(page, 0) != page_crc(page) {
        return false;
    }
    let chunks = page_chunks(index, chunk_count);
    let used = chunks.end - chunks.start;
    let bits = &page[PAGE_CRC_BYTES..];
    let full = (used / 8) as usize;
    let partial = (used % 8) as u32;
    let tail_ok = partial == 0 || bits[full] >> partial == 0;
    let rest_from = full + usize::from(partial != 0);
    tail_ok && bits[rest_from..].iter().all(|&x| x == 0)
}

/// Adds the chunks set in verified bit page `index` to `set`.
fn load_page(page: &[u8], index: u64, set: &mut ChunkSet) {
    let base = index * BITMAP_CHUNKS_PER_PAGE;
    for (j, &byte) in page[PAGE_CRC_BYTES..].iter().enumerate() {
        let mut bits = byte;
        while bits != 0 {
            let b = bits.trailing_zeros();
            set.insert(base + 8 * j as u64 + u64::from(b));
            bits &= bits - 1;
        }
    }
}

/// Dirty chunks a verified page holds.
fn page_count(page: &[u8]) -> u64 {
    page[PAGE_CRC_BYTES..]
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum()
}

/// Writes bit page `index` from `set` into `out` (bits, then the crc over them).
fn render_page(set: &ChunkSet, index: u64, out: &mut [u8]) {
    assert_eq!(out.len(), PAGE, "a bit page is {PAGE} bytes");
    let base = index * BITMAP_CHUNKS_PER_PAGE;
    for (j, byte) in out[PAGE_CRC_BYTES..].iter_mut().enumerate() {
        *byte = bits_byte(set, base + 8 * j as u64);
    }
    let crc = page_crc(out);
    put_u32(out, 0, crc);
}

/// [`render_page`] after a change to `chunk`'s bit alone: its byte, then the crc (a resync
/// clears thousands of bits one by one; re-rendering a whole page each time cost more than
/// the chunk's transfer bookkeeping).
fn render_chunk_byte(set: &ChunkSet, chunk: u64, out: &mut [u8]) {
    assert_eq!(out.len(), PAGE, "a bit page is {PAGE} bytes");
    let base = chunk / BITMAP_CHUNKS_PER_PAGE * BITMAP_CHUNKS_PER_PAGE;
    let j = ((chunk - base) / 8) as usize;
    out[PAGE_CRC_BYTES + j] = bits_byte(set, base + 8 * j as u64);
    let crc = page_crc(out);
    put_u32(out, 0, crc);
}

/// The byte of a bit page that holds chunks `first..first + 8`. `first` is a multiple of 8
/// (so is a page's base: 32736 = 8 × 4092): the byte's 8 chunks sit in one word of the set.
/// Chunks past the set's capacity are never in it.
fn bits_byte(set: &ChunkSet, first: u64) -> u8 {
    set.words()
        .get((first / 64) as usize)
        .map_or(0, |w| (w >> (first % 64)) as u8)
}

/// Reads and checks the static block with pread (never through a mapping), then the file
/// length it calls for. Returns the block and the file length.
fn read_static(file: &File, path: &Path) -> Result<(StaticBlock, u64), StorageError> {
    let damaged = |damage| StorageError::BitmapDamaged {
        path: path.to_path_buf(),
        damage,
    };
    let file_len = file
        .metadata()
        .map_err(|e| StorageError::io(path, "stat", e))?
        .len();
    let mut b = [0u8; STATIC_BYTES];
    let avail = file_len.min(STATIC_BYTES as u64) as usize;
    file.read_exact_at(&mut b[..avail], 0)
        .map_err(|e| StorageError::io(path, "read header", e))?;
    if avail < STATIC_BYTES {
        // Too short to be a bitmap; say "not a bitmap" unless it starts like one.
        let found: [u8; 8] = b[..8].try_into().expect("8 bytes");
        return Err(damaged(if found == BITMAP_MAGIC {
            BitmapDamage::Length {
                found: file_len,
                expected: STATIC_BYTES as u64,
            }
        } else {
            BitmapDamage::NotABitmap { found }
        }));
    }
    let block = StaticBlock::decode(&b).map_err(damaged)?;
    let expected = file_len_for(block.geometry.chunk_count());
    if file_len != expected {
        return Err(damaged(BitmapDamage::Length {
            found: file_len,
            expected,
        }));
    }
    if usize::try_from(expected).is_err() {
        return Err(damaged(BitmapDamage::Field(format!(
            "a file of {expected} bytes does not fit this platform's address space"
        ))));
    }
    Ok((block, file_len))
}

/// Refuses a bitmap made for another node, region size or chunk size.
fn check_identity(
    path: &Path,
    block: &StaticBlock,
    node_id: u64,
    geometry: ChunkGeometry,
) -> Result<(), StorageError> {
    let pairs = [
        ("node_id", block.node_id, node_id),
        (
            "region_size",
            block.geometry.region_size(),
            geometry.region_size(),
        ),
        (
            "chunk_size",
            block.geometry.chunk_size(),
            geometry.chunk_size(),
        ),
    ];
    match pairs
        .into_iter()
        .find(|&(_, file, configured)| file != configured)
    {
        Some((field, file, configured)) => Err(StorageError::BitmapMismatch {
            path: path.to_path_buf(),
            field,
            file,
            configured,
        }),
        None => Ok(()),
    }
}

/// What opening a bitmap found and repaired. A node logs a warning when anything was rebuilt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapOpenReport {
    /// The file did not exist and was created (all clear, `covers_from` 0, not a target).
    pub created: bool,
    /// Bit pages that failed verification (a torn write, a bad sector) and were rewritten with
    /// every chunk of the page dirty.
    pub pages_rebuilt: u64,
    /// Both state slots failed verification: the state was rebuilt as every chunk dirty,
    /// `covers_from` 1, and a resync target of an unknown primary (`resync_target() ==
    /// Some(0)`).
    pub state_rebuilt: bool,
}

/// The persistent dirty-chunk bitmap of a node. See the module docs and `docs/FORMAT.md`.
///
/// One writer: the handle holds an exclusive `flock` on the file (a second open gets
/// [`StorageError::Locked`]). Dropping it does not sync (drop is indistinguishable from a
/// crash). After an error from a call that makes something durable, the handle's in-memory
/// state is unchanged for state-slot updates (a retry rewrites the same slot) and the pages
/// stay pending for the next sync.
pub struct DirtyBitmap {
    path: PathBuf,
    /// Holds the exclusive flock; used for fdatasync.
    file: File,
    map: Mapping,
    durability: Durability,
    geometry: ChunkGeometry,
    /// The dirty chunks; every page in the file is rendered from this set.
    dirty: ChunkSet,
    /// The current (durable) state and the slot holding it.
    state: State,
    state_slot: usize,
    /// Pages written since the last barrier (a set over page indexes).
    unsynced: ChunkSet,
    /// Some of those pages gained bits (a barrier failed, or is about to run): `mark` must
    /// sync even if it sets nothing new.
    sets_unsynced: bool,
    /// Test record of each barrier: the file offsets of the pages and slot it made durable.
    #[cfg(test)]
    pub(crate) barriers: Vec<Vec<usize>>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("geometry", &self.geometry)
            .field("dirty", &self.dirty)
            .field("covers_from", &self.state.covers_from)
            .field("resync_target", &self.state.resync_target)
            .finish()
    }
}

impl DirtyBitmap {
    /// Opens the bitmap at `path` or creates it (all clear, covers_from 0, not a target).
    ///
    /// An existing file is checked in the order magic, version, header crc, fields, length
    /// ([`StorageError::BitmapDamaged`]), then against `node_id` and `geometry`
    /// ([`StorageError::BitmapMismatch`]). Bit pages and state slots that fail their crc are
    /// rebuilt conservatively and reported, durable before this returns.
    pub fn open_or_create(
        path: &Path,
        node_id: u64,
        geometry: ChunkGeometry,
        durability: Durability,
    ) -> Result<(DirtyBitmap, BitmapOpenReport), StorageError> {
        map::check_platform(durability)?;
        if node_id == 0 {
            return Err(StorageError::InvalidArgument {
                why: "node_id 0 is reserved".into(),
            });
        }
        if geometry.region_size() == 0 {
            return Err(StorageError::InvalidArgument {
                why: "region_size must be greater than 0".into(),
            });
        }
        let open = || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| StorageError::io(path, "open", e))?;
            map::lock_exclusive(&file, path)?;
            Self::open_locked(path, file, node_id, geometry, durability)
        };
        match open() {
            Err(e) if e.is_not_found() => match Self::create(path, node_id, geometry, durability) {
                Ok(file) => {
                    let (bitmap, report) =
                        Self::open_locked(path, file, node_id, geometry, durability)?;
                    assert_eq!(report, BitmapOpenReport::default(), "a new bitmap is clean");
                    assert!(bitmap.dirty.is_empty() && bitmap.resync_target().is_none());
                    let report = BitmapOpenReport {
                        created: true,
                        ..report
                    };
                    Ok((bitmap, report))
                }
                // Lost a creation race: the other creator's file is there now.
                Err(StorageError::AlreadyExists { .. }) => open(),
                Err(e) => Err(e),
            },
            other => other,
        }
    }

    /// Builds a new file under a temporary name (every page with its crc, slot A generation 1),
    /// durable per mode, then hard-links it into place. Returns the file, locked.
    fn create(
        path: &Path,
        node_id: u64,
        geometry: ChunkGeometry,
        durability: Durability,
    ) -> Result<File, StorageError> {
        let tmp = crate::map::tmp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StorageError::io(&tmp, "create", e))?;
        let built = Self::build_new_file(&file, &tmp, path, node_id, geometry, durability);
        // The temporary name goes away whether or not the link happened.
        let _ = std::fs::remove_file(&tmp);
        built?;
        if durability != Durability::Process {
            map::sync_parent_dir(path)?;
        }
        Ok(file)
    }

    fn build_new_file(
        file: &File,
        tmp: &Path,
        path: &Path,
        node_id: u64,
        geometry: ChunkGeometry,
        durability: Durability,
    ) -> Result<(), StorageError> {
        map::lock_exclusive(file, tmp)?;
        let chunk_count = geometry.chunk_count();
        let len = file_len_for(chunk_count);
        if usize::try_from(len).is_err() {
            return Err(StorageError::InvalidArgument {
                why: format!("a bitmap of {chunk_count} chunks does not fit the address space"),
            });
        }
        map::allocate(file, len, tmp)?;
        let mut head = vec![0u8; PAGES_OFF as usize];
        let block = StaticBlock { node_id, geometry };
        head[..STATIC_BYTES].copy_from_slice(&block.encode());
        let state = State {
            generation: 1,
            covers_from: 0,
            resync_target: None,
        };
        head[SLOT_OFF[0]..SLOT_OFF[0] + SLOT_BYTES].copy_from_slice(&state.encode());
        file.write_all_at(&head, 0)
            .map_err(|e| StorageError::io(tmp, "write header", e))?;
        // Every page gets its crc: a zeroed page with crc 0 does not verify (the crc32c of
        // 4092 zero bytes is not 0), so it would be taken as damaged.
        let mut clear = vec![0u8; PAGE];
        let crc = page_crc(&clear);
        put_u32(&mut clear, 0, crc);
        let batch: Vec<u8> = clear.repeat(CREATE_BATCH_PAGES);
        let pages = pages_for(chunk_count);
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(CREATE_BATCH_PAGES as u64) as usize;
            file.write_all_at(&batch[..n * PAGE], page_off(page) as u64)
                .map_err(|e| StorageError::io(tmp, "write pages", e))?;
            page += n as u64;
        }
        if durability == Durability::Pmem {
            // Refuse a non-DAX file before the name appears at `path`.
            drop(Mapping::map_rw(file, len as usize, durability, path)?);
        }
        if durability != Durability::Process {
            file.sync_all()
                .map_err(|e| StorageError::io(tmp, "fsync", e))?;
        }
        std::fs::hard_link(tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StorageError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                StorageError::io(path, "link", e)
            }
        })
    }

    /// Opens a locked file: checks, maps, loads the pages and the state, rebuilds what fails
    /// verification (durably) and reports it.
    fn open_locked(
        path: &Path,
        file: File,
        node_id: u64,
        geometry: ChunkGeometry,
        durability: Durability,
    ) -> Result<(DirtyBitmap, BitmapOpenReport), StorageError> {
        let (block, len) = read_static(&file, path)?;
        check_identity(path, &block, node_id, geometry)?;
        let map = Mapping::map_rw(&file, len as usize, durability, path)?;
        let chosen = choose_state(map.bytes(0, PAGES_OFF as usize)).map_err(|damage| {
            StorageError::BitmapDamaged {
                path: path.to_path_buf(),
                damage,
            }
        })?;
        let chunk_count = geometry.chunk_count();
        let pages = pages_for(chunk_count);
        let (state, state_slot) = chosen.unwrap_or((State::REBUILT, 1));
        let mut bitmap = DirtyBitmap {
            path: path.to_path_buf(),
            file,
            map,
            durability,
            geometry,
            dirty: ChunkSet::new(chunk_count),
            state,
            state_slot,
            unsynced: ChunkSet::new(pages),
            sets_unsynced: false,
            #[cfg(test)]
            barriers: Vec::new(),
        };
        let mut report = BitmapOpenReport {
            pages_rebuilt: bitmap.load_pages(),
            ..BitmapOpenReport::default()
        };
        if chosen.is_none() {
            // Every chunk dirty first (durable), then the state that says a resync must run.
            bitmap.set_range(0..chunk_count);
            bitmap.barrier(None)?;
            bitmap.write_state(State::REBUILT)?;
            report.state_rebuilt = true;
        } else if report.pages_rebuilt > 0 {
            bitmap.barrier(None)?;
        }
        assert_eq!(bitmap.dirty.capacity(), chunk_count);
        assert!(!report.state_rebuilt || bitmap.dirty.len() == chunk_count);
        Ok((bitmap, report))
    }

    /// Loads every page that verifies into `dirty`; a page that does not is taken as all
    /// dirty and rewritten (not yet durable). Returns how many were rewritten.
    fn load_pages(&mut self) -> u64 {
        let chunk_count = self.geometry.chunk_count();
        let mut rebuilt = 0;
        for index in 0..pages_for(chunk_count) {
            let page = self.map.bytes(page_off(index), PAGE);
            if page_verifies(page, index, chunk_count) {
                load_page(page, index, &mut self.dirty);
            } else {
                self.dirty.insert_range(page_chunks(index, chunk_count));
                self.render(index);
                self.sets_unsynced = true;
                rebuilt += 1;
            }
        }
        rebuilt
    }

    /// Path of the bitmap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chunk geometry the bitmap was made for (and the node is configured with).
    pub fn geometry(&self) -> ChunkGeometry {
        self.geometry
    }

    /// The dirty chunks, as loaded/maintained (kept in memory in sync with the file).
    pub fn dirty(&self) -> &ChunkSet {
        &self.dirty
    }

    /// Sets the bits of every chunk in `chunks` (updating each touched page's crc) and makes
    /// the touched pages durable per the durability mode before returning. Returns how many
    /// were newly set. Cheap when all are already set (no sync).
    ///
    /// A range reaching past the last chunk is [`StorageError::InvalidArgument`]; the ranges
    /// before it are set and made durable all the same.
    pub fn mark(
        &mut self,
        chunks: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<u64, StorageError> {
        let chunk_count = self.geometry.chunk_count();
        let mut new = 0;
        let mut refused = None;
        for range in chunks {
            if range.start >= range.end {
                continue;
            }
            if range.end > chunk_count {
                refused = Some(range);
                break;
            }
            new += self.set_range(range);
        }
        if self.sets_unsynced {
            self.barrier(None)?;
        }
        match refused {
            Some(range) => Err(StorageError::InvalidArgument {
                why: format!("chunks {range:?} reach past the last chunk ({chunk_count} chunks)"),
            }),
            None => Ok(new),
        }
    }

    /// Sets every chunk, durable before returning.
    pub fn mark_all(&mut self) -> Result<(), StorageError> {
        self.mark(std::iter::once(0..self.geometry.chunk_count()))
            .map(|_| ())
    }

    /// Clears one chunk's bit (page crc updated). NOT synced: losing a clear in a crash only
    /// resends that chunk. The next sync of the file (any mark, state update or `sync`) makes
    /// it durable.
    pub fn clear(&mut self, chunk: u64) -> Result<(), StorageError> {
        let chunk_count = self.geometry.chunk_count();
        if chunk >= chunk_count {
            return Err(StorageError::InvalidArgument {
                why: format!("chunk {chunk} is past the last chunk ({chunk_count} chunks)"),
            });
        }
        if self.dirty.remove(chunk) {
            self.render_changed(chunk / BITMAP_CHUNKS_PER_PAGE, Some(chunk));
        }
        debug_assert!(!self.dirty.contains(chunk));
        Ok(())
    }

    /// Clears every bit (not synced either, same reason).
    pub fn clear_all(&mut self) -> Result<(), StorageError> {
        let chunk_count = self.geometry.chunk_count();
        let pages = pages_for(chunk_count);
        let had_bits: Vec<u64> = (0..pages)
            .filter(|&p| {
                let chunks = page_chunks(p, chunk_count);
                self.dirty
                    .next_from(chunks.start)
                    .is_some_and(|c| c < chunks.end)
            })
            .collect();
        self.dirty.clear();
        for page in had_bits {
            self.render(page);
        }
        Ok(())
    }

    /// Makes every page written so far durable (clears included). Cheap when nothing was.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        self.barrier(None)
    }

    /// The first queue seq folded into the bits since the last completed resync (0: none).
    pub fn covers_from(&self) -> u64 {
        self.state.covers_from
    }

    /// Sets [`covers_from`](Self::covers_from); durable before returning.
    pub fn set_covers_from(&mut self, seq: u64) -> Result<(), StorageError> {
        if seq == self.state.covers_from {
            return Ok(());
        }
        self.write_state(State {
            covers_from: seq,
            ..self.state
        })
    }

    /// `Some(primary)` while this node is the target of a resync that has not finished (its
    /// region is inconsistent): the primary's node id, 0 if unknown (a rebuilt state).
    pub fn resync_target(&self) -> Option<u64> {
        self.state.resync_target
    }

    /// Sets [`resync_target`](Self::resync_target); durable before returning. `None` clears it.
    pub fn set_resync_target(&mut self, primary: Option<u64>) -> Result<(), StorageError> {
        if primary == self.state.resync_target {
            return Ok(());
        }
        self.write_state(State {
            resync_target: primary,
            ..self.state
        })
    }

    // ---- internals ----

    /// Adds `range` (in bounds) to the set and rewrites each page that gained a bit (not
    /// synced). Returns how many chunks were new.
    fn set_range(&mut self, range: Range<u64>) -> u64 {
        assert!(
            range.end <= self.geometry.chunk_count(),
            "{range:?} out of bounds"
        );
        let mut new = 0;
        let mut start = range.start;
        while start < range.end {
            let page = start / BITMAP_CHUNKS_PER_PAGE;
            let end = range.end.min((page + 1) * BITMAP_CHUNKS_PER_PAGE);
            let added = self.dirty.insert_range(start..end);
            if added > 0 {
                self.render(page);
                self.sets_unsynced = true;
            }
            new += added;
            start = end;
        }
        new
    }

    /// Rewrites bit page `index` from the set and remembers it for the next barrier.
    fn render(&mut self, index: u64) {
        self.render_changed(index, None);
    }

    /// [`Self::render`], of `chunk`'s byte alone when only its bit changed.
    fn render_changed(&mut self, index: u64, chunk: Option<u64>) {
        let off = page_off(index);
        let page = self.map.bytes_mut(off, PAGE);
        match chunk {
            Some(chunk) => render_chunk_byte(&self.dirty, chunk, page),
            None => render_page(&self.dirty, index, page),
        }
        debug_assert!(page_verifies(
            self.map.bytes(off, PAGE),
            index,
            self.geometry.chunk_count()
        ));
        self.unsynced.insert(index);
    }

    /// Writes `next` (generation + 1) into the other slot and makes it durable (with every
    /// pending page). The handle takes it as current only once it is durable, so after a
    /// failure a retry rewrites the same slot and the durable one stays intact.
    fn write_state(&mut self, next: State) -> Result<(), StorageError> {
        let slot = 1 - self.state_slot;
        let generation =
            self.state
                .generation
                .checked_add(1)
                .ok_or_else(|| StorageError::BitmapDamaged {
                    path: self.path.clone(),
                    damage: BitmapDamage::State("generation exhausted".into()),
                })?;
        let next = State { generation, ..next };
        let bytes = next.encode();
        assert_eq!(State::valid_generation(&bytes), Some(generation));
        assert_eq!(State::decode(&bytes), Ok(next));
        self.map
            .bytes_mut(SLOT_OFF[slot], SLOT_BYTES)
            .copy_from_slice(&bytes);
        self.barrier(Some(slot))?;
        self.state = next;
        self.state_slot = slot;
        Ok(())
    }

    /// Makes the pending pages (and `slot`, if given) durable per mode:
    /// - Process: nothing (the page cache survives a process crash);
    /// - Power: one `fdatasync` of the file;
    /// - Pmem: write back the cache lines of each pending page and of the slot, then `sfence`.
    fn barrier(&mut self, slot: Option<usize>) -> Result<(), StorageError> {
        match self.durability {
            Durability::Process => {}
            Durability::Power => self
                .file
                .sync_data()
                .map_err(|e| StorageError::io(&self.path, "fdatasync", e))?,
            Durability::Pmem => {
                for page in self.unsynced.iter() {
                    self.map.flush_lines(page_off(page), PAGE);
                }
                if let Some(s) = slot {
                    self.map.flush_lines(SLOT_OFF[s], SLOT_BYTES);
                }
                map::fence();
            }
        }
        #[cfg(test)]
        self.barriers.push(
            self.unsynced
                .iter()
                .map(page_off)
                .chain(slot.map(|s| SLOT_OFF[s]))
                .collect(),
        );
        self.unsynced.clear();
        self.sets_unsynced = false;
        Ok(())
    }
}

/// A read-only view of a bitmap file, from [`inspect_bitmap`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Format version in the file.
    pub format_version: u32,
    /// The node (queue) the bitmap belongs to.
    pub node_id: u64,
    /// The geometry it was made for.
    pub geometry: ChunkGeometry,
    /// Chunks an open would take as dirty (a damaged page counts all its chunks).
    pub dirty_chunks: u64,
    /// The first queue seq folded into the bits since the last completed resync (0: none).
    pub covers_from: u64,
    /// `Some(primary)` while the node is the target of an unfinished resync.
    pub resync_target: Option<u64>,
    /// Bit pages that fail verification (an open would rebuild them all dirty).
    pub damaged_pages: u64,
    /// Both state slots fail verification (an open would rebuild the state: all dirty,
    /// `covers_from` 1, `resync_target` `Some(0)`; the fields above say so already).
    pub state_damaged: bool,
    /// Whether a read-write handle has the file open (then this is a snapshot).
    pub in_use: bool,
}

/// Reads a bitmap without locking or writing (for `mirror status`): geometry, dirty count,
/// covers_from, resync_target; a damaged page counts its chunks dirty. What a live writer is
/// rewriting is reread a few times before it is called damaged.
pub fn inspect_bitmap(path: &Path) -> Result<BitmapInfo, StorageError> {
    let file = File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let (block, _) = read_static(&file, path)?;
    let read = |buf: &mut [u8], off: u64| {
        file.read_exact_at(buf, off)
            .map_err(|e| StorageError::io(path, "read", e))
    };
    let mut head = vec![0u8; PAGES_OFF as usize];
    let mut chosen = None;
    for _ in 0..INSPECT_RETRIES {
        read(&mut head, 0)?;
        chosen = choose_state(&head).map_err(|damage| StorageError::BitmapDamaged {
            path: path.to_path_buf(),
            damage,
        })?;
        if chosen.is_some() {
            break;
        }
        std::thread::yield_now();
    }
    let chunk_count = block.geometry.chunk_count();
    let mut page = vec![0u8; PAGE];
    let (mut dirty_chunks, mut damaged_pages) = (0, 0);
    for index in 0..pages_for(chunk_count) {
        let mut ok = false;
        for _ in 0..INSPECT_RETRIES {
            read(&mut page, page_off(index) as u64)?;
            ok = page_verifies(&page, index, chunk_count);
            if ok {
                break;
            }
            std::thread::yield_now();
        }
        if ok {
            dirty_chunks += page_count(&page);
        } else {
            let chunks = page_chunks(index, chunk_count);
            dirty_chunks += chunks.end - chunks.start;
            damaged_pages += 1;
        }
    }
    let state = chosen.map_or(State::REBUILT, |(s, _)| s);
    Ok(BitmapInfo {
        format_version: BITMAP_VERSION,
        node_id: block.node_id,
        geometry: block.geometry,
        dirty_chunks: if chosen.is_some() {
            dirty_chunks
        } else {
            chunk_count
        },
        covers_from: state.covers_from,
        resync_target: state.resync_target,
        damaged_pages,
        state_damaged: chosen.is_none(),
        in_use: map::is_locked_by_writer(&file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_constants_match_the_spec() {
        // The numbers written in docs/FORMAT.md, "Dirty-chunk bitmap file (version 1)".
        assert_eq!(&BITMAP_MAGIC, b"LMIRBMP\0");
        assert_eq!(BITMAP_VERSION, 1);
        assert_eq!(BITMAP_PAGE_BYTES, 4096);
        assert_eq!(BITMAP_CHUNKS_PER_PAGE, 32736);
        assert_eq!(
            [
                OFF_MAGIC,
                OFF_VERSION,
                OFF_HEADER_CRC,
                OFF_NODE_ID,
                OFF_REGION_SIZE,
                OFF_CHUNK_SIZE,
                OFF_CHUNK_COUNT,
                OFF_STATIC_RESERVED,
                STATIC_BYTES
            ],
            [0, 8, 12, 16, 24, 32, 40, 48, 64]
        );
        assert_eq!(SLOT_OFF, [1024, 2048]);
        assert_eq!(
            [
                SLOT_GEN,
                SLOT_COVERS_FROM,
                SLOT_RESYNC_TARGET,
                SLOT_FLAGS,
                SLOT_PEER,
                SLOT_RESERVED,
                SLOT_CRC,
                SLOT_BYTES
            ],
            [0, 8, 16, 20, 24, 32, 60, 64]
        );
        assert_eq!(PAGES_OFF, 4096);
        assert_eq!(PAGE_CRC_BYTES, 4);
        assert_eq!(file_len_for(1), 8192);
        assert_eq!(file_len_for(32736), 8192);
        assert_eq!(file_len_for(32737), 12288);
        // The encoded blocks put each field where the spec says.
        let g = ChunkGeometry::new(40_000 * 4096 + 1, 4096).unwrap();
        let b = StaticBlock {
            node_id: 0x1122,
            geometry: g,
        }
        .encode();
        assert_eq!(&b[0..8], b"LMIRBMP\0");
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(u32_at(&b, 12), crc32c::crc32c(&b[16..64]));
        assert_eq!(
            [
                u64_at(&b, 16),
                u64_at(&b, 24),
                u64_at(&b, 32),
                u64_at(&b, 40)
            ],
            [0x1122, 40_000 * 4096 + 1, 4096, 40_001]
        );
        let s = State {
            generation: 7,
            covers_from: 0x33,
            resync_target: Some(0x44),
        }
        .encode();
        assert_eq!([u64_at(&s, 0), u64_at(&s, 8)], [7, 0x33]);
        assert_eq!([u32_at(&s, 16), u32_at(&s, 20)], [1, 0]);
        assert_eq!(u64_at(&s, 24), 0x44);
        assert_eq!(u32_at(&s, 60), crc32c::crc32c(&s[..60]));
        // A zeroed page does not verify (its crc would have to be the crc of 4092 zeros).
        assert_ne!(crc32c::crc32c(&[0u8; 4092]), 0);
        assert!(!page_verifies(&[0u8; PAGE], 0, 10));
    }

    #[test]
    fn pages_render_chunk_i_at_byte_i_div_8_bit_i_mod_8_of_its_page() {
        let mut set = ChunkSet::new(40_000);
        for c in [0, 9, 32735, 32736, 32737 + 8, 39_999] {
            set.insert(c);
        }
        let mut page = vec![0u8; PAGE];
        render_page(&set, 0, &mut page);
        assert_eq!(page[4], 1);
        assert_eq!(page[5], 1 << 1);
        assert_eq!(page[4 + 4091], 1 << 7);
        assert_eq!(page_count(&page), 3);
        assert!(page_verifies(&page, 0, 40_000));
        let mut back = ChunkSet::new(40_000);
        load_page(&page, 0, &mut back);
        render_page(&set, 1, &mut page);
        assert_eq!(page[4], 1);
        assert_eq!(page[5], 1 << 1);
        let last = 39_999 - 32736;
        assert_eq!(page[4 + last / 8], 1 << (last % 8));
        assert!(page_verifies(&page, 1, 40_000));
        assert!(!page_verifies(&page, 1, 39_999), "a bit past the count");
        load_page(&page, 1, &mut back);
        assert_eq!(back, set);
    }
}
