//! Criterion benchmarks: forward, backward and the sampling alone, CPU and CUDA,
//! on the ResNet-50 stage shapes (block 7), the PP-YOLO shapes (block 3), a video
//! volume (3D, block 5) and a sequence (1D, block 15), each beside the 2D shape of
//! the same element count and seed density, in f32 and bf16.
//!
//! Throughput is the floor, x read once plus y written once, so GB/s compares with
//! a device-to-device copy. CUDA times are CUDA events on the launch stream, each
//! call after a memset that evicts L2 and hides the host's enqueueing, as in
//! training (`src/cli/cuda_timing.rs`, shared with `dropblock bench`).
//! Without a GPU the CUDA group says why and is skipped.
//!
//! `DROPBLOCK_BENCH_SHAPES=small` runs the four smallest shapes only.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dropblock::{cpu, DropBlockConfig, Element, Generator, Mode, Shape, Shard};
use half::bf16;

/// `(dims, k)`. The 3D and 1D shapes follow the 2D shapes of the same element
/// count whose paper γ is within 5% of theirs (3D 8x256x16x28x28 at k = 5: γ =
/// 0.00145; 2D 8x256x112x112 at k = 9: 0.00143. 1D 64x512x4096 at k = 15: 0.00669;
/// 2D 64x512x64x64 at k = 4: 0.00688), for the rank ratio of docs/PERF.md.
const SHAPES: &[(&[usize], u32)] = &[
    (&[256, 256, 56, 56], 7),
    (&[256, 512, 28, 28], 7),
    (&[256, 1024, 14, 14], 7),
    (&[256, 2048, 7, 7], 7),
    (&[24, 256, 76, 76], 3),
    (&[24, 512, 38, 38], 3),
    (&[24, 1024, 19, 19], 3),
    (&[8, 256, 112, 112], 9),
    (&[8, 256, 16, 28, 28], 5),
    (&[64, 512, 64, 64], 4),
    (&[64, 512, 4096], 15),
];

fn shapes() -> Vec<(Shape, u32)> {
    let mut v: Vec<(Shape, u32)> = SHAPES.iter().map(|&(dims, k)| (Shape::from_dims(dims).unwrap(), k)).collect();
    if std::env::var("DROPBLOCK_BENCH_SHAPES").is_ok_and(|s| s == "small") {
        v.sort_by_key(|(s, _)| s.numel());
        v.truncate(4);
    }
    v
}

fn id(shape: Shape, k: u32, dtype: &str, pass: &str) -> BenchmarkId {
    BenchmarkId::new(format!("{pass}/{dtype}"), format!("{shape}/k{k}"))
}

fn cpu_typed<T: Element>(c: &mut Criterion, dtype: &str) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (shape, k) in shapes() {
        let cfg = DropBlockConfig::paper(k, 0.1).unwrap();
        let x: Vec<T> = (0..shape.numel()).map(|i| T::from_f32((i % 13) as f32 - 6.0)).collect();
        let mut y = vec![T::default(); shape.numel()];
        let mut gen = Generator::new(7);
        g.throughput(Throughput::Bytes(2 * (shape.numel() * std::mem::size_of::<T>()) as u64));
        g.bench_function(id(shape, k, dtype, "forward"), |b| {
            b.iter(|| cpu::forward(&cfg, shape, gen.next_key().unwrap(), Mode::Train, black_box(&x), &mut y).unwrap())
        });
        // The sampling reads no tensor: once, not per dtype. Its time includes
        // making and freeing the mask, as a call's does.
        if T::DTYPE == dropblock::DType::F32 {
            g.bench_function(id(shape, k, "any", "sampling"), |b| {
                b.iter(|| cpu::sample(&cfg, shape, gen.next_key().unwrap(), Mode::Train).unwrap())
            });
        }
        let saved = cpu::forward(&cfg, shape, gen.next_key().unwrap(), Mode::Train, &x, &mut y).unwrap();
        let mut dx = vec![T::default(); shape.numel()];
        g.bench_function(id(shape, k, dtype, "backward"), |b| {
            b.iter(|| cpu::backward(&saved, black_box(&y), &mut dx).unwrap())
        });
    }
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    cpu_typed::<f32>(c, "f32");
    cpu_typed::<bf16>(c, "bf16");
    cpu_shards(c);
}

