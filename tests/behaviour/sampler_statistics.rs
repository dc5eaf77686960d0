//! The window sampler against its specification: every seed-grid cell an
//! independent Bernoulli(γ), up to the 2^-32 quantisation of the thresholds.
//!
//! Everything is deterministic (fixed seeds and offsets). Each statistical check
//! uses a Bernstein bound (or, for the chi-square, a Wilson–Hilferty quantile at
//! 7 sigma) sized so that a correct sampler fails it with probability below
//! ~1e-12, while the checks still reject the broken samplers of
//! `statistics_reject_broken_samplers` (off-by-one window walks, a skipped cell,
//! a reused draw, a γ 3% off) at sample sizes no larger than those used here.

use crate::common;

use common::bernstein_tol;
use dropblock::sampling::{thresholds, Plan};
use dropblock::{Block, DropBlockConfig, Generator, Placement, RngKey, Shape};
use num_bigint::BigUint;

const TWO_POW_32: u64 = 1 << 32;

// ---------------------------------------------------------------- helpers

/// Tolerance on a Binomial(n, p) count.
fn binom_tol(n: f64, p: f64) -> f64 {
    bernstein_tol(n * p * (1.0 - p), 1.0)
}

/// Checks a Binomial(n, p) count; `Err` names what failed.
fn check_count(what: &str, count: u64, n: u64, p: f64) -> Result<(), String> {
    let mean = n as f64 * p;
    let tol = binom_tol(n as f64, p);
    let dev = count as f64 - mean;
    if dev.abs() > tol {
        return Err(format!(
            "{what}: {count} of {n} (rate {:.6}), expected {mean:.1} (rate {p:.6}) ± {tol:.1}",
            count as f64 / n as f64
        ));
    }
    Ok(())
}

/// The upper `z`-sigma quantile of chi-square with `df` degrees of freedom
/// (Wilson–Hilferty; conservative in the far tail for small `df`).
fn chi2_critical(df: usize, z: f64) -> f64 {
    let d = df as f64;
    let c = 2.0 / (9.0 * d);
    d * (1.0 - c + z * c.sqrt()).powi(3)
}

/// Binomial(n, p) probabilities for 0..=n.
fn binomial_pmf(n: u32, p: f64) -> Vec<f64> {
    let mut pmf = vec![0.0; n as usize + 1];
    pmf[0] = (1.0 - p).powi(n as i32);
    for k in 0..n as usize {
        pmf[k + 1] = pmf[k] * (n as f64 - k as f64) / (k as f64 + 1.0) * p / (1.0 - p);
    }
    pmf
}

/// A plan whose γ is exactly `gamma`: a 1x1 block with `drop_prob` 1 gives a Paper γ
/// of exactly 1, which `gamma_scale` then scales.
fn plan_with_gamma(gamma: f64, shape: Shape, seed: u64, offset: u64) -> Plan {
    let cfg = common::config_with_gamma(gamma);
    let plan = Plan::new(&cfg, shape, RngKey::new(seed, offset).unwrap()).unwrap();
    assert_eq!(plan.gamma(), gamma, "a 1x1 block with p = 1 must give γ = gamma_scale");
    plan
}

fn one_cell() -> Shape {
    Shape::new(1, 1, 1, 1).unwrap()
}

fn low_mask(len: u32) -> u64 {
    if len == 64 {
        u64::MAX
    } else {
        (1u64 << len) - 1
    }
}

/// Spreads consecutive indices over the whole u64 window space, so both counter
/// words that carry the window index are exercised.
fn scrambled(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0123_4567_89AB_CDEF
}

/// What many windows of one length showed.
struct WindowStats {
    windows: u64,
    len: u32,
    /// Seeds at each position.
    per_position: Vec<u64>,
    /// Windows with k seeds, k = 0..=len.
    per_count: Vec<u64>,
    /// Windows with seeds at both i and i + 1.
    adjacent: Vec<u64>,
}

