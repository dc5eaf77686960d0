//! Channels-last tensors (NLC, NHWC, NDHWC) give exactly the channels-first result
//! of the same logical tensor, transposed: y, the keep mask and dx, bit for bit, in
//! every rank, mode, sharing and dtype, in place and out of place, and whichever
//! way the bits reach the tensor's order (by the sampling's tiles, once after the
//! sampling, or a region at a time by the passes; the choice depends on the
//! channels, the sharing and the samples per thread, so each case runs on a pool of
//! its own size).

use crate::common;

use dropblock::{cpu, DropBlockConfig, Element, Layout, Mode, RngKey, Shape, Sharing};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::to_channels_last;

/// One random case on a pool of `threads`; returns where the channels-last call's
/// bits were put in the tensor's order (`Saved::bit_order`).
fn check<T: Element>(rank: usize, rng: &mut StdRng, seed: u64, threads: usize) -> &'static str {
    let sides: &[usize] = match rank {
        1 => &[1, 3, 7, 64, 65, 130],
        2 => &[1, 2, 5, 9, 14, 33],
        _ => &[1, 2, 3, 5, 8],
    };
    let mut dims = common::random_shape_of_rank(rng, rank, 7, 70, sides).dims().to_vec();
    // Whole words of channels take the transpose's aligned stores; others its ORs.
    // From 64 channels on the passes transpose a region of cells at a time (32 Ki
    // elements): large planes take several regions per sample, the last one short.
    if rng.random_bool(0.45) {
        dims[1] = 64 * rng.random_range(1..=2);
        if rng.random_bool(0.5) {
            let large: &[usize] = match rank {
                1 => &[1500],
                2 => &[40, 27],
                _ => &[9, 9, 9],
            };
            dims.truncate(2);
            dims.extend_from_slice(large);
        }
    } else if rng.random_bool(0.2) {
        dims[1] = rng.random_range(65..=200);
    }
    let cf = Shape::from_dims(&dims).unwrap();
    let cfg = common::random_config_of_rank(rng, rank);
    let cfg = if rng.random_bool(0.15) { common::with_noise_fill(&cfg) } else { cfg };
    let key: RngKey = common::random_key(rng);
    let index: Vec<usize> = cf.dims().iter().map(|&d| rng.random_range(0..d)).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let order = pool.install(|| compare::<T>(&cfg, cf, key, seed, &index));
    // Only whole words of channels without sharing, two samples a thread, go
    // through the tiles.
    let tiles =
        cf.c().is_multiple_of(64) && cfg.sharing() == Sharing::None && cf.n() >= 2 * threads && !cfg.is_identity();
    assert_eq!(order == "tiles", tiles, "{cfg} on {cf} on {threads} threads: {order}");
    order
}

/// Forward, backward and the statistics of `cf` and of its channels-last twin;
/// returns where the channels-last call's bits were put in its order.
fn compare<T: Element>(cfg: &DropBlockConfig, cf: Shape, key: RngKey, seed: u64, index: &[usize]) -> &'static str {
    let cl = cf.with_layout(Layout::ChannelsLast);
    let ctx = format!("{cfg} on {cl} {}", T::DTYPE.name());
    let n = cf.numel();
    let x: Vec<T> = common::input(n, seed).into_iter().map(T::from_f32).collect();
    let dy: Vec<T> = common::input(n, seed + 1).into_iter().map(T::from_f32).collect();
    let mut y = vec![T::default(); n];
    let saved = cpu::forward(cfg, cf, key, Mode::Train, &x, &mut y).unwrap();
    let mut dx = vec![T::default(); n];
    cpu::backward(&saved, &dy, &mut dx).unwrap();

    let (x_cl, dy_cl) = (to_channels_last(&x, cf), to_channels_last(&dy, cf));
    let mut y_cl = vec![T::default(); n];
    let saved_cl = cpu::forward(cfg, cl, key, Mode::Train, &x_cl, &mut y_cl).unwrap();
    let mut dx_cl = vec![T::default(); n];
    cpu::backward(&saved_cl, &dy_cl, &mut dx_cl).unwrap();
    let same = |a: &[T], b: &[T]| a.iter().zip(b).all(|(&p, &q)| common::same(p, q));
    assert!(same(&y_cl, &to_channels_last(&y, cf)), "{ctx}: y");
    assert!(same(&dx_cl, &to_channels_last(&dx, cf)), "{ctx}: dx");
    assert_eq!(saved_cl.keep_mask().unwrap(), to_channels_last(&saved.keep_mask().unwrap(), cf), "{ctx}: keep mask");
    assert_eq!((saved_cl.kept(), saved_cl.scales()), (saved.kept(), saved.scales()), "{ctx}: counts");
    // Logical coordinates name the same units in both layouts.
    assert_eq!(saved_cl.is_kept(index), saved.is_kept(index), "{ctx}: is_kept");

    // In place.
    let mut inplace = x_cl.clone();
    let again = cpu::forward_inplace(cfg, cl, key, Mode::Train, &mut inplace).unwrap();
    assert!(same(&inplace, &y_cl), "{ctx}: y in place");
    let mut g = dy_cl;
    cpu::backward_inplace(&again, &mut g).unwrap();
    assert!(same(&g, &dx_cl), "{ctx}: dx in place");
    saved_cl.bit_order()
}

