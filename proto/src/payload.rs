//! A write's payload with its crc32c, computed once.
//!
//! The bytes of one write are covered by two checksums: the `Write` frame's on the wire and the
//! record's in each node's queue. Both are crc32c over a header followed by the payload, so each
//! is the combination of its header's crc with the payload's ([`crc32c_combine`], logarithmic
//! in the length, no pass over the bytes; below [`COMBINE_MIN`] bytes a pass is cheaper). The payload's crc is computed where the
//! bytes come into a node: on the primary when its caller's bytes are copied in, on the backup
//! while the frame that brought them is verified. The checksums on the wire and on disk are the
//! same as ever; only the passes over the bytes are fewer.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// Bytes of a write and their crc32c.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    bytes: Bytes,
    crc: u32,
}

impl Payload {
    /// Takes `bytes` and computes their crc32c.
    pub fn new(bytes: Bytes) -> Payload {
        let crc = crc32c::crc32c(&bytes);
        Payload { bytes, crc }
    }

    /// `bytes`, whose crc32c the caller computed already (a frame decoder, verifying the frame).
    /// Debug builds check it.
    pub fn with_crc(bytes: Bytes, crc: u32) -> Payload {
        debug_assert_eq!(
            crc,
            crc32c::crc32c(&bytes),
            "a payload's crc does not match"
        );
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

/// Below this many bytes a crc pass over the data costs less than [`crc32c_combine`] (about
/// 60 ns whatever the length; `cargo bench --bench payload`).
pub const COMBINE_MIN: usize = 1024;

/// `crc` continued over `data`, whose own crc32c is `data_crc`: combined where that is cheaper
/// than passing over `data` again, computed where it is not.
pub fn crc32c_append_known(crc: u32, data: &[u8], data_crc: u32) -> u32 {
    if data.len() < COMBINE_MIN {
        crc32c::crc32c_append(crc, data)
    } else {
        crc32c_combine(crc, data_crc, data.len())
    }
}

/// The crc32c of `a` followed by `b`, from `crc_a`, the crc32c of `b` and `b`'s length: the
/// `crc32c` crate's `crc32c_combine` with zlib's current method (x^(8·len) mod P by squaring from
/// a table, then one multiplication): a few hundred operations where the crate's (zlib's old
/// matrix method) took 10-20 µs, more than a crc pass over the 4 KiB it saves.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if len_b == 0 {
        return crc_a;
    }
    mult_mod_p(x_pow_8n_mod_p(len_b), crc_a) ^ crc_b
}

/// crc32c's polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the polynomial (reflected bit order: bit 31 is x^0).
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// x^(2^k) modulo the polynomial, for k in 0..32.
const X_POW_2K: [u32; 32] = {
    let mut t = [0u32; 32];
    t[0] = 1 << 30; // x^1
    let mut k = 1;
    while k < 32 {
        t[k] = mult_mod_p(t[k - 1], t[k - 1]);
        k += 1;
    }
    t
};

/// x^(8·n) modulo the polynomial: the operator that appends `n` zero bytes to a crc.
fn x_pow_8n_mod_p(mut n: usize) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    let mut k = 3; // 8 = 2^3
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X_POW_2K[k % 32], p);
        }
        n >>= 1;
        k += 1;
    }
    p
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
    fn combining_crcs_is_the_crc_of_the_concatenation() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 255) as u8).collect();
        for split in [0usize, 1, 3, 8, 56, 4095, 4096, 65_536, 100_003, 200_000] {
            for end in [split, (split + 1).min(data.len()), data.len()] {
                let (a, b) = (&data[..split], &data[split..end]);
                let whole = crc32c::crc32c(&data[..end]);
                let combined = crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len());
                assert_eq!(combined, whole, "split {split}, end {end}");
                assert_eq!(
                    combined,
                    crc32c::crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len())
                );
            }
        }
    }

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
