// DropBlock 2D kernels. Entry points are extern "C" with the op and the dtype in
// the name, so an Nsight timeline reads plainly:
//
//   dropblock2d_count_mask       seeds -> blocks -> keep bits, kept counts, scales
//   dropblock2d_seed_blocks,     the same in two grid-wide passes, for few large
//   dropblock2d_count_bits       planes
//   dropblock2d_apply_<T>        y = x * factor from saved keep bits and scales
//                                (Global / PerSample forward, and every backward)
//   dropblock2d_fused_<T>        Expected / None normalisation, no sharing: mask
//                                and scaled copy in a single launch
//   dropblock2d_advance_key      steps a device generator after a forward
//   dropblock2d_sample_seeds     the raw seed words, for checking the sampler
//
// `_unaligned` variants take any pointers and shapes; the others need x and y
// 16-byte aligned and slices of at least 16 bytes, and use 16-byte vector loads
// and stores. Index arithmetic is 64-bit throughout.

#include "elementwise.cuh"
#include "mask.cuh"

namespace dropblock {

// Items [begin, end) of warp `warp` out of `warps`: contiguous runs, so a warp's
// planes (or words) mostly share a sample and its per-sample counter.
__device__ __forceinline__ void warp_share(uint64_t items, uint64_t warp, uint64_t warps, uint64_t& begin,
                                           uint64_t& end) {
    const uint64_t per = items / warps, rem = items % warps;
    begin = warp * per + min(warp, rem);
    end = begin + per + (warp < rem ? 1 : 0);
}

__device__ __forceinline__ uint64_t global_warp() { return (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ uint64_t warps_in_grid() { return (gridDim.x * (uint64_t)blockDim.x) >> 5; }

// A position in the tensor: sample n, channel c, cell of the (n, c) slice.
struct Position {
    uint64_t n, c, cell;
};

// What an element's factor comes from: its plane's keep bits and its scale.
// Positions are (n, c) rather than the slice n * C + c, so neither the plane nor
// the per-sample scale needs a division.
struct Factors {
    const DropBlockGeometry& g;
    const DropBlockApply& a;
    const uint32_t* keep_bits;
    // Scales on the device (Global, PerSample), or nullptr for a.fixed_scale.
    const float* scales;
    float scale0;

    __device__ __forceinline__ Factors(const DropBlockGeometry& g_, const DropBlockApply& a_, const uint32_t* bits,
                                       const float* s)
        : g(g_), a(a_), keep_bits(bits), scales(s), scale0(s ? s[0] : a_.fixed_scale) {}

    __device__ __forceinline__ const uint32_t* words(const Position& p) const {
        return keep_bits + plane_of(g, p.n, p.c) * a.plane_words;
    }
    __device__ __forceinline__ float scale(const Position& p) const {
        return scales && a.normalize == DROPBLOCK_NORM_PER_SAMPLE ? scales[p.n] : scale0;
    }
    __device__ __forceinline__ Position position(uint64_t e) const {
        const uint64_t slice = e / a.plane_len;
        return Position{slice / g.c, slice % g.c, e - slice * a.plane_len};
    }
    // The next slice.
    __device__ __forceinline__ void next_slice(Position& p) const {
        p.cell = 0;
        if (++p.c == g.c) {
            p.c = 0;
            ++p.n;
        }
    }
};

template <typename T>
__device__ __forceinline__ void apply_one(const T* x, T* y, uint64_t e, const Factors& f) {
    const Position p = f.position(e);
    y[e] = scale_element(x[e], keep_bit(f.words(p), p.cell) ? f.scale(p) : 0.0f);
}

// y[e] = x[e] * factor(e) for e in [first, last), by `workers` workers of which
// this is number `worker`. VECTOR: 16-byte accesses; x and y must be 16-byte
// aligned (they then share their alignment, so one scalar head serves both) and
// slices at least a vector long.
// Each worker keeps its position and steps it by a precomputed stride: no
// division in the loop.
template <typename T, bool VECTOR>
__device__ __forceinline__ void apply_range(const T* x, T* y, uint64_t first, uint64_t last, uint64_t worker,
                                            uint64_t workers, const Factors& f) {
    constexpr uint32_t VEC = VECTOR ? 16 / sizeof(T) : 1;
    using V = Vec<T, VEC>;
    const uint64_t L = f.a.plane_len, C = f.g.c;
    const uint64_t head = min((uint64_t)((VEC - first % VEC) % VEC), last - first);
    const uint64_t body = first + head;
    const uint64_t nvec = (last - body) / VEC;
    const uint64_t tail = body + nvec * VEC;
    for (uint64_t e = first + worker; e < body; e += workers) apply_one(x, y, e, f);
    for (uint64_t e = tail + worker; e < last; e += workers) apply_one(x, y, e, f);
    if (worker >= nvec) return;

    // A stride of `workers` vectors moves a position by (dn, dc, dcell), carries aside.
    const uint64_t stride = workers * VEC;
    const uint64_t stride_slices = stride / L, dcell = stride - stride_slices * L;
    const uint64_t dn = stride_slices / C, dc = stride_slices - dn * C;
    auto step = [&](Position p) {
        p.cell += dcell;
        p.c += dc;
        p.n += dn;
        if (p.cell >= L) {
            p.cell -= L;
            ++p.c;
        }
        if (p.c >= C) {
            p.c -= C;
            ++p.n;
        }
        return p;
    };
    const V* xv = reinterpret_cast<const V*>(x + body);
    V* yv = reinterpret_cast<V*>(y + body);
    // UNROLL vectors per iteration, all loaded before any is stored, so each
    // thread keeps several 16-byte loads in flight (the compiler cannot hoist a
    // load over a store to y, which may be x).
    constexpr int UNROLL = 2;
    Position p = f.position(body + worker * VEC);
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
            // The host runs the vector kernels only when L >= VEC, so a vector spans
            // at most two slices: `split` elements in q's, the rest in the next one's.
            const uint32_t split = (uint32_t)min(L - q.cell, (uint64_t)VEC);
            uint32_t bits = keep_bits_from(f.words(q), f.a.plane_words, q.cell);
            const float s0 = f.scale(q);
            if (split == VEC) {
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k) out.v[k] = scale_element(in[u].v[k], (bits >> k) & 1u ? s0 : 0.0f);
            } else {
                Position r = q;
                f.next_slice(r);
                bits = (bits & ((1u << split) - 1u)) | keep_bits_from(f.words(r), f.a.plane_words, 0) << split;
                const float s1 = f.scale(r);
#pragma unroll
                for (uint32_t k = 0; k < VEC; ++k)
                    out.v[k] = scale_element(in[u].v[k], (bits >> k) & 1u ? (k < split ? s0 : s1) : 0.0f);
            }
            yv[v + u * workers] = out;
        }
        p = step(at[UNROLL - 1]);
    }
}

