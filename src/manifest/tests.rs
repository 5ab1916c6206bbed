use std::path::Path;

use super::*;
use crate::stages::StageRegistry;

fn load(text: &str) -> Result<Manifest, crate::Error> {
    Manifest::from_str(Path::new("/w/pipelines/t.toml"), text.to_string(), &StageRegistry::builtin())
}

/// (location, message) of every problem, in file order.
fn problems(text: &str) -> Vec<(String, String)> {
    match load(text) {
        Ok(_) => panic!("manifest unexpectedly valid:\n{text}"),
        Err(crate::Error::Manifest(e)) => e
            .problems
            .iter()
            .map(|p| {
                let full = p.to_string();
                let (loc, _) = full.split_once(": ").expect("location prefix");
                (loc.trim_start_matches("/w/pipelines/t.toml:").to_string(), p.message().to_string())
            })
            .collect(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

const GOOD: &str = r#"
[pipeline]
name = "demo"
seed = 3

[params]
lr = 0.01
epochs = 4
model = { width = 32 }

[stages.prep]
kind = "command"
cmd = "mkdir -p data && echo ${params.epochs} > data/x"
outs = ["data"]

[stages.train]
kind = "command"
inputs = ["prep"]
deps = ["./data/"]
cmd = "echo lr=${params.lr} width=${params.model.width}"
params = ["lr"]
outs = ["model.bin"]
"#;

#[test]
fn valid_manifest_resolves_params_and_paths() {
    let m = load(GOOD).unwrap();
    assert_eq!(m.name, "demo");
    assert_eq!(m.seed, 3);
    let train = m.stage("train").unwrap();
    assert_eq!(train.deps[0].get_ref(), "data");
    assert_eq!(train.stage.params()["cmd"], "echo lr=0.01 width=32");
    assert_eq!(train.stage.params()["params"]["lr"], 0.01);
    assert_eq!(train.uses.keys().collect::<Vec<_>>(), ["lr", "model.width"]);
    assert_eq!(m.lock_path(), Path::new("/w/pipelines/t.lock"));
    assert_eq!(m.root, Path::new("/w/pipelines"), "the root defaults to the manifest's directory");
    assert_eq!(m.cache_dir, Path::new("/w/pipelines/cache"));
}

#[test]
fn root_is_relative_to_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    let path = dir.path().join("pipelines/p.toml");
    let text = "[pipeline]\nroot = \"..\"\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n";
    let m = Manifest::from_str(&path, text.into(), &StageRegistry::builtin()).unwrap();
    assert_eq!(m.root, dir.path().canonicalize().unwrap());
    assert_eq!(m.outputs_dir(), m.root.join("outputs/p"));
}

#[test]
fn formatting_does_not_change_params() {
    let reformatted = GOOD.replace("lr = 0.01", "lr      =   1e-2").replace("[params]", "# tuned by hand\n[params]");
    let (a, b) = (load(GOOD).unwrap(), load(&reformatted).unwrap());
    assert_eq!(a.stage("train").unwrap().stage.params(), b.stage("train").unwrap().stage.params());
}

#[test]
fn whole_reference_keeps_the_parameter_type() {
    let text = "[params]\nn = 3\n[stages.a]\nkind = \"command\"\ncmd = \"${params.n}\"\n";
    let e = problems(text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].0, "5:7");
    assert!(e[0].1.contains("invalid type: integer"), "{e:?}");
}

#[test]
fn each_error_kind_is_located() {
    let cases: &[(&str, &str, &str)] = &[
        ("unknown top-level key", "[pipelin]\nname = \"x\"\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n", "1:2"),
        ("unknown pipeline key", "[pipeline]\nnmae = \"x\"\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n", "2:1"),
        ("wrong type", "[pipeline]\nseed = \"seven\"\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n", "2:8"),
        ("unknown stage key", "[stages.a]\nkind = \"command\"\ncmd = \"true\"\nout = [\"x\"]\n", "4:1"),
        ("unknown kind", "[stages.a]\nkind = \"comand\"\ncmd = \"true\"\n", "2:8"),
        ("missing kind", "[stages.a]\ncmd = \"true\"\n", "1:9"),
        ("unknown input", "[stages.a]\nkind = \"command\"\ncmd = \"true\"\ninputs = [\"nope\"]\n", "4:11"),
        ("unknown param", "[stages.a]\nkind = \"command\"\ncmd = \"echo ${params.nope}\"\n", "3:7"),
        ("unknown param list entry", "[stages.a]\nkind = \"command\"\ncmd = \"true\"\nparams = [\"nope\"]\n", "4:11"),
        ("output outside root", "[stages.a]\nkind = \"command\"\ncmd = \"true\"\nouts = [\"../x\"]\n", "4:9"),
        ("toml syntax", "[stages.a]\nkind = \"command\ncmd = \"true\"\n", "2:16"),
        ("no stages", "[pipeline]\nname = \"x\"\n", "1:1"),
    ];
    for (what, text, location) in cases {
        let e = problems(text);
        assert_eq!(e.len(), 1, "{what}: {e:?}");
        assert_eq!(e[0].0, *location, "{what}: {e:?}");
    }
}

#[test]
fn unknown_kind_and_input_suggest_the_near_name() {
    let text = "[stages.prep]\nkind = \"comand\"\ncmd = \"true\"\n[stages.b]\nkind = \"command\"\ncmd = \"true\"\ninputs = [\"prepp\"]\n";
    let err = match load(text) {
        Err(crate::Error::Manifest(e)) => e,
        _ => panic!("expected manifest error"),
    };
    let rendered = format!("{:?}", miette::Report::new(*err));
    assert!(rendered.contains("did you mean `command`"), "{rendered}");
}

#[test]
fn cycle_lists_every_stage_on_it() {
    let text = r#"
[stages.a]
kind = "command"
cmd = "true"
inputs = ["c"]
[stages.b]
kind = "command"
cmd = "true"
inputs = ["a"]
[stages.c]
kind = "command"
cmd = "true"
inputs = ["b"]
[stages.d]
kind = "command"
cmd = "true"
inputs = ["d"]
"#;
    let e = problems(text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].1.contains("`a`, `b`, `c`"), "{e:?}");
    assert_eq!(e[0].0, "2:9");
    assert!(e[1].1.contains("`d`"), "{e:?}");
}

