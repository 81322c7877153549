//! Evaluation: every sample of a split through the prompt, the model and a decoder, then
//! the metrics. The prompt prefix of a prompt set goes through the LLM once; each sample
//! then runs only its own tokens on a copy of that cache.

use crate::data::{Dataset, Sample, Scope, Utterance};
use crate::decode::{self, Decode, LabelTokens, Prediction};
use crate::error::{Error, IoContext, Result};
use crate::metrics::{self, Scores};
use crate::model::llama::{Cache, Positions};
use crate::model::Llm;
use crate::prompt::{Encoded, PromptConfig, PromptSet, Prompter};
use crate::util::mean_std;
use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What turns a sample's prompt into input embeddings: the LLM alone (text-only), or
/// FARCER with its projection of image vectors.
pub trait InputBuilder {
    fn llm(&self) -> &Llm;
    /// Whether this utterance contributes an image vector.
    fn has_image(&self, u: &Utterance) -> bool;
    /// Embeddings `(1, len, hidden)` of a sample's prompt suffix.
    fn suffix_embeds(&self, enc: &Encoded, context: &[Utterance]) -> Result<Tensor>;
    /// Short description for reports (`text-only`, `farcer-base`...).
    fn kind(&self) -> String;
}

/// Text only: token embeddings, no image slots.
impl InputBuilder for Llm {
    fn llm(&self) -> &Llm {
        self
    }
    fn has_image(&self, _: &Utterance) -> bool {
        false
    }
    fn suffix_embeds(&self, enc: &Encoded, _: &[Utterance]) -> Result<Tensor> {
        Ok(self.model.embed(&enc.flat_tokens())?.unsqueeze(0)?)
    }
    fn kind(&self) -> String {
        "text-only".into()
    }
}

/// Which prompt sets to evaluate with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptSets {
    One(u64),
    All(String),
}

impl std::str::FromStr for PromptSets {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(PromptSets::All("all".into()));
        }
        match s.parse::<u64>() {
            Ok(n) if n < 10 => Ok(PromptSets::One(n)),
            _ => Err(Error::input(
                "--prompt-set",
                format!("`{s}`: expected 0-9 or all"),
            )),
        }
    }
}

impl PromptSets {
    pub fn indices(&self) -> Vec<u64> {
        match self {
            PromptSets::One(n) => vec![*n],
            PromptSets::All(_) => (0..10).collect(),
        }
    }
}

/// Where the past labels of a past-labels ("PL") prompt come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PastSource {
    /// The gold labels (the paper's ablation).
    #[default]
    Gold,
    /// The model's own earlier predictions in the dialogue (what a deployed system has).
    Predicted,
}

impl std::str::FromStr for PastSource {
    type Err = String;
    /// The name as written in configs and on the command line.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gold" => Ok(PastSource::Gold),
            "predicted" => Ok(PastSource::Predicted),
            other => Err(format!(
                "`{other}`: the past-label source is gold or predicted"
            )),
        }
    }
}

impl std::fmt::Display for PastSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PastSource::Gold => "gold",
            PastSource::Predicted => "predicted",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalOptions {
    pub scope: Scope,
    pub prompt: PromptConfig,
    pub prompt_sets: Vec<u64>,
    pub decode: Decode,
    /// Evaluate the first N samples only.
    pub limit: Option<usize>,
    /// Longest prompt in tokens (default: the model's context).
    pub max_tokens: Option<usize>,
    /// With past labels: gold, or the model's own earlier predictions.
    #[serde(default)]
    pub past_source: PastSource,
    /// Real images, or the shuffled-image control.
    #[serde(default)]
    pub image_control: ImageControl,
}

impl EvalOptions {
    /// One prompt set (0), constrained decoding, every sample, the model's whole context,
    /// gold past labels, real images: change the rest with `..EvalOptions::new(..)`.
    pub fn new(scope: Scope, prompt: PromptConfig) -> Self {
        EvalOptions {
            scope,
            prompt,
            prompt_sets: vec![0],
            decode: Decode::Constrained,
            limit: None,
            max_tokens: None,
            past_source: PastSource::default(),
            image_control: ImageControl::default(),
        }
    }
}

