//! Running a pipeline: decide, per stage, cached or run; run the ready ones in parallel;
//! commit each result atomically; record it in the lock file.
//!
//! The engine is split along its seams:
//!
//! - `schedule` keeps a ready set (stages whose selected upstream stages have all
//!   finished) and hands up to `--jobs` of them to worker threads; the main thread alone
//!   writes the lock file, after each success (coalesced), so an interrupted run keeps what
//!   finished. A failed stage skips its dependents; independent branches go on unless
//!   `--fail-fast`.
//! - `stage` runs one stage on a worker: it hashes the stage's dependencies and builds its
//!   [`CacheKey`](crate::cache::CacheKey) (one `prepare_key`, shared with the Slurm node's
//!   [`run_one`]), looks the key up in the local and remote caches (`store`), and either
//!   takes that result (restoring workspace outputs that were changed) or hands the stage
//!   to a `backend`: this process (`Local`) or a Slurm job (`Slurm`).
//! - `outputs` commits what a stage wrote (blobs, then tree, then stage entry), restores
//!   workspace outputs and keeps the views in `outputs/` current.
//!
//! Every command takes a [`Plan`], so the stage graph is built once. [`status()`] answers
//! without running anything, with a [`status::DirtyReason`] for every stage that would run.

mod backend;
pub mod inputs;
mod outputs;
mod schedule;
mod stage;
pub mod status;
mod store;

use std::sync::Arc;

use crate::Error;
use crate::cache::Cache;
use crate::cache::guard::RunGuard;
use crate::cache::lockfile::LockFile;
use crate::manifest::Manifest;
use crate::plan::Plan;
use crate::report::{Reporter, StageOutcome};
use crate::stats::WorkStats;
use crate::workspace::Confined;
use status::StageStatus;

pub use crate::manifest::Executor;
pub use crate::runs::RunSummary;
pub use stage::run_one;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stage names to run (with what they need); empty runs everything.
    pub targets: Vec<String>,
    /// Also run what depends on the targets.
    pub downstream: bool,
    /// Run the named targets (every stage, when none are named) even when cached; the
    /// stages they need still come from the cache.
    pub force: bool,
    pub jobs: usize,
    /// Stop starting stages after the first failure.
    pub fail_fast: bool,
    /// Wait for another process holding the cache instead of failing.
    pub wait: bool,
    /// Use `[cache.remote]` when the manifest has one (`--no-remote` turns it off).
    pub remote: bool,
    /// Where stages run.
    pub executor: Executor,
    /// Set by SIGINT/SIGTERM while Slurm jobs run: cancel them and stop.
    pub interrupted: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Record the run in the lock file. Off for `--set` experiments: the lock stays the
    /// record of the manifest as written, and the run record keeps the experiment.
    pub write_lock: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            targets: Vec::new(),
            downstream: false,
            force: false,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fail_fast: false,
            wait: true,
            write_lock: true,
            remote: true,
            executor: Executor::Local,
            interrupted: None,
        }
    }
}

/// Opens the cache for a command that may write to it, holding the run guard, and
/// removes what interrupted runs left in its `tmp/`.
pub fn open_cache(manifest: &Manifest, wait: bool, reporter: &dyn Reporter, stats: Arc<WorkStats>) -> Result<(RunGuard, Cache), Error> {
    let (guard, cache) = open_cache_keeping_tmp(manifest, wait, reporter, stats)?;
    let cleaned = cache.clean_tmp()?;
    if cleaned > 0 {
        tracing::info!("removed {cleaned} leftover(s) of an interrupted run from the cache");
    }
    Ok((guard, cache))
}

