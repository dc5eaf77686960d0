//! Every bad input gets its typed error, never a panic.

use dropblock::{cpu, Block, DropBlockConfig, Error, Mode, RngKey, Shape, Sharing};

#[test]
fn block_sizes() {
    assert_eq!(Block::new(0, 3), Err(Error::InvalidBlock { axis: "height", value: 0 }));
    assert_eq!(Block::new(3, 0), Err(Error::InvalidBlock { axis: "width", value: 0 }));
    assert_eq!(Block::from_sizes(&[3, 0, 3]), Err(Error::InvalidBlock { axis: "height", value: 0 }));
    assert_eq!(Block::from_sizes(&[0, 3, 3]), Err(Error::InvalidBlock { axis: "depth", value: 0 }));
    assert_eq!(Block::from_sizes(&[0]), Err(Error::InvalidBlock { axis: "width", value: 0 }));
    assert_eq!(Block::uniform(0), Err(Error::InvalidBlock { axis: "size", value: 0 }));
    assert_eq!(Block::from_sizes(&[]), Err(Error::InvalidRank { what: "block", rank: 0 }));
    assert_eq!(Block::from_sizes(&[1, 2, 3, 4]), Err(Error::InvalidRank { what: "block", rank: 4 }));
    assert_eq!("7".parse::<Block>().unwrap(), Block::uniform(7).unwrap());
    assert_eq!("7x5".parse::<Block>().unwrap(), Block::new(7, 5).unwrap());
    assert_eq!("3x7X5".parse::<Block>().unwrap(), Block::from_sizes(&[3, 7, 5]).unwrap());
    for bad in ["0", "3x0", "x3", "seven", "-1", "", "1x2x3x4", "3x0x3"] {
        assert!(bad.parse::<Block>().is_err(), "{bad:?} must not parse");
    }
    // Display round-trips through FromStr.
    for b in [Block::uniform(5).unwrap(), Block::new(7, 5).unwrap(), Block::from_sizes(&[2, 3, 4]).unwrap()] {
        assert_eq!(b.to_string().parse::<Block>().unwrap(), b);
    }
}

/// A block of one rank on a tensor of another is refused on every path; a uniform
/// block fits every rank.
#[test]
fn block_and_tensor_ranks() {
    let key = RngKey::new(0, 0).unwrap();
    let shapes =
        [Shape::new_1d(1, 2, 9).unwrap(), Shape::new(1, 2, 9, 9).unwrap(), Shape::new_3d(1, 2, 9, 9, 9).unwrap()];
    let blocks = [Block::from_sizes(&[3]).unwrap(), Block::new(3, 3).unwrap(), Block::from_sizes(&[3, 3, 3]).unwrap()];
    for (r, shape) in shapes.iter().enumerate() {
        let x = vec![1f32; shape.numel()];
        let mut y = vec![0f32; shape.numel()];
        for (b, block) in blocks.iter().enumerate() {
            let cfg = DropBlockConfig::builder(*block, 0.5).build().unwrap();
            // Eval and drop_prob 0 draw nothing but refuse what training would.
            let zero = cfg.with_drop_prob(0.0).unwrap();
            for (cfg, mode) in [(cfg, Mode::Train), (cfg, Mode::Eval), (zero, Mode::Train)] {
                let got = cpu::forward(&cfg, *shape, key, mode, &x, &mut y);
                let shard = dropblock::Shard::whole(*shape);
                let sampled = cpu::sample_shard(&cfg, &shard, key, mode).map(|_| ());
                if r == b {
                    assert!(got.is_ok() && sampled.is_ok(), "{shape} {block} {mode:?}");
                } else {
                    let err = got.unwrap_err();
                    let want = Error::BlockRankMismatch { block: b + 1, shape: r + 1 };
                    assert_eq!(err, want, "{shape} {block} {mode:?} drop_prob {}", cfg.drop_prob());
                    assert_eq!(sampled, Err(want), "sample_shard: {shape} {block} {mode:?}");
                    assert!(err.to_string().contains(&format!("a {}D block", b + 1)), "{err}");
                }
            }
        }
        let uniform = DropBlockConfig::paper(3, 0.5).unwrap();
        assert!(cpu::forward(&uniform, *shape, key, Mode::Train, &x, &mut y).is_ok(), "{shape}");
    }
    // `Block::sizes_for` is public: a rank no tensor has is an error, not a panic
    // (or, for a uniform block at rank 0, sizes for no tensor at all).
    for rank in [0, 4, usize::MAX] {
        for block in blocks.iter().chain([&Block::uniform(3).unwrap()]) {
            assert_eq!(block.sizes_for(rank), Err(Error::InvalidRank { what: "tensor", rank }), "{block} {rank}");
        }
    }
    for dims in [&[4usize, 4][..], &[1, 1, 1, 1, 1, 1], &[]] {
        let err = Shape::from_dims(dims).unwrap_err();
        assert!(matches!(err, Error::InvalidRank { what: "tensor", .. }), "{dims:?}: {err}");
    }
    for (dims, name) in [(&[1usize, 1, 0][..], "L"), (&[1, 1, 0, 2, 2], "D"), (&[1, 1, 2, 0, 2], "H")] {
        assert_eq!(Shape::from_dims(dims), Err(Error::ZeroDimension { dim: name }));
    }
    let e = Shape::new_3d(1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::ElementCountOverflow { .. }), "{e}");
    assert!(Shape::new_1d(1, 1, 1 << 40).is_err(), "L over 32 bits");
}

