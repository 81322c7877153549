//! `farcer bench --shape`: the cases that decide whether farcer is worth running on a GPU,
//! at a model's shape (the paper's Llama-3-8B, or small ones to dry-run) with seeded
//! random weights made on the device itself, so nothing is downloaded or carried, in any
//! dtype. The work is the 7-shot MELD prompt's: its lengths, with random token ids.
//! `tools/bench_reference.py --shape` runs the same work in PyTorch from the inputs this
//! writes (`--dump-inputs`), and `scripts/gpu-check` runs both.

use crate::bench::{peak_rss_mib, CaseResult};
use candle_core::{DType, Device, Tensor};
use farcer::decode::{score_labels, LabelTokens};
use farcer::error::{Error, Result};
use farcer::model::dropout::Dropout;
use farcer::model::frozen::Backend;
use farcer::model::llama::{
    log_softmax, Cache, Llama, LlamaConfig, Positions, Recompute, RopeScaling,
};
use farcer::model::lora::LoraConfig;
use farcer::model::projection::{Projection, ProjectionConfig};
use farcer::util::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// The cases, in report order.
pub const SHAPE_CASES: [&str; 4] = [
    "prefill-512",
    "farcer-step-7shot",
    "lora-step-7shot",
    "eval-constrained-7shot",
];

/// Shapes by name.
pub const SHAPES: [&str; 3] = ["llama3-8b", "smollm2-135m", "tiny"];

/// Lengths of the 7-shot MELD prompt farcer builds (SmolLM2's tokenizer): the shared
/// prefix (system turn and seven examples), one sample's own tokens with its image slot,
/// its answer (label and end-of-turn), and the seven labels' answers.
const PREFIX: usize = 1382;
/// The sample's own tokens by default.
pub const SAMPLE_TOKENS: usize = 100;
const ANSWER: usize = 3;
const LABEL_LENGTHS: [usize; 7] = [2, 2, 3, 2, 2, 3, 2];
/// The face encoder's vector (ViT-B).
const VISION_DIM: usize = 768;

/// A model shape as a Hugging Face `config.json` would give it.
pub fn shape_config(name: &str) -> Result<LlamaConfig> {
    let llama3 = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: Some(8.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(8192),
    });
    let (hidden, inter, layers, heads, kv, vocab, theta, scaling, tied) = match name {
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128256, 500000.0, llama3, false),
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, 100000.0, None, true),
        "tiny" => (64, 128, 2, 4, 2, 512, 500000.0, llama3, false),
        other => {
            return Err(Error::input(
                "--shape",
                format!("`{other}`: expected one of {}", SHAPES.join(", ")),
            ))
        }
    };
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: Some(hidden / heads),
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: scaling,
        rope_parameters: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: tied,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: Some("silu".into()),
        model_type: Some("llama".into()),
    })
}

/// The token ids of every case (random, within the vocabulary, no special tokens), written
/// for the PyTorch side so that both run the same work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapeInputs {
    pub shape: String,
    /// The model's `config.json` fields (transformers builds the same shape from them).
    pub config: LlamaConfig,
    pub prefill_ids: Vec<u32>,
    pub prefix_ids: Vec<u32>,
    /// The sample's own tokens; the one at `image_pos` is the image slot.
    pub suffix_ids: Vec<u32>,
    pub image_pos: usize,
    /// The answer, scored with teacher forcing.
    pub answer_ids: Vec<u32>,
    /// Each label's answer tokens (constrained evaluation).
    pub label_seqs: Vec<Vec<u32>>,
    pub vision_dim: usize,
}

impl ShapeInputs {
    /// The inputs at `shape`, the sample having `sample_tokens` tokens of its own.
    pub fn new(shape: &str, sample_tokens: usize) -> Result<Self> {
        if sample_tokens < 2 {
            return Err(Error::input(
                "--sample-tokens",
                "a sample needs at least 2 tokens (one is its image slot)",
            ));
        }
        let config = shape_config(shape)?;
        let mut rng = Rng::derive(0, "bench-shape-ids");
        let v = config.vocab_size;
        let mut ids =
            |n: usize| -> Vec<u32> { (0..n).map(|_| 10 + rng.below(v - 20) as u32).collect() };
        Ok(ShapeInputs {
            shape: shape.to_string(),
            prefill_ids: ids(512),
            prefix_ids: ids(PREFIX),
            suffix_ids: ids(sample_tokens),
            image_pos: sample_tokens / 2,
            answer_ids: ids(ANSWER),
            label_seqs: LABEL_LENGTHS.iter().map(|&n| ids(n)).collect(),
            vision_dim: VISION_DIM,
            config,
        })
    }
}

