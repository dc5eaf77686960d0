//! Launch wrappers for the kernels in `kernels/dropblock2d.cu`.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use half::{bf16, f16};

use super::module::{context, load};
use crate::abi;
use crate::config::{DropBlockConfig, Mode, Normalize, Shape, Sharing};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::rng::RngKey;
use crate::sampling::{expected_scale, Plan};

// SAFETY: plain-C structs of integers (src/abi.rs, checked against the header).
unsafe impl DeviceRepr for abi::DropBlockGeometry {}
unsafe impl DeviceRepr for abi::DropBlockSampling {}
unsafe impl DeviceRepr for abi::DropBlockApply {}

/// An element type with kernels: f32, f16, bf16. Its kernels are named by its
/// dtype (`dropblock2d_apply_<DType::name>`).
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}

impl CudaElement for f32 {}
impl CudaElement for f16 {}
impl CudaElement for bf16 {}

const THREADS: u32 = 256;
const WARPS_PER_BLOCK: u64 = THREADS as u64 / 32;
/// The fused kernel streams a run of slices per warp; larger slices go through
/// the flat two-kernel path, which spreads a slice over the whole grid.
const FUSED_MAX_PLANE_LEN: u64 = 1 << 16;
/// With fewer mask planes than this many per multiprocessor, kernels that give a
/// warp a run of planes would leave most warps idle: the grid-wide passes serve.
const MIN_PLANES_PER_SM: u64 = 32;
const UNTYPED: [&str; 5] = ["count_mask", "seed_blocks", "count_bits", "advance_key", "sample_seeds"];
const ELEMENTWISE: [&str; 4] = ["apply", "apply_unaligned", "fused", "fused_unaligned"];
/// The element-wise kernels' dtype suffixes are the dtypes' names, so a dtype
/// without kernels fails `the_kernel_table_matches_the_fatbin`.
const DTYPES: &[&str] = DType::NAMES;

/// A kernel by op and dtype suffix ("" for the untyped ones). Static strings, so
/// finding a kernel on the launch path neither formats nor allocates.
type KernelKey = (&'static str, &'static str);

fn kernel_keys() -> impl Iterator<Item = KernelKey> {
    UNTYPED.iter().map(|&op| (op, "")).chain(ELEMENTWISE.iter().flat_map(|&op| DTYPES.iter().map(move |&t| (op, t))))
}

/// `dropblock2d_<op>[_<dtype>]`, the name in the fatbin.
fn kernel_name((op, dtype): KernelKey) -> String {
    if dtype.is_empty() {
        format!("dropblock2d_{op}")
    } else {
        format!("dropblock2d_{op}_{dtype}")
    }
}

/// Every kernel the wrappers launch, loaded once per context.
#[doc(hidden)]
pub fn kernel_names() -> Vec<String> {
    kernel_keys().map(kernel_name).collect()
}

/// The DropBlock kernels loaded on one CUDA context. Cheap to clone; share one per
/// context (it is `Send + Sync`).
#[derive(Debug, Clone)]
pub struct DropBlockCuda {
    ctx: Arc<CudaContext>,
    sm_count: u32,
    /// Mask planes below which a forward takes the grid-wide passes.
    min_planes: u64,
    kernels: Arc<HashMap<KernelKey, Kernel>>,
}

/// A kernel and how many of its 256-thread blocks one multiprocessor holds.
#[derive(Debug)]
struct Kernel {
    function: CudaFunction,
    blocks_per_sm: u32,
}

/// Where a forward's `(seed, offset)` comes from: the host, as a kernel
/// parameter, or a [`DeviceGenerator`] in device memory.
pub enum KeySource<'a> {
    Host(RngKey),
    Device(&'a mut DeviceGenerator),
}

impl From<RngKey> for KeySource<'_> {
    fn from(k: RngKey) -> Self {
        KeySource::Host(k)
    }
}

impl<'a> From<&'a mut DeviceGenerator> for KeySource<'a> {
    fn from(g: &'a mut DeviceGenerator) -> Self {
        KeySource::Device(g)
    }
}

