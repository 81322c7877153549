//! A whole frozen Llama decoder layer in one forward and one input-only backward, with
//! optional LoRA adapters on q/k/v.

use crate::activation::{swiglu, swiglu_grad};
use crate::attention::{attention, attention_grad};
use crate::gemm::gemm_raw;
use crate::gemm::{linear, matmul_nn, matmul_nt};
use crate::norm::{rms_norm, rms_norm_grad};
use crate::rope::{split_rope, split_rope_grad, Heads};
use crate::util::{parallelism, uninit};

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
pub(crate) fn layer_after_qkv(
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
pub(crate) fn layer_after_qkv_backward(
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
