//! `kiln report [FILE] STAGE`: what a data stage (or label_issues) found, for people;
//! `kiln report [FILE]`: the HTML report of a run.

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The manifest (optional), then the stage whose report to show. With no stage, the
    /// HTML report of a run is written.
    #[arg(value_name = "FILE] [STAGE")]
    words: Vec<String>,
    /// Print the report file as it is (JSON).
    #[arg(long)]
    json: bool,
    /// The run the HTML report describes (default: the latest; `kiln runs` lists them).
    #[arg(long, value_name = "ID")]
    run: Option<String>,
    /// Where to write the HTML report (default: `outputs/<pipeline>-<run>.html`).
    #[arg(long, short = 'o', value_name = "PATH")]
    out: Option<std::path::PathBuf>,
}

pub fn report(args: ReportArgs, out: &CliReporter) -> Result<(), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let manifest = plan.manifest();
    if targets.is_empty() {
        return html(&plan, &args, out);
    }
    let stages = plan.resolve_targets(&targets)?;
    for i in stages {
        let decl = &manifest.stages[i];
        let file = manifest.outputs_dir().join(&decl.name).join(format!("{}_report.json", decl.kind));
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            action: "read the report (run the stage first)",
            path: file.clone(),
            source,
        })?;
        if args.json {
            out.line(text.trim_end());
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Io { action: "parse", path: file.clone(), source: e.into() })?;
        out.line(&format!("{} ({}):", decl.name, decl.kind));
        let s = |v: &serde_json::Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
        match decl.kind.as_str() {
            "clean" => {
                out.line(&format!(
                    "  {} items in, {} kept, {} quarantined, {} dropped",
                    v["items_in"], v["items_kept"], v["quarantined"], v["dropped"]
                ));
                for (class, n) in v["per_class"].as_object().into_iter().flatten() {
                    let (items, removed) = (n["items_in"].as_u64().unwrap_or(0), n["removed"].as_u64().unwrap_or(0));
                    if removed > 0 {
                        let why: Vec<String> =
                            n["by_check"].as_object().into_iter().flatten().map(|(check, k)| format!("{k} {check}")).collect();
                        out.line(&format!(
                            "  class {class:<16} {removed} of {items} removed ({:.1} %: {})",
                            100.0 * removed as f64 / items.max(1) as f64,
                            why.join(", ")
                        ));
                    }
                }
                for f in v["findings"].as_array().into_iter().flatten() {
                    let score = f
                        .get("score")
                        .filter(|x| !x.is_null())
                        .map(|x| format!(" [score {:.2}]", x.as_f64().unwrap_or(0.0)))
                        .unwrap_or_default();
                    out.line(&format!("  {:<10} {:<17} {}  {}{score}", s(&f["policy"]), s(&f["check"]), s(&f["source"]), s(&f["reason"])));
                }
                for g in v["duplicate_groups"].as_array().into_iter().flatten() {
                    let copies: Vec<String> = g["copies"].as_array().into_iter().flatten().map(|c| s(&c["id"])).collect();
                    out.line(&format!("  kept {} over {}", s(&g["kept"]), copies.join(", ")));
                }
            }
            "label" => {
                for c in v["classes"].as_array().into_iter().flatten() {
                    out.line(&format!("  {:<20} {}", s(&c["class"]), c["count"]));
                }
                out.line(&format!("  imbalance ratio {}", v["imbalance_ratio"]));
                for d in v["dropped"].as_array().into_iter().flatten() {
                    out.line(&format!("  dropped {}  {}", s(&d["source"]), s(&d["reason"])));
                }
                for c in v["conflicts"].as_array().into_iter().flatten() {
                    out.line(&format!("  conflict {}: {} → {}", s(&c["id"]), c["labels"], s(&c["resolution"])));
                }
                let corrections = &v["corrections"];
                if corrections.is_object() {
                    out.line(&format!(
                        "  corrections {}: {} rows, {} applied, {} kept the label",
                        s(&corrections["file"]),
                        corrections["rows"],
                        corrections["applied"].as_array().map_or(0, Vec::len),
                        corrections["kept"]
                    ));
                    for a in corrections["applied"].as_array().into_iter().flatten() {
                        let from = if a["from"].is_null() { "-".to_string() } else { s(&a["from"]) };
                        out.line(&format!("  corrected {}: {from} → {} (line {})", s(&a["id"]), s(&a["to"]), a["line"]));
                    }
                }
            }
            "label_issues" => {
                out.line(&format!(
                    "  {} items judged in {} folds, out-of-fold accuracy {:.4}; {} suspected wrong labels (policy {})",
                    v["judged"],
                    v["folds"],
                    v["out_of_fold_accuracy"].as_f64().unwrap_or(0.0),
                    v["suspected"],
                    s(&v["policy"])
                ));
                for c in v["classes"].as_array().into_iter().flatten().filter(|c| c["flagged"].as_u64().unwrap_or(0) > 0) {
                    out.line(&format!("  class {:<16} {} of {} flagged", s(&c["class"]), c["flagged"], c["given"]));
                }
                let suspects = v["suspects"].as_array().map_or(&[][..], Vec::as_slice);
                if !suspects.is_empty() {
                    out.line(&format!(
                        "  {:>5}  {:<12} {:<12} {:>7}  {:<5}  {}",
                        "rank", "given", "suggested", "score", "split", "id (source)"
                    ));
                }
                for x in suspects {
                    out.line(&format!(
                        "  {:>5}  {:<12} {:<12} {:>7.4}  {:<5}  {} ({})",
                        x["rank"].as_u64().unwrap_or(0),
                        s(&x["given"]),
                        s(&x["suggested"]),
                        x["self_confidence"].as_f64().unwrap_or(0.0),
                        s(&x["split"]),
                        s(&x["id"]),
                        s(&x["source"])
                    ));
                }
            }
            _ => {
                out.line(&format!("  {} items", v["items"]));
                for p in v["problems"].as_array().into_iter().flatten() {
                    out.line(&format!("  {}  {}", s(&p["path"]), s(&p["reason"])));
                }
            }
        }
    }
    Ok(())
}

