//! Differentiable ops for the frozen LLM that cost what inference costs.
//!
//! candle's fused kernels (RMSNorm, RoPE, softmax) record no backward, and its composite
//! differentiable forms allocate many intermediate tensors; a plain `matmul` against a
//! frozen weight also computes the weight's gradient. Each op here computes its forward
//! with the fused (inference) kernel on detached inputs, then attaches a closed-form
//! backward that returns only the input's gradient. The forward values are therefore
//! bit-identical to inference, and nothing is computed or kept for frozen weights.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage,
    Tensor, D,
};
use farcer_kernels::{self as kernels, Heads};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// A value computed beforehand: a tensor, or a vector straight from a CPU kernel (handed
/// to candle without a copy).
enum Value {
    Tensor(Tensor),
    Cpu(Vec<f32>, Shape),
}

/// An op whose value was computed beforehand (without a graph) and whose backward is a
/// closure `(res, grad_res) -> grad_arg`.
struct Precomputed {
    name: &'static str,
    /// Taken by the forward call, so the graph does not keep a second copy.
    value: Mutex<Option<Value>>,
    backward: Backward,
}

fn take_value(name: &str, value: &Mutex<Option<Value>>) -> Result<Value> {
    value
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: lock poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

macro_rules! storage_fwd {
    ($self:ident, $variant:ident) => {{
        let y = match take_value($self.name, &$self.value)? {
            Value::Tensor(y) => y,
            Value::Cpu(v, shape) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?,
        };
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

/// The CPU forward: a kernel's vector moves into the graph without a copy.
fn cpu_value(name: &str, value: &Mutex<Option<Value>>) -> Result<(CpuStorage, Shape)> {
    match take_value(name, value)? {
        Value::Cpu(v, shape) => Ok((CpuStorage::F32(v), shape)),
        Value::Tensor(y) => {
            let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
                y
            } else {
                y.copy()?
            };
            let (s, l) = y.storage_and_layout();
            match &*s {
                Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
                _ => candle_core::bail!("{name}: the value lives on another device"),
            }
        }
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_value(self.name, &self.value)
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
        value: Mutex::new(Some(Value::Tensor(value))),
        backward,
    })
}

/// A kernel's output `(v, shape)`: attached to the graph of `x` with `backward` when `x`
/// needs one, a plain tensor otherwise.
fn output(
    name: &'static str,
    x: &Tensor,
    v: Vec<f32>,
    shape: Shape,
    backward: impl FnOnce() -> Backward,
) -> Result<Tensor> {
    if !x.track_op() {
        return Tensor::from_vec(v, shape, &candle_core::Device::Cpu);
    }
    x.apply_op1(Precomputed {
        name,
        value: Mutex::new(Some(Value::Cpu(v, shape))),
        backward: backward(),
    })
}

/// Which ops a model runs, chosen once when it is loaded: the fused f32 CPU kernels of
/// [`farcer_kernels`], or candle's ops (any device and dtype; on the CPU, the
/// independent path that tests hold the kernels against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernels,
    Candle,
}

impl Backend {
    /// The fastest backend for weights on `device` in `dtype`.
    pub fn auto(device: &candle_core::Device, dtype: DType) -> Self {
        if device.is_cpu() && dtype == DType::F32 {
            Backend::Kernels
        } else {
            Backend::Candle
        }
    }

    /// Fails when this backend cannot run weights on `device` in `dtype`.
    pub fn check(self, device: &candle_core::Device, dtype: DType) -> Result<()> {
        if self == Backend::Kernels && Backend::auto(device, dtype) != Backend::Kernels {
            candle_core::bail!(
                "the fused kernels run f32 on the CPU only, not {dtype:?} on {device:?}"
            );
        }
        Ok(())
    }
}

/// A contiguous f32 CPU tensor's values, borrowed.
struct View<G> {
    guard: G,
    start: usize,
    len: usize,
}

impl<G: std::ops::Deref<Target = Storage>> View<G> {
    fn s(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => unreachable!("checked by view()"),
        }
    }
}

/// Borrows `t`'s values; `t` must be contiguous, f32 and on the CPU.
fn view(t: &Tensor) -> Result<View<impl std::ops::Deref<Target = Storage> + '_>> {
    if !t.is_contiguous() {
        candle_core::bail!("kernel input is not contiguous");
    }
    let (guard, l) = t.storage_and_layout();
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("kernel input is not f32 on the CPU");
    }
    let (start, len) = (l.start_offset(), l.shape().elem_count());
    Ok(View { guard, start, len })
}

/// `x @ w^T` for a 2-D `x` `(n, in)` and a frozen `w` `(out, in)`; the backward returns
/// `dx = dy w` only.
pub fn matmul_t(be: Backend, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if be == Backend::Kernels && w.is_contiguous() {
        let x = x.contiguous()?;
        let ((n, k), m) = (x.dims2()?, w.dim(0)?);
        let y = kernels::matmul_nt(view(&x)?.s(), view(w)?.s(), n, k, m);
        let w = w.clone();
        return output("frozen-matmul", &x, y, (n, m).into(), || {
            Box::new(move |_, g| {
                let g = g.contiguous()?;
                let dx = kernels::matmul_nn(view(&g)?.s(), view(&w)?.s(), n, m, k);
                Tensor::from_vec(dx, (n, k), &candle_core::Device::Cpu)
            })
        });
    }
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?;
    let w = w.clone();
    attach("frozen-matmul", x, y, Box::new(move |_, g| g.matmul(&w)))
}

