//! The event stream, end to end: a scripted outage, recovery and failover on a live pair, and
//! the events each node reports, in order.

use std::time::{Duration, Instant};

use mirror::{Event, EventRecord, Events, Phase};

mod common;
use common::{failover_node, free_port};

/// The two addresses of a test pair: node `a` starts as the primary, `b` as the backup, both
/// under `on_peer_loss = continue`.
struct Addresses {
    a: String,
    b: String,
}

impl Addresses {
    fn new() -> Self {
        Addresses {
            a: format!("127.0.0.1:{}", free_port()),
            b: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// Opens node `name` ("a" or "b") with its files in `dir`.
    fn node(&self, dir: &std::path::Path, name: &str) -> mirror::Mirror {
        let opts = [("on_peer_loss", "continue")];
        match name {
            "a" => failover_node(dir, "a", "primary", &self.a, &self.b, &opts),
            _ => failover_node(dir, "b", "backup", &self.b, &self.a, &opts),
        }
    }
}

/// Every event that arrives within `quiet` of the previous one.
fn drain(events: &Events, quiet: Duration) -> Vec<EventRecord> {
    let mut out = Vec::new();
    while let Some(e) = events.next_timeout(quiet) {
        out.push(e);
    }
    out
}

/// Takes events until one matches `want`; returns what came before it too (for messages).
fn wait_for(events: &Events, what: &str, want: impl Fn(&Event) -> bool) -> Vec<EventRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.next_timeout(left) {
            Some(e) => {
                let hit = want(&e.event);
                seen.push(e);
                if hit {
                    return seen;
                }
            }
            None => panic!("no {what} event; saw {seen:?}"),
        }
    }
}

fn kinds(events: &[EventRecord]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e.event {
            Event::Connected { .. } => "connected",
            Event::PeerLost { .. } => "peer_lost",
            Event::Degraded => "degraded",
            Event::Recovering { .. } => "recovering",
            Event::Synchronous => "synchronous",
            Event::Promoted { .. } => "promoted",
            Event::Demoted => "demoted",
            Event::Fenced { .. } => "fenced",
            Event::SplitBrain { .. } => "split_brain",
            Event::Failed { .. } => "failed",
            Event::Lost { .. } => "lost",
            _ => "other",
        })
        .collect()
}

/// `want` appears in `got` in this order (other events may come between).
fn assert_in_order(got: &[EventRecord], want: &[&str]) {
    let k = kinds(got);
    let mut it = k.iter();
    for w in want {
        assert!(it.any(|g| g == w), "expected {want:?} in order, got {k:?}");
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs not increasing: {seqs:?}"
    );
}

#[test]
fn an_outage_a_recovery_and_a_failover_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Addresses::new();
    let b = pair.node(dir.path(), "b");
    let a = pair.node(dir.path(), "a");
    let a_events = a.events().unwrap();
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let b_events = b.events().unwrap();
    let before = drain(&a_events, Duration::from_millis(200));
    // Subscribed after open: it may have missed the first connection, never the synchronous.
    assert!(
        kinds(&before).contains(&"synchronous") || a.stats().phase == Phase::Synchronous,
        "{before:?}"
    );

    // 1. The backup goes away; the primary writes on alone.
    b.close().unwrap();
    drop(b);
    let got = wait_for(&a_events, "peer lost", |e| {
        matches!(e, Event::PeerLost { .. })
    });
    assert_in_order(&got, &["peer_lost"]);
    for i in 0..5u64 {
        a.write(i * 64, &[i as u8; 64]).unwrap();
    }
    let got = wait_for(&a_events, "degraded", |e| matches!(e, Event::Degraded));
    assert_in_order(&got, &["degraded"]);

    // 2. It returns: connected, recovering exactly the 5 missed writes, synchronous.
    let b = pair.node(dir.path(), "b");
    let got = wait_for(&a_events, "synchronous", |e| {
        matches!(e, Event::Synchronous)
    });
    assert_in_order(&got, &["connected", "recovering", "synchronous"]);
    let recovering = got
        .iter()
        .find_map(|e| match e.event {
            Event::Recovering { records, bytes } => Some((records, bytes)),
            _ => None,
        })
        .unwrap();
    assert_eq!(recovering, (5, 5 * 64), "{got:?}");

    // 3. A failover: A demoted live, B promoted; each says so, and they mirror again.
    let b_events_2 = b.events().unwrap();
    drop(b_events);
    a.demote().unwrap();
    let got = wait_for(&a_events, "demoted", |e| matches!(e, Event::Demoted));
    assert_in_order(&got, &["demoted"]);
    // B sees its primary go (a promotion while it is connected to a live one is refused).
    let got = wait_for(&b_events_2, "peer lost", |e| {
        matches!(e, Event::PeerLost { .. })
    });
    assert_in_order(&got, &["peer_lost"]);
    let term = b.promote(false).unwrap();
    let got = wait_for(&b_events_2, "synchronous", |e| {
        matches!(e, Event::Synchronous)
    });
    assert_in_order(&got, &["promoted", "connected", "synchronous"]);
    assert!(got.iter().any(|e| e.event == Event::Promoted { term }));
    let got = wait_for(&a_events, "synchronous", |e| {
        matches!(e, Event::Synchronous)
    });
    assert_in_order(&got, &["connected", "synchronous"]);

    // 4. Closing ends the stream after what is left.
    a.close().unwrap();
    let rest = drain(&a_events, Duration::from_millis(100));
    let _ = rest;
    assert!(a_events.ended());
    b.close().unwrap();
}