/// A sharded forward's total cost against the unsharded call's: 64x1024x14x14,
/// k = 7, f32, as one call and as 4 shards run one after another (sample each,
/// sum the counts, finish and apply each), split in quarters along each axis, and 2 x 2
/// spatially.
fn cpu_shards(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_shards");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let global = Shape::new(64, 1024, 14, 14).unwrap();
    let cfg = DropBlockConfig::paper(7, 0.1).unwrap();
    g.throughput(Throughput::Bytes(2 * (global.numel() * 4) as u64));
    let x: Vec<f32> = (0..global.numel()).map(|i| (i % 13) as f32 - 6.0).collect();
    let mut y = vec![0.0f32; global.numel()];
    let mut gen = Generator::new(7);
    g.bench_function("unsharded", |b| {
        b.iter(|| cpu::forward(&cfg, global, gen.next_key().unwrap(), Mode::Train, black_box(&x), &mut y).unwrap())
    });
    // Per shard, (offset, extent) along N, C, H and W.
    type Box4 = [(usize, usize); 4];
    let quarters =
        |len: usize| std::array::from_fn::<(usize, usize), 4, _>(|i| (i * len / 4, (i + 1) * len / 4 - i * len / 4));
    let along = |axis: usize| -> [Box4; 4] {
        let q = quarters(global.dims()[axis]);
        std::array::from_fn(|i| std::array::from_fn(|a| if a == axis { q[i] } else { (0, global.dims()[a]) }))
    };
    let hw = [(0, 7), (7, 7)];
    let grids: [(&str, [Box4; 4]); 5] = [
        ("4 along N", along(0)),
        ("4 along C", along(1)),
        ("4 along H", along(2)),
        ("4 along W", along(3)),
        ("2 x 2", std::array::from_fn(|i| [(0, 64), (0, 1024), hw[i / 2], hw[i % 2]])),
    ];
    for (name, boxes) in grids {
        let shards: Vec<Shard> =
            boxes.iter().map(|b| Shard::new(global, &b.map(|(o, _)| o), &b.map(|(_, e)| e)).unwrap()).collect();
        let xs: Vec<Vec<f32>> = shards.iter().map(|s| vec![1.0f32; s.local().numel()]).collect();
        let mut ys: Vec<Vec<f32>> = xs.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                let key = gen.next_key().unwrap();
                let sampled: Vec<_> =
                    shards.iter().map(|s| cpu::sample_shard(&cfg, s, key, Mode::Train).unwrap()).collect();
                let mut counts = sampled[0].counts().clone();
                sampled[1..].iter().for_each(|s| counts.add(s.counts()).unwrap());
                for ((s, x), y) in sampled.into_iter().zip(&xs).zip(ys.iter_mut()) {
                    cpu::apply(&s.finish(&counts).unwrap(), black_box(x), y).unwrap();
                }
            })
        });
    }
    g.finish();
}

#[cfg(feature = "cuda")]
#[path = "../src/cli/cuda_timing.rs"]
mod cuda_timing;

#[cfg(feature = "cuda")]
fn cuda_typed<T: dropblock::cuda::CudaElement>(c: &mut Criterion, d: &dropblock::cuda::DropBlockCuda, dtype: &str) {
    let mut g = c.benchmark_group("cuda");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (shape, k) in shapes() {
        let cfg = DropBlockConfig::paper(k, 0.1).unwrap();
        let host: Vec<T> = (0..shape.numel()).map(|i| T::from_f32((i % 13) as f32 - 6.0)).collect();
        let mut timer = cuda_timing::CudaTimer::new(d, shape, Some(&host), false).unwrap();
        let mut gen = Generator::new(7);
        g.throughput(Throughput::Bytes(2 * (shape.numel() * std::mem::size_of::<T>()) as u64));
        use cuda_timing::Pass;
        for (pass, name) in [(Pass::Forward, "forward"), (Pass::Backward, "backward"), (Pass::Sampling, "sampling")] {
            g.bench_function(id(shape, k, dtype, name), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let ms = timer.time(d, &cfg, gen.next_key().unwrap(), pass).unwrap();
                            Duration::from_secs_f64(ms * 1e-3)
                        })
                        .sum()
                })
            });
        }
    }
    g.finish();
}

#[cfg(feature = "cuda")]
fn cuda_benches(c: &mut Criterion) {
    match dropblock::cuda::DropBlockCuda::new(0) {
        Ok(d) => {
            cuda_typed::<f32>(c, &d, "f32");
            cuda_typed::<bf16>(c, &d, "bf16");
        }
        Err(e) if e.is_no_gpu() => skip(&format!("no GPU ({e})")),
        Err(e) => panic!("a GPU is there but DropBlockCuda::new(0) failed: {e}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_benches(_: &mut Criterion) {
    skip("built without the `cuda` feature");
}

/// The CUDA group skipped, saying why; under `DROPBLOCK_REQUIRE_GPU=1` (a GPU
/// runner), a failure instead, as for the tests and examples.
fn skip(why: &str) {
    if std::env::var("DROPBLOCK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("DROPBLOCK_REQUIRE_GPU=1 but the cuda benchmarks cannot run: {why}");
    }
    eprintln!("cuda benchmarks skipped: {why}");
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
