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

use bytes::{Buf, Bytes};

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
    /// cache holds; copying and checksumming piece by piece measured no faster). From
    /// [`REP_MOVSB_MIN`] bytes the copy sits at `data`'s offset within a cache line
    /// ([`copy_at_the_sources_line_offset`]); below, the one allocation of
    /// `Bytes::copy_from_slice` is cheaper.
    pub fn copy_from_slice(data: &[u8]) -> Payload {
        if data.len() < REP_MOVSB_MIN {
            return Payload::new(Bytes::copy_from_slice(data));
        }
        Payload::new(copy_at_the_sources_line_offset(data))
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

/// From about this many bytes glibc's `memcpy` copies with `rep movsb` (on the AMD VM, a CPU
/// with fast short `rep movsb`, from 2113 bytes: a copy 16 bytes past its source took 33 ns at
/// 2112 bytes and 1.1 µs at 2200); below it, it moves vectors itself.
pub const REP_MOVSB_MIN: usize = 2048;

/// Bytes a cache line holds (x86-64 and most others).
const LINE: usize = 64;

/// Whether a copy from `src` to `dst` is one that `rep movsb` runs 15-30 times slower on AMD
/// Zen 3: the destination 1-63 bytes past the source modulo 4 KiB (measured 1-31 bytes on the
/// AMD VM; the margin is for other models). glibc 2.36 (Debian 12) `memcpy` takes `rep movsb` from
/// [`REP_MOVSB_MIN`] bytes whatever the distance: on the AMD VM a 64 KiB copy took 24 µs
/// instead of 1.4, and synchronous 64 KiB writes from a caller's buffer at such a distance
/// from the payload's allocation 85-101 µs instead of 51-70 (docs/PERFORMANCE.md). Addresses
/// are compared as numbers only.
pub fn rep_movsb_is_slow(src: *const u8, dst: *const u8) -> bool {
    let apart = (dst as usize).wrapping_sub(src as usize) % 4096;
    (1..LINE).contains(&apart)
}

/// A copy of `data` at the same offset within a 64-byte line as `data`, so that the copy is
/// never one [`rep_movsb_is_slow`] says is slow: a caller's buffer is anywhere (often
/// page-aligned), and the allocator reuses one address per size, so a write from an unlucky
/// buffer was slow every time. The cost: up to 63 bytes more per allocation, and the
/// allocation of `Bytes`' shared header, which a payload's first clone would make anyway.
fn copy_at_the_sources_line_offset(data: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(data.len() + LINE - 1);
    // Addresses compared as numbers only: nothing is read or written through them here.
    let pad = (data.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize) % LINE;
    buf.resize(pad, 0);
    buf.extend_from_slice(data);
    let mut bytes = Bytes::from(buf);
    bytes.advance(pad); // moves the start; no reference count taken, unlike `slice`
    bytes
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

    #[test]
    fn the_slow_distances_are_one_to_sixty_three_bytes_ahead_modulo_a_page() {
        let base = 0x7f00_0000_0000usize as *const u8;
        let at = |apart: usize| base.wrapping_add(apart);
        for apart in [0usize, 64, 4095, 4096, 4096 + 64, 2048] {
            assert!(!rep_movsb_is_slow(base, at(apart)), "{apart}");
        }
        for apart in [1usize, 16, 31, 63, 4096 + 1, 8192 + 63] {
            assert!(rep_movsb_is_slow(base, at(apart)), "{apart}");
        }
        // Behind the source is not slow (the scan on the AMD VM found no such distance).
        assert!(!rep_movsb_is_slow(at(16), base));
    }

    #[test]
    fn a_large_copy_sits_at_its_sources_offset_within_a_line() {
        let backing: Vec<u8> = (0..70_000 + 2 * LINE)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        let line_start = backing.as_ptr().align_offset(LINE);
        for len in [REP_MOVSB_MIN - 1, REP_MOVSB_MIN, 4096, 65_536 + 3] {
            for skew in 0..LINE {
                let data = &backing[line_start + skew..line_start + skew + len];
                let copy = Payload::copy_from_slice(data);
                assert_eq!(&copy[..], data, "{len} at {skew}");
                assert_eq!(copy.crc(), crc32c::crc32c(data), "{len} at {skew}");
                if len >= REP_MOVSB_MIN {
                    let apart = (copy.as_ptr() as usize).wrapping_sub(data.as_ptr() as usize);
                    assert_eq!(apart % LINE, 0, "{len} at {skew}");
                    assert!(!rep_movsb_is_slow(data.as_ptr(), copy.as_ptr()));
                }
            }
        }
    }
}
