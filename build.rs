//! Compiles `kernels/*.cu` into one fatbin, embedded by `src/cuda/module.rs`.
//!
//! - nvcc is found through `NVCC`, `CUDA_HOME`, `CUDA_PATH`, then `PATH`.
//! - The host C++ compiler nvcc runs (`-ccbin`) is the one the `cc` crate picks for
//!   the target, as for the rest of a Rust build: `CXX_<target>`, `TARGET_CXX` or
//!   `HOST_CXX`, `CXX`, then the platform's default. nvcc's own `NVCC_CCBIN` wins.
//! - SASS for every supported arch plus PTX for the newest; `DROPBLOCK_CUDA_ARCHS`
//!   (e.g. `90` or `80,90`) narrows the list for quick local builds.
//! - ptxas's resource report is kept in `OUT_DIR/ptxas_report.txt` and embedded as
//!   `dropblock::cuda::ptxas_report()`, where a test checks it for spills.
//! - `cfg(dropblock_avx512)` is set where the toolchain has the AVX-512 intrinsics
//!   (Rust 1.89 on) that the CPU path's AVX-512 forms use.
//! - Without the `cuda` feature nothing is compiled. With it and no nvcc the build
//!   fails and says how to get one, so kernels are never silently missing.
//! - nvcc's warnings are errors under `DROPBLOCK_WERROR=1` (CI, and the pinned
//!   toolchain of `scripts/cuda-toolchain.sh`); with another toolkit they are
//!   cargo warnings, so a newer nvcc's new warning does not break a user's build.
//! - nvcc runs only when what it reads changed (`compile_once`): a rerun of this
//!   script for a changed PATH, or a kernel file touched but not changed, keeps the
//!   fatbin.
//! - A setup problem ends the build with `cargo::error` lines that say what to do,
//!   not a panic.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One SASS per family a device can run: a device runs SASS of its own major
/// version and an equal or lower minor (sm_86's on 8.7, sm_100's on 10.3, sm_120's
/// on 12.1), and the PTX only on archs at or above the newest, so Jetson Thor
/// (11.0) needs its own.
const DEFAULT_ARCHS: &[u32] = &[75, 80, 86, 89, 90, 100, 110, 120];