template <typename T, bool VECTOR>
__device__ __forceinline__ void apply_flat(const DropBlockGeometry& g, const DropBlockApply& a, const T* x, T* y,
                                           const uint32_t* keep_bits, const float* scales) {
    apply_range<T, VECTOR>(x, y, 0, a.numel, blockIdx.x * (uint64_t)blockDim.x + threadIdx.x,
                           gridDim.x * (uint64_t)blockDim.x, Factors(g, a, keep_bits, scales));
}

// Kept counts of one warp: the total over the tensor (each plane weighted by the
// slices that read it) and, under PerSample, per sample. Usually a warp's planes
// all belong to one sample: then the lanes' sums are added across the warp and
// sent with one atomic; otherwise each lane sends one per sample run.
struct WarpCounts {
    const DropBlockGeometry& g;
    unsigned long long* counts;
    bool per_sample, one_sample;
    uint64_t total_weight, sample_weight, total = 0, run_sum = 0, run_counter = ~0ull;

    // The warp's items lie in planes first_plane..=last_plane (`any`: it has items).
    __device__ __forceinline__ WarpCounts(const DropBlockGeometry& g_, const DropBlockApply& a,
                                          unsigned long long* c, bool any, uint64_t first_plane, uint64_t last_plane)
        : g(g_),
          counts(c),
          per_sample(a.normalize == DROPBLOCK_NORM_PER_SAMPLE),
          one_sample(any && sample_counter_of_plane(g_, first_plane) == sample_counter_of_plane(g_, last_plane)),
          total_weight(slices_per_plane(g_)),
          sample_weight(sample_weight_of_plane(g_)) {
        if (one_sample) run_counter = sample_counter_of_plane(g, first_plane);
    }

