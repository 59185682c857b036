//! The submission ring's push/pop cost, single-threaded and with a producer on another thread.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mirror_ring::SubmitRing;

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_pop_same_thread", |b| {
        let (p, mut q) = SubmitRing::with_capacity(1024).unwrap();
        b.iter(|| {
            p.try_push(std::hint::black_box(42u64)).unwrap();
            std::hint::black_box(q.try_pop().unwrap());
        })
    });
    g.bench_function("pop_with_producer_thread", |b| {
        let (p, mut q) = SubmitRing::with_capacity(4096).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let producer = std::thread::spawn(move || {
            let mut v = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if p.try_push(v).is_ok() {
                    v += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        b.iter(|| loop {
            if let Some(x) = q.try_pop() {
                break std::hint::black_box(x);
            }
            std::hint::spin_loop();
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        producer.join().unwrap();
    });
    g.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
