//! The CPU path on a batch: forward, backward, and what the call drew.
//!
//! `cargo run --release --example cpu_batch`

use std::time::Instant;

use dropblock::{cpu, DropBlockConfig, Generator, Mode, Shape};

fn main() -> dropblock::Result<()> {
    let shape = Shape::new(16, 256, 28, 28)?;
    let cfg = DropBlockConfig::paper(7, 0.1)?;
    let x: Vec<f32> = (0..shape.numel()).map(|i| ((i % 97) as f32 - 48.0) / 16.0).collect();
    let mut y = vec![0.0f32; shape.numel()];
    let mut dx = vec![0.0f32; shape.numel()];
    let mut gen = Generator::new(2018);
    println!("{shape} f32, {cfg}, {} threads", rayon::current_num_threads());
    for step in 0..3 {
        let key = gen.next_key()?;
        let t = Instant::now();
        let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y)?;
        let forward = t.elapsed();
        cpu::backward(&saved, &y, &mut dx)?;
        println!(
            "step {step}: key ({}, {}), γ {:.5}, dropped {:.4} of the batch, scale {:.5}, forward {:.2?}",
            key.seed(),
            key.offset(),
            saved.plan().map_or(0.0, |p| p.gamma()),
            saved.drop_fraction(),
            saved.scales()[0],
            forward
        );
    }
    // Eval mode is the identity, and draws nothing.
    cpu::forward(&cfg, shape, gen.next_key()?, Mode::Eval, &x, &mut y)?;
    println!("eval: y == x is {}", y == x);
    assert_eq!(y, x, "eval mode is the identity");
    Ok(())
}
