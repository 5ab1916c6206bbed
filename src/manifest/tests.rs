use std::path::Path;

use super::*;
use crate::diagnostic;
use crate::plan::Plan;
use crate::stages::StageRegistry;

/// Loads a manifest the way every command does: through its [`Plan`], so the graph and
/// plan checks run too.
fn load(text: &str) -> Result<Manifest, crate::Error> {
    Plan::from_str(Path::new("/w/pipelines/t.toml"), text.to_string(), &StageRegistry::builtin()).map(Plan::into_manifest)
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
    let m = Plan::from_str(&path, text.into(), &StageRegistry::builtin()).unwrap().into_manifest();
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

/// The bundled quick start, with its workspace root left at the manifest's folder (like
/// every manifest here, loaded from `/w/pipelines/t.toml`).
fn quickstart() -> String {
    include_str!("../../pipelines/quickstart.toml").replacen("root = \"..\"\n", "", 1)
}

/// The quick start with each `(from, to)` edit made; `from` must occur once.
fn quickstart_with(edits: &[(&str, &str)]) -> String {
    let mut text = quickstart();
    for &(from, to) in edits {
        assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once in quickstart.toml");
        text = text.replacen(from, to, 1);
    }
    text
}

/// An error with every manifest problem on its own line.
fn describe(e: &crate::Error) -> String {
    match e {
        crate::Error::Manifest(m) => m.problems.iter().map(|p| format!("\n  {p}")).collect(),
        other => other.to_string(),
    }
}

/// `line:col` of the `^` in `needle`, which (without the `^`) must occur once in `text`.
fn caret(text: &str, needle: &str) -> String {
    let (before, _) = needle.split_once('^').expect("the needle marks the location with ^");
    let plain = needle.replacen('^', "", 1);
    assert_eq!(text.matches(plain.as_str()).count(), 1, "`{plain}` must occur once in\n{text}");
    let (line, col) = diagnostic::line_col(text, text.find(plain.as_str()).unwrap() + before.len());
    format!("{line}:{col}")
}

fn assert_located(what: &str, found: &[(String, String)], location: &str, fragment: &str) {
    assert!(
        found.iter().any(|(loc, message)| loc == location && message.contains(fragment)),
        "{what}: expected {fragment:?} at {location}, got {found:#?}"
    );
}

#[test]
fn the_quickstart_and_every_bundled_pipeline_pass_every_check() {
    let m = load(&quickstart()).unwrap();
    assert!(!spans::has_null(&m.params), "{}", m.params);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Err(e) = Plan::load(&path, &StageRegistry::builtin())
        {
            panic!("{}: {}", path.display(), describe(&e));
        }
    }
}

