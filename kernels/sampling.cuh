// The sampling contract on the device: the same draws and the same window walk as
// src/sampling/mod.rs, so the GPU and CPU seeds agree bit for bit.
#pragma once

#include <curand_philox4x32_x.h>
#include <stdint.h>

#include "dropblock_abi.h"

namespace dropblock {

// A call's Philox key and first counter block.
struct Key {
    uint64_t seed, offset;
};

// The key from the call's parameters, or from device memory ([seed, offset]) when
// `device_key` is given: a device generator, which captured graphs replay with a
// fresh offset each time.
__device__ __forceinline__ Key load_key(const DropBlockSampling& s, const unsigned long long* device_key) {
    return device_key ? Key{device_key[0], device_key[1]} : Key{s.seed, s.offset};
}

// Counter block `offset + b` of window `window`'s subsequence, keyed by the seed:
// the block that curand_init(seed, window, 4 * (offset + b)) would produce.
__device__ __forceinline__ uint4 philox_block(const Key& k, uint64_t window, uint32_t b) {
    const uint64_t c = k.offset + b;
    return curand_Philox4x32_10(
        make_uint4((uint32_t)c, (uint32_t)(c >> 32), (uint32_t)window, (uint32_t)(window >> 32)),
        make_uint2((uint32_t)k.seed, (uint32_t)(k.seed >> 32)));
}

// The thresholds and, for each value of a draw's top 8 bits, the first threshold
// that such a draw can fall under, in shared memory: lanes at different points of
// their walks index them differently, which parameter (constant) memory would
// serve one address at a time.
struct Thresholds {
    const uint64_t* t;     // the call's 64 thresholds, then t[64] = 2^64 - 1
    const uint8_t* first;  // first[b] = smallest g with t[g] > b * 2^24 (64 if none)

    // G(u): the smallest g with u < t[g], 64 if none. Two steps from the table on
    // u's top bits settle it at the rates DropBlock uses (thresholds lie over 2^24
    // apart but where they crowd: near 2^32 at high rates, near 0 at tiny ones);
    // the loop is for those.
    __device__ __forceinline__ uint32_t gap(uint32_t u) const {
        uint32_t g = first[u >> 24];
        g += u >= t[g];
        g += u >= t[g];
        while (u >= t[g]) ++g;
        return g;
    }
};

// Every thread of the block must call it (it synchronises the block).
__device__ __forceinline__ Thresholds shared_thresholds(const DropBlockSampling& s) {
    __shared__ uint64_t t[DROPBLOCK_WINDOW_CELLS + 1];
    __shared__ uint8_t first[256];
    for (uint32_t i = threadIdx.x; i <= DROPBLOCK_WINDOW_CELLS; i += blockDim.x)
        t[i] = i < DROPBLOCK_WINDOW_CELLS ? s.thresholds[i] : ~0ull;
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < 256; b += blockDim.x) {
        // Binary search for the first threshold above b * 2^24 (t is monotone).
        const uint64_t v = (uint64_t)b << 24;
        uint32_t lo = 0, hi = DROPBLOCK_WINDOW_CELLS;
        while (lo < hi) {
            const uint32_t mid = (lo + hi) >> 1;
            if (t[mid] > v) hi = mid; else lo = mid + 1;
        }
        first[b] = (uint8_t)lo;
    }
    __syncthreads();
    return Thresholds{t, first};
}

// The seeds of window `window`, of `len` (1..64) cells, as bits, a Philox block at
// a time. The walk is sequential only through its position: a draw u places its
// seed G(u) cells on wherever the walk stands, and ends the walk exactly when that
// seed would fall at or past the end (u >= t[len - pos - 1] is pos + G(u) >= len,
// as t is monotone: src/sampling/mod.rs, thresholds, evaluates it exactly).
// So a block's four draws are four searches and a running sum, the same on every
// lane, with no branch on which draw ends the walk; another block only when the
// fourth draw placed a seed before the end (src/sampling/mod.rs, Plan::walk_from).
__device__ __forceinline__ uint64_t sample_window(const Thresholds& th, const Key& k, uint64_t window, uint32_t len) {
    uint64_t bits = 0;
    uint32_t pos = 0;
    for (uint32_t b = 0; pos < len; ++b) {
        const uint4 v = philox_block(k, window, b);
        const uint32_t draws[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t at = pos + th.gap(draws[i]);
            bits |= (uint64_t)(at < len) << min(at, 63u);
            pos = at + 1;
        }
    }
    return bits;
}

// Cells of window `part` of group `group`: whole planes when a plane has at most
// 64 seed cells (the last group may be short), else 64 or the plane's remainder.
__device__ __forceinline__ uint32_t window_len(const DropBlockGeometry& g, uint64_t group, uint64_t part) {
    if (g.seed_cells <= DROPBLOCK_WINDOW_CELLS)
        return (uint32_t)(min((uint64_t)g.planes_per_window, g.planes - group * g.planes_per_window) * g.seed_cells);
    return (uint32_t)min((uint64_t)DROPBLOCK_WINDOW_CELLS, g.seed_cells - part * DROPBLOCK_WINDOW_CELLS);
}

// Cells of window `w` (below g.windows).
__device__ __forceinline__ uint32_t window_len(const DropBlockGeometry& g, uint64_t w) {
    const uint64_t group = w / g.windows_per_group;
    return window_len(g, group, w - group * g.windows_per_group);
}

}  // namespace dropblock
