//! Executes the core's actions in order: the shared executor (`mirror-exec`) does the queue
//! and region part, and this file the I/O it hands back: the sends (a catch-up streamed across
//! passes, with what follows it queued behind), completions, and saving a divergent suffix.

use std::collections::VecDeque;

use mirror_exec::{ExecError, Io};
use mirror_proto::wire::ChunkRange;
use mirror_proto::{Action, Message};
use mirror_storage::{discarded_path, save_discarded, DiscardedRecord, StorageError};

use crate::error::Result;
use crate::transport::BorrowedWrite;

use super::*;

/// Send-batch bytes beyond which a chunk's frame is handed to the network at once.
const CHUNK_FLUSH_BYTES: usize = 256 << 10;

impl Poller {
    /// Executes the core's pending actions, then ends what they left open (a run of appends,
    /// gathered applies: see `Executor::end_of_actions`).
    pub(super) fn execute_actions(&mut self) -> Result<bool, Stop> {
        let worked = self.execute_actions_in_run()?;
        self.end_of_actions()?;
        Ok(worked)
    }

    /// Ends what the actions executed so far left open (a run of appends, gathered applies)
    /// and does the I/O that waited for it (the completions behind those applies).
    pub(super) fn end_of_actions(&mut self) -> Result<(), Stop> {
        let mut io = Vec::new();
        if let Err(e) = self.exec.end_of_actions(&mut io) {
            return Err(self.exec_failure(e));
        }
        let mut broken: Option<String> = None;
        for item in io {
            self.do_io(item, &mut broken)?;
        }
        if let Some(why) = broken {
            self.drop_connection(&why);
        }
        Ok(())
    }

    /// Executes the core's pending actions and leaves a run of appends they end with open, for
    /// the next actions to continue (the submissions of one pass: each is executed as it is
    /// taken, and their records reach a `power` queue's file in one write).
    pub(super) fn execute_actions_in_run(&mut self) -> Result<bool, Stop> {
        let mut actions = std::mem::take(&mut self.actions);
        self.exec.core.drain_actions(&mut actions);
        let worked = !actions.is_empty();
        let mut broken: Option<String> = None;
        let mut io = Vec::new();
        for action in actions.drain(..) {
            match &action {
                // Hand what this pass sends to the network first: a primary's own sync then
                // overlaps the round trip to the backup instead of adding to it, and a backup's
                // ack leaves before its applies (region copies, the applied point's update)
                // instead of after them.
                Action::SyncQueue | Action::Apply(_) => self.flush_before_local_work(&mut broken),
                Action::Append {
                    recovery: false, ..
                } if self.send_before_own_append => self.flush_before_local_work(&mut broken),
                // Promoted (by an operator or a split-brain verdict): the fence of an earlier
                // role no longer holds. In order: a fence earlier in this batch came first.
                Action::PersistRole {
                    role: mirror_proto::WireRole::Primary,
                    superseded: false,
                } => self.shared.set_fenced(None),
                Action::BindPeer { node_id } => {
                    tracing::info!(peer = format_args!("{node_id:#x}"), "bound to peer")
                }
                Action::TruncateAfter { after } => tracing::warn!(
                    common_seq = after,
                    "dropping this backup's divergent suffix; the primary's records follow"
                ),
                _ => {}
            }
            let appends = matches!(action, Action::Append { .. });
            if let Err(e) = self.exec.execute(action, &mut io) {
                return Err(self.exec_failure(e));
            }
            if appends {
                stamps::at(Point::Appended);
            }
            for item in io.drain(..) {
                self.do_io(item, &mut broken)?;
            }
        }
        self.actions = actions;
        if let Some(why) = broken {
            self.drop_connection(&why);
        }
        Ok(worked)
    }

    /// Hands the send batch to the network before local work that need not precede it.
    fn flush_before_local_work(&mut self, broken: &mut Option<String>) {
        if let Some(c) = self.conn.as_mut().filter(|c| c.pending_send_bytes() > 0) {
            if let Err(e) = c.flush() {
                broken.get_or_insert(e.to_string());
            }
        }
    }

