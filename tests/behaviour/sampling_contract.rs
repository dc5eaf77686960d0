//! The sampling contract (version 3) against known answers computed independently.
//!
//! `tests/fixtures/sampling_contract.json` is written by
//! `scripts/fixtures/sampling_contract.py`, a pure-Python implementation of the
//! contract written from the crate documentation (Philox4x32-10 included, checked
//! against Random123's known-answer vectors), never from the crate's output. For
//! each case it records γ, the thresholds, the window layout, every window's seed
//! word, every mask plane's seeds, the key's forks (`RngKey::fork`) and, for small
//! tensors, the keep mask; this test requires the crate to produce exactly those.
//! `tests/fixtures/thresholds.json`, from the same script, holds the thresholds
//! alone for γs at the edges of their exact evaluation and on a grid of rates.
//! It only reads the committed JSON (scripts/lint.sh checks that the script still
//! writes it).
//!
//! The fixture must also keep covering the contract's edge cases (one seed cell,
//! seed grids that do and do not divide 64, exactly 64 and 65 cells, thousands of
//! cells, every sharing mode, 64-bit seeds and offsets, γ ≥ 1 and tiny γ, 1D and
//! 3D seed grids, miguelvr's anchor and γ, ExactRate's γ), which `fixture_covers_the_contract_edges`
//! checks from the fixture's own numbers.

use dropblock::config::{Anchor, GammaRule};
use dropblock::sampling::{thresholds, Plan};
use dropblock::{cpu, Block, DropBlockConfig, Mode, Placement, RngKey, Shape, Sharing};
use serde_json::Value;

const FIXTURE: &str = include_str!("../fixtures/sampling_contract.json");
const THRESHOLDS: &str = include_str!("../fixtures/thresholds.json");
const WINDOW: u64 = 64;

struct Case {
    index: usize,
    what: String,
    rank: usize,
    n: usize,
    c: usize,
    d: usize,
    h: usize,
    w: usize,
    kd: u32,
    kh: u32,
    kw: u32,
    anchor: String,
    gamma_rule: String,
    drop_prob: f64,
    gamma_scale: f64,
    placement: String,
    sharing: String,
    seed: u64,
    offset: u64,
    gamma: f64,
    thresholds: Vec<u64>,
    seed_d: u32,
    seed_h: u32,
    seed_w: u32,
    s: u64,
    planes: usize,
    q: u64,
    m: u64,
    windows: u64,
    window_lens: Vec<u32>,
    window_words: Vec<u64>,
    seed_planes: Vec<Vec<u64>>,
    keep_mask: Option<Vec<u8>>,
    /// `(stream, seed of the key's fork for it)`.
    forks: Vec<(u64, u64)>,
}

impl Case {
    /// Names the case in assertion messages.
    fn name(&self) -> String {
        format!(
            "case {} ({}: {:?}, block {:?}, {} {}, gamma {}, sharing {})",
            self.index,
            self.what,
            self.dims(),
            self.block_sizes(),
            self.placement,
            self.anchor,
            self.gamma_rule,
            self.sharing
        )
    }

    /// `[N, C, spatial...]` of the case's rank.
    fn dims(&self) -> Vec<usize> {
        let spatial = [self.d, self.h, self.w];
        [self.n, self.c].into_iter().chain(spatial[3 - self.rank..].iter().copied()).collect()
    }

    /// The block's sizes along the case's spatial axes.
    fn block_sizes(&self) -> Vec<u32> {
        [self.kd, self.kh, self.kw][3 - self.rank..].to_vec()
    }

    /// A choice by the name the fixture and the crate both spell it (`FromStr`).
    fn choice<T: std::str::FromStr<Err = String>>(&self, name: &str) -> T {
        name.parse().unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }

