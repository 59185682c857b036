//! The handshake's decisions, one function each, used by both roles: whether the peer is
//! compatible ([`check_compatible`]) and how the two logs are reconciled ([`reconcile`]). Each
//! side evaluates them on the same two views (the primary's `Hello` and the backup's log), so
//! both reach the same plan without a further round trip.

use crate::term::{common_point, TermHistory};
use crate::wire::{Hello, Message, RegionRange, RejectCode, WireRole, MAX_REPAIR_RANGES};

/// What the handshake needs to know of one node's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogView {
    /// The node's current term.
    pub current_term: u64,
    /// Terms along its log.
    pub history: TermHistory,
    /// Its last seq.
    pub last_seq: u64,
    /// Its oldest held seq (None: nothing held).
    pub first_seq: Option<u64>,
    /// The first seq it completed as a primary without its peer that the peer has not
    /// confirmed holding since (0: none; see [`Hello::alone_from`]).
    pub alone_from: u64,
    /// Its node id.
    pub node_id: u64,
    /// A primary's: its dirty-chunk bitmap covers every record folded out of its queue from
    /// this seq on (0: none folded; see [`Hello::resync_from`]).
    pub resync_from: u64,
    /// A backup's consent to an initial sync (see [`Hello::initial_sync`]).
    pub initial_sync: bool,
}

impl LogView {
    /// The view a `Hello` announces.
    pub fn of_hello(h: &Hello) -> Self {
        LogView {
            current_term: h.current_term,
            history: h.term_history.clone(),
            last_seq: h.last_seq,
            first_seq: (h.first_seq != 0).then_some(h.first_seq),
            alone_from: h.alone_from,
            node_id: h.node_id,
            resync_from: h.resync_from,
            initial_sync: h.initial_sync,
        }
    }

    /// Whether the node may have completed writes after `common` that only it holds: it has
    /// records past `common` and an unconfirmed stretch of writes completed alone (which may
    /// run on past `common` even when it starts below).
    fn completed_alone_after(&self, common: u64) -> bool {
        self.alone_from != 0 && self.alone_from <= self.last_seq && self.last_seq > common
    }

    /// What its log holds after `common`, for a split-brain policy.
    fn suffix_after(&self, common: u64) -> Suffix {
        Suffix {
            node_id: self.node_id,
            records: self.last_seq.saturating_sub(common),
            first_term: self.history.term_at(common + 1).unwrap_or(0),
            completed_alone: self.completed_alone_after(common),
        }
    }

    /// Whether the node's queue still holds every seq from `from` to its last seq.
    fn holds_from(&self, from: u64) -> bool {
        from > self.last_seq || self.first_seq.is_some_and(|f| f <= from)
    }
}

/// How the two logs are brought together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciliation {
    /// The highest seq both logs hold with the same term: identical records through it.
    pub common: u64,
    /// The backup's records in `(common, backup_last]` are a divergent suffix that the primary's
    /// newer history supersedes: the backup saves and drops them, and repairs their byte ranges
    /// from the primary's region.
    pub backup_discards: bool,
    /// The seq through which the backup holds the primary's history once the handshake is done
    /// (its last seq when it keeps its log, else `common`). The primary takes
    /// `(primary_last, backup_holds_through]` from the backup (a replay) when this is above
    /// its own last seq, and sends `(backup_holds_through, primary_last]` otherwise.
    pub backup_holds_through: u64,
    /// The primary's queue no longer holds every record after `backup_holds_through`: the
    /// region chunks those records wrote are brought over first (a resync), then the records
    /// the queue holds. None: the queue suffices.
    pub resync: Option<ResyncKind>,
}

/// How a resync finds the chunks to bring over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncKind {
    /// The primary's dirty-chunk bitmap covers every record the backup lacks.
    Dirty,
    /// Nothing records what the backup lacks (a new or replaced node, a stale copy, records
    /// trimmed before the bitmap began): every chunk is compared, and only those that differ
    /// move. Needs the backup's consent ([`LogView::initial_sync`]).
    Full,
}

