//! Every normalisation mode's scale, recomputed here from the realised keep mask.

use crate::common;

use dropblock::{cpu, Block, DropBlockConfig, GammaRule, Mode, Normalize, Placement, RngKey, Shape, Sharing};

fn config(norm: Normalize, p: f64) -> DropBlockConfig {
    // ExactRate so that p = 1 means γ = 1: every cell dropped.
    DropBlockConfig::builder(Block::new(3, 5).unwrap(), p)
        .normalize(norm)
        .gamma_rule(GammaRule::ExactRate)
        .build()
        .unwrap()
}

fn kept_counts(mask: &[u8], shape: Shape) -> Vec<u64> {
    mask.chunks(shape.c() * shape.plane_len()).map(|s| s.iter().map(|&v| v as u64).sum()).collect()
}

fn run(norm: Normalize, p: f64, shape: Shape, seed: u64) -> (cpu::Saved, Vec<f32>, Vec<f32>) {
    let x = common::input(shape.numel(), seed);
    let mut y = vec![0.0; shape.numel()];
    let saved = cpu::forward(&config(norm, p), shape, RngKey::new(seed, 0).unwrap(), Mode::Train, &x, &mut y).unwrap();
    (saved, x, y)
}

/// Checks y = x · (kept ? scale_n : 0) exactly, with scale_n from `scale_of(n)`.
fn check_output(saved: &cpu::Saved, x: &[f32], y: &[f32], scale_of: impl Fn(usize) -> f32) {
    let shape = saved.shape();
    let mask = saved.keep_mask().unwrap();
    let per_sample = shape.c() * shape.plane_len();
    for i in 0..x.len() {
        let f = if mask[i] == 1 { scale_of(i / per_sample) } else { 0.0 };
        assert_eq!(y[i].to_bits(), (x[i] * f).to_bits(), "element {i}");
    }
}

#[test]
fn global_scale_is_numel_over_kept() {
    let shape = Shape::new(3, 4, 17, 23).unwrap();
    let (saved, x, y) = run(Normalize::Global, 0.2, shape, 1);
    let kept: u64 = kept_counts(&saved.keep_mask().unwrap(), shape).iter().sum();
    assert_eq!(saved.kept(), kept);
    assert!(kept > 0 && kept < shape.numel() as u64, "the test needs some drops: kept {kept}");
    let scale = (shape.numel() as f64 / kept as f64) as f32;
    assert_eq!(saved.scales(), &[scale]);
    check_output(&saved, &x, &y, |_| scale);
}

/// Over more than 2^24 elements the Global scale `numel / kept` must be divided in
/// f64: an f32 division rounds both counts first and can land one ulp off. Keys are
/// tried until the two differ, so the check can fail on an f32 division.
#[test]
fn global_scale_is_divided_in_f64_past_2_pow_24_elements() {
    // Odd counts past 2^24 are not f32 numbers: an f32 division would round both.
    let shape = Shape::new(1, 4_097, 65, 65).unwrap();
    assert!(shape.numel() > 1 << 24 && shape.numel() % 2 == 1);
    let cfg = DropBlockConfig::builder(Block::square(7).unwrap(), 0.02).build().unwrap();
    let numel = shape.numel() as u64;
    for seed in 0..20 {
        let saved = cpu::sample(&cfg, shape, RngKey::new(seed, 0).unwrap(), Mode::Train).unwrap();
        let kept = saved.kept();
        let f64_scale = (numel as f64 / kept as f64) as f32;
        assert_eq!(saved.scales(), &[f64_scale], "seed {seed}: numel {numel}, kept {kept}");
        if numel as f32 / kept as f32 != f64_scale {
            return;
        }
    }
    panic!("no key in 20 gave a kept count where the f32 and f64 divisions differ");
}

#[test]
fn per_sample_scale_uses_each_samples_count() {
    let shape = Shape::new(4, 3, 11, 9).unwrap();
    let (saved, x, y) = run(Normalize::PerSample, 0.3, shape, 2);
    let kept = kept_counts(&saved.keep_mask().unwrap(), shape);
    let want: Vec<f32> = kept.iter().map(|&k| ((shape.c() * shape.plane_len()) as f64 / k as f64) as f32).collect();
    assert_eq!(saved.scales(), &want[..]);
    assert!(want.windows(2).any(|w| w[0] != w[1]), "samples should differ: {want:?}");
    check_output(&saved, &x, &y, |n| want[n]);
}

#[test]
fn expected_scale_is_one_over_keep_prob() {
    let shape = Shape::new(2, 2, 8, 8).unwrap();
    let (saved, x, y) = run(Normalize::Expected, 0.25, shape, 3);
    let scale = (1.0f64 / 0.75) as f32;
    assert_eq!(saved.scales(), &[scale]);
    check_output(&saved, &x, &y, |_| scale);
}

#[test]
fn none_only_zeroes() {
    let shape = Shape::new(2, 2, 8, 8).unwrap();
    let (saved, x, y) = run(Normalize::None, 0.25, shape, 4);
    assert_eq!(saved.scales(), &[1.0]);
    assert!(saved.kept() < shape.numel() as u64);
    check_output(&saved, &x, &y, |_| 1.0);
}

#[test]
fn everything_dropped_gives_zeros_not_nan() {
    // ExactRate at p = 1 drops every cell; the scale must be 0, not inf or NaN.
    for norm in [Normalize::Global, Normalize::PerSample, Normalize::Expected, Normalize::None] {
        let shape = Shape::new(2, 3, 6, 7).unwrap();
        let (saved, _, y) = run(norm, 1.0, shape, 5);
        assert_eq!(saved.kept(), 0, "{norm:?}");
        assert!(y.iter().all(|v| *v == 0.0), "{norm:?}: all outputs must be zero");
        if norm != Normalize::None {
            assert!(saved.scales().iter().all(|s| *s == 0.0), "{norm:?}: {:?}", saved.scales());
        }
    }
}

#[test]
fn shared_planes_drop_the_same_cells() {
    let shape = Shape::new(3, 4, 10, 12).unwrap();
    for (sharing, same) in [
        (Sharing::Channels, (|a: (usize, usize), b: (usize, usize)| a.0 == b.0) as fn(_, _) -> bool),
        (Sharing::Batch, |a, b| a.1 == b.1),
        (Sharing::All, |_, _| true),
        (Sharing::None, |a, b| a == b),
    ] {
        let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.3)
            .sharing(sharing)
            .placement(Placement::Anywhere)
            .build()
            .unwrap();
        let saved = cpu::sample(&cfg, shape, RngKey::new(8, 0).unwrap(), Mode::Train).unwrap();
        let mask = saved.keep_mask().unwrap();
        let slice = |n: usize, c: usize| &mask[(n * shape.c() + c) * shape.plane_len()..][..shape.plane_len()];
        let pairs: Vec<(usize, usize)> = (0..3).flat_map(|n| (0..4).map(move |c| (n, c))).collect();
        // Slices match exactly when they share a mask plane: independent 10x12
        // masks at p = 0.3 coincide with negligible probability.
        for &a in &pairs {
            for &b in &pairs {
                let equal = slice(a.0, a.1) == slice(b.0, b.1);
                assert_eq!(equal, same(a, b), "{sharing:?}: slices {a:?} and {b:?}: equal {equal}");
            }
        }
    }
}
