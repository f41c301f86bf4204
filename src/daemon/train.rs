//! `claw train --watch DIR`: samples in `DIR/distilled/` (or `--from judged`)
//! become LoRA steps, each saved to `DIR/checkpoints/` for `claw serve` to load.
//! One trainer per DIR (a second waits as a standby).
//!
//! Exactly once: a sample is trained on once, also across crashes. Batches cross
//! segment boundaries, so "done" is recorded with the checkpoint itself: each
//! checkpoint's config holds a ledger of the segments finished since the previous
//! one, how far the current segment was read, and the ids of the samples its
//! steps trained on. The ledger becomes current with `LATEST` in one atomic
//! rename; on start the trainer resumes from `LATEST` and marks its segments done.
//! Samples read but not yet stepped on when a worker dies were never in a
//! checkpoint, so they are read again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::ledger::Ledger;
use super::status::StatusFile;
use super::wake::{stop_requested, Waker};
use super::{DaemonConfig, Settling};
use crate::adapter::layout::latest_in;
use crate::store::checkpoints::Mirror;
use crate::store::Root;
use crate::train::data::{file_samples, RowSamples};
use crate::train::driver::Driver;
use crate::train::StepMetrics;

/// What a checkpoint has consumed (its config's `claw_ledger`).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct TrainLedger {
    /// Segments read to the end since the previous checkpoint.
    pub done: Vec<String>,
    /// The segment being read, and how many of its rows were consumed.
    pub partial: Option<Partial>,
    /// Samples trained on since the previous checkpoint (filled by the driver).
    #[serde(default)]
    pub samples: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Partial {
    pub name: String,
    pub rows: usize,
}

/// Daemon settings of the trainer beyond [`DaemonConfig`].
pub struct TrainDaemon<'a> {
    pub cfg: &'a DaemonConfig,
    /// Train on a partial batch once input has been quiet this long.
    pub partial_after: Duration,
    /// How rows become samples: a row with a token id outside the model's
    /// vocabulary (or any other bad row) quarantines its segment.
    pub samples: RowSamples<'a>,
    pub on_step: &'a dyn Fn(&StepMetrics),
    /// The local checkpoint folder the driver saves into (DIR/checkpoints, or
    /// the local copy of an object store's).
    pub checkpoints: std::path::PathBuf,
    /// On an object store: publishes each checkpoint before its inputs are
    /// marked done, pruning the store to `--keep`.
    pub mirror: Option<(std::cell::RefCell<Mirror>, usize)>,
}

/// The ledger `LATEST` recorded, if any.
pub fn latest_ledger(checkpoints: &std::path::Path) -> Result<Option<TrainLedger>> {
    let Some(adapter) = latest_in(checkpoints)? else {
        return Ok(None);
    };
    let config = adapter.with_extension("json");
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a checkpoint config", config.display()))?;
    match value.get("claw_ledger") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(l) => Ok(Some(serde_json::from_value(l.clone()).with_context(
            || format!("{}: claw_ledger is not a train ledger", config.display()),
        )?)),
    }
}

