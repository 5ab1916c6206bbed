//! Why a stage is stale, as data: `kiln status` prints it, `kiln run -v` logs it.
//!
//! Reasons compare what the lock file recorded for a stage with what the stage would see
//! now: its parameters old → new, which files of which dependency were added, removed or
//! modified, which upstream stage changed or is itself stale.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::inputs::{hash_deps, make_key};
use crate::cache::lockfile::{LockFile, LockedStage};
use crate::cache::{Cache, CacheError, Scan, Tree, TreeDiff};
use crate::digest::Digest;
use crate::paths::dep_path;
use crate::plan::Plan;
use crate::report::Reporter;

/// How many file names a reason lists before it says "and N more".
const NAMES_SHOWN: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DirtyReason {
    NeverRun,
    NotInLock,
    KindChanged {
        old: String,
        new: String,
    },
    ImplementationChanged {
        old: u32,
        new: u32,
    },
    ParamChanged {
        name: String,
        old: Option<serde_json::Value>,
        new: Option<serde_json::Value>,
    },
    SeedChanged {
        old: u64,
        new: u64,
    },
    DepAdded {
        path: String,
    },
    DepRemoved {
        path: String,
    },
    DepMissing {
        path: String,
    },
    /// `diff` is `None` when the old snapshot is no longer in the cache.
    DepChanged {
        path: String,
        diff: Option<TreeDiff>,
    },
    InputAdded {
        stage: String,
    },
    InputRemoved {
        stage: String,
    },
    UpstreamChanged {
        stage: String,
    },
    UpstreamStale {
        stage: String,
    },
    OutsChanged {
        old: Vec<String>,
        new: Vec<String>,
    },
    NotInCache,
    OutputMissing {
        path: String,
    },
    OutputModified {
        path: String,
    },
    KeyChanged,
    Forced,
}

impl DirtyReason {
    /// Reasons that a cached result repairs without running anything.
    pub fn is_restorable(&self) -> bool {
        matches!(self, DirtyReason::OutputMissing { .. } | DirtyReason::OutputModified { .. } | DirtyReason::NotInLock)
    }
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DirtyReason::*;
        match self {
            NeverRun => write!(f, "never run"),
            NotInLock => write!(f, "result is in the cache but not in the lock file yet"),
            KindChanged { old, new } => write!(f, "kind changed: `{old}` → `{new}`"),
            ImplementationChanged { old, new } => write!(f, "stage implementation changed: version {old} → {new}"),
            ParamChanged { name, old, new } => {
                let (a, b) = show_change(old, new);
                write!(f, "param `{name}` changed: {a} → {b}")
            }
            SeedChanged { old, new } => write!(f, "pipeline seed changed: {old} → {new}"),
            DepAdded { path } => write!(f, "new dependency `{path}`"),
            DepRemoved { path } => write!(f, "dependency `{path}` removed"),
            DepMissing { path } => write!(f, "dependency `{path}` does not exist"),
            DepChanged { path, diff: None } => write!(f, "dependency `{path}` changed"),
            DepChanged { path, diff: Some(d) } if d.modified.len() == 1 && d.modified[0].is_empty() => {
                write!(f, "file `{path}` was modified")
            }
            DepChanged { path, diff: Some(d) } => {
                write!(
                    f,
                    "dependency `{path}` changed: {} added, {} modified, {} removed",
                    d.added.len(),
                    d.modified.len(),
                    d.removed.len()
                )?;
                let names: Vec<String> = d
                    .added
                    .iter()
                    .map(|p| format!("+{}", join(path, p)))
                    .chain(d.modified.iter().map(|p| format!("~{}", join(path, p))))
                    .chain(d.removed.iter().map(|p| format!("-{}", join(path, p))))
                    .collect();
                if !names.is_empty() {
                    let more = names.len().saturating_sub(NAMES_SHOWN);
                    write!(
                        f,
                        " ({}{})",
                        names[..names.len().min(NAMES_SHOWN)].join(", "),
                        if more > 0 { format!(", and {more} more") } else { String::new() }
                    )?;
                }
                Ok(())
            }
            InputAdded { stage } => write!(f, "new input stage `{stage}`"),
            InputRemoved { stage } => write!(f, "input stage `{stage}` removed"),
            UpstreamChanged { stage } => write!(f, "upstream stage `{stage}` produced a different output"),
            UpstreamStale { stage } => write!(f, "upstream stage `{stage}` is stale"),
            OutsChanged { old, new } => write!(f, "declared outputs changed: [{}] → [{}]", old.join(", "), new.join(", ")),
            NotInCache => write!(f, "its result is not in the cache (cleared, or locked on another machine)"),
            OutputMissing { path } => write!(f, "output `{path}` is missing (restored from the cache on run)"),
            OutputModified { path } => write!(f, "output `{path}` was modified (restored from the cache on run)"),
            KeyChanged => write!(f, "cache key format changed"),
            Forced => write!(f, "forced"),
        }
    }
}

