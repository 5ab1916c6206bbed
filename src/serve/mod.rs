//! `kiln serve`: a trained model over HTTP (axum on tokio).
//!
//! | route | |
//! |---|---|
//! | `POST /v1/predict[?top_k=K]` | raw image bytes, or `multipart/form-data` with one or more images → JSON: the class called (`predicted`; a binary model's at its threshold), top-k and every class's probability |
//! | `GET /v1/model` | classes, preprocessing, metrics, weights digest |
//! | `GET /healthz` | liveness |
//! | `GET /metrics` | Prometheus text: requests, latency, batch sizes, errors, queue depth |
//!
//! Every 4xx and 5xx answer has the body `{"error": "...", "reason": "..."}` (hyper's own
//! answers and axum's rejections included), and bad input never takes the server down:
//!
//! - 400: an empty body, bytes that are not an image, a truncated or corrupt image, a
//!   `top_k` that is not a whole number from 1 to the model's class count (`bad_top_k`), a
//!   request that is not HTTP/1.1.
//! - 404 / 405: an unknown route, or a method the route does not take.
//! - 408: a request head not complete within `--read-timeout-secs` (`header_timeout`; an idle
//!   connection is closed silently), or a body not complete within `--body-timeout-secs`
//!   (`body_timeout`).
//! - 413: a declared `Content-Length` over `--max-body` (refused before any of the body is
//!   read), a body that turns out longer, a decompression bomb (refused from the image header
//!   before any pixel memory is reserved).
//! - 415: a `Content-Type` other than `application/octet-stream`, `image/*` or
//!   `multipart/form-data` (no `Content-Type` at all is raw image bytes).
//! - 431: a request head with too many or too large header fields.
//! - 503: a full queue, or the server shutting down.
//!
//! SIGTERM or Ctrl-C stop accepting connections and finish the requests in flight.

pub mod batcher;
mod conn;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::imaging::Defect;
use crate::predict::{InputError, Predictor, Scored};
use crate::task::Task;
use batcher::{BatchConfig, Batcher, Refused};
use conn::{ConnHandle, TimedListener};
use stats::ServerStats;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub batch: BatchConfig,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Default `top_k` when the request does not say (clamped to the class count).
    pub top_k: usize,
    /// How long a client may take to send a request head (and a connection may sit idle).
    pub header_timeout: Duration,
    /// How long a client may take to send a request body, from when its head arrived.
    pub body_timeout: Duration,
}

/// The model being served; `--watch` swaps in a new one without stopping.
pub type ModelSlot = Arc<std::sync::RwLock<Arc<Predictor>>>;

#[derive(Clone)]
struct AppState {
    model: ModelSlot,
    batcher: Batcher,
    stats: Arc<ServerStats>,
    top_k: usize,
    max_body: usize,
    body_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// One image's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageResult {
    /// The multipart field's file name (or field name); absent for a raw body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The class the model calls: the most probable, or a binary model's at its threshold.
    pub predicted: Scored,
    /// A multi-label model's classes called present, each from its threshold on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<Scored>>,
    pub top_k: Vec<Scored>,
    /// Every class's probability, in the model's class order.
    pub probabilities: Vec<f32>,
}

