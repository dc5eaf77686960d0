//! The element conversions agree with `half`'s bit for bit: every f16 and bf16 to
//! f32, and f32 to both on every value of the upper bits with the lower bits at
//! each rounding boundary (exact, half an ulp and either side, odd and even
//! results), so every exponent, subnormals, overflow, infinities and NaN.

use dropblock::Element;
use half::{bf16, f16};

fn bits<T: Element>(v: T) -> u32 {
    v.to_f32().to_bits()
}

#[test]
fn every_f16_and_bf16_widens_as_half_does() {
    for v in 0..=u16::MAX {
        let (h, b) = (f16::from_bits(v), bf16::from_bits(v));
        assert_eq!(bits(h), h.to_f32().to_bits(), "f16 {v:#06x}");
        assert_eq!(bits(b), b.to_f32().to_bits(), "bf16 {v:#06x}");
    }
}

/// Every f32 with its `upper_bits` high bits taking every value and the rest each
/// of `low`, narrowed by the crate and by `half`.
fn assert_narrows_as_half(upper_bits: u32, low: &[u32], ours: impl Fn(f32) -> u16, half: impl Fn(f32) -> u16) {
    let shift = 32 - upper_bits;
    for f in (0..1u32 << upper_bits).flat_map(|u| low.iter().map(move |&l| f32::from_bits(u << shift | l))) {
        assert_eq!(ours(f), half(f), "{:#010x}", f.to_bits());
    }
}

#[test]
fn f32_narrows_to_bf16_as_half_does() {
    // Bit 16 is the result's lowest, bit 15 the rounding bit, 0-14 sticky.
    let low = [0, 1, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF];
    assert_narrows_as_half(16, &low, |f| <bf16 as Element>::from_f32(f).to_bits(), |f| bf16::from_f32(f).to_bits());
}

#[test]
fn f32_narrows_to_f16_as_half_does() {
    // Normal results round at bit 13 (sticky 0-12); subnormal ones higher, at bits
    // the exhaustive upper part covers.
    let low = [0, 1, 0x0800, 0x0FFF, 0x1000, 0x1001, 0x1800, 0x1FFF];
    assert_narrows_as_half(19, &low, |f| <f16 as Element>::from_f32(f).to_bits(), |f| f16::from_f32(f).to_bits());
}
