// Noise fill: the standard normal value of each mask unit, as src/noise.rs
// specifies it, with the same polynomials evaluated in the same order through
// correctly rounded intrinsics (never a fused multiply-add), so that the CPU and
// the GPU agree bit for bit.
#pragma once

#include "sampling.cuh"

namespace dropblock {

// ln m for m in [sqrt(2)/2, sqrt(2)): 2 atanh((m - 1) / (m + 1)) to t^13.
__device__ __forceinline__ float noise_ln_mantissa(float m) {
    const float t = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    const float t2 = __fmul_rn(t, t);
    float p = 0.07692308f;  // 1/13
    const float c[5] = {0.09090909f, 0.11111111f, 0.14285715f, 0.2f, 0.33333334f};
#pragma unroll
    for (int i = 0; i < 5; ++i) p = __fadd_rn(c[i], __fmul_rn(t2, p));
    const float two_t = __fadd_rn(t, t);
    return __fadd_rn(two_t, __fmul_rn(two_t, __fmul_rn(t2, p)));
}

// ln(k * 2^-24) for k in 1..=2^24, k = m * 2^e with m in [sqrt(2)/2, sqrt(2)); ln 2
// in two parts, the high one exact times the exponent.
__device__ __forceinline__ float noise_ln_fraction(uint32_t k) {
    int e = 31 - __clz(k);
    float m = __fdiv_rn((float)k, (float)(1u << e));
    if (m > 1.4142135f) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float n = (float)(e - 24);
    return __fadd_rn(__fmul_rn(n, 0.69314575f), __fadd_rn(__fmul_rn(n, 1.4286068e-6f), noise_ln_mantissa(m)));
}

// (cos a, sin a) for a in [0, pi/2).
__device__ __forceinline__ void noise_cos_sin_quarter(float a, float& cos_a, float& sin_a) {
    const float a2 = __fmul_rn(a, a);
    float s = -1.6059044e-10f;  // -1/13!
    const float cs[5] = {2.5052108e-8f, -2.7557319e-6f, 1.984127e-4f, -8.333334e-3f, 0.16666667f};
#pragma unroll
    for (int i = 0; i < 5; ++i) s = __fadd_rn(cs[i], __fmul_rn(a2, s));
    sin_a = __fsub_rn(a, __fmul_rn(a, __fmul_rn(a2, s)));
    float c = 1.1470746e-11f;  // 1/14!
    const float cc[6] = {-2.0876757e-9f, 2.755732e-7f, -2.4801588e-5f, 1.3888889e-3f, -4.1666668e-2f, 0.5f};
#pragma unroll
    for (int i = 0; i < 6; ++i) c = __fadd_rn(cc[i], __fmul_rn(a2, c));
    cos_a = __fsub_rn(1.0f, __fmul_rn(a2, c));
}

// The standard normal value of mask unit `unit` under the call's key.
__device__ __forceinline__ float noise_normal(const Key& k, uint64_t unit) {
    const uint4 block = philox_block(k, unit / 4, DROPBLOCK_NOISE_COUNTER_BLOCK);
    const uint32_t j = (uint32_t)(unit % 4);
    const uint32_t u = j < 2 ? block.x : block.z, v = j < 2 ? block.y : block.w;
    const float r = __fsqrt_rn(__fmul_rn(-2.0f, noise_ln_fraction((u >> 8) + 1)));
    const uint32_t q = v >> 8;
    float c, s;
    // The quarter turn's fraction is exact (22 bits); the angle is rounded once.
    noise_cos_sin_quarter(__fmul_rn(__fmul_rn((float)(q & 0x3FFFFFu), 2.3841858e-7f), 1.5707964f), c, s);
    float cos_t, sin_t;
    switch (q >> 22) {
        case 0: cos_t = c; sin_t = s; break;
        case 1: cos_t = -s; sin_t = c; break;
        case 2: cos_t = -c; sin_t = -s; break;
        default: cos_t = s; sin_t = -c;
    }
    return __fmul_rn(r, j & 1 ? sin_t : cos_t);
}

}  // namespace dropblock