#[test]
fn drop_prob_and_gamma_scale() {
    let b = Block::square(3).unwrap();
    for p in [f64::NAN, -0.01, 1.01, f64::INFINITY] {
        let err = DropBlockConfig::builder(b, p).build().unwrap_err();
        assert!(matches!(err, Error::InvalidDropProb(_)), "{p}: {err}");
        assert!(err.to_string().contains("drop_prob"));
    }
    for p in [0.0, 0.5, 1.0] {
        assert!(DropBlockConfig::builder(b, p).build().is_ok());
    }
    for g in [f64::NAN, -1.0, f64::INFINITY] {
        let err = DropBlockConfig::builder(b, 0.1).gamma_scale(g).build().unwrap_err();
        assert!(matches!(err, Error::InvalidGammaScale(_)), "{g}: {err}");
        assert!(err.to_string().contains("gamma_scale"));
    }
}

#[test]
fn shapes() {
    for (dims, name) in [([0, 1, 1, 1], "N"), ([1, 0, 1, 1], "C"), ([1, 1, 0, 1], "H"), ([1, 1, 1, 0], "W")] {
        let err = Shape::new(dims[0], dims[1], dims[2], dims[3]).unwrap_err();
        assert_eq!(err, Error::ZeroDimension { dim: name });
        assert!(err.to_string().contains(name));
    }
    let big = 1usize << 40;
    let too_large = |dim| Err(Error::DimensionTooLarge { dim, value: big as u64, max: u32::MAX as u64 });
    assert_eq!(Shape::new(big, 1, 1, 1), too_large("N"));
    assert_eq!(Shape::new(1, big, 1, 1), too_large("C"));
    assert_eq!(Shape::new(1, 1, big, 1), too_large("H"));
    assert_eq!(Shape::new(1, 1, 1, big), too_large("W"));
    assert_eq!(Shape::new_1d(1, 1, big), too_large("L"));
    assert_eq!(Shape::new_3d(1, 1, big, 1, 1), too_large("D"));
    let e = Shape::new(1 << 31, 1 << 31, 1 << 31, 1 << 31).unwrap_err();
    assert!(matches!(e, Error::ElementCountOverflow { .. }), "{e}");
    assert!(Shape::new(1 << 20, 1 << 20, 1 << 20, 1 << 20).is_err(), "2^80 elements overflow");
    assert!(Shape::new(256, 2048, 7, 7).is_ok());
}

