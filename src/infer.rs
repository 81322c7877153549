//! Inference that one loaded model shares: a [`Predictor`] answers any number of
//! requests through `&self` (nothing in it changes per request, so a server needs no
//! lock around it), and a [`Session`] scores a live conversation utterance by utterance,
//! keeping the KV cache of everything so far.
//!
//! Both use the same pieces as evaluation: the prompt set's prefix cache, the prompter's
//! text (tokenized line by line, so a conversation built up one utterance at a time has
//! the same tokens as the whole prompt at once) and [`decode::score_labels`], which packs
//! a label query and every label into one masked pass.

use crate::data::{Dataset, Scope, Utterance};
use crate::decode::{self, Decode, LabelTokens};
use crate::error::{Error, Result};
use crate::eval::{predict_one, prepare_set, InputBuilder, PastSource, PreparedSet};
use crate::farcer::Farcer;
use crate::model::llama::{Cache, Positions, Segment};
use crate::model::Llm;
use crate::prompt::{Encoded, PromptConfig, PromptSet};
use crate::vision::VisionEncoder;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Image vectors of one request, by the image key its utterances name.
pub type Vectors = HashMap<PathBuf, Vec<f32>>;

/// The model behind a predictor.
pub enum Engine {
    /// The LLM alone, answering from the text.
    Text(Box<Llm>),
    /// A trained checkpoint, with the vision encoder that turns images into vectors
    /// (none for a text-only fine-tuned model).
    Farcer {
        model: Box<Farcer>,
        vision: Option<Box<VisionEncoder>>,
    },
}

/// How to answer one dialogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictOptions {
    /// `last`: the last utterance only; `all`: every utterance, each on the dialogue up to it.
    pub scope: Scope,
    pub decode: Decode,
    /// Few-shot examples (default: the predictor's).
    pub shots: Option<usize>,
    pub prompt_set: u64,
    /// Past labels in the prompt (default: as the checkpoint was trained).
    pub past_labels: Option<bool>,
    /// Where past labels come from: the utterances' own labels, or the model's answers.
    pub past_labels_from: PastSource,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions {
            scope: Scope::Last,
            decode: Decode::Constrained,
            shots: None,
            prompt_set: 0,
            past_labels: None,
            past_labels_from: PastSource::Gold,
        }
    }
}

/// The answer for one utterance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtterancePrediction {
    /// Position in the dialogue (or the session).
    pub index: usize,
    pub id: String,
    pub speaker: String,
    pub label: String,
    /// Probability of each label, in the predictor's label order (constrained decoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<f64>>,
    /// What the model wrote (greedy decoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Utterances cut from the front of the context to fit the model.
    pub dropped: usize,
    /// Tokens this answer ran through the model (prompt suffix, or for a session the
    /// utterance's own tokens, its label query and the packed labels).
    pub tokens: usize,
    pub seconds: f64,
}

impl UtterancePrediction {
    /// The probabilities by label name, as the CLI and the server print them.
    pub fn probs_by_label(
        &self,
        labels: &[String],
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        self.probs.as_ref().map(|v| {
            labels
                .iter()
                .cloned()
                .zip(v.iter().map(|&p| serde_json::Value::from(p)))
                .collect()
        })
    }
}

/// A loaded model with its labels and prompt, shared by every request.
pub struct Predictor {
    engine: Engine,
    pub labels: Vec<String>,
    /// The prompt the model was trained with (text-only: none of it but the shots).
    pub prompt: PromptConfig,
    cands: LabelTokens,
    /// Where few-shot examples come from.
    pool: Option<Dataset>,
    max_tokens: Option<usize>,
    /// Prepared prompt sets by (shots, set, past labels): one prefix cache serves all
    /// requests with that prompt.
    sets: Mutex<HashMap<(usize, u64, bool), Arc<PreparedSet>>>,
    /// The cache of a session just opened, by prompt set: new sessions start from it.
    opened: Mutex<HashMap<(usize, u64, bool), Cache>>,
}

