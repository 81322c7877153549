//! Corpus readers on real MELD annotations and on an IEMOCAP-shaped fixture; prompts on
//! a real chat template.

mod common;
use common::*;
use farcer::data::{iemocap, meld, spec::DataSpec, Scope};
use farcer::prompt::{Piece, PromptConfig, PromptSet, Prompter};

fn meld_counts_match_the_corpus() {
    let Some(dir) = shared("data/meld") else {
        return;
    };
    // (utterances, dialogues, neutral, fear) from MELD's SOURCE.md.
    for (split, utts, dias, neutral, fear) in [
        ("train", 9989, 1038, 4710, 268),
        ("dev", 1109, 114, 470, 40),
        ("test", 2610, 280, 1256, 50),
    ] {
        let d = meld::load(&dir, split).unwrap();
        let n: usize = d.dialogues.iter().map(|x| x.utterances.len()).sum();
        assert_eq!((n, d.dialogues.len()), (utts, dias), "{split}");
        let all = d.label_counts(Scope::All);
        assert_eq!(all[0], neutral, "{split} neutral");
        assert_eq!(all[6], fear, "{split} fear");
        assert_eq!(d.samples(Scope::Last).len(), dias);
        assert_eq!(d.samples(Scope::All).len(), utts);
        for dl in &d.dialogues {
            for u in &dl.utterances {
                assert!(u.start.is_some() && u.end.is_some());
                assert!(
                    !u.text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
                    "C1 left in {:?}",
                    u.text
                );
            }
        }
    }
    // Train dialogue 57 starts at Utterance_ID 1; ID 60 is absent.
    let train = meld::load(&dir, "train").unwrap();
    let d57 = train.dialogues.iter().find(|d| d.id == "57").unwrap();
    assert_eq!(d57.utterances[0].id, "1");
    assert!(!train.dialogues.iter().any(|d| d.id == "60"));
}

