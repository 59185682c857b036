//! One simulated node: the real core and the real queue (on a file), a region in memory with
//! its durable copy, and an executor of the core's actions that follows the real node's rules
//! (`src/node.rs`): deferred commits checkpointed (region first, then `applied_through` with a
//! queue barrier), then reported to the core.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use mirror_proto::handshake::{merged_ranges, repair_pieces, repair_requests};
use mirror_proto::{Action, Backup, Core, CoreConfig, Message, PeerLossPolicy, Primary, Record};
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
    Send { msg: Message, durable: (u64, u64) },
    /// A catch-up from the queue: these `Write` messages, for seqs `from_seq..=through_seq`.
    SendQueued {
        from_seq: u64,
        through_seq: u64,
        writes: Vec<Message>,
    },
    /// Drop the connection (after sending what was queued before).
    Close,
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
    pub core: Core,
    pub queue: PersistentQueue,
    queue_path: PathBuf,
    durable: DurableImage,
    pub region: Vec<u8>,
    region_durable: Vec<u8>,
    pub commit_pending: Option<u64>,
    pub last_checkpoint_us: u64,
    /// Highest seq the queue made durable so far, by the queue's contract: a completed
    /// `sync`, a checkpoint's `set_applied_through`, or recovery. A power loss must keep it
    /// (checker 5 holds the queue to that contract on the rebuilt image).
    pub durable_last_seq: u64,
    /// Highest `applied_through` checkpointed.
    pub durable_applied: u64,
    cfg: CoreConfig,
    canaries: Canaries,
}

