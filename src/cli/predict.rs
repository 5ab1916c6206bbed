//! `kiln predict MODEL IMAGE_OR_DIR...` and `kiln serve MODEL`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rayon::prelude::*;

use super::progress::CliReporter;
use crate::Error;
use crate::formats::csv_field;
use crate::imaging::DecodeLimits;
use crate::nn::device::DeviceChoice;
use crate::predict::{ModelFiles, Predictor};
use crate::report::Reporter;
use crate::serve::batcher::BatchConfig;
use crate::serve::{DEFAULT_MAX_BODY, ServeConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A train stage's output directory (model.json + model.safetensors), a model.json, or
    /// `MANIFEST.toml:STAGE` (the stage's result in the cache, as the lock file names it).
    model: String,
    /// Images, or directories to search for images.
    #[arg(required = true, value_name = "IMAGE_OR_DIR")]
    inputs: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3, value_name = "K")]
    top_k: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_name = "N")]
    batch_size: usize,
    /// `auto`, `cpu`, `cuda[:N]` or `metal`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// As for `kiln predict`.
    model: String,
    /// Where to listen. Only localhost unless told otherwise; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Most images per forward pass; 1 turns dynamic batching off.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_batch: usize,
    /// How long the first image of a batch waits for others, in milliseconds.
    #[arg(long, default_value_t = 2, value_name = "MS")]
    max_wait_ms: u64,
    /// Images that may wait for the model; more get 503.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    queue: usize,
    /// Largest request body, in bytes. A larger declared Content-Length gets 413 before any of
    /// the body is read.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY, value_name = "BYTES")]
    max_body: usize,
    /// Seconds a client has to send a complete request head, counted from when the server
    /// starts waiting for it (a new connection, or the previous answer). A head still
    /// incomplete then gets 408 with a JSON error and the connection is closed; an idle
    /// keep-alive connection is closed silently.
    #[arg(long, default_value_t = crate::serve::DEFAULT_READ_TIMEOUT_SECS, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    read_timeout_secs: u64,
    /// Seconds a client has to send the whole request body once its head has arrived; a body
    /// still shorter than its Content-Length then gets 408 with a JSON error and the
    /// connection is closed.
    #[arg(long, default_value_t = crate::serve::DEFAULT_BODY_TIMEOUT_SECS, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    body_timeout_secs: u64,
    /// Largest image (width × height) decoded; bigger ones get 413 from their header alone.
    #[arg(long, default_value_t = 40_000_000, value_name = "PIXELS")]
    max_pixels: u64,
    /// Classes returned per image unless the request says `?top_k=K` (clamped to the model's
    /// class count). A request's `top_k` must be a whole number from 1 to the class count,
    /// else 400.
    #[arg(long, default_value_t = 5, value_name = "K")]
    top_k: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Reload the model when its files change (for `FILE:STAGE`: when the lock file names a
    /// new result of the stage); requests in flight finish on the model they started with.
    #[arg(long)]
    watch: bool,
}

fn load(spec: &str, device: &str, limits: DecodeLimits) -> Result<Predictor, Error> {
    let choice: DeviceChoice = device.parse().map_err(|e| Error::Usage(format!("--device {device}: {e}")))?;
    let device = choice.open().map_err(|e| Error::Usage(format!("--device {device}: {e}")))?;
    let files = ModelFiles::resolve(spec).map_err(|e| Error::Usage(e.to_string()))?;
    Predictor::load(&files, device, limits).map_err(|e| Error::Usage(e.to_string()))
}

