//! Dialogues in, samples out. Every corpus reader (MELD, IEMOCAP, our JSON lines, the
//! built-in demo) produces the same [`Dialogue`] type; [`samples`] turns dialogues into
//! the units that are scored. No tensors here: this layer only reads and checks files.

pub mod demo;
pub mod frames;
pub mod iemocap;
pub mod jsonl;
pub mod meld;
pub mod spec;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Utterance {
    /// The corpus' own id of the utterance (MELD `Utterance_ID`, IEMOCAP turn name, or
    /// the position in a JSON line).
    pub id: String,
    pub speaker: String,
    pub text: String,
    /// Gold emotion, lower case. `None` for unlabelled context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// A still image of the speaker (wins over `clip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// A video the frame comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<PathBuf>,
    /// Seconds into `clip` (IEMOCAP: into the dialogue video).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
}

impl Utterance {
    pub fn new(id: impl Into<String>, speaker: impl Into<String>, text: impl Into<String>) -> Self {
        Utterance {
            id: id.into(),
            speaker: speaker.into(),
            text: text.into(),
            label: None,
            image: None,
            clip: None,
            start: None,
            end: None,
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialogue {
    pub id: String,
    pub utterances: Vec<Utterance>,
}

/// One split of a corpus, with the label set its scores are computed over.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `meld`, `iemocap`, `jsonl`, `demo`.
    pub corpus: String,
    pub split: String,
    /// Target labels in their fixed order (prompt, tables, confusion matrices).
    pub labels: Vec<String>,
    pub dialogues: Vec<Dialogue>,
    /// Keep at most this many utterances of context for each sample (IEMOCAP test: 10).
    pub max_context: Option<usize>,
}

/// Which utterances are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One sample per dialogue: its last labelled utterance (the paper's protocol).
    Last,
    /// Every labelled utterance, on the dialogue prefix that ends with it (usual ERC).
    All,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Last => "last",
            Scope::All => "all",
        })
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    /// The name as written in configs and on the command line.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "last" => Ok(Scope::Last),
            "all" => Ok(Scope::All),
            other => Err(format!("`{other}`: the scope is last or all")),
        }
    }
}

/// A unit of scoring: utterances `start..=target` of dialogue `dialogue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub dialogue: usize,
    pub start: usize,
    pub target: usize,
}

impl Dataset {
    /// The samples of this split for a scope. Only utterances whose gold label is one of
    /// `labels` are targets; others stay in the context.
    pub fn samples(&self, scope: Scope) -> Vec<Sample> {
        let mut out = Vec::new();
        for (di, d) in self.dialogues.iter().enumerate() {
            let is_target = |u: &Utterance| {
                u.label
                    .as_ref()
                    .is_some_and(|l| self.labels.iter().any(|x| x == l))
            };
            let targets: Vec<usize> = match scope {
                Scope::Last => d
                    .utterances
                    .iter()
                    .rposition(is_target)
                    .into_iter()
                    .collect(),
                Scope::All => d
                    .utterances
                    .iter()
                    .enumerate()
                    .filter(|(_, u)| is_target(u))
                    .map(|(i, _)| i)
                    .collect(),
            };
            for t in targets {
                let start = match self.max_context {
                    Some(m) if t + 1 > m => t + 1 - m,
                    _ => 0,
                };
                out.push(Sample {
                    dialogue: di,
                    start,
                    target: t,
                });
            }
        }
        out
    }

    /// Every image named by an utterance of this split (the vector cache's work list).
    pub fn image_paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.dialogues
            .iter()
            .flat_map(|d| d.utterances.iter())
            .filter_map(|u| u.image.as_ref())
    }

    pub fn context(&self, s: &Sample) -> &[Utterance] {
        &self.dialogues[s.dialogue].utterances[s.start..=s.target]
    }

    pub fn gold(&self, s: &Sample) -> &str {
        self.dialogues[s.dialogue].utterances[s.target]
            .label
            .as_deref()
            .unwrap_or("")
    }

    /// Count of each target label over the samples of a scope, in label order.
    pub fn label_counts(&self, scope: Scope) -> Vec<usize> {
        let mut c = vec![0; self.labels.len()];
        for s in self.samples(scope) {
            if let Some(i) = self.labels.iter().position(|l| l == self.gold(&s)) {
                c[i] += 1;
            }
        }
        c
    }
}

/// Seven MELD labels, in the order of the paper's tables.
pub const MELD_LABELS: [&str; 7] = [
    "neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear",
];

/// The six IEMOCAP target labels of the paper's table.
pub const IEMOCAP_LABELS: [&str; 6] = [
    "neutral",
    "frustration",
    "anger",
    "sadness",
    "excitement",
    "happiness",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> Dataset {
        let u = |i: usize, l: Option<&str>| {
            let mut u = Utterance::new(i.to_string(), "A", format!("t{i}"));
            u.label = l.map(String::from);
            u
        };
        Dataset {
            corpus: "t".into(),
            split: "test".into(),
            labels: vec!["joy".into(), "anger".into()],
            dialogues: vec![
                Dialogue {
                    id: "0".into(),
                    utterances: vec![u(0, Some("joy")), u(1, Some("anger")), u(2, Some("other"))],
                },
                Dialogue {
                    id: "1".into(),
                    utterances: vec![u(0, None)],
                },
            ],
            max_context: None,
        }
    }

    #[test]
    fn last_scope_takes_last_target_label_and_skips_unlabelled_dialogues() {
        let s = ds().samples(Scope::Last);
        assert_eq!(
            s,
            vec![Sample {
                dialogue: 0,
                start: 0,
                target: 1
            }]
        );
    }

    #[test]
    fn all_scope_scores_every_target_on_its_prefix() {
        let d = ds();
        let s = d.samples(Scope::All);
        assert_eq!(s.len(), 2);
        assert_eq!(d.context(&s[0]).len(), 1);
        assert_eq!(d.gold(&s[1]), "anger");
    }

    #[test]
    fn max_context_cuts_from_the_front() {
        let mut d = ds();
        d.max_context = Some(1);
        let s = d.samples(Scope::Last);
        assert_eq!(s[0].start, 1);
        assert_eq!(d.context(&s[0]).len(), 1);
    }
}
