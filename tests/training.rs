//! Training through a frozen tiny LLM: the projection's gradient against finite
//! differences, the prefix cache changes nothing, no gradient reaches frozen weights, and
//! the projection learns labels that only the images show.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use farcer::data::{Dataset, Dialogue, Scope, Utterance};
use farcer::decode::Decode;
use farcer::eval::{self, EvalOptions};
use farcer::farcer::{Farcer, Kind};
use farcer::model::dropout::Dropout;
use farcer::model::projection::{Projection, ProjectionConfig};
use farcer::prompt::{PromptConfig, PromptSet};
use farcer::train::{sample_loss, target_tokens, TokenWeights};
use std::path::{Path, PathBuf};

/// Four labels that are single tokens of the tiny byte-level vocabulary (merges "er", "in",
/// "on", "he"), so a label is one token and end-of-turn.
const LABELS: [&str; 4] = ["er", "in", "on", "he"];

fn tiny_llm() -> farcer::model::Llm {
    farcer::model::load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// A PNG whose colour and stripes depend on the class (what the image "shows").
fn write_image(path: &Path, class: usize, jitter: u64) {
    let base = [
        [200u8, 40, 40],
        [40, 180, 60],
        [50, 60, 200],
        [210, 200, 60],
    ][class];
    let img = image::RgbImage::from_fn(40, 40, |x, y| {
        let stripe = if class.is_multiple_of(2) {
            (x / 5) % 2 == 0
        } else {
            (y / 5) % 2 == 0
        };
        let n = ((x as u64 * 31 + y as u64 * 17 + jitter * 7) % 23) as u8;
        let k = if stripe { 1.0 } else { 0.6 };
        image::Rgb([
            (base[0] as f32 * k) as u8 + n,
            (base[1] as f32 * k) as u8 + n,
            (base[2] as f32 * k) as u8 + n,
        ])
    });
    img.save(path).unwrap();
}

/// Balanced dialogues whose text never tells the label; the last utterance's image does.
fn synthetic(dir: &Path, split: &str, per_class: usize, seed: u64) -> Dataset {
    std::fs::create_dir_all(dir).unwrap();
    let mut dialogues = Vec::new();
    for i in 0..per_class * LABELS.len() {
        let class = i % LABELS.len();
        let img = dir.join(format!("{split}-{i}.png"));
        write_image(&img, class, seed * 1000 + i as u64);
        let mut first =
            Utterance::new("0", "Ann", "Look.").with_label(LABELS[(class + 1 + i / 4) % 4]);
        first.image = None;
        let mut last = Utterance::new("1", "Bob", "Hm.").with_label(LABELS[class]);
        last.image = Some(img);
        dialogues.push(Dialogue {
            id: format!("{split}-{i}"),
            utterances: vec![first, last],
        });
    }
    Dataset {
        corpus: "synthetic".into(),
        split: split.into(),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        dialogues,
        max_context: None,
    }
}

fn farcer_with(llm: farcer::model::Llm, in_dim: usize, layers: usize, seed: u64) -> Farcer {
    let cfg = ProjectionConfig {
        layers,
        dropout: 0.0,
        in_dim,
        out_dim: llm.model.hidden_size(),
    };
    let p = Projection::new(cfg, seed, &Device::Cpu).unwrap();
    Farcer::new(llm, Some(p), Kind::Base)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("farcer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A dataset whose images have fixed, made-up vectors (no ViT), for gradient checks.
fn with_fake_vectors(f: &mut Farcer, d: &Dataset, dim: usize) {
    for (k, dl) in d.dialogues.iter().enumerate() {
        for u in &dl.utterances {
            if let Some(p) = &u.image {
                let v: Vec<f32> = (0..dim)
                    .map(|j| ((k * 7 + j * 3) as f32 * 0.37).sin())
                    .collect();
                f.vectors.insert(p.clone(), v);
            }
        }
    }
}

fn two_image_dialogue(dir: &Path) -> Dataset {
    let mut d = synthetic(dir, "g", 1, 0);
    d.dialogues[0].utterances[0].image = Some(dir.join("g-1.png"));
    d
}

/// The gradients of the projection (and, with `lora`, of adapters on q and down) against
/// central finite differences of the loss, on the fused kernels and on candle's op-by-op
/// path (what a GPU runs), f32.
#[test]
fn projection_gradient_matches_finite_differences() {
    for fused in [true, false] {
        assert_eq!(gradients_match_finite_differences(fused, false), 18);
    }
}

#[test]
fn adapter_gradients_match_finite_differences() {
    for fused in [true, false] {
        // 3 entries of the projection's 6 tensors, and of A and B of the 2 adapters in
        // each of the 2 layers.
        assert_eq!(gradients_match_finite_differences(fused, true), 18 + 24);
    }
}

/// Checks three entries of every trained tensor; returns how many were checked.
fn gradients_match_finite_differences(fused: bool, lora: bool) -> usize {
    let dir = tmpdir(&format!("fd-{fused}-{lora}"));
    let d = two_image_dialogue(&dir);
    let mut llm = tiny_llm();
    llm.model = llm.model.clone().with_backend(backend(fused)).unwrap();
    if lora {
        let cfg = farcer::model::lora::LoraConfig {
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "down_proj".into()],
            ..Default::default()
        };
        llm.model.add_lora(&cfg, 1).unwrap();
        // B starts at zero; with values, A's gradient is not zero either.
        let mut r = farcer::util::Rng::new(2);
        for (name, v) in llm.model.lora_vars() {
            if name.contains("lora_B") {
                let data: Vec<f32> = (0..v.elem_count())
                    .map(|_| (r.normal() * 0.3) as f32)
                    .collect();
                v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }
    let mut f = farcer_with(llm, 6, 3, 1);
    with_fake_vectors(&mut f, &d, 6);
    let cfg = PromptConfig {
        shots: 0,
        past_labels: false,
        images: true,
    };
    let ps = eval::prepare_set(&f.llm, &d.labels, &cfg, PromptSet::empty(0), None).unwrap();
    let ctx = &d.dialogues[0].utterances;
    let w = TokenWeights::balanced(&[target_tokens(&f, "on").unwrap()], f.llm.end_of_turn);
    // Adapters change the prompt prefix, so its cache cannot be used with them.
    let use_cache = !lora;
    let loss_now = || {
        sample_loss(
            &f,
            &ps,
            ctx,
            None,
            "on",
            &w,
            use_cache,
            Some(&mut Dropout::new(0)),
        )
        .unwrap()
    };
    let grads = loss_now().backward().unwrap();
    let mut vars = f.projection_vars();
    vars.extend(f.llm.model.lora_vars());
    let mut checked = 0;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for k in [0, base.len() / 2, base.len() - 1] {
            let h = 1e-2f32;
            let eval_at = |delta: f32| {
                let mut p = base.clone();
                p[k] += delta;
                var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = loss_now().to_scalar::<f32>().unwrap() as f64;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                l
            };
            let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h as f64);
            let err = (fd - g[k] as f64).abs();
            assert!(
                err <= 2e-3 + 2e-2 * fd.abs(),
                "{} {name}[{k}]: finite difference {fd}, gradient {}",
                if fused { "kernels" } else { "candle" },
                g[k]
            );
            checked += 1;
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
    checked
}

#[test]
fn prefix_cache_changes_neither_loss_nor_gradient_and_frozen_weights_get_none() {
    let dir = tmpdir("cache");
    let d = two_image_dialogue(&dir);
    let mut f = farcer_with(tiny_llm(), 6, 1, 2);
    with_fake_vectors(&mut f, &d, 6);
    let pool = synthetic(&dir.join("pool"), "p", 2, 5);
    // One example: the byte-level tiny tokenizer makes prompts long for its 512 positions.
    let cfg = PromptConfig {
        shots: 1,
        past_labels: false,
        images: true,
    };
    let ps = eval::prepare_set(
        &f.llm,
        &d.labels,
        &cfg,
        PromptSet::draw(&pool, 1, 0).unwrap(),
        None,
    )
    .unwrap();
    assert!(ps.prompter.prefix.len() > 100 && ps.cache.len() == ps.prompter.prefix.len());
    let ctx = &d.dialogues[0].utterances;
    let w = TokenWeights::balanced(&[target_tokens(&f, "he").unwrap()], f.llm.end_of_turn);
    let a = sample_loss(
        &f,
        &ps,
        ctx,
        None,
        "he",
        &w,
        true,
        Some(&mut Dropout::new(0)),
    )
    .unwrap();
    let b = sample_loss(
        &f,
        &ps,
        ctx,
        None,
        "he",
        &w,
        false,
        Some(&mut Dropout::new(0)),
    )
    .unwrap();
    let (la, lb) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!((la - lb).abs() <= 1e-5 * la.abs().max(1.0), "{la} vs {lb}");
    let ga = a.backward().unwrap();
    let gb = b.backward().unwrap();
    for (name, v) in f.projection_vars() {
        let d = max_abs_diff(
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
        );
        let scale = ga
            .get(v.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 * scale.max(1e-3), "{name}: {d}");
    }
    for w in f.llm.model.frozen_weights() {
        assert!(
            ga.get(w).is_none() && gb.get(w).is_none(),
            "a frozen weight got a gradient"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The label is only in the image: the trained projection must reach 90% on held-out
/// dialogues; without images, predictions stay within 10 points of chance (25%).
#[test]
fn projection_learns_labels_only_the_images_show() {
    let dir = tmpdir("learn");
    let train = synthetic(&dir.join("train"), "train", 10, 1);
    let test = synthetic(&dir.join("test"), "test", 6, 2);
    // farcer's own seeded, untrained ViT (the one the demo uses), written in HF layout.
    let vit_dir = dir.join("vit");
    let enc = demo_vit(&vit_dir, 0);
    let load = steerable_llm(&dir, 7);
    let mut f = farcer_with(load(), enc.dim(), 1, 3);
    let failed = f
        .load_vectors(&enc, &dir.join("vectors"), &[&train, &test], &|_, _| {})
        .unwrap();
    assert!(failed.is_empty());
    assert_eq!(f.vectors.len(), 64, "every PNG went through the ViT once");

    let cfg = farcer::train::TrainConfig::from_toml(
        "kind = \"base\"\ndata = \"demo\"\n[prompt]\nshots = 0\nsets = 1\n[optim]\nepochs = 12\nlr = 0.01\npatience = 12\n",
        "test",
    )
    .unwrap();
    let manifest = farcer::farcer::Manifest {
        farcer_version: "test".into(),
        kind: Kind::Base,
        llm: f.llm.name.clone(),
        llm_sha256: None,
        vision: Some(enc.name.clone()),
        vision_key: Some(enc.key.clone()),
        after_norm: false,
        projection: f.projection.as_ref().map(|p| p.config.clone()),
        lora: None,
        prompt: cfg.prompt_config(),
        labels: train.labels.clone(),
        data: "synthetic".into(),
        epoch: 0,
        step: 0,
        val_weighted_f1: None,
    };
    let data = farcer::train::RunData {
        train: train.clone(),
        val: test.clone(),
        pool: None,
    };
    let out = dir.join("run");
    let s = farcer::train::train(
        &mut f,
        &cfg,
        &data,
        &manifest,
        &out,
        false,
        &farcer::train::Quiet,
    )
    .unwrap();
    assert!(s.best_val_weighted_f1.is_some());
    for l in std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"epoch\","))
    {
        eprintln!("{l}");
    }
    // Load the best checkpoint back and evaluate it on the held-out split.
    let (mut g, _) = farcer::farcer::load_checkpoint(&s.best_dir, load(), &Device::Cpu).unwrap();
    g.load_vectors(&enc, &dir.join("vectors"), &[&test], &|_, _| {})
        .unwrap();
    let opts = EvalOptions::new(Scope::Last, cfg.prompt_config());
    let r = eval::evaluate(&g, &test, None, &opts, &|_, _| {}).unwrap();
    let acc = r.sets[0].scores.accuracy;
    assert!(acc >= 90.0, "accuracy with images {acc}");
    // The shuffled-image control: every image is another dialogue's, so the labels it
    // shows are those of random dialogues and accuracy falls to chance.
    let shuffled = EvalOptions {
        image_control: eval::ImageControl::Shuffle,
        ..opts.clone()
    };
    let r = eval::evaluate(&g, &test, None, &shuffled, &|_, _| {}).unwrap();
    let acc_c = r.sets[0].scores.accuracy;
    assert!(acc_c <= 45.0, "accuracy with shuffled images {acc_c}");
    // The same model without images: nothing tells the labels apart.
    g.vectors.clear();
    let r = eval::evaluate(&g, &test, None, &opts, &|_, _| {}).unwrap();
    let acc0 = r.sets[0].scores.accuracy;
    assert!(
        (acc0 - 25.0).abs() <= 10.0,
        "accuracy without images {acc0}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn manifest_for(
    f: &Farcer,
    cfg: &farcer::train::TrainConfig,
    labels: &[String],
) -> farcer::farcer::Manifest {
    farcer::farcer::Manifest {
        farcer_version: "test".into(),
        kind: f.kind,
        llm: f.llm.name.clone(),
        llm_sha256: None,
        vision: Some("fake".into()),
        vision_key: Some("fake".into()),
        after_norm: false,
        projection: f.projection.as_ref().map(|p| p.config.clone()),
        lora: cfg.lora.clone(),
        prompt: cfg.prompt_config(),
        labels: labels.to_vec(),
        data: "synthetic".into(),
        epoch: 0,
        step: 0,
        val_weighted_f1: None,
    }
}

struct StopAfter(std::cell::Cell<usize>);
impl farcer::train::Observer for StopAfter {
    fn should_stop(&self) -> bool {
        let n = self.0.get();
        self.0.set(n.saturating_sub(1));
        n <= 1
    }
}

/// A run stopped after its first epoch and resumed ends with the same weights, log and
/// checkpoints as one that ran straight through; partial-epoch log lines are dropped.
#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tmpdir("resume");
    let load = steerable_llm(&dir, 3);
    let train = synthetic(&dir.join("train"), "train", 3, 1);
    let val = synthetic(&dir.join("val"), "val", 1, 2);
    let cfg = farcer::train::TrainConfig::from_toml(
        "kind = \"three-layer\"\ndata = \"demo\"\n[prompt]\nshots = 0\nsets = 1\n[projection]\ndropout = 0.3\n[optim]\nepochs = 3\nlr = 0.01\ngrad_accum = 2\nwarmup_steps = 2\n",
        "test",
    )
    .unwrap();
    let make = || {
        let mut f = farcer_with(load(), 6, 3, 9);
        f.kind = Kind::ThreeLayer;
        f.projection = Some(
            Projection::new(
                ProjectionConfig {
                    layers: 3,
                    dropout: 0.3,
                    in_dim: 6,
                    out_dim: 64,
                },
                9,
                &Device::Cpu,
            )
            .unwrap(),
        );
        with_fake_vectors(&mut f, &train, 6);
        with_fake_vectors(&mut f, &val, 6);
        f
    };
    let data = farcer::train::RunData {
        train: train.clone(),
        val: val.clone(),
        pool: None,
    };
    let mut a = make();
    let m = manifest_for(&a, &cfg, &train.labels);
    farcer::train::train(
        &mut a,
        &cfg,
        &data,
        &m,
        &dir.join("a"),
        false,
        &farcer::train::Quiet,
    )
    .unwrap();

    let mut b = make();
    let s = farcer::train::train(
        &mut b,
        &cfg,
        &data,
        &m,
        &dir.join("b"),
        false,
        &StopAfter(std::cell::Cell::new(1)),
    )
    .unwrap();
    assert_eq!(s.epochs_run, 1);
    for f in [
        "manifest.json",
        "projection.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(dir.join("b/last").join(f).is_file(), "{f}");
    }
    // A crash in the middle of epoch 2 leaves step lines the resumed run must not keep.
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("b/metrics.jsonl"))
        .unwrap();
    writeln!(
        log,
        "{{\"event\":\"step\",\"epoch\":1,\"step\":99,\"loss\":1.0,\"lr\":0.1,\"seconds\":0.1}}"
    )
    .unwrap();
    let mut c = make();
    farcer::train::train(
        &mut c,
        &cfg,
        &data,
        &m,
        &dir.join("b"),
        true,
        &farcer::train::Quiet,
    )
    .unwrap();
    for ((name, va), (_, vc)) in a.projection_vars().iter().zip(c.projection_vars().iter()) {
        let d = max_abs_diff(va.as_tensor(), vc.as_tensor());
        assert!(d <= 1e-6, "{name} differs by {d} after resume");
    }
    let la = std::fs::read_to_string(dir.join("a/metrics.jsonl")).unwrap();
    let lb = std::fs::read_to_string(dir.join("b/metrics.jsonl")).unwrap();
    let strip = |s: &str| {
        s.lines()
            .map(|l| l.split(",\"seconds\"").next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&la), strip(&lb));
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        // `.lock` is the run folder's lock, not a leftover.
        .filter(|n| n != ".lock")
        .filter(|n| n.to_string_lossy().starts_with('.') || n.to_string_lossy().contains("staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn nan_loss_stops_with_a_clear_message_and_bad_configs_are_named() {
    let dir = tmpdir("nan");
    let train = synthetic(&dir.join("train"), "train", 1, 1);
    let mut f = farcer_with(tiny_llm(), 6, 1, 1);
    with_fake_vectors(&mut f, &train, 6);
    for v in f.vectors.values_mut() {
        v[0] = f32::NAN;
    }
    let cfg = farcer::train::TrainConfig::from_toml(
        "kind = \"base\"\ndata = \"demo\"\n[prompt]\nshots = 0\nsets = 1\n",
        "t",
    )
    .unwrap();
    let m = manifest_for(&f, &cfg, &train.labels);
    let data = farcer::train::RunData {
        train: train.clone(),
        val: train.clone(),
        pool: None,
    };
    let e = farcer::train::train(
        &mut f,
        &cfg,
        &data,
        &m,
        &dir.join("run"),
        false,
        &farcer::train::Quiet,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("loss is NaN"), "{e}");
    assert!(
        !dir.join("run/last").exists(),
        "no checkpoint from a diverged run"
    );

    let e = farcer::train::TrainConfig::from_toml(
        "kind = \"base\"\ndata = \"demo\"\n[optim]\nlearning_rate = 1\n",
        "cfg.toml",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("cfg.toml") && e.to_string().contains("learning_rate"),
        "{e}"
    );
    let e = farcer::train::TrainConfig::from_toml(
        "kind = \"finetuned\"\ndata = \"demo\"\n",
        "cfg.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("[lora]"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every numeric training setting outside its range is refused when the config is read,
/// naming the file, the field and the value.
#[test]
fn out_of_range_training_settings_are_refused_by_name() {
    let cases = [
        ("[optim]\nlr = -1e-4", "optim.lr"),
        ("[optim]\nlr = nan", "optim.lr"),
        ("[optim]\nlr = inf", "optim.lr"),
        ("[optim]\nweight_decay = -0.1", "optim.weight_decay"),
        ("[optim]\nweight_decay = nan", "optim.weight_decay"),
        ("[projection]\ndropout = 1.0", "projection.dropout"),
        ("[projection]\ndropout = -0.1", "projection.dropout"),
        ("[projection]\ndropout = nan", "projection.dropout"),
        ("[prompt]\neval_set = 10", "prompt.eval_set"),
    ];
    for (section, field) in cases {
        let text = format!("kind = \"base\"\ndata = \"demo\"\n{section}\n");
        let e = farcer::train::TrainConfig::from_toml(&text, "cfg.toml")
            .expect_err(section)
            .to_string();
        assert!(
            e.contains("cfg.toml") && e.contains(field),
            "{section}: {e}"
        );
    }
    let lora = |body: &str| format!("kind = \"finetuned\"\ndata = \"demo\"\n[lora]\n{body}\n");
    for (body, field) in [
        ("dropout = 1.5", "lora.dropout"),
        ("r = 0", "lora.r"),
        ("alpha = -16.0", "lora.alpha"),
        ("target_modules = []", "lora.target_modules"),
    ] {
        let e = farcer::train::TrainConfig::from_toml(&lora(body), "cfg.toml")
            .expect_err(body)
            .to_string();
        assert!(e.contains(field), "{body}: {e}");
    }
    // In range, all accepted.
    let ok = "kind = \"base\"\ndata = \"demo\"\n[optim]\nlr = 1e-4\nweight_decay = 0.0\nwarmup_steps = 3\n[projection]\ndropout = 0.0\n";
    let cfg = farcer::train::TrainConfig::from_toml(ok, "cfg.toml").unwrap();
    // A warm-up as long as the run is refused once the run's length is known.
    assert!(cfg.check_warmup(4, "cfg.toml").is_ok());
    let e = cfg.check_warmup(3, "cfg.toml").unwrap_err().to_string();
    assert!(e.contains("optim.warmup_steps = 3"), "{e}");
}

/// Fine-tuned FARCER (LoRA on q, k, v + projection; the prefix recomputed each step)
/// reaches at least the base model's held-out accuracy on the image-only set.
#[test]
fn lora_training_reaches_at_least_the_base_score() {
    let dir = tmpdir("lora-learn");
    let train = synthetic(&dir.join("train"), "train", 8, 1);
    let test = synthetic(&dir.join("test"), "test", 4, 2);
    let vit_dir = dir.join("vit");
    let enc = demo_vit(&vit_dir, 0);
    let load = steerable_llm(&dir, 7);
    let opts = EvalOptions::new(
        Scope::Last,
        PromptConfig {
            shots: 0,
            past_labels: false,
            images: true,
        },
    );
    let score = |kind: &str, lora: &str| -> f64 {
        let cfg = farcer::train::TrainConfig::from_toml(
            &format!("kind = \"{kind}\"\ndata = \"demo\"\n[prompt]\nshots = 0\nsets = 1\n[optim]\nepochs = 8\nlr = 0.01\npatience = 8\n{lora}"),
            "test",
        )
        .unwrap();
        let mut llm = load();
        if let Some(l) = &cfg.lora {
            llm.model.add_lora(l, 0).unwrap();
        }
        let mut f = farcer_with(llm, enc.dim(), 1, 3);
        f.kind = cfg.kind;
        f.load_vectors(&enc, &dir.join("vectors"), &[&train, &test], &|_, _| {})
            .unwrap();
        let m = manifest_for(&f, &cfg, &train.labels);
        let data = farcer::train::RunData {
            train: train.clone(),
            val: test.clone(),
            pool: None,
        };
        let s = farcer::train::train(
            &mut f,
            &cfg,
            &data,
            &m,
            &dir.join(kind),
            false,
            &farcer::train::Quiet,
        )
        .unwrap();
        let (mut g, m2) =
            farcer::farcer::load_checkpoint(&s.best_dir, load(), &Device::Cpu).unwrap();
        assert_eq!(m2.lora.is_some(), kind == "finetuned");
        assert_eq!(
            g.llm.model.has_lora(),
            kind == "finetuned",
            "the checkpoint brings its adapters back"
        );
        g.load_vectors(&enc, &dir.join("vectors"), &[&test], &|_, _| {})
            .unwrap();
        eval::evaluate(&g, &test, None, &opts, &|_, _| {})
            .unwrap()
            .sets[0]
            .scores
            .accuracy
    };
    let base = score("base", "");
    let lora = score("finetuned", "[lora]\nr = 4\nalpha = 8.0\ndropout = 0.1\n");
    eprintln!("base {base}, finetuned {lora}");
    assert!(base >= 75.0, "base accuracy {base}");
    assert!(lora >= base, "fine-tuned {lora} < base {base}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A four-utterance dialogue, every utterance labelled; images on utterances 0, 2, 3.
fn four_turns(dir: &Path) -> Dataset {
    let texts = [("A", "Hi."), ("B", "No!"), ("A", "Ok?"), ("B", "Ya.")];
    let utterances = texts
        .iter()
        .enumerate()
        .map(|(i, (s, t))| {
            let mut u = Utterance::new(i.to_string(), *s, *t).with_label(LABELS[(i * 3 + 1) % 4]);
            if i != 1 {
                u.image = Some(dir.join(format!("four-{i}.png")));
            }
            u
        })
        .collect();
    Dataset {
        corpus: "synthetic".into(),
        split: "train".into(),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        dialogues: vec![Dialogue {
            id: "four".into(),
            utterances,
        }],
        max_context: None,
    }
}

/// Every target of a dialogue scored in one packed pass gives the sum of the per-prefix
/// samples' losses and its gradients (f32, 1e-5): with and without past labels, with and
/// without images, with the prefix cache and with LoRA (on q, v and the MLP), and when
/// the dialogue is cut to fit so that later targets keep a shorter context (two passes).
#[test]
fn one_pass_over_a_dialogue_equals_the_per_prefix_samples() {
    let dir = tmpdir("onepass");
    let d = four_turns(&dir);
    let unit = farcer::train::units(d.samples(Scope::All)).remove(0);
    assert_eq!(unit.samples.len(), 4);
    let targets: Vec<Vec<u32>> = LABELS
        .iter()
        .map(|l| tiny_llm().answer_tokens(l).unwrap())
        .collect();
    let mut cases = 0;
    for lora in [false, true] {
        let mut f = farcer_with(tiny_llm(), 5, 1, 4);
        with_fake_vectors(&mut f, &d, 5);
        let mut vars = f.projection_vars();
        if lora {
            let cfg = farcer::model::lora::LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
            };
            let lv = f.llm.model.add_lora(&cfg, 9).unwrap();
            // A fresh B is zero; make it not, so that every adapter weight matters.
            for (k, (_, v)) in lv.iter().enumerate() {
                let r = v.as_tensor().ones_like().unwrap();
                let noise = (r.affine(0.0, 0.0).unwrap()
                    + Tensor::rand(-0.05f32, 0.05, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
                if k % 2 == 1 {
                    v.set(&noise).unwrap();
                }
            }
            vars.extend(lv);
        }
        let w = TokenWeights::balanced(&targets, f.llm.end_of_turn);
        for past_labels in [false, true] {
            for images in [false, true] {
                // No examples: the byte-level tokenizer makes them long for 512 positions;
                // the system turn is the cached prefix.
                let cfg = PromptConfig {
                    shots: 0,
                    past_labels,
                    images,
                };
                let set = PromptSet::empty(0);
                // A limit one token short of the whole dialogue's prompt: the last target
                // loses its first utterance, the others keep theirs.
                let whole = eval::prepare_set(&f.llm, &d.labels, &cfg, set.clone(), None).unwrap();
                let has = |u: &Utterance| {
                    images && u.image.as_ref().is_some_and(|p| f.vectors.contains_key(p))
                };
                let all = &d.dialogues[0].utterances;
                let enc = whole.prompter.encode(all, &|i| has(&all[i]), None).unwrap();
                assert_eq!(enc.dropped, 0);
                let len = enc.len();
                let cut = whole.prompter.prefix.len() + len + whole.prompter.answer_room - 1;
                for (use_cache, max_tokens) in [
                    (true, None),
                    (false, None),
                    (true, Some(cut)),
                    (false, Some(cut)),
                ] {
                    if lora && use_cache {
                        continue;
                    }
                    let ps = eval::prepare_set(&f.llm, &d.labels, &cfg, set.clone(), max_tokens)
                        .unwrap();
                    let what = format!(
                        "lora {lora}, past labels {past_labels}, images {images}, cache {use_cache}, max {max_tokens:?}"
                    );
                    let drops: Vec<usize> = unit
                        .samples
                        .iter()
                        .map(|s| {
                            let ctx = d.context(s);
                            ps.prompter
                                .encode(ctx, &|i| has(&ctx[i]), None)
                                .unwrap()
                                .dropped
                        })
                        .collect();
                    if max_tokens.is_some() {
                        assert!(
                            drops == [0, 0, 0, 1],
                            "{what}: the cut must split the targets, drops {drops:?}"
                        );
                    }
                    let (one, n) = farcer::train::dialogue_loss(
                        &f,
                        &ps,
                        &d,
                        &unit,
                        &w,
                        use_cache,
                        Some(&mut Dropout::new(0)),
                    )
                    .unwrap();
                    assert_eq!(n, 4);
                    let mut sum: Option<Tensor> = None;
                    for s in &unit.samples {
                        let l = sample_loss(
                            &f,
                            &ps,
                            d.context(s),
                            None,
                            d.gold(s),
                            &w,
                            use_cache,
                            Some(&mut Dropout::new(0)),
                        )
                        .unwrap();
                        sum = Some(match sum {
                            Some(t) => (t + l).unwrap(),
                            None => l,
                        });
                    }
                    let sum = sum.unwrap();
                    let (a, b) = (
                        one.to_scalar::<f32>().unwrap(),
                        sum.to_scalar::<f32>().unwrap(),
                    );
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{what}: {a} vs {b}"
                    );
                    let (ga, gb) = (one.backward().unwrap(), sum.backward().unwrap());
                    let mut compared = 0;
                    for (name, v) in &vars {
                        let (Some(x), Some(y)) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()))
                        else {
                            assert!(
                                ga.get(v.as_tensor()).is_none() && gb.get(v.as_tensor()).is_none(),
                                "{what}: {name} has a gradient on one side only"
                            );
                            continue;
                        };
                        let scale = max_abs(y).max(1e-3);
                        let diff = max_abs_diff(x, y);
                        assert!(
                            diff <= 1e-5 * scale.max(1.0),
                            "{what}: {name} gradient differs by {diff} (scale {scale})"
                        );
                        compared += 1;
                    }
                    let want = if images { vars.len() } else { vars.len() - 2 };
                    assert_eq!(compared, want, "{what}: gradients compared");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 24);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kind = "text-lora"`: no projection and no images; LoRA (here on q, v and the MLP's
/// down projection) trains every utterance in one pass per dialogue, the checkpoint is a
/// plain PEFT adapter of the base LLM (no `lm.` prefix, no projection, task CAUSAL_LM), and
/// loading it back gives the same weights and the same predictions.
#[test]
fn text_lora_trains_and_saves_a_plain_peft_adapter() {
    let dir = tmpdir("textlora");
    let load = steerable_llm(&dir, 5);
    let train = synthetic(&dir.join("train"), "train", 2, 1);
    let val = synthetic(&dir.join("val"), "val", 1, 2);
    let cfg = farcer::train::TrainConfig::from_toml(
        "kind = \"text-lora\"\ndata = \"demo\"\ntrain_scope = \"all\"\nval_scope = \"all\"\n[prompt]\nshots = 0\nsets = 1\n[lora]\nr = 2\nalpha = 4.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n[optim]\nepochs = 2\nlr = 0.01\n",
        "test",
    )
    .unwrap();
    assert!(!cfg.prompt_config().images);
    let mut llm = load();
    llm.model.add_lora(cfg.lora.as_ref().unwrap(), 3).unwrap();
    let mut f = Farcer::new(llm, None, Kind::TextLora);
    let m = manifest_for(&f, &cfg, &train.labels);
    assert!(m.projection.is_none());
    let data = farcer::train::RunData {
        train: train.clone(),
        val: val.clone(),
        pool: None,
    };
    let out = dir.join("run");
    let s =
        farcer::train::train(&mut f, &cfg, &data, &m, &out, false, &farcer::train::Quiet).unwrap();
    let best = s.best_dir;
    assert!(!best.join("projection.safetensors").exists());
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert!(cfg_json["modules_to_save"].is_null());
    let saved =
        candle_core::safetensors::load(best.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // 2 layers x 3 modules x (A, B), all under the plain causal-LM prefix.
    assert_eq!(saved.len(), 12);
    assert!(
        saved
            .keys()
            .all(|k| k.starts_with("base_model.model.model.layers.")),
        "{:?}",
        saved.keys().collect::<Vec<_>>()
    );
    // The trained model holds the last epoch's weights.
    let (g, gm) = farcer::farcer::load_checkpoint(&out.join("last"), load(), &Device::Cpu).unwrap();
    assert_eq!(gm.kind, Kind::TextLora);
    assert!(g.projection.is_none());
    let opts = EvalOptions::new(Scope::All, cfg.prompt_config());
    let a = eval::evaluate(&f, &val, None, &opts, &|_, _| {}).unwrap();
    let b = eval::evaluate(&g, &val, None, &opts, &|_, _| {}).unwrap();
    assert_eq!(a.predictions.len(), 8);
    for (x, y) in a.predictions.iter().zip(&b.predictions) {
        let (px, py) = (x.probs.as_ref().unwrap(), y.probs.as_ref().unwrap());
        for ((_, p), (_, q)) in px.iter().zip(py.iter()) {
            assert!((p - q).abs() <= 1e-6, "{p} vs {q}");
        }
    }
    // The adapter learned something: it is not the fresh one (B = 0).
    let b_norm: f32 = saved
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, v)| max_abs(v))
        .fold(0.0, f32::max);
    assert!(b_norm > 1e-4, "{b_norm}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Constrained evaluation scores a dialogue's samples in one packed pass; each sample's
/// probabilities equal those of its own prompt scored alone (1e-5), with and without past
/// labels and images, and when the dialogue is cut to fit (two passes).
#[test]
fn one_pass_evaluation_equals_each_sample_alone() {
    let dir = tmpdir("evalpass");
    let d = four_turns(&dir);
    let mut f = farcer_with(tiny_llm(), 5, 1, 6);
    with_fake_vectors(&mut f, &d, 5);
    let cands = farcer::decode::LabelTokens::new(&f.llm, &d.labels).unwrap();
    let mut cases = 0;
    for past_labels in [false, true] {
        for images in [false, true] {
            let prompt = PromptConfig {
                shots: 0,
                past_labels,
                images,
            };
            let whole =
                eval::prepare_set(&f.llm, &d.labels, &prompt, PromptSet::empty(0), None).unwrap();
            let all = &d.dialogues[0].utterances;
            let has = |i: usize| eval::InputBuilder::has_image(&f, &all[i]);
            let len = whole.prompter.encode(all, &has, None).unwrap().len();
            let cut = whole.prompter.prefix.len() + len + whole.prompter.answer_room - 1;
            for max_tokens in [None, Some(cut)] {
                let opts = EvalOptions {
                    max_tokens,
                    ..EvalOptions::new(Scope::All, prompt.clone())
                };
                let r = eval::evaluate(&f, &d, None, &opts, &|_, _| {}).unwrap();
                let ps =
                    eval::prepare_set(&f.llm, &d.labels, &prompt, PromptSet::empty(0), max_tokens)
                        .unwrap();
                assert_eq!(r.predictions.len(), 4);
                for (s, rec) in d.samples(Scope::All).iter().zip(&r.predictions) {
                    let (alone, enc) =
                        eval::predict_one(&f, &ps, d.context(s), None, Decode::Constrained, &cands)
                            .unwrap();
                    assert_eq!(rec.dropped, enc.dropped);
                    let p = rec.probs.as_ref().unwrap();
                    for ((_, a), b) in p.iter().zip(alone.probs.unwrap()) {
                        assert!(
                            (a - b).abs() <= 1e-5,
                            "past labels {past_labels}, images {images}, max {max_tokens:?}: {a} vs {b}"
                        );
                    }
                    assert_eq!(rec.pred, alone.label);
                }
                if max_tokens.is_some() {
                    assert_eq!(r.truncated, 1, "the last sample is cut");
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 8);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `TrainConfig::new` is the file that holds only `kind` and `data` (plus `[lora]` for
/// the kinds with adapters): the same defaults, without formatting TOML text.
#[test]
fn train_config_new_equals_the_minimal_file() {
    use farcer::farcer::Kind;
    use farcer::train::TrainConfig;
    for kind in [
        Kind::Base,
        Kind::ThreeLayer,
        Kind::Finetuned,
        Kind::TextLora,
    ] {
        let lora = if kind.has_lora() { "[lora]\n" } else { "" };
        let text = format!("kind = {:?}\ndata = \"demo\"\n{lora}", kind.name());
        let from_file = TrainConfig::from_toml(&text, "minimal.toml").unwrap();
        let made = TrainConfig::new(kind, "demo");
        assert_eq!(made.to_toml(), from_file.to_toml(), "{}", kind.name());
        assert_eq!(made.lora.is_some(), kind.has_lora());
    }
}

/// A seeded steerable tiny Llama written into `dir/llm`, and a loader of fresh copies.
fn steerable_llm(dir: &std::path::Path, seed: u64) -> impl Fn() -> farcer::model::Llm {
    let llm_dir = dir.join("llm");
    write_steerable_llama(&llm_dir, seed);
    move || farcer::model::load_llm(llm_dir.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap()
}
