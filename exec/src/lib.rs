//! The one executor of the protocol core's actions on a node's own state, used by the real node
//! (`src/node/`) and by the deterministic simulator (`sim/`), so that both follow the same rules:
//!
//! - it owns the core, the persistent queue and the region (behind [`RegionStore`]), and starts
//!   the core from what the queue recovered ([`recovered`], the one conversion);
//! - it executes every storage action itself (append, sync, trim, terms, peer binding, applies,
//!   repairs, truncation) and hands the driver only the I/O it owns, as [`Io`], in order;
//! - it holds the checkpoint policy of `power`/`pmem` (deferred commits, made durable region
//!   first, then `applied_through` with a queue barrier, then reported to the core);
//! - [`Hooks`] let a driver observe or interrupt chosen points (the node's test fail point, the
//!   simulator's checkers, crashes inside a checkpoint, a canary).
//!
//! The driver keeps its own I/O: connections and frames, streaming a catch-up, completing
//! callers, saving a divergent suffix to its file.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::ops::Range;

use bytes::Bytes;
use mirror_proto::core::VerifyReport;
use mirror_proto::handshake::{merged_ranges, repair_pieces, repair_requests};
use mirror_proto::wire::ChunkRange;
use mirror_proto::{
    chunk_digest, Action, ChunkSet, CoreConfig, FatalError, Message, Payload, PeerFault, PeerId,
    Record, Recovered, RejectCode, Replica, WireRole, WritesRefused,
};
use mirror_storage::{
    DirtyBitmap, DiscardedRecord, Durability, PersistentQueue, Region, RegionWriter, ReplayState,
    StorageError,
};
use thiserror::Error;

/// Why executing an action failed: the node cannot go on.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The queue or the region failed (I/O, a full queue, a refused append...).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The queue lacks records the core asked for (a divergent suffix to save).
    #[error("the queue lacks records of ({after}, {through}]: found {found} of them")]
    MissingRecords {
        /// The range's start (exclusive).
        after: u64,
        /// Its end.
        through: u64,
        /// Records found.
        found: u64,
    },
}

/// A region held in memory: what was written, and what the last sync made durable (what a
/// power loss keeps). The simulator's nodes and the executor's tests use it.
pub struct MemoryRegion {
    /// The region as written.
    pub written: Vec<u8>,
    /// The region as of the last sync.
    pub durable: Vec<u8>,
    /// All zeros when the node started (a resync into it then skips digests).
    pub blank: bool,
    /// Have the executor gather applies ([`RegionStore::gathers_writes`]), as a `power`
    /// region's does, so that a simulation covers that path.
    pub gathers: bool,
}

impl RegionStore for MemoryRegion {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let at = offset as usize;
        self.written[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let at = offset as usize;
        buf.copy_from_slice(&self.written[at..at + buf.len()]);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.durable.copy_from_slice(&self.written);
        Ok(())
    }
    fn blank_at_start(&self) -> bool {
        self.blank
    }
    fn gathers_writes(&self) -> bool {
        self.gathers
    }
}

/// The mirrored region as the executor needs it.
pub trait RegionStore {
    /// Writes `data` at `offset` (in bounds: the core validated it).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError>;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError>;
    /// Writes `writes` in order, as [`write`](Self::write) of each would; a store whose
    /// writes are system calls makes neighbours one.
    fn write_gathered(&mut self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        for &(offset, data) in writes {
            self.write(offset, data)?;
        }
        Ok(())
    }
    /// Whether the executor gathers a batch's applies for
    /// [`write_gathered`](Self::write_gathered) (holding back what must follow them, such as
    /// their completions, until they are written).
    fn gathers_writes(&self) -> bool {
        false
    }
    /// Everything written so far survives a power loss once this returns.
    fn sync(&mut self) -> Result<(), StorageError>;
    /// Whether the region was all zeros when the node started (its file created then). False
    /// when unknown.
    fn blank_at_start(&self) -> bool {
        false
    }
    /// Calls `f` with the `len` bytes at `offset`: in place where the store can lend them
    /// (nothing writes them meanwhile: writes take `&mut self`), else a copy.
    fn with_bytes<T>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, StorageError> {
        let mut copy = vec![0; len];
        self.read(offset, &mut copy)?;
        Ok(f(&copy))
    }
}

impl RegionStore for RegionWriter {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        RegionWriter::write(self, offset, data)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        Region::read(self, offset, buf)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        Region::sync(self)
    }
    fn write_gathered(&mut self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        RegionWriter::write_gathered(self, writes)
    }
    fn gathers_writes(&self) -> bool {
        RegionWriter::gathers_writes(self)
    }
    fn blank_at_start(&self) -> bool {
        self.created()
    }
    fn with_bytes<T>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, StorageError> {
        RegionWriter::with_bytes(self, offset, len, f)
    }
}

