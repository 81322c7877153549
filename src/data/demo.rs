//! The built-in demo set: short two-person dialogues that farcer writes itself, so the
//! README's first command runs anywhere without a corpus. Some utterances say their
//! emotion in words (never the label word itself); others ("Okay.", "Oh.") cannot be
//! read from the text at all, only from the speaker's face in the image drawn for it.

use super::{Dataset, Dialogue, Utterance, MELD_LABELS};
use crate::util::Rng;

const NAMES: [&str; 8] = ["Maya", "Tom", "Priya", "Leo", "Sofia", "Ken", "Ada", "Omar"];

/// Utterances whose words carry the emotion, per label (MELD label order).
const TELLING: [(&str, &[&str]); 7] = [
    (
        "neutral",
        &[
            "I'll be at the coffee house around six.",
            "Can you pass me the remote?",
            "The meeting got moved to Thursday.",
            "I need to pick up some groceries later.",
            "Did you feed the cat this morning?",
            "We should paint the kitchen blue.",
            "The bus leaves at a quarter past eight.",
        ],
    ),
    (
        "joy",
        &[
            "We got the apartment! I can't stop smiling!",
            "This is the best birthday present ever, thank you!",
            "I passed the exam! Let's celebrate tonight!",
            "You're coming to visit? That's wonderful news!",
            "We won! We actually won the game!",
            "I love this song, it makes my whole day.",
        ],
    ),
    (
        "surprise",
        &[
            "Wait, what? You're getting married?",
            "No way! Since when do you two know each other?",
            "Whoa, I did not see that coming at all!",
            "You built all of this by yourself? Really?",
            "He's here? Right now? Are you serious?",
        ],
    ),
    (
        "anger",
        &[
            "You read my diary? How dare you!",
            "I told you a hundred times not to touch my stuff!",
            "Get out of my room, right now!",
            "You lied to me again, after you promised!",
            "Stop interrupting me every single time I talk!",
        ],
    ),
    (
        "sadness",
        &[
            "My grandmother passed away last night.",
            "She left, and she's not coming back.",
            "I really miss how things used to be.",
            "Nobody came to my party. Not one person.",
            "I lost the job. I don't know what to do now.",
        ],
    ),
    (
        "disgust",
        &[
            "Ew, there's a hair in my soup.",
            "That smell is making me gag.",
            "He licked the plate? In public? Gross.",
            "I can't believe you eat that stuff, it's slimy.",
            "Something green is growing in the fridge. Yuck.",
        ],
    ),
    (
        "fear",
        &[
            "Did you hear that noise downstairs? Someone's in the house.",
            "Please don't make me climb up there, I'll fall.",
            "What if the plane goes down?",
            "There's a huge spider on my arm, get it off!",
            "I think someone has been following me home.",
        ],
    ),
];

/// Utterances that say nothing about how the speaker feels.
const PLAIN: [&str; 10] = [
    "Okay.",
    "Right.",
    "Well, here we are.",
    "So that happened.",
    "Hmm, I see.",
    "Look at this.",
    "Oh.",
    "Yeah, sure.",
    "Alright then.",
    "Huh.",
];

/// Number of dialogues per split.
pub fn split_size(split: &str) -> usize {
    match split {
        "train" => 140,
        "dev" => 35,
        _ => 49,
    }
}

/// True when the text of an utterance does not reveal its label (only the image does).
pub fn is_plain(text: &str) -> bool {
    PLAIN.contains(&text)
}

/// The demo split as dialogues (images are attached by the caller that draws them).
pub fn dialogues(split: &str) -> Vec<Dialogue> {
    let seed = match split {
        "train" => 11,
        "dev" => 12,
        _ => 13,
    };
    let mut rng = Rng::derive(seed, "demo");
    let n = split_size(split);
    (0..n)
        .map(|i| {
            let a = rng.below(NAMES.len());
            let b = (a + 1 + rng.below(NAMES.len() - 1)) % NAMES.len();
            let len = rng.range_inclusive(2, 6);
            // Every split has every label as a final target, in rotation.
            let last_label = i % MELD_LABELS.len();
            let utterances = (0..len)
                .map(|j| {
                    let last = j + 1 == len;
                    let li = if last {
                        last_label
                    } else if rng.uniform() < 0.5 {
                        0
                    } else {
                        rng.below(7)
                    };
                    let label = MELD_LABELS[li];
                    // Half of the final utterances can only be told from the image.
                    let plain = if last {
                        (i / MELD_LABELS.len()) % 2 == 1
                    } else {
                        rng.uniform() < 0.3
                    };
                    let text = if plain {
                        *rng.choose(&PLAIN).unwrap()
                    } else {
                        *rng.choose(TELLING[li].1).unwrap()
                    };
                    Utterance::new(j.to_string(), NAMES[if j % 2 == 0 { a } else { b }], text)
                        .with_label(label)
                })
                .collect();
            Dialogue {
                id: format!("demo-{split}-{i:03}"),
                utterances,
            }
        })
        .collect()
}

pub fn load(split: &str) -> Dataset {
    Dataset {
        corpus: "demo".into(),
        split: split.into(),
        labels: MELD_LABELS.iter().map(|s| s.to_string()).collect(),
        dialogues: dialogues(split),
        max_context: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_never_names_a_label() {
        assert_eq!(dialogues("test"), dialogues("test"));
        let d = load("test");
        let counts = d.label_counts(super::super::Scope::Last);
        assert!(counts.iter().all(|&c| c == 7), "{counts:?}");
        for dl in &d.dialogues {
            for u in &dl.utterances {
                let t = u.text.to_lowercase();
                for l in MELD_LABELS {
                    assert!(!t.contains(l), "`{}` names `{l}`", u.text);
                }
            }
        }
        let plain_last = d
            .dialogues
            .iter()
            .filter(|x| is_plain(&x.utterances.last().unwrap().text))
            .count();
        assert!(plain_last >= 21, "{plain_last}");
    }
}
