//! An in-memory driver of the core, shared by the protocol tests and the fuzz target
//! (`fuzz/fuzz_targets/protocol_ops.rs`): it executes the actions (queue, region, header as
//! plain collections) with the assertions a real driver's storage would make (appends in order,
//! trims never past the node's own apply, completions in order, terms never going back).
//! Compiled for tests, and for others with the `testing` feature.
//!
//! Its nodes talk over one connection at a time, always named [`PEER`].

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::core::*;
use crate::handshake::{merged_ranges, repair_pieces, repair_requests};
use crate::term::TermHistory;
use crate::wire::Message;

/// The one peer connection of the in-memory driver.
pub const PEER: PeerId = PeerId(1);

/// Which role a [`Node`] plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A primary.
    Primary,
    /// A backup.
    Backup,
}

/// What survives a crash of a node: its queue file and its region file.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    /// Queue records by seq.
    pub queue: BTreeMap<u64, Record>,
    /// The queue's next seq.
    pub next_seq: u64,
    /// The header's applied_through.
    pub applied_through: u64,
    /// The bound peer.
    pub peer_node_id: u64,
    /// The region bytes.
    pub region: Vec<u8>,
    /// The persisted current term.
    pub current_term: u64,
    /// The persisted term history.
    pub history: TermHistory,
    /// The persisted superseded mark (fenced as a primary, not promoted since).
    pub superseded: bool,
    /// The persisted start of the writes completed without the peer (0: none).
    pub alone_from: u64,
    /// The dirty-chunk bitmap.
    pub dirty: crate::ChunkSet,
    /// The bitmap's `resync_from`.
    pub resync_from: u64,
    /// The bitmap's resync-target mark.
    pub resync_target: Option<u64>,
}

impl Durable {
    /// A new node's files: an empty queue and a zeroed region of `region_size` bytes.
    pub fn fresh(region_size: u64) -> Durable {
        Durable {
            next_seq: 1,
            region: vec![0; region_size as usize],
            ..Durable::default()
        }
    }

    /// A power loss of the queue's unsynced tail: only the records through `keeps_through`
    /// survive (as queue recovery would leave them).
    pub fn lose_tail_after(&mut self, keeps_through: u64) {
        self.queue.retain(|&s, _| s <= keeps_through);
        self.next_seq = keeps_through + 1;
        self.history.truncate_after(keeps_through);
        self.applied_through = self.applied_through.min(keeps_through);
    }
}

/// A core with its files as plain collections; [`Node::run`] executes its actions.
pub struct Node {
    /// The role.
    pub role: Role,
    /// The core's configuration.
    pub cfg: CoreConfig,
    /// The core.
    pub core: Replica,
    /// Its files.
    pub disk: Durable,
    /// Messages it sent, not yet delivered.
    pub outbox: Vec<Message>,
    /// Highest completed ticket.
    pub completed: u64,
    /// The next ticket [`Node::write`] uses.
    pub next_ticket: u64,
    /// Payload bytes the last recovery moved.
    pub recovery_bytes: u64,
    /// The core's fatal error, if it stopped.
    pub fatal: Option<FatalError>,
    /// Set when the core asked to drop the connection.
    pub hung_up: bool,
    /// Seqs applied since the node started, in order.
    pub applied_log: Vec<u64>,
    /// The last seq a `SyncQueue` made durable (everything on `disk` at a start). Under
    /// `sync_queue_before_ack` nothing past it may be applied: a power loss could take the
    /// record and leave its words in the region.
    pub synced_through: u64,
    /// Records this node dropped as a divergent suffix (saved before they went).
    pub discarded: Vec<Record>,
    /// Why the core stopped taking writes, each time it did.
    pub refused: Vec<WritesRefused>,
    /// The resyncs and verifies that ended.
    pub transfers: Vec<VerifyReport>,
}

