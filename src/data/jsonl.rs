//! Dialogues of one's own, as JSON lines (one dialogue per line):
//!
//! ```json
//! {"id": "d1", "utterances": [{"speaker": "Ann", "text": "Hi!", "image": "img/1.png", "label": "joy"}]}
//! ```
//!
//! Per utterance: `speaker`, `text` (required); `label`, `image`, `clip`, `start`, `end`,
//! `id` (optional). Relative paths resolve against the file's folder; `image` wins over
//! `clip`; a clip with no times gives its middle frame. A file holding one plain JSON
//! object (possibly over several lines) is read as a single dialogue.

use super::{Dataset, Dialogue, Utterance};
use crate::error::{Error, IoContext, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDialogue {
    #[serde(default)]
    id: Option<String>,
    utterances: Vec<RawUtterance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUtterance {
    #[serde(default)]
    id: Option<String>,
    speaker: String,
    text: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    image: Option<PathBuf>,
    #[serde(default)]
    clip: Option<PathBuf>,
    #[serde(default)]
    start: Option<f64>,
    #[serde(default)]
    end: Option<f64>,
}

/// Reads dialogues from a JSON-lines file (or a single JSON object).
pub fn read(path: &Path) -> Result<Vec<Dialogue>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    parse(&text, &base, &path.display().to_string())
}

/// Parses JSON lines; `base` resolves relative paths, `name` is used in messages.
pub fn parse(text: &str, base: &Path, name: &str) -> Result<Vec<Dialogue>> {
    let trimmed = text.trim_start();
    // A single object spread over several lines (pretty-printed) is one dialogue.
    if trimmed.starts_with('{') && text.trim().lines().count() > 1 {
        if let Ok(raw) = serde_json::from_str::<RawDialogue>(text) {
            return Ok(vec![convert(raw, 0, base, name)?]);
        }
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("{name}:{line_no}");
        let raw: RawDialogue =
            serde_json::from_str(line).map_err(|e| Error::input(&loc, e.to_string()))?;
        out.push(convert(raw, out.len(), base, &loc)?);
    }
    let mut seen = std::collections::HashSet::new();
    for d in &out {
        if !seen.insert(d.id.clone()) {
            return Err(Error::input(
                name,
                format!("dialogue id `{}` appears twice", d.id),
            ));
        }
    }
    Ok(out)
}

fn convert(raw: RawDialogue, index: usize, base: &Path, loc: &str) -> Result<Dialogue> {
    if raw.utterances.is_empty() {
        return Err(Error::input(loc, "dialogue has no utterances"));
    }
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut utterances = Vec::with_capacity(raw.utterances.len());
    for (j, u) in raw.utterances.into_iter().enumerate() {
        if u.speaker.trim().is_empty() {
            return Err(Error::input(loc, format!("utterance {j}: empty `speaker`")));
        }
        if let (Some(s), Some(e)) = (u.start, u.end) {
            if !(s >= 0.0 && e >= s) {
                return Err(Error::input(
                    loc,
                    format!("utterance {j}: need 0 <= start <= end, got {s}..{e}"),
                ));
            }
        }
        utterances.push(Utterance {
            id: u.id.unwrap_or_else(|| j.to_string()),
            speaker: u.speaker.trim().to_string(),
            text: u.text.trim().to_string(),
            label: u.label.map(|l| l.trim().to_lowercase()),
            image: u.image.map(resolve),
            clip: u.clip.map(resolve),
            start: u.start,
            end: u.end,
        });
    }
    Ok(Dialogue {
        id: raw.id.unwrap_or_else(|| index.to_string()),
        utterances,
    })
}

/// Serialises dialogues back to JSON lines (paths as given).
pub fn to_jsonl(dialogues: &[Dialogue]) -> String {
    let mut s = String::new();
    for d in dialogues {
        s.push_str(&serde_json::to_string(d).expect("dialogue serialises"));
        s.push('\n');
    }
    s
}

/// Labels for a JSON-lines dataset: from `labels.txt` beside the files if present, else
/// every label seen, most frequent first (ties alphabetical), so the order is fixed.
pub fn infer_labels(dialogues: &[Dialogue]) -> Vec<String> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for d in dialogues {
        for u in &d.utterances {
            if let Some(l) = &u.label {
                *counts.entry(l.clone()).or_default() += 1;
            }
        }
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|(l, _)| l).collect()
}

/// A JSON-lines dataset: `path` is a file (one split) or a folder of `{split}.jsonl`.
pub fn load(path: &Path, split: &str) -> Result<Dataset> {
    let (file, labels_file) = if path.is_dir() {
        (path.join(format!("{split}.jsonl")), path.join("labels.txt"))
    } else {
        (path.to_path_buf(), path.with_file_name("labels.txt"))
    };
    let dialogues = read(&file)?;
    let labels = if labels_file.is_file() {
        std::fs::read_to_string(&labels_file)
            .at(&labels_file)?
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect()
    } else if path.is_dir() {
        // Use the training split's labels so every split shares one order.
        let train = path.join("train.jsonl");
        let src = if train.is_file() {
            read(&train)?
        } else {
            dialogues.clone()
        };
        infer_labels(&src)
    } else {
        infer_labels(&dialogues)
    };
    Ok(Dataset {
        corpus: "jsonl".into(),
        split: split.into(),
        labels,
        dialogues,
        max_context: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_resolves_paths_and_names_bad_lines() {
        let text = r#"{"id": "a", "utterances": [{"speaker": "Ann", "text": "Hi", "image": "i/1.png", "label": "Joy"}]}

{"utterances": [{"speaker": "Bob", "text": "Yo", "clip": "/abs/c.mp4", "start": 1.0, "end": 2.0}]}
"#;
        let d = parse(text, Path::new("/data"), "f.jsonl").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].utterances[0].image.as_deref(),
            Some(Path::new("/data/i/1.png"))
        );
        assert_eq!(d[0].utterances[0].label.as_deref(), Some("joy"));
        assert_eq!(d[1].id, "1");
        assert_eq!(
            d[1].utterances[0].clip.as_deref(),
            Some(Path::new("/abs/c.mp4"))
        );

        let bad = "{\"id\": \"a\", \"utterances\": []}\n";
        let e = parse(bad, Path::new("."), "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.jsonl:1"), "{e}");
        let bad = "{\"id\": \"a\", \"utterances\": [{\"speaker\": \"A\"}]}\n";
        let e = parse(bad, Path::new("."), "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.jsonl:1") && e.contains("text"), "{e}");
    }

    #[test]
    fn single_pretty_object_is_one_dialogue() {
        let text =
            "{\n \"id\": \"x\",\n \"utterances\": [{\"speaker\": \"A\", \"text\": \"hm\"}]\n}\n";
        let d = parse(text, Path::new("."), "d.json").unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "x");
    }

    #[test]
    fn round_trip() {
        let text =
            r#"{"id":"a","utterances":[{"id":"0","speaker":"Ann","text":"Hi","label":"joy"}]}"#;
        let d = parse(text, Path::new("."), "f").unwrap();
        assert_eq!(parse(&to_jsonl(&d), Path::new("."), "g").unwrap(), d);
    }
}
