//! Llama decoder (Touvron et al. 2023; Llama 3, Dubey et al. 2024), as used by
//! Llama-3-8B-Instruct, Llama-3.1/3.2, TinyLlama and SmolLM2. Follows Hugging Face
//! `transformers`' `modeling_llama.py`: pre-norm RMSNorm blocks, rotary position
//! embeddings in the half-split convention, grouped-query attention, SwiGLU MLP.
//!
//! Written for FARCER rather than taken from candle-transformers because FARCER needs:
//! input *embeddings* in (image vectors sit between tokens), a KV cache that can be cloned
//! and shared by many samples (the prompt prefix), explicit positions and attention masks
//! (all candidate labels scored in one pass), logits only at the positions asked for, and
//! a training path where gradients flow to the inputs and LoRA adapters but are never
//! computed for the frozen weights. Fused kernels (RMSNorm, RoPE, softmax) record no
//! backward in candle, so the ops in `frozen.rs` attach their own. Which ops run (the
//! fused f32 CPU kernels or candle's) is a [`Backend`] chosen once at load; training is
//! an argument ([`Llama::forward_train`]), so one `&Llama` serves many callers at once.

use crate::dropout::Dropout;
use crate::lora::{LoraConfig, LoraLinear};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use farcer_nn::{self as frozen, Backend};
use serde::{Deserialize, Serialize};

/// Where PEFT puts the LLM's weights: FARCER wraps the LLM as `lm` (as the authors'
/// `FarcerModel` does) and PEFT adds `base_model.model.`.
pub const PEFT_PREFIX: &str = "base_model.model.lm.";

/// `rope_scaling` as found in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// `rope_parameters` of transformers >= 5: the theta and the scaling in one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(flatten)]
    pub scaling: RopeScaling,
}

/// The serde mirror of a Llama `config.json` (fields differ between versions, hence the
/// options). [`LlamaConfig::into_config`] resolves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// The resolved configuration the model runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Per-dimension divisors of the rotary frequencies (GGUF `rope_freqs.weight`, how
    /// llama.cpp stores Llama 3.1's scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_divisors: Option<Vec<f32>>,
}

impl LlamaConfig {
    pub fn into_config(self) -> std::result::Result<Config, String> {
        if let Some(m) = &self.model_type {
            if !matches!(m.as_str(), "llama" | "mistral") {
                return Err(format!("model_type `{m}` is not a Llama-family model"));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act `{act}` is not supported (Llama uses silu)"
                ));
            }
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 {
            return Err("num_attention_heads is 0".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim is given)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let (rope_theta, rope_scaling) = match self.rope_parameters {
            Some(p) => (
                p.rope_theta.unwrap_or(self.rope_theta),
                (p.scaling.rope_type != "default").then_some(p.scaling),
            ),
            None => (self.rope_theta, self.rope_scaling),
        };
        Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            rope_freq_divisors: None,
        }
        .validated()
    }
}

impl Config {
    /// The configuration, if every size the model divides or indexes by is usable (a
    /// zero or inconsistent one would panic deep inside a forward instead).
    pub fn validated(self) -> std::result::Result<Config, String> {
        let c = &self;
        let positive = [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_attention_heads", c.num_heads),
            ("num_key_value_heads", c.num_kv_heads),
            ("head_dim", c.head_dim),
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        // Far above any Llama-family model, low enough that nothing sized from the config
        // alone (layer lists, rotary tables) can ask for more memory than a machine has.
        let at_most = [
            ("hidden_size", c.hidden_size, 1 << 20),
            ("intermediate_size", c.intermediate_size, 1 << 22),
            ("num_hidden_layers", c.num_layers, 1 << 12),
            ("num_attention_heads", c.num_heads, 1 << 14),
            ("num_key_value_heads", c.num_kv_heads, 1 << 14),
            ("head_dim", c.head_dim, 1 << 14),
            ("vocab_size", c.vocab_size, 1 << 24),
            (
                "max_position_embeddings",
                c.max_position_embeddings,
                1 << 24,
            ),
        ];
        if let Some((name, v, max)) = at_most.iter().find(|(_, v, max)| v > max) {
            return Err(format!("{name} {v} is larger than farcer allows ({max})"));
        }
        // The rotary tables hold max_position_embeddings x head_dim / 2 values each.
        if c.max_position_embeddings * c.head_dim > 1 << 28 {
            return Err(format!(
                "max_position_embeddings {} x head_dim {} is larger than farcer's rotary tables allow (2^28)",
                c.max_position_embeddings, c.head_dim
            ));
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_heads, c.num_kv_heads
            ));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd (rotary embeddings rotate pairs)",
                c.head_dim
            ));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps {} is not a finite number >= 0",
                c.rms_norm_eps
            ));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            return Err(format!(
                "rope_theta {} is not a finite number > 0",
                c.rope_theta
            ));
        }
        if let Some(d) = &c.rope_freq_divisors {
            if d.len() != c.head_dim / 2 {
                return Err(format!(
                    "{} rope frequency divisors for head_dim {}",
                    d.len(),
                    c.head_dim
                ));
            }
        }
        Ok(self)
    }

    /// Inverse frequencies of the rotary embedding, with `rope_scaling` applied
    /// (`llama3` and `linear`), computed as transformers does in f32.
    pub fn inv_freq(&self) -> std::result::Result<Vec<f32>, String> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0f32 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_str() {
                "default" => {}
                "linear" => {
                    let f = s.factor.ok_or("rope_scaling linear needs `factor`")? as f32;
                    inv.iter_mut().for_each(|x| *x /= f);
                }
                "llama3" => {
                    let factor = s.factor.ok_or("rope_scaling llama3 needs `factor`")? as f32;
                    let low = s.low_freq_factor.unwrap_or(1.0) as f32;
                    let high = s.high_freq_factor.unwrap_or(4.0) as f32;
                    let old = s.original_max_position_embeddings.unwrap_or(8192) as f32;
                    let low_wavelen = old / low;
                    let high_wavelen = old / high;
                    for x in inv.iter_mut() {
                        let wavelen = 2.0 * std::f32::consts::PI / *x;
                        let scaled = if wavelen > low_wavelen {
                            *x / factor
                        } else {
                            *x
                        };
                        // transformers: neither high- nor low-frequency.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        *x = if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        };
                    }
                }
                other => return Err(format!("rope_scaling type `{other}` is not supported")),
            }
        }
        if let Some(div) = &self.rope_freq_divisors {
            if div.len() != inv.len() {
                return Err(format!(
                    "{} rope frequency divisors for {} frequencies",
                    div.len(),
                    inv.len()
                ));
            }
            inv.iter_mut().zip(div).for_each(|(x, d)| *x /= d);
        }
        Ok(inv)
    }
}

