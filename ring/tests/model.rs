//! Property test: single-threaded interleavings of pushes and pops, against a `VecDeque` model.
#![cfg(not(loom))]

use std::collections::VecDeque;

use mirror_ring::SubmitRing;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Push(u32),
    Pop,
    PopBatch(usize),
    CloneProducer,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u32>().prop_map(Op::Push),
        3 => Just(Op::Pop),
        1 => (0_usize..8).prop_map(Op::PopBatch),
        1 => Just(Op::CloneProducer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ring_matches_vecdeque_model(
        requested in 1_usize..=40,
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let (producer, mut consumer) = SubmitRing::<u32>::with_capacity(requested).unwrap();
        let mut producers = vec![producer];
        let capacity = requested.next_power_of_two();
        prop_assert_eq!(consumer.capacity(), capacity);

        // Model: queued (position, value) pairs and the next position to hand out.
        let mut model: VecDeque<(u64, u32)> = VecDeque::new();
        let mut next_position = 0_u64;

        for (step, op) in ops.into_iter().enumerate() {
            // Rotate through the producer clones: they all share one ring.
            let producer = producers[step % producers.len()].clone();
            match op {
                Op::Push(value) => {
                    let got = producer.try_push(value);
                    if model.len() == capacity {
                        prop_assert_eq!(got, Err(value));
                    } else {
                        prop_assert_eq!(got, Ok(next_position));
                        model.push_back((next_position, value));
                        next_position += 1;
                    }
                }
                Op::Pop => prop_assert_eq!(consumer.try_pop(), model.pop_front()),
                Op::PopBatch(max) => {
                    let mut out = Vec::new();
                    let n = consumer.pop_batch(max, &mut out);
                    let want: Vec<_> = (0..max.min(model.len()))
                        .map(|_| model.pop_front().unwrap())
                        .collect();
                    prop_assert_eq!(n, want.len());
                    prop_assert_eq!(out, want);
                }
                Op::CloneProducer => {
                    if producers.len() < 4 {
                        producers.push(producer.clone());
                    }
                }
            }
            let producer = &producers[producers.len() - 1];
            prop_assert_eq!(producer.len(), model.len());
            prop_assert_eq!(consumer.len(), model.len());
            prop_assert_eq!(producer.is_empty(), model.is_empty());
            prop_assert_eq!(producer.pushed(), next_position);
            prop_assert_eq!(
                consumer.popped(),
                model.front().map_or(next_position, |&(pos, _)| pos)
            );
        }
    }
}
