//! `dropblock demo`: forward and backward on a ResNet-sized tensor.

use std::path::PathBuf;

use clap::Args;
use dropblock::sampling::{expected_drop_fraction, Plan};
use dropblock::Shape;
use rand::{Rng, SeedableRng};

use super::device::{DeviceArg, Runner};
use super::image::{self, Image};
use super::{CliError, ConfigArgs, ShapeArg};

#[derive(Args)]
pub struct DemoArgs {
    /// N,C,H,W (or N,C,L / N,C,D,H,W: the picture shows each slice's first depth
    /// slice); the default is ResNet-50's group-3 output at batch 64.
    #[arg(long, default_value = "64,1024,14,14")]
    shape: ShapeArg,
    #[command(flatten)]
    config: ConfigArgs,
    /// Where to run: auto picks the GPU when there is one.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Where to write the picture of the first 16 masks.
    #[arg(long, default_value = "dropblock-demo.png")]
    png: PathBuf,
}

pub fn run(a: DemoArgs) -> Result<(), CliError> {
    let cfg = a.config.config()?;
    let key = a.config.key()?;
    let shape = a.shape.shape()?;
    let (runner, fallback) = Runner::select(a.device)?;
    match fallback {
        Some(why) => report!("no GPU ({why}): running on the CPU")?,
        None => report!("running on {}", runner.name())?,
    }
    let plan = Plan::new(&cfg, shape, key)?;
    report!("config: {cfg}")?;
    report!("shape:  {shape} f32 ({:.1} M elements)", shape.numel() as f64 / 1e6)?;
    // The expected fraction is information only: a block too large for its exact
    // sum (Error::TooManyCoverageClasses) still runs under the paper's γ.
    let expected = match expected_drop_fraction(plan.gamma(), plan.geometry()) {
        Ok(f) => format!("expected drop fraction {f:.4}"),
        Err(e) => format!("expected drop fraction not computed: {e}"),
    };
    report!("gamma:  {:.6} ({expected})", plan.gamma())?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(a.config.seed);
    let x: Vec<f32> = super::host_vec(shape.numel(), |_| rng.random_range(-1.0f32..1.0))?;
    let o = runner.run(&cfg, shape, key, &x, true, true)?;
    let bytes = 2.0 * (shape.numel() * 4) as f64;
    let scale = match o.scales.as_slice() {
        [one] => format!("scale {one}"),
        many => {
            let (lo, hi) = many.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &s| (lo.min(s), hi.max(s)));
            format!("per-sample scales {lo}..{hi}")
        }
    };
    report!(
        "kept:   {} of {} (realised drop fraction {:.4}), {scale}",
        o.kept,
        shape.numel(),
        1.0 - o.kept as f64 / shape.numel() as f64,
    )?;
    report!("forward:  {:8.3} ms ({:.1} GB/s)", o.forward_ms, bytes / o.forward_ms / 1e6)?;
    if let Some((_, ms)) = &o.backward {
        report!("backward: {:8.3} ms ({:.1} GB/s)", ms, bytes / ms / 1e6)?;
    }
    let mask = o.keep_mask.as_deref().ok_or_else(|| CliError::Usage("the runner returned no keep mask".into()))?;
    let (img, tiles) = masks_png(mask, shape);
    img.write_png(&a.png)?;
    let cropped = match (shape.h() > CROP, shape.w() > CROP) {
        (false, false) => String::new(),
        _ => format!(" (their first {} x {} cells)", shape.h().min(CROP), shape.w().min(CROP)),
    };
    report!("wrote the keep masks of the first {tiles} (n, c) slices{cropped} to {}", a.png.display())?;
    Ok(())
}

/// The picture shows at most this many cells of a slice along each axis, so that
/// any shape makes a picture of bounded size.
const CROP: usize = 256;

/// The keep masks of the first (up to) 16 slices (of a volume, its first depth
/// slice; of a larger map, its first `CROP` x `CROP` cells), tiled 4 x 4, and how
/// many.
fn masks_png(mask: &[u8], shape: Shape) -> (Image, usize) {
    let (l, row) = (shape.plane_len(), shape.w());
    let (h, w) = (shape.h().min(CROP), shape.w().min(CROP));
    let zoom = (96 / h.max(w)).clamp(1, 8);
    let tiles = (shape.n() * shape.c()).min(16);
    let (cols, rows) = (4.min(tiles), tiles.div_ceil(4));
    let (tw, th) = (w * zoom + 4, h * zoom + 4);
    let mut img = Image::new(cols * tw, rows * th, [40, 40, 40]);
    for t in 0..tiles {
        let (ox, oy) = ((t % 4) * tw + 2, (t / 4) * th + 2);
        for y in 0..h {
            for x in 0..w {
                let kept = mask[t * l + y * row + x] == 1;
                let c = if kept { [235, 235, 235] } else { image::dropped([235, 235, 235]) };
                img.fill_rect(ox + x * zoom, oy + y * zoom, zoom, zoom, c);
            }
        }
    }
    (img, tiles)
}
