//! Tests of the control endpoint: the wire format against docs/CONTROL.md, the server and the
//! client against each other, and each against a misbehaving peer.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::socket::{effective_uid, send_all};
use super::wire::{encode_request, encode_response, parse_request, parse_response};
use super::*;
use crate::ffi::{MIRROR_EINVAL, MIRROR_EIO, MIRROR_EPANIC};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node stand-in: answers status with a fixed snapshot, records every call, and refuses
/// (or panics on) the ops it is told to.
#[derive(Default)]
struct FakeNode {
    calls: Mutex<Vec<String>>,
    refusal: Option<ControlRefusal>,
    panic_on_demote: bool,
    bus: crate::node::events::EventBus,
}

impl FakeNode {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: String) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    fn outcome(&self) -> Result<(), ControlRefusal> {
        self.refusal.clone().map_or(Ok(()), Err)
    }
}

fn sample_status() -> LiveStatus {
    LiveStatus {
        node_id: 0x1234,
        role: "primary".into(),
        term: 7,
        phase: "synchronous".into(),
        peer_node_id: 0x5678,
        peer_address: Some("10.0.0.2:7000".into()),
        degraded: false,
        fenced: None,
        queue_records: 3,
        queue_bytes: 256,
        queue_capacity: 1024,
        next_seq: 42,
        applied_through: 41,
        acked_through: 41,
        writes_completed: 41,
        last_recovery_bytes: 4096,
        last_recovery_records: 2,
        recoveries: 1,
        split_brain: None,
        failure: Some("line one\nline two \u{e9}".into()),
        auth: "secret".into(),
        write_bytes: 0,
        write_latency_p50_us: None,
        write_latency_p99_us: None,
        dirty_chunks: 0,
        chunk_size: 65536,
        transfer: None,
        resync_target: false,
        verifies_finished: 0,
        last_verify: None,
    }
}

impl ControlTarget for FakeNode {
    fn live_status(&self) -> LiveStatus {
        self.record("status".into());
        sample_status()
    }

    fn promote(&self, force: bool) -> Result<Promoted, ControlRefusal> {
        self.record(format!("promote force={force}"));
        self.outcome().map(|()| Promoted {
            term: 8,
            forced: force,
        })
    }

    fn demote(&self) -> Result<(), ControlRefusal> {
        self.record("demote".into());
        if self.panic_on_demote {
            panic!("demote exploded");
        }
        self.outcome()
    }

    fn resolve(&self, discard: &str) -> Result<(), ControlRefusal> {
        self.record(format!("resolve {discard}"));
        self.outcome()
    }

    fn verify(&self, repair: bool) -> Result<(), ControlRefusal> {
        self.record(format!("verify repair={repair}"));
        self.outcome()
    }

    fn subscribe(&self) -> Result<crate::Events, ControlRefusal> {
        self.record("events".into());
        self.bus
            .subscribe()
            .map_err(|e| ControlRefusal::new(MIRROR_EIO, "io", e.to_string()))
    }
}

#[test]
fn events_are_followed_line_by_line_until_the_node_closes_while_requests_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (server, node) = start(dir.path(), FakeNode::default());
    let path = server.path().to_owned();
    let follower = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            follow_events(&path, CLIENT_TIMEOUT, |l| {
                lines.push(l.to_string());
                true
            })
            .map(|()| lines)
        })
    };
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while !node.calls().contains(&"events".to_string()) {
        assert!(Instant::now() < deadline, "the follower never subscribed");
        std::thread::sleep(Duration::from_millis(5));
    }
    node.bus.publish(crate::Event::Degraded);
    // The control thread still answers others while a follower streams.
    status(&path, CLIENT_TIMEOUT).unwrap();
    node.bus.publish(crate::Event::Recovering {
        records: 3,
        bytes: 300,
    });
    node.bus.publish(crate::Event::Synchronous);
    node.bus.close();
    let lines = follower.join().unwrap().unwrap();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["degraded", "recovering", "synchronous"],
        "{lines:?}"
    );
    assert_eq!(events[1]["records"], 3);
    assert_eq!(events[1]["bytes"], 300);
    assert!(events
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    drop(server);
}

