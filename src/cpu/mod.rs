//! The CPU path: the complete semantics for every spatial rank, parallel over
//! planes with rayon.
//!
//! It is the oracle that the CUDA path matches bit for bit, and a full fallback
//! where no GPU is present.

mod word;

use rayon::prelude::*;

use crate::abi;
use crate::config::{DropBlockConfig, Fill, Layout, Mode, Normalize, Shape};
use crate::dtype::Element;
use crate::error::{host_vec, Error, Result};
use crate::mask::{transpose_cells, BitOrder, BlockMasks, SampleCells, MAX_TILE_SAMPLE_BITS};
use crate::rng::RngKey;
use crate::sampling::{count_scale, expected_scale, Plan};
use crate::shard::{Shard, ShardCounts};
use word::{fence_streams, fill_group, scale_group, streams};

/// What forward hands to backward: the block masks and the scale(s).
#[derive(Debug, Clone)]
pub struct Saved {
    /// The shape of the call's buffers: the shard's local shape.
    shape: Shape,
    shard: Shard,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Eval mode or `drop_prob == 0`: nothing drawn, factor 1 everywhere.
    Identity,
    Masked {
        plan: Box<Plan>,
        bits: Bits,
        kept: u64,
        per_sample: bool,
        /// One scale, or one per sample under PerSample normalisation.
        scales: Vec<f32>,
        /// Dropped units become noise in the forward (`Fill::Noise`).
        noise: bool,
    },
}

impl Saved {
    /// The shape of the forward call's buffers (a shard's local shape).
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The part of the global tensor the call covered (the whole tensor unless it
    /// came from [`sample_shard`]).
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The plan of the call, or `None` when the call was an identity.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.state {
            State::Identity => None,
            State::Masked { plan, .. } => Some(plan),
        }
    }

    /// Kept elements of the call's buffers (a shard's own elements).
    pub fn kept(&self) -> u64 {
        match &self.state {
            State::Identity => self.shape.numel() as u64,
            State::Masked { kept, .. } => *kept,
        }
    }

    /// The realised dropped fraction, `1 - kept / numel`.
    pub fn drop_fraction(&self) -> f64 {
        1.0 - self.kept() as f64 / self.shape.numel() as f64
    }

    /// The scale applied to kept elements: one value, or one per sample under
    /// PerSample normalisation; `[1.0]` after an identity call (eval mode or
    /// `drop_prob == 0`).
    pub fn scales(&self) -> &[f32] {
        match &self.state {
            State::Identity => &[1.0],
            State::Masked { scales, .. } => scales,
        }
    }

    /// Whether the element at `index`, `[n, c, spatial...]` as the shape's
    /// dimensions (`[n, c, h, w]` in 2D, local to a shard), was kept.
    pub fn is_kept(&self, index: &[usize]) -> Result<bool> {
        let dims = self.shape.dims();
        if index.len() != dims.len() {
            return Err(Error::LengthMismatch { what: "index", expected: dims.len(), actual: index.len() });
        }
        const NAMES: [&str; 5] = ["n", "c", "spatial 0", "spatial 1", "spatial 2"];
        let mut cell = 0;
        for (i, (&value, &len)) in index.iter().zip(dims).enumerate() {
            if value >= len {
                return Err(Error::OutOfRange { what: NAMES[i], value: value as u64, len: len as u64 });
            }
            if i >= 2 {
                cell = cell * len + value;
            }
        }
        Ok(match &self.state {
            State::Identity => true,
            State::Masked { plan, bits: Bits::Planes(masks), .. } => {
                !masks.is_dropped(self.plane_of(plan, index[0], index[1]), cell)
            }
            // A sample is one plane of C·L bits in the tensor's order.
            State::Masked { bits: Bits::Tensor(bits, _), .. } => !bits.is_dropped(index[0], cell * dims[1] + index[1]),
        })
    }

