// DropBlock 2D kernels. Entry points are extern "C" with the op and the dtype in
// the name, so an Nsight timeline reads plainly:
//
//   dropblock2d_count_mask       seeds -> blocks -> keep bits, kept counts, scales
//   dropblock2d_apply_<T>        y = x * factor from saved keep bits and scales
//                                (Global / PerSample forward, and every backward)
//   dropblock2d_fused_<T>        Expected / None normalisation, no sharing: mask
//                                and scaled copy in a single launch
//   dropblock2d_sample_seeds     the raw seed words, for checking the sampler
//
// `_unaligned` variants take any pointers; the others need x and y 16-byte aligned
// and use 16-byte vector loads and stores. Index arithmetic is 64-bit throughout.

#include "elementwise.cuh"
#include "mask.cuh"

namespace dropblock {

// Planes [begin, end) of warp `warp` out of `warps`: contiguous runs, so a warp's
// planes mostly share a sample and its per-sample counter.
__device__ __forceinline__ void warp_planes(uint64_t planes, uint64_t warp, uint64_t warps, uint64_t& begin,
                                            uint64_t& end) {
    const uint64_t per = planes / warps, rem = planes % warps;
    begin = warp * per + min(warp, rem);
    end = begin + per + (warp < rem ? 1 : 0);
}

__device__ __forceinline__ uint64_t global_warp() { return (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ uint64_t warps_in_grid() { return (gridDim.x * (uint64_t)blockDim.x) >> 5; }

template <typename T, bool VECTOR>
__device__ __forceinline__ void apply_flat(const DropBlockGeometry& g, const DropBlockApply& a, const T* x, T* y,
                                           const uint32_t* keep_bits, const float* scales) {
    constexpr int VEC = VECTOR ? Vec16<T>::N : 1;
    const bool per_sample = a.normalize == DROPBLOCK_NORM_PER_SAMPLE;
    const float scale0 = scales[0];
    const uint64_t nvec = a.numel / VEC;
    const uint64_t stride = gridDim.x * (uint64_t)blockDim.x;
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;

    auto factor = [&](uint64_t slice, uint64_t cell) {
        const float scale = per_sample ? scales[slice / g.c] : scale0;
        return keep_bit(keep_bits + plane_of_slice(g, slice) * a.plane_words, cell) ? scale : 0.0f;
    };

    for (uint64_t v = tid; v < nvec; v += stride) {
        const uint64_t e = v * VEC;
        uint64_t slice = e / a.plane_len;
        uint64_t cell = e - slice * a.plane_len;
        if constexpr (VECTOR) {
            Vec16<T> in = reinterpret_cast<const Vec16<T>*>(x)[v];
            Vec16<T> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                if (cell == a.plane_len) { ++slice; cell = 0; }
                out.v[k] = scale_element(in.v[k], factor(slice, cell));
                ++cell;
            }
            reinterpret_cast<Vec16<T>*>(y)[v] = out;
        } else {
            y[e] = scale_element(x[e], factor(slice, cell));
        }
    }
    if constexpr (VECTOR) {
        const uint64_t e = nvec * VEC + tid;
        if (e < a.numel) {
            const uint64_t slice = e / a.plane_len;
            y[e] = scale_element(x[e], factor(slice, e - slice * a.plane_len));
        }
    }
}

// Scaled copy of one slice by one warp: scalar head up to 16-byte alignment,
// vector body, scalar tail. `first` is the slice's first element index.
template <typename T, bool VECTOR>
__device__ __forceinline__ void apply_slice_warp(const T* x, T* y, uint64_t first, uint64_t len,
                                                 const uint32_t* words, float scale) {
    const uint32_t lane = threadIdx.x & 31;
    constexpr int VEC = VECTOR ? Vec16<T>::N : 1;
    uint64_t head = 0, nvec = 0;
    if constexpr (VECTOR) {
        head = min((uint64_t)((VEC - first % VEC) % VEC), len);
        nvec = (len - head) / VEC;
        for (uint64_t i = lane; i < head; i += 32)
            y[first + i] = scale_element(x[first + i], keep_bit(words, i) ? scale : 0.0f);
        const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(x + first + head);
        Vec16<T>* yv = reinterpret_cast<Vec16<T>*>(y + first + head);
        for (uint64_t v = lane; v < nvec; v += 32) {
            Vec16<T> in = xv[v];
            Vec16<T> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const uint64_t cell = head + v * VEC + k;
                out.v[k] = scale_element(in.v[k], keep_bit(words, cell) ? scale : 0.0f);
            }
            yv[v] = out;
        }
    }
    for (uint64_t i = head + nvec * VEC + lane; i < len; i += 32)
        y[first + i] = scale_element(x[first + i], keep_bit(words, i) ? scale : 0.0f);
}

}  // namespace dropblock

using namespace dropblock;

