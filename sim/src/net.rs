//! The simulated network: connections between the two nodes, carrying frames encoded with the
//! real wire codec. Either node may dial (a primary dials its peer), so two connections may be
//! up at once (two primaries dialing each other); each end is named by the node that holds it.
//!
//! Within a connection frames arrive in order, each after a delay (as over TCP or an RC queue
//! pair). A connection ends by a close from one side (frames already sent to the other side are
//! still delivered, then it learns of the close), by a cut (frames dropped, each side learns at
//! its own moment), or never on its own when one direction is blackholed (half-open): the
//! core's timeouts must notice. A broken transport (some seeds only) duplicates or swaps frames
//! within a connection; the core must notice that too.

use std::collections::VecDeque;
use std::fmt;

use bytes::BytesMut;
use mirror_proto::{Message, WireError};

/// One of the two simulated nodes, by identity: its role is its core's, and changes with
/// failovers, so nothing in the network or the checkers is named by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeName {
    /// The node that starts as the primary.
    A,
    /// The node that starts as the backup.
    B,
}

impl NodeName {
    /// Both nodes, in index order.
    pub const BOTH: [NodeName; 2] = [NodeName::A, NodeName::B];

    /// The other node.
    pub fn other(self) -> NodeName {
        match self {
            NodeName::A => NodeName::B,
            NodeName::B => NodeName::A,
        }
    }

    /// Its index in per-node arrays.
    pub fn index(self) -> usize {
        match self {
            NodeName::A => 0,
            NodeName::B => 1,
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeName::A => "A",
            NodeName::B => "B",
        })
    }
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Direction {
    /// Frames in flight: (step at which they arrive, bytes).
    frames: VecDeque<(u64, Vec<u8>)>,
    /// Bytes received and not yet decoded into messages.
    rx: BytesMut,
    /// Frames sent this way are silently lost (half-open or partitioned).
    blackholed: bool,
    /// The sender closed: after the frames in flight, the receiver learns of it at this step.
    closed_at: Option<u64>,
}

/// A connection between the two nodes.
#[derive(Debug)]
pub struct Connection {
    /// Connection number (frames of one connection never reach another).
    pub id: u64,
    /// Directions toward node A (index 0) and toward node B (index 1).
    toward: [Direction; 2],
    /// Whether each end still considers the connection open.
    open: [bool; 2],
}

/// What happened to an end on one delivery pass.
#[derive(Debug)]
pub enum Delivery {
    /// A decoded message.
    Message(Message),
    /// The peer closed or the connection broke: call `on_disconnected`.
    Disconnected,
    /// The bytes did not decode (a broken transport can cause it): the end must drop the
    /// connection, as the real node does on a decode error.
    Garbage(WireError),
}

impl Connection {
    /// A new connection, open at both ends.
    pub fn new(id: u64) -> Connection {
        Connection {
            id,
            toward: [Direction::default(), Direction::default()],
            open: [true, true],
        }
    }

    /// Whether `end` still considers the connection open.
    pub fn is_open(&self, end: NodeName) -> bool {
        self.open[end.index()]
    }

    /// Whether both ends are done with it (it can be forgotten).
    pub fn is_finished(&self) -> bool {
        !self.open[0] && !self.open[1]
    }

    /// Sends `frame` from `from`; it arrives at `at_step` (not before earlier frames).
    pub fn send(&mut self, from: NodeName, frame: Vec<u8>, at_step: u64) {
        if !self.open[from.index()] {
            return;
        }
        let d = &mut self.toward[from.other().index()];
        if d.blackholed || d.closed_at.is_some() {
            return;
        }
        let at = d.frames.back().map_or(at_step, |(t, _)| at_step.max(*t));
        d.frames.push_back((at, frame));
    }

