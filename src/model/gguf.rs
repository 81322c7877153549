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
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub struct GgufModel {
    pub config: Config,
    pub tensors: HashMap<String, Tensor>,
    pub content: gguf_file::Content,
    /// Per-dimension RoPE divisors (`rope_freqs.weight`, Llama 3.1 GGUFs).
    pub rope_freqs: Option<Vec<f32>>,
    /// The LM head's weight as stored, with its Hugging Face name, where the file holds
    /// it in Q8_0 and the model will run the fused CPU path (see [`farcer_nn::Q8Weight`]).
    pub head_q8: Option<(String, farcer_nn::Q8Weight)>,
}

/// Reads a GGUF file's header (metadata and tensor table), checked against the file's
/// length before and after candle parses it: see [`check_metadata`] and
/// [`check_tensor_table`]. Tensor data is read later, one tensor at a time.
pub fn read_content(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let bad = |m: String| Error::model(path.display().to_string(), m);
    let mut f = std::fs::File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    check_metadata(&mut std::io::BufReader::new(&f), len)
        .map_err(|m| bad(format!("not a readable GGUF file: {m}")))?;
    f.seek(SeekFrom::Start(0)).at(path)?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    check_tensor_table(&ct, len).map_err(|m| bad(format!("not a readable GGUF file: {m}")))?;
    Ok((ct, f))
}

/// Nesting of arrays in GGUF metadata that we follow (candle stops at the same depth).
const MAX_DEPTH: usize = 64;

/// Walks a GGUF header's metadata without keeping it, refusing what the parser would
/// panic on or could be made to allocate for: counts and lengths beyond what the rest of
/// the file can hold, unknown value types, nesting deeper than 64, and a
/// `general.alignment` of 0 (candle divides by it). `len` is the file's length.
pub fn check_metadata<R: Read + Seek>(r: &mut R, len: u64) -> std::result::Result<(), String> {
    let mut w = Walker { r, len, pos: 0 };
    let magic = w.u32()?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let version = w.u32()?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported"));
    }
    let v1 = version == 1;
    let tensors = w.length(v1)?;
    let kvs = w.length(v1)?;
    // Each entry takes some bytes, so a count above the file's length cannot be true.
    if tensors > len || kvs > len {
        return Err(format!(
            "the header claims {tensors} tensors and {kvs} metadata entries in a file of {len} bytes"
        ));
    }
    for _ in 0..kvs {
        let key_len = w.length(v1)?;
        let is_alignment = key_len == "general.alignment".len() as u64;
        let key = if is_alignment {
            w.string(key_len)?
        } else {
            w.skip(key_len)?;
            String::new()
        };
        let ty = w.u32()?;
        if key == "general.alignment" {
            let a = match ty {
                0 | 1 => w.u8()? as u64,
                2 | 3 => w.u16()? as u64,
                4 | 5 => w.u32()? as u64,
                _ => {
                    w.value(ty, v1, 0)?;
                    continue;
                }
            };
            // candle reads signed widths as negative and falls back to 32 then.
            let negative = match ty {
                1 => a >= 0x80,
                3 => a >= 0x8000,
                5 => a >= 0x8000_0000,
                _ => false,
            };
            if a == 0 && !negative {
                return Err("general.alignment is 0".into());
            }
        } else {
            w.value(ty, v1, 0)?;
        }
    }
    Ok(())
}