impl Predictor {
    pub fn new(
        engine: Engine,
        labels: Vec<String>,
        prompt: PromptConfig,
        pool: Option<Dataset>,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        if labels.is_empty() {
            return Err(Error::input("labels", "no labels to choose from"));
        }
        let cands = LabelTokens::new(llm_of(&engine), &labels)?;
        Ok(Predictor {
            engine,
            labels,
            prompt,
            cands,
            pool,
            max_tokens,
            sets: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
        })
    }

    pub fn llm(&self) -> &Llm {
        llm_of(&self.engine)
    }

    /// Whether the model reads images.
    pub fn takes_images(&self) -> bool {
        matches!(self.engine, Engine::Farcer { .. }) && self.prompt.images
    }

    /// `text-only`, `farcer-base`, ...
    pub fn kind(&self) -> String {
        match &self.engine {
            Engine::Text(l) => l.kind(),
            Engine::Farcer { model, .. } => model.kind(),
        }
    }

    /// Image vectors from decoded images (none for a text-only model).
    pub fn encode_images(&self, images: &[image::DynamicImage]) -> Result<Vec<Vec<f32>>> {
        match &self.engine {
            Engine::Farcer {
                vision: Some(vision),
                ..
            } if !images.is_empty() => vision.encode(images),
            _ => Ok(vec![]),
        }
    }

    /// The prompt set for these choices, prepared once (its prefix through the LLM).
    pub fn prepared(&self, shots: usize, set: u64, past_labels: bool) -> Result<Arc<PreparedSet>> {
        let key = (shots, set, past_labels);
        if let Some(p) = self.sets.lock().expect("prompt sets").get(&key) {
            return Ok(p.clone());
        }
        let prompt_set = PromptSet::for_shots(self.pool.as_ref(), shots, set)?;
        let cfg = PromptConfig {
            shots,
            past_labels,
            images: self.prompt.images,
        };
        let ps = Arc::new(prepare_set(
            self.llm(),
            &self.labels,
            &cfg,
            prompt_set,
            self.max_tokens,
        )?);
        Ok(self
            .sets
            .lock()
            .expect("prompt sets")
            .entry(key)
            .or_insert(ps)
            .clone())
    }

    fn builder<'a>(&'a self, extra: &'a Vectors) -> Builder<'a> {
        Builder {
            engine: &self.engine,
            extra,
        }
    }

