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

/// Vectored sends over real loopback TCP, a catch-up's (borrowed records, in groups larger than
/// one vectored write takes) and a pipelined primary's (owned payloads shared with the batch),
/// through a socket that fills (the rest of a write queued, later ones queued behind it, or
/// sent in place once it drained): every write arrives once, in order and intact.
#[test]
fn writes_sent_in_place_arrive_once_in_order_through_a_full_socket() {
    use super::tcp::TcpConnection;
    use super::{BorrowedWrite, Connection};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::net::TcpStream::connect(addr).unwrap();
    let (server, _) = listener.accept().unwrap();
    // Small socket buffers, so that the socket fills whatever the kernel's autotuning.
    socket2::SockRef::from(&client)
        .set_send_buffer_size(64 << 10)
        .unwrap();
    socket2::SockRef::from(&server)
        .set_recv_buffer_size(64 << 10)
        .unwrap();
    let mut tx = TcpConnection::new(client).unwrap();
    let mut rx = TcpConnection::new(server).unwrap();
    assert!(tx.sends_in_place());
    // About 24 MiB in 6000 writes of 1 byte to 8 KiB: more than the socket buffers hold.
    let payloads: Vec<Vec<u8>> = (0..6000u64)
        .map(|i| {
            let len = 1 + (i as usize * 7919) % 8192;
            (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
        })
        .collect();
    let crcs: Vec<u32> = payloads.iter().map(|p| crc32c::crc32c(p)).collect();
    let mut received = Vec::new();
    let mut inbox = Vec::new();
    let mut receive = |rx: &mut TcpConnection, received: &mut Vec<(u64, u64, Vec<u8>)>| {
        rx.poll_recv(&mut inbox, 512).unwrap();
        for m in inbox.drain(..) {
            match m {
                Message::Write {
                    seq, offset, data, ..
                } => received.push((seq, offset, data.to_vec())),
                Message::Applied { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let (mut next, mut group_no, mut queued_behind) = (0usize, 0usize, 0usize);
    while next < payloads.len() {
        // Groups of up to 700 writes: more than one vectored write takes (512).
        let n = (1 + group_no * 389 % 700).min(payloads.len() - next);
        let group: Vec<BorrowedWrite<'_>> = (next..next + n)
            .map(|i| BorrowedWrite {
                seq: i as u64 + 1,
                term: 1,
                offset: i as u64 * 8192,
                data: &payloads[i],
                data_crc: crcs[i],
            })
            .collect();
        if tx.pending_send_bytes() > 0 {
            queued_behind += 1;
        }
        if group_no % 3 == 2 {
            // As a pipelined primary sends: owned payloads (those of 2 KiB and more shared
            // with the batch, not copied), an ack-sized frame among them.
            tx.send(&Message::Applied { through: 0 }).unwrap();
            for w in &group {
                tx.send(&Message::Write {
                    seq: w.seq,
                    term: w.term,
                    offset: w.offset,
                    data: Payload::from(w.data.to_vec()),
                })
                .unwrap();
            }
        } else {
            tx.send_writes(&group).unwrap();
        }
        next += n;
        group_no += 1;
        // Every other group, the receiver lets the socket fill; then it drains some.
        if group_no % 2 == 0 {
            for _ in 0..4 {
                receive(&mut rx, &mut received);
                tx.flush().unwrap();
            }
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while received.len() < payloads.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not arrive"
        );
        tx.flush().unwrap();
        receive(&mut rx, &mut received);
    }
    assert!(
        queued_behind > 0,
        "the socket never filled: the queued path went untested"
    );
    assert_eq!(received.len(), payloads.len());
    for (i, (seq, offset, data)) in received.iter().enumerate() {
        assert_eq!(
            (*seq, *offset),
            (i as u64 + 1, i as u64 * 8192),
            "write {i} out of order"
        );
        assert!(data == &payloads[i], "write {i} altered");
    }
}

/// One step of [`shared_payloads_leave_in_order_however_the_network_takes_them`].
#[derive(Debug, Clone)]
enum BatchStep {
    /// A small frame (an ack), copied into the batch.
    Small,
    /// A write of this many bytes, copied.
    Copied(usize),
    /// A write of this many bytes, shared.
    Shared(usize),
    /// The network takes up to this many bytes (in slices of at most this many parts).
    Take(usize, usize),
}

fn batch_step() -> impl proptest::strategy::Strategy<Value = BatchStep> {
    use proptest::prelude::*;
    prop_oneof![
        Just(BatchStep::Small),
        (1usize..6000).prop_map(BatchStep::Copied),
        (1usize..9000).prop_map(BatchStep::Shared),
        (0usize..300_000, 2usize..9).prop_map(|(n, parts)| BatchStep::Take(n, parts)),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Whatever mix of copied and shared payloads, and however little the network takes each
    /// time (a vectored write cut anywhere, short of parts), the bytes leave exactly as the
    /// frames' encoding in order, `pending` counts what is left, and the batch empties.
    #[test]
    fn shared_payloads_leave_in_order_however_the_network_takes_them(
        steps in proptest::collection::vec(batch_step(), 1..400)
    ) {
        let mut tx = SendBatch::with_capacity(1 << 10);
        let mut expected = bytes::BytesMut::new();
        let mut taken: Vec<u8> = Vec::new();
        let mut seq = 0u64;
        let take = |tx: &mut SendBatch, taken: &mut Vec<u8>, n: usize, max_parts: usize| {
            let mut parts = Vec::new();
            if tx.has_shared() {
                tx.unsent_parts(max_parts, &mut parts);
            } else {
                parts.push(std::io::IoSlice::new(tx.unsent()));
            }
            let mut took = 0;
            for p in &parts {
                let k = (n - took).min(p.len());
                taken.extend_from_slice(&p[..k]);
                took += k;
                if took == n {
                    break;
                }
            }
            tx.advance(took);
        };
        for step in steps {
            match step {
                BatchStep::Small => {
                    let m = Message::Ack { received_through: seq, applied_through: seq };
                    m.encode(&mut expected);
                    tx.push(&m).unwrap();
                }
                BatchStep::Copied(len) | BatchStep::Shared(len) => {
                    seq += 1;
                    let data = Payload::from(vec![seq as u8; len]);
                    let m = Message::Write { seq, term: 1, offset: seq * 8192, data: data.clone() };
                    m.encode(&mut expected);
                    if matches!(step, BatchStep::Shared(_)) {
                        tx.push_write_shared(seq, 1, seq * 8192, &data).unwrap();
                    } else {
                        tx.push(&m).unwrap();
                    }
                }
                BatchStep::Take(n, parts) => take(&mut tx, &mut taken, n, parts),
            }
            proptest::prop_assert_eq!(tx.pending(), expected.len() - taken.len());
        }
        while tx.pending() > 0 {
            take(&mut tx, &mut taken, 7777, 5);
        }
        proptest::prop_assert!(tx.settle());
        proptest::prop_assert!(taken == expected[..], "the bytes taken differ from the frames");
    }
}
