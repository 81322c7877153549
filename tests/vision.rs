//! The ViT against transformers (a tiny random checkpoint) and against the real
//! pretrained DINOv2-small's reference outputs; preprocessing against ViTImageProcessor.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use farcer::vision::VisionEncoder;

#[test]
fn tiny_vit_matches_transformers_before_and_after_the_final_norm() {
    let enc =
        VisionEncoder::load(fixture("tiny-vit").to_str().unwrap(), &Device::Cpu, false).unwrap();
    let f = load_safetensors("tiny-vit-outputs.safetensors");
    let before = enc.vit.last_hidden_before_norm(&f["pixels"]).unwrap();
    let after = enc.vit.last_hidden_state(&f["pixels"]).unwrap();
    // Tolerance 1e-4, f32 on both sides.
    assert!(max_abs_diff(&before, &f["hidden_before_norm"]) <= 1e-4);
    assert!(max_abs_diff(&after, &f["last_hidden_state"]) <= 1e-4);
    let cls = enc.vit.cls(&f["pixels"], false).unwrap();
    assert!(
        max_abs_diff(
            &cls,
            &f["hidden_before_norm"]
                .narrow(1, 0, 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
        ) <= 1e-4
    );
}

#[test]
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

#[test]
fn real_pretrained_vit_matches_its_reference_outputs() {
    let Some(dir) = shared("models/vit-small-dinov2") else {
        return;
    };
    let enc = VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, true).unwrap();
    let px = Tensor::read_npy(dir.join("reference/pixel_values.npy"))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want = Tensor::read_npy(dir.join("reference/last_hidden_state.npy"))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let got = enc.vit.last_hidden_state(&px).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "max abs difference {d}");
    assert_eq!(enc.dim(), 384);
    // The after-norm CLS is row 0 of the reference.
    let cls = enc.vit.cls(&px, true).unwrap();
    assert!(max_abs_diff(&cls, &want.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()) <= 1e-4);
}