    fn do_io(&mut self, item: Io, broken: &mut Option<String>) -> Result<(), Stop> {
        match item {
            Io::Send { to, msg } if self.is_current(to) => self.send_in_order(msg, broken),
            Io::SendQueued {
                to,
                from_seq,
                through_seq,
            } if self.is_current(to) => self.send_queued(from_seq, through_seq, broken)?,
            Io::SendChunk {
                to,
                range,
                overlay_from,
                overlay_through,
            } if self.is_current(to) => {
                self.send_chunk(range, overlay_from, overlay_through, broken)?
            }
            Io::Complete(ticket) => {
                // A caller that sees its write complete and then reads the stats must see the
                // state that write completed in (degraded, say, and its seq taken), not an
                // earlier pass's: when the ack of a write comes back within the pass that sent
                // it, the end-of-pass publication would come after the completion.
                if self.exec.core.degraded() != self.published_degraded
                    || self.exec.core.next_seq() != self.published_next_seq
                {
                    self.publish_stats();
                }
                self.shared.complete(ticket);
                stamps::at(Point::Completed);
            }
            Io::Disconnect { peer, fault } if self.is_current(peer) => {
                // Told now, before the completions that follow in this batch (a write the
                // core completes alone must read as after the loss).
                self.publish_peer_lost(&fault.to_string());
                broken.get_or_insert(fault.to_string());
            }
            Io::Reject { peer, code, reason } if self.is_current(peer) => {
                if let Some(c) = self.conn.as_mut() {
                    let _ = c.send(&Message::Reject {
                        code,
                        reason: reason.clone(),
                    });
                    let _ = c.flush();
                }
                broken.get_or_insert(format!("rejected peer ({code:?}): {reason}"));
            }
            Io::Fatal(e) => return Err(Stop::Fatal(e.to_string())),
            Io::Discard {
                after,
                through,
                records,
                repair_bytes,
            } => self.save_divergent_suffix(after, through, &records, repair_bytes)?,
            Io::Applied { .. } => {}
            Io::Folded {
                records,
                new_chunks,
                dirty_chunks,
            } => self.folded(records, new_chunks, dirty_chunks),
            Io::TransferFinished(report) => self.transfer_finished(report),
            Io::RefuseWrites(why) => self.refuse_pending(why),
            // For a connection that is gone: nothing to do.
            Io::Send { .. }
            | Io::SendQueued { .. }
            | Io::SendChunk { .. }
            | Io::Disconnect { .. }
            | Io::Reject { .. } => {}
        }
        Ok(())
    }

    /// Why an action stopped the node, in words that say what to do.
    fn exec_failure(&self, e: ExecError) -> Stop {
        match e {
            ExecError::Storage(StorageError::Full { needed, free }) => Stop::Fatal(format!(
                "queue {} is full ({needed} bytes needed, {free} free); a backup's queue_size must be at least its primary's",
                self.cfg.queue.display()
            )),
            // The queue's or the region's: the error names its file where it has one.
            other => Stop::Fatal(format!(
                "storage (queue {}, region {}): {other}",
                self.cfg.queue.display(),
                self.cfg.region.display()
            )),
        }
    }