/// Refuses tensors whose element count overflows, that do not fill whole blocks of their
/// type, or whose data would lie beyond the file's `len` bytes.
pub fn check_tensor_table(ct: &gguf_file::Content, len: u64) -> std::result::Result<(), String> {
    for (name, t) in &ct.tensor_infos {
        let elems = t
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", t.shape.dims()))?;
        let block = t.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}`: {elems} elements are not whole blocks of {block}"
            ));
        }
        let end = (elems / block)
            .checked_mul(t.ggml_dtype.type_size())
            .and_then(|b| (b as u64).checked_add(ct.tensor_data_offset))
            .and_then(|b| b.checked_add(t.offset));
        match end {
            Some(e) if e <= len => {}
            _ => {
                return Err(format!(
                    "tensor `{name}` ({:?}, {:?}) ends past the end of the file ({len} bytes): truncated or damaged",
                    t.ggml_dtype,
                    t.shape.dims()
                ))
            }
        }
    }
    Ok(())
}

/// A bounded reader of a GGUF header.
struct Walker<'a, R> {
    r: &'a mut R,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn need(&self, n: u64) -> std::result::Result<(), String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "{n} bytes needed at offset {}, the file ends at {} (truncated?)",
                self.pos, self.len
            ));
        }
        Ok(())
    }
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        self.need(N as u64)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.bytes()?))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn length(&mut self, v1: bool) -> std::result::Result<u64, String> {
        if v1 {
            Ok(self.u32()? as u64)
        } else {
            self.u64()
        }
    }
    fn skip(&mut self, n: u64) -> std::result::Result<(), String> {
        self.need(n)?;
        if n <= 4096 {
            // Short skips are reads, which a buffered reader serves without a syscall.
            let copied = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())
                .map_err(|e| e.to_string())?;
            if copied != n {
                return Err("the file ended early".into());
            }
        } else {
            self.r
                .seek(SeekFrom::Current(n as i64))
                .map_err(|e| e.to_string())?;
        }
        self.pos += n;
        Ok(())
    }
    fn string(&mut self, n: u64) -> std::result::Result<String, String> {
        self.need(n)?;
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b)
            .trim_end_matches('\0')
            .to_string())
    }
    /// Skips one value of GGUF type `ty`.
    fn value(&mut self, ty: u32, v1: bool, depth: usize) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("metadata arrays nested deeper than {MAX_DEPTH}"));
        }
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.length(v1)?;
                self.skip(n)
            }
            9 => {
                let inner = self.u32()?;
                let n = self.length(v1)?;
                let size = match inner {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    8 | 9 => None,
                    t => return Err(format!("unknown metadata value type {t}")),
                };
                match size {
                    Some(s) => self.skip(n.checked_mul(s).ok_or("array length overflows")?),
                    None => {
                        // Each string or array takes at least its length prefix.
                        self.need(n.saturating_mul(if v1 { 4 } else { 8 }))?;
                        for _ in 0..n {
                            self.value(inner, v1, depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            t => Err(format!("unknown metadata value type {t}")),
        }
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::model("GGUF", format!("missing metadata `{key}`")))
}

fn meta_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = meta(ct, key)?;
    let n: Option<u64> = match v {
        gguf_file::Value::U8(x) => Some(*x as u64),
        gguf_file::Value::U16(x) => Some(*x as u64),
        gguf_file::Value::U32(x) => Some(*x as u64),
        gguf_file::Value::U64(x) => Some(*x),
        gguf_file::Value::I8(x) => u64::try_from(*x).ok(),
        gguf_file::Value::I16(x) => u64::try_from(*x).ok(),
        gguf_file::Value::I32(x) => u64::try_from(*x).ok(),
        gguf_file::Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::model("GGUF", format!("`{key}` is not a whole number >= 0")))
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
    let head_dim = match meta_usize(ct, &k("rope.dimension_count"))
        .or_else(|_| meta_usize(ct, &k("attention.key_length")))
    {
        Ok(d) => d,
        Err(_) if heads > 0 && !hidden.is_multiple_of(heads) => {
            return Err(Error::model(
                "GGUF",
                format!("hidden_size (embedding_length) {hidden} is not a multiple of num_attention_heads (head_count) {heads}, and no head size is given"),
            ))
        }
        Err(_) => hidden / heads.max(1),
    };
    let tied = !ct.tensor_infos.contains_key("output.weight");
    Config {
        hidden_size: hidden,
        intermediate_size: meta_usize(ct, &k("feed_forward_length"))?,
        num_layers: meta_usize(ct, &k("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
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
    // Name the file in the configuration's errors (`config` only sees the header).
    let cfg = config(&content).map_err(|e| match e {
        Error::Model { message, .. } => Error::model(path.display().to_string(), message),
        e => e,
    })?;
    let mut tensors = HashMap::new();
    let mut head_q8 = None;
    // The LM head's blocks, kept only where the fused CPU path can read them: the output
    // matrix, or the embeddings when there is none (tied).
    let head = if content.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let fused = farcer_nn::Backend::auto(device, dtype) == farcer_nn::Backend::Kernels;
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
        if fused && name == head && q.dtype() == candle_core::quantized::GgmlDType::Q8_0 {
            let (rows, cols) = q.shape().dims2()?;
            head_q8 = farcer_nn::Q8Weight::new(q.data()?.into_owned(), rows, cols)
                .map(|w| (hf.clone(), w));
        }
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
        head_q8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_accepts_what_candle_writes() {
        use gguf_file::Value as V;
        let dev = Device::Cpu;
        let t = candle_core::quantized::QTensor::quantize(
            &Tensor::ones((4, 32), DType::F32, &dev).unwrap(),
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        let tokens = V::Array(vec![V::String("a".into()), V::String("bc".into())]);
        let meta = [
            ("general.architecture", &V::String("llama".into())),
            ("general.alignment", &V::U32(32)),
            ("x.tokens", &tokens),
            ("x.f", &V::F32(1.5)),
        ];
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta, &[("t.weight", &t)]).unwrap();
        let bytes = out.into_inner();
        let len = bytes.len() as u64;
        check_metadata(&mut std::io::Cursor::new(&bytes), len).unwrap();
        let ct = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        check_tensor_table(&ct, len).unwrap();
    }

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
