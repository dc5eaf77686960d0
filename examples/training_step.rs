//! A training step on the GPU with cudarc buffers: forward and backward on the
//! caller's stream, a drop rate ramped by a `LinearSchedule`, and a
//! `DeviceGenerator` that steps its key on the device at every forward that draws
//! (not step 0's: at drop_prob 0 a forward is a copy, and draws nothing).
//!
//! `cargo run --release --example training_step` (says so and exits 0 without a GPU)

mod common;

use dropblock::cuda::DeviceGenerator;
use dropblock::{DropBlockConfig, LinearSchedule, Mode, Shape};

fn main() -> dropblock::Result<()> {
    let Some(db) = common::gpu()? else {
        return Ok(());
    };
    let stream = db.context().new_stream()?;
    let shape = Shape::new(32, 512, 28, 28)?;
    let x_host: Vec<f32> = (0..shape.numel()).map(|i| ((i % 89) as f32 - 44.0) / 8.0).collect();
    let x = stream.clone_htod(&x_host)?;
    let mut y = stream.alloc_zeros::<f32>(shape.numel())?;
    let dy = stream.clone_htod(&x_host)?;
    let mut dx = stream.alloc_zeros::<f32>(shape.numel())?;
    let mut state = db.alloc_state(&stream, shape)?;
    let mut gen = DeviceGenerator::new(&stream, 2018, 0)?;
    // The paper ramps the drop rate from 0 to 0.1.
    let schedule = LinearSchedule::drop_prob(0.0, 0.1, 4)?;
    let block = DropBlockConfig::paper(7, 0.1)?;
    println!("{} on {}", shape, db.device_name());
    for step in 0..6 {
        let cfg = block.with_drop_prob(schedule.drop_prob_at(step))?;
        db.forward_into(&stream, &mut state, &cfg, shape, &mut gen, Mode::Train, &x, &mut y)?;
        db.backward(&stream, &state, &dy, &mut dx)?;
        // Statistics only when asked: these synchronise the stream, so a training
        // loop reads them every few hundred steps; this one reads them at every
        // step to show the ramp.
        let kept = state.kept(&stream)?;
        println!(
            "step {step}: drop_prob {:.3}, dropped {:.4}, scale {:?}, next key offset {}",
            cfg.drop_prob(),
            1.0 - kept as f64 / shape.numel() as f64,
            state.scales(&stream)?,
            gen.key(&stream)?.offset()
        );
    }
    Ok(())
}