fn meld_reads_the_old_cp1252_encoding() {
    let Some(dir) = shared("data/meld") else {
        return;
    };
    // Re-encode the dev CSV the way old copies were: typographic characters as C1 points.
    let text = std::fs::read_to_string(dir.join("dev_sent_emo.csv")).unwrap();
    let old: String = text
        .chars()
        .map(|c| match c {
            '’' => '\u{92}',
            '…' => '\u{85}',
            '—' => '\u{97}',
            c => c,
        })
        .collect();
    let tmp = std::env::temp_dir().join(format!("farcer-meld-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("dev_sent_emo.csv"), old).unwrap();
    let a = meld::load(&dir, "dev").unwrap();
    let b = meld::load(&tmp, "dev").unwrap();
    assert_eq!(a.dialogues, b.dialogues);
    std::fs::remove_dir_all(tmp).unwrap();
}

fn iemocap_layout_splits_cutting_and_labels() {
    let root = fixture("iemocap");
    let spec: DataSpec = format!("iemocap:{}", root.display()).parse().unwrap();
    let test = spec.load("test", 0).unwrap();
    let train = spec.load("train", 0).unwrap();
    let dev = spec.load("dev", 0).unwrap();
    assert!(test.dialogues.iter().all(|d| d.id.starts_with("Ses05")));
    assert!(train
        .dialogues
        .iter()
        .chain(&dev.dialogues)
        .all(|d| !d.id.starts_with("Ses05")));
    assert_eq!(
        dev.dialogues
            .iter()
            .map(|d| d.id.split('#').next().unwrap())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1,
        "10% of 5 dialogues -> 1 held out"
    );
    // Every utterance of the session-5 dialogues survives the cutting, in time order.
    let sessions = iemocap::read_sessions(&root, 0).unwrap();
    let s5: usize = sessions
        .iter()
        .filter(|s| s.session == 5)
        .map(|s| s.dialogue.utterances.len())
        .sum();
    assert_eq!(
        test.dialogues
            .iter()
            .map(|d| d.utterances.len())
            .sum::<usize>(),
        s5
    );
    for d in test.dialogues.iter().chain(&train.dialogues) {
        assert!(
            d.utterances.len() >= 5,
            "{} has {}",
            d.id,
            d.utterances.len()
        );
        assert!(d.utterances.windows(2).all(|w| w[0].start <= w[1].start));
    }
    // Targets are the six labels; other turns are context; the last-10 test context.
    assert_eq!(
        test.labels,
        [
            "neutral",
            "frustration",
            "anger",
            "sadness",
            "excitement",
            "happiness"
        ]
    );
    for s in test.samples(Scope::All) {
        assert!(test.labels.contains(&test.gold(&s).to_string()));
        assert!(test.context(&s).len() <= 10);
    }
    let all: Vec<_> = sessions
        .iter()
        .flat_map(|s| s.dialogue.utterances.iter())
        .collect();
    let unlabelled = all.iter().filter(|u| u.label.is_none()).count();
    assert_eq!(unlabelled, 7, "one unannotated XX turn per dialogue");
    assert!(
        all.iter().any(|u| u.label.as_deref() == Some("surprise")),
        "non-target labels kept as context"
    );
    assert!(all.iter().all(|u| u.label.as_deref() != Some("xxx")));
    assert!(all.iter().all(|u| u
        .clip
        .as_ref()
        .unwrap()
        .ends_with(format!("{}.avi", u.id.rsplit_once('_').unwrap().0))));
}

fn tiny() -> farcer::model::Llm {
    farcer::model::load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
}

fn prompt_prefix_and_suffix_tokenize_like_the_whole_and_images_take_slots() {
    let llm = tiny();
    let d = farcer::data::demo::load("dev");
    let set = PromptSet::draw(&d, 3, 0).unwrap();
    let cfg = PromptConfig {
        shots: 3,
        past_labels: false,
        images: true,
    };
    let p = Prompter::new(&llm.tokenizer, &llm.template, &d.labels, &cfg, set, 4096).unwrap();
    let ctx = &d.dialogues[0].utterances;
    let has_image = |i: usize| i.is_multiple_of(2);
    let enc = p.encode(ctx, &has_image, None).unwrap();
    assert_eq!(
        enc.images(),
        (0..ctx.len()).filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    // Without the slots, prefix + suffix tokens are the whole prompt's; a slot sits
    // between "Speaker: " and " text", as the authors' image token did.
    let text = p.render(ctx, &has_image).unwrap();
    assert!(
        text.contains("<image feature token>"),
        "examples show the literal image text"
    );
    assert!(text.contains(&format!("{}: <image> {}", ctx[0].speaker, ctx[0].text)));
    let whole = llm.tokenizer.encode(&text.replace("<image>", "")).unwrap();
    let mut joined = p.prefix.clone();
    joined.extend(enc.flat_tokens());
    assert_eq!(joined, whole);
    assert!(matches!(enc.pieces.last(), Some(Piece::Tokens(_))));
}

fn long_dialogues_are_cut_from_the_front() {
    let llm = tiny();
    let d = farcer::data::demo::load("dev");
    let cfg = PromptConfig {
        shots: 0,
        past_labels: false,
        images: false,
    };
    let long: Vec<_> = d
        .dialogues
        .iter()
        .flat_map(|x| x.utterances.clone())
        .take(30)
        .collect();
    let full = Prompter::new(
        &llm.tokenizer,
        &llm.template,
        &d.labels,
        &cfg,
        PromptSet::empty(0),
        100_000,
    )
    .unwrap();
    let n_full = full.encode(&long, &|_| false, None).unwrap().len();
    let p = Prompter::new(
        &llm.tokenizer,
        &llm.template,
        &d.labels,
        &cfg,
        PromptSet::empty(0),
        700,
    )
    .unwrap();
    let enc = p.encode(&long, &|_| false, None).unwrap();
    assert!(enc.dropped > 0 && n_full + p.prefix.len() > 700);
    assert!(p.prefix.len() + enc.len() + p.answer_room <= 700);
    let text = llm.tokenizer.decode(&enc.flat_tokens(), false).unwrap();
    assert!(
        text.contains(&long.last().unwrap().text),
        "the target utterance is kept"
    );
    assert!(
        !text.contains(&format!("{}: {}\n", long[0].speaker, long[0].text))
            || long[0].text == long.last().unwrap().text
    );
}

fn hub_ids_fail_offline_with_a_clear_message() {
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = farcer::model::load_llm(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .err()
    .expect("offline");
    let msg = e.to_string();
    assert!(msg.contains("pass a local path"), "{msg}");
    let e = farcer::model::load_llm(
        "./no/such/model",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("no such file or folder"), "{e}");
}

fn shipped_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml")
            && !p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("table4")
        {
            let c = farcer::train::TrainConfig::read(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(c.optim.epochs > 0);
            n += 1;
        }
    }
    assert!(n >= 4);
}

/// The demo's data, written to a relative folder (as `farcer demo --out runs/demo`
/// does), reads back with every image found: image paths are stored relative to the
/// JSON-lines folder, which the reader resolves them against.
fn demo_data_written_to_a_relative_folder_finds_its_images() {
    let dir = std::path::PathBuf::from(format!("target/test-demo-data-{}", std::process::id()));
    assert!(dir.is_relative());
    farcer::data::demo::write(&dir).unwrap();
    for split in ["train", "dev", "test"] {
        let d = farcer::data::jsonl::load(&dir, split).unwrap();
        let utts: Vec<_> = d.dialogues.iter().flat_map(|x| &x.utterances).collect();
        assert!(!utts.is_empty());
        for u in utts {
            let p = u.image.as_ref().expect("every demo utterance has an image");
            assert!(p.is_file(), "{split}: {} is missing", p.display());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn main() -> std::process::ExitCode {
    common::harness::main(tests![
        meld_counts_match_the_corpus.needs_shared("data/meld"),
        meld_reads_the_old_cp1252_encoding.needs_shared("data/meld"),
        iemocap_layout_splits_cutting_and_labels,
        prompt_prefix_and_suffix_tokenize_like_the_whole_and_images_take_slots,
        long_dialogues_are_cut_from_the_front,
        hub_ids_fail_offline_with_a_clear_message,
        shipped_configs_parse,
        demo_data_written_to_a_relative_folder_finds_its_images,
    ])
}
