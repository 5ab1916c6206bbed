//! `kiln report FILE`: one self-contained HTML page per run — the pipeline graph coloured by
//! what ran, stage timings and cache hits, the data stages' findings and class balance,
//! learning curves, the confusion matrix as a heat map, the per-class table, a grid of
//! the most confident mistakes and one of the suspected wrong labels. Everything (SVG,
//! thumbnails as data URIs) is inline, so the file can be mailed or attached to a pull
//! request; it loads nothing from the network.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;

use crate::cache::{ArtifactReader, CacheError};
use crate::digest::Digest;
use crate::graph::Graph;
use crate::manifest::Manifest;
use crate::runs::RunRecord;

/// What the page is about: one recorded run, or the lock file when there is none.
pub struct ReportInput<'a> {
    pub manifest: &'a Manifest,
    pub graph: &'a Graph,
    /// Per stage: outcome word, seconds if it ran, artifact digest, stage key.
    pub stages: BTreeMap<String, StageRow>,
    pub title: String,
    pub overrides: Vec<String>,
    pub reader: &'a ArtifactReader,
}

#[derive(Debug, Clone, Default)]
pub struct StageRow {
    pub outcome: String,
    pub seconds: Option<f64>,
    pub artifact: Option<Digest>,
    pub key: Option<Digest>,
}

