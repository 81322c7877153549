//! LoRA adapters (Hu et al. 2021) in PEFT's form: `y = W x + (alpha / r) B A dropout(x)`,
//! A `(r, in)` initialised like PEFT (Kaiming-uniform, bound 1/sqrt(in)), B `(out, r)`
//! zero, so a fresh adapter leaves the model unchanged.

use super::dropout::Dropout;
use crate::util::Rng;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.1
}
/// The decoder projections an adapter may sit on, by their PEFT names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]
}

impl Default for LoraConfig {
    /// The paper's: r = 8, alpha = 16, dropout 0.1 on q, k, v.
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_targets(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// One adapter on one projection.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// This adapter's dropout stream (see [`Dropout`]); the model sets it to the
    /// adapter's PEFT name when the adapter is attached.
    pub site: String,
}

impl LoraLinear {
    /// A fresh adapter; `name` seeds its initialisation and names its dropout stream, so
    /// adapters do not share draws.
    pub fn new(
        cfg: &LoraConfig,
        in_dim: usize,
        out_dim: usize,
        seed: u64,
        name: &str,
        dev: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::derive(seed, &format!("lora-init:{name}"));
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_dim)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, in_dim), dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(
            (out_dim, cfg.r),
            candle_core::DType::F32,
            dev,
        )?)?;
        Ok(LoraLinear {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            site: format!("lora-dropout:{name}"),
        })
    }

    /// An adapter with given weights (loaded from a PEFT file).
    pub fn from_weights(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraLinear {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout,
            site: "lora-dropout".into(),
        })
    }

    /// `scale * dropout(x) A^T B^T` for `x` of shape `(n, in)`; `train` (`Some`) turns
    /// dropout on and attaches the weights to their variables.
    pub fn delta(&self, x: &Tensor, train: Option<&mut Dropout>) -> Result<Tensor> {
        let training = train.is_some();
        let x = match train {
            Some(d) => d.apply(&self.site, x, self.dropout)?,
            None => x.clone(),
        };
        // The adapter computes in its own dtype (f32) and answers in the model's.
        let model_dtype = x.dtype();
        let x = x.to_dtype(self.a.dtype())?;
        // Outside training the weights are read detached, so inference records no graph.
        let (a, b) = self.weights(training);
        let h = x.matmul(&a.t()?)?;
        (h.matmul(&b.t()?)? * self.scale)?.to_dtype(model_dtype)
    }

    /// The dropout mask `delta` would draw for `n` values (the same stream, so the fused
    /// path and the op-by-op path train alike); `None` when dropout is off.
    pub fn dropout_mask(&self, n: usize, train: Option<&mut Dropout>) -> Option<Vec<f32>> {
        match train {
            Some(d) if self.dropout > 0.0 => Some(d.mask(&self.site, n, self.dropout)),
            _ => None,
        }
    }

    /// `A` and `B`, attached to their variables when training, detached otherwise.
    pub fn weights(&self, train: bool) -> (Tensor, Tensor) {
        if train {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        }
    }

    /// `scale * B A`, the change to the weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// PEFT's `adapter_config.json` (the fields PEFT needs to load a LoRA adapter).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "yes")]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
}

fn none_bias() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