#[test]
fn a_vanished_or_stalled_events_reader_never_blocks_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (server, node) = start(dir.path(), FakeNode::default());
    let path = server.path().to_owned();
    // Readers that ask for events and never read, and one that leaves at once.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"version\":1,\"op\":\"events\"}\n").unwrap();
        stalled.push(s);
    }
    let mut gone = UnixStream::connect(&path).unwrap();
    gone.write_all(b"{\"version\":1,\"op\":\"events\"}\n")
        .unwrap();
    drop(gone);
    // Far more than a queue holds, as fast as they come.
    let t = Instant::now();
    for _ in 0..5000 {
        node.bus.publish(crate::Event::Degraded);
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    // The endpoint answers as before.
    status(&path, CLIENT_TIMEOUT).unwrap();
    drop(stalled);
    drop(server);
}

fn start(dir: &Path, node: FakeNode) -> (ControlServer, Arc<FakeNode>) {
    let node = Arc::new(node);
    let target: Arc<dyn ControlTarget> = node.clone();
    let server = ControlServer::start(&dir.join("node.queue.ctl"), target)
        .expect("the control server starts");
    (server, node)
}

/// Sends raw bytes (the test's, not the client's), half-closes only if asked, and returns
/// everything the server sent before closing.
fn exchange_raw(path: &Path, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("read timeout");
    // The server may refuse and close before reading all of a long line; what it answered
    // is still readable.
    let _ = send_all(&stream, bytes);
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
    answer
}

