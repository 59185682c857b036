//! The credit arithmetic without an RDMA device: two peers exchange frames of random sizes
//! through each other's ring under random interleavings of flushes, polls and deliveries, with
//! the verbs replaced by in-memory queues (a reliable-connected QP delivers a side's work
//! requests in order, each once), and the connection's rules taken from `credit.rs` itself.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::super::verbs::RECV_DEPTH;
use super::super::RING_BYTES;
use super::*;

/// The byte at stream position `i` of the stream side `side` sends (so that the receiver can
/// check every byte it copies out, and an overwritten unread byte shows).
fn pattern(side: usize, i: u64) -> u8 {
    let x = (i ^ (i >> 7) ^ ((side as u64) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// A work request on its way to the peer.
#[derive(Debug, Clone)]
enum Wr {
    /// A credit record into the peer's credit slot.
    Credit([u64; 3]),
    /// Data into the peer's ring; `staged` when it was copied to the staging area (not inline).
    Data {
        pos: u64,
        bytes: Vec<u8>,
        staged: bool,
    },
}

/// One side of the connection: `RdmaConnection`'s counters and rules, the verbs replaced by
/// queues. Its send queue entries are retired when the peer receives them (the real one retires
/// them at a signalled completion, later, which only makes its room smaller).
#[derive(Debug)]
struct Peer {
    side: usize,
    send: SendCredits,
    recv: RecvCredits,
    sq_depth: usize,
    max_inline: u64,
    /// Bytes queued to send and not written yet.
    pending: u64,
    /// Posted, not yet arrived at the peer (in order).
    in_flight: VecDeque<Wr>,
    /// Every credit record that landed in our slot, oldest first.
    slot: Vec<[u64; 3]>,
    /// Our receive ring, its length and receive depth.
    ring: Vec<u8>,
    depth: u64,
    /// Bytes that landed in the ring (the NIC's count) and bytes copied out (the model's own).
    landed: u64,
    drained: u64,
    /// Receives posted and not used by an arrival.
    posted_recvs: u64,
    /// Receive completions not polled yet: their immediates.
    cq: VecDeque<u32>,
}

impl Peer {
    fn new(side: usize, ring: u64, depth: u64, peer_ring: u64, peer_depth: u64) -> Peer {
        Peer {
            side,
            send: SendCredits::new(peer_ring, peer_depth),
            recv: RecvCredits::new(ring, depth),
            sq_depth: 3,
            max_inline: 0,
            pending: 0,
            in_flight: VecDeque::new(),
            slot: Vec::new(),
            ring: vec![0; ring as usize],
            depth,
            landed: 0,
            drained: 0,
            posted_recvs: depth,
            cq: VecDeque::new(),
        }
    }

    fn sq_room(&self) -> usize {
        self.sq_depth - self.in_flight.len()
    }

    /// The slot as a read sees it: word `i` from the record `tear[i]` places back from the
    /// latest (a read racing writes that land one after the other), zeros before any landed.
    fn read_slot(&self, tear: [usize; 3]) -> [u64; 3] {
        let mut words = [0; 3];
        for (i, w) in words.iter_mut().enumerate() {
            if let Some(idx) = self.slot.len().checked_sub(1 + tear[i]) {
                *w = self.slot[idx][i];
            } else if let Some(first) = self.slot.first() {
                *w = first[i];
            }
        }
        words
    }

    /// `RdmaConnection::read_credits`.
    fn read_credits(&mut self, tear: [usize; 3]) -> Result<(), TestCaseError> {
        let words = self.read_slot(tear);
        if let Some(c) = Credit::decode(words) {
            let latest = self.slot.last().copied().unwrap_or_default();
            prop_assert!(
                self.slot.contains(&c.encode()),
                "accepted {c:?} that was never sent; slot history ends {latest:?}"
            );
            self.send
                .accept(c)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        Ok(())
    }

    /// `RdmaConnection::flush` (its reap retires nothing here: arrivals already did).
    fn flush(&mut self, tear: [usize; 3]) -> Result<(), TestCaseError> {
        if self.pending == 0 {
            return Ok(());
        }
        self.read_credits(tear)?;
        while self.pending > 0 {
            if self.send.blocked() || self.sq_room() < 3 {
                break;
            }
            if self.recv.piggyback_due() {
                let c = self.recv.report();
                self.in_flight.push_back(Wr::Credit(c.encode()));
            }
            for _ in 0..2 {
                let Some(w) = self.send.next_write(self.pending) else {
                    break;
                };
                prop_assert!(w.len >= 1 && w.len <= self.pending);
                let staged = w.len > self.max_inline;
                if staged {
                    // The staging area mirrors the peer's ring: the span must not be one an
                    // earlier write still reads.
                    for wr in &self.in_flight {
                        if let Wr::Data {
                            pos,
                            bytes,
                            staged: true,
                        } = wr
                        {
                            let end = pos + bytes.len() as u64;
                            prop_assert!(
                                w.pos + w.len <= *pos || end <= w.pos,
                                "staging [{}, {}) reused while a write of [{pos}, {end}) is in flight",
                                w.pos,
                                w.pos + w.len
                            );
                        }
                    }
                }
                let start = self.send.sent_bytes();
                let bytes = (0..w.len).map(|k| pattern(self.side, start + k)).collect();
                self.in_flight.push_back(Wr::Data {
                    pos: w.pos,
                    bytes,
                    staged,
                });
                self.pending -= w.len;
                self.send.wrote(w.len);
            }
        }
        Ok(())
    }

    /// The first half of `RdmaConnection::poll_recv`: absorb up to `batch` completions, re-post
    /// their receives, copy the bytes out of the ring (checking each).
    fn absorb_and_drain(&mut self, batch: usize) -> Result<(), TestCaseError> {
        let mut arrived = 0u64;
        while let Some(imm) = self.cq.pop_front() {
            self.recv
                .arrived(imm, imm)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            arrived += 1;
            if arrived as usize == batch {
                break;
            }
        }
        if arrived > 0 {
            self.posted_recvs += arrived;
            self.recv.reposted(arrived);
            let ring = self.ring.len() as u64;
            while let Some(chunk) = self.recv.next_chunk() {
                prop_assert_eq!(chunk.pos, self.drained % ring);
                prop_assert!(chunk.len >= 1 && chunk.pos + chunk.len <= ring);
                prop_assert!(
                    self.drained + chunk.len <= self.landed,
                    "read unwritten bytes"
                );
                for k in 0..chunk.len {
                    let got = self.ring[(chunk.pos + k) as usize];
                    let want = pattern(1 - self.side, self.drained + k);
                    prop_assert_eq!(got, want, "byte {} corrupted", self.drained + k);
                }
                self.drained += chunk.len;
                self.recv.consumed(chunk.len);
            }
        }
        Ok(())
    }

    /// The second half of `RdmaConnection::poll_recv`: `credit_if_overdue`.
    fn credit_if_overdue(&mut self) {
        if self.recv.overdue() && self.sq_room() > 0 {
            let c = self.recv.report();
            self.in_flight.push_back(Wr::Credit(c.encode()));
        }
    }

    fn poll(&mut self, batch: usize) -> Result<(), TestCaseError> {
        self.absorb_and_drain(batch)?;
        self.credit_if_overdue();
        Ok(())
    }
}

/// The NIC: up to `n` of `from`'s work requests arrive at `to`. Checks that a write never
/// lands without a posted receive, out of stream order, across the ring's end, or over bytes
/// `to` has not copied out yet.
fn deliver(from: &mut Peer, to: &mut Peer, n: usize) -> Result<usize, TestCaseError> {
    let mut done = 0;
    while done < n {
        let Some(wr) = from.in_flight.pop_front() else {
            break;
        };
        done += 1;
        match wr {
            Wr::Credit(words) => to.slot.push(words),
            Wr::Data { pos, bytes, .. } => {
                let ring = to.ring.len() as u64;
                let len = bytes.len() as u64;
                prop_assert!(to.posted_recvs > 0, "write with no receive posted");
                to.posted_recvs -= 1;
                prop_assert_eq!(pos, to.landed % ring, "write out of stream order");
                prop_assert!(len >= 1 && pos + len <= ring, "write across the ring's end");
                prop_assert!(
                    to.landed + len - to.drained <= ring,
                    "write of {} bytes over unread ones ({} unread in a ring of {})",
                    len,
                    to.landed - to.drained,
                    ring
                );
                to.ring[pos as usize..(pos + len) as usize].copy_from_slice(&bytes);
                to.landed += len;
                to.cq.push_back(len as u32);
            }
        }
    }
    Ok(done)
}

#[derive(Debug, Clone)]
enum Op {
    /// Side queues a frame of this many bytes.
    Push(usize, u64),
    /// Side flushes, reading its credit slot torn as given.
    Flush(usize, [usize; 3]),
    /// Side polls at most this many completions.
    Poll(usize, usize),
    /// Up to this many of side's work requests arrive at the other.
    Deliver(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let side = 0usize..2;
    let tear = prop_oneof![3 => Just([0, 0, 0]), 1 => [0usize..3, 0usize..3, 0usize..3]];
    prop_oneof![
        3 => (side.clone(), 1u64..=64).prop_map(|(s, n)| Op::Push(s, n)),
        1 => (side.clone(), 1u64..=4096).prop_map(|(s, n)| Op::Push(s, n)),
        3 => (side.clone(), tear).prop_map(|(s, t)| Op::Flush(s, t)),
        3 => (side.clone(), 1usize..=40).prop_map(|(s, b)| Op::Poll(s, b)),
        3 => (side, 1usize..=8).prop_map(|(s, n)| Op::Deliver(s, n)),
    ]
}

/// A receive depth: often a small one, so that writes run out before bytes do.
fn depth() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..=4, 1u64..=64]
}

/// How much a credit's counters grow from one record to the next: often a little (as between
/// credits that race a read), sometimes a lot.
fn step() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![(0u64..=64, 0u64..=4), (0u64..1 << 31, 0u64..1 << 20)]
}

/// Both peers, `a` and `b`, by side.
fn pair(peers: &mut [Peer; 2], side: usize) -> (&mut Peer, &mut Peer) {
    let [a, b] = peers;
    if side == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

/// The liveness rule: once everything `sender` wrote has been copied out by `receiver` and all
/// of `receiver`'s credits have landed, if `sender` is still held back by its credits (having
/// read the latest), then `receiver` owes it a credit on its own (a quarter or more
/// unreported), which its next poll sends.
fn owes_credit_when_stalled(
    side: usize,
    sender: &Peer,
    receiver: &Peer,
) -> Result<(), TestCaseError> {
    let quiet = receiver.drained == sender.send.sent_bytes()
        && !receiver
            .in_flight
            .iter()
            .any(|w| matches!(w, Wr::Credit(_)));
    if !quiet || sender.pending == 0 {
        return Ok(());
    }
    let mut view = sender.send.clone();
    if let Some(c) = sender.slot.last().and_then(|w| Credit::decode(*w)) {
        view.accept(c)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    if view.blocked() {
        prop_assert!(
            receiver.recv.overdue(),
            "side {side} is stalled (room {}, writes room {}) but side {} owes it no credit: {:?}",
            view.room(),
            view.writes_room(),
            1 - side,
            receiver.recv
        );
    }
    Ok(())
}

/// Everything queued has been copied out by the receiver, both ways.
fn finished(peers: &[Peer; 2]) -> bool {
    (0..2).all(|s| peers[s].pending == 0 && peers[1 - s].drained == peers[s].send.sent_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random frames through rings of random sizes (16 to 512 bytes, so that they wrap and
    /// fill often) and receive depths (1 to 64), under random interleavings: no write ever lands
    /// over unread bytes, without a posted receive, out of order or across the end; the staging
    /// area is never reused under a write in flight; no torn credit is taken; every byte arrives
    /// intact. Then a fair schedule (everything delivered, both sides poll and flush) must finish
    /// every frame, and whenever a sender is stalled by its credits with nothing in flight, the
    /// receiver must owe it a credit (a quarter or more unreported): never a deadlock.
    #[test]
    fn ring_and_credits_never_overrun_nor_deadlock(
        rings in (16u64..=512, 16u64..=512),
        depths in (depth(), depth()),
        sq_depths in (3usize..=8, 3usize..=8),
        inline in (0u64..=64, 0u64..=64),
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let mut peers = [
            Peer::new(0, rings.0, depths.0, rings.1, depths.1),
            Peer::new(1, rings.1, depths.1, rings.0, depths.0),
        ];
        peers[0].sq_depth = sq_depths.0;
        peers[1].sq_depth = sq_depths.1;
        peers[0].max_inline = inline.0;
        peers[1].max_inline = inline.1;

        for op in ops {
            match op {
                Op::Push(s, n) => peers[s].pending += n,
                Op::Flush(s, tear) => peers[s].flush(tear)?,
                Op::Poll(s, batch) => peers[s].poll(batch)?,
                Op::Deliver(s, n) => {
                    let (from, to) = pair(&mut peers, s);
                    deliver(from, to, n)?;
                }
            }
            for s in 0..2 {
                let (sender, receiver) = pair(&mut peers, s);
                owes_credit_when_stalled(s, sender, receiver)?;
            }
        }

        // The fair schedule. A round that moves no data byte leaves the state as it was (all
        // work requests are delivered, so the next round would do the same): a deadlock.
        let mut rounds = 0u64;
        while !finished(&peers) {
            rounds += 1;
            let before: u64 = peers.iter().map(|p| p.send.sent_bytes() + p.drained).sum();
            for s in 0..2 {
                let (from, to) = pair(&mut peers, s);
                deliver(from, to, usize::MAX)?;
            }
            for p in peers.iter_mut() {
                p.absorb_and_drain(usize::MAX)?;
            }
            for s in 0..2 {
                let (sender, receiver) = pair(&mut peers, s);
                owes_credit_when_stalled(s, sender, receiver)?;
            }
            for p in peers.iter_mut() {
                p.credit_if_overdue();
            }
            for s in 0..2 {
                let (from, to) = pair(&mut peers, s);
                deliver(from, to, usize::MAX)?;
            }
            for p in peers.iter_mut() {
                p.flush([0, 0, 0])?;
            }
            let after: u64 = peers.iter().map(|p| p.send.sent_bytes() + p.drained).sum();
            prop_assert!(
                after > before || finished(&peers),
                "deadlock after {rounds} fair rounds: {:#?}",
                peers
            );
        }
        for p in &peers {
            prop_assert_eq!(p.landed, p.drained);
            prop_assert!(p.posted_recvs <= p.depth);
        }
    }

    /// The check word: a record decodes to itself; a zeroed slot, or a record with any word
    /// changed, is refused; and a torn read (each word from one of three records, as when
    /// writes land one after the other during the read) is refused unless it equals the record
    /// its check word came from, for counters that grow by less than 2^32 between the records.
    #[test]
    fn check_word_rejects_torn_and_corrupt_credits(
        base in (0u64..u64::MAX / 2, 0u64..u64::from(u32::MAX) / 2),
        steps in proptest::collection::vec(step(), 2),
        flip in (0usize..3, 0u32..64),
    ) {
        let mut records = vec![Credit { bytes: base.0, writes: base.1 }];
        for (db, dw) in steps {
            let last = records[records.len() - 1];
            records.push(Credit { bytes: last.bytes + db, writes: last.writes + dw });
        }
        for r in &records {
            prop_assert_eq!(Credit::decode(r.encode()), Some(*r));
            let mut bad = r.encode();
            bad[flip.0] ^= 1 << flip.1;
            prop_assert_eq!(Credit::decode(bad), None);
        }
        prop_assert_eq!(Credit::decode([0; 3]), None);
        let words: Vec<[u64; 3]> = records.iter().map(|r| r.encode()).collect();
        for i in 0..3 {
            for j in 0..3 {
                for k in 0..3 {
                    let torn = [words[i][0], words[j][1], words[k][2]];
                    if let Some(c) = Credit::decode(torn) {
                        prop_assert_eq!(c, records[k], "torn read {:?} accepted", (i, j, k));
                    }
                }
            }
        }
    }

    /// The sender's writes tile the stream: each starts where the previous ended (modulo the
    /// ring), never crosses the end, stays within the room, and is cut short only by the end,
    /// the room or what is left to send.
    #[test]
    fn writes_tile_the_ring_and_split_only_at_the_end(
        ring in 1u64..=4096,
        depth in 1u64..=64,
        sizes in proptest::collection::vec(1u64..=10_000, 1..50),
    ) {
        let mut send = SendCredits::new(ring, depth);
        for left in sizes {
            let mut left = left;
            while let Some(w) = send.next_write(left) {
                let room = send.room();
                prop_assert_eq!(w.pos, send.sent_bytes() % ring);
                prop_assert!(w.len >= 1 && w.len <= left && w.len <= room);
                prop_assert!(w.pos + w.len <= ring);
                prop_assert!(w.len == left || w.len == room || w.pos + w.len == ring);
                send.wrote(w.len);
                left -= w.len;
            }
            // Out of room or of writes: the peer consumes everything and says so.
            let all = Credit { bytes: send.sent_bytes(), writes: send.sent_writes };
            send.accept(all).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(send.room(), ring);
        }
    }
}

/// The thresholds of the real ring and receive depth (docs/ARCHITECTURE.md): a credit rides
/// with data from 1/16 (256 KiB or 16 receives), goes on its own from 1/4 (1 MiB or 64).
#[test]
fn thresholds_of_the_real_ring() {
    let depth = u64::from(RECV_DEPTH);
    let owing = |bytes: u64, writes: u64| {
        let mut r = RecvCredits::new(RING_BYTES, depth);
        r.arrived_bytes = bytes;
        r.consumed(bytes);
        r.reposted(writes);
        r
    };
    assert!(!owing(256 * 1024 - 1, 15).piggyback_due());
    assert!(owing(256 * 1024, 0).piggyback_due());
    assert!(owing(0, 16).piggyback_due());
    assert!(!owing(1024 * 1024 - 1, 63).overdue());
    assert!(owing(1024 * 1024, 0).overdue());
    assert!(owing(0, 64).overdue());
    let mut r = owing(1024 * 1024, 64);
    assert_eq!(
        r.report(),
        Credit {
            bytes: 1024 * 1024,
            writes: 64
        }
    );
    assert!(!r.piggyback_due() && !r.overdue());
}

/// A credit for more than was sent is a peer error; an older one changes nothing.
#[test]
fn credits_beyond_what_was_sent_are_refused_and_old_ones_ignored() {
    let mut send = SendCredits::new(4096, 8);
    send.wrote(1000);
    send.wrote(1000);
    let err = send
        .accept(Credit {
            bytes: 2001,
            writes: 2,
        })
        .unwrap_err();
    assert!(err.to_string().contains("credit for 2001 bytes"), "{err}");
    assert!(send
        .accept(Credit {
            bytes: 1000,
            writes: 3,
        })
        .is_err());
    send.accept(Credit {
        bytes: 2000,
        writes: 2,
    })
    .unwrap();
    assert_eq!((send.room(), send.writes_room()), (4096, 8));
    send.wrote(10);
    send.accept(Credit {
        bytes: 1000,
        writes: 1,
    })
    .unwrap();
    assert_eq!((send.room(), send.writes_room()), (4086, 7));
}

/// The receiver refuses a write whose immediate is not its length, an empty one, and one that
/// overruns unread bytes.
#[test]
fn arrivals_that_break_the_ring_are_refused() {
    let mut r = RecvCredits::new(100, 4);
    assert!(r.arrived(10, 11).is_err());
    let mut r = RecvCredits::new(100, 4);
    assert!(r.arrived(0, 0).is_err());
    let mut r = RecvCredits::new(100, 4);
    r.arrived(60, 60).unwrap();
    r.consumed(20);
    r.arrived(60, 60).unwrap();
    assert!(r.arrived(1, 1).unwrap_err().to_string().contains("overran"));
}
