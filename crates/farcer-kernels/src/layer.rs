//! A whole frozen Llama decoder layer in one forward and one input-only backward, with
//! optional LoRA adapters on any of its projections.

use crate::activation::{swiglu, swiglu_grad};
use crate::attention::{attention, attention_grad};
use crate::gemm::gemm_raw;
use crate::gemm::{linear_frozen, matmul_nn, Weight};
use crate::math::add_into;
use crate::norm::{rms_norm, rms_norm_grad};
use crate::rope::{split_rope, split_rope_grad, Heads};
use crate::util::{parallelism, uninit};
use rayon::prelude::*;

/// A frozen decoder layer's weights (row-major, as Hugging Face stores them).
pub struct LayerWeights<'a> {
    pub input_norm: &'a [f32],
    /// The four projections for the forward: transposed `(in, out)` (see [`linear`]) or
    /// packed by the library; the backward reads the `(out, in)` originals, which suit
    /// it.
    pub qkv_t: Weight<'a>,
    pub o_t: Weight<'a>,
    pub gate_up_t: Weight<'a>,
    pub down_t: Weight<'a>,
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
    /// The first new row whose input carries a gradient anyone needs (a projected image
    /// in a projection-only step): rows before it cannot depend on it when no earlier row
    /// sees a later one, so the backward skips them and returns zeros there. 0: every row.
    /// Ignored (every row computed) with adapters, whose weights take gradient from every
    /// row, with a batch above 1, when the mask lets an earlier row see a later one, and
    /// with `keep`. The caller must also pass 0 when any layer below has adapters: the
    /// zeros would reach them.
    pub grad_from: usize,
    /// Only these new rows go on past the keys and values (the last layer, when only
    /// their logits are wanted): every row still gives its key and value, but the query,
    /// output projection and MLP run on these rows alone, and the layer's output has
    /// only them, in this order. Needs batch 1, a single segment and no adapters.
    pub keep: Option<&'a [usize]>,
}

/// Rows `rows` of `x` (rows of width `w`) in `blocks` consecutive blocks of `t` rows:
/// some query rows of every head, or some positions of every image.
pub fn gather_rows(x: &[f32], blocks: usize, t: usize, rows: &[usize], w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks * rows.len() * w);
    for b in 0..blocks {
        for &r in rows {
            out.extend_from_slice(&x[(b * t + r) * w..][..w]);
        }
    }
    out
}

/// A ViT's token rows `(b, 1 + np, d)`: each image's `cls` row, then its `np` rows of
/// `patches` `(b np, d)`, each plus its row of the position embeddings `pos`
/// `(1 + np, d)`.
pub fn vit_tokens(
    patches: &[f32],
    cls: &[f32],
    pos: &[f32],
    b: usize,
    np: usize,
    d: usize,
) -> Vec<f32> {
    let t = np + 1;
    assert!(patches.len() >= b * np * d && cls.len() >= d && pos.len() >= t * d);
    let _copy = crate::profile::span(crate::profile::Part::Copy, 0.0);
    let mut x = uninit(b * t * d);
    x.par_chunks_mut(d.max(1))
        .enumerate()
        .with_min_len(16)
        .for_each(|(i, row)| {
            let (bi, r) = (i / t, i % t);
            let src = if r == 0 {
                &cls[..d]
            } else {
                &patches[(bi * np + r - 1) * d..][..d]
            };
            for ((y, s), p) in row.iter_mut().zip(src).zip(&pos[r * d..][..d]) {
                *y = s + p;
            }
        });
    x
}

/// The adjoint of [`gather_rows`]: `x`'s rows added into rows `rows` of zeros.
fn scatter_rows(x: &[f32], blocks: usize, t: usize, rows: &[usize], w: usize) -> Vec<f32> {
    let mut out = vec![0f32; blocks * t * w];
    for b in 0..blocks {
        for (i, &r) in rows.iter().enumerate() {
            let src = &x[(b * rows.len() + i) * w..][..w];
            out[(b * t + r) * w..][..w]
                .iter_mut()
                .zip(src)
                .for_each(|(o, s)| *o += s);
        }
    }
    out
}

