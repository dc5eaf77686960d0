//! The `dropblock` command line, end to end on `.npy` files.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use dropblock::{
    cpu, Anchor, Block, DropBlockConfig, Element, GammaRule, Layout, Mode, Normalize, Placement, RngKey, Shape, Sharing,
};
use half::{bf16, f16};
use npyz::WriterBuilder;

fn dropblock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dropblock")).args(args).output().expect("run dropblock")
}

fn write_npy<T: npyz::Serialize + Copy>(path: &Path, descr: &str, shape: &[u64], data: &[T]) {
    let mut w = npyz::WriteOptions::new()
        .dtype(npyz::DType::Plain(descr.parse().unwrap()))
        .shape(shape)
        .writer(std::io::BufWriter::new(std::fs::File::create(path).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> (Vec<u64>, String, Vec<T>) {
    let f = npyz::NpyFile::new(std::fs::File::open(path).unwrap()).unwrap();
    let shape = f.shape().to_vec();
    let descr = f.dtype().descr();
    (shape, descr, f.into_vec().unwrap())
}

const FLAGS: &[&str] = &[
    "--block",
    "3x5",
    "--drop-prob",
    "0.2",
    "--seed",
    "4",
    "--offset",
    "17",
    "--placement",
    "anywhere",
    "--share",
    "channels",
    "--normalize",
    "per-sample",
    "--gamma",
    "exact",
    "--gamma-scale",
    "1.5",
    "--device",
    "cpu",
];

fn flags_config() -> (DropBlockConfig, RngKey) {
    let cfg = DropBlockConfig::builder(Block::new(3, 5).unwrap(), 0.2)
        .placement(Placement::Anywhere)
        .sharing(Sharing::Channels)
        .normalize(Normalize::PerSample)
        .gamma_rule(GammaRule::ExactRate)
        .gamma_scale(1.5)
        .build()
        .unwrap();
    (cfg, RngKey::new(4, 17).unwrap())
}

/// Runs `apply` on `x` stored as `descr`, and checks y and the keep mask against the library.
fn check_apply<T: Element + npyz::Serialize + npyz::Deserialize>(descr: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp, mp) = (dir.path().join("x.npy"), dir.path().join("y.npy"), dir.path().join("m.npy"));
    let shape = Shape::new(2, 3, 10, 70).unwrap();
    let x: Vec<T> = common::input(shape.numel(), 8).into_iter().map(T::from_f32).collect();
    let dims = [2u64, 3, 10, 70];
    write_npy(&xp, descr, &dims, &x);
    let mut args = vec!["apply", "--input", xp.to_str().unwrap(), "--output", yp.to_str().unwrap()];
    args.extend(["--keep-mask", mp.to_str().unwrap()]);
    args.extend_from_slice(FLAGS);
    let out = dropblock(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (cfg, key) = flags_config();
    let mut y = vec![T::default(); shape.numel()];
    let saved = cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let (yshape, ydescr, ygot) = read_npy::<T>(&yp);
    assert_eq!(yshape, dims);
    assert_eq!(ydescr.trim_matches('\''), descr);
    assert!(ygot.iter().zip(&y).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()), "y differs");
    let (mshape, mdescr, mask) = read_npy::<u8>(&mp);
    assert_eq!((mshape, mdescr.trim_matches('\'')), (dims.to_vec(), "|u1"));
    assert_eq!(mask, saved.keep_mask().unwrap());
    assert!(mask.contains(&0), "the config should drop something");
}

#[test]
fn apply_f32_matches_the_library() {
    check_apply::<f32>("<f4");
}

#[test]
fn apply_f16_matches_the_library() {
    check_apply::<f16>("<f2");
}

#[test]
fn apply_bf16_reads_and_writes_void2() {
    // bf16 travels as |V2 (what np.save writes for ml_dtypes.bfloat16).
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    let shape = Shape::new(1, 2, 9, 9).unwrap();
    let x: Vec<bf16> = common::input(shape.numel(), 3).into_iter().map(bf16::from_f32).collect();
    let raw: Vec<npyz::FixedSizeBytes<2>> = x.iter().map(|v| npyz::FixedSizeBytes(v.to_le_bytes())).collect();
    write_npy(&xp, "|V2", &[1, 2, 9, 9], &raw);
    let mut args = vec!["apply", "--input", xp.to_str().unwrap(), "--output", yp.to_str().unwrap()];
    args.extend_from_slice(FLAGS);
    let out = dropblock(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cfg, key) = flags_config();
    let mut y = vec![bf16::ZERO; shape.numel()];
    cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap();
    let (_, descr, got) = read_npy::<npyz::FixedSizeBytes<2>>(&yp);
    assert_eq!(descr.trim_matches('\''), "|V2");
    let got: Vec<bf16> = got.iter().map(|b| bf16::from_le_bytes(b.0)).collect();
    assert!(got.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// `apply` on 1D and 3D arrays, with miguelvr's variant options, equals the library.
#[test]
fn apply_1d_and_3d_match_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp, mp) = (dir.path().join("x.npy"), dir.path().join("y.npy"), dir.path().join("m.npy"));
    for (dims, block) in [(&[2usize, 3, 200][..], "9"), (&[2, 3, 5, 9, 11][..], "2x3x4"), (&[1, 2, 6, 7, 8][..], "3")] {
        let shape = Shape::from_dims(dims).unwrap();
        let x: Vec<f32> = common::input(shape.numel(), 9);
        let dims64: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        write_npy(&xp, "<f4", &dims64, &x);
        let flags = ["--block", block, "--drop-prob", "0.3", "--placement", "anywhere", "--anchor", "centered-right"];
        let mut args = vec!["apply", "--input", xp.to_str().unwrap(), "--output", yp.to_str().unwrap()];
        args.extend(["--keep-mask", mp.to_str().unwrap(), "--gamma", "per-block", "--device", "cpu", "--seed", "11"]);
        args.extend_from_slice(&flags);
        let out = dropblock(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let cfg = DropBlockConfig::builder(block.parse().unwrap(), 0.3)
            .placement(Placement::Anywhere)
            .anchor(Anchor::CenteredRight)
            .gamma_rule(GammaRule::PerBlock)
            .build()
            .unwrap();
        let mut y = vec![0f32; shape.numel()];
        let saved = cpu::forward(&cfg, shape, RngKey::new(11, 0).unwrap(), Mode::Train, &x, &mut y).unwrap();
        let (yshape, _, ygot) = read_npy::<f32>(&yp);
        assert_eq!(yshape, dims64);
        assert!(ygot.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{dims:?}: y differs");
        let (mshape, _, mask) = read_npy::<u8>(&mp);
        assert_eq!(mshape, dims64);
        assert_eq!(mask, saved.keep_mask().unwrap());
        assert!(mask.contains(&0), "{dims:?}: the config should drop something");
    }
}

/// `apply --layout channels-last` on an N,H,W,C / N,D,H,W,C / N,L,C file drops the
/// units the channels-first run drops on the same logical tensor: its y and keep
/// mask are the channels-first ones transposed.
#[test]
fn apply_channels_last_is_channels_first_transposed() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    for dims in [&[2usize, 5, 9, 11][..], &[2, 3, 4, 5, 6], &[3, 33, 40]] {
        let shape = Shape::from_dims(dims).unwrap();
        let cl = shape.with_layout(Layout::ChannelsLast);
        let x: Vec<f32> = common::input(shape.numel(), 5);
        let transpose = |v: &[f32]| common::to_channels_last(v, shape);
        let to64 = |d: Vec<usize>| d.into_iter().map(|v| v as u64).collect::<Vec<u64>>();
        write_npy(&p("x.npy"), "<f4", &to64(shape.dims().to_vec()), &x);
        write_npy(&p("xt.npy"), "<f4", &to64(cl.physical_dims()), &transpose(&x));
        let run = |input: &str, out: &str, mask: &str, layout: &str| {
            let (i, o, m) = (p(input), p(out), p(mask));
            let args = ["apply", "--input", i.to_str().unwrap(), "--output", o.to_str().unwrap(), "--keep-mask"];
            let mut args: Vec<&str> = args.to_vec();
            args.extend([m.to_str().unwrap(), "--layout", layout, "--block", "3", "--drop-prob", "0.3", "--share"]);
            args.extend(["channels", "--device", "cpu"]);
            let out = dropblock(&args);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        };
        run("x.npy", "y.npy", "m.npy", "channels-first");
        run("xt.npy", "yt.npy", "mt.npy", "channels-last");
        let (_, _, y) = read_npy::<f32>(&p("y.npy"));
        let (yshape, _, yt) = read_npy::<f32>(&p("yt.npy"));
        assert_eq!(yshape, to64(cl.physical_dims()), "{dims:?}");
        assert_eq!(
            yt.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            transpose(&y).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{dims:?}: y"
        );
        let (_, _, m) = read_npy::<u8>(&p("m.npy"));
        let (_, _, mt) = read_npy::<u8>(&p("mt.npy"));
        let m32: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        assert_eq!(mt.iter().map(|&v| v as f32).collect::<Vec<_>>(), transpose(&m32), "{dims:?}: keep mask");
        assert!(m.contains(&0), "{dims:?}: the config should drop something");
    }
    let bad = ["apply", "--input", "x.npy", "--output", "y.npy", "--layout", "nhwc"];
    assert_one_line_error(&bad, "channels-first, channels-last");
}

/// A failing run: non-zero exit and exactly one line on stderr that mentions `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = dropblock(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
}

#[test]
fn bad_arguments_and_files_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    let y = dir.path().join("y.npy");
    write_npy(&x, "<f4", &[2, 2, 4, 4], &[1f32; 64]);
    let (xs, ys) = (x.to_str().unwrap(), y.to_str().unwrap());
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--drop-prob", "1.5"], "drop_prob");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--block", "0"], "block");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--block", "3x"], "block");
    // A negative number is a value, not a flag, and gets the range error.
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--drop-prob", "-0.1"], "[0, 1]");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--gamma-scale", "-1"], "gamma_scale");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--block", "4294967296"], "largest");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--placement", "middle"], "valid, anywhere");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--offset", "18446744073709551615"], "offset");
    assert_one_line_error(&["apply", "--input", "/nonexistent/x.npy", "--output", ys], "/nonexistent/x.npy");
    // The last valid offset: bench draws a key a call, and the error names the
    // offset given, not the one its generator ran out at.
    let last = "18446744073709551599";
    let bench = ["bench", "--device", "cpu", "--shape", "1,1,5,5", "--iters", "1", "--offset", last];
    assert_one_line_error(&bench, &format!("--offset {last} ran out"));

    let two_d = dir.path().join("t.npy");
    write_npy(&two_d, "<f4", &[4, 4], &[1f32; 16]);
    assert_one_line_error(&["apply", "--input", two_d.to_str().unwrap(), "--output", ys], "N,C,L / N,C,H,W");
    let volume = dir.path().join("v.npy");
    write_npy(&volume, "<f4", &[1, 2, 2, 4, 4], &[1f32; 64]);
    let v = volume.to_str().unwrap();
    assert_one_line_error(&["apply", "--input", v, "--output", ys, "--block", "3x3"], "a 2D block");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--block", "1x2x3x4"], "rank 4");
    assert_one_line_error(&["apply", "--input", xs, "--output", ys, "--anchor", "left"], "centered, centered-right");
    // An anchor does nothing under Valid placement: refused rather than ignored.
    let anchored = ["apply", "--input", xs, "--output", ys, "--anchor", "centered-right"];
    assert_one_line_error(&anchored, "--placement anywhere");
    // A big-endian float32 is named as such.
    let big = dir.path().join("big.npy");
    write_npy(&big, ">f4", &[1, 1, 2, 2], &[1f32; 4]);
    assert_one_line_error(&["apply", "--input", big.to_str().unwrap(), "--output", ys], "little-endian");
    let ints = dir.path().join("i.npy");
    write_npy(&ints, "<i4", &[1, 1, 2, 2], &[1i32, 2, 3, 4]);
    assert_one_line_error(&["apply", "--input", ints.to_str().unwrap(), "--output", ys], "not supported");
    let empty = dir.path().join("e.npy");
    write_npy::<f32>(&empty, "<f4", &[1, 0, 2, 2], &[]);
    assert_one_line_error(&["apply", "--input", empty.to_str().unwrap(), "--output", ys], "zero");
    let garbage = dir.path().join("g.npy");
    std::fs::write(&garbage, b"not an npy file").unwrap();
    assert_one_line_error(&["apply", "--input", garbage.to_str().unwrap(), "--output", ys], "g.npy");
}