/// The PEFT key of an adapter weight on the plain LLM (`base_model.model.model.layers...`)
/// for its key inside FARCER (`base_model.model.lm.model.layers...`).
pub fn plain_peft_key(k: &str) -> String {
    match k.strip_prefix(super::llama::PEFT_PREFIX) {
        Some(rest) => format!("base_model.model.{rest}"),
        None => k.to_string(),
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout. With a
/// projection (FARCER): LoRA weights as
/// `base_model.model.lm.model.layers.N.self_attn.q_proj.lora_A.weight` and the projection
/// as `base_model.model.mp.K.weight` (a module to save). Without (a text-only model): a
/// plain causal-LM adapter, `base_model.model.model.layers.N...`, that PEFT loads onto the
/// base LLM as it is.
pub fn save_peft(
    dir: &std::path::Path,
    cfg: &LoraConfig,
    lora: &[(String, Var)],
    projection: Option<&super::projection::Projection>,
    base_model: &str,
) -> crate::Result<()> {
    let mut t = std::collections::HashMap::new();
    for (k, v) in lora {
        let key = match projection {
            Some(_) => k.clone(),
            None => plain_peft_key(k),
        };
        t.insert(key, v.as_tensor().clone());
    }
    if let Some(p) = projection {
        for (k, v) in p.tensors() {
            t.insert(format!("base_model.model.{k}"), v);
        }
    }
    crate::util::save_tensors(&t, &dir.join("adapter_model.safetensors"))?;
    let pc = PeftConfig {
        peft_type: "LORA".into(),
        task_type: projection.is_none().then(|| "CAUSAL_LM".into()),
        r: cfg.r,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules: cfg.target_modules.clone(),
        modules_to_save: projection.map(|p| p.module_names()),
        bias: "none".into(),
        fan_in_fan_out: false,
        base_model_name_or_path: Some(base_model.to_string()),
        use_rslora: false,
        use_dora: false,
        inference_mode: true,
        init_lora_weights: true,
    };
    crate::util::write_json_atomic(&dir.join("adapter_config.json"), &pc)
}

/// Reads a PEFT LoRA adapter folder: attaches its adapters to `model` and returns the
/// config and the saved modules (the projection, `mp.K.*`), if any.
pub fn load_peft(
    dir: &std::path::Path,
    model: &mut super::llama::Llama,
) -> crate::Result<(LoraConfig, std::collections::HashMap<String, Tensor>)> {
    use crate::error::Error;
    let cp = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
    let pc: PeftConfig = serde_json::from_str(&text)
        .map_err(|e| Error::input(cp.display().to_string(), e.to_string()))?;
    if pc.peft_type != "LORA" || pc.use_dora || pc.fan_in_fan_out || pc.bias != "none" {
        return Err(Error::input(
            cp.display().to_string(),
            "only plain LoRA adapters (no DoRA, fan_in_fan_out or biases) are supported",
        ));
    }
    let scale = if pc.use_rslora {
        pc.lora_alpha / (pc.r as f64).sqrt()
    } else {
        pc.lora_alpha / pc.r as f64
    };
    let wp = dir.join("adapter_model.safetensors");
    let dev = model.device().clone();
    let tensors = candle_core::safetensors::load(&wp, &dev)
        .map_err(|e| Error::input(wp.display().to_string(), e.to_string()))?;
    let mut saved = std::collections::HashMap::new();
    let mut pairs: std::collections::BTreeMap<(usize, String), (Option<Tensor>, Option<Tensor>)> =
        Default::default();
    for (k, v) in tensors {
        let rest = k.strip_prefix("base_model.model.").unwrap_or(&k);
        if let Some(m) = rest
            .strip_prefix("lm.model.layers.")
            .or_else(|| rest.strip_prefix("model.layers."))
        {
            // N.self_attn.q_proj.lora_A.weight
            let parts: Vec<&str> = m.split('.').collect();
            if parts.len() == 5 && parts[4] == "weight" {
                let layer: usize = parts[0].parse().map_err(|_| {
                    Error::input(wp.display().to_string(), format!("bad key `{k}`"))
                })?;
                let e = pairs.entry((layer, parts[2].to_string())).or_default();
                match parts[3] {
                    "lora_A" => e.0 = Some(v.to_dtype(candle_core::DType::F32)?),
                    "lora_B" => e.1 = Some(v.to_dtype(candle_core::DType::F32)?),
                    _ => {
                        return Err(Error::input(
                            wp.display().to_string(),
                            format!("unexpected key `{k}`"),
                        ))
                    }
                }
                continue;
            }
            return Err(Error::input(
                wp.display().to_string(),
                format!("unexpected key `{k}`"),
            ));
        }
        saved.insert(rest.to_string(), v);
    }
    if pairs.is_empty() {
        return Err(Error::input(
            wp.display().to_string(),
            "no LoRA weights found",
        ));
    }
    for ((layer, name), (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::input(
                wp.display().to_string(),
                format!("layer {layer} {name}: lora_A or lora_B missing"),
            ));
        };
        model.set_lora(
            layer,
            &name,
            LoraLinear::from_weights(a, b, scale, pc.lora_dropout)?,
        )?;
    }
    let cfg = LoraConfig {
        r: pc.r,
        alpha: pc.lora_alpha,
        dropout: pc.lora_dropout,
        target_modules: pc.target_modules,
    };
    Ok((cfg, saved))
}
