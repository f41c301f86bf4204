//! Where a shared directory lives (docs/ARCHITECTURE.md, "Shared directory on
//! an object store"): `--dir` / `--watch` take a plain path, a `file://` URL, or
//! an object store URL (`s3://bucket/prefix`, `gs://bucket/prefix`,
//! `az://container/prefix`).
//!
//! [`Root`] is the one place the daemon, `claw status` and `claw up` read and
//! write the directory through. A local root calls exactly the filesystem code
//! it always did (atomic rename, `flock`, inotify); an object store root maps
//! each file to an object under the prefix and keeps the same guarantees with
//! the store's own: an object appears whole (one PUT), markers are created with
//! put-if-absent ([`Remote::create`]), claims are leases renewed by their live
//! owner ([`lease`]), and `LATEST` moves by conditional update
//! ([`Remote::update`]).
//!
//! Credentials come from the environment only (the store's usual variables,
//! `AWS_ACCESS_KEY_ID`, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_*` ...,
//! see [`remote`]); a URL carrying any is refused, and what is shown of a URL in
//! messages never holds a secret.

pub mod checkpoints;
pub mod host;
pub mod lease;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;

pub use host::list_segments;
pub use remote::{Entry, Remote, Version};

/// A shared directory: a local folder or a prefix in an object store.
#[derive(Clone, Debug)]
pub enum Root {
    Local(PathBuf),
    Remote(Arc<Remote>),
}

impl Root {
    /// Parses `--dir` / `--watch`: `s3://`, `gs://`, `az://` (and `azure://`,
    /// `abfs://`) are object stores; `file://PATH` and anything else is a local
    /// path, as before.
    pub fn parse(text: &str) -> Result<Root> {
        match scheme_of(text) {
            Some("file") => {
                let url = url_parse(text)?;
                let path = url.to_file_path().map_err(|()| {
                    anyhow::anyhow!("{}: not a local file URL", remote::redact(text))
                })?;
                Ok(Root::Local(path))
            }
            Some(scheme) if remote::is_store_scheme(scheme) => {
                Ok(Root::Remote(Arc::new(Remote::open(text)?)))
            }
            _ => Ok(Root::Local(PathBuf::from(text))),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Root::Remote(_))
    }

    /// The local folder, for code that only works on one (serve's model files).
    pub fn local(&self) -> Option<&Path> {
        match self {
            Root::Local(p) => Some(p),
            Root::Remote(_) => None,
        }
    }

    /// `rel` (a `/`-separated path under the root) as shown in messages.
    pub fn show(&self, rel: &str) -> String {
        match self {
            Root::Local(p) => p.join(rel).display().to_string(),
            Root::Remote(r) => r.show(rel),
        }
    }

    /// The local path of `rel` (local roots only).
    pub fn path(&self, rel: &str) -> Option<PathBuf> {
        self.local().map(|p| p.join(rel))
    }

    /// The `*.parquet` files of folder `rel`, sorted by name; hidden and `.tmp`
    /// files are not segments (the local listing is [`host::list_segments`]).
    pub fn list_segments(&self, rel: &str) -> Result<Vec<String>> {
        match self {
            Root::Local(p) => host::list_segments(&p.join(rel)),
            Root::Remote(r) => {
                let mut names: Vec<String> = r
                    .list(rel)?
                    .into_iter()
                    .map(|e| e.name)
                    .filter(|n| n.ends_with(".parquet") && !n.starts_with('.'))
                    .collect();
                names.sort();
                Ok(names)
            }
        }
    }

