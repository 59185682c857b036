//! crc32c (Castagnoli), the checksum of every frame, record, slot and file header: one
//! implementation, so that every format checks with the same code and the fastest pass.
//!
//! Passes over the bytes go to the `crc-fast` crate's folding with carry-less multiplication
//! (AVX-512 `VPCLMULQDQ` where the CPU has it, narrower `PCLMULQDQ` otherwise; measured on the
//! development VM: 4 KiB in ~60 ns, 64 KiB in ~0.8 µs, where the `crc32c` crate's three
//! interleaved `crc32` instructions took ~200 ns and ~3.1 µs). Below [`WIDE_MIN`] bytes its setup
//! costs more than it saves and the `crc32c` crate runs. The values are crc32c's either way (a
//! property test holds the two, and the crate's combine, to each other).

use crc_fast::{CrcAlgorithm, Digest};

/// From this many bytes on, a pass folds with carry-less multiplication (see the module docs;
/// the two are equal at about 256 bytes on the development VM: `cargo bench --bench payload --
/// crc_`).
pub const WIDE_MIN: usize = 256;

/// The crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// `crc` (the crc32c of some bytes) continued over `data`: the crc32c of those bytes followed by
/// `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if data.len() < WIDE_MIN {
        return crc32c::crc32c_append(crc, data);
    }
    // crc32c's register is the finished value's complement (it starts at all ones and the
    // result is inverted); `crc-fast` takes the register and inverts what it returns.
    let mut digest = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    digest.update(data);
    digest.finalize() as u32
}

/// Below this many bytes a crc pass over the data costs less than [`crc32c_combine`] (about
/// 65 ns whatever the length; a pass ~60 ns at 4 KiB, ~80 ns at 8 KiB: `cargo bench --bench
/// payload -- crc_`).
pub const COMBINE_MIN: usize = 6 << 10;

/// `crc` continued over `data`, whose own crc32c is `data_crc`: combined where that is cheaper
/// than passing over `data` again, computed where it is not.
pub fn crc32c_append_known(crc: u32, data: &[u8], data_crc: u32) -> u32 {
    if data.len() < COMBINE_MIN {
        crc32c_append(crc, data)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_pass_and_combine_agrees_with_the_crc32c_crate(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            seed in any::<u32>(),
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert_eq!(crc32c(&data), crc32c::crc32c(&data));
            prop_assert_eq!(crc32c_append(seed, &data), crc32c::crc32c_append(seed, &data));
            let (a, b) = data.split_at(cut.index(data.len() + 1));
            let whole = crc32c::crc32c(&data);
            prop_assert_eq!(crc32c_combine(crc32c(a), crc32c(b), b.len()), whole);
            prop_assert_eq!(crc32c_append_known(crc32c(a), b, crc32c(b)), whole);
        }
    }

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
    fn the_check_value_and_every_length_around_the_thresholds() {
        // crc32c's catalogue check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..3 * COMBINE_MIN as u32)
            .map(|i| (i * 131 + 7) as u8)
            .collect();
        for len in (0..WIDE_MIN + 70).chain(COMBINE_MIN - 70..COMBINE_MIN + 70) {
            let d = &data[..len];
            assert_eq!(
                crc32c_append(0x1234_5678, d),
                crc32c::crc32c_append(0x1234_5678, d),
                "{len}"
            );
        }
    }
}
