//! The state file of batch runs (`--state FILE`): what one run leaves for the next
//! so cron runs over new segments never lose or duplicate a turn.
//!
//! - `FILE` (JSON, replaced atomically): the event clock, the inputs already
//!   collected (skipped if given again), and the open sessions: their turn
//!   counters, last event, done flag and pending turns (with any next state and
//!   feedback gathered so far);
//! - `FILE.pending-N.parquet` beside it: the full rows of the pending turns (every
//!   column, unknown ones too), written before the JSON that names it; the
//!   previous one is removed after.
//!
//! The output file is made durable before the state is written, so a crash between
//! the two redoes the run (same inputs, same output name: same output).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use serde::{Deserialize, Serialize};

use super::output::Gather;
use super::pair::{Ms, OpenSession, RowRef, Sample};
use crate::fsutil::write_atomic;
use crate::rollout::{RolloutReader, RolloutWriter};

const STATE_FORMAT: &str = "claw.collect.state.v1";

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct StateFile {
    pub format: String,
    /// The latest event time seen (Unix ms).
    pub clock_ms: Option<Ms>,
    /// Inputs already collected (absolute paths).
    pub consumed: Vec<String>,
    /// Bumped on every save; names the pending-rows file.
    pub generation: u64,
    /// File name (beside the state file) of the pending turns' rows.
    pub pending_rows: Option<String>,
    /// Open sessions; their pending turns' `row.row` index the pending-rows file.
    pub sessions: Vec<OpenSession>,
}

/// A loaded state: the file and the pending rows it names.
pub(crate) struct Loaded {
    pub state: StateFile,
    pub rows: Option<RecordBatch>,
}

pub(crate) fn load(path: &Path) -> Result<Option<Loaded>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let state: StateFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a claw collect state file (delete it to start over, which collects every input again)",
            path.display()
        )
    })?;
    if state.format != STATE_FORMAT {
        bail!(
            "{}: state format is `{}`, this claw reads `{STATE_FORMAT}`",
            path.display(),
            state.format
        );
    }
    let rows = match &state.pending_rows {
        None => None,
        Some(name) => {
            let rows_path = sibling(path, name);
            let batches = RolloutReader::new(&[rows_path.display().to_string()])?
                .map(|b| b.map(|b| b.batch))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("{}: reading the pending turns", path.display()))?;
            let Some(first) = batches.first() else {
                bail!("{}: the pending turns file is empty", rows_path.display());
            };
            Some(concat_batches(&first.schema(), &batches)?)
        }
    };
    let n = rows.as_ref().map_or(0, RecordBatch::num_rows);
    for s in &state.sessions {
        for p in &s.pending {
            if p.sample.row.row as usize >= n {
                bail!(
                    "{}: session {:?} turn {} points past the {n} pending rows (state damaged; delete it to start over)",
                    path.display(),
                    s.id,
                    p.sample.turn
                );
            }
        }
    }
    Ok(Some(Loaded { state, rows }))
}

/// Points the pending turns of restored sessions at held batch `batch`.
pub(crate) fn rebase(sessions: &mut [OpenSession], batch: u32) {
    for s in sessions {
        for p in &mut s.pending {
            p.sample.row.batch = batch;
        }
    }
}

/// Writes the pending rows, then the state JSON naming them, then removes the
/// previous pending rows.
pub(crate) fn save(
    path: &Path,
    previous: Option<&StateFile>,
    clock_ms: Option<Ms>,
    consumed: Vec<String>,
    mut sessions: Vec<OpenSession>,
    gather: &Gather,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    }
    let generation = previous.map_or(0, |p| p.generation) + 1;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "collect-state".into());
    // The rows of every pending turn, in order; the turns then index this file.
    let mut samples: Vec<Sample> = Vec::new();
    for s in &mut sessions {
        for p in &mut s.pending {
            samples.push(p.sample.clone());
            p.sample.row = RowRef {
                batch: 0,
                row: samples.len() as u32 - 1,
            };
        }
    }
    let pending_rows = if samples.is_empty() {
        None
    } else {
        let name = format!("{file_name}.pending-{generation}.parquet");
        let rows_path = sibling(path, &name);
        let batch = gather.rows_without_owned(&samples)?;
        let mut writer = RolloutWriter::file(&rows_path)?;
        writer.write(&batch)?;
        writer.finish()?;
        Some(name)
    };
    let state = StateFile {
        format: STATE_FORMAT.into(),
        clock_ms,
        consumed,
        generation,
        pending_rows: pending_rows.clone(),
        sessions,
    };
    let json = serde_json::to_vec_pretty(&state)?;
    write_atomic(path, &json)?;
    if let Some(old) = previous.and_then(|p| p.pending_rows.as_ref()) {
        if pending_rows.as_ref() != Some(old) {
            let _ = std::fs::remove_file(sibling(path, old));
        }
    }
    Ok(())
}

pub(crate) fn sibling(path: &Path, name: &str) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => PathBuf::from(name),
    }
}
