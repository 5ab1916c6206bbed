//! `kiln run [FILE] [STAGE...]`

use std::sync::Arc;

use clap::Args;

use super::progress::CliReporter;
use super::split_manifest;
use crate::Error;
use crate::exec::status::{DirtyReason, StageState};
use crate::exec::{self, RunOptions, RunSummary};
use crate::manifest::{Executor, Override};
use crate::plan::Plan;
use crate::report::StageOutcome;
use crate::runs::{RunLog, RunRecord};
use crate::stats::WorkStats;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The manifest (default: `kiln.toml`, or the only `pipelines/*.toml`), then stage names.
    #[arg(value_name = "FILE] [STAGE")]
    words: Vec<String>,
    /// Run the named stages (all, when none are named) even if cached; what they need
    /// still comes from the cache.
    #[arg(long)]
    force: bool,
    /// Say what would run and why; run nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Also run every stage downstream of the named ones.
    #[arg(long)]
    downstream: bool,
    /// Stages run at the same time (default: number of cores).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Stop starting new stages after the first failure.
    #[arg(long, conflicts_with = "keep_going")]
    fail_fast: bool,
    /// Finish independent stages after a failure (the default).
    #[arg(long)]
    keep_going: bool,
    /// Fail at once if another kiln process uses the cache, instead of waiting.
    #[arg(long)]
    no_wait: bool,
    /// Override a manifest value for this run: `train.lr=0.0005`, `params.width=64`,
    /// `pipeline.seed=7`. Repeatable. The lock file is left as it is; the run is recorded
    /// (`kiln runs`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run a grid: `train.lr=1e-3,5e-4`. Repeatable; every combination runs, each recorded
    /// like a `--set` run, and the results are ranked at the end.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Vec<String>,
    /// Where stages run: `local` (threads of this process) or `slurm` (one `sbatch` job
    /// per stage; workspace and cache on a shared filesystem). Default: `[pipeline] executor`.
    #[arg(long, value_enum)]
    executor: Option<Executor>,
    /// Do not use `[cache.remote]` for this run.
    #[arg(long)]
    no_remote: bool,
    /// The metric that ranks a sweep (default: accuracy, else the first one).
    #[arg(long, value_name = "METRIC")]
    sort: Option<String>,
}

pub fn run(args: RunArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let set: Vec<Override> =
        args.set.iter().map(|a| Override::parse(a).map_err(|e| Error::Usage(format!("--set {e}")))).collect::<Result<_, _>>()?;
    let grid = sweep_grid(&args.sweep)?;
    if args.dry_run {
        let plan = load_with(&path, &set)?;
        return dry_run(&plan, &targets, &args, reporter, stats);
    }
    if grid.is_empty() {
        let plan = load_with(&path, &set)?;
        let (summary, id) = run_once(&plan, &targets, &args, None, reporter, stats)?;
        if !plan.manifest().overrides.is_empty() {
            reporter.note(&format!("recorded as run {id} (the lock file is unchanged: runs with --set are experiments)"));
        }
        return finish(&summary);
    }
    // Every manifest is checked before the first point runs, so a typo in the last value
    // does not surface an hour into the sweep.
    let plans: Vec<_> = grid
        .iter()
        .map(|point| {
            let overrides: Vec<Override> = set.iter().chain(point).cloned().collect();
            load_with(&path, &overrides)
        })
        .collect::<Result<_, _>>()?;
    let mut sweep_id = None;
    let mut ids = Vec::new();
    let mut failed = 0;
    for (n, (plan, point)) in plans.iter().zip(&grid).enumerate() {
        let label: Vec<String> = point.iter().map(Override::to_arg).collect();
        reporter.note(&format!("sweep {}/{}: {}", n + 1, grid.len(), label.join(" ")));
        let (summary, id) = run_once(plan, &targets, &args, Some(sweep_id.clone().unwrap_or_default()), reporter, stats.clone())?;
        sweep_id.get_or_insert(id.clone());
        failed += summary.failed();
        ids.push(id);
    }
    let log = RunLog::new(&plans[0].manifest().cache_dir);
    let records: Vec<RunRecord> = ids.iter().map(|id| log.get(id)).collect::<Result<_, _>>()?;
    let current = crate::runs::manifest_digest(plans[0].manifest());
    super::runs::print_table(&records, args.sort.as_deref(), true, Some(&current), reporter)?;
    if failed > 0 { Err(Error::StagesFailed { failed }) } else { Ok(()) }
}

fn load_with(path: &std::path::Path, overrides: &[Override]) -> Result<Plan, Error> {
    Plan::load_with(path, &crate::stages::StageRegistry::builtin(), overrides)
}

/// `--sweep a=1,2 --sweep b=x,y` → the four points, the first key varying slowest.
fn sweep_grid(args: &[String]) -> Result<Vec<Vec<Override>>, Error> {
    let mut grid: Vec<Vec<Override>> = Vec::new();
    for arg in args {
        let (key, values) = arg.split_once('=').ok_or_else(|| Error::Usage(format!("--sweep `{arg}`: expected KEY=V1,V2,...")))?;
        let values = split_top_level(values);
        if values.iter().any(|v| v.trim().is_empty()) {
            return Err(Error::Usage(format!("--sweep `{arg}`: empty value")));
        }
        let options: Vec<Override> = values
            .iter()
            .map(|v| Override::parse(&format!("{key}={v}")).map_err(|e| Error::Usage(format!("--sweep {e}"))))
            .collect::<Result<_, _>>()?;
        grid = if grid.is_empty() {
            options.into_iter().map(|o| vec![o]).collect()
        } else {
            grid.into_iter().flat_map(|point| options.iter().map(move |o| [point.clone(), vec![o.clone()]].concat())).collect()
        };
    }
    Ok(grid)
}

