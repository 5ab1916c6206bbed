//! `kiln predict` and `kiln serve` end to end: a model trained on real image files gives,
//! through predict and through the server, the probabilities eval computed from the shards
//! (so inference preprocesses exactly like training); bad inputs get 4xx and the server
//! stays up; SIGTERM shuts it down cleanly. Half-sent requests end at the read timeouts, and
//! every error answer, down to hyper's own, is the JSON `{"error", "reason"}`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{command, kiln, ok, read_json, workspace_with};

const MANIFEST: &str = "pipelines/tiny.toml";

/// Two classes of photos-like images (dark and bright, with texture), of assorted sizes,
/// as PNG and JPEG files in an ImageFolder tree.
pub(crate) fn make_images(root: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (class, base) in [("dark", 60u8), ("bright", 180u8)] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..36u32 {
            let (w, h) = (24 + (i * 7) % 40, 20 + (i * 11) % 37);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let n = (next() % 50) as u8;
                let stripe = if (x / 4 + y / 4 + i) % 2 == 0 { 15 } else { 0 };
                image::Rgb([base.saturating_add(n).saturating_add(stripe), base.saturating_add(n / 2), base.saturating_sub(n / 3)])
            });
            let ext = if i % 3 == 0 { "jpg" } else { "png" };
            img.save(dir.join(format!("img_{i:02}.{ext}"))).unwrap();
        }
    }
}

/// A small pipeline over the images in `data/` (two classes): a tiny CNN, two epochs, eval.
pub(crate) const TINY: &str = r#"
[pipeline]
name = "tiny"
seed = 5
root = ".."

