//! `farcer demo`: text-only against base FARCER on dialogues and face images that farcer
//! writes itself, end to end (data, vectors, training, evaluation, reports).

use super::{attach_images, build_run, evaluate_to, load_checkpoint, load_llm, pool_for};
use super::{llm_short_name, resolve_llm, row_name, Progress};
use crate::data::{spec::DataSpec, Scope};
use crate::error::{Error, IoContext, Result};
use crate::eval::EvalOptions;
use crate::farcer::Kind;
use crate::model;
use crate::prompt::PromptConfig;
use crate::report::{self, Report};
use crate::train::TrainConfig;
use std::path::PathBuf;

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The LLM (default: the pinned SmolLM2).
    pub llm: Option<String>,
    /// A real vision encoder; default: a seeded, untrained ViT written under `$FARCER_HOME`.
    pub vision: Option<String>,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub shots: usize,
    pub epochs: usize,
    pub lr: f64,
    /// Everything goes here: the data, the run, the reports.
    pub out: PathBuf,
}

/// The two rows the demo compares.
pub struct DemoOutcome {
    pub text_only: Report,
    pub farcer: Report,
}

/// Writes the demo data, evaluates the text-only LLM, trains base FARCER on the demo's
/// train split and evaluates it on the held-out split; says what it does through
/// `p.message`.
pub fn demo(o: &DemoOptions, p: &dyn Progress) -> Result<DemoOutcome> {
    let log = |m: &str| p.message(m);
    let device = model::device(&o.device)?;
    let dtype = model::dtype_for(&o.dtype, &device)?;
    let llm_path = resolve_llm(o.llm.as_deref(), &log)?;
    std::fs::create_dir_all(&o.out).at(&o.out)?;
    // The vision encoder: a real one if given, else farcer's seeded untrained ViT.
    let vision = match &o.vision {
        Some(v) => v.clone(),
        None => {
            let dir = crate::util::farcer_home()
                .join("models")
                .join("demo-vit-seed0");
            if !dir.join("model.safetensors").is_file() {
                crate::vision::VisionEncoder::write_random(
                    &dir,
                    0,
                    &crate::vision::demo_vit_config(),
                    &crate::vision::demo_preprocess(),
                )?;
            }
            p.message(&format!(
                "No face-expression ViT can be downloaded here, so the demo uses a seeded, UNTRAINED ViT that farcer\n\
                 initialises itself ({}); pass --vision <path or hub id> for a real one (the paper's: {}).",
                dir.display(),
                crate::vision::DEFAULT_VISION
            ));
            dir.display().to_string()
        }
    };
    // The demo data: farcer's own dialogues with face images it draws.
    let data_dir = o.out.join("data");
    crate::data::demo::write(&data_dir)?;
    let spec = DataSpec::Jsonl(data_dir.clone());
    p.message(&format!(
        "Demo data: {} (dialogues written by farcer; the final utterance of half of them, e.g. \"Okay.\", says nothing\n\
         about the emotion: only the speaker's face in its image shows it).",
        data_dir.display()
    ));

    // 1. Text-only baseline.
    let llm = load_llm(Some(&llm_path), &device, dtype, &log)?;
    let test = spec.load("test", o.seed)?;
    let pool = pool_for(&spec, o.shots, o.seed)?;
    let opts = |images: bool| {
        let prompt = PromptConfig {
            shots: o.shots,
            past_labels: false,
            images,
        };
        EvalOptions::new(Scope::Last, prompt)
    };
    let stage = format!("{} {}", spec.corpus(), test.split);
    let text_only = evaluate_to(
        &llm,
        format!("Text-only {} - {} shot", llm_short_name(&llm_path), o.shots),
        &spec,
        &test,
        pool.as_ref(),
        &opts(false),
        serde_json::json!({}),
        &o.out.join("text-only"),
        false,
        &|d, t| p.progress(&stage, d, t),
    )?;
    p.message(&format!("\n{}", report::terminal_table(&text_only)));
    drop(llm);

    // 2. Train base FARCER on the demo's train split.
    let run_dir = o.out.join("farcer-base");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).at(&run_dir)?;
    }
    let mut cfg = TrainConfig::new(Kind::Base, &spec.to_string());
    cfg.llm = llm_path.clone();
    cfg.vision = vision.clone();
    cfg.device = o.device.clone();
    cfg.dtype = o.dtype.clone();
    cfg.seed = o.seed;
    cfg.prompt.shots = o.shots;
    cfg.prompt.sets = 10;
    cfg.optim.epochs = o.epochs;
    cfg.optim.lr = Some(o.lr);
    cfg.optim.warmup_steps = 20;
    cfg.optim.patience = o.epochs;
    cfg.validate("the demo's options")?;
    std::fs::create_dir_all(&run_dir).at(&run_dir)?;
    crate::util::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let mut run = build_run(&cfg, &log, &|d, t| p.progress("vectors", d, t))?;
    if let Some((path, e)) = run.failed_images.first() {
        // The demo's images are farcer's own: any that cannot be read is a bug.
        return Err(Error::msg(format!(
            "{} of the demo's own images could not be read, e.g. {}: {e}",
            run.failed_images.len(),
            path.display()
        )));
    }
    p.message(&format!(
        "\nTraining base FARCER (one linear layer, {} parameters; LLM and ViT frozen) on {} demo dialogues, {} epochs:",
        run.farcer.projection.as_ref().map_or(0, |p| p.num_params()),
        run.data.train.samples(Scope::Last).len(),
        cfg.optim.epochs
    ));
    let s = crate::train::train(
        &mut run.farcer,
        &cfg,
        &run.data,
        &run.manifest,
        &run_dir,
        false,
        p.train(),
    )?;

    // 3. FARCER on the held-out split.
    let (mut f, enc, m) = load_checkpoint(
        &s.best_dir,
        &device,
        dtype,
        Some(&llm_path),
        Some(&vision),
        &log,
    )?;
    let mut test = spec.load("test", o.seed)?;
    attach_images(&mut f, enc.as_ref(), &spec, &mut [&mut test], &|_, _| {})?;
    let farcer = evaluate_to(
        &f,
        row_name(m.kind, o.shots, false),
        &spec,
        &test,
        pool.as_ref(),
        &opts(true),
        serde_json::json!({"checkpoint": s.best_dir}),
        &o.out.join("farcer-base-test"),
        false,
        &|d, t| p.progress(&stage, d, t),
    )?;
    p.message(&format!("\n{}", report::terminal_table(&farcer)));
    Ok(DemoOutcome { text_only, farcer })
}
