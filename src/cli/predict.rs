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
use crate::task::Task;

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
    /// The default is kiln's one limit, also `kiln predict`'s and the clean stage's.
    #[arg(long, default_value_t = crate::imaging::DEFAULT_MAX_PIXELS, value_name = "PIXELS")]
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
                    Ok(p) => {
                        let mut v = serde_json::json!({
                            "path": path.display().to_string(),
                            "predicted": predictor.predicted(p),
                            "top_k": predictor.top_k(p, args.top_k),
                            "probabilities": p,
                        });
                        if let Some(present) = predictor.present(p) {
                            v["labels"] = serde_json::json!(present);
                        }
                        v
                    }
                    Err(e) => serde_json::json!({ "path": path.display().to_string(), "error": e }),
                })
                .collect();
            let mut doc = serde_json::json!({ "model": predictor.digest, "classes": classes, "results": items });
            let card = &predictor.model.card;
            match card.task {
                Task::Binary => doc["binary"] = serde_json::json!(card.binary),
                Task::MultiLabel => doc["multi_label"] = serde_json::json!(card.multi_label),
                Task::Classification => {}
            }
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
                    // A multi-label model's `predicted` is every class it calls present,
                    // joined by `|` as label listings write them, with the smallest of their
                    // probabilities.
                    let (called, p_called) = match predictor.present_label(p) {
                        // The probability is empty when no class is called present.
                        Some((called, p_min)) => (called, p_min.map_or(String::new(), |v| v.to_string())),
                        None => {
                            let best = predictor.predicted(p);
                            (best.class, best.probability.to_string())
                        }
                    };
                    let probs: Vec<String> = p.iter().map(|v| v.to_string()).collect();
                    writeln!(w, "{},{},{},{}", csv_field(&path.display().to_string()), csv_field(&called), p_called, probs.join(","))
                        .map_err(io)?;
                }
            }
        }
        Format::Table => {
            let table: Vec<(String, Vec<(String, String)>)> = rows
                .iter()
                .filter_map(|(path, r)| r.as_ref().ok().map(|p| (path, p)))
                .map(|(path, p)| {
                    // The class the model calls comes first (a binary model's at its
                    // threshold, which need not be the more probable class), then the rest
                    // of the top k.
                    // A multi-label model's call is every class it finds present (`-` for none).
                    let called = match predictor.present_label(p) {
                        Some((called, p_min)) => crate::predict::Scored {
                            class: if called.is_empty() { "-".into() } else { called },
                            probability: p_min.unwrap_or(0.0),
                        },
                        None => predictor.predicted(p),
                    };
                    let top = std::iter::once(called.clone())
                        .chain(predictor.top_k(p, args.top_k).into_iter().filter(|s| s.class != called.class))
                        .take(args.top_k.max(1))
                        .map(|s| (s.class, format!("{:.4}", s.probability)))
                        .collect();
                    (path.display().to_string(), top)
                })
                .collect();
            for line in table_lines(&table) {
                writeln!(w, "{line}").map_err(io)?;
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

/// `kiln predict`'s table: a header row (`image  class  probability`, then `2nd class
/// probability`… for the rest of the top k), then one row per image, in aligned columns.
fn table_lines(rows: &[(String, Vec<(String, String)>)]) -> Vec<String> {
    if rows.is_empty() {
        return Vec::new();
    }
    let k = rows.iter().map(|(_, top)| top.len()).max().unwrap_or(0);
    let mut header = vec!["image".to_string()];
    for rank in 1..=k {
        header.push(if rank == 1 { "class".to_string() } else { format!("{} class", ordinal(rank)) });
        header.push("probability".to_string());
    }
    let cells: Vec<Vec<String>> = std::iter::once(header)
        .chain(rows.iter().map(|(image, top)| {
            std::iter::once(image.clone()).chain(top.iter().flat_map(|(class, p)| [class.clone(), p.clone()])).collect::<Vec<String>>()
        }))
        .collect();
    let widths: Vec<usize> =
        (0..1 + 2 * k).map(|j| cells.iter().filter_map(|row| row.get(j)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
    cells
        .iter()
        .map(|row| {
            let padded: Vec<String> = row.iter().zip(&widths).map(|(c, &w)| format!("{c:<w$}")).collect();
            padded.join("  ").trim_end().to_string()
        })
        .collect()
}

/// `2nd`, `3rd`, `11th`, `22nd`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::{ServeArgs, ordinal, table_lines};
    use crate::imaging::{DEFAULT_MAX_PIXELS, DecodeLimits};

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn serve_predict_and_clean_share_one_pixel_limit() {
        let serve = Serve::try_parse_from(["serve", "outputs/p/train"]).unwrap();
        assert_eq!(serve.args.max_pixels, DEFAULT_MAX_PIXELS, "kiln serve --max-pixels");
        assert_eq!(DecodeLimits::default().max_pixels, DEFAULT_MAX_PIXELS, "kiln predict, preprocess and convert");
        let text = "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"synthetic\"\ncount = 8\nsize = 16\n\n\
                    [stages.clean]\nkind = \"clean\"\ninputs = [\"collect\"]\n";
        let parsed = crate::manifest::Manifest::parse(Path::new("/w/kiln.toml"), text, &crate::stages::StageRegistry::builtin(), &[]);
        let manifest = parsed.manifest.unwrap_or_else(|| panic!("{:?}", parsed.issues));
        let clean = manifest.stages.iter().find(|s| s.name == "clean").expect("a clean stage");
        assert_eq!(clean.stage.params()["max_pixels"], DEFAULT_MAX_PIXELS, "the clean stage's `max_pixels`");
    }

    #[test]
    fn the_predict_table_has_a_header_and_aligned_columns() {
        let rows = vec![
            ("data/a.png".to_string(), vec![("circle".to_string(), "0.9000".to_string()), ("star".to_string(), "0.0600".to_string())]),
            ("b.png".to_string(), vec![("triangle".to_string(), "0.5000".to_string()), ("square".to_string(), "0.4000".to_string())]),
        ];
        assert_eq!(
            table_lines(&rows),
            [
                "image       class     probability  2nd class  probability",
                "data/a.png  circle    0.9000       star       0.0600",
                "b.png       triangle  0.5000       square     0.4000",
            ]
        );
        assert!(table_lines(&[]).is_empty());
        assert_eq!(
            [1, 2, 3, 4, 11, 12, 13, 21, 22, 101].map(ordinal),
            ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]
        );
    }
}
