//! SwiGLU and exact-erf GELU, forward and backward.

use crate::math::{erf_approx, exp_approx};
use crate::util::uninit;
use rayon::prelude::*;

multiversion! {
    /// SwiGLU forward on one row: `y = silu(g) * u` with `gu = [g | u]`.
    pub(crate) fn swiglu_row(gu: &[f32], y: &mut [f32]) {
        let i = y.len();
        let (g, u) = gu.split_at(i);
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp_approx::<FMA>(-g)) * u;
        }
    }
}

multiversion! {
    /// SwiGLU backward on one row: `dgu = [dy u silu'(g) | dy silu(g)]`, with
    /// `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`.
    pub(crate) fn swiglu_grad_row(gu: &[f32], dy: &[f32], dgu: &mut [f32]) {
        let i = dy.len();
        let (g, u) = gu.split_at(i);
        let (dg, du) = dgu.split_at_mut(i);
        for k in 0..i {
            let s = 1.0 / (1.0 + exp_approx::<FMA>(-g[k]));
            du[k] = dy[k] * g[k] * s;
            dg[k] = dy[k] * u[k] * s * (1.0 + g[k] * (1.0 - s));
        }
    }
}

/// `silu(g) * u` for `gu` `(n, 2i)` (gate then up, as the fused projection writes them);
/// returns `(n, i)`.
pub fn swiglu(gu: &[f32], n: usize, i: usize) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Activation, 0.0);
    let mut y = uninit(n * i);
    y.par_chunks_mut(i)
        .zip(gu.par_chunks(2 * i))
        .with_min_len(8)
        .for_each(|(y, gu)| swiglu_row(gu, y));
    y
}

/// The gradient of [`swiglu`] with respect to `gu`, `(n, 2i)`.
pub fn swiglu_grad(gu: &[f32], dy: &[f32], n: usize, i: usize) -> Vec<f32> {
    let _span = crate::profile::span(crate::profile::Part::Activation, 0.0);
    let mut d = uninit(n * 2 * i);
    d.par_chunks_mut(2 * i)
        .zip(gu.par_chunks(2 * i).zip(dy.par_chunks(i)))
        .with_min_len(8)
        .for_each(|(d, (gu, dy))| swiglu_grad_row(gu, dy, d));
    d
}

multiversion! {
    /// Exact-erf GELU in place: `x Phi(x)`.
    pub(crate) fn gelu_erf_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_approx::<FMA>(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// `x <- gelu(x + bias)` on one row.
    pub(crate) fn bias_gelu_row(x: &mut [f32], bias: &[f32]) {
        for (v, b) in x.iter_mut().zip(bias) {
            let y = *v + b;
            *v = 0.5 * y * (1.0 + erf_approx::<FMA>(y * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// `gelu(x + bias)` in place on every row of `x` `(n, m)`, in parallel (the epilogue of
/// a product with bias and GELU).
pub fn bias_gelu_rows(x: &mut [f32], bias: &[f32], m: usize) {
    assert_eq!(bias.len(), m, "bias length");
    if m == 0 {
        return;
    }
    let _span = crate::profile::span(crate::profile::Part::Activation, 0.0);
    x.par_chunks_mut(m)
        .with_min_len(8)
        .for_each(|row| bias_gelu_row(row, bias));
}

/// Exact-erf GELU of every value, in place, in parallel.
pub fn gelu_erf(x: &mut [f32]) {
    let _span = crate::profile::span(crate::profile::Part::Activation, 0.0);
    x.par_chunks_mut(4096).for_each(gelu_erf_slice);
}
