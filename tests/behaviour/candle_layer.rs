//! The candle layer (feature `candle`) against the crate's CPU path, bit for bit:
//! forward, candle's backprop, eval and zero-rate identity, offset, narrowed and
//! transposed tensors and gradients, the generator's advance and restore, the
//! schedule, and the errors for what it does not support.

use crate::common;

use candle_core::{DType, Device, ModuleT, Tensor};
use common::candle::*;
use dropblock::candle::{DropBlock, GeneratorState};
use dropblock::{DropBlockConfig, Generator, LinearSchedule};
use half::{bf16, f16};

const CPU: Device = Device::Cpu;

#[test]
fn forward_equals_cpu_forward_in_f32_f16_and_bf16() -> R {
    forward_matches_cpu::<f32>(&CPU, DType::F32)?;
    forward_matches_cpu::<f16>(&CPU, DType::F16)?;
    forward_matches_cpu::<bf16>(&CPU, DType::BF16)
}

#[test]
fn backprop_equals_cpu_backward_and_survives_a_second_backward() -> R {
    gradients_match_cpu::<f32>(&CPU, DType::F32)?;
    gradients_match_cpu::<f16>(&CPU, DType::F16)?;
    gradients_match_cpu::<bf16>(&CPU, DType::BF16)
}

/// A gradient penalty differentiates through the layer's backward: with candle
/// keeping the gradients' graph (`CANDLE_GRAD_DO_NOT_DETACH`, read once a thread),
/// the second-order gradient of `sum(v · d sum(y²)/dx)` is `2 f² v`, `f` the
/// layer's factor (the keep mask times the scale). The backward op cut the graph,
/// and it came out missing. The variable is set for a child run of this one test
/// (a test may not change the environment of the others' process).
#[test]
fn second_order_gradients_go_through_the_backward() -> R {
    const NAME: &str = "candle_layer::second_order_gradients_go_through_the_backward";
    if std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none() {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("CANDLE_GRAD_DO_NOT_DETACH", "1")
            .output()?;
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && log.contains("1 passed"), "the child run failed:\n{log}");
        return Ok(());
    }
    let (cfg, dims) = (paper(), [2usize, 3, 10, 10]);
    let layer = DropBlock::new(cfg, SEED);
    let key = Generator::from_state(SEED, layer.generator_state().offset).next_key()?;
    let x = candle_core::Var::from_tensor(&randn(&dims, DType::F32, &CPU)?)?;
    let v = randn(&dims, DType::F32, &CPU)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    let g = grads.get(x.as_tensor()).expect("a first-order gradient");
    let penalty = (g * &v)?.sum_all()?;
    let h = penalty.backward()?.get(x.as_tensor()).expect("a second-order gradient through the layer").clone();
    // f, from the crate's own forward of ones with the layer's key.
    let ones = Tensor::ones(&dims, DType::F32, &CPU)?;
    let (f, _) = cpu_forward::<f32>(&cfg, &ones, key);
    assert!(f.contains(&0.0) && f.iter().any(|&v| v > 1.0), "the mask should drop and scale");
    for ((h, v), f) in host::<f32>(&h)?.iter().zip(host::<f32>(&v)?).zip(&f) {
        let want = 2.0 * (*f as f64) * (*f as f64) * v as f64;
        assert!((*h as f64 - want).abs() <= 1e-5 * want.abs() + 1e-6, "h {h}, want {want} (f {f}, v {v})");
    }
    Ok(())
}

#[test]
fn offset_narrowed_and_transposed_inputs_read_the_right_elements() -> R {
    strided_inputs_match_cpu(&CPU)
}

#[test]
fn a_transposed_gradient_is_read_in_logical_order() -> R {
    transposed_gradient_matches_cpu(&CPU)
}

#[test]
fn channels_last_inputs_take_the_fast_path() -> R {
    channels_last_inputs_match_cpu(&CPU)
}

#[test]
fn eval_and_zero_rate_return_the_input_and_draw_nothing() -> R {
    let x = randn(&[2, 3, 9, 11], DType::F32, &CPU)?;
    let layer = DropBlock::new(paper(), SEED);
    let before = layer.generator_state();
    let y = layer.forward_t(&x, false)?;
    assert_eq!(y.id(), x.id(), "eval returns the input tensor itself");
    let zero = DropBlock::new(paper().with_drop_prob(0.0)?, SEED);
    assert_eq!(zero.forward_t(&x, true)?.id(), x.id(), "drop_prob 0 returns the input");
    assert_eq!(layer.generator_state(), before);
    assert_eq!(zero.generator_state(), before);
    Ok(())
}

