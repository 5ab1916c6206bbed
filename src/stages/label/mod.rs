//! `kind = "label"`: give every item one clean label, from a fixed class list.
//!
//! ```toml
//! [stages.label]
//! kind = "label"
//! inputs = ["clean"]
//! from = "folder"                    # "collected" (what collect found), "folder",
//!                                    # "mapping" (a CSV/JSONL file) or "pattern"
//! pattern = '^(?P<label>[a-z]+)_\d+' # with from = "pattern": matched on the file name
//! classes = ["cat", "dog"]           # optional: fixes the order; other labels are unknown
//! aliases = { Cat = "cat", cats = "cat" }
//! unknown = "error"                  # or "drop"
//! conflicts = "drop"                 # duplicates that disagree: "drop", "majority", "first"
//! corrections = "labels/corrections.csv"   # reviewed fixes, applied last (see `corrections`)
//! ```
//!
//! An item may have several classes, written `cat|dog` in a mapping, listing or pattern
//! result; each part must be a known class, and convert encodes them multi-hot.
//!
//! Writes the labelled dataset, `classes.json` (the class order every later stage uses)
//! and `label_report.json` (class balance, dropped items and why, conflicts, the
//! corrections applied).

mod corrections;
mod sources;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, PlanView, Stage, StageContext, StageError, StageKind, io, parse_config, upstream};
use crate::diagnostic::{Bounds, Checker, Issue, ValueSpans};
use crate::formats::dataset::MULTI;
use crate::paths::normalize_dep;
use corrections::{Applied, Corrections, CorrectionsReport, DROP, Fix, check_corrections};

