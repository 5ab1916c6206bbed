//! End-to-end tests of the `kiln` binary: each builds a workspace in a temporary
//! directory, runs the CLI, and asserts exactly which stages ran and which were cached.

use std::collections::BTreeMap;
use std::process::{Child, Output, Stdio};

use crate::support::{Workspace, backdate, text, unwrap_diagnostic, wait_for};

/// What only these tests need of a [`Workspace`]: their commands append to `log/ran`.
impl Workspace {
    /// Runs `kiln run`, asserts success, returns stage → first word of its outcome.
    fn run_ok(&self, extra: &[&str]) -> BTreeMap<String, String> {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let out = self.kiln(&args);
        assert!(out.status.success(), "kiln run failed:\n{}", text(&out));
        outcomes(&out)
    }

    /// Lines written by the test commands to `log/` (outside any declared output).
    fn commands_run(&self) -> Vec<String> {
        let mut lines: Vec<String> = std::fs::read_to_string(self.path("log/ran")).unwrap_or_default().lines().map(String::from).collect();
        lines.sort();
        lines
    }

    fn clear_log(&self) {
        let _ = std::fs::remove_file(self.path("log/ran"));
    }

    fn work_stats(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let stats = self.path("stats.json");
        let mut all = vec!["--work-stats", stats.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.kiln(&all);
        let json = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        (out, json)
    }
}

/// Stage → the first word of its line (`ran`, `cached`, `fresh`, `stale`…), from `kiln run`
/// or `kiln status`.
fn outcomes(out: &Output) -> BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

const CHAIN: &str = r#"
[pipeline]
name = "chain"
seed = 1

[params]
lr = 0.01
note = "a"

[stages.prep]
kind = "command"
cmd = "mkdir -p log data && echo prep >> log/ran && seq 1 5 > data/numbers"
outs = ["data/numbers"]

[stages.train]
kind = "command"
cmd = "echo train >> log/ran && awk '{s+=$1*${params.lr}} END {print s}' data/numbers > model.txt"
deps = ["data/numbers"]
outs = ["model.txt"]

[stages.eval]
kind = "command"
inputs = ["train"]
cmd = "echo eval >> log/ran && cat model.txt > metrics.txt && echo seed=$KILN_SEED >> metrics.txt"
deps = ["model.txt"]
outs = ["metrics.txt"]

[stages.other]
kind = "command"
cmd = "mkdir -p log && echo other >> log/ran && echo ${params.note} > other.txt"
outs = ["other.txt"]
"#;

#[test]
fn second_run_is_all_cached_and_runs_no_command() {
    let ws = Workspace::new(CHAIN);
    assert_eq!(ws.run_ok(&[]), expect(&[("prep", "ran"), ("train", "ran"), ("eval", "ran"), ("other", "ran")]));
    assert_eq!(ws.commands_run(), ["eval", "other", "prep", "train"]);
    assert_eq!(ws.read("metrics.txt"), "0.15\nseed=1\n");
    ws.clear_log();
    assert_eq!(ws.run_ok(&[]), expect(&[("prep", "cached"), ("train", "cached"), ("eval", "cached"), ("other", "cached")]));
    assert!(ws.commands_run().is_empty(), "a cached run executes no command");
    let status = ws.kiln(&["status"]);
    assert_eq!(outcomes(&status), expect(&[("prep", "fresh"), ("train", "fresh"), ("eval", "fresh"), ("other", "fresh")]));
}

#[test]
fn changing_one_param_reruns_exactly_its_dependents_and_status_says_why() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    ws.write("kiln.toml", &CHAIN.replace("lr = 0.01", "lr = 0.02"));
    let status = ws.kiln(&["status"]);
    let out = String::from_utf8_lossy(&status.stdout).to_string();
    assert_eq!(outcomes(&status), expect(&[("prep", "fresh"), ("train", "stale"), ("eval", "stale"), ("other", "fresh")]), "{out}");
    assert!(out.contains("param `params.lr` changed: 0.01 → 0.02"), "{out}");
    assert!(out.contains("upstream stage `train` is stale"), "{out}");
    ws.clear_log();
    assert_eq!(ws.run_ok(&[]), expect(&[("prep", "cached"), ("train", "ran"), ("eval", "ran"), ("other", "cached")]));
    assert_eq!(ws.commands_run(), ["eval", "train"]);
    assert_eq!(ws.read("metrics.txt"), "0.3\nseed=1\n");
}

