//! One simulated node: the real core and the real queue (on a file), a region in memory with
//! its durable copy, and an executor of the core's actions that follows the real node's rules
//! (`src/node/`): deferred commits checkpointed (region first, then `applied_through` with a
//! queue barrier), then reported to the core.
//!
//! A node is named by its identity ([`NodeName`]); its role is its core's and changes with
//! promotions, demotions and fences. It starts in the role the simulated operator asks for, as
//! the real node starts in its configured role (`src/node/open.rs`), except that a queue
//! superseded as a primary is never started as one.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mirror_exec::{BitmapStore, CheckpointStage, Executor, Hooks, Io, MemoryRegion};
use mirror_proto::{
    Action, ChunkSet, CoreConfig, FatalError, Message, PeerFault, PeerId, PeerLossPolicy, WireRole,
    WritesRefused,
};
use mirror_storage::{Durability, PersistentQueue, QueueParams, StorageError};

use crate::media::{power_loss_image, DurableImage, Tear};
use crate::net::NodeName;
use crate::{QUEUE_BYTES, REGION_BYTES};

/// What executing the core's actions asks of the rest of the simulation, and what the checkers
/// must see of it, in the order the actions ran.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send this message to the peer. `durable` is the node's (last_seq, applied_through)
    /// made durable when the core's action was executed (not after the rest of the batch), and
    /// `role` the role it acted in then.
    Send {
        to: PeerId,
        msg: Message,
        durable: (u64, u64),
        role: WireRole,
    },
    /// A catch-up from the queue: these `Write` messages, for seqs `from_seq..=through_seq`.
    SendQueued {
        to: PeerId,
        from_seq: u64,
        through_seq: u64,
        writes: Vec<Message>,
    },
    /// Drop the connection (after sending what was queued before); `fault` says why, when the
    /// core said (a reject sent by the core has none).
    Close {
        to: PeerId,
        fault: Option<PeerFault>,
    },
    /// Every client ticket up to this one is complete.
    Complete(u64),
    /// About to write record (`seq`, `term`) into the region, acting as a primary or not.
    Apply {
        seq: u64,
        term: u64,
        as_primary: bool,
    },
    /// The node saved and will drop these records (seq, term): its divergent suffix after
    /// `after`, through `through`.
    Discard {
        after: u64,
        through: u64,
        records: Vec<(u64, u64)>,
    },
    /// The node dropped every record after `after` (the saved divergent suffix).
    Truncated { after: u64 },
    /// The node persisted `term` as the highest it has seen.
    TermPersisted(u64),
    /// The node persisted a new role. `new_term` is the term a new primary persisted just
    /// before (its writing term), if any.
    RoleChanged {
        role: WireRole,
        superseded: bool,
        new_term: Option<u64>,
    },
    /// The core stopped taking writes: its pending tickets fail.
    RefuseWrites(WritesRefused),
    /// The core stopped the node.
    Fatal(FatalError),
    /// A resync (or initial sync) into the peer completed, sending `bytes` of chunks.
    Resynced { bytes: u64 },
    /// A resync into this node ended: its region holds its primary's writes through
    /// `through`, and its log continues after it.
    Adopted { through: u64 },
}

/// What a restarted node recovered, for the checkers.
pub(crate) struct Recovery {
    /// The queue's `last_seq` after recovery.
    pub last_seq: u64,
    /// The region as it will be once the node replayed its queue's unapplied records: it
    /// must hold the writes of every seq through `last_seq`.
    pub rebuilt: Vec<u8>,
    /// The terms along its recovered log.
    pub terms: mirror_proto::TermHistory,
    /// The role it starts in.
    pub role: WireRole,
    /// Asked to start as a primary, its queue said it was superseded as one, or its bitmap
    /// that a resync or catch-up into it is unfinished: it starts as a backup (the real node
    /// refuses to open it as a primary; an operator then starts it as a backup).
    pub refused_primary: bool,
    /// Records at seqs its queue no longer holds (lost unsynced, or cut): their terms, from seq
    /// `last_seq + 1` on, as the model log had them.
    pub dropped: Vec<u64>,
}

