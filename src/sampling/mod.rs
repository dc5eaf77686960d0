//! The sampling contract: geometry, γ, thresholds and the window sampler.
//!
//! Everything here is computed on the host and is shared by the CPU path and the
//! CUDA kernels (which receive [`abi::DropBlockGeometry`] and
//! [`abi::DropBlockSampling`] by value), so the two agree bit for bit. See the crate
//! documentation for the contract in prose.

use crate::abi;
use crate::config::{Anchor, DropBlockConfig, GammaRule, Placement, Shape, Sharing};
use crate::error::{host_vec, Error, Result};
use crate::rng::{RngKey, LANES};
use num_bigint::BigUint;

#[cfg(all(target_arch = "x86_64", dropblock_avx512))]
mod avx512;

const WINDOW: u32 = abi::DROPBLOCK_WINDOW_CELLS;
/// 2^-38: below it every threshold is 0.
const MIN_SEEDING_GAMMA: f64 = 1.0 / (1u64 << 38) as f64;
/// The CPU search's table covers draws in 2^20-wide steps (16 KiB): at DropBlock's
/// rates the thresholds lie more than 2^20 apart, so one step's entry settles a
/// draw with one compare.
const GAP_TABLE_BITS: u32 = 12;
const STEP_BITS: u32 = 32 - GAP_TABLE_BITS;
/// A [`Plan::gap_steps`] entry's flag: its step holds two thresholds or more.
const CROWDED: u32 = 1 << 23;
const SPLIT: u32 = (1 << (STEP_BITS + 1)) - 1;

/// Everything one call needs, derived once from the configuration, the shape and
/// the key.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub(crate) geometry: abi::DropBlockGeometry,
    pub(crate) sampling: abi::DropBlockSampling,
    gamma: f64,
    /// For each value of a draw's top [`GAP_TABLE_BITS`] bits (a step of 2^20
    /// draws): the first threshold `g0` such a draw can fall under (bits 24 on),
    /// and the draw in the step, from its start, at which draws reach `T[g0]`
    /// ([`SPLIT`]'s bits; 2^20 when none does). One load and one compare give a
    /// draw's gap, but in a step marked [`CROWDED`], where the search goes on.
    gap_steps: [u32; 1 << GAP_TABLE_BITS],
    /// The thresholds and `T[64] = ∞`, so a search may step past the window's end.
    gap_thresholds: [u64; WINDOW as usize + 1],
}

impl Plan {
    /// The plan of a call of `cfg` on `shape` with `key`: geometry, γ and
    /// thresholds. Errors if the block's rank is not the shape's
    /// ([`Error::BlockRankMismatch`]), or, under [`GammaRule::ExactRate`], if the
    /// block is too large for the exact sum ([`Error::TooManyCoverageClasses`]).
    pub fn new(cfg: &DropBlockConfig, shape: Shape, key: RngKey) -> Result<Self> {
        let block = cfg.block().sizes_for(shape.spatial_rank())?;
        let geometry = geometry(cfg, shape, block);
        let gamma = gamma(cfg, shape, block, &geometry)?;
        let sampling = abi::DropBlockSampling { seed: key.seed(), offset: key.offset(), thresholds: thresholds(gamma) };
        let t = &sampling.thresholds;
        let gap_thresholds: [u64; WINDOW as usize + 1] = std::array::from_fn(|g| t.get(g).copied().unwrap_or(u64::MAX));
        // One sweep: g0 is the count of thresholds at or under a step's first draw.
        let mut gap_steps = [0u32; 1 << GAP_TABLE_BITS];
        let mut g = 0;
        for (b, step) in gap_steps.iter_mut().enumerate() {
            let (lo, hi) = ((b as u64) << STEP_BITS, (b as u64 + 1) << STEP_BITS);
            while g < t.len() && t[g] <= lo {
                g += 1;
            }
            let next = gap_thresholds[g];
            *step = (g as u32) << 24
                | match next < hi {
                    false => 1 << STEP_BITS,
                    true if gap_thresholds[g + 1] < hi => CROWDED | (next - lo) as u32,
                    true => (next - lo) as u32,
                };
        }
        Ok(Self { geometry, sampling, gamma, gap_steps, gap_thresholds })
    }

    /// What [`Self::new`] refuses for `cfg` on `shape`, checked without planning:
    /// a block of another rank, and under [`GammaRule::ExactRate`] a block too large
    /// for the exact sum. Eval and rate-0 calls, which plan nothing, check this so
    /// that they refuse what a training call would, not the first training step.
    pub(crate) fn check(cfg: &DropBlockConfig, shape: Shape) -> Result<()> {
        let block = cfg.block().sizes_for(shape.spatial_rank())?;
        if cfg.gamma_rule() == GammaRule::ExactRate && sums_coverage(cfg.drop_prob()) {
            coverage_axes(&geometry(cfg, shape, block))?;
        }
        Ok(())
    }

    /// The per-cell seed rate γ (before clamping to [0, 1] in the thresholds).
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// The geometry the kernels receive: shape, clipped block, seed grid, planes, windows.
    pub fn geometry(&self) -> &abi::DropBlockGeometry {
        &self.geometry
    }

    /// The sampling parameters the kernels receive: seed, offset and thresholds.
    pub fn sampling(&self) -> &abi::DropBlockSampling {
        &self.sampling
    }

    /// The call's `(seed, offset)`.
    pub fn key(&self) -> RngKey {
        RngKey::new(self.sampling.seed, self.sampling.offset).expect("validated when the key was made")
    }

