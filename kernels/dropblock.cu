// DropBlock kernels (every spatial rank: a 1D or 2D call is a volume with unit
// axes). Entry points are extern "C" with the op and the dtype in the name, so an
// Nsight timeline reads plainly. What each call launches is src/cuda/launch.rs.
//
// The mask (a forward's first pass):
//   dropblock_count_mask                 seeds -> blocks -> keep bits, kept counts and
//                                        scales, a tile of whole planes per block
//   dropblock_seed_blocks                the same over the whole grid, for planes too
//   dropblock_count_bits                   large for a tile (or too few tiles): blocks, then
//                                          keep bits, counts and scales
//   dropblock_fused_<T>                  count_mask and the scaled copy in one launch:
//   dropblock_fused_unaligned_<T>          Expected or None normalisation, no sharing,
//                                          channels-first, Zero fill
// The scaled copy y = x * factor from saved keep bits and scales (a forward's
// second pass, and every backward):
//   dropblock_apply_<T>                  the bits of element e are bit e, one scale
//   dropblock_apply_per_sample_<T>       ... one scale per sample
//   dropblock_apply_shared_<T>           bits looked up per slice (sharing), one scale
//   dropblock_apply_shared_per_sample_<T>  ... one scale per sample
//   dropblock_apply_unaligned_<T>        any of these, one element at a time
//   dropblock_fill_noise_<T>             noise fill's forward: x where kept, the unit's
//                                          normal value where dropped
// Channels-last:
//   dropblock_channels_last_bits         keep bits in the tensor's order, from the
//                                          planes' bits
//   dropblock_apply_channels_last_<T>    those bits and, from them, the scaled copy in
//   dropblock_apply_channels_last_per_sample_<T>  one pass (C a multiple of 128,
//                                          x and y 16-byte aligned, Zero fill)
// Shards (src/shard.rs):
//   dropblock_shard_blocks               a shard's seeds' blocks, clipped to its box
//   dropblock_shard_count_planes         its keep bits, and kept cells per plane
//   dropblock_shard_count_samples        its counts per sample; steps a device generator
//   dropblock_shard_scales               the scales from the counts summed over shards
// Checks:
//   dropblock_sample_seeds               the raw seed words, for checking the sampler
//
// The vector kernels need x and y 16-byte aligned and use 16-byte loads and stores;
// the shared ones also need slices of at least a vector, the per-sample ones samples
// of at least a vector (a vector then reads at most two scales or slices). Every
// kernel runs DROPBLOCK_THREADS threads a block and strides over its work, so the
// host caps its grid at one wave. The tiled kernels' bounds cap their registers at
// 64, for 4 blocks per multiprocessor; their ~17 KiB of shared memory a block does
// not limit that below 4 from sm_80 on, and allows 3 on sm_75 (64 KiB an SM). The
// host sizes their grids by the occupancy the driver reports.

#include "elementwise.cuh"
#include "noise.cuh"
#include "shard.cuh"

