//! Launch wrappers for the kernels in `kernels/dropblock.cu`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    LaunchConfig, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};
use half::{bf16, f16};

use super::driver::capture_id;
use super::launch::{
    self, kernel_keys, kernel_name, launch_plan, Arg, Buffer, CallPlan, KernelKey, Pass, Queue, THREADS,
};
use super::module::{context, load};
use super::ranges;
use crate::abi;
use crate::config::{DropBlockConfig, Fill, Layout, Mode, Shape};
use crate::dtype::Element;
use crate::error::{host_vec, Error, Result};
use crate::rng::RngKey;
use crate::sampling::{plane_of, Plan};
use crate::shard::Shard;

// SAFETY: plain-C structs of integers and an f32, without padding, valid for any
// bits (src/abi.rs, checked against the header).
unsafe impl DeviceRepr for abi::DropBlockGeometry {}
unsafe impl DeviceRepr for abi::DropBlockSampling {}
unsafe impl DeviceRepr for abi::DropBlockApply {}
unsafe impl DeviceRepr for abi::DropBlockTiles {}
unsafe impl DeviceRepr for abi::DropBlockShard {}

/// An element type with kernels: f32, f16, bf16. Its kernels are named by its
/// dtype (`dropblock_apply_<DType::name>`).
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}

impl CudaElement for f32 {}
impl CudaElement for f16 {}
impl CudaElement for bf16 {}

/// The DropBlock kernels loaded on one CUDA context. Cheap to clone; share one per
/// context (it is `Send + Sync`).
///
/// # Errors
///
/// A call refused for its arguments (every error here but the CUDA stack's) has
/// launched nothing and left its state's last call as it was ([`Self::forward`]
/// may have made its state; with cudarc's event tracking on, cudarc's guards on
/// the tensors record their waits as they are taken). Any call can return:
/// - [`Error::WrongContext`]: a stream, state, generator or buffer of another
///   CUDA context;
/// - [`Error::LengthMismatch`]: a tensor (or shard counts) of another length than
///   the shape's;
/// - [`Error::CaptureAcrossStreams`]: a state or generator last used on a stream
///   on the other side of a capture;
/// - [`Error::DeviceOutOfMemory`] and [`Error::Driver`] from the CUDA stack.
///
/// And by call:
/// - forwards and shard calls: [`Error::ShapeMismatch`] (a state of another
///   shape or layout), [`Error::BlockRankMismatch`] and
///   [`Error::TooManyCoverageClasses`] (the config does not fit the shape),
///   [`Error::NoiseNeedsHostKey`];
/// - calls that allocate ([`Self::forward`], [`Self::alloc_state`], ...):
///   [`Error::AllocationInCapture`];
/// - [`Self::apply`] and [`Self::backward`]: [`Error::NoForwardCall`] on a state
///   with no forward yet, [`Error::ShardNotFinished`] after a shard call without
///   [`Self::finish_shard`], which refuses a state whose last call was not
///   [`Self::sample_shard`] ([`Error::NotAShardCall`]).
#[derive(Debug, Clone)]
pub struct DropBlockCuda {
    ctx: Arc<CudaContext>,
    sm_count: u32,
    /// Tiles below which a forward takes the grid-wide passes.
    min_tiles: u64,
    kernels: Arc<HashMap<KernelKey, Kernel>>,
}

/// A kernel and how many of its 256-thread blocks one multiprocessor holds.
#[derive(Debug)]
struct Kernel {
    function: CudaFunction,
    blocks_per_sm: u32,
}

/// A call's key that [`DropBlockCuda::check_key`] accepted.
struct CheckedKey<'k> {
    key: KeySource<'k>,
    /// An identity call (eval, rate 0) draws nothing.
    identity: bool,
}

/// Where a forward's or shard call's `(seed, offset)` comes from: the host, as a
/// kernel parameter, or a [`DeviceGenerator`] in device memory.
pub enum KeySource<'a> {
    /// A key from the host, passed by value.
    Host(RngKey),
    /// A generator on the device, read and stepped there by the call. Not for
    /// [`Fill::Noise`], whose element pass takes the key as a parameter
    /// ([`Error::NoiseNeedsHostKey`]).
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

/// A `(seed, offset)` pair in device memory. A forward (or shard call) that
/// draws from it reads the key on the device and then steps the offset by 17
/// there, so a call captured into a CUDA graph draws a fresh mask at every replay (PyTorch's
/// generator does the same under capture). Eval-mode and `drop_prob == 0`
/// calls draw nothing and leave it as it is. Noise fill takes a host key
/// ([`Error::NoiseNeedsHostKey`]): a graph that captures it replays its noise and
/// mask.
#[derive(Debug)]
pub struct DeviceGenerator {
    key: CudaSlice<u64>,
    /// The kernels reach the key by raw pointer: calls on other streams are ordered
    /// here, as a state's are, not by cudarc's events (which may be off).
    order: StreamOrder,
}

impl DeviceGenerator {
    /// The largest starting offset. The device steps the offset without a check
    /// (a kernel cannot return an error), so a generator starts with half the
    /// offset space ahead of it: 5·10^17 forwards before its counter blocks could
    /// wrap onto ones already drawn.
    pub const MAX_START_OFFSET: u64 = RngKey::MAX_OFFSET / 2;

    /// A generator at `(seed, offset)`, with `offset <= MAX_START_OFFSET`; not
    /// while `stream` is being captured ([`Error::AllocationInCapture`]).
    pub fn new(stream: &Arc<CudaStream>, seed: u64, offset: u64) -> Result<Self> {
        if offset > Self::MAX_START_OFFSET {
            return Err(Error::OffsetOverflow { offset, max: Self::MAX_START_OFFSET });
        }
        refuse_capture(stream)?;
        let key = RngKey::new(seed, offset)?;
        Ok(Self { key: stream.clone_htod(&[key.seed(), key.offset()])?, order: StreamOrder::new(stream) })
    }

    /// The key the next forward or shard call will draw with (synchronises the
    /// stream, after the generator's last call): with the CPU path, the same key
    /// reproduces that call's mask.
    pub fn key(&self, stream: &Arc<CudaStream>) -> Result<RngKey> {
        let _ordered = self.order.enter(stream)?;
        let v = stream.clone_dtoh(&self.key)?;
        RngKey::new(v[0], v[1])
    }