    /// Answers one dialogue: its last utterance or each of them (`opts.scope`), exactly as
    /// `eval` would on the same dialogue. `extra` holds vectors of images the utterances
    /// name that the model has not cached.
    pub fn predict(
        &self,
        utts: &[Utterance],
        extra: &Vectors,
        opts: &PredictOptions,
    ) -> Result<Vec<UtterancePrediction>> {
        if utts.is_empty() {
            return Err(Error::input(
                "utterances",
                "a dialogue needs at least one utterance",
            ));
        }
        let shots = opts.shots.unwrap_or(self.prompt.shots);
        let past_labels = opts.past_labels.unwrap_or(self.prompt.past_labels);
        let ps = self.prepared(shots, opts.prompt_set, past_labels)?;
        let b = self.builder(extra);
        let targets: Vec<usize> = match opts.scope {
            Scope::Last => vec![utts.len() - 1],
            Scope::All => (0..utts.len()).collect(),
        };
        // With the model's own answers as past labels, every earlier utterance is
        // answered first, in order, each with the answers before it.
        let predicted = past_labels && opts.past_labels_from == PastSource::Predicted;
        let mut answers: Vec<Option<UtterancePrediction>> = vec![None; utts.len()];
        let mut past: Vec<Option<String>> = Vec::new();
        let last = *targets.last().expect("one target");
        for i in 0..=last {
            if !predicted && !targets.contains(&i) {
                continue;
            }
            let start = std::time::Instant::now();
            let p = if predicted { Some(&past[..i]) } else { None };
            let (pred, enc) = predict_one(&b, &ps, &utts[..=i], p, opts.decode, &self.cands)?;
            if predicted {
                past.push(Some(pred.label.clone()));
            }
            answers[i] = Some(UtterancePrediction {
                index: i,
                id: utts[i].id.clone(),
                speaker: utts[i].speaker.clone(),
                label: pred.label,
                probs: pred.probs,
                text: pred.text,
                dropped: enc.dropped,
                tokens: enc.len()
                    + if opts.decode == Decode::Constrained {
                        self.packed()
                    } else {
                        0
                    },
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        Ok(targets
            .into_iter()
            .filter_map(|i| answers[i].take())
            .collect())
    }

    /// Opens a live conversation. The first session of a prompt set runs the opening of
    /// the conversation's turn through the model; the others start from its cache.
    pub fn session(&self, opts: &SessionOptions) -> Result<Session> {
        if let Some(s) = self.ready_session(opts) {
            return Ok(s);
        }
        let key = self.session_key(opts);
        let set = self.prepared(key.0, key.1, key.2)?;
        let mut s = Session::starting(set, None);
        self.rebuild(&mut s)?;
        s.rebuilds = 0;
        self.opened
            .lock()
            .expect("opened sessions")
            .insert(key, s.cache.clone());
        Ok(s)
    }

    /// A new session without running the model, when a session of its prompt set was
    /// opened before (a server opens it without waiting for the model).
    pub fn ready_session(&self, opts: &SessionOptions) -> Option<Session> {
        let key = self.session_key(opts);
        let set = self.sets.lock().expect("prompt sets").get(&key)?.clone();
        let cache = self
            .opened
            .lock()
            .expect("opened sessions")
            .get(&key)?
            .clone();
        Some(Session::starting(set, Some(cache)))
    }

    /// The prompt set a session uses: (shots, set, past labels).
    fn session_key(&self, opts: &SessionOptions) -> (usize, u64, bool) {
        (
            opts.shots.unwrap_or(self.prompt.shots),
            opts.prompt_set,
            opts.past_labels.unwrap_or(self.prompt.past_labels),
        )
    }

    /// The session's cache from its prompt prefix and the utterances from `first` on.
    fn rebuild(&self, s: &mut Session) -> Result<()> {
        let p = &s.set.prompter;
        let b = self.builder(&s.vectors);
        let mut parts = vec![b.suffix_embeds(&p.open()?, &[])?];
        for i in s.first..s.utterances.len() {
            let u = &s.utterances[i];
            let line = p.line(u, 0, b.has_image(u), s.labels[i].as_deref())?;
            parts.push(b.suffix_embeds(&line, std::slice::from_ref(u))?);
        }
        let x = Tensor::cat(&parts, 1)?;
        let mut cache = s.set.cache.clone();
        self.llm()
            .model
            .forward(&x, &mut cache, &Positions::default(), &[])?;
        s.cache = cache;
        s.rebuilds += 1;
        Ok(())
    }

    /// Adds one utterance to a session and answers it. `image` is its image vector, if
    /// it has one. Only the utterance's own tokens, its label query and the packed labels
    /// run through the model; when the context is full the oldest utterances are dropped
    /// until the conversation fills half the room after the prompt prefix, and the cache
    /// is rebuilt once.
    pub fn add(
        &self,
        s: &mut Session,
        u: Utterance,
        image: Option<Vec<f32>>,
    ) -> Result<UtterancePrediction> {
        self.add_many(vec![Step {
            session: s,
            utterance: u,
            image,
        }])
        .pop()
        .expect("one answer per step")
    }

    /// [`Predictor::add`] for one utterance in each of several sessions at once: each
    /// model pass (the utterances' lines, their label queries, the lines with the
    /// answers as past labels) runs once for all of them, every session attending to
    /// its own cache only, so each answer equals what [`Predictor::add`] gives alone.
    /// The sessions must be distinct. A step that fails leaves its session as it was.
    pub fn add_many(&self, mut steps: Vec<Step>) -> Vec<Result<UtterancePrediction>> {
        let before: Vec<Snapshot> = steps.iter().map(|st| st.session.snapshot()).collect();
        let mut preps: Vec<Result<Prep>> = steps.iter_mut().map(|st| self.begin(st)).collect();
        let past_labels = |st: &Step| st.session.set.prompter.config.past_labels;
        // The new lines (without past labels: the line does not depend on the answer).
        let lines: Vec<usize> = (0..steps.len())
            .filter(|&j| preps[j].is_ok() && !past_labels(&steps[j]))
            .collect();
        self.append(&mut steps, &mut preps, &lines, |p| &p.line);
        // Every label query in one pass.
        let ok: Vec<usize> = (0..steps.len()).filter(|&j| preps[j].is_ok()).collect();
        let scored = (|| -> Result<Vec<decode::Prediction>> {
            let mut qs = Vec::with_capacity(ok.len());
            for &j in &ok {
                let (st, p) = (&steps[j], preps[j].as_ref().expect("ok"));
                let b = self.builder(&st.session.vectors);
                let ctx = std::slice::from_ref(&st.session.utterances[p.i]);
                qs.push(b.suffix_embeds(&p.query, ctx)?);
            }
            let pairs: Vec<_> = ok
                .iter()
                .zip(&qs)
                .map(|(&j, q)| (&steps[j].session.cache, q))
                .collect();
            decode::score_label_queries(&self.llm().model, &pairs, &self.cands)
        })();
        let mut answers: Vec<Option<decode::Prediction>> = (0..steps.len()).map(|_| None).collect();
        match scored {
            Ok(preds) => {
                for (&j, pred) in ok.iter().zip(preds) {
                    if let Ok(p) = &mut preps[j] {
                        p.tokens += p.query.len() + self.packed();
                    }
                    answers[j] = Some(pred);
                }
            }
            Err(e) => {
                let m = e.to_string();
                for &j in &ok {
                    preps[j] = Err(Error::msg(m.clone()));
                }
            }
        }
        // With past labels: the lines with the answers in them.
        let kept: Vec<usize> = (0..steps.len())
            .filter(|&j| preps[j].is_ok() && past_labels(&steps[j]))
            .collect();
        for &j in &kept {
            let label = answers[j].as_ref().expect("scored").label.clone();
            let s = &mut *steps[j].session;
            let p = preps[j].as_mut().expect("ok");
            match s
                .set
                .prompter
                .line(&s.utterances[p.i], 0, p.has_image, Some(&label))
            {
                Ok(l) => p.line = l,
                Err(e) => preps[j] = Err(e),
            }
        }
        let kept: Vec<usize> = kept.into_iter().filter(|&j| preps[j].is_ok()).collect();
        self.append(&mut steps, &mut preps, &kept, |p| &p.line);
        for &j in &kept {
            if let Ok(p) = &mut preps[j] {
                p.tokens += p.line.len();
                let s = &mut *steps[j].session;
                s.line_tokens[p.i] = p.line.len();
                s.labels[p.i] = answers[j].as_ref().map(|a| a.label.clone());
            }
        }
        steps
            .into_iter()
            .zip(preps)
            .zip(answers)
            .zip(before)
            .map(|(((st, prep), answer), before)| {
                let s = st.session;
                match prep {
                    Ok(p) => {
                        let pred = answer.expect("answered");
                        Ok(UtterancePrediction {
                            index: p.i,
                            id: s.utterances[p.i].id.clone(),
                            speaker: s.utterances[p.i].speaker.clone(),
                            label: pred.label,
                            probs: pred.probs,
                            text: None,
                            dropped: s.first,
                            tokens: p.tokens,
                            seconds: p.start.elapsed().as_secs_f64(),
                        })
                    }
                    Err(e) => {
                        s.restore(before);
                        Err(e)
                    }
                }
            })
            .collect()
    }

    /// Checks that the step's utterance fits, adds it to its session (dropping old
    /// utterances and rebuilding the cache when the context is full) and encodes its line
    /// and label query.
    fn begin(&self, st: &mut Step) -> Result<Prep> {
        let start = std::time::Instant::now();
        let s = &mut *st.session;
        let i = s.utterances.len();
        let mut u = st.utterance.clone();
        u.image = None;
        if let (Some(v), true) = (st.image.take(), self.takes_images()) {
            let key = PathBuf::from(format!("session-image:{i}"));
            s.vectors.insert(key.clone(), v);
            u.image = Some(key);
        }
        let past_labels = s.set.prompter.config.past_labels;
        let has_image = self.builder(&s.vectors).has_image(&u);
        let line = s.set.prompter.line(&u, 0, has_image, None)?;
        let query = s.set.prompter.query(&u, 0, has_image)?;
        let own = if past_labels { 0 } else { line.len() };
        let need = own + query.len() + s.set.prompter.answer_room;
        let max = s.set.prompter.max_tokens;
        if s.set.prompter.prefix.len() + need > max {
            return Err(Error::input(
                "text",
                format!("the utterance alone does not fit in {max} tokens"),
            ));
        }
        s.utterances.push(u);
        s.labels.push(None);
        s.line_tokens.push(line.len());
        let mut tokens = 0;
        if s.cache.len() + need > max {
            // Drop the oldest utterances until the conversation takes half of the room
            // the prompt prefix leaves, so that rebuilds stay rare.
            let base = s.set.cache.len() + s.set.prompter.open()?.len();
            let room = max.saturating_sub(base + need) / 2;
            let mut kept: usize = s.line_tokens[s.first..i].iter().sum();
            while s.first < i && kept > room {
                kept -= s.line_tokens[s.first];
                s.first += 1;
            }
            // The new utterance's line is added after the rebuild, not in it.
            let (u, l, t) = (s.utterances.pop(), s.labels.pop(), s.line_tokens.pop());
            let r = self.rebuild(s);
            s.utterances.extend(u);
            s.labels.extend(l);
            s.line_tokens.extend(t);
            r?;
            tokens += s.cache.len() - s.set.cache.len();
        }
        if !past_labels {
            tokens += line.len();
        }
        Ok(Prep {
            i,
            has_image,
            line,
            query,
            tokens,
            start,
        })
    }

    /// Appends each listed step's line (`which`) to its session's cache, all in one pass;
    /// on failure every listed step fails and no cache changes.
    fn append(
        &self,
        steps: &mut [Step],
        preps: &mut [Result<Prep>],
        list: &[usize],
        which: impl Fn(&Prep) -> &Encoded,
    ) {
        if list.is_empty() {
            return;
        }
        let run = || -> Result<Vec<Cache>> {
            let mut xs = Vec::with_capacity(list.len());
            for &j in list {
                let (st, p) = (&steps[j], preps[j].as_ref().expect("listed steps are ok"));
                let b = self.builder(&st.session.vectors);
                let ctx = std::slice::from_ref(&st.session.utterances[p.i]);
                xs.push(b.suffix_embeds(which(p), ctx)?);
            }
            let mut caches: Vec<Cache> = list
                .iter()
                .map(|&j| steps[j].session.cache.clone())
                .collect();
            let mut segs: Vec<Segment> = caches
                .iter_mut()
                .zip(&xs)
                .map(|(cache, x)| {
                    Ok(Segment {
                        cache,
                        len: x.dim(1)?,
                        pos: Positions::default(),
                    })
                })
                .collect::<Result<_>>()?;
            self.llm()
                .model
                .forward_segments(&Tensor::cat(&xs, 1)?, &mut segs, &[])?;
            Ok(caches)
        };
        match run() {
            Ok(caches) => {
                for (&j, c) in list.iter().zip(caches) {
                    steps[j].session.cache = c;
                }
            }
            Err(e) => {
                let m = e.to_string();
                for &j in list {
                    preps[j] = Err(Error::msg(m.clone()));
                }
            }
        }
    }
}

/// One utterance for one session, for [`Predictor::add_many`].
pub struct Step<'s> {
    pub session: &'s mut Session,
    pub utterance: Utterance,
    /// The utterance's image vector, if it has one.
    pub image: Option<Vec<f32>>,
}

/// A step under way: the utterance's index, tokens and what the passes have run.
struct Prep {
    i: usize,
    has_image: bool,
    line: Encoded,
    query: Encoded,
    tokens: usize,
    start: std::time::Instant,
}

impl Predictor {
    /// Label tokens packed behind each query by constrained decoding.
    fn packed(&self) -> usize {
        self.cands.seqs.iter().map(|s| s.len() - 1).sum()
    }
}

fn llm_of(e: &Engine) -> &Llm {
    match e {
        Engine::Text(l) => l,
        Engine::Farcer { model, .. } => &model.llm,
    }
}

/// The engine with a request's own image vectors on top of the model's cached ones.
struct Builder<'a> {
    engine: &'a Engine,
    extra: &'a Vectors,
}

impl Builder<'_> {
    fn vector<'v>(&'v self, f: &'v Farcer, u: &Utterance) -> Option<&'v [f32]> {
        u.image
            .as_ref()
            .and_then(|p| self.extra.get(p))
            .map(|v| v.as_slice())
            .or_else(|| f.image_of(u).map(|v| v.as_slice()))
    }
}

