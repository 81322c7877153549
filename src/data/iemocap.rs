//! IEMOCAP in its release layout: `Session{1..5}/dialog/transcriptions/*.txt` (turns with
//! times), `Session{N}/dialog/EmoEvaluation/*.txt` (labels and each annotator's votes),
//! `Session{N}/dialog/avi/DivX/*.avi` (one split-screen video per dialogue).
//!
//! Following the paper: sessions 1-4 train (10% of their dialogues held out for
//! validation), session 5 test; dialogues are cut into sub-dialogues (5-21 utterances for
//! train/dev, 5-26 for test); test keeps the last 10 utterances as context; `xxx`
//! (no agreement) becomes one of that turn's annotator labels at random, seeded.

use super::{Dataset, Dialogue, Utterance, IEMOCAP_LABELS};
use crate::error::{Error, IoContext, Result};
use crate::util::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options of the split and the cutting; the defaults are the paper's.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub dev_fraction: f64,
    pub train_len: (usize, usize),
    pub test_len: (usize, usize),
    pub test_context: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 0,
            dev_fraction: 0.1,
            train_len: (5, 21),
            test_len: (5, 26),
            test_context: 10,
        }
    }
}

/// One whole dialogue as recorded (before cutting).
#[derive(Debug, Clone)]
pub struct Session {
    pub session: u32,
    pub dialogue: Dialogue,
    /// `F` or `M`: the session's subject, on the left half of the video.
    pub left_speaker: char,
}

/// Maps an IEMOCAP emotion name or code to our label (`Excited` -> `excitement`).
pub fn normalise_label(s: &str) -> Option<&'static str> {
    let l = s.trim().to_lowercase();
    let table = [
        ("neu", "neutral"),
        ("fru", "frustration"),
        ("ang", "anger"),
        ("sad", "sadness"),
        ("exc", "excitement"),
        ("hap", "happiness"),
        ("sur", "surprise"),
        ("fea", "fear"),
        ("dis", "disgust"),
        ("oth", "other"),
    ];
    table
        .iter()
        .find(|(p, _)| l.starts_with(p))
        .map(|(_, name)| *name)
}

/// The folder of a session (accepts `Session1` directly under `root`).
fn session_dir(root: &Path, n: u32) -> PathBuf {
    root.join(format!("Session{n}"))
}

pub fn video_path(root: &Path, session: u32, dialogue: &str) -> PathBuf {
    session_dir(root, session)
        .join("dialog/avi/DivX")
        .join(format!("{dialogue}.avi"))
}

/// Reads every dialogue of every session present under `root`.
pub fn read_sessions(root: &Path, seed: u64) -> Result<Vec<Session>> {
    let mut out = Vec::new();
    for n in 1..=5u32 {
        let tdir = session_dir(root, n).join("dialog/transcriptions");
        if !tdir.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&tdir)
            .at(&tdir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "txt")
                    && !p.file_name().unwrap().to_string_lossy().starts_with('.')
            })
            .collect();
        files.sort();
        for tfile in files {
            let name = tfile.file_stem().unwrap().to_string_lossy().to_string();
            let efile = session_dir(root, n)
                .join("dialog/EmoEvaluation")
                .join(format!("{name}.txt"));
            let labels = if efile.is_file() {
                parse_evaluation(&std::fs::read_to_string(&efile).at(&efile)?, &efile, seed)?
            } else {
                HashMap::new()
            };
            let mut utterances =
                parse_transcription(&std::fs::read_to_string(&tfile).at(&tfile)?, &tfile)?;
            let video = video_path(root, n, &name);
            for u in &mut utterances {
                u.label = labels.get(&u.id).cloned();
                u.clip = Some(video.clone());
            }
            let left = name
                .chars()
                .nth(5)
                .filter(|c| *c == 'F' || *c == 'M')
                .ok_or_else(|| {
                    Error::input(
                        tfile.display().to_string(),
                        "file name must start with Ses0N followed by F or M",
                    )
                })?;
            out.push(Session {
                session: n,
                dialogue: Dialogue {
                    id: name,
                    utterances,
                },
                left_speaker: left,
            });
        }
    }
    if out.is_empty() {
        return Err(Error::input(
            root.display().to_string(),
            "no IEMOCAP sessions found: expected Session1..Session5/dialog/transcriptions/*.txt",
        ));
    }
    Ok(out)
}