/// A `.npy` file with `header` (padded as numpy pads it) and `data` bytes after it.
fn raw_npy(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    if h.len() > u16::MAX as usize {
        bytes[6] = 2;
        bytes.extend_from_slice(&(h.len() as u32).to_le_bytes());
    } else {
        bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    }
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// A run that must fail with one short line naming `needle`, before it reads or
/// allocates what a hostile file claims (a hang, an abort or a huge allocation
/// is the bug these guard against; the allocations are bounded by cli_memory.rs).
fn assert_refused(args: &[&str], needle: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dropblock"));
    let (status, err) = common::status_unless_hung(cmd.args(args), std::time::Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert_eq!(status.code(), Some(1), "{args:?}: exit status {status:?}, stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(err.len() < 400, "{args:?}: a {}-byte message", err.len());
    assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
}

#[test]
fn hostile_npy_files_fail_fast_with_short_errors() {
    let dir = tempfile::tempdir().unwrap();
    let y = dir.path().join("y.npy");
    let ys = y.to_str().unwrap();
    let case = |name: &str, header: &str, data: &[u8], needle: &str| {
        let p = dir.path().join(name);
        raw_npy(&p, header, data);
        assert_refused(&["apply", "--input", p.to_str().unwrap(), "--output", ys], needle);
        assert!(!y.exists(), "{name}: a failed run left an output");
    };
    // Nested lists made the header parser's time double per level (depth 30: minutes).
    let nested = format!(
        "{{'descr': {}'<f4'{}, 'fortran_order': False, 'shape': (1, 1, 2, 2), }}",
        "[".repeat(30),
        "]".repeat(30)
    );
    case("nested.npy", &nested, &[0; 16], "nests deeper");
    // A 10 MB header is refused at numpy's bound, and not echoed back.
    let long = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2), 'x': '{}', }}",
        "a".repeat(10_000_000)
    );
    case("long.npy", &long, &[0; 16], "10000");
    // A shape of 2^40 elements over 16 bytes of data: refused before allocating.
    case(
        "huge.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1024, 1024, 1024, 1024), }",
        &[0; 16],
        "bytes of data",
    );
    // Too little and too much data for the shape.
    case("short.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2), }", &[0; 12], "needs 16");
    case("long_data.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2), }", &[0; 20], "needs 16");
    // A key named twice: the parser keeps the last, so a checked decoy shape let an
    // unchecked one through (its product overflowed in a debug build), and two
    // dtypes left the choice to the parser. A string that holds a shape is a decoy
    // too.
    let huge = "(4294967295, 4294967295, 4294967295, 4294967295)";
    let twice = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 4, 4), 'shape': {huge}, }}");
    case("shape_twice.npy", &twice, &[0; 64], "names 'shape' more than once");
    let in_string =
        format!("{{'descr': '<f4', 'x': \"'shape': (1, 1, 4, 4)\", 'fortran_order': False, 'shape': {huge}, }}");
    case("shape_in_string.npy", &in_string, &[0; 64], "names 'shape' more than once");
    let dtypes = "{'descr': '<f4', 'descr': '<f2', 'fortran_order': False, 'shape': (1, 1, 4, 4), }";
    case("descr_twice.npy", dtypes, &[0; 64], "names 'descr' more than once");
    // An escaped key, which the parser decodes to `shape` past the checks above.
    let escaped = format!("{{'descr': '<f4', 'fortran_order': False, '\\x73hape': {huge}, }}");
    case("escaped_key.npy", &escaped, &[0; 64], "backslash");
    // A directory is said to be one, not "too short".
    let not_a_file = dir.path().join("sub");
    std::fs::create_dir(&not_a_file).unwrap();
    assert_refused(&["apply", "--input", not_a_file.to_str().unwrap(), "--output", ys], "directory");
}

