//! The dirty-chunk bitmap file: bits and state across reopen, damage refused or rebuilt per
//! docs/FORMAT.md ("Dirty-chunk bitmap file (version 1)"), locking, inspection.

use std::iter::once;
use std::path::{Path, PathBuf};

use mirror_proto::{ChunkGeometry, ChunkSet};

use crate::{
    bitmap_path, inspect_bitmap, BitmapDamage, BitmapOpenReport, DirtyBitmap, Durability,
    StorageError, BITMAP_CHUNKS_PER_PAGE,
};

const NODE: u64 = 11;
/// 40000 chunks of 4 KiB: two bit pages (32736 + 7264 chunks).
const CHUNKS: u64 = 40_000;
const FILE_LEN: u64 = 4096 + 2 * 4096;
const PAGE1: usize = 8192;

fn geometry() -> ChunkGeometry {
    ChunkGeometry::new(CHUNKS * 4096, 4096).unwrap()
}

fn open(path: &Path) -> Result<(DirtyBitmap, BitmapOpenReport), StorageError> {
    DirtyBitmap::open_or_create(path, NODE, geometry(), Durability::Process)
}

fn set_of(ranges: &[std::ops::Range<u64>]) -> ChunkSet {
    let mut s = ChunkSet::new(CHUNKS);
    for r in ranges {
        s.insert_range(r.clone());
    }
    s
}

/// A bitmap with chunks 5, 32730..32740 and 39999 dirty, closed; returns its path and bytes.
fn closed_bitmap(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = bitmap_path(&dir.join("node.queue"));
    let (mut b, _) = open(&path).unwrap();
    b.mark([5..6, 32730..32740, 39_999..40_000]).unwrap();
    drop(b);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the header crc (bytes 12..16 over 16..64), as a faulty writer would.
fn recrc_header(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[16..64]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
}

fn damage_of(path: &Path, bytes: &[u8]) -> (BitmapDamage, String) {
    std::fs::write(path, bytes).unwrap();
    match open(path) {
        Err(e @ StorageError::BitmapDamaged { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains("stop the pair while it is synchronous, delete"),
                "{msg}"
            );
            let StorageError::BitmapDamaged { damage, .. } = e else {
                unreachable!()
            };
            (damage, msg)
        }
        other => panic!("expected BitmapDamaged, got {other:?}"),
    }
}

#[test]
fn marks_across_a_page_boundary_clears_and_the_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("node.queue");
    let path = bitmap_path(&queue);
    assert_eq!(path, dir.path().join("node.queue.bitmap"));
    let (mut b, report) = open(&path).unwrap();
    assert_eq!(
        report,
        BitmapOpenReport {
            created: true,
            ..BitmapOpenReport::default()
        }
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_LEN);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );
    assert_eq!((b.path(), b.geometry()), (path.as_path(), geometry()));
    assert!(b.dirty().is_empty());
    assert_eq!((b.covers_from(), b.resync_target()), (0, None));

    assert_eq!(b.mark([32730..32740, 5..6, 39_999..40_000]).unwrap(), 12);
    assert_eq!(
        b.mark(once(32735..32745)).unwrap(),
        5,
        "only the new ones count"
    );
    b.clear(32736).unwrap();
    b.clear(5).unwrap();
    b.clear(6).unwrap(); // not set: nothing changes
    b.set_covers_from(17).unwrap();
    b.set_resync_target(Some(9)).unwrap();
    let want = set_of(&[32730..32736, 32737..32745, 39_999..40_000]);
    assert_eq!(b.dirty(), &want);
    drop(b);

    // The bytes sit where the spec says: chunk 32737 is page 1, byte 0, bit 1.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes[PAGE1 + 4] & 0b11, 0b10);
    // Chunks 32728..32736 are page 0's last byte: 32730..32736 set.
    assert_eq!(bytes[4096 + 4 + 4091], 0b1111_1100);

    let (mut b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default());
    assert_eq!(b.dirty(), &want);
    assert_eq!((b.covers_from(), b.resync_target()), (17, Some(9)));
    b.set_resync_target(None).unwrap();
    b.set_resync_target(Some(0)).unwrap();
    b.set_resync_target(None).unwrap();
    b.clear_all().unwrap();
    b.sync().unwrap();
    drop(b);
    let (b, _) = open(&path).unwrap();
    assert!(b.dirty().is_empty());
    assert_eq!((b.covers_from(), b.resync_target()), (17, None));
}

