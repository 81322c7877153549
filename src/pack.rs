//! Packed sequences: one forward pass over a *trunk* (text that every later token sees)
//! and *branches* (a label query, a candidate answer) that see the cache, the trunk before
//! them and their own earlier tokens, and are hidden from everything after them. Positions
//! continue as if the branches were not there, so each branch gets exactly the logits it
//! would get alone after its part of the trunk.
//!
//! The one mechanism behind constrained decoding (the query is trunk, every label a
//! branch), live sessions (the label query after the conversation so far) and one-pass
//! training over every utterance of a dialogue (the dialogue is trunk, each utterance's
//! query and answer a branch).

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// The layout of a packed sequence after `past` cached positions.
#[derive(Debug, Clone, Default)]
pub struct Packing {
    past: usize,
    /// Per packed row: `None` for the trunk, else the branch it belongs to.
    owner: Vec<Option<usize>>,
    /// Per packed row: its position id.
    pos: Vec<u32>,
    trunk: usize,
    branches: usize,
}

impl Packing {
    /// An empty packing after `past` positions already in the cache.
    pub fn new(past: usize) -> Self {
        Packing {
            past,
            ..Default::default()
        }
    }

    /// Appends `n` trunk rows; returns their row range.
    pub fn trunk(&mut self, n: usize) -> Range<usize> {
        let start = self.owner.len();
        for k in 0..n {
            self.owner.push(None);
            self.pos.push((self.past + self.trunk + k) as u32);
        }
        self.trunk += n;
        start..self.owner.len()
    }

    /// Appends a branch of `n` rows after the trunk so far; returns their row range.
    pub fn branch(&mut self, n: usize) -> Range<usize> {
        let start = self.owner.len();
        let b = self.branches;
        for k in 0..n {
            self.owner.push(Some(b));
            self.pos.push((self.past + self.trunk + k) as u32);
        }
        self.branches += 1;
        start..self.owner.len()
    }

    /// Packed rows.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// Position ids of the packed rows.
    pub fn positions(&self) -> &[u32] {
        &self.pos
    }

    /// Whether packed row `r` may attend to packed row `c`: causally, and only to the
    /// trunk or to its own branch.
    pub fn sees(&self, r: usize, c: usize) -> bool {
        c <= r && (self.owner[c].is_none() || self.owner[c] == self.owner[r])
    }

    /// The additive attention mask `(len, past + len)`: 0 where a row may attend, -inf
    /// elsewhere; every row sees the whole cache.
    pub fn mask(&self, dev: &Device, dtype: DType) -> Result<Tensor> {
        let n = self.len();
        let s = self.past + n;
        let mut v = vec![f32::NEG_INFINITY; n * s];
        for r in 0..n {
            let row = &mut v[r * s..(r + 1) * s];
            row[..self.past].fill(0.0);
            for c in 0..=r {
                if self.sees(r, c) {
                    row[self.past + c] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(v, (n, s), dev)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trunk `a a`, branch `x x`, trunk `b`, branch `y`: positions skip the branches and
    /// each row sees the cache, the trunk before it and its own branch only.
    #[test]
    fn branches_see_the_trunk_before_them_and_are_hidden_after() {
        let mut p = Packing::new(3);
        assert_eq!(p.trunk(2), 0..2);
        assert_eq!(p.branch(2), 2..4);
        assert_eq!(p.trunk(1), 4..5);
        assert_eq!(p.branch(1), 5..6);
        assert_eq!(p.positions(), &[3, 4, 5, 6, 5, 6]);
        let m = p.mask(&Device::Cpu, DType::F32).unwrap();
        let m = m.to_vec2::<f32>().unwrap();
        let seen =
            |r: usize| -> Vec<usize> { (0..9).filter(|&c| m[r][c] == 0.0).collect::<Vec<_>>() };
        assert_eq!(seen(1), vec![0, 1, 2, 3, 4]);
        assert_eq!(
            seen(3),
            vec![0, 1, 2, 3, 4, 5, 6],
            "branch sees trunk and itself"
        );
        assert_eq!(
            seen(4),
            vec![0, 1, 2, 3, 4, 7],
            "the trunk skips the branch"
        );
        assert_eq!(seen(5), vec![0, 1, 2, 3, 4, 7, 8]);
    }
}