/// The rows the backward of a layer may skip: `a.grad_from` when skipping them cannot
/// change the gradient of any later row or of any adapter, else 0. A layer that kept
/// some rows skips none: every row has a key and value, so every row gets a gradient
/// through them.
fn skippable_rows(a: &LayerInput, parts: &[LoraPart]) -> usize {
    let g = a.grad_from;
    if g == 0 || g >= a.t || !parts.is_empty() || a.heads.batch != 1 || a.keep.is_some() {
        return 0;
    }
    let s = a.p + a.t;
    let sealed = match a.mask {
        // Without a mask every row sees every row.
        None => false,
        Some(m) => (0..g).all(|r| {
            m[r * s + a.p + g..(r + 1) * s]
                .iter()
                .all(|&x| x == f32::NEG_INFINITY)
        }),
    };
    if sealed {
        g
    } else {
        0
    }
}

/// A layer's new hidden states (the kept rows only, with [`LayerInput::keep`]), keys and
/// values `(b, hk, p + t, d)`, and (when asked) what its backward needs.
pub type LayerOutput<S> = (Vec<f32>, Vec<f32>, Vec<f32>, Option<S>);

/// What a layer's backward needs besides the weights and the keys and values.
pub struct LayerSaved {
    /// Per adapter, in the order given (none without adapters).
    lora: Vec<LoraSaved>,
    r1: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    h1: Vec<f32>,
    r2: Vec<f32>,
    gu: Vec<f32>,
}

/// Keys and values `(b, hk, p + t, d)` of one segment, for its cache.
pub type SegmentKv = (Vec<f32>, Vec<f32>);

/// The queries `(1, h, keep, d)` of the kept rows and their rows of the mask.
fn kept_queries(q: &[f32], a: &LayerInput, keep: &[usize]) -> (Vec<f32>, Option<Vec<f32>>) {
    let hs = a.heads;
    let q = gather_rows(q, hs.heads, a.t, keep, hs.head_dim);
    let mask = a.mask.map(|m| gather_rows(m, 1, a.t, keep, a.p + a.t));
    (q, mask)
}

/// The layer from its q/k/v projection `qkv` `(rows, (h + 2 hk) d)` on (so adapters on q,
/// k, v can be added outside): attention, output projection, residual, MLP, residual, with
/// the adapters of `parts` that sit on o, gate/up and down added to their products (their
/// saved inputs go to `lsaved`, by index into `parts`). The rows are the segments' new
/// positions, one segment after another; each attends to its own cache and mask only,
/// while every product runs once over all rows. `save` needs a single segment.
fn layer_after_qkv(
    h: &[f32],
    qkv: &[f32],
    w: &LayerWeights,
    segs: &[LayerInput],
    parts: &[LoraPart],
    lsaved: &mut [Option<LoraSaved>],
    save: bool,
) -> (Vec<f32>, Vec<SegmentKv>, Option<LayerSaved>) {
    assert!(
        !save || segs.len() == 1,
        "a backward needs a single segment"
    );
    let (dim, n) = (w.hidden, h.len() / w.hidden);
    let hs0 = segs[0].heads;
    let (wd, hd) = (hs0.width(), hs0.heads * hs0.head_dim);
    let at = |site: Site| {
        parts
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.site == site)
    };
    let mut kvs = Vec::with_capacity(segs.len());
    let mut atts = Vec::with_capacity(segs.len());
    let mut qlse = None;
    let mut off = 0;
    for a in segs {
        let hs = a.heads;
        let rows = hs.batch * a.t;
        let mine = &qkv[off * wd..(off + rows) * wd];
        off += rows;
        let (q, k, v) = split_rope(mine, hs, a.t, a.cos, a.sin, a.scale, a.past, a.p);
        let (q, (att, lse)) = match a.keep {
            None => {
                let out = attention(&q, &k, &v, a.mask, hs, a.t, a.p + a.t);
                (q, out)
            }
            Some(keep) => {
                let (q, mask) = kept_queries(&q, a, keep);
                let out = attention(&q, &k, &v, mask.as_deref(), hs, keep.len(), a.p + a.t);
                (q, out)
            }
        };
        kvs.push((k, v));
        atts.push(att);
        if save {
            qlse = Some((q, lse));
        }
    }
    assert_eq!(off, n, "the segments cover every row");
    assert!(
        segs.iter().all(|a| a.keep.is_none())
            || (segs.len() == 1 && hs0.batch == 1 && parts.is_empty()),
        "keeping rows needs one segment, batch 1 and no adapters"
    );
    // From here on, the rows that go on.
    let kept;
    let (h, n) = match segs[0].keep {
        None => (h, n),
        Some(keep) => {
            kept = gather_rows(h, 1, n, keep, dim);
            (&kept[..], keep.len())
        }
    };
    let att = if atts.len() == 1 {
        atts.pop().expect("one segment")
    } else {
        atts.concat()
    };
    let mut h1 = linear_frozen(&att, w.o_t, w.o, Some(h), n, hd, dim);
    for (i, p) in at(Site::O) {
        lsaved[i] = Some(lora_forward(&att, n, hd, p, &mut h1, dim));
    }
    let (n2, r2) = rms_norm(&h1, w.post_norm, w.eps, dim);
    let mut gu = linear_frozen(&n2, w.gate_up_t, w.gate_up, None, n, dim, 2 * w.inter);
    for (i, p) in at(Site::GateUp) {
        lsaved[i] = Some(lora_forward(&n2, n, dim, p, &mut gu, 2 * w.inter));
    }
    drop(n2);
    let m = swiglu(&gu, n, w.inter);
    let mut out = linear_frozen(&m, w.down_t, w.down, Some(&h1), n, w.inter, dim);
    for (i, p) in at(Site::Down) {
        lsaved[i] = Some(lora_forward(&m, n, w.inter, p, &mut out, dim));
    }
    let saved = qlse.map(|(q, lse)| LayerSaved {
        lora: Vec::new(),
        r1: Vec::new(),
        q,
        att,
        lse,
        h1,
        r2,
        gu,
    });
    (out, kvs, saved)
}

