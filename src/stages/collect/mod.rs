//! `kind = "collect"`: gather images from several sources into one dataset.
//!
//! ```toml
//! [stages.collect]
//! kind = "collect"
//! [[stages.collect.sources]]
//! type = "dir"                 # an ImageFolder tree: class = sub-folder
//! path = "data/raw"
//! layout = "class"             # "class", "split/class" or "flat"
//! extensions = ["jpg", "png"]  # default: every image extension kiln decodes
//! exclude = ["**/thumbs/**"]
//! follow_links = false         # true: also follow symlinks that lead outside `path`
//! max_bytes = 268435456        # larger files are reported, not read (default 256 MiB)
//! [[stages.collect.sources]]
//! type = "synthetic"           # shapes kiln draws itself: no download
//! count = 400
//! ```
//!
//! Other sources: `listing` (CSV/JSONL of paths relative to the listing, optional label
//! column), `idx` (MNIST-family `.gz` files read directly), `pixels` (a CSV of pixel
//! values per row, as scikit-learn's digits) and `http` (a CSV/JSONL of URLs, see
//! the `http` module).
//!
//! Every image is stored once in the cache by content digest; an unchanged file is
//! neither reread (file-state index) nor re-probed (memo). Entries that cannot be
//! collected are listed in `collect_report.json` with the reason, never fatal: broken
//! symlinks, permission errors, a symlink loop (one entry), a FIFO, socket or device, a
//! file over `max_bytes` (default 256 MiB), and in a `dir` source a symlink that leads
//! outside the folder, unless the source sets `follow_links = true`. Only regular files
//! are read, and never past a limit (see the `files` module); a listing or pixel table
//! that is not a regular file, or is over 1 GiB, fails the stage. Numeric options are
//! range-checked when the manifest loads (the `numbers` module).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{DynamicImage, GrayImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, parse_config};
use crate::cache::tree::unescape_os;
use crate::diagnostic::Issue;
use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::imaging::{self, synth};
use crate::paths::{dep_path, normalize_dep};
use crate::stages::io as dataset;

mod files;
mod http;
mod numbers;

pub struct CollectKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    sources: Vec<Source>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Source {
    Dir {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default)]
        layout: Layout,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        extensions: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        include: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude: Vec<String>,
        /// Follow symlinks that lead outside the folder (by default they are reported as
        /// uncollectable; links that stay inside are always followed).
        #[serde(default)]
        follow_links: bool,
        /// Files larger than this are reported, not read.
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
    },
    Listing {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default = "default_path_field")]
        path_field: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label_field: Option<String>,
        /// Files larger than this are reported, not read.
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
    },
    Idx {
        images: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        split: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        classes: Vec<String>,
    },
    Pixels {
        path: String,
        width: u32,
        height: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Column holding the label; negative counts from the end (default: the last).
        #[serde(default = "default_label_column")]
        label_column: i64,
        #[serde(default = "default_max_value")]
        max_value: f64,
    },
    Http {
        /// A CSV or JSONL file with a URL per row.
        listing: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default = "default_url_field")]
        url_field: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label_field: Option<String>,
        #[serde(default = "default_concurrency")]
        concurrency: usize,
        #[serde(default = "default_timeout")]
        timeout_secs: f64,
        #[serde(default = "default_retries")]
        retries: u32,
        #[serde(default = "default_http_max_bytes")]
        max_bytes: u64,
        #[serde(default = "default_content_types")]
        content_types: Vec<String>,
    },
    Synthetic {
        count: u64,
        #[serde(default = "default_size")]
        size: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        shapes: Vec<String>,
        #[serde(default = "default_noise")]
        noise: f64,
    },
}

