//! Many producers, one consumer, real threads: every value arrives exactly once, in each
//! producer's push order, at the position its producer was told, with no gaps.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use mirror_ring::SubmitRing;

const PRODUCERS: usize = 4;
const PUSHES_PER_PRODUCER: u32 = 10_000;
const TOTAL: usize = PRODUCERS * PUSHES_PER_PRODUCER as usize;

/// Pushes `value`, yielding while the ring is full. Bounded so a bug fails instead of hanging.
fn push_with_retry<T>(producer: &mirror_ring::Producer<T>, mut value: T) -> u64 {
    for _ in 0..50_000_000_u64 {
        match producer.try_push(value) {
            Ok(position) => return position,
            Err(back) => {
                value = back;
                thread::yield_now();
            }
        }
    }
    panic!("ring stayed full for 50M attempts");
}

fn run(capacity: usize) {
    let (producer, mut consumer) = SubmitRing::<(usize, u32)>::with_capacity(capacity).unwrap();

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let producer = producer.clone();
            thread::spawn(move || {
                (0..PUSHES_PER_PRODUCER)
                    .map(|seq| push_with_retry(&producer, (id, seq)))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    drop(producer);

    // Popped values, indexed by position.
    let mut by_position: Vec<(usize, u32)> = Vec::with_capacity(TOTAL);
    let mut batch = Vec::with_capacity(64);
    let mut idle_polls = 0_u64;
    while by_position.len() < TOTAL {
        batch.clear();
        let n = consumer.pop_batch(64, &mut batch);
        if n == 0 {
            idle_polls += 1;
            assert!(idle_polls < 50_000_000, "consumer starved");
            thread::yield_now();
            continue;
        }
        for &(position, value) in &batch {
            assert_eq!(
                position,
                by_position.len() as u64,
                "gap or reorder in positions"
            );
            by_position.push(value);
        }
    }
    assert_eq!(consumer.try_pop(), None);
    assert_eq!(consumer.popped(), TOTAL as u64);

    let tickets: Vec<Vec<u64>> = producers.into_iter().map(|h| h.join().unwrap()).collect();

    // Each producer's values arrive in its own push order, exactly once.
    let mut next_seq = [0_u32; PRODUCERS];
    for &(id, seq) in &by_position {
        assert_eq!(seq, next_seq[id], "producer {id} out of order");
        next_seq[id] += 1;
    }
    assert!(next_seq.iter().all(|&n| n == PUSHES_PER_PRODUCER));

    // The ticket each push returned is the position the consumer saw it at.
    for (id, tickets) in tickets.iter().enumerate() {
        for (seq, &position) in tickets.iter().enumerate() {
            assert_eq!(by_position[position as usize], (id, seq as u32));
        }
    }
}

#[test]
fn four_producers_small_ring_often_full() {
    run(8);
}

#[test]
fn four_producers_large_ring() {
    run(1024);
}

/// Counts its drops.
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn values_left_behind_by_threads_are_dropped_exactly_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (producer, mut consumer) = SubmitRing::with_capacity(64).unwrap();
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let producer = producer.clone();
            let drops = Arc::clone(&drops);
            thread::spawn(move || {
                let mut pushed = 0;
                for _ in 0..1_000 {
                    if producer.try_push(Counted(Arc::clone(&drops))).is_ok() {
                        pushed += 1;
                    }
                }
                pushed
            })
        })
        .collect();
    let mut popped = 0;
    for _ in 0..500 {
        if consumer.try_pop().is_some() {
            popped += 1;
        }
    }
    drop(consumer);
    let pushed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    // The failed pushes and the popped values are already dropped; the ring still holds the rest.
    assert_eq!(
        drops.load(Ordering::Relaxed),
        PRODUCERS * 1_000 - pushed + popped
    );
    drop(producer);
    assert_eq!(drops.load(Ordering::Relaxed), PRODUCERS * 1_000);
}
