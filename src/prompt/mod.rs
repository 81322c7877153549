//! Where a dialogue becomes tokens: the FARCER prompt (system turn with the rules and the
//! label list, k-shot examples, the dialogue to classify), rendered with the LLM's own
//! chat template and tokenized, with one slot per image.
//!
//! The prompt is split in two: a *prefix* (system turn and examples) that is the same for
//! every sample of a prompt set, so its keys and values can be computed once, and the
//! sample's own *suffix*.

pub mod template;

use crate::data::{Dataset, Utterance};
use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::util::Rng;
use serde::{Deserialize, Serialize};
use template::{ChatTemplate, Message};

/// What the examples show where the dialogue to classify has an image (as the authors).
pub const IMAGE_TEXT: &str = "<image feature token>";
/// Stands for an image slot in rendered text; never typed by anyone (a private-use char).
const SLOT: char = '\u{E000}';

/// Prompt choices that change the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptConfig {
    /// Few-shot examples (the paper: 3 or 7).
    pub shots: usize,
    /// Past labels: earlier utterances carry `({speaker}'s current emotion: {label})`.
    pub past_labels: bool,
    /// Multimodal: image slots in the dialogue to classify, the literal image text in the
    /// examples, and the system turn mentions images. Text-only runs have none of it.
    pub images: bool,
}

/// One few-shot example: a dialogue from the pool and its last utterance's label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub dialogue_id: String,
    pub utterances: Vec<Utterance>,
    pub label: String,
}

/// One seeded draw of few-shot examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub index: u64,
    pub examples: Vec<Example>,
}

impl PromptSet {
    pub fn empty(index: u64) -> Self {
        PromptSet {
            index,
            examples: Vec::new(),
        }
    }

    /// Pool dialogues used as examples (left out of validation scoring on that split).
    pub fn dialogue_ids(&self) -> std::collections::HashSet<String> {
        self.examples
            .iter()
            .map(|e| e.dialogue_id.clone())
            .collect()
    }

    /// Prompt set `index` for `shots` examples: none for 0 shots, else drawn from `pool`,
    /// which few-shot prompts cannot do without (the one place that says so).
    pub fn for_shots(pool: Option<&Dataset>, shots: usize, index: u64) -> Result<Self> {
        match (shots, pool) {
            (0, _) => Ok(PromptSet::empty(index)),
            (k, Some(p)) => PromptSet::draw(p, k, index),
            (_, None) => Err(Error::input(
                "few-shot prompts",
                "they need a pool of example dialogues, and this data has no dev or train split to draw them from: use 0 shots, or data with a dev or train split",
            )),
        }
    }

    /// Draws `k` examples from `pool` with the RNG seeded by `index`: k distinct labels at
    /// random (cycling through all labels again when k exceeds their number), for each a
    /// dialogue of 2-12 utterances ending in that label; then the examples are shuffled.
    pub fn draw(pool: &Dataset, k: usize, index: u64) -> Result<Self> {
        if k == 0 {
            return Ok(PromptSet::empty(index));
        }
        if pool.labels.is_empty() {
            return Err(Error::input(
                format!("few-shot pool {}:{}", pool.corpus, pool.split),
                "it has no labels to draw examples for",
            ));
        }
        let mut rng = Rng::derive(index, "prompt-set");
        let mut labels: Vec<&String> = Vec::new();
        while labels.len() < k {
            let mut round: Vec<&String> = pool.labels.iter().collect();
            rng.shuffle(&mut round);
            labels.extend(round);
        }
        labels.truncate(k);
        let mut used = std::collections::HashSet::new();
        let mut examples = Vec::new();
        for label in labels {
            let cands = candidates(pool, label, &used);
            let Some((di, start, end)) = rng.choose(&cands).copied() else {
                return Err(Error::input(
                    format!("few-shot pool {}:{}", pool.corpus, pool.split),
                    format!("no dialogue ends in `{label}`: cannot draw an example for it"),
                ));
            };
            used.insert((di, end));
            let d = &pool.dialogues[di];
            examples.push(Example {
                dialogue_id: d.id.clone(),
                utterances: d.utterances[start..=end].to_vec(),
                label: label.clone(),
            });
        }
        rng.shuffle(&mut examples);
        Ok(PromptSet { index, examples })
    }
}