/// A frozen weight kept in GGUF's Q8_0 blocks beside its f32 copy, for the products
/// that are memory-bound (see [`kernels::quant`]). Cloning shares the blocks.
#[derive(Clone, Debug)]
pub struct Q8Weight {
    data: std::sync::Arc<Vec<u8>>,
    rows: usize,
    cols: usize,
}

impl Q8Weight {
    /// `None` unless `data` is exactly `rows` rows of `cols / 32` blocks.
    pub fn new(data: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        kernels::Q8Matrix::new(&data, rows, cols)?;
        Some(Q8Weight {
            data: std::sync::Arc::new(data),
            rows,
            cols,
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows `r0 .. r0 + n` as f32.
    pub fn row_values(&self, r0: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * self.cols];
        self.matrix().dequantize_rows(r0, &mut out);
        out
    }

    fn matrix(&self) -> kernels::Q8Matrix<'_> {
        kernels::Q8Matrix::new(&self.data, self.rows, self.cols).expect("checked in new")
    }
}

/// [`matmul_t`] reading `w` from its Q8_0 blocks (CPU, f32): the same values as its f32
/// copy, a quarter of the bytes. The backward returns the input gradient only.
pub fn matmul_t_q8(x: &Tensor, w: &Q8Weight) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, k) = x.dims2()?;
    if k != w.cols {
        candle_core::bail!("({n}, {k}) times a Q8_0 weight ({}, {})^T", w.rows, w.cols);
    }
    let y = kernels::q8_matmul_nt(view(&x)?.s(), n, w.matrix());
    let m = w.rows;
    let w = w.clone();
    output("frozen-matmul-q8", &x, y, (n, m).into(), || {
        Box::new(move |_, g| {
            let g = g.contiguous()?;
            let dx = kernels::q8_matmul_nn(view(&g)?.s(), n, w.matrix());
            Tensor::from_vec(dx, (n, k), &candle_core::Device::Cpu)
        })
    })
}

/// RMSNorm with a frozen weight: `x / rms(x) * w`. Backward (input only), with
/// `r = 1 / rms(x)` and `g = dy * w`: `dx = r g - x r^3 mean(g x)`.
pub fn rms_norm(be: Backend, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if be == Backend::Kernels && w.is_contiguous() {
        let x = x.contiguous()?;
        let dim = w.dim(0)?;
        let (y, r) = kernels::rms_norm(view(&x)?.s(), view(w)?.s(), eps as f32, dim);
        let (xd, w) = (x.detach(), w.clone());
        return output("frozen-rms-norm", &x, y, x.shape().clone(), move || {
            Box::new(move |_, dy| {
                let dy = dy.contiguous()?;
                let (xv, dv) = (view(&xd)?, view(&dy)?);
                let g = kernels::rms_norm_grad(xv.s(), view(&w)?.s(), &r, dv.s(), None, dim);
                Tensor::from_vec(g, xd.shape(), &candle_core::Device::Cpu)
            })
        });
    }
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
            value: Mutex::new(Some(Value::Tensor(out))),
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
    value: Mutex<Option<Value>>,
    lse: Tensor,
    mask: Option<Tensor>,
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
        cpu_value(self.name, &self.value)
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

/// Shapes and tables for [`attend`].
pub struct AttendArgs<'a> {
    pub heads: Heads,
    /// New positions.
    pub t: usize,
    /// `(t, d / 2)` RoPE tables of the new positions.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Multiplies q (the attention scale).
    pub scale: f32,
    /// Cached keys and values `(b, hk, p, d)` (no graph).
    pub past: Option<&'a (Tensor, Tensor)>,
    /// Additive `(t, p + t)`.
    pub mask: Option<&'a Tensor>,
    /// The first new row whose input's gradient is needed (see
    /// [`kernels::LayerInput::grad_from`]); 0: every row.
    pub grad_from: usize,
    /// Only these new rows go on past the keys and values (see
    /// [`kernels::LayerInput::keep`]; [`layer`] only).
    pub keep: Option<&'a [usize]>,
}

/// The attention of one layer from its fused projection `qkv` `(b t, (h + 2 hk) d)` in
/// one op (CPU, f32): split, RoPE, scale, append to the cache, blocked attention.
/// Returns the output `(b t, h d)` (ready for the output projection) and the keys and
/// values `(b, hk, p + t, d)` for the cache. The backward goes straight back to `qkv`.
pub fn attend(qkv: &Tensor, a: &AttendArgs) -> Result<(Tensor, Tensor, Tensor)> {
    let hs = a.heads;
    let (b, t) = (hs.batch, a.t);
    let (h, hk, d) = (hs.heads, hs.kv_heads, hs.head_dim);
    let qkv = qkv.contiguous()?;
    let (cos, sin) = (a.cos.contiguous()?, a.sin.contiguous()?);
    let p = match a.past {
        Some((k, _)) => k.dim(2)?,
        None => 0,
    };
    let s = p + t;
    let (q, k, v) = {
        let past = match a.past {
            Some((pk, pv)) => Some((pk.contiguous()?, pv.contiguous()?)),
            None => None,
        };
        let pv = match &past {
            Some((pk, pv)) => Some((view(pk)?, view(pv)?)),
            None => None,
        };
        kernels::split_rope(
            view(&qkv)?.s(),
            hs,
            t,
            view(&cos)?.s(),
            view(&sin)?.s(),
            a.scale,
            pv.as_ref().map(|(k, v)| (k.s(), v.s())),
            p,
        )
    };
    let mask = match a.mask {
        Some(m) => Some(m.contiguous()?),
        None => None,
    };
    let (out, lse) = {
        let mv = match &mask {
            Some(m) => Some(view(m)?),
            None => None,
        };
        kernels::attention(&q, &k, &v, mv.as_ref().map(|m| m.s()), hs, t, s)
    };
    let dev = candle_core::Device::Cpu;
    let k = Tensor::from_vec(k, (b, hk, s, d), &dev)?;
    let v = Tensor::from_vec(v, (b, hk, s, d), &dev)?;
    let (kc, vc) = (k.clone(), v.clone());
    let scale = a.scale;
    let out = output(
        "fused-attention",
        &qkv,
        out,
        (b * t, h * d).into(),
        move || {
            Box::new(move |out, dout| {
                let dout = dout.contiguous()?;
                let (ks, vs) = (view(&kc)?, view(&vc)?);
                let mv = match &mask {
                    Some(m) => Some(view(m)?),
                    None => None,
                };
                let (dq, dk, dv) = kernels::attention_grad(
                    &q,
                    ks.s(),
                    vs.s(),
                    mv.as_ref().map(|m| m.s()),
                    view(out)?.s(),
                    view(&dout)?.s(),
                    &lse,
                    hs,
                    t,
                    s,
                );
                let g = kernels::split_rope_grad(
                    &dq,
                    &dk,
                    &dv,
                    hs,
                    t,
                    view(&cos)?.s(),
                    view(&sin)?.s(),
                    scale,
                    p,
                );
                Tensor::from_vec(g, (b * t, hs.width()), &candle_core::Device::Cpu)
            })
        },
    )?;
    Ok((out, k, v))
}