/// The dirty-chunk bitmap as the executor needs it (the node's [`DirtyBitmap`] file, the
/// simulator's written-and-durable pair). Marks and state updates are durable when they
/// return; clears need not be (a lost clear only resends a chunk).
pub trait BitmapStore: Send {
    /// The dirty chunks.
    fn dirty(&self) -> ChunkSet;
    /// Marks every chunk of `chunks`, durably.
    fn mark(&mut self, chunks: &[Range<u64>]) -> Result<(), StorageError>;
    /// Marks every chunk, durably.
    fn mark_all(&mut self) -> Result<(), StorageError>;
    /// Clears one chunk.
    fn clear(&mut self, chunk: u64) -> Result<(), StorageError>;
    /// Clears every chunk.
    fn clear_all(&mut self) -> Result<(), StorageError>;
    /// The first seq the bits cover (0: none).
    fn resync_from(&self) -> u64;
    /// Sets it, durably (with every clear before it).
    fn set_resync_from(&mut self, seq: u64) -> Result<(), StorageError>;
    /// The primary resyncing into this node, while a resync is unfinished.
    fn resync_target(&self) -> Option<u64>;
    /// Sets or clears that mark, durably.
    fn set_resync_target(&mut self, primary: Option<u64>) -> Result<(), StorageError>;
}

impl BitmapStore for DirtyBitmap {
    fn dirty(&self) -> ChunkSet {
        DirtyBitmap::dirty(self).clone()
    }
    fn mark(&mut self, chunks: &[Range<u64>]) -> Result<(), StorageError> {
        DirtyBitmap::mark(self, chunks.iter().cloned()).map(|_| ())
    }
    fn mark_all(&mut self) -> Result<(), StorageError> {
        DirtyBitmap::mark_all(self)
    }
    fn clear(&mut self, chunk: u64) -> Result<(), StorageError> {
        DirtyBitmap::clear(self, chunk)
    }
    fn clear_all(&mut self) -> Result<(), StorageError> {
        DirtyBitmap::clear_all(self)
    }
    fn resync_from(&self) -> u64 {
        self.covers_from()
    }
    fn set_resync_from(&mut self, seq: u64) -> Result<(), StorageError> {
        self.set_covers_from(seq)
    }
    fn resync_target(&self) -> Option<u64> {
        DirtyBitmap::resync_target(self)
    }
    fn set_resync_target(&mut self, primary: Option<u64>) -> Result<(), StorageError> {
        DirtyBitmap::set_resync_target(self, primary)
    }
}

/// Where a checkpoint stands (see [`Hooks::checkpoint_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointStage {
    /// The region is durable; `applied_through` is not recorded yet.
    RegionSynced,
    /// `applied_through` is recorded with a queue barrier; the core has not heard of it.
    Recorded,
}

/// Points a driver may observe or interrupt. Every method has a default that does nothing.
pub trait Hooks {
    /// Record `seq` is about to be written to the region.
    fn before_apply(&mut self, _seq: u64) {}
    /// The simulator's first canary: write a client record to the region at its append, before
    /// any ack (the checkers must catch it).
    fn apply_at_append(&self) -> bool {
        false
    }
    /// A checkpoint reached `stage`; `false` stops it there (a crash inside it).
    fn checkpoint_step(&mut self, _stage: CheckpointStage) -> bool {
        true
    }
}

/// No hooks.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;
impl Hooks for NoHooks {}

