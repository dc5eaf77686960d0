//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::any::Any;

#[cfg(feature = "candle")]
pub mod candle;

use dropblock::{
    Anchor, Block, DropBlockConfig, Element, GammaRule, Layout, Normalize, Placement, RngKey, Shape, Shard, Sharing,
};
use libtest_mimic::{Completion, Failed, Trial};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs `cmd` (stdout discarded) to its end and returns its exit status and
/// stderr; `Err` when it is still running after `hang`, which then kills it. A
/// guard against hangs, generous by design: tests do not time.
pub fn status_unless_hung(
    cmd: &mut std::process::Command,
    hang: std::time::Duration,
) -> Result<(std::process::ExitStatus, String), String> {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    // Read on a thread, so a child that writes more than a pipe holds is not
    // taken for a hung one.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut err).ok();
        err
    });
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok((status, reader.join().unwrap_or_default()));
        }
        if start.elapsed() > hang {
            child.kill().ok();
            child.wait().ok();
            return Err(format!("hung: still running after {hang:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A channels-first buffer of `shape`, `(n, c, cell)` order, in channels-last
/// `(n, cell, c)` order.
pub fn to_channels_last<T: Copy>(v: &[T], shape: Shape) -> Vec<T> {
    let (n, c, l) = (shape.n(), shape.c(), shape.plane_len());
    let mut out = v.to_vec();
    for s in 0..n {
        for ch in 0..c {
            for cell in 0..l {
                out[(s * l + cell) * c + ch] = v[(s * c + ch) * l + cell];
            }
        }
    }
    out
}

/// Deterministic test input: values in [-2, 2).
pub fn input(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Per statistical check: the probability that a correct implementation fails it.
pub const FAIL_P: f64 = 1e-12;

/// Bernstein: for a sum of independent terms, each within `range` of its mean,
/// with total variance `var`, `P(|S - ES| >= t) <= 2 exp(-t^2 / (2 (var + range t / 3)))`.
/// Returns the `t` at which the bound equals `FAIL_P`.
pub fn bernstein_tol(var: f64, range: f64) -> f64 {
    let l = (2.0 / FAIL_P).ln();
    let a = l * range / 3.0;
    a + (a * a + 2.0 * l * var).sqrt()
}

/// Bit equality, with any NaN equal to any NaN (the contract leaves NaN payloads open).
pub fn same<T: Element>(a: T, b: T) -> bool {
    let (a, b) = (a.to_f32(), b.to_f32());
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// A 2D shape with N in 1..=max_n, C in 1..=max_c and sides drawn from `sides`.
pub fn random_shape(rng: &mut StdRng, max_n: usize, max_c: usize, sides: &[usize]) -> Shape {
    random_shape_of_rank(rng, 2, max_n, max_c, sides)
}

/// A shape of spatial rank `rank` (1..=3) with N in 1..=max_n, C in 1..=max_c and
/// each spatial side drawn from `sides`.
pub fn random_shape_of_rank(rng: &mut StdRng, rank: usize, max_n: usize, max_c: usize, sides: &[usize]) -> Shape {
    let mut dims = vec![rng.random_range(1..=max_n), rng.random_range(1..=max_c)];
    dims.extend((0..rank).map(|_| sides[rng.random_range(0..sides.len())]));
    Shape::from_dims(&dims).unwrap()
}

/// A 2D configuration over every mode; see [`random_config_of_rank`].
pub fn random_config(rng: &mut StdRng) -> DropBlockConfig {
    random_config_of_rank(rng, 2)
}

/// A configuration for shapes of spatial rank `rank` over every mode: block sizes
/// 1..=9 (sometimes 10..=20, larger than small maps), equal or not along the axes,
/// now and then one uniform size; any placement, anchor, γ rule, sharing and
/// normalisation, and now and then a gamma_scale other than 1.
pub fn random_config_of_rank(rng: &mut StdRng, rank: usize) -> DropBlockConfig {
    let side =
        |rng: &mut StdRng| if rng.random_bool(0.1) { rng.random_range(10..=20) } else { rng.random_range(1..=9) };
    let k = side(rng);
    let block = if rng.random_bool(0.15) {
        Block::uniform(k).unwrap()
    } else {
        let sizes: Vec<u32> = (0..rank).map(|_| if rng.random_bool(0.65) { k } else { side(rng) }).collect();
        Block::from_sizes(&sizes).unwrap()
    };
    let pick = |rng: &mut StdRng, n: usize| rng.random_range(0..n);
    DropBlockConfig::builder(block, [0.05, 0.1, 0.3, 0.7, 1.0][pick(rng, 5)])
        .placement([Placement::Valid, Placement::Anywhere][pick(rng, 2)])
        .anchor([Anchor::Centered, Anchor::CenteredRight][pick(rng, 2)])
        .gamma_rule([GammaRule::Paper, GammaRule::ExactRate, GammaRule::PerBlock][pick(rng, 3)])
        .gamma_scale(if rng.random_bool(0.8) { 1.0 } else { rng.random_range(0.25..2.0) })
        .sharing([Sharing::None, Sharing::Channels, Sharing::Batch, Sharing::All][pick(rng, 4)])
        .normalize([Normalize::Global, Normalize::PerSample, Normalize::Expected, Normalize::None][pick(rng, 4)])
        .build()
        .unwrap()
}

/// `cfg` with noise fill (and so normalisation None), the rest as it was.
pub fn with_noise_fill(cfg: &DropBlockConfig) -> DropBlockConfig {
    cfg.to_builder().normalize(Normalize::None).fill(dropblock::Fill::Noise).build().unwrap()
}

/// A random configuration that the single-launch fused kernels serve (no sharing,
/// Expected or None normalisation), over every other mode.
pub fn random_fusable_config(rng: &mut StdRng) -> DropBlockConfig {
    random_fusable_config_of_rank(rng, 2)
}

/// [`random_fusable_config`] for shapes of spatial rank `rank`.
pub fn random_fusable_config_of_rank(rng: &mut StdRng, rank: usize) -> DropBlockConfig {
    loop {
        let cfg = random_config_of_rank(rng, rank);
        if cfg.sharing() == Sharing::None && matches!(cfg.normalize(), Normalize::Expected | Normalize::None) {
            return cfg;
        }
    }
}

/// A random seed with a small offset, or (one time in ten) one near the largest.
pub fn random_key(rng: &mut StdRng) -> RngKey {
    let offset =
        if rng.random_bool(0.1) { RngKey::MAX_OFFSET - rng.random_range(0..100) } else { rng.random_range(0..10_000) };
    RngKey::new(rng.random(), offset).unwrap()
}

/// `DROPBLOCK_REQUIRE_GPU=1` (self-hosted GPU runners): a test that needs a GPU
/// and finds none fails instead of skipping.
pub fn gpu_required() -> bool {
    std::env::var("DROPBLOCK_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether a test whose tool is missing must fail rather than skip: in CI (`CI`
/// set and not `false` or `0`), where the README's command installs every tool,
/// or when `var=1`.
pub fn required_in_ci(var: &str) -> bool {
    in_ci() || std::env::var(var).is_ok_and(|v| v == "1")
}

/// `CI` set and not `false` or `0`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "false" | "0"))
}

/// Every window's seed word of `plan`, in window order.
pub fn seed_windows(plan: &dropblock::sampling::Plan) -> Vec<u64> {
    (0..plan.windows()).map(|w| plan.sample_window(w, plan.window_len(w).unwrap()).unwrap()).collect()
}

/// A test of a `harness = false` binary that cannot run here: failed with `why`
/// when `required`, else ignored at run time with `why` on its line. It is not
/// flagged `#[ignore]`, so `--include-ignored` cannot turn the skip into a pass.
pub fn cannot_run(name: impl Into<String>, why: impl Into<String>, required: bool) -> Trial {
    let why = why.into();
    Trial::ignorable_test(
        name,
        move || if required { Err(Failed::from(why)) } else { Ok(Completion::ignored_with(why)) },
    )
}

/// The message of a caught panic, for turning it into a test failure.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// The γ whose threshold `T[j]` is exactly `target` (in `1..2^32`): the smallest
/// γ, by bisection, with `T[j] >= target`, checked to hit it. For tests of a draw
/// that equals a threshold, which random γs never produce.
pub fn gamma_with_threshold(j: usize, target: u64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if dropblock::sampling::thresholds(mid)[j] >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    assert_eq!(dropblock::sampling::thresholds(hi)[j], target, "no γ gives T[{j}] = {target}");
    hi
}

/// A configuration whose γ is exactly `gamma`: a 1x1 block with p = 1 gives a Paper
/// γ of exactly 1, which `gamma_scale` scales.
pub fn config_with_gamma(gamma: f64) -> DropBlockConfig {
    DropBlockConfig::builder(Block::new(1, 1).unwrap(), 1.0).gamma_scale(gamma).build().unwrap()
}

/// The memory index in `shape` (its layout) of logical index `[n, c, d, h, w]`.
pub fn physical(shape: Shape, [n, c, z, y, x]: [usize; 5]) -> usize {
    let [d, h, w] = shape.volume();
    let cell = (z * h + y) * w + x;
    match shape.layout() {
        Layout::ChannelsFirst => (n * shape.c() + c) * d * h * w + cell,
        Layout::ChannelsLast => (n * d * h * w + cell) * shape.c() + c,
    }
}

/// Every logical index of `shape` as `[n, c, d, h, w]`.
pub fn logical_indices(shape: Shape) -> impl Iterator<Item = [usize; 5]> {
    let [d, h, w] = shape.volume();
    let (n, c) = (shape.n(), shape.c());
    (0..n * c * d * h * w).map(move |i| {
        let (rest, x) = (i / w, i % w);
        let (rest, y) = (rest / h, rest % h);
        let (rest, z) = (rest / d, rest % d);
        [rest / c, rest % c, z, y, x]
    })
}

/// The shard's offsets along `[N, C, D, H, W]`.
pub fn offset5(shard: &Shard) -> [usize; 5] {
    let o = shard.offset();
    let r = shard.global().spatial_rank();
    let mut v = [0; 5];
    v[..2].copy_from_slice(&o[..2]);
    v[5 - r..].copy_from_slice(&o[2..]);
    v
}

/// `(local memory index, global memory index)` for every element of the shard.
pub fn placement(shard: &Shard) -> Vec<(usize, usize)> {
    let (local, global, o) = (shard.local(), shard.global(), offset5(shard));
    logical_indices(local)
        .map(|i| (physical(local, i), physical(global, std::array::from_fn(|a| i[a] + o[a]))))
        .collect()
}

/// Cuts `len` into 1..=`max` pieces at random points: `(offset, extent)` each.
pub fn cut(rng: &mut StdRng, len: usize, max: usize) -> Vec<(usize, usize)> {
    let pieces = rng.random_range(1..=max.min(len));
    let mut points: Vec<usize> = (1..len).collect();
    for i in 0..points.len() {
        let j = rng.random_range(i..points.len());
        points.swap(i, j);
    }
    let mut cuts: Vec<usize> = points[..pieces - 1].to_vec();
    cuts.sort_unstable();
    cuts.insert(0, 0);
    cuts.push(len);
    cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// A random grid of shards over `global`: each axis cut into pieces.
pub fn random_grid(rng: &mut StdRng, global: Shape, max_pieces: usize) -> Vec<Shard> {
    let axes: Vec<Vec<(usize, usize)>> = global.dims().iter().map(|&len| cut(rng, len, max_pieces)).collect();
    let mut shards = vec![(Vec::new(), Vec::new())];
    for pieces in &axes {
        shards = shards
            .into_iter()
            .flat_map(|(o, e): (Vec<usize>, Vec<usize>)| {
                pieces.iter().map(move |&(po, pe)| {
                    let (mut o, mut e) = (o.clone(), e.clone());
                    o.push(po);
                    e.push(pe);
                    (o, e)
                })
            })
            .collect();
    }
    shards.into_iter().map(|(o, e)| Shard::new(global, &o, &e).unwrap()).collect()
}
