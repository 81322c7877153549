//! LoRA adapters (Hu et al. 2021) in PEFT's form: `y = W x + (alpha / r) B A dropout(x)`,
//! A `(r, in)` initialised like PEFT (Kaiming-uniform, bound 1/sqrt(in)), B `(out, r)`
//! zero, so a fresh adapter leaves the model unchanged.

use crate::dropout::Dropout;
use crate::Rng;
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
