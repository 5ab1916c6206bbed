//! `kiln push` and `kiln pull`: move the lock file's results to and from `[cache.remote]`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::cache::lockfile::LockFile;
use crate::cache::remote::{Fetched, Remote};
use crate::exec::open_cache;
use crate::plan::Plan;
use crate::report::Reporter;
use crate::stats::WorkStats;

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The manifest, then the stages to transfer (default: every stage in the lock file).
    #[arg(value_name = "FILE] [STAGE")]
    words: Vec<String>,
}

fn setup(args: &RemoteArgs) -> Result<(Plan, Vec<String>, Remote), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let manifest = plan.manifest();
    let config = manifest.remote.clone().ok_or_else(|| {
        Error::Usage(format!(
            "`{}` has no [cache.remote]: add `url = \"s3://BUCKET/PREFIX\"` (and `endpoint` for S3-compatible servers)",
            path.display()
        ))
    })?;
    let remote = Remote::open(&config).map_err(|e| Error::Usage(e.to_string()))?;
    let stages = if targets.is_empty() {
        manifest.stages.iter().map(|s| s.name.clone()).collect()
    } else {
        plan.resolve_targets(&targets)?.into_iter().map(|i| manifest.stages[i].name.clone()).collect()
    };
    Ok((plan, stages, remote))
}

pub fn push(args: RemoteArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (plan, stages, remote) = setup(&args)?;
    let manifest = plan.manifest();
    let (_guard, cache) = open_cache(manifest, true, reporter, stats)?;
    let lock = LockFile::read(&manifest.lock_path())?;
    let progress = reporter.progress("pushing", stages.len() as u64, "stages");
    let (mut pushed, mut missing) = (0, Vec::new());
    for name in &stages {
        progress.inc(1);
        let Some(locked) = lock.stages.get(name) else {
            missing.push(name.clone());
            continue;
        };
        match cache.get_entry(&locked.key)? {
            Some(entry) if cache.entry_is_complete(&entry)? => {
                if remote.push(&cache, &entry, &|m| reporter.warn(m)) {
                    pushed += 1;
                }
            }
            _ => missing.push(name.clone()),
        }
    }
    progress.finish();
    let t = &remote.transfers;
    reporter.line(&format!(
        "pushed {pushed} stage result{}: {} objects uploaded ({:.1} MB){}",
        if pushed == 1 { "" } else { "s" },
        t.uploaded_objects.load(Ordering::Relaxed),
        t.uploaded_bytes.load(Ordering::Relaxed) as f64 / 1e6,
        if missing.is_empty() { String::new() } else { format!("; not in the local cache (run them first): {}", missing.join(", ")) }
    ));
    if remote.is_online() { Ok(()) } else { Err(Error::Failed(format!("the remote {} could not be reached", remote.url()))) }
}

pub fn pull(args: RemoteArgs, reporter: &CliReporter, stats: Arc<WorkStats>) -> Result<(), Error> {
    let (plan, stages, remote) = setup(&args)?;
    let manifest = plan.manifest();
    let (_guard, cache) = open_cache(manifest, true, reporter, stats)?;
    let lock = LockFile::read(&manifest.lock_path())?;
    let progress = reporter.progress("pulling", stages.len() as u64, "stages");
    let (mut pulled, mut present, mut absent) = (0, 0, Vec::new());
    for name in &stages {
        progress.inc(1);
        let Some(locked) = lock.stages.get(name) else {
            absent.push(name.clone());
            continue;
        };
        if let Some(entry) = cache.get_entry(&locked.key)?
            && cache.entry_is_complete(&entry)?
        {
            present += 1;
            continue;
        }
        match remote.fetch(&cache, &locked.key, &|m| reporter.warn(m)) {
            Fetched::Entry(_) => pulled += 1,
            Fetched::Miss => absent.push(name.clone()),
        }
    }
    progress.finish();
    let t = &remote.transfers;
    reporter.line(&format!(
        "pulled {pulled} stage result{} ({} objects, {:.1} MB); {present} already here{}",
        if pulled == 1 { "" } else { "s" },
        t.downloaded_objects.load(Ordering::Relaxed),
        t.downloaded_bytes.load(Ordering::Relaxed) as f64 / 1e6,
        if absent.is_empty() { String::new() } else { format!("; not on the remote: {}", absent.join(", ")) }
    ));
    if remote.is_online() { Ok(()) } else { Err(Error::Failed(format!("the remote {} could not be reached", remote.url()))) }
}
