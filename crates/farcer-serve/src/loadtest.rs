//! A load test for a farcer server on the loopback: `clients` concurrent clients, each on
//! its own keep-alive connection, mix `POST /v1/predict` calls with live sessions (open,
//! add utterances, end) until a request budget or a deadline runs out. Every answer's
//! latency and status is recorded, and the server's resident memory is sampled from its
//! `/metrics` while the load runs, so a report can show whether memory stays flat.
//!
//! Clients honour `Retry-After` (capped at one second) as a well-behaved client does, so
//! an overloaded server is probed, not spun against.

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to send, to whom, and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server; must be a loopback address.
    pub addr: SocketAddr,
    pub clients: usize,
    /// At most this many requests, besides the calls that end the sessions opened.
    pub max_requests: usize,
    /// No request starts after this; the run ends when the ones in flight are answered.
    pub max_duration: Duration,
    /// Share of a client's rounds that run a live session instead of one predict call.
    pub session_share: f64,
    /// Utterances added per session.
    pub session_utterances: usize,
    /// `last` or `all`, sent with each predict call.
    pub scope: String,
    pub api_key: Option<String>,
    /// Dialogues as the JSON utterances a request carries.
    pub dialogues: Vec<Vec<serde_json::Value>>,
    pub seed: u64,
    /// A call unanswered after this counts as a transport failure (its connection is
    /// dropped), so a stalled server cannot hold the run past its deadline for long.
    pub request_timeout: Duration,
}

/// The kinds of call a client makes.
const KINDS: [&str; 4] = ["predict", "session_open", "utterance", "session_end"];

#[derive(Debug, Clone, Copy)]
struct Record {
    kind: usize,
    /// 0 when the connection failed before an answer.
    status: u16,
    /// Seconds since the start when the answer came.
    at: f64,
    ms: f64,
    /// A 429/503 that came without `Retry-After`.
    missing_retry_after: bool,
    /// Utterances the answer scored.
    scored: usize,
}

/// Latency percentiles of answered (2xx) calls, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// What a load test measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub seconds: f64,
    pub requests: usize,
    pub requests_per_s: f64,
    /// Utterances the server scored (predict answers plus session utterances).
    pub scored_utterances: usize,
    pub utterances_per_s: f64,
    /// Answered calls by kind, and `all`.
    pub latency_ms: BTreeMap<String, Latency>,
    /// Calls by status (`"transport"` for connections that failed before an answer).
    pub status: BTreeMap<String, usize>,
    /// 5xx answers other than 503: never expected.
    pub server_errors: usize,
    /// 429/503 answers without `Retry-After`: never expected.
    pub missing_retry_after: usize,
    /// `(seconds since the start, resident MiB)` of the server.
    pub rss_mib: Vec<(f64, f64)>,
    /// Resident MiB growth from the end of the first quarter of the run to its end;
    /// `None` when the server's `/metrics` gave no resident memory to sample.
    pub rss_growth_mib: Option<f64>,
    /// `(seconds since the start, ms)` of every answered call, for plots.
    #[serde(skip)]
    pub timeline: Vec<(f64, f64)>,
}

struct Shared {
    cfg: LoadConfig,
    start: Instant,
    issued: AtomicUsize,
    records: Mutex<Vec<Record>>,
}

impl Shared {
    /// Takes a place in the request budget, unless it or the time is spent.
    fn take(&self) -> bool {
        self.start.elapsed() < self.cfg.max_duration
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.cfg.max_requests
    }
}

/// One keep-alive HTTP/1.1 connection that reconnects after a failure.
struct Conn {
    addr: SocketAddr,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

struct Reply {
    status: u16,
    retry_after: Option<u64>,
    body: Bytes,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Conn { addr, sender: None }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        key: Option<&str>,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let r = match tokio::time::timeout(timeout, self.try_send(method, path, body, key)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        if r.is_err() {
            self.sender = None;
        }
        r
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        key: Option<&str>,
    ) -> Result<Reply, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await.map_err(|e| e.to_string())?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let resp = sender
            .send_request(req.body(Full::new(bytes)).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            retry_after,
            body,
        })
    }
}

