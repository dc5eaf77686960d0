//! The CUDA path: the same semantics as [`crate::cpu`], bit for bit, on the
//! caller's stream.
//!
//! - cudarc types in and out: inputs are anything that is [`DevicePtr`] (a
//!   `CudaSlice` or a view), outputs anything [`DevicePtrMut`].
//! - Every launch goes on the stream you pass, and the calls that launch never
//!   synchronise with the host, so a forward can be captured into a CUDA graph.
//!   What does synchronise says so: reading statistics back
//!   ([`DeviceState::kept`], [`DeviceState::keep_mask`], [`DeviceGenerator::key`],
//!   ...). Freeing may too: [`DropBlockCuda::forward`] makes a state at every
//!   call, whose free waits for the device where the context has no
//!   stream-ordered allocator (reuse one with [`DropBlockCuda::forward_into`]).
//!   Six caveats for graphs:
//!   - nothing allocates into a graph: allocate states and generators before
//!     capturing, capture `forward_into` rather than `forward`, and make a shard's
//!     state with [`DropBlockCuda::alloc_shard_state`] (each of these refuses a
//!     capturing stream, `Error::AllocationInCapture`);
//!   - capture on the stream a state and a generator were last used on (made on,
//!     or given one uncaptured call): a call on another stream waits for that
//!     one, and a capture cannot wait on work outside it (refused,
//!     `Error::CaptureAcrossStreams`);
//!   - a [`RngKey`](crate::RngKey) is a kernel parameter, so every replay of a
//!     captured graph draws the same mask; draw from a [`DeviceGenerator`]
//!     instead, which steps its offset on the device at every forward or shard
//!     call;
//!   - everything else a call reads is a kernel parameter too: the config (so a
//!     drop-rate schedule needs the graph captured again when the rate changes),
//!     the shape, and the raw pointers of the state, the generator and the
//!     tensors, which must stay allocated for as long as the graph can be
//!     launched (dropping them while it can is a use after free that nothing
//!     detects);
//!   - a state records its last call on the host, when the call is made or
//!     captured, not when a graph replays it: [`DropBlockCuda::apply`] and
//!     [`DropBlockCuda::backward`] follow that record. Capture a forward and its
//!     backward together, or make no other call on that state between a replay
//!     and its eager backward (an eval forward there would make the backward a
//!     copy). So does its record of the last call's stream: a graph replays on
//!     the stream it is launched on, and a call after a replay on another
//!     stream must first wait for that one (an event), as the state cannot;
//!   - cudarc's per-buffer event tracking makes a capturing stream wait on events
//!     recorded outside the capture; turn it off first, as candle does
//!     (`unsafe { ctx.disable_event_tracking() }`: you then order work on buffers
//!     shared between streams yourself). It is a setting of the `CudaContext`
//!     handle, shared by every holder of that `Arc`: turning it off on a
//!     framework's handle (given to [`DropBlockCuda::from_context`]) turns it off
//!     for the framework too. [`DropBlockCuda::new`] makes a handle of its own.
//! - The saved state for backward ([`DeviceState`]: keep bits, counts, scales) is
//!   yours: allocate it once with [`DropBlockCuda::alloc_state`] and reuse it, or
//!   let [`DropBlockCuda::forward`] allocate it. The kernels reach its buffers
//!   without cudarc's events; the state orders its own calls instead (a call on
//!   another stream than the last one first waits for that stream's work; so does
//!   a [`DeviceGenerator`]'s), and
//!   the kernels leave its counters zeroed for the next call. A forward is one
//!   launch where it can be (Expected / None normalisation, no sharing,
//!   channels-first, zero fill, planes that fit a tile and enough tiles for the
//!   device), two on the tiled path, and up to four on the grid-wide path or with
//!   channels-last's transpose.
//! - A forward can be split: [`DropBlockCuda::sample_into`] draws the mask and the
//!   scales from the key alone, [`DropBlockCuda::apply`] applies them once x is
//!   ready, with the same result bit for bit.
//! - A tensor split across devices: [`DropBlockCuda::sample_shard`] draws one
//!   shard's box of the unsharded mask and its kept counts, which the shards sum on
//!   the device (`nccl::all_reduce_counts` with the `nccl` feature), then
//!   [`DropBlockCuda::finish_shard`] computes the scales from the sum, with no host
//!   sync ([`crate::shard`]).
//! - Statistics (kept count, scales, the keep mask) are read only when you ask.
//! - With the `nvtx` feature each call is an NVTX range in the `dropblock` domain
//!   (`dropblock::forward`, `dropblock::sample`, `dropblock::apply`,
//!   `dropblock::backward`, `dropblock::sample_shard`, `dropblock::finish_shard`),
//!   its message naming the dtype, shape or config, so an
//!   Nsight Systems timeline groups a call's memset and launches under it.
//!
//! [`DevicePtr`]: cudarc::driver::DevicePtr
//! [`DevicePtrMut`]: cudarc::driver::DevicePtrMut

mod driver;
#[doc(hidden)]
pub use driver::{capture_id_v2, capture_id_v3, elapsed_ms_v1};
#[doc(hidden)]
pub mod launch;
mod module;
#[cfg(feature = "nccl")]
pub mod nccl;
mod ops;
mod ranges;

pub use driver::{driver_present, elapsed_ms};
#[doc(hidden)]
pub use launch::{kernel_names, launch_plan, tiles_of, tiles_with, CallPlan, LaunchPath};
pub use module::{built_archs, context, fatbin, ptxas_report};
pub use ops::{CudaElement, DeviceGenerator, DeviceState, DropBlockCuda, KeySource};