    /// Number of mask planes.
    pub fn planes(&self) -> usize {
        self.geometry.planes as usize
    }

    /// The same plan with another key: what a call with a new key needs, without
    /// deriving γ and the thresholds again.
    pub fn with_key(&self, key: RngKey) -> Self {
        let mut plan = *self;
        plan.sampling.seed = key.seed();
        plan.sampling.offset = key.offset();
        plan
    }

    /// The mask plane that slice `(n, c)` reads ([`Error::OutOfRange`] past the
    /// shape's `N` or `C`).
    pub fn plane_of(&self, n: usize, c: usize) -> Result<usize> {
        let g = &self.geometry;
        for (what, value, len) in [("n", n, g.n), ("c", c, g.c)] {
            if value as u64 >= len as u64 {
                return Err(Error::OutOfRange { what, value: value as u64, len: len as u64 });
            }
        }
        Ok(plane_of(g.sharing, g.c as usize, n, c))
    }

    /// Seed cells per plane, `S = seed_d · seed_h · seed_w`.
    pub fn seed_cells(&self) -> u64 {
        self.geometry.seed_cells
    }

    /// Windows of the call: `⌈planes / q⌉ · m`.
    pub fn windows(&self) -> u64 {
        self.geometry.windows
    }

    /// How many cells window `window` holds (1..=64).
    pub fn window_len(&self, window: u64) -> Result<u32> {
        if window >= self.geometry.windows {
            return Err(Error::OutOfRange { what: "window", value: window, len: self.geometry.windows });
        }
        Ok(window_len(&self.geometry, window))
    }

    /// The seeds of `plane` as bits: bit `i % 64` of word `i / 64` is set when seed
    /// cell `i = (z · seed_h + y) · seed_w + x` holds a seed. Returns `⌈S / 64⌉` words.
    pub fn seed_plane(&self, plane: usize) -> Result<Vec<u64>> {
        if plane as u64 >= self.geometry.planes {
            return Err(Error::OutOfRange { what: "plane", value: plane as u64, len: self.geometry.planes });
        }
        let g = &self.geometry;
        let mut out = host_vec(g.seed_cells.div_ceil(WINDOW as u64) as usize, |_| 0u64)?;
        let q = g.planes_per_window as u64;
        if g.seed_cells <= WINDOW as u64 {
            let window = plane as u64 / q;
            let shift = (plane as u64 % q) * g.seed_cells;
            let word = self.walk_window(window, window_len(g, window)) >> shift;
            out[0] = word & low_bits(g.seed_cells as u32);
        } else {
            for (i, word) in out.iter_mut().enumerate() {
                let window = plane as u64 * g.windows_per_group + i as u64;
                *word = self.walk_window(window, window_len(g, window));
            }
        }
        Ok(out)
    }

    /// The contract's walk over a window of `len` (1..=64) cells numbered
    /// `window`: its seeds as bits, bit `j` for the window's `j`-th cell. One draw
    /// per seed plus one stop draw. (Any window number is accepted, so the walk can
    /// be studied on its own; [`Plan::window_len`] gives the calls' lengths.)
    pub fn sample_window(&self, window: u64, len: u32) -> Result<u64> {
        if !(1..=WINDOW).contains(&len) {
            return Err(Error::InvalidWindowLength(len));
        }
        Ok(self.walk_window(window, len))
    }

    pub(crate) fn walk_window(&self, window: u64, len: u32) -> u64 {
        let mut found = [0u32; WINDOW as usize + 1];
        let n = self.walk_into(window, len, self.key().block(window, 0), 0, &mut found, 0);
        found[..n].iter().fold(0, |bits, &j| bits | 1 << j)
    }

    /// Walks windows `windows`, window `w` of `len(w)` (1..=64) cells, and calls
    /// `seeds(ids, found)` once a batch of [`LANES`] windows that finds a seed:
    /// `ids` are the batch's windows and `found` its seeds, each once and in no
    /// given order, `lane << 6 | j` for the `j`-th cell of window `ids[lane]`. The windows' first Philox blocks
    /// are drawn [`LANES`] at a time (SIMD lanes), as most windows end at their
    /// first draw; `len` is also asked of up to `LANES - 1` windows past the range's
    /// end, and must not panic there.
    #[inline(always)]
    pub(crate) fn walk(
        &self,
        windows: std::ops::Range<u64>,
        len: impl Fn(u64) -> u32,
        seeds: impl FnMut(&[u64; LANES], &[u32]),
    ) {
        let start = windows.start;
        self.walk_by(windows.end.saturating_sub(start), |i| start + i, len, seeds);
    }

    /// [`Plan::walk`] over the windows listed in `windows`, in order (the windows
    /// a shard needs: short runs in each plane, batched across them).
    #[inline(always)]
    pub(crate) fn walk_list(
        &self,
        windows: &[u64],
        len: impl Fn(u64) -> u32,
        seeds: impl FnMut(&[u64; LANES], &[u32]),
    ) {
        let last = windows.len().saturating_sub(1);
        self.walk_by(windows.len() as u64, |i| windows[(i as usize).min(last)], len, seeds);
    }