/// Sends one call, records it, and waits out a `Retry-After`. Returns the reply when the
/// server answered 2xx.
async fn call(
    sh: &Shared,
    conn: &mut Conn,
    kind: usize,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Option<serde_json::Value> {
    let t0 = Instant::now();
    let r = conn
        .send(
            method,
            path,
            body,
            sh.cfg.api_key.as_deref(),
            sh.cfg.request_timeout,
        )
        .await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let at = sh.start.elapsed().as_secs_f64();
    let (status, retry, json) = match r {
        Ok(r) => {
            let ok = (200..300).contains(&r.status);
            let j: Option<serde_json::Value> = if ok {
                serde_json::from_slice(&r.body).ok()
            } else {
                None
            };
            (r.status, r.retry_after, j)
        }
        Err(_) => (0, None, None),
    };
    let scored = match (&json, kind) {
        (Some(j), 0) => j["predictions"].as_array().map_or(0, Vec::len),
        (Some(_), 2) => 1,
        _ => 0,
    };
    let shed = status == 429 || status == 503;
    sh.records.lock().expect("records").push(Record {
        kind,
        status,
        at,
        ms,
        missing_retry_after: shed && retry.is_none(),
        scored,
    });
    if shed || status == 0 {
        let wait = Duration::from_secs(retry.unwrap_or(1)).min(Duration::from_secs(1));
        tokio::time::sleep(wait).await;
    }
    json
}

async fn client(sh: Arc<Shared>, k: usize) {
    let mut rng = StdRng::seed_from_u64(sh.cfg.seed ^ (k as u64).wrapping_mul(0x9e37_79b9));
    let mut conn = Conn::new(sh.cfg.addr);
    let n = sh.cfg.dialogues.len();
    loop {
        let d = &sh.cfg.dialogues[rng.random_range(0..n)];
        if rng.random::<f64>() < sh.cfg.session_share {
            if !sh.take() {
                return;
            }
            let open = call(
                &sh,
                &mut conn,
                1,
                Method::POST,
                "/v1/sessions",
                Some(&json!({})),
            )
            .await;
            let Some(id) = open.as_ref().and_then(|j| j["id"].as_str()) else {
                continue;
            };
            let path = format!("/v1/sessions/{id}/utterances");
            for u in d.iter().take(sh.cfg.session_utterances.max(1)) {
                if !sh.take() {
                    break;
                }
                if call(&sh, &mut conn, 2, Method::POST, &path, Some(u))
                    .await
                    .is_none()
                {
                    break;
                }
            }
            // Always end what was opened, budget or not: a session left open is the
            // load test's leak, not the server's.
            let end = format!("/v1/sessions/{id}");
            call(&sh, &mut conn, 3, Method::DELETE, &end, None).await;
        } else {
            if !sh.take() {
                return;
            }
            let body = json!({"utterances": d, "scope": sh.cfg.scope});
            call(&sh, &mut conn, 0, Method::POST, "/v1/predict", Some(&body)).await;
        }
    }
}

/// Samples the server's resident memory from `/metrics` four times a second until `stop`.
async fn sample_rss(sh: Arc<Shared>, stop: Arc<AtomicBool>) -> Vec<(f64, f64)> {
    let mut conn = Conn::new(sh.cfg.addr);
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(r) = conn
            .send(
                Method::GET,
                "/metrics",
                None,
                sh.cfg.api_key.as_deref(),
                Duration::from_secs(5),
            )
            .await
        {
            let text = String::from_utf8_lossy(&r.body);
            if let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                out.push((sh.start.elapsed().as_secs_f64(), v / (1 << 20) as f64));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out
}

/// An utterance as a request carries it: speaker and text, its image inline when it has
/// one the server can read (PNG or JPEG; video clips are left out, the server refuses them).
pub fn request_utterance(u: &farcer::data::Utterance) -> Result<serde_json::Value, String> {
    use base64::Engine as _;
    let mut v = json!({"speaker": u.speaker, "text": u.text});
    if let Some(p) = &u.image {
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        match image::guess_format(&bytes) {
            Ok(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {
                v["image_b64"] = base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into();
            }
            _ => return Err(format!("{}: not a PNG or JPEG image", p.display())),
        }
    }
    Ok(v)
}

/// [`run`] on a runtime of its own, for callers without one.
pub fn run_blocking(cfg: LoadConfig) -> Result<LoadReport, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(run(cfg))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(f64::total_cmp);
    Latency {
        count: ms.len(),
        p50: percentile(&ms, 0.50),
        p95: percentile(&ms, 0.95),
        p99: percentile(&ms, 0.99),
        max: ms.last().copied().unwrap_or(0.0),
    }
}

/// Runs the load test. Refuses anything but a loopback address: this tool is for
/// measuring one's own server, not for loading someone else's.
pub async fn run(cfg: LoadConfig) -> Result<LoadReport, String> {
    if !cfg.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: the load test only runs against this machine",
            cfg.addr
        ));
    }
    if cfg.dialogues.iter().all(Vec::is_empty) {
        return Err("no dialogues to send".into());
    }
    let clients = cfg.clients.max(1);
    let sh = Arc::new(Shared {
        cfg: LoadConfig {
            dialogues: cfg
                .dialogues
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect(),
            ..cfg
        },
        start: Instant::now(),
        issued: AtomicUsize::new(0),
        records: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_rss(sh.clone(), stop.clone()));
    let tasks: Vec<_> = (0..clients)
        .map(|k| tokio::spawn(client(sh.clone(), k)))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let seconds = sh.start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let rss_mib = sampler.await.unwrap_or_default();
    let records = std::mem::take(&mut *sh.records.lock().expect("records"));

    let mut status = BTreeMap::new();
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut timeline = Vec::new();
    for r in &records {
        let key = if r.status == 0 {
            "transport".to_string()
        } else {
            r.status.to_string()
        };
        *status.entry(key).or_insert(0) += 1;
        if (200..300).contains(&r.status) {
            by_kind
                .entry(KINDS[r.kind].to_string())
                .or_default()
                .push(r.ms);
            all.push(r.ms);
            timeline.push((r.at, r.ms));
        }
    }
    let mut latency_ms: BTreeMap<String, Latency> =
        by_kind.into_iter().map(|(k, v)| (k, latency(v))).collect();
    latency_ms.insert("all".into(), latency(all));
    let scored: usize = records.iter().map(|r| r.scored).sum();
    let quarter = seconds / 4.0;
    let rss_growth_mib = match (rss_mib.iter().find(|p| p.0 >= quarter), rss_mib.last()) {
        (Some(a), Some(b)) => Some(b.1 - a.1),
        _ => None,
    };
    Ok(LoadReport {
        clients,
        seconds,
        requests: records.len(),
        requests_per_s: records.len() as f64 / seconds,
        scored_utterances: scored,
        utterances_per_s: scored as f64 / seconds,
        latency_ms,
        server_errors: records
            .iter()
            .filter(|r| r.status >= 500 && r.status != 503)
            .count(),
        missing_retry_after: records.iter().filter(|r| r.missing_retry_after).count(),
        status,
        rss_mib,
        rss_growth_mib,
        timeline,
    })
}

