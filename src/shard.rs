//! Shards: one device's or process's part of a tensor that is split across many.
//!
//! The mask of a call is a pure function of the configuration, the *global* logical
//! shape, the key and the global coordinates, so a shard computes exactly its
//! part of the unsharded call's mask with no communication: it samples the
//! windows that can hold a seed whose block reaches into the shard (its own seed
//! cells plus a halo of up to `k - 1` on each spatial axis) and grows those seeds,
//! clipped to the shard. Only the kept counts that Global and PerSample
//! normalisation divide by span shards; they travel in a [`ShardCounts`] layout
//! that the shards sum element-wise (an all-reduce), after which every shard
//! computes the same scale from the same integers (f64 division, rounded to f32,
//! as [`count_scale`](crate::sampling::count_scale)).
//!
//! Expected and None normalisation need no counts: they scale without limit.
//!
//! # Data-parallel keys
//!
//! To reproduce the single-process masks of a global batch of `R·B` samples on `R`
//! ranks of `B` samples each, every rank uses **the same key** and describes its
//! batch as [`Shard::samples`]`(global, r·B, B)`: rank `r` then draws exactly the
//! masks of global samples `[r·B, (r+1)·B)`, whatever `R`. PerSample and Expected
//! normalisation stay rank-local (a sample lies on one rank); Global sums counts.
//!
//! Ranks that should draw *independent* masks instead (a different mask for each
//! rank's samples with no relation to a single-process run) derive a key each with
//! [`RngKey::fork`](crate::RngKey::fork)`(r)` and call on their local shape.

use crate::abi;
use crate::config::Shape;
use crate::error::{Error, Result};
use crate::sampling::Plan;

/// A box of a global tensor: the global logical shape and, along `N`, `C` and each
/// spatial axis, this shard's offset and extent. The local buffers hold exactly
/// the box, in the global shape's [`Layout`](crate::Layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    global: Shape,
    /// Offsets along `[N, C, D, H, W]` (unit axes of lower ranks at 0).
    offset: [usize; 5],
    local: Shape,
}

const AXES: [&str; 5] = ["N", "C", "spatial 0", "spatial 1", "spatial 2"];

impl Shard {
    /// The shard of `global` starting at `offset` with `extent` elements along each
    /// of its dimensions (`[n, c, spatial...]`, as [`Shape::dims`]). Errors when a
    /// list has the wrong length, an extent is 0 or a box passes the tensor's end.
    pub fn new(global: Shape, offset: &[usize], extent: &[usize]) -> Result<Self> {
        let dims = global.dims();
        for (what, list) in [("shard offset", offset), ("shard extent", extent)] {
            if list.len() != dims.len() {
                return Err(Error::LengthMismatch { what, expected: dims.len(), actual: list.len() });
            }
        }
        for (i, ((&o, &e), &len)) in offset.iter().zip(extent).zip(dims).enumerate() {
            if e == 0 || o.checked_add(e).is_none_or(|end| end > len) {
                return Err(Error::InvalidShard { axis: AXES[i], offset: o as u64, extent: e as u64, len: len as u64 });
            }
        }
        let local = Shape::from_dims(extent)?.with_layout(global.layout());
        Ok(Self { global, offset: to_volume(global, offset), local })
    }

    /// The whole tensor as one shard.
    pub fn whole(global: Shape) -> Self {
        Self { global, offset: [0; 5], local: global }
    }

    /// Samples `[first, first + count)` of `global`, every channel and cell: a
    /// data-parallel rank's part of the global batch (see the module docs).
    pub fn samples(global: Shape, first: usize, count: usize) -> Result<Self> {
        let mut offset = vec![0; global.dims().len()];
        let mut extent = global.dims().to_vec();
        offset[0] = first;
        extent[0] = count;
        Self::new(global, &offset, &extent)
    }

    /// The logical shape of the whole tensor.
    pub fn global(&self) -> Shape {
        self.global
    }

    /// The shape of this shard's buffers (the box's extents, the global layout).
    pub fn local(&self) -> Shape {
        self.local
    }

    /// The box's offsets along the global shape's dimensions (as [`Shape::dims`]).
    pub fn offset(&self) -> Vec<usize> {
        let r = self.global.spatial_rank();
        let mut o = vec![self.offset[0], self.offset[1]];
        o.extend_from_slice(&self.offset[5 - r..]);
        o
    }

    /// Whether the shard is the whole tensor.
    pub fn is_whole(&self) -> bool {
        self.local == self.global
    }

