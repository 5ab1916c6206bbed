//! Manifest problems that point at the manifest text, and where each value is written.
//!
//! The bottom of the crate: the manifest, the stage kinds and the graph all report
//! [`Issue`]s, so none of them owns the type. Every validation pass pushes issues instead
//! of returning on the first one, so a user fixing a manifest sees all of its problems at
//! once (as nextest and cargo do); [`ManifestError`] attaches them to the text.
//! [`spans`] finds the text of a value ([`ValueSpans`]) and range-checks values at it
//! ([`Checker`]).

pub mod spans;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};

pub use spans::{Bounds, Checker, ValueSpans};

/// One problem found in a manifest, before it is attached to the manifest's text.
#[derive(Debug, Clone)]
pub struct Issue {
    pub span: Option<Range<usize>>,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
}

impl Issue {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        Issue { span: Some(span), message: message.into(), label: "here".into(), help: None }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Converts a toml/serde error (which knows its span) into an issue.
    pub fn from_toml(err: &toml::de::Error, fallback: Range<usize>) -> Self {
        let message = err.message().trim().to_string();
        let help = expected_help(&message);
        Issue { span: Some(err.span().unwrap_or(fallback)), label: "here".into(), message, help }
    }
}

fn expected_help(message: &str) -> Option<String> {
    // serde's unknown-field message already lists what is expected; repeat it as help so
    // it stays visible under the underlined span.
    message
        .split_once("expected one of ")
        .map(|(_, rest)| format!("expected one of {rest}"))
        .or_else(|| message.split_once("expected ").map(|(_, rest)| format!("expected {rest}")))
}

/// A manifest problem located in the file: rendered with file:line:column and the span.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{location}: {message}")]
pub struct ManifestDiagnostic {
    location: String,
    message: String,
    #[source_code]
    src: NamedSource<Arc<str>>,
    #[label("{label}")]
    span: Option<SourceSpan>,
    label: String,
    #[help]
    help: Option<String>,
}

impl ManifestDiagnostic {
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// All problems of one manifest. Exit code 2.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("invalid manifest `{}`: {} problem{}", path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" })]
pub struct ManifestError {
    pub path: PathBuf,
    #[related]
    pub problems: Vec<ManifestDiagnostic>,
}

impl ManifestError {
    pub fn new(path: &Path, source: &Arc<str>, mut issues: Vec<Issue>) -> Self {
        issues.sort_by_key(|i| i.span.as_ref().map_or(usize::MAX, |s| s.start));
        let name = path.display().to_string();
        let problems = issues
            .into_iter()
            .map(|issue| {
                let (line, col) = issue.span.as_ref().map_or((1, 1), |s| line_col(source, s.start));
                ManifestDiagnostic {
                    location: format!("{name}:{line}:{col}"),
                    message: issue.message,
                    src: NamedSource::new(name.clone(), source.clone()),
                    span: issue.span.map(|s| SourceSpan::from(s.start..s.end.max(s.start))),
                    label: issue.label,
                    help: issue.help,
                }
            })
            .collect();
        ManifestError { path: path.to_path_buf(), problems }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = src[line_start..offset].chars().count() + 1;
    (line, col)
}

/// The closest candidate by edit distance, for "did you mean" help.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
    }

    #[test]
    fn suggests_near_names_only() {
        assert_eq!(did_you_mean("comand", ["command", "collect"]), Some("command"));
        assert_eq!(did_you_mean("zzzzzz", ["command"]), None);
    }
}