// Builds every plane's keep bits, counts what is kept (an exact integer count:
// one 64-bit atomic per thread block for the total, one per warp and sample run
// for PerSample), and the last block to finish writes the scales.
extern "C" __global__ void __launch_bounds__(256)
dropblock2d_count_mask(DropBlockGeometry g, DropBlockSampling s, DropBlockApply a, uint32_t* keep_bits,
                       unsigned long long* counts, float* scales) {
    const uint32_t lane = threadIdx.x & 31, warp_in_block = threadIdx.x >> 5;
    uint64_t begin, end;
    warp_planes(g.planes, global_warp(), warps_in_grid(), begin, end);

    const uint64_t total_weight = slices_per_plane(g), sample_weight = sample_weight_of_plane(g);
    const bool per_sample = a.normalize == DROPBLOCK_NORM_PER_SAMPLE;
    uint64_t total = 0, run_sum = 0, run_counter = ~0ull;
    for (uint64_t p = begin; p < end; ++p) {
        const uint64_t kept = build_plane_keep_bits(g, s, a, p, keep_bits + p * a.plane_words);
        total += kept * total_weight;
        if (per_sample) {
            const uint64_t ctr = sample_counter_of_plane(g, p);
            if (ctr != run_counter) {
                if (lane == 0 && run_counter != ~0ull && run_sum)
                    atomicAdd(&counts[DROPBLOCK_COUNT_SAMPLES + run_counter], (unsigned long long)run_sum);
                run_counter = ctr;
                run_sum = 0;
            }
            run_sum += kept * sample_weight;
        }
    }
    if (lane == 0 && run_counter != ~0ull && run_sum)
        atomicAdd(&counts[DROPBLOCK_COUNT_SAMPLES + run_counter], (unsigned long long)run_sum);
    // Every thread's per-sample atomics are ordered before the block's ticket
    // below, so the last block reads complete counters.
    __threadfence();

    __shared__ uint64_t warp_totals[32];
    __shared__ bool last_block;
    if (lane == 0) warp_totals[warp_in_block] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint64_t block_total = 0;
        for (uint32_t w = 0; w < blockDim.x / 32; ++w) block_total += warp_totals[w];
        if (block_total) atomicAdd(&counts[DROPBLOCK_COUNT_TOTAL], (unsigned long long)block_total);
        __threadfence();
        last_block = atomicAdd(&counts[DROPBLOCK_COUNT_DONE], 1ull) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    const volatile unsigned long long* c = counts;
    switch (a.normalize) {
        case DROPBLOCK_NORM_GLOBAL:
            if (threadIdx.x == 0) scales[0] = count_scale(a.numel, c[DROPBLOCK_COUNT_TOTAL]);
            break;
        case DROPBLOCK_NORM_PER_SAMPLE:
            for (uint64_t n = threadIdx.x; n < g.n; n += blockDim.x)
                scales[n] = count_scale((uint64_t)g.c * a.plane_len,
                                        c[DROPBLOCK_COUNT_SAMPLES + (a.uniform_samples ? 0 : n)]);
            break;
        default:
            if (threadIdx.x == 0) scales[0] = a.fixed_scale;
    }
}

// Mask and scaled copy in one launch, for Expected / None normalisation without
// sharing (each plane is its own slice). Writes the keep bits for backward.
template <typename T, bool VECTOR>
__device__ __forceinline__ void fused(const DropBlockGeometry& g, const DropBlockSampling& s, const DropBlockApply& a,
                                      const T* x, T* y, uint32_t* keep_bits, float* scales) {
    uint64_t begin, end;
    warp_planes(g.planes, global_warp(), warps_in_grid(), begin, end);
    for (uint64_t p = begin; p < end; ++p) {
        uint32_t* words = keep_bits + p * a.plane_words;
        build_plane_keep_bits(g, s, a, p, words);
        apply_slice_warp<T, VECTOR>(x, y, p * a.plane_len, a.plane_len, words, a.fixed_scale);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) scales[0] = a.fixed_scale;
}

// x and y may be the same buffer (in place): every element is read and then
// written by the same thread, so no __restrict__.
#define DROPBLOCK_ELEMENTWISE_KERNELS(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) dropblock2d_apply_##NAME(                                 \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) { \
        apply_flat<T, true>(g, a, x, y, keep_bits, scales);                                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) dropblock2d_apply_unaligned_##NAME(                       \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) { \
        apply_flat<T, false>(g, a, x, y, keep_bits, scales);                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) dropblock2d_fused_##NAME(                                 \
        DropBlockGeometry g, DropBlockSampling s, DropBlockApply a, const T* x, T* y, uint32_t* keep_bits,        \
        float* scales) {                                                                                         \
        fused<T, true>(g, s, a, x, y, keep_bits, scales);                                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) dropblock2d_fused_unaligned_##NAME(                       \
        DropBlockGeometry g, DropBlockSampling s, DropBlockApply a, const T* x, T* y, uint32_t* keep_bits,        \
        float* scales) {                                                                                         \
        fused<T, false>(g, s, a, x, y, keep_bits, scales);                                                       \
    }

DROPBLOCK_ELEMENTWISE_KERNELS(float, f32)
DROPBLOCK_ELEMENTWISE_KERNELS(__half, f16)
DROPBLOCK_ELEMENTWISE_KERNELS(__nv_bfloat16, bf16)

// One thread per window: the seed words of every plane's seed grid, in window
// order (plane, seed row, segment).
extern "C" __global__ void __launch_bounds__(256)
dropblock2d_sample_seeds(DropBlockGeometry g, DropBlockSampling s, uint64_t* seeds) {
    const uint64_t windows = g.planes * g.seed_h * g.windows_per_row;
    for (uint64_t w = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; w < windows;
         w += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t segment = (uint32_t)(w % g.windows_per_row);
        seeds[w] = sample_window(s, w, min(64u, g.seed_w - segment * 64u));
    }
}
