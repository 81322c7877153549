//! Training FARCER: teacher-forced, class-weighted cross-entropy over a label's tokens and
//! the end-of-turn token, with the LLM and the vision encoder frozen (only the projection,
//! and LoRA adapters for the fine-tuned model, learn). AdamW, cosine schedule per
//! optimiser step with optional warm-up, gradient accumulation, a different seeded prompt
//! set per step, validation weighted-F1 after every epoch, best checkpoint kept, early
//! stopping, resumable.
//!
//! Differences from the authors' code, on purpose: teacher forcing (one pass scores all
//! label tokens; theirs fed back its own argmax token and re-ran the full prompt per
//! token), and a cosine decay over the whole run (theirs restarted per epoch).

use crate::data::{Dataset, Sample, Scope, Utterance};
use crate::decode::Decode;
use crate::error::{Error, IoContext, Result};
use crate::eval::{self, EvalOptions, PreparedSet};
use crate::farcer::{Farcer, Kind, Manifest};
use crate::model::dropout::Dropout;
use crate::model::llama::{log_softmax, Positions};
use crate::model::lora::LoraConfig;
use crate::pack::DialoguePass;
use crate::prompt::{PromptConfig, PromptSet};
use crate::util::Rng;
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything a training run depends on; saved as `config.toml` in the run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `base`, `three-layer` or `finetuned`.
    pub kind: Kind,
    /// `default` (the pinned SmolLM2), a path or a hub id.
    #[serde(default = "default_llm")]
    pub llm: String,
    /// A ViT folder or hub id.
    #[serde(default = "default_vision")]
    pub vision: String,
    /// CLS after the ViT's final LayerNorm (the authors took it before).
    #[serde(default)]
    pub after_norm: bool,
    /// `meld:<dir>`, `iemocap:<dir>`, `jsonl:<dir>`, `demo`.
    pub data: String,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    #[serde(default = "default_val_split")]
    pub val_split: String,
    /// Which utterances are training targets: `last` (one per dialogue, the paper's) or
    /// `all` (every labelled utterance; one packed pass per dialogue).
    #[serde(default = "default_scope")]
    pub train_scope: Scope,
    /// The scope validation scores.
    #[serde(default = "default_scope")]
    pub val_scope: Scope,
    #[serde(default = "default_device")]
    pub device: String,
    /// The frozen LLM's and ViT's dtype: auto (bf16 on a GPU, f32 on the CPU), f32,
    /// bf16 or f16. The projection, the adapters, their optimiser and the loss stay f32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default)]
    pub seed: u64,
    /// Start from another run's checkpoint (IEMOCAP models start from MELD weights).
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default)]
    pub prompt: PromptSection,
    #[serde(default)]
    pub projection: ProjectionSection,
    /// LoRA adapters (fine-tuned model only).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub run: RunSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    #[serde(default = "default_shots")]
    pub shots: usize,
    #[serde(default)]
    pub past_labels: bool,
    /// Training steps cycle through the seeded prompt sets 0..n.
    #[serde(default = "default_sets")]
    pub sets: u64,
    /// The prompt set validation uses.
    #[serde(default)]
    pub eval_set: u64,
}

