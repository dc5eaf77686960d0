//! DropBlock as a candle layer (feature `candle`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use dropblock::{candle::DropBlock, DropBlockConfig};
//!
//! let drop = DropBlock::new(DropBlockConfig::paper(3, 0.1)?, 1234);
//! let xs = Tensor::ones((2, 4, 8, 8), DType::F32, &Device::Cpu)?;
//! let ys = xs.apply_t(&drop, true)?; // ModuleT, like candle_nn::Dropout
//! assert_eq!(ys.dims(), xs.dims());
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! - Training draws a fresh mask per forward from the layer's [`Generator`] state,
//!   which [`DropBlock::generator_state`] reads and [`DropBlock::set_generator_state`]
//!   restores, so a resumed run draws the masks an uninterrupted one would. A
//!   forward that fails gives its key back (unless another forward drew one
//!   meanwhile), so a run's masks do not depend on the calls that failed in it.
//! - Eval mode, a drop probability of 0, or an empty tensor (a batch with no
//!   samples, as `candle_nn::Dropout` passes it) returns the input tensor itself
//!   and draws nothing.
//! - The mask is the crate's: the same key gives [`crate::cpu::forward`]'s output bit
//!   for bit. The backward uses the keep bits the forward saved (no float mask).
//! - Tensors are `(N, C, L)`, `(N, C, H, W)` or `(N, C, D, H, W)` in f32, f16 or bf16.
//!   A channels-last strided tensor is read as it is (no copy; y keeps its
//!   strides); any other non-contiguous input is made contiguous first (candle's
//!   differentiable copy), and a contiguous one at an offset (a narrowed batch) is
//!   read at its offset, so the op always reads the elements the tensor names.
//! - CPU tensors; with the `candle-cuda` feature CUDA tensors too: the crate's
//!   kernels run on candle's own buffers and stream (no copy, no host sync), one
//!   [`DropBlockCuda`](crate::cuda::DropBlockCuda) per CUDA context, and the backward
//!   runs from the forward's [`DeviceState`](crate::cuda::DeviceState). Without
//!   that feature a CUDA tensor gets candle's "no cuda implementation" error.
//!   A CUDA forward allocates its saved state (as candle's ops allocate their
//!   outputs), so it is refused on a stream being captured into a CUDA graph
//!   ([`Error::AllocationInCapture`](crate::Error::AllocationInCapture)); to
//!   capture DropBlock, call [`DropBlockCuda`](crate::cuda::DropBlockCuda)'s
//!   `_into` calls on a state allocated beforehand.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType as CandleDType, Layout, ModuleT, Tensor, WithDType};

use crate::config::{DropBlockConfig, Layout as MemoryLayout, Mode, Shape};
use crate::cpu;
use crate::dtype::Element;
use crate::rng::{Generator, RngKey};
use crate::schedule::LinearSchedule;

impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// What a resumed run needs to draw the same masks: the generator's seed and
/// offset, and the schedule's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GeneratorState {
    /// The Philox seed.
    pub seed: u64,
    /// The counter offset of the next forward's key.
    pub offset: u64,
    /// The training step (`set_step`'s), which a schedule reads.
    pub step: u64,
}

/// A DropBlock layer for candle models; see the module docs.
#[derive(Debug)]
pub struct DropBlock {
    cfg: DropBlockConfig,
    schedule: Option<LinearSchedule>,
    state: Mutex<GeneratorState>,
}

impl DropBlock {
    /// A layer applying `cfg`, its generator seeded with `seed` at offset 0.
    pub fn new(cfg: DropBlockConfig, seed: u64) -> Self {
        Self { cfg, schedule: None, state: Mutex::new(GeneratorState { seed, offset: 0, step: 0 }) }
    }

