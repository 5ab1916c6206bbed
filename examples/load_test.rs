//! A closed-loop HTTP load generator for `kiln serve` (loopback only).
//!
//! ```sh
//! cargo run --release --example load_test -- http://127.0.0.1:8080 IMAGE [CONNECTIONS] [SECONDS]
//! ```
//!
//! Each connection (a thread with its own keep-alive agent) posts IMAGE to `/v1/predict`
//! as soon as the previous answer arrives, for SECONDS. Prints requests/s, latency
//! percentiles and every non-200 answer by status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: load_test URL IMAGE [CONNECTIONS=64] [SECONDS=10]");
        std::process::exit(2);
    }
    let url = format!("{}/v1/predict?top_k=1", args[1].trim_end_matches('/'));
    assert!(url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost"), "loopback only");
    let image = std::fs::read(&args[2]).expect("read the image");
    let connections: usize = args.get(3).map_or(64, |s| s.parse().expect("connections"));
    let seconds: f64 = args.get(4).map_or(10.0, |s| s.parse().expect("seconds"));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (url, image) = (url.clone(), image.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut latencies = Vec::new();
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let status = match agent.post(&url).header("Content-Type", "application/octet-stream").send(&image[..]) {
                        Ok(mut r) => {
                            let _ = r.body_mut().read_to_vec();
                            r.status().as_u16()
                        }
                        Err(_) => 0,
                    };
                    latencies.push(t.elapsed());
                    *statuses.entry(status).or_default() += 1;
                }
                (latencies, statuses)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for w in workers {
        let (l, s) = w.join().expect("worker");
        latencies.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0;
    let ok = statuses.get(&200).copied().unwrap_or(0);
    println!(
        "{} requests in {elapsed:.1} s: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, {} connections, statuses {:?}",
        latencies.len(),
        ok as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        connections,
        statuses
    );
    if statuses.keys().any(|s| *s != 200) {
        std::process::exit(1);
    }
}
