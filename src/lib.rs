//! # dropblock
//!
//! DropBlock (Ghiasi, Lin & Le, *DropBlock: A regularization method for
//! convolutional networks*, NeurIPS 2018) for CUDA training pipelines, at the cost
//! of a memory copy, with a CPU path that agrees with the GPU bit for bit.
//!
//! DropBlock zeroes contiguous blocks of a feature map instead of single
//! activations: (1) sample Bernoulli(γ) seeds, (2) grow each seed into a block,
//! (3) rescale what is kept.
//!
//! ```
//! use dropblock::{cpu, DropBlockConfig, Mode, RngKey, Shape};
//!
//! let cfg = DropBlockConfig::paper(3, 0.1)?;          // 3x3 blocks, drop_prob 0.1
//! let shape = Shape::new(2, 4, 16, 16)?;               // N, C, H, W
//! let x = vec![1.0f32; shape.numel()];
//! let mut y = vec![0.0f32; shape.numel()];
//! let saved = cpu::forward(&cfg, shape, RngKey::new(42, 0)?, Mode::Train, &x, &mut y)?;
//! let mut dx = vec![0.0f32; shape.numel()];
//! cpu::backward(&saved, &y, &mut dx)?;
//! println!("dropped {:.3} of the tensor", saved.drop_fraction());
//! # Ok::<(), dropblock::Error>(())
//! ```
//!
//! # The sampling contract
//!
//! Both paths follow this exactly, whatever the launch configuration; the mask of
//! a call is a pure function of the configuration, the shape and `(seed, offset)`.
//!
//! ## Shapes, blocks and mask planes
//!
//! Tensors are channels-first with 1, 2 or 3 spatial dimensions: `(N, C, L)`,
//! `(N, C, H, W)` or `(N, C, D, H, W)` ([`Shape`]). Every rank is a `D × H × W`
//! volume with unit axes in front (1D is `1 × 1 × L`, 2D is `1 × H × W`), and
//! everything below is stated per axis, so it reads the same in every rank; a 2D
//! call gives the mask it gave before 1D and 3D existed.
//!
//! A shape also carries the buffers' [`Layout`]: channels-first (`N, C,
//! spatial...`, the default) or channels-last (`N, spatial..., C`: NLC, NHWC,
//! NDHWC). The mask is defined on logical coordinates, so the two layouts of the
//! same logical tensor drop the same units; only where they lie in memory differs.
//!
//! The block ([`Block`]) has a size `k` per spatial axis, or one size for every
//! axis; a block of a fixed rank must meet a tensor of that rank. On an axis of
//! `S` cells it is clipped to `kc = min(k, S)`. A *mask plane* is what one seed
//! grid covers; [`Sharing`] decides how many:
//!
//! | sharing | planes | plane of slice `(n, c)` |
//! |---|---|---|
//! | `None` (default) | `N·C` | `n·C + c` |
//! | `Channels` | `N` | `n` |
//! | `Batch` | `C` | `c` |
//! | `All` | 1 | 0 |
//!
//! Each plane has a seed grid, the product of one range of seed positions per
//! axis, and a seed drops the product of one interval per axis, clipped to the map:
//!
//! | [`Placement`] / [`Anchor`] | seed positions | a seed at `i` drops |
//! |---|---|---|
//! | `Valid` (default) | `S - kc + 1` | `[i, i + kc)` |
//! | `Anywhere`, `Centered` (default) | `S` | `[i - ⌊kc/2⌋, i - ⌊kc/2⌋ + kc)` (TF "SAME") |
//! | `Anywhere`, `CenteredRight` | `S` | `[i - ⌊(k-1)/2⌋, i + ⌊k/2⌋]`, unclipped `k` (miguelvr) |
//!
//! ## γ
//!
//! [`GammaRule::Paper`] (default): `γ = gamma_scale · p·∏S / (∏kc · ∏(S-kc+1))` in
//! f64 over the three axes in order (`p·H·W / (kh·kw·(H-kh+1)·(W-kw+1))` in 2D).
//! [`GammaRule::ExactRate`] solves for the γ whose expected dropped fraction,
//! counting overlaps and edges, is exactly `p`, then multiplies by `gamma_scale`
//! (Newton steps in IEEE f64 arithmetic alone, no libm: the same γ everywhere).
//! [`GammaRule::PerBlock`]: `γ = gamma_scale · p / ∏k` with the unclipped block
//! (miguelvr). γ outside `[0, 1]` acts as its clamp.
//!
//! ## Sampling (contract version 3)
//!
//! The contract carries a version ([`abi::DROPBLOCK_CONTRACT_VERSION`]); the masks
//! for a given key change only with it. Version 3 (crate 0.3) evaluates the
//! thresholds exactly; version 2 (crate 0.2) evaluated them with the platform's
//! libm and cut windows along whole planes; version 1 (crate 0.1) cut them per
//! seed-grid row.
//!
//! - **Thresholds**, once on the host, as u64:
//!   `T[j] = floor(2^32 · (1 - (1-γ)^(j+1)))` for `j = 0..63`, evaluated exactly
//!   (γ, an f64, is a rational; so is each power), the same on every platform.
//!   γ ≤ 0 gives all zeros, γ ≥ 1 all `2^32`.
//! - **Seed cells.** A plane's seed grid has `S` cells, numbered in row-major
//!   order (C order over the seed grid's axes: in 2D cell `i = y · Ws + x`, in 3D
//!   `i = (z · Hs + y) · Ws + x`).
//! - **Windows.** Planes are grouped `q = max(1, ⌊64/S⌋)` at a time: group `g`
//!   holds planes `[q·g, min(q·g + q, P))`. A group's cells, plane-major then by
//!   cell number, are cut into windows of 64 consecutive cells, the last one
//!   possibly shorter; with `m = ⌈S/64⌉`, window `w = g·m + i` is window `i` of group
//!   `g`, and there are `⌈P/q⌉·m` windows. So when `S ≤ 64` a window holds the
//!   whole planes `[q·w, min(q·w + q, P))` (cell `j` is cell `j mod S` of plane
//!   `q·w + ⌊j/S⌋`), and when `S > 64` window `w = p·m + i` holds cells
//!   `[64i, min(64i + 64, S))` of plane `p`. No window holds part of a plane and
//!   part of another, so whoever owns whole planes owns their windows.
//! - **Draws.** Draw `j` of window `w` is word `j mod 4` of
//!   `curand_Philox4x32_10(counter, key)` with counter
//!   `(lo(o + ⌊j/4⌋), hi(o + ⌊j/4⌋), lo(w), hi(w))` and key `(lo(s), hi(s))`: the
//!   stream `curand_init(s, w, 4·o)` then `curand()` produces (where `4·o` fits
//!   curand's 64-bit offset, i.e. `o < 2^62`).
//! - **Seeds in a window.** With `r` cells left, take the next draw `u`. If
//!   `u ≥ T[r-1]` the rest of the window has no seed. Otherwise the next seed is
//!   `g` cells ahead, `g` the smallest index with `u < T[g]`; mark it, step past it
//!   and repeat. In distribution this is an independent Bernoulli(γ) per cell (up to
//!   the 2^-32 quantisation of `T`), at one draw per window plus one per seed.
//! - **Offsets.** A call's sampling reads counter blocks `o` through `o+15` of each
//!   window's subsequence, and noise fill block `o+16` (Output, below), so a call
//!   needs `o + 16 < 2^64` ([`RngKey::new`] rejects more). A [`Generator`] advances
//!   by 17 per call.
//!
//! ## Output
//!
//! The scale, computed in f64 and rounded to f32 ([`Normalize`]): Global
//! `numel / kept`; PerSample `C·L / kept_n` (`L` the elements of a slice); Expected `1 / (1 - p)`; None 1. A
//! kept count of 0, or `p = 1` under Expected, gives scale 0: zeros, never NaN.
//! `y = round_to_dtype(f32(x) · (kept ? scale : 0))`, round to nearest even; NaN or
//! Inf in a dropped position give what `x · 0` gives (the payload of a NaN output
//! is not specified). Backward: `dx = dy · (the same factor)`. Eval mode and
//! `drop_prob == 0` return the input unchanged and draw nothing.
//!
//! With [`Fill::Noise`] (which needs `Normalize::None`), kept units are copied
//! unscaled and a dropped unit takes `round_to_dtype(z)`, the standard normal value
//! of its mask unit `plane · L + cell` ([`noise`]: Box–Muller on counter block
//! `o + 16` of subsequence `⌊unit / 4⌋`, with the crate's own exactly rounded
//! polynomials, so CPU and GPU agree bit for bit); the backward is `dy` where kept
//! and `dy · 0` where dropped.
//!
//! # Layout
//!
//! - [`config`]: the configuration and the shape, validated. [`dtype`]: the
//!   element types (f32, f16, bf16).
//! - [`abi`]: the plain-C structs and constants the kernels share with the host
//!   (`kernels/dropblock_abi.h`), which [`sampling::Plan`] fills.
//! - [`rng`]: Philox and `(seed, offset)` keys. [`sampling`]: geometry, γ,
//!   thresholds, the window sampler. [`mask`]: seeds grown into block masks.
//!   [`noise`]: the values of noise fill.
//! - [`cpu`]: forward and backward on host slices.
//! - `cuda` (feature `cuda`): the same on the caller's CUDA stream.
//! - [`shard`]: one device's box of a tensor split across many, and the counts the
//!   shards sum ([`cpu::sample_shard`]; `cuda::DropBlockCuda::sample_shard`).
//! - [`schedule`]: drop-rate schedules (the originals' `linspace` ramp).
//! - `candle` (feature `candle`): a candle layer, `candle::DropBlock`.
//!
//! Items hidden from these docs (`#[doc(hidden)]`: the launch sequences, the
//! kernels' parameter structs behind [`Shard`], test hooks such as
//! `DropBlockCuda::sample_seeds`) are public only for this crate's own tests and
//! tools; they are not part of the API and may change in any release.

