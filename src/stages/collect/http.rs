//! The `http` source: images listed by URL, fetched concurrently.
//!
//! Each request has a global timeout and is retried with exponential backoff on transport
//! errors, 429 and 5xx (never on other 4xx). A declared or actual body larger than
//! `max_bytes`, or a content type outside `content_types`, is refused. What each URL
//! returned is remembered with its `ETag`/`Last-Modified`, so a rerun (`kiln run --force`)
//! asks with `If-None-Match`/`If-Modified-Since` and downloads nothing that did not change.

use std::time::Duration;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::listing::read_rows;
use super::{HttpSource, Problem};
use crate::cache::BlobResult;
use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};
use crate::stats::WorkStats;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpOptions {
    pub concurrency: usize,
    pub timeout_secs: f64,
    pub retries: u32,
    pub max_bytes: u64,
    pub content_types: Vec<String>,
}

/// Fetches the URLs of the source's listing; a URL that cannot be fetched is reported,
/// not fatal.
pub(super) fn collect(
    cx: &StageContext<'_>,
    source: &HttpSource,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let HttpSource { listing, url_field, label_field, concurrency, timeout_secs, retries, max_bytes, content_types, .. } = source;
    let rows = read_rows(&dep_path(cx.root, listing), listing)?;
    let mut urls = Vec::new();
    let mut labels = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        let url = row
            .get(url_field)
            .ok_or_else(|| StageError::Failed(format!("listing `{listing}`: row {} has no `{url_field}` column", n + 1)))?;
        urls.push(url.clone());
        labels.push(label_field.as_ref().and_then(|f| row.get(f)).filter(|l| !l.is_empty()).cloned());
    }
    let opts = HttpOptions {
        concurrency: *concurrency,
        timeout_secs: *timeout_secs,
        retries: *retries,
        max_bytes: *max_bytes,
        content_types: content_types.clone(),
    };
    for ((url, item_label), fetched) in urls.iter().zip(labels).zip(fetch_all(cx, &urls, &opts)?) {
        match fetched {
            Ok((digest, bytes)) => {
                let shown = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
                let mut item = Item::new(format!("{label}/{shown}"), url.clone(), digest, bytes);
                item.label = item_label;
                items.push(item);
            }
            Err(reason) => problems.push(Problem { source: label.to_string(), path: url.clone(), reason }),
        }
    }
    Ok(())
}

/// What a URL returned last time, kept in the memo store under the URL's digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Remembered {
    etag: Option<String>,
    last_modified: Option<String>,
    digest: Digest,
    bytes: u64,
}

/// Bump when what is remembered per URL changes shape.
const URL_CACHE_OP: &[u8] = b"http-url-cache-v1";

/// Fetches every URL: per URL the stored blob, or why it could not be fetched.
pub fn fetch_all(cx: &StageContext<'_>, urls: &[String], opts: &HttpOptions) -> Result<Vec<BlobResult>, StageError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs_f64(opts.timeout_secs)))
        .http_status_as_error(false)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(opts.concurrency.max(1)).build().map_err(|e| StageError::Failed(e.to_string()))?;
    let progress = cx.reporter.progress(&format!("{}: downloading", cx.stage), urls.len() as u64, "urls");
    let results = pool.install(|| {
        urls.par_iter()
            .map(|url| {
                let r = fetch_one(cx, &agent, url, opts);
                progress.inc(1);
                r
            })
            .collect()
    });
    progress.finish();
    Ok(results)
}

/// The end of one request: a final answer, or a failure worth another try.
enum Attempt<T> {
    Done(Result<T, String>),
    Retry(String),
}

/// A fetched blob, and what to remember of the response when its body was new.
type Fetched = (Digest, u64, Option<Remembered>);

