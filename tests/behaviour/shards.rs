//! Sharded calls on the CPU: P shards, each on its own thread, reproduce the
//! unsharded call bit for bit once their counts are summed.

use crate::common;

use common::{input, placement, random_config_of_rank, random_grid, random_shape_of_rank, same, with_noise_fill};
use dropblock::{cpu, Block, DropBlockConfig, Error, Layout, Mode, Normalize, RngKey, Shape, Shard, ShardCounts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a sharded run reassembles: y, dx and the keep mask in the global layout,
/// the summed counts and the shards' kept elements.
struct Reassembled {
    y: Vec<f32>,
    dx: Vec<f32>,
    keep: Vec<u8>,
    counts: ShardCounts,
    kept: u64,
    /// Where each shard's bits were put in its order (`Saved::bit_order`).
    orders: Vec<&'static str>,
}

/// Runs forward and backward on every shard, one thread each: sample (on a rayon
/// pool of `threads` if given, else the global one), sum the counts (the
/// in-process reduction), finish, apply and backward.
fn run_sharded(
    cfg: &DropBlockConfig,
    shards: &[Shard],
    key: RngKey,
    (x, dy): (&[f32], &[f32]),
    threads: Option<usize>,
) -> Reassembled {
    let global = shards[0].global();
    let sample = |shard| cpu::sample_shard(cfg, shard, key, Mode::Train);
    let sampled: Vec<cpu::ShardSample> = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .iter()
            .map(|shard| {
                s.spawn(move || match threads {
                    Some(t) => {
                        rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap().install(|| sample(shard))
                    }
                    None => sample(shard),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let mut counts = ShardCounts::from_entries(global, vec![0; ShardCounts::len_for(global)]).unwrap();
    for s in &sampled {
        counts.add(s.counts()).unwrap();
    }
    let mut out = Reassembled {
        y: vec![f32::NAN; global.numel()],
        dx: vec![f32::NAN; global.numel()],
        keep: vec![7; global.numel()],
        counts: counts.clone(),
        kept: 0,
        orders: Vec::new(),
    };
    let parts: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = sampled
            .into_iter()
            .zip(shards)
            .map(|(sample, shard)| {
                let counts = &counts;
                s.spawn(move || {
                    let saved = sample.finish(counts).unwrap();
                    let map = placement(shard);
                    let n = shard.local().numel();
                    let (mut lx, mut ldy) = (vec![0.0f32; n], vec![0.0f32; n]);
                    for &(l, g) in &map {
                        lx[l] = x[g];
                        ldy[l] = dy[g];
                    }
                    let (mut ly, mut ldx) = (vec![0.0f32; n], vec![0.0f32; n]);
                    cpu::apply(&saved, &lx, &mut ly).unwrap();
                    cpu::backward(&saved, &ldy, &mut ldx).unwrap();
                    (map, ly, ldx, saved.keep_mask().unwrap(), (saved.kept(), saved.bit_order()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (map, ly, ldx, lkeep, (kept, order)) in parts {
        for (l, g) in map {
            out.y[g] = ly[l];
            out.dx[g] = ldx[l];
            out.keep[g] = lkeep[l];
        }
        out.kept += kept;
        out.orders.push(order);
    }
    out
}

/// Compares a sharded run with the unsharded call of `cfg` on `global`.
fn check(cfg: &DropBlockConfig, shards: &[Shard], key: RngKey, what: &str) {
    check_on(cfg, shards, key, what, None);
}

/// [`check`], the shards sampling on rayon pools of `threads`; returns where each
/// shard's bits were put in its order.
fn check_on(
    cfg: &DropBlockConfig,
    shards: &[Shard],
    key: RngKey,
    what: &str,
    threads: Option<usize>,
) -> Vec<&'static str> {
    let global = shards[0].global();
    let x = input(global.numel(), key.seed() ^ 1);
    let dy = input(global.numel(), key.seed() ^ 2);
    let mut y = vec![0.0f32; global.numel()];
    let saved = cpu::forward(cfg, global, key, Mode::Train, &x, &mut y).unwrap();
    let mut dx = vec![0.0f32; global.numel()];
    cpu::backward(&saved, &dy, &mut dx).unwrap();
    let got = run_sharded(cfg, shards, key, (&x, &dy), threads);
    let bad = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(&a, &b)| !same(a, b));
    assert_eq!(bad(&got.y, &y), None, "{what}: y differs");
    assert_eq!(bad(&got.dx, &dx), None, "{what}: dx differs");
    assert!(got.keep == saved.keep_mask().unwrap(), "{what}: keep mask differs");
    assert_eq!(got.kept, saved.kept(), "{what}: kept elements");
    assert_eq!(got.counts.total(), saved.kept(), "{what}: summed total");
    got.orders
}

/// Channels-last shards whose local shapes take the sampling's tiles (whole words
/// of channels without sharing, two local samples a thread): data, channel and
/// spatial shards and their product, each reproducing the unsharded call.
#[test]
fn channels_last_shards_through_the_tiles() {
    let global = Shape::new(6, 128, 9, 9).unwrap().with_layout(Layout::ChannelsLast);
    let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.2).build().unwrap();
    // (first, extent) pieces along N, C and H.
    type Pieces = &'static [(usize, usize)];
    let cuts: [[Pieces; 3]; 4] = [
        [&[(0, 4), (4, 2)], &[(0, 128)], &[(0, 9)]],
        [&[(0, 6)], &[(0, 64), (64, 64)], &[(0, 9)]],
        [&[(0, 6)], &[(0, 128)], &[(0, 4), (4, 5)]],
        [&[(0, 3), (3, 3)], &[(0, 64), (64, 64)], &[(0, 2), (2, 7)]],
    ];
    for (i, [n, c, h]) in cuts.into_iter().enumerate() {
        let mut shards = Vec::new();
        for &(n0, nn) in n {
            for &(c0, cc) in c {
                for &(h0, hh) in h {
                    shards.push(Shard::new(global, &[n0, c0, h0, 0], &[nn, cc, hh, 9]).unwrap());
                }
            }
        }
        let what = format!("cut {i}, {} shards", shards.len());
        let orders = check_on(&cfg, &shards, RngKey::new(77, i as u64).unwrap(), &what, Some(1));
        assert!(orders.iter().all(|&o| o == "tiles"), "{what}: {orders:?}");
    }
}

#[test]
fn random_grids_reproduce_the_unsharded_call() {
    let mut rng = StdRng::seed_from_u64(0x5_4A2D);
    for case in 0..160 {
        let rank = 1 + case % 3;
        let sides: &[usize] = if rank == 3 { &[1, 2, 4, 7, 9] } else { &[1, 2, 3, 5, 8, 13, 17, 30, 70] };
        let mut global = random_shape_of_rank(&mut rng, rank, 3, 4, sides);
        if rng.random_bool(0.3) {
            global = global.with_layout(Layout::ChannelsLast);
            // From 64 channels on, the CPU passes transpose the planes' bits a region
            // of cells at a time; smaller sides keep these cases quick.
            if rng.random_bool(0.35) {
                let mut dims = global.dims().to_vec();
                dims[1] = [64, 70][rng.random_range(0..2)];
                dims[2..].iter_mut().for_each(|d| *d = (*d).min(17));
                global = Shape::from_dims(&dims).unwrap().with_layout(Layout::ChannelsLast);
            }
        }
        let mut cfg = random_config_of_rank(&mut rng, rank);
        if rng.random_bool(0.15) {
            cfg = with_noise_fill(&cfg);
        }
        let shards = random_grid(&mut rng, global, 3);
        let key = RngKey::new(rng.random(), rng.random_range(0..1000)).unwrap();
        check(&cfg, &shards, key, &format!("case {case}: {cfg} on {global}, {} shards", shards.len()));
    }
}

/// Every normalisation, on spatial shards thinner than the block and blocks that
/// cross two shard edges, over planes of more than 64 seed cells (windows cut
/// inside a plane) and of fewer (windows of several planes).
#[test]
fn thin_spatial_shards_in_every_normalisation() {
    for (global, block) in [
        (Shape::new(3, 5, 40, 37).unwrap(), Block::new(7, 5).unwrap()),
        (Shape::new(4, 6, 9, 9).unwrap(), Block::square(7).unwrap()),
        (Shape::new_1d(2, 3, 300).unwrap(), Block::uniform(9).unwrap()),
        (Shape::new_3d(2, 2, 6, 11, 13).unwrap(), Block::from_sizes(&[3, 5, 4]).unwrap()),
    ] {
        let r = global.spatial_rank();
        // Widths 1, 2, 3, ... along the last axis: every cut is inside a block.
        let w = *global.dims().last().unwrap();
        let mut shards = Vec::new();
        let (mut at, mut step) = (0, 1);
        while at < w {
            let e = step.min(w - at);
            let mut o = vec![0; 2 + r];
            let mut ext = global.dims().to_vec();
            *o.last_mut().unwrap() = at;
            *ext.last_mut().unwrap() = e;
            shards.push(Shard::new(global, &o, &ext).unwrap());
            at += e;
            step += 1;
        }
        for normalize in [Normalize::Global, Normalize::PerSample, Normalize::Expected, Normalize::None] {
            let cfg = DropBlockConfig::builder(block, 0.3).normalize(normalize).build().unwrap();
            check(&cfg, &shards, RngKey::new(91, 34).unwrap(), &format!("{global} {block} {normalize:?}"));
        }
    }
}

#[test]
fn channel_shared_masks_stay_one_per_sample_across_channel_shards() {
    let global = Shape::new(3, 8, 12, 12).unwrap();
    let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.2)
        .sharing(dropblock::Sharing::Channels)
        .normalize(Normalize::PerSample)
        .build()
        .unwrap();
    let shards: Vec<Shard> = [(0, 3), (3, 1), (4, 4)]
        .iter()
        .map(|&(o, e)| Shard::new(global, &[0, o, 0, 0], &[3, e, 12, 12]).unwrap())
        .collect();
    check(&cfg, &shards, RngKey::new(5, 0).unwrap(), "channel shards");
}

/// Rank r of R, with the shared key and samples [r·B, (r+1)·B), draws the
/// single-process masks of the global batch, whatever R.
#[test]
fn data_parallel_ranks_reproduce_the_global_batch() {
    let b = 3;
    for ranks in [1, 2, 4] {
        let global = Shape::new(ranks * b, 4, 14, 14).unwrap();
        for normalize in [Normalize::Global, Normalize::PerSample] {
            let cfg = DropBlockConfig::builder(Block::square(5).unwrap(), 0.15).normalize(normalize).build().unwrap();
            let shards: Vec<Shard> = (0..ranks).map(|r| Shard::samples(global, r * b, b).unwrap()).collect();
            check(&cfg, &shards, RngKey::new(2024, 17).unwrap(), &format!("{ranks} ranks, {normalize:?}"));
        }
        // PerSample needs no reduction across ranks: a rank's own counts give the
        // same scales as the global sum.
        let cfg =
            DropBlockConfig::builder(Block::square(5).unwrap(), 0.15).normalize(Normalize::PerSample).build().unwrap();
        let key = RngKey::new(2024, 17).unwrap();
        let whole = cpu::sample(&cfg, global, key, Mode::Train).unwrap();
        assert_eq!(whole.shard(), &Shard::whole(global));
        // Each sample's kept elements, counted from the unsharded call's mask.
        let mask = whole.keep_mask().unwrap();
        let sample_len = global.numel() / global.n();
        let kept: Vec<u64> = mask.chunks(sample_len).map(|s| s.iter().map(|&k| k as u64).sum()).collect();
        for r in 0..ranks {
            let shard = Shard::samples(global, r * b, b).unwrap();
            let sample = cpu::sample_shard(&cfg, &shard, key, Mode::Train).unwrap();
            let own = sample.counts().clone();
            // A rank's counts: its own samples' kept elements, zeros elsewhere, and their sum.
            let mut want = vec![0; global.n()];
            want[r * b..(r + 1) * b].copy_from_slice(&kept[r * b..(r + 1) * b]);
            assert_eq!(own.per_sample(), &want[..], "rank {r} of {ranks}");
            assert_eq!(own.total(), want.iter().sum::<u64>(), "rank {r} of {ranks}");
            own.check(global).unwrap();
            let saved = sample.finish(&own).unwrap();
            assert_eq!(saved.shard(), &shard);
            assert_eq!(saved.scales(), &whole.scales()[r * b..(r + 1) * b], "rank {r} of {ranks}");
        }
    }
}

#[test]
fn forked_keys_are_distinct_and_reproducible() {
    let key = RngKey::new(77, 170).unwrap();
    let forks: Vec<RngKey> = (0..64).map(|r| key.fork(r)).collect();
    for (r, f) in forks.iter().enumerate() {
        assert_eq!(f.offset(), 170);
        assert_eq!(*f, key.fork(r as u64), "fork {r} is a function of the key and the stream");
        assert_ne!(f.seed(), key.seed());
    }
    let mut seeds: Vec<u64> = forks.iter().map(|f| f.seed()).collect();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), 64, "distinct streams give distinct keys");
    assert_ne!(RngKey::new(78, 170).unwrap().fork(0), key.fork(0), "the fork depends on the seed");
    // Forks draw different masks from the key they came from.
    let cfg = DropBlockConfig::paper(3, 0.3).unwrap();
    let shape = Shape::new(2, 4, 16, 16).unwrap();
    let a = cpu::sample(&cfg, shape, key, Mode::Train).unwrap().keep_mask().unwrap();
    let b = cpu::sample(&cfg, shape, key.fork(1), Mode::Train).unwrap().keep_mask().unwrap();
    assert_ne!(a, b);
}

#[test]
fn bad_shards_and_counts_are_typed_errors() {
    let global = Shape::new(2, 3, 8, 8).unwrap();
    assert!(matches!(
        Shard::new(global, &[0, 0, 4, 0], &[2, 3, 5, 8]),
        Err(Error::InvalidShard { axis: "spatial 0", offset: 4, extent: 5, len: 8 })
    ));
    assert!(matches!(Shard::new(global, &[0, 0, 0, 0], &[2, 0, 8, 8]), Err(Error::InvalidShard { axis: "C", .. })));
    assert!(matches!(
        Shard::new(global, &[usize::MAX, 0, 0, 0], &[2, 3, 8, 8]),
        Err(Error::InvalidShard { axis: "N", .. })
    ));
    assert!(matches!(
        Shard::new(global, &[0, 0, 0], &[2, 3, 8]),
        Err(Error::LengthMismatch { what: "shard offset", expected: 4, actual: 3 })
    ));
    assert!(matches!(
        Shard::new(global, &[0, 0, 0, 0], &[2, 3, 8, 8, 1]),
        Err(Error::LengthMismatch { what: "shard extent", expected: 4, actual: 5 })
    ));
    assert!(matches!(Shard::samples(global, 1, 2), Err(Error::InvalidShard { axis: "N", .. })));
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    let shard = Shard::new(global, &[1, 0, 2, 0], &[1, 3, 6, 8]).unwrap();
    assert_eq!(shard.local(), Shape::new(1, 3, 6, 8).unwrap());
    let sample = cpu::sample_shard(&cfg, &shard, RngKey::new(1, 0).unwrap(), Mode::Train).unwrap();
    let wrong = ShardCounts::from_entries(Shape::new(5, 3, 8, 8).unwrap(), vec![0; 16]).unwrap();
    assert!(matches!(
        sample.finish(&wrong),
        Err(Error::LengthMismatch { what: "shard counts", expected: 7, actual: 16 })
    ));
    assert!(matches!(
        ShardCounts::from_entries(global, vec![0; 5]),
        Err(Error::LengthMismatch { what: "shard counts", expected: 7, actual: 5 })
    ));
}

/// The coverage tags of every sample of `global`, whole: those of an identity
/// call on the whole tensor (a sum over its elements' weights).
fn whole_tags(global: Shape) -> Vec<u64> {
    let cfg = DropBlockConfig::paper(1, 0.1).unwrap();
    let key = RngKey::new(1, 0).unwrap();
    cpu::sample_shard(&cfg, &Shard::whole(global), key, Mode::Eval).unwrap().counts().tags().to_vec()
}

fn impossible(e: Result<(), Error>) -> bool {
    matches!(e, Err(Error::ImpossibleShardCounts(_)))
}

/// Counts that no shards of the global shape can give (a faulty reduction, the
/// counts of another shape with the same N, a sample covered past its elements)
/// are refused, where they gave a wrong scale without a sign; so are one shard's
/// counts where the scale divides by every shard's.
#[test]
fn impossible_shard_counts_are_typed_errors() {
    let global = Shape::new(2, 1, 4, 4).unwrap();
    let tags = whole_tags(global);
    let with_tags = |mut counts: Vec<u64>| {
        counts.extend(&tags);
        counts
    };
    // More kept than a sample's 16 elements; a total that is not the samples' sum;
    // a sample covered past its 16 elements (a shard counted twice); more kept
    // than covered.
    for entries in [
        vec![1000, 1000, 0, 16, 16],
        vec![4096, 2048, 2048, 16, 16],
        vec![17, 17, 0, 16, 16],
        vec![5, 1, 2, 16, 16],
        vec![3, 1, 1, 16, 16],
        vec![2, 1, 1, 24, 16],
        vec![3, 1, 2, 16, 1],
    ] {
        let entries = with_tags(entries);
        assert!(impossible(ShardCounts::from_entries(global, entries.clone()).map(|_| ())), "{entries:?}");
    }
    // The counts of a 2x8x16x16 tensor handed to a shard of 2x1x4x4 by `finish`.
    let cfg = DropBlockConfig::builder(dropblock::Block::uniform(3).unwrap(), 0.1)
        .normalize(dropblock::Normalize::PerSample)
        .build()
        .unwrap();
    let shard = Shard::samples(global, 0, 1).unwrap();
    let sample = cpu::sample_shard(&cfg, &shard, RngKey::new(1, 0).unwrap(), Mode::Train).unwrap();
    let other = Shape::new(2, 8, 16, 16).unwrap();
    let other =
        ShardCounts::from_entries(other, [vec![4096, 2048, 2048, 2048, 2048], whole_tags(other)].concat()).unwrap();
    assert!(impossible(sample.clone().finish(&other).map(|_| ())), "counts of another shape");
    // This shard holds sample 0 whole: its own counts finish its PerSample scale
    // (data-parallel ranks need no reduction), and everything kept does.
    assert_eq!(sample.counts().covered(), [16, 0]);
    sample.clone().finish(sample.counts()).unwrap();
    sample.clone().finish(&ShardCounts::from_entries(global, with_tags(vec![32, 16, 16, 16, 16])).unwrap()).unwrap();
    // A shard of half of sample 0's rows: its own counts are possible (some
    // shards' sum) but cover 8 of the sample's 16 elements, so a PerSample or
    // Global scale from them (the reduction skipped, or a shard missing from it)
    // is refused. Expected and None do not divide by the counts and take them.
    let half = Shard::new(global, &[0, 0, 0, 0], &[1, 1, 2, 4]).unwrap();
    let key = RngKey::new(1, 0).unwrap();
    for normalize in [dropblock::Normalize::PerSample, dropblock::Normalize::Global] {
        let cfg = cfg.to_builder().normalize(normalize).build().unwrap();
        let part = cpu::sample_shard(&cfg, &half, key, Mode::Train).unwrap();
        assert_eq!(part.counts().covered(), [8, 0]);
        assert!(impossible(part.clone().finish(part.counts()).map(|_| ())), "{normalize:?}: one shard's counts");
    }
    // Sample 0 whole and sample 1 not: enough for this shard's PerSample scale,
    // not for a Global one.
    let one = ShardCounts::from_entries(global, with_tags(vec![20, 16, 4, 16, 8])).unwrap();
    one.check_covered(global, 0..1).unwrap();
    assert!(impossible(one.check_covered(global, 0..2)));
    assert_eq!(one.check_covered(global, 1..3), Err(Error::OutOfRange { what: "n", value: 3, len: 2 }));
    for normalize in [dropblock::Normalize::Expected, dropblock::Normalize::None] {
        let cfg = cfg.to_builder().normalize(normalize).build().unwrap();
        let part = cpu::sample_shard(&cfg, &half, key, Mode::Train).unwrap();
        part.clone().finish(part.counts()).unwrap();
    }
    // Counts past u64 (which made `add` overflow) are among the refused ones.
    let past = with_tags(vec![u64::MAX, 1, 2, 16, 16]);
    assert!(impossible(ShardCounts::from_entries(global, past).map(|_| ())));
}

/// A reduction that counts a shard twice and misses another of as many elements
/// covers every sample by its `C·L` elements, but not each element once: the
/// coverage tags say so, and a scale that divides by the counts is refused. Shards
/// of equal size are the usual split, so this is the likely fault (a rank's buffer
/// sent twice), including the pattern a sum of positions misses (on a 2x2 grid
/// of shards, the two on one diagonal counted twice and the other two missed).
#[test]
fn a_shard_counted_twice_for_a_missing_one_is_refused() {
    let global = Shape::new(2, 2, 6, 8).unwrap();
    let key = RngKey::new(9, 0).unwrap();
    // A 2x2 grid over (C, H) of both samples; `grid[i]` is (c, h) block i.
    let grid: Vec<Shard> = [(0, 0), (0, 3), (1, 0), (1, 3)]
        .iter()
        .map(|&(c, h)| Shard::new(global, &[0, c, h, 0], &[2, 1, 3, 8]).unwrap())
        .collect();
    for normalize in [Normalize::Global, Normalize::PerSample] {
        let cfg = DropBlockConfig::builder(Block::square(3).unwrap(), 0.2).normalize(normalize).build().unwrap();
        let sampled: Vec<_> = grid.iter().map(|s| cpu::sample_shard(&cfg, s, key, Mode::Train).unwrap()).collect();
        let sum = |picks: &[usize]| {
            let mut counts = ShardCounts::from_entries(global, vec![0; ShardCounts::len_for(global)]).unwrap();
            picks.iter().for_each(|&i| counts.add(sampled[i].counts()).unwrap());
            counts
        };
        let right = sum(&[0, 1, 2, 3]);
        assert_eq!(right.tags(), whole_tags(global), "the four shards' tags sum to the whole samples'");
        sampled[0].clone().finish(&right).unwrap();
        for picks in [[0, 0, 2, 3], [0, 1, 2, 2], [0, 0, 3, 3], [1, 1, 2, 2]] {
            let counts = sum(&picks);
            assert_eq!(counts.covered(), [96, 96], "{picks:?}: every sample covered by its C·L");
            // Possible counts (some shards' sum), but not every shard once.
            counts.check(global).unwrap();
            assert!(impossible(counts.check_covered(global, 0..2)), "{normalize:?} {picks:?}");
            assert!(impossible(sampled[0].clone().finish(&counts).map(|_| ())), "{normalize:?} {picks:?}");
        }
    }
}

/// `ShardCounts::add` refuses counts of another length and a sum past u64 (four
/// shards' counts of a 2^62-element tensor, each possible alone), and leaves the
/// counts as they were.
#[test]
fn adding_shard_counts_refuses_what_does_not_add_up() {
    let global = Shape::new(1, 1 << 30, 1 << 16, 1 << 16).unwrap();
    let whole = ShardCounts::from_entries(global, vec![1 << 62; 4]).unwrap();
    let mut sum = whole.clone();
    for _ in 0..2 {
        sum.add(&whole).unwrap();
    }
    assert_eq!(sum.entries(), [3 << 62; 4]);
    let before = sum.clone();
    assert!(matches!(sum.add(&whole), Err(Error::ImpossibleShardCounts(_))));
    assert_eq!(sum, before, "a refused add changes nothing");
    let other = ShardCounts::from_entries(Shape::new(2, 1, 4, 4).unwrap(), vec![0; 7]).unwrap();
    assert_eq!(sum.add(&other), Err(Error::LengthMismatch { what: "shard counts", expected: 4, actual: 7 }));
    assert_eq!(sum, before);
    // Tags are sums modulo 2^64: they wrap where counts may not.
    let mut tags = ShardCounts::from_entries(global, vec![0, 0, 0, u64::MAX]).unwrap();
    tags.add(&ShardCounts::from_entries(global, vec![0, 0, 0, 2]).unwrap()).unwrap();
    assert_eq!(tags.entries(), [0, 0, 0, 1]);
}

/// Eval mode and p = 0 are the identity on a shard, with counts of everything kept.
#[test]
fn identity_calls_on_a_shard() {
    let global = Shape::new(3, 2, 5, 5).unwrap();
    let shard = Shard::new(global, &[1, 0, 0, 2], &[2, 2, 5, 3]).unwrap();
    for (cfg, mode) in
        [(DropBlockConfig::paper(3, 0.2).unwrap(), Mode::Eval), (DropBlockConfig::paper(3, 0.0).unwrap(), Mode::Train)]
    {
        let sample = cpu::sample_shard(&cfg, &shard, RngKey::new(3, 0).unwrap(), mode).unwrap();
        let tag = sample.counts().tags()[1];
        assert_eq!(sample.counts().entries(), &[60, 0, 30, 30, 0, 30, 30, 0, tag, tag]);
        assert!(tag != 0 && tag != whole_tags(global)[0], "a part's tag is not the whole sample's");
        let saved = sample.clone().finish(sample.counts()).unwrap();
        let x = input(60, 9);
        let mut y = vec![0.0; 60];
        cpu::apply(&saved, &x, &mut y).unwrap();
        assert_eq!(x, y);
    }
}
