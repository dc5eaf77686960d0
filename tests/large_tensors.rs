//! A tensor past 2^31 elements on the CPU path (64-bit indexing end to end), in
//! place in bf16: 4.3 GB. Opt-in, as it needs that memory and a release build to
//! run in seconds: `DROPBLOCK_LARGE_TESTS=1 cargo test --release --test
//! large_tensors`. Without it the test is reported as ignored, with the reason.

mod common;

use dropblock::sampling::Plan;
use dropblock::{cpu, DropBlockConfig, Mode, RngKey, Shape};
use half::bf16;
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let name = "bf16_past_2_pow_31_elements_in_place";
    let trial = if std::env::var("DROPBLOCK_LARGE_TESTS").is_ok_and(|v| v == "1") {
        Trial::test(name, past_2_pow_31)
    } else {
        common::cannot_run(name, "needs 4.3 GB and a release build: set DROPBLOCK_LARGE_TESTS=1", false)
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

/// Every element past 2^31 (and a stride of the rest) is `x · factor` with the
/// factor of its own cell; both drops and keeps occur past 2^31. Past 2^31 the
/// mask is also checked against the contract's seeds directly
/// (`Plan::seed_plane`, itself checked against an independent implementation in
/// the behaviour suite): a cell is dropped iff a seed lies in the 7 x 7 block
/// positions that cover it.
fn past_2_pow_31() -> Result<(), Failed> {
    let shape = Shape::new(1, 2, 32_768, 32_769).unwrap();
    assert!(shape.numel() > 1 << 31);
    let value = |e: usize| bf16::from_f32(((e % 251) as f32 - 125.0) / 8.0);
    let mut data: Vec<bf16> = (0..shape.numel()).map(value).collect();
    let cfg = DropBlockConfig::paper(7, 0.1).unwrap();
    let key = RngKey::new(31, 0).unwrap();
    let saved = cpu::forward_inplace(&cfg, shape, key, Mode::Train, &mut data).unwrap();
    let scale = saved.scales()[0];
    // Global normalisation in f64 over a numel past 2^31 (an i32 would wrap).
    let want_scale = (shape.numel() as f64 / saved.kept() as f64) as f32;
    if scale != want_scale {
        return Err(format!("scale {scale} for {} kept of {}: want {want_scale}", saved.kept(), shape.numel()).into());
    }
    let (hw, w) = (shape.plane_len(), shape.w());
    // Every element past 2^31 is in plane 1; its seed grid is (H - 6) x (W - 6)
    // (Valid placement: a seed at (y, x) drops rows y..y+7, columns x..x+7).
    assert!(1 << 31 >= hw);
    let seeds = Plan::new(&cfg, shape, key).unwrap().seed_plane(1).unwrap();
    let (seed_h, seed_w) = (shape.h() - 6, w - 6);
    let seeded = |y: usize, x: usize| seeds[(y * seed_w + x) / 64] >> ((y * seed_w + x) % 64) & 1 == 1;
    let covered = |row: usize, col: usize| {
        let (ys, xs) = (row.saturating_sub(6)..=row.min(seed_h - 1), col.saturating_sub(6)..=col.min(seed_w - 1));
        ys.into_iter().any(|y| xs.clone().any(|x| seeded(y, x)))
    };
    let (mut kept, mut dropped) = (0u64, 0u64);
    let check = |e: usize| -> Result<bool, Failed> {
        let (c, cell) = (e / hw, e % hw);
        let keep = saved.is_kept(&[0, c, cell / w, cell % w]).unwrap();
        let want = bf16::from_f32(value(e).to_f32() * if keep { scale } else { 0.0 });
        if !common::same(data[e], want) {
            return Err(format!("element {e}: {} instead of {}", data[e], want).into());
        }
        Ok(keep)
    };
    for e in (1usize << 31)..shape.numel() {
        let cell = e % hw;
        let keep = check(e)?;
        if keep == covered(cell / w, cell % w) {
            return Err(format!("element {e}: kept {keep}, but the contract's seeds say {}", !keep).into());
        }
        if keep {
            kept += 1;
        } else {
            dropped += 1;
        }
    }
    for e in (0..1usize << 31).step_by(4099) {
        check(e)?;
    }
    if kept == 0 || dropped == 0 {
        return Err(format!("past 2^31: {kept} kept, {dropped} dropped; the test needs both").into());
    }
    Ok(())
}