    /// Walks windows `window(0) .. window(count - 1)` (`window` is also asked of up
    /// to `LANES - 1` indices past `count`).
    ///
    /// The seeds are listed, not handed over a window at a time: a batch's only
    /// data-dependent branches are then the ends of its two loops, over the seeded
    /// windows and over the seeds, where a loop over each window's seed bits
    /// mispredicted about once a seeded window (19x19, k = 3: the walk of a seeded
    /// window took ~12 ns, its blocks ~2 ns).
    #[inline(always)]
    fn walk_by(
        &self,
        count: u64,
        window: impl Fn(u64) -> u64,
        len: impl Fn(u64) -> u32,
        mut seeds: impl FnMut(&[u64; LANES], &[u32]),
    ) {
        // Every listed seed is a distinct cell of one of the batch's windows, plus
        // the slot that the draw which stops the last walk writes.
        let mut found = [0u32; LANES * WINDOW as usize + 1];
        let wide = avx512_available();
        let mut first = 0;
        while first < count {
            // Plain loops: `array::map` was left out of line, a call a batch.
            let (mut ids, mut lens) = ([0u64; LANES], [0u32; LANES]);
            for i in 0..LANES {
                ids[i] = window(first + i as u64);
                lens[i] = len(ids[i]);
            }
            let blocks = self.key().first_blocks(ids);
            let live = low_bits((count - first).min(LANES as u64) as u32) as u32;
            let n = self.list_batch((&ids, &lens, &blocks), live, wide, &mut found);
            if n > 0 {
                seeds(&ids, &found[..n]);
            }
            first += LANES as u64;
        }
    }

    /// The seeds of a batch's windows `ids` of `lens` cells (the lanes in `live`)
    /// whose first counter blocks are `blocks`, listed in `found` from its start;
    /// returns their count. With `wide` ([`avx512_available`]), the first blocks'
    /// draws are searched in AVX-512 lanes unless one falls in a crowded step.
    #[inline(always)]
    fn list_batch(
        &self,
        (ids, lens, blocks): (&[u64; LANES], &[u32; LANES], &[[u32; LANES]; 4]),
        live: u32,
        wide: bool,
        found: &mut [u32],
    ) -> usize {
        #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
        // SAFETY: `wide` says `avx512::available` found the features.
        if let Some((mut n, mut more, next)) =
            wide.then(|| unsafe { self.first_draws_avx512(lens, blocks, live, found) }).flatten()
        {
            // The walks that go on past their first block.
            while more != 0 {
                let i = more.trailing_zeros() as usize;
                more &= more - 1;
                let (tag, block) = ((i as u32) << 6, self.key().block(ids[i], 1));
                n = self.walk_on(ids[i], lens[i], (block, next[i], 2), tag, found, n);
            }
            return n;
        }
        let _ = wide;
        self.first_draws(ids, lens, blocks, live, found)
    }

    /// [`Plan::list_batch`] by the scalar form: each seeded window walked whole.
    #[inline(always)]
    fn first_draws(
        &self,
        ids: &[u64; LANES],
        lens: &[u32; LANES],
        blocks: &[[u32; LANES]; 4],
        live: u32,
        found: &mut [u32],
    ) -> usize {
        // The windows with a seed: a first draw under the whole window's
        // threshold. One bit a lane, so that the ~half of the windows that end
        // at their first draw cost no branch each.
        let mut seeded = 0u32;
        for (i, &n) in lens.iter().enumerate() {
            seeded |= (((blocks[0][i] as u64) < self.sampling.thresholds[n as usize - 1]) as u32) << i;
        }
        seeded &= live;
        let mut n = 0;
        while seeded != 0 {
            let i = seeded.trailing_zeros() as usize;
            seeded &= seeded - 1;
            let block = [blocks[0][i], blocks[1][i], blocks[2][i], blocks[3][i]];
            n = self.walk_into(ids[i], lens[i], block, (i as u32) << 6, found, n);
        }
        n
    }

    /// The walk of window `window` of `len` cells whose first counter block
    /// (`key.block(window, 0)`) is `first`, a counter block at a time: lists its
    /// seeds as `tag | j` in `found` from `found[n]` on, and returns the new count.
    ///
    /// The contract's walk is sequential only through its position: a draw `u`
    /// places its seed `G(u)` cells on, `G(u)` the smallest `g` with `u < T[g]`
    /// (64 if none), whatever the position, and it stops the walk exactly when that
    /// seed would fall at or past the window's end (`u >= T[r-1]` is `G(u) >= r`, as
    /// `T` is monotone: [`thresholds`] makes it so). So a block's four draws are
    /// four independent searches and a running sum; each is written to the list
    /// and counted only when it falls in the window (positions only grow, so after
    /// the first that falls past the end none counts), with no branch on which of
    /// them ends the walk.
    #[inline(always)]
    fn walk_into(&self, window: u64, len: u32, first: [u32; 4], tag: u32, found: &mut [u32], n: usize) -> usize {
        self.walk_on(window, len, (first, 0, 1), tag, found, n)
    }

    /// [`Plan::walk_into`] from counter block `block` (number `b - 1`), whose
    /// first draw places its seed from cell `pos` on.
    #[inline(always)]
    fn walk_on(
        &self,
        window: u64,
        len: u32,
        (mut block, mut pos, mut b): ([u32; 4], u32, u32),
        tag: u32,
        found: &mut [u32],
        mut n: usize,
    ) -> usize {
        loop {
            for u in block {
                let at = pos + self.gap(u);
                found[n] = tag | at.min(63);
                n += (at < len) as usize;
                pos = at + 1;
            }
            // Another block only when its fourth draw placed a seed before the end.
            if pos >= len {
                return n;
            }
            (block, b) = (self.key().block(window, b), b + 1);
        }
    }

