//! The CUDA path against the CPU oracle, bit for bit: keep mask, kept count,
//! scales, y and dx, in f32, f16 and bf16, over random shapes and every mode.
//!
//! These tests need a GPU. Without one they are reported as ignored, with the
//! reason; with `DROPBLOCK_REQUIRE_GPU=1` (self-hosted GPU runners) they fail.

mod common;

use libtest_mimic::Arguments;

fn main() {
    let args = Arguments::from_args();
    let require = common::gpu_required();
    let (trials, unavailable) = gpu::trials();
    let trials = match unavailable {
        None => trials,
        Some(why) => {
            let why = if require { format!("DROPBLOCK_REQUIRE_GPU=1 but {why}") } else { why };
            trials.into_iter().map(|t| common::cannot_run(t.name(), why.clone(), require)).collect()
        }
    };
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use libtest_mimic::Trial;

    pub fn trials() -> (Vec<Trial>, Option<String>) {
        let t = Trial::test("gpu_parity", || Ok(()));
        (vec![t], Some("dropblock was built without the `cuda` feature".into()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{sys, CudaGraph, CudaStream};
    use dropblock::cuda::{CudaElement, DeviceGenerator, DropBlockCuda};
    use dropblock::sampling::Plan;
    use dropblock::{cpu, Block, DropBlockConfig, Element, Layout, Mode, Normalize, RngKey, Shape, Shard};
    use half::{bf16, f16};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use libtest_mimic::{Failed, Trial};

    use super::common;

    /// `DROPBLOCK_PARITY_QUICK=1`: fewer and smaller cases, for runs under
    /// compute-sanitizer, and no NCCL (its init probes kernels it has no image
    /// for, and memcheck reports each probe as an API error: H200, 2026-11-30).
    fn quick() -> bool {
        std::env::var("DROPBLOCK_PARITY_QUICK").is_ok_and(|v| v == "1")
    }

    type Gpu = (DropBlockCuda, Arc<CudaStream>);

    /// Held for reading by every test, and for writing by the one that fills the
    /// device's memory, so that no other test runs out of memory beside it.
    static DEVICE: std::sync::RwLock<()> = std::sync::RwLock::new(());
    type GpuTest = (&'static str, fn(&Gpu));

    /// Every GPU test, and why none can run here (if so).
    pub fn trials() -> (Vec<Trial>, Option<String>) {
        let gpu = DropBlockCuda::new(0).inspect(|d| {
            // cudarc's per-buffer events would make captured graphs wait on events
            // recorded outside the capture; like candle, run without them. Every
            // test owns its buffers and its stream, so nothing needs them.
            // SAFETY: no buffer is shared across streams in these tests.
            unsafe { d.context().disable_event_tracking() };
        });
        let tests: [GpuTest; 16] = [
            // First: it holds the device for writing, and a writer waiting behind
            // the long tests would hold back every reader (std's RwLock on Linux
            // favours a waiting writer).
            ("out_of_device_memory_is_a_typed_error", out_of_device_memory_is_a_typed_error),
            (
                "shards_on_their_own_streams_match_the_unsharded_call",
                shards_on_their_own_streams_match_the_unsharded_call,
            ),
            ("past_2_pow_31_elements_matches_cpu", past_2_pow_31_elements_matches_cpu),
            ("every_launch_path_matches_cpu", every_launch_path_matches_cpu),
            ("sampling_alone_then_apply_matches_forward", sampling_alone_then_apply_matches_forward),
            ("counters_are_reset_by_the_kernels", counters_are_reset_by_the_kernels),
            ("device_sampler_matches_cpu", device_sampler_matches_cpu),
            ("random_configs_match_cpu_in_every_dtype", random_configs_match_cpu_in_every_dtype),
            ("large_shapes_match_cpu", large_shapes_match_cpu),
            ("eval_mode_and_zero_drop_prob_copy", eval_mode_and_zero_drop_prob_copy),
            ("graph_captured_forward_matches_cpu", graph_captured_forward_matches_cpu),
            ("graph_captured_shard_calls_draw_afresh", graph_captured_shard_calls_draw_afresh),
            ("a_capture_waits_on_no_stream_outside_it", a_capture_waits_on_no_stream_outside_it),
            ("older_driver_entry_points_agree", older_driver_entry_points_agree),
            ("two_streams_at_once", two_streams_at_once),
            ("bad_calls_are_typed_errors", bad_calls_are_typed_errors),
        ];
        // Only "no GPU" (Error::is_no_gpu) skips; any other error (a module that
        // does not load, a missing kernel) fails every test.
        let why = match &gpu {
            Err(e) if e.is_no_gpu() => Some(format!("no GPU ({e})")),
            _ => None,
        };
        let trials = tests
            .into_iter()
            .map(|(name, f)| {
                let gpu = gpu.as_ref().map_err(|e| format!("DropBlockCuda::new(0) failed: {e}")).cloned();
                Trial::test(name, move || {
                    // The test that fills the device runs alone; the others share it.
                    let _alone = (name == "out_of_device_memory_is_a_typed_error")
                        .then(|| DEVICE.write().unwrap_or_else(|e| e.into_inner()));
                    let _shared = _alone.is_none().then(|| DEVICE.read().unwrap_or_else(|e| e.into_inner()));
                    let d = gpu.map_err(Failed::from)?;
                    let s = d.context().new_stream().map_err(|e| Failed::from(e.to_string()))?;
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&(d, s))))
                        .map_err(|e| Failed::from(common::panic_message(&*e)))
                })
            })
            .collect();
        (trials, why)
    }

    fn assert_same<T: Element>(what: &str, gpu: &[T], cpu: &[T], ctx: &str) {
        assert_eq!(gpu.len(), cpu.len());
        if let Some(i) = (0..gpu.len()).find(|&i| !common::same(gpu[i], cpu[i])) {
            panic!("{ctx}: {what}[{i}] differs: gpu {:?} cpu {:?}", gpu[i], cpu[i]);
        }
    }

    #[derive(Debug, Clone, Copy)]
    struct Case {
        cfg: DropBlockConfig,
        shape: Shape,
        key: RngKey,
    }

    fn random_case(rng: &mut StdRng) -> Case {
        random_case_of(rng, common::random_config_of_rank)
    }

    /// A case of a random spatial rank (2D half the time), with sides for it.
    fn random_case_of(rng: &mut StdRng, config: fn(&mut StdRng, usize) -> DropBlockConfig) -> Case {
        let rank = [2, 2, 1, 3][rng.random_range(0..4)];
        let sides: &[usize] = match rank {
            1 => &[1, 2, 3, 5, 15, 64, 65, 200, 1000, 4096, 70_000],
            2 => &[1, 2, 3, 5, 7, 8, 13, 14, 19, 28, 33, 56, 63, 64, 65, 70, 97, 130],
            _ => &[1, 2, 3, 5, 8, 13, 16, 28],
        };
        let shape = common::random_shape_of_rank(rng, rank, 4, 6, sides);
        // Channels-last a quarter of the time, with channel counts on and off 32 and
        // 128 (the transpose's word and vector stores).
        let shape = if rng.random_bool(0.25) {
            let mut dims = shape.dims().to_vec();
            dims[1] = [3, 32, 64, 70, 128, 160, 256][rng.random_range(0..7)];
            Shape::from_dims(&dims).unwrap().with_layout(Layout::ChannelsLast)
        } else {
            shape
        };
        let cfg = config(rng, rank);
        // Noise fill now and then (it needs normalisation None).
        let cfg = if rng.random_bool(0.1) { common::with_noise_fill(&cfg) } else { cfg };
        Case { shape, cfg, key: common::random_key(rng) }
    }

    /// Forward and backward on both paths, out of place (optionally on views one
    /// element past an aligned start, which takes the unaligned kernels) and in
    /// place; everything must agree bit for bit.
    /// Returns the dtype's name.
    fn check<T: CudaElement>(
        d: &DropBlockCuda,
        s: &Arc<CudaStream>,
        case: Case,
        unaligned: bool,
        seed: u64,
    ) -> &'static str {
        let ctx = format!(
            "{case:?} {} unaligned={unaligned} {:?}",
            T::DTYPE.name(),
            d.launch_plan(&case.cfg, case.shape).unwrap().path
        );
        let (cfg, shape, key) = (case.cfg, case.shape, case.key);
        let n = shape.numel();
        let off = unaligned as usize;
        let x: Vec<T> = common::input(n + off, seed).into_iter().map(T::from_f32).collect();
        let dy: Vec<T> = common::input(n + off, seed + 1).into_iter().map(T::from_f32).collect();

        let mut y_cpu = vec![T::default(); n];
        let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x[off..], &mut y_cpu).unwrap();
        let mut dx_cpu = vec![T::default(); n];
        cpu::backward(&saved, &dy[off..], &mut dx_cpu).unwrap();

        let xd = s.clone_htod(&x).unwrap();
        let dyd = s.clone_htod(&dy).unwrap();
        let mut yd = s.alloc_zeros::<T>(n + off).unwrap();
        let mut dxd = s.alloc_zeros::<T>(n + off).unwrap();
        let state = d.forward(s, &cfg, shape, key, Mode::Train, &xd.slice(off..), &mut yd.slice_mut(off..)).unwrap();
        d.backward(s, &state, &dyd.slice(off..), &mut dxd.slice_mut(off..)).unwrap();

        let keep = saved.keep_mask().unwrap();
        assert_eq!(state.keep_mask(s).unwrap(), keep, "{ctx}: keep mask");
        // The raw bits, in the layout `DeviceState::keep_bits` documents: bit
        // plane · L + cell channels-first, bit e (the element's) channels-last.
        let last = state.last_stream().expect("a forward leaves its stream");
        let words = last.clone_dtoh(state.keep_bits()).unwrap();
        let (plan, c, l) = (Plan::new(&cfg, shape, key).unwrap(), shape.c(), shape.plane_len());
        for (e, &k) in keep.iter().enumerate() {
            let b = match shape.layout() {
                Layout::ChannelsLast => e,
                Layout::ChannelsFirst => plan.plane_of(e / (c * l), e / l % c).unwrap() * l + e % l,
            };
            assert_eq!(words[b / 32] >> (b % 32) & 1, k as u32, "{ctx}: keep_bits bit {b}, element {e}");
        }
        assert!(state.counters(s).unwrap().iter().all(|&c| c == 0), "{ctx}: counters left non-zero");
        assert_eq!(state.kept(s).unwrap(), saved.kept(), "{ctx}: kept");
        assert_eq!(state.scales(s).unwrap(), saved.scales(), "{ctx}: scales");
        assert_same("y", &s.clone_dtoh(&yd).unwrap()[off..], &y_cpu, &ctx);
        assert_same("dx", &s.clone_dtoh(&dxd).unwrap()[off..], &dx_cpu, &ctx);

        let mut xy = s.clone_htod(&x).unwrap();
        let mut state2 = d.alloc_state(s, shape).unwrap();
        d.forward_inplace(s, &mut state2, &cfg, shape, key, Mode::Train, &mut xy.slice_mut(off..)).unwrap();
        assert_same("y (in place)", &s.clone_dtoh(&xy).unwrap()[off..], &y_cpu, &ctx);
        let mut g = s.clone_htod(&dy).unwrap();
        d.backward_inplace(s, &state2, &mut g.slice_mut(off..)).unwrap();
        assert_same("dx (in place)", &s.clone_dtoh(&g).unwrap()[off..], &dx_cpu, &ctx);
        T::DTYPE.name()
    }

    fn device_sampler_matches_cpu((d, s): &Gpu) {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..40 {
            let case = random_case(&mut rng);
            let plan = Plan::new(&case.cfg, case.shape, case.key).unwrap();
            assert_eq!(d.sample_seeds(s, &plan).unwrap(), common::seed_windows(&plan), "{case:?}");
        }
    }

    /// Random modes on every launch path: these shapes have too few tiles for
    /// the tiled kernels on a large GPU, so the path is set by the bound (a
    /// fused-eligible config with no bound, any config with no bound, or the
    /// grid-wide passes always), and the sweep checks it ran each path in each
    /// dtype.
    fn random_configs_match_cpu_in_every_dtype((d, s): &Gpu) {
        use dropblock::cuda::LaunchPath;
        let mut rng = StdRng::seed_from_u64(2);
        let mut seen = std::collections::HashSet::new();
        let mut seen_rank = std::collections::HashSet::new();
        let mut seen_layout = std::collections::HashSet::new();
        for i in 0..if quick() { 24 } else { 240u64 } {
            let (case, min_tiles) = match i % 4 {
                0 => (random_case_of(&mut rng, common::random_fusable_config_of_rank), 0),
                2 => (random_case(&mut rng), 0),
                _ => (random_case(&mut rng), u64::MAX),
            };
            let d = d.clone().with_min_tiles(min_tiles);
            // Every eighth case (i = 0, 8, 16: one per dtype, quick runs too) is
            // redrawn until it takes the fused kernels: a fusable config alone
            // may still draw channels-last, noise fill or a plane group too large
            // for a tile, and the quick run once drew no fused bf16 case at all.
            let case = if i % 8 == 0 {
                let mut case = case;
                for _ in 0..200 {
                    if d.launch_plan(&case.cfg, case.shape).unwrap().path == LaunchPath::Fused {
                        break;
                    }
                    case = random_case_of(&mut rng, common::random_fusable_config_of_rank);
                }
                assert_eq!(d.launch_plan(&case.cfg, case.shape).unwrap().path, LaunchPath::Fused, "{case:?}");
                case
            } else {
                case
            };
            let unaligned = i % 5 == 4;
            let dtype = match i % 3 {
                0 => check::<f32>(&d, s, case, unaligned, i),
                1 => check::<f16>(&d, s, case, unaligned, i),
                _ => check::<bf16>(&d, s, case, unaligned, i),
            };
            let path = d.launch_plan(&case.cfg, case.shape).unwrap().path;
            seen.insert((path, dtype));
            seen_rank.insert((case.shape.spatial_rank(), path));
            seen_layout.insert((case.shape.layout(), path));
        }
        for path in [LaunchPath::Fused, LaunchPath::Tiles, LaunchPath::Grid] {
            for dtype in ["f32", "f16", "bf16"] {
                assert!(seen.contains(&(path, dtype)), "no {path:?} case in {dtype}");
            }
            if !quick() {
                for rank in 1..=3 {
                    assert!(seen_rank.contains(&(rank, path)), "no {rank}D case took {path:?}");
                }
                // Channels-last never takes the fused kernels (its bits are transposed first).
                if path != LaunchPath::Fused {
                    assert!(seen_layout.contains(&(Layout::ChannelsLast, path)), "no channels-last case took {path:?}");
                }
            }
        }
    }

    fn large_shapes_match_cpu((d, s): &Gpu) {
        // 1x4097x65x65: an odd element count past 2^24, where a Global scale divided
        // in f32 instead of f64 can be one ulp off.
        // 3D planes of 32x64x64 cells (grid-wide passes) and the video and sequence
        // benchmark shapes of issue 21.
        let big: [(&[usize], u32); 8] = [
            (&[1, 4097, 65, 65], 7),
            (&[8, 256, 56, 56], 7),
            (&[24, 64, 76, 76], 3),
            (&[8, 256, 16, 28, 28], 5),
            (&[64, 512, 4096], 15),
            (&[2, 8, 300, 257], 9),
            (&[1, 2, 1, 100_000], 5),
            (&[2, 3, 32, 64, 64], 7),
        ];
        let big = if quick() { &big[5..] } else { &big[..] };
        for (i, &(dims, k)) in big.iter().enumerate() {
            for norm in [Normalize::Global, Normalize::Expected] {
                let cfg = DropBlockConfig::builder(Block::uniform(k).unwrap(), 0.1).normalize(norm).build().unwrap();
                let case =
                    Case { cfg, shape: Shape::from_dims(dims).unwrap(), key: RngKey::new(77 + i as u64, 34).unwrap() };
                check::<f32>(d, s, case, false, i as u64);
                check::<bf16>(d, s, case, false, i as u64);
            }
        }
    }

    /// Each way of computing the keep bits (dropblock::cuda::LaunchPath), on shapes
    /// that take it on any GPU of 16 to 240 multiprocessors: the single-launch fused
    /// kernel, a tile of planes per block, and the grid-wide passes for few planes.
    fn every_launch_path_matches_cpu((d, s): &Gpu) {
        use dropblock::cuda::LaunchPath;
        let many = [(32, 256, 7, 9, 3), (16, 1024, 14, 14, 7), (64, 128, 5, 70, 4)];
        let few = [(2, 3, 129, 200, 7), (1, 4, 64, 64, 5)];
        let mut cases = Vec::new();
        for &(n, c, h, w, k) in &many {
            for norm in [Normalize::Expected, Normalize::None, Normalize::Global, Normalize::PerSample] {
                let path = if matches!(norm, Normalize::Expected | Normalize::None) {
                    LaunchPath::Fused
                } else {
                    LaunchPath::Tiles
                };
                cases.push((n, c, h, w, k, norm, path));
            }
        }
        for &(n, c, h, w, k) in &few {
            for norm in [Normalize::Global, Normalize::PerSample, Normalize::Expected] {
                cases.push((n, c, h, w, k, norm, LaunchPath::Grid));
            }
        }
        for (i, (n, c, h, w, k, norm, path)) in cases.into_iter().enumerate() {
            let cfg = DropBlockConfig::builder(Block::square(k).unwrap(), 0.2).normalize(norm).build().unwrap();
            let shape = Shape::new(n, c, h, w).unwrap();
            assert_eq!(d.launch_plan(&cfg, shape).unwrap().path, path, "{shape} {norm:?}");
            let case = Case { cfg, shape, key: RngKey::new(5 + i as u64, 51).unwrap() };
            check::<f32>(d, s, case, false, 1);
            check::<bf16>(d, s, case, true, 2);
            check::<f16>(d, s, case, false, 3);
        }
    }

    /// `sample_into` then `apply` gives the forward's keep bits, scales and y, in
    /// every normalisation, with a host key and with a device generator.
    fn sampling_alone_then_apply_matches_forward((d, s): &Gpu) {
        let shape = Shape::new(8, 96, 14, 14).unwrap();
        let x: Vec<bf16> = common::input(shape.numel(), 21).into_iter().map(bf16::from_f32).collect();
        let xd = s.clone_htod(&x).unwrap();
        for (i, norm) in
            [Normalize::Global, Normalize::PerSample, Normalize::Expected, Normalize::None].into_iter().enumerate()
        {
            let cfg = DropBlockConfig::builder(Block::square(5).unwrap(), 0.15).normalize(norm).build().unwrap();
            let key = RngKey::new(40 + i as u64, 17).unwrap();
            let mut y_cpu = vec![bf16::ZERO; shape.numel()];
            let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y_cpu).unwrap();
            let ctx = format!("{norm:?}");
            for device in [false, true] {
                let mut state = d.alloc_state(s, shape).unwrap();
                let mut gen = DeviceGenerator::new(s, key.seed(), key.offset()).unwrap();
                if device {
                    d.sample_into(s, &mut state, &cfg, shape, &mut gen, Mode::Train).unwrap();
                    assert_eq!(gen.key(s).unwrap().offset(), key.offset() + 17, "{ctx}: generator stepped");
                } else {
                    d.sample_into(s, &mut state, &cfg, shape, key, Mode::Train).unwrap();
                }
                assert_eq!(state.keep_mask(s).unwrap(), saved.keep_mask().unwrap(), "{ctx}: keep mask");
                assert_eq!(state.scales(s).unwrap(), saved.scales(), "{ctx}: scales");
                let mut yd = s.alloc_zeros::<bf16>(shape.numel()).unwrap();
                d.apply(s, &state, &xd, &mut yd).unwrap();
                assert_same("y (sample, then apply)", &s.clone_dtoh(&yd).unwrap(), &y_cpu, &ctx);
            }
        }
    }

    /// The kernels zero the counters for the next call: the second and third
    /// forwards on one state, with no host reset, count as the first did, on every
    /// path that counts.
    fn counters_are_reset_by_the_kernels((d, s): &Gpu) {
        let shape = Shape::new(16, 64, 14, 14).unwrap();
        let x: Vec<f32> = common::input(shape.numel(), 8);
        let xd = s.clone_htod(&x).unwrap();
        let mut yd = s.alloc_zeros::<f32>(shape.numel()).unwrap();
        for norm in [Normalize::Global, Normalize::PerSample] {
            for min_tiles in [0, u64::MAX] {
                let d = d.clone().with_min_tiles(min_tiles);
                let cfg = DropBlockConfig::builder(Block::square(7).unwrap(), 0.2).normalize(norm).build().unwrap();
                let mut state = d.alloc_state(s, shape).unwrap();
                let mut gen = dropblock::Generator::new(3);
                for call in 0..3 {
                    let key = gen.next_key().unwrap();
                    d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &xd, &mut yd).unwrap();
                    let saved = cpu::sample(&cfg, shape, key, Mode::Train).unwrap();
                    let ctx = format!("{norm:?} {:?} call {call}", d.launch_plan(&cfg, shape).unwrap().path);
                    assert_eq!(state.scales(s).unwrap(), saved.scales(), "{ctx}: scales");
                    assert!(state.counters(s).unwrap().iter().all(|&c| c == 0), "{ctx}: counters left non-zero");
                }
            }
        }
    }

    /// A bf16 tensor past 2^31 elements (4.3 GB), in place: 64-bit indexing through
    /// the count pass, the keep bits and the apply pass (run.sh leaves it out of the
    /// sanitizer runs by name).
    fn past_2_pow_31_elements_matches_cpu((d, s): &Gpu) {
        let shape = Shape::new(1, 2, 32_768, 32_769).unwrap();
        assert!(shape.numel() > 1 << 31);
        let cfg = DropBlockConfig::paper(7, 0.1).unwrap();
        let key = RngKey::new(31, 0).unwrap();
        let x: Vec<bf16> = (0..shape.numel()).map(|e| bf16::from_f32(((e % 251) as f32 - 125.0) / 8.0)).collect();
        let mut xd = s.clone_htod(&x).unwrap();
        let mut state = d.alloc_state(s, shape).unwrap();
        d.forward_inplace(s, &mut state, &cfg, shape, key, Mode::Train, &mut xd).unwrap();
        let mut y_cpu = x;
        let saved = cpu::forward_inplace(&cfg, shape, key, Mode::Train, &mut y_cpu).unwrap();
        assert_eq!(state.kept(s).unwrap(), saved.kept(), "kept");
        assert_eq!(state.scales(s).unwrap(), saved.scales(), "scales");
        assert_same("y past 2^31", &s.clone_dtoh(&xd).unwrap(), &y_cpu, "1x2x32768x32769 bf16");
    }

    /// With the device's memory taken, allocating a state is a typed error, not a
    /// crash; once memory is free again, the same handle and a state made before run
    /// and match the CPU.
    fn out_of_device_memory_is_a_typed_error((d, s): &Gpu) {
        let shape = Shape::new(4, 64, 28, 28).unwrap();
        let cfg = DropBlockConfig::paper(5, 0.2).unwrap();
        let key = RngKey::new(12, 0).unwrap();
        let x: Vec<f32> = common::input(shape.numel(), 4);
        let xd = s.clone_htod(&x).unwrap();
        let mut yd = s.alloc_zeros::<f32>(shape.numel()).unwrap();
        let mut state = d.alloc_state(s, shape).unwrap();
        s.synchronize().unwrap();
        // Take the memory in shrinking chunks until even 64 KiB fails.
        let mut hog = Vec::new();
        let mut chunk = 1usize << 30;
        while chunk >= 1 << 16 {
            // SAFETY: never read; held only to occupy memory.
            match unsafe { s.alloc::<u8>(chunk) } {
                Ok(b) => hog.push(b),
                Err(_) => chunk /= 2,
            }
        }
        let big = Shape::new(64, 256, 56, 56).unwrap();
        let err = d.alloc_state(s, big).unwrap_err();
        assert!(matches!(err, dropblock::Error::DeviceOutOfMemory(ref m) if m.contains("OUT_OF_MEMORY")), "{err}");
        let err = d.forward(s, &cfg, big, key, Mode::Train, &xd, &mut yd).unwrap_err();
        // The state is allocated before the buffers are checked: the same error.
        assert!(matches!(err, dropblock::Error::DeviceOutOfMemory(ref m) if m.contains("OUT_OF_MEMORY")), "{err}");
        drop(hog);
        s.synchronize().unwrap();
        d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &xd, &mut yd).unwrap();
        let mut y_cpu = vec![0f32; shape.numel()];
        cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y_cpu).unwrap();
        assert_same("y after running out of memory", &s.clone_dtoh(&yd).unwrap(), &y_cpu, "oom");
    }

    fn eval_mode_and_zero_drop_prob_copy((d, s): &Gpu) {
        let shape = Shape::new(2, 3, 9, 11).unwrap();
        let zero = DropBlockConfig::paper(3, 0.0).unwrap();
        let half = DropBlockConfig::paper(3, 0.5).unwrap();
        for (cfg, mode) in [(zero, Mode::Train), (half, Mode::Eval)] {
            let case = Case { cfg, shape, key: RngKey::new(1, 0).unwrap() };
            let x: Vec<f32> = common::input(shape.numel(), 5);
            let xd = s.clone_htod(&x).unwrap();
            let mut yd = s.alloc_zeros::<f32>(shape.numel()).unwrap();
            let st = d.forward(s, &cfg, shape, case.key, mode, &xd, &mut yd).unwrap();
            assert_eq!(s.clone_dtoh(&yd).unwrap(), x);
            assert_eq!(st.kept(s).unwrap(), shape.numel() as u64);
            assert!(st.plan().is_none());
        }
    }

    /// A forward captured into a CUDA graph: with a host key every replay is the
    /// same call; with a DeviceGenerator each replay draws the next key, and after
    /// `set_key` the key set.
    fn graph_captured_forward_matches_cpu((d, s): &Gpu) {
        let shape = Shape::new(4, 16, 28, 28).unwrap();
        let key = RngKey::new(11, 34).unwrap();
        let x: Vec<f32> = common::input(shape.numel(), 3);
        let cpu_y = |cfg: &DropBlockConfig, key: RngKey| {
            let mut y = vec![0f32; shape.numel()];
            cpu::forward(cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
            y
        };
        for norm in [Normalize::Global, Normalize::PerSample, Normalize::Expected] {
            let cfg = DropBlockConfig::builder(Block::square(7).unwrap(), 0.1).normalize(norm).build().unwrap();
            let xd = s.clone_htod(&x).unwrap();
            let mut yd = s.alloc_zeros::<f32>(shape.numel()).unwrap();
            let mut state = d.alloc_state(s, shape).unwrap();
            let mut gen = DeviceGenerator::new(s, key.seed(), key.offset()).unwrap();
            for device in [false, true] {
                s.synchronize().unwrap();
                let graph = captured(s, || {
                    if device {
                        d.forward_into(s, &mut state, &cfg, shape, &mut gen, Mode::Train, &xd, &mut yd).unwrap();
                    } else {
                        d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &xd, &mut yd).unwrap();
                    }
                });
                for replay in 0..3u64 {
                    // Each replay writes y afresh: the last one's y cannot pass for it.
                    s.memset_zeros(&mut yd).unwrap();
                    graph.launch().unwrap();
                    let k = if device { RngKey::new(key.seed(), key.offset() + 17 * replay).unwrap() } else { key };
                    let ctx = format!("{norm:?} device={device} replay {replay}");
                    assert_same("y (graph)", &s.clone_dtoh(&yd).unwrap(), &cpu_y(&cfg, k), &ctx);
                }
                if device {
                    assert_eq!(gen.key(s).unwrap().offset(), key.offset() + 51, "the generator stepped per replay");
                    // Moved back (a checkpoint's key), the same graph draws from it
                    // again; not under capture, nor past the start offsets.
                    let refused = dropblock::Error::HostCopyInCapture;
                    refused_while_capturing(s, refused, "set_key", &mut || gen.set_key(s, 1, 2));
                    let too_far = DeviceGenerator::MAX_START_OFFSET + 1;
                    assert!(matches!(gen.set_key(s, 1, too_far), Err(dropblock::Error::OffsetOverflow { .. })));
                    gen.set_key(s, key.seed(), key.offset() + 17).unwrap();
                    s.memset_zeros(&mut yd).unwrap();
                    graph.launch().unwrap();
                    let k = RngKey::new(key.seed(), key.offset() + 17).unwrap();
                    assert_same(
                        "y (graph, key set)",
                        &s.clone_dtoh(&yd).unwrap(),
                        &cpu_y(&cfg, k),
                        &format!("{norm:?}"),
                    );
                    assert_eq!(gen.key(s).unwrap().offset(), key.offset() + 34, "stepped from the key set");
                }
            }
        }
    }

    /// Shard calls captured into a CUDA graph on a state from `alloc_shard_state`:
    /// each replay draws from the device generator's next key. A whole-tensor
    /// shard's y, and a half's keep bits, match the unsharded forward at that key.
    /// A state from `alloc_state`, whose first drawing call allocates, refuses that
    /// call under capture (`AllocationInCapture`) and makes it outside; so do the
    /// other calls that allocate.
    fn graph_captured_shard_calls_draw_afresh((d, s): &Gpu) {
        let global = Shape::new(4, 16, 28, 28).unwrap();
        let cfg = DropBlockConfig::paper(7, 0.1).unwrap();
        let key = RngKey::new(5, 40).unwrap();
        let x: Vec<f32> = common::input(global.numel(), 13);
        let xd = s.clone_htod(&x).unwrap();
        let entries = dropblock::ShardCounts::len_for(global);
        for shard in [Shard::whole(global), Shard::samples(global, 1, 2).unwrap()] {
            let local = shard.local();
            let map = common::placement(&shard);
            let mut lx = vec![0f32; local.numel()];
            for &(l, g) in &map {
                lx[l] = x[g];
            }
            let lxd = s.clone_htod(&lx).unwrap();
            let mut lyd = s.alloc_zeros::<f32>(local.numel()).unwrap();
            let mut counts = s.alloc_zeros::<u64>(entries).unwrap();
            let mut state = d.alloc_shard_state(s, &shard).unwrap();
            let mut gen = DeviceGenerator::new(s, key.seed(), key.offset()).unwrap();
            s.synchronize().unwrap();
            let graph = captured(s, || {
                d.sample_shard(s, &mut state, &cfg, &shard, &mut gen, Mode::Train, &mut counts).unwrap();
                if shard.is_whole() {
                    // The counts are the whole tensor's: no reduction to capture.
                    d.finish_shard(s, &mut state, &counts).unwrap();
                    d.apply(s, &state, &lxd, &mut lyd).unwrap();
                }
            });
            for replay in 0..3u64 {
                s.memset_zeros(&mut lyd).unwrap();
                graph.launch().unwrap();
                let k = RngKey::new(key.seed(), key.offset() + 17 * replay).unwrap();
                let ctx = format!("{shard:?}, replay {replay}");
                let mut yd = s.alloc_zeros::<f32>(global.numel()).unwrap();
                let whole = d.forward(s, &cfg, global, k, Mode::Train, &xd, &mut yd).unwrap();
                let (keep, local_keep) = (whole.keep_mask(s).unwrap(), state.keep_mask(s).unwrap());
                for &(l, g) in &map {
                    assert_eq!(local_keep[l], keep[g], "{ctx}: keep bit {g}");
                }
                if shard.is_whole() {
                    assert_same("y (graph)", &s.clone_dtoh(&lyd).unwrap(), &s.clone_dtoh(&yd).unwrap(), &ctx);
                }
            }
            assert_eq!(gen.key(s).unwrap().offset(), key.offset() + 51, "{shard:?}: the generator stepped per replay");
        }
        let shard = Shard::samples(global, 0, 2).unwrap();
        let mut state = d.alloc_state(s, shard.local()).unwrap();
        let mut counts = s.alloc_zeros::<u64>(entries).unwrap();
        let mut y = s.alloc_zeros::<f32>(global.numel()).unwrap();
        s.synchronize().unwrap();
        let refused_under_capture = |what: &str, call: &mut dyn FnMut() -> dropblock::Result<()>| {
            refused_while_capturing(s, dropblock::Error::AllocationInCapture, what, call)
        };
        refused_under_capture("a first drawing sample_shard", &mut || {
            d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Train, &mut counts)
        });
        refused_under_capture("alloc_shard_state", &mut || d.alloc_shard_state(s, &shard).map(|_| ()));
        refused_under_capture("alloc_state", &mut || d.alloc_state(s, global).map(|_| ()));
        refused_under_capture("DeviceGenerator::new", &mut || DeviceGenerator::new(s, 1, 0).map(|_| ()));
        refused_under_capture("forward", &mut || d.forward(s, &cfg, global, key, Mode::Train, &xd, &mut y).map(|_| ()));
        d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Train, &mut counts).unwrap();
        assert!(state.plan().is_some(), "the call outside capture drew a mask");
    }

    /// `body`'s work on `stream`, captured into a graph. The capture ends even when
    /// `body` panics, so that a failed check leaves no stream capturing (whose
    /// buffers' frees would fail and put errors on the shared context, where an
    /// unrelated test would find them).
    fn captured(stream: &Arc<CudaStream>, body: impl FnOnce()) -> CudaGraph {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        if let Err(panic) = ran {
            std::panic::resume_unwind(panic);
        }
        ended.unwrap().expect("a captured graph")
    }

    /// The nodes a captured graph holds.
    fn graph_nodes(graph: &CudaGraph) -> usize {
        let mut n = 0usize;
        // SAFETY: a live graph; a null node array asks for the count only.
        let r = unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut n) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "cuGraphGetNodes");
        n
    }

    /// `call`, made while `stream` is being captured, is refused with `want`, and
    /// the refusal leaves the capture valid and empty: nothing was enqueued.
    fn refused_while_capturing(
        stream: &Arc<CudaStream>,
        want: dropblock::Error,
        what: &str,
        call: &mut dyn FnMut() -> dropblock::Result<()>,
    ) {
        let mut refused = Ok(());
        let graph = captured(stream, || refused = call());
        assert_eq!(refused, Err(want), "{what} under capture");
        assert_eq!(graph_nodes(&graph), 0, "{what}: the refused call enqueued work into the capture");
    }

    /// A call captured on another stream than its state's or generator's last call
    /// would wait on work outside the capture, which CUDA refuses (ending the
    /// capture): it is refused first, enqueuing nothing. After one uncaptured call on
    /// the capture stream, the same call captures and replays. So is a call in
    /// another capture than its state's last call; one on a stream forked into
    /// that capture is captured with it.
    fn a_capture_waits_on_no_stream_outside_it((d, s): &Gpu) {
        let shape = Shape::new(2, 8, 14, 14).unwrap();
        let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
        let key = RngKey::new(3, 0).unwrap();
        let x = s.clone_htod(&common::input(shape.numel(), 1)).unwrap();
        let mut y = s.alloc_zeros::<f32>(shape.numel()).unwrap();
        let mut state = d.alloc_state(s, shape).unwrap();
        let mut gen = DeviceGenerator::new(s, 1, 0).unwrap();
        let other = d.context().new_stream().unwrap();
        let mut fresh = d.alloc_state(&other, shape).unwrap();
        d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
        s.synchronize().unwrap();
        other.synchronize().unwrap();
        let refused_under_capture = |what: &str, call: &mut dyn FnMut() -> dropblock::Result<()>| {
            refused_while_capturing(&other, dropblock::Error::CaptureAcrossStreams, what, call)
        };
        refused_under_capture("a state last used on another stream", &mut || {
            d.forward_into(&other, &mut state, &cfg, shape, key, Mode::Train, &x, &mut y)
        });
        assert!(state.plan().is_some(), "the refused call left the state's last call");
        // The mirror: the state's last call captured on `s`, a call on `other`,
        // outside the capture, would be pulled into it by its wait: refused, and
        // the capture still ends.
        let mut dx = other.alloc_zeros::<f32>(shape.numel()).unwrap();
        other.synchronize().unwrap();
        let mut mirror = Ok(());
        let graph = captured(s, || {
            d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
            mirror = d.backward(&other, &state, &x, &mut dx);
        });
        assert_eq!(mirror, Err(dropblock::Error::CaptureAcrossStreams));
        assert!(graph_nodes(&graph) > 0, "the forward was captured");
        refused_under_capture("a generator last used on another stream", &mut || {
            d.forward_into(&other, &mut fresh, &cfg, shape, &mut gen, Mode::Train, &x, &mut y)
        });
        d.forward_into(&other, &mut state, &cfg, shape, &mut gen, Mode::Train, &x, &mut y).unwrap();
        other.synchronize().unwrap();
        let graph = captured(&other, || {
            d.forward_into(&other, &mut state, &cfg, shape, &mut gen, Mode::Train, &x, &mut y).unwrap();
        });
        other.memset_zeros(&mut y).unwrap();
        graph.launch().unwrap();
        let mut want = vec![0f32; shape.numel()];
        let xs = common::input(shape.numel(), 1);
        cpu::forward(&cfg, shape, RngKey::new(1, 17).unwrap(), Mode::Train, &xs, &mut want).unwrap();
        assert_same("y (the replay)", &other.clone_dtoh(&y).unwrap(), &want, "captured on the second stream");
        assert_eq!(gen.key(&other).unwrap().offset(), 34, "one uncaptured call and one replay");
        // Two captures at once: a call in one on a state last used in the other
        // would merge them (CUDA refuses the wait, STREAM_CAPTURE_MERGE): refused. A stream
        // forked into the state's capture is in it, and its call is captured there.
        let third = d.context().new_stream().unwrap();
        let mut st = d.alloc_state(s, shape).unwrap();
        let mut dx = s.alloc_zeros::<f32>(shape.numel()).unwrap();
        s.synchronize().unwrap();
        let (mut inner, mut refused) = (None, Ok(()));
        let graph = captured(s, || {
            d.forward_into(s, &mut st, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
            inner = Some(captured(&third, || refused = d.backward(&third, &st, &y, &mut dx)));
            third.join(s).unwrap();
            d.backward(&third, &st, &y, &mut dx).unwrap();
            s.join(&third).unwrap();
        });
        assert_eq!(refused, Err(dropblock::Error::CaptureAcrossStreams), "a call in another capture");
        assert_eq!(graph_nodes(&inner.unwrap()), 0, "the refused call enqueued nothing");
        s.memset_zeros(&mut y).unwrap();
        s.memset_zeros(&mut dx).unwrap();
        graph.launch().unwrap();
        let (mut want_y, mut want_dx) = (vec![0f32; shape.numel()], vec![0f32; shape.numel()]);
        let saved = cpu::forward(&cfg, shape, key, Mode::Train, &xs, &mut want_y).unwrap();
        cpu::backward(&saved, &want_y, &mut want_dx).unwrap();
        assert_same("y (two captures)", &s.clone_dtoh(&y).unwrap(), &want_y, "the fork's capture");
        assert_same("dx (two captures)", &s.clone_dtoh(&dx).unwrap(), &want_dx, "the fork's capture");
    }

    /// The entry points the crate loads for drivers older than cudarc's bindings
    /// (`cuStreamGetCaptureInfo_v2`, `cuEventElapsedTime`) give what cudarc's
    /// newer forms give on a driver that has both: the same capture IDs (none
    /// outside a capture, one per capture, shared by a stream forked into it) and
    /// the same time between two events.
    ///
    /// cudarc's forms are asked only of a driver that has them (cudarc panics on
    /// a missing symbol); on an older one the older forms are checked alone.
    fn older_driver_entry_points_agree((d, s): &Gpu) {
        use dropblock::cuda::{capture_id_v2, capture_id_v3, elapsed_ms, elapsed_ms_v1};
        let mut driver = 0;
        // SAFETY: writes one int.
        assert_eq!(unsafe { sys::cuDriverGetVersion(&mut driver) }, sys::CUresult::CUDA_SUCCESS);
        let ids = |stream: &Arc<CudaStream>| {
            let v2 = capture_id_v2(stream).unwrap();
            if driver >= 12030 {
                assert_eq!(v2, capture_id_v3(stream).unwrap(), "capture IDs by _v2 and _v3");
            }
            v2
        };
        assert_eq!(ids(s), None, "outside a capture");
        let (forked, apart) = (d.context().new_stream().unwrap(), d.context().new_stream().unwrap());
        let mut seen = (None, None, None);
        let _graph = captured(s, || {
            let _apart = captured(&apart, || {
                forked.join(s).unwrap();
                seen = (ids(s), ids(&forked), ids(&apart));
                s.join(&forked).unwrap();
            });
        });
        let (one, fork, other) = seen;
        assert!(one.is_some() && other.is_some(), "two captures have IDs: {seen:?}");
        assert_eq!(fork, one, "a stream forked into a capture has its ID");
        assert_ne!(one, other, "two captures have two IDs");
        // Events around work that takes a measurable time.
        let mut big = s.alloc_zeros::<u8>(256 << 20).unwrap();
        let start = s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        s.memset_zeros(&mut big).unwrap();
        let end = s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let (v1, chosen) = (elapsed_ms_v1(&start, &end).unwrap(), elapsed_ms(&start, &end).unwrap());
        assert!(v1 > 0.0, "a 256 MB memset took {v1} ms");
        assert_eq!(chosen, v1, "dropblock::cuda::elapsed_ms");
        if driver >= 12080 {
            let cudarcs = start.elapsed_ms(&end).unwrap();
            assert_eq!(v1, cudarcs, "cuEventElapsedTime and cuEventElapsedTime_v2 on the same events");
        }
    }

    /// Two streams at once, the second from another handle to the same primary
    /// context (as a framework holding its own `CudaContext::new(0)` would pass):
    /// accepted, and each stream's calls are its own.
    fn two_streams_at_once((d, s1): &Gpu) {
        let other = cudarc::driver::CudaContext::new(0).unwrap();
        // SAFETY: as for `d`'s handle: every buffer here belongs to one stream.
        unsafe { other.disable_event_tracking() };
        let s2 = other.new_stream().unwrap();
        let shape = Shape::new(8, 64, 28, 28).unwrap();
        let cfg = DropBlockConfig::paper(5, 0.2).unwrap();
        let keys = [RngKey::new(1, 0).unwrap(), RngKey::new(2, 17).unwrap()];
        let x: Vec<f32> = common::input(shape.numel(), 9);
        let streams = [s1, &s2];
        let inputs: Vec<_> = streams.iter().map(|s| s.clone_htod(&x).unwrap()).collect();
        let mut outputs: Vec<_> = streams.iter().map(|s| s.alloc_zeros::<f32>(shape.numel()).unwrap()).collect();
        let mut states: Vec<_> = streams.iter().map(|s| d.alloc_state(s, shape).unwrap()).collect();
        for i in 0..2 {
            for _ in 0..4 {
                d.forward_into(
                    streams[i],
                    &mut states[i],
                    &cfg,
                    shape,
                    keys[i],
                    Mode::Train,
                    &inputs[i],
                    &mut outputs[i],
                )
                .unwrap();
            }
        }
        for i in 0..2 {
            let mut y_cpu = vec![0f32; shape.numel()];
            cpu::forward(&cfg, shape, keys[i], Mode::Train, &x, &mut y_cpu).unwrap();
            assert_same("y", &streams[i].clone_dtoh(&outputs[i]).unwrap(), &y_cpu, &format!("stream {i}"));
        }
    }

    /// Random grids of shards, each on its own stream (sample_shard, the counts
    /// summed, finish_shard, apply and backward), reassembled against the unsharded
    /// CUDA call bit for bit; with the `nccl` feature and libnccl present, a
    /// one-rank all-reduce through the helper leaves the counts as they are.
    fn shards_on_their_own_streams_match_the_unsharded_call((d, s): &Gpu) {
        let mut rng = StdRng::seed_from_u64(28);
        let cases = if quick() { 4 } else { 24 };
        for case in 0..cases {
            let rank = 1 + case % 3;
            let sides: &[usize] = if rank == 3 { &[1, 3, 8, 13] } else { &[1, 5, 14, 19, 56, 70] };
            let mut global = common::random_shape_of_rank(&mut rng, rank, 4, 24, sides);
            if rng.random_bool(0.3) {
                global = global.with_layout(Layout::ChannelsLast);
            }
            let mut cfg = common::random_config_of_rank(&mut rng, rank);
            if rng.random_bool(0.2) {
                cfg = common::with_noise_fill(&cfg);
            }
            let shards = common::random_grid(&mut rng, global, 3);
            let key = common::random_key(&mut rng);
            let ctx = format!("case {case}: {cfg} on {global}, {} shards", shards.len());
            let x: Vec<f32> = common::input(global.numel(), case as u64);
            let dy: Vec<f32> = common::input(global.numel(), 100 + case as u64);
            let (xd, dyd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&dy).unwrap());
            let (mut yd, mut dxd) = (s.alloc_zeros::<f32>(x.len()).unwrap(), s.alloc_zeros::<f32>(x.len()).unwrap());
            let state = d.forward(s, &cfg, global, key, Mode::Train, &xd, &mut yd).unwrap();
            d.backward(s, &state, &dyd, &mut dxd).unwrap();
            let (y, dx) = (s.clone_dtoh(&yd).unwrap(), s.clone_dtoh(&dxd).unwrap());
            let keep = state.keep_mask(s).unwrap();
            let streams: Vec<_> = shards.iter().map(|_| d.context().new_stream().unwrap()).collect();
            let entries = dropblock::ShardCounts::len_for(global);
            let mut states = Vec::new();
            let mut counts = Vec::new();
            // Every other shard of a case without noise fill draws from its own
            // device generator at the key, which the call must step by 17.
            for (i, (shard, st)) in shards.iter().zip(&streams).enumerate() {
                let mut state = d.alloc_state(st, shard.local()).unwrap();
                let mut c = st.alloc_zeros::<u64>(entries).unwrap();
                let device = cfg.fill() == dropblock::Fill::Zero && key.offset() <= DeviceGenerator::MAX_START_OFFSET;
                if device && (case + i) % 2 == 1 {
                    let mut gen = DeviceGenerator::new(st, key.seed(), key.offset()).unwrap();
                    d.sample_shard(st, &mut state, &cfg, shard, &mut gen, Mode::Train, &mut c).unwrap();
                    let stepped = gen.key(st).unwrap();
                    assert_eq!(stepped, RngKey::new(key.seed(), key.offset() + 17).unwrap(), "{ctx}: generator");
                } else {
                    d.sample_shard(st, &mut state, &cfg, shard, key, Mode::Train, &mut c).unwrap();
                }
                let want = cpu::sample_shard(&cfg, shard, key, Mode::Train).unwrap();
                assert_eq!(st.clone_dtoh(&c).unwrap(), want.counts().entries(), "{ctx}: shard {i}'s counts");
                states.push(state);
                counts.push(c);
            }
            let mut summed = vec![0u64; entries];
            for (c, st) in counts.iter().zip(&streams) {
                summed.iter_mut().zip(st.clone_dtoh(c).unwrap()).for_each(|(a, b)| *a = a.wrapping_add(b));
                // tags wrap
            }
            let (mut y_sh, mut dx_sh, mut keep_sh) =
                (vec![f32::NAN; y.len()], vec![f32::NAN; y.len()], vec![9u8; y.len()]);
            for ((shard, st), (state, c)) in shards.iter().zip(&streams).zip(states.iter_mut().zip(counts.iter_mut())) {
                st.memcpy_htod(&summed, c).unwrap();
                d.finish_shard(st, state, c).unwrap();
                let map = common::placement(shard);
                let mut lx = vec![0f32; shard.local().numel()];
                let mut ldy = lx.clone();
                for &(l, g) in &map {
                    lx[l] = x[g];
                    ldy[l] = dy[g];
                }
                let (lxd, ldyd) = (st.clone_htod(&lx).unwrap(), st.clone_htod(&ldy).unwrap());
                let mut lyd = st.alloc_zeros::<f32>(lx.len()).unwrap();
                let mut ldxd = st.alloc_zeros::<f32>(lx.len()).unwrap();
                d.apply(st, state, &lxd, &mut lyd).unwrap();
                d.backward(st, state, &ldyd, &mut ldxd).unwrap();
                let (ly, ldx, lkeep) =
                    (st.clone_dtoh(&lyd).unwrap(), st.clone_dtoh(&ldxd).unwrap(), state.keep_mask(st).unwrap());
                for (l, g) in map {
                    y_sh[g] = ly[l];
                    dx_sh[g] = ldx[l];
                    keep_sh[g] = lkeep[l];
                }
            }
            assert_eq!(keep_sh, keep, "{ctx}: keep mask");
            assert_same("y", &y_sh, &y, &ctx);
            assert_same("dx", &dx_sh, &dx, &ctx);
        }
        // Typed errors: an apply before finish_shard, counts of the wrong length.
        let global = Shape::new(4, 8, 14, 14).unwrap();
        let shard = dropblock::Shard::samples(global, 2, 2).unwrap();
        let cfg = DropBlockConfig::paper(3, 0.2).unwrap();
        let key = RngKey::new(3, 0).unwrap();
        let mut state = d.alloc_state(s, shard.local()).unwrap();
        let mut c = s.alloc_zeros::<u64>(13).unwrap();
        d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Train, &mut c).unwrap();
        let xd = s.alloc_zeros::<f32>(shard.local().numel()).unwrap();
        let mut yd = s.alloc_zeros::<f32>(shard.local().numel()).unwrap();
        assert_eq!(d.apply(s, &state, &xd, &mut yd), Err(dropblock::Error::ShardNotFinished));
        assert_eq!(state.scales(s), Err(dropblock::Error::ShardNotFinished));
        let mut whole = d.alloc_state(s, shard.local()).unwrap();
        d.sample_into(s, &mut whole, &cfg, shard.local(), key, Mode::Train).unwrap();
        assert_eq!(d.finish_shard(s, &mut whole, &c), Err(dropblock::Error::NotAShardCall));
        // An eval call on a shard: everything kept, its counts the box's sizes, y = x.
        d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Eval, &mut c).unwrap();
        let per = (8 * 14 * 14) as u64;
        let cpu_counts =
            |sh: &dropblock::Shard| cpu::sample_shard(&cfg, sh, key, Mode::Train).unwrap().counts().clone();
        let tag = cpu_counts(&dropblock::Shard::whole(global)).tags()[0];
        assert_eq!(s.clone_dtoh(&c).unwrap(), vec![2 * per, 0, 0, per, per, 0, 0, per, per, 0, 0, tag, tag]);
        // It draws nothing, so a device generator stays where it was; noise fill
        // refuses one, as the forward does.
        let mut gen = DeviceGenerator::new(s, 5, 10).unwrap();
        d.sample_shard(s, &mut state, &cfg, &shard, &mut gen, Mode::Eval, &mut c).unwrap();
        assert_eq!(gen.key(s).unwrap(), RngKey::new(5, 10).unwrap());
        let noisy = common::with_noise_fill(&cfg);
        let err = d.sample_shard(s, &mut state, &noisy, &shard, &mut gen, Mode::Train, &mut c).unwrap_err();
        assert_eq!(err, dropblock::Error::NoiseNeedsHostKey);
        // On a fresh state, the key is refused before the per-plane counts would be
        // allocated (under capture that allocation was refused instead).
        let mut fresh = d.alloc_state(s, shard.local()).unwrap();
        refused_while_capturing(s, dropblock::Error::NoiseNeedsHostKey, "noise from a device generator", &mut || {
            d.sample_shard(s, &mut fresh, &noisy, &shard, &mut gen, Mode::Train, &mut c)
        });
        d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Eval, &mut c).unwrap();
        d.finish_shard(s, &mut state, &c).unwrap();
        let xs: Vec<f32> = common::input(shard.local().numel(), 5);
        let xd = s.clone_htod(&xs).unwrap();
        d.apply(s, &state, &xd, &mut yd).unwrap();
        assert_eq!(s.clone_dtoh(&yd).unwrap(), xs);
        // Counts no shards could give: every scale NaN (the device cannot return
        // the CPU's ImpossibleShardCounts without a sync).
        d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Train, &mut c).unwrap();
        let good = s.clone_dtoh(&c).unwrap();
        assert_eq!(good, cpu_counts(&shard).entries(), "this shard's counts: kept, covered and tags");
        let mut off_by_one = good.clone();
        off_by_one[0] += 1;
        let mut twice = good.clone();
        twice[7] = 2 * per; // sample 2 covered twice
        let impossible = vec![2 * per + 1, 0, 0, per + 1, per, 0, 0, per, per, 0, 0, tag, tag];
        // The first half of samples 2 and 3's rows counted twice, the second half
        // missed: every sample covered by its C·L, but not each element once.
        let mut doubled = cpu_counts(&dropblock::Shard::samples(global, 0, 2).unwrap());
        let half = cpu_counts(&dropblock::Shard::new(global, &[2, 0, 0, 0], &[2, 8, 7, 14]).unwrap());
        doubled.add(&half).unwrap();
        doubled.add(&half).unwrap();
        assert_eq!(doubled.covered(), [per; 4]);
        for bad in [off_by_one, impossible, twice, doubled.entries().to_vec()] {
            let sampled = cpu::sample_shard(&cfg, &shard, key, Mode::Train).unwrap();
            let checked = dropblock::ShardCounts::from_entries(global, bad.clone()).and_then(|c| sampled.finish(&c));
            assert!(checked.is_err(), "{bad:?}");
            let bad_d = s.clone_htod(&bad).unwrap();
            d.finish_shard(s, &mut state, &bad_d).unwrap();
            let scales = state.scales(s).unwrap();
            assert!(scales.iter().all(|v| v.is_nan()), "impossible counts {bad:?} gave the scales {scales:?}");
        }
        // This shard's own counts, never summed with the other's: possible counts,
        // but not the whole tensor's, so a Global scale from them is NaN; summed
        // with the other shard's (on the CPU, bit-exact) it is finite.
        d.finish_shard(s, &mut state, &c).unwrap();
        assert!(state.scales(s).unwrap().iter().all(|v| v.is_nan()), "one shard's counts gave a scale");
        let mut sum = dropblock::ShardCounts::from_entries(global, vec![0; 13]).unwrap();
        for sh in [dropblock::Shard::samples(global, 0, 2).unwrap(), shard] {
            sum.add(cpu::sample_shard(&cfg, &sh, key, Mode::Train).unwrap().counts()).unwrap();
        }
        assert_eq!(sum.entries()[3..5], good[3..5], "this shard's counts on the CPU");
        let summed = s.clone_htod(sum.entries()).unwrap();
        d.finish_shard(s, &mut state, &summed).unwrap();
        assert!(state.scales(s).unwrap().iter().all(|v| v.is_finite()));
        let mut short = s.alloc_zeros::<u64>(4).unwrap();
        let err = d.sample_shard(s, &mut state, &cfg, &shard, key, Mode::Train, &mut short).unwrap_err();
        assert!(matches!(err, dropblock::Error::LengthMismatch { what: "shard counts", expected: 13, actual: 4 }));
        #[cfg(feature = "nccl")]
        if quick() {
            eprintln!("nccl: DROPBLOCK_PARITY_QUICK=1; the one-rank all-reduce did not run");
        } else if dropblock::cuda::nccl::nccl_present() {
            use cudarc::nccl::{Comm, Id};
            let comm = Comm::from_rank(s.clone(), 0, 1, Id::new().unwrap()).unwrap();
            let values: Vec<u64> = (0..13).map(|v| v * 1_000_003).collect();
            let mut c = s.clone_htod(&values).unwrap();
            dropblock::cuda::nccl::all_reduce_counts(&comm, &mut c).unwrap();
            assert_eq!(s.clone_dtoh(&c).unwrap(), values, "a one-rank all-reduce sums one rank's counts");
        } else {
            // Where the caller provided libnccl (the GPU check links PyTorch's), its
            // absence is a failure, not a skip.
            let required = std::env::var("DROPBLOCK_REQUIRE_NCCL").is_ok_and(|v| v == "1");
            assert!(!required, "nccl: libnccl.so not found, and DROPBLOCK_REQUIRE_NCCL=1");
            eprintln!("nccl: libnccl.so not found; the one-rank all-reduce did not run");
        }
    }

    fn bad_calls_are_typed_errors((d, s): &Gpu) {
        let shape = Shape::new(1, 2, 4, 4).unwrap();
        let cfg = DropBlockConfig::paper(3, 0.1).unwrap();
        let key = RngKey::new(0, 0).unwrap();
        let short = s.alloc_zeros::<f32>(31).unwrap();
        let mut y = s.alloc_zeros::<f32>(32).unwrap();
        let err = d.forward(s, &cfg, shape, key, Mode::Train, &short, &mut y).unwrap_err();
        assert!(matches!(err, dropblock::Error::LengthMismatch { what: "x", .. }), "{err}");
        let state = d.alloc_state(s, shape).unwrap();
        let x = s.alloc_zeros::<f32>(32).unwrap();
        assert!(matches!(d.backward(s, &state, &x, &mut y), Err(dropblock::Error::NoForwardCall)));
        let mut other = d.alloc_state(s, Shape::new(1, 1, 4, 8).unwrap()).unwrap();
        let err = d.forward_into(s, &mut other, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap_err();
        assert!(matches!(err, dropblock::Error::ShapeMismatch { .. }), "{err}");
        // A state made for one layout refuses the other.
        let nhwc = shape.with_layout(Layout::ChannelsLast);
        let mut first = d.alloc_state(s, shape).unwrap();
        let err = d.forward_into(s, &mut first, &cfg, nhwc, key, Mode::Train, &x, &mut y).unwrap_err();
        let refused = |e: &dropblock::Error| {
            matches!(e, dropblock::Error::ShapeMismatch { expected, actual }
                if expected == "1x2x4x4" && actual == "1x2x4x4 channels-last")
        };
        assert!(refused(&err), "{err}");
        // A 2D block on a 3D tensor of the same element count, before any launch.
        let volume = Shape::new_3d(1, 2, 2, 2, 4).unwrap();
        let square = DropBlockConfig::builder(Block::square(3).unwrap(), 0.1).build().unwrap();
        let err = d.forward(s, &square, volume, key, Mode::Train, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::BlockRankMismatch { block: 2, shape: 3 });
        // In eval too, and in a shard call, as training would refuse it.
        let err = d.forward(s, &square, volume, key, Mode::Eval, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::BlockRankMismatch { block: 2, shape: 3 }, "eval");
        let shard = dropblock::Shard::whole(volume);
        let mut vstate = d.alloc_shard_state(s, &shard).unwrap();
        let mut counts = s.alloc_zeros::<u64>(dropblock::ShardCounts::len_for(volume)).unwrap();
        let err = d.sample_shard(s, &mut vstate, &square, &shard, key, Mode::Eval, &mut counts).unwrap_err();
        assert_eq!(err, dropblock::Error::BlockRankMismatch { block: 2, shape: 3 }, "eval shard");
        // An exact γ too large to sum (1025 classes on each of two axes), in eval too.
        let exact = DropBlockConfig::builder(Block::uniform(1025).unwrap(), 0.1)
            .gamma_rule(dropblock::GammaRule::ExactRate)
            .build()
            .unwrap();
        let wide = Shape::new(1, 1, 2049, 2049).unwrap();
        let mut wstate = d.alloc_state(s, wide).unwrap();
        for mode in [Mode::Train, Mode::Eval] {
            let err = d.sample_into(s, &mut wstate, &exact, wide, key, mode).unwrap_err();
            assert!(matches!(err, dropblock::Error::TooManyCoverageClasses { .. }), "{mode:?}: {err}");
        }
        // Refused while planning, a drawing call leaves the state's last call and
        // its generator as they were (the plan comes before both are touched), on
        // the whole tensor and on a shard.
        let mut wgen = DeviceGenerator::new(s, 4, 0).unwrap();
        d.sample_into(s, &mut wstate, &cfg, wide, &mut wgen, Mode::Train).unwrap();
        let (kept, at) = (wstate.kept(s).unwrap(), wgen.key(s).unwrap());
        let err = d.sample_into(s, &mut wstate, &exact, wide, &mut wgen, Mode::Train).unwrap_err();
        assert!(matches!(err, dropblock::Error::TooManyCoverageClasses { .. }), "{err}");
        assert_eq!((wstate.kept(s).unwrap(), wgen.key(s).unwrap()), (kept, at), "a refused forward");
        let half = dropblock::Shard::new(wide, &[0, 0, 0, 0], &[1, 1, 1025, 2049]).unwrap();
        let mut hstate = d.alloc_shard_state(s, &half).unwrap();
        let mut hcounts = s.alloc_zeros::<u64>(dropblock::ShardCounts::len_for(wide)).unwrap();
        d.sample_shard(s, &mut hstate, &cfg, &half, &mut wgen, Mode::Train, &mut hcounts).unwrap();
        let (counts, at) = (s.clone_dtoh(&hcounts).unwrap(), wgen.key(s).unwrap());
        let err = d.sample_shard(s, &mut hstate, &exact, &half, &mut wgen, Mode::Train, &mut hcounts).unwrap_err();
        assert!(matches!(err, dropblock::Error::TooManyCoverageClasses { .. }), "{err}");
        assert_eq!((s.clone_dtoh(&hcounts).unwrap(), wgen.key(s).unwrap()), (counts, at), "a refused shard call");
        d.finish_shard(s, &mut hstate, &hcounts).unwrap();
        // Noise fill needs the key on the host.
        let noisy = DropBlockConfig::builder(Block::square(3).unwrap(), 0.1)
            .normalize(Normalize::None)
            .fill(dropblock::Fill::Noise)
            .build()
            .unwrap();
        let mut dgen = DeviceGenerator::new(s, 1, 0).unwrap();
        let mut st = d.alloc_state(s, shape).unwrap();
        d.forward_into(s, &mut st, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
        let kept = st.kept(s).unwrap();
        let err = d.forward_into(s, &mut st, &noisy, shape, &mut dgen, Mode::Train, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::NoiseNeedsHostKey);
        // Refused for its key, the call left the state's last call as it was.
        assert_eq!(st.kept(s).unwrap(), kept);

        let err = DeviceGenerator::new(s, 1, DeviceGenerator::MAX_START_OFFSET + 1).unwrap_err();
        assert!(matches!(err, dropblock::Error::OffsetOverflow { .. }), "{err}");
        // A generator or stream of another context (a non-primary one on the same
        // device) is refused before any launch.
        let foreign = cudarc::driver::CudaContext::new_non_primary(0, 0).unwrap().default_stream();
        let mut gen = DeviceGenerator::new(&foreign, 1, 0).unwrap();
        let mut state = d.alloc_state(s, shape).unwrap();
        let err = d.forward_into(s, &mut state, &cfg, shape, &mut gen, Mode::Train, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::WrongContext { what: "device generator" });
        let plan = Plan::new(&cfg, shape, key).unwrap();
        assert!(matches!(d.sample_seeds(&foreign, &plan), Err(dropblock::Error::WrongContext { what: "stream" })));
        // So is a state of another context's, on a stream of the kernels' own:
        // its pointers would reach the kernels.
        let mut other = DropBlockCuda::from_context(foreign.context()).unwrap().alloc_state(&foreign, shape).unwrap();
        let err = d.forward_into(s, &mut other, &cfg, shape, key, Mode::Train, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::WrongContext { what: "state" });
        let err = d.backward(s, &other, &x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::WrongContext { what: "state" });
        // And a buffer of another context's, which the kernels could not read.
        let foreign_x = foreign.alloc_zeros::<f32>(32).unwrap();
        let err = d.forward_into(s, &mut state, &cfg, shape, key, Mode::Train, &foreign_x, &mut y).unwrap_err();
        assert_eq!(err, dropblock::Error::WrongContext { what: "x" }, "a foreign x");
    }
}
