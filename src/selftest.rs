//! `farcer selftest`: does this build compute on a device what the CPU computes?
//!
//! A small seeded random Llama with LoRA adapters on q, k, v runs a cached-prefix forward
//! and a training backward twice: on the fused f32 CPU kernels (the reference) and on the
//! chosen device and dtype through candle's ops. Logits, the input-embedding gradient and
//! an adapter's gradient must agree within the dtype's tolerance. On a GPU this is the
//! first thing to run after a build; on the CPU (`--device cpu`) it checks candle's path
//! against the kernels, which share no code.

use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::frozen::Backend;
use crate::model::llama::{Config, Llama, Positions};
use crate::model::lora::LoraConfig;
use crate::util::Rng;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde::Serialize;
use std::collections::HashMap;

/// One comparison: the largest difference relative to the reference's largest value.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub max_abs_diff: f64,
    /// Largest absolute value of the reference.
    pub scale: f64,
    /// `max_abs_diff / scale` may not exceed this.
    pub tolerance: f64,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub dtype: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// The relative tolerance of a dtype against the f32 reference (bf16 keeps 8 bits of
/// mantissa, f16 11).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 6e-2,
        DType::F16 => 1e-2,
        _ => 1e-4,
    }
}

/// A Llama small enough to run anywhere in a second, with grouped-query attention and
/// more positions than one attention block of the kernels.
fn config() -> Config {
    Config {
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: 320,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        rope_freq_divisors: None,
    }
}

/// Seeded weights under Hugging Face's names, on the CPU in f32.
fn weights(c: &Config, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::derive(seed, "selftest-weights");
    let mut t = HashMap::new();
    let mut put = |name: String, rows: usize, cols: usize, around_one: bool| -> Result<()> {
        let bound = 1.0 / (cols as f64).sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let u = (rng.uniform() * 2.0 - 1.0) * bound;
                (if around_one { 1.0 + 0.1 * u } else { u }) as f32
            })
            .collect();
        let shape: Vec<usize> = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok(())
    };
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    put("model.embed_tokens.weight".into(), c.vocab_size, h, false)?;
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), 1, h, true)?;
        put(
            format!("{p}.self_attn.q_proj.weight"),
            c.num_heads * hd,
            h,
            false,
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            c.num_kv_heads * hd,
            h,
            false,
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            c.num_kv_heads * hd,
            h,
            false,
        )?;
        put(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            c.num_heads * hd,
            false,
        )?;
        put(format!("{p}.post_attention_layernorm.weight"), 1, h, true)?;
        put(format!("{p}.mlp.gate_proj.weight"), i, h, false)?;
        put(format!("{p}.mlp.up_proj.weight"), i, h, false)?;
        put(format!("{p}.mlp.down_proj.weight"), h, i, false)?;
    }
    put("model.norm.weight".into(), 1, h, true)?;
    put("lm_head.weight".into(), c.vocab_size, h, false)?;
    Ok(t)
}

/// What one backend computed, on the CPU in f32.
struct Outputs {
    logits: Tensor,
    train_logits: Tensor,
    grad_input: Tensor,
    grad_lora_a: Tensor,
    grad_lora_down: Tensor,
}

