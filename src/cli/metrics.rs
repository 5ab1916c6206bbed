//! `kiln metrics show` and `kiln metrics diff`: results of a state, and what changed
//! between two — git revisions of the lock file (`HEAD~1`), recorded runs (`r3`), or
//! `workspace` (the lock file as it is now).

use std::path::Path;

use clap::{Args, Subcommand};

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::cache::ArtifactReader;
use crate::cache::lockfile::LockFile;
use crate::compare::{self, Snapshot, StageDiff};
use crate::manifest::Manifest;
use crate::runs::{RunLog, lower_is_better};

#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[command(subcommand)]
    command: MetricsCommand,
}

#[derive(Debug, Subcommand)]
enum MetricsCommand {
    /// Print the metrics of a state (default: the lock file), or of a metrics.json file.
    Show(ShowArgs),
    /// Compare two states: per-metric and per-class deltas, and the items that flipped
    /// between right and wrong.
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// `[FILE] [STATE]`: a manifest, then `workspace` (default), a run id (`r3`) or a git
    /// revision; or the path of a metrics.json.
    #[arg(value_name = "FILE] [STATE")]
    words: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// `[FILE] [A] [B]`: states to compare. With none: HEAD against the workspace when the
    /// lock file is in git, else the last two runs. With one: it against the workspace.
    #[arg(value_name = "FILE] [A] [B")]
    words: Vec<String>,
    /// How many flipped items to list (all are counted).
    #[arg(long, default_value_t = 20, value_name = "N")]
    flips: usize,
    #[arg(long)]
    json: bool,
}

pub fn metrics(args: MetricsArgs, out: &CliReporter) -> Result<(), Error> {
    match args.command {
        MetricsCommand::Show(a) => show(a, out),
        MetricsCommand::Diff(a) => diff(a, out),
    }
}

fn show(args: ShowArgs, out: &CliReporter) -> Result<(), Error> {
    if let Some(file) = args.words.first().filter(|w| w.ends_with(".json")) {
        let path = Path::new(file);
        let bytes = std::fs::read(path).map_err(|source| Error::Io { action: "read", path: path.into(), source })?;
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Io { action: "parse", path: path.into(), source: e.into() })?;
        if args.json {
            out.line(&serde_json::to_string_pretty(&doc).expect("json"));
        } else {
            print_headline(&crate::cache::lockfile::headline_metrics(&doc), out);
            print_details(&doc, out);
        }
        return Ok(());
    }
    let (path, rest) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let manifest = plan.manifest();
    let state = rest.first().map(String::as_str).unwrap_or("workspace");
    let snap = snapshot(manifest, state)?;
    let reader = ArtifactReader::new(&manifest.cache_dir);
    if snap.stages.is_empty() {
        out.line(&format!("no metrics in {state}: run a stage that writes metrics.json (an eval stage) first"));
        return Ok(());
    }
    let mut json = serde_json::Map::new();
    for (name, stage) in &snap.stages {
        let doc = match stage.artifact {
            Some(a) => reader.file(&a, "metrics.json")?.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()),
            None => None,
        };
        if args.json {
            json.insert(name.clone(), doc.unwrap_or_else(|| serde_json::to_value(&stage.metrics).expect("json")));
            continue;
        }
        out.line(&format!("{name} ({state}):"));
        print_headline(&stage.metrics, out);
        if let Some(doc) = doc {
            print_details(&doc, out);
        }
    }
    if args.json {
        out.line(&serde_json::to_string_pretty(&json).expect("json"));
    }
    Ok(())
}

fn print_headline(metrics: &std::collections::BTreeMap<String, f64>, out: &CliReporter) {
    for (k, v) in metrics {
        out.line(&format!("  {k:<28} {}", number(*v)));
    }
}

