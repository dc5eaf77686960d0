//! What a DropBlock layer is: the block, the rate, and the named semantic choices on
//! which the peers disagree. Validated when built; every error names its argument.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The block's size along each spatial axis, before clipping: `(k)` in 1D,
/// `(kh, kw)` in 2D, `(kd, kh, kw)` in 3D, or one size `k` for every axis of any
/// rank ([`Block::uniform`], what `DropBlockConfig::paper` and the CLI's `--block 7`
/// give). Each size is at least 1; odd, even and unequal sizes are all allowed. A
/// block of a fixed rank only fits shapes of that spatial rank (else
/// [`Error::BlockRankMismatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// `(depth, height, width)`, the axes a rank-r block lacks set to 1.
    sizes: [u32; 3],
    /// 1, 2 or 3; 0 for a uniform block, which fits any rank.
    rank: u8,
}

const AXES: [&str; 3] = ["depth", "height", "width"];

impl Block {
    /// Sizes along the last `sizes.len()` (1..=3) axes, e.g. `[3, 7, 7]` for a 3D
    /// block. Errors with [`Error::InvalidBlock`] if a size is 0, and with
    /// [`Error::InvalidRank`] if the rank is not 1 to 3.
    pub fn from_sizes(sizes: &[u32]) -> Result<Self> {
        if !(1..=3).contains(&sizes.len()) {
            return Err(Error::InvalidRank { what: "block", rank: sizes.len() });
        }
        let mut all = [1u32; 3];
        all[3 - sizes.len()..].copy_from_slice(sizes);
        for (axis, &v) in AXES[3 - sizes.len()..].iter().zip(sizes) {
            if v == 0 {
                return Err(Error::InvalidBlock { axis, value: v });
            }
        }
        Ok(Self { sizes: all, rank: sizes.len() as u8 })
    }

    /// A 2D `height x width` block; errors if a side is 0.
    pub fn new(height: u32, width: u32) -> Result<Self> {
        Self::from_sizes(&[height, width])
    }

    /// A 2D `size x size` block; errors if `size` is 0.
    pub fn square(size: u32) -> Result<Self> {
        Self::new(size, size)
    }

    /// `size` along every spatial axis of whatever rank the call has (torchvision's
    /// and miguelvr's single `block_size`); errors if `size` is 0.
    pub fn uniform(size: u32) -> Result<Self> {
        if size == 0 {
            return Err(Error::InvalidBlock { axis: "size", value: 0 });
        }
        Ok(Self { sizes: [size; 3], rank: 0 })
    }

    /// The block's spatial rank, or `None` for a uniform block.
    pub fn rank(&self) -> Option<usize> {
        (self.rank > 0).then_some(self.rank as usize)
    }

    /// `(depth, height, width)` for shapes of spatial rank `rank` (1..=3), the axes
    /// it lacks set to 1. Errors if a block of a fixed rank meets another rank.
    pub fn sizes_for(&self, rank: usize) -> Result<[u32; 3]> {
        match self.rank() {
            _ if !(1..=3).contains(&rank) => Err(Error::InvalidRank { what: "tensor", rank }),
            Some(r) if r != rank => Err(Error::BlockRankMismatch { block: r, shape: rank }),
            _ => {
                let mut s = self.sizes;
                s[..3 - rank].fill(1);
                Ok(s)
            }
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank() {
            None => write!(f, "{}", self.sizes[2]),
            Some(r) => {
                let s: Vec<String> = self.sizes[3 - r..].iter().map(u32::to_string).collect();
                f.write_str(&s.join("x"))
            }
        }
    }
}

/// Parses `7` (that size on every axis, [`Block::uniform`]), `7x5` (2D, height x
/// width) or `3x7x7` (3D, depth x height x width).
impl FromStr for Block {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let sizes = s
            .split(['x', 'X'])
            .map(|t| {
                let t = t.trim();
                t.parse::<u32>().map_err(|e| match e.kind() {
                    std::num::IntErrorKind::PosOverflow => {
                        format!("block size `{t}` is over the largest, {}", u32::MAX)
                    }
                    _ => format!("block size `{t}` is not a whole number"),
                })
            })
            .collect::<std::result::Result<Vec<u32>, String>>()?;
        match sizes.as_slice() {
            [k] => Block::uniform(*k),
            _ => Block::from_sizes(&sizes),
        }
        .map_err(|e| e.to_string())
    }
}

