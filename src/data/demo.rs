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

/// Draws the demo's face images: one PNG per utterance showing its label's expression
/// (mouth, eyes, brows) on a background tinted by the label, with seeded jitter so no
/// two are the same. Writes `dir/{dialogue}_{utt}.png` once and sets each utterance's
/// `image`.
pub fn attach_images(ds: &mut Dataset, dir: &std::path::Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    for d in &mut ds.dialogues {
        for u in &mut d.utterances {
            let path = dir.join(format!("{}_{}.png", d.id, u.id));
            if !path.is_file() {
                let label = u.label.as_deref().unwrap_or("neutral");
                let li = MELD_LABELS.iter().position(|l| *l == label).unwrap_or(0);
                let mut rng = Rng::derive(0, &format!("face:{}:{}", d.id, u.id));
                let img = draw_face(li, &mut rng);
                let tmp = crate::util::tmp_sibling(&path).with_extension("png");
                img.save(&tmp)
                    .map_err(|e| crate::Error::msg(format!("{}: {e}", tmp.display())))?;
                std::fs::rename(&tmp, &path).map_err(|e| crate::Error::io(&path, e))?;
            }
            u.image = Some(path);
        }
    }
    Ok(())
}

/// Writes the demo's three splits to `dir` as JSON lines (`{split}.jsonl`, `labels.txt`)
/// with their face images under `dir/images/`. Image paths are written relative to `dir`,
/// which the JSON-lines reader resolves against the file's folder: the folder can move,
/// and a relative `dir` works from any working directory.
pub fn write(dir: &std::path::Path) -> crate::Result<()> {
    let images = dir.join("images");
    for split in ["train", "dev", "test"] {
        let mut d = load(split);
        attach_images(&mut d, &images)?;
        for u in d.dialogues.iter_mut().flat_map(|x| x.utterances.iter_mut()) {
            if let Some(rel) = u.image.as_ref().and_then(|p| p.strip_prefix(dir).ok()) {
                u.image = Some(rel.to_path_buf());
            }
        }
        crate::util::write_atomic(
            &dir.join(format!("{split}.jsonl")),
            super::jsonl::to_jsonl(&d.dialogues).as_bytes(),
        )?;
    }
    crate::util::write_atomic(
        &dir.join("labels.txt"),
        (MELD_LABELS.join("\n") + "\n").as_bytes(),
    )
}

/// A 96x96 face for label index `li` (MELD order).
pub fn draw_face(li: usize, rng: &mut Rng) -> image::RgbImage {
    const BG: [[f64; 3]; 7] = [
        [150.0, 150.0, 150.0], // neutral: grey
        [245.0, 215.0, 80.0],  // joy: warm yellow
        [120.0, 200.0, 235.0], // surprise: light blue
        [205.0, 60.0, 50.0],   // anger: red
        [60.0, 80.0, 150.0],   // sadness: dark blue
        [120.0, 160.0, 70.0],  // disgust: olive green
        [130.0, 80.0, 160.0],  // fear: purple
    ];
    let n = 96i32;
    let j = |rng: &mut Rng, a: f64| (rng.uniform() * 2.0 - 1.0) * a;
    let bg: Vec<u8> = BG[li]
        .iter()
        .map(|c| (c + j(rng, 18.0)).clamp(0.0, 255.0) as u8)
        .collect();
    let mut img =
        image::RgbImage::from_pixel(n as u32, n as u32, image::Rgb([bg[0], bg[1], bg[2]]));
    let cx = 48.0 + j(rng, 5.0);
    let cy = 50.0 + j(rng, 5.0);
    let r = 32.0 + j(rng, 3.0);
    let skin = image::Rgb([
        (232.0 + j(rng, 15.0)) as u8,
        (190.0 + j(rng, 15.0)) as u8,
        (160.0 + j(rng, 15.0)) as u8,
    ]);
    let dark = image::Rgb([30, 25, 25]);
    let dot = |img: &mut image::RgbImage, x: f64, y: f64, rad: f64, c: image::Rgb<u8>| {
        for yy in (y - rad).floor() as i32..=(y + rad).ceil() as i32 {
            for xx in (x - rad).floor() as i32..=(x + rad).ceil() as i32 {
                if (0..n).contains(&xx)
                    && (0..n).contains(&yy)
                    && ((xx as f64 - x).powi(2) + (yy as f64 - y).powi(2)) <= rad * rad
                {
                    img.put_pixel(xx as u32, yy as u32, c);
                }
            }
        }
    };
    dot(&mut img, cx, cy, r, skin);
    // Eyes: wide for surprise and fear, narrow for disgust.
    let (eye_r, eye_y) = match li {
        2 | 6 => (4.5, cy - 9.0),
        5 => (2.0, cy - 8.0),
        _ => (3.0, cy - 8.0),
    };
    for side in [-1.0, 1.0] {
        let ex = cx + side * 11.0;
        if li == 2 || li == 6 {
            dot(&mut img, ex, eye_y, eye_r, image::Rgb([250, 250, 250]));
            dot(&mut img, ex, eye_y, eye_r * 0.5, dark);
        } else {
            dot(&mut img, ex, eye_y, eye_r, dark);
        }
        // Brows: slanted down to the middle in anger, up in sadness and fear, high in surprise.
        let (inner, outer) = match li {
            3 => (-8.0, -14.0),
            4 | 6 => (-17.0, -12.0),
            2 => (-19.0, -19.0),
            5 => (-12.0, -15.0),
            _ => (-15.0, -15.0),
        };
        for k in 0..=10 {
            let t = k as f64 / 10.0;
            let bx = ex - side * 5.0 + side * 10.0 * t;
            let by = cy + inner + (outer - inner) * t;
            dot(&mut img, bx, by, 1.3, dark);
        }
    }
    // Mouth.
    let my = cy + 14.0;
    match li {
        1 | 4 => {
            // Smile (joy) or frown (sadness): a parabola.
            let s = if li == 1 { 1.0 } else { -1.0 };
            for k in -12..=12 {
                let x = k as f64;
                dot(
                    &mut img,
                    cx + x,
                    my + s * (6.0 - x * x / 24.0) * 0.9 - s * 3.0,
                    1.6,
                    dark,
                );
            }
        }
        2 => dot(&mut img, cx, my + 2.0, 6.0, dark),
        6 => dot(&mut img, cx, my + 2.0, 3.5, dark),
        3 => {
            for k in -10..=10 {
                dot(&mut img, cx + k as f64, my + 3.0, 2.2, dark);
            }
        }
        5 => {
            for k in -10..=10 {
                let x = k as f64;
                dot(
                    &mut img,
                    cx + x,
                    my + 2.0 + (x * 0.6).sin() * 2.5 + x * 0.2,
                    1.5,
                    dark,
                );
            }
        }
        _ => {
            for k in -9..=9 {
                dot(&mut img, cx + k as f64, my + 2.0, 1.3, dark);
            }
        }
    }
    // Sensor noise.
    for p in img.pixels_mut() {
        let e = (rng.uniform() * 16.0 - 8.0) as i32;
        for c in 0..3 {
            p.0[c] = (p.0[c] as i32 + e).clamp(0, 255) as u8;
        }
    }
    img
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
