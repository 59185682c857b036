//! The one conversion from what a queue recovered ([`ReplayState`]) to what the protocol core
//! starts from ([`Recovered`]): used by the node and by the simulator, so both start their core
//! from the same view of the same files.

use bytes::Bytes;
use mirror_proto::{Record, Recovered};

use crate::ReplayState;

impl From<ReplayState> for Recovered {
    fn from(replay: ReplayState) -> Self {
        Recovered {
            peer_node_id: replay.peer_node_id,
            applied_through: replay.applied_through,
            first_seq: replay.first_seq,
            last_seq: replay.last_seq,
            unapplied: replay
                .unapplied
                .into_iter()
                .map(|r| Record {
                    seq: r.seq,
                    term: r.term,
                    offset: r.offset,
                    data: Bytes::from(r.payload),
                })
                .collect(),
            current_term: replay.current_term,
            term_history: replay.term_history,
        }
    }
}
