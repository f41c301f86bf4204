//! Daemon mode (docs/ARCHITECTURE.md, "Shared directory"): every stage can run as a long-lived worker
//! over one shared directory, consuming its input folder and producing its output
//! folder, so `serve`, `collect`, `judge`, `distill-hints` and `train` run
//! concurrently (`claw up`, systemd, cron, or several machines over a shared
//! filesystem).
//!
//! ```text
//! DIR/raw/          serve's event segments           -> collect
//! DIR/samples/      collect output                   -> judge
//! DIR/judged/       judge output                     -> distill-hints (or train)
//! DIR/distilled/    distill-hints output             -> train
//! DIR/checkpoints/  train output; LATEST is what serve hot-loads
//! DIR/state/STAGE/  done/ markers, claims/ locks, status-WORKER.json, stage state
//! DIR/quarantine/   INPUT-FOLDER/NAME.parquet + NAME.parquet.err for bad inputs
//! ```
//!
//! The rules every worker keeps, and where each is kept:
//! - exactly once: an input is marked done ([`ledger`]) only after its output is
//!   durable, and outputs have names derived from their inputs, so a redo after a
//!   crash replaces what it wrote before instead of adding to it;
//! - several workers of one stage share the work through per-segment claims
//!   (`flock`ed lock files, released by the kernel when the owner dies);
//! - bad inputs go to [`quarantine`] with the reason, and the worker goes on;
//!   an input that cannot be read yet while it is still changing is waited for
//!   ([`Settling`]); any file name works ([`crate::fsutil::short_name`]);
//! - SIGINT/SIGTERM finish the segment in flight, a second one exits at once
//!   ([`wake`]);
//! - new inputs are noticed by filesystem notifications with a polling fallback.

pub mod collect;
mod collect_sync;
pub mod ledger;
pub mod quarantine;
pub mod report;
pub mod segments;
pub mod status;
pub mod supervise;
pub mod train;
pub mod wake;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Args;

use crate::collect::parse_duration_ms;
pub use crate::store::host::{hostname, list_segments};
use crate::store::Root;

/// The folders of a shared directory (a local folder or an object store
/// prefix, see [`crate::store::Root`]).
#[derive(Clone, Debug)]
pub struct Layout {
    root: Root,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout {
            root: Root::Local(root.into()),
        }
    }

    pub fn at(root: Root) -> Self {
        Layout { root }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The local path of `rel`; on an object store, `rel` itself (a key under
    /// the prefix): the paths below are for the local filesystem's code.
    fn local(&self, rel: &str) -> PathBuf {
        match &self.root {
            Root::Local(p) => p.join(rel),
            Root::Remote(_) => PathBuf::from(rel),
        }
    }

    /// A folder of the directory (`raw`, `samples`, ...).
    pub fn folder(&self, name: &str) -> PathBuf {
        self.local(name)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.local("checkpoints")
    }

    /// `DIR/state/STAGE`.
    pub fn stage_state(&self, stage: &str) -> PathBuf {
        self.local(&stage_state_rel(stage))
    }

    pub fn quarantine(&self) -> PathBuf {
        self.local(QUARANTINE)
    }
}

/// `state/STAGE`, relative to the directory.
pub fn stage_state_rel(stage: &str) -> String {
    format!("state/{stage}")
}

/// The quarantine folder, relative to the directory.
pub const QUARANTINE: &str = "quarantine";

/// The stages that run as daemons, with the folders they read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Collect,
    Judge,
    Distill,
    Train,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Collect, Stage::Judge, Stage::Distill, Stage::Train];

    /// The name used for its state folder, logs and `claw status`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Collect => "collect",
            Stage::Judge => "judge",
            Stage::Distill => "distill-hints",
            Stage::Train => "train",
        }
    }

    /// The folder it consumes by default.
    pub fn default_input(self) -> &'static str {
        match self {
            Stage::Collect => "raw",
            Stage::Judge => "samples",
            Stage::Distill => "judged",
            Stage::Train => "distilled",
        }
    }

    /// The folder it produces (train: checkpoints).
    pub fn output(self) -> &'static str {
        match self {
            Stage::Collect => "samples",
            Stage::Judge => "judged",
            Stage::Distill => "distilled",
            Stage::Train => "checkpoints",
        }
    }
}

