//! `corrections = "labels/corrections.csv"`: label fixes a person reviewed, applied after
//! every other labelling rule. The file is a dependency of the label stage, so it lives in
//! git beside the manifest, and editing it reruns the label stage and what follows it,
//! nothing before.
//!
//! A CSV file with a header row and the columns `id` and `label`, or JSONL (`.jsonl`,
//! `.ndjson`) with the fields `id` and `label`; other columns are ignored, so the
//! `suggested_corrections.csv` a label_issues stage writes can be committed as it is once
//! reviewed. A `label` is a class name (`a|b` for several), [`KEEP`] or empty (keep the
//! label the other rules gave: how a reviewer rejects a suggestion), or [`DROP`] (remove
//! the item). Every item a row keeps or relabels is marked `reviewed`, through convert's
//! shards, so a label_issues stage never suggests it again: a rejection is remembered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::formats::dataset::MULTI;
use crate::paths::dep_path;
use crate::stages::StageError;

/// The label that removes an item. The `!` keeps it apart from any sensible class name.
pub const DROP: &str = "!drop";
/// The label that keeps an item's label as the other rules gave it (as an empty one does).
pub const KEEP: &str = "-";

/// What one row asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    Keep,
    /// The new label, its parts trimmed, sorted and unique.
    Relabel(String),
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub fix: Fix,
    /// 1-based line of the file.
    pub line: usize,
}

/// A corrections file, read.
#[derive(Debug, Default)]
pub struct Corrections {
    /// As the manifest names it, for messages (`labels/corrections.csv:12`).
    pub file: String,
    pub by_id: BTreeMap<String, Correction>,
}

/// Whether a path names a file kind the corrections reader knows.
pub fn known_format(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    [".csv", ".jsonl", ".ndjson"].iter().any(|ext| lower.ends_with(ext))
}

impl Corrections {
    /// Reads `file` (relative to the workspace root `root`).
    pub fn load(root: &Path, file: &str) -> Result<Corrections, StageError> {
        let path = dep_path(root, file);
        let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
        let lower = file.to_ascii_lowercase();
        if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") { Self::parse_jsonl(file, &text) } else { Self::parse_csv(file, &text) }
    }

    /// `FILE:LINE`, for messages.
    pub fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.file)
    }

    fn parse_csv(file: &str, text: &str) -> Result<Corrections, StageError> {
        let fail = |line: usize, why: String| StageError::Config(format!("{file}:{line}: {why}"));
        // Flexible: a reviewer who deletes the trailing columns of a row has not broken it.
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
        let headers = reader.headers().map_err(|e| fail(1, e.to_string()))?.clone();
        let column = |name: &str| headers.iter().position(|h| h.trim() == name);
        let (Some(id_col), Some(label_col)) = (column("id"), column("label")) else {
            return Err(fail(
                1,
                format!(
                    "the header must name the columns `id` and `label` (it has {})",
                    headers.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        let mut out = Corrections { file: file.to_string(), by_id: BTreeMap::new() };
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line() as usize);
                fail(line, e.to_string())
            })?;
            let line = record.position().map_or(0, |p| p.line() as usize);
            let id = record.get(id_col).unwrap_or("").trim();
            let label = record.get(label_col).unwrap_or("");
            out.add(line, id, label)?;
        }
        Ok(out)
    }

    fn parse_jsonl(file: &str, text: &str) -> Result<Corrections, StageError> {
        let fail = |line: usize, why: String| StageError::Config(format!("{file}:{line}: {why}"));
        let mut out = Corrections { file: file.to_string(), by_id: BTreeMap::new() };
        for (n, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line = n + 1;
            let row: serde_json::Value = serde_json::from_str(raw).map_err(|e| fail(line, e.to_string()))?;
            let Some(obj) = row.as_object() else {
                return Err(fail(line, "expected an object such as {\"id\": \"…\", \"label\": \"…\"}".to_string()));
            };
            let id = match obj.get("id") {
                Some(serde_json::Value::String(s)) => s.trim().to_string(),
                _ => return Err(fail(line, "`id` is missing or not a string".to_string())),
            };
            let label = match obj.get("label") {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            out.add(line, &id, &label)?;
        }
        Ok(out)
    }

    fn add(&mut self, line: usize, id: &str, label: &str) -> Result<(), StageError> {
        if id.is_empty() {
            return Err(StageError::Config(format!("{}: the row has no `id`", self.at(line))));
        }
        let fix = parse_fix(label).map_err(|why| StageError::Config(format!("{}: {why}", self.at(line))))?;
        if let Some(first) = self.by_id.get(id) {
            return Err(StageError::Config(format!(
                "{}: item `{id}` is corrected twice (also on line {}); keep one row per item",
                self.at(line),
                first.line
            )));
        }
        self.by_id.insert(id.to_string(), Correction { fix, line });
        Ok(())
    }
}

/// One row of the corrections file that changed an item.
#[derive(Debug, Serialize)]
pub struct Applied {
    pub id: String,
    /// The label the other rules gave (none when they gave none, or dropped the item).
    pub from: Option<String>,
    /// The new label, or `!drop`.
    pub to: String,
    pub line: usize,
}