/// Per-layer keys and values of the positions seen so far. Cloning is cheap (tensors are
/// shared), which is how one prompt prefix serves many samples.
#[derive(Debug, Clone)]
pub struct Cache {
    kvs: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl Cache {
    pub fn new(num_layers: usize) -> Self {
        Cache {
            kvs: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.kvs
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// Where the positions of a forward call sit and what they may attend to.
#[derive(Debug, Clone, Default)]
pub struct Positions<'a> {
    /// Rotary positions of the new tokens; default `cache.len() ..`.
    pub ids: Option<&'a [u32]>,
    /// Additive mask `(new, cache.len() + new)` (0 or -inf); default causal.
    pub mask: Option<&'a Tensor>,
    /// Training: the first new row (an index into the new rows, not a position id)
    /// whose input carries a gradient anyone needs (the first projected image when only
    /// the projection trains). Earlier rows cannot depend on it, so the fused CPU
    /// backward skips them and their input gradient is left at zero; the gradients of
    /// later rows and of everything upstream of them are unchanged. Ignored where
    /// skipping would change a gradient (adapters in or below a layer, a mask that lets
    /// an earlier row see a later one, a batch above 1) and off the fused path. 0: every
    /// row.
    pub grad_from: usize,
}

/// One independent sequence of [`Llama::forward_segments`]: its cache, its number of
/// new positions (its rows of the input, after the segments before it) and where they
/// sit.
pub struct Segment<'a, 'c> {
    pub cache: &'c mut Cache,
    pub len: usize,
    pub pos: Positions<'a>,
}

use farcer_kernels::Heads;
use frozen::{rms_norm, rope};

/// PEFT's name for projection `name` (`q_proj`, ..., `down_proj`) of layer `layer`:
/// `{PEFT_PREFIX}model.layers.{layer}.{self_attn|mlp}.{name}`.
fn peft_name(layer: usize, name: &str) -> String {
    let group = if matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
        "self_attn"
    } else {
        "mlp"
    };
    format!("{PEFT_PREFIX}model.layers.{layer}.{group}.{name}")
}

/// A projection `x W^T (+ b)` whose weight is frozen, with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Proj {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLinear>,
}

impl Proj {
    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Proj {
            weight,
            bias,
            lora: None,
        })
    }

    /// `x`: `(n, in)`.
    fn forward(&self, be: Backend, x: &Tensor, train: Option<&mut Dropout>) -> Result<Tensor> {
        self.finish(frozen::matmul_t(be, x, &self.weight)?, x, train)
    }

    /// Adds this projection's bias and adapter to its part `y` of a fused product.
    fn finish(&self, y: Tensor, x: &Tensor, train: Option<&mut Dropout>) -> Result<Tensor> {
        match self.extra(x, train)? {
            Some(e) => y + e,
            None => Ok(y),
        }
    }

    /// This projection's bias plus adapter output for `x`, if it has either.
    fn extra(&self, x: &Tensor, train: Option<&mut Dropout>) -> Result<Option<Tensor>> {
        let mut e = self
            .bias
            .as_ref()
            .map(|b| b.broadcast_as((x.dim(0)?, b.dim(0)?)));
        let e = e.take().transpose()?;
        Ok(match (&self.lora, e) {
            (Some(l), Some(e)) => Some((l.delta(x, train)? + e)?),
            (Some(l), None) => Some(l.delta(x, train)?),
            (None, e) => e,
        })
    }

    /// Folds the adapter into the weight (for inference).
    pub fn merge_lora(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            self.weight = (&self.weight + l.delta_weight()?)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// q, k and v weights stacked: one GEMM instead of three (k and v alone are narrow
    /// and use the CPU poorly). `q`, `k`, `v` hold row views of it.
    qkv: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate and up weights stacked (one GEMM); `gate`, `up` hold row views of it.
    gate_up: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
    /// On the CPU in f32: qkv, o, gate_up, down as the fused forward reads them, packed by
    /// the GEMM library or transposed to `(in, out)` (the backward reads the originals).
    transposed: Option<[frozen::FrozenWeight; 4]>,
}