/// Flags every stage shares for daemon mode.
#[derive(Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// Run as a daemon over the shared directory DIR: consume this stage's input
    /// folder, write its output folder (see `claw up --help` for the layout), and
    /// keep going until SIGINT/SIGTERM. Inputs and -o are then not given.
    /// DIR may be an object store URL (s3://bucket/prefix, gs://, az://): see
    /// `claw up --help`.
    #[arg(long, value_name = "DIR", help_heading = "Daemon mode")]
    pub watch: Option<String>,

    /// Look for new segments by polling only, without filesystem notifications
    /// (network filesystems such as NFS, where notifications do not arrive).
    #[arg(long, requires = "watch", help_heading = "Daemon mode")]
    pub poll: bool,

    /// How often to look for new segments when polling; with notifications it is
    /// the safety net (500ms, 2s, 1m).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        help_heading = "Daemon mode"
    )]
    pub poll_interval: String,

    /// Stop when no input is left to claim, instead of waiting for more (cron).
    #[arg(long, requires = "watch", help_heading = "Daemon mode")]
    pub once: bool,

    /// Delete input segments this stage finished more than DURATION ago (by
    /// default nothing is ever deleted).
    #[arg(
        long,
        value_name = "DURATION",
        requires = "watch",
        help_heading = "Daemon mode"
    )]
    pub retain: Option<String>,

    /// Most input segments processed together: small segments are batched so an
    /// LLM judge or the trainer sees larger batches.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        help_heading = "Daemon mode"
    )]
    pub batch_segments: usize,

    /// This worker's name in claims and status files (default HOST-PID).
    #[arg(long, value_name = "NAME", help_heading = "Daemon mode")]
    pub worker_id: Option<String>,
}

/// The resolved daemon settings of one worker.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub layout: Layout,
    pub stage: Stage,
    /// The folder consumed (a name under DIR).
    pub input: String,
    pub poll_only: bool,
    pub poll_interval: Duration,
    pub once: bool,
    pub retain: Option<Duration>,
    pub batch_segments: usize,
    pub worker_id: String,
}

impl WatchArgs {
    /// The daemon settings for `stage`, or `None` without `--watch`. `inputs` are
    /// the positional inputs, which daemon mode does not take.
    pub fn config(&self, stage: Stage, inputs: &[String]) -> Result<Option<DaemonConfig>> {
        let Some(dir) = &self.watch else {
            return Ok(None);
        };
        anyhow::ensure!(
            inputs.is_empty(),
            "--watch reads DIR/{}/; do not also give inputs ({})",
            stage.default_input(),
            inputs.join(" ")
        );
        let ms = |text: &str, flag: &str| -> Result<Duration> {
            Ok(Duration::from_millis(
                parse_duration_ms(text).with_context(|| flag.to_string())? as u64,
            ))
        };
        let root = Root::parse(dir).context("--watch")?;
        let remote = root.is_remote();
        let worker_id = match &self.worker_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", hostname(), std::process::id()),
        };
        crate::rollout::validate_writer_id(&worker_id).context("--worker-id")?;
        Ok(Some(DaemonConfig {
            layout: Layout::at(root),
            stage,
            input: stage.default_input().to_string(),
            // An object store sends no notifications: polling it is.
            poll_only: self.poll || remote,
            poll_interval: ms(&self.poll_interval, "--poll-interval")?
                .max(Duration::from_millis(10)),
            once: self.once,
            retain: self
                .retain
                .as_deref()
                .map(|r| ms(r, "--retain"))
                .transpose()?,
            batch_segments: self.batch_segments.max(1),
            worker_id,
        }))
    }
}

impl DaemonConfig {
    /// This worker's status file (created, with dead workers' files removed).
    pub fn status_file(&self) -> status::StatusFile {
        status::StatusFile::new(
            self.root(),
            &self.state_rel(),
            self.stage.name(),
            &self.input,
            &self.worker_id,
        )
    }

    pub fn root(&self) -> &Root {
        self.layout.root()
    }

    /// `state/STAGE`, relative to the directory.
    pub fn state_rel(&self) -> String {
        stage_state_rel(self.stage.name())
    }

    /// The ledger of this stage, for this worker.
    pub fn ledger(&self) -> Result<ledger::Ledger> {
        ledger::Ledger::open_in(self.root(), &self.state_rel(), &self.worker_id)
    }

