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

use crate::data::Utterance;
use crate::error::{Error, Result};
use crate::prompt::{Encoded, Piece, Prompter};
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
    /// Per branch: the branch it continues (if any) and the position after its last row.
    parent: Vec<Option<usize>>,
    next: Vec<u32>,
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
        self.add_branch(None, (self.past + self.trunk) as u32, n)
    }

    /// Appends a branch of `n` rows that continues branch `parent` (say, a candidate answer
    /// after a label query): it sees what the parent sees, the parent, and itself. Add it
    /// before any later trunk rows, which it would see too.
    pub fn child(&mut self, parent: usize, n: usize) -> Range<usize> {
        self.add_branch(Some(parent), self.next[parent], n)
    }

    /// The id of the last branch added.
    pub fn last_branch(&self) -> Option<usize> {
        self.parent.len().checked_sub(1)
    }

    fn add_branch(&mut self, parent: Option<usize>, first: u32, n: usize) -> Range<usize> {
        let start = self.owner.len();
        let b = self.parent.len();
        for k in 0..n {
            self.owner.push(Some(b));
            self.pos.push(first + k as u32);
        }
        self.parent.push(parent);
        self.next.push(first + n as u32);
        start..self.owner.len()
    }

    /// Whether branch `a` is `b` or one it continues.
    fn within(&self, a: usize, mut b: usize) -> bool {
        loop {
            if a == b {
                return true;
            }
            match self.parent[b] {
                Some(p) => b = p,
                None => return false,
            }
        }
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
    /// trunk, its own branch and the branches it continues.
    pub fn sees(&self, r: usize, c: usize) -> bool {
        c <= r
            && match (self.owner[c], self.owner[r]) {
                (None, _) => true,
                (Some(a), Some(b)) => self.within(a, b),
                (Some(_), None) => false,
            }
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

/// A dialogue laid out for one packed pass: the trunk (the prompt prefix when it is not
/// cached, the dialogue's opening and its lines, with past labels when the prompt shows
/// them) and, after each target's utterance, a branch with its label query. `answers`
/// adds, right after each query, what continues it: the gold answer (training) or every
/// candidate label (constrained decoding). Each target then sees exactly the prompt it
/// would have alone, and no target sees another's query or answers.
pub struct DialoguePass {
    pub pieces: Vec<Piece>,
    pub pack: Packing,
    /// Per target, in order: its query's branch id and rows.
    pub queries: Vec<(usize, Range<usize>)>,
}

impl DialoguePass {
    /// `utts` is the dialogue from its context start, `targets` ascending indices into it,
    /// `past` the cached positions (0 puts the prompt prefix in the trunk).
    pub fn new(
        p: &Prompter,
        utts: &[Utterance],
        targets: &[usize],
        has_image: &dyn Fn(&Utterance) -> bool,
        past: usize,
        answers: &mut dyn FnMut(&mut DialoguePass, usize, usize) -> Result<()>,
    ) -> Result<Self> {
        let mut d = DialoguePass {
            pieces: Vec::new(),
            pack: Packing::new(past),
            queries: Vec::new(),
        };
        if past == 0 && !p.prefix.is_empty() {
            d.trunk(Encoded {
                pieces: vec![Piece::Tokens(p.prefix.clone())],
                dropped: 0,
            });
        }
        d.trunk(p.open()?);
        let last = *targets
            .last()
            .ok_or_else(|| Error::msg("a dialogue pass without targets"))?;
        let past_labels = p.config.past_labels;
        for (i, u) in utts[..=last].iter().enumerate() {
            let img = has_image(u);
            if !past_labels {
                d.trunk(p.line(u, i, img, None)?);
            }
            if targets.contains(&i) {
                let q = p.query(u, i, img)?;
                let rows = d.pack.branch(q.len());
                let b = d.pack.last_branch().expect("just added");
                d.pieces.extend(q.pieces);
                d.queries.push((b, rows));
                let k = d.queries.len() - 1;
                answers(&mut d, k, b)?;
            }
            if past_labels && i < last {
                d.trunk(p.line(u, i, img, u.label.as_deref())?);
            }
        }
        Ok(d)
    }

    fn trunk(&mut self, enc: Encoded) {
        self.pack.trunk(enc.len());
        self.pieces.extend(enc.pieces);
    }

    /// Adds `tokens` as a branch continuing branch `parent`; returns its rows.
    pub fn child(&mut self, parent: usize, tokens: &[u32]) -> Range<usize> {
        if !tokens.is_empty() {
            self.pieces.push(Piece::Tokens(tokens.to_vec()));
        }
        self.pack.child(parent, tokens.len())
    }

    /// The pieces to embed, in row order.
    pub fn encoded(&self) -> Encoded {
        Encoded {
            pieces: self.pieces.clone(),
            dropped: 0,
        }
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

    /// A child continues its parent's positions and sees the parent; siblings and the
    /// trunk after them see neither.
    #[test]
    fn children_see_their_parent_and_not_their_siblings() {
        let mut p = Packing::new(0);
        p.trunk(2);
        p.branch(2); // query: rows 2, 3
        p.child(0, 2); // answer a: rows 4, 5
        p.child(0, 1); // answer b: row 6
        p.trunk(1); // row 7
        assert_eq!(p.positions(), &[0, 1, 2, 3, 4, 5, 4, 2]);
        let seen = |r: usize| (0..8).filter(|&c| p.sees(r, c)).collect::<Vec<_>>();
        assert_eq!(seen(5), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(seen(6), vec![0, 1, 2, 3, 6]);
        assert_eq!(seen(7), vec![0, 1, 7]);
    }
}
