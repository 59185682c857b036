//! Terms and the term history: what makes a sequence number name one write.
//!
//! Every record carries the **term** of the primary incarnation that assigned its seq. A primary
//! starts a new term at every start (it may have lost the unsynced tail of its queue) and, later,
//! at every promotion; terms only grow and are never reused (each node persists the highest term
//! it has seen before it uses or acknowledges it).
//!
//! A node's **term history** is the run-length encoding of the terms along its log: entry
//! `(term, first_seq)` says that the records from `first_seq` up to the next entry's `first_seq`
//! (or the node's last seq) carry `term`. Terms and first seqs both strictly increase.
//!
//! **Log matching** (as in Raft): one term's seqs are assigned by one primary incarnation, in
//! order, once. So two logs that hold the same seq with the same term hold the same record there
//! and at every lower seq. [`common_point`] finds the highest seq at which two histories agree;
//! past it, each node's records are its own (a *divergent suffix* where both have one).
//!
//! A history may forget its oldest entries (see [`TermHistory::forget_before`]): only the seqs
//! from the trim point on are ever compared, because a peer's last seq is never below a seq this
//! node trimmed (trims follow the peer's durable apply reports).

use thiserror::Error;

/// Bits at the bottom of a term that name the node that started it (its node id's low bits).
///
/// Log matching needs one term to be started by one node incarnation only. With failover, two
/// nodes that both knew term `k` may each start a new term at the same moment (a forced
/// promotion while the old primary restarts); `k + 1` on both would give two different writes
/// the same (seq, term). A term is therefore `counter << TERM_TAG_BITS | tag(node)`: terms of
/// different nodes never collide, and they still order by their counter first. Two nodes whose
/// ids share the tag are refused at their handshake (`check_compatible`).
pub const TERM_TAG_BITS: u32 = 16;

/// The tag a node puts in the terms it starts.
pub fn term_tag(node_id: u64) -> u64 {
    node_id & ((1 << TERM_TAG_BITS) - 1)
}

/// The term a node starts when it becomes primary, knowing terms up to `known`: above every
/// known term, and tagged with the node (see [`TERM_TAG_BITS`]).
pub fn next_term(known: u64, node_id: u64) -> u64 {
    let counter = (known >> TERM_TAG_BITS) + 1;
    (counter << TERM_TAG_BITS) | term_tag(node_id)
}

/// Most entries a history keeps (and a `Hello` carries). A primary restart that writes adds one;
/// entries older than the trim point are forgotten. Chosen so that a queue metadata slot of
/// 1 KiB holds the whole history.
pub const MAX_TERM_ENTRIES: usize = 60;

/// One run of the history: the records from `first_seq` on carry `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermEntry {
    /// The term (never 0).
    pub term: u64,
    /// First seq of that term in this log (never 0).
    pub first_seq: u64,
}

/// Why a history (from a peer, or from a queue file) is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TermHistoryError {
    /// More entries than [`MAX_TERM_ENTRIES`].
    #[error("term history has {count} entries, more than the maximum {max}")]
    TooMany {
        /// Entries found.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// An entry with term 0 or first seq 0.
    #[error(
        "term history entry {index} has term {term} and first seq {first_seq}; neither may be 0"
    )]
    Zero {
        /// Index of the entry.
        index: usize,
        /// Its term.
        term: u64,
        /// Its first seq.
        first_seq: u64,
    },
    /// Terms or first seqs do not strictly increase (a history that goes backwards).
    #[error(
        "term history goes backwards at entry {index}: term {term} from seq {first_seq} after term {previous_term} from seq {previous_first_seq}"
    )]
    Backwards {
        /// Index of the offending entry.
        index: usize,
        /// Its term.
        term: u64,
        /// Its first seq.
        first_seq: u64,
        /// The previous entry's term.
        previous_term: u64,
        /// The previous entry's first seq.
        previous_first_seq: u64,
    },
    /// An entry starts after the last seq of the log it describes.
    #[error(
        "term history entry {index} starts at seq {first_seq}, after the log's last seq {last_seq}"
    )]
    BeyondLog {
        /// Index of the entry.
        index: usize,
        /// Its first seq.
        first_seq: u64,
        /// The log's last seq.
        last_seq: u64,
    },
    /// A record's term is lower than the history's last term (terms never go back along a log).
    #[error("seq {seq} carries term {term}, below the log's last term {last_term}")]
    TermRegression {
        /// The seq.
        seq: u64,
        /// Its term.
        term: u64,
        /// The last term of the log.
        last_term: u64,
    },
    /// A new term would start at or before the seq where the last one starts.
    #[error("term {term} cannot start at seq {seq}: term {last_term} already starts at seq {last_first_seq}")]
    SeqRegression {
        /// The seq.
        seq: u64,
        /// The new term.
        term: u64,
        /// The last term of the log.
        last_term: u64,
        /// Where it starts.
        last_first_seq: u64,
    },
}