fn collect(windows: u64, len: u32, mut sample: impl FnMut(u64) -> u64) -> WindowStats {
    let mut s = WindowStats {
        windows,
        len,
        per_position: vec![0; len as usize],
        per_count: vec![0; len as usize + 1],
        adjacent: vec![0; len as usize - 1],
    };
    for i in 0..windows {
        let bits = sample(scrambled(i));
        assert_eq!(bits & !low_mask(len), 0, "seed outside a window of {len} cells: {bits:#x}");
        s.per_count[bits.count_ones() as usize] += 1;
        let mut b = bits;
        while b != 0 {
            s.per_position[b.trailing_zeros() as usize] += 1;
            b &= b - 1;
        }
        let mut pairs = bits & (bits >> 1);
        while pairs != 0 {
            s.adjacent[pairs.trailing_zeros() as usize] += 1;
            pairs &= pairs - 1;
        }
    }
    s
}

/// Every check that windows of independent Bernoulli(γ) cells pass.
fn check_bernoulli(s: &WindowStats, gamma: f64) -> Result<(), String> {
    let failures = bernoulli_failures(s, gamma);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Every failed check, each tagged `[total]`, `[position]`, `[adjacent]` or `[chi2]`.
fn bernoulli_failures(s: &WindowStats, gamma: f64) -> Vec<String> {
    let len = s.len as usize;
    let mut failures = Vec::new();
    // The total seed rate.
    let total: u64 = s.per_position.iter().sum();
    if let Err(e) = check_count("total seeds", total, s.windows * s.len as u64, gamma) {
        failures.push(format!("[total] {e}"));
    }
    // Each position.
    for (i, &c) in s.per_position.iter().enumerate() {
        if let Err(e) = check_count(&format!("seeds at position {i} of {len}"), c, s.windows, gamma) {
            failures.push(format!("[position] {e}"));
        }
    }
    // Neighbours are independent: both seeded with probability γ².
    for (i, &c) in s.adjacent.iter().enumerate() {
        let what = format!("seeds at both {i} and {}", i + 1);
        if let Err(e) = check_count(&what, c, s.windows, gamma * gamma) {
            failures.push(format!("[adjacent] {e}"));
        }
    }
    // Seeds per window against Binomial(len, γ), bins pooled so each expects >= 20.
    let pmf = binomial_pmf(s.len, gamma);
    let n = s.windows as f64;
    let mut bins: Vec<(f64, u64)> = Vec::new(); // (expected, observed)
    let (mut e, mut o) = (0.0, 0u64);
    for (pk, &ok) in pmf.iter().zip(&s.per_count) {
        e += pk * n;
        o += ok;
        if e >= 20.0 {
            bins.push((e, o));
            e = 0.0;
            o = 0;
        }
    }
    if let Some(last) = bins.last_mut() {
        last.0 += e;
        last.1 += o;
    } else {
        bins.push((e, o));
    }
    if bins.len() >= 2 {
        let stat: f64 = bins.iter().map(|&(e, o)| (o as f64 - e).powi(2) / e).sum();
        let crit = chi2_critical(bins.len() - 1, 7.0);
        if stat > crit {
            failures.push(format!(
                "[chi2] seeds per window vs Binomial({len}, {gamma}): chi-square {stat:.1} > {crit:.1} \
                 ({} bins; (expected, observed) = {bins:?})",
                bins.len()
            ));
        }
    }
    failures
}

/// The window sampler exactly as the crate documentation states it, written from
/// the prose (not from `Plan::sample_window`).
fn reference_window(key: RngKey, t: &[u64; 64], window: u64, len: u32) -> u64 {
    let mut bits = 0u64;
    let mut pos = 0u32;
    let mut j = 0u32;
    while pos < len {
        let r = len - pos;
        let u = key.draw(window, j) as u64;
        j += 1;
        if u >= t[r as usize - 1] {
            break;
        }
        let g = (0..r).find(|&g| u < t[g as usize]).unwrap();
        bits |= 1u64 << (pos + g);
        pos += g + 1;
    }
    bits
}

// ---------------------------------------------------------------- thresholds

#[test]
fn thresholds_match_closed_form() {
    let gammas = [
        1e-12,
        1e-9,
        1e-6,
        1e-4,
        0.001,
        0.01,
        0.0333,
        0.05,
        0.1,
        0.25,
        0.5,
        0.75,
        0.9,
        0.99,
        0.999,
        1.0 - 1e-6,
        1.0 - 1e-9,
    ];
    for &gamma in &gammas {
        let t = thresholds(gamma);
        // Exactly the documented floor: T ≤ 2^32 (1 - (1-γ)^n) < T + 1, in integers.
        // γ = mantissa / 2^shift (f64 bits; γ in (0, 1) is normal here), so with
        // d = 2^(n·shift) and kept = (2^shift - mantissa)^n:
        // T·d ≤ 2^32 (d - kept) < (T+1)·d.
        let bits = gamma.to_bits();
        let mantissa = BigUint::from((bits & ((1u64 << 52) - 1)) | (1u64 << 52));
        let shift = 1075 - (bits >> 52);
        let one_minus = (BigUint::from(1u8) << shift) - &mantissa;
        let mut kept = BigUint::from(1u8);
        for (j, &tj) in t.iter().enumerate() {
            kept *= &one_minus;
            let d = BigUint::from(1u8) << ((j as u64 + 1) * shift);
            let dropped = (&d - &kept) << 32u32;
            assert!(
                BigUint::from(tj) * &d <= dropped && dropped < BigUint::from(tj + 1) * &d,
                "γ {gamma}: T[{j}] = {tj} is not floor(2^32 (1 - (1-γ)^{}))",
                j + 1
            );
        }
        for j in 0..64 {
            assert!(t[j] <= TWO_POW_32, "γ {gamma}: T[{j}] = {} > 2^32", t[j]);
            if j > 0 {
                assert!(t[j] >= t[j - 1], "γ {gamma}: T[{j}] = {} < T[{}] = {}", t[j], j - 1, t[j - 1]);
            }
            let exact = TWO_POW_32 as f64 * (1.0 - (1.0 - gamma).powi(j as i32 + 1));
            assert!(
                (t[j] as f64 - exact).abs() <= 2.0,
                "γ {gamma}: T[{j}] = {} but 2^32 (1 - (1-γ)^{}) = {exact}",
                t[j],
                j + 1
            );
        }
        // The first threshold is the per-cell rate itself.
        assert!((t[0] as f64 / TWO_POW_32 as f64 - gamma).abs() <= 2.0 / TWO_POW_32 as f64);
    }
    // Strictly increasing while γ is not tiny and (1-γ)^j is not yet below 2^-32.
    let t = thresholds(0.05);
    assert!(t.windows(2).all(|w| w[1] > w[0]), "T must grow strictly at γ = 0.05");
}

#[test]
fn thresholds_edge_cases() {
    for gamma in [0.0, -0.0, -1e-300, -0.5, -1.0, f64::NEG_INFINITY] {
        assert_eq!(thresholds(gamma), [0u64; 64], "γ = {gamma} must give no seeds");
    }
    for gamma in [1.0, 1.0 + 1e-12, 1.5, 2.0, 1e300, f64::INFINITY] {
        assert_eq!(thresholds(gamma), [TWO_POW_32; 64], "γ = {gamma} must give every cell");
    }
    // Smallest positive γ: all thresholds floor to 0 or tiny values, never negative.
    let t = thresholds(f64::MIN_POSITIVE);
    assert!(t.iter().all(|&v| v == 0));
    // The plan's thresholds are these.
    let plan = plan_with_gamma(0.05, one_cell(), 1, 0);
    assert_eq!(plan.sampling().thresholds, thresholds(0.05));
}

// ---------------------------------------------------------------- the contract, bit for bit

#[test]
fn sample_window_follows_the_documented_walk() {
    // Rates where thresholds crowd into one bucket of a draw's top bits (8 in the
    // kernels' table, 12 in the CPU's; near 0 at 1e-7, near 2^32 from 0.3 on) take
    // the samplers' searches past their table steps; at 1e-10 the first thresholds
    // are 0, at 1 all are 2^32.
    for (gamma, seed, offset) in [
        (0.05, 11u64, 0u64),
        (0.3, 12, 17),
        (0.9, 13, 1 << 40),
        (1e-3, u64::MAX, 5),
        (1e-7, 14, 3),
        (0.6, 15, 9),
        (1e-10, 16, 2),
        (1.0, 17, 4),
    ] {
        let plan = plan_with_gamma(gamma, one_cell(), seed, offset);
        let key = RngKey::new(seed, offset).unwrap();
        let t = thresholds(gamma);
        for len in [1u32, 2, 7, 13, 63, 64] {
            for i in 0..400u64 {
                let w = if i % 2 == 0 { i } else { scrambled(i) };
                assert_eq!(
                    plan.sample_window(w, len).unwrap(),
                    reference_window(key, &t, w, len),
                    "γ {gamma}, seed {seed}, offset {offset}, window {w}, len {len}"
                );
            }
        }
    }
}

/// A draw exactly equal to `T[len-1]` ends the walk with no seed (the stop test is
/// `u >= T[r-1]`); one threshold step higher, the same draw places a seed. Random
/// γs never produce the equality, so γ is solved for it.
#[test]
fn a_draw_equal_to_the_last_threshold_stops_the_walk() {
    for (seed, window) in [(1u64, 0u64), (77, 5), (u64::MAX, 1 << 40)] {
        let key = RngKey::new(seed, 0).unwrap();
        let u = key.draw(window, 0) as u64;
        assert!(u > 0, "pick another key");
        for len in [1u32, 7, 64] {
            let at = common::gamma_with_threshold(len as usize - 1, u);
            let plan = plan_with_gamma(at, one_cell(), seed, 0);
            let ctx = format!("seed {seed}, window {window}, len {len}, γ {at}");
            assert_eq!(plan.sampling().thresholds[len as usize - 1], u, "{ctx}");
            assert_eq!(plan.sample_window(window, len).unwrap(), 0, "{ctx}: a draw equal to T[len-1] placed a seed");
            assert_eq!(reference_window(key, &thresholds(at), window, len), 0, "{ctx}: the documented walk");
            let above = common::gamma_with_threshold(len as usize - 1, u + 1);
            let plan = plan_with_gamma(above, one_cell(), seed, 0);
            assert_ne!(plan.sample_window(window, len).unwrap(), 0, "{ctx}: a draw below T[len-1] placed no seed");
        }
    }
}

// ---------------------------------------------------------------- per-cell statistics

#[test]
fn window_of_64_is_independent_bernoulli() {
    let gamma = 0.05;
    let plan = plan_with_gamma(gamma, one_cell(), 0x5EED_0001, 0);
    let stats = collect(1_000_000, 64, |w| plan.sample_window(w, 64).unwrap());
    check_bernoulli(&stats, gamma).unwrap();
}

#[test]
fn short_windows_are_independent_bernoulli() {
    let gamma = 0.05;
    let plan = plan_with_gamma(gamma, one_cell(), 0x5EED_0002, 34);
    let stats = collect(1_000_000, 13, |w| plan.sample_window(w, 13).unwrap());
    check_bernoulli(&stats, gamma).unwrap();
    // A one-cell window is a single Bernoulli(γ).
    let stats = collect(200_000, 1, |w| plan.sample_window(w, 1).unwrap());
    check_count("one-cell windows seeded", stats.per_position[0], stats.windows, gamma).unwrap();
    // A high rate walks many gaps per window.
    let gamma = 0.4;
    let plan = plan_with_gamma(gamma, one_cell(), 0x5EED_0003, 51);
    let stats = collect(200_000, 64, |w| plan.sample_window(w, 64).unwrap());
    check_bernoulli(&stats, gamma).unwrap();
}

/// The statistics above have teeth: samplers with the classic bugs fail them at
/// the same sample sizes.
#[test]
fn statistics_reject_broken_samplers() {
    let gamma = 0.05;
    let key = RngKey::new(0x5EED_0001, 0).unwrap();
    let t = thresholds(gamma);
    type Walk = fn(RngKey, &[u64; 64], u64, u32) -> u64;
    // (Not stepping past a seed, `pos += g`, is no bug in distribution: by the
    // memorylessness of the gaps it only wastes draws. So it is not listed.)
    // Skipping the cell after each seed: neighbours are never both seeded.
    let skip_next: Walk = |key, t, w, len| {
        let (mut bits, mut pos, mut j) = (0u64, 0u32, 0u32);
        while pos < len {
            let u = key.draw(w, j) as u64;
            j += 1;
            if u >= t[(len - pos) as usize - 1] {
                break;
            }
            let g = (0..len - pos).find(|&g| u < t[g as usize]).unwrap();
            bits |= 1 << (pos + g);
            pos += g + 2;
        }
        bits
    };
    // The gap read one threshold too far: g is the smallest index with u < T[g + 1].
    let gap_off_by_one: Walk = |key, t, w, len| {
        let (mut bits, mut pos, mut j) = (0u64, 0u32, 0u32);
        while pos < len {
            let u = key.draw(w, j) as u64;
            j += 1;
            if u >= t[(len - pos) as usize - 1] {
                break;
            }
            let g = (0..len - pos).find(|&g| u < t[(g as usize + 1).min(63)]).unwrap();
            bits |= 1 << (pos + g);
            pos += g + 1;
        }
        bits
    };
    // Every seed one cell too far (dropped past the end).
    let shifted: Walk = |key, t, w, len| (reference_window(key, t, w, len) << 1) & low_mask(len);
    // One cell too few left: the stop test uses T[r - 2].
    let short_r: Walk = |key, t, w, len| {
        let (mut bits, mut pos, mut j) = (0u64, 0u32, 0u32);
        while pos + 1 < len {
            let r = len - pos - 1;
            let u = key.draw(w, j) as u64;
            j += 1;
            if u >= t[r as usize - 1] {
                break;
            }
            let g = (0..r).find(|&g| u < t[g as usize]).unwrap();
            bits |= 1 << (pos + g);
            pos += g + 1;
        }
        bits
    };
    // The same draw reused after a seed.
    let reuse: Walk = |key, t, w, len| {
        let (mut bits, mut pos, mut j) = (0u64, 0u32, 0u32);
        while pos < len {
            let u = key.draw(w, j) as u64;
            if u >= t[(len - pos) as usize - 1] {
                break;
            }
            let g = (0..len - pos).find(|&g| u < t[g as usize]).unwrap();
            bits |= 1 << (pos + g);
            pos += g + 1;
            if g > 0 {
                j += 1; // a fresh draw only after a gap
            }
        }
        bits
    };
    // Each must fail, and fail the checks aimed at its kind of bug (not only the
    // total rate).
    let mutants: [(&str, Walk, &[&str]); 5] = [
        ("skip next", skip_next, &["[adjacent] seeds at both 0 and 1", "[chi2]"]),
        ("gap off by one", gap_off_by_one, &["[position] seeds at position 0 ", "[chi2]"]),
        ("shifted", shifted, &["[position] seeds at position 0 "]),
        ("short r", short_r, &["[position] seeds at position 12 of 13", "[chi2]"]),
        ("reuse", reuse, &["[chi2]", "[adjacent]"]),
    ];
    for (name, walk, must) in mutants {
        for (len, windows) in [(64u32, 100_000u64), (13, 100_000)] {
            let stats = collect(windows, len, |w| walk(key, &t, w, len));
            let failures = bernoulli_failures(&stats, gamma);
            if std::env::var_os("SAMPLER_STATS_VERBOSE").is_some() {
                eprintln!("{name} (len {len}): {} failures", failures.len());
                for f in failures.iter().take(4) {
                    eprintln!("    {}", &f[..f.len().min(150)]);
                }
            }
            assert!(!failures.is_empty(), "{name} (len {len}) passed the checks");
            for m in must.iter().filter(|m| len == 13 || !m.contains("of 13")) {
                assert!(
                    failures.iter().any(|f| f.starts_with(m)),
                    "{name} (len {len}) did not fail `{m}`: {failures:?}"
                );
            }
        }
    }
    // γ 3% too high passes the walk but not the rates.
    let t_hi = thresholds(gamma * 1.03);
    let stats = collect(300_000, 64, |w| reference_window(key, &t_hi, w, 64));
    assert!(check_bernoulli(&stats, gamma).is_err(), "γ 3% high passed the checks");
    // The correct walk, written from the docs, passes.
    let stats = collect(300_000, 64, |w| reference_window(key, &t, w, 64));
    check_bernoulli(&stats, gamma).unwrap();
}

// ---------------------------------------------------------------- windows and planes

/// A plan of `cfg`'s geometry on `shape` whose γ is exactly `gamma` (the Paper γ of
/// the configuration, scaled).
fn plan_scaled_to(gamma: f64, block: Block, placement: Placement, shape: Shape, key: RngKey) -> Plan {
    let base = DropBlockConfig::builder(block, 1.0).placement(placement).build().unwrap();
    let probe = Plan::new(&base, shape, key).unwrap();
    let cfg =
        DropBlockConfig::builder(block, 1.0).placement(placement).gamma_scale(gamma / probe.gamma()).build().unwrap();
    let plan = Plan::new(&cfg, shape, key).unwrap();
    assert!((plan.gamma() - gamma).abs() < 1e-12, "γ {} instead of {gamma}", plan.gamma());
    plan
}

/// Planes longer than a window (contract v2, S > 64): a 25 x 200 seed grid is 79
/// windows, the last of 8 cells. The rate at each position of a window, in the
/// short last window, and independence across window and plane boundaries.
#[test]
fn planes_longer_than_a_window() {
    let gamma = 0.05;
    let (planes, h, w) = (3_000usize, 25usize, 206usize);
    let shape = Shape::new(3, planes / 3, h, w).unwrap();
    let plan = plan_scaled_to(
        gamma,
        Block::new(1, 7).unwrap(),
        Placement::Valid,
        shape,
        RngKey::new(0x5EED_0004, 51).unwrap(),
    );
    let g = *plan.geometry();
    assert_eq!((g.seed_cells, g.planes_per_window, g.windows_per_group), (5_000, 1, 79));
    assert_eq!(plan.windows(), 79 * planes as u64);

    let mut at = [0u64; 64];
    let (mut full, mut last_cells, mut pairs_across, mut pairs_next_window, mut pairs_across_planes) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut prev_first, mut prev_last, mut pairs_first_windows) = (0u64, 0u64, 0u64);
    for p in 0..planes {
        let seeds = plan.seed_plane(p).unwrap();
        assert_eq!(seeds.len(), 79);
        for (i, &word) in seeds.iter().enumerate() {
            // The plane's words are its windows p·m + i, in order.
            let window = (p * 79 + i) as u64;
            let len = plan.window_len(window).unwrap();
            assert_eq!(len, if i == 78 { 8 } else { 64 });
            assert_eq!(word, plan.sample_window(window, len).unwrap(), "plane {p} window {i}");
            if i < 78 {
                full += 1;
                for (x, a) in at.iter_mut().enumerate() {
                    *a += word >> x & 1;
                }
                // The last cell of this window and the first of the next.
                pairs_across += (word >> 63) & seeds[i + 1] & 1;
                // Cell c of this window and cell c of the next (full windows only).
                if i + 1 < 78 {
                    pairs_next_window += (word & seeds[i + 1]).count_ones() as u64;
                }
            } else {
                assert_eq!(word >> 8, 0, "a seed past the plane's last cell (plane {p})");
                last_cells += word.count_ones() as u64;
            }
        }
        if p > 0 {
            // Cell c of a plane's 8-cell last window and cell c of the next plane's
            // first window; cell c of both planes' first windows.
            pairs_across_planes += (prev_last & seeds[0] & 0xFF).count_ones() as u64;
            pairs_first_windows += (prev_first & seeds[0]).count_ones() as u64;
        }
        (prev_first, prev_last) = (seeds[0], seeds[78]);
    }
    for (x, &c) in at.iter().enumerate() {
        check_count(&format!("seeds at window position {x}"), c, full, gamma).unwrap();
    }
    check_count("seeds in the 8-cell windows", last_cells, 8 * planes as u64, gamma).unwrap();
    check_count("seeds at both sides of a window boundary", pairs_across, full, gamma * gamma).unwrap();
    check_count("seeds at c of adjacent windows", pairs_next_window, 64 * (full - planes as u64), gamma * gamma)
        .unwrap();
    let boundaries = planes as u64 - 1;
    check_count("seeds at c across a plane boundary", pairs_across_planes, 8 * boundaries, gamma * gamma).unwrap();
    check_count("seeds at c of adjacent planes' first windows", pairs_first_windows, 64 * boundaries, gamma * gamma)
        .unwrap();
}

