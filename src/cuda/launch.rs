//! What each call enqueues, in stream order: memsets and kernel launches with their
//! arguments, as a pure function of the call's plan.
//!
//! The sequences here write to a [`Queue`]. `ops.rs` gives them one that enqueues
//! on the caller's stream. tests/kernel_emulation.rs gives them one that records,
//! and runs the recording on the kernels compiled for the host: so the emulation
//! checks these sequences (the kernels chosen, their order, memsets, and every
//! argument against the kernel's C++ signature), not a copy of them. It runs most
//! grids capped at one to three blocks (the kernels stride over the rest of their
//! work, so a grid's size changes their speed, never their result) and some as
//! sized here.

use crate::abi;
use crate::config::{DropBlockConfig, Fill, Layout, Normalize, Shape, Sharing};
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::RngKey;
use crate::sampling::{expected_scale, Plan};
use crate::shard::Shard;

/// Threads per block of every kernel.
pub(super) const THREADS: u32 = abi::DROPBLOCK_THREADS;
const UNTYPED: [&str; 9] = [
    "count_mask",
    "seed_blocks",
    "count_bits",
    "channels_last_bits",
    "sample_seeds",
    "shard_blocks",
    "shard_count_planes",
    "shard_count_samples",
    "shard_scales",
];
/// The scaled copies from saved keep bits, by layout of the bits and scales.
const APPLY_OPS: [&str; 5] =
    ["apply", "apply_per_sample", "apply_shared", "apply_shared_per_sample", "apply_unaligned"];
const FUSED_OPS: [&str; 2] = ["fused", "fused_unaligned"];
/// A channels-last forward's keep bits and scaled copy in one pass, by scales.
const CHANNELS_LAST_OPS: [&str; 2] = ["apply_channels_last", "apply_channels_last_per_sample"];
/// Noise fill's forward pass (any alignment).
const FILL_OPS: [&str; 1] = ["fill_noise"];
/// Cells a tile holds (kernels/dropblock_abi.h).
const TILE_CELLS: u64 = abi::DROPBLOCK_TILE_CELLS as u64;

/// A kernel by op and dtype suffix ("" for the untyped ones). Static strings, so
/// finding a kernel on the launch path neither formats nor allocates.
#[doc(hidden)]
pub type KernelKey = (&'static str, &'static str);

/// Every kernel the wrappers launch. The element-wise kernels' dtype suffixes are
/// the dtypes' names, so a dtype without kernels fails
/// `the_kernel_table_matches_the_fatbin`.
pub(super) fn kernel_keys() -> impl Iterator<Item = KernelKey> {
    let typed = APPLY_OPS.iter().chain(&FUSED_OPS).chain(&FILL_OPS).chain(&CHANNELS_LAST_OPS);
    UNTYPED.iter().map(|&op| (op, "")).chain(typed.flat_map(|&op| DType::NAMES.iter().map(move |&t| (op, t))))
}

/// `dropblock_<op>[_<dtype>]`, the name in the fatbin.
#[doc(hidden)]
pub fn kernel_name((op, dtype): KernelKey) -> String {
    if dtype.is_empty() {
        format!("dropblock_{op}")
    } else {
        format!("dropblock_{op}_{dtype}")
    }
}

/// Every kernel the wrappers launch, loaded once per context.
#[doc(hidden)]
pub fn kernel_names() -> Vec<String> {
    kernel_keys().map(kernel_name).collect()
}

/// A buffer that a call's launches read or write; the queue knows where it is.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// The element pass's input: `x`, or a backward's `dy`.
    X,
    /// Its output: `y` or `dx`; `x` itself in place.
    Y,
    /// The state's keep bits (`u32`).
    KeepBits,
    /// A channels-last state's planes' bits (`u32`), which the count pass writes
    /// and the transpose turns into `KeepBits` in the tensor's order.
    PlaneBits,
    /// The state's counters (`u64`, `DROPBLOCK_COUNT_SAMPLES + N`), zero between calls.
    Counts,
    /// The state's scales (`f32`, N).
    Scales,
    /// A shard call's kept cells per plane (`u64`).
    PlaneKept,
    /// The caller's shard counts (`u64`, [`ShardCounts`](crate::ShardCounts)'
    /// 1 + 3 · the global N).
    ShardCounts,
    /// Every window's seed words (`u64`, one a window): the sampler's check.
    Seeds,
    /// A device generator's `(seed, offset)` (`u64`). The last variant: `COUNT` counts to it.
    Generator,
}