namespace dropblock {

constexpr uint32_t TILED_BLOCKS_PER_SM = 4;

__device__ __forceinline__ uint64_t global_thread() { return blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ uint64_t threads_in_grid() { return gridDim.x * (uint64_t)blockDim.x; }

// The count pass, or with `apply_tile` the fused pass: each block walks tiles
// blockIdx.x, blockIdx.x + gridDim.x, ...; builds each in shared memory, stores
// its keep bits, and (fused) writes y for the tile's planes from the shared bits.
template <typename ApplyTile>
__device__ __forceinline__ void tiled(const DropBlockGeometry& g, const DropBlockTiles& tiles,
                                      const DropBlockSampling& s, unsigned long long* device_key,
                                      const DropBlockApply& a, uint32_t* keep_bits, unsigned long long* counts,
                                      float* scales, ApplyTile apply_tile) {
    __shared__ TileShared sh;
    for (uint32_t i = threadIdx.x; i < DROPBLOCK_TILE_WORDS; i += blockDim.x) sh.bits[i] = 0;
    if (threadIdx.x == 0) sh.queued = 0;
    const Key k = load_key(s, device_key);
    // Synchronises the block, so the zeroed tile is seen too.
    const Thresholds th = shared_thresholds(s);
    const TileDivisors d(g, tiles, a);
    Counts c(g, a, counts);
    for (uint64_t t = blockIdx.x; t < tiles.tiles; t += gridDim.x) {
        const Tile tile(tiles, g, a, t);
        build_tile(g, tiles, d, th, k, tile, t, sh);
        store_tile(g, a, d, tile, sh, apply_tile.keeps_bits_in_shared, keep_bits, c);
        if (apply_tile.keeps_bits_in_shared) {
            __syncthreads();
            apply_tile(tile, sh.bits);
            __syncthreads();
            for (uint32_t i = threadIdx.x; i < tile.words; i += blockDim.x) sh.bits[i] = 0;
        }
        __syncthreads();
    }
    publish_counts(g, a, c.kept, counts, scales, device_key);
}

struct NoApply {
    static constexpr bool keeps_bits_in_shared = false;
    __device__ __forceinline__ void operator()(const Tile&, const uint32_t*) const {}
};

// Without sharing a tile's planes are the slices of elements [first * L,
// (first + planes) * L), and element e's keep bit is bit e.
template <typename T, bool VECTOR>
struct ApplyTileFlat {
    static constexpr bool keeps_bits_in_shared = true;
    const DropBlockApply& a;
    const T* x;
    T* y;
    __device__ __forceinline__ void operator()(const Tile& tile, const uint32_t* bits) const {
        const FlatBits fb{bits, tile.word0};
        const Scales sc{nullptr, a.fixed_scale, 0};
        const uint64_t first = tile.first * a.plane_len, last = first + tile.cells;
        if (VECTOR) {
            apply_flat<T, false, UNROLL_LEAN>(x, y, first, last, threadIdx.x, blockDim.x, fb, sc);
        } else {
            for (uint64_t e = first + threadIdx.x; e < last; e += blockDim.x)
                y[e] = scale_element(x[e], fb.from(e) & 1u ? sc.s0 : 0.0f);
        }
    }
};

}  // namespace dropblock

using namespace dropblock;

extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, TILED_BLOCKS_PER_SM)
dropblock_count_mask(DropBlockGeometry g, DropBlockTiles tiles, DropBlockSampling s,
                       unsigned long long* device_key, DropBlockApply a, uint32_t* keep_bits,
                       unsigned long long* counts, float* scales) {
    tiled(g, tiles, s, device_key, a, keep_bits, counts, scales, NoApply{});
}

// For planes too large for a tile: dropblock_seed_blocks ORs every window's
// blocks into dropped bits (zeroed by the host) over the whole grid, then
// dropblock_count_bits turns them into keep bits and counts them.
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_seed_blocks(DropBlockGeometry g, DropBlockSampling s, const unsigned long long* device_key,
                        DropBlockApply a, uint32_t* bits) {
    const Thresholds th = shared_thresholds(s);
    seed_windows_global(g, th, load_key(s, device_key), a, global_thread(), threads_in_grid(), bits);
}

extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_count_bits(DropBlockGeometry g, DropBlockApply a, uint32_t* bits, unsigned long long* counts,
                       float* scales, unsigned long long* device_key) {
    const uint64_t cells = g.planes * a.plane_len, words = (cells + 31) / 32;
    Counts c(g, a, counts);
    // Each word's first plane and cell (PerSample only).
    RunCursor at = c.per_sample ? RunCursor(global_thread() * 32, threads_in_grid() * 32, a.plane_len) : RunCursor();
    for (uint64_t i = global_thread(); i < words; i += threads_in_grid(), at.step()) {
        const uint32_t hi = (uint32_t)min((uint64_t)32, cells - i * 32);
        const uint32_t keep = ~bits[i] & bit_range(0, hi);
        bits[i] = keep;
        c.kept += __popc(keep);
        if (c.per_sample) c.add_samples(keep, 0, hi, at.n, at.pos, a.plane_len);
    }
    // A lane's words span the whole call: its runs are summed across the warp only
    // when every plane feeds one counter.
    c.end_runs(0, g.planes - 1);
    publish_counts(g, a, c.kept, counts, scales, device_key);
}

