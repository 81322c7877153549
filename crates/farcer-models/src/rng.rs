//! The seeded random numbers of weight initialisation and dropout masks.

use rayon::prelude::*;

/// SplitMix64's step between states.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output for a state.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws per task in [`Rng::keep_mask`].
const MASK_CHUNK: usize = 1 << 16;

/// The integer form of `uniform() < keep`: `uniform()` is `(x >> 11) 2^-53`, exact in
/// f64, and so is `keep 2^53` after the clamp; for an integer `u`, `u < t` exactly when
/// `u < ceil(t)`. A NaN `keep` keeps nothing, as `uniform() < NaN` never holds.
fn keep_bound(keep: f64) -> u64 {
    (keep.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64
}

/// The draws after state `first` (the state before the chunk's first draw) as
/// `on`/0 by `(x >> 11) < bound`.
fn keep_chunk(out: &mut [f32], first: u64, bound: u64, on: f32) {
    for (i, o) in out.iter_mut().enumerate() {
        let x = mix(first.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)));
        *o = if (x >> 11) < bound { on } else { 0.0 };
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014). Tiny, fast, and fixed forever: our few-shot
/// draws and weight initialisation must not change when a dependency does.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// Derives an independent stream for a named purpose, so adding a draw in one place
    /// does not shift every other draw.
    pub fn derive(seed: u64, purpose: &str) -> Self {
        let mut h = 0xcbf29ce484222325u64; // FNV-1a of the purpose
        for b in purpose.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        let mut r = Rng::new(seed ^ h);
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// `n` draws of `if uniform() < keep { on } else { 0 }`, exactly the values (and the
    /// state after them) that `n` calls to [`Rng::uniform`] would give. SplitMix64's
    /// `i`-th draw is a function of `state + i gamma` alone, so the draws are computed in
    /// parallel: a LoRA step draws tens of millions of dropout decisions.
    pub fn keep_mask(&mut self, n: usize, keep: f64, on: f32) -> Vec<f32> {
        let bound = keep_bound(keep);
        let start = self.state;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(MASK_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let before = (c as u64).wrapping_mul(MASK_CHUNK as u64);
                keep_chunk(
                    chunk,
                    start.wrapping_add(before.wrapping_mul(GAMMA)),
                    bound,
                    on,
                );
            });
        self.state = start.wrapping_add((n as u64).wrapping_mul(GAMMA));
        out
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n). `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        // Lemire's multiply-shift; the bias is below 2^-40 for our sizes.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub fn range_inclusive(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    pub fn choose<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{keep_bound, Rng};

    /// The integer bound keeps exactly the draws `uniform() < keep` keeps, at the edges
    /// a random test would almost never reach.
    #[test]
    fn keep_bound_is_the_float_comparison() {
        let two53 = 1u64 << 53;
        let unit = |u: u64| u as f64 / two53 as f64;
        assert_eq!(keep_bound(0.0), 0);
        assert_eq!(keep_bound(-1.0), 0);
        assert_eq!(keep_bound(f64::NAN), 0);
        assert_eq!(keep_bound(1.0), two53);
        assert_eq!(keep_bound(0.5), two53 / 2);
        for keep in [0.5, 0.9, 0.95, 1.0 - 1.0 / two53 as f64, 1e-300, 0.3] {
            let b = keep_bound(keep);
            // The last kept value is below `keep`; the first dropped one is not.
            assert!(b == 0 || unit(b - 1) < keep, "keep {keep}");
            assert!(b == two53 || unit(b) >= keep, "keep {keep}");
        }
    }

    /// The parallel mask is the scalar loop's, value for value, across chunk edges, and
    /// leaves the stream where the loop would.
    #[test]
    fn keep_mask_is_the_sequential_draws() {
        for (n, keep) in [
            (0, 0.9),
            (1, 0.9),
            (7, 0.5),
            (65_536, 0.9),
            (65_537, 0.95),
            (200_003, 0.9),
            (1000, 1.0),
            (1000, 0.0),
        ] {
            let mut a = Rng::derive(7, "mask");
            let mut b = a.clone();
            let on = (1.0 / keep) as f32;
            let want: Vec<f32> = (0..n)
                .map(|_| if a.uniform() < keep { on } else { 0.0 })
                .collect();
            let got = b.keep_mask(n, keep, on);
            assert_eq!(got, want, "n {n}, keep {keep}");
            assert_eq!(a.next_u64(), b.next_u64(), "state after n {n}");
        }
        // The test draws both outcomes.
        let m = Rng::new(3).keep_mask(1000, 0.5, 2.0);
        assert!(m.contains(&0.0) && m.contains(&2.0));
    }
}
