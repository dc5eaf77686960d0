//! Sampling the mask on a side stream while the layer before runs: the mask
//! depends on the key alone, so `sample_into` can start before x exists, and
//! `apply` joins once it does. The result is the single-call forward's, bit for bit.
//!
//! `cargo run --release --example side_stream_sampling` (says so and exits 0 without a GPU)

mod common;

use dropblock::{DropBlockConfig, Mode, RngKey, Shape};

fn main() -> dropblock::Result<()> {
    let Some(db) = common::gpu()? else {
        return Ok(());
    };
    let main = db.context().new_stream()?;
    let side = db.context().new_stream()?;
    let shape = Shape::new(16, 512, 28, 28)?;
    let cfg = DropBlockConfig::paper(7, 0.1)?;
    let key = RngKey::new(11, 0)?;

    // The side stream samples while the main stream produces x (here: a copy).
    let mut state = db.alloc_state(&side, shape)?;
    db.sample_into(&side, &mut state, &cfg, shape, key, Mode::Train)?;
    let x_host: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32 - 3.0).collect();
    let x = main.clone_htod(&x_host)?;
    // `apply` on the main stream waits for the side stream's sampling first.
    let mut y = main.alloc_zeros::<f32>(shape.numel())?;
    db.apply(&main, &state, &x, &mut y)?;

    // The same forward in one call, for comparison.
    let mut y_one = main.alloc_zeros::<f32>(shape.numel())?;
    db.forward(&main, &cfg, shape, key, Mode::Train, &x, &mut y_one)?;
    let (a, b) = (main.clone_dtoh(&y)?, main.clone_dtoh(&y_one)?);
    let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
    println!("{shape}: sampled on a side stream, applied on the main one; equal to one forward: {same}");
    assert!(same, "the split forward differs from the one-call forward");
    Ok(())
}
