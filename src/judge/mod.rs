//! The judge stage (docs/ARCHITECTURE.md, "Judging"): give each main turn a reward in
//! {-1, 0, +1} from the first source, in the configured order, that has something
//! to say about it:
//!
//! 1. [`Source::Feedback`]: explicit feedback (`feedback` column, thumbs ±1) is the
//!    reward.
//! 2. [`Source::Env`]: a tool result that reports an error caused by the action
//!    scores -1 (rules in [`env`]). A clean tool result is not scored here.
//! 3. [`Source::Prm`]: an LLM judge reads the response and the next state, `m`
//!    times, and the majority of its `\boxed{}` votes is the reward
//!    ([`votes`]; the client and vote runner are [`crate::llm`], the prompt file
//!    format [`crate::llm::prompt`]).
//!
//! A turn no source can score (no feedback and no next state: the last turn of a
//! session) gets no reward (null), not 0. Rows that are not main turns, and rows
//! already judged (unless re-judging), pass through unchanged. The stage only
//! writes its own five columns (`reward`, `judge_votes`, `judge_invalid`,
//! `judge_source`, `judge_raw`); every other column, including unknown ones, is
//! kept as it was.

pub mod env;
pub mod votes;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int32Array, Int8Array, ListArray, RecordBatch,
    StringArray,
};
use arrow::datatypes::{Float32Type, Int32Type, Int8Type, SchemaRef};
use serde::Serialize;

use crate::llm::prompt::{clip_middle, PromptTemplate};
use crate::llm::{CallStats, VoteItem, VoteRunner};
use crate::rollout::{set_columns, RolloutBatch};

/// The built-in PRM prompt (`prompts/judge-prm.txt`), mirroring OpenClaw-RL's.
pub const DEFAULT_PRM_PROMPT: &str = include_str!("../../prompts/judge-prm.txt");

/// The placeholders a PRM prompt must use.
pub const PRM_VARS: [&str; 3] = ["response", "next_state_role", "next_state_text"];

/// Longest response or next state shown to the LLM judge, in characters; longer
/// ones lose their middle (see [`clip_middle`]).
pub const MAX_FIELD_CHARS: usize = 8000;

/// The columns this stage writes, in file order.
pub const JUDGE_COLUMNS: [&str; 5] = [
    "reward",
    "judge_votes",
    "judge_invalid",
    "judge_source",
    "judge_raw",
];

/// Where a reward comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Explicit feedback (thumbs up/down) on the turn.
    Feedback,
    /// A tool result that reports an error.
    Env,
    /// The LLM judge.
    Prm,
}

/// The LLM judge: who to ask, and with which prompt.
pub struct PrmJudge {
    runner: VoteRunner,
    prompt: PromptTemplate,
    source: String,
}

impl PrmJudge {
    pub fn new(runner: VoteRunner, prompt: PromptTemplate) -> Self {
        let source = format!("prm:{}", runner.backend().name());
        PrmJudge {
            runner,
            prompt,
            source,
        }
    }

    /// `prm:<model name>`, the `judge_source` of its verdicts.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The judge messages for one turn.
    pub fn messages(&self, response: &str, role: &str, next_state: &str) -> Vec<serde_json::Value> {
        self.prompt.render(&[
            ("response", &clip_middle(response, MAX_FIELD_CHARS)),
            ("next_state_role", role),
            ("next_state_text", &clip_middle(next_state, MAX_FIELD_CHARS)),
        ])
    }
}

/// Makes the LLM judge the first time a turn needs it, so a run whose turns are
/// all scored by feedback or rules needs no model and no endpoint.
pub type PrmFactory = Box<dyn FnOnce() -> Result<PrmJudge>>;

/// Reward counts of one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RewardCounts {
    #[serde(rename = "-1")]
    pub minus: u64,
    #[serde(rename = "0")]
    pub zero: u64,
    #[serde(rename = "+1")]
    pub plus: u64,
}

