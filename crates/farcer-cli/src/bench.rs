//! `farcer bench`, the whole command: fixed cases that time the raw kernels (prefill, a projection-training
//! step, a LoRA step) and the method (a full FARCER training step with the 7-shot prompt,
//! constrained-decoding evaluation, ViT image vectors). Each case runs in its own process
//! so its peak memory is its own. The inputs (token ids, positions of image slots) are
//! written to JSON so `tools/bench_reference.py` runs exactly the same work in PyTorch.

use candle_core::{Device, Tensor};
use farcer::data::{spec::DataSpec, Scope};
use farcer::decode::{Decode, LabelTokens};
use farcer::error::{Error, Result};
use farcer::eval::{self, EvalOptions};
use farcer::farcer::{Farcer, Kind};
use farcer::model::dropout::Dropout;
use farcer::model::llama::Positions;
use farcer::model::lora::LoraConfig;
use farcer::model::projection::{Projection, ProjectionConfig};
use farcer::model::Llm;
use farcer::prompt::{PromptConfig, PromptSet};
use farcer::train::{sample_loss, target_tokens, TokenWeights};
use farcer::util::Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;

use crate::{bar, log, ticker};
use clap::Args;
use farcer::{model, pipeline};
use std::path::{Path, PathBuf};

/// The case names, in report order.
pub const CASES: [&str; 11] = [
    "prefill-512",
    "proj-step-128",
    "proj-step-512",
    "lora-step-512",
    "farcer-step-7shot",
    "farcer-step-7shot-nocache",
    "farcer3-step-7shot",
    "farcer3-step-7shot-nocache",
    "eval-constrained-7shot",
    "vit-b16",
    "vit-s14",
];

/// The result of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: String,
    /// What one repetition does.
    pub what: String,
    /// Median seconds of one repetition.
    pub seconds: f64,
    pub repetitions: usize,
    /// Tokens (or images, samples) per repetition, and the unit.
    pub units: f64,
    pub unit: String,
    pub per_second: f64,
    /// Peak resident memory of the process running the case, MiB.
    pub peak_mib: f64,
    pub threads: usize,
    /// Where one repetition's time went (with `--profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<Breakdown>,
}

/// One repetition's time per kind of kernel (`farcer_kernels::profile`), seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Breakdown {
    /// (part, seconds per repetition, calls per repetition), GEMM first.
    pub parts: Vec<(String, f64, f64)>,
    /// Outside the kernels: candle's ops, autograd, allocation.
    pub rest: f64,
    /// The GEMMs' achieved rate.
    pub gemm_gflops: f64,
}

fn breakdown(reps: usize, seconds: f64) -> Breakdown {
    use farcer_kernels::profile::{totals, Part, PARTS};
    let t = totals();
    let gemm = t[Part::Gemm as usize];
    let r = reps.max(1) as f64;
    let parts: Vec<(String, f64, f64)> = PARTS
        .iter()
        .zip(t.iter())
        .map(|(p, t)| (p.name().to_string(), t.seconds / r, t.calls as f64 / r))
        .collect();
    let inside: f64 = parts.iter().map(|p| p.1).sum();
    Breakdown {
        rest: (seconds - inside).max(0.0),
        gemm_gflops: if gemm.seconds > 0.0 {
            gemm.flops / gemm.seconds / 1e9
        } else {
            0.0
        },
        parts,
    }
}

/// Peak resident set size of this process (Linux), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Token ids used by the synthetic cases: a fixed pseudo-random sequence (no special
/// tokens), the same on every machine.
pub fn synthetic_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut r = Rng::new(1234);
    (0..n).map(|_| 100 + r.below(vocab - 200) as u32).collect()
}

/// Inputs shared with the PyTorch reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedInputs {
    pub ids_512: Vec<u32>,
    /// Image slot position in the projection-step cases.
    pub image_pos: usize,
    /// Target token ids scored by the step cases.
    pub targets: Vec<u32>,
    /// Full 7-shot FARCER training samples: prefix ids, suffix pieces (-1 = image slot),
    /// target ids.
    pub farcer_prefix: Vec<u32>,
    pub farcer_samples: Vec<(Vec<i64>, Vec<u32>)>,
    /// Evaluation samples: suffix pieces, and each label's tokens plus end-of-turn.
    pub eval_samples: Vec<Vec<i64>>,
    pub label_seqs: Vec<Vec<u32>>,
    pub end_of_turn: u32,
    pub vision_dim: usize,
    /// Dialogue-length sweep: (utterances, suffix pieces, target ids).
    #[serde(default)]
    pub sweep: Vec<(usize, Vec<i64>, Vec<u32>)>,
}

/// Dialogue lengths of the sweep.
pub const SWEEP_LENGTHS: [usize; 6] = [1, 2, 5, 10, 20, 40];

