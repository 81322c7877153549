//! The steps a user runs, as library calls: prepare a corpus (frames and image vectors),
//! build a training run from its config, load a checkpoint with everything it names.
//! The CLI only parses arguments and prints.

mod demo;
mod evaluate;
pub use demo::{demo, DemoOptions, DemoOutcome};
pub use evaluate::{evaluate, EvalOutcome, EvalRequest};

use crate::data::{frames, iemocap, meld, spec::DataSpec, Dataset, Scope};
use crate::error::{Error, IoContext, Result};
use crate::farcer::{Farcer, Kind, Manifest};
use crate::model::projection::Projection;
use crate::model::{self, Llm};
use crate::train::{RunData, TrainConfig};
use crate::vision::VisionEncoder;
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `default` (or nothing) means the pinned default LLM, fetched on first use.
pub fn resolve_llm(spec: Option<&str>, log: &dyn Fn(&str)) -> Result<String> {
    match spec {
        None | Some("default") => Ok(crate::fetch::ensure_default_llm(None, log)?
            .display()
            .to_string()),
        Some(s) => Ok(s.to_string()),
    }
}

/// The LLM in `dtype` on `device` (see [`model::dtype_for`]).
pub fn load_llm(
    spec: Option<&str>,
    device: &Device,
    dtype: DType,
    log: &dyn Fn(&str),
) -> Result<Llm> {
    let s = resolve_llm(spec, log)?;
    log(&format!("loading LLM {s} ({dtype:?})"));
    model::load_llm(&s, device, dtype)
}

/// Where image vectors of a dataset are cached: a prepared MELD / IEMOCAP folder keeps
/// its own (`<dir>/vectors/`), everything else shares `$FARCER_HOME/vectors/`.
pub fn vector_dir(spec: &DataSpec) -> PathBuf {
    match spec {
        DataSpec::Meld(d) | DataSpec::Iemocap(d) if d.join("frames").is_dir() => d.join("vectors"),
        _ => crate::util::farcer_home().join("vectors"),
    }
}

/// Images of a run: frames taken from clips where only a clip is named, then every
/// image's vector (cached). Returns the images that could not be used. Without an encoder
/// (a text-only model) there is nothing to do.
pub fn attach_images(
    f: &mut Farcer,
    enc: Option<&VisionEncoder>,
    spec: &DataSpec,
    datasets: &mut [&mut Dataset],
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<(PathBuf, String)>> {
    let Some(enc) = enc else {
        return Ok(Vec::new());
    };
    let cache = crate::util::farcer_home().join("frames");
    let mut failed = Vec::new();
    let needs_frames = datasets.iter().any(|d| {
        d.dialogues
            .iter()
            .flat_map(|x| &x.utterances)
            .any(|u| u.image.is_none() && u.clip.is_some())
    });
    if needs_frames && !matches!(spec, DataSpec::Iemocap(_) | DataSpec::Meld(_)) {
        frames::check_ffmpeg()?;
        let limits = crate::limits::InputLimits::from_env()?;
        for d in datasets.iter_mut() {
            failed.extend(frames::resolve_clip_frames(d, &cache, &limits));
        }
    }
    let refs: Vec<&Dataset> = datasets.iter().map(|d| &**d).collect();
    failed.extend(f.load_vectors(enc, &vector_dir(spec), &refs, progress)?);
    Ok(failed)
}

/// What `prepare` did.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    pub corpus: String,
    pub splits: Vec<String>,
    pub frames: frames::FrameReport,
    pub face_crop: bool,
    pub faces_found: usize,
    /// Image vectors computed now or found cached, with the encoder that made them.
    pub vectors: usize,
    pub vision: Option<String>,
    pub seconds: f64,
}