#[test]
fn a_subscriber_that_never_reads_does_not_slow_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Addresses::new();
    let b = pair.node(dir.path(), "b");
    let a = pair.node(dir.path(), "a");
    let idle = a.events().unwrap();
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    // 600 outages: more events than a queue holds, none read.
    let mut b = Some(b);
    for round in 0..600u64 {
        if round % 2 == 0 {
            b.take().unwrap().close().unwrap();
            a.write(0, &round.to_le_bytes()).unwrap();
        } else {
            b = Some(pair.node(dir.path(), "b"));
            a.wait_synchronous(Duration::from_secs(20)).unwrap();
        }
    }
    let first = idle.try_next().unwrap();
    assert!(
        matches!(first.event, Event::Lost { count } if count > 0),
        "{first:?}"
    );
    drop(b);
}

/// A synchronous pair (backup "b", primary "a") in `dir`, and `mirror events` following the
/// primary, its output piped.
fn a_pair_followed_by_mirror_events(
    dir: &std::path::Path,
) -> (
    Addresses,
    mirror::Mirror,
    mirror::Mirror,
    std::process::Child,
) {
    let pair = Addresses::new();
    let b = pair.node(dir, "b");
    let a = pair.node(dir, "a");
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let queue = dir.join("a.queue");
    let child = std::process::Command::new(common::BIN)
        .args(["events", &queue.to_string_lossy()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    (pair, b, a, child)
}

#[test]
fn mirror_events_follows_a_running_node_as_json_lines() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (pair, b, a, mut child) = a_pair_followed_by_mirror_events(dir.path());
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the follower time to subscribe, then an outage and a return.
    std::thread::sleep(Duration::from_millis(500));
    b.close().unwrap();
    a.write(0, b"alone").unwrap();
    drop(b);
    let _b = pair.node(dir.path(), "b");
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let mut names = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names.contains(&"synchronous".to_string()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("an event line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        names.push(v["event"].as_str().unwrap().to_string());
    }
    let want = [
        "peer_lost",
        "degraded",
        "connected",
        "recovering",
        "synchronous",
    ];
    let mut it = names.iter();
    for w in want {
        assert!(
            it.any(|n| n == w),
            "expected {want:?} in order, got {names:?}"
        );
    }
    // The node closes: the command ends by itself, successfully.
    a.close().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();
}

#[test]
fn mirror_events_ends_quietly_when_its_reader_goes_away() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (pair, b, a, mut child) = a_pair_followed_by_mirror_events(dir.path());
    // Give the follower time to subscribe, then an event to read (`mirror events | head -1`).
    std::thread::sleep(Duration::from_millis(500));
    b.close().unwrap();
    drop(b);
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"event\""), "{first}");
    // The reader is gone; the next events find no one to read them.
    let _b = pair.node(dir.path(), "b");
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    a.close().unwrap();
}
