//! Experiment grids (`farcer grid`) and the Table IV report (`farcer report`).
//!
//! A grid config names the data, the models (text-only, base, three-layer, finetuned),
//! shots, past labels, scopes and seeds; it expands to runs that share the cached image
//! vectors and skips what is already complete, so an interrupted grid picks up where it
//! stopped. The report gathers every `report.json` under a folder into the paper's table
//! layout: per-label F1, accuracy and weighted F1, one section per data/split/scope, the
//! best score of each column in bold, and mean ± spread over seeds.

use crate::data::Scope;
use crate::decode::Decode;
use crate::error::{Error, IoContext, Result};
use crate::eval::ImageControl;
use crate::farcer::Kind;
use crate::report::Report;
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model row of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum GridModel {
    TextOnly,
    Base,
    ThreeLayer,
    Finetuned,
    /// The text-only LLM fine-tuned with LoRA: what the images add is the difference
    /// from the fine-tuned FARCER row.
    TextLora,
}

impl GridModel {
    pub fn kind(self) -> Option<Kind> {
        match self {
            GridModel::TextOnly => None,
            GridModel::Base => Some(Kind::Base),
            GridModel::ThreeLayer => Some(Kind::ThreeLayer),
            GridModel::Finetuned => Some(Kind::Finetuned),
            GridModel::TextLora => Some(Kind::TextLora),
        }
    }
    pub fn slug(self) -> &'static str {
        match self {
            GridModel::TextOnly => "text-only",
            GridModel::Base => "base",
            GridModel::ThreeLayer => "three-layer",
            GridModel::Finetuned => "finetuned",
            GridModel::TextLora => "text-lora",
        }
    }
}

/// `configs/table4-*.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    pub data: String,
    #[serde(default = "default_llm")]
    pub llm: String,
    #[serde(default = "default_vision")]
    pub vision: String,
    #[serde(default = "default_models")]
    pub models: Vec<GridModel>,
    #[serde(default = "default_shots")]
    pub shots: Vec<usize>,
    #[serde(default = "default_pl")]
    pub past_labels: Vec<bool>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<Scope>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default = "default_decode")]
    pub decode: Decode,
    /// Evaluate the first N samples (0: all).
    #[serde(default)]
    pub limit: usize,
    #[serde(default = "default_device")]
    pub device: String,
    /// The frozen models' dtype (see the training config's `dtype`).
    #[serde(default = "crate::train::default_dtype")]
    pub dtype: String,
    /// The shuffled-image control for every row that takes images (default `shuffle`):
    /// the table gets its weighted F1 beside the real images'.
    #[serde(default = "default_control")]
    pub image_control: ImageControl,
    /// Per-kind training settings applied to every trained run.
    #[serde(default)]
    pub train: GridTrain,
    /// IEMOCAP runs start from these checkpoints (kind -> folder), as the paper did.
    #[serde(default)]
    pub init: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridTrain {
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub limit_train: usize,
    #[serde(default)]
    pub limit_val: usize,
    #[serde(default)]
    pub patience: Option<usize>,
    /// Learning rates by kind (default: the paper's).
    #[serde(default)]
    pub lr: BTreeMap<String, f64>,
}

fn default_control() -> ImageControl {
    ImageControl::Shuffle
}
fn default_llm() -> String {
    "default".into()
}
fn default_vision() -> String {
    crate::vision::DEFAULT_VISION.into()
}
fn default_models() -> Vec<GridModel> {
    vec![
        GridModel::TextOnly,
        GridModel::Base,
        GridModel::ThreeLayer,
        GridModel::Finetuned,
        GridModel::TextLora,
    ]
}
fn default_shots() -> Vec<usize> {
    vec![3, 7]
}
fn default_pl() -> Vec<bool> {
    vec![false, true]
}
fn default_scopes() -> Vec<Scope> {
    vec![Scope::Last, Scope::All]
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_split() -> String {
    "test".into()
}
fn default_decode() -> Decode {
    Decode::Constrained
}
fn default_device() -> String {
    "cpu".into()
}

impl GridConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        toml::from_str(&text).map_err(|e| Error::input(path.display().to_string(), e.to_string()))
    }
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GridRun {
    pub model: GridModel,
    pub shots: usize,
    pub past_labels: bool,
    pub seed: u64,
    /// Folder of the run (training, if any, and its evaluations).
    pub dir: PathBuf,
}

impl GridRun {
    pub fn name(&self) -> String {
        format!(
            "{}-{}shot{}-seed{}",
            self.model.slug(),
            self.shots,
            if self.past_labels { "-pl" } else { "" },
            self.seed
        )
    }

