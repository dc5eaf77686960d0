//! The block masks of a call, built on the CPU from the contract's seeds: the
//! oracle for the GPU's keep bits.
//!
//! The masks are dense, as on the device: bit `b = plane · L + cell` (`L = D·H·W`)
//! stands for one cell of one plane, so they take one bit per mask cell whatever
//! the plane size. They are built in parallel over tiles of whole planes, each
//! tile holding whole windows (a multiple of `q` planes) and starting on a word.
//! A channels-last tensor's bits can instead be left in its own order
//! (`BitOrder::ChannelsLast`).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::abi;
use crate::error::{host_vec, Error, Result};
use crate::rng::LANES;
use crate::sampling::{window_len, Plan};
use crate::shard::{SeedBox, Shard};

#[cfg(all(target_arch = "x86_64", dropblock_avx512))]
mod avx512;

/// Whether the masks' AVX-512 forms run here.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn avx512_available() -> bool {
    #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
    return avx512::available();
    #[allow(unreachable_code)]
    false
}

const WORD: usize = 64;
/// A CPU tile's bits, about: large enough that per-tile work is amortised, small
/// enough to stay in a core's L2 while its blocks are ORed in.
const TILE_BITS: usize = 1 << 20;

/// The most bits of one sample that a tile of [`BitOrder::ChannelsLast`] takes
/// (its scratch, 512 KiB, within a server core's L2 of 1–2 MiB, so that the
/// transpose reads the bits from cache; the scratch is one a thread).
pub(crate) const MAX_TILE_SAMPLE_BITS: usize = 4 * TILE_BITS;

/// The dropped cells of every mask plane: bit `b % 64` of word `b / 64` is set
/// when bit `b = plane · L + cell` is dropped. Bits past the last plane are clear.
#[derive(Debug, Clone)]
pub(crate) struct BlockMasks {
    plane_len: usize,
    words: Vec<u64>,
}

/// The order in which [`BlockMasks::build`] leaves the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BitOrder {
    /// Bit `plane · L + cell`.
    Planes,
    /// A channels-last tensor's own order, bit `(n·L + cell)·C + ch`, for a local
    /// shape of `c` channels, a multiple of 64, without sharing: a plane per slice,
    /// so as many bits as the planes' and a sample's in the same words. Each tile,
    /// of whole samples, is built in the planes' order in a scratch and transposed
    /// into the masks while it is in cache, once for every pass that reads it.
    ChannelsLast { c: usize },
}

impl BlockMasks {
    /// Samples the seeds that reach into `shard` and grows them into its planes'
    /// blocks, clipped to the shard (parallel over tiles of local planes), leaving
    /// the bits in `order`. For the whole tensor that is every seed of every plane.
    ///
    /// Also returns the dropped cells of each group of `group_planes` consecutive
    /// local planes (the last group may be short), counted by each tile while its
    /// bits are still in its core's cache: no second pass over the masks.
    pub(crate) fn build(plan: &Plan, shard: &Shard, group_planes: usize, order: BitOrder) -> Result<(Self, Vec<u64>)> {
        let g = plan.geometry();
        let plane_len = shard.local().plane_len();
        let planes = shard.local_planes(g.sharing);
        let seed_box = SeedBox::new(plan, shard)?;
        let bits = planes.checked_mul(plane_len).ok_or(Error::HostAllocation { bytes: u64::MAX })?;
        let mut words = Vec::new();
        let len = bits.div_ceil(WORD);
        words.try_reserve_exact(len).map_err(|_| Error::HostAllocation { bytes: len as u64 * 8 })?;
        let group_planes = group_planes.max(1);
        // A count a group: 8 bytes a sample without sharing, more than its mask
        // bits on small planes, so reserved, not assumed to fit.
        let dropped = host_vec(planes.div_ceil(group_planes), |_| AtomicU64::new(0))?;
        let threads = rayon::current_num_threads();
        let tile = match order {
            BitOrder::Planes => tile_planes(g.planes_per_window as usize, planes, plane_len, threads),
            BitOrder::ChannelsLast { c } => {
                debug_assert!(c.is_multiple_of(WORD) && g.sharing == abi::DROPBLOCK_SHARE_NONE);
                // Eight tiles a thread or more where there are samples for them: a
                // tile is whole samples, coarser than the planes' order's tiles.
                let (by_size, by_threads) = (TILE_BITS / (c * plane_len), (planes / c).div_ceil(8 * threads.max(1)));
                c * by_size.min(by_threads).max(1)
            }
        };
        let tile_words = tile * plane_len / WORD;
        let chunks = words.spare_capacity_mut()[..len].par_chunks_mut(tile_words).enumerate();
        chunks.try_for_each_init(Vec::new, |scratch, (t, out)| -> Result<()> {
            // Zeroed here, by the core that builds the tile, rather than up front by
            // one thread (a serial memset, and the first touch of fresh pages).
            let out = zeroed(out);
            let planes = t * tile..((t + 1) * tile).min(planes);
            let built = match order {
                BitOrder::Planes => &mut *out,
                BitOrder::ChannelsLast { .. } => {
                    scratch.clear();
                    let bytes = out.len() as u64 * 8;
                    scratch.try_reserve_exact(out.len()).map_err(|_| Error::HostAllocation { bytes })?;
                    scratch.resize(out.len(), 0u64);
                    &mut scratch[..]
                }
            };
            build_tile(plan, shard, &seed_box, planes.clone(), plane_len, built);
            // The tile starts on a word: its local bit 0 is bit `planes.start · L`.
            let groups = planes.start / group_planes..(planes.end - 1) / group_planes + 1;
            for (sum, group) in dropped[groups.clone()].iter().zip(groups) {
                let lo = (group * group_planes).max(planes.start) - planes.start;
                let hi = ((group + 1) * group_planes).min(planes.end) - planes.start;
                sum.fetch_add(count_range(built, lo * plane_len, hi * plane_len), Ordering::Relaxed);
            }
            if let BitOrder::ChannelsLast { c } = order {
                let tile = Self { plane_len, words: std::mem::take(scratch) };
                for s in 0..planes.len() / c {
                    let cells = SampleCells { first: s * c, step: 1, cells: 0..plane_len, c };
                    transpose_cells(&tile, &cells, out, s * c * plane_len);
                }
                *scratch = tile.words;
            }
            Ok(())
        })?;
        // SAFETY: the tiles cover words [0, len) (chunks of the first `len` spare
        // words) and `zeroed` wrote every word of each (an error returned above
        // before any were taken as initialised).
        unsafe { words.set_len(len) };
        // Tensor-order bits read as one plane a sample, as `channels_last`'s.
        let plane_len = match order {
            BitOrder::Planes => plane_len,
            BitOrder::ChannelsLast { c } => c * plane_len,
        };
        Ok((Self { plane_len, words }, dropped.into_iter().map(AtomicU64::into_inner).collect()))
    }