    __device__ __forceinline__ void add(uint64_t plane, uint32_t kept) {
        total += kept * total_weight;
        if (!per_sample) return;
        if (!one_sample) {
            const uint64_t ctr = sample_counter_of_plane(g, plane);
            if (ctr != run_counter) {
                flush();
                run_counter = ctr;
            }
        }
        run_sum += kept * sample_weight;
    }

    __device__ __forceinline__ void flush() {
        if (run_counter != ~0ull && run_sum)
            atomicAdd(&counts[DROPBLOCK_COUNT_SAMPLES + run_counter], (unsigned long long)run_sum);
        run_sum = 0;
    }

    // Sends what is left; every lane must call it. Returns the warp's total.
    __device__ __forceinline__ uint64_t finish() {
        if (one_sample) {
            run_sum = warp_sum(run_sum);
            if ((threadIdx.x & 31) != 0) run_sum = 0;
        }
        flush();
        return warp_sum(total);
    }
};

// Adds the block's total with one atomic; the last block to finish writes the
// scales from the complete counters. Every thread must call it.
__device__ __forceinline__ void publish_counts(const DropBlockGeometry& g, const DropBlockApply& a,
                                               uint64_t warp_total, unsigned long long* counts, float* scales) {
    // Every thread's per-sample atomics are ordered before the block's ticket.
    __threadfence();
    __shared__ uint64_t warp_totals[32];
    __shared__ bool last_block;
    if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = warp_total;
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
                                        c[DROPBLOCK_COUNT_SAMPLES + sample_counter_of_sample(g, n)]);
            break;
        default:
            if (threadIdx.x == 0) scales[0] = a.fixed_scale;
    }
}

}  // namespace dropblock

using namespace dropblock;

// Builds every plane's keep bits and counts what is kept (an exact integer
// count: one 64-bit atomic per block for the total), each warp owning a
// contiguous run of planes; the last block writes the scales. For many planes.
extern "C" __global__ void __launch_bounds__(256, 1)
dropblock2d_count_mask(DropBlockGeometry g, DropBlockSampling s, const unsigned long long* device_key,
                       DropBlockApply a, uint32_t* keep_bits, unsigned long long* counts, float* scales) {
    const Key k = load_key(s, device_key);
    const uint64_t* t = shared_thresholds(s);
    uint64_t begin, end;
    warp_share(g.planes, global_warp(), warps_in_grid(), begin, end);
    WarpCounts wc(g, a, counts, begin < end, begin, end - 1);
    build_keep_bits(g, t, k, a, begin, end, keep_bits, [&](uint64_t plane, uint32_t kept) { wc.add(plane, kept); });
    publish_counts(g, a, wc.finish(), counts, scales);
}

// For few large planes, where a warp per plane run would leave the device idle,
// the same work in two grid-wide passes: dropblock2d_seed_blocks ORs every
// window's blocks into dropped bits (zeroed by the host), then
// dropblock2d_count_bits turns them into keep bits and counts them.
extern "C" __global__ void __launch_bounds__(256, 1)
dropblock2d_seed_blocks(DropBlockGeometry g, DropBlockSampling s, const unsigned long long* device_key,
                        DropBlockApply a, uint32_t* bits) {
    const uint64_t windows = g.planes * g.seed_h * g.windows_per_row;
    const uint64_t* t = shared_thresholds(s);
    seed_windows(g, t, load_key(s, device_key), a, 0, windows, blockIdx.x * (uint64_t)blockDim.x + threadIdx.x,
                 gridDim.x * (uint64_t)blockDim.x, bits);
}

