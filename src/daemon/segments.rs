//! The worker loop of stages that map each input segment to one output segment
//! with the same rows (judge, distill-hints): claim unfinished inputs, read and
//! validate them, process them together, write each output under its input's
//! name, mark the inputs done, release the claims.
//!
//! Crash safety: outputs are written atomically under the input's name and the
//! input is marked done only afterwards, so a worker killed at any instant leaves
//! either nothing or a complete output that the redo replaces with the same rows.

use std::path::Path;

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use arrow::compute::concat_batches;

use super::ledger::{Claim, Ledger};
use super::quarantine::quarantine;
use super::status::StatusFile;
use super::wake::{install_stop_handler, stop_requested, Waker};
use super::{DaemonConfig, Settling};
use crate::rollout::{RolloutBatch, RolloutFile, RolloutWriter};

/// Rows read per batch from an input segment.
const READ_BATCH_ROWS: usize = 4096;

struct Claimed {
    name: String,
    _claim: Claim,
    batch: RecordBatch,
}

/// Runs the daemon loop until stopped (or, with `--once`, until no input is left).
/// `process` maps a batch (possibly several small segments concatenated) to the
/// same rows with the stage's columns set.
pub fn run(
    cfg: &DaemonConfig,
    process: &mut dyn FnMut(&RolloutBatch) -> Result<RecordBatch>,
) -> Result<()> {
    install_stop_handler();
    cfg.create_dirs()?;
    let input_dir = cfg.input_dir();
    let output_dir = cfg.output_dir();
    let ledger = Ledger::open(&cfg.state_dir(), &cfg.worker_id)?;
    let waker = Waker::new(&input_dir, cfg.poll_only, cfg.poll_interval);
    let mut status = cfg.status_file();
    let stage = cfg.stage.name();
    crate::info!(
        "{stage}: watching {} -> {} as worker {}",
        input_dir.display(),
        output_dir.display(),
        cfg.worker_id
    );
    status.set("idle");
    let mut settling = Settling::default();
    while !stop_requested() {
        let claimed = claim_batch(cfg, &ledger, &mut status, &mut settling)?;
        if claimed.is_empty() {
            if cfg.once && nothing_left(&input_dir, &ledger)? {
                break;
            }
            status.heartbeat();
            waker.wait()?;
            continue;
        }
        status.set("working");
        let names: Vec<String> = claimed.iter().map(|c| c.name.clone()).collect();
        let rows: usize = claimed.iter().map(|c| c.batch.num_rows()).sum();
        match process_claimed(cfg, &ledger, &claimed, process) {
            Ok(()) => {
                status.done(claimed.len() as u64, rows as u64);
                crate::debug!("{stage}: {} rows from {}", rows, names.join(", "));
            }
            Err(e) if claimed.len() > 1 => {
                // One bad segment must not take its neighbours with it: redo alone.
                crate::warn!(
                    "{stage}: a batch of {} segments failed ({e:#}); retrying them one by one",
                    claimed.len()
                );
                for one in claimed {
                    let n = one.batch.num_rows() as u64;
                    match process_claimed(cfg, &ledger, std::slice::from_ref(&one), process) {
                        Ok(()) => status.done(1, n),
                        Err(e) => reject(cfg, &one, &e, &mut status)?,
                    }
                }
            }
            Err(e) => {
                for one in &claimed {
                    reject(cfg, one, &e, &mut status)?;
                }
            }
        }
        if let Some(age) = cfg.retain {
            ledger.retain(&input_dir, age)?;
        }
        status.set("idle");
    }
    status.set("stopped");
    crate::info!(
        "{stage}: stopped after {} segments ({} rows)",
        status.status.segments_done,
        status.status.rows_done
    );
    Ok(())
}

