//! Running a pipeline: decide, per stage, cached or run; run the ready ones in parallel;
//! commit each result atomically; record it in the lock file.
//!
//! The scheduler keeps a ready set (stages whose selected upstream stages have all
//! finished) and hands up to `--jobs` of them to worker threads. A worker hashes the
//! stage's dependencies, builds its [`CacheKey`](crate::cache::CacheKey), and either takes
//! the result from the cache (restoring workspace outputs if they were changed) or runs
//! the stage and commits its outputs: blobs, then tree, then stage entry. The main thread
//! alone writes the lock file, after each success, so an interrupted run keeps what
//! finished. A failed stage skips its dependents; independent branches go on unless
//! `--fail-fast`.

pub mod inputs;
pub mod status;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::Error;
use crate::cache::guard::RunGuard;
use crate::cache::lockfile::{LockFile, LockedStage};
use crate::cache::{Cache, CacheError, Ingest, StageEntry, StateError, Tree, remove_path};
use crate::digest::Digest;
use crate::graph::Graph;
use crate::manifest::Manifest;
use crate::report::{Reporter, StageOutcome};
use crate::stages::{Artifact, StageContext, StageError};
use crate::stats::WorkStats;
use crate::workspace::Confined;
use inputs::{dep_path, hash_deps, make_key, tree_path};
use status::{Current, DirtyReason, StageStatus};

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
    pub interrupted: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
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

/// Where stages run: this process's threads, or Slurm jobs (`sbatch`) that run kiln on a
/// node for one stage each, with the workspace and cache on a shared filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    #[default]
    Local,
    Slurm,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Every selected stage in run order.
    pub stages: Vec<(String, StageOutcome)>,
    /// The lock file as this run leaves it (also when it was not written).
    pub lock: LockFile,
}

impl RunSummary {
    pub fn failed(&self) -> usize {
        self.stages.iter().filter(|(_, o)| matches!(o, StageOutcome::Failed { .. })).count()
    }
}

/// What a worker hands back for a stage that succeeded.
struct Done {
    outcome: StageOutcome,
    artifact: Digest,
    locked: LockedStage,
}

struct Shared<'a> {
    manifest: &'a Manifest,
    /// Where stages may delete, write and restore.
    workspace: &'a Confined,
    cache: &'a Cache,
    previous: &'a LockFile,
    reporter: &'a dyn Reporter,
    /// Per stage: run it even if cached.
    forced: Vec<bool>,
    remote: Option<&'a crate::cache::remote::Remote>,
    executor: Executor,
    interrupted: Option<&'a std::sync::atomic::AtomicBool>,
}

/// The stage indices named by `targets`, or an error naming the unknown one.
pub fn resolve_targets(manifest: &Manifest, targets: &[String]) -> Result<Vec<usize>, Error> {
    targets
        .iter()
        .map(|t| {
            manifest.stages.binary_search_by(|s| s.name.as_str().cmp(t)).map_err(|_| Error::UnknownStage {
                stage: t.clone(),
                manifest: manifest.path.clone(),
                known: manifest.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>().join(", "),
            })
        })
        .collect()
}

/// Opens the cache for a command that may write to it, holding the run guard, and
/// removes what interrupted runs left in its `tmp/`.
pub fn open_cache(
    manifest: &Manifest,
    wait: bool,
    reporter: &dyn Reporter,
    stats: std::sync::Arc<WorkStats>,
) -> Result<(RunGuard, Cache), Error> {
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
    stats: std::sync::Arc<WorkStats>,
) -> Result<(RunGuard, Cache), Error> {
    crate::cache::claim_dir(&manifest.cache_dir)?;
    let guard = RunGuard::acquire(&manifest.cache_dir, wait, |msg| reporter.warn(msg))?;
    let cache = Cache::open(&manifest.cache_dir, stats)?;
    Ok((guard, cache))
}

/// `kiln status`.
pub fn status(
    manifest: &Manifest,
    targets: &[String],
    downstream: bool,
    wait: bool,
    reporter: &dyn Reporter,
    stats: std::sync::Arc<WorkStats>,
) -> Result<Vec<StageStatus>, Error> {
    let graph = Graph::build(manifest).map_err(|issues| manifest_error(manifest, issues))?;
    let selected = graph.select(&resolve_targets(manifest, targets)?, downstream);
    let (_guard, cache) = open_cache_keeping_tmp(manifest, wait, reporter, stats)?;
    let lock = LockFile::read(&manifest.lock_path())?;
    let result = status::compute(manifest, &graph, &selected, &cache, &lock, reporter)?;
    cache.state().flush()?;
    Ok(result)
}