    #[inline]
    pub(crate) fn is_dropped(&self, plane: usize, cell: usize) -> bool {
        let b = plane * self.plane_len + cell;
        self.words[b / WORD] >> (b % WORD) & 1 == 1
    }

    /// The 64 bits starting at bit `b` (bits past the end read as 0).
    #[inline]
    pub(crate) fn bits_from(&self, b: usize) -> u64 {
        let (i, s) = (b / WORD, b % WORD);
        let (lo, hi) = match self.words.get(i..i + 2) {
            Some(&[lo, hi]) => (lo, hi),
            _ => (self.words[i], 0),
        };
        // One funnel shift (`shrd`), which the transposes' row reads are made of.
        (((hi as u128) << WORD | lo as u128) >> s) as u64
    }
}

impl BlockMasks {
    /// The whole mask in a channels-last tensor's own order, one bit per element
    /// (bit `(n·L + cell)·C + ch`), in parallel over samples grouped to start on a
    /// word: for few channels, where a pass that transposed a region at a time
    /// would repeat a transpose per 64 cells for a handful of elements.
    pub(crate) fn channels_last(
        &self,
        plane_of: impl Fn(usize, usize) -> usize + Sync,
        n: usize,
        c: usize,
    ) -> Result<Self> {
        let l = self.plane_len;
        let sample = l * c;
        let total = n.checked_mul(sample).ok_or(Error::HostAllocation { bytes: u64::MAX })?;
        let len = total.div_ceil(WORD);
        let mut words = Vec::new();
        words.try_reserve_exact(len).map_err(|_| Error::HostAllocation { bytes: len as u64 * 8 })?;
        words.resize(len, 0u64);
        let align = WORD / gcd(sample, WORD);
        let by_size = (TILE_BITS / (align * sample)).max(1);
        let by_threads = n.div_ceil(align * 4 * rayon::current_num_threads().max(1)).max(1);
        let group = align * by_size.min(by_threads);
        words.par_chunks_mut(group * sample / WORD).enumerate().for_each(|(t, out)| {
            for s in t * group..((t + 1) * group).min(n) {
                transpose_cells(self, &SampleCells::new(&plane_of, s, 0..l, c), out, (s - t * group) * sample);
            }
        });
        Ok(Self { plane_len: sample, words })
    }
}

/// Cells `cells` of one sample of a channels-last tensor of `c` channels whose
/// channel `ch` reads plane `first + ch · step`: every sharing's plane is affine
/// in the channel, a step of 1 or 0.
pub(crate) struct SampleCells {
    first: usize,
    step: usize,
    cells: std::ops::Range<usize>,
    c: usize,
}

impl SampleCells {
    /// Cells `cells` of sample `n`, whose channel `ch` reads plane `plane_of(n, ch)`.
    pub(crate) fn new(
        plane_of: impl Fn(usize, usize) -> usize,
        n: usize,
        cells: std::ops::Range<usize>,
        c: usize,
    ) -> Self {
        let first = plane_of(n, 0);
        let step = if c > 1 { plane_of(n, 1) - first } else { 0 };
        Self { first, step, cells, c }
    }
}

/// The dropped bits of `at` in the tensor's own order, ORed into `out` (zero
/// there) from bit `bit0` on: bit `bit0 + (cell - cells.start)·C + ch` is bit
/// `cell` of channel `ch`'s plane. `bit0` is a multiple of 64 when `c` is. From
/// 64 x 64 bit-matrix transposes (64 channels' runs of 64 cells in, 64 cells' runs
/// of 64 channels out): with AVX-512 (VBMI and GFNI) a transpose takes 48
/// instructions on eight registers and its rows are gathered eight at a time,
/// with AVX2 its block swaps take four rows to an instruction.
pub(crate) fn transpose_cells(masks: &BlockMasks, at: &SampleCells, out: &mut [u64], bit0: usize) {
    #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
    if avx512_available() {
        // SAFETY: the CPU was just found to have the features.
        return unsafe { avx512::transpose_cells(masks, at, out, bit0) };
    }
    transpose_cells_avx2(masks, at, out, bit0)
}

