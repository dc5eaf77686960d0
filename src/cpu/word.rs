//! One mask word's elements (up to 64, one bit each): scaled or zeroed, or
//! filled with noise; portably, and in AVX2 lanes without a branch on the bits
//! (whole words, and the 16-bit types' parts of words).

#[cfg(target_arch = "x86_64")]
use crate::dtype::DType;
use crate::dtype::Element;

/// `d = s · factor` (`d = d · factor` without `s`) for up to 64 elements, the
/// factor 0 where `dropped` has the bit and `scale` elsewhere, so NaN, infinities
/// and signed zeros come out exactly as `x · 0` (a kept value times the scale could
/// overflow to infinity, and infinity times 0 is NaN): [`scale_word`] where it
/// runs, else [`scale_then_fix`].
/// With `stream` ([`streams`]), whole words at 16-byte-aligned addresses are
/// written with non-temporal stores.
#[inline(always)]
pub(super) fn scale_group<T: Element>(dropped: u64, scale: f32, s: Option<&[T]>, d: &mut [T], stream: bool) {
    let all = u64::MAX >> (64 - d.len());
    let dropped = dropped & all;
    if scale_word(dropped, scale, s, d, stream) {
        return;
    }
    let (factor, fixups) = match dropped {
        0 => (scale, 0),
        _ if dropped == all => (0.0, 0),
        _ => (scale, dropped),
    };
    scale_then_fix(factor, fixups, s, d)
}

/// [`scale_group`]'s portable form: every element times `factor` in a loop the
/// compiler vectorises, and the `fixups` bits' elements times 0 from their
/// original values: after the loop out of place, before it in place, where the
/// loop then takes them from `x · 0` (±0 or NaN) to `x · 0 · scale`, the same, as
/// the scale is finite and non-negative.
#[inline(always)]
fn scale_then_fix<T: Element>(factor: f32, fixups: u64, s: Option<&[T]>, d: &mut [T]) {
    match s {
        Some(s) => {
            d.iter_mut().zip(s).for_each(|(d, s)| *d = T::from_f32(s.to_f32() * factor));
            times_zero(fixups, Some(s), d);
        }
        None => {
            times_zero(fixups, None, d);
            d.iter_mut().for_each(|d| *d = T::from_f32(d.to_f32() * factor));
        }
    }
}