/// A frozen linear weight as the fused CPU path reads it: packed once by the GEMM
/// library where the process's choice has one that packs (MKL; 5-10% faster products,
/// see `kernels::PackedB`), else the plain `(in, out)` copy.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    T(Tensor),
    /// The packed weight and, where kept, the `(out, in)` original (the same storage as
    /// the model's own tensor), which products over a few rows read instead.
    Packed(std::sync::Arc<kernels::PackedB>, Option<Tensor>),
}

impl FrozenWeight {
    /// From a `(out, in)` weight (CPU, f32): packed straight from it (no transposed
    /// copy), or its transposed copy. A packed weight keeps `w` beside it for products
    /// over a few rows when `keep` (pass false for a temporary, e.g. stacked weights that
    /// only ever meet many rows, so it is not held).
    pub fn new(w: &Tensor, keep: bool) -> Result<Self> {
        if let Some(lib) = kernels::blas::packing() {
            let (n, k) = w.dims2()?;
            let w = w.contiguous()?;
            let packed = kernels::PackedB::new(lib, view(&w)?.s(), true, k, n);
            if let Some(p) = packed {
                return Ok(FrozenWeight::Packed(
                    std::sync::Arc::new(p),
                    keep.then_some(w),
                ));
            }
        }
        Ok(FrozenWeight::T(w.t()?.contiguous()?))
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, FrozenWeight::Packed(..))
    }

    /// The input size.
    pub fn in_dim(&self) -> Result<usize> {
        match self {
            FrozenWeight::T(t) => t.dim(0),
            FrozenWeight::Packed(p, _) => Ok(p.shape().0),
        }
    }

    /// The output size.
    pub fn out_dim(&self) -> Result<usize> {
        match self {
            FrozenWeight::T(t) => t.dim(1),
            FrozenWeight::Packed(p, _) => Ok(p.shape().1),
        }
    }
}

/// Binds `$out` to the kernels' form of the [`FrozenWeight`] `$w`, holding the view of
/// its tensor (the copy, or the original beside the packed weight) in `$view` while it
/// is read.
macro_rules! frozen_weight {
    ($w:expr, $view:ident, $out:ident) => {
        let $view = match $w {
            FrozenWeight::T(t) | FrozenWeight::Packed(_, Some(t)) => Some(view(t)?),
            FrozenWeight::Packed(_, None) => None,
        };
        let $out = match ($w, &$view) {
            (FrozenWeight::T(_), Some(v)) => kernels::Weight::T(v.s()),
            (FrozenWeight::Packed(p, _), v) => kernels::Weight::Packed {
                packed: p,
                w: v.as_ref().map(|v| v.s()),
            },
            (FrozenWeight::T(_), None) => unreachable!("viewed above"),
        };
    };
}

/// A frozen decoder layer's weights as tensors (contiguous, f32, CPU), for [`layer`].
#[derive(Clone)]
pub struct FrozenLayer {
    pub input_norm: Tensor,
    /// `qkv`, `o`, `gate_up`, `down` as the forward reads them (packed or transposed).
    pub transposed: [FrozenWeight; 4],
    pub qkv: Tensor,
    pub o: Tensor,
    pub post_norm: Tensor,
    pub gate_up: Tensor,
    pub down: Tensor,
    pub eps: f32,
}

impl FrozenLayer {
    /// Runs `f` on the weights' values.
    fn with<R>(&self, f: impl FnOnce(&kernels::LayerWeights) -> R) -> Result<R> {
        let (a, b, c) = (view(&self.input_norm)?, view(&self.qkv)?, view(&self.o)?);
        let (d, e, g) = (
            view(&self.post_norm)?,
            view(&self.gate_up)?,
            view(&self.down)?,
        );
        let (hidden, inter) = (self.input_norm.dim(0)?, self.down.dim(1)?);
        let [t0, t1, t2, t3] = &self.transposed;
        frozen_weight!(t0, v0, w0);
        frozen_weight!(t1, v1, w1);
        frozen_weight!(t2, v2, w2);
        frozen_weight!(t3, v3, w3);
        let r = f(&kernels::LayerWeights {
            input_norm: a.s(),
            qkv_t: w0,
            o_t: w1,
            gate_up_t: w2,
            down_t: w3,
            qkv: b.s(),
            o: c.s(),
            post_norm: d.s(),
            gate_up: e.s(),
            down: g.s(),
            eps: self.eps,
            hidden,
            inter,
        });
        drop((v0, v1, v2, v3));
        Ok(r)
    }
}

