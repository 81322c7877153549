//! Embeds the face-detection model that the `rustface` crate ships in its source package
//! (SeetaFace's frontal detector, BSD-2), so `--face-crop` needs no download.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("seeta_fd_frontal_v1.0.bin");
    let found = locate().and_then(|p| std::fs::copy(&p, &out).ok());
    if found.is_none() {
        // Without the model, face cropping reports that it is unavailable.
        std::fs::write(&out, b"").unwrap();
        println!(
            "cargo:warning=rustface's model file was not found; --face-crop will be unavailable"
        );
    }
}

/// The model inside the rustface package, found through `cargo metadata`.
fn locate() -> Option<PathBuf> {
    let cargo = std::env::var("CARGO").ok()?;
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let target = std::env::var("TARGET").ok()?;
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &target,
        ])
        .current_dir(dir)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let pkg = v["packages"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "rustface")?;
    let manifest = PathBuf::from(pkg["manifest_path"].as_str()?);
    let model = manifest
        .parent()?
        .join("model")
        .join("seeta_fd_frontal_v1.0.bin");
    model.is_file().then_some(model)
}
