//! The embedded fatbin, and the safe way to a CUDA context and the kernels' module.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;

use super::driver::{driver_present, driver_version};
use crate::error::{Error, Result};

#[cfg(dropblock_kernels)]
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dropblock.fatbin"));
#[cfg(not(dropblock_kernels))]
const FATBIN: &[u8] = &[];

#[cfg(dropblock_kernels)]
const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas_report.txt"));
#[cfg(not(dropblock_kernels))]
const PTXAS_REPORT: &str = "";

/// The kernels' fatbin as embedded at build time (SASS per arch plus PTX for the
/// newest). Empty only in a docs.rs build.
pub fn fatbin() -> &'static [u8] {
    FATBIN
}

/// The archs the fatbin holds SASS for (the newest also as PTX).
pub fn built_archs() -> Vec<u32> {
    #[cfg(dropblock_kernels)]
    let list = env!("DROPBLOCK_CUDA_ARCHS_BUILT");
    #[cfg(not(dropblock_kernels))]
    let list = "";
    list.split(',').filter_map(|a| a.parse().ok()).collect()
}

/// ptxas's resource report from the build: registers, shared memory, stack and
/// spills, per kernel and per arch.
pub fn ptxas_report() -> &'static str {
    PTXAS_REPORT
}

/// A context on device `ordinal`, or a typed error: [`Error::NoDriver`] when
/// libcuda cannot be loaded, [`Error::NoDevice`] when there is no such device,
/// [`Error::KernelsNotBuilt`] in a build without kernels. Never panics: cudarc
/// panics when libcuda is missing, so that is probed first.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if FATBIN.is_empty() {
        return Err(Error::KernelsNotBuilt);
    }
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    CudaContext::new(ordinal).map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE
        | sys::CUresult::CUDA_ERROR_INVALID_DEVICE
        | sys::CUresult::CUDA_ERROR_STUB_LIBRARY
        | sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => Error::NoDevice(e.to_string()),
        _ => Error::from(e),
    })
}

/// Loads the kernels' module on `ctx`: [`Error::UnsupportedDevice`] where the
/// fatbin has no code for the device or the driver is too old for it.
pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Arc<CudaModule>> {
    if FATBIN.is_empty() {
        return Err(Error::KernelsNotBuilt);
    }
    ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
        | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | sys::CUresult::CUDA_ERROR_INVALID_PTX
        | sys::CUresult::CUDA_ERROR_INVALID_IMAGE => Error::UnsupportedDevice(unsupported(ctx, &e)),
        _ => Error::from(e),
    })
}

/// What a user needs to rebuild for a device the kernels do not load on.
fn unsupported(ctx: &CudaContext, e: &cudarc::driver::DriverError) -> String {
    let arch =
        ctx.compute_capability().map_or_else(|_| "an unknown architecture".into(), |(a, b)| format!("sm_{a}{b}"));
    let driver = match driver_version() {
        Some(version) => format!("CUDA {}.{}", version / 1000, version % 1000 / 10),
        None => "unknown".into(),
    };
    let built: Vec<String> = built_archs().iter().map(|a| format!("sm_{a}")).collect();
    #[cfg(dropblock_kernels)]
    let nvcc = env!("DROPBLOCK_NVCC");
    #[cfg(not(dropblock_kernels))]
    let nvcc = "no nvcc";
    format!(
        "{e}; the device is {arch} and its driver supports {driver}; the kernels hold {} and PTX for the newest, \
         built by {nvcc}. Rebuild with DROPBLOCK_CUDA_ARCHS naming this architecture, or with a CUDA toolkit no newer \
         than the driver (NVCC, CUDA_HOME or nvcc on PATH)",
        built.join(", ")
    )
}
