//! What the plan knows of the datasets upstream of a stage before anything runs: the chain
//! of data stages that feeds it and, when synthetic sources start that chain, the labels and
//! item counts that will arrive. Several kinds check their settings against it (label,
//! convert, train, eval), and it reads other stages only through their parameters, so no
//! kind imports another.

use std::collections::BTreeMap;
use std::ops::Range;

use super::{PlanStage, PlanView};
use crate::formats::dataset::MULTI;

/// The dataset stages feeding `start`, nearest first: its single input, that stage's
/// single input, and so on through the kinds whose effect on items and labels the plan
/// knows (clean, preprocess, label, convert, and label_issues, which at most removes items),
/// ending with a collect stage. The chain stops early, with no collect stage at its end, at
/// a stage with several inputs or of another kind.
pub fn dataset_chain<'p>(plan: &'p dyn PlanView, start: &PlanStage<'p>) -> Vec<PlanStage<'p>> {
    let mut chain: Vec<PlanStage<'p>> = Vec::new();
    let mut inputs = start.distinct_inputs();
    // The graph has no cycles by now; the bound only keeps a bug from looping.
    while chain.len() < 256 {
        let [only] = inputs.as_slice() else { break };
        let Some(up) = plan.stage(only) else { break };
        if !["collect", "clean", "preprocess", "label", "convert", "label_issues"].contains(&up.kind) {
            break;
        }
        inputs = up.distinct_inputs();
        let last = up.kind == "collect";
        chain.push(up);
        if last {
            break;
        }
    }
    chain
}

/// What synthetic sources fix before anything runs: the labels that reach a stage and how
/// many items each has at most (clean may remove items, never add them).
pub struct SyntheticLabels {
    /// Label → most items, after the label stages on the way (a listed class that nothing
    /// draws has 0).
    pub counts: BTreeMap<String, u64>,
    /// The collect stage.
    pub collect: String,
    /// Where its first source's `count` and `shapes` are written.
    pub count_span: Range<usize>,
    pub shapes_span: Range<usize>,
}

/// [`SyntheticLabels`] for a [`dataset_chain`]: known when it ends at a collect stage whose
/// sources are all synthetic, and every label stage on the way takes the collected labels
/// (and reads no corrections file).
pub fn synthetic_labels(chain: &[PlanStage<'_>]) -> Option<SyntheticLabels> {
    let collect = chain.last().filter(|s| s.kind == "collect")?;
    let params = collect.stage.params();
    let sources = params.get("sources")?.as_array()?;
    if sources.is_empty() {
        return None;
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for source in sources {
        if source.get("type")?.as_str()? != "synthetic" {
            return None;
        }
        let count = source.get("count")?.as_u64()?;
        let shapes: Vec<String> = match source.get("shapes").and_then(|v| v.as_array()) {
            Some(list) if !list.is_empty() => list.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<_>>()?,
            _ => crate::imaging::synth::SHAPES.iter().map(|s| s.name().to_string()).collect(),
        };
        // Item i draws shapes[i % k].
        let k = shapes.len() as u64;
        for (j, shape) in shapes.into_iter().enumerate() {
            let n = count / k + ((j as u64) < count % k) as u64;
            *counts.entry(shape).or_default() += n;
        }
    }
    for label in chain.iter().rev().filter(|s| s.kind == "label") {
        let p = label.stage.params();
        // A corrections file moves items between classes: the plan cannot count them.
        if p.get("from").and_then(|v| v.as_str()) != Some("collected") || p.get("corrections").is_some() {
            return None;
        }
        let mut next: BTreeMap<String, u64> = BTreeMap::new();
        for (name, n) in counts {
            let to =
                p.get("aliases").and_then(|a| a.get(name.as_str())).and_then(|v| v.as_str()).map_or_else(|| name.clone(), str::to_string);
            if to.contains(MULTI) {
                return None;
            }
            *next.entry(to).or_default() += n;
        }
        counts = next;
        if let Some(classes) = p.get("classes").and_then(|v| v.as_array()).filter(|c| !c.is_empty()) {
            let listed: BTreeMap<String, u64> =
                classes.iter().filter_map(|c| c.as_str()).map(|c| (c.to_string(), counts.get(c).copied().unwrap_or(0))).collect();
            counts = listed;
        }
    }
    Some(SyntheticLabels {
        counts,
        collect: collect.name.to_string(),
        count_span: collect.spans.get("sources[0].count"),
        shapes_span: collect.spans.get("sources[0].shapes"),
    })
}

/// The classes a stage downstream of `chain` numbers its labels by, when the plan knows
/// them: the nearest label stage's `classes`, else the labels synthetic sources draw; with
/// where they are fixed.
pub fn known_classes(chain: &[PlanStage<'_>]) -> Option<(Vec<String>, Range<usize>)> {
    if let Some(label) = chain.iter().find(|s| s.kind == "label") {
        let p = label.stage.params();
        if let Some(classes) = p.get("classes").and_then(|v| v.as_array()).filter(|c| !c.is_empty()) {
            return Some((classes.iter().filter_map(|c| c.as_str().map(str::to_string)).collect(), label.spans.get("classes")));
        }
    }
    let known = synthetic_labels(chain)?;
    let classes = known.counts.iter().filter(|(_, n)| **n > 0).map(|(c, _)| c.clone()).collect();
    Some((classes, known.shapes_span))
}