/// Why two logs cannot be reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreconcilable {
    /// The backup has seen a newer primary: this one is stale and must never write again.
    StaleTerm {
        /// The primary's current term.
        primary_term: u64,
        /// The backup's.
        backup_term: u64,
    },
    /// Both logs go on past their common point and the backup's suffix holds writes completed
    /// to callers (it wrote them as a primary, without this peer): discarding them needs a
    /// policy's or an operator's decision ([`decide_split_brain`]).
    SplitBrain(SplitBrain),
    /// The backup lacks records the primary's queue and bitmap no longer describe: only an
    /// initial sync (a chunk-by-chunk comparison of the whole region) can bring it back, and
    /// the backup did not consent to one. Both nodes keep running; an operator restarts the
    /// backup with `initial_sync`.
    NeedsInitialSync(String),
    /// Anything else: the reason, for the peer and the log.
    Unrecoverable(String),
}

/// One side of a split brain: what its log holds after the common point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suffix {
    /// The node.
    pub node_id: u64,
    /// Records after the common point ("changes").
    pub records: u64,
    /// The term of its first record after the common point: the later a node became the
    /// primary that wrote them, the higher.
    pub first_term: u64,
    /// Whether some of them were completed to callers.
    pub completed_alone: bool,
}

/// Two logs that both went on past their common point, the backup's with completed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitBrain {
    /// The highest seq both hold with the same term.
    pub common: u64,
    /// The primary's side.
    pub primary: Suffix,
    /// The backup's side.
    pub backup: Suffix,
}

impl std::fmt::Display for SplitBrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |s: &Suffix| {
            format!(
                "node {:#x}: {} records from term {}{}",
                s.node_id,
                s.records,
                s.first_term,
                if s.completed_alone {
                    ", some completed to callers"
                } else {
                    ", none completed"
                }
            )
        };
        write!(
            f,
            "split brain after seq {}: {}; {}",
            self.common,
            side(&self.primary),
            side(&self.backup)
        )
    }
}

/// What to do after a split brain (DRBD's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitBrainPolicy {
    /// Stay apart and say so until an operator names the node to discard.
    #[default]
    Disconnect,
    /// Discard the writes of the node that became primary last (the higher first term).
    DiscardYoungerPrimary,
    /// Discard the writes of the node with fewer records after the common point (a tie: the
    /// younger primary's).
    DiscardLeastChanges,
    /// Discard this node's writes.
    DiscardNode(u64),
}

/// A split-brain decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stay apart.
    StayApart,
    /// The backup's suffix goes (saved first), as in any repair.
    DiscardBackup,
    /// The primary's suffix goes: the primary becomes a backup and the backup a primary (a
    /// new term), and the next handshake repairs the old primary.
    DiscardPrimary,
}

/// The split-brain rule, for both sides: an operator's resolution (either node's `discard`,
/// naming one of the two; two different names keep them apart) wins over the policy. It
/// depends on the two suffixes only, never on who is primary now, so the handshake after a
/// `DiscardPrimary` role swap reaches the same loser.
pub fn decide_split_brain(
    policy: SplitBrainPolicy,
    sb: &SplitBrain,
    operator_discards: [u64; 2],
) -> Verdict {
    let (p, b) = (&sb.primary, &sb.backup);
    let loser_is = |id: u64| {
        if id == p.node_id {
            Verdict::DiscardPrimary
        } else if id == b.node_id {
            Verdict::DiscardBackup
        } else {
            Verdict::StayApart
        }
    };
    let named: Vec<u64> = operator_discards
        .into_iter()
        .filter(|&id| id == p.node_id || id == b.node_id)
        .collect();
    if let Some(&first) = named.first() {
        return if named.iter().all(|&id| id == first) {
            loser_is(first)
        } else {
            Verdict::StayApart
        };
    }
    let younger = || match p.first_term.cmp(&b.first_term) {
        std::cmp::Ordering::Greater => Verdict::DiscardPrimary,
        std::cmp::Ordering::Less => Verdict::DiscardBackup,
        std::cmp::Ordering::Equal => Verdict::StayApart,
    };
    match policy {
        SplitBrainPolicy::Disconnect => Verdict::StayApart,
        SplitBrainPolicy::DiscardYoungerPrimary => younger(),
        SplitBrainPolicy::DiscardLeastChanges => match p.records.cmp(&b.records) {
            std::cmp::Ordering::Less => Verdict::DiscardPrimary,
            std::cmp::Ordering::Greater => Verdict::DiscardBackup,
            std::cmp::Ordering::Equal => younger(),
        },
        SplitBrainPolicy::DiscardNode(id) => loser_is(id),
    }
}

