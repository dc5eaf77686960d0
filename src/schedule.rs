//! Drop-rate schedules as pure functions of the training step, so they survive
//! checkpoint and resume (the peers keep the step in a Python attribute and lose it).

use crate::error::{Error, Result};

/// A drop probability that moves linearly from `start` to `stop` over `steps`
/// steps, then holds `stop`: `p(step) = start + (stop - start) · min(step, steps) / steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    start: f64,
    stop: f64,
    steps: u64,
}

fn check_prob(p: f64, err: fn(f64) -> Error) -> Result<f64> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(err(p))
    }
}

impl LinearSchedule {
    /// A schedule of drop probabilities (the paper ramps 0 → 0.1).
    pub fn drop_prob(start: f64, stop: f64, steps: u64) -> Result<Self> {
        Ok(Self {
            start: check_prob(start, Error::InvalidDropProb)?,
            stop: check_prob(stop, Error::InvalidDropProb)?,
            steps,
        })
    }

    /// A schedule of keep probabilities (the paper ramps keep_prob 1 → 0.9), stored
    /// as drop probabilities.
    pub fn keep_prob(start: f64, stop: f64, steps: u64) -> Result<Self> {
        Ok(Self {
            start: 1.0 - check_prob(start, Error::InvalidKeepProb)?,
            stop: 1.0 - check_prob(stop, Error::InvalidKeepProb)?,
            steps,
        })
    }

    /// The drop probability at `step`; `stop` from step `steps` on.
    pub fn drop_prob_at(&self, step: u64) -> f64 {
        if step >= self.steps {
            return self.stop;
        }
        let t = step as f64 / self.steps as f64;
        (self.start + (self.stop - self.start) * t).clamp(0.0, 1.0)
    }

    /// `1 - drop_prob_at(step)`.
    pub fn keep_prob_at(&self, step: u64) -> f64 {
        1.0 - self.drop_prob_at(step)
    }
}

/// The TF TPU reference's per-group keep probability: groups below the last get a
/// quarter of the drop rate per group, `keep_g = 1 - (1 - keep) / 4^(4 - g)`, for
/// ResNet groups `g` in 1..=4.
pub fn tpu_group_keep_prob(keep_prob: f64, group: u32) -> Result<f64> {
    check_prob(keep_prob, Error::InvalidKeepProb)?;
    if !(1..=4).contains(&group) {
        return Err(Error::InvalidGroup(group));
    }
    Ok(1.0 - (1.0 - keep_prob) / 4f64.powi(4 - group as i32))
}