#[test]
fn bits_cleared_one_by_one_reopen_as_cleared_with_every_page_verifying() {
    // A clear rewrites its bit's byte and the page crc, not the whole page: thousands of them
    // in a scattered order must leave pages that verify and hold exactly the remaining bits.
    let dir = tempfile::tempdir().unwrap();
    let path = bitmap_path(&dir.path().join("node.queue"));
    let (mut b, _) = open(&path).unwrap();
    b.mark_all().unwrap();
    let mut want = ChunkSet::new(CHUNKS);
    want.insert_range(0..CHUNKS);
    let mut chunk = 7u64;
    for _ in 0..CHUNKS / 2 {
        chunk = (chunk * 7919 + 13) % CHUNKS;
        b.clear(chunk).unwrap();
        want.remove(chunk);
    }
    assert_eq!(b.dirty(), &want);
    drop(b);
    let (b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default(), "every page verifies");
    assert_eq!(b.dirty(), &want);
}

#[test]
fn marking_counts_new_bits_only_and_refuses_chunks_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let (mut b, _) = open(&path).unwrap();
    assert_eq!(b.mark([0..10, 5..15]).unwrap(), 15);
    assert_eq!(b.mark(once(0..15)).unwrap(), 0);
    let (hi, lo) = (7, 3);
    assert_eq!(b.mark([hi..lo, 4..4]).unwrap(), 0, "empty ranges");
    let e = b.mark([20..21, 39_990..40_001]).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    assert!(
        b.dirty().contains(20),
        "the ranges before the bad one are set"
    );
    assert!(matches!(
        b.clear(CHUNKS),
        Err(StorageError::InvalidArgument { .. })
    ));
    b.mark_all().unwrap();
    assert_eq!(b.dirty().len(), CHUNKS);
    assert_eq!(b.mark(once(0..CHUNKS)).unwrap(), 0);
    drop(b);
    let (b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default());
    assert_eq!(b.dirty().len(), CHUNKS);
}

#[test]
fn power_durability_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let g = ChunkGeometry::new(1 << 20, 64 * 1024).unwrap();
    let (mut b, r) = DirtyBitmap::open_or_create(&path, NODE, g, Durability::Power).unwrap();
    assert!(r.created);
    assert_eq!(b.mark(once(3..5)).unwrap(), 2);
    b.clear(3).unwrap();
    b.set_covers_from(4).unwrap();
    drop(b);
    let (b, _) = DirtyBitmap::open_or_create(&path, NODE, g, Durability::Power).unwrap();
    assert_eq!(b.dirty().iter().collect::<Vec<_>>(), vec![4]);
    assert_eq!(b.covers_from(), 4);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
}