/// Where seeds may fall. Per spatial axis of size `S` with block size `k`, clipped
/// to `kc = min(k, S)`:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// Only where a whole block fits (the paper, torchvision, mmdet, DHZS): `S - kc + 1`
    /// seed positions; a seed at `i` drops `[i, i + kc)`.
    #[default]
    Valid,
    /// Anywhere on the map, `S` seed positions, blocks clipped at the edges and
    /// anchored as [`Anchor`] says.
    Anywhere,
}

/// How a block sits on its seed under [`Placement::Anywhere`]; the two differ
/// for even sizes only (and for blocks larger than the map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Anchor {
    /// TF "SAME" pooling, as in the TPU reference, keras-cv and timm >= 1.0.23: the
    /// block is clipped to the map first, then a seed at `i` drops
    /// `[i - kc/2, i - kc/2 + kc)`.
    #[default]
    Centered,
    /// miguelvr/dropblock's max-pool with padding `k/2` and the last row cropped: a
    /// seed at `i` drops `[i - (k-1)/2, i + k/2]` with the *unclipped* `k`, clipped
    /// to the map afterwards.
    CenteredRight,
}

/// How the seed rate γ follows from `drop_prob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GammaRule {
    /// The paper's Eq. 1 with the clipped block, over every spatial axis:
    /// `γ = gamma_scale · p·∏S / (∏kc · ∏(S-kc+1))` (in 2D
    /// `p·H·W / (kh·kw·(H-kh+1)·(W-kw+1))`, in 3D torchvision's `drop_block3d`).
    #[default]
    Paper,
    /// γ solved on the host so that the *expected* dropped fraction, counting block
    /// overlaps and clipped edges for this shape and placement, equals `drop_prob`
    /// exactly (then multiplied by `gamma_scale`).
    ExactRate,
    /// miguelvr/dropblock's `γ = gamma_scale · p / ∏k` with the unclipped block
    /// (`p / k²` in 2D, `p / k³` in 3D).
    PerBlock,
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
    /// `C·L / kept_n` per sample (`L` the elements of one slice, e.g. `H·W`).
    PerSample,
    /// `1 / (1 - drop_prob)`: no reduction, so on the GPU a channels-first call
    /// with zero fill and no sharing, whose planes fit a tile of shared memory and
    /// make at least a tile per multiprocessor, takes a single fused pass.
    Expected,
    /// No rescaling.
    None,
}

/// What dropped units become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fill {
    /// Zero (the paper, and every peer by default).
    #[default]
    Zero,
    /// Standard normal noise, and kept units are not rescaled (timm's
    /// `with_noise`; needs [`Normalize::None`]). Units that share a mask plane share
    /// their noise. The values are specified by the contract (`crate::noise`) and
    /// agree between the CPU and the GPU bit for bit.
    Noise,
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
    anchor: Anchor,
    gamma_rule: GammaRule,
    gamma_scale: f64,
    sharing: Sharing,
    normalize: Normalize,
    fill: Fill,
}

impl DropBlockConfig {
    /// A builder with the paper's defaults: Valid placement (the Centered anchor,
    /// which Valid does not read), Paper γ, `gamma_scale` 1, a mask per `(n, c)`
    /// slice (`Sharing::None`), Global normalisation, Zero fill.
    pub fn builder(block: Block, drop_prob: f64) -> DropBlockConfigBuilder {
        DropBlockConfigBuilder {
            cfg: DropBlockConfig {
                block,
                drop_prob,
                placement: Placement::default(),
                anchor: Anchor::default(),
                gamma_rule: GammaRule::default(),
                gamma_scale: 1.0,
                sharing: Sharing::default(),
                normalize: Normalize::default(),
                fill: Fill::default(),
            },
        }
    }