    /// `from` closes its end: the other end gets the frames in flight, then learns of the
    /// close `delay` steps after the last of them.
    pub fn close(&mut self, from: NodeName, now: u64, delay: u64) {
        if !self.open[from.index()] {
            return;
        }
        self.open[from.index()] = false;
        let toward_me = &mut self.toward[from.index()];
        toward_me.frames.clear();
        let toward_peer = &mut self.toward[from.other().index()];
        let last = toward_peer.frames.back().map_or(now, |(t, _)| *t);
        toward_peer.closed_at = Some(last.max(now) + delay);
    }

    /// The connection breaks (a reset, a dead host's peer timing out...): frames are lost and
    /// each end learns of it at its own step: `delays` are A's and B's, in steps.
    pub fn cut(&mut self, now: u64, delays: [u64; 2]) {
        for (end, delay) in NodeName::BOTH.into_iter().zip(delays) {
            let d = &mut self.toward[end.index()];
            d.frames.clear();
            if self.open[end.index()] {
                d.closed_at = Some(now + delay);
            }
        }
    }

    /// Frames toward `to` are silently lost from now on (until the connection ends).
    pub fn blackhole(&mut self, to: NodeName) {
        let d = &mut self.toward[to.index()];
        d.blackholed = true;
        d.frames.clear();
    }

    /// Duplicates or swaps frames in flight toward `to` (a broken transport). Returns whether
    /// it changed anything.
    pub fn mangle(&mut self, to: NodeName, duplicate: bool) -> bool {
        let d = &mut self.toward[to.index()];
        if d.frames.len() < 2 {
            return false;
        }
        if duplicate {
            let (t, f) = d.frames[0].clone();
            d.frames.insert(1, (t, f));
        } else {
            let (t0, t1) = (d.frames[0].0, d.frames[1].0);
            d.frames.swap(0, 1);
            d.frames[0].0 = t0;
            d.frames[1].0 = t1;
        }
        true
    }

    /// Everything due at `now` for `to`, in order: messages, then possibly the disconnect.
    pub fn deliver(&mut self, to: NodeName, now: u64, out: &mut Vec<Delivery>) {
        if !self.open[to.index()] {
            return;
        }
        let d = &mut self.toward[to.index()];
        while d.frames.front().is_some_and(|(t, _)| *t <= now) {
            let (_, f) = d.frames.pop_front().expect("checked");
            d.rx.extend_from_slice(&f);
        }
        loop {
            match Message::decode(&mut d.rx) {
                Ok(Some(m)) => out.push(Delivery::Message(m)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Delivery::Garbage(e));
                    d.rx.clear();
                    break;
                }
            }
        }
        if d.frames.is_empty() && d.closed_at.is_some_and(|t| t <= now) {
            self.open[to.index()] = false;
            out.push(Delivery::Disconnected);
        }
    }
}

/// Encodes `msg` into one frame.
pub fn frame(msg: &Message) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(msg.encoded_len());
    msg.encode(&mut b);
    b.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(n: u64) -> Vec<u8> {
        frame(&Message::Ack {
            received_through: n,
            applied_through: 0,
        })
    }

    fn messages(c: &mut Connection, to: NodeName, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        c.deliver(to, now, &mut out);
        out.iter().map(|d| format!("{d:?}")).collect()
    }

    #[test]
    fn frames_arrive_in_order_after_their_delay_then_the_close() {
        let mut c = Connection::new(1);
        c.send(NodeName::A, ack(1), 5);
        c.send(NodeName::A, ack(2), 2); // cannot overtake the first
        c.close(NodeName::A, 3, 4);
        assert!(messages(&mut c, NodeName::B, 4).is_empty());
        let got = messages(&mut c, NodeName::B, 5);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(c.is_open(NodeName::B));
        assert_eq!(messages(&mut c, NodeName::B, 9), ["Disconnected"]);
        assert!(c.is_finished());
    }

    #[test]
    fn a_blackholed_direction_loses_frames_silently() {
        let mut c = Connection::new(1);
        c.blackhole(NodeName::B);
        c.send(NodeName::A, ack(1), 0);
        assert!(messages(&mut c, NodeName::B, 100).is_empty());
        assert!(c.is_open(NodeName::B));
    }
}
