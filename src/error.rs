//! The crate's one error type. Every bad input and every missing piece of the CUDA
//! stack maps to a variant that says what is wrong; nothing panics.

/// Everything that can go wrong in `dropblock`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("block {axis} must be at least 1, got {value}")]
    InvalidBlock { axis: &'static str, value: u32 },

    #[error("drop_prob must be a number in [0, 1], got {0}")]
    InvalidDropProb(f64),

    #[error("gamma_scale must be finite and non-negative, got {0}")]
    InvalidGammaScale(f64),

    #[error("keep_prob must be a number in [0, 1], got {0}")]
    InvalidKeepProb(f64),

    #[error("ResNet group must be 1, 2, 3 or 4, got {0}")]
    InvalidGroup(u32),

    #[error("dimension {dim} is zero; every dimension of N,C,H,W must be at least 1")]
    ZeroDimension { dim: &'static str },

    #[error("dimension {dim} = {value} exceeds the supported maximum {max}")]
    DimensionTooLarge { dim: &'static str, value: u64, max: u64 },

    #[error("element count of shape {n}x{c}x{h}x{w} overflows")]
    ElementCountOverflow { n: u64, c: u64, h: u64, w: u64 },

    #[error("{what} holds {actual} elements but the shape needs {expected}")]
    LengthMismatch { what: &'static str, expected: usize, actual: usize },

    #[error("saved state was made for shape {expected:?}, not {actual:?}")]
    ShapeMismatch { expected: [usize; 4], actual: [usize; 4] },

    #[error("offset {offset} too large: a call reads 16 counter blocks past it, so it must be at most {max}")]
    OffsetOverflow { offset: u64, max: u64 },

    #[error("backward called on a state that holds no forward call")]
    NoForwardCall,

    #[error("{what} is {value}, out of range 0..{len}")]
    OutOfRange { what: &'static str, value: u64, len: u64 },

    #[error("a window holds 1 to 64 cells, not {0}")]
    InvalidWindowLength(u32),

    #[error("could not allocate {bytes} bytes of host memory for the masks")]
    HostAllocation { bytes: u64 },

    #[error("the stream belongs to another CUDA context than the kernels")]
    WrongContext,

    #[error("the CUDA driver library (libcuda) could not be found")]
    NoDriver,

    #[error("no CUDA device: {0}")]
    NoDevice(String),

    #[error("this build of dropblock has no CUDA kernels (built without the `cuda` feature)")]
    KernelsNotBuilt,

    #[error("CUDA driver error: {0}")]
    Driver(String),
}

impl Error {
    /// Whether the CUDA path cannot run here at all: no driver, no device, or a
    /// build without kernels. Any other error from setting up the CUDA path (a
    /// module that does not load, a missing kernel) is a failure, never a reason
    /// to fall back to the CPU or to skip a GPU test.
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, Error::NoDriver | Error::NoDevice(_) | Error::KernelsNotBuilt)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// cudarc's driver errors, for `?` on cudarc calls next to this crate's.
#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        // Formatting a DriverError calls into libcuda, which is loaded whenever a
        // DriverError exists.
        Error::Driver(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    /// A CUDA stack that is there but broken is not "no GPU": falling back to the
    /// CPU or skipping on it would hide the failure.
    #[test]
    fn only_a_missing_driver_device_or_build_is_no_gpu() {
        for e in [Error::NoDriver, Error::NoDevice("none".into()), Error::KernelsNotBuilt] {
            assert!(e.is_no_gpu(), "{e}");
        }
        for e in [Error::Driver("CUDA_ERROR_INVALID_IMAGE".into()), Error::WrongContext, Error::NoForwardCall] {
            assert!(!e.is_no_gpu(), "{e}");
        }
    }
}
