//! Where a stage that must run runs. The engine decides *what* runs (a key not in the
//! cache); a [`Backend`] decides *where*: in this process ([`Local`]) or as a Slurm job on
//! a node that shares the workspace and cache, or the remote ([`Slurm`]).

use super::stage::{Engine, Job, forget_damaged_inputs, run_here};
use crate::cache::StageEntry;
use crate::stages::StageError;

pub(super) trait Backend: Sync {
    /// Runs the job's stage and returns its result, committed to the cache.
    fn run(&self, engine: &Engine<'_>, job: &Job<'_>) -> Result<StageEntry, StageError>;
}

/// This process's worker threads.
pub(super) struct Local;

impl Backend for Local {
    fn run(&self, engine: &Engine<'_>, job: &Job<'_>) -> Result<StageEntry, StageError> {
        let cache = engine.results.cache;
        run_here(engine.manifest, engine.workspace, cache, engine.reporter, job.decl, job.prepared, job.upstream)
            .map_err(|e| forget_damaged_inputs(cache, job, e))
    }
}

/// One `sbatch` job per stage ([`crate::slurm`]).
pub(super) struct Slurm;

impl Backend for Slurm {
    fn run(&self, engine: &Engine<'_>, job: &Job<'_>) -> Result<StageEntry, StageError> {
        let digest = &job.prepared.digest;
        crate::slurm::run_stage(engine.manifest, job.decl, digest, job.upstream, engine.reporter, engine.interrupted)?;
        // The job committed the result into the shared cache, or uploaded it to the
        // remote when the node shares no filesystem with us.
        match engine.results.lookup(digest)? {
            Some((entry, _)) => Ok(entry),
            None => Err(StageError::Failed(format!("the Slurm job for `{}` ended without a result in the cache", job.decl.name))),
        }
    }
}
