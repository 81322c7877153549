//! Writing results: `report.json` (everything), `predictions.jsonl` (one line per
//! sample), `report.md` (a row of the paper's Table IV), `confusion.png`, and the table
//! printed to the terminal.

use crate::error::Result;
use crate::eval::{EvalResult, PredictionRecord};
use crate::metrics::{indexmap_like::OrderedMap, Confusion, LabelScore};
use crate::util::{write_atomic, write_json_atomic};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub farcer_version: String,
    /// Row name in tables, e.g. `text-only SmolLM2-135M-Instruct.Q4_1 - 7 shot`.
    pub name: String,
    pub model: serde_json::Value,
    pub data: String,
    pub split: String,
    pub scope: String,
    pub decode: String,
    pub shots: usize,
    pub past_labels: bool,
    pub images: bool,
    pub prompt_sets: Vec<u64>,
    pub labels: Vec<String>,
    /// Predictions scored (all prompt sets together).
    pub n: usize,
    /// Percent; the mean over prompt sets when there are several.
    pub accuracy: f64,
    pub weighted_f1: f64,
    pub macro_f1: f64,
    /// Outputs that were no label.
    pub invalid: usize,
    pub invalid_rate: f64,
    pub per_label: OrderedMap<LabelScore>,
    /// Summed over prompt sets.
    pub confusion: Confusion,
    /// Standard deviation over prompt sets (present with several sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<StdDev>,
    pub per_set: Vec<SetSummary>,
    /// Samples whose dialogue was cut from the front to fit the context.
    pub truncated: usize,
    pub seconds: f64,
    pub seconds_per_sample: f64,
    /// Anything else worth keeping (seed, device, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// `shuffle` for the shuffled-image control (see [`crate::eval::ImageControl`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_control: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StdDev {
    pub accuracy: f64,
    pub weighted_f1: f64,
    pub macro_f1: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSummary {
    pub prompt_set: u64,
    pub n: usize,
    pub accuracy: f64,
    pub weighted_f1: f64,
    pub macro_f1: f64,
    pub invalid: usize,
    pub prefix_tokens: usize,
    pub excluded_dialogues: usize,
}

/// What describes the run, beyond the scores.
pub struct RunInfo<'a> {
    pub name: String,
    pub model: serde_json::Value,
    pub data: String,
    pub split: &'a str,
    pub scope: String,
    pub decode: String,
    pub shots: usize,
    pub past_labels: bool,
    pub images: bool,
    pub labels: &'a [String],
    pub extra: serde_json::Value,
    pub image_control: crate::eval::ImageControl,
}