/// The refusal in a raw answer, which must be exactly one line.
fn refusal_in(answer: &[u8]) -> ControlRefusal {
    assert_eq!(answer.last(), Some(&b'\n'), "answer ends in a newline");
    let line = &answer[..answer.len() - 1];
    assert!(!line.contains(&b'\n'), "answer is one line");
    match parse_response(Path::new("test"), &Request::Status, line) {
        Ok(Response::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn assert_bad_request(server: &ControlServer, bytes: &[u8], says: &str) {
    let refusal = refusal_in(&exchange_raw(server.path(), bytes, false));
    assert_eq!(refusal.kind, KIND_BAD_REQUEST, "{refusal:?}");
    assert_eq!(refusal.code, MIRROR_EINVAL);
    assert!(
        refusal.message.contains(says),
        "message {:?} should say {says:?}",
        refusal.message
    );
    // The server is still serving.
    assert_eq!(
        status(server.path(), CLIENT_TIMEOUT).expect("status after a bad request"),
        sample_status()
    );
}

fn running_as_root() -> bool {
    effective_uid() == 0
}

#[test]
fn socket_path_is_the_queue_path_with_ctl_appended() {
    assert_eq!(
        control_socket_path(Path::new("/var/lib/x/node.queue")),
        PathBuf::from("/var/lib/x/node.queue.ctl")
    );
}

#[test]
fn queue_fill_percent_is_bytes_over_capacity() {
    let mut s = sample_status();
    assert_eq!(s.queue_fill_percent(), 25.0);
    s.queue_capacity = 0;
    assert_eq!(s.queue_fill_percent(), 0.0);
}

#[test]
fn discard_parses_ids_and_words_and_refuses_the_rest() {
    assert_eq!("local".parse(), Ok(DiscardNode::Local));
    assert_eq!("peer".parse(), Ok(DiscardNode::Peer));
    assert_eq!("0x1234".parse(), Ok(DiscardNode::Id(0x1234)));
    assert_eq!("0XaB".parse(), Ok(DiscardNode::Id(0xab)));
    assert_eq!("4660".parse(), Ok(DiscardNode::Id(4660)));
    for bad in [
        "",
        "0",
        "0x0",
        "0x",
        "+5",
        "-5",
        "0x+5",
        " 5",
        "Local",
        "18446744073709551616",
        "0x10000000000000000",
        "five",
    ] {
        assert!(
            bad.parse::<DiscardNode>().is_err(),
            "{bad:?} must be refused"
        );
    }
    assert_eq!(DiscardNode::Id(0x1234).to_string(), "0x1234");
}

/// The exact bytes of docs/CONTROL.md's examples.
#[test]
fn encoding_matches_the_documented_bytes() {
    let cases = [
        (Request::Status, r#"{"version":1,"op":"status"}"#),
        (
            Request::Promote { force: false },
            r#"{"version":1,"op":"promote","force":false}"#,
        ),
        (Request::Demote, r#"{"version":1,"op":"demote"}"#),
        (
            Request::Resolve {
                discard: "0x1234".into(),
            },
            r#"{"version":1,"op":"resolve","discard":"0x1234"}"#,
        ),
    ];
    for (request, text) in cases {
        let line = encode_request(&request).expect("encode");
        assert_eq!(line, format!("{text}\n").into_bytes());
        assert_eq!(parse_request(text.as_bytes()), Ok(request));
    }
    assert_eq!(
        parse_request(br#"{"version":1,"op":"promote"}"#),
        Ok(Request::Promote { force: false }),
        "force defaults to false"
    );
    let responses = [
        (
            Response::Promoted(Promoted {
                term: 8,
                forced: true,
            }),
            r#"{"version":1,"ok":true,"promoted":{"term":8,"forced":true}}"#,
        ),
        (Response::Done, r#"{"version":1,"ok":true}"#),
        (
            Response::Refused(ControlRefusal::new(
                -1009,
                "wrong_role",
                "this node is a backup",
            )),
            r#"{"version":1,"ok":false,"error":{"code":-1009,"kind":"wrong_role","message":"this node is a backup"}}"#,
        ),
    ];
    for (response, text) in responses {
        assert_eq!(encode_response(&response), format!("{text}\n").into_bytes());
    }
    let status_line = encode_response(&Response::Status(Box::new(sample_status())));
    let expected_start = concat!(
        r#"{"version":1,"ok":true,"status":{"node_id":4660,"role":"primary","term":7,"#,
        r#""phase":"synchronous","peer_node_id":22136,"peer_address":"10.0.0.2:7000","#,
        r#""degraded":false,"fenced":null,"queue_records":3,"#
    );
    assert!(
        status_line.starts_with(expected_start.as_bytes()),
        "{}",
        String::from_utf8_lossy(&status_line)
    );
}

/// The events in docs/CONTROL.md's example.
fn documented_events() -> Vec<crate::EventRecord> {
    use crate::Event;
    let at = |seq, unix_us, event| crate::EventRecord {
        seq,
        unix_us,
        event,
    };
    vec![
        at(
            7,
            1_764_861_000_000_000,
            Event::PeerLost {
                reason: "peer closed the connection".into(),
            },
        ),
        at(8, 1_764_861_000_000_120, Event::Degraded),
        at(
            9,
            1_764_861_002_500_000,
            Event::Connected {
                peer_node_id: 22136,
                peer_address: "tcp://10.0.0.2:7400".into(),
            },
        ),
        at(
            10,
            1_764_861_002_500_800,
            Event::Recovering {
                records: 5,
                bytes: 320,
            },
        ),
        at(11, 1_764_861_002_501_300, Event::Synchronous),
        at(12, 1_764_861_010_000_000, Event::Promoted { term: 131_074 }),
        at(
            13,
            1_764_861_020_000_000,
            Event::SplitBrain {
                description:
                    "discarded this node's 3 records after seq 41 (192 bytes), saved first".into(),
                discarded: Some("/var/lib/mirror/a.queue.discarded-41-1764861020000".into()),
            },
        ),
        at(14, 1_764_861_030_000_000, Event::Lost { count: 12 }),
        at(
            15,
            1_764_861_040_000_000,
            Event::BitmapFallback {
                records: 1800,
                dirty_chunks: 96,
            },
        ),
        at(
            16,
            1_764_861_050_000_000,
            Event::TransferStarted {
                kind: "resync",
                chunks: 96,
            },
        ),
        at(
            17,
            1_764_861_051_000_000,
            Event::TransferProgress {
                kind: "resync",
                chunks_total: 96,
                chunks_done: 40,
                bytes_left: 3_670_016,
            },
        ),
        at(
            18,
            1_764_861_051_400_000,
            Event::TransferFinished {
                kind: "resync",
                chunks_compared: 96,
                chunks_differing: 90,
                bytes_sent: 5_898_240,
                abandoned: None,
            },
        ),
    ]
}

/// The status in docs/CONTROL.md's example.
fn documented_status() -> LiveStatus {
    LiveStatus {
        queue_capacity: 1 << 20,
        failure: None,
        write_bytes: 2624,
        write_latency_p50_us: Some(25),
        write_latency_p99_us: Some(250),
        dirty_chunks: 40,
        transfer: Some(crate::TransferStats {
            kind: "verify".into(),
            chunks_total: 1024,
            chunks_done: 512,
            chunks_differing: 0,
            bytes_left: 33_554_432,
            bytes_sent: 0,
            rate_bytes_per_s: 419_430_400,
            eta_s: Some(1),
            elapsed_ms: 1250,
        }),
        verifies_finished: 1,
        last_verify: Some(crate::control::VerifySummary {
            kind: "verify-repair".into(),
            chunks_compared: 1024,
            chunks_differing: 1,
            differing: vec![[327_680, 65_536]],
            chunks_repaired: 1,
            elapsed_ms: 160,
            abandoned: None,
        }),
        ..sample_status()
    }
}

/// Every example line in docs/CONTROL.md is what this code sends, byte for byte.
#[test]
fn the_spec_shows_what_the_code_sends() {
    let spec = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONTROL.md"));
    let lines = [
        encode_request(&Request::Status),
        encode_request(&Request::Promote { force: false }),
        encode_request(&Request::Promote { force: true }),
        encode_request(&Request::Demote),
        encode_request(&Request::Resolve {
            discard: "0x1234".into(),
        }),
        encode_request(&Request::Resolve {
            discard: "peer".into(),
        }),
        encode_request(&Request::Events),
        encode_request(&Request::Verify { repair: false }),
        encode_request(&Request::Verify { repair: true }),
    ]
    .into_iter()
    .map(|line| line.expect("encode"))
    .chain([
        encode_response(&Response::Status(Box::new(documented_status()))),
        encode_response(&Response::Promoted(Promoted {
            term: 8,
            forced: true,
        })),
        encode_response(&Response::Done),
        encode_response(&Response::Refused(ControlRefusal::bad_request(
            "request version 2 is not supported: this server speaks version 1",
        ))),
    ])
    .chain(documented_events().into_iter().map(|e| {
        let mut line = serde_json::to_vec(&e).expect("encode");
        line.push(b'\n');
        line
    }));
    let missing: Vec<String> = lines
        .map(|line| String::from_utf8(line).expect("UTF-8"))
        .filter(|text| !spec.contains(text.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/CONTROL.md lacks the lines:\n{}",
        missing.concat()
    );
    let version_refusal = parse_request(br#"{"version":2,"op":"status"}"#);
    assert_eq!(
        version_refusal,
        Err("request version 2 is not supported: this server speaks version 1".into())
    );
}

#[test]
fn status_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, node) = start(dir.path(), FakeNode::default());
    let got = status(server.path(), CLIENT_TIMEOUT).expect("status");
    assert_eq!(got, sample_status(), "newlines and non-ASCII survive");
    assert_eq!(node.calls(), ["status"]);
}

#[test]
fn promote_demote_resolve_reach_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, node) = start(dir.path(), FakeNode::default());
    let path = server.path();
    assert_eq!(
        promote(path, false, CLIENT_TIMEOUT).expect("promote"),
        Promoted {
            term: 8,
            forced: false
        }
    );
    assert_eq!(
        promote(path, true, CLIENT_TIMEOUT).expect("forced promote"),
        Promoted {
            term: 8,
            forced: true
        }
    );
    demote(path, CLIENT_TIMEOUT).expect("demote");
    resolve(path, DiscardNode::Id(0x1234), CLIENT_TIMEOUT).expect("resolve id");
    resolve(path, DiscardNode::Peer, CLIENT_TIMEOUT).expect("resolve peer");
    assert_eq!(
        node.calls(),
        [
            "promote force=false",
            "promote force=true",
            "demote",
            "resolve 0x1234",
            "resolve peer"
        ]
    );
}

#[test]
fn node_refusals_pass_through_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refusal = ControlRefusal::new(
        -1009,
        "wrong_role",
        "this node is a backup; demote needs a primary",
    );
    let (server, _node) = start(
        dir.path(),
        FakeNode {
            refusal: Some(refusal.clone()),
            ..FakeNode::default()
        },
    );
    let path = server.path();
    for request_ in [
        Request::Promote { force: true },
        Request::Demote,
        Request::Resolve {
            discard: "local".into(),
        },
    ] {
        let answer = request(path, &request_, CLIENT_TIMEOUT).expect("answer");
        assert_eq!(answer, Response::Refused(refusal.clone()), "{request_:?}");
    }
    match demote(path, CLIENT_TIMEOUT) {
        Err(ControlError::Refused(r)) => assert_eq!(r, refusal),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn malformed_requests_get_bad_request_and_the_server_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, node) = start(dir.path(), FakeNode::default());
    assert_bad_request(&server, b"{\"version\":1,\"op\":\n", "not valid JSON");
    assert_bad_request(&server, b"\n", "empty request line");
    assert_bad_request(&server, b"[1,2]\n", "must be a JSON object, got an array");
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"frobnicate\"}\n",
        "unknown variant `frobnicate`",
    );
    assert_bad_request(&server, b"{\"version\":1}\n", "missing field `op`");
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"status\",\"op\":\"demote\"}\n",
        "field `op` appears more than once",
    );
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"promote\",\"forse\":true}\n",
        "unknown field `forse`",
    );
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"status\",\"extra\":1}\n",
        "unknown field `extra`",
    );
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"promote\",\"force\":\"yes\"}\n",
        "expected a boolean",
    );
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"resolve\",\"discard\":\"everyone\"}\n",
        "discard 'everyone' names no node",
    );
    assert_bad_request(
        &server,
        b"{\"version\":2,\"op\":\"status\"}\n",
        "request version 2 is not supported: this server speaks version 1",
    );
    assert_bad_request(&server, b"{\"op\":\"status\"}\n", "no \"version\" field");
    assert_bad_request(
        &server,
        b"{\"version\":\"1\",\"op\":\"status\"}\n",
        "\"version\" must be a whole number, got \"1\"",
    );
    assert_bad_request(
        &server,
        b"{\"version\":1,\"op\":\"st\xffatus\"}\n",
        "not valid UTF-8 (invalid byte at offset 21)",
    );
    let mut long = br#"{"version":1,"op":"status","pad":""#.to_vec();
    long.resize(5000, b'a');
    long.extend_from_slice(b"\"}\n");
    assert_bad_request(&server, &long, "longer than 4096 bytes");
    // Exactly at the limit (newline included) is accepted.
    let mut at_limit = br#"{"version":1,"op":"status"}"#.to_vec();
    at_limit.resize(REQUEST_LINE_MAX_BYTES - 1, b' ');
    at_limit.push(b'\n');
    assert_eq!(at_limit.len(), REQUEST_LINE_MAX_BYTES);
    let answer = exchange_raw(server.path(), &at_limit, false);
    assert!(answer.starts_with(br#"{"version":1,"ok":true,"status":"#));
    // A request without its newline, the writer half-closed.
    let answer = exchange_raw(server.path(), br#"{"version":1,"op":"status"}"#, true);
    assert!(refusal_in(&answer)
        .message
        .contains("connection closed after 27 bytes without the newline"));
    // Only the well-formed requests reached the node.
    assert!(node.calls().iter().all(|c| c == "status"));
}

#[test]
fn a_silent_client_is_answered_after_the_timeout_and_the_server_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _node) = start(dir.path(), FakeNode::default());
    let began = Instant::now();
    let answer = exchange_raw(server.path(), b"", false);
    let waited = began.elapsed();
    let refusal = refusal_in(&answer);
    assert_eq!(refusal.kind, KIND_BAD_REQUEST);
    assert_eq!(
        refusal.message,
        "no complete request line within 2s (0 bytes received, no newline)"
    );
    assert!(
        waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT + Duration::from_secs(2),
        "{waited:?}"
    );
    status(server.path(), CLIENT_TIMEOUT).expect("served after the silent client");
}

