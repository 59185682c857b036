//! The node's event stream: what changed (connected, peer lost, degraded, recovering,
//! synchronous, promoted, demoted, fenced, split brain, failed), in order, pushed by the poller
//! to every subscriber's own bounded queue. A subscriber that falls behind never blocks the
//! node: once its queue is full, newer events are counted, not kept, and it reads a
//! [`Event::Lost`] marker with the count before the events that follow.
//!
//! Each subscription has an eventfd that is readable exactly while events are waiting, so a C
//! program can `poll(2)` or `epoll` it from any thread; nothing is ever called back from the
//! library's threads.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::transport::EventFd;

/// Events a subscriber's queue holds before it counts the rest as lost.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;

/// One thing that changed on the node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A connection to the peer is established and its handshake begins.
    Connected {
        /// The peer's node id (0 while not yet known).
        peer_node_id: u64,
        /// Its address.
        peer_address: String,
    },
    /// The connection to the peer ended.
    PeerLost {
        /// Why.
        reason: String,
    },
    /// A primary took a write without its backup (`on_peer_loss = continue`).
    Degraded,
    /// A catch-up began: what the peer is missing is being sent.
    Recovering {
        /// Records to go.
        records: u64,
        /// Their payload bytes.
        bytes: u64,
    },
    /// The pair mirrors synchronously.
    Synchronous,
    /// This node became the primary.
    Promoted {
        /// Its term.
        term: u64,
    },
    /// This node became a backup.
    Demoted,
    /// A newer primary fenced this one: its writes are refused.
    Fenced {
        /// Why, in words that say what to do.
        reason: String,
    },
    /// A handshake found a split brain.
    SplitBrain {
        /// What was found (and, once resolved, what was decided).
        description: String,
        /// Where discarded writes were saved, if this node discarded any.
        discarded: Option<PathBuf>,
    },
    /// The node stopped.
    Failed {
        /// Why.
        reason: String,
    },
    /// A primary's queue filled while its backup was away: its records went into the
    /// dirty-chunk bitmap, and writes go on (published at the first fold of an outage).
    BitmapFallback {
        /// Records folded.
        records: u64,
        /// Chunks dirty now.
        dirty_chunks: u64,
    },
    /// A resync, initial sync or online verify began.
    TransferStarted {
        /// `resync`, `initial-sync`, `verify` or `verify-repair`.
        kind: &'static str,
        /// Chunks to go through.
        chunks: u64,
    },
    /// A resync, initial sync or online verify goes on (at most one a second).
    TransferProgress {
        /// What it is.
        kind: &'static str,
        /// Chunks to go through.
        chunks_total: u64,
        /// Chunks done.
        chunks_done: u64,
        /// Bytes of region still to go through.
        bytes_left: u64,
    },
    /// A resync, initial sync or online verify ended.
    TransferFinished {
        /// What it was.
        kind: &'static str,
        /// Chunks compared.
        chunks_compared: u64,
        /// Chunks that differed (a verify) or were brought over (a resync).
        chunks_differing: u64,
        /// Chunk bytes sent.
        bytes_sent: u64,
        /// Why it ended early (None: complete).
        abandoned: Option<String>,
    },
    /// This subscriber fell behind: this many events were dropped before the next one.
    Lost {
        /// How many.
        count: u64,
    },
}

/// An event with its place in the node's stream and its time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRecord {
    /// Position in the node's stream (from 1; a gap is what a [`Event::Lost`] marker counted).
    pub seq: u64,
    /// Wall-clock time, microseconds since the Unix epoch.
    pub unix_us: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// The poller's side: every subscription's queue.
#[derive(Debug, Default)]
pub(crate) struct EventBus {
    subscribers: Mutex<Vec<Weak<Queue>>>,
    next_seq: Mutex<u64>,
}

#[derive(Debug)]
struct Queue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
    /// Readable while `inner` holds an event or a lost count.
    fd: EventFd,
}

#[derive(Debug, Default)]
struct QueueInner {
    events: VecDeque<EventRecord>,
    lost: u64,
    /// The node closed: nothing more will come.
    closed: bool,
}