/// `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`; other lines are skipped.
pub fn parse_transcription(text: &str, path: &Path) -> Result<Vec<Utterance>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let Some((head, said)) = line.split_once("]:") else {
            continue;
        };
        let Some((id, times)) = head.split_once(" [") else {
            continue;
        };
        if !id.starts_with("Ses") {
            continue;
        }
        let (s, e) = times.split_once('-').ok_or_else(|| {
            Error::input(
                format!("{}:{}", path.display(), i + 1),
                "expected [start-end]",
            )
        })?;
        let parse = |v: &str| {
            v.trim().parse::<f64>().map_err(|_| {
                Error::input(
                    format!("{}:{}", path.display(), i + 1),
                    format!("bad time `{v}`"),
                )
            })
        };
        let speaker = id
            .rsplit('_')
            .next()
            .and_then(|t| t.chars().next())
            .filter(|c| *c == 'F' || *c == 'M')
            .ok_or_else(|| {
                Error::input(
                    format!("{}:{}", path.display(), i + 1),
                    format!("cannot tell the speaker of `{id}`"),
                )
            })?;
        let mut u = Utterance::new(id, speaker.to_string(), said.trim());
        u.start = Some(parse(s)?);
        u.end = Some(parse(e)?);
        out.push(u);
    }
    out.sort_by(|a, b| a.start.partial_cmp(&b.start).unwrap().then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Reads `[start - end]\tTURN\tcode\t[v, a, d]` headers and the `C-*:` annotator lines
/// under each; returns turn -> label with `xxx` resolved.
pub fn parse_evaluation(text: &str, path: &Path, seed: u64) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut current: Option<(String, String, Vec<String>)> = None;
    let finish = |cur: Option<(String, String, Vec<String>)>,
                  out: &mut HashMap<String, String>|
     -> Result<()> {
        if let Some((id, code, votes)) = cur {
            let label = if code == "xxx" {
                let mut rng = Rng::derive(seed, &id);
                match rng.choose(&votes) {
                    Some(l) => l.clone(),
                    None => {
                        return Err(Error::input(
                            path.display().to_string(),
                            format!("turn {id} is `xxx` but has no annotator labels"),
                        ))
                    }
                }
            } else {
                normalise_label(&code)
                    .ok_or_else(|| {
                        Error::input(
                            path.display().to_string(),
                            format!("turn {id}: unknown label `{code}`"),
                        )
                    })?
                    .to_string()
            };
            out.insert(id, label);
        }
        Ok(())
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            finish(current.take(), &mut out)?;
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            if fields.len() >= 3 {
                current = Some((fields[1].to_string(), fields[2].to_lowercase(), Vec::new()));
            }
        } else if let Some(rest) = line.strip_prefix("C-") {
            if let (Some(cur), Some((_, votes))) = (current.as_mut(), rest.split_once(':')) {
                let votes = votes.split('(').next().unwrap_or("");
                for v in votes.split(';') {
                    if let Some(l) = normalise_label(v) {
                        cur.2.push(l.to_string());
                    }
                }
            }
        }
    }
    finish(current.take(), &mut out)?;
    Ok(out)
}

/// Cuts a dialogue into consecutive pieces of `lo..=hi` utterances (seeded); a tail
/// shorter than `lo` joins the piece before it.
pub fn cut(d: &Dialogue, lo: usize, hi: usize, rng: &mut Rng) -> Vec<Dialogue> {
    let n = d.utterances.len();
    let mut bounds = Vec::new();
    let mut pos = 0;
    while pos < n {
        let len = rng.range_inclusive(lo, hi);
        let end = (pos + len).min(n);
        if n - end < lo && end < n {
            bounds.push((pos, n));
            break;
        }
        bounds.push((pos, end));
        pos = end;
    }
    bounds
        .into_iter()
        .enumerate()
        .map(|(k, (a, b))| Dialogue {
            id: format!("{}#{k}", d.id),
            utterances: d.utterances[a..b].to_vec(),
        })
        .collect()
}

/// Which split a whole dialogue falls in.
pub fn split_of(sessions: &[Session], opts: &Options) -> Vec<&'static str> {
    let trainable: Vec<usize> = (0..sessions.len())
        .filter(|&i| sessions[i].session != 5)
        .collect();
    let mut order = trainable.clone();
    Rng::derive(opts.seed, "iemocap-dev").shuffle(&mut order);
    let n_dev = ((trainable.len() as f64) * opts.dev_fraction).round() as usize;
    let dev: std::collections::HashSet<usize> = order.into_iter().take(n_dev).collect();
    (0..sessions.len())
        .map(|i| {
            if sessions[i].session == 5 {
                "test"
            } else if dev.contains(&i) {
                "dev"
            } else {
                "train"
            }
        })
        .collect()
}

