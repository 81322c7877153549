//! Vision Transformer (Dosovitskiy et al. 2021) as in Hugging Face `transformers`'
//! `modeling_vit.py`: patch embedding, a CLS token and learned positions, pre-norm
//! encoder blocks (exact-erf GELU MLP), a final LayerNorm. Loads `ViTModel` and
//! `ViTForImageClassification` checkpoints (weights under `vit.` or at the root; the
//! classifier, if any, is not used).
//!
//! FARCER's image vector is the CLS token of the last hidden state *before* the final
//! LayerNorm (`hidden_states[-1][:, 0]` in the authors' code); `after_norm` gives the
//! CLS of `last_hidden_state` instead. The encoder is frozen, so only the inference path
//! exists here.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use farcer_nn::{self as frozen, Backend, FrozenWeight};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_image() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

impl ViTConfig {
    /// Refuses sizes the encoder divides or indexes by that would panic in a forward.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        // Far above any ViT, low enough that nothing sized from the config alone can ask
        // for more memory than a machine has.
        let at_most = [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("image_size", self.image_size, 1 << 13),
            ("num_channels", self.num_channels, 64),
        ];
        if let Some((name, v, max)) = at_most.iter().find(|(_, v, max)| v > max) {
            return Err(format!("{name} {v} is larger than farcer allows ({max})"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(format!(
                "layer_norm_eps {} is not a finite number >= 0",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

struct Lin {
    w: Tensor,
    /// `w` as the fused CPU path reads it (packed, or transposed to `(in, out)`).
    wt: Option<FrozenWeight>,
    b: Option<Tensor>,
}

impl Lin {
    fn load(vb: &VarBuilder, i: usize, o: usize, bias: bool) -> Result<Self> {
        let w = vb.get((o, i), "weight")?;
        Ok(Lin {
            wt: None,
            w,
            b: if bias { Some(vb.get(o, "bias")?) } else { None },
        })
    }
    /// `x`: `(n, in)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `w` transposed and contiguous (or packed, keeping `w` beside it when `keep`: see
/// [`FrozenWeight::new`]), for the kernels' backend (none for candle's).
fn transposed(w: &Tensor, be: Backend, keep: bool) -> Result<Option<FrozenWeight>> {
    if be == Backend::Kernels {
        Ok(Some(FrozenWeight::new(w, keep)?))
    } else {
        Ok(None)
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: &VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Norm {
            w: vb.get(d, "weight")?,
            b: vb.get(d, "bias")?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps as f32)
    }
}

struct Layer {
    /// q, k, v weights (transposed) and biases stacked, for the fused CPU path.
    qkv: Option<(FrozenWeight, Tensor)>,
    /// The last layer's k and v weights stacked and packed on their own, where `qkv` is
    /// packed (see `frozen::VitLayer::kv`).
    kv: Option<FrozenWeight>,
    ln1: Norm,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln2: Norm,
    fc1: Lin,
    fc2: Lin,
}

/// A ViT image encoder.
pub struct ViT {
    patch_w: Tensor,
    /// `patch_w` as the fused CPU path reads it (kernels' backend only).
    patch_fused: Option<FrozenWeight>,
    patch_b: Tensor,
    cls: Tensor,
    pos: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
    pub config: ViTConfig,
    /// The ops the encoder runs, chosen at load.
    backend: Backend,
}

impl ViT {
    /// Loads a ViT with the fastest backend for its device and dtype.
    pub fn load(vb: VarBuilder, c: &ViTConfig) -> Result<Self> {
        let backend = Backend::auto(vb.device(), vb.dtype());
        Self::load_with(vb, c, backend)
    }

    /// [`ViT::load`] with a chosen backend.
    pub fn load_with(vb: VarBuilder, c: &ViTConfig, be: Backend) -> Result<Self> {
        be.check(vb.device(), vb.dtype())?;
        c.validate().map_err(candle_core::Error::Msg)?;
        if let Some(t) = &c.model_type {
            if t != "vit" {
                candle_core::bail!("model_type `{t}` is not a ViT");
            }
        }
        if c.hidden_act != "gelu" {
            candle_core::bail!(
                "hidden_act `{}` is not supported (ViT uses gelu)",
                c.hidden_act
            );
        }
        let root = if vb.contains_tensor("vit.embeddings.cls_token") {
            vb.pp("vit")
        } else {
            vb.clone()
        };
        let d = c.hidden_size;
        let n = (c.image_size / c.patch_size).pow(2);
        let e = root.pp("embeddings");
        let proj = e.pp("patch_embeddings").pp("projection");
        let patch_w = proj.get((d, c.num_channels, c.patch_size, c.patch_size), "weight")?;
        let patch_b = proj.get(d, "bias")?;
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let l = root.pp("encoder").pp("layer").pp(i);
            let a = l.pp("attention");
            // The fused path reads q, k, v stacked; their own transposed copies go.
            let mut layer = Layer {
                qkv: None,
                kv: None,
                ln1: Norm::load(&l.pp("layernorm_before"), d, c.layer_norm_eps)?,
                q: Lin::load(&a.pp("attention").pp("query"), d, d, c.qkv_bias)?,
                k: Lin::load(&a.pp("attention").pp("key"), d, d, c.qkv_bias)?,
                v: Lin::load(&a.pp("attention").pp("value"), d, d, c.qkv_bias)?,
                o: Lin::load(&a.pp("output").pp("dense"), d, d, true)?,
                ln2: Norm::load(&l.pp("layernorm_after"), d, c.layer_norm_eps)?,
                fc1: Lin::load(
                    &l.pp("intermediate").pp("dense"),
                    d,
                    c.intermediate_size,
                    true,
                )?,
                fc2: Lin::load(&l.pp("output").pp("dense"), c.intermediate_size, d, true)?,
            };
            layer.prepare(be, i + 1 == c.num_hidden_layers)?;
            layers.push(layer);
        }
        let patch_w = patch_w.reshape((d, c.num_channels * c.patch_size * c.patch_size))?;
        Ok(ViT {
            patch_fused: transposed(&patch_w, be, true)?,
            patch_w,
            patch_b,
            cls: e.get((1, 1, d), "cls_token")?,
            pos: e.get((1, n + 1, d), "position_embeddings")?,
            layers,
            final_norm: Norm::load(&root.pp("layernorm"), d, c.layer_norm_eps)?,
            config: c.clone(),
            backend: be,
        })
    }

    /// The same weights with another backend.
    pub fn with_backend(mut self, be: Backend) -> Result<Self> {
        be.check(self.device(), self.dtype())?;
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.prepare(be, i == last)?;
        }
        self.patch_fused = transposed(&self.patch_w, be, true)?;
        self.backend = be;
        Ok(self)
    }

    pub fn device(&self) -> &Device {
        self.cls.device()
    }

    /// Whether the fused CPU path reads every layer's weights packed by the GEMM library
    /// (MKL, when the process's choice sends the products there), not the plain copies,
    /// with the last layer's keys and values packed on their own too.
    pub fn packed(&self) -> bool {
        let packed = |w: Option<&FrozenWeight>| w.is_some_and(|w| w.is_packed());
        self.layers.last().is_some_and(|l| packed(l.kv.as_ref()))
            && self.layers.iter().all(|l| {
                packed(l.qkv.as_ref().map(|q| &q.0))
                    && [&l.o, &l.fc1, &l.fc2].iter().all(|x| packed(x.wt.as_ref()))
            })
    }

    pub fn dtype(&self) -> DType {
        self.cls.dtype()
    }

    /// Hidden states `(b, 1 + patches, hidden)` of the last encoder layer, before the
    /// final LayerNorm. `pixels`: `(b, channels, size, size)`, already normalised.
    pub fn last_hidden_before_norm(&self, pixels: &Tensor) -> Result<Tensor> {
        self.hidden(pixels, false)
    }

    /// [`ViT::last_hidden_before_norm`], or with `cls_only` only its CLS rows `(b, 1,
    /// hidden)`: the last layer then carries only those rows past its keys and values.
    fn hidden(&self, pixels: &Tensor, cls_only: bool) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = pixels.dims4()?;
        let p = c.patch_size;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "ViT expects ({}, {}, {}) pixels, got ({ch}, {h}, {w})",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let (gh, gw) = (h / p, w / p);
        // Patches as rows (channel, y, x order, like the conv kernel), then one matmul.
        let patches = pixels
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, ch * p * p))?;
        let heads = c.num_attention_heads;
        let fused: Option<Vec<_>> = self.layers.iter().map(|l| l.fused(heads)).collect();
        // The last layer carries only the CLS rows when asked; with no layer, they are
        // taken at the end.
        let last = self.layers.len().saturating_sub(1);
        let narrowed = cls_only && !self.layers.is_empty();
        let mut x;
        if let (Backend::Kernels, Some(fused), Some(pw)) = (self.backend, fused, &self.patch_fused)
        {
            // The residual stream stays one vector from the embedding through all layers.
            let (t, d) = (gh * gw + 1, c.hidden_size);
            let mut v = frozen::vit_embed(&patches, pw, &self.patch_b, &self.cls, &self.pos, b)?;
            // The biases the layers carry aside (see `vit_layer`), added once at the end.
            let mut shift = vec![0f32; d];
            for (i, l) in fused.iter().enumerate() {
                v = frozen::vit_layer(v, &mut shift, (b, t, d), l, cls_only && i == last)?;
            }
            for row in v.chunks_exact_mut(d) {
                row.iter_mut().zip(&shift).for_each(|(x, s)| *x += s);
            }
            x = Tensor::from_vec(v, (b, if narrowed { 1 } else { t }, d), pixels.device())?;
        } else {
            let emb = patches
                .matmul(&self.patch_w.t()?)?
                .broadcast_add(&self.patch_b)?
                .reshape((b, gh * gw, c.hidden_size))?;
            let cls = self.cls.broadcast_as((b, 1, c.hidden_size))?;
            x = Tensor::cat(&[&cls, &emb], 1)?.broadcast_add(&self.pos)?;
            for (i, l) in self.layers.iter().enumerate() {
                x = l.forward(&x, heads, cls_only && i == last)?;
            }
        }
        if cls_only && !narrowed {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }

    /// `last_hidden_state`: after the final LayerNorm.
    pub fn last_hidden_state(&self, pixels: &Tensor) -> Result<Tensor> {
        self.final_norm
            .forward(&self.last_hidden_before_norm(pixels)?)
    }

    /// The CLS vector of each image `(b, hidden)`, before (the authors') or after the
    /// final LayerNorm.
    pub fn cls(&self, pixels: &Tensor, after_norm: bool) -> Result<Tensor> {
        let cls = self.hidden(pixels, true)?;
        let cls = if after_norm {
            self.final_norm.forward(&cls)?
        } else {
            cls
        };
        cls.squeeze(1)
    }
}

impl Layer {
    /// The fused CPU path's weights for `be` (none for candle's backend): q, k, v and
    /// their biases stacked, the other linears, each packed or transposed; with `last`
    /// (the encoder's last layer, which may carry only the CLS rows past its keys and
    /// values) also k and v stacked on their own.
    fn prepare(&mut self, be: Backend, last: bool) -> Result<()> {
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let d = q.w.dim(0)?;
        let bias = |l: &Lin| match &l.b {
            Some(b) => Ok(b.clone()),
            None => Tensor::zeros(d, l.w.dtype(), l.w.device()),
        };
        self.qkv = match transposed(&Tensor::cat(&[&q.w, &k.w, &v.w], 0)?, be, false)? {
            Some(wt) => Some((wt, Tensor::cat(&[bias(q)?, bias(k)?, bias(v)?], 0)?)),
            None => None,
        };
        self.kv = match &self.qkv {
            Some((w, _)) if last && w.is_packed() => {
                transposed(&Tensor::cat(&[&k.w, &v.w], 0)?, be, false)?
            }
            _ => None,
        };
        for l in [&mut self.o, &mut self.fc1, &mut self.fc2] {
            l.wt = transposed(&l.w, be, true)?;
        }
        Ok(())
    }

    /// The weights of the fused CPU path, when it applies.
    fn fused(&self, heads: usize) -> Option<frozen::VitLayer<'_>> {
        let (Some(qkv), Some(o), Some(fc1), Some(fc2)) =
            (&self.qkv, &self.o.wt, &self.fc1.wt, &self.fc2.wt)
        else {
            return None;
        };
        Some(frozen::VitLayer {
            ln1: (&self.ln1.w, &self.ln1.b, self.ln1.eps as f32),
            qkv: (&qkv.0, &qkv.1),
            kv: self.kv.as_ref(),
            o: (o, self.o.b.as_ref()),
            ln2: (&self.ln2.w, &self.ln2.b, self.ln2.eps as f32),
            fc1: (fc1, self.fc1.b.as_ref()),
            fc2: (fc2, self.fc2.b.as_ref()),
            heads,
        })
    }

    /// The layer on `x` `(b, t, d)`; with `cls_only`, only each image's first row past
    /// the keys and values (see [`frozen::vit_layer`]), giving `(b, 1, d)`.
    fn forward(&self, x: &Tensor, heads: usize, cls_only: bool) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / heads;
        let n = self.ln1.forward(x)?;
        let split = |y: Tensor, t: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let (x, nq, tq) = if cls_only {
            (x.narrow(1, 0, 1)?, n.narrow(1, 0, 1)?, 1)
        } else {
            (x.clone(), n.clone(), t)
        };
        let q = split(self.q.forward(&nq.reshape((b * tq, d))?)?, tq)?;
        let n = n.reshape((b * t, d))?;
        let k = split(self.k.forward(&n)?, t)?;
        let v = split(self.v.forward(&n)?, t)?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * tq, d))?;
        let x = (x + self.o.forward(&o)?.reshape((b, tq, d))?)?;
        let n = self.ln2.forward(&x)?.reshape((b * tq, d))?;
        let m = self.fc2.forward(&self.fc1.forward(&n)?.gelu_erf()?)?;
        x + m.reshape((b, tq, d))?
    }
}
