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

/// The files that `-optf` (`--options-file`) names in `flags`, and in those
/// files, as nvcc reads them: what else the build's output depends on.
pub fn option_files(flags: &str) -> Vec<String> {
    let mut files = Vec::new();
    collect_files(flags, 0, &mut files);
    files
}

/// The files files of more flags may nest: a file that names itself is nvcc's
/// error to report, not a loop here.
const MAX_DEPTH: usize = 8;

/// `depth`: files read to get here.
fn in_flags(flags: &str, depth: usize) -> Option<String> {
    flag_words(flags).into_iter().find_map(|(name, value, word, shown)| match name.as_str() {
        "use_fast_math" => Some(word.to_string()),
        "ftz" if value == "true" => Some(shown),
        "prec_div" | "prec_sqrt" if value == "false" => Some(shown),
        // Files of more flags, comma-separated (one that cannot be read is
        // nvcc's error to report).
        "optf" | "options_file" if depth < MAX_DEPTH => value.split(',').find_map(|path| {
            let more = std::fs::read_to_string(path).ok()?;
            in_flags(&more, depth + 1).map(|f| format!("{f} (in {path})"))
        }),
        _ => None,
    })
}

fn collect_files(flags: &str, depth: usize, files: &mut Vec<String>) {
    for (name, value, ..) in flag_words(flags) {
        if matches!(name.as_str(), "optf" | "options_file") && depth < MAX_DEPTH {
            for path in value.split(',') {
                files.push(path.to_string());
                if let Ok(more) = std::fs::read_to_string(path) {
                    collect_files(&more, depth + 1, files);
                }
            }
        }
    }
}

/// Each word of `flags` as (name in one spelling, value, the word, the word as
/// shown with its value): `--ftz=true`, `-ftz true` and `--ftz true` are all
/// ("ftz", "true"), `--use-fast-math` is "use_fast_math".
fn flag_words(flags: &str) -> Vec<(String, &str, &str, String)> {
    let words: Vec<&str> = flags.split_whitespace().collect();
    let next = |i: usize| words.get(i + 1).copied().unwrap_or_default();
    words
        .iter()
        .enumerate()
        .map(|(i, &word)| {
            let flag = word.trim_start_matches('-').replace('-', "_");
            match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), &word[word.len() - v.len()..], word, word.to_string()),
                None => (flag.clone(), next(i), word, format!("{word} {}", next(i))),
            }
        })
        .collect()
}
