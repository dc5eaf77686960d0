//! The sampler's AVX-512 form: a batch's first counter blocks walked sixteen lanes
//! to a register, each draw's gap looked up by a gather and the draws that fall in
//! their windows listed by a compress. Built where the toolchain has the
//! intrinsics (Rust 1.89 on: `cfg(dropblock_avx512)`, set by build.rs), run where
//! the CPU has AVX-512F.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

use super::{Plan, CROWDED, SPLIT, STEP_BITS};
use crate::rng::LANES;

/// Whether the AVX-512 forms may run and the CPU has AVX-512F.
pub(super) fn available() -> bool {
    crate::simd::avx512f_available()
}

impl Plan {
    /// [`Plan::first_draws`] for the first counter blocks only: lists every draw
    /// of `blocks` that falls in its window, for the lanes in `live`, in `found`
    /// from its start (draw by draw, not window by window), and returns the count,
    /// the lanes whose fourth draw still fell in the window (their walks go on at
    /// their second block) and each lane's next position. None where a draw that
    /// counts fell in a crowded step of the gap table (the scalar search's loop):
    /// the caller then walks the batch by the scalar form.
    ///
    /// The walk's four draws are four independent searches and a running sum
    /// ([`Plan::walk_into`]): a lane's draw counts while every draw before it
    /// placed its seed inside the window, which the `inside` mask carries.
    #[target_feature(enable = "avx512f")]
    pub(super) fn first_draws_avx512(
        &self,
        lens: &[u32; LANES],
        blocks: &[[u32; LANES]; 4],
        live: u32,
        found: &mut [u32],
    ) -> Option<(usize, u32, [u32; LANES])> {
        const { assert!(LANES <= 32, "two registers of 16 lanes") };
        // Every compress stores 16 entries from `n`, which is under 4 · LANES.
        assert!(found.len() >= 4 * LANES + 16, "room for the last compress's whole register");
        let table = self.gap_steps.as_ptr().cast::<i32>();
        let (one, zero) = (_mm512_set1_epi32(1), _mm512_setzero_si512());
        let (low, split, crowded) = (
            _mm512_set1_epi32((1 << STEP_BITS) - 1),
            _mm512_set1_epi32(SPLIT as i32),
            _mm512_set1_epi32(CROWDED as i32),
        );
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (mut n, mut more, mut next) = (0, 0u32, [0u32; LANES]);
        for base in (0..LANES).step_by(16) {
            let width = (LANES - base).min(16);
            let lanes = (u32::MAX >> (32 - width)) as __mmask16;
            // SAFETY: lanes base..base + width of a LANES-long array; the register's
            // lanes past the array's end are masked off, and a masked-off lane is
            // neither read nor able to fault.
            let load = |a: &[u32; LANES]| unsafe { _mm512_maskz_loadu_epi32(lanes, a.as_ptr().add(base).cast()) };
            let len = load(lens);
            let tag = _mm512_slli_epi32::<6>(_mm512_add_epi32(lane, _mm512_set1_epi32(base as i32)));
            let mut inside = (live >> base) as __mmask16 & lanes;
            // The four draws' table steps, gathered up front for every live lane:
            // gathers masked by whether the draw before fell inside would wait
            // each on the one before.
            let draws = blocks.map(|draws| load(&draws));
            // SAFETY: `u >> STEP_BITS` indexes the 2^GAP_TABLE_BITS-entry table;
            // lanes outside `inside` read nothing.
            let steps = draws.map(|u| unsafe {
                _mm512_mask_i32gather_epi32::<4>(zero, inside, _mm512_srli_epi32::<{ STEP_BITS }>(u), table)
            });
            // The position the lane's next draw places its seed from.
            let mut from = zero;
            for (u, step) in draws.into_iter().zip(steps) {
                if _mm512_mask_test_epi32_mask(inside, step, crowded) != 0 {
                    return None;
                }
                // `gap`: the step's first threshold, one more from its split on.
                let first = _mm512_srli_epi32::<24>(step);
                let past = _mm512_cmpge_epu32_mask(_mm512_and_si512(u, low), _mm512_and_si512(step, split));
                let at = _mm512_add_epi32(from, _mm512_mask_add_epi32(first, past, first, one));
                inside = _mm512_mask_cmplt_epu32_mask(inside, at, len);
                // Inside, `at < len <= 64`: the entry's cell takes its 6 bits.
                let packed = _mm512_maskz_compress_epi32(inside, _mm512_or_si512(tag, at));
                // SAFETY: entries n..n + 16 of `found` (asserted above).
                unsafe { _mm512_storeu_si512(found.as_mut_ptr().add(n).cast(), packed) };
                n += inside.count_ones() as usize;
                from = _mm512_add_epi32(at, one);
            }
            more |= (inside as u32) << base;
            // SAFETY: lanes base..base + width of a LANES-long array; masked-off
            // lanes past its end are not written.
            unsafe { _mm512_mask_storeu_epi32(next.as_mut_ptr().add(base).cast(), lanes, from) };
        }
        Some((n, more, next))
    }
}
