//! `dropblock apply`: DropBlock on an `.npy` file.

use std::path::PathBuf;

use clap::Args;

use super::device::{DeviceArg, Runner};
use super::npy::{self, with_tensor, CliElement};
use super::{CliError, ConfigArgs};

#[derive(Args)]
pub struct ApplyArgs {
    /// Input: an N,C,L / N,C,H,W / N,C,D,H,W array of float32, float16 or bfloat16 (saved as |V2);
    /// N,L,C / N,H,W,C / N,D,H,W,C with `--layout channels-last`.
    #[arg(long)]
    input: PathBuf,
    /// How the array's axes lie: channels-first | channels-last (the mask is the same
    /// on the same logical tensor).
    #[arg(long, default_value = "channels-first")]
    layout: dropblock::Layout,
    /// Output, in the input's dtype.
    #[arg(long)]
    output: PathBuf,
    /// Also write the keep mask: u8 of the input's shape, 1 where kept.
    #[arg(long)]
    keep_mask: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Where to run (the CPU unless asked, as bench).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

pub fn run(a: ApplyArgs) -> Result<(), CliError> {
    let clash = |what: &str, p: &std::path::Path, q: &std::path::Path, other: &str| {
        if super::same_file(p, q) {
            Err(CliError::Usage(format!("--{what} {} is also the {other}; give it a path of its own", p.display())))
        } else {
            Ok(())
        }
    };
    clash("output", &a.output, &a.input, "--input")?;
    if let Some(m) = &a.keep_mask {
        clash("keep-mask", m, &a.input, "--input")?;
        clash("keep-mask", m, &a.output, "--output")?;
    }
    let cfg = a.config.config()?;
    let key = a.config.key()?;
    // The device before the input: a --device that cannot run fails before a large read.
    let (runner, fallback) = Runner::select(a.device)?;
    if let Some(why) = fallback {
        tell!("dropblock: no GPU ({why}): running on the CPU");
    }
    let (stored, x) = npy::read(&a.input)?;
    let shape = match a.layout {
        dropblock::Layout::ChannelsFirst => stored,
        // The file's last axis is C.
        dropblock::Layout::ChannelsLast => {
            let mut dims = stored.dims().to_vec();
            dims[1..].rotate_right(1);
            dropblock::Shape::from_dims(&dims)?.with_layout(dropblock::Layout::ChannelsLast)
        }
    };
    let (y, mask, kept) = with_tensor!(&x, v => {
        let o = runner.run(&cfg, shape, key, v, false, a.keep_mask.is_some())?;
        (CliElement::into_tensor(o.y), o.keep_mask, o.kept)
    });
    // Both files are written in full before either is put in place.
    let y_file = npy::write(&a.output, &shape.physical_dims(), &y)?;
    let mask_file = match (&a.keep_mask, &mask) {
        (Some(path), Some(mask)) => Some(npy::write_u8(path, &shape.physical_dims(), mask)?),
        _ => None,
    };
    y_file.commit()?;
    if let Some(f) = mask_file {
        f.commit()?;
    }
    tell!(
        "dropblock: {} {} on {}: kept {} of {} ({:.4} dropped)",
        shape,
        x.dtype().name(),
        runner.name(),
        kept,
        shape.numel(),
        1.0 - kept as f64 / shape.numel() as f64
    );
    Ok(())
}