    /// Moves the generator to `(seed, offset)` on `stream`, after its last call,
    /// with `offset <= MAX_START_OFFSET` as in [`Self::new`]: to resume from a
    /// checkpoint's [`Self::key`]. The key stays in the same device memory, so
    /// graphs captured with this generator keep drawing from it (a new generator
    /// would need them captured again). Not while `stream` is being captured
    /// ([`Error::HostCopyInCapture`]).
    pub fn set_key(&mut self, stream: &Arc<CudaStream>, seed: u64, offset: u64) -> Result<()> {
        if offset > Self::MAX_START_OFFSET {
            return Err(Error::OffsetOverflow { offset, max: Self::MAX_START_OFFSET });
        }
        same_context("stream", stream.context(), self.key.context())?;
        if capturing(stream)? {
            return Err(Error::HostCopyInCapture);
        }
        drop(self.order.enter(stream)?); // `&mut`: no other call can interleave
        stream.memcpy_htod(&[seed, offset], &mut self.key)?;
        Ok(())
    }
}

impl Drop for DeviceGenerator {
    fn drop(&mut self) {
        self.order.release(self.key.stream());
    }
}

/// The stream of the last call on a buffer the kernels reach by raw pointer (a
/// state's, a generator's key), so that a call on another stream first waits for
/// it, whether or not cudarc's per-buffer events are on.
#[derive(Debug)]
struct StreamOrder(Mutex<Option<Arc<CudaStream>>>);

impl StreamOrder {
    fn new(stream: &Arc<CudaStream>) -> Self {
        Self(Mutex::new(Some(stream.clone())))
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<CudaStream>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn last(&self) -> Option<Arc<CudaStream>> {
        self.lock().clone()
    }

    /// The last call's stream, if a call on `stream` must wait for it.
    fn other(last: &Option<Arc<CudaStream>>, stream: &Arc<CudaStream>) -> Option<Arc<CudaStream>> {
        last.as_ref().filter(|prev| !Arc::ptr_eq(prev, stream) && prev.cu_stream() != stream.cu_stream()).cloned()
    }

    /// [`Error::CaptureAcrossStreams`] if a call on `stream` would have to wait,
    /// from inside a capture, for a stream outside it. Changes and enqueues
    /// nothing: a call checks this before it touches its state.
    fn check(&self, stream: &Arc<CudaStream>) -> Result<()> {
        match Self::other(&self.lock(), stream) {
            Some(prev) => refuse_capture_across(stream, &prev),
            None => Ok(()),
        }
    }

    /// Orders a call on `stream` after the last one (checked as [`Self::check`]
    /// does), and makes `stream` the last. The guard holds the order until the
    /// call's work is enqueued, so that calls from several threads on a shared
    /// state are ordered as they enqueue.
    fn enter(&self, stream: &Arc<CudaStream>) -> Result<MutexGuard<'_, Option<Arc<CudaStream>>>> {
        let mut last = self.lock();
        if let Some(prev) = Self::other(&last, stream) {
            refuse_capture_across(stream, &prev)?;
            stream.join(&prev)?;
        }
        *last = Some(stream.clone());
        Ok(last)
    }

    /// Before the buffers are freed on `own`, the stream they were allocated on:
    /// makes the frees wait for the last call's work.
    fn release(&mut self, own: &CudaStream) {
        let last = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(last) = last {
            if own.cu_stream() != last.cu_stream() {
                // A failure here is recorded on the context by cudarc; a drop cannot return it.
                let _ = own.join(&last);
            }
        }
    }
}

/// [`Error::CaptureAcrossStreams`] unless `stream` and `prev` (whose work a call
/// on `stream` must wait for) are both outside any capture or both in the same
/// one: the wait would cross a capture's boundary. Into a capture, CUDA refuses
/// it and ends the capture (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`); between two
/// captures it refuses it too (`CUDA_ERROR_STREAM_CAPTURE_MERGE`); out of one, it
/// pulls `stream` into the capture, so the call would be captured instead of run
/// and the capture could not end unjoined. Two streams capturing at once are in
/// one capture when one was forked into the other's (it waited on an event
/// recorded there).
fn refuse_capture_across(stream: &CudaStream, prev: &CudaStream) -> Result<()> {
    match (capturing(stream)?, capturing(prev)?) {
        (false, false) => Ok(()),
        // Asked only here, where both capture.
        (true, true) => match (capture_id(stream)?, capture_id(prev)?) {
            (Some(a), Some(b)) if a == b => Ok(()),
            _ => Err(Error::CaptureAcrossStreams),
        },
        _ => Err(Error::CaptureAcrossStreams),
    }
}

/// What planning the call would refuse, before its state or key is touched: for
/// an identity call (eval, rate 0), which plans nothing, all of it
/// ([`Plan::check`]), so that it refuses what training would; for a drawing call
/// the block's rank, the rest coming from its plan (cached across calls, where
/// the check's coverage sums would not be).
fn check_plannable(cfg: &DropBlockConfig, shape: Shape, identity: bool) -> Result<()> {
    match identity {
        true => Plan::check(cfg, shape),
        false => cfg.block().sizes_for(shape.spatial_rank()).map(drop),
    }
}

/// [`Error::WrongContext`] unless `a` and `b` wrap the same CUDA context. They
/// compare by the context they wrap, not by handle: every
/// `CudaContext::new(ordinal)` is a new handle to the device's one primary context
/// (a framework's and ours, say), and kernels loaded through one launch on
/// streams of any of them.
fn same_context(what: &'static str, a: &CudaContext, b: &CudaContext) -> Result<()> {
    match a == b {
        true => Ok(()),
        false => Err(Error::WrongContext { what }),
    }
}

/// [`Error::WrongContext`] unless `buffer` is on `stream`'s context (whose own
/// check against the kernels' follows in the call).
fn check_buffer<T>(what: &'static str, stream: &CudaStream, buffer: &impl DeviceSlice<T>) -> Result<()> {
    same_context(what, buffer.stream().context(), stream.context())
}