#[test]
fn a_panicking_node_is_answered_as_internal_and_the_server_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _node) = start(
        dir.path(),
        FakeNode {
            panic_on_demote: true,
            ..FakeNode::default()
        },
    );
    match request(server.path(), &Request::Demote, CLIENT_TIMEOUT) {
        Ok(Response::Refused(r)) => {
            assert_eq!((r.code, r.kind.as_str()), (MIRROR_EPANIC, KIND_INTERNAL));
            assert!(r.message.contains("demote exploded"), "{}", r.message);
        }
        other => panic!("expected an internal refusal, got {other:?}"),
    }
    status(server.path(), CLIENT_TIMEOUT).expect("served after the panic");
}

#[test]
fn the_socket_file_has_mode_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _node) = start(dir.path(), FakeNode::default());
    let meta = std::fs::symlink_metadata(server.path()).expect("stat");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.queue.ctl");
    // A killed node's socket: bound, never removed, nobody listening.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(std::fs::symlink_metadata(&path).is_ok());
    let (server, _node) = start(dir.path(), FakeNode::default());
    status(server.path(), CLIENT_TIMEOUT).expect("the new server answers");
}

#[test]
fn a_second_server_on_a_live_socket_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _node) = start(dir.path(), FakeNode::default());
    let began = Instant::now();
    let second = ControlServer::start(first.path(), Arc::new(FakeNode::default()));
    match second {
        Err(e @ ControlError::LiveSocket { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "another node is running: its control socket {} answers",
                first.path().display()
            )
        ),
        other => panic!("expected LiveSocket, got {other:?}"),
    }
    // The probe hung up at once, so the first server is not stuck waiting for it.
    status(first.path(), CLIENT_TIMEOUT).expect("the first server still answers");
    assert!(began.elapsed() < REQUEST_TIMEOUT, "{:?}", began.elapsed());
}