pub(crate) fn manifest_error(manifest: &Manifest, issues: Vec<crate::manifest::Issue>) -> Error {
    Error::Manifest(Box::new(crate::manifest::ManifestError::new(&manifest.path, &manifest.source, issues)))
}

/// `kiln run`.
pub fn run(manifest: &Manifest, opts: &RunOptions, reporter: &dyn Reporter, stats: std::sync::Arc<WorkStats>) -> Result<RunSummary, Error> {
    let graph = Graph::build(manifest).map_err(|issues| manifest_error(manifest, issues))?;
    let selected = graph.select(&resolve_targets(manifest, &opts.targets)?, opts.downstream);
    // Workspace first, then cache: every run takes them in this order.
    let _workspace = RunGuard::acquire_workspace(&manifest.root, opts.wait, |msg| reporter.warn(msg))?;
    let (_guard, cache) = open_cache(manifest, opts.wait, reporter, stats.clone())?;
    let workspace = Confined::new(&manifest.root, "the workspace");
    let lock_path = manifest.lock_path();
    let previous = LockFile::read(&lock_path)?;
    let mut lock = previous.clone();
    lock.stages.retain(|name, _| manifest.stage(name).is_some());

    let n = manifest.stages.len();
    let position: Vec<usize> = {
        let mut p = vec![0; n];
        for (pos, &i) in graph.order().iter().enumerate() {
            p[i] = pos;
        }
        p
    };
    let mut outcome: Vec<Option<StageOutcome>> = vec![None; n];
    let mut artifact: Vec<Option<Digest>> = vec![None; n];
    let mut keys: Vec<Option<Digest>> = vec![None; n];
    let mut waiting: Vec<usize> = (0..n).map(|i| graph.upstream(i).iter().filter(|&&j| selected[j]).count()).collect();
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> =
        (0..n).filter(|&i| selected[i] && waiting[i] == 0).map(|i| Reverse((position[i], i))).collect();
    let targets = resolve_targets(manifest, &opts.targets)?;
    let forced: Vec<bool> = (0..manifest.stages.len()).map(|i| opts.force && (targets.is_empty() || targets.contains(&i))).collect();
    let remote = match (&manifest.remote, opts.remote) {
        (Some(config), true) => match crate::cache::remote::Remote::open(config) {
            Ok(r) => Some(r),
            Err(e) => {
                reporter.warn(&format!("{e}; continuing with the local cache only"));
                None
            }
        },
        _ => None,
    };
    let executor = if opts.executor == Executor::Local { manifest.executor } else { opts.executor };
    let shared = Shared {
        manifest,
        workspace: &workspace,
        cache: &cache,
        previous: &previous,
        reporter,
        forced,
        remote: remote.as_ref(),
        executor,
        interrupted: opts.interrupted.as_deref(),
    };
    let mut fatal: Option<Error> = None;
    let mut lock_writer = LockWriter { path: opts.write_lock.then_some(lock_path.as_path()), last: None, pending: false };

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<Done, StageError>)>();
        let mut running = 0usize;
        let mut stop = false;
        loop {
            while !stop && running < opts.jobs.max(1) {
                let Some(Reverse((_, i))) = ready.pop() else { break };
                let decl = &manifest.stages[i];
                if let Some(&bad) = graph.upstream(i).iter().find(|&&j| !outcome[j].as_ref().is_some_and(StageOutcome::is_success)) {
                    let o = StageOutcome::Skipped { upstream: manifest.stages[bad].name.clone() };
                    reporter.stage_finished(&decl.name, &o);
                    outcome[i] = Some(o);
                    release(i, &graph, &selected, &mut waiting, &mut ready, &position);
                    continue;
                }
                let mut upstream_keys = BTreeMap::new();
                let upstream: BTreeMap<String, Digest> = decl
                    .inputs
                    .iter()
                    .map(|name| {
                        let j = manifest.stages.binary_search_by(|s| s.name.as_str().cmp(name.get_ref())).expect("inputs were validated");
                        upstream_keys.insert(name.get_ref().clone(), keys[j].expect("upstream finished"));
                        (name.get_ref().clone(), artifact[j].expect("upstream finished"))
                    })
                    .collect();
                reporter.stage_started(&decl.name);
                running += 1;
                let tx = tx.clone();
                let shared = &shared;
                scope.spawn(move || {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| execute(shared, i, upstream, &upstream_keys)))
                        .unwrap_or_else(|panic| {
                            Err(StageError::Failed(format!("kiln bug: the stage panicked: {}", panic_message(&panic))))
                        });
                    let _ = tx.send((i, result));
                });
            }
            if running == 0 {
                break;
            }
            let received = match lock_writer.due_in() {
                Some(wait) => rx.recv_timeout(wait),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            let (i, result) = match received {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = lock_writer.flush(&lock) {
                        fatal.get_or_insert(e);
                        stop = true;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the scheduler holds a sender"),
            };
            running -= 1;
            let name = &manifest.stages[i].name;
            let o = match result {
                Ok(done) => {
                    artifact[i] = Some(done.artifact);
                    keys[i] = Some(done.locked.key);
                    if lock.stages.get(name) != Some(&done.locked) {
                        lock.stages.insert(name.clone(), done.locked);
                        if let Err(e) = lock_writer.changed(&lock) {
                            fatal.get_or_insert(e);
                            stop = true;
                        }
                    }
                    done.outcome
                }
                Err(e) => {
                    stop |= opts.fail_fast || shared.interrupted.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
                    StageOutcome::Failed { reason: e.to_string() }
                }
            };
            match &o {
                StageOutcome::Ran { .. } => WorkStats::add(&stats.stages_run, 1),
                StageOutcome::Cached { .. } => WorkStats::add(&stats.stages_cached, 1),
                _ => {}
            }
            reporter.stage_finished(name, &o);
            outcome[i] = Some(o);
            release(i, &graph, &selected, &mut waiting, &mut ready, &position);
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }

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
        let t = &r.transfers;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        reporter.summary(
            "remote",
            &[format!(
                "{}: downloaded {} objects ({:.1} MB), uploaded {} objects ({:.1} MB){}",
                r.url(),
                load(&t.downloaded_objects),
                load(&t.downloaded_bytes) as f64 / 1e6,
                load(&t.uploaded_objects),
                load(&t.uploaded_bytes) as f64 / 1e6,
                if r.is_online() { "" } else { "; unreachable, so the run used the local cache only" }
            )],
        );
    }
    prune_outputs(manifest, &workspace)?;
    cache.state().flush()?;
    Ok(RunSummary { stages, lock })
}