/// I/O an action asks of the driver, in the order the driver must do it.
#[derive(Debug)]
pub enum Io {
    /// Send this message to `to` (a driver drops what is for a connection it no longer has).
    Send {
        /// The peer connection.
        to: PeerId,
        /// The message.
        msg: Message,
    },
    /// Send the queue's records `from_seq..=through_seq` as `Write`s (a catch-up or a replay;
    /// [`Executor::queued_writes`] reads them). Count them as recovery traffic.
    SendQueued {
        /// The peer connection.
        to: PeerId,
        /// First seq.
        from_seq: u64,
        /// Last seq.
        through_seq: u64,
    },
    /// Send `ChunkData` for `range`: its bytes as of now ([`Executor::with_chunk_bytes`] with
    /// this overlay, before the next action runs; [`Executor::chunk_message`] for a driver that
    /// needs the message whole).
    SendChunk {
        /// The peer connection.
        to: PeerId,
        /// The chunk.
        range: ChunkRange,
        /// First queued record to lay over the region's bytes.
        overlay_from: u64,
        /// Last one (below `overlay_from`: none).
        overlay_through: u64,
    },
    /// Callers' tickets through this one are complete.
    Complete(u64),
    /// Close this peer's connection.
    Disconnect {
        /// The peer connection.
        peer: PeerId,
        /// Why.
        fault: PeerFault,
    },
    /// Send this reject to the peer and close its connection.
    Reject {
        /// The peer connection.
        peer: PeerId,
        /// The code.
        code: RejectCode,
        /// The reason.
        reason: String,
    },
    /// Stop the node.
    Fatal(FatalError),
    /// This node stopped being a primary: fail every write not completed (and later ones).
    RefuseWrites(WritesRefused),
    /// A divergent suffix after `after`: save the records durably before doing the I/O that
    /// follows (the repair requests).
    Discard {
        /// The common point.
        after: u64,
        /// Its last seq.
        through: u64,
        /// The records, in seq order.
        records: Vec<DiscardedRecord>,
        /// Bytes of region the repair asks for (the ranges the records wrote, merged).
        repair_bytes: u64,
    },
    /// Record `seq` (of `term`) was written to the region (for the driver's bookkeeping).
    Applied {
        /// The record's seq.
        seq: u64,
        /// The term that assigned it.
        term: u64,
    },
    /// The queue's records were folded into the dirty-chunk bitmap (the peer is away and
    /// the queue was full).
    Folded {
        /// Records folded.
        records: u64,
        /// Chunks marked dirty now (they were clean before).
        new_chunks: u64,
        /// Chunks dirty in all.
        dirty_chunks: u64,
    },
    /// A resync or an online verify ended.
    TransferFinished(VerifyReport),
}

/// Bytes and records a recovery moved (the driver adds what it streams for `SendQueued`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryTraffic {
    /// Payload bytes.
    pub bytes: u64,
    /// Records.
    pub records: u64,
}

/// What the queue and the region hold durably, by their contracts: the queue's last seq made
/// durable by a completed barrier, and the last checkpointed `applied_through`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DurablePoint {
    /// Highest seq the queue made durable.
    pub last_seq: u64,
    /// Highest `applied_through` checkpointed.
    pub applied: u64,
}

/// The core's view of what a restarting node recovered from its queue: the one conversion.
/// `repair_unfinished_after` is [`mirror_storage::unfinished_repair`] of that queue.
/// The node's dirty-chunk bitmap contributes its chunks, its `resync_from` and its resync
/// mark; `region_blank` is [`RegionStore::blank_at_start`].
pub fn recovered(
    replay: ReplayState,
    repair_unfinished_after: Option<u64>,
    bitmap: &dyn BitmapStore,
    region_blank: bool,
) -> Recovered {
    Recovered {
        peer_node_id: replay.peer_node_id,
        // An empty queue holds nothing to apply: everything through its last seq is in the
        // region (a log continued after a resync may not have recorded it yet).
        applied_through: if replay.first_seq.is_none() {
            replay.last_seq
        } else {
            replay.applied_through
        },
        first_seq: replay.first_seq,
        last_seq: replay.last_seq,
        unapplied: replay
            .unapplied
            .into_iter()
            .map(|r| Record {
                seq: r.seq,
                term: r.term,
                offset: r.offset,
                data: Payload::from(r.payload),
            })
            .collect(),
        current_term: replay.current_term,
        term_history: replay.term_history,
        alone_from: replay.alone_from,
        repair_unfinished_after,
        dirty: bitmap.dirty(),
        resync_from: bitmap.resync_from(),
        resync_target: bitmap.resync_target(),
        region_blank,
    }
}

/// `power`/`pmem`: the longest a checkpoint of applied records waits. Each one costs two syncs
/// (the region's, then the queue's) on the node's loop, so it is paced by time alone: a
/// checkpoint at the first idle moment (as before) fell between every two writes at queue depth 1
/// and put its syncs on the next write's path (measured between two emulated machines: 6.4 device
/// flushes per synchronous write, p50 2.4× DRBD's; 2.4 flushes with this pacing). Between
/// checkpoints the peer keeps the records (a power loss replays them); a queue half full
/// checkpoints at once.
pub const CHECKPOINT_INTERVAL_US: u64 = 50_000;

/// `process`: the longest a checkpoint waits while the loop never goes idle (a pipelined
/// stream). A checkpoint costs no sync there (the page cache is the durable copy), only a
/// metadata slot written in place, so it is taken at the loop's first idle moment: a primary's
/// while it waits for the next ack, instead of between an ack and the completion it brings (it
/// was written per batch, on every synchronous write's path, on both nodes).
pub const PROCESS_CHECKPOINT_INTERVAL_US: u64 = 1_000;

/// How [`Executor::checkpoint_due`] paces checkpoints (by default, the queue's durability's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointPacing {
    /// `process`: at the loop's first idle moment, and at least every
    /// [`PROCESS_CHECKPOINT_INTERVAL_US`].
    WhenIdle,
    /// `power`/`pmem`: every [`CHECKPOINT_INTERVAL_US`].
    Interval,
}