fn fetch_one(cx: &StageContext<'_>, agent: &ureq::Agent, url: &str, opts: &HttpOptions) -> Result<(Digest, u64), String> {
    let memo = cx.cache.state().memo();
    let key = Digest::of_bytes(url.as_bytes());
    let op = Digest::of_bytes(URL_CACHE_OP);
    let remembered: Option<Remembered> = memo
        .get(&key, &op)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|r: &Remembered| cx.cache.has_blob(&r.digest));
    let mut last = String::new();
    for attempt in 0..=opts.retries {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis((200u64 << (attempt - 1).min(5)).min(5000)));
        }
        match attempt_once(cx, agent, url, opts, remembered.as_ref()) {
            Attempt::Done(Ok((digest, bytes, fresh))) => {
                if let Some(fresh) = fresh
                    && let Ok(v) = serde_json::to_vec(&fresh)
                {
                    let _ = memo.put(&key, &op, &v);
                }
                return Ok((digest, bytes));
            }
            Attempt::Done(Err(e)) => return Err(e),
            Attempt::Retry(why) => last = why,
        }
    }
    Err(format!("{last} (after {} attempts)", opts.retries + 1))
}

/// One request. `Ok` carries what to remember when the body was new.
fn attempt_once(
    cx: &StageContext<'_>,
    agent: &ureq::Agent,
    url: &str,
    opts: &HttpOptions,
    remembered: Option<&Remembered>,
) -> Attempt<Fetched> {
    let mut request = agent.get(url);
    if let Some(r) = remembered {
        if let Some(etag) = &r.etag {
            request = request.header("If-None-Match", etag);
        }
        if let Some(lm) = &r.last_modified {
            request = request.header("If-Modified-Since", lm);
        }
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Timeout(t)) => return Attempt::Retry(format!("timed out ({t})")),
        Err(e @ (ureq::Error::Io(_) | ureq::Error::HostNotFound | ureq::Error::ConnectionFailed)) => return Attempt::Retry(e.to_string()),
        Err(e) => return Attempt::Done(Err(e.to_string())),
    };
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(String::from);
    match status {
        304 => {
            if let Some(r) = remembered {
                WorkStats::add(&cx.cache.state().stats().http_not_modified, 1);
                return Attempt::Done(Ok((r.digest, r.bytes, None)));
            }
            return Attempt::Done(Err("HTTP 304 for a request that was not conditional".into()));
        }
        429 | 500..=599 => return Attempt::Retry(format!("HTTP {status}")),
        200..=299 => {}
        _ => return Attempt::Done(Err(format!("HTTP {status}"))),
    }
    let content_type = header("content-type").unwrap_or_default();
    if !opts.content_types.iter().any(|allowed| content_type.starts_with(allowed.as_str())) {
        return Attempt::Done(Err(format!("content type `{content_type}` is not one of {:?}", opts.content_types)));
    }
    if let Some(len) = header("content-length").and_then(|l| l.parse::<u64>().ok())
        && len > opts.max_bytes
    {
        return Attempt::Done(Err(format!("{len} bytes exceeds the {}-byte limit", opts.max_bytes)));
    }
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    let body = match response.body_mut().with_config().limit(opts.max_bytes).read_to_vec() {
        Ok(b) => b,
        Err(ureq::Error::BodyExceedsLimit(_)) => return Attempt::Done(Err(format!("body exceeds the {}-byte limit", opts.max_bytes))),
        Err(ureq::Error::Timeout(t)) => return Attempt::Retry(format!("timed out reading the body ({t})")),
        Err(e) => return Attempt::Retry(format!("reading the body: {e}")),
    };
    WorkStats::add(&cx.cache.state().stats().http_downloads, 1);
    match cx.cache.put_blob_bytes(&body) {
        Ok(digest) => {
            let bytes = body.len() as u64;
            Attempt::Done(Ok((digest, bytes, Some(Remembered { etag, last_modified, digest, bytes }))))
        }
        Err(e) => Attempt::Done(Err(e.to_string())),
    }
}
