// A shard's part of the mask (src/shard.rs): the seeds whose blocks reach the
// shard's box, grown clipped to it into its own planes' bits, and its kept counts
// in the layout every shard shares ([total, kept of global sample 0 .. N-1,
// covered of sample 0 .. N-1, tag of sample 0 .. N-1]), to be summed across
// shards before the scales are computed from them.
//
// Grid-wide passes over global memory with 64-bit positions: a shard's box is any
// size, and these kernels are not yet tuned (see docs/PERF.md).
#pragma once

#include "mask.cuh"

namespace dropblock {

// The global plane of the shard's local plane `lp`.
__device__ __forceinline__ uint64_t shard_global_plane(const DropBlockGeometry& g, const DropBlockShard& sh,
                                                       uint64_t lp) {
    switch (g.sharing) {
        case DROPBLOCK_SHARE_NONE: return (sh.n0 + lp / sh.c) * (uint64_t)g.c + sh.c0 + lp % sh.c;
        case DROPBLOCK_SHARE_CHANNELS: return sh.n0 + lp;
        case DROPBLOCK_SHARE_BATCH: return sh.c0 + lp;
        default: return 0;
    }
}

// ORs into `dropped` (the shard's planes, L_local bits each) the part in the box
// of the block of the seed at seed cell `cell`, for local plane `lp`. Seeds outside
// the seed box reach no cell of the box and are skipped.
__device__ __forceinline__ void shard_grow_seed(const DropBlockGeometry& g, const DropBlockShard& sh, uint64_t lp,
                                                uint64_t cell, uint32_t* dropped) {
    uint32_t at[3];
    seed_position(g, cell, at);
    for (int i = 0; i < 3; ++i)
        if (at[i] < sh.seed_lo[i] || at[i] >= sh.seed_hi[i]) return;
    const uint64_t plane_len = (uint64_t)sh.extent[0] * sh.extent[1] * sh.extent[2];
    grow_seed_in_box(g, at, sh.origin, sh.extent, lp * plane_len, dropped);
}

// Whether window `part` of a plane of more than 64 seed cells holds a seed cell of
// the box: one of the (at most 64 / seed_w + 2) seed rows it spans is in the box
// and meets the box's columns.
__device__ __forceinline__ bool shard_window_meets_box(const DropBlockGeometry& g, const DropBlockShard& sh,
                                                       uint64_t part) {
    const uint64_t a = part * DROPBLOCK_WINDOW_CELLS, b = min(a + DROPBLOCK_WINDOW_CELLS, g.seed_cells);
    for (uint64_t row = a / g.seed_w; row * g.seed_w < b; ++row) {
        const uint64_t z = row / g.seed_h, y = row % g.seed_h;
        if (z < sh.seed_lo[0] || z >= sh.seed_hi[0] || y < sh.seed_lo[1] || y >= sh.seed_hi[1]) continue;
        const uint64_t start = row * g.seed_w;
        const uint64_t x0 = a > start ? a - start : 0, x1 = min(b - start, (uint64_t)g.seed_w);
        if (x0 < sh.seed_hi[2] && x1 > sh.seed_lo[2]) return true;
    }
    return false;
}

// Work item `i` of the sampling pass: one window of one run of planes (planes of
// at most 64 seed cells) or one window of one plane.
__device__ __forceinline__ void shard_sample_item(const DropBlockGeometry& g, const DropBlockShard& sh,
                                                  const Thresholds& th, const Key& key, uint64_t i,
                                                  uint32_t* dropped) {
    const uint64_t s = g.seed_cells;
    if (s <= DROPBLOCK_WINDOW_CELLS) {
        const uint64_t q = g.planes_per_window;
        const uint64_t run = i / sh.windows_per_run, local0 = run * sh.run_planes;
        const uint64_t len = min(sh.run_planes, sh.planes - local0);
        const uint64_t plane0 = shard_global_plane(g, sh, local0);
        const uint64_t window = plane0 / q + i % sh.windows_per_run;
        if (window > (plane0 + len - 1) / q) return;
        // One window per group here: the window is its group.
        for_each_seed(sample_window(th, key, window, window_len(g, window, 0)), [&](uint32_t j) {
            const uint64_t plane = window * q + j / s;
            if (plane >= plane0 && plane < plane0 + len) shard_grow_seed(g, sh, local0 + plane - plane0, j % s, dropped);
        });
    } else {
        const uint64_t parts = sh.part_hi - sh.part_lo;
        const uint64_t lp = i / parts, part = sh.part_lo + i % parts;
        if (!shard_window_meets_box(g, sh, part)) return;
        const uint64_t plane = shard_global_plane(g, sh, lp), window = plane * g.windows_per_group + part;
        for_each_seed(sample_window(th, key, window, window_len(g, plane, part)), [&](uint32_t j) {
            shard_grow_seed(g, sh, lp, part * DROPBLOCK_WINDOW_CELLS + j, dropped);
        });
    }
}

// Items of the sampling pass.
__device__ __forceinline__ uint64_t shard_sample_items(const DropBlockGeometry& g, const DropBlockShard& sh) {
    if (g.seed_cells <= DROPBLOCK_WINDOW_CELLS)
        return (sh.planes + sh.run_planes - 1) / sh.run_planes * sh.windows_per_run;
    return sh.planes * (sh.part_hi - sh.part_lo);
}

// The elements of one of the shard's samples in its box: C·D·H·W.
__device__ __forceinline__ uint64_t shard_sample_elements(const DropBlockShard& sh) {
    return (uint64_t)sh.c * sh.extent[0] * sh.extent[1] * sh.extent[2];
}

// Kept elements of local sample `n`: its slices' planes' kept cells, or with no
// plane counts (an identity call) all of its elements.
__device__ __forceinline__ uint64_t shard_sample_kept(const DropBlockGeometry& g, const DropBlockShard& sh,
                                                      const unsigned long long* plane_kept, uint64_t n) {
    if (!plane_kept) return shard_sample_elements(sh);
    uint64_t kept = 0;
    switch (g.sharing) {
        case DROPBLOCK_SHARE_NONE:
            for (uint64_t c = 0; c < sh.c; ++c) kept += plane_kept[n * sh.c + c];
            return kept;
        case DROPBLOCK_SHARE_CHANNELS: return sh.c * plane_kept[n];
        case DROPBLOCK_SHARE_BATCH:
            for (uint64_t c = 0; c < sh.c; ++c) kept += plane_kept[c];
            return kept;
        default: return sh.c * plane_kept[0];
    }
}

}  // namespace dropblock
