//! Region: creation, bounds, sizes, locking, DAX refusal, checksums, concurrent readers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{file_chunk_checksums, Durability, Region, StorageError};

#[test]
fn a_new_region_is_a_zero_filled_file_of_exactly_size_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let r = Region::open_or_create(&path, 10_000, Durability::Process).unwrap();
    assert_eq!(r.len(), 10_000);
    assert!(!r.is_empty());
    assert_eq!(r.path(), path);
    assert_eq!(r.durability(), Durability::Process);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
    assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 10_000]);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[test]
fn writes_read_back_and_land_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut r = Arc::new(Region::open_or_create(&path, 8192, Durability::Process).unwrap())
        .writer()
        .unwrap();
    r.write(100, b"hello").unwrap();
    r.write(8190, b"!!").unwrap();
    r.write(0, b"").unwrap();
    let mut buf = [0u8; 5];
    r.read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // SAFETY: in bounds of the live mapping; no concurrent writer in this test.
    let via_ptr = unsafe { std::slice::from_raw_parts(r.as_ptr().add(100), 5) };
    assert_eq!(via_ptr, b"hello");
    r.sync().unwrap();
    drop(r);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[100..105], b"hello");
    assert_eq!(&file[8190..], b"!!");
    let r = Region::open_or_create(&path, 8192, Durability::Process).unwrap();
    r.read(8190, &mut buf[..2]).unwrap();
    assert_eq!(&buf[..2], b"!!");
}

#[test]
fn out_of_range_reads_and_writes_are_refused_without_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut r =
        Arc::new(Region::open_or_create(&dir.path().join("r"), 4096, Durability::Process).unwrap())
            .writer()
            .unwrap();
    for (off, len) in [
        (4096u64, 1usize),
        (4095, 2),
        (u64::MAX, 1),
        (u64::MAX - 1, 4),
        (5000, 0),
    ] {
        let e = r.write(off, &vec![1u8; len]).unwrap_err();
        assert!(
            matches!(e, StorageError::OutOfRange { offset, len: l, size: 4096 } if offset == off && l == len as u64),
            "{e}"
        );
        let mut buf = vec![0u8; len];
        assert!(matches!(
            r.read(off, &mut buf),
            Err(StorageError::OutOfRange { .. })
        ));
    }
    r.write(4095, b"x").unwrap();
    r.write(4096, b"").unwrap();
}

#[test]
fn an_existing_region_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    drop(Region::open_or_create(&path, 4096, Durability::Process).unwrap());
    let e = Region::open_or_create(&path, 8192, Durability::Process).unwrap_err();
    assert!(
        matches!(e, StorageError::RegionSizeMismatch { file: 4096, expected: 8192, ref path } if path.ends_with("r")),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("4096") && msg.contains("8192"), "{msg}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096, "not resized");
}

#[test]
fn size_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let e = Region::open_or_create(&path, 0, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    assert!(!path.exists());
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let r = Region::open_or_create(&path, 4096, Durability::Process).unwrap();
    let e = Region::open_or_create(&path, 4096, Durability::Process).unwrap_err();
    assert!(matches!(e, StorageError::Locked { .. }), "{e}");
    // Read-only verification still works on a live region.
    assert_eq!(
        file_chunk_checksums(&path, 4096).unwrap(),
        r.chunk_checksums(4096)
    );
    drop(r);
    Region::open_or_create(&path, 4096, Durability::Process).unwrap();
}

#[test]
fn pmem_refuses_a_file_that_is_not_on_dax() {
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if std::path::Path::new("/dev/shm").is_dir() {
        dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
    }
    for dir in &dirs {
        let path = dir.path().join("r");
        let e = Region::open_or_create(&path, 4096, Durability::Pmem).unwrap_err();
        assert!(
            matches!(e, StorageError::NotDax { .. }),
            "{}: {e}",
            dir.path().display()
        );
        assert!(e.to_string().contains("DAX"), "{e}");
        assert!(
            !path.exists(),
            "a refused pmem create must not leave a file"
        );
        // An existing region opened in pmem mode.
        drop(Region::open_or_create(&path, 4096, Durability::Process).unwrap());
        let e = Region::open_or_create(&path, 4096, Durability::Pmem).unwrap_err();
        assert!(matches!(e, StorageError::NotDax { .. }), "{e}");
    }
}

#[test]
fn chunk_checksums_match_the_file_and_plain_crc32c() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let size = 10_000u64;
    let mut r = Arc::new(Region::open_or_create(&path, size, Durability::Power).unwrap())
        .writer()
        .unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    r.write(0, &data).unwrap();
    r.sync().unwrap();
    r.sync().unwrap(); // nothing dirty
    for chunk in [1u64, 333, 4096, 10_000, 1 << 30] {
        let want: Vec<u32> = data
            .chunks(chunk.min(size) as usize)
            .map(crc32c::crc32c)
            .collect();
        assert_eq!(r.chunk_checksums(chunk), want, "chunk {chunk}");
        assert_eq!(
            file_chunk_checksums(&path, chunk).unwrap(),
            want,
            "chunk {chunk}"
        );
    }
    // One differing byte shows up in exactly one chunk.
    r.write(5000, &[data[5000] ^ 1]).unwrap();
    let a = r.chunk_checksums(1000);
    let b: Vec<u32> = data.chunks(1000).map(crc32c::crc32c).collect();
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert_eq!(diff, vec![5]);
    let e = file_chunk_checksums(&path, 0).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    let e = file_chunk_checksums(&dir.path().join("none"), 10).unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[test]