#[test]
fn run_explains_each_miss_with_verbose() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    ws.write("kiln.toml", &CHAIN.replace("note = \"a\"", "note = \"b\""));
    let out = ws.kiln(&["run", "-v"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("param `params.note` changed: \"a\" → \"b\""), "{err}");
}

#[test]
fn seed_changes_every_stage_key() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    ws.write("kiln.toml", &CHAIN.replace("seed = 1", "seed = 2"));
    let status = String::from_utf8_lossy(&ws.kiln(&["status"]).stdout).to_string();
    assert!(status.contains("pipeline seed changed: 1 → 2"), "{status}");
}

#[test]
fn unchanged_output_stops_downstream_reruns() {
    let manifest = r#"
[params]
comment = "one"

[stages.a]
kind = "command"
cmd = "mkdir -p log && echo a >> log/ran && echo constant > a.txt  # ${params.comment}"
outs = ["a.txt"]

[stages.b]
kind = "command"
inputs = ["a"]
cmd = "echo b >> log/ran && cat a.txt > b.txt"
deps = ["a.txt"]
outs = ["b.txt"]
"#;
    let ws = Workspace::new(manifest);
    ws.run_ok(&[]);
    ws.clear_log();
    ws.write("kiln.toml", &manifest.replace("\"one\"", "\"two\""));
    assert_eq!(ws.run_ok(&[]), expect(&[("a", "ran"), ("b", "cached")]));
    assert_eq!(ws.commands_run(), ["a"], "early cutoff: b's inputs did not change");
}