#[test]
fn buffer_lengths() {
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    let shape = Shape::new(2, 2, 5, 5).unwrap();
    let key = RngKey::new(0, 0).unwrap();
    let x = vec![0f32; 100];
    let mut y = vec![0f32; 100];
    let short = vec![0f32; 99];
    let mut short_mut = vec![0f32; 99];
    assert_eq!(
        cpu::forward(&cfg, shape, key, Mode::Train, &short, &mut y).unwrap_err(),
        Error::LengthMismatch { what: "x", expected: 100, actual: 99 }
    );
    assert_eq!(
        cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut short_mut).unwrap_err(),
        Error::LengthMismatch { what: "y", expected: 100, actual: 99 }
    );
    assert!(matches!(
        cpu::forward_inplace(&cfg, shape, key, Mode::Train, &mut short_mut),
        Err(Error::LengthMismatch { what: "x", .. })
    ));
    // Eval mode validates too.
    assert!(cpu::forward(&cfg, shape, key, Mode::Eval, &short, &mut y).is_err());
    let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let mut dx = vec![0f32; 101];
    // Each buffer by the name its call gives it.
    let what = |r: dropblock::Result<()>| match r {
        Err(Error::LengthMismatch { what, expected: 100, .. }) => what,
        other => panic!("{other:?}"),
    };
    assert_eq!(what(cpu::backward(&saved, &x, &mut dx)), "dx");
    assert_eq!(what(cpu::backward(&saved, &short, &mut y)), "dy");
    assert_eq!(what(cpu::backward_inplace(&saved, &mut short_mut)), "dy");
    assert_eq!(what(cpu::apply(&saved, &x, &mut dx)), "y");
    assert_eq!(what(cpu::apply(&saved, &short, &mut y)), "x");
    assert_eq!(what(cpu::apply_inplace(&saved, &mut short_mut)), "x");
}

/// `Plan::plane_of` is public: a slice past the shape's N or C is an error, not a
/// plane the call does not have (nor, for a large `n`, an overflow).
#[test]
fn plane_of_a_slice_outside_the_shape() {
    use dropblock::sampling::Plan;
    let key = RngKey::new(0, 0).unwrap();
    let shape = Shape::new(3, 5, 9, 9).unwrap();
    for sharing in [Sharing::None, Sharing::Channels, Sharing::Batch, Sharing::All] {
        let cfg = DropBlockConfig::builder(Block::uniform(3).unwrap(), 0.1).sharing(sharing).build().unwrap();
        let plan = Plan::new(&cfg, shape, key).unwrap();
        assert!(plan.plane_of(2, 4).unwrap() < plan.planes(), "{sharing:?}");
        assert_eq!(plan.plane_of(3, 0), Err(Error::OutOfRange { what: "n", value: 3, len: 3 }), "{sharing:?}");
        assert_eq!(plan.plane_of(0, 5), Err(Error::OutOfRange { what: "c", value: 5, len: 5 }), "{sharing:?}");
        let huge = Err(Error::OutOfRange { what: "n", value: usize::MAX as u64, len: 3 });
        assert_eq!(plan.plane_of(usize::MAX, 4), huge, "{sharing:?}");
    }
}

/// The public lookups into a call's mask and windows refuse what the call does not
/// have.
#[test]
fn indices_planes_and_windows_outside_the_call() {
    use dropblock::sampling::Plan;
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    let key = RngKey::new(0, 0).unwrap();
    let shape = Shape::new(2, 3, 9, 10).unwrap();
    let saved = cpu::sample(&cfg, shape, key, Mode::Train).unwrap();
    assert!(saved.is_kept(&[1, 2, 8, 9]).is_ok());
    assert_eq!(saved.is_kept(&[0, 0, 0]), Err(Error::LengthMismatch { what: "index", expected: 4, actual: 3 }));
    for (i, (what, len)) in [("n", 2), ("c", 3), ("spatial 0", 9), ("spatial 1", 10)].into_iter().enumerate() {
        let mut index = [0usize; 4];
        index[i] = len;
        assert_eq!(saved.is_kept(&index), Err(Error::OutOfRange { what, value: len as u64, len: len as u64 }));
    }
    let plan = Plan::new(&cfg, shape, key).unwrap();
    let (planes, windows) = (plan.planes(), plan.windows());
    assert!(plan.seed_plane(planes - 1).is_ok() && plan.window_len(windows - 1).is_ok());
    assert_eq!(
        plan.seed_plane(planes),
        Err(Error::OutOfRange { what: "plane", value: planes as u64, len: planes as u64 })
    );
    assert_eq!(plan.window_len(windows), Err(Error::OutOfRange { what: "window", value: windows, len: windows }));
    assert!(plan.sample_window(0, 1).is_ok() && plan.sample_window(0, 64).is_ok());
    for len in [0, 65, u32::MAX] {
        assert_eq!(plan.sample_window(0, len), Err(Error::InvalidWindowLength(len)));
    }
}

