//! The masks' AVX-512 forms: a 64 x 64 bit transpose in eight registers from
//! VBMI's byte permutes and GFNI's bit-matrix multiply, its rows gathered and
//! funnel-shifted (VBMI2) eight at a time. Built where the toolchain
//! has the intrinsics (Rust 1.89 on: `cfg(dropblock_avx512)`, set by build.rs),
//! run where the CPU has the features; the crate's rust-version stays 1.88.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

use super::{transpose_cells_with, transposed_block, BlockMasks, SampleCells, WORD};

/// Whether the AVX-512 forms may run and the CPU has every feature below.
pub(super) fn available() -> bool {
    crate::simd::avx512_allowed() && cpu_has!("avx512f", "avx512bw", "avx512vbmi", "avx512vbmi2", "gfni")
}

/// [`super::transpose_cells`] with [`Transpose::block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
pub(super) fn transpose_cells(masks: &BlockMasks, at: &SampleCells, out: &mut [u64], bit0: usize) {
    let t = Transpose::new();
    transpose_cells_with(masks, at, out, bit0, |masks, rows, out| t.block(masks, rows, out))
}

/// The constants of [`Transpose::transpose`], loaded once a call.
struct Transpose {
    /// Byte `8q + b` from byte `8b + q`: a register's 8 x 8 bytes transposed
    /// (its qword index and byte index trade places)...
    swap: __m512i,
    /// ...and the same with each qword's bytes reversed, the order GFNI's matrix
    /// operand takes its rows in.
    swap_reversed: __m512i,
    /// Byte `k` of each qword is `1 << k`: GFNI's vector operand that reads the
    /// matrix operand's columns out as bytes.
    columns: __m512i,
    /// `vpermt2q` selectors that trade bit `h` of the register index with bit `h`
    /// of the qword index (h = 4, 2, 1) for a pair of registers: the low one's
    /// and the high one's.
    pairs: [(__m512i, __m512i); 3],
}

