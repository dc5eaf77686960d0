//! `.npy` tensors for the CLI: N,C,H,W arrays of f32, f16 or bf16.
//!
//! numpy has no bf16 dtype; ml_dtypes' bfloat16 arrays are saved by `np.save` as
//! two-byte void (`|V2`), so that is what bf16 reads from and writes to.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use half::{bf16, f16};
use npyz::{DType, FixedSizeBytes, TypeStr, WriterBuilder};

use super::CliError;

/// A host tensor in one of the supported dtypes.
pub enum Tensor {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// Runs `$body` with `$v` bound to the tensor's typed `Vec`, for every dtype.
macro_rules! with_tensor {
    ($t:expr, $v:ident => $body:expr) => {
        match $t {
            $crate::cli::npy::Tensor::F32($v) => $body,
            $crate::cli::npy::Tensor::F16($v) => $body,
            $crate::cli::npy::Tensor::BF16($v) => $body,
        }
    };
}
pub(crate) use with_tensor;

/// An element type the CLI handles: one with kernels when the CUDA path is built.
#[cfg(feature = "cuda")]
pub trait CliElement: dropblock::cuda::CudaElement {
    fn into_tensor(v: Vec<Self>) -> Tensor;
}
#[cfg(not(feature = "cuda"))]
pub trait CliElement: dropblock::Element {
    fn into_tensor(v: Vec<Self>) -> Tensor;
}

macro_rules! cli_element {
    ($($t:ty => $variant:ident),+) => {$(
        impl CliElement for $t {
            fn into_tensor(v: Vec<Self>) -> Tensor {
                Tensor::$variant(v)
            }
        }
    )+};
}
cli_element!(f32 => F32, f16 => F16, bf16 => BF16);

impl Tensor {
    pub fn dtype(&self) -> dropblock::DType {
        match self {
            Tensor::F32(_) => dropblock::DType::F32,
            Tensor::F16(_) => dropblock::DType::F16,
            Tensor::BF16(_) => dropblock::DType::BF16,
        }
    }
}

fn npy_err(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::File(format!("{}: {e}", path.display()))
}

/// Reads an N,C,H,W array.
pub fn read(path: &Path) -> Result<([usize; 4], Tensor), CliError> {
    let file = File::open(path).map_err(|e| npy_err(path, e))?;
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|e| npy_err(path, e))?;
    let shape = npy.shape().to_vec();
    if shape.len() != 4 {
        return Err(npy_err(path, format!("expected a 4-d N,C,H,W array, got shape {shape:?}")));
    }
    if npy.order() != npyz::Order::C {
        return Err(npy_err(path, "Fortran-ordered arrays are not supported; save a C-ordered array"));
    }
    let dims = [shape[0] as usize, shape[1] as usize, shape[2] as usize, shape[3] as usize];
    let descr = npy.dtype().descr();
    let tensor = match descr.trim_matches('\'') {
        "<f4" => Tensor::F32(npy.into_vec().map_err(|e| npy_err(path, e))?),
        "<f2" => Tensor::F16(npy.into_vec().map_err(|e| npy_err(path, e))?),
        "|V2" | "<V2" => {
            let raw: Vec<FixedSizeBytes<2>> = npy.into_vec().map_err(|e| npy_err(path, e))?;
            Tensor::BF16(raw.into_iter().map(|b| bf16::from_le_bytes(b.0)).collect())
        }
        other => {
            return Err(npy_err(
                path,
                format!("dtype {other} is not supported (use float32, float16, or bfloat16 saved as |V2)"),
            ))
        }
    };
    Ok((dims, tensor))
}

/// Writes `tensor` with shape `dims`, in its own dtype.
pub fn write(path: &Path, dims: [usize; 4], tensor: &Tensor) -> Result<(), CliError> {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    match tensor {
        Tensor::F32(v) => write_as(path, &shape, "<f4", v.iter().copied()),
        Tensor::F16(v) => write_as(path, &shape, "<f2", v.iter().copied()),
        Tensor::BF16(v) => write_as(path, &shape, "|V2", v.iter().map(|b| FixedSizeBytes(b.to_le_bytes()))),
    }
}

/// Writes a u8 array (the keep mask).
pub fn write_u8(path: &Path, dims: [usize; 4], data: &[u8]) -> Result<(), CliError> {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    write_as(path, &shape, "|u1", data.iter().copied())
}

fn write_as<T: npyz::Serialize>(
    path: &Path,
    shape: &[u64],
    descr: &str,
    data: impl IntoIterator<Item = T>,
) -> Result<(), CliError> {
    let ts: TypeStr = descr.parse().expect("a valid type string");
    let file = File::create(path).map_err(|e| npy_err(path, e))?;
    let mut w = npyz::WriteOptions::new()
        .dtype(DType::Plain(ts))
        .shape(shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(|e| npy_err(path, e))?;
    w.extend(data).map_err(|e| npy_err(path, e))?;
    w.finish().map_err(|e| npy_err(path, e))
}