/// A minimal PNG whose header claims `w` x `h` pixels (an empty IDAT follows).
fn png_claiming(path: &Path, w: u32, h: u32) {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(&ihdr);
    bytes.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for chunk in [b"IDAT", b"IEND"] {
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn oversized_images_and_shapes_are_typed_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("huge.png");
    png_claiming(&png, 100_000, 100_000);
    let out = dir.path().join("out.png");
    assert_refused(&["show", "--image", png.to_str().unwrap(), "--png", out.to_str().unwrap()], "larger than");
    assert!(!out.exists());
    // An image within the reader's bound whose picture at the zoom is not: refused
    // by its header, before 2^28 pixels are decoded (1 GiB) for nothing.
    png_claiming(&png, 16_384, 16_384);
    let args = ["show", "--image", png.to_str().unwrap(), "--png", out.to_str().unwrap(), "--zoom", "8"];
    assert_refused(&args, "larger than");
    assert!(!out.exists());
    // Shapes the library accepts but no host holds (past a 47-bit address space,
    // whatever the overcommit policy): refused when the buffers are made.
    for shape in ["2147483648,2147483648,1,1", "67108864,1048576,1,1"] {
        assert_refused(&["bench", "--device", "cpu", "--shape", shape, "--iters", "1"], "allocate");
    }
}

#[test]
fn outputs_never_clobber_inputs_and_are_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, "<f4", &[1, 2, 8, 8], &[1f32; 128]);
    let before = std::fs::read(&x).unwrap();
    let (xs, y) = (x.to_str().unwrap(), dir.path().join("y.npy"));
    let ys = y.to_str().unwrap();
    assert_refused(&["apply", "--input", xs, "--output", xs], "--input");
    assert_refused(&["apply", "--input", xs, "--output", ys, "--keep-mask", ys], "--output");
    assert_refused(&["apply", "--input", xs, "--output", ys, "--keep-mask", xs], "--input");
    // The same file through another spelling of its path.
    let other = format!("{}/./x.npy", dir.path().display());
    assert_refused(&["apply", "--input", xs, "--output", &other], "--input");
    assert_eq!(std::fs::read(&x).unwrap(), before, "the input changed");
    assert!(!y.exists());
    // A keep mask that cannot be written: no y either.
    let bad = dir.path().join("missing-dir").join("m.npy");
    assert_refused(&["apply", "--input", xs, "--output", ys, "--keep-mask", bad.to_str().unwrap()], "m.npy");
    assert!(!y.exists(), "y was left behind by a failed run");
    // A keep mask that names a directory: refused before y is put in place (the
    // rename onto it failed after y's).
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert_refused(&["apply", "--input", xs, "--output", ys, "--keep-mask", sub.to_str().unwrap()], "directory");
    assert!(!y.exists(), "y was left behind by a failed run");
    std::fs::remove_dir(&sub).unwrap();
    // No temporary files are left beside the outputs.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x.npy")], "{names:?}");
    // `show` does not overwrite its --image either.
    let png = dir.path().join("p.png");
    let out = dropblock(&["show", "--size", "8x8", "--block", "3", "--png", png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let picture = std::fs::read(&png).unwrap();
    let again = format!("{}/./p.png", dir.path().display());
    assert_refused(&["show", "--image", png.to_str().unwrap(), "--png", &again], "--image");
    assert_eq!(std::fs::read(&png).unwrap(), picture, "show overwrote its input");
}

/// Outputs get a plain file's mode under the umask, as any write would give them,
/// not the owner-only mode of a temporary file.
#[cfg(unix)]
#[test]
fn outputs_have_the_mode_a_plain_write_gives() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, "<f4", &[1, 2, 8, 8], &[1f32; 128]);
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let want = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
    let (y, m) = (dir.path().join("y.npy"), dir.path().join("m.npy"));
    let args = ["apply", "--input", x.to_str().unwrap(), "--output", y.to_str().unwrap()];
    let out = dropblock(&[&args[..], &["--keep-mask", m.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in [&y, &m] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}: mode {mode:o}, a plain write gives {want:o}", p.display());
    }
}

