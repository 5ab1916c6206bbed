//! kiln turns a TOML manifest into a reproducible, incremental pipeline.
//!
//! # A tour
//!
//! A command goes through these phases, each owned by one module:
//!
//! 1. **[`manifest`]** reads `pipelines/NAME.toml` into a validated [`manifest::Manifest`]:
//!    spanned TOML → `${params.…}` interpolation → per-kind typed stage configs
//!    ([`stages`]) → cross-stage checks. Every problem carries file:line:column.
//! 2. **[`graph`]** builds the stage DAG (explicit `inputs` plus implicit edges where a
//!    `deps` path overlaps another stage's `outs`), rejects cycles and overlapping
//!    outputs, orders it, and selects the part a command asks for.
//! 3. **[`exec`]** decides per stage: its [`cache::CacheKey`] is built from its kind,
//!    version, resolved params, seed, dependency digests and upstream output digests; a key
//!    in the cache means *cached*, anything else runs. Ready stages run in parallel;
//!    [`exec::status()`] explains every miss as a [`exec::status::DirtyReason`].
//! 4. **[`cache`]** stores results by content: blobs, Merkle trees, stage entries, the
//!    file-state index and the item memo store, and the lock file that goes into git.
//! 5. **[`cli`]** is the command line: it renders progress and results, nothing else.
//!
//! Around them: [`cache::remote`] shares the cache through S3-compatible storage, and
//! [`slurm`] runs stages as Slurm jobs; [`runs`] records every run, [`compare`] diffs two of
//! them (or two git revisions of the lock), [`html_report`] renders one as a page;
//! [`predict`] and [`serve`] use a trained model with its training-time preprocessing.
//!
//! The built-in data stages (collect, clean, preprocess, label, convert in [`stages`]) pass
//! **[`dataset`]** artifacts: `items.jsonl` plus image blobs shared by digest. Their pixel
//! work lives in **[`imaging`]** (decoding under limits, measures, perceptual hashes,
//! transforms, augmentation), their per-image results in the memo store, and every random
//! draw comes from **[`rng`]**, kiln's own seeded generator, so the same seed gives the same
//! bytes on every machine and every dependency version.
//!
//! # Files on disk
//!
//! | path                               | owner                   |
//! |------------------------------------|-------------------------|
//! | `pipelines/NAME.toml`              | the user ([`manifest`]) |
//! | `pipelines/NAME.lock`              | [`cache::lockfile`]     |
//! | `cache/blobs`, `trees`, `stages`   | [`cache`]               |
//! | `cache/state.redb`                 | [`cache::state`]        |
//! | `cache/run.lock`                   | [`cache::guard`]        |
//! | `cache/runs/rN.json`               | [`runs`] (run records)  |
//! | `outputs/NAME/STAGE/`              | [`exec`] (views into the cache) |
//! | `…/items.jsonl`, `…/dataset.json`  | [`dataset`]             |

pub mod cache;
pub mod cli;
pub mod compare;
pub mod dataset;
pub mod digest;
pub mod exec;
pub mod graph;
pub mod html_report;
pub mod imaging;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod predict;
pub mod report;
pub mod rng;
pub mod runs;
pub mod serve;
pub mod slurm;
pub mod stages;
pub mod stats;
pub mod workspace;

use std::path::PathBuf;

pub use digest::Digest;

/// Documented exit codes of the `kiln` binary.
pub mod exit {
    /// Everything asked for succeeded.
    pub const OK: i32 = 0;
    /// A stage failed, or an I/O or cache error stopped the command.
    pub const FAILURE: i32 = 1;
    /// The manifest or the command line is invalid: nothing was run.
    pub const USAGE: i32 = 2;
    /// The cache is in use by another kiln process and `--no-wait` was given.
    pub const BUSY: i32 = 3;
    /// `kiln verify` found (and removed) corrupt cache objects.
    pub const CORRUPT: i32 = 4;
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum Error {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Manifest(Box<manifest::ManifestError>),

    #[error("cannot {action} `{}`: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },

    #[error("no stage `{stage}` in `{}`", manifest.display())]
    #[diagnostic(help("stages are: {known}"))]
    UnknownStage { stage: String, manifest: PathBuf, known: String },

    #[error("no manifest given and none found in `{}`", dir.display())]
    #[diagnostic(help("pass the manifest path, e.g. `kiln run pipelines/quickstart.toml`, or create `kiln.toml`"))]
    NoManifest { dir: PathBuf },

    #[error(transparent)]
    Cache(#[from] cache::CacheError),

    #[error(transparent)]
    Guard(#[from] cache::guard::GuardError),

    #[error(transparent)]
    LockFile(#[from] cache::lockfile::LockFileError),

    #[error(transparent)]
    Runs(#[from] runs::RunsError),

    /// A command-line value kiln cannot use (the message names it and says what it expects).
    #[error("{0}")]
    Usage(String),

    #[error("cannot read `{path}` at git revision `{rev}`: {message}")]
    Git { rev: String, path: String, message: String },

    #[error("{failed} stage{} failed", if *failed == 1 { "" } else { "s" })]
    StagesFailed { failed: usize },

    #[error("the cache had {problems} problem{}; the affected entries were removed and will be recomputed", if *problems == 1 { "" } else { "s" })]
    Corrupt { problems: usize },
}

impl From<cache::StateError> for Error {
    fn from(e: cache::StateError) -> Self {
        Error::Cache(e.into())
    }
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Manifest(_) | Error::UnknownStage { .. } | Error::NoManifest { .. } | Error::Usage(_) => exit::USAGE,
            Error::Runs(runs::RunsError::Unknown { .. }) | Error::Git { .. } => exit::USAGE,
            Error::LockFile(cache::lockfile::LockFileError::Parse { .. }) => exit::USAGE,
            Error::Guard(cache::guard::GuardError::Busy { .. }) => exit::BUSY,
            Error::Corrupt { .. } => exit::CORRUPT,
            _ => exit::FAILURE,
        }
    }
}
