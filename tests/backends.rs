//! The one backend choice: candle's op-by-op path (what every GPU runs) against the fused
//! CPU kernels, in each dtype, through the built-in self-test; and the errors a user gets
//! for a device or dtype this build cannot run.

use candle_core::{DType, Device};
use farcer::model::frozen::Backend;

/// `farcer selftest`'s checks on the CPU: candle's ops in f32 against the kernels to 1e-4
/// of each value's scale, bf16 to 6e-2, f16 to 1e-2 (logits, training logits with adapter
/// dropout, input and adapter gradients).
#[test]
fn candle_path_matches_the_kernels_in_every_dtype() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let r = farcer::selftest::run(&Device::Cpu, dtype).unwrap();
        assert_eq!(r.checks.len(), 5);
        for c in &r.checks {
            assert!(
                c.passed && c.scale > 0.0,
                "{dtype:?} {}: {} of {}",
                c.name,
                c.max_abs_diff,
                c.scale
            );
        }
        assert!(r.passed());
    }
}

#[test]
fn the_kernels_backend_refuses_what_it_cannot_run() {
    assert!(Backend::Kernels.check(&Device::Cpu, DType::F32).is_ok());
    let e = Backend::Kernels
        .check(&Device::Cpu, DType::BF16)
        .unwrap_err();
    assert!(e.to_string().contains("f32 on the CPU only"), "{e}");
    assert_eq!(Backend::auto(&Device::Cpu, DType::BF16), Backend::Candle);
    assert_eq!(Backend::auto(&Device::Cpu, DType::F32), Backend::Kernels);
}

#[test]
fn devices_and_dtypes_by_name_fail_clearly() {
    assert!(matches!(farcer::model::device("cpu"), Ok(Device::Cpu)));
    if !cfg!(feature = "cuda") {
        let e = farcer::model::device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
    }
    if !cfg!(feature = "metal") {
        let e = farcer::model::device("metal").unwrap_err().to_string();
        assert!(e.contains("without the `metal` feature"), "{e}");
    }
    let e = farcer::model::device("cuda:x").unwrap_err().to_string();
    assert!(e.contains("must be a number"), "{e}");
    let e = farcer::model::device("tpu").unwrap_err().to_string();
    assert!(e.contains("expected cpu, cuda"), "{e}");
    assert_eq!(farcer::model::dtype("bf16").unwrap(), DType::BF16);
    let e = farcer::model::dtype("f8").unwrap_err().to_string();
    assert!(e.contains("expected f32, bf16 or f16"), "{e}");
}
