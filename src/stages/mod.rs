//! Stage kinds: what a `[stages.NAME]` table can be.
//!
//! A [`StageKind`] parses its part of a stage table (every key but `kind`, `inputs` and
//! `deps`, with `deny_unknown_fields`) into a [`Stage`]. A stage exposes its resolved
//! parameters (they go into the cache key) and runs in one of two ways:
//!
//! - **workspace outputs** ([`Stage::outs`] non-empty, the `command` kind): it writes the
//!   declared paths in the workspace, DVC-style; kiln deletes them before the run, hashes
//!   them after, and restores them from the cache when the stage is cached;
//! - **artifact** (built-in kinds): it writes into [`StageContext::out_dir`], a fresh
//!   directory inside the cache; kiln moves the files into the content-addressed store
//!   and shows them to people at `outputs/<pipeline>/<stage>/`.
//!
//! This module is the contract between the engine and the kinds. Each kind is a module of
//! its own that never imports another kind (the crate's `layering` test checks it): what
//! kinds exchange is in [`crate::formats`], reading it from a stage's inputs in [`io`],
//! what the plan knows of a dataset's upstream stages in [`upstream`], and what the kinds
//! that train a classifier (train, label_issues) share in [`training`]. The built-in kinds
//! are registered in `builtin.rs`, the only place that names them all.

mod builtin;
pub mod clean;
pub mod collect;
pub mod command;
pub mod convert;
pub mod eval;
pub mod io;
pub mod label;
pub mod label_issues;
pub mod preprocess;
pub mod train;
pub mod training;
pub mod upstream;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;
use toml::de::DeValue;

use crate::cache::{Cache, CacheError, Tree};
use crate::diagnostic::{Issue, ValueSpans};
use crate::digest::Digest;
use crate::report::Reporter;

pub use crate::paths::Out;

/// What a stage kind may consult while parsing.
pub struct ParseContext<'a> {
    /// The manifest's `[params]` table.
    pub params: &'a serde_json::Value,
}

impl ParseContext<'_> {
    /// Looks up a dotted parameter name, with or without a leading `params.`.
    pub fn param(&self, name: &str) -> Option<&serde_json::Value> {
        let path = name.strip_prefix("params.").unwrap_or(name);
        path.split('.').try_fold(self.params, |v, part| v.get(part))
    }
}

/// Parses a stage table into a kind's `deny_unknown_fields` config type; errors carry the
/// span of the offending key or value.
pub fn parse_config<T: serde::de::DeserializeOwned>(table: Spanned<DeValue<'_>>) -> Result<T, Vec<Issue>> {
    let span = table.span();
    T::deserialize(toml::de::ValueDeserializer::from(table)).map_err(|e| vec![Issue::from_toml(&e, span)])
}

pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bump when a change to the implementation can change results: it is in every key.
    fn version(&self) -> u32;
    fn parse(&self, table: Spanned<DeValue<'_>>, cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>>;
}

pub trait Stage: Send + Sync + fmt::Debug {
    /// The resolved parameters, canonical JSON: they go into the cache key and lock file.
    fn params(&self) -> serde_json::Value;

    /// Workspace outputs; empty for artifact stages.
    fn outs(&self) -> &[Out] {
        &[]
    }

    /// Whether results live in the workspace (declared `outs`, even none) rather than in
    /// an artifact shown at `outputs/<pipeline>/<stage>/`.
    fn writes_workspace(&self) -> bool {
        !self.outs().is_empty()
    }

    /// Workspace paths the stage reads because of its own parameters.
    fn path_deps(&self) -> Vec<Spanned<String>> {
        Vec::new()
    }

    /// Checks against upstream stages' settings when the manifest loads, before anything
    /// runs. Returns problems, reported at the stage's name; prefer
    /// [`Stage::plan_issues`], which can point at the values involved.
    fn check_plan(&self, _plan: &dyn PlanView) -> Vec<String> {
        Vec::new()
    }

    /// Checks against upstream stages' settings when the manifest loads, before anything
    /// runs (a pretrained model against the preprocessing that feeds it, split ratios
    /// against the items a synthetic source draws). Each issue points at the value that
    /// causes it, in this stage ([`PlanView::span`]) or an upstream one
    /// ([`PlanStage::spans`]); kiln prefixes the message with "stage `NAME`: ".
    fn plan_issues(&self, _plan: &dyn PlanView) -> Vec<Issue> {
        Vec::new()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError>;
}

/// What [`Stage::check_plan`] and [`Stage::plan_issues`] may see of the pipeline.
pub trait PlanView {
    /// The nearest upstream stage of `kind` (following `inputs`): its name and parameters.
    fn ancestor(&self, kind: &str) -> Option<(String, serde_json::Value)>;
    /// The nearest upstream stage of `kind` (following `inputs`).
    fn ancestor_stage(&self, kind: &str) -> Option<PlanStage<'_>>;
    /// The stage being checked.
    fn this(&self) -> PlanStage<'_>;
    /// Any stage of the manifest, by name.
    fn stage(&self, name: &str) -> Option<PlanStage<'_>>;
    /// Where a value of the stage being checked is written (`"epochs"`, `"cnn.widths[0]"`,
    /// `"inputs"`); a value left at its default points at its table.
    fn span(&self, path: &str) -> Range<usize>;
}

/// A parsed stage as a plan check sees it.
#[derive(Clone)]
pub struct PlanStage<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    /// Upstream stages named in `inputs`.
    pub inputs: Vec<&'a str>,
    pub stage: &'a dyn Stage,
    /// Where each value of its table is written.
    pub spans: &'a ValueSpans,
}

