// Element types and the scaled copy `y = round(f32(x) * factor)`, with the factor
// of each element from the keep bits and the scale(s).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "index.cuh"
#include "mask.cuh"

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

// Vectors per thread loaded before any is stored, so each thread keeps several
// 16-byte loads in flight (the compiler cannot hoist a load over a store to y,
// which may be x): 4 where the index arithmetic is light, 2 where positions or a
// tile's state already hold many registers.
constexpr int UNROLL_FLAT = 4, UNROLL_LEAN = 2;

// Keep bits where element e's bit is bit e (no sharing): `words` holds word
// `base` onwards. A 16-byte vector starts at a multiple of 4 or 8 elements, so its
// bits never straddle a word.
struct FlatBits {
    const uint32_t* words;
    uint64_t base;
    __device__ __forceinline__ uint32_t from(uint64_t e) const { return words[(e >> 5) - base] >> (e & 31); }
};

// The scales of a launch: one (`s0`), or one per sample of `sample_len` elements.
struct Scales {
    const float* per_sample;
    float s0;
    uint64_t sample_len;
};

// y[e] = x[e] * factor(e) for e in [first, last) with flat keep bits, by `workers`
// workers of which this is number `worker`. x and y must be 16-byte aligned (they
// then share their alignment, so one scalar head serves both).
template <typename T, bool PER_SAMPLE, int UNROLL = UNROLL_FLAT>
__device__ __forceinline__ void apply_flat(const T* x, T* y, uint64_t first, uint64_t last, uint64_t worker,
                                           uint64_t workers, const FlatBits& bits, const Scales& sc) {
    constexpr uint32_t VEC = 16 / sizeof(T);
    using V = Vec<T, VEC>;
    const uint64_t head = min((uint64_t)((VEC - first % VEC) % VEC), last - first);
    const uint64_t body = first + head;
    const uint64_t nvec = (last - body) / VEC;
    const uint64_t tail = body + nvec * VEC;
    auto one = [&](uint64_t e) {
        const float s = PER_SAMPLE ? sc.per_sample[e / sc.sample_len] : sc.s0;
        y[e] = scale_element(x[e], bits.from(e) & 1u ? s : 0.0f);
    };
    for (uint64_t e = first + worker; e < body; e += workers) one(e);
    for (uint64_t e = tail + worker; e < last; e += workers) one(e);
    if (worker >= nvec) return;

    const V* xv = reinterpret_cast<const V*>(x + body);
    V* yv = reinterpret_cast<V*>(y + body);
    RunCursor at = PER_SAMPLE ? RunCursor(body + worker * VEC, workers * VEC, sc.sample_len) : RunCursor();
    for (uint64_t v = worker; v < nvec; v += UNROLL * workers) {
        V in[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (v + u * workers < nvec) in[u] = xv[v + u * workers];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint64_t i = v + u * workers;
            if (i >= nvec) break;
            const uint32_t keep = bits.from(body + i * VEC);
            V out;
            if (PER_SAMPLE) {
                // A vector may end in the next sample when samples are not whole
                // vectors, but not in the one after: the host runs this kernel only
                // when a sample holds at least a vector (apply_op).
                const uint64_t split = min(at.len - at.pos, (uint64_t)VEC);
                const float s0 = sc.per_sample[at.n], s1 = split < VEC ? sc.per_sample[at.n + 1] : s0;
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k)
                    out.v[k] = scale_element(in[u].v[k], (keep >> k) & 1u ? (k < split ? s0 : s1) : 0.0f);
                at.step();
            } else {
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k) out.v[k] = scale_element(in[u].v[k], (keep >> k) & 1u ? sc.s0 : 0.0f);
            }
            yv[i] = out;
        }
    }
}

// Keep bits read through the plane of each slice (sharing): bit plane * L + cell.
struct PlaneBits {
    const DropBlockGeometry& g;
    const uint32_t* words;
    uint64_t plane_len, total_words;

    __device__ __forceinline__ PlaneBits(const DropBlockGeometry& g_, const uint32_t* words_, uint64_t plane_len_)
        : g(g_), words(words_), plane_len(plane_len_), total_words((g_.planes * plane_len_ + 31) / 32) {}

