//! The count reduction of a sharded forward through NCCL (feature `nccl`).
//!
//! Between [`DropBlockCuda::sample_shard`](super::DropBlockCuda::sample_shard)
//! and [`DropBlockCuda::finish_shard`](super::DropBlockCuda::finish_shard) every
//! shard's counts are summed in place with one all-reduce of `1 + 3N` u64 on the
//! caller's communicator and its stream (unsigned, so the coverage tags wrap as
//! they must). The scale each shard then computes is
//! `numerator / total` in f64 rounded to f32 from the same integers, so every
//! shard applies the same scale bit for bit (an all-reduce of f32 scales, or of
//! partial scales, would not give that).

use cudarc::driver::DevicePtrMut;
use cudarc::nccl::{Comm, ReduceOp};

use crate::error::{Error, Result};

/// Whether NCCL can be used, to ask before making a [`Comm`]. Loaded at run
/// time (this crate's own cudarc build), cudarc loads it at first use and
/// panics when it is missing: this tries the name cudarc tries first
/// (`libnccl.so`; `nccl.dll` on Windows. PyTorch's wheel ships
/// `nvidia/nccl/lib/libnccl.so.2`: link it as `libnccl.so` on the loader's path).
/// Linked at build time (with `candle-cuda`, whose cudarc links its libraries),
/// NCCL is there if the program started, under whichever name the linker found.
pub fn nccl_present() -> bool {
    if cfg!(feature = "candle-cuda") {
        return true;
    }
    let name = format!("{}nccl{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    // SAFETY: loading the library runs only its initialisers, as cudarc's own first
    // use does; no NCCL call is made, and the handle is closed again.
    unsafe { libloading::Library::new(name) }.is_ok()
}

/// Sums `counts` (a shard's [`ShardCounts`](crate::ShardCounts) on the device: a
/// slice, or a view of one)
/// over every rank of `comm`, in place, on the communicator's stream. With
/// cudarc's event tracking on, cudarc orders it after the `sample_shard` that
/// wrote them and before the `finish_shard` that reads them; with it off (as
/// under CUDA graph capture), run all three on the communicator's stream or order
/// the streams yourself. [`Error::Nccl`] when the collective fails. (A `comm`
/// exists only once NCCL is loaded, so nothing is probed here: a probe by another
/// name than the loaded library's refused a working NCCL.)
pub fn all_reduce_counts(comm: &Comm, counts: &mut impl DevicePtrMut<u64>) -> Result<()> {
    comm.all_reduce_in_place(counts, &ReduceOp::Sum).map_err(|e| Error::Nccl(format!("{e:?}")))?;
    Ok(())
}
