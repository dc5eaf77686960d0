//! A forward captured into a CUDA graph, drawing a fresh mask at every replay: the
//! key lives in a `DeviceGenerator`, which the kernels step on the device.
//!
//! `cargo run --release --example graph_replay` (says so and exits 0 without a GPU)

mod common;

use cudarc::driver::sys;
use dropblock::cuda::DeviceGenerator;
use dropblock::{DropBlockConfig, Mode, Shape};

fn main() -> dropblock::Result<()> {
    let Some(db) = common::gpu()? else {
        return Ok(());
    };
    // Captured work must not wait on events recorded outside the capture: like
    // candle, run without cudarc's per-buffer events (every buffer here belongs to
    // one stream). The setting belongs to this `CudaContext` handle, shared by
    // whoever holds it: a framework's handle given to `from_context` would lose
    // its event tracking too.
    // SAFETY: no buffer is shared between streams in this program.
    unsafe { db.context().disable_event_tracking() };
    let stream = db.context().new_stream()?;
    let shape = Shape::new(8, 256, 14, 14)?;
    let cfg = DropBlockConfig::paper(5, 0.2)?;
    let x = stream.clone_htod(&vec![1.0f32; shape.numel()])?;
    let mut y = stream.alloc_zeros::<f32>(shape.numel())?;
    let mut state = db.alloc_state(&stream, shape)?;
    let mut gen = DeviceGenerator::new(&stream, 7, 0)?;
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    db.forward_into(&stream, &mut state, &cfg, shape, &mut gen, Mode::Train, &x, &mut y)?;
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    let Some(graph) = graph else {
        println!("the capture recorded no graph");
        return Ok(());
    };
    for replay in 0..4 {
        graph.launch()?;
        let y_host = stream.clone_dtoh(&y)?;
        let dropped = y_host.iter().filter(|&&v| v == 0.0).count();
        let first: Vec<u8> = y_host.iter().take(40).map(|&v| (v != 0.0) as u8).collect();
        println!("replay {replay}: {dropped} dropped, first cells kept {first:?}");
    }
    println!("the generator has stepped to offset {}", gen.key(&stream)?.offset());
    Ok(())
}
