//! The candle layer's checks against the CPU path, for any candle device: the
//! CPU tests (tests/behaviour/candle_layer.rs) and the CUDA ones (tests/candle_cuda.rs) run
//! the same checks.

use candle_core::{DType, Device, ModuleT, Tensor, Var, WithDType};
use dropblock::candle::DropBlock;
use dropblock::{
    cpu, Anchor, Block, DropBlockConfig, Element, GammaRule, Generator, Mode, Normalize, Placement, RngKey, Shape,
    Sharing,
};

pub type R<T = ()> = candle_core::Result<T>;

pub const SEED: u64 = 20261130;

pub fn paper() -> DropBlockConfig {
    DropBlockConfig::paper(3, 0.2).unwrap()
}

/// A variant far from the defaults: uneven block, seeds anywhere, a mask per
/// sample, per-sample normalisation.
pub fn variant() -> DropBlockConfig {
    DropBlockConfig::builder(Block::new(4, 2).unwrap(), 0.15)
        .placement(Placement::Anywhere)
        .sharing(Sharing::Channels)
        .normalize(Normalize::PerSample)
        .build()
        .unwrap()
}

/// miguelvr's DropBlock3D on a rank-3 block: seeds anywhere, his anchoring and γ
/// rule, a mask per sample.
pub fn variant_3d() -> DropBlockConfig {
    DropBlockConfig::builder(Block::from_sizes(&[2, 3, 4]).unwrap(), 0.3)
        .placement(Placement::Anywhere)
        .anchor(Anchor::CenteredRight)
        .gamma_rule(GammaRule::PerBlock)
        .sharing(Sharing::Channels)
        .build()
        .unwrap()
}

/// A 1D block under ExactRate, normalised per sample.
pub fn variant_1d() -> DropBlockConfig {
    DropBlockConfig::builder(Block::from_sizes(&[6]).unwrap(), 0.2)
        .gamma_rule(GammaRule::ExactRate)
        .normalize(Normalize::PerSample)
        .build()
        .unwrap()
}

/// Normal values made on the CPU (so every device sees the same ones), then moved.
pub fn randn(dims: &[usize], dtype: DType, device: &Device) -> R<Tensor> {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}

/// Expected normalisation without sharing: on CUDA the one-launch fused path.
pub fn fused() -> DropBlockConfig {
    DropBlockConfig::builder(Block::square(5).unwrap(), 0.2).normalize(Normalize::Expected).build().unwrap()
}

/// The tensor's elements in logical order.
pub fn host<T: WithDType>(t: &Tensor) -> R<Vec<T>> {
    t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()
}

/// Bits of each element (f32 holds f16 and bf16 exactly, so equal bits here are
/// equal bits there).
pub fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// What candle's gradient store makes of a gradient: it accumulates into a zero
/// tensor (`GradStore::or_insert`, then `add`), so `-0` becomes `+0` and every
/// other value stays as it is.
pub fn accumulated<T: Element>(dx: &[T]) -> Vec<u32> {
    dx.iter().map(|x| (x.to_f32() + 0.0).to_bits()).collect()
}

pub fn shape_of(t: &Tensor) -> Shape {
    Shape::from_dims(t.dims()).unwrap()
}

/// The k-th key the layer's generator draws (k from 0).
pub fn key(seed: u64, k: usize) -> RngKey {
    let mut g = Generator::new(seed);
    for _ in 0..k {
        g.next_key().unwrap();
    }
    g.next_key().unwrap()
}

/// The CPU path's forward of `x` (in logical order), and what it saved.
pub fn cpu_forward<T: WithDType + Element>(cfg: &DropBlockConfig, x: &Tensor, key: RngKey) -> (Vec<T>, cpu::Saved) {
    let xs = host::<T>(x).unwrap();
    let mut y = vec![T::default(); xs.len()];
    let saved = cpu::forward(cfg, shape_of(x), key, Mode::Train, &xs, &mut y).unwrap();
    (y, saved)
}

