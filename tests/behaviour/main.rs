//! The crate's behaviour on the CPU, one module per behaviour, linked as one test
//! binary: a binary per file linked the crate and its dependencies (candle's among
//! them) sixteen times over, which cost minutes and gigabytes of disk a build.
//! `cargo test --test behaviour drop_rate::` runs one behaviour.
//!
//! Kept apart, as binaries of their own: `memory` (its counting global allocator
//! must see no other test's allocations), `kernel_build` (the GPU bundle ships it),
//! and the tests with their own harness (`abi_bindings`, `fuzz`, `gpu_parity`,
//! `kernel_emulation`, `large_tensors`, `candle_cuda`).

#[path = "../common/mod.rs"]
mod common;

mod block_placement;
#[cfg(feature = "candle")]
mod candle_layer;
mod channels_last;
#[cfg(feature = "cli")]
mod cli;
mod drop_rate;
mod dtypes;
mod forward_backward;
mod noise_fill;
mod normalization;
mod philox;
mod reference;
mod sampler_statistics;
mod sampling_contract;
mod schedule;
mod shards;
mod validation;
