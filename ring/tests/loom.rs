//! Loom model checks of the ring: small scenarios, explored over every interleaving up to a
//! preemption bound and every value the memory model lets each load return. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p mirror-ring --release --target-dir target/loom --test loom`.
//!
//! Each test also names the situations its executions must reach (coverage marks) and fails if
//! loom never reached one: loom can silently explore less than intended, as it did here before
//! the crate's loom shim got its reader witnesses (see `src/primitive.rs`).
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use mirror_ring::{Consumer, Producer, SubmitRing};

/// Preemption bound used unless `LOOM_MAX_PREEMPTIONS` says otherwise. With the reader
/// witnesses in the crate's loom shim (which make loom consider every load/store race), the
/// unbounded models take minutes; loom's authors find almost all bugs within 2 or 3
/// preemptions, and at 3 this file runs in about 15 seconds in release mode.
const DEFAULT_MAX_PREEMPTIONS: usize = 3;

/// The coverage marks reached by any execution of a model.
#[derive(Default)]
struct Coverage(std::sync::Mutex<std::collections::BTreeSet<&'static str>>);

impl Coverage {
    /// Records that the current execution reached `mark`.
    fn hit(&self, mark: &'static str) {
        self.0.lock().unwrap().insert(mark);
    }
}

/// Runs `f` under loom (as `loom::model` does, but bounding preemptions by default), then
/// asserts that some execution reached each of `marks`. Reports how many executions were
/// explored (see it with `-- --nocapture`), so a model that grows too large shows up before it
/// gets slow.
fn model(marks: &[&'static str], f: impl Fn(&Coverage) + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::Relaxed};

    let start = std::time::Instant::now();
    let executions = std::sync::Arc::new(StdAtomicUsize::new(0));
    let coverage = std::sync::Arc::new(Coverage::default());
    let mut builder = loom::model::Builder::new(); // reads the LOOM_* environment variables
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_MAX_PREEMPTIONS);
    }
    let bound = builder.preemption_bound;
    builder.check({
        let executions = std::sync::Arc::clone(&executions);
        let coverage = std::sync::Arc::clone(&coverage);
        move || {
            executions.fetch_add(1, Relaxed);
            f(&coverage);
        }
    });
    let reached = coverage.0.lock().unwrap();
    for mark in marks {
        assert!(reached.contains(mark), "no execution reached {mark:?}");
    }
    let n = executions.load(Relaxed);
    // libtest names the thread running a test after the test.
    let name = std::thread::current()
        .name()
        .unwrap_or("loom model")
        .to_owned();
    println!(
        "{name}: {n} executions, preemption bound {bound:?}, in {:?}",
        start.elapsed()
    );
}

/// Pushes `value`, yielding to the other threads while the ring is full. Returns the position
/// and whether the ring was ever found full.
fn push_spin<T>(producer: &Producer<T>, mut value: T) -> (u64, bool) {
    let mut waited = false;
    loop {
        match producer.try_push(value) {
            Ok(position) => return (position, waited),
            Err(back) => {
                value = back;
                waited = true;
                thread::yield_now();
            }
        }
    }
}

/// Pops one value, yielding to the other threads while nothing is ready. Returns the item and
/// whether it had to wait.
fn pop_spin<T>(consumer: &mut Consumer<T>) -> ((u64, T), bool) {
    let mut waited = false;
    loop {
        if let Some(item) = consumer.try_pop() {
            return (item, waited);
        }
        waited = true;
        thread::yield_now();
    }
}