#[test]
fn a_regular_file_at_the_path_is_never_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.queue.ctl");
    std::fs::write(&path, b"precious").expect("write");
    match ControlServer::start(&path, Arc::new(FakeNode::default())) {
        Err(e @ ControlError::NotASocket { .. }) => {
            assert!(
                e.to_string().contains("is a regular file, not a socket"),
                "{e}"
            )
        }
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
}

#[test]
fn drop_stops_promptly_and_removes_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _node) = start(dir.path(), FakeNode::default());
    let path = server.path().to_owned();
    // A client in the middle of a request must not hold up the stop.
    let mut lingering = UnixStream::connect(&path).expect("connect");
    lingering
        .write_all(b"{\"version\"")
        .expect("partial request");
    std::thread::sleep(Duration::from_millis(50));
    let began = Instant::now();
    drop(server);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert!(!path.exists(), "the socket file is removed");
    match status(&path, CLIENT_TIMEOUT) {
        Err(e @ ControlError::Connect { .. }) => {
            assert!(e.to_string().contains("is the node running?"), "{e}")
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[test]
fn stop_leaves_a_file_that_replaced_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _node) = start(dir.path(), FakeNode::default());
    let path = server.path().to_owned();
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(&path, b"someone else's").expect("write");
    server.stop().expect("stop");
    assert_eq!(
        std::fs::read(&path).expect("still there"),
        b"someone else's"
    );
}

