// Seeds grown into keep bits, and the kept counts.
//
// The keep bits are dense over the mask planes: bit b = plane * L + cell (bit
// b % 32 of 32-bit word b / 32), one bit per mask cell. The tiled kernels build a
// tile of whole planes in shared memory, where blocks are ORed with shared
// atomics, then invert, count and store the tile's words coalesced; a tile's
// first and last words may be shared with the neighbouring tiles, and are merged
// with atomics. Planes too large for a tile take grid-wide passes over global
// memory instead.
#pragma once

#include "index.cuh"
#include "sampling.cuh"

namespace dropblock {

constexpr unsigned FULL_WARP = 0xffffffffu;
// Seeds a tile queues for growing; more (dense seeds) are grown by the thread that
// found them.
constexpr uint32_t SEED_QUEUE = 1024;

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(FULL_WARP, v, d);
    return v;
}

// Mask of bits [lo, hi) of a 32-bit word, 0 <= lo <= hi <= 32.
__device__ __forceinline__ uint32_t bit_range(uint32_t lo, uint32_t hi) {
    return hi - lo == 32 ? 0xffffffffu : ((1u << (hi - lo)) - 1u) << lo;
}

// ORs ones into bits [lo, hi) of `words` (shared or global memory).
template <typename Index>
__device__ __forceinline__ void atomic_set_bits(uint32_t* words, Index lo, Index hi) {
    while (lo < hi) {
        const uint32_t bit = (uint32_t)(lo & 31);
        const uint32_t n = (uint32_t)min((Index)(32 - bit), hi - lo);
        atomicOr(&words[lo >> 5], bit_range(bit, bit + n));
        lo += n;
    }
}

// The mask plane that slice (n, c) reads.
__device__ __forceinline__ uint64_t plane_of(const DropBlockGeometry& g, uint64_t n, uint64_t c) {
    switch (g.sharing) {
        case DROPBLOCK_SHARE_NONE: return n * g.c + c;
        case DROPBLOCK_SHARE_CHANNELS: return n;
        case DROPBLOCK_SHARE_BATCH: return c;
        default: return 0;
    }
}

// How many slices read each plane.
__device__ __forceinline__ uint64_t slices_per_plane(const DropBlockGeometry& g) {
    switch (g.sharing) {
        case DROPBLOCK_SHARE_NONE: return 1;
        case DROPBLOCK_SHARE_CHANNELS: return g.c;
        case DROPBLOCK_SHARE_BATCH: return g.n;
        default: return (uint64_t)g.n * g.c;
    }
}

// The per-sample counter a plane's kept cells add to, and with what weight. With
// Batch or All sharing every sample sees every plane alike, so one counter serves.
__device__ __forceinline__ uint64_t sample_counter_of_plane(const DropBlockGeometry& g, uint64_t plane) {
    switch (g.sharing) {
        case DROPBLOCK_SHARE_NONE: return plane / g.c;
        case DROPBLOCK_SHARE_CHANNELS: return plane;
        default: return 0;
    }
}

// The counter that holds sample `n`'s kept count: the one its planes add to.
__device__ __forceinline__ uint64_t sample_counter_of_sample(const DropBlockGeometry& g, uint64_t n) {
    return g.sharing == DROPBLOCK_SHARE_BATCH || g.sharing == DROPBLOCK_SHARE_ALL ? 0 : n;
}

__device__ __forceinline__ uint64_t sample_weight_of_plane(const DropBlockGeometry& g) {
    return g.sharing == DROPBLOCK_SHARE_CHANNELS || g.sharing == DROPBLOCK_SHARE_ALL ? g.c : 1;
}

// `numerator / kept` in f64, rounded to f32; 0 when nothing is kept. Matches
// count_scale in src/sampling/mod.rs bit for bit (IEEE division and rounding).
__device__ __forceinline__ float count_scale(uint64_t numerator, uint64_t kept) {
    return kept == 0 ? 0.0f : __double2float_rn((double)numerator / (double)kept);
}

// Calls `f(j)` for each set bit `j` of a window's seed word, lowest first.
template <typename F>
__device__ __forceinline__ void for_each_seed(uint64_t seeds, F&& f) {
    for (; seeds; seeds &= seeds - 1) f((uint32_t)(__ffsll((long long)seeds) - 1));
}