    /// The keep mask as u8 in the tensor's memory order (its [`Layout`]): 1 where the
    /// element was kept. A byte an element, 8x the keep bits: errors with
    /// [`Error::HostAllocation`] where they do not fit (as `DeviceState::keep_mask`).
    pub fn keep_mask(&self) -> Result<Vec<u8>> {
        let mut out = host_vec(self.shape.numel(), |_| 1u8)?;
        let keep = |dst: &mut [u8], dropped: u64| {
            dst.iter_mut().enumerate().for_each(|(i, v)| *v = (dropped >> i & 1 == 0) as u8);
        };
        if self.is_identity() {
            return Ok(out);
        }
        if self.by_region() {
            self.for_each_region(&mut out, None::<&[u8]>, |n, cell0, dst, _| {
                self.with_region_bits(n, cell0, dst.len(), |bits| {
                    dst.chunks_mut(64).zip(bits).for_each(|(d, &dropped)| keep(d, dropped))
                });
            });
        } else {
            let masks = self.element_bits();
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, dst)| {
                self.for_each_run(k * CHUNK, dst.len(), |j0, bit, n, _| {
                    for (w, d) in dst[j0..j0 + n].chunks_mut(64).enumerate() {
                        keep(d, masks.bits_from(bit + 64 * w));
                    }
                });
            });
        }
        Ok(out)
    }

    /// Where the call's bits were put in the tensor's order, for tests of each way:
    /// `"tiles"` (by the sampling's tiles), `"after sampling"`, `"by region"` (a
    /// channels-last call whose passes transpose the planes' bits), or `"planes"`
    /// (channels-first) and `"identity"`. Not part of the API.
    #[doc(hidden)]
    pub fn bit_order(&self) -> &'static str {
        match &self.state {
            State::Identity => "identity",
            State::Masked { bits: Bits::Tensor(_, ChannelsLastOrder::InTiles), .. } => "tiles",
            State::Masked { bits: Bits::Tensor(..), .. } => "after sampling",
            State::Masked { .. } if self.by_region() => "by region",
            State::Masked { .. } => "planes",
        }
    }

    fn is_identity(&self) -> bool {
        matches!(self.state, State::Identity)
    }

    /// The (local) mask plane of local slice `(n, c)`.
    #[inline]
    fn plane_of(&self, plan: &Plan, n: usize, c: usize) -> usize {
        self.shard.local_plane(plan.geometry().sharing, n, c)
    }

    /// The mask unit (global plane · global L + global cell) of local element `e`.
    fn unit(&self, plan: &Plan, e: usize) -> usize {
        let (c, l) = (self.shape.c(), self.shape.plane_len());
        let (n, rest) = (e / (l * c), e % (l * c));
        let (ch, cell) = match self.shape.layout() {
            Layout::ChannelsFirst => (rest / l, rest % l),
            Layout::ChannelsLast => (rest % c, rest / c),
        };
        self.shard.global_plane(plan, n, ch) * self.shard.global().plane_len() + self.shard.global_cell(cell)
    }

    /// `dst = src · factor` (or `dst = dst · factor` without `src`) for up to 64
    /// elements from `first` on, whose mask word is `dropped`; in a forward with
    /// noise fill, dropped elements take their unit's noise instead (`bit`: the
    /// first's mask bit, its unit when the call is a whole channels-first tensor);
    /// with `stream`, scaled whole words use non-temporal stores.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn scale_or_fill<T: Element>(
        &self,
        plan: &Plan,
        (fill, stream): (bool, bool),
        dropped: u64,
        scale: f32,
        (first, bit): (usize, usize),
        s: Option<&[T]>,
        d: &mut [T],
    ) {
        if !fill {
            return scale_group(dropped, scale, s, d, stream);
        }
        let direct = self.shard.is_whole() && self.shape.layout() == Layout::ChannelsFirst;
        fill_group(dropped, s, d, |i| {
            let unit = if direct { bit + i } else { self.unit(plan, first + i) };
            crate::noise::normal(plan.key(), unit as u64)
        });
    }

    /// The element pass of a channels-first shape (or a channels-last one whose
    /// bits the sampling left in its order) for the elements from `e0` on, 64 at a
    /// time with one mask word each.
    #[inline(always)]
    fn scale_chunk<T: Element>(&self, e0: usize, src: Option<&[T]>, dst: &mut [T], (forward, stream): (bool, bool)) {
        let masks = self.element_bits();
        let State::Masked { plan, noise, .. } = &self.state else { unreachable!("identity calls copy instead") };
        self.for_each_run(e0, dst.len(), |j0, bit, n, scale| {
            for (k, d) in dst[j0..j0 + n].chunks_mut(64).enumerate() {
                let s = src.map(|s| &s[j0 + 64 * k..][..d.len()]);
                let (b, first) = (bit + 64 * k, e0 + j0 + 64 * k);
                let how = (forward && *noise, stream);
                self.scale_or_fill(plan, how, masks.bits_from(b), scale, (first, b), s, d);
            }
        });
    }

    /// The element pass of a channels-last shape over cells `cell0 ..` of sample
    /// `n` (every channel: `dst.len() / C` cells), with their bits transposed into
    /// a buffer of the region's own.
    fn scale_cells<T: Element>(
        &self,
        n: usize,
        cell0: usize,
        src: Option<&[T]>,
        dst: &mut [T],
        (forward, stream): (bool, bool),
    ) {
        let State::Masked { plan, noise, per_sample, scales, .. } = &self.state else {
            unreachable!("identity calls copy instead")
        };
        let scale = if *per_sample { scales[n] } else { scales[0] };
        let e0 = (n * self.shape.plane_len() + cell0) * self.shape.c();
        self.with_region_bits(n, cell0, dst.len(), |bits| {
            for (k, (d, &dropped)) in dst.chunks_mut(64).zip(bits).enumerate() {
                let s = src.map(|s| &s[64 * k..][..d.len()]);
                self.scale_or_fill(plan, (forward && *noise, stream), dropped, scale, (e0 + 64 * k, 0), s, d);
            }
        })
    }

    /// Calls `f` with the dropped bits of the `len` elements from cell `cell0` of
    /// sample `n` of a channels-last shape (whole cells), in the tensor's order from
    /// bit 0: on the stack for regions of up to CHUNK elements (C up to 512), so the
    /// passes allocate nothing per region.
    fn with_region_bits<R>(&self, n: usize, cell0: usize, len: usize, f: impl FnOnce(&[u64]) -> R) -> R {
        let State::Masked { plan, bits: Bits::Planes(masks), .. } = &self.state else {
            unreachable!("only planes' bits are transposed a region at a time")
        };
        let (c, sharing) = (self.shape.c(), plan.geometry().sharing);
        let plane_of = |n, ch| self.shard.local_plane(sharing, n, ch);
        let words = len.div_ceil(64);
        let (mut stack, mut heap) = ([0u64; CHUNK / 64], Vec::new());
        let bits = if words <= stack.len() {
            &mut stack[..words]
        } else {
            heap.resize(words, 0u64);
            &mut heap[..]
        };
        transpose_cells(masks, &SampleCells::new(plane_of, n, cell0..cell0 + len / c, c), bits, 0);
        f(bits)
    }

    /// Whether the element passes transpose the planes' bits a region at a time
    /// (channels-last whose sampling left them in the planes' order).
    fn by_region(&self) -> bool {
        self.shape.layout() == Layout::ChannelsLast && !self.tensor_order()
    }

    /// Whether the sampling left the bits in the tensor's order.
    fn tensor_order(&self) -> bool {
        matches!(self.state, State::Masked { bits: Bits::Tensor(..), .. })
    }

    /// The bits a pass reads without transposing them: the planes' of a
    /// channels-first shape, or a channels-last one's in its own order.
    fn element_bits(&self) -> &BlockMasks {
        match &self.state {
            State::Masked { bits: Bits::Planes(bits) | Bits::Tensor(bits, _), .. } => bits,
            State::Identity => unreachable!("identity calls copy instead"),
        }
    }

    /// Runs `f(n, cell0, dst, src)` over a channels-last tensor in parallel regions
    /// of whole cells of one sample (every channel of a run of cells is contiguous):
    /// a multiple of 64 cells and about CHUNK elements each, or 64 cells when C is
    /// over 512.
    fn for_each_region<T: Send, U: Sync>(
        &self,
        dst: &mut [T],
        src: Option<&[U]>,
        f: impl Fn(usize, usize, &mut [T], Option<&[U]>) + Sync,
    ) {
        let (c, l) = (self.shape.c(), self.shape.plane_len());
        let cells = (CHUNK / c).max(64) / 64 * 64;
        dst.par_chunks_mut(l * c).enumerate().for_each(|(n, sample)| {
            sample.par_chunks_mut(cells * c).enumerate().for_each(|(r, d)| {
                let s = src.map(|s| &s[(n * l + r * cells) * c..][..d.len()]);
                f(n, r * cells, d, s)
            })
        });
    }

    /// Walks elements `e0 .. e0 + len` in runs that share a scale and whose mask
    /// bits (of [`Saved::element_bits`]) are consecutive, calling `f(j0, bit,
    /// run_len, scale)` for the run that starts at element `e0 + j0`: without
    /// sharing, or from bits transposed into a channels-last tensor's order, the
    /// whole range at once (bit `e` is element `e`'s), else one `(n, c)` slice at a
    /// time.
    #[inline(always)]
    fn for_each_run(&self, e0: usize, len: usize, mut f: impl FnMut(usize, usize, usize, f32)) {
        let State::Masked { plan, per_sample, scales, .. } = &self.state else {
            unreachable!("identity calls copy instead")
        };
        let (c, l) = (self.shape.c(), self.shape.plane_len());
        let flat = plan.geometry().sharing == abi::DROPBLOCK_SHARE_NONE || self.tensor_order();
        let mut j = 0;
        while j < len {
            let e = e0 + j;
            let (slice, cell) = (e / l, e % l);
            let n = slice / c;
            let end = match (flat, *per_sample) {
                (true, false) => len,
                (true, true) => ((n + 1) * c * l - e0).min(len),
                (false, _) => (j + l - cell).min(len),
            };
            let bit = if flat { e } else { self.plane_of(plan, n, slice % c) * l + cell };
            let scale = if *per_sample { scales[n] } else { scales[0] };
            f(j, bit, end - j, scale);
            j = end;
        }
    }
}

