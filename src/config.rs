//! What a DropBlock layer is: the block, the rate, and the named semantic choices on
//! which the peers disagree. Validated when built; every error names its argument.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The block, `(height, width)` before clipping. Each side is at least 1; odd,
/// even and rectangular blocks are all allowed. Per call it is clipped to the map:
/// `kh = min(height, H)`, `kw = min(width, W)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// Rows of the block, at least 1.
    pub height: u32,
    /// Columns of the block, at least 1.
    pub width: u32,
}

impl Block {
    /// A `height x width` block; errors ([`Error::InvalidBlock`]) if a side is 0.
    pub fn new(height: u32, width: u32) -> Result<Self> {
        if height == 0 {
            return Err(Error::InvalidBlock { axis: "height", value: height });
        }
        if width == 0 {
            return Err(Error::InvalidBlock { axis: "width", value: width });
        }
        Ok(Self { height, width })
    }

    /// A `size x size` block; errors if `size` is 0.
    pub fn square(size: u32) -> Result<Self> {
        Self::new(size, size)
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

/// Parses `7` (square) or `7x5` (height x width).
impl FromStr for Block {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parse = |t: &str| {
            let t = t.trim();
            t.parse::<u32>().map_err(|e| match e.kind() {
                std::num::IntErrorKind::PosOverflow => format!("block size `{t}` is over the largest, {}", u32::MAX),
                _ => format!("block size `{t}` is not a whole number"),
            })
        };
        let (h, w) = match s.split_once(['x', 'X']) {
            Some((h, w)) => (parse(h)?, parse(w)?),
            None => {
                let k = parse(s)?;
                (k, k)
            }
        };
        Block::new(h, w).map_err(|e| e.to_string())
    }
}

/// Where seeds may fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// Only where a whole block fits (the paper, torchvision, mmdet): an
    /// `(H-kh+1) x (W-kw+1)` seed grid; a seed at `(y, x)` drops `[y, y+kh) x [x, x+kw)`.
    #[default]
    Valid,
    /// Anywhere on the `H x W` map, blocks clipped at the edges, anchored as TF
    /// "SAME" pooling and timm >= 1.0.23: a seed at `y` drops rows
    /// `[y - kh/2, y - kh/2 + kh)`, likewise for columns.
    Anywhere,
}

/// How the seed rate γ follows from `drop_prob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GammaRule {
    /// The paper's Eq. 1 with the clipped block:
    /// `γ = gamma_scale · p·H·W / (kh·kw·(H-kh+1)·(W-kw+1))`.
    #[default]
    Paper,
    /// γ solved on the host so that the *expected* dropped fraction, counting block
    /// overlaps and clipped edges for this shape and placement, equals `drop_prob`
    /// exactly (then multiplied by `gamma_scale`).
    ExactRate,
}

/// Which `(n, c)` slices share one mask plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Sharing {
    /// A plane per `(n, c)`: the paper's Algorithm 1.
    #[default]
    None,
    /// A plane per sample, shared by its channels (miguelvr, timm >= 1.0.23 default).
    Channels,
    /// A plane per channel, shared by the batch (GluonCV, bunsen `batchwise`).
    Batch,
    /// One plane for the whole tensor.
    All,
}

impl Sharing {
    /// How many mask planes a tensor of `shape` has under this sharing.
    pub fn planes(&self, shape: Shape) -> u64 {
        let (n, c) = (shape.n() as u64, shape.c() as u64);
        match self {
            Sharing::None => n * c,
            Sharing::Channels => n,
            Sharing::Batch => c,
            Sharing::All => 1,
        }
    }
}

/// How kept activations are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Normalize {
    /// `numel / kept` over the whole tensor (every peer).
    #[default]
    Global,
    /// `C·H·W / kept_n` per sample.
    PerSample,
    /// `1 / (1 - drop_prob)`: no reduction, so on the GPU an unshared mask over
    /// enough planes (32 per SM), each small enough for a warp, takes a single fused pass.
    Expected,
    /// No rescaling.
    None,
}