/// `rows` set to the transpose of the 64 x 64 bit matrix whose row `j < cw` is
/// the 64 mask bits from bit `b0 + j·stride` (rows from `cw` on are zero).
#[inline(always)]
fn transposed_block(masks: &BlockMasks, (b0, stride, cw): (usize, usize, usize), rows: &mut [u64; WORD]) {
    *rows = [0; WORD];
    for (j, row) in rows.iter_mut().enumerate().take(cw) {
        *row = masks.bits_from(b0 + j * stride);
    }
    transpose64(rows);
}

with_feature! {
    "avx2",
    /// [`transpose_cells`] with the portable transpose, compiled with AVX2 where
    /// the CPU has it.
    fn transpose_cells_avx2(masks: &BlockMasks, at: &SampleCells, out: &mut [u64], bit0: usize) {
        transpose_cells_with(masks, at, out, bit0, transposed_block)
    }
}

/// [`transpose_cells`] with `block` (as [`transposed_block`]) for the 64 x 64
/// transposes, inlined into each instruction set's form.
#[inline(always)]
fn transpose_cells_with(
    masks: &BlockMasks,
    at: &SampleCells,
    out: &mut [u64],
    bit0: usize,
    block: impl Fn(&BlockMasks, (usize, usize, usize), &mut [u64; WORD]),
) {
    let (l, c, cells) = (masks.plane_len, at.c, &at.cells);
    // With whole words of channels, each row of a transpose is one output word.
    let aligned = c.is_multiple_of(WORD);
    for c0 in (0..c).step_by(WORD) {
        let cw = (c - c0).min(WORD);
        let (p0, stride) = (at.first + c0 * at.step, at.step * l);
        for cell0 in cells.clone().step_by(WORD) {
            let mut rows = [0u64; WORD];
            block(masks, (p0 * l + cell0, stride, cw), &mut rows);
            // Rows past the region's last cell hold the next cells' (or plane's) bits.
            let k = (cells.end - cell0).min(WORD);
            let base = bit0 + (cell0 - cells.start) * c + c0;
            if aligned {
                debug_assert!(base.is_multiple_of(WORD), "whole-word stores need bit0 on a word");
                for (i, &row) in rows[..k].iter().enumerate() {
                    out[(base + i * c) / WORD] = row;
                }
            } else {
                for (i, &row) in rows[..k].iter().enumerate() {
                    or_bits(out, base + i * c, row & crate::sampling::low_bits(cw as u32), cw);
                }
            }
        }
    }
}

/// Transposes a 64 x 64 bit matrix in place: bit `j` of row `i` trades places with
/// bit `i` of row `j` (Hacker's Delight 7-3, least significant bit first), one
/// level of block swaps at a time with the block size a constant, so each level
/// unrolls into straight-line, independent swaps.
#[inline(always)]
pub(super) fn transpose64(a: &mut [u64; WORD]) {
    #[inline(always)]
    fn level<const J: usize>(a: &mut [u64; WORD], m: u64) {
        for base in (0..WORD).step_by(2 * J) {
            for k in base..base + J {
                let t = ((a[k] >> J) ^ a[k + J]) & m;
                a[k + J] ^= t;
                a[k] ^= t << J;
            }
        }
    }
    level::<32>(a, 0x0000_0000_FFFF_FFFF);
    level::<16>(a, 0x0000_FFFF_0000_FFFF);
    level::<8>(a, 0x00FF_00FF_00FF_00FF);
    level::<4>(a, 0x0F0F_0F0F_0F0F_0F0F);
    level::<2>(a, 0x3333_3333_3333_3333);
    level::<1>(a, 0x5555_5555_5555_5555);
}

/// ORs the low `n` (1..=64) bits of `v` into bits `[at, at + n)`.
fn or_bits(words: &mut [u64], at: usize, v: u64, n: usize) {
    if v == 0 {
        return;
    }
    let (i, s) = (at / WORD, at % WORD);
    words[i] |= v << s;
    if s + n > WORD {
        words[i + 1] |= v >> (WORD - s);
    }
}

/// Planes per CPU tile: a multiple of `q` (whole windows, each walked once) and
/// of `64 / gcd(L, 64)` (a tile starts on a word), about TILE_BITS, and small enough
/// that every thread gets several tiles.
fn tile_planes(q: usize, planes: usize, plane_len: usize, threads: usize) -> usize {
    let word_align = WORD / gcd(plane_len, WORD);
    let align = q / gcd(q, word_align) * word_align;
    let by_size = (TILE_BITS / (align * plane_len)).max(1);
    let by_threads = planes.div_ceil(align * 4 * threads.max(1)).max(1);
    align * by_size.min(by_threads)
}

