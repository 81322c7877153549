//! RMSNorm (forward, backward) and LayerNorm.

use crate::math::{lane_dot, lane_fold, lane_sum};
use crate::util::uninit;
use rayon::prelude::*;

multiversion! {
    /// One row of [`rms_norm`]: writes `y`, returns `r`.
    fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
        let r = 1.0 / (lane_dot(x, x) / x.len() as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
        r
    }
}

multiversion! {
    /// One row of [`rms_norm_grad`].
    fn rms_norm_grad_row(x: &[f32], w: &[f32], r: f32, dy: &[f32], dres: Option<&[f32]>, dx: &mut [f32]) {
        let dim = x.len();
        let (w, dy) = (&w[..dim], &dy[..dim]);
        let gx = lane_fold([dy, w, x], |[d, w, x]| d * w * x);
        let c = r * r * r * gx / dim as f32;
        match dres {
            Some(d) => {
                let d = &d[..dim];
                for k in 0..dim {
                    dx[k] = d[k] + r * dy[k] * w[k] - x[k] * c;
                }
            }
            None => {
                for k in 0..dim {
                    dx[k] = r * dy[k] * w[k] - x[k] * c;
                }
            }
        }
    }
}

multiversion! {
    /// One row of [`layer_norm_shifted`] (two passes over the row for the variance, which
    /// stays accurate when the mean is large).
    fn layer_norm_row(x: &[f32], shift: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let dim = x.len();
        match shift {
            None => {
                let mean = lane_sum(x) / dim as f32;
                let var = lane_fold([x], |[v]| (v - mean) * (v - mean)) / dim as f32;
                let r = 1.0 / (var + eps).sqrt();
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * r * w + b;
                }
            }
            Some(s) => {
                let s = &s[..dim];
                let mean = lane_fold([x, s], |[v, s]| v + s) / dim as f32;
                let var = lane_fold([x, s], |[v, s]| (v + s - mean) * (v + s - mean)) / dim as f32;
                let r = 1.0 / (var + eps).sqrt();
                for ((((y, &x), &s), &w), &b) in y.iter_mut().zip(x).zip(s).zip(w).zip(b) {
                    *y = (x + s - mean) * r * w + b;
                }
            }
        }
    }
}

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
        .for_each(|((y, r), x)| *r = rms_norm_row(x, w, eps, y));
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
            let dres = dres.map(|d| &d[i * dim..][..dim]);
            rms_norm_grad_row(x, w, r[i], dy, dres, dx);
        });
    dx
}

/// LayerNorm of the rows of `x` `(n, dim)`: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, dim: usize) -> Vec<f32> {
    layer_norm_shifted(x, None, w, b, eps, dim)
}

/// [`layer_norm`] of `x + shift` (`shift` `(dim)` added to every row), without writing
/// that sum: a residual stream can carry its biases aside until a norm reads it.
pub fn layer_norm_shifted(
    x: &[f32],
    shift: Option<&[f32]>,
    w: &[f32],
    b: &[f32],
    eps: f32,
    dim: usize,
) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Norm, 0.0);
    assert!(w.len() >= dim && b.len() >= dim && shift.is_none_or(|s| s.len() >= dim));
    let n = x.len() / dim;
    let mut y = uninit(n * dim);
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(8)
        .for_each(|(y, x)| layer_norm_row(x, shift, w, b, eps, y));
    y
}
