//! A write's payload with its crc32c, computed once.
//!
//! The bytes of one write are covered by two checksums: the `Write` frame's on the wire and the
//! record's in each node's queue. Both are crc32c over a header followed by the payload, so each
//! is the combination of its header's crc with the payload's ([`crc32c_combine`], logarithmic
//! in the length, no pass over the bytes; below [`COMBINE_MIN`] bytes a pass is cheaper). The
//! payload's crc is computed where the
//! bytes come into a node: on the primary when its caller's bytes are copied in, on the backup
//! while the frame that brought them is verified. The checksums on the wire and on disk are the
//! same as ever; only the passes over the bytes are fewer.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::crc::crc32c;
#[cfg(doc)]
use crate::crc::{crc32c_combine, COMBINE_MIN};

/// Bytes of a write and their crc32c.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    bytes: Bytes,
    crc: u32,
}

impl Payload {
    /// Takes `bytes` and computes their crc32c.
    pub fn new(bytes: Bytes) -> Payload {
        let crc = crc32c(&bytes);
        Payload { bytes, crc }
    }

    /// `bytes`, whose crc32c the caller computed already (a frame decoder, verifying the frame).
    /// Debug builds check it.
    pub fn with_crc(bytes: Bytes, crc: u32) -> Payload {
        debug_assert_eq!(crc, crc32c(&bytes), "a payload's crc does not match");
        Payload { bytes, crc }
    }

    /// Copies `data` (a caller's buffer) and computes its crc32c (from the copy, which the
    /// cache holds; copying and checksumming piece by piece measured no faster).
    pub fn copy_from_slice(data: &[u8]) -> Payload {
        Payload::new(Bytes::copy_from_slice(data))
    }

    /// The crc32c of the bytes.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// The bytes, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Payload {
        Payload::new(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Payload {
        Payload::new(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for Payload {
    fn from(bytes: &'static [u8]) -> Payload {
        Payload::new(Bytes::from_static(bytes))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.bytes, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_in_gives_the_crc_of_the_bytes() {
        for len in [1usize, 7, 4095, 4096, 4097, 65536, 70_001] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let want = crc32c::crc32c(&data);
            let copied = Payload::copy_from_slice(&data);
            assert_eq!((copied.crc(), &copied[..]), (want, &data[..]), "{len}");
            assert_eq!(Payload::from(data.clone()).crc(), want);
            assert_eq!(Payload::with_crc(Bytes::from(data), want).crc(), want);
        }
    }
}
