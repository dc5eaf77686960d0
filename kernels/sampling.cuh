// The sampling contract on the device: the same draws and the same window walk as
// src/sampling.rs, so the GPU and CPU seeds agree bit for bit.
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

__device__ __forceinline__ uint32_t block_word(const uint4& v, uint32_t i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The thresholds and, for each value of a draw's top 8 bits, the first threshold
// that such a draw can fall under, in shared memory: lanes at different points of
// their walks index them differently, which parameter (constant) memory would
// serve one address at a time.
struct Thresholds {
    const uint64_t* t;     // the call's 64 thresholds
    const uint8_t* first;  // first[b] = smallest g with t[g] > b * 2^24 (64 if none)

    // Smallest g < r with u < t[g], given u < t[r - 1]. The table starts the scan
    // at the bucket of u's top bits; at the rates DropBlock uses, thresholds lie
    // more than 2^24 apart, so the scan takes one or two compares.
    __device__ __forceinline__ uint32_t seed_gap(uint32_t u) const {
        uint32_t g = first[u >> 24];
        while (u >= t[g]) ++g;
        return g;
    }
};

// Every thread of the block must call it (it synchronises the block).
__device__ __forceinline__ Thresholds shared_thresholds(const DropBlockSampling& s) {
    __shared__ uint64_t t[DROPBLOCK_WINDOW_CELLS];
    __shared__ uint8_t first[256];
    for (uint32_t i = threadIdx.x; i < DROPBLOCK_WINDOW_CELLS; i += blockDim.x) t[i] = s.thresholds[i];
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

// The seeds of window `window`, of `len` (1..64) cells, as bits. One Philox block
// per four draws; a draw per seed plus one stop draw.
__device__ __forceinline__ uint64_t sample_window(const Thresholds& th, const Key& k, uint64_t window, uint32_t len) {
    uint64_t bits = 0;
    uint32_t pos = 0, j = 0;
    uint4 block = make_uint4(0, 0, 0, 0);
    while (pos < len) {
        if ((j & 3) == 0) block = philox_block(k, window, j >> 2);
        const uint32_t u = block_word(block, j & 3);
        ++j;
        if (u >= th.t[len - pos - 1]) break;
        const uint32_t g = th.seed_gap(u);
        bits |= 1ull << (pos + g);
        pos += g + 1;
    }
    return bits;
}

// Cells of window `w` (below g.windows): whole planes when a plane has at most 64
// seed cells (the last group may be short), else 64 or the plane's remainder.
__device__ __forceinline__ uint32_t window_len(const DropBlockGeometry& g, uint64_t w) {
    if (g.seed_cells <= DROPBLOCK_WINDOW_CELLS)
        return (uint32_t)(min((uint64_t)g.planes_per_window, g.planes - w * g.planes_per_window) * g.seed_cells);
    const uint64_t i = w % g.windows_per_group;
    return (uint32_t)min((uint64_t)DROPBLOCK_WINDOW_CELLS, g.seed_cells - i * DROPBLOCK_WINDOW_CELLS);
}

}  // namespace dropblock
