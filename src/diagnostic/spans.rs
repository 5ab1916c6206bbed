//! Where each value of a stage table is written, so checks made after a stage kind has
//! parsed its table (value ranges, and plan checks across stages) point at the exact text;
//! and the document-wide rule that every float is finite.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Issue;

/// The span of every value in a table, by dotted path relative to the table: `epochs`,
/// `cnn.widths`, `cnn.widths[0]`, `sources[1].count`, `augment.rotation_range`.
#[derive(Debug, Clone, Default)]
pub struct ValueSpans {
    whole: Range<usize>,
    by_path: HashMap<String, Range<usize>>,
    /// Paths written as NaN or an infinity: already reported by the document-wide check.
    non_finite: HashSet<String>,
}

impl ValueSpans {
    /// The spans of a table (or any value) and everything in it.
    pub fn of(value: &Spanned<DeValue<'_>>) -> Self {
        let mut spans = ValueSpans { whole: value.span(), ..ValueSpans::default() };
        spans.walk(String::new(), value);
        spans
    }

    /// [`ValueSpans::of`] for a table that is not wrapped in its span.
    pub fn of_table(table: &DeTable<'_>, whole: Range<usize>) -> Self {
        let mut spans = ValueSpans { whole, ..ValueSpans::default() };
        for (key, value) in table.iter() {
            spans.walk(key.get_ref().to_string(), value);
        }
        spans
    }

    fn walk(&mut self, path: String, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(table) => {
                for (key, v) in table.iter() {
                    let p = if path.is_empty() { key.get_ref().to_string() } else { format!("{path}.{}", key.get_ref()) };
                    self.walk(p, v);
                }
            }
            DeValue::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.walk(format!("{path}[{i}]"), v);
                }
            }
            DeValue::Float(f) if non_finite_float(f.as_str()) => {
                self.non_finite.insert(path.clone());
            }
            _ => {}
        }
        if !path.is_empty() {
            self.by_path.insert(path, value.span());
        }
    }

    /// Where `path` is written; for a value left at its default, where the nearest
    /// enclosing value is written, else the whole table.
    pub fn get(&self, path: &str) -> Range<usize> {
        let mut p = path;
        loop {
            if let Some(span) = self.by_path.get(p) {
                return span.clone();
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.whole.clone(),
            }
        }
    }

    /// Whether `path` is written in the table (rather than left at its default).
    pub fn has(&self, path: &str) -> bool {
        self.by_path.contains_key(path)
    }

    /// The span of the whole table.
    pub fn whole(&self) -> Range<usize> {
        self.whole.clone()
    }

    /// Whether `path` is written as NaN or an infinity, which the document-wide check has
    /// reported already (so a range check need not repeat it).
    pub fn is_non_finite(&self, path: &str) -> bool {
        self.non_finite.contains(path)
    }
}

/// A range of floats, for [`Checker::float`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub lo_open: bool,
    pub hi: f64,
    pub hi_open: bool,
}

impl Bounds {
    /// `[lo, hi]`
    pub const fn closed(lo: f64, hi: f64) -> Self {
        Bounds { lo, lo_open: false, hi, hi_open: false }
    }

    /// `[lo, hi)`
    pub const fn below(lo: f64, hi: f64) -> Self {
        Bounds { lo, lo_open: false, hi, hi_open: true }
    }

    /// `(lo, hi]`
    pub const fn above(lo: f64, hi: f64) -> Self {
        Bounds { lo, lo_open: true, hi, hi_open: false }
    }

    /// Finite, and inside the range (a NaN is never inside).
    pub fn contains(&self, v: f64) -> bool {
        v.is_finite() && (if self.lo_open { v > self.lo } else { v >= self.lo }) && (if self.hi_open { v < self.hi } else { v <= self.hi })
    }

    /// `in [0, 1)`, `at least 0`, `greater than 0`.
    pub fn describe(&self) -> String {
        if self.hi == f64::INFINITY {
            return if self.lo_open { format!("greater than {}", show(self.lo)) } else { format!("at least {}", show(self.lo)) };
        }
        format!("in {}{}, {}{}", if self.lo_open { '(' } else { '[' }, show(self.lo), show(self.hi), if self.hi_open { ')' } else { ']' })
    }
}

/// A float as people write it: `0.5`, `2`, `1e308` (not 309 digits).
pub fn show(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && a.is_finite() && !(1e-4..1e9).contains(&a) { format!("{v:e}") } else { format!("{v}") }
}

/// Collects problems with one stage's values, each at the span of the value.
pub struct Checker<'a> {
    pub spans: &'a ValueSpans,
    pub issues: Vec<Issue>,
}

impl<'a> Checker<'a> {
    pub fn new(spans: &'a ValueSpans) -> Self {
        Checker { spans, issues: Vec::new() }
    }

    /// A problem at the value written at `path` (see [`ValueSpans::get`]).
    pub fn fail(&mut self, path: &str, message: impl Into<String>, help: impl Into<String>) {
        self.issues.push(Issue::new(self.spans.get(path), message).help(help));
    }

    /// An integer option must lie in `lo..=hi`; `why` (may be empty) says what it means.
    pub fn int(&mut self, path: &str, v: u64, lo: u64, hi: u64, why: &str) -> bool {
        if (lo..=hi).contains(&v) {
            return true;
        }
        self.fail(path, format!("`{path}` = {v} is out of range"), format!("`{path}` must be between {lo} and {hi}{}", because(why)));
        false
    }