/// Lock writes coalesce: a 1000-stage pipeline would otherwise rewrite a 1000-entry file
/// after each stage. The cache, not the lock, is what makes a finished stage `cached` on the
/// next run, so an interruption loses at most [`LOCK_WRITE_INTERVAL`] of lock records, and
/// nothing in the cache.
const LOCK_WRITE_INTERVAL: Duration = Duration::from_millis(100);

struct LockWriter<'a> {
    /// `None`: keep the lock in memory only.
    path: Option<&'a std::path::Path>,
    last: Option<Instant>,
    pending: bool,
}

impl LockWriter<'_> {
    fn changed(&mut self, lock: &LockFile) -> Result<(), Error> {
        self.pending = true;
        if self.last.is_none_or(|t| t.elapsed() >= LOCK_WRITE_INTERVAL) { self.flush(lock) } else { Ok(()) }
    }

    fn flush(&mut self, lock: &LockFile) -> Result<(), Error> {
        if self.pending {
            if let Some(path) = self.path {
                lock.write(path)?;
            }
            self.pending = false;
            self.last = Some(Instant::now());
        }
        Ok(())
    }

    /// How long until a pending write is due, if one is pending.
    fn due_in(&self) -> Option<Duration> {
        self.pending.then(|| self.last.map_or(Duration::ZERO, |t| LOCK_WRITE_INTERVAL.saturating_sub(t.elapsed())))
    }
}