/// A one-shot server that reads a line and answers `reply` verbatim (or nothing, `None`,
/// holding the connection until the client gives up).
fn fake_server(path: &Path, reply: Option<&'static [u8]>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut request = [0u8; 512];
        let _ = (&stream).read(&mut request);
        match reply {
            Some(reply) => {
                let _ = send_all(&stream, reply);
            }
            None => {
                let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = (&stream).read(&mut request);
            }
        }
    })
}

#[test]
fn the_client_refuses_answers_that_break_the_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&'static [u8], &str); 5] = [
        (b"hello\n", "not JSON"),
        (
            b"{\"version\":2,\"ok\":true}\n",
            "response version 2; this client speaks version 1",
        ),
        (b"{\"version\":1,\"ok\":false}\n", "inconsistent fields"),
        (
            b"{\"version\":1,\"ok\":true}\n",
            "a status request was answered with Done",
        ),
        (b"{\"version\":1,", "connection closed after 13 bytes"),
    ];
    for (i, (reply, says)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("fake{i}.ctl"));
        let server = fake_server(&path, Some(reply));
        match request(&path, &Request::Status, CLIENT_TIMEOUT) {
            Err(e @ ControlError::BadResponse { .. }) => {
                assert!(e.to_string().contains(says), "{e} should say {says:?}")
            }
            other => panic!("expected BadResponse for {reply:?}, got {other:?}"),
        }
        server.join().expect("fake server");
    }
}

