//! collect's files on this machine when the shared directory is an object store.
//!
//! collect runs on local files (its state is a JSON file and a Parquet file of
//! pending rows beside it; its inputs are paths). Over `s3://...` the worker
//! holding the stage lease keeps a private copy of them: on start it downloads
//! the state, it downloads each raw segment it plans, and after each run it
//! uploads the output (one PUT under the first input's name), then the pending
//! rows, then the state JSON by conditional update on the version it last saw:
//! a worker that lost its lease to another cannot overwrite the newer state
//! (fencing), it stops instead. The order is the local one: output before state,
//! so a crash redoes the planned run into the same output name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::store::{Remote, Version};

/// What collect's code reads and writes, as local paths.
pub(super) struct Places {
    pub state_path: PathBuf,
    pub raw_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Set for an object store: the copy to keep in step with it.
    pub sync: Option<StoreSync>,
}

pub(super) struct StoreSync {
    remote: Arc<Remote>,
    /// `state/collect`.
    state: String,
    raw: String,
    output: String,
    scratch: PathBuf,
    /// The version of the state JSON this worker last read or wrote.
    version: Option<Version>,
}

const STATE_NAME: &str = "collect-state.json";

impl Places {
    pub fn local(state_dir: &Path, raw_dir: PathBuf, out_dir: PathBuf) -> Places {
        Places {
            state_path: state_dir.join(STATE_NAME),
            raw_dir,
            out_dir,
            sync: None,
        }
    }

    /// A private copy of the state in `$TMPDIR`, downloaded now.
    pub fn remote(remote: &Arc<Remote>, state: &str, raw: &str, output: &str) -> Result<Places> {
        let scratch = std::env::temp_dir().join(format!(
            "claw-collect-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let places = Places {
            state_path: scratch.join("state").join(STATE_NAME),
            raw_dir: scratch.join("raw"),
            out_dir: scratch.join("out"),
            sync: Some(StoreSync {
                remote: remote.clone(),
                state: state.to_string(),
                raw: raw.to_string(),
                output: output.to_string(),
                scratch: scratch.clone(),
                version: None,
            }),
        };
        for dir in [
            scratch.join("state"),
            places.raw_dir.clone(),
            places.out_dir.clone(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        }
        let mut places = places;
        // collect records its inputs by canonical path: so must the rewrite.
        places.raw_dir = std::fs::canonicalize(&places.raw_dir)
            .with_context(|| format!("{}: cannot resolve", places.raw_dir.display()))?;
        places.pull()?;
        Ok(places)
    }

    /// Downloads the state and its pending rows. The state lists consumed inputs
    /// by path, and collect keeps an entry only while its file exists: each
    /// consumed input still in the store becomes an empty placeholder in this
    /// copy's raw folder, and its entry that path (the names stay).
    fn pull(&mut self) -> Result<()> {
        let Some(sync) = &mut self.sync else {
            return Ok(());
        };
        let state_rel = format!("{}/{STATE_NAME}", sync.state);
        let Some((bytes, version)) = sync.remote.get(&state_rel)? else {
            return Ok(());
        };
        let mut state: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
            format!("{}: not a collect state file", sync.remote.show(&state_rel))
        })?;
        let present: std::collections::HashSet<String> = sync
            .remote
            .list(&sync.raw)?
            .into_iter()
            .map(|e| e.name)
            .collect();
        if let Some(consumed) = state["consumed"].as_array_mut() {
            for entry in consumed.iter_mut() {
                let name = entry
                    .as_str()
                    .and_then(|p| Path::new(p).file_name())
                    .map(|n| n.to_string_lossy().into_owned());
                if let Some(name) = name {
                    let path = self.raw_dir.join(&name);
                    if present.contains(&name) {
                        placeholder(&path)?;
                    }
                    *entry = path.display().to_string().into();
                }
            }
        }
        if let Some(rows) = state["pending_rows"].as_str() {
            let rel = format!("{}/{rows}", sync.state);
            let (data, _) = sync.remote.get(&rel)?.with_context(|| {
                format!("{}: named by the state but missing", sync.remote.show(&rel))
            })?;
            let path = sync.scratch.join("state").join(rows);
            crate::fsutil::write_atomic(&path, &data)?;
        }
        crate::fsutil::write_atomic(&self.state_path, &serde_json::to_vec_pretty(&state)?)?;
        sync.version = Some(version);
        Ok(())
    }

    /// The local path of raw segment `name`: downloaded into the copy first on
    /// an object store (`None` when it is gone).
    pub fn input(&self, name: &str) -> Result<Option<PathBuf>> {
        let path = self.raw_dir.join(name);
        let Some(sync) = &self.sync else {
            return Ok(Some(path));
        };
        // (an empty file is the placeholder of a consumed input, not a copy)
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Ok(Some(path));
        }
        match sync.remote.get(&format!("{}/{name}", sync.raw))? {
            Some((bytes, _)) => {
                crate::fsutil::write_atomic(&path, &bytes)?;
                Ok(Some(path))
            }
            None => Ok(None),
        }
    }

    /// Forgets the local copy of a quarantined input.
    pub fn drop_input(&self, name: &str) {
        if self.sync.is_some() {
            let _ = std::fs::remove_file(self.raw_dir.join(name));
        }
    }

    /// Replaces the local copy of a consumed input by an empty placeholder:
    /// collect keeps an input in its state's consumed list while the file
    /// exists (locally, until `--retain` deletes the input).
    pub fn consumed_input(&self, name: &str) -> Result<()> {
        match self.sync {
            Some(_) => placeholder(&self.raw_dir.join(name)),
            None => Ok(()),
        }
    }

    /// After a run: uploads the output `output` (if the run wrote one), the
    /// pending rows, then the state, fenced by its version.
    pub fn push(&mut self, output: &str) -> Result<()> {
        let Some(sync) = &mut self.sync else {
            return Ok(());
        };
        let out = self.out_dir.join(output);
        if out.exists() {
            let bytes =
                std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
            sync.remote
                .put(&format!("{}/{output}", sync.output), bytes.into())?;
            let _ = std::fs::remove_file(&out);
        }
        let json = std::fs::read(&self.state_path)
            .with_context(|| format!("reading {}", self.state_path.display()))?;
        let state: serde_json::Value = serde_json::from_slice(&json)?;
        if let Some(rows) = state["pending_rows"].as_str() {
            let path = sync.scratch.join("state").join(rows);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            sync.remote
                .put(&format!("{}/{rows}", sync.state), bytes.into())?;
        }
        let state_rel = format!("{}/{STATE_NAME}", sync.state);
        let written = match &sync.version {
            Some(v) => sync.remote.update(&state_rel, json.into(), v)?,
            None => sync.remote.create(&state_rel, json.into())?,
        };
        let Some(version) = written else {
            anyhow::bail!(
                "{}: changed by another collect worker (this one's lease was lost); stopping",
                sync.remote.show(&state_rel)
            );
        };
        sync.version = Some(version);
        // Pending rows of earlier generations are no longer named by the state.
        let current = state["pending_rows"].as_str().unwrap_or_default();
        for entry in sync.remote.list(&sync.state)? {
            if entry.name.starts_with(&format!("{STATE_NAME}.pending-"))
                && entry.name.ends_with(".parquet")
                && entry.name != current
            {
                sync.remote
                    .delete(&format!("{}/{}", sync.state, entry.name))?;
            }
        }
        Ok(())
    }
}

fn placeholder(path: &Path) -> Result<()> {
    std::fs::File::create(path)
        .map(|_| ())
        .with_context(|| format!("{}: cannot create", path.display()))
}

impl Drop for StoreSync {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}
