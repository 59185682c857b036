//! A primary's chunk transfer: a resync (the dirty chunks, or every chunk for an initial sync)
//! or an online verify (every chunk), run against the connected backup.
//!
//! For each chunk the primary sends `ChunkDigest`, the digest of its bytes as of that point of
//! the stream (its region with the writes it sent and has not applied yet laid over them); the
//! backup answers, having applied every write it received before, whether its bytes match. A
//! resync then sends the differing chunks' bytes (read the same way, later in the stream), a
//! run of adjacent chunks per message at the end of a batch, and the backup confirms holding
//! each run durably (`ChunkHeld`); only then do its chunks leave the bitmap. A verify lists
//! differing chunks and, asked to repair, brings them over the same way. A backup whose region
//! is blank is sent bytes without digests, and no chunk that is all zeros on the primary.
//!
//! Why a chunk copy never overwrites a newer write: the copy is read on the primary after every
//! write sent before it, and the backup writes it after every write received before it; writes
//! sent after it reach the backup after it, in order. A chunk whose writes left the queue (a
//! fold) while its copy was on the way is marked again ("redo") and sent again.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// Bytes of chunks a transfer keeps in flight (digest or data on the way): enough to cover the
/// round trip (both nodes' passes included) at the rate a stream of chunks is sent, small
/// enough to keep the send buffer short. 2 MiB held loopback transfers at two thirds of this.
pub const TRANSFER_WINDOW_BYTES: u64 = 8 << 20;

/// Chunks in flight for chunks of `chunk_size`: [`TRANSFER_WINDOW_BYTES`] of them, at least 8
/// (large chunks) and at most 2048 (small ones: the bookkeeping per chunk is not free).
pub fn transfer_window(chunk_size: u64) -> usize {
    (TRANSFER_WINDOW_BYTES / chunk_size.max(1)).clamp(8, 2048) as usize
}

/// What a transfer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferPurpose {
    /// Bring the dirty chunks (after a long outage) over.
    Resync,
    /// Compare every chunk and bring over those that differ (a new, replaced or stale node).
    InitialSync,
    /// Compare every chunk; with `repair`, bring over those that differ.
    Verify {
        /// Bring differing chunks over.
        repair: bool,
    },
}

impl TransferPurpose {
    /// The name the stats and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            TransferPurpose::Resync => "resync",
            TransferPurpose::InitialSync => "initial-sync",
            TransferPurpose::Verify { repair: false } => "verify",
            TransferPurpose::Verify { repair: true } => "verify-repair",
        }
    }
}

/// Where a transfer stands (in [`CoreStats::transfer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferProgress {
    /// What it is for.
    pub purpose: TransferPurpose,
    /// Chunks it has to go through (grows when a fold adds dirty chunks).
    pub chunks_total: u64,
    /// Chunks done (matched, brought over, or found differing by a verify).
    pub chunks_done: u64,
    /// Bytes of region still to go through.
    pub bytes_left: u64,
    /// Bytes of region gone through.
    pub bytes_done: u64,
    /// Chunk bytes sent to the backup (the differing chunks).
    pub bytes_sent: u64,
    /// Chunks found differing so far.
    pub chunks_differing: u64,
    /// When it started (the core's clock, microseconds).
    pub started_us: u64,
}

/// What a finished (or abandoned) transfer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// What it was for.
    pub purpose: TransferPurpose,
    /// Chunks compared.
    pub chunks_compared: u64,
    /// The differing chunks, as byte ranges (a verify's list; a resync's chunks it sent).
    pub differing: Vec<ChunkRange>,
    /// Chunks brought over to the backup.
    pub chunks_repaired: u64,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// How long it took (microseconds of the core's clock).
    pub elapsed_us: u64,
    /// Why it ended before comparing every chunk (None: it completed).
    pub abandoned: Option<String>,
}

/// Why a verify cannot start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Only a primary verifies (it drives the comparison).
    #[error("only the primary runs an online verify (run it there)")]
    NotPrimary,
    /// The backup is not connected and synchronous.
    #[error("the backup is not connected and synchronous (phase {phase:?}): an online verify compares two live regions")]
    NotSynchronous {
        /// The phase now.
        phase: Phase,
    },
    /// A resync or another verify is running.
    #[error("a {running} is running; wait for it to finish")]
    Busy {
        /// What runs.
        running: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The digest is on the way; the verdict is awaited.
    Digest,
    /// The chunk's bytes go at the end of the batch, with its neighbours' (one message for a
    /// run of adjacent chunks: fewer messages, system calls and acknowledgements per byte).
    Ready,
    /// The chunk's bytes are on the way; `ChunkHeld` is awaited.
    Data,
}

