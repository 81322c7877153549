//! FARCER: the LLM, a trainable modality projection, and image vectors from the frozen
//! vision encoder. Utterance i's projected image vector takes its image slot in the
//! prompt; an utterance without an image has no slot. Also the checkpoint format: a
//! folder with `manifest.json` (what to load and how the prompt was built) and the
//! trained weights in safetensors.

use crate::data::Utterance;
use crate::error::{Error, IoContext, Result};
use crate::eval::InputBuilder;
use crate::model::dropout::Dropout;
use crate::model::lora::LoraConfig;
use crate::model::projection::{Projection, ProjectionConfig};
use crate::model::Llm;
use crate::prompt::{Encoded, Piece, PromptConfig};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which of the paper's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One linear layer; only it is trained.
    Base,
    /// Three layers with GELU and dropout; only they are trained.
    ThreeLayer,
    /// One linear layer trained together with LoRA adapters in the LLM.
    Finetuned,
    /// No images at all: LoRA adapters in the LLM only, the baseline that isolates what
    /// the images add. No vision encoder is loaded and there is no projection.
    TextLora,
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Base => "Base FARCER",
            Kind::ThreeLayer => "Three-layer FARCER",
            Kind::Finetuned => "Fine-tuned FARCER",
            Kind::TextLora => "Text-only fine-tuned LLM",
        }
    }

    /// The name in configs and manifests.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::ThreeLayer => "three-layer",
            Kind::Finetuned => "finetuned",
            Kind::TextLora => "text-lora",
        }
    }

    /// Whether the kind takes images (all but `text-lora`).
    pub fn takes_images(&self) -> bool {
        *self != Kind::TextLora
    }

    /// Whether the kind trains LoRA adapters.
    pub fn has_lora(&self) -> bool {
        matches!(self, Kind::Finetuned | Kind::TextLora)
    }
}

/// `manifest.json` of a checkpoint: everything needed to rebuild the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub farcer_version: String,
    pub kind: Kind,
    /// The LLM as named at training time (`--llm`, a path or hub id).
    pub llm: String,
    /// sha256 of the LLM file when it is a single file (GGUF), to catch a swapped model.
    #[serde(default)]
    pub llm_sha256: Option<String>,
    /// The vision encoder and its weights' key (none for `text-lora`).
    #[serde(default)]
    pub vision: Option<String>,
    #[serde(default)]
    pub vision_key: Option<String>,
    #[serde(default)]
    pub after_norm: bool,
    /// The projection (none for `text-lora`).
    #[serde(default)]
    pub projection: Option<ProjectionConfig>,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    pub prompt: PromptConfig,
    pub labels: Vec<String>,
    /// The data it was trained on.
    pub data: String,
    pub epoch: usize,
    pub step: usize,
    #[serde(default)]
    pub val_weighted_f1: Option<f64>,
}

/// The multimodal model.
pub struct Farcer {
    pub llm: Llm,
    /// Image vectors into the LLM's embeddings; `None` for a text-only kind.
    pub projection: Option<Projection>,
    pub kind: Kind,
    /// Image vectors by image path (filled from the vector cache before use).
    pub vectors: HashMap<PathBuf, Vec<f32>>,
}

impl Farcer {
    pub fn new(llm: Llm, projection: Option<Projection>, kind: Kind) -> Self {
        Farcer {
            llm,
            projection,
            kind,
            vectors: HashMap::new(),
        }
    }

    /// A fresh projection sized for this LLM and encoder.
    pub fn projection_config(
        kind: Kind,
        layers: usize,
        dropout: f64,
        in_dim: usize,
        llm: &Llm,
    ) -> ProjectionConfig {
        ProjectionConfig {
            layers: if kind == Kind::ThreeLayer {
                layers.max(2)
            } else {
                layers.max(1)
            },
            dropout,
            in_dim,
            out_dim: llm.model.hidden_size(),
        }
    }

