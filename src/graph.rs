//! The stage graph: who feeds whom, in what order, and which part of it a command selects.
//!
//! Edges come from two places: a stage's `inputs` naming another stage, and a stage's
//! `deps` overlapping another stage's declared `outs` (DVC-style implicit edges). Building
//! the graph validates it: overlapping outputs, a stage reading its own output, and every
//! cycle (each reported with all of its stages) are manifest errors. It is built once per
//! command, by [`crate::plan::Plan`].

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diagnostic::Issue;
use crate::manifest::Manifest;
use crate::paths::{Out, contains as path_contains, overlaps as paths_overlap};

#[derive(Debug)]
pub struct Graph {
    graph: DiGraph<usize, ()>,
    /// Stage indices (into `Manifest::stages`) in a deterministic topological order.
    order: Vec<usize>,
    upstream: Vec<Vec<usize>>,
    downstream: Vec<Vec<usize>>,
}

impl Graph {
    pub fn build(manifest: &Manifest) -> Result<Graph, Vec<Issue>> {
        let stages = &manifest.stages;
        let mut issues = Vec::new();
        let mut graph = DiGraph::<usize, ()>::with_capacity(stages.len(), stages.len());
        let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
        let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); stages.len()];

        for (i, stage) in stages.iter().enumerate() {
            for input in &stage.inputs {
                if let Ok(j) = stages.binary_search_by(|s| s.name.as_str().cmp(input.get_ref())) {
                    edges[i].insert(j);
                }
            }
        }

        let outs: Vec<(usize, &Out)> = stages.iter().enumerate().flat_map(|(i, s)| s.stage.outs().iter().map(move |o| (i, o))).collect();
        for (a, (i, out_a)) in outs.iter().enumerate() {
            for (j, out_b) in &outs[a + 1..] {
                if i != j && paths_overlap(&out_a.path, &out_b.path) {
                    let (first, second) =
                        if out_a.span.start <= out_b.span.start { ((i, out_a), (j, out_b)) } else { ((j, out_b), (i, out_a)) };
                    issues.push(
                        Issue::new(
                            second.1.span.clone(),
                            format!(
                                "output `{}` of stage `{}` overlaps output `{}` of stage `{}`",
                                second.1.path, stages[*second.0].name, first.1.path, stages[*first.0].name
                            ),
                        )
                        .label("duplicate output")
                        .help("each workspace path must be written by one stage only"),
                    );
                }
            }
        }

        for (i, stage) in stages.iter().enumerate() {
            for dep in &stage.deps {
                for (owner, out) in &outs {
                    if !paths_overlap(dep.get_ref(), &out.path) {
                        continue;
                    }
                    if *owner == i {
                        issues.push(
                            Issue::new(dep.span(), format!("stage `{}` depends on its own output `{}`", stage.name, out.path))
                                .help("a stage cannot read what it writes; split it into two stages"),
                        );
                    } else if path_contains(dep.get_ref(), &out.path) || path_contains(&out.path, dep.get_ref()) {
                        edges[i].insert(*owner);
                    }
                }
            }
        }

        for (i, ups) in edges.iter().enumerate() {
            for &j in ups {
                graph.add_edge(nodes[j], nodes[i], ());
            }
        }

        for scc in tarjan_scc(&graph) {
            let cyclic = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
            if !cyclic {
                continue;
            }
            let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
            members.sort_unstable();
            let names: Vec<String> = members.iter().map(|&i| format!("`{}`", stages[i].name)).collect();
            let cycle = cycle_path(&members, &edges).into_iter().map(|i| stages[i].name.as_str()).collect::<Vec<_>>().join(" → ");
            issues.push(
                Issue::new(stages[members[0]].span.clone(), format!("dependency cycle between stages {}", names.join(", ")))
                    .label("on a cycle")
                    .help(format!("the cycle is {cycle}; remove one of its inputs")),
            );
        }
        if !issues.is_empty() {
            return Err(issues);
        }

        let upstream: Vec<Vec<usize>> = edges.iter().map(|e| e.iter().copied().collect()).collect();
        let mut downstream = vec![Vec::new(); stages.len()];
        for (i, ups) in upstream.iter().enumerate() {
            for &j in ups {
                downstream[j].push(i);
            }
        }
        let order = topo_order(&upstream, &downstream);
        Ok(Graph { graph, order, upstream, downstream })
    }

    /// All stages, upstream before downstream; ties broken by name.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    pub fn upstream(&self, stage: usize) -> &[usize] {
        &self.upstream[stage]
    }

    pub fn downstream(&self, stage: usize) -> &[usize] {
        &self.downstream[stage]
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stages a command must consider for `targets`: the targets and everything they
    /// need; with `downstream`, also everything that needs them (and what that needs).
    /// No targets selects the whole graph.
    pub fn select(&self, targets: &[usize], downstream: bool) -> Vec<bool> {
        if targets.is_empty() {
            return vec![true; self.len()];
        }
        let mut wanted = vec![false; self.len()];
        let mut stack: Vec<usize> = targets.to_vec();
        if downstream {
            let mut seen = vec![false; self.len()];
            while let Some(i) = stack.pop() {
                if !std::mem::replace(&mut seen[i], true) {
                    stack.extend(&self.downstream[i]);
                }
            }
            stack = (0..self.len()).filter(|&i| seen[i]).collect();
        }
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut wanted[i], true) {
                stack.extend(&self.upstream[i]);
            }
        }
        wanted
    }
}

/// Kahn's algorithm with a min-heap, so the order is the same on every run.
fn topo_order(upstream: &[Vec<usize>], downstream: &[Vec<usize>]) -> Vec<usize> {
    let mut waiting: Vec<usize> = upstream.iter().map(Vec::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..upstream.len()).filter(|&i| waiting[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(upstream.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &downstream[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    order
}

/// One concrete cycle through the members of a strongly connected component, for the
/// error message (`a → b → c → a`).
fn cycle_path(members: &[usize], edges: &[BTreeSet<usize>]) -> Vec<usize> {
    let start = members[0];
    let mut path = vec![start];
    let mut cur = start;
    // Walk backwards along "is input of" edges while staying inside the component.
    for _ in 0..members.len() {
        let next = edges[cur].iter().copied().find(|n| members.contains(n) && (*n == start || !path.contains(n)));
        match next {
            Some(n) if n == start => {
                path.push(start);
                path.reverse();
                return path;
            }
            Some(n) => {
                path.push(n);
                cur = n;
            }
            None => break,
        }
    }
    path.push(start);
    path.reverse();
    path
}