    /// The paper's configuration with `block_size` along every spatial axis.
    pub fn paper(block_size: u32, drop_prob: f64) -> Result<Self> {
        Self::builder(Block::uniform(block_size)?, drop_prob).build()
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
    /// How blocks sit on their seeds under Anywhere placement.
    pub fn anchor(&self) -> Anchor {
        self.anchor
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
    /// What dropped units become.
    pub fn fill(&self) -> Fill {
        self.fill
    }

    /// The same configuration with another `drop_prob` (for schedules).
    pub fn with_drop_prob(&self, drop_prob: f64) -> Result<Self> {
        DropBlockConfigBuilder { cfg: Self { drop_prob, ..*self } }.build()
    }

    /// A builder starting from this configuration, to change some of it.
    pub fn to_builder(&self) -> DropBlockConfigBuilder {
        DropBlockConfigBuilder { cfg: *self }
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
    /// How blocks sit on their seeds under Anywhere placement; default
    /// [`Anchor::Centered`].
    pub fn anchor(mut self, v: Anchor) -> Self {
        self.cfg.anchor = v;
        self
    }
    /// How γ follows from `drop_prob`; default [`GammaRule::Paper`].
    pub fn gamma_rule(mut self, v: GammaRule) -> Self {
        self.cfg.gamma_rule = v;
        self
    }
    /// A factor on γ under every rule; default 1. Must be finite and
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

    /// What dropped units become; default [`Fill::Zero`].
    pub fn fill(mut self, v: Fill) -> Self {
        self.cfg.fill = v;
        self
    }

    /// The validated configuration. Errors if `drop_prob` is not in `[0, 1]`,
    /// `gamma_scale` is negative or not finite, or noise fill meets a normalisation
    /// other than `None` (a [`Block`] is valid when made).
    pub fn build(self) -> Result<DropBlockConfig> {
        let c = self.cfg;
        if c.fill == Fill::Noise && c.normalize != Normalize::None {
            return Err(Error::NoiseWithRescale(c.normalize.name()));
        }
        if !(0.0..=1.0).contains(&c.drop_prob) {
            return Err(Error::InvalidDropProb(c.drop_prob));
        }
        if !c.gamma_scale.is_finite() || c.gamma_scale < 0.0 {
            return Err(Error::InvalidGammaScale(c.gamma_scale));
        }
        Ok(c)
    }
}

/// How a tensor's elements lie in memory. The mask is defined on logical
/// coordinates `(n, c, spatial...)`, so a channels-last call drops exactly the units
/// that the channels-first call of the same logical tensor drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `N, C, spatial...` (NCL, NCHW, NCDHW): PyTorch's default.
    #[default]
    ChannelsFirst,
    /// `N, spatial..., C` (NLC, NHWC, NDHWC): TensorFlow's default and PyTorch's
    /// `channels_last` memory format.
    ChannelsLast,
}

/// A validated shape: the logical dimensions `(N, C, L)`, `(N, C, H, W)` or
/// `(N, C, D, H, W)` (spatial rank 1, 2 or 3) and the [`Layout`] of the buffers.
/// No dimension is zero, every one fits the kernels' 32-bit geometry, and the
/// element count fits `usize` and 63-bit device indexing.
///
/// Lower ranks are the 3D geometry with unit axes in front: a 1D length is the
/// width of a `1 x 1 x L` volume, a 2D map a `1 x H x W` one, so one
/// implementation serves every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// `[N, C, dims...]`, then zeros past `2 + rank`.
    dims: [usize; 5],
    rank: u8,
    layout: Layout,
}

impl Shape {
    /// An `N x C x H x W` shape. Errors if a dimension is 0 or over `u32::MAX`, or
    /// if the element count does not fit `usize` and `i64::MAX`.
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        Self::from_dims(&[n, c, h, w])
    }

    /// An `N x C x L` shape (sequences); errors as [`Shape::new`].
    pub fn new_1d(n: usize, c: usize, l: usize) -> Result<Self> {
        Self::from_dims(&[n, c, l])
    }

    /// An `N x C x D x H x W` shape (volumes, video); errors as [`Shape::new`].
    pub fn new_3d(n: usize, c: usize, d: usize, h: usize, w: usize) -> Result<Self> {
        Self::from_dims(&[n, c, d, h, w])
    }