template <typename T, bool VECTOR>
__device__ __forceinline__ void fused(const DropBlockGeometry& g, const DropBlockTiles& tiles,
                                      const DropBlockSampling& s, unsigned long long* device_key,
                                      const DropBlockApply& a, const T* x, T* y, uint32_t* keep_bits,
                                      unsigned long long* counts, float* scales) {
    tiled(g, tiles, s, device_key, a, keep_bits, counts, scales, ApplyTileFlat<T, VECTOR>{a, x, y});
}

template <typename T, bool SHARED, bool PER_SAMPLE>
__device__ __forceinline__ void apply(const DropBlockGeometry& g, const DropBlockApply& a, const T* x, T* y,
                                      const uint32_t* keep_bits, const float* scales) {
    const Scales sc{scales, scales[0], (uint64_t)g.c * a.plane_len};
    if (SHARED) {
        const PlaneBits pb(g, keep_bits, a.plane_len);
        apply_planes<T, PER_SAMPLE>(x, y, a.numel, global_thread(), threads_in_grid(), pb, sc);
    } else {
        apply_flat<T, PER_SAMPLE>(x, y, 0, a.numel, global_thread(), threads_in_grid(), FlatBits{keep_bits, 0}, sc);
    }
}

// Noise fill (src/noise.rs): y = x where kept (no rescaling), the noise of the
// element's mask unit (plane * L + cell, so sharing shares it) where dropped. One
// element per thread and step, any alignment: a rarely used mode, kept simple, but
// with no division per element; only a dropped one divides, to place its unit.
template <typename T>
__device__ __forceinline__ void fill_noise(const DropBlockGeometry& g, const DropBlockApply& a,
                                           const DropBlockGeometry& global, const DropBlockShard& sh,
                                           const DropBlockSampling& s, bool channels_last, const T* x, T* y,
                                           const uint32_t* keep_bits) {
    const Key k = load_key(s, nullptr);
    const uint64_t L = a.plane_len, C = g.c;
    const uint64_t global_len = (uint64_t)global.d * global.h * global.w;
    const uint64_t box_hw = (uint64_t)sh.extent[1] * sh.extent[2];
    // Channels-last elements run (n, cell, c): stepped as a Position of slices of C
    // "cells", whose `c` is the cell and whose `cell` the channel.
    const uint64_t inner = channels_last ? C : L, middle = channels_last ? L : C;
    const PositionStep step(threads_in_grid(), inner, middle);
    Position p = position_of(global_thread(), inner, middle);
    for (uint64_t e = global_thread(); e < a.numel; e += threads_in_grid(), p = step(p)) {
        const uint64_t n = p.n, c = channels_last ? p.cell : p.c, cell = channels_last ? p.c : p.cell;
        // Channels-last keep bits are in the tensor's order (bit e), else the planes'.
        const uint64_t b = channels_last ? e : plane_of(g, n, c) * L + cell;
        if ((keep_bits[b >> 5] >> (b & 31)) & 1u) {
            y[e] = x[e];
            continue;
        }
        // The unit's number in the whole tensor (a shard's box sits at its origin).
        const uint64_t z = cell / box_hw, rest = cell - z * box_hw, yy = rest / sh.extent[2], xx = rest - yy * sh.extent[2];
        const uint64_t global_cell =
            ((sh.origin[0] + z) * global.h + sh.origin[1] + yy) * global.w + sh.origin[2] + xx;
        const uint64_t unit = plane_of(global, sh.n0 + n, sh.c0 + c) * global_len + global_cell;
        y[e] = Elem<T>::from_float(noise_normal(k, unit));
    }
}

