//! Philox4x32-10 exactly as curand computes it, and the (seed, offset) bookkeeping.
//!
//! The GPU kernels call `curand_Philox4x32_10` from `<curand_philox4x32_x.h>`; this is
//! the same function, so the CPU path reproduces every draw bit for bit.

use crate::abi;
use crate::error::{Error, Result};

const PHILOX_W32_0: u32 = 0x9E37_79B9;
const PHILOX_W32_1: u32 = 0xBB67_AE85;
const PHILOX_M4X32_0: u32 = 0xD251_1F53;
const PHILOX_M4X32_1: u32 = 0xCD9E_8D57;

#[inline(always)]
fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mul_hi_lo(PHILOX_M4X32_0, ctr[0]);
    let (hi1, lo1) = mul_hi_lo(PHILOX_M4X32_1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// One Philox4x32-10 block: `curand_Philox4x32_10(counter, key)`.
///
/// Counter words are (x, y, z, w), key words (x, y), as in curand and Random123.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for _ in 0..9 {
        ctr = round(ctr, key);
        key[0] = key[0].wrapping_add(PHILOX_W32_0);
        key[1] = key[1].wrapping_add(PHILOX_W32_1);
    }
    round(ctr, key)
}

/// Philox blocks the CPU sampler draws together: three AVX2 registers of 32-bit
/// lanes ([`philox4x32_10_avx2`]; four measured the same, 2026-12-01).
pub(crate) const LANES: usize = 24;

/// [`LANES`] Philox4x32-10 blocks at once: lane `i` of the result is
/// `philox4x32_10([x[i], y[i], z[i], w[i]], key)` for counters `[x, y, z, w]`. The
/// same arithmetic as [`philox4x32_10`], laid out lane by lane (the form for CPUs
/// without AVX2; it vectorises two products an instruction).
#[inline(always)]
fn philox4x32_10_lanes(mut ctr: [[u32; LANES]; 4], mut key: [u32; 2]) -> [[u32; LANES]; 4] {
    #[allow(clippy::needless_range_loop)] // the lanes of four arrays at once
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W32_0);
            key[1] = key[1].wrapping_add(PHILOX_W32_1);
        }
        for i in 0..LANES {
            let (hi0, lo0) = mul_hi_lo(PHILOX_M4X32_0, ctr[0][i]);
            let (hi1, lo1) = mul_hi_lo(PHILOX_M4X32_1, ctr[2][i]);
            let (y, w) = (ctr[1][i], ctr[3][i]);
            ctr[0][i] = hi1 ^ y ^ key[0];
            ctr[1][i] = lo1;
            ctr[2][i] = hi0 ^ w ^ key[1];
            ctr[3][i] = lo0;
        }
    }
    ctr
}