fn release(
    i: usize,
    graph: &Graph,
    selected: &[bool],
    waiting: &mut [usize],
    ready: &mut BinaryHeap<Reverse<(usize, usize)>>,
    position: &[usize],
) {
    for &d in graph.downstream(i) {
        if selected[d] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(Reverse((position[d], d)));
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// One stage, on a worker thread: cached or run, then committed and shown.
fn execute(
    cx: &Shared<'_>,
    i: usize,
    upstream: BTreeMap<String, Digest>,
    upstream_keys: &BTreeMap<String, Digest>,
) -> Result<Done, StageError> {
    let manifest = cx.manifest;
    let decl = &manifest.stages[i];
    let cache = cx.cache;
    let dep_trees = hash_deps(manifest, decl, cache, cx.reporter).map_err(CacheError::from)?;
    let mut deps = BTreeMap::new();
    for (path, scan) in &dep_trees {
        let scan = scan.as_ref().ok_or_else(|| StageError::MissingDep(path.clone()))?;
        // Kept so that `status` can later say which files of this dependency changed.
        deps.insert(path.clone(), cache.put_tree(&scan.tree)?);
    }
    let key = make_key(manifest, decl, deps, upstream.clone());
    let digest = key.digest();

    let force = cx.forced[i];
    if !force && let Some((entry, pulled)) = lookup(cx, &digest)? {
        let shown = restore_outputs(cx, &entry).and_then(|restored| show_artifact(cx, i, &entry.artifact).map(|()| restored));
        match shown {
            Ok(restored) => {
                return Ok(Done {
                    outcome: StageOutcome::Cached { restored, pulled },
                    artifact: entry.artifact,
                    locked: locked_stage(cache, &key, entry.artifact, entry.outs)?,
                });
            }
            // A result whose files are gone or damaged is no result: compute it again.
            Err(StageError::Cache(e @ (CacheError::MissingBlob { .. } | CacheError::CorruptBlob { .. }))) => {
                cx.reporter.warn(&format!("stage `{}`: the cached result is incomplete ({e}); running the stage again", decl.name));
                cache.remove_entry(&digest)?;
            }
            Err(e) => return Err(e),
        }
    }

    if tracing::enabled!(tracing::Level::INFO) {
        let reasons = if force {
            vec![DirtyReason::Forced]
        } else {
            let upstream_now = upstream.iter().map(|(k, v)| (k.clone(), Some(*v))).collect();
            let now = Current {
                kind: &decl.kind,
                implementation: decl.kind_version,
                params: &key.params,
                uses: &key.uses,
                seed: key.seed,
                deps: &dep_trees,
                upstream: &upstream_now,
                outs: key.outs.clone(),
            };
            status::explain(cx.previous.stages.get(&decl.name), &now, cache)
        };
        for r in &reasons {
            tracing::info!(stage = %decl.name, "running: {r}");
        }
    }

    let started = Instant::now();
    let entry = match cx.executor {
        Executor::Local => match run_and_commit(manifest, cx.workspace, decl, cache, cx.reporter, &key, &dep_trees, &upstream) {
            Ok(entry) => entry,
            Err(e) => return Err(forget_damaged_inputs(cx, &upstream, upstream_keys, e)),
        },
        Executor::Slurm => {
            crate::slurm::run_stage(manifest, decl, &digest, &upstream, cx.reporter, cx.interrupted)?;
            // The job committed the result into the shared cache, or uploaded it to the
            // remote when the node shares no filesystem with us.
            match lookup(cx, &digest)? {
                Some((entry, _)) => entry,
                None => return Err(StageError::Failed(format!("the Slurm job for `{}` ended without a result in the cache", decl.name))),
            }
        }
    };
    if let Some(remote) = cx.remote {
        remote.push(cache, &entry, &|m: &str| cx.reporter.warn(m));
    }
    let (artifact, outs) = (entry.artifact, entry.outs.clone());
    show_artifact(cx, i, &artifact)?;
    Ok(Done { outcome: StageOutcome::ran(started.elapsed()), artifact, locked: locked_stage(cache, &key, artifact, outs)? })
}

/// A stage that failed may have failed on an upstream blob that is gone or was found
/// corrupt (and removed) as it was read. Such an upstream result can no longer be used:
/// its entry is removed, so the next run computes it again instead of failing the same
/// way, and the failure says so.
fn forget_damaged_inputs(
    cx: &Shared<'_>,
    upstream: &BTreeMap<String, Digest>,
    upstream_keys: &BTreeMap<String, Digest>,
    error: StageError,
) -> StageError {
    let mut forgotten = Vec::new();
    for (name, artifact) in upstream {
        let damaged = match cx.cache.get_tree(artifact) {
            Ok(Some(tree)) => tree.entries().par_iter().any(|e| !cx.cache.has_blob(&e.digest)),
            Ok(None) | Err(_) => true,
        };
        if damaged
            && let Some(key) = upstream_keys.get(name)
            && cx.cache.remove_entry(key).is_ok()
        {
            forgotten.push(format!("`{name}`"));
        }
    }
    if forgotten.is_empty() {
        return error;
    }
    StageError::Failed(format!(
        "{error}\n(the cached result of {} lost files in the cache; it was removed and the next run computes it again)",
        forgotten.join(", ")
    ))
}

/// A complete result for `key`: from the local cache, else from the remote (`true`).
fn lookup(cx: &Shared<'_>, key: &Digest) -> Result<Option<(StageEntry, bool)>, StageError> {
    if let Some(entry) = cx.cache.get_entry(key)?
        && cx.cache.entry_is_complete(&entry)?
    {
        return Ok(Some((entry, false)));
    }
    Ok(match cx.remote.map(|r| r.fetch(cx.cache, key, &|m: &str| cx.reporter.warn(m))) {
        Some(crate::cache::remote::Fetched::Entry(entry)) => Some((*entry, true)),
        _ => None,
    })
}

/// Runs one stage in this process and commits its result: blobs, then tree, then entry.
/// The local executor calls it for every stage; a Slurm job calls it (through
/// [`run_one`]) for the one stage it was given.
#[allow(clippy::too_many_arguments)]
fn run_and_commit(
    manifest: &Manifest,
    workspace: &Confined,
    decl: &crate::manifest::StageDecl,
    cache: &Cache,
    reporter: &dyn Reporter,
    key: &crate::cache::CacheKey,
    dep_trees: &BTreeMap<String, Option<crate::cache::Scan>>,
    upstream: &BTreeMap<String, Digest>,
) -> Result<StageEntry, StageError> {
    let digest = key.digest();
    let inputs: BTreeMap<String, Artifact> = upstream
        .iter()
        .map(|(name, d)| {
            let tree = cache.get_tree(d)?.ok_or(CacheError::MissingTree { digest: *d })?;
            Ok((name.clone(), Artifact { digest: *d, tree }))
        })
        .collect::<Result<_, CacheError>>()?;

    let started = Instant::now();
    let staging = cache.staging_dir(&decl.name)?;
    let workspace_outs: Vec<String> = decl.stage.outs().iter().map(|o| o.path.clone()).collect();
    // Stale outputs must not leak into a new result.
    for out in &workspace_outs {
        let abs = manifest.root.join(out);
        workspace.check(&abs).map_err(StageError::Escape)?;
        remove_path(&abs)?;
        if let Some(parent) = abs.parent() {
            std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
        }
    }
    let outputs_dir = manifest.outputs_dir();
    let scratch = cache.scratch_dir(&digest);
    let attached = std::sync::Mutex::new(Vec::new());
    let stage_cx = StageContext {
        attached: &attached,
        deps: dep_trees,
        stage: &decl.name,
        pipeline: &manifest.name,
        root: &manifest.root,
        outputs_dir: &outputs_dir,
        seed: manifest.seed,
        out_dir: &staging,
        scratch: &scratch,
        inputs: &inputs,
        cache,
        reporter,
    };
    let result = decl.stage.run(&stage_cx);
    let committed = result.and_then(|()| {
        if decl.stage.writes_workspace() {
            commit_workspace_outs(manifest, cache, &workspace_outs, reporter)
        } else {
            commit_artifact(cache, &staging, attached.into_inner().unwrap_or_default(), reporter)
        }
    });
    let _ = remove_path(&staging);
    let (artifact, outs) = committed?;
    let entry = StageEntry { key: key.clone(), artifact, outs, duration_ms: started.elapsed().as_millis() as u64 };
    cache.put_entry(&entry)?;
    // Only now is the resumable state worthless: a crash before the entry keeps it.
    let _ = remove_path(&scratch);
    Ok(entry)
}

/// What a Slurm job runs on its node (`kiln __run-stage`): the one stage `name`, given the
/// upstream artifacts the scheduling kiln resolved. The key is recomputed here and must be
/// the one the scheduler expects, so node and scheduler can never disagree about what ran.
pub fn run_one(
    manifest: &Manifest,
    name: &str,
    upstream: BTreeMap<String, Digest>,
    expected: &Digest,
    cache: &Cache,
    reporter: &dyn Reporter,
) -> Result<(), Error> {
    let i = resolve_targets(manifest, &[name.to_string()])?[0];
    let decl = &manifest.stages[i];
    // Nodes that share no filesystem with the scheduler get inputs and give results
    // through the remote cache.
    let remote = manifest.remote.as_ref().and_then(|c| match crate::cache::remote::Remote::open(c) {
        Ok(r) => Some(r),
        Err(e) => {
            reporter.warn(&e.to_string());
            None
        }
    });
    let warn = |m: &str| reporter.warn(m);
    for (up, artifact) in &upstream {
        let present = cache.get_tree(artifact)?.is_some_and(|t| t.entries().iter().all(|e| cache.has_blob(&e.digest)));
        if !present && !remote.as_ref().is_some_and(|r| r.fetch_tree(cache, artifact, &warn)) {
            return Err(Error::Usage(format!(
                "stage `{name}`: the result of `{up}` ({}) is not in this node's cache; share the cache directory or configure [cache.remote]",
                artifact.short()
            )));
        }
    }
    let dep_trees = hash_deps(manifest, decl, cache, reporter).map_err(CacheError::from)?;
    let mut deps = BTreeMap::new();
    for (path, scan) in &dep_trees {
        let scan = scan.as_ref().ok_or_else(|| Error::Usage(format!("stage `{name}`: dependency `{path}` is missing on this node")))?;
        deps.insert(path.clone(), cache.put_tree(&scan.tree)?);
    }
    let key = make_key(manifest, decl, deps, upstream.clone());
    if key.digest() != *expected {
        return Err(Error::Usage(format!(
            "stage `{name}`: this node computes key {} but the scheduler expected {}; are the workspace and cache shared?",
            key.digest().short(),
            expected.short()
        )));
    }
    let workspace = Confined::new(&manifest.root, "the workspace");
    let entry = run_and_commit(manifest, &workspace, decl, cache, reporter, &key, &dep_trees, &upstream)
        .map_err(|e| Error::Usage(format!("stage `{name}` failed: {e}")))?;
    if let Some(r) = &remote
        && !r.push(cache, &entry, &warn)
    {
        return Err(Error::Usage(format!("stage `{name}`: the result could not be uploaded to {}", r.url())));
    }
    Ok(())
}

/// The lock record of a finished stage, with the headline numbers of its `metrics.json`.
fn locked_stage(
    cache: &Cache,
    key: &crate::cache::CacheKey,
    artifact: Digest,
    outs: BTreeMap<String, Digest>,
) -> Result<LockedStage, StageError> {
    let mut locked = LockedStage::new(key, artifact, outs);
    let tree = cache.get_tree(&artifact)?.ok_or(CacheError::MissingTree { digest: artifact })?;
    // `metrics.json` at the top of the artifact, or at the top of a declared output
    // directory (a command stage's `outs = ["metrics"]`).
    let metrics_file = tree
        .entries()
        .iter()
        .filter(|e| e.path == "metrics.json" || e.path.strip_suffix("/metrics.json").is_some_and(|dir| !dir.contains('/')))
        .min_by_key(|e| e.path.len());
    if let Some(entry) = metrics_file {
        let bytes = cache.read_blob(&entry.digest)?;
        // A metrics file that is not JSON is the stage's business, not a reason to fail.
        if let Ok(doc) = serde_json::from_slice(&bytes) {
            locked.metrics = crate::cache::lockfile::headline_metrics(&doc);
        }
    }
    Ok(locked)
}

/// Moves what an artifact stage wrote into the store and adds the blobs it attached.
fn commit_artifact(
    cache: &Cache,
    staging: &std::path::Path,
    attached: Vec<crate::cache::TreeEntry>,
    reporter: &dyn Reporter,
) -> Result<(Digest, BTreeMap<String, Digest>), StageError> {
    let tree = cache.state().hash_tree_transient(staging, reporter).map_err(CacheError::from)?;
    let digest = cache.ingest(staging, &tree, Ingest::Move)?;
    if attached.is_empty() {
        return Ok((digest, BTreeMap::new()));
    }
    if let Some(missing) = attached.iter().find(|e| !cache.has_blob(&e.digest)) {
        return Err(CacheError::MissingBlob { digest: missing.digest }.into());
    }
    let mut entries = tree.entries().to_vec();
    entries.extend(attached);
    Ok((cache.put_tree(&Tree::new(entries))?, BTreeMap::new()))
}

fn commit_workspace_outs(
    manifest: &Manifest,
    cache: &Cache,
    outs: &[String],
    reporter: &dyn Reporter,
) -> Result<(Digest, BTreeMap<String, Digest>), StageError> {
    let mut entries = Vec::new();
    let mut digests = BTreeMap::new();
    for out in outs {
        let abs = manifest.root.join(out);
        let tree = match cache.state().hash_tree(&abs, reporter) {
            Ok(t) => t,
            Err(StateError::Missing { .. }) => return Err(StageError::MissingOutput(out.clone())),
            Err(e) => return Err(CacheError::from(e).into()),
        };
        cache.ingest(&abs, &tree, Ingest::Copy)?;
        digests.insert(out.clone(), tree.digest());
        entries.extend(tree.prefixed(&tree_path(out)));
    }
    let artifact = cache.put_tree(&Tree::new(entries))?;
    Ok((artifact, digests))
}

/// Puts back workspace outputs of a cached stage that are missing or were changed.
fn restore_outputs(cx: &Shared<'_>, entry: &StageEntry) -> Result<usize, StageError> {
    let (manifest, cache, reporter) = (cx.manifest, cx.cache, cx.reporter);
    if entry.outs.is_empty() {
        return Ok(0);
    }
    let tree = cache.get_tree(&entry.artifact)?.ok_or(CacheError::MissingTree { digest: entry.artifact })?;
    let mut restored = 0;
    for (out, want) in &entry.outs {
        let abs = dep_path(&manifest.root, out);
        let intact = match cache.state().hash_tree(&abs, reporter) {
            Ok(t) => t.digest() == *want,
            Err(StateError::Missing { .. }) => false,
            Err(e) => return Err(CacheError::from(e).into()),
        };
        if !intact {
            cx.workspace.check(&abs).map_err(StageError::Escape)?;
            remove_path(&abs)?;
            cache.restore(&tree.subtree(&tree_path(out)), &abs)?;
            restored += 1;
        }
    }
    Ok(restored)
}

/// Rebuilds `outputs/<pipeline>/<stage>/` for an artifact stage as soon as it finishes,
/// so people (and `command` stages below it, through `KILN_INPUT_<STAGE>`) see the result
/// of this run, not of the last one.
fn show_artifact(cx: &Shared<'_>, i: usize, artifact: &Digest) -> Result<(), StageError> {
    let decl = &cx.manifest.stages[i];
    if decl.stage.writes_workspace() {
        return Ok(());
    }
    let view = cx.manifest.outputs_dir().join(&decl.name);
    cx.workspace.check(&view).map_err(StageError::Escape)?;
    let tree = cx.cache.get_tree(artifact)?.ok_or(CacheError::MissingTree { digest: *artifact })?;
    cx.cache.link_view(&tree, &view)?;
    Ok(())
}

/// Drops views of stages the manifest no longer has (or that now write the workspace).
fn prune_outputs(manifest: &Manifest, workspace: &Confined) -> Result<(), Error> {
    let dir = manifest.outputs_dir();
    let Ok(items) = std::fs::read_dir(&dir) else { return Ok(()) };
    for item in items.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let keep = manifest.stage(&name).is_some_and(|s| !s.stage.writes_workspace());
        if !name.starts_with('.') && !keep && workspace.check(&item.path()).is_ok() {
            remove_path(&item.path())?;
        }
    }
    let ignore = manifest.root.join("outputs").join(".gitignore");
    if !ignore.exists() {
        let _ = std::fs::write(&ignore, "# kiln's views of cached artifacts; rebuilt by every run\n*\n");
    }
    Ok(())
}
