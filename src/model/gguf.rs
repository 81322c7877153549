//! Llama weights from a GGUF file (llama.cpp's format), dequantized to f32.
//!
//! Tensor names are mapped to Hugging Face's, and the q/k projections are un-permuted:
//! llama.cpp's converter reorders their rows for its interleaved RoPE; we use the
//! half-split RoPE of `transformers`, so we put the rows back.

use super::llama::{Config, RopeScaling};
use crate::error::{Error, IoContext, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub struct GgufModel {
    pub config: Config,
    pub tensors: HashMap<String, Tensor>,
    pub content: gguf_file::Content,
    /// Per-dimension RoPE divisors (`rope_freqs.weight`, Llama 3.1 GGUFs).
    pub rope_freqs: Option<Vec<f32>>,
}

pub fn read_content(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path).at(path)?;
    let ct = gguf_file::Content::read(&mut f).map_err(|e| {
        Error::model(
            path.display().to_string(),
            format!("not a readable GGUF file: {e}"),
        )
    })?;
    Ok((ct, f))
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::model("GGUF", format!("missing metadata `{key}`")))
}

fn meta_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = meta(ct, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|_| Error::model("GGUF", format!("`{key}` is not an integer")))
}

fn meta_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
}

/// The model configuration from GGUF metadata.
pub fn config(ct: &gguf_file::Content) -> Result<Config> {
    let arch = meta(ct, "general.architecture")?
        .to_string()
        .map_err(|_| Error::model("GGUF", "general.architecture is not a string"))?
        .clone();
    if arch != "llama" {
        return Err(Error::model(
            "GGUF",
            format!("architecture `{arch}` is not Llama"),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta_usize(ct, &k("embedding_length"))?;
    let heads = meta_usize(ct, &k("attention.head_count"))?;
    let kv_heads = meta_usize(ct, &k("attention.head_count_kv")).unwrap_or(heads);
    let vocab = match meta_usize(ct, &k("vocab_size")) {
        Ok(v) => v,
        Err(_) => meta(ct, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|_| Error::model("GGUF", "tokens is not an array"))?
            .len(),
    };
    let rope_scaling = match ct
        .metadata
        .get(&k("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        Some(t) if t == "linear" => Some(RopeScaling {
            rope_type: "linear".into(),
            factor: meta_f64(ct, &k("rope.scaling.factor")),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        }),
        Some(t) if t != "none" => {
            return Err(Error::model(
                "GGUF",
                format!("rope scaling `{t}` is not supported"),
            ))
        }
        _ => None,
    };
    let tied = !ct.tensor_infos.contains_key("output.weight");
    Config {
        hidden_size: hidden,
        intermediate_size: meta_usize(ct, &k("feed_forward_length"))?,
        num_layers: meta_usize(ct, &k("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: meta_usize(ct, &k("rope.dimension_count"))
            .or_else(|_| meta_usize(ct, &k("attention.key_length")))
            .unwrap_or(hidden / heads.max(1)),
        vocab_size: vocab,
        rms_norm_eps: meta_f64(ct, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(ct, &k("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: meta_usize(ct, &k("context_length")).unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: false,
        rope_freq_divisors: None,
    }
    .validated()
    .map_err(|e| Error::model("GGUF", e))
}

/// Hugging Face name of a GGUF tensor.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (stem, kind) = part.rsplit_once('.')?;
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's row permutation of a q or k weight `(heads * head_dim, in)`.
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let shape = w.dims().to_vec();
    let out = shape.first().copied().unwrap_or(0);
    if heads == 0 || out == 0 || out % (2 * heads) != 0 {
        candle_core::bail!("a q/k weight of shape {shape:?} does not split into {heads} heads");
    }
    let rest: usize = shape[1..].iter().product();
    w.reshape((heads, out / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape)
}

/// Reads and dequantizes every tensor, named as in Hugging Face checkpoints.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<GgufModel> {
    let (content, mut f) = read_content(path)?;
    let cfg = config(&content)?;
    let mut tensors = HashMap::new();
    let mut rope_freqs = None;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let q = content
            .tensor(&mut f, &name, &Device::Cpu)
            .map_err(|e| Error::model(path.display().to_string(), format!("tensor {name}: {e}")))?;
        let t = q.dequantize(&Device::Cpu)?;
        if name == "rope_freqs.weight" {
            rope_freqs = Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            continue;
        }
        let Some(hf) = hf_name(&name) else {
            return Err(Error::model(
                path.display().to_string(),
                format!("unexpected tensor `{name}`"),
            ));
        };
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
            unpermute(&t, cfg.num_heads)?
        } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
            unpermute(&t, cfg.num_kv_heads)?
        } else {
            t
        };
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    let mut cfg = cfg;
    cfg.rope_freq_divisors = rope_freqs.clone();
    Ok(GgufModel {
        config: cfg,
        tensors,
        content,
        rope_freqs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").unwrap(),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.1.weird.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(w.shape)
        let (h, d, i) = (2, 4, 3);
        let w = Tensor::arange(0f32, (h * d * i) as f32, &Device::Cpu)?.reshape((h * d, i))?;
        let permuted = w
            .reshape((h, 2, d / 2, i))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((h * d, i))?;
        let back = unpermute(&permuted, h)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