fn html(plan: &crate::plan::Plan, args: &ReportArgs, out: &CliReporter) -> Result<(), Error> {
    use crate::html_report::{ReportInput, StageRow, render};
    let (manifest, graph) = (plan.manifest(), plan.graph());
    let log = crate::runs::RunLog::new(&manifest.cache_dir);
    let run = match &args.run {
        Some(id) => Some(log.get(id)?),
        None => log.list()?.into_iter().rev().find(|r| r.pipeline == manifest.name),
    };
    let reader = crate::cache::ArtifactReader::new(&manifest.cache_dir);
    let (stages, title, overrides, tag) = match &run {
        Some(r) => (
            StageRow::from_run(r),
            format!("{} — run {} ({} UTC)", manifest.name, r.id, super::runs::utc(r.started)),
            r.overrides.iter().map(|o| o.to_arg()).collect(),
            r.id.clone(),
        ),
        None => {
            // No recorded run (a lock file from git, say): describe what the lock names.
            let lock = crate::cache::lockfile::LockFile::read(&manifest.lock_path())?;
            let stages = lock
                .stages
                .iter()
                .map(|(n, s)| {
                    (n.clone(), StageRow { outcome: "locked".into(), seconds: None, artifact: Some(s.artifact), key: Some(s.key) })
                })
                .collect();
            (stages, format!("{} — lock file", manifest.name), Vec::new(), "lock".to_string())
        }
    };
    let input = ReportInput { manifest, graph, stages, title, overrides, reader: &reader };
    let page = render(&input)?;
    let dest = args.out.clone().unwrap_or_else(|| manifest.root.join("outputs").join(format!("{}-{tag}.html", manifest.name)));
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { action: "create", path: dir.to_path_buf(), source })?;
    }
    std::fs::write(&dest, page).map_err(|source| Error::Io { action: "write", path: dest.clone(), source })?;
    out.line(&dest.display().to_string());
    Ok(())
}