/// `farcer prepare meld`: the CSVs copied into `out`, one frame per utterance under
/// `out/frames/{split}/`, and (when an encoder is given) image vectors under `out/vectors/`.
#[allow(clippy::too_many_arguments)]
pub fn prepare_meld(
    csv_dir: &Path,
    video_dir: &Path,
    out: &Path,
    splits: &[String],
    vision: Option<&VisionEncoder>,
    face_crop: bool,
    threads: usize,
    progress: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<PrepareReport> {
    let start = std::time::Instant::now();
    frames::check_ffmpeg()?;
    std::fs::create_dir_all(out).at(out)?;
    let mut jobs = Vec::new();
    let mut datasets = Vec::new();
    for split in splits {
        let src = meld::csv_path(csv_dir, split);
        let dst = meld::csv_path(out, split);
        if src != dst {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
        let ds = meld::load(out, split)?;
        jobs.extend(frames::meld_jobs(&ds, video_dir, out));
        datasets.push(ds);
    }
    let limits = crate::limits::InputLimits::from_env()?;
    let report = frames::run_jobs(jobs, threads, &limits, &|d, t| progress("frames", d, t));
    report.check_any(video_dir)?;
    let faces_found = if face_crop {
        crop_faces(out, &|d, t| progress("faces", d, t))?
    } else {
        0
    };
    let paths = || -> Result<Vec<PathBuf>> {
        let mut p = Vec::new();
        for split in splits {
            let d = meld::load(out, split)?;
            p.extend(d.image_paths().cloned());
        }
        Ok(p)
    };
    let frames = Prepared {
        corpus: "meld",
        splits: splits.to_vec(),
        frames: report,
        face_crop,
        faces_found,
    };
    frames.finish(out, vision, paths, start, progress)
}

/// `farcer prepare iemocap`: frames of every turn (speaker's half, top and bottom fifth
/// cut) under `out/frames/`, `out/source.txt` naming the corpus root, vectors if an
/// encoder is given.
pub fn prepare_iemocap(
    root: &Path,
    out: &Path,
    vision: Option<&VisionEncoder>,
    face_crop: bool,
    threads: usize,
    seed: u64,
    progress: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<PrepareReport> {
    let start = std::time::Instant::now();
    frames::check_ffmpeg()?;
    std::fs::create_dir_all(out).at(out)?;
    let sessions = iemocap::read_sessions(root, seed)?;
    let root_abs = std::fs::canonicalize(root).at(root)?;
    crate::util::write_atomic(
        &out.join("source.txt"),
        format!("{}\n", root_abs.display()).as_bytes(),
    )?;
    let limits = crate::limits::InputLimits::from_env()?;
    let jobs = frames::iemocap_jobs(&sessions, out);
    let report = frames::run_jobs(jobs, threads, &limits, &|d, t| progress("frames", d, t));
    report.check_any(root)?;
    let faces_found = if face_crop {
        crop_faces(out, &|d, t| progress("faces", d, t))?
    } else {
        0
    };
    let paths = || -> Result<Vec<PathBuf>> {
        let spec = DataSpec::Iemocap(out.to_path_buf());
        let mut p = Vec::new();
        for split in ["train", "dev", "test"] {
            let d = spec.load(split, seed)?;
            p.extend(d.image_paths().cloned());
        }
        Ok(p)
    };
    let splits = vec!["train".into(), "dev".into(), "test".into()];
    let frames = Prepared {
        corpus: "iemocap",
        splits,
        frames: report,
        face_crop,
        faces_found,
    };
    frames.finish(out, vision, paths, start, progress)
}

/// What the frame step of `prepare` did; [`Prepared::finish`] adds the image vectors
/// and writes `prepare-report.json`.
struct Prepared {
    corpus: &'static str,
    splits: Vec<String>,
    frames: frames::FrameReport,
    face_crop: bool,
    faces_found: usize,
}

impl Prepared {
    fn finish(
        self,
        out: &Path,
        vision: Option<&VisionEncoder>,
        paths: impl FnOnce() -> Result<Vec<PathBuf>>,
        start: std::time::Instant,
        progress: &(dyn Fn(&str, usize, usize) + Sync),
    ) -> Result<PrepareReport> {
        let mut vectors = 0;
        if let Some(enc) = vision {
            let mut store = crate::vision::VectorStore::open(&out.join("vectors"), &enc.key)?;
            let (v, _) = crate::vision::vectors_for(enc, &mut store, &paths()?, &|d, t| {
                progress("vectors", d, t)
            })?;
            vectors = v.len();
        }
        let rep = PrepareReport {
            corpus: self.corpus.into(),
            splits: self.splits,
            frames: self.frames,
            face_crop: self.face_crop,
            faces_found: self.faces_found,
            vectors,
            vision: vision.map(|v| v.name.clone()),
            seconds: start.elapsed().as_secs_f64(),
        };
        crate::util::write_json_atomic(&out.join("prepare-report.json"), &rep)?;
        Ok(rep)
    }
}

/// Replaces every frame under `out/frames` by the largest face found in it (frames
/// without a face stay whole). Returns the number of faces found.
fn crop_faces(out: &Path, progress: &dyn Fn(usize, usize)) -> Result<usize> {
    let mut files = Vec::new();
    collect_pngs(&out.join("frames"), &mut files)?;
    let done_marker = out.join("frames").join(".face-cropped");
    let already: std::collections::HashSet<String> = std::fs::read_to_string(&done_marker)
        .map(|s| s.lines().map(String::from).collect())
        .unwrap_or_default();
    let limits = crate::limits::InputLimits::from_env()?;
    let mut found = 0;
    let mut log = String::new();
    for (i, f) in files.iter().enumerate() {
        let key = f.display().to_string();
        if already.contains(&key) {
            found += 1;
            log.push_str(&key);
            log.push('\n');
            progress(i + 1, files.len());
            continue;
        }
        let img = crate::limits::load_image(f, &limits)?;
        if let Some(face) = crate::face::crop_largest_face(&img) {
            let tmp = crate::util::tmp_sibling(f).with_extension("png");
            face.save(&tmp)
                .map_err(|e| Error::msg(format!("{}: {e}", tmp.display())))?;
            std::fs::rename(&tmp, f).at(f)?;
            found += 1;
            log.push_str(&key);
            log.push('\n');
        }
        progress(i + 1, files.len());
    }
    crate::util::write_atomic(&done_marker, log.as_bytes())?;
    Ok(found)
}

fn collect_pngs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_pngs(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "png") {
            out.push(p);
        }
    }
    Ok(())
}

/// A training run put together from its config: the model (with a fresh or `init`
/// projection and, for the fine-tuned kind, LoRA adapters), the data with image vectors,
/// and the manifest its checkpoints will carry.
pub struct Run {
    pub farcer: Farcer,
    /// The frozen vision encoder (none for `text-lora`).
    pub vision: Option<VisionEncoder>,
    pub data: RunData,
    pub manifest: Manifest,
    /// Images that could not be read (no slot for them).
    pub failed_images: Vec<(PathBuf, String)>,
}

pub fn build_run(
    cfg: &TrainConfig,
    log: &dyn Fn(&str),
    progress: &dyn Fn(usize, usize),
) -> Result<Run> {
    let device = model::device(&cfg.device)?;
    let dtype = model::dtype_for(&cfg.dtype, &device)?;
    let llm_path = resolve_llm(Some(&cfg.llm), log)?;
    let mut llm = load_llm(Some(&llm_path), &device, dtype, log)?;
    let vision = if cfg.kind.takes_images() {
        log(&format!("loading vision encoder {}", cfg.vision));
        Some(VisionEncoder::load_as(
            &cfg.vision,
            &device,
            dtype,
            cfg.after_norm,
        )?)
    } else {
        None
    };
    let spec: DataSpec = cfg.data.parse()?;
    let mut train = spec.load(&cfg.train_split, cfg.seed)?;
    let mut val = spec.load(&cfg.val_split, cfg.seed)?;
    let pool = pool_for(&spec, cfg.prompt.shots, cfg.seed)?;
    // Refused here, before any training, rather than at the first prompt.
    crate::prompt::PromptSet::for_shots(pool.as_ref(), cfg.prompt.shots, 0)?;
    let mut lora = None;
    if let Some(l) = &cfg.lora {
        llm.model.add_lora(l, cfg.seed)?;
        lora = Some(l.clone());
    }
    let pcfg = vision.as_ref().map(|v| {
        Farcer::projection_config(
            cfg.kind,
            cfg.projection_layers(),
            cfg.projection.dropout,
            v.dim(),
            &llm,
        )
    });
    let projection = pcfg
        .as_ref()
        .map(|c| Projection::new(c.clone(), cfg.seed, &device))
        .transpose()?;
    let mut f = Farcer::new(llm, projection, cfg.kind);
    if let Some(init) = &cfg.init {
        init_from(&mut f, init)?;
        log(&format!("initialised from {}", init.display()));
    }
    let failed = attach_images(
        &mut f,
        vision.as_ref(),
        &spec,
        &mut [&mut train, &mut val],
        progress,
    )?;
    let manifest = Manifest {
        farcer_version: env!("CARGO_PKG_VERSION").into(),
        kind: cfg.kind,
        llm: if cfg.llm == "default" {
            "default".into()
        } else {
            cfg.llm.clone()
        },
        llm_sha256: single_file_sha(&llm_path)?,
        vision: vision.as_ref().map(|_| cfg.vision.clone()),
        vision_key: vision.as_ref().map(|v| v.key.clone()),
        after_norm: cfg.after_norm,
        projection: pcfg,
        lora,
        prompt: cfg.prompt_config(),
        labels: train.labels.clone(),
        data: cfg.data.clone(),
        epoch: 0,
        step: 0,
        val_weighted_f1: None,
    };
    Ok(Run {
        farcer: f,
        vision,
        data: RunData { train, val, pool },
        manifest,
        failed_images: failed,
    })
}

fn single_file_sha(path: &str) -> Result<Option<String>> {
    let p = Path::new(path);
    if p.is_file() {
        if p == crate::fetch::default_llm_path() {
            return Ok(Some(crate::fetch::GGUF_SHA256.into()));
        }
        return Ok(Some(crate::util::sha256_file(p)?));
    }
    Ok(None)
}

/// Starts from another checkpoint's weights: the projection (when shapes agree) and
/// LoRA adapters (when both have them).
fn init_from(f: &mut Farcer, dir: &Path) -> Result<()> {
    let (d, m) = crate::farcer::read_manifest(dir)?;
    let shape = |c: Option<&crate::model::projection::ProjectionConfig>| match c {
        Some(c) => format!(
            "a projection of {} layers, {} -> {}",
            c.layers, c.in_dim, c.out_dim
        ),
        None => "no projection".to_string(),
    };
    let (theirs, ours) = (
        m.projection.as_ref(),
        f.projection.as_ref().map(|p| &p.config),
    );
    let fits = match (theirs, ours) {
        (Some(a), Some(b)) => {
            a.in_dim == b.in_dim && a.out_dim == b.out_dim && a.layers == b.layers
        }
        (a, b) => a.is_none() && b.is_none(),
    };
    if !fits {
        return Err(Error::msg(format!(
            "--init {}: it has {}, this run has {}",
            dir.display(),
            shape(theirs),
            shape(ours)
        )));
    }
    // A checkpoint without adapters gives the projection only; the adapters start fresh.
    f.restore(&d, m.lora.is_some())
}

/// A checkpoint with everything its manifest names: the LLM, the vision encoder, the
/// trained weights. `llm`/`vision` override what the manifest says (e.g. a local copy).
pub fn load_checkpoint(
    dir: &Path,
    device: &Device,
    dtype: DType,
    llm: Option<&str>,
    vision: Option<&str>,
    log: &dyn Fn(&str),
) -> Result<(Farcer, Option<VisionEncoder>, Manifest)> {
    let (_, m) = crate::farcer::read_manifest(dir)?;
    let llm_spec = llm.unwrap_or(&m.llm);
    let llm_path = resolve_llm(Some(llm_spec), log)?;
    if let (Some(want), true) = (&m.llm_sha256, llm.is_none()) {
        if let Some(got) = single_file_sha(&llm_path)? {
            if &got != want {
                return Err(Error::msg(format!(
                    "{}: the checkpoint was trained on an LLM with sha256 {want}, but {llm_path} has {got}; pass --llm to use it anyway",
                    dir.display()
                )));
            }
        }
    }
    let llm = load_llm(Some(&llm_path), device, dtype, log)?;
    let enc = match (vision.or(m.vision.as_deref()), m.kind.takes_images()) {
        (Some(vspec), true) => {
            log(&format!("loading vision encoder {vspec}"));
            let enc = VisionEncoder::load_as(vspec, device, dtype, m.after_norm)?;
            if Some(&enc.key) != m.vision_key.as_ref() {
                log(&format!(
                    "note: the vision encoder differs from the one used in training ({} vs {}); vectors will not match what the projection learned",
                    enc.key,
                    m.vision_key.as_deref().unwrap_or("none")
                ));
            }
            Some(enc)
        }
        (None, true) => {
            return Err(Error::input(
                dir.join("manifest.json").display().to_string(),
                "no vision encoder named: pass --vision",
            ))
        }
        (_, false) => None,
    };
    let (f, m) = crate::farcer::load_checkpoint(dir, llm, device)?;
    Ok((f, enc, m))
}

/// The row name of a checkpoint in tables, e.g. `Base FARCER - 7 shot`.
pub fn row_name(kind: Kind, shots: usize, past_labels: bool) -> String {
    format!(
        "{} - {shots} shot{}",
        kind.label(),
        if past_labels { " PL" } else { "" }
    )
}

/// Evaluates `b` on `data` and writes `report.json`, `report.md`, `predictions.jsonl`
/// and `confusion.png` into `out`. Predictions are journaled to
/// `out/predictions.partial.jsonl` as they are made, so an unwritable `out` fails at once
/// and, with `resume`, a killed evaluation continues where it stopped; `report.json`
/// comes last, so its presence means the folder is complete (and `resume` then returns it).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_to(
    b: &dyn crate::eval::InputBuilder,
    name: String,
    spec: &DataSpec,
    data: &Dataset,
    pool: Option<&Dataset>,
    opts: &crate::eval::EvalOptions,
    extra: serde_json::Value,
    out: &Path,
    resume: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<crate::report::Report> {
    let done = out.join("report.json");
    let partial = out.join("predictions.partial.jsonl");
    if resume && done.is_file() {
        let text = std::fs::read_to_string(&done).at(&done)?;
        crate::util::remove_any(&partial)?;
        crate::util::remove_leftovers(out)?;
        return serde_json::from_str(&text)
            .map_err(|e| Error::input(done.display().to_string(), e.to_string()));
    }
    std::fs::create_dir_all(out).at(out)?;
    crate::util::remove_leftovers(out)?;
    if !resume {
        crate::util::remove_any(&done)?;
    }
    let llm = b.llm();
    let fingerprint = crate::util::sha256_bytes(
        serde_json::json!({"name": name, "llm": llm.name, "kind": b.kind(), "extra": extra,
            "data": spec.to_string(), "split": data.split, "options": opts})
        .to_string()
        .as_bytes(),
    );
    let mut journal = crate::eval::Journal::open(&partial, &fingerprint, resume)?;
    let result =
        crate::eval::evaluate_journaled(b, data, pool, opts, Some(&mut journal), progress)?;
    let info = crate::report::RunInfo {
        name,
        model: serde_json::json!({"llm": llm.name, "source": llm.source, "kind": b.kind(), "extra": extra}),
        data: spec.to_string(),
        split: &data.split,
        scope: opts.scope.to_string(),
        decode: opts.decode.to_string(),
        shots: opts.prompt.shots,
        past_labels: opts.prompt.past_labels,
        images: opts.prompt.images,
        labels: &data.labels,
        extra: serde_json::json!({"limit": opts.limit, "max_tokens": opts.max_tokens, "past_source": opts.past_source}),
        image_control: opts.image_control,
    };
    let rep = crate::report::build(info, &result);
    crate::report::write_all(out, &rep, &result.predictions)?;
    drop(journal);
    crate::util::remove_any(&partial)?;
    Ok(rep)
}

/// The few-shot pool of a data spec: None for 0 shots, or when the data has no split to
/// draw from (then [`PromptSet::for_shots`](crate::prompt::PromptSet::for_shots) says so).
pub fn pool_for(spec: &DataSpec, shots: usize, seed: u64) -> Result<Option<Dataset>> {
    match (shots, spec.pool_split()) {
        (0, _) | (_, None) => Ok(None),
        (_, Some(p)) => Ok(Some(spec.load(p, seed)?)),
    }
}

/// A short name for an LLM path (`SmolLM2-135M-Instruct.Q4_1`).
pub fn llm_short_name(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| name.to_string())
}