impl Buffer {
    /// How many there are, for tables indexed by `Buffer as usize`.
    pub const COUNT: usize = Buffer::Generator as usize + 1;
}

/// A kernel argument, in the kernel's parameter order. The parameter structs are
/// borrowed: `DropBlockSampling` alone is over 500 bytes.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Geometry(&'a abi::DropBlockGeometry),
    Tiles(&'a abi::DropBlockTiles),
    Sampling(&'a abi::DropBlockSampling),
    Apply(&'a abi::DropBlockApply),
    Shard(&'a abi::DropBlockShard),
    U32(u32),
    /// A buffer's device pointer.
    Ptr(Buffer),
    /// A null pointer: no device generator, or no plane counts.
    Null,
}

/// Where a call's steps go.
#[doc(hidden)]
pub trait Queue {
    /// Zero the first `bytes` of `buffer`.
    fn zero(&mut self, buffer: Buffer, bytes: u64) -> Result<()>;
    /// Launch `kernel` on `blocks` blocks of [`THREADS`] threads, or one wave of
    /// them if fewer: every kernel strides over the rest of its work.
    fn launch(&mut self, kernel: KernelKey, blocks: u64, args: &[Arg<'_>]) -> Result<()>;
}

/// Which kernels compute a forward call's keep bits.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaunchPath {
    /// A tile's mask and its scaled copy in one launch (Expected or None
    /// normalisation, no sharing).
    Fused,
    /// `count_mask` (a tile of planes per block), then `apply`.
    Tiles,
    /// `seed_blocks` and `count_bits` over the whole grid, then `apply`: for planes
    /// too large for a tile, or too few tiles to fill the device.
    Grid,
}

/// How a forward call is launched: its element-wise parameters, its tiles and its
/// path. None of it changes the mask.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct CallPlan {
    /// The geometry the element passes and the channels-last transpose read: the
    /// call's own, or a shard's local one (its N, C and box).
    pub geometry: abi::DropBlockGeometry,
    pub apply: abi::DropBlockApply,
    pub tiles: abi::DropBlockTiles,
    pub path: LaunchPath,
    /// The forward's element pass is noise fill's kernel.
    pub noise: bool,
}

/// Which element pass a saved state runs: the forward's, or a backward's.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

impl Pass {
    /// The pass's input and output as errors name them.
    pub fn buffer_names(self) -> [&'static str; 2] {
        crate::error::pass_buffer_names(self == Pass::Backward)
    }
}

/// The launch of a forward of `cfg` on `shape`: tiles of whole windows, sized to
/// spread over `blocks` resident blocks; the grid-wide passes when a group of `q`
/// planes does not fit a tile or there are fewer than `min_tiles` tiles.
#[doc(hidden)]
pub fn launch_plan(cfg: &DropBlockConfig, shape: Shape, min_tiles: u64, blocks: u64) -> Result<CallPlan> {
    let apply = apply_params(cfg, shape);
    let g = *Plan::new(cfg, shape, RngKey::PLACEHOLDER)?.geometry();
    let tiles = tiles_of(&g, apply.plane_len, blocks);
    let path = match tiles {
        Some(t) if t.tiles >= min_tiles => {
            if matches!(cfg.normalize(), Normalize::Expected | Normalize::None)
                && cfg.sharing() == Sharing::None
                && shape.layout() == Layout::ChannelsFirst
                && cfg.fill() == Fill::Zero
            {
                LaunchPath::Fused
            } else {
                LaunchPath::Tiles
            }
        }
        _ => LaunchPath::Grid,
    };
    Ok(CallPlan { geometry: g, apply, tiles: tiles.unwrap_or_default(), path, noise: cfg.fill() == Fill::Noise })
}

/// A shard's call: the element passes read the shard's own planes (`local_g`, from
/// [`Shard::kernel_params`]), sampled by the grid-wide shard kernels.
#[doc(hidden)]
pub fn shard_call_plan(cfg: &DropBlockConfig, local: Shape, local_g: abi::DropBlockGeometry) -> CallPlan {
    CallPlan {
        geometry: local_g,
        apply: apply_params(cfg, local),
        tiles: Default::default(),
        path: LaunchPath::Grid,
        noise: cfg.fill() == Fill::Noise,
    }
}

/// The element-wise parameters of a call of `cfg` on buffers of `shape`.
fn apply_params(cfg: &DropBlockConfig, shape: Shape) -> abi::DropBlockApply {
    abi::DropBlockApply {
        numel: shape.numel() as u64,
        plane_len: shape.plane_len() as u64,
        normalize: match cfg.normalize() {
            Normalize::Global => abi::DROPBLOCK_NORM_GLOBAL,
            Normalize::PerSample => abi::DROPBLOCK_NORM_PER_SAMPLE,
            Normalize::Expected => abi::DROPBLOCK_NORM_EXPECTED,
            Normalize::None => abi::DROPBLOCK_NORM_NONE,
        },
        fixed_scale: match cfg.normalize() {
            Normalize::Expected => expected_scale(cfg.drop_prob()),
            _ => 1.0,
        },
    }
}

/// Tiles of whole groups of `q` planes, at most `TILE_CELLS` cells and (where a
/// group allows) `THREADS` windows each; `None` when `q` planes do not fit. The
/// tiled kernels run one tile per block at a time, so the time is about the rounds
/// of tiles (`⌈tiles / blocks⌉`) times a tile's work. Measured on an H200 (v6,
/// docs/PERF.md): a round of window sampling costs about as much as 70 000 cells
/// of growing and storing, so a tile samples its windows in one round (a thread
/// each), and among the tile sizes that fill the resident blocks a whole number of
/// times the one with the least work per block wins.
#[doc(hidden)]
pub fn tiles_of(g: &abi::DropBlockGeometry, plane_len: u64, blocks: u64) -> Option<abi::DropBlockTiles> {
    /// A round of window sampling, in cells of growing and storing.
    const SAMPLING_ROUND_CELLS: u64 = 70_000;
    let q = g.planes_per_window as u64;
    let fit = TILE_CELLS / plane_len / q * q;
    if fit == 0 {
        return None;
    }
    let one_round = (THREADS as u64 / g.windows_per_group).max(1) * q;
    let cap = fit.min(one_round);
    let blocks = blocks.max(1);
    // Saturating: past 2^62 elements on a device of a block or two the product
    // overflows u64, and every such choice is equally hopeless anyway.
    let cost = |t: u64| {
        let sampling_rounds = (t.div_ceil(q) * g.windows_per_group).div_ceil(THREADS as u64);
        let work = (t * plane_len).saturating_add(sampling_rounds.saturating_mul(SAMPLING_ROUND_CELLS));
        g.planes.div_ceil(t).div_ceil(blocks).saturating_mul(work)
    };
    let best = (1..=64u64)
        .map(|rounds| g.planes.div_ceil(rounds * blocks).div_ceil(q) * q)
        .chain([cap])
        .filter(|&t| t <= cap)
        .min_by_key(|&t| (cost(t), std::cmp::Reverse(t)))
        .unwrap_or(q);
    Some(tiles_with(g, plane_len, best))
}

/// Tiles of `planes_per_tile` planes (a multiple of `q` whose cells fit a tile).
#[doc(hidden)]
pub fn tiles_with(g: &abi::DropBlockGeometry, plane_len: u64, planes_per_tile: u64) -> abi::DropBlockTiles {
    // ceil(2^64 / d) for the kernels' 32-bit divisions; 0 stands for d = 1.
    let magic = |d: u64| if d <= 1 { 0 } else { u64::MAX / d + 1 };
    abi::DropBlockTiles {
        planes_per_tile,
        tiles: g.planes.div_ceil(planes_per_tile),
        groups_per_tile: planes_per_tile / g.planes_per_window as u64,
        magic_seed_cells: magic(g.seed_cells),
        magic_windows_per_group: magic(g.windows_per_group),
        magic_seed_hw: magic(g.seed_h as u64 * g.seed_w as u64),
        magic_seed_w: magic(g.seed_w as u64),
        magic_block_rows: magic(g.kd as u64 * g.kh as u64),
        magic_kh: magic(g.kh as u64),
        magic_plane_len: magic(plane_len),
    }
}

/// The apply kernel for a call: by sharing and normalisation, on 16-byte vectors
/// when both tensors are 16-byte aligned and a vector spans at most two of what it
/// looks up: slices with sharing, samples with PerSample (a vector reads at most
/// two scales), so both must be at least a vector long.
fn apply_op(dtype: DType, aligned: bool, g: &abi::DropBlockGeometry, a: &abi::DropBlockApply) -> &'static str {
    let shared = g.sharing != abi::DROPBLOCK_SHARE_NONE;
    let per_sample = a.normalize == abi::DROPBLOCK_NORM_PER_SAMPLE;
    let vec = (16 / dtype.size_bytes()) as u64;
    let sample_len = g.c as u64 * a.plane_len;
    if !aligned || (shared && a.plane_len < vec) || (per_sample && sample_len < vec) {
        return APPLY_OPS[4];
    }
    APPLY_OPS[2 * shared as usize + per_sample as usize]
}

/// A warp's items of the channels-last kernels: 32 cells x
/// `DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS` channels of one sample each.
fn channels_last_items(g: &abi::DropBlockGeometry, a: &abi::DropBlockApply) -> u64 {
    g.n as u64 * a.plane_len.div_ceil(32) * (g.c as u64).div_ceil(abi::DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS as u64)
}

/// The kernel that gives a channels-last forward its keep bits and its scaled
/// copy in one pass, where it applies: Zero fill, 16-byte aligned buffers and C a
/// multiple of the item's channels (so a cell's channels are whole vectors).
/// Otherwise the transpose and the flat apply.
fn channels_last_op(shape: Shape, aligned: bool, launch: &CallPlan) -> Option<&'static str> {
    let whole_items = (shape.c() as u64).is_multiple_of(abi::DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS as u64);
    (shape.layout() == Layout::ChannelsLast && aligned && whole_items && !launch.noise)
        .then_some(CHANNELS_LAST_OPS[(launch.apply.normalize == abi::DROPBLOCK_NORM_PER_SAMPLE) as usize])
}

/// Where the count pass writes the planes' bits: the keep bits themselves, or for
/// a channels-last shape the planes' own buffer.
fn plane_bits(shape: Shape) -> Buffer {
    match shape.layout() {
        Layout::ChannelsFirst => Buffer::KeepBits,
        Layout::ChannelsLast => Buffer::PlaneBits,
    }
}

/// A forward that draws a mask: its keep bits, counts and scales, then (with
/// `aligned`, whether x and y are 16-byte aligned; `None` for the sampling alone)
/// its element pass. `generator`: the key is in a device generator, which the
/// kernels read and step; the plan's own key is then a placeholder.
#[doc(hidden)]
pub fn forward(
    q: &mut impl Queue,
    plan: &Plan,
    launch: &CallPlan,
    shape: Shape,
    dtype: DType,
    aligned: Option<bool>,
    generator: bool,
) -> Result<()> {
    let (g, a, tiles, s) = (plan.geometry(), &launch.apply, &launch.tiles, plan.sampling());
    let key = if generator { Arg::Ptr(Buffer::Generator) } else { Arg::Null };
    let bits = plane_bits(shape);
    let state = [Arg::Ptr(bits), Arg::Ptr(Buffer::Counts), Arg::Ptr(Buffer::Scales)];
    let head = [Arg::Geometry(g), Arg::Tiles(tiles), Arg::Sampling(s), key, Arg::Apply(a)];
    match (launch.path, aligned) {
        (LaunchPath::Fused, Some(aligned)) => {
            let op = FUSED_OPS[!aligned as usize];
            let io = [Arg::Ptr(Buffer::X), Arg::Ptr(Buffer::Y)];
            q.launch((op, dtype.name()), tiles.tiles, &concat([&head, &io, &state]))?;
        }
        (LaunchPath::Fused | LaunchPath::Tiles, _) => {
            q.launch(("count_mask", ""), tiles.tiles, &concat([&head, &state]))?;
        }
        (LaunchPath::Grid, _) => {
            let words = (g.planes * a.plane_len).div_ceil(32);
            q.zero(bits, words * 4)?;
            let args = [Arg::Geometry(g), Arg::Sampling(s), key, Arg::Apply(a), Arg::Ptr(bits)];
            q.launch(("seed_blocks", ""), g.windows.div_ceil(THREADS as u64), &args)?;
            let args = [Arg::Geometry(g), Arg::Apply(a), state[0], state[1], state[2], key];
            q.launch(("count_bits", ""), words.div_ceil(THREADS as u64), &args)?;
        }
    }
    let one_pass = aligned.and_then(|aligned| channels_last_op(shape, aligned, launch));
    if shape.layout() == Layout::ChannelsLast && one_pass.is_none() {
        channels_last_bits(q, g, a)?;
    }
    let Some(aligned) = aligned else {
        return Ok(());
    };
    if let Some(op) = one_pass {
        let args = [Buffer::X, Buffer::Y, Buffer::PlaneBits, Buffer::KeepBits, Buffer::Scales].map(Arg::Ptr);
        let blocks = channels_last_items(g, a).div_ceil(THREADS as u64 / 32);
        q.launch((op, dtype.name()), blocks, &concat([&[Arg::Geometry(g), Arg::Apply(a)], &args]))
    } else if launch.path != LaunchPath::Fused {
        element_pass(q, plan, launch, shape, None, dtype, aligned, Pass::Forward)
    } else {
        Ok(())
    }
}

/// A channels-last call's keep bits in the tensor's order, from the planes' bits.
fn channels_last_bits(q: &mut impl Queue, g: &abi::DropBlockGeometry, a: &abi::DropBlockApply) -> Result<()> {
    if !g.c.is_multiple_of(32) {
        // Runs straddle words and are ORed in (kernels/dropblock.cu).
        q.zero(Buffer::KeepBits, a.numel.div_ceil(32) * 4)?;
    }
    let args = [Arg::Geometry(g), Arg::Apply(a), Arg::Ptr(Buffer::PlaneBits), Arg::Ptr(Buffer::KeepBits)];
    q.launch(("channels_last_bits", ""), channels_last_items(g, a).div_ceil(THREADS as u64 / 32), &args)
}

/// The element pass of a call on a state of `shape`: a forward's (noise fill's
/// own kernel under `Fill::Noise`) or a backward's. `shard`: the parameters of a
/// shard's call, whose noise units are numbered in the whole tensor.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn element_pass(
    q: &mut impl Queue,
    plan: &Plan,
    launch: &CallPlan,
    shape: Shape,
    shard: Option<abi::DropBlockShard>,
    dtype: DType,
    aligned: bool,
    pass: Pass,
) -> Result<()> {
    let (g, a) = (&launch.geometry, &launch.apply);
    let io = [Arg::Ptr(Buffer::X), Arg::Ptr(Buffer::Y)];
    if launch.noise && pass == Pass::Forward {
        let channels_last = (shape.layout() == Layout::ChannelsLast) as u32;
        let shard = match shard {
            Some(sh) => sh,
            None => Shard::whole(shape).kernel_params(plan)?.0,
        };
        let params = [
            Arg::Geometry(g),
            Arg::Apply(a),
            Arg::Geometry(plan.geometry()),
            Arg::Shard(&shard),
            Arg::Sampling(plan.sampling()),
            Arg::U32(channels_last),
        ];
        let args = concat([&params, &io, &[Arg::Ptr(Buffer::KeepBits)]]);
        return q.launch((FILL_OPS[0], dtype.name()), a.numel.div_ceil(THREADS as u64), &args);
    }
    // A channels-last state's keep bits are in the tensor's order: flat, whatever
    // the sharing.
    let flat;
    let g = match shape.layout() {
        Layout::ChannelsFirst => g,
        Layout::ChannelsLast => {
            flat = abi::DropBlockGeometry { sharing: abi::DROPBLOCK_SHARE_NONE, planes: a.numel / a.plane_len, ..*g };
            &flat
        }
    };
    let op = apply_op(dtype, aligned, g, a);
    let vec = if op == APPLY_OPS[4] { 1 } else { (16 / dtype.size_bytes()) as u64 };
    let state = [Arg::Ptr(Buffer::KeepBits), Arg::Ptr(Buffer::Scales)];
    let args = concat([&[Arg::Geometry(g), Arg::Apply(a)], &io, &state]);
    q.launch((op, dtype.name()), (a.numel / vec).div_ceil(THREADS as u64), &args)
}

