//! The element types DropBlock runs on. Arithmetic is always f32; the output is
//! rounded back to the element type, to nearest even.

use half::{bf16, f16};

/// Element dtypes.
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
element!(f16, DType::F16, |v| v.to_f32(), |f| f16::from_f32(f));
element!(bf16, DType::BF16, |v| v.to_f32(), |f| bf16::from_f32(f));
