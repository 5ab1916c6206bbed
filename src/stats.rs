//! Counters of real work done, so tests can assert "only one file was rehashed" or "every
//! per-item transform was a memo hit" without timing anything. `--work-stats FILE` writes
//! them as JSON at exit.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct WorkStats {
    /// Input files read to learn their digest (dependencies, collected sources).
    pub files_hashed: AtomicU64,
    /// Files a stage wrote, hashed as its result is committed.
    pub outputs_hashed: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub files_from_index: AtomicU64,
    pub memo_hits: AtomicU64,
    pub memo_misses: AtomicU64,
    pub http_downloads: AtomicU64,
    pub http_not_modified: AtomicU64,
    pub stages_run: AtomicU64,
    pub stages_cached: AtomicU64,
}

impl WorkStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "files_hashed": get(&self.files_hashed),
            "outputs_hashed": get(&self.outputs_hashed),
            "bytes_hashed": get(&self.bytes_hashed),
            "files_from_index": get(&self.files_from_index),
            "memo_hits": get(&self.memo_hits),
            "memo_misses": get(&self.memo_misses),
            "http_downloads": get(&self.http_downloads),
            "http_not_modified": get(&self.http_not_modified),
            "stages_run": get(&self.stages_run),
            "stages_cached": get(&self.stages_cached),
        })
    }
}
