//! crc32c (Castagnoli), the checksum of every frame, record, slot and file header: one
//! implementation, so that every format checks with the same code and the fastest pass.
//!
//! Which pass is fastest depends on the CPU ([`WidePass`], chosen once per process from its
//! features). Where it has AVX-512, passes go to the `crc-fast` crate's folding with carry-less
//! multiplication (measured on an Intel VM with AVX-512 `VPCLMULQDQ`: 4 KiB in ~60 ns, 64 KiB
//! in ~0.8 µs, where the `crc32c` crate's three interleaved `crc32` instructions took ~200 ns
//! and ~3.1 µs). Without it, `crc-fast` mixes 128-bit `PCLMULQDQ` folding with `crc32`
//! instructions, and on an AMD EPYC (Zen 3) VM that took 1.3-1.7 times as long as the `crc32c`
//! crate (4 KiB 300-470 against 220-280 ns, 64 KiB 3.7-3.8 against 2.8-3.0 µs, at four
//! alignments; a 256-bit `VPCLMULQDQ` fold, tried in C, was no faster there than the crate), so
//! there the crate passes. Below [`WIDE_MIN`] bytes
//! either's setup costs more than it saves, and the `crc32` instruction runs over 8 bytes at a
//! time ([`small_append`]; ~4 ns for 12-64 bytes at any alignment, where the `crc32c` crate
//! took 8.5-11: `cargo bench --bench payload -- crc_pass`). The values are crc32c's whichever
//! runs (property tests hold each pass, and the `crc32c` crate's combine, to the crate).

use std::cell::Cell;
use std::sync::OnceLock;

use crc_fast::{CrcAlgorithm, Digest};

/// From this many bytes on, a pass is the CPU's [`WidePass`] (see the module docs; the short
/// pass and the folding one are equal at about 256 bytes on the Intel VM; on the AMD VM the
/// short pass took 12 ns at 128 bytes, one serial chain of `crc32` instructions, and the
/// interleaved one 35 ns at 256: `cargo bench --bench payload -- crc_`).
pub const WIDE_MIN: usize = 256;

/// How a pass over [`WIDE_MIN`] bytes or more runs on this CPU (the module docs say why each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WidePass {
    /// Folding with carry-less multiplication (the `crc-fast` crate): a CPU with AVX-512, or
    /// one without SSE 4.2 (either crate then falls back to tables).
    Folding,
    /// The `crc32` instruction over three interleaved streams (the `crc32c` crate): an x86 CPU
    /// with SSE 4.2 and without AVX-512.
    Interleaved,
}

impl WidePass {
    /// The pass for this CPU, chosen once per process.
    pub fn of_this_cpu() -> WidePass {
        static CHOSEN: OnceLock<WidePass> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("sse4.2")
                && !std::arch::is_x86_feature_detected!("avx512vl")
            {
                return WidePass::Interleaved;
            }
            WidePass::Folding
        })
    }

    /// `crc` continued over `data` by this pass (any length; [`crc32c_append`] sends only
    /// [`WIDE_MIN`] bytes or more here).
    pub fn append(self, crc: u32, data: &[u8]) -> u32 {
        match self {
            WidePass::Folding => {
                // crc32c's register is the finished value's complement (it starts at all ones
                // and the result is inverted); `crc-fast` takes the register and inverts what
                // it returns.
                let mut digest =
                    Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
                digest.update(data);
                digest.finalize() as u32
            }
            WidePass::Interleaved => crc32c::crc32c_append(crc, data),
        }
    }

    /// What `mirror bench` prints: the pass and the crate behind it.
    pub fn describe(self) -> &'static str {
        match self {
            WidePass::Folding => "folding with carry-less multiplication (crc-fast)",
            WidePass::Interleaved => "three interleaved crc32 instructions (crc32c)",
        }
    }
}

/// The crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// `crc` (the crc32c of some bytes) continued over `data`: the crc32c of those bytes followed by
/// `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if data.len() < WIDE_MIN {
        return small_append(crc, data);
    }
    WidePass::of_this_cpu().append(crc, data)
}

