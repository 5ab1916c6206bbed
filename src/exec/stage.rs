//! One stage on a worker: its key, then the cached result or a run on a backend, then the
//! result committed and shown. [`run_one`] does the same for the one stage a Slurm job
//! runs on its node.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rayon::prelude::*;

use super::backend::Backend;
use super::inputs::{hash_deps, make_key};
use super::outputs::{commit_artifact, commit_workspace_outs, restore_outputs, show_artifact};
use super::status::{self, Current, DirtyReason};
use super::store::{self, Results};
use crate::Error;
use crate::cache::lockfile::{LockFile, LockedStage};
use crate::cache::{Cache, CacheError, CacheKey, Scan, StageEntry, remove_path};
use crate::digest::Digest;
use crate::manifest::{Manifest, StageDecl};
use crate::plan::Plan;
use crate::report::{Reporter, StageOutcome};
use crate::stages::{Artifact, StageContext, StageError};
use crate::workspace::Confined;

/// What every worker of one run shares.
pub(super) struct Engine<'a> {
    pub manifest: &'a Manifest,
    /// Where stages may delete, write and restore.
    pub workspace: &'a Confined,
    pub results: Results<'a>,
    pub previous: &'a LockFile,
    pub reporter: &'a dyn Reporter,
    /// Per stage: run it even if cached.
    pub forced: Vec<bool>,
    pub backend: &'a dyn Backend,
    pub interrupted: Option<&'a AtomicBool>,
}

/// What a worker hands back for a stage that succeeded.
pub(super) struct Done {
    pub outcome: StageOutcome,
    pub artifact: Digest,
    pub locked: LockedStage,
}

/// A stage's key, from what it reads now.
pub(super) struct Prepared {
    pub key: CacheKey,
    pub digest: Digest,
    /// What the engine found at each dependency path; the stage gets these scans too.
    pub dep_trees: BTreeMap<String, Option<Scan>>,
}

/// One stage that must run, as a [`Backend`] gets it.
pub(super) struct Job<'a> {
    pub decl: &'a StageDecl,
    pub prepared: &'a Prepared,
    /// Upstream artifacts, by stage name.
    pub upstream: &'a BTreeMap<String, Digest>,
    /// The keys of the upstream results, to forget one that turns out damaged.
    pub upstream_keys: &'a BTreeMap<String, Digest>,
}

/// Hashes the stage's dependencies, stores their trees and builds its key with the
/// upstream artifacts. A missing dependency fails the stage.
pub(super) fn prepare_key(
    manifest: &Manifest,
    decl: &StageDecl,
    cache: &Cache,
    reporter: &dyn Reporter,
    upstream: &BTreeMap<String, Digest>,
) -> Result<Prepared, StageError> {
    let dep_trees = hash_deps(manifest, decl, cache, reporter).map_err(CacheError::from)?;
    let mut deps = BTreeMap::new();
    for (path, scan) in &dep_trees {
        let scan = scan.as_ref().ok_or_else(|| StageError::MissingDep(path.clone()))?;
        // Kept so that `status` can later say which files of this dependency changed.
        deps.insert(path.clone(), cache.put_tree(&scan.tree)?);
    }
    let key = make_key(manifest, decl, deps, upstream.clone());
    let digest = key.digest();
    Ok(Prepared { key, digest, dep_trees })
}

