//! Range checks of the sources' numeric options, made on the manifest's own values before
//! they are deserialised: a zero, negative, non-finite or absurd value is a manifest error
//! that names the key and points at the value, not a panic, a hang or a 30 GB allocation
//! when the stage runs.

use toml::Spanned;
use toml::de::DeValue;

use crate::diagnostic::Issue;

/// What one numeric option of a source may be.
struct Rule {
    key: &'static str,
    min: f64,
    max: f64,
    /// Whether `min` itself is refused (a timeout must be more than 0).
    min_excluded: bool,
    /// Whether a fractional value is the option's type (else an integer).
    float: bool,
    /// The allowed values, in words.
    expected: &'static str,
}

impl Rule {
    const fn int(key: &'static str, min: f64, max: f64, expected: &'static str) -> Rule {
        Rule { key, min, max, min_excluded: false, float: false, expected }
    }

    const fn float(key: &'static str, min: f64, max: f64, min_excluded: bool, expected: &'static str) -> Rule {
        Rule { key, min, max, min_excluded, float: true, expected }
    }

    /// Why `value` is out of range, if it is. A value of the wrong type is left to the
    /// deserialiser, which says so.
    fn check(&self, value: &DeValue<'_>) -> Option<String> {
        let (x, shown) = match value {
            DeValue::Integer(i) => (integer(value).map_or(f64::INFINITY, |x| x as f64), i.to_string()),
            DeValue::Float(f) if self.float => (f.as_str().parse::<f64>().unwrap_or(f64::NAN), f.as_str().to_string()),
            _ => return None,
        };
        let above_min = if self.min_excluded { x > self.min } else { x >= self.min };
        let ok = x.is_finite() && above_min && x <= self.max;
        (!ok).then(|| format!("`{}` must be {}, got {shown}", self.key, self.expected))
    }
}

fn integer(value: &DeValue<'_>) -> Option<i128> {
    match value {
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix()).ok(),
        _ => None,
    }
}

/// The largest `max_bytes` a source accepts (4 GiB): a file is read whole into memory.
const MAX_BYTES: Rule = Rule::int("max_bytes", 1.0, (4u64 << 30) as f64, "between 1 and 4294967296 (4 GiB)");

const DIR: &[Rule] = &[MAX_BYTES];
const LISTING: &[Rule] = &[MAX_BYTES];
const HTTP: &[Rule] = &[
    Rule::int("concurrency", 1.0, 256.0, "between 1 and 256"),
    Rule::float("timeout_secs", 0.0, 86_400.0, true, "more than 0 and at most 86400 seconds (a day)"),
    Rule::int("retries", 0.0, 20.0, "between 0 and 20"),
    MAX_BYTES,
];
const PIXELS: &[Rule] = &[
    Rule::int("width", 1.0, 4096.0, "between 1 and 4096 pixels"),
    Rule::int("height", 1.0, 4096.0, "between 1 and 4096 pixels"),
    Rule::float("max_value", 0.0, f64::MAX, true, "a positive, finite number"),
];
/// A synthetic image is drawn whole in memory: 4096 pixels a side is 48 MiB of RGB.
const SYNTHETIC: &[Rule] = &[
    Rule::int("count", 1.0, 10_000_000.0, "between 1 and 10000000"),
    Rule::int("size", 8.0, 4096.0, "between 8 and 4096 pixels"),
    Rule::float("noise", 0.0, 255.0, false, "between 0 and 255"),
];

/// Issues for every numeric option out of range in the `sources` of a collect table.
pub fn check(table: &Spanned<DeValue<'_>>) -> Vec<Issue> {
    let mut issues = Vec::new();
    let Some(sources) = table.get_ref().get("sources") else { return issues };
    let mut n = 0usize;
    while let Some(source) = sources.get_ref().get(n) {
        n += 1;
        let source = source.get_ref();
        let kind = source.get("type").and_then(|t| t.get_ref().as_str());
        let rules: &[Rule] = match kind {
            Some("dir") => DIR,
            Some("listing") => LISTING,
            Some("http") => HTTP,
            Some("pixels") => PIXELS,
            Some("synthetic") => SYNTHETIC,
            _ => &[],
        };
        for rule in rules {
            if let Some(value) = source.get(rule.key)
                && let Some(why) = rule.check(value.get_ref())
            {
                issues.push(Issue::new(value.span(), why));
            }
        }
        // A row holds width × height values and the label: the label column is one of them.
        if kind == Some("pixels") {
            let side = |key: &str| source.get(key).and_then(|v| integer(v.get_ref())).filter(|s| (1..=4096).contains(s));
            if let (Some(w), Some(h), Some(column)) = (side("width"), side("height"), source.get("label_column"))
                && let Some(c) = integer(column.get_ref())
            {
                let fields = w * h + 1;
                if !(-fields..fields).contains(&c) {
                    issues.push(Issue::new(
                        column.span(),
                        format!(
                            "`label_column` must be between {} and {} for {w}x{h} images ({fields} columns a row), got {c}",
                            -fields,
                            fields - 1
                        ),
                    ));
                }
            }
        }
    }
    issues
}
