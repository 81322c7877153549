//! Fused f32 CPU kernels for the LLM's and the ViT's hot paths, on plain slices; no
//! candle, no tensors.
//!
//! candle's CPU backend spends as long around the GEMMs as in them: every matmul output
//! is zero-filled before the GEMM overwrites it, `exp` is scalar libm, and transposes,
//! narrows and mask additions are separate passes over memory. These kernels do each
//! step of a layer in one parallel pass: the q/k/v split with RoPE ([`rope`]), a blocked
//! causal attention that skips masked-out key blocks and writes its output already
//! transposed ([`attention`]), SwiGLU ([`activation`]), norms ([`norm`]), GEMMs
//! ([`gemm`]), the whole decoder layer ([`layer`]), and their input-only backwards.
//! farcer's model code wraps them as tensor ops for f32 on the CPU and runs candle's
//! ops for every other device and dtype.

#[macro_use]
mod util;
pub mod activation;
pub mod attention;
pub mod blas;
pub mod gemm;
pub mod layer;
mod math;
pub mod norm;
pub mod profile;
pub mod rope;

pub use activation::{gelu_erf, swiglu, swiglu_grad};
pub use attention::{attention, attention_grad};
pub use gemm::{linear, linear_acc, linear_gelu, matmul_nn, matmul_nt};
pub use layer::{
    gather_rows, layer_backward, layer_forward, layer_forward_segments, LayerInput, LayerOutput,
    LayerSaved, LayerWeights, LoraPart, LoraSaved, SegmentKv, Site,
};
pub use norm::{layer_norm, rms_norm, rms_norm_grad};
pub use rope::{split_rope, split_rope_grad, Heads};

#[cfg(test)]
mod tests {
    use crate::attention::exp_shift_sum;
    use crate::math::exp_approx;
    use crate::*;

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