/// Progress and messages from long library calls.
pub trait Progress {
    fn message(&self, _m: &str) {}
    fn progress(&self, _stage: &str, _done: usize, _total: usize) {}
    fn train(&self) -> &dyn crate::train::Observer;
    /// Images that could not be read (their utterances get no image slot): a message
    /// with how many and the first few.
    fn images_failed(&self, failed: &[(PathBuf, String)]) {
        if let Some(m) = failed_images_message(failed) {
            self.message(&m);
        }
    }
}

/// "N images could not be read (...), e.g.:" and the first five, or `None` for none.
pub fn failed_images_message(failed: &[(PathBuf, String)]) -> Option<String> {
    if failed.is_empty() {
        return None;
    }
    let mut m = format!(
        "{} images could not be read (their utterances get no image slot), e.g.:",
        failed.len()
    );
    for (p, e) in failed.iter().take(5) {
        m.push_str(&format!("\n  {}: {e}", p.display()));
    }
    Some(m)
}

/// Runs every cell of a grid: trains what is not trained (resuming a partial run),
/// evaluates what has no report yet. Returns the cells that ran or were found done.
pub fn run_grid(g: &crate::grid::GridConfig, out: &Path, p: &dyn Progress) -> Result<usize> {
    use crate::eval::EvalOptions;
    use crate::prompt::PromptConfig;
    std::fs::create_dir_all(out).at(out)?;
    let spec: DataSpec = g.data.parse()?;
    let device = model::device(&g.device)?;
    let dtype = model::dtype_for(&g.dtype, &device)?;
    let runs = crate::grid::expand(g, out);
    let log = |m: &str| p.message(m);
    for (i, r) in runs.iter().enumerate() {
        let control = r.has_control(g);
        let done = |s: Scope| {
            r.eval_dir(&g.split, s).join("report.json").is_file()
                && (!control || r.control_dir(&g.split, s).join("report.json").is_file())
        };
        let todo: Vec<Scope> = g.scopes.iter().copied().filter(|s| !done(*s)).collect();
        if todo.is_empty() {
            p.message(&format!("[{}/{}] {}: done", i + 1, runs.len(), r.name()));
            continue;
        }
        p.message(&format!("[{}/{}] {}", i + 1, runs.len(), r.name()));
        let mut data = spec.load(&g.split, r.seed)?;
        let pool = pool_for(&spec, r.shots, r.seed)?;
        let opts = |scope: Scope, images: bool| EvalOptions {
            decode: g.decode,
            limit: (g.limit > 0).then_some(g.limit),
            ..EvalOptions::new(
                scope,
                PromptConfig {
                    shots: r.shots,
                    past_labels: r.past_labels,
                    images,
                },
            )
        };
        match r.train_config(g) {
            None => {
                let llm = load_llm(Some(&g.llm), &device, dtype, &log)?;
                let name = format!(
                    "Text-only {} - {} shot{}",
                    llm_short_name(&llm.name),
                    r.shots,
                    if r.past_labels { " PL" } else { "" }
                );
                for s in todo {
                    evaluate_to(
                        &llm,
                        name.clone(),
                        &spec,
                        &data,
                        pool.as_ref(),
                        &opts(s, false),
                        serde_json::json!({"seed": r.seed}),
                        &r.eval_dir(&g.split, s),
                        true,
                        &|d, t| p.progress("eval", d, t),
                    )?;
                }
            }
            Some(cfg) => {
                let summary = r.dir.join("summary.json");
                if !summary.is_file() {
                    let resume = r.dir.join("last").exists();
                    std::fs::create_dir_all(&r.dir).at(&r.dir)?;
                    crate::util::write_atomic(
                        &r.dir.join("config.toml"),
                        cfg.to_toml().as_bytes(),
                    )?;
                    let mut run = build_run(&cfg, &log, &|d, t| p.progress("vectors", d, t))?;
                    // `train` writes summary.json last, once the run is complete.
                    match crate::train::train(
                        &mut run.farcer,
                        &cfg,
                        &run.data,
                        &run.manifest,
                        &r.dir,
                        resume,
                        p.train(),
                    ) {
                        Err(Error::AlreadyFinished(_)) => {}
                        other => {
                            other?;
                        }
                    }
                }
                let (mut f, enc, m) =
                    load_checkpoint(&r.dir.join("best"), &device, dtype, None, None, &log)?;
                attach_images(&mut f, enc.as_ref(), &spec, &mut [&mut data], &|d, t| {
                    p.progress("vectors", d, t)
                })?;
                let name = row_name(m.kind, r.shots, r.past_labels);
                for s in todo {
                    let extra = serde_json::json!({"checkpoint": r.dir.join("best"), "seed": r.seed, "epoch": m.epoch});
                    let real = opts(s, m.prompt.images);
                    let mut runs = vec![(real.clone(), r.eval_dir(&g.split, s))];
                    if control {
                        let shuffled = crate::eval::EvalOptions {
                            image_control: crate::eval::ImageControl::Shuffle,
                            ..real
                        };
                        runs.push((shuffled, r.control_dir(&g.split, s)));
                    }
                    for (o, dir) in runs {
                        evaluate_to(
                            &f,
                            name.clone(),
                            &spec,
                            &data,
                            pool.as_ref(),
                            &o,
                            extra.clone(),
                            &dir,
                            true,
                            &|d, t| p.progress("eval", d, t),
                        )?;
                    }
                }
            }
        }
    }
    Ok(runs.len())
}

