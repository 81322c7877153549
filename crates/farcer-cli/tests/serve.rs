//! `farcer serve` end to end, over real HTTP on the loopback, as a user runs it: answers
//! equal the CLI's, live sessions equal `predict --scope all`, bad requests get their 4xx
//! and the server stays up, image paths stay inside the root, sessions end as documented.

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::*;
mod support;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::farcer;

fn tmpdir(name: &str) -> PathBuf {
    support::tmpdir("serve", name)
}

/// A running `farcer serve` on a free loopback port; stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// `farcer serve` with the tiny fixture Llama.
    fn start(extra: &[&str]) -> Server {
        Server::start_llm(&fixture("tiny-llama"), extra)
    }

    fn start_llm(llm: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_farcer"))
            .current_dir(root())
            .args([
                "serve",
                "--llm",
                llm.to_str().unwrap(),
                "--addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let l = lines
                .next()
                .expect("the server stopped before listening")
                .unwrap();
            if let Some(a) = l.strip_prefix("listening on http://") {
                break a.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        http(&self.addr, method, path, headers, body)
    }

    fn json(&self, method: &str, path: &str, body: &serde_json::Value) -> Reply {
        self.call(
            method,
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// Opens a session with the default options; its id.
    fn open_session(&self) -> String {
        let r = self.json("POST", "/v1/sessions", &serde_json::json!({}));
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Stops the server as an operator would (SIGTERM) and returns whether it exited cleanly.
    fn stop(mut self) -> bool {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        let status = self.child.wait().unwrap();
        ok && status.success()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    /// The field an error names.
    fn field(&self) -> String {
        self.json()["error"]["field"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// HTTP/1.1 with `Connection: close`: enough of a client for tests.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_lowercase(), v.to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + n]);
        b = &b[p + 4 + n..];
    }
    out
}

fn dialogue() -> serde_json::Value {
    serde_json::json!({
        "id": "d1",
        "utterances": [
            {"speaker": "Ann", "text": "Hi! Great to see you.", "label": "joy"},
            {"speaker": "Bob", "text": "Oh no, what happened here?", "label": "surprise"},
            {"speaker": "Ann", "text": "I lost my keys again.", "label": "sadness"},
            {"speaker": "Bob", "text": "That is so annoying.", "label": "anger"},
            {"speaker": "Ann", "text": "Okay.", "label": "neutral"}
        ]
    })
}

fn probs(v: &serde_json::Value) -> Vec<f64> {
    let m = v["probs"].as_object().expect("probs");
    farcer::data::MELD_LABELS
        .iter()
        .map(|l| m[*l].as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

fn write_dialogue(dir: &Path) -> PathBuf {
    let f = dir.join("dialogue.jsonl");
    std::fs::write(&f, format!("{}\n", dialogue())).unwrap();
    std::fs::write(dir.join("labels.txt"), farcer::data::MELD_LABELS.join("\n")).unwrap();
    f
}

/// `POST /v1/predict` gives what `farcer predict` and `farcer eval` give on the same
/// dialogue (probabilities within 1e-5), for the last utterance and for all of them.
fn predict_equals_the_cli() {
    predict_equals_the_cli_with(&fixture("tiny-llama"), "predict");
}

/// The CLI and session checks with the pinned SmolLM2, the model users serve.
fn predict_and_sessions_equal_the_cli_on_smollm2() {
    let Some(llm) = default_llm() else {
        missing("the pinned SmolLM2 (farcer fetch)");
        return;
    };
    predict_equals_the_cli_with(&llm, "predict-smollm2");
    sessions_equal_predict_all_with(&llm);
}

fn predict_equals_the_cli_with(llm: &Path, name: &str) {
    let dir = tmpdir(name);
    let f = write_dialogue(&dir);
    let server = Server::start_llm(llm, &[]);
    for scope in ["last", "all"] {
        let mut req = dialogue();
        req["scope"] = scope.into();
        let r = server.json("POST", "/v1/predict", &req);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let served = r.json()["predictions"].as_array().unwrap().clone();
        assert_eq!(served.len(), if scope == "last" { 1 } else { 5 });
        let (ok, out, err) = farcer(&[
            "predict",
            "--llm",
            llm.to_str().unwrap(),
            "--scope",
            scope,
            f.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let cli: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(cli.len(), served.len());
        for (a, b) in served.iter().zip(&cli) {
            assert_eq!(a["label"], b["label"]);
            assert!(close(&probs(a), &probs(b), 1e-5), "{a} vs {b}");
        }
        let out_dir = dir.join(format!("eval-{scope}"));
        let (ok, _, err) = farcer(&[
            "eval",
            "--llm",
            llm.to_str().unwrap(),
            "--data",
            f.to_str().unwrap(),
            "--shots",
            "0",
            "--scope",
            scope,
            "--decode",
            "constrained",
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let evald: Vec<serde_json::Value> =
            std::fs::read_to_string(out_dir.join("predictions.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert_eq!(evald.len(), served.len());
        for (a, b) in served.iter().zip(&evald) {
            assert_eq!(a["label"], b["pred"]);
            assert!(close(&probs(a), &probs(b), 1e-5), "{a} vs {b}");
        }
    }
    assert!(server.stop(), "SIGTERM stops the server cleanly");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A live session answers each utterance as `predict --scope all` does on the dialogue so
/// far (within 1e-4), with and without the model's own answers as past labels, and runs
/// only the new utterance's tokens each time.
fn sessions_equal_predict_all() {
    sessions_equal_predict_all_with(&fixture("tiny-llama"));
}

fn sessions_equal_predict_all_with(llm: &Path) {
    let server = Server::start_llm(llm, &[]);
    for past in [false, true] {
        let r = server.json(
            "POST",
            "/v1/sessions",
            &serde_json::json!({"past_labels": past}),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let id = r.json()["id"].as_str().unwrap().to_string();
        let mut req = dialogue();
        req["scope"] = "all".into();
        req["past_labels"] = past.into();
        req["past_labels_from"] = "predicted".into();
        let whole = server.json("POST", "/v1/predict", &req).json()["predictions"]
            .as_array()
            .unwrap()
            .clone();
        let mut tokens = Vec::new();
        for (i, u) in dialogue()["utterances"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let mut u = u.clone();
            u.as_object_mut().unwrap().remove("label");
            let a = server.json("POST", &format!("/v1/sessions/{id}/utterances"), &u);
            assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
            let a = a.json();
            assert_eq!(a["index"], i);
            if whole[i]["dropped"] == 0 {
                // Nothing dropped yet: the same prompt, the same answer.
                assert_eq!(a["dropped"], 0);
                assert_eq!(
                    a["label"], whole[i]["label"],
                    "utterance {i}, past labels {past}"
                );
                assert!(
                    close(&probs(&a), &probs(&whole[i]), 1e-4),
                    "{a} vs {}",
                    whole[i]
                );
            } else {
                assert!(a["dropped"].as_u64().unwrap() > 0, "{a}");
            }
            tokens.push(a["tokens"].as_u64().unwrap());
        }
        let compared = whole.iter().filter(|w| w["dropped"] == 0).count();
        assert!(compared >= 2, "{whole:?}");
        // Each utterance costs its own tokens plus the label query, not the conversation.
        let whole_tokens: Vec<u64> = whole
            .iter()
            .map(|w| w["tokens"].as_u64().unwrap())
            .collect();
        assert!(
            tokens[1] < whole_tokens[1],
            "{tokens:?} vs {whole_tokens:?}"
        );
        let info = server
            .call("GET", &format!("/v1/sessions/{id}"), &[], b"")
            .json();
        assert_eq!(info["utterances"], 5);
        let del = server.call("DELETE", &format!("/v1/sessions/{id}"), &[], b"");
        assert_eq!(del.status, 204);
        let gone = server.json(
            "POST",
            &format!("/v1/sessions/{id}/utterances"),
            &serde_json::json!({"speaker": "A", "text": "x"}),
        );
        assert_eq!(gone.status, 410);
        assert!(gone.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deleted"));
    }
}

/// Every bad request gets its 4xx with a JSON error naming the field, and the next good
/// request still succeeds.
fn bad_requests_get_4xx_and_the_server_stays_up() {
    let server = Server::start(&[
        "--max-utterances",
        "8",
        "--max-body",
        "100000",
        "--max-text",
        "500",
    ]);
    let ok = |s: &Server| {
        let r = s.json("POST", "/v1/predict", &dialogue());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    ok(&server);
    let png_1x1 = {
        let mut b = Vec::new();
        image::DynamicImage::new_rgb8(1, 1)
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    };
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut d = dialogue();
        f(&mut d);
        d.to_string().into_bytes()
    };
    let json = [("content-type", "application/json")];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"utterances\": [".to_vec(),
            400,
            "utterances",
        ),
        ("not JSON", b"hello".to_vec(), 400, "body"),
        (
            "unknown field",
            with(&|d| d["colour"] = "red".into()),
            400,
            "colour",
        ),
        (
            "unknown utterance field",
            with(&|d| d["utterances"][1]["mood"] = "x".into()),
            400,
            "utterances[1]",
        ),
        (
            "wrong type",
            with(&|d| d["utterances"][2]["text"] = 5.into()),
            400,
            "utterances[2].text",
        ),
        (
            "bad base64",
            with(&|d| d["utterances"][0]["image_b64"] = "%%%".into()),
            400,
            "utterances[0].image_b64",
        ),
        (
            "not an image",
            with(&|d| d["utterances"][0]["image_b64"] = b64(b"GIF89a not really").into()),
            415,
            "utterances[0].image_b64",
        ),
        (
            "unknown label",
            with(&|d| d["utterances"][0]["label"] = "bliss".into()),
            400,
            "utterances[0].label",
        ),
        (
            "bad scope",
            with(&|d| d["scope"] = "some".into()),
            400,
            "scope",
        ),
        (
            "too many utterances",
            with(&|d| {
                let u = d["utterances"][0].clone();
                d["utterances"] = serde_json::Value::Array(vec![u; 9]);
            }),
            400,
            "utterances",
        ),
        (
            "no utterances",
            with(&|d| d["utterances"] = serde_json::json!([])),
            400,
            "utterances",
        ),
        (
            "text too long",
            with(&|d| d["utterances"][0]["text"] = "a".repeat(501).into()),
            400,
            "utterances[0].text",
        ),
        (
            "video",
            with(&|d| d["utterances"][0]["clip"] = "x.mp4".into()),
            400,
            "utterances[0].clip",
        ),
        (
            "image path without a root",
            with(&|d| d["utterances"][0]["image"] = "a.png".into()),
            403,
            "utterances[0].image",
        ),
        ("body too large", vec![b' '; 100_001], 413, "body"),
    ];
    for (what, body, status, field) in cases {
        let r = server.call("POST", "/v1/predict", &json, &body);
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.field().starts_with(field),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        ok(&server);
    }
    let r = server.call(
        "POST",
        "/v1/predict",
        &[("content-type", "text/plain")],
        &dialogue().to_string().into_bytes(),
    );
    assert_eq!(r.status, 415);
    let r = server.call("GET", "/nowhere", &[], b"");
    assert_eq!(r.status, 404);
    // A real (tiny) PNG inline is accepted; a text-only model ignores it.
    let r = server.call(
        "POST",
        "/v1/predict",
        &json,
        &with(&|d| d["utterances"][4]["image_b64"] = b64(&png_1x1).into()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Sessions: unknown ids are 404, bad session options 400.
    let r = server.json(
        "POST",
        "/v1/sessions/feedbeef/utterances",
        &serde_json::json!({"speaker": "A", "text": "x"}),
    );
    assert_eq!(r.status, 404);
    let r = server.json(
        "POST",
        "/v1/sessions",
        &serde_json::json!({"shots": "many"}),
    );
    assert_eq!((r.status, r.field().as_str()), (400, "shots"));
    // The metrics saw all of it.
    let m = String::from_utf8(server.call("GET", "/metrics", &[], b"").body).unwrap();
    assert!(
        m.contains("farcer_requests_total{route=\"/v1/predict\",status=\"200\"}"),
        "{m}"
    );
    assert!(
        m.contains("farcer_requests_total{route=\"/v1/predict\",status=\"413\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("farcer_request_seconds_bucket{route=\"/v1/predict\",le=\"+Inf\"}"),
        "{m}"
    );
    let api: serde_json::Value = server.call("GET", "/openapi.json", &[], b"").json();
    assert!(api["paths"]["/v1/predict"]["post"].is_object());
    let page = String::from_utf8(server.call("GET", "/", &[], b"").body).unwrap();
    assert!(page.contains("/v1/sessions"));
}

/// Image paths are read only inside `--image-root`: no `..`, no absolute paths, no
/// symlinks out of it, no FIFOs; a file inside it is read.
fn image_paths_stay_inside_the_root() {
    let dir = tmpdir("root");
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    image::DynamicImage::new_rgb8(4, 4)
        .save(root.join("ok.png"))
        .unwrap();
    image::DynamicImage::new_rgb8(4, 4)
        .save(dir.join("secret.png"))
        .unwrap();
    std::os::unix::fs::symlink(dir.join("secret.png"), root.join("link.png")).unwrap();
    let fifo = root.join("pipe.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let server = Server::start(&["--image-root", root.to_str().unwrap()]);
    let try_path = |p: &str| {
        let mut d = dialogue();
        d["utterances"][0]["image"] = p.into();
        server.json("POST", "/v1/predict", &d)
    };
    assert_eq!(try_path("ok.png").status, 200);
    for (p, status) in [
        ("../secret.png", 403),
        (dir.join("secret.png").to_str().unwrap(), 403),
        ("link.png", 403),
        ("pipe.png", 403),
        ("missing.png", 404),
    ] {
        let r = try_path(p);
        assert_eq!(
            r.status,
            status,
            "{p}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.field(), "utterances[0].image");
    }
    assert_eq!(try_path("ok.png").status, 200);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// With `--api-key` the API needs the bearer token; health does not.
fn api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = dialogue().to_string().into_bytes();
    let json = ("content-type", "application/json");
    assert_eq!(
        server.call("POST", "/v1/predict", &[json], &body).status,
        401
    );
    assert_eq!(
        server
            .call(
                "POST",
                "/v1/predict",
                &[json, ("authorization", "Bearer wrong")],
                &body
            )
            .status,
        401
    );
    assert_eq!(
        server
            .call(
                "POST",
                "/v1/predict",
                &[json, ("authorization", "Bearer s3cret")],
                &body
            )
            .status,
        200
    );
    assert_eq!(server.call("GET", "/metrics", &[], b"").status, 401);
    assert_eq!(server.call("GET", "/healthz", &[], b"").status, 200);
}

/// Sessions beyond `--max-sessions` evict the one idle longest, whose owner is told so;
/// idle sessions expire; answers stream as server-sent events.
fn sessions_are_evicted_expire_and_stream() {
    let server = Server::start(&["--max-sessions", "2", "--session-idle", "2"]);
    let open = || server.open_session();
    let utt = serde_json::json!({"speaker": "Ann", "text": "Hello there."});
    let (a, b) = (open(), open());
    assert_eq!(
        server
            .json("POST", &format!("/v1/sessions/{b}/utterances"), &utt)
            .status,
        200
    );
    let c = open();
    let r = server.json("POST", &format!("/v1/sessions/{a}/utterances"), &utt);
    assert_eq!(r.status, 410);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("evicted"));
    // Server-sent events: subscribe, add an utterance, read the answer from the stream.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /v1/sessions/{c}/events HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    let answer = server
        .json("POST", &format!("/v1/sessions/{c}/utterances"), &utt)
        .json();
    let mut seen = String::new();
    while !seen.contains("\"label\"") {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap() == 0 {
            break;
        }
        seen.push_str(&l);
    }
    assert!(seen.contains("event: answer"), "{seen}");
    assert!(seen.contains(answer["label"].as_str().unwrap()), "{seen}");
    drop(reader);
    // Idle for longer than --session-idle: expired.
    std::thread::sleep(Duration::from_millis(3500));
    let r = server.json("POST", &format!("/v1/sessions/{b}/utterances"), &utt);
    assert_eq!(r.status, 410);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
}

/// Concurrent requests get the answers they get one at a time; over the queue's capacity
/// the server answers 503 with Retry-After, never anything else.
fn concurrent_answers_equal_serial_ones() {
    let server = Server::start(&["--queue", "2"]);
    let mut req = dialogue();
    req["scope"] = "all".into();
    let serial = server.json("POST", "/v1/predict", &req).json()["predictions"].clone();
    let addr = server.addr.clone();
    let body = req.to_string();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (addr, body) = (addr.clone(), body.clone());
            std::thread::spawn(move || {
                http(
                    &addr,
                    "POST",
                    "/v1/predict",
                    &[("content-type", "application/json")],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let mut ok = 0;
    for t in threads {
        let r = t.join().unwrap();
        match r.status {
            200 => {
                ok += 1;
                let got = r.json()["predictions"].clone();
                for (a, b) in got
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(serial.as_array().unwrap())
                {
                    assert_eq!(a["label"], b["label"]);
                    assert!(close(&probs(a), &probs(b), 1e-9));
                }
            }
            503 => assert!(r.headers.contains_key("retry-after")),
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(
        ok >= 2,
        "the queue holds two requests: at least two are answered"
    );
}

/// Utterances of several sessions that arrive together are answered in one model pass
/// (the server's metrics count the batches), and each answer equals the one a session
/// gets alone, with and without past labels.
fn concurrent_sessions_are_batched_and_answer_as_alone() {
    let server = Server::start(&["--batch-wait-ms", "300", "--queue", "64"]);
    let utts: Vec<serde_json::Value> = dialogue()["utterances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let mut u = u.clone();
            u.as_object_mut().unwrap().remove("label");
            u
        })
        .collect();
    let open = |past: bool| {
        let r = server.json(
            "POST",
            "/v1/sessions",
            &serde_json::json!({"past_labels": past}),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    };
    // Alone: one session at a time, one utterance at a time.
    let mut alone = HashMap::new();
    for past in [false, true] {
        let id = open(past);
        let answers: Vec<serde_json::Value> = utts
            .iter()
            .map(|u| {
                let a = server.json("POST", &format!("/v1/sessions/{id}/utterances"), u);
                assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                a.json()
            })
            .collect();
        alone.insert(past, answers);
    }
    let metric = |name: &str| -> f64 {
        let m = server.call("GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&m.body).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    let (batches0, utts0) = (
        metric("farcer_session_batches_total"),
        metric("farcer_session_batched_utterances_total"),
    );
    assert_eq!(batches0, utts0, "one at a time: batches of one");
    // Together: six sessions, each sending its utterances in order, all at once.
    let sessions: Vec<(bool, String)> = (0..6).map(|k| (k % 2 == 1, open(k % 2 == 1))).collect();
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|(past, id)| {
            let (addr, utts) = (server.addr.clone(), utts.clone());
            std::thread::spawn(move || {
                let answers: Vec<serde_json::Value> = utts
                    .iter()
                    .map(|u| {
                        let r = http(
                            &addr,
                            "POST",
                            &format!("/v1/sessions/{id}/utterances"),
                            &[("content-type", "application/json")],
                            u.to_string().as_bytes(),
                        );
                        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                        r.json()
                    })
                    .collect();
                (past, answers)
            })
        })
        .collect();
    for t in threads {
        let (past, answers) = t.join().unwrap();
        for (a, b) in answers.iter().zip(&alone[&past]) {
            assert_eq!(a["index"], b["index"]);
            assert_eq!(a["label"], b["label"], "past labels {past}: {a} vs {b}");
            assert_eq!(a["tokens"], b["tokens"]);
            assert!(
                close(&probs(a), &probs(b), 1e-5),
                "past labels {past}: {a} vs {b}"
            );
        }
    }
    let (batches, batched) = (
        metric("farcer_session_batches_total") - batches0,
        metric("farcer_session_batched_utterances_total") - utts0,
    );
    assert_eq!(batched, 30.0, "every utterance answered once");
    assert!(
        batches < batched,
        "utterances that waited together were answered together: {batched} in {batches} passes"
    );
}

/// A conversation far longer than the context: the oldest utterances are dropped and the
/// cache rebuilt now and then, not once per utterance, and an utterance's cost does not
/// grow with the conversation.
fn long_sessions_drop_old_utterances_and_rebuild_rarely() {
    let server = Server::start(&[]);
    let id = server.open_session();
    let mut tokens = Vec::new();
    for i in 0..40 {
        let u = serde_json::json!({"speaker": if i % 2 == 0 { "Ann" } else { "Bob" }, "text": "Fine, thanks."});
        let a = server.json("POST", &format!("/v1/sessions/{id}/utterances"), &u);
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        tokens.push(a.json()["tokens"].as_u64().unwrap());
    }
    let info = server
        .call("GET", &format!("/v1/sessions/{id}"), &[], b"")
        .json();
    let rebuilds = info["rebuilds"].as_u64().unwrap();
    assert!(info["dropped"].as_u64().unwrap() > 0, "{info}");
    assert!((1..=10).contains(&rebuilds), "{info}");
    // Without the rebuilds, every utterance costs the same.
    let mut steady: Vec<u64> = tokens.clone();
    steady.sort();
    assert_eq!(
        steady[0],
        steady[steady.len() - 1 - rebuilds as usize],
        "{tokens:?}"
    );
}

/// `farcer loadtest` starts its own server, overloads it (8 clients against a queue of 1)
/// and stops by itself: nothing but 2xx, and 503 with `Retry-After`, comes back; the
/// server's memory is sampled; the JSON, markdown and PNG are written.
fn load_test_sheds_overload_with_retry_after() {
    let dir = tmpdir("loadtest");
    let f = write_dialogue(&dir);
    let llm = fixture("tiny-llama");
    let out = dir.join("lt");
    let (ok, stdout, err) = farcer(&[
        "loadtest",
        "--data",
        f.to_str().unwrap(),
        "--clients",
        "8",
        "--requests",
        "120",
        "--seconds",
        "30",
        "--out",
        out.to_str().unwrap(),
        "--",
        "--llm",
        llm.to_str().unwrap(),
        "--queue",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| predict |"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("loadtest.json")).unwrap()).unwrap();
    let status = r["status"].as_object().unwrap();
    for k in status.keys() {
        assert!(
            ["200", "201", "204", "503"].contains(&k.as_str()),
            "unexpected status {k}: {r}"
        );
    }
    assert!(status["200"].as_u64().unwrap() > 0, "{r}");
    assert!(
        status.get("503").is_some(),
        "8 clients on a queue of 1 shed: {r}"
    );
    assert_eq!(r["server_errors"], 0);
    assert_eq!(r["missing_retry_after"], 0);
    assert!(r["scored_utterances"].as_u64().unwrap() > 0);
    assert!(!r["rss_mib"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["rss_growth_mib"].as_f64().unwrap() < 64.0, "{r}");
    assert!(out.join("loadtest.png").is_file() && out.join("loadtest.md").is_file());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A headless Chromium (`chromium-headless-shell`, installed by scripts/setup; or the
/// browser `FARCER_CHROMIUM` names), spoken to over the DevTools protocol.
struct Browser {
    // Declared first so the socket closes before the browser is killed.
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    next: u64,
    _group: Group,
}

/// The browser's process group, killed as a whole when dropped (also when the test
/// panics while starting it): the launcher is often a shell script, and helper processes
/// left behind would hold the test's pipes open.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

impl Browser {
    fn find() -> Option<PathBuf> {
        if let Ok(p) = std::env::var("FARCER_CHROMIUM") {
            return Some(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH")?;
        ["chromium-headless-shell", "chromium", "google-chrome"]
            .iter()
            .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
            .find(|p| p.is_file())
    }

    fn start(exe: &Path, profile: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        // Its own process group: the launcher is often a shell script, and the browser's
        // helper processes must all go when the test ends (else they hold the test's pipes).
        let mut child = Command::new(exe)
            .process_group(0)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1100,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let group = Group(child);
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let l = lines
                .next()
                .expect("the browser stopped before listening")
                .unwrap();
            if let Some(rest) = l.split("DevTools listening on ws://127.0.0.1:").nth(1) {
                break rest.split('/').next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        // The page target's own socket: commands go straight to the page.
        // The first page may appear a moment after the browser listens.
        let mut url = None;
        for _ in 0..100 {
            url = Browser::targets(&port)
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_string);
            if url.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let url = url.expect("a page target within 10 s");
        let host = url.trim_start_matches("ws://").split('/').next().unwrap();
        let tcp = std::net::TcpStream::connect(host).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), tcp).unwrap();
        Browser {
            ws,
            next: 0,
            _group: group,
        }
    }

    /// `GET /json/list`, read by its Content-Length: the browser keeps the connection open
    /// whatever the request says.
    fn targets(port: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /json/list HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Sends a command and returns its result, skipping the events in between.
    fn cmd(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::Text(msg.to_string().into()))
            .unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, js: &str) -> serde_json::Value {
        let r = self.cmd(
            "Runtime.evaluate",
            serde_json::json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits up to a minute for `js` to be true.
    fn wait_for(&mut self, js: &str) {
        for _ in 0..600 {
            if self.eval(js) == serde_json::Value::Bool(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {js}");
    }
}

/// The web page in a real headless browser: three utterances typed in (one with a face
/// image attached through the file input, which the page uploads and the server decodes),
/// each rendered with a label and seven bars, the labels the same as a session over plain
/// HTTP gives on the same utterances and image; a screenshot is saved
/// (`FARCER_PAGE_SCREENSHOT` names a copy to keep). The fixture model is text-only, so
/// this checks the page's upload path, not what a face changes in the answer.
fn web_page_scores_a_conversation_in_a_browser() {
    let Some(exe) = Browser::find() else {
        missing("a headless Chromium (scripts/setup installs chromium-headless-shell)");
        return;
    };
    let dir = tmpdir("page");
    let server = Server::start(&[]);
    let mut b = Browser::start(&exe, &dir.join("profile"));
    b.cmd(
        "Page.navigate",
        serde_json::json!({"url": format!("http://{}/", server.addr)}),
    );
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('add')");
    let utts = dialogue()["utterances"].as_array().unwrap()[..3].to_vec();
    let face = fixture("tiny-vit-image.png");
    for (i, u) in utts.iter().enumerate() {
        if i == 1 {
            let doc = b.cmd("DOM.getDocument", serde_json::json!({}));
            let node = b.cmd(
                "DOM.querySelector",
                serde_json::json!({"nodeId": doc["root"]["nodeId"], "selector": "#image"}),
            );
            b.cmd(
                "DOM.setFileInputFiles",
                serde_json::json!({"nodeId": node["nodeId"], "files": [face.to_str().unwrap()]}),
            );
        }
        b.eval(&format!(
            "document.getElementById('speaker').value = {}; \
             document.getElementById('text').value = {}; \
             document.getElementById('add').requestSubmit(); true",
            u["speaker"], u["text"]
        ));
        b.wait_for(&format!(
            "document.querySelectorAll('#log .utt').length === {} || \
             document.getElementById('status').textContent !== ''",
            i + 1
        ));
        assert_eq!(b.eval("document.getElementById('status').textContent"), "");
    }
    let shown = b.eval(
        "JSON.stringify([...document.querySelectorAll('#log .utt')].map(r => ({ \
           label: r.querySelector('.label').textContent, \
           bars: r.querySelectorAll('.bar').length, \
           face: !!r.querySelector('img.face') })))",
    );
    let shown: Vec<serde_json::Value> = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    // The same three utterances in a session over plain HTTP.
    let id = server.open_session();
    for (i, (u, s)) in utts.iter().zip(&shown).enumerate() {
        let mut u = u.clone();
        u.as_object_mut().unwrap().remove("label");
        if i == 1 {
            use base64::Engine as _;
            let png = std::fs::read(&face).unwrap();
            u["image_b64"] = base64::engine::general_purpose::STANDARD.encode(png).into();
        }
        let a = server
            .json("POST", &format!("/v1/sessions/{id}/utterances"), &u)
            .json();
        assert_eq!(s["label"], a["label"], "utterance {i}: {s} vs {a}");
        assert_eq!(s["bars"], 7, "{s}");
        assert_eq!(s["face"], i == 1, "{s}");
    }
    let shot = b.cmd(
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    );
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = dir.join("page.png");
    std::fs::write(&path, &png).unwrap();
    if let Ok(keep) = std::env::var("FARCER_PAGE_SCREENSHOT") {
        std::fs::write(&keep, &png).unwrap();
        eprintln!("screenshot: {keep}");
    }
    drop(b);
    assert!(server.stop());
    std::fs::remove_dir_all(dir).unwrap();
}

fn main() -> std::process::ExitCode {
    common::harness::main(tests![
        predict_equals_the_cli,
        predict_and_sessions_equal_the_cli_on_smollm2.needs_default_llm(),
        sessions_equal_predict_all,
        bad_requests_get_4xx_and_the_server_stays_up,
        image_paths_stay_inside_the_root,
        api_key_is_required_when_set,
        sessions_are_evicted_expire_and_stream,
        concurrent_answers_equal_serial_ones,
        concurrent_sessions_are_batched_and_answer_as_alone,
        long_sessions_drop_old_utterances_and_rebuild_rarely,
        load_test_sheds_overload_with_retry_after,
        web_page_scores_a_conversation_in_a_browser
            .needs("headless Chromium (scripts/setup)", || Browser::find()
                .is_some()),
    ])
}
