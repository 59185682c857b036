//! Result codes: 0 is success, failures are negative numbers in their own range (-1001 ...), so
//! they never collide with errno values or with a caller's own codes. Each says whose fault it
//! is. Every `MirrorError` and `ConfigError` variant maps to exactly one code here (the match is
//! exhaustive, so a new variant does not compile until it has one).

use std::ffi::{c_char, c_int};

use mirror_proto::{DemoteError, PromoteError};
use mirror_storage::StorageError;

use crate::error::{ConfigError, MirrorError};

/// Success.
pub const MIRROR_OK: c_int = 0;
/// Caller error: a NULL or misaligned pointer, an unusable length, a `mirror_stats.size` too
/// small, or a string that is not UTF-8 where a key was expected.
pub const MIRROR_EINVAL: c_int = -1001;
/// Configuration: the key is not known (the message names it).
pub const MIRROR_EKEY: c_int = -1002;
/// Configuration: the value cannot be used for its key (the message names the key and why).
pub const MIRROR_EVALUE: c_int = -1003;
/// Configuration: a required key is not set (the message names it).
pub const MIRROR_EMISSING: c_int = -1004;
/// Environment: the queue or region file cannot be used (I/O error, damaged, another region
/// size, created for the other role). The message names the file.
pub const MIRROR_ESTORAGE: c_int = -1005;
/// Environment: the queue or region file is held by another open node (this or another process).
pub const MIRROR_EBUSY: c_int = -1006;
/// Environment: an operating-system call outside the files failed (listening socket, thread).
pub const MIRROR_EIO: c_int = -1007;
/// Caller error: the offset and length are outside the region, or the write is empty or longer
/// than `max_write`.
pub const MIRROR_ERANGE: c_int = -1008;
/// Caller error: the call needs the other role (writes go to the primary; only a backup listens).
pub const MIRROR_EROLE: c_int = -1009;
/// Caller error: the ticket was never issued by this node.
pub const MIRROR_ETICKET: c_int = -1010;
/// The wait ended before the write completed. The write stays pending and may still complete:
/// wait again.
pub const MIRROR_ETIMEDOUT: c_int = -1011;
/// The node is closing.
pub const MIRROR_ECLOSED: c_int = -1012;
/// The node stopped: continuing could lose data, or the peer is incompatible (e.g. another region
/// size). Every later call on the handle fails the same way; close it. The message says why.
pub const MIRROR_EFAILED: c_int = -1013;
/// The build or the machine lacks the requested feature (e.g. `transport=rdma`).
pub const MIRROR_EUNSUPPORTED: c_int = -1014;
/// A bug in libmirror: a panic was caught at the boundary. The handle may only be closed.
pub const MIRROR_EPANIC: c_int = -1015;
/// This node was a primary and a newer primary exists (a failover happened, or it was reopened
/// as a primary after one): its pending and later writes fail with this. Start it as a backup
/// (or `mirror_demote` it) to rejoin; promote it again only after that. The message says which
/// term superseded it.
pub const MIRROR_EFENCED: c_int = -1016;
/// `mirror_promote` refused: this backup is connected to a live primary. Demote that primary
/// first, or force the promotion (which fences it).
pub const MIRROR_EPEERALIVE: c_int = -1017;
/// Not ready: `mirror_promote` (or `mirror_open` as a primary) refused a backup not caught up
/// with what it acknowledged (a repair or a resync into it is unfinished; retry once its phase
/// is synchronous), or `mirror_verify` could not run (not a primary with a synchronous backup,
/// a transfer already running) or ended early.
pub const MIRROR_ENOTREADY: c_int = -1018;
/// `mirror_events_next`: no event is waiting now (poll the subscription's descriptor).
pub const MIRROR_EAGAIN: c_int = -1019;

