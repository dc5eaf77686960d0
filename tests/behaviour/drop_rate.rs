//! Realised drop rates against γ and the closed form.
//!
//! - The Paper rule: γ is Eq. 1 with the clipped block, and the realised dropped
//!   fraction matches `expected_drop_fraction(γ)`.
//! - ExactRate: `expected_drop_fraction(γ) == drop_prob`, and the realised fraction
//!   hits `drop_prob`, also where the Paper rule is far off (k >= H, Anywhere).
//! - `expected_drop_fraction` against a brute-force count of the seeds covering
//!   each cell, written from the contract's geometry.
//! - Per cell: the keep rate of cell `c` is `(1-γ)^(seeds covering c)`, which pins
//!   the anchoring of the blocks, edges and clipping included.
//!
//! Deterministic (fixed keys). Tolerances are Bernstein bounds with a rigorous
//! per-plane variance bound (Efron–Stein), at a false-failure probability of 1e-12
//! per check. Each rate test samples enough planes that its tolerance is at most
//! half the shift a γ 10% too high would cause, and for even blocks under Anywhere
//! placement asserts that the per-cell check rejects the other anchoring.

use crate::common;

use common::bernstein_tol;
use dropblock::sampling::{expected_drop_fraction, Plan};
use dropblock::{cpu, Anchor, Block, DropBlockConfig, GammaRule, Mode, Placement, RngKey, Shape};

/// The geometry the crate docs define, computed here independently, per axis of
/// a `D x H x W` volume (1D and 2D have unit axes in front).
#[derive(Debug, Clone, Copy)]
struct Geo {
    /// Map size, block extent, anchor and seed positions per axis.
    size: [usize; 3],
    k: [usize; 3],
    a: [usize; 3],
    s: [usize; 3],
}

impl Geo {
    fn cells(&self) -> usize {
        self.size.iter().product()
    }
}

fn contract_geo(size: [usize; 3], block: [usize; 3], placement: Placement, anchor: Anchor) -> Geo {
    let mut g = Geo { size, k: [0; 3], a: [0; 3], s: [0; 3] };
    for i in 0..3 {
        let (len, b) = (size[i], block[i]);
        let kc = b.min(len);
        (g.k[i], g.a[i], g.s[i]) = match (placement, anchor) {
            (Placement::Valid, _) => (kc, 0, len - kc + 1),
            (Placement::Anywhere, Anchor::Centered) => (kc, kc / 2, len),
            // [i - (b-1)/2, i + b/2], each reach cut to the map.
            (Placement::Anywhere, Anchor::CenteredRight) => {
                let (before, after) = (((b - 1) / 2).min(len - 1), (b / 2).min(len - 1));
                (before + after + 1, before, len)
            }
        };
    }
    g
}

/// `[s - a, s - a + k)` clipped to `[0, len)`.
fn span(s: usize, a: usize, k: usize, len: usize) -> (usize, usize) {
    let lo = s as i64 - a as i64;
    ((lo.max(0)) as usize, ((lo + k as i64).min(len as i64)) as usize)
}

/// Every seed position's block, as its span along each axis.
fn blocks(g: &Geo) -> Vec<[(usize, usize); 3]> {
    let mut out = Vec::new();
    for z in 0..g.s[0] {
        for y in 0..g.s[1] {
            for x in 0..g.s[2] {
                let at = [z, y, x];
                out.push(std::array::from_fn(|i| span(at[i], g.a[i], g.k[i], g.size[i])));
            }
        }
    }
    out
}

/// For each cell, by brute force, the number of seed positions whose block covers it.
fn coverage(g: &Geo) -> Vec<u32> {
    let [_, h, w] = g.size;
    let mut count = vec![0u32; g.cells()];
    for [(z0, z1), (r0, r1), (c0, c1)] in blocks(g) {
        for z in z0..z1 {
            for r in r0..r1 {
                for c in c0..c1 {
                    count[(z * h + r) * w + c] += 1;
                }
            }
        }
    }
    count
}

/// Sum over seed positions of (cells its block covers)^2.
fn sum_area_sq(g: &Geo) -> f64 {
    blocks(g).iter().map(|b| (b.iter().map(|(lo, hi)| hi - lo).product::<usize>() as f64).powi(2)).sum()
}

