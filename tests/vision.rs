//! The ViT against transformers (a tiny random checkpoint) and against the real
//! pretrained DINOv2-small's reference outputs; preprocessing against ViTImageProcessor.

mod common;
use candle_core::{DType, Device};
use common::*;
use farcer::vision::VisionEncoder;

fn tiny_vit_matches_transformers_before_and_after_the_final_norm() {
    let dir = fixture("tiny-vit");
    let f = load_safetensors("tiny-vit-outputs.safetensors");
    // On every path: the fused kernels, candle's op-by-op path (a GPU's) in f32 and in
    // bf16. Tolerance: f32 1e-4; bf16 3e-2 of the largest value.
    let kernels = VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, false).unwrap();
    let mut candle = VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, false).unwrap();
    candle.vit = candle.vit.with_backend(backend(false)).unwrap();
    let bf16 =
        VisionEncoder::load_as(dir.to_str().unwrap(), &Device::Cpu, DType::BF16, false).unwrap();
    assert_ne!(bf16.key, kernels.key, "bf16 vectors are cached apart");
    for (path, enc, tol) in [
        ("kernels f32", &kernels, 1e-4),
        ("candle f32", &candle, 1e-4),
        ("candle bf16", &bf16, 3e-2),
    ] {
        let px = f["pixels"].to_dtype(enc.vit.dtype()).unwrap();
        for (got, want) in [
            (
                enc.vit.last_hidden_before_norm(&px).unwrap(),
                "hidden_before_norm",
            ),
            (enc.vit.last_hidden_state(&px).unwrap(), "last_hidden_state"),
        ] {
            let got = got.to_dtype(DType::F32).unwrap();
            let d = max_abs_diff(&got, &f[want]) / max_abs(&f[want]).max(1.0);
            assert!(d <= tol, "{path} {want}: {d}");
        }
        // The CLS vectors, whose last layer carries only the CLS rows past its keys and
        // values, are row 0 of the full outputs, before and after the final norm.
        for (after_norm, want) in [(false, "hidden_before_norm"), (true, "last_hidden_state")] {
            let got = enc.vit.cls(&px, after_norm).unwrap();
            let got = got.to_dtype(DType::F32).unwrap();
            let want = f[want].narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
            let d = max_abs_diff(&got, &want) / max_abs(&want).max(1.0);
            assert!(d <= tol, "{path} CLS (after norm: {after_norm}): {d}");
        }
    }
}

fn preprocessing_follows_the_checkpoints_processor_config() {
    let enc =
        VisionEncoder::load(fixture("tiny-vit").to_str().unwrap(), &Device::Cpu, false).unwrap();
    let img = image::open(fixture("tiny-vit-image.png")).unwrap();
    let ours = enc.pixels(&img).unwrap();
    let theirs = &load_safetensors("tiny-vit-outputs.safetensors")["image_pixels"];
    assert_eq!(ours.dims(), theirs.dims());
    // PIL's and the image crate's bilinear (triangle) filters differ in rounding, not in
    // kind: mean difference under 1% of the value range, none over 5%.
    let diff = (&ours - theirs).unwrap().abs().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let max = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let range = 1.0 / 0.2;
    assert!(
        mean < 0.01 * range && max < 0.05 * range,
        "mean {mean} max {max}"
    );
}

fn real_pretrained_vit_matches_its_reference_outputs() {
    let Some(dir) = shared("models/vit-small-dinov2") else {
        return;
    };
    let enc = VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, true).unwrap();
    assert_matches_dinov2_reference(&enc, &dir);
    assert_eq!(enc.dim(), 384);
}

