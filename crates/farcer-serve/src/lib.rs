//! farcer as an HTTP service. One loaded [`Predictor`] serves every request through
//! `&self`; the model runs on blocking threads, one request at a time by default (the CPU
//! kernels already use every core), behind a bounded queue that answers 503 with
//! `Retry-After` when full. Live sessions keep their KV cache, so an utterance costs its
//! own tokens, not the conversation again.
//!
//! Routes: `GET /` (a web page), `GET /healthz`, `GET /openapi.json`, `GET /metrics`,
//! `POST /v1/predict`, `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`,
//! `POST /v1/sessions/{id}/utterances`, `GET /v1/sessions/{id}/events` (server-sent events).

pub mod api;
pub mod loadtest;
pub mod metrics;

use api::{Answer, PredictRequest, SessionRequest};
use axum::body::Body;
use axum::extract::{MatchedPath, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use farcer::infer::{Predictor, Session, Vectors};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, Semaphore};

/// Bounds on what one request, and the server as a whole, may take.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_utterances: usize,
    pub max_text_chars: usize,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub request_timeout: Duration,
    /// Requests waiting for or holding the model; more get 503.
    pub queue: usize,
    /// Requests running on the model at once.
    pub workers: usize,
    /// Utterances of different sessions answered in one model pass when they arrive
    /// together (1: one at a time).
    pub max_batch: usize,
    /// How long a worker waits for more session utterances before answering fewer than
    /// `max_batch` (0: answer what waits at once; utterances that arrive while the model
    /// is busy are batched anyway).
    pub batch_wait: Duration,
    pub max_sessions: usize,
    /// Total KV cache of all sessions.
    pub max_session_bytes: usize,
    pub session_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 << 20,
            max_utterances: 200,
            max_text_chars: 4000,
            max_image_bytes: 4 << 20,
            max_image_pixels: 4096 * 4096,
            request_timeout: Duration::from_secs(120),
            queue: 32,
            workers: 1,
            max_batch: 8,
            batch_wait: Duration::ZERO,
            max_sessions: 64,
            max_session_bytes: 2 << 30,
            session_idle: Duration::from_secs(900),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// A bearer token every `/v1/` and `/metrics` request must carry.
    pub api_key: Option<String>,
    /// The only folder `image` paths may name (canonicalized by [`AppState::new`]).
    pub image_root: Option<PathBuf>,
    pub limits: Limits,
}