impl<'a> PlanStage<'a> {
    /// Its distinct input stages.
    pub fn distinct_inputs(&self) -> Vec<&'a str> {
        let mut names = self.inputs.clone();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// The kinds that read exactly one dataset ([`io::single_input`]) must name
/// exactly one input stage: found when the manifest loads rather than when the stage runs.
pub fn one_input_issue(plan: &dyn PlanView) -> Option<Issue> {
    let this = plan.this();
    let n = this.distinct_inputs().len();
    (n != 1).then(|| {
        Issue::new(
            plan.span("inputs"),
            format!("a `{}` stage reads one dataset, so it needs exactly one input stage; it has {n}", this.kind),
        )
        .help(format!("e.g. `inputs = [\"NAME\"]`, naming the stage whose dataset this `{}` stage reads", this.kind))
    })
}

/// An upstream stage's output, readable in place from the cache.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub digest: Digest,
    pub tree: Tree,
}

/// Everything a running stage may use.
pub struct StageContext<'a> {
    pub stage: &'a str,
    pub pipeline: &'a str,
    pub root: &'a Path,
    /// `outputs/<pipeline>/`: every finished artifact stage's view is at `<this>/<stage>/`.
    pub outputs_dir: &'a Path,
    pub seed: u64,
    /// Where an artifact stage writes its output; empty when the stage starts.
    pub out_dir: &'a Path,
    /// A directory that survives an interrupted run of this same stage key (checkpoints to
    /// resume from); removed once the stage's result is committed.
    pub scratch: &'a Path,
    /// Upstream artifacts, by stage name.
    pub inputs: &'a BTreeMap<String, Artifact>,
    pub cache: &'a Cache,
    pub reporter: &'a dyn Reporter,
    /// What the engine found at each dependency path (already hashed for the key).
    pub deps: &'a BTreeMap<String, Option<crate::cache::Scan>>,
    /// Blobs already in the cache that belong to this stage's artifact (see
    /// [`StageContext::attach_blob`]).
    pub attached: &'a std::sync::Mutex<Vec<crate::cache::TreeEntry>>,
}

impl StageContext<'_> {
    /// The engine's scan of a dependency path, as the manifest names it.
    pub fn dep_scan(&self, path: &str) -> Option<&crate::cache::Scan> {
        let key = crate::paths::normalize_dep(path).ok()?;
        self.deps.get(&key)?.as_ref()
    }

    /// Makes a blob already in the cache part of this stage's artifact at `path`, without
    /// copying it (a dataset's images, shared with the stage that stored them).
    pub fn attach_blob(&self, path: &str, digest: Digest, size: u64) {
        let entry = crate::cache::TreeEntry { path: path.to_string(), digest, size, executable: false };
        self.attached.lock().expect("attached entries").push(entry);
    }

    /// The cache file holding one file of an upstream artifact (`None` when the artifact
    /// has no such file), its content checked against its digest first.
    pub fn input_file(&self, artifact: &Artifact, path: &str) -> Result<Option<PathBuf>, StageError> {
        match artifact.tree.entries().iter().find(|e| e.path == path) {
            Some(e) => Ok(Some(self.cache.verified_blob_path(&e.digest)?)),
            None => Ok(None),
        }
    }
}

/// Why a stage failed. The engine reports it as the stage's failure (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("command {0}")]
    Exit(String),
    #[error("declared output `{0}` was not produced")]
    MissingOutput(String),
    #[error("dependency `{0}` does not exist")]
    MissingDep(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A path the stage would delete or write leads out of the workspace.
    #[error("refusing to touch {0}")]
    Escape(crate::workspace::Escape),
    /// Reading or writing a file failed.
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// What an input stage gave cannot be used (not the format this stage reads, an item
    /// it cannot take).
    #[error("input `{input}`: {why}")]
    Data { input: String, why: String },
    /// A setting that only shows as wrong when the stage runs (a device that is not there,
    /// inputs that do not hold what the stage needs).
    #[error("{0}")]
    Config(String),
    /// The run was interrupted (SIGINT/SIGTERM) while the stage ran.
    #[error("interrupted: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// For `map_err`: an I/O error on `path`.
    pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StageError {
        let path = path.to_path_buf();
        move |source| StageError::Io { action, path, source }
    }

    /// Bad data from input stage `input`.
    pub fn data(input: &str, why: impl Into<String>) -> StageError {
        StageError::Data { input: input.to_string(), why: why.into() }
    }
}

/// The stage kinds a manifest may use.
pub struct StageRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl StageRegistry {
    pub fn empty() -> Self {
        StageRegistry { kinds: BTreeMap::new() }
    }

    /// Adds a kind (library users can bring their own).
    pub fn register(&mut self, kind: Arc<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().copied()
    }

    pub fn names_list(&self) -> String {
        self.names().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    }
}