/// `1 - mean over cells of (1-γ)^count`.
fn brute_expected(gamma: f64, count: &[u32]) -> f64 {
    let keep = 1.0 - gamma.clamp(0.0, 1.0);
    let kept: f64 = count.iter().map(|&m| keep.powi(m as i32)).sum();
    1.0 - kept / count.len() as f64
}

fn cfg(bh: u32, bw: u32, p: f64, placement: Placement, rule: GammaRule) -> DropBlockConfig {
    DropBlockConfig::builder(Block::new(bh, bw).unwrap(), p).placement(placement).gamma_rule(rule).build().unwrap()
}

/// The spatial dimensions of a volume for a shape of spatial rank `rank`.
fn spatial(size: [usize; 3], rank: usize) -> &'static [usize] {
    Box::leak(size[3 - rank..].to_vec().into_boxed_slice())
}

/// Splits `planes` into an N x C shape with C <= 64, of `rank` spatial dimensions
/// (the last `rank` of `size`; the others must be 1).
fn shape_nd(planes: usize, size: [usize; 3], rank: usize) -> Shape {
    assert!(size[..3 - rank].iter().all(|&v| v == 1), "{size:?} is not of rank {rank}");
    let c = (1..=64).rev().find(|c| planes.is_multiple_of(*c)).unwrap();
    let mut dims = vec![planes / c, c];
    dims.extend_from_slice(spatial(size, rank));
    Shape::from_dims(&dims).unwrap()
}

fn shape_for(planes: usize, h: usize, w: usize) -> Shape {
    shape_nd(planes, [1, h, w], 2)
}

fn check_geometry(plan: &Plan, g: &Geo) {
    let pg = plan.geometry();
    let u = |v: [usize; 3]| v.map(|x| x as u32);
    assert_eq!(
        (
            [pg.d, pg.h, pg.w],
            [pg.kd, pg.kh, pg.kw],
            [pg.anchor_z, pg.anchor_y, pg.anchor_x],
            [pg.seed_d, pg.seed_h, pg.seed_w]
        ),
        (u(g.size), u(g.k), u(g.a), u(g.s)),
        "geometry of {g:?}"
    );
    let cells = g.s.iter().product::<usize>() as u64;
    let q = (64 / cells).max(1) as u32;
    assert_eq!((pg.seed_cells, pg.planes_per_window, pg.windows_per_group), (cells, q, cells.div_ceil(64)));
}

/// The block of `cfg` as a volume `[kd, kh, kw]` for shapes of rank `rank`.
fn block_of(cfg: &DropBlockConfig, rank: usize) -> [usize; 3] {
    cfg.block().sizes_for(rank).unwrap().map(|k| k as usize)
}