/// Elements per parallel task of the element-wise passes: large enough to amortise
/// the task, a multiple of 64 so that tasks start on a mask word without sharing.
const CHUNK: usize = 1 << 15;

/// The dropped bits of a call.
#[derive(Debug, Clone)]
enum Bits {
    /// The planes' (bit `plane · L + cell`): every channels-first call, and
    /// channels-last ones whose passes transpose them a region at a time
    /// (`Saved::with_region_bits`).
    Planes(BlockMasks),
    /// A channels-last tensor's own order (bit `e` for element `e`), which the
    /// passes read as flat bits, put there as `channels_last_order` chose.
    Tensor(BlockMasks, ChannelsLastOrder),
}

/// Channels under which a channels-last mask is transposed once, after the
/// sampling, into the tensor's order: a pass transposing a region at a time would
/// repeat a 64 x 64 transpose for a handful of channels (at C = 3 backward took
/// 2.6x channels-first's time, 2026-11-30).
const EACH_REGION_CHANNELS: usize = 64;

/// Where a channels-last call's bits are put in the tensor's order:
/// - C a multiple of 64 without sharing, samples for two tiles a thread, and a
///   sample of at most `MAX_TILE_SAMPLE_BITS`: by each tile of the sampling while
///   in cache ([`BitOrder::ChannelsLast`]), so that forward and backward both read
///   flat bits (backward had been 1.04–1.15x channels-first's time with its own
///   transposes; 2026-12-01);
/// - fewer than `EACH_REGION_CHANNELS` channels: once after the sampling, whatever
///   the sharing (`BlockMasks::channels_last`);
/// - otherwise nowhere: the passes transpose the planes' bits a region at a time.
///   With sharing the tensor's order would repeat a plane's bits C (or N) times,
///   fewer samples than two a thread would leave cores idle, and a larger sample
///   would not be transposed from cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelsLastOrder {
    InTiles,
    AfterSampling,
    ByRegion,
}