/// A `(seed, offset)` pair in device memory. A forward that draws from it reads
/// the key on the device and then steps the offset by 17 there, so a forward
/// captured into a CUDA graph draws a fresh mask at every replay (PyTorch's
/// generator does the same under capture). Eval-mode and `drop_prob == 0`
/// calls draw nothing and leave it as it is.
#[derive(Debug)]
pub struct DeviceGenerator {
    key: CudaSlice<u64>,
}

impl DeviceGenerator {
    /// The largest starting offset. The device steps the offset without a check
    /// (a kernel cannot return an error), so a generator starts with half the
    /// offset space ahead of it: 5·10^17 forwards before its counter blocks could
    /// wrap onto ones already drawn.
    pub const MAX_START_OFFSET: u64 = RngKey::MAX_OFFSET / 2;

    /// A generator at `(seed, offset)`, with `offset <= MAX_START_OFFSET`.
    pub fn new(stream: &Arc<CudaStream>, seed: u64, offset: u64) -> Result<Self> {
        if offset > Self::MAX_START_OFFSET {
            return Err(Error::OffsetOverflow { offset, max: Self::MAX_START_OFFSET });
        }
        let key = RngKey::new(seed, offset)?;
        Ok(Self { key: stream.clone_htod(&[key.seed(), key.offset()])? })
    }

    /// The key the next forward will draw with (synchronises the stream): with the
    /// CPU path, the same key reproduces that forward's mask.
    pub fn key(&self, stream: &Arc<CudaStream>) -> Result<RngKey> {
        let v = stream.clone_dtoh(&self.key)?;
        RngKey::new(v[0], v[1])
    }
}

/// What forward leaves for backward, on the device: the keep bits of every mask
/// plane, the kept counts and the scale(s). Owned by the caller and reusable
/// across calls of the same shape.
#[derive(Debug)]
pub struct DeviceState {
    shape: Shape,
    keep_bits: CudaSlice<u32>,
    counts: CudaSlice<u64>,
    scales: CudaSlice<f32>,
    call: Option<Call>,
}

#[derive(Debug, Clone, Copy)]
struct Call {
    /// `None` for an identity call (eval mode or drop_prob 0).
    plan: Option<Plan>,
    apply: abi::DropBlockApply,
}

/// Raw device pointers of one call's tensors. The callers hold cudarc's guards
/// for them until the launches are enqueued.
struct Io {
    x: sys::CUdeviceptr,
    y: sys::CUdeviceptr,
}

impl Io {
    fn aligned(&self) -> bool {
        (self.x | self.y) % 16 == 0
    }
}