impl RewardCounts {
    fn add(&mut self, reward: i8) {
        match reward {
            r if r < 0 => self.minus += 1,
            0 => self.zero += 1,
            _ => self.plus += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.minus + self.zero + self.plus
    }
}

/// What a run did, for the summary on stderr and `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Rows read.
    pub rows: u64,
    /// Rows given a reward by this run.
    pub judged: u64,
    /// Main turns no source could score (no feedback, no next state): reward null.
    pub no_reward: u64,
    /// Rows that already had a reward or judge_source (kept; see --rejudge).
    pub already_judged: u64,
    /// Rows that are not main turns (side requests, raw feedback events): kept.
    pub not_main: u64,
    /// Rewards given by this run, per judge_source.
    pub by_source: BTreeMap<String, RewardCounts>,
    /// Mean of the rewards given by this run.
    pub mean_reward: Option<f64>,
    /// LLM judge calls (votes) made.
    pub votes: u64,
    /// Votes with no valid `\boxed{}` (including failed calls).
    pub invalid_votes: u64,
    /// invalid_votes / votes.
    pub invalid_rate: Option<f64>,
    /// Calls that failed after all retries (timeouts, HTTP or model errors).
    pub failed_calls: u64,
    /// Retry attempts.
    pub retries: u64,
    /// Tokens the judge generated (as reported by it).
    pub judge_tokens: u64,
    /// Wall-clock seconds spent waiting for the judge.
    pub judge_seconds: f64,
    /// judge_tokens / judge_seconds.
    pub judge_tokens_per_s: Option<f64>,
    #[serde(skip)]
    reward_sum: f64,
    #[serde(skip)]
    calls: CallStats,
}

impl Summary {
    fn record(&mut self, source: &str, reward: i8) {
        self.judged += 1;
        self.reward_sum += f64::from(reward);
        self.by_source
            .entry(source.to_string())
            .or_default()
            .add(reward);
        self.mean_reward = Some(self.reward_sum / self.judged as f64);
    }

    fn add_calls(&mut self, stats: &CallStats, invalid: u64) {
        self.calls.add(stats);
        self.votes = self.calls.calls;
        self.invalid_votes += invalid;
        self.invalid_rate = (self.votes > 0).then(|| self.invalid_votes as f64 / self.votes as f64);
        self.failed_calls = self.calls.failed;
        self.retries = self.calls.retries;
        self.judge_tokens = self.calls.completion_tokens;
        self.judge_seconds = self.calls.seconds;
        self.judge_tokens_per_s = self.calls.tokens_per_s();
    }

    /// The readable summary, a few lines for stderr.
    pub fn render(&self) -> String {
        let mut out = format!(
            "judged {} of {} rows (mean reward {}); {} without a reward, {} already judged, {} not main turns",
            self.judged,
            self.rows,
            self.mean_reward.map_or("-".into(), |m| format!("{m:+.3}")),
            self.no_reward,
            self.already_judged,
            self.not_main
        );
        for (source, c) in &self.by_source {
            out.push_str(&format!(
                "\n  {source:<24} {:>6} rows: {} x -1, {} x 0, {} x +1",
                c.total(),
                c.minus,
                c.zero,
                c.plus
            ));
        }
        if self.votes > 0 {
            out.push_str(&format!(
                "\n  judge calls: {} votes, {} invalid ({:.1}%), {} failed, {} retries; {}",
                self.votes,
                self.invalid_votes,
                100.0 * self.invalid_rate.unwrap_or(0.0),
                self.failed_calls,
                self.retries,
                match self.judge_tokens_per_s {
                    Some(tps) => format!(
                        "{} tokens in {:.1} s ({tps:.1} tokens/s)",
                        self.judge_tokens, self.judge_seconds
                    ),
                    None => format!("{:.1} s (no token counts reported)", self.judge_seconds),
                }
            ));
        }
        out
    }
}