// x and y may be the same buffer (in place): every element is read and then
// written by the same thread, so no __restrict__.
#define DROPBLOCK_APPLY_KERNEL(T, NAME, OP, SHARED, PER_SAMPLE)                                                  \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1) dropblock_##OP##_##NAME(                              \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) { \
        apply<T, SHARED, PER_SAMPLE>(g, a, x, y, keep_bits, scales);                                             \
    }

#define DROPBLOCK_ELEMENTWISE_KERNELS(T, NAME)                                                                    \
    DROPBLOCK_APPLY_KERNEL(T, NAME, apply, false, false)                                                          \
    DROPBLOCK_APPLY_KERNEL(T, NAME, apply_per_sample, false, true)                                                \
    DROPBLOCK_APPLY_KERNEL(T, NAME, apply_shared, true, false)                                                    \
    DROPBLOCK_APPLY_KERNEL(T, NAME, apply_shared_per_sample, true, true)                                          \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1) dropblock_apply_unaligned_##NAME(                        \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) {  \
        const PlaneBits pb(g, keep_bits, a.plane_len);                                                            \
        const bool per_sample = a.normalize == DROPBLOCK_NORM_PER_SAMPLE;                                         \
        apply_scalar<T>(x, y, a.numel, global_thread(), threads_in_grid(), pb,                                    \
                        Scales{per_sample ? scales : nullptr, scales[0], 0});                                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1) dropblock_fill_noise_##NAME(                             \
        DropBlockGeometry g, DropBlockApply a, DropBlockGeometry global, DropBlockShard sh, DropBlockSampling s,    \
        uint32_t channels_last, const T* x, T* y, const uint32_t* keep_bits) {                                     \
        fill_noise<T>(g, a, global, sh, s, channels_last != 0, x, y, keep_bits);                                   \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, TILED_BLOCKS_PER_SM) dropblock_fused_##NAME(              \
        DropBlockGeometry g, DropBlockTiles tiles, DropBlockSampling s, unsigned long long* device_key,           \
        DropBlockApply a, const T* x, T* y, uint32_t* keep_bits, unsigned long long* counts, float* scales) {     \
        fused<T, true>(g, tiles, s, device_key, a, x, y, keep_bits, counts, scales);                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, TILED_BLOCKS_PER_SM) dropblock_fused_unaligned_##NAME(    \
        DropBlockGeometry g, DropBlockTiles tiles, DropBlockSampling s, unsigned long long* device_key,           \
        DropBlockApply a, const T* x, T* y, uint32_t* keep_bits, unsigned long long* counts, float* scales) {     \
        fused<T, false>(g, tiles, s, device_key, a, x, y, keep_bits, counts, scales);                             \
    }

// Each element type with its dtype's name (src/dtype.rs, DType::NAMES).
#define DROPBLOCK_FOR_EACH_DTYPE(X) X(float, f32) X(__half, f16) X(__nv_bfloat16, bf16)

DROPBLOCK_FOR_EACH_DTYPE(DROPBLOCK_ELEMENTWISE_KERNELS)

// Lane j holds row j of a 32 x 32 bit matrix (bit k = column k); returns column j
// (bit i = row i's bit j). Each step swaps the off-diagonal s x s blocks of every
// 2s x 2s block (Hacker's Delight 7-3, across lanes): 5 shuffles where 32 ballots
// and selects took ~4x the instructions.
__device__ __forceinline__ uint32_t transpose_bits(uint32_t x, uint32_t lane) {
    constexpr uint32_t low_halves[5] = {0x0000ffffu, 0x00ff00ffu, 0x0f0f0f0fu, 0x33333333u, 0x55555555u};
#pragma unroll
    for (int i = 0; i < 5; ++i) {
        const uint32_t s = 16u >> i, lo = low_halves[i];
        const uint32_t other = __shfl_xor_sync(FULL_WARP, x, s);
        x = (lane & s) ? (x & ~lo) | ((other >> s) & lo) : (x & lo) | ((other & lo) << s);
    }
    return x;
}