fn default_path_field() -> String {
    "path".into()
}
fn default_url_field() -> String {
    "url".into()
}
fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> f64 {
    30.0
}
fn default_retries() -> u32 {
    3
}
fn default_http_max_bytes() -> u64 {
    50 << 20
}
/// The largest image file a `dir` or `listing` source reads (`max_bytes`).
fn default_max_bytes() -> u64 {
    256 << 20
}
/// The largest listing (CSV/JSONL of paths or URLs) or pixel table read, decompressed.
const TABLE_MAX_BYTES: u64 = 1 << 30;
/// The largest IDX file read, compressed or not (EMNIST's largest is about 550 MB).
const IDX_MAX_BYTES: u64 = 4 << 30;
fn default_content_types() -> Vec<String> {
    vec!["image/".into()]
}
fn default_label_column() -> i64 {
    -1
}
fn default_max_value() -> f64 {
    255.0
}
fn default_size() -> u32 {
    64
}
fn default_noise() -> f64 {
    12.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Layout {
    /// `class/image`: the first folder is the label.
    #[default]
    #[serde(rename = "class")]
    Class,
    /// `split/class/image`: the first folder is the split, the second the label.
    #[serde(rename = "split/class")]
    SplitClass,
    /// No labels from folders.
    #[serde(rename = "flat")]
    Flat,
}

/// Image extensions collected from a directory when the manifest names none.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];

#[derive(Debug)]
pub struct CollectStage {
    config: Config,
    deps: Vec<Spanned<String>>,
}

impl StageKind for CollectKind {
    fn name(&self) -> &'static str {
        "collect"
    }

    fn version(&self) -> u32 {
        // 2: only regular files within `max_bytes` are read; symlink loops, FIFOs, sockets,
        // devices and links out of a `dir` source are reported instead of collected.
        2
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let span = table.span();
        // Checked on the manifest's values, so that a negative number is named as well.
        let mut issues = numbers::check(&table);
        let config: Config = match parse_config(table) {
            Ok(config) => config,
            Err(more) => {
                // A value out of range may also fail to deserialise (a negative count): once.
                let within = |inner: &Option<std::ops::Range<usize>>, outer: &Option<std::ops::Range<usize>>| matches!((inner, outer), (Some(i), Some(o)) if i.start >= o.start && i.end <= o.end);
                let more: Vec<Issue> = more.into_iter().filter(|m| !issues.iter().any(|i| within(&m.span, &i.span))).collect();
                issues.extend(more);
                return Err(issues);
            }
        };
        let mut raw_deps: Vec<(String, &str)> = Vec::new();
        let mut dep = |raw: &str, what: &'static str| raw_deps.push((raw.to_string(), what));
        if config.sources.is_empty() {
            issues.push(
                Issue::new(span.clone(), "collect needs at least one source")
                    .help("add `[[stages.NAME.sources]]` with `type = \"dir\"` and `path = \"...\"`"),
            );
        }
        for source in &config.sources {
            match source {
                Source::Dir { path, include, exclude, .. } => {
                    dep(path, "source");
                    for g in include.iter().chain(exclude) {
                        if let Err(e) = globset::Glob::new(g) {
                            issues.push(Issue::new(span.clone(), format!("invalid glob `{g}`: {e}")));
                        }
                    }
                }
                // Listed paths are relative to the listing's folder: depend on all of it. At
                // the workspace root that would be the whole workspace, the cache included.
                Source::Listing { path, .. } => {
                    match Path::new(path).parent().and_then(Path::to_str).filter(|p| !p.is_empty() && *p != ".") {
                        Some(dir) => dep(dir, "listing"),
                        None => issues.push(Issue::new(span.clone(), format!("listing `{path}` is at the workspace root")).help(
                            "kiln depends on the listing's folder, so put the listing and its images in a sub-folder, e.g. `data/list.csv`",
                        )),
                    }
                }
                // Numeric options were range-checked above (`numbers::check`).
                Source::Http { listing, .. } => dep(listing, "listing"),
                Source::Idx { images, labels, .. } => {
                    dep(images, "images");
                    if let Some(l) = labels {
                        dep(l, "labels");
                    }
                }
                Source::Pixels { path, .. } => dep(path, "pixel table"),
                Source::Synthetic { shapes, .. } => {
                    for s in shapes {
                        if synth::Shape::parse(s).is_none() {
                            issues.push(
                                Issue::new(span.clone(), format!("unknown shape `{s}`"))
                                    .help("shapes are `circle`, `square`, `triangle`, `star`"),
                            );
                        }
                    }
                }
            }
        }
        let mut deps = Vec::new();
        for (raw, what) in raw_deps {
            match normalize_dep(&raw) {
                Ok(p) => deps.push(Spanned::new(span.clone(), p)),
                Err(why) => issues.push(Issue::new(span.clone(), format!("invalid {what} path `{raw}`: {why}"))),
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(CollectStage { config, deps }))
    }
}

/// A per-entry problem, reported instead of failing the run.
#[derive(Debug, Clone, Serialize)]
struct Problem {
    source: String,
    path: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct SourceReport {
    source: String,
    items: usize,
    problems: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    items: usize,
    sources: Vec<SourceReport>,
    problems: Vec<Problem>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

impl Stage for CollectStage {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("collect config serialises")
    }

    fn path_deps(&self) -> Vec<Spanned<String>> {
        self.deps.clone()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let mut items = Vec::new();
        let mut problems = Vec::new();
        let mut sources = Vec::new();
        for (n, source) in self.config.sources.iter().enumerate() {
            let label = source_label(source, n);
            let (before_items, before_problems) = (items.len(), problems.len());
            match source {
                Source::Dir { .. } => collect_dir(cx, source, &label, &mut items, &mut problems)?,
                Source::Listing { .. } => collect_listing(cx, source, &label, &mut items, &mut problems)?,
                Source::Idx { .. } => collect_idx(cx, source, &label, &mut items)?,
                Source::Pixels { .. } => collect_pixels(cx, source, &label, &mut items, &mut problems)?,
                Source::Synthetic { .. } => collect_synthetic(cx, source, &label, &mut items)?,
                Source::Http { .. } => collect_http(cx, source, &label, &mut items, &mut problems)?,
            }
            sources.push(SourceReport { source: label, items: items.len() - before_items, problems: problems.len() - before_problems });
        }
        probe_headers(cx, &mut items)?;
        // Two sources may list the same relative path: the second copy gets a suffix.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for item in &mut items {
            let n = seen.entry(item.id.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                item.id = format!("{}#{}", item.id, n);
            }
        }
        let report = Report { items: items.len(), sources, problems };
        if !report.problems.is_empty() {
            cx.reporter.warn(&format!(
                "stage `{}`: {} entries could not be collected (see collect_report.json)",
                cx.stage,
                report.problems.len()
            ));
        }
        dataset::write(cx, &mut items)?;
        dataset::write_json(cx, "collect_report.json", &report)
    }
}

fn source_label(source: &Source, n: usize) -> String {
    let (name, fallback) = match source {
        Source::Dir { name, path, .. } | Source::Listing { name, path, .. } | Source::Pixels { name, path, .. } => (name, stem(path)),
        Source::Idx { name, images, .. } => (name, stem(images)),
        Source::Http { name, listing, .. } => (name, stem(listing)),
        Source::Synthetic { name, .. } => (name, "synthetic".to_string()),
    };
    name.clone().unwrap_or(if fallback.is_empty() { format!("source{n}") } else { fallback })
}

fn stem(path: &str) -> String {
    let file = path.trim_end_matches('/').rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).to_string()
}

