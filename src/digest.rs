//! Content digests: blake3, shown and stored as 64 lowercase hex characters.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Files at least this large are hashed with blake3's multithreaded, memory-mapped path;
/// below it a plain read is cheaper than setting up the map and the thread fan-out.
const MMAP_THRESHOLD: u64 = 1 << 20;

/// A blake3 digest of some content (a file, a tree, a cache key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Hashes a file's content. Large files use all cores (blake3's rayon mode).
    pub fn of_file(path: &Path) -> std::io::Result<(Self, u64)> {
        let len = std::fs::metadata(path)?.len();
        let mut hasher = blake3::Hasher::new();
        if len >= MMAP_THRESHOLD {
            hasher.update_mmap_rayon(path)?;
        } else {
            let mut file = std::fs::File::open(path)?;
            let mut buf = Vec::with_capacity(len as usize + 1);
            file.read_to_end(&mut buf)?;
            hasher.update(&buf);
            return Ok((Digest(*hasher.finalize().as_bytes()), buf.len() as u64));
        }
        Ok((Digest(*hasher.finalize().as_bytes()), len))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters: enough to tell digests apart in messages.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid digest `{0}`: expected 64 hex characters")]
pub struct ParseDigestError(String);

impl FromStr for Digest {
    type Err = ParseDigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(ParseDigestError(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseDigestError(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of_bytes(b"kiln");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("zz".parse::<Digest>().is_err());
    }

    #[test]
    fn file_digest_matches_bytes_digest_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"hello").unwrap();
        assert_eq!(Digest::of_file(&small).unwrap().0, Digest::of_bytes(b"hello"));
        let big = dir.path().join("big");
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &data).unwrap();
        let (d, n) = Digest::of_file(&big).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(d, Digest::of_bytes(&data));
    }
}