impl DropBlockCuda {
    /// Kernels on device `ordinal` (a new primary-context handle).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::from_context(&context(ordinal)?)
    }

    /// Kernels on an existing context.
    pub fn from_context(ctx: &Arc<CudaContext>) -> Result<Self> {
        let module = load(ctx)?;
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let kernels = kernel_keys()
            .map(|key| {
                let function = module.load_function(&kernel_name(key))?;
                let blocks_per_sm = function.occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)?;
                Ok((key, Kernel { function, blocks_per_sm: blocks_per_sm.max(1) }))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let min_planes = sm_count as u64 * MIN_PLANES_PER_SM;
        Ok(Self { ctx: ctx.clone(), sm_count, min_planes, kernels: Arc::new(kernels) })
    }

    /// The same kernels with the grid-wide passes taken below `min_planes` mask
    /// planes instead of the device's own bound: 0 never takes them, `u64::MAX`
    /// always does. For tests, to reach every launch path on any device.
    #[doc(hidden)]
    pub fn with_min_planes(mut self, min_planes: u64) -> Self {
        self.min_planes = min_planes;
        self
    }

    /// The launch path a forward of `cfg` on `shape` takes.
    #[doc(hidden)]
    pub fn launch_path(&self, cfg: &DropBlockConfig, shape: Shape) -> LaunchPath {
        launch_plan(cfg, shape, self.min_planes).1
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("(name unavailable: {e})"))
    }

    /// Launching on a stream of another context would fault; refuse it. Contexts
    /// compare by the CUDA context they wrap, not by handle: every
    /// `CudaContext::new(ordinal)` is a new handle to the device's one primary
    /// context (a framework's and ours, say), and kernels loaded through one
    /// launch on streams of any of them.
    fn check_context(&self, ctx: &Arc<CudaContext>) -> Result<()> {
        if **ctx == *self.ctx {
            Ok(())
        } else {
            Err(Error::WrongContext)
        }
    }

    fn kernel(&self, op: &'static str, dtype: &'static str) -> Result<&Kernel> {
        self.kernels
            .get(&(op, dtype))
            .ok_or_else(|| Error::Driver(format!("kernel {} is not in the table", kernel_name((op, dtype)))))
    }

    /// A launch of `kernel` with `blocks` blocks at most one wave: every block
    /// resident at once, each thread striding over the rest of the work.
    fn launch_config(&self, kernel: &Kernel, blocks: u64) -> LaunchConfig {
        let wave = self.sm_count as u64 * kernel.blocks_per_sm as u64;
        LaunchConfig { grid_dim: (blocks.clamp(1, wave) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// A saved state for tensors of `shape`, to pass to the `_into` and in-place
    /// calls. Holds `ceil(H·W/32)` words of keep bits per `(n, c)` slice.
    pub fn alloc_state(&self, stream: &Arc<CudaStream>, shape: Shape) -> Result<DeviceState> {
        self.check_context(stream.context())?;
        let planes = shape.n() * shape.c();
        let words = planes * shape.plane_len().div_ceil(32);
        Ok(DeviceState {
            shape,
            keep_bits: stream.alloc_zeros::<u32>(words)?,
            counts: stream.alloc_zeros::<u64>(abi::DROPBLOCK_COUNT_SAMPLES as usize + shape.n())?,
            scales: stream.alloc_zeros::<f32>(shape.n())?,
            call: None,
        })
    }

    /// Forward, `y = round(f32(x) · factor)`, allocating the saved state.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<'k, T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: impl Into<KeySource<'k>>,
        mode: Mode,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<DeviceState> {
        let mut state = self.alloc_state(stream, shape)?;
        self.forward_into(stream, &mut state, cfg, shape, key, mode, x, y)?;
        Ok(state)
    }

    /// Forward into a caller-provided state: no device allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<'k, T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: impl Into<KeySource<'k>>,
        mode: Mode,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        shape.check_len("x", x.len())?;
        shape.check_len("y", y.len())?;
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, state, cfg, shape, key.into(), mode, Io { x: xp, y: yp })
    }

    /// Forward in place: `x` is overwritten with `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_inplace<'k, T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: impl Into<KeySource<'k>>,
        mode: Mode,
        x: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        shape.check_len("x", x.len())?;
        let (p, _g) = x.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, state, cfg, shape, key.into(), mode, Io { x: p, y: p })
    }

    /// Backward, `dx = round(f32(dy) · factor)` with the factors of the state's
    /// forward call.
    pub fn backward<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        dy: &impl DevicePtr<T>,
        dx: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        state.shape.check_len("dy", dy.len())?;
        state.shape.check_len("dx", dx.len())?;
        let (dyp, _g1) = dy.device_ptr(stream);
        let (dxp, _g2) = dx.device_ptr_mut(stream);
        self.launch_backward::<T>(stream, state, Io { x: dyp, y: dxp })
    }

    /// Backward in place: `dy` is overwritten with `dx`.
    pub fn backward_inplace<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        dy: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        state.shape.check_len("dy", dy.len())?;
        let (p, _g) = dy.device_ptr_mut(stream);
        self.launch_backward::<T>(stream, state, Io { x: p, y: p })
    }

    /// The raw seed words of every plane's seed grid (window order), computed by
    /// the device sampler: for checking it against [`Plan::seed_grid`].
    pub fn sample_seeds(&self, stream: &Arc<CudaStream>, plan: &Plan) -> Result<Vec<u64>> {
        self.check_context(stream.context())?;
        let g = *plan.geometry();
        let windows = (g.planes * g.seed_h as u64 * g.windows_per_row as u64) as usize;
        let mut out = stream.alloc_zeros::<u64>(windows)?;
        let k = self.kernel("sample_seeds", "")?;
        let cfg = self.launch_config(k, (windows as u64).div_ceil(THREADS as u64));
        let mut b = stream.launch_builder(&k.function);
        b.arg(&g).arg(plan.sampling()).arg(&mut out);
        // SAFETY: argument types match the kernel's signature; `out` holds every window.
        unsafe { b.launch(cfg) }?;
        stream.clone_dtoh(&out).map_err(Error::from)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_forward<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: KeySource<'_>,
        mode: Mode,
        io: Io,
    ) -> Result<()> {
        self.check_context(stream.context())?;
        if state.shape != shape {
            return Err(Error::ShapeMismatch { expected: state.shape.dims(), actual: shape.dims() });
        }
        let (apply, path) = launch_plan(cfg, shape, self.min_planes);
        state.call = None;
        if mode == Mode::Eval || cfg.is_identity() {
            copy::<T>(stream, shape, &io)?;
            state.call = Some(Call { plan: None, apply });
            return Ok(());
        }
        // With a device generator the kernels read (seed, offset) from device
        // memory; the plan's own key is then a placeholder.
        let (host_key, generator) = match key {
            KeySource::Host(k) => (k, None),
            KeySource::Device(gen) => {
                self.check_context(gen.key.context())?;
                (RngKey::new(0, 0)?, Some(gen))
            }
        };
        // The guard keeps cudarc's bookkeeping for the generator alive until the
        // launches below are enqueued; the advance kernel writes it.
        let key_guard = generator.map(|gen| gen.key.device_ptr_mut(stream));
        let device_key: sys::CUdeviceptr = key_guard.as_ref().map_or(0, |(p, _)| *p);
        let plan = Plan::new(cfg, shape, host_key);
        let g = *plan.geometry();
        // Kernels that give each warp a run of planes: a warp per plane at most.
        let warp_blocks = g.planes.div_ceil(WARPS_PER_BLOCK);
        if path == LaunchPath::Fused {
            let op = if vector_kernels::<T>(io.aligned(), apply.plane_len) { "fused" } else { "fused_unaligned" };
            let k = self.kernel(op, T::DTYPE.name())?;
            let mut b = stream.launch_builder(&k.function);
            b.arg(&g).arg(plan.sampling()).arg(&device_key).arg(&apply).arg(&io.x).arg(&io.y);
            b.arg(&mut state.keep_bits).arg(&mut state.scales);
            // SAFETY: argument types match the kernel; the state holds a plane per slice.
            unsafe { b.launch(self.launch_config(k, warp_blocks)) }?;
        } else {
            stream.memset_zeros(&mut state.counts)?;
            if path == LaunchPath::Warps {
                let k = self.kernel("count_mask", "")?;
                let mut b = stream.launch_builder(&k.function);
                b.arg(&g).arg(plan.sampling()).arg(&device_key).arg(&apply).arg(&mut state.keep_bits);
                b.arg(&mut state.counts).arg(&mut state.scales);
                // SAFETY: as above; counts hold 2 + N entries and scales N.
                unsafe { b.launch(self.launch_config(k, warp_blocks)) }?;
            } else {
                let words = g.planes * apply.plane_words;
                stream.memset_zeros(&mut state.keep_bits.slice_mut(..words as usize))?;
                let windows = g.planes * g.seed_h as u64 * g.windows_per_row as u64;
                let k = self.kernel("seed_blocks", "")?;
                let mut b = stream.launch_builder(&k.function);
                b.arg(&g).arg(plan.sampling()).arg(&device_key).arg(&apply).arg(&mut state.keep_bits);
                // SAFETY: as above; the bits hold `words` words, zeroed.
                unsafe { b.launch(self.launch_config(k, windows.div_ceil(THREADS as u64))) }?;
                let k = self.kernel("count_bits", "")?;
                let mut b = stream.launch_builder(&k.function);
                b.arg(&g).arg(&apply).arg(&mut state.keep_bits).arg(&mut state.counts).arg(&mut state.scales);
                // SAFETY: as above.
                unsafe { b.launch(self.launch_config(k, words.div_ceil(THREADS as u64))) }?;
            }
            self.launch_apply::<T>(stream, state, &g, &apply, &io)?;
        }
        if device_key != 0 {
            let k = self.kernel("advance_key", "")?;
            let mut b = stream.launch_builder(&k.function);
            b.arg(&device_key);
            // SAFETY: the generator holds [seed, offset]; every kernel above read it first (stream order).
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }?;
        }
        state.call = Some(Call { plan: Some(plan), apply });
        Ok(())
    }

    fn launch_backward<T: CudaElement>(&self, stream: &Arc<CudaStream>, state: &DeviceState, io: Io) -> Result<()> {
        self.check_context(stream.context())?;
        let call = state.call.ok_or(Error::NoForwardCall)?;
        match call.plan {
            None => copy::<T>(stream, state.shape, &io),
            Some(plan) => self.launch_apply::<T>(stream, state, plan.geometry(), &call.apply, &io),
        }
    }

    fn launch_apply<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        g: &abi::DropBlockGeometry,
        apply: &abi::DropBlockApply,
        io: &Io,
    ) -> Result<()> {
        let vector = vector_kernels::<T>(io.aligned(), apply.plane_len);
        let k = self.kernel(if vector { "apply" } else { "apply_unaligned" }, T::DTYPE.name())?;
        let vec = if vector { 16 / std::mem::size_of::<T>() as u64 } else { 1 };
        let mut b = stream.launch_builder(&k.function);
        b.arg(g).arg(apply).arg(&io.x).arg(&io.y).arg(&state.keep_bits).arg(&state.scales);
        // SAFETY: argument types match the kernel; x and y hold numel elements.
        unsafe { b.launch(self.launch_config(k, (apply.numel / vec).div_ceil(THREADS as u64))) }?;
        Ok(())
    }
}

