/*
 * The plain-C ABI shared by the CUDA kernels and the Rust crate.
 *
 * Rust sees this file through bindgen (src/abi.rs, committed and checked by
 * tests/abi_bindings.rs), so a layout change here that is not regenerated
 * fails the test suite. Keep it plain C: fixed-width integers, no CUDA
 * qualifiers, no enums (their width is implementation-defined).
 */
#ifndef DROPBLOCK_ABI_H
#define DROPBLOCK_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of the sampling contract (src/lib.rs): the mask of a call is a
 * pure function of the configuration, the shape and (seed, offset) under it.
 * Version 2 cut windows along whole planes instead of seed-grid rows;
 * version 3 evaluates the thresholds exactly instead of through libm. */
#define DROPBLOCK_CONTRACT_VERSION 3
/* A window holds at most this many seed cells; one window's seeds fit in one
 * 64-bit word. */
#define DROPBLOCK_WINDOW_CELLS 64
/* One Philox block gives 4 draws, a window needs at most 64 draws (one per
 * seed; the stop draw is skipped when the window is full), so a call reads
 * counter blocks offset .. offset+15 of every window's subsequence. */
#define DROPBLOCK_COUNTER_BLOCKS_PER_CALL 16
/* Noise fill reads counter block offset + 16 of subsequence unit / 4: past the
 * blocks any window reads, and before the next call's offset. */
#define DROPBLOCK_NOISE_COUNTER_BLOCK 16
/* What a Generator adds to its offset per call: one more than the blocks a
 * call can read, so consecutive calls never share a counter block. */
#define DROPBLOCK_OFFSET_STRIDE 17

/* Mask sharing: which (n, c) pairs read the same mask plane. */
#define DROPBLOCK_SHARE_NONE 0     /* plane = n*C + c */
#define DROPBLOCK_SHARE_CHANNELS 1 /* plane = n */
#define DROPBLOCK_SHARE_BATCH 2    /* plane = c */
#define DROPBLOCK_SHARE_ALL 3      /* plane = 0 */

/* Normalisation (src/config.rs Normalize). */
#define DROPBLOCK_NORM_GLOBAL 0
#define DROPBLOCK_NORM_PER_SAMPLE 1
#define DROPBLOCK_NORM_EXPECTED 2
#define DROPBLOCK_NORM_NONE 3

/* Layout of the 64-bit counter array of a call's saved state. The kernels
 * accumulate into it and the last block to finish reads it, writes the scales
 * and zeroes it again, so a call needs no host-side reset. */
#define DROPBLOCK_COUNT_TOTAL 0   /* kept elements over the tensor */
#define DROPBLOCK_COUNT_DONE 1    /* blocks finished (the ticket of the last block) */
#define DROPBLOCK_COUNT_SAMPLES 2 /* kept per sample: N entries, or 1 when every sample is alike */

/* The shape-dependent part of a call, derived once on the host. Every spatial
 * rank is a D x H x W volume: 1D is 1 x 1 x L, 2D is 1 x H x W (unit axes in
 * front), so one geometry, one sampler and one set of kernels serve all three,
 * and a 2D call's mask is the same as it was before 3D existed. */
typedef struct DropBlockGeometry {
    uint32_t n, c;
    uint32_t d, h, w;
    /* The block's extent along each axis, at most twice the axis: a seed at
     * (z, y, x) drops [z - anchor_z, z - anchor_z + kd) x [y - anchor_y,
     * y - anchor_y + kh) x [x - anchor_x, x - anchor_x + kw), clipped to the map.
     * Valid placement: the clipped block, anchors 0. Anywhere: the clipped block
     * anchored at half of it, or (CenteredRight) the unclipped block's reach. */
    uint32_t kd, kh, kw;
    uint32_t anchor_z, anchor_y, anchor_x;
    /* The seed grid of one plane: seed_d x seed_h x seed_w cells, numbered
     * row-major (cell i = (z * seed_h + y) * seed_w + x). */
    uint32_t seed_d, seed_h, seed_w;
    /* One of DROPBLOCK_SHARE_*. */
    uint32_t sharing;
    /* q = max(1, floor(64 / seed_cells)): planes are grouped q at a time, and a
     * group's cells (plane-major, then by cell number) are cut into windows of
     * DROPBLOCK_WINDOW_CELLS. So no window holds part of a plane and another. */
    uint32_t planes_per_window;
    /* S = seed_d * seed_h * seed_w. */
    uint64_t seed_cells;
    /* m = ceil(S / 64): windows per group. Window w is window w % m of group w / m. */
    uint64_t windows_per_group;
    /* Number of mask planes (see DROPBLOCK_SHARE_*). */
    uint64_t planes;
    /* ceil(planes / q) * m. */
    uint64_t windows;
} DropBlockGeometry;