/// A shard's sampling (`DropBlockCuda::sample_shard`): the shard's box of the
/// global call's mask and its kept counts, written over `ShardCounts` (`entries`
/// of them). `launch` is [`shard_call_plan`]'s; `local` the shard's shape.
/// `generator`: the key is in a device generator, read and stepped by the kernels.
#[doc(hidden)]
pub fn sample_shard(
    q: &mut impl Queue,
    plan: &Plan,
    sh: &abi::DropBlockShard,
    launch: &CallPlan,
    local: Shape,
    entries: u64,
    generator: bool,
) -> Result<()> {
    let (g, a, s) = (plan.geometry(), &launch.apply, plan.sampling());
    let key = if generator { Arg::Ptr(Buffer::Generator) } else { Arg::Null };
    let bits = plane_bits(local);
    let words = (sh.planes * a.plane_len).div_ceil(32);
    q.zero(Buffer::ShardCounts, entries * 8)?;
    q.zero(bits, words * 4)?;
    q.zero(Buffer::PlaneKept, sh.planes * 8)?;
    let items = if g.seed_cells <= abi::DROPBLOCK_WINDOW_CELLS as u64 {
        sh.planes.div_ceil(sh.run_planes) * sh.windows_per_run
    } else {
        sh.planes * (sh.part_hi - sh.part_lo)
    };
    let args = [Arg::Geometry(g), Arg::Shard(sh), Arg::Sampling(s), key, Arg::Ptr(bits)];
    q.launch(("shard_blocks", ""), items.div_ceil(THREADS as u64), &args)?;
    let args = [Arg::Shard(sh), Arg::Apply(a), Arg::Ptr(bits), Arg::Ptr(Buffer::PlaneKept)];
    q.launch(("shard_count_planes", ""), words.div_ceil(THREADS as u64), &args)?;
    let args = [Arg::Geometry(g), Arg::Shard(sh), Arg::Ptr(Buffer::PlaneKept), Arg::Ptr(Buffer::ShardCounts), key];
    q.launch(("shard_count_samples", ""), (local.n() as u64).div_ceil(THREADS as u64), &args)?;
    if local.layout() == Layout::ChannelsLast {
        channels_last_bits(q, &launch.geometry, a)?;
    }
    Ok(())
}

