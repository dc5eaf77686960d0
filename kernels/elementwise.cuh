// Element types and the scaled copy `y = round(f32(x) * factor)`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace dropblock {

template <typename T> struct Elem;

template <> struct Elem<float> {
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <> struct Elem<__half> {
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <> struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// One f32 multiply, then round to the element type: no FMA can form, so the
// result matches the CPU's `T::from_f32(x.to_f32() * factor)` exactly.
template <typename T>
__device__ __forceinline__ T scale_element(T x, float factor) {
    return Elem<T>::from_float(__fmul_rn(Elem<T>::to_float(x), factor));
}

// N elements loaded and stored as one access (16 bytes for the vector kernels).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

__device__ __forceinline__ bool keep_bit(const uint32_t* words, uint64_t cell) {
    return (words[cell >> 5] >> (cell & 31)) & 1u;
}

// Keep bits of cells [cell, cell + 32) of a plane in the low bits (bits past the
// plane read as 0): one funnel shift instead of a load per element.
__device__ __forceinline__ uint32_t keep_bits_from(const uint32_t* words, uint64_t plane_words, uint64_t cell) {
    const uint64_t w = cell >> 5;
    const uint32_t hi = w + 1 < plane_words ? words[w + 1] : 0u;
    return __funnelshift_r(words[w], hi, (uint32_t)(cell & 31));
}

}  // namespace dropblock