impl TrainDaemon<'_> {
    pub fn run(&self, driver: &mut Driver) -> Result<()> {
        let cfg = self.cfg;
        let Some((_lock, mut status)) = super::start_single_worker(cfg)? else {
            return Ok(());
        };
        let root = cfg.root();
        let input_dir = cfg.input_dir();
        let ledger = cfg.ledger()?;
        // Finish the bookkeeping of the checkpoint a crash may have cut short.
        let resumed = latest_ledger(&self.checkpoints)?.unwrap_or_default();
        for name in &resumed.done {
            ledger.mark_done(name)?;
        }
        ledger.sync()?;
        let mut partial = resumed.partial.clone();
        let mut finished_since_save: Vec<String> = Vec::new();
        let waker = Waker::new(&input_dir, cfg.poll_only, cfg.poll_interval);
        crate::info!(
            "train: watching {} -> {} as worker {}, from step {}",
            root.show(&cfg.input),
            root.show(cfg.stage.output()),
            cfg.worker_id,
            driver.trainer.steps()
        );
        status.set("idle");
        let mut quiet_since = Instant::now();
        // Segments read to the end whose samples are not all in a checkpoint yet.
        let mut read_ahead: std::collections::HashSet<String> = Default::default();
        // Inputs still being written, skipped until the next wait.
        let mut settling = Settling::default();
        while !stop_requested() && !driver.done() {
            let done = ledger.done_set()?;
            let next = root
                .list_segments(&cfg.input)?
                .into_iter()
                .find(|n| !done.contains(n) && !read_ahead.contains(n) && !settling.is_waiting(n));
            let Some(name) = next else {
                if driver.pending() > 0 && (cfg.once || quiet_since.elapsed() >= self.partial_after)
                {
                    self.set_ledger(driver, &finished_since_save, partial.clone());
                    if let Some(m) = driver.step_partial()? {
                        self.saved(&ledger, &mut finished_since_save, &mut read_ahead)?;
                        status.done(0, m.samples as u64);
                        (self.on_step)(&m);
                    }
                    continue;
                }
                if driver.pending() == 0 {
                    // Every sample read is in a checkpoint or was skipped: the
                    // segments read to the end are done.
                    self.saved(&ledger, &mut finished_since_save, &mut read_ahead)?;
                }
                if cfg.once && !settling.any_waiting() {
                    break;
                }
                self.update_status(&mut status, driver);
                status.heartbeat();
                waker.wait()?;
                settling.begin_scan();
                continue;
            };
            quiet_since = Instant::now();
            status.set("working");
            let rel = format!("{}/{name}", cfg.input);
            // An object is read through a private local copy.
            let scratch = match root {
                Root::Local(_) => None,
                Root::Remote(r) => match r.get(&rel)? {
                    Some((bytes, _)) => {
                        let file = crate::store::scratch_file("train-input")?;
                        std::fs::write(file.path(), &bytes)
                            .with_context(|| format!("writing {}", file.path().display()))?;
                        Some(file)
                    }
                    None => continue, // gone
                },
            };
            let path = match &scratch {
                Some(file) => file.path().to_path_buf(),
                None => input_dir.join(&name),
            };
            let samples = match file_samples(&path, self.samples) {
                Ok(s) => s,
                Err(e) if !path.exists() => {
                    crate::debug!("{}: gone before it was read ({e:#})", path.display());
                    continue;
                }
                Err(_) if scratch.is_none() && !settling.settled(&name, &path) => continue,
                Err(e) => {
                    status.error(&e);
                    status.status.segments_quarantined += 1;
                    cfg.quarantine(&name, &e)?;
                    continue;
                }
            };
            drop(scratch);
            let skip = match &partial {
                Some(p) if p.name == name => p.rows.min(samples.len()),
                _ => 0,
            };
            for (i, sample) in samples.into_iter().enumerate().skip(skip) {
                let position = Some(Partial {
                    name: name.clone(),
                    rows: i + 1,
                });
                self.set_ledger(driver, &finished_since_save, position.clone());
                partial = position;
                if let Some(m) = driver.push(sample)? {
                    self.saved(&ledger, &mut finished_since_save, &mut read_ahead)?;
                    status.done(0, m.samples as u64);
                    (self.on_step)(&m);
                }
                if driver.done() {
                    break;
                }
            }
            finished_since_save.push(name.clone());
            read_ahead.insert(name);
            status.status.segments_done += 1;
            if let Some(age) = cfg.retain {
                ledger.retain(root, &cfg.input, age)?;
            }
            self.update_status(&mut status, driver);
            status.set("idle");
        }
        // Samples still waiting for a batch were never in a checkpoint: they are
        // read again by the next run, so stopping here loses nothing.
        status.set("stopped");
        crate::info!(
            "train: stopped at step {} ({} samples waiting for a batch are read again next time)",
            driver.trainer.steps(),
            driver.pending()
        );
        Ok(())
    }

    fn set_ledger(&self, driver: &mut Driver, finished: &[String], partial: Option<Partial>) {
        let ledger = TrainLedger {
            done: finished.to_vec(),
            partial,
            samples: Vec::new(),
        };
        driver.set_ledger(serde_json::to_value(ledger).unwrap_or_default());
    }

    /// After a checkpoint: the segments it finished are done.
    fn saved(
        &self,
        ledger: &Ledger,
        finished: &mut Vec<String>,
        read_ahead: &mut std::collections::HashSet<String>,
    ) -> Result<()> {
        // The checkpoint goes to the store (LATEST last) before its inputs are done.
        if let Some((mirror, keep)) = &self.mirror {
            mirror.borrow_mut().publish(*keep)?;
        }
        for name in finished.drain(..) {
            ledger.mark_done(&name)?;
            read_ahead.remove(&name);
        }
        ledger.sync()
    }

    fn update_status(&self, status: &mut StatusFile, driver: &Driver) {
        status.status.extra = serde_json::json!({
            "step": driver.trainer.steps(),
            "waiting_samples": driver.pending(),
            "last_checkpoint": driver.summary.last_checkpoint,
        });
    }
}
