//! Loom model checks of the ring and its doorbell: small scenarios, explored over every interleaving up to a
//! preemption bound and every value the memory model lets each load return. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p mirror-ring --release --target-dir target/loom --test loom`.
//!
//! Each test also names the situations its executions must reach (coverage marks) and fails if
//! loom never reached one: loom can silently explore less than intended, as it did here before
//! the crate's loom shim got its reader witnesses (see `src/primitive.rs`).
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use mirror_ring::{Consumer, Doorbell, Producer, Standby, SubmitRing};

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

// The doorbell (src/doorbell.rs). In each model the bell is a flag that stays set once rung,
// as libmirror's eventfd stays readable; the consumer's sleep is a decision, checked once
// every thread is done: a consumer that decided to sleep (parked, or in a long standby) must
// have been rung, or the work it did not see waits for the sleep's timeout. A sleeping
// consumer lowers its flags only after that check, as the real one does only once awake
// (lowering them at once let the other thread read them lowered and not ring, a failure of
// the model, not of the doorbell).

/// A bell that stays rung (level-triggered, like an eventfd).
#[derive(Default)]
struct Bell(AtomicBool);

impl Bell {
    fn ring_if(&self, must_ring: bool) {
        if must_ring {
            // Relaxed: read only after the threads are joined.
            self.0.store(true, Ordering::Relaxed);
        }
    }

    fn rung(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The consumer announces a park and takes its last look (`has_work`) while `other` runs on
/// its own thread; returns whether it parked (it stays parked until every thread is done) and
/// whether the bell was rung once all were.
fn park_beside(
    other: impl FnOnce(&Doorbell, &Bell) + Send + 'static,
    has_work: impl FnOnce(&Doorbell) -> bool,
) -> (bool, bool) {
    let doorbell = Arc::new(Doorbell::new());
    let bell = Arc::new(Bell::default());
    let other = thread::spawn({
        let (doorbell, bell) = (Arc::clone(&doorbell), Arc::clone(&bell));
        move || other(&doorbell, &bell)
    });
    doorbell.announce_park();
    let parks = !has_work(&doorbell);
    if !parks {
        doorbell.end_park();
    }
    other.join().unwrap();
    (parks, bell.rung())
}

/// A producer pushes and asks `must_ring` while the consumer parks: it must not park unrung
/// with the push unseen.
fn push_against_park(must_ring: fn(&Doorbell) -> bool) {
    let marks = [
        "the consumer saw the push and stayed up",
        "the consumer parked and was rung",
    ];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        let (parked, rung) = park_beside(
            move |doorbell, bell| {
                producer.try_push(7u8).unwrap();
                bell.ring_if(must_ring(doorbell));
            },
            |doorbell| !consumer.is_empty() || doorbell.callers_driving(),
        );
        if parked {
            assert!(
                rung,
                "the consumer parked with a push unseen and nobody rang"
            );
        }
        cov.hit(marks[usize::from(parked)]);
        assert_eq!(consumer.try_pop(), Some((0, 7)));
    });
}

#[test]
fn a_push_that_rings_for_a_park_is_never_left_unseen() {
    push_against_park(Doorbell::must_ring_after_push);
}

#[test]
fn a_submission_is_never_left_unseen_by_a_park() {
    push_against_park(Doorbell::must_ring_after_submission);
}

#[test]
fn a_caller_that_starts_driving_rings_a_consumer_parked_on_its_connection() {
    let marks = [
        "the consumer saw the caller and stayed up",
        "the consumer parked and was rung",
    ];
    model(&marks, move |cov| {
        let (parked, rung) = park_beside(
            |doorbell, bell| {
                // Still driving when the model ends.
                std::mem::forget(doorbell.start_driving());
                // After its first step (libmirror's `drive_while_waiting`).
                bell.ring_if(doorbell.must_ring_after_push());
            },
            Doorbell::callers_driving,
        );
        if parked {
            assert!(rung, "the consumer parked beside a driving caller, unrung");
        }
        cov.hit(marks[usize::from(parked)]);
    });
}

