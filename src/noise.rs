//! Noise fill ([`Fill::Noise`](crate::Fill::Noise)): the standard normal value of
//! each mask unit, a pure function of the call's key and the unit.
//!
//! Unit `b = plane · L + cell` (the mask bit, so units that share a mask plane share
//! their noise) takes word `b mod 4` of the Philox block at counter `offset + 16` of
//! subsequence `⌊b / 4⌋`, keyed by the seed: a counter block no window of the call
//! reads (windows read `offset .. offset + 15`) and that the next call's offset
//! (`+ 17`) passes. Words 0 and 1 make one Box–Muller pair, words 2 and 3 another:
//! `u, v` give `r = √(−2 ln a)` with `a = (⌊u / 2^8⌋ + 1) · 2^-24 ∈ (0, 1]` and the
//! angle `2π · ⌊v / 2^8⌋ · 2^-24`, and the even word takes `r cos`, the odd `r sin`.
//!
//! The logarithm, sine and cosine are this module's own polynomials, evaluated in
//! f32 with correctly rounded operations in a fixed order (no fused multiply-add),
//! as `kernels/noise.cuh` evaluates them with `__fmul_rn` and friends: the CPU and
//! the GPU agree bit for bit, which no libm `logf`/`sinf` pair would. Their error
//! against the exact normal value is a few f32 ulps (tests/behaviour/noise_fill.rs).

use crate::abi;
use crate::rng::RngKey;

/// ln 2 in two parts: the high part has 15 significant bits, so its product with
/// an exponent of at most 24 in magnitude is exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const SQRT2: f32 = std::f32::consts::SQRT_2;
const HALF_PI: f32 = 1.570_796_4;

/// `ln m` for `m` in `[√2/2, √2)`: `2·atanh((m-1)/(m+1))` by its series to `t^13`
/// (`|t| < 0.172`, so the first term left out is below `2^-37`).
fn ln_mantissa(m: f32) -> f32 {
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut p = 0.076_923_08; // 1/13
    for c in [0.090_909_09f32, 0.111_111_11, 0.142_857_15, 0.2, 0.333_333_34] {
        p = c + t2 * p;
    }
    let two_t = t + t;
    two_t + two_t * (t2 * p)
}

/// `ln(k · 2^-24)` for `k` in `1..=2^24`: `k = m · 2^e` with `m` in `[√2/2, √2)`
/// (exact), so that near `k = 2^24` the result is `ln m` alone, with no cancellation.
fn ln_fraction(k: u32) -> f32 {
    let mut e = 31 - k.leading_zeros() as i32;
    let mut m = k as f32 / (1u32 << e) as f32;
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let n = (e - 24) as f32;
    n * LN2_HI + (n * LN2_LO + ln_mantissa(m))
}

/// `(cos a, sin a)` for `a` in `[0, π/2)`, by Taylor polynomials (the first terms
/// left out are below `2^-30`).
fn cos_sin_quarter(a: f32) -> (f32, f32) {
    let a2 = a * a;
    let mut s = -1.605_904_4e-10f32; // -1/13!
    for c in [2.505_210_8e-8f32, -2.755_731_9e-6, 1.984_127e-4, -8.333_334e-3, 0.166_666_67] {
        s = c + a2 * s;
    }
    // sin a = a - a^3/3! + ...: the loop's last coefficient is +1/6 for a sign flip.
    let sin = a - a * (a2 * s);
    let mut c = 1.147_074_6e-11f32; // 1/14!
    for k in [-2.087_675_7e-9f32, 2.755_732e-7, -2.480_158_8e-5, 1.388_888_9e-3, -4.166_666_8e-2, 0.5] {
        c = k + a2 * c;
    }
    let cos = 1.0 - a2 * c;
    (cos, sin)
}

/// `(cos θ, sin θ)` for `θ = 2π · q · 2^-24`, `q < 2^24`: the quadrant from the top
/// two bits, exactly.
fn cos_sin_turn(q: u32) -> (f32, f32) {
    let quarter = (q & 0x3F_FFFF) as f32 * (1.0 / 4_194_304.0); // exact: 22 bits
    let (c, s) = cos_sin_quarter(quarter * HALF_PI);
    match q >> 22 {
        0 => (c, s),
        1 => (-s, c),
        2 => (-c, -s),
        _ => (s, -c),
    }
}

/// The standard normal value of mask unit `unit` under `key`.
pub fn normal(key: RngKey, unit: u64) -> f32 {
    let block = key.block(unit / 4, abi::DROPBLOCK_NOISE_COUNTER_BLOCK);
    let j = (unit % 4) as usize;
    let (u, v) = (block[j & 2], block[(j & 2) + 1]);
    let r = (-2.0 * ln_fraction((u >> 8) + 1)).sqrt();
    let (c, s) = cos_sin_turn(v >> 8);
    r * if j & 1 == 0 { c } else { s }
}

#[cfg(test)]
mod tests {
    /// The polynomials against f64's libm, over their whole domains.
    #[test]
    fn polynomials_are_within_a_few_ulps() {
        for k in (1u32..=1 << 24).step_by(997).chain([1, 2, 3, 1 << 23, (1 << 24) - 1, 1 << 24]) {
            let want = (k as f64 / 16_777_216.0).ln();
            let got = super::ln_fraction(k) as f64;
            assert!((got - want).abs() <= 2.5e-7 * want.abs() + 1e-12, "ln {k}: {got} vs {want}");
        }
        for q in (0u32..1 << 24).step_by(1009).chain([0, 1 << 22, 1 << 23, 3 << 22, (1 << 24) - 1]) {
            let theta = std::f64::consts::TAU * q as f64 / 16_777_216.0;
            let (c, s) = super::cos_sin_turn(q);
            assert!((c as f64 - theta.cos()).abs() <= 3e-7, "cos {q}: {c} vs {}", theta.cos());
            assert!((s as f64 - theta.sin()).abs() <= 3e-7, "sin {q}: {s} vs {}", theta.sin());
        }
    }
}
