//! The q/k/v split of the fused projection with half-split RoPE, and its backward.

use crate::util::{uninit, SendPtr};
use rayon::prelude::*;

/// Shapes of a grouped-query attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Columns of the fused q/k/v projection.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Splits the fused projection `qkv` `(b * t, (h + 2 hk) d)` into `q` `(b, h, t, d)`
/// (rotated and multiplied by `scale`) and the keys and values `(b, hk, p + t, d)`:
/// the `p` cached past rows of `past` (`(b, hk, p, d)` each) then the new rows (keys
/// rotated). RoPE in the half-split convention, `cos`/`sin` `(t, d / 2)`.
#[allow(clippy::too_many_arguments)]
pub fn split_rope(
    qkv: &[f32],
    hs: Heads,
    t: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
    past: Option<(&[f32], &[f32])>,
    p: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let _span = crate::profile::span(crate::profile::Part::Rope, 0.0);
    let Heads {
        batch: b,
        heads: h,
        kv_heads: hk,
        head_dim: d,
    } = hs;
    let w = hs.width();
    let half = d / 2;
    let s = p + t;
    let mut q = uninit(b * h * t * d);
    let mut k = uninit(b * hk * s * d);
    let mut v = uninit(b * hk * s * d);
    let (qp, kp, vp) = (
        SendPtr(q.as_mut_ptr()),
        SendPtr(k.as_mut_ptr()),
        SendPtr(v.as_mut_ptr()),
    );
    // One job per (batch, head) of q, k and v; each owns its rows of the output.
    (0..b * (h + 2 * hk)).into_par_iter().for_each(|job| {
        let (bi, j) = (job / (h + 2 * hk), job % (h + 2 * hk));
        let (dst, rot, sc) = if j < h {
            (unsafe { qp.get().add((bi * h + j) * t * d) }, true, scale)
        } else if j < h + hk {
            let base = (bi * hk + j - h) * s * d;
            if let Some((pk, _)) = past {
                let src = &pk[(bi * hk + j - h) * p * d..][..p * d];
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), kp.get().add(base), p * d) };
            }
            (unsafe { kp.get().add(base + p * d) }, true, 1.0)
        } else {
            let base = (bi * hk + j - h - hk) * s * d;
            if let Some((_, pv)) = past {
                let src = &pv[(bi * hk + j - h - hk) * p * d..][..p * d];
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), vp.get().add(base), p * d) };
            }
            (unsafe { vp.get().add(base + p * d) }, false, 1.0)
        };
        // SAFETY: this job owns the `t * d` values at `dst`.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, t * d) };
        for ti in 0..t {
            let src = &qkv[(bi * t + ti) * w + j * d..][..d];
            let out = &mut dst[ti * d..][..d];
            if !rot {
                out.copy_from_slice(src);
                continue;
            }
            let (c, sn) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
            for m in 0..half {
                let (x1, x2) = (src[m], src[m + half]);
                out[m] = (x1 * c[m] - x2 * sn[m]) * sc;
                out[m + half] = (x1 * sn[m] + x2 * c[m]) * sc;
            }
        }
    });
    (q, k, v)
}

/// The backward of [`split_rope`]: `dq` `(b, h, t, d)` and the new rows (after the first
/// `p`) of `dk`, `dv` `(b, hk, p + t, d)` back to `(b * t, (h + 2 hk) d)`.
#[allow(clippy::too_many_arguments)]
pub fn split_rope_grad(
    dq: &[f32],
    dk: &[f32],
    dv: &[f32],
    hs: Heads,
    t: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
    p: usize,
) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Rope, 0.0);
    let Heads {
        batch: b,
        heads: h,
        kv_heads: hk,
        head_dim: d,
    } = hs;
    let w = hs.width();
    let half = d / 2;
    let s = p + t;
    let mut out = uninit(b * t * w);
    out.par_chunks_mut(w)
        .enumerate()
        .with_min_len(8)
        .for_each(|(row, o)| {
            let (bi, ti) = (row / t, row % t);
            let (c, sn) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
            for j in 0..h + 2 * hk {
                let (src, sc) = if j < h {
                    (&dq[((bi * h + j) * t + ti) * d..][..d], scale)
                } else if j < h + hk {
                    (&dk[((bi * hk + j - h) * s + p + ti) * d..][..d], 1.0)
                } else {
                    let src = &dv[((bi * hk + j - h - hk) * s + p + ti) * d..][..d];
                    o[j * d..][..d].copy_from_slice(src);
                    continue;
                };
                let dst = &mut o[j * d..][..d];
                for m in 0..half {
                    let (g1, g2) = (src[m] * sc, src[m + half] * sc);
                    dst[m] = g1 * c[m] + g2 * sn[m];
                    dst[m + half] = g2 * c[m] - g1 * sn[m];
                }
            }
        });
    out
}
