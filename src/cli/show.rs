//! `dropblock show`: what a configuration does to one feature map, as a picture.

use std::path::PathBuf;

use clap::Args;
use dropblock::sampling::Plan;
use dropblock::{cpu, Mode, Shape};

use super::image::{self, Image, MAX_PIXELS};
use super::{CliError, ConfigArgs};

#[derive(Args)]
pub struct ShowArgs {
    /// A PNG to draw over; its size is the feature map's. Without it, a gradient
    /// of --size is used.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Feature map size HxW when there is no --image.
    #[arg(long, default_value = "56x56", conflicts_with = "image")]
    size: MapSize,
    #[command(flatten)]
    config: ConfigArgs,
    /// Pixels per feature-map cell.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    zoom: u32,
    /// Where to write the picture.
    #[arg(long)]
    png: PathBuf,
}

pub fn run(a: ShowArgs) -> Result<(), CliError> {
    let ignored = a.config.mask_neutral_flags();
    if !ignored.is_empty() {
        return Err(CliError::Usage(format!(
            "show draws one map's mask, which {} does not change",
            ignored.join(" or ")
        )));
    }
    let cfg = a.config.config()?;
    let key = a.config.key()?;
    let zoom = a.zoom as usize;
    if let Some(image) = &a.image {
        if super::same_file(&a.png, image) {
            return Err(CliError::Usage(format!("--png {} would overwrite --image", a.png.display())));
        }
    }
    let too_large = |h: usize, w: usize| {
        let pixels = h.checked_mul(w).and_then(|p| p.checked_mul(zoom * zoom));
        match pixels {
            Some(p) if p as u64 <= MAX_PIXELS => Ok(()),
            _ => Err(CliError::Usage(format!(
                "a {h}x{w} map at zoom {zoom} is too large a picture (at most {MAX_PIXELS} pixels)"
            ))),
        }
    };
    let background = match &a.image {
        // Bounded by the picture it will make, before it is decoded.
        Some(p) => Image::read_png(p, MAX_PIXELS / (zoom * zoom).max(1) as u64)?,
        None => {
            too_large(a.size.0, a.size.1)?;
            gradient(a.size.1, a.size.0)
        }
    };
    let (h, w) = (background.height, background.width);
    too_large(h, w)?;
    let shape = Shape::new(1, 1, h, w)?;
    let saved = cpu::sample(&cfg, shape, key, Mode::Train)?;
    let mask = saved.keep_mask()?;
    let mut img = Image::new(w * zoom, h * zoom, [0; 3]);
    for y in 0..h {
        for x in 0..w {
            let c = background.get(x, y);
            let c = if mask[y * w + x] == 1 { c } else { image::dropped(c) };
            img.fill_rect(x * zoom, y * zoom, zoom, zoom, c);
        }
    }
    let mut seeds = 0;
    if let Some(plan) = saved.plan() {
        seeds = draw_seeds(&mut img, plan, zoom)?;
    }
    img.write_png(&a.png)?;
    say!(
        "{cfg}\nmap {h}x{w}: gamma {:.6}, {seeds} seeds, {:.4} dropped; wrote {}",
        saved.plan().map_or(0.0, |p| p.gamma()),
        saved.drop_fraction(),
        a.png.display()
    )?;
    Ok(())
}

/// Marks each seed's cell (a seed at (y, x) is the cell its block is anchored at)
/// and returns how many there are.
fn draw_seeds(img: &mut Image, plan: &Plan, zoom: usize) -> Result<usize, CliError> {
    let seed_w = plan.geometry().seed_w as usize;
    let mut count = 0;
    let dot = (zoom / 2).max(1);
    for (k, &word) in plan.seed_plane(0)?.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let cell = k * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let (y, x) = (cell / seed_w, cell % seed_w);
            count += 1;
            img.fill_rect(x * zoom + (zoom - dot) / 2, y * zoom + (zoom - dot) / 2, dot, dot, image::SEED);
        }
    }
    Ok(count)
}

/// `HxW`, both at least 1.
#[derive(Clone, Copy, Debug)]
struct MapSize(usize, usize);

impl std::str::FromStr for MapSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| match t.trim().parse::<usize>() {
            Ok(v) if v >= 1 => Ok(v),
            _ => Err(format!("map size `{s}` must be HxW with whole numbers of at least 1")),
        };
        let (h, w) = s.split_once(['x', 'X']).ok_or_else(|| format!("map size `{s}` must be HxW"))?;
        Ok(MapSize(parse(h)?, parse(w)?))
    }
}

fn gradient(w: usize, h: usize) -> Image {
    let mut img = Image::new(w, h, [0; 3]);
    for y in 0..h {
        for x in 0..w {
            let r = (60 + 150 * x / w.max(1)) as u8;
            let b = (60 + 150 * y / h.max(1)) as u8;
            img.set(x, y, [r, 140, b]);
        }
    }
    img
}