/// [`scale_group`] without a branch on the word's bits: each element times its
/// own factor, 0 or `scale`, from lane masks of the word (AVX2 and F16C). Words of
/// scattered dropped bits (a channels-last tensor's, whose 64 elements are 64
/// planes; most words at k = 3) then cost what a kept word does, where the loop
/// over the bits paid a mispredicted exit a word, and the 16-bit types convert
/// eight lanes to an instruction (the crate builds for the x86-64 baseline). False,
/// having done nothing, where the CPU lacks the features (or
/// `DROPBLOCK_CPU_CAPABILITY=baseline`) and for f32's parts of words.
#[inline(always)]
fn scale_word<T: Element>(dropped: u64, scale: f32, s: Option<&[T]>, d: &mut [T], stream: bool) -> bool {
    #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
    if T::DTYPE == DType::F32 && !stream && crate::simd::avx512f_available() {
        if let Ok(word) = <&mut [T; 64]>::try_from(&mut *d) {
            let s: Option<&[T; 64]> = s.map(|s| s.try_into().expect("as long as d"));
            // SAFETY: T is f32 (the element trait is sealed, and F32 is f32's dtype);
            // the CPU was just found to have AVX-512F.
            unsafe {
                let (s, d) =
                    (s.map(|s| &*(s as *const [T; 64]).cast::<[f32; 64]>()), &mut *(word as *mut [T; 64]).cast());
                scale_f32_word_avx512(dropped, scale, s, d);
            }
            return true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_has!("avx2", "f16c") {
        // Whole words (all but the ends of runs) with their length known, which
        // the element loops unroll: measured 10-25 % faster than with slices.
        match <&mut [T; 64]>::try_from(&mut *d) {
            // SAFETY: the CPU was just found to have AVX2 and F16C.
            Ok(word) => unsafe {
                scale_word_avx2(dropped, scale, s.map(|s| s.try_into().expect("as long as d")), word, stream)
            },
            // Parts of words in f32 gain nothing from lanes: a shared 7x7 plane's
            // 49 elements, kept or dropped whole, measured 25-35 % slower than in
            // the portable loop.
            Err(_) if T::DTYPE == DType::F32 => return false,
            // SAFETY: as above.
            Err(_) => unsafe { scale_part_avx2(dropped, scale, s, d) },
        }
        return true;
    }
    let _ = (dropped, scale, s, d, stream);
    false
}

/// Output size from which the element passes write whole words with non-temporal
/// stores. An ordinary store first reads its line (read for ownership), so a pass
/// that writes `y` moves three tensors' bytes where a copy (`memcpy`, which streams
/// large copies) moves two: on a 2-core Xeon a 71 MB f32 apply took 1.45x a copy
/// with ordinary stores and 1.0x with streaming ones (2026-12-01). Below this size
/// the output likely stays in the last-level cache for the next layer to read, and
/// streaming it out would cost that layer a trip to memory.
const STREAM_FROM_BYTES: usize = 32 << 20;

/// Whether a pass writing `d` streams its whole words: f32, large enough
/// ([`STREAM_FROM_BYTES`]) and with the AVX2 forms, which hold the stores. Each
/// task that streamed ends with [`fence_streams`].
///
/// Not f16 or bf16: their passes are bound by the lane conversions more than by
/// memory, so streaming saved the apply nothing, and a backward reading a `y` that
/// had been streamed out of the cache took 1.1x (f16) and 1.6–1.7x (bf16) longer
/// (2026-12-01, `docs/cpu-runs/2026-12-01-streaming-stores.md`).
pub(super) fn streams<T: Element>(d: &[T]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == DType::F32 && size_of_val(d) >= STREAM_FROM_BYTES {
        return cpu_has!("avx2", "f16c");
    }
    let _ = d;
    false
}

/// Orders a task's non-temporal stores before whatever follows it: they are weakly
/// ordered, and the thread that joins the task may read `y` next.
pub(super) fn fence_streams() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is in the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

// The SIMD helpers carry their target features themselves, so that each is
// compiled with them even where it is not inlined (one without them, left out of
// line, made every intrinsic a call).

/// The factors of [`scale_word`]: lane `l` of group `g` shifts bit `8g + l` of
/// `dropped` into its sign, which blends 0 over `scale`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn lane_factors(dropped: u64, scale: f32) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let (scale, zero) = (_mm256_set1_ps(scale), _mm256_setzero_ps());
    let to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    std::array::from_fn(|g| {
        let signs = _mm256_sllv_epi32(_mm256_set1_epi32((dropped >> (8 * g)) as i32), to_sign);
        _mm256_blendv_ps(scale, zero, _mm256_castsi256_ps(signs))
    })
}

/// `d = s · factor` (in place without `s`) for f16 or bf16, a group of 8 per
/// factor (`factors.len()` whole groups from the start of `d`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn scale_halves<T: Element>(factors: &[std::arch::x86_64::__m256], s: Option<&[T]>, d: &mut [T]) {
    use std::arch::x86_64::*;
    assert!(size_of::<T>() == 2 && factors.len() * 8 <= d.len() && s.is_none_or(|s| s.len() == d.len()));
    // In place, `src` derives from `dst`, so writes through one do not invalidate
    // the other.
    let dst = d.as_mut_ptr();
    let (src, dst) = (s.map_or(dst as *const T, |s| s.as_ptr()) as *const __m128i, dst as *mut __m128i);
    for (g, f) in factors.iter().enumerate() {
        // SAFETY: 8 two-byte elements (16 bytes) of each, in bounds (asserted),
        // read and written unaligned; in place, each group is read before it is
        // written.
        let x = unsafe { _mm_loadu_si128(src.add(g)) };
        let y = _mm256_mul_ps(widen_halves::<T>(x), *f);
        unsafe { _mm_storeu_si128(dst.add(g), narrow_halves::<T>(y)) };
    }
}

