//! A tensor past 2^31 elements on the CPU path (64-bit indexing end to end), in
//! place in bf16: 4.3 GB. Opt-in, as it needs that memory and a release build to
//! run in seconds: `DROPBLOCK_LARGE_TESTS=1 cargo test --release --test
//! large_tensors`. Without it the test is reported as ignored, with the reason.

mod common;

use dropblock::sampling::Plan;
use dropblock::{cpu, DropBlockConfig, Mode, RngKey, Shape};
use half::bf16;
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let name = "bf16_past_2_pow_31_elements_in_place";
    let trial = if std::env::var("DROPBLOCK_LARGE_TESTS").is_ok_and(|v| v == "1") {
        Trial::test(name, past_2_pow_31)
    } else {
        common::cannot_run(name, "needs 4.3 GB and a release build: set DROPBLOCK_LARGE_TESTS=1", false)
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

/// Every element is `x · factor`, with 0 where the contract's seeds drop its cell:
/// the mask and the kept count come from `Plan::seed_plane` (itself checked
/// against an independent implementation in the behaviour suite) grown here into
/// 7 x 7 blocks by word shifts, not from the crate's own mask. Global
/// normalisation divides a numel past 2^31 (an i32 would wrap) by a kept count
/// this test makes itself; both drops and keeps occur past 2^31.
fn past_2_pow_31() -> Result<(), Failed> {
    let shape = Shape::new(1, 2, 32_768, 32_769).unwrap();
    assert!(shape.numel() > 1 << 31);
    let value = |e: usize| bf16::from_f32(((e % 251) as f32 - 125.0) / 8.0);
    let mut data: Vec<bf16> = (0..shape.numel()).map(value).collect();
    let cfg = DropBlockConfig::paper(7, 0.1).unwrap();
    let key = RngKey::new(31, 0).unwrap();
    let saved = cpu::forward_inplace(&cfg, shape, key, Mode::Train, &mut data).unwrap();
    let plan = Plan::new(&cfg, shape, key).unwrap();
    let planes: Vec<Dropped> =
        (0..shape.c()).map(|c| Dropped::grow(&plan.seed_plane(c).unwrap(), shape.h(), shape.w(), 7)).collect();
    let kept: u64 = planes.iter().map(|p| p.kept()).sum();
    if saved.kept() != kept {
        return Err(format!("kept {}, the contract's seeds keep {kept}", saved.kept()).into());
    }
    let scale = (shape.numel() as f64 / kept as f64) as f32;
    if saved.scales() != [scale] {
        return Err(format!("scales {:?} for {kept} kept of {}: want {scale}", saved.scales(), shape.numel()).into());
    }
    let (hw, w) = (shape.plane_len(), shape.w());
    let (mut kept_past, mut dropped_past) = (0u64, 0u64);
    for (e, got) in data.iter().enumerate() {
        let (c, cell) = (e / hw, e % hw);
        let keep = !planes[c].is_dropped(cell / w, cell % w);
        let want = bf16::from_f32(value(e).to_f32() * if keep { scale } else { 0.0 });
        if !common::same(*got, want) {
            return Err(format!("element {e}: {got} instead of {want} (kept: {keep})").into());
        }
        if e >= 1 << 31 {
            *if keep { &mut kept_past } else { &mut dropped_past } += 1;
        }
    }
    if kept_past == 0 || dropped_past == 0 {
        return Err(format!("past 2^31: {kept_past} kept, {dropped_past} dropped; the test needs both").into());
    }
    Ok(())
}

/// One plane's dropped cells, a row of bits per map row.
struct Dropped {
    words_per_row: usize,
    w: usize,
    bits: Vec<u64>,
}

impl Dropped {
    /// Valid placement with a `k` x `k` block: the seed grid is `(h - k + 1) x (w -
    /// k + 1)`, numbered row-major, and a seed at `(y, x)` drops rows `y..y + k`,
    /// columns `x..x + k`.
    fn grow(seeds: &[u64], h: usize, w: usize, k: usize) -> Self {
        let (seed_h, seed_w, words_per_row) = (h - k + 1, w - k + 1, w.div_ceil(64));
        // Each seed row's seeds, then spread over the k columns each drops.
        let mut rows = vec![0u64; seed_h * words_per_row];
        for (i, &word) in seeds.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let cell = i * 64 + rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let (y, x) = (cell / seed_w, cell % seed_w);
                rows[y * words_per_row + x / 64] |= 1 << (x % 64);
            }
        }
        for row in rows.chunks_mut(words_per_row) {
            let seeded = row.to_vec();
            for shift in 1..k {
                for j in 0..words_per_row {
                    let carry = if j > 0 { seeded[j - 1] >> (64 - shift) } else { 0 };
                    row[j] |= seeded[j] << shift | carry;
                }
            }
        }
        // Then over the k rows.
        let mut bits = vec![0u64; h * words_per_row];
        for (r, out) in bits.chunks_mut(words_per_row).enumerate() {
            for y in r.saturating_sub(k - 1)..=r.min(seed_h - 1) {
                out.iter_mut().zip(&rows[y * words_per_row..][..words_per_row]).for_each(|(o, s)| *o |= s);
            }
        }
        Self { words_per_row, w, bits }
    }

    fn is_dropped(&self, row: usize, col: usize) -> bool {
        self.bits[row * self.words_per_row + col / 64] >> (col % 64) & 1 == 1
    }

    fn kept(&self) -> u64 {
        let rows = self.bits.len() / self.words_per_row;
        (rows * self.w) as u64 - self.bits.iter().map(|b| b.count_ones() as u64).sum::<u64>()
    }
}