#[test]
fn the_client_gives_up_at_its_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent.ctl");
    let _server = fake_server(&path, None);
    let began = Instant::now();
    match request(&path, &Request::Status, Duration::from_millis(300)) {
        Err(e @ ControlError::TimedOut { .. }) => {
            assert!(e.to_string().contains("waiting for the answer"), "{e}")
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
}

/// The uid check, from a process of another user. Two layers: with the socket at 0600 the
/// kernel refuses the connect itself; with the mode opened up (the window between bind and
/// chmod) the server refuses with `permission_denied`.
#[test]
fn a_peer_of_another_user_is_refused() {
    use std::os::unix::process::CommandExt;
    if !running_as_root() {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    // A system interpreter: one under root's home (a version manager's) is not readable
    // by the unprivileged user.
    let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("skipped: no python3 in /usr/bin or /usr/local/bin");
        return;
    };
    const NOBODY: u32 = 65534;
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed: errno", e.errno)
    sys.exit(0)
try:
    s.sendall(b'{"version":1,"op":"status"}\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # refused before its request was read: the answer is still there to read
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("let the other user reach the socket");
    let (server, node) = start(dir.path(), FakeNode::default());
    let run_as_nobody = || {
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg(CLIENT)
            .arg(server.path())
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run the client as nobody");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    assert_eq!(
        run_as_nobody().trim(),
        format!("connect failed: errno {}", libc::EACCES),
        "mode 0600 keeps the other user out"
    );
    std::fs::set_permissions(server.path(), std::fs::Permissions::from_mode(0o666))
        .expect("open the mode, as before chmod");
    let refusal = refusal_in(run_as_nobody().as_bytes());
    assert_eq!(refusal.kind, KIND_PERMISSION_DENIED);
    assert_eq!(refusal.code, MIRROR_EIO);
    assert!(
        refusal.message.contains("runs as uid 65534"),
        "{}",
        refusal.message
    );
    assert!(
        node.calls().is_empty(),
        "the request never reached the node"
    );
    status(server.path(), CLIENT_TIMEOUT).expect("root is still served");
}
