//! The send batch under a network that never takes all of it: bounded, every byte arrives once
//! and in order, sealed or not, and the bytes not taken yet stay in place until the next push.

use mirror_proto::auth::{Credentials, Handshake, Secret, Session, Side, NONCE_LEN};
use mirror_proto::wire::Message;
use mirror_proto::Payload;

use super::{FrameReader, SendBatch, SEND_COMPACT_MIN};

/// Both ends of an authenticated session, from a real challenge-response.
fn session_pair() -> (Session, Session) {
    let creds = |node_id| Credentials {
        secrets: vec![Secret::new(vec![0x5a; 32]).unwrap()],
        node_id,
        bound_peer: 0,
    };
    let mut i = Handshake::new(Side::Initiator, creds(1), [1; NONCE_LEN]).unwrap();
    let mut r = Handshake::new(Side::Responder, creds(2), [2; NONCE_LEN]).unwrap();
    while !(i.is_done() && r.is_done()) {
        r.receive(&i.take_output()).unwrap();
        i.receive(&r.take_output()).unwrap();
    }
    (i.into_session().unwrap(), r.into_session().unwrap())
}

/// Streams `writes` writes of `size` bytes through a batch whose network takes an odd number of bytes
/// short of everything each time (the batch is never empty again), feeding what it took to a
/// reader. Returns the batch's largest capacity and the writes the reader decoded.
fn stream_never_drained(sealed: bool, size: usize, writes: u64) -> (usize, Vec<(u64, u8)>) {
    let mut tx = SendBatch::with_capacity(256 << 10);
    let mut rx = FrameReader::with_capacity(256 << 10);
    if sealed {
        let (a, b) = session_pair();
        tx.seal_with(a.sealer);
        rx.open_with(b.opener, &[]);
    }
    let mut decoded = Vec::new();
    let mut largest = 0;
    // Flushes close the open record first; taking without closing it too leaves one open
    // behind what the network takes, as frames encoded between two flushes are.
    let mut take = |tx: &mut SendBatch, rx: &mut FrameReader, leave: usize, close: bool| {
        if close {
            tx.close_record();
        }
        let n = tx.unsent().len().saturating_sub(leave);
        rx.raw().extend_from_slice(&tx.unsent()[..n]);
        // The bytes left stay in place (the RDMA transport posts inline sends from them
        // between advances); only a push may move them.
        let rest = tx.unsent()[n..].as_ptr();
        tx.advance(n);
        assert_eq!(tx.unsent().as_ptr(), rest, "advance moved the unsent bytes");
        while let Some(m) = rx.next().unwrap() {
            match m {
                Message::Write { seq, data, .. } => decoded.push((seq, data[0])),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    for seq in 1..=writes {
        let data = Payload::from(vec![seq as u8; size]);
        tx.push_write(seq, 1, seq * size as u64, &data, data.crc())
            .unwrap();
        largest = largest.max(tx.buf.capacity());
        if seq % 64 == 0 {
            take(
                &mut tx,
                &mut rx,
                1 + (seq as usize % 7) * 1000,
                seq % 128 == 0,
            );
        }
    }
    take(&mut tx, &mut rx, 0, true);
    assert!(tx.settle(), "everything was taken at the end");
    (largest, decoded)
}

#[test]
fn a_batch_the_network_never_empties_stays_bounded_and_delivers_every_write_once_in_order() {
    // 4 KiB writes close a sealed record each; 100-byte ones leave one open across takes.
    for (sealed, size) in [(false, 4096), (true, 4096), (true, 100)] {
        // 64 MiB (16 MiB of small ones): without compaction the batch would hold all of it.
        let writes = if size >= 4096 { 16 * 1024 } else { 160 * 1024 };
        let (largest, decoded) = stream_never_drained(sealed, size, writes);
        assert!(
            largest <= 8 * SEND_COMPACT_MIN,
            "sealed {sealed}, {size} B: the batch grew to {largest} bytes"
        );
        let expected: Vec<(u64, u8)> = (1..=writes).map(|s| (s, s as u8)).collect();
        assert!(
            decoded == expected,
            "sealed {sealed}, {size} B: writes lost, repeated or reordered"
        );
    }
}
