//! The element types DropBlock runs on. Arithmetic is always f32; the output is
//! rounded back to the element type, to nearest even.

use half::{bf16, f16};

/// Element dtypes. f64 is not one: the arithmetic is f32 (a scale, a product),
/// and DropBlock sits in f32 and mixed-precision networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision (`f32`).
    F32,
    /// IEEE 754 half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
}

crate::config::named_choices! {
    DType { F32 = "f32", F16 = "f16", BF16 = "bf16" }
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(&self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A tensor element: f32, f16 or bf16.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static + sealed::Sealed {
    /// The dtype of this element type.
    const DTYPE: DType;
    /// The value as f32 (exact for every element type).
    fn to_f32(self) -> f32;
    /// Round to nearest even. NaN stays NaN (its payload is not specified).
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($t:ty, $dtype:expr, |$v:ident| $to:expr, |$f:ident| $from:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                let $v = self;
                $to
            }
            #[inline(always)]
            fn from_f32($f: f32) -> Self {
                $from
            }
        }
    };
}

element!(f32, DType::F32, |v| v, |f| f);
element!(f16, DType::F16, |v| f16_to_f32(v.to_bits()), |f| f16::from_bits(f32_to_f16(f)));
element!(bf16, DType::BF16, |v| bf16_to_f32(v.to_bits()), |f| bf16::from_bits(f32_to_bf16(f)));

// The conversions below give `half`'s results bit for bit (tests/behaviour/dtypes.rs), in a
// form the element passes vectorise: selects instead of branches, and no run-time
// feature test per element (`half`'s f16 asks for F16C on every call, which held
// an f16 forward at 15x a copy, its bf16 branches on NaN at 5x; 2026-11-30).

/// bf16 to f32: the upper half, with a NaN made quiet (as `half`).
#[inline(always)]
fn bf16_to_f32(v: u16) -> f32 {
    let quiet = if v & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
    f32::from_bits(((v | quiet) as u32) << 16)
}

/// f32 to bf16, rounded to nearest even: the rounding increment `0x7FFF` plus the
/// result's lowest bit carries into the upper half exactly when the lower half is
/// over half an ulp, or at half with an odd result. NaN keeps its upper half, made
/// quiet.
#[inline(always)]
fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    (if x & 0x7FFF_FFFF > 0x7F80_0000 { (x >> 16) | 0x40 } else { rounded }) as u16
}

/// f16 to f32 (F. Giesen's `half_to_float`): the exponent rebiased, subnormals
/// normalised by an exact f32 subtraction, infinities and NaN (made quiet) to f32's.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    const EXP: u32 = 0x7C00 << 13;
    let magic = f32::from_bits(113 << 23);
    let o = (((h & 0x7FFF) as u32) << 13) + ((127 - 15) << 23);
    let exp = ((h & 0x7C00) as u32) << 13;
    let special = (o + ((128 - 16) << 23)) | if h & 0x03FF != 0 { 0x40_0000 } else { 0 };
    let subnormal = (f32::from_bits(o + (1 << 23)) - magic).to_bits();
    let o = if exp == EXP {
        special
    } else if exp == 0 {
        subnormal
    } else {
        o
    };
    f32::from_bits(o | (((h & 0x8000) as u32) << 16))
}

/// f32 to f16, rounded to nearest even (F. Giesen's `float_to_half_fast3_rtne`):
/// normal results round like [`f32_to_bf16`] at bit 13 (an overflow carries into
/// infinity), subnormal ones by an f32 addition that aligns their bits at the
/// bottom, rounding as the hardware does. NaN keeps its top mantissa bits, made
/// quiet.
#[inline(always)]
fn f32_to_f16(f: f32) -> u16 {
    const INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let x = f.to_bits();
    let (sign, a) = (x & 0x8000_0000, x & 0x7FFF_FFFF);
    let special = if a > INF { 0x7E00 | ((a & 0x7F_FFFF) >> 13) } else { 0x7C00 };
    let subnormal = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC)).to_bits().wrapping_sub(DENORM_MAGIC);
    let normal = a.wrapping_add(((15u32.wrapping_sub(127)) << 23) + 0xFFF + ((a >> 13) & 1)) >> 13;
    let o = if a >= F16_MAX {
        special
    } else if a < 113 << 23 {
        subnormal
    } else {
        normal
    };
    (o | (sign >> 16)) as u16
}