/// A control for what the images add. A projection trained with images can raise scores
/// even when the images carry nothing (it acts as a trainable soft prompt), so the score
/// with real images means little alone: `shuffle` gives every image slot the image of
/// another utterance drawn at random (seeded) from the same split, and only the
/// difference from the real images is what the faces add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageControl {
    #[default]
    None,
    Shuffle,
}

impl std::fmt::Display for ImageControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageControl::None => "none",
            ImageControl::Shuffle => "shuffle",
        })
    }
}

impl std::str::FromStr for ImageControl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(ImageControl::None),
            "shuffle" => Ok(ImageControl::Shuffle),
            other => Err(format!("`{other}`: the image control is none or shuffle")),
        }
    }
}

/// `data` with every utterance's image replaced by the image of another utterance of the
/// split, drawn at random (seeded by the split's name, so the control is repeatable).
/// Utterances without an image stay without one.
pub fn shuffle_images(data: &Dataset) -> Dataset {
    let pool: Vec<PathBuf> = data.image_paths().cloned().collect();
    let mut rng = crate::util::Rng::derive(0, &format!("image-control:{}", data.split));
    let mut out = data.clone();
    let distinct: std::collections::HashSet<&PathBuf> = pool.iter().collect();
    if distinct.len() < 2 {
        return out;
    }
    for u in out
        .dialogues
        .iter_mut()
        .flat_map(|d| d.utterances.iter_mut())
    {
        let Some(own) = &u.image else { continue };
        loop {
            let pick = &pool[rng.below(pool.len())];
            if pick != own {
                u.image = Some(pick.clone());
                break;
            }
        }
    }
    out
}

/// One prediction, as written to `predictions.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionRecord {
    pub dialogue_id: String,
    pub utterance_id: String,
    pub prompt_set: u64,
    pub gold: String,
    pub pred: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<metrics::indexmap_like::OrderedMap<f64>>,
    /// Utterances cut from the front to fit the context.
    #[serde(skip_serializing_if = "is_zero")]
    pub dropped: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Scores of one prompt set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetResult {
    pub prompt_set: u64,
    pub scores: Scores,
    pub prefix_tokens: usize,
    pub excluded_dialogues: usize,
}

/// The whole result of an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub sets: Vec<SetResult>,
    pub predictions: Vec<PredictionRecord>,
    /// Samples whose dialogue was cut to fit the context.
    pub truncated: usize,
    pub seconds: f64,
    pub samples: usize,
}

/// Mean and standard deviation over prompt sets of each headline metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spread {
    pub weighted_f1: (f64, f64),
    pub accuracy: (f64, f64),
    pub macro_f1: (f64, f64),
}

impl EvalResult {
    pub fn spread(&self) -> Spread {
        let f = |g: &dyn Fn(&Scores) -> f64| {
            mean_std(&self.sets.iter().map(|s| g(&s.scores)).collect::<Vec<_>>())
        };
        Spread {
            weighted_f1: f(&|s| s.weighted_f1),
            accuracy: f(&|s| s.accuracy),
            macro_f1: f(&|s| s.macro_f1),
        }
    }
}

/// Runs the prompt prefix through the LLM once and returns its cache.
pub fn prefix_cache(llm: &Llm, prefix: &[u32]) -> Result<Cache> {
    let mut cache = llm.model.new_cache();
    if !prefix.is_empty() {
        let x = llm.model.embed(prefix)?.unsqueeze(0)?;
        llm.model
            .forward(&x, &mut cache, &Positions::default(), &[])?;
    }
    Ok(cache)
}

/// A prompt set ready to use: the prompter and the cache of its prefix.
pub struct PreparedSet {
    pub prompter: Prompter,
    pub cache: Cache,
}

/// The prompter of a prompt set for `llm`: prompts up to `max_tokens`, and never longer
/// than the model's context.
pub fn prompter_for(
    llm: &Llm,
    labels: &[String],
    cfg: &PromptConfig,
    set: PromptSet,
    max_tokens: Option<usize>,
) -> Result<Prompter> {
    let max = max_tokens
        .unwrap_or(usize::MAX)
        .min(llm.model.config.max_position_embeddings);
    Prompter::new(&llm.tokenizer, &llm.template, labels, cfg, set, max)
}