fn channels_last_order(shape: Shape, sharing: u32) -> ChannelsLastOrder {
    let (n, c) = (shape.n(), shape.c());
    let tiles = n >= 2 * rayon::current_num_threads() && c * shape.plane_len() <= MAX_TILE_SAMPLE_BITS;
    if c.is_multiple_of(64) && sharing == abi::DROPBLOCK_SHARE_NONE && tiles {
        ChannelsLastOrder::InTiles
    } else if c < EACH_REGION_CHANNELS {
        ChannelsLastOrder::AfterSampling
    } else {
        ChannelsLastOrder::ByRegion
    }
}

/// The SIMD forms the CPU path runs in this process, as the CPU's features, the
/// toolchain it was built with (the AVX-512 forms need Rust 1.89) and
/// `DROPBLOCK_CPU_CAPABILITY` allow: some of `avx512-gfni` (channels-last bit
/// transposes), `avx512f` (the sampler's walk, the f32 element passes), `avx2`, `f16c` and `popcnt`, in
/// that order. Empty when every call takes the portable forms. Every form gives
/// the portable forms' bits; this is for reading benchmarks and profiles.
pub fn simd_forms() -> Vec<&'static str> {
    crate::simd::forms()
}

/// Samples the masks and computes the scale(s), without touching any tensor.
/// Errors when the block's rank is not the shape's, when the exact γ rule's block
/// is too large ([`Plan::new`]), and when the host cannot hold the masks (one bit
/// per mask cell).
pub fn sample(cfg: &DropBlockConfig, shape: Shape, key: RngKey, mode: Mode) -> Result<Saved> {
    let mut sampled = sample_shard(cfg, &Shard::whole(shape), key, mode)?;
    // The whole tensor's counts are the global ones: moved out, not copied (8 bytes
    // a sample).
    let counts = std::mem::replace(&mut sampled.counts, ShardCounts(Vec::new()));
    sampled.finish(&counts)
}