/// [`scale_word`] for a whole word.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn scale_word_avx2<T: Element>(dropped: u64, scale: f32, s: Option<&[T; 64]>, d: &mut [T; 64], stream: bool) {
    if T::DTYPE == DType::BF16 {
        return scale_bf16_word(dropped, scale, s, d);
    }
    let factors = lane_factors(dropped, scale);
    if stream && T::DTYPE == DType::F32 && (d.as_ptr() as usize).is_multiple_of(16) {
        // SAFETY: T is f32 (the element trait is sealed, and F32 is f32's dtype).
        let (s, d) =
            unsafe { (s.map(|s| &*(s as *const [T; 64]).cast::<[f32; 64]>()), &mut *(d as *mut [T; 64]).cast()) };
        return stream_word(&factors, s, d);
    }
    if T::DTYPE != DType::F32 {
        return scale_halves(&factors, s.map(|s| &s[..]), d);
    }
    // SAFETY: [__m256; 8] is 64 f32.
    let factors: [f32; 64] = unsafe { std::mem::transmute(factors) };
    times_factors(&factors, s.map(|s| &s[..]), d);
}

/// [`scale_word_avx2`] for f32 with AVX-512F: the word's bits are the lanes' masks,
/// 16 to a register, so a group's factors are one masked move of the scale (where
/// AVX2 shifts each bit into a sign and blends: 8 broadcasts, shifts and blends a
/// word, whose factors then went through the stack). The output's bytes stay
/// those of `x · factor`. In the cache, where the apply is bound by instructions
/// rather than memory: 8x1024x19x19 (k = 3) on a 2-core EPYC, see docs/PERF.md.
#[cfg(all(target_arch = "x86_64", dropblock_avx512))]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)]
fn scale_f32_word_avx512(dropped: u64, scale: f32, s: Option<&[f32; 64]>, d: &mut [f32; 64]) {
    use std::arch::x86_64::*;
    let scale = _mm512_set1_ps(scale);
    // In place, `src` derives from `dst`, so writes through one do not invalidate
    // the other; each group is read before it is written.
    let dst = d.as_mut_ptr();
    let src = s.map_or(dst as *const f32, |s| s.as_ptr());
    for q in 0..4 {
        let factor = _mm512_maskz_mov_ps(!(dropped >> (16 * q)) as u16, scale);
        // SAFETY: group q's 16 elements lie in the 64 of each array, read and
        // written unaligned.
        unsafe {
            let y = _mm512_mul_ps(_mm512_loadu_ps(src.add(16 * q)), factor);
            _mm512_storeu_ps(dst.add(16 * q), y);
        }
    }
}

/// [`scale_word_avx2`] for bf16, 16 elements a step. Interleaving each 128-bit
/// lane's halves with zeros widens them to f32 in one instruction, in the order
/// elements 0–3 and 8–11 (`lo`), then 4–7 and 12–15 (`hi`); packing `lo` with `hi`
/// after the rounding restores the elements' order, so no lane crosses. The factors
/// are drawn in that order too, and the rounding needs no NaN rule
/// ([`round_product_to_bf16`]). Against the groups of 8 (`scale_halves`), about
/// half the vector instructions: the bf16 pass is bound by them, not by memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scale_bf16_word<T: Element>(dropped: u64, scale: f32, s: Option<&[T; 64]>, d: &mut [T; 64]) {
    use std::arch::x86_64::*;
    assert!(T::DTYPE == DType::BF16);
    let (scale, zero) = (_mm256_set1_ps(scale), _mm256_setzero_si256());
    // Lane l's factor is the bit of its element (31 - shift) moved into the sign.
    let lo_sign = _mm256_setr_epi32(31, 30, 29, 28, 23, 22, 21, 20);
    let hi_sign = _mm256_setr_epi32(27, 26, 25, 24, 19, 18, 17, 16);
    let factor = |bits: __m256i, to_sign: __m256i| {
        _mm256_blendv_ps(scale, _mm256_setzero_ps(), _mm256_castsi256_ps(_mm256_sllv_epi32(bits, to_sign)))
    };
    // In place, `src` derives from `dst`, so writes through one do not invalidate
    // the other; each step's 16 elements are read before they are written.
    let dst = d.as_mut_ptr() as *mut __m256i;
    let src = s.map_or(dst as *const __m256i, |s| s.as_ptr() as *const __m256i);
    for h in 0..4 {
        let bits = _mm256_set1_epi32((dropped >> (16 * h)) as i32);
        // SAFETY: step h's 16 two-byte elements (32 bytes) lie in the 64 of each
        // array, read and written unaligned.
        let x = unsafe { _mm256_loadu_si256(src.add(h)) };
        let lo = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x)), factor(bits, lo_sign));
        let hi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x)), factor(bits, hi_sign));
        let y = _mm256_packus_epi32(round_product_to_bf16(lo), round_product_to_bf16(hi));
        unsafe { _mm256_storeu_si256(dst.add(h), y) };
    }
}