impl InputBuilder for Builder<'_> {
    fn llm(&self) -> &Llm {
        llm_of(self.engine)
    }
    fn has_image(&self, u: &Utterance) -> bool {
        match self.engine {
            Engine::Text(_) => false,
            Engine::Farcer { model, .. } => self.vector(model, u).is_some(),
        }
    }
    fn suffix_embeds(&self, enc: &Encoded, context: &[Utterance]) -> Result<Tensor> {
        match self.engine {
            Engine::Text(l) => l.suffix_embeds(enc, context),
            Engine::Farcer { model, .. } => {
                model.embeds_with(enc, context, None, &|u| self.vector(model, u))
            }
        }
    }
    fn kind(&self) -> String {
        match self.engine {
            Engine::Text(l) => l.kind(),
            Engine::Farcer { model, .. } => model.kind(),
        }
    }
}

/// How to open a live conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionOptions {
    pub shots: Option<usize>,
    pub prompt_set: u64,
    /// Past labels in the prompt, from the model's own earlier answers (a live
    /// conversation has no gold labels); default: as the checkpoint was trained.
    pub past_labels: Option<bool>,
}

/// A live conversation: the cache of its prompt and every utterance so far.
pub struct Session {
    set: Arc<PreparedSet>,
    cache: Cache,
    utterances: Vec<Utterance>,
    /// The model's answers, shown as past labels when the prompt has them.
    labels: Vec<Option<String>>,
    /// Tokens of each utterance's kept line.
    line_tokens: Vec<usize>,
    /// The first utterance still in the cache.
    first: usize,
    vectors: Vectors,
    /// How often the cache was rebuilt after dropping old utterances.
    pub rebuilds: usize,
}