/// A JSON error body with its status, counted in `/metrics` under `reason`.
struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    /// Close the connection after the answer (the request body was not read to its end).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, reason, message: message.into(), close: false }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn from_input(e: &InputError, what: &str) -> Self {
        let (status, reason) = match e {
            InputError::Image(Defect::Empty) => (StatusCode::BAD_REQUEST, "empty"),
            InputError::Image(Defect::NotAnImage) => (StatusCode::BAD_REQUEST, "not_an_image"),
            InputError::Image(Defect::Truncated { .. }) => (StatusCode::BAD_REQUEST, "truncated"),
            InputError::Image(Defect::Corrupt { .. }) => (StatusCode::BAD_REQUEST, "corrupt"),
            InputError::Image(Defect::TooManyPixels { .. }) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels"),
            InputError::Image(Defect::TooManyBytes { .. }) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_bytes"),
            InputError::DecoderPanic(_) => (StatusCode::BAD_REQUEST, "decoder_failure"),
        };
        ApiError::new(status, reason, format!("{what}: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(serde_json::json!({ "error": self.message, "reason": self.reason }))).into_response();
        r.extensions_mut().insert(ErrorReason(self.reason));
        if self.close {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

#[derive(Clone, Copy)]
struct ErrorReason(&'static str);

/// The body of every error answer.
fn error_body(message: &str, reason: &str) -> String {
    serde_json::json!({ "error": message, "reason": reason }).to_string()
}

/// The `reason` of an error answer that did not name one.
fn status_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "body_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        431 => "headers_too_large",
        500 => "internal",
        503 => "unavailable",
        s if s >= 500 => "server_error",
        _ => "client_error",
    }
}

/// Builds the router for a loaded model; the caller owns the listener.
fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model_info))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .route("/metrics", get(metrics))
        // After the routes: it applies to the routes present.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}: the routes are POST /v1/predict, GET /v1/model, GET /healthz, GET /metrics", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{} does not take {method}", uri.path()))
}

/// Tells the connection (see `conn`) that the router has a request, until it is answered.
async fn track(req: Request, next: Next) -> Response {
    let _in_flight = req.extensions().get::<ConnectInfo<ConnHandle>>().map(|c| c.0.begin());
    next.run(req).await
}

/// Gives every error answer that is not already an [`ApiError`] (axum's rejections, its
/// default 404/405, a body limit) the `{"error", "reason"}` JSON body, keeping its status
/// and headers; a plain-text body becomes the message.
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.extensions().get::<ErrorReason>().is_some() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let reason = status_reason(status);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.extensions.insert(ErrorReason(reason));
    Response::from_parts(parts, axum::body::Body::from(error_body(&message, reason)))
}

/// Counts every request by route and status, and its latency.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = match req.uri().path() {
        p @ ("/v1/predict" | "/v1/model" | "/healthz" | "/metrics") => p.to_string(),
        _ => "other".to_string(),
    };
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status();
    if let Some(ErrorReason(reason)) = response.extensions().get::<ErrorReason>() {
        state.stats.error(reason);
    } else if status == StatusCode::PAYLOAD_TOO_LARGE {
        state.stats.error("body_too_large");
    }
    state.stats.observe_request(&route, status.as_u16(), started.elapsed());
    response
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.stats.render()).into_response()
}

