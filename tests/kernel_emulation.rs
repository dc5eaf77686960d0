//! The CUDA kernels' logic, run on the CPU: `tests/emulator/` compiles
//! `kernels/dropblock.cu` as host C++ (one OS thread per CUDA thread, real
//! barriers for `__syncwarp` and `__syncthreads`) and runs on it the steps that
//! `src/cuda/launch.rs` writes for each call, the ones `src/cuda/ops.rs` enqueues
//! on a device: the kernels, their order, grids, memsets and arguments (each
//! checked against its kernel's C++ signature). The keep bits, counts, scales,
//! outputs and gradients must equal the CPU oracle's bit for bit, for random
//! shapes and modes, on grids capped at 1 to 3 blocks or as large as the sequence
//! asks (a device's wave holds them all at these sizes), so indexing, warp
//! cooperation and the launch sequences are checked on machines without a GPU.
//!
//! It needs a C++20 compiler (the target's, as the `cc` crate picks it: `CXX`, else
//! `c++`) and the CUDA headers beside the nvcc build.rs used. Without them the tests are reported as ignored
//! with the reason, and fail under `CI` or `DROPBLOCK_REQUIRE_EMULATOR=1`.

mod common;

use libtest_mimic::Arguments;

fn main() {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, emulation::trials()).exit();
}

#[cfg(not(feature = "cuda"))]
mod emulation {
    pub fn trials() -> Vec<libtest_mimic::Trial> {
        let why = "built without the `cuda` feature, so there are no kernels to emulate";
        vec![super::common::cannot_run("kernel_emulation", why, false)]
    }
}

#[cfg(feature = "cuda")]
mod emulation {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;

    use dropblock::cuda::launch::{self, kernel_name, Arg, Buffer, KernelKey, Pass, Queue};
    use dropblock::cuda::{kernel_names, launch_plan, tiles_with, CudaElement, LaunchPath};
    use dropblock::sampling::Plan;
    use dropblock::{
        abi, cpu, DType, DropBlockConfig, Error, Fill, Layout, Mode, Normalize, RngKey, Shape, ShardCounts, Sharing,
    };
    use half::{bf16, f16};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use libtest_mimic::{Failed, Trial};

    use super::common;

    /// The CUDA include directory next to the nvcc that build.rs compiled the
    /// kernels with.
    fn cuda_include() -> Option<PathBuf> {
        let nvcc = PathBuf::from(env!("DROPBLOCK_NVCC"));
        let inc = nvcc.canonicalize().ok()?.parent()?.parent()?.join("include");
        inc.join("curand_philox4x32_x.h").is_file().then_some(inc)
    }