/// Which kernels compute a forward call's keep bits (the numbers are the
/// emulator driver's, tests/emulator/driver.cpp).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaunchPath {
    /// Mask and scaled copy in one launch (Expected or None normalisation, no
    /// sharing, slices small enough for a warp).
    Fused = 0,
    /// `count_mask` (a warp per run of planes), then `apply`.
    Warps = 1,
    /// `seed_blocks` and `count_bits` over the whole grid, then `apply`: for few
    /// mask planes.
    Grid = 2,
}

/// How a forward call is launched: its element-wise parameters and its path. A
/// call with fewer than `min_planes` mask planes takes the grid-wide passes.
/// Public for tests that run the kernels off the GPU (tests/kernel_emulation.rs).
#[doc(hidden)]
pub fn launch_plan(cfg: &DropBlockConfig, shape: Shape, min_planes: u64) -> (abi::DropBlockApply, LaunchPath) {
    let apply = abi::DropBlockApply {
        numel: shape.numel() as u64,
        plane_len: shape.plane_len() as u64,
        plane_words: shape.plane_len().div_ceil(32) as u64,
        normalize: normalize_code(cfg.normalize()),
        fixed_scale: match cfg.normalize() {
            Normalize::Expected => expected_scale(cfg.drop_prob()),
            _ => 1.0,
        },
    };
    let path = if cfg.sharing().planes(shape) < min_planes {
        LaunchPath::Grid
    } else if matches!(cfg.normalize(), Normalize::Expected | Normalize::None)
        && cfg.sharing() == Sharing::None
        && apply.plane_len <= FUSED_MAX_PLANE_LEN
    {
        LaunchPath::Fused
    } else {
        LaunchPath::Warps
    };
    (apply, path)
}