/// The first half of a sharded forward: samples the part of the mask that falls in
/// `shard` (exactly that slice of the unsharded call's mask) and counts what it
/// keeps. Sum the [`ShardSample::counts`] of every shard (any reduction, e.g. an
/// all-reduce), then [`ShardSample::finish`] each with the sum and call [`apply`] and
/// [`backward`] on the shard's buffers.
pub fn sample_shard(cfg: &DropBlockConfig, shard: &Shard, key: RngKey, mode: Mode) -> Result<ShardSample> {
    let shape = shard.local();
    let global = shard.global();
    let zeroed_counts = || host_vec(ShardCounts::len_for(global), |_| 0u64);
    if mode == Mode::Eval || cfg.is_identity() {
        // Refuses what training would (a block of another rank, an exact γ too
        // large to sum), for the whole call's shape, as training plans it.
        Plan::check(cfg, global)?;
        let mut counts = zeroed_counts()?;
        counts[0] = shape.numel() as u64;
        let per = (shape.c() * shape.plane_len()) as u64;
        counts[1 + shard.first_sample()..][..shape.n()].fill(per);
        fill_coverage(&mut counts, shard);
        let saved = Saved { shape, shard: *shard, state: State::Identity };
        return Ok(ShardSample { saved, counts: ShardCounts(counts), normalize: cfg.normalize(), drop_prob: 0.0 });
    }
    let plan = Plan::new(cfg, global, key)?;
    let (c, l) = (shape.c(), shape.plane_len());
    let sharing = plan.geometry().sharing;
    // Dropped cells per sample's planes (C of them without sharing, 1 with channel
    // sharing), or of every plane when all samples share them.
    let group_planes = match sharing {
        abi::DROPBLOCK_SHARE_NONE => c,
        abi::DROPBLOCK_SHARE_CHANNELS => 1,
        _ => shard.local_planes(sharing),
    };
    // The masks first: a shape too large for the host fails there, before its
    // counts (24 bytes a sample) are filled.
    let order = (shape.layout() == Layout::ChannelsLast).then(|| channels_last_order(shape, sharing));
    let bit_order = match order {
        Some(ChannelsLastOrder::InTiles) => BitOrder::ChannelsLast { c },
        _ => BitOrder::Planes,
    };
    let (masks, dropped) = BlockMasks::build(&plan, shard, group_planes, bit_order)?;
    let mut counts = zeroed_counts()?;
    // Kept elements of local sample n. N is up to 2^32: the counts are reserved
    // above, not assumed to fit.
    let local = &mut counts[1 + shard.first_sample()..][..shape.n()];
    match sharing {
        abi::DROPBLOCK_SHARE_NONE => local.iter_mut().zip(&dropped).for_each(|(k, d)| *k = (c * l) as u64 - d),
        abi::DROPBLOCK_SHARE_CHANNELS => {
            local.iter_mut().zip(&dropped).for_each(|(k, d)| *k = c as u64 * (l as u64 - d))
        }
        // One group (none when there are no planes to share).
        abi::DROPBLOCK_SHARE_BATCH => local.fill((c * l) as u64 - dropped.first().unwrap_or(&0)),
        _ => local.fill(c as u64 * (l as u64 - dropped.first().unwrap_or(&0))),
    }
    let kept: u64 = local.iter().sum();
    counts[0] = kept;
    fill_coverage(&mut counts, shard);
    let bits = match order {
        None | Some(ChannelsLastOrder::ByRegion) => Bits::Planes(masks),
        Some(ChannelsLastOrder::InTiles) => Bits::Tensor(masks, ChannelsLastOrder::InTiles),
        Some(ChannelsLastOrder::AfterSampling) => {
            let transposed = masks.channels_last(|n, ch| shard.local_plane(sharing, n, ch), shape.n(), c)?;
            Bits::Tensor(transposed, ChannelsLastOrder::AfterSampling)
        }
    };
    let noise = cfg.fill() == Fill::Noise;
    let per_sample = cfg.normalize() == Normalize::PerSample;
    let plan = Box::new(plan);
    let state = State::Masked { plan, bits, kept, per_sample, scales: Vec::new(), noise };
    let saved = Saved { shape, shard: *shard, state };
    Ok(ShardSample { saved, counts: ShardCounts(counts), normalize: cfg.normalize(), drop_prob: cfg.drop_prob() })
}