impl StageRow {
    pub fn from_run(run: &RunRecord) -> BTreeMap<String, StageRow> {
        run.stages
            .iter()
            .map(|(n, s)| (n.clone(), StageRow { outcome: s.outcome.clone(), seconds: s.seconds, artifact: s.artifact, key: s.key }))
            .collect()
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.muted{color:#777}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;padding:6px;width:128px;font-size:12px}.card img{width:128px;height:128px;image-rendering:pixelated;object-fit:contain;background:#eee}
code{background:#f4f4f4;padding:0 3px}";

/// Renders the page.
pub fn render(input: &ReportInput<'_>) -> Result<String, CacheError> {
    let m = input.manifest;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(&input.title),
        escape(&input.title)
    );
    let _ = writeln!(h, "<p>Manifest <code>{}</code>, seed {}.", escape(&m.path.display().to_string()), m.seed);
    if !input.overrides.is_empty() {
        let _ = write!(h, " Overrides: <code>{}</code>.", escape(&input.overrides.join(" ")));
    }
    h.push_str("</p>\n");

    h.push_str("<h2 id=\"pipeline\">Pipeline</h2>\n");
    h.push_str(&dag_svg(input));
    h.push_str("<table><tr><th>stage</th><th>kind</th><th>this run</th><th>seconds</th><th>last computed in</th><th>key</th></tr>\n");
    for &i in input.graph.order() {
        let decl = &m.stages[i];
        let row = input.stages.get(&decl.name).cloned().unwrap_or_default();
        let computed = row.key.and_then(|k| entry_seconds(m, &k)).map_or("-".into(), |s| format!("{s:.2} s"));
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            escape(&decl.name),
            escape(&decl.kind),
            escape(if row.outcome.is_empty() { "-" } else { &row.outcome }),
            row.seconds.map_or("-".into(), |s| format!("{s:.2}")),
            computed,
            row.key.map_or("-".into(), |k| k.to_hex()[..12].to_string())
        );
    }
    h.push_str("</table>\n");

    let mut sections = String::new();
    for &i in input.graph.order() {
        let decl = &m.stages[i];
        let Some(artifact) = input.stages.get(&decl.name).and_then(|r| r.artifact) else { continue };
        let json = |file: &str| -> Result<Option<serde_json::Value>, CacheError> {
            Ok(input.reader.file(&artifact, file)?.and_then(|b| serde_json::from_slice(&b).ok()))
        };
        match decl.kind.as_str() {
            "collect" => {
                if let Some(r) = json("collect_report.json")? {
                    data_section(&mut sections, &decl.name, &r, "collect");
                }
            }
            "clean" => {
                if let Some(r) = json("clean_report.json")? {
                    data_section(&mut sections, &decl.name, &r, "clean");
                }
            }
            "label" => {
                if let Some(r) = json("label_report.json")? {
                    data_section(&mut sections, &decl.name, &r, "label");
                }
            }
            "train" => train_section(&mut sections, &decl.name, &artifact, input.reader)?,
            "eval" => eval_section(&mut sections, &decl.name, &artifact, input.reader)?,
            "label_issues" => label_issues_section(&mut sections, &decl.name, &artifact, input.reader)?,
            _ => {}
        }
    }
    h.push_str(&sections);
    h.push_str("<p class=\"muted\">Written by kiln.</p>\n</body></html>\n");
    Ok(h)
}

/// How long the stage took when its cached result was computed.
fn entry_seconds(m: &Manifest, key: &Digest) -> Option<f64> {
    let bytes = std::fs::read(m.cache_dir.join("stages").join(format!("{}.json", key.to_hex()))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v["duration_ms"].as_f64()? / 1000.0)
}

/// The stage graph, left to right by depth, each box coloured by its outcome.
fn dag_svg(input: &ReportInput<'_>) -> String {
    let g = input.graph;
    let n = input.manifest.stages.len();
    let mut depth = vec![0usize; n];
    for &i in g.order() {
        depth[i] = g.upstream(i).iter().map(|&u| depth[u] + 1).max().unwrap_or(0);
    }
    let mut row = vec![0usize; n];
    let mut per_depth: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in g.order() {
        let r = per_depth.entry(depth[i]).or_default();
        row[i] = *r;
        *r += 1;
    }
    let (bw, bh, gx, gy) = (150.0, 42.0, 50.0, 16.0);
    let cols = depth.iter().max().map_or(1, |d| d + 1);
    let rows = per_depth.values().max().copied().unwrap_or(1);
    let width = cols as f64 * (bw + gx) - gx + 20.0;
    let height = rows as f64 * (bh + gy) - gy + 20.0;
    let pos = |i: usize| (10.0 + depth[i] as f64 * (bw + gx), 10.0 + row[i] as f64 * (bh + gy));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" style=\"max-width:100%;height:auto\" role=\"img\" aria-label=\"pipeline graph\">\n"
    );
    for i in 0..n {
        for &u in g.upstream(i) {
            let ((ux, uy), (x, y)) = (pos(u), pos(i));
            let (x1, y1, x2, y2) = (ux + bw, uy + bh / 2.0, x, y + bh / 2.0);
            let mid = (x1 + x2) / 2.0;
            let _ =
                writeln!(s, "<path d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\" fill=\"none\" stroke=\"#999\" stroke-width=\"1.5\"/>");
        }
    }
    for i in 0..n {
        let decl = &input.manifest.stages[i];
        let outcome = input.stages.get(&decl.name).map_or("", |r| r.outcome.as_str());
        let fill = match outcome {
            "ran" => "#fde2b8",
            "cached" => "#cdeccd",
            "failed" => "#f7c1c1",
            "skipped" => "#eeeeee",
            _ => "#f8f8f8",
        };
        let (x, y) = pos(i);
        let _ = writeln!(
            s,
            "<g><rect x=\"{x}\" y=\"{y}\" width=\"{bw}\" height=\"{bh}\" rx=\"6\" fill=\"{fill}\" stroke=\"#888\"/><text x=\"{}\" y=\"{}\" font-size=\"13\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#555\" text-anchor=\"middle\">{} · {}</text></g>",
            x + bw / 2.0,
            y + 17.0,
            escape(&decl.name),
            x + bw / 2.0,
            y + 33.0,
            escape(&decl.kind),
            escape(if outcome.is_empty() { "not run" } else { outcome })
        );
    }
    s.push_str("</svg>\n");
    s
}

fn data_section(h: &mut String, stage: &str, r: &serde_json::Value, kind: &str) {
    let text = |v: &serde_json::Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
    let _ = writeln!(h, "<h2 id=\"{}\">{} <span class=\"muted\">({kind})</span></h2>", escape(stage), escape(stage));
    match kind {
        "collect" => {
            let _ = writeln!(h, "<p>{} items.</p>", r["items"]);
            problems_table(h, r["problems"].as_array(), &["path", "reason"]);
        }
        "clean" => {
            let _ = writeln!(
                h,
                "<p>{} items in, {} kept, {} quarantined, {} dropped; {} duplicate groups.</p>",
                r["items_in"],
                r["items_kept"],
                r["quarantined"],
                r["dropped"],
                r["duplicate_groups"].as_array().map_or(0, Vec::len)
            );
            problems_table(h, r["findings"].as_array(), &["policy", "check", "source", "reason"]);
        }
        _ => {
            let classes: Vec<(String, f64)> =
                r["classes"].as_array().into_iter().flatten().map(|c| (text(&c["class"]), c["count"].as_f64().unwrap_or(0.0))).collect();
            let _ = writeln!(h, "<p>{} items labelled; imbalance ratio {}.</p>", r["items_labelled"], r["imbalance_ratio"]);
            h.push_str("<h3>Class balance</h3>\n");
            h.push_str(&bars_svg(&classes));
            problems_table(h, r["dropped"].as_array(), &["source", "reason"]);
        }
    }
}

/// Up to 50 rows of a list of findings; the rest are counted.
fn problems_table(h: &mut String, rows: Option<&Vec<serde_json::Value>>, columns: &[&str]) {
    let Some(rows) = rows.filter(|r| !r.is_empty()) else { return };
    h.push_str("<table><tr>");
    for c in columns {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>\n");
    for r in rows.iter().take(50) {
        h.push_str("<tr>");
        for c in columns {
            let v = &r[*c];
            let _ = write!(h, "<td>{}</td>", escape(&v.as_str().map(String::from).unwrap_or_else(|| v.to_string())));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    if rows.len() > 50 {
        let _ = writeln!(h, "<p class=\"muted\">… and {} more (kiln report FILE STAGE lists all).</p>", rows.len() - 50);
    }
}

/// Horizontal bars, one per class.
fn bars_svg(classes: &[(String, f64)]) -> String {
    let max = classes.iter().map(|c| c.1).fold(0.0, f64::max).max(1.0);
    let (label_w, bar_w, row_h) = (160.0, 420.0, 20.0);
    let height = classes.len() as f64 * row_h + 10.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"class balance\">\n",
        label_w + bar_w + 70.0
    );
    for (k, (name, count)) in classes.iter().enumerate() {
        let y = 5.0 + k as f64 * row_h;
        let w = bar_w * count / max;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text><rect x=\"{label_w}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"#4e79a7\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{count}</text>",
            label_w - 6.0,
            y + 13.0,
            escape(name),
            y + 2.0,
            row_h - 5.0,
            label_w + w + 4.0,
            y + 13.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn train_section(h: &mut String, stage: &str, artifact: &Digest, reader: &ArtifactReader) -> Result<(), CacheError> {
    let _ = writeln!(h, "<h2 id=\"{}\">{} <span class=\"muted\">(train)</span></h2>", escape(stage), escape(stage));
    if let Some(card) = reader.file(artifact, "model.json")?.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) {
        let m = &card["metrics"];
        let _ = writeln!(
            h,
            "<p>Model <code>{}</code>, {} classes; best epoch {} of {}: val accuracy {}, val loss {}.</p>",
            escape(&card["model"].as_str().map(String::from).unwrap_or_else(|| card["model"].to_string())),
            card["classes"].as_array().map_or(0, Vec::len),
            card["best_epoch"],
            card["epochs_run"],
            fmt4(&m["val_accuracy"]),
            fmt4(&m["val_loss"])
        );
    }
    if let Some(svg) = reader.file(artifact, "curves.svg")? {
        let svg = String::from_utf8_lossy(&svg);
        let start = svg.find("<svg").unwrap_or(0);
        h.push_str("<h3>Learning curves</h3>\n");
        h.push_str(&svg[start..]);
        h.push('\n');
    }
    Ok(())
}

fn fmt4(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.4}"))
}

fn eval_section(h: &mut String, stage: &str, artifact: &Digest, reader: &ArtifactReader) -> Result<(), CacheError> {
    let _ = writeln!(h, "<h2 id=\"{}\">{} <span class=\"muted\">(eval)</span></h2>", escape(stage), escape(stage));
    let Some(doc) = reader.file(artifact, "metrics.json")?.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) else {
        h.push_str("<p class=\"muted\">metrics.json is not in this cache.</p>\n");
        return Ok(());
    };
    h.push_str("<table><tr><th>metric</th><th>value</th></tr>\n");
    for (k, v) in crate::cache::lockfile::headline_metrics(&doc) {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&k),
            if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.4}") }
        );
    }
    h.push_str("</table>\n");
    let classes: Vec<String> = doc["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)).collect();
    h.push_str("<h3>Per class</h3>\n<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>\n");
    for c in &classes {
        let m = &doc["per_class"][c];
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(c),
            fmt4(&m["precision"]),
            fmt4(&m["recall"]),
            fmt4(&m["f1"]),
            m["support"]
        );
    }
    h.push_str("</table>\n");
    let matrix: Vec<Vec<u64>> = doc["confusion_matrix"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().map(|v| v.as_u64().unwrap_or(0)).collect())
        .collect();
    if !matrix.is_empty() {
        h.push_str("<h3>Confusion matrix</h3>\n<p class=\"muted\">Rows: true class; columns: predicted. Shade: share of the row.</p>\n");
        h.push_str(&confusion_svg(&classes, &matrix));
    }
    let binary = &doc["binary"];
    if binary.is_object() {
        let points = |key: &str| -> Vec<[f64; 2]> {
            binary[key].as_array().into_iter().flatten().filter_map(|p| Some([p.get(0)?.as_f64()?, p.get(1)?.as_f64()?])).collect()
        };
        let _ = writeln!(
            h,
            "<h3>Binary: <code>{}</code> from p ≥ {}</h3>\n<p>precision {}, recall {}, F1 {}; ROC-AUC {}, PR-AUC {}</p>",
            escape(binary["positive"].as_str().unwrap_or_default()),
            fmt4(&binary["threshold"]),
            fmt4(&binary["precision"]),
            fmt4(&binary["recall"]),
            fmt4(&binary["f1"]),
            fmt4(&binary["roc_auc"]),
            fmt4(&binary["pr_auc"])
        );
        h.push_str(&curve_svg("ROC curve", &points("roc_curve"), "false positive rate", "true positive rate"));
        h.push_str(&curve_svg("precision–recall curve", &points("pr_curve"), "recall", "precision"));
    }
    let mistakes: Vec<serde_json::Value> =
        reader.file(artifact, "mistakes.json")?.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    if !mistakes.is_empty() {
        h.push_str("<h3>Most confident mistakes</h3>\n<div class=\"grid\">\n");
        for m in &mistakes {
            let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            let img = thumbnail_img(reader, artifact, &s("thumbnail"), &s("id"))?;
            let _ = writeln!(
                h,
                "<div class=\"card\">{img}<div><b>{}</b> → {} ({})</div><div class=\"muted\" title=\"{}\">{}</div></div>",
                escape(&s("label")),
                escape(&s("predicted")),
                fmt4(&m["p_predicted"]),
                escape(&s("source")),
                escape(&s("id"))
            );
        }
        h.push_str("</div>\n");
    }
    Ok(())
}