/// Makes a farcer checkpoint from a PEFT adapter folder (e.g. one trained in Python):
/// its LoRA weights, and the projection saved as a module (`mp.K`).
pub fn import_peft(
    peft_dir: &Path,
    llm_spec: &str,
    vision: &str,
    labels: Vec<String>,
    prompt: crate::prompt::PromptConfig,
    out: &Path,
    log: &dyn Fn(&str),
) -> Result<()> {
    let device = Device::Cpu;
    let llm_path = resolve_llm(Some(llm_spec), log)?;
    let mut llm = load_llm(Some(&llm_path), &device, DType::F32, log)?;
    let (lora, saved) = crate::model::peft::load_peft(peft_dir, &mut llm.model)?;
    let layers = (0..)
        .take_while(|i| saved.contains_key(&format!("mp.{}.weight", 3 * i)))
        .count();
    // Without a saved projection it is a plain adapter of the LLM: a text-only model.
    let (kind, projection, enc, prompt) = if layers == 0 {
        let prompt = crate::prompt::PromptConfig {
            images: false,
            ..prompt
        };
        (Kind::TextLora, None, None, prompt)
    } else {
        let enc = VisionEncoder::load(vision, &device, false)?;
        let first = &saved["mp.0.weight"];
        let last = &saved[&format!("mp.{}.weight", 3 * (layers - 1))];
        let pcfg = crate::model::projection::ProjectionConfig {
            layers,
            dropout: 0.05,
            in_dim: first.dim(1)?,
            out_dim: last.dim(0)?,
        };
        if pcfg.in_dim != enc.dim() || pcfg.out_dim != llm.model.hidden_size() {
            return Err(Error::msg(format!(
                "the adapter's projection maps {} -> {}, but the encoder gives {} and the LLM takes {}",
                pcfg.in_dim,
                pcfg.out_dim,
                enc.dim(),
                llm.model.hidden_size()
            )));
        }
        let projection = Projection::new(pcfg, 0, &device)?;
        projection.load_tensors(&saved)?;
        let kind = if layers > 1 {
            Kind::ThreeLayer
        } else {
            Kind::Finetuned
        };
        (kind, Some(projection), Some(enc), prompt)
    };
    let pcfg = projection.as_ref().map(|p| p.config.clone());
    let f = Farcer::new(llm, projection, kind);
    let manifest = Manifest {
        farcer_version: env!("CARGO_PKG_VERSION").into(),
        kind,
        llm: llm_spec.to_string(),
        llm_sha256: single_file_sha(&llm_path)?,
        vision: enc.as_ref().map(|_| vision.to_string()),
        vision_key: enc.as_ref().map(|e| e.key.clone()),
        after_norm: false,
        projection: pcfg,
        lora: Some(lora),
        prompt,
        labels,
        data: format!("imported from {}", peft_dir.display()),
        epoch: 0,
        step: 0,
        val_weighted_f1: None,
    };
    f.save(out, &manifest, &f.llm.model.lora_vars())
}