/// Whether the 16-byte vector kernels may run: both tensors 16-byte aligned, and
/// slices at least a vector long (so a vector spans at most two slices).
#[doc(hidden)]
pub fn vector_kernels<T>(aligned: bool, plane_len: u64) -> bool {
    aligned && plane_len >= (16 / std::mem::size_of::<T>()) as u64
}

/// `y = x` for an identity call (nothing to do in place).
fn copy<T: CudaElement>(stream: &Arc<CudaStream>, shape: Shape, io: &Io) -> Result<()> {
    if io.x != io.y {
        let bytes = shape.numel() * std::mem::size_of::<T>();
        // SAFETY: both pointers hold `numel` elements (checked by the callers).
        unsafe { result::memcpy_dtod_async(io.y, io.x, bytes, stream.cu_stream()) }?;
    }
    Ok(())
}

fn normalize_code(n: Normalize) -> u32 {
    match n {
        Normalize::Global => abi::DROPBLOCK_NORM_GLOBAL,
        Normalize::PerSample => abi::DROPBLOCK_NORM_PER_SAMPLE,
        Normalize::Expected => abi::DROPBLOCK_NORM_EXPECTED,
        Normalize::None => abi::DROPBLOCK_NORM_NONE,
    }
}

impl DeviceState {
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The plan of the last forward call; `None` before any call or after an
    /// identity call. After a call that drew from a [`DeviceGenerator`] its key
    /// fields are placeholders: the generator held the key.
    pub fn plan(&self) -> Option<&Plan> {
        self.call.as_ref().and_then(|c| c.plan.as_ref())
    }

