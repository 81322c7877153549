//! The `farcer` binary as a user runs it: evaluation outputs, predictions from a
//! checkpoint (JSON lines and a single JSON object), adapters out and back in, and errors
//! that name the file.

#[path = "../../../tests/common/mod.rs"]
mod common;
use candle_core::{DType, Device};
use common::*;
mod support;
use std::path::{Path, PathBuf};
use support::farcer;

fn tmpdir(name: &str) -> PathBuf {
    support::tmpdir("cli", name)
}

#[test]
fn eval_writes_every_output() {
    let dir = tmpdir("eval");
    let out = dir.join("run");
    let llm = fixture("tiny-llama");
    let (ok, stdout, stderr) = farcer(&[
        "eval",
        "--llm",
        llm.to_str().unwrap(),
        "--data",
        "demo",
        "--split",
        "test",
        "--shots",
        "0",
        "--decode",
        "constrained",
        "--limit",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("weighted F1"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for k in [
        "weighted_f1",
        "macro_f1",
        "accuracy",
        "n",
        "invalid",
        "per_label",
        "confusion",
    ] {
        assert!(r.get(k).is_some(), "report.json lacks {k}");
    }
    assert_eq!(r["n"], 6);
    assert_eq!(
        r["confusion"]["labels"].as_array().unwrap().last().unwrap(),
        "invalid"
    );
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 6);
    let p: serde_json::Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    for k in ["dialogue_id", "utterance_id", "gold", "pred", "probs"] {
        assert!(p.get(k).is_some(), "prediction lacks {k}");
    }
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("| Model |"));
    let png = image::open(out.join("confusion.png")).unwrap();
    assert!(png.width() > 200 && png.height() > 200);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Trains a tiny checkpoint through the library (the CLI's `train` needs a config file
/// naming real models; the learning itself is tested in training.rs).
fn tiny_checkpoint(dir: &Path, lora: bool) -> (PathBuf, PathBuf, PathBuf) {
    tiny_checkpoint_as(dir, lora, "auto")
}

/// [`tiny_checkpoint`] trained with the frozen models in `dtype`.
fn tiny_checkpoint_as(dir: &Path, lora: bool, dtype: &str) -> (PathBuf, PathBuf, PathBuf) {
    let vit = dir.join("vit");
    farcer::vision::VisionEncoder::write_random(
        &vit,
        0,
        &farcer::vision::demo_vit_config(),
        &farcer::vision::demo_preprocess(),
    )
    .unwrap();
    let llm = fixture("tiny-llama");
    let data = dir.join("data");
    for split in ["train", "dev"] {
        let mut d = farcer::data::demo::load(split);
        d.dialogues.truncate(7);
        farcer::data::demo::attach_images(&mut d, &data.join("images")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            data.join(format!("{split}.jsonl")),
            farcer::data::jsonl::to_jsonl(&d.dialogues),
        )
        .unwrap();
    }
    std::fs::write(
        data.join("labels.txt"),
        farcer::data::MELD_LABELS.join("\n"),
    )
    .unwrap();
    let cfg_text = format!(
        "kind = \"{}\"\nllm = {:?}\nvision = {:?}\ndata = \"jsonl:{}\"\ndtype = \"{dtype}\"\n[prompt]\nshots = 0\nsets = 1\n[optim]\nepochs = 1\nlr = 0.001\n[run]\nlimit_val = 3\n{}",
        if lora { "finetuned" } else { "base" },
        llm.to_str().unwrap(),
        vit.to_str().unwrap(),
        data.display(),
        if lora { "[lora]\nr = 2\n" } else { "" }
    );
    let cfg_path = dir.join("cfg.toml");
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    let run = dir.join("run");
    let (ok, _, stderr) = farcer(&[
        "train",
        "--config",
        cfg_path.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("epoch 1"),
        "epoch lines reach logs without a terminal: {stderr}"
    );
    (run.join("best"), vit, data)
}

/// Runs `farcer args` in `cwd` with `input` on standard input: (success, stdout, stderr).
fn farcer_stdin(args: &[&str], cwd: &Path, input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_farcer"))
        .current_dir(cwd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn predict_from_a_checkpoint_with_images() {
    let dir = tmpdir("predict");
    let (ck, _, data) = tiny_checkpoint(&dir, false);
    for (name, content) in [
        ("many.jsonl", std::fs::read_to_string(data.join("dev.jsonl")).unwrap()),
        (
            "one.json",
            format!(
                "{{\n  \"id\": \"solo\",\n  \"utterances\": [\n    {{\"speaker\": \"Ann\", \"text\": \"Okay.\", \"image\": \"{}\"}}\n  ]\n}}\n",
                data.join("images/demo-dev-000_0.png").display()
            ),
        ),
    ] {
        let f = dir.join(name);
        std::fs::write(&f, &content).unwrap();
        let (ok, stdout, stderr) = farcer(&["predict", "--checkpoint", ck.to_str().unwrap(), f.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        if name == "one.json" {
            // `predict -` reads standard input; a relative image path resolves against the
            // working directory, and the answer is the file's.
            let rel = content.replace(&format!("{}/", data.display()), "");
            assert!(rel.contains("\"images/demo-dev-000_0.png\""), "{rel}");
            let (ok2, stdout2, stderr2) = farcer_stdin(&["predict", "--checkpoint", ck.to_str().unwrap(), "-"], &data, &rel);
            assert!(ok2, "{stderr2}");
            assert_eq!(stdout2, stdout);
            // From another folder the image is not found, and the reason names it.
            let (ok3, stdout3, stderr3) = farcer_stdin(&["predict", "--checkpoint", ck.to_str().unwrap(), "-"], &dir, &rel);
            assert!(ok3 && stdout3 != stdout, "{stderr3}");
            assert!(stderr3.contains(&dir.join("images/demo-dev-000_0.png").display().to_string()), "{stderr3}");
        }
        let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), if name == "one.json" { 1 } else { 7 });
        for l in &lines {
            let probs = l["probs"].as_object().unwrap();
            assert_eq!(probs.len(), 7);
            let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
            assert!((sum - 1.0).abs() < 1e-6);
            assert!(probs.contains_key(l["label"].as_str().unwrap()));
        }
    }
    // Images outside the limits are refused, each named with its reason (a FIFO is never
    // opened, so nothing hangs), and the utterance is predicted without its image.
    let big = dir.join("big.png");
    image::RgbImage::from_pixel(50, 40, image::Rgb([std::process::id() as u8, 7, 9]))
        .save(&big)
        .unwrap();
    let fifo = dir.join("fifo.png");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let line = |id: &str, img: &Path| {
        format!(
            r#"{{"id": "{id}", "utterances": [{{"speaker": "A", "text": "Okay.", "image": "{}"}}]}}"#,
            img.display()
        )
    };
    let two = dir.join("two.jsonl");
    std::fs::write(&two, format!("{}\n{}\n", line("a", &big), line("b", &fifo))).unwrap();
    let args = [
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        two.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = support::farcer_env(&args, &[("FARCER_MAX_IMAGE_PIXELS", "1999")]);
    assert!(ok && stdout.lines().count() == 2, "{stderr}");
    assert!(stderr.contains("2 images could not be read"), "{stderr}");
    let want = format!(
        "{}: 50x40 is 2000 pixels, more than the 1999 allowed (set FARCER_MAX_IMAGE_PIXELS",
        big.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    let want = format!("{}: not a regular file (a FIFO)", fifo.display());
    assert!(stderr.contains(&want), "{stderr}");
    let (ok, _, stderr) = support::farcer_env(&args, &[("FARCER_MAX_IMAGE_BYTES", "32M")]);
    assert!(
        !ok && stderr.contains("FARCER_MAX_IMAGE_BYTES: `32M` is not a whole number"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn adapters_go_out_in_peft_layout_and_come_back() {
    let dir = tmpdir("adapter");
    let (ck, vit, data) = tiny_checkpoint(&dir, true);
    let peft = dir.join("peft");
    let (ok, _, stderr) = farcer(&[
        "adapter",
        "export",
        ck.to_str().unwrap(),
        "--out",
        peft.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["modules_to_save"][0], "mp.0");
    let back = dir.join("imported");
    let llm = fixture("tiny-llama");
    let (ok, _, stderr) = farcer(&[
        "adapter",
        "import",
        peft.to_str().unwrap(),
        "--llm",
        llm.to_str().unwrap(),
        "--vision",
        vit.to_str().unwrap(),
        "--shots",
        "0",
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    // The imported checkpoint predicts what the original does.
    let f = data.join("dev.jsonl");
    let a = farcer(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    let b = farcer(&[
        "predict",
        "--checkpoint",
        back.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    assert!(a.0 && b.0, "{} {}", a.2, b.2);
    assert_eq!(a.1, b.1);
    // A base checkpoint has no adapter to export.
    let (base_ck, _, _) = tiny_checkpoint(&dir.join("b"), false);
    let (ok, _, stderr) = farcer(&[
        "adapter",
        "export",
        base_ck.to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("without LoRA"), "{stderr}");
    let _ = (Device::Cpu, DType::F32);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_inputs_fail_with_messages_that_name_the_problem() {
    let dir = tmpdir("errors");
    let llm = fixture("tiny-llama");
    let out = dir.join("o");
    let (ok, _, e) = farcer(&[
        "eval",
        "--llm",
        llm.to_str().unwrap(),
        "--data",
        "meld:/no/such/dir",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("/no/such/dir/test_sent_emo.csv"), "{e}");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"utterances\": [{\"speaker\": \"A\", \"text\": \"hi\"}]}\n{\"id\": \"b\", \"utterances\": [{\"text\": \"no speaker\"}]}\n").unwrap();
    let (ok, _, e) = farcer(&[
        "predict",
        "--llm",
        llm.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert!(
        !ok && e.contains("bad.jsonl:2") && e.contains("speaker"),
        "{e}"
    );
    // An empty input is an error, not an empty answer with exit 0 (a file or stdin).
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, stdout, e) = farcer(&[
        "predict",
        "--llm",
        llm.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert!(
        !ok && stdout.is_empty() && e.contains("empty.jsonl: no dialogues"),
        "{e}"
    );
    let (ok, _, e) = farcer_stdin(&["predict", "--llm", llm.to_str().unwrap(), "-"], &dir, "");
    assert!(!ok && e.contains("<standard input>: no dialogues"), "{e}");
    let (ok, _, e) = farcer(&[
        "eval",
        "--llm",
        llm.to_str().unwrap(),
        "--data",
        "demo",
        "--prompt-set",
        "11",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("--prompt-set"), "{e}");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        "kind = \"base\"\ndata = \"demo\"\n[optim]\nepoch = 3\n",
    )
    .unwrap();
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        dir.join("r").to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("c.toml") && e.contains("epoch"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--init` starts from another checkpoint's weights (IEMOCAP from MELD): with a zero
/// learning rate the new run's projection is exactly the one it started from.
#[test]
fn init_starts_from_a_checkpoint() {
    let dir = tmpdir("init");
    let (ck, vit, data) = tiny_checkpoint(&dir, false);
    let cfg = dir.join("zero.toml");
    std::fs::write(
        &cfg,
        format!(
            "kind = \"base\"\nllm = {:?}\nvision = {:?}\ndata = \"jsonl:{}\"\nseed = 5\n[prompt]\nshots = 0\nsets = 1\n[optim]\nepochs = 1\nlr = 0.0\n[run]\nlimit_train = 2\nlimit_val = 2\n",
            fixture("tiny-llama").to_str().unwrap(),
            vit.to_str().unwrap(),
            data.display()
        ),
    )
    .unwrap();
    let run = dir.join("from-init");
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--init",
        ck.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok && e.contains("initialised from"), "{e}");
    let a =
        candle_core::safetensors::load(ck.join("projection.safetensors"), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(run.join("last/projection.safetensors"), &Device::Cpu)
        .unwrap();
    for (k, v) in &a {
        assert_eq!(max_abs_diff(v, &b[k]), 0.0, "{k}");
    }
    let saved: String = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("init = "),
        "the run's config records where it started"
    );
    // Resuming a finished run says so and succeeds, changing nothing.
    let before = std::fs::read(run.join("summary.json")).unwrap();
    let (ok, out, e) = farcer(&["train", "--resume", "--out", run.to_str().unwrap()]);
    assert!(ok && out.contains("already finished"), "{out}{e}");
    assert_eq!(std::fs::read(run.join("summary.json")).unwrap(), before);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Past labels from the model's own earlier predictions: every earlier utterance is
/// predicted first; the run reports where its past labels came from.
#[test]
fn predicted_past_labels() {
    let dir = tmpdir("pl");
    let out = dir.join("o");
    let (ok, _, e) = farcer(&[
        "eval",
        "--llm",
        fixture("tiny-llama").to_str().unwrap(),
        "--data",
        "demo",
        "--shots",
        "0",
        "--decode",
        "constrained",
        "--past-labels",
        "--past-labels-from",
        "predicted",
        "--limit",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["n"], 3);
    assert_eq!(r["past_labels"], true);
    assert_eq!(r["extra"]["past_source"], "predicted");
    assert!(r["name"].as_str().unwrap().ends_with("PL"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The text-only fine-tuned kind end to end: `--dry-run` sizes the run and writes nothing;
/// training on every utterance writes curves.png and a checkpoint without a projection,
/// which evaluates text-only and refuses an image control; a checkpoint with images runs
/// the shuffled-image control beside its real evaluation.
#[test]
fn text_lora_dry_run_train_eval_and_image_control() {
    let dir = tmpdir("textlora");
    let (image_ck, _, data) = tiny_checkpoint(&dir, false);
    let cfg = dir.join("text-lora.toml");
    std::fs::write(
        &cfg,
        format!(
            "kind = \"text-lora\"\nllm = {:?}\ndata = \"jsonl:{}\"\ntrain_scope = \"all\"\n[prompt]\nshots = 0\nsets = 1\n[lora]\nr = 2\ntarget_modules = [\"q_proj\", \"o_proj\"]\n[optim]\nepochs = 2\nlr = 0.001\n[run]\nlimit_train = 12\nlimit_val = 3\n",
            fixture("tiny-llama").to_str().unwrap(),
            data.display()
        ),
    )
    .unwrap();
    let run = dir.join("text-run");
    let (ok, stdout, stderr) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("12 targets (all scope)"), "{stdout}");
    assert!(
        stdout.contains("tokens per epoch") && stdout.contains("per epoch"),
        "{stdout}"
    );
    assert!(!run.exists(), "a dry run writes nothing");
    let (ok, _, stderr) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Text-only fine-tuned LLM"), "{stderr}");
    let png = std::fs::read(run.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let best = run.join("best");
    assert!(best.join("adapter_model.safetensors").is_file());
    assert!(!best.join("projection.safetensors").exists());
    // `eval` of a checkpoint on the dev split, with more flags.
    let data_arg = format!("jsonl:{}", data.display());
    let eval = |ck: &Path, more: &[&str], out: &Path| {
        let mut args = vec!["eval", "--checkpoint", ck.to_str().unwrap()];
        args.extend(["--data", &data_arg, "--split", "dev"]);
        args.extend(more);
        args.extend(["--out", out.to_str().unwrap()]);
        farcer(&args)
    };
    let out = dir.join("text-eval");
    let (ok, _, stderr) = eval(&best, &["--decode", "constrained", "--limit", "3"], &out);
    assert!(ok, "{stderr}");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["images"], false);
    assert_eq!(rep["n"], 3);
    let control = ["--limit", "3", "--image-control", "shuffle"];
    let (ok, _, stderr) = eval(&best, &control, &dir.join("x"));
    assert!(!ok && stderr.contains("takes no images"), "{stderr}");
    // A model with images: the control runs beside the real evaluation.
    let out = dir.join("image-eval");
    let (ok, stdout, stderr) = eval(
        &image_ck,
        &[
            "--decode",
            "constrained",
            "--limit",
            "4",
            "--image-control",
            "shuffle",
        ],
        &out,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("real - shuffled"), "{stdout}");
    let control: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("control.json")).unwrap()).unwrap();
    let shuffled: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("shuffled-images/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shuffled["image_control"], "shuffle");
    assert_eq!(control["shuffled"]["weighted_f1"], shuffled["weighted_f1"]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `farcer bench --shape` (what scripts/gpu-check runs on a GPU) on the CPU with the tiny
/// shape: every case runs and is written as JSON, on the fused kernels and on candle's
/// op-by-op path in bf16 (the GPU's path); the inputs for PyTorch name the same shape;
/// a bad shape is refused by name.
#[test]
fn shape_bench_runs_every_gpu_case_on_the_cpu() {
    let dir = tmpdir("shape");
    for (backend, dtype) in [("auto", "f32"), ("candle", "bf16")] {
        let json = dir.join(format!("{backend}.json"));
        let (ok, stdout, stderr) = farcer(&[
            "bench",
            "--shape",
            "tiny",
            "--backend",
            backend,
            "--dtype",
            dtype,
            "--reps",
            "1",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let cases: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["case"].as_str().unwrap())
            .collect();
        assert_eq!(
            cases,
            [
                "prefill-512",
                "farcer-step-7shot",
                "lora-step-7shot",
                "eval-constrained-7shot"
            ],
            "{stdout}"
        );
        for r in v.as_array().unwrap() {
            assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                r["what"].as_str().unwrap().contains(&dtype.to_uppercase()),
                "{r}"
            );
        }
    }
    let inputs = dir.join("inputs.json");
    let (ok, _, stderr) = farcer(&[
        "bench",
        "--shape",
        "llama3-8b",
        "--dump-inputs",
        inputs.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&inputs).unwrap()).unwrap();
    assert_eq!(v["config"]["hidden_size"], 4096);
    assert_eq!(v["config"]["num_key_value_heads"], 8);
    assert_eq!(v["config"]["vocab_size"], 128256);
    assert_eq!(v["config"]["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(v["prefix_ids"].as_array().unwrap().len(), 1382);
    let (ok, _, stderr) = farcer(&["bench", "--shape", "llama9", "--reps", "1"]);
    assert!(!ok);
    assert!(
        stderr.contains("--shape") && stderr.contains("llama3-8b"),
        "{stderr}"
    );
}

/// A checkpoint trained with the frozen models in bf16 (as on a GPU, here through candle's
/// ops on the CPU) predicts in f32 on the fused CPU kernels, and one trained in f32
/// predicts in bf16: the trainable weights are f32 either way. The two dtypes agree to
/// bf16's precision.
#[test]
fn checkpoints_move_between_dtypes() {
    let dir = tmpdir("dtypes");
    let predict = |ck: &Path, data: &Path, dtype: &str| -> Vec<serde_json::Value> {
        let (ok, stdout, stderr) = farcer(&[
            "predict",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--dtype",
            dtype,
            data.join("dev.jsonl").to_str().unwrap(),
        ]);
        assert!(ok, "{dtype}: {stderr}");
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for trained in ["bf16", "f32"] {
        let (ck, _, data) = tiny_checkpoint_as(&dir.join(trained), true, trained);
        let cfg =
            std::fs::read_to_string(ck.parent().unwrap().join("config.toml")).unwrap_or_default();
        assert!(cfg.contains(&format!("dtype = \"{trained}\"")), "{cfg}");
        let a = predict(&ck, &data, "f32");
        let b = predict(&ck, &data, "bf16");
        assert_eq!(a.len(), 7);
        assert_eq!(a.len(), b.len());
        let mut worst: f64 = 0.0;
        for (x, y) in a.iter().zip(&b) {
            for (k, p) in x["probs"].as_object().unwrap() {
                worst = worst.max((p.as_f64().unwrap() - y["probs"][k].as_f64().unwrap()).abs());
            }
        }
        assert!(
            worst < 0.05,
            "trained in {trained}: f32 and bf16 differ by {worst}"
        );
        assert!(worst > 0.0, "bf16 really ran in bf16");
    }
    let dev = dir.join("f32/data/dev.jsonl");
    let (ok, _, stderr) = farcer(&["predict", "--dtype", "f64", dev.to_str().unwrap()]);
    assert!(!ok && stderr.contains("--dtype"), "{stderr}");
}
