//! Crash consistency of `farcer train`, tested at every point: the run is killed (an
//! abort, as `kill -9` leaves it) before each file write, rename and removal in turn, then
//! resumed; its folder must end as an uninterrupted run's does. Also the folder lock and
//! Ctrl-C.

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::*;
mod support;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::{farcer, farcer_env};

/// A tiny run: the fixture Llama, a random ViT, three demo dialogues per split.
fn setup(dir: &Path, extra: &str) -> PathBuf {
    let vit = dir.join("vit");
    farcer::vision::VisionEncoder::write_random(
        &vit,
        0,
        &farcer::vision::demo_vit_config(),
        &farcer::vision::demo_preprocess(),
    )
    .unwrap();
    let data = dir.join("data");
    for split in ["train", "dev"] {
        let mut d = farcer::data::demo::load(split);
        d.dialogues.truncate(3);
        farcer::data::demo::attach_images(&mut d, &data.join("images")).unwrap();
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
    let cfg = dir.join("cfg.toml");
    std::fs::write(
        &cfg,
        format!(
            "kind = \"base\"\nllm = {:?}\nvision = {:?}\ndata = \"jsonl:{}\"\n[prompt]\nshots = 0\nsets = 1\n[optim]\nlr = 0.01\n{extra}\n[run]\nlimit_val = 2\n",
            fixture("tiny-llama").to_str().unwrap(),
            vit.to_str().unwrap(),
            data.display()
        ),
    )
    .unwrap();
    cfg
}

/// Every file under `dir` (relative path -> content), with wall-clock fields removed from
/// JSON and the folder's own path replaced. The lock file is left out: it is not part of
/// the run.
fn contents(dir: &Path) -> BTreeMap<String, String> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("seconds");
                m.remove("seconds_per_step");
                m.remove("seconds_per_sample");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            if rel == ".lock" {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            let text = if rel.ends_with(".json") || rel.ends_with(".jsonl") {
                // Paths inside the run folder name the folder.
                let s = String::from_utf8(bytes)
                    .unwrap()
                    .replace(&root.display().to_string(), "<out>");
                let values: Vec<serde_json::Value> = if rel.ends_with(".jsonl") {
                    s.lines()
                        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{rel}: {e}")))
                        .collect()
                } else {
                    vec![serde_json::from_str(&s).unwrap()]
                };
                values
                    .into_iter()
                    .map(|mut v| {
                        strip(&mut v);
                        v.to_string()
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            } else if rel.ends_with(".md") {
                // The timing at the end of the summary line is wall clock.
                String::from_utf8(bytes)
                    .unwrap()
                    .lines()
                    .map(|l| match l.rfind(", ") {
                        Some(i) if l.ends_with(" s per sample.") => &l[..i],
                        _ => l,
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                farcer::util::sha256_bytes(&bytes)
            };
            out.insert(rel, text);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn a_kill_at_any_write_loses_nothing() {
    let dir = support::tmpdir("crash", "every-write");
    // Three epochs with patience for all: `best/` is written at least once, and epochs
    // that are not the best leave it alone.
    let cfg = setup(&dir, "epochs = 3\npatience = 3");
    let cfg = cfg.to_str().unwrap();
    let reference = dir.join("reference");
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg,
        "--out",
        reference.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    let want = contents(&reference);
    for f in [
        "last/projection.safetensors",
        "last/optimizer.safetensors",
        "last/state.json",
        "best/state.json",
        "metrics.jsonl",
        "summary.json",
        "config.toml",
    ] {
        assert!(want.contains_key(f), "the run wrote {f}: {:?}", want.keys());
    }
    let (ok, out, _) = farcer(&["train", "--resume", "--out", reference.to_str().unwrap()]);
    assert!(ok && out.contains("already finished"), "{out}");
    assert_eq!(
        contents(&reference),
        want,
        "resuming a finished run changes nothing"
    );

    let mut points = 0;
    for n in 1..400 {
        let run = dir.join(format!("killed-at-{n}"));
        let r = run.to_str().unwrap();
        let at = n.to_string();
        let (ok, _, e) = farcer_env(
            &["train", "--config", cfg, "--out", r],
            &[("FARCER_CRASH_AT", &at)],
        );
        if ok {
            break; // past the run's last write
        }
        assert!(
            e.contains("FARCER_CRASH_AT="),
            "point {n}: the run failed on its own: {e}"
        );
        points = n;
        let (ok, _, e) = farcer(&["train", "--resume", "--out", r]);
        if !ok {
            // Killed before anything was saved: --resume says so; the user starts again.
            assert!(e.contains("no run that saved anything"), "point {n}: {e}");
            assert!(!run.join("last").exists(), "point {n}");
            let (ok, _, e) = farcer(&["train", "--config", cfg, "--out", r]);
            assert!(ok, "point {n}: a fresh start: {e}");
        }
        let got = contents(&run);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "point {n}: the same files, no leftovers ({e})"
        );
        for (k, v) in &want {
            assert!(
                got[k] == *v,
                "point {n}: {k} differs from the uninterrupted run's"
            );
        }
        std::fs::remove_dir_all(&run).unwrap();
    }
    assert!(points > 30, "the hook saw only {points} writes");
    eprintln!("killed and resumed at each of {points} writes");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_run_folder_is_locked_and_resume_keeps_its_settings() {
    let dir = support::tmpdir("crash", "lock");
    let cfg = setup(&dir, "epochs = 1");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let holder = std::fs::File::create(run.join(".lock")).unwrap();
    holder.try_lock().unwrap();
    std::fs::write(run.join(".lock"), "4242").unwrap();
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        !ok && e.contains("in use by another farcer run (pid 4242)"),
        "{e}"
    );
    drop(holder);
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "the lock goes with its holder: {e}");
    let (ok, _, e) = farcer(&[
        "train",
        "--resume",
        "--epochs",
        "5",
        "--limit-train",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        !ok && e.contains("--epochs, --limit-train would change it"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Ctrl-C stops at the next step with a message saying how to go on; the resumed run
/// finishes.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_at_a_safe_point() {
    let dir = support::tmpdir("crash", "sigint");
    let cfg = setup(&dir, "epochs = 400\npatience = 400");
    let run = dir.join("run");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_farcer"))
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !log.is_file() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(log.is_file(), "training started");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{e}");
    assert!(
        e.contains("to continue: farcer train --resume --out"),
        "{e}"
    );
    assert!(!run.join("summary.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `eval --out` killed at each of its writes (predictions are journaled one by one) and
/// continued with `--resume` ends with the files of an uninterrupted evaluation; a
/// finished one answers `--resume` with its report unchanged.
#[test]
fn a_killed_evaluation_resumes_to_the_same_files() {
    let dir = support::tmpdir("crash", "eval");
    let cfg = setup(&dir, "epochs = 1");
    let run = dir.join("run");
    let (ok, _, e) = farcer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    let ck = run.join("best");
    let data = format!("jsonl:{}", dir.join("data").display());
    let eval = |out: &Path, resume: bool, crash: Option<usize>| {
        let at = crash.map(|n| n.to_string()).unwrap_or_default();
        let mut args = vec![
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--data",
            &data,
            "--split",
            "dev",
            "--scope",
            "all",
            "--decode",
            "constrained",
            "--out",
            out.to_str().unwrap(),
        ];
        if resume {
            args.push("--resume");
        }
        let env: Vec<(&str, &str)> = if crash.is_some() {
            vec![("FARCER_CRASH_AT", &at)]
        } else {
            vec![]
        };
        farcer_env(&args, &env)
    };
    let reference = dir.join("reference");
    let (ok, _, e) = eval(&reference, false, None);
    assert!(ok, "{e}");
    let want = contents(&reference);
    assert!(
        want.contains_key("report.json") && want.contains_key("predictions.jsonl"),
        "{:?}",
        want.keys()
    );
    let (ok, _, e) = eval(&reference, true, None);
    assert!(ok, "{e}");
    assert_eq!(
        contents(&reference),
        want,
        "resuming a finished evaluation changes nothing"
    );
    let mut points = 0;
    for n in 1..400 {
        let out = dir.join(format!("killed-at-{n}"));
        let (ok, _, e) = eval(&out, false, Some(n));
        if ok {
            break;
        }
        assert!(
            e.contains("FARCER_CRASH_AT="),
            "point {n}: failed on its own: {e}"
        );
        points = n;
        let (ok, _, e) = eval(&out, true, None);
        assert!(ok, "point {n}: {e}");
        let got = contents(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "point {n}"
        );
        for (k, v) in &want {
            assert!(
                got[k] == *v,
                "point {n}: {k} differs from the uninterrupted evaluation's:\n{}\n{v}",
                got[k]
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(points > 5, "the hook saw only {points} writes");
    eprintln!("killed and resumed at each of {points} writes");
    std::fs::remove_dir_all(dir).unwrap();
}