/// One point of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub utterances: usize,
    pub tokens: usize,
    pub train_seconds: f64,
    pub predict_seconds: f64,
}

/// A dialogue of `n` utterances made of MELD test utterances in order (images on all).
fn sweep_dialogue(meld: &farcer::data::Dataset, n: usize) -> Vec<farcer::data::Utterance> {
    let mut out = Vec::new();
    for d in &meld.dialogues {
        for u in &d.utterances {
            if out.len() == n {
                return out;
            }
            let mut u = u.clone();
            u.image = Some(format!("bench://{}/{}", d.id, u.id).into());
            out.push(u);
        }
    }
    out
}

/// Time per training step (cached 7-shot prefix) and per constrained prediction, by
/// dialogue length.
pub fn sweep(llm_path: &str, meld: &std::path::Path, reps: usize) -> Result<Vec<SweepPoint>> {
    let dev = Device::Cpu;
    let llm = farcer::model::load_llm(llm_path, &dev, candle_core::DType::F32)?;
    let spec = DataSpec::Meld(meld.to_path_buf());
    let test = spec.load("test", 0)?;
    let pool = spec.load("dev", 0)?;
    let dim = 768;
    let proj = base_projection(dim, llm.model.hidden_size(), &dev)?;
    let mut f = Farcer::new(llm, Some(proj), Kind::Base);
    let cfg = PromptConfig {
        shots: 7,
        past_labels: false,
        images: true,
    };
    let ps = eval::prepare_set(
        &f.llm,
        &test.labels,
        &cfg,
        PromptSet::draw(&pool, 7, 0)?,
        None,
    )?;
    let cands = LabelTokens::new(&f.llm, &test.labels)?;
    let mut r = Rng::new(3);
    let mut out = Vec::new();
    for &n in &SWEEP_LENGTHS {
        let ctx = sweep_dialogue(&test, n);
        for u in &ctx {
            f.vectors.insert(
                u.image.clone().unwrap(),
                (0..dim).map(|_| r.normal() as f32).collect(),
            );
        }
        let gold = ctx
            .last()
            .and_then(|u| u.label.clone())
            .unwrap_or_else(|| "neutral".into());
        let w = TokenWeights::balanced(&[target_tokens(&f, &gold)?], f.llm.end_of_turn);
        let time = |g: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            g()?;
            let mut ts = Vec::new();
            for _ in 0..reps {
                let t = Instant::now();
                g()?;
                ts.push(t.elapsed().as_secs_f64());
            }
            Ok(median(ts))
        };
        let train_seconds = time(&mut || {
            let mut d = Dropout::new(0);
            sample_loss(&f, &ps, &ctx, None, &gold, &w, true, Some(&mut d))?.backward()?;
            Ok(())
        })?;
        let predict_seconds = time(&mut || {
            eval::predict_one(&f, &ps, &ctx, None, Decode::Constrained, &cands)?;
            Ok(())
        })?;
        let tokens = ps.prompter.encode(&ctx, &|_| true, None)?.len();
        out.push(SweepPoint {
            utterances: n,
            tokens,
            train_seconds,
            predict_seconds,
        });
    }
    Ok(out)
}

fn step_with_image(
    llm: &Llm,
    proj: &Projection,
    ids: &[u32],
    image_pos: usize,
    targets: &[u32],
) -> Result<()> {
    let dev = llm.model.device();
    let img = Tensor::ones((1, proj.config.in_dim), candle_core::DType::F32, dev)?;
    let mut dropout = Dropout::new(0);
    let v = proj.forward(&img, Some(&mut dropout))?;
    let before = llm.model.embed(&ids[..image_pos])?;
    let after = llm.model.embed(&ids[image_pos + 1..])?;
    let x = Tensor::cat(&[&before, &v, &after], 0)?.unsqueeze(0)?;
    let t = ids.len();
    let at: Vec<usize> = (t - targets.len()..t).collect();
    let mut cache = llm.model.new_cache();
    // Only the image's row and later ones carry its gradient (ignored with adapters).
    let pos = Positions {
        grad_from: image_pos,
        ..Positions::default()
    };
    let logits = llm
        .model
        .forward_train(&x, &mut cache, &pos, &at, &mut dropout)?
        .expect("logits")
        .squeeze(0)?;
    let lp = farcer::model::llama::log_softmax(&logits)?;
    let idx = Tensor::new(targets, dev)?.unsqueeze(1)?;
    let loss = lp.gather(&idx, 1)?.mean_all()?.neg()?;
    loss.backward()?;
    Ok(())
}

/// The base model's projection (one seeded linear layer) for the bench cases.
fn base_projection(in_dim: usize, out_dim: usize, dev: &Device) -> Result<Projection> {
    let cfg = ProjectionConfig {
        layers: 1,
        dropout: 0.0,
        in_dim,
        out_dim,
    };
    Ok(Projection::new(cfg, 0, dev)?)
}

