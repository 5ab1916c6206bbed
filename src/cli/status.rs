//! `kiln status [FILE] [STAGE...]`

use std::sync::Arc;

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::exec;
use crate::stats::WorkStats;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The manifest, then optionally stage names to limit the report to.
    #[arg(value_name = "FILE] [STAGE")]
    words: Vec<String>,
    /// Print JSON (one object per stage, with structured reasons).
    #[arg(long)]
    json: bool,
    /// Fail at once if another kiln process uses the cache.
    #[arg(long)]
    no_wait: bool,
}

pub fn status(args: StatusArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let statuses = exec::status(&plan, &targets, false, !args.no_wait, reporter, stats)?;
    if args.json {
        reporter.line(&serde_json::to_string_pretty(&statuses).expect("status serialises"));
        return Ok(());
    }
    for s in &statuses {
        reporter.line(&format!("{:<24} {}", s.stage, s.state));
        for r in &s.reasons {
            if !matches!(r, exec::status::DirtyReason::NeverRun) {
                reporter.line(&format!("{:<24}   {r}", ""));
            }
        }
    }
    Ok(())
}
