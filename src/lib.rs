//! kiln turns a TOML manifest into a reproducible, incremental pipeline.
//!
//! # A tour
//!
//! A command goes through these phases, each owned by one module:
//!
//! 1. **[`manifest`]** reads `pipelines/NAME.toml` into a [`manifest::Manifest`]: spanned
//!    TOML → `${params.…}` interpolation → per-kind typed stage configs ([`stages`]) →
//!    cross-stage checks. Every problem carries file:line:column ([`diagnostic`]).
//! 2. **[`plan`]** turns it into a [`plan::Plan`], once per command: the **[`graph`]** of
//!    stages (explicit `inputs` plus implicit edges where a `deps` path overlaps another
//!    stage's `outs`; cycles and overlapping outputs are rejected), then each stage checked
//!    against the stages upstream. Every command takes a plan.
//! 3. **[`exec`]** decides per stage: its [`cache::CacheKey`] is built from its kind,
//!    version, resolved params, seed, dependency digests and upstream output digests; a key
//!    in the cache (or the remote) means *cached*, anything else runs, here or as a Slurm job
//!    ([`slurm`]). Ready stages run in parallel; [`exec::status()`] explains every miss as
//!    an [`exec::status::DirtyReason`].
//! 4. **[`cache`]** stores results by content: blobs, Merkle trees, stage entries, the
//!    file-state index and the item memo store, and the lock file that goes into git;
//!    [`cache::remote`] shares it through S3-compatible storage.
//! 5. **[`cli`]** is the command line: it renders progress and results, nothing else.
//!
//! Around them: [`runs`] records every run, [`compare`] diffs two of them (or two git
//! revisions of the lock), [`html_report`] renders one as a page; [`predict`] and [`serve`]
//! use a trained model with its training-time preprocessing.
//!
//! The built-in stage kinds (collect, clean, label, preprocess, convert, train, eval,
//! label_issues and command, each a module of [`stages`]) never use each other: what they pass on is a
//! format of **[`formats`]** — a dataset (`items.jsonl` plus image blobs shared by digest),
//! its preprocessing, the tensor shards — that every kind reads and none owns, read and
//! written from a running stage through [`stages::io`]. Their pixel work lives in
//! **[`imaging`]** (decoding under limits, measures, perceptual hashes, transforms,
//! augmentation), training in **[`nn`]**, per-image results in the memo store, and every
//! random draw comes from **[`rng`]**, kiln's own seeded generator, so the same seed gives
//! the same bytes on every machine and every dependency version.
//!
//! # Layers
//!
//! Every module uses only modules below it (several on a line use none of each other, but
//! for the arrows); the `layering` test fails `cargo test` on an import cycle, and on a
//! stage kind that uses another kind.
//!
//! ```text
//! cli                                     parse, render, map errors to exit codes
//! exec → slurm · serve → predict · init   running a plan (schedule, stage, outputs, backends); using a model; `kiln init`
//! plan                                    manifest + graph, built once per command
//! Error (lib.rs) · compare · html_report
//! graph · runs
//! manifest                                TOML → stage declarations; settings (executor, resources)
//! stages::builtin                         the registry: the one module that names every kind
//! stages::{collect, clean, label, …}      one module per kind: formats, never another kind
//! stages::{io, upstream, training}        formats from a running stage; what the plan knows upstream; training
//! stages                                  the contract: StageKind, Stage, StageContext, StageError
//! formats · model                         dataset, preprocessing and shard formats; the model card
//! nn · workspace                          training; where kiln may write
//! cache · imaging                         content-addressed storage; pixels
//! diagnostic · paths · digest · rng · report · stats · metrics
//! ```
//!
//! # Files on disk
//!
//! | path                               | owner                   |
//! |------------------------------------|-------------------------|
//! | `pipelines/NAME.toml`              | the user ([`manifest`]) |
//! | `pipelines/NAME.lock`              | [`cache::lockfile`]     |
//! | `cache/blobs`, `trees`, `stages`   | [`cache`]               |
//! | `cache/state.redb`                 | [`cache::state`] (open, rebuild), [`cache::index`], [`cache::memo`] |
//! | `cache/run.lock`                   | [`cache::guard`]        |
//! | `cache/CACHEDIR.TAG`               | [`cache::claim_dir`]: only a tagged (or new, empty) directory is used as a cache |
//! | `outputs/.kiln-run.lock`           | [`cache::guard`]: one run per workspace |
//! | `cache/runs/rN.json`               | [`runs`] (run records)  |
//! | `outputs/NAME/STAGE/`              | [`exec`] (views into the cache) |
//! | `…/items.jsonl`, `…/dataset.json`  | [`formats::dataset`]    |

pub mod cache;
pub mod cli;
pub mod compare;
pub mod diagnostic;
pub mod digest;
pub mod exec;
pub mod formats;
pub mod graph;
pub mod html_report;
pub mod imaging;
pub mod init;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod paths;
pub mod plan;
pub mod predict;
pub mod report;
pub mod rng;
pub mod runs;
pub mod serve;
pub mod slurm;
pub mod stages;
pub mod stats;
pub mod task;
pub mod workspace;

#[cfg(test)]
mod layering;

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
    Manifest(Box<diagnostic::ManifestError>),

    #[error("cannot {action} `{}`: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },

    #[error("no stage `{stage}` in `{}`", manifest.display())]
    #[diagnostic(help("stages are: {known}"))]
    UnknownStage { stage: String, manifest: PathBuf, known: String },

    #[error("no manifest given and none found in `{}`", dir.display())]
    #[diagnostic(help("pass the manifest path, e.g. `kiln run pipelines/quickstart.toml`, or create `kiln.toml`"))]
    NoManifest { dir: PathBuf },

    #[error("no manifest given, and there are several in `{}`: {list}", dir.display())]
    #[diagnostic(help(
        "name the one to use, e.g. `kiln run {example}`; with no FILE kiln reads `kiln.toml`, else the only manifest in `pipelines/`"
    ))]
    SeveralManifests { dir: PathBuf, list: String, example: String },

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

    /// The one stage a command ran failed (a Slurm job's `kiln __run-stage`).
    #[error("stage `{stage}` failed: {source}")]
    Stage { stage: String, source: stages::StageError },

    /// Something the command needed failed, with the message saying what (a remote that
    /// cannot be reached, signals that cannot be handled).
    #[error("{0}")]
    Failed(String),

    #[error("the cache had {problems} problem{}; the affected entries were removed and will be recomputed", if *problems == 1 { "" } else { "s" })]
    Corrupt { problems: usize },
}

impl From<cache::StateError> for Error {
    fn from(e: cache::StateError) -> Self {
        Error::Cache(e.into())
    }
}

impl Error {
    /// The README's table: 2 for what the user got wrong before anything ran (the manifest,
    /// a command-line value, a stage or run or revision that does not exist), 3 for a busy
    /// cache, 4 for corruption `kiln verify` found, and 1 for everything that failed while
    /// working (a stage, I/O, the cache, a remote).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Manifest(_) | Error::UnknownStage { .. } | Error::NoManifest { .. } | Error::Usage(_) => exit::USAGE,
            Error::SeveralManifests { .. } => exit::USAGE,
            Error::Runs(runs::RunsError::Unknown { .. }) | Error::Git { .. } => exit::USAGE,
            Error::LockFile(cache::lockfile::LockFileError::Parse { .. }) => exit::USAGE,
            Error::Guard(cache::guard::GuardError::Busy { .. }) => exit::BUSY,
            Error::Corrupt { .. } => exit::CORRUPT,
            _ => exit::FAILURE,
        }
    }
}