/// The Llama model: embeddings, decoder blocks, final norm and the LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<Tensor>,
    /// The LM head's weight as the GGUF stored it, when in Q8_0: the fused CPU path reads
    /// these blocks (the same values, a quarter of the bytes of the f32 copy).
    lm_head_q8: Option<frozen::Q8Weight>,
    cos: Tensor,
    sin: Tensor,
    pub config: Config,
    device: Device,
    /// The ops every forward runs, chosen at load.
    backend: Backend,
    /// When a training pass recomputes each layer in its backward instead of keeping its
    /// activations (candle's op-by-op path; the fused CPU layer keeps its own).
    recompute: Recompute,
}

/// When training recomputes each decoder layer in the backward (gradient checkpointing
/// per layer): only the layers' inputs are kept between forward and backward, for about
/// a third more compute. `Auto` does it when a pass's activations would pass
/// [`RECOMPUTE_ABOVE`] bytes (a LoRA step over a whole 7-shot prompt at Llama-3-8B's
/// shape; not a base-FARCER step after a cached prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    #[default]
    Auto,
    Always,
    Never,
}

/// Activation bytes of one training pass above which `Recompute::Auto` recomputes.
pub const RECOMPUTE_ABOVE: usize = 4 << 30;

impl Llama {
    /// Loads weights named as in Hugging Face (`model.layers.N.self_attn.q_proj.weight`),
    /// with the fastest backend for their device and dtype.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let backend = Backend::auto(vb.device(), vb.dtype());
        Self::load_with(vb, config, backend)
    }

    /// [`Llama::load`] with a chosen backend (candle's ops on the CPU, say, to check the
    /// path every other device runs).
    pub fn load_with(vb: VarBuilder, config: &Config, backend: Backend) -> Result<Self> {
        backend.check(vb.device(), vb.dtype())?;
        let config = &config
            .clone()
            .validated()
            .map_err(candle_core::Error::Msg)?;
        let c = config;
        let m = vb.pp("model");
        let embed = m
            .pp("embed_tokens")
            .get((c.vocab_size, c.hidden_size), "weight")?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let (h, hd) = (c.hidden_size, c.head_dim);
            let mut q = Proj::load(&a.pp("q_proj"), h, c.num_heads * hd, c.attention_bias)?;
            let mut k = Proj::load(&a.pp("k_proj"), h, c.num_kv_heads * hd, c.attention_bias)?;
            let mut v = Proj::load(&a.pp("v_proj"), h, c.num_kv_heads * hd, c.attention_bias)?;
            let qkv = stack(&mut [&mut q, &mut k, &mut v])?;
            let attn = Attention {
                qkv,
                q,
                k,
                v,
                o: Proj::load(&a.pp("o_proj"), c.num_heads * hd, h, c.attention_bias)?,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: hd,
            };
            let p = l.pp("mlp");
            let mut gate = Proj::load(&p.pp("gate_proj"), h, c.intermediate_size, c.mlp_bias)?;
            let mut up = Proj::load(&p.pp("up_proj"), h, c.intermediate_size, c.mlp_bias)?;
            let gate_up = stack(&mut [&mut gate, &mut up])?;
            let mlp = Mlp {
                gate_up,
                gate,
                up,
                down: Proj::load(&p.pp("down_proj"), c.intermediate_size, h, c.mlp_bias)?,
            };
            let mut block = Block {
                input_norm: l.pp("input_layernorm").get(h, "weight")?,
                attn,
                post_norm: l.pp("post_attention_layernorm").get(h, "weight")?,
                mlp,
                transposed: None,
            };
            block.transpose(backend)?;
            layers.push(block);
        }
        let norm = m.pp("norm").get(c.hidden_size, "weight")?;
        let lm_head = if c.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(
                vb.pp("lm_head")
                    .get((c.vocab_size, c.hidden_size), "weight")?,
            )
        };
        let device = vb.device().clone();
        let (cos, sin) = rope_tables(config, &device, vb.dtype())?;
        Ok(Llama {
            embed,
            layers,
            norm,
            lm_head,
            lm_head_q8: None,
            cos,
            sin,
            config: config.clone(),
            device,
            backend,
            recompute: Recompute::Auto,
        })
    }

    /// The same model with another rule for recomputing layers in training.
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }

    /// Values a training pass keeps per new position and layer on candle's op-by-op path
    /// (what candle's autograd holds until the backward): the normed inputs, q/k/v, the
    /// rotated and scaled q and k, the new keys and values, the attention output and its
    /// transposed copy (the attention itself keeps only a log-sum-exp per row), the output
    /// projection, both residuals and the second norm, the gate/up product, SiLU(gate) and
    /// their product, and the down projection. Multiply by the dtype's size.
    pub fn activation_values_per_token_layer(&self) -> usize {
        let c = &self.config;
        let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
        6 * h + (q + 2 * kv) + 4 * q + 3 * kv + 4 * i
    }

    /// The same weights with another backend.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self> {
        backend.check(&self.device, self.dtype())?;
        self.backend = backend;
        for l in &mut self.layers {
            l.transpose(backend)?;
        }
        Ok(self)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the model holds its LM head in Q8_0 blocks (read on the fused CPU path;
    /// other backends compute with the f32 copy).
    pub fn has_lm_head_q8(&self) -> bool {
        self.lm_head_q8.is_some()
    }

    /// Whether the LM head is the embedding matrix.
    pub fn lm_head_is_tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// Gives the LM head's weight in Q8_0 blocks (as a GGUF stores it), for the fused CPU
    /// path to read instead of the f32 copy. The caller vouches that the blocks hold the
    /// f32 copy's values; only the shape is checked here.
    pub fn set_lm_head_q8(&mut self, w: frozen::Q8Weight) -> Result<()> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if w.dims() != head.dims2()? {
            candle_core::bail!(
                "LM head in Q8_0 of {:?}, the model's is {:?}",
                w.dims(),
                head.dims()
            );
        }
        self.lm_head_q8 = Some(w);
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.config.num_layers)
    }

    /// Token embeddings `(n, hidden)`; they carry no graph.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?;
        self.embed.index_select(&ids, 0)
    }

    /// Runs new positions through the model, appending their keys and values to `cache`.
    ///
    /// `x`: input embeddings `(batch, new, hidden)`. Returns the logits `(batch,
    /// logits_at.len(), vocab)` at the listed indices into the new positions, or `None`
    /// when `logits_at` is empty (a prefix pass that only fills the cache). Inference:
    /// no dropout, and no graph for the adapters' weights.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: &mut Cache,
        pos: &Positions,
        logits_at: &[usize],
    ) -> Result<Option<Tensor>> {
        self.run(x, cache, pos, logits_at, None)
    }

    /// [`Llama::forward`] for training: adapters' dropout draws from `dropout`, and the
    /// result carries the graph back to the adapters and to `x`.
    pub fn forward_train(
        &self,
        x: &Tensor,
        cache: &mut Cache,
        pos: &Positions,
        logits_at: &[usize],
        dropout: &mut Dropout,
    ) -> Result<Option<Tensor>> {
        self.run(x, cache, pos, logits_at, Some(dropout))
    }

    fn run(
        &self,
        x: &Tensor,
        cache: &mut Cache,
        pos: &Positions,
        logits_at: &[usize],
        train: Option<&mut Dropout>,
    ) -> Result<Option<Tensor>> {
        let t = x.dim(1)?;
        let mut segs = [Segment {
            cache,
            len: t,
            pos: pos.clone(),
        }];
        let (h, kept) = self.hidden(x, &mut segs, train, logits_at)?;
        if logits_at.is_empty() {
            return Ok(None);
        }
        if kept {
            let at: Vec<usize> = (0..logits_at.len()).collect();
            return Ok(Some(self.logits(&h, &at)?));
        }
        Ok(Some(self.logits(&h, logits_at)?))
    }

    /// Several independent sequences in one pass (inference): `x` `(1, rows, hidden)`
    /// holds each segment's new positions in turn, each segment attends to its own cache
    /// (and mask) only, and its keys and values are appended to its own cache. The
    /// products run once over all rows, so a batch of short queries (concurrent sessions'
    /// utterances) costs less than one pass each; every segment gets what it gets alone.
    /// Logits as in [`Llama::forward`], at indices into all rows.
    pub fn forward_segments(
        &self,
        x: &Tensor,
        segs: &mut [Segment],
        logits_at: &[usize],
    ) -> Result<Option<Tensor>> {
        let (h, _) = self.hidden(x, segs, None, &[])?;
        if logits_at.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.logits(&h, logits_at)?))
    }

    /// RoPE tables `(t, d / 2)` at positions `ids`.
    fn rope_at(&self, ids: &[u32]) -> Result<(Tensor, Tensor)> {
        let t = ids.len();
        let max = *ids.iter().max().unwrap_or(&0) as usize;
        if max >= self.cos.dim(0)? {
            candle_core::bail!(
                "position {max} is beyond the model's context of {} tokens",
                self.cos.dim(0)?
            );
        }
        let contiguous = ids.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous && !ids.is_empty() {
            return Ok((
                self.cos.narrow(0, ids[0] as usize, t)?,
                self.sin.narrow(0, ids[0] as usize, t)?,
            ));
        }
        let idx = Tensor::new(ids, &self.device)?;
        Ok((
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        ))
    }

    /// The final hidden states (before the last norm) of the new positions of every
    /// segment (one segment, or several with batch 1 and no training). With `keep` (the
    /// positions whose logits are wanted; none: all), the last layer may carry only those
    /// rows past its keys and values (the fused path, one segment, batch 1, no adapters):
    /// then only they come back, in `keep`'s order, and the flag says so.
    fn hidden(
        &self,
        x: &Tensor,
        segs: &mut [Segment],
        mut train: Option<&mut Dropout>,
        keep: &[usize],
    ) -> Result<(Tensor, bool)> {
        let (b, total, _) = x.dims3()?;
        if let Some(&bad) = keep.iter().find(|&&i| i >= total) {
            candle_core::bail!("logits asked at position {bad} of {total}");
        }
        let mut kept = false;
        if segs.is_empty() {
            candle_core::bail!("a forward pass needs at least one segment");
        }
        let multi = segs.len() > 1;
        if multi && (b != 1 || train.is_some()) {
            candle_core::bail!("several segments in one pass need batch 1 and no training");
        }
        if segs.iter().map(|s| s.len).sum::<usize>() != total {
            candle_core::bail!("the segments do not cover the {total} new positions");
        }
        // Per segment: RoPE tables and mask.
        let mut ropes = Vec::with_capacity(segs.len());
        let mut masks = Vec::with_capacity(segs.len());
        for s in segs.iter() {
            let (t, past) = (s.len, s.cache.len);
            let ids: Vec<u32> = match s.pos.ids {
                Some(ids) => {
                    if ids.len() != t {
                        candle_core::bail!("{} position ids for {t} new positions", ids.len());
                    }
                    ids.to_vec()
                }
                None => (past as u32..(past + t) as u32).collect(),
            };
            ropes.push(self.rope_at(&ids)?);
            masks.push(match s.pos.mask {
                Some(m) => Some(m.clone()),
                None if t > 1 => Some(causal_mask(t, past, &self.device, x.dtype())?),
                None => None,
            });
        }
        let mut h = x.clone();
        let eps = self.config.rms_norm_eps;
        let recompute = match self.recompute {
            Recompute::Always => true,
            Recompute::Never => false,
            Recompute::Auto => {
                let bytes = self.activation_values_per_token_layer()
                    * x.dtype().size_in_bytes()
                    * b
                    * total
                    * self.layers.len();
                bytes > RECOMPUTE_ABOVE
            }
        };
        // Whether a layer at or below each one has adapters: then their weights need the
        // gradient of every row above them, so no layer up to there may skip rows.
        let adapters_below: Vec<bool> = self
            .layers
            .iter()
            .scan(false, |any, l| {
                *any |= l.projections().iter().any(|(_, _, p)| p.lora.is_some());
                Some(*any)
            })
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(fl) = layer.frozen(self.backend, eps) {
                let a = &layer.attn;
                let pasts: Vec<_> = segs.iter_mut().map(|s| s.cache.kvs[i].take()).collect();
                let fits = segs
                    .iter()
                    .zip(&pasts)
                    .zip(&masks)
                    .all(|((s, p), m)| kernels_take(p.as_ref(), m.as_ref(), s.len));
                if fits {
                    let args: Vec<_> = segs
                        .iter()
                        .zip(&pasts)
                        .zip(ropes.iter().zip(&masks))
                        .map(|((s, past), ((cos, sin), mask))| frozen::AttendArgs {
                            heads: a.heads(b),
                            t: s.len,
                            cos,
                            sin,
                            scale: a.scale(),
                            past: past.as_ref(),
                            mask: mask.as_ref(),
                            grad_from: if adapters_below[i] {
                                0
                            } else {
                                s.pos.grad_from
                            },
                            keep: None,
                        })
                        .collect();
                    // Adapters (if any) are added inside the fused op, each to its
                    // columns of its product.
                    use farcer_kernels::Site;
                    let (nq, nk) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
                    let (dim, inter) = (h.dim(2)?, layer.mlp.down.weight.dim(1)?);
                    let rows = b * total;
                    let m = &layer.mlp;
                    let parts = [
                        (&a.q, Site::Qkv, 0, nq, dim),
                        (&a.k, Site::Qkv, nq, nk, dim),
                        (&a.v, Site::Qkv, nq + nk, nk, dim),
                        (&a.o, Site::O, 0, dim, nq),
                        (&m.gate, Site::GateUp, 0, inter, dim),
                        (&m.up, Site::GateUp, inter, inter, dim),
                        (&m.down, Site::Down, 0, dim, inter),
                    ]
                    .into_iter()
                    .filter_map(|(p, site, col, width, input)| {
                        p.lora.as_ref().map(|l| {
                            let (la, lb) = l.weights(train.is_some());
                            frozen::LoraInput {
                                site,
                                col,
                                width,
                                a: la,
                                b: lb,
                                scale: l.scale as f32,
                                mask: l.dropout_mask(rows * input, train.as_deref_mut()),
                            }
                        })
                    })
                    .collect::<Vec<_>>();
                    if multi {
                        let (out, kvs) = frozen::layer_segments(&h, &fl, &args, &parts)?;
                        for (s, kv) in segs.iter_mut().zip(kvs) {
                            s.cache.kvs[i] = Some(kv);
                        }
                        h = out;
                    } else {
                        // The last layer's rows that no logit reads stop at their keys
                        // and values.
                        let last = i + 1 == self.layers.len();
                        let mut a0 = args.into_iter().next().expect("one segment");
                        if last
                            && b == 1
                            && parts.is_empty()
                            && !keep.is_empty()
                            && keep.len() < total
                        {
                            a0.keep = Some(keep);
                            kept = true;
                        }
                        let (out, k, v) = frozen::layer(&h, &fl, &a0, parts)?;
                        segs[0].cache.kvs[i] = Some((k, v));
                        h = out;
                    }
                    continue;
                }
                for (s, p) in segs.iter_mut().zip(pasts) {
                    s.cache.kvs[i] = p;
                }
            }
            let be = self.backend;
            if !multi {
                let (cos, sin) = &ropes[0];
                let kv = &mut segs[0].cache.kvs[i];
                let mask = masks[0].as_ref();
                h = match train.as_deref_mut() {
                    Some(d) if recompute && h.track_op() => {
                        block_recomputed(be, eps, layer, &h, cos, sin, mask, kv, d)?
                    }
                    d => block_forward(be, eps, layer, &h, cos, sin, mask, kv, d)?,
                };
                continue;
            }
            // Several segments (inference): each one's attention on its own rows and cache.
            let n = rms_norm(be, &h, &layer.input_norm, eps)?;
            let mut outs = Vec::with_capacity(segs.len());
            let mut off = 0;
            for ((s, (cos, sin)), mask) in segs.iter_mut().zip(&ropes).zip(&masks) {
                let rows = n.narrow(1, off, s.len)?;
                off += s.len;
                let kv = &mut s.cache.kvs[i];
                outs.push(
                    layer
                        .attn
                        .forward(be, &rows, cos, sin, mask.as_ref(), kv, None)?,
                );
            }
            let h1 = (&h + Tensor::cat(&outs, 1)?)?;
            let n = rms_norm(be, &h1, &layer.post_norm, eps)?;
            h = (&h1 + layer.mlp.forward(be, &n, None)?)?;
        }
        for s in segs.iter_mut() {
            s.cache.len += s.len;
        }
        Ok((h, kept))
    }

    /// Final norm and LM head at the listed positions of hidden states `(b, t, hidden)`.
    pub fn logits(&self, h: &Tensor, at: &[usize]) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        if let Some(&bad) = at.iter().find(|&&i| i >= t) {
            candle_core::bail!("logits asked at position {bad} of {t}");
        }
        let sel = if at.len() == t && at.iter().enumerate().all(|(i, &p)| i == p) {
            h.clone()
        } else {
            let idx = Tensor::new(
                at.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &self.device,
            )?;
            h.index_select(&idx, 1)?
        };
        let n = rms_norm(self.backend, &sel, &self.norm, self.config.rms_norm_eps)?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        let flat = n.reshape((b * at.len(), d))?;
        let logits = match &self.lm_head_q8 {
            Some(q) if self.backend == Backend::Kernels => frozen::matmul_t_q8(&flat, q)?,
            _ => frozen::matmul_t(self.backend, &flat, w)?,
        };
        logits.reshape((b, at.len(), self.config.vocab_size))
    }

    /// Adds LoRA adapters (B = 0, so the model is unchanged) to the named projections
    /// (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) of
    /// every layer. Returns the adapters' variables, named as PEFT names them.
    pub fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Vec<(String, candle_core::Var)>> {
        let mut vars = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, proj) in l.projections_mut() {
                if !cfg.target_modules.iter().any(|t| t == name) {
                    continue;
                }
                let (out_dim, in_dim) = proj.weight.dims2()?;
                let prefix = peft_name(i, name);
                let lora = LoraLinear::new(cfg, in_dim, out_dim, seed, &prefix, &self.device)?;
                vars.push((format!("{prefix}.lora_A.weight"), lora.a.clone()));
                vars.push((format!("{prefix}.lora_B.weight"), lora.b.clone()));
                proj.lora = Some(lora);
            }
        }
        Ok(vars)
    }

    /// Folds every LoRA adapter into its weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        for l in self.layers.iter_mut() {
            for (_, p) in l.projections_mut() {
                p.merge_lora()?;
            }
            let a = &mut l.attn;
            a.qkv = stack(&mut [&mut a.q, &mut a.k, &mut a.v])?;
            let m = &mut l.mlp;
            m.gate_up = stack(&mut [&mut m.gate, &mut m.up])?;
            l.transpose(self.backend)?;
        }
        Ok(())
    }

    /// Attaches an adapter to projection `name` of layer `layer`.
    pub fn set_lora(&mut self, layer: usize, name: &str, mut lora: LoraLinear) -> Result<()> {
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {layer}")))?;
        let (_, p) = l
            .projections_mut()
            .into_iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no projection `{name}`")))?;
        let (out_dim, in_dim) = p.weight.dims2()?;
        if lora.a.dims() != [lora.a.dim(0)?, in_dim] || lora.b.dims() != [out_dim, lora.a.dim(0)?] {
            candle_core::bail!(
                "LoRA for layer {layer} {name}: shapes {:?} / {:?} do not fit {out_dim}x{in_dim}",
                lora.a.dims(),
                lora.b.dims()
            );
        }
        lora.site = format!("lora-dropout:{}", peft_name(layer, name));
        p.lora = Some(lora);
        Ok(())
    }

    /// The attached adapters' variables, named as PEFT names them.
    pub fn lora_vars(&self) -> Vec<(String, candle_core::Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, _, p) in l.projections() {
                if let Some(lora) = &p.lora {
                    let prefix = peft_name(i, name);
                    out.push((format!("{prefix}.lora_A.weight"), lora.a.clone()));
                    out.push((format!("{prefix}.lora_B.weight"), lora.b.clone()));
                }
            }
        }
        out
    }

    /// Whether any LoRA adapter is attached (then the prompt prefix depends on trained
    /// weights and must be recomputed during training).
    pub fn has_lora(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.projections().iter().any(|(_, _, p)| p.lora.is_some()))
    }

    /// Every frozen weight (for tests that check no gradient reaches them).
    pub fn frozen_weights(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed, &self.norm];
        if let Some(h) = &self.lm_head {
            v.push(h);
        }
        for l in &self.layers {
            v.extend([&l.input_norm, &l.post_norm, &l.attn.qkv, &l.mlp.gate_up]);
            v.extend(l.projections().into_iter().map(|(_, _, p)| &p.weight));
        }
        v
    }

    /// Number of parameters of the frozen model.
    pub fn num_params(&self) -> usize {
        let c = &self.config;
        let per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            + c.num_heads * c.head_dim * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size;
        let head = if self.lm_head.is_some() {
            c.vocab_size * c.hidden_size
        } else {
            0
        };
        c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size + head
    }
}