/// A 4xx/5xx answer: `{"error": {"field": ..., "message": ...}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub field: String,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            field: field.into(),
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(400, field, message)
    }
    fn busy(message: &str) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(503, "server", message)
        }
    }
    /// The library's errors: bad input is the client's (400), the rest the server's.
    fn from_lib(e: farcer::Error) -> Self {
        match e {
            farcer::Error::Input { location, message } => Self::bad(location, message),
            other => Self::new(500, "model", other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {"field": self.field, "message": self.message}});
        let mut r = (status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

struct SessionEntry {
    session: Arc<Mutex<Session>>,
    last_used: Instant,
    bytes: usize,
    events: broadcast::Sender<String>,
}

#[derive(Default)]
struct Sessions {
    live: HashMap<String, SessionEntry>,
    /// Recently ended sessions and why, so their owners get a clear answer (bounded).
    gone: VecDeque<(String, &'static str)>,
}

impl Sessions {
    fn end(&mut self, id: &str, why: &'static str) {
        if self.live.remove(id).is_some() {
            self.gone.push_back((id.to_string(), why));
            while self.gone.len() > 4096 {
                self.gone.pop_front();
            }
        }
    }
    fn bytes(&self) -> usize {
        self.live.values().map(|e| e.bytes).sum()
    }
    /// The session idle the longest, other than `keep`.
    fn oldest_idle(&self, keep: Option<&str>) -> Option<String> {
        self.live
            .iter()
            .filter(|(id, e)| Some(id.as_str()) != keep && Arc::strong_count(&e.session) == 1)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(id, _)| id.clone())
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub predictor: Arc<Predictor>,
    pub config: Config,
    pub metrics: metrics::Metrics,
    sessions: Mutex<Sessions>,
    queue: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    /// Session utterances waiting for the model; whoever gets a worker answers up to
    /// `max_batch` of them (of distinct sessions) in one pass.
    pending: Mutex<VecDeque<Pending>>,
    started: Instant,
}

/// What answering one session utterance gives: the answer, the session's cache bytes
/// after it, and how many times its cache was rebuilt meanwhile.
type Added = (Answer, usize, usize);

/// A session utterance waiting for the model.
struct Pending {
    session: Arc<Mutex<Session>>,
    utterance: farcer::data::Utterance,
    image: Option<image::DynamicImage>,
    answer: tokio::sync::oneshot::Sender<Result<Added, ApiError>>,
    /// The request's queue place, released once it is answered.
    _place: Place,
}

/// A request's place in the queue (counted in the queue-depth gauge until dropped).
struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
    state: Arc<AppState>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.state
            .metrics
            .queue_depth
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    pub fn new(predictor: Predictor, mut config: Config) -> std::io::Result<Arc<Self>> {
        if let Some(r) = &config.image_root {
            config.image_root = Some(r.canonicalize().map_err(|e| {
                std::io::Error::new(e.kind(), format!("--image-root {}: {e}", r.display()))
            })?);
        }
        let l = &config.limits;
        Ok(Arc::new(AppState {
            predictor: Arc::new(predictor),
            queue: Arc::new(Semaphore::new(l.queue.max(1))),
            workers: Arc::new(Semaphore::new(l.workers.max(1))),
            config,
            metrics: Default::default(),
            sessions: Default::default(),
            pending: Default::default(),
            started: Instant::now(),
        }))
    }

    /// A place in the queue, or 503 when it is full.
    fn place(self: &Arc<Self>) -> Result<Place, ApiError> {
        let permit = self
            .queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::busy("the server is at capacity: retry shortly"))?;
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        Ok(Place {
            _permit: permit,
            state: self.clone(),
        })
    }

    /// Runs `f` on the model: takes a queue place now (or answers 503), waits for a
    /// worker, runs on a blocking thread. The places are released when `f` finishes, even
    /// if the request timed out meanwhile.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let place = self.place()?;
        let worker = self.workers.clone().acquire_owned().await;
        let me = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let r = f(&me);
            drop((place, worker));
            r
        })
        .await
        .map_err(|e| ApiError::new(500, "model", format!("the model's thread failed: {e}")))?;
        out
    }

    /// Answers one session utterance: takes a queue place now (or answers 503), and
    /// leaves the utterance for whoever next gets a worker, which answers it together
    /// with the others waiting (see [`AppState::answer_pending`]).
    async fn add_to_session(
        self: &Arc<Self>,
        session: Arc<Mutex<Session>>,
        utterance: farcer::data::Utterance,
        image: Option<image::DynamicImage>,
    ) -> Result<Added, ApiError> {
        let place = self.place()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.lock().expect("pending").push_back(Pending {
            session,
            utterance,
            image,
            answer: tx,
            _place: place,
        });
        // On its own task, so that a request that times out still leaves a worker to
        // answer what waits.
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(worker) = me.workers.clone().acquire_owned().await else {
                return;
            };
            let l = &me.config.limits;
            // Wait for more only while some, but fewer than a batch, are waiting (a task
            // whose utterance an earlier batch answered finds none and returns at once).
            let until = Instant::now() + l.batch_wait;
            while Instant::now() < until {
                let waiting = me.pending.lock().expect("pending").len();
                if waiting == 0 || waiting >= l.max_batch {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let _ = tokio::task::spawn_blocking(move || {
                me.answer_pending();
                drop(worker);
            })
            .await;
        });
        rx.await.map_err(|_| {
            ApiError::new(500, "model", "the model's thread ended without an answer")
        })?
    }

    /// Takes up to `max_batch` waiting utterances of distinct sessions (in arrival
    /// order; later ones of a session wait for the next batch) and answers them in one
    /// pass of [`Predictor::add_many`]. Runs on a blocking thread holding a worker.
    fn answer_pending(&self) {
        let batch: Vec<Pending> = {
            let mut q = self.pending.lock().expect("pending");
            let mut batch: Vec<Pending> = Vec::new();
            let mut rest = VecDeque::new();
            while let Some(p) = q.pop_front() {
                // Its request timed out or went away: answering it would add an
                // utterance the client was told failed (and may send again).
                if p.answer.is_closed() {
                    continue;
                }
                let taken = batch.iter().any(|b| Arc::ptr_eq(&b.session, &p.session));
                if taken || batch.len() >= self.config.limits.max_batch.max(1) {
                    rest.push_back(p);
                } else {
                    batch.push(p);
                }
            }
            *q = rest;
            batch
        };
        if batch.is_empty() {
            return;
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .batched_utterances
            .fetch_add(batch.len(), Ordering::Relaxed);
        let p = &self.predictor;
        // Images first, each on its own (a bad one fails only its request).
        let mut jobs = Vec::with_capacity(batch.len());
        for b in batch {
            let vector = match &b.image {
                Some(i) => match p.encode_images(std::slice::from_ref(i)) {
                    Ok(v) => v.into_iter().next(),
                    Err(e) => {
                        self.finish(b, Err(ApiError::from_lib(e)));
                        continue;
                    }
                },
                None => None,
            };
            jobs.push((b, vector));
        }
        // Sessions locked in one order (by address), so two batches never wait on
        // each other.
        jobs.sort_by_key(|(b, _)| Arc::as_ptr(&b.session) as usize);
        let sessions: Vec<Arc<Mutex<Session>>> =
            jobs.iter().map(|(b, _)| b.session.clone()).collect();
        let mut guards: Vec<_> = sessions.iter().map(|s| lock_session(s)).collect();
        let before: Vec<usize> = guards.iter().map(|g| g.rebuilds).collect();
        let steps = guards
            .iter_mut()
            .zip(&mut jobs)
            .map(|(g, (b, v))| farcer::infer::Step {
                session: g,
                utterance: b.utterance.clone(),
                image: v.take(),
            })
            .collect();
        let answers = p.add_many(steps);
        let done: Vec<Result<Added, ApiError>> = answers
            .into_iter()
            .zip(guards.iter().zip(before))
            .map(|(a, (g, before))| {
                let a = a.map_err(ApiError::from_lib)?;
                Ok((
                    Answer::new(a, &p.labels),
                    g.cache_bytes(),
                    g.rebuilds - before,
                ))
            })
            .collect();
        drop(guards);
        for ((b, _), r) in jobs.into_iter().zip(done) {
            self.finish(b, r);
        }
    }

    /// Answers a waiting request; its queue place goes with it.
    fn finish(&self, p: Pending, r: Result<Added, ApiError>) {
        let _ = p.answer.send(r);
    }

    /// Ends sessions idle longer than the limit; returns how many.
    pub fn expire_idle(&self) -> usize {
        let idle = self.config.limits.session_idle;
        let mut s = self.sessions.lock().expect("sessions");
        let old: Vec<String> = s
            .live
            .iter()
            .filter(|(_, e)| e.last_used.elapsed() > idle && Arc::strong_count(&e.session) == 1)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &old {
            s.end(id, "expired after being idle");
        }
        self.metrics
            .sessions_expired
            .fetch_add(old.len(), Ordering::Relaxed);
        self.update_session_gauges(&s);
        old.len()
    }

    fn update_session_gauges(&self, s: &Sessions) {
        self.metrics
            .sessions_open
            .store(s.live.len(), Ordering::Relaxed);
        self.metrics
            .kv_cache_bytes
            .store(s.bytes(), Ordering::Relaxed);
    }
}