/// The shape's Llama with seeded random weights (normal, std 0.02; norms at 1), made on
/// `dev` in `dtype`: on a GPU by its own generator, on the CPU by ours (candle's CPU
/// generator cannot be seeded).
pub fn random_llama(
    cfg: &LlamaConfig,
    dev: &Device,
    dtype: DType,
    backend: Backend,
    seed: u64,
) -> Result<Llama> {
    let config = cfg.clone().into_config().map_err(Error::msg)?;
    if !dev.is_cpu() {
        dev.set_seed(seed)?;
    }
    let mut rng = Rng::derive(seed, "bench-shape-weights");
    let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
        let t = if dev.is_cpu() {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| (rng.normal() * 0.02) as f32)
                .collect();
            Tensor::from_vec(v, shape, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?
        };
        Ok(t.to_dtype(dtype)?)
    };
    let c = &config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        normal((c.vocab_size, h))?,
    );
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [
            ("self_attn.q_proj", c.num_heads * hd, h),
            ("self_attn.k_proj", c.num_kv_heads * hd, h),
            ("self_attn.v_proj", c.num_kv_heads * hd, h),
            ("self_attn.o_proj", h, c.num_heads * hd),
            ("mlp.gate_proj", c.intermediate_size, h),
            ("mlp.up_proj", c.intermediate_size, h),
            ("mlp.down_proj", h, c.intermediate_size),
        ] {
            w.insert(format!("{p}.{name}.weight"), normal((out, inp))?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{norm}.weight"), Tensor::ones(h, dtype, dev)?);
        }
    }
    w.insert("model.norm.weight".into(), Tensor::ones(h, dtype, dev)?);
    if !c.tie_word_embeddings {
        w.insert("lm_head.weight".into(), normal((c.vocab_size, h))?);
    }
    let vb = candle_nn::VarBuilder::from_tensors(w, dtype, dev);
    Ok(Llama::load_with(vb, &config, backend)?)
}

/// The sample's embeddings with its image slot filled by the projection of an image
/// vector, then `extra` tokens (the answer, for teacher forcing).
fn sample_embeds(
    model: &Llama,
    proj: &Projection,
    inp: &ShapeInputs,
    extra: &[u32],
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let dev = model.device();
    let img = Tensor::ones((1, inp.vision_dim), DType::F32, dev)?;
    let v = proj.forward(&img, dropout)?.to_dtype(model.dtype())?;
    let (before, after) = inp.suffix_ids.split_at(inp.image_pos);
    let after: Vec<u32> = after[1..].iter().chain(extra).copied().collect();
    let x = Tensor::cat(&[&model.embed(before)?, &v, &model.embed(&after)?], 0)?;
    Ok(x.unsqueeze(0)?)
}

