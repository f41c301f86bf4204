//! `claw status`'s view of a shared directory: each stage's backlog, lag,
//! workers and last error, the latest checkpoint and the quarantine. Reads only
//! files under the directory.

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde::Serialize;

use super::status::{is_alive, read_all, WorkerStatus};
use super::{quarantine, stage_state_rel, Stage};
use crate::adapter::layout::{parse_adapter_step, LATEST};
use crate::clock::unix_ms;
use crate::rollout::RolloutFile;
use crate::store::Root;

#[derive(Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    pub input: String,
    pub output: &'static str,
    pub backlog_segments: usize,
    pub backlog_rows: u64,
    /// Seconds the oldest waiting segment has waited.
    pub lag_s: Option<f64>,
    pub done_segments: usize,
    pub workers_alive: usize,
    pub rows_per_s: f64,
    pub last_error: Option<String>,
    pub last_error_age_s: Option<f64>,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Serialize)]
pub struct CheckpointReport {
    pub latest: String,
    pub policy_version: Option<u64>,
    pub age_s: Option<f64>,
}

#[derive(Serialize)]
pub struct DirReport {
    /// The directory, or the object store URL (shown without credentials).
    pub dir: String,
    pub raw_segments: usize,
    /// Seconds since serve last closed a segment.
    pub raw_newest_age_s: Option<f64>,
    pub stages: Vec<StageReport>,
    pub checkpoint: Option<CheckpointReport>,
    pub quarantine: Vec<String>,
}

/// What every stage working on `root` is doing.
pub fn dir_report(root: &Root) -> Result<DirReport> {
    let raw = modified_times(root, "raw")?;
    let newest = root.list_segments("raw")?;
    Ok(DirReport {
        dir: root.to_string(),
        raw_segments: newest.len(),
        raw_newest_age_s: newest.last().and_then(|n| age_s(raw.get(n).copied())),
        stages: Stage::ALL
            .iter()
            .map(|&stage| stage_report(root, stage))
            .collect::<Result<_>>()?,
        checkpoint: checkpoint_report(root)?,
        quarantine: quarantine::list_in(root)?
            .into_iter()
            .map(|(folder, name)| format!("{folder}/{name}"))
            .collect(),
    })
}

fn stage_report(root: &Root, stage: Stage) -> Result<StageReport> {
    let state = stage_state_rel(stage.name());
    let workers = read_all(root, &state);
    let alive: Vec<&WorkerStatus> = workers.iter().filter(|w| is_alive(w)).collect();
    // The folder a live worker says it reads, else the default.
    let input = alive
        .first()
        .copied()
        .or(workers.first())
        .map(|w| w.input.clone())
        .filter(|i| !i.is_empty() && !i.contains("..") && !i.starts_with('/'))
        .unwrap_or_else(|| stage.default_input().to_string());
    let done: std::collections::HashSet<String> = root
        .list(&format!("{state}/done"))
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let times = modified_times(root, &input)?;
    let waiting: Vec<String> = root
        .list_segments(&input)?
        .into_iter()
        .filter(|n| !done.contains(&crate::fsutil::short_name(n)))
        .collect();
    // Row counts come from footers; a huge backlog is sampled rather than read
    // whole (on an object store, where a footer costs a download, more so).
    let sample = match root {
        Root::Local(_) => 2000,
        Root::Remote(_) => 100,
    };
    let backlog_rows = waiting
        .iter()
        .take(sample)
        .filter_map(|n| segment_rows(root, &format!("{input}/{n}")))
        .sum();
    let last_error = workers
        .iter()
        .filter(|w| w.last_error.is_some())
        .max_by_key(|w| w.last_error_unix_ms);
    Ok(StageReport {
        stage: stage.name(),
        output: stage.output(),
        backlog_segments: waiting.len(),
        backlog_rows,
        lag_s: waiting
            .iter()
            .filter_map(|n| age_s(times.get(n).copied()))
            .reduce(f64::max),
        done_segments: done.len(),
        workers_alive: alive.len(),
        rows_per_s: alive.iter().fold(0.0, |sum, w| sum + w.rows_per_s),
        last_error: last_error.and_then(|w| w.last_error.clone()),
        last_error_age_s: last_error
            .and_then(|w| w.last_error_unix_ms)
            .map(|t| unix_ms().saturating_sub(t).max(0) as f64 / 1000.0),
        input,
        workers,
    })
}

/// The rows of segment `rel` (from its footer), if it reads.
fn segment_rows(root: &Root, rel: &str) -> Option<u64> {
    let file = match root {
        Root::Local(p) => RolloutFile::open_path(&p.join(rel)).ok()?,
        Root::Remote(r) => RolloutFile::from_bytes(r.get(rel).ok()??.0, rel).ok()?,
    };
    Some(file.num_rows())
}

fn checkpoint_report(root: &Root) -> Result<Option<CheckpointReport>> {
    let pointer = format!("checkpoints/{LATEST}");
    let Some(text) = root
        .read(&pointer)
        .context("reading the checkpoint pointer")?
    else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&text).trim().to_string();
    anyhow::ensure!(
        !name.is_empty() && !name.contains('/') && !name.contains(".."),
        "{}: expected a checkpoint file name, found {name:?}",
        root.show(&pointer)
    );
    let written = modified_times(root, "checkpoints")?.get(&name).copied();
    Ok(Some(CheckpointReport {
        policy_version: parse_adapter_step(&name),
        age_s: age_s(written),
        latest: name,
    }))
}

/// The modification times (Unix ms) of the files of folder `rel`.
fn modified_times(root: &Root, rel: &str) -> Result<HashMap<String, i64>> {
    Ok(root
        .list(rel)?
        .into_iter()
        .map(|e| (e.name, e.modified_ms))
        .collect())
}

/// Seconds since `modified_ms`.
fn age_s(modified_ms: Option<i64>) -> Option<f64> {
    let ms = unix_ms().checked_sub(modified_ms?)?;
    (ms >= 0).then(|| ms as f64 / 1000.0)
}