pub fn predict(args: PredictArgs, out: &CliReporter) -> Result<(), Error> {
    let predictor = load(&args.model, &args.device, DecodeLimits::default())?;
    let files = crate::predict::image_files(&args.inputs);
    if files.is_empty() {
        return Err(Error::Usage("no images found in the given paths".into()));
    }
    let classes = predictor.model.card.classes.clone();
    let progress = out.progress("predicting", files.len() as u64, "images");
    let mut rows: Vec<(PathBuf, Result<Vec<f32>, String>)> = Vec::with_capacity(files.len());
    for chunk in files.chunks(args.batch_size.max(1)) {
        let prepared: Vec<Result<Vec<f32>, String>> = chunk
            .par_iter()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
                predictor.prepare(&bytes).map_err(|e| e.to_string())
            })
            .collect();
        let ok: Vec<Vec<f32>> = prepared.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
        let mut probs = predictor.probabilities(&ok).map_err(|e| Error::Usage(e.to_string()))?.into_iter();
        for (path, p) in chunk.iter().zip(prepared) {
            rows.push((path.clone(), p.map(|_| probs.next().expect("one row per prepared image"))));
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    let io = |e: std::io::Error| Error::Io { action: "write", path: PathBuf::from("<stdout>"), source: e };
    match args.format {
        Format::Json => {
            let items: Vec<serde_json::Value> = rows
                .iter()
                .map(|(path, r)| match r {
                    Ok(p) => serde_json::json!({
                        "path": path.display().to_string(),
                        "top_k": predictor.top_k(p, args.top_k),
                        "probabilities": p,
                    }),
                    Err(e) => serde_json::json!({ "path": path.display().to_string(), "error": e }),
                })
                .collect();
            let doc = serde_json::json!({ "model": predictor.digest, "classes": classes, "results": items });
            writeln!(w, "{}", serde_json::to_string_pretty(&doc).expect("json")).map_err(io)?;
        }
        Format::Csv => {
            let mut header = String::from("path,predicted,p_max");
            for c in &classes {
                header.push_str(&format!(",p_{c}"));
            }
            writeln!(w, "{header}").map_err(io)?;
            for (path, r) in &rows {
                if let Ok(p) = r {
                    let best = &predictor.top_k(p, 1)[0];
                    let probs: Vec<String> = p.iter().map(|v| v.to_string()).collect();
                    writeln!(
                        w,
                        "{},{},{},{}",
                        csv_field(&path.display().to_string()),
                        csv_field(&best.class),
                        best.probability,
                        probs.join(",")
                    )
                    .map_err(io)?;
                }
            }
        }
        Format::Table => {
            for (path, r) in &rows {
                if let Ok(p) = r {
                    let top: Vec<String> =
                        predictor.top_k(p, args.top_k).iter().map(|s| format!("{} {:.4}", s.class, s.probability)).collect();
                    writeln!(w, "{}  {}", path.display(), top.join("  ")).map_err(io)?;
                }
            }
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    for (path, r) in &rows {
        if let Err(e) = r {
            out.warn(&format!("{}: {e}", path.display()));
        }
    }
    if failed > 0 { Err(Error::Usage(format!("{failed} of {} inputs could not be classified", rows.len()))) } else { Ok(()) }
}

pub fn serve(args: ServeArgs, out: &CliReporter) -> Result<(), Error> {
    let limits = DecodeLimits { max_pixels: args.max_pixels, max_bytes: args.max_body as u64 };
    let predictor = load(&args.model, &args.device, limits)?;
    let config = ServeConfig {
        addr: args.addr,
        batch: BatchConfig {
            max_batch: args.max_batch.max(1),
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue: args.queue.max(1),
        },
        max_body: args.max_body,
        top_k: args.top_k.max(1),
        header_timeout: Duration::from_secs(args.read_timeout_secs),
        body_timeout: Duration::from_secs(args.body_timeout_secs),
    };
    let classes = predictor.model.card.classes.len();
    let slot: crate::serve::ModelSlot = std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(predictor)));
    if args.watch {
        let device = args.device.clone();
        crate::serve::watch(
            slot.clone(),
            args.model.clone(),
            move |files| {
                let choice: DeviceChoice = device.parse()?;
                let device = choice.open().map_err(|e| e.to_string())?;
                Predictor::load(files, device, limits).map_err(|e| e.to_string())
            },
            Duration::from_secs(1),
        );
    }
    crate::serve::serve(slot, config, |addr| {
        out.line(&format!("listening on http://{addr} ({classes} classes)"));
    })
    .map_err(|e| Error::Usage(e.to_string()))
}