    /// Compiles the driver, or says why it cannot.
    fn build_driver() -> Result<PathBuf, String> {
        let inc = cuda_include().ok_or(concat!("no CUDA headers beside ", env!("DROPBLOCK_NVCC")))?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // With DROPBLOCK_EMULATOR_SANITIZE=1, the kernels run under AddressSanitizer
        // and UndefinedBehaviorSanitizer (GCC or Clang): an access past a buffer, or
        // a shift by the width, fails the case as compute-sanitizer would on a GPU.
        let sanitize = std::env::var_os("DROPBLOCK_EMULATOR_SANITIZE").is_some_and(|v| v != "0");
        // Cargo's scratch directory for integration tests: reused, never left behind in /tmp.
        let name = if sanitize { "dropblock-emulator-sanitized" } else { "dropblock-emulator" };
        let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        // The target's C++ compiler as `cc` picks it for a build (CXX_<target>, CXX,
        // CXXFLAGS, ...), with the flags the emulator needs.
        let mut build = cc::Build::new();
        if sanitize {
            build.flag("-fsanitize=address,undefined").flag("-fno-sanitize-recover=all").flag("-g");
        }
        let compiler = build
            .cpp(true)
            .std("c++20")
            .target(env!("DROPBLOCK_BUILD_TARGET"))
            .host(env!("DROPBLOCK_BUILD_HOST"))
            .opt_level(1)
            .debug(false)
            .warnings(false)
            .cargo_metadata(false)
            .flag("-ffp-contract=off")
            .flag("-pthread")
            .flag("-w")
            .include(root.join("tests/emulator"))
            .include(root.join("kernels"))
            .include(&inc)
            .try_get_compiler()
            .map_err(|e| format!("no C++ compiler: {e}"))?;
        let mut cmd = compiler.to_command();
        let out = cmd
            .arg(root.join("tests/emulator/driver.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .map_err(|e| format!("cannot run the C++ compiler {:?}: {e}", compiler.path()))?;
        if !out.status.success() {
            // A compile error in the kernels or the emulator is a failure, not a skip.
            panic!("the emulator did not compile:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(exe)
    }

    pub fn trials() -> Vec<Trial> {
        let names = [
            "emulated_kernels_match_cpu_f32",
            "emulated_kernels_match_cpu_f16",
            "emulated_kernels_match_cpu_bf16",
            "emulated_shards_match_cpu_f32",
            "emulated_shards_match_cpu_bf16",
            "the_driver_runs_every_kernel_the_wrappers_load",
        ];
        let driver = match build_driver() {
            Ok(d) => Arc::new(d),
            Err(why) => {
                return names
                    .iter()
                    .map(|n| common::cannot_run(*n, why.clone(), common::required_in_ci("DROPBLOCK_REQUIRE_EMULATOR")))
                    .collect();
            }
        };
        let d = driver.clone();
        let f32_trial = Trial::test(names[0], move || run_cases::<f32>(&d, 1));
        let d = driver.clone();
        let f16_trial = Trial::test(names[1], move || run_cases::<f16>(&d, 2));
        let d = driver.clone();
        let bf16_trial = Trial::test(names[2], move || run_cases::<bf16>(&d, 3));
        let d = driver.clone();
        let shards_f32 = Trial::test("emulated_shards_match_cpu_f32", move || run_shard_cases::<f32>(&d, 4));
        let d = driver.clone();
        let shards_bf16 = Trial::test("emulated_shards_match_cpu_bf16", move || run_shard_cases::<bf16>(&d, 5));
        let d = driver;
        let table = Trial::test(names[5], move || driver_table(&d));
        vec![f32_trial, f16_trial, bf16_trial, shards_f32, shards_bf16, table]
    }

    /// The driver's kernels are the ones the wrappers load (`driver --list`), so
    /// no kernel goes unemulated and the driver names none that is gone.
    fn driver_table(driver: &Path) -> Result<(), Failed> {
        let out = Command::new(driver).arg("--list").output().map_err(|e| Failed::from(e.to_string()))?;
        let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        let mut loaded = kernel_names();
        listed.sort();
        loaded.sort();
        if listed != loaded {
            return Err(format!("the driver runs {listed:?}, the wrappers load {loaded:?}").into());
        }
        Ok(())
    }

    #[derive(Debug, Clone, Copy)]
    struct Case {
        cfg: DropBlockConfig,
        shape: Shape,
        key: RngKey,
        /// The most blocks a grid gets (a device's wave; `u64::MAX`: every grid
        /// as launch.rs sized it).
        wave: u64,
        /// The forward split into its sampling and its element pass
        /// (`sample_into`, then `apply`).
        split: bool,
        in_place: bool,
        unaligned: bool,
        /// Tiles below which the grid-wide passes serve: 0 (only for planes too
        /// large for a tile) or u64::MAX (always).
        min_tiles: u64,
        /// Resident blocks the tiles are balanced over (sets their size), or with
        /// `smallest_tiles` the smallest tile of `q` planes.
        blocks: u64,
        smallest_tiles: bool,
        /// Draw from a device generator instead of the kernel parameters.
        device_key: bool,
        /// Forwards run back to back on one state, with no reset between.
        calls: u32,
    }

    impl Case {
        fn channels_last(&self) -> bool {
            self.shape.layout() == Layout::ChannelsLast
        }
    }

    /// A case of spatial rank `rank`: 1D lengths from 1 to past a tile, 2D maps,
    /// and 3D volumes from a cell to 13^3.
    fn random_case(rng: &mut StdRng, rank: usize) -> Case {
        let sides: &[usize] = match rank {
            1 => &[1, 2, 3, 5, 15, 64, 65, 129, 300, 1000, 4096, 70_000],
            2 => &[1, 2, 3, 5, 7, 9, 13, 14, 19, 33, 64, 65, 70, 129],
            _ => &[1, 2, 3, 4, 5, 7, 9, 13],
        };
        // Channels-last a third of the time, with a channel count that is a multiple
        // of 128 (vector stores), of 32 (whole words), or neither (ORed runs), and
        // one or more 128-channel items.
        // The count is drawn once, so the large ones are not redrawn away by the size
        // limit below (multiples of 128 take the one-pass forward when aligned).
        let channels_last = rng.random_bool(0.35);
        let channels = [1, 3, 17, 32, 64, 70, 128, 128, 160, 256, 256, 300][rng.random_range(0..12)];
        let shape = loop {
            let s = common::random_shape_of_rank(rng, rank, 3, 4, sides);
            let s = if channels_last {
                let mut dims = s.dims().to_vec();
                dims[1] = channels;
                Shape::from_dims(&dims).unwrap().with_layout(Layout::ChannelsLast)
            } else {
                s
            };
            if s.numel() <= 40_000 || (s.numel() <= 140_000 && s.n() * s.c() <= 2) {
                break s;
            }
        };
        // Fused-eligible configs a third of the time: random ones alone reach the
        // fused kernels in only ~1 case in 13.
        let fusable = rng.random_bool(0.3);
        let cfg = if fusable {
            common::random_fusable_config_of_rank(rng, rank)
        } else {
            common::random_config_of_rank(rng, rank)
        };
        // Noise fill now and then (no rescaling, so normalisation None).
        let cfg = if rng.random_bool(0.15) { common::with_noise_fill(&cfg) } else { cfg };
        Case {
            cfg,
            shape,
            key: common::random_key(rng),
            wave: rng.random_range(1..=3),
            split: rng.random_bool(0.2),
            in_place: rng.random_bool(0.3),
            unaligned: rng.random_bool(0.25),
            min_tiles: if !fusable && rng.random_bool(0.4) { u64::MAX } else { 0 },
            blocks: rng.random_range(1..=8),
            smallest_tiles: rng.random_bool(0.3),
            // Noise fill needs a host key (Error::NoiseNeedsHostKey).
            device_key: rng.random_bool(0.3) && cfg.fill() == Fill::Zero,
            calls: rng.random_range(1..=3),
        }
    }

    fn bytes_of<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: the ABI structs and elements are plain data without padding
        // bytes that matter (they are written as the kernels read them).
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
    }

    fn take<T: Copy + Default>(buf: &mut &[u8], n: usize) -> Vec<T> {
        let size = n * std::mem::size_of::<T>();
        let (head, rest) = buf.split_at(size);
        *buf = rest;
        let mut v = vec![T::default(); n];
        // SAFETY: `v` has room for exactly `size` bytes of plain data.
        unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), v.as_mut_ptr().cast::<u8>(), size) };
        v
    }

    /// A call's steps as src/cuda/launch.rs writes them, and the buffers they run
    /// on, serialised for the driver (tests/emulator/driver.cpp documents the format).
    struct Recorder {
        buffers: Vec<u8>,
        n_buffers: u32,
        steps: Vec<u8>,
        n_steps: u32,
        /// Grids are capped at this many blocks, as a device caps them at a wave.
        wave: u64,
        /// The kernels launched, in order.
        kernels: Vec<String>,
    }

    /// The driver's element types.
    #[derive(Clone, Copy)]
    enum Elem {
        U32 = 0,
        U64 = 1,
        F32 = 2,
        F16 = 3,
        BF16 = 4,
    }