// Bits [lo, hi) of `keep` are cells `cell`.. of `plane`, then of the planes after
// it (`plane_len` cells each): calls `f(plane, kept cells)` for each plane's run.
template <typename F>
__device__ __forceinline__ void for_each_plane_run(uint32_t keep, uint32_t lo, uint32_t hi, uint64_t plane,
                                                   uint64_t cell, uint64_t plane_len, F&& f) {
    while (lo < hi) {
        const uint32_t n = (uint32_t)min((uint64_t)(hi - lo), plane_len - cell);
        f(plane, (uint32_t)__popc(keep & bit_range(lo, lo + n)));
        lo += n;
        cell = 0;
        ++plane;
    }
}

// A thread's kept counts: cells over the planes (weighted at the end by the
// slices that read each plane), and, under PerSample, a run of cells for one
// sample counter, sent with one atomic when the counter changes. When a warp's
// cells all go to one counter (`one_counter`, uniform over the warp), its lanes'
// runs are summed first and sent as one.
struct Counts {
    const DropBlockGeometry& g;
    unsigned long long* counts;
    bool per_sample;
    uint64_t kept = 0, run_sum = 0, run_counter = ~0ull;

    __device__ __forceinline__ Counts(const DropBlockGeometry& g_, const DropBlockApply& a, unsigned long long* c)
        : g(g_), counts(c), per_sample(a.normalize == DROPBLOCK_NORM_PER_SAMPLE) {}

    // Kept cells `cells` of `plane`.
    __device__ __forceinline__ void add_sample(uint64_t plane, uint32_t cells) {
        const uint64_t ctr = sample_counter_of_plane(g, plane);
        if (ctr != run_counter) {
            flush();
            run_counter = ctr;
        }
        run_sum += cells * sample_weight_of_plane(g);
    }

    // Bits [lo, hi) of `keep` are cells `cell`.. of `plane`, then of the planes after
    // it (`plane_len` cells each): their kept cells go to their samples' counters.
    __device__ __forceinline__ void add_samples(uint32_t keep, uint32_t lo, uint32_t hi, uint64_t plane,
                                                uint64_t cell, uint64_t plane_len) {
        for_each_plane_run(keep, lo, hi, plane, cell, plane_len,
                           [&](uint64_t p, uint32_t kept) { add_sample(p, kept); });
    }

    __device__ __forceinline__ void flush() {
        if (run_counter != ~0ull && run_sum)
            atomicAdd(&counts[DROPBLOCK_COUNT_SAMPLES + run_counter], (unsigned long long)run_sum);
        run_sum = 0;
    }

    // Ends the runs of a stretch of work over planes first..=last. When those all
    // feed one counter, the warp's runs are summed and sent once. Every lane of the
    // warp must call it.
    __device__ __forceinline__ void end_runs(uint64_t first, uint64_t last) {
        if (!per_sample) return;
        const uint64_t ctr = sample_counter_of_plane(g, first);
        if (ctr == sample_counter_of_plane(g, last)) {
            run_sum = warp_sum(run_sum);
            run_counter = (threadIdx.x & 31) == 0 ? ctr : ~0ull;
        }
        flush();
        run_counter = ~0ull;
    }
};