#[path = "build/nvcc_flags.rs"]
mod nvcc_flags;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dropblock_kernels)");
    println!("cargo::rustc-check-cfg=cfg(dropblock_avx512)");
    // The CPU path's AVX-512 forms need intrinsics stabilised in Rust 1.89; older
    // toolchains (the rust-version is 1.88) build without them.
    if autocfg::AutoCfg::new().is_ok_and(|ac| ac.probe_path("std::arch::x86_64::_mm512_gf2p8affine_epi64_epi8")) {
        println!("cargo::rustc-cfg=dropblock_avx512");
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build");
    println!("cargo::rerun-if-changed=kernels");
    // nvcc reads the last three itself.
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "DROPBLOCK_CUDA_ARCHS",
        "DROPBLOCK_WERROR",
        "DOCS_RS",
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    // The emulator test (tests/kernel_emulation.rs) builds host C++ for the same target.
    println!("cargo::rustc-env=DROPBLOCK_BUILD_TARGET={}", env::var("TARGET").unwrap());
    println!("cargo::rustc-env=DROPBLOCK_BUILD_HOST={}", env::var("HOST").unwrap());
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if env::var_os("DOCS_RS").is_some() {
        // docs.rs has no nvcc; docs need no kernels (the crate builds as one without them).
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let fatbin = out_dir.join("dropblock.fatbin");
    let report = out_dir.join("ptxas_report.txt");
    refuse_inexact_float_flags();
    let nvcc = find_nvcc().unwrap_or_else(|| fail_no_nvcc());
    // A toolkit replaced in place (new pins in the same directory) rebuilds.
    println!("cargo::rerun-if-changed={}", nvcc.display());
    // The tests that read the kernels' PTX or emulate them use the same nvcc.
    println!("cargo::rustc-env=DROPBLOCK_NVCC={}", nvcc.display());
    let archs = supported(&nvcc, archs());
    let unity = write_unity_source(&out_dir);

    let mut cmd = Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "-std=c++17", "-lineinfo", "--threads", "0", "-Xptxas", "-v"]);
    let werror = env::var("DROPBLOCK_WERROR").is_ok_and(|v| v == "1");
    if werror {
        cmd.args(["-Werror", "all-warnings"]);
    }
    // The test that compiles the kernels to PTX runs nvcc with the same host
    // compiler (none recorded where nvcc reads NVCC_CCBIN itself).
    let mut recorded = String::new();
    if let Some(ccbin) = host_compiler() {
        cmd.arg("-ccbin").arg(&ccbin);
        recorded = ccbin.display().to_string();
    }
    println!("cargo::rustc-env=DROPBLOCK_NVCC_CCBIN={recorded}");
    cmd.arg(format!("-I{}", Path::new("kernels").canonicalize().unwrap().display()));
    if let Some(include) = nvcc.parent().and_then(Path::parent).map(|root| root.join("include")) {
        if include.is_dir() {
            cmd.arg(format!("-I{}", include.display()));
        }
    }
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let newest = archs.iter().max().unwrap();
    cmd.arg(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
    cmd.arg("-o").arg(&fatbin).arg(&unity);

    let stderr = compile_once(&mut cmd, &nvcc, &fatbin);
    if !werror {
        for line in stderr.lines().filter(|l| l.contains("warning")) {
            println!("cargo::warning=nvcc: {line}");
        }
    }
    // ptxas's lines, and the indented lines under them (stack frame and spills).
    let ptxas: String =
        stderr.lines().filter(|l| l.starts_with("ptxas") || l.starts_with(' ')).map(|l| format!("{l}\n")).collect();
    fs::write(&report, &ptxas).unwrap();
    if ptxas.lines().any(|l| l.contains("bytes spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")) {
        println!("cargo::warning=ptxas reports register spills; see {}", report.display());
    }
    let list: Vec<String> = archs.iter().map(|a| a.to_string()).collect();
    println!("cargo::rustc-env=DROPBLOCK_CUDA_ARCHS_BUILT={}", list.join(","));
    println!("cargo::rustc-cfg=dropblock_kernels");
}

/// An environment variable, unset when empty (`NVCC= cargo build`).
fn var_os(name: &str) -> Option<std::ffi::OsString> {
    env::var_os(name).filter(|v| !v.is_empty())
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = var_os("NVCC") {
        let p = PathBuf::from(p);
        // A bare command name (`NVCC=nvcc-12.4`) is looked up on PATH.
        let found = match p.components().count() {
            1 if !p.is_file() => on_path(&p),
            _ => Some(p.clone()).filter(|p| p.is_file()),
        };
        return Some(found.unwrap_or_else(|| {
            fail(&format!(
                "NVCC is set to {}, which is neither a file nor a command on PATH: point it at nvcc, or unset it",
                p.display()
            ))
        }));
    }
    for root in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = var_os(root) {
            let p = PathBuf::from(r).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    on_path(Path::new(exe))
}

fn on_path(exe: &Path) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join(exe)).find(|p| p.is_file()))
}

/// The target's C++ compiler as `cc` resolves it (None when `NVCC_CCBIN` is set,
/// which nvcc reads itself).
fn host_compiler() -> Option<PathBuf> {
    println!("cargo::rerun-if-env-changed=NVCC_CCBIN");
    if var_os("NVCC_CCBIN").is_some() {
        return None;
    }
    let tool = cc::Build::new().cpp(true).try_get_compiler().unwrap_or_else(|e| {
        fail(&format!(
            "nvcc needs a host C++ compiler and none was found ({e}): install one (Debian: apt install g++), \
             or name it in CXX or NVCC_CCBIN"
        ))
    });
    let path = tool.path().to_path_buf();
    if Command::new(&path).arg("--version").output().is_err() {
        fail(&format!(
            "nvcc's host C++ compiler {} does not run: install it (Debian: apt install g++), or name another in \
             CXX or NVCC_CCBIN",
            path.display()
        ));
    }
    Some(path)
}