#[test]
fn device_cuda_matches_the_cpu_or_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, "<f4", &[2, 3, 9, 11], &common::input(2 * 3 * 9 * 11, 4));
    let (yc, yg) = (dir.path().join("y_cpu.npy"), dir.path().join("y_cuda.npy"));
    let run = |y: &Path, device: &str| {
        let args = ["apply", "--input", x.to_str().unwrap(), "--output", y.to_str().unwrap(), "--block", "3"];
        dropblock(&[&args[..], &["--drop-prob", "0.3", "--device", device]].concat())
    };
    if dropblock_has_gpu() {
        // With a GPU, --device cuda works and writes the CPU's bytes.
        assert!(run(&yc, "cpu").status.success());
        let out = run(&yg, "cuda");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&yc).unwrap(), std::fs::read(&yg).unwrap());
    } else {
        let args = ["apply", "--input", x.to_str().unwrap(), "--output", yg.to_str().unwrap(), "--device", "cuda"];
        let needle = if cfg!(feature = "cuda") { "CUDA" } else { "without the `cuda` feature" };
        assert_one_line_error(&args, needle);
    }
}

/// Whether the kernels run here. Only a missing driver, device or build of the
/// kernels counts as no GPU, and that fails under `DROPBLOCK_REQUIRE_GPU=1`.
fn dropblock_has_gpu() -> bool {
    #[cfg(feature = "cuda")]
    let probe = dropblock::cuda::DropBlockCuda::new(0).map(drop);
    #[cfg(not(feature = "cuda"))]
    let probe = Err(dropblock::Error::KernelsNotBuilt);
    match probe {
        Ok(()) => true,
        Err(e) if e.is_no_gpu() => {
            assert!(!common::gpu_required(), "DROPBLOCK_REQUIRE_GPU=1 but {e}");
            eprintln!("no GPU ({e}): the CUDA half did not run; checked its clean refusal instead");
            false
        }
        Err(e) => panic!("a GPU is there but DropBlockCuda::new(0) failed: {e}"),
    }
}

