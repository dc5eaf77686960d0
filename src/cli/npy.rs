//! `.npy` tensors for the CLI: N,C,L / N,C,H,W / N,C,D,H,W arrays of f32, f16 or bf16.
//!
//! numpy has no bf16 dtype; ml_dtypes' bfloat16 arrays are saved by `np.save` as
//! two-byte void (`|V2`), so that is what bf16 reads from and writes to.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use npyz::{DType, FixedSizeBytes, TypeStr, WriterBuilder};

use super::{CliError, Output};

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

/// An error about `path`, cut to one short line: a parser's message may span lines
/// and quote a hostile header.
fn npy_err(path: &Path, e: impl std::fmt::Display) -> CliError {
    const MAX_CHARS: usize = 200;
    let msg = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    let msg = match msg.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &msg[..cut]),
        None => msg,
    };
    CliError::File(format!("{}: {msg}", path.display()))
}

/// numpy's own bound on a header (`np.load`'s `max_header_size`).
const MAX_HEADER_BYTES: usize = 10_000;
/// Brackets a supported header nests: the dict and the shape tuple. A deeper one
/// is refused before the header parser sees it (its time grows exponentially with
/// the depth of nested lists).
const MAX_HEADER_NESTING: usize = 2;

/// Checks the preamble and header of a `.npy` file before any parser reads it, and
/// returns the header's length and where the data starts.
fn check_header(path: &Path, file: &mut File) -> Result<u64, CliError> {
    let mut pre = [0u8; 12];
    // End of file is a short file; anything else (a directory, an I/O error) is
    // said as it is.
    let short = |what: &'static str| {
        move |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => npy_err(path, what),
            _ => npy_err(path, e),
        }
    };
    file.read_exact(&mut pre[..10]).map_err(short("too short for a .npy file"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(npy_err(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (len, start) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10u64),
        2 | 3 => {
            file.read_exact(&mut pre[10..12]).map_err(short("truncated .npy header"))?;
            (u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize, 12u64)
        }
        v => return Err(npy_err(path, format!(".npy format version {v} is not supported"))),
    };
    if len > MAX_HEADER_BYTES {
        return Err(npy_err(path, format!("a {len}-byte header is over numpy's limit of {MAX_HEADER_BYTES}")));
    }
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).map_err(short("truncated .npy header"))?;
    let mut depth = 0usize;
    for &b in &header {
        match b {
            b'{' | b'(' | b'[' => {
                depth += 1;
                if depth > MAX_HEADER_NESTING {
                    return Err(npy_err(path, "the header nests deeper than a dict holding a shape tuple"));
                }
            }
            b'}' | b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // numpy writes its keys and plain dtypes without escapes; the parser decodes
    // them, so an escaped key (`'\x73hape'`) would get past the checks below.
    if header.contains(&b'\\') {
        return Err(npy_err(path, "the header holds a backslash escape, which numpy does not write for these arrays"));
    }
    check_shape(path, &String::from_utf8_lossy(&header))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| npy_err(path, e))?;
    Ok(start + len as u64)
}

/// The header's shape must be 3 to 5 dimensions that make a valid
/// [`dropblock::Shape`] before the header parser multiplies them (npyz's product
/// can overflow). A header that names one of its keys more than once is refused:
/// the parser keeps the last, so checking the first `shape` would let a decoy
/// through, and two `descr` leave the dtype to the parser's choice (a string value
/// that holds `'shape': (...)` is one more naming, and refused too).
fn check_shape(path: &Path, header: &str) -> Result<(), CliError> {
    let named = |key: &str| {
        let (single, double) = (format!("'{key}'"), format!("\"{key}\""));
        header.match_indices(&single).chain(header.match_indices(&double)).map(|(at, _)| at).collect::<Vec<_>>()
    };
    for key in ["descr", "fortran_order", "shape"] {
        if named(key).len() > 1 {
            return Err(npy_err(path, format!("the header names '{key}' more than once")));
        }
    }
    let Some(&at) = named("shape").first() else {
        return Ok(()); // the parser reports the missing key
    };
    let rest = header[at + 7..].trim_start().strip_prefix(':').unwrap_or("").trim_start();
    let Some(tuple) = rest.strip_prefix('(').and_then(|r| r.split_once(')')).map(|(t, _)| t) else {
        return Err(npy_err(path, "the header's shape is not a tuple"));
    };
    let dims: Vec<&str> = tuple.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    if !(3..=5).contains(&dims.len()) {
        return Err(npy_err(path, format!("expected an N,C,L / N,C,H,W / N,C,D,H,W array, got shape ({tuple})")));
    }
    let parsed = dims
        .iter()
        .map(|d| d.parse().map_err(|_| npy_err(path, format!("shape ({tuple}) holds `{d}`, not a dimension"))))
        .collect::<Result<Vec<usize>, _>>()?;
    dropblock::Shape::from_dims(&parsed)?;
    Ok(())
}

/// Reads an N,C,L / N,C,H,W / N,C,D,H,W array. The header is bounded before it is parsed, and the data's
/// size is checked against the shape before anything of that size is allocated.
pub fn read(path: &Path) -> Result<(dropblock::Shape, Tensor), CliError> {
    let mut file = File::open(path).map_err(|e| npy_err(path, e))?;
    let data_start = check_header(path, &mut file)?;
    let file_len = file.metadata().map_err(|e| npy_err(path, e))?.len();
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|e| npy_err(path, e))?;
    let shape = npy.shape().to_vec();
    if !(3..=5).contains(&shape.len()) {
        return Err(npy_err(path, format!("expected an N,C,L / N,C,H,W / N,C,D,H,W array, got shape {shape:?}")));
    }
    if npy.order() != npyz::Order::C {
        return Err(npy_err(path, "Fortran-ordered arrays are not supported; save a C-ordered array"));
    }
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| npy_err(path, format!("shape {shape:?} does not fit this machine")))?;
    // A valid shape (no zero, each dimension 32-bit, the count 63-bit) before sizes.
    let shape_ok = dropblock::Shape::from_dims(&dims)?;
    let descr = npy.dtype().descr();
    let item = match descr.trim_matches('\'') {
        "<f4" => 4,
        "<f2" | "|V2" | "<V2" => 2,
        other if other.starts_with('>') => {
            return Err(npy_err(path, format!("dtype {other} is big-endian; save it little-endian (<f4, <f2)")))
        }
        other => {
            return Err(npy_err(
                path,
                format!("dtype {other} is not supported (use float32, float16, or bfloat16 saved as |V2)"),
            ))
        }
    };
    let need = (shape_ok.numel() as u64).checked_mul(item);
    if need != Some(file_len.saturating_sub(data_start)) {
        return Err(npy_err(
            path,
            format!(
                "holds {} bytes of data but shape {shape:?} of {}-byte elements needs {}",
                file_len.saturating_sub(data_start),
                item,
                need.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        ));
    }
    let n = shape_ok.numel();
    let tensor = if item == 4 {
        Tensor::F32(read_vec(path, npy, n, |v: f32| v)?)
    } else if descr.trim_matches('\'') == "<f2" {
        Tensor::F16(read_vec(path, npy, n, |v: f16| v)?)
    } else {
        Tensor::BF16(read_vec(path, npy, n, |b: FixedSizeBytes<2>| bf16::from_le_bytes(b.0))?)
    };
    Ok((shape_ok, tensor))
}

