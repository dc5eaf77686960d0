//! The candle layer (feature `candle`) against the crate's CPU path, bit for bit:
//! forward, candle's backprop, eval and zero-rate identity, offset, narrowed and
//! transposed tensors and gradients, the generator's advance and restore, the
//! schedule, and the errors for what it does not support.

use candle_core::{DType, Device, ModuleT, Tensor, Var, WithDType};
use dropblock::candle::{DropBlock, GeneratorState};
use dropblock::{
    cpu, Block, DropBlockConfig, Element, Generator, LinearSchedule, Mode, Normalize, Placement, RngKey, Shape, Sharing,
};
use half::{bf16, f16};

type R<T = ()> = candle_core::Result<T>;

const SEED: u64 = 20261130;

fn paper() -> DropBlockConfig {
    DropBlockConfig::paper(3, 0.2).unwrap()
}

/// A variant far from the defaults: uneven block, seeds anywhere, a mask per
/// sample, per-sample normalisation.
fn variant() -> DropBlockConfig {
    DropBlockConfig::builder(Block::new(4, 2).unwrap(), 0.15)
        .placement(Placement::Anywhere)
        .sharing(Sharing::Channels)
        .normalize(Normalize::PerSample)
        .build()
        .unwrap()
}

fn randn(dims: &[usize], dtype: DType) -> R<Tensor> {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// The tensor's elements in logical order.
fn host<T: WithDType>(t: &Tensor) -> R<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Bits of each element (f32 holds f16 and bf16 exactly, so equal bits here are
/// equal bits there).
fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// What candle's gradient store makes of a gradient: it accumulates into a zero
/// tensor (`GradStore::or_insert`, then `add`), so `-0` becomes `+0` and every
/// other value stays as it is.
fn accumulated<T: Element>(dx: &[T]) -> Vec<u32> {
    dx.iter().map(|x| (x.to_f32() + 0.0).to_bits()).collect()
}

fn shape_of(t: &Tensor) -> Shape {
    let d = t.dims();
    Shape::new(d[0], d[1], d[2], d[3]).unwrap()
}

/// The k-th key the layer's generator draws (k from 0).
fn key(seed: u64, k: usize) -> RngKey {
    let mut g = Generator::new(seed);
    for _ in 0..k {
        g.next_key().unwrap();
    }
    g.next_key().unwrap()
}

/// The CPU path's forward of `x` (in logical order), and what it saved.
fn cpu_forward<T: WithDType + Element>(cfg: &DropBlockConfig, x: &Tensor, key: RngKey) -> (Vec<T>, cpu::Saved) {
    let xs = host::<T>(x).unwrap();
    let mut y = vec![T::default(); xs.len()];
    let saved = cpu::forward(cfg, shape_of(x), key, Mode::Train, &xs, &mut y).unwrap();
    (y, saved)
}

fn forward_matches_cpu<T: WithDType + Element>(dtype: DType) -> R {
    for cfg in [paper(), variant()] {
        let layer = DropBlock::new(cfg, SEED);
        let x = randn(&[2, 3, 9, 11], dtype)?;
        for call in 0..2 {
            let y = layer.forward_t(&x, true)?;
            assert_eq!((y.dims(), y.dtype()), (x.dims(), dtype));
            let (want, saved) = cpu_forward::<T>(&cfg, &x, key(SEED, call));
            assert!(saved.drop_fraction() > 0.0, "the case must drop something");
            assert_eq!(bits(&host::<T>(&y)?), bits(&want), "{dtype:?} {cfg} call {call}");
        }
    }
    Ok(())
}

#[test]
fn forward_equals_cpu_forward_in_f32_f16_and_bf16() -> R {
    forward_matches_cpu::<f32>(DType::F32)?;
    forward_matches_cpu::<f16>(DType::F16)?;
    forward_matches_cpu::<bf16>(DType::BF16)
}

fn gradients_match_cpu<T: WithDType + Element>(dtype: DType) -> R {
    let cfg = variant();
    let layer = DropBlock::new(cfg, SEED);
    let x = Var::from_tensor(&randn(&[2, 4, 8, 8], dtype)?)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    // d(sum(y · w))/dy = w exactly, so dx must be cpu::backward of w.
    let w = randn(&[2, 4, 8, 8], dtype)?;
    let loss = (&y * &w)?.sum_all()?;
    let (_, saved) = cpu_forward::<T>(&cfg, x.as_tensor(), key(SEED, 0));
    let ws = host::<T>(&w)?;
    let mut want = vec![T::default(); ws.len()];
    cpu::backward(&saved, &ws, &mut want)?;
    // Backprop twice: the op keeps its saved bits for every call.
    for round in 0..2 {
        let grads = loss.backward()?;
        let dx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert_eq!(bits(&host::<T>(dx)?), accumulated(&want), "{dtype:?} backward {round}");
    }
    Ok(())
}

#[test]
fn backprop_equals_cpu_backward_and_survives_a_second_backward() -> R {
    gradients_match_cpu::<f32>(DType::F32)?;
    gradients_match_cpu::<f16>(DType::F16)?;
    gradients_match_cpu::<bf16>(DType::BF16)
}

#[test]
fn eval_and_zero_rate_return_the_input_and_draw_nothing() -> R {
    let x = randn(&[2, 3, 9, 11], DType::F32)?;
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

#[test]
fn offset_narrowed_and_transposed_inputs_read_the_right_elements() -> R {
    let cfg = paper();
    let big = randn(&[3, 5, 9, 11], DType::F32)?;
    let cases = [
        ("offset (narrowed batch, contiguous)", big.narrow(0, 1, 2)?),
        ("narrowed channels (strided)", big.narrow(1, 1, 3)?),
        ("transposed H and W", big.transpose(2, 3)?),
    ];
    for (what, x) in cases {
        assert!(what.starts_with("offset") || !x.is_contiguous(), "{what} must exercise a strided layout");
        let layer = DropBlock::new(cfg, SEED);
        let y = layer.forward_t(&x, true)?;
        let (want, _) = cpu_forward::<f32>(&cfg, &x, key(SEED, 0));
        assert_eq!(bits(&host::<f32>(&y)?), bits(&want), "{what}");
    }
    Ok(())
}

#[test]
fn a_transposed_gradient_is_read_in_logical_order() -> R {
    let cfg = paper();
    let layer = DropBlock::new(cfg, SEED);
    let x = Var::from_tensor(&randn(&[2, 3, 9, 11], DType::F32)?)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    // The gradient reaching the layer is w_t transposed back: not contiguous.
    let w_t = randn(&[2, 3, 11, 9], DType::F32)?;
    let loss = (y.transpose(2, 3)? * &w_t)?.sum_all()?;
    let grads = loss.backward()?;
    let dx = grads.get(x.as_tensor()).expect("x has a gradient");
    let (_, saved) = cpu_forward::<f32>(&cfg, x.as_tensor(), key(SEED, 0));
    let dy = host::<f32>(&w_t.transpose(2, 3)?)?;
    let mut want = vec![0f32; dy.len()];
    cpu::backward(&saved, &dy, &mut want)?;
    assert_eq!(bits(&host::<f32>(dx)?), accumulated(&want));
    Ok(())
}

#[test]
fn the_generator_advances_and_a_restored_state_redraws_the_same_masks() -> R {
    let cfg = paper();
    let x = randn(&[4, 8, 14, 14], DType::F32)?;
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
    let layer = DropBlock::new(cfg, SEED).with_schedule(LinearSchedule::drop_prob(0.0, 0.2, 10)?);
    let x = randn(&[2, 4, 12, 12], DType::F32)?;
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

#[test]
fn unsupported_dtypes_and_ranks_are_refused_with_what_is_supported() -> R {
    let layer = DropBlock::new(paper(), SEED);
    for dtype in [DType::F64, DType::U8, DType::U32, DType::I64] {
        let x = Tensor::zeros((1, 2, 5, 5), dtype, &Device::Cpu)?;
        let e = layer.forward_t(&x, true).unwrap_err().to_string();
        assert!(e.contains("f32, f16 and bf16"), "{dtype:?}: {e}");
    }
    for dims in [vec![2, 5, 5], vec![1, 2, 3, 5, 5], vec![25]] {
        let x = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?;
        let e = layer.forward_t(&x, true).unwrap_err().to_string();
        assert!(e.contains("rank 4") && e.contains(&format!("{dims:?}")), "{dims:?}: {e}");
    }
    assert_eq!(layer.generator_state().offset, 0, "a refused call draws no key");
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