#[derive(Debug, Serialize)]
pub struct CorrectionsReport {
    pub file: String,
    pub rows: usize,
    pub applied: Vec<Applied>,
    /// Rows that left the label as the other rules gave it (blank, `-`, or the same label).
    pub kept: usize,
}

/// Every row of a corrections file must name an item of the input, and relabel it to
/// `classes` (the manifest's, else those the rules gave some item): all problems at once,
/// each at its line.
pub fn check_corrections(
    file: &Corrections,
    corrected: &BTreeSet<String>,
    applied: &[Applied],
    classes: &BTreeSet<String>,
) -> Result<(), StageError> {
    let mut problems: Vec<(usize, String)> = Vec::new();
    for (id, c) in &file.by_id {
        if !corrected.contains(id) {
            problems.push((c.line, format!("{}: no item has id `{id}`", file.at(c.line))));
        }
    }
    for a in applied.iter().filter(|a| a.to != DROP) {
        if let Some(bad) = a.to.split(MULTI).find(|part| !classes.contains(*part)) {
            problems.push((
                a.line,
                format!(
                    "{}: label `{bad}` is not a class (the classes are {})",
                    file.at(a.line),
                    classes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort();
    let n = problems.len();
    let shown: Vec<String> = problems.into_iter().take(5).map(|(_, p)| p).collect();
    Err(StageError::Config(format!(
        "corrections file `{}`: {}{}; ids are those of the items this stage reads, labels a class, `{DROP}` or empty",
        file.file,
        shown.join("; "),
        if n > 5 { format!("; and {} more", n - 5) } else { String::new() }
    )))
}

/// A `label` cell: empty or [`KEEP`], [`DROP`], or class names joined by `|`.
fn parse_fix(label: &str) -> Result<Fix, String> {
    match label.trim() {
        "" | KEEP => Ok(Fix::Keep),
        DROP => Ok(Fix::Drop),
        l => {
            let mut parts: Vec<&str> = l.split(MULTI).map(str::trim).filter(|p| !p.is_empty()).collect();
            parts.sort_unstable();
            parts.dedup();
            if parts.is_empty() {
                return Err(format!("label `{l}` names no class"));
            }
            Ok(Fix::Relabel(parts.join(MULTI)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Result<Corrections, StageError> {
        Corrections::parse_csv("c.csv", text)
    }

    #[test]
    fn csv_rows_keep_relabel_and_drop_with_their_lines() {
        let c = csv(concat!(
            "id,label,given,self_confidence\n",
            "a,cat,dog,0.01\n",
            "b,,dog,0.2\n",
            "c,-,cat,0.3\n",
            "d,!drop,cat,0.4\n",
            "e, dog | cat ,x,0\n",
        ))
        .unwrap();
        assert_eq!(c.by_id["a"], Correction { fix: Fix::Relabel("cat".into()), line: 2 });
        assert_eq!(c.by_id["b"].fix, Fix::Keep);
        assert_eq!(c.by_id["c"].fix, Fix::Keep);
        assert_eq!(c.by_id["d"], Correction { fix: Fix::Drop, line: 5 });
        assert_eq!(c.by_id["e"].fix, Fix::Relabel("cat|dog".into()));
        // A row cut short keeps its label.
        assert_eq!(csv("id,label\nz\n").unwrap().by_id["z"].fix, Fix::Keep);
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = csv("path,label\na,b\n").unwrap_err().to_string();
        assert!(e.contains("c.csv:1") && e.contains("`id` and `label`"), "{e}");
        let e = csv("id,label\na,cat\nb,dog\na,dog\n").unwrap_err().to_string();
        assert!(e.contains("c.csv:4") && e.contains("twice") && e.contains("line 2"), "{e}");
        let e = csv("id,label\n,cat\n").unwrap_err().to_string();
        assert!(e.contains("c.csv:2") && e.contains("no `id`"), "{e}");
        let e = Corrections::parse_jsonl("c.jsonl", "{\"id\": \"a\", \"label\": \"cat\"}\n\n[1]\n").unwrap_err().to_string();
        assert!(e.contains("c.jsonl:3"), "{e}");
    }

    #[test]
    fn jsonl_rows_read_like_csv_rows() {
        let text = concat!(
            "{\"id\": \"a\", \"label\": \"cat\", \"given\": \"dog\"}\n",
            "{\"id\": \"b\", \"label\": null}\n",
            "{\"id\": \"c\", \"label\": 7}\n",
        );
        let c = Corrections::parse_jsonl("c.jsonl", text).unwrap();
        assert_eq!(c.by_id["a"].fix, Fix::Relabel("cat".into()));
        assert_eq!(c.by_id["b"].fix, Fix::Keep);
        assert_eq!(c.by_id["c"], Correction { fix: Fix::Relabel("7".into()), line: 3 });
        assert!(known_format("labels/Fixes.CSV") && known_format("a.ndjson") && !known_format("a.txt"));
    }
}