impl Session {
    /// A session of `set` with no utterances; `cache` is its opened conversation's
    /// (none: the prompt prefix alone, to be rebuilt).
    fn starting(set: Arc<PreparedSet>, cache: Option<Cache>) -> Self {
        Session {
            cache: cache.unwrap_or_else(|| set.cache.clone()),
            set,
            utterances: Vec::new(),
            labels: Vec::new(),
            line_tokens: Vec::new(),
            first: 0,
            vectors: Vectors::new(),
            rebuilds: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.utterances.len()
    }
    pub fn is_empty(&self) -> bool {
        self.utterances.is_empty()
    }
    /// Positions in the KV cache.
    pub fn cache_tokens(&self) -> usize {
        self.cache.len()
    }
    /// Bytes of the KV cache this session holds (its own copy, the prompt prefix included).
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
    /// Utterances dropped from the front to fit the context.
    pub fn dropped(&self) -> usize {
        self.first
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            len: self.utterances.len(),
            cache: self.cache.clone(),
            first: self.first,
            rebuilds: self.rebuilds,
        }
    }

    /// Back to `snap`: what a failed step added is gone (its image vector too, even when
    /// it failed before its utterance was added).
    fn restore(&mut self, snap: Snapshot) {
        for i in snap.len..=self.utterances.len() {
            self.vectors
                .remove(&PathBuf::from(format!("session-image:{i}")));
        }
        self.utterances.truncate(snap.len);
        self.labels.truncate(snap.len);
        self.line_tokens.truncate(snap.len);
        self.cache = snap.cache;
        self.first = snap.first;
        self.rebuilds = snap.rebuilds;
    }
}

/// A session's state before a step (the cache is shared, not copied).
struct Snapshot {
    len: usize,
    cache: Cache,
    first: usize,
    rebuilds: usize,
}
