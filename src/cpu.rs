//! The CPU path: the complete 2D semantics, parallel over planes with rayon.
//!
//! It is the oracle that the CUDA path matches bit for bit, and a full fallback
//! where no GPU is present.

use rayon::prelude::*;

use crate::config::{DropBlockConfig, Mode, Normalize, Shape};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::BlockMasks;
use crate::rng::RngKey;
use crate::sampling::{count_scale, expected_scale, Plan};

/// What forward hands to backward: the block masks and the scale(s).
#[derive(Debug, Clone)]
pub struct Saved {
    shape: Shape,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Eval mode or `drop_prob == 0`: nothing drawn, factor 1 everywhere.
    Identity,
    Masked {
        plan: Box<Plan>,
        masks: BlockMasks,
        kept: u64,
        per_sample: bool,
        /// One scale, or one per sample under PerSample normalisation.
        scales: Vec<f32>,
    },
}

impl Saved {
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The plan of the call, or `None` when the call was an identity.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.state {
            State::Identity => None,
            State::Masked { plan, .. } => Some(plan),
        }
    }

    /// Kept elements over the whole tensor.
    pub fn kept(&self) -> u64 {
        match &self.state {
            State::Identity => self.shape.numel() as u64,
            State::Masked { kept, .. } => *kept,
        }
    }

    /// The realised dropped fraction, `1 - kept / numel`.
    pub fn drop_fraction(&self) -> f64 {
        1.0 - self.kept() as f64 / self.shape.numel() as f64
    }

    /// The scale applied to kept elements: one value, or one per sample under
    /// PerSample normalisation.
    pub fn scales(&self) -> &[f32] {
        match &self.state {
            State::Identity => &[1.0],
            State::Masked { scales, .. } => scales,
        }
    }

    /// Whether element `(n, c, h, w)` was kept.
    pub fn is_kept(&self, n: usize, c: usize, h: usize, w: usize) -> Result<bool> {
        let s = self.shape;
        for (what, value, len) in [("n", n, s.n()), ("c", c, s.c()), ("h", h, s.h()), ("w", w, s.w())] {
            if value >= len {
                return Err(Error::OutOfRange { what, value: value as u64, len: len as u64 });
            }
        }
        Ok(match &self.state {
            State::Identity => true,
            State::Masked { plan, masks, .. } => !masks.is_dropped(plan.plane_of(n, c), h * s.w() + w),
        })
    }

    /// The keep mask as u8 in NCHW order: 1 where the element was kept.
    pub fn keep_mask(&self) -> Vec<u8> {
        let s = self.shape;
        let mut out = vec![1u8; s.numel()];
        if let State::Masked { plan, masks, .. } = &self.state {
            out.par_chunks_mut(s.plane_len()).enumerate().for_each(|(slice, dst)| {
                let plane = plan.plane_of(slice / s.c(), slice % s.c());
                for (cell, v) in dst.iter_mut().enumerate() {
                    *v = !masks.is_dropped(plane, cell) as u8;
                }
            });
        }
        out
    }

    fn is_identity(&self) -> bool {
        matches!(self.state, State::Identity)
    }

    /// The dropped bits and the scale of `(n, c)` slice number `slice`.
    fn slice_factors(&self, slice: usize) -> (&[u64], f32) {
        match &self.state {
            State::Identity => unreachable!("identity calls copy instead"),
            State::Masked { plan, masks, per_sample, scales, .. } => {
                let (n, c) = (slice / self.shape.c(), slice % self.shape.c());
                let scale = if *per_sample { scales[n] } else { scales[0] };
                (masks.plane(plan.plane_of(n, c)), scale)
            }
        }
    }
}