/// What forward leaves for backward, on the device: the keep bits of every mask
/// plane, the kept counts and the scale(s). Owned by the caller and reusable
/// across calls of the same shape.
///
/// The kernels reach its buffers by raw pointer, without cudarc's per-buffer
/// events: the state remembers the stream of its last call, and a call on
/// another stream first makes that stream wait for it. (So a call being captured
/// on another stream than the state's last call is refused,
/// [`Error::CaptureAcrossStreams`]: a capture cannot wait on work outside it. A
/// graph launched on yet another stream is outside this order: order its launches
/// yourself. So are calls from several threads on the per-thread default stream,
/// whose one handle names another stream on each thread: the state compares
/// handles, so order such calls with an event, as the candle layer does.)
#[derive(Debug)]
pub struct DeviceState {
    shape: Shape,
    keep_bits: CudaSlice<u32>,
    /// Channels-last shapes: owns the planes' bits (`ptrs.plane_bits`), which the
    /// count pass writes and `channels_last_bits` (or, in a forward that can take
    /// it, the one-pass kernel: launch.rs) turns into `keep_bits` in the tensor's
    /// order.
    _plane_bits: Option<CudaSlice<u32>>,
    counts: CudaSlice<u64>,
    scales: CudaSlice<f32>,
    ptrs: StatePtrs,
    order: StreamOrder,
    call: Option<Call>,
    /// Each plane's kept cells in a shard's call: one counter per slice at most,
    /// allocated by the first shard call on the state.
    plane_kept: Option<CudaSlice<u64>>,
    /// The last shard call's configuration, shard, plan and kernel parameters.
    shard_cached: Option<(DropBlockConfig, Shard, Plan, abi::DropBlockShard, abi::DropBlockGeometry)>,
    /// The last configuration's plan and launch (and the grid-path bound it was
    /// planned with), reused while neither changes.
    cached: Option<(DropBlockConfig, u64, Plan, CallPlan)>,
}

#[derive(Debug, Clone, Copy)]
struct StatePtrs {
    keep_bits: sys::CUdeviceptr,
    /// Where the count pass writes the planes' bits: `keep_bits`, or for a
    /// channels-last shape the state's `plane_bits`.
    plane_bits: sys::CUdeviceptr,
    counts: sys::CUdeviceptr,
    scales: sys::CUdeviceptr,
    /// A shard call's `plane_kept`, once allocated.
    plane_kept: Option<sys::CUdeviceptr>,
}

#[derive(Debug, Clone, Copy)]
struct Call {
    /// The plan and launch of a call that drew a mask; `None` for an identity call
    /// (eval mode or drop_prob 0).
    masked: Option<(Plan, CallPlan)>,
    /// A shard's call: its parameters, and whether its scales were computed from
    /// the summed counts yet.
    shard: Option<(abi::DropBlockShard, bool)>,
}

/// [`Error::AllocationInCapture`] while `stream` is being captured, or (the legacy
/// NULL stream) while a blocking stream is, when work on it would be an implicit
/// dependency that capture forbids: no call allocates into a graph.
fn refuse_capture(stream: &CudaStream) -> Result<()> {
    match capturing(stream)? {
        true => Err(Error::AllocationInCapture),
        false => Ok(()),
    }
}

/// Whether work enqueued on `stream` now would be captured (into its own capture,
/// or into the legacy default stream's implicit one), or refused by an
/// invalidated capture: the one notion of "capturing" every check here uses.
fn capturing(stream: &CudaStream) -> Result<bool> {
    match stream.capture_status() {
        Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) => Ok(false),
        Err(e) if e.0 != sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => Err(e.into()),
        _ => Ok(true),
    }
}

/// Raw device pointers of one call's tensors. The callers hold cudarc's guards
/// for them until the launches are enqueued.
struct Io {
    x: sys::CUdeviceptr,
    y: sys::CUdeviceptr,
}

impl Io {
    fn aligned(&self) -> bool {
        (self.x | self.y).is_multiple_of(16)
    }

    /// Out of place, after checking both lengths against `shape`. The guards record
    /// the buffers' use on `stream` when dropped: hold them past the launches.
    fn between<'a, T>(
        stream: &'a CudaStream,
        shape: Shape,
        pass: Pass,
        x: &'a impl DevicePtr<T>,
        y: &'a mut impl DevicePtrMut<T>,
    ) -> Result<(Self, [SyncOnDrop<'a>; 2])> {
        let [x_name, y_name] = pass.buffer_names();
        shape.check_len(x_name, x.len())?;
        shape.check_len(y_name, y.len())?;
        check_buffer(x_name, stream, x)?;
        check_buffer(y_name, stream, y)?;
        let (xp, gx) = x.device_ptr(stream);
        let (yp, gy) = y.device_ptr_mut(stream);
        Ok((Io { x: xp, y: yp }, [gx, gy]))
    }

    /// In place (`y` is `x`), after checking the length against `shape`.
    fn in_place<'a, T>(
        stream: &'a CudaStream,
        shape: Shape,
        pass: Pass,
        x: &'a mut impl DevicePtrMut<T>,
    ) -> Result<(Self, SyncOnDrop<'a>)> {
        shape.check_len(pass.buffer_names()[0], x.len())?;
        check_buffer(pass.buffer_names()[0], stream, x)?;
        let (p, g) = x.device_ptr_mut(stream);
        Ok((Io { x: p, y: p }, g))
    }
}

