//! Where a round trip's time goes inside a node, point by point (feature `stamps`; without it
//! every function here is empty and inlined away).
//!
//! A thread's round starts when it receives bytes of a frame (`received`) and ends when it
//! hands its next frame to the socket (`sent`); `at` records, at a named [`Point`], the time
//! since the round started. On a backup a round is a write's arrival to its ack; on a primary
//! whose caller drives the loop (the default), an ack's arrival to the next write's send,
//! through the completion, the caller's return and its next submission. Every
//! [`ROUNDS_PER_REPORT`] rounds a thread prints the median of each point to stderr, in round
//! order, so the difference between two neighbours is the median cost of the step between
//! them; then each point's p99, where a step that makes the tail shows as a jump. The stamps
//! cost something themselves (docs/PERFORMANCE.md has what they added to a run's latency,
//! their figures and the command).
//!
//! Only the TCP transport in the clear stamps its receives and sends (not TLS, not RDMA).

/// Rounds a thread collects before it prints its medians.
#[cfg_attr(not(feature = "stamps"), allow(dead_code))]
pub const ROUNDS_PER_REPORT: usize = 20_000;

/// A named point along a round, in the order a round meets them (`Sent` is stamped by
/// [`sent`], with the feature).
#[cfg_attr(not(feature = "stamps"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Point {
    /// The pass's receive loop is done (frames decoded into the inbox).
    Decoded,
    /// The core handled the inbox.
    CoreHandled,
    /// The core's batch ended (its actions are drained next).
    BatchEnded,
    /// An `Append` ran (the record is in this node's queue).
    Appended,
    /// A caller's write was completed (after the apply).
    Completed,
    /// The pass ended.
    PassEnded,
    /// The loop's step ended (stats published).
    StepEnded,
    /// A waiting caller saw its write done.
    WaitDone,
    /// `Mirror::write` is about to return.
    WriteReturned,
    /// `Mirror::write` was entered (the caller's next write).
    WriteEntered,
    /// The write's bytes are in the submission ring.
    Pushed,
    /// The core took the submission.
    Submitted,
    /// Bytes of the next frame were handed to the socket (the round's end).
    Sent,
}

#[cfg(feature = "stamps")]
const POINTS: usize = Point::Sent as usize + 1;

/// The points' names in the report, indexed by `Point as usize` (the enum's order).
#[cfg(feature = "stamps")]
const LABELS: [&str; POINTS] = [
    "decoded",
    "core",
    "batch-end",
    "appended",
    "completed",
    "pass-end",
    "step-end",
    "wait-done",
    "write-return",
    "write-enter",
    "pushed",
    "submitted",
    "sent",
];

/// Bytes of a frame arrived: a round starts (a later receive in the same round restarts it).
#[inline(always)]
pub(crate) fn received() {
    #[cfg(feature = "stamps")]
    imp::received();
}

/// The round reached `point`.
#[inline(always)]
pub(crate) fn at(point: Point) {
    #[cfg(feature = "stamps")]
    imp::at(point);
    #[cfg(not(feature = "stamps"))]
    let _ = point;
}

/// A frame was handed to the socket: the round ends.
#[inline(always)]
pub(crate) fn sent() {
    #[cfg(feature = "stamps")]
    imp::sent();
}

/// The loop's step found nothing to do: a round still open is no round trip (a frame that
/// needs no reply, such as an idle primary's apply report, then the passes spent waiting), so
/// it ends unrecorded. Without this, a backup's idle passes after such a frame filled its
/// histograms with samples of the wait.
#[inline(always)]
pub(crate) fn idle() {
    #[cfg(feature = "stamps")]
    imp::idle();
}

#[cfg(feature = "stamps")]
mod imp {
    use std::cell::{Cell, RefCell};
    use std::fmt::Write as _;
    use std::time::Instant;

    use super::{Point, LABELS, POINTS, ROUNDS_PER_REPORT};

    /// Histogram buckets of 10 ns; the last one takes everything from 20 µs on. A histogram,
    /// not a list of samples: a stamp then touches one hot cache line, where 20 000 samples
    /// per point (2 MB a thread) evicted the node's own data and inflated what they measured.
    const BUCKET_NS: u64 = 10;
    const BUCKETS: usize = 2_000;

    struct Histograms {
        counts: Vec<[u32; BUCKETS]>,
        samples: [usize; POINTS],
    }

    impl Histograms {
        fn new() -> Self {
            Histograms {
                counts: vec![[0; BUCKETS]; POINTS],
                samples: [0; POINTS],
            }
        }

        /// The `q` quantile (0.5: the median) of the samples of the point at `index`, in µs
        /// (the upper edge of its bucket).
        fn quantile_us(&self, index: usize, q: f64) -> f64 {
            let counts = &self.counts[index];
            let wanted = ((self.samples[index] as f64 * q).ceil() as usize).max(1);
            let mut seen = 0usize;
            for (bucket, &n) in counts.iter().enumerate() {
                seen += n as usize;
                if seen >= wanted {
                    return ((bucket as u64 + 1) * BUCKET_NS) as f64 / 1000.0;
                }
            }
            (BUCKETS as u64 * BUCKET_NS) as f64 / 1000.0
        }
    }

    thread_local! {
        static ROUND_START: Cell<Option<Instant>> = const { Cell::new(None) };
        static HISTOGRAMS: RefCell<Histograms> = RefCell::new(Histograms::new());
    }

    pub(super) fn received() {
        ROUND_START.with(|start| start.set(Some(Instant::now())));
    }

    pub(super) fn idle() {
        ROUND_START.with(|start| start.set(None));
    }

    pub(super) fn at(point: Point) {
        let Some(start) = ROUND_START.with(Cell::get) else {
            return;
        };
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = usize::try_from(nanos / BUCKET_NS).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
        HISTOGRAMS.with(|histograms| {
            let mut histograms = histograms.borrow_mut();
            histograms.counts[point as usize][bucket] += 1;
            histograms.samples[point as usize] += 1;
        });
    }

    pub(super) fn sent() {
        if ROUND_START.with(Cell::get).is_none() {
            return;
        }
        at(Point::Sent);
        ROUND_START.with(|start| start.set(None));
        HISTOGRAMS.with(|histograms| {
            let mut histograms = histograms.borrow_mut();
            if histograms.samples[Point::Sent as usize] < ROUNDS_PER_REPORT {
                return;
            }
            let thread = std::thread::current();
            let mut line = format!(
                "stamps [{}] median µs since the round's receive, {ROUNDS_PER_REPORT} rounds:",
                thread.name().unwrap_or("unnamed")
            );
            for (index, label) in LABELS.iter().enumerate() {
                let samples = histograms.samples[index];
                if samples == 0 {
                    continue;
                }
                let median = histograms.quantile_us(index, 0.5);
                let _ = write!(line, " {label} {median:.2} (n={samples})");
            }
            // The tail too: where a round's p99 grows is the step that makes the write's.
            let _ = write!(line, "; p99:");
            for (index, label) in LABELS.iter().enumerate() {
                if histograms.samples[index] > 0 {
                    let p99 = histograms.quantile_us(index, 0.99);
                    let _ = write!(line, " {label} {p99:.2}");
                }
            }
            *histograms = Histograms::new();
            eprintln!("{line}");
        });
    }
}
