//! Forward and backward on the CPU: factors, identities, dtypes and in-place calls.

use crate::common;

use dropblock::{cpu, Block, DropBlockConfig, Element, Mode, Placement, RngKey, Shape, Sharing};
use half::{bf16, f16};

fn cfg() -> DropBlockConfig {
    DropBlockConfig::builder(Block::new(4, 3).unwrap(), 0.3).placement(Placement::Anywhere).build().unwrap()
}

fn shape() -> Shape {
    Shape::new(2, 3, 13, 70).unwrap()
}

/// The factor of element i: 0 where dropped, the scale elsewhere.
fn factors(saved: &cpu::Saved) -> Vec<f32> {
    let s = saved.scales()[0];
    saved.keep_mask().unwrap().iter().map(|&k| if k == 1 { s } else { 0.0 }).collect()
}

/// An independent bf16 round-to-nearest-even for finite values.
fn bf16_rne(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn check_dtype<T: Element>(to_bits: impl Fn(T) -> u32) {
    check_call::<T>(&cfg(), shape(), to_bits)
}

/// Forward and backward, out of place and in place, are each element times its
/// factor from the keep mask, in the element type's rounding.
fn check_call<T: Element>(cfg: &DropBlockConfig, shape: Shape, to_bits: impl Fn(T) -> u32) {
    let x: Vec<T> = common::input(shape.numel(), 11).into_iter().map(T::from_f32).collect();
    let dy: Vec<T> = common::input(shape.numel(), 12).into_iter().map(T::from_f32).collect();
    let key = RngKey::new(3, 17).unwrap();
    let mut y = vec![T::default(); shape.numel()];
    let saved = cpu::forward(cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let f = factors(&saved);
    assert!(f.contains(&0.0) && f.iter().any(|&v| v > 1.0), "the test needs drops and a scale > 1");
    for i in 0..x.len() {
        assert_eq!(to_bits(y[i]), to_bits(T::from_f32(x[i].to_f32() * f[i])), "y[{i}]");
    }
    let mut dx = vec![T::default(); shape.numel()];
    cpu::backward(&saved, &dy, &mut dx).unwrap();
    for i in 0..x.len() {
        assert_eq!(to_bits(dx[i]), to_bits(T::from_f32(dy[i].to_f32() * f[i])), "dx[{i}]");
    }
    // In place gives the same bits.
    let mut xy = x.clone();
    let saved2 = cpu::forward_inplace(cfg, shape, key, Mode::Train, &mut xy).unwrap();
    assert!(xy.iter().zip(&y).all(|(a, b)| to_bits(*a) == to_bits(*b)));
    let mut g = dy.clone();
    cpu::backward_inplace(&saved2, &mut g).unwrap();
    assert!(g.iter().zip(&dx).all(|(a, b)| to_bits(*a) == to_bits(*b)));
}

#[test]
fn backward_uses_forwards_factor_in_every_dtype() {
    check_dtype::<f32>(|v| v.to_bits());
    check_dtype::<f16>(|v| v.to_bits() as u32);
    check_dtype::<bf16>(|v| v.to_bits() as u32);
}

/// Outputs of 32 MiB and more are written with streaming stores on CPUs with
/// AVX2: the same bits, with flat runs (every word streams) and with a plane per
/// sample, whose runs start words at every alignment.
#[test]
fn outputs_beyond_the_cache_are_the_same_products() {
    let shape = Shape::new(2, 64, 256, 260).unwrap();
    assert!(shape.numel() * 4 > 32 << 20, "the output must reach the streaming size");
    check_call::<f32>(&cfg(), shape, |v| v.to_bits());
    let shared = DropBlockConfig::builder(Block::new(4, 3).unwrap(), 0.3)
        .placement(Placement::Anywhere)
        .sharing(Sharing::Channels)
        .build()
        .unwrap();
    check_call::<f32>(&shared, Shape::new(2, 64, 257, 259).unwrap(), |v| v.to_bits());
}

#[test]
fn bf16_output_is_f32_product_rounded_to_nearest_even() {
    let shape = shape();
    let x32 = common::input(shape.numel(), 21);
    let x: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut y = vec![bf16::ZERO; shape.numel()];
    let saved = cpu::forward(&cfg(), shape, RngKey::new(9, 0).unwrap(), Mode::Train, &x, &mut y).unwrap();
    let f = factors(&saved);
    for i in 0..x.len() {
        assert_eq!(y[i].to_bits(), bf16_rne(x[i].to_f32() * f[i]), "y[{i}]");
    }
}

#[test]
fn f16_ties_round_to_even() {
    // 1 + 2^-11 lies halfway between f16 1.0 and 1 + 2^-10: it must round to 1.0 (even).
    assert_eq!(<f16 as Element>::from_f32(1.0 + 2f32.powi(-11)).to_bits(), f16::ONE.to_bits());
    // 1 + 3·2^-11 lies halfway between 1 + 2^-10 (odd) and 1 + 2^-9: rounds up.
    assert_eq!(<f16 as Element>::from_f32(1.0 + 3.0 * 2f32.powi(-11)).to_f32(), 1.0 + 2f32.powi(-9));
    // The same ties in bf16 (8 mantissa bits): 1 + 2^-8 rounds to 1, 1 + 3·2^-8 up.
    assert_eq!(<bf16 as Element>::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
    assert_eq!(<bf16 as Element>::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_f32(), 1.0 + 2f32.powi(-6));
    // Products that overflow f16 become inf, as rounding the f32 product says.
    assert!(<f16 as Element>::from_f32(70000.0).to_f32().is_infinite());
}

#[test]
fn eval_mode_and_zero_drop_prob_are_identities() {
    let shape = shape();
    let mut x = common::input(shape.numel(), 31);
    x[5] = f32::from_bits(0x7FC0_1234); // a NaN with a payload must come back as it went in
    let key = RngKey::new(1, 0).unwrap();
    let zero = DropBlockConfig::builder(Block::square(3).unwrap(), 0.0).build().unwrap();
    for (cfg, mode) in [(cfg(), Mode::Eval), (zero, Mode::Train)] {
        let mut y = vec![0.0; shape.numel()];
        let saved = cpu::forward(&cfg, shape, key, mode, &x, &mut y).unwrap();
        assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(saved.kept(), shape.numel() as u64);
        assert!(saved.plan().is_none(), "an identity call draws nothing");
        let mut dx = vec![0.0; shape.numel()];
        cpu::backward(&saved, &x, &mut dx).unwrap();
        assert!(x.iter().zip(&dx).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn same_key_same_mask_new_offset_new_mask() {
    let shape = shape();
    let a = cpu::sample(&cfg(), shape, RngKey::new(5, 0).unwrap(), Mode::Train).unwrap().keep_mask().unwrap();
    let b = cpu::sample(&cfg(), shape, RngKey::new(5, 0).unwrap(), Mode::Train).unwrap().keep_mask().unwrap();
    let c = cpu::sample(&cfg(), shape, RngKey::new(5, 17).unwrap(), Mode::Train).unwrap().keep_mask().unwrap();
    let d = cpu::sample(&cfg(), shape, RngKey::new(6, 0).unwrap(), Mode::Train).unwrap().keep_mask().unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
}

#[test]
fn nan_and_inf_propagate_as_x_times_factor() {
    let shape = Shape::new(1, 1, 12, 12).unwrap();
    let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.5).build().unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| if i % 2 == 0 { f32::INFINITY } else { f32::NAN }).collect();
    let mut y = vec![0.0; shape.numel()];
    let saved = cpu::forward(&cfg, shape, RngKey::new(2, 0).unwrap(), Mode::Train, &x, &mut y).unwrap();
    let mask = saved.keep_mask().unwrap();
    assert!(mask.contains(&0) && mask.contains(&1));
    for (i, &k) in mask.iter().enumerate() {
        if k == 1 && x[i].is_infinite() {
            assert_eq!(y[i], f32::INFINITY, "cell {i}: kept inf");
        } else {
            // NaN · anything, and inf · 0 at a dropped cell, are NaN: a drop does not hide a NaN.
            assert!(y[i].is_nan(), "cell {i}: x {} kept {k} gave {}", x[i], y[i]);
        }
    }
}

/// Values whose product with the scale overflows, negative values and zeros, at
/// dropped and kept cells, out of place and in place: each element is exactly
/// `x · factor` (so a dropped huge value gives ±0, never the NaN of `(x·scale)·0`,
/// and a dropped negative value gives -0).
#[test]
fn huge_negative_and_zero_values_are_x_times_factor() {
    let shape = Shape::new(2, 2, 16, 40).unwrap();
    let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.4).build().unwrap();
    let pattern = [f32::MAX, -f32::MAX, -2.5, 0.0, -0.0, 3.0e38, -1e-45, 7.0];
    let x: Vec<f32> = (0..shape.numel()).map(|i| pattern[i % pattern.len()]).collect();
    let key = RngKey::new(6, 0).unwrap();
    let mut y = vec![0.0; shape.numel()];
    let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let mut in_place = x.clone();
    cpu::forward_inplace(&cfg, shape, key, Mode::Train, &mut in_place).unwrap();
    assert!(saved.scales()[0] > 1.0, "the scale must be able to overflow f32::MAX");
    let f = factors(&saved);
    assert!(f.contains(&0.0) && f.iter().any(|&v| v > 1.0));
    for i in 0..x.len() {
        let want = (x[i] * f[i]).to_bits();
        assert_eq!(y[i].to_bits(), want, "element {i}: x {} factor {} gave {}", x[i], f[i], y[i]);
        assert_eq!(in_place[i].to_bits(), want, "element {i} in place: x {} factor {}", x[i], f[i]);
    }
}

#[test]
fn block_larger_than_the_map_is_clipped() {
    // 3x5 map, 7x7 block: clipped to 3x5, one valid seed cell per plane, so a plane is
    // either wholly dropped or wholly kept.
    let shape = Shape::new(4, 16, 3, 5).unwrap();
    let cfg = DropBlockConfig::paper(7, 0.5).unwrap();
    let saved = cpu::sample(&cfg, shape, RngKey::new(4, 0).unwrap(), Mode::Train).unwrap();
    let plan = saved.plan().unwrap();
    assert_eq!((plan.geometry().kh, plan.geometry().kw), (3, 5));
    assert_eq!((plan.geometry().seed_h, plan.geometry().seed_w), (1, 1));
    assert!((plan.gamma() - 0.5).abs() < 1e-12, "γ = p when the block covers the map");
    let mask = saved.keep_mask().unwrap();
    let planes: Vec<&[u8]> = mask.chunks(15).collect();
    assert!(planes.iter().all(|p| p.iter().all(|&v| v == p[0])));
    assert!(planes.iter().any(|p| p[0] == 0) && planes.iter().any(|p| p[0] == 1));
}