    /// A float option must be finite and inside `bounds`; `why` (may be empty) says what it
    /// means. A NaN or infinity written in the manifest is left to the document-wide check;
    /// one made by reading a large number into an `f32` is reported here.
    pub fn float(&mut self, path: &str, v: f64, bounds: Bounds, why: &str) -> bool {
        if bounds.contains(v) {
            return true;
        }
        if self.spans.is_non_finite(path) {
            return false;
        }
        self.fail(
            path,
            format!("`{path}` = {} is out of range", show(v)),
            format!("`{path}` must be {}{}", bounds.describe(), because(why)),
        );
        false
    }

    /// Every value of a list of floats (an `f32` list too: a number too large for `f32` is
    /// infinite here, and reported).
    pub fn floats(&mut self, path: &str, values: impl IntoIterator<Item = f64>, bounds: Bounds, why: &str) -> bool {
        let mut ok = true;
        for (i, v) in values.into_iter().enumerate() {
            ok &= self.float(&format!("{path}[{i}]"), v, bounds, why);
        }
        ok
    }

    pub fn into_issues(self) -> Vec<Issue> {
        self.issues
    }
}

fn because(why: &str) -> String {
    if why.is_empty() { String::new() } else { format!(" ({why})") }
}

/// Whether a TOML float is NaN or infinite (or too large for a 64-bit float, which reads as
/// infinite).
fn non_finite_float(text: &str) -> bool {
    match text.parse::<f64>() {
        Ok(v) => !v.is_finite(),
        Err(_) => {
            let t = text.to_ascii_lowercase();
            t.contains("nan") || t.contains("inf")
        }
    }
}

/// One issue for every NaN or infinite float anywhere in the document (`nan`, `inf`,
/// `-inf`, `1e999`), `[params]` and `--set` overrides included: kiln has no use for one, and
/// a stage that ran with one would fail late (a NaN loss, a `null` in the cache key). Stage
/// kinds still check their tables, so a stage's other problems (and a kind's own message
/// for the value) are reported with it, but no manifest with one loads.
pub(crate) fn reject_non_finite(doc: &DeTable<'_>, src: &str, issues: &mut Vec<Issue>) {
    for (_, value) in doc.iter() {
        reject_in(value, src, issues);
    }
}

fn reject_in(value: &Spanned<DeValue<'_>>, src: &str, issues: &mut Vec<Issue>) {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().for_each(|(_, v)| reject_in(v, src, issues)),
        DeValue::Array(items) => items.iter().for_each(|v| reject_in(v, src, issues)),
        DeValue::Float(f) if non_finite_float(f.as_str()) => {
            let span = value.span();
            let text = src.get(span.clone()).unwrap_or(f.as_str());
            issues
                .push(Issue::new(span, format!("`{text}` is not a number kiln can use; values must be finite")).label("not finite").help(
                "write a finite number: TOML's `nan`, `inf` and `-inf`, and numbers beyond ±1.8e308, are rejected everywhere in a manifest",
            ));
        }
        _ => {}
    }
}

/// Whether JSON made from TOML holds a `null`: TOML has none, so one can only be a NaN or
/// infinite float that serde_json turned into `null`.
pub(crate) fn has_null(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(items) => items.iter().any(has_null),
        serde_json::Value::Object(map) => map.values().any(has_null),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_back_to_the_enclosing_value() {
        let src = "a = 1\nb = { c = [1, 2.5] }\n[t]\nx = 3\n";
        let (doc, errors) = DeTable::parse_recoverable(src);
        assert!(errors.is_empty());
        let spans = ValueSpans::of(&Spanned::new(doc.span(), DeValue::Table(doc.into_inner())));
        assert_eq!(&src[spans.get("b.c[1]")], "2.5");
        assert!(src[spans.get("b.c[7]")].starts_with("[1, 2.5]"));
        assert!(src[spans.get("b.missing")].starts_with('{'));
        assert_eq!(&src[spans.get("t.x")], "3");
        assert!(spans.has("a") && !spans.has("z"));
        let (doc, _) = DeTable::parse_recoverable("x = [1.0, nan]\n");
        let spans = ValueSpans::of(&Spanned::new(doc.span(), DeValue::Table(doc.into_inner())));
        assert!(spans.is_non_finite("x[1]") && !spans.is_non_finite("x[0]"));
        assert_eq!(spans.get("z"), spans.whole());
    }

    #[test]
    fn bounds_describe_themselves() {
        assert_eq!(Bounds::below(0.0, 1.0).describe(), "in [0, 1)");
        assert_eq!(Bounds::above(0.0, f64::INFINITY).describe(), "greater than 0");
        assert!(!Bounds::closed(0.0, 1.0).contains(f64::NAN));
        assert_eq!(show(1e308), "1e308");
        assert_eq!(show(0.25), "0.25");
    }

    #[test]
    fn non_finite_floats_are_recognised() {
        for t in ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e999"] {
            assert!(non_finite_float(t), "{t}");
        }
        assert!(!non_finite_float("1e308") && !non_finite_float("-0.5"));
    }
}
