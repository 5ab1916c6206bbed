//! `${params.NAME}` references in stage values.
//!
//! A value that is exactly one reference takes the parameter's value and type
//! (`epochs = "${params.epochs}"` becomes an integer); a reference inside a longer string is
//! formatted into it. The resolved value is what the stage — and so its cache key — sees.
//! Every parameter used is recorded, so `status` can name `params.lr` rather than only
//! the command line it was formatted into.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::diagnostic::Issue;

pub struct Resolver<'a, 'i> {
    params: Option<&'a Spanned<DeValue<'i>>>,
    pub issues: Vec<Issue>,
    /// Parameters referenced, by dotted name, with their values.
    pub used: BTreeMap<String, serde_json::Value>,
}

impl<'a, 'i> Resolver<'a, 'i> {
    pub fn new(params: Option<&'a Spanned<DeValue<'i>>>) -> Self {
        Resolver { params, issues: Vec::new(), used: BTreeMap::new() }
    }

    pub fn resolve_table(&mut self, table: &mut DeTable<'i>) {
        for (_, value) in table.iter_mut() {
            self.resolve_value(value);
        }
    }

    fn resolve_value(&mut self, value: &mut Spanned<DeValue<'i>>) {
        let span = value.span();
        let text = match value.get_mut() {
            DeValue::Table(t) => return self.resolve_table(t),
            DeValue::Array(items) => {
                for item in items.iter_mut() {
                    self.resolve_value(item);
                }
                return;
            }
            DeValue::String(s) if s.contains("${") => s.to_string(),
            _ => return,
        };
        if let Some(name) = whole_reference(&text) {
            if let Some(found) = self.lookup(name, &span) {
                // Keep the reference's span, so a type error points at the use.
                *value = Spanned::new(span, found.get_ref().clone());
            }
        } else if let Some(expanded) = self.expand(&text, &span) {
            *value = Spanned::new(span, DeValue::String(Cow::Owned(expanded)));
        }
    }

    fn lookup(&mut self, reference: &str, span: &Range<usize>) -> Option<&'a Spanned<DeValue<'i>>> {
        let Some(path) = reference.trim().strip_prefix("params.") else {
            self.issues.push(
                Issue::new(span.clone(), format!("unknown reference `${{{reference}}}`")).help("references have the form `${params.NAME}`"),
            );
            return None;
        };
        let mut cur = self.params;
        for part in path.split('.') {
            cur = cur.and_then(|v| v.get_ref().as_table()).and_then(|t| t.get(part));
        }
        match cur {
            Some(found) => {
                let json = serde_json::Value::deserialize(ValueDeserializer::from(found.clone())).unwrap_or(serde_json::Value::Null);
                self.used.insert(path.to_string(), json);
            }
            None => self.issues.push(
                Issue::new(span.clone(), format!("unknown parameter `params.{path}`"))
                    .label("referenced here")
                    .help(format!("define `{path}` under `[params]`")),
            ),
        }
        cur
    }

    fn expand(&mut self, text: &str, span: &Range<usize>) -> Option<String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.issues.push(Issue::new(span.clone(), "unclosed `${` in string").help("close the reference with `}`"));
                return None;
            };
            let reference = &after[..end];
            let value = self.lookup(reference, span)?;
            match value.get_ref() {
                DeValue::String(s) => out.push_str(s),
                DeValue::Table(_) | DeValue::Array(_) => {
                    self.issues.push(Issue::new(
                        span.clone(),
                        format!("parameter `{}` is a {} and cannot be embedded in a string", reference.trim(), value.get_ref().type_str()),
                    ));
                    return None;
                }
                _ => {
                    let json = serde_json::Value::deserialize(ValueDeserializer::from(value.clone())).ok()?;
                    out.push_str(&json.to_string());
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Some(out)
    }
}

fn whole_reference(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("${")?.strip_suffix('}')?;
    (!inner.contains("${") && !inner.contains('}')).then_some(inner)
}