/// An identity shard call (eval, or nothing to drop): every element of the box
/// kept, counted without plane counts. It draws nothing, so a device generator
/// stays as it is.
#[doc(hidden)]
pub fn sample_shard_identity(q: &mut impl Queue, shard: &Shard, entries: u64) -> Result<()> {
    q.zero(Buffer::ShardCounts, entries * 8)?;
    let args = [
        Arg::Geometry(&abi::DropBlockGeometry::default()),
        Arg::Shard(&shard.box_params()),
        Arg::Null,
        Arg::Ptr(Buffer::ShardCounts),
        Arg::Null,
    ];
    q.launch(("shard_count_samples", ""), (shard.local().n() as u64).div_ceil(THREADS as u64), &args)
}

/// A shard's scales from the counts summed over every shard: one block, which
/// checks the counts before it divides (NaN scales when no shards could give them:
/// the kernel's comment).
#[doc(hidden)]
pub fn finish_shard(q: &mut impl Queue, sh: &abi::DropBlockShard, launch: &CallPlan) -> Result<()> {
    let args = [Arg::Shard(sh), Arg::Apply(&launch.apply), Arg::Ptr(Buffer::ShardCounts), Arg::Ptr(Buffer::Scales)];
    q.launch(("shard_scales", ""), 1, &args)
}

