//! Blocked causal attention over grouped-query heads (forward with log-sum-exp, and
//! backward), skipping key blocks a causal mask hides.

use crate::gemm::gemm_raw;
use crate::math::{add_into, exp_approx, lane_dot};
use crate::rope::Heads;
use crate::util::{uninit, SendPtr};
use rayon::prelude::*;

multiversion! {
    /// `row <- exp((row - shift) scale)`, returning the sum of the new row.
    pub(crate) fn exp_shift_sum(row: &mut [f32], shift: f32, scale: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp_approx::<FMA>((*v - shift) * scale);
                *a += *v;
            }
        }
        let mut sum = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_approx::<FMA>((*v - shift) * scale);
            sum += *v;
        }
        sum + acc.iter().sum::<f32>()
    }
}

multiversion! {
    /// `row += mask`, returning the maximum of the new row.
    pub(crate) fn add_max(row: &mut [f32], mask: &[f32]) -> f32 {
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
    pub(crate) fn row_max(row: &[f32]) -> f32 {
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
    pub(crate) fn softmax_grad_row(p: &mut [f32], mask: Option<&[f32]>, lse: f32, dp: &mut [f32], d: f32) {
        if let Some(m) = mask {
            for (v, &mv) in p.iter_mut().zip(m) {
                *v += mv;
            }
        }
        for (v, g) in p.iter_mut().zip(dp.iter_mut()) {
            *v = exp_approx::<FMA>(*v - lse);
            *g = *v * (*g - d);
        }
    }
}

multiversion! {
    /// `sum(a * b)`, in vectors.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        lane_dot(a, b)
    }
}

/// Query rows per attention task.
pub(crate) const BLOCK: usize = 64;

/// For each block of `BLOCK` query rows, how many leading key columns any of its rows
/// may see (a causal mask hides the rest, so they are never computed).
pub(crate) fn block_extents(mask: Option<&[f32]>, t: usize, s: usize) -> Vec<usize> {
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
/// (`q_b` `(tb, d)` with row stride `q_rs`, `k` `(s, d)` with row stride `k_rs`), on the
/// calling thread (the blocks run in parallel).
pub(crate) fn block_scores(
    (qb, q_rs): (&[f32], usize),
    (k, k_rs): (&[f32], usize),
    tb: usize,
    se: usize,
    d: usize,
) -> Vec<f32> {
    assert!(qb.len() >= (tb - 1) * q_rs + d && k.len() >= (se - 1) * k_rs + d);
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
            q_rs,
            1,
            k.as_ptr(),
            1,
            k_rs,
            gemm::Parallelism::None,
        )
    };
    p
}

/// Where one attention operand's rows lie in its buffer: row `r` of head `hh` (a key or
/// value head for `k`, `v`) in batch `bi` starts at `off + bi batch + hh head + r row`.
/// Lets attention read q, k and v straight out of a fused q/k/v product.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub off: usize,
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl Rows {
    /// The split layout `(b, heads, t, d)`.
    pub fn split(heads: usize, t: usize, d: usize) -> Self {
        Rows {
            off: 0,
            batch: heads * t * d,
            head: t * d,
            row: d,
        }
    }

    /// Operand `which` (0 q, 1 k, 2 v) of a fused product `(b, t, (h + 2 hk) d)` (`h`
    /// query heads, `hk` key and value heads): the layout one q/k/v GEMM writes.
    pub fn fused(which: usize, h: usize, hk: usize, t: usize, d: usize) -> Self {
        let w = (h + 2 * hk) * d;
        Rows {
            off: [0, h, h + hk][which] * d,
            batch: t * w,
            head: d,
            row: w,
        }
    }

    fn start(&self, bi: usize, hh: usize, r: usize) -> usize {
        self.off + bi * self.batch + hh * self.head + r * self.row
    }

    /// One past the last value read for `batch` batches of `heads` heads of `rows` rows of
    /// `d` values (each count at least 1); `None` on overflow.
    fn end(&self, batch: usize, heads: usize, rows: usize, d: usize) -> Option<usize> {
        let last = |n: usize, stride: usize| (n - 1).checked_mul(stride);
        last(batch, self.batch)?
            .checked_add(last(heads, self.head)?)?
            .checked_add(last(rows, self.row)?)?
            .checked_add(self.off)?
            .checked_add(d)
    }
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
    let (qr, kr) = (
        Rows::split(hs.heads, t, hs.head_dim),
        Rows::split(hs.kv_heads, s, hs.head_dim),
    );
    attention_rows((q, qr), (k, kr), (v, kr), mask, hs, t, s, 1.0)
}

