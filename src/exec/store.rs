//! Where stage results are found and kept: the local cache, and the remote cache behind it
//! when the manifest has one. The engine asks one question, [`Results::lookup`], instead of
//! walking the cache and the remote step by step.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::remote::{Fetched, Remote, RemoteConfig};
use crate::cache::{Cache, StageEntry};
use crate::digest::Digest;
use crate::report::Reporter;
use crate::stages::StageError;

/// Opens `[cache.remote]` when there is one to use. A remote that cannot be opened is a
/// warning, not a failure: the command goes on with the local cache.
pub(super) fn open_remote(config: Option<&RemoteConfig>, reporter: &dyn Reporter) -> Option<Remote> {
    match Remote::open(config?) {
        Ok(r) => Some(r),
        Err(e) => {
            reporter.warn(&format!("{e}; continuing with the local cache only"));
            None
        }
    }
}

/// The local cache and the remote one.
pub(super) struct Results<'a> {
    pub cache: &'a Cache,
    pub remote: Option<&'a Remote>,
    pub reporter: &'a dyn Reporter,
}

impl Results<'_> {
    fn warn(&self) -> impl Fn(&str) + '_ {
        move |m: &str| self.reporter.warn(m)
    }

    /// A complete result for `key`: from the local cache, else from the remote (`true`,
    /// after downloading it into the local cache).
    pub fn lookup(&self, key: &Digest) -> Result<Option<(StageEntry, bool)>, StageError> {
        if let Some(entry) = self.cache.get_entry(key)?
            && self.cache.entry_is_complete(&entry)?
        {
            return Ok(Some((entry, false)));
        }
        Ok(match self.remote.map(|r| r.fetch(self.cache, key, &self.warn())) {
            Some(Fetched::Entry(entry)) => Some((*entry, true)),
            _ => None,
        })
    }

    /// Whether upstream artifact `artifact` is complete in the local cache, downloading it
    /// from the remote when it is not.
    pub fn ensure_artifact(&self, artifact: &Digest) -> Result<bool, StageError> {
        let cache = self.cache;
        let present = cache.get_tree(artifact)?.is_some_and(|t| t.entries().iter().all(|e| cache.has_blob(&e.digest)));
        Ok(present || self.remote.is_some_and(|r| r.fetch_tree(cache, artifact, &self.warn())))
    }

    /// Shares a new result through the remote. `false` when there is a remote and the
    /// upload failed (a warning says why); `true` when it worked or there is no remote.
    pub fn publish(&self, entry: &StageEntry) -> bool {
        self.remote.is_none_or(|r| r.push(self.cache, entry, &self.warn()))
    }
}

/// The line `kiln run` prints about the remote: what moved, and whether it was reachable.
pub(super) fn report_transfers(r: &Remote, reporter: &dyn Reporter) {
    let t = &r.transfers;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    reporter.summary(
        "remote",
        &[format!(
            "{}: downloaded {} objects ({:.1} MB), uploaded {} objects ({:.1} MB){}",
            r.url(),
            load(&t.downloaded_objects),
            load(&t.downloaded_bytes) as f64 / 1e6,
            load(&t.uploaded_objects),
            load(&t.uploaded_bytes) as f64 / 1e6,
            if r.is_online() { "" } else { "; unreachable, so the run used the local cache only" }
        )],
    );
}
