//! The executor against its storage: the deferred checkpoint against a cut of the log, and
//! the batches a `power` node writes (runs of appends, gathered applies).

use mirror_exec::{Executor, Io, MemoryRegion, NoHooks, Role};
use mirror_proto::{
    Action, ChunkGeometry, CoreConfig, FencedPolicy, Message, Payload, PeerId, PeerLossPolicy,
    Record, SplitBrainPolicy, MIN_CHUNK_SIZE,
};
use mirror_storage::{DirtyBitmap, Durability, PersistentQueue, QueueParams};

const REGION: u64 = 1 << 16;

fn backup_cfg() -> CoreConfig {
    CoreConfig {
        node_id: 2,
        region_size: REGION,
        queue_format_version: 1,
        on_peer_loss: PeerLossPolicy::Continue,
        on_fenced: FencedPolicy::Demote,
        after_split_brain: SplitBrainPolicy::Disconnect,
        ack_timeout_us: 1_000,
        handshake_timeout_us: 5_000,
        sync_queue_before_ack: false,
        max_write_len: 1024,
        queue_capacity: 1 << 20,
        // Checkpoints batch the applies: what this test is about.
        deferred_commit: true,
        chunk_size: MIN_CHUNK_SIZE,
        resync_rate: 0,
        initial_sync: false,
    }
}

fn record(seq: u64) -> Record {
    Record {
        seq,
        term: 1,
        offset: seq * 8,
        data: Payload::copy_from_slice(&seq.to_le_bytes()),
    }
}

/// A backup applied seqs 1..=3 and asked for a checkpoint of them; before the checkpoint ran,
/// a repair cut its log after seq 1 (seqs 2 and 3 were a divergent suffix: the primary's
/// records under those seqs are not applied here yet). The checkpoint must record seq 1, not
/// 3: an apply point past the cut would skip the primary's seqs 2 and 3 after a restart.
/// The backup's own append of `record(seq)`.
fn append(seq: u64) -> Action {
    Action::Append {
        record: record(seq),
        recovery: false,
    }
}

/// The backup's ack to the primary (peer 1).
fn ack(received_through: u64, applied_through: u64) -> Action {
    Action::Send {
        to: PeerId(1),
        msg: Message::Ack {
            received_through,
            applied_through,
        },
    }
}

/// A backup's executor on a queue of `durability` in `dir` and a region in memory that
/// gathers applies or not (as a `power` node's does); the queue file's path.
fn backup(
    dir: &std::path::Path,
    durability: Durability,
    gathers: bool,
) -> (Executor<MemoryRegion, NoHooks>, std::path::PathBuf) {
    let cfg = backup_cfg();
    let params = QueueParams {
        node_id: cfg.node_id,
        role: Role::Backup,
        region_size: REGION,
        capacity_bytes: 1 << 20,
    };
    let queue_path = dir.join("queue");
    let queue = PersistentQueue::create(&queue_path, &params, durability).unwrap();
    let geometry = ChunkGeometry::new(REGION, cfg.chunk_size).unwrap();
    let (bitmap, _) =
        DirtyBitmap::open_or_create(&dir.join("bitmap"), cfg.node_id, geometry, durability)
            .unwrap();
    let region = MemoryRegion {
        written: vec![0; REGION as usize],
        durable: vec![0; REGION as usize],
        blank: true,
        gathers,
    };
    let exec =
        Executor::start(Role::Backup, cfg, queue, region, Box::new(bitmap), NoHooks).unwrap();
    (exec, queue_path)
}

#[test]
fn a_checkpoint_asked_for_before_a_cut_records_no_apply_point_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut exec, queue_path) = backup(dir.path(), Durability::Process, false);
    let mut io = Vec::new();
    for seq in 1..=3 {
        exec.execute(append(seq), &mut io).unwrap();
        exec.execute(Action::Apply(record(seq)), &mut io).unwrap();
    }
    exec.execute(Action::CommitApplied { through: 3 }, &mut io)
        .unwrap();
    assert_eq!(exec.commit_pending(), Some(3), "deferred, not yet durable");

    exec.execute(Action::TruncateAfter { after: 1 }, &mut io)
        .unwrap();
    assert_eq!(exec.commit_pending(), Some(1), "clamped to the cut");
    assert!(exec.checkpoint(0).unwrap());
    assert_eq!(exec.durable().applied, 1);
    assert_eq!(exec.durable().last_seq, 1);
    assert_eq!(exec.queue.applied_through(), 1);

    // What a restart reads back.
    let Executor { queue, .. } = exec;
    drop(queue);
    let (mut reopened, _) = PersistentQueue::open(&queue_path, Durability::Process).unwrap();
    let replay = reopened.replay_state().unwrap();
    assert_eq!(replay.applied_through, 1);
    assert_eq!(replay.last_seq, 1);
}