/* The element-wise part of a call. */
typedef struct DropBlockApply {
    /* n * c * d * h * w. */
    uint64_t numel;
    /* L = d * h * w: elements of one (n, c) slice and cells of one mask plane.
     * The keep bits of a call are dense: bit b = plane * L + cell (bit b % 32
     * of 32-bit word b / 32) is set when that cell is kept, so without sharing
     * bit e belongs to element e. */
    uint64_t plane_len;
    /* One of DROPBLOCK_NORM_*. */
    uint32_t normalize;
    /* The scale for Expected and None normalisation (computed on the host). */
    float fixed_scale;
} DropBlockApply;

/* Threads per block of every kernel: their __launch_bounds__ and per-warp
 * staging assume it, and the host launches it. Launch parameter only. */
#define DROPBLOCK_THREADS 256

/* Shared-memory words of a tile's bits (8 KiB). */
#define DROPBLOCK_TILE_WORDS 2048
/* Cells a tile holds: it starts at any bit of its first word. */
#define DROPBLOCK_TILE_CELLS (32 * DROPBLOCK_TILE_WORDS - 31)

/* Channels a warp of dropblock_channels_last_bits transposes per item (with 32
 * cells): the host sizes that kernel's grid by it. Launch parameter only. */
#define DROPBLOCK_CHANNELS_LAST_ITEM_CHANNELS 128

/* How the tiled kernels cut the planes: a thread block builds a tile of
 * planes_per_tile consecutive planes (a multiple of planes_per_window, so a
 * tile holds whole windows) in shared memory. Launch parameters only: the mask
 * does not depend on them. */
typedef struct DropBlockTiles {
    uint64_t planes_per_tile;
    uint64_t tiles;
    /* planes_per_tile / planes_per_window: tile t's first window is
     * t * groups_per_tile * windows_per_group. */
    uint64_t groups_per_tile;
    /* For dividing 32-bit numbers inside a tile by seed_cells, windows_per_group,
     * seed_h * seed_w, seed_w, kd * kh, kh and the plane length (all below 2^18
     * when planes fit a tile): ceil(2^64 / d), or 0 for d = 1 (kernels/index.cuh,
     * FastDiv). */
    uint64_t magic_seed_cells, magic_windows_per_group, magic_seed_hw, magic_seed_w, magic_block_rows, magic_kh,
        magic_plane_len;
} DropBlockTiles;

/* A shard: one box of the global tensor (src/shard.rs). Its keep bits are dense
 * over its own planes (bit lp * L_local + local cell), numbered as a tensor of
 * its local N and C numbers them; the geometry the kernels receive beside it is
 * the global one, which the sampling follows. */
typedef struct DropBlockShard {
    /* The box's first sample and channel, and its extents along N and C. */
    uint32_t n0, c0, n, c;
    /* The box's first cell and extent along D, H, W. */
    uint32_t origin[3], extent[3];
    /* Seed positions [seed_lo, seed_hi) along D, H, W whose blocks reach the box. */
    uint32_t seed_lo[3], seed_hi[3];
    /* The shard's planes (see DROPBLOCK_SHARE_*, with its own N and C). */
    uint64_t planes;
    /* Planes of at most 64 seed cells: local planes come in runs of run_planes
     * whose global planes are consecutive (a sample's channels of a channel
     * shard, else all of them), and a run spans at most windows_per_run windows.
     * Larger planes: windows [part_lo, part_hi) of each plane hold every seed cell
     * of the box. */
    uint64_t run_planes, windows_per_run, part_lo, part_hi;
    /* Global N * C * L and C * L: what Global and PerSample scales divide. */
    uint64_t global_numel, global_sample;
    /* The coverage tags (ShardCounts, src/shard.rs) of one of the box's samples
     * and of a whole sample: summed over every shard that holds a sample, its
     * tag entry is sample_tag exactly when each element is counted once. */
    uint64_t box_tag, sample_tag;
} DropBlockShard;

/* The random part of a call. */
typedef struct DropBlockSampling {
    /* Philox key. */
    uint64_t seed;
    /* First counter block of every window's subsequence. */
    uint64_t offset;
    /* `thresholds[j]` = 2^32 * P(a window has a seed within its first j+1
     * cells), in [0, 2^32]; a draw `u < thresholds[j]` means "a seed within
     * j+1 cells". */
    uint64_t thresholds[DROPBLOCK_WINDOW_CELLS];
} DropBlockSampling;

#ifdef __cplusplus
}
#endif

#endif /* DROPBLOCK_ABI_H */
