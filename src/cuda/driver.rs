//! What the crate asks of the CUDA driver beyond cudarc's safe API: whether libcuda
//! loads, its version, and the older entry points of the calls that cudarc's CUDA 13
//! bindings (the crate's, so every user's) name only in a form older drivers lack.
//! cudarc loads each symbol on first use and panics when the driver has none, so a
//! call whose newest form is newer than the driver goes through its older form
//! here: the capture ID (`cuStreamGetCaptureInfo_v3`, CUDA 12.3, or `_v2`, 11.3)
//! and event timing (`cuEventElapsedTime_v2`, 12.8, or the first version).

use std::sync::OnceLock;

use cudarc::driver::{sys, CudaEvent, CudaStream, DriverError};

use crate::error::{Error, Result};

/// The driver library's file names, most specific first.
const LIBCUDA: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };

/// Whether the CUDA driver library (libcuda, or nvcuda on Windows) can be loaded.
///
/// Probed here rather than with cudarc's `is_culib_present`, which exists only when
/// cudarc loads libcuda at run time; a crate that makes it link libcuda instead
/// (candle's `cuda` feature) removes it. A binary linked that way does not start
/// without libcuda, so there the answer is always yes.
pub fn driver_present() -> bool {
    libcuda().is_some()
}

/// libcuda, loaded once and kept for the process (its handle only adds to the
/// count cudarc's own holds).
fn libcuda() -> Option<&'static libloading::Library> {
    static LIB: OnceLock<Option<libloading::Library>> = OnceLock::new();
    // SAFETY: loading the driver library runs only its initialisers, as cudarc's
    // own first use does; no CUDA call is made.
    LIB.get_or_init(|| LIBCUDA.iter().find_map(|&name| unsafe { libloading::Library::new(name) }.ok())).as_ref()
}

/// The CUDA version the loaded driver supports, as `cuDriverGetVersion` gives it
/// (13000 for 13.0), asked once; `None` if it cannot say or libcuda does not load.
pub(crate) fn driver_version() -> Option<i32> {
    static VERSION: OnceLock<Option<i32>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        // cudarc panics on a missing libcuda.
        driver_present().then_some(())?;
        let mut version = 0;
        // SAFETY: writes one int; needs no context.
        (unsafe { sys::cuDriverGetVersion(&mut version) } == sys::CUresult::CUDA_SUCCESS).then_some(version)
    })
}

/// The first driver with `cuEventElapsedTime_v2` (CUDA 12.8).
const ELAPSED_V2_DRIVER: i32 = 12080;
/// The first driver with `cuStreamGetCaptureInfo_v3` (CUDA 12.3).
const CAPTURE_INFO_V3_DRIVER: i32 = 12030;

type EventElapsedTime = unsafe extern "C" fn(*mut f32, sys::CUevent, sys::CUevent) -> sys::CUresult;
type StreamGetCaptureInfoV2 = unsafe extern "C" fn(
    sys::CUstream,
    *mut sys::CUstreamCaptureStatus,
    *mut u64,
    *mut sys::CUgraph,
    *mut *const sys::CUgraphNode,
    *mut usize,
) -> sys::CUresult;

/// libcuda's exported `name` as a function of type `F`, looked up once into
/// `cache`, or a typed error naming it.
///
/// # Safety
/// `F` must be the C signature of `name`.
unsafe fn entry<F: Copy + Send + Sync>(cache: &'static OnceLock<Option<F>>, name: &str) -> Result<F> {
    // SAFETY: the caller's; the library stays loaded for the process.
    let found =
        cache.get_or_init(|| libcuda().and_then(|lib| unsafe { lib.get::<F>(name.as_bytes()) }.ok().map(|f| *f)));
    found.ok_or_else(|| Error::Driver(format!("the CUDA driver library has no {name}")))
}

/// Milliseconds between two recorded events of one context, as cudarc's
/// [`CudaEvent::elapsed_ms`] (waiting for both), on any driver: that method calls
/// `cuEventElapsedTime_v2`, which drivers older than CUDA 12.8 lack, where cudarc
/// panics; there the first version's entry point, which every driver keeps, is
/// called instead.
pub fn elapsed_ms(start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
    match driver_version().is_some_and(|v| v >= ELAPSED_V2_DRIVER) {
        true => Ok(start.elapsed_ms(end)?),
        false => elapsed_ms_v1(start, end),
    }
}