/// Loads a split (`train`, `dev`, `test`) as sub-dialogues. Frames written by
/// `farcer prepare iemocap` under `frames_dir/{dialogue}/{turn}.png` are attached.
pub fn load(
    root: &Path,
    split: &str,
    opts: &Options,
    frames_dir: Option<&Path>,
) -> Result<Dataset> {
    if !matches!(split, "train" | "dev" | "test") {
        return Err(Error::input(
            "--split",
            format!("IEMOCAP splits are train, dev, test; not `{split}`"),
        ));
    }
    let sessions = read_sessions(root, opts.seed)?;
    let splits = split_of(&sessions, opts);
    let mut dialogues = Vec::new();
    for (s, sp) in sessions.iter().zip(&splits) {
        if *sp != split {
            continue;
        }
        let mut d = s.dialogue.clone();
        if let Some(fd) = frames_dir {
            for u in &mut d.utterances {
                let f = frame_path(fd, &d.id, &u.id);
                if f.is_file() {
                    u.image = Some(f);
                }
            }
        }
        let (lo, hi) = if split == "test" {
            opts.test_len
        } else {
            opts.train_len
        };
        let mut rng = Rng::derive(opts.seed, &format!("cut:{}", d.id));
        dialogues.extend(cut(&d, lo, hi, &mut rng));
    }
    Ok(Dataset {
        corpus: "iemocap".into(),
        split: split.into(),
        labels: IEMOCAP_LABELS.iter().map(|s| s.to_string()).collect(),
        dialogues,
        max_context: (split == "test").then_some(opts.test_context),
    })
}

pub fn frame_path(frames_dir: &Path, dialogue: &str, turn: &str) -> PathBuf {
    frames_dir.join(dialogue).join(format!("{turn}.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVAL: &str = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n\
[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n\
C-E2:\tNeutral;\t()\n\
C-E3:\tNeutral;\t()\n\
A-E3:\tval 3; act 2; dom  2;\t()\n\n\
[10.0100 - 11.3925]\tSes01F_impro01_M001\txxx\t[2.0, 3.0, 3.0]\n\
C-E2:\tFrustration; Anger;\t(annoyed)\n\
C-E4:\tExcited;\t()\n\n\
[12.0 - 13.0]\tSes01F_impro01_F002\texc\t[2.0, 3.0, 3.0]\n";

    #[test]
    fn evaluation_labels_and_xxx_resolution() {
        let m = parse_evaluation(EVAL, Path::new("e.txt"), 0).unwrap();
        assert_eq!(m["Ses01F_impro01_F000"], "neutral");
        assert_eq!(m["Ses01F_impro01_F002"], "excitement");
        let x = &m["Ses01F_impro01_M001"];
        assert!(
            ["frustration", "anger", "excitement"].contains(&x.as_str()),
            "{x}"
        );
        // Seeded: the same seed gives the same choice; over seeds every vote shows up.
        let again = parse_evaluation(EVAL, Path::new("e.txt"), 0).unwrap();
        assert_eq!(&again["Ses01F_impro01_M001"], x);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..50 {
            seen.insert(
                parse_evaluation(EVAL, Path::new("e.txt"), seed).unwrap()["Ses01F_impro01_M001"]
                    .clone(),
            );
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn transcription_lines() {
        let t = "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\n\
M: [BREATHING]\n\
Ses01F_impro01_M000 [001.0-002.5]: Do you have your forms?\n";
        let u = parse_transcription(t, Path::new("t.txt")).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].id, "Ses01F_impro01_M000");
        assert_eq!(u[0].speaker, "M");
        assert_eq!(u[1].text, "Excuse me.");
        assert_eq!(u[1].start, Some(6.2901));
    }

    #[test]
    fn cutting_covers_everything_within_bounds() {
        let d = Dialogue {
            id: "d".into(),
            utterances: (0..53)
                .map(|i| Utterance::new(i.to_string(), "F", "x"))
                .collect(),
        };
        for seed in 0..20 {
            let parts = cut(&d, 5, 21, &mut Rng::new(seed));
            let total: usize = parts.iter().map(|p| p.utterances.len()).sum();
            assert_eq!(total, 53);
            for p in &parts {
                assert!(
                    p.utterances.len() >= 5 && p.utterances.len() <= 21 + 4,
                    "{}",
                    p.utterances.len()
                );
            }
            assert_eq!(parts[0].utterances[0].id, "0");
        }
    }
}
