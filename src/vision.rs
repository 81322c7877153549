//! Where an image becomes a vector: an image file is decoded, resized and normalised as
//! the encoder's own `preprocessor_config.json` says, run through the frozen ViT, and its
//! CLS vector kept in an on-disk cache keyed by the image's content and the encoder, so
//! no frame goes through the ViT twice.

use crate::error::{Error, IoContext, Result};
use crate::limits::InputLimits;
use crate::model::vit::{ViT, ViTConfig};
use crate::util::{sha256_bytes, Rng};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The paper's encoder: a ViT-B/16 fine-tuned on FER2013 face expressions.
pub const DEFAULT_VISION: &str = "trpakov/vit-face-expression";

/// `size` in a preprocessor config: an int, `{height, width}` or `{shortest_edge}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Square(u32),
    Exact { height: u32, width: u32 },
    Shortest { shortest_edge: u32 },
}

/// The subset of Hugging Face's `ViTImageProcessor` settings that ViTs use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: Size,
    /// PIL's resample code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic.
    #[serde(default = "bilinear")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "half")]
    pub image_mean: Vec<f32>,
    #[serde(default = "half")]
    pub image_std: Vec<f32>,
    #[serde(default)]
    pub do_center_crop: bool,
    #[serde(default)]
    pub crop_size: Option<Size>,
}

fn yes() -> bool {
    true
}
fn default_size() -> Size {
    Size::Square(224)
}
fn bilinear() -> u32 {
    2
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn half() -> Vec<f32> {
    vec![0.5, 0.5, 0.5]
}

/// Largest side a preprocessed image may have (a `size` above it in a config is refused,
/// and the long side of a `shortest_edge` resize is capped there).
pub const MAX_SIDE: u32 = 4096;

impl Preprocess {
    /// Refuses settings that would index out of range or ask for huge images.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sides: Vec<u32> = [Some(&self.size), self.crop_size.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|s| match *s {
                Size::Square(x) | Size::Shortest { shortest_edge: x } => vec![x],
                Size::Exact { height, width } => vec![height, width],
            })
            .collect();
        if let Some(x) = sides.iter().find(|&&x| x == 0 || x > MAX_SIDE) {
            return Err(format!(
                "an image size of {x}: sizes must be 1..={MAX_SIDE}"
            ));
        }
        if self.image_mean.len() != 3 || self.image_std.len() != 3 {
            return Err(format!(
                "image_mean and image_std need 3 values (RGB), got {} and {}",
                self.image_mean.len(),
                self.image_std.len()
            ));
        }
        if !self.image_std.iter().all(|x| x.is_finite() && *x != 0.0)
            || !self.image_mean.iter().all(|x| x.is_finite())
            || !self.rescale_factor.is_finite()
        {
            return Err(
                "image_mean, image_std and rescale_factor must be finite (and image_std not 0)"
                    .into(),
            );
        }
        Ok(())
    }

    fn filter(&self) -> image::imageops::FilterType {
        use image::imageops::FilterType::*;
        match self.resample {
            0 => Nearest,
            1 => Lanczos3,
            3 => CatmullRom,
            _ => Triangle,
        }
    }

    /// RGB image to normalised channel-first values `(3, h, w)`.
    pub fn apply(&self, img: &image::DynamicImage) -> (Vec<f32>, usize, usize) {
        let mut rgb = img.to_rgb8();
        if self.do_resize {
            let (w, h) = (rgb.width(), rgb.height());
            let (tw, th) = match self.size {
                Size::Square(s) => (s, s),
                Size::Exact { height, width } => (width, height),
                Size::Shortest { shortest_edge: s } => {
                    // The long side is capped, so a 1 x 40000000 image cannot ask for
                    // terabytes.
                    let long = |a: u32, b: u32| {
                        ((a as f64) * s as f64 / b.max(1) as f64)
                            .round()
                            .clamp(1.0, MAX_SIDE as f64) as u32
                    };
                    if w <= h {
                        (s, long(h, w))
                    } else {
                        (long(w, h), s)
                    }
                }
            };
            if (tw, th) != (w, h) {
                rgb = image::imageops::resize(&rgb, tw, th, self.filter());
            }
        }
        if self.do_center_crop {
            if let Some(c) = &self.crop_size {
                let (cw, ch) = match *c {
                    Size::Square(s) => (s, s),
                    Size::Exact { height, width } => (width, height),
                    Size::Shortest { shortest_edge: s } => (s, s),
                };
                let x = rgb.width().saturating_sub(cw) / 2;
                let y = rgb.height().saturating_sub(ch) / 2;
                rgb = image::imageops::crop_imm(&rgb, x, y, cw, ch).to_image();
            }
        }
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (x, y, p) in rgb.enumerate_pixels() {
            for c in 0..3 {
                let mut v = p.0[c] as f32;
                if self.do_rescale {
                    v *= self.rescale_factor as f32;
                }
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[c * h * w + y as usize * w + x as usize] = v;
            }
        }
        (out, h, w)
    }
}

