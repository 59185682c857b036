//! Terms and log matching end to end, with real processes on loopback: a primary that lost the
//! unsynced tail of its queue (as a power loss would), restarted with its backup unreachable,
//! writes degraded at the seqs it lost; the backup comes back holding the old records there.
//! Before terms, both sides then announced the same last seq and the regions stayed different
//! for good; now the backup saves its divergent suffix, repairs its byte ranges from the
//! primary and takes the primary's records.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use mirror_storage::{list_discarded, read_discarded, Durability, PersistentQueue};

/// Drops every record after `seq` from a stopped node's queue, as a power loss drops what was
/// not synced (the queue's own truncation: the records vanish durably, nothing else changes).
fn cut_queue_after(queue: &Path, seq: u64) {
    let (mut q, _) = PersistentQueue::open(queue, Durability::Process).unwrap();
    q.truncate_after(seq).unwrap();
}

/// Starts a pair, writes until `min_completed` writes completed, then SIGKILLs the primary
/// and stops the backup. Returns the seq of the last write whose completion was recorded
/// (first run: write id `i` has seq `i + 1`).
fn run_then_kill(pair: &Pair, min_completed: u64) -> u64 {
    let mut backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 16);
    primary.wait_until("writes", Duration::from_secs(60), |p| {
        p.num("progress", "completed") >= min_completed
    });
    primary.kill9();
    let st = backup.stop();
    assert!(st.success(), "backup exit {st}\n{}", tail(&backup.log));
    let completed = read_completions(&pair.path("completions"));
    completed.iter().max().copied().expect("completions") + 1
}

fn terms_pair(dir: &Path) -> Pair {
    let mut pair = Pair::new(dir, "continue");
    pair.extra = vec!["--set".into(), "durability=power".into()];
    pair
}

#[test]
fn a_primary_that_lost_its_tail_and_wrote_degraded_converges_and_keeps_every_completed_write() {
    // The window (writes in flight that the backup acknowledged) is a matter of timing:
    // try a few times until the backup holds records past the primary's cut.
    for attempt in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let pair = terms_pair(dir.path());
        let last_completed = run_then_kill(&pair, 2_000);
        let b_last = mirror::node::inspect(&pair.path("backup.queue"))
            .unwrap()
            .last_seq;
        if b_last <= last_completed {
            eprintln!("attempt {attempt}: the backup holds nothing past the cut; again");
            continue;
        }
        // The primary's records after its last completed write were not durable: cut them.
        cut_queue_after(&pair.path("primary.queue"), last_completed);
        // Restarted with the backup unreachable: degraded writes at the lost seqs.
        let mut primary = Node::spawn(
            "primary",
            &pair.primary_args(10_000_000, 0, 4),
            &pair.path("primary-1.log"),
        );
        primary.wait_until("degraded writes", Duration::from_secs(60), |p| {
            p.get("progress", "degraded").as_deref() == Some("1")
                && p.num("progress", "completed") >= 300
        });
        // The backup returns: it saves its divergent suffix and repairs it.
        let backup = pair.start_backup(1);
        primary.wait_until("synchronous again", Duration::from_secs(60), |p| {
            p.get("progress", "degraded").as_deref() == Some("0")
        });
        let files = list_discarded(&pair.path("backup.queue")).unwrap();
        assert_eq!(files.len(), 1, "one divergent suffix saved: {files:?}");
        let saved = read_discarded(&files[0]).unwrap();
        assert_eq!(saved.common_seq, last_completed);
        assert_eq!(
            saved.records.first().map(|r| r.seq),
            Some(last_completed + 1)
        );
        assert_eq!(
            saved.records.last().map(|r| r.seq),
            Some(b_last),
            "every divergent record saved"
        );
        // `mirror status` lists it.
        let (st, out, _) = run(&["status", pair.path("backup.queue").to_str().unwrap()]);
        assert!(st.success() && out.contains("discarded-after-"), "{out}");
        finish_and_verify(&pair, primary, Some(backup), 1);
        return;
    }
    panic!("in 5 attempts the backup never held a record past the primary's last completed write");
}

