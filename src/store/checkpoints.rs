//! `checkpoints/` on an object store: the trainer, distill-hints and serve all
//! work with a local checkpoint folder (safetensors files they load and write
//! by path), so over `s3://...` each keeps a local copy in step with the store.
//!
//! - [`Mirror::pull`] copies the checkpoint `LATEST` names (adapter, config,
//!   optimizer state), then `LATEST` itself, into the local folder: a reader
//!   following the local `LATEST` (serve's hot reload, distill's teacher) never
//!   sees a checkpoint before its files.
//! - [`Mirror::publish`] (the trainer) uploads a new checkpoint's files, then
//!   moves `LATEST` in the store by conditional update on the version it last
//!   saw: two trainers can never both move it, and the loser stops instead of
//!   overwriting the winner's ledger. `--keep` prunes the store's old ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;

use super::remote::{Remote, Version};
use crate::adapter::layout::{latest_in, optim_path, parse_adapter_step, LATEST};

const FOLDER: &str = "checkpoints";

/// A local checkpoint folder kept in step with `checkpoints/` of a store.
pub struct Mirror {
    remote: Arc<Remote>,
    local: PathBuf,
    /// The store's `LATEST` as last read or written here: its text and version.
    latest: Option<(String, Version)>,
}

impl Mirror {
    pub fn new(remote: &Arc<Remote>, local: &Path) -> Result<Mirror> {
        std::fs::create_dir_all(local)
            .with_context(|| format!("{}: cannot create the directory", local.display()))?;
        Ok(Mirror {
            remote: remote.clone(),
            local: local.to_path_buf(),
            latest: None,
        })
    }

    pub fn local(&self) -> &Path {
        &self.local
    }

    /// Copies the store's current checkpoint here if it changed; returns
    /// whether it did. With `optimizer`, the optimizer state comes too (the
    /// trainer resuming; readers need only the adapter and its config).
    pub fn pull(&mut self, optimizer: bool) -> Result<bool> {
        let pointer = format!("{FOLDER}/{LATEST}");
        let Some((bytes, version)) = self.remote.get(&pointer)? else {
            return Ok(false);
        };
        let name = String::from_utf8_lossy(&bytes).trim().to_string();
        anyhow::ensure!(
            parse_adapter_step(&name).is_some(),
            "{}: expected an adapter file name, found {name:?}",
            self.remote.show(&pointer)
        );
        if self.latest.as_ref().is_some_and(|(n, _)| *n == name) {
            self.latest = Some((name, version));
            return Ok(false);
        }
        let adapter = self.local.join(&name);
        let mut files = vec![adapter.clone(), adapter.with_extension("json")];
        if optimizer {
            files.push(optim_path(&adapter));
        }
        for path in files {
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match self.remote.get(&format!("{FOLDER}/{file}"))? {
                Some((data, _)) => crate::fsutil::write_atomic(&path, &data)?,
                // A checkpoint without optimizer state starts the optimizer afresh.
                None if path != adapter => {}
                None => anyhow::bail!(
                    "{}: named by LATEST but missing",
                    self.remote.show(&format!("{FOLDER}/{file}"))
                ),
            }
        }
        crate::fsutil::write_atomic(&self.local.join(LATEST), format!("{name}\n").as_bytes())?;
        self.latest = Some((name, version));
        Ok(true)
    }

    /// After the trainer saved a checkpoint here: uploads it, then moves the
    /// store's `LATEST` to it (conditionally), then prunes to `keep`.
    pub fn publish(&mut self, keep: usize) -> Result<()> {
        let Some(adapter) = latest_in(&self.local)? else {
            return Ok(());
        };
        let name = adapter
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.latest.as_ref().is_some_and(|(n, _)| *n == name) {
            return Ok(()); // already there
        }
        for path in [
            optim_path(&adapter),
            adapter.clone(),
            adapter.with_extension("json"),
        ] {
            let Ok(data) = std::fs::read(&path) else {
                continue; // (no optimizer state)
            };
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.remote
                .put(&format!("{FOLDER}/{file}"), Bytes::from(data))?;
        }
        let pointer = format!("{FOLDER}/{LATEST}");
        let body = Bytes::from(format!("{name}\n"));
        let moved = match &self.latest {
            Some((_, v)) => self.remote.update(&pointer, body, v)?,
            None => self.remote.create(&pointer, body)?,
        };
        let Some(version) = moved else {
            anyhow::bail!(
                "{}: moved by another trainer (this one's lease was lost); stopping",
                self.remote.show(&pointer)
            );
        };
        self.latest = Some((name.clone(), version));
        self.prune(keep, &name)
    }

    /// Deletes all but the newest `keep` adapters in the store (never `latest`),
    /// and the local copies of all but `latest`.
    fn prune(&self, keep: usize, latest: &str) -> Result<()> {
        let mut steps: Vec<u64> = self
            .remote
            .list(FOLDER)?
            .iter()
            .filter_map(|e| parse_adapter_step(&e.name))
            .collect();
        steps.sort_unstable();
        let excess = steps.len().saturating_sub(keep.max(1));
        for &step in &steps[..excess] {
            let name = crate::adapter::layout::adapter_file_name(step);
            if name == latest {
                continue;
            }
            let adapter = PathBuf::from(&name);
            for file in [
                optim_path(&adapter),
                adapter.with_extension("json"),
                adapter,
            ] {
                self.remote
                    .delete(&format!("{FOLDER}/{}", file.display()))?;
            }
        }
        Ok(())
    }
}

/// Fetches into `local` the adapters (and configs) that the turns of `batch`
/// were answered with (its `policy_version` column) and that are not there yet:
/// distill-hints scores each turn under the policy that produced it.
pub fn fetch_adapters(
    remote: &Arc<Remote>,
    local: &Path,
    batch: &arrow::array::RecordBatch,
) -> Result<()> {
    use arrow::array::{Array, Int64Array};
    let Some(column) = batch.column_by_name("policy_version") else {
        return Ok(());
    };
    let Some(versions) = column.as_any().downcast_ref::<Int64Array>() else {
        return Ok(());
    };
    let mut wanted: Vec<u64> = (0..versions.len())
        .filter(|&i| versions.is_valid(i) && versions.value(i) > 0)
        .map(|i| versions.value(i) as u64)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    for step in wanted {
        let adapter = local.join(crate::adapter::layout::adapter_file_name(step));
        if adapter.is_file() {
            continue;
        }
        std::fs::create_dir_all(local)
            .with_context(|| format!("{}: cannot create the directory", local.display()))?;
        // The config first: the adapter's presence is what the teacher checks.
        for path in [adapter.with_extension("json"), adapter.clone()] {
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Pruned from the store: the teacher says so and uses the base.
            if let Some((data, _)) = remote.get(&format!("{FOLDER}/{file}"))? {
                crate::fsutil::write_atomic(&path, &data)?;
            }
        }
    }
    Ok(())
}