    fn elem_of<T: CudaElement>() -> Elem {
        match T::DTYPE {
            DType::F32 => Elem::F32,
            DType::F16 => Elem::F16,
            DType::BF16 => Elem::BF16,
        }
    }

    impl Recorder {
        fn new(wave: u64) -> Self {
            Self { buffers: Vec::new(), n_buffers: 0, steps: Vec::new(), n_steps: 0, wave, kernels: Vec::new() }
        }

        fn declare(&mut self, b: Buffer, elem: Elem, elements: usize, offset: u32, alias: u32, zeroed: bool) {
            for v in [b as u32, elem as u32] {
                self.buffers.extend_from_slice(&v.to_le_bytes());
            }
            self.buffers.extend_from_slice(&(elements as u64).to_le_bytes());
            for v in [offset, alias, zeroed as u32] {
                self.buffers.extend_from_slice(&v.to_le_bytes());
            }
            self.n_buffers += 1;
        }

        /// A buffer of `elements`, `offset` elements past an aligned start; zeroed,
        /// or filled with bytes the kernels must overwrite.
        fn buffer(&mut self, b: Buffer, elem: Elem, elements: usize, offset: u32, zeroed: bool) {
            self.declare(b, elem, elements, offset, u32::MAX, zeroed);
        }

        /// `b` is `of` (y in place is x).
        fn alias(&mut self, b: Buffer, of: Buffer) {
            self.declare(b, Elem::U32, 0, 0, of as u32, false);
        }

        fn step(&mut self, kind: u32) {
            self.steps.extend_from_slice(&kind.to_le_bytes());
            self.n_steps += 1;
        }

        fn upload<T: Copy>(&mut self, b: Buffer, data: &[T]) {
            self.step(2);
            self.steps.extend_from_slice(&(b as u32).to_le_bytes());
            let bytes: Vec<u8> = data.iter().flat_map(|v| bytes_of(v).to_vec()).collect();
            self.steps.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            self.steps.extend_from_slice(&bytes);
        }

        /// The buffer's contents at this point go into the response.
        fn save(&mut self, b: Buffer) {
            self.step(3);
            self.steps.extend_from_slice(&(b as u32).to_le_bytes());
        }

        fn request(&self) -> Vec<u8> {
            let mut req = self.n_buffers.to_le_bytes().to_vec();
            req.extend_from_slice(&self.buffers);
            req.extend_from_slice(&self.n_steps.to_le_bytes());
            req.extend_from_slice(&self.steps);
            req
        }

        fn push_struct<S: Copy>(&mut self, tag: u32, v: &S) {
            self.steps.extend_from_slice(&tag.to_le_bytes());
            self.steps.extend_from_slice(&(std::mem::size_of::<S>() as u32).to_le_bytes());
            self.steps.extend_from_slice(bytes_of(v));
        }
    }

    impl Queue for Recorder {
        fn zero(&mut self, buffer: Buffer, bytes: u64) -> dropblock::Result<()> {
            self.step(0);
            self.steps.extend_from_slice(&(buffer as u32).to_le_bytes());
            self.steps.extend_from_slice(&bytes.to_le_bytes());
            Ok(())
        }

        fn launch(&mut self, kernel: KernelKey, blocks: u64, args: &[Arg<'_>]) -> dropblock::Result<()> {
            let name = kernel_name(kernel);
            self.step(1);
            self.steps.extend_from_slice(&(name.len() as u32).to_le_bytes());
            self.steps.extend_from_slice(name.as_bytes());
            let grid = u32::try_from(blocks.clamp(1, self.wave)).expect("a grid of the small shapes emulated");
            self.steps.extend_from_slice(&grid.to_le_bytes());
            self.steps.extend_from_slice(&(args.len() as u32).to_le_bytes());
            for arg in args {
                match arg {
                    Arg::Geometry(v) => self.push_struct(0, *v),
                    Arg::Tiles(v) => self.push_struct(1, *v),
                    Arg::Sampling(v) => self.push_struct(2, *v),
                    Arg::Apply(v) => self.push_struct(3, *v),
                    Arg::Shard(v) => self.push_struct(4, *v),
                    Arg::U32(v) => {
                        self.steps.extend_from_slice(&5u32.to_le_bytes());
                        self.steps.extend_from_slice(&v.to_le_bytes());
                    }
                    Arg::Ptr(b) => {
                        self.steps.extend_from_slice(&6u32.to_le_bytes());
                        self.steps.extend_from_slice(&(*b as u32).to_le_bytes());
                    }
                    Arg::Null => self.steps.extend_from_slice(&7u32.to_le_bytes()),
                }
            }
            self.kernels.push(name);
            Ok(())
        }
    }

