//! Philox4x32-10 and the draw stream, against independent references:
//! Random123's known-answer vectors, and curand's `curand_init` / `curand`
//! arithmetic re-implemented here from `curand_kernel.h` and
//! `curand_philox4x32_x.h` (CUDA 13.0), quirks included.

use dropblock::rng::philox4x32_10;
use dropblock::{Generator, RngKey};
use rand::{Rng, SeedableRng};

#[test]
fn random123_known_answers() {
    // DEShawResearch/random123 tests/kat_vectors, philox4x32 10 rounds.
    let kats: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in kats {
        assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:08x?} key {key:08x?}");
    }
}

/// `curandStatePhilox4_32_10_t` and the functions that touch it, line by line.
struct CurandPhilox {
    ctr: [u32; 4],
    key: [u32; 2],
    output: [u32; 4],
    state: u32,
}

impl CurandPhilox {
    fn incr_n(&mut self, n: u64) {
        let nlo = n as u32;
        let mut nhi = (n >> 32) as u32;
        self.ctr[0] = self.ctr[0].wrapping_add(nlo);
        if self.ctr[0] < nlo {
            nhi = nhi.wrapping_add(1);
        }
        self.ctr[1] = self.ctr[1].wrapping_add(nhi);
        if nhi <= self.ctr[1] {
            return;
        }
        self.ctr[2] = self.ctr[2].wrapping_add(1);
        if self.ctr[2] != 0 {
            return;
        }
        self.ctr[3] = self.ctr[3].wrapping_add(1);
    }

    fn incr_hi(&mut self, n: u64) {
        let nlo = n as u32;
        let mut nhi = (n >> 32) as u32;
        self.ctr[2] = self.ctr[2].wrapping_add(nlo);
        if self.ctr[2] < nlo {
            nhi = nhi.wrapping_add(1);
        }
        self.ctr[3] = self.ctr[3].wrapping_add(nhi);
    }

    fn incr(&mut self) {
        for i in 0..4 {
            self.ctr[i] = self.ctr[i].wrapping_add(1);
            if self.ctr[i] != 0 {
                return;
            }
        }
    }

    /// `curand_init(seed, subsequence, offset, &state)`.
    fn init(seed: u64, subsequence: u64, offset: u64) -> Self {
        let mut s = Self { ctr: [0; 4], key: [seed as u32, (seed >> 32) as u32], output: [0; 4], state: 0 };
        // skipahead_sequence
        s.incr_hi(subsequence);
        s.output = philox4x32_10(s.ctr, s.key);
        // skipahead
        s.state += (offset & 3) as u32;
        let mut n = offset / 4;
        if s.state > 3 {
            n += 1;
            s.state -= 4;
        }
        s.incr_n(n);
        s.output = philox4x32_10(s.ctr, s.key);
        s
    }

    /// `curand(&state)`.
    fn next(&mut self) -> u32 {
        let ret = self.output[self.state as usize];
        self.state += 1;
        if self.state == 4 {
            self.incr();
            self.output = philox4x32_10(self.ctr, self.key);
            self.state = 0;
        }
        ret
    }
}

/// `_curand_uniform`: x · 2^-32 + 2^-33 in f32.
fn uniform(x: u32) -> f32 {
    const INV: f32 = 2.3283064e-10;
    x as f32 * INV + INV / 2.0
}

#[test]
fn curand_reimplementation_matches_published_check_value() {
    // curand_init(0, 0, 0) then curand_uniform4: Random123's first known answer
    // (philox4x32-10 of a zero counter and key: 6627e8d5 e169c58d bc57ac4c
    // 9b00dbd8, checked as words above) through curand's uniform conversion.
    let mut s = CurandPhilox::init(0, 0, 0);
    let got: Vec<f32> = (0..4).map(|_| uniform(s.next())).collect();
    assert_eq!(got, [0.39904648, 0.8805202, 0.73571277, 0.60548186]);
}

#[test]
fn draw_stream_is_curand_init_then_curand() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut cases: Vec<(u64, u64, u64)> = (0..200)
        .map(|_| {
            (
                rng.random(),
                rng.random::<u64>() >> rng.random_range(0..64),
                rng.random::<u64>() >> rng.random_range(2..64),
            )
        })
        .collect();
    // Word boundaries of the counter and the subsequence, and the largest offset.
    cases.extend([
        (0, 0, 0),
        (1, u32::MAX as u64, u32::MAX as u64 - 3),
        (u64::MAX, u64::MAX, RngKey::MAX_OFFSET),
        (12345, 1 << 32, (1 << 32) - 8),
    ]);
    for (seed, window, offset) in cases {
        let key = RngKey::new(seed, offset).unwrap();
        let mut reference = if offset <= u64::MAX / 4 {
            CurandPhilox::init(seed, window, 4 * offset)
        } else {
            // 4·offset does not fit curand_init's u64 offset; skip ahead by blocks.
            let mut r = CurandPhilox::init(seed, window, 0);
            r.incr_n(offset);
            r.output = philox4x32_10(r.ctr, r.key);
            r
        };
        for j in 0..64 {
            assert_eq!(key.draw(window, j), reference.next(), "seed {seed} window {window} offset {offset} draw {j}");
        }
    }
}

#[test]
fn offsets_past_the_last_call_are_errors() {
    assert!(RngKey::new(1, RngKey::MAX_OFFSET).is_ok());
    let err = RngKey::new(1, RngKey::MAX_OFFSET + 1).unwrap_err();
    assert!(matches!(err, dropblock::Error::OffsetOverflow { .. }), "{err}");
    assert!(RngKey::new(1, u64::MAX).is_err());
}

#[test]
fn generator_steps_by_seventeen_and_replays() {
    let mut g = Generator::new(99);
    let keys: Vec<RngKey> = (0..4).map(|_| g.next_key().unwrap()).collect();
    assert_eq!(keys.iter().map(|k| k.offset()).collect::<Vec<_>>(), [0, 17, 34, 51]);
    assert!(keys.iter().all(|k| k.seed() == 99));
    let mut resumed = Generator::from_state(99, 34);
    assert_eq!(resumed.next_key().unwrap(), keys[2]);

    let mut near_end = Generator::from_state(5, RngKey::MAX_OFFSET);
    assert!(near_end.next_key().is_ok());
    assert!(near_end.next_key().is_err(), "the generator must not wrap");
    assert!(near_end.next_key().is_err());
}

#[test]
fn keys_from_entropy_start_at_offset_0_and_differ() {
    let (a, b) = (RngKey::from_entropy(), RngKey::from_entropy());
    assert_eq!((a.offset(), b.offset()), (0, 0));
    // A false failure has probability 2^-64.
    assert_ne!(a.seed(), b.seed(), "two draws of OS entropy gave the same seed");
}
