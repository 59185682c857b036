//! The executor's deferred checkpoint against a cut of the log.

use mirror_exec::{Executor, MemoryRegion, NoHooks, Role};
use mirror_proto::{
    Action, ChunkGeometry, CoreConfig, FencedPolicy, Payload, PeerLossPolicy, Record,
    SplitBrainPolicy, MIN_CHUNK_SIZE,
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
#[test]
fn a_checkpoint_asked_for_before_a_cut_records_no_apply_point_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = backup_cfg();
    let params = QueueParams {
        node_id: cfg.node_id,
        role: Role::Backup,
        region_size: REGION,
        capacity_bytes: 1 << 20,
    };
    let queue_path = dir.path().join("queue");
    let queue = PersistentQueue::create(&queue_path, &params, Durability::Process).unwrap();
    let geometry = ChunkGeometry::new(REGION, cfg.chunk_size).unwrap();
    let (bitmap, _) = DirtyBitmap::open_or_create(
        &dir.path().join("bitmap"),
        cfg.node_id,
        geometry,
        Durability::Process,
    )
    .unwrap();
    let region = MemoryRegion {
        written: vec![0; REGION as usize],
        durable: vec![0; REGION as usize],
        blank: true,
    };
    let mut exec =
        Executor::start(Role::Backup, cfg, queue, region, Box::new(bitmap), NoHooks).unwrap();
    let mut io = Vec::new();
    for seq in 1..=3 {
        let append = Action::Append {
            record: record(seq),
            recovery: false,
        };
        exec.execute(append, &mut io).unwrap();
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