/// The `n` elements of `npy` as `T`, into memory reserved up front (a typed error,
/// not an abort, when the host cannot hold them).
fn read_vec<R: Read, E: npyz::Deserialize, T>(
    path: &Path,
    npy: npyz::NpyFile<R>,
    n: usize,
    convert: impl Fn(E) -> T,
) -> Result<Vec<T>, CliError> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| npy_err(path, format!("cannot hold {n} elements in memory")))?;
    for v in npy.data::<E>().map_err(|e| npy_err(path, e))? {
        out.push(convert(v.map_err(|e| npy_err(path, e))?));
    }
    Ok(out)
}

/// Writes `tensor` with shape `dims`, in its own dtype, to a file that
/// [`Output::commit`] puts in place.
pub fn write(path: &Path, dims: &[usize], tensor: &Tensor) -> Result<Output, CliError> {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    match tensor {
        Tensor::F32(v) => write_as(path, &shape, "<f4", v.iter().copied()),
        Tensor::F16(v) => write_as(path, &shape, "<f2", v.iter().copied()),
        Tensor::BF16(v) => write_as(path, &shape, "|V2", v.iter().map(|b| FixedSizeBytes(b.to_le_bytes()))),
    }
}

/// Writes a u8 array (the keep mask), like [`write`].
pub fn write_u8(path: &Path, dims: &[usize], data: &[u8]) -> Result<Output, CliError> {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    write_as(path, &shape, "|u1", data.iter().copied())
}

fn write_as<T: npyz::Serialize>(
    path: &Path,
    shape: &[u64],
    descr: &str,
    data: impl IntoIterator<Item = T>,
) -> Result<Output, CliError> {
    let ts: TypeStr = descr.parse().expect("a valid type string");
    let mut out = Output::create(path)?;
    let mut w = npyz::WriteOptions::new()
        .dtype(DType::Plain(ts))
        .shape(shape)
        .writer(BufWriter::new(out.file()))
        .begin_nd()
        .map_err(|e| npy_err(path, e))?;
    w.extend(data).map_err(|e| npy_err(path, e))?;
    w.finish().map_err(|e| npy_err(path, e))?;
    Ok(out)
}
