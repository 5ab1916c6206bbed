//! `clean_report.json`: every finding with its reason and score, the duplicate groups and
//! which copy was kept, and what was removed, by check and by class.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Policy;
use crate::formats::dataset::Item;

/// One thing found wrong with one item.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Finding {
    pub(super) id: String,
    pub(super) source: String,
    pub(super) check: &'static str,
    pub(super) reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) score: Option<f64>,
    pub(super) policy: Policy,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct CheckCount {
    pub(super) found: usize,
    pub(super) removed: usize,
}

#[derive(Debug, Serialize)]
pub(super) struct DuplicateGroup {
    pub(super) kept: String,
    pub(super) copies: Vec<GroupCopy>,
}

#[derive(Debug, Serialize)]
pub(super) struct GroupCopy {
    pub(super) id: String,
    pub(super) kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) distance: Option<u32>,
    pub(super) removed: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct CrossClassMember {
    pub(super) id: String,
    pub(super) label: String,
}

/// What clean did to one class: a check that removes a share of one class skews what the
/// model learns, even when the total looks small.
#[derive(Debug, Default, Serialize)]
pub(super) struct ClassCount {
    pub(super) items_in: usize,
    pub(super) removed: usize,
    /// Removed, by check (the check that decided each item's policy).
    pub(super) by_check: BTreeMap<&'static str, usize>,
}

/// The label an item has at this point, or `(unlabelled)`.
pub(super) fn class_of(item: &Item) -> String {
    item.label.clone().unwrap_or_else(|| "(unlabelled)".to_string())
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) items_in: usize,
    pub(super) items_kept: usize,
    pub(super) dropped: usize,
    pub(super) quarantined: usize,
    pub(super) per_class: BTreeMap<String, ClassCount>,
    pub(super) checks: BTreeMap<&'static str, CheckCount>,
    pub(super) duplicate_groups: Vec<DuplicateGroup>,
    /// Near duplicates whose labels differ: kept, for a person to decide which label is right.
    pub(super) cross_class_groups: Vec<Vec<CrossClassMember>>,
    pub(super) findings: Vec<Finding>,
}