    /// Where the evaluation of a scope goes.
    pub fn eval_dir(&self, split: &str, scope: Scope) -> PathBuf {
        self.dir.join(format!("{split}-{scope}"))
    }

    /// Where its shuffled-image control goes.
    pub fn control_dir(&self, split: &str, scope: Scope) -> PathBuf {
        self.dir.join(format!("{split}-{scope}-shuffled-images"))
    }

    /// Whether this cell runs the shuffled-image control.
    pub fn has_control(&self, g: &GridConfig) -> bool {
        g.image_control == ImageControl::Shuffle
            && self.model.kind().is_some_and(|k| k.takes_images())
    }

    /// The training config of this cell.
    pub fn train_config(&self, g: &GridConfig) -> Option<TrainConfig> {
        let kind = self.model.kind()?;
        let mut c = TrainConfig::new(kind, &g.data);
        c.llm = g.llm.clone();
        c.vision = g.vision.clone();
        c.device = g.device.clone();
        c.seed = self.seed;
        c.dtype = g.dtype.clone();
        c.prompt.shots = self.shots;
        c.prompt.past_labels = self.past_labels;
        if kind.has_lora() {
            c.optim.epochs = 10;
        }
        if let Some(e) = g.train.epochs {
            c.optim.epochs = e;
        }
        if let Some(p) = g.train.patience {
            c.optim.patience = p;
        }
        if let Some(lr) = g.train.lr.get(self.model.slug()) {
            c.optim.lr = Some(*lr);
        }
        c.run.limit_train = g.train.limit_train;
        c.run.limit_val = g.train.limit_val;
        c.init = g.init.get(self.model.slug()).cloned();
        Some(c)
    }
}

/// All cells of a grid, in table order.
pub fn expand(g: &GridConfig, out: &Path) -> Vec<GridRun> {
    let mut runs = Vec::new();
    for &pl in &g.past_labels {
        for &model in &g.models {
            for &shots in &g.shots {
                for &seed in &g.seeds {
                    let mut r = GridRun {
                        model,
                        shots,
                        past_labels: pl,
                        seed,
                        dir: PathBuf::new(),
                    };
                    r.dir = out.join(r.name());
                    runs.push(r);
                }
            }
        }
    }
    runs
}

/// A row of the gathered table: a model's scores, averaged over the seeds found.
#[derive(Debug, Clone, Serialize)]
pub struct TableRow {
    pub name: String,
    pub runs: usize,
    pub per_label: Vec<(String, f64, f64)>,
    pub accuracy: (f64, f64),
    pub weighted_f1: (f64, f64),
    /// Weighted F1 of the shuffled-image control, where it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_weighted_f1: Option<(f64, f64)>,
    pub n: usize,
    pub dirs: Vec<PathBuf>,
}

/// A section of the table: one data / split / scope.
#[derive(Debug, Clone, Serialize)]
pub struct TableSection {
    pub data: String,
    pub split: String,
    pub scope: String,
    pub labels: Vec<String>,
    pub rows: Vec<TableRow>,
}

