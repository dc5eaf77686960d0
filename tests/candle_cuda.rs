//! The candle layer on CUDA tensors (feature `candle-cuda`) against the crate's
//! CPU path, bit for bit: the checks of tests/behaviour/candle_layer.rs, on candle's CUDA
//! device, its buffers and its stream.
//!
//! A binary built with candle's `cuda` feature links libcuda, cuBLAS and NVRTC, so
//! it does not start on a machine without them: these tests run where a GPU is
//! (the GPU bundle, a self-hosted runner). With the libraries but no device they
//! are reported as ignored with the reason; `DROPBLOCK_REQUIRE_GPU=1` fails them.

mod common;

use candle_core::{DType, Device, ModuleT};
use common::candle::*;
use dropblock::candle::DropBlock;
use half::{bf16, f16};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let require = common::gpu_required();
    type Check = fn(&Device) -> R;
    let checks: [(&str, Check); 10] = [
        ("forward_equals_cpu_forward_f32", |d| forward_matches_cpu::<f32>(d, DType::F32)),
        ("forward_equals_cpu_forward_f16", |d| forward_matches_cpu::<f16>(d, DType::F16)),
        ("forward_equals_cpu_forward_bf16", |d| forward_matches_cpu::<bf16>(d, DType::BF16)),
        ("backprop_equals_cpu_backward_f32", |d| gradients_match_cpu::<f32>(d, DType::F32)),
        ("backprop_equals_cpu_backward_f16", |d| gradients_match_cpu::<f16>(d, DType::F16)),
        ("backprop_equals_cpu_backward_bf16", |d| gradients_match_cpu::<bf16>(d, DType::BF16)),
        ("offset_narrowed_and_transposed_inputs", strided_inputs_match_cpu),
        ("a_transposed_gradient", transposed_gradient_matches_cpu),
        ("channels_last_inputs", channels_last_inputs_match_cpu),
        ("eval_returns_the_input_on_the_device", eval_is_the_identity),
    ];
    let trials = match Device::new_cuda(0) {
        Ok(device) => checks
            .into_iter()
            .map(|(name, check)| {
                let device = device.clone();
                Trial::test(name, move || check(&device).map_err(|e| Failed::from(e.to_string())))
            })
            .collect(),
        Err(e) => {
            // Only a missing driver or device skips (as gpu_parity decides it): a
            // device that candle cannot open is a failure.
            let no_gpu = dropblock::cuda::DropBlockCuda::new(0).err().filter(dropblock::Error::is_no_gpu);
            let why = match &no_gpu {
                Some(none) => format!("no CUDA device for candle: {e} ({none})"),
                None => format!("a CUDA device is there, but candle could not open it: {e}"),
            };
            let required = require || no_gpu.is_none();
            let why = if require { format!("DROPBLOCK_REQUIRE_GPU=1 but {why}") } else { why };
            checks.iter().map(|(name, _)| common::cannot_run(*name, why.clone(), required)).collect()
        }
    };
    libtest_mimic::run(&args, trials).exit();
}

fn eval_is_the_identity(device: &Device) -> R {
    let x = randn(&[2, 3, 9, 11], DType::BF16, device)?;
    let layer = DropBlock::new(paper(), SEED);
    assert_eq!(layer.forward_t(&x, false)?.id(), x.id());
    assert_eq!(layer.generator_state().offset, 0);
    Ok(())
}
