//! RGB images for the demo's mask picture and `show`, read and written with `png`.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::{CliError, Output};

pub type Rgb = [u8; 3];

/// The largest picture read or drawn.
pub const MAX_PIXELS: u64 = 1 << 28;

/// An 8-bit RGB raster, row-major.
pub struct Image {
    pub width: usize,
    pub height: usize,
    data: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, fill: Rgb) -> Self {
        Self { width, height, data: fill.repeat(width * height) }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = 3 * (y * self.width + x);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    pub fn set(&mut self, x: usize, y: usize, c: Rgb) {
        let i = 3 * (y * self.width + x);
        self.data[i..i + 3].copy_from_slice(&c);
    }

    pub fn fill_rect(&mut self, x0: usize, y0: usize, w: usize, h: usize, c: Rgb) {
        for y in y0..(y0 + h).min(self.height) {
            for x in x0..(x0 + w).min(self.width) {
                self.set(x, y, c);
            }
        }
    }

    /// Reads an 8- or 16-bit PNG of any colour type as RGB, of at most `max_pixels`
    /// pixels by its header.
    pub fn read_png(path: &Path, max_pixels: u64) -> Result<Self, CliError> {
        let err = |e: &dyn std::fmt::Display| CliError::File(format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(|e| err(&e))?;
        let mut decoder = png::Decoder::new(file);
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().map_err(|e| err(&e))?;
        // The header's claim is checked before a buffer of its size is made.
        let (w, h) = (reader.info().width as u64, reader.info().height as u64);
        if w * h > max_pixels {
            return Err(err(&format!(
                "a {w}x{h} image is larger than the {max_pixels} pixels it may have here (the picture is \
                 the image times --zoom on each side: a lower --zoom takes a larger image)"
            )));
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(reader.output_buffer_size()).map_err(|_| err(&"cannot hold the decoded image"))?;
        buf.resize(reader.output_buffer_size(), 0);
        let info = reader.next_frame(&mut buf).map_err(|e| err(&e))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let channels = info.color_type.samples();
        let mut img = Self::new(w, h, [0; 3]);
        for y in 0..h {
            for x in 0..w {
                let p = &buf[y * info.line_size + x * channels..][..channels];
                let c = if channels >= 3 { [p[0], p[1], p[2]] } else { [p[0]; 3] };
                img.set(x, y, c);
            }
        }
        Ok(img)
    }

    /// Writes the image whole, or nothing (see [`Output`]).
    pub fn write_png(&self, path: &Path) -> Result<(), CliError> {
        let err = |e: &dyn std::fmt::Display| CliError::File(format!("{}: {e}", path.display()));
        let mut out = Output::create(path)?;
        {
            let mut enc = png::Encoder::new(BufWriter::new(out.file()), self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| err(&e))?;
            w.write_image_data(&self.data).map_err(|e| err(&e))?;
            w.finish().map_err(|e| err(&e))?;
        }
        out.commit()
    }
}

/// `c` darkened and pushed towards red: how a dropped unit is drawn.
pub fn dropped(c: Rgb) -> Rgb {
    [(c[0] as u16 * 2 / 5 + 110) as u8, (c[1] as u16 * 2 / 5) as u8, (c[2] as u16 * 2 / 5) as u8]
}

pub const SEED: Rgb = [255, 220, 0];