/// (dialogue, start, end) windows ending in `label` with 2..=12 utterances: whole
/// dialogues first; if none, dialogue prefixes ending at such an utterance.
fn candidates(
    pool: &Dataset,
    label: &str,
    used: &std::collections::HashSet<(usize, usize)>,
) -> Vec<(usize, usize, usize)> {
    let is = |u: &Utterance| u.label.as_deref() == Some(label);
    let whole: Vec<_> = pool
        .dialogues
        .iter()
        .enumerate()
        .filter(|(di, d)| {
            let n = d.utterances.len();
            (2..=12).contains(&n) && is(&d.utterances[n - 1]) && !used.contains(&(*di, n - 1))
        })
        .map(|(di, d)| (di, 0, d.utterances.len() - 1))
        .collect();
    if !whole.is_empty() {
        return whole;
    }
    let mut out = Vec::new();
    for (di, d) in pool.dialogues.iter().enumerate() {
        for (j, u) in d.utterances.iter().enumerate() {
            if j >= 1 && is(u) && !used.contains(&(di, j)) {
                out.push((di, j.saturating_sub(11), j));
            }
        }
    }
    out
}

/// A number word for the rule "one of the seven emotional labels".
fn count_word(n: usize) -> String {
    const W: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    W.get(n)
        .map(|s| s.to_string())
        .unwrap_or_else(|| n.to_string())
}

/// The system turn: the authors' text, with the dataset's labels.
pub fn system_text(labels: &[String], images: bool) -> String {
    let quoted: Vec<String> = labels.iter().map(|l| format!("\"{l}\"")).collect();
    let list = match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{}, or {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    };
    let basis = if images {
        "based on past utterances and the images of speakers."
    } else {
        "based on past utterances."
    };
    format!(
        "You are FARCER, a high-quality emotion recognizer. Classify the emotion of the last speaker of a dialogue {basis}\n\
         Rules:\n\
         1. Classify the emotion of the last speaker in the dialogue.\n\
         2. The output must be one of the {} emotional labels: {list}.\n\
         3. The output must be a single emotion label.",
        count_word(labels.len())
    )
}

/// How images appear in a dialogue's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageText {
    None,
    /// The literal `<image feature token>` (examples of multimodal runs).
    Literal,
    /// A slot filled by the projected image vector (utterances that have an image).
    Slot,
}

/// The user turn: `DIALOGUE:\n{speaker}: {utterance}\n...\nEMOTION LABEL:`; with past
/// labels each earlier line ends `({speaker}'s current emotion: {label})` and the turn
/// ends `{speaker}'s EMOTION LABEL:`. `past` overrides the gold labels shown.
fn dialogue_text(
    utts: &[Utterance],
    images: &dyn Fn(usize) -> ImageText,
    past_labels: bool,
    past: Option<&[Option<String>]>,
) -> String {
    let mut s = String::from(DIALOGUE_HEAD);
    let n = utts.len();
    for (i, u) in utts.iter().enumerate() {
        let label = if past_labels && i + 1 < n {
            match past {
                Some(p) => p.get(i).cloned().flatten(),
                None => u.label.clone(),
            }
        } else {
            None
        };
        s.push_str(&line_text(u, images(i), label.as_deref()));
    }
    s.push_str(&tail_text(past_labels, utts.last()));
    s
}

const DIALOGUE_HEAD: &str = "DIALOGUE:\n";

/// One utterance's line of the dialogue, with its past label when one is shown.
fn line_text(u: &Utterance, image: ImageText, label: Option<&str>) -> String {
    let mut s = format!("{}: ", u.speaker);
    match image {
        ImageText::None => {}
        ImageText::Literal => {
            s.push_str(IMAGE_TEXT);
            s.push(' ');
        }
        ImageText::Slot => {
            s.push(SLOT);
            s.push(' ');
        }
    }
    s.push_str(&u.text);
    if let Some(l) = label {
        s.push_str(&format!(" ({}'s current emotion: {l})", u.speaker));
    }
    s.push('\n');
    s
}

/// What ends the user turn: the question for the last speaker's label.
fn tail_text(past_labels: bool, last: Option<&Utterance>) -> String {
    match (past_labels, last) {
        (true, Some(u)) => format!("{}'s EMOTION LABEL:", u.speaker),
        _ => "EMOTION LABEL:".into(),
    }
}

/// A piece of a tokenized prompt suffix.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Tokens(Vec<u32>),
    /// The image of this utterance (index into the sample's context after truncation).
    Image(usize),
}

