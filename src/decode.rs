//! Turning the LLM's output into a label.
//!
//! `greedy` is the paper's: up to a few new tokens, stopping at end-of-turn; the text is
//! trimmed and lower-cased and must equal a label, else it is `invalid`.
//! `score_labels` (constrained decoding) scores every label: the sum of the log-probabilities of its tokens and
//! the end-of-turn token. All labels go through the model in *one* pass with the sample's
//! own prompt tokens: their tokens are packed into a single sequence whose attention mask lets each
//! label see the prompt and its own earlier tokens only, with the positions it would have
//! on its own. Exact, and one pass instead of one per label.

use crate::error::{Error, Result};
use crate::metrics::{parse_answer, INVALID};
use crate::model::llama::{argmax, log_softmax, Cache, Llama, Positions, Segment};
use crate::model::Llm;
use crate::pack::Packing;
use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decode {
    Greedy,
    Constrained,
}

impl std::fmt::Display for Decode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decode::Greedy => "greedy",
            Decode::Constrained => "constrained",
        })
    }
}

impl std::str::FromStr for Decode {
    type Err = String;
    /// The name as written in configs and on the command line.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "greedy" => Ok(Decode::Greedy),
            "constrained" => Ok(Decode::Constrained),
            other => Err(format!("`{other}`: decoding is greedy or constrained")),
        }
    }
}

/// The paper's generation budget.
pub const GREEDY_MAX_NEW: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// A label, or `invalid`.
    pub label: String,
    /// What the model wrote (greedy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Probability of each label, in label order (constrained).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<f64>>,
}

/// The token sequences of the candidate answers: each label's tokens then end-of-turn.
#[derive(Debug, Clone)]
pub struct LabelTokens {
    pub labels: Vec<String>,
    pub seqs: Vec<Vec<u32>>,
}

impl LabelTokens {
    pub fn new(llm: &Llm, labels: &[String]) -> Result<Self> {
        let seqs = labels
            .iter()
            .map(|l| llm.answer_tokens(l))
            .collect::<Result<Vec<_>>>()?;
        Ok(LabelTokens {
            labels: labels.to_vec(),
            seqs,
        })
    }
}

/// Greedy decoding from the logits at the last prompt position; `cache` holds the prompt.
pub fn greedy(
    llm: &Llm,
    mut cache: Cache,
    last_logits: &Tensor,
    labels: &[String],
    max_new: usize,
) -> Result<Prediction> {
    let mut out = Vec::new();
    let mut next = argmax(last_logits)?;
    for step in 0..max_new {
        if llm.stop_tokens.contains(&next) {
            break;
        }
        out.push(next);
        if step + 1 == max_new {
            break;
        }
        let x = llm.model.embed(&[next])?.unsqueeze(0)?;
        let logits = llm
            .model
            .forward(&x, &mut cache, &Positions::default(), &[0])?
            .expect("logits asked");
        next = argmax(&logits.i((0, 0))?)?;
    }
    let text = llm.tokenizer.decode(&out, true)?;
    Ok(Prediction {
        label: parse_answer(&text, labels),
        text: Some(text),
        probs: None,
    })
}

/// Scores every label after a query: `cache` holds what all branches share (the prompt
/// prefix, or a live conversation so far) and `query` `(1, m, hidden)` the sample's own
/// tokens. The query and every label's tokens go through the model in one pass, packed
/// into one sequence whose mask lets the query see the cache and itself (causally) and each
/// label see the cache, the query and its own earlier tokens, at the positions it would
/// have on its own. Nothing is added to `cache`: this is the one mechanism behind
/// constrained decoding and a live session's label queries.
pub fn score_labels(
    model: &Llama,
    cache: &Cache,
    query: &Tensor,
    cands: &LabelTokens,
) -> Result<Prediction> {
    let mut p = score_label_queries(model, &[(cache, query)], cands)?;
    Ok(p.remove(0))
}