/// The most bytes one `ChunkData` carries: a run of adjacent chunks (the most a `ChunkHeld`
/// range may name).
pub const MAX_RUN_BYTES: u64 = crate::MAX_CHUNK_SIZE;

#[derive(Debug, Clone, Copy)]
struct InFlight {
    stage: Stage,
    range: ChunkRange,
    /// Records that wrote to the chunk left the queue (a fold) after its bytes or its
    /// digest were read: it stays dirty and goes again.
    redo: bool,
}

/// What the transfer wants of the primary after an input.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing more to do now.
    Idle,
    /// Every chunk is done: the transfer is complete.
    Finished,
}

/// A transfer in progress.
#[derive(Debug)]
pub(super) struct Transfer {
    purpose: TransferPurpose,
    geometry: ChunkGeometry,
    in_flight: BTreeMap<u64, InFlight>,
    /// The chunks in flight at [`Stage::Ready`] (a window can be 2048 chunks: the end of each
    /// batch looks at these only).
    ready: BTreeSet<u64>,
    /// Next chunk to consider (a verify's sequential scan; a resync's search start).
    cursor: u64,
    /// Chunks to go through (grows with folds and redos).
    chunks_total: u64,
    chunks_done: u64,
    differing: Vec<ChunkRange>,
    chunks_repaired: u64,
    bytes_sent: u64,
    started_us: u64,
    /// Rate limit: bytes the transfer may still process, refilled with time.
    tokens: u64,
    refilled_us: u64,
    rate: u64,
    /// The backup's region is blank (a resync into a new node): chunks go without digests,
    /// and a chunk of zeros not at all.
    skip_digests: bool,
}

impl Transfer {
    pub(super) fn new(purpose: TransferPurpose, c: &Common) -> Transfer {
        let chunks_total = match purpose {
            TransferPurpose::Verify { .. } => c.geometry.chunk_count(),
            TransferPurpose::Resync | TransferPurpose::InitialSync => c.dirty.len(),
        };
        Transfer {
            purpose,
            geometry: c.geometry,
            in_flight: BTreeMap::new(),
            ready: BTreeSet::new(),
            cursor: 0,
            chunks_total,
            chunks_done: 0,
            differing: Vec::new(),
            chunks_repaired: 0,
            bytes_sent: 0,
            started_us: c.now_us,
            tokens: burst(c.geometry, c.cfg.resync_rate),
            refilled_us: c.now_us,
            rate: c.cfg.resync_rate,
            skip_digests: false,
        }
    }

    /// The backup's region is blank: comparing digests would only find that every chunk
    /// but those of zeros differs. Each chunk's bytes go at once; the primary's executor
    /// skips a chunk of zeros ([`Transfer::on_elided`]).
    pub(super) fn skip_digests(&mut self) {
        self.skip_digests = true;
    }

    pub(super) fn purpose(&self) -> TransferPurpose {
        self.purpose
    }

    fn range(&self, chunk: u64) -> ChunkRange {
        let (offset, len) = self.geometry.extent(chunk);
        ChunkRange {
            offset,
            len: len as u32,
        }
    }

    fn is_resync(&self) -> bool {
        !matches!(self.purpose, TransferPurpose::Verify { .. })
    }

    /// The next chunk to digest, if any is left outside the window.
    fn next_chunk(&mut self, dirty: &ChunkSet) -> Option<u64> {
        if !self.is_resync() {
            let count = self.geometry.chunk_count();
            if self.cursor >= count {
                return None;
            }
            self.cursor += 1;
            return Some(self.cursor - 1);
        }
        // The dirty chunks not in flight, from the cursor on, then from the start again
        // (a fold may have marked chunks behind it).
        let mut from = self.cursor;
        for _ in 0..2 {
            let mut at = from;
            while let Some(chunk) = dirty.next_from(at) {
                if !self.in_flight.contains_key(&chunk) {
                    self.cursor = chunk + 1;
                    return Some(chunk);
                }
                at = chunk + 1;
            }
            from = 0;
        }
        None
    }

