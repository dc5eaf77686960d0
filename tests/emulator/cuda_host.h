// Runs CUDA kernels on the host, one OS thread per CUDA thread, for testing the
// kernels' logic (indexing, warp cooperation, atomics) against the CPU oracle on
// machines without a GPU. Blocks run one after another; the threads of a block
// run concurrently, with __syncwarp and __syncthreads as real barriers, so
// warp-synchronous code behaves as on a GPU wherever it is correctly synchronised.
// Memory-model subtleties of real hardware are out of its reach: that is what the
// GPU parity tests are for.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> shuffle;  // one slot per thread
};
inline thread_local Block* current = nullptr;
}  // namespace emu

inline void __syncthreads() { emu::current->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::current->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace emu {
// Lane `source(lane)` of the warp's `v`s.
template <typename T, typename F>
T shuffle(T v, F source) {
    static_assert(sizeof(T) <= 8);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    const unsigned warp_base = threadIdx.x & ~31u;
    current->shuffle[threadIdx.x] = bits;
    __syncwarp();
    bits = current->shuffle[warp_base + source(threadIdx.x & 31u)];
    __syncwarp();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace emu

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return emu::shuffle(v, [=](unsigned lane) { return lane ^ (unsigned)lane_mask; });
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    return emu::shuffle(v, [=](unsigned lane) { return lane >= delta ? lane - delta : lane; });
}

template <typename T>
T __shfl_sync(unsigned, T v, int source) {
    return emu::shuffle(v, [=](unsigned) { return (unsigned)source & 31u; });
}

inline unsigned __ballot_sync(unsigned, int predicate) {
    const unsigned warp_base = threadIdx.x & ~31u;
    emu::current->shuffle[threadIdx.x] = predicate != 0;
    __syncwarp();
    unsigned out = 0;
    for (unsigned j = 0; j < 32; ++j) out |= (unsigned)emu::current->shuffle[warp_base + j] << j;
    __syncwarp();
    return out;
}

inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_and(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __double2float_rn(double d) { return (float)d; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)((((uint64_t)hi << 32) | lo) >> (shift & 31));
}
template <typename T>
T min(T a, T b) { return b < a ? b : a; }
template <typename T>
T max(T a, T b) { return a < b ? b : a; }

namespace emu {
// Runs kernel<<<grid, block>>>(args...) to completion.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) {
    for (unsigned b = 0; b < grid; ++b) {
        Block blk;
        blk.block = std::make_unique<std::barrier<>>(block);
        for (unsigned w = 0; w < (block + 31) / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
        blk.shuffle.resize(block);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t] {
                threadIdx = make_uint3(t, 0, 0);
                blockIdx = make_uint3(b, 0, 0);
                blockDim = dim3(block, 1, 1);
                gridDim = dim3(grid, 1, 1);
                current = &blk;
                kernel(args...);
            });
        }
        for (auto& th : threads) th.join();
    }
}
}  // namespace emu
