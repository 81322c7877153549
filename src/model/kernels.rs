//! Fused f32 CPU kernels for the LLM's hot paths, on plain slices.
//!
//! candle's CPU backend spends as long around the GEMMs as in them: every matmul output
//! is zero-filled before the GEMM overwrites it, `exp` is scalar libm, and transposes,
//! narrows and mask additions are separate passes over memory. These kernels do each
//! step of a layer in one parallel pass: the q/k/v split with RoPE, a blocked causal
//! attention that skips masked-out key blocks and writes its output already transposed,
//! SwiGLU, and their backwards. `frozen.rs` wraps them as tensor ops (CPU, f32) and
//! keeps candle's ops for every other device and dtype.

use rayon::prelude::*;

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Send) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// An f32 vector the caller fully overwrites (no zero-fill pass).
#[allow(clippy::uninit_vec)]
fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all `n` values
    // before reading any.
    unsafe { v.set_len(n) };
    v
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// One GEMM, `dst = a @ b` (or `dst += a @ b` with `acc`), strides in elements.
/// `a` is `(m, k)`, `b` `(k, n)`, `dst` `(m, n)`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
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

/// `e^x` to about 2 ulp on [-87, 88], 0 below; a branch-free polynomial (Cephes'
/// `expf`) that the compiler vectorises, unlike libm's scalar call.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.0, 88.0);
    // `t` holds round(xc log2 e) in its low mantissa bits: the integer for the exponent
    // comes from the bits (an `as i32` conversion would not vectorise).
    let t = xc * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Compiles `$body` (a closure-free loop over slices) for AVX-512, AVX2+FMA and the
/// baseline, and runs the best one this CPU has.
macro_rules! multiversion {
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

multiversion! {
    /// `row <- exp(row + mask - shift)`, returning the sum of the new row.
    fn exp_shift_sum(row: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp_approx(*v - shift);
                *a += *v;
            }
        }
        let mut sum = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            sum += *v;
        }
        sum + acc.iter().sum::<f32>()
    }
}

multiversion! {
    /// `row += mask`, returning the maximum of the new row.
    fn add_max(row: &mut [f32], mask: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; 16];
        let n = row.len() / 16 * 16;
        for (c, mc) in row[..n].chunks_exact_mut(16).zip(mask[..n].chunks_exact(16)) {
            for i in 0..16 {
                c[i] += mc[i];
                m[i] = m[i].max(c[i]);
            }
        }
        let mut best = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for i in n..row.len() {
            row[i] += mask[i];
            best = best.max(row[i]);
        }
        best
    }
}

multiversion! {
    /// Row maximum.
    fn row_max(row: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; 16];
        let n = row.len() / 16 * 16;
        for c in row[..n].chunks_exact(16) {
            for i in 0..16 {
                m[i] = m[i].max(c[i]);
            }
        }
        let best = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row[n..].iter().fold(best, |a, &b| a.max(b))
    }
}

multiversion! {
    /// `p <- exp(p + mask - lse)` (probabilities recomputed from the saved log-sum-exp),
    /// then `dp <- p * (dp - d)`.
    fn softmax_grad_row(p: &mut [f32], mask: Option<&[f32]>, lse: f32, dp: &mut [f32], d: f32) {
        if let Some(m) = mask {
            for (v, &mv) in p.iter_mut().zip(m) {
                *v += mv;
            }
        }
        for (v, g) in p.iter_mut().zip(dp.iter_mut()) {
            *v = exp_approx(*v - lse);
            *g = *v * (*g - d);
        }
    }
}

