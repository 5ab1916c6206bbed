//! The pipeline manifest: TOML text → validated [`Manifest`].
//!
//! Loading runs in named passes over toml's spanned document tree, so every problem can
//! point at the text that caused it:
//!
//! 1. **parse** the document (`toml::de::DeTable`, spans on every key and value);
//! 2. **top level**: only `[pipeline]`, `[params]` and `[stages.*]` are allowed, and no
//!    float anywhere (overrides included) may be NaN or infinite;
//! 3. **interpolate** `${params.NAME}` in every stage value (a whole-string reference keeps
//!    the parameter's type, an embedded one is formatted into the string);
//! 4. **per stage**: `kind`, `inputs` and `deps` are read by kiln, everything else is parsed
//!    by the stage kind's own `deny_unknown_fields` type, which range-checks every value at
//!    its span ([`Checker`](crate::diagnostic::Checker));
//! 5. **cross-stage**: unknown inputs, and outputs and the cache that would leave the
//!    workspace ([`crate::workspace::layout_issues`]).
//!
//! Each pass collects all of its issues into a [`Parsed`] manifest. The stage graph
//! (overlapping outputs, cycles) and the checks of each stage against the stages upstream
//! ([`crate::stages::Stage::plan_issues`], pointing at values through [`StageDecl::spans`])
//! need the whole manifest: [`crate::plan::Plan`] runs them once, and fails with one
//! [`ManifestError`] that lists every problem with file:line:column.
//!
//! The manifest sits below the engine: what it tells the engine ([`Executor`],
//! [`Resources`]) is declared in [`settings`], its problems are [`crate::diagnostic`]'s, and
//! its paths [`crate::paths`]'.

mod interpolate;
pub mod overrides;
pub mod settings;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub use crate::diagnostic::{Issue, ManifestError};
pub use overrides::Override;
pub use settings::{Executor, Resources};

use crate::diagnostic::{ValueSpans, did_you_mean, spans};
use crate::paths::normalize_dep;
use crate::stages::{ParseContext, Stage, StageRegistry};

/// A validated pipeline manifest.
#[derive(Debug)]
pub struct Manifest {
    /// The manifest file as given on the command line.
    pub path: PathBuf,
    pub source: Arc<str>,
    /// The workspace root: commands run here and relative paths resolve against it.
    pub root: PathBuf,
    pub name: String,
    pub seed: u64,
    pub cache_dir: PathBuf,
    /// The `[params]` table, for reference and display.
    pub params: serde_json::Value,
    /// Stages, sorted by name.
    pub stages: Vec<StageDecl>,
    /// `--set` values applied on top of the file (its `source` shows them as comments).
    pub overrides: Vec<Override>,
    /// `[cache.remote]`: a shared S3-compatible cache.
    pub remote: Option<crate::cache::remote::RemoteConfig>,
    /// `[pipeline] executor`: where stages run unless `kiln run --executor` says otherwise.
    pub executor: Executor,
}

/// One `[stages.NAME]` table after validation.
#[derive(Debug, Clone)]
pub struct StageDecl {
    pub name: String,
    /// The span of the stage's name in its table header, for later diagnostics.
    pub span: Range<usize>,
    pub kind: String,
    pub kind_version: u32,
    /// Upstream stages named in `inputs`.
    pub inputs: Vec<Spanned<String>>,
    /// Workspace paths this stage reads: `deps`, path entries of `inputs`, and paths the
    /// stage kind itself declares.
    pub deps: Vec<Spanned<String>>,
    /// `[params]` entries referenced through `${params.NAME}`, with their values.
    pub uses: std::collections::BTreeMap<String, serde_json::Value>,
    /// What a Slurm job for this stage asks for; not part of the key (it cannot change a
    /// result).
    pub resources: Option<Resources>,
    pub stage: Arc<dyn Stage>,
    /// Where each value of the stage's table is written (`inputs` included), so plan
    /// checks can point at the value that causes a problem.
    pub spans: Arc<ValueSpans>,
}

/// A manifest as read and checked on its own: everything that parsed and every problem
/// found. [`crate::plan::Plan`] adds the stage graph and the checks across stages.
#[derive(Debug)]
pub struct Parsed {
    /// The manifest text with `--set` overrides appended (as comments and values), which
    /// every issue's span points into.
    pub source: Arc<str>,
    /// `None` when the TOML itself is broken.
    pub manifest: Option<Manifest>,
    pub issues: Vec<Issue>,
}