    fn refill(&mut self, now_us: u64) {
        if self.rate == 0 {
            return;
        }
        let elapsed = now_us.saturating_sub(self.refilled_us);
        let earned = (u128::from(elapsed) * u128::from(self.rate) / 1_000_000) as u64;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(burst(self.geometry, self.rate));
            self.refilled_us = now_us;
        }
    }

    /// Sends digests while the window and the rate allow. `overlay` is the range of queued
    /// records sent and not applied (laid over the region's bytes).
    pub(super) fn pump(&mut self, c: &mut Common, overlay: (u64, u64)) -> Step {
        self.refill(c.now_us);
        while self.in_flight.len() < transfer_window(self.geometry.chunk_size()) {
            let chunk_bytes = self.geometry.chunk_size();
            if self.rate != 0 && self.tokens < chunk_bytes {
                break;
            }
            let Some(chunk) = self.next_chunk(&c.dirty) else {
                break;
            };
            if self.rate != 0 {
                self.tokens -= chunk_bytes;
            }
            let range = self.range(chunk);
            let stage = if self.skip_digests {
                Stage::Ready
            } else {
                Stage::Digest
            };
            self.in_flight.insert(
                chunk,
                InFlight {
                    stage,
                    range,
                    redo: false,
                },
            );
            if stage == Stage::Ready {
                self.ready.insert(chunk);
            }
            if !self.skip_digests {
                c.actions.push(Action::SendDigest {
                    to: c.to(),
                    range,
                    overlay_from: overlay.0,
                    overlay_through: overlay.1,
                });
            }
        }
        if self.in_flight.is_empty() && !self.next_chunk_left(&c.dirty) {
            Step::Finished
        } else {
            Step::Idle
        }
    }

    /// Whether chunks remain that the rate limit holds back.
    fn next_chunk_left(&self, dirty: &ChunkSet) -> bool {
        if self.is_resync() {
            !dirty.is_empty()
        } else {
            self.cursor < self.geometry.chunk_count()
        }
    }

    /// The chunk a message names, if it is in flight at `stage` with that exact range.
    fn in_flight_at(&self, range: ChunkRange, stage: Stage) -> Result<u64, String> {
        let chunk = range.offset / self.geometry.chunk_size();
        match self.in_flight.get(&chunk) {
            Some(f) if f.stage == stage && f.range == range => Ok(chunk),
            _ => Err(format!(
                "{:?} for bytes {}+{} that are not awaited at that stage",
                stage, range.offset, range.len
            )),
        }
    }

    /// The backup's verdict on a digest.
    pub(super) fn on_verdict(
        &mut self,
        c: &mut Common,
        range: ChunkRange,
        same: bool,
    ) -> Result<(), String> {
        let chunk = self.in_flight_at(range, Stage::Digest)?;
        if same {
            self.chunk_done(c, chunk);
            return Ok(());
        }
        if !self.is_resync() {
            self.differing.push(range);
        }
        let repair = match self.purpose {
            TransferPurpose::Verify { repair } => repair,
            TransferPurpose::Resync | TransferPurpose::InitialSync => true,
        };
        if !repair {
            self.chunk_done(c, chunk);
            return Ok(());
        }
        if let Some(f) = self.in_flight.get_mut(&chunk) {
            f.stage = Stage::Ready;
            self.ready.insert(chunk);
        }
        Ok(())
    }

    /// The end of a batch of inputs: the chunks whose bytes are to go leave, a run of
    /// adjacent ones (up to [`MAX_RUN_BYTES`]) per `ChunkData`.
    pub(super) fn send_ready(&mut self, c: &mut Common, overlay: (u64, u64)) {
        let mut run: Option<(u64, ChunkRange)> = None;
        for chunk in std::mem::take(&mut self.ready) {
            let Some(f) = self.in_flight.get_mut(&chunk) else {
                continue;
            };
            f.stage = Stage::Data;
            let range = f.range;
            run = match run {
                Some((last, r))
                    if last + 1 == chunk
                        && u64::from(r.len) + u64::from(range.len) <= MAX_RUN_BYTES =>
                {
                    Some((
                        chunk,
                        ChunkRange {
                            offset: r.offset,
                            len: r.len + range.len,
                        },
                    ))
                }
                other => {
                    if let Some((_, r)) = other {
                        self.send_run(c, r, overlay);
                    }
                    Some((chunk, range))
                }
            };
        }
        if let Some((_, r)) = run {
            self.send_run(c, r, overlay);
        }
    }

    fn send_run(&mut self, c: &mut Common, range: ChunkRange, overlay: (u64, u64)) {
        self.bytes_sent += u64::from(range.len);
        c.actions.push(Action::SendChunk {
            to: c.to(),
            range,
            overlay_from: overlay.0,
            overlay_through: overlay.1,
            elide_zero: self.skip_digests,
        });
    }

    /// The chunks a run's range names, each in flight with its bytes on the way.
    fn run_chunks(&self, range: ChunkRange) -> Result<std::ops::Range<u64>, String> {
        let size = self.geometry.chunk_size();
        let end = range.offset + u64::from(range.len);
        let chunks = range.offset / size..end.div_ceil(size);
        let aligned = range.offset.is_multiple_of(size)
            && chunks
                .clone()
                .last()
                .map(|c| self.range(c))
                .is_some_and(|r| r.offset + u64::from(r.len) == end);
        let sent = chunks.clone().all(|chunk| {
            self.in_flight
                .get(&chunk)
                .is_some_and(|f| f.stage == Stage::Data)
        });
        if range.len == 0 || !aligned || !sent {
            return Err(format!(
                "bytes {}+{} are not a run of chunks whose bytes were sent",
                range.offset, range.len
            ));
        }
        Ok(chunks)
    }

    /// A chunk sent without a digest to a blank backup was all zeros, as the backup's is: it
    /// is done without its bytes (they were not sent).
    pub(super) fn on_elided(&mut self, c: &mut Common, range: ChunkRange) -> Result<(), String> {
        let chunks = self.run_chunks(range)?;
        if !self.skip_digests {
            return Err(format!(
                "bytes {}+{} elided in a transfer that compares digests",
                range.offset, range.len
            ));
        }
        self.bytes_sent -= u64::from(range.len);
        for chunk in chunks {
            self.chunk_done(c, chunk);
        }
        Ok(())
    }

    /// The backup holds a run of chunks' bytes durably.
    pub(super) fn on_held(&mut self, c: &mut Common, range: ChunkRange) -> Result<(), String> {
        for chunk in self.run_chunks(range)? {
            self.chunks_repaired += 1;
            if self.is_resync() {
                let range = self.range(chunk);
                self.differing.push(range);
            }
            self.chunk_done(c, chunk);
        }
        Ok(())
    }

    /// A chunk is settled: it matched, or the backup holds its bytes. A resync's
    /// chunk leaves the bitmap unless a fold marked it again meanwhile; a verify leaves the
    /// bitmap alone (a repair cut short by a crash or a lost connection is not resumed: the
    /// operator runs the verify again).
    fn chunk_done(&mut self, c: &mut Common, chunk: u64) {
        self.ready.remove(&chunk);
        let Some(f) = self.in_flight.remove(&chunk) else {
            return;
        };
        if f.redo {
            // Its newest writes left the queue meanwhile: compare it again.
            self.chunks_total += 1;
        } else if self.is_resync() && c.dirty.remove(chunk) {
            c.actions.push(Action::ClearDirty { chunk });
        }
        self.chunks_done += 1;
    }

    /// Records that wrote to `chunks` left the queue (a fold): a chunk in flight goes again.
    pub(super) fn on_folded(&mut self, chunks: &[std::ops::Range<u64>]) {
        for range in chunks {
            for (_, f) in self.in_flight.range_mut(range.clone()) {
                f.redo = true;
            }
        }
    }

    /// A fold added `new` chunks to the bitmap: a resync has that many more to go.
    pub(super) fn grew(&mut self, new: u64) {
        if self.is_resync() {
            self.chunks_total += new;
        }
    }

    pub(super) fn progress(&self, c: &Common) -> TransferProgress {
        let chunks_left = if self.is_resync() {
            c.dirty.len()
        } else {
            self.geometry.chunk_count() - self.cursor + self.in_flight.len() as u64
        };
        TransferProgress {
            purpose: self.purpose,
            chunks_total: self.chunks_total.max(self.chunks_done + chunks_left),
            chunks_done: self.chunks_done,
            bytes_left: chunks_left * self.geometry.chunk_size(),
            bytes_done: self.chunks_done * self.geometry.chunk_size(),
            bytes_sent: self.bytes_sent,
            chunks_differing: self.differing.len() as u64,
            started_us: self.started_us,
        }
    }

    /// The report of this transfer, ended now (`abandoned`: why it stopped early).
    pub(super) fn report(self, now_us: u64, abandoned: Option<String>) -> VerifyReport {
        VerifyReport {
            purpose: self.purpose,
            chunks_compared: self.chunks_done,
            differing: self.differing,
            chunks_repaired: self.chunks_repaired,
            bytes_sent: self.bytes_sent,
            elapsed_us: now_us.saturating_sub(self.started_us),
            abandoned,
        }
    }
}

/// The most a rate-limited transfer may process at once: a window of chunks, but no more than
/// a second's worth of the rate (so that a small transfer is paced too), and at least a chunk.
fn burst(geometry: ChunkGeometry, rate: u64) -> u64 {
    if rate == 0 {
        return u64::MAX;
    }
    (geometry.chunk_size() * transfer_window(geometry.chunk_size()) as u64)
        .min(rate)
        .max(geometry.chunk_size())
}
