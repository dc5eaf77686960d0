//! The CPU path against a naive dense reference written here from the crate docs:
//! the contract's seeds (`Plan::seed_plane`, itself checked against an independent
//! implementation in `sampling_contract`) on a dense per-cell grid, each cell
//! dropped when any seed's block covers it (a max-pool by brute force), then the
//! normalisation's formula and `y = x · factor`. Over random shapes, blocks,
//! placements, sharings and normalisations, in f32 and bf16.

mod common;

use dropblock::sampling::Plan;
use dropblock::{cpu, DropBlockConfig, Element, Mode, Normalize, RngKey, Shape, Sharing};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The keep mask of every (n, c) slice, NCHW, by brute force.
fn reference_mask(cfg: &DropBlockConfig, shape: Shape, plan: &Plan) -> Vec<u8> {
    let g = plan.geometry();
    let (h, w) = (shape.h() as i64, shape.w() as i64);
    let (sh, sw) = (g.seed_h as i64, g.seed_w as i64);
    // Blocks clipped to the map; Anywhere anchors a block's top-left ⌊k/2⌋ before its seed.
    let (kh, kw) = (cfg.block().height.min(shape.h() as u32) as i64, cfg.block().width.min(shape.w() as u32) as i64);
    let (ay, ax) = (g.anchor_y as i64, g.anchor_x as i64);
    let planes: Vec<Vec<u8>> = (0..plan.planes())
        .map(|p| {
            let words = plan.seed_plane(p).unwrap();
            let seed = |y: i64, x: i64| {
                let i = (y * sw + x) as usize;
                words[i / 64] >> (i % 64) & 1 == 1
            };
            let mut keep = vec![1u8; (h * w) as usize];
            for r in 0..h {
                for c in 0..w {
                    // Seeds (y, x) whose block rows [y - ay, y - ay + kh) hold r, likewise columns.
                    let covered = (r + ay - kh + 1..=r + ay)
                        .filter(|&y| (0..sh).contains(&y))
                        .any(|y| (c + ax - kw + 1..=c + ax).filter(|&x| (0..sw).contains(&x)).any(|x| seed(y, x)));
                    if covered {
                        keep[(r * w + c) as usize] = 0;
                    }
                }
            }
            keep
        })
        .collect();
    let mut mask = Vec::with_capacity(shape.numel());
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            let p = match cfg.sharing() {
                Sharing::None => n * shape.c() + c,
                Sharing::Channels => n,
                Sharing::Batch => c,
                Sharing::All => 0,
            };
            mask.extend_from_slice(&planes[p]);
        }
    }
    mask
}

/// The scale of each sample, from the docs' formulas.
fn reference_scales(cfg: &DropBlockConfig, shape: Shape, mask: &[u8]) -> Vec<f32> {
    let per_sample = shape.c() * shape.plane_len();
    let kept: Vec<u64> = mask.chunks(per_sample).map(|s| s.iter().map(|&k| k as u64).sum()).collect();
    let ratio = |num: u64, k: u64| if k == 0 { 0.0 } else { (num as f64 / k as f64) as f32 };
    match cfg.normalize() {
        Normalize::Global => vec![ratio(shape.numel() as u64, kept.iter().sum()); shape.n()],
        Normalize::PerSample => kept.iter().map(|&k| ratio(per_sample as u64, k)).collect(),
        Normalize::Expected => {
            vec![if cfg.drop_prob() >= 1.0 { 0.0 } else { (1.0 / (1.0 - cfg.drop_prob())) as f32 }; shape.n()]
        }
        Normalize::None => vec![1.0; shape.n()],
    }
}

fn check<T: Element>(cfg: &DropBlockConfig, shape: Shape, key: RngKey, seed: u64) {
    let ctx = format!("{cfg:?} {shape} {key:?} {}", T::DTYPE.name());
    let x: Vec<T> = common::input(shape.numel(), seed).into_iter().map(T::from_f32).collect();
    let dy: Vec<T> = common::input(shape.numel(), seed + 1).into_iter().map(T::from_f32).collect();
    let mut y = vec![T::default(); shape.numel()];
    let saved = cpu::forward(cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let mut dx = vec![T::default(); shape.numel()];
    cpu::backward(&saved, &dy, &mut dx).unwrap();

    let plan = Plan::new(cfg, shape, key);
    let mask = reference_mask(cfg, shape, &plan);
    assert_eq!(saved.keep_mask(), mask, "{ctx}: keep mask");
    assert_eq!(saved.kept(), mask.iter().map(|&k| k as u64).sum::<u64>(), "{ctx}: kept count");
    let scales = reference_scales(cfg, shape, &mask);
    let per_sample = shape.c() * shape.plane_len();
    let got: Vec<f32> = (0..shape.n()).map(|n| saved.scales()[if saved.scales().len() == 1 { 0 } else { n }]).collect();
    assert_eq!(got, scales, "{ctx}: scales");
    for i in 0..shape.numel() {
        let f = if mask[i] == 1 { scales[i / per_sample] } else { 0.0 };
        assert!(common::same(y[i], T::from_f32(x[i].to_f32() * f)), "{ctx}: y[{i}]");
        assert!(common::same(dx[i], T::from_f32(dy[i].to_f32() * f)), "{ctx}: dx[{i}]");
    }
}

#[test]
fn random_configs_match_the_dense_reference() {
    let mut rng = StdRng::seed_from_u64(0xD0_2018);
    const SIDES: &[usize] = &[1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 17, 20];
    for i in 0..120u64 {
        let shape = common::random_shape(&mut rng, 3, 4, SIDES);
        let cfg = common::random_config(&mut rng);
        let key = common::random_key(&mut rng);
        if rng.random_bool(0.5) {
            check::<f32>(&cfg, shape, key, i);
        } else {
            check::<bf16>(&cfg, shape, key, i);
        }
    }
}

#[test]
fn eval_and_zero_drop_prob_are_the_identity() {
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..20u64 {
        let shape = common::random_shape(&mut rng, 3, 4, &[1, 5, 9, 16]);
        let cfg = common::random_config(&mut rng);
        let key = common::random_key(&mut rng);
        let x = common::input(shape.numel(), i);
        for (cfg, mode) in [(cfg, Mode::Eval), (cfg.with_drop_prob(0.0).unwrap(), Mode::Train)] {
            let mut y = vec![0.0f32; shape.numel()];
            let saved = cpu::forward(&cfg, shape, key, mode, &x, &mut y).unwrap();
            assert!(y.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()), "{cfg:?} {mode:?}");
            assert_eq!(saved.kept(), shape.numel() as u64);
            let mut dx = vec![0.0f32; shape.numel()];
            cpu::backward(&saved, &x, &mut dx).unwrap();
            assert_eq!(dx, x);
        }
    }
}