/// Training applies DropBlock; evaluation returns the input unchanged and draws nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Draw a mask and apply it (the default).
    #[default]
    Train,
    /// Return the input unchanged; nothing is drawn.
    Eval,
}

/// A validated DropBlock configuration. Build it with [`DropBlockConfig::builder`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropBlockConfig {
    block: Block,
    drop_prob: f64,
    placement: Placement,
    gamma_rule: GammaRule,
    gamma_scale: f64,
    sharing: Sharing,
    normalize: Normalize,
}

impl DropBlockConfig {
    /// A builder with the paper's defaults: Valid placement, Paper γ, `gamma_scale`
    /// 1, a mask per channel, Global normalisation.
    pub fn builder(block: Block, drop_prob: f64) -> DropBlockConfigBuilder {
        DropBlockConfigBuilder {
            cfg: DropBlockConfig {
                block,
                drop_prob,
                placement: Placement::default(),
                gamma_rule: GammaRule::default(),
                gamma_scale: 1.0,
                sharing: Sharing::default(),
                normalize: Normalize::default(),
            },
        }
    }

    /// The paper's configuration for a square block.
    pub fn paper(block_size: u32, drop_prob: f64) -> Result<Self> {
        Self::builder(Block::square(block_size)?, drop_prob).build()
    }

    /// The block, before clipping to the map.
    pub fn block(&self) -> Block {
        self.block
    }
    /// The target fraction of activations to drop, in `[0, 1]`.
    pub fn drop_prob(&self) -> f64 {
        self.drop_prob
    }
    /// Where seeds may fall.
    pub fn placement(&self) -> Placement {
        self.placement
    }
    /// How γ follows from `drop_prob`.
    pub fn gamma_rule(&self) -> GammaRule {
        self.gamma_rule
    }
    /// The factor γ is multiplied by, finite and non-negative.
    pub fn gamma_scale(&self) -> f64 {
        self.gamma_scale
    }
    /// Which `(n, c)` slices share one mask plane.
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }
    /// How kept activations are rescaled.
    pub fn normalize(&self) -> Normalize {
        self.normalize
    }

    /// The same configuration with another `drop_prob` (for schedules).
    pub fn with_drop_prob(&self, drop_prob: f64) -> Result<Self> {
        DropBlockConfigBuilder { cfg: Self { drop_prob, ..*self } }.build()
    }

    /// True when a call draws nothing and returns its input: `drop_prob == 0`.
    pub fn is_identity(&self) -> bool {
        self.drop_prob == 0.0
    }
}

/// Builder for [`DropBlockConfig`]; `build` validates.
#[derive(Debug, Clone, Copy)]
pub struct DropBlockConfigBuilder {
    cfg: DropBlockConfig,
}

impl DropBlockConfigBuilder {
    /// Where seeds may fall; default [`Placement::Valid`].
    pub fn placement(mut self, v: Placement) -> Self {
        self.cfg.placement = v;
        self
    }
    /// How γ follows from `drop_prob`; default [`GammaRule::Paper`].
    pub fn gamma_rule(mut self, v: GammaRule) -> Self {
        self.cfg.gamma_rule = v;
        self
    }
    /// A factor on γ under either rule; default 1. Must be finite and
    /// non-negative (checked by `build`).
    pub fn gamma_scale(mut self, v: f64) -> Self {
        self.cfg.gamma_scale = v;
        self
    }
    /// Which `(n, c)` slices share one mask plane; default [`Sharing::None`] (a
    /// plane per slice).
    pub fn sharing(mut self, v: Sharing) -> Self {
        self.cfg.sharing = v;
        self
    }
    /// How kept activations are rescaled; default [`Normalize::Global`].
    pub fn normalize(mut self, v: Normalize) -> Self {
        self.cfg.normalize = v;
        self
    }