/// The whole service.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/sessions", post(open_session))
        .route("/v1/sessions/{id}", get(session_info).delete(end_session))
        .route("/v1/sessions/{id}/utterances", post(add_utterance))
        .route("/v1/sessions/{id}/events", get(session_events))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .merge(v1)
        .fallback(|| async { ApiError::new(404, "path", "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then finishes the requests in flight. Sessions idle
/// too long are ended every few seconds meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = {
        let s = state.clone();
        tokio::spawn(async move {
            let every = (s.config.limits.session_idle / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(10));
            loop {
                tokio::time::sleep(every).await;
                s.expire_idle();
            }
        })
    };
    let r = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    r
}

/// Counts and times every request by its route and status; applies the request timeout.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let streaming = route.ends_with("/events");
    let resp = if streaming {
        next.run(req).await
    } else {
        match tokio::time::timeout(st.config.limits.request_timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    503,
                    "server",
                    "the request took longer than the server's timeout",
                )
            }
            .into_response(),
        }
    };
    st.metrics.record(
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                401,
                "authorization",
                "a valid `Authorization: Bearer <key>` is required",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares in time that does not depend on where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn body_bytes(st: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let max = st.config.limits.max_body_bytes;
    axum::body::to_bytes(body, max)
        .await
        .map_err(|_| ApiError::new(413, "body", format!("larger than the {max} bytes allowed")))
}

/// A request's JSON body: the content type checked, the size bounded.
async fn json_body(
    st: &AppState,
    h: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    match h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) if !ct.starts_with("application/json") => Err(ApiError::new(
            415,
            "content-type",
            format!("`{ct}`: send application/json"),
        )),
        _ => body_bytes(st, body).await,
    }
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": st.predictor.kind(),
        "llm": st.predictor.llm().name,
        "labels": st.predictor.labels,
        "images": st.predictor.takes_images(),
        "uptime_s": st.started.elapsed().as_secs_f64(),
    }))
    .into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

