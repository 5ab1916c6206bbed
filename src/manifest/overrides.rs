//! `kiln run --set KEY=VALUE`: change a manifest value for one run without editing the file.
//!
//! Overrides are written under the manifest text as comment lines (`# --set train.lr = 5e-4`)
//! and their values are parsed from there, so every later pass — type checks of the stage
//! kind, `${params.X}` interpolation, plan checks — sees them as ordinary spanned values, and
//! a bad override is reported with the same file:line:column diagnostics as a bad manifest
//! line, pointing at the override.

use std::borrow::Cow;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use crate::diagnostic::Issue;
use crate::diagnostic::did_you_mean;

/// One `KEY=VALUE` from the command line. `KEY` is `STAGE.FIELD[.SUB…]`, `params.NAME[.SUB…]`,
/// `pipeline.FIELD` or `cache.remote.FIELD`; `VALUE` is TOML (`5e-4`, `[32, 64]`, `true`, `"text"`), and anything
/// that does not parse as TOML is taken as a string (`--set train.model=resnet18`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Override {
    pub key: String,
    /// The value as TOML text.
    pub value: String,
}

impl Override {
    pub fn parse(arg: &str) -> Result<Override, String> {
        let (key, value) = arg.split_once('=').ok_or_else(|| format!("`{arg}`: expected KEY=VALUE, e.g. train.lr=0.0005"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(|part| !super::valid_name(part)) {
            return Err(format!("`{arg}`: the key must be dotted names, e.g. train.lr or params.width"));
        }
        let value = value.trim();
        let value = if DeValue::parse(value).is_ok() { value.to_string() } else { toml_string(value) };
        Ok(Override { key: key.to_string(), value })
    }

    /// `KEY=VALUE` as the user would write it again.
    pub fn to_arg(&self) -> String {
        let plain = DeValue::parse(&self.value).ok().and_then(|v| v.get_ref().as_str().map(str::to_string));
        match plain {
            Some(s) if Override::parse(&format!("{}={s}", self.key)).as_ref() == Ok(self) => format!("{}={s}", self.key),
            _ => format!("{}={}", self.key, self.value),
        }
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where each override sits in the extended source text.
pub(super) struct Placed {
    pub key: String,
    pub key_span: Range<usize>,
    pub value_span: Range<usize>,
}

/// The manifest text with the overrides appended as comments, and where each one is.
pub(super) fn append(text: &str, overrides: &[Override]) -> (String, Vec<Placed>) {
    if overrides.is_empty() {
        return (text.to_string(), Vec::new());
    }
    let mut src = text.to_string();
    if !src.ends_with('\n') {
        src.push('\n');
    }
    src.push_str("\n# overrides from the command line\n");
    let mut placed = Vec::new();
    for o in overrides {
        src.push_str("# --set ");
        let key_start = src.len();
        src.push_str(&o.key);
        let key_span = key_start..src.len();
        src.push_str(" = ");
        let value_start = src.len();
        src.push_str(&o.value);
        placed.push(Placed { key: o.key.clone(), key_span, value_span: value_start..src.len() });
        src.push('\n');
    }
    (src, placed)
}

/// Writes each override into the parsed document.
pub(super) fn apply<'i>(doc: &mut DeTable<'i>, src: &'i str, placed: &[Placed], issues: &mut Vec<Issue>) {
    for p in placed {
        let value = match DeValue::parse(&src[p.value_span.clone()]) {
            Ok(v) => shift(v, p.value_span.start),
            Err(e) => {
                issues.push(Issue::new(p.value_span.clone(), format!("invalid override value: {}", e.message())));
                continue;
            }
        };
        let parts: Vec<&str> = p.key.split('.').collect();
        let (table_path, field): (Vec<&str>, &str) = match parts.as_slice() {
            ["params" | "pipeline" | "cache", _, ..] => (parts[..parts.len() - 1].to_vec(), parts[parts.len() - 1]),
            [stage, _, ..] => {
                let stages: Vec<String> = doc
                    .get("stages")
                    .and_then(|s| s.get_ref().as_table())
                    .map(|t| t.keys().map(|k| k.get_ref().to_string()).collect())
                    .unwrap_or_default();
                if !stages.iter().any(|s| s == stage) {
                    let mut issue = Issue::new(p.key_span.clone(), format!("`--set {}`: the manifest has no stage `{stage}`", p.key))
                        .label("unknown stage");
                    issue = match did_you_mean(stage, stages.iter().map(String::as_str)) {
                        Some(near) => issue.help(format!("did you mean `{near}`? or `params.…` for a parameter")),
                        None => issue.help("name a stage (`train.lr`), `params.NAME` or `pipeline.seed`"),
                    };
                    issues.push(issue);
                    continue;
                }
                let mut path = vec!["stages"];
                path.extend_from_slice(&parts[..parts.len() - 1]);
                (path, parts[parts.len() - 1])
            }
            _ => {
                issues.push(
                    Issue::new(p.key_span.clone(), format!("`--set {}`: expected STAGE.FIELD, params.NAME or pipeline.FIELD", p.key))
                        .label("too short"),
                );
                continue;
            }
        };
        let field_start = p.key_span.end - field.len();
        let key = Spanned::new(field_start..p.key_span.end, Cow::Owned(field.to_string()));
        if let Err(why) = insert_at(doc, &table_path, p.key_span.clone(), key, value) {
            issues.push(Issue::new(p.key_span.clone(), format!("`--set {}`: {why}", p.key)));
        }
    }
}

/// Sets `path.key` in `table`, creating the tables on the way.
fn insert_at<'i>(
    table: &mut DeTable<'i>,
    path: &[&str],
    span: Range<usize>,
    key: Spanned<Cow<'i, str>>,
    value: Spanned<DeValue<'i>>,
) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        table.remove(key.get_ref().as_ref());
        table.insert(key, value);
        return Ok(());
    };
    let entry = table
        .entry(Spanned::new(span.clone(), Cow::Owned(first.to_string())))
        .or_insert_with(|| Spanned::new(span.clone(), DeValue::Table(DeTable::new())));
    match entry.get_mut() {
        DeValue::Table(t) => insert_at(t, rest, span, key, value),
        other => Err(format!("`{first}` is {}, not a table", other.type_str())),
    }
}