    fn config(&self) -> DropBlockConfig {
        let placement: Placement = self.choice(&self.placement);
        let sharing: Sharing = self.choice(&self.sharing);
        let anchor: Anchor = self.choice(&self.anchor);
        let gamma_rule: GammaRule = self.choice(&self.gamma_rule);
        let block = Block::from_sizes(&self.block_sizes())
            .unwrap_or_else(|e| panic!("{}: Block::from_sizes: {e}", self.name()));
        DropBlockConfig::builder(block, self.drop_prob)
            .placement(placement)
            .anchor(anchor)
            .gamma_rule(gamma_rule)
            .sharing(sharing)
            .gamma_scale(self.gamma_scale)
            .build()
            .unwrap_or_else(|e| panic!("{}: config: {e}", self.name()))
    }

    fn shape(&self) -> Shape {
        Shape::from_dims(&self.dims()).unwrap_or_else(|e| panic!("{}: Shape::from_dims: {e}", self.name()))
    }

    fn key(&self) -> RngKey {
        RngKey::new(self.seed, self.offset).unwrap_or_else(|e| panic!("{}: RngKey::new: {e}", self.name()))
    }

    fn plan(&self) -> Plan {
        Plan::new(&self.config(), self.shape(), self.key()).unwrap()
    }
}

fn field<'a>(v: &'a Value, key: &str, i: usize) -> &'a Value {
    v.get(key).unwrap_or_else(|| panic!("case {i}: no `{key}`"))
}

fn uint(v: &Value, key: &str, i: usize) -> u64 {
    field(v, key, i).as_u64().unwrap_or_else(|| panic!("case {i}: `{key}` is not an unsigned integer"))
}

fn text<'a>(v: &'a Value, key: &str, i: usize) -> &'a str {
    field(v, key, i).as_str().unwrap_or_else(|| panic!("case {i}: `{key}` is not a string"))
}

fn array<'a>(v: &'a Value, key: &str, i: usize) -> &'a [Value] {
    field(v, key, i).as_array().unwrap_or_else(|| panic!("case {i}: `{key}` is not an array"))
}

/// A u64 written as a decimal string (JSON numbers are f64 and cannot hold every u64).
fn u64_str(v: &Value, what: &str, i: usize) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("case {i}: {what} is not a string"));
    s.parse().unwrap_or_else(|e| panic!("case {i}: {what} = {s:?} is not a decimal u64: {e}"))
}

/// An f64 written as its shortest round-trip decimal string; `str::parse` rounds correctly.
fn f64_str(v: &Value, key: &str, i: usize) -> f64 {
    let s = text(v, key, i);
    s.parse().unwrap_or_else(|e| panic!("case {i}: `{key}` = {s:?} is not an f64: {e}"))
}

fn narrow<T: TryFrom<u64>>(n: u64, key: &str, i: usize) -> T {
    T::try_from(n).unwrap_or_else(|_| panic!("case {i}: `{key}` = {n} is out of range"))
}