impl Block {
    /// Refreshes the transposed copies of the fused weights (the kernels' backend only).
    fn transpose(&mut self, be: Backend) -> Result<()> {
        self.transposed = if be == Backend::Kernels {
            // The model keeps these tensors, so keeping them beside costs nothing.
            let t = |w| frozen::FrozenWeight::new(w, true);
            Some([
                t(&self.attn.qkv)?,
                t(&self.attn.o.weight)?,
                t(&self.mlp.gate_up)?,
                t(&self.mlp.down.weight)?,
            ])
        } else {
            None
        };
        Ok(())
    }

    /// The seven projections as (Hugging Face name, module group, projection).
    fn projections(&self) -> [(&'static str, &'static str, &Proj); 7] {
        [
            ("q_proj", "self_attn", &self.attn.q),
            ("k_proj", "self_attn", &self.attn.k),
            ("v_proj", "self_attn", &self.attn.v),
            ("o_proj", "self_attn", &self.attn.o),
            ("gate_proj", "mlp", &self.mlp.gate),
            ("up_proj", "mlp", &self.mlp.up),
            ("down_proj", "mlp", &self.mlp.down),
        ]
    }

    /// The layer as one fused frozen op, on the kernels' backend when no projection has
    /// a bias (the op adds the adapters on any of them).
    fn frozen(&self, be: Backend, eps: f64) -> Option<frozen::FrozenLayer> {
        let ps = self.projections();
        let no_bias = ps.iter().all(|(_, _, p)| p.bias.is_none());
        let weights = [
            &self.input_norm,
            &self.attn.qkv,
            &self.attn.o.weight,
            &self.post_norm,
            &self.mlp.gate_up,
            &self.mlp.down.weight,
        ];
        let ok = no_bias
            && be == Backend::Kernels
            && self.transposed.is_some()
            && weights.iter().all(|w| w.is_contiguous());
        ok.then(|| frozen::FrozenLayer {
            input_norm: self.input_norm.clone(),
            transposed: self.transposed.clone().expect("checked"),
            qkv: self.attn.qkv.clone(),
            o: self.attn.o.weight.clone(),
            post_norm: self.post_norm.clone(),
            gate_up: self.mlp.gate_up.clone(),
            down: self.mlp.down.weight.clone(),
            eps: eps as f32,
        })
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj)> {
        vec![
            ("q_proj", &mut self.attn.q),
            ("k_proj", &mut self.attn.k),
            ("v_proj", &mut self.attn.v),
            ("o_proj", &mut self.attn.o),
            ("gate_proj", &mut self.mlp.gate),
            ("up_proj", &mut self.mlp.up),
            ("down_proj", &mut self.mlp.down),
        ]
    }
}

