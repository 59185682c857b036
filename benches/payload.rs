//! The per-byte pieces of a write's path: a payload taken in from a caller (copied, its crc
//! computed once for the frame and both records), against what the frame and the record cost
//! when each passes over the bytes itself; the machine's `memcpy` by the distance between
//! destination and source; combining crcs (ours, against the `crc32c` crate's);
//! and a crc pass (ours, `mirror_proto::crc`, against the `crc32c` crate's and, from
//! `crc::WIDE_MIN` bytes, the `crc-fast` crate's folding: `crc::WidePass` picks one of the two
//! per CPU), around the lengths where `crc::WIDE_MIN` and `crc::COMBINE_MIN` switch; and a region write at
//! scattered offsets of a large region (streamed past the cache from `STREAM_MIN` bytes)
//! against an ordinary copy into memory of the same size; and a queue's records read back
//! (each one's crc checked, as a catch-up's primary does) from a ring larger than the caches,
//! against one crc pass over as many bytes of cold memory.
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirror_proto::crc::{crc32c_append, crc32c_combine, WidePass, WIDE_MIN};
use mirror_proto::Payload;
use mirror_storage::{Durability, PersistentQueue, QueueParams, Region, Role};

fn payload(c: &mut Criterion) {
    let mut g = c.benchmark_group("payload_in");
    for len in [64usize, 4096, 65536] {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(
            BenchmarkId::new("copy_and_crc_per_use", len),
            &data,
            |b, d| {
                b.iter(|| {
                    let copy = bytes::Bytes::copy_from_slice(std::hint::black_box(d));
                    std::hint::black_box(crc32c::crc32c(&copy)); // the frame's
                    std::hint::black_box(crc32c::crc32c(&copy)); // the record's
                    copy
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("payload_once", len), &data, |b, d| {
            b.iter(|| {
                let p = Payload::copy_from_slice(std::hint::black_box(d));
                std::hint::black_box(crc32c_combine(0x1234_5678, p.crc(), p.len()));
                std::hint::black_box(crc32c_combine(0x9abc_def0, p.crc(), p.len()));
                p
            })
        });
    }
    g.finish();
    // The machine's `memcpy` by how far past its source the destination sits modulo a page:
    // on AMD Zen 3, 1-31 bytes past (measured) takes `rep movsb` 15-30 times slower
    // (`mirror_proto::rep_movsb_is_slow`, which keeps a margin to 63; `Payload::copy_from_slice` and the storage's
    // ordinary copies keep out of it).
    let mut g = c.benchmark_group("memcpy_by_distance");
    for len in [4096usize, 65536] {
        // Up to a page to reach a page boundary, the source and a page, the destination and
        // the farthest distance.
        let mut buffer = vec![0x5Au8; 4096 + (len + 4096) + (len + 64)];
        let page = buffer.as_ptr().align_offset(4096);
        g.throughput(Throughput::Bytes(len as u64));
        for apart in [0usize, 16, 64] {
            let (src, dst) = buffer[page..].split_at_mut(len + 4096);
            let (src, dst) = (&src[..len], &mut dst[apart..apart + len]);
            g.bench_function(BenchmarkId::new(format!("{apart}_past"), len), |b| {
                b.iter(|| dst.copy_from_slice(std::hint::black_box(src)))
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("crc_combine");
    for len in [64usize, 4096, 65536] {
        g.bench_with_input(BenchmarkId::new("ours", len), &len, |b, &n| {
            b.iter(|| crc32c_combine(std::hint::black_box(0x1234_5678), 0x9abc_def0, n))
        });
        // A length other than the last one this thread combined: the power is computed anew.
        g.bench_with_input(BenchmarkId::new("ours_alternating", len), &len, |b, &n| {
            let mut flip = 0;
            b.iter(|| {
                flip ^= 1;
                crc32c_combine(std::hint::black_box(0x1234_5678), 0x9abc_def0, n + flip)
            })
        });
        g.bench_with_input(BenchmarkId::new("crc32c_crate", len), &len, |b, &n| {
            b.iter(|| crc32c::crc32c_combine(std::hint::black_box(0x1234_5678), 0x9abc_def0, n))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("crc_pass");
    for len in [12usize, 28, 48, 64, 128, 256, 512, 1024, 4096, 8192, 65536] {
        // One byte past an 8-byte boundary: a frame's pieces sit at any alignment.
        let buffer: Vec<u8> = (0..len + 1).map(|i| (i * 7) as u8).collect();
        let data = &buffer[1..];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("ours", len), &data, |b, d| {
            b.iter(|| crc32c_append(0x1234_5678, std::hint::black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("crc32c_crate", len), &data, |b, d| {
            b.iter(|| crc32c::crc32c_append(0x1234_5678, std::hint::black_box(d)))
        });
        // The wide pass the CPU does not run, for the choice's sake (`WidePass::of_this_cpu`).
        if len >= WIDE_MIN {
            g.bench_with_input(BenchmarkId::new("folding", len), &data, |b, d| {
                b.iter(|| WidePass::Folding.append(0x1234_5678, std::hint::black_box(d)))
            });
        }
    }
    g.finish();
}

/// Bytes of 4 KiB records read back by `queue_read_back`: far more than the caches hold, as a
/// long outage's catch-up reads (smaller in debug builds, which CI's smoke run uses).
const READ_BACK_BYTES: usize = if cfg!(debug_assertions) {
    8 << 20
} else {
    192 << 20
};

fn bench_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    })
    .expect("a temporary directory")
}

/// Payload bytes of the queue benches' records (a 4 KiB write's).
const PAYLOAD: usize = 4096;

fn record_payload() -> Vec<u8> {
    (0..PAYLOAD).map(|i| (i * 31) as u8).collect()
}

/// A `process` queue in `dir` whose ring holds a little more than [`READ_BACK_BYTES`].
fn queue_larger_than_the_caches(dir: &std::path::Path) -> PersistentQueue {
    let params = QueueParams {
        node_id: 1,
        role: Role::Primary,
        region_size: 1 << 30,
        capacity_bytes: (READ_BACK_BYTES as u64 * 5 / 4).next_multiple_of(4096),
    };
    PersistentQueue::create(&dir.join("queue"), &params, Durability::Process).expect("a queue")
}

fn queue_read_back(c: &mut Criterion) {
    let dir = bench_dir();
    let mut queue = queue_larger_than_the_caches(dir.path());
    let records = (READ_BACK_BYTES / PAYLOAD) as u64;
    let data = record_payload();
    for seq in 1..=records {
        queue
            .append(seq, 1, (seq % 1024) * PAYLOAD as u64, &data)
            .expect("room for every record");
    }
    let cold: Vec<u8> = (0..READ_BACK_BYTES).map(|i| (i * 7) as u8).collect();
    let mut g = c.benchmark_group("queue_read_back");
    g.throughput(Throughput::Bytes(READ_BACK_BYTES as u64));
    g.sample_size(10);
    g.bench_function("records_4KiB", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for rec in queue.iter_from(1) {
                n += std::hint::black_box(rec.expect("intact").payload_crc) as u64 & 1;
            }
            n
        })
    });
    g.bench_function("one_crc_pass", |b| {
        b.iter(|| crc32c_append(0, std::hint::black_box(&cold)))
    });
    g.finish();
}

/// A node's queue appends (each record's payload streamed into the ring, as a lap of a ring
/// larger than the caches finds its lines long gone; then the same after an idle node's
/// warm-up), next to an ordinary copy of the same bytes into as much memory in the same order
/// (what the append did before).
fn queue_append(c: &mut Criterion) {
    let dir = bench_dir();
    let mut queue = queue_larger_than_the_caches(dir.path());
    let data = record_payload();
    let crc = crc32c_append(0, &data);
    // Records in the ring at a time: the trim keeps the ring's tail a lap ahead of its head.
    let live = (READ_BACK_BYTES / PAYLOAD) as u64 / 2;
    let mut plain = vec![1u8; READ_BACK_BYTES];
    let mut g = c.benchmark_group("queue_append");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut seq = 0u64;
    // The append alone is timed: the trim that keeps room reads the header of a record written
    // half a lap before, which no cache holds (most of the time of append and trim together),
    // where the engine trims records its peer applied moments after they were written.
    // `before` runs untimed ahead of each append.
    let mut appends = |iters: u64, before: &mut dyn FnMut(&mut PersistentQueue)| {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            before(&mut queue);
            seq += 1;
            let t = Instant::now();
            queue
                .append_with_crc(seq, 1, (seq % 1024) * PAYLOAD as u64, &data, crc)
                .expect("room for the record");
            spent += t.elapsed();
            if seq > live {
                queue.trim_through(seq - live).expect("a live record");
            }
        }
        spent
    };
    g.bench_function("record_4KiB", |b| {
        b.iter_custom(|iters| appends(iters, &mut |_| {}))
    });
    // The same appends after the ring was warmed ahead with time to spare, as an idle node
    // does between synchronous writes (`warm_ahead`; the 5 µs wait is not timed).
    g.bench_function("record_4KiB_warmed_ahead", |b| {
        b.iter_custom(|iters| {
            appends(iters, &mut |queue| {
                queue.warm_ahead();
                let idle = Instant::now();
                while idle.elapsed() < Duration::from_micros(5) {
                    std::hint::spin_loop();
                }
            })
        })
    });
    let mut i = 0usize;
    g.bench_function("ordinary_copy_4KiB", |b| {
        b.iter(|| {
            let at = (i % (READ_BACK_BYTES / PAYLOAD)) * PAYLOAD;
            i += 1;
            plain[at..at + PAYLOAD].copy_from_slice(std::hint::black_box(&data));
        })
    });
    g.finish();
}

/// Bytes of the region the scattered writes land in: far more than the caches hold, as a
/// backup's region is.
const SCATTER_REGION: usize = 256 << 20;

fn region_write(c: &mut Criterion) {
    let dir = bench_dir();
    let region = Arc::new(
        Region::open_or_create(
            &dir.path().join("region"),
            SCATTER_REGION as u64,
            Durability::Process,
        )
        .expect("a region"),
    );
    let mut writer = region.writer().expect("the region's writer");
    let mut plain = vec![1u8; SCATTER_REGION];
    let mut g = c.benchmark_group("region_write_scattered");
    for len in [4096usize, 65536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
        let slots = (SCATTER_REGION / len) as u64;
        // A multiplicative hash walks every slot in an order the prefetchers cannot follow.
        let slot = |i: u64| (i.wrapping_mul(2_654_435_761) % slots) as usize * len;
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("region", len), &data, |b, d| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                writer.write(slot(i) as u64, d).expect("in range")
            })
        });
        g.bench_with_input(BenchmarkId::new("ordinary_copy", len), &data, |b, d| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                let at = slot(i);
                plain[at..at + d.len()].copy_from_slice(std::hint::black_box(d));
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    payload,
    region_write,
    queue_read_back,
    queue_append
);
criterion_main!(benches);
