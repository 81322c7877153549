//! GEMMs over row-major slices (the `gemm` crate) and the linear layers built on them.

use crate::blas::{self, Engine, PackedB};
use crate::profile::{self, Part};
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
    // Products inside parallel tasks (attention blocks, on rayon's workers) stay on the
    // crate unless the choice sends every product to a library; top-level ones go where
    // the choice sends their shape.
    let engine = if rayon::current_thread_index().is_some() {
        blas::engine_in_task(m, k, a_cs != 1, b_cs != 1)
    } else {
        blas::engine_for(m, k, a_cs != 1, b_cs != 1)
    };
    let _span = profile::span(Part::Gemm, 2.0 * (m * n * k) as f64);
    gemm_on(
        engine, m, n, k, dst, dst_rs, acc, a, a_rs, a_cs, b, b_rs, b_cs, par,
    )
}

/// [`gemm_raw`] on a given engine.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_on(
    engine: Engine,
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
    if let Engine::Blas(lib) = engine {
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t,
            _ => 1,
        };
        if blas::blas_gemm(
            lib, m, n, k, dst, dst_rs, acc, a, a_rs, a_cs, b, b_rs, b_cs, threads,
        ) {
            return;
        }
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
/// transposed, `wt` `(k, m)`: the crate then reads the weight in place, where a `(m, k)`
/// weight would be repacked on every call (half the speed at 128 rows). Given the
/// `(m, k)` original `w` too, the product reads that instead where the process's GEMM
/// choice says it runs faster (MKL at few rows). The bias and residual are written
/// first and the GEMM accumulates onto them. `x` `(n, k)`, `bias` `(m)`, `residual`
/// `(n, m)`.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    wt: &[f32],
    w: Option<&[f32]>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    let w = w.filter(|_| blas::forward_reads_original(n, k));
    linear_reading(x, wt, w, bias, residual, n, k, m)
}

/// [`linear`] reading the original `w` when given, else the copy `wt`.
#[allow(clippy::too_many_arguments)]
fn linear_reading(
    x: &[f32],
    wt: &[f32],
    w: Option<&[f32]>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    assert!(x.len() >= n * k && wt.len() >= k * m);
    assert!(w.is_none_or(|w| w.len() >= m * k));
    let copy = profile::span(Part::Copy, 0.0);
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
    drop(copy);
    // The weight as `b` `(k, m)`: the copy row-major, or the original read transposed.
    let b = match w {
        Some(w) => (w, 1, k),
        None => (wt, m, 1),
    };
    plain_product(x, b, &mut y, acc, n, k, m);
    y
}

/// `dst (+)= x @ b` over all threads, `x` `(n, k)`, `b` `(k, m)` read with strides
/// `(b_rs, b_cs)`: a weight's copy `(m, 1)`, or its `(m, k)` original `(1, k)`.
fn plain_product(
    x: &[f32],
    (b, b_rs, b_cs): (&[f32], usize, usize),
    dst: &mut [f32],
    acc: bool,
    n: usize,
    k: usize,
    m: usize,
) {
    assert!(x.len() >= n * k && b.len() >= k * m && dst.len() >= n * m);
    // SAFETY: the lengths are checked above; the strides describe those slices.
    unsafe {
        gemm_raw(
            n,
            m,
            k,
            dst.as_mut_ptr(),
            m,
            acc,
            x.as_ptr(),
            k,
            1,
            b.as_ptr(),
            b_rs,
            b_cs,
            parallelism(),
        )
    }
}

/// `x @ wt[:, cols] + bias[cols]`: the product with a range of the weight's output
/// columns only (`wt` `(k, m)` row-major, read in place), `(n, cols.len())`. Lets a ViT's
/// last layer, which carries only its CLS rows on, make queries for those rows alone
/// while it makes keys and values for all.
pub fn linear_cols(
    x: &[f32],
    wt: &[f32],
    cols: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    assert!(
        cols.start <= cols.end && cols.end <= m,
        "columns {cols:?} of {m}"
    );
    assert!(x.len() >= n * k && wt.len() >= k * m);
    assert!(bias.is_none_or(|b| b.len() >= m));
    let w = cols.len();
    let mut y = match bias {
        Some(b) => bias_rows(&b[cols.clone()], n),
        None => uninit(n * w),
    };
    if n == 0 || w == 0 {
        return y;
    }
    if k == 0 {
        // An empty product: the bias alone (or zeros). Returned here: `wt` may then be
        // empty, and no pointer may be taken past its end.
        if bias.is_none() {
            y.fill(0.0);
        }
        return y;
    }
    // SAFETY: the lengths are checked above; `wt`'s columns `cols` are `(k, w)` with row
    // stride `m`, and the last one read is `(k - 1) m + cols.end - 1 < k m`.
    unsafe {
        gemm_raw(
            n,
            w,
            k,
            y.as_mut_ptr(),
            w,
            bias.is_some(),
            x.as_ptr(),
            k,
            1,
            wt.as_ptr().add(cols.start),
            m,
            1,
            parallelism(),
        )
    };
    y
}

