// Index arithmetic without a division in the loop: a divisor fixed for the launch
// as a multiply, and positions that a thread steps by its fixed stride with
// carries instead of dividing each one.
#pragma once

#include <stdint.h>

namespace dropblock {

// Division of 32-bit numbers by a divisor fixed for the launch, as one multiply
// (Lemire, Kaser & Kurz 2019: with M = ceil(2^64 / d), floor(a / d) is the high
// word of M * a for every 32-bit a). The host computes M (DropBlockTiles).
struct FastDiv {
    uint64_t magic;  // 0 for d = 1
    uint32_t d;
    __device__ __forceinline__ uint32_t div(uint32_t a) const { return magic ? (uint32_t)__umul64hi(magic, a) : a; }
};

// Where a position stepped by a fixed stride sits in runs of `len` (samples,
// planes): run `n`, offset `pos`, with no division in the loop.
struct RunCursor {
    uint64_t n = 0, pos = 0, len = 1, dn = 0, dpos = 0;
    RunCursor() = default;
    __device__ __forceinline__ RunCursor(uint64_t e, uint64_t stride, uint64_t run_len)
        : n(e / run_len), pos(e % run_len), len(run_len), dn(stride / run_len), dpos(stride % run_len) {}
    __device__ __forceinline__ void step() {
        pos += dpos;
        n += dn;
        if (pos >= len) {
            pos -= len;
            ++n;
        }
    }
};

// A position in the tensor: sample n, channel c, cell of the (n, c) slice.
struct Position {
    uint64_t n, c, cell;
};

// Element e's position in slices of `plane_len` cells, `channels` to a sample.
__device__ __forceinline__ Position position_of(uint64_t e, uint64_t plane_len, uint64_t channels) {
    const uint64_t slice = e / plane_len;
    return Position{slice / channels, slice % channels, e - slice * plane_len};
}

// A fixed stride of elements as a move of (n, c, cell), so that a thread steps its
// position with no division in the loop (the carries need one compare each: the
// moves are under a slice and under C).
struct PositionStep {
    uint64_t dn, dc, dcell, L, C;
    __device__ __forceinline__ PositionStep(uint64_t stride, uint64_t plane_len, uint64_t channels)
        : L(plane_len), C(channels) {
        const uint64_t slices = stride / L;
        dcell = stride - slices * L;
        dn = slices / C;
        dc = slices - dn * C;
    }
    __device__ __forceinline__ Position operator()(Position p) const {
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
    }
};

}  // namespace dropblock