#[test]
fn a_damaged_header_or_length_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = closed_bitmap(dir.path());

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        damage_of(&path, &b).0,
        BitmapDamage::NotABitmap { .. }
    ));
    assert!(matches!(
        damage_of(&path, b"short").0,
        BitmapDamage::NotABitmap { .. }
    ));

    let mut b = good.clone();
    b[8] = 2;
    assert_eq!(
        damage_of(&path, &b).0,
        BitmapDamage::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );

    let mut b = good.clone();
    b[50] = 1; // reserved, under the crc
    assert!(matches!(
        damage_of(&path, &b).0,
        BitmapDamage::HeaderChecksum { .. }
    ));

    for (off, value, needle) in [
        (32, 3 * 4096, "chunk_size 12288"),
        (32, 2048, "chunk_size 2048"),
        (40, CHUNKS + 1, "chunk_count 40001"),
        (16, 0, "node_id 0"),
        (24, 0, "region_size 0"),
        (48, 1, "reserved"),
    ] {
        let mut b = good.clone();
        put_u64(&mut b, off, value);
        recrc_header(&mut b);
        let (damage, msg) = damage_of(&path, &b);
        assert!(matches!(damage, BitmapDamage::Field(_)), "{msg}");
        assert!(msg.contains(needle), "{msg}");
    }

    let mut b = good.clone();
    b.extend_from_slice(&[0; 4096]);
    assert_eq!(
        damage_of(&path, &b).0,
        BitmapDamage::Length {
            found: FILE_LEN + 4096,
            expected: FILE_LEN
        }
    );
    assert!(matches!(
        damage_of(&path, &good[..good.len() - 1]).0,
        BitmapDamage::Length { .. }
    ));

    // The good image still opens: the refusals wrote nothing.
    std::fs::write(&path, &good).unwrap();
    let (b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default());
    assert_eq!(b.dirty().len(), 12);
}

#[test]
fn a_checksummed_state_slot_with_a_field_out_of_rule_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = closed_bitmap(dir.path());
    // Creation wrote slot A (generation 1), the only valid one.
    // resync_target 2; flags 1; a peer (low half) while not a target; reserved bytes.
    for (off, value) in [(16usize, 2u32), (20, 1), (24, 5), (40, 1)] {
        let mut b = good.clone();
        b[1024 + off..1024 + off + 4].copy_from_slice(&value.to_le_bytes());
        let crc = crc32c::crc32c(&b[1024..1084]);
        b[1084..1088].copy_from_slice(&crc.to_le_bytes());
        let (damage, msg) = damage_of(&path, &b);
        assert!(matches!(damage, BitmapDamage::State(_)), "{msg}");
    }
}

#[test]
fn another_geometry_or_node_is_refused_naming_both_values() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = closed_bitmap(dir.path());
    let cases = [
        (
            NODE,
            ChunkGeometry::new(CHUNKS * 4096, 65536).unwrap(),
            "chunk_size",
            4096,
            65536,
        ),
        (
            NODE,
            ChunkGeometry::new(CHUNKS * 4096 + 1, 4096).unwrap(),
            "region_size",
            CHUNKS * 4096,
            CHUNKS * 4096 + 1,
        ),
        (12, geometry(), "node_id", NODE, 12),
    ];
    for (node, g, field, in_file, configured) in cases {
        let e = DirtyBitmap::open_or_create(&path, node, g, Durability::Process).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, StorageError::BitmapMismatch { field: f, file, configured: c, .. }
                if f == field && file == in_file && c == configured),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("was made for {field} {in_file}"))
                && msg.contains(&format!("configured with {configured}"))
                && msg.contains("while the pair is synchronous"),
            "{msg}"
        );
    }
}

#[test]
fn a_damaged_bit_page_is_rebuilt_all_dirty_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = closed_bitmap(dir.path());
    let before = set_of(&[5..6, 32730..32740, 39_999..40_000]);
    let page1 = BITMAP_CHUNKS_PER_PAGE..CHUNKS;

    let mut damaged = vec![];
    let mut b = good.clone();
    b[PAGE1 + 100] ^= 0x10; // a flipped bit in the bits
    damaged.push((b, 1u64));
    let mut b = good.clone();
    b[PAGE1] ^= 1; // a flipped bit in the page crc
    damaged.push((b, 1));
    let mut b = good.clone();
    b[4096..PAGE1].fill(0); // page 0 zeroed, crc 0 included: not valid
    damaged.push((b, 0));
    let mut b = good.clone();
    // A bit past the last chunk, checksummed again: still refused as a page.
    let past = (CHUNKS - BITMAP_CHUNKS_PER_PAGE) as usize;
    b[PAGE1 + 4 + past / 8] |= 1 << (past % 8);
    let crc = crc32c::crc32c(&b[PAGE1 + 4..PAGE1 + 4096]);
    b[PAGE1..PAGE1 + 4].copy_from_slice(&crc.to_le_bytes());
    damaged.push((b, 1));

    for (image, page) in damaged {
        std::fs::write(&path, &image).unwrap();
        let info = inspect_bitmap(&path).unwrap();
        assert_eq!(info.damaged_pages, 1);
        let (b, report) = open(&path).unwrap();
        assert_eq!(report.pages_rebuilt, 1, "page {page}");
        assert!(!report.state_rebuilt && !report.created);
        let rebuilt = if page == 0 {
            0..BITMAP_CHUNKS_PER_PAGE
        } else {
            page1.clone()
        };
        let mut want = before.clone();
        want.insert_range(rebuilt);
        assert_eq!(b.dirty(), &want, "page {page}");
        assert_eq!(info.dirty_chunks, want.len());
        drop(b);
        let (b, report) = open(&path).unwrap();
        assert_eq!(report, BitmapOpenReport::default(), "rewritten");
        assert_eq!(b.dirty(), &want);
    }
}

