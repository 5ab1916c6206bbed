//! Counters behind `GET /metrics`, in the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
pub struct ServerStats {
    /// `(route, status) → requests`.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Per route: request latency.
    latency: Mutex<BTreeMap<String, Histogram>>,
    batches: Mutex<Histogram>,
    pub images: AtomicU64,
    /// `reason → count` for refused or failed requests.
    errors: Mutex<BTreeMap<String, u64>>,
    pub queue_depth: AtomicI64,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batches: Mutex::new(Histogram::new(&BATCH_BUCKETS)),
            images: AtomicU64::new(0),
            errors: Mutex::default(),
            queue_depth: AtomicI64::new(0),
        }
    }
}

impl ServerStats {
    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        *self.requests.lock().expect("stats lock").entry((route.to_string(), status)).or_default() += 1;
        self.latency
            .lock()
            .expect("stats lock")
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_batch(&self, size: usize) {
        self.batches.lock().expect("stats lock").observe(size as f64);
    }

    pub fn error(&self, reason: &str) {
        *self.errors.lock().expect("stats lock").entry(reason.to_string()).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP kiln_requests_total HTTP requests by route and status.\n# TYPE kiln_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("stats lock").iter() {
            let _ = writeln!(out, "kiln_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP kiln_request_duration_seconds Request latency by route.\n# TYPE kiln_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().expect("stats lock").iter() {
            h.render(&mut out, "kiln_request_duration_seconds", &format!("route=\"{route}\""));
        }
        out.push_str("# HELP kiln_batch_size Images per forward pass.\n# TYPE kiln_batch_size histogram\n");
        self.batches.lock().expect("stats lock").render(&mut out, "kiln_batch_size", "");
        out.push_str("# HELP kiln_images_total Images classified.\n# TYPE kiln_images_total counter\n");
        let _ = writeln!(out, "kiln_images_total {}", self.images.load(Ordering::Relaxed));
        out.push_str("# HELP kiln_errors_total Refused or failed requests by reason.\n# TYPE kiln_errors_total counter\n");
        for (reason, n) in self.errors.lock().expect("stats lock").iter() {
            let _ = writeln!(out, "kiln_errors_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str("# HELP kiln_queue_depth Images waiting for the model.\n# TYPE kiln_queue_depth gauge\n");
        let _ = writeln!(out, "kiln_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_text_is_prometheus() {
        let s = ServerStats::default();
        s.observe_request("/v1/predict", 200, Duration::from_millis(3));
        s.observe_request("/v1/predict", 400, Duration::from_millis(30));
        s.observe_batch(3);
        s.error("not_an_image");
        let text = s.render();
        assert!(text.contains("kiln_requests_total{route=\"/v1/predict\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("kiln_request_duration_seconds_bucket{route=\"/v1/predict\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("kiln_request_duration_seconds_bucket{route=\"/v1/predict\",le=\"0.05\"} 2"), "{text}");
        assert!(text.contains("kiln_request_duration_seconds_count{route=\"/v1/predict\"} 2"), "{text}");
        assert!(text.contains("kiln_batch_size_bucket{le=\"2\"} 0") && text.contains("kiln_batch_size_bucket{le=\"4\"} 1"), "{text}");
        assert!(text.contains("kiln_errors_total{reason=\"not_an_image\"} 1"), "{text}");
    }
}
