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

mod common;

use common::bernstein_tol;
use dropblock::sampling::{expected_drop_fraction, Plan};
use dropblock::{cpu, Block, DropBlockConfig, GammaRule, Mode, Placement, RngKey, Shape};

/// The geometry the crate docs define, computed here independently.
#[derive(Debug, Clone, Copy)]
struct Geo {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ay: usize,
    ax: usize,
    sh: usize,
    sw: usize,
}

fn contract_geo(h: usize, w: usize, bh: usize, bw: usize, placement: Placement) -> Geo {
    let (kh, kw) = (bh.min(h), bw.min(w));
    match placement {
        Placement::Valid => Geo { h, w, kh, kw, ay: 0, ax: 0, sh: h - kh + 1, sw: w - kw + 1 },
        Placement::Anywhere => Geo { h, w, kh, kw, ay: kh / 2, ax: kw / 2, sh: h, sw: w },
    }
}

/// Rows (or columns) `[s - a, s - a + k)` clipped to `[0, len)`.
fn span(s: usize, a: usize, k: usize, len: usize) -> (usize, usize) {
    let lo = s as i64 - a as i64;
    ((lo.max(0)) as usize, ((lo + k as i64).min(len as i64)) as usize)
}

/// For each cell, by brute force, the number of seed positions whose block covers it.
fn coverage(g: &Geo) -> Vec<u32> {
    let mut count = vec![0u32; g.h * g.w];
    for y in 0..g.sh {
        let (r0, r1) = span(y, g.ay, g.kh, g.h);
        for x in 0..g.sw {
            let (c0, c1) = span(x, g.ax, g.kw, g.w);
            for r in r0..r1 {
                for c in c0..c1 {
                    count[r * g.w + c] += 1;
                }
            }
        }
    }
    count
}