/// A sample's prompt, ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The suffix after the shared prefix.
    pub pieces: Vec<Piece>,
    /// Utterances cut from the front of the dialogue to fit the context.
    pub dropped: usize,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Tokens(t) => t.len(),
                Piece::Image(_) => 1,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row of the first image slot, or the length when there is none: with only the
    /// projection training, no earlier row carries a gradient (see
    /// `Positions::grad_from`).
    pub fn first_image_row(&self) -> usize {
        let mut row = 0;
        for p in &self.pieces {
            match p {
                Piece::Tokens(t) => row += t.len(),
                Piece::Image(_) => return row,
            }
        }
        row
    }

    /// Token ids of the suffix, with `image` in place of each image slot (for text-only
    /// paths and for display).
    pub fn flat_tokens(&self) -> Vec<u32> {
        self.pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Tokens(t) => t.clone(),
                Piece::Image(_) => vec![],
            })
            .collect()
    }

    pub fn images(&self) -> Vec<usize> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Image(i) => Some(*i),
                _ => None,
            })
            .collect()
    }
}

/// Builds prompts for one prompt set: the shared prefix is rendered and tokenized once.
pub struct Prompter {
    pub labels: Vec<String>,
    pub config: PromptConfig,
    pub set: PromptSet,
    template: ChatTemplate,
    tokenizer: TextTokenizer,
    /// Rendered messages of the prefix.
    head: Vec<Message>,
    prefix_text: String,
    /// Token ids of the shared prefix.
    pub prefix: Vec<u32>,
    /// Longest prompt (prefix + suffix + answer room) allowed.
    pub max_tokens: usize,
    /// Tokens kept free for the answer.
    pub answer_room: usize,
    /// The chat template's text around the dialogue in the last user turn (after the
    /// prefix, up to the generation prompt), when the template leaves the dialogue as it is.
    frame: Option<(String, String)>,
}

impl Prompter {
    pub fn new(
        tokenizer: &TextTokenizer,
        template: &ChatTemplate,
        labels: &[String],
        config: &PromptConfig,
        set: PromptSet,
        max_tokens: usize,
    ) -> Result<Self> {
        let mut head = vec![Message::system(system_text(labels, config.images))];
        for ex in &set.examples {
            let img = |_: usize| {
                if config.images {
                    ImageText::Literal
                } else {
                    ImageText::None
                }
            };
            head.push(Message::user(dialogue_text(
                &ex.utterances,
                &img,
                config.past_labels,
                None,
            )));
            head.push(Message::assistant(ex.label.clone()));
        }
        let prefix_text = template.render(&head, false)?;
        let probe = {
            let mut m = head.clone();
            m.push(Message::user("x"));
            template.render(&m, true)?
        };
        // Templates that change earlier text when more turns follow get no shared prefix.
        let prefix_text = if probe.starts_with(&prefix_text) {
            prefix_text
        } else {
            String::new()
        };
        let prefix = tokenizer.encode(&prefix_text)?;
        let answer_room = labels
            .iter()
            .map(|l| tokenizer.encode(l).map(|t| t.len()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(1)
            + 6;
        let frame = {
            const MARK: &str = "\u{1}dialogue\u{1}";
            let mut m = head.clone();
            m.push(Message::user(MARK));
            let full = template.render(&m, true)?;
            full.strip_prefix(&prefix_text)
                .and_then(|rest| rest.split_once(MARK))
                .map(|(a, b)| (a.to_string(), b.to_string()))
        };
        if prefix.len() + answer_room + 16 > max_tokens {
            return Err(Error::msg(format!(
                "the prompt's system turn and examples take {} tokens, more than the {max_tokens} allowed: use fewer shots or a model with a longer context",
                prefix.len()
            )));
        }
        Ok(Prompter {
            labels: labels.to_vec(),
            config: config.clone(),
            set,
            template: template.clone(),
            tokenizer: tokenizer.clone(),
            head,
            prefix_text,
            prefix,
            max_tokens,
            answer_room,
            frame,
        })
    }

    /// Token ids of prompt text, tokenized line by line: a line's tokens never depend on
    /// what follows it, so a live conversation can be tokenized one utterance at a time
    /// and give the same ids as the whole prompt at once.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for line in text.split_inclusive('\n') {
            ids.extend(self.tokenizer.encode(line)?);
        }
        Ok(ids)
    }