pub fn build(info: RunInfo, r: &EvalResult) -> Report {
    let sets = &r.sets;
    let k = sets.len().max(1) as f64;
    let spread = r.spread();
    let first = &sets[0].scores;
    let per_label = OrderedMap(
        first
            .per_label
            .iter()
            .map(|(l, s0)| {
                let avg = |f: &dyn Fn(&LabelScore) -> f64| {
                    sets.iter()
                        .map(|s| f(s.scores.per_label.get(l).unwrap()))
                        .sum::<f64>()
                        / k
                };
                (
                    l.clone(),
                    LabelScore {
                        precision: avg(&|s| s.precision),
                        recall: avg(&|s| s.recall),
                        f1: avg(&|s| s.f1),
                        support: s0.support,
                    },
                )
            })
            .collect(),
    );
    let mut confusion = first.confusion.clone();
    for s in &sets[1..] {
        for (row, srow) in confusion.matrix.iter_mut().zip(&s.scores.confusion.matrix) {
            for (a, b) in row.iter_mut().zip(srow) {
                *a += b;
            }
        }
    }
    let n: usize = sets.iter().map(|s| s.scores.n).sum();
    let invalid: usize = sets.iter().map(|s| s.scores.invalid).sum();
    Report {
        farcer_version: env!("CARGO_PKG_VERSION").into(),
        name: info.name,
        model: info.model,
        data: info.data,
        split: info.split.into(),
        scope: info.scope,
        decode: info.decode,
        shots: info.shots,
        past_labels: info.past_labels,
        images: info.images,
        prompt_sets: sets.iter().map(|s| s.prompt_set).collect(),
        labels: info.labels.to_vec(),
        n,
        accuracy: spread.accuracy.0,
        weighted_f1: spread.weighted_f1.0,
        macro_f1: spread.macro_f1.0,
        invalid,
        invalid_rate: if n > 0 {
            100.0 * invalid as f64 / n as f64
        } else {
            0.0
        },
        per_label,
        confusion,
        std: (sets.len() > 1).then_some(StdDev {
            accuracy: spread.accuracy.1,
            weighted_f1: spread.weighted_f1.1,
            macro_f1: spread.macro_f1.1,
        }),
        per_set: sets
            .iter()
            .map(|s| SetSummary {
                prompt_set: s.prompt_set,
                n: s.scores.n,
                accuracy: s.scores.accuracy,
                weighted_f1: s.scores.weighted_f1,
                macro_f1: s.scores.macro_f1,
                invalid: s.scores.invalid,
                prefix_tokens: s.prefix_tokens,
                excluded_dialogues: s.excluded_dialogues,
            })
            .collect(),
        truncated: r.truncated,
        seconds: r.seconds,
        seconds_per_sample: if r.samples > 0 {
            r.seconds / r.samples as f64
        } else {
            0.0
        },
        extra: info.extra,
        image_control: (info.image_control != crate::eval::ImageControl::None)
            .then(|| info.image_control.to_string()),
    }
}

fn fmt_score(mean: f64, std: Option<f64>) -> String {
    match std {
        Some(s) => format!("{mean:.2} ± {s:.2}"),
        None => format!("{mean:.2}"),
    }
}

/// The header of a Table IV-style table for these labels.
pub fn table_header(labels: &[String]) -> String {
    let mut h = String::from("| Model |");
    let mut sep = String::from("|---|");
    for l in labels {
        h.push_str(&format!(" {} |", capitalise(l)));
        sep.push_str("---:|");
    }
    h.push_str(" Accuracy | w-F1 |");
    sep.push_str("---:|---:|");
    format!("{h}\n{sep}")
}

pub fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// One Table IV row: per-label F1, accuracy and weighted F1.
pub fn table_row(r: &Report) -> String {
    let mut row = format!("| {} |", r.name);
    for (_, s) in r.per_label.iter() {
        row.push_str(&format!(" {:.2} |", s.f1));
    }
    let sd = r.std.as_ref();
    row.push_str(&format!(
        " {} | {} |",
        fmt_score(r.accuracy, sd.map(|s| s.accuracy)),
        fmt_score(r.weighted_f1, sd.map(|s| s.weighted_f1))
    ));
    row
}

pub fn markdown(r: &Report) -> String {
    let mut s = format!("# {}\n\n", r.name);
    s.push_str(&format!(
        "Data `{}`, split `{}`, scope `{}`, {}-shot, decoder `{}`, prompt set(s) {:?}{}.\n\n",
        r.data,
        r.split,
        r.scope,
        r.shots,
        r.decode,
        r.prompt_sets,
        if r.past_labels { ", past labels" } else { "" }
    ));
    s.push_str("Per-label F1, accuracy and weighted F1 (percent):\n\n");
    s.push_str(&table_header(&r.labels));
    s.push('\n');
    s.push_str(&table_row(r));
    s.push_str(&format!(
        "\n\nn = {} predictions, macro F1 {:.2}, invalid outputs {} ({:.1}%), dialogues cut to fit: {}, {:.3} s per sample.\n",
        r.n, r.macro_f1, r.invalid, r.invalid_rate, r.truncated, r.seconds_per_sample
    ));
    if r.per_set.len() > 1 {
        s.push_str("\n| Prompt set | n | Accuracy | w-F1 | Macro F1 | Invalid |\n|---:|---:|---:|---:|---:|---:|\n");
        for p in &r.per_set {
            s.push_str(&format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {} |\n",
                p.prompt_set, p.n, p.accuracy, p.weighted_f1, p.macro_f1, p.invalid
            ));
        }
    }
    s
}