impl Attention {
    fn heads(&self, batch: usize) -> Heads {
        Heads {
            batch,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// `1 / sqrt(head_dim)`, applied to q.
    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        be: Backend,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut Option<(Tensor, Tensor)>,
        mut train: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, hk, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let flat = x.reshape((b * t, d))?;
        let qkv = frozen::matmul_t(be, &flat, &self.qkv)?;
        if be == Backend::Kernels && kernels_take(kv.as_ref(), mask, t) {
            let parts = [&self.q, &self.k, &self.v];
            let qkv = add_extras(qkv, &flat, &parts, train.as_deref_mut())?;
            let past = kv.take();
            let (out, k, v) = frozen::attend(
                &qkv,
                &frozen::AttendArgs {
                    heads: self.heads(b),
                    t,
                    cos,
                    sin,
                    scale: self.scale(),
                    past: past.as_ref(),
                    mask,
                    grad_from: 0,
                    keep: None,
                },
            )?;
            *kv = Some((k, v));
            return self.o.forward(be, &out, train)?.reshape((b, t, d));
        }
        let (nq, nk) = (h * hd, hk * hd);
        let q = self
            .q
            .finish(qkv.narrow(1, 0, nq)?, &flat, train.as_deref_mut())?;
        let k = self
            .k
            .finish(qkv.narrow(1, nq, nk)?, &flat, train.as_deref_mut())?;
        let v = self
            .v
            .finish(qkv.narrow(1, nq + nk, nk)?, &flat, train.as_deref_mut())?;
        let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, hk, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, hk, hd))?.transpose(1, 2)?.contiguous()?;
        // The attention scale goes on q (t x d) rather than on the scores (t x s).
        let q = (rope(&q, cos, sin)? * (1.0 / (hd as f64).sqrt()))?;
        let k = rope(&k, cos, sin)?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let rep = h / hk;
        // Grouped-query attention without copying keys: the `rep` query heads that share
        // a key head are stacked along the time axis.
        let q = q.reshape((b, hk, rep, t, hd))?;
        let out = frozen::attention(&q, &k, &v, mask)?; // (b, hk, rep, t, hd)
        let out = out
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, h * hd))?;
        self.o.forward(be, &out, train)?.reshape((b, t, d))
    }
}