#[should_panic(expected = "chunk_size")]
fn chunk_size_zero_panics_like_slice_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let r = Region::open_or_create(&dir.path().join("r"), 4096, Durability::Process).unwrap();
    r.chunk_checksums(0);
}

#[test]
fn readers_on_other_threads_see_complete_blocks_below_the_writers_watermark() {
    // The intended use: the poller writes, then publishes a watermark with Release; readers
    // Acquire the watermark and read only below it.
    const BLOCK: usize = 512;
    const BLOCKS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(
        Region::open_or_create(
            &dir.path().join("r"),
            BLOCK as u64 * BLOCKS,
            Durability::Process,
        )
        .unwrap(),
    );
    let mark = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (r, mark) = (Arc::clone(&r), Arc::clone(&mark));
            std::thread::spawn(move || {
                let mut buf = [0u8; BLOCK];
                loop {
                    // Acquire: pairs with the writer's Release below.
                    let done = mark.load(Ordering::Acquire);
                    for b in 0..done {
                        r.read(b * BLOCK as u64, &mut buf).unwrap();
                        assert!(
                            buf.iter().all(|&x| x == b as u8 + 1),
                            "block {b} incomplete"
                        );
                    }
                    if done == BLOCKS {
                        break;
                    }
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    let mut w = r.writer().unwrap();
    for b in 0..BLOCKS {
        w.write(b * BLOCK as u64, &[b as u8 + 1; BLOCK]).unwrap();
        // Release: publishes the block written above.
        mark.store(b + 1, Ordering::Release);
    }
    for t in readers {
        t.join().unwrap();
    }
}

#[test]
fn one_writer_at_a_time_lends_its_bytes_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let r =
        Arc::new(Region::open_or_create(&dir.path().join("r"), 8192, Durability::Process).unwrap());
    assert!(r.created(), "this open created the file");
    let mut w = r.writer().unwrap();
    let e = r.writer().unwrap_err();
    assert!(e.to_string().contains("already has a writer"), "{e}");
    w.write(4000, b"in place").unwrap();
    assert_eq!(w.with_bytes(4000, 8, |b| b.to_vec()).unwrap(), b"in place");
    let e = w.with_bytes(8190, 3, |_| ()).unwrap_err();
    assert!(matches!(e, StorageError::OutOfRange { .. }), "{e}");
    drop(w);
    let w = r.writer().expect("a dropped writer frees the place");
    drop((w, r));
    let r = Region::open_or_create(&dir.path().join("r"), 8192, Durability::Process).unwrap();
    assert!(!r.created(), "opened, not created");
}

/// The file's dirty pages in the page cache (`cachestat`, Linux 6.5+: `None` before).
fn dirty_pages(file: &std::fs::File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (added after the numbering was unified); the
    // `libc` crate does not name it for x86_64 glibc yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: `range` and `stat` are live, correctly laid out (the kernel's `cachestat_range`
    // and `cachestat`), and outlive the call; the descriptor is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd() as libc::c_uint,
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    (rc == 0).then_some(stat.nr_dirty)
}

#[test]
fn power_region_writes_start_their_write_back_as_they_go() {
    use std::os::unix::fs::FileExt;
    const PAGES: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    // The control: the same bytes written to a plain file stay dirty until something syncs
    // them (unless this kernel or filesystem cannot say, or writes through).
    let plain = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.path().join("plain"))
        .unwrap();
    plain.set_len(PAGES * 4096).unwrap();
    plain.sync_all().unwrap();
    plain
        .write_all_at(&vec![1u8; (PAGES * 4096) as usize], 0)
        .unwrap();
    match dirty_pages(&plain) {
        None => return eprintln!("skipped: no cachestat(2) on this kernel"),
        Some(dirty) if dirty < PAGES / 2 => {
            return eprintln!("skipped: this filesystem left {dirty} of {PAGES} pages dirty")
        }
        Some(_) => {}
    }
    let path = dir.path().join("r");
    let region = Arc::new(Region::open_or_create(&path, PAGES * 4096, Durability::Power).unwrap());
    let mut w = region.writer().unwrap();
    let page = [7u8; 4096];
    for i in 0..PAGES / 2 {
        w.write(i * 4096, &page).unwrap();
    }
    let pieces: Vec<(u64, &[u8])> = (PAGES / 2..PAGES).map(|i| (i * 4096, &page[..])).collect();
    w.write_gathered(&pieces).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let dirty = dirty_pages(&file).unwrap();
    let behind = crate::region::WRITE_BEHIND_BYTES / 4096;
    assert!(
        behind <= PAGES / 8,
        "the test writes too little to see write-behind"
    );
    assert!(
        dirty < PAGES / 8,
        "{dirty} of {PAGES} pages written still dirty: write-back starts every {behind}"
    );
    // What it started, the sync still makes durable (and reads back).
    region.sync().unwrap();
    let mut back = vec![0u8; 4096];
    region.read((PAGES - 1) * 4096, &mut back).unwrap();
    assert_eq!(back, page);
}
