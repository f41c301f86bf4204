//! What each worker is doing, for `claw status`: every worker keeps
//! `state/STAGE/status-WORKER.json` up to date (atomically replaced after each
//! unit of work and at least every few seconds), and `claw status` combines them
//! with the folders' backlogs.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::unix_ms;
use crate::store::host::hostname;
use crate::store::Root;

/// One worker's status file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub stage: String,
    /// The folder of DIR it consumes.
    #[serde(default)]
    pub input: String,
    pub worker: String,
    pub host: String,
    pub pid: u32,
    pub started_unix_ms: i64,
    pub updated_unix_ms: i64,
    /// `starting`, `idle`, `working`, `standby`, `stopped`.
    pub state: String,
    pub segments_done: u64,
    pub rows_done: u64,
    pub segments_quarantined: u64,
    /// Rows per second over the work of the last minute or so.
    pub rows_per_s: f64,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<i64>,
    /// Stage-specific extras (train: step, checkpoint).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Keeps a worker's status file current.
pub struct StatusFile {
    root: Root,
    /// `state/STAGE/status-WORKER.json`.
    rel: String,
    pub status: WorkerStatus,
    last_write: Instant,
    /// (time, rows) of recent units of work, for the rate.
    recent: Vec<(Instant, u64)>,
}

/// How often an otherwise unchanged status is rewritten (the heartbeat).
const HEARTBEAT: Duration = Duration::from_secs(5);

impl StatusFile {
    /// The status file of worker `worker` of `stage` reading `input`, in the
    /// stage's state folder `state` (`state/STAGE`) of `root`.
    pub fn new(root: &Root, state: &str, stage: &str, input: &str, worker: &str) -> Self {
        remove_dead_workers(root, state);
        let now = unix_ms();
        StatusFile {
            root: root.clone(),
            rel: format!("{state}/status-{worker}.json"),
            status: WorkerStatus {
                stage: stage.into(),
                input: input.into(),
                worker: worker.into(),
                host: hostname(),
                pid: std::process::id(),
                started_unix_ms: now,
                updated_unix_ms: now,
                state: "starting".into(),
                ..Default::default()
            },
            last_write: Instant::now() - HEARTBEAT,
            recent: Vec::new(),
        }
    }

    /// Records a finished unit of work.
    pub fn done(&mut self, segments: u64, rows: u64) {
        self.status.segments_done += segments;
        self.status.rows_done += rows;
        let now = Instant::now();
        self.recent.push((now, rows));
        self.recent
            .retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(60));
        let span = self
            .recent
            .first()
            .map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64())
            .max(1.0);
        self.status.rows_per_s = self.recent.iter().map(|(_, r)| *r).sum::<u64>() as f64 / span;
    }

    pub fn error(&mut self, err: &anyhow::Error) {
        self.status.last_error = Some(format!("{err:#}"));
        self.status.last_error_unix_ms = Some(unix_ms());
    }

    /// Sets the state and writes the file now.
    pub fn set(&mut self, state: &str) {
        self.status.state = state.into();
        self.write();
    }

    /// Writes the file if the heartbeat is due.
    pub fn heartbeat(&mut self) {
        if self.last_write.elapsed() >= HEARTBEAT {
            self.write();
        }
    }

    pub fn write(&mut self) {
        self.status.updated_unix_ms = unix_ms();
        self.last_write = Instant::now();
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            // Status is advisory: a failed write must not stop the work.
            if let Err(e) = self.root.write(&self.rel, &json) {
                crate::debug!("status file: {e:#}");
            }
        }
    }
}

/// Removes the status files of workers on this host whose process is gone (each
/// restart is a new worker id), so `claw status` lists the workers that matter.
fn remove_dead_workers(root: &Root, state: &str) {
    let host = hostname();
    let Ok(entries) = root.list(state) else {
        return;
    };
    for entry in entries {
        let name = entry.name;
        if !(name.starts_with("status-")
            && (name.ends_with(".json") || name.ends_with(".json.tmp")))
        {
            continue;
        }
        let rel = format!("{state}/{name}");
        let Ok(Some(bytes)) = root.read(&rel) else {
            continue;
        };
        let dead = match serde_json::from_slice::<WorkerStatus>(&bytes) {
            // SAFETY: signal 0 only checks that the process exists.
            Ok(s) => s.host == host && unsafe { libc::kill(s.pid as libc::pid_t, 0) } != 0,
            Err(_) => name.ends_with(".tmp"),
        };
        if dead {
            let _ = root.remove(&rel);
        }
    }
}

/// Every status file of the stage folder `state` of `root`.
pub fn read_all(root: &Root, state: &str) -> Vec<WorkerStatus> {
    let Ok(entries) = root.list(state) else {
        return Vec::new();
    };
    let mut out: Vec<WorkerStatus> = entries
        .into_iter()
        .filter(|e| e.name.starts_with("status-") && e.name.ends_with(".json"))
        .filter_map(|e| root.read(&format!("{state}/{}", e.name)).ok().flatten())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    out.sort_by(|a: &WorkerStatus, b| a.worker.cmp(&b.worker));
    out
}
/// Whether the worker of `status` still runs: its process exists (same host) and
/// its heartbeat is recent.
pub fn is_alive(status: &WorkerStatus) -> bool {
    if status.state == "stopped" {
        return false;
    }
    let fresh = unix_ms().saturating_sub(status.updated_unix_ms) < 3 * HEARTBEAT.as_millis() as i64;
    if status.host == hostname() {
        // SAFETY: signal 0 only checks that the process exists.
        let exists = unsafe { libc::kill(status.pid as libc::pid_t, 0) } == 0;
        return exists && fresh;
    }
    fresh
}
