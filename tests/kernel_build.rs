//! What the build put into the crate, checked without a GPU: the fatbin's SASS
//! and PTX, ptxas's resource report (no kernel may spill), and the typed errors
//! when there is no driver or device.
#![cfg(feature = "cuda")]

use dropblock::cuda;

#[path = "../build/nvcc_flags.rs"]
mod nvcc_flags;

/// build.rs refuses nvcc flags (from `NVCC_PREPEND_FLAGS` or `NVCC_APPEND_FLAGS`)
/// that give up IEEE arithmetic in the kernels, in nvcc's spellings, and takes
/// the rest.
#[test]
fn flags_that_break_bit_exactness_are_refused() {
    for (flags, refused) in [
        ("--use_fast_math", "--use_fast_math"),
        ("-O3 -use_fast_math -lineinfo", "-use_fast_math"),
        ("--use-fast-math", "--use-fast-math"),
        ("-ftz=true", "-ftz=true"),
        ("--ftz true", "--ftz true"),
        ("-prec-div=false", "-prec-div=false"),
        ("--prec_sqrt false", "--prec_sqrt false"),
    ] {
        assert_eq!(nvcc_flags::inexact_float_flag(flags).as_deref(), Some(refused), "{flags}");
    }
    for flags in ["", "-O3", "-ftz=false -prec-div=true --prec-sqrt true", "-Xptxas -v", "-lineinfo --ftz false"] {
        assert_eq!(nvcc_flags::inexact_float_flag(flags), None, "{flags}");
    }
    // And in the files -optf names.
    let dir = tempfile::tempdir().unwrap();
    let (fast, plain) = (dir.path().join("fast"), dir.path().join("plain"));
    std::fs::write(&fast, "-O3\n--use_fast_math\n").unwrap();
    std::fs::write(&plain, "-O3 -lineinfo").unwrap();
    let (fast, plain) = (fast.to_str().unwrap(), plain.to_str().unwrap());
    let refused = nvcc_flags::inexact_float_flag(&format!("-optf {plain},{fast}"));
    assert_eq!(refused, Some(format!("--use_fast_math (in {fast})")));
    assert_eq!(nvcc_flags::inexact_float_flag(&format!("--options-file={plain}")), None);
    // A path's own dashes are not a flag's spelling.
    let dashed = dir.path().join("fast-flags");
    std::fs::copy(fast, &dashed).unwrap();
    let dashed = dashed.to_str().unwrap();
    let refused = nvcc_flags::inexact_float_flag(&format!("--options-file={dashed}"));
    assert_eq!(refused, Some(format!("--use_fast_math (in {dashed})")));
}

/// The files build.rs hashes with nvcc's inputs (and watches): those `-optf`
/// names, in either spelling, comma-separated, and those they name in turn.
#[test]
fn option_files_are_inputs_of_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let (outer, inner, other) = (dir.path().join("outer"), dir.path().join("in-ner"), dir.path().join("other"));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    std::fs::write(&outer, format!("-O3\n--options-file={}\n", path(&inner))).unwrap();
    std::fs::write(&inner, "-lineinfo").unwrap();
    let flags = format!("-Xptxas -v -optf {},{} -O2", path(&outer), path(&other));
    assert_eq!(nvcc_flags::option_files(&flags), [path(&outer), path(&inner), path(&other)]);
    assert!(nvcc_flags::option_files("-O3 --use_fast_math").is_empty());
}

