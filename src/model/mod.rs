//! Models as the library uses them: the maths from `farcer-models` (re-exported under
//! their old paths), and where they come from: a Hugging Face folder, a GGUF file or a
//! hub id, with the LLM's tokenizer and chat template, and PEFT's adapter files.

pub use farcer_models::{dropout, llama, lora, projection, vit};
pub use farcer_nn as frozen;
pub mod gguf;
pub mod peft;
pub mod tokenizer;
pub mod weights;

use crate::error::{Error, IoContext, Result};
use crate::prompt::template::{template_from_config, token_from_config, ChatTemplate};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use llama::{Llama, LlamaConfig};
use std::path::{Path, PathBuf};
use tokenizer::TextTokenizer;

/// Where a model was loaded from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSource {
    /// A folder in Hugging Face layout.
    Dir {
        path: PathBuf,
    },
    Gguf {
        path: PathBuf,
    },
    /// Downloaded from the hub into `path`.
    Hub {
        id: String,
        path: PathBuf,
    },
}

/// An LLM ready to use: weights, tokenizer, chat template and end-of-turn token.
pub struct Llm {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub source: ModelSource,
    /// What the user named (`--llm`), recorded in reports and checkpoints.
    pub name: String,
    /// The token that ends an assistant turn (`<|im_end|>`, `<|eot_id|>`).
    pub end_of_turn: u32,
    /// Tokens that stop generation.
    pub stop_tokens: Vec<u32>,
}

impl Llm {
    /// The tokens of an answer naming `label`: its tokens, then end-of-turn (what training
    /// targets, constrained decoding scores and the benchmarks feed PyTorch).
    pub fn answer_tokens(&self, label: &str) -> Result<Vec<u32>> {
        let mut t = self.tokenizer.encode(label)?;
        t.push(self.end_of_turn);
        Ok(t)
    }
}

/// Loads an LLM from a path (folder or `.gguf`) or a hub id.
pub fn load_llm(spec: &str, device: &Device, dtype: DType) -> Result<Llm> {
    let path = Path::new(spec);
    if path.is_file() {
        if spec.ends_with(".gguf") {
            return load_gguf(path, spec, device, dtype);
        }
        return Err(Error::model(
            spec,
            "a model file must be a .gguf; otherwise pass the folder",
        ));
    }
    if path.is_dir() {
        return load_dir(
            path,
            spec,
            ModelSource::Dir {
                path: path.to_path_buf(),
            },
            device,
            dtype,
        );
    }
    if looks_like_hub_id(spec) {
        let dir = hub_download(spec)?;
        return load_dir(
            &dir,
            spec,
            ModelSource::Hub {
                id: spec.into(),
                path: dir.clone(),
            },
            device,
            dtype,
        );
    }
    Err(Error::model(
        spec,
        "no such file or folder, and not a hub id (owner/name); pass a Hugging Face folder, a .gguf file or a hub id",
    ))
}

pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !s.starts_with('.')
}

/// Downloads a model's files from the Hugging Face hub into `$FARCER_HOME/hub`; offline,
/// an error that says to pass a local path instead.
pub fn hub_download(id: &str) -> Result<PathBuf> {
    hub_download_files(
        id,
        &["config.json"],
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ],
        true,
    )
}

/// Fetches `required` and `optional` files (plus the safetensors weights when `weights`)
/// of a hub repository; returns the local folder.
pub fn hub_download_files(
    id: &str,
    required: &[&str],
    optional: &[&str],
    weights: bool,
) -> Result<PathBuf> {
    let offline_hint = |e: &dyn std::fmt::Display| {
        Error::Fetch(format!(
            "cannot download `{id}` from the Hugging Face hub ({e}). This machine may be offline: \
             pass a local path instead (a folder in Hugging Face layout, or a .gguf file for an LLM)"
        ))
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(offline_hint(&"HF_HUB_OFFLINE=1"));
    }
    let cache = crate::util::farcer_home().join("hub");
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache)
        .with_progress(true)
        .build()
        .map_err(|e| offline_hint(&e))?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in required {
        let p = repo.get(f).map_err(|e| offline_hint(&e))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in optional {
        let _ = repo.get(f);
    }
    if weights {
        match repo.get("model.safetensors.index.json") {
            Ok(index) => {
                for shard in shard_files(&index)? {
                    repo.get(&shard).map_err(|e| offline_hint(&e))?;
                }
            }
            Err(_) => {
                repo.get("model.safetensors")
                    .map_err(|e| offline_hint(&e))?;
            }
        }
    }
    dir.ok_or_else(|| Error::Fetch(format!("`{id}`: nothing downloaded")))
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index).at(index)?)
        .map_err(|e| Error::input(index.display().to_string(), e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::input(index.display().to_string(), "no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The safetensors files of a Hugging Face folder (one file or an index of shards).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::model(
        dir.display().to_string(),
        "no model.safetensors or model.safetensors.index.json",
    ))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| Error::input(path.display().to_string(), e.to_string()))
}