    /// The same layer with its drop probability taken from `schedule` at the step
    /// set by [`DropBlock::set_step`] (the config's own drop probability is unused).
    pub fn with_schedule(mut self, schedule: LinearSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Sets the training step the schedule reads.
    pub fn set_step(&self, step: u64) {
        self.lock().step = step;
    }

    /// The configuration the next training forward applies: the layer's, with the
    /// schedule's drop probability at the current step when there is a schedule.
    pub fn config(&self) -> crate::Result<DropBlockConfig> {
        match &self.schedule {
            Some(s) => self.cfg.with_drop_prob(s.drop_prob_at(self.lock().step)),
            None => Ok(self.cfg),
        }
    }

    /// The generator's seed and offset and the schedule's step.
    pub fn generator_state(&self) -> GeneratorState {
        *self.lock()
    }

    /// Restores a state read by [`DropBlock::generator_state`].
    pub fn set_generator_state(&self, state: GeneratorState) {
        *self.lock() = state;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GeneratorState> {
        // The state is three integers, each written whole: a panic elsewhere cannot
        // leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next forward's key; the generator advances only when one is drawn.
    fn next_key(&self) -> crate::Result<RngKey> {
        let mut state = self.lock();
        let mut gen = Generator::from_state(state.seed, state.offset);
        let key = gen.next_key()?;
        state.offset = gen.offset();
        Ok(key)
    }

    /// Runs a forward with the next key. One that fails (for host memory, or an
    /// exact γ too large to sum) gives its key back, unless another forward drew
    /// since or the state was set: a failed call leaves the generator as it was,
    /// so a run's masks do not depend on the calls that failed in it.
    fn with_next_key(
        &self,
        forward: impl FnOnce(RngKey) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let key = self.next_key()?;
        let out = forward(key);
        if out.is_err() {
            let mut state = self.lock();
            let mut after = Generator::from_state(key.seed(), key.offset());
            let _ = after.next_key();
            if state.seed == key.seed() && state.offset == after.offset() {
                state.offset = key.offset();
            }
        }
        out
    }
}

impl ModuleT for DropBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let cfg = self.config()?;
        // Checked before a key is drawn (a call refused later gives its key back:
        // `with_next_key`), and in eval too: a tensor that training would refuse
        // is refused at once, not at the first training step.
        check_dtype(xs.dtype())?;
        if xs.elem_count() == 0 {
            // Nothing to drop or scale. The rank, and the block's, are checked as
            // for any tensor (a zero side counted as one).
            let sides: Vec<usize> = xs.dims().iter().map(|&d| d.max(1)).collect();
            cfg.block().sizes_for(shape_of(&sides)?.spatial_rank())?;
            return Ok(xs.clone());
        }
        let shape = shape_of(xs.dims())?;
        if !train || cfg.is_identity() {
            // What planning would refuse in training (an exact γ too large to sum).
            crate::sampling::Plan::check(&cfg, shape)?;
            return Ok(xs.clone());
        }
        cfg.block().sizes_for(shape.spatial_rank())?;
        if is_channels_last(xs) {
            // The buffer as the contiguous (N, spatial..., C) tensor it is, in and out:
            // no copy, and y keeps x's strides.
            let rank = xs.rank();
            let to_physical: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
            let to_logical: Vec<usize> = [0, rank - 1].into_iter().chain(1..rank - 1).collect();
            return self.with_next_key(|key| {
                let op = ForwardOp { cfg, key, saved: OnceLock::new(), memory: MemoryLayout::ChannelsLast };
                xs.permute(to_physical)?.apply_op1(op)?.permute(to_logical)
            });
        }
        self.with_next_key(|key| {
            let op = ForwardOp { cfg, key, saved: OnceLock::new(), memory: MemoryLayout::ChannelsFirst };
            xs.contiguous()?.apply_op1(op)
        })
    }
}

/// Whether `xs`, logically `(N, C, spatial...)`, lies in memory as a contiguous
/// `(N, spatial..., C)` tensor (PyTorch's `channels_last`), and not also as a
/// contiguous channels-first one (as when C or every spatial side is 1).
fn is_channels_last(xs: &Tensor) -> bool {
    let (dims, strides) = (xs.dims(), xs.stride());
    if dims.len() < 3 || xs.is_contiguous() {
        return false;
    }
    let mut expect = 1;
    let order = [1].into_iter().chain((2..dims.len()).rev()).chain([0]);
    for axis in order {
        if dims[axis] > 1 && strides[axis] != expect {
            return false;
        }
        expect *= dims[axis];
    }
    true
}

fn check_dtype(dtype: CandleDType) -> candle_core::Result<()> {
    match dtype {
        CandleDType::F32 | CandleDType::F16 | CandleDType::BF16 => Ok(()),
        other => Err(unsupported(other)),
    }
}

fn unsupported(dtype: CandleDType) -> candle_core::Error {
    candle_core::Error::UnsupportedDTypeForOp(dtype, "dropblock (f32, f16 and bf16 only)")
}

fn shape_of(dims: &[usize]) -> candle_core::Result<Shape> {
    Ok(Shape::from_dims(dims)?)
}

/// How an op's input lies in memory: its storage is contiguous in this layout's
/// physical order.
trait Op {
    fn memory(&self) -> MemoryLayout;
}

/// An element-wise pass over a contiguous slice in the op's memory layout, for any
/// of the supported dtypes ([`on_cpu`] dispatches on the storage's).
trait CpuPass: Op {
    fn run<T: WithDType + Element>(&self, shape: Shape, x: &[T]) -> candle_core::Result<Vec<T>>;
}

/// The logical shape and element range of a contiguous layout in `memory` order
/// (`(N, spatial..., C)` channels-last). The callers pass contiguous tensors: an
/// offset is honoured, a stride never guessed.
fn contiguous(layout: &Layout, memory: MemoryLayout) -> candle_core::Result<(Shape, std::ops::Range<usize>)> {
    let mut dims = layout.dims().to_vec();
    if memory == MemoryLayout::ChannelsLast {
        dims[1..].rotate_right(1);
    }
    let shape = shape_of(&dims)?.with_layout(memory);
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| candle_core::Error::RequiresContiguous { op: "dropblock" }.bt())?;
    Ok((shape, start..end))
}