/// Kinds of `struct mirror_event` (`mirror_events_next`): a connection to the peer is
/// established (`peer_node_id`, `detail` = its address).
pub const MIRROR_EVENT_CONNECTED: c_int = 1;
/// The connection to the peer ended (`detail` = why).
pub const MIRROR_EVENT_PEER_LOST: c_int = 2;
/// A primary took a write without its backup (`on_peer_loss = continue`).
pub const MIRROR_EVENT_DEGRADED: c_int = 3;
/// A catch-up began (`records` and `bytes` to go).
pub const MIRROR_EVENT_RECOVERING: c_int = 4;
/// The pair mirrors synchronously.
pub const MIRROR_EVENT_SYNCHRONOUS: c_int = 5;
/// This node became the primary (`term`).
pub const MIRROR_EVENT_PROMOTED: c_int = 6;
/// This node became a backup.
pub const MIRROR_EVENT_DEMOTED: c_int = 7;
/// A newer primary fenced this one (`detail` = why, and what to do).
pub const MIRROR_EVENT_FENCED: c_int = 8;
/// A split brain (`detail` = what was found or decided; with ` saved to <path>` when this
/// node's writes were discarded).
pub const MIRROR_EVENT_SPLIT_BRAIN: c_int = 9;
/// The node stopped (`detail` = why).
pub const MIRROR_EVENT_FAILED: c_int = 10;
/// This subscriber fell behind: `lost` events were dropped before the next one.
pub const MIRROR_EVENT_LOST: c_int = 11;
/// A primary's queue filled while its backup was away: its records went into the dirty-chunk
/// bitmap and writes go on (`records` folded; `lost` = chunks dirty now).
pub const MIRROR_EVENT_BITMAP_FALLBACK: c_int = 12;
/// A resync, initial sync or online verify began (`records` = chunks to go through; `detail`
/// = `resync`, `initial-sync`, `verify` or `verify-repair`).
pub const MIRROR_EVENT_TRANSFER_STARTED: c_int = 13;
/// A resync, initial sync or online verify ended (`records` = chunks compared, `lost` = chunks
/// that differed or were brought over, `bytes` = chunk bytes sent; `detail` = the kind, and
/// why it ended early if it did).
pub const MIRROR_EVENT_TRANSFER_FINISHED: c_int = 14;
/// A resync, initial sync or online verify goes on, at most once a second (`records` = chunks
/// to go through, `lost` = chunks done, `bytes` = bytes of region left; `detail` = the kind).
pub const MIRROR_EVENT_TRANSFER_PROGRESS: c_int = 15;

/// `mirror_stats.transfer_kind`: no resync or verify is running.
pub const MIRROR_TRANSFER_NONE: c_int = 0;
/// `mirror_stats.transfer_kind`: a resync of the dirty chunks (after an outage longer than the
/// queue).
pub const MIRROR_TRANSFER_RESYNC: c_int = 1;
/// `mirror_stats.transfer_kind`: an initial sync (every chunk compared, differing ones sent).
pub const MIRROR_TRANSFER_INITIAL_SYNC: c_int = 2;
/// `mirror_stats.transfer_kind`: an online verify.
pub const MIRROR_TRANSFER_VERIFY: c_int = 3;
/// `mirror_stats.transfer_kind`: an online verify that repairs.
pub const MIRROR_TRANSFER_VERIFY_REPAIR: c_int = 4;

/// Role of a node in `mirror_stats.role`.
pub const MIRROR_ROLE_PRIMARY: c_int = 1;
/// Role of a node in `mirror_stats.role`.
pub const MIRROR_ROLE_BACKUP: c_int = 2;

/// Phase in `mirror_stats.phase`: no connection to the peer.
pub const MIRROR_PHASE_DISCONNECTED: c_int = 0;
/// Phase in `mirror_stats.phase`: the nodes are exchanging Hellos.
pub const MIRROR_PHASE_HANDSHAKING: c_int = 1;
/// Phase in `mirror_stats.phase`: the nodes are replaying what the other missed.
pub const MIRROR_PHASE_RECOVERING: c_int = 2;
/// Phase in `mirror_stats.phase`: writes are mirrored synchronously.
pub const MIRROR_PHASE_SYNCHRONOUS: c_int = 3;
/// Phase in `mirror_stats.phase`: the node stopped (calls return `MIRROR_EFAILED`).
pub const MIRROR_PHASE_FAILED: c_int = 4;
/// Phase in `mirror_stats.phase`: a primary brings the chunks its backup lacks over (after an
/// outage longer than the queue, or an initial sync); writes go on meanwhile.
pub const MIRROR_PHASE_RESYNCING: c_int = 5;

/// Every result code with its fixed description, in numeric order (`mirror_strerror`).
const DESCRIPTIONS: &[(c_int, &std::ffi::CStr)] = &[
    (MIRROR_OK, c"success"),
    (
        MIRROR_EINVAL,
        c"invalid argument (NULL or misaligned pointer, bad length or size)",
    ),
    (MIRROR_EKEY, c"unknown configuration key"),
    (MIRROR_EVALUE, c"bad configuration value"),
    (MIRROR_EMISSING, c"required configuration key not set"),
    (MIRROR_ESTORAGE, c"queue or region file cannot be used"),
    (
        MIRROR_EBUSY,
        c"queue or region file is held by another open node",
    ),
    (MIRROR_EIO, c"operating-system error"),
    (
        MIRROR_ERANGE,
        c"offset or length outside the region, or bad write length",
    ),
    (MIRROR_EROLE, c"operation needs the other role"),
    (MIRROR_ETICKET, c"ticket was never issued"),
    (MIRROR_ETIMEDOUT, c"timed out; the write is still pending"),
    (MIRROR_ECLOSED, c"node is closing"),
    (MIRROR_EFAILED, c"node failed"),
    (
        MIRROR_EUNSUPPORTED,
        c"not supported by this build or machine",
    ),
    (MIRROR_EPANIC, c"libmirror internal error (a bug)"),
    (
        MIRROR_EFENCED,
        c"fenced: a newer primary exists; this node takes no writes as a primary",
    ),
    (
        MIRROR_EPEERALIVE,
        c"promotion refused: connected to a live primary (force fences it)",
    ),
    (
        MIRROR_ENOTREADY,
        c"not ready: a promotion of a node not caught up (a repair or resync unfinished), or an online verify that cannot run or ended early",
    ),
    (MIRROR_EAGAIN, c"no event waiting; poll the descriptor"),
];