/// Every window's seed words, in window order, from the kernels' own sampler
/// (`DropBlockCuda::sample_seeds`, for checking it against `Plan::sample_window`).
#[doc(hidden)]
pub fn sample_seeds(q: &mut impl Queue, plan: &Plan) -> Result<()> {
    let g = plan.geometry();
    let args = [Arg::Geometry(g), Arg::Sampling(plan.sampling()), Arg::Ptr(Buffer::Seeds)];
    q.launch(("sample_seeds", ""), g.windows.div_ceil(THREADS as u64), &args)
}

/// The parts' arguments in one list (at most a kernel's).
fn concat<'a, const N: usize>(parts: [&[Arg<'a>]; N]) -> ArgList<'a> {
    let mut out = ArgList { args: [Arg::Null; MAX_ARGS], len: 0 };
    for a in parts.into_iter().flatten() {
        out.args[out.len] = *a;
        out.len += 1;
    }
    out
}

/// The most parameters a kernel has.
const MAX_ARGS: usize = 12;

/// A kernel's arguments on the stack (no allocation per launch).
struct ArgList<'a> {
    args: [Arg<'a>; MAX_ARGS],
    len: usize,
}

impl<'a> std::ops::Deref for ArgList<'a> {
    type Target = [Arg<'a>];
    fn deref(&self) -> &[Arg<'a>] {
        &self.args[..self.len]
    }
}

#[cfg(test)]
mod tests {
    /// Launch plans past 2^32 planes and 2^33 elements (docs/INDEXING.md): the
    /// tiles cover every plane with whole groups of `q` that fit a tile, and no
    /// arithmetic overflows (a debug build traps on overflow).
    #[test]
    fn plans_past_2_pow_32_planes_cover_every_plane() {
        use super::{launch_plan, LaunchPath, TILE_CELLS};
        use crate::{DropBlockConfig, Sharing};
        let shapes =
            [(1 << 17, 1 << 16, 1, 1), (65_600, 65_600, 1, 1), (1, 66_100, 255, 255), (1 << 31, 1 << 31, 1, 1)];
        let configs = [
            DropBlockConfig::paper(1, 0.1).unwrap(),
            DropBlockConfig::paper(3, 0.1).unwrap(),
            DropBlockConfig::builder(crate::Block::square(7).unwrap(), 0.1).sharing(Sharing::Batch).build().unwrap(),
        ];
        let mut tiled = 0;
        for (n, c, h, w) in shapes {
            let shape = crate::Shape::new(n, c, h, w).unwrap();
            for cfg in &configs {
                for blocks in [1, 2, 1_056, 1 << 20] {
                    let plan = launch_plan(cfg, shape, 1, blocks).unwrap();
                    if plan.path == LaunchPath::Grid {
                        continue;
                    }
                    tiled += 1;
                    let g = *crate::sampling::Plan::new(cfg, shape, crate::RngKey::PLACEHOLDER).unwrap().geometry();
                    let (t, q) = (plan.tiles, g.planes_per_window as u64);
                    let what = format!("{shape} {cfg} blocks {blocks}: {t:?}");
                    assert!(t.planes_per_tile > 0 && t.planes_per_tile % q == 0, "{what}");
                    assert!(t.planes_per_tile * plan.apply.plane_len <= TILE_CELLS, "{what}");
                    assert!(t.tiles * t.planes_per_tile >= g.planes, "{what}");
                    assert!((t.tiles - 1) * t.planes_per_tile < g.planes, "{what}");
                    assert_eq!(t.groups_per_tile * q, t.planes_per_tile, "{what}");
                }
            }
        }
        // Most of these plans are tiled: the checks above must not all be skipped.
        assert!(tiled >= 24, "only {tiled} tiled plans");
    }
}
