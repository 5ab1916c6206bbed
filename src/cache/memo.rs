//! The item memo store: (item digest, op digest) → bytes, for per-item work such as
//! decoding or resizing one image. Later stages call [`MemoStore::map`]; adding 10 items
//! to 10 000 then computes 10.
//!
//! It lives in `cache/state.redb` beside the file-state index; [`StateDb`] opens both.

use rayon::prelude::*;
use redb::{ReadableDatabase, ReadableTableMetadata};

use super::state::{MEMO, StateDb, StateError};
use crate::digest::Digest;
use crate::stats::WorkStats;

/// How many memo results are computed before they are written in one transaction, to
/// bound memory on large datasets.
const MEMO_CHUNK: usize = 4096;

impl StateDb {
    /// The memo store that shares this database.
    pub fn memo(&self) -> MemoStore<'_> {
        MemoStore { db: self }
    }
}

/// Per-item results keyed by (item digest, operation digest).
pub struct MemoStore<'a> {
    db: &'a StateDb,
}

impl MemoStore<'_> {
    pub fn get(&self, item: &Digest, op: &Digest) -> Result<Option<Vec<u8>>, StateError> {
        let tx = self.db.db.begin_read()?;
        let table = tx.open_table(MEMO)?;
        Ok(table.get(memo_key(item, op).as_slice())?.map(|v| v.value().to_vec()))
    }

    pub fn put(&self, item: &Digest, op: &Digest, value: &[u8]) -> Result<(), StateError> {
        let tx = self.db.begin_cache_write()?;
        tx.open_table(MEMO)?.insert(memo_key(item, op).as_slice(), value)?;
        tx.commit()?;
        Ok(())
    }

    /// Stores many results of `op` in one transaction.
    pub fn put_many(&self, op: &Digest, entries: &[(Digest, Vec<u8>)]) -> Result<(), StateError> {
        let tx = self.db.begin_cache_write()?;
        {
            let mut table = tx.open_table(MEMO)?;
            for (item, value) in entries {
                table.insert(memo_key(item, op).as_slice(), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// For every item, the memoised result of `op`, computing the misses in parallel with
    /// `compute(index)`. Failed computations are returned, not memoised.
    pub fn map<E, F>(&self, items: &[Digest], op: &Digest, compute: F) -> Result<Vec<Result<Vec<u8>, E>>, StateError>
    where
        E: Send,
        F: Fn(usize) -> Result<Vec<u8>, E> + Sync,
    {
        let stats = &self.db.stats;
        let mut out: Vec<Option<Result<Vec<u8>, E>>> = Vec::with_capacity(items.len());
        for chunk_start in (0..items.len()).step_by(MEMO_CHUNK) {
            let chunk = &items[chunk_start..(chunk_start + MEMO_CHUNK).min(items.len())];
            let mut misses = Vec::new();
            {
                let tx = self.db.db.begin_read()?;
                let table = tx.open_table(MEMO)?;
                for (i, item) in chunk.iter().enumerate() {
                    match table.get(memo_key(item, op).as_slice())? {
                        Some(v) => out.push(Some(Ok(v.value().to_vec()))),
                        None => {
                            out.push(None);
                            misses.push(chunk_start + i);
                        }
                    }
                }
            }
            WorkStats::add(&stats.memo_hits, (chunk.len() - misses.len()) as u64);
            WorkStats::add(&stats.memo_misses, misses.len() as u64);
            let computed: Vec<(usize, Result<Vec<u8>, E>)> = misses.into_par_iter().map(|i| (i, compute(i))).collect();
            let tx = self.db.begin_cache_write()?;
            {
                let mut table = tx.open_table(MEMO)?;
                for (i, result) in &computed {
                    if let Ok(bytes) = result {
                        table.insert(memo_key(&items[*i], op).as_slice(), bytes.as_slice())?;
                    }
                }
            }
            tx.commit()?;
            for (i, result) in computed {
                out[i] = Some(result);
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every item is either a hit or computed")).collect())
    }

    /// Drops every memo entry (`kiln gc --memo`). Returns how many were removed.
    pub fn clear(&self) -> Result<u64, StateError> {
        let tx = self.db.begin_cache_write()?;
        let n;
        {
            let mut table = tx.open_table(MEMO)?;
            n = table.len()?;
            table.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(n)
    }
}

fn memo_key(item: &Digest, op: &Digest) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(&item.0);
    k[32..].copy_from_slice(&op.0);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    #[test]
    fn memo_computes_only_new_items() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(WorkStats::default());
        let db = StateDb::open(&dir.path().join("state.redb"), stats.clone()).unwrap();
        let memo = db.memo();
        let op = Digest::of_bytes(b"uppercase v1");
        let contents: Vec<String> = (0..100).map(|i| format!("item {i}")).collect();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let upper = |c: &[String], i: usize| -> Result<Vec<u8>, ()> {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok(c[i].to_uppercase().into_bytes())
        };
        let items: Vec<Digest> = contents.iter().map(|c| Digest::of_bytes(c.as_bytes())).collect();
        let first = memo.map(&items, &op, |i| upper(&contents, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 100);
        assert_eq!(first[7].as_ref().unwrap(), b"ITEM 7");

        let mut more = contents.clone();
        more.extend((100..110).map(|i| format!("item {i}")));
        let items: Vec<Digest> = more.iter().map(|c| Digest::of_bytes(c.as_bytes())).collect();
        let second = memo.map(&items, &op, |i| upper(&more, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 110, "adding 10 items costs 10 computations");
        assert_eq!(second[105].as_ref().unwrap(), b"ITEM 105");
        assert_eq!(stats.memo_hits.load(Ordering::Relaxed), 100);

        let other_op = Digest::of_bytes(b"uppercase v2");
        memo.map(&items[..5], &other_op, |i| upper(&more, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 115, "a new op digest is a new memo key");
        assert_eq!(memo.clear().unwrap(), 115);
    }
}
