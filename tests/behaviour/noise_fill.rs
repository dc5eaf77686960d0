//! Noise fill (`Fill::Noise`): dropped units take their mask unit's standard normal
//! value (src/noise.rs specifies it), kept units are copied unscaled, the backward
//! passes the gradient where kept. The values are normal (mean, variance,
//! Kolmogorov–Smirnov) and independent of the mask's own draws.

use crate::common;

use dropblock::noise::normal;
use dropblock::sampling::Plan;
use dropblock::{cpu, Block, DropBlockConfig, Error, Fill, Layout, Mode, Normalize, RngKey, Sharing};
use half::bf16;

/// Φ, through Numerical Recipes' Chebyshev fit `erfcc` (relative error below
/// 1.2e-7): far finer than the tolerances below.
fn phi(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

/// The Kolmogorov–Smirnov distance of `v` from the standard normal.
fn ks(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len() as f64;
    v.iter().enumerate().fold(0.0f64, |d, (i, &x)| {
        let f = phi(x);
        d.max((f - i as f64 / n).abs()).max(((i + 1) as f64 / n - f).abs())
    })
}

/// `P(D > d) <= 2 exp(-2 n d^2)` (Dvoretzky–Kiefer–Wolfowitz, Massart's constant):
/// the distance a correct sampler exceeds with probability FAIL_P.
fn ks_bound(n: usize) -> f64 {
    ((2.0 / common::FAIL_P).ln() / (2.0 * n as f64)).sqrt()
}

/// 7.13 standard deviations: two-sided 1e-12 for a normal statistic.
const Z: f64 = 7.13;

#[test]
fn the_values_are_standard_normal() {
    let key = RngKey::new(0x5EED, 34).unwrap();
    let n = 1 << 20;
    let mut v: Vec<f64> = (0..n as u64).map(|u| normal(key, u) as f64).collect();
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    assert!(mean.abs() <= Z / (n as f64).sqrt(), "mean {mean}");
    assert!((var - 1.0).abs() <= Z * (2.0 / n as f64).sqrt(), "variance {var}");
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x.abs() > 4.0), "tails reached");
    let d = ks(&mut v);
    assert!(d <= ks_bound(n), "KS distance {d} over {n} values (bound {})", ks_bound(n));
    // The four words of a block give four values, not two repeated: pairs differ.
    assert!((0..1000u64).all(|u| normal(key, 4 * u) != normal(key, 4 * u + 2)));
}

