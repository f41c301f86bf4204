//! `claw eval --bench agent`: its own options and the runs over methods. The
//! options it shares with `--bench persona` (--method, --batch, --heldout, --lr,
//! --beta-kl, --reward-baseline, --topk, --session-temperature, --round-timeout,
//! --keep-data, --no-retention, --retention-limit, --report) are read from
//! [`super::persona::PersonaArgs`]; the sandbox's from `claw eval`'s (--python,
//! --exec-timeout, --exec-memory-mb, --unsafe-no-sandbox).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::eval::EvalArgs;
use crate::eval::agent::metrics::{report, success_chart, RunResult};
use crate::eval::agent::run::{run, RunConfig};
use crate::eval::live::Method;
use crate::eval::persona::plot::render_png;
use crate::eval::sandbox::{Limits, Sandbox};

/// Options of `--bench agent` only.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// agent: training episodes per run (a task, the model's tool calls and
    /// their results, its final answer).
    #[arg(
        long,
        default_value_t = 48,
        value_name = "N",
        help_heading = "Agent benchmark"
    )]
    pub episodes: usize,

    /// agent: most replies with tool calls in an episode; the reply after the
    /// last one must answer.
    #[arg(
        long,
        default_value_t = 2,
        value_name = "N",
        help_heading = "Agent benchmark"
    )]
    pub tool_rounds: usize,

    /// agent: how long an episode's rating still reaches its first turn after the
    /// next turn (collect's --feedback-grace); must cover an episode.
    #[arg(
        long,
        default_value_t = 90.0,
        value_name = "SECONDS",
        help_heading = "Agent benchmark"
    )]
    pub feedback_grace: f64,

    /// agent: episodes per window of the success rate in the report.
    #[arg(
        long,
        default_value_t = 8,
        value_name = "N",
        help_heading = "Agent benchmark"
    )]
    pub success_window: usize,
}

/// Runs every method; prints the table and writes the report.
pub fn run_all(args: &EvalArgs) -> Result<Vec<RunResult>> {
    let (p, a) = (&args.persona, &args.agent);
    anyhow::ensure!(
        a.episodes > 0 && p.batch > 0 && a.success_window > 0,
        "--episodes, --batch and --success-window must be at least 1"
    );
    anyhow::ensure!(
        a.feedback_grace.is_finite() && a.feedback_grace > 0.0,
        "--feedback-grace must be a positive number of seconds"
    );
    let limits = Limits {
        timeout: Duration::from_secs_f64(args.exec_timeout),
        memory_bytes: args.exec_memory_mb.saturating_mul(1 << 20),
        ..Limits::default()
    };
    let sandbox = Sandbox::new(&args.python, limits, args.unsafe_no_sandbox)
        .context("the python tool's sandbox")?;
    let methods: Vec<Method> = match &args.url {
        Some(_) => vec![Method::Combined],
        None => p.method.clone(),
    };
    let cfg = RunConfig {
        study: p.study(
            args.model.clone(),
            args.url.clone(),
            args.seed,
            args.max_tokens.unwrap_or(256),
        )?,
        episodes: a.episodes,
        tool_rounds: a.tool_rounds,
        feedback_grace: Duration::from_secs_f64(a.feedback_grace),
    };
    crate::eval::live::stop_on_ctrl_c();
    let mut results = Vec::new();
    for &m in &methods {
        if crate::daemon::wake::stop_requested() {
            break;
        }
        crate::info!("agent, method {}: {} episodes", m.name(), cfg.episodes);
        let bar =
            crate::ui::progress_bar(Some(cfg.episodes as u64), &format!("agent {}", m.name()));
        let solved = std::cell::Cell::new(0usize);
        let result = run(m, &cfg, &sandbox, &|e| {
            solved.set(solved.get() + usize::from(e.correct()));
            let line = format!(
                "episode {:>3} policy v{:<3} {:?} calls {}/{} valid: {}",
                e.index, e.policy_version, e.outcome, e.valid_calls, e.calls, e.prompt
            );
            if bar.is_hidden() {
                crate::debug!("{line}");
            } else {
                bar.inc(1);
                bar.set_message(format!("{} solved", solved.get()));
            }
        })
        .with_context(|| format!("agent benchmark with method {}", m.name()))?;
        bar.finish_and_clear();
        crate::info!(
            "agent {} seed {}: held-out {}/{} -> {}/{}, policy v{}, {:.1} min",
            result.method,
            result.seed,
            result.heldout_before.correct,
            result.heldout_before.episodes,
            result.heldout_after.correct,
            result.heldout_after.episodes,
            result.final_policy_version,
            result.seconds / 60.0
        );
        results.push(result);
        if let Some(dir) = &p.report {
            // Written after every run: an interrupted study keeps what it finished.
            write_report(dir, &results, &super::command_line(), a.success_window)?;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let table = report(&results, &super::command_line(), a.success_window, None);
        let mut out = std::io::stdout().lock();
        for line in table.lines().filter(|l| l.starts_with('|')) {
            writeln!(out, "{line}")?;
        }
    }
    anyhow::ensure!(
        !crate::daemon::wake::stop_requested(),
        "stopped by a signal: the table and the report hold the runs as far as they went"
    );
    Ok(results)
}

/// Writes agent.md, agent.json and agent.png for `results` into `dir`.
pub fn write_report(dir: &Path, results: &[RunResult], command: &str, window: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let png = render_png(&success_chart(results, window))?;
    crate::fsutil::write_atomic(&dir.join("agent.png"), &png)?;
    crate::fsutil::write_atomic(
        &dir.join("agent.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    crate::fsutil::write_atomic(
        &dir.join("agent.md"),
        report(results, command, window, Some("agent.png")).as_bytes(),
    )?;
    Ok(())
}
