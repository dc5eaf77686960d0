//! Where the CLI runs DropBlock: the CPU path or the CUDA path, behind one interface.

use std::time::Instant;

use clap::ValueEnum;
use dropblock::{cpu, DropBlockConfig, Mode, RngKey, Shape};

use super::npy::CliElement;

use super::CliError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The GPU if there is one, else the CPU.
    Auto,
    /// The CPU path, on every core (rayon).
    Cpu,
    /// The CUDA path on device 0; an error where it cannot run.
    Cuda,
}

/// The result of one forward (and optionally backward) call.
pub struct Outcome<T> {
    pub y: Vec<T>,
    /// The keep mask, u8 in the tensor's order, when it was asked for (a byte per element).
    pub keep_mask: Option<Vec<u8>>,
    pub kept: u64,
    pub scales: Vec<f32>,
    pub forward_ms: f64,
    /// `dx` for `dy = y`, and its time, when backward was asked for.
    pub backward: Option<(Vec<T>, f64)>,
}

pub enum Runner {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(dropblock::cuda::DropBlockCuda),
}

impl Runner {
    /// The runner for `arg`, and for Auto a note saying why it fell back to the
    /// CPU: only when there is no GPU (any other CUDA error is reported).
    pub fn select(arg: DeviceArg) -> Result<(Runner, Option<String>), CliError> {
        match arg {
            DeviceArg::Cpu => Ok((Runner::Cpu, None)),
            DeviceArg::Cuda => Ok((cuda_runner()?, None)),
            DeviceArg::Auto => match cuda_runner() {
                Ok(r) => Ok((r, None)),
                Err(CliError::DropBlock(e)) if e.is_no_gpu() => Ok((Runner::Cpu, Some(e.to_string()))),
                Err(e) => Err(e),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Runner::Cpu => {
                let forms = cpu::simd_forms();
                let simd = if forms.is_empty() { "portable forms".to_string() } else { forms.join(", ") };
                format!("CPU ({} threads; {simd})", rayon::current_num_threads())
            }
            #[cfg(feature = "cuda")]
            Runner::Cuda(c) => format!("CUDA: {}", c.device_name()),
        }
    }

    pub fn run<T: CliElement>(
        &self,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: RngKey,
        x: &[T],
        with_backward: bool,
        with_mask: bool,
    ) -> Result<Outcome<T>, CliError> {
        match self {
            Runner::Cpu => {
                let mut y = super::host_vec(x.len(), |_| T::default())?;
                let t = Instant::now();
                let saved = cpu::forward(cfg, shape, key, Mode::Train, x, &mut y)?;
                let forward_ms = t.elapsed().as_secs_f64() * 1e3;
                let backward = if with_backward {
                    let mut dx = super::host_vec(x.len(), |_| T::default())?;
                    let t = Instant::now();
                    cpu::backward(&saved, &y, &mut dx)?;
                    Some((dx, t.elapsed().as_secs_f64() * 1e3))
                } else {
                    None
                };
                Ok(Outcome {
                    keep_mask: with_mask.then(|| saved.keep_mask()).transpose()?,
                    kept: saved.kept(),
                    scales: saved.scales().to_vec(),
                    y,
                    forward_ms,
                    backward,
                })
            }
            #[cfg(feature = "cuda")]
            Runner::Cuda(c) => Ok(run_cuda(c, cfg, shape, key, x, with_backward, with_mask)?),
        }
    }
}

/// Uploads `x`, runs forward (and backward with `dy = y`) on a fresh stream, and
/// downloads everything. Times are CUDA-event times of the launches alone.
#[cfg(feature = "cuda")]
fn run_cuda<T: dropblock::cuda::CudaElement>(
    c: &dropblock::cuda::DropBlockCuda,
    cfg: &DropBlockConfig,
    shape: Shape,
    key: RngKey,
    x: &[T],
    with_backward: bool,
    with_mask: bool,
) -> Result<Outcome<T>, dropblock::Error> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    let stream = c.context().new_stream()?;
    let xd = stream.clone_htod(x)?;
    let mut yd = stream.alloc_zeros::<T>(x.len())?;
    let mut state = c.alloc_state(&stream, shape)?;
    let start = stream.record_event(Some(CU_EVENT_DEFAULT))?;
    c.forward_into(&stream, &mut state, cfg, shape, key, Mode::Train, &xd, &mut yd)?;
    let mid = stream.record_event(Some(CU_EVENT_DEFAULT))?;
    let forward_ms = dropblock::cuda::elapsed_ms(&start, &mid)? as f64;
    let backward = if with_backward {
        let mut dxd = stream.alloc_zeros::<T>(x.len())?;
        let b0 = stream.record_event(Some(CU_EVENT_DEFAULT))?;
        c.backward(&stream, &state, &yd, &mut dxd)?;
        let b1 = stream.record_event(Some(CU_EVENT_DEFAULT))?;
        let ms = dropblock::cuda::elapsed_ms(&b0, &b1)? as f64;
        Some((stream.clone_dtoh(&dxd)?, ms))
    } else {
        None
    };
    Ok(Outcome {
        y: stream.clone_dtoh(&yd)?,
        kept: state.kept(&stream)?,
        keep_mask: if with_mask { Some(state.keep_mask(&stream)?) } else { None },
        scales: state.scales(&stream)?,
        forward_ms,
        backward,
    })
}

#[cfg(feature = "cuda")]
fn cuda_runner() -> Result<Runner, CliError> {
    Ok(Runner::Cuda(dropblock::cuda::DropBlockCuda::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner() -> Result<Runner, CliError> {
    Err(dropblock::Error::KernelsNotBuilt.into())
}