/// [`round_to_bf16`] for a bf16 times a factor (0 or a finite scale), without its
/// NaN rule: such a product is NaN only as the bf16's own NaN made quiet, or as the
/// default NaN of an infinity times 0 (`0xFFC0_0000`), whose lower 16 bits are 0
/// either way, so the bias cannot carry into the exponent and the upper half
/// already has the quiet bit: `(x + 0x7FFF + lowest bit) >> 16` is the NaN rule's
/// result there too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn round_product_to_bf16(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let x = _mm256_castps_si256(y);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    _mm256_srli_epi32::<16>(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))))
}

/// 8 f32 rounded to bf16 as `Element::from_f32`, each in the low half of its
/// 32-bit lane: [`round_product_to_bf16`], and a NaN's upper half made quiet
/// instead (any NaN: the bias could carry its lower bits into the exponent).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn round_to_bf16(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(y, y));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(_mm256_castps_si256(y)), _mm256_set1_epi32(0x40));
    _mm256_blendv_epi8(round_product_to_bf16(y), quiet, nan)
}

/// [`scale_word_avx2`] in f32 with non-temporal stores: the same products (one
/// multiply an element), written 16 bytes at a time without reading `d`'s lines
/// first. `d` is 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn stream_word(factors: &[std::arch::x86_64::__m256; 8], s: Option<&[f32; 64]>, d: &mut [f32; 64]) {
    use std::arch::x86_64::*;
    debug_assert!((d.as_ptr() as usize).is_multiple_of(16));
    // In place, `src` derives from `dst`, so writes through one do not invalidate
    // the other; each group is read before it is written.
    let dst = d.as_mut_ptr();
    let src = s.map_or(dst as *const f32, |s| s.as_ptr());
    for (g, f) in factors.iter().enumerate() {
        // SAFETY: group g's 8 elements lie in the 64 of each array; reads are
        // unaligned, the streaming stores 16-byte aligned as `d` is, at offsets
        // that are multiples of 16 bytes.
        unsafe {
            let y = _mm256_mul_ps(_mm256_loadu_ps(src.add(8 * g)), *f);
            _mm_stream_ps(dst.add(8 * g), _mm256_castps256_ps128(y));
            _mm_stream_ps(dst.add(8 * g + 4), _mm256_extractf128_ps::<1>(y));
        }
    }
}

/// [`scale_word`] for the part of a word at the end of a run (under sharing, a
/// plane's last cells): the 16-bit types' whole groups of 8 in lanes, the rest in
/// the element loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn scale_part_avx2<T: Element>(dropped: u64, scale: f32, s: Option<&[T]>, d: &mut [T]) {
    let factors = lane_factors(dropped, scale);
    let done = if T::DTYPE == DType::F32 { 0 } else { d.len() / 8 * 8 };
    if done > 0 {
        scale_halves(&factors[..done / 8], s, d);
    }
    // SAFETY: [__m256; 8] is 64 f32.
    let factors: [f32; 64] = unsafe { std::mem::transmute(factors) };
    times_factors(&factors[done..], s.map(|s| &s[done..]), &mut d[done..]);
}

/// `d[i] = s[i] · factors[i]` (in place without `s`), in the element loop the
/// compiler vectorises (inlined into the lanes' functions, at their width, and for
/// a whole word with its length known).
#[inline(always)]
fn times_factors<T: Element>(factors: &[f32], s: Option<&[T]>, d: &mut [T]) {
    match s {
        Some(s) => d.iter_mut().zip(s).zip(factors).for_each(|((d, s), f)| *d = T::from_f32(s.to_f32() * f)),
        None => d.iter_mut().zip(factors).for_each(|(d, f)| *d = T::from_f32(d.to_f32() * f)),
    }
}

/// 8 f16 or bf16 to f32: F16C's conversion (which makes a NaN quiet, as
/// `Element::to_f32`), or bf16's upper halves (a signalling NaN stays one here;
/// the multiply after makes it quiet, as `Element::to_f32` does before it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn widen_halves<T: Element>(h: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match T::DTYPE {
        DType::F16 => _mm256_cvtph_ps(h),
        DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))),
        DType::F32 => unreachable!("f32 has no halves"),
    }
}