/// [`score_labels`] for several queries, each after its own cache (concurrent sessions'
/// utterances, or concurrent requests after one prompt prefix), all in one pass: each
/// query with its labels packed as in [`score_labels`] is one segment of
/// [`crate::model::llama::Llama::forward_segments`], attending to its own cache only,
/// while the model's products run once over every segment's rows. Every query gets
/// exactly what it gets alone; whether one pass is faster than several depends on the
/// device and the queries' length (`farcer bench --batch`).
pub fn score_label_queries(
    model: &Llama,
    queries: &[(&Cache, &Tensor)],
    cands: &LabelTokens,
) -> Result<Vec<Prediction>> {
    if queries.is_empty() {
        return Ok(Vec::new());
    }
    let dtype = model.dtype();
    let mut rows = Vec::new();
    let mut at = Vec::new();
    let mut packs = Vec::with_capacity(queries.len());
    let mut off = 0;
    for (cache, q) in queries {
        let m = q.dim(1)?;
        if m == 0 {
            return Err(Error::msg("a label query needs at least one token"));
        }
        let mut pack = Packing::new(cache.len());
        at.push(off + pack.branch(m).end - 1);
        rows.push(q.to_dtype(dtype)?);
        let b = pack.last_branch().expect("a branch was just added");
        let mut tokens = Vec::new();
        for seq in cands.seqs.iter().filter(|s| s.len() > 1) {
            at.extend(pack.child(b, seq.len() - 1).map(|i| off + i));
            tokens.extend_from_slice(&seq[..seq.len() - 1]);
        }
        if !tokens.is_empty() {
            rows.push(model.embed(&tokens)?.unsqueeze(0)?.to_dtype(dtype)?);
        }
        off += pack.len();
        packs.push(pack);
    }
    let x = Tensor::cat(&rows, 1)?;
    let masks = packs
        .iter()
        .map(|p| p.mask(model.device(), dtype))
        .collect::<Result<Vec<_>>>()?;
    let mut caches: Vec<Cache> = queries.iter().map(|(c, _)| (*c).clone()).collect();
    let mut segs: Vec<Segment> = caches
        .iter_mut()
        .zip(&packs)
        .zip(&masks)
        .map(|((cache, p), mask)| Segment {
            cache,
            len: p.len(),
            pos: Positions {
                ids: Some(p.positions()),
                mask: Some(mask),
                grad_from: 0,
            },
        })
        .collect();
    let logits = model
        .forward_segments(&x, &mut segs, &at)?
        .expect("logits asked");
    let lp = log_softmax(&logits.i(0)?)?.to_dtype(candle_core::DType::F32)?;
    // Per query: its last row predicts each label's first token; then each label's rows,
    // in order, predict its next tokens.
    let mut row = 0;
    let mut out = Vec::with_capacity(queries.len());
    for _ in queries {
        let first = lp.i(row)?.to_vec1::<f32>()?;
        row += 1;
        let mut scores = Vec::with_capacity(cands.seqs.len());
        for seq in &cands.seqs {
            let mut s = first[seq[0] as usize] as f64;
            for &tok in &seq[1..] {
                s += lp.i((row, tok as usize))?.to_scalar::<f32>()? as f64;
                row += 1;
            }
            scores.push(s);
        }
        out.push(probabilities(scores, cands)?);
    }
    Ok(out)
}

/// The softmax over label scores, and the best label; a NaN score is an error naming it.
pub(crate) fn probabilities(scores: Vec<f64>, cands: &LabelTokens) -> Result<Prediction> {
    if let Some(j) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::msg(format!(
            "the model scored label `{}` as NaN: its logits are not finite (check the weights and the inputs)",
            cands.labels[j]
        )));
    }
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let z: f64 = exps.iter().sum();
    let probs: Vec<f64> = exps.iter().map(|e| e / z).collect();
    let best = probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i);
    Ok(Prediction {
        label: best
            .map(|i| cands.labels[i].clone())
            .unwrap_or_else(|| INVALID.into()),
        text: None,
        probs: Some(probs),
    })
}

/// Reference implementation for tests: each label scored on its own, with the whole
/// prompt recomputed (no shared pass, no packing).
pub fn constrained_plain(llm: &Llm, prompt: &Tensor, cands: &LabelTokens) -> Result<Vec<f64>> {
    let mut scores = Vec::new();
    let t = prompt.dim(1)?;
    for seq in &cands.seqs {
        let ans = llm.model.embed(seq)?.unsqueeze(0)?;
        let x = Tensor::cat(&[prompt, &ans], 1)?;
        let at: Vec<usize> = (t - 1..t - 1 + seq.len()).collect();
        let mut cache = llm.model.new_cache();
        let logits = llm
            .model
            .forward(&x, &mut cache, &Positions::default(), &at)?
            .expect("logits");
        let lp = log_softmax(&logits.i(0)?)?;
        let mut s = 0.0;
        for (k, &tok) in seq.iter().enumerate() {
            s += lp.i((k, tok as usize))?.to_scalar::<f32>()? as f64;
        }
        scores.push(s);
    }
    Ok(probabilities(scores, cands)?.probs.unwrap_or_default())
}
