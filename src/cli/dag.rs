//! `kiln dag [FILE] [--format text|dot|mermaid]`

use clap::{Args, ValueEnum};

use super::{load, split_manifest};
use crate::Error;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
    Mermaid,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    /// The manifest.
    #[arg(value_name = "FILE")]
    words: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub fn dag(args: DagArgs) -> Result<(), Error> {
    let (path, _) = split_manifest(&args.words)?;
    let plan = load(&path)?;
    let (manifest, graph) = (plan.manifest(), plan.graph());
    let stages = &manifest.stages;
    let edges = || graph.order().iter().flat_map(|&i| graph.upstream(i).iter().map(move |&j| (j, i)));
    let mut out = String::new();
    match args.format {
        Format::Text => {
            for &i in graph.order() {
                let ups: Vec<&str> = graph.upstream(i).iter().map(|&j| stages[j].name.as_str()).collect();
                let arrow = if ups.is_empty() { String::new() } else { format!("  <- {}", ups.join(", ")) };
                out.push_str(&format!("{} [{}]{arrow}\n", stages[i].name, stages[i].kind));
            }
        }
        Format::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n", manifest.name));
            for &i in graph.order() {
                out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\", shape=box];\n", stages[i].name, stages[i].name, stages[i].kind));
            }
            for (a, b) in edges() {
                out.push_str(&format!("  \"{}\" -> \"{}\";\n", stages[a].name, stages[b].name));
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            out.push_str("flowchart LR\n");
            for &i in graph.order() {
                out.push_str(&format!("  {}[\"{} ({})\"]\n", stages[i].name, stages[i].name, stages[i].kind));
            }
            for (a, b) in edges() {
                out.push_str(&format!("  {} --> {}\n", stages[a].name, stages[b].name));
            }
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(())
}