impl Manifest {
    /// Parses manifest `text` (read from `path`) with `--set` overrides applied, running
    /// every check that needs no stage graph.
    pub fn parse(path: &Path, text: &str, registry: &StageRegistry, overrides: &[Override]) -> Parsed {
        let (text, placed) = overrides::append(text, overrides);
        let source: Arc<str> = Arc::from(text);
        let (manifest, issues) = parse(path, &source, &placed, registry);
        let manifest = manifest.map(|m| Manifest { overrides: overrides.to_vec(), ..m });
        Parsed { source, manifest, issues }
    }

    /// `pipelines/NAME.toml` → `pipelines/NAME.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.binary_search_by(|s| s.name.as_str().cmp(name)).ok().map(|i| &self.stages[i])
    }

    /// Where the artifacts of built-in stages are shown to people.
    pub fn outputs_dir(&self) -> PathBuf {
        self.root.join("outputs").join(&self.name)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Option<Spanned<String>>,
    #[serde(default)]
    seed: u64,
    cache: Option<Spanned<String>>,
    root: Option<String>,
    #[serde(default)]
    executor: Executor,
}

/// The manifest built from everything that parsed (`None` when the TOML itself is
/// broken), and every problem found.
fn parse(path: &Path, src: &str, placed: &[overrides::Placed], registry: &StageRegistry) -> (Option<Manifest>, Vec<Issue>) {
    let (doc, errors) = DeTable::parse_recoverable(src);
    if !errors.is_empty() {
        let whole = 0..src.len();
        return (None, errors.iter().map(|e| Issue::from_toml(e, whole.clone())).collect());
    }
    let doc_span = doc.span();
    let mut doc = doc.into_inner();
    let mut issues = Vec::new();
    overrides::apply(&mut doc, src, placed, &mut issues);
    // Before anything reads a value: no manifest with a NaN or an infinity loads, so no
    // stage runs with one and no cache key holds one (as `null`).
    let before_floats = issues.len();
    spans::reject_non_finite(&doc, src, &mut issues);
    let all_finite = issues.len() == before_floats;

    for (key, _) in doc.iter() {
        if !["pipeline", "params", "stages", "cache"].contains(&key.get_ref().as_ref()) {
            issues.push(
                Issue::new(key.span(), format!("unknown top-level key `{}`", key.get_ref()))
                    .label("unknown key")
                    .help("expected one of `pipeline`, `params`, `stages`, `cache`"),
            );
        }
    }

    let raw_pipeline = match doc.remove("pipeline") {
        Some(value) => {
            let span = value.span();
            RawPipeline::deserialize(ValueDeserializer::from(value)).unwrap_or_else(|e| {
                issues.push(Issue::from_toml(&e, span));
                RawPipeline::default()
            })
        }
        None => RawPipeline::default(),
    };

    let remote = match doc.remove("cache") {
        Some(value) => {
            let span = value.span();
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct RawCache {
                remote: Option<crate::cache::remote::RemoteConfig>,
            }
            match RawCache::deserialize(ValueDeserializer::from(value)) {
                Ok(c) => {
                    if let Some(r) = &c.remote
                        && !r.url.starts_with("s3://")
                    {
                        issues.push(Issue::new(span, format!("`cache.remote.url` = \"{}\": expected s3://BUCKET[/PREFIX]", r.url)));
                    }
                    c.remote
                }
                Err(e) => {
                    issues.push(
                        Issue::from_toml(&e, span)
                            .help("e.g. `[cache.remote]` with `url = \"s3://bucket/prefix\"` and `endpoint = \"http://127.0.0.1:3900\"`"),
                    );
                    None
                }
            }
        }
        None => None,
    };

    let params_de = doc.remove("params");
    let params_json = match &params_de {
        Some(value) if !value.get_ref().is_table() => {
            issues.push(Issue::new(value.span(), "`params` must be a table").help("write `[params]` followed by `name = value` lines"));
            serde_json::Value::Object(Default::default())
        }
        Some(value) => serde_json::Value::deserialize(ValueDeserializer::from(value.clone())).unwrap_or_else(|e| {
            issues.push(Issue::from_toml(&e, value.span()));
            serde_json::Value::Object(Default::default())
        }),
        None => serde_json::Value::Object(Default::default()),
    };
    // serde_json turns a NaN into `null`; with every float finite none can reach a key.
    debug_assert!(!all_finite || !spans::has_null(&params_json), "a non-finite float reached [params]: {params_json}");

    let manifest_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let manifest_dir = if manifest_dir.as_os_str().is_empty() { PathBuf::from(".") } else { manifest_dir };
    let root = match &raw_pipeline.root {
        Some(r) => manifest_dir.join(r),
        None => manifest_dir,
    };
    // Canonical when it exists, so `pipelines/..` prints as the directory it is.
    let root = root.canonicalize().or_else(|_| std::path::absolute(&root)).unwrap_or(root);
    let name = match &raw_pipeline.name {
        Some(n) => {
            if !valid_name(n.get_ref()) {
                issues.push(
                    Issue::new(n.span(), format!("invalid pipeline name `{}`", n.get_ref())).help("use letters, digits, `_` and `-`"),
                );
            }
            n.get_ref().clone()
        }
        None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()),
    };
    let cache_dir = root.join(raw_pipeline.cache.as_ref().map_or("cache", |c| c.get_ref().as_str()));

    let cx = ParseContext { params: &params_json };
    let mut stages = Vec::new();
    // Every stage table's name and inputs, parsed successfully or not, so that a stage with
    // one problem still gets its inputs checked and is not reported as missing itself.
    let mut declared: Vec<(String, Vec<Spanned<String>>)> = Vec::new();
    match doc.remove("stages") {
        None => issues.push(
            Issue::new(doc_span.start..doc_span.start, "the manifest declares no stages")
                .help("add a stage, e.g. `[stages.hello]` with `kind = \"command\"` and `cmd = \"echo hello\"`"),
        ),
        Some(value) => {
            let span = value.span();
            match value.into_inner() {
                DeValue::Table(table) => {
                    for (key, value) in table {
                        if let Some(decl) = parse_stage(key, value, params_de.as_ref(), registry, &cx, &mut declared, &mut issues) {
                            stages.push(decl);
                        }
                    }
                }
                _ => issues.push(Issue::new(span, "`stages` must be a table of stage tables").help("write `[stages.NAME]` headers")),
            }
        }
    }
    stages.sort_by(|a, b| a.name.cmp(&b.name));
    check_inputs(&declared, &mut issues);
    let outs = stages.iter().flat_map(|decl| decl.stage.outs().iter().map(|o| (o.path.as_str(), o.span.clone())));
    issues.extend(crate::workspace::layout_issues(&root, &cache_dir, raw_pipeline.cache.as_ref().map(|c| c.span()), outs));

    let manifest = Manifest {
        path: path.to_path_buf(),
        source: Arc::from(src),
        root,
        name,
        seed: raw_pipeline.seed,
        cache_dir,
        params: params_json,
        stages,
        overrides: Vec::new(),
        remote,
        executor: raw_pipeline.executor,
    };
    (Some(manifest), issues)
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_stage<'i>(
    key: Spanned<std::borrow::Cow<'i, str>>,
    value: Spanned<DeValue<'i>>,
    params: Option<&Spanned<DeValue<'i>>>,
    registry: &StageRegistry,
    cx: &ParseContext<'_>,
    declared: &mut Vec<(String, Vec<Spanned<String>>)>,
    issues: &mut Vec<Issue>,
) -> Option<StageDecl> {
    let name = key.get_ref().to_string();
    declared.push((name.clone(), Vec::new()));
    let name_span = key.span();
    if !valid_name(&name) {
        issues.push(Issue::new(name_span.clone(), format!("invalid stage name `{name}`")).help("use letters, digits, `_` and `-`"));
    }
    let value_span = value.span();
    let mut table = match value.into_inner() {
        DeValue::Table(t) => t,
        _ => {
            issues.push(
                Issue::new(value_span, format!("stage `{name}` must be a table"))
                    .help(format!("write `[stages.{name}]` followed by its keys")),
            );
            return None;
        }
    };
    let before = issues.len();
    let mut resolver = interpolate::Resolver::new(params);
    resolver.resolve_table(&mut table);
    issues.append(&mut resolver.issues);
    let uses = resolver.used;
    let value_spans = Arc::new(ValueSpans::of_table(&table, value_span.clone()));

    let resources = match table.remove("resources") {
        Some(value) => {
            let span = value.span();
            match Resources::deserialize(ValueDeserializer::from(value)) {
                Ok(r) => Some(r),
                Err(e) => {
                    issues.push(
                        Issue::from_toml(&e, span)
                            .help("e.g. `resources = { cpus = 2, mem = \"4G\", gpus = 1, time = \"01:00:00\", partition = \"gpu\" }`"),
                    );
                    None
                }
            }
        }
        None => None,
    };
    let inputs = take_string_list(&mut table, "inputs", issues);
    let mut deps = take_string_list(&mut table, "deps", issues);
    if let Some(last) = declared.last_mut() {
        last.1 = inputs.iter().filter(|i| !looks_like_path(i.get_ref())).cloned().collect();
    }
    let kind = match table.remove("kind") {
        Some(k) => match k.get_ref().as_str() {
            Some(s) => Spanned::new(k.span(), s.to_string()),
            None => {
                issues.push(
                    Issue::new(k.span(), format!("invalid type: {}, expected a string", k.get_ref().type_str()))
                        .help("e.g. `kind = \"command\"`"),
                );
                return None;
            }
        },
        None => {
            issues.push(
                Issue::new(name_span, format!("stage `{name}` has no `kind`"))
                    .label("this stage")
                    .help(format!("add `kind = \"...\"`, one of {}", registry.names_list())),
            );
            return None;
        }
    };

    let Some(stage_kind) = registry.get(kind.get_ref()) else {
        let mut issue = Issue::new(kind.span(), format!("unknown stage kind `{}`", kind.get_ref())).label("unknown kind");
        issue = match did_you_mean(kind.get_ref(), registry.names()) {
            Some(near) => issue.help(format!("did you mean `{near}`? known kinds: {}", registry.names_list())),
            None => issue.help(format!("known kinds: {}", registry.names_list())),
        };
        issues.push(issue);
        return None;
    };

    let mut stage_inputs = Vec::new();
    for input in inputs {
        // A stage is named by a bare word; anything path-like is a workspace path.
        if looks_like_path(input.get_ref()) {
            deps.push(input);
        } else {
            stage_inputs.push(input);
        }
    }
    let mut normalized = Vec::new();
    for dep in deps {
        match normalize_dep(dep.get_ref()) {
            Ok(p) => normalized.push(Spanned::new(dep.span(), p)),
            Err(why) => issues.push(Issue::new(dep.span(), format!("invalid dependency path `{}`: {why}", dep.get_ref()))),
        }
    }

    let table_value = Spanned::new(value_span.clone(), DeValue::Table(table));
    let stage = match stage_kind.parse(table_value, cx) {
        Ok(stage) => stage,
        Err(mut errs) => {
            issues.append(&mut errs);
            return None;
        }
    };
    for dep in stage.path_deps() {
        normalized.push(dep);
    }
    if issues.len() > before {
        return None;
    }
    Some(StageDecl {
        name,
        span: name_span,
        kind: kind.into_inner(),
        kind_version: stage_kind.version(),
        inputs: stage_inputs,
        deps: normalized,
        uses,
        resources,
        stage,
        spans: value_spans,
    })
}