/// Per adapter, `(dA, dB)` once its site's backward has run.
type LoraGrads = Vec<Option<(Vec<f32>, Vec<f32>)>>;

/// The backward of [`layer_after_qkv`]: the gradients of `qkv` and of `h` (through the
/// residual), and those of the adapters on o, gate/up and down (by index into `parts`),
/// for rows `g ..` only (see [`skippable_rows`]; `g` is 0 with adapters).
#[allow(clippy::too_many_arguments)]
fn layer_after_qkv_backward(
    s: &LayerSaved,
    k: &[f32],
    v: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    parts: &[LoraPart],
    dout: &[f32],
    g: usize,
) -> (Vec<f32>, Vec<f32>, LoraGrads) {
    let hs = a.heads;
    let dim = w.hidden;
    let dout = &dout[g * dim..];
    let n = dout.len() / dim;
    let hd = hs.heads * hs.head_dim;
    assert!(g == 0 || (parts.is_empty() && hs.batch == 1));
    let at = |site: Site| {
        parts
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.site == site)
    };
    let mut grads: LoraGrads = vec![None; parts.len()];
    let mut dm = matmul_nn(dout, w.down, n, dim, w.inter);
    for (i, p) in at(Site::Down) {
        grads[i] = Some(lora_backward(dout, dim, n, w.inter, p, &s.lora[i], &mut dm));
    }
    let dgu = swiglu_grad(&s.gu[g * 2 * w.inter..], &dm, n, w.inter);
    drop(dm);
    let mut dn2 = matmul_nn(&dgu, w.gate_up, n, 2 * w.inter, dim);
    for (i, p) in at(Site::GateUp) {
        grads[i] = Some(lora_backward(
            &dgu,
            2 * w.inter,
            n,
            dim,
            p,
            &s.lora[i],
            &mut dn2,
        ));
    }
    drop(dgu);
    let dh1 = rms_norm_grad(
        &s.h1[g * dim..],
        w.post_norm,
        &s.r2[g..],
        &dn2,
        Some(dout),
        dim,
    );
    drop(dn2);
    let mut datt = matmul_nn(&dh1, w.o, n, dim, hd);
    for (i, p) in at(Site::O) {
        grads[i] = Some(lora_backward(&dh1, dim, n, hd, p, &s.lora[i], &mut datt));
    }
    let s_len = a.p + a.t;
    if let Some(keep) = a.keep {
        // The kept rows' queries (saved gathered) and mask rows; their query gradients
        // go back to their rows, the others' being zero.
        let mask = a.mask.map(|m| gather_rows(m, 1, a.t, keep, s_len));
        let (dq, dk, dv) = attention_grad(
            &s.q,
            k,
            v,
            mask.as_deref(),
            &s.att,
            &datt,
            &s.lse,
            hs,
            keep.len(),
            s_len,
        );
        drop(datt);
        let dq = scatter_rows(&dq, hs.heads, a.t, keep, hs.head_dim);
        let dqkv = split_rope_grad(&dq, &dk, &dv, hs, a.t, a.cos, a.sin, a.scale, a.p + g);
        return (dqkv, dh1, grads);
    }
    // Rows `g ..` are queries `g ..` of every head (batch 1): as if rows `.. g` were cached.
    let (q, lse, att, t) = if g == 0 {
        (
            std::borrow::Cow::Borrowed(&s.q[..]),
            std::borrow::Cow::Borrowed(&s.lse[..]),
            &s.att[..],
            a.t,
        )
    } else {
        let later: Vec<usize> = (g..a.t).collect();
        (
            gather_rows(&s.q, hs.heads, a.t, &later, hs.head_dim).into(),
            gather_rows(&s.lse, hs.heads, a.t, &later, 1).into(),
            &s.att[g * hd..],
            a.t - g,
        )
    };
    let mask = a.mask.map(|m| &m[g * s_len..]);
    let (dq, dk, dv) = attention_grad(&q, k, v, mask, att, &datt, &lse, hs, t, s_len);
    drop(datt);
    let half = hs.head_dim / 2;
    let (cos, sin) = if a.cos.is_empty() {
        (a.cos, a.sin)
    } else {
        (&a.cos[g * half..], &a.sin[g * half..])
    };
    let dqkv = split_rope_grad(&dq, &dk, &dv, hs, t, cos, sin, a.scale, a.p + g);
    (dqkv, dh1, grads)
}