fn collect_dir(
    cx: &StageContext<'_>,
    source: &Source,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let Source::Dir { path, layout, extensions, include, exclude, follow_links, max_bytes, .. } = source else {
        unreachable!("called for dir sources")
    };
    let root = dep_path(cx.root, path);
    // The engine scanned this folder to build the stage key, and its scan has the digests;
    // the walk below only lists names (no `stat` of regular files) to refuse what must
    // not be collected, which the scan does not tell apart.
    let scan = match cx.dep_scan(path) {
        Some(scan) => std::borrow::Cow::Borrowed(scan),
        None => std::borrow::Cow::Owned(
            cx.cache.state().scan(&root, cx.reporter).map_err(|e| StageError::Failed(format!("source `{label}`: {e}")))?,
        ),
    };
    let globs = |patterns: &[String]| -> Result<Option<globset::GlobSet>, StageError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = globset::GlobSetBuilder::new();
        for p in patterns {
            b.add(globset::Glob::new(p).map_err(|e| StageError::Failed(format!("invalid glob `{p}`: {e}")))?);
        }
        b.build().map(Some).map_err(|e| StageError::Failed(e.to_string()))
    };
    let (include, exclude) = (globs(include)?, globs(exclude)?);
    let wanted_ext: Vec<String> = extensions
        .clone()
        .unwrap_or_else(|| IMAGE_EXTENSIONS.iter().map(|e| e.to_string()).collect())
        .iter()
        .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let selected = |rel: &str| {
        let ext = rel.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
        wanted_ext.contains(&ext) && include.as_ref().is_none_or(|g| g.is_match(rel)) && !exclude.as_ref().is_some_and(|g| g.is_match(rel))
    };
    // A problem is worth reporting when the entry would have been collected, or when its
    // name has no extension (a folder, a link, a pipe: it may hide images).
    let reportable = |rel: &str| selected(rel) || !rel.rsplit('/').next().unwrap_or(rel).contains('.');
    let walked = files::walk(&root, *follow_links).map_err(|e| StageError::Failed(format!("source `{label}`: {e}")))?;
    // What the walk refused stands for everything below it (a loop, a linked folder).
    let refused: HashSet<&str> = walked.refused.iter().map(|r| r.rel.as_str()).collect();
    let hidden = |rel: &str| {
        let mut at = rel;
        loop {
            if refused.contains(at) {
                return true;
            }
            match at.rsplit_once('/') {
                Some((parent, _)) => at = parent,
                None => return false,
            }
        }
    };
    let mut found: Vec<(String, String)> =
        walked.refused.iter().filter(|r| r.always || reportable(&r.rel)).map(|r| (r.rel.clone(), r.reason.clone())).collect();
    found.extend(scan.problems.iter().filter(|(rel, _)| !hidden(rel) && reportable(rel)).cloned());
    let broken: HashSet<&str> = scan.problems.iter().map(|(p, _)| p.as_str()).collect();
    let mut entries = Vec::new();
    for e in scan.tree.entries() {
        if broken.contains(e.path.as_str()) || !selected(&e.path) {
            continue;
        }
        if !walked.files.contains(&e.path) {
            // Below a refused entry (reported there), or gone since the scan.
            if !hidden(&e.path) {
                found.push((e.path.clone(), "changed while being collected (run again)".into()));
            }
            continue;
        }
        if e.size > *max_bytes {
            found.push((e.path.clone(), format!("{} bytes, over the {max_bytes}-byte limit (`max_bytes`)", e.size)));
            continue;
        }
        entries.push(e);
    }
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    for (rel, reason) in found {
        problems.push(Problem { source: label.to_string(), path: format!("{path}/{rel}"), reason });
    }
    // Store every image once by content; a blob already in the cache is not read again.
    // The read is bounded and checks the content against the scan's digest.
    let stored: Vec<Result<(), String>> = entries
        .par_iter()
        .map(|e| -> Result<(), String> {
            if cx.cache.has_blob(&e.digest) {
                return Ok(());
            }
            let file = if e.path.is_empty() { root.clone() } else { root.join(unescape_os(&e.path)) };
            let bytes = files::read_regular(&file, *max_bytes, "`max_bytes`")?;
            match cx.cache.put_blob_bytes(&bytes) {
                Ok(digest) if digest == e.digest => Ok(()),
                Ok(_) => Err("changed while being collected (run again)".to_string()),
                Err(err) => Err(err.to_string()),
            }
        })
        .collect();
    for (e, stored) in entries.into_iter().zip(stored) {
        if let Err(reason) = stored {
            problems.push(Problem { source: label.to_string(), path: format!("{path}/{}", e.path), reason });
            continue;
        }
        let parts: Vec<&str> = e.path.split('/').collect();
        let mut item = Item::new(format!("{label}/{}", e.path), format!("{path}/{}", e.path), e.digest, e.size);
        match layout {
            Layout::Class if parts.len() >= 2 => item.label = Some(parts[0].to_string()),
            Layout::SplitClass if parts.len() >= 3 => {
                item.split = Some(parts[0].to_string());
                item.label = Some(parts[1].to_string());
            }
            _ => {}
        }
        items.push(item);
    }
    Ok(())
}