/// The simulator's canaries: deliberately broken nodes its checkers must catch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Canaries {
    /// The primary applies each write at submission, before the backup's ack.
    pub apply_before_ack: bool,
    /// The backup matches logs by seq alone (acks a duplicate seq of another term).
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

    /// Opens the queue (recovery) and builds the core from what it recovered. `durable` is the
    /// queue file's durable image so far: the hook is installed before recovery's own barrier,
    /// which makes every record recovery scanned durable. `region` is (written, durable).
    fn start(
        role: Role,
        queue_path: PathBuf,
        durable: DurableImage,
        cfg: CoreConfig,
        (region, region_durable): (Vec<u8>, Vec<u8>),
        canaries: Canaries,
    ) -> Result<(SimNode, Recovery), String> {
        let hook = durable
            .hook(&queue_path)
            .map_err(|e| io("opening queue", e))?;
        let (mut queue, _) =
            PersistentQueue::open_with_crash_hook(&queue_path, Durability::Process, hook)
                .map_err(storage)?;
        let replay = queue.replay_state().map_err(storage)?;
        // Durable: recovery's barrier covered every record it kept, and `applied_through` was
        // read from a durable meta slot (or lowered by a renumbering, which is a barrier too).
        let durable_applied = replay.applied_through;
        let durable_last_seq = replay.last_seq;
        // What the node will hold once it replayed its own queue (the core applies the
        // unapplied records at once on a backup, after the handshake on a primary).
        let mut rebuilt = region.clone();
        for r in &replay.unapplied {
            let at = r.offset as usize;
            rebuilt[at..at + r.payload.len()].copy_from_slice(&r.payload);
        }
        let recovery = Recovery {
            last_seq: replay.last_seq,
            rebuilt,
            terms: replay.term_history.clone(),
        };
        let rec = mirror_proto::Recovered::from(replay);
        let core = match role {
            Role::Primary => {
                let mut primary = Primary::new(cfg.clone(), rec);
                if canaries.seq_only_matching {
                    primary.break_log_matching_for_canary();
                }
                Core::Primary(primary)
            }
            Role::Backup => {
                let mut backup = Backup::new(cfg.clone(), rec);
                if canaries.seq_only_matching {
                    backup.break_log_matching_for_canary();
                }
                Core::Backup(backup)
            }
        };
        let node = SimNode {
            role,
            core,
            queue,
            queue_path,
            durable,
            region_durable,
            region,
            commit_pending: None,
            last_checkpoint_us: 0,
            durable_last_seq,
            durable_applied,
            cfg,
            canaries,
        };
        Ok((node, recovery))
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
            queue,
            queue_path,
            durable,
            region,
            region_durable,
            durable_last_seq,
            durable_applied,
            cfg,
            canaries,
            ..
        } = self;
        drop(queue);
        let mut tear = Tear::default();
        let (durable, region) = if power_loss {
            let p_written = rng.u32(0..=100);
            let written = std::fs::read(&queue_path).map_err(|e| io("reading queue", e))?;
            let (img, t) = power_loss_image(&written, &durable.snapshot(), p_written, rng);
            std::fs::write(&queue_path, img).map_err(|e| io("writing queue image", e))?;
            tear = t;
            let (img, t) = power_loss_image(&region, &region_durable, p_written, rng);
            tear.dirty_words += t.dirty_words;
            tear.written_words += t.written_words;
            // After the power loss, what is on the media is all there is: durable.
            let durable = DurableImage::of_file(&queue_path).map_err(|e| io("reading queue", e))?;
            (durable, (img.clone(), img))
        } else {
            (durable, (region, region_durable))
        };
        let (node, recovery) = Self::start(role, queue_path, durable, cfg, region, canaries)?;
        let last = node.queue.last_seq();
        let applied = node.queue.applied_through();
        if last < durable_last_seq || applied < durable_applied {
            return Err(format!(
                "{role:?} queue lost durable state in a crash: last_seq {last} < {durable_last_seq} or applied_through {applied} < {durable_applied}"
            ));
        }
        Ok((node, tear, recovery))
    }

    /// Executes the core's pending actions and returns what they ask of the simulation.
    ///
    /// With `crash`, the node dies in the middle: when there are actions, only a random strict
    /// prefix of them runs (possibly none), and `cut` says how many of how many; the node must
    /// then be crashed. With no actions nothing happens (the crash waits for a later batch).
    pub fn execute(&mut self, crash: Option<&mut fastrand::Rng>) -> Result<Executed, String> {
        let mut actions = Vec::new();
        self.core.drain_actions(&mut actions);
        let mut cut = None;
        if let Some(rng) = crash {
            if !actions.is_empty() {
                let n = rng.usize(0..actions.len());
                cut = Some((n, actions.len()));
                actions.truncate(n);
            }
        }
        let role = self.role;
        let storage = |e: StorageError| format!("{role:?} storage: {e}");
        let mut effects = Vec::new();
        for action in actions {
            match action {
                Action::Send(msg) => effects.push(Effect::Send {
                    msg,
                    durable: (self.durable_last_seq, self.durable_applied),
                }),
                Action::SendQueued {
                    from_seq,
                    through_seq,
                } => {
                    let mut writes = Vec::new();
                    for r in self.queue.iter_from(from_seq) {
                        let r = r.map_err(storage)?;
                        if r.seq > through_seq {
                            break;
                        }
                        writes.push(Message::Write {
                            seq: r.seq,
                            term: r.term,
                            offset: r.offset,
                            data: Bytes::copy_from_slice(r.payload),
                        });
                    }
                    if writes.len() as u64 != through_seq + 1 - from_seq {
                        return Err(format!(
                            "{:?} asked to send {from_seq}..={through_seq} but its queue holds {} of them",
                            self.role,
                            writes.len()
                        ));
                    }
                    effects.push(Effect::SendQueued {
                        from_seq,
                        through_seq,
                        writes,
                    });
                }
                Action::Append { record, recovery } => {
                    self.queue
                        .append(record.seq, record.term, record.offset, &record.data)
                        .map_err(storage)?;
                    if self.canaries.apply_before_ack && self.role == Role::Primary && !recovery {
                        // The canary: the delay buffer skipped, applied before the backup's ack.
                        effects.push(Effect::Apply(record.seq));
                        self.write_region(&record);
                    }
                }
                Action::SyncQueue => {
                    self.queue.sync().map_err(storage)?;
                    self.durable_last_seq = self.queue.last_seq();
                }
                Action::Apply(record) => {
                    effects.push(Effect::Apply(record.seq));
                    self.write_region(&record);
                }
                Action::CommitApplied { through } => self.commit_pending = Some(through),
                Action::Trim { through } => self.queue.trim_through(through).map_err(storage)?,
                Action::BindPeer { node_id } => {
                    self.queue.set_peer_node_id(node_id).map_err(storage)?
                }
                Action::Complete { ticket } => effects.push(Effect::Complete(ticket)),
                Action::Disconnect(_) => effects.push(Effect::Close),
                Action::Reject { code, reason } => {
                    effects.push(Effect::Send {
                        msg: Message::Reject { code, reason },
                        durable: (self.durable_last_seq, self.durable_applied),
                    });
                    effects.push(Effect::Close);
                }
                Action::RecoveryStarted => {}
                Action::PersistTerm { term } => {
                    self.queue.set_current_term(term).map_err(storage)?;
                    // A metadata update is a barrier: every earlier append is durable.
                    self.durable_last_seq = self.queue.last_seq();
                }
                Action::RequestRepair { after, through } => {
                    let mut suffix = Vec::new();
                    for r in self.queue.iter_from(after + 1) {
                        let r = r.map_err(storage)?;
                        if r.seq > through {
                            break;
                        }
                        suffix.push((r.seq, r.term, r.offset, r.payload.len() as u64));
                    }
                    if suffix.len() as u64 != through - after {
                        return Err(format!(
                            "{role:?} lacks its divergent suffix ({after}, {through}]"
                        ));
                    }
                    let ranges = merged_ranges(suffix.iter().map(|s| (s.2, s.3)));
                    effects.push(Effect::Discard(suffix.iter().map(|s| (s.0, s.1)).collect()));
                    for msg in repair_requests(&ranges) {
                        effects.push(Effect::Send {
                            msg,
                            durable: (self.durable_last_seq, self.durable_applied),
                        });
                    }
                }
                Action::SendRegion { ranges } => {
                    for (offset, len) in repair_pieces(&ranges) {
                        let at = offset as usize;
                        let data = Bytes::copy_from_slice(&self.region[at..at + len as usize]);
                        effects.push(Effect::Send {
                            msg: Message::RepairData { offset, data },
                            durable: (self.durable_last_seq, self.durable_applied),
                        });
                    }
                }
                Action::RepairRegion { offset, data } => {
                    let at = offset as usize;
                    self.region[at..at + data.len()].copy_from_slice(&data);
                }
                Action::TruncateAfter { after } => {
                    // The node syncs its region first (the repaired ranges), then truncates.
                    self.region_durable.copy_from_slice(&self.region);
                    self.queue.truncate_after(after).map_err(storage)?;
                    self.durable_last_seq = after;
                    self.durable_applied = self.durable_applied.min(after);
                }
                Action::Fatal(e) => effects.push(Effect::Fatal(e.to_string())),
            }
        }
        Ok(Executed { effects, cut })
    }

    fn write_region(&mut self, r: &Record) {
        let at = r.offset as usize;
        self.region[at..at + r.data.len()].copy_from_slice(&r.data);
    }

    /// The checkpoint of `power`/`pmem` (`Poller::checkpoint` in the real node): the region
    /// becomes durable, then `applied_through` is recorded with a queue barrier (which makes
    /// every earlier append durable too), then the core may report and trim.
    ///
    /// `die_after` stops it part way, for a crash: after the region sync (0) or after the
    /// queue's barrier, before the core hears of it (1). Returns whether it completed.
    pub fn checkpoint(&mut self, now_us: u64, die_after: Option<u8>) -> Result<bool, String> {
        if let Some(through) = self.commit_pending.take() {
            self.region_durable.copy_from_slice(&self.region);
            if die_after == Some(0) {
                return Ok(false);
            }
            self.queue.set_applied_through(through).map_err(storage)?;
            self.durable_applied = through;
            self.durable_last_seq = self.durable_last_seq.max(self.queue.last_seq());
            if die_after == Some(1) {
                return Ok(false);
            }
            self.core.on_applied_durable(through);
            self.last_checkpoint_us = now_us;
        }
        Ok(true)
    }

    pub fn policy(&self) -> PeerLossPolicy {
        self.cfg.on_peer_loss
    }
}