pub struct LabelKind;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum From {
    #[default]
    Collected,
    Folder,
    Mapping,
    Pattern,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MapKey {
    /// The item's source path, or just its file name.
    #[default]
    Path,
    Digest,
    Id,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mapping {
    path: String,
    #[serde(default)]
    key: MapKey,
    #[serde(default = "default_key_field")]
    key_field: String,
    #[serde(default = "default_label_field")]
    label_field: String,
}

fn default_key_field() -> String {
    "path".into()
}
fn default_label_field() -> String {
    "label".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnUnknown {
    #[default]
    Error,
    Drop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnMissing {
    #[default]
    Drop,
    Error,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnConflict {
    #[default]
    Drop,
    Majority,
    First,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    from: From,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mapping: Option<Mapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    classes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    aliases: BTreeMap<String, String>,
    #[serde(default)]
    unknown: OnUnknown,
    #[serde(default)]
    missing: OnMissing,
    #[serde(default)]
    conflicts: OnConflict,
    /// Warn when the largest class outnumbers the smallest by more than this.
    #[serde(default = "default_imbalance")]
    imbalance_warning: f64,
    /// A reviewed CSV or JSONL file of `id,label` fixes, applied after every other rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    corrections: Option<String>,
}

fn default_imbalance() -> f64 {
    3.0
}

#[derive(Debug)]
pub struct LabelStage {
    config: Config,
    pattern: Option<regex::Regex>,
    deps: Vec<Spanned<String>>,
}

impl StageKind for LabelKind {
    fn name(&self) -> &'static str {
        "label"
    }

    fn version(&self) -> u32 {
        // 2: items a corrections row kept or relabelled are marked reviewed.
        // 3: an alias may name several classes (`a|b`): split, sorted and deduplicated.
        3
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        let mut deps = Vec::new();
        let pattern = match (&config.from, &config.pattern) {
            (From::Pattern, None) => {
                ck.fail("from", "`from = \"pattern\"` needs `pattern`", "e.g. pattern = '^(?P<label>[a-z]+)_'");
                None
            }
            (_, Some(p)) => match regex::Regex::new(p) {
                // Group 0 is the whole match: the label needs a group of its own.
                Ok(r) if r.captures_len() > 1 => Some(r),
                Ok(_) => {
                    ck.fail(
                        "pattern",
                        format!("pattern `{p}` has no capture group, so it can find no label"),
                        "capture the label, e.g. pattern = '^(?P<label>[a-z]+)_'",
                    );
                    None
                }
                Err(e) => {
                    ck.fail("pattern", format!("invalid pattern: {e}"), "patterns use the syntax of Rust's `regex` crate");
                    None
                }
            },
            _ => None,
        };
        if config.pattern.is_some() && config.from != From::Pattern {
            ck.fail("pattern", "`pattern` applies only to `from = \"pattern\"`", "remove it, or set `from = \"pattern\"`");
        }
        match (&config.from, &config.mapping) {
            (From::Mapping, None) => ck.fail(
                "from",
                "`from = \"mapping\"` needs `mapping = { path = \"labels.csv\" }`",
                "a mapping is a CSV or JSONL file with a key and a label column",
            ),
            (From::Mapping, Some(m)) => {
                match normalize_dep(&m.path) {
                    Ok(p) => deps.push(Spanned::new(spans.get("mapping.path"), p)),
                    Err(why) => ck.fail(
                        "mapping.path",
                        format!("invalid mapping path `{}`: {why}", m.path),
                        "a path relative to the workspace root, e.g. `labels.csv`",
                    ),
                }
                for (field, value) in [("mapping.key_field", &m.key_field), ("mapping.label_field", &m.label_field)] {
                    if value.trim().is_empty() {
                        ck.fail(field, format!("`{field}` is empty"), "name the column (CSV) or field (JSONL) to read");
                    }
                }
            }
            (_, Some(_)) => ck.fail("mapping", "`mapping` applies only to `from = \"mapping\"`", "remove it, or set `from = \"mapping\"`"),
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in config.classes.iter().enumerate() {
            let path = format!("classes[{i}]");
            if !seen.insert(c) {
                ck.fail(&path, format!("class `{c}` is listed twice in `classes`"), "list each class once: its position is its index");
            } else if c.trim().is_empty() || c.trim() != c.as_str() {
                ck.fail(
                    &path,
                    format!("class name `{c}` is empty or starts or ends with spaces"),
                    "labels are trimmed, so such a class never matches",
                );
            } else if c.contains(MULTI) {
                ck.fail(
                    &path,
                    format!("class `{c}` contains `{MULTI}`, which separates the classes of an item"),
                    "rename the class, e.g. with `_` in place of `|`",
                );
            }
        }
        for (alias, to) in &config.aliases {
            if alias.trim().is_empty() || alias.trim() != alias.as_str() || alias.contains(MULTI) {
                ck.fail(
                    &format!("aliases.{alias}"),
                    format!("alias `{alias}` can never match: labels are split at `{MULTI}` and trimmed before aliases apply"),
                    "name one trimmed label, e.g. `aliases = { Cats = \"cat\" }`",
                );
            }
            if to.split(MULTI).all(|part| part.trim().is_empty()) {
                ck.fail(&format!("aliases.{alias}"), format!("alias `{alias}` maps to an empty label"), "map it to a class name");
            }
        }
        ck.float(
            "imbalance_warning",
            config.imbalance_warning,
            Bounds::closed(1.0, 1e6),
            "largest class over smallest; 1 warns at any imbalance",
        );
        if let Some(file) = &config.corrections {
            match normalize_dep(file) {
                Ok(p) if corrections::known_format(&p) => deps.push(Spanned::new(spans.get("corrections"), p)),
                Ok(_) => ck.fail(
                    "corrections",
                    format!("corrections file `{file}` is neither CSV nor JSONL"),
                    "name a `.csv` file with the columns `id` and `label`, or a `.jsonl` file with those fields",
                ),
                Err(why) => ck.fail(
                    "corrections",
                    format!("invalid corrections path `{file}`: {why}"),
                    "a path relative to the workspace root, e.g. `labels/corrections.csv`",
                ),
            }
        }
        let issues = ck.into_issues();
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(LabelStage { config, pattern, deps }))
    }
}

#[derive(Debug, Serialize)]
struct ClassCount {
    class: String,
    count: usize,
}

#[derive(Debug, Serialize)]
struct Dropped {
    id: String,
    source: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Conflict {
    id: String,
    labels: BTreeMap<String, String>,
    resolution: String,
}

#[derive(Debug, Serialize)]
struct Report {
    items_in: usize,
    items_labelled: usize,
    classes: Vec<ClassCount>,
    imbalance_ratio: f64,
    aliases_applied: usize,
    dropped: Vec<Dropped>,
    conflicts: Vec<Conflict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrections: Option<CorrectionsReport>,
}

/// What the labelling rules decided for one item, before the corrections file has its say.
enum Outcome {
    Label(String),
    /// No rule found a label.
    Missing,
    /// Removed, for the reason given.
    Drop(String),
}

impl Stage for LabelStage {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("label config serialises")
    }

    /// Against synthetic sources upstream, whose labels the manifest fixes: `classes`
    /// must list what arrives (unless unknown labels are dropped) and nothing that cannot.
    fn plan_issues(&self, plan: &dyn PlanView) -> Vec<Issue> {
        let mut issues: Vec<Issue> = super::one_input_issue(plan).into_iter().collect();
        let this = plan.this();
        let chain = upstream::dataset_chain(plan, &this);
        let Some(known) = upstream::synthetic_labels(&chain) else { return issues };
        let cfg = &self.config;
        match cfg.from {
            From::Collected => {}
            From::Folder => {
                issues.push(
                    Issue::new(
                        plan.span("from"),
                        format!("the items of stage `{}` are drawn, not read from class folders: none would get a label", known.collect),
                    )
                    .help("use `from = \"collected\"`: a synthetic source labels each image with its shape"),
                );
                return issues;
            }
            From::Mapping | From::Pattern => return issues,
        }
        // The labels that arrive, after this stage's aliases.
        let mut arriving: BTreeMap<String, u64> = BTreeMap::new();
        for (label, n) in known.counts.iter().filter(|(_, n)| **n > 0) {
            let to = cfg.aliases.get(label).cloned().unwrap_or_else(|| label.clone());
            *arriving.entry(to).or_default() += *n;
        }
        if cfg.classes.is_empty() || arriving.keys().any(|l| l.contains(MULTI)) {
            return issues;
        }
        let drawn = arriving.iter().map(|(c, n)| format!("`{c}` ({n})")).collect::<Vec<_>>().join(", ");
        let outside: Vec<&str> = arriving.keys().map(String::as_str).filter(|l| !cfg.classes.iter().any(|c| c.as_str() == *l)).collect();
        if cfg.unknown == OnUnknown::Error && !outside.is_empty() {
            issues.push(
                Issue::new(
                    plan.span("classes"),
                    format!(
                        "stage `{}` draws {}, which `classes` does not list: with `unknown = \"error\"` this stage would fail",
                        known.collect,
                        outside.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ")
                    ),
                )
                .help(format!(
                    "add them to `classes`, map them with `aliases = {{ {} = \"...\" }}`, or set `unknown = \"drop\"`",
                    outside[0]
                )),
            );
        }
        for (i, class) in cfg.classes.iter().enumerate() {
            if !arriving.contains_key(class) {
                issues.push(
                    Issue::new(
                        plan.span(&format!("classes[{i}]")),
                        format!("class `{class}` never occurs: stage `{}` draws only {drawn}", known.collect),
                    )
                    .help("list only classes the data has: a synthetic source labels each image with its shape, and its `shapes` and `count` decide which occur"),
                );
            }
        }
        issues
    }

    fn path_deps(&self) -> Vec<Spanned<String>> {
        self.deps.clone()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (input, artifact) = io::single_input(cx)?;
        let items = io::read(cx, input, artifact)?;
        let mut meta = io::read_meta(cx, input, artifact)?;
        let mapping = self.load_mapping(cx)?;
        let cfg = &self.config;
        let mut aliases_applied = 0;
        // A label may name several classes (`cat|dog`, for multi-hot encoding): aliases
        // apply to each part, an alias may itself name several (`"0" = "even|round"`), and
        // the parts are kept sorted and unique.
        let mut canonical = |raw: Option<String>| {
            let raw = raw?;
            let mut parts: Vec<String> = raw
                .split(MULTI)
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .flat_map(|l| match cfg.aliases.get(l) {
                    Some(to) => {
                        aliases_applied += 1;
                        to.split(MULTI).map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect::<Vec<_>>()
                    }
                    None => vec![l.to_string()],
                })
                .collect();
            parts.sort();
            parts.dedup();
            (!parts.is_empty()).then(|| parts.join(MULTI))
        };

        let corrections = match &cfg.corrections {
            Some(file) => Some(Corrections::load(cx.root, file)?),
            None => None,
        };
        let mut applied: Vec<Applied> = Vec::new();
        let mut kept = 0;
        // Which corrected ids were found, and every class the rules gave some item (what a
        // correction may name when `classes` does not list them).
        let mut corrected: BTreeSet<String> = BTreeSet::new();
        let mut found: BTreeSet<String> = BTreeSet::new();

        let mut labelled = Vec::new();
        let mut dropped = Vec::new();
        let mut conflicts = Vec::new();
        let mut unknown: Vec<(String, String)> = Vec::new();
        for item in items {
            let mut reviewed = false;
            let own = canonical(self.raw_label(
                &item.id,
                &item.source,
                item.origin.as_ref().unwrap_or(&item.digest),
                item.label.as_deref(),
                &mapping,
            ));
            // The labels its removed duplicates would have had.
            let mut all: BTreeMap<String, String> = BTreeMap::new();
            if let Some(l) = &own {
                all.insert(item.id.clone(), l.clone());
            }
            for d in &item.duplicates {
                if let Some(l) = canonical(self.raw_label(&d.id, &d.source, &d.digest, d.label.as_deref(), &mapping)) {
                    all.insert(d.id.clone(), l);
                }
            }
            let mut distinct: Vec<&String> = all.values().collect();
            distinct.sort();
            distinct.dedup();
            let mut outcome = if distinct.len() > 1 {
                let resolved = match cfg.conflicts {
                    OnConflict::Drop => None,
                    OnConflict::First => own.clone(),
                    OnConflict::Majority => majority(&all),
                };
                let resolution = resolved.as_ref().map_or_else(|| "dropped".to_string(), |l| format!("labelled `{l}`"));
                conflicts.push(Conflict { id: item.id.clone(), labels: all.clone(), resolution });
                match resolved {
                    Some(l) => Outcome::Label(l),
                    None => Outcome::Drop(format!(
                        "duplicates disagree: {}",
                        distinct.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" vs ")
                    )),
                }
            } else {
                match own.or_else(|| distinct.first().map(|s| s.to_string())) {
                    Some(l) => Outcome::Label(l),
                    None => Outcome::Missing,
                }
            };
            if let Outcome::Label(l) = &outcome {
                found.extend(l.split(MULTI).map(String::from));
            }
            // A person's reviewed decision overrides every rule above.
            if let Some(file) = &corrections
                && let Some(fix) = file.by_id.get(&item.id)
            {
                corrected.insert(item.id.clone());
                reviewed = !matches!(fix.fix, Fix::Drop);
                let from = match &outcome {
                    Outcome::Label(l) => Some(l.clone()),
                    _ => None,
                };
                match &fix.fix {
                    Fix::Relabel(to) if from.as_ref() != Some(to) => {
                        applied.push(Applied { id: item.id.clone(), from, to: to.clone(), line: fix.line });
                        outcome = Outcome::Label(to.clone());
                    }
                    Fix::Drop => {
                        applied.push(Applied { id: item.id.clone(), from, to: DROP.to_string(), line: fix.line });
                        outcome = Outcome::Drop(format!("dropped by {}", file.at(fix.line)));
                    }
                    Fix::Keep | Fix::Relabel(_) => kept += 1,
                }
            }
            let label = match outcome {
                Outcome::Label(l) => l,
                Outcome::Drop(reason) => {
                    dropped.push(Dropped { id: item.id.clone(), source: item.source.clone(), reason });
                    continue;
                }
                Outcome::Missing => {
                    if cfg.missing == OnMissing::Error {
                        return Err(StageError::data(
                            input,
                            format!("item `{}` ({}) has no label (set `missing = \"drop\"` to drop such items)", item.id, item.source),
                        ));
                    }
                    dropped.push(Dropped { id: item.id.clone(), source: item.source.clone(), reason: "no label".into() });
                    continue;
                }
            };
            if !cfg.classes.is_empty() && label.split(MULTI).any(|part| !cfg.classes.iter().any(|c| c == part)) {
                unknown.push((item.source.clone(), label.clone()));
                dropped.push(Dropped {
                    id: item.id.clone(),
                    source: item.source.clone(),
                    reason: format!("label `{label}` is not in `classes`"),
                });
                continue;
            }
            let mut item = item;
            item.label = Some(label);
            item.reviewed |= reviewed;
            labelled.push(item);
        }
        if let Some(file) = &corrections {
            let classes: BTreeSet<String> = if cfg.classes.is_empty() { found } else { cfg.classes.iter().cloned().collect() };
            check_corrections(file, &corrected, &applied, &classes)?;
        }
        if cfg.unknown == OnUnknown::Error && !unknown.is_empty() {
            let shown: Vec<String> = unknown.iter().take(5).map(|(src, l)| format!("`{l}` ({src})")).collect();
            return Err(StageError::data(
                input,
                format!(
                    "{} items have labels not in `classes`: {}{}; add them to `classes` or `aliases`, or set `unknown = \"drop\"`",
                    unknown.len(),
                    shown.join(", "),
                    if unknown.len() > 5 { ", …" } else { "" }
                ),
            ));
        }

        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for item in &labelled {
            for class in item.label.as_deref().expect("labelled").split(MULTI) {
                *counts.entry(class).or_default() += 1;
            }
        }
        let classes: Vec<String> =
            if cfg.classes.is_empty() { counts.keys().map(|s| s.to_string()).collect() } else { cfg.classes.clone() };
        let class_counts: Vec<ClassCount> =
            classes.iter().map(|c| ClassCount { class: c.clone(), count: counts.get(c.as_str()).copied().unwrap_or(0) }).collect();
        let (max, min) = class_counts.iter().fold((0, usize::MAX), |(mx, mn), c| (mx.max(c.count), mn.min(c.count)));
        let imbalance_ratio = if min == 0 || class_counts.is_empty() { f64::INFINITY } else { max as f64 / min as f64 };
        let mut summary = vec![format!(
            "{} items in {} classes ({})",
            labelled.len(),
            classes.len(),
            class_counts.iter().map(|c| format!("{} {}", c.class, c.count)).collect::<Vec<_>>().join(", ")
        )];
        if !dropped.is_empty() {
            summary.push(format!("{} items dropped (see label_report.json)", dropped.len()));
        }
        if let Some(file) = &corrections {
            summary.push(format!("{} corrections applied from {} ({kept} rows kept the label)", applied.len(), file.file));
        }
        cx.reporter.summary(cx.stage, &summary);
        if imbalance_ratio > cfg.imbalance_warning {
            cx.reporter.warn(&format!(
                "stage `{}`: classes are imbalanced: the largest has {max} items, the smallest {min} (ratio {imbalance_ratio:.1} > {})",
                cx.stage, cfg.imbalance_warning
            ));
        }
        let report = Report {
            items_in: labelled.len() + dropped.len(),
            items_labelled: labelled.len(),
            classes: class_counts,
            imbalance_ratio: if imbalance_ratio.is_finite() { (imbalance_ratio * 1000.0).round() / 1000.0 } else { -1.0 },
            aliases_applied,
            dropped,
            conflicts,
            corrections: corrections.map(|c| CorrectionsReport { file: c.file, rows: c.by_id.len(), applied, kept }),
        };
        io::write(cx, &mut labelled)?;
        meta.classes = Some(classes.clone());
        io::write_meta(cx, &meta)?;
        io::write_json(cx, "classes.json", &classes)?;
        io::write_json(cx, "label_report.json", &report)
    }
}

/// The most common label; `None` on a tie.
fn majority(labels: &BTreeMap<String, String>) -> Option<String> {
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for l in labels.values() {
        *votes.entry(l).or_default() += 1;
    }
    let best = votes.values().copied().max()?;
    let mut winners = votes.iter().filter(|(_, v)| **v == best);
    match (winners.next(), winners.next()) {
        (Some((l, _)), None) => Some(l.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(labels: &[&str]) -> BTreeMap<String, String> {
        labels.iter().enumerate().map(|(i, l)| (format!("item{i}"), l.to_string())).collect()
    }

    #[test]
    fn majority_wins_and_a_tie_decides_nothing() {
        assert_eq!(majority(&votes(&["cat", "cat", "dog"])), Some("cat".into()));
        assert_eq!(majority(&votes(&["cat", "dog"])), None);
        assert_eq!(majority(&votes(&[])), None);
    }
}
