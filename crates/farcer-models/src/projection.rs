//! FARCER's modality projection: image vectors (size p, from the ViT) into the LLM's
//! input-embedding space (size q). One `Linear(p, q)` (base FARCER), or L layers
//! `[Linear(p, p), GELU, Dropout] * (L - 1)` then `Linear(p, q)` (three-layer FARCER).
//! Initialised like PyTorch's `nn.Linear` (uniform in +-1/sqrt(fan_in)) from a seeded RNG.

use crate::dropout::Dropout;
use crate::Rng;
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionConfig {
    /// Number of linear layers (1: base FARCER; 3: three-layer FARCER).
    pub layers: usize,
    /// Dropout after each hidden GELU (the paper: 0.05).
    pub dropout: f64,
    /// Input size p (the ViT's hidden size).
    pub in_dim: usize,
    /// Output size q (the LLM's hidden size).
    pub out_dim: usize,
}

pub struct Projection {
    pub config: ProjectionConfig,
    /// `(weight (out, in), bias (out))` per layer.
    layers: Vec<(Var, Var)>,
}

impl Projection {
    pub fn new(config: ProjectionConfig, seed: u64, device: &Device) -> Result<Self> {
        if config.layers == 0 {
            candle_core::bail!("a projection needs at least one layer");
        }
        let mut rng = Rng::derive(seed, "projection-init");
        let mut layers = Vec::new();
        for i in 0..config.layers {
            let (inp, out) = (
                config.in_dim,
                if i + 1 == config.layers {
                    config.out_dim
                } else {
                    config.in_dim
                },
            );
            let bound = 1.0 / (inp as f64).sqrt();
            let mut u = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            let w = Var::from_tensor(&Tensor::from_vec(u(out * inp), (out, inp), device)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(u(out), out, device)?)?;
            layers.push((w, b));
        }
        Ok(Projection { config, layers })
    }

    /// `x`: `(n, p)` image vectors; returns `(n, q)`. With `train` (`Some`), dropout is
    /// on and the result carries the graph back to the weights; without, neither.
    pub fn forward(&self, x: &Tensor, mut train: Option<&mut Dropout>) -> Result<Tensor> {
        let training = train.is_some();
        let mut h = x.to_dtype(DType::F32)?;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            // Outside training the weights are read detached: inference records no graph.
            let (w, b) = if training {
                (w.as_tensor().clone(), b.as_tensor().clone())
            } else {
                (w.as_tensor().detach(), b.as_tensor().detach())
            };
            h = h.matmul(&w.t()?)?.broadcast_add(&b)?;
            if i + 1 < self.layers.len() {
                h = h.gelu_erf()?;
                if let Some(d) = train.as_deref_mut() {
                    h = d.apply("projection-dropout", &h, self.config.dropout)?;
                }
            }
        }
        Ok(h)
    }

    /// The trainable variables, named as in the authors' `nn.Sequential` `mp` (Linear,
    /// GELU, Dropout, Linear, ...): `mp.0.weight`, `mp.3.weight`, ...
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, (w, b))| {
                [
                    (format!("mp.{}.weight", 3 * i), w.clone()),
                    (format!("mp.{}.bias", 3 * i), b.clone()),
                ]
            })
            .collect()
    }

    /// Names of the Linear modules (`mp.0`, `mp.3`, ...), PEFT's `modules_to_save`.
    pub fn module_names(&self) -> Vec<String> {
        (0..self.layers.len())
            .map(|i| format!("mp.{}", 3 * i))
            .collect()
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Replaces the weights with saved ones (names as in [`Projection::vars`]).
    pub fn load_tensors(&self, t: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.vars() {
            let v = t.get(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!("projection weights lack `{name}`"))
            })?;
            if v.dims() != var.dims() {
                candle_core::bail!(
                    "projection `{name}`: saved {:?}, model {:?}",
                    v.dims(),
                    var.dims()
                );
            }
            var.set(&v.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .map(|(w, b)| w.elem_count() + b.elem_count())
            .sum()
    }
}