/// A frozen ViT with its preprocessing: images in, CLS vectors out.
pub struct VisionEncoder {
    pub vit: ViT,
    pub preprocess: Preprocess,
    /// What the user named (`--vision`).
    pub name: String,
    pub dir: PathBuf,
    /// Identifies encoder weights and the before/after-norm choice, for the cache.
    pub key: String,
    pub after_norm: bool,
}

impl VisionEncoder {
    /// From a folder in Hugging Face layout or a hub id, in f32.
    pub fn load(spec: &str, device: &Device, after_norm: bool) -> Result<Self> {
        Self::load_as(spec, device, DType::F32, after_norm)
    }

    /// [`VisionEncoder::load`] with the weights in `dtype` (the vectors are f32 either
    /// way; a dtype other than f32 is part of the cache key, since its vectors differ).
    pub fn load_as(spec: &str, device: &Device, dtype: DType, after_norm: bool) -> Result<Self> {
        let path = Path::new(spec);
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else if crate::model::looks_like_hub_id(spec) {
            crate::model::hub_download_files(
                spec,
                &["config.json", "preprocessor_config.json"],
                &[],
                true,
            )?
        } else {
            return Err(Error::model(
                spec,
                "no such folder, and not a hub id: pass a ViT folder in Hugging Face layout",
            ));
        };
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        let cfg: ViTConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| Error::input(cfg_path.display().to_string(), e.to_string()))?;
        let pre_path = dir.join("preprocessor_config.json");
        let pre_text = std::fs::read_to_string(&pre_path).at(&pre_path)?;
        let preprocess: Preprocess = serde_json::from_str(&pre_text)
            .map_err(|e| Error::input(pre_path.display().to_string(), e.to_string()))?;
        preprocess
            .validate()
            .map_err(|m| Error::input(pre_path.display().to_string(), m))?;
        cfg.validate()
            .map_err(|m| Error::input(cfg_path.display().to_string(), m))?;
        let files = crate::model::safetensors_files(&dir)?;
        // The key hashes the configs and the weights, so a changed checkpoint never
        // reuses stale vectors.
        let mut id = format!("{cfg_text}\n{pre_text}\nafter_norm={after_norm}\n");
        if dtype != DType::F32 {
            id.push_str(&format!("dtype={dtype:?}\n"));
        }
        for f in &files {
            id.push_str(&crate::util::sha256_file(f)?);
        }
        // Read tensor by tensor, not memory-mapped: see `model::weights` for why.
        let vb = crate::model::weights::var_builder(&files, dtype, device)?;
        let vit = ViT::load(vb, &cfg)
            .map_err(|e| Error::model(dir.display().to_string(), e.to_string()))?;
        Ok(VisionEncoder {
            vit,
            preprocess,
            name: spec.to_string(),
            dir,
            key: sha256_bytes(id.as_bytes())[..16].to_string(),
            after_norm,
        })
    }

    /// Size of the image vector (the ViT's hidden size).
    pub fn dim(&self) -> usize {
        self.vit.config.hidden_size
    }

    /// Normalised pixels `(1, 3, h, w)` of an image.
    pub fn pixels(&self, img: &image::DynamicImage) -> Result<Tensor> {
        let (v, h, w) = self.preprocess.apply(img);
        Ok(Tensor::from_vec(v, (1, 3, h, w), self.vit.device())?.to_dtype(self.vit.dtype())?)
    }

    /// CLS vectors of decoded images, in batches.
    pub fn encode(&self, images: &[image::DynamicImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(8) {
            let px = chunk
                .iter()
                .map(|i| self.pixels(i))
                .collect::<Result<Vec<_>>>()?;
            let px = Tensor::cat(&px, 0)?;
            let cls = self.vit.cls(&px, self.after_norm)?.to_dtype(DType::F32)?;
            out.extend(cls.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Writes a seeded, *untrained* ViT in Hugging Face layout (for the demo, on machines
    /// that cannot download a face-expression ViT). Initialised as transformers does:
    /// normal(0, 0.02) weights, zero biases, unit LayerNorms.
    pub fn write_random(dir: &Path, seed: u64, cfg: &ViTConfig, pre: &Preprocess) -> Result<()> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut rng = Rng::derive(seed, "random-vit");
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let dev = Device::Cpu;
        let mut normal = |shape: &[usize]| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
            Ok(Tensor::from_vec(v, shape, &dev)?)
        };
        let d = cfg.hidden_size;
        let n = (cfg.image_size / cfg.patch_size).pow(2);
        let p = cfg.patch_size;
        t.insert("vit.embeddings.cls_token".into(), normal(&[1, 1, d])?);
        t.insert(
            "vit.embeddings.position_embeddings".into(),
            normal(&[1, n + 1, d])?,
        );
        t.insert(
            "vit.embeddings.patch_embeddings.projection.weight".into(),
            normal(&[d, cfg.num_channels, p, p])?,
        );
        let zeros = |k: usize| Tensor::zeros(k, DType::F32, &Device::Cpu);
        let ones = |k: usize| Tensor::ones(k, DType::F32, &Device::Cpu);
        t.insert(
            "vit.embeddings.patch_embeddings.projection.bias".into(),
            zeros(d)?,
        );
        for i in 0..cfg.num_hidden_layers {
            let l = format!("vit.encoder.layer.{i}");
            for (name, o, inp) in [
                ("attention.attention.query", d, d),
                ("attention.attention.key", d, d),
                ("attention.attention.value", d, d),
                ("attention.output.dense", d, d),
                ("intermediate.dense", cfg.intermediate_size, d),
                ("output.dense", d, cfg.intermediate_size),
            ] {
                t.insert(format!("{l}.{name}.weight"), normal(&[o, inp])?);
                t.insert(format!("{l}.{name}.bias"), zeros(o)?);
            }
            for ln in ["layernorm_before", "layernorm_after"] {
                t.insert(format!("{l}.{ln}.weight"), ones(d)?);
                t.insert(format!("{l}.{ln}.bias"), zeros(d)?);
            }
        }
        t.insert("vit.layernorm.weight".into(), ones(d)?);
        t.insert("vit.layernorm.bias".into(), zeros(d)?);
        let tmp = crate::util::tmp_sibling(&dir.join("model.safetensors"));
        crate::util::save_tensors(&t, &tmp)?;
        std::fs::rename(&tmp, dir.join("model.safetensors")).at(dir)?;
        let mut cfg_json = serde_json::to_value(cfg).expect("config serialises");
        cfg_json["architectures"] = serde_json::json!(["ViTModel"]);
        cfg_json["model_type"] = serde_json::json!("vit");
        crate::util::write_json_atomic(&dir.join("config.json"), &cfg_json)?;
        crate::util::write_json_atomic(&dir.join("preprocessor_config.json"), pre)?;
        Ok(())
    }
}

/// The seeded untrained ViT of the demo: small (64x64 pixels, 8x8 patches, 4 layers of
/// 128) so it runs in milliseconds on a CPU.
pub fn demo_vit_config() -> ViTConfig {
    ViTConfig {
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 512,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-12,
        image_size: 64,
        patch_size: 8,
        num_channels: 3,
        qkv_bias: true,
        model_type: Some("vit".into()),
    }
}

pub fn demo_preprocess() -> Preprocess {
    Preprocess {
        do_resize: true,
        size: Size::Exact {
            height: 64,
            width: 64,
        },
        resample: 2,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: half(),
        image_std: half(),
        do_center_crop: false,
        crop_size: None,
    }
}

/// Image vectors on disk: one safetensors file per encoder, a tensor per image named by
/// the sha256 of the image file's bytes.
pub struct VectorStore {
    path: PathBuf,
    map: HashMap<String, Vec<f32>>,
    dirty: bool,
}

impl VectorStore {
    /// Opens (or starts) the store for `encoder_key` in `dir`.
    pub fn open(dir: &Path, encoder_key: &str) -> Result<Self> {
        let path = dir.join(format!("{encoder_key}.safetensors"));
        let mut map = HashMap::new();
        if path.is_file() {
            let t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
                Error::input(
                    path.display().to_string(),
                    format!("image vector cache: {e}"),
                )
            })?;
            for (k, v) in t {
                map.insert(k, v.to_vec1::<f32>()?);
            }
        }
        Ok(VectorStore {
            path,
            map,
            dirty: false,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, hash: &str) -> Option<&Vec<f32>> {
        self.map.get(hash)
    }

    pub fn insert(&mut self, hash: String, v: Vec<f32>) {
        self.map.insert(hash, v);
        self.dirty = true;
    }

    /// Writes the store if anything was added (atomically).
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut t = HashMap::new();
        for (k, v) in &self.map {
            t.insert(k.clone(), Tensor::new(v.as_slice(), &Device::Cpu)?);
        }
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d).at(d)?;
        }
        let tmp = crate::util::tmp_sibling(&self.path);
        crate::util::save_tensors(&t, &tmp)?;
        std::fs::rename(&tmp, &self.path).at(&self.path)?;
        self.dirty = false;
        Ok(())
    }
}

