//! A shared remote cache in S3-compatible object storage (`[cache.remote]` in the manifest).
//!
//! The remote mirrors the local layout under its prefix: `blobs/ab/cdef…`, `trees/ab/cdef…`
//! and `stages/<key>.json`. Keys are digests, so writers never conflict and any object can
//! be checked against its own name.
//!
//! - **Read-through**: on a local miss, the stage entry is fetched, then its artifact tree,
//!   then the blobs this cache lacks (concurrently, each verified against its digest), and
//!   committed locally in the usual order (blobs, tree, entry). A corrupt or truncated
//!   object makes the remote entry a miss: the stage runs and its upload overwrites it.
//! - **Write-through**: after a stage runs, blobs are uploaded first (skipping those
//!   already there), then the tree, then the entry, so a reader never finds an entry whose
//!   blobs are missing.
//! - **Faults**: a remote that cannot be reached turns itself off for the rest of the
//!   command with one warning; the run goes on with the local cache.
//!
//! Credentials come from the standard `AWS_*` environment variables, never the manifest.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{Cache, CacheError, StageEntry, Tree};
use crate::digest::Digest;

/// `[cache.remote]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// For S3-compatible servers (Garage, MinIO, …): `http://127.0.0.1:3900`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Concurrent transfers (default 16).
    #[serde(default)]
    pub jobs: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote cache url `{url}`: {why}")]
    Config { url: String, why: String },
    #[error("remote cache {url}: {source}")]
    Store { url: String, source: object_store::Error },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Transfer counters, for the user and for benchmarks.
#[derive(Debug, Default)]
pub struct Transfers {
    pub uploaded_objects: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub downloaded_objects: AtomicU64,
    pub downloaded_bytes: AtomicU64,
    pub corrupt_objects: AtomicU64,
}

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    jobs: usize,
    runtime: tokio::runtime::Runtime,
    /// Set at the first failure to reach the remote: the rest of the command is local.
    offline: AtomicBool,
    /// Objects found corrupt: uploaded again even though they exist.
    bad: Mutex<HashSet<String>>,
    pub transfers: Transfers,
}

/// What became of one remote lookup.
pub enum Fetched {
    /// The entry and everything it names are now in the local cache.
    Entry(Box<StageEntry>),
    /// The remote has no entry for this key (or it is unusable; a warning says why).
    Miss,
}

impl Remote {
    /// Opens the remote with credentials from the `AWS_*` environment variables.
    pub fn open(config: &RemoteConfig) -> Result<Remote, RemoteError> {
        Self::open_inner(config, None)
    }

    /// For programs that hold credentials themselves (never read from a manifest).
    pub fn open_with_credentials(config: &RemoteConfig, key_id: &str, secret: &str) -> Result<Remote, RemoteError> {
        Self::open_inner(config, Some((key_id, secret)))
    }