/// An artifact's PNG inline, as an `<img>`; empty when the artifact has no such file.
fn thumbnail_img(reader: &ArtifactReader, artifact: &Digest, path: &str, alt: &str) -> Result<String, CacheError> {
    if path.is_empty() {
        return Ok(String::new());
    }
    Ok(match reader.file(artifact, path)? {
        Some(png) => {
            format!("<img alt=\"{}\" src=\"data:image/png;base64,{}\">", escape(alt), base64::engine::general_purpose::STANDARD.encode(png))
        }
        None => String::new(),
    })
}

/// How many suspects of a label_issues stage get a card (the report file lists them all).
const SUSPECT_CARDS: usize = 60;

fn label_issues_section(h: &mut String, stage: &str, artifact: &Digest, reader: &ArtifactReader) -> Result<(), CacheError> {
    let _ = writeln!(h, "<h2 id=\"{}\">{} <span class=\"muted\">(label_issues)</span></h2>", escape(stage), escape(stage));
    let Some(r) = reader.file(artifact, "label_issues_report.json")?.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        h.push_str("<p class=\"muted\">label_issues_report.json is not in this cache.</p>\n");
        return Ok(());
    };
    let text = |v: &serde_json::Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
    let _ = writeln!(
        h,
        "<p>{} items judged in {} folds, out-of-fold accuracy {}: {} suspected wrong labels (policy <code>{}</code>).</p>",
        r["judged"],
        r["folds"],
        fmt4(&r["out_of_fold_accuracy"]),
        r["suspected"],
        escape(&text(&r["policy"]))
    );
    h.push_str("<table><tr><th>class</th><th>items</th><th>flagged</th><th>suggested into</th></tr>\n");
    for c in r["classes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&text(&c["class"])),
            c["given"],
            c["flagged"],
            c["suggested"]
        );
    }
    h.push_str("</table>\n");
    let suspects = r["suspects"].as_array().map_or(&[][..], Vec::as_slice);
    if suspects.is_empty() {
        return Ok(());
    }
    h.push_str("<h3>Suspected wrong labels</h3>\n<p class=\"muted\">Given label → suggested label (score: the out-of-fold probability of the given label), most suspect first. Review them in <code>suggested_corrections.csv</code>.</p>\n<div class=\"grid\">\n");
    for s in suspects.iter().take(SUSPECT_CARDS) {
        let img = thumbnail_img(reader, artifact, s["thumbnail"].as_str().unwrap_or_default(), &text(&s["id"]))?;
        let _ = writeln!(
            h,
            "<div class=\"card\">{img}<div><b>{}</b> → {} ({})</div><div class=\"muted\" title=\"{}\">{}</div></div>",
            escape(&text(&s["given"])),
            escape(&text(&s["suggested"])),
            fmt4(&s["self_confidence"]),
            escape(&text(&s["source"])),
            escape(&text(&s["id"]))
        );
    }
    h.push_str("</div>\n");
    if suspects.len() > SUSPECT_CARDS {
        let _ = writeln!(h, "<p class=\"muted\">… and {} more (kiln report FILE STAGE lists all).</p>", suspects.len() - SUSPECT_CARDS);
    }
    Ok(())
}