/// The demo's untrained ViT must still carry what its images show: a nearest-centroid
/// classifier on its CLS vectors (centroids from the demo's train images) names the label
/// of held-out demo images.
fn demo_images_are_separable_through_the_demo_vit() {
    let dir = std::env::temp_dir().join(format!("farcer-demo-vit-{}", std::process::id()));
    let enc = demo_vit(&dir.join("vit"), 0);
    let vectors = |split: &str| -> Vec<(usize, Vec<f32>)> {
        let mut d = farcer::data::demo::load(split);
        farcer::data::demo::attach_images(&mut d, &dir.join(split)).unwrap();
        let utts: Vec<_> = d
            .dialogues
            .iter()
            .flat_map(|x| x.utterances.iter())
            .collect();
        let imgs: Vec<_> = utts
            .iter()
            .map(|u| image::open(u.image.as_ref().unwrap()).unwrap())
            .collect();
        let v = enc.encode(&imgs).unwrap();
        utts.iter()
            .map(|u| {
                farcer::data::MELD_LABELS
                    .iter()
                    .position(|l| Some(*l) == u.label.as_deref())
                    .unwrap()
            })
            .zip(v)
            .collect()
    };
    let train = vectors("train");
    let dim = train[0].1.len();
    let mut cent = vec![vec![0f64; dim]; 7];
    let mut n = [0usize; 7];
    for (l, v) in &train {
        n[*l] += 1;
        for (c, x) in cent[*l].iter_mut().zip(v) {
            *c += *x as f64;
        }
    }
    for (c, k) in cent.iter_mut().zip(n) {
        c.iter_mut().for_each(|x| *x /= k.max(1) as f64);
    }
    let test = vectors("test");
    let correct = test
        .iter()
        .filter(|(l, v)| {
            let d = |c: &Vec<f64>| {
                c.iter()
                    .zip(v.iter())
                    .map(|(a, b)| (a - *b as f64).powi(2))
                    .sum::<f64>()
            };
            (0..7)
                .min_by(|&a, &b| d(&cent[a]).partial_cmp(&d(&cent[b])).unwrap())
                .unwrap()
                == *l
        })
        .count();
    let acc = correct as f64 / test.len() as f64;
    // How large the image-dependent part is against the vector's constant part.
    let mean: Vec<f64> = (0..dim)
        .map(|j| test.iter().map(|(_, v)| v[j] as f64).sum::<f64>() / test.len() as f64)
        .collect();
    let spread = (test
        .iter()
        .map(|(_, v)| {
            v.iter()
                .zip(&mean)
                .map(|(a, m)| (*a as f64 - m).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / test.len() as f64)
        .sqrt();
    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
    eprintln!("nearest-centroid accuracy {acc:.3}; spread {spread:.3} vs mean norm {norm:.3}");
    assert!(acc >= 0.9, "nearest-centroid accuracy {acc}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The fused CPU layers against candle's op-by-op path on a demo-shaped ViT (65 tokens: more
/// than one attention block).
fn fused_vit_layers_match_the_op_by_op_path() {
    let dir = std::env::temp_dir().join(format!("farcer-fused-vit-{}", std::process::id()));
    let enc = demo_vit(&dir, 3);
    let px = candle_core::Tensor::randn(0f32, 1.0, (3, 3, 64, 64), &Device::Cpu).unwrap();
    let fused = enc.vit.cls(&px, false).unwrap();
    let candle = enc.vit.with_backend(backend(false)).unwrap();
    let plain = candle.cls(&px, false).unwrap();
    let d = max_abs_diff(&fused, &plain);
    assert!(d <= 1e-4, "demo ViT: max difference {d}");
    std::fs::remove_dir_all(&dir).ok();
}

fn main() -> std::process::ExitCode {
    common::harness::main(tests![
        tiny_vit_matches_transformers_before_and_after_the_final_norm,
        preprocessing_follows_the_checkpoints_processor_config,
        real_pretrained_vit_matches_its_reference_outputs.needs_shared("models/vit-small-dinov2"),
        demo_images_are_separable_through_the_demo_vit,
        fused_vit_layers_match_the_op_by_op_path,
    ])
}