impl LoadReport {
    /// A markdown summary: one table of the totals, one of latency by call.
    pub fn markdown(&self, title: &str) -> String {
        let mut s = format!("# {title}\n\n");
        s.push_str("| clients | seconds | requests | requests/s | utterances scored | utterances/s | statuses | 5xx (not 503) | shed without Retry-After | RSS growth after the first quarter (MiB) | peak RSS (MiB) |\n");
        s.push_str("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n");
        let statuses: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let (growth, peak) = match self.rss_growth_mib {
            Some(g) => (
                format!("{g:+.1}"),
                format!(
                    "{:.0}",
                    self.rss_mib.iter().map(|p| p.1).fold(0.0, f64::max)
                ),
            ),
            None => ("n/a".into(), "n/a".into()),
        };
        s.push_str(&format!(
            "| {} | {:.1} | {} | {:.2} | {} | {:.2} | {} | {} | {} | {} | {} |\n\n",
            self.clients,
            self.seconds,
            self.requests,
            self.requests_per_s,
            self.scored_utterances,
            self.utterances_per_s,
            statuses.join(", "),
            self.server_errors,
            self.missing_retry_after,
            growth,
            peak
        ));
        s.push_str("| call | answered | p50 ms | p95 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n");
        for (k, l) in &self.latency_ms {
            s.push_str(&format!(
                "| {k} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                l.count, l.p50, l.p95, l.p99, l.max
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let l = latency((1..=100).map(f64::from).collect());
        assert_eq!((l.p50, l.p95, l.p99, l.max), (51.0, 95.0, 99.0, 100.0));
        assert_eq!(latency(vec![]).count, 0);
    }

    #[tokio::test]
    async fn refuses_addresses_off_the_loopback() {
        let cfg = LoadConfig {
            addr: "10.1.2.3:80".parse().unwrap(),
            clients: 1,
            max_requests: 1,
            max_duration: Duration::from_secs(1),
            session_share: 0.0,
            session_utterances: 1,
            scope: "last".into(),
            api_key: None,
            dialogues: vec![vec![json!({"speaker": "A", "text": "hi"})]],
            seed: 0,
            request_timeout: Duration::from_secs(1),
        };
        let e = run(cfg).await.unwrap_err();
        assert!(e.contains("loopback"), "{e}");
    }
}