impl CheckpointPacing {
    /// The pacing a node of this durability uses.
    pub fn of(durability: Durability) -> Self {
        match durability {
            Durability::Process => CheckpointPacing::WhenIdle,
            Durability::Power | Durability::Pmem => CheckpointPacing::Interval,
        }
    }
}

/// Whether a node is a primary or a backup: the queue's own notion of it.
pub use mirror_storage::Role;

/// The core with the node's queue and region, and the rules that execute its actions.
pub struct Executor<R, H> {
    /// The protocol core.
    pub core: Replica,
    /// The node's persistent queue.
    pub queue: PersistentQueue,
    /// The node's region.
    pub region: R,
    /// The driver's hooks.
    pub hooks: H,
    /// The node's dirty-chunk bitmap.
    pub bitmap: Box<dyn BitmapStore>,
    /// Chunk images with queued records laid over, kept across chunks.
    scratch: Vec<u8>,
    /// Applies gathered for one [`RegionStore::write_gathered`], and the I/O that must follow
    /// them (their `Applied` and the completions after them), in order.
    gathered: Vec<(u64, Payload)>,
    held_back: Vec<Io>,
    deferred_commit: bool,
    /// How checkpoints are paced (the simulator draws it per seed).
    pub checkpoint_pacing: CheckpointPacing,
    commit_pending: Option<u64>,
    last_checkpoint_us: u64,
    durable: DurablePoint,
    recovery: RecoveryTraffic,
}

impl<R: RegionStore, H: Hooks> Executor<R, H> {
    /// Starts the core of `role` from what `queue` recovered (the core's first actions, such as
    /// a primary's new term or a backup's applies of its recovered records, are pending).
    pub fn start(
        role: Role,
        cfg: CoreConfig,
        mut queue: PersistentQueue,
        region: R,
        bitmap: Box<dyn BitmapStore>,
        hooks: H,
    ) -> Result<Self, StorageError> {
        let replay = queue.replay_state()?;
        Ok(Self::with_replay(
            role, cfg, queue, replay, region, bitmap, hooks,
        ))
    }

    /// [`Self::start`] for a driver that already read the queue's [`ReplayState`] (to report a
    /// renumbering, say).
    pub fn with_replay(
        role: Role,
        cfg: CoreConfig,
        queue: PersistentQueue,
        replay: ReplayState,
        region: R,
        bitmap: Box<dyn BitmapStore>,
        hooks: H,
    ) -> Self {
        // Durable: recovery's barrier covered every record it kept, and `applied_through` came
        // from a durable metadata slot (or was lowered by a renumbering, a barrier too).
        let deferred_commit = cfg.deferred_commit;
        let rec = recovered(
            replay,
            mirror_storage::unfinished_repair(&queue),
            bitmap.as_ref(),
            region.blank_at_start(),
        );
        let durable = DurablePoint {
            last_seq: rec.last_seq,
            applied: rec.applied_through,
        };
        let core = match role {
            Role::Primary => Replica::primary(cfg, rec),
            Role::Backup => Replica::backup(cfg, rec),
        };
        Executor {
            checkpoint_pacing: CheckpointPacing::of(queue.durability()),
            core,
            queue,
            region,
            hooks,
            bitmap,
            scratch: Vec::new(),
            gathered: Vec::new(),
            held_back: Vec::new(),
            deferred_commit,
            commit_pending: None,
            last_checkpoint_us: 0,
            durable,
            recovery: RecoveryTraffic::default(),
        }
    }

    /// What the queue and the region hold durably.
    pub fn durable(&self) -> DurablePoint {
        self.durable
    }

    /// What the last recovery moved so far.
    pub fn recovery(&self) -> RecoveryTraffic {
        self.recovery
    }

    /// Counts records the driver streamed for `Io::SendQueued`.
    pub fn count_recovery(&mut self, records: u64, bytes: u64) {
        self.recovery.records += records;
        self.recovery.bytes += bytes;
    }

    /// The `Write` messages of the queue's records `from_seq..=through_seq` (for a driver that
    /// sends a catch-up at once), or the first seq it lacks.
    pub fn queued_writes(&self, from_seq: u64, through_seq: u64) -> Result<Vec<Message>, u64> {
        let mut writes = Vec::new();
        for r in self.queue.iter_from(from_seq) {
            let Ok(r) = r else { break };
            if r.seq > through_seq || r.seq != from_seq + writes.len() as u64 {
                break;
            }
            writes.push(Message::Write {
                seq: r.seq,
                term: r.term,
                offset: r.offset,
                data: Payload::with_crc(Bytes::copy_from_slice(r.payload), r.payload_crc),
            });
        }
        let next = from_seq + writes.len() as u64;
        if next <= through_seq {
            return Err(next);
        }
        Ok(writes)
    }