    /// The validated configuration. Errors if a block side is 0, `drop_prob` is not
    /// in `[0, 1]`, or `gamma_scale` is negative or not finite.
    pub fn build(self) -> Result<DropBlockConfig> {
        let c = self.cfg;
        Block::new(c.block.height, c.block.width)?;
        if !(0.0..=1.0).contains(&c.drop_prob) {
            return Err(Error::InvalidDropProb(c.drop_prob));
        }
        if !c.gamma_scale.is_finite() || c.gamma_scale < 0.0 {
            return Err(Error::InvalidGammaScale(c.gamma_scale));
        }
        Ok(c)
    }
}

/// An NCHW shape, validated: no zero dimension, every dimension fits the kernels'
/// 32-bit geometry, and the element count fits `usize` (64-bit indexing beyond 2^31).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl Shape {
    /// An `N x C x H x W` shape. Errors if a dimension is 0 or over `u32::MAX`, or
    /// if `N·C·H·W` does not fit `usize` and `i64::MAX`.
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        for (dim, v) in [("N", n), ("C", c), ("H", h), ("W", w)] {
            if v == 0 {
                return Err(Error::ZeroDimension { dim });
            }
            if v as u64 > u32::MAX as u64 {
                return Err(Error::DimensionTooLarge { dim, value: v as u64, max: u32::MAX as u64 });
            }
        }
        let overflow = || Error::ElementCountOverflow { n: n as u64, c: c as u64, h: h as u64, w: w as u64 };
        // numel must also fit i64-style 63-bit indexing on the device.
        let numel = n
            .checked_mul(c)
            .and_then(|v| v.checked_mul(h))
            .and_then(|v| v.checked_mul(w))
            .filter(|&v| v as u64 <= i64::MAX as u64)
            .ok_or_else(overflow)?;
        let _ = numel;
        Ok(Self { n, c, h, w })
    }

    /// Batch size N.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Channels C.
    pub fn c(&self) -> usize {
        self.c
    }
    /// Height H.
    pub fn h(&self) -> usize {
        self.h
    }
    /// Width W.
    pub fn w(&self) -> usize {
        self.w
    }
    /// `[N, C, H, W]`.
    pub fn dims(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    /// Elements of one `(n, c)` slice.
    pub fn plane_len(&self) -> usize {
        self.h * self.w
    }
    /// Elements of the whole tensor, `N·C·H·W`.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Errors unless a buffer of `len` elements, named `what` in the error, holds
    /// exactly this shape.
    pub fn check_len(&self, what: &'static str, len: usize) -> Result<()> {
        if len != self.numel() {
            return Err(Error::LengthMismatch { what, expected: self.numel(), actual: len });
        }
        Ok(())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}x{}", self.n, self.c, self.h, self.w)
    }
}

/// Names of the choices (the semantic options, the dtypes), as the CLI, the logs
/// and the kernel names spell them: `NAMES`, `name()`, `Display` and `FromStr`
/// from one table.
macro_rules! named_choices {
    ($($ty:ident { $($variant:ident = $name:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// Every accepted name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            /// The name of this choice, as [`Self::NAMES`] lists it.
            pub const fn name(&self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl ::std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> ::std::result::Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(format!("`{s}` is not one of: {}", Self::NAMES.join(", "))),
                }
            }
        }
    )+};
}
pub(crate) use named_choices;

named_choices! {
    Placement { Valid = "valid", Anywhere = "anywhere" }
    GammaRule { Paper = "paper", ExactRate = "exact" }
    Sharing { None = "none", Channels = "channels", Batch = "batch", All = "all" }
    Normalize { Global = "global", PerSample = "per-sample", Expected = "expected", None = "none" }
}

impl fmt::Display for DropBlockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block {}, drop_prob {}, placement {}, gamma {} (scale {}), share {}, normalize {}",
            self.block, self.drop_prob, self.placement, self.gamma_rule, self.gamma_scale, self.sharing, self.normalize
        )
    }
}