/// What a node recovers from `disk`.
pub fn recovered(disk: &Durable) -> Recovered {
    Recovered {
        peer_node_id: disk.peer_node_id,
        applied_through: disk.applied_through,
        first_seq: disk.queue.keys().next().copied(),
        last_seq: disk.next_seq - 1,
        unapplied: disk
            .queue
            .range(disk.applied_through + 1..)
            .map(|(_, r)| r.clone())
            .collect(),
        current_term: disk.current_term,
        term_history: disk.history.clone(),
        alone_from: disk.alone_from,
        repair_unfinished_after: None,
        dirty: disk.dirty.clone(),
        resync_from: disk.resync_from,
        resync_target: disk.resync_target,
        region_blank: false,
    }
}

impl Node {
    /// A new node with fresh files.
    pub fn new(role: Role, cfg: CoreConfig) -> Node {
        let disk = Durable::fresh(cfg.region_size);
        Node::start_from(role, cfg, disk, true)
    }

    /// A node that starts from `disk` (and executes its first actions).
    pub fn start(role: Role, cfg: CoreConfig, disk: Durable) -> Node {
        Node::start_from(role, cfg, disk, false)
    }

    /// [`Node::start`]; `blank`: the region was just created (all zeros).
    fn start_from(role: Role, cfg: CoreConfig, disk: Durable, blank: bool) -> Node {
        let rec = Recovered {
            region_blank: blank,
            ..recovered(&disk)
        };
        let core = match role {
            Role::Primary => Replica::primary(cfg.clone(), rec),
            Role::Backup => Replica::backup(cfg.clone(), rec),
        };
        let mut n = Node {
            role,
            cfg,
            core,
            synced_through: disk.next_seq - 1,
            disk,
            outbox: Vec::new(),
            completed: 0,
            next_ticket: 1,
            recovery_bytes: 0,
            fatal: None,
            hung_up: false,
            applied_log: Vec::new(),
            discarded: Vec::new(),
            refused: Vec::new(),
            transfers: Vec::new(),
        };
        n.run();
        n
    }

    /// A crash: everything volatile is lost; queue and region survive (durability `process`).
    pub fn crash_and_restart(&mut self) {
        let disk = self.disk.clone();
        *self = Node::start(self.role, self.cfg.clone(), disk);
    }

    /// The region's bytes of `range` with the queue's records `from..=through` laid over them.
    fn chunk_image(&self, range: crate::wire::ChunkRange, from: u64, through: u64) -> Vec<u8> {
        let (start, end) = (range.offset, range.offset + u64::from(range.len));
        let mut image = self.disk.region[start as usize..end as usize].to_vec();
        for r in self
            .disk
            .queue
            .range(from..=through.max(from))
            .map(|(_, r)| r)
        {
            if r.seq > through {
                break;
            }
            let (ws, we) = (r.offset, r.offset + r.data.len() as u64);
            let (s, e) = (ws.max(start), we.min(end));
            if s < e {
                image[(s - start) as usize..(e - start) as usize]
                    .copy_from_slice(&r.data[(s - ws) as usize..(e - ws) as usize]);
            }
        }
        image
    }

    /// A fresh node's bitmap has the region's chunk count.
    fn size_bitmap(&mut self) {
        let chunks = self.core.geometry().chunk_count();
        if self.disk.dirty.capacity() != chunks {
            self.disk.dirty = crate::ChunkSet::new(chunks);
        }
    }

    /// Executes the core's pending actions, in order (and those that executing them gave
    /// rise to: a chunk of zeros elided moves the transfer on).
    pub fn run(&mut self) {
        let mut actions = Vec::new();
        loop {
            self.core.drain_actions(&mut actions);
            if actions.is_empty() {
                return;
            }
            self.run_actions(std::mem::take(&mut actions));
        }
    }

