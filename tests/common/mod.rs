//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};

/// Deterministic test input: values in [-2, 2) with a few exact zeros.
pub fn input(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}
