//! The artifact formats stages exchange: what one stage writes and a later one (or
//! `predict`, `serve`, a person with Python) reads.
//!
//! Every stage reads these types and none owns them, so a stage kind never imports another
//! kind: [`dataset`] is the item table collect, clean, label and preprocess pass on
//! (`items.jsonl`, `dataset.json`); [`preprocess`] the preprocessing a dataset went through;
//! [`shards`] the tensor shards convert writes and train and eval read. Nothing here knows
//! about a running stage: reading a format from a stage's inputs is
//! [`crate::stages::io`]'s.

pub mod dataset;
pub mod preprocess;
pub mod shards;

/// One CSV field, quoted when it must be (RFC 4180).
pub fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")).into() } else { s.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