/// `bench` prints one line per timed iteration and ends with the line the
/// benchmark scripts parse, for each pass; `--device cuda` without a GPU is a
/// one-line error, and so is asking for two passes.
#[test]
fn bench_prints_the_line_scripts_parse() {
    for extra in [&[][..], &["--backward", "--dtype", "bf16"][..], &["--sampling"][..]] {
        let args = [&["bench", "--device", "cpu", "--shape", "2,3,9,11", "--block", "3", "--iters", "4"][..], extra];
        let out = dropblock(&args.concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.lines().filter(|l| l.starts_with("iter ")).count(), 4, "{stdout}");
        let last = stdout.lines().last().unwrap();
        // The format, not the figures: tests do not time.
        let fields: Vec<&str> = last.split(' ').collect();
        assert_eq!(fields.len(), 2, "`{last}`");
        for (field, name) in fields.iter().zip(["median_ms=", "gbps="]) {
            let value = field.strip_prefix(name).unwrap_or_else(|| panic!("`{last}` lacks `{name}`"));
            assert!(value.parse::<f64>().is_ok(), "`{last}`: `{value}` is not a number");
        }
        // The median of the lines above (of an even count: the middle two's mean),
        // to their printed precision.
        let mut ms: Vec<f64> =
            stdout.lines().filter_map(|l| l.strip_prefix("iter ")?.split_whitespace().nth(1)?.parse().ok()).collect();
        ms.sort_by(f64::total_cmp);
        let median: f64 = fields[0]["median_ms=".len()..].parse().unwrap();
        assert!((median - (ms[1] + ms[2]) / 2.0).abs() <= 1e-4, "{median} is not the median of {ms:?}");
    }
    let refused = dropblock(&["bench", "--device", "cpu", "--shape", "1,1,8,8", "--from-idle"]);
    assert!(!refused.status.success(), "--from-idle on the CPU was accepted");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--device cuda"), "{refused:?}");
    let both = dropblock(&["bench", "--device", "cpu", "--shape", "1,1,8,8", "--sampling", "--backward"]);
    assert!(!both.status.success(), "--sampling with --backward was accepted");
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"), "{both:?}");
    if !dropblock_has_gpu() {
        let needle = if cfg!(feature = "cuda") { "CUDA" } else { "without the `cuda` feature" };
        assert_one_line_error(&["bench", "--device", "cuda", "--shape", "1,1,8,8", "--iters", "1"], needle);
    }
}

