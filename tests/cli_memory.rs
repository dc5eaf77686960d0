//! The command line's peak memory, in a test binary of its own: the child's peak
//! as the kernel counts it starts from this process's memory at the fork (below),
//! which other tests in the same process (the behaviour suite's, run in parallel,
//! some holding hundreds of MB) would otherwise add to it. The tests here hold
//! nothing tensor-sized, so they may run in parallel.

use std::path::Path;
use std::process::Command;

use npyz::WriterBuilder;

/// `data` written as a `.npy` file of `shape`, as it is made: this process holds
/// nothing tensor-sized.
fn write_npy(path: &Path, shape: &[u64], data: impl Iterator<Item = f32>) {
    let mut w = npyz::WriteOptions::new()
        .dtype(npyz::DType::Plain("<f4".parse().unwrap()))
        .shape(shape)
        .writer(std::io::BufWriter::new(std::fs::File::create(path).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(data).unwrap();
    w.finish().unwrap();
}

/// Peak resident memory of `dropblock args` in bytes, from the kernel's own account
/// (`wait4`'s `ru_maxrss`), after checking that it succeeded. The child is forked
/// (a no-op `pre_exec` makes std fork instead of `posix_spawn`): a spawned child
/// shares this process's memory until it execs, and the kernel would count this
/// process's peak as the child's. A forked one starts from this process's current
/// memory, which is kept small: no test in this binary holds anything tensor-sized.
#[cfg(target_os = "linux")]
fn peak_rss(args: &[&str]) -> u64 {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut command = Command::new(env!("CARGO_BIN_EXE_dropblock"));
    command.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    // Two worker threads on any host: each thread's stack and allocator arena add
    // to the peak, so on a runner of many cores the slack below would measure the
    // core count rather than the buffers.
    command.env("RAYON_NUM_THREADS", "2");
    // SAFETY: the closure does nothing, so nothing unsafe runs between fork and exec.
    unsafe { command.pre_exec(|| Ok(())) };
    // Reaped by wait4 below, which std's wait would pre-empt.
    #[allow(clippy::zombie_processes)]
    let child = command.spawn().expect("run dropblock");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 reaps our own child and fills both.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "dropblock {args:?} failed: {status}");
    // Kilobytes on Linux.
    usage.ru_maxrss as u64 * 1024
}

/// `apply` holds x, y and the keep bits (one bit per element), plus the u8 mask
/// only when `--keep-mask` asks for it: its peak memory over a run on a tiny
/// input (the program, its libraries and threads) is within 6 MiB of that sum
/// (room for huge pages rounding each buffer up). A byte mask made and not asked
/// for (16 MiB here), keep bits held as bytes (14 MiB more), or a second copy of a
/// tensor breaks it.
#[cfg(target_os = "linux")]
#[test]
fn apply_peak_memory_is_x_y_and_the_keep_bits() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let dims = [16u64, 256, 64, 64];
    let n = dims.iter().product::<u64>() as usize;
    write_npy(Path::new(&p("tiny.npy")), &[1, 1, 8, 8], std::iter::repeat_n(1.5f32, 64));
    write_npy(Path::new(&p("x.npy")), &dims, std::iter::repeat_n(1.5f32, n));
    let run = |input: &str, mask: bool| {
        let mut args = vec!["apply".to_string(), "--input".into(), p(input), "--output".into(), p("y.npy")];
        args.extend(["--device", "cpu", "--block", "3"].map(String::from));
        if mask {
            args.extend(["--keep-mask".to_string(), p("m.npy")]);
        }
        peak_rss(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let base = run("tiny.npy", true);
    let (tensor, bits, byte_mask) = (4 * n as u64, n as u64 / 8, n as u64);
    let slack = 6 << 20;
    let without = run("x.npy", false);
    assert!(
        without <= base + 2 * tensor + bits + slack,
        "apply peaked at {without} bytes: more than x and y ({tensor} each) and the keep bits ({bits}) over {base}"
    );
    let with = run("x.npy", true);
    assert!(
        with <= base + 2 * tensor + bits + byte_mask + slack,
        "apply --keep-mask peaked at {with} bytes: more than x, y, the bits and the mask ({byte_mask}) over {base}"
    );
    assert!(with >= without + byte_mask / 2, "the byte mask ({byte_mask}) is not in the peak: {with} vs {without}");
}

/// `bench` holds what its pass touches: x, y and the keep bits for a forward, dx
/// as well for a backward, the bits alone for `--sampling` (which held x, y and dx,
/// 3x the tensor, for nothing). Within the same 6 MiB as `apply`'s bound.
#[cfg(target_os = "linux")]
#[test]
fn bench_peak_memory_is_what_its_pass_touches() {
    let dims = [16usize, 256, 64, 64];
    let n = dims.iter().product::<usize>() as u64;
    let run = |shape: &str, pass: Option<&str>| {
        let mut args = vec!["bench", "--device", "cpu", "--shape", shape, "--block", "3", "--iters", "1"];
        args.extend(pass);
        peak_rss(&args)
    };
    let big = dims.map(|d| d.to_string()).join(",");
    let base = run("1,1,8,8", None);
    let (tensor, bits, slack) = (4 * n, n / 8, 6 << 20);
    let sampling = run(&big, Some("--sampling"));
    assert!(
        sampling <= base + bits + slack,
        "bench --sampling peaked at {sampling} bytes: more than the bits ({bits}) over {base}"
    );
    let forward = run(&big, None);
    assert!(
        forward <= base + 2 * tensor + bits + slack,
        "bench peaked at {forward} bytes: more than x and y ({tensor} each) and the bits ({bits}) over {base}"
    );
    let backward = run(&big, Some("--backward"));
    assert!(
        backward <= base + 3 * tensor + bits + slack,
        "bench --backward peaked at {backward} bytes: more than x, y, dx ({tensor} each) and the bits over {base}"
    );
    assert!(backward >= forward + tensor / 2, "dx ({tensor}) is not in the backward's peak: {backward} vs {forward}");
}