    /// Random cases of every spatial rank, which must between them take every
    /// launch path with both the vector and the unaligned kernels, and in every
    /// rank both the tiled and the grid-wide passes.
    fn run_cases<T: CudaElement>(driver: &Path, seed: u64) -> Result<(), Failed> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seen = std::collections::HashSet::new();
        let mut seen_rank = std::collections::HashSet::new();
        let mut seen_layout = std::collections::HashSet::new();
        let (mut noise_cases, mut one_pass_cases, mut split_cases) = (0, 0, 0);
        for i in 0..84 {
            let rank = [2, 1, 3][i as usize % 3];
            let mut case = random_case(&mut rng, rank);
            if i % 5 == 4 {
                // Every grid as launch.rs sized it, as a device whose wave holds it runs it.
                case.wave = u64::MAX;
            }
            let (path, vector, one_pass) =
                check::<T>(driver, case, i).map_err(|e| Failed::from(format!("{case:?}: {e}")))?;
            one_pass_cases += one_pass as u32;
            seen.insert((path, vector));
            seen_rank.insert((rank, path == LaunchPath::Grid));
            if case.channels_last() {
                seen_layout.insert((path == LaunchPath::Grid, case.shape.c().is_multiple_of(32)));
            }
            noise_cases += (case.cfg.fill() == Fill::Noise) as u32;
            split_cases += case.split as u32;
        }
        if split_cases < 5 {
            return Err(format!("only {split_cases} forwards split into sampling and apply: widen random_case").into());
        }
        if noise_cases < 4 {
            return Err(format!("only {noise_cases} noise-fill cases: widen random_case").into());
        }
        if one_pass_cases < 2 {
            return Err(format!("only {one_pass_cases} one-pass channels-last cases: widen random_case").into());
        }
        for grid in [false, true] {
            for whole_words in [false, true] {
                if !seen_layout.contains(&(grid, whole_words)) {
                    return Err(format!(
                        "no channels-last case took grid={grid} with C % 32 == 0: {whole_words}: widen random_case"
                    )
                    .into());
                }
            }
        }
        for rank in 1..=3 {
            for grid in [false, true] {
                if !seen_rank.contains(&(rank, grid)) {
                    return Err(format!("no {rank}D case took grid={grid}: widen random_case").into());
                }
            }
        }
        // The extremes of the ranks: 1D planes of 3 cells (21 planes to a window)
        // and a 3D plane larger than a tile (the grid-wide passes).
        for (i, dims) in [&[3usize, 7, 3][..], &[1, 1, 20, 60, 60]].into_iter().enumerate() {
            let rank = dims.len() - 2;
            let mut case = random_case(&mut rng, rank);
            case.shape = Shape::from_dims(dims).unwrap();
            let check_case = check::<T>(driver, case, 500 + i as u64);
            let (path, _, _) = check_case.map_err(|e| Failed::from(format!("{case:?}: {e}")))?;
            if rank == 3 && path != LaunchPath::Grid {
                return Err(format!("{case:?}: a plane past a tile took {path:?}").into());
            }
        }
        // The one-pass channels-last forward under each normalisation and sharing,
        // with samples whose scales differ (PerSample reads sample n's); and, on
        // unaligned buffers, the transpose kernel's 16-byte stores of the same bits.
        for (i, (normalize, sharing, aligned)) in [
            (Normalize::PerSample, Sharing::None, true),
            (Normalize::PerSample, Sharing::Channels, true),
            (Normalize::Global, Sharing::Batch, true),
            (Normalize::Expected, Sharing::None, true),
            (Normalize::Global, Sharing::None, false),
        ]
        .into_iter()
        .enumerate()
        {
            let mut case = random_case(&mut rng, 2);
            case.shape = Shape::from_dims(&[3, 128 * (1 + i % 2), 5, 9]).unwrap().with_layout(Layout::ChannelsLast);
            case.cfg = case.cfg.to_builder().fill(Fill::Zero).normalize(normalize).sharing(sharing).build().unwrap();
            case.unaligned = !aligned;
            case.split = false;
            let (_, _, one_pass) =
                check::<T>(driver, case, 700 + i as u64).map_err(|e| Failed::from(format!("{case:?}: {e}")))?;
            if one_pass != aligned {
                return Err(format!(
                    "{case:?}: a channels-last forward of 128·k channels, aligned: {aligned}, one pass: {one_pass}"
                )
                .into());
            }
        }
        // PerSample with samples shorter than a 16-byte vector (C·L of 1 to 7
        // elements, both layouts, aligned buffers), where one vector spans three or
        // more samples and each needs its own scale: 1x1 blocks at drop_prob 0.5
        // leave the samples different kept counts.
        for (i, (c, l, layout)) in [
            (1, 1, Layout::ChannelsFirst),
            (1, 3, Layout::ChannelsFirst),
            (3, 1, Layout::ChannelsLast),
            (1, 5, Layout::ChannelsFirst),
            (7, 1, Layout::ChannelsFirst),
            (2, 3, Layout::ChannelsLast),
        ]
        .into_iter()
        .enumerate()
        {
            let mut case = random_case(&mut rng, 1);
            case.shape = Shape::new_1d(24, c, l).unwrap().with_layout(layout);
            case.cfg = DropBlockConfig::builder(dropblock::Block::uniform(1).unwrap(), 0.5)
                .normalize(Normalize::PerSample)
                .build()
                .unwrap();
            case.unaligned = false;
            check::<T>(driver, case, 800 + i as u64).map_err(|e| Failed::from(format!("{case:?}: {e}")))?;
        }
        for (i, case) in exact_threshold_cases().into_iter().enumerate() {
            let saved = cpu::sample(&case.cfg, case.shape, case.key, Mode::Train).unwrap();
            if saved.kept() != case.shape.numel() as u64 {
                return Err(format!("{case:?}: the CPU placed a seed on a draw equal to T[len-1]").into());
            }
            check::<T>(driver, case, 1000 + i as u64).map_err(|e| Failed::from(format!("{case:?}: {e}")))?;
        }
        for path in [LaunchPath::Fused, LaunchPath::Tiles, LaunchPath::Grid] {
            for vector in [true, false] {
                if !seen.contains(&(path, vector)) {
                    return Err(format!("no case took {path:?} with vector={vector}: widen random_case").into());
                }
            }
        }
        Ok(())
    }

    /// Calls whose only window's first draw equals its last threshold (the stop
    /// test's equality, which random γs never reach): one cell, and 64 planes of
    /// one cell in one window, on the tiled and the grid-wide paths.
    fn exact_threshold_cases() -> Vec<Case> {
        let key = RngKey::new(9, 3).unwrap();
        let u = key.draw(0, 0) as u64;
        let mut cases = Vec::new();
        for (shape, len) in [(Shape::new(1, 1, 1, 1).unwrap(), 1usize), (Shape::new(2, 32, 1, 1).unwrap(), 64)] {
            for min_tiles in [0, u64::MAX] {
                cases.push(Case {
                    cfg: common::config_with_gamma(common::gamma_with_threshold(len - 1, u)),
                    shape,
                    key,
                    wave: 1,
                    split: false,
                    in_place: false,
                    unaligned: false,
                    min_tiles,
                    blocks: 1,
                    smallest_tiles: false,
                    device_key: false,
                    calls: 1,
                });
            }
        }
        cases
    }