/// Samples `planes` planes of `cfg` on a `D x H x W` volume of spatial rank `rank`
/// and checks (a) the mean dropped fraction against `target` and (b) every cell's
/// keep rate against `(1-γ)^coverage`. Returns the realised mean fraction.
/// Planes are sampled until the tolerance on the mean dropped fraction is at most
/// half the shift that a γ 10% too high would cause (at least `min_planes`).
fn check_realised_nd(
    cfg: &DropBlockConfig,
    size: [usize; 3],
    rank: usize,
    min_planes: usize,
    key: RngKey,
    target: f64,
) -> f64 {
    let g = contract_geo(size, block_of(cfg, rank), cfg.placement(), cfg.anchor());
    let probe = Plan::new(cfg, shape_nd(1, size, rank), key).unwrap();
    check_geometry(&probe, &g);
    let gamma = probe.gamma().clamp(0.0, 1.0);
    let count = coverage(&g);
    let expected = brute_expected(gamma, &count);
    assert!((expected - target).abs() < 1e-9, "{g:?}: target {target} vs closed form {expected}");

    // Variance of one plane's dropped fraction: Efron–Stein (resampling one seed
    // changes the dropped count by at most its block's area, and only when the
    // seed changes, probability 2γ(1-γ)), and the [0, 1] bound μ(1-μ).
    let cells = g.cells() as f64;
    let es = gamma * (1.0 - gamma) * sum_area_sq(&g) / (cells * cells);
    let var = es.min(expected * (1.0 - expected));
    let tol_for = |planes: usize| bernstein_tol(planes as f64 * var, 1.0) / planes as f64;
    let off = brute_expected(gamma * 1.1, &count) - expected;
    let mut planes = min_planes.div_ceil(64) * 64;
    if gamma > 0.0 && gamma < 0.9 {
        while tol_for(planes) > 0.5 * off {
            planes = (planes * 5 / 4).div_ceil(64) * 64;
        }
        assert!(planes * g.cells() <= 128_000_000, "{g:?}: {planes} planes needed");
    }
    let tol = tol_for(planes);

    let shape = shape_nd(planes, size, rank);
    let saved = cpu::sample(cfg, shape, key, Mode::Train).unwrap();
    let realised = saved.drop_fraction();
    let desc = format!(
        "{:?} {:?} {:?} {size:?} block {} p {}: γ {gamma}",
        cfg.gamma_rule(),
        cfg.placement(),
        cfg.anchor(),
        cfg.block(),
        cfg.drop_prob()
    );
    assert!(
        (realised - expected).abs() <= tol,
        "{desc}: realised drop fraction {realised} vs expected {expected} ± {tol} over {planes} planes"
    );
    if std::env::var_os("DROP_RATE_VERBOSE").is_some() {
        eprintln!("{desc}: {planes} planes, realised {realised:.5}, expected {expected:.5} ± {tol:.5}, 10% γ shift {off:.5}, z {:.2}",
            (realised - expected) / (var / planes as f64).sqrt());
    }

    // Per cell, on a separate call over at most 8192 planes (the keep mask is the
    // slow part): kept in Binomial(planes, (1-γ)^count) of the planes.
    let planes = planes.min(8_192);
    let n = planes as f64;
    let key = RngKey::new(key.seed(), key.offset() + 17).unwrap();
    let saved = cpu::sample(cfg, shape_nd(planes, size, rank), key, Mode::Train).unwrap();
    let mask = saved.keep_mask().unwrap();
    let mut kept = vec![0u64; g.cells()];
    for plane in mask.chunks_exact(g.cells()) {
        for (k, &m) in kept.iter_mut().zip(plane) {
            *k += m as u64;
        }
    }
    assert_eq!(kept.iter().sum::<u64>(), saved.kept(), "keep mask vs kept count");
    let cell_ok = |k: u64, m: u32| {
        let q = (1.0 - gamma).powi(m as i32);
        let tol = bernstein_tol(n * q * (1.0 - q), 1.0).max(0.5);
        ((k as f64 - n * q).abs() <= tol, n * q, tol)
    };
    for (cell, (&k, &m)) in kept.iter().zip(&count).enumerate() {
        let (ok, mean, tol) = cell_ok(k, m);
        assert!(
            ok,
            "{desc}: cell {cell} covered by {m} seed positions kept {k} of {planes}, expected {mean:.1} ± {tol:.1}"
        );
    }
    // The per-cell check has teeth: for an even block under Anywhere placement, the
    // other anchoring is rejected by some cell.
    let even = g.k.iter().any(|k| k.is_multiple_of(2));
    if cfg.placement() == Placement::Anywhere && even && gamma > 0.005 {
        let other = match cfg.anchor() {
            Anchor::Centered => Anchor::CenteredRight,
            Anchor::CenteredRight => Anchor::Centered,
        };
        let alt_count = coverage(&contract_geo(size, block_of(cfg, rank), Placement::Anywhere, other));
        assert!(
            kept.iter().zip(&alt_count).any(|(&k, &m)| !cell_ok(k, m).0),
            "{desc}: the per-cell check cannot tell the anchorings apart"
        );
    }
    realised
}

/// [`check_realised_nd`] for a 2D `h x w` map.
fn check_realised(cfg: &DropBlockConfig, h: usize, w: usize, min_planes: usize, key: RngKey, target: f64) -> f64 {
    check_realised_nd(cfg, [1, h, w], 2, min_planes, key, target)
}

/// (H, W, block height, block width, minimum planes; see `check_realised`).
const SHAPES: [(usize, usize, u32, u32, usize); 8] = [
    (14, 14, 7, 7, 4_096),
    (28, 28, 7, 7, 4_096),
    (7, 7, 7, 7, 4_096),
    (19, 19, 3, 3, 4_096),
    (13, 40, 3, 5, 4_096),
    (12, 12, 4, 4, 4_096),
    (10, 9, 2, 6, 4_096),
    (5, 6, 9, 4, 4_096),
];

// ---------------------------------------------------------------- γ and the closed form

