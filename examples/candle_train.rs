//! Trains a small ResNet-style CNN with candle, DropBlock after stages 3 and 4, on
//! synthetic data made here (so the loss can really fall), the drop rate ramped
//! linearly from 0 to its target as the paper does.
//!
//! `cargo run --release --features candle --example candle_train [-- --device cuda]`
//! (`--device cuda` needs the `candle-cuda` feature and a GPU)
//!
//! The task: 24x24 images of noise with one bright 6x6 square; the class is the
//! quadrant the square lies in. Every few steps it prints the loss, the scheduled
//! drop_prob and the realised drop fraction (units zeroed by stage 3's DropBlock
//! among those that were not already zero), and at the end the accuracy on a
//! held-out batch in eval mode. It exits non-zero if the loss did not fall.

use candle_core::{DType, Device, Tensor, Var, D};
use dropblock::candle::DropBlock;
use dropblock::{DropBlockConfig, LinearSchedule};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIDE: usize = 24;
const CLASSES: usize = 4;
const BATCH: usize = 32;
const STEPS: u64 = 200;
const RAMP: u64 = 120;
const TARGET_DROP: f64 = 0.15;

fn main() -> candle_core::Result<()> {
    let device = match std::env::args().nth(1).as_deref() {
        None | Some("--device=cpu") => Device::Cpu,
        Some("--device") => match std::env::args().nth(2).as_deref() {
            Some("cpu") => Device::Cpu,
            Some("cuda") if cfg!(feature = "candle-cuda") => Device::new_cuda(0)?,
            Some("cuda") => {
                eprintln!("--device cuda: built without the `candle-cuda` feature");
                std::process::exit(2);
            }
            other => candle_core::bail!("unknown device {other:?}: cpu or cuda"),
        },
        Some(other) => candle_core::bail!("unknown argument {other}: the only option is --device cpu|cuda"),
    };
    let mut rng = StdRng::seed_from_u64(2018);
    let net = ResNet::new(&mut rng, &device)?;
    let (test_x, test_y) = batch(&mut rng, 256, &device)?;
    let mut momentum: Vec<Tensor> = net.vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<_>>()?;
    let (lr, mu) = (0.01, 0.9);
    let mut first = None;
    let mut last = Vec::new();
    println!("step   loss    drop_prob  dropped");
    for step in 0..STEPS {
        net.set_step(step);
        let (x, y) = batch(&mut rng, BATCH, &device)?;
        let (logits, dropped) = net.forward(&x, true)?;
        let loss = cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        for (v, m) in net.vars.iter().zip(momentum.iter_mut()) {
            let g = grads.get(v.as_tensor()).expect("every parameter is used");
            *m = ((&*m * mu)? + g)?;
            v.set(&(v.as_tensor() - (&*m * lr)?)?)?;
        }
        let loss = loss.to_scalar::<f32>()?;
        first.get_or_insert(loss);
        last.push(loss);
        if step % 20 == 0 || step + 1 == STEPS {
            println!("{step:4}  {loss:7.4}  {:9.4}  {dropped:7.4}", net.stage3_drop.config()?.drop_prob());
        }
    }
    let (logits, _) = net.forward(&test_x, false)?;
    let correct = logits.argmax(D::Minus1)?.eq(&test_y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
    let tail: f32 = last.iter().rev().take(20).sum::<f32>() / 20.0;
    let first = first.unwrap_or(f32::NAN);
    println!("loss {first:.4} at the start, {tail:.4} over the last 20 steps; held-out accuracy (eval) {correct:.3}");
    if tail.is_nan() || tail > 0.5 * first {
        eprintln!("the loss did not fall by half: something is wrong");
        std::process::exit(1);
    }
    Ok(())
}

/// A batch of images and their labels (the quadrant of the bright square).
fn batch(rng: &mut StdRng, n: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut pixels = vec![0f32; n * SIDE * SIDE];
    let mut labels = Vec::with_capacity(n);
    for (i, img) in pixels.chunks_mut(SIDE * SIDE).enumerate() {
        let class = i % CLASSES;
        img.iter_mut().for_each(|p| *p = rng.random_range(-1.0..1.0));
        let half = SIDE / 2;
        let (y0, x0) = ((class / 2) * half, (class % 2) * half);
        let (dy, dx) = (rng.random_range(0..=half - 6), rng.random_range(0..=half - 6));
        for y in y0 + dy..y0 + dy + 6 {
            img[y * SIDE + x0 + dx..y * SIDE + x0 + dx + 6].iter_mut().for_each(|p| *p += 0.75);
        }
        labels.push(class as u32);
    }
    Ok((Tensor::from_vec(pixels, (n, 1, SIDE, SIDE), device)?, Tensor::from_vec(labels, n, device)?))
}

fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let log_probs = logits.broadcast_sub(&logits.log_sum_exp(D::Minus1)?.unsqueeze(1)?)?;
    log_probs.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

/// conv3x3 → relu → conv3x3, plus a 1x1 projection when the shape changes, → relu.
struct Stage {
    conv1: Tensor,
    conv2: Tensor,
    project: Option<Tensor>,
    stride: usize,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = x.conv2d(&self.conv1, 1, self.stride, 1, 1)?.relu()?;
        let h = h.conv2d(&self.conv2, 1, 1, 1, 1)?;
        let skip = match &self.project {
            Some(p) => x.conv2d(p, 0, self.stride, 1, 1)?,
            None => x.clone(),
        };
        (h + skip)?.relu()
    }
}

