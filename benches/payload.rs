//! The per-byte pieces of a write's path: a payload taken in from a caller (copied, its crc
//! computed once for the frame and both records), against what the frame and the record cost
//! when each passes over the bytes itself; combining crcs (ours, against the `crc32c` crate's);
//! and a crc pass (ours, `mirror_proto::crc`, against the `crc32c` crate's), around the lengths
//! where `crc::WIDE_MIN` and `crc::COMBINE_MIN` switch between them.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirror_proto::crc::{crc32c_append, crc32c_combine};
use mirror_proto::Payload;

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
    let mut g = c.benchmark_group("crc_combine");
    for len in [64usize, 4096, 65536] {
        g.bench_with_input(BenchmarkId::new("ours", len), &len, |b, &n| {
            b.iter(|| crc32c_combine(std::hint::black_box(0x1234_5678), 0x9abc_def0, n))
        });
        g.bench_with_input(BenchmarkId::new("crc32c_crate", len), &len, |b, &n| {
            b.iter(|| crc32c::crc32c_combine(std::hint::black_box(0x1234_5678), 0x9abc_def0, n))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("crc_pass");
    for len in [64usize, 128, 256, 512, 1024, 4096, 8192, 65536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("ours", len), &data, |b, d| {
            b.iter(|| crc32c_append(0x1234_5678, std::hint::black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("crc32c_crate", len), &data, |b, d| {
            b.iter(|| crc32c::crc32c_append(0x1234_5678, std::hint::black_box(d)))
        });
    }
    g.finish();
}

criterion_group!(benches, payload);
criterion_main!(benches);