/// Which of a layer's products an adapter adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The fused q/k/v projection (input: the normed hidden states).
    Qkv,
    /// The output projection (input: the attention's output).
    O,
    /// The fused gate/up projection (input: the normed hidden states after attention).
    GateUp,
    /// The down projection (input: the SwiGLU output).
    Down,
}

/// A LoRA adapter on columns `col .. col + width` of the product at `site`:
/// `scale * (x * mask) A^T B^T`, `a` `(r, in)`, `b` `(width, r)`.
pub struct LoraPart<'a> {
    pub site: Site,
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
    /// `scale xd A^T` `(n, r)`.
    us: Vec<f32>,
}

/// Rows per task in an adapter's passes: a block's input, mask and low-rank products stay
/// in cache between the element-wise work and the products around it.
const LORA_ROWS: usize = 32;

multiversion! {
    /// `out = x * m`.
    fn mul_into(out: &mut [f32], x: &[f32], m: &[f32]) {
        for ((o, x), m) in out.iter_mut().zip(x).zip(m) {
            *o = x * m;
        }
    }
}

multiversion! {
    /// `acc += x * m`.
    fn add_mul(acc: &mut [f32], x: &[f32], m: &[f32]) {
        for ((a, x), m) in acc.iter_mut().zip(x).zip(m) {
            *a += x * m;
        }
    }
}

