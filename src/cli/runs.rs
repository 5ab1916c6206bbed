//! `kiln runs [FILE]`: the recorded runs of a pipeline, ranked by a metric.

use clap::Args;

use super::progress::CliReporter;
use super::{load, split_manifest};
use crate::Error;
use crate::digest::Digest;
use crate::runs::{RunLog, RunRecord, lower_is_better, manifest_digest, resolve_metric};

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// The manifest whose runs to list.
    #[arg(value_name = "FILE")]
    words: Vec<String>,
    /// Rank by this metric (`accuracy`, `f1` = `macro_avg.f1`, `log_loss`, …); losses and
    /// errors rank lowest first, everything else highest first.
    #[arg(long, value_name = "METRIC")]
    sort: Option<String>,
    /// Only the N best (with --sort) or latest runs.
    #[arg(long, short = 'n', value_name = "N")]
    limit: Option<usize>,
    /// Print the records as JSON.
    #[arg(long)]
    json: bool,
    /// Delete these run records (`r3`), or `all`; `kiln gc` then frees what only they kept.
    #[arg(long, value_name = "ID", num_args = 1..)]
    drop: Vec<String>,
}

pub fn runs(args: RunsArgs, out: &CliReporter) -> Result<(), Error> {
    let (path, rest) = split_manifest(&args.words)?;
    if let Some(extra) = rest.first() {
        return Err(Error::Usage(format!("`kiln runs` takes a manifest, not `{extra}`")));
    }
    let plan = load(&path)?;
    let manifest = plan.manifest();
    let log = RunLog::new(&manifest.cache_dir);
    if !args.drop.is_empty() {
        let all = args.drop.iter().any(|d| d == "all");
        for id in args.drop.iter().filter(|d| d.as_str() != "all") {
            log.get(id)?;
        }
        let n = log.drop_where(|r| r.pipeline == manifest.name && (all || args.drop.contains(&r.id)))?;
        out.line(&format!("dropped {n} run record{}", if n == 1 { "" } else { "s" }));
        return Ok(());
    }
    let mut records: Vec<RunRecord> = log.list()?.into_iter().filter(|r| r.pipeline == manifest.name).collect();
    if args.json {
        out.line(&serde_json::to_string_pretty(&records).expect("records serialise"));
        return Ok(());
    }
    if records.is_empty() {
        out.line(&format!("no recorded runs of `{}` yet", manifest.name));
        return Ok(());
    }
    if args.sort.is_none()
        && let Some(n) = args.limit
    {
        let skip = records.len().saturating_sub(n);
        records.drain(..skip);
    }
    print_table(&records, args.sort.as_deref(), false, Some(&manifest_digest(manifest)), out)?;
    Ok(())
}

/// Prints runs as a table; with `sort`, best first (and, for a sweep, says which won).
/// `current` is the digest of the manifest as it is now: runs of another version of it say so.
pub fn print_table(
    records: &[RunRecord],
    sort: Option<&str>,
    sweep: bool,
    current: Option<&Digest>,
    out: &CliReporter,
) -> Result<(), Error> {
    let all_keys: std::collections::BTreeSet<String> = records.iter().flat_map(|r| r.metrics().into_keys()).collect();
    let sort_key = match sort {
        Some(name) => Some(resolve_metric(name, &all_keys).ok_or_else(|| {
            Error::Usage(format!(
                "no metric `{name}` in these runs; they have: {}",
                if all_keys.is_empty() { "none".to_string() } else { all_keys.iter().cloned().collect::<Vec<_>>().join(", ") }
            ))
        })?),
        None if sweep => ["accuracy", "f1"].iter().find_map(|m| resolve_metric(m, &all_keys)).or_else(|| all_keys.first().cloned()),
        None => None,
    };
    let mut columns: Vec<String> = ["accuracy", "f1", "log_loss"].iter().filter_map(|m| resolve_metric(m, &all_keys)).collect();
    if let Some(k) = &sort_key
        && !columns.contains(k)
    {
        columns.insert(0, k.clone());
    }
    let mut order: Vec<(&RunRecord, std::collections::BTreeMap<String, f64>)> = records.iter().map(|r| (r, r.metrics())).collect();
    if let Some(k) = &sort_key {
        let lower = lower_is_better(k);
        order.sort_by(|(_, a), (_, b)| {
            let (x, y) = (a.get(k).copied(), b.get(k).copied());
            match (x, y) {
                (Some(x), Some(y)) if lower => x.total_cmp(&y),
                (Some(x), Some(y)) => y.total_cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
        });
    }
    let header_metrics: Vec<String> = columns.iter().map(|c| short(c)).collect();
    let mut header = format!("{:<5} {:<16} {:>6} {:>6}", "run", "started (UTC)", "ran", "cached");
    for h in &header_metrics {
        header.push_str(&format!(" {h:>10}"));
    }
    header.push_str("  changes");
    out.line(&header);
    for (r, metrics) in &order {
        let ran = r.stages.values().filter(|s| s.outcome == "ran").count();
        let cached = r.stages.values().filter(|s| s.outcome == "cached").count();
        let failed = r.stages.values().any(|s| s.outcome == "failed");
        let mut line = format!("{:<5} {:<16} {ran:>6} {cached:>6}", r.id, utc(r.started));
        for c in &columns {
            match metrics.get(c) {
                Some(v) => line.push_str(&format!(" {v:>10.4}")),
                None => line.push_str(&format!(" {:>10}", "-")),
            }
        }
        line.push_str("  ");
        line.push_str(&changes(r, current));
        if failed {
            line.push_str("  [failed]");
        }
        out.line(&line);
    }
    if let Some(now) = current
        && records.iter().any(|r| r.manifest_digest.is_some_and(|d| d != *now))
    {
        out.line(&format!("runs marked `edited since` ran another version of the manifest; it is now {}", now.short()));
    }
    if let (Some(k), Some((best, metrics))) = (&sort_key, order.first())
        && let Some(v) = metrics.get(k)
    {
        let changes: Vec<String> = best.overrides.iter().map(|o| o.to_arg()).collect();
        out.line(&format!("best by {k}: {} ({v:.4}) {}", best.id, changes.join(" ")));
    }
    Ok(())
}

/// What a run changed: its `--set` values, and which manifest it ran, by digest, when that
/// is not the manifest as it is now (`current`).
fn changes(r: &RunRecord, current: Option<&Digest>) -> String {
    let set: Vec<String> = r.overrides.iter().map(|o| o.to_arg()).collect();
    let edited = match (r.manifest_digest, current) {
        (Some(d), Some(now)) if d != *now => Some(d),
        _ => None,
    };
    match (set.is_empty(), edited, r.manifest_digest) {
        (true, Some(d), _) => format!("(manifest {}, edited since)", d.short()),
        (true, None, Some(d)) => format!("(manifest as written, {})", d.short()),
        (true, None, None) => "(manifest as written)".to_string(),
        (false, Some(d), _) => format!("{} (manifest {}, edited since)", set.join(" "), d.short()),
        (false, None, _) => set.join(" "),
    }
}

/// A column header: the last part of a metric key, unless that would be ambiguous.
fn short(key: &str) -> String {
    match key {
        "macro_avg.f1" => "macro_f1".into(),
        k => k.rsplit('.').next().unwrap_or(k).chars().take(10).collect(),
    }
}

/// `YYYY-MM-DD HH:MM` in UTC from Unix seconds (civil-from-days, no time zone database).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc(1_796_000_000), "2026-11-30 00:53");
    }
}