/// Ends the build with `message`, one `cargo::error` a line: a setup problem
/// said plainly, not a panic and its backtrace hint.
fn fail(message: &str) -> ! {
    for line in message.lines() {
        println!("cargo::error={line}");
    }
    std::process::exit(1)
}

/// nvcc reads `NVCC_PREPEND_FLAGS` and `NVCC_APPEND_FLAGS` itself, after this
/// script's flags: refuses those that give up the kernels' IEEE arithmetic
/// (`build/nvcc_flags.rs`).
fn refuse_inexact_float_flags() {
    for var in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"] {
        let Some(flags) = var_os(var) else { continue };
        if let Some(shown) = nvcc_flags::inexact_float_flag(&flags.to_string_lossy()) {
            fail(&format!(
                "{var} holds `{shown}`, which gives up IEEE single precision in the kernels: their results would \
                 differ from the CPU path's, which they must match bit for bit. Remove it from {var}."
            ));
        }
    }
}

fn fail_no_nvcc() -> ! {
    fail(
        "nvcc not found (looked at NVCC, CUDA_HOME, CUDA_PATH, then PATH).\n\
         The `cuda` feature (on by default) compiles the kernels with nvcc; no GPU is needed to build. Either:\n\
         - in this repository, run through ./scripts/cuda-toolchain.sh (shipped in the crate too), which installs \
         a pinned nvcc 13.0 from PyPI into ~/.cache/dropblock and runs the command you give it, e.g. \
         ./scripts/cuda-toolchain.sh cargo build\n\
         - or install a CUDA toolkit and set CUDA_HOME (or put nvcc on PATH)\n\
         - or go without the CUDA path: `dropblock = { version = \"0.3\", default-features = false }` in your \
         Cargo.toml (add `features = [\"cli\"]` for the command line), or here \
         cargo build --no-default-features --features cli",
    )
}

/// Runs `cmd` (nvcc, writing `fatbin`) and returns its stderr, unless the
/// fatbin on disk came from the same inputs: then the stderr saved with it.
///
/// Cargo reruns this script when any watched variable or file changes, and every
/// rerun used to spend nvcc's 15–20 s (all archs) again. Many reruns change
/// nothing nvcc reads: PATH differing between a shell and an IDE, or gaining the
/// toolchain script's entry when nvcc comes from `CUDA_HOME`; a kernel file
/// touched by a branch switch and back. The fingerprint is what nvcc does read:
/// its command line, every file under `kernels/` by content, the nvcc and host
/// compiler binaries by size, mtime and `--version`, and the variables nvcc reads
/// itself with the files their `-optf` flags name. The stamp is removed before
/// nvcc runs and written after it succeeds, so an interrupted build never pairs a
/// stamp with a partial fatbin.
fn compile_once(cmd: &mut Command, nvcc: &Path, fatbin: &Path) -> String {
    let stamp = fatbin.with_extension("fatbin.inputs");
    let saved_stderr = fatbin.with_extension("fatbin.stderr");
    let inputs = fingerprint(cmd, nvcc);
    if fs::read_to_string(&stamp).is_ok_and(|s| s == inputs) && fatbin.is_file() {
        if let Ok(stderr) = fs::read_to_string(&saved_stderr) {
            return stderr;
        }
    }
    let _ = fs::remove_file(&stamp);
    let out = cmd.output().unwrap_or_else(|e| fail(&format!("could not run {}: {e}", nvcc.display())));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        fail(&format!(
            "nvcc failed ({}):\n{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            stderr
        ));
    }
    fs::write(&saved_stderr, &stderr).unwrap();
    fs::write(&stamp, inputs).unwrap();
    stderr
}

