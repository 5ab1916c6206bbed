//! Experiments end to end: `--set` and `--sweep` runs, run records, `kiln runs`,
//! `kiln metrics show/diff` across runs and git revisions, and the HTML report.

use std::collections::BTreeSet;
use std::process::Command;

use crate::support::{kiln, ok, parse_json, shipped, which, workspace_with};

const MANIFEST: &str = "pipelines/quickstart.toml";

/// Stage names that ran / were cached, from `kiln run`'s per-stage lines.
fn stages(out: &str, word: &str) -> BTreeSet<String> {
    out.lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|w| w == word))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The quick-start pipeline with 4 epochs instead of 20, to keep the test short.
fn workspace() -> tempfile::TempDir {
    let text = shipped(MANIFEST);
    let fast = text.replace("epochs = 12", "epochs = 4");
    assert_ne!(fast, text, "the quick start sets `epochs = 12` in [params]");
    workspace_with(MANIFEST, &fast)
}

fn correct_ids(predictions_csv: &str) -> BTreeSet<String> {
    let mut lines = predictions_csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (id, correct) = (header.iter().position(|h| *h == "id").unwrap(), header.iter().position(|h| *h == "correct").unwrap());
    lines.map(|l| l.split(',').collect::<Vec<_>>()).filter(|f| f[correct] == "1").map(|f| f[id].to_string()).collect()
}

#[test]
fn set_runs_only_downstream_stages_and_diff_shows_flipped_items() {
    let ws = workspace();
    let ws = ws.path();
    let first = ok(ws, &["run", MANIFEST]);
    assert_eq!(stages(&first, "ran").len(), 8, "{first}");
    let lock_before = std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap();
    assert!(lock_before.contains("[stages.eval.metrics]"), "headline metrics are in the lock:\n{lock_before}");
    let predictions_r1 = std::fs::read_to_string(ws.join("outputs/quickstart/eval/predictions.csv")).unwrap();
    let header = predictions_r1.lines().next().unwrap();
    assert_eq!(header, "id,source,label,predicted,p_max,correct,p_circle,p_square,p_triangle,p_star");

    let out = kiln(ws, &["run", MANIFEST, "--set", "train.lr=0.001"]);
    assert!(out.status.success());
    let second = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stages(&second, "ran"), set(&["eval", "train"]), "{second}");
    assert_eq!(stages(&second, "cached").len(), 6, "{second}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("recorded as run r2"));
    assert_eq!(std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap(), lock_before, "--set leaves the lock alone");
    let predictions_r2 = std::fs::read_to_string(ws.join("outputs/quickstart/eval/predictions.csv")).unwrap();

    let listing = ok(ws, &["runs", MANIFEST, "--sort", "accuracy"]);
    assert!(listing.contains("r1") && listing.contains("r2") && listing.contains("train.lr=0.001"), "{listing}");
    assert!(listing.contains("best by accuracy"), "{listing}");

    let diff = parse_json(&ok(ws, &["metrics", "diff", MANIFEST, "r1", "r2", "--json"]));
    let eval = &diff["stages"][0];
    assert_eq!(eval["stage"], "eval");
    let runs = parse_json(&ok(ws, &["runs", MANIFEST, "--json"]));
    for (side, run) in [(0, 0), (1, 1)] {
        assert_eq!(eval["metrics"]["accuracy"][side], runs[run]["stages"]["eval"]["metrics"]["accuracy"], "{diff}");
    }
    let (right1, right2) = (correct_ids(&predictions_r1), correct_ids(&predictions_r2));
    let fixed: BTreeSet<String> = right2.difference(&right1).cloned().collect();
    let broken: BTreeSet<String> = right1.difference(&right2).cloned().collect();
    let flips = eval["flips"].as_array().unwrap();
    let got =
        |f: bool| -> BTreeSet<String> { flips.iter().filter(|x| x["fixed"] == f).map(|x| x["id"].as_str().unwrap().to_string()).collect() };
    assert_eq!((got(true), got(false)), (fixed.clone(), broken.clone()));
    assert!(!fixed.is_empty() || !broken.is_empty(), "a 3x smaller learning rate changes some predictions");
    assert_eq!(eval["per_class"].as_array().unwrap().len(), 4);

    // Without states and outside git: the last two runs.
    let text = ok(ws, &["metrics", "diff", MANIFEST]);
    assert!(
        text.contains("eval: r1 → r2") && text.contains(&format!("flipped: {} now right, {} now wrong", fixed.len(), broken.len())),
        "{text}"
    );

    let show = ok(ws, &["metrics", "show", MANIFEST]);
    assert!(show.contains("accuracy") && show.contains("confusion matrix"), "{show}");

    // gc keeps what recorded runs name, so they stay comparable.
    ok(ws, &["gc", MANIFEST]);
    let after_gc = parse_json(&ok(ws, &["metrics", "diff", MANIFEST, "r1", "r2", "--json"]));
    assert_eq!(after_gc["stages"][0]["flips"], eval["flips"]);
    assert_eq!(after_gc["stages"][0]["notes"], serde_json::json!([]));

    // The HTML report of the latest run.
    let page_path = ok(ws, &["report", MANIFEST]);
    let page_path = ws.join(page_path.trim());
    assert!(page_path.ends_with("outputs/quickstart-r2.html"), "{}", page_path.display());
    let page = std::fs::read_to_string(&page_path).unwrap();
    for needle in [
        "pipeline graph",
        "Class balance",
        "Learning curves",
        "Confusion matrix",
        "Most confident mistakes",
        "data:image/png;base64,",
        "train.lr=0.001",
    ] {
        assert!(page.contains(needle), "report lacks {needle}");
    }
    if let Some(browser) = ["chromium", "chromium-browser", "google-chrome"].iter().find(|b| which(b).is_some()) {
        let shot = ws.join("shot.png");
        let out = Command::new(browser)
            // This machine's network is closed: without these flags Chromium's background
            // connections are refused, many at a time.
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,2400",
            ])
            .arg(format!("--user-data-dir={}", ws.join("chromium-profile").display()))
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("file://{}", page_path.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let png = image::open(&shot).unwrap().to_rgb8();
        let distinct: BTreeSet<[u8; 3]> = png.pixels().step_by(97).map(|p| p.0).collect();
        assert!(distinct.len() > 20, "the rendered page is nearly blank ({} colours)", distinct.len());
    } else {
        eprintln!("skipping the headless render: no chromium on PATH");
    }
}