/// Settings of a judge run.
pub struct JudgeConfig {
    /// Sources in priority order.
    pub sources: Vec<Source>,
    /// Judge rows that already have a reward or judge_source again.
    pub rejudge: bool,
}

/// Judges batches one after another, keeping a running [`Summary`].
pub struct Judge {
    config: JudgeConfig,
    prm: Option<PrmJudge>,
    prm_factory: Option<PrmFactory>,
    summary: Summary,
    /// The first output batch's schema: later batches are put in its column order.
    out_schema: Option<SchemaRef>,
}

/// The judge columns of one row.
#[derive(Clone, Debug, Default, PartialEq)]
struct Cells {
    reward: Option<f32>,
    votes: Option<Vec<i8>>,
    invalid: Option<i32>,
    source: Option<String>,
    raw: Option<String>,
}

enum Plan {
    /// Keep the row's current judge columns.
    Keep,
    /// Write these.
    Set(Cells),
    /// Ask the LLM judge (index into this batch's PRM items).
    Prm(usize),
}

impl Judge {
    /// `prm` makes the LLM judge when a turn first needs it; `None` when the
    /// sources do not include `prm`.
    pub fn new(config: JudgeConfig, prm: Option<PrmFactory>) -> Result<Self> {
        if config.sources.is_empty() {
            bail!("no judge sources given (choose from feedback, env, prm)");
        }
        for (i, s) in config.sources.iter().enumerate() {
            if config.sources[..i].contains(s) {
                bail!("judge source `{s:?}` is listed twice");
            }
        }
        if config.sources.contains(&Source::Prm) && prm.is_none() {
            bail!("the prm source needs an LLM judge");
        }
        Ok(Judge {
            config,
            prm: None,
            prm_factory: prm,
            summary: Summary::default(),
            out_schema: None,
        })
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The LLM judge's `judge_source` name, once it has been made.
    pub fn prm_source(&self) -> Option<&str> {
        self.prm.as_ref().map(PrmJudge::source)
    }

    fn prm(&mut self) -> Result<&PrmJudge> {
        if self.prm.is_none() {
            let factory = self
                .prm_factory
                .take()
                .context("the LLM judge could not be set up (see the earlier error)")?;
            self.prm = Some(factory()?);
        }
        Ok(self.prm.as_ref().expect("just made"))
    }

    /// Judges one batch: returns it with the judge columns set (added when
    /// missing) and every other column untouched. `on_call` is told after each
    /// LLM judge call (for a progress bar).
    pub fn judge_batch(
        &mut self,
        input: &RolloutBatch,
        on_call: &(dyn Fn() + Sync),
    ) -> Result<RecordBatch> {
        let batch = &input.batch;
        let at = |i: usize| format!("{}: row {}", input.source, input.first_row + i as u64 + 1);
        let text = |name: &str| -> Option<&StringArray> {
            batch.column_by_name(name).map(|a| a.as_string::<i32>())
        };
        let sample_id = text("sample_id").context("sample_id column missing")?;
        let turn_type = text("turn_type").context("turn_type column missing")?;
        let response = text("response_text").context("response_text column missing")?;
        let role = text("next_state_role");
        let next_state = text("next_state_text");
        let feedback: Option<&Int8Array> = batch
            .column_by_name("feedback")
            .map(|a| a.as_primitive::<Int8Type>());
        let old = OldCells::new(batch);

        fn get(col: Option<&StringArray>, i: usize) -> Option<&str> {
            col.filter(|c| c.is_valid(i)).map(|c| c.value(i))
        }
        let sources = self.config.sources.clone();

        let mut plans = Vec::with_capacity(batch.num_rows());
        let mut items: Vec<VoteItem> = Vec::new();
        for i in 0..batch.num_rows() {
            self.summary.rows += 1;
            if turn_type.value(i) != "main" {
                self.summary.not_main += 1;
                plans.push(Plan::Keep);
                continue;
            }
            if !self.config.rejudge && old.is_judged(i) {
                self.summary.already_judged += 1;
                plans.push(Plan::Keep);
                continue;
            }
            let role_i = get(role, i);
            let next_i = get(next_state, i).filter(|t| !t.trim().is_empty());
            let mut plan = None;
            for &source in &sources {
                match source {
                    Source::Feedback => {
                        let Some(rating) = feedback.filter(|f| f.is_valid(i)).map(|f| f.value(i))
                        else {
                            continue;
                        };
                        if !(-1..=1).contains(&rating) {
                            bail!(
                                "{}: column `feedback` is {rating}; expected -1, 0 or +1",
                                at(i)
                            );
                        }
                        plan = Some(Plan::Set(Cells {
                            reward: Some(f32::from(rating)),
                            source: Some("feedback".into()),
                            ..Default::default()
                        }));
                    }
                    Source::Env => {
                        let (Some(r), Some(t)) = (role_i, next_i) else {
                            continue;
                        };
                        let Some(found) = env::detect(r, t) else {
                            continue;
                        };
                        plan = Some(Plan::Set(Cells {
                            reward: Some(-1.0),
                            source: Some("env".into()),
                            raw: Some(found.describe()),
                            ..Default::default()
                        }));
                    }
                    Source::Prm => {
                        let Some(t) = next_i else { continue };
                        let r = role_i.unwrap_or("user");
                        let messages = self
                            .prm()
                            .with_context(|| format!("setting up the LLM judge for {}", at(i)))?
                            .messages(response.value(i), r, t);
                        items.push(VoteItem {
                            key: sample_id.value(i).to_string(),
                            messages,
                        });
                        plan = Some(Plan::Prm(items.len() - 1));
                    }
                }
                if plan.is_some() {
                    break;
                }
            }
            plans.push(plan.unwrap_or_else(|| {
                // Re-judging a row that no source can score clears its old verdict.
                self.summary.no_reward += 1;
                Plan::Set(Cells::default())
            }));
        }

        let verdicts = if items.is_empty() {
            Vec::new()
        } else {
            let prm = self
                .prm
                .as_ref()
                .expect("made when the first item was queued");
            let (replies, stats) = prm
                .runner
                .run(&items, on_call)
                .with_context(|| format!("{}: judging rows", input.source))?;
            let verdicts: Vec<votes::Verdict> = replies.iter().map(|r| votes::tally(r)).collect();
            let invalid = verdicts.iter().map(|v| v.invalid as u64).sum();
            self.summary.add_calls(&stats, invalid);
            verdicts
        };

        let prm_source = self.prm.as_ref().map(|p| p.source.clone());
        let mut cells = Vec::with_capacity(plans.len());
        for (i, plan) in plans.into_iter().enumerate() {
            let c = match plan {
                Plan::Keep => old.get(i),
                Plan::Set(c) => {
                    if let (Some(r), Some(s)) = (c.reward, &c.source) {
                        self.summary.record(s, r as i8);
                    }
                    c
                }
                Plan::Prm(k) => {
                    let v = &verdicts[k];
                    let source = prm_source.clone().unwrap_or_default();
                    self.summary.record(&source, v.reward);
                    Cells {
                        reward: Some(f32::from(v.reward)),
                        votes: Some(v.votes.clone()),
                        invalid: Some(i32::try_from(v.invalid).unwrap_or(i32::MAX)),
                        source: Some(source),
                        raw: v.raw.clone(),
                    }
                }
            };
            cells.push(c);
        }
        let out = set_judge_columns(batch, &cells)
            .with_context(|| format!("{}: writing the judge columns", input.source))?;
        self.align(out, &input.source)
    }

    /// Puts a batch in the column order of the first one (inputs written by
    /// different tools may order the same columns differently).
    fn align(&mut self, batch: RecordBatch, source: &str) -> Result<RecordBatch> {
        let Some(first) = &self.out_schema else {
            self.out_schema = Some(batch.schema());
            return Ok(batch);
        };
        let schema = batch.schema();
        let same_order = first.fields().len() == schema.fields().len()
            && first
                .fields()
                .iter()
                .zip(schema.fields())
                .all(|(a, b)| a.name() == b.name());
        if same_order {
            return Ok(batch);
        }
        let mut indices = Vec::with_capacity(first.fields().len());
        for f in first.fields() {
            match schema.index_of(f.name()) {
                Ok(i) => indices.push(i),
                Err(_) => bail!(
                    "{source}: has no column `{}`, which the first input had; judge files with different extra columns separately",
                    f.name()
                ),
            }
        }
        if indices.len() != schema.fields().len() {
            bail!(
                "{source}: has columns the first input did not have; judge files with different extra columns separately"
            );
        }
        Ok(batch.project(&indices)?)
    }
}

/// The judge columns as they are in the input (absent columns read as null).
struct OldCells<'a> {
    reward: Option<&'a Float32Array>,
    votes: Option<&'a ListArray>,
    invalid: Option<&'a Int32Array>,
    source: Option<&'a StringArray>,
    raw: Option<&'a StringArray>,
}