/// Known answers from the contract's text (src/noise.rs), computed here in f64 from
/// the Philox block at counter `offset + 16` of subsequence `⌊unit / 4⌋`: the
/// counter is spelled out, not taken from the crate, so noise drawn from a block
/// the mask's windows read (`offset .. offset + 15`) fails here, as would the
/// wrong words, pairing or scaling.
#[test]
fn the_values_are_box_muller_on_counter_block_offset_plus_16() {
    use dropblock::rng::philox4x32_10;
    const TWO_POW_24: f64 = 16_777_216.0;
    let mut checked = 0;
    for (seed, offset) in [(0u64, 0u64), (77, 17), (0xDEAD_BEEF_F00D, 1 << 40), (u64::MAX, RngKey::MAX_OFFSET)] {
        let key = RngKey::new(seed, offset).unwrap();
        let units = (0..64u64).chain([1 << 20, (1 << 33) + 3, u64::MAX - 5]);
        for unit in units {
            let (c, s) = (offset + 16, unit / 4);
            let block = philox4x32_10(
                [c as u32, (c >> 32) as u32, s as u32, (s >> 32) as u32],
                [seed as u32, (seed >> 32) as u32],
            );
            let j = (unit % 4) as usize;
            let (u, v) = (block[j & 2], block[(j & 2) + 1]);
            let a = ((u >> 8) as f64 + 1.0) / TWO_POW_24;
            let r = (-2.0 * a.ln()).sqrt();
            let theta = std::f64::consts::TAU * (v >> 8) as f64 / TWO_POW_24;
            let want = r * if j & 1 == 0 { theta.cos() } else { theta.sin() };
            let got = normal(key, unit) as f64;
            // The crate's polynomials are within a few f32 ulps of f64's libm.
            assert!((got - want).abs() <= 1e-6 * (1.0 + r), "key {key:?}, unit {unit}: {got} vs {want}");
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * 67);
}

#[test]
fn the_values_are_independent_of_the_mask_draws() {
    // The mask's draws for window w are counter blocks offset..offset+15 of
    // subsequence w; noise is block offset+16. Correlate each unit's noise with the
    // first draw of the window of the same number.
    let key = RngKey::new(77, 0).unwrap();
    let n = 1 << 18;
    let (mut sxy, mut sx, mut sy, mut sxx, mut syy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for u in 0..n as u64 {
        let x = normal(key, u) as f64;
        let y = key.draw(u / 4, (u % 4) as u32) as f64 / 4_294_967_296.0;
        (sxy, sx, sy, sxx, syy) = (sxy + x * y, sx + x, sy + y, sxx + x * x, syy + y * y);
    }
    let nf = n as f64;
    let r = (sxy - sx * sy / nf) / ((sxx - sx * sx / nf) * (syy - sy * sy / nf)).sqrt();
    assert!(r.abs() <= Z / nf.sqrt(), "correlation {r} between noise and mask draws");
    // And another call's noise (offset + 17) is not this one's.
    let next = RngKey::new(77, 17).unwrap();
    assert!((0..1000u64).filter(|&u| normal(key, u) == normal(next, u)).count() < 2);
}

fn noise_cfg(block: u32, sharing: Sharing) -> DropBlockConfig {
    DropBlockConfig::builder(Block::uniform(block).unwrap(), 0.3)
        .sharing(sharing)
        .normalize(Normalize::None)
        .fill(Fill::Noise)
        .build()
        .unwrap()
}

/// y = x where kept, the unit's noise where dropped (shared as the mask is), in
/// both layouts and every rank; dx = dy where kept, dy · 0 where dropped; the
/// dropped units' values are standard normal.
#[test]
fn forward_fills_dropped_units_with_their_noise() {
    let mut dropped_values = Vec::new();
    for (i, dims) in [&[4usize, 6, 64][..], &[3, 5, 16, 16], &[2, 3, 5, 8, 8]].iter().enumerate() {
        for sharing in [Sharing::None, Sharing::Channels, Sharing::Batch, Sharing::All] {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let shape = dropblock::Shape::from_dims(dims).unwrap().with_layout(layout);
                let cfg = noise_cfg(3, sharing);
                let key = RngKey::new(i as u64, 17).unwrap();
                let x: Vec<bf16> = common::input(shape.numel(), i as u64).into_iter().map(bf16::from_f32).collect();
                let mut y = vec![bf16::ZERO; x.len()];
                let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
                let plan = Plan::new(&cfg, shape, key).unwrap();
                let mask = saved.keep_mask().unwrap();
                let (c, l) = (shape.c(), shape.plane_len());
                let ctx = format!("{shape} {sharing:?}");
                assert!(mask.contains(&0) && mask.contains(&1), "{ctx}: drops some, keeps some");
                for e in 0..x.len() {
                    let (n, ch, cell) = match layout {
                        Layout::ChannelsFirst => (e / (c * l), e / l % c, e % l),
                        Layout::ChannelsLast => (e / (c * l), e % c, e / c % l),
                    };
                    let unit = (plan.plane_of(n, ch).unwrap() * l + cell) as u64;
                    if mask[e] == 1 {
                        assert_eq!(y[e].to_bits(), x[e].to_bits(), "{ctx}: kept element {e} rescaled");
                    } else {
                        let want = bf16::from_f32(normal(key, unit));
                        assert_eq!(y[e].to_bits(), want.to_bits(), "{ctx}: element {e}");
                        if sharing == Sharing::None && layout == Layout::ChannelsFirst {
                            dropped_values.push(normal(key, unit) as f64);
                        }
                    }
                }
                let dy: Vec<bf16> = common::input(shape.numel(), 99).into_iter().map(bf16::from_f32).collect();
                let mut dx = vec![bf16::ZERO; x.len()];
                cpu::backward(&saved, &dy, &mut dx).unwrap();
                for e in 0..x.len() {
                    let want = if mask[e] == 1 { dy[e] } else { bf16::from_f32(dy[e].to_f32() * 0.0) };
                    assert_eq!(dx[e].to_bits(), want.to_bits(), "{ctx}: dx[{e}]");
                }
                // The two-step API fills too; in place as well.
                let sampled = cpu::sample(&cfg, shape, key, Mode::Train).unwrap();
                let mut y2 = x.clone();
                cpu::apply_inplace(&sampled, &mut y2).unwrap();
                assert_eq!(y2, y, "{ctx}: sample then apply in place");
            }
        }
    }
    let d = ks(&mut dropped_values);
    assert!(dropped_values.len() > 1000);
    assert!(d <= ks_bound(dropped_values.len()), "dropped units' noise: KS {d} over {}", dropped_values.len());
}

#[test]
fn noise_fill_refuses_a_rescaling_normalisation() {
    for norm in [Normalize::Global, Normalize::PerSample, Normalize::Expected] {
        let err = DropBlockConfig::builder(Block::uniform(3).unwrap(), 0.1)
            .normalize(norm)
            .fill(Fill::Noise)
            .build()
            .unwrap_err();
        assert_eq!(err, Error::NoiseWithRescale(norm.name()));
        assert!(err.to_string().contains("normalize `none`"), "{err}");
    }
}