#[test]
fn both_state_slots_damaged_rebuild_the_conservative_state() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = closed_bitmap(dir.path());
    let (mut b, _) = open(&path).unwrap();
    b.set_covers_from(5).unwrap(); // slot B, generation 2
    b.set_covers_from(7).unwrap(); // slot A, generation 3
    drop(b);
    let good = std::fs::read(&path).unwrap();

    // The current slot torn: the other one (older, durable) is current.
    let mut img = good.clone();
    img[1024 + 9] ^= 1;
    std::fs::write(&path, &img).unwrap();
    let (b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default());
    assert_eq!(b.covers_from(), 5);
    drop(b);

    // Generation 0 means "never written", even under a matching crc; with B torn, neither
    // slot is valid.
    let mut img = good.clone();
    img[1024..1032].fill(0);
    let crc = crc32c::crc32c(&img[1024..1084]);
    img[1084..1088].copy_from_slice(&crc.to_le_bytes());
    img[2048 + 60] ^= 1;
    std::fs::write(&path, &img).unwrap();
    assert!(inspect_bitmap(&path).unwrap().state_damaged);

    // Both torn.
    let mut img = good.clone();
    img[1024 + 9] ^= 1;
    img[2048 + 60] ^= 1;
    std::fs::write(&path, &img).unwrap();
    let info = inspect_bitmap(&path).unwrap();
    assert!(info.state_damaged);
    assert_eq!(
        (info.dirty_chunks, info.covers_from, info.resync_target),
        (CHUNKS, 1, Some(0))
    );
    let (b, report) = open(&path).unwrap();
    assert!(report.state_rebuilt);
    assert_eq!(report.pages_rebuilt, 0);
    assert_eq!(b.dirty().len(), CHUNKS);
    assert_eq!((b.covers_from(), b.resync_target()), (1, Some(0)));
    drop(b);
    let (b, report) = open(&path).unwrap();
    assert_eq!(report, BitmapOpenReport::default());
    assert_eq!(b.dirty().len(), CHUNKS);
    assert_eq!((b.covers_from(), b.resync_target()), (1, Some(0)));
}

#[test]
fn a_second_open_is_locked_and_inspect_sees_the_live_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let (mut b, _) = open(&path).unwrap();
    b.mark([1..4, 32_000..33_000]).unwrap();
    b.set_resync_target(Some(3)).unwrap();
    let e = open(&path).unwrap_err();
    assert!(matches!(e, StorageError::Locked { .. }), "{e}");
    let info = inspect_bitmap(&path).unwrap();
    assert_eq!(info.node_id, NODE);
    assert_eq!(info.geometry, geometry());
    assert_eq!(info.dirty_chunks, 1003);
    assert_eq!((info.covers_from, info.resync_target), (0, Some(3)));
    assert_eq!((info.damaged_pages, info.state_damaged), (0, false));
    assert!(info.in_use);
    drop(b);
    assert!(!inspect_bitmap(&path).unwrap().in_use);
    assert!(open(&path).is_ok());
}

