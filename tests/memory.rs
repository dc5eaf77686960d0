//! The CPU path's memory, counted by a global allocator: a call holds one bit per
//! mask cell plus a constant, whatever the plane size ((N, C, 1, 1) included) and
//! the layout from 64 channels on (channels-last bits are transposed into the
//! tensor's order by each tile of the sampling, with a tile's scratch a thread, or
//! a cache-sized region at a time by the passes; the shapes here have 64 channels
//! or more), and nothing the size of the tensor.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dropblock::{cpu, Block, DropBlockConfig, Layout, Mode, RngKey, Shape, Sharing};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters
// only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Bytes allocated at the peak of `f` over what was live before it.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst) - before)
}

/// Room for everything that does not grow with the tensor: the plan, per-sample
/// counts and scales (a few words a sample), and rayon's jobs, of which each
/// worker holds some at a time (measured: 1.5 KB a thread at 4096x4096x1x1, from
/// 1 to 32 threads), so that a runner of many cores does not fail a bound set by
/// a small one.
fn constant(n: usize) -> usize {
    64 * 1024 + 32 * n + 4 * 1024 * rayon::current_num_threads()
}

/// Room for the scratch of a channels-last sampling's tiles: one a thread, of
/// whole samples, each about 2^20 bits or one sample's.
fn tile_scratch(shape: Shape) -> usize {
    rayon::current_num_threads() * (1usize << 20).max(shape.c() * shape.plane_len()) / 8
}

// One test, so that no other test's allocations land in the counters.
#[test]
fn a_call_holds_one_bit_per_mask_cell() {
    let cfg = DropBlockConfig::builder(Block::uniform(3).unwrap(), 0.1).build().unwrap();
    let key = RngKey::new(5, 0).unwrap();
    // Start rayon's pool outside the counted calls.
    cpu::sample(&cfg, Shape::new(1, 1, 4, 4).unwrap(), key, Mode::Train).unwrap();

    for shape in [
        Shape::new(4096, 4096, 1, 1).unwrap(),
        Shape::new(64, 256, 14, 14).unwrap(),
        Shape::new_1d(8, 64, 4099).unwrap(),
    ] {
        let cells = shape.numel();
        let bits = cells.div_ceil(64) * 8;
        let (saved, peak) = peak_of(|| cpu::sample(&cfg, shape, key, Mode::Train).unwrap());
        assert!(
            peak <= bits + constant(shape.n()),
            "{shape}: sampling peaked at {peak} bytes for {bits} bytes of bits"
        );
        assert!(peak >= bits, "{shape}: {peak} bytes cannot hold the {bits} bytes of bits");

        // The element-wise passes allocate nothing the size of the tensor.
        let x = vec![1.5f32; cells];
        let mut y = vec![0f32; cells];
        let ((), peak) = peak_of(|| cpu::apply(&saved, &x, &mut y).unwrap());
        assert!(peak <= constant(shape.n()), "{shape}: apply allocated {peak} bytes");
        let (_, peak) = peak_of(|| cpu::forward(&cfg, shape, key, Mode::Train, &x, &mut y).unwrap());
        assert!(peak <= bits + constant(shape.n()), "{shape}: forward peaked at {peak} bytes");

        // Channels-last holds one bit an element too, and its sampling a tile's
        // scratch a thread at most.
        let cl = shape.with_layout(Layout::ChannelsLast);
        let (saved, peak) = peak_of(|| cpu::sample(&cfg, cl, key, Mode::Train).unwrap());
        let room = bits + constant(shape.n()) + tile_scratch(cl);
        assert!(peak <= room, "{cl}: sampling peaked at {peak} bytes for {bits} bytes of bits");
        let ((), peak) = peak_of(|| cpu::apply(&saved, &x, &mut y).unwrap());
        assert!(peak <= constant(shape.n()), "{cl}: apply allocated {peak} bytes");
        let ((), peak) = peak_of(|| cpu::backward(&saved, &x, &mut y).unwrap());
        assert!(peak <= constant(shape.n()), "{cl}: backward allocated {peak} bytes");
    }

    // Shared masks hold one plane's bits per sharing group, not the tensor's.
    let shared = DropBlockConfig::builder(Block::uniform(3).unwrap(), 0.1).sharing(Sharing::Channels).build().unwrap();
    let shape = Shape::new(64, 256, 14, 14).unwrap();
    let (_, peak) = peak_of(|| cpu::sample(&shared, shape, key, Mode::Train).unwrap());
    let bits = (64 * 14 * 14usize).div_ceil(64) * 8;
    assert!(peak <= bits + constant(64), "channel-shared sampling peaked at {peak} bytes");
}
