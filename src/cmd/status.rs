//! `claw status --dir DIR`: what each stage of a shared directory is doing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::clock::unix_ms;
use crate::daemon::status::{is_alive, read_all, WorkerStatus};
use crate::daemon::{list_segments, quarantine, Layout, Stage};
use crate::rollout::RolloutFile;
use crate::train::checkpoint::{latest_in, parse_adapter_step};

/// Show per-stage backlog, lag, throughput and errors of a shared directory.
#[derive(Args, Debug)]
#[command(long_about = "\
Show what the stages working on a shared directory are doing: for each stage its
input folder's backlog (segments and rows not yet done), the lag (age of the
oldest segment waiting), its live workers and their throughput, and the last
error; then the latest checkpoint (the policy version serve hot-loads) and what
is in quarantine. Reads only files under DIR, so it works from any machine that
mounts it.

Examples:
  claw status --dir claw-data
  claw status --dir claw-data --json | jq '.stages[] | {stage, backlog_segments}'")]
pub struct StatusArgs {
    /// The shared directory.
    #[arg(long, default_value = "./claw-data")]
    pub dir: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct StageReport {
    stage: &'static str,
    input: String,
    output: &'static str,
    backlog_segments: usize,
    backlog_rows: u64,
    /// Seconds the oldest waiting segment has waited.
    lag_s: Option<f64>,
    done_segments: usize,
    workers_alive: usize,
    rows_per_s: f64,
    last_error: Option<String>,
    last_error_age_s: Option<f64>,
    workers: Vec<WorkerStatus>,
}

#[derive(Serialize)]
struct CheckpointReport {
    latest: String,
    policy_version: Option<u64>,
    age_s: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    dir: PathBuf,
    raw_segments: usize,
    /// Seconds since serve last closed a segment.
    raw_newest_age_s: Option<f64>,
    stages: Vec<StageReport>,
    checkpoint: Option<CheckpointReport>,
    quarantine: Vec<String>,
}

pub fn run(args: StatusArgs) -> Result<()> {
    anyhow::ensure!(
        args.dir.is_dir(),
        "{}: no such directory (start one with `claw up --dir {}`)",
        args.dir.display(),
        args.dir.display()
    );
    let layout = Layout::new(&args.dir);
    let raw = list_segments(&layout.folder("raw"))?;
    let report = Report {
        dir: args.dir.clone(),
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
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
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

fn fmt_age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

fn render(r: &Report) -> String {
    let mut out = format!(
        "{}: {} raw segments recorded, newest {} ago\n\n",
        r.dir.display(),
        r.raw_segments,
        fmt_age(r.raw_newest_age_s)
    );
    out.push_str(&format!(
        "{:<14} {:<10} {:>8} {:>9} {:>6} {:>6} {:>8}  {}\n",
        "stage", "input", "backlog", "rows", "lag", "alive", "rows/s", "last error"
    ));
    for s in &r.stages {
        let err = match (&s.last_error, s.last_error_age_s) {
            (Some(e), age) => {
                let mut e = e.replace('\n', " ");
                if e.len() > 60 {
                    let cut = (0..=60).rev().find(|&i| e.is_char_boundary(i)).unwrap_or(0);
                    e.truncate(cut);
                    e.push('…');
                }
                format!("{} ago: {e}", fmt_age(age))
            }
            (None, _) => "-".into(),
        };
        out.push_str(&format!(
            "{:<14} {:<10} {:>8} {:>9} {:>6} {:>6} {:>8.1}  {}\n",
            s.stage,
            s.input,
            s.backlog_segments,
            s.backlog_rows,
            fmt_age(s.lag_s),
            s.workers_alive,
            s.rows_per_s,
            err
        ));
    }
    out.push('\n');
    match &r.checkpoint {
        Some(c) => out.push_str(&format!(
            "checkpoint: {} (policy version {}), written {} ago\n",
            c.latest,
            c.policy_version.map_or("?".into(), |v| v.to_string()),
            fmt_age(c.age_s)
        )),
        None => out.push_str("checkpoint: none yet (serve answers with the base model)\n"),
    }
    match r.quarantine.len() {
        0 => out.push_str("quarantine: empty\n"),
        n => {
            out.push_str(&format!(
                "quarantine: {n} file(s); each has a .err beside it saying why\n"
            ));
            for q in r.quarantine.iter().take(10) {
                out.push_str(&format!("  {q}\n"));
            }
        }
    }
    out
}
