//! The agent benchmark's numbers, report and chart.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::episode::{EpisodeLog, Outcome};
use super::tasks::{Kind, Task};
use crate::eval::persona::metrics::{retention_rows, rolling_rate};
use crate::eval::persona::plot::{Chart, Panel, Series, GREY, PALETTE};

/// One episode of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Episode {
    /// 1-based.
    pub index: usize,
    pub kind: Kind,
    pub prompt: String,
    pub answer: String,
    pub outcome: Outcome,
    /// The last reply (with the tool results it saw, for the record).
    pub reply: String,
    pub turns: usize,
    pub calls: usize,
    pub valid_calls: usize,
    pub tool_errors: usize,
    /// The policy version (training step) that answered the first turn.
    pub policy_version: u64,
    pub seconds_since_start: f64,
}

impl Episode {
    pub fn new(index: usize, task: &Task, log: &EpisodeLog, policy_version: u64, at: f64) -> Self {
        Episode {
            index,
            kind: task.kind,
            prompt: task.prompt.clone(),
            answer: task.answer.clone(),
            outcome: log.outcome,
            reply: log.final_reply.clone(),
            turns: log.turns.len(),
            calls: log.calls(),
            valid_calls: log.valid_calls(),
            tool_errors: log.tool_errors(),
            policy_version,
            seconds_since_start: at,
        }
    }

    pub fn correct(&self) -> bool {
        self.outcome == Outcome::Correct
    }
}

/// A set of held-out episodes (greedy, side turns).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeldOut {
    pub episodes: usize,
    pub correct: usize,
    /// Episodes with at least one tool call.
    pub used_tool: usize,
    pub calls: usize,
    pub valid_calls: usize,
    /// Correct episodes per task kind.
    pub correct_by_kind: BTreeMap<String, usize>,
}

impl HeldOut {
    pub fn add(&mut self, kind: Kind, log: &EpisodeLog) {
        self.episodes += 1;
        self.correct += usize::from(log.correct());
        self.used_tool += usize::from(log.calls() > 0);
        self.calls += log.calls();
        self.valid_calls += log.valid_calls();
        *self.correct_by_kind.entry(kind.name().into()).or_default() += usize::from(log.correct());
    }

    pub fn rate(&self) -> f64 {
        ratio(self.correct, self.episodes)
    }
}

/// What the run's stages made of its episodes (read from its `claw up` directory).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Signals {
    /// Main turns judged.
    pub samples: usize,
    /// Of them, turns whose next state is a tool message.
    pub tool_next_states: usize,
    /// Reward counts by judge source and value, e.g. "env -1", "feedback +1".
    pub rewards: BTreeMap<String, usize>,
    /// Turns without a reward.
    pub unscored: usize,
    /// Distilled turns that got a hint (opd, combined).
    pub hinted: usize,
}

impl Signals {
    /// Counts the judged and distilled rows under `dir` (a `claw up` directory).
    pub fn read(dir: &Path) -> Result<Signals> {
        let mut s = Signals::default();
        for row in rows_in(&dir.join("judged"))? {
            s.samples += 1;
            s.tool_next_states += usize::from(row.next_state_role.as_deref() == Some("tool"));
            match (row.reward, row.judge_source.as_deref()) {
                (Some(r), Some(source)) => {
                    let value = match r {
                        r if r > 0.0 => "+1",
                        r if r < 0.0 => "-1",
                        _ => "0",
                    };
                    *s.rewards.entry(format!("{source} {value}")).or_default() += 1;
                }
                _ => s.unscored += 1,
            }
        }
        s.hinted = rows_in(&dir.join("distilled"))?
            .iter()
            .filter(|r| r.hint.is_some())
            .count();
        Ok(s)
    }
}

fn rows_in(dir: &Path) -> Result<Vec<crate::rollout::RolloutRow>> {
    let mut files: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        Err(_) => return Ok(Vec::new()),
    };
    files.sort();
    if files.is_empty() {
        return Ok(Vec::new());
    }
    crate::rollout::RolloutReader::new(&files)
        .and_then(|r| r.read_all_rows())
        .with_context(|| format!("reading the rows in {}", dir.display()))
}

