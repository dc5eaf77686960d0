//! `mask::grow_blocks` against block placements computed by the peers' own code.
//!
//! `tests/fixtures/block_placement.json` is written by
//! `scripts/fixtures/block_placement.py` (real torch: torchvision's `drop_block2d`
//! lines for `Placement::Valid`, TF "SAME" / timm >= 1.0.23 max-pool anchoring for
//! `Placement::Anywhere`). `tests/fixtures/nd_placement.json` is written by
//! `scripts/fixtures/nd_placement.py` (torchvision's `drop_block3d`, miguelvr's
//! DropBlock2D/3D and keras-drop-block's DropBlock1D). This test only reads the
//! committed JSON.

use dropblock::abi::DropBlockGeometry;
use dropblock::mask::grow_blocks;
use dropblock::sampling::Plan;
use dropblock::{Anchor, Block, DropBlockConfig, Placement, RngKey, Shape};
use serde_json::Value;

const FIXTURE: &str = include_str!("../fixtures/block_placement.json");
const ND_FIXTURE: &str = include_str!("../fixtures/nd_placement.json");

struct Case {
    placement: String,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    seeds: Vec<Vec<u8>>,
    dropped: Vec<Vec<u8>>,
}

fn uint(v: &Value, key: &str, i: usize) -> u32 {
    let n = v[key].as_u64().unwrap_or_else(|| panic!("case {i}: `{key}` is not an unsigned integer"));
    u32::try_from(n).unwrap_or_else(|_| panic!("case {i}: `{key}` = {n} does not fit u32"))
}