/// Runs one case in this process (with `profile`, also where its repetitions' time went).
pub fn run_case(
    case: &str,
    llm_path: &str,
    meld: Option<&std::path::Path>,
    vit_s: Option<&std::path::Path>,
    reps: usize,
    profile: bool,
) -> Result<CaseResult> {
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let timed = |what: &str,
                 units: f64,
                 unit: &str,
                 f: &mut dyn FnMut() -> Result<()>|
     -> Result<CaseResult> {
        f()?; // warm-up
        if profile {
            farcer_kernels::profile::start();
        }
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let total: f64 = times.iter().sum();
        let s = median(times);
        Ok(CaseResult {
            breakdown: profile.then(|| breakdown(reps, total / reps.max(1) as f64)),
            case: case.to_string(),
            what: what.to_string(),
            seconds: s,
            repetitions: reps,
            units,
            unit: unit.to_string(),
            per_second: units / s,
            peak_mib: peak_rss_mib(),
            threads,
        })
    };
    if case.starts_with("vit") {
        let enc = if case == "vit-b16" {
            let dir = farcer::util::farcer_home()
                .join("models")
                .join("bench-vit-b16");
            if !dir.join("model.safetensors").is_file() {
                let mut c = farcer::vision::demo_vit_config();
                (
                    c.hidden_size,
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.intermediate_size,
                    c.image_size,
                    c.patch_size,
                ) = (768, 12, 12, 3072, 224, 16);
                let mut p = farcer::vision::demo_preprocess();
                p.size = farcer::vision::Size::Exact {
                    height: 224,
                    width: 224,
                };
                farcer::vision::VisionEncoder::write_random(&dir, 0, &c, &p)?;
            }
            farcer::vision::VisionEncoder::load(dir.to_str().unwrap(), &dev, false)?
        } else {
            let p = vit_s
                .ok_or_else(|| Error::msg("vit-s14 needs the shared ViT-S folder (--vit-s)"))?;
            farcer::vision::VisionEncoder::load(p.to_str().unwrap(), &dev, false)?
        };
        let n = 8;
        let s = enc.vit.config.image_size;
        let px = Tensor::randn(0f32, 1.0, (n, 3, s, s), &dev)?;
        return timed(
            &format!("CLS vectors of {n} images ({s}x{s})"),
            n as f64,
            "images",
            &mut || {
                enc.vit.cls(&px, false)?;
                Ok(())
            },
        );
    }
    let llm = farcer::model::load_llm(llm_path, &dev, candle_core::DType::F32)?;
    let inputs = shared_inputs(&llm, meld)?;
    match case {
        "prefill-512" => {
            let x = llm.model.embed(&inputs.ids_512)?.unsqueeze(0)?;
            timed(
                "forward over 512 tokens, logits at the last",
                512.0,
                "tokens",
                &mut || {
                    let mut c = llm.model.new_cache();
                    llm.model
                        .forward(&x, &mut c, &Positions::default(), &[511])?;
                    Ok(())
                },
            )
        }
        "proj-step-128" | "proj-step-512" => {
            let t = if case.ends_with("128") { 128 } else { 512 };
            let proj = base_projection(inputs.vision_dim, llm.model.hidden_size(), &dev)?;
            let ids = &inputs.ids_512[..t];
            let pos = inputs.image_pos.min(t / 2);
            timed(
                &format!(
                    "forward + backward through the frozen LLM, {t} positions, one projected image"
                ),
                t as f64,
                "tokens",
                &mut || step_with_image(&llm, &proj, ids, pos, &inputs.targets),
            )
        }
        "lora-step-512" => {
            let mut llm = llm;
            llm.model.add_lora(&LoraConfig::default(), 0)?;
            // B starts at zero; give it values so every path carries gradient.
            for (_, v) in llm.model.lora_vars() {
                v.set(&(v.as_tensor().ones_like()? * 0.01)?)?;
            }
            let proj = base_projection(inputs.vision_dim, llm.model.hidden_size(), &dev)?;
            timed(
                "LoRA (r 8, q k v) + projection step, 512 positions",
                512.0,
                "tokens",
                &mut || {
                    step_with_image(
                        &llm,
                        &proj,
                        &inputs.ids_512,
                        inputs.image_pos,
                        &inputs.targets,
                    )
                },
            )
        }
        "farcer-step-7shot"
        | "farcer-step-7shot-nocache"
        | "farcer3-step-7shot"
        | "farcer3-step-7shot-nocache" => {
            let use_cache = !case.ends_with("nocache");
            let (mut f, data, pool) = meld_farcer(llm, meld, inputs.vision_dim)?;
            if case.starts_with("farcer3") {
                let cfg = ProjectionConfig {
                    layers: 3,
                    dropout: 0.05,
                    in_dim: inputs.vision_dim,
                    out_dim: f.llm.model.hidden_size(),
                };
                f.projection = Some(Projection::new(cfg, 0, &dev)?);
                f.kind = Kind::ThreeLayer;
            }
            let cfg = PromptConfig {
                shots: 7,
                past_labels: false,
                images: true,
            };
            let set = PromptSet::draw(&pool, 7, 0)?;
            let ps = eval::prepare_set(&f.llm, &data.labels, &cfg, set, None)?;
            let samples = data.samples(Scope::Last);
            let targets: Vec<Vec<u32>> = samples
                .iter()
                .map(|s| target_tokens(&f, data.gold(s)))
                .collect::<Result<_>>()?;
            let w = TokenWeights::balanced(&targets, f.llm.end_of_turn);
            let n = inputs.farcer_samples.len();
            timed(
                &format!(
                    "{n} {} training steps, 7-shot prompt ({} prefix tokens{})",
                    f.kind.label(),
                    ps.prompter.prefix.len(),
                    if use_cache {
                        ", cached"
                    } else {
                        ", recomputed"
                    }
                ),
                n as f64,
                "samples",
                &mut || {
                    for s in samples.iter().take(n) {
                        let loss = sample_loss(
                            &f,
                            &ps,
                            data.context(s),
                            None,
                            data.gold(s),
                            &w,
                            use_cache,
                            Some(&mut Dropout::new(0)),
                        )?;
                        loss.backward()?;
                    }
                    Ok(())
                },
            )
        }
        "eval-constrained-7shot" => {
            let (f, data, pool) = meld_farcer(llm, meld, inputs.vision_dim)?;
            let n = inputs.eval_samples.len();
            let opts = EvalOptions {
                limit: Some(n),
                ..EvalOptions::new(
                    Scope::Last,
                    PromptConfig {
                        shots: 7,
                        past_labels: false,
                        images: true,
                    },
                )
            };
            timed(
                &format!(
                    "{n} MELD test samples, 7-shot, constrained decoding (prefix pass included)"
                ),
                n as f64,
                "samples",
                &mut || {
                    eval::evaluate(&f, &data, Some(&pool), &opts, &|_, _| {})?;
                    Ok(())
                },
            )
        }
        other => Err(Error::msg(format!(
            "unknown bench case `{other}`; cases: {}",
            CASES.join(", ")
        ))),
    }
}