/// A short pass (below [`WIDE_MIN`]): the `crc32` instruction over 8 bytes at a time from the
/// start, unaligned, then 4, 2 and 1. The `crc32c` crate first walks the bytes up to an
/// 8-byte boundary one at a time and ends the same way, and a write's frames and records are
/// checksummed in pieces of 0 to 64 bytes at any alignment, seven per write on each node
/// (`cargo bench --bench payload -- crc_pass`).
#[allow(unsafe_code)]
fn small_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, checked just above (the check is cached by std).
        return unsafe { small_append_sse42(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

/// [`small_append`] on a CPU with SSE 4.2 (callers check: `unsafe` only for that).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
#[allow(unsafe_code)]
unsafe fn small_append_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u16, _mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8};
    fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes[..N]);
        out
    }
    // crc32c's register is the finished value's complement, as in `crc32c_append`.
    let mut reg = u64::from(!crc);
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        reg = _mm_crc32_u64(reg, u64::from_le_bytes(le(word)));
    }
    let mut reg = reg as u32;
    let mut rest = words.remainder();
    if rest.len() >= 4 {
        reg = _mm_crc32_u32(reg, u32::from_le_bytes(le(rest)));
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        reg = _mm_crc32_u16(reg, u16::from_le_bytes(le(rest)));
        rest = &rest[2..];
    }
    if let Some(&last) = rest.first() {
        reg = _mm_crc32_u8(reg, last);
    }
    !reg
}

/// Below this many bytes a crc pass over the data costs about as little as [`crc32c_combine`] or
/// less (a combination 13-17 ns whatever the length, ~42 ns for a length other than the
/// thread's last; a pass 18 ns at 512 bytes, 47 ns at 1 KiB, 97 ns at 4 KiB: `cargo bench
/// --bench payload -- crc_`, 2026-12-06).
pub const COMBINE_MIN: usize = 1 << 10;

/// `crc` continued over `data`, whose own crc32c is `data_crc`: combined where that is cheaper
/// than passing over `data` again, computed where it is not.
pub fn crc32c_append_known(crc: u32, data: &[u8], data_crc: u32) -> u32 {
    if data.len() < COMBINE_MIN {
        crc32c_append(crc, data)
    } else {
        crc32c_combine(crc, data_crc, data.len())
    }
}

/// The crc32c of `a` followed by `b`, from `crc_a`, the crc32c of `b` and `b`'s length (zlib's
/// current method): `crc_a` times x^(8·len) modulo the polynomial, plus `crc_b`. The power is
/// one multiplication per set bit of `8·len` from a table of x^(2^k), and each multiplication
/// eight table steps ([`Multiples`]); the power's own multiples are what this thread used last
/// when the length is the same (a node's writes mostly share a length). The `crc32c` crate's
/// combine (zlib's old matrix method) took 10-20 µs, more than a crc pass over the 4 KiB it
/// saves.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if len_b == 0 {
        return crc_a;
    }
    LAST_POWER.with(|last| {
        let (len, mut power) = last.get();
        if len != len_b {
            power = Multiples::of(x_pow_8n_mod_p(len_b));
            last.set((len_b, power));
        }
        power.times(crc_a) ^ crc_b
    })
}

thread_local! {
    /// The last length [`crc32c_combine`] was asked for on this thread, and x^(8·len) mod P's
    /// multiples.
    static LAST_POWER: Cell<(usize, Multiples)> = const { Cell::new((0, Multiples::of(X_POW_0))) };
}

/// x^0 (reflected bit order: bit 31 is x^0).
const X_POW_0: u32 = 1 << 31;

/// A value `b` times each polynomial of degree below 4, modulo the polynomial, indexed by the
/// four coefficients as they sit in a reflected value (bit 3 of the index is x^0): with them a
/// multiplication by `b` takes four bits of the other factor at a time.
#[derive(Clone, Copy, Debug)]
struct Multiples([u32; 16]);

impl Multiples {
    const fn of(b: u32) -> Multiples {
        let mut t = [0u32; 16];
        let mut b_times_x = b; // b·x^k for k = 0, 1, 2, 3: index bit 8 >> k
        let mut k = 0;
        while k < 4 {
            let bit = 8 >> k;
            let mut n = 0;
            while n < 16 {
                if n & bit != 0 {
                    t[n] ^= b_times_x;
                }
                n += 1;
            }
            b_times_x = (b_times_x >> 1) ^ (POLY & 0u32.wrapping_sub(b_times_x & 1));
            k += 1;
        }
        Multiples(t)
    }

