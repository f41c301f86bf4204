//! The worker loop of stages that map each input segment to one output segment
//! with the same rows (judge, distill-hints): claim unfinished inputs, read and
//! validate them, process them together, write each output under its input's
//! name, mark the inputs done, release the claims.
//!
//! Crash safety: outputs are written atomically under the input's name and the
//! input is marked done only afterwards, so a worker killed at any instant leaves
//! either nothing or a complete output that the redo replaces with the same rows.
//! On an object store the output is one PUT under the input's name, the marker a
//! put-if-absent, and a claim whose lease was lost commits nothing.

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use arrow::compute::concat_batches;

use super::ledger::{Claim, Ledger};
use super::status::StatusFile;
use super::wake::{install_stop_handler, stop_requested, Waker};
use super::{DaemonConfig, Settling};
use crate::rollout::{RolloutBatch, RolloutFile, RolloutWriter};
use crate::store::Root;

/// Rows read per batch from an input segment.
const READ_BATCH_ROWS: usize = 4096;

struct Claimed {
    name: String,
    claim: Claim,
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
    let root = cfg.root();
    let ledger = cfg.ledger()?;
    let waker = Waker::new(&cfg.input_dir(), cfg.poll_only, cfg.poll_interval);
    let mut status = cfg.status_file();
    let stage = cfg.stage.name();
    crate::info!(
        "{stage}: watching {} -> {} as worker {}",
        root.show(&cfg.input),
        root.show(cfg.stage.output()),
        cfg.worker_id
    );
    status.set("idle");
    let mut settling = Settling::default();
    while !stop_requested() {
        let claimed = claim_batch(cfg, &ledger, &mut status, &mut settling)?;
        if claimed.is_empty() {
            if cfg.once && nothing_left(root, &cfg.input, &ledger)? {
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
            ledger.retain(root, &cfg.input, age)?;
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
    let root = cfg.root();
    let done = ledger.done_set()?;
    let mut claimed = Vec::new();
    settling.begin_scan();
    for name in root.list_segments(&cfg.input)? {
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
        let rel = format!("{}/{name}", cfg.input);
        match read_segment(root, &rel) {
            Ok(Some(batch)) => claimed.push(Claimed { name, claim, batch }),
            Ok(None) => crate::debug!("{}: gone before it was read", root.show(&rel)),
            Err(e) if !root.exists(&rel)? => {
                crate::debug!("{}: gone before it was read ({e:#})", root.show(&rel));
            }
            // (an object appears whole: an unreadable one is bad, not unfinished)
            Err(_)
                if root
                    .path(&rel)
                    .is_some_and(|p| !settling.settled(&name, &p)) => {}
            Err(e) => {
                status.error(&e);
                status.status.segments_quarantined += 1;
                cfg.quarantine(&name, &e)?;
            }
        }
    }
    Ok(claimed)
}

/// A whole segment as one batch (`None` when it is gone); errors name the
/// file (not Parquet, truncated, wrong schema, bad values).
fn read_segment(root: &Root, rel: &str) -> Result<Option<RecordBatch>> {
    let file = match root {
        Root::Local(p) => RolloutFile::open_path(&p.join(rel))?,
        Root::Remote(r) => match r.get(rel)? {
            Some((bytes, _)) => RolloutFile::from_bytes(bytes, &r.show(rel))?,
            None => return Ok(None),
        },
    };
    let mut batches = Vec::new();
    for b in file.batches(READ_BATCH_ROWS, None)? {
        batches.push(b?.batch);
    }
    match batches.len() {
        1 => Ok(batches.pop()),
        _ => concat_batches(file.schema(), &batches)
            .with_context(|| format!("{}: joining its batches", root.show(rel)))
            .map(Some),
    }
}

/// Writes one output segment `rel` durably, with no partial file ever visible:
/// locally through a renamed temporary file, on an object store as one PUT
/// (encoded in memory first, through a private temporary file).
fn write_segment(root: &Root, rel: &str, batch: &RecordBatch) -> Result<()> {
    match root {
        Root::Local(p) => {
            let mut writer = RolloutWriter::file(p.join(rel))?;
            writer.write(batch)?;
            writer.finish()?;
        }
        Root::Remote(r) => {
            let scratch = crate::store::scratch_file("segment")?;
            let mut writer = RolloutWriter::file(scratch.path())?;
            writer.write(batch)?;
            writer.finish()?;
            let bytes = std::fs::read(scratch.path())
                .with_context(|| format!("reading {}", scratch.path().display()))?;
            r.put(rel, bytes.into())?;
        }
    }
    Ok(())
}

/// Processes claimed segments together (those with the same columns), writes one
/// output per input, then marks the inputs done.
fn process_claimed(
    cfg: &DaemonConfig,
    ledger: &Ledger,
    claimed: &[Claimed],
    process: &mut dyn FnMut(&RolloutBatch) -> Result<RecordBatch>,
) -> Result<()> {
    let root = cfg.root();
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
        let source = source_name(group);
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
            let rel = format!("{}/{}", cfg.stage.output(), c.name);
            write_segment(root, &rel, &out.slice(offset, n))?;
            offset += n;
        }
        if group.iter().any(|c| c.claim.lost()) {
            // Another worker may have these inputs now: it records them; the
            // outputs written meanwhile are the same rows under the same names.
            crate::warn!(
                "{}: a claim on {} expired before its work was recorded; leaving it to its new owner",
                cfg.stage.name(),
                source_name(group)
            );
            start = end;
            continue;
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
    cfg.quarantine(&one.name, err)
}

fn source_name(group: &[Claimed]) -> String {
    match group.len() {
        1 => group[0].name.clone(),
        n => format!("{} (+{} segments)", group[0].name, n - 1),
    }
}

/// Whether every input is done (for `--once`; inputs claimed by others count as
/// left, so a `--once` worker waits for them rather than exiting early).
fn nothing_left(root: &Root, input: &str, ledger: &Ledger) -> Result<bool> {
    let done = ledger.done_set()?;
    Ok(root.list_segments(input)?.iter().all(|n| done.contains(n)))
}