/// A reader that closes the pipe early (`dropblock bench | head -1`) stops the
/// command quietly: exit status 0 and no panic on stderr, where `println!` used
/// to panic with a backtrace. The pipe is closed before the command writes its
/// first line, so every write it makes fails.
#[test]
fn a_closed_stdout_stops_the_command_quietly() {
    let with_stdout_closed = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dropblock"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run dropblock");
        drop(child.stdout.take());
        child.wait_with_output().expect("wait for dropblock")
    };
    for args in
        [&["bench", "--device", "cpu", "--shape", "2,3,9,11", "--block", "3", "--iters", "4"][..], &["--help"][..]]
    {
        let out = with_stdout_closed(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success() || args[0] == "--help", "{args:?}: {:?} {stderr}", out.status);
    }
    // A command whose work is a file does that work with its report cut off.
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("demo.png");
    let out = with_stdout_closed(&["demo", "--device", "cpu", "--shape", "2,4,9,9", "--png", png.to_str().unwrap()]);
    assert!(out.status.success(), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(png.exists(), "demo with a closed stdout wrote no picture");
}

/// A closed stderr (a reader gone, `2>&-`) costs the messages, not the work or the
/// exit status: `eprintln!` panicked, and the command exited 101 whatever it had
/// done. `apply` writes its summary there on success, errors are reported there,
/// and a bad `DROPBLOCK_CPU_CAPABILITY` is warned of there by the library.
#[test]
fn a_closed_stderr_keeps_the_work_and_the_exit_status() {
    // The pipe's reader is closed before the child starts, so its first write fails.
    let with_stderr_closed = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        Command::new(env!("CARGO_BIN_EXE_dropblock"))
            .args(args)
            .env("DROPBLOCK_CPU_CAPABILITY", "fastest")
            .stdout(std::process::Stdio::null())
            .stderr(writer)
            .status()
            .expect("run dropblock")
            .code()
    };
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    write_npy(&xp, "<f4", &[1, 2, 9, 9], &common::input(162, 3));
    let (xs, ys) = (xp.to_str().unwrap(), yp.to_str().unwrap());
    assert_eq!(with_stderr_closed(&["apply", "--device", "cpu", "--input", xs, "--output", ys]), Some(0));
    assert!(yp.exists(), "apply with a closed stderr wrote no output");
    let missing = dir.path().join("missing.npy");
    let args = ["apply", "--device", "cpu", "--input", missing.to_str().unwrap(), "--output", ys];
    assert_eq!(with_stderr_closed(&args), Some(1), "a failed command");
    assert_eq!(with_stderr_closed(&["apply", "--no-such-flag"]), Some(2), "a usage error");
}

/// The hidden temporary files (`.tmp*`) in `dir`.
#[cfg(unix)]
fn temporary_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(".tmp"))
        .collect()
}

