//! Differentiable ops for the frozen LLM that cost what inference costs.
//!
//! candle's fused kernels (RMSNorm, RoPE, softmax) record no backward, and its composite
//! differentiable forms allocate many intermediate tensors; a plain `matmul` against a
//! frozen weight also computes the weight's gradient. Each op here computes its forward
//! with the fused (inference) kernel on detached inputs, then attaches a closed-form
//! backward that returns only the input's gradient. The forward values are therefore
//! bit-identical to inference, and nothing is computed or kept for frozen weights.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// An op whose value was computed beforehand (without a graph) and whose backward is a
/// closure `(res, grad_res) -> grad_arg`.
struct Precomputed {
    name: &'static str,
    /// Taken by the forward call, so the graph does not keep a second copy.
    value: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl Precomputed {
    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: lock poisoned", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }
}

macro_rules! storage_fwd {
    ($self:ident, $variant:ident) => {{
        let y = $self.take()?;
        let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
            y
        } else {
            y.copy()?
        };
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::$variant(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("{}: the value lives on another device", $self.name),
        }
    }};
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        storage_fwd!(self, Cpu)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        storage_fwd!(self, Cuda)
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        storage_fwd!(self, Metal)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(res, grad)?))
    }
}

/// Attaches `value` (computed from `x.detach()`) to the graph of `x` with `backward`.
fn attach(name: &'static str, x: &Tensor, value: Tensor, backward: Backward) -> Result<Tensor> {
    x.apply_op1(Precomputed {
        name,
        value: Mutex::new(Some(value)),
        backward,
    })
}

/// `x @ w^T` for a 2-D `x` `(n, in)` and a frozen `w` `(out, in)`; the backward returns
/// `dx = dy w` only.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?;
    let w = w.clone();
    attach("frozen-matmul", x, y, Box::new(move |_, g| g.matmul(&w)))
}

/// RMSNorm with a frozen weight: `x / rms(x) * w`. Backward (input only), with
/// `r = 1 / rms(x)` and `g = dy * w`: `dx = r g - x r^3 mean(g x)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let y = candle_nn::ops::rms_norm(&xc.detach(), w, eps as f32)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (w, xd) = (w.clone(), xc.detach());
    let d = x.dim(D::Minus1)? as f64;
    attach(
        "frozen-rms-norm",
        &xc,
        y,
        Box::new(move |_, dy| {
            let r = ((xd.sqr()?.sum_keepdim(D::Minus1)? / d)? + eps)?
                .sqrt()?
                .recip()?;
            let g = dy.broadcast_mul(&w)?;
            let gx = ((&g * &xd)?.sum_keepdim(D::Minus1)? / d)?;
            let t1 = g.broadcast_mul(&r)?;
            let t2 = xd.broadcast_mul(&(r.powf(3.0)? * gx)?)?;
            t1 - t2
        }),
    )
}

/// Rotary embedding in the half-split convention; `x` `(b, h, t, d)`, `cos`/`sin`
/// `(t, d/2)`. A rotation's inverse is its transpose, so the backward rotates the
/// gradient by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&xc.detach(), cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach(
        "frozen-rope",
        &xc,
        y,
        Box::new(move |_, dy| candle_nn::rotary_emb::rope(&dy.contiguous()?, &cos, &neg_sin)),
    )
}

/// `softmax(scores + mask)` over the last dimension, the mask folded in; backward
/// `dx = y (dy - sum(dy y))`.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let s = scores.detach();
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    let y = candle_nn::ops::softmax_last_dim(&s.contiguous()?)?;
    if !scores.track_op() {
        return Ok(y);
    }
    attach(
        "frozen-softmax",
        scores,
        y,
        Box::new(|y, dy| {
            let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
            y * dy.broadcast_sub(&dot)?
        }),
    )
}

/// Query rows per block of the memory-efficient attention.
const ATTN_BLOCK: usize = 256;