/// Writes a shard's covered and tag entries of its samples into its counts.
fn fill_coverage(counts: &mut [u64], shard: &Shard) {
    let (local, n) = (shard.local(), shard.global().n());
    let first = shard.first_sample();
    counts[1 + n + first..][..local.n()].fill((local.c() * local.plane_len()) as u64);
    counts[1 + 2 * n + first..][..local.n()].fill(shard.box_tag());
}

/// A shard's sampled mask and its kept counts, waiting for the counts of every
/// shard ([`sample_shard`]).
#[derive(Debug, Clone)]
pub struct ShardSample {
    saved: Saved,
    counts: ShardCounts,
    normalize: Normalize,
    drop_prob: f64,
}

impl ShardSample {
    /// This shard's kept counts, to be summed with every other shard's.
    pub fn counts(&self) -> &ShardCounts {
        &self.counts
    }

    /// The state for [`apply`] and [`backward`], with the scale(s) computed from the
    /// summed counts of every shard: Global `numel / total`, PerSample
    /// `C·L / kept_n` over the global shape, in f64 rounded to f32, so every shard
    /// computes the same scale. Expected and None ignore the counts. Errors when
    /// `global` is not laid out for this shard's global shape, or no shards of it
    /// could give these counts ([`ShardCounts::check`]), or when a drawn mask's
    /// scale divides by counts that are not summed over every shard holding their
    /// samples ([`ShardCounts::check_covered`]: every sample for Global, this
    /// shard's for PerSample, which data-parallel ranks of whole samples meet
    /// with their own counts).
    pub fn finish(self, global: &ShardCounts) -> Result<Saved> {
        let whole = self.saved.shard.global();
        let first = self.saved.shard.first_sample();
        let n = self.saved.shape.n();
        match (&self.saved.state, self.normalize) {
            (State::Masked { .. }, Normalize::Global) => global.check_covered(whole, 0..whole.n())?,
            (State::Masked { .. }, Normalize::PerSample) => global.check_covered(whole, first..first + n)?,
            _ => global.check(whole)?,
        }
        let mut saved = self.saved;
        if let State::Masked { scales, .. } = &mut saved.state {
            *scales = match self.normalize {
                Normalize::Global => vec![count_scale(whole.numel() as u64, global.total())],
                Normalize::PerSample => {
                    let mut s = Vec::new();
                    s.try_reserve_exact(n).map_err(|_| Error::HostAllocation { bytes: n as u64 * 4 })?;
                    let per = (whole.c() * whole.plane_len()) as u64;
                    s.extend(global.per_sample()[first..first + n].iter().map(|&k| count_scale(per, k)));
                    s
                }
                Normalize::Expected => vec![expected_scale(self.drop_prob)],
                Normalize::None => vec![1.0],
            };
        }
        Ok(saved)
    }
}