    /// Appends share a run of the queue (`PersistentQueue::begin_append_run`: under `power`
    /// their records reach the file in one write, not one each) while nothing but appends and
    /// the sends of writes comes between them. A primary's pass alternates the two (each
    /// write is sent before its own append, and the core allows a crash to fall between them:
    /// the backup then holds records the primary's queue lacks, which the next handshake
    /// takes back). Any other action ends the run first, so that whatever it does (a sync, an
    /// ack, an apply, a read of the queue) comes after the records are written.
    fn keep_append_run(&mut self, action: &Action) -> Result<(), StorageError> {
        match action {
            Action::Append { .. } => {
                self.queue.begin_append_run();
                Ok(())
            }
            Action::Send {
                msg: Message::Write { .. },
                ..
            } => Ok(()),
            // Outside `power` no run is ever open: one check per action.
            _ if self.queue.append_run_open() => self.queue.end_append_run(),
            _ => Ok(()),
        }
    }

    /// Ends what the batch's actions left open: the run of appends its last actions made
    /// (their records are written to the queue's file), the applies gathered (written to the
    /// region, then the I/O held back behind them handed over in `io`). Called by a driver
    /// after the last action of a batch; until then those records are in this process's
    /// memory only, and those applies not in the region.
    pub fn end_of_actions(&mut self, io: &mut Vec<Io>) -> Result<(), ExecError> {
        self.queue.end_append_run()?;
        self.write_gathered(io)
    }

    /// Applies `record` to the region: at once, or gathered with the batch's next applies
    /// where the region writes them together for less ([`RegionStore::gathers_writes`]:
    /// under `power` each write is a system call, and neighbours become one).
    fn apply(&mut self, record: Record, io: &mut Vec<Io>) -> Result<(), ExecError> {
        if !self.region.gathers_writes() {
            io.push(Io::Applied {
                seq: record.seq,
                term: record.term,
            });
            self.region.write(record.offset, &record.data)?;
            return Ok(());
        }
        self.held_back.push(Io::Applied {
            seq: record.seq,
            term: record.term,
        });
        self.gathered.push((record.offset, record.data));
        if self.gathered.len() >= mirror_storage::GATHER_MAX_PIECES {
            self.write_gathered(io)?;
        }
        Ok(())
    }

