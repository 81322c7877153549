//! Matmul against a frozen weight that records only the input's gradient.
//!
//! candle's `matmul` backward always computes both operands' gradients, so a frozen
//! `x @ W^T` would still pay for `dW = x^T dy` (as large as the forward) and keep it in
//! memory. This op computes the product without a graph, then attaches a backward that
//! returns `dx = dy W` only. The product is moved out of the op on the forward call, so the
//! graph does not keep a second copy of it.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

struct FrozenMatmul {
    /// `(out, in)`: the frozen weight, for the backward pass.
    w: Tensor,
    /// The product, computed without a graph; taken by the forward call.
    y: Mutex<Option<Tensor>>,
}

impl FrozenMatmul {
    fn take(&self) -> Result<Tensor> {
        self.y
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-matmul lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul forward ran twice".into()))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) if l.is_contiguous() && l.start_offset() == 0 => {
                use candle_core::backend::BackendStorage;
                Ok((c.try_clone(l)?, l.shape().clone()))
            }
            _ => candle_core::bail!("frozen-matmul: unexpected storage for the product"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) if l.is_contiguous() && l.start_offset() == 0 => {
                use candle_core::backend::BackendStorage;
                Ok((c.try_clone(l)?, l.shape().clone()))
            }
            _ => candle_core::bail!("frozen-matmul: unexpected storage for the product"),
        }
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Metal(c) if l.is_contiguous() && l.start_offset() == 0 => {
                use candle_core::backend::BackendStorage;
                Ok((c.try_clone(l)?, l.shape().clone()))
            }
            _ => candle_core::bail!("frozen-matmul: unexpected storage for the product"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x @ w^T` for a 2-D `x` of shape `(n, in)` and a frozen `w` of shape `(out, in)`.
/// With no graph to record (inference), this is a plain matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?.contiguous()?;
    x.apply_op1(FrozenMatmul {
        w: w.clone(),
        y: Mutex::new(Some(y)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_value_and_input_gradient_as_plain_matmul_and_no_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            (3, 4),
            &dev,
        )?;
        let w = Tensor::from_vec(
            (0..20).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
            (5, 4),
            &dev,
        )?;
        let wv = Var::from_tensor(&w)?;
        let fast = matmul_t(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&wv.as_tensor().t()?)?;
        let d = (&fast - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        // A loss that weights outputs differently so the gradient is not trivial.
        let c = Tensor::from_vec(
            (0..15).map(|i| i as f32 - 7.0).collect::<Vec<_>>(),
            (3, 5),
            &dev,
        )?;
        let g_fast = (fast * &c)?.sum_all()?.backward()?;
        let g_plain = (plain * &c)?.sum_all()?.backward()?;
        let a = g_fast.get(&x).unwrap();
        let b = g_plain.get(&x).unwrap();
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        assert!(
            g_plain.get(&wv).is_some(),
            "plain matmul computes a weight gradient"
        );
        assert!(g_fast.get(&w).is_none(), "frozen matmul must not");
        Ok(())
    }
}