fn looks_like_path(s: &str) -> bool {
    s.contains('/') || s.starts_with('.') || s.contains('.')
}

fn take_string_list(table: &mut DeTable<'_>, key: &str, issues: &mut Vec<Issue>) -> Vec<Spanned<String>> {
    let Some(value) = table.remove(key) else { return Vec::new() };
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items
            .iter()
            .filter_map(|item| match item.get_ref().as_str() {
                Some(s) => Some(Spanned::new(item.span(), s.to_string())),
                None => {
                    issues.push(Issue::new(item.span(), format!("invalid type: {}, expected a string", item.get_ref().type_str())));
                    None
                }
            })
            .collect(),
        DeValue::String(s) => vec![Spanned::new(span, s.into_owned())],
        other => {
            issues.push(
                Issue::new(span, format!("invalid type: {}, expected an array of strings", other.type_str()))
                    .help(format!("e.g. `{key} = [\"...\"]`")),
            );
            Vec::new()
        }
    }
}

/// Every stage input must name a declared stage.
fn check_inputs(declared: &[(String, Vec<Spanned<String>>)], issues: &mut Vec<Issue>) {
    let mut names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    for (stage, inputs) in declared {
        for input in inputs {
            let wanted = input.get_ref();
            if names.binary_search(&wanted.as_str()).is_err() {
                let mut issue = Issue::new(input.span(), format!("stage `{stage}` names unknown input stage `{wanted}`"))
                    .label("no stage of this name");
                issue = match did_you_mean(wanted, names.iter().copied()) {
                    Some(near) => issue.help(format!("did you mean `{near}`? for a path in the workspace write `./{wanted}`")),
                    None => issue.help(format!("declare `[stages.{wanted}]`, or write `./{wanted}` for a path in the workspace")),
                };
                issues.push(issue);
            }
        }
    }
}

#[cfg(test)]
mod tests;
