//! Fuzzing on stable Rust, as a test with a fixed number of inputs: the `.npy`
//! and PNG readers through the `dropblock` command (mutated valid files), and the
//! library's parsers and builders in process (random and boundary values). The
//! properties: no panic, no abort or signal, no hang, an exit status of 0 or 1
//! with one short line on failure.
//!
//! Each file target runs `DROPBLOCK_FUZZ_INPUTS` inputs (default 2000), the
//! in-process target 150 times that. A failing input is written to
//! `CARGO_TARGET_TMPDIR/fuzz-failures/` and named in the failure; keep it as
//! `tests/fixtures/fuzz-<what>.<ext>`, which every run replays first. Inputs are
//! drawn from a seeded generator, so a run is reproducible from its seed
//! (`DROPBLOCK_FUZZ_SEED`) and count, on any machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dropblock::{Block, DropBlockConfig, GammaRule, Normalize, Placement, RngKey, Shape, Sharing};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("fuzz_npy_reader", || fuzz_files("npy", valid_npy_files(), run_apply)),
        Trial::test("fuzz_png_reader", || fuzz_files("png", vec![valid_png()], run_show)),
        Trial::test("fuzz_parsers_and_builders", fuzz_in_process),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// Inputs per file target.
fn inputs() -> u64 {
    std::env::var("DROPBLOCK_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// A run still going after this long has hung: each input takes milliseconds.
const HANG: Duration = Duration::from_secs(60);

fn rng() -> StdRng {
    let seed = std::env::var("DROPBLOCK_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xF022);
    StdRng::seed_from_u64(seed)
}

/// Where failing inputs are kept.
fn failures_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run of the command, killed as hung past [`HANG`]; `Err` says what went wrong.
fn run(args: &[&str]) -> Result<(), String> {
    let (status, err) = common::status_unless_hung(Command::new(env!("CARGO_BIN_EXE_dropblock")).args(args), HANG)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) if err.trim_end().lines().count() == 1 && err.len() < 400 => Ok(()),
        Some(1) => Err(format!("exit 1 without one short line: {:?}", &err[..err.len().min(400)])),
        code => Err(format!("exit status {code:?} (a panic or a signal): {:?}", &err[..err.len().min(400)])),
    }
}

fn run_apply(input: &Path, out: &Path) -> Result<(), String> {
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    run(&["apply", "--input", i, "--output", o, "--block", "3", "--device", "cpu"])
}

fn run_show(input: &Path, out: &Path) -> Result<(), String> {
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    run(&["show", "--image", i, "--png", o, "--block", "3"])
}

/// A header as numpy writes it, then `data`.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}").into_bytes();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    bytes
}

fn valid_npy_files() -> Vec<Vec<u8>> {
    vec![
        npy("<f4", "(1, 2, 3, 4)", &[0x3f; 96]),
        npy("<f2", "(2, 1, 4, 4)", &[0x3c; 64]),
        npy("|V2", "(1, 1, 5, 5)", &[0x3f; 50]),
    ]
}

/// A valid 4x3 8-bit RGB PNG, made with the `png` crate.
fn valid_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 4, 3);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[90; 36]).unwrap();
    }
    bytes
}

/// One random mutation of `bytes`: flip, set, insert, delete, truncate, splice a
/// bracket run or a big number into the header, or overwrite a length field.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    let len = bytes.len().max(1);
    match rng.random_range(0..8) {
        0 => {
            let i = rng.random_range(0..len).min(bytes.len().saturating_sub(1));
            if !bytes.is_empty() {
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let i = rng.random_range(0..len).min(bytes.len().saturating_sub(1));
            if !bytes.is_empty() {
                bytes[i] = rng.random();
            }
        }
        2 => {
            let i = rng.random_range(0..=bytes.len());
            let run: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
            bytes.splice(i..i, run);
        }
        3 if !bytes.is_empty() => {
            let i = rng.random_range(0..bytes.len());
            let n = rng.random_range(1..=(bytes.len() - i).min(16));
            bytes.drain(i..i + n);
        }
        4 => bytes.truncate(rng.random_range(0..=bytes.len())),
        5 => {
            let i = rng.random_range(0..=bytes.len().min(120));
            let token: &[u8] = match rng.random_range(0..6) {
                0 => b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
                1 => b"((((((((((((((((((((",
                2 => b"99999999999999999999",
                3 => b"4294967296, 4294967296",
                4 => b"-1",
                _ => b"'<f8'",
            };
            bytes.splice(i..i, token.iter().copied());
        }
        6 if bytes.len() >= 12 => {
            // The .npy header length, or a PNG chunk length or dimension.
            let i = [8usize, 16, 20][rng.random_range(0..3)].min(bytes.len() - 4);
            let v: u32 = [0, 1, 0xffff, 0xffff_ffff, 100_000, rng.random()][rng.random_range(0..6)];
            bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => {
            let extra: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            bytes.extend(extra);
        }
    }
}

fn fuzz_files(ext: &str, seeds: Vec<Vec<u8>>, target: fn(&Path, &Path) -> Result<(), String>) -> Result<(), Failed> {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join(format!("in.{ext}")), dir.path().join(format!("out.{ext}")));
    let mut rng = rng();
    let start = Instant::now();
    let mut runs = 0u64;
    // Inputs that once failed (tests/fixtures/fuzz-*.<ext>) first, then the
    // unmutated seeds, which must succeed.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("fuzz-") && name.ends_with(&format!(".{ext}")) {
            target(&p, &out).map_err(|e| format!("regression input {name}: {e}"))?;
        }
    }
    for s in &seeds {
        std::fs::write(&input, s).unwrap();
        std::fs::remove_file(&out).ok();
        target(&input, &out).map_err(|e| format!("a valid seed input failed: {e}"))?;
        // A clean refusal passes `target`; a seed must be read and written.
        if !out.exists() {
            return Err("a valid seed input was refused (no output written)".into());
        }
    }
    while runs < inputs() {
        let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut rng, &mut bytes);
        }
        std::fs::write(&input, &bytes).unwrap();
        if let Err(e) = target(&input, &out) {
            let kept = failures_dir().join(format!("{ext}-{runs}.{ext}"));
            std::fs::write(&kept, &bytes).unwrap();
            return Err(format!("{e} (input kept as {})", kept.display()).into());
        }
        runs += 1;
    }
    eprintln!("fuzz {ext}: {runs} inputs in {:?}", start.elapsed());
    Ok(())
}

