//! Dropout for training forwards. The masks come from seeded streams that the caller
//! holds, one per dropout site (the projection, each LoRA adapter), so a model is never
//! mutated by a forward and one loaded model can serve many callers at once. candle's
//! own CPU RNG cannot be seeded, so the masks are drawn here and multiplied in.

use crate::Rng;
use candle_core::{Result, Tensor};
use std::collections::HashMap;

/// A training forward's dropout streams. Each site's stream starts from
/// `(seed, site)` on first use, so a step run again with the same seed (a resumed run)
/// draws the same masks, on the fused and the op-by-op path alike.
/// Cloning copies the streams' states, so a clone replays the same masks (a layer
/// recomputed in the backward draws what its forward drew).
#[derive(Debug, Clone)]
pub struct Dropout {
    seed: u64,
    streams: HashMap<String, Rng>,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Dropout {
            seed,
            streams: HashMap::new(),
        }
    }

    /// `n` inverted-dropout multipliers from `site`'s stream: `1 / (1 - p)` kept, 0
    /// dropped.
    pub fn mask(&mut self, site: &str, n: usize, p: f64) -> Vec<f32> {
        let seed = self.seed;
        let rng = self
            .streams
            .entry(site.to_string())
            .or_insert_with(|| Rng::derive(seed, site));
        let keep = 1.0 - p;
        rng.keep_mask(n, keep, (1.0 / keep) as f32)
    }

    /// Inverted dropout of `x` with probability `p` (`x` itself when `p` is 0).
    pub fn apply(&mut self, site: &str, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.mask(site, x.elem_count(), p);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}
