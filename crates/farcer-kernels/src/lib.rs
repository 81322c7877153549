//! Fused f32 CPU kernels for the LLM's and the ViT's hot paths, on plain slices; no
//! candle, no tensors.
//!
//! candle's CPU backend spends as long around the GEMMs as in them: every matmul output
//! is zero-filled before the GEMM overwrites it, `exp` is scalar libm, and transposes,
//! narrows and mask additions are separate passes over memory. These kernels do each
//! step of a layer in one parallel pass: the q/k/v split with RoPE ([`rope`]), a blocked
//! causal attention that skips masked-out key blocks and writes its output already
//! transposed ([`attention`]), SwiGLU ([`activation`]), norms ([`norm`]), GEMMs
//! ([`gemm`]), the whole decoder layer ([`layer`]), products with a weight kept in
//! GGUF's Q8_0 blocks ([`quant`]), and their input-only backwards.
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
pub mod quant;
pub mod rope;
#[cfg(target_arch = "x86_64")]
mod tiled;

pub use activation::{bias_gelu_rows, gelu_erf, swiglu, swiglu_grad};
pub use attention::{attention, attention_grad, attention_rows, Rows};
pub use blas::PackedB;
pub use gemm::{
    linear, linear_acc, linear_acc_w, linear_cols, linear_frozen, linear_gelu, linear_gelu_w,
    linear_w, matmul_nn, matmul_nt, Weight,
};
pub use layer::{
    gather_rows, layer_backward, layer_forward, layer_forward_segments, vit_tokens, LayerInput,
    LayerOutput, LayerSaved, LayerWeights, LoraPart, LoraSaved, SegmentKv, Site,
};
pub use norm::{layer_norm, layer_norm_shifted, rms_norm, rms_norm_grad};
pub use quant::{q8_matmul_nn, q8_matmul_nt, Q8Matrix};
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
            // Both builds: with fused multiply-adds and without.
            for a in [exp_approx::<true>(x), exp_approx::<false>(x)] {
                let e = x.exp();
                worst = worst.max(((a - e) / e).abs());
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
        for fma in [exp_approx::<true>, exp_approx::<false>] {
            assert_eq!(fma(f32::NEG_INFINITY), 0.0);
            assert_eq!(fma(-100.0), 0.0);
        }
        let mut row = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let sum = exp_shift_sum(&mut row, 2.0, 1.0);
        let want: f32 = [-1f32, 0.0, -1.5].iter().map(|x| x.exp()).sum();
        assert!((sum - want).abs() < 1e-6 && row[2] == 0.0);
        // With a scale, on the shifted scores.
        let mut row = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let sum = exp_shift_sum(&mut row, 2.0, 0.125);
        let want: f32 = [-0.125f32, 0.0, -0.1875].iter().map(|x| x.exp()).sum();
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
            // The erf of both builds (with and without fused multiply-adds) directly.
            for erf in [
                crate::math::erf_approx::<true>,
                crate::math::erf_approx::<false>,
            ] {
                let g = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                worst = worst.max((g as f64 - want).abs());
            }
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

    /// Attention read straight from a fused q/k/v product, scaled in the softmax, against
    /// softmax(q k^T / sqrt(d)) v in f64, written out here: without grouping (a ViT's)
    /// and with two query heads per key head; all query rows (more than one block) and
    /// each image's first row only. Heads of 64 values run the AVX-512 tiles where the
    /// CPU has them: rows and keys around their tile (6) and panel (16, 64) sizes, and
    /// the ViTs' 197 and 257 tokens.
    #[test]
    fn attention_on_a_fused_product_matches_the_plain_form() {
        for (h, hk, t, d) in [
            (3, 3, 70, 8),
            (4, 2, 70, 8),
            (2, 2, 5, 64),
            (2, 2, 6, 64),
            (2, 2, 7, 64),
            (2, 1, 16, 64),
            (2, 2, 17, 64),
            (2, 2, 40, 64),
            (2, 2, 64, 64),
            (4, 2, 65, 64),
            (2, 1, 100, 64),
            (3, 3, 197, 64),
            (2, 2, 257, 64),
        ] {
            fused_attention_case(h, hk, t, d);
        }
    }

    /// `softmax(scale q k^T) v` for one query row over `s` keys of `d` values, in f64
    /// (`q(c)`, `k(j, c)`, `v(j, c)`), and the row's log-sum-exp.
    fn plain_attention_row(
        s: usize,
        d: usize,
        scale: f64,
        q: impl Fn(usize) -> f64,
        k: impl Fn(usize, usize) -> f64,
        v: impl Fn(usize, usize) -> f64,
    ) -> (Vec<f64>, f64) {
        let sc: Vec<f64> = (0..s)
            .map(|j| (0..d).map(|c| q(c) * k(j, c)).sum::<f64>() * scale)
            .collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let o = (0..d)
            .map(|c| (0..s).map(|j| e[j] / z * v(j, c)).sum())
            .collect();
        (o, m + z.ln())
    }

    fn fused_attention_case(h: usize, hk: usize, t: usize, d: usize) {
        let b = 2;
        let w = (h + 2 * hk) * d;
        let qkv: Vec<f32> = (0..b * t * w)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 3.0)
            .collect();
        let hs = Heads {
            batch: b,
            heads: h,
            kv_heads: hk,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        // Value `c` of row `r` of image `bi` in query head `hi` (its key and value head
        // for `which` 1 and 2).
        let at = |bi: usize, r: usize, which: usize, hi: usize, c: usize| {
            let col = match which {
                0 => hi * d,
                1 => (h + hi / (h / hk)) * d,
                _ => (h + hk + hi / (h / hk)) * d,
            };
            qkv[(bi * t + r) * w + col + c] as f64
        };
        // Output row `r` of image `bi`, every head, `(h d)`, and each head's log-sum-exp.
        let plain = |bi: usize, r: usize| -> (Vec<f64>, Vec<f64>) {
            let mut o = Vec::with_capacity(h * d);
            let mut lse = Vec::with_capacity(h);
            for hi in 0..h {
                let (oh, l) = plain_attention_row(
                    t,
                    d,
                    scale as f64,
                    |c| at(bi, r, 0, hi, c),
                    |j, c| at(bi, j, 1, hi, c),
                    |j, c| at(bi, j, 2, hi, c),
                );
                o.extend(oh);
                lse.push(l);
            }
            (o, lse)
        };
        let rows = |which| Rows::fused(which, h, hk, t, d);
        for (tq, picked) in [(t, (0..t).collect::<Vec<_>>()), (1, vec![0])] {
            let (out, lse) = attention_rows(
                (&qkv, rows(0)),
                (&qkv, rows(1)),
                (&qkv, rows(2)),
                None,
                hs,
                tq,
                t,
                scale,
            );
            assert_eq!((out.len(), lse.len()), (b * tq * h * d, b * h * tq));
            let mut worst = 0f64;
            for bi in 0..b {
                for (i, &r) in picked.iter().enumerate() {
                    let (want, want_lse) = plain(bi, r);
                    let got = &out[(bi * tq + i) * h * d..][..h * d];
                    for (g, w) in got.iter().zip(&want) {
                        worst = worst.max((*g as f64 - w).abs());
                    }
                    for (hi, w) in want_lse.iter().enumerate() {
                        let g = lse[(bi * h + hi) * tq + i] as f64;
                        worst = worst.max((g - w).abs());
                    }
                }
            }
            assert!(
                worst < 1e-5,
                "({h}, {hk}) heads of {d}, {tq} of {t} query rows: max abs error {worst}"
            );
        }
    }

    /// Unmasked attention over split heads with fewer or more keys than queries, and
    /// with one head in all (its rows then split into chunks, each packing the head
    /// again), against the f64 form: the AVX-512 tiles where the CPU has them.
    #[test]
    fn unmasked_attention_with_other_key_counts_matches_the_plain_form() {
        #[cfg(target_arch = "x86_64")]
        let tiles = crate::tiled::available(64);
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
        if !tiles {
            eprintln!("no AVX-512 here: this runs the blocked path, not the tiles");
        }
        let d = 64;
        for (b, h, hk, t, s) in [
            (1, 1, 1, 6, 33),
            (1, 2, 1, 6, 1),
            (1, 1, 1, 70, 70),
            (2, 2, 2, 13, 100),
            (1, 3, 3, 200, 7),
        ] {
            let val = |i: usize, salt: usize| ((i * 31 + salt) % 97) as f32 / 97.0 - 0.5;
            let q: Vec<f32> = (0..b * h * t * d).map(|i| val(i, 3) * 0.4).collect();
            let k: Vec<f32> = (0..b * hk * s * d).map(|i| val(i, 11) * 2.0).collect();
            let v: Vec<f32> = (0..b * hk * s * d).map(|i| val(i, 29)).collect();
            let hs = Heads {
                batch: b,
                heads: h,
                kv_heads: hk,
                head_dim: d,
            };
            let (out, lse) = attention(&q, &k, &v, None, hs, t, s);
            let mut worst = 0f64;
            for bi in 0..b {
                for hi in 0..h {
                    let kh = bi * hk + hi / (h / hk);
                    for r in 0..t {
                        let (want, want_lse) = plain_attention_row(
                            s,
                            d,
                            1.0,
                            |c| q[((bi * h + hi) * t + r) * d + c] as f64,
                            |j, c| k[(kh * s + j) * d + c] as f64,
                            |j, c| v[(kh * s + j) * d + c] as f64,
                        );
                        let got_lse = lse[(bi * h + hi) * t + r] as f64;
                        worst = worst.max((got_lse - want_lse).abs());
                        let got = &out[(bi * t + r) * h * d + hi * d..][..d];
                        for (g, w) in got.iter().zip(&want) {
                            worst = worst.max((*g as f64 - w).abs());
                        }
                    }
                }
            }
            assert!(
                worst < 1e-5,
                "({b}, {h}, {hk}) heads, {t} queries over {s} keys: max abs error {worst}"
            );
        }
    }

    /// A LayerNorm that adds a shift as it reads each row gives the norm of the shifted
    /// rows, against the f64 form written out here, at widths around the 16-value lanes
    /// and with a large mean (the shift of a residual stream's carried biases).
    #[test]
    fn shifted_layer_norm_is_the_norm_of_the_shifted_rows() {
        for dim in [1, 15, 16, 17, 384] {
            let n = 5;
            let x: Vec<f32> = (0..n * dim)
                .map(|i| ((i * 29 % 53) as f32 - 26.0) * 0.1)
                .collect();
            let sh: Vec<f32> = (0..dim).map(|c| 40.0 + (c % 7) as f32 * 0.3).collect();
            let w: Vec<f32> = (0..dim).map(|c| 0.5 + (c % 5) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..dim).map(|c| (c % 3) as f32 * 0.2 - 0.2).collect();
            let eps = 1e-6;
            for shift in [None, Some(&sh[..])] {
                let y = layer_norm_shifted(&x, shift, &w, &b, eps, dim);
                for r in 0..n {
                    let v: Vec<f64> = (0..dim)
                        .map(|c| x[r * dim + c] as f64 + shift.map_or(0.0, |s| s[c] as f64))
                        .collect();
                    let mean = v.iter().sum::<f64>() / dim as f64;
                    let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / dim as f64;
                    for c in 0..dim {
                        let want =
                            (v[c] - mean) / (var + eps as f64).sqrt() * w[c] as f64 + b[c] as f64;
                        let got = y[r * dim + c] as f64;
                        assert!(
                            (got - want).abs() < 2e-5,
                            "dim {dim}, row {r}, col {c}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    /// Operands that do not fit their layout are refused before any is read.
    #[test]
    #[should_panic(expected = "values out of bounds")]
    fn attention_refuses_operands_shorter_than_their_layout() {
        let (h, t, d) = (2, 5, 4);
        let hs = Heads {
            batch: 1,
            heads: h,
            kv_heads: h,
            head_dim: d,
        };
        let qkv = vec![0.5f32; t * 3 * h * d];
        let rows = |which| Rows::fused(which, h, h, t, d);
        attention_rows(
            (&qkv, rows(0)),
            (&qkv, rows(1)),
            (&qkv[..qkv.len() - 1], rows(2)),
            None,
            hs,
            t,
            t,
            0.5,
        );
    }
}