fn join(dep: &str, inner: &str) -> String {
    if inner.is_empty() { dep.to_string() } else { format!("{dep}/{inner}") }
}

/// Longer values than this are shown around their first difference.
const VALUE_SHOWN: usize = 48;

fn show_change(old: &Option<serde_json::Value>, new: &Option<serde_json::Value>) -> (String, String) {
    let show = |v: &Option<serde_json::Value>| v.as_ref().map_or_else(|| "(unset)".to_string(), |v| v.to_string());
    let (a, b) = (show(old), show(new));
    if a.chars().count() <= VALUE_SHOWN && b.chars().count() <= VALUE_SHOWN {
        return (a, b);
    }
    let (ac, bc): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let first = ac.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let start = first.saturating_sub(VALUE_SHOWN / 3);
    let window = |cs: &[char]| {
        let end = (start + VALUE_SHOWN).min(cs.len());
        let body: String = cs[start.min(cs.len())..end].iter().collect();
        format!("{}{body}{}", if start > 0 { "…" } else { "" }, if end < cs.len() { "…" } else { "" })
    };
    (window(&ac), window(&bc))
}

/// What a stage sees now, where known.
pub struct Current<'a> {
    pub kind: &'a str,
    pub implementation: u32,
    pub params: &'a serde_json::Value,
    pub uses: &'a BTreeMap<String, serde_json::Value>,
    pub seed: u64,
    pub deps: &'a BTreeMap<String, Option<Scan>>,
    /// Upstream artifacts by stage name; `None` when that stage is stale.
    pub upstream: &'a BTreeMap<String, Option<Digest>>,
    pub outs: Vec<String>,
}

/// Compares the lock file's record of a stage with what it sees now.
pub fn explain(locked: Option<&LockedStage>, now: &Current<'_>, cache: &Cache) -> Vec<DirtyReason> {
    use DirtyReason::*;
    let mut reasons = Vec::new();
    for (path, tree) in now.deps {
        if tree.is_none() {
            reasons.push(DepMissing { path: path.clone() });
        }
    }
    for (stage, digest) in now.upstream {
        if digest.is_none() {
            reasons.push(UpstreamStale { stage: stage.clone() });
        }
    }
    let Some(old) = locked else {
        reasons.insert(0, NeverRun);
        return reasons;
    };
    if old.kind != now.kind {
        reasons.push(KindChanged { old: old.kind.clone(), new: now.kind.to_string() });
    }
    if old.implementation != now.implementation {
        reasons.push(ImplementationChanged { old: old.implementation, new: now.implementation });
    }
    // Referenced `[params]` entries and the stage's own params, by dotted name; a command's
    // `params = [...]` list lands on the same `params.NAME` and is reported once.
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    for (name, v) in &old.uses {
        flatten(&format!("params.{name}"), v, &mut a);
    }
    for (name, v) in now.uses {
        flatten(&format!("params.{name}"), v, &mut b);
    }
    flatten("", &old.params, &mut a);
    flatten("", now.params, &mut b);
    // `[params]` entries first: they are what people edit.
    let names: BTreeSet<(bool, &String)> = a.keys().chain(b.keys()).map(|n| (!n.starts_with("params."), n)).collect();
    for (_, name) in names {
        let (x, y) = (a.get(name), b.get(name));
        if x != y {
            reasons.push(ParamChanged { name: name.clone(), old: x.cloned(), new: y.cloned() });
        }
    }
    if old.seed != now.seed {
        reasons.push(SeedChanged { old: old.seed, new: now.seed });
    }
    for path in old.deps.keys() {
        if !now.deps.contains_key(path) {
            reasons.push(DepRemoved { path: path.clone() });
        }
    }
    for (path, scan) in now.deps {
        let Some(tree) = scan.as_ref().map(|s| &s.tree) else { continue };
        match old.deps.get(path) {
            None => reasons.push(DepAdded { path: path.clone() }),
            Some(old_digest) if *old_digest != tree.digest() => {
                let diff = cache.get_tree(old_digest).ok().flatten().map(|old_tree| Tree::diff(&old_tree, tree));
                reasons.push(DepChanged { path: path.clone(), diff });
            }
            Some(_) => {}
        }
    }
    for stage in old.upstream.keys() {
        if !now.upstream.contains_key(stage) {
            reasons.push(InputRemoved { stage: stage.clone() });
        }
    }
    for (stage, digest) in now.upstream {
        match (old.upstream.get(stage), digest) {
            (None, _) => reasons.push(InputAdded { stage: stage.clone() }),
            (Some(o), Some(n)) if o != n => reasons.push(UpstreamChanged { stage: stage.clone() }),
            _ => {}
        }
    }
    let old_outs: Vec<String> = old.outs.keys().cloned().collect();
    let mut new_outs = now.outs.clone();
    new_outs.sort();
    if old_outs != new_outs && !(old.outs.is_empty() && now.outs.is_empty()) {
        reasons.push(OutsChanged { old: old_outs, new: new_outs });
    }
    reasons
}