/// One training step: the sample teacher-forced on its answer (logits only where the
/// answer is predicted), cross-entropy in f32, backward to the projection (and adapters).
/// With `prefix` the sample runs after that cached prefix (base FARCER: the prefix does
/// not change in training); without, the whole prompt runs with a graph (LoRA changes the
/// prefix's keys and values, so it cannot be cached while training).
fn train_step(
    model: &Llama,
    proj: &Projection,
    prefix: Option<&Cache>,
    inp: &ShapeInputs,
) -> Result<()> {
    let mut dropout = Dropout::new(0);
    let n = inp.answer_ids.len();
    let mut x = sample_embeds(
        model,
        proj,
        inp,
        &inp.answer_ids[..n - 1],
        Some(&mut dropout),
    )?;
    let (mut s, mut image) = (inp.suffix_ids.len(), inp.image_pos);
    if prefix.is_none() {
        let p = model.embed(&inp.prefix_ids)?.unsqueeze(0)?;
        x = Tensor::cat(&[&p, &x], 1)?;
        s += inp.prefix_ids.len();
        image += inp.prefix_ids.len();
    }
    let at: Vec<usize> = (s - 1..s - 1 + n).collect();
    let mut cache = prefix.cloned().unwrap_or_else(|| model.new_cache());
    // As in training: no gradient is needed before the image (ignored with adapters).
    let pos = Positions {
        grad_from: image,
        ..Positions::default()
    };
    let logits = model
        .forward_train(&x, &mut cache, &pos, &at, &mut dropout)?
        .ok_or_else(|| Error::msg("no logits"))?
        .squeeze(0)?;
    let lp = log_softmax(&logits)?;
    let idx = Tensor::new(inp.answer_ids.as_slice(), model.device())?.unsqueeze(1)?;
    let loss = lp.gather(&idx, 1)?.mean_all()?.neg()?;
    loss.backward()?;
    Ok(())
}

/// Runs one case in this process: the model built, the prefix cached (not timed), one
/// warm-up, then the median of `reps` repetitions, each finished on the device.
pub fn run_shape_case(
    case: &str,
    inp: &ShapeInputs,
    dev: &Device,
    dtype: DType,
    backend: Backend,
    recompute: Recompute,
    reps: usize,
) -> Result<CaseResult> {
    let built = Instant::now();
    let mut model = random_llama(&inp.config, dev, dtype, backend, 0)?.with_recompute(recompute);
    dev.synchronize()?;
    let build_s = built.elapsed().as_secs_f64();
    let proj = Projection::new(
        ProjectionConfig {
            layers: 1,
            dropout: 0.0,
            in_dim: inp.vision_dim,
            out_dim: model.hidden_size(),
        },
        0,
        dev,
    )?;
    if case == "lora-step-7shot" {
        // Dropout off, as on the PyTorch side: the same work on both.
        let cfg = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        };
        model.add_lora(&cfg, 0)?;
        // B starts at zero; give it values so every path carries gradient.
        for (_, v) in model.lora_vars() {
            v.set(&(v.as_tensor().ones_like()? * 0.01)?)?;
        }
    }
    let prefix = |model: &Llama| -> Result<Cache> {
        let mut c = model.new_cache();
        let x = model.embed(&inp.prefix_ids)?.unsqueeze(0)?;
        model.forward(&x, &mut c, &Positions::default(), &[])?;
        Ok(c)
    };
    #[allow(clippy::type_complexity)]
    let (what, units, unit, mut f): (String, f64, &str, Box<dyn FnMut() -> Result<()> + '_>) =
        match case {
            "prefill-512" => {
                let x = model.embed(&inp.prefill_ids)?.unsqueeze(0)?;
                let model = &model;
                (
                    "forward over 512 tokens, logits at the last".into(),
                    512.0,
                    "tokens",
                    Box::new(move || {
                        let mut c = model.new_cache();
                        model.forward(&x, &mut c, &Positions::default(), &[511])?;
                        Ok(())
                    }),
                )
            }
            "farcer-step-7shot" => {
                let p = prefix(&model)?;
                let (model, proj) = (&model, &proj);
                (
                    format!(
                        "base-FARCER (projection) training step: {} sample tokens + {} answer after a cached {}-token 7-shot prefix",
                        inp.suffix_ids.len(),
                        inp.answer_ids.len(),
                        inp.prefix_ids.len()
                    ),
                    1.0,
                    "samples",
                    Box::new(move || train_step(model, proj, Some(&p), inp)),
                )
            }
            "lora-step-7shot" => {
                let (model, proj) = (&model, &proj);
                (
                    format!(
                        "LoRA (r 8, q k v) + projection training step: the whole 7-shot prompt ({} prefix + {} sample + {} answer tokens) with a graph",
                        inp.prefix_ids.len(),
                        inp.suffix_ids.len(),
                        inp.answer_ids.len(),
                    ),
                    1.0,
                    "samples",
                    Box::new(move || train_step(model, proj, None, inp)),
                )
            }
            "eval-constrained-7shot" => {
                let p = prefix(&model)?;
                let cands = LabelTokens {
                    labels: (0..inp.label_seqs.len())
                        .map(|i| format!("label{i}"))
                        .collect(),
                    seqs: inp.label_seqs.clone(),
                };
                let (model, proj) = (&model, &proj);
                (
                    format!(
                        "constrained evaluation of one sample ({} tokens, {} labels) after the cached prefix",
                        inp.suffix_ids.len(),
                        cands.seqs.len()
                    ),
                    1.0,
                    "samples",
                    Box::new(move || {
                        let q = sample_embeds(model, proj, inp, &[], None)?;
                        score_labels(model, &p, &q, &cands)?;
                        Ok(())
                    }),
                )
            }
            other => {
                return Err(Error::input(
                    "--case",
                    format!("`{other}`: shape cases are {}", SHAPE_CASES.join(", ")),
                ))
            }
        };
    f()?;
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    Ok(CaseResult {
        case: case.to_string(),
        what: format!(
            "{what} [{} {:?} on {}, {backend:?} ops, recompute {recompute:?}; model built in {build_s:.1} s]",
            inp.shape,
            dtype,
            device_name(dev)
        ),
        seconds,
        repetitions: times.len(),
        units,
        unit: unit.to_string(),
        per_second: units / seconds,
        // Host memory; on a GPU scripts/gpu-check reads the device's (NVML, per
        // process) the same way for both sides.
        peak_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        breakdown: None,
    })
}