impl DropBlockCuda {
    /// Kernels on device `ordinal` (a new primary-context handle).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::from_context(&context(ordinal)?)
    }

    /// Kernels on an existing context ([`Error::UnsupportedDevice`] where the build
    /// has no code for its device or its driver is older than the toolkit that
    /// built them).
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
        Ok(Self { ctx: ctx.clone(), sm_count, min_tiles: sm_count as u64, kernels: Arc::new(kernels) })
    }

    /// The same kernels with the grid-wide passes taken below `min_tiles` tiles
    /// instead of one per multiprocessor: 0 takes them only for planes too large
    /// for a tile, `u64::MAX` always. For tests, to reach every launch path on any
    /// device.
    #[doc(hidden)]
    pub fn with_min_tiles(mut self, min_tiles: u64) -> Self {
        self.min_tiles = min_tiles;
        self
    }

    /// How a forward of `cfg` on `shape` is launched on this device.
    #[doc(hidden)]
    pub fn launch_plan(&self, cfg: &DropBlockConfig, shape: Shape) -> Result<CallPlan> {
        // Tiles are balanced over the count pass's resident blocks.
        let per_sm = self.kernels.get(&("count_mask", "")).map_or(1, |k| k.blocks_per_sm);
        launch_plan(cfg, shape, self.min_tiles, self.sm_count as u64 * per_sm as u64)
    }

    /// The CUDA context the kernels are loaded on; calls take streams of it.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("(name unavailable: {e})"))
    }

    /// Launching on a stream of another context would fault; refuse it
    /// ([`same_context`]).
    fn check_context(&self, what: &'static str, ctx: &Arc<CudaContext>) -> Result<()> {
        same_context(what, ctx, &self.ctx)
    }

    /// The key a call passes its kernels, and the device generator they read it
    /// from and step instead, if any (the plan's key is then a placeholder). An
    /// identity call draws nothing: a placeholder, and no generator to step.
    /// A generator's call on `stream` is ordered after its last one here.
    fn resolve_key<'k>(
        &self,
        stream: &Arc<CudaStream>,
        key: CheckedKey<'k>,
    ) -> Result<(RngKey, Option<&'k mut DeviceGenerator>)> {
        match key.key {
            KeySource::Device(gen) if !key.identity => {
                drop(gen.order.enter(stream)?); // `&mut`: no other call can interleave
                Ok((RngKey::PLACEHOLDER, Some(gen)))
            }
            KeySource::Host(k) if !key.identity => Ok((k, None)),
            _ => Ok((RngKey::PLACEHOLDER, None)),
        }
    }

    /// What [`Self::resolve_key`] would refuse, checked without changing or
    /// enqueuing anything: noise fill from a device generator, a generator of
    /// another context, one whose last call is across a capture's boundary.
    fn check_key<'k>(
        &self,
        stream: &Arc<CudaStream>,
        cfg: &DropBlockConfig,
        identity: bool,
        key: KeySource<'k>,
    ) -> Result<CheckedKey<'k>> {
        match &key {
            KeySource::Device(_) if !identity && cfg.fill() == Fill::Noise => return Err(Error::NoiseNeedsHostKey),
            KeySource::Device(gen) if !identity => {
                self.check_context("device generator", gen.key.context())?;
                gen.order.check(stream)?;
            }
            _ => {}
        }
        Ok(CheckedKey { key, identity })
    }

    /// A call on `state` through `stream`, before anything is changed or
    /// enqueued: both must be on the kernels' context (a state of another device's
    /// would hand its kernels pointers they cannot read), and a capture cannot
    /// wait on the state's last stream outside it ([`Error::CaptureAcrossStreams`]).
    fn check_call(&self, stream: &Arc<CudaStream>, state: &DeviceState) -> Result<()> {
        self.check_context("stream", stream.context())?;
        self.check_context("state", state.keep_bits.context())?;
        state.order.check(stream)
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
    /// calls: one keep bit per element (the most any sharing needs; a
    /// channels-last shape another for the planes' bits), N + 2 counters and N
    /// scales. Refused while `stream` is being captured
    /// ([`Error::AllocationInCapture`]): allocate before capturing.
    pub fn alloc_state(&self, stream: &Arc<CudaStream>, shape: Shape) -> Result<DeviceState> {
        self.check_context("stream", stream.context())?;
        refuse_capture(stream)?;
        let keep_bits = stream.alloc_zeros::<u32>(shape.numel().div_ceil(32))?;
        let plane_bits = match shape.layout() {
            Layout::ChannelsFirst => None,
            Layout::ChannelsLast => Some(stream.alloc_zeros::<u32>(shape.numel().div_ceil(32))?),
        };
        let counts = stream.alloc_zeros::<u64>(abi::DROPBLOCK_COUNT_SAMPLES as usize + shape.n())?;
        let scales = stream.alloc_zeros::<f32>(shape.n())?;
        // The raw pointers, taken once; DeviceState orders its own uses by stream.
        let keep_ptr = keep_bits.device_ptr(stream).0;
        let ptrs = StatePtrs {
            keep_bits: keep_ptr,
            plane_bits: plane_bits.as_ref().map_or(keep_ptr, |b| b.device_ptr(stream).0),
            counts: counts.device_ptr(stream).0,
            scales: scales.device_ptr(stream).0,
            plane_kept: None,
        };
        Ok(DeviceState {
            shape,
            keep_bits,
            _plane_bits: plane_bits,
            counts,
            scales,
            ptrs,
            order: StreamOrder::new(stream),
            call: None,
            plane_kept: None,
            shard_cached: None,
            cached: None,
        })
    }

    /// A saved state for `shard`'s calls ([`Self::sample_shard`]): the state of
    /// [`Self::alloc_state`] for `shard.local()`, with the per-plane counts a
    /// drawing shard call needs (N·C u64) allocated now rather than by the first
    /// such call, so that the first call can be captured into a CUDA graph.
    /// Refused while `stream` is being captured ([`Error::AllocationInCapture`]).
    pub fn alloc_shard_state(&self, stream: &Arc<CudaStream>, shard: &Shard) -> Result<DeviceState> {
        let mut state = self.alloc_state(stream, shard.local())?;
        state.alloc_plane_kept(stream)?;
        Ok(state)
    }

    /// Forward, `y = round(f32(x) · factor)` (with noise fill, `x` where kept and
    /// the noise where dropped), allocating the saved state (so not under stream
    /// capture: capture [`Self::forward_into`]).
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

    /// Forward into a caller-provided state: no device allocation. `shape` must
    /// be the state's ([`Error::ShapeMismatch`]): it says what `x` and `y` hold,
    /// and a state is made for one shape.
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
        let (io, _guards) = Io::between(stream, shape, Pass::Forward, x, y)?;
        self.launch_forward::<T>(stream, state, cfg, shape, key.into(), mode, Some(io))
    }

    /// [`Self::forward_into`] in place: `x` is overwritten with `y`. Like every
    /// CUDA call but [`Self::forward`] it takes a state allocated beforehand
    /// (where [`cpu::forward_inplace`](crate::cpu::forward_inplace) returns a new
    /// one).
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
        let (io, _guard) = Io::in_place(stream, shape, Pass::Forward, x)?;
        self.launch_forward::<T>(stream, state, cfg, shape, key.into(), mode, Some(io))
    }

    /// The first half of a forward on its own: fills the state's keep bits and
    /// scales from the key alone. The mask does not depend on x, so a pipeline can
    /// sample on one stream while the layer before runs on another, then call
    /// [`DropBlockCuda::apply`] (or [`DropBlockCuda::apply_inplace`]) once x is
    /// ready. The result is the forward's, bit for bit.
    pub fn sample_into<'k>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: impl Into<KeySource<'k>>,
        mode: Mode,
    ) -> Result<()> {
        // The element type does not matter without tensors.
        self.launch_forward::<f32>(stream, state, cfg, shape, key.into(), mode, None)
    }

    /// The forward's element pass with the state's last call: the second half of
    /// a forward after [`DropBlockCuda::sample_into`]. `y = round(f32(x) ·
    /// factor)`, or with noise fill `x` where kept and the noise where dropped (so
    /// a backward is [`DropBlockCuda::backward`], never this).
    pub fn apply<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.saved_into(stream, state, x, y, Pass::Forward)
    }

    /// [`DropBlockCuda::apply`] in place: `x` is overwritten with `y`.
    pub fn apply_inplace<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        x: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.saved_inplace(stream, state, x, Pass::Forward)
    }

    /// Backward, `dx = round(f32(dy) · factor)` with the factors of the state's
    /// last forward (or sample) call. A state holds one mask: a forward whose
    /// backward is still to come needs a state of its own (two forwards on one
    /// state before their backwards, as in gradient accumulation, give both
    /// backwards the second mask).
    pub fn backward<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        dy: &impl DevicePtr<T>,
        dx: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.saved_into(stream, state, dy, dx, Pass::Backward)
    }

    /// Backward in place: `dy` is overwritten with `dx`.
    pub fn backward_inplace<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        dy: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.saved_inplace(stream, state, dy, Pass::Backward)
    }

    fn saved_into<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
        pass: Pass,
    ) -> Result<()> {
        let (io, _guards) = Io::between(stream, state.shape, pass, x, y)?;
        self.launch_saved::<T>(stream, state, io, pass)
    }

    fn saved_inplace<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        x: &mut impl DevicePtrMut<T>,
        pass: Pass,
    ) -> Result<()> {
        let (io, _guard) = Io::in_place(stream, state.shape, pass, x)?;
        self.launch_saved::<T>(stream, state, io, pass)
    }

    /// The first half of a sharded forward on the device: samples into `state`
    /// (made for `shard.local()`) exactly the shard's box of the unsharded call's
    /// mask, and overwrites `counts` (`1 + 3N` of the global shape, the layout of
    /// [`ShardCounts`](crate::ShardCounts)) with the shard's kept counts. Sum
    /// `counts` over every shard on the device (an all-reduce; `nccl::all_reduce_counts`
    /// with the `nccl` feature), then call [`Self::finish_shard`] with the sum, and
    /// [`Self::apply`] / [`Self::backward`] as after any forward. Nothing
    /// synchronises with the host. The key (the same on every shard) may be a
    /// [`DeviceGenerator`], one per shard at the same `(seed, offset)`: each call
    /// steps each by 17 on the device, so they stay in step, and a CUDA graph
    /// that captures the call draws a fresh mask at every replay. The first
    /// call on a state from [`Self::alloc_state`] that draws a mask allocates its
    /// per-plane counts (N·C u64), which stream capture cannot hold
    /// ([`Error::AllocationInCapture`]): to capture it, allocate the state with
    /// [`Self::alloc_shard_state`].
    #[allow(clippy::too_many_arguments)]
    pub fn sample_shard<'k>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shard: &Shard,
        key: impl Into<KeySource<'k>>,
        mode: Mode,
        counts: &mut impl DevicePtrMut<u64>,
    ) -> Result<()> {
        let _range = ranges::range("dropblock::sample_shard", || format!("{shard:?} {mode:?}: {cfg}"));
        self.check_call(stream, state)?;
        let (local, global) = (shard.local(), shard.global());
        if state.shape != local {
            return Err(Error::ShapeMismatch { expected: state.shape.to_string(), actual: local.to_string() });
        }
        let entries = crate::ShardCounts::len_for(global);
        if counts.len() != entries {
            return Err(Error::LengthMismatch { what: "shard counts", expected: entries, actual: counts.len() });
        }
        check_buffer("shard counts", stream, counts)?;
        let identity = mode == Mode::Eval || cfg.is_identity();
        check_plannable(cfg, global, identity)?;
        // The plan and the shard's parameters, reused while the config and the
        // shard stay the same (an identity call needs neither), and the key's
        // checks come before the per-plane counts' allocation, the generator's
        // order and its guard: a call refused for its config or its key leaves
        // the last call's state and enqueues nothing of its own (with cudarc's
        // event tracking on, cudarc's guards on the caller's buffers record
        // their waits as they are taken).
        let cached = match &state.shard_cached {
            _ if identity => None,
            Some((c, s, plan, sh, local_g)) if c == cfg && s == shard => Some((*plan, *sh, *local_g)),
            _ => {
                let plan = Plan::new(cfg, global, RngKey::PLACEHOLDER)?;
                let (sh, local_g) = shard.kernel_params(&plan)?;
                state.shard_cached = Some((*cfg, *shard, plan, sh, local_g));
                Some((plan, sh, local_g))
            }
        };
        let key = self.check_key(stream, cfg, identity, key.into())?;
        if !identity && state.plane_kept.is_none() {
            state.alloc_plane_kept(stream)?;
        }
        let (key, generator) = self.resolve_key(stream, key)?;
        let cached = cached.map(|(plan, sh, local_g)| (plan.with_key(key), sh, local_g));
        let key_guard = generator.map(|gen| gen.key.device_ptr_mut(stream));
        state.call = None;
        drop(state.enter(stream)?); // a `&mut` call: no other call can interleave
        let (cp, _guard) = counts.device_ptr_mut(stream);
        let mut q = self.queue(stream, state).with(Buffer::ShardCounts, cp);
        let Some((plan, sh, local_g)) = cached else {
            launch::sample_shard_identity(&mut q, shard, entries as u64)?;
            state.call = Some(Call { masked: None, shard: Some((shard.box_params(), true)) });
            return Ok(());
        };
        if let Some((p, _)) = &key_guard {
            q = q.with(Buffer::Generator, *p);
        }
        let launch = launch::shard_call_plan(cfg, local, local_g);
        launch::sample_shard(&mut q, &plan, &sh, &launch, local, entries as u64, key_guard.is_some())?;
        state.call = Some(Call { masked: Some((plan, launch)), shard: Some((sh, false)) });
        Ok(())
    }

    /// The second half of a sharded forward: the scale(s) of the shard's last
    /// [`Self::sample_shard`] from `counts` summed over every shard (the same f64
    /// division rounded to f32 on every shard). Then [`Self::apply`] and
    /// [`Self::backward`] run as after any forward.
    ///
    /// The kernel checks the counts as [`ShardCounts::check`](crate::ShardCounts::check)
    /// and, for the scales that divide by them,
    /// [`ShardCounts::check_covered`](crate::ShardCounts::check_covered) do (as
    /// [`ShardSample::finish`](crate::cpu::ShardSample::finish) does), but cannot
    /// return an error without a host sync: counts no shards could give (a sample
    /// covered past its `C·L` elements or keeping more than is covered, a total
    /// other than the samples' sum: a faulty reduction, another shape's counts),
    /// or a Global or PerSample scale's counts not summed once over every shard
    /// holding the samples (one shard's own, a reduction that missed one or
    /// counted one twice), make every scale NaN, so the kept elements of `y`
    /// (with noise fill, whose forward reads no scale, of `dx`) are NaN rather
    /// than wrongly scaled. An identity call reads no counts and checks none.
    pub fn finish_shard(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        counts: &impl DevicePtr<u64>,
    ) -> Result<()> {
        let _range = ranges::range("dropblock::finish_shard", || format!("{}", state.shape));
        self.check_call(stream, state)?;
        let call = state.call.ok_or(Error::NoForwardCall)?;
        let (sh, _) = call.shard.ok_or(Error::NotAShardCall)?;
        let entries = crate::ShardCounts::len_for_samples((sh.global_numel / sh.global_sample) as usize);
        if counts.len() != entries {
            return Err(Error::LengthMismatch { what: "shard counts", expected: entries, actual: counts.len() });
        }
        check_buffer("shard counts", stream, counts)?;
        // An identity call has no scales to compute.
        let Some((_, launch)) = call.masked else {
            return Ok(());
        };
        drop(state.enter(stream)?); // a `&mut` call: no other call can interleave
        let (cp, _guard) = counts.device_ptr(stream);
        launch::finish_shard(&mut self.queue(stream, state).with(Buffer::ShardCounts, cp), &sh, &launch)?;
        if let Some(Call { shard: Some((_, finished)), .. }) = state.call.as_mut() {
            *finished = true;
        }
        Ok(())
    }

    /// The raw seed words of every window of the call, in window order, computed
    /// by the device sampler: for checking it against [`Plan::sample_window`].
    /// A test hook (tests/gpu_parity.rs), not part of the API.
    #[doc(hidden)]
    pub fn sample_seeds(&self, stream: &Arc<CudaStream>, plan: &Plan) -> Result<Vec<u64>> {
        self.check_context("stream", stream.context())?;
        refuse_capture(stream)?;
        let mut out = stream.alloc_zeros::<u64>(plan.windows() as usize)?;
        {
            let (p, _guard) = out.device_ptr_mut(stream);
            let mut q = DeviceQueue { cuda: self, stream, ptrs: [None; Buffer::COUNT] }.with(Buffer::Seeds, p);
            launch::sample_seeds(&mut q, plan)?;
        }
        stream.clone_dtoh(&out).map_err(Error::from)
    }

    /// A forward's launches: sampling, and with `io` the scaled copy.
    #[allow(clippy::too_many_arguments)]
    fn launch_forward<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &mut DeviceState,
        cfg: &DropBlockConfig,
        shape: Shape,
        key: KeySource<'_>,
        mode: Mode,
        io: Option<Io>,
    ) -> Result<()> {
        let _range = match io {
            Some(_) => ranges::range("dropblock::forward", || format!("{} {shape} {mode:?}: {cfg}", T::DTYPE.name())),
            None => ranges::range("dropblock::sample", || format!("{shape} {mode:?}: {cfg}")),
        };
        self.check_call(stream, state)?;
        if state.shape != shape {
            return Err(Error::ShapeMismatch { expected: state.shape.to_string(), actual: shape.to_string() });
        }
        let identity = mode == Mode::Eval || cfg.is_identity();
        check_plannable(cfg, shape, identity)?;
        // The plan (reused while the config stays the same), then the key, before
        // the state or a generator is touched: a call refused for its config or
        // its key leaves the last call's state and enqueues nothing of its own
        // (as above for cudarc's guards on the caller's buffers).
        let planned = match &state.cached {
            _ if identity => None,
            Some((c, min_tiles, plan, launch)) if c == cfg && *min_tiles == self.min_tiles => Some((*plan, *launch)),
            _ => {
                let plan = Plan::new(cfg, shape, RngKey::PLACEHOLDER)?;
                let launch = self.launch_plan(cfg, shape)?;
                state.cached = Some((*cfg, self.min_tiles, plan, launch));
                Some((plan, launch))
            }
        };
        let key = self.check_key(stream, cfg, identity, key)?;
        let (host_key, generator) = self.resolve_key(stream, key)?;
        state.call = None;
        let Some((plan, launch)) = planned else {
            if let Some(io) = &io {
                copy::<T>(stream, shape, io)?;
            }
            state.call = Some(Call { masked: None, shard: None });
            return Ok(());
        };
        let plan = plan.with_key(host_key);
        let key_guard = generator.map(|gen| gen.key.device_ptr_mut(stream));
        drop(state.enter(stream)?); // a `&mut` call: no other call can interleave
        let mut q = self.queue(stream, state);
        if let Some(io) = &io {
            q = q.with(Buffer::X, io.x).with(Buffer::Y, io.y);
        }
        if let Some((p, _)) = &key_guard {
            q = q.with(Buffer::Generator, *p);
        }
        let aligned = io.as_ref().map(Io::aligned);
        launch::forward(&mut q, &plan, &launch, shape, T::DTYPE, aligned, key_guard.is_some())?;
        state.call = Some(Call { masked: Some((plan, launch)), shard: None });
        Ok(())
    }

    /// The scaled copy with the state's last call's factors.
    fn launch_saved<T: CudaElement>(
        &self,
        stream: &Arc<CudaStream>,
        state: &DeviceState,
        io: Io,
        pass: Pass,
    ) -> Result<()> {
        let name = match pass {
            Pass::Forward => "dropblock::apply",
            Pass::Backward => "dropblock::backward",
        };
        let _range = ranges::range(name, || format!("{} {}", T::DTYPE.name(), state.shape));
        self.check_call(stream, state)?;
        let call = state.call.ok_or(Error::NoForwardCall)?;
        if call.shard.is_some_and(|(_, finished)| !finished) {
            return Err(Error::ShardNotFinished);
        }
        match call.masked {
            None => copy::<T>(stream, state.shape, &io),
            Some((plan, launch)) => {
                let _ordered = state.enter(stream)?;
                let q = &mut self.queue(stream, state).with(Buffer::X, io.x).with(Buffer::Y, io.y);
                let shard = call.shard.map(|(sh, _)| sh);
                launch::element_pass(q, &plan, &launch, state.shape, shard, T::DTYPE, io.aligned(), pass)
            }
        }
    }

    /// The queue of a call on `state`: its own buffers, and those `with` adds.
    fn queue<'a>(&'a self, stream: &'a Arc<CudaStream>, state: &DeviceState) -> DeviceQueue<'a> {
        let p = state.ptrs;
        let mut ptrs = [None; Buffer::COUNT];
        ptrs[Buffer::KeepBits as usize] = Some(p.keep_bits);
        ptrs[Buffer::PlaneBits as usize] = Some(p.plane_bits);
        ptrs[Buffer::Counts as usize] = Some(p.counts);
        ptrs[Buffer::Scales as usize] = Some(p.scales);
        ptrs[Buffer::PlaneKept as usize] = p.plane_kept;
        DeviceQueue { cuda: self, stream, ptrs }
    }
}