/// A frozen linear layer's weight `(k, m)` as a product reads it: the `(in, out)` copy
/// row-major, or packed once by the library (see [`PackedB`]), where given with the
/// `(m, k)` original beside it, which products over few rows read instead: a packed
/// operand splits only by rows, and a few rows would leave threads idle.
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    T(&'a [f32]),
    Packed {
        packed: &'a PackedB,
        w: Option<&'a [f32]>,
    },
}

/// `dst (+)= x @ w` for `x` `(n, k)`, `dst` `(n, m)`, over all rayon threads. A packed
/// weight is skipped for its original when there are fewer rows than threads (one-token
/// decoding): split by rows, some threads would get none. (Reading the original up to 8
/// rows per thread, which covered the ViT's CLS-only last layer, cost ViT-S about 3% on
/// 2 cores.)
fn product(w: Weight, x: &[f32], dst: &mut [f32], acc: bool, n: usize, k: usize, m: usize) {
    assert!(x.len() >= n * k && dst.len() >= n * m);
    let threads = blas::threads();
    // The weight as `b` `(k, m)` for a plain product: the copy row-major, or the
    // original read transposed.
    let plain = match w {
        Weight::T(wt) => Some((wt, m, 1)),
        Weight::Packed { packed, w } => {
            assert_eq!(packed.shape(), (k, m), "packed weight shape");
            assert!(w.is_none_or(|w| w.len() >= m * k));
            w.filter(|_| n < threads).map(|w| (w, 1, k))
        }
    };
    match (plain, w) {
        (Some(b), _) => plain_product(x, b, dst, acc, n, k, m),
        (None, Weight::Packed { packed, .. }) => {
            if n == 0 {
                return;
            }
            let _span = profile::span(Part::Gemm, 2.0 * (n * m * k) as f64);
            assert!(n <= i32::MAX as usize);
            // SAFETY: as above; `PackedB::new` checked that k and m fit `int`.
            unsafe { packed.gemm(n, x.as_ptr(), k, dst.as_mut_ptr(), m, acc, threads) }
        }
        (None, Weight::T(_)) => unreachable!("a copy is always plain"),
    }
}

/// A frozen linear layer `x @ w^T + residual`: [`linear`] on the copy `wt` (which may
/// read the `(m, k)` original `w` instead), or the product on the packed weight.
#[allow(clippy::too_many_arguments)]
pub fn linear_frozen(
    x: &[f32],
    wt: Weight,
    w: &[f32],
    residual: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    match wt {
        Weight::T(wt) => linear(x, wt, Some(w), None, residual, n, k, m),
        Weight::Packed { .. } => {
            let (mut y, acc) = match residual {
                Some(r) => {
                    let _copy = profile::span(Part::Copy, 0.0);
                    (r[..n * m].to_vec(), true)
                }
                None => (uninit(n * m), false),
            };
            product(wt, x, &mut y, acc, n, k, m);
            y
        }
    }
}

/// `n` rows, each a copy of `b`: the start of a product that adds a bias.
fn bias_rows(b: &[f32], n: usize) -> Vec<f32> {
    let m = b.len();
    let mut y = uninit(n * m);
    let _copy = profile::span(Part::Copy, 0.0);
    y.par_chunks_mut(m.max(1))
        .with_min_len(8)
        .for_each(|row| row.copy_from_slice(b));
    y
}

/// `x @ w + bias` (see [`Weight`]); `x` `(n, k)`, `bias` `(m)`.
pub fn linear_w(
    x: &[f32],
    w: Weight,
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    let mut y = match bias {
        Some(b) => {
            assert!(b.len() >= m, "bias shorter than {m}");
            bias_rows(&b[..m], n)
        }
        None => uninit(n * m),
    };
    product(w, x, &mut y, bias.is_some(), n, k, m);
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
    linear_acc_w(y, x, Weight::T(wt), bias, n, k, m)
}