/// FARCER on MELD with a fixed made-up image vector per utterance (the ViT is timed on its
/// own): the model, the first training dialogues (train split), and the dev pool.
fn meld_farcer(
    llm: Llm,
    meld: Option<&std::path::Path>,
    dim: usize,
) -> Result<(Farcer, farcer::data::Dataset, farcer::data::Dataset)> {
    let dir = meld.ok_or_else(|| Error::msg("this case needs MELD's CSVs (--meld <dir>)"))?;
    let spec = DataSpec::Meld(dir.to_path_buf());
    let mut data = spec.load("test", 0)?;
    data.dialogues.truncate(BENCH_SAMPLES);
    let pool = spec.load("dev", 0)?;
    let proj = base_projection(dim, llm.model.hidden_size(), llm.model.device())?;
    let mut f = Farcer::new(llm, Some(proj), Kind::Base);
    let mut r = Rng::new(7);
    for d in data.dialogues.iter_mut() {
        for u in d.utterances.iter_mut() {
            let p = std::path::PathBuf::from(format!("bench://{}/{}", d.id, u.id));
            f.vectors
                .insert(p.clone(), (0..dim).map(|_| r.normal() as f32).collect());
            u.image = Some(p);
        }
    }
    Ok((f, data, pool))
}

/// Samples in the method cases.
pub const BENCH_SAMPLES: usize = 5;