/// Attention `softmax(q k^T + mask) v` for grouped queries: `q` `(b, hk, rep, t, d)`
/// (already scaled), `k`, `v` `(b, hk, s, d)`, `mask` `(t, s)` additive. Returns
/// `(b, hk, rep, t, d)`.
///
/// When a gradient is needed it runs in blocks of query rows and keeps only the output
/// and each row's log-sum-exp; the backward recomputes a block's probabilities
/// (as FlashAttention does), so memory no longer grows with `t * s` per layer.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, hk, rep, t, d) = q.dims5()?;
    let s = k.dim(2)?;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked {
        let scores = q
            .reshape((b, hk, rep * t, d))?
            .matmul(&k.t()?)?
            .reshape((b, hk, rep, t, s))?;
        let p = masked_softmax(&scores, mask)?.reshape((b, hk, rep * t, s))?;
        return p.matmul(v)?.reshape((b, hk, rep, t, d));
    }
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for t0 in (0..t).step_by(ATTN_BLOCK) {
        let tb = ATTN_BLOCK.min(t - t0);
        let (scores, _) = block_scores(&qd, &kd, mask, t0, tb)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let o = e
            .reshape((b, hk, rep * tb, s))?
            .matmul(&vd)?
            .reshape((b, hk, rep, tb, d))?
            .broadcast_div(&sum)?;
        outs.push(o);
        lses.push((max + sum.log()?)?);
    }
    let out = Tensor::cat(&outs, 3)?;
    let lse = Tensor::cat(&lses, 3)?; // (b, hk, rep, t, 1)
    let mask = mask.cloned();
    q.apply_op3(
        k,
        v,
        Attention {
            name: "memory-efficient-attention",
            value: Mutex::new(Some(out)),
            lse,
            mask,
        },
    )
}

/// Scores of query rows `t0..t0+tb`: `(b, hk, rep, tb, s)`, mask added.
fn block_scores(
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    t0: usize,
    tb: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, hk, rep, _, d) = q.dims5()?;
    let s = k.dim(2)?;
    let qb = q
        .narrow(3, t0, tb)?
        .contiguous()?
        .reshape((b, hk, rep * tb, d))?;
    let scores = qb.matmul(&k.t()?)?.reshape((b, hk, rep, tb, s))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.narrow(0, t0, tb)?)?,
        None => scores,
    };
    Ok((scores, qb))
}

struct Attention {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    lse: Tensor,
    mask: Option<Tensor>,
}