/// Claims up to `batch_segments` unfinished inputs and reads them; unreadable
/// ones are quarantined on the way, unless still being written.
fn claim_batch(
    cfg: &DaemonConfig,
    ledger: &Ledger,
    status: &mut StatusFile,
    settling: &mut Settling,
) -> Result<Vec<Claimed>> {
    let input_dir = cfg.input_dir();
    let done = ledger.done_set()?;
    let mut claimed = Vec::new();
    settling.begin_scan();
    for name in super::list_segments(&input_dir)? {
        if claimed.len() >= cfg.batch_segments || stop_requested() {
            break;
        }
        if done.contains(&name) {
            continue;
        }
        let claim = match ledger.try_claim(&name) {
            Ok(Some(claim)) => claim,
            Ok(None) => continue, // another worker has it
            Err(e) => {
                // this input only: the others go on
                crate::warn!("{}: {e:#}", cfg.stage.name());
                status.error(&e);
                continue;
            }
        };
        // Finished between our listing and our claim (by the worker we waited on).
        if ledger.is_done(&name) {
            continue;
        }
        let path = input_dir.join(&name);
        match read_segment(&path) {
            Ok(batch) => claimed.push(Claimed {
                name,
                _claim: claim,
                batch,
            }),
            Err(e) if !path.exists() => {
                crate::debug!("{}: gone before it was read ({e:#})", path.display());
            }
            Err(_) if !settling.settled(&name, &path) => {}
            Err(e) => {
                status.error(&e);
                status.status.segments_quarantined += 1;
                quarantine(
                    &cfg.layout.quarantine(),
                    &cfg.input,
                    &path,
                    cfg.stage.name(),
                    &e,
                )?;
            }
        }
    }
    Ok(claimed)
}

/// A whole segment as one batch; errors name the file (not Parquet, truncated,
/// wrong schema, bad values).
fn read_segment(path: &Path) -> Result<RecordBatch> {
    let file = RolloutFile::open_path(path)?;
    let mut batches = Vec::new();
    for b in file.batches(READ_BATCH_ROWS, None)? {
        batches.push(b?.batch);
    }
    match batches.len() {
        1 => Ok(batches.pop().expect("one batch")),
        _ => concat_batches(file.schema(), &batches)
            .with_context(|| format!("{}: joining its batches", path.display())),
    }
}

/// Processes claimed segments together (those with the same columns), writes one
/// output per input, then marks the inputs done.
fn process_claimed(
    cfg: &DaemonConfig,
    ledger: &Ledger,
    claimed: &[Claimed],
    process: &mut dyn FnMut(&RolloutBatch) -> Result<RecordBatch>,
) -> Result<()> {
    let output_dir = cfg.output_dir();
    let mut start = 0;
    while start < claimed.len() {
        // The run of segments sharing the first one's schema goes in one call.
        let schema = claimed[start].batch.schema();
        let end = (start..claimed.len())
            .find(|&i| claimed[i].batch.schema() != schema)
            .unwrap_or(claimed.len());
        let group = &claimed[start..end];
        let batches: Vec<RecordBatch> = group.iter().map(|c| c.batch.clone()).collect();
        let joined = concat_batches(&schema, &batches)?;
        let source = match group.len() {
            1 => group[0].name.clone(),
            n => format!("{} (+{} segments)", group[0].name, n - 1),
        };
        let out = process(&RolloutBatch {
            source: source.into(),
            first_row: 0,
            batch: joined,
        })?;
        anyhow::ensure!(
            out.num_rows() == batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            "{}: the stage returned {} rows for {} (it must keep every row)",
            cfg.stage.name(),
            out.num_rows(),
            batches.iter().map(RecordBatch::num_rows).sum::<usize>()
        );
        let mut offset = 0;
        for c in group {
            let n = c.batch.num_rows();
            let mut writer = RolloutWriter::file(output_dir.join(&c.name))?;
            writer.write(&out.slice(offset, n))?;
            writer.finish()?;
            offset += n;
        }
        // Only now, with every output durable, are the inputs done.
        for c in group {
            ledger.mark_done(&c.name)?;
        }
        ledger.sync()?;
        start = end;
    }
    Ok(())
}

fn reject(
    cfg: &DaemonConfig,
    one: &Claimed,
    err: &anyhow::Error,
    status: &mut StatusFile,
) -> Result<()> {
    status.error(err);
    status.status.segments_quarantined += 1;
    quarantine(
        &cfg.layout.quarantine(),
        &cfg.input,
        &cfg.input_dir().join(&one.name),
        cfg.stage.name(),
        err,
    )?;
    Ok(())
}

/// Whether every input is done (for `--once`; inputs claimed by others count as
/// left, so a `--once` worker waits for them rather than exiting early).
fn nothing_left(input_dir: &Path, ledger: &Ledger) -> Result<bool> {
    let done = ledger.done_set()?;
    Ok(super::list_segments(input_dir)?
        .iter()
        .all(|n| done.contains(n)))
}