/// The description of `code`; a fixed string for codes libmirror does not define.
pub(crate) fn describe(code: c_int) -> *const c_char {
    DESCRIPTIONS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(c"unknown libmirror result code", |(_, d)| d)
        .as_ptr()
}

/// The code of a configuration error.
pub(crate) fn config_code(e: &ConfigError) -> c_int {
    match e {
        ConfigError::UnknownKey { .. } => MIRROR_EKEY,
        ConfigError::BadValue { .. } => MIRROR_EVALUE,
        ConfigError::Missing { .. } => MIRROR_EMISSING,
        // Not reachable through the C API (no TOML there), mapped for completeness.
        ConfigError::Toml { .. } => MIRROR_EVALUE,
        // The `mirror` tool's flags: not reachable through the C API either.
        ConfigError::CommandLine { .. } => MIRROR_EVALUE,
        ConfigError::File { inner, .. } => config_code(inner),
    }
}

/// The code of an engine error.
pub(crate) fn code_of(e: &MirrorError) -> c_int {
    match e {
        MirrorError::Config(c) => config_code(c),
        MirrorError::Storage(s) => match s {
            StorageError::Locked { .. } => MIRROR_EBUSY,
            StorageError::OutOfRange { .. } => MIRROR_ERANGE,
            _ => MIRROR_ESTORAGE,
        },
        MirrorError::Io { .. } => MIRROR_EIO,
        MirrorError::InvalidWrite(_) => MIRROR_ERANGE,
        MirrorError::WrongRole { .. } => MIRROR_EROLE,
        MirrorError::UnknownTicket { .. } => MIRROR_ETICKET,
        MirrorError::Timeout => MIRROR_ETIMEDOUT,
        MirrorError::Closed => MIRROR_ECLOSED,
        MirrorError::Failed { .. } => MIRROR_EFAILED,
        MirrorError::Unsupported(_) => MIRROR_EUNSUPPORTED,
        MirrorError::Verify(_) => MIRROR_ENOTREADY,
        MirrorError::Fenced { .. } => MIRROR_EFENCED,
        MirrorError::Promote(p) => match p {
            PromoteError::AlreadyPrimary { .. } => MIRROR_EROLE,
            PromoteError::PeerAlive { .. } => MIRROR_EPEERALIVE,
            PromoteError::NotCaughtUp { .. } => MIRROR_ENOTREADY,
            PromoteError::Failed => MIRROR_EFAILED,
            _ => MIRROR_EFAILED,
        },
        MirrorError::Demote(d) => match d {
            DemoteError::AlreadyBackup => MIRROR_EROLE,
            _ => MIRROR_EFAILED,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn codes_are_distinct_negative_and_described() {
        let codes: Vec<c_int> = DESCRIPTIONS.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes[0], MIRROR_OK);
        for (i, c) in codes.iter().enumerate().skip(1) {
            assert!((-1999..=-1001).contains(c), "{c} outside the range");
            assert_eq!(*c, -1000 - i as c_int, "codes are consecutive, in order");
        }
        // SAFETY: `describe` returns pointers to static NUL-terminated strings.
        let unknown = unsafe { CStr::from_ptr(describe(42)) };
        assert_eq!(unknown.to_str().unwrap(), "unknown libmirror result code");
        // SAFETY: as above.
        let e = unsafe { CStr::from_ptr(describe(MIRROR_ETIMEDOUT)) };
        assert!(e.to_str().unwrap().contains("timed out"));
    }

    #[test]
    fn every_error_maps_to_its_code() {
        let key = ConfigError::UnknownKey { key: "x".into() };
        assert_eq!(config_code(&key), MIRROR_EKEY);
        let file = ConfigError::File {
            path: "/x".into(),
            inner: Box::new(ConfigError::Missing { key: "role" }),
        };
        assert_eq!(config_code(&file), MIRROR_EMISSING);
        assert_eq!(code_of(&MirrorError::Timeout), MIRROR_ETIMEDOUT);
        assert_eq!(code_of(&MirrorError::Closed), MIRROR_ECLOSED);
        let locked = StorageError::Locked { path: "/q".into() };
        assert_eq!(code_of(&MirrorError::Storage(locked)), MIRROR_EBUSY);
        let range = StorageError::OutOfRange {
            offset: 1,
            len: 1,
            size: 1,
        };
        assert_eq!(code_of(&MirrorError::Storage(range)), MIRROR_ERANGE);
        let failed = MirrorError::Failed { reason: "r".into() };
        assert_eq!(code_of(&failed), MIRROR_EFAILED);
    }
}