struct ResNet {
    stem: Tensor,
    stages: Vec<Stage>,
    head: Tensor,
    stage3_drop: DropBlock,
    stage4_drop: DropBlock,
    vars: Vec<Var>,
}

impl ResNet {
    fn new(rng: &mut StdRng, device: &Device) -> candle_core::Result<Self> {
        let mut vars = Vec::new();
        // He initialisation: no batch norm here, so the scale of the weights matters.
        // The gain scales the values the Var starts from: scaling the Var's tensor
        // afterwards would make a new tensor, which training would never update.
        let mut weight = |shape: &[usize], fan_in: usize, gain: f32| -> candle_core::Result<Tensor> {
            let std = gain * (2.0 / fan_in as f32).sqrt();
            let w: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| normal(rng) * std).collect();
            let v = Var::from_tensor(&Tensor::from_vec(w, shape, device)?)?;
            vars.push(v.clone());
            Ok(v.as_tensor().clone())
        };
        let stem = weight(&[8, 1, 3, 3], 9, 1.0)?;
        let mut stages = Vec::new();
        // 24x24x8 → 24x24x8 → 12x12x16 → 6x6x32 (DropBlock 3) → 3x3x64 (DropBlock 2)
        for (cin, cout, stride) in [(8, 8, 1), (8, 16, 2), (16, 32, 2), (32, 64, 2)] {
            stages.push(Stage {
                conv1: weight(&[cout, cin, 3, 3], cin * 9, 1.0)?,
                conv2: weight(&[cout, cout, 3, 3], cout * 9, 1.0)?,
                project: if cin != cout || stride != 1 { Some(weight(&[cout, cin, 1, 1], cin, 1.0)?) } else { None },
                stride,
            });
        }
        let head = weight(&[64, CLASSES], 64, 0.1)?;
        let schedule = LinearSchedule::drop_prob(0.0, TARGET_DROP, RAMP)?;
        let stage3_drop = DropBlock::new(DropBlockConfig::paper(3, TARGET_DROP)?, 3).with_schedule(schedule);
        let stage4_drop = DropBlock::new(DropBlockConfig::paper(2, TARGET_DROP)?, 4).with_schedule(schedule);
        Ok(Self { stem, stages, head, stage3_drop, stage4_drop, vars })
    }

    fn set_step(&self, step: u64) {
        self.stage3_drop.set_step(step);
        self.stage4_drop.set_step(step);
    }

    /// The logits, and the fraction of stage 3's non-zero units its DropBlock zeroed.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, f32)> {
        let mut h = x.conv2d(&self.stem, 1, 1, 1, 1)?.relu()?;
        h = self.stages[0].forward(&h)?;
        h = self.stages[1].forward(&h)?;
        let before = self.stages[2].forward(&h)?;
        h = before.apply_t(&self.stage3_drop, train)?;
        let dropped = drop_fraction(&before, &h)?;
        h = self.stages[3].forward(&h)?.apply_t(&self.stage4_drop, train)?;
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        Ok((pooled.matmul(&self.head)?, dropped))
    }
}

fn drop_fraction(before: &Tensor, after: &Tensor) -> candle_core::Result<f32> {
    let live = before.ne(0f32)?.to_dtype(DType::F32)?;
    let zeroed = (after.eq(0f32)?.to_dtype(DType::F32)? * &live)?.sum_all()?.to_scalar::<f32>()?;
    Ok(zeroed / live.sum_all()?.to_scalar::<f32>()?.max(1.0))
}

/// A standard normal draw (Box–Muller), so the example needs no distribution crate.
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}