    /// What the shard kernels receive: the shard's parameters (its box, seed box,
    /// runs and windows) and the geometry of its own planes for the element passes
    /// (its N, C and box, the global sharing). For the CUDA path and tests of the
    /// kernels off the GPU.
    #[doc(hidden)]
    pub fn kernel_params(&self, plan: &Plan) -> Result<(abi::DropBlockShard, abi::DropBlockGeometry)> {
        let g = plan.geometry();
        let seed_box = SeedBox::new(plan, self)?;
        let planes = self.local_planes(g.sharing) as u64;
        let (n, c) = (self.local.n(), self.local.c());
        let whole_box = self.box_params();
        let run_planes = if g.sharing == abi::DROPBLOCK_SHARE_NONE && c != self.global.c() { c as u64 } else { planes };
        let small = g.seed_cells <= abi::DROPBLOCK_WINDOW_CELLS as u64;
        let q = g.planes_per_window as u64;
        let (part_lo, part_hi) = match (seed_box.parts.first(), seed_box.parts.last()) {
            (Some(first), Some(last)) => (first.start, last.end),
            _ => (0, 0),
        };
        let shard = abi::DropBlockShard {
            seed_lo: seed_box.seeds.map(|(lo, _)| lo),
            seed_hi: seed_box.seeds.map(|(_, hi)| hi),
            planes,
            run_planes,
            // A run of r planes from any plane spans at most (r - 1) / q + 2 windows.
            windows_per_run: if small { (run_planes - 1) / q + 2 } else { 0 },
            part_lo,
            part_hi,
            ..whole_box
        };
        let [d, h, w] = seed_box.extent;
        let local = abi::DropBlockGeometry { n: n as u32, c: c as u32, d, h, w, planes, ..*g };
        Ok((shard, local))
    }

    /// The kernels' shard parameters that need no plan: the box and the global
    /// sizes (what an identity call's counts need); the sampling fields are 0.
    #[doc(hidden)]
    pub fn box_params(&self) -> abi::DropBlockShard {
        abi::DropBlockShard {
            n0: self.offset[0] as u32,
            c0: self.offset[1] as u32,
            n: self.local.n() as u32,
            c: self.local.c() as u32,
            origin: self.volume_offset().map(|v| v as u32),
            extent: self.local.volume().map(|v| v as u32),
            global_numel: self.global.numel() as u64,
            global_sample: (self.global.c() * self.global.plane_len()) as u64,
            box_tag: self.box_tag(),
            sample_tag: coverage_tag(self.global, &[0; 5]),
            ..Default::default()
        }
    }

    /// The coverage tag of one of the box's samples ([`ShardCounts`]).
    pub(crate) fn box_tag(&self) -> u64 {
        coverage_tag(self.local, &self.offset)
    }

    /// The box's first sample.
    pub(crate) fn first_sample(&self) -> usize {
        self.offset[0]
    }
    /// The box's offsets along `[D, H, W]`.
    pub(crate) fn volume_offset(&self) -> [usize; 3] {
        [self.offset[2], self.offset[3], self.offset[4]]
    }

    /// The global mask plane of local slice `(n, c)`.
    pub(crate) fn global_plane(&self, plan: &Plan, n: usize, c: usize) -> usize {
        let g = plan.geometry();
        crate::sampling::plane_of(g.sharing, g.c as usize, self.offset[0] + n, self.offset[1] + c)
    }

    /// The shard's own mask planes: those of its slices, numbered as
    /// [`Plan::plane_of`] numbers a tensor of the local shape's `N` and `C`.
    pub(crate) fn local_planes(&self, sharing: u32) -> usize {
        // Planes are numbered densely from 0 in slice order (shapes have no empty
        // axis), so the last slice's plane is the last plane.
        self.local_plane(sharing, self.local.n() - 1, self.local.c() - 1) + 1
    }

    /// The local plane of local slice `(n, c)`.
    #[inline]
    pub(crate) fn local_plane(&self, sharing: u32, n: usize, c: usize) -> usize {
        crate::sampling::plane_of(sharing, self.local.c(), n, c)
    }

    /// The global plane of local plane `plane`, and how many local planes from it on
    /// have consecutive global planes (a whole sample's channels, or all of them
    /// when the shard holds every channel or shares masks across channels).
    pub(crate) fn global_run(&self, plan: &Plan, plane: usize) -> (u64, usize) {
        let g = plan.geometry();
        let cl = self.local.c();
        let run =
            if g.sharing == abi::DROPBLOCK_SHARE_NONE && cl != self.global.c() { cl - plane % cl } else { usize::MAX };
        (self.global_plane_of_local(plan, plane) as u64, run)
    }