/// Adds adapter `p`'s product on `x` `(n, input)` to its columns of `y` (row stride `ldy`):
/// each block of rows is masked, multiplied by `A^T` and then by `B^T` in one task.
fn lora_forward(
    x: &[f32],
    n: usize,
    input: usize,
    p: &LoraPart,
    y: &mut [f32],
    ldy: usize,
) -> LoraSaved {
    let _span = crate::profile::span(crate::profile::Part::Adapter, 0.0);
    let r = p.r;
    assert!(r > 0 && x.len() >= n * input && p.mask.is_none_or(|m| m.len() >= n * input));
    assert!(p.a.len() >= r * input && p.b.len() >= p.width * r && p.col + p.width <= ldy);
    let mut xd = uninit(n * input);
    let mut us = uninit(n * r);
    xd.par_chunks_mut(LORA_ROWS * input)
        .zip(us.par_chunks_mut(LORA_ROWS * r))
        .zip(y[..n * ldy].par_chunks_mut(LORA_ROWS * ldy))
        .enumerate()
        .for_each(|(bi, ((xd, us), y))| {
            let (r0, rows) = (bi * LORA_ROWS, us.len() / r);
            let x = &x[r0 * input..][..rows * input];
            match p.mask {
                Some(m) => mul_into(xd, x, &m[r0 * input..][..rows * input]),
                None => xd.copy_from_slice(x),
            }
            // SAFETY: the blocks hold `rows` rows of their widths; `a` and `b` were
            // checked above, and `y`'s columns `col .. col + width` lie within `ldy`.
            unsafe {
                // us = scale xd A^T, then y[:, col .. col + width] += us B^T.
                gemm_raw(
                    rows,
                    r,
                    input,
                    us.as_mut_ptr(),
                    r,
                    false,
                    xd.as_ptr(),
                    input,
                    1,
                    p.a.as_ptr(),
                    1,
                    input,
                    gemm::Parallelism::None,
                );
                us.iter_mut().for_each(|v| *v *= p.scale);
                gemm_raw(
                    rows,
                    p.width,
                    r,
                    y.as_mut_ptr().add(p.col),
                    ldy,
                    true,
                    us.as_ptr(),
                    r,
                    1,
                    p.b.as_ptr(),
                    1,
                    r,
                    gemm::Parallelism::None,
                );
            }
        });
    LoraSaved { xd, us }
}

/// The backward of [`lora_forward`] from the gradient `g` of `y` (row stride `ldg`): adds
/// the gradient of `x` to `dx` (per block of rows, in one task each) and returns
/// `(dA, dB)`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    g: &[f32],
    ldg: usize,
    n: usize,
    input: usize,
    p: &LoraPart,
    sv: &LoraSaved,
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let _span = crate::profile::span(crate::profile::Part::Adapter, 0.0);
    let r = p.r;
    assert!(r > 0 && p.a.len() >= r * input && p.b.len() >= p.width * r);
    assert!(p.col + p.width <= ldg && p.mask.is_none_or(|m| m.len() >= n * input));
    assert!(n == 0 || g.len() >= (n - 1) * ldg + p.col + p.width);
    assert!(dx.len() >= n * input && sv.xd.len() >= n * input && sv.us.len() >= n * r);
    // The adapter's columns of `g`: row `i` starts at `gc[i * ldg]`.
    let gc = if n == 0 { &[][..] } else { &g[p.col..] };
    // gs = scale g B (n, r): the scale once here serves dA and dx.
    let mut gs = uninit(n * r);
    gs.par_chunks_mut(LORA_ROWS * r)
        .zip(dx[..n * input].par_chunks_mut(LORA_ROWS * input))
        .enumerate()
        .for_each(|(bi, (gs, dx))| {
            let (r0, rows) = (bi * LORA_ROWS, gs.len() / r);
            let mut dxd = uninit(rows * input);
            // SAFETY: rows `r0 .. r0 + rows` of `gc`, `a` and `b` were checked above; the
            // rest are the block's own buffers.
            unsafe {
                gemm_raw(
                    rows,
                    r,
                    p.width,
                    gs.as_mut_ptr(),
                    r,
                    false,
                    gc[r0 * ldg..].as_ptr(),
                    ldg,
                    1,
                    p.b.as_ptr(),
                    r,
                    1,
                    gemm::Parallelism::None,
                );
                gs.iter_mut().for_each(|v| *v *= p.scale);
                // d xd = gs A (rows, input).
                gemm_raw(
                    rows,
                    input,
                    r,
                    dxd.as_mut_ptr(),
                    input,
                    false,
                    gs.as_ptr(),
                    r,
                    1,
                    p.a.as_ptr(),
                    input,
                    1,
                    gemm::Parallelism::None,
                );
            }
            match p.mask {
                Some(m) => add_mul(dx, &dxd, &m[r0 * input..][..rows * input]),
                None => add_into(dx, &dxd),
            }
        });
    let mut db = uninit(p.width * r);
    let mut da = uninit(r * input);
    // SAFETY: `gc`'s rows, `us` and `xd` were checked above; the rest are this function's
    // buffers.
    unsafe {
        // dB = g^T us (width, r).
        gemm_raw(
            p.width,
            r,
            n,
            db.as_mut_ptr(),
            r,
            false,
            gc.as_ptr(),
            1,
            ldg,
            sv.us.as_ptr(),
            r,
            1,
            parallelism(),
        );
        // dA = gs^T xd (r, in).
        gemm_raw(
            r,
            input,
            n,
            da.as_mut_ptr(),
            input,
            false,
            gs.as_ptr(),
            1,
            r,
            sv.xd.as_ptr(),
            input,
            1,
            parallelism(),
        );
    }
    (da, db)
}