#[test]
fn implicit_cycle_through_paths_is_found() {
    let text = r#"
[stages.a]
kind = "command"
cmd = "true"
deps = ["y"]
outs = ["x"]
[stages.b]
kind = "command"
cmd = "true"
deps = ["x"]
outs = ["y"]
"#;
    let e = problems(text);
    assert!(e[0].1.contains("cycle between stages `a`, `b`"), "{e:?}");
}

#[test]
fn duplicate_and_overlapping_outputs_are_rejected() {
    let text = r#"
[stages.a]
kind = "command"
cmd = "true"
outs = ["data"]
[stages.b]
kind = "command"
cmd = "true"
outs = ["data/sub"]
"#;
    let e = problems(text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].0, "9:9");
    assert!(e[0].1.contains("overlaps output `data` of stage `a`"), "{e:?}");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = r#"
[pipeline]
nmae = "x"

[stages.a]
kind = "comand"
cmd = "true"

[stages.b]
kind = "command"
cmd = "echo ${params.missing}"
inputs = ["ghost"]

[stages.c]
kind = "command"
cmd = "true"
inputs = ["d"]

[stages.d]
kind = "command"
cmd = "true"
inputs = ["c"]
"#;
    let e = problems(text);
    let messages: Vec<&str> = e.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(e.len(), 5, "{messages:?}");
    assert!(messages[4].contains("cycle between stages `c`, `d`"));
    assert!(messages[0].contains("nmae"));
    assert!(messages[1].contains("unknown stage kind `comand`"));
    assert!(messages[2].contains("params.missing"));
    assert!(messages[3].contains("ghost"));
}

#[test]
fn dependency_on_another_stages_output_adds_an_edge() {
    let m = load(GOOD).unwrap();
    let g = crate::graph::Graph::build(&m).unwrap();
    let names: Vec<&str> = g.order().iter().map(|&i| m.stages[i].name.as_str()).collect();
    assert_eq!(names, ["prep", "train"]);
    let text = "[stages.z]\nkind = \"command\"\ncmd = \"true\"\nouts = [\"a/b\"]\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\ndeps = [\"a\"]\n";
    let m = load(text).unwrap();
    let g = crate::graph::Graph::build(&m).unwrap();
    let a = m.stages.iter().position(|s| s.name == "a").unwrap();
    assert_eq!(g.upstream(a).len(), 1, "reading a directory that holds another stage's output depends on it");
}

#[test]
fn selection_takes_upstream_and_optionally_downstream() {
    let text = r#"
[stages.a]
kind = "command"
cmd = "true"
[stages.b]
kind = "command"
cmd = "true"
inputs = ["a"]
[stages.c]
kind = "command"
cmd = "true"
inputs = ["b"]
[stages.x]
kind = "command"
cmd = "true"
"#;
    let m = load(text).unwrap();
    let g = crate::graph::Graph::build(&m).unwrap();
    let idx = |n: &str| m.stages.iter().position(|s| s.name == n).unwrap();
    let names = |sel: Vec<bool>| m.stages.iter().zip(sel).filter(|(_, s)| *s).map(|(st, _)| st.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(g.select(&[idx("b")], false)), ["a", "b"]);
    assert_eq!(names(g.select(&[idx("b")], true)), ["a", "b", "c"]);
    assert_eq!(names(g.select(&[], false)), ["a", "b", "c", "x"]);
}
