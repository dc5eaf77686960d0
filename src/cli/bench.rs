//! `dropblock bench`: time forward, backward or the sampling alone on one shape.
//!
//! Bytes moved are counted as the floor, x read once and y written once, so GB/s
//! compares directly with a device-to-device copy. The last line is
//! `median_ms=<float> gbps=<float>`, for scripts.

use std::time::{Duration, Instant};

use clap::Args;
use dropblock::{cpu, DType, Generator, Mode};
use half::{bf16, f16};

use super::device::{DeviceArg, Runner};
use super::npy::CliElement;
use super::{CliError, ConfigArgs, ShapeArg};

#[derive(Args)]
pub struct BenchArgs {
    /// Where to run (the CPU unless asked: a benchmark says what it measures).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// N,C,L / N,C,H,W / N,C,D,H,W (logical, whatever the layout).
    #[arg(long, default_value = "256,1024,14,14")]
    shape: ShapeArg,
    /// Memory layout of the tensors: channels-first | channels-last.
    #[arg(long, default_value = "channels-first")]
    layout: dropblock::Layout,
    /// Element type: f32 | f16 | bf16.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Timed iterations (after a warm-up of at least 3 iterations and 300 ms).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    iters: u32,
    /// Time backward instead of forward.
    #[arg(long)]
    backward: bool,
    /// Time the sampling alone instead of forward: the keep mask and scales drawn
    /// from the key, no tensor read or written (GB/s is then the forward's bytes
    /// over the sampling's time).
    #[arg(long, conflicts_with = "backward")]
    sampling: bool,
    /// With --device cuda, time each call from an idle stream, so that a forward's
    /// host enqueueing counts and a backward's dy may sit in L2 (the method of
    /// earlier builds), not on a stream kept busy by a memset that evicts L2 (as
    /// the peers are timed).
    #[arg(long)]
    from_idle: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(a: BenchArgs) -> Result<(), CliError> {
    match a.dtype {
        DType::F32 => run_typed::<f32>(&a),
        DType::F16 => run_typed::<f16>(&a),
        DType::BF16 => run_typed::<bf16>(&a),
    }
}

fn run_typed<T: CliElement>(a: &BenchArgs) -> Result<(), CliError> {
    let cfg = a.config.config()?;
    let shape = a.shape.shape()?.with_layout(a.layout);
    a.config.key()?; // the offset given, checked as given
    let mut gen = Keys { gen: Generator::from_state(a.config.seed, a.config.offset), first: a.config.offset, calls: 0 };
    let iters = a.iters as usize;
    let (runner, fallback) = Runner::select(a.device)?;
    if a.from_idle && matches!(runner, Runner::Cpu) {
        return Err(CliError::Usage("--from-idle times CUDA calls: give it with --device cuda, on a GPU".into()));
    }
    if let Some(why) = fallback {
        say!("no GPU ({why}): running on the CPU")?;
    }
    say!("bench: {shape} {} on {}, {cfg}", T::DTYPE.name(), runner.name())?;
    let times = match &runner {
        Runner::Cpu => {
            // Only the buffers the pass touches: sampling alone needs none.
            let len = |needed: bool| if needed { shape.numel() } else { 0 };
            let x = input::<T>(len(!a.sampling))?;
            let mut y = super::host_vec(len(!a.sampling), |_| T::default())?;
            let mut dx = super::host_vec(len(a.backward), |_| T::default())?;
            timed(iters, || {
                let t = Instant::now();
                if a.sampling {
                    std::hint::black_box(cpu::sample(&cfg, shape, gen.next_key()?, Mode::Train)?);
                    return Ok(t.elapsed().as_secs_f64() * 1e3);
                }
                let saved = cpu::forward(&cfg, shape, gen.next_key()?, Mode::Train, &x, &mut y)?;
                if a.backward {
                    let t = Instant::now();
                    cpu::backward(&saved, &y, &mut dx)?;
                    return Ok(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })?
        }
        #[cfg(feature = "cuda")]
        Runner::Cuda(d) => cuda_times::<T>(d, &cfg, shape, &mut gen, iters, a)?,
    };
    let bytes = 2.0 * (shape.numel() * std::mem::size_of::<T>()) as f64;
    for (i, ms) in times.iter().enumerate() {
        say!("iter {i:3}: {ms:9.4} ms  {:8.1} GB/s", bytes / ms / 1e6)?;
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0;
    say!("median_ms={median:.6} gbps={:.3}", bytes / median / 1e6)?;
    Ok(())
}

/// A fresh key a call, as training draws them, from `--offset` (`first`).
struct Keys {
    gen: Generator,
    first: u64,
    calls: u64,
}

impl Keys {
    /// The next call's key; past the last offset, an error that says why a valid
    /// `--offset` ran out (the warm-up's calls count too).
    fn next_key(&mut self) -> Result<dropblock::RngKey, CliError> {
        let key = self.gen.next_key().map_err(|_| {
            CliError::Usage(format!(
                "bench draws a fresh key a call, 17 counter blocks apart: --offset {} ran out of offsets after {} calls (warm-up included); give a smaller --offset",
                self.first, self.calls
            ))
        })?;
        self.calls += 1;
        Ok(key)
    }
}

/// Untimed warm-up before any measurement, by time as well as by count: module
/// load, first-touch allocations and the clock ramp stay out of the numbers. (On
/// the H200 measured on 2026-11-27 the SM clock had already left its 345 MHz idle
/// for 1980 MHz during context creation, and 3 warm-up iterations gave the same
/// median as 300 ms; other cards and drivers may ramp later.)
const WARM_UP: Duration = Duration::from_millis(300);
const WARM_UP_ITERS: usize = 3;

/// `iters` results of `one()` (each its own time in ms) after the warm-up.
fn timed(iters: usize, mut one: impl FnMut() -> Result<f64, CliError>) -> Result<Vec<f64>, CliError> {
    let start = Instant::now();
    let mut warm = 0;
    while warm < WARM_UP_ITERS || start.elapsed() < WARM_UP {
        one()?;
        warm += 1;
    }
    (0..iters).map(|_| one()).collect()
}

/// A deterministic input: values -8..8.
fn input<T: CliElement>(len: usize) -> Result<Vec<T>, CliError> {
    Ok(super::host_vec(len, |i| T::from_f32((i % 17) as f32 - 8.0))?)
}

/// CUDA-event times per iteration (see `CudaTimer`).
#[cfg(feature = "cuda")]
fn cuda_times<T: CliElement>(
    d: &dropblock::cuda::DropBlockCuda,
    cfg: &dropblock::DropBlockConfig,
    shape: dropblock::Shape,
    gen: &mut Keys,
    iters: usize,
    a: &BenchArgs,
) -> Result<Vec<f64>, CliError> {
    use super::cuda_timing::{CudaTimer, Pass};
    let pass = match (a.backward, a.sampling) {
        (true, _) => Pass::Backward,
        (_, true) => Pass::Sampling,
        _ => Pass::Forward,
    };
    let x = match pass {
        Pass::Sampling => None,
        _ => Some(input::<T>(shape.numel())?),
    };
    let mut timer = CudaTimer::new(d, shape, x.as_deref(), a.from_idle)?;
    timed(iters, || Ok(timer.time(d, cfg, gen.next_key()?, pass)?))
}
