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

/* A seed-grid row is cut into windows of this many cells; one window's seeds
 * fit in one 64-bit word. */
#define DROPBLOCK_WINDOW_CELLS 64
/* One Philox block gives 4 draws, a window needs at most 64 draws (one per
 * seed; the stop draw is skipped when the window is full), so a call reads
 * counter blocks offset .. offset+15 of every window's subsequence. */
#define DROPBLOCK_COUNTER_BLOCKS_PER_CALL 16
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

/* Layout of the 64-bit counter array of a call's saved state. */
#define DROPBLOCK_COUNT_TOTAL 0   /* kept elements over the tensor */
#define DROPBLOCK_COUNT_DONE 1    /* blocks finished (the last one writes the scales) */
#define DROPBLOCK_COUNT_SAMPLES 2 /* kept per sample: N entries, or 1 when every sample is alike */

/* The shape-dependent part of a call, derived once on the host. */
typedef struct DropBlockGeometry {
    uint32_t n, c, h, w;
    /* The block, already clipped to the map: kh <= h, kw <= w. */
    uint32_t kh, kw;
    /* A seed at (y, x) drops rows [y - anchor_y, y - anchor_y + kh) and
     * columns [x - anchor_x, x - anchor_x + kw), clipped to the map.
     * Valid placement: 0. Anywhere placement: kh / 2 and kw / 2. */
    uint32_t anchor_y, anchor_x;
    /* The seed grid of one plane: seed_h rows of seed_w cells. */
    uint32_t seed_h, seed_w;
    /* ceil(seed_w / DROPBLOCK_WINDOW_CELLS). */
    uint32_t windows_per_row;
    /* One of DROPBLOCK_SHARE_*. */
    uint32_t sharing;
    /* Number of mask planes (see DROPBLOCK_SHARE_*). */
    uint64_t planes;
} DropBlockGeometry;

/* The element-wise part of a call. */
typedef struct DropBlockApply {
    /* n * c * h * w. */
    uint64_t numel;
    /* h * w: elements of one (n, c) slice and cells of one mask plane. */
    uint64_t plane_len;
    /* 32-bit words of keep bits per mask plane: ceil(plane_len / 32). Bit
     * i % 32 of word i / 32 is set when cell i = h * w_dim + w is kept. */
    uint64_t plane_words;
    /* One of DROPBLOCK_NORM_*. */
    uint32_t normalize;
    /* The scale for Expected and None normalisation (computed on the host). */
    float fixed_scale;
} DropBlockApply;

/* The random part of a call. */
typedef struct DropBlockSampling {
    /* Philox key. */
    uint64_t seed;
    /* First counter block of every window's subsequence. */
    uint64_t offset;
    /* thresholds[j] = 2^32 * P(a window has a seed within its first j+1
     * cells), in [0, 2^32]; a draw u < thresholds[j] means "a seed within
     * j+1 cells". */
    uint64_t thresholds[DROPBLOCK_WINDOW_CELLS];
} DropBlockSampling;

#ifdef __cplusplus
}
#endif

#endif /* DROPBLOCK_ABI_H */