/// Starts `command` with SIGINT, SIGTERM and SIGHUP at `disposition`: the test's
/// own may be inherited ignored (a background job of a non-interactive shell, as
/// CI scripts run, ignores SIGINT), which the command would keep.
#[cfg(unix)]
fn signals_start_at(command: &mut Command, disposition: libc::sighandler_t) {
    // SAFETY: only async-signal-safe signal() runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, disposition);
            }
            Ok(())
        })
    };
}

/// Runs `apply` (through `start`, which spawns it with these arguments) on ever
/// larger tensors until `signal`, sent to the process `target` names once a
/// temporary file is seen, lands before the run finishes, and returns that run's
/// status. Every run, interrupted or not, must leave no temporary file, and a run
/// that finished first must have succeeded.
#[cfg(unix)]
fn interrupted_apply(
    signal: libc::c_int,
    start: impl Fn(&[&str]) -> std::process::Child,
    target: impl Fn(&std::process::Child) -> Option<libc::pid_t>,
) -> std::process::ExitStatus {
    for rows in [1usize << 10, 1 << 12, 1 << 14] {
        let dir = tempfile::tempdir().unwrap();
        let (xp, yp, mp) = (dir.path().join("x.npy"), dir.path().join("y.npy"), dir.path().join("m.npy"));
        write_npy(&xp, "<f4", &[1, 4, rows as u64, 1024], &vec![1.5f32; 4 * rows * 1024]);
        let (xs, ys, ms) = (xp.to_str().unwrap(), yp.to_str().unwrap(), mp.to_str().unwrap());
        let mut child = start(&["apply", "--device", "cpu", "--input", xs, "--output", ys, "--keep-mask", ms]);
        let pid = loop {
            if let Some(pid) = target(&child).filter(|_| !temporary_files(dir.path()).is_empty()) {
                break Some(pid);
            }
            if child.try_wait().unwrap().is_some() {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        };
        if let Some(pid) = pid {
            // SAFETY: a signal to a process that `target` found alive just now
            // (our child, or its child read from its list of children: a PID is
            // reused only once its process ended, was reaped and the PID space
            // wrapped in those microseconds).
            unsafe { libc::kill(pid, signal) };
        }
        let status = child.wait().unwrap();
        assert_eq!(temporary_files(dir.path()), Vec::<String>::new(), "signal {signal}: left behind ({status:?})");
        if pid.is_some() && !status.success() {
            return status;
        }
        assert!(status.success(), "signal {signal}: {status:?}");
    }
    panic!("signal {signal}: apply never ran long enough to interrupt");
}

/// An interrupted `apply` (Ctrl-C, SIGTERM, SIGHUP) removes its temporary outputs
/// and dies of the signal; a signal's default action left them beside the output,
/// hidden and tensor-sized, and an exit with a code (130, as it once did) would
/// not stop a shell script's loop at a Ctrl-C.
#[cfg(unix)]
#[test]
fn an_interrupted_apply_leaves_no_temporary_files() {
    let dropblock = |args: &[&str], disposition: libc::sighandler_t| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dropblock"));
        command.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        signals_start_at(&mut command, disposition);
        command.spawn().expect("run dropblock")
    };
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let status = interrupted_apply(signal, |args| dropblock(args, libc::SIG_DFL), |c| Some(c.id() as libc::pid_t));
        let died_of = std::os::unix::process::ExitStatusExt::signal(&status);
        assert_eq!(died_of, Some(signal), "signal {signal}: {status:?}");
    }
    // Started ignoring SIGINT (a shell's background job; `nohup` for SIGHUP), it
    // stays ignored: SIGINT, sent over and over while apply runs, does not stop it.
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    write_npy(&xp, "<f4", &[1, 4, 1 << 12, 1024], &vec![1.5f32; 4 << 22]);
    let args = ["apply", "--device", "cpu", "--input", xp.to_str().unwrap(), "--output", yp.to_str().unwrap()];
    let mut child = dropblock(&args, libc::SIG_IGN);
    let mut sent = 0;
    while child.try_wait().unwrap().is_none() {
        if !temporary_files(dir.path()).is_empty() {
            // SAFETY: a signal to our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            sent += 1;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let status = child.wait().unwrap();
    assert!(status.success() && yp.exists(), "apply started ignoring SIGINT: {status:?} after {sent} SIGINTs");
    assert!(sent > 0, "apply finished before a temporary file was seen");
}

/// As PID 1 of a PID namespace (a container's entry point) a process is not ended
/// by the default action of a signal it raises itself: an interrupted `apply`
/// there removes its temporaries and exits 128 + the signal's number, where
/// signal-hook's re-raise aborted (a core dump, or death by SIGSEGV). Run under
/// util-linux's `unshare` in a user and PID namespace; where none can be made the
/// test says so and skips, unless `DROPBLOCK_REQUIRE_PID_NAMESPACE=1` (CI).
#[cfg(target_os = "linux")]
#[test]
fn an_interrupted_apply_as_pid_1_exits_with_the_signals_code() {
    const UNSHARE: [&str; 4] = ["--user", "--map-root-user", "--pid", "--fork"];
    let namespaces = Command::new("unshare").args(UNSHARE).arg("true").stderr(std::process::Stdio::null()).status();
    // The child's PID outside is read from its parent's list of children, which a
    // kernel without CONFIG_PROC_CHILDREN does not keep.
    let me = std::process::id();
    let children_listed = Path::new(&format!("/proc/{me}/task/{me}/children")).exists();
    if !(namespaces.is_ok_and(|s| s.success()) && children_listed) {
        let required = std::env::var("DROPBLOCK_REQUIRE_PID_NAMESPACE").is_ok_and(|v| v == "1");
        let why = match children_listed {
            true => format!("`unshare {}` cannot make a PID namespace here", UNSHARE.join(" ")),
            false => "this kernel lists no task's children in /proc".to_string(),
        };
        assert!(!required, "DROPBLOCK_REQUIRE_PID_NAMESPACE=1 but {why}");
        eprintln!("an_interrupted_apply_as_pid_1_exits_with_the_signals_code: skipped, {why}");
        return;
    }
    let unshared = |args: &[&str]| {
        let mut command = Command::new("unshare");
        command.args(UNSHARE).arg(env!("CARGO_BIN_EXE_dropblock")).args(args);
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        signals_start_at(&mut command, libc::SIG_DFL);
        command.spawn().expect("run unshare")
    };
    // The process `unshare --fork` started: PID 1 inside, this PID outside.
    let first_child = |child: &std::process::Child| -> Option<libc::pid_t> {
        let pid = child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    };
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let status = interrupted_apply(signal, unshared, first_child);
        assert_eq!(status.code(), Some(128 + signal), "signal {signal} to PID 1: {status:?}");
    }
}

