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

pub mod clean;
pub mod collect;
pub mod command;
pub mod convert;
pub mod eval;
pub mod label;
pub mod preprocess;
pub mod train;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;
use toml::de::DeValue;

use crate::cache::{Cache, CacheError, Tree};
use crate::digest::Digest;
use crate::manifest::Issue;
use crate::report::Reporter;

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

/// A workspace path a stage writes.
#[derive(Debug, Clone)]
pub struct Out {
    pub path: String,
    pub span: Range<usize>,
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
    /// runs (a pretrained model against the preprocessing that feeds it). Returns problems.
    fn check_plan(&self, _plan: &dyn PlanView) -> Vec<String> {
        Vec::new()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError>;
}

/// What [`Stage::check_plan`] may see of the rest of the pipeline.
pub trait PlanView {
    /// The nearest upstream stage of `kind` (following `inputs`): its name and parameters.
    fn ancestor(&self, kind: &str) -> Option<(String, serde_json::Value)>;
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
        let key = crate::manifest::normalize_dep(path).ok()?;
        self.deps.get(&key)?.as_ref()
    }

    /// Makes a blob already in the cache part of this stage's artifact at `path`, without
    /// copying it (a dataset's images, shared with the stage that stored them).
    pub fn attach_blob(&self, path: &str, digest: Digest, size: u64) {
        let entry = crate::cache::TreeEntry { path: path.to_string(), digest, size, executable: false };
        self.attached.lock().expect("attached entries").push(entry);
    }

    /// The cache file holding one file of an upstream artifact.
    pub fn input_file(&self, artifact: &Artifact, path: &str) -> Option<PathBuf> {
        artifact.tree.entries().iter().find(|e| e.path == path).map(|e| self.cache.blob_path(&e.digest))
    }
}

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
    #[error("{0}")]
    Failed(String),
}

/// The stage kinds a manifest may use.
pub struct StageRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl StageRegistry {
    pub fn empty() -> Self {
        StageRegistry { kinds: BTreeMap::new() }
    }

    /// Every kind kiln ships.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(Arc::new(command::CommandKind));
        r.register(Arc::new(collect::CollectKind));
        r.register(Arc::new(clean::CleanKind));
        r.register(Arc::new(label::LabelKind));
        r.register(Arc::new(preprocess::PreprocessKind));
        r.register(Arc::new(convert::ConvertKind));
        r.register(Arc::new(train::TrainKind));
        r.register(Arc::new(eval::EvalKind));
        r
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

impl Default for StageRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}