    /// The files of folder `rel` with their modification times (Unix ms).
    pub fn list(&self, rel: &str) -> Result<Vec<Entry>> {
        match self {
            Root::Local(p) => {
                let dir = p.join(rel);
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
                };
                Ok(entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| {
                        let meta = e.metadata().ok()?;
                        Some(Entry {
                            name: e.file_name().into_string().ok()?,
                            size: meta.len(),
                            modified_ms: meta
                                .modified()
                                .ok()
                                .and_then(crate::clock::unix_ms_of)
                                .unwrap_or(0),
                        })
                    })
                    .collect())
            }
            Root::Remote(r) => r.list(rel),
        }
    }

    /// The whole file `rel`, or `None` when there is none.
    pub fn read(&self, rel: &str) -> Result<Option<Bytes>> {
        match self {
            Root::Local(p) => {
                let path = p.join(rel);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            Root::Remote(r) => Ok(r.get(rel)?.map(|(b, _)| b)),
        }
    }

    /// Replaces `rel` with `bytes` so that no reader sees a partial file: a
    /// local write goes through a renamed temporary file, an object is one PUT.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        match self {
            Root::Local(p) => {
                let path = p.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).with_context(|| {
                        format!("{}: cannot create the directory", parent.display())
                    })?;
                }
                crate::fsutil::write_atomic(&path, bytes)
            }
            Root::Remote(r) => r.put(rel, Bytes::copy_from_slice(bytes)).map(|_| ()),
        }
    }

    /// Removes `rel`; one already gone is no error.
    pub fn remove(&self, rel: &str) -> Result<()> {
        match self {
            Root::Local(p) => {
                let path = p.join(rel);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
            Root::Remote(r) => r.delete(rel),
        }
    }

    pub fn exists(&self, rel: &str) -> Result<bool> {
        match self {
            Root::Local(p) => Ok(p.join(rel).exists()),
            Root::Remote(r) => Ok(r.head(rel)?.is_some()),
        }
    }

    /// Creates what a local root needs (the folders); an object store has none.
    pub fn create_dirs(&self, rels: &[&str]) -> Result<()> {
        if let Root::Local(p) = self {
            for rel in rels {
                let dir = p.join(rel);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Root::Local(p) => write!(f, "{}", p.display()),
            Root::Remote(r) => write!(f, "{}", r.show("")),
        }
    }
}

/// A private temporary file (in `$TMPDIR`), removed with its `.tmp` when
/// dropped: where an object is encoded before its one PUT, or downloaded to.
pub struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(crate::fsutil::tmp_path(&self.path));
    }
}

/// A new [`ScratchFile`] named after `what`.
pub fn scratch_file(what: &str) -> Result<ScratchFile> {
    let path = std::env::temp_dir().join(format!(
        "claw-{what}-{}-{:016x}.parquet",
        std::process::id(),
        rand::random::<u64>()
    ));
    Ok(ScratchFile { path })
}

/// A private temporary folder (in `$TMPDIR`), removed with its contents when
/// dropped: the local copies stages keep of an object store's files.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new folder named after `what`.
    pub fn new(what: &str) -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!(
            "claw-{what}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("{}: cannot create the directory", path.display()))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The URL scheme of `text`, if it has one (`s3`, `file`; not a Windows drive).
fn scheme_of(text: &str) -> Option<&str> {
    let (scheme, rest) = text.split_once("://")?;
    let ok = scheme.len() > 1
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.');
    (ok && !rest.is_empty()).then_some(scheme)
}

fn url_parse(text: &str) -> Result<url::Url> {
    url::Url::parse(text).map_err(|e| anyhow::anyhow!("{}: not a URL ({e})", remote::redact(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_and_file_urls_are_local() {
        for (text, want) in [
            ("claw-data", "claw-data"),
            ("/srv/claw-data", "/srv/claw-data"),
            ("file:///srv/claw-data", "/srv/claw-data"),
            ("./a://b", "./a://b"),
        ] {
            match Root::parse(text).unwrap() {
                Root::Local(p) => assert_eq!(p, PathBuf::from(want), "{text}"),
                Root::Remote(_) => panic!("{text} is local"),
            }
        }
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_url_redacted() {
        let err = Root::parse("s3://AKIAX:supersecret@bucket/p").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            !msg.contains("supersecret") && !msg.contains("AKIAX"),
            "{msg}"
        );
        assert!(msg.contains("credentials"), "{msg}");
    }

    #[test]
    fn local_roots_read_write_list_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::Local(dir.path().to_path_buf());
        root.write("state/judge/status-w.json", b"{}").unwrap();
        assert_eq!(
            root.read("state/judge/status-w.json").unwrap().unwrap(),
            &b"{}"[..]
        );
        assert!(root.read("nope").unwrap().is_none());
        root.write("raw/a.parquet", b"x").unwrap();
        root.write("raw/.hidden.parquet", b"x").unwrap();
        assert_eq!(root.list_segments("raw").unwrap(), vec!["a.parquet"]);
        assert_eq!(root.list("raw").unwrap().len(), 2);
        root.remove("raw/a.parquet").unwrap();
        root.remove("raw/a.parquet").unwrap();
        assert!(!root.exists("raw/a.parquet").unwrap());
    }
}