/// Moves a value parsed from a substring to where that substring sits in the source.
fn shift<'i>(v: Spanned<DeValue<'i>>, by: usize) -> Spanned<DeValue<'i>> {
    let span = v.span();
    let span = span.start + by..span.end + by;
    let inner = match v.into_inner() {
        DeValue::Array(items) => {
            let mut out = DeArray::new();
            for item in items.iter() {
                out.push(shift(item.clone(), by));
            }
            DeValue::Array(out)
        }
        DeValue::Table(t) => {
            let mut out = DeTable::new();
            for (k, v) in t {
                let ks = k.span();
                out.insert(Spanned::new(ks.start + by..ks.end + by, k.into_inner()), shift(v, by));
            }
            DeValue::Table(out)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        let o = Override::parse("train.lr=5e-4").unwrap();
        assert_eq!((o.key.as_str(), o.value.as_str()), ("train.lr", "5e-4"));
        assert_eq!(Override::parse("train.model=resnet18").unwrap().value, "\"resnet18\"");
        assert_eq!(Override::parse("train.cnn.widths=[8, 16]").unwrap().value, "[8, 16]");
        assert_eq!(Override::parse("a.b=say \"hi\"").unwrap().value, r#""say \"hi\"""#);
        assert!(Override::parse("train.lr").is_err());
        assert!(Override::parse("train lr=1").is_err());
        assert_eq!(Override::parse("train.model=resnet18").unwrap().to_arg(), "train.model=resnet18");
        assert_eq!(Override::parse("train.lr=0.5").unwrap().to_arg(), "train.lr=0.5");
    }

    #[test]
    fn spans_point_into_the_appended_comment() {
        let (src, placed) = append("[stages.a]\nkind = \"x\"", &[Override::parse("a.lr=[1, 2]").unwrap()]);
        assert_eq!(&src[placed[0].key_span.clone()], "a.lr");
        assert_eq!(&src[placed[0].value_span.clone()], "[1, 2]");
        let (doc, errors) = DeTable::parse_recoverable(&src);
        assert!(errors.is_empty());
        let mut doc = doc.into_inner();
        let mut issues = Vec::new();
        apply(&mut doc, &src, &placed, &mut issues);
        assert!(issues.is_empty());
        let stage = doc.get("stages").unwrap().get_ref().as_table().unwrap().get("a").unwrap().get_ref().as_table().unwrap();
        let lr = stage.get("lr").unwrap();
        assert_eq!(&src[lr.span()], "[1, 2]");
        assert_eq!(&src[lr.get_ref().as_array().unwrap()[1].span()], "2");
    }
}
