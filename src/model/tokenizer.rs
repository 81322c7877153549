//! The LLM's tokenizer: from `tokenizer.json`, or rebuilt from GGUF metadata.
//!
//! GGUF stores the BPE vocabulary and merges plus a `tokenizer.ggml.pre` name for the
//! pre-tokenizer. We rebuild the Hugging Face pipeline that name stands for. candle's own
//! GGUF tokenizer maps SmolLM's `smollm` to plain GPT-2 byte-level with a prefix space,
//! which is wrong: SmolLM splits every digit on its own and adds no prefix space.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use std::path::Path;

/// GPT-4o / Llama-3 style split (`llama-bpe`): letters, numbers in groups of 1-3, ...
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama-3 but single digits.
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos_token)
            .field("eos", &self.eos_token)
            .finish()
    }
}

impl TextTokenizer {
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<String>, eos: Option<String>) -> Self {
        TextTokenizer {
            inner,
            bos_token: bos,
            eos_token: eos,
        }
    }

    /// From a `tokenizer.json` (special tokens named by `tokenizer_config.json` are set by
    /// the caller).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
        Ok(TextTokenizer::new(inner, None, None))
    }

    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let json = gguf_tokenizer_json(ct)?;
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| Error::Tokenizer(format!("building from GGUF metadata: {e}")))?;
        let tokens = string_array(ct, "tokenizer.ggml.tokens")?;
        let tok = |key: &str| {
            ct.metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|i| tokens.get(i as usize).cloned())
        };
        Ok(TextTokenizer::new(
            inner,
            tok("tokenizer.ggml.bos_token_id"),
            tok("tokenizer.ggml.eos_token_id"),
        ))
    }

    /// Token ids of a text. Special tokens written in the text (`<|im_start|>`) become
    /// their ids; nothing (no BOS) is added: the chat template writes what it wants.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special)?)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// True for added special tokens (`<|eot_id|>`, `<|im_end|>`...).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn string_array(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| Error::model("GGUF", format!("missing metadata `{key}`")))?;
    let arr = v
        .to_vec()
        .map_err(|_| Error::model("GGUF", format!("`{key}` is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|_| Error::model("GGUF", format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The `pre_tokenizer` of the Hugging Face tokenizer a GGUF `tokenizer.ggml.pre` name
/// stands for (llama.cpp's `convert_hf_to_gguf.py` names them from these pipelines).
pub fn pre_tokenizer_for(pre: &str) -> Result<Value> {
    Ok(match pre {
        // SmolLM / StarCoder: every digit alone, then GPT-2 byte-level, no prefix space.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(false, true)]
        }),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [split(REGEX_LLAMA3), byte_level(false, false)]
        }),
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [split(REGEX_QWEN2), byte_level(false, false)]
        }),
        "gpt-2" | "gpt2" | "default" => byte_level(false, true),
        other => {
            return Err(Error::model(
                "GGUF tokenizer",
                format!("pre-tokenizer `{other}` is not supported; use the model's Hugging Face folder (with tokenizer.json) instead"),
            ))
        }
    })
}

/// A `tokenizer.json` equivalent to the GGUF's tokenizer metadata.
pub fn gguf_tokenizer_json(ct: &gguf_file::Content) -> Result<Value> {
    let model = ct
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(Error::model(
            "GGUF tokenizer",
            format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); use the model's Hugging Face folder instead"),
        ));
    }
    let tokens = string_array(ct, "tokenizer.ggml.tokens")?;
    let merges = string_array(ct, "tokenizer.ggml.merges")?;
    let types: Vec<u32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| Error::model("GGUF", "token_type is not an array"))?
            .iter()
            .map(|x| {
                x.to_i32()
                    .map(|i| i as u32)
                    .or_else(|_| x.to_u32())
                    .unwrap_or(1)
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // llama.cpp token types: 3 = control, 4 = user-defined; both are matched whole.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": t == 4, "special": t == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(&pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": pre == "llama-bpe" || pre == "llama3",
                  "vocab": vocab, "merges": merges}
    }))
}