fn collect_listing(
    cx: &StageContext<'_>,
    source: &Source,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let Source::Listing { path, path_field, label_field, max_bytes, .. } = source else { unreachable!("called for listing sources") };
    let listing = dep_path(cx.root, path);
    let base = listing.parent().map(Path::to_path_buf).unwrap_or_default();
    let fail = |e: String| StageError::Failed(format!("listing `{path}`: {e}"));
    let rows = read_rows(&listing, path)?;
    let mut wanted = Vec::with_capacity(rows.len());
    for (n, row) in rows.iter().enumerate() {
        let Some(rel) = row.get(path_field) else {
            return Err(fail(format!("row {} has no `{path_field}` column", n + 1)));
        };
        // An absolute path is allowed (a listing names what it names), but like any other
        // it is read only if it is a regular file within `max_bytes`.
        let file = if Path::new(rel).is_absolute() { PathBuf::from(rel) } else { base.join(rel) };
        wanted.push((rel.clone(), file, label_field.as_ref().and_then(|f| row.get(f)).cloned()));
    }
    let stored: Vec<Result<(Digest, u64), String>> = wanted
        .par_iter()
        .map(|(_, file, _)| -> Result<(Digest, u64), String> {
            let bytes = files::read_regular(file, *max_bytes, "`max_bytes`")?;
            let digest = cx.cache.put_blob_bytes(&bytes).map_err(|e| e.to_string())?;
            Ok((digest, bytes.len() as u64))
        })
        .collect();
    for ((rel, _, item_label), stored) in wanted.into_iter().zip(stored) {
        match stored {
            Ok((digest, bytes)) => {
                let mut item = Item::new(format!("{label}/{rel}"), rel.clone(), digest, bytes);
                item.label = item_label.filter(|l| !l.is_empty());
                items.push(item);
            }
            Err(reason) => problems.push(Problem { source: label.to_string(), path: rel, reason }),
        }
    }
    Ok(())
}

