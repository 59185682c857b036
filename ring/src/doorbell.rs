//! The doorbell: how the ring's producers, and callers that run the consumer's loop themselves,
//! know when the consumer sleeps and must be woken.
//!
//! The consumer (libmirror's polling thread) sleeps in two ways, and each has a flag it raises
//! before it sleeps:
//!
//! * **parked**: idle, asleep on its wake-up descriptor and its connections until something
//!   happens. A producer that pushed must ring it (or the push waits for the park's timeout).
//! * **standing by**: callers drive its loop themselves (run to completion), so it stays off
//!   their CPUs. A caller that gives up driving before its write settled must ring it. A
//!   standby is short, or **long** once callers drove through a short one with nothing
//!   submitted meanwhile; a submission nobody waits for must ring a long one.
//!
//! Every such pair is Dekker's: each side stores its flag (or pushes, or counts), issues a
//! `SeqCst` fence, then loads the other side's. Both fences are in one total order, so of two
//! sides that raced at least one sees the other: the consumer sees the push, the driving caller
//! or the submission and does not sleep (or sleeps short), or the producer sees the flag and
//! rings. The bell itself (an eventfd in libmirror) is level-triggered, so a ring that lands
//! after the sleep ended ends the next one at once: a spare ring costs a wake-up, never a lost
//! write. The flags' own loads and stores are `Relaxed`: the fences order them.
//!
//! The ring's side of the pairing is [`Consumer::is_empty`](crate::Consumer::is_empty) read
//! after [`Doorbell::announce_park`]: the push's claim of its position comes before the
//! producer's fence, so a consumer whose fence follows it sees the ring non-empty.
//!
//! `tests/loom.rs` model-checks each pairing against the ring's code: no interleaving leaves the
//! consumer asleep (parked, or in a long standby) while a push, a submission or a caller that
//! gave up waits for it unrung.

