//! The shared directory of the daemon tests: a local folder or a bucket on the
//! test S3 server, written and read back through claw's own storage layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use claw::rollout::{rows_from_batch, RolloutFile, RolloutRow};
use claw::store::Remote;

use super::s3::S3;
use super::{read_rows, write_rows};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every sample id in the *.parquet files of `dir`, with how often it occurs,
/// checking each file is complete and that no `.tmp` is left behind.
pub fn ids_in(dir: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".tmp"),
            "partial file left: {}",
            path.display()
        );
        if name.ends_with(".parquet") {
            for row in read_rows(&path) {
                *counts.entry(row.sample_id).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// The shared directory of a test: a local folder, or a bucket on the test's
/// S3 server (`s3://BUCKET/claw-data`), which the test reads back through the
/// same storage layer the daemons use.
#[derive(Clone)]
pub enum Shared {
    Local(PathBuf),
    S3 {
        url: String,
        env: Vec<(&'static str, String)>,
        remote: Arc<Remote>,
    },
}

impl Shared {
    /// What `--watch` / `--dir` get.
    pub fn arg(&self) -> String {
        match self {
            Shared::Local(p) => s(p).to_string(),
            Shared::S3 { url, .. } => url.clone(),
        }
    }

    /// The command with this directory's credentials (none for a folder).
    pub fn env(&self, cmd: &mut Command) {
        if let Shared::S3 { env, .. } = self {
            for (k, v) in env {
                cmd.env(k, v);
            }
        }
    }

    pub fn write_rows(&self, rel: &str, rows: &[RolloutRow]) {
        match self {
            Shared::Local(p) => write_rows(&p.join(rel), rows),
            Shared::S3 { remote, .. } => {
                let tmp = tempfile::tempdir().unwrap();
                let path = tmp.path().join("segment.parquet");
                write_rows(&path, rows);
                remote
                    .put(rel, std::fs::read(&path).unwrap().into())
                    .unwrap();
            }
        }
    }

    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        match self {
            Shared::Local(p) => std::fs::read(p.join(rel)).ok(),
            Shared::S3 { remote, .. } => remote.get(rel).unwrap().map(|(b, _)| b.to_vec()),
        }
    }

    /// The names of the files in folder `rel`.
    pub fn names(&self, rel: &str) -> Vec<String> {
        match self {
            Shared::Local(p) => match std::fs::read_dir(p.join(rel)) {
                Ok(entries) => entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            },
            Shared::S3 { remote, .. } => remote
                .list(rel)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect(),
        }
    }

    /// Every sample id in the *.parquet files of folder `rel`, with how often
    /// it occurs, checking each file is complete and no `.tmp` is left behind.
    pub fn ids_in(&self, rel: &str) -> BTreeMap<String, usize> {
        if let Shared::Local(p) = self {
            return ids_in(&p.join(rel));
        }
        let mut counts = BTreeMap::new();
        for name in self.names(rel) {
            assert!(!name.ends_with(".tmp"), "partial object left: {rel}/{name}");
            if !name.ends_with(".parquet") {
                continue;
            }
            let bytes = self.read(&format!("{rel}/{name}")).unwrap();
            let file = RolloutFile::from_bytes(bytes.into(), &name).unwrap();
            for batch in file.batches(4096, None).unwrap() {
                for row in rows_from_batch(&batch.unwrap().batch).unwrap() {
                    *counts.entry(row.sample_id).or_insert(0) += 1;
                }
            }
        }
        counts
    }
}

/// A local shared directory.
pub fn local(dir: &Path) -> Shared {
    Shared::Local(dir.to_path_buf())
}

/// A bucket on `s3` as the shared directory; the daemons' local copies go to
/// `tmp` (their `$TMPDIR`), which a SIGKILL leaves behind.
pub fn s3_shared(s3: &S3, name: &str, tmp: &Path) -> Shared {
    let url = s3.bucket(name);
    let remote = s3.remote(&url);
    s3.assert_conditional_writes(&remote);
    let scratch = tmp.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut env = s3.env();
    env.push(("TMPDIR", s(&scratch).to_string()));
    Shared::S3 { url, env, remote }
}