/// Forward: `y = round(f32(x) · (kept ? scale : 0))`, or with noise fill `x` where
/// kept and the unit's noise where dropped ([`apply`]). Returns the state for
/// backward.
pub fn forward<T: Element>(
    cfg: &DropBlockConfig,
    shape: Shape,
    key: RngKey,
    mode: Mode,
    x: &[T],
    y: &mut [T],
) -> Result<Saved> {
    shape.check_len("x", x.len())?;
    shape.check_len("y", y.len())?;
    let saved = sample(cfg, shape, key, mode)?;
    apply(&saved, x, y)?;
    Ok(saved)
}

/// Forward in place: `x` is overwritten with `y`.
pub fn forward_inplace<T: Element>(
    cfg: &DropBlockConfig,
    shape: Shape,
    key: RngKey,
    mode: Mode,
    x: &mut [T],
) -> Result<Saved> {
    shape.check_len("x", x.len())?;
    let saved = sample(cfg, shape, key, mode)?;
    apply_inplace(&saved, x)?;
    Ok(saved)
}

/// Backward: `dx = round(f32(dy) · factor)` with forward's factor per element
/// (under noise fill the factor is 1 where kept and 0 where dropped).
pub fn backward<T: Element>(saved: &Saved, dy: &[T], dx: &mut [T]) -> Result<()> {
    pass(saved, Some(dy), dx, false)
}

/// Backward in place: `dy` is overwritten with `dx`.
pub fn backward_inplace<T: Element>(saved: &Saved, dy: &mut [T]) -> Result<()> {
    pass(saved, None, dy, false)
}

/// The forward's element pass with the mask of `saved` (after [`sample`]):
/// `y = x · factor`, or with noise fill `x` where kept and the noise where
/// dropped.
pub fn apply<T: Element>(saved: &Saved, x: &[T], y: &mut [T]) -> Result<()> {
    pass(saved, Some(x), y, true)
}

/// [`apply`] in place: `x` is overwritten with `y`.
pub fn apply_inplace<T: Element>(saved: &Saved, x: &mut [T]) -> Result<()> {
    pass(saved, None, x, true)
}

/// `dst = src · factor`, or in place without `src`, with the mask of `saved`.
fn pass<T: Element>(saved: &Saved, src: Option<&[T]>, dst: &mut [T], forward: bool) -> Result<()> {
    let shape = saved.shape;
    let [src_name, dst_name] = crate::error::pass_buffer_names(!forward);
    if let Some(src) = src {
        shape.check_len(src_name, src.len())?;
    }
    shape.check_len(if src.is_some() { dst_name } else { src_name }, dst.len())?;
    if saved.is_identity() {
        if let Some(src) = src {
            dst.copy_from_slice(src);
        }
        return Ok(());
    }
    // Large outputs stream whole words at 16-byte-aligned addresses: every word
    // when `dst` is aligned and runs are flat, as tasks and their words start at
    // multiples of 64 elements.
    let stream = streams(dst);
    let fence = || {
        if stream {
            fence_streams()
        }
    };
    if saved.by_region() {
        saved.for_each_region(dst, src, |n, cell0, d, s| {
            saved.scale_cells(n, cell0, s, d, (forward, stream));
            fence()
        });
    } else {
        dst.par_chunks_mut(CHUNK).enumerate().for_each(|(k, d)| {
            let s = src.map(|s| &s[k * CHUNK..][..d.len()]);
            saved.scale_chunk(k * CHUNK, s, d, (forward, stream));
            fence()
        });
    }
    Ok(())
}