use crate::primitive::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// The consumer's sleep flags and the counts the pairings read (see the module documentation).
#[derive(Debug)]
pub struct Doorbell {
    /// The consumer is parked (or about to park: it looks once more after raising this).
    parked: AtomicBool,
    /// The consumer stands by while callers drive its loop.
    standing_by: AtomicBool,
    /// Its standby is the long one.
    standby_long: AtomicBool,
    /// Submissions nobody waits for yet, counted: they keep the standby short.
    unwaited_submissions: AtomicU64,
    /// Callers that run the consumer's loop themselves now.
    callers_driving: AtomicUsize,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Doorbell::announce_standby`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standby {
    /// No caller drives any more: do not sleep.
    Skip,
    /// Sleep; `long` says whether a long standby is still safe (no submission came since the
    /// consumer last looked: one that comes from now on rings).
    Sleep {
        /// The long standby stands.
        long: bool,
    },
}

/// A caller counted as driving the consumer's loop; the count drops with it.
#[derive(Debug)]
#[must_use = "the caller counts as driving only while the guard lives"]
pub struct Driving<'a>(&'a Doorbell);

impl Drop for Driving<'_> {
    #[inline]
    fn drop(&mut self) {
        // AcqRel like the increment: the count is read by the consumer before it takes its
        // loop's state (a mutex orders the state itself); nothing else is published by it.
        self.0.callers_driving.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Doorbell {
    /// A doorbell with nobody asleep and nobody driving.
    #[must_use]
    pub fn new() -> Self {
        Self {
            parked: AtomicBool::new(false),
            standing_by: AtomicBool::new(false),
            standby_long: AtomicBool::new(false),
            unwaited_submissions: AtomicU64::new(0),
            callers_driving: AtomicUsize::new(0),
        }
    }

    // The producers' and callers' side.

    /// After a push (or anything else the consumer must look at, such as a request to run a
    /// closure between its steps): whether to ring, which is whether the consumer is parked.
    #[must_use]
    #[inline]
    pub fn must_ring_after_push(&self) -> bool {
        // SeqCst fence pairs with the one in `announce_park`: either the consumer sees the
        // push, or this sees it parked.
        fence(Ordering::SeqCst);
        self.parked.load(Ordering::Relaxed)
    }

    /// After a push nobody will wait for by driving the loop (a pipelined submission): counts
    /// it and says whether to ring, which is whether the consumer is parked or in a long
    /// standby. A short standby is not rung: it ends soon, and a caller that waits takes the
    /// submission in its first step.
    #[must_use]
    #[inline]
    pub fn must_ring_after_submission(&self) -> bool {
        // Relaxed: ordered before the fence below, which `announce_standby`'s pairs with.
        self.unwaited_submissions.fetch_add(1, Ordering::Relaxed);
        // SeqCst fence pairs with the ones in `announce_park` and `announce_standby`: either the
        // consumer sees the push (or the count, and stands by short), or this sees its flags.
        fence(Ordering::SeqCst);
        self.parked.load(Ordering::Relaxed)
            || (self.standing_by.load(Ordering::Relaxed)
                && self.standby_long.load(Ordering::Relaxed))
    }

    /// Counts the calling thread as driving the consumer's loop until the guard drops. The
    /// consumer does not park while one does, and stands by instead of stepping.
    #[inline]
    pub fn start_driving(&self) -> Driving<'_> {
        // AcqRel: see `Driving::drop`.
        self.callers_driving.fetch_add(1, Ordering::AcqRel);
        Driving(self)
    }

    /// After a caller stopped driving with its wait not over (its guard dropped first): whether
    /// to ring, which is whether the consumer is parked or standing by (for any length: nobody
    /// else runs the loop now).
    #[must_use]
    #[inline]
    pub fn must_ring_after_giving_up(&self) -> bool {
        // SeqCst fence pairs with the one in `announce_standby` (and `announce_park`): either
        // the consumer sees the count the guard left, or this sees it asleep.
        fence(Ordering::SeqCst);
        self.parked.load(Ordering::Relaxed) || self.standing_by.load(Ordering::Relaxed)
    }

    /// Whether any caller drives the consumer's loop now.
    #[must_use]
    #[inline]
    pub fn callers_driving(&self) -> bool {
        // Acquire pairs with the AcqRel of the count's changes (see `Driving::drop`).
        self.callers_driving.load(Ordering::Acquire) > 0
    }

    /// Submissions counted by [`Self::must_ring_after_submission`] so far (wrapping).
    #[must_use]
    #[inline]
    pub fn unwaited_submissions(&self) -> u64 {
        // Relaxed: compared with an earlier reading to see whether any came; the pairing with
        // a submission goes through `announce_standby`'s fence.
        self.unwaited_submissions.load(Ordering::Relaxed)
    }

    // The consumer's side.

    /// Raises the parked flag before a last look: after this, look at the ring
    /// ([`Consumer::is_empty`](crate::Consumer::is_empty)) and [`Self::callers_driving`], and
    /// anything else producers announce through [`Self::must_ring_after_push`]; if any has
    /// work, [`Self::end_park`] instead of sleeping. Otherwise sleep until rung, and
    /// [`Self::end_park`] after.
    #[inline]
    pub fn announce_park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        // SeqCst fence pairs with the producers' (see `must_ring_after_push`).
        fence(Ordering::SeqCst);
    }

    /// Lowers the parked flag: awake again, or not sleeping after all.
    #[inline]
    pub fn end_park(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Raises the standby flags before sleeping while callers drive (a long standby if
    /// `long`), and looks again: at the callers (none left: [`Standby::Skip`]) and at the
    /// submissions counted since `submissions_seen`, which it updates (any: the standby is
    /// short, and the flag says so before the sleep). Call [`Self::end_standby`] after the
    /// sleep, or after a skip.
    #[inline]
    pub fn announce_standby(&self, long: bool, submissions_seen: &mut u64) -> Standby {
        self.standby_long.store(long, Ordering::Relaxed);
        self.standing_by.store(true, Ordering::Relaxed);
        // SeqCst fence pairs with the ones in `must_ring_after_giving_up` and
        // `must_ring_after_submission` (see there).
        fence(Ordering::SeqCst);
        let mut long = long;
        let submissions = self.unwaited_submissions.load(Ordering::Relaxed);
        if submissions != *submissions_seen {
            // Submitted since the length was chosen, perhaps without ringing: short. (A
            // submission that sees the long flag before this store rings: a spare ring.)
            *submissions_seen = submissions;
            long = false;
            self.standby_long.store(false, Ordering::Relaxed);
        }
        if self.callers_driving.load(Ordering::Relaxed) > 0 {
            Standby::Sleep { long }
        } else {
            Standby::Skip
        }
    }

    /// Lowers the standby flags.
    #[inline]
    pub fn end_standby(&self) {
        self.standing_by.store(false, Ordering::Relaxed);
        self.standby_long.store(false, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_parked_consumer_is_rung_by_pushes_submissions_and_callers_that_give_up() {
        let bell = Doorbell::new();
        assert!(!bell.must_ring_after_push());
        assert!(!bell.must_ring_after_submission());
        assert!(!bell.must_ring_after_giving_up());
        bell.announce_park();
        assert!(bell.must_ring_after_push());
        assert!(bell.must_ring_after_submission());
        assert!(bell.must_ring_after_giving_up());
        bell.end_park();
        assert!(!bell.must_ring_after_push());
    }

    #[test]
    fn a_short_standby_is_rung_by_callers_that_give_up_and_a_long_one_by_submissions_too() {
        let bell = Doorbell::new();
        let mut seen = bell.unwaited_submissions();
        assert_eq!(bell.announce_standby(false, &mut seen), Standby::Skip);
        bell.end_standby();
        let driving = bell.start_driving();
        assert!(bell.callers_driving());
        assert_eq!(
            bell.announce_standby(false, &mut seen),
            Standby::Sleep { long: false }
        );
        assert!(!bell.must_ring_after_push());
        assert!(!bell.must_ring_after_submission());
        assert!(bell.must_ring_after_giving_up());
        bell.end_standby();
        // The submission above was counted after `seen` was read: the next standby is short.
        assert_eq!(
            bell.announce_standby(true, &mut seen),
            Standby::Sleep { long: false }
        );
        bell.end_standby();
        assert_eq!(
            bell.announce_standby(true, &mut seen),
            Standby::Sleep { long: true }
        );
        assert!(bell.must_ring_after_submission());
        assert!(!bell.must_ring_after_push());
        bell.end_standby();
        drop(driving);
        assert!(!bell.callers_driving());
        assert_eq!(bell.announce_standby(true, &mut seen), Standby::Skip);
    }
}