#[test]
fn channels_last_is_channels_first_transposed() {
    let mut rng = StdRng::seed_from_u64(0xC1A57);
    let mut orders = std::collections::HashMap::new();
    for i in 0..240u64 {
        let rank = [2, 1, 3][i as usize % 3];
        let threads = [1, 3, 2, 1, 2][i as usize % 5];
        let order = match i % 3 {
            0 => check::<f32>(rank, &mut rng, i, threads),
            1 => check::<f16>(rank, &mut rng, i, threads),
            _ => check::<bf16>(rank, &mut rng, i, threads),
        };
        *orders.entry(order).or_insert(0) += 1;
    }
    for (order, least) in [("tiles", 10), ("after sampling", 50), ("by region", 10)] {
        let seen = orders.get(order).copied().unwrap_or(0);
        assert!(seen >= least, "{seen} cases with bits ordered '{order}' ({orders:?}): widen the cases");
    }
}

/// Tiles of the sampling of every size: several samples (the last tile short),
/// and one sample over a tile's 2^20 bits.
#[test]
fn channels_last_tiles_of_every_size() {
    let block = |k| DropBlockConfig::builder(dropblock::Block::from_sizes(&[k, k]).unwrap(), 0.2).build().unwrap();
    let cfg_1d = DropBlockConfig::builder(dropblock::Block::from_sizes(&[9]).unwrap(), 0.2).build().unwrap();
    let key = RngKey::new(11, 34).unwrap();
    let cases = [
        // 1 thread: tiles of 3 samples, the last of 1; 2 threads: 2 and 1.
        (block(3), Shape::new(19, 64, 3, 3).unwrap(), [18, 63, 2, 1]),
        (block(2), Shape::new(9, 128, 5, 4).unwrap(), [8, 0, 4, 3]),
        (cfg_1d, Shape::new_1d(5, 128, 8200).unwrap(), [4, 127, 8199, 0]),
    ];
    for (cfg, cf, index) in cases {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let order = pool.install(|| compare::<f32>(&cfg, cf, key, 3, &index[..cf.dims().len()]));
            assert_eq!(order, "tiles", "{cf} on {threads} threads");
        }
    }
    // A sample of 2^22 bits is the largest a tile takes; one more cell goes by region.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    for (len, order) in [(65536, "tiles"), (65537, "by region")] {
        let cl = Shape::new_1d(2, 64, len).unwrap().with_layout(Layout::ChannelsLast);
        let saved = pool.install(|| cpu::sample(&cases[2].0, cl, key, Mode::Train).unwrap());
        assert_eq!(saved.bit_order(), order, "{cl}");
    }
}

#[test]
fn layout_is_part_of_the_shape() {
    let cf = Shape::new(2, 3, 4, 5).unwrap();
    let cl = cf.with_layout(Layout::ChannelsLast);
    assert_ne!(cf, cl);
    assert_eq!(cl.dims(), cf.dims(), "the logical dimensions do not move");
    assert_eq!(cl.physical_dims(), [2, 4, 5, 3]);
    assert_eq!(Shape::new_1d(2, 3, 7).unwrap().with_layout(Layout::ChannelsLast).physical_dims(), [2, 7, 3]);
    assert_eq!(cl.to_string(), "2x3x4x5 channels-last");
    assert_eq!("channels-last".parse::<Layout>(), Ok(Layout::ChannelsLast));
}