impl<'a> OldCells<'a> {
    fn new(batch: &'a RecordBatch) -> Self {
        OldCells {
            reward: batch
                .column_by_name("reward")
                .map(|a| a.as_primitive::<Float32Type>()),
            votes: batch
                .column_by_name("judge_votes")
                .map(|a| a.as_list::<i32>()),
            invalid: batch
                .column_by_name("judge_invalid")
                .map(|a| a.as_primitive::<Int32Type>()),
            source: batch
                .column_by_name("judge_source")
                .map(|a| a.as_string::<i32>()),
            raw: batch
                .column_by_name("judge_raw")
                .map(|a| a.as_string::<i32>()),
        }
    }

    /// A row counts as judged when it has a reward or a judge_source.
    fn is_judged(&self, i: usize) -> bool {
        self.reward.is_some_and(|a| a.is_valid(i)) || self.source.is_some_and(|a| a.is_valid(i))
    }

    fn get(&self, i: usize) -> Cells {
        let s =
            |a: Option<&StringArray>| a.filter(|a| a.is_valid(i)).map(|a| a.value(i).to_string());
        Cells {
            reward: self.reward.filter(|a| a.is_valid(i)).map(|a| a.value(i)),
            votes: self.votes.filter(|a| a.is_valid(i)).map(|a| {
                a.value(i)
                    .as_primitive::<Int8Type>()
                    .iter()
                    .flatten()
                    .collect()
            }),
            invalid: self.invalid.filter(|a| a.is_valid(i)).map(|a| a.value(i)),
            source: s(self.source),
            raw: s(self.raw),
        }
    }
}

/// `batch` with the five judge columns replaced by `cells` (one per row), or
/// added at their place in the claw column order when missing.
fn set_judge_columns(batch: &RecordBatch, cells: &[Cells]) -> Result<RecordBatch> {
    let arrays: [ArrayRef; 5] = [
        Arc::new(cells.iter().map(|c| c.reward).collect::<Float32Array>()),
        Arc::new(ListArray::from_iter_primitive::<Int8Type, _, _>(
            cells
                .iter()
                .map(|c| c.votes.as_ref().map(|v| v.iter().map(|x| Some(*x)))),
        )),
        Arc::new(cells.iter().map(|c| c.invalid).collect::<Int32Array>()),
        Arc::new(
            cells
                .iter()
                .map(|c| c.source.as_deref())
                .collect::<StringArray>(),
        ),
        Arc::new(
            cells
                .iter()
                .map(|c| c.raw.as_deref())
                .collect::<StringArray>(),
        ),
    ];
    let replacements: Vec<(&str, ArrayRef)> = JUDGE_COLUMNS.into_iter().zip(arrays).collect();
    set_columns(batch, &replacements)
}

#[cfg(test)]
mod tests;
