//! NVTX ranges around the CUDA path's entry points, for Nsight Systems: one range
//! per call on the host thread that enqueues it (`dropblock::forward`,
//! `dropblock::sample`, `dropblock::apply`, `dropblock::backward`,
//! `dropblock::sample_shard`, `dropblock::finish_shard`), in the
//! `dropblock` domain, its message carrying the dtype, shape and config.
//!
//! Behind the `nvtx` feature. Without it [`range`] is an empty inline function
//! whose message closure is never called, so the ranges cost nothing. With it and
//! no profiler attached, NVTX's calls return at once; the message is still
//! formatted (well under a launch's cost).

#[cfg(feature = "nvtx")]
mod on {
    use std::sync::OnceLock;

    fn domain() -> &'static nvtx::Domain {
        static DOMAIN: OnceLock<nvtx::Domain> = OnceLock::new();
        DOMAIN.get_or_init(|| nvtx::Domain::new(c"dropblock"))
    }

    /// An open range, pushed on this thread's NVTX stack so it nests under the
    /// caller's own ranges (a training step, a layer); it ends when dropped.
    pub struct Range(#[allow(dead_code)] nvtx::domain::LocalRange<'static>);

    #[inline]
    pub fn range(name: &str, detail: impl FnOnce() -> String) -> Range {
        let message = nvtx::Str::from_string_lossy(format!("{name} {}", detail()));
        Range(domain().local_range(message))
    }
}

#[cfg(not(feature = "nvtx"))]
mod on {
    /// Nothing: the `nvtx` feature is off.
    pub struct Range;

    #[inline(always)]
    pub fn range(_name: &str, _detail: impl FnOnce() -> String) -> Range {
        Range
    }
}

pub(crate) use on::range;

#[cfg(test)]
mod tests {
    use super::range;
    use std::cell::Cell;

    /// Off, the message is never built; on, it is built once per range.
    #[test]
    fn the_message_is_built_only_with_the_feature() {
        let built = Cell::new(0);
        {
            let _range = range("dropblock::forward", || {
                built.set(built.get() + 1);
                "bf16 1x2x3x4".into()
            });
        }
        assert_eq!(built.get(), usize::from(cfg!(feature = "nvtx")));
    }

    /// With no profiler attached NVTX's calls return at once; ranges nest, end in
    /// any order a scope allows, and open on many threads without a fault, each
    /// building its message once (with the feature).
    #[test]
    fn ranges_without_a_profiler_do_nothing_harmful() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let built = AtomicUsize::new(0);
        let message = |text: String| {
            built.fetch_add(1, Ordering::Relaxed);
            text
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for i in 0..100 {
                        let _outer = range("dropblock::forward", || message(format!("thread {t} call {i} ✓")));
                        let _inner = range("dropblock::backward", || message(String::new()));
                    }
                });
            }
        });
        assert_eq!(built.into_inner(), if cfg!(feature = "nvtx") { 800 } else { 0 });
    }
}