/// The exact inputs of every case, for the PyTorch reference.
pub fn shared_inputs(llm: &Llm, meld: Option<&std::path::Path>) -> Result<SharedInputs> {
    let ids_512 = synthetic_ids(512, llm.model.config.vocab_size);
    let targets = llm.answer_tokens("neutral")?;
    let mut out = SharedInputs {
        ids_512,
        image_pos: 40,
        targets,
        farcer_prefix: vec![],
        farcer_samples: vec![],
        eval_samples: vec![],
        label_seqs: vec![],
        end_of_turn: llm.end_of_turn,
        vision_dim: 768,
        sweep: vec![],
    };
    if let Some(dir) = meld {
        let spec = DataSpec::Meld(dir.to_path_buf());
        let mut data = spec.load("test", 0)?;
        data.dialogues.truncate(BENCH_SAMPLES);
        for d in data.dialogues.iter_mut() {
            for u in d.utterances.iter_mut() {
                u.image = Some(format!("bench://{}/{}", d.id, u.id).into());
            }
        }
        let pool = spec.load("dev", 0)?;
        let cfg = PromptConfig {
            shots: 7,
            past_labels: false,
            images: true,
        };
        let set = PromptSet::draw(&pool, 7, 0)?;
        let p = farcer::eval::prompter_for(llm, &data.labels, &cfg, set, None)?;
        out.farcer_prefix = p.prefix.clone();
        let flat = |e: &farcer::prompt::Encoded| -> Vec<i64> {
            e.pieces
                .iter()
                .flat_map(|x| match x {
                    farcer::prompt::Piece::Tokens(t) => {
                        t.iter().map(|&i| i as i64).collect::<Vec<_>>()
                    }
                    farcer::prompt::Piece::Image(_) => vec![-1],
                })
                .collect()
        };
        for s in data.samples(Scope::Last) {
            let e = p.encode(data.context(&s), &|_| true, None)?;
            let t = llm.answer_tokens(data.gold(&s))?;
            out.farcer_samples.push((flat(&e), t));
            out.eval_samples.push(flat(&e));
        }
        out.label_seqs = LabelTokens::new(llm, &data.labels)?.seqs;
        let test = spec.load("test", 0)?;
        for &n in &SWEEP_LENGTHS {
            let ctx = sweep_dialogue(&test, n);
            let e = p.encode(&ctx, &|_| true, None)?;
            let gold = ctx
                .last()
                .and_then(|u| u.label.clone())
                .unwrap_or_else(|| "neutral".into());
            let t = llm.answer_tokens(&gold)?;
            out.sweep.push((n, flat(&e), t));
        }
    }
    Ok(out)
}

/// One utterance of a live session, as timed by [`session_curve`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionPoint {
    /// Utterances in the conversation, this one included.
    pub utterances: usize,
    /// Tokens this utterance ran through the model.
    pub tokens: usize,
    pub seconds: f64,
    /// Positions in the session's KV cache after it.
    pub cache_tokens: usize,
    pub dropped: usize,
    /// Seconds `predict` takes on the same conversation, recomputing it all (measured at
    /// a few lengths only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute_seconds: Option<f64>,
}

/// A text-only session over `n` MELD test utterances in order (3-shot prompt from dev):
/// the time and tokens of each new utterance, and at a few lengths the time of
/// answering the same conversation from scratch.
pub fn session_curve(
    llm_path: &str,
    meld: &std::path::Path,
    n: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<SessionPoint>> {
    use farcer::infer::{Engine, PredictOptions, Predictor, SessionOptions};
    let llm = farcer::model::load_llm(llm_path, &Device::Cpu, candle_core::DType::F32)?;
    let spec = DataSpec::Meld(meld.to_path_buf());
    let test = spec.load("test", 0)?;
    let pool = spec.load("dev", 0)?;
    let prompt = PromptConfig {
        shots: 3,
        past_labels: false,
        images: false,
    };
    let p = Predictor::new(
        Engine::Text(Box::new(llm)),
        test.labels.clone(),
        prompt,
        Some(pool),
        None,
    )?;
    let mut conv = sweep_dialogue(&test, n);
    for u in &mut conv {
        u.image = None;
    }
    let mut s = p.session(&SessionOptions::default())?;
    let recompute_at = [1usize, 5, 25, 50, 100, 150, 200];
    let mut out = Vec::new();
    for (i, u) in conv.iter().enumerate() {
        let a = p.add(&mut s, u.clone(), None)?;
        let recompute_seconds = if recompute_at.contains(&(i + 1)) {
            let t = Instant::now();
            p.predict(&conv[..=i], &Default::default(), &PredictOptions::default())?;
            Some(t.elapsed().as_secs_f64())
        } else {
            None
        };
        out.push(SessionPoint {
            utterances: i + 1,
            tokens: a.tokens,
            seconds: a.seconds,
            cache_tokens: s.cache_tokens(),
            dropped: a.dropped,
            recompute_seconds,
        });
        progress(i + 1, conv.len());
    }
    Ok(out)
}

/// Serving `k` requests at once: one at a time, or packed into one forward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchPoint {
    pub requests: usize,
    pub query_tokens: usize,
    pub prefix_tokens: usize,
    /// The `k` label queries scored one after another ([`farcer::decode::score_labels`]).
    pub separate_ms: f64,
    /// The same `k` queries packed into one forward ([`farcer::decode::score_label_queries`]).
    pub packed_ms: f64,
    /// Largest difference of a label probability between the two.
    pub max_prob_diff: f64,
}