/// `words` set to 0, as initialised words.
fn zeroed(words: &mut [MaybeUninit<u64>]) -> &mut [u64] {
    for w in words.iter_mut() {
        w.write(0);
    }
    // SAFETY: every element was just written, and `MaybeUninit<u64>` has the layout
    // of `u64`.
    unsafe { &mut *(words as *mut [MaybeUninit<u64>] as *mut [u64]) }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

with_feature! {
    "avx2",
    /// Builds local planes `planes` into `out` (zeroed), whose bit 0 is bit
    /// `planes.start · L` of the masks: walks the windows that hold the planes'
    /// seeds in `seed_box` and grows those seeds, clipped to the shard. (With AVX2
    /// the windows' first Philox blocks take eight lanes to an instruction.)
    fn build_tile(
        plan: &Plan,
        shard: &Shard,
        seed_box: &SeedBox,
        planes: std::ops::Range<usize>,
        plane_len: usize,
        out: &mut [u64],
    ) {
        let g = plan.geometry();
        let (s, q, m) = (g.seed_cells, g.planes_per_window as u64, g.windows_per_group);
        let blocks = Blocks::new(g, seed_box);
        let per_cells = Divisor::new(s);
        let mut windows = Vec::new();
        let mut local = planes.start;
        while local < planes.end {
            // A run of local planes whose global planes are consecutive, so each window
            // of several planes is walked once for all of them.
            let (plane0, run) = shard.global_run(plan, local);
            let run = run.min(planes.end - local) as u64;
            let base = |plane: u64| (local - planes.start + (plane - plane0) as usize) * plane_len;
            if s <= WORD as u64 {
                let (first, last) = (plane0 / q, (plane0 + run - 1) / q);
                let (full, call_last) = ((q * s) as u32, g.windows - 1);
                plan.walk(
                    first..last + 1,
                    |w| if w == call_last { window_len(g, w) } else { full },
                    |ids, found| {
                        // Cell j of the window is cell j mod S of its plane j / S (by a
                        // multiplication: stepping plane by plane took up to 63 steps a
                        // seed at S = 1).
                        for &f in found {
                            let (planes, cell) = per_cells.div_rem((f & 63) as u64);
                            let plane = ids[(f >> 6) as usize] * q + planes;
                            if (plane0..plane0 + run).contains(&plane) {
                                blocks.grow(base(plane), cell, out);
                            }
                        }
                    },
                );
            } else {
                // Window `plane·m + i` holds cells [64i, 64i + 64) of its plane: 64
                // cells, but the plane's last.
                let tail = (s - (m - 1) * WORD as u64) as u32;
                let per_plane = Divisor::new(m);
                let len = |w: u64| if per_plane.div_rem(w).1 == m - 1 { tail } else { WORD as u32 };
                let grow = |ids: &[u64; LANES], found: &[u32], out: &mut [u64]| {
                    for &f in found {
                        let (plane, part) = per_plane.div_rem(ids[(f >> 6) as usize]);
                        blocks.grow(base(plane), part * WORD as u64 + (f & 63) as u64, out);
                    }
                };
                if seed_box.parts.len() == 1 && seed_box.parts[0] == (0..m) {
                    // Whole planes: the run's windows are consecutive.
                    plan.walk(plane0 * m..(plane0 + run) * m, len, |ids, found| grow(ids, found, out));
                } else {
                    // A shard's windows: a few in each plane, walked in batches across planes.
                    windows.clear();
                    for plane in plane0..plane0 + run {
                        for parts in &seed_box.parts {
                            windows.extend((parts.start..parts.end).map(|part| plane * m + part));
                        }
                    }
                    plan.walk_list(&windows, len, |ids, found| grow(ids, found, out));
                }
            }
            local += run as usize;
        }
    }
}

/// A seed cell's (z, y, x), by multiplications instead of 64-bit divisions (two a
/// seed, the most frequent divisions of the CPU sampler).
struct SeedGrid {
    /// One seed depth (1D, 2D, and 3D whose block spans the depth): one division a
    /// seed.
    flat: bool,
    hw: Divisor,
    w: Divisor,
}

impl SeedGrid {
    fn new(g: &abi::DropBlockGeometry) -> Self {
        let (hw, w) = (g.seed_h as u64 * g.seed_w as u64, g.seed_w as u64);
        Self { flat: g.seed_d == 1, hw: Divisor::new(hw), w: Divisor::new(w) }
    }

    #[inline(always)]
    fn position(&self, cell: u64) -> [u64; 3] {
        if self.flat {
            let (y, x) = self.w.div_rem(cell);
            return [0, y, x];
        }
        let (z, rest) = self.hw.div_rem(cell);
        let (y, x) = self.w.div_rem(rest);
        [z, y, x]
    }
}

/// Division by a fixed `d`: for 32-bit numerators and divisors the quotient is
/// the high word of `n · ⌈2^64 / d⌉` (Lemire, Kaser & Kurz, "Faster remainder by
/// direct computation", 2019), else a plain division.
struct Divisor {
    d: u64,
    magic: u64,
}

impl Divisor {
    fn new(d: u64) -> Self {
        let magic = if (1..1 << 32).contains(&d) { (u64::MAX / d).wrapping_add(1) } else { 0 };
        Self { d, magic }
    }

    #[inline(always)]
    fn div_rem(&self, n: u64) -> (u64, u64) {
        if n >> 32 == 0 && self.magic != 0 {
            let q = ((self.magic as u128 * n as u128) >> 64) as u64;
            (q, n - q * self.d)
        } else {
            (n / self.d, n % self.d)
        }
    }
}

/// Cells of one mask plane, `D·H·W`.
fn plane_cells(g: &abi::DropBlockGeometry) -> usize {
    g.d as usize * g.h as usize * g.w as usize
}

/// The blocks of seeds, clipped to a shard's box: what a seed's block needs,
/// derived once a tile, so that a seed costs its position, three clamps and a
/// read-modify-write of two words per row of its block.
struct Blocks {
    grid: SeedGrid,
    /// Whether every seed of the grid reaches the box (always for whole planes): no
    /// test a seed.
    whole: bool,
    /// `[lo, hi)` of the seeds that reach the box, along `[D, H, W]`.
    seeds: [(u32, u32); 3],
    /// Per axis: a seed at `i` covers `[i - shift, i - shift + k)` of the box's
    /// cells (`shift` = anchor + the box's origin), clipped to `[0, extent)`.
    shift: [i64; 3],
    k: [i64; 3],
    extent: [i64; 3],
    /// `Σ 2^(r·W)` over the block's rows `r < kh` when a whole block slab (`kh`
    /// rows `W` apart, `kw ≤ 64` wide) spans at most 128 bits, else 0: a run times
    /// its low `n·W` bits is the slab of `n` rows, ORed as one 128-bit pattern
    /// (three words) instead of two words a row. Each row's OR read the words the
    /// one before had just written, a chain through memory on narrow planes.
    stack: u128,
    /// Whether no block of a seed that reaches the box is clipped by it (Valid
    /// placement on whole planes): every block is then the same pattern, `slab`
    /// (with `stack`) or `kh` runs `run` of `kw` cells, from the seed's own bit
    /// less `lead`, with no clamps a seed.
    unclipped: bool,
    lead: i64,
    run: u64,
    slab: u128,
    /// Unclipped whole planes of up to `OFFSET_TABLE_CELLS` seed cells: each seed
    /// cell's first block bit less the plane's, so a seed costs one load instead of
    /// a division into (z, y, x) and the multiplications back (empty otherwise).
    offsets: Vec<u32>,
}

/// The most seed cells a plane's offset table holds (16 KiB, in L1 with the tile;
/// 8192 made the 3D benchmark shape's sampling 9 % slower, 2026-12-01).
const OFFSET_TABLE_CELLS: u64 = 4096;

impl Blocks {
    fn new(g: &abi::DropBlockGeometry, seed_box: &SeedBox) -> Self {
        let anchor = [g.anchor_z, g.anchor_y, g.anchor_x];
        let k = [g.kd, g.kh, g.kw];
        let all = [(0, g.seed_d), (0, g.seed_h), (0, g.seed_w)];
        let shift: [i64; 3] = std::array::from_fn(|i| anchor[i] as i64 + seed_box.origin[i] as i64);
        let (k, extent) = (k.map(i64::from), seed_box.extent.map(i64::from));
        let seeds = seed_box.seeds;
        // A block as wide as the box or less on every axis (so `run · stack`, when
        // `stack` is set, is the whole block within 128 bits).
        let unclipped = (0..3).all(|i| {
            let (lo, hi) = (seeds[i].0 as i64, seeds[i].1 as i64);
            k[i] <= extent[i] && (lo >= hi || (lo - shift[i] >= 0 && hi - 1 - shift[i] + k[i] <= extent[i]))
        });
        let stack = row_stack(g.kh, g.kw, seed_box.extent[2]);
        let run = u64::MAX >> (WORD as i64 - k[2].min(WORD as i64));
        let lead = (shift[0] * extent[1] + shift[1]) * extent[2] + shift[2];
        let grid = SeedGrid::new(g);
        let whole = seeds == all;
        let plane = extent.iter().product::<i64>();
        let offsets = if whole && unclipped && g.seed_cells <= OFFSET_TABLE_CELLS && plane <= u32::MAX as i64 {
            (0..g.seed_cells)
                .map(|cell| {
                    let [z, y, x] = grid.position(cell).map(|v| v as i64);
                    ((z * extent[1] + y) * extent[2] + x - lead) as u32
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            grid,
            whole,
            seeds,
            shift,
            k,
            extent,
            stack,
            unclipped,
            lead,
            run,
            slab: if unclipped { run as u128 * stack } else { 0 },
            offsets,
        }
    }

    /// ORs the part in the box of the block of the seed at seed cell `cell` into
    /// `out`, for the local plane whose cell 0 is bit `base`: a run of the block's
    /// width per (depth, row) it covers. Seeds outside the box reach no cell of it
    /// and are skipped.
    #[inline(always)]
    fn grow(&self, base: usize, cell: u64, out: &mut [u64]) {
        if let Some(&offset) = self.offsets.get(cell as usize) {
            return self.grow_unclipped(base + offset as usize, out);
        }
        let at = self.grid.position(cell).map(|v| v as u32);
        if !self.whole && !at.iter().zip(&self.seeds).all(|(&v, &(lo, hi))| v >= lo && v < hi) {
            return;
        }
        let (h, w) = (self.extent[1] as usize, self.extent[2] as usize);
        if self.unclipped {
            let first =
                (base + (at[0] as usize * h + at[1] as usize) * w + at[2] as usize).wrapping_sub(self.lead as usize);
            return self.grow_unclipped(first, out);
        }
        // The seed reaches the box, so each axis's span is not empty.
        let span = |i: usize| {
            let lo = at[i] as i64 - self.shift[i];
            debug_assert!(lo + self.k[i] > 0 && lo < self.extent[i], "a seed that misses the box, axis {i}");
            (lo.max(0) as usize, (lo + self.k[i]).min(self.extent[i]) as usize)
        };
        let ((z0, z1), (r0, r1), (c0, c1)) = (span(0), span(1), span(2));
        let width = c1 - c0;
        let run = u64::MAX >> (WORD - width.min(WORD));
        let rows = self.stack & (u128::MAX >> (128 - ((r1 - r0) * w).min(128)));
        let first = base + (z0 * h + r0) * w + c0;
        self.or_block(out, first, (z1 - z0, r1 - r0, width), run, run as u128 * rows);
    }

    /// ORs a whole block (no clip: [`Blocks::unclipped`]) whose first bit is
    /// `first`.
    #[inline(always)]
    fn grow_unclipped(&self, first: usize, out: &mut [u64]) {
        if self.stack != 0 && self.k[0] == 1 {
            return or_slab(out, first, self.slab);
        }
        let k = self.k.map(|k| k as usize);
        self.or_block(out, first, (k[0], k[1], k[2]), self.run, self.slab);
    }

    /// ORs a block of `depths` x `rows` x `width` cells whose first bit is `first`:
    /// `slab` (its rows stacked) a depth where `stack` is set, else `run` (`width`
    /// low bits) a row.
    #[inline(always)]
    fn or_block(
        &self,
        out: &mut [u64],
        first: usize,
        (depths, rows, width): (usize, usize, usize),
        run: u64,
        slab: u128,
    ) {
        let (h, w) = (self.extent[1] as usize, self.extent[2] as usize);
        for z in 0..depths {
            let at = first + z * h * w;
            if self.stack != 0 {
                or_slab(out, at, slab);
                continue;
            }
            for r in 0..rows {
                let at = at + r * w;
                if width <= WORD {
                    or_run(out, at, run);
                } else {
                    set_bits(out, at, at + width);
                }
            }
        }
    }
}

/// Grows one plane's seeds into blocks with `plan`'s geometry: `seeds` as
/// [`Plan::seed_plane`] gives them (`⌈S/64⌉` words, bit `i` for seed cell
/// `i = (z · seed_h + y) · seed_w + x`) become the plane's dropped cells in `out`
/// (`⌈D·H·W/64⌉` words, bit `(d · H + h) · W + w`, cleared first). Returns the number of dropped cells, or
/// an error when a buffer's length does not match the geometry.
pub fn grow_blocks(plan: &Plan, seeds: &[u64], out: &mut [u64]) -> Result<u64> {
    let g = plan.geometry();
    let seed_words = g.seed_cells.div_ceil(WORD as u64) as usize;
    if seeds.len() != seed_words {
        return Err(Error::LengthMismatch { what: "seed words", expected: seed_words, actual: seeds.len() });
    }
    let cells = plane_cells(g);
    if out.len() != cells.div_ceil(WORD) {
        return Err(Error::LengthMismatch { what: "plane words", expected: cells.div_ceil(WORD), actual: out.len() });
    }
    out.fill(0);
    let blocks = Blocks::new(g, &SeedBox::whole(g));
    for (k, &word) in seeds.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let cell = (k * WORD) as u64 + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            if cell < g.seed_cells {
                blocks.grow(0, cell, out);
            }
        }
    }
    Ok(count_range(out, 0, cells))
}

/// ORs `run` (up to 64 bits) into the bits from `at` on: its part in at's word and
/// the rest in the next, without a branch on where the run crosses (block rows
/// fall anywhere).
#[inline(always)]
fn or_run(words: &mut [u64], at: usize, run: u64) {
    if or_unaligned(words, at, run) {
        return;
    }
    let (i, bit) = (at / WORD, at % WORD);
    words[i] |= run << bit;
    let spill = (run >> 1) >> (WORD - 1 - bit);
    match words.get_mut(i + 1) {
        Some(next) => *next |= spill,
        None => debug_assert_eq!(spill, 0, "a run at bit {at} runs past the words"),
    }
}

/// ORs `pattern` into the bits from `at` on as one read-modify-write of the 8
/// bytes from byte `at / 8`, unaligned, where the pattern shifted by `at % 8` fits
/// them (its top 7 bits clear) and they lie in `words`: a 3-wide run (k = 3 on
/// 76-cell rows) or a 3x3 slab on 19-cell rows then costs one access where the
/// word forms cost two or three, each soon after the block's previous row wrote its
/// neighbour (sampling 5-6 % and 3 % faster, 2026-12-01; a 16-byte form for wider
/// slabs measured 2 % slower). False, having done nothing, otherwise, and on
/// big-endian targets (where bit `b` is not in byte `b / 8`).
#[inline(always)]
fn or_unaligned(words: &mut [u64], at: usize, pattern: u64) -> bool {
    if cfg!(target_endian = "big") || pattern >> 57 != 0 {
        return false;
    }
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(words);
    let Some(span) = bytes.get_mut(at / 8..at / 8 + 8) else {
        return false;
    };
    let b: &mut [u8; 8] = span.try_into().expect("8 bytes");
    *b = (u64::from_le_bytes(*b) | pattern << (at % 8)).to_le_bytes();
    true
}

/// [`Blocks::stack`] for blocks of `kh × kw` cells in rows of `w` cells.
fn row_stack(kh: u32, kw: u32, w: u32) -> u128 {
    let (kh, kw, w) = (kh as u64, kw.min(w) as u64, w as u64);
    if kw > WORD as u64 || (kh - 1) * w + kw > 128 {
        return 0;
    }
    (0..kh).fold(0, |m, r| m | 1u128 << (r * w))
}

/// ORs `slab` (up to 128 bits) into the bits from `at` on: three words, without a
/// branch on where it crosses.
#[inline(always)]
fn or_slab(words: &mut [u64], at: usize, slab: u128) {
    if slab >> 64 == 0 && or_unaligned(words, at, slab as u64) {
        return;
    }
    let (i, bit) = (at / WORD, at % WORD);
    let low = slab << bit;
    let spill = [(low >> WORD) as u64, ((slab >> 1) >> (127 - bit)) as u64];
    words[i] |= low as u64;
    for (j, part) in spill.into_iter().enumerate() {
        match words.get_mut(i + 1 + j) {
            Some(next) => *next |= part,
            None => debug_assert_eq!(part, 0, "a slab at bit {at} runs past the words"),
        }
    }
}

/// Sets bits `[lo, hi)` (runs wider than a word; [`or_run`] sets the others).
fn set_bits(words: &mut [u64], lo: usize, hi: usize) {
    let mut i = lo;
    while i < hi {
        let bit = i % WORD;
        let n = (WORD - bit).min(hi - i);
        words[i / WORD] |= (u64::MAX >> (WORD - n)) << bit;
        i += n;
    }
}

/// How many of bits `[lo, hi)` are set.
fn count_range(words: &[u64], lo: usize, hi: usize) -> u64 {
    if lo >= hi {
        return 0;
    }
    let (first, last) = (lo / WORD, (hi - 1) / WORD);
    let head = words[first] & (u64::MAX << (lo % WORD));
    let tail = u64::MAX >> (WORD - 1 - (hi - 1) % WORD);
    if first == last {
        return (head & tail).count_ones() as u64;
    }
    head.count_ones() as u64 + popcount(&words[first + 1..last]) + (words[last] & tail).count_ones() as u64
}

/// The set bits of `words`. The counts run over every mask bit of a call: the
/// baseline's software popcount cost ~10% of a forward's sampling, and with AVX2 the
/// compiler counts four words a step (a nibble table in `vpshufb`) where `popcnt`
/// counts one.
fn popcount(words: &[u64]) -> u64 {
    #[inline(always)]
    fn body(words: &[u64]) -> u64 {
        words.iter().map(|w| w.count_ones() as u64).sum()
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,popcnt")]
        fn avx2(words: &[u64]) -> u64 {
            body(words)
        }
        #[target_feature(enable = "popcnt")]
        fn popcnt(words: &[u64]) -> u64 {
            body(words)
        }
        if cpu_has!("avx2", "popcnt") {
            // SAFETY: the CPU was just found to have both.
            return unsafe { avx2(words) };
        }
        if cpu_has!("popcnt") {
            // SAFETY: as above.
            return unsafe { popcnt(words) };
        }
    }
    body(words)
}

#[cfg(test)]
mod tests {
    use super::{count_range, grow_blocks, set_bits, transpose64, Blocks, Divisor};
    use crate::config::{Anchor, Block, DropBlockConfig, Placement, Shape};
    use crate::rng::RngKey;
    use crate::sampling::Plan;
    use crate::shard::{SeedBox, Shard};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn transpose64_moves_bit_j_of_row_i_to_bit_i_of_row_j() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut a = [0u64; 64];
        for row in a.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *row = state;
        }
        let mut t = a;
        transpose64(&mut t);
        for (i, row) in a.iter().enumerate() {
            for (j, col) in t.iter().enumerate() {
                assert_eq!(col >> i & 1, row >> j & 1, "row {i} bit {j}");
            }
        }
    }

    /// A random 1-3D plane of one sample and channel, block (sides up to `max_k(d)`
    /// for a side of `d`), placement and anchor: its size, block and plan.
    fn random_plane(
        rng: &mut StdRng,
        sides: [usize; 3],
        max_k: impl Fn(usize) -> usize,
    ) -> (Vec<usize>, Vec<u32>, Plan) {
        let rank = rng.random_range(1..=3);
        let dims: Vec<usize> = (0..rank).map(|_| rng.random_range(1..=sides[rank - 1])).collect();
        let ks: Vec<u32> = dims.iter().map(|&d| rng.random_range(1..=max_k(d)) as u32).collect();
        let shape = Shape::from_dims(&[[1, 1].as_slice(), &dims].concat()).unwrap();
        let cfg = DropBlockConfig::builder(Block::from_sizes(&ks).unwrap(), 0.1)
            .placement([Placement::Valid, Placement::Anywhere][rng.random_range(0..2)])
            .anchor([Anchor::Centered, Anchor::CenteredRight][rng.random_range(0..2)])
            .build()
            .unwrap();
        (dims, ks, Plan::new(&cfg, shape, RngKey::new(1, 0).unwrap()).unwrap())
    }

    /// Whether a seed at `seed` covers cell `cell` along an axis: the contract's
    /// `[seed - anchor, seed - anchor + k)`.
    fn covers(cell: i64, seed: u64, anchor: u32, k: u32) -> bool {
        (0..k as i64).contains(&(cell - seed as i64 + anchor as i64))
    }

    /// Blocks grown from random seeds equal a per-cell test of the contract's
    /// coverage, over 1D, 2D and 3D planes, every placement and anchor, and blocks
    /// both narrower and wider than a 64-bit word.
    #[test]
    fn grown_blocks_cover_what_their_seeds_reach() {
        let mut rng = StdRng::seed_from_u64(0x5EED_B10C);
        for case in 0..300 {
            let wide = rng.random_bool(0.3);
            let (dims, ks, plan) = random_plane(&mut rng, [300, 140, 12], |d| if wide { 2 * d } else { 9 });
            let g = *plan.geometry();
            let density = rng.random_range(1..=40);
            let mut seeds = vec![0u64; g.seed_cells.div_ceil(64) as usize];
            for cell in 0..g.seed_cells as usize {
                seeds[cell / 64] |= ((rng.random_range(0..density) == 0) as u64) << (cell % 64);
            }
            let cells = (g.d * g.h * g.w) as usize;
            let mut out = vec![0u64; cells.div_ceil(64)];
            let dropped = grow_blocks(&plan, &seeds, &mut out).unwrap();

            let seed_at = |z: u32, y: u32, x: u32| {
                let i = ((z * g.seed_h + y) * g.seed_w + x) as usize;
                seeds[i / 64] >> (i % 64) & 1 == 1
            };
            let mut expected = 0;
            for z in 0..g.d {
                for y in 0..g.h {
                    for x in 0..g.w {
                        let on = |c: u32, s: u32, anchor, k| covers(c as i64, s as u64, anchor, k);
                        let hit = (0..g.seed_d).filter(|&sz| on(z, sz, g.anchor_z, g.kd)).any(|sz| {
                            (0..g.seed_h).filter(|&sy| on(y, sy, g.anchor_y, g.kh)).any(|sy| {
                                (0..g.seed_w).filter(|&sx| on(x, sx, g.anchor_x, g.kw)).any(|sx| seed_at(sz, sy, sx))
                            })
                        });
                        let b = ((z * g.h + y) * g.w + x) as usize;
                        assert_eq!(
                            out[b / 64] >> (b % 64) & 1 == 1,
                            hit,
                            "case {case}: {dims:?} k {ks:?} cell {z},{y},{x}"
                        );
                        expected += hit as u64;
                    }
                }
            }
            assert_eq!(dropped, expected, "case {case}");
            assert_eq!(count_range(&out, cells, out.len() * 64), 0, "case {case}: bits past the plane");
        }
    }

    /// A shard's blocks are the whole plane's, cut to its box: random seeds of the
    /// grid grown into a random box of a random plane, against a per-cell test of
    /// the global cells the box holds.
    #[test]
    fn blocks_in_a_shard_box_are_the_whole_planes_cut_to_it() {
        let mut rng = StdRng::seed_from_u64(0xB0C5);
        for case in 0..300 {
            let (dims, ks, plan) = random_plane(&mut rng, [150, 40, 10], |d| d + 3);
            let g = *plan.geometry();
            let (mut offset, mut extent) = (vec![0, 0], vec![1, 1]);
            for n in [g.d, g.h, g.w].map(|v| v as usize).into_iter().skip(3 - dims.len()) {
                let o = rng.random_range(0..n);
                offset.push(o);
                extent.push(rng.random_range(1..=n - o));
            }
            let global = Shape::from_dims(&[[1, 1].as_slice(), &dims].concat()).unwrap();
            let shard = Shard::new(global, &offset, &extent).unwrap();
            let seed_box = SeedBox::new(&plan, &shard).unwrap();
            let blocks = Blocks::new(&g, &seed_box);
            let local = shard.local().volume();
            let mut out = vec![0u64; (local.iter().product::<usize>()).div_ceil(64)];
            let mut seeds = Vec::new();
            for cell in 0..g.seed_cells {
                if rng.random_range(0..8) == 0 {
                    blocks.grow(0, cell, &mut out);
                    seeds.push(blocks.grid.position(cell));
                }
            }
            let origin = seed_box.origin.map(|v| v as i64);
            let mut i = 0;
            for z in 0..local[0] as i64 {
                for y in 0..local[1] as i64 {
                    for x in 0..local[2] as i64 {
                        let at = [z + origin[0], y + origin[1], x + origin[2]];
                        let hit = seeds.iter().any(|s| {
                            covers(at[0], s[0], g.anchor_z, g.kd)
                                && covers(at[1], s[1], g.anchor_y, g.kh)
                                && covers(at[2], s[2], g.anchor_x, g.kw)
                        });
                        let ctx = format!("case {case}: {dims:?} k {ks:?} box {offset:?}+{extent:?} cell {at:?}");
                        assert_eq!(out[i / 64] >> (i % 64) & 1 == 1, hit, "{ctx}");
                        i += 1;
                    }
                }
            }
            assert_eq!(count_range(&out, i, out.len() * 64), 0, "case {case}: bits past the box");
        }
    }

    #[test]
    fn divisor_matches_division() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut divisors = vec![1, 2, 3, 7, 64, 74, 5476, (1 << 31) + 1, u32::MAX as u64, 1 << 32, u64::MAX];
        divisors.extend((0..200).map(|_| next() >> (next() % 64)).filter(|&d| d > 0));
        for d in divisors {
            let div = Divisor::new(d);
            let mut numerators =
                vec![0, 1, d - 1, d, d.saturating_add(1), d.saturating_mul(3), u32::MAX as u64, 1 << 32, u64::MAX];
            numerators.extend((0..200).map(|_| next() >> (next() % 64)));
            for n in numerators {
                assert_eq!(div.div_rem(n), (n / d, n % d), "{n} / {d}");
            }
        }
    }

    #[test]
    fn set_and_count_span_words() {
        let mut w = [0u64; 3];
        set_bits(&mut w, 60, 130);
        assert_eq!(w[0], 0xF000_0000_0000_0000);
        assert_eq!(w[1], u64::MAX);
        assert_eq!(w[2], 0b11);
        assert_eq!(count_range(&w, 0, 192), 70);
        assert_eq!(count_range(&w, 61, 129), 68);
        assert_eq!(count_range(&w, 64, 64), 0);
        let mut v = [0u64; 1];
        set_bits(&mut v, 3, 3);
        assert_eq!(v[0], 0);
    }
}