/// [`philox4x32_10_lanes`] in AVX2 registers, for the counters `(offset, window)`
/// of the [`LANES`] `windows` (a window's first block). AVX2 multiplies 32-bit
/// lanes to 64-bit products only in even lanes, so each Philox product is the low
/// halves (`vpmulld`) plus the high halves of the even lanes' and the odd lanes'
/// (shifted down) products, blended.
///
/// A round is a chain of about 8 cycles (a product, a shift, a blend, an XOR) and
/// only 7 instructions a register, so the lanes are three registers a word, whose
/// independent chains overlap: with one register a word the chain left the core
/// idle for half of each round (sampling 14x14, k = 7: 16 lanes 11 % faster than 8,
/// 24 another 5 %). Three registers' words and the four constants fill the 16
/// YMM registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn philox4x32_10_avx2(offset: u64, windows: &[u64; LANES], mut key: [u32; 2]) -> [[u32; LANES]; 4] {
    use std::arch::x86_64::*;
    const REG: usize = 8;
    #[inline(always)]
    fn mul_hi_lo_8(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
        // SAFETY: called only from philox4x32_10_avx2, which has AVX2.
        unsafe {
            let even = _mm256_mul_epu32(a, m);
            let odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
            let hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0b1010_1010);
            (hi, _mm256_mullo_epi32(a, m))
        }
    }
    // The counters' words: the offset's halves in every lane, and the windows' low
    // and high halves split out of their u64s in registers (built lane by lane
    // through `array::map`, they cost 5 % of the sampling at 14x14, out of line).
    let (x, y) = (_mm256_set1_epi32(offset as i32), _mm256_set1_epi32((offset >> 32) as i32));
    let mut regs: [[__m256i; 4]; LANES / REG] = std::array::from_fn(|r| {
        // SAFETY: windows 8r .. 8r + 8 (two registers of four u64) lie in the array,
        // read unaligned.
        let (a, b) = unsafe {
            let at = windows[r * REG..].as_ptr() as *const __m256i;
            (_mm256_castsi256_ps(_mm256_loadu_si256(at)), _mm256_castsi256_ps(_mm256_loadu_si256(at.add(1))))
        };
        // Per 128-bit lane: [a0, a1, b0, b1] halves, then the quarters put in order.
        let half = |v: __m256| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_castps_si256(v));
        [x, y, half(_mm256_shuffle_ps::<0b10_00_10_00>(a, b)), half(_mm256_shuffle_ps::<0b11_01_11_01>(a, b))]
    });
    let (m0, m1) = (_mm256_set1_epi32(PHILOX_M4X32_0 as i32), _mm256_set1_epi32(PHILOX_M4X32_1 as i32));
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W32_0);
            key[1] = key[1].wrapping_add(PHILOX_W32_1);
        }
        let k0 = _mm256_set1_epi32(key[0] as i32);
        let k1 = _mm256_set1_epi32(key[1] as i32);
        for [x, y, z, w] in regs.iter_mut() {
            let (hi0, lo0) = mul_hi_lo_8(*x, m0);
            let (hi1, lo1) = mul_hi_lo_8(*z, m1);
            // The key is XORed in off the products' chain.
            (*x, *y, *z, *w) = (
                _mm256_xor_si256(hi1, _mm256_xor_si256(*y, k0)),
                lo1,
                _mm256_xor_si256(hi0, _mm256_xor_si256(*w, k1)),
                lo0,
            );
        }
    }
    let mut out = [[0u32; LANES]; 4];
    for (r, words) in regs.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(words) {
            // SAFETY: 32 bytes written into a third of a LANES-u32 array, unaligned.
            unsafe { _mm256_storeu_si256(o[r * REG..].as_mut_ptr() as *mut __m256i, v) };
        }
    }
    out
}

/// Where a call's randomness comes from: the Philox key and the first counter block.
///
/// A call reads counter blocks `offset` through `offset + 15` of every window's
/// subsequence, and noise fill block `offset + 16`, so `offset` may be at most
/// `u64::MAX - 16` ([`RngKey::new`] rejects larger ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RngKey {
    seed: u64,
    offset: u64,
}

impl RngKey {
    /// The largest offset a call accepts.
    pub const MAX_OFFSET: u64 = u64::MAX - abi::DROPBLOCK_COUNTER_BLOCKS_PER_CALL as u64;

    /// The key of a plan made before its call's key is known (cached across calls
    /// with the key replaced), or of a call that draws from a device generator.
    #[cfg(feature = "cuda")]
    pub(crate) const PLACEHOLDER: RngKey = RngKey { seed: 0, offset: 0 };

    /// A key for one call. Errors if `offset + 16` would pass `2^64 - 1`. Calls
    /// whose offsets are less than 17 apart share counter blocks, and so draws:
    /// use a [`Generator`] to step them.
    pub fn new(seed: u64, offset: u64) -> Result<Self> {
        if offset > Self::MAX_OFFSET {
            return Err(Error::OffsetOverflow { offset, max: Self::MAX_OFFSET });
        }
        Ok(Self { seed, offset })
    }

    /// A key from operating-system entropy, offset 0.
    pub fn from_entropy() -> Self {
        Self { seed: rand::random(), offset: 0 }
    }