/// A node's term history. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TermHistory {
    entries: Vec<TermEntry>,
}

impl TermHistory {
    /// An empty history (a log that never held a record).
    pub fn new() -> Self {
        TermHistory::default()
    }

    /// Validates `entries` (at most [`MAX_TERM_ENTRIES`], none zero, terms and first seqs
    /// strictly increasing).
    pub fn from_entries(entries: Vec<TermEntry>) -> Result<Self, TermHistoryError> {
        if entries.len() > MAX_TERM_ENTRIES {
            return Err(TermHistoryError::TooMany {
                count: entries.len(),
                max: MAX_TERM_ENTRIES,
            });
        }
        for (index, e) in entries.iter().enumerate() {
            if e.term == 0 || e.first_seq == 0 {
                return Err(TermHistoryError::Zero {
                    index,
                    term: e.term,
                    first_seq: e.first_seq,
                });
            }
            if let Some(p) = index.checked_sub(1).map(|i| entries[i]) {
                if e.term <= p.term || e.first_seq <= p.first_seq {
                    return Err(TermHistoryError::Backwards {
                        index,
                        term: e.term,
                        first_seq: e.first_seq,
                        previous_term: p.term,
                        previous_first_seq: p.first_seq,
                    });
                }
            }
        }
        Ok(TermHistory { entries })
    }

    /// Validates `entries` as the history of a log whose last seq is `last_seq`: also no entry
    /// may start after it.
    pub fn for_log(entries: Vec<TermEntry>, last_seq: u64) -> Result<Self, TermHistoryError> {
        let h = Self::from_entries(entries)?;
        if let Some((index, e)) = h
            .entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.first_seq > last_seq)
        {
            return Err(TermHistoryError::BeyondLog {
                index,
                first_seq: e.first_seq,
                last_seq,
            });
        }
        Ok(h)
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[TermEntry] {
        &self.entries
    }