    /// Fills the image vectors of every image named in `datasets` (from the cache in
    /// `store_dir`, computing the missing ones). Returns images that could not be read.
    pub fn load_vectors(
        &mut self,
        enc: &crate::vision::VisionEncoder,
        store_dir: &Path,
        datasets: &[&crate::data::Dataset],
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<(PathBuf, String)>> {
        let Some(proj) = &self.projection else {
            return Ok(Vec::new());
        };
        if enc.dim() != proj.config.in_dim {
            return Err(Error::msg(format!(
                "the vision encoder gives {}-d vectors but the projection takes {}",
                enc.dim(),
                proj.config.in_dim
            )));
        }
        let paths: Vec<PathBuf> = datasets
            .iter()
            .flat_map(|d| d.image_paths().cloned())
            .collect();
        let mut store = crate::vision::VectorStore::open(store_dir, &enc.key)?;
        let (v, failed) = crate::vision::vectors_for(enc, &mut store, &paths, progress)?;
        self.vectors.extend(v);
        Ok(failed)
    }

    pub fn image_of(&self, u: &Utterance) -> Option<&Vec<f32>> {
        self.projection.as_ref()?;
        u.image.as_ref().and_then(|p| self.vectors.get(p))
    }

    /// The trainable weights: the projection's, if any (LoRA adapters live in the LLM).
    pub fn projection_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.projection
            .as_ref()
            .map(|p| p.vars())
            .unwrap_or_default()
    }

    /// Prompt-suffix embeddings `(1, len, hidden)`; with `train` (`Some`) the
    /// projection's dropout is on and the result carries the graph back to the projection.
    pub fn embeds(
        &self,
        enc: &Encoded,
        context: &[Utterance],
        train: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        self.embeds_with(enc, context, train, &|u| {
            self.image_of(u).map(|v| v.as_slice())
        })
    }

    /// [`Farcer::embeds`] with the image vectors looked up by `vector` (a request's own
    /// images, say), so that one loaded model serves many requests without changing.
    pub fn embeds_with<'v>(
        &'v self,
        enc: &Encoded,
        context: &[Utterance],
        train: Option<&mut Dropout>,
        vector: &dyn Fn(&Utterance) -> Option<&'v [f32]>,
    ) -> Result<Tensor> {
        let dev = self.llm.model.device();
        let slots = enc.images();
        let projected = if slots.is_empty() {
            None
        } else {
            let proj = self.projection.as_ref().ok_or_else(|| {
                Error::msg("a text-only model was given a prompt with image slots")
            })?;
            let mut flat = Vec::with_capacity(slots.len() * proj.config.in_dim);
            for &i in &slots {
                let v = vector(&context[i]).ok_or_else(|| {
                    Error::msg(format!(
                        "utterance {} has an image slot but no vector",
                        context[i].id
                    ))
                })?;
                flat.extend_from_slice(v);
            }
            let x = Tensor::from_vec(flat, (slots.len(), proj.config.in_dim), dev)?;
            Some(proj.forward(&x, train)?.to_dtype(self.llm.model.dtype())?)
        };
        let mut parts = Vec::new();
        let mut k = 0;
        for p in &enc.pieces {
            match p {
                Piece::Tokens(t) => parts.push(self.llm.model.embed(t)?),
                Piece::Image(_) => {
                    parts.push(projected.as_ref().expect("slots counted").narrow(0, k, 1)?);
                    k += 1;
                }
            }
        }
        Ok(Tensor::cat(&parts, 0)?.unsqueeze(0)?)
    }

    /// Saves the trained weights and the manifest into `dir` (written to a temporary
    /// folder, then renamed into place, so a crash never leaves half a checkpoint).
    pub fn save(
        &self,
        dir: &Path,
        manifest: &Manifest,
        lora: &[(String, candle_core::Var)],
    ) -> Result<()> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).at(parent)?;
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
        crate::util::remove_any(&tmp)?;
        crate::util::crash_point("create checkpoint folder");
        std::fs::create_dir_all(&tmp).at(&tmp)?;
        if let Some(p) = &self.projection {
            crate::util::save_tensors(&p.tensors(), &tmp.join("projection.safetensors"))?;
        }
        if let Some(cfg) = &manifest.lora {
            crate::model::peft::save_peft(
                &tmp,
                cfg,
                lora,
                self.projection.as_ref(),
                &self.llm.name,
            )?;
        }
        crate::util::write_json_atomic(&tmp.join("manifest.json"), manifest)?;
        replace_dir(&tmp, dir)
    }
}

