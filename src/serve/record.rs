//! Recording, off the request path: handlers send finished [`RolloutRow`]s over a
//! channel to one writer thread that owns a [`SegmentWriter`] on `DIR/raw/`. The
//! thread rolls segments every `--segment-rows` rows or `--segment-age-ms` (by
//! default 1024 rows or 5 s; a timer tick calls `roll_if_due`), and on shutdown
//! closes the open segment so a graceful stop loses nothing. Each batch of rows
//! first goes to the durable log ([`super::wal`], one fsync per batch) and only
//! then is acknowledged: a chat reply completes after its row is on disk, so a
//! kill -9 loses no answered turn. Its open segment's `.parquet.tmp` stays
//! behind (no reader looks at it); the next server removes it and replays the
//! dead server's log into a segment of its own.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::wal::{self, Wal};
use crate::rollout::{RolloutRow, SegmentWriter};

/// Longest the writer thread sleeps before checking the open segment's age.
const TICK: Duration = Duration::from_millis(500);

enum Msg {
    /// A row, and who waits for it to be durable.
    Row(Box<RolloutRow>, Option<oneshot::Sender<()>>),
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
    /// `max_rows` rows or `max_age`. With `wal_dir`, rows are made durable in a
    /// log there first, and the logs of servers that were killed are replayed.
    pub fn start(
        dir: PathBuf,
        wal_dir: Option<PathBuf>,
        writer_id: &str,
        max_rows: usize,
        max_age: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, RecorderThread)> {
        let mut writer = SegmentWriter::new(&dir, writer_id)
            .with_context(|| format!("cannot record to {}", dir.display()))?
            .with_max_rows(max_rows)
            .with_max_age(max_age);
        remove_abandoned(&dir);
        let wal = match wal_dir {
            Some(wal_dir) => {
                let recovered = wal::recover(&wal_dir, &dir, &mut writer, |w| {
                    writer_pid(w)
                        .is_some_and(|pid| pid != std::process::id() && !process_alive(pid))
                })?;
                if recovered > 0 {
                    metrics.rows_recorded.fetch_add(recovered as u64, Relaxed);
                    crate::info!(
                        "recovered {recovered} answered turn(s) from the log of a server that was killed"
                    );
                }
                Some(Wal::create(&wal_dir, writer_id)?)
            }
            None => None,
        };
        let tick = TICK.min(max_age / 2).max(Duration::from_millis(10));
        let (tx, rx) = mpsc::channel();
        let thread_metrics = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("claw-recorder".into())
            .spawn(move || writer_loop(writer, wal, rx, tick, &thread_metrics))
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

    /// Queues one row and waits until it is durable (in the log, or without
    /// one, queued): a reply completes after this.
    pub async fn record(&self, row: RolloutRow) {
        let Some(tx) = &self.tx else {
            return;
        };
        let (ack, durable) = oneshot::channel();
        if tx.send(Msg::Row(Box::new(row), Some(ack))).is_err() {
            self.metrics.record_errors.fetch_add(1, Relaxed);
            crate::warn!("recorder has stopped; a row was not recorded");
            return;
        }
        // An error here means the recorder could not log the row; it said so.
        let _ = durable.await;
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
    mut wal: Option<Wal>,
    rx: mpsc::Receiver<Msg>,
    tick: Duration,
    metrics: &Metrics,
) {
    let dir = writer.dir().display().to_string();
    let fail = |what: &str, err: &anyhow::Error| {
        metrics.record_errors.fetch_add(1, Relaxed);
        crate::warn!("{what} in {dir}: {err:#}");
    };
    // After segments may have closed: count them, and cut the log to the rows
    // still open.
    let settle =
        |done: Result<Vec<PathBuf>>, rows: u64, writer: &SegmentWriter, wal: &mut Option<Wal>| {
            match done {
                Ok(paths) => {
                    metrics.rows_recorded.fetch_add(rows, Relaxed);
                    metrics
                        .segments_written
                        .fetch_add(paths.len() as u64, Relaxed);
                    for p in &paths {
                        crate::debug!("recorded segment {}", p.display());
                    }
                    if let Some(log) = wal.as_mut() {
                        if let Err(e) = log.settle(writer.pending_rows(), !paths.is_empty()) {
                            fail("cannot trim the durable log", &e);
                        }
                    }
                }
                Err(err) => fail("cannot write rollout rows", &err),
            }
        };
    loop {
        match rx.recv_timeout(tick) {
            Ok(Msg::Row(row, ack)) => {
                // Take whatever else is queued too: one batch (and one fsync)
                // per wake-up.
                let mut rows = vec![*row];
                let mut acks = vec![ack];
                let mut stop = false;
                while let Ok(msg) = rx.try_recv() {
                    match msg {
                        Msg::Row(r, a) => {
                            rows.push(*r);
                            acks.push(a);
                        }
                        Msg::Shutdown => {
                            stop = true;
                            break;
                        }
                    }
                }
                if let Some(log) = wal.as_mut() {
                    if let Err(e) = log.append(&rows) {
                        fail("cannot write the durable log", &e);
                    }
                }
                for ack in acks.into_iter().flatten() {
                    let _ = ack.send(());
                }
                let n = rows.len() as u64;
                let done = writer.write_rows(&rows);
                settle(done, n, &writer, &mut wal);
                if stop {
                    break;
                }
            }
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let done = writer.roll_if_due().map(|p| p.into_iter().collect());
                settle(done, 0, &writer, &mut wal);
            }
        }
    }
    match writer.finish() {
        Ok(closed) => {
            if let Some(path) = closed {
                metrics.segments_written.fetch_add(1, Relaxed);
                crate::debug!("recorded segment {}", path.display());
            }
            if let Some(log) = wal {
                if let Err(e) = log.remove() {
                    fail("cannot remove the durable log", &e);
                }
            }
        }
        Err(err) => fail(
            "cannot close the last segment (its rows stay in the log)",
            &err,
        ),
    }
}

/// The process id in a serve writer id (`serve<PID>`).
fn writer_pid(writer: &str) -> Option<u32> {
    writer.strip_prefix("serve")?.parse().ok()
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
        let Some(pid) = writer_pid(writer) else {
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
