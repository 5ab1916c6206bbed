//! `kiln serve`: a trained model over HTTP (axum on tokio).
//!
//! | route | |
//! |---|---|
//! | `POST /v1/predict[?top_k=K]` | raw image bytes, or `multipart/form-data` with one or more images → JSON top-k and every class's probability |
//! | `GET /v1/model` | classes, preprocessing, metrics, weights digest |
//! | `GET /healthz` | liveness |
//! | `GET /metrics` | Prometheus text: requests, latency, batch sizes, errors, queue depth |
//!
//! Bad input is a 4xx with `{"error": "..."}` and never takes the server down: an empty body
//! (400), bytes that are not an image or a truncated/corrupt image (400), a decompression
//! bomb (413, refused from the header before any pixel memory is reserved), a body over the
//! limit (413). A full queue is 503. SIGTERM or Ctrl-C stop accepting connections and finish
//! the requests in flight.

pub mod batcher;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::imaging::Defect;
use crate::predict::{InputError, Predictor, Scored};
use batcher::{BatchConfig, Batcher, Refused};
use stats::ServerStats;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub batch: BatchConfig,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Default `top_k` when the request does not say.
    pub top_k: usize,
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
    pub top_k: Vec<Scored>,
    /// Every class's probability, in the model's class order.
    pub probabilities: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    top_k: Option<usize>,
}

/// A JSON error body with its status, counted in `/metrics` under `reason`.
struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, reason, message: message.into() }
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
        r
    }
}

#[derive(Clone, Copy)]
struct ErrorReason(&'static str);

/// Builds the router for a loaded model; the caller owns the listener.
fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model_info))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
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
    axum::Json(serde_json::json!({
        "model": card.model,
        "architecture": card.architecture,
        "classes": card.classes,
        "input": card.input,
        "preprocessing": predictor.transform,
        "metrics": card.metrics,
        "weights_digest": card.weights_digest,
        "parameters": card.parameters,
    }))
    .into_response()
}

async fn predict(State(state): State<AppState>, Query(q): Query<PredictQuery>, req: Request) -> Result<Response, ApiError> {
    // One model for the whole request, even if a reload lands meanwhile.
    let model = current(&state.model);
    let top_k = q.top_k.unwrap_or(state.top_k).clamp(1, model.model.card.classes.len());
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let mut inputs: Vec<(Option<String>, axum::body::Bytes)> = Vec::new();
    if is_multipart {
        let mut form = Multipart::from_request(req, &state).await.map_err(|e| ApiError::new(e.status(), "bad_multipart", e.body_text()))?;
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
    } else {
        // A raw `Request` bypasses `DefaultBodyLimit`, so the limit is applied here.
        let bytes = axum::body::to_bytes(req.into_body(), state.max_body).await.map_err(|e| {
            let too_large = format!("{e} {:?}", std::error::Error::source(&e)).contains("length limit");
            if too_large {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the request body exceeds the server's limit (--max-body)")
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("cannot read the request body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty", "empty request body: send image bytes or multipart/form-data"));
        }
        inputs.push((None, bytes));
    }

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
        results.push(ImageResult { name, top_k: top, probabilities: probs });
    }
    Ok(axum::Json(serde_json::json!({ "model": model.digest, "results": results })).into_response())
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
    let state = AppState { model, batcher, stats, top_k: config.top_k, max_body: config.max_body };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("kiln-http").build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr).await.map_err(|source| ServeError::Bind { addr: config.addr, source })?;
        ready(listener.local_addr()?);
        axum::serve(listener, router(state, config.max_body)).with_graceful_shutdown(shutdown_signal()).await?;
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