multiversion! {
    /// SwiGLU forward on one row: `y = silu(g) * u` with `gu = [g | u]`.
    fn swiglu_row(gu: &[f32], y: &mut [f32]) {
        let i = y.len();
        let (g, u) = gu.split_at(i);
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

multiversion! {
    /// SwiGLU backward on one row: `dgu = [dy u silu'(g) | dy silu(g)]`, with
    /// `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`.
    fn swiglu_grad_row(gu: &[f32], dy: &[f32], dgu: &mut [f32]) {
        let i = dy.len();
        let (g, u) = gu.split_at(i);
        let (dg, du) = dgu.split_at_mut(i);
        for k in 0..i {
            let s = 1.0 / (1.0 + exp_approx(-g[k]));
            du[k] = dy[k] * g[k] * s;
            dg[k] = dy[k] * u[k] * s * (1.0 + g[k] * (1.0 - s));
        }
    }
}

/// `silu(g) * u` for `gu` `(n, 2i)` (gate then up, as the fused projection writes them);
/// returns `(n, i)`.
pub fn swiglu(gu: &[f32], n: usize, i: usize) -> Vec<f32> {
    let mut y = uninit(n * i);
    y.par_chunks_mut(i)
        .zip(gu.par_chunks(2 * i))
        .with_min_len(8)
        .for_each(|(y, gu)| swiglu_row(gu, y));
    y
}

/// The gradient of [`swiglu`] with respect to `gu`, `(n, 2i)`.
pub fn swiglu_grad(gu: &[f32], dy: &[f32], n: usize, i: usize) -> Vec<f32> {
    let mut d = uninit(n * 2 * i);
    d.par_chunks_mut(2 * i)
        .zip(gu.par_chunks(2 * i).zip(dy.par_chunks(i)))
        .with_min_len(8)
        .for_each(|(d, (gu, dy))| swiglu_grad_row(gu, dy, d));
    d
}

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
/// rotated). RoPE in the half-split convention, `cos`/`sin` `(t, d / 2)`; empty tables
/// mean no rotation.
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
            if cos.is_empty() {
                // No rotary embedding (a ViT): only the scale.
                out.iter_mut().zip(src).for_each(|(o, x)| *o = x * sc);
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

/// Query rows per attention task.
const BLOCK: usize = 64;

/// For each block of `BLOCK` query rows, how many leading key columns any of its rows
/// may see (a causal mask hides the rest, so they are never computed).
fn block_extents(mask: Option<&[f32]>, t: usize, s: usize) -> Vec<usize> {
    (0..t.div_ceil(BLOCK))
        .map(|blk| match mask {
            None => s,
            Some(m) => (blk * BLOCK..((blk + 1) * BLOCK).min(t))
                .map(|r| {
                    let row = &m[r * s..][..s];
                    row.iter()
                        .rposition(|&x| x != f32::NEG_INFINITY)
                        .map_or(0, |p| p + 1)
                })
                .max()
                .unwrap_or(0),
        })
        .collect()
}

/// Scores `q_b k^T` `(tb, se)` of a block of `tb` query rows against the first `se` keys
/// (`q_b` `(tb, d)`, `k` `(s, d)`), on the calling thread (the blocks run in parallel).
fn block_scores(qb: &[f32], k: &[f32], tb: usize, se: usize, d: usize) -> Vec<f32> {
    assert!(qb.len() >= tb * d && k.len() >= se * d);
    let mut p = uninit(tb * se);
    unsafe {
        gemm_raw(
            tb,
            se,
            d,
            p.as_mut_ptr(),
            se,
            false,
            qb.as_ptr(),
            d,
            1,
            k.as_ptr(),
            1,
            d,
            gemm::Parallelism::None,
        )
    };
    p
}

/// `softmax(q k^T + mask) v` for grouped queries. `q` `(b, h, t, d)` (already scaled),
/// `k`, `v` `(b, hk, s, d)`, `mask` `(t, s)` additive. Returns the output `(b, t, h d)`
/// (the layout the output projection reads) and each row's log-sum-exp `(b, h, t)`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    hs: Heads,
    t: usize,
    s: usize,
) -> (Vec<f32>, Vec<f32>) {
    let Heads {
        batch: b,
        heads: h,
        kv_heads: hk,
        head_dim: d,
    } = hs;
    let rep = h / hk;
    let ext = block_extents(mask, t, s);
    let nblk = ext.len();
    let mut out = uninit(b * t * h * d);
    let mut lse = uninit(b * h * t);
    let (op, lp) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..b * h * nblk).into_par_iter().for_each(|job| {
        let (bh, blk) = (job / nblk, job % nblk);
        let (bi, hi) = (bh / h, bh % h);
        let kvh = bi * hk + hi / rep;
        let t0 = blk * BLOCK;
        let tb = BLOCK.min(t - t0);
        let se = ext[blk];
        let qb = &q[((bi * h + hi) * t + t0) * d..];
        let (kb, vb) = (&k[kvh * s * d..], &v[kvh * s * d..]);
        let dst = unsafe { op.get().add((bi * t + t0) * h * d + hi * d) };
        let lse_b =
            unsafe { std::slice::from_raw_parts_mut(lp.get().add((bi * h + hi) * t + t0), tb) };
        if se == 0 {
            for (r, l) in lse_b.iter_mut().enumerate() {
                unsafe { std::ptr::write_bytes(dst.add(r * h * d), 0, d) };
                *l = f32::NEG_INFINITY;
            }
            return;
        }
        let mut p = block_scores(qb, kb, tb, se, d);
        let mut inv = [0f32; BLOCK];
        for r in 0..tb {
            let row = &mut p[r * se..][..se];
            let max = match mask {
                Some(m) => add_max(row, &m[(t0 + r) * s..][..se]),
                None => row_max(row),
            };
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                inv[r] = 0.0;
                lse_b[r] = f32::NEG_INFINITY;
                continue;
            }
            let sum = exp_shift_sum(row, max);
            inv[r] = 1.0 / sum;
            lse_b[r] = max + sum.ln();
        }
        // Output rows (tb, d) = p @ v, written with the row stride of (b, t, h d).
        unsafe {
            gemm_raw(
                tb,
                d,
                se,
                dst,
                h * d,
                false,
                p.as_ptr(),
                se,
                1,
                vb.as_ptr(),
                d,
                1,
                gemm::Parallelism::None,
            );
            for (r, &iv) in inv.iter().enumerate().take(tb) {
                let row = std::slice::from_raw_parts_mut(dst.add(r * h * d), d);
                row.iter_mut().for_each(|x| *x *= iv);
            }
        }
    });
    (out, lse)
}

