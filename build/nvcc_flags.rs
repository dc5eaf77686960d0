//! Which nvcc flags the kernels cannot be built with: shared by build.rs and
//! its test (tests/kernel_build.rs).

/// The first flag in `flags` (whitespace-separated, as nvcc reads
/// `NVCC_PREPEND_FLAGS` and `NVCC_APPEND_FLAGS`) that gives up IEEE single
/// precision in device code, as written (with its value where that is the next
/// word): `--use_fast_math`, `-ftz=true`, `-prec-div=false`, `-prec-sqrt=false`,
/// in any of nvcc's spellings, here or in a file that `-optf` names. The kernels agree with the CPU path bit for bit
/// only with denormals kept and divisions and square roots correctly rounded.
pub fn inexact_float_flag(flags: &str) -> Option<String> {
    in_flags(flags, 0)
}

/// `depth`: files read to get here (a file that names itself is nvcc's error to
/// report, not a loop here).
fn in_flags(flags: &str, depth: usize) -> Option<String> {
    let words: Vec<&str> = flags.split_whitespace().collect();
    words.iter().enumerate().find_map(|(i, word)| {
        // `--ftz=true`, `-ftz true`, `--use-fast-math`: one spelling.
        let flag = word.trim_start_matches('-').replace('-', "_");
        let next = words.get(i + 1).copied().unwrap_or_default();
        let (name, value, shown) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v, word.to_string()),
            None => (flag.clone(), next, format!("{word} {next}")),
        };
        match name.as_str() {
            "use_fast_math" => Some(word.to_string()),
            "ftz" if value == "true" => Some(shown),
            "prec_div" | "prec_sqrt" if value == "false" => Some(shown),
            // Files of more flags, comma-separated (one that cannot be read is
            // nvcc's error to report).
            "optf" | "options_file" if depth < 8 => value.split(',').find_map(|path| {
                let more = std::fs::read_to_string(path).ok()?;
                in_flags(&more, depth + 1).map(|f| format!("{f} (in {path})"))
            }),
            _ => None,
        }
    })
}
