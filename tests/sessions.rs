//! Live sessions in the library: several sessions answered in one pass equal each alone,
//! and a step that fails (an utterance that cannot fit) leaves its session as it was,
//! alone or in a batch.

mod common;
use candle_core::{DType, Device};
use common::*;
use farcer::data::Utterance;
use farcer::infer::{Engine, Predictor, SessionOptions, Step};
use farcer::prompt::PromptConfig;

fn predictor(max_tokens: usize) -> Predictor {
    let llm = farcer::model::load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let labels = ["er", "in", "on", "he"].map(String::from).to_vec();
    let prompt = PromptConfig {
        shots: 0,
        past_labels: false,
        images: false,
    };
    // The room after the prompt prefix is `max_tokens` minus the prefix.
    let probe = Predictor::new(
        Engine::Text(Box::new(llm)),
        labels.clone(),
        prompt.clone(),
        None,
        None,
    )
    .unwrap();
    let prefix = probe.prepared(0, 0, false).unwrap().cache.len();
    let llm = farcer::model::load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    Predictor::new(
        Engine::Text(Box::new(llm)),
        labels,
        prompt,
        None,
        Some(prefix + max_tokens),
    )
    .unwrap()
}

fn utt(i: usize, text: &str) -> Utterance {
    Utterance::new(
        format!("u{i}"),
        if i.is_multiple_of(2) { "Ann" } else { "Bob" },
        text,
    )
}

#[test]
fn a_failed_step_leaves_its_session_as_it_was() {
    let p = predictor(120);
    let texts = [
        "we won the game",
        "no way, really?",
        "yes! on the last shot",
    ];
    let long = "blah ".repeat(200);
    let opts = SessionOptions::default();
    let mut s = p.session(&opts).unwrap();
    for (i, t) in texts[..2].iter().enumerate() {
        p.add(&mut s, utt(i, t), None).unwrap();
    }
    let before = (s.len(), s.cache_tokens(), s.cache_bytes(), s.dropped());
    let e = p.add(&mut s, utt(2, &long), None).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    assert_eq!(
        (s.len(), s.cache_tokens(), s.cache_bytes(), s.dropped()),
        before
    );
    // The next utterance is answered as if the failed one never came.
    let a = p.add(&mut s, utt(2, texts[2]), None).unwrap();
    let mut fresh = p.session(&opts).unwrap();
    let mut b = None;
    for (i, t) in texts.iter().enumerate() {
        b = Some(p.add(&mut fresh, utt(i, t), None).unwrap());
    }
    let b = b.unwrap();
    assert_eq!((a.index, &a.label, a.tokens), (b.index, &b.label, b.tokens));
    assert_eq!(a.probs, b.probs);

    // In a batch: the failing step fails alone; the other session gets its answer, the
    // same as alone.
    let mut x = p.session(&opts).unwrap();
    let mut y = p.session(&opts).unwrap();
    p.add(&mut x, utt(0, texts[0]), None).unwrap();
    p.add(&mut y, utt(0, texts[0]), None).unwrap();
    let before_y = (y.len(), y.cache_tokens(), y.cache_bytes());
    let out = p.add_many(vec![
        Step {
            session: &mut x,
            utterance: utt(1, texts[1]),
            image: None,
        },
        Step {
            session: &mut y,
            utterance: utt(1, &long),
            image: None,
        },
    ]);
    assert!(out[1].is_err());
    assert_eq!((y.len(), y.cache_tokens(), y.cache_bytes()), before_y);
    let got = out[0].as_ref().unwrap();
    let mut alone = p.session(&opts).unwrap();
    p.add(&mut alone, utt(0, texts[0]), None).unwrap();
    let want = p.add(&mut alone, utt(1, texts[1]), None).unwrap();
    assert_eq!(got.label, want.label);
    for (a, b) in got.probs.iter().flatten().zip(want.probs.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5, "{got:?} vs {want:?}");
    }
}