    __device__ __forceinline__ uint64_t bit(const Position& p) const { return plane_of(g, p.n, p.c) * plane_len + p.cell; }
    // The 32 bits from bit b on (bits past the last word read as 0).
    __device__ __forceinline__ uint32_t from(uint64_t b) const {
        const uint64_t w = b >> 5;
        const uint32_t hi = w + 1 < total_words ? words[w + 1] : 0u;
        return __funnelshift_r(words[w], hi, (uint32_t)(b & 31));
    }
    __device__ __forceinline__ Position position(uint64_t e) const { return position_of(e, plane_len, g.c); }
    __device__ __forceinline__ void next_slice(Position& p) const {
        p.cell = 0;
        if (++p.c == g.c) {
            p.c = 0;
            ++p.n;
        }
    }
};

// The same as apply_flat with keep bits shared between slices: each thread steps
// its (n, c, cell) position by a precomputed stride, with no division in the loop;
// a vector spans at most two slices (the host runs the vector kernels only when a
// slice holds at least a vector).
template <typename T, bool PER_SAMPLE>
__device__ __forceinline__ void apply_planes(const T* x, T* y, uint64_t numel, uint64_t worker, uint64_t workers,
                                             const PlaneBits& bits, const Scales& sc) {
    constexpr uint32_t VEC = 16 / sizeof(T);
    using V = Vec<T, VEC>;
    const uint64_t L = bits.plane_len, C = bits.g.c;
    const uint64_t nvec = numel / VEC;
    auto scale = [&](const Position& p) { return PER_SAMPLE ? sc.per_sample[p.n] : sc.s0; };
    for (uint64_t e = nvec * VEC + worker; e < numel; e += workers) {
        const Position p = bits.position(e);
        y[e] = scale_element(x[e], bits.from(bits.bit(p)) & 1u ? scale(p) : 0.0f);
    }
    if (worker >= nvec) return;

    const PositionStep step(workers * VEC, L, C);
    constexpr int UNROLL = UNROLL_LEAN;
    const V* xv = reinterpret_cast<const V*>(x);
    V* yv = reinterpret_cast<V*>(y);
    Position p = bits.position(worker * VEC);
    for (uint64_t v = worker; v < nvec; v += UNROLL * workers) {
        V in[UNROLL];
        Position at[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            at[u] = u == 0 ? p : step(at[u - 1]);
            if (v + u * workers < nvec) in[u] = xv[v + u * workers];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (v + u * workers >= nvec) break;
            const Position& q = at[u];
            V out;
            const uint32_t split = (uint32_t)min(L - q.cell, (uint64_t)VEC);
            uint32_t keep = bits.from(bits.bit(q));
            const float s0 = scale(q);
            if (split == VEC) {
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k) out.v[k] = scale_element(in[u].v[k], (keep >> k) & 1u ? s0 : 0.0f);
            } else {
                Position r = q;
                bits.next_slice(r);
                keep = (keep & ((1u << split) - 1u)) | bits.from(bits.bit(r)) << split;
                const float s1 = scale(r);
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k)
                    out.v[k] = scale_element(in[u].v[k], (keep >> k) & 1u ? (k < split ? s0 : s1) : 0.0f);
            }
            yv[v + u * workers] = out;
        }
        p = step(at[UNROLL - 1]);
    }
}

// Any pointers and any shape, one element at a time: the fallback for tensors
// that are not 16-byte aligned, or slices and samples shorter than a vector.
template <typename T>
__device__ __forceinline__ void apply_scalar(const T* x, T* y, uint64_t numel, uint64_t worker, uint64_t workers,
                                             const PlaneBits& bits, const Scales& sc) {
    const PositionStep step(workers, bits.plane_len, bits.g.c);
    Position p = bits.position(worker);
    for (uint64_t e = worker; e < numel; e += workers, p = step(p)) {
        const float s = sc.per_sample ? sc.per_sample[p.n] : sc.s0;
        y[e] = scale_element(x[e], bits.from(bits.bit(p)) & 1u ? s : 0.0f);
    }
}

}  // namespace dropblock
