//! Frozen weights packed once by MKL (`cblas_sgemm_pack`) for the forward products of
//! the ViT and the LLM's fused layers: the packed products against a plain f64 product
//! and against the same library on the plain copy, the pretrained ViT on packed weights
//! against its reference outputs (transformers'), and the fused decoder layers against
//! candle's op-by-op path. The suite's process sends every product to MKL
//! (`FARCER_GEMM=mkl`), so the models pack their weights at load.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use farcer::vision::VisionEncoder;
use farcer_kernels::{blas, linear_acc_w, linear_gelu_w, linear_w, PackedB, Weight};

/// Values that make a wrong index or a missed row visible.
fn fill(len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7 + salt * 13) % 101) as f32 - 50.0) * 0.01)
        .collect()
}

fn erf64(x: f64) -> f64 {
    // Maclaurin series, enough terms for the |x| < 3 the values here reach.
    let (mut term, mut sum) = (x, x);
    for n in 1..200 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// Packed from `(in, out)` and from `(out, in)` (transposed), over 1 to 1000 rows on 8
/// threads (fewer rows than threads read the original instead, where it is given; more
/// split into up to 8 row blocks, the last one short): `x w (+ bias)`, `y += x w + bias` and
/// `gelu(x w + bias)` equal an f64 product to 1e-5 of its scale (GELU's 2e-6 added), and
/// the library's product on the plain copy to 1e-5.
fn packed_products_equal_a_plain_product() {
    let lib = blas::packing().expect("the suite sends every product to MKL");
    for (k, m) in [(129, 70), (384, 40)] {
        let wt = fill(k * m, 2);
        let w: Vec<f32> = (0..m * k).map(|i| wt[(i % k) * m + i / k]).collect();
        let bias = fill(m, 3);
        for (transposed, src) in [(false, &wt), (true, &w)] {
            let p = PackedB::new(lib, src, transposed, k, m).expect("MKL packs");
            assert_eq!(p.shape(), (k, m));
            let rows = (1..=17).chain([63, 64, 65, 300, 1000]);
            for n in rows {
                let x = fill(n * k, 1);
                let y0 = fill(n * m, 4);
                let mut want = vec![0f64; n * m];
                for i in 0..n {
                    for j in 0..m {
                        let mut s = bias[j] as f64;
                        for q in 0..k {
                            s += x[i * k + q] as f64 * wt[q * m + j] as f64;
                        }
                        want[i * m + j] = s;
                    }
                }
                let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
                let close = |got: &[f32], want: &dyn Fn(usize) -> f64, tol: f64, what: &str| {
                    for (i, g) in got.iter().enumerate() {
                        let e = (*g as f64 - want(i)).abs() / scale;
                        assert!(
                            e < tol,
                            "{what} (k {k}, m {m}, n {n}, transposed {transposed}) at {i}: {e}"
                        );
                    }
                };
                // With the original beside it (few rows read that), and without.
                for orig in [Some(&w[..]), None] {
                    let packed = Weight::Packed {
                        packed: &p,
                        w: orig,
                    };
                    let plain = linear_w(&x, Weight::T(&wt), Some(&bias), n, k, m);
                    let got = linear_w(&x, packed, Some(&bias), n, k, m);
                    close(&got, &|i| want[i], 1e-5, "x w + b");
                    close(&got, &|i| plain[i] as f64, 1e-5, "x w + b against the copy");
                    let got = linear_w(&x, packed, None, n, k, m);
                    close(&got, &|i| want[i] - bias[i % m] as f64, 1e-5, "x w");
                    let mut acc = y0.clone();
                    linear_acc_w(&mut acc, &x, packed, Some(&bias), n, k, m);
                    close(&acc, &|i| y0[i] as f64 + want[i], 1e-5, "y += x w + b");
                    let g = linear_gelu_w(&x, packed, &bias, n, k, m);
                    let gelu = |v: f64| 0.5 * v * (1.0 + erf64(v / std::f64::consts::SQRT_2));
                    close(&g, &|i| gelu(want[i]), 1e-5 + 2e-6, "gelu(x w + b)");
                }
            }
        }
    }
}

/// DINOv2-small with packed weights: the last hidden state and the CLS vectors (whose
/// last layer carries only the CLS rows past its keys and values) within 1e-4 of
/// transformers', as on the plain copies (tests/vision.rs).
fn pretrained_vit_on_packed_weights_matches_its_reference_outputs() {
    let Some(dir) = shared("models/vit-small-dinov2") else {
        return;
    };
    let enc = VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, true).unwrap();
    assert!(enc.vit.packed(), "the ViT reads packed weights under MKL");
    assert_matches_dinov2_reference(&enc, &dir);
}

/// The fused decoder layers on packed weights (forward, cached prefix, training with
/// adapters, input and adapter gradients) agree with candle's op-by-op path within
/// selftest's f32 tolerance.
fn model_kernels_on_packed_weights_match_candle() {
    let w = Tensor::randn(0f32, 1.0, (48, 32), &Device::Cpu).unwrap();
    let fw = farcer::model::frozen::FrozenWeight::new(&w, true).unwrap();
    assert!(fw.is_packed(), "frozen weights are packed under MKL");
    assert_eq!(fw.out_dim().unwrap(), 48);
    let r = farcer::selftest::run(&Device::Cpu, DType::F32).unwrap();
    assert!(r.passed(), "{:?}", r.checks);
}

fn main() -> std::process::ExitCode {
    // SAFETY (set_var): no other thread runs yet. Eight threads, so products split many
    // ways and the few-row fallback is reached on any machine.
    std::env::set_var("FARCER_GEMM", "mkl");
    std::env::set_var("RAYON_NUM_THREADS", "8");
    let mkl = farcer::gemm::choose_from_env(&|_| {}).is_ok();
    let available = move || mkl;
    let what = "MKL (scripts/setup installs it on x86-64)";
    common::harness::main(tests![
        packed_products_equal_a_plain_product.needs(what, available),
        model_kernels_on_packed_weights_match_candle.needs(what, available),
        pretrained_vit_on_packed_weights_matches_its_reference_outputs
            .needs(what, available)
            .needs_shared("models/vit-small-dinov2"),
    ])
}
