//! Shared test helpers: fixture paths, the default model, tolerance checks.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::sync::Mutex;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `../shared` next to the repository (MELD CSVs, the real ViT).
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        missing(&format!("{} (shared data)", p.display()));
        None
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Under CI a missing input fails the test; elsewhere the test says loudly that it
/// did not run.
pub fn missing(what: &str) {
    if in_ci() {
        panic!("required test input missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: {what} is not available here");
}

static FETCH: Mutex<()> = Mutex::new(());

/// The pinned default LLM, fetched if missing (one fetch per test binary).
pub fn default_llm() -> Option<PathBuf> {
    let _g = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    match farcer::fetch::ensure_default_llm(None, &|s| eprintln!("{s}")) {
        Ok(p) => Some(p),
        Err(e) => {
            missing(&format!("the default LLM ({e})"));
            None
        }
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn load_safetensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}