/// Every `report.json` below `dir`.
pub fn find_reports(dir: &Path) -> Result<Vec<(PathBuf, Report)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .at(&d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "report.json") {
                let text = std::fs::read_to_string(&p).at(&p)?;
                let r: Report = serde_json::from_str(&text)
                    .map_err(|e| Error::input(p.display().to_string(), e.to_string()))?;
                out.push((p.parent().unwrap().to_path_buf(), r));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn row_order(name: &str) -> (usize, bool, usize, String) {
    let l = name.to_lowercase();
    let model = if l.starts_with("text-only fine-tuned") {
        4
    } else if l.contains("text-only") {
        0
    } else if l.starts_with("base") {
        1
    } else if l.starts_with("three") {
        2
    } else if l.starts_with("fine") {
        3
    } else {
        5
    };
    let shots = l
        .split(" - ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (model, l.contains(" pl"), shots, l)
}

/// (data, split, scope).
type SectionKey = (String, String, String);
/// Row name -> the reports of that row (one per seed).
type Rows<'a> = BTreeMap<String, Vec<(PathBuf, &'a Report)>>;

/// Groups reports into sections and rows (reports of the same row and different seeds
/// are averaged: mean and standard deviation).
pub fn gather(reports: &[(PathBuf, Report)]) -> Vec<TableSection> {
    let mut sections: BTreeMap<SectionKey, Rows> = BTreeMap::new();
    // Controls are not rows of their own: they go beside the row they control.
    let mut controls: BTreeMap<(SectionKey, String), Vec<f64>> = BTreeMap::new();
    for (dir, r) in reports {
        if r.image_control.is_some() {
            controls
                .entry((
                    (r.data.clone(), r.split.clone(), r.scope.clone()),
                    r.name.clone(),
                ))
                .or_default()
                .push(r.weighted_f1);
            continue;
        }
        sections
            .entry((r.data.clone(), r.split.clone(), r.scope.clone()))
            .or_default()
            .entry(r.name.clone())
            .or_default()
            .push((dir.clone(), r));
    }
    let mut out = Vec::new();
    for (key, rows) in sections {
        let control = |name: &str| {
            controls
                .get(&(key.clone(), name.to_string()))
                .map(|v| crate::util::mean_std(v))
        };
        let (data, split, scope) = key.clone();
        let labels = rows
            .values()
            .next()
            .map(|v| v[0].1.labels.clone())
            .unwrap_or_default();
        let mut table_rows: Vec<TableRow> = rows
            .into_iter()
            .map(|(name, rs)| {
                let ms = |f: &dyn Fn(&Report) -> f64| {
                    crate::util::mean_std(&rs.iter().map(|(_, r)| f(r)).collect::<Vec<_>>())
                };
                let per_label = labels
                    .iter()
                    .map(|l| {
                        let (m, s) = ms(&|r| r.per_label.get(l).map(|x| x.f1).unwrap_or(0.0));
                        (l.clone(), m, s)
                    })
                    .collect();
                TableRow {
                    control_weighted_f1: control(&name),
                    name,
                    runs: rs.len(),
                    per_label,
                    accuracy: ms(&|r| r.accuracy),
                    weighted_f1: ms(&|r| r.weighted_f1),
                    n: rs[0].1.n,
                    dirs: rs.iter().map(|(d, _)| d.clone()).collect(),
                }
            })
            .collect();
        table_rows.sort_by_key(|r| row_order(&r.name));
        out.push(TableSection {
            data,
            split,
            scope,
            labels,
            rows: table_rows,
        });
    }
    out
}

fn cell(m: f64, s: f64, runs: usize, best: bool) -> String {
    let v = if runs > 1 {
        format!("{m:.2} ± {s:.2}")
    } else {
        format!("{m:.2}")
    };
    if best {
        format!("**{v}**")
    } else {
        v
    }
}

/// The table as markdown: one section per data / split / scope, best per column bold.
pub fn markdown(sections: &[TableSection]) -> String {
    let mut s = String::from("# Results (Table IV layout)\n\nPer-label F1, accuracy and weighted F1 in percent; the best of each column in bold; with several seeds, mean ± standard deviation. Rows that take images also show the weighted F1 of the control in which every image is swapped for that of another utterance drawn at random: only the difference is what the images add.\n");
    for sec in sections {
        s.push_str(&format!(
            "\n## {} — split `{}`, scope `{}`\n\n",
            sec.data, sec.split, sec.scope
        ));
        let with_control = sec.rows.iter().any(|r| r.control_weighted_f1.is_some());
        let header = crate::report::table_header(&sec.labels);
        if with_control {
            let (h, sep) = header.split_once('\n').expect("two lines");
            s.push_str(&format!("{h} w-F1, shuffled images |\n{sep}---:|"));
        } else {
            s.push_str(&header);
        }
        s.push('\n');
        // The best of a column; a column where nobody scores gets no bold.
        let best = |f: &dyn Fn(&TableRow) -> f64| {
            let b = sec.rows.iter().map(f).fold(f64::MIN, f64::max);
            if b > 0.0 {
                b
            } else {
                f64::INFINITY
            }
        };
        let best_labels: Vec<f64> = (0..sec.labels.len())
            .map(|i| best(&|r| r.per_label[i].1))
            .collect();
        let best_acc = best(&|r| r.accuracy.0);
        let best_f1 = best(&|r| r.weighted_f1.0);
        for r in &sec.rows {
            let mut line = format!(
                "| {}{} |",
                r.name,
                if r.runs > 1 {
                    format!(" ({} seeds)", r.runs)
                } else {
                    String::new()
                }
            );
            for (i, (_, m, sd)) in r.per_label.iter().enumerate() {
                line.push_str(&format!(
                    " {} |",
                    cell(*m, *sd, r.runs, *m >= best_labels[i] && sec.rows.len() > 1)
                ));
            }
            line.push_str(&format!(
                " {} | {} |\n",
                cell(
                    r.accuracy.0,
                    r.accuracy.1,
                    r.runs,
                    r.accuracy.0 >= best_acc && sec.rows.len() > 1
                ),
                cell(
                    r.weighted_f1.0,
                    r.weighted_f1.1,
                    r.runs,
                    r.weighted_f1.0 >= best_f1 && sec.rows.len() > 1
                )
            ));
            if with_control {
                line.pop();
                line.push_str(&match r.control_weighted_f1 {
                    Some((m, sd)) => format!(" {} |\n", cell(m, sd, r.runs, false)),
                    None => " |\n".to_string(),
                });
            }
            s.push_str(&line);
        }
        s.push_str("\nConfusion matrices: ");
        let links: Vec<String> = sec
            .rows
            .iter()
            .flat_map(|r| {
                r.dirs
                    .iter()
                    .map(move |d| format!("[{}]({})", r.name, d.join("confusion.png").display()))
            })
            .collect();
        s.push_str(&links.join(", "));
        s.push('\n');
    }
    s
}

/// Writes `report.md` and `table.json` into `dir` from every report below it.
pub fn write_report(dir: &Path) -> Result<(String, usize)> {
    let reports = find_reports(dir)?;
    if reports.is_empty() {
        return Err(Error::msg(format!(
            "no report.json under {}",
            dir.display()
        )));
    }
    let sections = gather(&reports);
    let md = markdown(&sections);
    crate::util::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    crate::util::write_json_atomic(&dir.join("table.json"), &sections)?;
    Ok((md, reports.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, wf1: f64, control: bool) -> Report {
        serde_json::from_value(serde_json::json!({
            "farcer_version": "t", "name": name, "model": {}, "data": "meld:x", "split": "test",
            "scope": "last", "decode": "constrained", "shots": 3, "past_labels": false,
            "images": true, "prompt_sets": [0], "labels": ["a", "b"], "n": 10,
            "accuracy": wf1, "weighted_f1": wf1, "macro_f1": wf1, "invalid": 0,
            "invalid_rate": 0.0, "per_label": {}, "confusion": {"labels": ["a", "b"], "matrix": []},
            "per_set": [], "truncated": 0, "seconds": 1.0, "seconds_per_sample": 0.1,
            "image_control": if control { Some("shuffle") } else { None },
        }))
        .unwrap()
    }

    /// A shuffled-image control is no row of its own: its weighted F1 stands in the
    /// column beside the row it controls; rows without one leave the cell empty.
    #[test]
    fn controls_go_beside_their_rows() {
        let reports = vec![
            (
                PathBuf::from("b"),
                report("Base FARCER - 3 shot", 50.0, false),
            ),
            (
                PathBuf::from("b-c"),
                report("Base FARCER - 3 shot", 41.5, true),
            ),
            (
                PathBuf::from("t"),
                report("Text-only x - 3 shot", 30.0, false),
            ),
        ];
        let sections = gather(&reports);
        assert_eq!(sections.len(), 1);
        let rows = &sections[0].rows;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "Text-only x - 3 shot");
        assert_eq!(rows[0].control_weighted_f1, None);
        assert_eq!(rows[1].control_weighted_f1, Some((41.5, 0.0)));
        let md = markdown(&sections);
        assert!(md.contains("| w-F1, shuffled images |"), "{md}");
        assert!(md.contains("| **50.00** | 41.50 |"), "{md}");
        assert!(md.contains("| 30.00 | |"), "{md}");
    }

    #[test]
    fn grid_expands_in_table_order_and_configures_runs() {
        let g: GridConfig = toml::from_str("data = \"demo\"\nmodels = [\"text-only\", \"finetuned\"]\nshots = [3]\nseeds = [0, 1]\n[train]\nepochs = 2\n").unwrap();
        let runs = expand(&g, Path::new("/o"));
        assert_eq!(runs.len(), 2 * 2 * 2); // models x past labels x seeds (one shot count)
        assert_eq!(runs[0].name(), "text-only-3shot-seed0");
        assert!(runs.iter().any(|r| r.name() == "finetuned-3shot-pl-seed1"));
        assert!(runs[0].train_config(&g).is_none());
        let c = runs
            .iter()
            .find(|r| r.model == GridModel::Finetuned)
            .unwrap()
            .train_config(&g)
            .unwrap();
        assert_eq!(
            (c.optim.epochs, c.lora.is_some(), c.prompt.shots),
            (2, true, 3)
        );
    }
}
