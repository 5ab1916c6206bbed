//! The `kiln` command line: parse, call the library, render, map errors to exit codes.

mod dag;
mod gc;
mod init;
mod metrics;
mod predict;
mod progress;
mod remote;
mod report;
mod run;
mod runs;
mod status;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::plan::Plan;
use crate::stages::StageRegistry;
use crate::stats::WorkStats;
use crate::{Error, exit};

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  a stage failed, or an I/O or cache error
  2  invalid manifest or command line; nothing ran
  3  the cache is in use by another kiln process (with --no-wait)
  4  `kiln verify` found corrupt cache entries (they were removed)";

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Reproducible, incremental image-model pipelines from a TOML manifest.", after_help = EXIT_CODES)]
pub struct Cli {
    /// More log output on stderr (-v: why stages run, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long, global = true)]
    no_progress: bool,
    /// Write counters of the work done (files hashed, memo hits…) as JSON to FILE.
    #[arg(long, global = true, value_name = "FILE", hide = true)]
    work_stats: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a starter manifest (kiln.toml) for a folder of class folders or a CSV listing.
    Init(init::InitArgs),
    /// Run the pipeline (or the named stages and what they need); reuse cached results.
    Run(run::RunArgs),
    /// Say for each stage whether it is fresh or stale, and why.
    Status(status::StatusArgs),
    /// Print the stage graph as text, Graphviz dot or Mermaid.
    Dag(dag::DagArgs),
    /// Remove cache entries that no lock file refers to.
    Gc(gc::GcArgs),
    /// Rehash the whole cache; remove and report anything corrupt.
    Verify(gc::VerifyArgs),
    /// Show what a data stage found (clean findings, label balance, collect problems), or,
    /// with no stage named, write the pipeline's HTML report.
    Report(report::ReportArgs),
    /// List recorded runs with their changes and metrics; rank them with --sort.
    Runs(runs::RunsArgs),
    /// Show metrics, or compare two states (git revisions, runs, the workspace).
    Metrics(metrics::MetricsArgs),
    /// Classify images with a trained model, with the preprocessing it was trained with.
    Predict(predict::PredictArgs),
    /// Serve a trained model over HTTP (POST /v1/predict, GET /v1/model, /healthz, /metrics).
    Serve(predict::ServeArgs),
    /// Upload the lock file's results to [cache.remote].
    Push(remote::RemoteArgs),
    /// Download the lock file's results from [cache.remote] into the local cache.
    Pull(remote::RemoteArgs),
    /// Internal: run one stage on a Slurm node for a scheduling `kiln run`.
    #[command(name = "__run-stage", hide = true)]
    RunStage(run::RunStageArgs),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    let stats = Arc::new(WorkStats::default());
    let progress = !cli.no_progress && !cli.quiet && std::io::stderr().is_terminal();
    let reporter = progress::CliReporter::new(progress, cli.quiet);
    let result = match cli.command {
        Command::Init(args) => init::init(args, &reporter),
        Command::Run(args) => run::run(args, &reporter, stats.clone()),
        Command::Status(args) => status::status(args, &reporter, stats.clone()),
        Command::Dag(args) => dag::dag(args),
        Command::Gc(args) => gc::gc(args, &reporter, stats.clone()),
        Command::Verify(args) => gc::verify(args, &reporter, stats.clone()),
        Command::Report(args) => report::report(args, &reporter),
        Command::Runs(args) => runs::runs(args, &reporter),
        Command::Metrics(args) => metrics::metrics(args, &reporter),
        Command::Predict(args) => predict::predict(args, &reporter),
        Command::Serve(args) => predict::serve(args, &reporter),
        Command::Push(args) => remote::push(args, &reporter, stats.clone()),
        Command::Pull(args) => remote::pull(args, &reporter, stats.clone()),
        Command::RunStage(args) => run::run_stage(args, &reporter, stats.clone()),
    };
    if let Some(path) = &cli.work_stats {
        let _ = std::fs::write(path, serde_json::to_vec_pretty(&stats.to_json()).unwrap_or_default());
    }
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            let code = e.exit_code();
            reporter.clear();
            eprintln!("{:?}", miette::Report::new(e));
            code
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "kiln=info,warn",
        (false, _) => "kiln=debug,info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}

/// `[FILE] [STAGE...]`: the first word is the manifest when it looks like one.
fn split_manifest(words: &[String]) -> Result<(PathBuf, Vec<String>), Error> {
    if let Some(first) = words.first()
        && (first.ends_with(".toml") || Path::new(first).is_file())
    {
        return Ok((PathBuf::from(first), words[1..].to_vec()));
    }
    Ok((discover_manifest()?, words.to_vec()))
}

/// `kiln.toml` in the current directory, else the only manifest in `pipelines/`.
fn discover_manifest() -> Result<PathBuf, Error> {
    let here = PathBuf::from("kiln.toml");
    if here.is_file() {
        return Ok(here);
    }
    let dir = PathBuf::from("pipelines");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|items| items.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect())
        .unwrap_or_default();
    found.sort();
    match found.as_slice() {
        [only] => Ok(only.clone()),
        [first, ..] => Err(Error::SeveralManifests {
            list: found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            example: first.display().to_string(),
            dir,
        }),
        [] => Err(Error::NoManifest { dir: std::env::current_dir().unwrap_or(dir) }),
    }
}

/// The plan of the manifest at `path`: checked, with its stage graph.
fn load(path: &Path) -> Result<Plan, Error> {
    Plan::load(path, &StageRegistry::builtin())
}