/// The majority-class baseline: every sample gets the label most frequent in the
/// training split (MELD: `neutral`), scored and written like any evaluation.
pub fn majority_baseline(
    spec: &DataSpec,
    split: &str,
    scope: Scope,
    seed: u64,
    out: &Path,
) -> Result<crate::report::Report> {
    let data = spec.load(split, seed)?;
    let train = spec.load("train", seed).unwrap_or_else(|_| data.clone());
    let counts = train.label_counts(Scope::All);
    let (mi, _) = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
        .ok_or_else(|| Error::msg("no labels"))?;
    let label = data.labels[mi].clone();
    let samples = data.samples(scope);
    let gold: Vec<String> = samples.iter().map(|s| data.gold(s).to_string()).collect();
    let pred = vec![label.clone(); gold.len()];
    let scores = crate::metrics::score(&data.labels, &gold, &pred);
    let predictions = samples
        .iter()
        .map(|s| crate::eval::PredictionRecord {
            dialogue_id: data.dialogues[s.dialogue].id.clone(),
            utterance_id: data.dialogues[s.dialogue].utterances[s.target].id.clone(),
            prompt_set: 0,
            gold: data.gold(s).to_string(),
            pred: label.clone(),
            text: None,
            probs: None,
            dropped: 0,
        })
        .collect();
    let result = crate::eval::EvalResult {
        sets: vec![crate::eval::SetResult {
            prompt_set: 0,
            scores,
            prefix_tokens: 0,
            excluded_dialogues: 0,
        }],
        predictions,
        truncated: 0,
        seconds: 0.0,
        samples: gold.len(),
    };
    let info = crate::report::RunInfo {
        name: format!("Majority class ({label})"),
        model: serde_json::json!({"kind": "majority", "label": label}),
        data: spec.to_string(),
        split,
        scope: scope.to_string(),
        decode: "none".into(),
        shots: 0,
        past_labels: false,
        images: false,
        labels: &data.labels,
        extra: serde_json::json!({}),
        image_control: Default::default(),
    };
    let rep = crate::report::build(info, &result);
    crate::report::write_all(out, &rep, &result.predictions)?;
    Ok(rep)
}