#[test]
fn sweep_runs_the_grid_reusing_upstream_stages() {
    let ws = workspace();
    let ws = ws.path();
    ok(ws, &["run", MANIFEST, "--set", "params.epochs=2"]);
    let out =
        kiln(ws, &["run", MANIFEST, "--set", "params.epochs=2", "--sweep", "train.lr=0.002,0.004", "--sweep", "train.batch_size=32,64"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (n, point) in [
        "train.lr=0.002 train.batch_size=32",
        "train.lr=0.002 train.batch_size=64",
        "train.lr=0.004 train.batch_size=32",
        "train.lr=0.004 train.batch_size=64",
    ]
    .iter()
    .enumerate()
    {
        assert!(stderr.contains(&format!("sweep {}/4: {point}", n + 1)), "{stderr}");
    }
    // Each point reruns train and eval only; the data stages come from the cache.
    assert_eq!(stdout.lines().filter(|l| l.starts_with("collect ") && l.trim_end().ends_with("cached")).count(), 4, "{stdout}");
    let runs = parse_json(&ok(ws, &["runs", MANIFEST, "--json"]));
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 5);
    for r in &runs[1..] {
        assert_eq!(r["sweep"], "r2");
        let ran: BTreeSet<String> =
            r["stages"].as_object().unwrap().iter().filter(|(_, s)| s["outcome"] == "ran").map(|(n, _)| n.clone()).collect();
        // lr=0.002 batch 32 differs from r1 (lr 0.003) too, so every point trains.
        assert_eq!(ran, set(&["eval", "train"]), "{r}");
    }
    assert!(stdout.contains("best by accuracy"), "{stdout}");
    // The ranking is by accuracy, best first.
    let ranked = ok(ws, &["runs", MANIFEST, "--sort", "log_loss"]);
    let losses: Vec<f64> =
        ranked.lines().skip(1).filter(|l| l.starts_with('r')).map(|l| l.split_whitespace().nth(7).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 5, "{ranked}");
    assert!(losses.windows(2).all(|w| w[0] <= w[1]), "log loss ranks lowest first: {ranked}");
}

#[test]
fn bad_overrides_are_usage_errors_that_point_at_the_override() {
    let ws = workspace();
    let ws = ws.path();
    for (args, expect) in [
        (vec!["--set", "trian.lr=0.1"], "did you mean `train`?"),
        (vec!["--set", "train.lrr=0.1"], "unknown field `lrr`"),
        (vec!["--set", "train.lr=fast"], "train.lr = \"fast\""),
        (vec!["--set", "train.lr"], "expected KEY=VALUE"),
        (vec!["--sweep", "train.lr=0.1,,0.2"], "empty value"),
    ] {
        let out = kiln(ws, &[&["run", MANIFEST][..], &args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert!(!ws.join("cache/runs").exists(), "nothing ran, nothing was recorded");
}

#[test]
fn metrics_diff_against_a_git_revision_of_the_lock() {
    if which("git").is_none() {
        eprintln!("skipping: no git");
        return;
    }
    let ws = workspace();
    let ws = ws.path();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=kiln", "-c", "user.email=kiln@example.com"])
            .args(args)
            .current_dir(ws)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok(ws, &["run", MANIFEST]);
    git(&["init", "-q"]);
    git(&["add", "pipelines"]);
    git(&["commit", "-q", "-m", "baseline"]);
    let path = ws.join(MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap().replace("lr = 0.003", "lr = 0.001");
    std::fs::write(&path, text).unwrap();
    let run = ok(ws, &["run", MANIFEST]);
    assert_eq!(stages(&run, "ran"), set(&["eval", "train"]), "{run}");
    let diff = parse_json(&ok(ws, &["metrics", "diff", MANIFEST, "--json"]));
    assert_eq!((diff["a"].as_str(), diff["b"].as_str()), (Some("HEAD"), Some("workspace")));
    let lock: toml::Table = toml::from_str(&std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap()).unwrap();
    let now = lock["stages"]["eval"]["metrics"]["accuracy"].as_float().unwrap();
    assert_eq!(diff["stages"][0]["metrics"]["accuracy"][1].as_f64(), Some(now));
    assert!(diff["stages"][0]["flips"].as_array().is_some_and(|f| !f.is_empty()), "{diff}");
    let bad = kiln(ws, &["metrics", "diff", MANIFEST, "no-such-rev"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-rev"));
}