// Channel blocks of 32 a warp transposes per item: a lane's 4 runs are 16
// contiguous bytes of one cell, one vector store when C is a multiple of 128.
constexpr uint32_t CHANNEL_RUNS_PER_LANE = DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS / 32;
static_assert(CHANNEL_RUNS_PER_LANE == 4, "the vector store below writes 4 runs");

// What an item of channels_last_items does after storing its keep bits: nothing
// (the transpose alone, for backward and the separate apply to read) ...
struct BitsOnly {
    __device__ __forceinline__ void operator()(uint64_t, uint64_t, uint64_t, uint32_t, const uint32_t*, uint32_t) const {}
};

// ... or the forward's scaled copy of the item's elements, from its runs staged in
// shared memory (so the keep bits are transposed where the copy reads them, and no
// pass reads them back from memory). Needs C a multiple of 128 and x, y 16-byte
// aligned: a cell's 128 channels are then whole vectors, read by consecutive lanes
// (a half-warp per cell for 2-byte types), and each vector's bits sit in one word.
template <typename T, bool PER_SAMPLE>
struct ScaleItem {
    const T* x;
    T* y;
    const float* scales;
    uint64_t L, C;

    __device__ __forceinline__ void operator()(uint64_t n, uint64_t cell0, uint64_t c_first, uint32_t cells,
                                               const uint32_t* run, uint32_t lane) const {
        constexpr uint32_t B = CHANNEL_RUNS_PER_LANE, VEC = 16 / sizeof(T), PER_CELL = 32 * B / VEC;
        constexpr int U = UNROLL_LEAN;
        using V = Vec<T, VEC>;
        // Lane j's run b: channels c_first + 32b .. + 32 of cell cell0 + j; a warp's
        // runs for each of the block's warps (DROPBLOCK_THREADS threads). One 16-byte
        // store a lane, where four 4-byte ones 16 bytes apart conflicted 4 ways.
        static_assert(B == 4, "a lane's runs are one uint4");
        __shared__ uint4 staged[DROPBLOCK_THREADS / 32][32];
        uint4(&mine)[32] = staged[threadIdx.x / 32];
        mine[lane] = make_uint4(run[0], run[1], run[2], run[3]);
        __syncwarp();
        const float s = scales[PER_SAMPLE ? n : 0];
        const uint64_t e0 = (n * L + cell0) * C + c_first;
        const uint32_t vectors = cells * PER_CELL;
        for (uint32_t j0 = lane; j0 < vectors; j0 += 32 * U) {
            V in[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint32_t j = j0 + 32 * u;
                if (j < vectors) in[u] = *reinterpret_cast<const V*>(x + e0 + j / PER_CELL * C + j % PER_CELL * VEC);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint32_t j = j0 + 32 * u;
                if (j >= vectors) break;
                const uint32_t cell = j / PER_CELL, c = j % PER_CELL * VEC;
                const uint32_t keep = reinterpret_cast<const uint32_t*>(&mine[cell])[c / 32] >> (c % 32);
                V out;
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k) out.v[k] = scale_element(in[u].v[k], (keep >> k) & 1u ? s : 0.0f);
                // Indexed as an array of vectors (e0 and C are multiples of VEC): a
                // store through a cast of the element pointer compiled to 4-16
                // scalar stores.
                reinterpret_cast<V*>(y + e0)[cell * (C / VEC) + c / VEC] = out;
            }
        }
        // The next item restages.
        __syncwarp();
    }
};