/// One frozen Llama decoder layer on `h` `(b t, hidden)`, with LoRA adapters (`parts`,
/// possibly none: each adds its low-rank product to its columns of the q/k/v, o, gate/up
/// or down product). Returns the new hidden states (only the rows of
/// [`LayerInput::keep`], in its order, when set), the keys and values `(b, hk, p + t, d)`
/// for the cache, and (with `save`) what the backward needs.
pub fn layer_forward(
    h: &[f32],
    w: &LayerWeights,
    a: &LayerInput,
    parts: &[LoraPart],
    save: bool,
) -> LayerOutput<LayerSaved> {
    let (out, mut kvs, saved) = forward(h, w, std::slice::from_ref(a), parts, save);
    let (k, v) = kvs.pop().expect("one segment");
    (out, k, v, saved)
}

/// [`layer_forward`] for several independent sequences at once (inference): `h` holds
/// the new rows of each segment in turn (`heads.batch * t` rows each). Every product runs
/// once over all rows, which is what makes a batch of short queries cheaper than one at
/// a time; each segment's attention sees only its own cache and mask, so each gets what
/// it would get alone. Returns the hidden states and each segment's keys and values.
pub fn layer_forward_segments(
    h: &[f32],
    w: &LayerWeights,
    segs: &[LayerInput],
    parts: &[LoraPart],
) -> (Vec<f32>, Vec<SegmentKv>) {
    let (out, kvs, _) = forward(h, w, segs, parts, false);
    (out, kvs)
}

fn forward(
    h: &[f32],
    w: &LayerWeights,
    segs: &[LayerInput],
    parts: &[LoraPart],
    save: bool,
) -> (Vec<f32>, Vec<SegmentKv>, Option<LayerSaved>) {
    assert!(!segs.is_empty(), "a layer needs at least one segment");
    let (dim, n) = (w.hidden, h.len() / w.hidden);
    let wd = segs[0].heads.width();
    let (n1, r1) = rms_norm(h, w.input_norm, w.eps, dim);
    let mut qkv = linear_frozen(&n1, w.qkv_t, w.qkv, None, n, dim, wd);
    let mut lsaved: Vec<Option<LoraSaved>> = parts.iter().map(|_| None).collect();
    for (i, p) in parts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.site == Site::Qkv)
    {
        lsaved[i] = Some(lora_forward(&n1, n, dim, p, &mut qkv, wd));
    }
    drop(n1);
    let (out, kvs, saved) = layer_after_qkv(h, &qkv, w, segs, parts, &mut lsaved, save);
    let saved = saved.map(|s| LayerSaved {
        lora: lsaved
            .into_iter()
            .map(|x| x.expect("every adapter ran at its site"))
            .collect(),
        r1,
        ..s
    });
    (out, kvs, saved)
}