/// Whether batching concurrent requests would pay on this device: `k` label queries of
/// `query` tokens, each after its own cache of `prefix` tokens (a live session each),
/// scored one after another and in one forward (each query with its labels packed as
/// constrained decoding, sessions and one-pass training pack them, one segment per
/// cache). Best of `reps` timings of each; the probabilities must agree.
pub fn batch_curve(
    llm_path: &str,
    prefix: usize,
    query: usize,
    ks: &[usize],
    reps: usize,
) -> Result<Vec<BatchPoint>> {
    use farcer::decode::score_labels;
    let llm = farcer::model::load_llm(llm_path, &Device::Cpu, candle_core::DType::F32)?;
    let labels: Vec<String> = farcer::data::MELD_LABELS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cands = LabelTokens::new(&llm, &labels)?;
    let mut rng = Rng::derive(0, "batch-bench");
    let mut ids =
        |n: usize| -> Vec<u32> { (0..n).map(|_| 200 + rng.below(20_000) as u32).collect() };
    // One cache per request (a session each), all of the same length.
    let kmax = ks.iter().copied().max().unwrap_or(1);
    let mut caches = Vec::with_capacity(kmax);
    for _ in 0..kmax {
        let mut cache = llm.model.new_cache();
        let pre = llm.model.embed(&ids(prefix))?.unsqueeze(0)?;
        llm.model
            .forward(&pre, &mut cache, &Positions::default(), &[])?;
        caches.push(cache);
    }
    let queries: Vec<Tensor> = (0..kmax)
        .map(|_| llm.model.embed(&ids(query))?.unsqueeze(0))
        .collect::<std::result::Result<_, _>>()?;
    let best = |f: &mut dyn FnMut() -> Result<Vec<Vec<f64>>>| -> Result<(f64, Vec<Vec<f64>>)> {
        let mut out = f()?; // warm-up
        let mut t = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let s = Instant::now();
            out = f()?;
            t = t.min(s.elapsed().as_secs_f64() * 1e3);
        }
        Ok((t, out))
    };
    let mut points = Vec::new();
    for &k in ks {
        let qs: Vec<(&farcer::model::llama::Cache, &Tensor)> =
            caches.iter().zip(&queries).take(k).collect();
        let (separate_ms, sep) = best(&mut || {
            qs.iter()
                .map(|(c, q)| {
                    Ok(score_labels(&llm.model, c, q, &cands)?
                        .probs
                        .unwrap_or_default())
                })
                .collect()
        })?;
        let (packed_ms, packed) = best(&mut || {
            farcer::decode::score_label_queries(&llm.model, &qs, &cands)?
                .into_iter()
                .map(|p| Ok(p.probs.unwrap_or_default()))
                .collect()
        })?;
        let max_prob_diff = sep
            .iter()
            .flatten()
            .zip(packed.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        points.push(BatchPoint {
            requests: k,
            query_tokens: query,
            prefix_tokens: prefix,
            separate_ms,
            packed_ms,
            max_prob_diff,
        });
    }
    Ok(points)
}

// `farcer bench` itself: its arguments and what it prints and writes.

#[derive(Args)]
pub struct BenchArgs {
    /// LLM (default: the pinned SmolLM2).
    #[arg(long)]
    llm: Option<String>,
    /// Cases to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Timed repetitions per case (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// MELD CSV folder for the method cases.
    #[arg(long, default_value = "../shared/data/meld")]
    meld: PathBuf,
    /// The shared ViT-S folder for the vit-s14 case.
    #[arg(long, default_value = "../shared/models/vit-small-dinov2")]
    vit_s: PathBuf,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the exact inputs of every case (for tools/bench_reference.py) and exit.
    #[arg(long)]
    pub dump_inputs: Option<PathBuf>,
    /// Run one case in this process and print its JSON (used by the parent).
    #[arg(long, hide = true)]
    pub case: Option<String>,
    /// Time a training step and a prediction for dialogues of 1 to 40 utterances (JSON to --json).
    #[arg(long)]
    sweep: bool,
    /// Plot sweeps: farcer's JSON then PyTorch's, to --plot-out (two PNGs).
    #[arg(long, num_args = 2)]
    plot: Vec<PathBuf>,
    #[arg(long, default_value = "runs/bench/sweep")]
    plot_out: PathBuf,
    /// Time a live session of this many MELD utterances, one by one, against answering
    /// the conversation from scratch (JSON, markdown and a PNG into --plot-out).
    #[arg(long)]
    session: Option<usize>,
    /// Time 1, 2, 4 and 8 label queries, each after its own cached context (concurrent
    /// sessions), one at a time and in one forward (does batching them pay here?).
    #[arg(long)]
    batch: bool,
    /// Time the GPU cases (prefill, base-FARCER and LoRA steps after the cached 7-shot
    /// prefix, constrained evaluation) at a model shape with seeded random weights:
    /// llama3-8b, smollm2-135m or tiny. Use with --device and --dtype.
    #[arg(long)]
    pub shape: Option<String>,
    /// Device for --shape: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Dtype for --shape: f32, bf16 or f16 (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Ops for --shape: auto (the fused kernels for f32 on the CPU, candle's elsewhere),
    /// kernels, or candle (the path a GPU runs, here on the CPU).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Recompute each layer in the backward for --shape: auto (when a pass's activations
    /// would pass 4 GiB), always or never (candle's op-by-op path only).
    #[arg(long, default_value = "auto")]
    pub recompute: String,
    /// Also say where each case's time goes: GEMM (and its GFLOP/s), attention, norms,
    /// activations, RoPE, copies, LoRA adapters, and the rest (candle's ops, autograd,
    /// allocation).
    #[arg(long)]
    pub profile: bool,
    /// Time the GEMM engines (the `gemm` crate and these CBLAS libraries: openblas, mkl,
    /// or a path) on the model's product shapes, in GFLOP/s.
    #[arg(long, num_args = 0.., value_delimiter = ',')]
    pub gemm: Option<Vec<String>>,
    /// Tokens of the sample's own part of the prompt for --shape (after the 7-shot prefix).
    #[arg(long, default_value_t = crate::bench_shape::SAMPLE_TOKENS)]
    pub sample_tokens: usize,
}

