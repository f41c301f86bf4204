//! A shared directory in an object store: the object_store crate's S3, GCS and
//! Azure clients behind a small blocking API (the daemons are threads, not
//! tasks), each call run on this store's own Tokio runtime.
//!
//! Keys are `PREFIX/REL` for a path `REL` under the root. What the exactly-once
//! protocol needs of the store, and the call that gives it:
//! - an object is never seen partial: [`Remote::put`] is one PUT;
//! - create-if-absent ([`Remote::create`]): `If-None-Match: *`, refused with 412
//!   when the key exists (markers, claims);
//! - compare-and-swap ([`Remote::update`]): `If-Match: ETAG` (`LATEST`, lease
//!   renewal, collect's state).
//!
//! Credentials: `AmazonS3Builder::from_env` (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, web identity and instance metadata), and the GCS and Azure
//! builders' `from_env` alike. Shared config/credential *profile files* are not
//! read by object_store; export the variables (`aws configure
//! export-credentials --format env`). Nothing here logs a credential: a URL
//! with user info is refused and messages show the URL without it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

/// A version of an object, for a conditional update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(UpdateVersion);

/// A file in a listing.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    /// Last modified, Unix ms (the store's clock for objects).
    pub modified_ms: i64,
}

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// The URL as shown: scheme, bucket and prefix only.
    shown: String,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Without waiting: the last handle may be dropped inside serve's runtime,
        // where blocking on another runtime's shutdown is not allowed.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.shown)
    }
}

/// Schemes that name an object store.
pub fn is_store_scheme(scheme: &str) -> bool {
    matches!(
        scheme,
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss"
    )
}

/// `text` with any user info and query string removed, for messages.
pub fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}{path}")
}

impl Remote {
    /// Connects to the store `url` names (nothing is fetched yet), with the
    /// credentials and settings of the environment.
    pub fn open(url: &str) -> Result<Remote> {
        Self::open_with(url, &[])
    }