/// A hash of nvcc's inputs ([`compile_once`]). SipHash with fixed keys: stable
/// for one Rust release, and a release that hashes differently costs one rebuild.
fn fingerprint(cmd: &Command, nvcc: &Path) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    format!("{cmd:?}").hash(&mut h);
    for var in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"] {
        env::var_os(var).hash(&mut h);
    }
    for var in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"] {
        for file in var_os(var).map(|f| nvcc_flags::option_files(&f.to_string_lossy())).unwrap_or_default() {
            println!("cargo::rerun-if-changed={file}");
            (fs::read(&file).ok(), file).hash(&mut h);
        }
    }
    // The host compiler: `-ccbin`'s, or NVCC_CCBIN's, which nvcc reads itself; a
    // bare name (`c++`, `g++-13`) is the one PATH gives.
    let ccbin = cmd.get_args().skip_while(|a| *a != "-ccbin").nth(1).map(PathBuf::from);
    let ccbin = ccbin.or_else(|| var_os("NVCC_CCBIN").map(PathBuf::from));
    let ccbin = ccbin.and_then(|c| if c.components().count() == 1 { on_path(&c) } else { Some(c) });
    for binary in std::iter::once(nvcc.to_path_buf()).chain(ccbin) {
        let meta = fs::metadata(&binary).ok();
        (&binary, meta.as_ref().map(|m| m.len()), meta.and_then(|m| m.modified().ok())).hash(&mut h);
        Command::new(&binary).arg("--version").output().map(|o| o.stdout).unwrap_or_default().hash(&mut h);
    }
    let mut sources = Vec::new();
    files_under(Path::new("kernels"), &mut sources);
    sources.sort();
    for path in sources {
        (fs::read(&path).unwrap_or_default(), path).hash(&mut h);
    }
    format!("{:016x}\n", h.finish())
}

/// Every file under `dir`, at any depth (cargo's `rerun-if-changed` on a
/// directory watches them all).
fn files_under(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("reading {}: {e}", dir.display()))) {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => files_under(&path, files),
            false => files.push(path),
        }
    }
}

fn archs() -> Vec<u32> {
    let Some(list) = env::var("DROPBLOCK_CUDA_ARCHS").ok().filter(|v| !v.trim().is_empty()) else {
        return DEFAULT_ARCHS.to_vec();
    };
    let archs: Vec<u32> = list
        .split([',', ' ', ';'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s.trim().trim_start_matches("sm_").trim_start_matches("compute_");
            digits
                .parse()
                .unwrap_or_else(|_| fail(&format!("DROPBLOCK_CUDA_ARCHS: `{s}` is not an arch like 90 or sm_90")))
        })
        .collect();
    if archs.is_empty() {
        fail("DROPBLOCK_CUDA_ARCHS names no arch: give a list like 90 or 80,90, or unset it");
    }
    archs
}

/// The archs this nvcc can target (an older toolkit lacks sm_100, sm_110 and sm_120);
/// the others are left out with a warning.
fn supported(nvcc: &Path, wanted: Vec<u32>) -> Vec<u32> {
    let Ok(out) = Command::new(nvcc).arg("--list-gpu-code").output() else { return wanted };
    let list = String::from_utf8_lossy(&out.stdout);
    let known: Vec<u32> = list.split_whitespace().filter_map(|c| c.strip_prefix("sm_")?.parse().ok()).collect();
    if known.is_empty() {
        return wanted;
    }
    let (keep, drop): (Vec<u32>, Vec<u32>) = wanted.into_iter().partition(|a| known.contains(a));
    if !drop.is_empty() {
        println!("cargo::warning=nvcc at {} cannot build sm_{drop:?}; leaving them out", nvcc.display());
    }
    if keep.is_empty() {
        fail(&format!("nvcc at {} supports none of the requested archs", nvcc.display()));
    }
    keep
}

/// nvcc compiles one translation unit to one fatbin, so every kernel file is
/// included into one generated unit (`#include` keeps file names for -lineinfo).
fn write_unity_source(out_dir: &Path) -> PathBuf {
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("kernels/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let body: String =
        sources.iter().map(|p| format!("#include \"{}\"\n", p.canonicalize().unwrap().display())).collect();
    let unity = out_dir.join("dropblock_all.cu");
    fs::write(&unity, body).unwrap();
    unity
}