/// A call's steps, enqueued on the caller's stream as they come.
struct DeviceQueue<'a> {
    cuda: &'a DropBlockCuda,
    stream: &'a Arc<CudaStream>,
    /// Each [`Buffer`]'s device pointer, where the call has one.
    ptrs: [Option<sys::CUdeviceptr>; Buffer::COUNT],
}

impl DeviceQueue<'_> {
    fn with(mut self, buffer: Buffer, ptr: sys::CUdeviceptr) -> Self {
        self.ptrs[buffer as usize] = Some(ptr);
        self
    }

    fn ptr(&self, buffer: Buffer) -> Result<&sys::CUdeviceptr> {
        self.ptrs[buffer as usize]
            .as_ref()
            .ok_or_else(|| Error::Driver(format!("internal: a launch reads {buffer:?}, which this call has not")))
    }
}

impl Queue for DeviceQueue<'_> {
    fn zero(&mut self, buffer: Buffer, bytes: u64) -> Result<()> {
        let p = *self.ptr(buffer)?;
        // A raw driver call: it runs in whatever context the thread has current,
        // where cudarc's own calls bind the stream's first.
        self.stream.context().bind_to_thread()?;
        // SAFETY: the sequences in launch.rs zero at most what the buffer holds for
        // the call's shape (a bit per element, N + 2 counters, a counter per slice,
        // 1 + 3 · the global N shard counts: checked by the callers).
        unsafe { result::memset_d8_async(p, 0, bytes as usize, self.stream.cu_stream()) }?;
        Ok(())
    }

    fn launch(&mut self, kernel: KernelKey, blocks: u64, args: &[Arg<'_>]) -> Result<()> {
        /// The argument of a null pointer.
        const NULL: sys::CUdeviceptr = 0;
        let k = self.cuda.kernel(kernel.0, kernel.1)?;
        let mut b = self.stream.launch_builder(&k.function);
        for arg in args {
            match arg {
                Arg::Geometry(v) => b.arg(*v),
                Arg::Tiles(v) => b.arg(*v),
                Arg::Sampling(v) => b.arg(*v),
                Arg::Apply(v) => b.arg(*v),
                Arg::Shard(v) => b.arg(*v),
                Arg::U32(v) => b.arg(v),
                Arg::Ptr(buffer) => b.arg(self.ptr(*buffer)?),
                Arg::Null => b.arg(&NULL),
            };
        }
        // SAFETY: each sequence in launch.rs passes its kernel's parameters in order,
        // which the kernel emulation checks against the kernels' C++ signatures
        // (tests/kernel_emulation.rs), and buffers that hold what the kernel reads
        // and writes for the call's shape (checked by the callers).
        unsafe { b.launch(self.cuda.launch_config(k, blocks)) }?;
        Ok(())
    }
}