#[test]
fn add_modify_delete_in_a_1000_file_dependency_rehashes_only_those_files() {
    let manifest = r#"
[stages.count]
kind = "command"
cmd = "ls data | wc -l > /dev/null"
deps = ["data"]
"#;
    let ws = Workspace::new(manifest);
    for i in 0..1000 {
        let rel = format!("data/d{}/f{i}.txt", i % 10);
        ws.write(&rel, &format!("file {i}"));
        backdate(&ws.path(&rel));
    }
    let (out, stats) = ws.work_stats(&["run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stats["files_hashed"], 1000);

    let (_, stats) = ws.work_stats(&["status"]);
    assert_eq!(stats["files_hashed"], 0, "an unchanged tree is checked by stat alone");
    assert_eq!(stats["files_from_index"], 1000);

    ws.write("data/d5/f5.txt", "modified");
    backdate(&ws.path("data/d5/f5.txt"));
    ws.write("data/d0/new.txt", "added");
    backdate(&ws.path("data/d0/new.txt"));
    std::fs::remove_file(ws.path("data/d7/f7.txt")).unwrap();
    let (out, stats) = ws.work_stats(&["status"]);
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(stats["files_hashed"], 2, "only the added and the modified file are read");
    assert!(report.contains("dependency `data` changed: 1 added, 1 modified, 1 removed"), "{report}");
    assert!(report.contains("+data/d0/new.txt"), "{report}");
    assert!(report.contains("~data/d5/f5.txt"), "{report}");
    assert!(report.contains("-data/d7/f7.txt"), "{report}");
}

/// A manifest that kiln must refuse when it loads: exit 2, before the cache is touched.
struct BadManifest {
    what: &'static str,
    manifest: &'static str,
    /// `kiln.toml:LINE:COLUMN` of the offending value.
    at: &'static str,
    /// A fragment of the message.
    says: &'static str,
}

const BAD_MANIFESTS: &[BadManifest] = &[
    BadManifest {
        what: "cycle",
        manifest: "[stages.a]\nkind = \"command\"\ncmd = \"true\"\ninputs = [\"b\"]\n[stages.b]\nkind = \"command\"\ncmd = \"true\"\ninputs = [\"a\"]\n",
        at: "kiln.toml:1:9",
        says: "dependency cycle between stages `a`, `b`",
    },
    BadManifest {
        what: "unknown input",
        manifest: "[stages.a]\nkind = \"command\"\ncmd = \"true\"\ninputs = [\"ghost\"]\n",
        at: "kiln.toml:4:11",
        says: "unknown input stage `ghost`",
    },
    BadManifest {
        what: "unknown key",
        manifest: "[stages.a]\nkind = \"command\"\ncmd = \"true\"\ncommand = \"x\"\n",
        at: "kiln.toml:4:1",
        says: "unknown field `command`",
    },
    BadManifest {
        what: "wrong type",
        manifest: "[stages.a]\nkind = \"command\"\ncmd = \"true\"\nouts = \"x\"\n",
        at: "kiln.toml:4:8",
        says: "invalid type",
    },
];

#[test]
fn invalid_manifests_exit_2_with_line_and_column() {
    for &BadManifest { what, manifest, at: location, says: message } in BAD_MANIFESTS {
        let ws = Workspace::new(manifest);
        let out = ws.kiln(&["run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", text(&out));
        assert!(err.contains(location), "{what}: expected {location} in\n{err}");
        assert!(err.contains(message), "{what}: expected {message:?} in\n{err}");
        assert!(!ws.path("cache").exists(), "{what}: an invalid manifest touches nothing");
    }
}

#[test]
fn a_failing_stage_skips_dependents_and_independent_stages_finish() {
    let manifest = r#"
[stages.bad]
kind = "command"
cmd = "echo about to fail >&2; exit 3"
outs = ["bad.txt"]

[stages.after_bad]
kind = "command"
inputs = ["bad"]
cmd = "touch after.txt"
outs = ["after.txt"]

[stages.good]
kind = "command"
cmd = "echo ok > good.txt"
outs = ["good.txt"]

[stages.after_good]
kind = "command"
inputs = ["good"]
cmd = "cp good.txt after_good.txt"
deps = ["good.txt"]
outs = ["after_good.txt"]
"#;
    let ws = Workspace::new(manifest);
    let out = ws.kiln(&["run", "-j", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(outcomes(&out), expect(&[("bad", "failed"), ("after_bad", "skipped"), ("good", "ran"), ("after_good", "ran")]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("failed (command exited with code 3)"), "{stdout}");
    assert!(stdout.contains("skipped (upstream `bad` failed)"), "{stdout}");
    let lock = ws.read("kiln.lock");
    assert!(lock.contains("[stages.good]") && lock.contains("[stages.after_good]"), "{lock}");
    assert!(!lock.contains("[stages.bad]"), "{lock}");

    let out = ws.kiln(&["run", "-j", "1", "--fail-fast"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(outcomes(&out), expect(&[("bad", "failed"), ("after_bad", "skipped"), ("good", "skipped"), ("after_good", "skipped")]));
}

#[test]
fn missing_declared_output_fails_the_stage() {
    let ws = Workspace::new("[stages.a]\nkind = \"command\"\ncmd = \"true\"\nouts = [\"never.txt\"]\n");
    let out = ws.kiln(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("declared output `never.txt` was not produced"), "{}", text(&out));
}

#[test]
fn deleted_or_edited_outputs_are_restored_from_the_cache() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    std::fs::remove_file(ws.path("model.txt")).unwrap();
    ws.write("other.txt", "edited by hand\n");
    let status = String::from_utf8_lossy(&ws.kiln(&["status"]).stdout).to_string();
    assert!(status.contains("output `model.txt` is missing"), "{status}");
    assert!(status.contains("output `other.txt` was modified"), "{status}");
    ws.clear_log();
    let out = ws.kiln(&["run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cached (restored 1 output)"), "{stdout}");
    assert!(ws.commands_run().is_empty());
    assert_eq!(ws.read("model.txt"), "0.15\n");
    assert_eq!(ws.read("other.txt"), "a\n");
}

#[test]
fn stage_selection_and_downstream() {
    let ws = Workspace::new(CHAIN);
    assert_eq!(ws.run_ok(&["train"]), expect(&[("prep", "ran"), ("train", "ran")]));
    assert_eq!(ws.run_ok(&["kiln.toml", "train", "--downstream"]), expect(&[("prep", "cached"), ("train", "cached"), ("eval", "ran")]));
    let out = ws.kiln(&["run", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stage `nosuch`"));
}

#[test]
fn dry_run_runs_nothing() {
    let ws = Workspace::new(CHAIN);
    let out = ws.kiln(&["run", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would run"));
    assert!(ws.commands_run().is_empty());
    assert!(!ws.path("kiln.lock").exists());
}

#[test]
fn force_reruns_even_when_cached() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    assert_eq!(ws.run_ok(&["other", "--force"]), expect(&[("other", "ran")]));
    assert_eq!(ws.run_ok(&["train", "--force"]), expect(&[("prep", "cached"), ("train", "ran")]), "only the named stage is forced");
    assert_eq!(ws.run_ok(&["--force"]).values().filter(|o| *o == "ran").count(), 4, "no names: everything");
}

#[test]
fn same_manifest_reproduces_the_same_lock_from_an_empty_cache() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    let first = ws.read("kiln.lock");
    std::fs::remove_dir_all(ws.path("cache")).unwrap();
    let status = String::from_utf8_lossy(&ws.kiln(&["status"]).stdout).to_string();
    assert!(status.contains("not in the cache"), "{status}");
    ws.run_ok(&[]);
    assert_eq!(ws.read("kiln.lock"), first, "same inputs, same digests");
}

#[test]
fn kill_9_mid_stage_then_rerun_finishes_without_redoing_finished_stages() {
    let manifest = r#"
[stages.first]
kind = "command"
cmd = "mkdir -p log && echo first >> log/ran && echo 1 > first.txt"
outs = ["first.txt"]

[stages.slow]
kind = "command"
inputs = ["first"]
cmd = "echo slow >> log/ran && echo partial > slow.txt && touch started && while [ ! -f release ]; do sleep 0.02; done && echo done > slow.txt"
outs = ["slow.txt"]
"#;
    let ws = Workspace::new(manifest);
    let mut child: Child = ws.command(&["run", "-j", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("the slow stage to start", || ws.path("started").exists());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ws.read("kiln.lock").contains("[stages.first]"), "the finished stage is in the lock");
    assert!(!ws.read("kiln.lock").contains("[stages.slow]"));

    ws.write("release", "");
    ws.clear_log();
    assert_eq!(ws.run_ok(&[]), expect(&[("first", "cached"), ("slow", "ran")]));
    assert_eq!(ws.commands_run(), ["slow"]);
    assert_eq!(ws.read("slow.txt"), "done\n");
    let verify = ws.kiln(&["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let leftovers = std::fs::read_dir(ws.path("cache/tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "the rerun cleaned the interrupted run's staging area");
}

#[test]
fn concurrent_runs_on_one_cache_wait_or_fail_clearly() {
    let manifest = r#"
[stages.hold]
kind = "command"
cmd = "touch started && while [ ! -f release ]; do sleep 0.02; done && echo held > hold.txt"
outs = ["hold.txt"]
"#;
    let ws = Workspace::new(manifest);
    let first = ws.command(&["run"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("the first run to start its stage", || ws.path("started").exists());

    let refused = ws.kiln(&["run", "--no-wait"]);
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is in use by another kiln process"), "{}", text(&refused));

    let log = ws.path("second.stderr");
    let waiting = ws.command(&["run"]).stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    // Release the first run only once the second one says it is waiting for it.
    wait_for("the second run to wait", || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("waiting for another kiln process")));
    ws.write("release", "");
    let first = first.wait_with_output().unwrap();
    let second = waiting.wait_with_output().unwrap();
    assert_eq!(outcomes(&first), expect(&[("hold", "ran")]), "{}", text(&first));
    assert_eq!(outcomes(&second), expect(&[("hold", "cached")]), "{}", text(&second));
    assert!(ws.kiln(&["verify"]).status.success());
}

#[test]
fn two_manifests_with_different_caches_share_one_workspace_lock() {
    // Same workspace, same output, different caches: before the workspace lock, the second
    // run deleted the first one's output under it.
    let stage = |cache: &str| {
        format!(
            "[pipeline]\nname = \"p\"\ncache = \"{cache}\"\n\n[stages.hold]\nkind = \"command\"\ncmd = \"touch started && while [ ! -f release ]; do sleep 0.02; done && echo held > hold.txt\"\nouts = [\"hold.txt\"]\n"
        )
    };
    let ws = Workspace::new(&stage("cache-a"));
    ws.write("other.toml", &stage("cache-b"));
    let first = ws.command(&["run", "kiln.toml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("the first run to start its stage", || ws.path("started").exists());
    let refused = ws.kiln(&["run", "other.toml", "--no-wait"]);
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("workspace"), "{}", text(&refused));
    ws.write("release", "");
    let first = first.wait_with_output().unwrap();
    assert_eq!(outcomes(&first), expect(&[("hold", "ran")]), "{}", text(&first));
    assert_eq!(ws.read("hold.txt"), "held\n");
}

#[test]
fn corrupt_blob_is_reported_by_verify_and_recomputed_by_the_next_run() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    let digest = kiln::Digest::of_bytes(b"0.15\n").to_hex();
    let blob = ws.path(&format!("cache/blobs/{}/{}", &digest[..2], &digest[2..]));
    assert!(blob.is_file(), "model.txt's content is stored by digest");
    std::fs::write(&blob, "garbage").unwrap();

    let out = ws.kiln(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(&format!("blob {}", &digest[..12])), "{report}");
    assert!(report.contains("stage entry"), "{report}");

    ws.clear_log();
    let outcome = ws.run_ok(&[]);
    assert_eq!(outcome["train"], "ran", "{outcome:?}");
    assert_eq!(outcome["prep"], "cached");
    assert_eq!(std::fs::read_to_string(&blob).unwrap(), "0.15\n", "the blob is stored again");
    assert!(ws.kiln(&["verify"]).status.success());
}

#[test]
fn gc_removes_what_no_lock_file_references() {
    let ws = Workspace::new(CHAIN);
    ws.run_ok(&[]);
    ws.write("kiln.toml", &CHAIN.replace("lr = 0.01", "lr = 0.05"));
    ws.run_ok(&[]);
    let dry = ws.kiln(&["gc", "--dry-run"]);
    let text_dry = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(text_dry.starts_with("would remove 2 stage entries"), "{text_dry}");
    let out = ws.kiln(&["gc"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("removed 2 stage entries"), "{}", text(&out));
    ws.clear_log();
    assert_eq!(ws.run_ok(&[]).values().filter(|v| *v == "cached").count(), 4, "gc keeps everything the lock needs");
    assert!(ws.kiln(&["verify"]).status.success());
}

#[test]
fn dag_formats() {
    let ws = Workspace::new(CHAIN);
    let text_dag = String::from_utf8_lossy(&ws.kiln(&["dag"]).stdout).to_string();
    assert!(text_dag.contains("train [command]  <- prep"), "{text_dag}");
    let dot = String::from_utf8_lossy(&ws.kiln(&["dag", "--format", "dot"]).stdout).to_string();
    assert!(dot.contains("\"train\" -> \"eval\""), "{dot}");
    let mermaid = String::from_utf8_lossy(&ws.kiln(&["dag", "--format", "mermaid"]).stdout).to_string();
    assert!(mermaid.contains("prep --> train"), "{mermaid}");
}

#[test]
fn a_closed_stdout_does_not_stop_the_run() {
    let ws = Workspace::new(CHAIN);
    let mut child = ws.command(&["run"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take()); // the reader goes away, as with `kiln run | head -1`
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lock = ws.read("kiln.lock");
    for stage in ["prep", "train", "eval", "other"] {
        assert!(lock.contains(&format!("[stages.{stage}]")), "{stage} finished: {lock}");
    }
}

#[test]
fn non_finite_and_out_of_range_values_exit_2_at_their_value() {
    // A `--set` value is checked where it is shown: under the manifest, as a comment line.
    let ws = Workspace::new("[params]\nrate = 0.5\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo ${params.rate}\"\n");
    let out = ws.kiln(&["run", "--set", "params.rate=nan"]);
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("kiln.toml:9:23") && err.contains("`nan` is not a number kiln can use"), "{err}");
    assert!(!ws.path("cache").exists(), "an invalid manifest touches nothing");

    // Before these checks, `widths = [100000]` tried to allocate 30 GB, `dropout = 2.0`
    // trained on NaNs and the epoch count was taken as given.
    let ws = Workspace::new(
        r#"[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 40
size = 16

[stages.preprocess]
kind = "preprocess"
inputs = ["collect"]
size = [16, 16]

[stages.convert]
kind = "convert"
inputs = ["preprocess"]

[stages.train]
kind = "train"
inputs = ["convert"]
model = "cnn"
cnn = { widths = [100000], dropout = 2.0 }
epochs = 9223372036854775807
device = "cpu"
"#,
    );
    let out = ws.kiln(&["run"]);
    // Undo the diagnostic's line wrapping.
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for (location, message) in [
        ("kiln.toml:21:19", "`cnn.widths[0]` = 100000 is out of range"),
        ("kiln.toml:21:38", "`cnn.dropout` = 2 is out of range"),
        ("kiln.toml:22:10", "`epochs` = 9223372036854775807 is out of range"),
    ] {
        assert!(err.contains(location), "expected {location} in\n{err}");
        assert!(err.contains(message), "expected {message:?} in\n{err}");
    }
    assert!(err.contains("must be between 1 and 4096"), "the help gives the range: {err}");
    assert!(!ws.path("cache").exists(), "an invalid manifest touches nothing");
}

#[test]
fn no_file_and_several_manifests_in_pipelines_lists_them() {
    let manifest = |name: &str| format!("[pipeline]\nname = \"{name}\"\nroot = \"..\"\n\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n");
    let ws = Workspace::new("");
    std::fs::remove_file(ws.path("kiln.toml")).unwrap();
    for name in ["b", "a", "c"] {
        ws.write(&format!("pipelines/{name}.toml"), &manifest(name));
    }
    let out = ws.kiln(&["status"]);
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("there are several in `pipelines`"), "{err}");
    assert!(err.contains("pipelines/a.toml, pipelines/b.toml, pipelines/c.toml"), "every manifest is listed, sorted: {err}");
    assert!(err.contains("e.g. `kiln run pipelines/a.toml`"), "the help says how to pick one: {err}");
    assert!(!err.contains("none found"), "{err}");

    // With only one left, it is the default.
    std::fs::remove_file(ws.path("pipelines/b.toml")).unwrap();
    std::fs::remove_file(ws.path("pipelines/c.toml")).unwrap();
    let out = ws.kiln(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn epochs_zero_is_underlined_at_its_value() {
    let manifest = r#"[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 40
size = 16

[stages.preprocess]
kind = "preprocess"
inputs = ["collect"]
size = [16, 16]

[stages.convert]
kind = "convert"
inputs = ["preprocess"]

[stages.train]
kind = "train"
inputs = ["convert"]
model = "cnn"
epochs = 0
device = "cpu"
"#;
    let ws = Workspace::new(manifest);
    let out = ws.kiln(&["run"]);
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Line 21 is `epochs = 0`; its value starts at column 10. `[stages.train]` is line 17.
    assert!(err.contains("kiln.toml:21:10: `epochs` = 0 is out of range"), "the error points at the value of `epochs`: {err}");
    assert!(!err.contains("kiln.toml:17:"), "not at the `[stages.train]` header: {err}");
    assert!(!ws.path("cache").exists(), "an invalid manifest touches nothing");
}

#[test]
fn runs_of_an_edited_manifest_say_which_manifest_they_ran() {
    let manifest = "[params]\nn = 1\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo ${params.n} > a.txt\"\nouts = [\"a.txt\"]\n";
    let ws = Workspace::new(manifest);
    ws.run_ok(&[]);
    ws.write("kiln.toml", &manifest.replace("echo ${params.n}", "echo n=${params.n}"));
    ws.run_ok(&[]);
    ws.run_ok(&["--set", "params.n=2"]);

    let out = ws.kiln(&["runs", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = |i: usize| records[i]["manifest_digest"].as_str().unwrap_or_else(|| panic!("no manifest_digest in {records}")).to_string();
    assert_ne!(digest(0), digest(1), "the manifest was edited between r1 and r2");
    assert_eq!(digest(1), digest(2), "`--set` values are not part of the manifest's digest");

    let out = ws.kiln(&["runs"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = |id: &str| listing.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_else(|| panic!("no {id} in\n{listing}"));
    assert!(row("r1").ends_with(&format!("(manifest {}, edited since)", &digest(0)[..12])), "{listing}");
    assert!(row("r2").ends_with(&format!("(manifest as written, {})", &digest(1)[..12])), "{listing}");
    assert!(row("r3").ends_with("params.n=2"), "{listing}");
    assert!(listing.contains(&format!("ran another version of the manifest; it is now {}", &digest(1)[..12])), "{listing}");
}