/// Random and boundary values into the parsers and builders: each returns a value
/// or a typed error, never a panic.
fn fuzz_in_process() -> Result<(), Failed> {
    let mut rng = rng();
    let floats =
        [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MIN_POSITIVE];
    let ints = [0usize, 1, 2, 7, 65_535, 65_536, u32::MAX as usize, u32::MAX as usize + 1, usize::MAX];
    let start = Instant::now();
    let (mut runs, mut sampled, mut refused) = (0u64, 0u64, 0u64);
    while runs < 150 * inputs() {
        let pick_f = |rng: &mut StdRng| {
            if rng.random_bool(0.5) {
                floats[rng.random_range(0..floats.len())]
            } else {
                rng.random_range(-2.0..3.0)
            }
        };
        let pick_i = |rng: &mut StdRng| {
            if rng.random_bool(0.5) {
                ints[rng.random_range(0..ints.len())]
            } else {
                rng.random_range(0..100)
            }
        };
        let text: String =
            (0..rng.random_range(0..12)).map(|_| b"0123456789xX -+.e,"[rng.random_range(0..18)] as char).collect();
        let (p, scale) = (pick_f(&mut rng), pick_f(&mut rng));
        let dims = [pick_i(&mut rng), pick_i(&mut rng), pick_i(&mut rng), pick_i(&mut rng)];
        let offset: u64 = if rng.random_bool(0.5) { u64::MAX - rng.random_range(0..40) } else { rng.random() };
        let modes = (
            [Placement::Valid, Placement::Anywhere][rng.random_range(0..2)],
            [GammaRule::Paper, GammaRule::ExactRate, GammaRule::PerBlock][rng.random_range(0..3)],
            [Sharing::None, Sharing::Channels, Sharing::Batch, Sharing::All][rng.random_range(0..4)],
            [Normalize::Global, Normalize::PerSample, Normalize::Expected, Normalize::None][rng.random_range(0..4)],
        );
        let outcome = std::panic::catch_unwind(|| {
            let _ = text.parse::<Block>();
            let block = Block::new(pick_i(&mut StdRng::seed_from_u64(runs)) as u32, 3);
            let cfg = DropBlockConfig::builder(block.unwrap_or(Block::square(3).unwrap()), p)
                .gamma_scale(scale)
                .placement(modes.0)
                .gamma_rule(modes.1)
                .sharing(modes.2)
                .normalize(modes.3)
                .build();
            let shape = Shape::new(dims[0], dims[1], dims[2], dims[3]);
            let key = RngKey::new(7, offset);
            // A plan for every valid combination small enough to build here: a
            // mask that holds together, or a typed refusal.
            let (Ok(cfg), Ok(shape), Ok(key)) = (cfg, shape, key) else { return Ok(None) };
            if shape.numel() > 1 << 16 {
                return Ok(None);
            }
            let Ok(saved) = dropblock::cpu::sample(&cfg, shape, key, dropblock::Mode::Train) else {
                return Ok(Some(false));
            };
            if saved.kept() > shape.numel() as u64 || !saved.scales().iter().all(|s| s.is_finite() && *s >= 0.0) {
                return Err(format!("kept {} of {}, scales {:?}", saved.kept(), shape.numel(), saved.scales()));
            }
            Ok(Some(true))
        });
        match outcome {
            Ok(Ok(reached)) => {
                sampled += (reached == Some(true)) as u64;
                refused += (reached == Some(false)) as u64;
            }
            Ok(Err(e)) => return Err(format!("{e}: p {p}, scale {scale}, dims {dims:?}, modes {modes:?}").into()),
            Err(e) => {
                return Err(format!(
                    "panic on text {text:?}, p {p}, scale {scale}, dims {dims:?}, offset {offset}: {}",
                    common::panic_message(&*e)
                )
                .into())
            }
        }
        runs += 1;
    }
    eprintln!("fuzz in process: {runs} inputs ({sampled} sampled, {refused} refused by it) in {:?}", start.elapsed());
    // The draws must reach the sampler and give masks, not only the parsers and
    // builders (or refusals).
    if sampled == 0 {
        return Err(
            format!("of {runs} inputs none gave a mask ({refused} refused by the sampler): widen the draws").into()
        );
    }
    Ok(())
}