    /// Runs the driver on one request (tests/emulator/driver.cpp): its response.
    fn call_driver(driver: &Path, req: &[u8]) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().unwrap();
        let (rq, rs) = (dir.path().join("request"), dir.path().join("response"));
        std::fs::write(&rq, req).unwrap();
        let out = Command::new(driver).arg(&rq).arg(&rs).output().unwrap();
        if !out.status.success() {
            return Err(format!("driver failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(std::fs::read(&rs).unwrap())
    }

    /// Sharded calls: random grids of shards over random shapes of every rank,
    /// layout, sharing and normalisation. Each shard runs the kernels of
    /// `sample_shard`, `finish_shard` (with the counts the CPU shards summed) and
    /// `apply`; its counts, keep mask, scales and y must be the CPU shard's bit for
    /// bit (and those reassemble the unsharded call: tests/behaviour/shards.rs).
    fn run_shard_cases<T: CudaElement>(driver: &Path, seed: u64) -> Result<(), Failed> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut small, mut large, mut noise, mut tampered, mut identity, mut device_keys) = (0, 0, 0, 0, 0, 0);
        let (mut partial, mut twice) = (0, 0);
        for case in 0..36 {
            let rank = 1 + case % 3;
            let sides: &[usize] = match rank {
                1 => &[1, 3, 15, 64, 65, 300],
                2 => &[1, 2, 5, 9, 14, 19, 33],
                _ => &[1, 2, 4, 7, 9],
            };
            let mut global = common::random_shape_of_rank(&mut rng, rank, 3, 5, sides);
            if rng.random_bool(0.3) {
                global = global.with_layout(Layout::ChannelsLast);
            }
            let mut cfg = common::random_config_of_rank(&mut rng, rank);
            if rng.random_bool(0.2) {
                cfg = common::with_noise_fill(&cfg);
                noise += 1;
            }
            let shards = common::random_grid(&mut rng, global, 3);
            let key = common::random_key(&mut rng);
            let plan = Plan::new(&cfg, global, key).unwrap();
            if plan.seed_cells() <= 64 {
                small += 1;
            } else {
                large += 1;
            }
            let sampled: Vec<cpu::ShardSample> =
                shards.iter().map(|s| cpu::sample_shard(&cfg, s, key, Mode::Train).unwrap()).collect();
            let mut summed = sampled[0].counts().clone();
            sampled[1..].iter().for_each(|s| summed.add(s.counts()).unwrap());
            // Every third case, the first shard also gets counts no shards could
            // give: a sample keeping one more than its elements, or a total off by
            // one from the samples' sum. In the next third, where the scale divides
            // by counts its own do not cover (every sample for Global, its own for
            // PerSample), it gets its own counts, never summed with the others',
            // or (in turn with those, where another shard holds the same samples
            // and as many elements) the sum with itself counted twice and that one
            // missed.
            let (first, sample_len) = (shards[0].local(), global.c() * global.plane_len());
            let uncovered = match cfg.normalize() {
                Normalize::Global => true,
                Normalize::PerSample => first.c() * first.plane_len() < sample_len,
                _ => false,
            };
            let impossible = match case % 3 {
                0 => {
                    let mut bad = summed.entries().to_vec();
                    let samples = (bad.len() - 1) / 3;
                    match case % 2 {
                        0 => bad[1] = sample_len as u64 + 1,
                        _ => bad[0] += 1,
                    }
                    if case % 2 == 0 {
                        bad[0] = bad[1..=samples].iter().sum();
                    }
                    Some(bad)
                }
                1 if uncovered && shards.len() > 1 => {
                    let like_first = |s: &&dropblock::Shard| {
                        let (a, b) = (s.local(), first);
                        s.offset()[0] == shards[0].offset()[0]
                            && (a.n(), a.c() * a.plane_len()) == (b.n(), b.c() * b.plane_len())
                    };
                    match shards[1..].iter().position(|s| like_first(&s)).filter(|_| twice <= partial) {
                        Some(j) => {
                            twice += 1;
                            let (own, other) = (sampled[0].counts().entries(), sampled[1 + j].counts().entries());
                            let sum = summed.entries().iter().zip(own).zip(other);
                            Some(sum.map(|((s, a), b)| s.wrapping_add(*a).wrapping_sub(*b)).collect())
                        }
                        None => {
                            partial += 1;
                            Some(sampled[0].counts().entries().to_vec())
                        }
                    }
                }
                _ => None,
            };
            for (i, (shard, sample)) in shards.iter().zip(sampled).enumerate() {
                let tag = format!("case {case}: {cfg} on {global}, shard {:?} + {}", shard.offset(), shard.local());
                // Every other shard of a case without noise fill draws from a
                // device generator holding the key.
                let device_key = (cfg.fill() != Fill::Noise && (case + i) % 2 == 1).then_some(key);
                device_keys += device_key.is_some() as u32;
                let mut run = |sample, impossible| {
                    let seed = 7 * case as u64 + i as u64;
                    let call = ShardCall { cfg: &cfg, plan: &plan, shard, summed: &summed, device_key };
                    check_shard::<T>(driver, &mut rng, call, sample, impossible, seed)
                        .map_err(|e| Failed::from(format!("{tag}: {e}")))
                };
                if let (0, Some(bad)) = (i, &impossible) {
                    run(sample.clone(), Some(bad.clone()))?;
                    tampered += 1;
                }
                run(sample, None)?;
                if (case + i).is_multiple_of(4) {
                    check_identity_shard(driver, &cfg, shard, key).map_err(|e| Failed::from(format!("{tag}: {e}")))?;
                    identity += 1;
                }
            }
        }
        if small == 0
            || large == 0
            || noise < 3
            || tampered < 14
            || partial < 2
            || twice < 1
            || identity < 5
            || device_keys < 10
        {
            let what = format!(
                "{small} cases of planes of <= 64 seed cells, {large} larger, {noise} of noise fill, \
                 {tampered} of impossible or partial counts ({partial} partial, {twice} a shard twice), {identity} \
                 identity calls, {device_keys} device keys"
            );
            return Err(format!("{what}: widen the cases").into());
        }
        Ok(())
    }

