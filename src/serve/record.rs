//! Recording, off the request path: handlers send finished [`RolloutRow`]s over a
//! channel to one writer thread that owns a [`SegmentWriter`] on `DIR/raw/`. The
//! thread rolls segments every 1024 rows or 5 s (a timer tick calls
//! `roll_if_due`), and on shutdown closes the open segment so a graceful stop
//! loses nothing.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use super::metrics::Metrics;
use crate::rollout::{RolloutRow, SegmentWriter, DEFAULT_SEGMENT_AGE, DEFAULT_SEGMENT_ROWS};

/// How often the writer thread wakes to close a segment that reached its age.
const TICK: Duration = Duration::from_millis(500);

enum Msg {
    Row(Box<RolloutRow>),
    Shutdown,
}

/// The handle request handlers use; cheap to clone. With recording off it drops rows.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Msg>>,
    metrics: Arc<Metrics>,
}

/// Owned by the server's main task, to stop the writer thread at shutdown.
pub struct RecorderThread {
    tx: mpsc::Sender<Msg>,
    handle: JoinHandle<()>,
}

impl Recorder {
    /// A recorder that records nothing (`--no-record`).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Recorder { tx: None, metrics }
    }

    /// Starts the writer thread on `dir` (created if missing).
    pub fn start(
        dir: PathBuf,
        writer_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, RecorderThread)> {
        let writer = SegmentWriter::new(&dir, writer_id)
            .with_context(|| format!("cannot record to {}", dir.display()))?
            .with_max_rows(DEFAULT_SEGMENT_ROWS)
            .with_max_age(DEFAULT_SEGMENT_AGE);
        let (tx, rx) = mpsc::channel();
        let thread_metrics = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("claw-recorder".into())
            .spawn(move || writer_loop(writer, rx, &thread_metrics))
            .context("cannot start the recorder thread")?;
        Ok((
            Recorder {
                tx: Some(tx.clone()),
                metrics,
            },
            RecorderThread { tx, handle },
        ))
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one row; never blocks.
    pub fn record(&self, row: RolloutRow) {
        if let Some(tx) = &self.tx {
            if tx.send(Msg::Row(Box::new(row))).is_err() {
                self.metrics.record_errors.fetch_add(1, Relaxed);
                crate::warn!("recorder has stopped; a row was not recorded");
            }
        }
    }
}

impl RecorderThread {
    /// Writes every row queued so far, closes the open segment and waits for the
    /// thread. Call after the last request has finished.
    pub fn shutdown(self) {
        let _ = self.tx.send(Msg::Shutdown);
        if self.handle.join().is_err() {
            crate::warn!("the recorder thread panicked; the open segment may be lost");
        }
    }
}

fn writer_loop(mut writer: SegmentWriter, rx: mpsc::Receiver<Msg>, metrics: &Metrics) {
    let dir = writer.dir().display().to_string();
    let count_done = |done: Result<Vec<PathBuf>>, rows: u64| match done {
        Ok(paths) => {
            metrics.rows_recorded.fetch_add(rows, Relaxed);
            metrics
                .segments_written
                .fetch_add(paths.len() as u64, Relaxed);
            for p in paths {
                crate::debug!("recorded segment {}", p.display());
            }
        }
        Err(err) => {
            metrics.record_errors.fetch_add(1, Relaxed);
            crate::warn!("cannot write rollout rows to {dir}: {err:#}");
        }
    };
    loop {
        match rx.recv_timeout(TICK) {
            Ok(Msg::Row(row)) => {
                // Take whatever else is queued too: one batch per wake-up.
                let mut rows = vec![*row];
                let mut stop = false;
                while let Ok(msg) = rx.try_recv() {
                    match msg {
                        Msg::Row(r) => rows.push(*r),
                        Msg::Shutdown => {
                            stop = true;
                            break;
                        }
                    }
                }
                let n = rows.len() as u64;
                let done = writer.write_rows(&rows);
                count_done(done, n);
                if stop {
                    break;
                }
            }
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let done = writer.roll_if_due().map(|p| p.into_iter().collect());
                count_done(done, 0);
            }
        }
    }
    match writer.finish() {
        Ok(Some(path)) => {
            metrics.segments_written.fetch_add(1, Relaxed);
            crate::debug!("recorded segment {}", path.display());
        }
        Ok(None) => {}
        Err(err) => {
            metrics.record_errors.fetch_add(1, Relaxed);
            crate::warn!("cannot close the last segment in {dir}: {err:#}");
        }
    }
}