/// [`AttendArgs`] with owned, contiguous tensors (kept by a layer's backward).
struct LayerCtx {
    heads: Heads,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    scale: f32,
    past: Option<(Tensor, Tensor)>,
    mask: Option<Tensor>,
    grad_from: usize,
    keep: Option<Vec<usize>>,
}

impl LayerCtx {
    fn new(a: &AttendArgs) -> Result<Self> {
        let past = match a.past {
            Some((k, v)) => Some((k.contiguous()?, v.contiguous()?)),
            None => None,
        };
        Ok(LayerCtx {
            heads: a.heads,
            t: a.t,
            cos: a.cos.contiguous()?,
            sin: a.sin.contiguous()?,
            scale: a.scale,
            past,
            mask: a.mask.map(|m| m.contiguous()).transpose()?,
            grad_from: a.grad_from,
            keep: a.keep.map(|k| k.to_vec()),
        })
    }

    /// Runs `f` on the context's values.
    fn with<R>(&self, f: impl FnOnce(&kernels::LayerInput) -> R) -> Result<R> {
        let v = CtxView::new(self)?;
        Ok(f(&v.input(self)))
    }
}

/// Borrowed views of a [`LayerCtx`]'s tensors, from which its kernel input is made.
struct CtxView<G> {
    cos: View<G>,
    sin: View<G>,
    past: Option<(View<G>, View<G>)>,
    mask: Option<View<G>>,
}

impl CtxView<()> {
    fn new(c: &LayerCtx) -> Result<CtxView<impl std::ops::Deref<Target = Storage> + '_>> {
        Ok(CtxView {
            cos: view(&c.cos)?,
            sin: view(&c.sin)?,
            past: match &c.past {
                Some((k, v)) => Some((view(k)?, view(v)?)),
                None => None,
            },
            mask: c.mask.as_ref().map(view).transpose()?,
        })
    }
}

impl<G: std::ops::Deref<Target = Storage>> CtxView<G> {
    fn input<'b>(&'b self, c: &'b LayerCtx) -> kernels::LayerInput<'b> {
        let p = c.past.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        kernels::LayerInput {
            heads: c.heads,
            t: c.t,
            cos: self.cos.s(),
            sin: self.sin.s(),
            scale: c.scale,
            past: self.past.as_ref().map(|(k, v)| (k.s(), v.s())),
            p,
            mask: self.mask.as_ref().map(|m| m.s()),
            grad_from: c.grad_from,
            keep: c.keep.as_deref(),
        }
    }
}

type Backward2 =
    Box<dyn Fn(&Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// [`Precomputed`] for an op of two arguments.
struct Precomputed2 {
    name: &'static str,
    value: Mutex<Option<Value>>,
    backward: Backward2,
}

impl candle_core::CustomOp2 for Precomputed2 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_value(self.name, &self.value)
    }

    fn cuda_fwd(
        &self,
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
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        storage_fwd!(self, Metal)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(res, grad)
    }
}

/// The gradients a recomputed block returns: of its input, and of its parameters
/// flattened in the order they were given.
pub type RecomputeBackward = Box<dyn Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync>;

/// Joins a block computed without a graph (`value`, from `x` and, if any, the flattened
/// trainable `params`) to candle's autograd: its backward is `backward(grad of value)`,
/// which typically recomputes the block with a graph from its saved input (gradient
/// checkpointing), so nothing inside the block is kept between forward and backward.
pub fn attach_recomputed(
    x: &Tensor,
    params: Option<&Tensor>,
    value: Tensor,
    backward: RecomputeBackward,
) -> Result<Tensor> {
    match params {
        None => x.apply_op1(Precomputed {
            name: "recomputed-block",
            value: Mutex::new(Some(Value::Tensor(value))),
            backward: Box::new(move |_, g| Ok(backward(g)?.0)),
        }),
        Some(p) => x.apply_op2(
            p,
            Precomputed2 {
                name: "recomputed-block-params",
                value: Mutex::new(Some(Value::Tensor(value))),
                backward: Box::new(move |_, g| {
                    let (dx, dp) = backward(g)?;
                    Ok((Some(dx), dp))
                }),
            },
        ),
    }
}

/// A LoRA adapter inside the fused decoder-layer op, for [`layer`].
pub struct LoraInput {
    /// The product it adds to, and its columns there.
    pub site: kernels::Site,
    pub col: usize,
    pub width: usize,
    /// `(r, in)` and `(width, r)`; attached to their variables when training.
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
    /// Inverted-dropout multipliers `(n, in)`.
    pub mask: Option<Vec<f32>>,
}