impl EventBus {
    /// A new subscription: it sees every event published from now on.
    pub(crate) fn subscribe(&self) -> std::io::Result<Events> {
        let fd = EventFd::new()?;
        let queue = Arc::new(Queue {
            inner: Mutex::new(QueueInner::default()),
            ready: Condvar::new(),
            fd,
        });
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&queue));
        Ok(Events { queue })
    }

    /// Hands `event` to every subscriber (never blocks on one: a full queue counts it lost).
    pub(crate) fn publish(&self, event: Event) {
        let seq = {
            let mut n = lock(&self.next_seq);
            *n += 1;
            *n
        };
        let unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let record = EventRecord {
            seq,
            unix_us,
            event,
        };
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        for q in subs.iter().filter_map(Weak::upgrade) {
            let mut inner = lock(&q.inner);
            if inner.events.len() >= EVENT_QUEUE_CAPACITY {
                inner.lost += 1;
            } else {
                inner.events.push_back(record.clone());
            }
            q.fd.signal();
            drop(inner);
            q.ready.notify_all();
        }
    }

    /// The node closed: subscribers read what is left, then the end.
    pub(crate) fn close(&self) {
        for q in lock(&self.subscribers).iter().filter_map(Weak::upgrade) {
            lock(&q.inner).closed = true;
            q.fd.signal();
            q.ready.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic elsewhere while holding the lock leaves nothing half-done here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A subscription to a node's events ([`crate::Mirror::events`]): an iterator that blocks
/// for the next one, plus non-blocking and timed takes and a descriptor to poll. It ends
/// (`None`) once the node has closed and everything before was read.
#[derive(Debug)]
pub struct Events {
    queue: Arc<Queue>,
}

/// What a take found.
enum Taken {
    Event(EventRecord),
    Empty,
    Ended,
}

impl Events {
    fn take_one(&self, inner: &mut QueueInner) -> Taken {
        let taken = if inner.lost > 0 {
            let count = std::mem::take(&mut inner.lost);
            let seq = inner.events.front().map_or(0, |e| e.seq.saturating_sub(1));
            Taken::Event(EventRecord {
                seq,
                unix_us: inner.events.front().map_or(0, |e| e.unix_us),
                event: Event::Lost { count },
            })
        } else if let Some(e) = inner.events.pop_front() {
            Taken::Event(e)
        } else if inner.closed {
            Taken::Ended
        } else {
            Taken::Empty
        };
        if inner.events.is_empty() && inner.lost == 0 && !inner.closed {
            self.queue.fd.drain();
        }
        taken
    }

    /// The next event if one is waiting (never blocks).
    pub fn try_next(&self) -> Option<EventRecord> {
        match self.take_one(&mut lock(&self.queue.inner)) {
            Taken::Event(e) => Some(e),
            Taken::Empty | Taken::Ended => None,
        }
    }

    /// The next event, waiting at most `timeout` (`None` on timeout or once the stream ended).
    pub fn next_timeout(&self, timeout: Duration) -> Option<EventRecord> {
        self.wait_next(Some(Instant::now() + timeout))
    }

    /// The next event, waiting until `deadline` (forever without one).
    fn wait_next(&self, deadline: Option<Instant>) -> Option<EventRecord> {
        let mut inner = lock(&self.queue.inner);
        loop {
            match self.take_one(&mut inner) {
                Taken::Event(e) => return Some(e),
                Taken::Ended => return None,
                Taken::Empty => {}
            }
            inner = match deadline {
                None => self
                    .queue
                    .ready
                    .wait(inner)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.queue
                        .ready
                        .wait_timeout(inner, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Whether the node has closed and every event was read.
    pub fn ended(&self) -> bool {
        let inner = lock(&self.queue.inner);
        inner.closed && inner.events.is_empty() && inner.lost == 0
    }

    /// A descriptor that is readable while an event is waiting (or the stream has ended):
    /// for `poll(2)`/`epoll`. Read events with [`Events::try_next`], not from the descriptor.
    pub fn fd(&self) -> RawFd {
        self.queue.fd.as_raw_fd()
    }
}

impl Iterator for Events {
    type Item = EventRecord;

    /// Blocks until the next event; `None` once the node closed and everything was read.
    fn next(&mut self) -> Option<EventRecord> {
        self.wait_next(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn events_arrive_in_order_and_the_fd_is_readable_exactly_while_some_wait() {
        let bus = EventBus::default();
        let sub = bus.subscribe().unwrap();
        assert!(!readable(sub.fd()));
        bus.publish(Event::Degraded);
        bus.publish(Event::Synchronous);
        assert!(readable(sub.fd()));
        let a = sub.try_next().unwrap();
        assert_eq!((a.seq, a.event), (1, Event::Degraded));
        assert!(readable(sub.fd()));
        assert_eq!(sub.try_next().unwrap().event, Event::Synchronous);
        assert!(!readable(sub.fd()));
        assert!(sub.try_next().is_none());
    }

    #[test]
    fn a_reader_that_falls_behind_gets_a_lost_marker_and_never_blocks_the_publisher() {
        let bus = EventBus::default();
        let slow = bus.subscribe().unwrap();
        let t = Instant::now();
        for _ in 0..EVENT_QUEUE_CAPACITY + 10 {
            bus.publish(Event::Degraded);
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        let first = slow.try_next().unwrap();
        assert_eq!(first.event, Event::Lost { count: 10 });
        let mut n = 0;
        while slow.try_next().is_some() {
            n += 1;
        }
        assert_eq!(n, EVENT_QUEUE_CAPACITY);
        // A dropped subscription is forgotten.
        drop(slow);
        bus.publish(Event::Synchronous);
        assert!(lock(&bus.subscribers).is_empty());
    }

    #[test]
    fn the_stream_ends_after_close_once_everything_was_read() {
        let bus = EventBus::default();
        let mut sub = bus.subscribe().unwrap();
        bus.publish(Event::Demoted);
        bus.close();
        assert!(readable(sub.fd()));
        assert_eq!(sub.next().unwrap().event, Event::Demoted);
        assert!(sub.next().is_none());
        assert!(sub.ended());
        let waiter = bus.subscribe().unwrap();
        let t = std::thread::spawn(move || waiter.next_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        bus.publish(Event::Synchronous);
        assert_eq!(t.join().unwrap().unwrap().event, Event::Synchronous);
    }
}