/// Leaf values of a JSON document by dotted path (`train.lr`).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&name, v, out);
            }
        }
        serde_json::Value::Object(_) if prefix.is_empty() => {}
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Fresh,
    Stale,
    NeverRun,
}

impl fmt::Display for StageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StageState::Fresh => "fresh",
            StageState::Stale => "stale",
            StageState::NeverRun => "never run",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub state: StageState,
    pub reasons: Vec<DirtyReason>,
}

/// The status of every selected stage, in run order. Reads dependencies through the
/// file-state index; runs nothing and writes no artifacts.
pub fn compute(
    plan: &Plan,
    selected: &[bool],
    cache: &Cache,
    lock: &LockFile,
    reporter: &dyn Reporter,
) -> Result<Vec<StageStatus>, CacheError> {
    let (manifest, graph) = (plan.manifest(), plan.graph());
    let mut artifact: Vec<Option<Digest>> = vec![None; manifest.stages.len()];
    let mut out = Vec::new();
    for &i in graph.order() {
        if !selected[i] {
            continue;
        }
        let decl = &manifest.stages[i];
        let locked = lock.stages.get(&decl.name);
        let deps = hash_deps(manifest, decl, cache, reporter)?;
        let upstream: BTreeMap<String, Option<Digest>> = decl
            .inputs
            .iter()
            .map(|name| {
                let j = manifest.stages.binary_search_by(|s| s.name.as_str().cmp(name.get_ref())).expect("inputs were validated");
                (name.get_ref().clone(), artifact[j])
            })
            .collect();
        let params = decl.stage.params();
        let now = Current {
            kind: &decl.kind,
            implementation: decl.kind_version,
            params: &params,
            uses: &decl.uses,
            seed: manifest.seed,
            deps: &deps,
            upstream: &upstream,
            outs: decl.stage.outs().iter().map(|o| o.path.clone()).collect(),
        };
        let mut reasons = explain(locked, &now, cache);
        // Stages feeding this one through workspace paths: stale upstream, stale here.
        for &j in graph.upstream(i) {
            let name = &manifest.stages[j].name;
            if artifact[j].is_none() && !upstream.contains_key(name) {
                reasons.push(DirtyReason::UpstreamStale { stage: name.clone() });
            }
        }
        let all_known = deps.values().all(Option::is_some)
            && upstream.values().all(Option::is_some)
            && graph.upstream(i).iter().all(|&j| artifact[j].is_some());
        if all_known {
            let key = make_key(
                manifest,
                decl,
                deps.iter().map(|(p, s)| (p.clone(), s.as_ref().expect("all known").tree.digest())).collect(),
                upstream.iter().map(|(s, d)| (s.clone(), d.expect("all known"))).collect(),
            );
            let digest = key.digest();
            match cache.get_entry(&digest)? {
                Some(entry) if cache.entry_is_complete(&entry)? => {
                    if locked.is_some_and(|l| l.key != digest) && reasons.is_empty() {
                        reasons.push(DirtyReason::KeyChanged);
                    }
                    if locked.is_none_or(|l| l.key != digest) {
                        // Inputs match a cached result: a run takes it without recomputing.
                        reasons.retain(|r| !matches!(r, DirtyReason::NeverRun));
                        if reasons.is_empty() || locked.is_none() {
                            reasons.push(DirtyReason::NotInLock);
                        }
                    }
                    for (path, want) in &entry.outs {
                        let abs = dep_path(&manifest.root, path);
                        match cache.state().hash_tree(&abs, reporter) {
                            Ok(t) if t.digest() == *want => {}
                            Ok(_) => reasons.push(DirtyReason::OutputModified { path: path.clone() }),
                            Err(crate::cache::StateError::Missing { .. }) => {
                                reasons.push(DirtyReason::OutputMissing { path: path.clone() })
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    // A cached result is as good as fresh for the stages below.
                    artifact[i] = Some(entry.artifact);
                }
                _ => {
                    if locked.is_some_and(|l| l.key == digest) {
                        reasons.push(DirtyReason::NotInCache);
                    } else if locked.is_some() && reasons.is_empty() {
                        reasons.push(DirtyReason::KeyChanged);
                    }
                }
            }
        }
        let state = if reasons.is_empty() {
            StageState::Fresh
        } else if locked.is_none() && !reasons.contains(&DirtyReason::NotInLock) {
            StageState::NeverRun
        } else {
            StageState::Stale
        };
        out.push(StageStatus { stage: decl.name.clone(), state, reasons });
    }
    Ok(out)
}