/// The backward of [`attention`] (FlashAttention-2 style: probabilities recomputed per
/// block from the log-sum-exp). `out`, `dout` `(b, t, h d)`. Returns `dq` `(b, h, t, d)`,
/// `dk`, `dv` `(b, hk, s, d)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_grad(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    hs: Heads,
    t: usize,
    s: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Heads {
        batch: b,
        heads: h,
        kv_heads: hk,
        head_dim: d,
    } = hs;
    let rep = h / hk;
    let ext = block_extents(mask, t, s);
    let nblk = ext.len();
    let hd = h * d;
    let mut dq = uninit(b * h * t * d);
    let dqp = SendPtr(dq.as_mut_ptr());
    // Each job returns its partial dk, dv (se, d) for its key head; summed below.
    let parts: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..b * h * nblk)
        .into_par_iter()
        .map(|job| {
            let (bh, blk) = (job / nblk, job % nblk);
            let (bi, hi) = (bh / h, bh % h);
            let kvh = bi * hk + hi / rep;
            let t0 = blk * BLOCK;
            let tb = BLOCK.min(t - t0);
            let se = ext[blk];
            let qb = &q[((bi * h + hi) * t + t0) * d..];
            let (kb, vb) = (&k[kvh * s * d..], &v[kvh * s * d..]);
            let row0 = (bi * t + t0) * hd + hi * d;
            let dqb = unsafe { dqp.get().add(((bi * h + hi) * t + t0) * d) };
            if se == 0 {
                unsafe { std::ptr::write_bytes(dqb, 0, tb * d) };
                return (kvh, 0, Vec::new(), Vec::new());
            }
            // P (tb, se) recomputed; dP = dO V^T; dS = P (dP - rowsum(dO O)).
            let mut p = block_scores(qb, kb, tb, se, d);
            let mut dp = uninit(tb * se);
            unsafe {
                gemm_raw(
                    tb,
                    se,
                    d,
                    dp.as_mut_ptr(),
                    se,
                    false,
                    dout.as_ptr().add(row0),
                    hd,
                    1,
                    vb.as_ptr(),
                    1,
                    d,
                    gemm::Parallelism::None,
                );
            }
            let mut dv = uninit(se * d);
            for r in 0..tb {
                let o = &out[row0 + r * hd..][..d];
                let g = &dout[row0 + r * hd..][..d];
                let dsum: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                let l = lse[(bi * h + hi) * t + t0 + r];
                let (pr, dpr) = (&mut p[r * se..][..se], &mut dp[r * se..][..se]);
                if l == f32::NEG_INFINITY {
                    pr.fill(0.0);
                    dpr.fill(0.0);
                    continue;
                }
                // dv needs P itself; keep it by computing P first, dS into dp.
                softmax_grad_row(pr, mask.map(|m| &m[(t0 + r) * s..][..se]), l, dpr, dsum);
            }
            let mut dk = uninit(se * d);
            unsafe {
                // dV (se, d) = P^T dO.
                gemm_raw(
                    se,
                    d,
                    tb,
                    dv.as_mut_ptr(),
                    d,
                    false,
                    p.as_ptr(),
                    1,
                    se,
                    dout.as_ptr().add(row0),
                    hd,
                    1,
                    gemm::Parallelism::None,
                );
                // dQ (tb, d) = dS K.
                gemm_raw(
                    tb,
                    d,
                    se,
                    dqb,
                    d,
                    false,
                    dp.as_ptr(),
                    se,
                    1,
                    kb.as_ptr(),
                    d,
                    1,
                    gemm::Parallelism::None,
                );
                // dK (se, d) = dS^T Q.
                gemm_raw(
                    se,
                    d,
                    tb,
                    dk.as_mut_ptr(),
                    d,
                    false,
                    dp.as_ptr(),
                    1,
                    se,
                    qb.as_ptr(),
                    d,
                    1,
                    gemm::Parallelism::None,
                );
            }
            (kvh, se, dk, dv)
        })
        .collect();
    let mut dk = vec![0f32; b * hk * s * d];
    let mut dv = vec![0f32; b * hk * s * d];
    dk.par_chunks_mut(s * d)
        .zip(dv.par_chunks_mut(s * d))
        .enumerate()
        .for_each(|(kvh, (dk, dv))| {
            for (_, se, pk, pv) in parts.iter().filter(|p| p.0 == kvh) {
                for (a, b) in dk[..se * d].iter_mut().zip(pk) {
                    *a += b;
                }
                for (a, b) in dv[..se * d].iter_mut().zip(pv) {
                    *a += b;
                }
            }
        });
    (dq, dk, dv)
}