/// Splits on commas outside brackets, braces and quotes, so `[8,16],[16,32]` is two values.
fn split_top_level(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in s.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

fn run_once(
    plan: &Plan,
    targets: &[String],
    args: &RunArgs,
    sweep: Option<String>,
    reporter: &CliReporter,
    stats: Arc<WorkStats>,
) -> Result<(RunSummary, String), Error> {
    let manifest = plan.manifest();
    let started = std::time::SystemTime::now();
    let mut opts = RunOptions {
        targets: targets.to_vec(),
        downstream: args.downstream,
        force: args.force,
        fail_fast: args.fail_fast,
        wait: !args.no_wait,
        write_lock: manifest.overrides.is_empty(),
        remote: !args.no_remote,
        executor: args.executor.unwrap_or(manifest.executor),
        ..RunOptions::default()
    };
    if opts.executor == Executor::Slurm {
        // Ctrl-C and SIGTERM must cancel the jobs, not orphan them: the workers see the
        // flag, `scancel` their jobs and the run stops.
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, flag.clone()).map_err(|e| Error::Failed(format!("cannot handle signals: {e}")))?;
        }
        opts.interrupted = Some(flag);
    }
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    let summary = exec::run(plan, &opts, reporter, stats)?;
    let mut record = RunRecord::new(manifest, &summary, &summary.lock, started, sweep);
    let id = RunLog::new(&manifest.cache_dir).append(&mut record)?;
    let count = |f: fn(&StageOutcome) -> bool| summary.stages.iter().filter(|(_, o)| f(o)).count();
    let ran = count(|o| matches!(o, StageOutcome::Ran { .. }));
    let cached = count(|o| matches!(o, StageOutcome::Cached { .. }));
    let failed = summary.failed();
    let skipped = summary.stages.len() - ran - cached - failed;
    reporter.note(&format!("{} stages: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped", summary.stages.len()));
    Ok((summary, id))
}

fn finish(summary: &RunSummary) -> Result<(), Error> {
    let failed = summary.failed();
    if failed > 0 { Err(Error::StagesFailed { failed }) } else { Ok(()) }
}

fn dry_run(plan: &Plan, targets: &[String], args: &RunArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let statuses = exec::status(plan, targets, args.downstream, !args.no_wait, reporter, stats)?;
    for s in statuses {
        let restorable = s.reasons.iter().all(DirtyReason::is_restorable);
        let verdict = match s.state {
            StageState::Fresh => "cached".to_string(),
            _ if args.force => "would run (forced)".into(),
            _ if restorable => "cached (would restore outputs)".into(),
            _ => "would run".into(),
        };
        reporter.line(&format!("{:<24} {verdict}", s.stage));
        if !restorable || s.state != StageState::Fresh {
            for r in &s.reasons {
                reporter.line(&format!("{:<24}   {r}", ""));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_grid_is_the_cartesian_product() {
        let grid = sweep_grid(&["train.lr=1e-3,5e-4".into(), "train.cnn.widths=[8,16],[16,32]".into()]).unwrap();
        let points: Vec<Vec<String>> = grid.iter().map(|p| p.iter().map(Override::to_arg).collect()).collect();
        assert_eq!(
            points,
            [
                ["train.lr=1e-3", "train.cnn.widths=[8,16]"],
                ["train.lr=1e-3", "train.cnn.widths=[16,32]"],
                ["train.lr=5e-4", "train.cnn.widths=[8,16]"],
                ["train.lr=5e-4", "train.cnn.widths=[16,32]"],
            ]
        );
        assert!(sweep_grid(&["train.lr".into()]).is_err());
        assert!(sweep_grid(&["train.lr=1,,2".into()]).is_err());
    }
}

/// `kiln __run-stage FILE STAGE --key K --upstream NAME=DIGEST...`: what a Slurm job runs.
#[derive(Debug, Args)]
pub struct RunStageArgs {
    manifest: std::path::PathBuf,
    stage: String,
    #[arg(long)]
    key: String,
    #[arg(long = "upstream", value_name = "NAME=DIGEST")]
    upstream: Vec<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub fn run_stage(args: RunStageArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let set: Vec<Override> = args.set.iter().map(|a| Override::parse(a).map_err(Error::Usage)).collect::<Result<_, _>>()?;
    let plan = load_with(&args.manifest, &set)?;
    let manifest = plan.manifest();
    let digest = |s: &str| s.parse::<crate::Digest>().map_err(|e| Error::Usage(format!("`{s}`: {e}")));
    let key = digest(&args.key)?;
    let mut upstream = std::collections::BTreeMap::new();
    for u in &args.upstream {
        let (name, d) = u.split_once('=').ok_or_else(|| Error::Usage(format!("--upstream `{u}`: expected NAME=DIGEST")))?;
        upstream.insert(name.to_string(), digest(d)?);
    }
    let state = manifest.cache_dir.join("tmp").join(format!("node-{}-{}.redb", std::process::id(), key.short()));
    let cache = crate::cache::Cache::open_with_state(&manifest.cache_dir, &state, stats)?;
    let result = exec::run_one(&plan, &args.stage, upstream, &key, &cache, reporter);
    drop(cache);
    let _ = std::fs::remove_file(&state);
    result
}