// Items of a channels-last call's keep bits: (sample, block of 32 cells, chunk of
// 128 channels), chunk fastest. `Index` is 32 bits when the item count fits: the
// divisions per item are then ~20 instructions instead of a 64-bit division's ~70.
template <typename Index, typename Then>
__device__ __forceinline__ void channels_last_items(const DropBlockGeometry& g, const DropBlockApply& a, Index items,
                                                    const uint32_t* plane_bits, uint32_t* bits, const Then& then) {
    constexpr uint32_t B = CHANNEL_RUNS_PER_LANE;
    const uint64_t L = a.plane_len, C = g.c;
    const Index cell_blocks = (Index)((L + 31) / 32), chunks = (Index)((C + 32 * B - 1) / (32 * B));
    const PlaneBits by_plane(g, plane_bits, L);
    const uint32_t lane = threadIdx.x & 31;
    const bool vectors = C % (32 * B) == 0, whole_words = C % 32 == 0;
    // Warp-uniform: every lane takes part in the shuffles.
    for (uint64_t i = global_thread() / 32; i < items; i += threads_in_grid() / 32) {
        const Index rest = (Index)i / chunks, chunk = (Index)i - rest * chunks;
        const Index n = rest / cell_blocks;
        const uint64_t cell0 = (uint64_t)(rest - n * cell_blocks) * 32, c_first = (uint64_t)chunk * 32 * B;
        const uint32_t cells = (uint32_t)min((uint64_t)32, L - cell0);
        uint32_t run[B];
        // All loads first, so the 4 blocks' reads are in flight together. Bits past
        // a plane's last cell are the next plane's; no lane stores them.
#pragma unroll
        for (uint32_t b = 0; b < B; ++b) {
            const uint64_t c = c_first + 32 * b + lane;
            run[b] = c < C ? by_plane.from(plane_of(g, n, c) * L + cell0) : 0u;
        }
#pragma unroll
        for (uint32_t b = 0; b < B; ++b) run[b] = transpose_bits(run[b], lane);
        const uint64_t at = ((uint64_t)n * L + cell0 + lane) * C + c_first;
        auto store = [&] {
            if (vectors) {
                *reinterpret_cast<uint4*>(&bits[at >> 5]) = make_uint4(run[0], run[1], run[2], run[3]);
                return;
            }
#pragma unroll
            for (uint32_t b = 0; b < B; ++b) {
                const uint64_t c0 = c_first + 32 * b, bit = at + 32 * b;
                if (c0 >= C) break;
                const uint32_t shift = (uint32_t)(bit & 31), channels = (uint32_t)min((uint64_t)32, C - c0);
                if (whole_words) {
                    bits[bit >> 5] = run[b];
                } else if (run[b]) {
                    atomicOr(&bits[bit >> 5], run[b] << shift);
                    if (shift && shift + channels > 32) atomicOr(&bits[(bit >> 5) + 1], run[b] >> (32 - shift));
                }
            }
        };
        // Lanes past the last cell hold the next plane's bits: they store nothing.
        if (lane < cells) store();
        then((uint64_t)n, cell0, c_first, cells, run, lane);
    }
}

// The number of items of a channels-last call's keep bits.
__device__ __forceinline__ uint64_t channels_last_item_count(const DropBlockGeometry& g, const DropBlockApply& a) {
    return (uint64_t)g.n * ((a.plane_len + 31) / 32) *
           (((uint64_t)g.c + DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS - 1) / DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS);
}

template <typename Then>
__device__ __forceinline__ void channels_last(const DropBlockGeometry& g, const DropBlockApply& a,
                                              const uint32_t* plane_bits, uint32_t* bits, const Then& then) {
    const uint64_t items = channels_last_item_count(g, a);
    if (items <= 0xffffffffull)
        channels_last_items<uint32_t>(g, a, (uint32_t)items, plane_bits, bits, then);
    else
        channels_last_items<uint64_t>(g, a, items, plane_bits, bits, then);
}

// The keep bits of a channels-last call in the tensor's own order, one bit per
// element: bit ((n * L + cell) * C + c) = bit cell of plane plane_of(n, c). The apply
// kernels then read them as flat bits (bit e for element e), 16-byte vectors and
// all, whatever the sharing. A warp transposes 32 cells x 128 channels per item
// (above). With C a multiple of 32 every run is a whole word and is stored;
// otherwise runs straddle words and are ORed into bits the host zeroed.
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_channels_last_bits(DropBlockGeometry g, DropBlockApply a, const uint32_t* plane_bits, uint32_t* bits) {
    channels_last(g, a, plane_bits, bits, BitsOnly{});
}

