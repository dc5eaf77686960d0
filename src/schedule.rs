//! Drop-rate schedules as pure functions of the training step, so they survive
//! checkpoint and resume (the peers keep the step in a Python attribute and lose it).

use crate::error::{Error, Result};

/// A probability ramped linearly over `n` steps, then held: the schedule of
/// miguelvr/dropblock's `LinearScheduler` and of the paper's TensorFlow code
/// (`compute_keep_prob`), which both index `numpy.linspace(start, stop, num=n)` by
/// the step. Step `i < n` gives `start + i·(stop − start)/(n − 1)`, computed as
/// numpy computes it (`i · step + start`, step `n − 1` exactly `stop`), so the
/// values equal numpy's bit for bit; from step `n − 1` on the last value holds.
/// With `n = 1` that value is `start`, as `linspace(start, stop, 1) == [start]`.
///
/// A keep-probability schedule ([`LinearSchedule::keep_prob`], the paper's
/// `1 → 0.9` ramp) is spaced in keep probability, as the TensorFlow code spaces it,
/// and its drop probability is `1 − keep`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    start: f64,
    stop: f64,
    n: u64,
    /// The values are keep probabilities (else drop probabilities).
    keep: bool,
}

fn check_prob(p: f64, err: fn(f64) -> Error) -> Result<f64> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(err(p))
    }
}

/// `numpy.linspace(start, stop, num=n)[i]` for `i < n`, by numpy's own steps.
fn linspace_at(start: f64, stop: f64, n: u64, i: u64) -> f64 {
    if n > 1 && i == n - 1 {
        return stop;
    }
    let (delta, y) = (stop - start, i as f64);
    let v = if n > 1 {
        let div = (n - 1) as f64;
        let step = delta / div;
        // numpy divides first when the step underflows to 0 (gh-5437).
        if step == 0.0 {
            y / div * delta
        } else {
            y * step
        }
    } else {
        y * delta
    };
    v + start
}

impl LinearSchedule {
    fn new(start: f64, stop: f64, n: u64, keep: bool) -> Result<Self> {
        if n == 0 {
            return Err(Error::EmptySchedule);
        }
        let err = if keep { Error::InvalidKeepProb } else { Error::InvalidDropProb };
        Ok(Self { start: check_prob(start, err)?, stop: check_prob(stop, err)?, n, keep })
    }

    /// Drop probabilities `linspace(start, stop, n)` (miguelvr's `LinearScheduler`;
    /// the paper ramps 0 → 0.1). Errors if a probability is outside `[0, 1]` or `n`
    /// is 0.
    pub fn drop_prob(start: f64, stop: f64, n: u64) -> Result<Self> {
        Self::new(start, stop, n, false)
    }

    /// Keep probabilities `linspace(start, stop, n)` (the paper's TensorFlow code
    /// ramps keep_prob 1 → 0.9). Errors as [`LinearSchedule::drop_prob`].
    pub fn keep_prob(start: f64, stop: f64, n: u64) -> Result<Self> {
        Self::new(start, stop, n, true)
    }

    /// The schedule's own value at `step`: a drop or a keep probability.
    fn value_at(&self, step: u64) -> f64 {
        linspace_at(self.start, self.stop, self.n, step.min(self.n - 1))
    }

    /// The drop probability at `step`.
    pub fn drop_prob_at(&self, step: u64) -> f64 {
        let v = self.value_at(step);
        if self.keep {
            1.0 - v
        } else {
            v
        }
    }

    /// The keep probability at `step`.
    pub fn keep_prob_at(&self, step: u64) -> f64 {
        let v = self.value_at(step);
        if self.keep {
            v
        } else {
            1.0 - v
        }
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
