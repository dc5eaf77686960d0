//! The crate's one error type. Every bad input and every missing piece of the CUDA
//! stack maps to a variant that says what is wrong; nothing panics.

/// Everything that can go wrong in `dropblock`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A block size is 0.
    #[error("block {axis} must be at least 1, got {value}")]
    InvalidBlock {
        /// The axis: `"depth"`, `"height"`, `"width"`, or `"size"` for a uniform block.
        axis: &'static str,
        /// The value given.
        value: u32,
    },

    /// A tensor or a block has a spatial rank other than 1, 2 or 3.
    #[error(
        "{what} has spatial rank {rank}; DropBlock takes 1, 2 or 3 spatial dimensions (N,C,L / N,C,H,W / N,C,D,H,W)"
    )]
    InvalidRank {
        /// `"tensor"` or `"block"`.
        what: &'static str,
        /// The spatial rank given (dimensions past N and C for a tensor).
        rank: usize,
    },

    /// A block of one spatial rank was used on a tensor of another.
    #[error("a {block}D block does not fit a tensor of spatial rank {shape}; give {shape} block sizes, or one size for every axis")]
    BlockRankMismatch {
        /// The block's rank.
        block: usize,
        /// The tensor's spatial rank.
        shape: usize,
    },

    /// `drop_prob` is NaN or outside `[0, 1]`; holds the value given.
    #[error("drop_prob must be a number in [0, 1], got {0}")]
    InvalidDropProb(f64),

    /// Noise fill was asked for with a normalisation that rescales; holds its name.
    #[error("noise fill keeps kept units unscaled (as timm's with_noise): use normalize `none`, not `{0}`")]
    NoiseWithRescale(&'static str),

    /// Noise fill was asked of a call that draws its key from a device generator:
    /// the fill pass needs the key on the host.
    #[error("noise fill needs a host key (RngKey), not a DeviceGenerator")]
    NoiseNeedsHostKey,

    /// `gamma_scale` is negative, NaN or infinite; holds the value given.
    #[error("gamma_scale must be finite and non-negative, got {0}")]
    InvalidGammaScale(f64),

    /// A keep probability (of a schedule or a TPU group rate) is NaN or outside
    /// `[0, 1]`; holds the value given.
    #[error("keep_prob must be a number in [0, 1], got {0}")]
    InvalidKeepProb(f64),

    /// A schedule of no steps was asked for (`numpy.linspace` with `num = 0` has no
    /// value to hold).
    #[error("a schedule needs at least one step")]
    EmptySchedule,

    /// A ResNet group outside 1..=4 was passed to
    /// [`tpu_group_keep_prob`](crate::tpu_group_keep_prob); holds the group given.
    #[error("ResNet group must be 1, 2, 3 or 4, got {0}")]
    InvalidGroup(u32),

    /// A dimension of a shape is 0.
    #[error("dimension {dim} is zero; every dimension must be at least 1")]
    ZeroDimension {
        /// The dimension: `"N"`, `"C"`, `"D"`, `"H"`, `"W"` or `"L"`.
        dim: &'static str,
    },

    /// A dimension of a shape does not fit the kernels' 32-bit geometry.
    #[error("dimension {dim} = {value} exceeds the supported maximum {max}")]
    DimensionTooLarge {
        /// The dimension: `"N"`, `"C"`, `"D"`, `"H"`, `"W"` or `"L"`.
        dim: &'static str,
        /// The value given.
        value: u64,
        /// The largest value allowed (`u32::MAX`).
        max: u64,
    },

    /// The element count of a shape overflows `usize` or the device's 63-bit indexing.
    #[error("element count of shape {dims:?} overflows: a shape holds at most 2^63 - 1 elements")]
    ElementCountOverflow {
        /// The dimensions given, `[N, C, spatial...]`.
        dims: Vec<u64>,
    },

    /// A buffer or list whose length is not the one the call implies.
    #[error("{what} holds {actual} elements where {expected} are expected")]
    LengthMismatch {
        /// What was given: a buffer (`"x"`, `"y"`; a backward's `"dy"`, `"dx"`; in
        /// place, the one buffer by its input's name), `"shard counts"` (against the
        /// global shape, or against the counts they are added to), a list of a
        /// tensor's dimensions (`"index"`, `"shard offset"`, `"shard extent"`), or
        /// a mask's words (`"seed words"`, `"plane words"`).
        what: &'static str,
        /// The length the call implies.
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },

    /// A call's shape or layout differs from the one the state it reuses was made for.
    #[error("saved state was made for shape {expected}, not {actual}: allocate a state for this shape")]
    ShapeMismatch {
        /// The state's shape, as [`Shape`](crate::Shape) displays it (`2x64x56x56`,
        /// with ` channels-last` after a channels-last one).
        expected: String,
        /// The call's shape, displayed the same way.
        actual: String,
    },

    /// A key's offset leaves too few counter blocks for a call.
    #[error("offset {offset} too large: it must be at most {max} (a call reads 16 counter blocks past its offset; a device generator also steps it on the device)")]
    OffsetOverflow {
        /// The offset given.
        offset: u64,
        /// The largest offset allowed (e.g. [`RngKey::MAX_OFFSET`](crate::RngKey::MAX_OFFSET)).
        max: u64,
    },

    /// Backward, apply or a statistic was asked of a state that no forward has
    /// completed on.
    #[error(
        "the state holds no completed forward or sampling call: call forward_into, sample_into or sample_shard on it first"
    )]
    NoForwardCall,

    /// A shard's box is empty or passes the end of the global tensor along an axis.
    #[error(
        "shard along {axis}: offset {offset} + extent {extent} must lie within 1..={len} and the extent be at least 1"
    )]
    InvalidShard {
        /// The axis: `"N"`, `"C"` or `"spatial i"`.
        axis: &'static str,
        /// The offset given.
        offset: u64,
        /// The extent given.
        extent: u64,
        /// The global tensor's size along the axis.
        len: u64,
    },

    /// A shard's element pass was asked for before its scales: the counts summed
    /// over every shard must first go to `finish_shard`.
    #[error("a shard's apply, backward or scales need finish_shard first, with the counts summed over every shard")]
    ShardNotFinished,

    /// A call that allocates device memory (`alloc_state`, `alloc_shard_state`,
    /// `forward`, `DeviceGenerator::new`, or the first drawing `sample_shard` on a
    /// state from `alloc_state`) on a stream being captured: a CUDA graph cannot
    /// hold the allocation (a replay would find it still live and fail to launch).
    #[error(
        "this call allocates device memory, which a CUDA graph cannot hold across replays: allocate before capturing (DropBlockCuda::alloc_state, alloc_shard_state, DeviceGenerator::new) and capture the calls that take them (every call on a DeviceState but forward; sample_shard on a state from alloc_shard_state)"
    )]
    AllocationInCapture,

    /// `DeviceGenerator::set_key` on a stream being captured: it copies the key
    /// from host memory, which CUDA does not capture from pageable memory.
    #[error(
        "DeviceGenerator::set_key copies the key from host memory, which a CUDA graph cannot capture: set the key before capturing (graphs already captured with the generator draw from the new key)"
    )]
    HostCopyInCapture,

    /// A call on a state or device generator whose last call ran on another
    /// stream, where one of the two streams is being captured and the other is
    /// not, or the two are in different captures: the call must wait for that
    /// stream's work, and a captured stream cannot wait on work recorded outside
    /// its capture (CUDA refuses it), nor on another capture's (CUDA refuses to
    /// merge them), while a stream that waits on work inside a capture is pulled
    /// into it (the call would be captured, not run). Refused before anything is
    /// enqueued, so the capture stays valid. A driver older than CUDA 11.3 cannot
    /// tell captures apart, so there two capturing streams are always refused.
    #[error(
        "this call's stream and the stream of the state's or device generator's last call are on either side of a CUDA graph capture, or in two different captures, which the call's wait for that stream cannot cross: make the calls on the capture stream (allocate the state there, or make one uncaptured call there before capturing; a stream forked into the capture by waiting on an event recorded there is in it too), or end the capture first"
    )]
    CaptureAcrossStreams,

    /// The kernels' module does not load on this device: the build has no code for
    /// its architecture, or the driver is older than the CUDA toolkit that built
    /// them. Holds the device's and the build's details and the driver's error.
    #[error("the kernels do not load on this device: {0}")]
    UnsupportedDevice(String),

    /// `finish_shard` on a state whose last call was not `sample_shard`.
    #[error("finish_shard needs a state whose last call was sample_shard")]
    NotAShardCall,

    /// An NCCL collective failed (feature `nccl`); holds NCCL's error.
    #[error("NCCL: {0}")]
    Nccl(String),

    /// Shard counts that no shards of the global shape can have (after a faulty
    /// reduction, or counts of another shape); holds what is wrong.
    #[error("shard counts that no shards of this shape can give: {0}")]
    ImpossibleShardCounts(String),

    /// An index (element coordinate, plane or window) is out of range.
    #[error("{what} is {value}, out of range 0..{len}")]
    OutOfRange {
        /// The index, e.g. `"c"`, `"spatial 1"`, `"plane"` or `"window"`.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The number of valid values; `value` must be below it.
        len: u64,
    },

    /// The exact γ rule (or the expected drop fraction) would sum over more
    /// coverage classes than [`crate::sampling::MAX_COVERAGE_CLASSES`]: a block of
    /// about 1000 cells a side in 2D, or 100 in 3D.
    #[error(
        "the exact drop rate sums over {classes} coverage classes for this block and shape, over the limit of {limit}: use GammaRule::Paper, or a smaller block"
    )]
    TooManyCoverageClasses {
        /// The classes this block and shape need (saturating at `u64::MAX`).
        classes: u64,
        /// [`crate::sampling::MAX_COVERAGE_CLASSES`].
        limit: u64,
    },

    /// A window length outside 1..=64 was given; holds the length given.
    #[error("a window holds 1 to 64 cells, not {0}")]
    InvalidWindowLength(u32),

    /// A host allocation (tensors, masks, per-sample counts or scales) failed.
    #[error("could not allocate {} of host memory", host_bytes(*bytes))]
    HostAllocation {
        /// The size asked for, in bytes (`u64::MAX` when the size itself overflows).
        bytes: u64,
    },

    /// A stream, buffer, device generator or saved state belongs to another CUDA
    /// context than the kernels (a buffer on another device is refused even with
    /// peer access: the kernels run on the stream's device).
    #[error(
        "the {what} is on another CUDA context than the kernels (DropBlockCuda::context): make it on a stream of that context"
    )]
    WrongContext {
        /// What was: `"stream"`, `"state"`, `"device generator"`, or a buffer
        /// (`"x"`, `"y"`, `"dy"`, `"dx"`, `"shard counts"`).
        what: &'static str,
    },

    /// libcuda could not be loaded.
    #[error("the CUDA driver library (libcuda) could not be found: is the NVIDIA driver installed?")]
    NoDriver,

    /// libcuda loaded but gives no usable device at the ordinal asked for (none, an
    /// invalid ordinal, a stub library, a driver mismatch); holds the driver's message.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The CUDA path was asked for in a build without kernels.
    #[error(
        "this build of dropblock has no CUDA kernels (built without the `cuda` feature, or by a docs build, DOCS_RS): build with the `cuda` feature and nvcc (scripts/cuda-toolchain.sh provides one)"
    )]
    KernelsNotBuilt,

    /// The device ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`), allocating a
    /// state, a generator or a tensor: a caller can free memory or shrink the
    /// batch and try again. Holds the driver's message.
    #[error("out of device memory: {0}")]
    DeviceOutOfMemory(String),

    /// Any other failure of the CUDA stack (a driver call, a module that does not
    /// load, a missing kernel); holds the message.
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

