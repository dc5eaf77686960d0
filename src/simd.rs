//! Which instruction-set extensions the CPU path uses: the crate builds for the
//! x86-64 baseline and picks its AVX2, F16C and `popcnt` forms at run time, and its
//! AVX-512 forms where the toolchain has their intrinsics (`cfg(dropblock_avx512)`,
//! Rust 1.89 on). Every SIMD form gives the portable form's bits.
//!
//! `DROPBLOCK_CPU_CAPABILITY` (read once per process) caps what runs whatever the
//! CPU has, so that each form runs under test on one machine and a SIMD form can be
//! ruled out of a discrepancy: `baseline` keeps every call on the portable forms,
//! `avx2` allows the AVX2, F16C and `popcnt` forms but not the AVX-512 ones. Unset,
//! or `auto`, uses whatever the CPU has.

use std::sync::OnceLock;

/// The variable that [`simd_allowed`] and [`avx512_allowed`] read.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const CAPABILITY_VAR: &str = "DROPBLOCK_CPU_CAPABILITY";

/// What `DROPBLOCK_CPU_CAPABILITY` allows, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Capability {
    Baseline,
    Avx2,
    Auto,
}

/// Whether the SIMD forms may run: not under `DROPBLOCK_CPU_CAPABILITY=baseline`.
/// Any value but `baseline`, `avx2` and `auto` is reported once on stderr and
/// taken as `auto`. (Only x86-64 has SIMD forms so far.)
///
/// Inlined: the element passes ask once a 64-element word, and the call took 2 %
/// of a bf16 backward (2026-12-01).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline]
pub(crate) fn simd_allowed() -> bool {
    capability() > Capability::Baseline
}

/// Whether the AVX-512 forms may run: neither `baseline` nor `avx2`.
#[cfg_attr(not(all(target_arch = "x86_64", dropblock_avx512)), allow(dead_code))]
#[inline]
pub(crate) fn avx512_allowed() -> bool {
    capability() == Capability::Auto
}

#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn capability() -> Capability {
    static CAPABILITY: OnceLock<Capability> = OnceLock::new();
    *CAPABILITY.get_or_init(read_capability)
}

/// A library's warning on stderr, dropped if stderr is closed: the caller's
/// process must not panic for it.
#[cold]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn warn(message: std::fmt::Arguments) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "dropblock: {message}");
}

#[cold]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn read_capability() -> Capability {
    const EXPECTED: &str = "expected \"baseline\", \"avx2\" or \"auto\"";
    match std::env::var(CAPABILITY_VAR).as_deref() {
        Ok("baseline") => Capability::Baseline,
        Ok("avx2") => Capability::Avx2,
        Ok("auto") | Err(std::env::VarError::NotPresent) => Capability::Auto,
        Ok(other) => {
            warn(format_args!("ignoring {CAPABILITY_VAR}={other:?} ({EXPECTED})"));
            Capability::Auto
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            warn(format_args!("ignoring {CAPABILITY_VAR}, which is not UTF-8 ({EXPECTED})"));
            Capability::Auto
        }
    }
}

/// `cpu_has!("f")`: whether the SIMD forms may run ([`simd_allowed`]) and the
/// CPU has target feature `f` (x86-64 only; callers are `cfg`'d to it).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! cpu_has {
    ($($feature:tt),+) => {
        $crate::simd::simd_allowed() $(&& std::is_x86_feature_detected!($feature))+
    };
}

/// Whether the AVX-512F forms may run and the CPU has AVX-512F.
#[cfg(all(target_arch = "x86_64", dropblock_avx512))]
#[inline]
pub(crate) fn avx512f_available() -> bool {
    avx512_allowed() && cpu_has!("avx512f")
}

/// `with_feature! { "f", fn $name(args) { body } }` defines `$name`, which runs its
/// body compiled with target feature `f` when [`cpu_has!`] finds it, and as built
/// otherwise: the crate builds for the x86-64 baseline, which has neither `popcnt`
/// nor AVX2 (the CPU passes' bit lanes vectorise two to an instruction, not four).
macro_rules! with_feature {
    ($feature:tt, $(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = $feature)]
                fn with($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if cpu_has!($feature) {
                    // SAFETY: the CPU was just found to have the feature.
                    return unsafe { with($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// `cpu_detects!("f", ...)`: whether the CPU has every target feature named,
/// whatever `DROPBLOCK_CPU_CAPABILITY` allows (false off x86-64): for a form whose
/// build depends on the toolchain (`cfg(dropblock_avx512)`), what it should run on.
#[cfg(test)]
macro_rules! cpu_detects {
    ($($feature:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        let has = true $(&& std::is_x86_feature_detected!($feature))+;
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has
    }};
}

/// For the tests of a SIMD form: whether to skip, saying why, because the form
/// does not run in this process (`runs` false), where the portable form then runs
/// instead. Under `DROPBLOCK_REQUIRE_SIMD=1` a form that does not run although
/// this CPU has its features and `DROPBLOCK_CPU_CAPABILITY` allows it (`expected`:
/// the toolchain lacks it, or its detection is wrong) fails the test instead. CI
/// sets it on any CPU: there every form the CPU has is tested, and only the forms
/// it lacks skip.
#[cfg(test)]
pub(crate) fn skip_form_test(test: &str, form: &str, runs: bool, expected: bool) -> bool {
    if runs {
        return false;
    }
    let required = std::env::var("DROPBLOCK_REQUIRE_SIMD").is_ok_and(|v| v == "1");
    assert!(
        !(required && expected),
        "{test}: the {form} form does not run, although this CPU has it and DROPBLOCK_REQUIRE_SIMD=1"
    );
    eprintln!("{test}: skipped, the {form} form does not run here (CPU, toolchain or DROPBLOCK_CPU_CAPABILITY)");
    true
}

/// The SIMD forms this process runs ([`crate::cpu::simd_forms`]).
pub(crate) fn forms() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut forms = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if crate::mask::avx512_available() {
            forms.push("avx512-gfni");
        }
        if crate::sampling::avx512_available() {
            forms.push("avx512f");
        }
        for (name, on) in [("avx2", cpu_has!("avx2")), ("f16c", cpu_has!("f16c")), ("popcnt", cpu_has!("popcnt"))] {
            if on {
                forms.push(name);
            }
        }
    }
    forms
}

#[cfg(test)]
mod tests {
    /// The gates follow the variable this process was started with: CI runs the
    /// CPU tests once more under `baseline` and once under `avx2`, where this
    /// checks that they took.
    #[test]
    fn capability_variable_gates_the_simd_forms() {
        let value = std::env::var(super::CAPABILITY_VAR).unwrap_or_default();
        assert_eq!(super::simd_allowed(), value != "baseline");
        assert_eq!(super::avx512_allowed(), value != "baseline" && value != "avx2");
        let forms = super::forms();
        match value.as_str() {
            "baseline" => assert!(forms.is_empty(), "{forms:?}"),
            "avx2" => assert!(forms.iter().all(|f| !f.starts_with("avx512")), "{forms:?}"),
            _ => {}
        }
        #[cfg(target_arch = "x86_64")]
        if value != "baseline" {
            assert_eq!(forms.contains(&"avx2"), std::is_x86_feature_detected!("avx2"), "{forms:?}");
        }
        #[cfg(all(target_arch = "x86_64", dropblock_avx512))]
        if value != "baseline" && value != "avx2" {
            assert_eq!(forms.contains(&"avx512f"), std::is_x86_feature_detected!("avx512f"), "{forms:?}");
        }
    }
}
