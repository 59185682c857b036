//! Arbitrary bytes where a peer's authentication messages or records are due: the decoder
//! never panics, consumes nothing on an error, and every message it accepts re-encodes to
//! exactly the bytes it consumed; a responder handshake fed the bytes never panics and never
//! authenticates (the fuzzer does not hold the secret); a record opener never panics and
//! never returns a body from bytes it did not seal.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mirror_proto::auth::{AuthMessage, Credentials, Handshake, Secret, Side};

/// The seeds in the corpus were made with secret byte 0x5a; the handshake under attack holds
/// another secret (with fixed nonces, a seed made with its own secret would replay).
fn creds(node_id: u64, secret_byte: u8) -> Credentials {
    Credentials {
        secrets: vec![Secret::new(vec![secret_byte; 32]).expect("32 bytes")],
        node_id,
        bound_peer: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The message decoder.
    let mut rest = data;
    loop {
        match AuthMessage::decode(rest) {
            Ok(Some((msg, n))) => {
                assert!(n > 0 && n <= rest.len());
                let mut again = Vec::new();
                msg.encode(&mut again);
                assert_eq!(&again[..], &rest[..n], "re-encoding differs");
                rest = &rest[n..];
            }
            Ok(None) | Err(_) => break,
        }
    }
    // 2. A responder fed the bytes as they come.
    let mut responder =
        Handshake::new(Side::Responder, creds(2, 0xa7), [2; 32]).expect("credentials are valid");
    if let Ok(used) = responder.receive(data) {
        assert!(used <= data.len());
    }
    let _ = responder.take_output();
    assert!(!responder.is_done(), "authenticated without the secret");
    // 3. Records after a real handshake: the opener never takes forged bytes.
    let mut i = Handshake::new(Side::Initiator, creds(1, 0x5a), [1; 32]).expect("valid");
    let mut r = Handshake::new(Side::Responder, creds(2, 0x5a), [2; 32]).expect("valid");
    r.receive(&i.take_output()).expect("honest challenge");
    i.receive(&r.take_output()).expect("honest answer");
    r.receive(&i.take_output()).expect("honest proof");
    let mut session = r.into_session().expect("authenticated");
    let mut raw = BytesMut::from(data);
    while let Ok(Some(_)) = session.opener.open(&mut raw) {
        panic!("a record the fuzzer forged was accepted");
    }
});
