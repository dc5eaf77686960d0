//! Timing forward, backward or the sampling on the CUDA path, one call at a time, by CUDA
//! events on the launch stream. Shared by `dropblock bench` and the criterion
//! benchmarks (`benches/dropblock.rs` includes this file), so both measure the
//! same thing.
//!
//! By default a call is timed on a busy stream, as in training, where the device
//! runs ahead of the host: zeroing [`FLUSH_BYTES`] goes first, so the call's
//! tensors (and a backward's dy, which its untimed forward just wrote) start out
//! of L2, and the host enqueues the call while the memset runs (about 70 µs on an
//! H200, against a forward's 10–14 µs of host work), so the start event fires with
//! the call already queued. The time is then the device's, but for writing back
//! the memset's dirty lines that L2 still holds. This is how
//! `scripts/bench/gpu_peers.py` times the copy and the peers (zeroing a torch
//! buffer). Timed from an idle stream instead (`from_idle`, the method of earlier
//! builds), a forward's or a sampling's host enqueueing counts too (a backward's
//! is hidden behind its untimed forward), and a backward reads dy from L2 where
//! the shape fits.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::{CudaSlice, CudaStream};
use dropblock::cuda::{CudaElement, DeviceState, DropBlockCuda};
use dropblock::{DropBlockConfig, Mode, Result, RngKey, Shape};

/// The calls rotate over copies of x, y and the state holding at least this many
/// bytes of x and y in all (ten times an H100's 50 MB L2), so each call starts
/// with its tensors out of L2, as in training.
const ROTATED_BYTES: usize = 512 << 20;
/// The copies are capped: below 2 MiB per call (512 MiB / 256) a call is bound by
/// launch latency, and where its tensors sit no longer moves its time.
const MAX_COPIES: usize = 256;
/// The memset before each timed call: five times an H100's 50 MB L2, as
/// gpu_peers.py's flush.
pub const FLUSH_BYTES: usize = 256 << 20;

pub struct CudaTimer<T: CudaElement> {
    stream: Arc<CudaStream>,
    shape: Shape,
    xs: Vec<CudaSlice<T>>,
    ys: Vec<CudaSlice<T>>,
    states: Vec<DeviceState>,
    next: usize,
    /// The busy-stream timing's memset target; `None` when timed from idle.
    flush: Option<CudaSlice<u8>>,
}

impl<T: CudaElement> CudaTimer<T> {
    /// Copies of `x` (of `shape`) and states on a new stream of `d`'s context; with
    /// no `x`, states alone, for timing [`Pass::Sampling`] only (no tensors, so a
    /// shape whose sampling fits the device is timed even where x and y would not).
    /// `from_idle`: each call timed from an idle stream (module docs).
    pub fn new(d: &DropBlockCuda, shape: Shape, x: Option<&[T]>, from_idle: bool) -> Result<Self> {
        let stream = d.context().new_stream()?;
        // What a call streams: x and y, or the keep bits alone.
        let bytes = match x {
            Some(_) => 2 * shape.numel() * std::mem::size_of::<T>(),
            None => shape.numel().div_ceil(8),
        };
        let copies = ROTATED_BYTES.div_ceil(bytes.max(1)).clamp(1, MAX_COPIES);
        let flush = match from_idle {
            true => None,
            false => Some(stream.alloc_zeros::<u8>(FLUSH_BYTES)?),
        };
        let mut t = Self { stream, shape, xs: Vec::new(), ys: Vec::new(), states: Vec::new(), next: 0, flush };
        for _ in 0..copies {
            if let Some(x) = x {
                t.xs.push(t.stream.clone_htod(x)?);
                t.ys.push(t.stream.alloc_zeros::<T>(shape.numel())?);
            }
            t.states.push(d.alloc_state(&t.stream, shape)?);
        }
        Ok(t)
    }

    /// The time in ms of one call of `pass` with `key` (a backward after an
    /// untimed forward with `key`).
    pub fn time(&mut self, d: &DropBlockCuda, cfg: &DropBlockConfig, key: RngKey, pass: Pass) -> Result<f64> {
        let k = self.next;
        self.next = (k + 1) % self.states.len();
        assert!(pass == Pass::Sampling || !self.xs.is_empty(), "a timer made without x times only Pass::Sampling");
        let (s, shape, state) = (&self.stream, self.shape, &mut self.states[k]);
        if pass == Pass::Backward {
            d.forward_into(s, state, cfg, shape, key, Mode::Train, &self.xs[k], &mut self.ys[k])?;
        }
        if let Some(flush) = &mut self.flush {
            s.memset_zeros(flush)?;
        }
        let start = s.record_event(Some(CU_EVENT_DEFAULT))?;
        match pass {
            Pass::Forward => d.forward_into(s, state, cfg, shape, key, Mode::Train, &self.xs[k], &mut self.ys[k])?,
            // dx overwrites dy = y in place: the values do not matter for timing.
            Pass::Backward => d.backward_inplace(s, state, &mut self.ys[k])?,
            Pass::Sampling => d.sample_into(s, state, cfg, shape, key, Mode::Train)?,
        }
        let end = s.record_event(Some(CU_EVENT_DEFAULT))?;
        Ok(dropblock::cuda::elapsed_ms(&start, &end)? as f64)
    }
}

/// What one timed call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
    /// The forward's first half (`sample_into`): keep bits and scales from the key.
    Sampling,
}