impl Default for PromptSection {
    fn default() -> Self {
        PromptSection {
            shots: default_shots(),
            past_labels: false,
            sets: default_sets(),
            eval_set: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSection {
    #[serde(default)]
    pub layers: Option<usize>,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

impl Default for ProjectionSection {
    fn default() -> Self {
        ProjectionSection {
            layers: None,
            dropout: default_dropout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Paper Table III: base 1e-4, three-layer 2e-4, fine-tuned 2e-4.
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Stop after this many epochs without a better validation weighted F1.
    #[serde(default = "default_patience")]
    pub patience: usize,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            epochs: default_epochs(),
            lr: None,
            weight_decay: default_wd(),
            warmup_steps: 0,
            grad_accum: 1,
            patience: default_patience(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Reuse the prompt prefix's keys and values across samples (exact for the base and
    /// three-layer models; the fine-tuned model always recomputes it).
    #[serde(default = "yes")]
    pub prefix_cache: bool,
    #[serde(default = "default_val_decode")]
    pub val_decode: Decode,
    /// Use only the first N training / validation samples (0: all).
    #[serde(default)]
    pub limit_train: usize,
    #[serde(default)]
    pub limit_val: usize,
    /// Longest prompt in tokens (0: the model's context).
    #[serde(default)]
    pub max_tokens: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            prefix_cache: true,
            val_decode: default_val_decode(),
            limit_train: 0,
            limit_val: 0,
            max_tokens: 0,
        }
    }
}

fn default_llm() -> String {
    "default".into()
}
fn default_vision() -> String {
    crate::vision::DEFAULT_VISION.into()
}
fn default_train_split() -> String {
    "train".into()
}
fn default_val_split() -> String {
    "dev".into()
}
fn default_scope() -> Scope {
    Scope::Last
}
fn default_device() -> String {
    "cpu".into()
}
pub(crate) fn default_dtype() -> String {
    "auto".into()
}
fn default_shots() -> usize {
    7
}
fn default_sets() -> u64 {
    10
}
fn default_dropout() -> f64 {
    0.05
}
fn default_epochs() -> usize {
    20
}
fn default_wd() -> f64 {
    0.01
}
fn one() -> usize {
    1
}
fn default_patience() -> usize {
    7
}
fn yes() -> bool {
    true
}
fn default_val_decode() -> Decode {
    Decode::Constrained
}

impl TrainConfig {
    /// The configuration a file holding only `kind` and `data` gives: every other field
    /// at its default (the defaults live in one place, the serde attributes above), with
    /// LoRA's defaults when the kind has adapters.
    pub fn new(kind: Kind, data: &str) -> Self {
        let mut t = toml::Table::new();
        t.insert("kind".into(), kind.name().into());
        t.insert("data".into(), data.into());
        if kind.has_lora() {
            t.insert("lora".into(), toml::Table::new().into());
        }
        t.try_into()
            .expect("kind and data alone make a configuration")
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let c: TrainConfig =
            toml::from_str(text).map_err(|e| Error::input(origin, e.to_string()))?;
        c.validate(origin)?;
        Ok(c)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Refuses values no run can use (epochs, learning rate, ...), naming `origin`.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |m: String| Err(Error::input(origin, m));
        if self.kind.has_lora() && self.lora.is_none() {
            return bad(format!(
                "kind = \"{}\" needs a [lora] section (r, alpha, dropout, target_modules)",
                self.kind.name()
            ));
        }
        if !self.kind.has_lora() && self.lora.is_some() {
            return bad("a [lora] section needs kind = \"finetuned\" or \"text-lora\"".into());
        }
        if self.optim.epochs == 0 || self.optim.grad_accum == 0 {
            return bad("epochs and grad_accum must be at least 1".into());
        }
        if self.prompt.sets == 0 || self.prompt.sets > 10 {
            return bad("prompt.sets must be 1..=10".into());
        }
        if let Some(l) = self.projection.layers {
            if l == 0 {
                return bad("projection.layers must be at least 1".into());
            }
        }
        if self.prompt.eval_set >= 10 {
            return bad(format!(
                "prompt.eval_set = {}: the prompt sets are 0..=9",
                self.prompt.eval_set
            ));
        }
        if let Some(lr) = self.optim.lr {
            if !(lr.is_finite() && lr >= 0.0) {
                return bad(format!("optim.lr = {lr}: it must be a finite number >= 0"));
            }
        }
        let wd = self.optim.weight_decay;
        if !(wd.is_finite() && wd >= 0.0) {
            return bad(format!(
                "optim.weight_decay = {wd}: it must be a finite number >= 0"
            ));
        }
        let mut dropouts = vec![("projection.dropout", self.projection.dropout)];
        if let Some(l) = &self.lora {
            dropouts.push(("lora.dropout", l.dropout));
            if l.r == 0 {
                return bad("lora.r must be at least 1".into());
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad(format!(
                    "lora.alpha = {}: it must be a finite number > 0",
                    l.alpha
                ));
            }
            if l.target_modules.is_empty() {
                return bad("lora.target_modules is empty: name at least one projection".into());
            }
        }
        for (name, p) in dropouts {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} = {p}: a dropout must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Refuses a warm-up that outlasts the run (the learning rate would never reach its
    /// value); `total_steps` is known only once the data is read.
    pub fn check_warmup(&self, total_steps: usize, origin: &str) -> Result<()> {
        let w = self.optim.warmup_steps;
        if w > 0 && w >= total_steps {
            return Err(Error::input(
                origin,
                format!("optim.warmup_steps = {w} is not shorter than the run's {total_steps} optimiser steps"),
            ));
        }
        Ok(())
    }

    /// The learning rate: as given, else the paper's for the kind.
    pub fn lr(&self) -> f64 {
        self.optim.lr.unwrap_or(match self.kind {
            Kind::Base => 1e-4,
            Kind::ThreeLayer | Kind::Finetuned | Kind::TextLora => 2e-4,
        })
    }

    pub fn projection_layers(&self) -> usize {
        self.projection.layers.unwrap_or(match self.kind {
            Kind::ThreeLayer => 3,
            _ => 1,
        })
    }

    pub fn prompt_config(&self) -> PromptConfig {
        PromptConfig {
            shots: self.prompt.shots,
            past_labels: self.prompt.past_labels,
            images: self.kind.takes_images(),
        }
    }
}

/// AdamW (Loshchilov & Hutter) as PyTorch implements it, with its state exposed so a run
/// can be resumed exactly (candle's own keeps it private).
pub struct AdamW {
    pub vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with gradients `grads` (already averaged) at learning rate `lr`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(name) else { continue };
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            s.insert(format!("m.{name}"), self.m[i].clone());
            s.insert(format!("v.{name}"), self.v[i].clone());
        }
        s
    }

    pub fn load_state(&mut self, s: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let (Some(m), Some(v)) = (s.get(&format!("m.{name}")), s.get(&format!("v.{name}")))
            else {
                return Err(Error::msg(format!("optimiser state lacks `{name}`")));
            };
            self.m[i] = m.clone();
            self.v[i] = v.clone();
        }
        self.step = step;
        Ok(())
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warm-up, then
/// cosine decay to zero (as transformers' `get_cosine_schedule_with_warmup`).
pub fn lr_at(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Per-token loss weights: scikit-learn's `compute_class_weight("balanced")`
/// (n_samples / (n_classes * count)) over the token ids of all training targets (label
/// tokens and end-of-turn), the end-of-turn token then + 0.5, as in the authors' code.
#[derive(Debug, Clone)]
pub struct TokenWeights {
    pub weights: HashMap<u32, f64>,
}

impl TokenWeights {
    pub fn balanced(targets: &[Vec<u32>], end_of_turn: u32) -> Self {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        let mut n = 0;
        for t in targets {
            for &id in t {
                *counts.entry(id).or_default() += 1;
                n += 1;
            }
        }
        let k = counts.len().max(1) as f64;
        let mut weights: HashMap<u32, f64> = counts
            .iter()
            .map(|(&id, &c)| (id, n as f64 / (k * c as f64)))
            .collect();
        *weights.entry(end_of_turn).or_insert(1.0) += 0.5;
        TokenWeights { weights }
    }

    pub fn get(&self, id: u32) -> f64 {
        self.weights.get(&id).copied().unwrap_or(1.0)
    }
}

/// Target token ids of a label: its tokens, then end-of-turn.
pub fn target_tokens(f: &Farcer, label: &str) -> Result<Vec<u32>> {
    f.llm.answer_tokens(label)
}

/// Teacher-forced weighted cross-entropy of one sample:
/// `-sum_i w_i log p(target_i | prompt, target_<i) / sum_i w_i`.
///
/// With `use_cache` the prompt prefix comes from `ps.cache` (computed once, no graph);
/// without, the whole prompt runs through the model (needed when LoRA changes it).
#[allow(clippy::too_many_arguments)]
pub fn sample_loss(
    f: &Farcer,
    ps: &PreparedSet,
    context: &[Utterance],
    past: Option<&[Option<String>]>,
    gold: &str,
    weights: &TokenWeights,
    use_cache: bool,
    mut train: Option<&mut Dropout>,
) -> Result<Tensor> {
    let llm = &f.llm;
    let has_image = |i: usize| crate::eval::InputBuilder::has_image(f, &context[i]);
    let enc = ps.prompter.encode(context, &has_image, past)?;
    let x = f.embeds(&enc, context, train.as_deref_mut())?;
    let t = x.dim(1)?;
    let target = target_tokens(f, gold)?;
    let n = target.len();
    let teacher = llm.model.embed(&target[..n - 1])?.unsqueeze(0)?;
    let mut inp = Tensor::cat(&[&x, &teacher], 1)?;
    let (mut cache, offset) = if use_cache {
        (ps.cache.clone(), 0)
    } else {
        let p = &ps.prompter.prefix;
        if !p.is_empty() {
            inp = Tensor::cat(&[&llm.model.embed(p)?.unsqueeze(0)?, &inp], 1)?;
        }
        (llm.model.new_cache(), p.len())
    };
    let at: Vec<usize> = (0..n).map(|i| offset + t - 1 + i).collect();
    let pos = Positions {
        grad_from: offset + enc.first_image_row(),
        ..Positions::default()
    };
    let logits = match train {
        Some(d) => llm.model.forward_train(&inp, &mut cache, &pos, &at, d)?,
        None => llm.model.forward(&inp, &mut cache, &pos, &at)?,
    }
    .expect("logits asked")
    .squeeze(0)?;
    let lp = log_softmax(&logits)?;
    let dev = llm.model.device();
    let ids = Tensor::new(target.as_slice(), dev)?.unsqueeze(1)?;
    let picked = lp.gather(&ids, 1)?.squeeze(1)?;
    let w: Vec<f32> = target.iter().map(|&i| weights.get(i) as f32).collect();
    let wsum: f32 = w.iter().sum();
    let w = Tensor::new(w, dev)?;
    Ok(((picked * w)?.sum_all()?.neg()? / wsum as f64)?)
}

/// The targets of one training dialogue: its samples of the run's scope (one for `last`,
/// every labelled utterance for `all`), scored together by [`dialogue_loss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub dialogue: usize,
    pub samples: Vec<Sample>,
}

/// Samples (in dialogue order, as [`Dataset::samples`] gives them) grouped by dialogue.
pub fn units(samples: Vec<Sample>) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    for s in samples {
        match out.last_mut() {
            Some(u) if u.dialogue == s.dialogue => u.samples.push(s),
            _ => out.push(Unit {
                dialogue: s.dialogue,
                samples: vec![s],
            }),
        }
    }
    out
}

/// Teacher-forced loss of every target of `unit`, summed over targets (each target's
/// loss as [`sample_loss`] gives it), and the number of targets.
///
/// The targets go through the model together: the dialogue is the trunk of a packed
/// sequence ([`crate::pack`]), and after each target's utterance its label query and
/// answer tokens form a branch that the rest of the dialogue does not see, at the
/// positions it would have alone. So one pass gives exactly the losses of the per-prefix
/// samples. Each target keeps as much of its dialogue as fits, cut from the front as
/// evaluation cuts; targets that keep the same start share a pass.
#[allow(clippy::too_many_arguments)]
pub fn dialogue_loss(
    f: &Farcer,
    ps: &PreparedSet,
    ds: &Dataset,
    unit: &Unit,
    weights: &TokenWeights,
    use_cache: bool,
    mut train: Option<&mut Dropout>,
) -> Result<(Tensor, usize)> {
    let utts = &ds.dialogues[unit.dialogue].utterances;
    let mut total: Option<Tensor> = None;
    for (start, targets) in eval::passes(f, ps, utts, &unit.samples)? {
        let packed = Packed::build(f, ps, &utts[start..], &targets, weights, use_cache)?;
        let l = packed.loss(f, ps, &utts[start..], use_cache, train.as_deref_mut())?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let total = total.ok_or_else(|| Error::msg("a training dialogue without targets"))?;
    Ok((total, unit.samples.len()))
}

/// Tokens that [`dialogue_loss`] runs through the model for `unit` (packed rows of all
/// its passes; a cached prefix is not counted).
pub fn dialogue_tokens(
    f: &Farcer,
    ps: &PreparedSet,
    ds: &Dataset,
    unit: &Unit,
    use_cache: bool,
) -> Result<usize> {
    let utts = &ds.dialogues[unit.dialogue].utterances;
    let none = TokenWeights {
        weights: HashMap::new(),
    };
    let mut n = 0;
    for (start, targets) in eval::passes(f, ps, utts, &unit.samples)? {
        n += Packed::build(f, ps, &utts[start..], &targets, &none, use_cache)?
            .pass
            .pack
            .len();
    }
    Ok(n)
}

/// One packed pass over a dialogue (from its context start) for the targets at the given
/// ascending indices: each target's query continued by its gold answer's tokens (but the
/// last), and the rows that score the answer with each token's weight within its target.
struct Packed {
    pass: DialoguePass,
    at: Vec<usize>,
    ids: Vec<u32>,
    w: Vec<f32>,
}

impl Packed {
    fn build(
        f: &Farcer,
        ps: &PreparedSet,
        utts: &[Utterance],
        targets: &[usize],
        weights: &TokenWeights,
        use_cache: bool,
    ) -> Result<Self> {
        let (mut at, mut ids, mut w) = (Vec::new(), Vec::new(), Vec::new());
        let has_image = |u: &Utterance| crate::eval::InputBuilder::has_image(f, u);
        let past = if use_cache { ps.cache.len() } else { 0 };
        let pass = DialoguePass::new(
            &ps.prompter,
            utts,
            targets,
            &has_image,
            past,
            &mut |d, k, query| {
                let u = &utts[targets[k]];
                let answer = target_tokens(f, u.label.as_deref().unwrap_or(""))?;
                let n = answer.len();
                // The query's last row predicts the first answer token; each answer row the next.
                at.push(d.queries[k].1.end - 1);
                at.extend(d.child(query, &answer[..n - 1]));
                let ws: Vec<f64> = answer.iter().map(|&t| weights.get(t)).collect();
                let wsum: f64 = ws.iter().sum();
                w.extend(ws.iter().map(|x| (x / wsum) as f32));
                ids.extend_from_slice(&answer);
                Ok(())
            },
        )?;
        Ok(Packed { pass, at, ids, w })
    }

    /// The summed weighted cross-entropy of the pass's targets.
    fn loss(
        &self,
        f: &Farcer,
        ps: &PreparedSet,
        utts: &[Utterance],
        use_cache: bool,
        mut train: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let llm = &f.llm;
        let enc = self.pass.encoded();
        let x = f.embeds(&enc, utts, train.as_deref_mut())?;
        let mut cache = if use_cache {
            ps.cache.clone()
        } else {
            llm.model.new_cache()
        };
        let dev = llm.model.device();
        let mask = self.pass.pack.mask(dev, llm.model.dtype())?;
        let pos = Positions {
            ids: Some(self.pass.pack.positions()),
            mask: Some(&mask),
            grad_from: enc.first_image_row(),
        };
        let logits = match train {
            Some(d) => llm.model.forward_train(&x, &mut cache, &pos, &self.at, d)?,
            None => llm.model.forward(&x, &mut cache, &pos, &self.at)?,
        }
        .ok_or_else(|| Error::msg("no answer tokens to score"))?
        .squeeze(0)?;
        let lp = log_softmax(&logits)?;
        let ids = Tensor::new(self.ids.as_slice(), dev)?.unsqueeze(1)?;
        let picked = lp.gather(&ids, 1)?.squeeze(1)?;
        let w = Tensor::new(self.w.as_slice(), dev)?;
        Ok((picked * w)?.sum_all()?.neg()?)
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum LogLine {
    Step {
        epoch: usize,
        step: usize,
        loss: f64,
        lr: f64,
        seconds: f64,
    },
    Epoch {
        epoch: usize,
        step: usize,
        train_loss: f64,
        val_weighted_f1: f64,
        val_accuracy: f64,
        val_macro_f1: f64,
        best: bool,
        seconds: f64,
    },
}

/// Training state that resumes a run (saved in `last/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs finished.
    pub epochs_done: usize,
    pub opt_step: usize,
    pub sample_step: usize,
    pub best_f1: Option<f64>,
    pub epochs_since_best: usize,
    pub finished: bool,
    /// This checkpoint is the best so far: `best/` must be a copy of it.
    #[serde(default)]
    pub is_best: bool,
    /// The epoch's line for `metrics.jsonl`, kept so that a resume can log it if a kill
    /// came between the checkpoint and the log.
    #[serde(default)]
    pub epoch_line: Option<LogLine>,
    #[serde(default)]
    pub stopped_early: bool,
    /// Seconds spent in epochs so far (wall clock, summed over resumed runs).
    #[serde(default)]
    pub seconds: f64,
}

/// What a caller sees while training runs.
pub trait Observer {
    fn epoch_start(&self, _epoch: usize, _samples: usize) {}
    fn step(&self, _epoch: usize, _done: usize, _loss: f64) {}
    fn validation(&self, _epoch: usize, _done: usize, _total: usize) {}
    fn epoch_end(&self, _line: &LogLine) {}
    /// Asked after each epoch's checkpoint: true stops the run there (resumable).
    fn should_stop(&self) -> bool {
        false
    }
    /// Asked after every training step (for Ctrl-C): true stops the run at once with
    /// [`Error::Interrupted`]; `--resume` redoes the unfinished epoch.
    fn interrupted(&self) -> bool {
        false
    }
}

/// A silent observer.
pub struct Quiet;
impl Observer for Quiet {}

/// Data for a run: the splits and the few-shot pool.
pub struct RunData {
    pub train: Dataset,
    pub val: Dataset,
    pub pool: Option<Dataset>,
}

/// The result of [`train`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epochs_run: usize,
    pub steps: usize,
    pub best_val_weighted_f1: Option<f64>,
    pub best_dir: PathBuf,
    pub stopped_early: bool,
    pub seconds: f64,
    pub seconds_per_step: f64,
}

/// What a run trains on, the same for training and a dry run: its dialogues with their
/// targets, the loss weights, and the prompt sets that steps cycle through.
struct Plan {
    units: Vec<Unit>,
    weights: TokenWeights,
    sets: Vec<PromptSet>,
    /// The prompt prefix comes from a cache computed once (no LoRA changes it).
    use_cache: bool,
    max_tokens: Option<usize>,
}

impl Plan {
    fn new(f: &Farcer, cfg: &TrainConfig, data: &RunData) -> Result<Self> {
        let mut samples: Vec<Sample> = data.train.samples(cfg.train_scope);
        if cfg.run.limit_train > 0 {
            samples.truncate(cfg.run.limit_train);
        }
        if samples.is_empty() {
            return Err(Error::msg(format!(
                "no training samples in {}:{}",
                data.train.corpus, data.train.split
            )));
        }
        let targets = samples
            .iter()
            .map(|s| target_tokens(f, data.train.gold(s)))
            .collect::<Result<Vec<_>>>()?;
        let weights = TokenWeights::balanced(&targets, f.llm.end_of_turn);
        let sets = (0..cfg.prompt.sets)
            .map(|s| PromptSet::for_shots(data.pool.as_ref(), cfg.prompt.shots, s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            units: units(samples),
            weights,
            sets,
            use_cache: cfg.run.prefix_cache && !f.llm.model.has_lora(),
            max_tokens: (cfg.run.max_tokens > 0).then_some(cfg.run.max_tokens),
        })
    }

    /// Prompt set `i`, with its prefix through the model when the cache is used (without
    /// it, LoRA changes the prefix, so it runs with every step and only the prompter is
    /// needed).
    fn prepare(
        &self,
        f: &Farcer,
        cfg: &TrainConfig,
        labels: &[String],
        i: usize,
    ) -> Result<PreparedSet> {
        let set = self.sets[i].clone();
        let pc = cfg.prompt_config();
        if self.use_cache {
            eval::prepare_set(&f.llm, labels, &pc, set, self.max_tokens)
        } else {
            prepare_uncached(f, labels, &pc, set, self.max_tokens)
        }
    }
}

/// What `farcer train --dry-run` reports: the size of an epoch and its estimated time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DryRun {
    pub dialogues: usize,
    pub targets: usize,
    /// Tokens through the model per epoch (packed rows of every pass; a cached prompt
    /// prefix is computed once and not counted).
    pub tokens_per_epoch: usize,
    pub timed_steps: usize,
    pub tokens_per_second: f64,
    /// Training only (validation comes on top).
    pub seconds_per_epoch: f64,
    pub seconds_run: f64,
}

/// Counts the tokens of an epoch and times `steps` training steps (forward and backward,
/// no update) to estimate how long the run takes. Changes nothing.
pub fn dry_run(f: &Farcer, cfg: &TrainConfig, data: &RunData, steps: usize) -> Result<DryRun> {
    let plan = Plan::new(f, cfg, data)?;
    let labels = &data.train.labels;
    let ps = plan.prepare(f, cfg, labels, 0)?;
    let per_unit = plan
        .units
        .iter()
        .map(|u| dialogue_tokens(f, &ps, &data.train, u, plan.use_cache))
        .collect::<Result<Vec<_>>>()?;
    let tokens: usize = per_unit.iter().sum();
    let mut order: Vec<usize> = (0..plan.units.len()).collect();
    Rng::derive(cfg.seed, "epoch-0").shuffle(&mut order);
    let (mut timed_tokens, mut seconds, mut timed) = (0, 0.0, 0);
    for &ui in order.iter().take(steps.max(1)) {
        let unit = &plan.units[ui];
        let start = std::time::Instant::now();
        let (loss, _) = dialogue_loss(
            f,
            &ps,
            &data.train,
            unit,
            &plan.weights,
            plan.use_cache,
            Some(&mut Dropout::new(cfg.seed)),
        )?;
        loss.backward()?;
        seconds += start.elapsed().as_secs_f64();
        timed_tokens += per_unit[ui];
        timed += 1;
    }
    let rate = timed_tokens as f64 / seconds.max(1e-9);
    let per_epoch = tokens as f64 / rate;
    Ok(DryRun {
        dialogues: plan.units.len(),
        targets: plan.units.iter().map(|u| u.samples.len()).sum(),
        tokens_per_epoch: tokens,
        timed_steps: timed,
        tokens_per_second: rate,
        seconds_per_epoch: per_epoch,
        seconds_run: per_epoch * cfg.optim.epochs as f64,
    })
}

/// Trains `f` (its projection, and its LoRA adapters if attached) and writes the run
/// folder `out`: `metrics.jsonl`, `last/` and `best/` checkpoints, and `summary.json`
/// once the run has finished. With `resume`, continues from `out/last`.
///
/// A kill at any moment loses at most the epoch in progress: `last/` (weights, optimiser
/// and [`RunState`]) is the one commit point of an epoch, replaced in one rename; `best/`,
/// the epoch's log line and the summary follow from it, and a resume completes whichever
/// of them a kill cut off ([`settle`]). `out` is locked while the run holds it.
#[allow(clippy::too_many_arguments)]
pub fn train(
    f: &mut Farcer,
    cfg: &TrainConfig,
    data: &RunData,
    manifest_base: &Manifest,
    out: &Path,
    resume: bool,
    obs: &dyn Observer,
) -> Result<TrainSummary> {
    std::fs::create_dir_all(out).at(out)?;
    let _lock = crate::util::DirLock::acquire(out)?;
    recover_dirs(out)?;
    let lora_vars = f.llm.model.lora_vars();
    let mut vars = f.projection_vars();
    vars.extend(lora_vars.iter().cloned());
    let mut opt = AdamW::new(vars, cfg.optim.weight_decay)?;
    let plan = Plan::new(f, cfg, data)?;
    let (units, weights, use_cache) = (&plan.units, &plan.weights, plan.use_cache);
    let mut prepared: Vec<Option<PreparedSet>> = (0..plan.sets.len()).map(|_| None).collect();

    let steps_per_epoch = units.len().div_ceil(cfg.optim.grad_accum);
    let total_steps = steps_per_epoch * cfg.optim.epochs;
    cfg.check_warmup(total_steps, "the training config")?;
    let last_dir = out.join("last");
    let log_path = out.join("metrics.jsonl");

    let mut st = RunState {
        epochs_done: 0,
        opt_step: 0,
        sample_step: 0,
        best_f1: None,
        epochs_since_best: 0,
        finished: false,
        is_best: false,
        epoch_line: None,
        stopped_early: false,
        seconds: 0.0,
    };
    if resume && (last_dir.exists() || last_dir.with_extension("old").exists()) {
        let (d, _) = crate::farcer::read_manifest(&last_dir)?;
        let state_path = d.join("state.json");
        st = serde_json::from_str(&std::fs::read_to_string(&state_path).at(&state_path)?)
            .map_err(|e| Error::input(state_path.display().to_string(), e.to_string()))?;
        f.restore(&d, true)?;
        let op = d.join("optimizer.safetensors");
        let os = candle_core::safetensors::load(&op, f.llm.model.device())
            .map_err(|e| Error::input(op.display().to_string(), e.to_string()))?;
        opt.load_state(&os, st.opt_step)?;
        // Lines logged after the checkpoint belong to the epoch that is redone.
        truncate_log(&log_path, st.sample_step)?;
        settle(out, &st)?;
        if st.finished {
            return Err(Error::AlreadyFinished(out.to_path_buf()));
        }
    } else {
        crate::util::remove_any(&log_path)?;
        crate::util::remove_any(&out.join("summary.json"))?;
    }

    for epoch in st.epochs_done..cfg.optim.epochs {
        let ep_start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..units.len()).collect();
        Rng::derive(cfg.seed, &format!("epoch-{epoch}")).shuffle(&mut order);
        obs.epoch_start(epoch, order.len());
        let mut acc: HashMap<String, Tensor> = HashMap::new();
        let (mut in_acc, mut acc_targets) = (0, 0);
        let (mut loss_sum, mut epoch_targets) = (0.0, 0);
        for (k, &ui) in order.iter().enumerate() {
            let step_start = std::time::Instant::now();
            let set_i = st.sample_step % plan.sets.len();
            if prepared[set_i].is_none() {
                prepared[set_i] = Some(plan.prepare(f, cfg, &data.train.labels, set_i)?);
            }
            let ps = prepared[set_i].as_ref().expect("prepared");
            // Dropout masks depend on (seed, step) only, so a resumed run repeats them.
            let step_seed = cfg.seed ^ (st.sample_step as u64).wrapping_mul(0x9E3779B97F4A7C15);
            let mut dropout = Dropout::new(step_seed);
            let unit = &units[ui];
            let (loss, n) = dialogue_loss(
                f,
                ps,
                &data.train,
                unit,
                weights,
                use_cache,
                Some(&mut dropout),
            )?;
            let lv = loss.to_scalar::<f32>()? as f64 / n as f64;
            if !lv.is_finite() {
                return Err(Error::msg(format!(
                    "loss is {lv} at epoch {epoch}, step {k} (dialogue {}): stopping. Lower the learning rate (now {}) or check the inputs",
                    data.train.dialogues[unit.dialogue].id,
                    cfg.lr()
                )));
            }
            let grads = loss.backward()?;
            accumulate(&mut acc, &grads, &opt.vars)?;
            in_acc += 1;
            acc_targets += n;
            loss_sum += lv * n as f64;
            epoch_targets += n;
            st.sample_step += 1;
            let last_of_epoch = k + 1 == order.len();
            let mut lr = lr_at(cfg.lr(), st.opt_step, total_steps, cfg.optim.warmup_steps);
            if in_acc == cfg.optim.grad_accum || last_of_epoch {
                // The mean gradient over the targets of the accumulated dialogues.
                for g in acc.values_mut() {
                    *g = (&*g / acc_targets as f64)?;
                }
                opt.step(&acc, lr)?;
                st.opt_step += 1;
                acc.clear();
                (in_acc, acc_targets) = (0, 0);
            } else {
                lr = f64::NAN;
            }
            append_log(
                &log_path,
                &LogLine::Step {
                    epoch,
                    step: st.sample_step,
                    loss: lv,
                    lr: if lr.is_nan() { 0.0 } else { lr },
                    seconds: step_start.elapsed().as_secs_f64(),
                },
            )?;
            obs.step(epoch, k + 1, lv);
            if obs.interrupted() {
                return Err(Error::Interrupted {
                    out: out.to_path_buf(),
                    epochs_done: st.epochs_done,
                });
            }
        }

        // Validation: weighted F1 on the validation split with the evaluation prompt set.
        let vopts = EvalOptions {
            prompt_sets: vec![cfg.prompt.eval_set],
            decode: cfg.run.val_decode,
            limit: (cfg.run.limit_val > 0).then_some(cfg.run.limit_val),
            max_tokens: plan.max_tokens,
            ..EvalOptions::new(cfg.val_scope, cfg.prompt_config())
        };
        let vr = eval::evaluate(f, &data.val, data.pool.as_ref(), &vopts, &|d, t| {
            obs.validation(epoch, d, t)
        })?;
        let sc = &vr.sets[0].scores;
        let better = st.best_f1.is_none_or(|b| sc.weighted_f1 > b);
        st.epochs_done = epoch + 1;
        if better {
            st.best_f1 = Some(sc.weighted_f1);
            st.epochs_since_best = 0;
        } else {
            st.epochs_since_best += 1;
        }
        let stop = st.epochs_since_best >= cfg.optim.patience;
        st.finished = stop || epoch + 1 == cfg.optim.epochs;
        st.stopped_early = stop && epoch + 1 < cfg.optim.epochs;
        st.is_best = better;
        let mut m = manifest_base.clone();
        m.epoch = epoch + 1;
        m.step = st.opt_step;
        m.val_weighted_f1 = Some(sc.weighted_f1);
        let line = LogLine::Epoch {
            epoch,
            step: st.sample_step,
            train_loss: loss_sum / epoch_targets.max(1) as f64,
            val_weighted_f1: sc.weighted_f1,
            val_accuracy: sc.accuracy,
            val_macro_f1: sc.macro_f1,
            best: better,
            seconds: ep_start.elapsed().as_secs_f64(),
        };
        st.seconds += ep_start.elapsed().as_secs_f64();
        st.epoch_line = Some(line.clone());
        // The commit point; everything after it is redone by a resume if cut off.
        save_run_checkpoint(f, &m, &lora_vars, &opt, &st, &last_dir)?;
        settle(out, &st)?;
        obs.epoch_end(&line);
        if st.finished || obs.should_stop() {
            break;
        }
    }
    Ok(summary_of(&st, out))
}

fn summary_of(st: &RunState, out: &Path) -> TrainSummary {
    TrainSummary {
        epochs_run: st.epochs_done,
        steps: st.opt_step,
        best_val_weighted_f1: st.best_f1,
        best_dir: out.join("best"),
        stopped_early: st.stopped_early,
        seconds: st.seconds,
        seconds_per_step: st.seconds / st.sample_step.max(1) as f64,
    }
}

/// Brings `best/`, `metrics.jsonl` and `summary.json` in line with the committed
/// checkpoint `last/` (state `st`). Each step checks before it writes, so running it again
/// after a kill anywhere inside it finishes the job and changes nothing already done.
fn settle(out: &Path, st: &RunState) -> Result<()> {
    let last = out.join("last");
    let best = out.join("best");
    if st.is_best {
        let same = std::fs::read(best.join("state.json")).ok()
            == Some(std::fs::read(last.join("state.json")).at(last.join("state.json"))?);
        if !same {
            let tmp = out.join(format!(".best.staging{}", std::process::id()));
            crate::util::remove_any(&tmp)?;
            crate::util::copy_flat_dir(&last, &tmp)?;
            crate::farcer::replace_dir(&tmp, &best)?;
        }
    }
    if let Some(line @ LogLine::Epoch { epoch, .. }) = &st.epoch_line {
        let log = out.join("metrics.jsonl");
        let text = if log.is_file() {
            std::fs::read_to_string(&log).at(&log)?
        } else {
            String::new()
        };
        let logged = text.lines().any(|l| {
            matches!(serde_json::from_str::<LogLine>(l), Ok(LogLine::Epoch { epoch: e, .. }) if e == *epoch)
        });
        if !logged {
            append_log(&log, line)?;
        }
        write_curves(out)?;
    }
    let summary = out.join("summary.json");
    if st.finished && !summary.is_file() {
        crate::util::write_json_atomic(&summary, &summary_of(st, out))?;
    }
    Ok(())
}

/// `curves.png` from the epoch lines of `metrics.jsonl`: training loss and validation
/// weighted F1 per epoch.
fn write_curves(out: &Path) -> Result<()> {
    let log = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&log).at(&log)?;
    let epochs: Vec<(f64, f64, f64)> = text
        .lines()
        .filter_map(|l| match serde_json::from_str::<LogLine>(l) {
            Ok(LogLine::Epoch {
                epoch,
                train_loss,
                val_weighted_f1,
                ..
            }) => Some(((epoch + 1) as f64, train_loss, val_weighted_f1)),
            _ => None,
        })
        .collect();
    crate::plot::curves_png(&out.join("curves.png"), "learning curves", &epochs)
}

/// Undoes what a kill can leave in a run folder: a checkpoint moved aside (`last.old`
/// without `last`) goes back; staging folders and temporary files go.
fn recover_dirs(out: &Path) -> Result<()> {
    for name in ["last", "best"] {
        let d = out.join(name);
        let old = d.with_extension("old");
        if old.exists() {
            if d.exists() {
                crate::util::remove_any(&old)?;
            } else {
                crate::util::crash_point("move a checkpoint back");
                std::fs::rename(&old, &d).at(&d)?;
            }
        }
    }
    crate::util::remove_leftovers(out)
}

/// A prompt set without a computed prefix cache (the prefix runs with each sample).
fn prepare_uncached(
    f: &Farcer,
    labels: &[String],
    cfg: &PromptConfig,
    set: PromptSet,
    max_tokens: Option<usize>,
) -> Result<PreparedSet> {
    Ok(PreparedSet {
        prompter: eval::prompter_for(&f.llm, labels, cfg, set, max_tokens)?,
        cache: f.llm.model.new_cache(),
    })
}

fn accumulate(
    acc: &mut HashMap<String, Tensor>,
    grads: &GradStore,
    vars: &[(String, Var)],
) -> Result<()> {
    for (name, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let g = g.to_dtype(DType::F32)?;
            let e = match acc.remove(name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(name.clone(), e);
        }
    }
    Ok(())
}

fn save_run_checkpoint(
    f: &Farcer,
    m: &Manifest,
    lora: &[(String, Var)],
    opt: &AdamW,
    st: &RunState,
    dir: &Path,
) -> Result<()> {
    // Save into the folder, then add the optimiser and run state before it is renamed:
    // `Farcer::save` writes a temporary folder and renames it, so add the extra files
    // through a second temporary copy done the same way.
    let tmp = dir.with_extension(format!("staging{}", std::process::id()));
    crate::util::remove_any(&tmp)?;
    f.save(&tmp, m, lora)?;
    crate::util::save_tensors(&opt.state(), &tmp.join("optimizer.safetensors"))?;
    crate::util::write_json_atomic(&tmp.join("state.json"), st)?;
    crate::farcer::replace_dir(&tmp, dir)
}

fn append_log(path: &Path, line: &LogLine) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .at(path)?;
    crate::util::crash_point("append to the log");
    writeln!(
        f,
        "{}",
        serde_json::to_string(line).expect("log line serialises")
    )
    .at(path)
}

/// Drops step lines after `sample_step` (an interrupted epoch that is redone).
fn truncate_log(path: &Path, sample_step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let mut keep = String::new();
    for l in text.lines() {
        let drop = match serde_json::from_str::<LogLine>(l) {
            Ok(LogLine::Step { step, .. }) => step > sample_step,
            Ok(LogLine::Epoch { step, .. }) => step > sample_step,
            Err(_) => true,
        };
        if !drop {
            keep.push_str(l);
            keep.push('\n');
        }
    }
    crate::util::write_atomic(path, keep.as_bytes())
}