/// Windows holding several planes (contract v2, S <= 64): a 3 x 3 seed grid puts
/// q = 7 planes in a window of 63 cells, and a plane count that is not a multiple
/// of 7 leaves a last window of 3 planes. Rates per position, in the short last
/// window, and independence between neighbouring planes inside a window and
/// across windows.
#[test]
fn windows_of_several_planes() {
    let gamma = 0.05;
    let planes = 7 * 30_000 + 3;
    let shape = Shape::new(1, planes, 5, 5).unwrap();
    let plan =
        plan_scaled_to(gamma, Block::square(3).unwrap(), Placement::Valid, shape, RngKey::new(0x5EED_0008, 0).unwrap());
    let g = *plan.geometry();
    assert_eq!((g.seed_cells, g.planes_per_window, g.windows_per_group), (9, 7, 1));
    let windows = plan.windows();
    assert_eq!(windows, 30_001);
    assert_eq!(plan.window_len(windows - 1).unwrap(), 27);
    assert!(plan.window_len(windows).is_err());

    let mut at = [0u64; 63];
    let (mut inside, mut across, mut short) = (0u64, 0u64, 0u64);
    let mut prev = 0u64;
    for w in 0..windows {
        let len = plan.window_len(w).unwrap();
        let word = plan.sample_window(w, len).unwrap();
        assert_eq!(word >> len, 0, "a seed past the window's last cell (window {w})");
        if len == 63 {
            for (x, a) in at.iter_mut().enumerate() {
                *a += word >> x & 1;
            }
            // Cell c of plane j and cell c of plane j + 1 in the same window.
            inside += (word & word >> 9 & ((1u64 << 54) - 1)).count_ones() as u64;
        } else {
            short += word.count_ones() as u64;
        }
        if w > 0 {
            // Cell c of the previous window's last plane and of this window's first.
            across += (prev >> 54 & word & 0x1ff).count_ones() as u64;
        }
        prev = word;
        // The planes read their own 9 bits of the window.
        if w % 1_000 == 0 {
            for j in 0..(len / 9) as usize {
                let p = w as usize * 7 + j;
                assert_eq!(plan.seed_plane(p).unwrap(), vec![word >> (9 * j) & 0x1ff], "plane {p}");
            }
        }
    }
    let full = windows - 1;
    for (x, &c) in at.iter().enumerate() {
        check_count(&format!("seeds at window position {x}"), c, full, gamma).unwrap();
    }
    // The short last window, over many keys (one window per key is too few).
    let keys = 20_000u64;
    for o in 0..keys {
        let key = RngKey::new(0x5EED_0009, 17 * o).unwrap();
        short += plan.with_key(key).sample_window(windows - 1, 27).unwrap().count_ones() as u64;
    }
    check_count("seeds in the 27-cell window", short, 27 * (keys + 1), gamma).unwrap();
    check_count("seeds at c of planes j, j+1 of a window", inside, 54 * full, gamma * gamma).unwrap();
    check_count("seeds at c of the last and first planes of adjacent windows", across, 9 * full, gamma * gamma)
        .unwrap();
}