#[test]
fn two_producers_one_consumer_positions_follow_tickets() {
    let marks = ["consumer saw a push while pushes ran", "b pushed first"];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        let threads: Vec<_> = ['a', 'b']
            .into_iter()
            .map(|value| {
                let producer = producer.clone();
                thread::spawn(move || (value, producer.try_push(value).unwrap()))
            })
            .collect();
        // Poll concurrently with the pushes, then collect the rest after they finish.
        let mut popped = Vec::new();
        popped.extend(consumer.try_pop());
        popped.extend(consumer.try_pop());
        if !popped.is_empty() {
            cov.hit(marks[0]);
        }
        let tickets: Vec<(char, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        consumer.pop_batch(2, &mut popped);
        if tickets.contains(&('b', 0)) {
            cov.hit(marks[1]);
        }

        assert_eq!(popped.len(), 2);
        for (i, &(position, _)) in popped.iter().enumerate() {
            assert_eq!(position, i as u64, "positions out of order: {popped:?}");
        }
        for (value, ticket) in tickets {
            assert_eq!(
                popped[ticket as usize].1, value,
                "ticket does not match position"
            );
        }
        assert_eq!(producer.pushed(), 2);
        assert_eq!(consumer.popped(), 2);
    });
}

#[test]
fn two_producers_overfill_capacity_two() {
    let marks = ["a push was refused", "a slot was reused"];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        // Three pushes into two slots while the consumer pops once: at least two must fit,
        // a refused value comes back intact, and whatever fits comes out in ticket order.
        let a = {
            let producer = producer.clone();
            thread::spawn(move || {
                [10_u32, 11].map(|v| {
                    producer
                        .try_push(v)
                        .map_err(|back| assert_eq!(back, v))
                        .ok()
                })
            })
        };
        let b = {
            let producer = producer.clone();
            thread::spawn(move || {
                [20_u32].map(|v| {
                    producer
                        .try_push(v)
                        .map_err(|back| assert_eq!(back, v))
                        .ok()
                })
            })
        };
        let mut popped = Vec::new();
        popped.extend(consumer.try_pop());
        let a = a.join().unwrap();
        let b = b.join().unwrap();
        consumer.pop_batch(usize::MAX, &mut popped);

        let pushed: Vec<(u32, u64)> = [10, 11]
            .into_iter()
            .zip(a)
            .chain([20].into_iter().zip(b))
            .filter_map(|(v, t)| Some((v, t?)))
            .collect();
        cov.hit(marks[if pushed.len() < 3 { 0 } else { 1 }]);
        assert!(
            pushed.len() >= 2,
            "reported full with a free slot: {pushed:?}"
        );
        assert_eq!(popped.len(), pushed.len());
        assert_eq!(producer.pushed(), pushed.len() as u64);
        for (i, &(position, _)) in popped.iter().enumerate() {
            assert_eq!(position, i as u64);
        }
        for (value, ticket) in pushed {
            assert_eq!(popped[ticket as usize].1, value);
        }
        // Producer `a`'s values keep its order.
        let a_order: Vec<u32> = popped.iter().map(|&(_, v)| v).filter(|&v| v < 20).collect();
        assert!(a_order.windows(2).all(|w| w[0] < w[1]), "{a_order:?}");
    });
}