    /// `G(u)`: the smallest `g` with `u < T[g]`, 64 if none. The entry of the
    /// draw's step settles it at DropBlock's rates with one load and one compare, no
    /// second load (thresholds lie over 2^20 apart but where they crowd, near 2^32
    /// at high γ or all near 0 at tiny γ); the loop is for crowded steps.
    #[inline(always)]
    fn gap(&self, u: u32) -> u32 {
        let step = self.gap_steps[(u >> STEP_BITS) as usize];
        let mut g = (step >> 24) + ((u & ((1 << STEP_BITS) - 1)) >= step & SPLIT) as u32;
        if step & CROWDED != 0 {
            while u as u64 >= self.gap_thresholds[g as usize] {
                g += 1;
            }
        }
        g
    }
}

/// Whether the sampler's AVX-512 form runs here ([`Plan::list_batch`]).
pub(crate) fn avx512_available() -> bool {
    #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
    return avx512::available();
    #[allow(unreachable_code)]
    false
}

/// The mask plane that slice `(n, c)` reads under `sharing` (a
/// `DROPBLOCK_SHARE_*`) in a tensor of `channels` channels: the one rule behind
/// [`Plan::plane_of`], a shard's own planes and the CUDA path's read-back.
#[inline]
pub(crate) fn plane_of(sharing: u32, channels: usize, n: usize, c: usize) -> usize {
    match sharing {
        abi::DROPBLOCK_SHARE_NONE => n * channels + c,
        abi::DROPBLOCK_SHARE_CHANNELS => n,
        abi::DROPBLOCK_SHARE_BATCH => c,
        _ => 0,
    }
}

