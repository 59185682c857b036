//! End-to-end engine benchmarks over loopback TCP: sync write latency (with the raw ping-pong
//! floor beside it), pipelined throughput by queue depth, and catch-up after K missed writes.
//! `mirror bench` prints the same measurements interleaved in one run with ratios.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirror::bench::{recovery, LocalPair, PingPong};

fn sync_write(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let pair = LocalPair::open(dir.path(), 64 << 20, &[]).unwrap();
    let mut g = c.benchmark_group("sync_write");
    for size in [64usize, 512, 4096, 65536] {
        g.throughput(Throughput::Bytes(size as u64));
        let mut pp = PingPong::start(size).unwrap();
        g.bench_with_input(
            BenchmarkId::new("tcp_pingpong_floor", size),
            &size,
            |b, _| b.iter(|| pp.round_trip().unwrap()),
        );
        drop(pp);
        let data = vec![0xA5u8; size];
        let slots = (64u64 << 20) / size as u64;
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new("engine", size), &size, |b, _| {
            b.iter(|| {
                i += 1;
                pair.primary
                    .write((i % slots) * size as u64, &data)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn pipelined(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let pair = LocalPair::open(dir.path(), 64 << 20, &[]).unwrap();
    let mut g = c.benchmark_group("pipelined_64B");
    for depth in [1u64, 8, 64] {
        g.throughput(Throughput::Elements(depth * 64));
        let data = [0x5Au8; 64];
        g.bench_with_input(BenchmarkId::from_parameter(depth), &depth, |b, &depth| {
            b.iter(|| {
                // One burst of 64 windows of `depth` writes.
                let mut i = 0u64;
                for _ in 0..64 {
                    let mut last = None;
                    for _ in 0..depth {
                        i += 1;
                        last = Some(pair.primary.submit((i % 4096) * 64, &data).unwrap());
                    }
                    pair.primary.wait(last.unwrap(), None).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn catch_up(c: &mut Criterion) {
    let mut g = c.benchmark_group("catch_up_4KiB_writes_64MiB_region");
    g.sample_size(10);
    for missed in [100u64, 1000] {
        g.bench_with_input(
            BenchmarkId::from_parameter(missed),
            &missed,
            |b, &missed| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempfile::tempdir().unwrap();
                        let r = recovery(dir.path(), 64 << 20, missed, 4096, 1).unwrap();
                        total += Duration::from_secs_f64(r.catch_up_s);
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, sync_write, pipelined, catch_up);
criterion_main!(benches);
