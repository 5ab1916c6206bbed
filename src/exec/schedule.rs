//! The ready-set loop: which stage runs next, on which worker, and what its result does to
//! the stages below it and to the lock file.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::RunOptions;
use super::stage::{Done, Engine, execute};
use crate::Error;
use crate::cache::lockfile::LockFile;
use crate::digest::Digest;
use crate::graph::Graph;
use crate::report::StageOutcome;
use crate::stages::StageError;
use crate::stats::WorkStats;

/// Runs every selected stage once its selected upstream stages have finished, up to
/// `opts.jobs` at a time, upstream first and ties by graph order. Returns each stage's
/// outcome (`None`: not started, because the run stopped first); `lock` ends with the
/// record of every stage that succeeded.
pub(super) fn run_ready_set(
    engine: &Engine<'_>,
    graph: &Graph,
    selected: &[bool],
    opts: &RunOptions,
    lock: &mut LockFile,
    lock_writer: &mut LockWriter<'_>,
    stats: &WorkStats,
) -> Result<Vec<Option<StageOutcome>>, Error> {
    let (manifest, reporter) = (engine.manifest, engine.reporter);
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
    let mut fatal: Option<Error> = None;

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
                    release(i, graph, selected, &mut waiting, &mut ready, &position);
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
                scope.spawn(move || {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| execute(engine, i, upstream, &upstream_keys)))
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
                    if let Err(e) = lock_writer.flush(lock) {
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
                        if let Err(e) = lock_writer.changed(lock) {
                            fatal.get_or_insert(e);
                            stop = true;
                        }
                    }
                    done.outcome
                }
                Err(e) => {
                    stop |= opts.fail_fast || engine.interrupted.is_some_and(|f| f.load(Ordering::Relaxed));
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
            release(i, graph, selected, &mut waiting, &mut ready, &position);
        }
    });
    match fatal {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// Lock writes coalesce: a 1000-stage pipeline would otherwise rewrite a 1000-entry file
/// after each stage. The cache, not the lock, is what makes a finished stage `cached` on the
/// next run, so an interruption loses at most [`LOCK_WRITE_INTERVAL`] of lock records, and
/// nothing in the cache.
const LOCK_WRITE_INTERVAL: Duration = Duration::from_millis(100);

pub(super) struct LockWriter<'a> {
    /// `None`: keep the lock in memory only.
    path: Option<&'a Path>,
    last: Option<Instant>,
    pub(super) pending: bool,
}

impl<'a> LockWriter<'a> {
    pub(super) fn new(path: Option<&'a Path>) -> Self {
        LockWriter { path, last: None, pending: false }
    }

    fn changed(&mut self, lock: &LockFile) -> Result<(), Error> {
        self.pending = true;
        if self.last.is_none_or(|t| t.elapsed() >= LOCK_WRITE_INTERVAL) { self.flush(lock) } else { Ok(()) }
    }

    pub(super) fn flush(&mut self, lock: &LockFile) -> Result<(), Error> {
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