/// `n` low bits set (n in 0..=64).
pub(crate) fn low_bits(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Cells of window `window` (which must be below `g.windows`).
pub(crate) fn window_len(g: &abi::DropBlockGeometry, window: u64) -> u32 {
    let (s, q, m) = (g.seed_cells, g.planes_per_window as u64, g.windows_per_group);
    if s <= WINDOW as u64 {
        // One window per group of q whole planes; the last group may be short.
        let planes = (g.planes - window * q).min(q);
        (planes * s) as u32
    } else {
        let i = window % m;
        (s - i * WINDOW as u64).min(WINDOW as u64) as u32
    }
}

/// One spatial axis of the geometry: the block's extent and anchor, and the seed
/// positions, for an axis of `size` cells and a block of `k` before clipping.
struct Axis {
    extent: u32,
    anchor: u32,
    seeds: u32,
}

fn axis(cfg: &DropBlockConfig, size: u32, k: u32) -> Axis {
    let kc = k.min(size);
    match (cfg.placement(), cfg.anchor()) {
        (Placement::Valid, _) => Axis { extent: kc, anchor: 0, seeds: size - kc + 1 },
        (Placement::Anywhere, Anchor::Centered) => Axis { extent: kc, anchor: kc / 2, seeds: size },
        // [i - (k-1)/2, i + k/2] with the unclipped k; a reach past the map's far
        // side changes nothing, so each side is cut to size - 1 (keeping the
        // extent within 2·size - 1 and k).
        (Placement::Anywhere, Anchor::CenteredRight) => {
            let before = ((k - 1) / 2).min(size - 1);
            let after = (k / 2).min(size - 1);
            Axis { extent: before + after + 1, anchor: before, seeds: size }
        }
    }
}

fn geometry(cfg: &DropBlockConfig, shape: Shape, block: [u32; 3]) -> abi::DropBlockGeometry {
    let size = shape.volume().map(|v| v as u32);
    let [z, y, x] = std::array::from_fn(|i| axis(cfg, size[i], block[i]));
    let sharing = match cfg.sharing() {
        Sharing::None => abi::DROPBLOCK_SHARE_NONE,
        Sharing::Channels => abi::DROPBLOCK_SHARE_CHANNELS,
        Sharing::Batch => abi::DROPBLOCK_SHARE_BATCH,
        Sharing::All => abi::DROPBLOCK_SHARE_ALL,
    };
    let planes = cfg.sharing().planes(shape);
    let seed_cells = z.seeds as u64 * y.seeds as u64 * x.seeds as u64;
    let planes_per_window = (WINDOW as u64 / seed_cells).max(1) as u32;
    let windows_per_group = seed_cells.div_ceil(WINDOW as u64);
    abi::DropBlockGeometry {
        n: shape.n() as u32,
        c: shape.c() as u32,
        d: size[0],
        h: size[1],
        w: size[2],
        kd: z.extent,
        kh: y.extent,
        kw: x.extent,
        anchor_z: z.anchor,
        anchor_y: y.anchor,
        anchor_x: x.anchor,
        seed_d: z.seeds,
        seed_h: y.seeds,
        seed_w: x.seeds,
        sharing,
        planes_per_window,
        seed_cells,
        windows_per_group,
        planes,
        windows: planes.div_ceil(planes_per_window as u64) * windows_per_group,
    }
}

/// γ for this configuration, shape and geometry, in f64.
fn gamma(cfg: &DropBlockConfig, shape: Shape, block: [u32; 3], g: &abi::DropBlockGeometry) -> Result<f64> {
    let p = cfg.drop_prob();
    let size = shape.volume().map(|v| v as u32);
    let clipped: [u32; 3] = std::array::from_fn(|i| block[i].min(size[i]));
    let base = match cfg.gamma_rule() {
        GammaRule::Paper => paper_gamma(p, size, clipped),
        GammaRule::ExactRate => exact_rate_gamma(p, g, paper_gamma(p, size, clipped))?,
        GammaRule::PerBlock => p / block.iter().fold(1.0, |acc, &k| acc * k as f64),
    };
    Ok(cfg.gamma_scale() * base)
}

/// The paper's Eq. 1 with the clipped block `k`: `p·∏S / (∏k · ∏(S-k+1))`. The
/// products run over all three axes in order; a unit axis multiplies by exactly
/// 1, so a 2D γ is what it was before 3D existed, bit for bit.
fn paper_gamma(p: f64, size: [u32; 3], k: [u32; 3]) -> f64 {
    let numerator = size.iter().fold(p, |acc, &s| acc * s as f64);
    let blocks = k.iter().fold(1.0, |acc, &k| acc * k as f64);
    let positions = size.iter().zip(&k).fold(blocks, |acc, (&s, &k)| acc * (s as f64 - k as f64 + 1.0));
    numerator / positions
}

/// Coverage classes (counts of seeds covering a cell, and their combinations over
/// the axes) that the exact drop fraction sums over, at most: 16 MiB of terms and
/// a few milliseconds an evaluation. Real blocks come nowhere near it (a 64 x 64
/// block has at most 65^2 classes, a 7 x 7 x 7 one 8^3). The product of the axes'
/// classes reaches it at blocks of about 1000 a side in 2D and 100 a side in 3D
/// (Valid placement; about twice that Anywhere), whose host plan would take
/// seconds a call, and which are refused instead.
pub const MAX_COVERAGE_CLASSES: u64 = 1 << 20;

/// For each count m, how many positions along one axis of the map are covered by
/// exactly m seed positions: `covered[m]`. Its `min(k, seeds) + 1` entries are
/// bounded by [`coverage`] before it is built.
///
/// Position `i` is covered by the seeds `s` with `s - anchor <= i < s - anchor + k`:
/// with `t = i + anchor`, by `min(seeds - 1, t) - max(0, t - k + 1) + 1` of them
/// (0 when that is not positive). Along `t` that count rises by one a step up to
/// `min(k, seeds) - 1`, stays at `min(k, seeds)` to `max(k, seeds) - 1`, falls by
/// one a step to 0 at `seeds + k - 1` and stays there: the rise and fall (at most
/// `2·min(k, seeds)` positions, bounded as above) are counted a position at a
/// time, the flat runs at once, so a long axis costs nothing more (ExactRate plans
/// every drawing call, and checks every eval call).
fn coverage_histogram(len: u32, k: u32, anchor: u32, seeds: u32) -> Vec<u64> {
    let (k, seeds) = (k as i64, seeds as i64);
    let top = k.min(seeds);
    let mut hist = vec![0u64; top as usize + 1];
    let (first, end) = (anchor as i64, anchor as i64 + len as i64);
    let clip = |a: i64, b: i64| (a.max(first), b.min(end));
    // The rise: t + 1 seeds at t < min(k, seeds) - 1.
    let (a, b) = clip(i64::MIN, top - 1);
    (a..b).for_each(|t| hist[(t + 1) as usize] += 1);
    // The plateau.
    let (a, b) = clip(top - 1, k.max(seeds) - 1);
    hist[top as usize] += (b - a).max(0) as u64;
    // The fall: seeds + k - 1 - t seeds, then none.
    let (a, b) = clip(k.max(seeds) - 1, seeds + k - 1);
    (a..b).for_each(|t| hist[(seeds + k - 1 - t) as usize] += 1);
    let (a, b) = clip(seeds + k - 1, i64::MAX);
    hist[0] += (b - a).max(0) as u64;
    hist
}

/// How many cells of a plane are covered by exactly `a`, `b` and `c` seed positions
/// along the three axes, as `(a·b·c, cells)`: the expected kept fraction is a sum
/// over these. (A unit axis contributes the one factor `(1, 1)`, so the 2D terms
/// and their order are what they were before 3D.)
/// Errors past [`MAX_COVERAGE_CLASSES`] classes, before allocating them.
fn coverage(g: &abi::DropBlockGeometry) -> Result<Vec<(f64, f64)>> {
    let [depth, rows, cols] = coverage_axes(g)?;
    let mut terms = Vec::with_capacity(depth.len() * rows.len() * cols.len());
    for &(c, cc) in &depth {
        for &(a, ca) in &rows {
            for &(b, cb) in &cols {
                terms.push(((c * a * b) as f64, cc as f64 * ca as f64 * cb as f64));
            }
        }
    }
    Ok(terms)
}

/// Each axis's coverage classes present in the map, as `(seeds covering, cells)`,
/// once their product is known to be at most [`MAX_COVERAGE_CLASSES`].
fn coverage_axes(g: &abi::DropBlockGeometry) -> Result<[Vec<(u64, u64)>; 3]> {
    let too_many = |classes: u64| Error::TooManyCoverageClasses { classes, limit: MAX_COVERAGE_CLASSES };
    for (k, seeds) in [(g.kd, g.seed_d), (g.kh, g.seed_h), (g.kw, g.seed_w)] {
        let classes = k.min(seeds) as u64 + 1;
        if classes > MAX_COVERAGE_CLASSES {
            return Err(too_many(classes));
        }
    }
    let depth = coverage_histogram(g.d, g.kd, g.anchor_z, g.seed_d);
    let rows = coverage_histogram(g.h, g.kh, g.anchor_y, g.seed_h);
    let cols = coverage_histogram(g.w, g.kw, g.anchor_x, g.seed_w);
    let present = |h: &[u64]| h.iter().enumerate().filter(|(_, &n)| n > 0).map(|(m, &n)| (m as u64, n)).collect();
    let axes: [Vec<(u64, u64)>; 3] = [present(&depth), present(&rows), present(&cols)];
    let classes = axes.iter().fold(1u64, |acc, axis| acc.saturating_mul(axis.len() as u64));
    if classes > MAX_COVERAGE_CLASSES {
        return Err(too_many(classes));
    }
    Ok(axes)
}

/// Whether ExactRate's γ for drop rate `p` needs the coverage sum: not at 0 (γ = 0)
/// or 1 (γ = 1, every cell covered).
fn sums_coverage(p: f64) -> bool {
    p > 0.0 && p < 1.0
}

/// `x · D · H · W`, multiplied left to right (so with `D = 1` it is `x · H · W`
/// exactly as in 2D).
fn times_plane_cells(x: f64, g: &abi::DropBlockGeometry) -> f64 {
    [g.d, g.h, g.w].iter().fold(x, |acc, &v| acc * v as f64)
}

/// `(expected kept cells, its derivative in γ)` for coverage `terms`:
/// `Σ cells · (1-γ)^m` and `-Σ cells · m · (1-γ)^(m-1)`.
/// Powers by IEEE products alone (no libm), so that ExactRate's γ, and so its
/// masks, are the same on every platform.
fn expected_kept(terms: &[(f64, f64)], gamma: f64) -> (f64, f64) {
    terms.iter().fold((0.0, 0.0), |(kept, slope), &(m, cells)| {
        if m == 0.0 {
            return (kept + cells, slope);
        }
        let keep = powu(1.0 - gamma, m as u64);
        let d = if gamma < 1.0 { -cells * m * keep / (1.0 - gamma) } else { 0.0 };
        (kept + cells * keep, slope + d)
    })
}

/// `base^n` by squaring, in IEEE products only.
fn powu(base: f64, mut n: u64) -> f64 {
    let (mut acc, mut square) = (1.0, base);
    while n > 0 {
        if n & 1 == 1 {
            acc *= square;
        }
        square *= square;
        n >>= 1;
    }
    acc
}

/// The expected fraction of a plane that is dropped when every seed-grid cell is a
/// seed with probability `gamma`, independently: `1 - mean over cells of
/// (1-γ)^(seeds covering the cell)`. Counts overlaps and clipped edges exactly.
/// Errors with [`Error::TooManyCoverageClasses`] for a block of over a million
/// cells a side, or whose axes' classes multiply past [`MAX_COVERAGE_CLASSES`].
pub fn expected_drop_fraction(gamma: f64, g: &abi::DropBlockGeometry) -> Result<f64> {
    Ok(1.0 - expected_kept(&coverage(g)?, gamma.clamp(0.0, 1.0)).0 / times_plane_cells(1.0, g))
}

/// γ whose expected dropped fraction is exactly `p`. The fraction rises
/// monotonically from 0 at γ = 0 to 1 at γ = 1 (every cell is covered), so Newton
/// steps kept inside a shrinking bracket, falling back to bisection, converge in a
/// handful of evaluations (this runs on the host at every call).
fn exact_rate_gamma(p: f64, g: &abi::DropBlockGeometry, paper: f64) -> Result<f64> {
    if !sums_coverage(p) {
        return Ok(if p <= 0.0 { 0.0 } else { 1.0 });
    }
    let terms = coverage(g)?;
    let target = times_plane_cells(1.0 - p, g);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut x = paper.clamp(1e-12, 0.5);
    for _ in 0..200 {
        let (kept, slope) = expected_kept(&terms, x);
        let f = kept - target; // decreasing in γ
        if f == 0.0 {
            return Ok(x);
        }
        if f > 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let newton = x - f / slope;
        let next = if slope < 0.0 && newton > lo && newton < hi { newton } else { 0.5 * (lo + hi) };
        if next == x || next <= lo || next >= hi {
            break;
        }
        x = next;
    }
    Ok(x)
}

/// `T[j] = floor(2^32 · (1 - (1-γ)^(j+1)))`, evaluated exactly: 2^32 times the
/// probability that a window has a seed within its first `j+1` cells, rounded
/// down. γ ≤ 0 (or NaN) gives all zeros, γ ≥ 1 all `2^32`.
///
/// γ is an f64, so a dyadic rational `m / 2^e`, and so is every power of `1-γ`:
/// big-integer arithmetic gives the floor itself, the same on every platform. (A
/// libm's `expm1` and `log1p` are not correctly rounded, and `-expm1` rounds to 1,
/// a threshold of `2^32`, where `(1-γ)^(j+1) < 2^-54`: the exact one is `2^32 - 1`.)
pub fn thresholds(gamma: f64) -> [u64; WINDOW as usize] {
    let mut t = [0u64; WINDOW as usize];
    // Every T is 0 below 2^-38 (and for NaN): 1 - (1-γ)^n ≤ nγ < 2^-32 for n ≤ 64.
    if gamma.is_nan() || gamma < MIN_SEEDING_GAMMA {
        return t;
    }
    if gamma >= 1.0 {
        return [1u64 << 32; WINDOW as usize];
    }
    // γ in [2^-38, 1) is normal: m / 2^e with m odd and 1 ≤ e ≤ 90, so 1-γ = a / 2^e.
    let bits = gamma.to_bits();
    let mantissa = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    let zeros = mantissa.trailing_zeros();
    let (m, e) = (mantissa >> zeros, 1075 - (bits >> 52) as u32 - zeros);
    let a = BigUint::from((1u128 << e) - m as u128);
    // kept / 2^scale = (1-γ)^n exactly, and kept is odd (a power of the odd a), so
    // T = 2^32 - ceil(kept · 2^32 / 2^scale) is 2^32 - kept · 2^(32 - scale) while
    // scale ≤ 32, and 2^32 - 1 - ⌊kept / 2^(scale - 32)⌋ after.
    // Once (1-γ)^n ≤ 2^-32 every later threshold is 2^32 - 1.
    let mut kept = BigUint::from(1u8);
    for j in 0..WINDOW as usize {
        kept *= &a;
        let scale = (j as u64 + 1) * e as u64;
        let ceil = if scale <= 32 {
            u64::try_from(&kept).expect("kept < 2^scale") << (32 - scale)
        } else {
            1 + u64::try_from(&(&kept >> (scale - 32))).expect("kept < 2^scale")
        };
        t[j] = (1u64 << 32) - ceil;
        if ceil == 1 {
            t[j..].fill((1u64 << 32) - 1);
            break;
        }
    }
    t
}

/// The Global and PerSample scale: `numerator / kept` in f64, rounded to f32; 0
/// when nothing is kept, so an all-dropped output is zeros, never NaN.
pub fn count_scale(numerator: u64, kept: u64) -> f32 {
    if kept == 0 {
        0.0
    } else {
        (numerator as f64 / kept as f64) as f32
    }
}

/// The Expected scale `1 / (1 - p)`, rounded to f32; 0 at `p = 1`.
pub fn expected_scale(drop_prob: f64) -> f32 {
    if drop_prob >= 1.0 {
        0.0
    } else {
        (1.0 / (1.0 - drop_prob)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::{
        avx512_available, coverage_histogram, low_bits, thresholds, window_len, Plan, CROWDED, GAP_TABLE_BITS,
        STEP_BITS, WINDOW,
    };
    use crate::config::{Block, DropBlockConfig, GammaRule, Shape};
    use crate::rng::{RngKey, LANES};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The coverage histogram, built a flat run at a time, is the count of each
    /// position's covering seeds, position by position, for any axis, block,
    /// anchor and seed count (those placements give and others).
    #[test]
    fn coverage_histogram_counts_every_position() {
        let mut rng = StdRng::seed_from_u64(30);
        for _ in 0..5000 {
            let (len, k) = (rng.random_range(1..40u32), rng.random_range(1..12u32));
            let (anchor, seeds) = (rng.random_range(0..k + 2), rng.random_range(0..len + 3));
            let mut want = vec![0u64; k.min(seeds) as usize + 1];
            for i in 0..len as i64 {
                let lo = (i + anchor as i64 - k as i64 + 1).max(0);
                let hi = (i + anchor as i64).min(seeds as i64 - 1);
                want[(hi - lo + 1).max(0) as usize] += 1;
            }
            assert_eq!(
                coverage_histogram(len, k, anchor, seeds),
                want,
                "len {len} k {k} anchor {anchor} seeds {seeds}"
            );
        }
        // A 2^32 - 1 axis at once (the position loop took seconds).
        let long = coverage_histogram(u32::MAX, 7, 3, u32::MAX - 6);
        assert_eq!(long.iter().sum::<u64>(), u32::MAX as u64);
        assert_eq!(long[7], u32::MAX as u64 - 12);
    }

    /// The table-started search gives the smallest `g` with `u < T[g]` (64 if
    /// none), at rates whose thresholds crowd (all near 0, or near 2^32) and at
    /// DropBlock's, for draws on, just under and just over every threshold and at
    /// both ends of its table step.
    #[test]
    fn gap_is_the_first_threshold_over_the_draw() {
        let shape = Shape::from_dims(&[1, 1, 64, 64]).unwrap();
        let mut state = 0x6A9_u64;
        for p in [0.0, 1e-9, 1e-4, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999, 1.0] {
            let cfg = DropBlockConfig::builder(Block::uniform(1).unwrap(), p)
                .gamma_rule(GammaRule::PerBlock)
                .build()
                .unwrap();
            let plan = Plan::new(&cfg, shape, RngKey::new(3, 0).unwrap()).unwrap();
            let t = thresholds(plan.gamma());
            let mut draws: Vec<u32> = vec![0, 1, u32::MAX - 1, u32::MAX];
            for &tg in &t {
                for d in [-1i64, 0, 1] {
                    draws.push((tg as i64 + d).clamp(0, u32::MAX as i64) as u32);
                }
                let step = (tg >> STEP_BITS) << STEP_BITS;
                draws.extend([step, step + (1 << STEP_BITS) - 1].map(|v| v.min(u32::MAX as u64) as u32));
            }
            draws.extend((0..2000).map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u32
            }));
            for u in draws {
                let expected = t.iter().position(|&tg| (u as u64) < tg).unwrap_or(64) as u32;
                assert_eq!(plan.gap(u), expected, "p {p}: draw {u:#x}");
            }
        }
    }

    /// A batch's seeds by the AVX-512 form equal the scalar form's, as sets, on
    /// first blocks made to hit the cases: draws on and around every threshold,
    /// draws in crowded steps of the gap table (the form must give such a batch to
    /// the scalar one), walks that go past their first block, and every window
    /// length; skipped, saying so, where the form does not run.
    #[test]
    fn simd_batches_list_the_scalar_seeds() {
        let (runs, expected) = (avx512_available(), crate::simd::avx512_allowed() && cpu_detects!("avx512f"));
        if crate::simd::skip_form_test("simd_batches_list_the_scalar_seeds", "AVX-512F", runs, expected) {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0xDDBA11);
        let mut next = || rng.random::<u64>();
        let shape = Shape::from_dims(&[1, 1, 64, 64]).unwrap();
        for p in [1e-7, 0.01, 0.1, 0.5, 0.97] {
            let cfg = DropBlockConfig::builder(Block::uniform(1).unwrap(), p)
                .gamma_rule(GammaRule::PerBlock)
                .build()
                .unwrap();
            let plan = Plan::new(&cfg, shape, RngKey::new(9, 3).unwrap()).unwrap();
            let t = plan.sampling.thresholds;
            let crowded: Vec<u32> =
                (0..1u32 << GAP_TABLE_BITS).filter(|&b| plan.gap_steps[b as usize] & CROWDED != 0).collect();
            let draw = |r: u64| -> u32 {
                match r % 4 {
                    0 => r as u32 >> (r >> 59),
                    1 => (t[(r >> 8) as usize % 64] as i64 + (r >> 20) as i64 % 3 - 1).clamp(0, u32::MAX as i64) as u32,
                    2 if !crowded.is_empty() => {
                        crowded[(r >> 8) as usize % crowded.len()] << STEP_BITS | (r >> 40) as u32 & 0xFFFFF
                    }
                    _ => (r >> 32) as u32,
                }
            };
            for case in 0..400 {
                let ids: [u64; LANES] = std::array::from_fn(|_| next());
                let lens: [u32; LANES] = std::array::from_fn(|_| [64, 1 + next() as u32 % 64][case % 2]);
                let blocks: [[u32; LANES]; 4] = std::array::from_fn(|_| std::array::from_fn(|_| draw(next())));
                let all = low_bits(LANES as u32) as u32;
                let live = if case % 3 == 0 { all } else { next() as u32 & all };
                let listed = |wide| {
                    let mut found = [0u32; LANES * WINDOW as usize + 1];
                    let n = plan.list_batch((&ids, &lens, &blocks), live, wide, &mut found);
                    let mut seeds = found[..n].to_vec();
                    seeds.sort_unstable();
                    seeds
                };
                assert_eq!(listed(true), listed(false), "p {p}, case {case}");
            }
        }
    }

    /// The batched walks report exactly the windows whose own walk finds a seed,
    /// with its bits, each seed once: ranges of every length from 0 to 50 at
    /// unaligned starts, and lists that skip windows, at rates where most windows
    /// end at their first block, where many go past it, and where the gap table's
    /// steps crowd (the SIMD form then gives the batch to the scalar one).
    #[test]
    fn batched_walks_report_each_seeded_window_once() {
        use std::collections::BTreeMap;
        let shape = Shape::from_dims(&[2, 8, 20, 20]).unwrap();
        for p in [0.05, 0.3, 0.9] {
            let cfg = DropBlockConfig::builder(Block::uniform(3).unwrap(), p).build().unwrap();
            let plan = Plan::new(&cfg, shape, RngKey::new(5, 40).unwrap()).unwrap();
            let g = *plan.geometry();
            let len = |w: u64| window_len(&g, w.min(g.windows - 1));
            let expected = |w: u64| plan.walk_window(w, len(w));
            let seeded = std::cell::Cell::new(0);
            let check = |listed: &[u64], got: BTreeMap<u64, u64>| {
                let want: BTreeMap<u64, u64> =
                    listed.iter().map(|&w| (w, expected(w))).filter(|&(_, bits)| bits != 0).collect();
                seeded.set(seeded.get() + want.len());
                assert_eq!(got, want, "p {p}: {listed:?}");
            };
            // The listed seeds as (window, bits), each seed listed once.
            let collect = |got: &mut BTreeMap<u64, u64>, ids: &[u64; LANES], found: &[u32]| {
                for &f in found {
                    let (w, bit) = (ids[(f >> 6) as usize], 1u64 << (f & 63));
                    let bits = got.entry(w).or_default();
                    assert_eq!(*bits & bit, 0, "p {p}: window {w} cell {} listed twice", f & 63);
                    *bits |= bit;
                }
            };
            for start in [0u64, 1, 5, 7, 13, 23, 24] {
                for n in 0..2 * LANES as u64 + 3 {
                    let end = (start + n).min(g.windows);
                    let mut got = BTreeMap::new();
                    plan.walk(start..end, len, |ids, found| collect(&mut got, ids, found));
                    check(&(start..end).collect::<Vec<_>>(), got);
                }
            }
            for stride in [2u64, 3, 5] {
                let listed: Vec<u64> = (1..g.windows).step_by(stride as usize).collect();
                for n in [1, 7, 8, 9, LANES - 1, LANES, LANES + 1, listed.len()].map(|n| n.min(listed.len())) {
                    let mut got = BTreeMap::new();
                    plan.walk_list(&listed[..n], len, |ids, found| collect(&mut got, ids, found));
                    check(&listed[..n], got);
                }
            }
            assert!(seeded.get() > 500, "p {p}: a test that sees few seeds ({})", seeded.get());
        }
    }
}
