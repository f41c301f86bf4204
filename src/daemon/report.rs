//! `claw status`'s view of a shared directory: each stage's backlog, lag,
//! workers and last error, the latest checkpoint and the quarantine. Reads only
//! files under the directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::status::{is_alive, read_all, WorkerStatus};
use super::{list_segments, quarantine, Layout, Stage};
use crate::adapter::layout::{latest_in, parse_adapter_step};
use crate::clock::unix_ms;
use crate::rollout::RolloutFile;

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
    pub dir: PathBuf,
    pub raw_segments: usize,
    /// Seconds since serve last closed a segment.
    pub raw_newest_age_s: Option<f64>,
    pub stages: Vec<StageReport>,
    pub checkpoint: Option<CheckpointReport>,
    pub quarantine: Vec<String>,
}

/// What every stage working on `dir` is doing.
pub fn dir_report(dir: &Path) -> Result<DirReport> {
    let layout = Layout::new(dir);
    let raw = list_segments(&layout.folder("raw"))?;
    Ok(DirReport {
        dir: dir.to_path_buf(),
        raw_segments: raw.len(),
        raw_newest_age_s: raw
            .last()
            .and_then(|n| age_s(&layout.folder("raw").join(n))),
        stages: Stage::ALL
            .iter()
            .map(|&stage| stage_report(&layout, stage))
            .collect::<Result<_>>()?,
        checkpoint: checkpoint_report(&layout.checkpoints())?,
        quarantine: quarantine::list(&layout.quarantine())
            .into_iter()
            .map(|(folder, name)| format!("{folder}/{name}"))
            .collect(),
    })
}

fn stage_report(layout: &Layout, stage: Stage) -> Result<StageReport> {
    let state = layout.stage_state(stage.name());
    let workers = read_all(&state);
    let alive: Vec<&WorkerStatus> = workers.iter().filter(|w| is_alive(w)).collect();
    // The folder a live worker says it reads, else the default.
    let input = alive
        .first()
        .copied()
        .or(workers.first())
        .map(|w| w.input.clone())
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| stage.default_input().to_string());
    let done: std::collections::HashSet<String> = std::fs::read_dir(state.join("done"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let input_dir = layout.folder(&input);
    let waiting: Vec<String> = list_segments(&input_dir)?
        .into_iter()
        .filter(|n| !done.contains(&crate::fsutil::short_name(n)))
        .collect();
    // Row counts come from footers; a huge backlog is sampled rather than read whole.
    let backlog_rows = waiting
        .iter()
        .take(2000)
        .filter_map(|n| RolloutFile::open_path(&input_dir.join(n)).ok())
        .map(|f| f.num_rows())
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
            .filter_map(|n| age_s(&input_dir.join(n)))
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

fn checkpoint_report(dir: &Path) -> Result<Option<CheckpointReport>> {
    let Some(latest) = latest_in(dir).context("reading the checkpoint pointer")? else {
        return Ok(None);
    };
    let name = latest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some(CheckpointReport {
        policy_version: parse_adapter_step(&name),
        age_s: age_s(&latest),
        latest: name,
    }))
}

/// Seconds since `path` was last modified.
fn age_s(path: &Path) -> Option<f64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.elapsed().ok()?.as_secs_f64())
}
