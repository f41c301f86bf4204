//! Benchmarks for `claw eval` (docs/ARCHITECTURE.md, "Evaluation"), free of CLI
//! concerns.
//!
//! Every generative benchmark builds chat prompts ([`VoteItem`]s), puts them to a
//! [`VoteRunner`] (a local model or any OpenAI-compatible endpoint, see
//! [`crate::llm`]), and grades the replies into per-item [`ItemResult`]s and
//! a [`Report`]. Each call's seed derives from `--seed`, the item's key and the
//! sample index, so a run is reproducible whatever order the calls finish in.
//!
//! - [`gpqa`]: multiple choice, shuffled choices, `Answer: $LETTER` extraction.
//! - [`humaneval`]: code completion, run in the [`sandbox`], pass@k.
//! - [`gsm8k`]: grade-school maths, numeric answer matching.
//! - [`facts`]: short factual questions, accepted answers matched as words.
//! - [`ppl`]: perplexity and bits per byte of a text under the local model.
//! - [`helpful`]: an LLM judge's verdict on whether replies help (persona).
//! - [`retention`]: gsm8k, facts and ppl of a base model and of it with an
//!   adapter, side by side: what training kept.
//! - [`stats`]: intervals and the pass@k estimator.
//! - [`results`]: the per-item results file (Parquet or JSON).
//!
//! Adding a benchmark: a module with a `run` that returns an [`Outcome`], a
//! variant of [`Bench`], and its arm in `claw eval`'s dispatch.

pub mod agent;
pub mod facts;
pub mod gpqa;
pub mod gsm8k;
pub mod helpful;
pub mod humaneval;
pub mod live;
pub mod persona;
pub mod ppl;
pub mod results;
pub mod retention;
pub mod sandbox;
pub mod stats;

use serde::Serialize;

use crate::llm::{CallStats, Replies, VoteItem, VoteRunner};

/// The benchmarks `claw eval --bench` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bench {
    /// Graduate-level multiple choice (bring the GPQA CSV).
    Gpqa,
    /// Python function completion, run in a sandbox (pass@k).
    Humaneval,
    /// Grade-school maths word problems, numeric answers.
    Gsm8k,
    /// Perplexity and bits per byte of a text file (local model only).
    Ppl,
    /// Short factual questions (capitals, elements, dates, authors).
    Facts,
    /// An adapter's gsm8k, facts and ppl next to the base model's (local only).
    Retention,
    /// Sessions until the model learns a user's preference (see [`persona`]).
    Persona,
    /// Does the loop learn to use a python tool (see [`agent`]).
    Agent,
}

impl Bench {
    pub fn name(self) -> &'static str {
        match self {
            Bench::Gpqa => "gpqa",
            Bench::Humaneval => "humaneval",
            Bench::Gsm8k => "gsm8k",
            Bench::Ppl => "ppl",
            Bench::Facts => "facts",
            Bench::Retention => "retention",
            Bench::Persona => "persona",
            Bench::Agent => "agent",
        }
    }
}

/// One graded reply (or, for ppl, one scored window).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ItemResult {
    /// The item's id in its data file (GPQA Record ID or row, HumanEval task_id,
    /// GSM8K line, ppl window).
    pub id: String,
    /// Which repeat (GPQA) or sample (HumanEval) of the item this is.
    pub sample: u32,
    pub prompt: String,
    pub response: String,
    /// What was taken from the response: a letter, a number, the program's code.
    pub extracted: Option<String>,
    pub expected: String,
    /// None where nothing is right or wrong (ppl).
    pub correct: Option<bool>,
    /// Why the item has no usable reply (a failed call) or why it failed
    /// (a program's error, a timeout).
    pub error: Option<String>,
}

/// One number of a report, with its 95% interval when it has one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci95: Option<(f64, f64)>,
    /// A count (shown without decimals), not a rate.
    #[serde(skip)]
    pub is_count: bool,
}

impl Metric {
    pub fn new(name: &str, value: f64) -> Self {
        Metric {
            name: name.to_string(),
            value,
            ci95: None,
            is_count: false,
        }
    }

    pub fn count(name: &str, value: usize) -> Self {
        Metric {
            is_count: true,
            ..Metric::new(name, value as f64)
        }
    }

    pub fn with_ci(name: &str, estimate: stats::Estimate) -> Self {
        Metric {
            name: name.to_string(),
            value: estimate.mean,
            ci95: Some((estimate.ci_low, estimate.ci_high)),
            is_count: false,
        }
    }
}

/// A benchmark run's summary.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bench: Bench,
    /// The model or endpoint scored.
    pub target: String,
    pub data: String,
    /// Questions, problems or windows scored.
    pub items: usize,
    /// The headline number (`--fail-under` compares it): the first metric.
    pub score: f64,
    pub score_name: String,
    pub metrics: Vec<Metric>,
    pub seed: u64,
    /// Calls to the model (0 for ppl) and how many gave no reply.
    pub calls: u64,
    pub failed_calls: u64,
    pub completion_tokens: u64,
    pub seconds: f64,
    /// Anything the reader should know (e.g. identical greedy samples).
    pub notes: Vec<String>,
}

impl Report {
    /// A report whose score is `metrics[0]`.
    pub fn new(bench: Bench, target: &str, data: &str, items: usize, metrics: Vec<Metric>) -> Self {
        let (score, score_name) = metrics
            .first()
            .map_or((0.0, String::new()), |m| (m.value, m.name.clone()));
        Report {
            bench,
            target: target.to_string(),
            data: data.to_string(),
            items,
            score,
            score_name,
            metrics,
            seed: 0,
            calls: 0,
            failed_calls: 0,
            completion_tokens: 0,
            seconds: 0.0,
            notes: Vec::new(),
        }
    }

    pub fn with_calls(mut self, stats: &CallStats) -> Self {
        self.calls = stats.calls;
        self.failed_calls = stats.failed;
        self.completion_tokens = stats.completion_tokens;
        self
    }
}

/// A finished run: the summary and every graded item.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub report: Report,
    pub items: Vec<ItemResult>,
}

/// A single-user-message chat prompt.
pub fn user_prompt(key: String, text: &str) -> VoteItem {
    VoteItem {
        key,
        messages: vec![serde_json::json!({"role": "user", "content": text})],
    }
}

/// Puts every prompt to the model (`samples` times each, the runner's `votes`)
/// and returns the replies in prompt order; `on_call` after each finished call.
pub fn ask(
    runner: &VoteRunner,
    prompts: &[VoteItem],
    on_call: &(dyn Fn() + Sync),
) -> anyhow::Result<(Vec<Replies>, CallStats)> {
    runner.run(prompts, on_call)
}

/// The text of the user message of a one-message prompt.
pub fn prompt_text(item: &VoteItem) -> String {
    item.messages
        .first()
        .and_then(|m| m.get("content"))
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_string()
}

/// The items of a JSONL benchmark file (`name` is what errors call it): each
/// non-empty line parsed as JSON and handed to `item` with its place
/// (`FILE:LINE`, for errors) and its id (the line's `id`, else `line-N`).
pub fn jsonl_items<T>(
    text: &str,
    name: &str,
    mut item: impl FnMut(&str, &serde_json::Value, String) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    use anyhow::Context;
    use serde_json::Value as Json;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{name}:{}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let json: Json =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        let id = match json.get("id") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => format!("line-{}", i + 1),
        };
        out.push(item(&at, &json, id)?);
    }
    Ok(out)
}