/// The layer's forward equals `cpu::forward` for the keys its generator draws, on
/// 1D, 2D and 3D tensors.
pub fn forward_matches_cpu<T: WithDType + Element>(device: &Device, dtype: DType) -> R {
    let (d1, d2, d3) = (&[2usize, 3, 37][..], &[2usize, 3, 9, 11][..], &[2usize, 3, 4, 5, 6][..]);
    let cases = [
        (paper(), d1),
        (variant_1d(), d1),
        (paper(), d2),
        (variant(), d2),
        (fused(), d2),
        (paper(), d3),
        (variant_3d(), d3),
    ];
    for (cfg, dims) in cases {
        let layer = DropBlock::new(cfg, SEED);
        let x = randn(dims, dtype, device)?;
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

/// candle's backprop through the layer equals `cpu::backward`, twice over.
pub fn gradients_match_cpu<T: WithDType + Element>(device: &Device, dtype: DType) -> R {
    let cfg = variant();
    let layer = DropBlock::new(cfg, SEED);
    let x = Var::from_tensor(&randn(&[2, 4, 8, 8], dtype, device)?)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    // d(sum(y · w))/dy = w exactly, so dx must be cpu::backward of w.
    let w = randn(&[2, 4, 8, 8], dtype, device)?;
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

/// Offset, strided, transposed and broadcast inputs are read in logical order;
/// a channels-last one at an offset takes the fast path.
pub fn strided_inputs_match_cpu(device: &Device) -> R {
    let cfg = paper();
    let big = randn(&[3, 5, 9, 11], DType::F32, device)?;
    // Channels-last (N, H, W, C) in memory, a narrowed batch of it: at an offset.
    let channels_last = randn(&[3, 9, 11, 5], DType::F32, device)?.permute([0, 3, 1, 2])?.narrow(0, 1, 2)?;
    let cases = [
        ("offset (narrowed batch, contiguous)", big.narrow(0, 1, 2)?),
        ("narrowed channels (strided)", big.narrow(1, 1, 3)?),
        ("transposed H and W", big.transpose(2, 3)?),
        ("broadcast along the batch (stride 0)", big.narrow(0, 0, 1)?.broadcast_as((4, 5, 9, 11))?),
        ("a width of 1 (narrowed: H's stride is not W's)", big.narrow(3, 4, 1)?),
        ("channels-last at an offset", channels_last),
    ];
    for (what, x) in cases {
        assert!(what.starts_with("offset") || !x.is_contiguous(), "{what} must exercise a strided layout");
        let layer = DropBlock::new(cfg, SEED);
        let y = layer.forward_t(&x, true)?;
        let (want, saved) = cpu_forward::<f32>(&cfg, &x, key(SEED, 0));
        assert!(saved.drop_fraction() > 0.0, "{what}: the case must drop something");
        assert_eq!(bits(&host::<f32>(&y)?), bits(&want), "{what}");
        if what.starts_with("channels-last") {
            assert!(y.permute([0, 2, 3, 1])?.is_contiguous(), "{what}: y is not channels-last: the input was copied");
        }
    }
    Ok(())
}

/// A gradient that arrives transposed is read in logical order.
pub fn transposed_gradient_matches_cpu(device: &Device) -> R {
    let cfg = paper();
    let layer = DropBlock::new(cfg, SEED);
    let x = Var::from_tensor(&randn(&[2, 3, 9, 11], DType::F32, device)?)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    // The gradient reaching the layer is w_t transposed back: not contiguous.
    let w_t = randn(&[2, 3, 11, 9], DType::F32, device)?;
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

/// A channels-last input (logically `(N, C, spatial...)`, strided as
/// `(N, spatial..., C)`: PyTorch's `channels_last`) takes the fast path: y keeps
/// those strides (no transposing copy), and y and the gradient equal the CPU path
/// on the same logical tensor, in 1D, 2D and 3D.
pub fn channels_last_inputs_match_cpu(device: &Device) -> R {
    let cases =
        [(paper(), vec![2usize, 5, 9, 11]), (variant_3d(), vec![2, 3, 4, 5, 6]), (variant_1d(), vec![2, 33, 37])];
    for (cfg, dims) in cases {
        let rank = dims.len();
        let to_physical: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
        let to_logical: Vec<usize> = [0, rank - 1].into_iter().chain(1..rank - 1).collect();
        let x = randn(&dims, DType::F32, device)?;
        let physical = Var::from_tensor(&x.permute(to_physical.clone())?.contiguous()?)?;
        let x_cl = physical.as_tensor().permute(to_logical.clone())?;
        assert!(!x_cl.is_contiguous(), "{dims:?}: the input must be strided");
        let layer = DropBlock::new(cfg, SEED);
        let y = layer.forward_t(&x_cl, true)?;
        assert_eq!(y.dims(), &dims[..]);
        assert!(y.permute(to_physical)?.is_contiguous(), "{dims:?}: y is not channels-last: the input was copied");
        let (want, saved) = cpu_forward::<f32>(&cfg, &x, key(SEED, 0));
        assert!(saved.drop_fraction() > 0.0, "{dims:?}: the case must drop something");
        assert_eq!(bits(&host::<f32>(&y)?), bits(&want), "{dims:?}: y");

        let w = randn(&dims, DType::F32, device)?;
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let dx = grads.get(physical.as_tensor()).expect("x has a gradient").permute(to_logical)?;
        let mut dx_want = vec![0f32; x.elem_count()];
        cpu::backward(&saved, &host::<f32>(&w)?, &mut dx_want)?;
        assert_eq!(bits(&host::<f32>(&dx)?), accumulated(&dx_want), "{dims:?}: dx");
    }
    Ok(())
}