    /// Moves input `name` to quarantine with `reason`.
    pub fn quarantine(&self, name: &str, reason: &anyhow::Error) -> Result<()> {
        quarantine::quarantine_in(self.root(), &self.input, name, self.stage.name(), reason)
    }

    pub fn input_dir(&self) -> PathBuf {
        self.layout.folder(&self.input)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.layout.folder(self.stage.output())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.layout.stage_state(self.stage.name())
    }

    /// Creates the folders this worker uses.
    pub fn create_dirs(&self) -> Result<()> {
        self.root().create_dirs(&[
            &self.input,
            self.stage.output(),
            &self.state_rel(),
            QUARANTINE,
        ])
    }
}

/// Starts a stage that runs one worker per DIR (collect, train): signal handling,
/// folders, its status file, and the stage lock, waiting as a standby while another
/// worker holds it. `None` when stopped while waiting.
pub(crate) fn start_single_worker(
    cfg: &DaemonConfig,
) -> Result<Option<(ledger::StageLock, status::StatusFile)>> {
    wake::install_stop_handler();
    cfg.create_dirs()?;
    let mut status = cfg.status_file();
    status.set("standby");
    match ledger::StageLock::acquire_in(
        cfg.root(),
        &cfg.state_rel(),
        &cfg.worker_id,
        cfg.stage.name(),
    )? {
        Some(lock) => Ok(Some((lock, status))),
        None => {
            status.set("stopped");
            Ok(None)
        }
    }
}

/// How long an input that cannot be read must stay unchanged (size and mtime)
/// before it counts as bad: a copy still being written into the folder is
/// waited for, not quarantined.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Inputs that failed to read while they may still be being written.
#[derive(Default)]
pub struct Settling {
    /// name -> (size, mtime) when last seen, and since when it is so.
    seen: HashMap<String, ((u64, Option<SystemTime>), Instant)>,
    /// Names found still changing in the current scan.
    waiting: HashSet<String>,
}

impl Settling {
    /// Starts a scan of the input folder.
    pub fn begin_scan(&mut self) {
        self.waiting.clear();
    }

    /// Whether `path` (input `name`, which failed to read) has stopped changing:
    /// unmodified for [`SETTLE`] by the clock, or seen unchanged by this process
    /// for that long (a writer's clock may be ahead of ours).
    pub fn settled(&mut self, name: &str, path: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return true; // gone: nothing to wait for
        };
        let modified = meta.modified().ok();
        if modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age >= SETTLE)
        {
            self.seen.remove(name);
            return true;
        }
        let now = (meta.len(), modified);
        let since = match self.seen.get(name) {
            Some((seen, since)) if *seen == now => *since,
            _ => {
                self.seen.insert(name.to_string(), (now, Instant::now()));
                Instant::now()
            }
        };
        if since.elapsed() >= SETTLE {
            self.seen.remove(name);
            return true;
        }
        crate::debug!("{}: still being written, waiting for it", path.display());
        self.waiting.insert(name.to_string());
        false
    }

    /// Whether the last scan left inputs to wait for (`--once` must not stop).
    pub fn any_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub fn is_waiting(&self, name: &str) -> bool {
        self.waiting.contains(name)
    }
}

/// The path of the running claw executable, for starting stages and runs as
/// child processes. When the binary was replaced while this process ran (a
/// rebuild or an upgrade), Linux reports the old file as `PATH (deleted)`; the
/// new binary at PATH is what a restarted child should run.
pub fn claw_executable() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the claw executable")?;
    Ok(replaced_binary_path(exe))
}

fn replaced_binary_path(exe: PathBuf) -> PathBuf {
    if exe.exists() {
        return exe;
    }
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) if Path::new(path).is_file() => PathBuf::from(path),
        _ => exe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_found_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("claw");
        std::fs::write(&new, b"new build").unwrap();
        let reported = PathBuf::from(format!("{} (deleted)", new.display()));
        assert_eq!(replaced_binary_path(reported), new);
        // A path that exists is kept as it is; a vanished binary stays reported.
        assert_eq!(replaced_binary_path(new.clone()), new);
        let gone = dir.path().join("gone (deleted)");
        assert_eq!(replaced_binary_path(gone.clone()), gone);
    }
}