/// (kind, sm arch) of every entry of a fatbin: kind 1 is PTX, 2 is SASS (ELF).
fn fatbin_entries(fatbin: &[u8]) -> Vec<(u16, u32)> {
    let u16_at = |o: usize| u16::from_le_bytes(fatbin[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(fatbin[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(fatbin[o..o + 8].try_into().unwrap());
    assert_eq!(u32_at(0), 0xBA55_ED50, "fatbin magic");
    let header = u16_at(6) as usize;
    let end = header + u64_at(8) as usize;
    let mut entries = Vec::new();
    let mut off = header;
    while off < end {
        let (kind, entry_header, payload) = (u16_at(off), u32_at(off + 4) as usize, u64_at(off + 8) as usize);
        entries.push((kind, u32_at(off + 28)));
        off += entry_header + payload;
    }
    entries
}

#[test]
fn fatbin_has_sass_for_every_arch_and_ptx_for_the_newest() {
    let archs = cuda::built_archs();
    assert!(!archs.is_empty(), "no archs recorded by build.rs");
    if option_env!("DROPBLOCK_CUDA_ARCHS").is_none() {
        // The default list, less what an older nvcc cannot build (build.rs warns).
        assert!(archs.iter().all(|a| [75, 80, 86, 89, 90, 100, 110, 120].contains(a)), "{archs:?}");
        assert!(archs.contains(&90), "H100/H200 SASS missing: {archs:?}");
    }
    let entries = fatbin_entries(cuda::fatbin());
    for a in &archs {
        assert!(entries.contains(&(2, *a)), "no SASS for sm_{a} in {entries:?}");
    }
    let newest = *archs.iter().max().unwrap();
    assert!(entries.contains(&(1, newest)), "no PTX for compute_{newest} in {entries:?}");
    assert_eq!(entries.iter().filter(|e| e.0 == 1).count(), 1, "PTX for the newest arch only");
}

#[test]
fn ptxas_report_covers_every_kernel_and_nothing_spills() {
    let report = cuda::ptxas_report();
    let mut current: Option<(String, String)> = None;
    let mut seen = std::collections::BTreeSet::new();
    for line in report.lines() {
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            let (name, arch) = rest.split_once("' for '").expect("entry line");
            current = Some((name.to_string(), arch.trim_end_matches('\'').to_string()));
        }
        if line.contains("bytes spill stores") {
            let (name, arch) = current.clone().expect("spill line after an entry line");
            let nums: Vec<u64> =
                line.split(',').map(|f| f.trim().split(' ').next().unwrap().parse().unwrap()).collect();
            assert_eq!(nums[1..], [0, 0], "{name} spills on {arch}: {line}");
            assert_eq!(nums[0], 0, "{name} uses a stack frame on {arch}: {line}");
            seen.insert((name, arch));
        }
    }
    for a in cuda::built_archs() {
        for k in cuda::kernel_names() {
            assert!(seen.contains(&(k.clone(), format!("sm_{a}"))), "no ptxas report for {k} on sm_{a}");
        }
    }
}

#[test]
fn no_driver_or_device_is_a_typed_error() {
    // An oracle independent of the crate's probe where cudarc loads libcuda itself;
    // under candle-cuda cudarc links libcuda and has no probe, and this binary
    // would not have started without the library.
    #[cfg(not(feature = "candle-cuda"))]
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    #[cfg(feature = "candle-cuda")]
    let driver = true;
    assert_eq!(cuda::driver_present(), driver, "the crate's probe disagrees with cudarc's");
    match cuda::DropBlockCuda::new(0) {
        Ok(d) => assert!(driver, "a context without a driver: {}", d.device_name()),
        Err(dropblock::Error::NoDriver) => assert!(!driver),
        Err(dropblock::Error::NoDevice(msg)) => assert!(driver && !msg.is_empty()),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    // A bad ordinal is a typed error too, never a panic.
    match cuda::context(4096) {
        Err(dropblock::Error::NoDriver) | Err(dropblock::Error::NoDevice(_)) => {}
        other => panic!("ordinal 4096: {other:?}"),
    }
}

/// The element passes' 16-byte vectors, checked in the PTX for sm_90 (H100/H200;
/// the newest built arch where a toolkit has no sm_90),
/// where the host emulation cannot see them: every vector kernel stores whole
/// vectors, and the one-pass channels-last forward, which has no scalar head or
/// tail, stores nothing narrower (a store through a cast element pointer once
/// compiled there to 4 scalar f32 or 14 two-byte stores a vector), not even
/// elements packed into untyped words.
#[test]
fn vector_kernels_store_whole_vectors() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    // sm_90 where the build has it, else its newest arch (an older toolkit).
    let archs = cuda::built_archs();
    let arch = if archs.contains(&90) { 90 } else { *archs.iter().max().expect("archs recorded by build.rs") };
    let ptx = dir.join(format!("dropblock_sm{arch}.ptx"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut nvcc = std::process::Command::new(env!("DROPBLOCK_NVCC"));
    // The build's host compiler (none recorded where nvcc reads NVCC_CCBIN itself).
    if !env!("DROPBLOCK_NVCC_CCBIN").is_empty() {
        nvcc.args(["-ccbin", env!("DROPBLOCK_NVCC_CCBIN")]);
    }
    let out = nvcc
        .arg(format!("-arch=sm_{arch}"))
        .args(["-ptx", "-std=c++17"])
        .arg(format!("-I{}", root.join("kernels").display()))
        .arg(root.join("kernels/dropblock.cu"))
        .arg("-o")
        .arg(&ptx)
        .output()
        .expect("run nvcc");
    assert!(out.status.success(), "nvcc -ptx failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let ptx = std::fs::read_to_string(&ptx).unwrap();
    let mut entries: Vec<(&str, &str)> = Vec::new();
    for part in ptx.split(".entry ").skip(1) {
        let (name, body) = part.split_once('(').expect("an entry's parameters");
        entries.push((name, body));
    }
    let global_stores = |name: &str| -> Vec<&str> {
        let body = entries.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no entry {name}")).1;
        body.lines().filter_map(|l| l.split_whitespace().next()).filter(|i| i.starts_with("st.global")).collect()
    };
    let bits_stores = global_stores("dropblock_channels_last_bits");
    let vector_ops = ["apply", "apply_per_sample", "apply_shared", "apply_shared_per_sample", "fused"];
    let one_pass_ops = ["apply_channels_last", "apply_channels_last_per_sample"];
    let mut checked = 0;
    let halves = &[".u16", ".b16"][..];
    for (dtype, element_bytes, narrow) in [("f32", 4, &[".f32"][..]), ("f16", 2, halves), ("bf16", 2, halves)] {
        for op in vector_ops.iter().chain(&one_pass_ops) {
            let name = format!("dropblock_{op}_{dtype}");
            let stores = global_stores(&name);
            assert!(
                stores.iter().any(|s| s.starts_with("st.global.v4.")),
                "{name} stores no 16-byte vector: {stores:?}"
            );
            if one_pass_ops.contains(op) {
                // `st.global[.vN].type`: the element's type, in fewer than 16 bytes.
                let under_16_bytes = |s: &str| {
                    let n = s.split('.').find_map(|p| p.strip_prefix('v')?.parse::<usize>().ok()).unwrap_or(1);
                    n * element_bytes < 16 && narrow.iter().any(|t| s.ends_with(t))
                };
                let scalar: Vec<_> = stores.iter().filter(|s| under_16_bytes(s)).collect();
                assert!(scalar.is_empty(), "{name} stores elements narrower than a vector: {scalar:?}");
                // Elements packed into a word (`st.global.b32` or `.u32` of two halves)
                // have no element type: the one-pass kernel is the transpose kernel's
                // code plus y's stores, so beyond the transpose's own stores of keep
                // bits it may store only whole vectors.
                for kind in stores.iter().filter(|s| !s.starts_with("st.global.v4.")) {
                    let count = |v: &[&str]| v.iter().filter(|s| *s == kind).count();
                    assert!(
                        count(&stores) <= count(&bits_stores),
                        "{name} has {} `{kind}` stores, the transpose alone {}: y stored narrower than a vector",
                        count(&stores),
                        count(&bits_stores)
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 21);
}