#[test]
fn two_producers_wrap_around_a_full_ring_in_ticket_order() {
    let marks = [
        "a push was refused",
        "all four pushes accepted",
        "consumer popped a second-lap position while pushes ran",
    ];
    model(&marks, move |cov| {
        // Four pushes into two slots while the consumer pops up to three times: depending on
        // the interleaving, producers find the ring full or reuse a slot on its second lap.
        // Refused values come back intact; accepted ones come out once, in ticket order. No
        // thread spins, so loom's exploration stays finite.
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        let threads: Vec<_> = [[10_u32, 11], [20, 21]]
            .into_iter()
            .map(|values| {
                let producer = producer.clone();
                thread::spawn(move || {
                    values.map(|v| {
                        let ticket = producer.try_push(v).map_err(|back| assert_eq!(back, v));
                        (v, ticket.ok())
                    })
                })
            })
            .collect();
        let mut popped = Vec::new();
        for _ in 0..3 {
            popped.extend(consumer.try_pop());
        }
        let concurrent_pops = popped.len();
        let pushed: Vec<(u32, u64)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .filter_map(|(v, ticket)| Some((v, ticket?)))
            .collect();
        consumer.pop_batch(usize::MAX, &mut popped);
        cov.hit(marks[if pushed.len() < 4 { 0 } else { 1 }]);
        if popped[..concurrent_pops]
            .iter()
            .any(|&(position, _)| position >= 2)
        {
            cov.hit(marks[2]);
        }

        assert!(
            pushed.len() >= 2,
            "reported full with a free slot: {pushed:?}"
        );
        assert!(
            pushed.len() <= 2 + concurrent_pops,
            "accepted more than the free slots"
        );
        assert_eq!(popped.len(), pushed.len());
        assert_eq!(producer.pushed(), pushed.len() as u64);
        for (i, &(position, _)) in popped.iter().enumerate() {
            assert_eq!(position, i as u64, "positions out of order: {popped:?}");
        }
        for &(value, ticket) in &pushed {
            assert_eq!(
                popped[ticket as usize].1, value,
                "ticket does not match position"
            );
        }
        // Each producer's accepted values keep its push order.
        for producer_values in [[10, 11], [20, 21]] {
            let mine: Vec<u32> = popped
                .iter()
                .map(|&(_, v)| v)
                .filter(|v| producer_values.contains(v))
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        }
    });
}

#[test]
fn pop_from_full_ring_unblocks_a_waiting_producer() {
    let marks = ["producer found the ring full", "producer got in at once"];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        assert_eq!(producer.try_push(0_u32), Ok(0));
        assert_eq!(producer.try_push(1), Ok(1));
        assert_eq!(producer.try_push(2), Err(2));
        // The producer spins on "full" until it sees the consumer's pop; this terminates in
        // every interleaving only if a freed slot is always eventually visible to it.
        let waiter = {
            let producer = producer.clone();
            thread::spawn(move || push_spin(&producer, 2))
        };
        assert_eq!(consumer.try_pop(), Some((0, 0)));
        let (position, waited) = waiter.join().unwrap();
        assert_eq!(position, 2);
        cov.hit(marks[if waited { 0 } else { 1 }]);
        assert_eq!(consumer.try_pop(), Some((1, 1)));
        assert_eq!(consumer.try_pop(), Some((2, 2)));
        assert_eq!(consumer.try_pop(), None);
    });
}

#[test]
fn capacity_one_reuses_its_slot_in_order() {
    let marks = [
        "producer waited for the slot",
        "consumer waited for a value",
    ];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(1).unwrap();
        let pusher = thread::spawn(move || [push_spin(&producer, 'x'), push_spin(&producer, 'y')]);
        let (x, x_waited) = pop_spin(&mut consumer);
        let (y, y_waited) = pop_spin(&mut consumer);
        assert_eq!([x, y], [(0, 'x'), (1, 'y')]);
        let [(x_ticket, _), (y_ticket, producer_waited)] = pusher.join().unwrap();
        assert_eq!([x_ticket, y_ticket], [0, 1]);
        if producer_waited {
            cov.hit(marks[0]);
        }
        if x_waited || y_waited {
            cov.hit(marks[1]);
        }
    });
}

/// Counts its drops.
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn values_left_in_the_ring_are_dropped_once_by_the_last_handle() {
    let marks = ["consumer popped one", "consumer found nothing"];
    model(&marks, move |cov| {
        let drops = Arc::new(AtomicUsize::new(0));
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        // Two producers push and drop their handles; the consumer pops at most one value and
        // drops its handle; the ring is freed by whichever thread lets go last.
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let producer = producer.clone();
                let drops = Arc::clone(&drops);
                thread::spawn(move || {
                    assert!(producer.try_push(Counted(drops)).is_ok());
                })
            })
            .collect();
        drop(producer);
        let popped = consumer.try_pop();
        cov.hit(marks[if popped.is_some() { 0 } else { 1 }]);
        drop(popped);
        drop(consumer);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    });
}
