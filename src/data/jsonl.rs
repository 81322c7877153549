//! Dialogues of one's own, as JSON lines (one dialogue per line):
//!
//! ```json
//! {"id": "d1", "utterances": [{"speaker": "Ann", "text": "Hi!", "image": "img/1.png", "label": "joy"}]}
//! ```
//!
//! Per utterance: `speaker`, `text` (required); `label`, `image`, `clip`, `start`, `end`,
//! `id` (optional). Relative paths resolve against the file's folder; `image` wins over
//! `clip`; a clip with no times gives its middle frame. A dialogue may also be one
//! pretty-printed object over several lines. A split without any dialogue is an error, and
//! so is a `labels.txt` that is empty or misses a label the data uses.

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

/// Reads dialogues from standard input (`farcer predict -`); relative paths resolve
/// against the working directory.
pub fn read_stdin() -> Result<Vec<Dialogue>> {
    use std::io::Read;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .at("<standard input>")?;
    let base = std::env::current_dir().at(".")?;
    parse(&text, &base, "<standard input>")
}

/// Parses JSON lines; `base` resolves relative paths, `name` is used in messages.
///
/// The text is read as a stream of JSON objects, so one object per line and a single
/// pretty-printed object over several lines are both read, and a syntax error is reported
/// at its real `name:line:column`. An input without any dialogue is an error.
pub fn parse(text: &str, base: &Path, name: &str) -> Result<Vec<Dialogue>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<RawDialogue>();
    // Lines counted so far, up to byte `counted` (counting once keeps this linear).
    let (mut line, mut counted) = (1, 0);
    loop {
        let before = stream.byte_offset();
        let raw = match stream.next() {
            None => break,
            Some(Ok(raw)) => raw,
            Some(Err(e)) => {
                return Err(Error::input(
                    format!("{name}:{}:{}", e.line(), e.column()),
                    json_message(&e),
                ))
            }
        };
        // The line the object starts on (after the whitespace before it).
        let start = before + (text[before..].len() - text[before..].trim_start().len());
        line += text[counted..start].matches('\n').count();
        counted = start;
        let loc = format!("{name}:{line}");
        out.push(convert(raw, out.len(), base, &loc)?);
    }
    if out.is_empty() {
        return Err(Error::input(
            name,
            "no dialogues: the input is empty (expected one JSON object per line: {\"utterances\": [{\"speaker\": ..., \"text\": ...}]})",
        ));
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

/// serde_json's message without its own " at line L column C" (the location has them).
fn json_message(e: &serde_json::Error) -> String {
    let m = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    m.strip_suffix(&suffix).map(String::from).unwrap_or(m)
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

/// Refuses data whose utterances carry a label outside `labels` (those utterances would
/// silently never be scored), naming the labels, where they are used and `source`.
fn check_labels(
    dialogues: &[Dialogue],
    labels: &[String],
    file: &Path,
    source: &str,
    hint: &str,
) -> Result<()> {
    let mut missing: std::collections::BTreeMap<&str, usize> = Default::default();
    for u in dialogues.iter().flat_map(|d| &d.utterances) {
        if let Some(l) = u.label.as_deref() {
            if !labels.iter().any(|x| x == l) {
                *missing.entry(l).or_default() += 1;
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(l, n)| format!("`{l}` ({n} utterance{})", if *n == 1 { "" } else { "s" }))
        .collect();
    Err(Error::input(
        source,
        format!(
            "misses labels used in {}: {} (their utterances would never be scored); {hint}",
            file.display(),
            list.join(", "),
        ),
    ))
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
        let labels: Vec<String> = std::fs::read_to_string(&labels_file)
            .at(&labels_file)?
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect();
        if labels.is_empty() {
            return Err(Error::input(
                labels_file.display().to_string(),
                "the labels file is empty: list the target labels, one per line",
            ));
        }
        check_labels(
            &dialogues,
            &labels,
            &file,
            &labels_file.display().to_string(),
            "add them to it, or remove them from the data",
        )?;
        labels
    } else if path.is_dir() {
        // Use the training split's labels so every split shares one order.
        let train = path.join("train.jsonl");
        if train.is_file() && train != file {
            let labels = infer_labels(&read(&train)?);
            check_labels(
                &dialogues,
                &labels,
                &file,
                &format!("the labels of {} (no labels.txt)", train.display()),
                "write a labels.txt beside the splits listing every label, one per line",
            )?;
            labels
        } else {
            infer_labels(&dialogues)
        }
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
    fn syntax_errors_name_their_real_line_and_column() {
        // A pretty-printed dialogue with a missing comma on line 4.
        let text = "{\n  \"id\": \"x\",\n  \"utterances\": [\n    {\"speaker\": \"A\" \"text\": \"hm\"}\n  ]\n}\n";
        let e = parse(text, Path::new("."), "d.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.json:4:21: expected `,`"), "{e}");
        assert!(!e.contains("line 1"), "{e}");
        // JSON lines: the third line is cut short.
        let line = r#"{"utterances": [{"speaker": "A", "text": "hm"}]}"#;
        let text = format!("{line}\r\n\r\n{{\"utterances\": [\n{line}\n");
        let e = parse(&text, Path::new("."), "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.jsonl:4:"), "{e}");
        // A field error in the second of two pretty objects names the line it starts on.
        let text = format!("{line}\n\n{{\n \"utterances\": []\n}}\n");
        let e = parse(&text, Path::new("."), "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.jsonl:3: dialogue has no utterances"),
            "{e}"
        );
    }

    #[test]
    fn empty_input_is_refused() {
        for text in ["", "\n\r\n  \n", "\u{feff}"] {
            let e = parse(text, Path::new("."), "in.jsonl")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("in.jsonl: no dialogues"), "{text:?}: {e}");
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("farcer-jsonl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn labels_files_that_are_empty_or_miss_used_labels_are_refused() {
        let d = scratch("labels");
        let dia = |l: &str| {
            format!(
                r#"{{"utterances": [{{"speaker": "A", "text": "x", "label": "{l}"}}, {{"speaker": "B", "text": "y", "label": "joy"}}]}}"#
            )
        };
        std::fs::write(d.join("train.jsonl"), dia("anger") + "\n").unwrap();
        std::fs::write(
            d.join("test.jsonl"),
            dia("fear") + "\n" + &dia("Fear") + "\n",
        )
        .unwrap();
        // No labels.txt: the training split's labels define the set; test uses `fear`.
        let e = load(&d, "test").unwrap_err().to_string();
        assert!(
            e.contains("train.jsonl") && e.contains("`fear` (2 utterances)"),
            "{e}"
        );
        assert_eq!(load(&d, "train").unwrap().labels, ["anger", "joy"]);
        // An empty labels.txt.
        std::fs::write(d.join("labels.txt"), "\n  \n").unwrap();
        let e = load(&d, "train").unwrap_err().to_string();
        assert!(e.contains("labels.txt") && e.contains("empty"), "{e}");
        // A labels.txt without `anger`, which train uses.
        std::fs::write(d.join("labels.txt"), "joy\nfear\n").unwrap();
        let e = load(&d, "train").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: misses labels used in",
                d.join("labels.txt").display()
            )) && e.contains("`anger` (1 utterance)")
                && !e.contains("joy"),
            "{e}"
        );
        std::fs::write(d.join("labels.txt"), "joy\nfear\nanger\n").unwrap();
        assert_eq!(load(&d, "test").unwrap().labels, ["joy", "fear", "anger"]);
        // A split with no dialogues at all.
        std::fs::write(d.join("dev.jsonl"), "\n").unwrap();
        let e = load(&d, "dev").unwrap_err().to_string();
        assert!(e.contains("dev.jsonl") && e.contains("no dialogues"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn round_trip() {
        let text =
            r#"{"id":"a","utterances":[{"id":"0","speaker":"Ann","text":"Hi","label":"joy"}]}"#;
        let d = parse(text, Path::new("."), "f").unwrap();
        assert_eq!(parse(&to_jsonl(&d), Path::new("."), "g").unwrap(), d);
    }
}
