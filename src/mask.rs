//! The block masks of a call, built on the CPU from the contract's seeds: the
//! oracle for the GPU's keep bits.

use rayon::prelude::*;

use crate::abi;
use crate::error::{Error, Result};
use crate::sampling::Plan;

/// The dropped cells of every mask plane. Plane `p` occupies words
/// `[p * words_per_plane, (p + 1) * words_per_plane)`; bit `i = h * W + w` (bit
/// `i % 64` of word `i / 64`) is set when cell `(h, w)` is dropped. Bits past
/// `H * W` are always clear.
#[derive(Debug, Clone)]
pub(crate) struct BlockMasks {
    words_per_plane: usize,
    words: Vec<u64>,
    dropped: Vec<u64>,
}

impl BlockMasks {
    /// Samples every plane's seeds and grows them into blocks (parallel over planes).
    pub(crate) fn build(plan: &Plan) -> Self {
        let g = plan.geometry();
        let words_per_plane = (g.h as usize * g.w as usize).div_ceil(64);
        let mut words = vec![0u64; plan.planes() * words_per_plane];
        let dropped = words
            .par_chunks_mut(words_per_plane)
            .enumerate()
            .map_init(
                || vec![0u64; g.seed_h as usize * g.windows_per_row as usize],
                |seeds, (plane, out)| {
                    plan.fill_seed_grid(plane, seeds);
                    grow_plane(g, seeds, out)
                },
            )
            .collect();
        Self { words_per_plane, words, dropped }
    }

    /// The dropped bits of `plane`.
    #[inline]
    pub(crate) fn plane(&self, plane: usize) -> &[u64] {
        &self.words[plane * self.words_per_plane..(plane + 1) * self.words_per_plane]
    }

    /// How many cells of `plane` are dropped.
    #[inline]
    pub(crate) fn dropped(&self, plane: usize) -> u64 {
        self.dropped[plane]
    }

    #[inline]
    pub(crate) fn is_dropped(&self, plane: usize, cell: usize) -> bool {
        self.plane(plane)[cell / 64] >> (cell % 64) & 1 == 1
    }
}

/// Grows one plane's seeds into blocks with `plan`'s geometry: the seed grid
/// `seeds` (`seed_h` rows of `windows_per_row` words, bit `x % 64` of word
/// `x / 64` of a row set for a seed at column `x`) becomes the plane's dropped
/// bits in `out` (`ceil(H·W / 64)` words, cleared first). Returns the number of
/// dropped cells, or an error when a buffer's length does not match the geometry.
/// Takes a [`Plan`], not a bare geometry, so the geometry is one `Plan::new`
/// derived and checked.
pub fn grow_blocks(plan: &Plan, seeds: &[u64], out: &mut [u64]) -> Result<u64> {
    let g = plan.geometry();
    let grid = g.seed_h as usize * g.windows_per_row as usize;
    if seeds.len() != grid {
        return Err(Error::LengthMismatch { what: "seed grid", expected: grid, actual: seeds.len() });
    }
    let words = (g.h as usize * g.w as usize).div_ceil(64);
    if out.len() != words {
        return Err(Error::LengthMismatch { what: "plane words", expected: words, actual: out.len() });
    }
    Ok(grow_plane(g, seeds, out))
}

fn grow_plane(g: &abi::DropBlockGeometry, seeds: &[u64], out: &mut [u64]) -> u64 {
    let (h, w) = (g.h as i64, g.w as i64);
    let wpr = g.windows_per_row as usize;
    out.fill(0);
    for (y, row) in seeds.chunks_exact(wpr).enumerate() {
        let r0 = (y as i64 - g.anchor_y as i64).max(0);
        let r1 = (y as i64 - g.anchor_y as i64 + g.kh as i64).min(h);
        for (s, &word) in row.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let x = (s * 64) as i64 + bits.trailing_zeros() as i64;
                bits &= bits - 1;
                let c0 = (x - g.anchor_x as i64).max(0);
                let c1 = (x - g.anchor_x as i64 + g.kw as i64).min(w);
                for r in r0..r1 {
                    set_bits(out, (r * w + c0) as usize, (r * w + c1) as usize);
                }
            }
        }
    }
    out.iter().map(|v| v.count_ones() as u64).sum()
}

/// Sets bits `[lo, hi)`.
fn set_bits(words: &mut [u64], lo: usize, hi: usize) {
    let mut i = lo;
    while i < hi {
        let bit = i % 64;
        let n = (64 - bit).min(hi - i);
        let run = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        words[i / 64] |= run;
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn set_bits_spans_words() {
        let mut w = [0u64; 3];
        set_bits(&mut w, 60, 130);
        assert_eq!(w[0], 0xF000_0000_0000_0000);
        assert_eq!(w[1], u64::MAX);
        assert_eq!(w[2], 0b11);
        let mut v = [0u64; 1];
        set_bits(&mut v, 3, 3);
        assert_eq!(v[0], 0);
    }
}