#[test]
fn demo_and_show_write_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("demo.png");
    let out = dropblock(&["demo", "--shape", "2,16,14,14", "--png", png.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["config:", "gamma:", "realised drop fraction", "forward:", "backward:"] {
        assert!(stdout.contains(needle), "demo output lacks `{needle}`:\n{stdout}");
    }
    assert!(std::fs::metadata(&png).unwrap().len() > 100);

    let shown = dir.path().join("show.png");
    let out = dropblock(&[
        "show",
        "--size",
        "20x30",
        "--block",
        "4x6",
        "--placement",
        "anywhere",
        "--png",
        shown.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::fs::File::open(&shown).unwrap());
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (30 * 8, 20 * 8));

    // A map larger than the picture shows is cropped, not drawn at any size (a 1D
    // shape of 10^8 cells asked for a 24 GB picture).
    let long = dir.path().join("long.png");
    let out = dropblock(&["demo", "--device", "cpu", "--shape", "1,2,100000", "--png", long.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("first 1 x 256 cells"));
    let decoder = png::Decoder::new(std::fs::File::open(&long).unwrap());
    let info = decoder.read_info().unwrap().info().clone();
    assert!(info.width <= 4 * (256 * 8 + 4) && info.height <= 4 * (8 + 4), "{}x{}", info.width, info.height);

    // The image sets the map size; a --size beside it would be ignored, so it is refused.
    let again = dir.path().join("again.png");
    let (image, again) = (shown.to_str().unwrap(), again.to_str().unwrap());
    assert_one_line_error(&["show", "--image", image, "--size", "3x3", "--png", again], "--image");
    // Flags that cannot change one map's mask are refused, not silently ignored.
    for (flags, needle) in [
        (&["--share", "channels"][..], "which --share does not change"),
        (&["--normalize", "none", "--fill", "noise"], "which --normalize or --fill does not change"),
    ] {
        let mut args = vec!["show", "--size", "8x8", "--png", again];
        args.extend_from_slice(flags);
        assert_one_line_error(&args, needle);
    }
    // ...and left out of show's help, which apply's lists.
    let help = |command| String::from_utf8(dropblock(&[command, "--help"]).stdout).unwrap();
    let (show, apply) = (help("show"), help("apply"));
    for flag in ["--share", "--normalize", "--fill"] {
        assert!(!show.contains(flag) && apply.contains(flag), "{flag} in show's help:\n{show}");
    }
    assert!(show.contains("--block") && show.contains("--drop-prob"), "{show}");
}