/// Samples the masks and computes the scale(s), without touching any tensor.
pub fn sample(cfg: &DropBlockConfig, shape: Shape, key: RngKey, mode: Mode) -> Saved {
    if mode == Mode::Eval || cfg.is_identity() {
        return Saved { shape, state: State::Identity };
    }
    let plan = Plan::new(cfg, shape, key);
    let masks = BlockMasks::build(&plan);
    let (n, c, hw) = (shape.n(), shape.c(), shape.plane_len() as u64);
    let kept_per_sample: Vec<u64> =
        (0..n).map(|ni| (0..c).map(|ci| hw - masks.dropped(plan.plane_of(ni, ci))).sum()).collect();
    let kept: u64 = kept_per_sample.iter().sum();
    let per_sample = cfg.normalize() == Normalize::PerSample;
    let scales = match cfg.normalize() {
        Normalize::Global => vec![count_scale(shape.numel() as u64, kept)],
        Normalize::PerSample => kept_per_sample.iter().map(|&k| count_scale(c as u64 * hw, k)).collect(),
        Normalize::Expected => vec![expected_scale(cfg.drop_prob())],
        Normalize::None => vec![1.0],
    };
    Saved { shape, state: State::Masked { plan: Box::new(plan), masks, kept, per_sample, scales } }
}

/// Forward: `y = round(f32(x) · (kept ? scale : 0))`. Returns the state for backward.
pub fn forward<T: Element>(
    cfg: &DropBlockConfig,
    shape: Shape,
    key: RngKey,
    mode: Mode,
    x: &[T],
    y: &mut [T],
) -> Result<Saved> {
    shape.check_len("x", x.len())?;
    shape.check_len("y", y.len())?;
    let saved = sample(cfg, shape, key, mode);
    apply(&saved, x, y)?;
    Ok(saved)
}

/// Forward in place: `x` is overwritten with `y`.
pub fn forward_inplace<T: Element>(
    cfg: &DropBlockConfig,
    shape: Shape,
    key: RngKey,
    mode: Mode,
    x: &mut [T],
) -> Result<Saved> {
    shape.check_len("x", x.len())?;
    let saved = sample(cfg, shape, key, mode);
    apply_inplace(&saved, x)?;
    Ok(saved)
}

/// Backward: `dx = round(f32(dy) · factor)` with forward's factor per element.
pub fn backward<T: Element>(saved: &Saved, dy: &[T], dx: &mut [T]) -> Result<()> {
    apply(saved, dy, dx)
}

/// Backward in place: `dy` is overwritten with `dx`.
pub fn backward_inplace<T: Element>(saved: &Saved, dy: &mut [T]) -> Result<()> {
    apply_inplace(saved, dy)
}

/// `dst = src · factor`, elementwise, with the factors of `saved`.
pub fn apply<T: Element>(saved: &Saved, src: &[T], dst: &mut [T]) -> Result<()> {
    let shape = saved.shape;
    shape.check_len("input", src.len())?;
    shape.check_len("output", dst.len())?;
    if saved.is_identity() {
        dst.copy_from_slice(src);
        return Ok(());
    }
    dst.par_chunks_mut(shape.plane_len()).zip(src.par_chunks(shape.plane_len())).enumerate().for_each(|(i, (d, s))| {
        let (bits, scale) = saved.slice_factors(i);
        for_each_factor(bits, s.len(), scale, |j, f| d[j] = T::from_f32(s[j].to_f32() * f));
    });
    Ok(())
}

/// `data = data · factor`, elementwise, with the factors of `saved`.
pub fn apply_inplace<T: Element>(saved: &Saved, data: &mut [T]) -> Result<()> {
    let shape = saved.shape;
    shape.check_len("input", data.len())?;
    if saved.is_identity() {
        return Ok(());
    }
    data.par_chunks_mut(shape.plane_len()).enumerate().for_each(|(i, d)| {
        let (bits, scale) = saved.slice_factors(i);
        for_each_factor(bits, d.len(), scale, |j, f| d[j] = T::from_f32(d[j].to_f32() * f));
    });
    Ok(())
}

/// Calls `f(cell, factor)` for every cell of a slice: 0 where `dropped` has the
/// bit set, `scale` elsewhere.
#[inline(always)]
fn for_each_factor(dropped: &[u64], len: usize, scale: f32, mut f: impl FnMut(usize, f32)) {
    for (k, &word) in dropped.iter().enumerate() {
        let base = k * 64;
        let end = (base + 64).min(len);
        if word == 0 {
            (base..end).for_each(|j| f(j, scale));
        } else {
            (base..end).for_each(|j| f(j, if word >> (j - base) & 1 == 1 { 0.0 } else { scale }));
        }
    }
}