/// Issue items 5, 8 and 9: every value of every built-in kind is checked when the manifest
/// loads, and a bad one is reported at its own file:line:column. One row per bad value:
/// the edits to the quick start, where the problem must point (`^`), and what it must say.
#[test]
fn every_bad_value_is_reported_at_the_value() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (
            &[("rotation_range = 15.0", "rotation_range = nan")],
            "rotation_range = ^nan",
            "`nan` is not a number kiln can use; values must be finite",
        ),
        (&[("dropout = 0.2", "dropout = nan")], "dropout = ^nan", "`nan` is not a number kiln can use"),
        (&[("std = [0.25]", "std = [nan]")], "std = [^nan]", "`nan` is not a number kiln can use"),
        (&[("lr = 0.003", "lr = 0.003\nweight_decay = nan")], "weight_decay = ^nan", "`nan` is not a number"),
        (&[("lr = 0.003", "lr = 0.003\ngamma = nan")], "gamma = ^nan", "`nan` is not a number"),
        (&[("lr = 0.003", "lr = inf")], "lr = ^inf", "`inf` is not a number kiln can use"),
        (&[("lr = 0.003", "lr = -inf")], "lr = ^-inf", "`-inf` is not a number kiln can use"),
        (&[("lr = 0.003", "lr = 1e999")], "lr = ^1e999", "`1e999` is not a number kiln can use"),
        (&[("epochs = 12", "epochs = 12\nunused = [1.0, nan]")], "unused = [1.0, ^nan]", "`nan` is not a number"),
        (&[("epochs = 12", "epochs = 12\nlr = nan"), ("lr = 0.003", "lr = \"${params.lr}\"")], "lr = ^nan", "`nan` is not a number"),
        (&[("widths = [16, 32, 64]", "widths = [100000, 32]")], "widths = [^100000", "`cnn.widths[0]` = 100000 is out of range"),
        (&[("widths = [16, 32, 64]", "widths = [0, 32]")], "widths = [^0, 32]", "`cnn.widths[0]` = 0 is out of range"),
        (&[("widths = [16, 32, 64]", "widths = []")], "widths = ^[]", "`cnn.widths` lists 0 stages"),
        (&[("hidden = 64", "hidden = 100000")], "hidden = ^100000", "`cnn.hidden` = 100000 is out of range"),
        (&[("hidden = 64", "hidden = 64, convs_per_stage = 0")], "convs_per_stage = ^0", "`cnn.convs_per_stage` = 0 is out of range"),
        (
            &[("epochs = \"${params.epochs}\"", "epochs = 9223372036854775807")],
            "epochs = ^9223372036854775807",
            "`epochs` = 9223372036854775807 is out of range",
        ),
        (&[("epochs = 12", "epochs = 0")], "epochs = ^\"${params.epochs}\"", "`epochs` = 0 is out of range"),
        (&[("batch_size = 32", "batch_size = 100000")], "batch_size = ^100000", "`batch_size` = 100000 is out of range"),
        (&[("device = \"cpu\"", "device = \"cpu\"\nstep_epochs = 0")], "step_epochs = ^0", "`step_epochs` = 0 is out of range"),
        (
            &[("device = \"cpu\"", "device = \"cpu\"\nearly_stopping = { patience = 0 }")],
            "patience = ^0",
            "`early_stopping.patience` = 0 is out of range",
        ),
        (&[("size = [\"${params.size}\", \"${params.size}\"]", "size = [0, 24]")], "size = [^0, 24]", "`size[0]` = 0 is out of range"),
        (
            &[("size = [\"${params.size}\", \"${params.size}\"]", "size = [24, 9000]")],
            "size = [24, ^9000]",
            "`size[1]` = 9000 is out of range",
        ),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { train = 0.7, val = 0.15, test = 0.15 }\nshard_mb = 0")],
            "shard_mb = ^0",
            "`shard_mb` = 0 is out of range",
        ),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { train = 0.7, val = 0.15, test = 0.15 }\ncopies = 5000")],
            "copies = ^5000",
            "`copies` = 5000 is out of range",
        ),
        (&[("split = \"test\"", "split = \"test\"\nbatch_size = 0")], "batch_size = ^0", "`batch_size` = 0 is out of range"),
        (&[("inputs = [\"collect\"]", "inputs = [\"collect\"]\nmax_pixels = 0")], "max_pixels = ^0", "`max_pixels` = 0 is out of range"),
        (&[("max_distance = 8", "max_distance = 40")], "max_distance = ^40", "`checks.near_duplicates.max_distance` = 40 is out of range"),
        (
            &[("max_distance = 8 }", "max_distance = 8 }\ntoo_small = { min_side = 0 }")],
            "min_side = ^0",
            "`checks.too_small.min_side` = 0 is out of range",
        ),
        (
            &[("widths = [16, 32, 64], hidden = 64", "widths = [16, 512], hidden = 65536")],
            "hidden = ^65536",
            "weights on the 24x24 input of stage `preprocess`",
        ),
        (&[("dropout = 0.2", "dropout = 2.0")], "dropout = ^2.0", "`cnn.dropout` = 2 is out of range"),
        (&[("dropout = 0.2", "dropout = -0.5")], "dropout = ^-0.5", "`cnn.dropout` = -0.5 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nclip_grad_norm = -1")], "clip_grad_norm = ^-1", "`clip_grad_norm` = -1 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nclass_weights = [1.0, -2.0, 1.0, 1.0]")], "[1.0, ^-2.0", "`class_weights[1]` = -2 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nclass_weights = [0.0, 0.0, 0.0, 0.0]")], "class_weights = ^[0.0", "every class weight is 0"),
        (
            &[("rotation_range = 15.0", "rotation_range = 1e308")],
            "rotation_range = ^1e308",
            "`augment.rotation_range` = 1e308 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nwidth_shift_range = 2.0")],
            "width_shift_range = ^2.0",
            "`augment.width_shift_range` = 2 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nshear_range = 90.0")],
            "shear_range = ^90.0",
            "`augment.shear_range` = 90 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nzoom_range = 1.0")],
            "zoom_range = ^1.0",
            "`augment.zoom_range` = 1 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nbrightness_range = [1.5, 0.5]")],
            "brightness_range = ^[1.5",
            "`augment.brightness_range` = [1.5, 0.5] is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\ncontrast_range = [0.0, 1.0]")],
            "contrast_range = [^0.0",
            "`augment.contrast_range[0]` = 0 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nrandom_resized_crop = { scale = [0.0, 1.0], ratio = [0.75, 1.33] }")],
            "scale = [^0.0",
            "`augment.random_resized_crop.scale[0]` = 0 is out of range",
        ),
        (
            &[("rotation_range = 15.0", "rotation_range = 15.0\nrandom_resized_crop = { scale = [0.5, 1.0], ratio = [1.33, 0.75] }")],
            "ratio = ^[1.33",
            "`augment.random_resized_crop.ratio` = [1.33, 0.75] is out of range",
        ),
        (
            &[("device = \"cpu\"", "device = \"cpu\"\nwarmup_epochs = 50")],
            "warmup_epochs = ^50",
            "`warmup_epochs` = 50 is longer than the run",
        ),
        (&[("lr = 0.003", "lr = 0")], "lr = ^0\n", "`lr` = 0 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nweight_decay = -0.1")], "weight_decay = ^-0.1", "`weight_decay` = -0.1 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nmomentum = 1.0")], "momentum = ^1.0", "`momentum` = 1 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\ngamma = 1.5")], "gamma = ^1.5", "`gamma` = 1.5 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nlabel_smoothing = 1.0")], "label_smoothing = ^1.0", "`label_smoothing` = 1 is out of range"),
        (&[("lr = 0.003", "lr = 0.003\nmin_lr = 0.01")], "min_lr = ^0.01", "`min_lr` = 0.01 is above `lr` = 0.003"),
        (&[("lr = 0.003", "lr = 0.003\nnesterov = true")], "nesterov = ^true", "`nesterov = true` needs optimizer"),
        (
            &[("device = \"cpu\"", "device = \"cpu\"\ninput = { mean = [0.5] }")],
            "input = { mean = ^[0.5] }",
            "`input` needs both `mean` and `std`",
        ),
        (&[("std = [0.25]", "std = [0.0]")], "std = [^0.0]", "`normalize.std[0]` = 0 is out of range"),
        (
            &[("mean = [0.5]", "mean = [0.5, 0.5, 0.5]")],
            "mean = ^[0.5, 0.5, 0.5]",
            "`normalize.mean` has 3 values but color = Grayscale has 1 channel(s)",
        ),
        (&[("test = 0.15 }", "test = -0.15 }")], "test = ^-0.15", "`split.test` = -0.15 is out of range"),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { train = 0.7, val = 0.2, test = 0.2 }")],
            "split = ^{ train = 0.7, val = 0.2",
            "split ratios add up to",
        ),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { from_items = true, train = 0.5, val = 0.1 }")],
            "train = ^0.5",
            "`split.train` means nothing with `from_items = true`",
        ),
        (
            &[("max_distance = 8 }", "max_distance = 8 }\naspect_ratio = { max_ratio = 0.5 }")],
            "max_ratio = ^0.5",
            "`checks.aspect_ratio.max_ratio` = 0.5 is out of range",
        ),
        (
            &[(
                "max_distance = 8 }",
                "max_distance = 8 }\ntoo_dark = { policy = \"keep\", below = 200.0 }\ntoo_bright = { policy = \"keep\", above = 100.0 }",
            )],
            "below = ^200.0",
            "is not under `too_bright.above`",
        ),
        (
            &[(
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]",
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]\nimbalance_warning = 0.5",
            )],
            "imbalance_warning = ^0.5",
            "`imbalance_warning` = 0.5 is out of range",
        ),
        (
            &[("classes = [\"circle\", \"square\", \"triangle\", \"star\"]", "classes = [\"circle\", \"square\", \"circle\", \"star\"]")],
            "\"square\", ^\"circle\"",
            "class `circle` is listed twice",
        ),
        (
            &[(
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]",
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]\nfrom = \"pattern\"\npattern = '^[a-z]+'",
            )],
            "pattern = ^'",
            "has no capture group",
        ),
        (&[("count = 1600", "count = 6")], "count = ^6", "class `star` gets at most 1 items from the synthetic source of stage `collect`"),
        (&[("count = 1600", "count = 2")], "\"square\", ^\"triangle\"", "class `triangle` never occurs"),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { train = 0.85, val = 0.15, test = 0.0 }")],
            "split = ^\"test\"",
            "split `test` of stage `convert` is empty",
        ),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { from_items = true, val = 0.2 }")],
            "split = ^\"test\"",
            "keeps the sources' splits",
        ),
        (
            &[("size = [\"${params.size}\", \"${params.size}\"]", "size = [1, 1]")],
            "size = ^[1, 1]",
            "needs at least 8x8 pixels, but stage `preprocess` writes 1x1",
        ),
        (
            &[(
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]",
                "classes = [\"circle\", \"square\", \"triangle\", \"star\", \"hexagon\"]",
            )],
            "^\"hexagon\"",
            "class `hexagon` never occurs",
        ),
        (
            &[("classes = [\"circle\", \"square\", \"triangle\", \"star\"]", "classes = [\"circle\", \"square\", \"triangle\"]")],
            "classes = ^[\"circle\"",
            "draws `star`, which `classes` does not list",
        ),
        (
            &[(
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]",
                "classes = [\"circle\", \"square\", \"triangle\", \"star\"]\nfrom = \"folder\"",
            )],
            "from = ^\"folder\"",
            "none would get a label",
        ),
        (
            &[("classes = [\"circle\", \"square\", \"triangle\", \"star\"]", "classes = [\"circle\"]\nunknown = \"drop\"")],
            "classes = ^[\"circle\"]",
            "a classifier needs at least 2 classes",
        ),
        (
            &[("lr = 0.003", "lr = 0.003\nclass_weights = [1.0, 2.0]")],
            "class_weights = ^[1.0, 2.0]",
            "`class_weights` has 2 values for 4 classes",
        ),
        (
            &[("split = { train = 0.7, val = 0.15, test = 0.15 }", "split = { train = 0.0, val = 0.5, test = 0.5 }")],
            "train = ^0.0",
            "stage `convert` puts nothing in the train split",
        ),
        (
            &[("inputs = [\"preprocess\"]", "inputs = [\"preprocess\", \"clean\"]")],
            "inputs = ^[\"preprocess\", \"clean\"]",
            "needs exactly one input stage; it has 2",
        ),
        (&[("inputs = [\"train\", \"convert\"]", "inputs = [\"train\"]")], "inputs = ^[\"train\"]", "no input is a `convert` stage"),
        (
            &[("inputs = [\"convert\"]\nmodel", "inputs = [\"label\"]\nmodel")],
            "inputs = ^[\"label\"]\nmodel",
            "train reads the shards of a `convert` stage",
        ),
    ];
    for (edits, needle, fragment) in cases {
        let text = quickstart_with(edits);
        let found = problems(&text);
        assert_located(&format!("{edits:?}"), &found, &caret(&text, needle), fragment);
    }
}