    /// Text with image slots as pieces; `slots` gives, in order, the utterance of each slot.
    fn pieces(&self, text: &str, slots: &mut dyn Iterator<Item = usize>) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        for (k, part) in text.split(SLOT).enumerate() {
            if k > 0 {
                let u = slots
                    .next()
                    .ok_or_else(|| Error::msg("image slot without an image"))?;
                pieces.push(Piece::Image(u));
            }
            if !part.is_empty() {
                pieces.push(Piece::Tokens(self.tokenize(part)?));
            }
        }
        Ok(pieces)
    }

    fn frame(&self) -> Result<&(String, String)> {
        self.frame.as_ref().ok_or_else(|| {
            Error::msg(
                "this chat template rewrites the dialogue it is given, so a conversation cannot be extended one utterance at a time",
            )
        })
    }

    /// A live conversation, piece by piece: what opens the dialogue (after the prefix).
    pub fn open(&self) -> Result<Encoded> {
        let text = format!("{}{DIALOGUE_HEAD}", self.frame()?.0);
        Ok(Encoded {
            pieces: self.pieces(&text, &mut std::iter::empty())?,
            dropped: 0,
        })
    }

    /// The line of utterance `u` (index `index` of the conversation) as it stays in the
    /// conversation, with its past label when the prompt shows them.
    pub fn line(
        &self,
        u: &Utterance,
        index: usize,
        has_image: bool,
        label: Option<&str>,
    ) -> Result<Encoded> {
        let label = label.filter(|_| self.config.past_labels);
        let text = line_text(u, self.image_text(has_image), label);
        Ok(Encoded {
            pieces: self.pieces(&text, &mut std::iter::once(index))?,
            dropped: 0,
        })
    }

    /// The question after utterance `u`, which the conversation does not keep: with past
    /// labels its line without a label (the kept line carries one), then the end of the
    /// user turn and the generation prompt.
    pub fn query(&self, u: &Utterance, index: usize, has_image: bool) -> Result<Encoded> {
        let mut text = String::new();
        if self.config.past_labels {
            text.push_str(&line_text(u, self.image_text(has_image), None));
        }
        text.push_str(&tail_text(self.config.past_labels, Some(u)));
        text.push_str(&self.frame()?.1);
        Ok(Encoded {
            pieces: self.pieces(&text, &mut std::iter::once(index))?,
            dropped: 0,
        })
    }

    fn image_text(&self, has_image: bool) -> ImageText {
        if self.config.images && has_image {
            ImageText::Slot
        } else {
            ImageText::None
        }
    }

    /// The whole prompt text of a context (for display and tests).
    pub fn render(
        &self,
        context: &[Utterance],
        has_image: &dyn Fn(usize) -> bool,
    ) -> Result<String> {
        let (text, _) = self.render_parts(context, has_image, None)?;
        Ok(text.replace(SLOT, "<image>"))
    }

    fn render_parts(
        &self,
        context: &[Utterance],
        has_image: &dyn Fn(usize) -> bool,
        past: Option<&[Option<String>]>,
    ) -> Result<(String, String)> {
        let img = |i: usize| {
            if self.config.images && has_image(i) {
                ImageText::Slot
            } else {
                ImageText::None
            }
        };
        let mut m = self.head.clone();
        m.push(Message::user(dialogue_text(
            context,
            &img,
            self.config.past_labels,
            past,
        )));
        let full = self.template.render(&m, true)?;
        let suffix = full[self.prefix_text.len()..].to_string();
        Ok((full, suffix))
    }

    /// Tokenizes a sample: `context` is the dialogue up to the target, `has_image(i)` says
    /// whether utterance i has an image vector, `past` optionally replaces the past labels.
    /// Cuts utterances from the front until the prompt fits `max_tokens`.
    pub fn encode(
        &self,
        context: &[Utterance],
        has_image: &dyn Fn(usize) -> bool,
        past: Option<&[Option<String>]>,
    ) -> Result<Encoded> {
        let mut dropped = 0;
        loop {
            let ctx = &context[dropped..];
            let shifted = |i: usize| has_image(i + dropped);
            let past_shifted = past.map(|p| &p[dropped.min(p.len())..]);
            let (_, suffix) = self.render_parts(ctx, &shifted, past_shifted)?;
            let mut slots = (0..ctx.len())
                .filter(|&i| self.config.images && shifted(i))
                .map(|u| u + dropped);
            let pieces = self.pieces(&suffix, &mut slots)?;
            let enc = Encoded { pieces, dropped };
            if self.prefix.len() + enc.len() + self.answer_room <= self.max_tokens
                || dropped + 1 >= context.len()
            {
                if self.prefix.len() + enc.len() + self.answer_room > self.max_tokens {
                    return Err(Error::msg(format!(
                        "the last utterance alone does not fit in {} tokens",
                        self.max_tokens
                    )));
                }
                return Ok(enc);
            }
            dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Dialogue};

    #[test]
    fn system_text_lists_labels_and_drops_images_when_text_only() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let t = system_text(&labels, false);
        assert!(
            t.contains("one of the three emotional labels: \"a\", \"b\", or \"c\"."),
            "{t}"
        );
        assert!(t.contains("based on past utterances.\n"));
        assert!(!t.contains("image"));
        assert!(system_text(&labels, true).contains("and the images of speakers."));
    }

    #[test]
    fn dialogue_text_formats() {
        let u = vec![
            Utterance::new("0", "Ann", "Hi.").with_label("joy"),
            Utterance::new("1", "Bob", "Oh.").with_label("surprise"),
        ];
        let none = |_: usize| ImageText::None;
        assert_eq!(
            dialogue_text(&u, &none, false, None),
            "DIALOGUE:\nAnn: Hi.\nBob: Oh.\nEMOTION LABEL:"
        );
        assert_eq!(
            dialogue_text(&u, &none, true, None),
            "DIALOGUE:\nAnn: Hi. (Ann's current emotion: joy)\nBob: Oh.\nBob's EMOTION LABEL:"
        );
        let lit = |_: usize| ImageText::Literal;
        assert_eq!(
            dialogue_text(&u[..1], &lit, false, None),
            "DIALOGUE:\nAnn: <image feature token> Hi.\nEMOTION LABEL:"
        );
        let pred = vec![Some("anger".to_string()), None];
        assert!(
            dialogue_text(&u, &none, true, Some(&pred)).contains("(Ann's current emotion: anger)")
        );
    }

    fn pool() -> Dataset {
        let labels = ["x", "y", "z"];
        let dialogues = (0..30)
            .map(|i| Dialogue {
                id: format!("d{i}"),
                utterances: (0..(2 + i % 5))
                    .map(|j| {
                        Utterance::new(j.to_string(), "S", format!("u{i}-{j}"))
                            .with_label(labels[(i + j) % 3])
                    })
                    .collect(),
            })
            .collect();
        Dataset {
            corpus: "t".into(),
            split: "dev".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            dialogues,
            max_context: None,
        }
    }

    /// The one rule for few-shot sets: none for 0 shots, drawn from a pool otherwise, one
    /// error without a pool; a pool without labels is an error, not an endless loop.
    #[test]
    fn prompt_sets_for_shots() {
        let p = pool();
        assert!(PromptSet::for_shots(None, 0, 4)
            .unwrap()
            .examples
            .is_empty());
        assert_eq!(
            PromptSet::for_shots(Some(&p), 3, 2).unwrap(),
            PromptSet::draw(&p, 3, 2).unwrap()
        );
        let e = PromptSet::for_shots(None, 3, 0).unwrap_err().to_string();
        assert!(
            e.contains("few-shot prompts") && e.contains("use 0 shots"),
            "{e}"
        );
        let mut unlabelled = pool();
        unlabelled.labels.clear();
        let e = PromptSet::draw(&unlabelled, 3, 0).unwrap_err().to_string();
        assert!(e.contains("no labels"), "{e}");
    }

    #[test]
    fn draws_are_seeded_distinct_labels_and_end_in_their_label() {
        let p = pool();
        let a = PromptSet::draw(&p, 3, 0).unwrap();
        assert_eq!(a, PromptSet::draw(&p, 3, 0).unwrap());
        assert_ne!(a, PromptSet::draw(&p, 3, 1).unwrap());
        let mut labels: Vec<&str> = a.examples.iter().map(|e| e.label.as_str()).collect();
        labels.sort();
        assert_eq!(labels, ["x", "y", "z"]);
        for e in &a.examples {
            assert_eq!(
                e.utterances.last().unwrap().label.as_deref(),
                Some(e.label.as_str())
            );
            assert!((2..=12).contains(&e.utterances.len()));
        }
        let seven = PromptSet::draw(&p, 7, 3).unwrap();
        assert_eq!(seven.examples.len(), 7);
        let ids: std::collections::HashSet<_> = seven
            .examples
            .iter()
            .map(|e| (e.dialogue_id.clone(), e.utterances.len()))
            .collect();
        assert_eq!(ids.len(), 7, "examples are not repeated");
    }

    #[test]
    fn first_image_row_counts_the_tokens_before_the_first_slot() {
        let enc = |pieces| Encoded { pieces, dropped: 0 };
        let with = enc(vec![
            Piece::Tokens(vec![1, 2, 3]),
            Piece::Tokens(vec![4]),
            Piece::Image(0),
            Piece::Tokens(vec![5, 6]),
            Piece::Image(1),
        ]);
        assert_eq!(with.first_image_row(), 4);
        assert_eq!(enc(vec![Piece::Image(0)]).first_image_row(), 0);
        let without = enc(vec![Piece::Tokens(vec![1, 2]), Piece::Tokens(vec![3])]);
        assert_eq!(without.first_image_row(), without.len());
    }
}