    /// An eval-mode shard call (`sample_shard`'s identity sequence): the shard's
    /// counts are its whole slices, as the CPU's.
    fn check_identity_shard(
        driver: &Path,
        cfg: &DropBlockConfig,
        shard: &dropblock::Shard,
        key: RngKey,
    ) -> Result<(), String> {
        let sample = cpu::sample_shard(cfg, shard, key, Mode::Eval).unwrap();
        let entries = sample.counts().entries().len();
        let mut rec = Recorder::new(1);
        rec.buffer(Buffer::ShardCounts, Elem::U64, entries, 0, false);
        launch::sample_shard_identity(&mut rec, shard, entries as u64).map_err(|e| e.to_string())?;
        rec.save(Buffer::ShardCounts);
        let resp = call_driver(driver, &rec.request())?;
        let counts: Vec<u64> = take(&mut &resp[..], entries);
        if counts != sample.counts().entries() {
            return Err(format!("eval counts {counts:?} != cpu {:?}", sample.counts().entries()));
        }
        Ok(())
    }

    /// The buffers of a call on a state of `shape` (those of
    /// `DropBlockCuda::alloc_state`) and its tensors, `offset` elements past an
    /// aligned start (y is x in place). The counters start zeroed, as allocated;
    /// everything else holds bytes the sequence must overwrite or zero.
    fn declare_call<T: CudaElement>(rec: &mut Recorder, shape: Shape, in_place: bool, offset: u32) {
        let (n, words) = (shape.numel(), shape.numel().div_ceil(32));
        rec.buffer(Buffer::X, elem_of::<T>(), n, offset, false);
        if in_place {
            rec.alias(Buffer::Y, Buffer::X);
        } else {
            rec.buffer(Buffer::Y, elem_of::<T>(), n, offset, false);
        }
        rec.buffer(Buffer::KeepBits, Elem::U32, words, 0, false);
        if shape.layout() == Layout::ChannelsLast {
            rec.buffer(Buffer::PlaneBits, Elem::U32, words, 0, false);
        }
        rec.buffer(Buffer::Counts, Elem::U64, abi::DROPBLOCK_COUNT_SAMPLES as usize + shape.n(), 0, true);
        rec.buffer(Buffer::Scales, Elem::F32, shape.n(), 0, false);
    }