pub fn prepare_set(
    llm: &Llm,
    labels: &[String],
    cfg: &PromptConfig,
    set: PromptSet,
    max_tokens: Option<usize>,
) -> Result<PreparedSet> {
    let prompter = prompter_for(llm, labels, cfg, set, max_tokens)?;
    let cache = prefix_cache(llm, &prompter.prefix)?;
    Ok(PreparedSet { prompter, cache })
}

/// Predicts one sample with a prepared prompt set.
pub fn predict_one(
    b: &dyn InputBuilder,
    ps: &PreparedSet,
    context: &[Utterance],
    past: Option<&[Option<String>]>,
    decoder: Decode,
    cands: &LabelTokens,
) -> Result<(Prediction, Encoded)> {
    let llm = b.llm();
    let has_image = |i: usize| b.has_image(&context[i]);
    let enc = ps.prompter.encode(context, &has_image, past)?;
    let x = b.suffix_embeds(&enc, context)?;
    let pred = match decoder {
        Decode::Greedy => {
            let t = x.dim(1)?;
            let mut cache = ps.cache.clone();
            let logits = llm
                .model
                .forward(&x, &mut cache, &Positions::default(), &[t - 1])?
                .expect("logits asked");
            decode::greedy(
                llm,
                cache,
                &logits.i((0, 0))?,
                &ps.prompter.labels,
                decode::GREEDY_MAX_NEW,
            )?
        }
        Decode::Constrained => decode::score_labels(&llm.model, &ps.cache, &x, cands)?,
    };
    Ok((pred, enc))
}

/// The passes that score a dialogue's samples together: where each sample's context
/// starts once cut to fit (from the front, as [`Prompter::encode`] cuts), and the targets
/// (indices from that start) that share each start. `utts` is the whole dialogue.
pub fn passes(
    b: &dyn InputBuilder,
    ps: &PreparedSet,
    utts: &[Utterance],
    samples: &[Sample],
) -> Result<Vec<(usize, Vec<usize>)>> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for s in samples {
        let ctx = &utts[s.start..=s.target];
        let enc = ps.prompter.encode(ctx, &|i| b.has_image(&ctx[i]), None)?;
        let start = s.start + enc.dropped;
        match groups.last_mut() {
            Some((g, t)) if *g == start => t.push(s.target - start),
            _ => groups.push((start, vec![s.target - start])),
        }
    }
    Ok(groups)
}

/// Constrained decoding of a dialogue's targets (ascending indices into `utts`, the
/// dialogue from its context start) in one packed pass after the prompt prefix's cache:
/// the dialogue is the trunk, each target's label query a branch, and every candidate
/// label a branch continuing that query ([`crate::pack::DialoguePass`]). Each target gets
/// the scores it would get alone ([`decode::score_labels`] on its own prompt).
pub fn score_dialogue(
    b: &dyn InputBuilder,
    ps: &PreparedSet,
    utts: &[Utterance],
    targets: &[usize],
    cands: &LabelTokens,
) -> Result<Vec<Prediction>> {
    let llm = b.llm();
    // Per target: the row of its query's last token, then per label the rows of its
    // tokens but the last.
    let mut rows: Vec<(usize, Vec<std::ops::Range<usize>>)> = Vec::new();
    let pass = crate::pack::DialoguePass::new(
        &ps.prompter,
        utts,
        targets,
        &|u| b.has_image(u),
        ps.cache.len(),
        &mut |d, k, query| {
            let labels = cands
                .seqs
                .iter()
                .map(|seq| d.child(query, &seq[..seq.len() - 1]))
                .collect();
            rows.push((d.queries[k].1.end - 1, labels));
            Ok(())
        },
    )?;
    let x = b.suffix_embeds(&pass.encoded(), utts)?;
    let mask = pass.pack.mask(llm.model.device(), llm.model.dtype())?;
    let mut at = Vec::new();
    for (q, labels) in &rows {
        at.push(*q);
        for r in labels {
            at.extend(r.clone());
        }
    }
    let mut cache = ps.cache.clone();
    let logits = llm
        .model
        .forward(
            &x,
            &mut cache,
            &Positions {
                ids: Some(pass.pack.positions()),
                mask: Some(&mask),
                grad_from: 0,
            },
            &at,
        )?
        .ok_or_else(|| Error::msg("no label scored"))?;
    let lp = crate::model::llama::log_softmax(&logits.i(0)?)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let mut out = Vec::new();
    let mut k = 0;
    for (_, labels) in &rows {
        let first = &lp[k];
        k += 1;
        let mut scores = Vec::new();
        for (seq, r) in cands.seqs.iter().zip(labels) {
            let mut s = first[seq[0] as usize] as f64;
            // Row j of a label's branch predicts its token j + 1.
            for (j, _) in r.clone().enumerate() {
                s += lp[k + j][seq[j + 1] as usize] as f64;
            }
            k += r.len();
            scores.push(s);
        }
        out.push(decode::probabilities(scores, cands)?);
    }
    Ok(out)
}

