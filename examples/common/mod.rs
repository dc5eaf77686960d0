//! What the GPU examples share: the device, or a clear word that there is none.

use dropblock::cuda::DropBlockCuda;

/// The kernels on device 0, or `None` after saying there is no GPU. Under
/// `DROPBLOCK_REQUIRE_GPU=1` (a GPU runner) no GPU is an error instead.
pub fn gpu() -> dropblock::Result<Option<DropBlockCuda>> {
    match DropBlockCuda::new(0) {
        Ok(db) => Ok(Some(db)),
        Err(e) if e.is_no_gpu() && std::env::var("DROPBLOCK_REQUIRE_GPU").as_deref() != Ok("1") => {
            println!("no GPU ({e}): nothing to show; the CPU path is in examples/cpu_batch.rs");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