#[test]
fn values_at_the_limits_are_accepted() {
    let cases: &[&[(&str, &str)]] = &[
        &[("dropout = 0.2", "dropout = 0.0")],
        &[("widths = [16, 32, 64]", "widths = [1, 4096]"), ("hidden = 64", "hidden = 0")],
        &[("epochs = 12", "epochs = 100000")],
        &[("batch_size = 32", "batch_size = 65536")],
        &[(
            "lr = 0.003",
            "lr = 10.0\nmin_lr = 10.0\nweight_decay = 0.0\nmomentum = 0.0\ngamma = 1.0\nlabel_smoothing = 0.0\nwarmup_epochs = 12",
        )],
        &[(
            "lr = 0.003",
            "lr = 0.003\noptimizer = \"sgd\"\nmomentum = 0.9\nnesterov = true\nclass_weights = [0.0, 1.0, 2.0, 3.0]\nclip_grad_norm = 1.0",
        )],
        &[(
            "rotation_range = 15.0",
            "rotation_range = 360.0\nwidth_shift_range = 1.0\nzoom_range = 0.5\nshear_range = 60.0\nbrightness_range = [0.5, 1.5]\nsaturation_range = [0.0, 1.0]\nrandom_resized_crop = { scale = [0.08, 1.0], ratio = [0.75, 1.3333] }",
        )],
        &[
            (
                "split = { train = 0.7, val = 0.15, test = 0.15 }",
                "split = { train = 1.0, val = 0.0, test = 0.0 }\nshard_mb = 1\ncopies = 1000",
            ),
            ("split = \"test\"", "split = \"train\""),
        ],
        // 16 shapes: 4 of each, the fewest that give every class an item in each split.
        &[("count = 1600", "count = 16")],
        &[("size = [\"${params.size}\", \"${params.size}\"]", "size = [8, 8]")],
    ];
    for edits in cases {
        let text = quickstart_with(edits);
        if let Err(e) = load(&text) {
            panic!("{edits:?}: {}", describe(&e));
        }
    }
}

