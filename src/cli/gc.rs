//! `kiln gc` and `kiln verify`.

use std::path::Path;
use std::sync::Arc;

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::cache::gc::{Roots, collect_garbage};
use crate::cache::lockfile::LockFile;
use crate::exec::open_cache;
use crate::stats::WorkStats;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// A manifest using the cache to clean. Every `*.lock` beside it counts as a root, and
    /// so does every recorded experiment (`--set`/`--sweep` run; `kiln runs --drop`
    /// releases them).
    #[arg(value_name = "FILE")]
    words: Vec<String>,
    /// Say what would be removed; remove nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Also drop the per-item memo store (it refills on the next run).
    #[arg(long)]
    memo: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A manifest using the cache to check.
    #[arg(value_name = "FILE")]
    words: Vec<String>,
}

pub fn gc(args: GcArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (path, _) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let manifest = plan.manifest();
    let (_guard, cache) = open_cache(manifest, true, reporter, stats)?;
    let mut roots = roots_beside(&manifest.path)?;
    // Experiments (`--set`, `--sweep`) have no lock file to keep them: their records do,
    // so they stay comparable (`kiln metrics diff r1 r2`) until `kiln runs --drop`. Plain
    // runs are what the lock file records; their superseded results go like any other.
    let runs = crate::runs::RunLog::new(&manifest.cache_dir).list()?;
    for run in runs.iter().filter(|r| !r.overrides.is_empty()) {
        roots.keys.extend(run.stages.values().filter_map(|s| s.key));
    }
    let report = collect_garbage(&cache, &roots, args.dry_run)?;
    let verb = if args.dry_run { "would remove" } else { "removed" };
    reporter.line(&format!(
        "{verb} {} stage entries, {} trees, {} blobs ({:.1} MB); kept {} entries, {} blobs",
        report.entries_removed,
        report.trees_removed,
        report.blobs_removed,
        report.bytes_freed as f64 / 1e6,
        report.entries_kept,
        report.blobs_kept
    ));
    if args.memo && !args.dry_run {
        let n = cache.state().memo().clear()?;
        reporter.line(&format!("removed {n} memo entries"));
    }
    cache.state().flush()?;
    Ok(())
}

/// Stage keys and dependency snapshots named by every lock file next to `manifest`.
fn roots_beside(manifest: &Path) -> Result<Roots, Error> {
    let dir = manifest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut roots = Roots::default();
    let items = std::fs::read_dir(dir).map_err(|source| Error::Io { action: "list", path: dir.to_path_buf(), source })?;
    for item in items.flatten() {
        let path = item.path();
        if path.extension().is_some_and(|e| e == "lock") {
            let lock = LockFile::read(&path)?;
            for stage in lock.stages.values() {
                roots.keys.insert(stage.key);
                roots.trees.extend(stage.deps.values().copied());
            }
        }
    }
    Ok(roots)
}

pub fn verify(args: VerifyArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (path, _) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let (_guard, cache) = open_cache(plan.manifest(), true, reporter, stats)?;
    let report = crate::cache::gc::verify(&cache)?;
    for p in &report.problems {
        reporter.line(p);
    }
    reporter.line(&format!(
        "checked {} blobs, {} trees, {} stage entries: {}",
        report.blobs_checked,
        report.trees_checked,
        report.entries_checked,
        if report.is_clean() { "all good".to_string() } else { format!("{} problems", report.problems.len()) }
    ));
    if report.is_clean() { Ok(()) } else { Err(Error::Corrupt { problems: report.problems.len() }) }
}