    /// `a * b` modulo the polynomial, as [`mult_mod_p`] (Horner's rule from `a`'s highest
    /// powers down; no branch on the data).
    fn times(&self, a: u32) -> u32 {
        // The coefficients of `a` for x^(4j)..x^(4j+3) sit at bits 31-4j down to 28-4j.
        let mut acc = 0u32;
        for j in (0..8).rev() {
            acc = (acc >> 4) ^ TIMES_X4_OVERFLOW[(acc & 0xF) as usize];
            acc ^= self.0[((a >> (28 - 4 * j)) & 0xF) as usize];
        }
        acc
    }
}

/// What the terms for x^28..x^31 (the low four bits of a reflected value) become when the
/// value is multiplied by x^4, modulo the polynomial: the shift by four bits of
/// [`Multiples::times`] drops them.
const TIMES_X4_OVERFLOW: [u32; 16] = {
    let mut t = [0u32; 16];
    let mut low = 1; // 0 stays 0 (`mult_mod_p` wants a non-zero `a`)
    while low < 16 {
        t[low] = mult_mod_p(low as u32, X_POW_2K[2]);
        low += 1;
    }
    t
};

/// [`X_POW_2K`]'s multiples.
const X_POW_2K_MULTIPLES: [Multiples; 32] = {
    let mut t = [Multiples([0; 16]); 32];
    let mut k = 0;
    while k < 32 {
        t[k] = Multiples::of(X_POW_2K[k]);
        k += 1;
    }
    t
};

/// crc32c's polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the polynomial (reflected bit order: bit 31 is x^0), for a non-zero `a` (the
/// loop ends at `a`'s last set bit).
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
    let mut p = X_POW_0;
    let mut k = 3; // 8 = 2^3
    while n != 0 {
        if n & 1 != 0 {
            p = X_POW_2K_MULTIPLES[k % 32].times(p);
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
            // Both wide passes, whichever this CPU runs.
            for pass in [WidePass::Folding, WidePass::Interleaved] {
                prop_assert_eq!(pass.append(seed, &data), crc32c::crc32c_append(seed, &data));
            }
            let (a, b) = data.split_at(cut.index(data.len() + 1));
            let whole = crc32c::crc32c(&data);
            prop_assert_eq!(crc32c_combine(crc32c(a), crc32c(b), b.len()), whole);
            prop_assert_eq!(crc32c_append_known(crc32c(a), b, crc32c(b)), whole);
        }
    }

    #[test]
    fn short_passes_agree_with_the_crc32c_crate_at_every_length_and_alignment() {
        // Below WIDE_MIN: every tail (8, 4, 2, 1 bytes) after every count of whole words, from
        // every offset within a word, continuing a few registers.
        let data: Vec<u8> = (0..WIDE_MIN as u32 + 16)
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        for offset in 0..8 {
            for len in 0..WIDE_MIN {
                let piece = &data[offset..offset + len];
                for seed in [0u32, 0xFFFF_FFFF, 0x1234_5678] {
                    assert_eq!(
                        crc32c_append(seed, piece),
                        crc32c::crc32c_append(seed, piece),
                        "offset {offset}, length {len}, seed {seed:#x}"
                    );
                }
            }
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

    proptest! {
        #[test]
        fn multiplying_by_nibbles_is_the_bit_loop(a in 1..=u32::MAX, b in any::<u32>()) {
            prop_assert_eq!(Multiples::of(b).times(a), mult_mod_p(a, b));
        }

        #[test]
        fn a_remembered_power_is_the_lengths_own(
            lens in proptest::collection::vec(1usize..(1 << 20), 1..6),
            a in any::<u32>(),
            b in any::<u32>(),
        ) {
            for len in lens.iter().chain(lens.iter()) {
                prop_assert_eq!(
                    crc32c_combine(a, b, *len),
                    crc32c::crc32c_combine(a, b, *len),
                    "len {}", len
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
            let want = crc32c::crc32c_append(0x1234_5678, d);
            assert_eq!(crc32c_append(0x1234_5678, d), want, "{len}");
            for pass in [WidePass::Folding, WidePass::Interleaved] {
                assert_eq!(pass.append(0x1234_5678, d), want, "{pass:?} {len}");
            }
        }
    }
}