fn current(slot: &ModelSlot) -> Arc<Predictor> {
    slot.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

async fn model_info(State(state): State<AppState>) -> Response {
    let predictor = current(&state.model);
    let card = &predictor.model.card;
    let mut info = serde_json::json!({
        "model": card.model,
        "architecture": card.architecture,
        "classes": card.classes,
        "input": card.input,
        "preprocessing": predictor.transform,
        "metrics": card.metrics,
        "weights_digest": card.weights_digest,
        "parameters": card.parameters,
    });
    // A classifier's answer stays what it was; the other tasks say how they decide.
    match card.task {
        Task::Binary => info["binary"] = serde_json::json!(card.binary),
        Task::MultiLabel => info["multi_label"] = serde_json::json!(card.multi_label),
        Task::Classification => {}
    }
    if !card.task.is_classification() {
        info["task"] = serde_json::json!(card.task);
    }
    axum::Json(info).into_response()
}

async fn predict(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    // One model for the whole request, even if a reload lands meanwhile.
    let model = current(&state.model);
    // Everything that can be refused from the head is, before any of the body is read.
    let top_k = requested_top_k(req.uri(), state.top_k, model.model.card.classes.len())?;
    let kind = body_kind(req.headers())?;
    if let Some(declared) = declared_length(req.headers())
        && declared > state.max_body as u64
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body ({declared} bytes) exceeds the server's limit of {} bytes (--max-body)", state.max_body),
        )
        .closing());
    }
    let inputs = match tokio::time::timeout(state.body_timeout, read_inputs(&state, req, kind)).await {
        Ok(inputs) => inputs?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body was not complete within {} s (--body-timeout-secs)", state.body_timeout.as_secs()),
            )
            .closing());
        }
    };

    // Decode and preprocess off the async threads, all images of the request at once.
    let predictor = model.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        inputs.into_par_iter().map(|(name, bytes)| (name, predictor.prepare(&bytes))).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;

    let mut pending = Vec::with_capacity(prepared.len());
    for (k, (name, image)) in prepared.into_iter().enumerate() {
        let what = name.clone().map_or_else(|| "image".to_string(), |n| format!("part {k} (`{n}`)"));
        let image = image.map_err(|e| ApiError::from_input(&e, &what))?;
        let rx = state.batcher.submit(image, model.clone()).map_err(|r| match r {
            Refused::Busy => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", "server busy: the request queue is full, retry later")
            }
            Refused::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down"),
        })?;
        pending.push((name, rx));
    }
    let mut results = Vec::with_capacity(pending.len());
    for (name, rx) in pending {
        let probs = rx
            .await
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down"))?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference", e))?;
        state.stats.images.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let top = model.top_k(&probs, top_k);
        results.push(ImageResult {
            name,
            predicted: model.predicted(&probs),
            labels: model.present(&probs),
            top_k: top,
            probabilities: probs,
        });
    }
    Ok(axum::Json(serde_json::json!({ "model": model.digest, "results": results })).into_response())
}

/// `?top_k=K`: a whole number from 1 to the model's class count, else 400. Without it, the
/// server's default (`--top-k`), clamped to the class count.
fn requested_top_k(uri: &Uri, default: usize, classes: usize) -> Result<usize, ApiError> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", format!("cannot read the query string: {}", e.body_text())))?;
    let mut given = pairs.iter().filter(|(key, _)| key == "top_k").map(|(_, value)| value.as_str());
    let Some(raw) = given.next() else { return Ok(default.clamp(1, classes.max(1))) };
    let bad = |why: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_top_k",
            format!("{why}: top_k must be a whole number from 1 to {classes} (the model's class count)"),
        )
    };
    if given.next().is_some() {
        return Err(bad("top_k is given more than once".to_string()));
    }
    match raw.trim().parse::<usize>() {
        Ok(k) if (1..=classes).contains(&k) => Ok(k),
        Ok(0) => Err(bad("top_k=0 asks for no classes".to_string())),
        Ok(k) => Err(bad(format!("top_k={k} is more than the model's {classes} classes"))),
        Err(_) => Err(bad(format!("top_k=`{raw}` is not a whole number"))),
    }
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    /// One image's bytes.
    Raw,
    Multipart,
}