#[test]
fn a_caller_that_gives_up_driving_rings_a_standby() {
    let marks = [
        "the consumer stood by and was rung",
        "the consumer saw the caller gone and did not sleep",
    ];
    model(&marks, move |cov| {
        let doorbell = Arc::new(Doorbell::new());
        let bell = Arc::new(Bell::default());
        let caller = thread::spawn({
            let (doorbell, bell) = (Arc::clone(&doorbell), Arc::clone(&bell));
            move || {
                let driving = doorbell.start_driving();
                thread::yield_now();
                drop(driving);
                bell.ring_if(doorbell.must_ring_after_giving_up());
            }
        });
        let mut seen = doorbell.unwaited_submissions();
        let mut sleeps = false;
        if doorbell.callers_driving() {
            match doorbell.announce_standby(true, &mut seen) {
                Standby::Sleep { .. } => sleeps = true,
                Standby::Skip => {
                    doorbell.end_standby();
                    cov.hit(marks[1]);
                }
            }
        }
        caller.join().unwrap();
        if sleeps {
            assert!(
                bell.rung(),
                "the consumer stood by after the last caller gave up, unrung"
            );
            cov.hit(marks[0]);
            // Awake: only now (a sleeping consumer lowers no flag).
            doorbell.end_standby();
        }
    });
}

#[test]
fn a_submission_shortens_or_rings_a_long_standby() {
    let marks = [
        "the long standby was rung",
        "the consumer saw the submission and stood by short",
        "a long standby began before the submission",
    ];
    model(&marks, move |cov| {
        let (producer, mut consumer) = SubmitRing::with_capacity(2).unwrap();
        let doorbell = Arc::new(Doorbell::new());
        let bell = Arc::new(Bell::default());
        // A caller drives throughout.
        std::mem::forget(doorbell.start_driving());
        // Read when the consumer chose the long standby, before the submission.
        let mut seen = doorbell.unwaited_submissions();
        let submitter = thread::spawn({
            let (doorbell, bell) = (Arc::clone(&doorbell), Arc::clone(&bell));
            move || {
                producer.try_push(7u8).unwrap();
                bell.ring_if(doorbell.must_ring_after_submission());
            }
        });
        let standby = doorbell.announce_standby(true, &mut seen);
        submitter.join().unwrap();
        match standby {
            Standby::Sleep { long: true } => {
                assert!(bell.rung(), "a long standby missed a submission, unrung");
                if consumer.is_empty() {
                    unreachable!("joined: the push is visible");
                }
                cov.hit(marks[0]);
                cov.hit(marks[2]);
            }
            Standby::Sleep { long: false } => cov.hit(marks[1]),
            Standby::Skip => panic!("a caller drives throughout"),
        }
        doorbell.end_standby();
        assert_eq!(consumer.try_pop(), Some((0, 7)));
    });
}

/// The models above can fail: the same park with the consumer's fence left out (its flag's
/// store and its look at the ring may then pass each other) loses a push.
#[test]
#[should_panic(expected = "nobody rang")]
fn control_a_park_without_its_fence_loses_a_push() {
    model(&[], move |_| {
        let (producer, consumer) = SubmitRing::with_capacity(2).unwrap();
        let parked = Arc::new(AtomicBool::new(false));
        let bell = Arc::new(Bell::default());
        let pusher = thread::spawn({
            let (parked, bell) = (Arc::clone(&parked), Arc::clone(&bell));
            move || {
                producer.try_push(7u8).unwrap();
                loom::sync::atomic::fence(Ordering::SeqCst);
                bell.ring_if(parked.load(Ordering::Relaxed));
            }
        });
        parked.store(true, Ordering::Relaxed);
        let parks = consumer.is_empty();
        pusher.join().unwrap();
        if parks {
            assert!(
                bell.rung(),
                "the consumer parked with a push unseen and nobody rang"
            );
        }
    });
}