/// A plain-text table for the terminal.
pub fn terminal_table(r: &Report) -> String {
    let mut s = format!("{}\n", r.name);
    s.push_str(&format!(
        "{:<14} {:>9} {:>9} {:>9} {:>8}\n",
        "label", "precision", "recall", "F1", "support"
    ));
    for (l, x) in r.per_label.iter() {
        s.push_str(&format!(
            "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>8}\n",
            l, x.precision, x.recall, x.f1, x.support
        ));
    }
    let sd = r.std.as_ref();
    s.push_str(&format!(
        "accuracy {}  weighted F1 {}  macro F1 {}  n {}  invalid {} ({:.1}%)\n",
        fmt_score(r.accuracy, sd.map(|s| s.accuracy)),
        fmt_score(r.weighted_f1, sd.map(|s| s.weighted_f1)),
        fmt_score(r.macro_f1, sd.map(|s| s.macro_f1)),
        r.n,
        r.invalid,
        r.invalid_rate
    ));
    s
}

/// Writes `predictions.jsonl`, `report.md`, `confusion.png` and, last, `report.json` to
/// `out`: each file atomically, so a folder with `report.json` is complete.
/// Real images beside the shuffled-image control: `control.json` and `control.md` in
/// `out` (the real evaluation's folder), and the markdown.
pub fn write_control(out: &Path, real: &Report, control: &Report) -> Result<String> {
    let diff = |a: f64, b: f64| a - b;
    let json = serde_json::json!({
        "name": real.name,
        "split": real.split,
        "scope": real.scope,
        "real": {"weighted_f1": real.weighted_f1, "accuracy": real.accuracy, "macro_f1": real.macro_f1},
        "shuffled": {"weighted_f1": control.weighted_f1, "accuracy": control.accuracy, "macro_f1": control.macro_f1},
        "images_add": {
            "weighted_f1": diff(real.weighted_f1, control.weighted_f1),
            "accuracy": diff(real.accuracy, control.accuracy),
            "macro_f1": diff(real.macro_f1, control.macro_f1),
        },
    });
    let md = format!(
        "# What the images add: {}\n\nSplit `{}`, scope `{}`, {} samples. The control gives every image slot the image of another utterance of the split, drawn at random; only the difference is what the images add.\n\n| images | weighted F1 | accuracy | macro F1 |\n|---|---:|---:|---:|\n| real | {:.2} | {:.2} | {:.2} |\n| shuffled | {:.2} | {:.2} | {:.2} |\n| **real - shuffled** | **{:+.2}** | **{:+.2}** | **{:+.2}** |\n",
        real.name,
        real.split,
        real.scope,
        real.n,
        real.weighted_f1,
        real.accuracy,
        real.macro_f1,
        control.weighted_f1,
        control.accuracy,
        control.macro_f1,
        diff(real.weighted_f1, control.weighted_f1),
        diff(real.accuracy, control.accuracy),
        diff(real.macro_f1, control.macro_f1),
    );
    write_json_atomic(&out.join("control.json"), &json)?;
    write_atomic(&out.join("control.md"), md.as_bytes())?;
    Ok(md)
}

pub fn write_all(out: &Path, r: &Report, predictions: &[PredictionRecord]) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let mut lines = String::new();
    for p in predictions {
        lines.push_str(&serde_json::to_string(p).expect("prediction serialises"));
        lines.push('\n');
    }
    write_atomic(&out.join("predictions.jsonl"), lines.as_bytes())?;
    write_atomic(&out.join("report.md"), markdown(r).as_bytes())?;
    let rows: Vec<String> = r.labels.clone();
    crate::plot::confusion_png(
        &out.join("confusion.png"),
        &format!("{} (w-F1 {:.1})", r.name, r.weighted_f1),
        &rows,
        &r.confusion.labels,
        &r.confusion.matrix,
    )?;
    write_json_atomic(&out.join("report.json"), r)
}