    /// The keep bits on the device: `ceil(H·W/32)` words per mask plane, bit
    /// `i % 32` of word `i / 32` set when cell `i = h·W + w` is kept.
    pub fn keep_bits(&self) -> &CudaSlice<u32> {
        &self.keep_bits
    }

    /// The keep bits of the used planes, copied to the host (synchronises), with
    /// the words per plane.
    fn host_bits(&self, stream: &Arc<CudaStream>) -> Result<Option<(Plan, usize, Vec<u32>)>> {
        let call = self.call.ok_or(Error::NoForwardCall)?;
        let Some(plan) = call.plan else {
            return Ok(None);
        };
        let plane_words = call.apply.plane_words as usize;
        let bits = stream.clone_dtoh(&self.keep_bits.slice(..plan.planes() * plane_words))?;
        Ok(Some((plan, plane_words, bits)))
    }

    /// Kept elements over the tensor, from the keep bits (synchronises the stream).
    pub fn kept(&self, stream: &Arc<CudaStream>) -> Result<u64> {
        let s = self.shape;
        let Some((plan, words, bits)) = self.host_bits(stream)? else {
            return Ok(s.numel() as u64);
        };
        let per_plane: Vec<u64> = bits.chunks(words).map(|p| p.iter().map(|w| w.count_ones() as u64).sum()).collect();
        Ok((0..s.n() * s.c()).map(|i| per_plane[plan.plane_of(i / s.c(), i % s.c())]).sum())
    }

    /// The keep mask as u8 in NCHW order, 1 where kept (synchronises the stream).
    pub fn keep_mask(&self, stream: &Arc<CudaStream>) -> Result<Vec<u8>> {
        let s = self.shape;
        let Some((plan, words, bits)) = self.host_bits(stream)? else {
            return Ok(vec![1; s.numel()]);
        };
        let mut out = vec![0u8; s.numel()];
        for (i, slice) in out.chunks_mut(s.plane_len()).enumerate() {
            let plane = &bits[plan.plane_of(i / s.c(), i % s.c()) * words..][..words];
            for (cell, v) in slice.iter_mut().enumerate() {
                *v = (plane[cell / 32] >> (cell % 32) & 1) as u8;
            }
        }
        Ok(out)
    }

    /// The scale(s) the last forward applied: one, or one per sample under
    /// PerSample normalisation (synchronises the stream).
    pub fn scales(&self, stream: &Arc<CudaStream>) -> Result<Vec<f32>> {
        let call = self.call.ok_or(Error::NoForwardCall)?;
        if call.plan.is_none() {
            return Ok(vec![1.0]);
        }
        let n = if call.apply.normalize == abi::DROPBLOCK_NORM_PER_SAMPLE { self.shape.n() } else { 1 };
        stream.clone_dtoh(&self.scales.slice(..n)).map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel the wrappers load is in the fatbin (ptxas reported it), and
    /// every kernel in the fatbin is loaded.
    #[test]
    fn the_kernel_table_matches_the_fatbin() {
        let report = super::super::ptxas_report();
        let mut built: Vec<&str> = report
            .lines()
            .filter_map(|l| l.split("Compiling entry function '").nth(1))
            .filter_map(|rest| rest.split('\'').next())
            .collect();
        built.sort();
        built.dedup();
        let mut names = super::kernel_names();
        names.sort();
        assert_eq!(built, names);
    }
}