/// A curve on the unit square (both axes 0 to 1), as an SVG polyline with its axes named.
fn curve_svg(title: &str, points: &[[f64; 2]], x: &str, y: &str) -> String {
    let (side, pad) = (240.0, 36.0);
    let at = |p: &[f64; 2]| (pad + p[0].clamp(0.0, 1.0) * side, pad + (1.0 - p[1].clamp(0.0, 1.0)) * side);
    let line: Vec<String> = points.iter().map(at).map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
    let size = side + 2.0 * pad;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{size}\" height=\"{size}\" role=\"img\" aria-label=\"{t}\">\n\
         <text x=\"{pad}\" y=\"{ty}\" font-size=\"12\">{t}</text>\n\
         <rect x=\"{pad}\" y=\"{pad}\" width=\"{side}\" height=\"{side}\" fill=\"none\" stroke=\"#999\"/>\n\
         <polyline points=\"{pts}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n\
         <text x=\"{cx}\" y=\"{bx}\" font-size=\"11\" text-anchor=\"middle\">{x}</text>\n\
         <text x=\"12\" y=\"{cx}\" font-size=\"11\" text-anchor=\"middle\" transform=\"rotate(-90 12 {cx})\">{y}</text>\n</svg>\n",
        t = escape(title),
        ty = pad - 10.0,
        pts = line.join(" "),
        cx = pad + side / 2.0,
        bx = pad + side + 24.0,
        x = escape(x),
        y = escape(y),
    )
}