fn device_name(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "cuda"
    } else if dev.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

/// `farcer bench --shape`: dumps the inputs, runs one case, or runs every case each in
/// its own process (so each peak is its own), writing the results file after each.
pub fn run(a: &crate::bench::BenchArgs, shape: &str) -> anyhow::Result<()> {
    let dev = farcer::model::device(&a.device)?;
    let dtype = match &a.dtype {
        Some(t) => farcer::model::dtype(t)?,
        None if dev.is_cpu() => DType::F32,
        None => DType::BF16,
    };
    let backend = match a.backend.as_str() {
        "auto" => Backend::auto(&dev, dtype),
        "kernels" => Backend::Kernels,
        "candle" => Backend::Candle,
        other => {
            return Err(Error::input(
                "--backend",
                format!("`{other}`: expected auto, kernels or candle"),
            )
            .into())
        }
    };
    backend.check(&dev, dtype)?;
    let recompute = match a.recompute.as_str() {
        "auto" => Recompute::Auto,
        "always" => Recompute::Always,
        "never" => Recompute::Never,
        other => {
            return Err(Error::input(
                "--recompute",
                format!("`{other}`: expected auto, always or never"),
            )
            .into())
        }
    };
    let inp = ShapeInputs::new(shape, a.sample_tokens)?;
    if let Some(p) = &a.dump_inputs {
        farcer::util::write_json_atomic(p, &inp)?;
        println!("wrote {}", p.display());
        return Ok(());
    }
    if let Some(c) = &a.case {
        let r = run_shape_case(c, &inp, &dev, dtype, backend, recompute, a.reps)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let cases: Vec<String> = if a.cases.is_empty() {
        SHAPE_CASES.iter().map(|s| s.to_string()).collect()
    } else {
        a.cases.clone()
    };
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    println!("{:<24} {:>10} {:>10}  what", "case", "seconds", "host MiB");
    for c in &cases {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "--shape", shape, "--device", &a.device])
            .args([
                "--dtype",
                dtype.as_str(),
                "--backend",
                &a.backend,
                "--case",
                c,
            ])
            .args(["--recompute", &a.recompute])
            .args(["--reps", &a.reps.to_string()])
            .args(["--sample-tokens", &a.sample_tokens.to_string()]);
        match crate::bench::case_in_child(cmd)? {
            Ok(r) => {
                println!(
                    "{:<24} {:>10.4} {:>10.0}  {}",
                    r.case, r.seconds, r.peak_mib, r.what
                );
                results.push(r);
                if let Some(p) = &a.json {
                    farcer::util::write_json_atomic(p, &results)?;
                }
            }
            Err(why) => println!("{c:<24} failed: {why}"),
        }
    }
    if let Some(p) = &a.json {
        println!("wrote {}", p.display());
    }
    Ok(())
}