impl Transpose {
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
    fn new() -> Self {
        let bytes = |f: fn(usize) -> usize| {
            let idx: [u8; 64] = std::array::from_fn(|k| f(k) as u8);
            // SAFETY: 64 bytes are read from a 64-byte array.
            unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
        };
        let qwords = |f: &dyn Fn(usize) -> usize| {
            let idx: [i64; 8] = std::array::from_fn(|q| f(q) as i64);
            // SAFETY: 64 bytes are read from a 64-byte array.
            unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
        };
        let pairs = [4, 2, 1].map(|h: usize| {
            // Selector values 0-7 pick the low register's qwords, 8-15 the high one's.
            let low = qwords(&|q| if q & h == 0 { q } else { 8 + (q ^ h) });
            let high = qwords(&|q| if q & h == 0 { q | h } else { 8 + q });
            (low, high)
        });
        Self {
            swap: bytes(|k| (k % 8) * 8 + k / 8),
            swap_reversed: bytes(|k| (7 - k % 8) * 8 + k / 8),
            columns: _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64),
            pairs,
        }
    }

    /// Transposes `a` as [`super::transpose64`] does. With rows `8I + i` and
    /// columns `8J + j`, bit (I, i, J, j) starts in register I, qword i, byte J,
    /// bit j, and must end in register J, qword j, byte I, bit i:
    /// 1. a byte permute per register trades qword and byte (and reverses each
    ///    qword's bytes for step 2): register I, qword J, byte 7 - i, bit j;
    /// 2. GFNI's affine transform with the qword as its matrix transposes each
    ///    qword's 8 x 8 bits: register I, qword J, byte j, bit i;
    /// 3. three rounds of two-register qword permutes transpose the 8 x 8 qwords
    ///    across registers: register J, qword I, byte j, bit i;
    /// 4. a byte permute per register trades qword and byte: register J, qword j,
    ///    byte I, bit i.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
    fn apply(&self, a: &mut [u64; WORD]) {
        // SAFETY: qwords 8i..8i + 8 of a 64-qword array.
        let rows = std::array::from_fn(|i| unsafe { _mm512_loadu_si512(a.as_ptr().add(8 * i).cast()) });
        self.store(self.transpose(rows), a);
    }

    /// [`transposed_block`]: the rows gathered eight at a time where they all lie
    /// inside the masks (each is two words funnel-shifted), else read one by one.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
    fn block(&self, masks: &BlockMasks, (b0, stride, cw): (usize, usize, usize), out: &mut [u64; WORD]) {
        let words = &masks.words;
        // The last row's first bit; the rows before it start lower (the stride is
        // not negative), so its two words bound every gathered word. Checked, so
        // that a wrapped sum cannot pass the bound with row 0 outside the masks.
        let last = cw.checked_sub(1).and_then(|r| r.checked_mul(stride)).and_then(|o| o.checked_add(b0));
        if !last.is_some_and(|l| l / WORD + 1 < words.len() && l <= i64::MAX as usize) {
            transposed_block(masks, (b0, stride, cw), out);
            return;
        }
        let first: [i64; 8] = std::array::from_fn(|t| (b0 + t * stride) as i64);
        // SAFETY: 64 bytes are read from a 64-byte array.
        let mut at = unsafe { _mm512_loadu_si512(first.as_ptr().cast()) };
        let step = _mm512_set1_epi64(8 * stride as i64);
        let (one, low6) = (_mm512_set1_epi64(1), _mm512_set1_epi64(63));
        let rows = std::array::from_fn(|g| {
            // Rows 8g..8g + 8, those under `cw`.
            let live = (0xFFu32 >> (8 - (cw.saturating_sub(8 * g)).min(8))) as __mmask8;
            let (word, shift) = (_mm512_srli_epi64::<6>(at), _mm512_and_si512(at, low6));
            at = _mm512_add_epi64(at, step);
            let zero = _mm512_setzero_si512();
            // SAFETY: every live row's two words are inside `words` (`last`'s
            // next word is), and dead lanes read nothing.
            let (lo, hi) = unsafe {
                (
                    _mm512_mask_i64gather_epi64::<8>(zero, live, word, words.as_ptr().cast()),
                    _mm512_mask_i64gather_epi64::<8>(zero, live, _mm512_add_epi64(word, one), words.as_ptr().cast()),
                )
            };
            _mm512_shrdv_epi64(lo, hi, shift)
        });
        self.store(self.transpose(rows), out);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
    fn store(&self, rows: [__m512i; 8], a: &mut [u64; WORD]) {
        for (i, v) in rows.into_iter().enumerate() {
            // SAFETY: qwords 8i..8i + 8 of a 64-qword array.
            unsafe { _mm512_storeu_si512(a.as_mut_ptr().add(8 * i).cast(), v) };
        }
    }

    /// The transpose of rows `8i..8i + 8` in register `i`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni")]
    fn transpose(&self, rows: [__m512i; 8]) -> [__m512i; 8] {
        let mut r = rows
            .map(|v| _mm512_gf2p8affine_epi64_epi8::<0>(self.columns, _mm512_permutexvar_epi8(self.swap_reversed, v)));
        for (bit, &(low, high)) in [4, 2, 1].iter().zip(&self.pairs) {
            for lo in (0..8).filter(|i| i & bit == 0) {
                let (x, y) = (r[lo], r[lo | bit]);
                r[lo] = _mm512_permutex2var_epi64(x, low, y);
                r[lo | bit] = _mm512_permutex2var_epi64(x, high, y);
            }
        }
        r.map(|v| _mm512_permutexvar_epi8(self.swap, v))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{transpose64, transposed_block, BlockMasks};
    use super::{available, Transpose};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn skip(test: &str) -> bool {
        // This module exists only where the toolchain has the intrinsics, so the
        // form runs exactly where the CPU and the capability allow it.
        crate::simd::skip_form_test(test, "AVX-512 VBMI, VBMI2 and GFNI", available(), available())
    }

    /// The AVX-512 transpose equals the portable one on random matrices: sparse,
    /// dense and uniform rows.
    #[test]
    fn avx512_transpose_matches_the_portable_one() {
        if skip("avx512_transpose_matches_the_portable_one") {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x0123_4567_89AB_CDEF);
        for case in 0..200 {
            let a: [u64; 64] = std::array::from_fn(|_| {
                let v: u64 = rng.random();
                match case % 3 {
                    0 => v,
                    1 => v & v.rotate_left(17) & v.rotate_left(31),
                    _ => !(v & v.rotate_left(23)),
                }
            });
            let mut want = a;
            transpose64(&mut want);
            let mut got = a;
            // SAFETY: `available` found the features.
            unsafe { Transpose::new().apply(&mut got) };
            assert_eq!(got, want, "case {case}");
        }
    }

    /// A block's gathered rows equal the portable form's, one row read at a time:
    /// every row count up to 64, strides of 0 (channels sharing a plane), under a
    /// word and over, and blocks that end on, near or at the masks' last word
    /// (where the gather gives way to single reads).
    #[test]
    fn avx512_blocks_match_the_portable_ones() {
        if skip("avx512_blocks_match_the_portable_ones") {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x05EE_D0FB_10C5);
        let mut next = || rng.random::<u64>();
        for case in 0..3000 {
            let len = 1 + (next() % 300) as usize;
            let masks = BlockMasks { plane_len: 1, words: (0..len).map(|_| next()).collect() };
            let bits = len * 64;
            let cw = 1 + (next() % 64) as usize;
            let stride = match case % 4 {
                0 => 0,
                1 => 1 + (next() % 64) as usize,
                _ => (next() % 200) as usize,
            };
            // Every row's first bit inside the masks (as the passes' rows are).
            let span = (cw - 1) * stride;
            if span >= bits {
                continue;
            }
            let b0 = match case % 3 {
                0 => bits - 1 - span - (next() % 130).min((bits - 1 - span) as u64) as usize,
                _ => (next() % (bits - span) as u64) as usize,
            };
            let mut want = [0u64; 64];
            transposed_block(&masks, (b0, stride, cw), &mut want);
            let mut got = [u64::MAX; 64];
            // SAFETY: `available` found the features.
            unsafe { Transpose::new().block(&masks, (b0, stride, cw), &mut got) };
            assert_eq!(got, want, "case {case}: {len} words, b0 {b0}, stride {stride}, {cw} rows");
        }
    }
}
