//! `farcer eval`: the LLM alone (text only) or a trained checkpoint on a split, with the
//! shuffled-image control when asked.

use super::{attach_images, evaluate_to, llm_short_name, load_checkpoint, load_llm};
use super::{pool_for, row_name, Progress};
use crate::data::spec::DataSpec;
use crate::data::Scope;
use crate::decode::Decode;
use crate::error::{Error, Result};
use crate::eval::{EvalOptions, ImageControl, InputBuilder, PastSource};
use crate::model;
use crate::prompt::PromptConfig;
use crate::report::{self, Report};
use std::path::PathBuf;

/// What to evaluate, on what, and how.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub data: DataSpec,
    pub split: String,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    /// The LLM (default: the pinned SmolLM2, or the checkpoint's).
    pub llm: Option<String>,
    /// A trained checkpoint; without it the LLM is evaluated text-only.
    pub checkpoint: Option<PathBuf>,
    /// In place of the checkpoint's vision encoder.
    pub vision: Option<String>,
    pub merge_lora: bool,
    /// Few-shot examples (default: 7 for the LLM alone, the checkpoint's own).
    pub shots: Option<usize>,
    /// Past labels on (a checkpoint trained with them keeps them on).
    pub past_labels: bool,
    pub scope: Scope,
    pub prompt_sets: Vec<u64>,
    pub decode: Decode,
    pub limit: Option<usize>,
    pub max_tokens: Option<usize>,
    pub past_source: PastSource,
    pub image_control: ImageControl,
    pub out: PathBuf,
    pub resume: bool,
}

/// The report, and with the shuffled-image control its report and the side-by-side
/// markdown (`control.md`).
pub struct EvalOutcome {
    pub report: Report,
    pub control: Option<(Report, String)>,
}

/// Evaluates as `r` asks, writing reports, predictions and charts into `r.out` (the
/// control into `r.out/shuffled-images`).
pub fn evaluate(r: &EvalRequest, p: &dyn Progress) -> Result<EvalOutcome> {
    let log = |m: &str| p.message(m);
    let device = model::device(&r.device)?;
    let dtype = model::dtype_for(&r.dtype, &device)?;
    let mut data = r.data.load(&r.split, r.seed)?;
    let stage = format!("{} {}", r.data.corpus(), data.split);
    let options = |prompt: PromptConfig, image_control: ImageControl| EvalOptions {
        prompt_sets: r.prompt_sets.clone(),
        decode: r.decode,
        limit: r.limit,
        max_tokens: r.max_tokens,
        past_source: r.past_source,
        image_control,
        ..EvalOptions::new(r.scope, prompt)
    };
    let Some(ck) = &r.checkpoint else {
        if r.image_control == ImageControl::Shuffle {
            return Err(Error::msg(
                "--image-control shuffle needs a --checkpoint that takes images",
            ));
        }
        let llm = load_llm(r.llm.as_deref(), &device, dtype, &log)?;
        let shots = r.shots.unwrap_or(7);
        let prompt = PromptConfig {
            shots,
            past_labels: r.past_labels,
            images: false,
        };
        let pool = pool_for(&r.data, shots, r.seed)?;
        let name = format!(
            "{} {} - {shots} shot{}",
            llm.kind(),
            llm_short_name(&llm.name),
            if r.past_labels { " PL" } else { "" }
        );
        let report = evaluate_to(
            &llm,
            name,
            &r.data,
            &data,
            pool.as_ref(),
            &options(prompt, ImageControl::None),
            serde_json::json!({}),
            &r.out,
            r.resume,
            &|d, t| p.progress(&stage, d, t),
        )?;
        return Ok(EvalOutcome {
            report,
            control: None,
        });
    };
    let (mut f, enc, m) = load_checkpoint(
        ck,
        &device,
        dtype,
        r.llm.as_deref(),
        r.vision.as_deref(),
        &log,
    )?;
    if r.merge_lora {
        f.llm.model.merge_lora()?;
    }
    if m.labels != data.labels {
        return Err(Error::msg(format!(
            "{}: trained for labels {:?}, the data has {:?}",
            ck.display(),
            m.labels,
            data.labels
        )));
    }
    if r.image_control == ImageControl::Shuffle && !m.kind.takes_images() {
        return Err(Error::msg(format!(
            "--image-control shuffle: a {} checkpoint takes no images",
            m.kind.label()
        )));
    }
    let failed = attach_images(&mut f, enc.as_ref(), &r.data, &mut [&mut data], &|d, t| {
        p.progress("vectors", d, t)
    })?;
    p.images_failed(&failed);
    let shots = r.shots.unwrap_or(m.prompt.shots);
    let prompt = PromptConfig {
        shots,
        past_labels: r.past_labels || m.prompt.past_labels,
        images: m.prompt.images,
    };
    let pool = pool_for(&r.data, shots, r.seed)?;
    let name = row_name(m.kind, shots, prompt.past_labels);
    let extra = serde_json::json!({"checkpoint": ck, "vision": enc.as_ref().map(|e| e.name.clone()), "epoch": m.epoch});
    let run = |control: ImageControl, out: &std::path::Path| {
        evaluate_to(
            &f,
            name.clone(),
            &r.data,
            &data,
            pool.as_ref(),
            &options(prompt.clone(), control),
            extra.clone(),
            out,
            r.resume,
            &|d, t| p.progress(&stage, d, t),
        )
    };
    let report = run(ImageControl::None, &r.out)?;
    let control = if r.image_control == ImageControl::Shuffle {
        let c = run(ImageControl::Shuffle, &r.out.join("shuffled-images"))?;
        let md = report::write_control(&r.out, &report, &c)?;
        Some((c, md))
    } else {
        None
    };
    Ok(EvalOutcome { report, control })
}
