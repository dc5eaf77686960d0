// Growing a plane's seeds into its keep bits, one warp per plane.
//
// The plane's bits live in global memory (plane_words 32-bit words, bit i of the
// plane = cell h * W + w). They are private to the warp that builds them, so the
// warp clears them, ORs every seed's block in with atomicOr (lanes' blocks
// overlap), inverts to keep bits and counts them. Seeds are sparse (γ is ~1e-3..
// 1e-2), so the work follows the seeds, not the cells.
#pragma once

#include "sampling.cuh"

namespace dropblock {

constexpr unsigned FULL_WARP = 0xffffffffu;

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(FULL_WARP, v, d);
    return v;
}

// ORs ones into bits [lo, hi) of `words`.
__device__ __forceinline__ void atomic_set_bits(uint32_t* words, uint64_t lo, uint64_t hi) {
    while (lo < hi) {
        const uint32_t bit = (uint32_t)(lo & 31);
        const uint32_t n = (uint32_t)min((uint64_t)(32 - bit), hi - lo);
        const uint32_t run = n == 32 ? 0xffffffffu : ((1u << n) - 1u) << bit;
        atomicOr(&words[lo >> 5], run);
        lo += n;
    }
}

// Walks a flattened (plane, index) space with `per` indices per plane, `step`
// items at a time, without a division per step.
struct FlatCursor {
    uint64_t plane, index, per, step_planes, step_index;
    __device__ __forceinline__ FlatCursor(uint64_t first, uint64_t per_plane, uint64_t step)
        : plane(first / per_plane),
          index(first % per_plane),
          per(per_plane),
          step_planes(step / per_plane),
          step_index(step % per_plane) {}
    __device__ __forceinline__ void advance() {
        index += step_index;
        plane += step_planes;
        if (index >= per) {
            index -= per;
            ++plane;
        }
    }
};

// ORs the blocks of windows [first, last) (global window numbers) into dropped
// bits, `worker` of `workers` taking every workers-th window. Workers are numbered
// so that each warp's 32 lanes are 32 consecutive workers (workers is a multiple
// of 32), and every lane of each warp must call it. The bits must be zero before,
// and nothing may read them until every window is done.
//
// The lanes of a warp run the same iterations (a lane past `last` idles) and meet
// at a __syncwarp after each window. Without that, the first lane to find a seed
// split the warp and it never reconverged inside the loop: on an H200 the loop ran
// with 1-8 of 32 lanes active, 5x the instructions (docs/PERF.md, v3 measured).
__device__ __forceinline__ void seed_windows(const DropBlockGeometry& g, const uint64_t* t, const Key& k,
                                             const DropBlockApply& a, uint64_t first, uint64_t last,
                                             uint64_t worker, uint64_t workers, uint32_t* bits) {
    const uint64_t per_plane = (uint64_t)g.seed_h * g.windows_per_row;
    const uint64_t lane = worker & 31;
    FlatCursor w(first + worker, per_plane, workers);
    for (uint64_t warp_first = first + worker - lane; warp_first < last; warp_first += workers, w.advance()) {
        const uint64_t i = warp_first + lane;
        if (i < last) {
            const uint32_t y = (uint32_t)(w.index / g.windows_per_row);
            const uint32_t seg = (uint32_t)(w.index % g.windows_per_row);
            uint64_t seeds = sample_window(t, k, i, min(64u, g.seed_w - seg * 64u));
            uint32_t* plane_bits = bits + w.plane * a.plane_words;
            const int64_t r0 = max((int64_t)y - (int64_t)g.anchor_y, (int64_t)0);
            const int64_t r1 = min((int64_t)y - (int64_t)g.anchor_y + (int64_t)g.kh, (int64_t)g.h);
            while (seeds) {
                const int64_t x = (int64_t)seg * 64 + __ffsll((long long)seeds) - 1;
                seeds &= seeds - 1;
                const int64_t c0 = max(x - (int64_t)g.anchor_x, (int64_t)0);
                const int64_t c1 = min(x - (int64_t)g.anchor_x + (int64_t)g.kw, (int64_t)g.w);
                for (int64_t r = r0; r < r1; ++r)
                    atomic_set_bits(plane_bits, (uint64_t)(r * g.w + c0), (uint64_t)(r * g.w + c1));
            }
        }
        __syncwarp();
    }
}

// Turns dropped bits [first, last) (global word numbers) into keep bits and
// calls on_word(plane, kept cells in the word) for each, `worker` of `workers`
// taking every workers-th word.
template <typename OnWord>
__device__ __forceinline__ void keep_words(const DropBlockApply& a, uint64_t first, uint64_t last, uint64_t worker,
                                           uint64_t workers, uint32_t* bits, OnWord on_word) {
    FlatCursor c(first + worker, a.plane_words, workers);
    for (uint64_t i = first + worker; i < last; i += workers, c.advance()) {
        const uint64_t cell = c.index * 32;
        const uint32_t valid = a.plane_len - cell >= 32 ? 0xffffffffu : (1u << (uint32_t)(a.plane_len - cell)) - 1u;
        const uint32_t keep = ~bits[i] & valid;
        bits[i] = keep;
        on_word(c.plane, (uint32_t)__popc(keep));
    }
}

// Builds the keep bits of planes [begin, end), a contiguous run owned by one
// warp, and calls on_word(plane, kept cells in the word) for each of their words.
// The lanes work on the flattened windows and words of the whole run, so small
// planes (7x7, 14x14) keep every lane busy. Every lane of the warp must call it.
template <typename OnWord>
__device__ __forceinline__ void build_keep_bits(const DropBlockGeometry& g, const uint64_t* t, const Key& k,
                                                const DropBlockApply& a, uint64_t begin, uint64_t end,
                                                uint32_t* keep_bits, OnWord on_word) {
    const uint32_t lane = threadIdx.x & 31;
    for (uint64_t i = begin * a.plane_words + lane; i < end * a.plane_words; i += 32) keep_bits[i] = 0;
    __syncwarp();
    const uint64_t per_plane = (uint64_t)g.seed_h * g.windows_per_row;
    seed_windows(g, t, k, a, begin * per_plane, end * per_plane, lane, 32, keep_bits);
    __syncwarp();
    keep_words(a, begin * a.plane_words, end * a.plane_words, lane, 32, keep_bits, on_word);
    __syncwarp();
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
// count_scale in src/sampling.rs bit for bit (IEEE division and rounding).
__device__ __forceinline__ float count_scale(uint64_t numerator, uint64_t kept) {
    return kept == 0 ? 0.0f : __double2float_rn((double)numerator / (double)kept);
}

}  // namespace dropblock