// ---------------------------------------------------------------- extreme rates

#[test]
fn gamma_zero_gives_no_seeds() {
    let plan = plan_with_gamma(0.0, one_cell(), 3, 0);
    for i in 0..20_000u64 {
        assert_eq!(plan.sample_window(scrambled(i), 64).unwrap(), 0);
        assert_eq!(plan.sample_window(i, 13).unwrap(), 0);
    }
}

#[test]
fn gamma_near_zero() {
    // 1e-6 per cell: 192e6 cells expect 192 seeds.
    let gamma = 1e-6;
    let plan = plan_with_gamma(gamma, one_cell(), 0x5EED_0005, 0);
    let windows = 3_000_000u64;
    let mut seeds = 0u64;
    for i in 0..windows {
        seeds += plan.sample_window(scrambled(i), 64).unwrap().count_ones() as u64;
    }
    check_count("seeds at γ = 1e-6", seeds, windows * 64, gamma).unwrap();
    assert!(seeds > 0);
}

#[test]
fn gamma_near_one() {
    // 1 - 1e-9: a cell stays empty with probability ~1e-9 (T quantisation: ~1.2e-9).
    let plan = plan_with_gamma(1.0 - 1e-9, one_cell(), 0x5EED_0006, 0);
    let mut empty = 0u64;
    let windows = 20_000u64;
    for i in 0..windows {
        empty += 64 - plan.sample_window(scrambled(i), 64).unwrap().count_ones() as u64;
        empty += 13 - plan.sample_window(i, 13).unwrap().count_ones() as u64;
    }
    // 1.5e6 cells: about 0.002 expected.
    assert!(empty <= 3, "{empty} empty cells at γ = 1 - 1e-9");

    // γ >= 1: every cell, exactly.
    for gamma in [1.0, 1.5, 40.0] {
        let plan = plan_with_gamma(gamma, one_cell(), 9, 17);
        for len in 1..=64u32 {
            for i in 0..50u64 {
                assert_eq!(plan.sample_window(scrambled(i), len).unwrap(), low_mask(len), "γ {gamma}, len {len}");
            }
        }
    }

    // 0.999: the empty cells are Bernoulli(0.001).
    let gamma = 0.999;
    let plan = plan_with_gamma(gamma, one_cell(), 0x5EED_0007, 0);
    let windows = 150_000u64;
    let mut empty_at = [0u64; 64];
    for i in 0..windows {
        let empty = !plan.sample_window(scrambled(i), 64).unwrap();
        for (x, e) in empty_at.iter_mut().enumerate() {
            *e += (empty >> x) & 1;
        }
    }
    let total: u64 = empty_at.iter().sum();
    check_count("empty cells at γ = 0.999", total, windows * 64, 1.0 - gamma).unwrap();
    for (x, &e) in empty_at.iter().enumerate() {
        check_count(&format!("empty cells at position {x}, γ = 0.999"), e, windows, 1.0 - gamma).unwrap();
    }
    // The last cell of a full window is where a quantised stop rule would show.
    assert!(empty_at[63] > 0 && empty_at[0] > 0);
}

