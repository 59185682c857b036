//! One simulated node: the real core and the real queue (on a file), a region in memory with
//! its durable copy, and an executor of the core's actions that follows the real node's rules
//! (`src/node.rs`): deferred commits checkpointed (region first, then `applied_through` with a
//! queue barrier), then reported to the core.

use std::path::{Path, PathBuf};

use mirror_exec::{CheckpointStage, Executor, Hooks, Io, RegionStore};
use mirror_proto::{CoreConfig, Message, PeerId, PeerLossPolicy};
use mirror_storage::{Durability, PersistentQueue, QueueParams, StorageError};

use crate::media::{power_loss_image, DurableImage, Tear};
use crate::{MAX_WRITE, QUEUE_BYTES, REGION_BYTES};

/// Which node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Primary,
    Backup,
}

/// What executing the core's actions asks of the rest of the simulation.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send this message to the peer. `durable` is the node's (last_seq, applied_through)
    /// made durable when the core's action was executed (not after the rest of the batch).
    Send {
        to: PeerId,
        msg: Message,
        durable: (u64, u64),
    },
    /// A catch-up from the queue: these `Write` messages, for seqs `from_seq..=through_seq`.
    SendQueued {
        to: PeerId,
        from_seq: u64,
        through_seq: u64,
        writes: Vec<Message>,
    },
    /// Drop the connection (after sending what was queued before).
    Close(PeerId),
    /// Every client ticket up to this one is complete.
    Complete(u64),
    /// About to write record `seq` into the region.
    Apply(u64),
    /// The backup saved and will drop these records (seq, term): its divergent suffix.
    Discard(Vec<(u64, u64)>),
    /// The core stopped the node.
    Fatal(String),
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
}

/// What one execution of the core's actions did.
pub(crate) struct Executed {
    /// What the executed actions ask of the simulation.
    pub effects: Vec<Effect>,
    /// For a crash in the middle: (actions executed, actions there were).
    pub cut: Option<(usize, usize)>,
}

pub(crate) struct SimNode {
    pub role: Role,
    /// The core, the queue and the region, executed by the same rules as the real node
    /// (`mirror-exec`).
    pub exec: Executor<SimRegion, SimHooks>,
    queue_path: PathBuf,
    durable: DurableImage,
    cfg: CoreConfig,
    canaries: Canaries,
}

/// The simulated region: what is written, and what a power loss would keep.
pub(crate) struct SimRegion {
    pub written: Vec<u8>,
    durable: Vec<u8>,
}

impl RegionStore for SimRegion {
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
}

/// The simulation's hooks: the first canary, and a crash inside a checkpoint.
pub(crate) struct SimHooks {
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
    /// The primary applies each write at submission, before the backup's ack.
    pub apply_before_ack: bool,
    /// The nodes match logs by seq alone (a backup acks a duplicate seq of another term).
    pub seq_only_matching: bool,
}

fn storage(e: StorageError) -> String {
    format!("storage: {e}")
}