    /// Saves the divergent suffix `(after, through]` durably beside the queue (the repair
    /// requests that the executor queued after it are sent only then).
    fn save_divergent_suffix(
        &mut self,
        after: u64,
        through: u64,
        records: &[DiscardedRecord],
        repair_bytes: u64,
    ) -> Result<(), Stop> {
        let saved_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let file = discarded_path(&self.cfg.queue, after, saved_unix_ms);
        save_discarded(
            &file,
            self.exec.queue.node_id(),
            after,
            saved_unix_ms,
            records,
        )?;
        let divergence = Divergence {
            common_seq: after,
            through_seq: through,
            records: records.len() as u64,
            bytes: records.iter().map(|r| r.payload.len() as u64).sum(),
            repaired_bytes: repair_bytes,
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
        if self.split_brain_reported {
            // This node lost the split brain: say what went and where it was saved.
            self.shared.events.publish(super::Event::SplitBrain {
                description: format!(
                    "discarded this node's {} records after seq {} ({} bytes), saved first",
                    divergence.records, after, divergence.bytes
                ),
                discarded: Some(divergence.file.clone()),
            });
        }
        self.last_divergence = Some(divergence);
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
                // From the record headers: the catch-up reads and checks the bodies once.
                let bytes = self.exec.queue.payload_bytes(from_seq, through_seq);
                self.shared.events.publish(super::Event::Recovering {
                    records: through_seq.saturating_sub(from_seq) + 1,
                    bytes,
                });
                self.catch_up = Some(CatchUp {
                    next_seq: from_seq,
                    through_seq,
                    behind: VecDeque::new(),
                })
            }
        }
        self.continue_catch_up(broken).map(|_| ())
    }

    /// Sends a chunk's bytes as of now (see [`Io::SendChunk`]), copied from the region straight
    /// into the send batch; behind a catch-up in progress, as a message of their own.
    fn send_chunk(
        &mut self,
        range: ChunkRange,
        from: u64,
        through: u64,
        broken: &mut Option<String>,
    ) -> Result<(), Stop> {
        let conn = match self.conn.as_mut() {
            Some(conn) if self.catch_up.is_none() => conn,
            _ => {
                let msg = self
                    .exec
                    .chunk_message(range, from, through)
                    .map_err(|e| self.exec_failure(e.into()))?;
                self.send_in_order(msg, broken);
                return Ok(());
            }
        };
        let queued = self
            .exec
            .with_chunk_bytes(
                range,
                from,
                through,
                |bytes| -> Result<(), crate::transport::TransportError> {
                    conn.send_chunk_data(range.offset, bytes)?;
                    // A window of chunks is megabytes: what the socket did not take is handed
                    // over as it grows, while still in the cache it was just copied through.
                    if conn.pending_send_bytes() >= CHUNK_FLUSH_BYTES {
                        conn.flush()?;
                    }
                    Ok(())
                },
            )
            .map_err(|e| self.exec_failure(e.into()))?;
        if let Err(e) = queued {
            broken.get_or_insert(e.to_string());
        }
        Ok(())
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
        let (mut sent_records, mut sent_bytes) = (0, 0);
        let worked = self.stream_catch_up(broken, &mut sent_records, &mut sent_bytes);
        self.exec.count_recovery(sent_records, sent_bytes);
        worked
    }

    fn stream_catch_up(
        &mut self,
        broken: &mut Option<String>,
        sent_records: &mut u64,
        sent_bytes: &mut u64,
    ) -> Result<bool, Stop> {
        let mut worked = false;
        while let Some(c) = self.catch_up.as_mut() {
            let Some(conn) = self.conn.as_mut() else {
                self.catch_up = None;
                break;
            };
            if c.next_seq <= c.through_seq {
                // Where the connection sends in place (TCP in the clear) the catch-up waits
                // for the socket to take what is queued, so that its records go from the
                // queue's memory to the socket; elsewhere it keeps a backlog queued.
                let backlog = if conn.sends_in_place() {
                    0
                } else {
                    SEND_BACKLOG_PAUSE
                };
                let mut records = self.exec.queue.iter_from(c.next_seq);
                let mut group = Vec::new();
                loop {
                    // Stream: hand each chunk to the network as it is read (the peer works on
                    // it meanwhile), and stop while the peer lags (resumed next pass).
                    if conn.pending_send_bytes() > backlog.min(CATCH_UP_CHUNK) {
                        if let Err(e) = conn.flush() {
                            broken.get_or_insert(e.to_string());
                            return Ok(worked);
                        }
                        if conn.pending_send_bytes() > backlog {
                            return Ok(worked);
                        }
                    }
                    group.clear();
                    let mut group_bytes = 0;
                    let mut more = true;
                    while group_bytes < CATCH_UP_CHUNK && c.next_seq <= c.through_seq {
                        let Some(rec) = records.next() else {
                            more = false;
                            break;
                        };
                        let rec = rec?;
                        if rec.seq != c.next_seq {
                            // A gap: the check below names the record missing.
                            more = false;
                            break;
                        }
                        group.push(BorrowedWrite {
                            seq: rec.seq,
                            term: rec.term,
                            offset: rec.offset,
                            data: rec.payload,
                            data_crc: rec.payload_crc,
                        });
                        group_bytes += rec.payload.len();
                        c.next_seq += 1;
                    }
                    if !group.is_empty() {
                        if let Err(e) = conn.send_writes(&group) {
                            broken.get_or_insert(e.to_string());
                            return Ok(worked);
                        }
                        worked = true;
                        *sent_records += group.len() as u64;
                        *sent_bytes += group_bytes as u64;
                    }
                    if !more || c.next_seq > c.through_seq {
                        break;
                    }
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