/// An empty batch (no samples this step, as detection heads give) passes through
/// in training as `candle_nn::Dropout` passes it, drawing nothing, where it was
/// refused as a zero dimension; its rank and the block's are still checked.
#[test]
fn an_empty_tensor_passes_through_and_draws_nothing() -> R {
    let layer = DropBlock::new(paper(), SEED);
    let before = layer.generator_state();
    for dims in [&[0usize, 4, 8, 8][..], &[2, 0, 8, 8], &[2, 4, 0], &[1, 2, 3, 0, 5]] {
        let x = Tensor::zeros(dims, DType::F32, &CPU)?;
        for train in [true, false] {
            assert_eq!(layer.forward_t(&x, train)?.id(), x.id(), "{dims:?} train {train}");
        }
    }
    assert_eq!(layer.generator_state(), before, "an empty forward draws no key");
    let square = DropBlock::new(variant(), SEED);
    let e = square.forward_t(&Tensor::zeros((0, 2, 3, 5, 5), DType::F32, &CPU)?, true).unwrap_err();
    assert!(e.to_string().contains("a 2D block does not fit a tensor of spatial rank 3"), "{e}");
    let e = layer.forward_t(&Tensor::zeros((0, 5), DType::F32, &CPU)?, true).unwrap_err();
    assert!(e.to_string().contains("N,C,L / N,C,H,W / N,C,D,H,W"), "{e}");
    let e = layer.forward_t(&Tensor::zeros((0, 2, 5, 5), DType::F64, &CPU)?, true).unwrap_err();
    assert!(e.to_string().contains("f32, f16 and bf16"), "{e}");
    Ok(())
}

/// One layer shared by threads that run forwards at once (data-parallel workers
/// on one host, say): each forward draws its own key, none twice and none lost,
/// and its y is the CPU path's for that key.
#[test]
fn concurrent_forwards_draw_distinct_keys() -> R {
    const THREADS: usize = 4;
    let cfg = paper();
    let x = randn(&[2, 4, 14, 14], DType::F32, &CPU)?;
    let layer = DropBlock::new(cfg, SEED);
    let start = std::sync::Barrier::new(THREADS);
    let ys: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    (0..3).map(|_| bits(&host::<f32>(&layer.forward_t(&x, true).unwrap()).unwrap())).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut want: Vec<Vec<u32>> = (0..ys.len()).map(|k| bits(&cpu_forward::<f32>(&cfg, &x, key(SEED, k)).0)).collect();
    let mut got = ys;
    want.sort();
    got.sort();
    assert!(got == want, "the forwards' masks are not those of keys 0..{} once each", want.len());
    let next = key(SEED, want.len());
    assert_eq!(layer.generator_state(), GeneratorState { seed: SEED, offset: next.offset(), step: 0 });
    Ok(())
}

#[test]
fn the_generator_advances_and_a_restored_state_redraws_the_same_masks() -> R {
    let cfg = paper();
    let x = randn(&[4, 8, 14, 14], DType::F32, &CPU)?;
    let layer = DropBlock::new(cfg, SEED);
    let y0 = host::<f32>(&layer.forward_t(&x, true)?)?;
    let checkpoint = layer.generator_state();
    let y1 = host::<f32>(&layer.forward_t(&x, true)?)?;
    let y2 = host::<f32>(&layer.forward_t(&x, true)?)?;
    assert_ne!(bits(&y0), bits(&y1), "each forward draws a new mask");
    let mut gen = Generator::new(SEED);
    gen.next_key()?;
    assert_eq!(checkpoint, GeneratorState { seed: SEED, offset: gen.offset(), step: 0 });

    // A fresh layer (another seed) restored from the checkpoint resumes the run.
    let resumed = DropBlock::new(cfg, 1);
    resumed.set_generator_state(checkpoint);
    assert_eq!(bits(&host::<f32>(&resumed.forward_t(&x, true)?)?), bits(&y1));
    assert_eq!(bits(&host::<f32>(&resumed.forward_t(&x, true)?)?), bits(&y2));
    assert_eq!(resumed.generator_state(), layer.generator_state());
    Ok(())
}