#[test]
fn a_non_finite_override_is_reported_where_it_is_written() {
    let text = quickstart();
    for (arg, written) in [("train.lr=nan", "nan"), ("train.cnn.dropout=inf", "inf"), ("params.size=-inf", "-inf")] {
        let overrides = [Override::parse(arg).unwrap()];
        let (src, _) = overrides::append(&text, &overrides);
        let (line, col) = diagnostic::line_col(&src, src.rfind(written).unwrap());
        let found: Vec<(String, String)> =
            match Plan::from_str_with(Path::new("/w/pipelines/t.toml"), text.clone(), &StageRegistry::builtin(), &overrides) {
                Ok(_) => panic!("--set {arg} was accepted"),
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
            };
        assert_located(arg, &found, &format!("{line}:{col}"), &format!("`{written}` is not a number kiln can use"));
    }
}

#[test]
fn one_nan_is_one_problem() {
    // The document-wide check reports it; the stage's own range check does not repeat it.
    for (from, to) in
        [("dropout = 0.2", "dropout = nan"), ("rotation_range = 15.0", "rotation_range = nan"), ("std = [0.25]", "std = [nan]")]
    {
        let found = problems(&quickstart_with(&[(from, to)]));
        assert_eq!(found.len(), 1, "{to}: {found:#?}");
    }
}