impl Unreconcilable {
    /// The reject code and reason a backup answers with.
    pub fn reject(&self) -> (RejectCode, String) {
        match self {
            Unreconcilable::StaleTerm {
                primary_term,
                backup_term,
            } => (
                RejectCode::StaleTerm,
                format!(
                    "primary's term {primary_term} is older than term {backup_term} that this backup has seen: a newer primary exists"
                ),
            ),
            Unreconcilable::SplitBrain(sb) => (RejectCode::SplitBrain, sb.to_string()),
            Unreconcilable::Unrecoverable(why) => (RejectCode::Unrecoverable, why.clone()),
            Unreconcilable::NeedsInitialSync(why) => (RejectCode::NeedsInitialSync, why.clone()),
        }
    }
}

/// The reconciliation rule (see docs/PROTOCOL.md, "Log matching"):
/// - the primary's term must be at least the backup's (else it is stale);
/// - the two logs agree through their [`common_point`];
/// - when both go on past it, the primary's suffix wins and the backup's is discarded (saved
///   first), unless the backup completed some of it alone as a primary: that is a split brain,
///   which a policy or an operator decides ([`decide_split_brain`]). Whatever its terms, a
///   suffix with nothing completed alone was completed nowhere (a write completed with a peer
///   is in the peer's log, at or below the common point), so discarding it loses nothing;
/// - whoever must send records must still hold them.
pub fn reconcile(primary: &LogView, backup: &LogView) -> Result<Reconciliation, Unreconcilable> {
    reconcile_resolving(primary, backup, false)
}

/// [`reconcile`], and a split brain stops it ([`Unreconcilable::SplitBrain`]) unless
/// `discard_backup`: a split-brain decision ([`Verdict::DiscardBackup`]) drops the backup's
/// suffix whatever its terms.
pub fn reconcile_resolving(
    primary: &LogView,
    backup: &LogView,
    discard_backup: bool,
) -> Result<Reconciliation, Unreconcilable> {
    if primary.current_term < backup.current_term {
        return Err(Unreconcilable::StaleTerm {
            primary_term: primary.current_term,
            backup_term: backup.current_term,
        });
    }
    let common = common_point(
        &primary.history,
        primary.last_seq,
        &backup.history,
        backup.last_seq,
    )
    .ok_or_else(|| {
        Unreconcilable::Unrecoverable(format!(
            "the two queues share no term on any seq (primary {:?} through {}, backup {:?} through {}): they cannot be reconciled from their queues",
            primary.history.entries(),
            primary.last_seq,
            backup.history.entries(),
            backup.last_seq
        ))
    })?;
    let backup_discards = primary.last_seq > common && backup.last_seq > common;
    if backup_discards && !discard_backup && backup.completed_alone_after(common) {
        return Err(Unreconcilable::SplitBrain(SplitBrain {
            common,
            primary: primary.suffix_after(common),
            backup: backup.suffix_after(common),
        }));
    }
    if backup_discards && !backup.holds_from(common + 1) {
        // Writes it folded into its bitmap as a primary are part of the suffix to discard:
        // nothing says which bytes they wrote, so neither a repair nor a save is possible.
        return Err(Unreconcilable::NeedsInitialSync(format!(
            "backup {:#x} must discard its writes after seq {common}, but some of them left its queue for its dirty-chunk bitmap (it wrote them as a primary while its peer was away): they cannot be saved or repaired one by one. Stop it, move its queue, bitmap and region files aside, and restart it as a new node with `--initial-sync` (config key `initial_sync = true`)",
            backup.node_id
        )));
    }
    let backup_holds_through = if backup_discards {
        common
    } else {
        backup.last_seq
    };
    if backup_holds_through > primary.last_seq && !backup.holds_from(primary.last_seq + 1) {
        return Err(Unreconcilable::Unrecoverable(format!(
            "primary has records through {}, but the backup's queue starts at {}",
            primary.last_seq,
            backup.first_seq.unwrap_or(backup.last_seq + 1)
        )));
    }
    let resync = if primary.holds_from(backup_holds_through + 1) {
        None
    } else if primary.resync_from != 0 && primary.resync_from <= backup_holds_through + 1 {
        Some(ResyncKind::Dirty)
    } else if backup.initial_sync {
        Some(ResyncKind::Full)
    } else {
        return Err(Unreconcilable::NeedsInitialSync(format!(
            "backup {:#x} holds the log through seq {backup_holds_through}, but primary {:#x} no longer holds the records after it (its queue starts at {}{}): the backup needs an initial sync, which copies every chunk of the region that differs. Restart the backup with `--initial-sync` (config key `initial_sync = true`) to consent",
            backup.node_id,
            primary.node_id,
            primary.first_seq.unwrap_or(primary.last_seq + 1),
            if primary.resync_from != 0 {
                format!(", and its dirty-chunk bitmap covers only from seq {}", primary.resync_from)
            } else {
                String::new()
            }
        )));
    };
    Ok(Reconciliation {
        common,
        backup_discards,
        backup_holds_through,
        resync,
    })
}