/// What one execution of the core's actions did.
pub(crate) struct Executed {
    /// What the executed actions ask of the simulation.
    pub effects: Vec<Effect>,
    /// For a crash in the middle: (actions executed, actions there were).
    pub cut: Option<(usize, usize)>,
}

/// The role a node starts in after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartAs {
    /// The role its queue last persisted (the operator's configuration follows failovers).
    PersistedRole,
    /// The other one (an operator restarting it "as backup" or "as primary").
    OtherRole,
}

pub(crate) struct SimNode {
    pub name: NodeName,
    /// The core, the queue and the region, executed by the same rules as the real node
    /// (`mirror-exec`).
    pub exec: Executor<MemoryRegion, SimHooks>,
    /// The role of the actions executed so far: the core's role changes at once (a promotion,
    /// a fence), this one when the action persisting it runs. The checkers judge each action
    /// by the role the node acted in.
    pub acting_role: WireRole,
    /// The term of each seq the node holds, trimmed ones included (index `seq - 1`): its log
    /// as the checkers see it, kept from the appends and truncations it executed.
    pub log: Vec<u64>,
    queue_path: PathBuf,
    durable: DurableImage,
    bitmap: SimBitmap,
    cfg: CoreConfig,
    canaries: Canaries,
}

/// What a dirty-chunk bitmap holds.
#[derive(Debug, Clone, Default)]
struct BitmapState {
    dirty: ChunkSet,
    resync_from: u64,
    resync_target: Option<u64>,
}

/// The simulated dirty-chunk bitmap: what is written, and what a power loss would keep. Marks
/// and state updates are durable at once (with every clear before them, as the file's sync
/// covers it); clears alone are not. Shared with the [`SimNode`], which keeps it across
/// crashes.
#[derive(Clone)]
pub(crate) struct SimBitmap(Arc<Mutex<(BitmapState, BitmapState)>>);

impl SimBitmap {
    fn new(chunks: u64) -> SimBitmap {
        let state = BitmapState {
            dirty: ChunkSet::new(chunks),
            ..BitmapState::default()
        };
        SimBitmap(Arc::new(Mutex::new((state.clone(), state))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut BitmapState, &mut BitmapState) -> T) -> T {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (written, durable) = &mut *g;
        f(written, durable)
    }

    /// A power loss: only the durable state is left.
    fn lose_power(&self) {
        self.with(|written, durable| *written = durable.clone());
    }
}

impl BitmapStore for SimBitmap {
    fn dirty(&self) -> ChunkSet {
        self.with(|w, _| w.dirty.clone())
    }
    fn mark(&mut self, chunks: &[Range<u64>]) -> Result<(), StorageError> {
        self.with(|w, d| {
            for r in chunks {
                w.dirty.insert_range(r.clone());
            }
            *d = w.clone();
        });
        Ok(())
    }
    fn mark_all(&mut self) -> Result<(), StorageError> {
        self.with(|w, d| {
            w.dirty = ChunkSet::full(w.dirty.capacity());
            *d = w.clone();
        });
        Ok(())
    }
    fn clear(&mut self, chunk: u64) -> Result<(), StorageError> {
        self.with(|w, _| w.dirty.remove(chunk));
        Ok(())
    }
    fn clear_all(&mut self) -> Result<(), StorageError> {
        self.with(|w, _| w.dirty.clear());
        Ok(())
    }
    fn resync_from(&self) -> u64 {
        self.with(|w, _| w.resync_from)
    }
    fn set_resync_from(&mut self, seq: u64) -> Result<(), StorageError> {
        self.with(|w, d| {
            w.resync_from = seq;
            *d = w.clone();
        });
        Ok(())
    }
    fn resync_target(&self) -> Option<u64> {
        self.with(|w, _| w.resync_target)
    }
    fn set_resync_target(&mut self, primary: Option<u64>) -> Result<(), StorageError> {
        self.with(|w, d| {
            w.resync_target = primary;
            *d = w.clone();
        });
        Ok(())
    }
}

/// The simulation's hooks: the first canary, and a crash inside a checkpoint.
pub(crate) struct SimHooks {
    /// The first canary, while the node acts as a primary.
    apply_at_append: bool,
    /// Stop the next checkpoint after this many of its stages (a crash inside it).
    die_after_stages: Option<u8>,
}

impl Hooks for SimHooks {
    fn apply_at_append(&self) -> bool {
        self.apply_at_append
    }
    fn checkpoint_step(&mut self, stage: CheckpointStage) -> bool {
        let done = match stage {
            CheckpointStage::RegionSynced => 0,
            CheckpointStage::Recorded => 1,
        };
        self.die_after_stages != Some(done)
    }
}

/// The simulator's canaries: deliberately broken nodes its checkers must catch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Canaries {
    /// A primary applies each write at submission, before the backup's ack.
    pub apply_before_ack: bool,
    /// The nodes match logs by seq alone (a backup acks a duplicate seq of another term).
    pub seq_only_matching: bool,
}

