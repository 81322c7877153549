//! LoRA adapters in PEFT's files: `adapter_config.json` and `adapter_model.safetensors`,
//! written so that PEFT loads them and read back from PEFT's.

use crate::model::llama::{Llama, PEFT_PREFIX};
use crate::model::lora::{LoraConfig, LoraLinear};
use crate::model::projection::Projection;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

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
    match k.strip_prefix(PEFT_PREFIX) {
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
    projection: Option<&Projection>,
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
    model: &mut Llama,
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