/// Moves `from` to `to`, replacing what was there with at most a moment in which `to` is
/// missing (never half-written); a leftover `.old` is cleaned on the next save.
pub fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let old = to.with_extension("old");
    crate::util::remove_any(&old)?;
    if to.exists() {
        crate::util::crash_point("move the previous folder aside");
        std::fs::rename(to, &old).at(to)?;
    }
    crate::util::crash_point("move the new folder in place");
    std::fs::rename(from, to).at(to)?;
    crate::util::remove_any(&old)
}

/// Reads a checkpoint's manifest (`dir/manifest.json`, or `dir.old` after an interrupted save).
pub fn read_manifest(dir: &Path) -> Result<(PathBuf, Manifest)> {
    let mut d = dir.to_path_buf();
    if !d.join("manifest.json").is_file()
        && dir.with_extension("old").join("manifest.json").is_file()
    {
        d = dir.with_extension("old");
    }
    let p = d.join("manifest.json");
    let text = std::fs::read_to_string(&p).map_err(|e| {
        Error::input(
            dir.display().to_string(),
            format!("not a farcer checkpoint (no manifest.json: {e})"),
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::input(p.display().to_string(), e.to_string()))?;
    Ok((d, m))
}

impl Farcer {
    /// Sets the trained weights from checkpoint folder `d` (as [`read_manifest`] resolves
    /// it): the projection, and with `adapters` every attached LoRA adapter. A missing
    /// file, tensor or shape is an error naming the file. The one place weights come back
    /// from disk into a model that already has them (resume, `--init`).
    pub fn restore(&self, d: &Path, adapters: bool) -> Result<()> {
        let dev = self.llm.model.device();
        let bad = |p: &Path, e: String| Error::input(p.display().to_string(), e);
        if let Some(proj) = &self.projection {
            let p = d.join("projection.safetensors");
            let t = candle_core::safetensors::load(&p, dev).map_err(|e| bad(&p, e.to_string()))?;
            proj.load_tensors(&t).map_err(|e| bad(&p, e.to_string()))?;
        }
        let vars = self.llm.model.lora_vars();
        if adapters && !vars.is_empty() {
            let p = d.join("adapter_model.safetensors");
            let t = candle_core::safetensors::load(&p, dev).map_err(|e| bad(&p, e.to_string()))?;
            for (k, v) in &vars {
                // A text-only adapter is saved in plain PEFT names (no `lm.`).
                let saved = t
                    .get(k)
                    .or_else(|| t.get(&crate::model::peft::plain_peft_key(k)))
                    .ok_or_else(|| bad(&p, format!("no adapter weight `{k}`")))?;
                if saved.dims() != v.dims() {
                    return Err(bad(
                        &p,
                        format!("`{k}` is {:?}, the model's {:?}", saved.dims(), v.dims()),
                    ));
                }
                v.set(&saved.to_dtype(v.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// Loads the projection (and LoRA adapters) of a checkpoint onto an already loaded LLM.
pub fn load_checkpoint(dir: &Path, mut llm: Llm, device: &Device) -> Result<(Farcer, Manifest)> {
    let (d, m) = read_manifest(dir)?;
    let projection = match &m.projection {
        Some(c) => {
            let projection = Projection::new(c.clone(), 0, device)?;
            let p = d.join("projection.safetensors");
            let t = candle_core::safetensors::load(&p, device)
                .map_err(|e| Error::input(p.display().to_string(), e.to_string()))?;
            projection.load_tensors(&t)?;
            Some(projection)
        }
        None if m.kind.takes_images() => {
            return Err(Error::input(
                d.join("manifest.json").display().to_string(),
                format!("a {} checkpoint needs a `projection`", m.kind.label()),
            ))
        }
        None => None,
    };
    if m.lora.is_some() {
        crate::model::peft::load_peft(&d, &mut llm.model)?;
    }
    Ok((Farcer::new(llm, projection, m.kind), m))
}

impl InputBuilder for Farcer {
    fn llm(&self) -> &Llm {
        &self.llm
    }
    fn has_image(&self, u: &Utterance) -> bool {
        self.image_of(u).is_some()
    }
    fn suffix_embeds(&self, enc: &Encoded, context: &[Utterance]) -> Result<Tensor> {
        self.embeds(enc, context, None)
    }
    fn kind(&self) -> String {
        self.kind.label().to_string()
    }
}