/// `$typed::<T>(args)` with `T` the element type of `$dtype`, or the refusal of an
/// unsupported dtype.
macro_rules! by_dtype {
    ($dtype:expr, $typed:ident($($arg:expr),*)) => {
        match $dtype {
            CandleDType::F32 => $typed::<f32>($($arg),*),
            CandleDType::F16 => $typed::<half::f16>($($arg),*),
            CandleDType::BF16 => $typed::<half::bf16>($($arg),*),
            other => Err(unsupported(other)),
        }
    };
}

fn on_cpu(
    pass: &impl CpuPass,
    storage: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
    fn typed<T: WithDType + Element>(
        pass: &impl CpuPass,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<CpuStorage> {
        let (shape, range) = contiguous(layout, pass.memory())?;
        let x = &T::cpu_storage_as_slice(storage)?[range];
        Ok(T::to_cpu_storage_owned(pass.run(shape, x)?))
    }
    Ok((by_dtype!(storage.dtype(), typed(pass, storage, layout))?, layout.shape().clone()))
}

fn zeroed<T: Element>(len: usize) -> crate::Result<Vec<T>> {
    crate::error::host_vec(len, |_| T::default())
}

/// What a forward saved for its backward: the keep bits and scales, on the device
/// the forward ran on.
enum Saved {
    Cpu(Box<cpu::Saved>),
    /// The state, and an event at the end of the forward's work: candle's stream
    /// is the per-thread default stream, whose one handle names another stream on
    /// each thread, so a backward on another thread cannot be ordered by the
    /// state (which compares handles) and waits on the event instead.
    #[cfg(feature = "candle-cuda")]
    Cuda(Box<(crate::cuda::DeviceState, cudarc::driver::CudaEvent)>),
}

impl Saved {
    fn cpu(&self) -> candle_core::Result<&cpu::Saved> {
        match self {
            Saved::Cpu(s) => Ok(s),
            #[cfg(feature = "candle-cuda")]
            Saved::Cuda(_) => candle_core::bail!("dropblock: a CPU gradient for a forward that ran on CUDA"),
        }
    }
}

/// `CustomOp1::cpu_fwd` (and `cuda_fwd`) of an op that is a [`CpuPass`] (and a
/// `CudaPass`): the same two entries for the forward and the backward op.
macro_rules! device_fwds {
    () => {
        fn cpu_fwd(
            &self,
            storage: &CpuStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
            on_cpu(self, storage, layout)
        }

        #[cfg(feature = "candle-cuda")]
        fn cuda_fwd(
            &self,
            storage: &candle_core::CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            on_cuda::run(self, storage, layout)
        }
    };
}

/// One training forward: its key is fixed when the layer draws it, and its keep
/// bits are saved for the backward (which candle runs on this same op, once per
/// `backward()` call).
struct ForwardOp {
    cfg: DropBlockConfig,
    key: RngKey,
    saved: OnceLock<Arc<Saved>>,
    memory: MemoryLayout,
}

impl Op for ForwardOp {
    fn memory(&self) -> MemoryLayout {
        self.memory
    }
}

impl Op for BackwardOp {
    fn memory(&self) -> MemoryLayout {
        match &*self.saved {
            Saved::Cpu(s) => s.shape().layout(),
            #[cfg(feature = "candle-cuda")]
            Saved::Cuda(s) => s.0.shape().layout(),
        }
    }
}

impl ForwardOp {
    /// The layer makes one op per forward; a second run would orphan the first's bits.
    fn save(&self, saved: Saved) -> candle_core::Result<()> {
        if self.saved.set(Arc::new(saved)).is_err() {
            candle_core::bail!("dropblock: a forward op ran twice");
        }
        Ok(())
    }
}

impl CpuPass for ForwardOp {
    fn run<T: WithDType + Element>(&self, shape: Shape, x: &[T]) -> candle_core::Result<Vec<T>> {
        let mut y = zeroed(x.len())?;
        self.save(Saved::Cpu(Box::new(cpu::forward(&self.cfg, shape, self.key, Mode::Train, x, &mut y)?)))?;
        Ok(y)
    }
}

impl CustomOp1 for ForwardOp {
    fn name(&self) -> &'static str {
        "dropblock-forward"
    }

    device_fwds!();

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let saved = self.saved.get().ok_or(crate::Error::NoForwardCall)?;
        BackwardOp { saved: saved.clone() }.on(grad_res)
    }
}