/// Runs `f` on the adapters' values.
fn with_lora<R>(parts: &[LoraInput], f: impl FnOnce(&[kernels::LoraPart]) -> R) -> Result<R> {
    let views = parts
        .iter()
        .map(|p| Ok((view(&p.a)?, view(&p.b)?)))
        .collect::<Result<Vec<_>>>()?;
    let kp = parts
        .iter()
        .zip(&views)
        .map(|(p, (a, b))| {
            Ok(kernels::LoraPart {
                site: p.site,
                col: p.col,
                width: p.width,
                r: p.a.dim(0)?,
                a: a.s(),
                b: b.s(),
                scale: p.scale,
                mask: p.mask.as_deref(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(f(&kp))
}

/// A whole frozen decoder layer as one op (CPU, f32): `h` `(b, t, hidden)` in, the new
/// hidden states (`(1, keep.len(), hidden)` with [`AttendArgs::keep`]) and the keys and
/// values `(b, hk, p + t, d)` for the cache out. Adapters
/// on any of its projections (`parts`, possibly none) are added inside the op. With a graph, the
/// backward ([`kernels::layer_backward`]) returns the gradient of `h` and, with adapters,
/// of every `A` and `B`: the op then also takes the adapters' weights, flattened and
/// concatenated, so candle hands each variable its slice. Candle's autograd sees one node
/// per layer instead of some forty.
pub fn layer(
    h: &Tensor,
    l: &FrozenLayer,
    a: &AttendArgs,
    parts: Vec<LoraInput>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = h.contiguous()?;
    let shape = h.shape().clone();
    let out_shape = match a.keep {
        None => shape.clone(),
        Some(keep) => {
            if a.heads.batch != 1 || !parts.is_empty() {
                candle_core::bail!("keeping some rows needs batch 1 and no adapters");
            }
            if let Some(&bad) = keep.iter().find(|&&r| r >= a.t) {
                candle_core::bail!("row {bad} kept of {}", a.t);
            }
            let (_, _, hidden) = shape.dims3()?;
            (1, keep.len(), hidden).into()
        }
    };
    let ctx = LayerCtx::new(a)?;
    let parts = parts
        .into_iter()
        .map(|p| {
            Ok(LoraInput {
                a: p.a.contiguous()?,
                b: p.b.contiguous()?,
                ..p
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = if parts.is_empty() {
        None
    } else {
        let flat = parts
            .iter()
            .flat_map(|p| [p.a.flatten_all(), p.b.flatten_all()])
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&flat, 0)?)
    };
    let save = h.track_op() || params.as_ref().is_some_and(|p| p.track_op());
    let (out, k, v, saved) = {
        let hv = view(&h)?;
        with_lora(&parts, |kp| {
            l.with(|w| ctx.with(|inp| kernels::layer_forward(hv.s(), w, inp, kp, save)))
        })???
    };
    let (b, hk, d) = (a.heads.batch, a.heads.kv_heads, a.heads.head_dim);
    let s = k.len() / (b * hk * d);
    let dev = candle_core::Device::Cpu;
    let k = Tensor::from_vec(k, (b, hk, s, d), &dev)?;
    let v = Tensor::from_vec(v, (b, hk, s, d), &dev)?;
    if !save {
        return Ok((Tensor::from_vec(out, out_shape, &dev)?, k, v));
    }
    let saved = saved.expect("saved when tracked");
    let (kc, vc, hd, l) = (k.clone(), v.clone(), h.detach(), l.clone());
    // The gradient of `h`, and the adapters' gradients in the order of `params`.
    let grads = move |dout: &Tensor| -> Result<(Tensor, Vec<f32>)> {
        let dout = dout.contiguous()?;
        let (dv, hv, ks, vs) = (view(&dout)?, view(&hd)?, view(&kc)?, view(&vc)?);
        let (dh, grads) = with_lora(&parts, |kp| {
            l.with(|w| {
                ctx.with(|inp| {
                    kernels::layer_backward(&saved, hv.s(), ks.s(), vs.s(), w, inp, kp, dv.s())
                })
            })
        })???;
        let dp = grads
            .into_iter()
            .flat_map(|(da, db)| da.into_iter().chain(db))
            .collect();
        Ok((
            Tensor::from_vec(dh, shape.clone(), &candle_core::Device::Cpu)?,
            dp,
        ))
    };
    let out = match params {
        None => output("frozen-layer", &h, out, out_shape, move || {
            Box::new(move |_, dout| Ok(grads(dout)?.0))
        })?,
        Some(params) => {
            let n = params.elem_count();
            let backward: Backward2 = Box::new(move |_, dout| {
                let (dh, dp) = grads(dout)?;
                let dp = Tensor::from_vec(dp, n, &candle_core::Device::Cpu)?;
                Ok((Some(dh), Some(dp)))
            });
            h.apply_op2(
                &params,
                Precomputed2 {
                    name: "frozen-layer-lora",
                    value: Mutex::new(Some(Value::Cpu(out, out_shape))),
                    backward,
                },
            )?
        }
    };
    Ok((out, k, v))
}

/// [`layer`] for several independent sequences in one op (inference, no graph): `h`
/// `(1, rows, hidden)` holds each segment's new positions in turn, and each segment
/// attends to its own cache and mask (`args`, one per segment, batch 1). The products run
/// once over all rows. Returns the hidden states and each segment's keys and values
/// `(1, hk, p + t, d)`.
pub fn layer_segments(
    h: &Tensor,
    l: &FrozenLayer,
    args: &[AttendArgs],
    parts: &[LoraInput],
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    if h.track_op() || parts.iter().any(|p| p.a.track_op() || p.b.track_op()) {
        candle_core::bail!("several segments in one pass are for inference: no graph");
    }
    if args.iter().any(|a| a.heads.batch != 1) {
        candle_core::bail!("segments in one pass have batch 1 each");
    }
    if args.iter().any(|a| a.keep.is_some()) {
        candle_core::bail!("keeping some rows is for a single segment");
    }
    let h = h.contiguous()?;
    let ctxs = args.iter().map(LayerCtx::new).collect::<Result<Vec<_>>>()?;
    let views = ctxs.iter().map(CtxView::new).collect::<Result<Vec<_>>>()?;
    let inputs: Vec<kernels::LayerInput> =
        ctxs.iter().zip(&views).map(|(c, v)| v.input(c)).collect();
    let (out, kvs) = {
        let hv = view(&h)?;
        with_lora(parts, |kp| {
            l.with(|w| kernels::layer_forward_segments(hv.s(), w, &inputs, kp))
        })??
    };
    let dev = candle_core::Device::Cpu;
    let kvs = kvs
        .into_iter()
        .zip(args)
        .map(|((k, v), a)| {
            let (hk, d) = (a.heads.kv_heads, a.heads.head_dim);
            let s = k.len() / (hk * d);
            Ok((
                Tensor::from_vec(k, (1, hk, s, d), &dev)?,
                Tensor::from_vec(v, (1, hk, s, d), &dev)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::from_vec(out, h.shape().clone(), &dev)?, kvs))
}

/// A ViT encoder layer's weights, for [`vit_layer`]: (transposed weight `(in, out)`,
/// bias) pairs and (weight, bias, eps) norms; q, k, v stacked.
pub struct VitLayer<'a> {
    pub ln1: (&'a Tensor, &'a Tensor, f32),
    pub qkv: (&'a FrozenWeight, &'a Tensor),
    /// The key and value rows of `qkv`'s weight packed on their own, for a last layer
    /// whose packed `qkv` cannot be read by columns: with `cls_only`, the queries then
    /// come from the CLS rows alone.
    pub kv: Option<&'a FrozenWeight>,
    pub o: (&'a FrozenWeight, Option<&'a Tensor>),
    pub ln2: (&'a Tensor, &'a Tensor, f32),
    pub fc1: (&'a FrozenWeight, Option<&'a Tensor>),
    pub fc2: (&'a FrozenWeight, Option<&'a Tensor>),
    pub heads: usize,
}

/// A ViT's input stream `(b, 1 + np, d)` as one vector (CPU, f32): each image's CLS
/// token, then its `np` patches' embeddings `patches @ w + bias`, plus the position
/// embeddings; one product and one pass where candle's ops take five. `patches` `(b np,
/// c p p)`, `w` the patch weight, `cls` `(1, 1, d)`, `pos` `(1, 1 + np, d)`.
pub fn vit_embed(
    patches: &Tensor,
    w: &FrozenWeight,
    bias: &Tensor,
    cls: &Tensor,
    pos: &Tensor,
    b: usize,
) -> Result<Vec<f32>> {
    let (rows, k) = patches.dims2()?;
    let d = w.out_dim()?;
    let k_w = w.in_dim()?;
    if k_w != k {
        candle_core::bail!("patch width {k}, patch weight input size {k_w}");
    }
    if b == 0 {
        return Ok(Vec::new());
    }
    if rows % b != 0 {
        candle_core::bail!("{rows} patch rows for {b} images");
    }
    let np = rows / b;
    let t = np + 1;
    if bias.dims() != [d] || cls.elem_count() != d || pos.elem_count() != t * d {
        candle_core::bail!(
            "ViT embedding: bias {:?}, cls {:?}, positions {:?} for width {d} and {t} rows",
            bias.dims(),
            cls.dims(),
            pos.dims()
        );
    }
    frozen_weight!(w, w_view, wk);
    let (pv, bv) = (view(patches)?, view(bias)?);
    let e = kernels::linear_w(pv.s(), wk, Some(bv.s()), rows, k, d);
    drop(w_view);
    let (cv, posv) = (view(cls)?, view(pos)?);
    Ok(kernels::vit_tokens(&e, cv.s(), posv.s(), b, np, d))
}

/// One pre-norm ViT encoder layer (inference, CPU, f32) on the residual stream `x`
/// `(b, t, d)` (updated in place and returned): one GEMM for q, k, v, the blocked
/// attention kernel (no mask, no rotation), the output and MLP products accumulated
/// onto the stream, and the fc1 bias folded into the exact-erf GELU's pass. With
/// `cls_only` (the last layer, when only the CLS vector is wanted) every row still gives
/// its key and value, but only each image's first row goes on through attention's query,
/// the output projection and the MLP: the result is `(b, 1, d)`, and all the layer's
/// products but the keys' and values' are skipped (the queries' of the other rows too:
/// on a plain copy its columns are read apart; a packed q/k/v weight cannot be, so it
/// needs [`VitLayer::kv`], else it makes every row's queries).
///
/// The output and fc2 biases are not written into the stream: they are added to `shift`
/// `(d)`, which every row of the stream lacks and the norms add as they read it (the
/// caller adds it once at the end). Two passes over the stream per layer fewer.
pub fn vit_layer(
    mut x: Vec<f32>,
    shift: &mut [f32],
    (b, t, d): (usize, usize, usize),
    l: &VitLayer,
    cls_only: bool,
) -> Result<Vec<f32>> {
    if shift.len() != d {
        candle_core::bail!("ViT layer: shift of {} for width {d}", shift.len());
    }
    let h = l.heads;
    let hd = d / h;
    frozen_weight!(l.qkv.0, qkv_view, w_qkv);
    frozen_weight!(l.o.0, o_view, w_o);
    frozen_weight!(l.fc1.0, fc1_view, w_fc1);
    frozen_weight!(l.fc2.0, fc2_view, w_fc2);
    let inter = l.fc1.0.out_dim()?;
    let norm = |x: &[f32], shift: &[f32], (w, bias, eps): (&Tensor, &Tensor, f32)| {
        let (w, bias) = (view(w)?, view(bias)?);
        let shift = shift.iter().any(|&v| v != 0.0).then_some(shift);
        Ok::<_, candle_core::Error>(kernels::layer_norm_shifted(
            x,
            shift,
            w.s(),
            bias.s(),
            eps,
            d,
        ))
    };
    let n1 = norm(&x, shift, l.ln1)?;
    let hs = Heads {
        batch: b,
        heads: h,
        kv_heads: h,
        head_dim: hd,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let bias = view(l.qkv.1)?;
    if bias.s().len() != 3 * d {
        candle_core::bail!("ViT layer: q/k/v bias of {} for width {d}", bias.s().len());
    }
    // Attention reads q, k and v where the products wrote them (no split into heads).
    // The rows that go on are all of them, or each image's first: then (on the copy,
    // whose columns can be read apart, or with the keys' and values' weight packed on its
    // own) queries for those rows alone, keys and values for all.
    // The query buffer, a separate key/value buffer (or none: the same), where each
    // operand's rows lie, and the query rows per image.
    let (q, kv, rows, tq) = match (cls_only, w_qkv) {
        (true, kernels::Weight::T(w)) => {
            x = kernels::gather_rows(&x, b, t, &[0], d);
            let n1_cls = kernels::gather_rows(&n1, b, t, &[0], d);
            let q = kernels::linear_cols(&n1_cls, w, 0..d, Some(bias.s()), b, d, 3 * d);
            let kv = kernels::linear_cols(&n1, w, d..3 * d, Some(bias.s()), b * t, d, 3 * d);
            let kv_rows = |which| kernels::Rows::fused(which, 0, h, t, hd);
            let rows = [kernels::Rows::split(h, 1, hd), kv_rows(1), kv_rows(2)];
            (q, Some(kv), rows, 1)
        }
        (true, w @ kernels::Weight::Packed { .. }) if l.kv.is_some_and(|kv| kv.is_packed()) => {
            let Some(FrozenWeight::Packed(kv_w, _)) = l.kv else {
                unreachable!("checked above")
            };
            if kv_w.shape() != (d, 2 * d) {
                candle_core::bail!(
                    "ViT layer: key/value weight {:?} for width {d}",
                    kv_w.shape()
                );
            }
            x = kernels::gather_rows(&x, b, t, &[0], d);
            // q, k, v of the CLS rows (k and v unused), then keys and values of all rows.
            let n1_cls = kernels::gather_rows(&n1, b, t, &[0], d);
            let q = kernels::linear_w(&n1_cls, w, Some(bias.s()), b, d, 3 * d);
            let kv_w = kernels::Weight::Packed {
                packed: kv_w,
                w: None,
            };
            let kv = kernels::linear_w(&n1, kv_w, Some(&bias.s()[d..]), b * t, d, 2 * d);
            let kv_rows = |which| kernels::Rows::fused(which, 0, h, t, hd);
            let rows = [kernels::Rows::fused(0, h, h, 1, hd), kv_rows(1), kv_rows(2)];
            (q, Some(kv), rows, 1)
        }
        (cls_only, w) => {
            let qkv = kernels::linear_w(&n1, w, Some(bias.s()), b * t, d, 3 * d);
            let tq = if cls_only {
                x = kernels::gather_rows(&x, b, t, &[0], d);
                1
            } else {
                t
            };
            let rows = |which| kernels::Rows::fused(which, h, h, t, hd);
            (qkv, None, [rows(0), rows(1), rows(2)], tq)
        }
    };
    drop(n1);
    let kvb = kv.as_deref().unwrap_or(&q);
    let (att, _) = kernels::attention_rows(
        (&q, rows[0]),
        (kvb, rows[1]),
        (kvb, rows[2]),
        None,
        hs,
        tq,
        t,
        scale,
    );
    drop((q, kv));
    let n = b * tq;
    // `y += x @ w`, and the bias into `shift`.
    let acc = |y: &mut [f32], shift: &mut [f32], x: &[f32], w, bias: Option<&Tensor>, k| {
        kernels::linear_acc_w(y, x, w, None, n, k, d);
        if let Some(b) = bias {
            let b = view(b)?;
            if b.s().len() != d {
                candle_core::bail!("ViT layer: bias of {} for width {d}", b.s().len());
            }
            shift.iter_mut().zip(b.s()).for_each(|(s, b)| *s += b);
        }
        Ok::<_, candle_core::Error>(())
    };
    acc(&mut x, shift, &att, w_o, l.o.1, d)?;
    drop(att);
    let n2 = norm(&x, shift, l.ln2)?;
    let f = match l.fc1.1 {
        Some(b1) => kernels::linear_gelu_w(&n2, w_fc1, view(b1)?.s(), n, d, inter),
        None => {
            let mut f = kernels::linear_w(&n2, w_fc1, None, n, d, inter);
            kernels::gelu_erf(&mut f);
            f
        }
    };
    drop(n2);
    acc(&mut x, shift, &f, w_fc2, l.fc2.1, inter)?;
    drop((qkv_view, o_view, fc1_view, fc2_view));
    Ok(x)
}

/// `silu(gate) * up` from the fused gate/up product `gu` `(n, 2i)`, with its backward
/// (CPU, f32).
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let gu = gu.contiguous()?;
    let (n, i2) = gu.dims2()?;
    let i = i2 / 2;
    let y = kernels::swiglu(view(&gu)?.s(), n, i);
    let gd = gu.detach();
    output("fused-swiglu", &gu, y, (n, i).into(), move || {
        Box::new(move |_, dy| {
            let dy = dy.contiguous()?;
            let g = kernels::swiglu_grad(view(&gd)?.s(), view(&dy)?.s(), n, i);
            Tensor::from_vec(g, (n, 2 * i), &candle_core::Device::Cpu)
        })
    })
}

/// Additive causal mask `(t, past + t)` for `t` new positions after `past` cached ones.
pub fn causal_mask(t: usize, past: usize, dev: &Device, dtype: DType) -> Result<Tensor> {
    let s = past + t;
    let v: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(v, (t, s), dev)?.to_dtype(dtype)
}

/// Additive mask from a boolean "may attend" matrix `(t, s)`.
pub fn mask_from_allowed(allowed: &[Vec<bool>], dev: &Device, dtype: DType) -> Result<Tensor> {
    let t = allowed.len();
    let s = allowed.first().map(|r| r.len()).unwrap_or(0);
    let v: Vec<f32> = allowed
        .iter()
        .flat_map(|r| r.iter().map(|&a| if a { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(v, (t, s), dev)?.to_dtype(dtype)
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
        for be in [Backend::Kernels, Backend::Candle] {
            check(
                rms_norm(be, x.as_tensor(), &w, 1e-5)?,
                candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5)?,
            )?;
        }
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
        let mask = causal_mask(t, past, &dev, candle_core::DType::F32)?;
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
        for be in [Backend::Kernels, Backend::Candle] {
            let fast = matmul_t(be, a.as_tensor(), &wm)?;
            let plain = a.as_tensor().matmul(&wv.as_tensor().t()?)?;
            close(&fast, &plain, 1e-6);
            let g = fast.sum_all()?.backward()?;
            let gp = plain.sum_all()?.backward()?;
            close(g.get(&a).unwrap(), gp.get(&a).unwrap(), 1e-5);
            assert!(g.get(&wm).is_none() && gp.get(&wv).is_some());
        }
        Ok(())
    }

    /// The fused attention op against the composite form (split, RoPE, scale, cache,
    /// softmax attention, transpose): values and the gradient of `qkv`, with two batch
    /// rows, grouped queries, a cached past, more rows than one kernel block, and a
    /// non-causal mask with a fully hidden key block.
    #[test]
    fn fused_attention_matches_composite_form() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, hk, d, t, p) = (2, 4, 2, 8, 70, 5);
        let s = p + t;
        let hs = Heads {
            batch: b,
            heads: h,
            kv_heads: hk,
            head_dim: d,
        };
        let w = hs.width();
        let qkv = Var::from_vec(seq(b * t * w, 0.173), (b * t, w), &dev)?;
        let pk = Tensor::from_vec(seq(b * hk * p * d, 0.31), (b, hk, p, d), &dev)?;
        let pv = Tensor::from_vec(seq(b * hk * p * d, 0.47), (b, hk, p, d), &dev)?;
        let cos = Tensor::from_vec(seq(t * d / 2, 0.21), (t, d / 2), &dev)?.cos()?;
        let sin = Tensor::from_vec(seq(t * d / 2, 0.21), (t, d / 2), &dev)?.sin()?;
        // Causal over the past, except that rows 10.. also see one later column and the
        // last key column is hidden from everyone.
        let m: Vec<f32> = (0..t * s)
            .map(|i| {
                let (r, c) = (i / s, i % s);
                let seen = c <= p + r || (r >= 10 && c == p + r + 1);
                if seen && c != s - 1 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (t, s), &dev)?;
        let scale = 0.35f32;
        let past = (pk.clone(), pv.clone());
        let (fast, kf, vf) = attend(
            qkv.as_tensor(),
            &AttendArgs {
                heads: hs,
                t,
                cos: &cos,
                sin: &sin,
                scale,
                past: Some(&past),
                mask: Some(&mask),
                grad_from: 0,
                keep: None,
            },
        )?;
        // Composite form.
        let x = qkv.as_tensor();
        let part = |off: usize, n: usize| -> Result<Tensor> {
            x.narrow(1, off * d, n * d)?
                .reshape((b, t, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (candle_nn::rotary_emb::rope_slow(&part(0, h)?, &cos, &sin)? * scale as f64)?;
        let k = candle_nn::rotary_emb::rope_slow(&part(h, hk)?, &cos, &sin)?;
        let k = Tensor::cat(&[&pk, &k], 2)?;
        let v = Tensor::cat(&[&pv, &part(h + hk, hk)?], 2)?;
        let q = q.reshape((b, hk, (h / hk) * t, d))?;
        let sc = q.matmul(&k.t()?)?.reshape((b, hk, h / hk, t, s))?;
        let pr = candle_nn::ops::softmax(&sc.broadcast_add(&mask)?, D::Minus1)?;
        let slow = pr
            .reshape((b, hk, (h / hk) * t, s))?
            .matmul(&v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, h * d))?;
        close(&fast, &slow, 1e-5);
        close(&kf, &k, 1e-5);
        close(&vf, &v, 1e-6);
        let c = Tensor::from_vec(seq(b * t * h * d, 0.07), (b * t, h * d), &dev)?;
        let gf = (fast * &c)?.sum_all()?.backward()?;
        let gs = (slow * &c)?.sum_all()?.backward()?;
        close(gf.get(&qkv).unwrap(), gs.get(&qkv).unwrap(), 1e-4);
        // SwiGLU.
        let gu = Var::from_vec(seq(6 * 40, 0.61), (6, 40), &dev)?;
        let fast = swiglu(gu.as_tensor())?;
        let (g, u) = (
            gu.as_tensor().narrow(1, 0, 20)?,
            gu.as_tensor().narrow(1, 20, 20)?,
        );
        let slow = (candle_nn::ops::silu(&g)? * u)?;
        close(&fast, &slow, 1e-5);
        let c = Tensor::from_vec(seq(6 * 20, 0.3), (6, 20), &dev)?;
        let gf = (fast * &c)?.sum_all()?.backward()?;
        let gs = (slow * &c)?.sum_all()?.backward()?;
        close(gf.get(&gu).unwrap(), gs.get(&gu).unwrap(), 1e-5);
        Ok(())
    }
}