/// `y = x` for an identity call (nothing to do in place).
fn copy<T: CudaElement>(stream: &Arc<CudaStream>, shape: Shape, io: &Io) -> Result<()> {
    if io.x != io.y {
        let bytes = shape.numel() * std::mem::size_of::<T>();
        stream.context().bind_to_thread()?;
        // SAFETY: both pointers hold `numel` elements (checked by the callers).
        unsafe { result::memcpy_dtod_async(io.y, io.x, bytes, stream.cu_stream()) }?;
    }
    Ok(())
}

impl DeviceState {
    /// The shape the state was made for; every call on it must have this shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Orders this call after the state's last one: a call on another stream
    /// waits for that stream's work so far ([`StreamOrder::enter`]).
    fn enter(&self, stream: &Arc<CudaStream>) -> Result<MutexGuard<'_, Option<Arc<CudaStream>>>> {
        self.order.enter(stream)
    }

    /// Allocates a shard call's per-plane counts on the state's own stream (whose
    /// frees wait for the state's last stream: Drop), ordered before `stream`'s
    /// next work. Refused while either stream is being captured: a replay would
    /// find the graph's allocation still live and fail to launch.
    fn alloc_plane_kept(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let own = self.keep_bits.stream().clone();
        refuse_capture(stream)?;
        if own.cu_stream() != stream.cu_stream() {
            refuse_capture(&own)?;
        }
        let plane_kept = own.alloc_zeros::<u64>(self.shape.n() * self.shape.c())?;
        self.ptrs.plane_kept = Some(plane_kept.device_ptr(&own).0);
        self.plane_kept = Some(plane_kept);
        if own.cu_stream() != stream.cu_stream() {
            stream.join(&own)?;
        }
        Ok(())
    }

    /// The stream the state's buffers were last used on: read [`Self::keep_bits`]
    /// there, or after synchronising it.
    pub fn last_stream(&self) -> Option<Arc<CudaStream>> {
        self.order.last()
    }

    /// The plan of the last forward call; `None` before any call or after an
    /// identity call. After a call that drew from a [`DeviceGenerator`] its key
    /// fields are placeholders: the generator held the key. After
    /// [`DropBlockCuda::sample_shard`] it is the global call's plan, whose planes
    /// are not the ones [`Self::keep_bits`] holds (the shard's own).
    pub fn plan(&self) -> Option<&Plan> {
        self.call.as_ref().and_then(|c| c.masked.as_ref()).map(|(plan, _)| plan)
    }

    /// The keep bits on the device: bit `i % 32` of word `i / 32` is set when bit
    /// `i` is kept. Channels-first they are dense over the mask planes,
    /// `i = plane · L + cell` (`L` the cells of a slice; after a shard call, the
    /// shard's planes, numbered as for a tensor of its own N and C, and its box's
    /// cells); channels-last they are in the tensor's own order, `i` the element's
    /// index. Written by kernels on [`Self::last_stream`],
    /// outside cudarc's event tracking: read them on that stream (or after an
    /// event recorded there), and before the state's next call, which overwrites
    /// them without waiting for other streams' reads.
    pub fn keep_bits(&self) -> &CudaSlice<u32> {
        &self.keep_bits
    }

    /// The keep bits of the used planes, copied to the host (synchronises), with
    /// the geometry of the planes they hold.
    fn host_bits(&self, stream: &Arc<CudaStream>) -> Result<Option<(abi::DropBlockGeometry, Vec<u32>)>> {
        let call = self.call.ok_or(Error::NoForwardCall)?;
        let Some((_, launch)) = call.masked else {
            return Ok(None);
        };
        let g = launch.geometry;
        let _ordered = self.enter(stream)?;
        let used = if self.flat_bits(&g) { self.shape.numel() } else { g.planes as usize * self.shape.plane_len() };
        let bits = stream.clone_dtoh(&self.keep_bits.slice(..used.div_ceil(32)))?;
        Ok(Some((g, bits)))
    }

    /// Whether the keep bits are one per element in the tensor's order.
    fn flat_bits(&self, g: &abi::DropBlockGeometry) -> bool {
        g.sharing == abi::DROPBLOCK_SHARE_NONE || self.shape.layout() == Layout::ChannelsLast
    }

    /// Kept elements over the tensor (after a shard call, the shard's own
    /// elements), counted from the keep bits (synchronises the stream; no mask the
    /// size of the tensor is made).
    pub fn kept(&self, stream: &Arc<CudaStream>) -> Result<u64> {
        let s = self.shape;
        let Some((g, bits)) = self.host_bits(stream)? else {
            return Ok(s.numel() as u64);
        };
        if self.flat_bits(&g) {
            return Ok(bits.iter().map(|w| w.count_ones() as u64).sum());
        }
        // With sharing there are at most max(N, C) planes, each read by several slices.
        let l = s.plane_len();
        let count = |lo: usize, hi: usize| (lo..hi).filter(|&b| bits[b / 32] >> (b % 32) & 1 == 1).count() as u64;
        let per_plane: Vec<u64> = (0..g.planes as usize).map(|p| count(p * l, (p + 1) * l)).collect();
        Ok((0..s.n() * s.c()).map(|i| per_plane[plane_of(g.sharing, g.c as usize, i / s.c(), i % s.c())]).sum())
    }

    /// The keep mask as u8 in the tensor's memory order, 1 where kept
    /// (synchronises the stream).
    pub fn keep_mask(&self, stream: &Arc<CudaStream>) -> Result<Vec<u8>> {
        let s = self.shape;
        let Some((g, bits)) = self.host_bits(stream)? else {
            return host_vec(s.numel(), |_| 1);
        };
        if self.flat_bits(&g) {
            return host_vec(s.numel(), |e| (bits[e / 32] >> (e % 32) & 1) as u8);
        }
        let l = s.plane_len();
        let mut out = host_vec(s.numel(), |_| 0u8)?;
        for (i, slice) in out.chunks_mut(l).enumerate() {
            let base = plane_of(g.sharing, g.c as usize, i / s.c(), i % s.c()) * l;
            for (cell, v) in slice.iter_mut().enumerate() {
                let b = base + cell;
                *v = (bits[b / 32] >> (b % 32) & 1) as u8;
            }
        }
        Ok(out)
    }

    /// The scale(s) the last forward applied: one, or one per sample under
    /// PerSample normalisation; `[1.0]` after an identity call (eval mode or
    /// `drop_prob == 0`). Synchronises the stream.
    pub fn scales(&self, stream: &Arc<CudaStream>) -> Result<Vec<f32>> {
        let call = self.call.ok_or(Error::NoForwardCall)?;
        if call.shard.is_some_and(|(_, finished)| !finished) {
            return Err(Error::ShardNotFinished);
        }
        let Some((_, launch)) = call.masked else {
            return Ok(vec![1.0]);
        };
        let _ordered = self.enter(stream)?;
        let n = if launch.apply.normalize == abi::DROPBLOCK_NORM_PER_SAMPLE { self.shape.n() } else { 1 };
        stream.clone_dtoh(&self.scales.slice(..n)).map_err(Error::from)
    }

    /// The counters, which every call leaves zeroed for the next (synchronises).
    #[doc(hidden)]
    pub fn counters(&self, stream: &Arc<CudaStream>) -> Result<Vec<u64>> {
        let _ordered = self.enter(stream)?;
        stream.clone_dtoh(&self.counts).map_err(Error::from)
    }
}

impl Drop for DeviceState {
    /// The buffers are freed on the stream they were allocated on, after the work
    /// of the stream they were last used on.
    fn drop(&mut self) {
        self.order.release(self.keep_bits.stream());
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
        let mut names = super::super::kernel_names();
        names.sort();
        assert_eq!(built, names);
    }
}