// A channels-last forward's keep bits and its scaled copy in one pass, for C a
// multiple of 128 and 16-byte aligned x and y (Zero fill): the bits as
// dropblock_channels_last_bits stores them, and y from them while they are in
// registers (ScaleItem), where the transpose and the flat apply took two launches
// and a read of the bits back.
#define DROPBLOCK_APPLY_CHANNELS_LAST_KERNEL(T, NAME, OP, PER_SAMPLE)                                             \
    extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1) dropblock_##OP##_##NAME(                                 \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* plane_bits, uint32_t* bits,       \
        const float* scales) {                                                                                   \
        channels_last(g, a, plane_bits, bits, ScaleItem<T, PER_SAMPLE>{x, y, scales, a.plane_len, g.c});         \
    }
#define DROPBLOCK_APPLY_CHANNELS_LAST_KERNELS(T, NAME)                                                            \
    DROPBLOCK_APPLY_CHANNELS_LAST_KERNEL(T, NAME, apply_channels_last, false)                                     \
    DROPBLOCK_APPLY_CHANNELS_LAST_KERNEL(T, NAME, apply_channels_last_per_sample, true)

DROPBLOCK_FOR_EACH_DTYPE(DROPBLOCK_APPLY_CHANNELS_LAST_KERNELS)

// The seed words of every window of the call, in window order (a window per
// thread and step).
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_sample_seeds(DropBlockGeometry g, DropBlockSampling s, uint64_t* seeds) {
    // The production kernels' way to the thresholds and key, so this check covers it.
    const Thresholds th = shared_thresholds(s);
    const Key k = load_key(s, nullptr);
    for (uint64_t w = global_thread(); w < g.windows; w += threads_in_grid())
        seeds[w] = sample_window(th, k, w, window_len(g, w));
}

// A shard's sampling pass: ORs into `dropped` (its planes' bits, zeroed by the
// host) the blocks of every seed that reaches its box, clipped to the box. The key
// is `device_key`'s where given (dropblock_shard_count_samples steps it after).
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_shard_blocks(DropBlockGeometry g, DropBlockShard sh, DropBlockSampling s,
                       const unsigned long long* device_key, uint32_t* dropped) {
    const Thresholds th = shared_thresholds(s);
    const Key key = load_key(s, device_key);
    const uint64_t items = shard_sample_items(g, sh);
    for (uint64_t i = global_thread(); i < items; i += threads_in_grid()) shard_sample_item(g, sh, th, key, i, dropped);
}

// Turns a shard's dropped bits into keep bits (in place; bits past its last plane
// cleared) and adds each plane's kept cells to `plane_kept` (zeroed by the host).
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_shard_count_planes(DropBlockShard sh, DropBlockApply a, uint32_t* bits, unsigned long long* plane_kept) {
    const uint64_t cells = sh.planes * a.plane_len, words = (cells + 31) / 32;
    // Each word's first plane and cell.
    RunCursor at(global_thread() * 32, threads_in_grid() * 32, a.plane_len);
    for (uint64_t i = global_thread(); i < words; i += threads_in_grid(), at.step()) {
        const uint32_t hi = (uint32_t)min((uint64_t)32, cells - i * 32);
        const uint32_t keep = ~bits[i] & bit_range(0, hi);
        bits[i] = keep;
        for_each_plane_run(keep, 0, hi, at.n, at.pos, a.plane_len, [&](uint64_t plane, uint32_t kept) {
            if (kept) atomicAdd(&plane_kept[plane], (unsigned long long)kept);
        });
    }
}