impl Attention {
    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention: forward ran twice".into()))
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "memory-efficient-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        storage_fwd!(self, Cpu)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        storage_fwd!(self, Cuda)
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        storage_fwd!(self, Metal)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, hk, rep, t, d) = q.dims5()?;
        let s = k.dim(2)?;
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), out.detach());
        let dout = dout.contiguous()?;
        // D = rowsum(dO * O): (b, hk, rep, t, 1).
        let dsum = (&dout * &out)?.sum_keepdim(D::Minus1)?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for t0 in (0..t).step_by(ATTN_BLOCK) {
            let tb = ATTN_BLOCK.min(t - t0);
            let (scores, qb) = block_scores(&q, &k, self.mask.as_ref(), t0, tb)?;
            let p = scores.broadcast_sub(&self.lse.narrow(3, t0, tb)?)?.exp()?; // (b,hk,rep,tb,s)
            let p2 = p.reshape((b, hk, rep * tb, s))?;
            let dob = dout
                .narrow(3, t0, tb)?
                .contiguous()?
                .reshape((b, hk, rep * tb, d))?;
            dv = (dv + p2.t()?.matmul(&dob)?)?;
            let dp = dob.matmul(&v.t()?)?.reshape((b, hk, rep, tb, s))?;
            let ds =
                (p * dp.broadcast_sub(&dsum.narrow(3, t0, tb)?)?)?.reshape((b, hk, rep * tb, s))?;
            dq.push(ds.matmul(&k)?.reshape((b, hk, rep, tb, d))?);
            dk = (dk + ds.t()?.matmul(&qb)?)?;
        }
        Ok((Some(Tensor::cat(&dq, 3)?), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max difference {d}");
    }

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * k).sin()).collect()
    }

    /// Each op against candle's composite differentiable form: same value, same input
    /// gradient, no gradient for the frozen operand.
    #[test]
    fn fast_ops_match_composite_forms() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(seq(2 * 3 * 5 * 8, 0.37), (2, 3, 5, 8), &dev)?;
        let c = Tensor::from_vec(seq(2 * 3 * 5 * 8, 0.11), (2, 3, 5, 8), &dev)?;
        let check = |fast: Tensor, slow: Tensor| -> Result<()> {
            close(&fast, &slow, 1e-5);
            let gf = (fast * &c)?.sum_all()?.backward()?;
            let gs = (slow * &c)?.sum_all()?.backward()?;
            close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-4);
            Ok(())
        };
        // RMSNorm.
        let w = Tensor::from_vec(seq(8, 0.7), 8, &dev)?.affine(0.5, 1.0)?;
        check(
            rms_norm(x.as_tensor(), &w, 1e-5)?,
            candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5)?,
        )?;
        // RoPE.
        let cos = Tensor::from_vec(seq(5 * 4, 0.3), (5, 4), &dev)?.cos()?;
        let sin = Tensor::from_vec(seq(5 * 4, 0.3), (5, 4), &dev)?.sin()?;
        check(
            rope(x.as_tensor(), &cos, &sin)?,
            candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin)?,
        )?;
        // Masked softmax.
        let m: Vec<f32> = (0..40)
            .map(|i| {
                if i % 8 > i / 8 + 2 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let m = Tensor::from_vec(m, (5, 8), &dev)?;
        check(
            masked_softmax(x.as_tensor(), Some(&m))?,
            candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&m)?, D::Minus1)?,
        )?;
        // Memory-efficient attention against the plain form, values and all three
        // gradients, with a causal mask over a cached past and more rows than one block.
        let (hk, rep, t, past, dh) = (2, 2, 300, 20, 4);
        let qv = Var::from_vec(seq(hk * rep * t * dh, 0.13), (1, hk, rep, t, dh), &dev)?;
        let kv = Var::from_vec(seq(hk * (past + t) * dh, 0.29), (1, hk, past + t, dh), &dev)?;
        let vv = Var::from_vec(seq(hk * (past + t) * dh, 0.41), (1, hk, past + t, dh), &dev)?;
        let mask = crate::model::llama::causal_mask(t, past, &dev, candle_core::DType::F32)?;
        let fast = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), Some(&mask))?;
        let sc = qv
            .as_tensor()
            .reshape((1, hk, rep * t, dh))?
            .matmul(&kv.as_tensor().t()?)?
            .reshape((1, hk, rep, t, past + t))?;
        let p = candle_nn::ops::softmax(&sc.broadcast_add(&mask)?, D::Minus1)?;
        let slow = p
            .reshape((1, hk, rep * t, past + t))?
            .matmul(vv.as_tensor())?
            .reshape((1, hk, rep, t, dh))?;
        close(&fast, &slow, 1e-5);
        let w = Tensor::from_vec(seq(hk * rep * t * dh, 0.07), (1, hk, rep, t, dh), &dev)?;
        let gf = (fast * &w)?.sum_all()?.backward()?;
        let gs = (slow * &w)?.sum_all()?.backward()?;
        for var in [&qv, &kv, &vv] {
            close(gf.get(var).unwrap(), gs.get(var).unwrap(), 1e-4);
        }
        // Frozen matmul: no weight gradient.
        let a = Var::from_vec(seq(12, 0.37), (3, 4), &dev)?;
        let wm = Tensor::from_vec(seq(20, 0.9), (5, 4), &dev)?;
        let wv = Var::from_tensor(&wm)?;
        let fast = matmul_t(a.as_tensor(), &wm)?;
        let plain = a.as_tensor().matmul(&wv.as_tensor().t()?)?;
        close(&fast, &plain, 1e-6);
        let g = fast.sum_all()?.backward()?;
        let gp = plain.sum_all()?.backward()?;
        close(g.get(&a).unwrap(), gp.get(&a).unwrap(), 1e-5);
        assert!(g.get(&wm).is_none() && gp.get(&wv).is_some());
        Ok(())
    }
}