/// `std::result::Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An element pass's input and output as [`Error::LengthMismatch`] names them, on
/// both paths: a forward's `x`, `y`, a backward's `dy`, `dx`.
pub(crate) const fn pass_buffer_names(backward: bool) -> [&'static str; 2] {
    if backward {
        ["dy", "dx"]
    } else {
        ["x", "y"]
    }
}

/// cudarc's driver errors, for `?` on cudarc calls next to this crate's.
#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        // Formatting a DriverError calls into libcuda, which is loaded whenever a
        // DriverError exists.
        match e.0 {
            cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::DeviceOutOfMemory(e.to_string()),
            _ => Error::Driver(e.to_string()),
        }
    }
}

/// `len` values from `fill(i)`, in memory reserved first: a typed error
/// ([`Error::HostAllocation`]), not an abort, where the host cannot hold them.
pub fn host_vec<T>(len: usize, fill: impl FnMut(usize) -> T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::HostAllocation { bytes: (len as u64).saturating_mul(size_of::<T>() as u64) })?;
    v.extend((0..len).map(fill));
    Ok(v)
}

/// `n bytes`, or what it means when the size itself overflowed.
fn host_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        "more than 2^64 bytes (the size overflows)".to_string()
    } else {
        format!("{bytes} bytes")
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
        let unsupported = Error::UnsupportedDevice("CUDA_ERROR_NO_BINARY_FOR_GPU".into());
        for e in [
            Error::Driver("CUDA_ERROR_INVALID_IMAGE".into()),
            Error::DeviceOutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into()),
            Error::WrongContext { what: "x" },
            Error::NoForwardCall,
            unsupported,
        ] {
            assert!(!e.is_no_gpu(), "{e}");
        }
    }
}