    /// Writes the gathered applies, then hands over the I/O held back behind them.
    fn write_gathered(&mut self, io: &mut Vec<Io>) -> Result<(), ExecError> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let writes: Vec<(u64, &[u8])> = self
            .gathered
            .iter()
            .map(|(offset, data)| (*offset, &data[..]))
            .collect();
        self.region.write_gathered(&writes)?;
        self.gathered.clear();
        io.append(&mut self.held_back);
        Ok(())
    }

    fn queue_barrier_done(&mut self) {
        self.durable.last_seq = self.queue.last_seq();
    }

    /// Executes one action of the core: the storage part here, the I/O handed to the driver
    /// through `io`, in order. A driver calls [`end_of_actions`](Self::end_of_actions) after
    /// the last action of a batch.
    pub fn execute(&mut self, action: Action, io: &mut Vec<Io>) -> Result<(), ExecError> {
        self.keep_append_run(&action)?;
        if !self.gathered.is_empty()
            && !matches!(
                action,
                Action::Apply(_) | Action::ApplyCaughtUp(_) | Action::Complete { .. }
            )
        {
            self.write_gathered(io)?;
        }
        match action {
            Action::Send { to, msg } => io.push(Io::Send { to, msg }),
            Action::SendQueued {
                to,
                from_seq,
                through_seq,
            } => io.push(Io::SendQueued {
                to,
                from_seq,
                through_seq,
            }),
            Action::Append { record, recovery } => {
                self.queue.append_with_crc(
                    record.seq,
                    record.term,
                    record.offset,
                    &record.data,
                    record.data.crc(),
                )?;
                if recovery {
                    self.count_recovery(1, record.data.len() as u64);
                }
                if !recovery && self.hooks.apply_at_append() {
                    io.push(Io::Applied {
                        seq: record.seq,
                        term: record.term,
                    });
                    self.region.write(record.offset, &record.data)?;
                }
            }
            Action::SyncQueue => {
                self.queue.sync()?;
                self.queue_barrier_done();
            }
            Action::RefuseWrites { reason } => io.push(Io::RefuseWrites(reason)),
            Action::PersistAloneFrom { seq } => {
                self.queue.set_alone_from(seq)?;
                self.queue_barrier_done();
            }
            Action::PersistRole { role, superseded } => {
                // A metadata update is a barrier, like a term's.
                let role = match role {
                    WireRole::Primary => Role::Primary,
                    WireRole::Backup => Role::Backup,
                };
                self.queue.set_role(role, superseded)?;
                self.queue_barrier_done();
            }
            Action::PersistTerm { term } => {
                // A metadata update is a barrier: every earlier append is durable too.
                self.queue.set_current_term(term)?;
                self.queue_barrier_done();
            }
            Action::RequestRepair {
                peer,
                after,
                through,
            } => self.request_repair(peer, after, through, io)?,
            Action::SendRegion { to, ranges } => {
                for (offset, len) in repair_pieces(&ranges) {
                    let mut data = vec![0u8; len as usize];
                    self.region.read(offset, &mut data)?;
                    self.recovery.bytes += len;
                    io.push(Io::Send {
                        to,
                        msg: Message::RepairData {
                            offset,
                            data: Bytes::from(data),
                        },
                    });
                }
            }
            Action::RepairRegion { offset, data } => {
                self.region.write(offset, &data)?;
                self.recovery.bytes += data.len() as u64;
            }
            Action::TruncateAfter { after } => {
                // The repaired ranges are durable before the records that explain them go (a
                // crash in between redoes the whole repair).
                self.region.sync()?;
                self.queue.truncate_after(after)?;
                self.durable.last_seq = after;
                self.durable.applied = self.durable.applied.min(after);
                // A checkpoint asked for before the cut must not record an apply point past
                // it: the seqs after it are the primary's records now, not applied yet.
                self.commit_pending = self.commit_pending.map(|p| p.min(after));
            }
            Action::Apply(record) => {
                self.hooks.before_apply(record.seq);
                self.apply(record, io)?;
            }
            Action::ApplyCaughtUp(record) => {
                self.count_recovery(1, record.data.len() as u64);
                self.hooks.before_apply(record.seq);
                self.apply(record, io)?;
            }
            Action::CommitApplied { through } => {
                if self.deferred_commit {
                    // Checkpointed soon (see `checkpoint`), not per batch.
                    self.commit_pending = Some(through);
                } else {
                    // Durable as written (process mode: the page cache survives).
                    self.queue.set_applied_through(through)?;
                    self.queue_barrier_done();
                    self.durable.applied = through;
                }
            }
            Action::Trim { through } => self.queue.trim_through(through)?,
            Action::BindPeer { node_id } => {
                self.queue.set_peer_node_id(node_id)?;
                self.queue_barrier_done();
            }
            Action::Complete { ticket } if !self.gathered.is_empty() => {
                // The caller may read its write once told: not before the region has it.
                self.held_back.push(Io::Complete(ticket));
            }
            Action::Complete { ticket } => io.push(Io::Complete(ticket)),
            Action::Disconnect { peer, fault } => io.push(Io::Disconnect { peer, fault }),
            Action::Reject { peer, code, reason } => io.push(Io::Reject { peer, code, reason }),
            Action::RecoveryStarted => self.recovery = RecoveryTraffic::default(),
            Action::Fatal(e) => io.push(Io::Fatal(e)),
            Action::Fold { through } => self.fold(through, io)?,
            Action::MarkAllDirty { resync_from } => {
                self.bitmap.mark_all()?;
                self.bitmap.set_resync_from(resync_from)?;
                if self.queue.history_floor() == 0 || resync_from < self.queue.history_floor() {
                    self.queue.set_history_floor(resync_from)?;
                }
            }
            Action::ClearDirty { chunk } => self.bitmap.clear(chunk)?,
            Action::ResetDirty => {
                self.bitmap.clear_all()?;
                self.bitmap.set_resync_from(0)?;
                self.queue.set_history_floor(0)?;
            }
            Action::SendDigest {
                to,
                range,
                overlay_from,
                overlay_through,
            } => {
                let digest =
                    self.with_chunk_bytes(range, overlay_from, overlay_through, chunk_digest)?;
                io.push(Io::Send {
                    to,
                    msg: Message::ChunkDigest { range, digest },
                });
            }
            Action::SendChunk {
                to,
                range,
                overlay_from,
                overlay_through,
                elide_zero,
            } => {
                let parts = if elide_zero && overlay_from > overlay_through {
                    self.split_off_zero_chunks(range)?
                } else {
                    vec![(range, false)]
                };
                for (range, zero) in parts {
                    if zero {
                        self.core.on_chunk_elided(to, range);
                        continue;
                    }
                    self.recovery.bytes += u64::from(range.len);
                    io.push(Io::SendChunk {
                        to,
                        range,
                        overlay_from,
                        overlay_through,
                    });
                }
            }
            Action::CompareChunk { to, range, digest } => {
                let ours = self.with_chunk_bytes(range, 1, 0, chunk_digest)?;
                io.push(Io::Send {
                    to,
                    msg: Message::ChunkVerdict {
                        range,
                        same: ours == digest,
                    },
                });
            }
            Action::InstallChunk { offset, data } => {
                self.region.write(offset, &data)?;
                self.recovery.bytes += data.len() as u64;
            }
            Action::SyncRegion => self.region.sync()?,
            Action::ClearResyncTarget => self.bitmap.set_resync_target(None)?,
            Action::BeginResyncTarget {
                primary,
                applied_through,
            } => {
                // Nothing of the queue is applied again over a resynced chunk after a crash.
                self.make_applied_durable(applied_through)?;
                self.bitmap.set_resync_target(Some(primary))?;
            }
            Action::AdoptLog { through, history } => {
                self.queue.adopt_log(through, history)?;
                self.durable.last_seq = through;
                self.durable.applied = through;
                self.commit_pending = None;
            }
            Action::TransferFinished(report) => io.push(Io::TransferFinished(report)),
        }
        Ok(())
    }

    /// Makes the region durable and records `applied_through` (a checkpoint on demand).
    fn make_applied_durable(&mut self, applied_through: u64) -> Result<(), StorageError> {
        self.region.sync()?;
        if applied_through > self.queue.applied_through() {
            self.queue.set_applied_through(applied_through)?;
            self.queue_barrier_done();
        }
        self.durable.applied = self.durable.applied.max(applied_through);
        if self.commit_pending.is_some_and(|p| p <= applied_through) {
            self.commit_pending = None;
        }
        Ok(())
    }

    /// Folds the queue's records through `through` into the bitmap (see [`Action::Fold`]).
    fn fold(&mut self, through: u64, io: &mut Vec<Io>) -> Result<(), ExecError> {
        self.make_applied_durable(through)?;
        let geometry = self.core.geometry();
        let first = self.queue.first_seq();
        let mut chunks: Vec<Range<u64>> = Vec::new();
        let mut records = 0;
        for rec in self.queue.iter_from(first.unwrap_or(through + 1)) {
            let rec = rec?;
            if rec.seq > through {
                break;
            }
            records += 1;
            let range = geometry.chunks_of(rec.offset, rec.payload.len() as u64);
            // Neighbouring writes often touch the same chunks: merge as we go.
            match chunks.last_mut() {
                Some(last) if range.start <= last.end && last.start <= range.end => {
                    last.start = last.start.min(range.start);
                    last.end = last.end.max(range.end);
                }
                _ => chunks.push(range),
            }
        }
        let before = self.core.dirty_chunks();
        self.bitmap.mark(&chunks)?;
        if self.bitmap.resync_from() == 0 {
            if let Some(first) = first {
                self.bitmap.set_resync_from(first)?;
            }
        }
        // The terms of the folded seqs stay known: the backup's log is matched against them.
        let floor = self.bitmap.resync_from();
        if self.queue.history_floor() == 0 || floor < self.queue.history_floor() {
            self.queue.set_history_floor(floor)?;
        }
        self.queue.trim_through(through)?;
        self.core.on_folded(&chunks);
        let dirty_chunks = self.core.dirty_chunks();
        io.push(Io::Folded {
            records,
            new_chunks: dirty_chunks - before,
            dirty_chunks,
        });
        Ok(())
    }

    /// Calls `f` with the bytes of `range` as of that point of the stream: the region's bytes
    /// with the queue's records `from..=through` (sent, not applied) laid over them. In place
    /// when none of those records touches the chunk (a resync lays nothing over), else a copy
    /// in a buffer kept across chunks. A driver sends a chunk for [`Io::SendChunk`] with it.
    pub fn with_chunk_bytes<T>(
        &mut self,
        range: ChunkRange,
        from: u64,
        through: u64,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, StorageError> {
        let len = range.len as usize;
        if !self.overlay_touches(range, from, through)? {
            return self.region.with_bytes(range.offset, len, f);
        }
        let mut image = std::mem::take(&mut self.scratch);
        image.resize(len, 0);
        let laid = self.lay_over(range, from, through, &mut image);
        let out = laid.map(|()| f(&image));
        self.scratch = image;
        out
    }

    /// Copies the region's bytes of `range` into `image`, then the bytes the queue's records
    /// `from..=through` write into it.
    fn lay_over(
        &self,
        range: ChunkRange,
        from: u64,
        through: u64,
        image: &mut [u8],
    ) -> Result<(), StorageError> {
        let start = range.offset;
        let end = start + u64::from(range.len);
        self.region.read(start, image)?;
        for rec in self.queue.iter_from(from) {
            let rec = rec?;
            if rec.seq > through {
                break;
            }
            let (ws, we) = (rec.offset, rec.offset + rec.payload.len() as u64);
            let (s, e) = (ws.max(start), we.min(end));
            if s < e {
                image[(s - start) as usize..(e - start) as usize]
                    .copy_from_slice(&rec.payload[(s - ws) as usize..(e - ws) as usize]);
            }
        }
        Ok(())
    }

    /// A run of chunks cut into parts that are all zeros and parts that are not (see
    /// [`mirror_proto::zero_runs`]), read in place.
    fn split_off_zero_chunks(
        &self,
        range: ChunkRange,
    ) -> Result<Vec<(ChunkRange, bool)>, StorageError> {
        let chunk_size = self.core.geometry().chunk_size();
        self.region
            .with_bytes(range.offset, range.len as usize, |bytes| {
                mirror_proto::zero_runs(range.offset, bytes, chunk_size)
            })
    }

    /// Whether a queued record of `from..=through` writes into `range` (its image then differs
    /// from the region's bytes).
    fn overlay_touches(
        &self,
        range: ChunkRange,
        from: u64,
        through: u64,
    ) -> Result<bool, StorageError> {
        let (start, end) = (range.offset, range.offset + u64::from(range.len));
        if from <= through {
            for rec in self.queue.iter_from(from) {
                let rec = rec?;
                if rec.seq > through {
                    break;
                }
                if rec.offset < end && start < rec.offset + rec.payload.len() as u64 {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The `ChunkData` message of [`Io::SendChunk`], its bytes copied (for a driver that keeps
    /// the message whole, or sends it later).
    pub fn chunk_message(
        &mut self,
        range: ChunkRange,
        from: u64,
        through: u64,
    ) -> Result<Message, StorageError> {
        let data = self.with_chunk_bytes(range, from, through, Bytes::copy_from_slice)?;
        Ok(Message::ChunkData {
            offset: range.offset,
            data,
        })
    }

    /// Reads the divergent suffix `(after, through]`, hands it to the driver to save, then the
    /// repair requests for the ranges it wrote.
    fn request_repair(
        &mut self,
        peer: PeerId,
        after: u64,
        through: u64,
        io: &mut Vec<Io>,
    ) -> Result<(), ExecError> {
        let mut records = Vec::new();
        for rec in self.queue.iter_from(after + 1) {
            let rec = rec?;
            if rec.seq > through {
                break;
            }
            records.push(DiscardedRecord {
                seq: rec.seq,
                term: rec.term,
                region_offset: rec.offset,
                payload: rec.payload.to_vec(),
            });
        }
        if records.len() as u64 != through - after {
            return Err(ExecError::MissingRecords {
                after,
                through,
                found: records.len() as u64,
            });
        }
        let ranges = merged_ranges(
            records
                .iter()
                .map(|r| (r.region_offset, r.payload.len() as u64)),
        );
        io.push(Io::Discard {
            after,
            through,
            records,
            repair_bytes: ranges.iter().map(|r| r.len).sum(),
        });
        io.extend(repair_requests(&ranges).map(|msg| Io::Send { to: peer, msg }));
        Ok(())
    }

    /// Whether to make pending applies durable now (`idle`: the loop's pass found nothing to
    /// do), by [`Self::checkpoint_pacing`], and at once when the queue is half full (trims
    /// wait for checkpoints).
    pub fn checkpoint_due(&self, now_us: u64, idle: bool) -> bool {
        if self.commit_pending.is_none() {
            return false;
        }
        let since = now_us.saturating_sub(self.last_checkpoint_us);
        let paced = match self.checkpoint_pacing {
            CheckpointPacing::WhenIdle => idle || since >= PROCESS_CHECKPOINT_INTERVAL_US,
            CheckpointPacing::Interval => since >= CHECKPOINT_INTERVAL_US,
        };
        paced || self.queue.used_bytes() > self.queue.capacity_bytes() / 2
    }

    /// The checkpoint: the region becomes durable, then `applied_through` is recorded with a
    /// queue barrier (which makes every earlier append durable too), then the core may report
    /// and trim. Returns `false` when a hook stopped it part way (a crash inside it).
    pub fn checkpoint(&mut self, now_us: u64) -> Result<bool, StorageError> {
        let Some(through) = self.commit_pending.take() else {
            return Ok(true);
        };
        self.region.sync()?;
        if !self.hooks.checkpoint_step(CheckpointStage::RegionSynced) {
            return Ok(false);
        }
        self.queue.set_applied_through(through)?;
        self.durable.applied = through;
        self.queue_barrier_done();
        if !self.hooks.checkpoint_step(CheckpointStage::Recorded) {
            return Ok(false);
        }
        self.core.on_applied_durable(through);
        self.last_checkpoint_us = now_us;
        Ok(true)
    }

    /// Applies not yet checkpointed.
    pub fn commit_pending(&self) -> Option<u64> {
        self.commit_pending
    }
}
