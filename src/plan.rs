//! A [`Plan`]: a validated manifest and its stage graph, built once per command.
//!
//! Loading a plan runs the manifest's own passes ([`Manifest::parse`]), then builds the
//! stage graph ([`Graph::build`]: overlapping outputs, a stage reading its own output,
//! cycles), then checks each stage against the stages upstream of it
//! ([`Stage::plan_issues`](crate::stages::Stage::plan_issues)), which only runs on a
//! manifest with no other problem. Every problem of every pass ends up in one
//! [`ManifestError`] (exit code 2), so nothing runs on a manifest with one.
//!
//! Every command takes a plan: [`crate::exec::run`], [`crate::exec::status()`], the cli's
//! `dag`, `report` and `push`/`pull`. None of them builds the graph again.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::path::Path;

use crate::Error;
use crate::diagnostic::{Issue, ManifestError};
use crate::graph::Graph;
use crate::manifest::{Manifest, Override, Parsed, StageDecl};
use crate::stages::{PlanStage, PlanView, StageRegistry};

/// A manifest with no problem, and its stage graph.
#[derive(Debug)]
pub struct Plan {
    manifest: Manifest,
    graph: Graph,
}

impl Plan {
    /// Reads, parses and validates the manifest at `path`, and builds its stage graph.
    pub fn load(path: &Path, registry: &StageRegistry) -> Result<Plan, Error> {
        Self::load_with(path, registry, &[])
    }

    /// [`Plan::load`], with `--set` overrides applied.
    pub fn load_with(path: &Path, registry: &StageRegistry, overrides: &[Override]) -> Result<Plan, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { action: "read manifest", path: path.to_path_buf(), source })?;
        Self::from_str_with(path, text, registry, overrides)
    }

    /// [`Plan::load`] for manifest text read from `path`.
    pub fn from_str(path: &Path, text: String, registry: &StageRegistry) -> Result<Plan, Error> {
        Self::from_str_with(path, text, registry, &[])
    }

    pub fn from_str_with(path: &Path, text: String, registry: &StageRegistry, overrides: &[Override]) -> Result<Plan, Error> {
        let Parsed { source, manifest, mut issues } = Manifest::parse(path, &text, registry, overrides);
        // The graph checks run on every stage that parsed, even when others did not.
        let graph = match &manifest {
            Some(m) => match Graph::build(m) {
                Ok(graph) => Some(graph),
                Err(mut graph_issues) => {
                    issues.append(&mut graph_issues);
                    None
                }
            },
            None => None,
        };
        if let Some(m) = &manifest
            && issues.is_empty()
        {
            issues.extend(stage_checks(m));
        }
        match (manifest, graph) {
            (Some(manifest), Some(graph)) if issues.is_empty() => Ok(Plan { manifest, graph }),
            _ => Err(Error::Manifest(Box::new(ManifestError::new(path, &source, issues)))),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    /// The stage indices (into [`Manifest::stages`]) named by `targets`, or an error naming
    /// the unknown one.
    pub fn resolve_targets(&self, targets: &[String]) -> Result<Vec<usize>, Error> {
        let manifest = &self.manifest;
        targets
            .iter()
            .map(|t| {
                manifest.stages.binary_search_by(|s| s.name.as_str().cmp(t)).map_err(|_| Error::UnknownStage {
                    stage: t.clone(),
                    manifest: manifest.path.clone(),
                    known: manifest.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>().join(", "),
                })
            })
            .collect()
    }

    /// The stages a command on `targets` considers (see [`Graph::select`]).
    pub fn select(&self, targets: &[String], downstream: bool) -> Result<Vec<bool>, Error> {
        Ok(self.graph.select(&self.resolve_targets(targets)?, downstream))
    }
}

/// What one stage's plan checks see of the pipeline.
struct StageView<'a> {
    manifest: &'a Manifest,
    stage: &'a StageDecl,
}

fn plan_stage(decl: &StageDecl) -> PlanStage<'_> {
    PlanStage {
        name: &decl.name,
        kind: &decl.kind,
        inputs: decl.inputs.iter().map(|i| i.get_ref().as_str()).collect(),
        stage: &*decl.stage,
        spans: &decl.spans,
    }
}

impl PlanView for StageView<'_> {
    fn ancestor(&self, kind: &str) -> Option<(String, serde_json::Value)> {
        self.ancestor_stage(kind).map(|s| (s.name.to_string(), s.stage.params()))
    }

    fn ancestor_stage(&self, kind: &str) -> Option<PlanStage<'_>> {
        // Breadth-first over `inputs`, so the nearest one wins.
        let mut queue: VecDeque<&StageDecl> = VecDeque::from([self.stage]);
        let mut seen = HashSet::new();
        while let Some(decl) = queue.pop_front() {
            for input in &decl.inputs {
                let Some(up) = self.manifest.stage(input.get_ref()) else { continue };
                if !seen.insert(up.name.as_str()) {
                    continue;
                }
                if up.kind == kind {
                    return Some(plan_stage(up));
                }
                queue.push_back(up);
            }
        }
        None
    }

    fn this(&self) -> PlanStage<'_> {
        plan_stage(self.stage)
    }

    fn stage(&self, name: &str) -> Option<PlanStage<'_>> {
        self.manifest.stage(name).map(plan_stage)
    }

    fn span(&self, path: &str) -> Range<usize> {
        self.stage.spans.get(path)
    }
}

/// Each stage against the stages upstream of it, for a manifest with no other problem.
fn stage_checks(m: &Manifest) -> Vec<Issue> {
    let mut issues = Vec::new();
    for decl in &m.stages {
        let view = StageView { manifest: m, stage: decl };
        let prefix = |message: &str| format!("stage `{}`: {message}", decl.name);
        for p in decl.stage.check_plan(&view) {
            issues.push(Issue::new(decl.span.clone(), prefix(&p)));
        }
        for mut issue in decl.stage.plan_issues(&view) {
            issue.message = prefix(&issue.message);
            issues.push(issue);
        }
    }
    issues
}