fn load_dir(
    dir: &Path,
    name: &str,
    source: ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<Llm> {
    let cfg_path = dir.join("config.json");
    // Parsed from the text (not a `Value`) so that a wrong value's error has its line.
    let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
    let raw: LlamaConfig = serde_json::from_str(&text)
        .map_err(|e| Error::input(cfg_path.display().to_string(), e.to_string()))?;
    let config = raw
        .into_config()
        .map_err(|m| Error::input(cfg_path.display().to_string(), m))?;
    let files = safetensors_files(dir)?;
    // Read tensor by tensor, not memory-mapped: see `weights` for why.
    let vb = weights::var_builder(&files, dtype, device)?;
    let model = Llama::load(vb, &config)
        .map_err(|e| Error::model(dir.display().to_string(), e.to_string()))?;

    let tok_path = dir.join("tokenizer.json");
    let mut tokenizer = TextTokenizer::from_file(&tok_path)?;
    let tcfg_path = dir.join("tokenizer_config.json");
    let tcfg = if tcfg_path.is_file() {
        read_json(&tcfg_path)?
    } else {
        serde_json::json!({})
    };
    tokenizer.bos_token = token_from_config(&tcfg, "bos_token");
    tokenizer.eos_token = token_from_config(&tcfg, "eos_token");
    let jinja = dir.join("chat_template.jinja");
    let source_text = if jinja.is_file() {
        std::fs::read_to_string(&jinja).at(&jinja)?
    } else {
        template_from_config(&tcfg).ok_or_else(|| {
            Error::model(name, "no chat template (tokenizer_config.json `chat_template` or chat_template.jinja): farcer needs an instruct model")
        })?
    };
    finish(model, tokenizer, &source_text, source, name)
}

fn load_gguf(path: &Path, name: &str, device: &Device, dtype: DType) -> Result<Llm> {
    let g = gguf::load(path, device, dtype)?;
    let vb = VarBuilder::from_tensors(g.tensors, dtype, device);
    let mut model = Llama::load(vb, &g.config)
        .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
    let head = if model.lm_head_is_tied() {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    if let Some((_, q)) = g.head_q8.filter(|(n, _)| n == head) {
        model
            .set_lm_head_q8(q)
            .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
    }
    let tokenizer = TextTokenizer::from_gguf(&g.content)?;
    let template = g
        .content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| {
            Error::model(
                name,
                "the GGUF has no tokenizer.chat_template: farcer needs an instruct model",
            )
        })?;
    finish(
        model,
        tokenizer,
        &template,
        ModelSource::Gguf {
            path: path.to_path_buf(),
        },
        name,
    )
}

fn finish(
    model: Llama,
    tokenizer: TextTokenizer,
    template: &str,
    source: ModelSource,
    name: &str,
) -> Result<Llm> {
    let template = ChatTemplate::new(
        template,
        tokenizer.bos_token.as_deref().unwrap_or(""),
        tokenizer.eos_token.as_deref().unwrap_or(""),
    )?;
    let after = template.after_answer()?;
    let after_ids = tokenizer.encode(&after)?;
    let eos = tokenizer
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_id(t));
    let end_of_turn = match after_ids.first() {
        Some(&id) if tokenizer.is_special(id) => id,
        _ => eos.ok_or_else(|| {
            Error::model(name, "cannot tell the end-of-turn token: the template adds none after an answer and there is no eos_token")
        })?,
    };
    let mut stop_tokens = vec![end_of_turn];
    if let Some(e) = eos {
        if e != end_of_turn {
            stop_tokens.push(e);
        }
    }
    Ok(Llm {
        model,
        tokenizer,
        template,
        source,
        name: name.to_string(),
        end_of_turn,
        stop_tokens,
    })
}

/// A model dtype by name: `f32`, `bf16` or `f16`.
pub fn dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::input(
            "--dtype",
            format!("`{other}`: expected f32, bf16 or f16"),
        )),
    }
}

/// The frozen models' dtype for `--dtype`: `auto` is bf16 on a GPU and f32 on the CPU
/// (where the fused f32 kernels run); trainable weights and the loss stay f32 anyway.
pub fn dtype_for(spec: &str, device: &Device) -> Result<DType> {
    match spec {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        other => dtype(other).map_err(|_| {
            Error::input(
                "--dtype",
                format!("`{other}`: expected auto, f32, bf16 or f16"),
            )
        }),
    }
}

/// The compute device: `cpu`, `cuda[:N]` or `metal`. A GPU needs a binary built with
/// its cargo feature and a machine with its driver; the error says which is missing.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| {
                    Error::input("--device", format!("`{s}`: the GPU index must be a number"))
                })?,
            };
            if !cfg!(feature = "cuda") {
                return Err(Error::input(
                    "--device",
                    format!("`{s}`: this farcer was built without the `cuda` feature; build it with scripts/build-cuda (or `cargo build --release --features cuda` where a CUDA toolkit is installed)"),
                ));
            }
            Device::new_cuda(n).map_err(|e| {
                Error::input(
                    "--device",
                    format!("`{s}`: no usable CUDA device {n} (is the NVIDIA driver installed and the GPU visible?): {e}"),
                )
            })
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(Error::input(
                    "--device",
                    "`metal`: this farcer was built without the `metal` feature; build it on macOS with `cargo build --release --features metal`",
                ));
            }
            Device::new_metal(0).map_err(|e| {
                Error::input("--device", format!("`metal`: no usable Metal device: {e}"))
            })
        }
        other => Err(Error::input(
            "--device",
            format!("`{other}`: expected cpu, cuda, cuda:N or metal"),
        )),
    }
}