#[test]
fn the_schedule_sets_the_drop_probability_of_each_step() -> R {
    let cfg = paper();
    let layer = DropBlock::new(cfg, SEED).with_schedule(LinearSchedule::drop_prob(0.0, 0.2, 11)?);
    let x = randn(&[2, 4, 12, 12], DType::F32, &CPU)?;
    layer.set_step(0);
    assert_eq!(layer.forward_t(&x, true)?.id(), x.id(), "step 0 of a ramp from 0 drops nothing");
    assert_eq!(layer.generator_state().offset, 0, "and draws nothing");
    for (step, p) in [(5, 0.1), (10, 0.2), (50, 0.2)] {
        layer.set_step(step);
        assert_eq!(layer.config()?.drop_prob(), p);
        let k = Generator::from_state(SEED, layer.generator_state().offset).next_key()?;
        let y = layer.forward_t(&x, true)?;
        let (want, _) = cpu_forward::<f32>(&cfg.with_drop_prob(p)?, &x, k);
        assert_eq!(bits(&host::<f32>(&y)?), bits(&want), "step {step}");
        assert_eq!(layer.generator_state().step, step);
    }
    Ok(())
}

/// In training and in eval alike (an eval that passed what training refuses would
/// fail only at the first training step).
#[test]
fn unsupported_dtypes_and_ranks_are_refused_with_what_is_supported() -> R {
    let layer = DropBlock::new(paper(), SEED);
    for train in [true, false] {
        for dtype in [DType::F64, DType::U8, DType::U32, DType::I64] {
            let x = Tensor::zeros((1, 2, 5, 5), dtype, &Device::Cpu)?;
            let e = layer.forward_t(&x, train).unwrap_err().to_string();
            assert!(e.contains("f32, f16 and bf16"), "{dtype:?} train {train}: {e}");
        }
        for dims in [vec![5, 5], vec![1, 2, 3, 4, 5, 5], vec![25]] {
            let x = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?;
            let e = layer.forward_t(&x, train).unwrap_err().to_string();
            assert!(e.contains("N,C,L / N,C,H,W / N,C,D,H,W"), "{dims:?} train {train}: {e}");
        }
        // A 2D block on a 3D tensor.
        let square = DropBlock::new(variant(), SEED);
        let e = square.forward_t(&Tensor::zeros((1, 2, 3, 5, 5), DType::F32, &Device::Cpu)?, train).unwrap_err();
        assert!(e.to_string().contains("a 2D block does not fit a tensor of spatial rank 3"), "train {train}: {e}");
    }
    assert_eq!(layer.generator_state().offset, 0, "a refused call draws no key");
    Ok(())
}

/// A forward refused after its key was drawn (an exact γ too large to sum, found
/// when the op plans) gives the key back: the generator is as it was, and the next
/// forward draws the key the failed one had.
#[test]
fn a_forward_that_fails_late_gives_its_key_back() -> R {
    use dropblock::{Block, GammaRule};
    // 1025 seed positions' classes on each of two axes: past the limit of 2^20.
    let exact = DropBlockConfig::builder(Block::uniform(1025)?, 0.1).gamma_rule(GammaRule::ExactRate).build()?;
    let layer = DropBlock::new(exact, SEED);
    let before = layer.generator_state();
    let big = Tensor::zeros((1, 1, 2049, 2049), DType::F32, &CPU)?;
    let e = layer.forward_t(&big, true).unwrap_err();
    assert!(e.to_string().contains("coverage classes"), "{e}");
    assert_eq!(layer.generator_state(), before, "a failed forward keeps no key");
    // Eval refuses it too (before drawing anything), as training does.
    let e = layer.forward_t(&big, false).unwrap_err();
    assert!(e.to_string().contains("coverage classes"), "eval: {e}");
    assert_eq!(layer.generator_state(), before);
    // On a map where the block leaves one seed position, the forward runs, with the
    // key the failed one drew.
    let x = randn(&[1, 2, 1025, 1025], DType::F32, &CPU)?;
    let y = layer.forward_t(&x, true)?;
    let (want, _) = cpu_forward::<f32>(&exact, &x, Generator::from_state(SEED, before.offset).next_key()?);
    assert_eq!(bits(&host::<f32>(&y)?), bits(&want));
    assert_eq!(layer.generator_state().offset, before.offset + 17);
    Ok(())
}

#[test]
fn crate_errors_convert_for_question_mark_in_candle_code() {
    fn build() -> R<DropBlock> {
        Ok(DropBlock::new(DropBlockConfig::paper(0, 0.1)?, SEED))
    }
    let e = build().unwrap_err().to_string();
    let ours = DropBlockConfig::paper(0, 0.1).unwrap_err().to_string();
    assert!(e.contains(&ours), "{e}");
}
