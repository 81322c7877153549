//! RMSNorm (forward, backward) and LayerNorm.

use crate::util::uninit;
use rayon::prelude::*;

/// RMSNorm of the rows of `x` `(n, dim)`: `y = x r w` with `r = 1 / rms(x)`; returns
/// `y` and each row's `r` (for the backward).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let _span = crate::profile::span(crate::profile::Part::Norm, 0.0);
    let n = x.len() / dim;
    let mut y = uninit(n * dim);
    let mut r = uninit(n);
    y.par_chunks_mut(dim)
        .zip(r.par_iter_mut())
        .zip(x.par_chunks(dim))
        .with_min_len(8)
        .for_each(|((y, r), x)| {
            let ss: f32 = x.iter().map(|v| v * v).sum();
            *r = 1.0 / (ss / dim as f32 + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * *r * w;
            }
        });
    (y, r)
}

/// The backward of [`rms_norm`] plus a residual gradient, if any:
/// `dres + r g - x r^3 mean(g x)` with `g = dy w`.
pub fn rms_norm_grad(
    x: &[f32],
    w: &[f32],
    r: &[f32],
    dy: &[f32],
    dres: Option<&[f32]>,
    dim: usize,
) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Norm, 0.0);
    let n = x.len() / dim;
    let mut dx = uninit(n * dim);
    dx.par_chunks_mut(dim)
        .enumerate()
        .with_min_len(8)
        .for_each(|(i, dx)| {
            let (x, dy) = (&x[i * dim..][..dim], &dy[i * dim..][..dim]);
            let r = r[i];
            let gx: f32 = dy.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
            let c = r * r * r * gx / dim as f32;
            let dres = dres.map(|d| &d[i * dim..][..dim]);
            for k in 0..dim {
                dx[k] = dres.map_or(0.0, |d| d[k]) + r * dy[k] * w[k] - x[k] * c;
            }
        });
    dx
}

/// LayerNorm of the rows of `x` `(n, dim)`: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, dim: usize) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Norm, 0.0);
    let n = x.len() / dim;
    let mut y = uninit(n * dim);
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(8)
        .for_each(|(y, x)| {
            let mean = x.iter().sum::<f32>() / dim as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * r * w + b;
            }
        });
    y
}