fn applied_seqs_and_completions(io: &[Io]) -> Vec<(char, u64)> {
    io.iter()
        .filter_map(|i| match i {
            Io::Applied { seq, .. } => Some(('a', *seq)),
            Io::Complete(ticket) => Some(('c', *ticket)),
            Io::Send { .. } => Some(('s', 0)),
            _ => None,
        })
        .collect()
}

/// Gathered applies reach the region together, and what must follow them (their `Applied`, a
/// completion behind them) is held back until they do: at the batch's end, or before an
/// action of another kind.
#[test]
fn gathered_applies_hold_back_their_completions_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut exec, _) = backup(dir.path(), Durability::Process, true);
    let mut io = Vec::new();
    exec.execute(Action::Apply(record(1)), &mut io).unwrap();
    exec.execute(Action::Complete { ticket: 7 }, &mut io)
        .unwrap();
    exec.execute(Action::Apply(record(2)), &mut io).unwrap();
    assert!(io.is_empty(), "held back: {io:?}");
    assert_eq!(exec.region.written[8..16], [0; 8], "not written yet");
    exec.end_of_actions(&mut io).unwrap();
    assert_eq!(
        applied_seqs_and_completions(&io),
        vec![('a', 1), ('c', 7), ('a', 2)]
    );
    assert_eq!(exec.region.written[8..16], 1u64.to_le_bytes());
    assert_eq!(exec.region.written[16..24], 2u64.to_le_bytes());

    // Another kind of action writes them first.
    io.clear();
    exec.execute(Action::Apply(record(3)), &mut io).unwrap();
    exec.execute(Action::Complete { ticket: 8 }, &mut io)
        .unwrap();
    exec.execute(ack(3, 3), &mut io).unwrap();
    assert_eq!(
        applied_seqs_and_completions(&io),
        vec![('a', 3), ('c', 8), ('s', 0)]
    );
    assert_eq!(exec.region.written[24..32], 3u64.to_le_bytes());

    // Without gathering, a completion is handed over at once.
    let dir = tempfile::tempdir().unwrap();
    let (mut exec, _) = backup(dir.path(), Durability::Process, false);
    let mut io = Vec::new();
    exec.execute(Action::Apply(record(1)), &mut io).unwrap();
    exec.execute(Action::Complete { ticket: 7 }, &mut io)
        .unwrap();
    assert_eq!(applied_seqs_and_completions(&io), vec![('a', 1), ('c', 7)]);
}

/// Under `power` a batch's appends form one run of the queue: a send of a write continues
/// it, any other action (here the ack) and the batch's end write it first.
#[test]
fn a_batchs_appends_reach_the_queue_file_before_any_other_action() {
    let dir = tempfile::tempdir().unwrap();
    let (mut exec, queue_path) = backup(dir.path(), Durability::Power, false);
    let mut io = Vec::new();
    for seq in 1..=3 {
        exec.execute(append(seq), &mut io).unwrap();
        let write = Action::Send {
            to: PeerId(1),
            msg: Message::Write {
                seq,
                term: 1,
                offset: seq * 8,
                data: record(seq).data,
            },
        };
        exec.execute(write, &mut io).unwrap();
        assert!(
            exec.queue.append_run_open(),
            "a write's send continues the run"
        );
    }
    assert_eq!(records_in_file(&queue_path), 0, "the run holds them");
    exec.execute(ack(3, 0), &mut io).unwrap();
    assert!(!exec.queue.append_run_open(), "an ack ends it");
    assert_eq!(records_in_file(&queue_path), 3, "written before the ack");

    exec.execute(append(4), &mut io).unwrap();
    assert!(exec.queue.append_run_open());
    assert_eq!(records_in_file(&queue_path), 3);
    exec.end_of_actions(&mut io).unwrap();
    assert!(!exec.queue.append_run_open(), "the batch's end ends it");
    assert_eq!(
        records_in_file(&queue_path),
        4,
        "written at the batch's end"
    );
}

/// The records a process crash now would leave in the queue file at `path` (its bytes as the
/// page cache holds them, recovered from a copy so that the live queue is left alone).
fn records_in_file(path: &std::path::Path) -> u64 {
    let copy = path.with_extension("crash");
    std::fs::copy(path, &copy).unwrap();
    let (_, report) = PersistentQueue::open(&copy, Durability::Power).unwrap();
    std::fs::remove_file(&copy).unwrap();
    report.records
}