#[test]
fn both_nodes_lose_different_tails_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let pair = terms_pair(dir.path());
    let last_completed = run_then_kill(&pair, 2_000);
    // The backup loses records it had not yet applied (a power loss of its unsynced tail:
    // never acknowledged), the primary the records after its last completed write.
    let b = mirror::node::inspect(&pair.path("backup.queue")).unwrap();
    let b_cut = b.applied_through.max(b.last_seq.saturating_sub(50));
    if b_cut < b.last_seq {
        cut_queue_after(&pair.path("backup.queue"), b_cut);
    }
    cut_queue_after(&pair.path("primary.queue"), last_completed);
    let mut primary = Node::spawn(
        "primary",
        &pair.primary_args(10_000_000, 0, 4),
        &pair.path("primary-1.log"),
    );
    primary.wait_until("degraded writes", Duration::from_secs(60), |p| {
        p.num("progress", "completed") >= 300
    });
    let backup = pair.start_backup(1);
    primary.wait_until("synchronous again", Duration::from_secs(60), |p| {
        p.get("progress", "degraded").as_deref() == Some("0")
    });
    finish_and_verify(&pair, primary, Some(backup), 1);
}

/// A peer whose Hello carries a term history that goes backwards is refused with a Reject
/// naming the problem, and the backup keeps serving.
#[test]
fn a_peer_with_a_backwards_term_history_is_refused_with_a_clear_reason() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use bytes::BytesMut;
    use mirror_proto::{Hello, Message, TermEntry, TermHistory, WireRole};

    let dir = tempfile::tempdir().unwrap();
    let pair = terms_pair(dir.path());
    let mut backup = pair.start_backup(0);
    let hello = Message::hello(Hello {
        role: WireRole::Primary,
        node_id: 77,
        peer_node_id: 0,
        region_size: pair.region_size,
        queue_format_version: mirror_storage::FORMAT_VERSION,
        applied_through: 0,
        last_seq: 20,
        first_seq: 1,
        queue_capacity: 1 << 20,
        silence_timeout_us: 0,
        alone_from: 0,
        discard_node: 0,
        resync_from: 0,
        initial_sync: false,
        region_blank: false,
        current_term: 9,
        term_history: TermHistory::from_entries(vec![
            TermEntry {
                term: 3,
                first_seq: 1,
            },
            TermEntry {
                term: 5,
                first_seq: 10,
            },
        ])
        .unwrap(),
    });
    let mut frame = BytesMut::new();
    hello.encode(&mut frame);
    // The second entry's term (5, at body offset 108 + 16: the entries follow the Hello's
    // fixed part of 108 bytes) becomes 2: backwards. Re-checksum the frame (header bytes 0..12,
    // then the body) so that only the history check can refuse it.
    frame[16 + 108 + 16] = 2;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..12]), &frame[16..]);
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut s = TcpStream::connect(&pair.addr).unwrap();
    s.write_all(&frame).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let mut buf = BytesMut::from(&reply[..]);
    match Message::decode(&mut buf) {
        Ok(Some(Message::Reject { reason, .. })) => assert!(
            reason.contains("term history") && reason.contains("backwards"),
            "{reason}"
        ),
        other => panic!("expected a Reject, got {other:?} from {reply:?}"),
    }
    // The backup is unharmed: a real pair still works.
    let mut primary = pair.start_primary(0, 300, 4);
    let st = primary.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", tail(&primary.log));
    assert!(backup.stop().success());
}

#[test]
fn a_backup_that_lost_its_unacknowledged_tail_takes_it_again_from_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let pair = terms_pair(dir.path());
    run_then_kill(&pair, 2_000);
    // The backup loses records it had not applied yet, as a power loss of its unsynced tail
    // would; the primary still holds every one of them (it trims only what the backup
    // applied) and resends them.
    let b = mirror::node::inspect(&pair.path("backup.queue")).unwrap();
    let b_cut = b.applied_through.max(b.last_seq.saturating_sub(50));
    if b_cut < b.last_seq {
        cut_queue_after(&pair.path("backup.queue"), b_cut);
    }
    let mut primary = Node::spawn(
        "primary",
        &pair.primary_args(10_000_000, 0, 4),
        &pair.path("primary-1.log"),
    );
    let backup = pair.start_backup(1);
    primary.wait_until("synchronous writes", Duration::from_secs(60), |p| {
        p.get("progress", "degraded").as_deref() == Some("0")
            && p.num("progress", "completed") >= 300
    });
    assert!(
        list_discarded(&pair.path("backup.queue"))
            .unwrap()
            .is_empty(),
        "a backup that only lost records discards nothing"
    );
    finish_and_verify(&pair, primary, Some(backup), 1);
}