/// Evaluates `data` (examples drawn from `pool`) with each prompt set of `opts`.
/// `progress` is told each finished sample.
pub fn evaluate(
    b: &dyn InputBuilder,
    data: &Dataset,
    pool: Option<&Dataset>,
    opts: &EvalOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<EvalResult> {
    evaluate_journaled(b, data, pool, opts, None, progress)
}

/// Predictions as they are made, appended to a file one line at a time and flushed, so
/// that an evaluation killed at any moment keeps what it did and a resume continues it.
/// The first line is a fingerprint of what is evaluated: a resume with other settings is
/// refused instead of mixing two evaluations.
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    done: std::collections::HashMap<(u64, String, String), PredictionRecord>,
}

impl Journal {
    /// Opens `path`: with `resume`, keeps the predictions a previous run of the same
    /// evaluation wrote (a line cut off by a kill is dropped); otherwise starts it empty.
    pub fn open(path: &Path, fingerprint: &str, resume: bool) -> Result<Self> {
        use std::io::Write;
        let head = serde_json::json!({ "partial_evaluation": fingerprint }).to_string();
        let mut done = std::collections::HashMap::new();
        let mut keep = 0u64;
        let existing = if resume && path.is_file() {
            Some(std::fs::read_to_string(path).at(path)?)
        } else {
            None
        };
        if let Some(text) = &existing {
            let mut lines = text.split_inclusive('\n');
            match lines.next() {
                Some(l) if l.trim_end() == head => keep += l.len() as u64,
                Some(l) if l.ends_with('\n') => {
                    return Err(Error::input(
                        path.display().to_string(),
                        "holds a partial evaluation with other settings (model, data or options): run without --resume to start again, or choose another --out",
                    ))
                }
                _ => {}
            }
            if keep > 0 {
                for l in lines {
                    let Some(line) = l.strip_suffix('\n') else {
                        break;
                    };
                    let Ok(r) = serde_json::from_str::<PredictionRecord>(line) else {
                        break;
                    };
                    keep += l.len() as u64;
                    done.insert(
                        (r.prompt_set, r.dialogue_id.clone(), r.utterance_id.clone()),
                        r,
                    );
                }
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        crate::util::crash_point("open the predictions journal");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .at(path)?;
        file.set_len(keep).at(path)?;
        if keep == 0 {
            writeln!(file, "{head}").at(path)?;
            file.sync_data().at(path)?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            done,
        })
    }

    /// Predictions kept from an earlier run.
    pub fn resumed(&self) -> usize {
        self.done.len()
    }

    fn take(&mut self, set: u64, dialogue: &str, utterance: &str) -> Option<PredictionRecord> {
        self.done
            .remove(&(set, dialogue.to_string(), utterance.to_string()))
    }

    fn record(&mut self, r: &PredictionRecord) -> Result<()> {
        use std::io::Write;
        crate::util::crash_point("append a prediction");
        let line = serde_json::to_string(r).expect("prediction serialises");
        writeln!(self.file, "{line}").at(&self.path)?;
        self.file.flush().at(&self.path)
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// [`evaluate`], with each prediction kept in `journal` as it is made and those a
/// resumed journal already holds taken from it instead of computed again.
pub fn evaluate_journaled(
    b: &dyn InputBuilder,
    data: &Dataset,
    pool: Option<&Dataset>,
    opts: &EvalOptions,
    mut journal: Option<&mut Journal>,
    progress: &dyn Fn(usize, usize),
) -> Result<EvalResult> {
    let shuffled;
    let data = match opts.image_control {
        ImageControl::None => data,
        ImageControl::Shuffle => {
            shuffled = shuffle_images(data);
            &shuffled
        }
    };
    let llm = b.llm();
    let start = Instant::now();
    let cands = LabelTokens::new(llm, &data.labels)?;
    let mut sets = Vec::new();
    let mut predictions = Vec::new();
    let mut truncated = 0;
    let mut samples_done = 0;
    let all_samples = data.samples(opts.scope);
    let per_set = opts.limit.unwrap_or(usize::MAX).min(all_samples.len());
    let total = per_set * opts.prompt_sets.len();
    for &s in &opts.prompt_sets {
        let set = PromptSet::for_shots(pool, opts.prompt.shots, s)?;
        // Dialogues shown as examples are not scored when the pool is the evaluated split.
        let same_split = pool.is_some_and(|p| p.corpus == data.corpus && p.split == data.split);
        let excluded = if same_split {
            set.dialogue_ids()
        } else {
            Default::default()
        };
        let ps = prepare_set(llm, &data.labels, &opts.prompt, set, opts.max_tokens)?;
        let chosen: Vec<Sample> = all_samples
            .iter()
            .filter(|s| !excluded.contains(&data.dialogues[s.dialogue].id))
            .take(per_set)
            .copied()
            .collect();
        let mut gold = Vec::new();
        let mut pred = Vec::new();
        // Predicted past labels: every earlier utterance of the dialogue is predicted first
        // (in order, each on its own prefix with the predictions before it), memoised.
        let mut predicted: std::collections::HashMap<(usize, usize), String> = Default::default();
        let use_predicted = opts.prompt.past_labels && opts.past_source == PastSource::Predicted;
        // Constrained decoding with gold (or no) past labels scores all of a dialogue's
        // samples in one packed pass, the first time one of them comes up.
        let batched = opts.decode == Decode::Constrained && !use_predicted;
        let mut by_dialogue: std::collections::HashMap<usize, Vec<Sample>> = Default::default();
        for smp in &chosen {
            by_dialogue.entry(smp.dialogue).or_default().push(*smp);
        }
        let mut scored: std::collections::HashMap<(usize, usize), (Prediction, usize)> =
            Default::default();
        for smp in &chosen {
            let d = &data.dialogues[smp.dialogue];
            let uid = &d.utterances[smp.target].id;
            if let Some(r) = journal.as_mut().and_then(|j| j.take(s, &d.id, uid)) {
                if r.dropped > 0 {
                    truncated += 1;
                }
                if use_predicted {
                    predicted.insert((smp.dialogue, smp.target), r.pred.clone());
                }
                gold.push(r.gold.clone());
                pred.push(r.pred.clone());
                predictions.push(r);
                samples_done += 1;
                progress(samples_done, total);
                continue;
            }
            let ctx = data.context(smp);
            let past = if use_predicted {
                for j in 0..smp.target {
                    if !predicted.contains_key(&(smp.dialogue, j)) {
                        let start = match data.max_context {
                            Some(m) if j + 1 > m => j + 1 - m,
                            _ => 0,
                        };
                        let c = &data.dialogues[smp.dialogue].utterances[start..=j];
                        let past: Vec<Option<String>> = (start..j)
                            .map(|i| predicted.get(&(smp.dialogue, i)).cloned())
                            .collect();
                        let (p, _) = predict_one(b, &ps, c, Some(&past), opts.decode, &cands)?;
                        predicted.insert((smp.dialogue, j), p.label);
                    }
                }
                Some(
                    (smp.start..smp.target)
                        .map(|i| predicted.get(&(smp.dialogue, i)).cloned())
                        .collect::<Vec<_>>(),
                )
            } else {
                None
            };
            let (p, dropped) = if batched {
                if !scored.contains_key(&(smp.dialogue, smp.target)) {
                    let utts = &d.utterances;
                    for (start, targets) in passes(b, &ps, utts, &by_dialogue[&smp.dialogue])? {
                        let preds = score_dialogue(b, &ps, &utts[start..], &targets, &cands)?;
                        for (t, p) in targets.iter().zip(preds) {
                            let s = by_dialogue[&smp.dialogue]
                                .iter()
                                .find(|s| s.target == start + t)
                                .expect("a target of this dialogue");
                            scored.insert((smp.dialogue, s.target), (p, start - s.start));
                        }
                    }
                }
                scored
                    .remove(&(smp.dialogue, smp.target))
                    .expect("scored with its dialogue")
            } else {
                let (p, enc) = predict_one(b, &ps, ctx, past.as_deref(), opts.decode, &cands)?;
                (p, enc.dropped)
            };
            if use_predicted {
                predicted.insert((smp.dialogue, smp.target), p.label.clone());
            }
            if dropped > 0 {
                truncated += 1;
            }
            gold.push(data.gold(smp).to_string());
            pred.push(p.label.clone());
            let r = PredictionRecord {
                dialogue_id: d.id.clone(),
                utterance_id: d.utterances[smp.target].id.clone(),
                prompt_set: s,
                gold: data.gold(smp).to_string(),
                pred: p.label,
                text: p.text,
                probs: p.probs.map(|v| {
                    metrics::indexmap_like::OrderedMap(data.labels.iter().cloned().zip(v).collect())
                }),
                dropped,
            };
            if let Some(j) = journal.as_mut() {
                j.record(&r)?;
            }
            predictions.push(r);
            samples_done += 1;
            progress(samples_done, total);
        }
        sets.push(SetResult {
            prompt_set: s,
            scores: metrics::score(&data.labels, &gold, &pred),
            prefix_tokens: ps.prompter.prefix.len(),
            excluded_dialogues: excluded.len(),
        });
    }
    Ok(EvalResult {
        sets,
        predictions,
        truncated,
        seconds: start.elapsed().as_secs_f64(),
        samples: samples_done,
    })
}

#[cfg(test)]
mod control_tests {
    use super::*;
    use crate::data::{Dialogue, Utterance};

    /// The control swaps every image for another utterance's of the same split, the same
    /// way every time; utterances without an image stay without one.
    #[test]
    fn shuffled_images_come_from_other_utterances_and_repeat() {
        let dialogues = (0..20)
            .map(|i| Dialogue {
                id: i.to_string(),
                utterances: (0..3)
                    .map(|j| {
                        let mut u = Utterance::new(j.to_string(), "A", "x");
                        if j != 1 {
                            u.image = Some(PathBuf::from(format!("{i}-{j}.png")));
                        }
                        u
                    })
                    .collect(),
            })
            .collect();
        let d = Dataset {
            corpus: "t".into(),
            split: "test".into(),
            labels: vec!["a".into()],
            dialogues,
            max_context: None,
        };
        let s = shuffle_images(&d);
        assert_eq!(s.dialogues, shuffle_images(&d).dialogues, "seeded");
        let mut moved = std::collections::HashSet::new();
        for (a, b) in d.dialogues.iter().zip(&s.dialogues) {
            for (u, v) in a.utterances.iter().zip(&b.utterances) {
                assert_eq!(u.image.is_some(), v.image.is_some());
                if let (Some(x), Some(y)) = (&u.image, &v.image) {
                    assert_ne!(x, y, "an image is never its own control");
                    moved.insert(y.clone());
                }
                assert_eq!((&u.text, &u.label), (&v.text, &v.label));
            }
        }
        assert!(moved.len() > 15, "drawn across the split: {}", moved.len());
        let mut one = d.clone();
        one.dialogues.truncate(1);
        one.dialogues[0].utterances[2].image = one.dialogues[0].utterances[0].image.clone();
        assert_eq!(
            shuffle_images(&one).dialogues,
            one.dialogues,
            "one distinct image: unchanged"
        );
    }
}
