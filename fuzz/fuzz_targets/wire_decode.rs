//! Arbitrary bytes from a peer: the decoder never panics, consumes only whole frames, and every
//! frame it accepts re-encodes to exactly the bytes it consumed.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mirror_proto::Message;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match Message::decode(&mut buf) {
            Ok(Some(msg)) => {
                let consumed = before.len() - buf.len();
                let mut again = BytesMut::new();
                msg.encode(&mut again);
                assert_eq!(&again[..], &before[..consumed], "re-encoding differs");
            }
            Ok(None) => {
                assert_eq!(buf.len(), before.len(), "consumed bytes without a frame");
                break;
            }
            Err(_) => {
                assert_eq!(buf.len(), before.len(), "consumed bytes on an error");
                break;
            }
        }
    }
});