    /// Executes `actions` (drained from the core), in order: a test that crashes the node
    /// part way through a batch executes the part that reached the disk.
    pub fn run_actions(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { msg, .. } => self.outbox.push(msg),
                Action::SendQueued {
                    from_seq,
                    through_seq,
                    ..
                } => {
                    for seq in from_seq..=through_seq {
                        let r = self.disk.queue.get(&seq).unwrap_or_else(|| {
                            panic!("{:?} asked to send {seq} which it does not hold", self.role)
                        });
                        self.recovery_bytes += r.data.len() as u64;
                        self.outbox.push(Message::Write {
                            seq,
                            term: r.term,
                            offset: r.offset,
                            data: r.data.clone(),
                        });
                    }
                }
                Action::Append { record, recovery } => {
                    assert_eq!(record.seq, self.disk.next_seq, "append out of order");
                    if recovery {
                        self.recovery_bytes += record.data.len() as u64;
                    }
                    self.disk
                        .history
                        .note_append(record.seq, record.term)
                        .expect("term order");
                    self.disk.next_seq += 1;
                    self.disk.queue.insert(record.seq, record);
                }
                Action::PersistTerm { term } => {
                    assert!(term >= self.disk.current_term, "term goes back");
                    self.disk.current_term = term;
                }
                Action::RequestRepair { after, through, .. } => {
                    let suffix: Vec<Record> = self
                        .disk
                        .queue
                        .range(after + 1..=through)
                        .map(|(_, r)| r.clone())
                        .collect();
                    assert_eq!(suffix.len() as u64, through - after, "suffix not held");
                    let ranges =
                        merged_ranges(suffix.iter().map(|r| (r.offset, r.data.len() as u64)));
                    self.outbox.extend(repair_requests(&ranges));
                    self.discarded.extend(suffix);
                }
                Action::SendRegion { ranges, .. } => {
                    for (offset, len) in repair_pieces(&ranges) {
                        let o = offset as usize;
                        self.recovery_bytes += len;
                        self.outbox.push(Message::RepairData {
                            offset,
                            data: Bytes::copy_from_slice(&self.disk.region[o..o + len as usize]),
                        });
                    }
                }
                Action::RepairRegion { offset, data } => {
                    let o = offset as usize;
                    self.disk.region[o..o + data.len()].copy_from_slice(&data);
                }
                Action::TruncateAfter { after } => {
                    assert!(
                        self.disk.alone_from <= after,
                        "writes completed alone dropped without clearing their mark"
                    );
                    self.disk.queue.retain(|&s, _| s <= after);
                    self.disk.next_seq = after + 1;
                    self.disk.history.truncate_after(after);
                    self.disk.applied_through = self.disk.applied_through.min(after);
                    self.synced_through = self.synced_through.min(after);
                }
                Action::SyncQueue => self.synced_through = self.disk.next_seq - 1,
                Action::Apply(r) => {
                    assert!(
                        !self.cfg.sync_queue_before_ack || r.seq <= self.synced_through,
                        "seq {} applied before a sync made its record durable (synced through {})",
                        r.seq,
                        self.synced_through
                    );
                    let o = r.offset as usize;
                    self.disk.region[o..o + r.data.len()].copy_from_slice(&r.data);
                    self.applied_log.push(r.seq);
                }
                Action::ApplyCaughtUp(r) => {
                    // Never queued: the AdoptLog that follows (after a SyncRegion) records it.
                    assert!(
                        r.seq > self.disk.applied_through,
                        "seq {} applied without a queue copy below the apply point {}",
                        r.seq,
                        self.disk.applied_through
                    );
                    self.recovery_bytes += r.data.len() as u64;
                    let o = r.offset as usize;
                    self.disk.region[o..o + r.data.len()].copy_from_slice(&r.data);
                    self.applied_log.push(r.seq);
                }
                Action::CommitApplied { through } => {
                    assert!(through >= self.disk.applied_through);
                    self.disk.applied_through = through;
                }
                Action::Trim { through } => {
                    assert!(through <= self.disk.applied_through, "trim past own apply");
                    self.disk.queue.retain(|&s, _| s > through);
                }
                Action::BindPeer { node_id } => self.disk.peer_node_id = node_id,
                Action::Complete { ticket } => {
                    assert!(ticket > self.completed, "completion out of order");
                    self.completed = ticket;
                }
                Action::Disconnect { .. } => self.hung_up = true,
                Action::Reject { code, reason, .. } => {
                    self.outbox.push(Message::Reject { code, reason });
                    self.hung_up = true;
                }
                Action::RecoveryStarted => self.recovery_bytes = 0,
                Action::Fatal(e) => self.fatal = Some(e),
                Action::RefuseWrites { reason } => self.refused.push(reason),
                Action::PersistAloneFrom { seq } => self.disk.alone_from = seq,
                Action::PersistRole { role, superseded } => {
                    self.role = match role {
                        crate::wire::WireRole::Primary => Role::Primary,
                        crate::wire::WireRole::Backup => Role::Backup,
                    };
                    self.disk.superseded = superseded;
                }
                Action::Fold { through } => {
                    assert!(through < self.disk.next_seq, "fold past the log");
                    let geometry = self.core.geometry();
                    let mut chunks = Vec::new();
                    let first = self.disk.queue.keys().next().copied();
                    for (_, r) in self.disk.queue.range(..=through) {
                        chunks.push(geometry.chunks_of(r.offset, r.data.len() as u64));
                    }
                    self.size_bitmap();
                    for c in &chunks {
                        self.disk.dirty.insert_range(c.clone());
                    }
                    if self.disk.resync_from == 0 {
                        self.disk.resync_from = first.unwrap_or(through + 1);
                    }
                    self.disk.applied_through = self.disk.applied_through.max(through);
                    self.disk.queue.retain(|&s, _| s > through);
                    self.core.on_folded(&chunks);
                }
                Action::MarkAllDirty { resync_from } => {
                    let n = self.core.geometry().chunk_count();
                    self.disk.dirty = crate::ChunkSet::full(n);
                    self.disk.resync_from = resync_from;
                }
                Action::ClearDirty { chunk } => {
                    self.disk.dirty.remove(chunk);
                }
                Action::ResetDirty => {
                    self.disk.dirty.clear();
                    self.disk.resync_from = 0;
                }
                Action::SendDigest {
                    range,
                    overlay_from,
                    overlay_through,
                    ..
                } => {
                    let image = self.chunk_image(range, overlay_from, overlay_through);
                    self.outbox.push(Message::ChunkDigest {
                        range,
                        digest: crate::chunk_digest(&image),
                    });
                }
                Action::SendChunk {
                    to,
                    range,
                    overlay_from,
                    overlay_through,
                    elide_zero,
                } => {
                    let image = self.chunk_image(range, overlay_from, overlay_through);
                    let parts = if elide_zero && overlay_from > overlay_through {
                        crate::zero_runs(range.offset, &image, self.core.geometry().chunk_size())
                    } else {
                        vec![(range, false)]
                    };
                    for (part, zero) in parts {
                        if zero {
                            self.core.on_chunk_elided(to, part);
                            continue;
                        }
                        let at = (part.offset - range.offset) as usize;
                        self.recovery_bytes += u64::from(part.len);
                        self.outbox.push(Message::ChunkData {
                            offset: part.offset,
                            data: Bytes::copy_from_slice(&image[at..at + part.len as usize]),
                        });
                    }
                }
                Action::CompareChunk { range, digest, .. } => {
                    let image = self.chunk_image(range, 1, 0);
                    self.outbox.push(Message::ChunkVerdict {
                        range,
                        same: crate::chunk_digest(&image) == digest,
                    });
                }
                Action::InstallChunk { offset, data } => {
                    let o = offset as usize;
                    self.disk.region[o..o + data.len()].copy_from_slice(&data);
                }
                Action::SyncRegion => {}
                Action::ClearResyncTarget => self.disk.resync_target = None,
                Action::BeginResyncTarget { primary, .. } => {
                    self.disk.resync_target = Some(primary);
                }
                Action::AdoptLog { through, history } => {
                    assert!(through + 1 >= self.disk.next_seq, "adopting backwards");
                    self.disk.queue.clear();
                    self.disk.next_seq = through + 1;
                    self.disk.history = history;
                    self.disk.applied_through = through;
                }
                Action::TransferFinished(report) => self.transfers.push(report),
            }
        }
    }

    /// Submits `len` bytes of `byte` at `offset` and ends the batch; returns the ticket.
    pub fn write(&mut self, offset: u64, byte: u8, len: usize) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.core
            .submit(t, offset, Bytes::from(vec![byte; len]).into())
            .expect("submit");
        self.core.end_batch();
        self.run();
        t
    }

    /// Time passes to `now_us`; an idle pass.
    pub fn tick(&mut self, now_us: u64) {
        self.core.set_now(now_us);
        self.core.on_tick();
        self.core.end_batch();
        self.run();
    }
}
