//! Recording, off the request path: handlers send finished [`RolloutRow`]s over a
//! channel to one writer thread that owns a [`SegmentWriter`] on `DIR/raw/`. The
//! thread rolls segments every `--segment-rows` rows or `--segment-age-ms` (by
//! default 1024 rows or 5 s; a timer tick calls `roll_if_due`), and on shutdown
//! closes the open segment so a graceful stop loses nothing. A kill -9 loses the
//! open segment (its `.parquet.tmp` stays behind; no reader looks at it, and the
//! next server removes it) and the rows still queued for it, nothing else.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use super::metrics::Metrics;
use crate::rollout::{RolloutRow, SegmentWriter};

/// Longest the writer thread sleeps before checking the open segment's age.
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

    /// Starts the writer thread on `dir` (created if missing); segments close at
    /// `max_rows` rows or `max_age`.
    pub fn start(
        dir: PathBuf,
        writer_id: &str,
        max_rows: usize,
        max_age: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, RecorderThread)> {
        let writer = SegmentWriter::new(&dir, writer_id)
            .with_context(|| format!("cannot record to {}", dir.display()))?
            .with_max_rows(max_rows)
            .with_max_age(max_age);
        remove_abandoned(&dir);
        let tick = TICK.min(max_age / 2).max(Duration::from_millis(10));
        let (tx, rx) = mpsc::channel();
        let thread_metrics = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("claw-recorder".into())
            .spawn(move || writer_loop(writer, rx, tick, &thread_metrics))
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

fn writer_loop(
    mut writer: SegmentWriter,
    rx: mpsc::Receiver<Msg>,
    tick: Duration,
    metrics: &Metrics,
) {
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
        match rx.recv_timeout(tick) {
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

/// Removes the `.parquet.tmp` segments of earlier `claw serve` processes on this
/// machine that are no longer running (killed mid-segment): their rows were never
/// durable and no reader looks at them. A tmp file of a live process (another
/// server on the same directory) is left alone.
fn remove_abandoned(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(segment) = name.strip_suffix(".tmp") else {
            continue;
        };
        let Some((_, writer, _)) = crate::rollout::parse_segment_file_name(segment) else {
            continue;
        };
        let Some(pid) = writer
            .strip_prefix("serve")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        crate::info!(
            "removed {removed} partial segment(s) left in {} by a server that was killed",
            dir.display()
        );
    }
}

/// Whether a process with this id exists (Linux: `/proc/PID`; elsewhere assume it
/// does, so nothing is removed).
fn process_alive(pid: u32) -> bool {
    let proc_root = std::path::Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}