#[test]
fn open_or_create_refuses_node_zero_and_an_empty_region() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let e = DirtyBitmap::open_or_create(&path, 0, geometry(), Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    let g = ChunkGeometry::new(0, 4096).unwrap();
    let e = DirtyBitmap::open_or_create(&path, NODE, g, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    assert!(!path.exists());
}

/// The bitmap section of docs/FORMAT.md states the numbers the code uses.
#[test]
fn format_md_states_the_bitmap_layout() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FORMAT.md"));
    let start = doc
        .find("## Dirty-chunk bitmap file (version 1)")
        .expect("section present");
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    assert!(
        doc[..start].contains("## Queue file") && !doc[..start].contains("## Region file"),
        "placed after the queue file's sections"
    );
    for row in [
        "| 0 | 8 | magic | `\"LMIRBMP\\0\"`",
        "| 8 | 4 | format version | `1`",
        "| 12 | 4 | header crc | crc32c of bytes 16..64",
        "| 16 | 8 | node_id |",
        "| 24 | 8 | region_size |",
        "| 32 | 8 | chunk_size |",
        "| 40 | 8 | chunk_count |",
        "| 48 | 16 | reserved |",
        "| 1024 | 64 | state slot A",
        "| 2048 | 64 | state slot B",
        "| 4096 | 4096 × pages | bit pages",
        "| 0 | 8 | generation",
        "| 8 | 8 | covers_from",
        "| 16 | 4 | resync_target",
        "| 20 | 4 | flags",
        "| 24 | 8 | peer",
        "| 32 | 28 | reserved",
        "| 60 | 4 | crc32c of slot bytes 0..60",
        "| 0 | 4 | crc32c of page bytes 4..4096",
        "| 4 | 4092 | bits",
    ] {
        assert!(section.contains(row), "FORMAT.md lacks the row {row:?}");
    }
    assert!(section.contains(&format!("{} chunks per page", BITMAP_CHUNKS_PER_PAGE)));
    assert!(section.contains("4096 + pages × 4096"));
}

/// What each call makes durable: `mark` the pages it set bits in (nothing when all were set),
/// `clear` nothing until the next sync, a state update its slot, an open the pages it rebuilt.
#[test]
fn each_call_syncs_what_it_promises_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = closed_bitmap(dir.path());
    let (mut b, _) = open(&path).unwrap();
    assert!(b.barriers.is_empty(), "a clean open syncs nothing");
    assert_eq!(b.mark([5..6, 32739..32742]).unwrap(), 2);
    assert_eq!(
        b.barriers,
        vec![vec![PAGE1]],
        "32740 and 32741 were new: page 1 only"
    );
    b.barriers.clear();
    b.mark(once(5..6)).unwrap();
    b.clear(5).unwrap();
    b.clear(32736).unwrap();
    assert!(
        b.barriers.is_empty(),
        "nothing new marked, clears are not synced"
    );
    b.mark(once(5..6)).unwrap();
    assert_eq!(
        b.barriers,
        vec![vec![4096, PAGE1]],
        "the pending clear rides along"
    );
    b.barriers.clear();
    b.clear(5).unwrap();
    b.set_covers_from(3).unwrap();
    assert_eq!(
        b.barriers,
        vec![vec![4096, 2048]],
        "slot B and the pending page"
    );
    b.barriers.clear();
    b.set_covers_from(3).unwrap();
    b.sync().unwrap();
    assert!(b.barriers.is_empty(), "nothing changed");
    drop(b);

    let mut img = good.clone();
    img[PAGE1 + 7] ^= 1;
    std::fs::write(&path, &img).unwrap();
    let (b, report) = open(&path).unwrap();
    assert_eq!(report.pages_rebuilt, 1);
    assert_eq!(
        b.barriers,
        vec![vec![PAGE1]],
        "the rebuilt page, before the open returns"
    );
}