/// [`attention`] on operands laid out as [`Rows`] says (a fused q/k/v product needs no
/// split into heads), with the scores scaled by `scale` (1 when `q` already is). A mask
/// needs `scale == 1` (it would be scaled too). The log-sum-exp is of the scaled scores;
/// [`attention_grad`] recomputes unscaled ones, so it pairs only with `scale == 1`.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    (q, qr): (&[f32], Rows),
    (k, kr): (&[f32], Rows),
    (v, vr): (&[f32], Rows),
    mask: Option<&[f32]>,
    hs: Heads,
    t: usize,
    s: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let _span = crate::profile::span(crate::profile::Part::Attention, 0.0);
    assert!(
        mask.is_none() || scale == 1.0,
        "a scaled attention takes no mask"
    );
    assert!(scale > 0.0 && scale.is_finite(), "attention scale {scale}");
    let Heads {
        batch: b,
        heads: h,
        kv_heads: hk,
        head_dim: d,
    } = hs;
    assert!(hk > 0 && h % hk == 0, "{h} query heads over {hk} key heads");
    if b > 0 && h > 0 && t > 0 && s > 0 {
        let fits = |x: &[f32], r: Rows, heads, rows| {
            r.end(b, heads, rows, d).is_some_and(|e| e <= x.len())
        };
        assert!(fits(q, qr, h, t), "queries out of bounds");
        assert!(fits(k, kr, hk, s), "keys out of bounds");
        assert!(fits(v, vr, hk, s), "values out of bounds");
    }
    if let Some(m) = mask {
        assert!(m.len() >= t * s, "mask shorter than ({t}, {s})");
    }
    let rep = h / hk;
    let mut out = uninit(b * t * h * d);
    let mut lse = uninit(b * h * t);
    let (op, lp) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    #[cfg(target_arch = "x86_64")]
    if mask.is_none()
        && t >= crate::tiled::R
        && s > 0
        && b * h > 0
        && kr.row < i32::MAX as usize / 16
        && crate::tiled::available(d)
    {
        // Whole heads per task while there are enough to keep every thread busy, else
        // chunks of rows (each task packs its head's keys and values again).
        let chunks = (4 * rayon::current_num_threads()).div_ceil(b * h).min(t);
        let rows = t.div_ceil(chunks).next_multiple_of(crate::tiled::R);
        let nch = t.div_ceil(rows);
        (0..b * h * nch).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(kv, sc), job| {
                let (bh, ch) = (job / nch, job % nch);
                let (bi, hi) = (bh / h, bh % h);
                let t0 = ch * rows;
                let n = rows.min(t - t0);
                // SAFETY: the operands' bounds were checked above, `available` checked
                // the CPU, and each task writes its own rows of `out` and `lse`.
                unsafe {
                    crate::tiled::pack_head(
                        (k.as_ptr().add(kr.start(bi, hi / rep, 0)), kr.row),
                        (v.as_ptr().add(vr.start(bi, hi / rep, 0)), vr.row),
                        s,
                        kv,
                    );
                    let lse_b = lp.get().add((bi * h + hi) * t + t0);
                    crate::tiled::head_rows(
                        (q.as_ptr().add(qr.start(bi, hi, t0)), qr.row),
                        kv,
                        s,
                        n,
                        scale,
                        (op.get().add((bi * t + t0) * h * d + hi * d), h * d),
                        std::slice::from_raw_parts_mut(lse_b, n),
                        sc,
                    );
                }
            },
        );
        return (out, lse);
    }
    let ext = block_extents(mask, t, s);
    let nblk = ext.len();
    (0..b * h * nblk).into_par_iter().for_each(|job| {
        let (bh, blk) = (job / nblk, job % nblk);
        let (bi, hi) = (bh / h, bh % h);
        let t0 = blk * BLOCK;
        let tb = BLOCK.min(t - t0);
        let se = ext[blk];
        let qb = &q[qr.start(bi, hi, t0)..];
        let (kb, vb) = (
            &k[kr.start(bi, hi / rep, 0)..],
            &v[vr.start(bi, hi / rep, 0)..],
        );
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
        let mut p = block_scores((qb, qr.row), (kb, kr.row), tb, se, d);
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
            let sum = exp_shift_sum(row, max, scale);
            inv[r] = 1.0 / sum;
            lse_b[r] = max * scale + sum.ln();
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
                vr.row,
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
    let _span = crate::profile::span(crate::profile::Part::Attention, 0.0);
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
            let mut p = block_scores((qb, d), (kb, d), tb, se, d);
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
                let dsum = dot(o, g);
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
                add_into(&mut dk[..se * d], pk);
                add_into(&mut dv[..se * d], pv);
            }
        });
    (dq, dk, dv)
}