fn run_model(
    weights: &HashMap<String, Tensor>,
    device: &Device,
    dtype: DType,
    backend: Backend,
) -> Result<Outputs> {
    let c = config();
    let vb = VarBuilder::from_tensors(weights.clone(), dtype, device);
    let mut model = Llama::load_with(vb, &c, backend)?;
    // Adapters on all seven projections: each sits at its own place in the fused op.
    let lora = LoraConfig {
        dropout: 0.1,
        target_modules: crate::model::lora::PROJECTIONS.map(String::from).to_vec(),
        ..Default::default()
    };
    let vars = model.add_lora(&lora, 1)?;
    // B starts at zero; seeded values make the adapters matter.
    let mut rng = Rng::derive(2, "selftest-lora-b");
    for (name, v) in &vars {
        if name.ends_with("lora_B.weight") {
            let n = v.elem_count();
            let b: Vec<f32> = (0..n).map(|_| (rng.uniform() as f32 - 0.5) * 0.1).collect();
            v.set(&Tensor::from_vec(b, v.shape(), device)?)?;
        }
    }
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let ids: Vec<u32> = (0..160u32)
        .map(|i| (i * 37 + 11) % c.vocab_size as u32)
        .collect();
    let (prefix, rest) = ids.split_at(32);
    let at: Vec<usize> = (0..rest.len()).collect();
    let pos = Positions::default();

    // Inference: a prefix into the cache, then the rest with logits everywhere.
    let mut cache = model.new_cache();
    model.forward(&model.embed(prefix)?.unsqueeze(0)?, &mut cache, &pos, &[])?;
    let logits = model
        .forward(&model.embed(rest)?.unsqueeze(0)?, &mut cache, &pos, &at)?
        .ok_or_else(|| crate::Error::msg("selftest: no logits"))?;

    // Training: gradients of a fixed weighting of the logits, with adapter dropout.
    let x = Var::from_tensor(&model.embed(&ids)?.unsqueeze(0)?)?;
    let all: Vec<usize> = (0..ids.len()).collect();
    let mut dropout = Dropout::new(7);
    let train_logits = model
        .forward_train(
            x.as_tensor(),
            &mut model.new_cache(),
            &pos,
            &all,
            &mut dropout,
        )?
        .ok_or_else(|| crate::Error::msg("selftest: no logits"))?;
    let n = train_logits.elem_count();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = Tensor::from_vec(w, train_logits.shape(), device)?.to_dtype(train_logits.dtype())?;
    let grads = (&train_logits * w)?.sum_all()?.backward()?;
    let a = &vars
        .iter()
        .find(|(n, _)| n.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
        .ok_or_else(|| crate::Error::msg("selftest: no adapter on q"))?
        .1;
    let down = &vars
        .iter()
        .find(|(n, _)| n.ends_with("layers.0.mlp.down_proj.lora_A.weight"))
        .ok_or_else(|| crate::Error::msg("selftest: no adapter on down"))?
        .1;
    let missing = || crate::Error::msg("selftest: a gradient is missing");
    Ok(Outputs {
        logits: cpu(&logits)?,
        train_logits: cpu(&train_logits)?,
        grad_input: cpu(grads.get(&x).ok_or_else(missing)?)?,
        grad_lora_a: cpu(grads.get(a).ok_or_else(missing)?)?,
        grad_lora_down: cpu(grads.get(down).ok_or_else(missing)?)?,
    })
}

fn compare(name: &str, got: &Tensor, want: &Tensor, tolerance: f64) -> Result<Check> {
    let diff = (got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let rel = diff / scale.max(1e-12);
    Ok(Check {
        name: name.into(),
        max_abs_diff: diff,
        scale,
        tolerance,
        passed: rel.is_finite() && rel <= tolerance,
    })
}

/// Runs the self-test on `device` in `dtype` (candle's ops) against the CPU kernels.
pub fn run(device: &Device, dtype: DType) -> Result<Report> {
    let w = weights(&config(), 0)?;
    let want = run_model(&w, &Device::Cpu, DType::F32, Backend::Kernels)?;
    let got = run_model(&w, device, dtype, Backend::Candle)?;
    let tol = tolerance(dtype);
    Ok(Report {
        device: format!("{:?}", device.location()),
        dtype: format!("{dtype:?}").to_lowercase(),
        checks: vec![
            compare(
                "logits after a cached prefix",
                &got.logits,
                &want.logits,
                tol,
            )?,
            compare(
                "training logits (adapter dropout on)",
                &got.train_logits,
                &want.train_logits,
                tol,
            )?,
            compare(
                "gradient of the input embeddings",
                &got.grad_input,
                &want.grad_input,
                tol,
            )?,
            compare(
                "gradient of an adapter (layer 0 q_proj lora_A)",
                &got.grad_lora_a,
                &want.grad_lora_a,
                tol,
            )?,
            compare(
                "gradient of an adapter (layer 0 down_proj lora_A)",
                &got.grad_lora_down,
                &want.grad_lora_down,
                tol,
            )?,
        ],
    })
}