// A shard's counts: `counts` (1 + 3·global N, zeroed by the host) gets the kept
// elements of each local sample at its global sample's entry, their sum at 0
// (every element, without `plane_kept`: an identity call), and each local
// sample's elements in the box and the box's tag at its covered and tag entries
// (ShardCounts). Steps
// `device_key` past the call where given: it runs after dropblock_shard_blocks,
// the call's only reader of the key, in stream order.
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_shard_count_samples(DropBlockGeometry g, DropBlockShard sh, const unsigned long long* plane_kept,
                       unsigned long long* counts, unsigned long long* device_key) {
    const uint64_t samples = sh.global_numel / sh.global_sample;
    for (uint64_t n = global_thread(); n < sh.n; n += threads_in_grid()) {
        const uint64_t kept = shard_sample_kept(g, sh, plane_kept, n);
        counts[1 + sh.n0 + n] = kept;
        counts[1 + samples + sh.n0 + n] = shard_sample_elements(sh);
        counts[1 + 2 * samples + sh.n0 + n] = sh.box_tag;
        if (kept) atomicAdd(&counts[0], (unsigned long long)kept);
    }
    if (device_key && global_thread() == 0) device_key[1] += DROPBLOCK_OFFSET_STRIDE;
}

// The scales of a shard from the counts summed over every shard: the same f64
// division, rounded to f32, on every shard (count_scale). One scale, or one per
// local sample under PerSample. One block: it first checks the counts as
// ShardCounts::check does on the host (no sample covered past its C·L elements
// nor keeping more than is covered, the total the samples' sum), and for the
// scales that divide by them as check_covered does (every sample covered whole,
// each element once by the tags, for Global; the shard's own for PerSample).
// The device cannot return an error without a host sync, so counts no shards
// could give (a faulty reduction, another shape's counts) or not summed over
// every shard once make every scale NaN: y (dx under noise fill) then says so,
// where a finite scale from them would be wrong without a sign.
extern "C" __global__ void __launch_bounds__(DROPBLOCK_THREADS, 1)
dropblock_shard_scales(DropBlockShard sh, DropBlockApply a, const unsigned long long* counts, float* scales) {
    // What the block found in the counts: counts no shards could give; a sample
    // not covered whole and once; one of this shard's own samples not so.
    enum : unsigned { IMPOSSIBLE = 1, PARTIAL = 2, OWN_PARTIAL = 4 };
    __shared__ unsigned long long block_sum;
    __shared__ unsigned found;
    if (threadIdx.x == 0) block_sum = 0, found = 0;
    __syncthreads();
    const uint64_t samples = sh.global_numel / sh.global_sample;
    // Every entry is summed, but a sum is used only when no sample is covered
    // past its C·L nor keeps more than covered (IMPOSSIBLE otherwise): then it is
    // at most N·C·L and cannot have wrapped.
    uint64_t sum = 0;
    unsigned flags = 0;
    for (uint64_t n = threadIdx.x; n < samples; n += blockDim.x) {
        const uint64_t kept = counts[1 + n], covered = counts[1 + samples + n], tag = counts[1 + 2 * samples + n];
        if (covered > sh.global_sample || kept > covered) flags |= IMPOSSIBLE;
        // n - n0 wraps past sh.n for n < n0.
        if (covered != sh.global_sample || tag != sh.sample_tag)
            flags |= n - sh.n0 < sh.n ? PARTIAL | OWN_PARTIAL : PARTIAL;
        sum += kept;
    }
    sum = warp_sum(sum);
    if (flags) atomicOr(&found, flags);
    if ((threadIdx.x & 31) == 0) atomicAdd(&block_sum, (unsigned long long)sum);
    __syncthreads();
    const bool valid = !(found & IMPOSSIBLE) && block_sum == counts[0];
    const float nan = __int_as_float(0x7fc00000);
    switch (a.normalize) {
        case DROPBLOCK_NORM_GLOBAL: {
            const bool whole = valid && !(found & PARTIAL);
            if (threadIdx.x == 0) scales[0] = whole ? count_scale(sh.global_numel, counts[0]) : nan;
            break;
        }
        case DROPBLOCK_NORM_PER_SAMPLE: {
            const bool whole = valid && !(found & OWN_PARTIAL);
            for (uint64_t n = threadIdx.x; n < sh.n; n += blockDim.x)
                scales[n] = whole ? count_scale(sh.global_sample, counts[1 + sh.n0 + n]) : nan;
            break;
        }
        default:
            if (threadIdx.x == 0) scales[0] = valid ? a.fixed_scale : nan;
    }
}