/// One (method, seed) run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    pub model: String,
    pub episodes: Vec<Episode>,
    pub heldout_before: HeldOut,
    pub heldout_after: HeldOut,
    pub final_policy_version: u64,
    pub seconds: f64,
    pub settings: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<Signals>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::eval::retention::RetentionReport>,
}

impl RunResult {
    /// Valid tool calls over all tool calls in the training episodes.
    pub fn validity(&self) -> Option<f64> {
        let calls: usize = self.episodes.iter().map(|e| e.calls).sum();
        let valid: usize = self.episodes.iter().map(|e| e.valid_calls).sum();
        (calls > 0).then(|| ratio(valid, calls))
    }

    /// Success rate of each consecutive window of `window` episodes.
    pub fn windows(&self, window: usize) -> Vec<f64> {
        self.episodes
            .chunks(window.max(1))
            .map(|c| ratio(c.iter().filter(|e| e.correct()).count(), c.len()))
            .collect()
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// The learning curves: success over a sliding window of `window` episodes, one
/// line per run, the control grey and dashed.
pub fn success_chart(results: &[RunResult], window: usize) -> Chart {
    let seeds = results.iter().any(|r| r.seed != results[0].seed);
    let mut colours = 0;
    let series = results
        .iter()
        .map(|r| {
            let control = r.method == "off";
            let mut label = match control {
                true => "off (control)".to_string(),
                false => r.method.clone(),
            };
            if seeds {
                label = format!("{label}, seed {}", r.seed);
            }
            let color = match control {
                true => GREY,
                false => {
                    colours += 1;
                    PALETTE[(colours - 1) % PALETTE.len()]
                }
            };
            let ok: Vec<bool> = r.episodes.iter().map(Episode::correct).collect();
            Series {
                label,
                color,
                dashed: control,
                points: r
                    .episodes
                    .iter()
                    .zip(rolling_rate(&ok, window))
                    .map(|(e, y)| (e.index as f64, y))
                    .collect(),
            }
        })
        .collect();
    Chart {
        title: format!("Agent benchmark: episodes solved over a sliding window of {window}"),
        x_label: "episode".into(),
        y_label: format!("solved (last {window} episodes)"),
        y_range: (-0.03, 1.03),
        y_percent: true,
        panels: vec![Panel {
            title: "python tool: arithmetic, units, strings, word problems".into(),
            series,
        }],
    }
}

/// The Markdown report of several runs.
pub fn report(results: &[RunResult], command: &str, window: usize, plot: Option<&str>) -> String {
    let mut out = String::from("# Agent benchmark\n\n");
    out.push_str(
        "Does the loop learn to use a tool, only from what the environment says? Each run \
         starts a fresh `claw up` (serve + collect + judge + distill-hints + train, per the \
         method). Each episode gives the model a problem whose answer must be computed \
         (big-number arithmetic, unit conversions, string manipulation, GSM8K-style word \
         problems) and a `python` tool (OpenAI `tools`); each call runs in claw's sandbox \
         and its output goes back as the tool message, the turn's next state; the episode \
         ends with a final answer, checked exactly, or when the tool rounds run out \
         (docs/ARCHITECTURE.md, \"Agent benchmark\"). Rewards come from the environment: a \
         failed program is scored -1 by judge's env rules on the tool message; every other \
         turn is rated by its own next state through `/v1/feedback`: a call whose output \
         holds the answer +1, a call after that or a wrong program -1, the final answer +1 \
         or -1 by its check; a -1 carries the correction as the hint for distill-hints: \
         the call to make, or, once the tool has printed the answer, to write it as the \
         final reply (a failed program's hint is its error). \
         Methods: `rl` (the reward), `opd` (the hint, on-policy distillation), `combined` \
         (both), `off` (no training: the control).\n\n",
    );
    out.push_str(&format!("Command:\n\n```\n{command}\n```\n\n"));
    out.push_str(
        "| method | seed | episodes | solved, first half | solved, second half | held-out before | held-out after | tool use before / after | valid calls (training) | steps | minutes |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let ok: Vec<bool> = r.episodes.iter().map(Episode::correct).collect();
        let half = ok.len() / 2;
        let share = |s: &[bool]| ratio(s.iter().filter(|&&x| x).count(), s.len());
        let (b, a) = (&r.heldout_before, &r.heldout_after);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} ({}/{}) | {} ({}/{}) | {} / {} | {} | {} | {:.1} |\n",
            r.method,
            r.seed,
            ok.len(),
            pct(share(&ok[..half])),
            pct(share(&ok[half..])),
            pct(b.rate()),
            b.correct,
            b.episodes,
            pct(a.rate()),
            a.correct,
            a.episodes,
            pct(ratio(b.used_tool, b.episodes)),
            pct(ratio(a.used_tool, a.episodes)),
            r.validity().map_or("no calls".into(), pct),
            r.final_policy_version,
            r.seconds / 60.0
        ));
    }
    out.push_str(&format!(
        "\nSuccess per window of {window} training episodes:\n\n| method | seed | windows |\n|---|---|---|\n"
    ));
    for r in results {
        let w: Vec<String> = r.windows(window).into_iter().map(pct).collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            r.method,
            r.seed,
            w.join(" "),
        ));
    }
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
    out.push_str(&format!(
        "\nHeld-out solved by kind, before -> after ({}):\n\n| method | seed | {} |\n|---|---|{}\n",
        kinds.join(", "),
        kinds.join(" | "),
        "---|".repeat(kinds.len())
    ));
    for r in results {
        let cells: Vec<String> = kinds
            .iter()
            .map(|k| {
                let get = |h: &HeldOut| h.correct_by_kind.get(*k).copied().unwrap_or(0);
                format!("{} -> {}", get(&r.heldout_before), get(&r.heldout_after))
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            r.method,
            r.seed,
            cells.join(" | ")
        ));
    }
    let mut seen: Vec<String> = Vec::new();
    for r in results {
        let line = r
            .settings
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        if !seen.contains(&line) {
            seen.push(line);
        }
    }
    out.push_str(&format!(
        "\nModel: {}. Settings: {}.\n",
        results.first().map_or("", |r| r.model.as_str()),
        seen.join("; ")
    ));
    out.push_str(&format!(
        "\nHeld-out: {} tasks from a fixed seed, never trained on (the training tasks come \
         from the run's seed and skip them), played greedily as side turns (recorded by \
         serve, never trained on) at the start and at the end of each run. A valid call \
         names the python tool with a `code` string that parses; a `<tool_call>` block \
         serve could not parse, or a bare `{{\"name\": ...}}` object serve did not take as a call \
         (it takes one that is the whole reply and names an offered tool), is an invalid one.\n",
        results.first().map_or(0, |r| r.heldout_before.episodes)
    ));
    out.push_str(&signals_section(results));
    if let Some(plot) = plot {
        out.push_str(&format!(
            "\n![success over episodes]({plot})\n\nSolved episodes over a sliding window of \
             {window}: every run on one panel (the control, `off`, dashed).\n"
        ));
    }
    out.push_str(&retention_section(results));
    out
}

/// Where each run's rewards came from (its judged and distilled rows).
fn signals_section(results: &[RunResult]) -> String {
    let with: Vec<(&RunResult, &Signals)> = results
        .iter()
        .filter_map(|r| r.signals.as_ref().map(|s| (r, s)))
        .collect();
    if with.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Signals\n\nThe trained runs' judged turns: how many had a tool message as \
         their next state, and their rewards by judge source.\n\n\
         | method | seed | judged turns | tool next states | rewards | unscored | hinted |\n|---|---|---|---|---|---|---|\n",
    );
    for (r, s) in with {
        let rewards: Vec<String> = s.rewards.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.method,
            r.seed,
            s.samples,
            s.tool_next_states,
            rewards.join(", "),
            s.unscored,
            s.hinted
        ));
    }
    out
}

/// The "Retention" section: each trained run's final adapter against the base.
pub fn retention_section(results: &[RunResult]) -> String {
    let trained: Vec<(String, Option<&crate::eval::retention::RetentionReport>)> = results
        .iter()
        .filter(|r| r.method != "off")
        .map(|r| {
            (
                format!("seed {} | {}", r.seed, r.method),
                r.retention.as_ref(),
            )
        })
        .collect();
    retention_rows(&trained, "seed | method")
}
