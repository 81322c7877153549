//! LoRA adapters (Hu et al. 2021) in PEFT's form: `y = W x + (alpha / r) B A dropout(x)`,
//! A `(r, in)` initialised like PEFT (Kaiming-uniform, bound 1/sqrt(in)), B `(out, r)`
//! zero, so a fresh adapter leaves the model unchanged.

use crate::util::Rng;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

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
    rng: Arc<Mutex<Rng>>,
}

impl LoraLinear {
    /// A fresh adapter; `name` seeds its own RNG stream so adapters do not share draws.
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
            rng: Arc::new(Mutex::new(Rng::derive(
                seed,
                &format!("lora-dropout:{name}"),
            ))),
        })
    }

    /// An adapter with given weights (loaded from a PEFT file).
    pub fn from_weights(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraLinear {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout,
            rng: Arc::new(Mutex::new(Rng::new(0))),
        })
    }

    /// `scale * dropout(x) A^T B^T` for `x` of shape `(n, in)`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            let mut rng = self.rng.lock().expect("lora rng");
            dropout(x, self.dropout, &mut rng)?
        } else {
            x.clone()
        };
        let x = x.to_dtype(self.a.dtype())?;
        let h = x.matmul(&self.a.as_tensor().t()?)?;
        (h.matmul(&self.b.as_tensor().t()?)? * self.scale)?.to_dtype(x.dtype())
    }

    /// `scale * B A`, the change to the weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// Inverted dropout with a seeded mask (candle's own RNG cannot be seeded on the CPU).
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.uniform() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}