/// RMSNorm of the rows of `x` `(n, dim)`: `y = x r w` with `r = 1 / rms(x)`; returns
/// `y` and each row's `r` (for the backward).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize) -> (Vec<f32>, Vec<f32>) {
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

/// `erf(x)` to about 2e-7 (Abramowitz & Stegun 7.1.26 with a vectorisable `exp`).
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_approx(-a * a);
    y.copysign(x)
}

multiversion! {
    /// Exact-erf GELU in place: `x Phi(x)`.
    fn gelu_erf_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_approx(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// `x <- gelu(x + bias)` on one row.
    fn bias_gelu_row(x: &mut [f32], bias: &[f32]) {
        for (v, b) in x.iter_mut().zip(bias) {
            let y = *v + b;
            *v = 0.5 * y * (1.0 + erf_approx(y * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// Exact-erf GELU of every value, in place, in parallel.
pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(gelu_erf_slice);
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

/// LayerNorm of the rows of `x` `(n, dim)`: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, dim: usize) -> Vec<f32> {
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

/// A frozen decoder layer's weights (row-major, as Hugging Face stores them).
pub struct LayerWeights<'a> {
    pub input_norm: &'a [f32],
    /// The four projections transposed, `(in, out)`, for the forward (see [`linear`]);
    /// the backward reads the `(out, in)` originals, which suit it.
    pub qkv_t: &'a [f32],
    pub o_t: &'a [f32],
    pub gate_up_t: &'a [f32],
    pub down_t: &'a [f32],
    /// q, k, v stacked: `((h + 2 hk) d, hidden)`.
    pub qkv: &'a [f32],
    pub o: &'a [f32],
    pub post_norm: &'a [f32],
    /// gate and up stacked: `(2 inter, hidden)`.
    pub gate_up: &'a [f32],
    pub down: &'a [f32],
    pub eps: f32,
    pub hidden: usize,
    pub inter: usize,
}

/// Where a layer's new positions sit: shapes, RoPE tables, cache and mask.
pub struct LayerInput<'a> {
    pub heads: Heads,
    pub t: usize,
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub scale: f32,
    /// Cached keys and values, `(b, hk, p, d)` each.
    pub past: Option<(&'a [f32], &'a [f32])>,
    pub p: usize,
    /// Additive `(t, p + t)`.
    pub mask: Option<&'a [f32]>,
}

/// A layer's new hidden states, keys and values `(b, hk, p + t, d)`, and (when asked)
/// what its backward needs.
pub type LayerOutput<S> = (Vec<f32>, Vec<f32>, Vec<f32>, Option<S>);

/// What a layer's backward needs besides the weights and the keys and values.
pub struct LayerSaved {
    /// Per adapter on q/k/v (none without adapters).
    lora: Vec<LoraSaved>,
    r1: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    h1: Vec<f32>,
    r2: Vec<f32>,
    gu: Vec<f32>,
}

/// The layer from its q/k/v projection `qkv` `(b t, (h + 2 hk) d)` on (so adapters on q,
/// k, v can be added outside): attention, output projection, residual, MLP, residual.
fn layer_after_qkv(
    h: &[f32],
    qkv: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    save: bool,
) -> LayerOutput<LayerSaved> {
    let hs = a.heads;
    let (dim, n) = (w.hidden, h.len() / w.hidden);
    let hd = hs.heads * hs.head_dim;
    let (q, k, v) = split_rope(qkv, hs, a.t, a.cos, a.sin, a.scale, a.past, a.p);
    let (att, lse) = attention(&q, &k, &v, a.mask, hs, a.t, a.p + a.t);
    let h1 = linear(&att, w.o_t, None, Some(h), n, hd, dim);
    let (n2, r2) = rms_norm(&h1, w.post_norm, w.eps, dim);
    let gu = linear(&n2, w.gate_up_t, None, None, n, dim, 2 * w.inter);
    drop(n2);
    let m = swiglu(&gu, n, w.inter);
    let out = linear(&m, w.down_t, None, Some(&h1), n, w.inter, dim);
    let saved = save.then_some(LayerSaved {
        lora: Vec::new(),
        r1: Vec::new(),
        q,
        att,
        lse,
        h1,
        r2,
        gu,
    });
    (out, k, v, saved)
}

/// The backward of [`layer_after_qkv`]: the gradients of `qkv` and of `h` (through the
/// residual).
fn layer_after_qkv_backward(
    s: &LayerSaved,
    k: &[f32],
    v: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let hs = a.heads;
    let (dim, n) = (w.hidden, dout.len() / w.hidden);
    let hd = hs.heads * hs.head_dim;
    let dm = matmul_nn(dout, w.down, n, dim, w.inter);
    let dgu = swiglu_grad(&s.gu, &dm, n, w.inter);
    drop(dm);
    let dn2 = matmul_nn(&dgu, w.gate_up, n, 2 * w.inter, dim);
    drop(dgu);
    let dh1 = rms_norm_grad(&s.h1, w.post_norm, &s.r2, &dn2, Some(dout), dim);
    drop(dn2);
    let datt = matmul_nn(&dh1, w.o, n, dim, hd);
    let s_len = a.p + a.t;
    let (dq, dk, dv) = attention_grad(&s.q, k, v, a.mask, &s.att, &datt, &s.lse, hs, a.t, s_len);
    drop(datt);
    let dqkv = split_rope_grad(&dq, &dk, &dv, hs, a.t, a.cos, a.sin, a.scale, a.p);
    (dqkv, dh1)
}

/// A LoRA adapter on columns `col .. col + width` of the fused q/k/v projection:
/// `scale * (x * mask) A^T B^T`, `a` `(r, in)`, `b` `(width, r)`.
pub struct LoraPart<'a> {
    pub col: usize,
    pub width: usize,
    pub r: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub scale: f32,
    /// Inverted-dropout multipliers `(n, in)`.
    pub mask: Option<&'a [f32]>,
}

/// What the backward of [`layer_forward`] needs for one adapter.
pub struct LoraSaved {
    /// The adapter's input `x * mask` `(n, in)`.
    xd: Vec<f32>,
    /// `xd A^T` `(n, r)`.
    u: Vec<f32>,
}

/// One frozen Llama decoder layer on `h` `(b t, hidden)`, with LoRA adapters on q, k, v
/// (`parts`, possibly none: each adds its low-rank product to its columns of the q/k/v
/// projection). Returns the new hidden states, the keys and values `(b, hk, p + t, d)`
/// for the cache, and (with `save`) what the backward needs.
pub fn layer_forward(
    h: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    parts: &[LoraPart],
    save: bool,
) -> LayerOutput<LayerSaved> {
    let (dim, n) = (w.hidden, h.len() / w.hidden);
    let wd = a.heads.width();
    let (n1, r1) = rms_norm(h, w.input_norm, w.eps, dim);
    let mut qkv = linear(&n1, w.qkv_t, None, None, n, dim, wd);
    let mut lsaved = Vec::new();
    for p in parts {
        let xd = match p.mask {
            Some(m) => n1.iter().zip(m).map(|(x, m)| x * m).collect(),
            None => n1.clone(),
        };
        let u = matmul_nt(&xd, p.a, n, dim, p.r);
        // qkv[:, col..col + width] += scale * u B^T.
        let ub: Vec<f32> = u.iter().map(|v| v * p.scale).collect();
        unsafe {
            gemm_raw(
                n,
                p.width,
                p.r,
                qkv.as_mut_ptr().add(p.col),
                wd,
                true,
                ub.as_ptr(),
                p.r,
                1,
                p.b.as_ptr(),
                1,
                p.r,
                parallelism(),
            )
        };
        if save {
            lsaved.push(LoraSaved { xd, u });
        }
    }
    drop(n1);
    let (out, k, v, saved) = layer_after_qkv(h, &qkv, w, a, save);
    let saved = saved.map(|s| LayerSaved {
        lora: lsaved,
        r1,
        ..s
    });
    (out, k, v, saved)
}

/// The backward of [`layer_forward`]: the gradient of the layer's input `h` and, per
/// adapter, the gradients of `A` `(r, in)` and `B` `(width, r)` (the frozen weights get
/// none).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn layer_backward(
    s: &LayerSaved,
    h: &[f32],
    k: &[f32],
    v: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    parts: &[LoraPart],
    dout: &[f32],
) -> (Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>) {
    let (dim, n) = (w.hidden, dout.len() / w.hidden);
    let wd = a.heads.width();
    let (dqkv, dh1) = layer_after_qkv_backward(s, k, v, w, a, dout);
    let mut dn1 = matmul_nn(&dqkv, w.qkv, n, wd, dim);
    let mut grads = Vec::new();
    for (p, sv) in parts.iter().zip(&s.lora) {
        let g = unsafe { dqkv.as_ptr().add(p.col) };
        let mut db = uninit(p.width * p.r);
        let mut gb = uninit(n * p.r);
        let mut da = uninit(p.r * dim);
        let mut dxd = uninit(n * dim);
        unsafe {
            // dB = scale g^T u: (width, r).
            gemm_raw(
                p.width,
                p.r,
                n,
                db.as_mut_ptr(),
                p.r,
                false,
                g,
                1,
                wd,
                sv.u.as_ptr(),
                p.r,
                1,
                parallelism(),
            );
            // gB = g B: (n, r).
            gemm_raw(
                n,
                p.r,
                p.width,
                gb.as_mut_ptr(),
                p.r,
                false,
                g,
                wd,
                1,
                p.b.as_ptr(),
                p.r,
                1,
                parallelism(),
            );
            // dA = scale gB^T xd: (r, in).
            gemm_raw(
                p.r,
                dim,
                n,
                da.as_mut_ptr(),
                dim,
                false,
                gb.as_ptr(),
                1,
                p.r,
                sv.xd.as_ptr(),
                dim,
                1,
                parallelism(),
            );
            // d xd = scale gB A: (n, in).
            gemm_raw(
                n,
                dim,
                p.r,
                dxd.as_mut_ptr(),
                dim,
                false,
                gb.as_ptr(),
                p.r,
                1,
                p.a.as_ptr(),
                dim,
                1,
                parallelism(),
            );
        }
        db.iter_mut()
            .chain(da.iter_mut())
            .for_each(|x| *x *= p.scale);
        match p.mask {
            Some(m) => dn1
                .iter_mut()
                .zip(&dxd)
                .zip(m)
                .for_each(|((d, x), m)| *d += p.scale * x * m),
            None => dn1
                .iter_mut()
                .zip(&dxd)
                .for_each(|(d, x)| *d += p.scale * x),
        }
        grads.push((da, db));
    }
    drop(dqkv);
    (
        rms_norm_grad(h, w.input_norm, &s.r1, &dn1, Some(&dh1), dim),
        grads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..880_000 {
            let x = i as f32 * 1e-4;
            let (a, e) = (exp_approx(x), x.exp());
            worst = worst.max(((a - e) / e).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        let mut row = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let sum = exp_shift_sum(&mut row, 2.0);
        let want: f32 = [-1f32, 0.0, -1.5].iter().map(|x| x.exp()).sum();
        assert!((sum - want).abs() < 1e-6 && row[2] == 0.0);
    }

    /// GELU against the exact form in f64 (std has no erf: its Maclaurin series for
    /// |x| <= 3, the continued fraction of erfc beyond), to 2e-6 absolute.
    #[test]
    fn gelu_matches_the_exact_form() {
        fn erf64(x: f64) -> f64 {
            // Maclaurin series; enough terms for |x| <= 3.
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut worst = 0f64;
        let xs: Vec<f32> = (-6000..6000).map(|i| i as f32 * 1e-3).collect();
        let mut y = xs.clone();
        gelu_erf(&mut y);
        for (&x, &g) in xs.iter().zip(&y) {
            let x64 = x as f64;
            let want = if x64.abs() <= 3.0 {
                0.5 * x64 * (1.0 + erf64(x64 / std::f64::consts::SQRT_2))
            } else if x64 > 0.0 {
                x64 * (1.0 - 0.5 * libm_like_erfc(x64 / std::f64::consts::SQRT_2))
            } else {
                x64 * 0.5 * libm_like_erfc(-x64 / std::f64::consts::SQRT_2)
            };
            worst = worst.max((g as f64 - want).abs());
        }
        assert!(worst < 2e-6, "max abs error {worst}");
    }

    /// erfc for x > 2 by its continued fraction (enough for the test's tail).
    fn libm_like_erfc(x: f64) -> f64 {
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = (n as f64 / 2.0) / (x + f);
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }
}