/// Opens the cache holding the run guard, leaving `tmp/` alone (`kiln status` changes
/// nothing but the file-state index). The directory is claimed as a kiln cache first, so
/// no lock file is ever written into a directory that is somebody else's.
fn open_cache_keeping_tmp(
    manifest: &Manifest,
    wait: bool,
    reporter: &dyn Reporter,
    stats: Arc<WorkStats>,
) -> Result<(RunGuard, Cache), Error> {
    crate::cache::claim_dir(&manifest.cache_dir)?;
    let guard = RunGuard::acquire(&manifest.cache_dir, wait, |msg| reporter.warn(msg))?;
    let cache = Cache::open(&manifest.cache_dir, stats)?;
    Ok((guard, cache))
}

/// `kiln status`.
pub fn status(
    plan: &Plan,
    targets: &[String],
    downstream: bool,
    wait: bool,
    reporter: &dyn Reporter,
    stats: Arc<WorkStats>,
) -> Result<Vec<StageStatus>, Error> {
    let manifest = plan.manifest();
    let selected = plan.select(targets, downstream)?;
    let (_guard, cache) = open_cache_keeping_tmp(manifest, wait, reporter, stats)?;
    let lock = LockFile::read(&manifest.lock_path())?;
    let result = status::compute(plan, &selected, &cache, &lock, reporter)?;
    cache.state().flush()?;
    Ok(result)
}

/// `kiln run`.
pub fn run(plan: &Plan, opts: &RunOptions, reporter: &dyn Reporter, stats: Arc<WorkStats>) -> Result<RunSummary, Error> {
    let (manifest, graph) = (plan.manifest(), plan.graph());
    let targets = plan.resolve_targets(&opts.targets)?;
    let selected = graph.select(&targets, opts.downstream);
    // Workspace first, then cache: every run takes them in this order.
    let _workspace = RunGuard::acquire_workspace(&manifest.root, opts.wait, |msg| reporter.warn(msg))?;
    let (_guard, cache) = open_cache(manifest, opts.wait, reporter, stats.clone())?;
    let workspace = Confined::new(&manifest.root, "the workspace");
    let lock_path = manifest.lock_path();
    let previous = LockFile::read(&lock_path)?;
    let mut lock = previous.clone();
    lock.stages.retain(|name, _| manifest.stage(name).is_some());

    let forced: Vec<bool> = (0..manifest.stages.len()).map(|i| opts.force && (targets.is_empty() || targets.contains(&i))).collect();
    let remote = store::open_remote(manifest.remote.as_ref().filter(|_| opts.remote), reporter);
    let executor = if opts.executor == Executor::Local { manifest.executor } else { opts.executor };
    let backend: &dyn backend::Backend = match executor {
        Executor::Local => &backend::Local,
        Executor::Slurm => &backend::Slurm,
    };
    let engine = stage::Engine {
        manifest,
        workspace: &workspace,
        results: store::Results { cache: &cache, remote: remote.as_ref(), reporter },
        previous: &previous,
        reporter,
        forced,
        backend,
        interrupted: opts.interrupted.as_deref(),
    };
    let mut lock_writer = schedule::LockWriter::new(opts.write_lock.then_some(lock_path.as_path()));
    let outcome = schedule::run_ready_set(&engine, graph, &selected, opts, &mut lock, &mut lock_writer, &stats)?;

    let mut stages = Vec::new();
    for &i in graph.order() {
        if selected[i] {
            let o = outcome[i].clone().unwrap_or(StageOutcome::Cancelled);
            if outcome[i].is_none() {
                reporter.stage_finished(&manifest.stages[i].name, &o);
            }
            stages.push((manifest.stages[i].name.clone(), o));
        }
    }
    // A run that covered the whole pipeline also drops lock entries of deleted stages.
    // Also drops lock entries of stages the manifest no longer has.
    lock_writer.pending |= lock != previous;
    lock_writer.flush(&lock)?;
    if let Some(r) = &remote {
        store::report_transfers(r, reporter);
    }
    outputs::prune_outputs(manifest, &workspace)?;
    cache.state().flush()?;
    Ok(RunSummary { stages, lock })
}