    /// A shard's call: the global call's config and plan, the shard, the counts
    /// summed over every shard, and the key of a device generator it draws from
    /// (`None`: the plan's own key).
    struct ShardCall<'a> {
        cfg: &'a DropBlockConfig,
        plan: &'a Plan,
        shard: &'a dropblock::Shard,
        summed: &'a ShardCounts,
        device_key: Option<RngKey>,
    }

    /// One shard's call as `sample_shard`, the all-reduce (the counts `summed`, or
    /// `impossible` ones, written over the shard's own), `finish_shard` and `apply`
    /// record it.
    fn check_shard<T: CudaElement>(
        driver: &Path,
        rng: &mut StdRng,
        call: ShardCall<'_>,
        sample: cpu::ShardSample,
        impossible: Option<Vec<u64>>,
        seed: u64,
    ) -> Result<(), String> {
        let ShardCall { cfg, shard, summed, device_key, .. } = call;
        // With a device generator the plan's key is a placeholder, as in ops.rs.
        let plan = &placeholder_if(call.plan, device_key.is_some());
        let local = shard.local();
        let n = local.numel();
        let x: Vec<T> = common::input(n, seed).into_iter().map(T::from_f32).collect();
        let own = sample.counts().clone();
        // What `finish` makes of the impossible counts, if any: it must refuse them.
        let refused = impossible.as_ref().map(|bad| {
            ShardCounts::from_entries(shard.global(), bad.clone()).and_then(|c| sample.clone().finish(&c).map(drop))
        });
        let saved = sample.finish(summed).unwrap();
        let mut y_cpu = vec![T::default(); n];
        cpu::apply(&saved, &x, &mut y_cpu).unwrap();
        let dy: Vec<T> = common::input(n, seed ^ 0xD7).into_iter().map(T::from_f32).collect();
        let mut dx_cpu = vec![T::default(); n];
        cpu::backward(&saved, &dy, &mut dx_cpu).unwrap();
        let (sh, local_g) = shard.kernel_params(plan).unwrap();
        let launch = launch::shard_call_plan(cfg, local, local_g);
        let entries = summed.entries().len();
        let wave = rng.random_range(1..=3);
        let run = |counts: &[u64]| -> Result<Vec<u8>, String> {
            let mut rec = Recorder::new(wave);
            declare_call::<T>(&mut rec, local, false, 0);
            rec.buffer(Buffer::PlaneKept, Elem::U64, local.n() * local.c(), 0, false);
            rec.buffer(Buffer::ShardCounts, Elem::U64, entries, 0, false);
            if let Some(k) = device_key {
                rec.buffer(Buffer::Generator, Elem::U64, 2, 0, false);
                rec.upload(Buffer::Generator, &[k.seed(), k.offset()]);
            }
            rec.upload(Buffer::X, &x);
            let err = |e: Error| e.to_string();
            launch::sample_shard(&mut rec, plan, &sh, &launch, local, entries as u64, device_key.is_some())
                .map_err(err)?;
            rec.save(Buffer::ShardCounts);
            rec.upload(Buffer::ShardCounts, counts);
            launch::finish_shard(&mut rec, &sh, &launch).map_err(err)?;
            launch::element_pass(&mut rec, plan, &launch, local, Some(sh), T::DTYPE, true, Pass::Forward)
                .map_err(err)?;
            for b in [Buffer::KeepBits, Buffer::Scales, Buffer::Y] {
                rec.save(b);
            }
            // The backward, into a y of junk again.
            rec.upload(Buffer::X, &dy);
            rec.upload(Buffer::Y, &vec![0xDEu8; n * std::mem::size_of::<T>()]);
            launch::element_pass(&mut rec, plan, &launch, local, Some(sh), T::DTYPE, true, Pass::Backward)
                .map_err(err)?;
            rec.save(Buffer::Y);
            if device_key.is_some() {
                rec.save(Buffer::Generator);
            }
            call_driver(driver, &rec.request())
        };
        if let Some(bad) = impossible {
            // Counts no shards could give, or one shard's where the scale needs
            // every shard's: the CPU refuses them, and finish_shard's kernel, which
            // cannot return an error, makes every scale NaN.
            if !matches!(refused, Some(Err(Error::ImpossibleShardCounts(_)))) {
                return Err(format!("the CPU took the impossible counts {bad:?}"));
            }
            let resp = run(&bad)?;
            // Past the shard's own counts and the keep bits.
            let mut buf = &resp[entries * 8 + n.div_ceil(32) * 4..];
            let scales: Vec<f32> = take(&mut buf, local.n());
            let k = saved.scales().len();
            if !scales[..k].iter().all(|s| s.is_nan()) {
                return Err(format!("impossible counts {bad:?} gave the scales {:?}", &scales[..k]));
            }
            return Ok(());
        }
        let resp = run(summed.entries())?;
        let mut buf = &resp[..];
        let counts: Vec<u64> = take(&mut buf, entries);
        let bits: Vec<u32> = take(&mut buf, n.div_ceil(32));
        let scales: Vec<f32> = take(&mut buf, local.n());
        let y: Vec<T> = take(&mut buf, n);
        let dx: Vec<T> = take(&mut buf, n);
        if let Some(k) = device_key {
            generator_stepped(&take::<u64>(&mut buf, 2), k, 1)?;
        }
        if counts != own.entries() {
            return Err(format!("counts {counts:?} != cpu {:?}", own.entries()));
        }
        let mask = keep_mask_of(&bits, &local_g, local);
        if mask != saved.keep_mask().unwrap() {
            let i = mask.iter().zip(saved.keep_mask().unwrap()).position(|(a, b)| *a != b).unwrap();
            return Err(format!("keep mask differs first at element {i}"));
        }
        let k = saved.scales().len();
        if scales[..k] != *saved.scales() {
            return Err(format!("scales {:?} != cpu {:?}", &scales[..k], saved.scales()));
        }
        if let Some(i) = (0..n).find(|&i| !common::same(y[i], y_cpu[i])) {
            return Err(format!("y[{i}] = {:?}, cpu {:?}", y[i], y_cpu[i]));
        }
        if let Some(i) = (0..n).find(|&i| !common::same(dx[i], dx_cpu[i])) {
            return Err(format!("dx[{i}] = {:?}, cpu {:?}", dx[i], dx_cpu[i]));
        }
        Ok(())
    }

    /// `plan`, or with a device generator the plan the wrapper passes its kernels:
    /// its key a placeholder (ops.rs, `resolve_key`), the generator holding the key.
    fn placeholder_if(plan: &Plan, device_key: bool) -> Plan {
        if device_key {
            plan.with_key(RngKey::new(0, 0).unwrap())
        } else {
            *plan
        }
    }

    /// A device generator that started at `key` holds `after` once `calls` drawing
    /// calls have stepped it (mod 2^64: a DeviceGenerator never starts near the top).
    fn generator_stepped(after: &[u64], key: RngKey, calls: u32) -> Result<(), String> {
        let stepped = key.offset().wrapping_add(abi::DROPBLOCK_OFFSET_STRIDE as u64 * calls as u64);
        if after != [key.seed(), stepped] {
            return Err(format!("generator after {calls} call(s) {after:?}, expected [{}, {stepped}]", key.seed()));
        }
        Ok(())
    }

    /// The keep mask (u8 in memory order) of keep bits laid out for `g` (the
    /// planes' bits, or channels-last bits in the tensor's order).
    fn keep_mask_of(bits: &[u32], g: &abi::DropBlockGeometry, shape: Shape) -> Vec<u8> {
        let (n, l) = (shape.numel(), shape.plane_len());
        let bit = |b: usize| (bits[b / 32] >> (b % 32) & 1) as u8;
        if shape.layout() == Layout::ChannelsLast {
            return (0..n).map(bit).collect();
        }
        let plane_of = |s: usize, c: usize| match g.sharing {
            abi::DROPBLOCK_SHARE_NONE => s * g.c as usize + c,
            abi::DROPBLOCK_SHARE_CHANNELS => s,
            abi::DROPBLOCK_SHARE_BATCH => c,
            _ => 0,
        };
        let mut mask = vec![0u8; n];
        for (i, slice) in mask.chunks_mut(l).enumerate() {
            let base = plane_of(i / shape.c(), i % shape.c()) * l;
            for (cell, v) in slice.iter_mut().enumerate() {
                *v = bit(base + cell);
            }
        }
        mask
    }

    /// Runs case `c` emulated and against the CPU: `calls` forwards (each split
    /// into its sampling and its element pass where `c.split`), then a backward
    /// from the same state. Returns the launch path it took (by the kernels that
    /// ran), whether its forward's element
    /// pass took 16-byte vectors, and whether a channels-last forward took the
    /// one-pass kernel.
    fn check<T: CudaElement>(driver: &Path, c: Case, seed: u64) -> Result<(LaunchPath, bool, bool), String> {
        let (shape, n) = (c.shape, c.shape.numel());
        let x: Vec<T> = common::input(n, seed).into_iter().map(T::from_f32).collect();
        let dy: Vec<T> = common::input(n, seed ^ 0xD7).into_iter().map(T::from_f32).collect();
        // After `calls` calls a device generator has stepped to the last call's key
        // (one call where that would pass the largest offset).
        let last = |calls: u32| RngKey::new(c.key.seed(), c.key.offset().checked_add(17 * (calls as u64 - 1))?).ok();
        let (key, calls) = match (c.device_key, last(c.calls)) {
            (false, _) => (c.key, c.calls),
            (true, Some(k)) => (k, c.calls),
            (true, None) => (c.key, 1),
        };
        let mut y_cpu = vec![T::default(); n];
        let saved = cpu::forward(&c.cfg, shape, key, Mode::Train, &x, &mut y_cpu).unwrap();
        let mut dx_cpu = vec![T::default(); n];
        cpu::backward(&saved, &dy, &mut dx_cpu).unwrap();
        // With a device generator the plan's key is a placeholder, as in ops.rs.
        let seed_plan = Plan::new(&c.cfg, shape, c.key).unwrap();
        let plan = placeholder_if(&seed_plan, c.device_key);
        let mut launch = launch_plan(&c.cfg, shape, c.min_tiles, c.blocks).unwrap();
        if c.smallest_tiles && launch.path != LaunchPath::Grid {
            launch.tiles =
                tiles_with(plan.geometry(), launch.apply.plane_len, plan.geometry().planes_per_window as u64);
        }
        let (path, aligned) = (launch.path, !c.unaligned);

        let mut rec = Recorder::new(c.wave);
        declare_call::<T>(&mut rec, shape, c.in_place, c.unaligned as u32);
        if c.device_key {
            rec.buffer(Buffer::Generator, Elem::U64, 2, 0, false);
            rec.upload(Buffer::Generator, &[c.key.seed(), c.key.offset()]);
        }
        let err = |e: Error| e.to_string();
        for call in 0..calls {
            if call == 0 || c.in_place {
                rec.upload(Buffer::X, &x);
            }
            let io = (!c.split).then_some(aligned);
            launch::forward(&mut rec, &plan, &launch, shape, T::DTYPE, io, c.device_key).map_err(err)?;
            if c.split {
                launch::element_pass(&mut rec, &plan, &launch, shape, None, T::DTYPE, aligned, Pass::Forward)
                    .map_err(err)?;
            }
        }
        let forward_kernels = rec.kernels.clone();
        for b in [Buffer::KeepBits, Buffer::Counts, Buffer::Scales, Buffer::Y] {
            rec.save(b);
        }
        if c.device_key {
            rec.save(Buffer::Generator);
        }
        rec.upload(Buffer::X, &dy);
        if !c.in_place {
            // A y of junk again, which the backward must overwrite.
            rec.upload(Buffer::Y, &vec![0xDEu8; n * std::mem::size_of::<T>()]);
        }
        launch::element_pass(&mut rec, &plan, &launch, shape, None, T::DTYPE, aligned, Pass::Backward).map_err(err)?;
        rec.save(Buffer::Y);
        // The sampler's raw seed words (`DropBlockCuda::sample_seeds`), against the
        // contract's walk, under the case's own key: a wrong word shows here even
        // where growing hides it.
        rec.buffer(Buffer::Seeds, Elem::U64, seed_plan.windows() as usize, 0, false);
        launch::sample_seeds(&mut rec, &seed_plan).map_err(err)?;
        rec.save(Buffer::Seeds);

        let resp = call_driver(driver, &rec.request())?;
        let mut buf = &resp[..];
        let bits: Vec<u32> = take(&mut buf, n.div_ceil(32));
        let counts: Vec<u64> = take(&mut buf, abi::DROPBLOCK_COUNT_SAMPLES as usize + shape.n());
        let scales: Vec<f32> = take(&mut buf, shape.n());
        let y: Vec<T> = take(&mut buf, n);
        let key_after: Vec<u64> = if c.device_key { take(&mut buf, 2) } else { Vec::new() };
        let dx: Vec<T> = take(&mut buf, n);
        let seeds: Vec<u64> = take(&mut buf, seed_plan.windows() as usize);
        let tag = format!("{path:?}, {calls} call(s): {:?}", rec.kernels);
        if c.device_key {
            generator_stepped(&key_after, c.key, calls).map_err(|e| format!("{e} ({tag})"))?;
        }
        let contract = common::seed_windows(&seed_plan);
        if let Some(w) = (0..contract.len()).find(|&w| seeds[w] != contract[w]) {
            return Err(format!("sample_seeds: window {w} has {:#x}, the contract {:#x}", seeds[w], contract[w]));
        }
        let mask = keep_mask_of(&bits, plan.geometry(), shape);
        if mask != saved.keep_mask().unwrap() {
            let i = mask.iter().zip(saved.keep_mask().unwrap()).position(|(a, b)| *a != b).unwrap();
            return Err(format!("keep mask differs first at element {i} ({tag})"));
        }
        let k = saved.scales().len();
        if scales[..k] != *saved.scales() {
            return Err(format!("scales {:?} != cpu {:?} ({tag})", &scales[..k], saved.scales()));
        }
        if counts.iter().any(|&v| v != 0) {
            return Err(format!("counters {counts:?} left non-zero after the call ({tag})"));
        }
        if let Some(i) = (0..n).find(|&i| !common::same(y[i], y_cpu[i])) {
            return Err(format!("y[{i}] = {:?}, cpu {:?} ({tag})", y[i], y_cpu[i]));
        }
        if let Some(i) = (0..n).find(|&i| !common::same(dx[i], dx_cpu[i])) {
            return Err(format!("dx[{i}] = {:?}, cpu {:?} ({tag})", dx[i], dx_cpu[i]));
        }
        // The path the forward took, from the kernels that ran: a split forward on
        // the fused path samples with `count_mask` and applies on its own.
        let ran = |k: &str| forward_kernels.iter().any(|f| f.starts_with(k));
        let taken = if ran("dropblock_fused") {
            LaunchPath::Fused
        } else if ran("dropblock_count_mask") {
            LaunchPath::Tiles
        } else {
            LaunchPath::Grid
        };
        let scalar = forward_kernels.iter().any(|k| k.contains("unaligned") || k.starts_with("dropblock_fill_noise"));
        Ok((taken, !scalar, ran("dropblock_apply_channels_last")))
    }
}
