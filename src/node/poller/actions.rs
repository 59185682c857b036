//! Executes the core's actions in order: the queue and region operations, the sends (a
//! catch-up streamed across passes, with what follows it queued behind), completions, and the
//! divergent-suffix repair.

use std::collections::VecDeque;

use bytes::Bytes;
use mirror_proto::handshake::{merged_ranges, repair_pieces, repair_requests};
use mirror_proto::{Action, Message, RegionRange};
use mirror_storage::{discarded_path, save_discarded, DiscardedRecord, Durability, StorageError};

use crate::error::Result;

use super::*;

impl Poller {
    pub(super) fn execute_actions(&mut self) -> Result<bool, Stop> {
        let mut actions = std::mem::take(&mut self.actions);
        self.core.drain_actions(&mut actions);
        let worked = !actions.is_empty();
        let mut broken: Option<String> = None;
        for action in actions.drain(..) {
            match action {
                Action::Send(msg) => self.send_in_order(msg, &mut broken),
                Action::SendQueued {
                    from_seq,
                    through_seq,
                } => self.send_queued(from_seq, through_seq, &mut broken)?,
                Action::Append { record, recovery } => {
                    match self
                        .queue
                        .append(record.seq, record.term, record.offset, &record.data)
                    {
                        Ok(()) => {}
                        Err(StorageError::Full { needed, free }) => {
                            return Err(Stop::Fatal(format!(
                                "queue {} is full ({needed} bytes needed, {free} free); a backup's queue_size must be at least its primary's",
                                self.cfg.queue.display()
                            )))
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if recovery {
                        self.recovery_bytes += record.data.len() as u64;
                        self.recovery_records += 1;
                    }
                }
                Action::SyncQueue => {
                    // Hand what this pass sends to the network first: a primary's own sync then
                    // overlaps the round trip to the backup instead of adding to it.
                    if let Some(c) = self.conn.as_mut() {
                        if let Err(e) = c.flush() {
                            broken.get_or_insert(e.to_string());
                        }
                    }
                    self.queue.sync()?
                }
                Action::PersistTerm { term } => self.queue.set_current_term(term)?,
                Action::RequestRepair { after, through } => {
                    self.save_divergent_suffix(after, through, &mut broken)?
                }
                Action::SendRegion { ranges } => self.send_region(&ranges, &mut broken)?,
                Action::RepairRegion { offset, data } => {
                    self.region.write(offset, &data)?;
                    self.recovery_bytes += data.len() as u64;
                }
                Action::TruncateAfter { after } => {
                    // The repaired ranges must be durable before the records that explain them
                    // leave the queue (a crash in between redoes the whole repair).
                    if self.cfg.durability != Durability::Process {
                        self.region.sync()?;
                    }
                    self.queue.truncate_after(after)?;
                    tracing::warn!(
                        common_seq = after,
                        "dropped this backup's divergent suffix; the primary's records follow"
                    );
                }
                Action::Apply(record) => {
                    // The test fail point (cargo feature `fail-points`, never in a release
                    // build): die between the backup's ack and our apply.
                    #[cfg(feature = "fail-points")]
                    if self.cfg.crash_before_apply_seq == Some(record.seq)
                        || self
                            .shared
                            .crash_armed
                            .load(std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            seq = record.seq,
                            "fail point: killing this process before applying"
                        );
                        // SAFETY: kill(2) on our own pid with a valid signal number.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    }
                    self.region.write(record.offset, &record.data)?;
                }
                Action::CommitApplied { through } => {
                    if self.cfg.durability == Durability::Process {
                        // The page cache keeps it across a process crash: durable as written.
                        self.queue.set_applied_through(through)?;
                    } else {
                        // Checkpointed soon (see `checkpoint`), not per batch.
                        self.commit_pending = Some(through);
                    }
                }
                Action::Trim { through } => self.queue.trim_through(through)?,
                Action::BindPeer { node_id } => {
                    tracing::info!(peer = format_args!("{node_id:#x}"), "bound to peer");
                    self.queue.set_peer_node_id(node_id)?;
                }
                Action::Complete { ticket } => self.shared.complete(ticket),
                Action::Disconnect(fault) => {
                    broken.get_or_insert(fault.to_string());
                }
                Action::Reject { code, reason } => {
                    if let Some(c) = self.conn.as_mut() {
                        let _ = c.send(&Message::Reject {
                            code,
                            reason: reason.clone(),
                        });
                        let _ = c.flush();
                    }
                    broken.get_or_insert(format!("rejected peer ({code:?}): {reason}"));
                }
                Action::RecoveryStarted => {
                    self.recovery_bytes = 0;
                    self.recovery_records = 0;
                }
                Action::Fatal(e) => return Err(Stop::Fatal(e.to_string())),
            }
        }
        self.actions = actions;
        if let Some(why) = broken {
            self.drop_connection(&why);
        }
        Ok(worked)
    }

    /// Saves the divergent suffix `(after, through]` durably beside the queue, then asks the
    /// primary for the current bytes of every range it wrote.
    fn save_divergent_suffix(
        &mut self,
        after: u64,
        through: u64,
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
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
            return Err(Stop::Fatal(format!(
                "queue {} lacks records of its divergent suffix ({after}, {through}]",
                self.cfg.queue.display()
            )));
        }
        let saved_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let file = discarded_path(&self.cfg.queue, after, saved_unix_ms);
        save_discarded(&file, self.queue.node_id(), after, saved_unix_ms, &records)?;
        let ranges = merged_ranges(
            records
                .iter()
                .map(|r| (r.region_offset, r.payload.len() as u64)),
        );
        let divergence = Divergence {
            common_seq: after,
            through_seq: through,
            records: records.len() as u64,
            bytes: records.iter().map(|r| r.payload.len() as u64).sum(),
            repaired_bytes: ranges.iter().map(|r| r.len).sum(),
            file,
        };
        tracing::warn!(
            common_seq = after,
            through_seq = through,
            records = divergence.records,
            bytes = divergence.bytes,
            file = %divergence.file.display(),
            "this backup's queue diverges from the primary's newer history after the common point: saved the divergent records; repairing their byte ranges from the primary"
        );
        self.last_divergence = Some(divergence);
        if let Some(c) = self.conn.as_mut() {
            for m in repair_requests(&ranges) {
                if let Err(e) = c.send(&m) {
                    broken.get_or_insert(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Sends the current bytes of `ranges` (a backup repairing a divergent suffix).
    fn send_region(
        &mut self,
        ranges: &[RegionRange],
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        for (offset, len) in repair_pieces(ranges) {
            let mut data = vec![0u8; len as usize];
            self.region.read(offset, &mut data)?;
            self.recovery_bytes += len;
            if let Err(e) = conn.send(&Message::RepairData {
                offset,
                data: Bytes::from(data),
            }) {
                broken.get_or_insert(e.to_string());
                return Ok(());
            }
        }
        Ok(())
    }

    /// Starts streaming the queue's records `from_seq..=through_seq` to the peer (a catch-up or
    /// a replay). The stream is resumable: it stops whenever the send buffer is over
    /// `SEND_BACKLOG_PAUSE` and goes on in later passes, so a slow peer never holds the poller
    /// (and a caller driving it); what the core sends meanwhile waits behind it, in order.
    fn send_queued(
        &mut self,
        from_seq: u64,
        through_seq: u64,
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        if self.conn.is_none() {
            return Ok(());
        }
        match self.catch_up.as_mut() {
            // The core streams one catch-up per connection; one that follows waits its turn.
            Some(c) => c.behind.push_back(Outgoing::Queued {
                from_seq,
                through_seq,
            }),
            None => {
                self.catch_up = Some(CatchUp {
                    next_seq: from_seq,
                    through_seq,
                    behind: VecDeque::new(),
                })
            }
        }
        self.continue_catch_up(broken).map(|_| ())
    }

    /// Sends `msg`, or queues it behind a catch-up in progress.
    fn send_in_order(&mut self, msg: Message, broken: &mut Option<String>) {
        if let Some(c) = self.catch_up.as_mut() {
            c.behind.push_back(Outgoing::Message(msg));
        } else if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.send(&msg) {
                broken.get_or_insert(e.to_string());
            }
        }
    }

    /// Hands more of the catch-up in progress to the network, then what waits behind it.
    /// Returns whether it sent anything.
    pub(super) fn continue_catch_up(&mut self, broken: &mut Option<String>) -> Result<bool, Stop> {
        let mut worked = false;
        while let Some(c) = self.catch_up.as_mut() {
            let Some(conn) = self.conn.as_mut() else {
                self.catch_up = None;
                break;
            };
            if c.next_seq <= c.through_seq {
                for rec in self.queue.iter_from(c.next_seq) {
                    let rec = rec?;
                    if rec.seq != c.next_seq || rec.seq > c.through_seq {
                        break;
                    }
                    // Stream: hand each chunk to the network as it is encoded (the peer works
                    // on it meanwhile), and stop while the peer lags (resumed next pass).
                    if conn.pending_send_bytes() > CATCH_UP_CHUNK {
                        if let Err(e) = conn.flush() {
                            broken.get_or_insert(e.to_string());
                            return Ok(worked);
                        }
                        if conn.pending_send_bytes() > SEND_BACKLOG_PAUSE {
                            return Ok(worked);
                        }
                    }
                    if let Err(e) = conn.send_write(rec.seq, rec.term, rec.offset, rec.payload) {
                        broken.get_or_insert(e.to_string());
                        return Ok(worked);
                    }
                    worked = true;
                    self.recovery_bytes += rec.payload.len() as u64;
                    self.recovery_records += 1;
                    c.next_seq += 1;
                }
                if c.next_seq <= c.through_seq {
                    return Err(Stop::Fatal(format!(
                        "queue {} lacks record {} needed to catch up the peer (through {})",
                        self.cfg.queue.display(),
                        c.next_seq,
                        c.through_seq
                    )));
                }
            }
            match c.behind.pop_front() {
                Some(Outgoing::Message(m)) => {
                    worked = true;
                    if let Err(e) = conn.send(&m) {
                        broken.get_or_insert(e.to_string());
                        return Ok(worked);
                    }
                }
                Some(Outgoing::Queued {
                    from_seq,
                    through_seq,
                }) => {
                    c.next_seq = from_seq;
                    c.through_seq = through_seq;
                }
                None => self.catch_up = None,
            }
        }
        Ok(worked)
    }
}