#[test]
fn offsets() {
    let err = RngKey::new(0, u64::MAX - 15).unwrap_err();
    assert!(matches!(err, Error::OffsetOverflow { .. }));
    assert!(err.to_string().contains("offset"));
}

#[test]
fn grow_blocks_buffers() {
    // 10x10 map, 3x3 block, Valid: an 8x8 seed grid (64 cells, one word); the plane
    // is 2 words of 64 bits.
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    let plan =
        dropblock::sampling::Plan::new(&cfg, Shape::new(1, 1, 10, 10).unwrap(), RngKey::new(0, 0).unwrap()).unwrap();
    let mut out = vec![0u64; 2];
    assert_eq!(
        dropblock::mask::grow_blocks(&plan, &[0; 2], &mut out),
        Err(Error::LengthMismatch { what: "seed words", expected: 1, actual: 2 })
    );
    assert_eq!(
        dropblock::mask::grow_blocks(&plan, &[1], &mut [0; 1]),
        Err(Error::LengthMismatch { what: "plane words", expected: 2, actual: 1 })
    );
    // A seed at (y, 0) of every seed row (cells 0, 8, .., 56) drops columns 0..3 of
    // every row.
    let column0 = (0..8).fold(0u64, |w, y| w | 1 << (8 * y));
    assert_eq!(dropblock::mask::grow_blocks(&plan, &[column0], &mut out), Ok(30));
}

/// Shapes that `Shape::new` accepts but no host holds the masks of: a typed error
/// from `cpu::sample`, not a panic or an abort. Both ask for more than a 47-bit
/// address space, so no host's overcommit policy can grant them (a 128 GiB mask
/// could be granted, and then filled, on a large host).
#[test]
fn sampling_too_large_a_shape_is_a_typed_error() {
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    for (n, c, h, w) in [(1usize << 31, 1usize << 31, 1usize, 1usize), (1 << 13, 1, 1 << 20, 1 << 20)] {
        let shape = Shape::new(n, c, h, w).unwrap();
        let err = cpu::sample(&cfg, shape, RngKey::new(0, 0).unwrap(), Mode::Train).unwrap_err();
        assert!(matches!(err, Error::HostAllocation { .. }), "{shape}: {err}");
    }
}

/// A shape whose masks fit but whose per-sample counts do not (2^32 - 1 samples of
/// one cell: 512 MiB of mask bits, 32 GiB of dropped counts at 8 bytes a sample): a typed error, not
/// an abort from an allocation assumed to succeed. The child run of this one test
/// holds its address space to 6 GiB, so the counts cannot be granted.
#[cfg(target_os = "linux")]
#[test]
fn counts_too_large_for_the_host_are_a_typed_error() {
    const NAME: &str = "validation::counts_too_large_for_the_host_are_a_typed_error";
    const CHILD: &str = "DROPBLOCK_TEST_ADDRESS_LIMIT";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            // One worker: many threads' stacks and malloc arenas would take a
            // many-core host's address space toward the limit before the masks.
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && log.contains("1 passed"), "the child run failed ({}):\n{log}", out.status);
        return;
    }
    let limit = libc::rlimit { rlim_cur: 6 << 30, rlim_max: 6 << 30 };
    // SAFETY: setrlimit reads the struct; this process is the child run alone.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
    let shape = Shape::new_1d(u32::MAX as usize, 1, 1).unwrap();
    let cfg = DropBlockConfig::builder(dropblock::Block::uniform(1).unwrap(), 0.1).build().unwrap();
    let err = cpu::sample(&cfg, shape, RngKey::new(0, 0).unwrap(), Mode::Train).unwrap_err();
    // The dropped counts' reservation, past the masks' (which fit).
    assert_eq!(err, Error::HostAllocation { bytes: u32::MAX as u64 * 8 }, "{shape}");
}

