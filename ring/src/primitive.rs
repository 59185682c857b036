//! The synchronisation primitives the ring and its doorbell are written against.
//!
//! Under `--cfg loom` these are loom's model-checked replacements; otherwise they are the
//! standard library's. The algorithm in `ring.rs` is written once against this module (the
//! pattern crossbeam-epoch uses in its `primitive` module), so the code loom checks is the code
//! that ships.
//!
//! The std `UnsafeCell` is wrapped to expose loom's closure API (`with` / `with_mut`): loom needs
//! to see the start and end of every access to the cell to detect data races, so the
//! algorithm never holds a raw pointer outside such a closure.
//!
//! Under loom, `AtomicU64` is wrapped too, to work around a gap in loom's exploration; see
//! `loom_atomic`.

#[cfg(loom)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::atomic::{fence, AtomicBool, AtomicUsize},
    sync::Arc,
};
#[cfg(loom)]
pub(crate) use loom_atomic::AtomicU64;
#[cfg(loom)]
pub(crate) use std::sync::atomic::Ordering;

#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc,
};

/// `core::cell::UnsafeCell` with loom's access API, so the ring's code compiles unchanged
/// against either implementation.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// Wraps `value`.
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared-access pointer to the contents. Dereferencing it is the caller's
    /// responsibility (no concurrent `with_mut` on the same cell).
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with an exclusive-access pointer to the contents. Dereferencing it is the
    /// caller's responsibility (no other access to the same cell at the same time).
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// `loom::sync::atomic::AtomicU64`, plus companion counters that make loom explore the
/// interleavings its partial-order reduction would otherwise skip.
///
/// Loom 0.7's DPOR remembers only the *last* access to each atomic. When a thread loads an
/// atomic and then stores to it, its own load hides an earlier load by another thread from the
/// race check on the store, so the store is never tried before that other load
/// (tokio-rs/loom#166, tokio-rs/loom#392). Every `try_push` loads a slot's stamp and then
/// stores it; unaided, loom never lets the consumer observe a concurrent push.
///
/// The repair: one companion counter per loom thread ("reader witness"). A load by thread `i`
/// first bumps witness `i`; a store or CAS by thread `j` first bumps the witness of every other
/// thread that has loaded the atomic. Read-modify-writes conflict with every access to the same
/// object, so each store now races, in loom's eyes, with the latest load of every other thread,
/// while loads by different threads stay independent (no redundant load/load reorderings). The
/// witnesses are only touched by `Relaxed` read-modify-writes, which loom orders totally and
/// which create no happens-before edges, and their values are never used: the atomic itself is
/// modelled unchanged, and its loads still return every value the memory model allows,
/// including stale ones. None of this exists outside `cfg(loom)`.
#[cfg(loom)]
mod loom_atomic {
    use loom::sync::atomic::AtomicUsize;
    use std::sync::atomic::{AtomicU8, Ordering};

    // One bit of `readers` per loom thread.
    const _: () = assert!(loom::MAX_THREADS <= u8::BITS as usize);

    #[derive(Debug)]
    pub(crate) struct AtomicU64 {
        value: loom::sync::atomic::AtomicU64,
        /// `reader_witness[i]` is bumped by loads from loom thread `i`, and by stores from the
        /// other threads; see the type's documentation.
        reader_witness: [AtomicUsize; loom::MAX_THREADS],
        /// Bit `i` is set once loom thread `i` has loaded `value`. A std atomic, invisible to
        /// loom: bookkeeping of the execution being run, not part of the model.
        readers: AtomicU8,
    }

    /// Index (below `loom::MAX_THREADS`) of the current loom thread.
    fn thread_index() -> usize {
        // loom's `ThreadId` exposes its index only through `Debug`: "ThreadId(3)".
        let id = format!("{:?}", loom::thread::current().id());
        let index = id
            .strip_prefix("ThreadId(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|digits| digits.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("unexpected loom thread id format {id:?}"));
        assert!(index < loom::MAX_THREADS);
        index
    }

    impl AtomicU64 {
        pub(crate) fn new(value: u64) -> Self {
            Self {
                value: loom::sync::atomic::AtomicU64::new(value),
                reader_witness: std::array::from_fn(|_| AtomicUsize::new(0)),
                readers: AtomicU8::new(0),
            }
        }

        /// Before a store or CAS: race with the latest load of every other thread.
        fn witness_write(&self) {
            let me = thread_index();
            // Relaxed (both): bookkeeping and a loom scheduling point; nothing is published.
            let readers = self.readers.load(Ordering::Relaxed);
            for (i, witness) in self.reader_witness.iter().enumerate() {
                if i != me && readers & (1 << i) != 0 {
                    witness.fetch_add(1, Ordering::Relaxed);
                }
            }
        }

        pub(crate) fn load(&self, order: Ordering) -> u64 {
            let me = thread_index();
            // Relaxed (both): bookkeeping and a loom scheduling point; nothing is published.
            self.readers.fetch_or(1 << me, Ordering::Relaxed);
            self.reader_witness[me].fetch_add(1, Ordering::Relaxed);
            self.value.load(order)
        }

        pub(crate) fn store(&self, value: u64, order: Ordering) {
            self.witness_write();
            self.value.store(value, order);
        }

        pub(crate) fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
            self.witness_write();
            self.value.fetch_add(value, order)
        }

        pub(crate) fn compare_exchange_weak(
            &self,
            current: u64,
            new: u64,
            success: Ordering,
            failure: Ordering,
        ) -> Result<u64, u64> {
            self.witness_write();
            self.value
                .compare_exchange_weak(current, new, success, failure)
        }
    }
}