fn io(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

impl SimNode {
    pub fn create(
        dir: &Path,
        role: Role,
        node_id: u64,
        policy: PeerLossPolicy,
        canaries: Canaries,
    ) -> Result<SimNode, String> {
        let queue_path = dir.join(match role {
            Role::Primary => "primary.queue",
            Role::Backup => "backup.queue",
        });
        let params = QueueParams {
            node_id,
            role: match role {
                Role::Primary => mirror_storage::Role::Primary,
                Role::Backup => mirror_storage::Role::Backup,
            },
            region_size: REGION_BYTES,
            capacity_bytes: QUEUE_BYTES,
        };
        let queue =
            PersistentQueue::create(&queue_path, &params, Durability::Process).map_err(storage)?;
        drop(queue);
        // Creation synced the whole file.
        let durable = DurableImage::of_file(&queue_path).map_err(|e| io("reading queue", e))?;
        let cfg = CoreConfig {
            node_id,
            region_size: REGION_BYTES,
            queue_format_version: mirror_storage::FORMAT_VERSION,
            on_peer_loss: policy,
            on_fenced: mirror_proto::FencedPolicy::Demote,
            after_split_brain: mirror_proto::SplitBrainPolicy::Disconnect,
            ack_timeout_us: 2_000,
            handshake_timeout_us: 4_000,
            // The simulated crash is a power loss: the `power`/`pmem` configuration.
            sync_queue_before_ack: true,
            max_write_len: MAX_WRITE,
            queue_capacity: QUEUE_BYTES,
            deferred_commit: true,
        };
        let region = vec![0; REGION_BYTES as usize];
        Self::start(
            role,
            queue_path,
            durable,
            cfg,
            (region.clone(), region),
            canaries,
        )
        .map(|(node, _)| node)
    }

    /// Opens the queue (recovery) and builds the executor and its core from what it recovered.
    /// `durable` is the queue file's durable image so far: the hook is installed before
    /// recovery's own barrier, which makes every record recovery scanned durable. `region` is
    /// (written, durable).
    fn start(
        role: Role,
        queue_path: PathBuf,
        durable: DurableImage,
        cfg: CoreConfig,
        (written, region_durable): (Vec<u8>, Vec<u8>),
        canaries: Canaries,
    ) -> Result<(SimNode, Recovery), String> {
        let hook = durable
            .hook(&queue_path)
            .map_err(|e| io("opening queue", e))?;
        let (mut queue, _) =
            PersistentQueue::open_with_crash_hook(&queue_path, Durability::Process, hook)
                .map_err(storage)?;
        let replay = queue.replay_state().map_err(storage)?;
        // What the node will hold once it replayed its own queue (the core applies the
        // unapplied records at once on a backup, after the handshake on a primary).
        let mut rebuilt = written.clone();
        for r in &replay.unapplied {
            let at = r.offset as usize;
            rebuilt[at..at + r.payload.len()].copy_from_slice(&r.payload);
        }
        let recovery = Recovery {
            last_seq: replay.last_seq,
            rebuilt,
            terms: replay.term_history.clone(),
        };
        let hooks = SimHooks {
            apply_at_append: canaries.apply_before_ack && role == Role::Primary,
            die_after_stages: None,
        };
        let region = SimRegion {
            written,
            durable: region_durable,
        };
        let exec_role = match role {
            Role::Primary => mirror_exec::Role::Primary,
            Role::Backup => mirror_exec::Role::Backup,
        };
        let mut exec = Executor::with_replay(exec_role, cfg.clone(), queue, replay, region, hooks);
        if canaries.seq_only_matching {
            exec.core.break_log_matching_for_canary();
        }
        let node = SimNode {
            role,
            exec,
            queue_path,
            durable,
            cfg,
            canaries,
        };
        Ok((node, recovery))
    }

    /// The region as written.
    pub fn region(&self) -> &[u8] {
        &self.exec.region.written
    }

    /// Crashes the node and starts it again from its files. A power loss keeps only durable
    /// bytes (tearing the rest word by word); a process crash keeps everything written, but
    /// what was not durable stays so (in the page cache) until a later barrier: a power loss
    /// after a process crash may still lose it.
    /// Checks that recovery kept what was made durable.
    pub fn crash_and_restart(
        self,
        power_loss: bool,
        rng: &mut fastrand::Rng,
    ) -> Result<(SimNode, Tear, Recovery), String> {
        let SimNode {
            role,
            exec,
            queue_path,
            durable,
            cfg,
            canaries,
        } = self;
        let was_durable = exec.durable();
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
        let (node, recovery) = Self::start(role, queue_path, durable, cfg, region, canaries)?;
        let last = node.exec.queue.last_seq();
        let applied = node.exec.queue.applied_through();
        if last < was_durable.last_seq || applied < was_durable.applied {
            return Err(format!(
                "{role:?} queue lost durable state in a crash: last_seq {last} < {} or applied_through {applied} < {}",
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
        let role = self.role;
        let mut effects = Vec::new();
        let mut io = Vec::new();
        for action in actions {
            self.exec
                .execute(action, &mut io)
                .map_err(|e| format!("{role:?} storage: {e}"))?;
            for item in io.drain(..) {
                let durable = self.exec.durable();
                let effect = match item {
                    Io::Send { to, msg } => Effect::Send {
                        to,
                        msg,
                        durable: (durable.last_seq, durable.applied),
                    },
                    Io::SendQueued {
                        to,
                        from_seq,
                        through_seq,
                    } => {
                        let writes = self.exec.queued_writes(from_seq, through_seq).map_err(|lacks| {
                            format!(
                                "{role:?} asked to send {from_seq}..={through_seq} but its queue lacks {lacks}"
                            )
                        })?;
                        Effect::SendQueued {
                            to,
                            from_seq,
                            through_seq,
                            writes,
                        }
                    }
                    Io::Complete(ticket) => Effect::Complete(ticket),
                    Io::Disconnect { peer, .. } => Effect::Close(peer),
                    Io::Reject { peer, code, reason } => {
                        effects.push(Effect::Send {
                            to: peer,
                            msg: Message::Reject { code, reason },
                            durable: (durable.last_seq, durable.applied),
                        });
                        Effect::Close(peer)
                    }
                    Io::Fatal(e) => Effect::Fatal(e.to_string()),
                    Io::Discard { records, .. } => {
                        Effect::Discard(records.iter().map(|r| (r.seq, r.term)).collect())
                    }
                    Io::Applied(seq) => Effect::Apply(seq),
                    // The simulated cluster keeps its roles (no promotion yet): nothing may
                    // fence its primary.
                    Io::RefuseWrites(why) => {
                        return Err(format!(
                            "{role:?} refused writes ({why:?}) with no promotion"
                        ))
                    }
                };
                effects.push(effect);
            }
        }
        Ok(Executed { effects, cut })
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
}