async fn predict(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&st, &headers, body).await?;
    let req: PredictRequest = api::parse(&bytes)?;
    let limits = &st.config.limits;
    if req.utterances.is_empty() || req.utterances.len() > limits.max_utterances {
        return Err(ApiError::bad(
            "utterances",
            format!(
                "{} utterances: send 1 to {}",
                req.utterances.len(),
                limits.max_utterances
            ),
        ));
    }
    let opts = req.options();
    let mut utts = Vec::new();
    let mut images = Vec::new();
    for (i, u) in req.utterances.into_iter().enumerate() {
        let (mut u, img) = api::utterance(
            u,
            &format!("utterances[{i}]"),
            i,
            limits,
            st.config.image_root.as_deref(),
            &st.predictor.labels,
        )?;
        if let Some(img) = img {
            let key = PathBuf::from(format!("request-image:{i}"));
            u.image = Some(key.clone());
            images.push((key, img));
        }
        utts.push(u);
    }
    let id = req.id;
    let start = Instant::now();
    let answers = st
        .run(move |st| {
            let p = &st.predictor;
            let (keys, imgs): (Vec<_>, Vec<_>) = images.into_iter().unzip();
            let vectors: Vectors = keys
                .into_iter()
                .zip(p.encode_images(&imgs).map_err(ApiError::from_lib)?)
                .collect();
            let preds = p
                .predict(&utts, &vectors, &opts)
                .map_err(ApiError::from_lib)?;
            Ok(preds
                .into_iter()
                .map(|x| Answer::new(x, &p.labels))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(axum::Json(json!({
        "id": id,
        "predictions": answers,
        "total_ms": start.elapsed().as_secs_f64() * 1e3,
    }))
    .into_response())
}

async fn open_session(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&st, &headers, body).await?;
    let opts: SessionRequest = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Default::default()
    } else {
        api::parse(&bytes)?
    };
    // After the first session of a prompt set, opening one needs no model pass.
    let session = match st.predictor.ready_session(&opts) {
        Some(s) => s,
        None => {
            st.run(move |st| st.predictor.session(&opts).map_err(ApiError::from_lib))
                .await?
        }
    };
    let id = format!("{:032x}", rand::random::<u128>());
    let bytes = session.cache_bytes();
    let mut s = st.sessions.lock().expect("sessions");
    let limits = &st.config.limits;
    while s.live.len() >= limits.max_sessions || s.bytes() + bytes > limits.max_session_bytes {
        match s.oldest_idle(None) {
            Some(old) => {
                s.end(&old, "evicted to make room for newer sessions");
                st.metrics.sessions_evicted.fetch_add(1, Ordering::Relaxed);
            }
            None => return Err(ApiError::busy("every session is busy: retry shortly")),
        }
    }
    let (events, _) = broadcast::channel(64);
    s.live.insert(
        id.clone(),
        SessionEntry {
            session: Arc::new(Mutex::new(session)),
            last_used: Instant::now(),
            bytes,
            events,
        },
    );
    st.update_session_gauges(&s);
    Ok((StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response())
}

/// A live session's handle, or 404 (never existed) / 410 (ended, and why).
fn find(
    st: &AppState,
    id: &str,
) -> Result<(Arc<Mutex<Session>>, broadcast::Sender<String>), ApiError> {
    let mut s = st.sessions.lock().expect("sessions");
    if let Some(e) = s.live.get_mut(id) {
        e.last_used = Instant::now();
        return Ok((e.session.clone(), e.events.clone()));
    }
    match s.gone.iter().find(|(g, _)| g == id) {
        Some((_, why)) => Err(ApiError::new(
            410,
            "id",
            format!("session {id} has ended: {why}"),
        )),
        None => Err(ApiError::new(404, "id", format!("no session {id}"))),
    }
}

/// A session's lock; one poisoned by a step that panicked is taken over rather than
/// failing every later request to the session.
fn lock_session(s: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// `f` of a session, run off the async threads: a batch may hold the session for a whole
/// model pass.
async fn read_session<T: Send + 'static>(
    s: &Arc<Mutex<Session>>,
    f: impl FnOnce(&Session) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&lock_session(&s)))
        .await
        .map_err(|e| ApiError::new(500, "server", e.to_string()))
}