/// Sum over seed positions of (cells its block covers)^2.
fn sum_area_sq(g: &Geo) -> f64 {
    let mut s = 0.0;
    for y in 0..g.sh {
        let (r0, r1) = span(y, g.ay, g.kh, g.h);
        for x in 0..g.sw {
            let (c0, c1) = span(x, g.ax, g.kw, g.w);
            s += (((r1 - r0) * (c1 - c0)) as f64).powi(2);
        }
    }
    s
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

/// Splits `planes` into an N x C shape with C <= 64.
fn shape_for(planes: usize, h: usize, w: usize) -> Shape {
    let c = (1..=64).rev().find(|c| planes.is_multiple_of(*c)).unwrap();
    Shape::new(planes / c, c, h, w).unwrap()
}

fn check_geometry(plan: &Plan, g: &Geo) {
    let pg = plan.geometry();
    assert_eq!(
        (pg.h, pg.w, pg.kh, pg.kw, pg.anchor_y, pg.anchor_x, pg.seed_h, pg.seed_w),
        (g.h as u32, g.w as u32, g.kh as u32, g.kw as u32, g.ay as u32, g.ax as u32, g.sh as u32, g.sw as u32),
        "geometry of {g:?}"
    );
    let cells = (g.sh * g.sw) as u64;
    let q = (64 / cells).max(1) as u32;
    assert_eq!((pg.seed_cells, pg.planes_per_window, pg.windows_per_group), (cells, q, cells.div_ceil(64)));
}

/// Samples `planes` planes of `cfg` on an `h x w` map and checks (a) the mean
/// dropped fraction against `target` and (b) every cell's keep rate against
/// `(1-γ)^coverage`. Returns the realised mean fraction.
/// Planes are sampled until the tolerance on the mean dropped fraction is at most
/// half the shift that a γ 10% too high would cause (at least `min_planes`).
fn check_realised(cfg: &DropBlockConfig, h: usize, w: usize, min_planes: usize, key: RngKey, target: f64) -> f64 {
    let b = cfg.block();
    let g = contract_geo(h, w, b.height as usize, b.width as usize, cfg.placement());
    let probe = Plan::new(cfg, Shape::new(1, 1, h, w).unwrap(), key);
    check_geometry(&probe, &g);
    let gamma = probe.gamma().clamp(0.0, 1.0);
    let count = coverage(&g);
    let expected = brute_expected(gamma, &count);
    assert!((expected - target).abs() < 1e-9, "{g:?}: target {target} vs closed form {expected}");

    // Variance of one plane's dropped fraction: Efron–Stein (resampling one seed
    // changes the dropped count by at most its block's area, and only when the
    // seed changes, probability 2γ(1-γ)), and the [0, 1] bound μ(1-μ).
    let cells = (h * w) as f64;
    let es = gamma * (1.0 - gamma) * sum_area_sq(&g) / (cells * cells);
    let var = es.min(expected * (1.0 - expected));
    let tol_for = |planes: usize| bernstein_tol(planes as f64 * var, 1.0) / planes as f64;
    let off = brute_expected(gamma * 1.1, &count) - expected;
    let mut planes = min_planes.div_ceil(64) * 64;
    if gamma > 0.0 && gamma < 0.9 {
        while tol_for(planes) > 0.5 * off {
            planes = (planes * 5 / 4).div_ceil(64) * 64;
        }
        assert!(planes <= 400_000, "{g:?}: {planes} planes needed");
    }
    let tol = tol_for(planes);

    let shape = shape_for(planes, h, w);
    let saved = cpu::sample(cfg, shape, key, Mode::Train).unwrap();
    let realised = saved.drop_fraction();
    let desc = format!(
        "{:?} {:?} {h}x{w} block {}x{} p {}: γ {gamma}",
        cfg.gamma_rule(),
        cfg.placement(),
        b.height,
        b.width,
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
    let saved = cpu::sample(cfg, shape_for(planes, h, w), key, Mode::Train).unwrap();
    let mask = saved.keep_mask();
    let mut kept = vec![0u64; h * w];
    for plane in mask.chunks_exact(h * w) {
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
            "{desc}: cell ({}, {}) covered by {m} seed positions kept {k} of {planes}, expected {mean:.1} ± {tol:.1}",
            cell / w,
            cell % w
        );
    }
    // The per-cell check has teeth: for an even block under Anywhere placement, the
    // other anchoring (⌊(k-1)/2⌋ instead of ⌊k/2⌋) is rejected by some cell.
    if cfg.placement() == Placement::Anywhere && (g.kh.is_multiple_of(2) || g.kw.is_multiple_of(2)) && gamma > 0.005 {
        let alt = Geo { ay: (g.kh - 1) / 2, ax: (g.kw - 1) / 2, ..g };
        let alt_count = coverage(&alt);
        assert!(
            kept.iter().zip(&alt_count).any(|(&k, &m)| !cell_ok(k, m).0),
            "{desc}: the per-cell check cannot tell the anchoring ⌊(k-1)/2⌋ from ⌊k/2⌋"
        );
        if std::env::var_os("DROP_RATE_VERBOSE").is_some() {
            let bad = kept.iter().zip(&alt_count).filter(|(&k, &m)| !cell_ok(k, m).0).count();
            eprintln!("{desc}: the other anchoring fails {bad} of {} cells", h * w);
        }
    }
    realised
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
            let plan = Plan::new(&c, Shape::new(2, 3, h, w).unwrap(), RngKey::new(1, 0).unwrap());
            assert!(
                (plan.gamma() - want).abs() <= 1e-14 * want,
                "{h}x{w} block {bh}x{bw} p {p} scale {scale} {placement:?}: γ {} vs Eq. 1 {want}",
                plan.gamma()
            );
            check_geometry(&plan, &contract_geo(h, w, bh as usize, bw as usize, placement));
        }
    }
    // A block larger than the map is the whole map: γ = p.
    let plan = Plan::new(
        &cfg(9, 9, 0.3, Placement::Valid, GammaRule::Paper),
        Shape::new(1, 1, 7, 7).unwrap(),
        RngKey::new(1, 0).unwrap(),
    );
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
            let g = contract_geo(h, w, bh, bw, placement);
            let count = coverage(&g);
            let c = cfg(bh as u32, bw as u32, 0.1, placement, GammaRule::Paper);
            let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap());
            check_geometry(&plan, &g);
            for gamma in [0.0, 1e-7, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0, 1.5, -0.2] {
                let got = expected_drop_fraction(gamma, plan.geometry());
                let want = brute_expected(gamma, &count);
                assert!(
                    (got - want).abs() <= 1e-12,
                    "{h}x{w} block {bh}x{bw} {placement:?} γ {gamma}: expected_drop_fraction {got} vs brute force {want}"
                );
            }
            // A single seed at small γ drops its block: the slope at 0 is the mean
            // coverage, i.e. sum of block areas over the map.
            let slope = expected_drop_fraction(1e-9, plan.geometry()) / 1e-9;
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
            let plan = Plan::new(&c, shape_for(planes, h, w), key);
            let target = expected_drop_fraction(plan.gamma(), plan.geometry());
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
                let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap());
                let gamma = plan.gamma();
                assert!(gamma > 0.0 && gamma < 1.0, "γ {gamma}");
                let e = expected_drop_fraction(gamma, plan.geometry());
                assert!((e - p).abs() <= 1e-9, "{h}x{w} {bh}x{bw} {placement:?} p {p}: expected fraction {e}");
                // And by brute force.
                let g = contract_geo(h, w, bh as usize, bw as usize, placement);
                assert!((brute_expected(gamma, &coverage(&g)) - p).abs() <= 1e-9);
                // gamma_scale multiplies the solved γ.
                let half = DropBlockConfig::builder(Block::new(bh, bw).unwrap(), p)
                    .placement(placement)
                    .gamma_rule(GammaRule::ExactRate)
                    .gamma_scale(0.5)
                    .build()
                    .unwrap();
                let plan_half = Plan::new(&half, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap());
                assert!((plan_half.gamma() - 0.5 * gamma).abs() <= 1e-15 * gamma);
            }
            // The ends.
            for (p, want) in [(0.0, 0.0), (1.0, 1.0)] {
                let c = cfg(bh, bw, p, placement, GammaRule::ExactRate);
                let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap());
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
            let plan = Plan::new(&c, Shape::new(1, 1, h, w).unwrap(), RngKey::new(1, 0).unwrap());
            let e = expected_drop_fraction(plan.gamma(), plan.geometry());
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