/// [`elapsed_ms`] through `cuEventElapsedTime` (the first version) on any driver:
/// for the test that holds it to cudarc's form on a driver that has both.
#[doc(hidden)]
pub fn elapsed_ms_v1(start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
    static ELAPSED: OnceLock<Option<EventElapsedTime>> = OnceLock::new();
    // SAFETY: the signature of cuEventElapsedTime in every CUDA header that has it.
    let elapsed = unsafe { entry(&ELAPSED, "cuEventElapsedTime") }?;
    if start.context() != end.context() {
        return Err(DriverError(sys::CUresult::CUDA_ERROR_INVALID_CONTEXT).into());
    }
    start.context().bind_to_thread()?;
    start.synchronize()?;
    end.synchronize()?;
    let mut ms = 0f32;
    // SAFETY: two live events of the bound context, both complete; writes one float.
    unsafe { elapsed(&mut ms, start.cu_event(), end.cu_event()) }.result()?;
    Ok(ms)
}

/// The ID of the capture `stream` is in, `None` when it is in no active capture of
/// its own (one invalidated, the legacy stream's implicit one, or none any more:
/// another thread may have ended it since the caller asked whether it captures):
/// unique per capture in the process, shared by the streams forked into it. `None`
/// too under a driver older than CUDA 11.3, which has no such query.
pub(crate) fn capture_id(stream: &CudaStream) -> Result<Option<u64>> {
    match driver_version() {
        Some(v) if v >= CAPTURE_INFO_V3_DRIVER => capture_id_v3(stream),
        _ => capture_id_v2(stream),
    }
}

/// [`capture_id`] through `cuStreamGetCaptureInfo_v3` (CUDA 12.3 on; cudarc's).
#[doc(hidden)]
pub fn capture_id_v3(stream: &CudaStream) -> Result<Option<u64>> {
    use std::ptr::null_mut as null;
    // SAFETY: a live stream; the optional outputs (graph, dependencies, edges) are null.
    capture_query(stream, |s, status, id| unsafe {
        sys::cuStreamGetCaptureInfo_v3(s, status, id, null(), null(), null(), null())
    })
}

/// [`capture_id`] through `cuStreamGetCaptureInfo_v2` (CUDA 11.3 on, loaded from
/// libcuda: cudarc's CUDA 13 bindings name only `_v3`), `None` where the driver
/// lacks it: for drivers before 12.3, and for the test that holds it to `_v3`.
#[doc(hidden)]
pub fn capture_id_v2(stream: &CudaStream) -> Result<Option<u64>> {
    static INFO: OnceLock<Option<StreamGetCaptureInfoV2>> = OnceLock::new();
    // SAFETY: the signature of cuStreamGetCaptureInfo_v2 in CUDA 11.3 to 12.x.
    let Ok(info) = (unsafe { entry(&INFO, "cuStreamGetCaptureInfo_v2") }) else {
        return Ok(None);
    };
    use std::ptr::null_mut as null;
    // SAFETY: a live stream; the optional outputs (graph, dependencies) are null.
    capture_query(stream, |s, status, id| unsafe { info(s, status, id, null(), null(), null()) })
}

/// The capture ID that `query` (one form of `cuStreamGetCaptureInfo`, given the
/// stream and where to write its status and ID) returns for `stream`, if it is in
/// an active capture.
fn capture_query(
    stream: &CudaStream,
    query: impl FnOnce(sys::CUstream, *mut sys::CUstreamCaptureStatus, *mut u64) -> sys::CUresult,
) -> Result<Option<u64>> {
    stream.context().bind_to_thread()?;
    let (mut status, mut id) = (sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE, 0u64);
    match query(stream.cu_stream(), &mut status, &mut id) {
        sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => Ok(None),
        r => {
            r.result()?;
            Ok((status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE).then_some(id))
        }
    }
}
