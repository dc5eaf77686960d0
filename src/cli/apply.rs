//! `dropblock apply`: DropBlock on an `.npy` file.

use std::path::PathBuf;

use clap::Args;
use dropblock::Shape;

use super::device::{DeviceArg, Runner};
use super::npy::{self, with_tensor, CliElement};
use super::{CliError, ConfigArgs};

#[derive(Args)]
pub struct ApplyArgs {
    /// Input: an N,C,H,W array of float32, float16 or bfloat16 (saved as |V2).
    #[arg(long)]
    input: PathBuf,
    /// Output, in the input's dtype.
    #[arg(long)]
    output: PathBuf,
    /// Also write the keep mask: u8 N,C,H,W, 1 where kept.
    #[arg(long)]
    keep_mask: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

pub fn run(a: ApplyArgs) -> Result<(), CliError> {
    let cfg = a.config.config()?;
    let key = a.config.key()?;
    let (dims, x) = npy::read(&a.input)?;
    let shape = Shape::new(dims[0], dims[1], dims[2], dims[3])?;
    let (runner, fallback) = Runner::select(a.device)?;
    if let Some(why) = fallback {
        eprintln!("dropblock: no GPU ({why}): running on the CPU");
    }
    let (y, mask, kept) = with_tensor!(&x, v => {
        let o = runner.run(&cfg, shape, key, v, false)?;
        (CliElement::into_tensor(o.y), o.keep_mask, o.kept)
    });
    npy::write(&a.output, dims, &y)?;
    if let Some(path) = &a.keep_mask {
        npy::write_u8(path, dims, &mask)?;
    }
    eprintln!(
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
