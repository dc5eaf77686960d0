//! `dropblock show`: what a configuration does to one feature map, as a picture.

use std::path::PathBuf;

use clap::Args;
use dropblock::sampling::Plan;
use dropblock::{cpu, Mode, Shape};

use super::image::{self, Image};
use super::{CliError, ConfigArgs};

#[derive(Args)]
pub struct ShowArgs {
    /// A PNG to draw over; its size is the feature map's. Without it, a gradient
    /// of --size is used.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Feature map size HxW when there is no --image.
    #[arg(long, default_value = "56x56")]
    size: dropblock::Block,
    #[command(flatten)]
    config: ConfigArgs,
    /// Pixels per feature-map cell.
    #[arg(long, default_value_t = 8)]
    zoom: usize,
    /// Where to write the picture.
    #[arg(long)]
    png: PathBuf,
}

pub fn run(a: ShowArgs) -> Result<(), CliError> {
    let cfg = a.config.config()?;
    let key = a.config.key()?;
    let background = match &a.image {
        Some(p) => Image::read_png(p)?,
        None => gradient(a.size.width as usize, a.size.height as usize),
    };
    let (h, w) = (background.height, background.width);
    let shape = Shape::new(1, 1, h, w)?;
    let zoom = a.zoom.max(1);
    if h * w * zoom * zoom > 1 << 28 {
        return Err(CliError::Usage(format!("{h}x{w} at zoom {zoom} is too large a picture; lower --zoom")));
    }
    let saved = cpu::sample(&cfg, shape, key, Mode::Train);
    let mask = saved.keep_mask();
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
        seeds = draw_seeds(&mut img, plan, zoom);
    }
    img.write_png(&a.png)?;
    println!(
        "{cfg}\nmap {h}x{w}: gamma {:.6}, {seeds} seeds, {:.4} dropped; wrote {}",
        saved.plan().map_or(0.0, |p| p.gamma()),
        saved.drop_fraction(),
        a.png.display()
    );
    Ok(())
}

/// Marks each seed's cell (a seed at (y, x) is the cell its block is anchored at)
/// and returns how many there are.
fn draw_seeds(img: &mut Image, plan: &Plan, zoom: usize) -> usize {
    let g = plan.geometry();
    let wpr = g.windows_per_row as usize;
    let mut grid = vec![0u64; g.seed_h as usize * wpr];
    plan.seed_grid(0, &mut grid);
    let mut count = 0;
    let dot = (zoom / 2).max(1);
    for (y, row) in grid.chunks(wpr).enumerate() {
        for (s, &word) in row.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let x = s * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                count += 1;
                img.fill_rect(x * zoom + (zoom - dot) / 2, y * zoom + (zoom - dot) / 2, dot, dot, image::SEED);
            }
        }
    }
    count
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