async fn session_info(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (s, _) = find(&st, &id)?;
    let (utterances, cache_tokens, cache_bytes, dropped, rebuilds) = read_session(&s, |s| {
        (
            s.len(),
            s.cache_tokens(),
            s.cache_bytes(),
            s.dropped(),
            s.rebuilds,
        )
    })
    .await?;
    Ok(axum::Json(json!({
        "id": id,
        "utterances": utterances,
        "cache_tokens": cache_tokens,
        "cache_bytes": cache_bytes,
        "dropped": dropped,
        "rebuilds": rebuilds,
    }))
    .into_response())
}

async fn end_session(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    find(&st, &id)?;
    let mut s = st.sessions.lock().expect("sessions");
    s.end(&id, "deleted by its owner");
    st.update_session_gauges(&s);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn add_utterance(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&st, &headers, body).await?;
    let u: api::InUtterance = api::parse(&bytes)?;
    let (session, events) = find(&st, &id)?;
    let index = read_session(&session, |s| s.len()).await?;
    if index >= 100_000 {
        return Err(ApiError::bad(
            "utterances",
            "a session holds at most 100000 utterances",
        ));
    }
    let (u, img) = api::utterance(
        u,
        "utterance",
        index,
        &st.config.limits,
        st.config.image_root.as_deref(),
        &st.predictor.labels,
    )?;
    let (answer, bytes, rebuilt) = st.add_to_session(session, u, img).await?;
    st.metrics
        .cache_rebuilds
        .fetch_add(rebuilt, Ordering::Relaxed);
    {
        let mut s = st.sessions.lock().expect("sessions");
        if let Some(e) = s.live.get_mut(&id) {
            e.bytes = bytes;
            e.last_used = Instant::now();
        }
        // Over the memory bound: end the sessions idle longest (never this one).
        while s.bytes() > st.config.limits.max_session_bytes {
            match s.oldest_idle(Some(&id)) {
                Some(old) => {
                    s.end(
                        &old,
                        "evicted to keep the sessions' memory within its bound",
                    );
                    st.metrics.sessions_evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        st.update_session_gauges(&s);
    }
    let v = serde_json::to_value(&answer).expect("answers serialize");
    let _ = events.send(v.to_string());
    Ok(axum::Json(v).into_response())
}

async fn session_events(
    State(st): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (_, events) = find(&st, &id)?;
    let rx = events.subscribe();
    drop(events);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(s) => {
                    return Some((
                        Ok::<_, std::convert::Infallible>(Event::default().event("answer").data(s)),
                        rx,
                    ))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Binds `addr`, tells `on_listen` the address, and serves until Ctrl-C or SIGTERM,
/// finishing the requests in flight: the whole server on its own runtime, for callers
/// without one.
pub fn run(
    addr: &str,
    state: Arc<AppState>,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        on_listen(listener.local_addr()?);
        serve(listener, state, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
