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

// Smallest g < r with u < t[g] (the caller has checked u < t[r - 1]). A binary
// search over the monotone thresholds; six steps cover 64 entries.
__device__ __forceinline__ uint32_t first_threshold_above(const uint64_t* t, uint32_t r, uint64_t u) {
    uint32_t lo = 0, hi = r - 1;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) >> 1;
        if (u < t[mid]) hi = mid; else lo = mid + 1;
    }
    return lo;
}

// The thresholds where every lane can index them cheaply: kernel parameters live
// in constant memory, where lanes reading different entries are served one
// address at a time. Every thread of the block must call it.
__device__ __forceinline__ const uint64_t* shared_thresholds(const DropBlockSampling& s) {
    __shared__ uint64_t t[DROPBLOCK_WINDOW_CELLS];
    for (uint32_t i = threadIdx.x; i < DROPBLOCK_WINDOW_CELLS; i += blockDim.x) t[i] = s.thresholds[i];
    __syncthreads();
    return t;
}

// The seeds of one window of `len` (1..64) cells as bits, with thresholds `t`.
// One Philox block per four draws; a draw per seed plus one stop draw.
__device__ __forceinline__ uint64_t sample_window(const uint64_t* t, const Key& k, uint64_t window, uint32_t len) {
    uint64_t bits = 0;
    uint32_t pos = 0, j = 0;
    uint4 block = make_uint4(0, 0, 0, 0);
    while (pos < len) {
        const uint32_t r = len - pos;
        if ((j & 3) == 0) block = philox_block(k, window, j >> 2);
        const uint64_t u = block_word(block, j & 3);
        ++j;
        if (u >= t[r - 1]) break;
        const uint32_t g = first_threshold_above(t, r, u);
        bits |= 1ull << (pos + g);
        pos += g + 1;
    }
    return bits;
}

}  // namespace dropblock