/// What one action tells the checkers, noted before the executor consumes it.
enum Noted {
    Append {
        seq: u64,
        term: u64,
    },
    Truncate {
        after: u64,
    },
    Term(u64),
    Role {
        role: WireRole,
        superseded: bool,
    },
    /// A resync's end: the log continues after `through`.
    Adopt {
        through: u64,
    },
    Other,
}

impl Noted {
    fn of(action: &Action) -> Noted {
        match action {
            Action::Append { record, .. } => Noted::Append {
                seq: record.seq,
                term: record.term,
            },
            Action::TruncateAfter { after } => Noted::Truncate { after: *after },
            Action::PersistTerm { term } => Noted::Term(*term),
            Action::PersistRole { role, superseded } => Noted::Role {
                role: *role,
                superseded: *superseded,
            },
            Action::AdoptLog { through, .. } => Noted::Adopt { through: *through },
            _ => Noted::Other,
        }
    }
}

fn storage(e: StorageError) -> String {
    format!("storage: {e}")
}

fn io(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

fn storage_role(role: WireRole) -> mirror_storage::Role {
    match role {
        WireRole::Primary => mirror_storage::Role::Primary,
        WireRole::Backup => mirror_storage::Role::Backup,
    }
}

fn wire_role(role: mirror_storage::Role) -> WireRole {
    match role {
        mirror_storage::Role::Primary => WireRole::Primary,
        mirror_storage::Role::Backup => WireRole::Backup,
    }
}

/// The other role.
pub(crate) fn flipped(role: WireRole) -> WireRole {
    match role {
        WireRole::Primary => WireRole::Backup,
        WireRole::Backup => WireRole::Primary,
    }
}

impl SimNode {
    /// A new node `name` with a fresh queue (`a.queue` or `b.queue` in `dir`), started in
    /// `role`.
    pub fn create(
        dir: &Path,
        name: NodeName,
        role: WireRole,
        cfg: CoreConfig,
        canaries: Canaries,
    ) -> Result<SimNode, String> {
        let queue_path = dir.join(match name {
            NodeName::A => "a.queue",
            NodeName::B => "b.queue",
        });
        let params = QueueParams {
            node_id: cfg.node_id,
            role: storage_role(role),
            region_size: REGION_BYTES,
            capacity_bytes: QUEUE_BYTES,
        };
        let queue =
            PersistentQueue::create(&queue_path, &params, Durability::Process).map_err(storage)?;
        drop(queue);
        // Creation synced the whole file.
        let durable = DurableImage::of_file(&queue_path).map_err(|e| io("reading queue", e))?;
        let region = vec![0; REGION_BYTES as usize];
        let chunks = mirror_proto::ChunkGeometry::new(REGION_BYTES, cfg.chunk_size)
            .map_err(|e| e.to_string())?
            .chunk_count();
        let parts = Parts {
            name,
            queue_path,
            durable,
            bitmap: SimBitmap::new(chunks),
            cfg,
            canaries,
            log: Vec::new(),
        };
        Self::start(parts, Some(role), (region.clone(), region)).map(|(node, _)| node)
    }

    /// Opens the queue (recovery) and builds the executor and its core from what it recovered,
    /// in `role` (None: the role the queue persisted). `parts.durable` is the queue file's
    /// durable image so far: the hook is installed before recovery's own barrier, which makes
    /// every record recovery scanned durable. `region` is (written, durable).
    fn start(
        parts: Parts,
        role: Option<WireRole>,
        (written, region_durable): (Vec<u8>, Vec<u8>),
    ) -> Result<(SimNode, Recovery), String> {
        let Parts {
            name,
            queue_path,
            durable,
            bitmap,
            cfg,
            canaries,
            mut log,
        } = parts;
        let hook = durable
            .hook(&queue_path)
            .map_err(|e| io("opening queue", e))?;
        let (mut queue, _) =
            PersistentQueue::open_with_crash_hook(&queue_path, Durability::Process, hook)
                .map_err(storage)?;
        // As `src/node/open.rs`: the configured role decides (a queue's role is state), but a
        // node superseded as a primary never takes writes as one again by a restart, nor does
        // a node marked as the target of an unfinished resync or catch-up (its region may
        // hold writes its log lacks).
        let wanted = role.unwrap_or_else(|| wire_role(queue.role()));
        let refused_primary =
            wanted == WireRole::Primary && (queue.superseded() || bitmap.resync_target().is_some());
        let role = if refused_primary {
            WireRole::Backup
        } else {
            wanted
        };
        let superseded = queue.superseded();
        queue
            .set_role(storage_role(role), superseded)
            .map_err(storage)?;
        let replay = queue.replay_state().map_err(storage)?;
        let kept = replay.last_seq as usize;
        if kept > log.len() {
            return Err(format!(
                "node {name} recovered through seq {kept}, but it only ever appended {} records",
                log.len()
            ));
        }
        let dropped = log.split_off(kept);
        let recovery = Recovery {
            last_seq: replay.last_seq,
            rebuilt: rebuilt(&written, &replay),
            terms: replay.term_history.clone(),
            role,
            refused_primary,
            dropped,
        };
        let hooks = SimHooks {
            apply_at_append: false,
            die_after_stages: None,
        };
        let region = MemoryRegion {
            blank: written.iter().all(|&b| b == 0),
            written,
            durable: region_durable,
            gathers: false,
        };
        let exec_role = storage_role(role);
        let mut exec = Executor::with_replay(
            exec_role,
            cfg.clone(),
            queue,
            replay,
            region,
            Box::new(bitmap.clone()),
            hooks,
        );
        if canaries.seq_only_matching {
            exec.core.break_log_matching_for_canary();
        }
        let node = SimNode {
            name,
            exec,
            acting_role: role,
            log,
            queue_path,
            durable,
            bitmap,
            cfg,
            canaries,
        };
        Ok((node, recovery))
    }

    /// The region as written.
    pub fn region(&self) -> &[u8] {
        &self.exec.region.written
    }

    /// The core's role now.
    pub fn role(&self) -> WireRole {
        self.exec.core.role()
    }

    /// Crashes the node and starts it again from its files, as `start_as` says. A power loss
    /// keeps only durable bytes (tearing the rest word by word); a process crash keeps
    /// everything written, but what was not durable stays so (in the page cache) until a later
    /// barrier: a power loss after a process crash may still lose it.
    /// Checks that recovery kept what was made durable.
    pub fn crash_and_restart(
        self,
        power_loss: bool,
        start_as: StartAs,
        rng: &mut fastrand::Rng,
    ) -> Result<(SimNode, Tear, Recovery), String> {
        let SimNode {
            name,
            exec,
            log,
            queue_path,
            durable,
            bitmap,
            cfg,
            canaries,
            ..
        } = self;
        if power_loss {
            bitmap.lose_power();
        }
        let was_durable = exec.durable();
        let role_before = wire_role(exec.queue.role());
        let Executor { queue, region, .. } = exec;
        drop(queue);
        let mut tear = Tear::default();
        let (durable, region) = if power_loss {
            let p_written = rng.u32(0..=100);
            let written = std::fs::read(&queue_path).map_err(|e| io("reading queue", e))?;
            let (img, t) = power_loss_image(&written, &durable.snapshot(), p_written, rng);
            std::fs::write(&queue_path, img).map_err(|e| io("writing queue image", e))?;
            tear = t;
            let (img, t) = power_loss_image(&region.written, &region.durable, p_written, rng);
            tear.dirty_words += t.dirty_words;
            tear.written_words += t.written_words;
            // After the power loss, what is on the media is all there is: durable.
            let durable = DurableImage::of_file(&queue_path).map_err(|e| io("reading queue", e))?;
            (durable, (img.clone(), img))
        } else {
            (durable, (region.written, region.durable))
        };
        let role = match start_as {
            StartAs::PersistedRole => None,
            // The role persisted before the crash; a power loss cannot undo a persisted role
            // (a metadata update is a barrier), so this is the other one.
            StartAs::OtherRole => Some(flipped(role_before)),
        };
        let parts = Parts {
            name,
            queue_path,
            durable,
            bitmap,
            cfg,
            canaries,
            log,
        };
        let (node, recovery) = Self::start(parts, role, region)?;
        let last = node.exec.queue.last_seq();
        let applied = node.exec.queue.applied_through();
        if last < was_durable.last_seq || applied < was_durable.applied {
            return Err(format!(
                "node {name} queue lost durable state in a crash: last_seq {last} < {} or applied_through {applied} < {}",
                was_durable.last_seq, was_durable.applied
            ));
        }
        Ok((node, tear, recovery))
    }

    /// Executes the core's pending actions (through the shared executor) and returns what they
    /// ask of the simulation.
    ///
    /// With `crash`, the node dies in the middle: when there are actions, only a random strict
    /// prefix of them runs (possibly none), and `cut` says how many of how many; the node must
    /// then be crashed. With no actions nothing happens (the crash waits for a later batch).
    pub fn execute(&mut self, crash: Option<&mut fastrand::Rng>) -> Result<Executed, String> {
        let mut actions = Vec::new();
        self.exec.core.drain_actions(&mut actions);
        let mut cut = None;
        if let Some(rng) = crash {
            if !actions.is_empty() {
                let n = rng.usize(0..actions.len());
                cut = Some((n, actions.len()));
                actions.truncate(n);
            }
        }
        let mut effects = Vec::new();
        let mut io = Vec::new();
        // The term a promotion persists just before its new role.
        let mut last_term = None;
        for action in actions {
            let noted = Noted::of(&action);
            if let Noted::Append { seq, .. } = noted {
                if seq != self.log.len() as u64 + 1 {
                    return Err(format!(
                        "node {} appends seq {seq} after seq {}",
                        self.name,
                        self.log.len()
                    ));
                }
            }
            self.exec.hooks.apply_at_append =
                self.canaries.apply_before_ack && self.acting_role == WireRole::Primary;
            let name = self.name;
            self.exec
                .execute(action, &mut io)
                .map_err(|e| format!("node {name} storage: {e}"))?;
            for item in io.drain(..) {
                let effect = self.effect_of(item)?;
                effects.extend(effect);
            }
            match noted {
                Noted::Append { term, .. } => self.log.push(term),
                Noted::Truncate { after } => {
                    self.log.truncate(after as usize);
                    effects.push(Effect::Truncated { after });
                }
                Noted::Term(term) => {
                    last_term = Some(term);
                    effects.push(Effect::TermPersisted(term));
                }
                Noted::Role { role, superseded } => {
                    self.acting_role = role;
                    effects.push(Effect::RoleChanged {
                        role,
                        superseded,
                        new_term: last_term.take(),
                    });
                }
                Noted::Adopt { through } => {
                    // The seqs the resync covered are the primary's: the run copies its terms
                    // (the history the primary sent may have forgotten the oldest) once the
                    // batch is done; the records that follow in this batch append after them.
                    self.log.resize(through as usize, 0);
                    effects.push(Effect::Adopted { through });
                }
                Noted::Other => {}
            }
        }
        if cut.is_none() {
            // A node that dies in the middle leaves its run of appends unwritten and its
            // gathered applies unapplied (their completions unseen), as a crash there would.
            let name = self.name;
            self.exec
                .end_of_actions(&mut io)
                .map_err(|e| format!("node {name} storage: {e}"))?;
            for item in io.drain(..) {
                let effect = self.effect_of(item)?;
                effects.extend(effect);
            }
        }
        Ok(Executed { effects, cut })
    }

    /// The effects of one item of I/O (a reject is a send and a close).
    fn effect_of(&mut self, item: Io) -> Result<Vec<Effect>, String> {
        let durable = self.exec.durable();
        let name = self.name;
        let effect = match item {
            Io::Send { to, msg } => Effect::Send {
                to,
                msg,
                durable: (durable.last_seq, durable.applied),
                role: self.acting_role,
            },
            Io::SendQueued {
                to,
                from_seq,
                through_seq,
            } => {
                let writes = self
                    .exec
                    .queued_writes(from_seq, through_seq)
                    .map_err(|lacks| {
                        format!(
                            "node {name} asked to send {from_seq}..={through_seq} but its queue lacks {lacks}"
                        )
                    })?;
                Effect::SendQueued {
                    to,
                    from_seq,
                    through_seq,
                    writes,
                }
            }
            Io::SendChunk {
                to,
                range,
                overlay_from,
                overlay_through,
            } => Effect::Send {
                to,
                msg: self
                    .exec
                    .chunk_message(range, overlay_from, overlay_through)
                    .map_err(|e| format!("node {name} reading chunk {range:?}: {e}"))?,
                durable: (durable.last_seq, durable.applied),
                role: self.acting_role,
            },
            Io::Complete(ticket) => Effect::Complete(ticket),
            Io::Disconnect { peer, fault } => Effect::Close {
                to: peer,
                fault: Some(fault),
            },
            Io::Reject { peer, code, reason } => {
                return Ok(vec![
                    Effect::Send {
                        to: peer,
                        msg: Message::Reject { code, reason },
                        durable: (durable.last_seq, durable.applied),
                        role: self.acting_role,
                    },
                    Effect::Close {
                        to: peer,
                        fault: None,
                    },
                ]);
            }
            Io::Fatal(e) => Effect::Fatal(e),
            Io::Discard {
                after,
                through,
                records,
                ..
            } => Effect::Discard {
                after,
                through,
                records: records.iter().map(|r| (r.seq, r.term)).collect(),
            },
            Io::Applied { seq, term } => Effect::Apply {
                seq,
                term,
                as_primary: self.acting_role == WireRole::Primary,
            },
            Io::RefuseWrites(why) => Effect::RefuseWrites(why),
            Io::TransferFinished(report) => {
                let resync = !matches!(
                    report.purpose,
                    mirror_proto::core::TransferPurpose::Verify { .. }
                );
                if !resync || report.abandoned.is_some() {
                    return Ok(Vec::new());
                }
                Effect::Resynced {
                    bytes: report.bytes_sent,
                }
            }
            // Told to the checkers through the log (a fold drops no seq from it).
            Io::Folded { .. } => return Ok(Vec::new()),
        };
        Ok(vec![effect])
    }

    /// The checkpoint of `power`/`pmem` (the shared executor's): the region becomes durable,
    /// then `applied_through` is recorded with a queue barrier, then the core may report and
    /// trim. `die_after` stops it part way, for a crash: after the region sync (0) or after the
    /// queue's barrier, before the core hears of it (1). Returns whether it completed.
    pub fn checkpoint(&mut self, now_us: u64, die_after: Option<u8>) -> Result<bool, String> {
        self.exec.hooks.die_after_stages = die_after;
        let done = self.exec.checkpoint(now_us).map_err(storage);
        self.exec.hooks.die_after_stages = None;
        done
    }

    pub fn policy(&self) -> PeerLossPolicy {
        self.cfg.on_peer_loss
    }

    /// The term of the record the node holds at `seq`, if it holds one.
    pub fn term_at(&self, seq: u64) -> Option<u64> {
        seq.checked_sub(1)
            .and_then(|i| self.log.get(i as usize))
            .copied()
    }
}

/// The region as it will be once the node replayed its own queue (the core applies the
/// unapplied records at once on a backup, after the handshake on a primary).
fn rebuilt(written: &[u8], replay: &mirror_storage::ReplayState) -> Vec<u8> {
    let mut region = written.to_vec();
    for r in &replay.unapplied {
        let at = r.offset as usize;
        region[at..at + r.payload.len()].copy_from_slice(&r.payload);
    }
    region
}

/// What a node keeps across a restart besides its region.
struct Parts {
    name: NodeName,
    queue_path: PathBuf,
    durable: DurableImage,
    bitmap: SimBitmap,
    cfg: CoreConfig,
    canaries: Canaries,
    log: Vec<u64>,
}
