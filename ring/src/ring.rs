//! The ring itself. This is the only module with `unsafe` code; the argument for it is in the
//! crate documentation ("Memory ordering") and at each block.

use core::fmt;
use core::mem::MaybeUninit;

use crossbeam_utils::CachePadded;

use crate::primitive::{Arc, AtomicU64, Ordering, UnsafeCell};
use crate::RingError;

/// The largest capacity [`SubmitRing::with_capacity`] accepts: 2^30 slots.
///
/// Far beyond any sensible submission queue; the bound exists so a corrupt or mistyped
/// configuration value fails loudly at start-up instead of trying to allocate the machine.
pub const MAX_CAPACITY: usize = 1 << 30;

/// Stamp of a slot that is empty and waiting for the producer that claims `position`.
#[inline]
const fn empty_stamp(position: u64) -> u64 {
    position << 1
}

/// Stamp of a slot that holds the value pushed at `position`, ready for the consumer.
#[inline]
const fn full_stamp(position: u64) -> u64 {
    (position << 1) | 1
}

/// One cell of the ring: the value and the stamp that says who may touch it.
struct Slot<T> {
    /// `empty_stamp(p)` or `full_stamp(p)` for the position `p` the slot currently serves; see
    /// the crate documentation for the full table.
    stamp: AtomicU64,
    /// Initialised exactly when `stamp` is `full_stamp(p)` for some `p` (or a producer that
    /// claimed `p` is between its write and its stamp store).
    value: UnsafeCell<MaybeUninit<T>>,
}

/// The shared state of a bounded multi-producer, single-consumer ring.
///
/// A `SubmitRing` is never handled directly: [`SubmitRing::with_capacity`] returns a cloneable
/// [`Producer`] and the one [`Consumer`], which share it. It is freed, together with any values
/// still queued in it, when the last of those handles is dropped.
pub struct SubmitRing<T> {
    /// Next position a producer will claim. Moves forward only, by a successful CAS in
    /// [`Producer::try_push`]; never decremented.
    tail: CachePadded<AtomicU64>,
    /// Next position the consumer will pop. Written only by the consumer, after it has freed
    /// the slot of `head - 1`; read for `len()` and when the ring is dropped. The algorithm
    /// itself never reads it: the stamps say everything the producers need.
    head: CachePadded<AtomicU64>,
    /// `capacity` slots; position `p` lives in `slots[p & mask]`.
    slots: Box<[Slot<T>]>,
    /// `capacity - 1`; capacity is a power of two.
    mask: u64,
}

// (`SubmitRing<T>: Send` when `T: Send` is derived by the compiler.)
// SAFETY: through a shared `&SubmitRing`, values of type `T` are moved in by producer threads and
// out by the consumer thread (or dropped by whichever thread drops the last handle), so
// `T: Send` is required and sufficient; nothing hands out `&T`, so `T: Sync` is not needed. Only
// one thread at a time touches a given slot's value (the producer that won the CAS for its
// position, then the consumer after acquiring the full stamp), as argued in the crate docs.
unsafe impl<T: Send> Sync for SubmitRing<T> {}