fn grid(v: &Value, key: &str, i: usize) -> Vec<Vec<u8>> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("case {i}: `{key}` is not an array"))
        .iter()
        .enumerate()
        .map(|(r, row)| {
            row.as_array()
                .unwrap_or_else(|| panic!("case {i}: `{key}` row {r} is not an array"))
                .iter()
                .map(|c| match c.as_u64() {
                    Some(b @ (0 | 1)) => b as u8,
                    _ => panic!("case {i}: `{key}` row {r} holds {c}, not 0 or 1"),
                })
                .collect()
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let root: Value = serde_json::from_str(FIXTURE).expect("tests/fixtures/block_placement.json parses");
    root.as_array()
        .expect("the fixture file is a list")
        .iter()
        .enumerate()
        .map(|(i, v)| Case {
            placement: v["placement"].as_str().unwrap_or_else(|| panic!("case {i}: no placement")).to_owned(),
            h: uint(v, "h", i),
            w: uint(v, "w", i),
            kh: uint(v, "kh", i),
            kw: uint(v, "kw", i),
            seeds: grid(v, "seeds", i),
            dropped: grid(v, "dropped", i),
        })
        .collect()
}

/// The crate's own plan for one `1 × 1 × H × W` plane, so the fixtures check
/// the anchoring `Plan` derives as well as `grow_blocks`.
fn plan(i: usize, c: &Case) -> Plan {
    let placement = match c.placement.as_str() {
        "valid" => Placement::Valid,
        "anywhere" => Placement::Anywhere,
        other => panic!("case {i}: unknown placement {other:?}"),
    };
    let cfg = DropBlockConfig::builder(Block::new(c.kh, c.kw).unwrap(), 0.1).placement(placement).build().unwrap();
    let shape = Shape::new(1, 1, c.h as usize, c.w as usize).unwrap();
    Plan::new(&cfg, shape, RngKey::new(0, 0).unwrap()).unwrap()
}

/// The seed grid as [`Plan::seed_plane`] lays it out: bit `i % 64` of word `i / 64`
/// for seed cell `i = y · seed_w + x`.
fn pack_seeds(i: usize, c: &Case, g: &DropBlockGeometry) -> Vec<u64> {
    assert_eq!(
        c.seeds.len(),
        g.seed_h as usize,
        "case {i} ({}): seed grid has {} rows, geometry wants {}",
        c.placement,
        c.seeds.len(),
        g.seed_h
    );
    let mut words = vec![0u64; (g.seed_cells as usize).div_ceil(64)];
    for (y, row) in c.seeds.iter().enumerate() {
        assert_eq!(
            row.len(),
            g.seed_w as usize,
            "case {i} ({}): seed row {y} has {} cells, geometry wants {}",
            c.placement,
            row.len(),
            g.seed_w
        );
        for (x, &b) in row.iter().enumerate() {
            if b == 1 {
                let cell = y * g.seed_w as usize + x;
                words[cell / 64] |= 1 << (cell % 64);
            }
        }
    }
    words
}

#[test]
fn fixtures_cover_both_placements_and_even_blocks() {
    let cases = cases();
    assert!(cases.len() >= 20, "only {} fixture cases", cases.len());
    let valid = cases.iter().filter(|c| c.placement == "valid").count();
    let anywhere = cases.iter().filter(|c| c.placement == "anywhere").count();
    assert!(valid > 0, "no valid-placement fixture");
    assert!(anywhere > 0, "no anywhere-placement fixture");
    assert!(
        cases.iter().any(|c| c.placement == "anywhere" && (c.kh % 2 == 0 || c.kw % 2 == 0)),
        "no even-sized anywhere fixture"
    );
    assert!(cases.iter().any(|c| c.placement == "anywhere" && c.kh != c.kw), "no rectangular anywhere fixture");
    assert!(cases.iter().any(|c| c.w > 128), "no fixture wider than two windows");
    assert!(cases.iter().any(|c| c.dropped.iter().flatten().any(|&b| b == 1)), "no fixture drops anything");
}

#[test]
fn grow_blocks_matches_pytorch() {
    for (i, c) in cases().iter().enumerate() {
        let plan = plan(i, c);
        let seeds = pack_seeds(i, c, plan.geometry());
        let (h, w) = (c.h as usize, c.w as usize);
        let mut out = vec![0u64; (h * w).div_ceil(64)];
        let count = grow_blocks(&plan, &seeds, &mut out).unwrap();

        let what = format!("case {i} ({}, {}x{} map, block {}x{})", c.placement, c.h, c.w, c.kh, c.kw);
        assert_eq!(c.dropped.len(), h, "{what}: fixture has {} dropped rows", c.dropped.len());
        let mut expected = 0u64;
        let mut mismatches = Vec::new();
        for (y, row) in c.dropped.iter().enumerate() {
            assert_eq!(row.len(), w, "{what}: fixture dropped row {y} has {} cells", row.len());
            for (x, &want) in row.iter().enumerate() {
                let bit = y * w + x;
                let got = (out[bit / 64] >> (bit % 64)) & 1;
                expected += want as u64;
                if got != want as u64 {
                    mismatches.push((y, x, want, got));
                }
            }
        }
        if let Some(&(y, x, want, got)) = mismatches.first() {
            panic!(
                "{what}: {} cells differ; first at (row {y}, col {x}): PyTorch says {}, grow_blocks says {}",
                mismatches.len(),
                if want == 1 { "dropped" } else { "kept" },
                if got == 1 { "dropped" } else { "kept" },
            );
        }
        let tail_bits = out.len() * 64 - h * w;
        if tail_bits > 0 {
            assert_eq!(out[out.len() - 1] >> (64 - tail_bits), 0, "{what}: bits past H*W are set");
        }
        assert_eq!(count, expected, "{what}: grow_blocks counted {count} dropped cells, PyTorch {expected}");
    }
}

/// 1D, 2D and 3D placements from torchvision's `drop_block3d`, miguelvr's
/// DropBlock2D/3D (even sizes and blocks larger than the map included) and
/// keras-drop-block's DropBlock1D: the crate, configured as the README's table
/// says for each, grows the same seeds into the same cells.
#[test]
fn grow_blocks_matches_the_originals_in_1d_2d_and_3d() {
    let root: Value = serde_json::from_str(ND_FIXTURE).expect("tests/fixtures/nd_placement.json parses");
    let cases = root.as_array().expect("the fixture file is a list");
    let mut sources = std::collections::BTreeMap::new();
    let mut even_or_larger = 0;
    for (i, v) in cases.iter().enumerate() {
        let list = |key: &str| -> Vec<u64> {
            v[key]
                .as_array()
                .unwrap_or_else(|| panic!("case {i}: no `{key}`"))
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        let (size, block, seed_grid) = (list("size"), list("block"), list("seed_grid"));
        let (seeds, dropped) = (list("seeds"), list("dropped"));
        let source = v["source"].as_str().unwrap();
        *sources.entry(source).or_insert(0) += 1;
        let placement: Placement = v["placement"].as_str().unwrap().parse().unwrap();
        let anchor: Anchor = v["anchor"].as_str().unwrap().parse().unwrap();
        even_or_larger += block.iter().zip(&size).any(|(&k, &s)| k % 2 == 0 || k > s) as usize;

        let sizes: Vec<u32> = block.iter().map(|&k| k as u32).collect();
        let cfg = DropBlockConfig::builder(Block::from_sizes(&sizes).unwrap(), 0.1)
            .placement(placement)
            .anchor(anchor)
            .build()
            .unwrap();
        let mut dims = vec![1usize, 1];
        dims.extend(size.iter().map(|&s| s as usize));
        let plan = Plan::new(&cfg, Shape::from_dims(&dims).unwrap(), RngKey::new(0, 0).unwrap()).unwrap();
        let g = plan.geometry();
        let what = format!("case {i} ({source}, map {size:?}, block {block:?})");
        let rank = size.len();
        let grid = [g.seed_d, g.seed_h, g.seed_w].map(u64::from);
        assert_eq!(&grid[3 - rank..], &seed_grid[..], "{what}: seed grid");
        let mut words = vec![0u64; (g.seed_cells as usize).div_ceil(64)];
        for (cell, _) in seeds.iter().enumerate().filter(|(_, &b)| b == 1) {
            words[cell / 64] |= 1 << (cell % 64);
        }
        let cells = dropped.len();
        let mut out = vec![0u64; cells.div_ceil(64)];
        let count = grow_blocks(&plan, &words, &mut out).unwrap();
        let got: Vec<u64> = (0..cells).map(|b| out[b / 64] >> (b % 64) & 1).collect();
        if let Some(at) = (0..cells).find(|&b| got[b] != dropped[b]) {
            panic!(
                "{what}: {} cells differ; first at cell {at}: the original says {}",
                (0..cells).filter(|&b| got[b] != dropped[b]).count(),
                dropped[at]
            );
        }
        assert_eq!(count, dropped.iter().sum::<u64>(), "{what}: count");
    }
    for source in ["torchvision_3d", "miguelvr_2d", "miguelvr_3d", "keras_1d"] {
        assert!(sources.get(source).copied().unwrap_or(0) >= 4, "too few {source} fixtures: {sources:?}");
    }
    assert!(even_or_larger >= 6, "too few even or larger-than-the-map blocks");
}