#[test]
fn paper_gamma_is_eq1_with_the_clipped_block() {
    let cases: [(usize, usize, u32, u32, f64, f64); 9] = [
        (14, 14, 7, 7, 0.1, 1.0),
        (28, 28, 7, 7, 0.1, 1.0),
        (7, 7, 7, 7, 0.1, 1.0),
        (19, 19, 3, 3, 0.25, 1.0),
        (13, 40, 3, 5, 0.1, 1.0),
        (5, 5, 7, 7, 0.1, 1.0),   // both axes clipped: kh = kw = 5
        (13, 4, 3, 5, 0.2, 1.0),  // width clipped: kw = 4
        (3, 50, 8, 2, 0.3, 1.0),  // height clipped: kh = 3
        (14, 14, 7, 7, 0.1, 0.5), // gamma_scale
    ];
    for &(h, w, bh, bw, p, scale) in &cases {
        let (kh, kw) = (bh.min(h as u32) as f64, bw.min(w as u32) as f64);
        let (hf, wf) = (h as f64, w as f64);
        let want = scale * p * hf * wf / (kh * kw * (hf - kh + 1.0) * (wf - kw + 1.0));
        for placement in [Placement::Valid, Placement::Anywhere] {
            let c = DropBlockConfig::builder(Block::new(bh, bw).unwrap(), p)
                .placement(placement)
                .gamma_scale(scale)
                .build()
                .unwrap();
            let plan = Plan::new(&c, Shape::new(2, 3, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
            assert!(
                (plan.gamma() - want).abs() <= 1e-14 * want,
                "{h}x{w} block {bh}x{bw} p {p} scale {scale} {placement:?}: γ {} vs Eq. 1 {want}",
                plan.gamma()
            );
            check_geometry(&plan, &contract_geo([1, h, w], [1, bh as usize, bw as usize], placement, Anchor::Centered));
        }
    }
    // A block larger than the map is the whole map: γ = p.
    let plan = Plan::new(
        &cfg(9, 9, 0.3, Placement::Valid, GammaRule::Paper),
        Shape::new(1, 1, 7, 7).unwrap(),
        RngKey::new(1, 0).unwrap(),
    )
    .unwrap();
    assert!((plan.gamma() - 0.3).abs() < 1e-15);
}

#[test]
fn expected_drop_fraction_matches_brute_force() {
    let geos = [
        (14, 14, 7, 7),
        (28, 28, 7, 7),
        (7, 7, 7, 7),
        (19, 19, 3, 3),
        (13, 40, 3, 5),
        (12, 12, 4, 4),
        (10, 9, 2, 6),
        (5, 6, 9, 4),
        (1, 1, 1, 1),
        (1, 70, 1, 8),
        (9, 130, 2, 1),
        (6, 6, 1, 1),
    ];
    for &(h, w, bh, bw) in &geos {
        for placement in [Placement::Valid, Placement::Anywhere] {
            let g = contract_geo([1, h, w], [1, bh, bw], placement, Anchor::Centered);
            let count = coverage(&g);
            let c = cfg(bh as u32, bw as u32, 0.1, placement, GammaRule::Paper);
            let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
            check_geometry(&plan, &g);
            for gamma in [0.0, 1e-7, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0, 1.5, -0.2] {
                let got = expected_drop_fraction(gamma, plan.geometry()).unwrap();
                let want = brute_expected(gamma, &count);
                assert!(
                    (got - want).abs() <= 1e-12,
                    "{h}x{w} block {bh}x{bw} {placement:?} γ {gamma}: expected_drop_fraction {got} vs brute force {want}"
                );
            }
            // A single seed at small γ drops its block: the slope at 0 is the mean
            // coverage, i.e. sum of block areas over the map.
            let slope = expected_drop_fraction(1e-9, plan.geometry()).unwrap() / 1e-9;
            let mean_cov = count.iter().map(|&m| m as f64).sum::<f64>() / (h * w) as f64;
            assert!((slope - mean_cov).abs() <= 1e-5 * mean_cov.max(1.0), "slope {slope} vs {mean_cov}");
        }
    }
}

// ---------------------------------------------------------------- realised rates

#[test]
fn paper_rule_realised_drop_fraction() {
    let mut i = 0u64;
    for &(h, w, bh, bw, planes) in &SHAPES {
        for placement in [Placement::Valid, Placement::Anywhere] {
            let c = cfg(bh, bw, 0.1, placement, GammaRule::Paper);
            let key = RngKey::new(0xD809_0000 + i, 17 * i).unwrap();
            i += 1;
            let plan = Plan::new(&c, shape_for(planes, h, w), key).unwrap();
            let target = expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap();
            check_realised(&c, h, w, planes, key, target);
        }
    }
}

#[test]
fn exact_rate_expected_fraction_is_drop_prob() {
    for &(h, w, bh, bw, _) in &SHAPES {
        for placement in [Placement::Valid, Placement::Anywhere] {
            for p in [1e-4, 0.05, 0.1, 0.25, 0.5, 0.9, 0.999] {
                let c = cfg(bh, bw, p, placement, GammaRule::ExactRate);
                let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
                let gamma = plan.gamma();
                assert!(gamma > 0.0 && gamma < 1.0, "γ {gamma}");
                let e = expected_drop_fraction(gamma, plan.geometry()).unwrap();
                assert!((e - p).abs() <= 1e-9, "{h}x{w} {bh}x{bw} {placement:?} p {p}: expected fraction {e}");
                // And by brute force.
                let g = contract_geo([1, h, w], [1, bh as usize, bw as usize], placement, Anchor::Centered);
                assert!((brute_expected(gamma, &coverage(&g)) - p).abs() <= 1e-9);
                // gamma_scale multiplies the solved γ.
                let half = DropBlockConfig::builder(Block::new(bh, bw).unwrap(), p)
                    .placement(placement)
                    .gamma_rule(GammaRule::ExactRate)
                    .gamma_scale(0.5)
                    .build()
                    .unwrap();
                let plan_half = Plan::new(&half, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
                assert!((plan_half.gamma() - 0.5 * gamma).abs() <= 1e-15 * gamma);
            }
            // The ends.
            for (p, want) in [(0.0, 0.0), (1.0, 1.0)] {
                let c = cfg(bh, bw, p, placement, GammaRule::ExactRate);
                let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
                assert_eq!(plan.gamma(), want);
            }
        }
    }
}

#[test]
fn exact_rate_realised_drop_fraction() {
    let mut i = 0u64;
    for &(h, w, bh, bw, planes) in &SHAPES {
        for placement in [Placement::Valid, Placement::Anywhere] {
            let p = if i.is_multiple_of(2) { 0.1 } else { 0.25 };
            let c = cfg(bh, bw, p, placement, GammaRule::ExactRate);
            let key = RngKey::new(0xE8AC_7000 + i, 17 * i).unwrap();
            i += 1;
            check_realised(&c, h, w, planes, key, p);
        }
    }
}

#[test]
fn degenerate_block_covers_the_map() {
    // 7x7 map, block 7. Valid: one seed position, γ = p under both rules (the
    // realised rates of that case are in the tests above). Anywhere: 49 positions;
    // the Paper rule keeps γ = p and so drops ~93% at p = 0.1 (realised above),
    // while ExactRate must drop p.
    let (h, w) = (7usize, 7usize);
    let p = 0.1;
    for placement in [Placement::Valid, Placement::Anywhere] {
        for rule in [GammaRule::Paper, GammaRule::ExactRate] {
            let c = cfg(7, 7, p, placement, rule);
            let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap()).unwrap();
            let e = expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap();
            match (placement, rule) {
                (Placement::Anywhere, GammaRule::Paper) => {
                    assert!((plan.gamma() - p).abs() < 1e-15);
                    assert!((0.92..0.94).contains(&e), "Paper rule, Anywhere, k = H: {e}");
                }
                (Placement::Valid, _) => {
                    assert!((plan.gamma() - p).abs() < 1e-12, "{rule:?}: γ {}", plan.gamma());
                    assert!((e - p).abs() < 1e-12);
                }
                (Placement::Anywhere, GammaRule::ExactRate) => {
                    assert!(plan.gamma() < p / 10.0, "γ {}", plan.gamma());
                    assert!((e - p).abs() < 1e-9);
                }
                (Placement::Anywhere, GammaRule::PerBlock) => unreachable!("not among the rules tried"),
            }
        }
    }
    let exact = cfg(7, 7, p, Placement::Anywhere, GammaRule::ExactRate);
    let r = check_realised(&exact, h, w, 4_096, RngKey::new(0xDE6E_0002, 17).unwrap(), p);
    assert!((r - p).abs() < 0.01, "Anywhere ExactRate realised {r}");
    // A block larger than the map clips to it (Anywhere: 7x7 of a 50x9 block).
    let big = cfg(50, 9, 0.3, Placement::Anywhere, GammaRule::ExactRate);
    check_realised(&big, h, w, 4_096, RngKey::new(0xDE6E_0003, 34).unwrap(), 0.3);

    // drop_prob 1 under ExactRate: γ = 1, everything dropped, exactly.
    for placement in [Placement::Anywhere, Placement::Valid] {
        let all = cfg(3, 3, 1.0, placement, GammaRule::ExactRate);
        let saved =
            cpu::sample(&all, Shape::new(2, 3, 13, 70).unwrap(), RngKey::new(5, 0).unwrap(), Mode::Train).unwrap();
        assert_eq!(saved.kept(), 0);
        assert_eq!(saved.drop_fraction(), 1.0);
    }
}

// ---------------------------------------------------------------- 1D and 3D

/// (spatial rank, volume, block, minimum planes): 1D sequences and 3D volumes,
/// with odd, even, unequal and larger-than-the-map blocks.
const ND_SHAPES: [(usize, [usize; 3], [u32; 3], usize); 6] = [
    (1, [1, 1, 64], [1, 1, 15], 4_096),
    (1, [1, 1, 100], [1, 1, 4], 4_096),
    (1, [1, 1, 3], [1, 1, 5], 4_096),
    (3, [4, 7, 7], [3, 3, 3], 2_048),
    (3, [3, 6, 6], [2, 3, 4], 2_048),
    (3, [2, 5, 5], [7, 7, 7], 2_048),
];

/// Every γ rule, placement and anchor on 1D and 3D shapes: γ is its formula (Paper
/// is Eq. 1 over every axis, for 3D torchvision's `drop_block3d`; PerBlock is
/// `p / ∏k` with the unclipped block), the closed form matches a brute-force
/// coverage count, and the realised drop fraction (mean and per cell) matches the
/// closed form, or `p` itself under ExactRate.
#[test]
fn every_rule_realised_drop_fraction_in_1d_and_3d() {
    let mut i = 0u64;
    for &(rank, size, block, planes) in &ND_SHAPES {
        let sizes: Vec<u32> = block[3 - rank..].to_vec();
        for (placement, anchor) in [
            (Placement::Valid, Anchor::Centered),
            (Placement::Anywhere, Anchor::Centered),
            (Placement::Anywhere, Anchor::CenteredRight),
        ] {
            for rule in [GammaRule::Paper, GammaRule::PerBlock, GammaRule::ExactRate] {
                // PerBlock is miguelvr's rule for seeds anywhere; with one valid seed
                // position its γ (p / 343 for a 7x7x7 block) is too small to measure.
                if rule == GammaRule::PerBlock && placement == Placement::Valid {
                    continue;
                }
                let p = 0.1;
                let c = DropBlockConfig::builder(Block::from_sizes(&sizes).unwrap(), p)
                    .placement(placement)
                    .anchor(anchor)
                    .gamma_rule(rule)
                    .build()
                    .unwrap();
                let key = RngKey::new(0x0D_0000 + i, 17 * i).unwrap();
                i += 1;
                let plan = Plan::new(&c, shape_nd(1, size, rank), key).unwrap();
                let clipped: Vec<f64> = (0..3).map(|a| block[a].min(size[a] as u32) as f64).collect();
                let (s, k) = (size.map(|v| v as f64), &clipped);
                let want = match rule {
                    GammaRule::Paper => {
                        p * s[0] * s[1] * s[2]
                            / (k[0] * k[1] * k[2] * (s[0] - k[0] + 1.0) * (s[1] - k[1] + 1.0) * (s[2] - k[2] + 1.0))
                    }
                    GammaRule::PerBlock => p / block.iter().map(|&k| k as f64).product::<f64>(),
                    GammaRule::ExactRate => {
                        // No closed form: the solved γ must give `p` in expectation.
                        let e = expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap();
                        assert!((e - p).abs() <= 1e-9, "{c} on {size:?}: expected fraction {e}");
                        f64::NAN
                    }
                };
                if rule != GammaRule::ExactRate {
                    assert!(
                        (plan.gamma() - want).abs() <= 1e-14 * want,
                        "{c} on {size:?}: γ {} vs {want}",
                        plan.gamma()
                    );
                }
                let target = match rule {
                    GammaRule::ExactRate => p,
                    _ => expected_drop_fraction(plan.gamma(), plan.geometry()).unwrap(),
                };
                check_realised_nd(&c, size, rank, planes, key, target);
            }
        }
    }
}