impl Mlp {
    fn forward(&self, be: Backend, x: &Tensor, mut train: Option<&mut Dropout>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let flat = x.reshape((b * t, d))?;
        let gu = frozen::matmul_t(be, &flat, &self.gate_up)?;
        if be == Backend::Kernels {
            let gu = add_extras(gu, &flat, &[&self.gate, &self.up], train.as_deref_mut())?;
            return self
                .down
                .forward(be, &frozen::swiglu(&gu)?, train)?
                .reshape((b, t, d));
        }
        let i = gu.dim(1)? / 2;
        let g = self
            .gate
            .finish(gu.narrow(1, 0, i)?, &flat, train.as_deref_mut())?;
        let g = candle_nn::ops::silu(&g)?;
        let u = self
            .up
            .finish(gu.narrow(1, i, i)?, &flat, train.as_deref_mut())?;
        self.down.forward(be, &(g * u)?, train)?.reshape((b, t, d))
    }
}

/// One decoder layer on the op-by-op path: norm, attention (appending to `kv`), residual,
/// norm, MLP, residual.
#[allow(clippy::too_many_arguments)]
fn block_forward(
    be: Backend,
    eps: f64,
    layer: &Block,
    h: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    kv: &mut Option<(Tensor, Tensor)>,
    mut train: Option<&mut Dropout>,
) -> Result<Tensor> {
    let n = rms_norm(be, h, &layer.input_norm, eps)?;
    let a = layer
        .attn
        .forward(be, &n, cos, sin, mask, kv, train.as_deref_mut())?;
    let h1 = (h + a)?;
    let n = rms_norm(be, &h1, &layer.post_norm, eps)?;
    let m = layer.mlp.forward(be, &n, train)?;
    h1 + m
}