/// `dx = dy · factor` with the factors a forward saved. Differentiable in its
/// turn: where candle keeps the gradients' graph (`CANDLE_GRAD_DO_NOT_DETACH`, a
/// gradient penalty), its own gradient is itself (the map is diagonal, so its
/// adjoint), rather than the graph being cut there and second-order gradients
/// through the layer coming out zero.
struct BackwardOp {
    saved: Arc<Saved>,
}

impl BackwardOp {
    fn on(self, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The gradient may arrive transposed or broadcast: made contiguous first.
        Ok(Some(dy.contiguous()?.apply_op1(self)?))
    }
}

impl CpuPass for BackwardOp {
    fn run<T: WithDType + Element>(&self, _shape: Shape, dy: &[T]) -> candle_core::Result<Vec<T>> {
        let mut dx = zeroed(dy.len())?;
        cpu::backward(self.saved.cpu()?, dy, &mut dx)?;
        Ok(dx)
    }
}

impl CustomOp1 for BackwardOp {
    fn name(&self) -> &'static str {
        "dropblock-backward"
    }

    device_fwds!();

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        BackwardOp { saved: self.saved.clone() }.on(grad_res)
    }
}

/// The CUDA side: the crate's kernels on candle's buffers and stream.
#[cfg(feature = "candle-cuda")]
mod on_cuda {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, DType as CandleDType, Layout, WithDType};
    use cudarc::driver::{CudaSlice, CudaStream, CudaView};

    use super::{contiguous, unsupported, BackwardOp, ForwardOp, Op, Saved};
    use crate::config::{Mode, Shape};
    use crate::cuda::{CudaElement, DropBlockCuda};

    /// A pass from a contiguous `(N, C, spatial...)` device buffer into a fresh one, for
    /// any supported dtype; it writes every element of `y`.
    pub(super) trait CudaPass: Op {
        fn run<T: CudaElement + CudaDType + WithDType>(
            &self,
            db: &DropBlockCuda,
            stream: &Arc<CudaStream>,
            shape: Shape,
            x: &CudaView<'_, T>,
            y: &mut CudaSlice<T>,
        ) -> candle_core::Result<()>;
    }

    /// One `DropBlockCuda` (kernels loaded, launch tables built) per CUDA context,
    /// made on its first use and kept: a forward is then launches only. Keyed by
    /// the context, not candle's `DeviceId`, which is new for every
    /// `Device::new_cuda` of the same GPU (each would load the kernels again and
    /// keep them). The engine holds its context, so the key is never reused by
    /// another.
    fn engine(device: &CudaDevice) -> candle_core::Result<Arc<DropBlockCuda>> {
        static ENGINES: OnceLock<Mutex<HashMap<usize, Arc<DropBlockCuda>>>> = OnceLock::new();
        let context = device.cuda_stream().context().clone();
        let key = context.cu_ctx() as usize;
        let mut engines = ENGINES.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = engines.get(&key) {
            return Ok(db.clone());
        }
        let db = Arc::new(DropBlockCuda::from_context(&context)?);
        engines.insert(key, db.clone());
        Ok(db)
    }

    pub(super) fn run(
        pass: &impl CudaPass,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        fn typed<T: CudaElement + CudaDType + WithDType>(
            pass: &impl CudaPass,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<CudaStorage> {
            let (shape, range) = contiguous(layout, pass.memory())?;
            let device = &storage.device;
            // candle's stream: the launches queue behind the ops that made x.
            let stream = device.cuda_stream();
            let x = storage.as_cuda_slice::<T>()?.slice(range);
            // SAFETY: every pass writes all of y before anything reads it.
            let mut y = unsafe { stream.alloc::<T>(shape.numel()) }.map_err(crate::Error::from)?;
            pass.run(&*engine(device)?, &stream, shape, &x, &mut y)?;
            Ok(CudaStorage::wrap_cuda_slice(y, device.clone()))
        }
        Ok((by_dtype!(storage.dtype(), typed(pass, storage, layout))?, layout.shape().clone()))
    }

    impl CudaPass for ForwardOp {
        fn run<T: CudaElement + CudaDType + WithDType>(
            &self,
            db: &DropBlockCuda,
            stream: &Arc<CudaStream>,
            shape: Shape,
            x: &CudaView<'_, T>,
            y: &mut CudaSlice<T>,
        ) -> candle_core::Result<()> {
            let state = db.forward(stream, &self.cfg, shape, self.key, Mode::Train, x, y)?;
            let done = stream.record_event(None).map_err(crate::Error::from)?;
            self.save(Saved::Cuda(Box::new((state, done))))
        }
    }

    impl CudaPass for BackwardOp {
        fn run<T: CudaElement + CudaDType + WithDType>(
            &self,
            db: &DropBlockCuda,
            stream: &Arc<CudaStream>,
            _shape: Shape,
            dy: &CudaView<'_, T>,
            dx: &mut CudaSlice<T>,
        ) -> candle_core::Result<()> {
            let Saved::Cuda(saved) = &*self.saved else {
                candle_core::bail!("dropblock: a CUDA gradient for a forward that ran on the CPU");
            };
            let (state, done) = &**saved;
            stream.wait(done).map_err(crate::Error::from)?;
            Ok(db.backward(stream, state, dy, dx)?)
        }
    }
}
