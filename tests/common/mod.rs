//! Shared test helpers: fixture paths, the default model, tolerance checks.
#![allow(dead_code)]

pub mod harness;

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::sync::Mutex;

/// The repository's root (the workspace folder), from whichever crate's tests run.
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|p| p.join("tests/fixtures").is_dir())
        .unwrap_or(&here)
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The shared data folder: `../shared` next to the repository, or `FARCER_SHARED`.
pub fn shared_root() -> PathBuf {
    match std::env::var_os("FARCER_SHARED") {
        Some(p) => PathBuf::from(p),
        None => root().join("../shared"),
    }
}

/// A path in the shared data folder (MELD CSVs, the real ViT), if it is there.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = shared_root().join(rel);
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

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The shared DINOv2-small's last hidden state and after-norm CLS vectors on its
/// reference pixels, each within 1e-4 of transformers' reference outputs.
pub fn assert_matches_dinov2_reference(enc: &farcer::vision::VisionEncoder, dir: &std::path::Path) {
    let read = |name: &str| {
        Tensor::read_npy(dir.join("reference").join(name))
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    };
    let (px, want) = (read("pixel_values.npy"), read("last_hidden_state.npy"));
    let got = enc.vit.last_hidden_state(&px).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "max abs difference {d}");
    // The after-norm CLS is row 0 of the reference.
    let cls = enc.vit.cls(&px, true).unwrap();
    let d = max_abs_diff(&cls, &want.narrow(1, 0, 1).unwrap().squeeze(1).unwrap());
    assert!(d <= 1e-4, "CLS: max abs difference {d}");
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

/// Writes a tiny random Llama (the tiny-llama fixture's tokenizer, template and shape,
/// new weights) whose attention and head weights are large enough for one input position
/// to steer the output: a frozen LLM a projection can actually drive, for learning tests.
pub fn write_steerable_llama(dir: &std::path::Path, seed: u64) {
    use candle_core::DType;
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap())
            .unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let (v, h, inter, layers, heads, kv, hd) =
        (268usize, 64usize, 160usize, 2usize, 4usize, 2usize, 16usize);
    let mut rng = farcer::util::Rng::new(seed);
    let mut t = std::collections::HashMap::new();
    let mut normal = |shape: &[usize], std: f64| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    t.insert(
        "model.embed_tokens.weight".to_string(),
        normal(&[v, h], 1.0),
    );
    t.insert("lm_head.weight".to_string(), normal(&[v, h], 0.3));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            normal(&[heads * hd, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            normal(&[kv * hd, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            normal(&[kv * hd, h], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            normal(&[h, heads * hd], 0.3),
        );
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            normal(&[inter, h], 0.1),
        );
        t.insert(format!("{p}.mlp.up_proj.weight"), normal(&[inter, h], 0.1));
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            normal(&[h, inter], 0.1),
        );
        t.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// farcer's seeded, untrained demo ViT (the encoder `farcer demo` uses), written to `dir`
/// in Hugging Face layout and loaded (CLS before the final norm).
pub fn demo_vit(dir: &std::path::Path, seed: u64) -> farcer::vision::VisionEncoder {
    farcer::vision::VisionEncoder::write_random(
        dir,
        seed,
        &farcer::vision::demo_vit_config(),
        &farcer::vision::demo_preprocess(),
    )
    .unwrap();
    farcer::vision::VisionEncoder::load(dir.to_str().unwrap(), &Device::Cpu, false).unwrap()
}

/// The backend a test asks for: the fused kernels, or candle's ops (the independent
/// op-by-op path, the one every other device runs).
pub fn backend(fused: bool) -> farcer::model::frozen::Backend {
    if fused {
        farcer::model::frozen::Backend::Kernels
    } else {
        farcer::model::frozen::Backend::Candle
    }
}

/// On the fused kernels or candle's ops: `prefix` into a fresh cache (no graph), then
/// `ids` as a variable at positions `pos`. Returns the logits at `at` and that variable.
pub fn forward_after_prefix(
    llm: &farcer::model::Llm,
    fused: bool,
    prefix: &[u32],
    ids: &[u32],
    pos: &farcer::model::llama::Positions,
    at: &[usize],
) -> (Tensor, candle_core::Var) {
    let model = llm.model.clone().with_backend(backend(fused)).unwrap();
    let mut cache = model.new_cache();
    let pre = model.embed(prefix).unwrap().unsqueeze(0).unwrap();
    model
        .forward(&pre, &mut cache, &Default::default(), &[])
        .unwrap();
    let x = model.embed(ids).unwrap().unsqueeze(0).unwrap();
    let x = candle_core::Var::from_tensor(&x).unwrap();
    let l = model
        .forward(x.as_tensor(), &mut cache, pos, at)
        .unwrap()
        .unwrap();
    (l, x)
}

/// The logits at every position of `ids`, run from an empty cache: `(len, vocab)`.
pub fn logits_at_every_position(llm: &farcer::model::Llm, ids: &[u32]) -> Tensor {
    use candle_core::IndexOp;
    let x = llm.model.embed(ids).unwrap().unsqueeze(0).unwrap();
    let at: Vec<usize> = (0..ids.len()).collect();
    let pos = farcer::model::llama::Positions::default();
    llm.model
        .forward(&x, &mut llm.model.new_cache(), &pos, &at)
        .unwrap()
        .unwrap()
        .i(0)
        .unwrap()
}

/// Smooth, varied weights `(1, rows, 268)` (the tiny models' vocabulary) to sum logits
/// with, so that every logit gets its own gradient: `sin` or `cos` of `0.01 i`.
pub fn logit_weights(rows: usize, cos: bool) -> Tensor {
    let x = Tensor::arange(0f32, (rows * 268) as f32, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((1, rows, 268))
        .unwrap()
        .affine(1e-2, 0.0)
        .unwrap();
    if cos { x.cos() } else { x.sin() }.unwrap()
}