#![deny(missing_docs)]

#[macro_use]
mod simd;

/// The plain-C ABI shared by the CUDA kernels and the host, generated by bindgen
/// from `kernels/dropblock_abi.h` (whose comments carry over as the items' docs):
/// the contract's constants (window size, counter blocks a call reads, the
/// offset stride), the sharing and normalisation codes, and the per-call structs
/// ([`DropBlockGeometry`](abi::DropBlockGeometry),
/// [`DropBlockSampling`](abi::DropBlockSampling), ...) that
/// [`sampling::Plan`] derives on the host and the kernels take by value.
#[rustfmt::skip]
pub mod abi;
#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
/// The cudarc whose types the CUDA path takes and returns (0.19, feature
/// `cuda-13000`): name them through this, or depend on `cudarc = "0.19"` with the
/// same CUDA version feature, which Cargo unifies with this one (another version
/// feature beside it breaks cudarc's build).
#[cfg(feature = "cuda")]
pub use cudarc;
pub mod dtype;
mod error;
pub mod mask;
pub mod noise;
pub mod rng;
pub mod sampling;
pub mod schedule;
pub mod shard;

pub use config::{
    Anchor, Block, DropBlockConfig, DropBlockConfigBuilder, Fill, GammaRule, Layout, Mode, Normalize, Placement, Shape,
    Sharing,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
// The command line's buffers take the same fallible allocation as the crate's own.
#[doc(hidden)]
pub use error::host_vec;
pub use rng::{Generator, RngKey};
pub use schedule::{tpu_group_keep_prob, LinearSchedule};
pub use shard::{Shard, ShardCounts};

// What callers share across threads: a layer or engine behind an `Arc`, a state
// handed to the thread that runs the backward, the sampled masks of a shard on
// a worker. Losing `Send` or `Sync` on any of these breaks that code, so it is
// checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<DropBlockConfig>();
    send_sync::<Shape>();
    send_sync::<RngKey>();
    send_sync::<Generator>();
    send_sync::<LinearSchedule>();
    send_sync::<Shard>();
    send_sync::<ShardCounts>();
    send_sync::<sampling::Plan>();
    send_sync::<cpu::Saved>();
    send_sync::<cpu::ShardSample>();
    send_sync::<Error>();
    #[cfg(feature = "cuda")]
    {
        send_sync::<cuda::DropBlockCuda>();
        send_sync::<cuda::DeviceState>();
        send_sync::<cuda::DeviceGenerator>();
    }
    #[cfg(feature = "candle")]
    send_sync::<candle::DropBlock>();
};
