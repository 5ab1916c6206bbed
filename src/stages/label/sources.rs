//! Where a label comes from before aliases, conflicts and corrections: what collect found,
//! the image's folder, a regex on its file name, or a mapping file.

use std::collections::HashMap;

use super::{From, LabelStage, MapKey};
use crate::digest::Digest;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};

impl LabelStage {
    /// The label the configured source gives one image (or one of its removed copies).
    pub(super) fn raw_label(
        &self,
        id: &str,
        source: &str,
        digest: &Digest,
        collected: Option<&str>,
        mapping: &HashMap<String, String>,
    ) -> Option<String> {
        match self.config.from {
            From::Collected => collected.map(String::from),
            From::Folder => {
                let mut parts = source.rsplit('/');
                parts.next();
                parts.next().map(String::from)
            }
            From::Pattern => {
                let name = source.rsplit('/').next().unwrap_or(source);
                let caps = self.pattern.as_ref()?.captures(name)?;
                caps.name("label").or_else(|| caps.get(1)).map(|m| m.as_str().to_string())
            }
            From::Mapping => {
                let key = self.config.mapping.as_ref().map_or(MapKey::Path, |m| m.key);
                match key {
                    MapKey::Digest => mapping.get(&digest.to_hex()).cloned(),
                    MapKey::Id => mapping.get(id).cloned(),
                    MapKey::Path => mapping.get(source).or_else(|| mapping.get(source.rsplit('/').next().unwrap_or(source))).cloned(),
                }
            }
        }
    }

    /// The mapping file's key → label, when `from = "mapping"`.
    pub(super) fn load_mapping(&self, cx: &StageContext<'_>) -> Result<HashMap<String, String>, StageError> {
        let Some(m) = &self.config.mapping else { return Ok(HashMap::new()) };
        let path = dep_path(cx.root, &m.path);
        let fail = |e: String| StageError::Failed(format!("mapping `{}`: {e}", m.path));
        let rows: Vec<HashMap<String, serde_json::Value>> = if m.path.ends_with(".jsonl") || m.path.ends_with(".ndjson") {
            std::fs::read_to_string(&path)
                .map_err(StageError::io("read", &path))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(|e| fail(e.to_string())))
                .collect::<Result<_, _>>()?
        } else {
            let mut r = csv::Reader::from_path(&path).map_err(|e| fail(e.to_string()))?;
            r.deserialize::<HashMap<String, String>>()
                .map(|row| row.map(|row| row.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect()))
                .collect::<Result<_, _>>()
                .map_err(|e| fail(e.to_string()))?
        };
        let text = |v: &serde_json::Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
        rows.iter()
            .enumerate()
            .map(|(n, row)| match (row.get(&m.key_field), row.get(&m.label_field)) {
                (Some(k), Some(l)) => Ok((text(k), text(l))),
                _ => Err(fail(format!("row {} lacks `{}` or `{}`", n + 1, m.key_field, m.label_field))),
            })
            .collect()
    }
}