extern "C" __global__ void __launch_bounds__(256, 1)
dropblock2d_count_bits(DropBlockGeometry g, DropBlockApply a, uint32_t* bits, unsigned long long* counts,
                       float* scales) {
    uint64_t begin, end;
    warp_share(g.planes * a.plane_words, global_warp(), warps_in_grid(), begin, end);
    WarpCounts wc(g, a, counts, begin < end, begin / a.plane_words, (end - 1) / a.plane_words);
    keep_words(a, begin, end, threadIdx.x & 31, 32, bits, [&](uint64_t plane, uint32_t kept) { wc.add(plane, kept); });
    publish_counts(g, a, wc.finish(), counts, scales);
}

// Mask and scaled copy in one launch, for Expected / None normalisation without
// sharing (each plane is its own slice). Writes the keep bits for backward.
template <typename T, bool VECTOR>
__device__ __forceinline__ void fused(const DropBlockGeometry& g, const DropBlockSampling& s,
                                      const unsigned long long* device_key, const DropBlockApply& a, const T* x, T* y,
                                      uint32_t* keep_bits, float* scales) {
    uint64_t begin, end;
    warp_share(g.planes, global_warp(), warps_in_grid(), begin, end);
    const uint64_t* t = shared_thresholds(s);
    build_keep_bits(g, t, load_key(s, device_key), a, begin, end, keep_bits, [](uint64_t, uint32_t) {});
    // Without sharing, planes [begin, end) are exactly the slices of elements
    // [begin * L, end * L).
    apply_range<T, VECTOR>(x, y, begin * a.plane_len, end * a.plane_len, threadIdx.x & 31, 32,
                           Factors(g, a, keep_bits, nullptr));
    if (blockIdx.x == 0 && threadIdx.x == 0) scales[0] = a.fixed_scale;
}

// x and y may be the same buffer (in place): every element is read and then
// written by the same thread, so no __restrict__.
#define DROPBLOCK_ELEMENTWISE_KERNELS(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 1) dropblock2d_apply_##NAME(                                 \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) { \
        apply_flat<T, true>(g, a, x, y, keep_bits, scales);                                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) dropblock2d_apply_unaligned_##NAME(                       \
        DropBlockGeometry g, DropBlockApply a, const T* x, T* y, const uint32_t* keep_bits, const float* scales) { \
        apply_flat<T, false>(g, a, x, y, keep_bits, scales);                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) dropblock2d_fused_##NAME(                                 \
        DropBlockGeometry g, DropBlockSampling s, const unsigned long long* device_key, DropBlockApply a,          \
        const T* x, T* y, uint32_t* keep_bits, float* scales) {                                                  \
        fused<T, true>(g, s, device_key, a, x, y, keep_bits, scales);                                            \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) dropblock2d_fused_unaligned_##NAME(                       \
        DropBlockGeometry g, DropBlockSampling s, const unsigned long long* device_key, DropBlockApply a,          \
        const T* x, T* y, uint32_t* keep_bits, float* scales) {                                                  \
        fused<T, false>(g, s, device_key, a, x, y, keep_bits, scales);                                           \
    }

DROPBLOCK_ELEMENTWISE_KERNELS(float, f32)
DROPBLOCK_ELEMENTWISE_KERNELS(__half, f16)
DROPBLOCK_ELEMENTWISE_KERNELS(__nv_bfloat16, bf16)

// Steps a device generator ([seed, offset]) to its next call, after the
// forward's sampling kernels have read it (stream order).
extern "C" __global__ void __launch_bounds__(32, 1) dropblock2d_advance_key(unsigned long long* device_key) {
    if (blockIdx.x == 0 && threadIdx.x == 0) device_key[1] += DROPBLOCK_OFFSET_STRIDE;
}

// One thread per window: the seed words of every plane's seed grid, in window
// order (plane, seed row, segment).
extern "C" __global__ void __launch_bounds__(256, 1)
dropblock2d_sample_seeds(DropBlockGeometry g, DropBlockSampling s, uint64_t* seeds) {
    // The production kernels' way to the thresholds and key, so this check covers it.
    const uint64_t* t = shared_thresholds(s);
    const Key k = load_key(s, nullptr);
    const uint64_t windows = g.planes * g.seed_h * g.windows_per_row;
    for (uint64_t w = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; w < windows;
         w += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t segment = (uint32_t)(w % g.windows_per_row);
        seeds[w] = sample_window(t, k, w, min(64u, g.seed_w - segment * 64u));
    }
}