// ---------------------------------------------------------------- keys and offsets

#[test]
fn offsets_give_independent_grids_and_keys_replay() {
    let gamma = 0.1;
    let shape = Shape::new(2, 2, 100, 100).unwrap();
    let cfg = DropBlockConfig::builder(Block::new(1, 1).unwrap(), 1.0).gamma_scale(gamma).build().unwrap();
    let grids = |key: RngKey| common::seed_windows(&Plan::new(&cfg, shape, key).unwrap());
    let cells = 4 * 100 * 100u64;
    let seeds = |g: &[u64]| g.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    let both = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| (x & y).count_ones() as u64).sum::<u64>();

    let mut gen = Generator::new(0xDB_2018);
    let keys: Vec<RngKey> = (0..4).map(|_| gen.next_key().unwrap()).collect();
    assert_eq!(keys.iter().map(|k| k.offset()).collect::<Vec<_>>(), vec![0, 17, 34, 51]);
    assert!(keys.iter().all(|k| k.seed() == 0xDB_2018));
    assert_eq!(gen.offset(), 68);

    let g: Vec<Vec<u64>> = keys.iter().map(|&k| grids(k)).collect();
    for (i, gi) in g.iter().enumerate() {
        check_count(&format!("seeds with key {i}"), seeds(gi), cells, gamma).unwrap();
        // The same key replays the same grid, also through a resumed generator.
        assert_eq!(*gi, grids(keys[i]));
        let mut resumed = Generator::from_state(0xDB_2018, 17 * i as u64);
        assert_eq!(*gi, grids(resumed.next_key().unwrap()));
        for (j, gj) in g.iter().enumerate().skip(i + 1) {
            assert_ne!(gi, gj, "keys {i} and {j} gave the same grid");
            check_count(&format!("seeds in both grid {i} and grid {j}"), both(gi, gj), cells, gamma * gamma).unwrap();
        }
    }
    // Another seed, same offset.
    let other = grids(RngKey::new(0xDB_2019, 0).unwrap());
    assert_ne!(other, g[0]);
    check_count("seeds in both seed 0xDB2018 and 0xDB2019", both(&other, &g[0]), cells, gamma * gamma).unwrap();
    // Neighbouring offsets share counter blocks, but the grids still differ.
    let next = grids(RngKey::new(0xDB_2018, 1).unwrap());
    assert_ne!(next, g[0]);
    // The largest offset is usable; one more is refused.
    assert!(RngKey::new(1, RngKey::MAX_OFFSET).is_ok());
    assert!(RngKey::new(1, RngKey::MAX_OFFSET + 1).is_err());
    let last = grids(RngKey::new(0xDB_2018, RngKey::MAX_OFFSET).unwrap());
    check_count("seeds at the largest offset", seeds(&last), cells, gamma).unwrap();
}
