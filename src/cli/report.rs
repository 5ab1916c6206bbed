//! `kiln report [FILE] STAGE`: what a data stage found, for people.

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The manifest (optional), then the stage whose report to show.
    #[arg(value_name = "FILE] [STAGE", required = true)]
    words: Vec<String>,
    /// Print the report file as it is (JSON).
    #[arg(long)]
    json: bool,
}

pub fn report(args: ReportArgs, out: &CliReporter) -> Result<(), Error> {
    let (path, targets) = split_manifest(&args.words)?;
    let manifest = load(&path)?;
    let stages = crate::exec::resolve_targets(&manifest, &targets)?;
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
