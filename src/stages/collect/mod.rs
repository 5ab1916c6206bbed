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
//! the `http` module). Each source type is a module (`dir`, `listing`, `idx`, `pixels`,
//! `http`, `synthetic`) whose `collect` takes that source's own configuration; `store`
//! holds what they share to store images.
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

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, parse_config};
use crate::diagnostic::Issue;
use crate::imaging::synth;
use crate::paths::normalize_dep;
use crate::stages::io as dataset;

mod dir;
mod files;
mod http;
mod idx;
mod listing;
mod numbers;
mod pixels;
mod store;
mod synthetic;
#[cfg(test)]
mod tests;

pub struct CollectKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    sources: Vec<Source>,
}

/// One source, tagged by `type`. Each variant wraps its own configuration, which denies
/// unknown fields itself; the params JSON is the same as when the variants held the
/// fields: the tag, then the fields in the order declared.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source {
    Dir(DirSource),
    Listing(ListingSource),
    Idx(IdxSource),
    Pixels(PixelsSource),
    Http(HttpSource),
    Synthetic(SyntheticSource),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirSource {
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListingSource {
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdxSource {
    images: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    split: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    classes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PixelsSource {
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSource {
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyntheticSource {
    count: u64,
    #[serde(default = "default_size")]
    size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    shapes: Vec<String>,
    #[serde(default = "default_noise")]
    noise: f64,
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
                Source::Dir(DirSource { path, include, exclude, .. }) => {
                    dep(path, "source");
                    for g in include.iter().chain(exclude) {
                        if let Err(e) = globset::Glob::new(g) {
                            issues.push(Issue::new(span.clone(), format!("invalid glob `{g}`: {e}")));
                        }
                    }
                }
                // Listed paths are relative to the listing's folder: depend on all of it. At
                // the workspace root that would be the whole workspace, the cache included.
                Source::Listing(ListingSource { path, .. }) => {
                    match Path::new(path).parent().and_then(Path::to_str).filter(|p| !p.is_empty() && *p != ".") {
                        Some(dir) => dep(dir, "listing"),
                        None => issues.push(Issue::new(span.clone(), format!("listing `{path}` is at the workspace root")).help(
                            "kiln depends on the listing's folder, so put the listing and its images in a sub-folder, e.g. `data/list.csv`",
                        )),
                    }
                }
                // Numeric options were range-checked above (`numbers::check`).
                Source::Http(HttpSource { listing, .. }) => dep(listing, "listing"),
                Source::Idx(IdxSource { images, labels, .. }) => {
                    dep(images, "images");
                    if let Some(l) = labels {
                        dep(l, "labels");
                    }
                }
                Source::Pixels(PixelsSource { path, .. }) => dep(path, "pixel table"),
                Source::Synthetic(SyntheticSource { shapes, .. }) => {
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
                Source::Dir(s) => dir::collect(cx, s, &label, &mut items, &mut problems)?,
                Source::Listing(s) => listing::collect(cx, s, &label, &mut items, &mut problems)?,
                Source::Idx(s) => idx::collect(cx, s, &label, &mut items)?,
                Source::Pixels(s) => pixels::collect(cx, s, &label, &mut items, &mut problems)?,
                Source::Synthetic(s) => synthetic::collect(cx, s, &label, &mut items)?,
                Source::Http(s) => http::collect(cx, s, &label, &mut items, &mut problems)?,
            }
            sources.push(SourceReport { source: label, items: items.len() - before_items, problems: problems.len() - before_problems });
        }
        store::probe_headers(cx, &mut items)?;
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
        Source::Dir(DirSource { name, path, .. })
        | Source::Listing(ListingSource { name, path, .. })
        | Source::Pixels(PixelsSource { name, path, .. }) => (name, stem(path)),
        Source::Idx(IdxSource { name, images, .. }) => (name, stem(images)),
        Source::Http(HttpSource { name, listing, .. }) => (name, stem(listing)),
        Source::Synthetic(SyntheticSource { name, .. }) => (name, "synthetic".to_string()),
    };
    name.clone().unwrap_or(if fallback.is_empty() { format!("source{n}") } else { fallback })
}

fn stem(path: &str) -> String {
    let file = path.trim_end_matches('/').rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).to_string()
}