    /// The global plane of local plane `plane`.
    pub(crate) fn global_plane_of_local(&self, plan: &Plan, plane: usize) -> usize {
        let g = plan.geometry();
        let cl = self.local.c();
        let (n, c) = match g.sharing {
            abi::DROPBLOCK_SHARE_NONE => (plane / cl, plane % cl),
            abi::DROPBLOCK_SHARE_CHANNELS => (plane, 0),
            abi::DROPBLOCK_SHARE_BATCH => (0, plane),
            _ => (0, 0),
        };
        self.global_plane(plan, n, c)
    }

    /// The global cell of local cell `cell` (row-major over the local volume).
    pub(crate) fn global_cell(&self, cell: usize) -> usize {
        let [_, h, w] = self.local.volume();
        let [_, gh, gw] = self.global.volume();
        let [oz, oy, ox] = self.volume_offset();
        let (z, rest) = (cell / (h * w), cell % (h * w));
        ((oz + z) * gh + oy + rest / w) * gw + ox + rest % w
    }
}

/// The coverage tag of the box of one sample of `extent`'s channels and volume
/// at `offset` (`[N, C, D, H, W]`, N ignored): the wrapping sum over its
/// elements `(c, d, h, w)` of `w_C(c)·w_D(d)·w_H(h)·w_W(w)`, which is the product
/// of the four axes' sums of weights. An axis's weights are the steps of a
/// pseudo-random walk, `w_a(i) = F_a(i + 1) - F_a(i)`, so the sum over a range is
/// `F_a(end) - F_a(start)`: constant time for any box, where the walk's values
/// (a hash of axis and position) make the weights behave as independent random
/// 64-bit values. The tags of some boxes of a sample therefore sum to the whole
/// sample's tag when the boxes cover each element once, and for any other
/// multiset of boxes (one counted twice and one of as many elements missing, as
/// a faulty reduction gives) only by a coincidence of 64-bit values.
fn coverage_tag(extent: Shape, offset: &[usize; 5]) -> u64 {
    // splitmix64's finaliser, a bijection: distinct (axis, position) pairs get
    // distinct walk values.
    fn walk(axis: u64, i: usize) -> u64 {
        let mut z = (i as u64).wrapping_mul(4).wrapping_add(axis) ^ 0x9e37_79b9_7f4a_7c15;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let [d, h, w] = extent.volume();
    let lens = [extent.c(), d, h, w];
    (lens.iter().zip(&offset[1..]).enumerate())
        .map(|(axis, (&len, &o))| walk(axis as u64, o + len).wrapping_sub(walk(axis as u64, o)))
        .fold(1u64, u64::wrapping_mul)
}

/// `[n, c, spatial...]` as `[N, C, D, H, W]` with unit axes at 0.
fn to_volume(shape: Shape, v: &[usize]) -> [usize; 5] {
    let r = shape.spatial_rank();
    let mut out = [0; 5];
    out[..2].copy_from_slice(&v[..2]);
    out[5 - r..].copy_from_slice(&v[2..]);
    out
}

/// The kept counts of a shard, in the layout every shard shares so that an
/// element-wise sum over shards (an all-reduce) gives the global counts:
/// `[kept over the whole tensor, kept in sample 0, ..., kept in sample N-1,
/// covered of sample 0, ..., covered of sample N-1, tag of sample 0, ..., tag of
/// sample N-1]`, `N` the *global* batch, each entry the shard's part (0 for
/// samples it does not hold).
///
/// A sample's covered entry counts the shard's elements of it, and its tag entry
/// is a 64-bit checksum of which elements they are (a sum of pseudo-random
/// weights of their coordinates, wrapping). Summed over every shard that holds
/// the sample, once each, they are the sample's `C·L` and its whole tag. That is
/// how a scale that divides by the kept counts
/// ([`Normalize::Global`](crate::Normalize): every sample's; `PerSample`: the
/// shard's own) knows they are whole: not one shard's part, not a reduction that
/// missed a shard, nor one that counted a shard twice and missed another of as
/// many elements. Tags wrap, so a reduction must sum them modulo 2^64, as NCCL's
/// and [`ShardCounts::add`] do; the other entries never wrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardCounts(pub(crate) Vec<u64>);

impl ShardCounts {
    /// Entries of the counts of a global shape: `1 + 3N`.
    pub fn len_for(global: Shape) -> usize {
        Self::len_for_samples(global.n())
    }

    /// Entries of the counts of a global batch of `n` samples.
    pub(crate) fn len_for_samples(n: usize) -> usize {
        1 + 3 * n
    }

    /// Counts from their entries (after a reduction). Errors unless there are
    /// `1 + 3N` of them for `global` and some shards of `global` could have them
    /// ([`ShardCounts::check`]).
    pub fn from_entries(global: Shape, entries: Vec<u64>) -> Result<Self> {
        let counts = Self(entries);
        counts.check(global)?;
        Ok(counts)
    }

    /// Errors unless these counts could be the sum of some shards' of `global`:
    /// `1 + 3N` entries, no sample covered past its `C·L` elements nor keeping
    /// more than is covered, and the total the samples' sum. A scale computed
    /// from any other counts (a faulty reduction, the counts of another shape, a
    /// shard counted twice) would be wrong without a sign. Whether they are the
    /// sum of every shard, once each, is [`ShardCounts::check_covered`].
    pub fn check(&self, global: Shape) -> Result<()> {
        let expected = Self::len_for(global);
        if self.0.len() != expected {
            return Err(Error::LengthMismatch { what: "shard counts", expected, actual: self.0.len() });
        }
        let per = (global.c() * global.plane_len()) as u64;
        let samples = self.per_sample().iter().zip(self.covered());
        if let Some((n, (kept, covered))) = samples.enumerate().find(|(_, (&k, &c))| c > per || k > c) {
            return Err(Error::ImpossibleShardCounts(format!(
                "sample {n} keeps {kept} of {covered} elements covered, of its {per} ({global}): a shard counted \
                 twice, or another shape's counts"
            )));
        }
        // At most N·C·L, which fits: the shape's element count does.
        let sum: u64 = self.per_sample().iter().sum();
        if sum != self.total() {
            return Err(Error::ImpossibleShardCounts(format!(
                "the total {} is not the samples' sum {sum}",
                self.total()
            )));
        }
        Ok(())
    }

    /// Errors unless these counts ([`ShardCounts::check`]ed) cover every element
    /// of `samples` of `global` once: summed over every shard that holds them,
    /// each once, as a scale that divides by their kept counts needs. A shard's
    /// own counts of samples other shards share, or a reduction that missed a
    /// shard, cover less; one that counted a shard twice and missed another of
    /// as many elements covers as many elements, but not the same ones (the tag
    /// differs).
    pub fn check_covered(&self, global: Shape, samples: std::ops::Range<usize>) -> Result<()> {
        self.check(global)?;
        let per = (global.c() * global.plane_len()) as u64;
        let out_of_range = Error::OutOfRange { what: "n", value: samples.end as u64, len: global.n() as u64 };
        let covered = self.covered().get(samples.clone()).ok_or(out_of_range)?;
        if let Some((i, c)) = covered.iter().enumerate().find(|&(_, &c)| c != per) {
            return Err(Error::ImpossibleShardCounts(format!(
                "sample {} is covered by {c} of its {per} elements ({global}): the counts are not summed over every \
                 shard",
                samples.start + i
            )));
        }
        let whole = coverage_tag(global, &[0; 5]);
        if let Some(i) = self.tags()[samples.clone()].iter().position(|&t| t != whole) {
            return Err(Error::ImpossibleShardCounts(format!(
                "sample {} is covered by {per} elements ({global}) but not each once (its tag is not the whole \
                 sample's): the reduction counted a shard twice and missed another, or did not sum the tags as u64 \
                 modulo 2^64",
                samples.start + i
            )));
        }
        Ok(())
    }

    /// The entries, `[total, kept of each sample, covered of each sample, tag of
    /// each sample]`.
    pub fn entries(&self) -> &[u64] {
        &self.0
    }

    /// Adds `other`'s entries into these: the reduction of two shards' counts
    /// (tags modulo 2^64). Errors, leaving these as they were, when the lengths
    /// differ or a count overflows (which the counts of one tensor's shards
    /// cannot: summed, each is at most the tensor's elements, under 2^63; counts
    /// that overlap many times can).
    pub fn add(&mut self, other: &ShardCounts) -> Result<()> {
        if other.0.len() != self.0.len() {
            return Err(Error::LengthMismatch { what: "shard counts", expected: self.0.len(), actual: other.0.len() });
        }
        let tags = 1 + 2 * self.samples();
        let sum = (self.0.iter().zip(&other.0).enumerate())
            .map(|(i, (a, b))| if i < tags { a.checked_add(*b) } else { Some(a.wrapping_add(*b)) })
            .collect::<Option<Vec<u64>>>();
        self.0 = sum.ok_or_else(|| Error::ImpossibleShardCounts("an entry of the sum overflows u64".into()))?;
        Ok(())
    }

    /// Kept elements over the tensor.
    pub fn total(&self) -> u64 {
        self.0[0]
    }

    /// Kept elements of each sample.
    pub fn per_sample(&self) -> &[u64] {
        &self.0[1..1 + self.samples()]
    }

    /// Elements of each sample covered by the shards counted.
    pub fn covered(&self) -> &[u64] {
        &self.0[1 + self.samples()..1 + 2 * self.samples()]
    }

    /// The coverage tag of each sample: which of its elements the shards counted
    /// cover (see the type's docs).
    pub fn tags(&self) -> &[u64] {
        &self.0[1 + 2 * self.samples()..]
    }

    fn samples(&self) -> usize {
        self.0.len() / 3
    }
}

/// Which seeds and windows a shard samples: along each axis, the seed positions
/// whose block reaches into the box, and the local box's placement.
#[derive(Debug, Clone)]
pub(crate) struct SeedBox {
    /// `[lo, hi)` of seed positions along `[D, H, W]`.
    pub(crate) seeds: [(u32, u32); 3],
    /// The box's first cell along `[D, H, W]`.
    pub(crate) origin: [u32; 3],
    /// The box's extents along `[D, H, W]`.
    pub(crate) extent: [u32; 3],
    /// For planes of more than 64 seed cells: the windows within a plane (`i` of
    /// window `plane·m + i`) that hold a seed cell of the box, as ascending,
    /// disjoint ranges (one per run of box rows whose windows touch). The same for
    /// every plane.
    pub(crate) parts: Vec<std::ops::Range<u64>>,
}

impl SeedBox {
    pub(crate) fn new(plan: &Plan, shard: &Shard) -> Result<Self> {
        let g = plan.geometry();
        if shard.is_whole() {
            return Ok(Self::whole(g));
        }
        let origin = shard.volume_offset().map(|v| v as u32);
        let extent = shard.local().volume().map(|v| v as u32);
        let axis = |i: usize, anchor: u32, k: u32, seeds: u32| {
            // Seeds s with s - anchor < o + e and s - anchor + k > o.
            let (o, e) = (origin[i] as i64, extent[i] as i64);
            let lo = (o + anchor as i64 - k as i64 + 1).max(0);
            let hi = (o + e + anchor as i64).min(seeds as i64);
            (lo as u32, hi.max(lo) as u32)
        };
        let seeds = [
            axis(0, g.anchor_z, g.kd, g.seed_d),
            axis(1, g.anchor_y, g.kh, g.seed_h),
            axis(2, g.anchor_x, g.kw, g.seed_w),
        ];
        let mut parts: Vec<std::ops::Range<u64>> = Vec::new();
        if g.seed_cells > abi::DROPBLOCK_WINDOW_CELLS as u64 && seeds.iter().all(|(lo, hi)| lo < hi) {
            let per = abi::DROPBLOCK_WINDOW_CELLS as u64;
            for z in seeds[0].0..seeds[0].1 {
                for y in seeds[1].0..seeds[1].1 {
                    let row = (z as u64 * g.seed_h as u64 + y as u64) * g.seed_w as u64;
                    let (a, b) = ((row + seeds[2].0 as u64) / per, (row + seeds[2].1 as u64 - 1) / per + 1);
                    match parts.last_mut() {
                        Some(last) if last.end >= a => last.end = last.end.max(b),
                        _ => {
                            parts.try_reserve(1).map_err(|_| Error::HostAllocation { bytes: 16 })?;
                            parts.push(a..b);
                        }
                    }
                }
            }
        }
        Ok(Self { seeds, origin, extent, parts })
    }

    /// The box of a whole plane: every seed, every window.
    pub(crate) fn whole(g: &abi::DropBlockGeometry) -> Self {
        let mut parts = Vec::new();
        if g.seed_cells > abi::DROPBLOCK_WINDOW_CELLS as u64 {
            parts.push(0..g.windows_per_group);
        }
        Self { seeds: [(0, g.seed_d), (0, g.seed_h), (0, g.seed_w)], origin: [0; 3], extent: [g.d, g.h, g.w], parts }
    }
}

#[cfg(test)]
mod tests {
    use super::{coverage_tag, SeedBox, Shard};
    use crate::sampling::Plan;
    use crate::{Anchor, Block, DropBlockConfig, Placement, RngKey, Shape};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A box's coverage tag, in constant time, is the sum over its elements of
    /// their own tags (those of one-element boxes: the product of their
    /// coordinates' weights).
    #[test]
    fn coverage_tags_are_sums_over_the_elements() {
        let mut rng = StdRng::seed_from_u64(29);
        let element = Shape::from_dims(&[1, 1, 1, 1, 1]).unwrap();
        for _ in 0..50 {
            let dims: Vec<usize> = (0..5).map(|_| rng.random_range(1..6)).collect();
            let global = Shape::from_dims(&dims).unwrap();
            let o: Vec<usize> = dims.iter().map(|&d| rng.random_range(0..d)).collect();
            let e: Vec<usize> = dims.iter().zip(&o).map(|(&d, &o)| rng.random_range(1..=d - o)).collect();
            let shard = Shard::new(global, &o, &e).unwrap();
            let mut sum = 0u64;
            for c in o[1]..o[1] + e[1] {
                for z in o[2]..o[2] + e[2] {
                    for y in o[3]..o[3] + e[3] {
                        for x in o[4]..o[4] + e[4] {
                            sum = sum.wrapping_add(coverage_tag(element, &[0, c, z, y, x]));
                        }
                    }
                }
            }
            assert_eq!(shard.box_tag(), sum, "{shard:?}");
        }
    }

    /// The seed box holds exactly the seeds whose block meets the shard's box, and
    /// its windows are exactly those holding one of its seed cells: the halo and no
    /// more, checked by brute force.
    #[test]
    fn seed_box_is_exactly_the_seeds_that_reach_the_shard() {
        let mut rng = StdRng::seed_from_u64(28);
        for _ in 0..400 {
            let dims = [1, 1, rng.random_range(1..12), rng.random_range(1..40), rng.random_range(1..90)];
            let global = Shape::from_dims(&dims).unwrap();
            let block = Block::from_sizes(&[0, 0, 0].map(|_| rng.random_range(1..10))).unwrap();
            let cfg = DropBlockConfig::builder(block, 0.1)
                .placement([Placement::Valid, Placement::Anywhere][rng.random_range(0..2)])
                .anchor([Anchor::Centered, Anchor::CenteredRight][rng.random_range(0..2)])
                .build()
                .unwrap();
            let plan = Plan::new(&cfg, global, RngKey::new(1, 0).unwrap()).unwrap();
            let g = plan.geometry();
            let o: Vec<usize> = dims.iter().map(|&d| rng.random_range(0..d)).collect();
            let e: Vec<usize> = dims.iter().zip(&o).map(|(&d, &o)| rng.random_range(1..=d - o)).collect();
            let shard = Shard::new(global, &o, &e).unwrap();
            let sb = SeedBox::new(&plan, &shard).unwrap();
            let axes = [
                (g.anchor_z, g.kd, g.seed_d, g.d),
                (g.anchor_y, g.kh, g.seed_h, g.h),
                (g.anchor_x, g.kw, g.seed_w, g.w),
            ];
            for (a, &(anchor, k, seeds, size)) in axes.iter().enumerate() {
                let (lo, hi) = (o[2 + a] as i64, (o[2 + a] + e[2 + a]) as i64);
                let reaching: Vec<u32> = (0..seeds)
                    .filter(|&i| {
                        let start = (i as i64 - anchor as i64).max(0);
                        let end = (i as i64 - anchor as i64 + k as i64).min(size as i64);
                        start < hi && end > lo
                    })
                    .collect();
                let (slo, shi) = sb.seeds[a];
                assert_eq!(reaching, (slo..shi).collect::<Vec<_>>(), "axis {a}: {cfg} on {global}, box {o:?} {e:?}");
            }
            if g.seed_cells > 64 {
                let mut windows = std::collections::BTreeSet::new();
                for z in sb.seeds[0].0..sb.seeds[0].1 {
                    for y in sb.seeds[1].0..sb.seeds[1].1 {
                        for x in sb.seeds[2].0..sb.seeds[2].1 {
                            windows.insert(((z as u64 * g.seed_h as u64 + y as u64) * g.seed_w as u64 + x as u64) / 64);
                        }
                    }
                }
                let parts: std::collections::BTreeSet<u64> = sb.parts.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(parts, windows);
            }
        }
    }
}