[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "dir"
path = "data"
layout = "class"

[stages.label]
kind = "label"
inputs = ["collect"]
from = "folder"
classes = ["dark", "bright"]

[stages.preprocess]
kind = "preprocess"
inputs = ["label"]
color = "rgb"
size = [16, 16]
resize = "crop"
normalize = { mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }

[stages.convert]
kind = "convert"
inputs = ["preprocess"]
split = { train = 0.6, val = 0.1, test = 0.3 }

[stages.train]
kind = "train"
inputs = ["convert"]
model = "cnn"
cnn = { widths = [8], hidden = 16, dropout = 0.0 }
epochs = 2
batch_size = 16
device = "cpu"

[stages.eval]
kind = "eval"
inputs = ["train", "convert"]
"#;

fn workspace() -> tempfile::TempDir {
    let ws = workspace_with(MANIFEST, TINY);
    make_images(&ws.path().join("data"));
    ws
}

/// Eval's probabilities by source path.
fn eval_probabilities(ws: &Path) -> BTreeMap<String, Vec<f32>> {
    let text = std::fs::read_to_string(ws.join("outputs/tiny/eval/predictions.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let source = header.iter().position(|h| *h == "source").unwrap();
    let first_p = header.iter().position(|h| h.starts_with("p_") && *h != "p_max").unwrap();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[source].to_string(), f[first_p..].iter().map(|v| v.parse().unwrap()).collect())
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(ws: &Path, extra: &[&str]) -> Server {
        let mut child = command(ws)
            .args(["serve", &format!("{MANIFEST}:train"), "--addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        assert!(addr.starts_with("http://127.0.0.1:"), "{line}");
        Server { child, base: addr }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY-free: kill(1) by pid through the shell's kill, SIGTERM.
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the server did not stop on SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut resp = agent().post(url).header("Content-Type", content_type).send(body).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

fn get(url: &str) -> (u16, String) {
    let mut resp = agent().get(url).call().unwrap();
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "kiln-test-boundary-7d1e";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn predict_and_serve_match_eval_and_survive_bad_input() {
    let ws = workspace();
    let ws = ws.path();
    ok(ws, &["run", MANIFEST]);
    let from_eval = eval_probabilities(ws);
    assert!(from_eval.len() >= 15, "{} test items", from_eval.len());

    // kiln predict on the original files: the preprocessing redone from the model card
    // matches what the preprocess stage did to those files for training and eval.
    let predicted: serde_json::Value =
        serde_json::from_str(&ok(ws, &["predict", &format!("{MANIFEST}:train"), "data", "--format", "json"])).unwrap();
    let by_path: BTreeMap<String, Vec<f32>> = predicted["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let p = r["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            (r["path"].as_str().unwrap().to_string(), p)
        })
        .collect();
    assert_eq!(by_path.len(), 72);
    for (source, p) in &from_eval {
        let q = by_path.get(source).unwrap_or_else(|| panic!("predict did not see {source}"));
        assert!(max_diff(p, q) < 1e-5, "{source}: eval {p:?} predict {q:?}");
    }
    // The model directory works as well as MANIFEST:STAGE, and the table format shows top-k.
    // A header row names the columns, which line up with the row's (two spaces apart).
    let table = ok(ws, &["predict", "outputs/tiny/train", "data/dark/img_01.png", "--top-k", "2"]);
    let columns = |line: &str| -> Vec<(usize, String)> {
        let mut out: Vec<(usize, String)> = Vec::new();
        let mut gap = 2;
        for (i, c) in line.char_indices() {
            if c == ' ' {
                gap += 1;
                continue;
            }
            // One space inside a column's text (`2nd class`); two or more between columns.
            if gap < 2 && !out.is_empty() {
                let last = out.last_mut().unwrap();
                last.1.extend(std::iter::repeat_n(' ', gap));
                last.1.push(c);
            } else {
                out.push((i, c.to_string()));
            }
            gap = 0;
        }
        out
    };
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let (header, row) = (columns(lines[0]), columns(lines[1]));
    let names: Vec<&str> = header.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(names, ["image", "class", "probability", "2nd class", "probability"], "{table}");
    assert_eq!(row.len(), 5, "{table}");
    assert_eq!(row[0].1, "data/dark/img_01.png", "{table}");
    let starts = |c: &[(usize, String)]| c.iter().map(|(i, _)| *i).collect::<Vec<_>>();
    assert_eq!(starts(&header), starts(&row), "aligned columns:\n{table}");

    let server = Server::start(ws, &["--max-batch", "8", "--max-body", "50000", "--max-pixels", "1000000"]);
    let base = server.base.clone();
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    let (status, model) = get(&format!("{base}/v1/model"));
    assert_eq!(status, 200);
    let model: serde_json::Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["classes"], serde_json::json!(["dark", "bright"]));
    assert_eq!(model["preprocessing"]["width"], 16);

    // Each test image, raw: the server's probabilities are predict's.
    for source in from_eval.keys().take(12) {
        let bytes = std::fs::read(ws.join(source)).unwrap();
        let (status, body) = post(&format!("{base}/v1/predict?top_k=1"), "application/octet-stream", &bytes);
        assert_eq!(status, 200, "{body}");
        let p: Vec<f32> = body["results"][0]["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert!(max_diff(&p, &by_path[source]) < 1e-5, "{source}");
        assert_eq!(body["results"][0]["top_k"].as_array().unwrap().len(), 1);
    }
    // Several images in one multipart request.
    let images: Vec<(String, Vec<u8>)> = ["data/dark/img_00.jpg", "data/bright/img_05.png", "data/bright/img_09.jpg"]
        .iter()
        .map(|p| (p.to_string(), std::fs::read(ws.join(p)).unwrap()))
        .collect();
    let parts: Vec<(&str, &[u8])> = images.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let (ct, body) = multipart(&parts);
    let (status, answer) = post(&format!("{base}/v1/predict"), &ct, &body);
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (r, (name, _)) in results.iter().zip(&images) {
        assert_eq!(r["name"].as_str(), Some(name.as_str()));
        let p: Vec<f32> = r["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert!(max_diff(&p, &by_path[name]) < 1e-5, "{name}");
    }

    // Bad input: a JSON error and a 4xx, never a crash.
    let png = std::fs::read(ws.join("data/dark/img_01.png")).unwrap();
    let mut bomb = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::new(2000, 1000))
        .write_to(&mut std::io::Cursor::new(&mut bomb), image::ImageFormat::Png)
        .unwrap();
    assert!(bomb.len() < 50_000, "the bomb is small on the wire ({} bytes)", bomb.len());
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("empty body", Vec::new(), 400, "empty"),
        ("not an image", b"hello, world".to_vec(), 400, "not_an_image"),
        ("truncated PNG", png[..png.len() / 2].to_vec(), 400, "truncated"),
        ("decompression bomb", bomb, 413, "too_many_pixels"),
        ("oversized body", vec![0u8; 60_000], 413, "body_too_large"),
    ];
    for (what, bytes, want, reason) in &cases {
        let (status, body) = post(&format!("{base}/v1/predict"), "application/octet-stream", bytes);
        assert_eq!(status, *want, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
        assert_eq!(body["reason"].as_str(), Some(*reason), "{what}: {body}");
    }
    // One bad part fails the request and names the part.
    let (ct, body) = multipart(&[("good.png", &png), ("bad.png", b"nope")]);
    let (status, answer) = post(&format!("{base}/v1/predict"), &ct, &body);
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("bad.png"), "{answer}");

    // Still up, and the metrics saw all of it.
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    let (_, metrics) = get(&format!("{base}/metrics"));
    assert!(metrics.contains("kiln_requests_total{route=\"/v1/predict\",status=\"200\"} 13"), "{metrics}");
    assert!(metrics.contains("kiln_requests_total{route=\"/v1/predict\",status=\"400\"} 4"), "{metrics}");
    assert!(metrics.contains("kiln_requests_total{route=\"/v1/predict\",status=\"413\"} 2"), "{metrics}");
    assert!(metrics.contains("kiln_errors_total{reason=\"not_an_image\"} 2"), "{metrics}");
    assert!(metrics.contains("kiln_images_total 15"), "{metrics}");
    assert!(metrics.contains("kiln_request_duration_seconds_count{route=\"/v1/predict\"} 19"), "{metrics}");

    let status = server.terminate();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status:?}");

    // A second server, unbatched, with a queue of 2.
    let server = Server::start(ws, &["--max-batch", "1", "--queue", "2"]);
    // Real photographs from ../shared/datasets (larger than the first server's body limit),
    // when present: the server and predict agree.
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/photos");
    if photos.is_dir() {
        let predicted: serde_json::Value =
            serde_json::from_str(&ok(ws, &["predict", "outputs/tiny/train", photos.to_str().unwrap(), "--format", "json"])).unwrap();
        let results = predicted["results"].as_array().unwrap();
        assert!(results.len() >= 3, "{predicted}");
        for r in results {
            let bytes = std::fs::read(r["path"].as_str().unwrap()).unwrap();
            let (status, body) = post(&format!("{}/v1/predict", server.base), "application/octet-stream", &bytes);
            assert_eq!(status, 200, "{}: {body}", r["path"]);
            assert_eq!(body["results"][0]["probabilities"], r["probabilities"], "{}", r["path"]);
        }
    } else {
        eprintln!("skipping the photo comparison: {} is absent", photos.display());
    }

    // A full queue is refused with 503 and nothing else breaks: one request of 40 images
    // fills a queue of 2 far faster than one-image batches drain it.
    let many: Vec<(String, Vec<u8>)> = (0..40).map(|i| (format!("copy{i}.png"), png.clone())).collect();
    let parts: Vec<(&str, &[u8])> = many.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let (ct, body) = multipart(&parts);
    let (status, answer) = post(&format!("{}/v1/predict", server.base), &ct, &body);
    assert_eq!((status, answer["reason"].as_str()), (503, Some("queue_full")), "{answer}");
    // The images that did get in are still being answered: until they are, a request may
    // meet the same full queue. It must be let in once they drain.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, answer) = post(&format!("{}/v1/predict", server.base), "image/png", &png);
        if status == 200 {
            break;
        }
        assert_eq!((status, answer["reason"].as_str()), (503, Some("queue_full")), "{answer}");
        assert!(std::time::Instant::now() < deadline, "the server did not recover once the queue drained");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(server.terminate().success());
}

#[test]
fn bad_model_specs_are_clear_errors() {
    let ws = tempfile::tempdir().unwrap();
    let out = kiln(ws.path(), &["predict", "nowhere", "x.png"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MANIFEST.toml:STAGE"));
    let mut stderr = String::new();
    let mut child = command(ws.path()).args(["serve", "nowhere"]).stderr(Stdio::piped()).spawn().unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(2), "{stderr}");
}

#[test]
fn watch_swaps_in_a_new_result_of_the_stage() {
    let ws = workspace();
    let ws = ws.path();
    ok(ws, &["run", MANIFEST]);
    let server = Server::start(ws, &["--watch"]);
    let digest = |base: &str| -> String {
        let (_, body) = get(&format!("{base}/v1/model"));
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["weights_digest"].as_str().unwrap().to_string()
    };
    let before = digest(&server.base);
    let path = ws.join(MANIFEST);
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("batch_size = 16", "batch_size = 8")).unwrap();
    ok(ws, &["run", MANIFEST]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let after = loop {
        let now = digest(&server.base);
        if now != before {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "the server kept the old model");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let card = read_json(ws.join("outputs/tiny/train/model.json"));
    assert_eq!(after, card["weights_digest"].as_str().unwrap(), "the new model is the stage's new result");
    let image = std::fs::read(ws.join("data/dark/img_01.png")).unwrap();
    let (status, body) = post(&format!("{}/v1/predict", server.base), "image/png", &image);
    assert_eq!((status, body["model"].as_str()), (200, Some(card["weights_digest"].as_str().unwrap())));
    assert!(server.terminate().success());
}

/// One answer read off a raw connection (or what came before the server closed it or the
/// wait ran out).
#[derive(Debug)]
struct RawAnswer {
    status: Option<u16>,
    head: String,
    body: Vec<u8>,
    /// Nothing at all came back.
    empty: bool,
    /// The server closed the connection.
    closed: bool,
}

impl RawAnswer {
    /// The status (0 if none) and the body as JSON (as a JSON string if it is not JSON).
    fn parts(&self) -> (u16, serde_json::Value) {
        let body = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| serde_json::Value::String(format!("not JSON: {:?} {:?}", self.head, String::from_utf8_lossy(&self.body))));
        (self.status.unwrap_or(0), body)
    }
}

/// A raw TCP connection to the server: for requests no HTTP client would send.
fn raw_connect(base: &str) -> TcpStream {
    let s = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one HTTP/1.1 answer (up to its Content-Length), stopping early when the server
/// closes the connection or `wait` has passed.
fn read_answer(s: &mut TcpStream, wait: Duration) -> RawAnswer {
    let deadline = Instant::now() + wait;
    let mut got: Vec<u8> = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = head_end(&got) {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Reset, aborted, broken: however the kernel words it, the server has closed
            // the connection (what it sent before is in `got`).
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let (head, body) = match head_end(&got) {
        Some(end) => (String::from_utf8_lossy(&got[..end]).into_owned(), got[end + 4..].to_vec()),
        None => (String::from_utf8_lossy(&got).into_owned(), Vec::new()),
    };
    let status = head.strip_prefix("HTTP/1.").and_then(|rest| rest.get(2..5)).and_then(|code| code.parse().ok());
    RawAnswer { status, head, body, empty: got.is_empty(), closed }
}

/// Where a response head ends (its blank line), if it has.
fn head_end(got: &[u8]) -> Option<usize> {
    got.windows(4).position(|w| w == b"\r\n\r\n")
}

fn assert_error(what: &str, (status, body): (u16, serde_json::Value), want: u16, reason: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert_eq!(body["reason"].as_str(), Some(reason), "{what}: {body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
}

#[test]
fn serve_read_timeouts_end_half_sent_requests() {
    let ws = workspace();
    let ws = ws.path();
    ok(ws, &["run", MANIFEST]);
    let server = Server::start(ws, &["--read-timeout-secs", "1", "--body-timeout-secs", "1"]);
    // Far above the 1 s timeouts, and bounded: no check can hang.
    let wait = Duration::from_secs(8);

    // A head that never ends: 408 with the JSON error, then the connection is closed.
    {
        let mut s = raw_connect(&server.base);
        s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: kiln\r\nContent-Type: image/png\r\n").unwrap();
        let answer = read_answer(&mut s, wait);
        assert_error("half a head", answer.parts(), 408, "header_timeout");
        let after = read_answer(&mut s, wait);
        assert!(after.closed && after.empty, "the connection stays open after the 408: {after:?}");
    }
    // A body shorter than its Content-Length: 408 with the JSON error, connection closed.
    {
        let mut s = raw_connect(&server.base);
        s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n")
            .unwrap();
        s.write_all(&[7u8; 10]).unwrap();
        let answer = read_answer(&mut s, wait);
        assert_error("half a body", answer.parts(), 408, "body_timeout");
        assert!(answer.head.to_ascii_lowercase().contains("connection: close"), "{answer:?}");
        let after = read_answer(&mut s, wait);
        assert!(after.closed && after.empty, "the connection stays open after the 408: {after:?}");
    }
    // A connection that never sends a byte is closed, without an answer.
    {
        let mut s = raw_connect(&server.base);
        let answer = read_answer(&mut s, wait);
        assert!(answer.closed && answer.empty, "an idle connection is held: {answer:?}");
    }
    // A complete request on a kept-alive connection is answered; the idle connection after it
    // is closed without a stray 408.
    {
        let mut s = raw_connect(&server.base);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n").unwrap();
        let answer = read_answer(&mut s, wait);
        assert_eq!(answer.status, Some(200), "{answer:?}");
        let after = read_answer(&mut s, wait);
        assert!(after.closed && after.empty, "after a kept-alive answer: {after:?}");
    }

    // The server is still up, and counted both timeouts.
    assert_eq!(get(&format!("{}/healthz", server.base)).0, 200);
    let (_, metrics) = get(&format!("{}/metrics", server.base));
    assert!(metrics.contains("kiln_errors_total{reason=\"header_timeout\"} 1"), "{metrics}");
    assert!(metrics.contains("kiln_errors_total{reason=\"body_timeout\"} 1"), "{metrics}");
    assert!(server.terminate().success());
}

#[test]
fn serve_refuses_bad_requests_up_front_with_json_errors() {
    let ws = workspace();
    let ws = ws.path();
    ok(ws, &["run", MANIFEST]);
    let server = Server::start(ws, &["--max-body", "50000"]);
    let base = server.base.clone();
    let png = std::fs::read(ws.join("data/dark/img_01.png")).unwrap();
    let wait = Duration::from_secs(8);
    let parsed = |(status, text): (u16, String)| -> (u16, serde_json::Value) {
        (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(format!("not JSON: {text:?}"))))
    };

    // A declared Content-Length over --max-body: 413 from the head alone, no body sent.
    {
        let mut s = raw_connect(&base);
        s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: kiln\r\nContent-Type: image/png\r\nContent-Length: 100000000\r\n\r\n").unwrap();
        let answer = read_answer(&mut s, wait);
        assert_error("Content-Length over --max-body", answer.parts(), 413, "body_too_large");
        assert!(answer.parts().1["error"].as_str().unwrap().contains("100000000"), "{answer:?}");
    }

    // top_k: a whole number from 1 to the class count (2), else 400 with the JSON error.
    for q in ["top_k=-1", "top_k=abc", "top_k=1.5", "top_k=", "top_k=0", "top_k=3", "top_k=1&top_k=2"] {
        let (status, body) = post(&format!("{base}/v1/predict?{q}"), "image/png", &png);
        assert_error(q, (status, body.clone()), 400, "bad_top_k");
        assert!(body["error"].as_str().unwrap().contains("from 1 to 2"), "{q}: {body}");
    }
    let (_, body) = post(&format!("{base}/v1/predict?top_k=3"), "image/png", &png);
    assert!(body["error"].as_str().unwrap().contains("2 classes"), "{body}");
    for k in [1, 2] {
        let (status, body) = post(&format!("{base}/v1/predict?top_k={k}"), "image/png", &png);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["top_k"].as_array().map(Vec::len), Some(k), "{body}");
    }

    // Content-Type: image bytes as application/octet-stream, image/* or none; multipart (see
    // predict_and_serve_match_eval_and_survive_bad_input); anything else is 415.
    for ct in ["application/json", "text/plain", "multipart/mixed; boundary=x", "image/", "application/x-www-form-urlencoded"] {
        assert_error(ct, post(&format!("{base}/v1/predict"), ct, &png), 415, "unsupported_media_type");
    }
    for ct in ["image/jpeg; charset=binary", "Application/Octet-Stream", "IMAGE/PNG"] {
        let (status, body) = post(&format!("{base}/v1/predict"), ct, &png);
        assert_eq!(status, 200, "{ct}: {body}");
    }
    {
        let mut s = raw_connect(&base);
        s.write_all(format!("POST /v1/predict HTTP/1.1\r\nHost: kiln\r\nContent-Length: {}\r\n\r\n", png.len()).as_bytes()).unwrap();
        s.write_all(&png).unwrap();
        let answer = read_answer(&mut s, wait);
        let (status, body) = answer.parts();
        assert_eq!(status, 200, "no Content-Type: {body}");
        assert_eq!(body["results"][0]["probabilities"].as_array().map(Vec::len), Some(2), "{body}");
    }

    // Every other error is the same JSON shape: axum's 404 and 405 ...
    assert_error("unknown route", parsed(get(&format!("{base}/nope"))), 404, "not_found");
    assert_error("GET on POST /v1/predict", parsed(get(&format!("{base}/v1/predict"))), 405, "method_not_allowed");
    assert_error("POST on GET /healthz", post(&format!("{base}/healthz"), "image/png", &png), 405, "method_not_allowed");
    // ... and the answers hyper gives before the router sees a request.
    {
        let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: kiln\r\n");
        for i in 0..150 {
            request.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
        request.push_str("\r\n");
        let mut s = raw_connect(&base);
        s.write_all(request.as_bytes()).unwrap();
        assert_error("150 header fields", read_answer(&mut s, wait).parts(), 431, "headers_too_large");
    }
    {
        let mut s = raw_connect(&base);
        s.write_all(b"GARBAGE\r\n\r\n").unwrap();
        assert_error("not HTTP", read_answer(&mut s, wait).parts(), 400, "bad_request");
    }

    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    let (_, metrics) = get(&format!("{base}/metrics"));
    assert!(metrics.contains("kiln_errors_total{reason=\"unsupported_media_type\"} 5"), "{metrics}");
    assert!(metrics.contains("kiln_errors_total{reason=\"headers_too_large\"} 1"), "{metrics}");
    assert!(server.terminate().success());
}
