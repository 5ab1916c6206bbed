//! The `http` collect source against a real HTTP server on 127.0.0.1 (loopback only; the
//! server answers a bounded number of requests and stops with the test).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{command, png, read_json};

#[derive(Default)]
struct Log {
    /// (path, status) of every response.
    served: Vec<(String, u16)>,
}

fn png_bytes(shade: u8) -> Vec<u8> {
    png(&image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(24, 24, |x, y| image::Rgb([shade, (x * 10) as u8, (y * 10) as u8]))))
}

fn respond(mut stream: TcpStream, log: &Mutex<Log>, flaky_failures: &Mutex<u32>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let lm = "Wed, 21 Oct 2015 07:28:00 GMT";
    let (status, content_type, extra, body): (u16, &str, String, Vec<u8>) = match path.as_str() {
        "/a.png" if headers.get("if-none-match").map(String::as_str) == Some("\"v1\"") => (304, "image/png", String::new(), Vec::new()),
        "/a.png" => (200, "image/png", "ETag: \"v1\"\r\n".into(), png_bytes(10)),
        "/b.png" if headers.get("if-modified-since").map(String::as_str) == Some(lm) => (304, "image/png", String::new(), Vec::new()),
        "/b.png" => (200, "image/png", format!("Last-Modified: {lm}\r\n"), png_bytes(200)),
        "/flaky.png" => {
            let mut left = flaky_failures.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                (503, "text/plain", String::new(), b"try later".to_vec())
            } else {
                (200, "image/png", String::new(), png_bytes(99))
            }
        }
        "/slow.png" => {
            std::thread::sleep(Duration::from_millis(3000));
            (200, "image/png", String::new(), png_bytes(1))
        }
        "/big.png" => (200, "image/png", String::new(), vec![0u8; 300_000]),
        "/page.html" => (200, "text/html", String::new(), b"<html>not an image</html>".to_vec()),
        _ => (404, "text/plain", String::new(), b"no such thing".to_vec()),
    };
    log.lock().unwrap().served.push((path, status));
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

/// Serves on an ephemeral loopback port until the test process ends.
fn serve() -> (u16, Arc<Mutex<Log>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Log::default()));
    let flaky = Arc::new(Mutex::new(2u32));
    let shared = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200).flatten() {
            let (log, flaky) = (shared.clone(), flaky.clone());
            std::thread::spawn(move || respond(stream, &log, &flaky));
        }
    });
    (port, log)
}

fn served(log: &Mutex<Log>, path: &str, status: u16) -> usize {
    log.lock().unwrap().served.iter().filter(|(p, s)| p == path && *s == status).count()
}

#[test]
fn urls_are_fetched_with_retries_limits_and_conditional_reruns() {
    let (port, log) = serve();
    let ws = tempfile::tempdir().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let listing: String = ["a.png,ok", "b.png,ok", "flaky.png,ok", "slow.png,ok", "big.png,ok", "page.html,ok", "missing.png,ok"]
        .iter()
        .map(|row| format!("{base}/{row}\n"))
        .collect();
    std::fs::write(ws.path().join("urls.csv"), format!("url,label\n{listing}")).unwrap();
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"http\"\nlisting = \"urls.csv\"\nlabel_field = \"label\"\ntimeout_secs = 1.0\nretries = 2\nmax_bytes = 100000\nconcurrency = 4\n",
    )
    .unwrap();
    let stats = ws.path().join("stats.json");
    let run = |args: &[&str]| {
        let out = command(ws.path()).arg("--work-stats").arg(&stats).args(args).output().unwrap();
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        read_json(&stats)
    };
    let first = run(&["run"]);
    assert_eq!(first["http_downloads"], 3, "{first}");
    let report = read_json(ws.path().join("outputs/kiln/collect/collect_report.json"));
    let problems: BTreeMap<String, String> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().rsplit('/').next().unwrap().to_string(), p["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems["slow.png"].contains("timed out") && problems["slow.png"].contains("3 attempts"), "{problems:#?}");
    assert!(problems["big.png"].contains("exceeds the 100000-byte limit"), "{problems:#?}");
    assert!(problems["page.html"].contains("content type `text/html`"), "{problems:#?}");
    assert_eq!(problems["missing.png"], "HTTP 404", "a 404 is not retried");
    assert_eq!(served(&log, "/missing.png", 404), 1);
    assert_eq!(served(&log, "/flaky.png", 503), 2, "503 is retried with backoff");
    assert_eq!(served(&log, "/flaky.png", 200), 1);
    let items = std::fs::read_to_string(ws.path().join("outputs/kiln/collect/items.jsonl")).unwrap();
    assert_eq!(items.lines().count(), 3);

    // A forced rerun revalidates: unchanged URLs answer 304 and nothing is downloaded again,
    // except the one URL that gave no validator.
    let second = run(&["run", "--force"]);
    assert_eq!(served(&log, "/a.png", 304), 1, "ETag revalidation");
    assert_eq!(served(&log, "/b.png", 304), 1, "Last-Modified revalidation");
    assert_eq!(second["http_not_modified"], 2, "{second}");
    assert_eq!(second["http_downloads"], 1, "{second}");
    assert_eq!(std::fs::read_to_string(ws.path().join("outputs/kiln/collect/items.jsonl")).unwrap(), items, "same content, same dataset");
}