    /// [`open`](Self::open), with S3 settings (`aws_endpoint`,
    /// `aws_access_key_id`, ...: object_store's `AmazonS3ConfigKey` names)
    /// given here over the environment's: for tests and tools that must not
    /// change their own process's environment.
    pub fn open_with(url: &str, s3_settings: &[(&str, &str)]) -> Result<Remote> {
        let shown = redact(url).trim_end_matches('/').to_string();
        let parsed =
            url::Url::parse(url).map_err(|e| anyhow::anyhow!("{shown}: not a URL ({e})"))?;
        anyhow::ensure!(
            parsed.username().is_empty() && parsed.password().is_none() && parsed.query().is_none(),
            "{shown}: credentials and options do not go in the URL; set them in the environment \
             (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT, ...)"
        );
        let bucket = parsed.host_str().unwrap_or_default();
        anyhow::ensure!(!bucket.is_empty(), "{shown}: no bucket in the URL");
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry());
                let mut endpoint = std::env::var("AWS_ENDPOINT")
                    .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                    .unwrap_or_default();
                for (key, value) in s3_settings {
                    let key: object_store::aws::AmazonS3ConfigKey = key
                        .parse()
                        .map_err(|e| anyhow::anyhow!("{shown}: S3 setting {key}: {e}"))?;
                    if key == object_store::aws::AmazonS3ConfigKey::Endpoint {
                        endpoint = value.to_string();
                    }
                    builder = builder.with_config(key, *value);
                }
                // An http:// endpoint (a local S3-compatible server) needs allow_http.
                if endpoint.starts_with("http://") {
                    builder = builder.with_allow_http(true);
                }
                Arc::new(
                    builder
                        .build()
                        .with_context(|| format!("{shown}: S3 client"))?,
                )
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry())
                    .build()
                    .with_context(|| format!("{shown}: GCS client"))?,
            ),
            _ => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry())
                    .build()
                    .with_context(|| format!("{shown}: Azure client"))?,
            ),
        };
        let prefix = Key::parse(parsed.path().trim_matches('/'))
            .map_err(|e| anyhow::anyhow!("{shown}: not a valid prefix ({e})"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("claw-store")
            .enable_all()
            .build()
            .context("starting the object store runtime")?;
        Ok(Remote {
            store,
            prefix,
            shown,
            rt: Some(rt),
        })
    }

    /// `rel` as shown in messages (`s3://bucket/prefix/rel`).
    pub fn show(&self, rel: &str) -> String {
        match rel.is_empty() {
            true => self.shown.clone(),
            false => format!("{}/{rel}", self.shown),
        }
    }

    fn key(&self, rel: &str) -> Key {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |k, part| k.clone().join(part))
    }

    /// Runs `fut` on the store's runtime and waits for it, from any thread
    /// (also from inside another runtime's task, unlike `block_on`).
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if let Some(rt) = &self.rt {
            rt.spawn(async move {
                let _ = tx.send(fut.await);
            });
        }
        rx.recv().expect("the store runtime dropped a call")
    }

    /// The objects directly in folder `rel` (not in its subfolders).
    pub fn list(&self, rel: &str) -> Result<Vec<Entry>> {
        let (store, key) = (self.store.clone(), self.key(rel));
        let result = self
            .run(async move { store.list_with_delimiter(Some(&key)).await })
            .with_context(|| format!("listing {}", self.show(rel)))?;
        Ok(result
            .objects
            .into_iter()
            .filter_map(|o| {
                Some(Entry {
                    name: o.location.filename()?.to_string(),
                    size: o.size,
                    modified_ms: o.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }

    /// Every object under folder `rel`, recursively, as paths relative to it.
    pub fn list_all(&self, rel: &str) -> Result<Vec<Entry>> {
        let (store, key) = (self.store.clone(), self.key(rel));
        let base = key.clone();
        let metas = self
            .run(async move {
                let mut out = Vec::new();
                let mut stream = store.list(Some(&key));
                while let Some(meta) = stream.next().await {
                    out.push(meta?);
                }
                Ok::<_, object_store::Error>(out)
            })
            .with_context(|| format!("listing {}", self.show(rel)))?;
        Ok(metas
            .into_iter()
            .filter_map(|o| {
                let parts: Vec<String> = o
                    .location
                    .prefix_match(&base)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                Some(Entry {
                    name: parts.join("/"),
                    size: o.size,
                    modified_ms: o.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }

    /// The object and its version, or `None` when there is none.
    pub fn get(&self, rel: &str) -> Result<Option<(Bytes, Version)>> {
        let (store, key) = (self.store.clone(), self.key(rel));
        let got = self.run(async move {
            let r = store.get(&key).await?;
            let version = UpdateVersion {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            Ok::<_, object_store::Error>((r.bytes().await?, Version(version)))
        });
        match got {
            Ok(x) => Ok(Some(x)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.show(rel))),
        }
    }

    /// Size and modification time, or `None` when there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<Entry>> {
        let (store, key) = (self.store.clone(), self.key(rel));
        match self.run(async move { store.head(&key).await }) {
            Ok(o) => Ok(Some(Entry {
                name: o.location.filename().unwrap_or_default().to_string(),
                size: o.size,
                modified_ms: o.last_modified.timestamp_millis(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.show(rel))),
        }
    }

    fn put_mode(&self, rel: &str, bytes: Bytes, mode: PutMode) -> object_store::Result<Version> {
        let (store, key) = (self.store.clone(), self.key(rel));
        self.run(async move {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            let r = store.put_opts(&key, PutPayload::from(bytes), opts).await?;
            Ok(Version(UpdateVersion::from(r)))
        })
    }

    /// Writes the object whole (one PUT), replacing any.
    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<Version> {
        self.put_mode(rel, bytes, PutMode::Overwrite)
            .with_context(|| format!("writing {}", self.show(rel)))
    }

    /// Creates the object if there is none: `Some(version)` when this call
    /// created it, `None` when it existed (the store answered 412).
    pub fn create(&self, rel: &str, bytes: Bytes) -> Result<Option<Version>> {
        match self.put_mode(rel, bytes, PutMode::Create) {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("creating {}", self.show(rel))),
        }
    }

    /// Replaces the object only if it is still at `version`: `None` when
    /// someone else changed it first.
    pub fn update(&self, rel: &str, bytes: Bytes, version: &Version) -> Result<Option<Version>> {
        match self.put_mode(rel, bytes, PutMode::Update(version.0.clone())) {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("updating {}", self.show(rel))),
        }
    }

    /// Deletes the object; one already gone is no error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let (store, key) = (self.store.clone(), self.key(rel));
        match self.run(async move { store.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {}", self.show(rel))),
        }
    }

    /// Copies `from` to `to` (server side).
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (store, a, b) = (self.store.clone(), self.key(from), self.key(to));
        self.run(async move { store.copy(&a, &b).await })
            .with_context(|| format!("copying {} to {}", self.show(from), self.show(to)))
    }
}

/// Retries of transient errors: a worker waits out a flaky store briefly,
/// then its caller decides (a daemon logs and goes on).
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(redact("s3://bucket/p/q"), "s3://bucket/p/q");
        assert_eq!(redact("s3://KEY:SECRET@bucket/p"), "s3://bucket/p");
        assert_eq!(redact("az://acct/c?sig=SECRET"), "az://acct/c");
        assert_eq!(redact("plain/path"), "plain/path");
    }
}