fn role_name(role: WireRole) -> &'static str {
    match role {
        WireRole::Primary => "primary",
        WireRole::Backup => "backup",
    }
}

/// What a node knows of itself for the compatibility check.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// This node's role.
    pub role: WireRole,
    /// This node's id.
    pub node_id: u64,
    /// The peer it is bound to (0: none).
    pub peer_node_id: u64,
    /// Region size.
    pub region_size: u64,
    /// Queue format version.
    pub queue_format_version: u32,
    /// Queue capacity in bytes.
    pub queue_capacity: u64,
    /// A backup's consent to an initial sync: an unbound backup that consents may be bound
    /// to a primary bound to another node (it replaces that node).
    pub initial_sync: bool,
    /// The node's last seq (a replacement holds no log yet).
    pub last_seq: u64,
}

/// The compatibility rule, for both roles: the peer has the other role and another node id,
/// the same region size and queue format, the binding of each side names the other, and the
/// backup's queue is at least as large as the primary's.
pub fn check_compatible(own: &Identity, peer: &Hello) -> Result<(), (RejectCode, String)> {
    let expected = match own.role {
        WireRole::Primary => WireRole::Backup,
        WireRole::Backup => WireRole::Primary,
    };
    if peer.role != expected {
        return Err((
            RejectCode::Role,
            format!(
                "this node is a {:?} and peer {:#x} is a {:?}, expected a {expected:?}",
                own.role, peer.node_id, peer.role
            ),
        ));
    }
    if peer.node_id == own.node_id {
        return Err((RejectCode::Role, "peer has this node's own node id".into()));
    }
    if crate::term::term_tag(peer.node_id) == crate::term::term_tag(own.node_id) {
        // Their terms would collide (see `TERM_TAG_BITS`): one in 65 536 pairs of new queues.
        return Err((
            RejectCode::Role,
            format!(
                "node ids {:#x} and {:#x} share their low 16 bits, which tag the terms each node starts: recreate one node's queue (it gets a new id) before pairing them",
                own.node_id, peer.node_id
            ),
        ));
    }
    if peer.region_size != own.region_size {
        return Err((
            RejectCode::RegionSize,
            format!(
                "this node's region is {} bytes, the peer's is {} bytes",
                own.region_size, peer.region_size
            ),
        ));
    }
    if peer.queue_format_version != own.queue_format_version {
        return Err((
            RejectCode::QueueFormat,
            format!(
                "this node's queue format version is {}, the peer's is {}",
                own.queue_format_version, peer.queue_format_version
            ),
        ));
    }
    let (primary_capacity, backup_capacity) = match own.role {
        WireRole::Primary => (own.queue_capacity, peer.queue_capacity),
        WireRole::Backup => (peer.queue_capacity, own.queue_capacity),
    };
    if primary_capacity > backup_capacity {
        return Err((
            RejectCode::QueueCapacity,
            format!(
                "backup queue holds {backup_capacity} bytes, less than the primary's {primary_capacity} bytes; set queue_size on the backup at least as large"
            ),
        ));
    }
    let (me, them) = (role_name(own.role), role_name(peer.role));
    // A new or replaced backup (bound to nobody, or to this primary by an attempt that did not
    // finish: it binds before it answers, and holds no log until its initial sync ends) that
    // consents to an initial sync may take the place of the node a primary is bound to; a node
    // bound to another, or the old node with its log, still may not.
    let replacement = match own.role {
        WireRole::Primary => {
            peer.initial_sync
                && (peer.peer_node_id == 0
                    || (peer.peer_node_id == own.node_id && peer.last_seq == 0))
        }
        WireRole::Backup => {
            own.initial_sync
                && (own.peer_node_id == 0
                    || (own.peer_node_id == peer.node_id && own.last_seq == 0))
        }
    };
    // A fresh backup (bound to nobody) meeting a primary bound to another node may be its
    // replacement: it only lacks the consent, which an operator gives; both keep running.
    let fresh_backup = match own.role {
        WireRole::Primary => peer.peer_node_id == 0,
        WireRole::Backup => own.peer_node_id == 0,
    };
    let (bound_primary, unbound_backup) = match own.role {
        WireRole::Primary => (own.node_id, peer.node_id),
        WireRole::Backup => (peer.node_id, own.node_id),
    };
    let wrong_peer = |why: String| {
        if fresh_backup {
            (
                RejectCode::NeedsInitialSync,
                format!(
                    "{why}: backup {unbound_backup:#x} has fresh files. If it replaces the backup primary {bound_primary:#x} is bound to, restart it with `--initial-sync` (config key `initial_sync = true`): the primary then binds to it and copies every chunk of the region that differs"
                ),
            )
        } else {
            (
                RejectCode::WrongPeer,
                format!("{why} (a second {them}, or was its queue recreated?)"),
            )
        }
    };
    if own.peer_node_id != 0 && peer.node_id != own.peer_node_id && !replacement {
        return Err(wrong_peer(format!(
            "this {me} is bound to {them} {:#x}; refusing {them} {:#x}",
            own.peer_node_id, peer.node_id
        )));
    }
    if peer.peer_node_id != 0 && peer.peer_node_id != own.node_id && !replacement {
        return Err(wrong_peer(format!(
            "{them} {:#x} is bound to {me} {:#x}, this {me} is {:#x}",
            peer.node_id, peer.peer_node_id, own.node_id
        )));
    }
    Ok(())
}