/// Raw image bytes come as `application/octet-stream`, `image/*` or without a
/// `Content-Type`; several images as `multipart/form-data`. Anything else is 415.
fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(BodyKind::Raw) };
    let shown = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let essence = shown.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => Ok(BodyKind::Multipart),
        "application/octet-stream" => Ok(BodyKind::Raw),
        m if m.strip_prefix("image/").is_some_and(|sub| !sub.is_empty()) => Ok(BodyKind::Raw),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type `{shown}` is not accepted: send image bytes as application/octet-stream or image/* (or without a Content-Type), or images as multipart/form-data"
            ),
        )
        .closing()),
    }
}

/// The body length the head declares, if it declares one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The request's images: the raw body, or each part of a multipart body.
async fn read_inputs(state: &AppState, req: Request, kind: BodyKind) -> Result<Vec<(Option<String>, Bytes)>, ApiError> {
    let mut inputs: Vec<(Option<String>, Bytes)> = Vec::new();
    match kind {
        BodyKind::Multipart => {
            let mut form =
                Multipart::from_request(req, state).await.map_err(|e| ApiError::new(e.status(), "bad_multipart", e.body_text()))?;
            loop {
                let field = match form.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(multipart_error(e)),
                };
                let name = field.file_name().or(field.name()).map(str::to_string);
                let bytes = field.bytes().await.map_err(multipart_error)?;
                inputs.push((name, bytes));
            }
            if inputs.is_empty() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty", "the multipart body holds no images"));
            }
        }
        BodyKind::Raw => {
            // A raw `Request` bypasses `DefaultBodyLimit`, so the limit is applied here.
            let bytes = axum::body::to_bytes(req.into_body(), state.max_body).await.map_err(|e| {
                let too_large = format!("{e} {:?}", std::error::Error::source(&e)).contains("length limit");
                if too_large {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        "the request body exceeds the server's limit (--max-body)",
                    )
                    .closing()
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("cannot read the request body: {e}"))
                }
            })?;
            if bytes.is_empty() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty", "empty request body: send image bytes or multipart/form-data"));
            }
            inputs.push((None, bytes));
        }
    }
    Ok(inputs)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    let reason = if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_multipart" };
    ApiError::new(status, reason, e.body_text())
}

/// Serves until SIGTERM or Ctrl-C; `ready` gets the bound address (port 0 picks one).
pub fn serve(model: ModelSlot, config: ServeConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let stats = Arc::new(ServerStats::default());
    let (batcher, worker) = Batcher::start(config.batch, stats.clone());
    let state = AppState {
        model,
        batcher,
        stats: stats.clone(),
        top_k: config.top_k,
        max_body: config.max_body,
        body_timeout: config.body_timeout,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("kiln-http").build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr).await.map_err(|source| ServeError::Bind { addr: config.addr, source })?;
        ready(listener.local_addr()?);
        let listener = TimedListener::new(listener, config.header_timeout, stats);
        let app = router(state, config.max_body).into_make_service_with_connect_info::<ConnHandle>();
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        Ok::<(), ServeError>(())
    })?;
    // The router (and with it every queue sender) is gone: the inference thread drains and ends.
    drop(runtime);
    let _ = worker.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

/// Default: 16 MiB bodies.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// Default: 10 s to send a request head (and for an idle connection to stay open).
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 10;

/// Default: 30 s to send a request body (16 MiB at about 0.5 MB/s).
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 30;

/// Default batching: up to 32 images, waiting at most 2 ms for company.
pub const DEFAULT_BATCH: BatchConfig = BatchConfig { max_batch: 32, max_wait: Duration::from_millis(2), queue: 1024 };

/// `--watch`: every `interval`, resolves `spec` again (a `FILE:STAGE` follows the lock file)
/// and, when the model files changed, loads the new model and swaps it in. A model that
/// fails to load is logged and the old one keeps serving.
pub fn watch(
    slot: ModelSlot,
    spec: String,
    load: impl Fn(&crate::predict::ModelFiles) -> Result<Predictor, String> + Send + 'static,
    interval: Duration,
) {
    let fingerprint = |files: &crate::predict::ModelFiles| -> Option<(std::path::PathBuf, std::path::PathBuf, Vec<u64>)> {
        let stamp = |p: &std::path::Path| {
            let m = std::fs::metadata(p).ok()?;
            let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
            Some([m.len(), mtime])
        };
        Some((files.card.clone(), files.weights.clone(), [stamp(&files.card)?, stamp(&files.weights)?].concat()))
    };
    let mut last = crate::predict::ModelFiles::resolve(&spec).ok().and_then(|f| fingerprint(&f));
    std::thread::Builder::new()
        .name("kiln-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Ok(files) = crate::predict::ModelFiles::resolve(&spec) else { continue };
                let now = fingerprint(&files);
                if now.is_none() || now == last {
                    continue;
                }
                match load(&files) {
                    Ok(p) => {
                        tracing::warn!("reloaded the model: weights {}", &p.digest[..p.digest.len().min(16)]);
                        *slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(p);
                        last = now;
                    }
                    Err(e) => tracing::warn!("--watch: keeping the current model: {e}"),
                }
            }
        })
        .expect("spawn the watcher");
}