fn parse_case(i: usize, v: &Value) -> Case {
    let gamma_bits = text(v, "gamma_bits", i);
    let gamma = f64::from_bits(
        u64::from_str_radix(gamma_bits, 16)
            .unwrap_or_else(|e| panic!("case {i}: `gamma_bits` = {gamma_bits:?} is not hex: {e}")),
    );
    let keep_mask = v.get("keep_mask").map(|m| {
        m.as_str()
            .unwrap_or_else(|| panic!("case {i}: `keep_mask` is not a string"))
            .bytes()
            .enumerate()
            .map(|(k, b)| match b {
                b'0' => 0,
                b'1' => 1,
                _ => panic!("case {i}: `keep_mask` character {k} is {:?}, not '0' or '1'", b as char),
            })
            .collect()
    });
    Case {
        index: i,
        what: text(v, "what", i).to_owned(),
        rank: narrow(uint(v, "rank", i), "rank", i),
        n: narrow(uint(v, "n", i), "n", i),
        c: narrow(uint(v, "c", i), "c", i),
        d: narrow(uint(v, "d", i), "d", i),
        h: narrow(uint(v, "h", i), "h", i),
        w: narrow(uint(v, "w", i), "w", i),
        kd: narrow(uint(v, "kd", i), "kd", i),
        kh: narrow(uint(v, "kh", i), "kh", i),
        kw: narrow(uint(v, "kw", i), "kw", i),
        anchor: text(v, "anchor", i).to_owned(),
        gamma_rule: text(v, "gamma_rule", i).to_owned(),
        drop_prob: f64_str(v, "drop_prob", i),
        gamma_scale: f64_str(v, "gamma_scale", i),
        placement: text(v, "placement", i).to_owned(),
        sharing: text(v, "sharing", i).to_owned(),
        seed: u64_str(field(v, "seed", i), "`seed`", i),
        offset: u64_str(field(v, "offset", i), "`offset`", i),
        gamma,
        thresholds: array(v, "thresholds", i)
            .iter()
            .enumerate()
            .map(|(j, t)| t.as_u64().unwrap_or_else(|| panic!("case {i}: threshold {j} is not an unsigned integer")))
            .collect(),
        seed_d: narrow(uint(v, "seed_d", i), "seed_d", i),
        seed_h: narrow(uint(v, "seed_h", i), "seed_h", i),
        seed_w: narrow(uint(v, "seed_w", i), "seed_w", i),
        s: uint(v, "S", i),
        planes: narrow(uint(v, "planes", i), "planes", i),
        q: uint(v, "q", i),
        m: uint(v, "m", i),
        windows: uint(v, "windows", i),
        window_lens: array(v, "window_lens", i)
            .iter()
            .enumerate()
            .map(|(w, l)| {
                let l = l.as_u64().unwrap_or_else(|| panic!("case {i}: window_lens[{w}] is not an unsigned integer"));
                narrow(l, "window_lens", i)
            })
            .collect(),
        window_words: array(v, "window_words", i)
            .iter()
            .enumerate()
            .map(|(w, x)| u64_str(x, &format!("window_words[{w}]"), i))
            .collect(),
        seed_planes: array(v, "seed_planes", i)
            .iter()
            .enumerate()
            .map(|(p, words)| {
                words
                    .as_array()
                    .unwrap_or_else(|| panic!("case {i}: seed_planes[{p}] is not an array"))
                    .iter()
                    .enumerate()
                    .map(|(k, x)| u64_str(x, &format!("seed_planes[{p}][{k}]"), i))
                    .collect()
            })
            .collect(),
        keep_mask,
        forks: array(v, "forks", i)
            .iter()
            .map(|f| {
                let pair = f.as_array().filter(|p| p.len() == 2);
                let pair = pair.unwrap_or_else(|| panic!("case {i}: a fork is not [stream, seed]"));
                (u64_str(&pair[0], "a fork's stream", i), u64_str(&pair[1], "a fork's seed", i))
            })
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    let root: Value = serde_json::from_str(FIXTURE).expect("tests/fixtures/sampling_contract.json parses");
    root.as_array().expect("the fixture file is a list").iter().enumerate().map(|(i, v)| parse_case(i, v)).collect()
}

/// `RngKey::fork` derives each stream's key as the docs say: the known answers'
/// seeds, the same offset.
#[test]
fn forks_match_the_known_answers() {
    let mut checked = 0;
    for c in cases() {
        let key = RngKey::new(c.seed, c.offset).unwrap();
        for &(stream, seed) in &c.forks {
            let fork = key.fork(stream);
            assert_eq!((fork.seed(), fork.offset()), (seed, c.offset), "{}: stream {stream}", c.name());
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} forks in the fixture");
}

/// The fixture's numbers agree with each other and with the contract's layout
/// formulas, so the coverage checks below can trust them.
#[test]
fn fixture_is_self_consistent() {
    for c in cases() {
        let name = c.name();
        assert_eq!(c.thresholds.len(), 64, "{name}: {} thresholds", c.thresholds.len());
        assert_eq!(c.s, c.seed_d as u64 * c.seed_h as u64 * c.seed_w as u64, "{name}: S is not the seed grid's cells");
        assert_eq!(c.q, (WINDOW / c.s).max(1), "{name}: q");
        assert_eq!(c.m, c.s.div_ceil(WINDOW), "{name}: m");
        assert_eq!(c.windows, (c.planes as u64).div_ceil(c.q) * c.m, "{name}: windows");
        assert_eq!(c.window_lens.len() as u64, c.windows, "{name}: window_lens has the wrong length");
        assert_eq!(c.window_words.len() as u64, c.windows, "{name}: window_words has the wrong length");
        assert_eq!(c.seed_planes.len(), c.planes, "{name}: seed_planes has the wrong length");
        let cells: u64 = c.window_lens.iter().map(|&l| l as u64).sum();
        assert_eq!(cells, c.planes as u64 * c.s, "{name}: the windows do not hold every seed cell once");
        for (p, words) in c.seed_planes.iter().enumerate() {
            assert_eq!(words.len() as u64, c.m, "{name}: seed_planes[{p}] has {} words", words.len());
        }
        if let Some(mask) = &c.keep_mask {
            assert_eq!(mask.len(), c.n * c.c * c.d * c.h * c.w, "{name}: keep_mask has the wrong length");
        }
    }
}

#[test]
fn fixture_covers_the_contract_edges() {
    let cases = cases();
    let any = |what: &str, f: &dyn Fn(&Case) -> bool| {
        assert!(cases.iter().any(f), "no fixture case covers: {what}");
    };
    let short_last = |c: &Case| c.window_lens.last().is_some_and(|&l| l < c.window_lens[0]);
    let even_block = |c: &Case| c.kh.min(c.h as u32).is_multiple_of(2) || c.kw.min(c.w as u32).is_multiple_of(2);
    for rank in 1..=3 {
        any(&format!("spatial rank {rank} with a keep mask"), &|c| c.rank == rank && c.keep_mask.is_some());
    }
    any("a 3D seed grid of more than 64 cells", &|c| c.rank == 3 && c.s > 64);
    any("a 1D seed grid of one cell", &|c| c.rank == 1 && c.s == 1);
    any("a centered-right anchor with an even block", &|c| c.anchor == "centered-right" && even_block(c));
    any("a centered-right anchor with a block past the map", &|c| {
        c.anchor == "centered-right" && (c.kd as usize > c.d || c.kh as usize > c.h || c.kw as usize > c.w)
    });
    any("the per-block gamma rule in 3D", &|c| c.gamma_rule == "per-block" && c.rank == 3);
    any("the exact-rate gamma rule (its Newton steps, no libm)", &|c| c.gamma_rule == "exact" && c.rank == 2);
    any("the exact-rate gamma rule in 3D, centered-right", &|c| {
        c.gamma_rule == "exact" && c.rank == 3 && c.anchor == "centered-right"
    });

    any("S = 1 with P not a multiple of q = 64", &|c| c.s == 1 && c.q == 64 && !(c.planes as u64).is_multiple_of(c.q));
    any("S < 64, 64 mod S != 0, q = 1", &|c| c.s < 64 && !WINDOW.is_multiple_of(c.s) && c.q == 1);
    any("S < 64, 64 mod S != 0, q > 1, P not a multiple of q", &|c| {
        c.s < 64 && !WINDOW.is_multiple_of(c.s) && c.q > 1 && !(c.planes as u64).is_multiple_of(c.q) && short_last(c)
    });
    any("S = 64", &|c| c.s == 64);
    any("S = 65 (m = 2, second window of 1 cell)", &|c| c.s == 65 && c.m == 2 && c.window_lens[1] == 1);
    any("S > 4096 with a short last window", &|c| c.s > 4096 && c.s % WINDOW != 0 && c.planes > 1);
    for sharing in ["none", "channels", "batch", "all"] {
        any(&format!("sharing {sharing}"), &|c| c.sharing == sharing);
    }
    any("Anywhere placement", &|c| c.placement == "anywhere");
    any("Anywhere placement with an even block", &|c| c.placement == "anywhere" && even_block(c));
    any("Valid placement with an even block", &|c| c.placement == "valid" && even_block(c));
    any("a block clipped to the map", &|c| c.kh as usize > c.h || c.kw as usize > c.w);
    any("a seed >= 2^32", &|c| c.seed >= 1 << 32);
    any("an offset >= 2^32", &|c| c.offset >= 1 << 32);
    any("the largest offset, 2^64 - 1 - 16", &|c| c.offset == u64::MAX - 16);
    // A window with at least `b * 4 + 1` seeds takes a draw from counter block `o + b`.
    any("a window whose draws cross a 2^32 boundary of the counter", &|c| {
        let to_boundary = (1u64 << 32) - (c.offset & 0xffff_ffff);
        to_boundary <= 15 && c.window_words.iter().any(|w| u64::from(w.count_ones()) > to_boundary * 4)
    });
    any("gamma >= 1 (every cell a seed)", &|c| c.gamma >= 1.0);
    any("a tiny gamma (< 1e-4)", &|c| c.gamma > 0.0 && c.gamma < 1e-4);
    any("gamma = 0 (all thresholds 0)", &|c| c.gamma == 0.0 && c.drop_prob > 0.0);
    any("window numbers past 255", &|c| c.windows > 256);
    any("a keep mask", &|c| c.keep_mask.is_some());
    any("a keep mask with Anywhere placement", &|c| c.keep_mask.is_some() && c.placement == "anywhere");

    let moderate = cases.iter().filter(|c| (0.05..=0.5).contains(&c.gamma)).count();
    assert!(moderate * 2 > cases.len(), "only {moderate} of {} cases have 0.05 <= gamma <= 0.5", cases.len());
    let seeded = cases.iter().filter(|c| c.window_words.iter().any(|&w| w != 0)).count();
    assert!(seeded * 2 > cases.len(), "only {seeded} of {} cases have any seed", cases.len());
}

#[test]
fn gamma_and_thresholds_match() {
    for c in cases() {
        let name = c.name();
        let plan = c.plan();
        assert_eq!(
            plan.gamma().to_bits(),
            c.gamma.to_bits(),
            "{name}: gamma is {:e} ({:016x}), the fixture says {:e} ({:016x})",
            plan.gamma(),
            plan.gamma().to_bits(),
            c.gamma,
            c.gamma.to_bits()
        );
        let got = plan.sampling().thresholds;
        for (j, (&g, &want)) in got.iter().zip(&c.thresholds).enumerate() {
            assert_eq!(g, want, "{name}: threshold T[{j}] is {g}, the fixture says {want}");
        }
    }
}

/// The thresholds alone, evaluated exactly, at γs where a libm's rounding or a
/// shortcut would show: subnormal and tiny γ (every T is 0 below 2^-38), short
/// binary fractions (γ = 1/4 gives T[0] = 2^30 exactly, where glibc's
/// `expm1(log1p(-γ))` gave 2^30 - 1; six more where it was one under), `(1-γ)^(j+1)` under 2^-54 (T = 2^32 - 1, where
/// libm rounds `1 - (1-γ)^(j+1)` to 1), the largest γ below 1, and a grid of rates.
#[test]
fn thresholds_match_the_exact_known_answers() {
    let root: Value = serde_json::from_str(THRESHOLDS).expect("tests/fixtures/thresholds.json parses");
    let cases = root.as_array().expect("the thresholds file is a list");
    for (i, v) in cases.iter().enumerate() {
        let bits = text(v, "gamma_bits", i);
        let gamma = f64::from_bits(u64::from_str_radix(bits, 16).unwrap_or_else(|e| panic!("case {i}: {bits:?}: {e}")));
        let want: Vec<u64> = array(v, "thresholds", i).iter().map(|t| t.as_u64().expect("a threshold")).collect();
        assert_eq!(thresholds(gamma).to_vec(), want, "case {i}: γ = {gamma:e} ({bits})");
    }
    let saturated = |v: &Value| array(v, "thresholds", 0).iter().any(|t| t.as_u64() == Some((1 << 32) - 1));
    assert!(cases.len() >= 150, "only {} γs", cases.len());
    assert!(cases.iter().any(saturated), "no γ whose thresholds reach 2^32 - 1");
}

#[test]
fn geometry_and_window_layout_match() {
    for c in cases() {
        let name = c.name();
        let plan = c.plan();
        let g = plan.geometry();
        assert_eq!((g.seed_d, g.seed_h, g.seed_w), (c.seed_d, c.seed_h, c.seed_w), "{name}: seed grid");
        assert_eq!(plan.planes(), c.planes, "{name}: planes()");
        assert_eq!(plan.windows(), c.windows, "{name}: windows()");
        for (w, &want) in c.window_lens.iter().enumerate() {
            let got = plan.window_len(w as u64).unwrap_or_else(|e| panic!("{name}: window_len({w}) failed: {e}"));
            assert_eq!(got, want, "{name}: window_len({w}) is {got}, the fixture says {want}");
        }
        assert!(
            plan.window_len(c.windows).is_err(),
            "{name}: window_len({}) succeeds, but the call has only {} windows",
            c.windows,
            c.windows
        );
    }
}

#[test]
fn window_words_match() {
    for c in cases() {
        let name = c.name();
        let plan = c.plan();
        for (w, (&len, &want)) in c.window_lens.iter().zip(&c.window_words).enumerate() {
            let got =
                plan.sample_window(w as u64, len).unwrap_or_else(|e| panic!("{name}: sample_window({w}, {len}): {e}"));
            assert_eq!(
                got,
                want,
                "{name}: window {w} ({len} cells): seed word {got:#018x}, fixture {want:#018x} (xor {:#018x})",
                got ^ want
            );
        }
    }
}

#[test]
fn seed_planes_match() {
    for c in cases() {
        let name = c.name();
        let plan = c.plan();
        for (p, want) in c.seed_planes.iter().enumerate() {
            let got = plan.seed_plane(p).unwrap_or_else(|e| panic!("{name}: seed_plane({p}): {e}"));
            assert_eq!(got.len(), want.len(), "{name}: seed_plane({p}) has {} words, want {}", got.len(), want.len());
            for (k, (&g, &x)) in got.iter().zip(want).enumerate() {
                assert_eq!(g, x, "{name}: seed_plane({p}) word {k} is {g:#018x}, the fixture says {x:#018x}");
            }
        }
    }
}

#[test]
fn keep_masks_match() {
    for c in cases() {
        let Some(want) = &c.keep_mask else { continue };
        let name = c.name();
        let saved = cpu::sample(&c.config(), c.shape(), c.key(), Mode::Train)
            .unwrap_or_else(|e| panic!("{name}: cpu::sample: {e}"));
        let got = saved.keep_mask().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: keep_mask has {} elements, want {}", got.len(), want.len());
        let differ: Vec<usize> = (0..got.len()).filter(|&k| got[k] != want[k]).collect();
        if let Some(&k) = differ.first() {
            let plane_len = c.d * c.h * c.w;
            let (slice, cell) = (k / plane_len, k % plane_len);
            panic!(
                "{name}: {} keep-mask elements differ; first at (n {}, c {}, d {}, h {}, w {}): crate {}, fixture {}",
                differ.len(),
                slice / c.c,
                slice % c.c,
                cell / (c.h * c.w),
                cell / c.w % c.h,
                cell % c.w,
                got[k],
                want[k]
            );
        }
    }
}
