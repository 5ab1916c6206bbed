//! The stage cache key.
//!
//! A stage's result is looked up by the blake3 digest of one [`CacheKey`], serialised as
//! canonical JSON (object keys sorted, floats in shortest round-trip form, so reordering
//! or reformatting the manifest does not change it). Everything that can change a
//! stage's output is a field here:
//!
//! | field            | what it captures                                                    |
//! |------------------|---------------------------------------------------------------------|
//! | `format`         | [`KEY_FORMAT`]: bump when the key or artifact layout changes         |
//! | `kind`           | the stage kind (`command`, `collect`, …)                            |
//! | `implementation` | the stage kind's own version: bump when its code changes results    |
//! | `params`         | the stage's resolved parameters (after `${params.…}`)               |
//! | `uses`           | the `[params]` entries those references read (so a miss names them) |
//! | `seed`           | the pipeline seed (every stage sees it, e.g. as `KILN_SEED`)        |
//! | `deps`           | digest of every workspace path read (Merkle tree digest)            |
//! | `upstream`       | artifact digest of every upstream stage, by name                    |
//! | `outs`           | the declared output paths (where the result lands)                  |
//!
//! Upstream stages enter through their *output* digest, not their key: a stage that
//! reruns and writes the same bytes leaves its dependents cached (early cutoff).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Salt for the whole key space. Bumping it invalidates every cached stage.
pub const KEY_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    pub format: u32,
    pub kind: String,
    pub implementation: u32,
    pub params: serde_json::Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub uses: BTreeMap<String, serde_json::Value>,
    pub seed: u64,
    pub deps: BTreeMap<String, Digest>,
    pub upstream: BTreeMap<String, Digest>,
    pub outs: Vec<String>,
}

impl CacheKey {
    pub fn digest(&self) -> Digest {
        let bytes = serde_json::to_vec(self).expect("a cache key always serialises");
        let mut h = blake3::Hasher::new();
        h.update(b"kiln-stage-key\0");
        h.update(&bytes);
        Digest(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> CacheKey {
        CacheKey {
            format: KEY_FORMAT,
            kind: "command".into(),
            implementation: 1,
            params: json!({"cmd": "echo hi", "lr": 0.001}),
            uses: BTreeMap::from([("lr".into(), json!(0.001))]),
            seed: 7,
            deps: BTreeMap::from([("data/raw".into(), Digest::of_bytes(b"tree"))]),
            upstream: BTreeMap::from([("prep".into(), Digest::of_bytes(b"artifact"))]),
            outs: vec!["out".into()],
        }
    }

    type Change = Box<dyn Fn(&mut CacheKey)>;

    /// One case per field: changing any input of a stage must change its key.
    #[test]
    fn every_field_changes_the_key() {
        let k = base().digest();
        let cases: Vec<(&str, Change)> = vec![
            ("format", Box::new(|c| c.format += 1)),
            ("kind", Box::new(|c| c.kind = "collect".into())),
            ("implementation", Box::new(|c| c.implementation += 1)),
            ("params value", Box::new(|c| c.params["lr"] = json!(0.002))),
            ("params added", Box::new(|c| c.params["epochs"] = json!(3))),
            ("uses", Box::new(|c| c.uses = BTreeMap::from([("lr".into(), json!(0.01))]))),
            ("seed", Box::new(|c| c.seed += 1)),
            ("deps digest", Box::new(|c| *c.deps.get_mut("data/raw").unwrap() = Digest::of_bytes(b"other"))),
            ("deps path", Box::new(|c| c.deps = BTreeMap::from([("data/other".into(), Digest::of_bytes(b"tree"))]))),
            ("upstream digest", Box::new(|c| *c.upstream.get_mut("prep").unwrap() = Digest::of_bytes(b"x"))),
            ("upstream name", Box::new(|c| c.upstream = BTreeMap::from([("other".into(), Digest::of_bytes(b"artifact"))]))),
            ("outs", Box::new(|c| c.outs = vec!["elsewhere".into()])),
        ];
        for (field, change) in cases {
            let mut c = base();
            change(&mut c);
            assert_ne!(c.digest(), k, "changing {field} must change the key");
        }
    }

    #[test]
    fn param_order_and_float_spelling_do_not_change_the_key() {
        let a: serde_json::Value = serde_json::from_str(r#"{"lr": 1e-3, "cmd": "echo hi"}"#).unwrap();
        let mut c = base();
        c.params = a;
        assert_eq!(c.digest(), base().digest());
    }

    #[test]
    fn key_survives_a_json_round_trip() {
        let c = base();
        let back: CacheKey = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back.digest(), c.digest());
    }
}
