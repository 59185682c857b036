//! What the poller does around the bitmap and chunk transfers: folds of a full queue while the
//! backup is away, resyncs and online verifies starting and ending (logs, events, the verify
//! caller's result).

use mirror_proto::core::{TransferPurpose, VerifyReport};

use crate::error::{MirrorError, Result};

use super::*;

impl Poller {
    /// The queue was folded into the dirty-chunk bitmap.
    pub(super) fn folded(&mut self, records: u64, new_chunks: u64, dirty_chunks: u64) {
        if !self.folding {
            // The first fold of an outage says what happened; the next ones are routine.
            self.folding = true;
            tracing::warn!(
                records,
                dirty_chunks,
                chunk_size = self.cfg.chunk_size,
                "the queue is full while the backup is away: its records went into the dirty-chunk bitmap, and writes go on; the backup gets the dirty chunks, then the queue, when it returns"
            );
            self.shared.events.publish(Event::BitmapFallback {
                records,
                dirty_chunks,
            });
        } else {
            tracing::debug!(
                records,
                new_chunks,
                dirty_chunks,
                "queue folded into the bitmap"
            );
        }
    }

    /// A resync, initial sync or verify ended.
    pub(super) fn transfer_finished(&mut self, report: VerifyReport) {
        let kind = report.purpose.name();
        let differing = report.differing.len() as u64;
        match &report.abandoned {
            None => tracing::info!(
                kind,
                chunks_compared = report.chunks_compared,
                chunks_differing = differing,
                chunks_sent = report.chunks_repaired,
                bytes_sent = report.bytes_sent,
                elapsed_ms = report.elapsed_us / 1000,
                "{kind} complete"
            ),
            Some(why) if matches!(report.purpose, TransferPurpose::Verify { .. }) => {
                tracing::warn!(
                    kind,
                    chunks_compared = report.chunks_compared,
                    "{kind} ended early: {why}; run the verify again once the pair is synchronous"
                )
            }
            Some(why) => tracing::warn!(
                kind,
                chunks_compared = report.chunks_compared,
                "{kind} ended early: {why}; it resumes from the chunks left at the next connection"
            ),
        }
        self.shared.events.publish(Event::TransferFinished {
            kind,
            chunks_compared: report.chunks_compared,
            chunks_differing: differing,
            bytes_sent: report.bytes_sent,
            abandoned: report.abandoned.clone(),
        });
        self.transfer_published = false;
        if matches!(report.purpose, TransferPurpose::Verify { .. }) {
            // A caller that sees its verify return and then reads the stats must find the
            // transfer over, not the state of the pass before (published at the pass's end,
            // after the caller may already have read it).
            self.publish_stats();
            self.shared.verify_finished(report);
        }
    }

    /// A transfer the stats show for the first time has started.
    pub(super) fn publish_transfer_start(&mut self) {
        let Some(t) = self.exec.core.stats().transfer else {
            return;
        };
        if self.transfer_published {
            return;
        }
        self.transfer_published = true;
        self.transfer_progress_at = Some(self.last_step_at);
        let kind = t.purpose.name();
        tracing::info!(
            kind,
            chunks = t.chunks_total,
            chunk_size = self.cfg.chunk_size,
            "{kind} started"
        );
        self.shared.events.publish(Event::TransferStarted {
            kind,
            chunks: t.chunks_total,
        });
    }

    /// [`Mirror::verify_online`]'s start, between two passes.
    pub(in crate::node) fn start_verify(&mut self, repair: bool) -> Result<()> {
        self.check_running()?;
        self.exec
            .core
            .start_verify(repair)
            .map_err(|e| MirrorError::Verify(e.to_string()))?;
        self.publish_transfer_start();
        if let Err(Stop::Fatal(reason)) = self.execute_actions() {
            self.stop_node(reason.clone());
            return Err(MirrorError::Failed { reason });
        }
        Ok(())
    }
}