    /// The Philox key.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The first counter block the call reads, at most [`Self::MAX_OFFSET`].
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// An independent key for stream `stream` (a data-parallel rank, a model
    /// replica): the same offset, and as seed the first two words of
    /// `Philox(counter = (lo(stream), hi(stream), 0xD20BF0C4, 0xD20BF0C4), key =
    /// seed)`. Philox under distinct keys gives unrelated streams, so forks draw
    /// unrelated masks, and none of them is the single-process run's. To reproduce
    /// that run across ranks instead, keep one key and give each rank its samples as
    /// a [`Shard`](crate::Shard) ([`Shard::samples`](crate::Shard::samples)).
    pub fn fork(&self, stream: u64) -> RngKey {
        let w = philox4x32_10(
            [stream as u32, (stream >> 32) as u32, 0xD20B_F0C4, 0xD20B_F0C4],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        RngKey { seed: w[0] as u64 | (w[1] as u64) << 32, offset: self.offset }
    }

    /// Draw `j` (0-based) of window `window`: word `j % 4` of
    /// `Philox(counter = (offset + j/4, window), key = seed)`; the same stream as
    /// `curand_init(seed, window, 4 * offset)` followed by `curand()` calls (for
    /// `offset < 2^62`, where `4 * offset` fits curand's offset).
    #[inline]
    pub fn draw(&self, window: u64, j: u32) -> u32 {
        self.block(window, j / 4)[(j % 4) as usize]
    }

    /// Counter block `offset` (each window's first) of [`LANES`] windows at once:
    /// lane `i` of word `k` is word `k` of `self.block(windows[i], 0)`. With AVX2,
    /// three registers a word ([`philox4x32_10_avx2`]); else the lane-wise form.
    #[inline(always)]
    pub(crate) fn first_blocks(&self, windows: [u64; LANES]) -> [[u32; LANES]; 4] {
        let c = self.offset;
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        #[cfg(target_arch = "x86_64")]
        if cpu_has!("avx2") {
            // SAFETY: the CPU was just found to have AVX2.
            return unsafe { philox4x32_10_avx2(c, &windows, key) };
        }
        let ctr = [
            [c as u32; LANES],
            [(c >> 32) as u32; LANES],
            windows.map(|w| w as u32),
            windows.map(|w| (w >> 32) as u32),
        ];
        philox4x32_10_lanes(ctr, key)
    }

    /// Counter block `offset + b` of `window`'s subsequence. Calls read `b ≤ 16`,
    /// which [`RngKey::new`]'s bound keeps below 2^64; past it the block's number
    /// wraps mod 2^64 (it does not carry into the subsequence, as curand's would).
    #[inline]
    pub fn block(&self, window: u64, b: u32) -> [u32; 4] {
        let c = self.offset.wrapping_add(b as u64);
        philox4x32_10(
            [c as u32, (c >> 32) as u32, window as u32, (window >> 32) as u32],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }
}

/// A (seed, offset) pair that hands out one fresh [`RngKey`] per call, advancing
/// the offset by 17 counter blocks each time, so successive training steps draw
/// independent masks and a run can be replayed from its saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generator {
    seed: u64,
    offset: u64,
}

impl Generator {
    /// A generator for `seed`, starting at offset 0.
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// Resume from a saved state (`seed()`, `offset()`).
    pub fn from_state(seed: u64, offset: u64) -> Self {
        Self { seed, offset }
    }

    /// The seed every key it hands out carries.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The offset of the next key.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The key for the next call. Errors, without advancing, once the offsets run out.
    pub fn next_key(&mut self) -> Result<RngKey> {
        let key = RngKey::new(self.seed, self.offset)?;
        self.offset = self.offset.saturating_add(abi::DROPBLOCK_OFFSET_STRIDE as u64);
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::{philox4x32_10, philox4x32_10_lanes, RngKey, LANES};

    /// The lane-wise blocks the CPU sampler draws LANES at a time are the scalar
    /// blocks, whatever the window (both halves of its 64 bits), key and lane (every
    /// register of the AVX2 form gets its own windows).
    #[test]
    fn first_blocks_are_the_scalar_blocks() {
        const EDGES: [u64; 8] = [0, 1, 7, 8, 0xFFFF_FFFF, 1 << 32, 0x1234_5678_9ABC_DEF0, u64::MAX];
        let windows: [u64; LANES] =
            std::array::from_fn(|i| EDGES[i % 8].wrapping_add((i as u64 / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        for (seed, offset) in [(0, 0), (1, 17), (0xDEAD_BEEF_0123_4567, RngKey::MAX_OFFSET), (u64::MAX, 1 << 40)] {
            let key = RngKey::new(seed, offset).unwrap();
            let lanes = key.first_blocks(windows);
            let ctr = [
                [offset as u32; LANES],
                [(offset >> 32) as u32; LANES],
                windows.map(|w| w as u32),
                windows.map(|w| (w >> 32) as u32),
            ];
            assert_eq!(philox4x32_10_lanes(ctr, [seed as u32, (seed >> 32) as u32]), lanes, "lane-wise form");
            for (i, &w) in windows.iter().enumerate() {
                let scalar = key.block(w, 0);
                assert_eq!([lanes[0][i], lanes[1][i], lanes[2][i], lanes[3][i]], scalar, "window {w}");
                let ctr = [offset as u32, (offset >> 32) as u32, w as u32, (w >> 32) as u32];
                assert_eq!(scalar, philox4x32_10(ctr, [seed as u32, (seed >> 32) as u32]));
            }
        }
    }
}