    /// Whether the history has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The term of the newest records (0: none).
    pub fn last_term(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.term)
    }

    /// The term the record `seq` carries, if the history covers `seq` (it does from its first
    /// entry's first seq on; the caller knows where the log ends).
    pub fn term_at(&self, seq: u64) -> Option<u64> {
        let after = self.entries.partition_point(|e| e.first_seq <= seq);
        after.checked_sub(1).map(|i| self.entries[i].term)
    }

    /// Whether appending `seq` with `term` is valid, and whether it starts a new entry: `Ok(true)`
    /// when it does (a queue persists the history before the record), `Ok(false)` when `seq`
    /// continues the last term. The one rule for every appender (queue, core, simulator).
    pub fn check_append(&self, seq: u64, term: u64) -> Result<bool, TermHistoryError> {
        let Some(last) = self.entries.last() else {
            return if term == 0 || seq == 0 {
                Err(TermHistoryError::Zero {
                    index: 0,
                    term,
                    first_seq: seq,
                })
            } else {
                Ok(true)
            };
        };
        if term < last.term {
            return Err(TermHistoryError::TermRegression {
                seq,
                term,
                last_term: last.term,
            });
        }
        if term == last.term {
            return Ok(false);
        }
        if seq <= last.first_seq {
            return Err(TermHistoryError::SeqRegression {
                seq,
                term,
                last_term: last.term,
                last_first_seq: last.first_seq,
            });
        }
        if self.entries.len() == MAX_TERM_ENTRIES {
            return Err(TermHistoryError::TooMany {
                count: MAX_TERM_ENTRIES + 1,
                max: MAX_TERM_ENTRIES,
            });
        }
        Ok(true)
    }

    /// Records that `seq` was appended with `term` (see [`Self::check_append`]). Returns whether
    /// a new entry was added.
    pub fn note_append(&mut self, seq: u64, term: u64) -> Result<bool, TermHistoryError> {
        let new = self.check_append(seq, term)?;
        if new {
            self.entries.push(TermEntry {
                term,
                first_seq: seq,
            });
        }
        Ok(new)
    }

    /// Forgets the entries that start after `last_seq`: the log was cut or truncated there, and
    /// they cover no record.
    pub fn truncate_after(&mut self, last_seq: u64) {
        let keep = self.entries.partition_point(|e| e.first_seq <= last_seq);
        self.entries.truncate(keep);
    }

    /// Forgets the entries that only cover seqs below `floor_seq` (the entry covering
    /// `floor_seq` stays): nothing below the trim point is ever compared.
    pub fn forget_before(&mut self, floor_seq: u64) {
        let covering = self.entries.partition_point(|e| e.first_seq <= floor_seq);
        if covering > 1 {
            self.entries.drain(..covering - 1);
        }
    }
}

