//! `claw status --dir DIR`: what each stage of a shared directory is doing.

use anyhow::{Context, Result};
use clap::Args;

use crate::daemon::report::{dir_report, DirReport};
use crate::store::Root;

/// Show per-stage backlog, lag, throughput and errors of a shared directory.
#[derive(Args, Debug)]
#[command(long_about = "\
Show what the stages working on a shared directory are doing: for each stage its
input folder's backlog (segments and rows not yet done), the lag (age of the
oldest segment waiting), its live workers and their throughput, and the last
error; then the latest checkpoint (the policy version serve hot-loads) and what
is in quarantine. Reads only files under DIR, so it works from any machine that
mounts it. DIR may be an object store URL (s3://bucket/prefix), read with the
credentials in the environment.

Examples:
  claw status --dir claw-data
  claw status --dir s3://my-bucket/claw
  claw status --dir claw-data --json | jq '.stages[] | {stage, backlog_segments}'")]
pub struct StatusArgs {
    /// The shared directory.
    /// The shared directory: a path or an object store URL (s3://bucket/prefix).
    #[arg(long, default_value = "./claw-data")]
    pub dir: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let root = Root::parse(&args.dir).context("--dir")?;
    if let Some(dir) = root.local() {
        anyhow::ensure!(
            dir.is_dir(),
            "{}: no such directory (start one with `claw up --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    let report = dir_report(&root)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn fmt_age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

fn render(r: &DirReport) -> String {
    let mut out = format!(
        "{}: {} raw segments recorded, newest {} ago\n\n",
        r.dir,
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
