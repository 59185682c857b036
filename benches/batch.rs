//! A batch's writes under `durability = power`, where records and applies reach their files by
//! system calls rather than through the mapping: a batch of 64 appends of 4 KiB written one
//! `pwritev` per record against one run of appends (`begin_append_run`/`end_append_run`, one
//! `pwrite` per contiguous stretch), and a batch of 64 region writes one call each against
//! `RegionWriter::write_gathered` (one `pwritev` per run of neighbours), for sequential
//! offsets (a log's appends) and scattered ones (nothing to gather: its cost is the price of
//! asking). No sync: the syncs are the disk's, the same either way; `mirror bench` measures the
//! whole `power` path next to a raw group-commit loop.
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirror_storage::{Durability, PersistentQueue, QueueParams, Region, Role};

/// Writes in one batch: the `power` row's depth.
const BATCH: u64 = 64;
const PAYLOAD: usize = 4096;
/// Far more than the caches hold, as a backup's region is (smaller in debug builds, which CI's
/// smoke run of each bench uses).
const REGION: u64 = if cfg!(debug_assertions) {
    16 << 20
} else {
    256 << 20
};

/// A directory on a disk-backed filesystem when there is one (as `mirror bench --power-dir`
/// defaults to): the page cache's write path is what a `power` node pays per call.
fn disk_backed_dir() -> tempfile::TempDir {
    let var_tmp = std::path::Path::new("/var/tmp");
    if var_tmp.is_dir() {
        tempfile::tempdir_in(var_tmp)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary directory")
}

fn appends(c: &mut Criterion) {
    let dir = disk_backed_dir();
    let params = QueueParams {
        node_id: 1,
        role: Role::Primary,
        region_size: REGION,
        capacity_bytes: 16 << 20,
    };
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i * 31) as u8).collect();
    // The engine appends with the crc computed once, when the caller's bytes were taken in.
    let data_crc = mirror_proto::crc::crc32c(&data);
    let mut g = c.benchmark_group("power_appends_64x4KiB");
    g.throughput(Throughput::Bytes(BATCH * PAYLOAD as u64));
    for (name, in_run) in [("one_call_per_record", false), ("one_run", true)] {
        let mut queue = PersistentQueue::create(&dir.path().join(name), &params, Durability::Power)
            .expect("a queue");
        let mut seq = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                if in_run {
                    queue.begin_append_run();
                }
                for _ in 0..BATCH {
                    seq += 1;
                    let offset = (seq % (REGION / PAYLOAD as u64)) * PAYLOAD as u64;
                    queue
                        .append_with_crc(seq, 1, offset, &data, data_crc)
                        .expect("room: trimmed every batch");
                }
                if in_run {
                    queue.end_append_run().expect("the run written");
                }
                queue.trim_through(seq).expect("trimmed");
            })
        });
    }
    g.finish();
}

fn applies(c: &mut Criterion) {
    let dir = disk_backed_dir();
    let region = Arc::new(
        Region::open_or_create(&dir.path().join("region"), REGION, Durability::Power)
            .expect("a region"),
    );
    let mut writer = region.writer().expect("the region's writer");
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i * 13) as u8).collect();
    let slots = REGION / PAYLOAD as u64;
    // Written once over first, as `mirror bench` does before its `power` trials: no batch pays
    // for allocating a block.
    let mib = vec![0u8; 1 << 20];
    for at in (0..REGION).step_by(mib.len()) {
        writer.write(at, &mib).expect("in range");
    }
    writer.sync().expect("synced");
    let mut g = c.benchmark_group("power_applies_64x4KiB");
    g.throughput(Throughput::Bytes(BATCH * PAYLOAD as u64));
    for (pattern, stride) in [("sequential", 1u64), ("scattered", 2_654_435_761)] {
        let offsets: Vec<u64> = (1..=BATCH)
            .map(|i| (i.wrapping_mul(stride) % slots) * PAYLOAD as u64)
            .collect();
        g.bench_with_input(
            BenchmarkId::new("one_call_each", pattern),
            &offsets,
            |b, offsets| {
                b.iter(|| {
                    for &at in offsets {
                        writer.write(at, &data).expect("in range");
                    }
                })
            },
        );
        let writes: Vec<(u64, &[u8])> = offsets.iter().map(|&at| (at, &data[..])).collect();
        g.bench_with_input(
            BenchmarkId::new("gathered", pattern),
            &writes,
            |b, writes| b.iter(|| writer.write_gathered(writes).expect("in range")),
        );
    }
    g.finish();
}

criterion_group!(benches, appends, applies);
criterion_main!(benches);