    fn open_inner(config: &RemoteConfig, credentials: Option<(&str, &str)>) -> Result<Remote, RemoteError> {
        let fail = |why: String| RemoteError::Config { url: config.url.clone(), why };
        let rest = config.url.strip_prefix("s3://").ok_or_else(|| fail("expected s3://BUCKET[/PREFIX]".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(fail("no bucket name".into()));
        }
        // Credentials and anything else from the standard AWS_* variables.
        // A dead remote must cost seconds, not minutes: short timeouts, few retries. (Client
        // options go first: they carry `allow_http`, which the endpoint below may set.)
        let client = object_store::ClientOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(60));
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
        };
        let mut builder =
            object_store::aws::AmazonS3Builder::from_env().with_client_options(client).with_retry(retry).with_bucket_name(bucket);
        if let Some((key_id, secret)) = credentials {
            builder = builder.with_access_key_id(key_id).with_secret_access_key(secret);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &config.endpoint {
            builder =
                builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://")).with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| fail(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kiln-remote")
            .build()
            .map_err(|e| fail(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Remote {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: config.url.clone(),
            jobs: config.jobs.unwrap_or(16).max(1),
            runtime,
            offline: AtomicBool::new(false),
            bad: Mutex::new(HashSet::new()),
            transfers: Transfers::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// False once the remote could not be reached during this command.
    pub fn is_online(&self) -> bool {
        !self.offline.load(Ordering::Relaxed)
    }

    fn path(&self, kind: &str, digest: &Digest, suffix: &str) -> ObjectPath {
        let hex = digest.to_hex();
        let name = match kind {
            "stages" => format!("stages/{hex}{suffix}"),
            _ => format!("{kind}/{}/{}{suffix}", &hex[..2], &hex[2..]),
        };
        if self.prefix.is_empty() { ObjectPath::from(name) } else { ObjectPath::from(format!("{}/{name}", self.prefix)) }
    }

    fn store_error(&self, source: object_store::Error) -> RemoteError {
        RemoteError::Store { url: self.url.clone(), source }
    }

    /// What every remote operation does with its outcome: a local cache problem concerns
    /// this one object (warn, go on); anything else is the remote failing, which switches
    /// it off for the rest of the command with one warning.
    fn settle<T>(&self, result: Result<T, RemoteError>, what: &str, warn: &dyn Fn(&str)) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e @ RemoteError::Cache(_)) => {
                warn(&format!("{what}: {e}"));
                None
            }
            Err(e) => {
                if !self.offline.swap(true, Ordering::Relaxed) {
                    warn(&format!("{e}; continuing with the local cache only"));
                }
                None
            }
        }
    }

    async fn get(&self, path: &ObjectPath) -> Result<Option<bytes::Bytes>, RemoteError> {
        match self.store.get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| self.store_error(e))?;
                self.transfers.downloaded_objects.fetch_add(1, Ordering::Relaxed);
                self.transfers.downloaded_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(Some(bytes))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error(e)),
        }
    }

    fn corrupt(&self, path: &ObjectPath, why: &str, warn: &dyn Fn(&str)) {
        self.transfers.corrupt_objects.fetch_add(1, Ordering::Relaxed);
        self.bad.lock().expect("bad set").insert(path.to_string());
        warn(&format!("remote object {path} is corrupt ({why}); ignoring it, it will be replaced"));
    }

    /// Looks `key` up remotely and, when it is complete and intact, brings it into `cache`.
    pub fn fetch(&self, cache: &Cache, key: &Digest, warn: &dyn Fn(&str)) -> Fetched {
        if !self.is_online() {
            return Fetched::Miss;
        }
        let result = self.runtime.block_on(self.fetch_async(cache, key, warn));
        self.settle(result, &format!("remote entry {}", key.short()), warn).unwrap_or(Fetched::Miss)
    }

    async fn fetch_async(&self, cache: &Cache, key: &Digest, warn: &dyn Fn(&str)) -> Result<Fetched, RemoteError> {
        let entry_path = self.path("stages", key, ".json");
        let Some(bytes) = self.get(&entry_path).await? else { return Ok(Fetched::Miss) };
        let entry: StageEntry = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) => {
                self.corrupt(&entry_path, &e.to_string(), warn);
                return Ok(Fetched::Miss);
            }
        };
        if entry.key.digest() != *key {
            self.corrupt(&entry_path, "it describes another key", warn);
            return Ok(Fetched::Miss);
        }
        if !self.fetch_tree_async(cache, &entry.artifact, warn).await? {
            return Ok(Fetched::Miss);
        }
        cache.put_entry(&entry)?;
        Ok(Fetched::Entry(Box::new(entry)))
    }

    /// Brings an artifact (its tree and the blobs this cache lacks) from the remote, by
    /// digest: how a node without a shared filesystem gets its inputs. False when the remote
    /// lacks it or any object is corrupt.
    pub fn fetch_tree(&self, cache: &Cache, artifact: &Digest, warn: &dyn Fn(&str)) -> bool {
        if !self.is_online() {
            return false;
        }
        let result = self.runtime.block_on(self.fetch_tree_async(cache, artifact, warn));
        self.settle(result, &format!("remote artifact {}", artifact.short()), warn).unwrap_or(false)
    }

    async fn fetch_tree_async(&self, cache: &Cache, artifact: &Digest, warn: &dyn Fn(&str)) -> Result<bool, RemoteError> {
        let tree = match cache.get_tree(artifact)? {
            Some(t) => t,
            None => {
                let tree_path = self.path("trees", artifact, "");
                let Some(bytes) = self.get(&tree_path).await? else {
                    warn(&format!("the remote lacks artifact {}", artifact.short()));
                    return Ok(false);
                };
                match Tree::decode(&bytes) {
                    Ok(t) if t.digest() == *artifact => t,
                    Ok(_) => {
                        self.corrupt(&tree_path, "its digest does not match its name", warn);
                        return Ok(false);
                    }
                    Err(e) => {
                        self.corrupt(&tree_path, &e.to_string(), warn);
                        return Ok(false);
                    }
                }
            }
        };
        let mut wanted: Vec<Digest> = tree.entries().iter().map(|e| e.digest).filter(|d| !cache.has_blob(d)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let results: Vec<Result<bool, RemoteError>> = stream::iter(wanted)
            .map(|digest| async move {
                let path = self.path("blobs", &digest, "");
                let Some(bytes) = self.get(&path).await? else {
                    warn(&format!("remote blob {} is missing", digest.short()));
                    return Ok(false);
                };
                if Digest::of_bytes(&bytes) != digest {
                    self.corrupt(&path, "its content does not match its digest", warn);
                    return Ok(false);
                }
                cache.put_blob_bytes(&bytes)?;
                Ok(true)
            })
            .buffer_unordered(self.jobs)
            .collect()
            .await;
        let mut complete = true;
        for r in results {
            complete &= r?;
        }
        if complete {
            cache.put_tree(&tree)?;
        }
        Ok(complete)
    }

    /// Uploads `entry` and what it names that the remote lacks: blobs, then the tree, then
    /// the entry. Failures warn and switch the remote off; they never fail the stage.
    pub fn push(&self, cache: &Cache, entry: &StageEntry, warn: &dyn Fn(&str)) -> bool {
        if !self.is_online() {
            return false;
        }
        let result = self.runtime.block_on(self.push_async(cache, entry));
        self.settle(result, &format!("cannot upload stage entry {}", entry.key.digest().short()), warn).is_some()
    }

    async fn exists(&self, path: &ObjectPath) -> Result<bool, RemoteError> {
        if self.bad.lock().expect("bad set").contains(&path.to_string()) {
            return Ok(false);
        }
        match self.store.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_error(e)),
        }
    }

    async fn put(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let n = bytes.len() as u64;
        self.store.put(path, PutPayload::from(bytes)).await.map_err(|e| self.store_error(e))?;
        self.bad.lock().expect("bad set").remove(&path.to_string());
        self.transfers.uploaded_objects.fetch_add(1, Ordering::Relaxed);
        self.transfers.uploaded_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn push_async(&self, cache: &Cache, entry: &StageEntry) -> Result<(), RemoteError> {
        let key = entry.key.digest();
        let entry_path = self.path("stages", &key, ".json");
        // An entry already there means its blobs are too (they went first), unless this
        // command found one of them corrupt: then every blob is checked and replaced.
        let repairing = !self.bad.lock().expect("bad set").is_empty();
        if !repairing && self.exists(&entry_path).await? {
            return Ok(());
        }
        let tree = cache.get_tree(&entry.artifact)?.ok_or(CacheError::MissingTree { digest: entry.artifact })?;
        let mut blobs: Vec<Digest> = tree.entries().iter().map(|e| e.digest).collect();
        blobs.sort_unstable();
        blobs.dedup();
        stream::iter(blobs)
            .map(|digest| async move {
                let path = self.path("blobs", &digest, "");
                if self.exists(&path).await? {
                    return Ok(());
                }
                // Checked as it is read: a corrupt local blob must not spread to every
                // machine that shares the remote.
                let bytes = cache.read_blob(&digest).map_err(RemoteError::Cache)?;
                self.put(&path, bytes).await
            })
            .buffer_unordered(self.jobs)
            .try_collect::<Vec<()>>()
            .await?;
        self.put(&self.path("trees", &entry.artifact, ""), tree.encode()).await?;
        let mut json = serde_json::to_vec_pretty(entry).expect("entries serialise");
        json.push(b'\n');
        self.put(&entry_path, json).await
    }

    /// Overwrites an object (tests use it to plant corruption; `kiln` itself never does).
    pub fn put_raw(&self, relative: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let path =
            if self.prefix.is_empty() { ObjectPath::from(relative) } else { ObjectPath::from(format!("{}/{relative}", self.prefix)) };
        self.runtime.block_on(self.put(&path, bytes))
    }

    /// The object name of a blob, relative to the prefix.
    pub fn blob_name(digest: &Digest) -> String {
        let hex = digest.to_hex();
        format!("blobs/{}/{}", &hex[..2], &hex[2..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RemoteConfig {
        RemoteConfig { url: url.into(), endpoint: Some("http://127.0.0.1:9".into()), region: Some("garage".into()), jobs: None }
    }

    #[test]
    fn objects_mirror_the_local_layout_under_the_prefix() {
        let r = Remote::open_with_credentials(&config("s3://bucket/team/kiln/"), "id", "secret").unwrap();
        let d = Digest::of_bytes(b"x");
        let hex = d.to_hex();
        assert_eq!(r.path("blobs", &d, "").to_string(), format!("team/kiln/blobs/{}/{}", &hex[..2], &hex[2..]));
        assert_eq!(r.path("stages", &d, ".json").to_string(), format!("team/kiln/stages/{hex}.json"));
        let bare = Remote::open_with_credentials(&config("s3://bucket"), "id", "secret").unwrap();
        assert_eq!(bare.path("trees", &d, "").to_string(), format!("trees/{}/{}", &hex[..2], &hex[2..]));
        assert_eq!(Remote::blob_name(&d), format!("blobs/{}/{}", &hex[..2], &hex[2..]));
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in ["gs://bucket", "s3://", "bucket/prefix"] {
            assert!(matches!(Remote::open_with_credentials(&config(url), "id", "secret"), Err(RemoteError::Config { .. })), "{url}");
        }
    }

    #[test]
    fn an_unreachable_remote_turns_itself_off_with_one_warning() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), Arc::new(crate::stats::WorkStats::default())).unwrap();
        let r = Remote::open_with_credentials(&config("s3://bucket/p"), "id", "secret").unwrap();
        let warnings = Mutex::new(Vec::new());
        let warn = |m: &str| warnings.lock().unwrap().push(m.to_string());
        assert!(matches!(r.fetch(&cache, &Digest::of_bytes(b"k"), &warn), Fetched::Miss));
        assert!(!r.is_online());
        assert!(matches!(r.fetch(&cache, &Digest::of_bytes(b"k2"), &warn), Fetched::Miss));
        let w = warnings.into_inner().unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("continuing with the local cache only"), "{w:?}");
    }
}