/// The confusion matrix as a heat map with counts in the cells.
fn confusion_svg(classes: &[String], matrix: &[Vec<u64>]) -> String {
    let k = matrix.len();
    let cell = (480.0 / k as f64).clamp(14.0, 48.0);
    let label = 120.0;
    let size = label + cell * k as f64 + 10.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{size}\" height=\"{size}\" role=\"img\" aria-label=\"confusion matrix\">\n"
    );
    for (r, row) in matrix.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let y = label + r as f64 * cell;
        let name = classes.get(r).map_or(String::new(), |c| escape(c));
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{name}</text>", label - 4.0, y + cell / 2.0 + 4.0);
        for (c, &v) in row.iter().enumerate() {
            let x = label + c as f64 * cell;
            let share = if total > 0 { v as f64 / total as f64 } else { 0.0 };
            let fill = if r == c { format!("rgba(44,160,44,{share:.3})") } else { format!("rgba(214,39,40,{share:.3})") };
            let _ = write!(s, "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"{fill}\" stroke=\"#ddd\"/>");
            if cell >= 22.0 {
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{v}</text>",
                    x + cell / 2.0,
                    y + cell / 2.0 + 4.0
                );
            }
            s.push('\n');
        }
    }
    for (c, name) in classes.iter().enumerate() {
        let x = label + c as f64 * cell + cell / 2.0;
        let _ = writeln!(
            s,
            "<text x=\"{x}\" y=\"{}\" font-size=\"11\" transform=\"rotate(-45 {x} {})\">{}</text>",
            label - 6.0,
            label - 6.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(escape("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn a_curve_is_one_polyline_through_its_points() {
        let svg = curve_svg("ROC <curve>", &[[0.0, 0.0], [0.0, 0.5], [1.0, 1.0]], "fpr", "tpr");
        assert!(svg.contains("<polyline points=\"36.0,276.0 36.0,156.0 276.0,36.0\""), "{svg}");
        assert!(svg.contains("ROC &lt;curve&gt;"));
    }

    #[test]
    fn confusion_svg_has_a_cell_per_pair() {
        let classes = vec!["a".to_string(), "b<".to_string()];
        let svg = confusion_svg(&classes, &[vec![3, 1], vec![0, 4]]);
        assert_eq!(svg.matches("<rect").count(), 4);
        assert!(svg.contains("b&lt;") && svg.contains("rgba(44,160,44,0.750)"));
    }
}