/// Files that could not be used, with the reason.
pub type Failures = Vec<(PathBuf, String)>;

/// Content hash of an image file (the cache key). Only a regular file within the size
/// limit is read ([`crate::limits`]).
pub fn image_hash(path: &Path) -> Result<String> {
    let bytes = crate::limits::read_image_bytes(path, &InputLimits::from_env()?)?;
    Ok(sha256_bytes(&bytes))
}

/// An error's message without the path that the failure list pairs it with.
fn reason(path: &Path, e: &Error) -> String {
    let m = e.to_string();
    match m.strip_prefix(&format!("{}: ", path.display())) {
        Some(r) => r.to_string(),
        None => m,
    }
}

/// Vectors for a set of image files: cached ones read, missing ones computed in batches
/// (`progress(done, total)` after each) and added to the store. Unreadable images, and
/// files outside the limits of [`crate::limits`] (not a regular file, too many bytes or
/// pixels), are reported in the second list and get no vector.
pub fn vectors_for(
    enc: &VisionEncoder,
    store: &mut VectorStore,
    paths: &[PathBuf],
    progress: &dyn Fn(usize, usize),
) -> Result<(HashMap<PathBuf, Vec<f32>>, Failures)> {
    let limits = InputLimits::from_env()?;
    let mut out = HashMap::new();
    let mut failed = Vec::new();
    let mut todo: Vec<(PathBuf, String)> = Vec::new();
    for p in paths {
        if out.contains_key(p) {
            continue;
        }
        match crate::limits::read_image_bytes(p, &limits).map(|b| sha256_bytes(&b)) {
            Ok(h) => match store.get(&h) {
                Some(v) => {
                    out.insert(p.clone(), v.clone());
                }
                None => todo.push((p.clone(), h)),
            },
            Err(e) => failed.push((p.clone(), reason(p, &e))),
        }
    }
    todo.sort();
    todo.dedup();
    let total = todo.len();
    let mut done = 0;
    for chunk in todo.chunks(16) {
        let mut imgs = Vec::new();
        let mut keys = Vec::new();
        for (p, h) in chunk {
            match crate::limits::load_image(p, &limits) {
                Ok(i) => {
                    imgs.push(i);
                    keys.push((p.clone(), h.clone()));
                }
                Err(e) => failed.push((p.clone(), reason(p, &e))),
            }
        }
        for ((p, h), v) in keys.into_iter().zip(enc.encode(&imgs)?) {
            store.insert(h, v.clone());
            out.insert(p, v);
        }
        done += chunk.len();
        progress(done, total);
    }
    store.save()?;
    Ok((out, failed))
}
