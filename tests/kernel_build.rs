//! What the build put into the crate, checked without a GPU: the fatbin's SASS
//! and PTX, ptxas's resource report (no kernel may spill), and the typed errors
//! when there is no driver or device.
#![cfg(feature = "cuda")]

use dropblock::cuda;

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
        assert!(archs.iter().all(|a| [75, 80, 86, 89, 90, 100, 120].contains(a)), "{archs:?}");
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