/// The backward of [`layer_forward`]: the gradient of the layer's input `h` and, per
/// adapter, the gradients of `A` `(r, in)` and `B` `(width, r)` (the frozen weights get
/// none). Rows before [`LayerInput::grad_from`] get zeros when they may be skipped.
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
    let g = skippable_rows(a, parts);
    let dim = w.hidden;
    let n = h.len() / dim - g;
    let wd = a.heads.width();
    let (dqkv, dh1, mut grads) = layer_after_qkv_backward(s, k, v, w, a, parts, dout, g);
    let dh1 = match a.keep {
        Some(keep) => scatter_rows(&dh1, 1, a.t, keep, dim),
        None => dh1,
    };
    let mut dn1 = matmul_nn(&dqkv, w.qkv, n, wd, dim);
    for (i, p) in parts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.site == Site::Qkv)
    {
        grads[i] = Some(lora_backward(&dqkv, wd, n, dim, p, &s.lora[i], &mut dn1));
    }
    drop(dqkv);
    let tail = rms_norm_grad(
        &h[g * dim..],
        w.input_norm,
        &s.r1[g..],
        &dn1,
        Some(&dh1),
        dim,
    );
    let dh = if g == 0 {
        tail
    } else {
        let mut dh = vec![0f32; g * dim];
        dh.extend_from_slice(&tail);
        dh
    };
    (
        dh,
        grads
            .into_iter()
            .map(|g| g.expect("every adapter's site ran its backward"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-scale, scale].
    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect()
    }

    /// `(rows, cols)` row-major, transposed.
    fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| w[(i % rows) * cols + i / rows])
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// An adapter's forward and backward against their formulas in f64, with a mask and
    /// without, on columns in the middle of a wider product, over several row blocks (the
    /// last one part-way).
    #[test]
    fn adapter_matches_its_formulas() {
        let mask: Vec<f32> = (0..70 * 150)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.25 })
            .collect();
        adapter_check(Some(&mask));
        adapter_check(None);
    }

    fn adapter_check(mask: Option<&[f32]>) {
        let (n, input, width, r, ld, col) = (70, 150, 100, 8, 130, 20);
        assert!(n > 2 * LORA_ROWS && n % LORA_ROWS != 0);
        let x = values(n * input, 1, 1.0);
        let a = values(r * input, 2, 0.3);
        let b = values(width * r, 3, 0.3);
        let m = |i: usize| mask.map_or(1.0, |m| m[i] as f64);
        let scale = 2.0;
        let p = LoraPart {
            site: Site::Qkv,
            col,
            width,
            r,
            a: &a,
            b: &b,
            scale,
            mask,
        };
        let y0 = values(n * ld, 4, 1.0);
        let mut y = y0.clone();
        let sv = lora_forward(&x, n, input, &p, &mut y, ld);
        let f = |v: f32| v as f64;
        let xd = |i: usize, c: usize| f(x[i * input + c]) * m(i * input + c);
        let u = |i: usize, j: usize| {
            (0..input)
                .map(|c| f(a[j * input + c]) * xd(i, c))
                .sum::<f64>()
        };
        let close = |got: f32, want: f64, what: &str| {
            assert!(
                (f(got) - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{what}: {got} against {want}"
            );
        };
        for i in 0..n {
            let ui: Vec<f64> = (0..r).map(|j| u(i, j)).collect();
            for c in 0..ld {
                let add = if (col..col + width).contains(&c) {
                    f(scale) * (0..r).map(|j| f(b[(c - col) * r + j]) * ui[j]).sum::<f64>()
                } else {
                    0.0
                };
                close(y[i * ld + c], f(y0[i * ld + c]) + add, "y");
            }
        }
        let g = values(n * ld, 5, 1.0);
        let dx0 = values(n * input, 6, 1.0);
        let mut dx = dx0.clone();
        let (da, db) = lora_backward(&g, ld, n, input, &p, &sv, &mut dx);
        let gs = |i: usize, j: usize| {
            f(scale)
                * (0..width)
                    .map(|c| f(g[i * ld + col + c]) * f(b[c * r + j]))
                    .sum::<f64>()
        };
        let gsv: Vec<Vec<f64>> = (0..n).map(|i| (0..r).map(|j| gs(i, j)).collect()).collect();
        for i in 0..n {
            for c in 0..input {
                let back = (0..r).map(|j| gsv[i][j] * f(a[j * input + c])).sum::<f64>();
                let want = f(dx0[i * input + c]) + back * m(i * input + c);
                close(dx[i * input + c], want, "dx");
            }
        }
        for j in 0..r {
            for c in 0..input {
                let want = (0..n).map(|i| gsv[i][j] * xd(i, c)).sum::<f64>();
                close(da[j * input + c], want, "dA");
            }
        }
        let uv: Vec<Vec<f64>> = (0..n).map(|i| (0..r).map(|j| u(i, j)).collect()).collect();
        for c in 0..width {
            for j in 0..r {
                let want = f(scale)
                    * (0..n)
                        .map(|i| f(g[i * ld + col + c]) * uv[i][j])
                        .sum::<f64>();
                close(db[c * r + j], want, "dB");
            }
        }
    }

    /// The layer with `keep` gives the kept rows of the full layer, in `keep`'s order (one
    /// row twice), and its backward from those rows' gradients gives what the full
    /// backward gives from the same gradients placed at those rows (zeros elsewhere).
    #[test]
    fn kept_rows_equal_the_full_layers_rows_and_gradients() {
        let (dim, inter, t, p) = (16, 24, 9, 3);
        let heads = Heads {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        let wd = heads.width();
        let qkv = values(wd * dim, 1, 0.4);
        let o = values(dim * dim, 2, 0.4);
        let gate_up = values(2 * inter * dim, 3, 0.4);
        let down = values(dim * inter, 4, 0.3);
        let (norm1, norm2) = (values(dim, 5, 0.5), values(dim, 6, 0.5));
        let norm1: Vec<f32> = norm1.iter().map(|x| 1.0 + x).collect();
        let norm2: Vec<f32> = norm2.iter().map(|x| 1.0 + x).collect();
        let (qkv_t, o_t) = (transpose(&qkv, wd, dim), transpose(&o, dim, dim));
        let gate_up_t = transpose(&gate_up, 2 * inter, dim);
        let down_t = transpose(&down, dim, inter);
        let w = LayerWeights {
            input_norm: &norm1,
            qkv_t: Weight::T(&qkv_t),
            o_t: Weight::T(&o_t),
            gate_up_t: Weight::T(&gate_up_t),
            down_t: Weight::T(&down_t),
            qkv: &qkv,
            o: &o,
            post_norm: &norm2,
            gate_up: &gate_up,
            down: &down,
            eps: 1e-5,
            hidden: dim,
            inter,
        };
        let half = heads.head_dim / 2;
        let cos: Vec<f32> = (0..t * half).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..t * half).map(|i| (i as f32 * 0.3).sin()).collect();
        let (pk, pv) = (values(2 * p * 4, 7, 0.5), values(2 * p * 4, 8, 0.5));
        let s = p + t;
        let mask: Vec<f32> = (0..t * s)
            .map(|i| {
                if i % s <= p + i / s {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let keep = [6usize, 2, 6, 8];
        let input = |keep| LayerInput {
            heads,
            t,
            cos: &cos,
            sin: &sin,
            scale: 0.5,
            past: Some((&pk, &pv)),
            p,
            mask: Some(&mask),
            grad_from: 0,
            keep,
        };
        let h = values(t * dim, 9, 1.0);
        let (full, kf, vf, sf) = layer_forward(&h, &w, &input(None), &[], true);
        let (kept, kk, vk, sk) = layer_forward(&h, &w, &input(Some(&keep)), &[], true);
        assert_eq!(kept.len(), keep.len() * dim, "only the kept rows come out");
        let want = gather_rows(&full, 1, t, &keep, dim);
        assert!(max_diff(&kept, &want) <= 1e-5, "kept rows");
        assert!(
            max_diff(&kk, &kf) == 0.0 && max_diff(&vk, &vf) == 0.0,
            "keys, values"
        );
        let dout = values(keep.len() * dim, 10, 1.0);
        let (dk, _) = layer_backward(
            &sk.unwrap(),
            &h,
            &kk,
            &vk,
            &w,
            &input(Some(&keep)),
            &[],
            &dout,
        );
        let dfull = scatter_rows(&dout, 1, t, &keep, dim);
        let (df, _) = layer_backward(&sf.unwrap(), &h, &kf, &vf, &w, &input(None), &[], &dfull);
        let scale = df.iter().fold(1f32, |m, x| m.max(x.abs()));
        assert!(max_diff(&dk, &df) <= 1e-5 * scale, "input gradients");
        assert!(
            df[..dim].iter().any(|x| x.abs() > 1e-4),
            "row 0 carries gradient"
        );
    }
}