    /// The shape of a channels-first array of dimensions `dims`: 3, 4 or 5 of them
    /// (spatial rank 1, 2 or 3), else [`Error::InvalidRank`].
    pub fn from_dims(dims: &[usize]) -> Result<Self> {
        let names: &[&'static str] = match dims.len() {
            3 => &["N", "C", "L"],
            4 => &["N", "C", "H", "W"],
            5 => &["N", "C", "D", "H", "W"],
            _ => return Err(Error::InvalidRank { what: "tensor", rank: dims.len().saturating_sub(2) }),
        };
        for (&dim, &v) in names.iter().zip(dims) {
            if v == 0 {
                return Err(Error::ZeroDimension { dim });
            }
            if v as u64 > u32::MAX as u64 {
                return Err(Error::DimensionTooLarge { dim, value: v as u64, max: u32::MAX as u64 });
            }
        }
        // The element count must also fit 63-bit indexing on the device.
        dims.iter()
            .try_fold(1usize, |acc, &v| acc.checked_mul(v))
            .filter(|&v| v as u64 <= i64::MAX as u64)
            .ok_or_else(|| Error::ElementCountOverflow { dims: dims.iter().map(|&v| v as u64).collect() })?;
        let mut all = [0usize; 5];
        all[..dims.len()].copy_from_slice(dims);
        Ok(Self { dims: all, rank: (dims.len() - 2) as u8, layout: Layout::ChannelsFirst })
    }

    /// The same logical shape with buffers in `layout`.
    pub fn with_layout(self, layout: Layout) -> Self {
        Self { layout, ..self }
    }

    /// How the buffers of a call on this shape lie in memory.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The dimensions in memory order: `[N, C, spatial...]` channels-first,
    /// `[N, spatial..., C]` channels-last.
    pub fn physical_dims(&self) -> Vec<usize> {
        let mut d = self.dims().to_vec();
        if self.layout == Layout::ChannelsLast {
            d[1..].rotate_left(1);
        }
        d
    }

    /// Batch size N.
    pub fn n(&self) -> usize {
        self.dims[0]
    }
    /// Channels C.
    pub fn c(&self) -> usize {
        self.dims[1]
    }
    /// The spatial rank: 1, 2 or 3.
    pub fn spatial_rank(&self) -> usize {
        self.rank as usize
    }
    /// The spatial dimensions as a volume `[D, H, W]`, the axes the rank lacks
    /// set to 1 (a 1D length is W).
    pub fn volume(&self) -> [usize; 3] {
        let r = self.spatial_rank();
        let mut v = [1usize; 3];
        v[3 - r..].copy_from_slice(&self.dims[2..2 + r]);
        v
    }
    /// Depth D (1 below rank 3).
    pub fn d(&self) -> usize {
        self.volume()[0]
    }
    /// Height H (1 in 1D).
    pub fn h(&self) -> usize {
        self.volume()[1]
    }
    /// Width W (the length L in 1D).
    pub fn w(&self) -> usize {
        self.volume()[2]
    }
    /// `[N, C, spatial...]`: 3, 4 or 5 dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..2 + self.spatial_rank()]
    }
    /// Elements of one `(n, c)` slice: the product of the spatial dimensions.
    pub fn plane_len(&self) -> usize {
        self.volume().iter().product()
    }
    /// Elements of the whole tensor.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
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

/// `N x C x ...`, e.g. `8x64x56x56`, with ` channels-last` after a channels-last one.
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.dims().iter().map(usize::to_string).collect();
        f.write_str(&s.join("x"))?;
        match self.layout {
            Layout::ChannelsFirst => Ok(()),
            Layout::ChannelsLast => f.write_str(" channels-last"),
        }
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
    Anchor { Centered = "centered", CenteredRight = "centered-right" }
    GammaRule { Paper = "paper", ExactRate = "exact", PerBlock = "per-block" }
    Sharing { None = "none", Channels = "channels", Batch = "batch", All = "all" }
    Normalize { Global = "global", PerSample = "per-sample", Expected = "expected", None = "none" }
    Layout { ChannelsFirst = "channels-first", ChannelsLast = "channels-last" }
    Fill { Zero = "zero", Noise = "noise" }
}

impl fmt::Display for DropBlockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block {}, drop_prob {}, placement {}{}, gamma {} (scale {}), share {}, normalize {}, fill {}",
            self.block,
            self.drop_prob,
            self.placement,
            if self.placement == Placement::Anywhere { format!(" ({})", self.anchor) } else { String::new() },
            self.gamma_rule,
            self.gamma_scale,
            self.sharing,
            self.normalize,
            self.fill
        )
    }
}