/// One stage, on a worker thread: cached or run, then committed and shown.
pub(super) fn execute(
    cx: &Engine<'_>,
    i: usize,
    upstream: BTreeMap<String, Digest>,
    upstream_keys: &BTreeMap<String, Digest>,
) -> Result<Done, StageError> {
    let manifest = cx.manifest;
    let decl = &manifest.stages[i];
    let cache = cx.results.cache;
    let prepared = prepare_key(manifest, decl, cache, cx.reporter, &upstream)?;
    let (key, digest) = (&prepared.key, prepared.digest);

    let force = cx.forced[i];
    if !force && let Some((entry, pulled)) = cx.results.lookup(&digest)? {
        let shown = restore_outputs(&manifest.root, cx.workspace, cache, cx.reporter, &entry)
            .and_then(|restored| show_artifact(manifest, cx.workspace, cache, decl, &entry.artifact).map(|()| restored));
        match shown {
            Ok(restored) => {
                return Ok(Done {
                    outcome: StageOutcome::Cached { restored, pulled },
                    artifact: entry.artifact,
                    locked: locked_stage(cache, key, entry.artifact, entry.outs)?,
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
    log_reasons(cx, decl, &prepared, &upstream, force);

    let started = Instant::now();
    let job = Job { decl, prepared: &prepared, upstream: &upstream, upstream_keys };
    let entry = cx.backend.run(cx, &job)?;
    cx.results.publish(&entry);
    let (artifact, outs) = (entry.artifact, entry.outs.clone());
    show_artifact(manifest, cx.workspace, cache, decl, &artifact)?;
    Ok(Done { outcome: StageOutcome::ran(started.elapsed()), artifact, locked: locked_stage(cache, key, artifact, outs)? })
}

/// With `-v`: why the stage runs.
fn log_reasons(cx: &Engine<'_>, decl: &StageDecl, prepared: &Prepared, upstream: &BTreeMap<String, Digest>, force: bool) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let key = &prepared.key;
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
            deps: &prepared.dep_trees,
            upstream: &upstream_now,
            outs: key.outs.clone(),
        };
        status::explain(cx.previous.stages.get(&decl.name), &now, cx.results.cache)
    };
    for r in &reasons {
        tracing::info!(stage = %decl.name, "running: {r}");
    }
}

/// A stage that failed may have failed on an upstream blob that is gone or was found
/// corrupt (and removed) as it was read. Such an upstream result can no longer be used:
/// its entry is removed, so the next run computes it again instead of failing the same
/// way, and the failure says so.
pub(super) fn forget_damaged_inputs(cache: &Cache, job: &Job<'_>, error: StageError) -> StageError {
    let mut forgotten = Vec::new();
    for (name, artifact) in job.upstream {
        let damaged = match cache.get_tree(artifact) {
            Ok(Some(tree)) => tree.entries().par_iter().any(|e| !cache.has_blob(&e.digest)),
            Ok(None) | Err(_) => true,
        };
        if damaged
            && let Some(key) = job.upstream_keys.get(name)
            && cache.remove_entry(key).is_ok()
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

/// Runs one stage in this process and commits its result: blobs, then tree, then entry.
/// The local backend calls it for every stage; a Slurm job calls it (through
/// [`run_one`]) for the one stage it was given.
pub(super) fn run_here(
    manifest: &Manifest,
    workspace: &Confined,
    cache: &Cache,
    reporter: &dyn Reporter,
    decl: &StageDecl,
    prepared: &Prepared,
    upstream: &BTreeMap<String, Digest>,
) -> Result<StageEntry, StageError> {
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
    let scratch = cache.scratch_dir(&prepared.digest);
    let attached = std::sync::Mutex::new(Vec::new());
    let stage_cx = StageContext {
        attached: &attached,
        deps: &prepared.dep_trees,
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
            commit_workspace_outs(&manifest.root, cache, &workspace_outs, reporter)
        } else {
            commit_artifact(cache, &staging, attached.into_inner().unwrap_or_default(), reporter)
        }
    });
    let _ = remove_path(&staging);
    let (artifact, outs) = committed?;
    let entry = StageEntry { key: prepared.key.clone(), artifact, outs, duration_ms: started.elapsed().as_millis() as u64 };
    cache.put_entry(&entry)?;
    // Only now is the resumable state worthless: a crash before the entry keeps it.
    let _ = remove_path(&scratch);
    Ok(entry)
}

/// What a Slurm job runs on its node (`kiln __run-stage`): the one stage `name`, given the
/// upstream artifacts the scheduling kiln resolved. The key is recomputed here and must be
/// the one the scheduler expects, so node and scheduler can never disagree about what ran.
/// Anything that stops the stage is its failure ([`Error::Stage`], exit code 1).
pub fn run_one(
    plan: &Plan,
    name: &str,
    upstream: BTreeMap<String, Digest>,
    expected: &Digest,
    cache: &Cache,
    reporter: &dyn Reporter,
) -> Result<(), Error> {
    let manifest = plan.manifest();
    let i = plan.resolve_targets(&[name.to_string()])?[0];
    let decl = &manifest.stages[i];
    let failed = |source: StageError| Error::Stage { stage: name.to_string(), source };
    // Nodes that share no filesystem with the scheduler get inputs and give results
    // through the remote cache.
    let remote = store::open_remote(manifest.remote.as_ref(), reporter);
    let results = Results { cache, remote: remote.as_ref(), reporter };
    for (up, artifact) in &upstream {
        if !results.ensure_artifact(artifact).map_err(failed)? {
            return Err(failed(StageError::Config(format!(
                "the result of `{up}` ({}) is not in this node's cache; share the cache directory or configure [cache.remote]",
                artifact.short()
            ))));
        }
    }
    let prepared = prepare_key(manifest, decl, cache, reporter, &upstream).map_err(failed)?;
    if prepared.digest != *expected {
        return Err(failed(StageError::Config(format!(
            "this node computes key {} but the scheduler expected {}; are the workspace and cache shared?",
            prepared.digest.short(),
            expected.short()
        ))));
    }
    let workspace = Confined::new(&manifest.root, "the workspace");
    let entry = run_here(manifest, &workspace, cache, reporter, decl, &prepared, &upstream).map_err(failed)?;
    if let Some(r) = &remote
        && !results.publish(&entry)
    {
        return Err(failed(StageError::Failed(format!("the result could not be uploaded to {}", r.url()))));
    }
    Ok(())
}

/// The lock record of a finished stage, with the headline numbers of its `metrics.json`.
fn locked_stage(cache: &Cache, key: &CacheKey, artifact: Digest, outs: BTreeMap<String, Digest>) -> Result<LockedStage, StageError> {
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
