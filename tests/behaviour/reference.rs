//! The CPU path against a naive dense reference written here from the crate docs:
//! the contract's seeds (`Plan::seed_plane`, itself checked against an independent
//! implementation in `sampling_contract`) on a dense per-cell grid, each cell
//! dropped when any seed's block covers it (a max-pool by brute force), then the
//! normalisation's formula and `y = x · factor`. Over random shapes, blocks,
//! placements, sharings and normalisations, in f32 and bf16.

use crate::common;

use dropblock::sampling::Plan;
use dropblock::{cpu, Anchor, DropBlockConfig, Element, Mode, Normalize, Placement, RngKey, Shape, Sharing};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The cells `[lo, hi)` along an axis of `size` that the block of a seed at `i`
/// covers, from the docs: Valid `[i, i+kc)`, Anywhere Centered `[i - kc/2, i -
/// kc/2 + kc)` with `kc = min(k, size)`, CenteredRight `[i - (k-1)/2, i + k/2]`
/// with the unclipped `k`, clipped to the map.
fn covers(cfg: &DropBlockConfig, size: i64, k: i64, i: i64, cell: i64) -> bool {
    let kc = k.min(size);
    let (lo, hi) = match (cfg.placement(), cfg.anchor()) {
        (Placement::Valid, _) => (i, i + kc),
        (Placement::Anywhere, Anchor::Centered) => (i - kc / 2, i - kc / 2 + kc),
        (Placement::Anywhere, Anchor::CenteredRight) => (i - (k - 1) / 2, i + k / 2 + 1),
    };
    (lo..hi).contains(&cell)
}

/// The keep mask of every (n, c) slice, in the tensor's order, by brute force over
/// every (cell, seed) pair of each plane.
fn reference_mask(cfg: &DropBlockConfig, shape: Shape, plan: &Plan) -> Vec<u8> {
    let rank = shape.spatial_rank();
    let size: Vec<i64> = shape.dims()[2..].iter().map(|&v| v as i64).collect();
    let block: Vec<i64> = match cfg.block().rank() {
        Some(_) => cfg.block().sizes_for(rank).unwrap()[3 - rank..].iter().map(|&k| k as i64).collect(),
        None => vec![cfg.block().to_string().parse().unwrap(); rank],
    };
    // Seed positions per axis, from the docs.
    let seeds: Vec<i64> = size
        .iter()
        .zip(&block)
        .map(|(&s, &k)| if cfg.placement() == Placement::Valid { s - k.min(s) + 1 } else { s })
        .collect();
    let index = |at: usize, dims: &[i64]| {
        let mut rest = at as i64;
        let mut out = vec![0i64; dims.len()];
        for a in (0..dims.len()).rev() {
            out[a] = rest % dims[a];
            rest /= dims[a];
        }
        out
    };
    let cells: usize = size.iter().product::<i64>() as usize;
    let seed_cells: usize = seeds.iter().product::<i64>() as usize;
    let planes: Vec<Vec<u8>> = (0..plan.planes())
        .map(|p| {
            let words = plan.seed_plane(p).unwrap();
            let seed_list: Vec<Vec<i64>> =
                (0..seed_cells).filter(|&i| words[i / 64] >> (i % 64) & 1 == 1).map(|i| index(i, &seeds)).collect();
            (0..cells)
                .map(|at| {
                    let cell = index(at, &size);
                    let covered =
                        seed_list.iter().any(|s| (0..rank).all(|a| covers(cfg, size[a], block[a], s[a], cell[a])));
                    (!covered) as u8
                })
                .collect()
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

    let plan = Plan::new(cfg, shape, key).unwrap();
    let mask = reference_mask(cfg, shape, &plan);
    assert_eq!(saved.keep_mask().unwrap(), mask, "{ctx}: keep mask");
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

fn random_configs_of_rank(rank: usize, seed: u64, cases: u64, sides: &[usize]) {
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..cases {
        let shape = common::random_shape_of_rank(&mut rng, rank, 3, 4, sides);
        let cfg = common::random_config_of_rank(&mut rng, rank);
        let key = common::random_key(&mut rng);
        if rng.random_bool(0.5) {
            check::<f32>(&cfg, shape, key, i);
        } else {
            check::<bf16>(&cfg, shape, key, i);
        }
    }
}

#[test]
fn random_2d_configs_match_the_dense_reference() {
    random_configs_of_rank(2, 0xD0_2018, 120, &[1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 17, 20]);
}

#[test]
fn random_1d_configs_match_the_dense_reference() {
    random_configs_of_rank(1, 0x1D, 150, &[1, 2, 3, 5, 8, 15, 31, 64, 65, 100, 200]);
}

#[test]
fn random_3d_configs_match_the_dense_reference() {
    random_configs_of_rank(3, 0x3D, 80, &[1, 2, 3, 4, 5, 6, 9]);
}

/// Whatever the pool's size: the CPU path cuts the planes into tiles of about a
/// quarter of a thread's share (src/mask/mod.rs, `tile_planes`), in multiples of
/// the planes that make whole 64-bit words. Planes of 64 cells or a multiple (one
/// plane a word) and N·C up to 256 give 1, 3 and 8 threads different tiles; the
/// masks, scales and outputs must not move.
#[test]
fn any_number_of_threads_matches_the_dense_reference() {
    let mut rng = StdRng::seed_from_u64(0x7EAD);
    let pools: Vec<_> =
        [1, 3, 8].iter().map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).collect();
    for case in 0..12u64 {
        let rank = 1 + case as usize % 3;
        let sides: &[usize] = match rank {
            1 => &[64, 128, 192],
            2 => &[8, 16],
            _ => &[4],
        };
        let mut dims = common::random_shape_of_rank(&mut rng, rank, 4, 1, sides).dims().to_vec();
        dims[1] = [16, 33, 64][case as usize % 3];
        let shape = Shape::from_dims(&dims).unwrap();
        // A plane a slice: sharing would leave too few planes to cut.
        let cfg = loop {
            let cfg = common::random_config_of_rank(&mut rng, rank);
            if cfg.sharing() == Sharing::None {
                break cfg;
            }
        };
        let key = common::random_key(&mut rng);
        for pool in &pools {
            pool.install(|| check::<f32>(&cfg, shape, key, case));
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