/// Where two logs stop agreeing: the highest seq `s <= min(last_a, last_b)` that both histories
/// give the same term (then, by log matching, both logs hold the same records through `s`).
/// `Some(0)` when they agree on nothing but one of them is empty, or when both histories reach
/// back to seq 1 (nothing forgotten) and differ there: the logs diverge from their first record.
/// `None` when both hold records but their histories share no term on any seq both cover and
/// one of them forgot its start: the logs cannot be reconciled from their queues (a divergence
/// below a trim point, which the protocol never allows).
pub fn common_point(a: &TermHistory, last_a: u64, b: &TermHistory, last_b: u64) -> Option<u64> {
    if last_a == 0 || last_b == 0 {
        return Some(0);
    }
    let run_end = |h: &TermHistory, i: usize, last: u64| -> u64 {
        h.entries
            .get(i + 1)
            .map_or(last, |n| n.first_seq.saturating_sub(1).min(last))
    };
    let mut best: Option<u64> = None;
    for (i, ea) in a.entries.iter().enumerate() {
        let Some(j) = b.entries.iter().position(|eb| eb.term == ea.term) else {
            continue;
        };
        let eb = b.entries[j];
        let from = ea.first_seq.max(eb.first_seq);
        let to = run_end(a, i, last_a).min(run_end(b, j, last_b));
        if from <= to {
            best = Some(best.map_or(to, |x| x.max(to)));
        }
    }
    let from_the_start = |h: &TermHistory| h.entries.first().is_some_and(|e| e.first_seq == 1);
    best.or_else(|| (from_the_start(a) && from_the_start(b)).then_some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(entries: &[(u64, u64)]) -> TermHistory {
        TermHistory::from_entries(
            entries
                .iter()
                .map(|&(term, first_seq)| TermEntry { term, first_seq })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn term_at_follows_the_runs() {
        let x = h(&[(2, 5), (4, 9)]);
        assert_eq!(x.term_at(4), None);
        assert_eq!(x.term_at(5), Some(2));
        assert_eq!(x.term_at(8), Some(2));
        assert_eq!(x.term_at(9), Some(4));
        assert_eq!(x.term_at(1000), Some(4));
    }

    #[test]
    fn a_history_that_goes_backwards_is_refused() {
        let e = |term, first_seq| TermEntry { term, first_seq };
        assert!(matches!(
            TermHistory::from_entries(vec![e(3, 1), e(2, 5)]),
            Err(TermHistoryError::Backwards { index: 1, .. })
        ));
        assert!(matches!(
            TermHistory::from_entries(vec![e(3, 5), e(4, 5)]),
            Err(TermHistoryError::Backwards { index: 1, .. })
        ));
        assert!(matches!(
            TermHistory::from_entries(vec![e(0, 5)]),
            Err(TermHistoryError::Zero { index: 0, .. })
        ));
        assert!(matches!(
            TermHistory::for_log(vec![e(1, 1), e(2, 9)], 8),
            Err(TermHistoryError::BeyondLog { index: 1, .. })
        ));
        assert!(matches!(
            TermHistory::from_entries((1..=61).map(|t| e(t, t)).collect()),
            Err(TermHistoryError::TooMany { count: 61, .. })
        ));
    }

    #[test]
    fn appends_extend_or_start_runs() {
        let mut x = TermHistory::new();
        assert_eq!(x.note_append(1, 1), Ok(true));
        assert_eq!(x.note_append(2, 1), Ok(false));
        assert_eq!(x.note_append(3, 3), Ok(true));
        assert!(matches!(
            x.note_append(4, 2),
            Err(TermHistoryError::TermRegression { .. })
        ));
        assert!(matches!(
            x.note_append(3, 5),
            Err(TermHistoryError::SeqRegression { .. })
        ));
        assert_eq!(x, h(&[(1, 1), (3, 3)]));
    }

    #[test]
    fn truncate_and_forget_keep_what_is_needed() {
        let mut x = h(&[(1, 1), (3, 10), (5, 20)]);
        x.truncate_after(19);
        assert_eq!(x, h(&[(1, 1), (3, 10)]));
        x.forget_before(12);
        assert_eq!(x, h(&[(3, 10)]));
        x.forget_before(9);
        assert_eq!(x, h(&[(3, 10)]));
    }

    #[test]
    fn common_point_of_the_issue_scenario() {
        // Primary lost seq 10 (term 1) in a power loss, restarted in term 2 and wrote seq 10..12;
        // the backup holds 1..10 of term 1.
        let primary = h(&[(1, 1), (2, 10)]);
        let backup = h(&[(1, 1)]);
        assert_eq!(common_point(&primary, 12, &backup, 10), Some(9));
        // Without the degraded writes the primary's log is a prefix of the backup's.
        let primary = h(&[(1, 1)]);
        assert_eq!(common_point(&primary, 9, &backup, 10), Some(9));
        assert_eq!(common_point(&backup, 10, &primary, 9), Some(9));
        // Equal logs.
        assert_eq!(common_point(&backup, 10, &backup, 10), Some(10));
        // An empty log agrees on nothing and conflicts with nothing.
        assert_eq!(common_point(&TermHistory::new(), 0, &backup, 10), Some(0));
    }

    #[test]
    fn logs_that_differ_from_their_first_record_diverge_after_seq_0() {
        // Both histories reach back to seq 1: they disagree from the start.
        assert_eq!(common_point(&h(&[(5, 1)]), 4, &h(&[(3, 1)]), 6), Some(0));
        // One forgot its start (pruned below a trim point): nothing can be said.
        assert_eq!(common_point(&h(&[(5, 10)]), 14, &h(&[(3, 1)]), 16), None);
    }

    #[test]
    fn common_point_across_several_terms() {
        let a = h(&[(1, 1), (2, 5), (4, 8)]);
        let b = h(&[(1, 1), (2, 5), (3, 7)]);
        assert_eq!(common_point(&a, 20, &b, 30), Some(6));
        // Histories that forgot different prefixes still meet on the shared term.
        let a = h(&[(2, 5), (4, 8)]);
        let b = h(&[(2, 5), (3, 7)]);
        assert_eq!(common_point(&a, 20, &b, 30), Some(6));
        // No shared term on any seq: cannot be reconciled.
        let a = h(&[(5, 10)]);
        let b = h(&[(6, 10)]);
        assert_eq!(common_point(&a, 20, &b, 30), None);
    }
}