// Adds the block's kept cells to the total with one atomic. The last block to
// finish writes the scales from the complete counters, zeroes them for the next
// call and steps a device generator past the call. Every thread must call it.
__device__ __forceinline__ void publish_counts(const DropBlockGeometry& g, const DropBlockApply& a, uint64_t kept,
                                               unsigned long long* counts, float* scales,
                                               unsigned long long* device_key) {
    __shared__ uint64_t warp_totals[32];
    __shared__ bool last_block;
    kept = warp_sum(kept);
    if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = kept;
    // Orders every thread's counter atomics before thread 0's fence and ticket.
    __syncthreads();
    if (threadIdx.x == 0) {
        uint64_t block_total = 0;
        for (uint32_t w = 0; w < blockDim.x / 32; ++w) block_total += warp_totals[w];
        if (block_total)
            atomicAdd(&counts[DROPBLOCK_COUNT_TOTAL], (unsigned long long)(block_total * slices_per_plane(g)));
        __threadfence();
        last_block = atomicAdd(&counts[DROPBLOCK_COUNT_DONE], 1ull) == gridDim.x - 1;
        // The acquire half, in the thread that saw the ticket (as cooperative
        // groups' grid sync has it): the reads below follow what it observed.
        __threadfence();
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    volatile unsigned long long* c = counts;
    switch (a.normalize) {
        case DROPBLOCK_NORM_GLOBAL:
            if (threadIdx.x == 0) scales[0] = count_scale(a.numel, c[DROPBLOCK_COUNT_TOTAL]);
            break;
        case DROPBLOCK_NORM_PER_SAMPLE:
            for (uint64_t n = threadIdx.x; n < g.n; n += blockDim.x)
                scales[n] = count_scale((uint64_t)g.c * a.plane_len,
                                        c[DROPBLOCK_COUNT_SAMPLES + sample_counter_of_sample(g, n)]);
            break;
        default:
            if (threadIdx.x == 0) scales[0] = a.fixed_scale;
    }
    __syncthreads();
    for (uint64_t i = threadIdx.x; i < DROPBLOCK_COUNT_SAMPLES + (uint64_t)g.n; i += blockDim.x) c[i] = 0;
    if (device_key && threadIdx.x == 0) device_key[1] += DROPBLOCK_OFFSET_STRIDE;
}

// The launch-invariant divisors of the tiled kernels.
struct TileDivisors {
    FastDiv seed_cells, windows_per_group, seed_hw, seed_w, block_rows, kh, plane_len;
    __device__ __forceinline__ TileDivisors(const DropBlockGeometry& g, const DropBlockTiles& t, const DropBlockApply& a)
        : seed_cells{t.magic_seed_cells, (uint32_t)g.seed_cells},
          windows_per_group{t.magic_windows_per_group, (uint32_t)g.windows_per_group},
          seed_hw{t.magic_seed_hw, g.seed_h * g.seed_w},
          seed_w{t.magic_seed_w, g.seed_w},
          block_rows{t.magic_block_rows, g.kd * g.kh},
          kh{t.magic_kh, g.kh},
          plane_len{t.magic_plane_len, (uint32_t)a.plane_len} {}
};

// One tile: planes [first, first + planes) of the call, whose bits are mask bits
// [first * L, (first + planes) * L), i.e. shared bits [phase, phase + cells) over
// global words [word0, word0 + words).
struct Tile {
    uint64_t first, word0;
    uint32_t planes, phase, cells, words;

    __device__ __forceinline__ Tile(const DropBlockTiles& tiles, const DropBlockGeometry& g, const DropBlockApply& a,
                                    uint64_t t) {
        first = t * tiles.planes_per_tile;
        planes = (uint32_t)min(tiles.planes_per_tile, g.planes - first);
        const uint64_t bit0 = first * a.plane_len;
        word0 = bit0 >> 5;
        phase = (uint32_t)(bit0 & 31);
        cells = planes * (uint32_t)a.plane_len;
        words = (phase + cells + 31) >> 5;
    }
};

struct TileShared {
    uint32_t bits[DROPBLOCK_TILE_WORDS];
    // A queued block: the shared bit of its first cell (its front top-left
    // corner) and its extents clipped to the map. A tile holds under 2^16 cells,
    // so each field fits 16 bits: x = bit | depth << 16, y = rows << 16 | columns.
    uint2 queue[SEED_QUEUE];
    uint32_t queued;
};

// [lo, hi) of a block along one axis of `size` cells, for a seed at `i`.
__device__ __forceinline__ uint2 block_reach(uint32_t i, uint32_t anchor, uint32_t extent, uint32_t size) {
    const int32_t lo = (int32_t)i - (int32_t)anchor;
    return make_uint2((uint32_t)max(lo, 0), (uint32_t)min(lo + (int32_t)extent, (int32_t)size));
}

// The queue entry of the seed at the tile's seed cell `u` (plane in tile * S + cell).
__device__ __forceinline__ uint2 seed_block(const DropBlockGeometry& g, const TileDivisors& d, const Tile& tile,
                                            uint32_t u) {
    const uint32_t plane = d.seed_cells.div(u);
    const uint32_t cell = u - plane * d.seed_cells.d;
    const uint32_t z = d.seed_hw.div(cell), rest = cell - z * d.seed_hw.d;
    const uint32_t y = d.seed_w.div(rest), x = rest - y * g.seed_w;
    const uint2 zs = block_reach(z, g.anchor_z, g.kd, g.d);
    const uint2 rs = block_reach(y, g.anchor_y, g.kh, g.h);
    const uint2 cs = block_reach(x, g.anchor_x, g.kw, g.w);
    const uint32_t bit = tile.phase + plane * d.plane_len.d + (zs.x * g.h + rs.x) * g.w + cs.x;
    return make_uint2(bit | (zs.y - zs.x) << 16, (rs.y - rs.x) << 16 | (cs.y - cs.x));
}

// ORs row `row` of depth slice `slice` of a queued block into the shared bits.
__device__ __forceinline__ void grow_row(const DropBlockGeometry& g, uint2 block, uint32_t slice, uint32_t row,
                                         uint32_t* bits) {
    if (slice >= block.x >> 16 || row >= block.y >> 16) return;
    const uint32_t lo = (block.x & 0xffffu) + (slice * g.h + row) * g.w;
    atomic_set_bits(bits, lo, lo + (block.y & 0xffffu));
}

// Builds the dropped bits of `tile` in `sh.bits`, which must be zero (and
// `sh.queued` 0): samples the tile's windows (a thread each), queues their seeds'
// blocks, then grows them with one (seed, depth slice, row) item per thread, so every lane has
// work however the seeds fall. Every thread of the block must call it; the bits
// are complete on return.
__device__ __forceinline__ void build_tile(const DropBlockGeometry& g, const DropBlockTiles& tiles,
                                           const TileDivisors& d, const Thresholds& th, const Key& k,
                                           const Tile& tile, uint64_t t, TileShared& sh) {
    const uint32_t q = g.planes_per_window, m = d.windows_per_group.d, s = d.seed_cells.d;
    const uint32_t lane = threadIdx.x & 31;
    // Tiles hold whole groups of q planes: the tile's first window is a group's.
    const uint64_t window0 = t * tiles.groups_per_tile * m;
    const uint32_t windows = (tile.planes + q - 1) / q * m;
    // Whole warps go round together (lanes past the last window sample nothing; the
    // block is whole warps, DROPBLOCK_THREADS), so a warp reserves its seeds' queue slots
    // with one shared atomic, not one per seed.
    for (uint32_t i0 = threadIdx.x - lane; i0 < windows; i0 += blockDim.x) {
        const uint32_t i = i0 + lane;
        // The window's first seed cell in the tile, and its seeds.
        uint32_t first = 0;
        uint64_t seeds = 0;
        if (i < windows) {
            uint32_t len;
            if (s <= DROPBLOCK_WINDOW_CELLS) {
                first = i * q * s;
                len = min(q, tile.planes - i * q) * s;
            } else {
                const uint32_t plane = d.windows_per_group.div(i), part = i - plane * m;
                first = plane * s + part * DROPBLOCK_WINDOW_CELLS;
                len = min((uint32_t)DROPBLOCK_WINDOW_CELLS, s - part * DROPBLOCK_WINDOW_CELLS);
            }
            seeds = sample_window(th, k, window0 + i, len);
        }
        // This lane's slots follow the seeds of the lanes below it (an inclusive
        // scan); lane 31 holds the warp's total.
        const uint32_t n = (uint32_t)__popcll(seeds);
        uint32_t below = n;
#pragma unroll
        for (uint32_t dist = 1; dist < 32; dist <<= 1) {
            const uint32_t up = __shfl_up_sync(FULL_WARP, below, dist);
            if (lane >= dist) below += up;
        }
        uint32_t slot = lane == 31 && below ? atomicAdd(&sh.queued, below) : 0u;
        slot = __shfl_sync(FULL_WARP, slot, 31) + below - n;
        for (; seeds; seeds &= seeds - 1, ++slot) {
            const uint2 block = seed_block(g, d, tile, first + (uint32_t)(__ffsll((long long)seeds) - 1));
            if (slot < SEED_QUEUE) {
                sh.queue[slot] = block;
            } else {
                for (uint32_t slice = 0; slice < g.kd; ++slice)
                    for (uint32_t row = 0; row < g.kh; ++row) grow_row(g, block, slice, row, sh.bits);
            }
        }
    }
    __syncthreads();
    // One item per (seed, depth slice, row): kd * kh < 2^18 and the queue 2^10.
    const uint32_t rows = d.block_rows.d, items = min(sh.queued, SEED_QUEUE) * rows;
    for (uint32_t i = threadIdx.x; i < items; i += blockDim.x) {
        const uint32_t seed = d.block_rows.div(i), r = i - seed * rows;
        const uint32_t slice = d.kh.div(r);
        grow_row(g, sh.queue[seed], slice, r - slice * g.kh, sh.bits);
    }
    __syncthreads();
}

// Turns the tile's dropped bits into keep bits, stores them to `keep_bits`
// coalesced and counts them; leaves the shared bits holding the keep bits
// (`keep_in_shared`, for a fused apply) or zeroed for the next tile, and the
// queue empty. Words the tile shares with its neighbours are merged with two
// atomics (the tiles' bits are disjoint, so the order does not matter). Every
// thread must call it.
__device__ __forceinline__ void store_tile(const DropBlockGeometry& g, const DropBlockApply& a,
                                           const TileDivisors& d, const Tile& tile, TileShared& sh,
                                           bool keep_in_shared, uint32_t* keep_bits, Counts& counts) {
    const uint32_t last = tile.words - 1, end = (tile.phase + tile.cells) & 31;
    for (uint32_t i = threadIdx.x; i < tile.words; i += blockDim.x) {
        uint32_t valid = 0xffffffffu;
        if (i == 0) valid <<= tile.phase;
        if (i == last && end) valid &= (1u << end) - 1u;
        const uint32_t keep = ~sh.bits[i] & valid;
        sh.bits[i] = keep_in_shared ? keep : 0u;
        uint32_t* out = &keep_bits[tile.word0 + i];
        if (valid == 0xffffffffu) {
            *out = keep;
        } else {
            atomicAnd(out, ~valid);
            atomicOr(out, keep);
        }
        counts.kept += __popc(keep);
        if (counts.per_sample) {
            // Bits [lo, hi) of the word; bit lo is tile cell `cell`.
            const uint32_t lo = i == 0 ? tile.phase : 0, hi = 32 - __clz(valid);
            const uint32_t cell = i * 32 + lo - tile.phase, plane = d.plane_len.div(cell);
            counts.add_samples(keep, lo, hi, tile.first + plane, cell - plane * d.plane_len.d, a.plane_len);
        }
    }
    if (threadIdx.x == 0) sh.queued = 0;
    counts.end_runs(tile.first, tile.first + tile.planes - 1);
}

// The (z, y, x) seed position of seed cell `cell` of a plane.
__device__ __forceinline__ void seed_position(const DropBlockGeometry& g, uint64_t cell, uint32_t at[3]) {
    const uint64_t seed_hw = (uint64_t)g.seed_h * g.seed_w, rest = cell % seed_hw;
    at[0] = (uint32_t)(cell / seed_hw);
    at[1] = (uint32_t)(rest / g.seed_w);
    at[2] = (uint32_t)(rest % g.seed_w);
}

// ORs into `bits`, from bit `base` on, the part in a box of the block of the seed
// at `at`: the box's cells are `extent` cells along each axis from `origin`, row-
// major (the whole map: origin 0, the map's extents; a shard: its box). 64-bit
// positions: the grid-wide passes take planes of any size.
__device__ __forceinline__ void grow_seed_in_box(const DropBlockGeometry& g, const uint32_t at[3],
                                                 const uint32_t origin[3], const uint32_t extent[3], uint64_t base,
                                                 uint32_t* bits) {
    const uint32_t anchor[3] = {g.anchor_z, g.anchor_y, g.anchor_x}, k[3] = {g.kd, g.kh, g.kw};
    int64_t lo[3], hi[3];
    for (int i = 0; i < 3; ++i) {
        const int64_t start = (int64_t)at[i] - anchor[i] - origin[i];
        lo[i] = max(start, (int64_t)0);
        hi[i] = min(max(start + (int64_t)k[i], (int64_t)0), (int64_t)extent[i]);
    }
    for (int64_t z = lo[0]; z < hi[0]; ++z)
        for (int64_t r = lo[1]; r < hi[1]; ++r) {
            const uint64_t row = base + ((uint64_t)z * extent[1] + (uint64_t)r) * extent[2];
            atomic_set_bits(bits, row + (uint64_t)lo[2], row + (uint64_t)hi[2]);
        }
}

// The grid-wide passes, for planes too large for a tile: ORs the blocks of
// windows [worker, worker + workers, ...) into the dropped bits in global memory
// (zeroed beforehand). 64-bit positions throughout; a window's (group, part) is
// stepped, not divided for, and only a seed divides, to place itself.
__device__ __forceinline__ void seed_windows_global(const DropBlockGeometry& g, const Thresholds& th, const Key& k,
                                                    const DropBlockApply& a, uint64_t worker, uint64_t workers,
                                                    uint32_t* bits) {
    RunCursor window(worker, workers, g.windows_per_group);
    for (uint64_t w = worker; w < g.windows; w += workers, window.step()) {
        const uint64_t group = window.n, part = window.pos;
        // The window's first cell, as (plane, seed cell).
        const uint64_t plane0 = group * g.planes_per_window;
        const uint64_t cell0 = part * DROPBLOCK_WINDOW_CELLS;
        const uint32_t origin[3] = {0, 0, 0}, map[3] = {g.d, g.h, g.w};
        for_each_seed(sample_window(th, k, w, window_len(g, group, part)), [&](uint32_t j) {
            const uint64_t at = cell0 + j;
            const uint64_t plane = plane0 + at / g.seed_cells;
            uint32_t pos[3];
            seed_position(g, at % g.seed_cells, pos);
            grow_seed_in_box(g, pos, origin, map, plane * a.plane_len, bits);
        });
    }
}

}  // namespace dropblock