/// [`block_forward`] for training without keeping the layer's activations: run without a
/// graph (drawing the same dropout masks), then joined to the graph of `h` and of the
/// layer's adapters by an op whose backward recomputes the layer with a graph from its
/// input, replaying the same masks, and back-propagates through it. The new keys and
/// values go into `kv` without a graph (no later pass of a training step reads them).
#[allow(clippy::too_many_arguments)]
fn block_recomputed(
    be: Backend,
    eps: f64,
    layer: &Block,
    h: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    kv: &mut Option<(Tensor, Tensor)>,
    dropout: &mut Dropout,
) -> Result<Tensor> {
    if kv
        .as_ref()
        .is_some_and(|(k, v)| k.track_op() || v.track_op())
    {
        return block_forward(be, eps, layer, h, cos, sin, mask, kv, Some(dropout));
    }
    let past = kv.clone();
    let replay = std::sync::Mutex::new(dropout.clone());
    let x = h.detach();
    let value = block_forward(be, eps, layer, &x, cos, sin, mask, kv, Some(dropout))?.detach();
    *kv = kv.take().map(|(k, v)| (k.detach(), v.detach()));
    let vars: Vec<candle_core::Var> = layer
        .projections()
        .into_iter()
        .filter_map(|(_, _, p)| p.lora.as_ref())
        .flat_map(|l| [l.a.clone(), l.b.clone()])
        .collect();
    let params = if vars.is_empty() {
        None
    } else {
        let flat = vars
            .iter()
            .map(|v| v.as_tensor().flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&flat, 0)?)
    };
    let (layer, cos, sin, mask) = (layer.clone(), cos.clone(), sin.clone(), mask.cloned());
    let backward: frozen::RecomputeBackward = Box::new(move |grad: &Tensor| {
        let xv = candle_core::Var::from_tensor(&x)?;
        let mut d = replay
            .lock()
            .map_err(|_| candle_core::Error::Msg("recompute: lock poisoned".into()))?
            .clone();
        let mut kv = past.clone();
        let out = block_forward(
            be,
            eps,
            &layer,
            xv.as_tensor(),
            &cos,
            &sin,
            mask.as_ref(),
            &mut kv,
            Some(&mut d),
        )?;
        let s = (out.to_dtype(DType::F32)? * grad.to_dtype(DType::F32)?)?.sum_all()?;
        let g = s.backward()?;
        let dx = match g.get(xv.as_tensor()) {
            Some(t) => t.clone(),
            None => x.zeros_like()?,
        };
        let dp = if vars.is_empty() {
            None
        } else {
            let parts = vars
                .iter()
                .map(|v| match g.get(v.as_tensor()) {
                    Some(t) => t.flatten_all(),
                    None => Tensor::zeros(v.elem_count(), v.dtype(), v.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        };
        Ok((dx, dp))
    });
    frozen::attach_recomputed(h, params.as_ref(), value, backward)
}

/// Whether the fused attention kernels can take a layer's cache and mask: the cached
/// keys and values carry no graph, and the mask is `(t, past + t)`.
fn kernels_take(past: Option<&(Tensor, Tensor)>, mask: Option<&Tensor>, t: usize) -> bool {
    let p = past.map_or(0, |(k, _)| k.dims()[2]);
    past.is_none_or(|(k, v)| !k.track_op() && !v.track_op())
        && mask.is_none_or(|m| m.dims() == [t, p + t])
}

/// Adds the parts' biases and adapters to their columns of the fused product `y`.
fn add_extras(
    y: Tensor,
    x: &Tensor,
    parts: &[&Proj],
    mut train: Option<&mut Dropout>,
) -> Result<Tensor> {
    let extras = parts
        .iter()
        .map(|p| p.extra(x, train.as_deref_mut()))
        .collect::<Result<Vec<_>>>()?;
    if extras.iter().all(Option::is_none) {
        return Ok(y);
    }
    let n = x.dim(0)?;
    let cols = extras
        .into_iter()
        .zip(parts)
        .map(|(e, p)| match e {
            Some(e) => Ok(e),
            None => Tensor::zeros((n, p.weight.dim(0)?), y.dtype(), y.device()),
        })
        .collect::<Result<Vec<_>>>()?;
    y + Tensor::cat(&cols, 1)?
}

/// Stacks the projections' weights into one `(sum of outs, in)` tensor and points each
/// projection's weight at its rows (a zero-copy view).
fn stack(parts: &mut [&mut Proj]) -> Result<Tensor> {
    let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
    let fused = Tensor::cat(&ws, 0)?;
    let mut off = 0;
    for p in parts.iter_mut() {
        let n = p.weight.dim(0)?;
        p.weight = fused.narrow(0, off, n)?;
        off += n;
    }
    Ok(fused)
}

/// Cosine and sine tables `(max_positions, head_dim / 2)`.
fn rope_tables(c: &Config, dev: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let inv = c.inv_freq().map_err(candle_core::Error::Msg)?;
    let n = c.max_position_embeddings;
    let inv_t = Tensor::new(inv.as_slice(), dev)?;
    let pos = Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)?;
    let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv_t.unsqueeze(0)?)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

pub use farcer_nn::{causal_mask, mask_from_allowed};

/// Log-softmax over the vocabulary of logits `(.., vocab)`, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?;
    // The shift only keeps exp() finite; it needs no gradient of its own.
    let max = l.max_keepdim(D::Minus1)?.detach();
    let shifted = l.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Greedy next token from logits `(vocab,)`.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()
}
