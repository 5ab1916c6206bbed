//! `kiln run [FILE] [STAGE...]`

use std::sync::Arc;

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::exec::status::{DirtyReason, StageState};
use crate::exec::{self, RunOptions};
use crate::report::StageOutcome;
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
}

pub fn run(args: RunArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let manifest = load(&path)?;
    if args.dry_run {
        let statuses = exec::status(&manifest, &targets, args.downstream, !args.no_wait, reporter, stats)?;
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
        return Ok(());
    }
    let mut opts = RunOptions {
        targets,
        downstream: args.downstream,
        force: args.force,
        fail_fast: args.fail_fast,
        wait: !args.no_wait,
        ..RunOptions::default()
    };
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    let summary = exec::run(&manifest, &opts, reporter, stats)?;
    let count = |f: fn(&StageOutcome) -> bool| summary.stages.iter().filter(|(_, o)| f(o)).count();
    let ran = count(|o| matches!(o, StageOutcome::Ran { .. }));
    let cached = count(|o| matches!(o, StageOutcome::Cached { .. }));
    let failed = summary.failed();
    let skipped = summary.stages.len() - ran - cached - failed;
    reporter.note(&format!("{} stages: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped", summary.stages.len()));
    if failed > 0 { Err(Error::StagesFailed { failed }) } else { Ok(()) }
}
