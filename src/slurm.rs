//! The Slurm executor: each stage that must run becomes one `sbatch` job that runs kiln on a
//! node for that stage alone (`kiln __run-stage`), against the shared workspace and cache.
//!
//! The scheduling kiln keeps its local semantics (independent stages in parallel, dependents
//! wait, a failure skips its dependents): a worker thread per running stage submits the job
//! and follows it with `scontrol` (falling back to `sacct`), then takes the committed result
//! from the cache. A job that Slurm ends (time limit, `scancel`, node failure) fails its
//! stage with Slurm's state and reason and the tail of its log; the next run redoes only
//! that stage. SIGINT/SIGTERM on `kiln run` cancel the jobs in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::digest::Digest;
use crate::manifest::{Manifest, StageDecl};
use crate::report::Reporter;
use crate::stages::StageError;

pub use crate::manifest::Resources;

/// Quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The shell command a job runs: kiln itself, for one stage.
pub fn job_command(exe: &Path, manifest: &Manifest, stage: &str, key: &Digest, upstream: &BTreeMap<String, Digest>) -> String {
    let manifest_path = std::path::absolute(&manifest.path).unwrap_or_else(|_| manifest.path.clone());
    let mut words = vec![
        exe.display().to_string(),
        "--no-progress".into(),
        "__run-stage".into(),
        manifest_path.display().to_string(),
        stage.to_string(),
        "--key".into(),
        key.to_hex(),
    ];
    for (name, d) in upstream {
        words.push("--upstream".into());
        words.push(format!("{name}={}", d.to_hex()));
    }
    for o in &manifest.overrides {
        words.push("--set".into());
        words.push(format!("{}={}", o.key, o.value));
    }
    words.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ")
}

/// A job's state as `scontrol` or `sacct` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    pub reason: String,
    pub exit_code: String,
}

impl JobState {
    pub fn is_active(&self) -> bool {
        matches!(self.state.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "RESIZING")
    }
}

/// Parses `scontrol show job -o ID` (one line of `Key=Value` pairs).
pub fn parse_scontrol(line: &str) -> Option<JobState> {
    let field =
        |name: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(str::to_string);
    Some(JobState {
        state: field("JobState")?,
        reason: field("Reason").unwrap_or_default(),
        exit_code: field("ExitCode").unwrap_or_default(),
    })
}

fn query(job: &str) -> Option<JobState> {
    let out = Command::new("scontrol").args(["show", "job", "-o", job]).output().ok()?;
    if out.status.success()
        && let Some(s) = parse_scontrol(&String::from_utf8_lossy(&out.stdout))
    {
        return Some(s);
    }
    // Finished jobs leave scontrol after MinJobAge; accounting keeps them.
    let out = Command::new("sacct").args(["-n", "-X", "-P", "-j", job, "-o", "State,Reason,ExitCode"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.lines().next()?.split('|');
    let state = parts.next()?.split_whitespace().next()?.to_string();
    Some(JobState { state, reason: parts.next().unwrap_or_default().into(), exit_code: parts.next().unwrap_or_default().into() })
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `decl` as a Slurm job and waits for it. Ok means the job completed; the caller
/// checks that its result is in the cache.
pub fn run_stage(
    manifest: &Manifest,
    decl: &StageDecl,
    key: &Digest,
    upstream: &BTreeMap<String, Digest>,
    reporter: &dyn Reporter,
    interrupted: Option<&AtomicBool>,
) -> Result<(), StageError> {
    let exe = std::env::current_exe().map_err(|e| StageError::Failed(format!("cannot find the kiln executable: {e}")))?;
    let logs: PathBuf = manifest.outputs_dir().join(".slurm");
    std::fs::create_dir_all(&logs).map_err(StageError::io("create", &logs))?;
    let log = logs.join(format!("{}-{}.log", decl.name, &key.to_hex()[..12]));
    let mut sbatch = Command::new("sbatch");
    sbatch
        .arg("--parsable")
        .arg(format!("--job-name=kiln-{}-{}", manifest.name, decl.name))
        .arg(format!("--output={}", log.display()))
        .arg(format!("--chdir={}", manifest.root.display()))
        .args(decl.resources.clone().unwrap_or_default().sbatch_args())
        .arg(format!("--wrap={}", job_command(&exe, manifest, &decl.name, key, upstream)));
    let out = sbatch.output().map_err(|e| StageError::Failed(format!("cannot run sbatch (is Slurm installed?): {e}")))?;
    if !out.status.success() {
        return Err(StageError::Failed(format!("sbatch refused the job: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
    tracing::info!(stage = %decl.name, "submitted Slurm job {job}");
    reporter.summary(&decl.name, &[format!("Slurm job {job}, log {}", log.display())]);
    let mut unknown = 0;
    loop {
        if interrupted.is_some_and(|f| f.load(Ordering::Relaxed)) {
            let _ = Command::new("scancel").arg(&job).status();
            return Err(StageError::Interrupted(format!("Slurm job {job} cancelled")));
        }
        match query(&job) {
            Some(s) if s.is_active() => unknown = 0,
            Some(s) if s.state == "COMPLETED" => return Ok(()),
            Some(s) => {
                return Err(StageError::Failed(format!(
                    "Slurm job {job} ended {} (reason {}, exit code {}); log {}:\n{}",
                    s.state,
                    if s.reason.is_empty() { "None" } else { &s.reason },
                    s.exit_code,
                    log.display(),
                    log_tail(&log, 8)
                )));
            }
            None => {
                // Neither scontrol nor sacct knows the job: give Slurm a moment, then let
                // the cache decide (a job that committed its result succeeded).
                unknown += 1;
                if unknown > 20 {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_parse() {
        let line = "JobId=7 JobName=kiln-x-train UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15";
        let s = parse_scontrol(line).unwrap();
        assert_eq!((s.state.as_str(), s.reason.as_str(), s.exit_code.as_str()), ("TIMEOUT", "TimeLimit", "0:15"));
        assert!(!s.is_active());
        assert!(parse_scontrol("JobId=7 JobState=RUNNING").unwrap().is_active());
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
    }

    #[test]
    fn resources_become_sbatch_flags_and_words_are_quoted() {
        let r = Resources {
            cpus: Some(2),
            mem: Some("4G".into()),
            gpus: Some(1),
            time: Some("01:00:00".into()),
            partition: Some("gpu".into()),
        };
        assert_eq!(r.sbatch_args(), ["--cpus-per-task=2", "--mem=4G", "--gres=gpu:1", "--time=01:00:00", "--partition=gpu"]);
        assert_eq!(sh_quote("train.lr=0.1"), "train.lr=0.1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote("\"x\""), "'\"x\"'");
    }
}