impl<T> SubmitRing<T> {
    /// Creates a ring with room for `capacity` values, rounded up to a power of two, and returns
    /// its producer and consumer handles.
    ///
    /// All slots are allocated here; pushing and popping never allocate.
    ///
    /// # Errors
    ///
    /// [`RingError::ZeroCapacity`] if `capacity` is 0, [`RingError::CapacityTooLarge`] if it is
    /// above [`MAX_CAPACITY`]. Both are caller mistakes (usually a configuration value).
    ///
    /// # Examples
    ///
    /// ```
    /// use mirror_ring::SubmitRing;
    /// # if mirror_ring::__LOOM_BUILD { return Ok(()); }
    ///
    /// let (producer, mut consumer) = SubmitRing::<&str>::with_capacity(3)?;
    /// assert_eq!(producer.capacity(), 4);
    /// assert_eq!(producer.try_push("a"), Ok(0));
    /// assert_eq!(producer.clone().try_push("b"), Ok(1));
    /// assert_eq!(consumer.try_pop(), Some((0, "a")));
    /// assert_eq!(consumer.try_pop(), Some((1, "b")));
    /// assert_eq!(consumer.try_pop(), None);
    /// # Ok::<(), mirror_ring::RingError>(())
    /// ```
    pub fn with_capacity(capacity: usize) -> Result<(Producer<T>, Consumer<T>), RingError> {
        if capacity == 0 {
            return Err(RingError::ZeroCapacity);
        }
        if capacity > MAX_CAPACITY {
            return Err(RingError::CapacityTooLarge {
                requested: capacity,
                max: MAX_CAPACITY,
            });
        }
        let capacity = capacity.next_power_of_two();
        assert!(capacity.is_power_of_two() && capacity <= MAX_CAPACITY);
        let capacity_u64 = capacity as u64;

        let slots: Box<[Slot<T>]> = (0..capacity_u64)
            .map(|index| Slot {
                // Slot `index` first serves position `index` (lap 0), empty.
                stamp: AtomicU64::new(empty_stamp(index)),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        assert_eq!(slots.len(), capacity);

        let ring = Arc::new(SubmitRing {
            tail: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
            slots,
            mask: capacity_u64 - 1,
        });
        let producer = Producer {
            ring: Arc::clone(&ring),
        };
        let consumer = Consumer { ring, head: 0 };
        Ok((producer, consumer))
    }

    /// Number of slots (a power of two).
    #[inline]
    fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn slot(&self, position: u64) -> &Slot<T> {
        // `mask < capacity <= 2^30`, so the index fits in `usize` and is in bounds.
        &self.slots[(position & self.mask) as usize]
    }

    /// A racy estimate of the number of claimed but not yet popped positions.
    fn len_from(&self, head: u64) -> usize {
        // Relaxed: a snapshot; nothing is read through it. `tail >= head` holds for any `head`
        // this thread has seen with happens-before (the consumer popped `head - 1` only after
        // acquiring the stamp stored after the CAS that moved `tail` past it), and
        // `saturating_sub` keeps the estimate sane regardless.
        let tail = self.tail.load(Ordering::Relaxed);
        let claimed = tail.saturating_sub(head);
        // Can exceed the capacity momentarily: a producer may claim `head + capacity` after the
        // consumer freed that slot but before the consumer published the new `head`.
        claimed.min(self.capacity() as u64) as usize
    }
}

impl<T> Drop for SubmitRing<T> {
    fn drop(&mut self) {
        // Relaxed suffices for both loads: `&mut self` means every handle is gone, and the
        // `Arc` that owned us made all their writes happen-before this drop (release decrement,
        // acquire fence on the last one).
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        assert!(head <= tail, "head {head} ahead of tail {tail}");
        assert!(tail - head <= self.capacity() as u64);
        for position in head..tail {
            let slot = self.slot(position);
            let stamp = slot.stamp.load(Ordering::Relaxed);
            // Every claim has been completed: a producer holds its `Arc` for the whole of
            // `try_push`, and nothing between its CAS and its stamp store can panic.
            debug_assert_eq!(stamp, full_stamp(position), "unfinished push at {position}");
            if stamp != full_stamp(position) {
                // Leaking is the safe choice if that invariant were ever broken.
                continue;
            }
            slot.value.with_mut(|value| {
                // SAFETY: the stamp says the slot holds the value pushed at `position`, which
                // the consumer never popped (`position >= head`); we have exclusive access
                // (`&mut self`), and each slot is dropped at most once because the positions
                // `head..tail` map to distinct slots (`tail - head <= capacity`, asserted above).
                unsafe { (*value).assume_init_drop() }
            });
        }
    }
}

impl<T> fmt::Debug for SubmitRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitRing")
            .field("capacity", &self.capacity())
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .field("head", &self.head.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The pushing side of a [`SubmitRing`]: cheap to clone, shared by any number of threads.
pub struct Producer<T> {
    ring: Arc<SubmitRing<T>>,
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        Self {
            ring: Arc::clone(&self.ring),
        }
    }
}

impl<T> Producer<T> {
    /// Places `value` in the ring and returns its **position**: the number of pushes that were
    /// ordered before it, counting from 0. The consumer pops values strictly in position order,
    /// so the position is a ticket for the request.
    ///
    /// Never blocks and never allocates. Lock-free: if this call has to retry, another producer
    /// has claimed a position in the meantime (or a weak CAS failed spuriously).
    ///
    /// If the [`Consumer`] has been dropped, pushes succeed until the ring is full and fail
    /// from then on; the values are dropped with the last handle.
    ///
    /// # Errors
    ///
    /// Gives `value` back if the ring is full: `capacity()` positions are claimed and not yet
    /// popped. "Full" is judged from what this thread can see: every pop that happens-before
    /// this call is taken into account, a pop racing with it may or may not be. A slot whose
    /// producer has claimed it but not finished writing it also counts as taken.
    pub fn try_push(&self, value: T) -> Result<u64, T> {
        let ring = &*self.ring;
        // Relaxed: only a guess at the position to claim; the stamp and the CAS below decide.
        let mut tail = ring.tail.load(Ordering::Relaxed);
        loop {
            let slot = ring.slot(tail);
            // Acquire: pairs with the consumer's Release store of `empty_stamp(tail)` in
            // `try_pop`, so its move of the previous lap's value out of this slot
            // happens-before our write below. (For lap 0 the stamp was set before the ring was
            // shared.) Also pairs with other producers' Release store of a full stamp, which
            // makes their CAS on `tail` visible to the reload below.
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == empty_stamp(tail) {
                // The slot is free for position `tail`; claim the position. Relaxed on success
                // and failure: the CAS only decides which producer owns `tail` (read-modify-
                // writes on one atomic are totally ordered, so exactly one wins); the slot's
                // contents are published by the stamp, not by `tail`.
                match ring.tail.compare_exchange_weak(
                    tail,
                    tail + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        slot.value.with_mut(|cell| {
                            // SAFETY: we won position `tail`, and the slot's stamp is
                            // `empty_stamp(tail)`, so no one else reads or writes this cell until
                            // we store `full_stamp(tail)`: other producers wait for a later empty
                            // stamp, the consumer for the full one. The previous lap's value was
                            // moved out before that stamp was stored (Acquire above), so
                            // overwriting leaks nothing.
                            unsafe { cell.write(MaybeUninit::new(value)) };
                        });
                        // Release: publishes the value just written; pairs with the consumer's
                        // Acquire stamp load in `try_pop` (and with a producer's Acquire load, see
                        // above).
                        slot.stamp.store(full_stamp(tail), Ordering::Release);
                        return Ok(tail);
                    }
                    // Another producer took `tail` (or the weak CAS failed spuriously): retry
                    // at the current tail.
                    Err(current) => tail = current,
                }
            } else if stamp < empty_stamp(tail) {
                // The slot still serves the previous lap, position `tail - capacity`: its value
                // is not popped yet (or its producer is still writing it), so `capacity`
                // positions are claimed and unpopped: full, as far as this thread can see. A pop
                // of that position that happens-before this call is visible to the Acquire load
                // above; one racing with it may not be, and need not be (Vyukov's rule;
                // crossbeam's `ArrayQueue` also rereads `head` after a `SeqCst` fence to order
                // "full" against racing pops, which the engine, retrying on full, does not need).
                return Err(value);
            } else {
                // `stamp > empty_stamp(tail)`: position `tail` was already claimed and our guess
                // was stale. The stamp we acquired was stored (Release) by the producer of
                // `tail` after its CAS, or by the consumer after acquiring that producer's
                // stamp; either way the CAS that moved `tail` past our guess happens-before
                // this Relaxed reload, which therefore returns a larger value: progress. (Loom
                // finds a livelock here if either stamp store is weakened to Relaxed.)
                tail = ring.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Number of positions claimed so far, which is the position the next successful push will
    /// get if no other producer pushes first. A snapshot: other producers may move it at once.
    #[must_use]
    pub fn pushed(&self) -> u64 {
        // Relaxed: a counter snapshot; no data is read through it.
        self.ring.tail.load(Ordering::Relaxed)
    }

    /// Number of values in the ring: an estimate, racy by nature (pushes and pops run
    /// concurrently). Fine for metrics and back-pressure heuristics; never for deciding whether
    /// a push will succeed, which only [`try_push`](Self::try_push) can tell. Counts claimed
    /// positions whose value is still being written. At most `capacity()`.
    #[must_use]
    pub fn len(&self) -> usize {
        // Acquire: pairs with the consumer's Release store of `head`, so the tail we read next
        // is at least that head (see `len_from`).
        let head = self.ring.head.load(Ordering::Acquire);
        self.ring.len_from(head)
    }

    /// `len() == 0`, with the same caveats: the answer may be stale by the time it is used.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots: the requested capacity rounded up to a power of two.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("pushed", &self.pushed())
            .finish()
    }
}

/// The popping side of a [`SubmitRing`]. There is exactly one per ring: it is not `Clone`, and
/// popping takes `&mut self`, so the single-consumer rule is enforced by the type system.
///
/// ```compile_fail
/// let (_producer, consumer) = mirror_ring::SubmitRing::<u8>::with_capacity(4).unwrap();
/// let second_consumer = consumer.clone(); // error: `Consumer` is not `Clone`
/// ```
pub struct Consumer<T> {
    ring: Arc<SubmitRing<T>>,
    /// Next position to pop; the consumer's own copy of `ring.head` (it is the only writer).
    head: u64,
}

impl<T> Consumer<T> {
    /// Pops the value at the next position, returning `(position, value)`. Positions come out
    /// strictly in order: 0, 1, 2, ... with no gaps.
    ///
    /// Returns `None` if the next position has not been written yet. That includes the case
    /// where a producer has claimed the next position but not finished writing it while later
    /// positions are already written: those wait behind it, because popping them first would
    /// break position order. A producer that is descheduled inside `try_push` therefore
    /// stalls the consumer until it runs again (the price of Vyukov's algorithm; the window is
    /// a handful of instructions with no calls out).
    pub fn try_pop(&mut self) -> Option<(u64, T)> {
        let ring = &*self.ring;
        let head = self.head;
        let slot = ring.slot(head);
        // Acquire: pairs with the producer's Release store of `full_stamp(head)` in `try_push`,
        // so its write of the value happens-before our read below.
        let stamp = slot.stamp.load(Ordering::Acquire);
        if stamp != full_stamp(head) {
            // We freed this slot's previous lap ourselves (stored `empty_stamp(head)`), and only
            // the producer of `head` can move it on, to `full_stamp(head)`.
            assert_eq!(
                stamp,
                empty_stamp(head),
                "slot of position {head} has an impossible stamp"
            );
            return None;
        }
        let value = slot.value.with(|cell| {
            // SAFETY: the full stamp says the producer of `head` has written the value, and its
            // write happens-before this read (Acquire above). Until we store the next empty
            // stamp no producer touches the cell (they wait for `empty_stamp(head + capacity)`),
            // and no one else pops (`&mut self` on the only consumer). We move the value out
            // and mark the cell logically uninitialised by storing an empty stamp below, so it
            // is neither read nor dropped again.
            unsafe { cell.read().assume_init() }
        });
        let next = head + 1;
        // Release: publishes that our read of the value is complete, so the cell may be
        // overwritten; pairs with the Acquire stamp load in `try_push` of the producer of
        // `head + capacity`.
        slot.stamp.store(
            empty_stamp(head + ring.capacity() as u64),
            Ordering::Release,
        );
        // Release: publishes our pops up to `head`, so that the `tail` a reader loads after
        // acquiring this value is at least `next`; pairs with the Acquire load in
        // `Producer::len`.
        ring.head.store(next, Ordering::Release);
        self.head = next;
        Some((head, value))
    }

    /// Pops up to `max` values in position order into `out`; returns how many were popped.
    /// Stops early at the first position that is not ready, as [`try_pop`](Self::try_pop) does.
    ///
    /// ```
    /// use mirror_ring::SubmitRing;
    /// # if mirror_ring::__LOOM_BUILD { return Ok(()); }
    ///
    /// let (producer, mut consumer) = SubmitRing::with_capacity(8)?;
    /// for v in 10..15 {
    ///     producer.try_push(v).unwrap();
    /// }
    /// let mut batch = Vec::new();
    /// assert_eq!(consumer.pop_batch(3, &mut batch), 3);
    /// assert_eq!(batch, [(0, 10), (1, 11), (2, 12)]);
    /// # Ok::<(), mirror_ring::RingError>(())
    /// ```
    pub fn pop_batch(&mut self, max: usize, out: &mut impl Extend<(u64, T)>) -> usize {
        let mut popped = 0;
        out.extend(core::iter::from_fn(|| {
            if popped == max {
                return None;
            }
            let item = self.try_pop()?;
            popped += 1;
            Some(item)
        }));
        assert!(popped <= max);
        popped
    }

    /// Number of values popped so far, which is the position the next `try_pop` returns.
    /// Exact: only this consumer moves it.
    #[must_use]
    pub fn popped(&self) -> u64 {
        self.head
    }

    /// Number of values in the ring: an estimate, since producers push concurrently (see
    /// [`Producer::len`]). Never less than what the next `try_pop` calls can pop without a
    /// further push, unless those pushes are concurrent with this call.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ring.len_from(self.head)
    }

    /// `len() == 0`, with the same caveats. A `false` answer does not promise that `try_pop`
    /// succeeds: the next position may be claimed but not yet written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots: the requested capacity rounded up to a power of two.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("popped", &self.popped())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn stamps_are_distinct_for_every_capacity() {
        // The low bit separates full from empty, so even capacity 1 is unambiguous: the slot of
        // position p holds full_stamp(p) while the next lap waits for empty_stamp(p + 1).
        for p in [0_u64, 1, 7, 1 << 40] {
            assert_ne!(full_stamp(p), empty_stamp(p + 1));
            assert!(empty_stamp(p) < full_stamp(p));
            assert!(full_stamp(p) < empty_stamp(p + 1));
        }
    }

    #[test]
    fn capacity_rounds_up_to_power_of_two() {
        for (asked, got) in [
            (1, 1),
            (2, 2),
            (3, 4),
            (5, 8),
            (1000, 1024),
            (1 << 20, 1 << 20),
        ] {
            let (p, c) = SubmitRing::<u8>::with_capacity(asked).unwrap();
            assert_eq!(p.capacity(), got, "asked {asked}");
            assert_eq!(c.capacity(), got);
        }
    }

    #[test]
    fn zero_and_absurd_capacities_are_caller_errors() {
        assert_eq!(
            SubmitRing::<u8>::with_capacity(0).unwrap_err(),
            RingError::ZeroCapacity
        );
        assert_eq!(
            SubmitRing::<u8>::with_capacity(MAX_CAPACITY + 1).unwrap_err(),
            RingError::CapacityTooLarge {
                requested: MAX_CAPACITY + 1,
                max: MAX_CAPACITY
            }
        );
        assert!(matches!(
            SubmitRing::<u8>::with_capacity(usize::MAX),
            Err(RingError::CapacityTooLarge { .. })
        ));
    }

    #[test]
    fn push_until_full_then_pop_frees_one_slot() {
        let (p, mut c) = SubmitRing::with_capacity(4).unwrap();
        for v in 0..4_u32 {
            assert_eq!(p.try_push(v * 10), Ok(u64::from(v)));
        }
        assert_eq!(p.len(), 4);
        assert_eq!(p.try_push(99), Err(99));
        assert_eq!(p.pushed(), 4, "a failed push claims nothing");
        assert_eq!(c.try_pop(), Some((0, 0)));
        assert_eq!(p.try_push(40), Ok(4));
        assert_eq!(p.try_push(50), Err(50));
        let mut out = Vec::new();
        assert_eq!(c.pop_batch(usize::MAX, &mut out), 4);
        assert_eq!(out, [(1, 10), (2, 20), (3, 30), (4, 40)]);
        assert_eq!(c.try_pop(), None);
        assert_eq!(c.popped(), 5);
        assert!(c.is_empty() && p.is_empty());
    }

    #[test]
    fn capacity_one_alternates_push_and_pop() {
        let (p, mut c) = SubmitRing::with_capacity(1).unwrap();
        for round in 0..10_u64 {
            assert_eq!(p.try_push(round), Ok(round));
            assert_eq!(p.try_push(round + 100), Err(round + 100));
            assert_eq!(c.len(), 1);
            assert_eq!(c.try_pop(), Some((round, round)));
            assert_eq!(c.try_pop(), None);
        }
    }

    #[test]
    fn pop_batch_respects_max_and_stops_when_empty() {
        let (p, mut c) = SubmitRing::with_capacity(8).unwrap();
        for v in 0..5 {
            p.try_push(v).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(c.pop_batch(0, &mut out), 0);
        assert_eq!(c.pop_batch(2, &mut out), 2);
        assert_eq!(c.pop_batch(10, &mut out), 3);
        assert_eq!(c.pop_batch(10, &mut out), 0);
        let positions: Vec<u64> = out.iter().map(|&(pos, _)| pos).collect();
        assert_eq!(positions, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn zero_sized_values_work() {
        let (p, mut c) = SubmitRing::with_capacity(2).unwrap();
        assert_eq!(p.try_push(()), Ok(0));
        assert_eq!(p.try_push(()), Ok(1));
        assert_eq!(p.try_push(()), Err(()));
        assert_eq!(c.try_pop(), Some((0, ())));
    }

    /// Counts drops of its instances.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn drop_releases_values_left_in_the_ring_after_wrapping() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (p, mut c) = SubmitRing::with_capacity(4).unwrap();
        // Wrap around so the remaining values straddle the end of the slot array.
        for _ in 0..6 {
            assert!(p.try_push(Counted(Arc::clone(&drops))).is_ok());
            if p.len() == 3 {
                drop(c.try_pop().unwrap());
            }
        }
        let popped = c.popped() as usize;
        assert_eq!(drops.load(Ordering::Relaxed), popped);
        drop(c); // consumer first: the ring survives while a producer holds it
        assert_eq!(drops.load(Ordering::Relaxed), popped);
        let p2 = p.clone();
        drop(p);
        assert_eq!(drops.load(Ordering::Relaxed), popped);
        drop(p2);
        assert_eq!(drops.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn handles_are_send_and_sync_where_promised() {
        fn send<X: Send>() {}
        fn sync<X: Sync>() {}
        fn clone<X: Clone>() {}
        send::<Producer<String>>();
        sync::<Producer<String>>();
        clone::<Producer<String>>();
        send::<Consumer<String>>();
        // `Producer<T>` must not need `T: Sync` (only moved, never shared).
        send::<Producer<std::cell::Cell<u8>>>();
        sync::<Producer<std::cell::Cell<u8>>>();
    }

    #[test]
    fn debug_output_does_not_need_t_debug() {
        struct Opaque;
        let (p, c) = SubmitRing::<Opaque>::with_capacity(2).unwrap();
        assert_eq!(format!("{p:?}"), "Producer { capacity: 2, pushed: 0 }");
        assert_eq!(format!("{c:?}"), "Consumer { capacity: 2, popped: 0 }");
    }
}