/// Bytes of region one `RepairData` message carries at most.
pub const REPAIR_CHUNK_BYTES: u64 = 1 << 20;

/// The byte ranges written by `writes` (offset, length), sorted and merged where they overlap
/// or touch: what a backup asks the primary to repair after dropping a divergent suffix.
pub fn merged_ranges(writes: impl IntoIterator<Item = (u64, u64)>) -> Vec<RegionRange> {
    let mut ranges: Vec<RegionRange> = writes
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(offset, len)| RegionRange { offset, len })
        .collect();
    ranges.sort_by_key(|r| r.offset);
    let mut merged: Vec<RegionRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.offset <= last.offset + last.len => {
                let end = (last.offset + last.len).max(r.offset + r.len);
                last.len = end - last.offset;
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// The `RepairRequest` messages for `ranges` (several when there are more than
/// [`MAX_REPAIR_RANGES`]).
pub fn repair_requests(ranges: &[RegionRange]) -> impl Iterator<Item = Message> + '_ {
    ranges
        .chunks(MAX_REPAIR_RANGES)
        .map(|c| Message::RepairRequest { ranges: c.to_vec() })
}

/// `ranges` cut into pieces of at most [`REPAIR_CHUNK_BYTES`]: one `RepairData` each.
pub fn repair_pieces(ranges: &[RegionRange]) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges.iter().flat_map(|r| {
        (0..r.len.div_ceil(REPAIR_CHUNK_BYTES)).map(move |i| {
            let start = i * REPAIR_CHUNK_BYTES;
            (r.offset + start, (r.len - start).min(REPAIR_CHUNK_BYTES))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_where_they_overlap_or_touch() {
        let r = merged_ranges([(10, 5), (0, 4), (15, 1), (3, 2), (100, 0), (50, 10)]);
        let want = [(0, 5), (10, 6), (50, 10)].map(|(offset, len)| RegionRange { offset, len });
        assert_eq!(r, want);
        let pieces: Vec<_> = repair_pieces(&[RegionRange {
            offset: 7,
            len: 2 * REPAIR_CHUNK_BYTES + 1,
        }])
        .collect();
        assert_eq!(
            pieces,
            [
                (7, REPAIR_CHUNK_BYTES),
                (7 + REPAIR_CHUNK_BYTES, REPAIR_CHUNK_BYTES),
                (7 + 2 * REPAIR_CHUNK_BYTES, 1)
            ]
        );
    }
}

#[cfg(test)]
mod split_brain_tests {
    use super::*;

    fn suffix(node_id: u64, records: u64, first_term: u64) -> Suffix {
        Suffix {
            node_id,
            records,
            first_term,
            completed_alone: true,
        }
    }

    /// Primary 0xa (3 records from term 5), backup 0xb (7 records from term 9).
    fn sb() -> SplitBrain {
        SplitBrain {
            common: 10,
            primary: suffix(0xa, 3, 5),
            backup: suffix(0xb, 7, 9),
        }
    }

    #[test]
    fn each_policy_names_its_loser() {
        use SplitBrainPolicy::*;
        let none = [0, 0];
        assert_eq!(
            decide_split_brain(Disconnect, &sb(), none),
            Verdict::StayApart
        );
        // The backup became primary later (term 9): its writes go.
        assert_eq!(
            decide_split_brain(DiscardYoungerPrimary, &sb(), none),
            Verdict::DiscardBackup
        );
        // The primary has fewer records: its writes go.
        assert_eq!(
            decide_split_brain(DiscardLeastChanges, &sb(), none),
            Verdict::DiscardPrimary
        );
        // A tie in changes falls back to the younger primary.
        let mut tie = sb();
        tie.primary.records = 7;
        assert_eq!(
            decide_split_brain(DiscardLeastChanges, &tie, none),
            Verdict::DiscardBackup
        );
        assert_eq!(
            decide_split_brain(DiscardNode(0xa), &sb(), none),
            Verdict::DiscardPrimary
        );
        assert_eq!(
            decide_split_brain(DiscardNode(0xb), &sb(), none),
            Verdict::DiscardBackup
        );
        // A node that is neither: stay apart.
        assert_eq!(
            decide_split_brain(DiscardNode(0xc), &sb(), none),
            Verdict::StayApart
        );
    }

    #[test]
    fn an_operators_choice_wins_and_two_different_choices_stay_apart() {
        use SplitBrainPolicy::*;
        for policy in [Disconnect, DiscardYoungerPrimary, DiscardNode(0xb)] {
            assert_eq!(
                decide_split_brain(policy, &sb(), [0, 0xa]),
                Verdict::DiscardPrimary
            );
            assert_eq!(
                decide_split_brain(policy, &sb(), [0xa, 0xa]),
                Verdict::DiscardPrimary
            );
            assert_eq!(
                decide_split_brain(policy, &sb(), [0xa, 0xb]),
                Verdict::StayApart
            );
        }
        // A name that is neither node is no choice.
        assert_eq!(
            decide_split_brain(Disconnect, &sb(), [0xc, 0]),
            Verdict::StayApart
        );
    }

    #[test]
    fn the_verdict_survives_the_role_swap_it_causes() {
        // After `DiscardPrimary` the two nodes swap roles; the next handshake must name the
        // same loser.
        use SplitBrainPolicy::*;
        let swapped = SplitBrain {
            common: 10,
            primary: sb().backup,
            backup: sb().primary,
        };
        for policy in [DiscardYoungerPrimary, DiscardLeastChanges, DiscardNode(0xa)] {
            let loser = |s: &SplitBrain, v: Verdict| match v {
                Verdict::DiscardPrimary => s.primary.node_id,
                Verdict::DiscardBackup => s.backup.node_id,
                Verdict::StayApart => 0,
            };
            let before = loser(&sb(), decide_split_brain(policy, &sb(), [0, 0]));
            let after = loser(&swapped, decide_split_brain(policy, &swapped, [0, 0]));
            assert_eq!(before, after, "{policy:?}");
        }
    }

    fn view(node_id: u64, entries: &[(u64, u64)], last_seq: u64, alone_from: u64) -> LogView {
        let history = TermHistory::from_entries(
            entries
                .iter()
                .map(|&(term, first_seq)| crate::term::TermEntry { term, first_seq })
                .collect(),
        )
        .unwrap();
        LogView {
            current_term: entries.last().map_or(0, |e| e.0),
            history,
            last_seq,
            first_seq: Some(1),
            alone_from,
            node_id,
            resync_from: 0,
            initial_sync: false,
        }
    }

    #[test]
    fn a_split_brain_needs_writes_completed_on_the_side_that_would_lose_them() {
        // Both go past seq 10; the backup's suffix (term 3) was completed alone.
        let p = view(0xa, &[(1, 1), (5, 11)], 14, 11);
        let b = view(0xb, &[(1, 1), (3, 11)], 17, 11);
        match reconcile(&p, &b) {
            Err(Unreconcilable::SplitBrain(sb)) => {
                assert_eq!(sb.common, 10);
                assert_eq!((sb.primary.records, sb.backup.records), (4, 7));
                assert_eq!((sb.primary.first_term, sb.backup.first_term), (5, 3));
            }
            other => panic!("{other:?}"),
        }
        // Resolved against the backup, it discards as in any repair.
        let plan = reconcile_resolving(&p, &b, true).unwrap();
        assert!(plan.backup_discards);
        // Nothing completed on the backup's side (an unacknowledged tail): no split brain.
        let b = view(0xb, &[(1, 1), (3, 11)], 17, 0);
        assert!(reconcile(&p, &b).unwrap().backup_discards);
        // A mark at or below the common point still counts while the log goes past it: the
        // stretch it starts may run on past the common point (the safe side).
        let b = view(0xb, &[(1, 1), (3, 11)], 17, 9);
        assert!(matches!(
            reconcile(&p, &b),
            Err(Unreconcilable::SplitBrain(_))
        ));
        // A newer suffix with nothing completed alone is discarded all the same: it was
        // completed nowhere.
        // (The primary's term is above: it won a split brain, or was promoted since.)
        let b = view(0xb, &[(1, 1), (9, 11)], 17, 0);
        let p10 = LogView {
            current_term: 10,
            ..p.clone()
        };
        assert!(reconcile(&p10, &b).unwrap().backup_discards);
        // Logs that differ from their first record diverge after seq 0.
        let p0 = view(0xa, &[(5, 1)], 4, 0);
        let b0 = view(0xb, &[(3, 1)], 6, 0);
        let plan = reconcile(&p0, &b0).unwrap();
        assert_eq!((plan.common, plan.backup_discards), (0, true));
        // No suffix, no split brain: the backup's records are replayed into the primary.
        let b = view(0xb, &[(1, 1)], 10, 9);
        assert!(!reconcile(&p, &b).unwrap().backup_discards);
    }
}