/// The exact γ rule sums over the coverage classes of the block and shape; a
/// block of over about 1000 cells a side in 2D is refused with a typed error
/// before anything that size is allocated (a block of 2^32 - 1 cells asked for a
/// 32 GiB histogram and aborted), while one at the limit still plans. With Valid
/// placement, a block of `k` on `2k - 1` cells gives each axis the classes 1..=k.
#[test]
fn exact_rate_with_too_large_a_block_is_a_typed_error() {
    use dropblock::config::{GammaRule, Placement};
    use dropblock::sampling::{expected_drop_fraction, Plan, MAX_COVERAGE_CLASSES};
    let exact = |block: Block, placement| {
        DropBlockConfig::builder(block, 0.1).placement(placement).gamma_rule(GammaRule::ExactRate).build()
    };
    let key = RngKey::new(0, 0).unwrap();
    let huge = u32::MAX as usize;
    for (cfg, shape) in [
        // One axis: a histogram of 2^32 entries.
        (exact(Block::uniform(u32::MAX).unwrap(), Placement::Anywhere).unwrap(), Shape::new_1d(1, 1, huge).unwrap()),
        // Two axes of 1025 classes each: 1025^2, just past 2^20.
        (exact(Block::uniform(1025).unwrap(), Placement::Valid).unwrap(), Shape::new(1, 1, 2049, 2049).unwrap()),
        // Three axes of 102 classes: 102^3 > 2^20, a 3D block of 102 a side.
        (exact(Block::uniform(102).unwrap(), Placement::Valid).unwrap(), Shape::new_3d(1, 1, 203, 203, 203).unwrap()),
    ] {
        let err = Plan::new(&cfg, shape, key).unwrap_err();
        assert!(matches!(err, Error::TooManyCoverageClasses { limit: MAX_COVERAGE_CLASSES, .. }), "{shape}: {err}");
        // Eval plans nothing but refuses what training would, on every CPU entry;
        // at drop_prob 0 training sums nothing (γ = 0), so neither refuses.
        for mode in [Mode::Train, Mode::Eval] {
            let err = cpu::sample(&cfg, shape, key, mode).unwrap_err();
            assert!(matches!(err, Error::TooManyCoverageClasses { .. }), "{shape} {mode:?}: {err}");
            let err = cpu::sample_shard(&cfg, &dropblock::Shard::whole(shape), key, mode).map(|_| ()).unwrap_err();
            assert!(matches!(err, Error::TooManyCoverageClasses { .. }), "sample_shard {shape} {mode:?}: {err}");
        }
        let zero = cfg.with_drop_prob(0.0).unwrap();
        for mode in [Mode::Train, Mode::Eval] {
            assert!(cpu::sample(&zero, shape, key, mode).is_ok(), "{shape} {mode:?} at drop_prob 0");
        }
        // The paper's γ needs no classes; the expected fraction does.
        let paper = cfg.to_builder().gamma_rule(GammaRule::Paper).build().unwrap();
        let plan = Plan::new(&paper, shape, key).unwrap();
        let err = expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap_err();
        assert!(matches!(err, Error::TooManyCoverageClasses { .. }), "{shape}: {err}");
    }
    // 1024 classes on each of two axes: 2^20, the limit itself.
    let cfg = exact(Block::uniform(1024).unwrap(), Placement::Valid).unwrap();
    let plan = Plan::new(&cfg, Shape::new(1, 1, 2047, 2047).unwrap(), key).unwrap();
    let fraction = expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap();
    assert!((fraction - 0.1).abs() < 1e-9, "{fraction}");
}

/// The keep mask is a byte an element, 8x the keep bits a call holds: where the
/// host cannot hold it, a typed error, not an abort (an eval-mode call of 2^62
/// elements holds no bits at all, and one sample's counts).
#[test]
fn a_keep_mask_too_large_for_the_host_is_a_typed_error() {
    let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
    let shape = Shape::new(1, 1 << 20, 1 << 21, 1 << 21).unwrap();
    let saved = cpu::sample(&cfg, shape, RngKey::new(0, 0).unwrap(), Mode::Eval).unwrap();
    let err = saved.keep_mask().unwrap_err();
    assert_eq!(err, Error::HostAllocation { bytes: 1 << 62 });
}
