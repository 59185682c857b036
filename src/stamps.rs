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
//! them (the stamps themselves add ~30 ns each). docs/PERFORMANCE.md has the figures and the
//! command.
//!
//! Only the TCP transport stamps its receives and sends.

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

#[cfg(feature = "stamps")]
impl Point {
    const ALL: [Point; POINTS] = [
        Point::Decoded,
        Point::CoreHandled,
        Point::BatchEnded,
        Point::Appended,
        Point::Completed,
        Point::PassEnded,
        Point::StepEnded,
        Point::WaitDone,
        Point::WriteReturned,
        Point::WriteEntered,
        Point::Pushed,
        Point::Submitted,
        Point::Sent,
    ];

    fn label(self) -> &'static str {
        match self {
            Point::Decoded => "decoded",
            Point::CoreHandled => "core",
            Point::BatchEnded => "batch-end",
            Point::Appended => "appended",
            Point::Completed => "completed",
            Point::PassEnded => "pass-end",
            Point::StepEnded => "step-end",
            Point::WaitDone => "wait-done",
            Point::WriteReturned => "write-return",
            Point::WriteEntered => "write-enter",
            Point::Pushed => "pushed",
            Point::Submitted => "submitted",
            Point::Sent => "sent",
        }
    }
}

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

#[cfg(feature = "stamps")]
mod imp {
    use std::cell::{Cell, RefCell};
    use std::fmt::Write as _;
    use std::time::Instant;

    use super::{Point, POINTS, ROUNDS_PER_REPORT};

    thread_local! {
        static ROUND_START: Cell<Option<Instant>> = const { Cell::new(None) };
        static SAMPLES: RefCell<Vec<Vec<u64>>> = RefCell::new(vec![Vec::new(); POINTS]);
    }

    pub(super) fn received() {
        ROUND_START.with(|start| start.set(Some(Instant::now())));
    }

    pub(super) fn at(point: Point) {
        let Some(start) = ROUND_START.with(Cell::get) else {
            return;
        };
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        SAMPLES.with(|samples| {
            let mut samples = samples.borrow_mut();
            let of_point = &mut samples[point as usize];
            if of_point.len() < ROUNDS_PER_REPORT {
                of_point.push(nanos);
            }
        });
    }

    pub(super) fn sent() {
        if ROUND_START.with(Cell::get).is_none() {
            return;
        }
        at(Point::Sent);
        ROUND_START.with(|start| start.set(None));
        SAMPLES.with(|samples| {
            let mut samples = samples.borrow_mut();
            if samples[Point::Sent as usize].len() < ROUNDS_PER_REPORT {
                return;
            }
            let thread = std::thread::current();
            let mut line = format!(
                "stamps [{}] median µs since the round's receive, {ROUNDS_PER_REPORT} rounds:",
                thread.name().unwrap_or("unnamed")
            );
            for point in Point::ALL {
                let of_point = &mut samples[point as usize];
                if of_point.is_empty() {
                    continue;
                }
                of_point.sort_unstable();
                let median = of_point[of_point.len() / 2];
                let _ = write!(
                    line,
                    " {} {:.2} (n={})",
                    point.label(),
                    median as f64 / 1000.0,
                    of_point.len()
                );
                of_point.clear();
            }
            eprintln!("{line}");
        });
    }
}