/// The per-class table and confusion matrix of a classification metrics.json.
fn print_details(doc: &serde_json::Value, out: &CliReporter) {
    let classes: Vec<&str> = doc["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
    if classes.is_empty() {
        return;
    }
    let width = classes.iter().map(|c| c.chars().count()).max().unwrap_or(5).clamp(5, 24);
    out.line(&format!("  {:<width$} {:>9} {:>9} {:>9} {:>8}", "class", "precision", "recall", "f1", "support"));
    for c in &classes {
        let m = &doc["per_class"][c];
        let f = |k: &str| m[k].as_f64().map_or("-".into(), |v| format!("{v:.4}"));
        out.line(&format!("  {c:<width$} {:>9} {:>9} {:>9} {:>8}", f("precision"), f("recall"), f("f1"), count(&m["support"])));
    }
    if let Some(rows) = doc["confusion_matrix"].as_array() {
        out.line("  confusion matrix (rows: true class, columns: predicted class):");
        for line in confusion_lines(&classes, rows) {
            out.line(&format!("  {line}"));
        }
    }
}

/// Class names longer than this are replaced by their index in the matrix's header row.
const MATRIX_NAME_WIDTH: usize = 12;

/// The confusion matrix as aligned text: a header row naming the predicted classes (or, when
/// a name is long, numbering them), then one row per true class with its counts
/// right-aligned under the header.
fn confusion_lines(classes: &[&str], rows: &[serde_json::Value]) -> Vec<String> {
    let counts: Vec<Vec<String>> = rows.iter().map(|r| r.as_array().into_iter().flatten().map(count).collect()).collect();
    let by_index = classes.iter().any(|c| c.chars().count() > MATRIX_NAME_WIDTH);
    let columns = counts.iter().map(Vec::len).max().unwrap_or(0).max(classes.len());
    let heads: Vec<String> = (0..columns)
        .map(|j| match classes.get(j) {
            Some(c) if !by_index => c.to_string(),
            _ => j.to_string(),
        })
        .collect();
    let labels: Vec<String> = (0..counts.len())
        .map(|i| match classes.get(i) {
            Some(c) if by_index => format!("{i} {c}"),
            Some(c) => c.to_string(),
            None => i.to_string(),
        })
        .collect();
    let corner = "true \\ predicted";
    let label_width = labels.iter().map(|l| l.chars().count()).chain([corner.chars().count()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|j| counts.iter().filter_map(|r| r.get(j)).map(|c| c.chars().count()).chain([heads[j].chars().count()]).max().unwrap_or(1))
        .collect();
    let line = |label: &str, cells: &[String]| {
        let mut s = format!("{label:<label_width$}");
        for (j, &w) in widths.iter().enumerate() {
            s.push_str(&format!("  {:>w$}", cells.get(j).map_or("", String::as_str)));
        }
        s.trim_end().to_string()
    };
    let mut lines = vec![line(corner, &heads)];
    for (label, row) in labels.iter().zip(&counts) {
        lines.push(line(label, row));
    }
    lines
}

/// A count as text: a whole number as such, anything else as JSON.
fn count(v: &serde_json::Value) -> String {
    v.as_u64().map_or_else(|| v.to_string(), |n| n.to_string())
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}") }
}

/// The results of `state` as the user named it.
fn snapshot(manifest: &Manifest, state: &str) -> Result<Snapshot, Error> {
    if state == "workspace" {
        return Ok(Snapshot::from_lock("workspace", &LockFile::read(&manifest.lock_path())?));
    }
    if RunLog::is_run_id(state) {
        return Ok(Snapshot::from_run(&RunLog::new(&manifest.cache_dir).get(state)?));
    }
    let lock = git_lock(manifest, state)?;
    Ok(Snapshot::from_lock(state, &lock))
}

/// `git -C DIR … REV:./NAME` addresses the lock file from its own directory.
fn lock_dir_and_name(lock: &Path) -> (&Path, String) {
    let dir = lock.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    (dir, lock.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

/// The lock file as committed at git revision `rev`.
fn git_lock(manifest: &Manifest, rev: &str) -> Result<LockFile, Error> {
    let lock = manifest.lock_path();
    let (dir, name) = lock_dir_and_name(&lock);
    let spec = format!("{rev}:./{name}");
    let fail = |message: String| Error::Git { rev: rev.to_string(), path: lock.display().to_string(), message };
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["show", &spec])
        .output()
        .map_err(|e| fail(format!("cannot run git: {e}")))?;
    if !output.status.success() {
        let why = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(fail(format!("{why} (a state is `workspace`, a run id like `r3` from `kiln runs`, or a git revision)")));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    toml::from_str(&text).map_err(|e| fail(e.to_string().trim().to_string()))
}

fn lock_in_git(manifest: &Manifest) -> bool {
    let lock = manifest.lock_path();
    let (dir, name) = lock_dir_and_name(&lock);
    std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "-e", &format!("HEAD:./{name}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn diff(args: DiffArgs, out: &CliReporter) -> Result<(), Error> {
    let (path, rest) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let manifest = plan.manifest();
    let (a, b) = match rest.as_slice() {
        [] if lock_in_git(manifest) => ("HEAD".to_string(), "workspace".to_string()),
        [] => {
            let runs: Vec<String> =
                RunLog::new(&manifest.cache_dir).list()?.into_iter().filter(|r| r.pipeline == manifest.name).map(|r| r.id).collect();
            match runs.as_slice() {
                [.., x, y] => (x.clone(), y.clone()),
                _ => {
                    return Err(Error::Usage(
                        "nothing to compare: the lock file is not in git and there are fewer than two recorded runs; name two states"
                            .into(),
                    ));
                }
            }
        }
        [a] => (a.clone(), "workspace".to_string()),
        [a, b] => (a.clone(), b.clone()),
        [_, _, extra, ..] => return Err(Error::Usage(format!("`kiln metrics diff` compares two states; `{extra}` is a third"))),
    };
    let (sa, sb) = (snapshot(manifest, &a)?, snapshot(manifest, &b)?);
    let diffs = compare::diff(&sa, &sb, &ArtifactReader::new(&manifest.cache_dir))?;
    if args.json {
        let doc = serde_json::json!({ "a": a, "b": b, "stages": diffs });
        out.line(&serde_json::to_string_pretty(&doc).expect("json"));
        return Ok(());
    }
    if diffs.is_empty() {
        out.line(&format!("no metrics in {a} or {b}"));
    }
    for d in &diffs {
        print_diff(d, &a, &b, args.flips, out);
    }
    Ok(())
}

fn print_diff(d: &StageDiff, a: &str, b: &str, max_flips: usize, out: &CliReporter) {
    out.line(&format!("{}: {a} → {b}", d.stage));
    out.line(&format!("  {:<28} {:>10} {:>10} {:>10}", "metric", short(a), short(b), "change"));
    let cell = |v: Option<f64>| v.map_or("-".to_string(), number);
    for (k, [x, y]) in &d.metrics {
        let change = match (x, y) {
            (Some(x), Some(y)) if x == y => "=".to_string(),
            (Some(x), Some(y)) => {
                let better = if lower_is_better(k) { y < x } else { y > x };
                format!("{:+.4} {}", y - x, if better { "better" } else { "worse" })
            }
            _ => String::new(),
        };
        out.line(&format!("  {k:<28} {:>10} {:>10} {change:>10}", cell(*x), cell(*y)));
    }
    if !d.per_class.is_empty() {
        let width = d.per_class.iter().map(|c| c.class.len()).max().unwrap_or(5).clamp(5, 24);
        out.line(&format!("  {:<width$} {:>9} {:>9} {:>9} {:>9}", "class", "f1 before", "f1 after", "Δ f1", "Δ recall"));
        for c in &d.per_class {
            let delta = |p: [Option<f64>; 2]| match p {
                [Some(x), Some(y)] => format!("{:+.4}", y - x),
                _ => "-".into(),
            };
            out.line(&format!("  {:<width$} {:>9} {:>9} {:>9} {:>9}", c.class, cell(c.f1[0]), cell(c.f1[1]), delta(c.f1), delta(c.recall)));
        }
    }
    let fixed = d.flips.iter().filter(|f| f.fixed).count();
    let broken = d.flips.len() - fixed;
    if !d.flips.is_empty() || d.notes.is_empty() {
        out.line(&format!("  flipped: {fixed} now right, {broken} now wrong"));
    }
    for f in d.flips.iter().take(max_flips) {
        let what = if f.fixed { "now right" } else { "now wrong" };
        let source = if f.source.is_empty() { String::new() } else { format!("  {}", f.source) };
        out.line(&format!("    {what:<9} {}{source}  ({}): {} {:.2} → {} {:.2}", f.id, f.label, f.before, f.p_before, f.after, f.p_after));
    }
    if d.flips.len() > max_flips {
        out.line(&format!("    … {} more (--flips N)", d.flips.len() - max_flips));
    }
    for n in &d.notes {
        out.line(&format!("  note: {n}"));
    }
}

fn short(state: &str) -> String {
    state.chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    use super::confusion_lines;

    #[test]
    fn confusion_matrix_columns_line_up_under_class_names() {
        let rows = serde_json::json!([[19, 11, 0, 0], [2, 130, 1, 0], [0, 0, 7, 0], [0, 0, 0, 1000]]);
        let lines = confusion_lines(&["circle", "square", "triangle", "star"], rows.as_array().unwrap());
        assert_eq!(
            lines,
            [
                "true \\ predicted  circle  square  triangle  star",
                "circle                19      11         0     0",
                "square                 2     130         1     0",
                "triangle               0       0         7     0",
                "star                   0       0         0  1000",
            ]
        );
    }

    #[test]
    fn long_class_names_are_numbered_in_the_header() {
        let rows = serde_json::json!([[3, 1], [0, 4]]);
        let lines = confusion_lines(&["a_rather_long_class_name", "b"], rows.as_array().unwrap());
        assert_eq!(lines, ["true \\ predicted            0  1", "0 a_rather_long_class_name  3  1", "1 b                         0  4"]);
    }
}