/// The rows of a CSV (with a header) or JSONL listing, as text fields. The listing must be
/// a regular file of at most [`TABLE_MAX_BYTES`].
fn read_rows(file: &Path, shown: &str) -> Result<Vec<BTreeMap<String, String>>, StageError> {
    let fail = |e: String| StageError::Failed(format!("listing `{shown}`: {e}"));
    let bytes = files::read_regular(file, TABLE_MAX_BYTES, "kiln's limit for listings").map_err(fail)?;
    if shown.ends_with(".jsonl") || shown.ends_with(".ndjson") {
        let text = std::str::from_utf8(&bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(l).map_err(|e| fail(format!("line {}: {e}", n + 1)))?;
                Ok(v.into_iter().map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))).collect())
            })
            .collect()
    } else {
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        reader.deserialize().collect::<Result<_, _>>().map_err(|e| fail(e.to_string()))
    }
}

fn collect_http(
    cx: &StageContext<'_>,
    source: &Source,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let Source::Http { listing, url_field, label_field, concurrency, timeout_secs, retries, max_bytes, content_types, .. } = source else {
        unreachable!("called for http sources")
    };
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
    let opts = http::HttpOptions {
        concurrency: *concurrency,
        timeout_secs: *timeout_secs,
        retries: *retries,
        max_bytes: *max_bytes,
        content_types: content_types.clone(),
    };
    for ((url, item_label), fetched) in urls.iter().zip(labels).zip(http::fetch_all(cx, &urls, &opts)?) {
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

/// A regular file's bytes, gunzipped when they start with the gzip magic number; at most
/// `limit` bytes read, and at most `limit` once decompressed.
fn read_maybe_gzip(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let raw = files::read_regular(path, limit, "kiln's limit for such files").map_err(|e| format!("`{}`: {e}", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("`{}`: bad gzip: {e}", path.display()))?;
    if out.len() as u64 > limit {
        return Err(format!("`{}` decompresses to more than {limit} bytes, kiln's limit for such files", path.display()));
    }
    Ok(out)
}

/// Reads an IDX file (the MNIST family's format), gzipped or not: (dimensions, bytes).
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), String> {
    let mut data = read_maybe_gzip(path, IDX_MAX_BYTES)?;
    if data.len() < 4 || data[0] != 0 || data[1] != 0 || data[2] != 0x08 {
        return Err(format!("`{}` is not an unsigned-byte IDX file", path.display()));
    }
    let ndim = data[3] as usize;
    let header = 4 + 4 * ndim;
    if data.len() < header {
        return Err(format!("`{}`: truncated IDX header", path.display()));
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(data[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    if expected != Some(data.len() - header) {
        let promised = expected.map_or_else(|| format!("{dims:?} (too many)"), |n| n.to_string());
        return Err(format!("`{}`: IDX header promises {promised} values, file has {}", path.display(), data.len() - header));
    }
    // Drop the header in place: the data may be gigabytes.
    let values = data.len() - header;
    data.copy_within(header.., 0);
    data.truncate(values);
    Ok((dims, data))
}

fn collect_idx(cx: &StageContext<'_>, source: &Source, label: &str, items: &mut Vec<Item>) -> Result<(), StageError> {
    let Source::Idx { images, labels, split, classes, .. } = source else { unreachable!("called for idx sources") };
    let fail = |e: String| StageError::Failed(format!("source `{label}`: {e}"));
    let (dims, pixels) = read_idx(&dep_path(cx.root, images)).map_err(fail)?;
    let [n, rows, cols] = dims[..] else {
        return Err(fail(format!("`{images}` holds {}-dimensional data, expected images (3)", dims.len())));
    };
    let names = match labels {
        Some(l) => {
            let (ldims, values) = read_idx(&dep_path(cx.root, l)).map_err(fail)?;
            if ldims != [n] {
                return Err(fail(format!("`{l}` holds {ldims:?} labels for {n} images")));
            }
            Some(values)
        }
        None => None,
    };
    let stored = store_gray(cx, n, |i| {
        GrayImage::from_raw(cols as u32, rows as u32, pixels[i * rows * cols..(i + 1) * rows * cols].to_vec()).expect("exact size")
    })?;
    for (i, (digest, bytes)) in stored.into_iter().enumerate() {
        let mut item = Item::new(format!("{label}/{i:05}"), format!("{images}#{i}"), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(cols as u32), Some(rows as u32));
        item.split = split.clone();
        item.label = names.as_ref().map(|v| {
            let k = v[i] as usize;
            classes.get(k).cloned().unwrap_or_else(|| k.to_string())
        });
        items.push(item);
    }
    Ok(())
}

fn collect_pixels(
    cx: &StageContext<'_>,
    source: &Source,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let Source::Pixels { path, width, height, label_column, max_value, .. } = source else { unreachable!("called for pixel sources") };
    let file = dep_path(cx.root, path);
    let bytes = read_maybe_gzip(&file, TABLE_MAX_BYTES).map_err(StageError::Failed)?;
    let text = String::from_utf8(bytes).map_err(|_| StageError::Failed(format!("`{path}` is not text")))?;
    let want = (*width * *height) as usize;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let column = if *label_column < 0 { fields.len() as i64 + label_column } else { *label_column };
        let parsed: Result<Vec<f64>, _> =
            fields.iter().enumerate().filter(|(i, _)| *i as i64 != column).map(|(_, f)| f.parse::<f64>()).collect();
        match parsed {
            Ok(values) if values.len() == want && (0..fields.len() as i64).contains(&column) => {
                let pixels: Vec<u8> = values.iter().map(|v| (v / max_value * 255.0).round().clamp(0.0, 255.0) as u8).collect();
                rows.push((n, pixels, fields[column as usize].to_string()));
            }
            Ok(values) => problems.push(Problem {
                source: label.to_string(),
                path: format!("{path}:{}", n + 1),
                reason: format!("{} pixel values, expected {want}", values.len()),
            }),
            Err(e) => problems.push(Problem {
                source: label.to_string(),
                path: format!("{path}:{}", n + 1),
                reason: format!("not a number: {e}"),
            }),
        }
    }
    let stored = store_gray(cx, rows.len(), |i| GrayImage::from_raw(*width, *height, rows[i].1.clone()).expect("exact size"))?;
    for ((n, _, class), (digest, bytes)) in rows.iter().zip(stored) {
        let mut item = Item::new(format!("{label}/{n:05}"), format!("{path}:{}", n + 1), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(*width), Some(*height));
        item.label = Some(class.clone());
        items.push(item);
    }
    Ok(())
}

fn collect_synthetic(cx: &StageContext<'_>, source: &Source, label: &str, items: &mut Vec<Item>) -> Result<(), StageError> {
    let Source::Synthetic { count, size, shapes, noise, .. } = source else { unreachable!("called for synthetic sources") };
    let shapes: Vec<synth::Shape> =
        if shapes.is_empty() { synth::SHAPES.to_vec() } else { shapes.iter().filter_map(|s| synth::Shape::parse(s)).collect() };
    let keys: Vec<Digest> = (0..*count)
        .map(|i| Digest::of_bytes(format!("synthetic v1 seed={} i={i} size={size} noise={noise} shapes={shapes:?}", cx.seed).as_bytes()))
        .collect();
    let stored = store_memoised(cx, "synthetic-png-v1", &keys, |i| synth::item(cx.seed, i as u64, *size, &shapes, *noise).1)?;
    for (i, (digest, bytes)) in stored.into_iter().enumerate() {
        let shape = shapes[i % shapes.len()];
        let mut item = Item::new(format!("{label}/{i:05}"), format!("synthetic:{i}"), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(*size), Some(*size));
        item.label = Some(shape.name().to_string());
        items.push(item);
    }
    Ok(())
}

/// Encodes generated grayscale images as PNG blobs, memoised by their raw pixels.
fn store_gray(cx: &StageContext<'_>, n: usize, image: impl Fn(usize) -> GrayImage + Sync) -> Result<Vec<(Digest, u64)>, StageError> {
    let keys: Vec<Digest> = (0..n).into_par_iter().map(|i| Digest::of_bytes(image(i).as_raw())).collect();
    store_memoised(cx, "gray-png-v1", &keys, |i| DynamicImage::ImageLuma8(image(i)))
}

/// For each key, the (digest, size) of a PNG blob: from the memo store when the blob is
/// still in the cache, else drawn, encoded and stored.
fn store_memoised(
    cx: &StageContext<'_>,
    op: &str,
    keys: &[Digest],
    image: impl Fn(usize) -> DynamicImage + Sync,
) -> Result<Vec<(Digest, u64)>, StageError> {
    let make = |i: usize| -> Result<(Digest, u64), String> {
        let png = imaging::encode_png(&image(i));
        Ok((cx.cache.put_blob_bytes(&png).map_err(|e| e.to_string())?, png.len() as u64))
    };
    let results = cx.cache.memo_blobs(keys, &Digest::of_bytes(op.as_bytes()), make).map_err(|e| StageError::Failed(e.to_string()))?;
    results.into_iter().map(|r| r.map_err(StageError::Failed)).collect()
}

/// Format and size from each image's header, memoised per content digest.
fn probe_headers(cx: &StageContext<'_>, items: &mut [Item]) -> Result<(), StageError> {
    let todo: Vec<usize> = (0..items.len()).filter(|&i| items[i].format.is_none()).collect();
    let digests: Vec<Digest> = todo.iter().map(|&i| items[i].digest).collect();
    let op = Digest::of_bytes(b"collect-header-v1");
    let results = cx
        .cache
        .state()
        .memo()
        .map(&digests, &op, |k| {
            let bytes = cx.cache.read_blob(&digests[k]).map_err(|e| e.to_string())?;
            let header = match imaging::header(&bytes) {
                Ok((f, w, h)) => Header { format: Some(imaging::format_name(f)), width: Some(w), height: Some(h) },
                Err(_) => Header { format: None, width: None, height: None },
            };
            serde_json::to_vec(&header).map_err(|e| e.to_string())
        })
        .map_err(|e| StageError::Failed(e.to_string()))?;
    for (&i, r) in todo.iter().zip(results) {
        let bytes = r.map_err(StageError::Failed)?;
        let h: Header = serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(e.to_string()))?;
        (items[i].format, items[i].width, items[i].height) = (h.format, h.width, h.height);
    }
    Ok(())
}