/// 8 f32 to f16 or bf16 as `Element::from_f32`: F16C's conversion, rounding to
/// nearest even by the immediate (not MXCSR); for bf16 [`round_to_bf16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn narrow_halves<T: Element>(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    match T::DTYPE {
        DType::F16 => _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y),
        DType::BF16 => {
            let r = round_to_bf16(y);
            // packus works within 128-bit lanes: the two packed quarters are 0 and 2.
            _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(r, r)))
        }
        DType::F32 => unreachable!("f32 has no halves"),
    }
}

/// Noise fill for up to 64 elements: `d = s` (kept, unscaled; in place nothing),
/// and `d[i] = noise(i)` for each bit `i` of `dropped`.
#[inline(always)]
pub(super) fn fill_group<T: Element>(dropped: u64, s: Option<&[T]>, d: &mut [T], noise: impl Fn(usize) -> f32) {
    if let Some(s) = s {
        d.copy_from_slice(s);
    }
    let mut bits = dropped & (u64::MAX >> (64 - d.len()));
    while bits != 0 {
        let i = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        d[i] = T::from_f32(noise(i));
    }
}

/// `d[i] = x_i · 0` for each bit `i` of `bits`, `x` from `s`, or in place from `d`.
#[inline(always)]
fn times_zero<T: Element>(mut bits: u64, s: Option<&[T]>, d: &mut [T]) {
    while bits != 0 {
        let i = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let x = s.map_or(d[i], |s| s[i]);
        d[i] = T::from_f32(x.to_f32() * 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[repr(align(64))]
    struct Aligned<T>([T; 80]);

    /// The AVX2 word agrees with the portable form bit for bit: every lane of
    /// words with no, scattered, clustered, single, all-but-one and all dropped
    /// bits, out of place and in place, streamed or not, on values whose product
    /// with 0 or the scale is special (NaN, infinities, signed zeros, overflow).
    fn word_is_the_portable_form<T: Element>() {
        // Each type's own bit patterns: NaN with payloads, either sign and
        // signalling, infinities, signed zeros, subnormals, the largest finite
        // values and values that overflow or round under the scale.
        let raw = |bits: u32| -> T {
            // SAFETY: as many bytes read as T has (2 or 4), from a u16 or a u32.
            unsafe {
                match size_of::<T>() {
                    2 => std::mem::transmute_copy(&(bits as u16)),
                    _ => std::mem::transmute_copy(&bits),
                }
            }
        };
        let patterns: &[u32] = match T::DTYPE {
            DType::F16 => &[0x7E01, 0xFE3F, 0x7C01, 0x7C00, 0xFC00, 0x8000, 0, 0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0x3C01],
            DType::BF16 => &[0x7FC1, 0xFFBF, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0, 0x0001, 0x807F, 0x7F7F, 0xFF7F, 0x3F81],
            DType::F32 => &[
                0x7FC0_0001,
                0xFFBF_FFFF,
                0x7F80_0001,
                0x7F80_0000,
                0xFF80_0000,
                0x8000_0000,
                0,
                1,
                0x807F_FFFF,
                0x7F7F_FFFF,
                0xFF7F_FFFF,
                0x3F80_0001,
            ],
        };
        let x: [T; 64] = std::array::from_fn(|i| match i % 3 {
            0 => raw(patterns[i / 3 % patterns.len()]),
            _ => T::from_f32((i as f32 - 31.5) * 1.37),
        });
        let mut words =
            vec![0, u64::MAX, 1, 1 << 63, u64::MAX - 1, u64::MAX >> 1, 0x00FF_00FF_00FF_00FF, 0x8000_0000_0000_0001];
        let mut z = 0x9E37_79B9_7F4A_7C15u64;
        words.extend((0..64).map(|_| {
            z = z.wrapping_mul(0x5851_F42D_4C95_7F2D).wrapping_add(1442695040888963407);
            z ^ (z >> 29)
        }));
        // The stored patterns: a NaN's quiet bit, payload and sign count.
        let bits = |v: &[T]| {
            v.iter()
                .map(|v| match size_of::<T>() {
                    // SAFETY: T is 2 bytes here.
                    2 => u32::from(unsafe { std::mem::transmute_copy::<T, u16>(v) }),
                    _ => v.to_f32().to_bits(),
                })
                .collect::<Vec<_>>()
        };
        let avx2 = cpu_has!("avx2", "f16c");
        // Without the lanes this checks that they are not taken, and compares nothing.
        crate::simd::skip_form_test(
            "scale_word_is_the_portable_form",
            "AVX2 and F16C",
            avx2,
            avx2, // the AVX2 forms always build: they run where the CPU and capability allow
        );
        // Whole words, and the parts of words at the ends of runs and chunks (the
        // 16-bit lanes' groups of 8 and the elements after the last one).
        for len in 1..=64 {
            let x = &x[..len];
            // Where scale_word must take the lanes: whole words, and parts of words
            // but in f32.
            let lanes = avx2 && (len == 64 || T::DTYPE != DType::F32);
            for &dropped in &words {
                let dropped = dropped & (u64::MAX >> (64 - len));
                for scale in [1.0f32 / 0.9, 3.0e38] {
                    let what = format!("{:?}, {len} elements, dropped {dropped:#018x}, scale {scale}", T::DTYPE);
                    let (mut want, mut got) = (vec![T::default(); len], vec![T::default(); len]);
                    scale_then_fix(scale, dropped, Some(x), &mut want);
                    assert_eq!(scale_word(dropped, scale, Some(x), &mut got, false), lanes, "{what}");
                    let (mut want_in, mut got_in) = (x.to_vec(), x.to_vec());
                    scale_then_fix(scale, dropped, None, &mut want_in);
                    assert_eq!(scale_word(dropped, scale, None, &mut got_in, false), lanes, "{what}");
                    if lanes {
                        assert_eq!(bits(&got), bits(&want), "out of place, {what}");
                        assert_eq!(bits(&got_in), bits(&want_in), "in place, {what}");
                    }
                    if lanes && len == 64 {
                        // The streaming stores (f32 only; the others ignore the
                        // flag), into a 16-byte-aligned word (the pass's own
                        // alignment) and at other element offsets, where the word
                        // falls back to ordinary stores.
                        for offset in [0, 1, 16 / size_of::<T>() - 1, 16 / size_of::<T>()] {
                            let mut buf = Aligned([T::default(); 80]);
                            let word: &mut [T] = &mut buf.0[offset..offset + 64];
                            assert_eq!(scale_word(dropped, scale, Some(x), word, true), lanes, "{what}");
                            fence_streams();
                            assert_eq!(bits(word), bits(&want), "streamed out of place at +{offset}, {what}");
                            word.copy_from_slice(x);
                            assert_eq!(scale_word(dropped, scale, None, word, true), lanes, "{what}");
                            fence_streams();
                            assert_eq!(bits(word), bits(&want_in), "streamed in place at +{offset}, {what}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 lane conversions round as `Element::from_f32` on every value of the
    /// upper bits with the lower ones at each rounding boundary (NaN, signalling
    /// or not, included), and widen every 16-bit pattern as `Element::to_f32`
    /// (up to making a NaN quiet, which the multiply after them does).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_conversions_are_the_elements() {
        use std::arch::x86_64::*;
        // The AVX2 forms always build: they run exactly where the CPU and capability allow.
        let runs = cpu_has!("avx2", "f16c");
        if crate::simd::skip_form_test("lane_conversions_are_the_elements", "AVX2 and F16C", runs, runs) {
            return;
        }
        fn check<T: Element>(low: &[u32]) {
            assert_eq!(size_of::<T>(), 2, "the lanes are for the 16-bit types");
            let values = (0..1u32 << 16).flat_map(|u| low.iter().map(move |&l| u << 16 | l)).collect::<Vec<_>>();
            for lanes in values.chunks_exact(8) {
                // SAFETY: 8 u32 (32 bytes) read, 8 u16 (16 bytes) or 8 u32 written,
                // unaligned.
                let (got, product) = unsafe {
                    let (mut out, mut product) = ([0u16; 8], [0u32; 8]);
                    let y = _mm256_castsi256_ps(_mm256_loadu_si256(lanes.as_ptr() as *const __m256i));
                    _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, narrow_halves::<T>(y));
                    _mm256_storeu_si256(product.as_mut_ptr() as *mut __m256i, round_product_to_bf16(y));
                    (out, product)
                };
                for ((&x, &g), &p) in lanes.iter().zip(&got).zip(&product) {
                    let want = T::from_f32(f32::from_bits(x));
                    // SAFETY: T is a 16-bit element here.
                    let want: u16 = unsafe { std::mem::transmute_copy(&want) };
                    assert_eq!(g, want, "{:?} from {x:#010x}", T::DTYPE);
                    // The products' rounding on its domain: every value but a NaN
                    // that is signalling or has lower bits (no product of a bf16 is).
                    let product_nan = x & 0x40_FFFF == 0x40_0000;
                    if T::DTYPE == DType::BF16 && (!f32::from_bits(x).is_nan() || product_nan) {
                        assert_eq!(p, u32::from(want), "bf16 product rounding from {x:#010x}");
                    }
                }
            }
            for h in (0..=u16::MAX).collect::<Vec<_>>().chunks_exact(8) {
                // SAFETY: 8 u16 (16 bytes) read, 8 f32 (32 bytes) written, unaligned.
                let got: [f32; 8] = unsafe {
                    let mut out = [0f32; 8];
                    _mm256_storeu_ps(
                        out.as_mut_ptr(),
                        widen_halves::<T>(_mm_loadu_si128(h.as_ptr() as *const __m128i)),
                    );
                    out
                };
                for (&h, g) in h.iter().zip(got) {
                    // SAFETY: T is a 16-bit element here.
                    let want = unsafe { std::mem::transmute_copy::<u16, T>(&h) }.to_f32();
                    let quiet = |v: f32| if v.is_nan() { v.to_bits() | 0x40_0000 } else { v.to_bits() };
                    assert_eq!(quiet(g), want.to_bits(), "{:?} {h:#06x}", T::DTYPE);
                }
            }
        }
        // Sticky, rounding and lowest bits of each type's cut (bit 16; bit 13 for
        // f16's normal results, higher for its subnormal ones).
        check::<half::bf16>(&[0, 1, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF]);
        check::<half::f16>(&[0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x4000, 0x8000, 0xFFFF]);
    }

    #[test]
    fn scale_word_is_the_portable_form() {
        word_is_the_portable_form::<f32>();
        word_is_the_portable_form::<bf16>();
        word_is_the_portable_form::<f16>();
    }

    /// The AVX-512F f32 word, which `scale_word` takes where it runs (so the test
    /// above compares it there), called directly: the portable form's bits on
    /// every word of dropped bits above and on values whose product with 0 or the
    /// scale is special (NaN with payloads and signs, infinities, signed zeros,
    /// subnormals, overflow); skipped, saying so, where the form does not run.
    #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
    #[test]
    fn avx512_f32_word_is_the_portable_form() {
        let (runs, expected) =
            (crate::simd::avx512f_available(), crate::simd::avx512_allowed() && cpu_detects!("avx512f"));
        if crate::simd::skip_form_test("avx512_f32_word_is_the_portable_form", "AVX-512F", runs, expected) {
            return;
        }
        let special =
            [0x7FC0_0001u32, 0xFFC0_0000, 0x7F80_0001, 0x7F80_0000, 0xFF80_0000, 0x8000_0000, 0, 1, 0x807F_FFFF];
        let x: [f32; 64] = std::array::from_fn(|i| match i % 3 {
            0 => f32::from_bits(special[i / 3 % special.len()]),
            _ => (i as f32 - 31.5) * 1.37,
        });
        let mut z = 0x2545_F491_4F6C_DD1Du64;
        let words = [0, u64::MAX, 1, 1 << 63, 0x00FF_00FF_00FF_00FF, 0xFFFF_0000_FFFF_0000].into_iter().chain(
            (0..64).map(|_| {
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                z
            }),
        );
        let bits = |v: &[f32; 64]| v.map(f32::to_bits);
        for dropped in words {
            for scale in [1.0f32 / 0.9, 3.0e38] {
                let (mut want, mut got) = ([0f32; 64], [0f32; 64]);
                scale_then_fix(scale, dropped, Some(&x), &mut want);
                // SAFETY: the form runs, so the CPU has AVX-512F.
                unsafe { scale_f32_word_avx512(dropped, scale, Some(&x), &mut got) };
                assert_eq!(bits(&got), bits(&want), "out of place, dropped {dropped:#018x}, scale {scale}");
                let mut in_place = x;
                // SAFETY: as above.
                unsafe { scale_f32_word_avx512(dropped, scale, None, &mut in_place) };
                assert_eq!(bits(&in_place), bits(&want), "in place, dropped {dropped:#018x}, scale {scale}");
            }
        }
    }
}