/// Runs one case in a child process (so its peak memory is its own): its result, or why
/// it failed (the last line it wrote to stderr, or that its output was not a result).
pub fn case_in_child(
    mut cmd: std::process::Command,
) -> std::io::Result<std::result::Result<CaseResult, String>> {
    let out = cmd.output()?;
    let last_err = || {
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    };
    if !out.status.success() {
        return Ok(Err(last_err()));
    }
    let line = out
        .stdout
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap_or(&[]);
    Ok(serde_json::from_slice(line).map_err(|e| format!("no result ({e}): {}", last_err())))
}

/// `farcer bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(libs) = &a.gemm {
        return crate::bench_gemm::run(libs, a.reps, a.json.as_deref());
    }
    if let Some(shape) = &a.shape {
        return crate::bench_shape::run(&a, shape);
    }
    let llm = pipeline::resolve_llm(a.llm.as_deref(), &log)?;
    let meld = a
        .meld
        .join("dev_sent_emo.csv")
        .is_file()
        .then_some(a.meld.as_path());
    let vit_s = a
        .vit_s
        .join("config.json")
        .is_file()
        .then_some(a.vit_s.as_path());
    if let Some(p) = &a.dump_inputs {
        let l = model::load_llm(&llm, &candle_core::Device::Cpu, candle_core::DType::F32)?;
        let inputs = shared_inputs(&l, meld)?;
        farcer::util::write_json_atomic(p, &inputs)?;
        println!("wrote {}", p.display());
        return Ok(());
    }
    if a.plot.len() == 2 {
        let load = |p: &Path| -> anyhow::Result<Vec<SweepPoint>> {
            Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
        };
        let (f, t) = (load(&a.plot[0])?, load(&a.plot[1])?);
        for (what, get) in [
            (
                "train",
                (|p: &SweepPoint| p.train_seconds) as fn(&SweepPoint) -> f64,
            ),
            ("predict", |p| p.predict_seconds),
        ] {
            let series = vec![
                (
                    "farcer".to_string(),
                    image::Rgb([200, 40, 40]),
                    f.iter().map(|p| (p.utterances as f64, get(p))).collect(),
                ),
                (
                    "PyTorch, the authors' way".to_string(),
                    image::Rgb([40, 80, 200]),
                    t.iter().map(|p| (p.utterances as f64, get(p))).collect(),
                ),
            ];
            let path = a.plot_out.with_file_name(format!(
                "{}-{what}.png",
                a.plot_out.file_name().unwrap().to_string_lossy()
            ));
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let title = if what == "train" {
                "seconds per training sample (7-shot)"
            } else {
                "seconds per prediction (7-shot)"
            };
            farcer::plot::line_chart(
                &path,
                title,
                "utterances in the dialogue",
                "seconds",
                &series,
            )?;
            println!("wrote {}", path.display());
        }
        return Ok(());
    }
    if a.batch {
        let mut pts = Vec::new();
        for query in [32, 200] {
            log(&format!("batching: queries of {query} tokens"));
            pts.extend(batch_curve(&llm, 640, query, &[1, 2, 4, 8], a.reps)?);
        }
        let mut md = String::from("| requests | query tokens | context tokens each | one at a time ms | one pass ms | one pass / one at a time | max prob diff |\n|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &pts {
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1e} |\n",
                p.requests,
                p.query_tokens,
                p.prefix_tokens,
                p.separate_ms,
                p.packed_ms,
                p.packed_ms / p.separate_ms,
                p.max_prob_diff
            ));
        }
        std::fs::create_dir_all(&a.plot_out)?;
        farcer::util::write_json_atomic(&a.plot_out.join("batch.json"), &pts)?;
        farcer::util::write_atomic(&a.plot_out.join("batch.md"), md.as_bytes())?;
        print!("{md}");
        return Ok(());
    }
    if let Some(n) = a.session {
        let b = bar("session");
        let pts = session_curve(&llm, &a.meld, n, &ticker(&b))?;
        b.finish_and_clear();
        std::fs::create_dir_all(&a.plot_out)?;
        let mut md = String::from(
            "| utterances | tokens | ms | cache tokens | dropped | recompute ms |\n|---:|---:|---:|---:|---:|---:|\n",
        );
        for p in &pts {
            md.push_str(&format!(
                "| {} | {} | {:.1} | {} | {} | {} |\n",
                p.utterances,
                p.tokens,
                p.seconds * 1e3,
                p.cache_tokens,
                p.dropped,
                p.recompute_seconds
                    .map(|s| format!("{:.1}", s * 1e3))
                    .unwrap_or_default()
            ));
        }
        print!("{md}");
        farcer::util::write_json_atomic(&a.plot_out.join("session.json"), &pts)?;
        std::fs::write(a.plot_out.join("session.md"), &md)?;
        let series = vec![
            (
                "session: one utterance".to_string(),
                image::Rgb([40, 90, 200]),
                pts.iter()
                    .map(|p| (p.utterances as f64, p.seconds * 1e3))
                    .collect(),
            ),
            (
                "recomputing the conversation".to_string(),
                image::Rgb([200, 60, 40]),
                pts.iter()
                    .filter_map(|p| p.recompute_seconds.map(|s| (p.utterances as f64, s * 1e3)))
                    .collect(),
            ),
        ];
        let png = a.plot_out.join("session.png");
        farcer::plot::line_chart(
            &png,
            "Latency per utterance of a live session (SmolLM2, 3-shot, CPU)",
            "utterances in the conversation",
            "ms",
            &series,
        )?;
        println!("wrote {}", png.display());
        return Ok(());
    }
    if a.sweep {
        let pts = sweep(&llm, &a.meld, a.reps)?;
        println!(
            "{:>10} {:>8} {:>14} {:>14}",
            "utterances", "tokens", "train s", "predict s"
        );
        for p in &pts {
            println!(
                "{:>10} {:>8} {:>14.3} {:>14.3}",
                p.utterances, p.tokens, p.train_seconds, p.predict_seconds
            );
        }
        if let Some(j) = &a.json {
            farcer::util::write_json_atomic(j, &pts)?;
        }
        return Ok(());
    }
    if let Some(c) = &a.case {
        let r = run_case(c, &llm, meld, vit_s, a.reps, a.profile)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let cases: Vec<String> = if a.cases.is_empty() {
        CASES.iter().map(|s| s.to_string()).collect()
    } else {
        a.cases.clone()
    };
    // Which GEMM ran the products belongs with the times (each case's process makes the
    // same choice from the same environment).
    eprintln!("GEMM: {}", farcer_kernels::blas::choice().describe());
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    println!(
        "{:<28} {:>10} {:>14} {:>10}  what",
        "case", "seconds", "per second", "peak MiB"
    );
    for c in &cases {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "bench",
            "--case",
            c,
            "--reps",
            &a.reps.to_string(),
            "--llm",
            &llm,
        ])
        .arg("--meld")
        .arg(&a.meld)
        .arg("--vit-s")
        .arg(&a.vit_s);
        if a.profile {
            cmd.arg("--profile");
        }
        let r = match case_in_child(cmd)? {
            Ok(r) => r,
            Err(why) => {
                println!("{c:<28} failed: {why}");
                continue;
            }
        };
        println!(
            "{:<28} {:>10.3} {:>10.1} {:<3} {:>10.0}  {}",
            r.case,
            r.seconds,
            r.per_second,
            &r.unit[..3.min(r.unit.len())],
            r.peak_mib,
            r.what
        );
        results.push(r);
    }
    if a.profile {
        print_breakdowns(&results);
    }
    if let Some(p) = &a.json {
        farcer::util::write_json_atomic(p, &results)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The `--profile` table: each part's share of a repetition, and the GEMMs' GFLOP/s.
fn print_breakdowns(results: &[CaseResult]) {
    let Some(first) = results.iter().find_map(|r| r.breakdown.as_ref()) else {
        return;
    };
    let names: Vec<&str> = first.parts.iter().map(|p| p.0.as_str()).collect();
    println!(
        "\n| case | seconds | {} | rest | GEMM GFLOP/s |",
        names.join(" | ")
    );
    println!("|---|---:|{}---:|---:|", "---:|".repeat(names.len()));
    for r in results {
        let Some(b) = &r.breakdown else { continue };
        let total = b.parts.iter().map(|p| p.1).sum::<f64>() + b.rest;
        let pct = |x: f64| format!("{:.0}%", 100.0 * x / total.max(1e-12));
        let cells: Vec<String> = b.parts.iter().map(|p| pct(p.1)).collect();
        println!(
            "| {} | {:.3} | {} | {} | {:.0} |",
            r.case,
            total,
            cells.join(" | "),
            pct(b.rest),
            b.gemm_gflops
        );
    }
}
