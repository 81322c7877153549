//! GEMMs over row-major slices (the `gemm` crate) and the linear layers built on them.

use crate::activation::bias_gelu_row;
use crate::util::{parallelism, uninit};
use rayon::prelude::*;

/// One GEMM, `dst = a @ b` (or `dst += a @ b` with `acc`), strides in elements.
/// `a` is `(m, k)`, `b` `(k, n)`, `dst` `(m, n)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// `x @ w^T`: `x` `(n, k)`, `w` `(m, k)`, both row-major; returns `(n, m)`.
pub fn matmul_nt(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k);
    let mut y = uninit(n * m);
    unsafe {
        gemm_raw(
            n,
            m,
            k,
            y.as_mut_ptr(),
            m,
            false,
            x.as_ptr(),
            k,
            1,
            w.as_ptr(),
            1,
            k,
            parallelism(),
        )
    };
    y
}

/// `g @ w`: `g` `(n, m)`, `w` `(m, k)`; returns `(n, k)` (the input gradient of
/// [`matmul_nt`]).
pub fn matmul_nn(g: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    assert!(g.len() >= n * m && w.len() >= m * k);
    let mut y = uninit(n * k);
    unsafe {
        gemm_raw(
            n,
            k,
            m,
            y.as_mut_ptr(),
            k,
            false,
            g.as_ptr(),
            m,
            1,
            w.as_ptr(),
            k,
            1,
            parallelism(),
        )
    };
    y
}

/// A linear layer `x @ wt + bias + residual` (each optional) with the weight stored
/// transposed, `wt` `(k, m)`: the GEMM then reads the weight in place, where a `(m, k)`
/// weight would be repacked on every call (half the speed at 128 rows). The bias and
/// residual are written first and the GEMM accumulates onto them. `x` `(n, k)`, `bias`
/// `(m)`, `residual` `(n, m)`.
pub fn linear(
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    assert!(x.len() >= n * k && wt.len() >= k * m);
    let (mut y, acc) = match (residual, bias) {
        (None, None) => (uninit(n * m), false),
        (Some(r), None) => (r[..n * m].to_vec(), true),
        (r, Some(b)) => {
            let mut y = uninit(n * m);
            y.par_chunks_mut(m)
                .enumerate()
                .with_min_len(8)
                .for_each(|(i, row)| match r {
                    Some(r) => row
                        .iter_mut()
                        .zip(&r[i * m..][..m])
                        .zip(b)
                        .for_each(|((y, r), b)| *y = r + b),
                    None => row.copy_from_slice(b),
                });
            (y, true)
        }
    };
    unsafe {
        gemm_raw(
            n,
            m,
            k,
            y.as_mut_ptr(),
            m,
            acc,
            x.as_ptr(),
            k,
            1,
            wt.as_ptr(),
            m,
            1,
            parallelism(),
        )
    };
    y
}

/// `y += x @ wt + bias` onto a buffer the caller owns (a residual stream updated in
/// place: no copy of it).
pub fn linear_acc(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) {
    assert!(y.len() >= n * m && x.len() >= n * k && wt.len() >= k * m);
    if let Some(b) = bias {
        y.par_chunks_mut(m)
            .with_min_len(8)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
    unsafe {
        gemm_raw(
            n,
            m,
            k,
            y.as_mut_ptr(),
            m,
            true,
            x.as_ptr(),
            k,
            1,
            wt.as_ptr(),
            m,
            1,
            parallelism(),
        )
    };
}

/// `gelu(x @ wt + bias)` (see [`linear`]): the bias joins the GELU's pass instead of
/// costing one of its own.
pub fn linear_gelu(x: &[f32], wt: &[f32], bias: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut y = linear(x, wt, None, None, n, k, m);
    y.par_chunks_mut(m)
        .with_min_len(8)
        .for_each(|row| bias_gelu_row(row, bias));
    y
}