/// What `farcer train` may change in a run's config file.
#[derive(Debug, Clone, Default)]
pub struct TrainOverrides {
    pub epochs: Option<usize>,
    pub limit_train: Option<usize>,
    pub limit_val: Option<usize>,
    pub init: Option<PathBuf>,
    pub data: Option<String>,
}

/// The configuration of the run in `out`: with `resume`, the one it saved (nothing may
/// change it); otherwise `config` with the overrides applied, saved as `out/config.toml`
/// (unless `dry_run`) after checking that `out` holds no run yet.
pub fn run_config(
    out: &Path,
    config: Option<&Path>,
    o: &TrainOverrides,
    resume: bool,
    dry_run: bool,
) -> Result<TrainConfig> {
    let saved = out.join("config.toml");
    if resume {
        let changes: Vec<&str> = [
            ("--config", config.is_some()),
            ("--epochs", o.epochs.is_some()),
            ("--limit-train", o.limit_train.is_some()),
            ("--limit-val", o.limit_val.is_some()),
            ("--init", o.init.is_some()),
            ("--data", o.data.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, given)| given.then_some(n))
        .collect();
        if !changes.is_empty() {
            return Err(Error::msg(format!(
                "--resume continues the run exactly as {} configures it; {} would change it: drop {} (or start a new run in another --out)",
                saved.display(),
                changes.join(", "),
                if changes.len() == 1 { "it" } else { "them" }
            )));
        }
        return TrainConfig::read(&saved).map_err(|e| {
            Error::msg(format!(
                "--resume needs {}: this folder holds no run that saved anything yet (start it again without --resume): {e}",
                saved.display()
            ))
        });
    }
    let c =
        config.ok_or_else(|| Error::msg("--config is required (or --resume an existing run)"))?;
    let mut cfg = TrainConfig::read(c)?;
    if let Some(e) = o.epochs {
        cfg.optim.epochs = e;
    }
    if let Some(n) = o.limit_train {
        cfg.run.limit_train = n;
    }
    if let Some(n) = o.limit_val {
        cfg.run.limit_val = n;
    }
    if let Some(i) = &o.init {
        cfg.init = Some(i.clone());
    }
    if let Some(d) = &o.data {
        cfg.data = d.clone();
    }
    if !dry_run {
        if out.join("last").exists() || out.join("last.old").exists() {
            return Err(Error::msg(format!(
                "{} already holds a run; use --resume to continue it or choose another --out",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).at(out)?;
        crate::util::write_atomic(&saved, cfg.to_toml().as_bytes())?;
    }
    Ok(cfg)
}