/// [`linear_acc`] with either form of the weight.
pub fn linear_acc_w(
    y: &mut [f32],
    x: &[f32],
    w: Weight,
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
) {
    assert!(y.len() >= n * m);
    if let Some(b) = bias {
        assert!(b.len() >= m, "bias shorter than {m}");
        let _copy = profile::span(Part::Copy, 0.0);
        y[..n * m]
            .par_chunks_mut(m.max(1))
            .with_min_len(8)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
    product(w, x, y, true, n, k, m);
}

/// `gelu(x @ wt + bias)` (see [`linear`]): the bias joins the GELU's pass instead of
/// costing one of its own.
pub fn linear_gelu(x: &[f32], wt: &[f32], bias: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    linear_gelu_w(x, Weight::T(wt), bias, n, k, m)
}

/// [`linear_gelu`] with either form of the weight.
pub fn linear_gelu_w(x: &[f32], w: Weight, bias: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut y = uninit(n * m);
    product(w, x, &mut y, false, n, k, m);
    crate::activation::bias_gelu_rows(&mut y, bias, m);
    y
}

/// `dst (+)= a @ b` on `engine` over all rayon threads: `a` `(m, k)` (stored `(k, m)`
/// when `a_t`), `b` `(k, n)` (stored `(n, k)` when `b_t`), `dst` `(m, n)`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    engine: Engine,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    dst: &mut [f32],
    acc: bool,
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && dst.len() >= m * n);
    let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
    // SAFETY: the lengths are checked above; the strides describe those slices.
    unsafe {
        gemm_on(
            engine,
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n,
            acc,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
            parallelism(),
        )
    }
}

/// Seconds of one `(m, k) @ (k, n)` product on `engine` over all rayon threads, the best
/// of `reps` after an untimed warm-up; `a_t`/`b_t` store that operand transposed (the backward's
/// layouts). For benchmarks and the start-up calibration.
pub fn time_gemm(
    engine: Engine,
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    reps: usize,
) -> f64 {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-2)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i % 89) as f32 - 44.0) * 1e-2)
        .collect();
    let mut c = vec![0f32; m * n];
    let mut best = f64::INFINITY;
    matmul_on(engine, &a, a_t, &b, b_t, &mut c, false, m, n, k);
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        matmul_on(engine, &a, a_t, &b, b_t, &mut c, false, m, n, k);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways a linear layer reads its weight (the `(in, out)` copy, or the `(out, in)`
    /// original as stored) give `x w^T + bias + residual` in f64 to 1e-5 of its scale.
    #[test]
    fn linear_reads_either_layout() {
        let (n, k, m) = (37, 70, 45);
        let val = |i: usize, salt: usize| (((i * 7 + salt * 13) % 101) as f32 - 50.0) * 0.01;
        let x: Vec<f32> = (0..n * k).map(|i| val(i, 1)).collect();
        let w: Vec<f32> = (0..m * k).map(|i| val(i, 2)).collect();
        let wt: Vec<f32> = (0..k * m).map(|i| w[(i % m) * k + i / m]).collect();
        let bias: Vec<f32> = (0..m).map(|i| val(i, 3)).collect();
        let res: Vec<f32> = (0..n * m).map(|i| val(i, 4)).collect();
        for original in [false, true] {
            for (b, r) in [(None, None), (Some(&bias[..]), Some(&res[..]))] {
                let got = linear_reading(&x, &wt, original.then_some(&w[..]), b, r, n, k, m);
                for i in 0..n {
                    for j in 0..m {
                        let mut s =
                            b.map_or(0.0, |b| b[j] as f64) + r.map_or(0.0, |r| r[i * m + j] as f64);
                        for p in 0..k {
                            s += x[i * k + p] as f64 * w[j * k + p] as f64;
                        }
                        let e = (got[i * m + j] as f64 - s).abs();
                        assert!(e < 1e-5, "original {original}, ({i}, {j}): {e}");
                    }
                }
            }
        }
    }

    /// A range of the weight's columns, with and without a bias, against `x wt[:, cols]
    /// + bias[cols]` in f64; empty ranges and an empty inner size give the bias alone.
    #[test]
    fn linear_cols_is_the_product_with_those_columns() {
        let (n, k, m) = (23, 41, 30);
        let val = |i: usize, salt: usize| (((i * 11 + salt * 17) % 97) as f32 - 48.0) * 0.02;
        let x: Vec<f32> = (0..n * k).map(|i| val(i, 1)).collect();
        let wt: Vec<f32> = (0..k * m).map(|i| val(i, 2)).collect();
        let bias: Vec<f32> = (0..m).map(|i| val(i, 3)).collect();
        for cols in [0..m, 0..10, 10..30, 7..8, 5..5] {
            for b in [None, Some(&bias[..])] {
                let got = linear_cols(&x, &wt, cols.clone(), b, n, k, m);
                let w = cols.len();
                assert_eq!(got.len(), n * w);
                for i in 0..n {
                    for (jj, j) in cols.clone().enumerate() {
                        let mut s = b.map_or(0.0, |b| b[j] as f64);
                        for p in 0..k {
                            s += x[i * k + p] as f64 * wt[p * m + j] as f64;
                        }
                        let e = (got[i * w + jj] as f64 - s).abs();
                        assert!(e < 1e-5, "cols {cols:?}, ({i}, {j}): {e}");
                    }
                }
            }
        }
        let got = linear_cols(&[], &[], 1..3, Some(&bias[..3]), 2, 0, 3);
        assert_eq!(got, [bias[1], bias[2], bias[1], bias[2]]);
    }
}
