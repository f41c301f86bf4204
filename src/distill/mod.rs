//! `claw distill-hints` (docs/ARCHITECTURE.md, "Hindsight hints and distillation"):
//! for each turn whose next state holds a hindsight hint, the teacher log-prob of
//! every token of the student's own response under a context that includes the hint.
//!
//! - [`hints`]: reading the hint judge, choosing a hint, the teacher's messages.
//! - [`Distiller`]: the stage over record batches: hint sources, teacher scoring
//!   with the adapter that produced each response, column output.

pub mod hints;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::adapter::layout::adapter_file_name;
use crate::adapter::Adapter;
use crate::llm::prompt::{clip_middle, PromptTemplate};
use crate::llm::{CallStats, VoteItem, VoteRunner};
use crate::model::decoder::Decoder;
use crate::model::score::{self, Sequence};
use crate::model::Model;
use crate::rollout::{rows_from_batch, rows_to_batch, set_columns, RolloutRow};
pub use hints::HintPlacement;
use hints::{parse_hint_reply, select_hint, teacher_messages, Select};

/// The columns this stage owns.
pub const DISTILL_COLUMNS: [&str; 5] = [
    "hint",
    "hint_candidates_json",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
];

/// The built-in hint-judge prompt (`prompts/hint-judge.txt`).
pub const DEFAULT_HINT_PROMPT: &str = include_str!("../../prompts/hint-judge.txt");

/// Placeholders the hint prompt must use.
pub const HINT_PROMPT_VARS: [&str; 3] = ["response", "next_state_role", "next_state_text"];

/// Where hints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HintSource {
    /// The hint judge reads the response and the next state.
    Judge,
    /// The user's own words: feedback_text, else a next state judged -1.
    Feedback,
    /// Feedback where there is some, the judge elsewhere.
    Both,
}

/// Which weights score the teacher context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherWeights {
    /// The adapter that produced the response (its policy_version), from the
    /// checkpoint directory; the base model for version 0.
    Policy,
    /// Always the base model.
    Base,
}

#[derive(Debug, Clone)]
pub struct DistillConfig {
    pub source: HintSource,
    pub select: Select,
    /// Where the teacher reads the hint.
    pub placement: HintPlacement,
    /// Also store the teacher's top-K distribution per token (0 = off).
    pub topk: usize,
    /// Recompute rows that already have teacher log-probs.
    pub redo: bool,
    pub teacher: TeacherWeights,
    /// Where `adapter-NNNNNN.safetensors` files are (for --teacher policy).
    pub checkpoints: Option<PathBuf>,
    /// Padded tokens per teacher forward pass.
    pub max_tokens: usize,
    /// Longest response / next state shown to the hint judge, in characters.
    pub max_judge_chars: usize,
}

/// Counts for the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DistillStats {
    pub rows: u64,
    /// Rows that already had teacher log-probs and were passed through.
    pub already_distilled: u64,
    /// Rows with nothing to take a hint from (no next state, no feedback).
    pub no_hint_source: u64,
    pub judged: u64,
    pub accepted_from_judge: u64,
    pub accepted_from_feedback: u64,
    /// Judge said -1 in every valid vote.
    pub rejected_negative: u64,
    /// Positive votes whose hint was missing or too short.
    pub rejected_short: u64,
    /// No valid vote (garbage or failed calls).
    pub rejected_invalid: u64,
    /// Rows whose teacher context did not fit the model.
    pub too_long: u64,
    /// Rows scored with the base model because their adapter was not found.
    pub adapter_missing: u64,
    pub teacher_tokens: u64,
    pub teacher_seconds: f64,
    #[serde(skip)]
    pub calls: CallStats,
}

impl DistillStats {
    pub fn accepted(&self) -> u64 {
        self.accepted_from_judge + self.accepted_from_feedback
    }
}

/// The hint judge: a runner and its prompt.
pub struct HintJudge {
    pub runner: VoteRunner,
    pub prompt: PromptTemplate,
}

pub struct Distiller {
    config: DistillConfig,
    judge: Option<HintJudge>,
    model: Arc<Model>,
    /// Teacher decoders by policy version (0 = base).
    teachers: HashMap<i64, Decoder>,
    pub stats: DistillStats,
}

/// A row to score: its index, the teacher prompt ids and the response ids.
type TeacherInput = (usize, Vec<u32>, Vec<u32>);

/// What was decided for one row.
struct Decision {
    hint: String,
    candidates: Json,
}

impl Distiller {
    /// `model` gives the tokenizer, chat template and teacher weights (f32 is the
    /// exact function; any format works).
    pub fn new(config: DistillConfig, model: Arc<Model>, judge: Option<HintJudge>) -> Result<Self> {
        if config.source != HintSource::Feedback {
            anyhow::ensure!(
                judge.is_some(),
                "--hint-source judge/both needs a hint judge"
            );
        }
        Ok(Self {
            config,
            judge,
            model,
            teachers: HashMap::new(),
            stats: DistillStats::default(),
        })
    }

    /// Processes one batch: rows with an accepted hint get the teacher columns,
    /// every other row and column passes through unchanged.
    pub fn process(&mut self, batch: &RecordBatch, source: &str) -> Result<RecordBatch> {
        let mut rows = rows_from_batch(batch).with_context(|| source.to_string())?;
        self.stats.rows += rows.len() as u64;
        let mut decisions: Vec<Option<Decision>> = (0..rows.len()).map(|_| None).collect();
        let mut to_judge = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if row.teacher_logprobs.is_some() && !self.config.redo {
                self.stats.already_distilled += 1;
                continue;
            }
            if matches!(self.config.source, HintSource::Feedback | HintSource::Both) {
                if let Some(hint) = feedback_hint(row) {
                    self.stats.accepted_from_feedback += 1;
                    decisions[i] = Some(Decision {
                        candidates: json!([{"source": "feedback", "hint": hint}]),
                        hint,
                    });
                    continue;
                }
            }
            let judgeable = row
                .next_state_text
                .as_deref()
                .is_some_and(|t| !t.trim().is_empty());
            if self.config.source != HintSource::Feedback && judgeable {
                to_judge.push(i);
            } else {
                self.stats.no_hint_source += 1;
            }
        }
        if !to_judge.is_empty() {
            self.judge_rows(&rows, &to_judge, &mut decisions)?;
        }
        let accepted: Vec<usize> = (0..rows.len())
            .filter(|&i| decisions[i].is_some())
            .collect();
        if accepted.is_empty() {
            return Ok(batch.clone());
        }
        self.score_teacher(&mut rows, &accepted, &decisions)
            .with_context(|| format!("{source}: teacher log-probs"))?;
        for &i in &accepted {
            if let Some(d) = &decisions[i] {
                if rows[i].teacher_logprobs.is_some() {
                    rows[i].hint = Some(d.hint.clone());
                    rows[i].hint_candidates_json = Some(d.candidates.to_string());
                }
            }
        }
        let typed = rows_to_batch(&rows)?;
        let replacements: Vec<(&str, arrow::array::ArrayRef)> = DISTILL_COLUMNS
            .iter()
            .map(|name| {
                let column = typed
                    .column_by_name(name)
                    .with_context(|| format!("{name} missing from typed rows"))?;
                Ok((*name, column.clone()))
            })
            .collect::<Result<_>>()?;
        set_columns(batch, &replacements)
    }

    fn judge_rows(
        &mut self,
        rows: &[RolloutRow],
        indices: &[usize],
        decisions: &mut [Option<Decision>],
    ) -> Result<()> {
        let judge = self.judge.as_ref().context("no hint judge")?;
        let limit = self.config.max_judge_chars;
        let items: Vec<VoteItem> = indices
            .iter()
            .map(|&i| {
                let row = &rows[i];
                let response = clip_middle(&row.response_text, limit);
                let next = clip_middle(row.next_state_text.as_deref().unwrap_or(""), limit);
                let role = row.next_state_role.as_deref().unwrap_or("user");
                VoteItem {
                    key: row.sample_id.clone(),
                    messages: judge.prompt.render(&[
                        ("response", &response),
                        ("next_state_role", role),
                        ("next_state_text", &next),
                    ]),
                }
            })
            .collect();
        let (replies, calls) = judge.runner.run(&items, &|| {})?;
        self.stats.calls.add(&calls);
        self.stats.judged += indices.len() as u64;
        for (&i, replies) in indices.iter().zip(replies) {
            let mut candidates = Vec::new();
            let mut hints: Vec<String> = Vec::new();
            let (mut positive, mut valid) = (false, false);
            for (vote, reply) in replies.iter().enumerate() {
                match reply {
                    Ok(text) => {
                        let parsed = parse_hint_reply(text);
                        valid |= parsed.score.is_some();
                        positive |= parsed.score == Some(1);
                        if let Some(h) = parsed.accepted_hint() {
                            hints.push(h.to_string());
                        }
                        candidates.push(json!({
                            "vote": vote, "score": parsed.score, "hint": parsed.hint, "raw": text,
                        }));
                    }
                    Err(e) => candidates.push(json!({"vote": vote, "error": e})),
                }
            }
            let refs: Vec<&str> = hints.iter().map(String::as_str).collect();
            match select_hint(&refs, self.config.select) {
                Some(hint) => {
                    self.stats.accepted_from_judge += 1;
                    decisions[i] = Some(Decision {
                        hint: hint.to_string(),
                        candidates: Json::Array(candidates),
                    });
                }
                None if positive => self.stats.rejected_short += 1,
                None if valid => self.stats.rejected_negative += 1,
                None => self.stats.rejected_invalid += 1,
            }
        }
        Ok(())
    }

    /// Fills teacher_logprobs (and top-K) of the accepted rows.
    fn score_teacher(
        &mut self,
        rows: &mut [RolloutRow],
        accepted: &[usize],
        decisions: &[Option<Decision>],
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let context = self.model.config.context_length;
        // Teacher prompts, grouped by the weights that score them.
        let mut by_version: HashMap<i64, Vec<TeacherInput>> = HashMap::new();
        for &i in accepted {
            let row = &rows[i];
            let hint = &decisions[i].as_ref().context("decision")?.hint;
            let prompt = self
                .teacher_prompt(row, hint)
                .with_context(|| format!("sample {}", row.sample_id))?;
            let response: Vec<u32> = row
                .response_ids
                .iter()
                .map(|&id| u32::try_from(id))
                .collect::<Result<_, _>>()
                .with_context(|| format!("sample {}: negative response id", row.sample_id))?;
            if response.is_empty() || prompt.len() + response.len() >= context {
                self.stats.too_long += 1;
                continue;
            }
            let version = match self.config.teacher {
                TeacherWeights::Policy => row.policy_version,
                TeacherWeights::Base => 0,
            };
            by_version
                .entry(version)
                .or_default()
                .push((i, prompt, response));
        }
        for (version, items) in by_version {
            let decoder = self.teacher(version)?;
            let seqs: Vec<Sequence> = items
                .iter()
                .map(|(_, p, r)| Sequence {
                    prompt: p,
                    response: r,
                })
                .collect();
            if self.config.topk > 0 {
                let (lps, topk) = score::score_with_topk(
                    &decoder,
                    &seqs,
                    self.config.topk,
                    self.config.max_tokens,
                )?;
                for ((i, _, _), (lp, tk)) in items.iter().zip(lps.into_iter().zip(topk)) {
                    let (ids, lps): (Vec<_>, Vec<_>) = tk.into_iter().unzip();
                    rows[*i].teacher_logprobs = Some(lp);
                    rows[*i].teacher_topk_ids = Some(ids);
                    rows[*i].teacher_topk_logprobs = Some(lps);
                }
            } else {
                let lps = score::score(&decoder, &seqs, self.config.max_tokens)?;
                for ((i, _, _), lp) in items.iter().zip(lps) {
                    rows[*i].teacher_logprobs = Some(lp);
                    rows[*i].teacher_topk_ids = None;
                    rows[*i].teacher_topk_logprobs = None;
                }
            }
            self.stats.teacher_tokens += items
                .iter()
                .map(|(_, p, r)| (p.len() + r.len()) as u64)
                .sum::<u64>();
        }
        self.stats.teacher_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// The teacher context's token ids: the turn's messages with the hint where
    /// the config places it, rendered with the chat template for generation.
    fn teacher_prompt(&self, row: &RolloutRow, hint: &str) -> Result<Vec<u32>> {
        let messages = row.messages()?;
        let tools = row.tools()?;
        let messages = crate::serve::messages::for_template(&messages)
            .context("messages_json cannot be rendered as serve rendered it")?;
        let messages = teacher_messages(&messages, hint, self.config.placement)?;
        let text = self
            .model
            .template
            .render(&messages, tools.as_deref(), true)?;
        self.model.tokenizer.encode(&text)
    }

    /// The decoder for `version`: the base, or the base with that adapter
    /// (a cheap handle: weights are shared).
    fn teacher(&mut self, version: i64) -> Result<Decoder> {
        if !self.teachers.contains_key(&version) {
            let decoder = match (version, &self.config.checkpoints) {
                (0, _) | (_, None) => self.model.decoder.clone(),
                (v, Some(dir)) => {
                    let path = dir.join(adapter_file_name(v as u64));
                    if path.is_file() {
                        let (adapter, _) = Adapter::load(&path, &self.model.device)?;
                        adapter.apply_for_serving(&self.model.decoder)?
                    } else {
                        crate::warn!(
                            "policy version {v}: {} not found; scoring its turns with the base model",
                            path.display()
                        );
                        self.stats.adapter_missing += 1;
                        self.model.decoder.clone()
                    }
                }
            };
            self.teachers.insert(version, decoder);
        }
        self.teachers
            .get(&version)
            .cloned()
            .context("teacher decoder")
    }
}

/// The user's own correction as a hint: feedback text, else the next state of a
/// turn the judge scored -1 (the user said what was wrong).
pub fn feedback_hint(row: &RolloutRow) -> Option<String> {
    let long_enough = |t: &str| t.trim().chars().count() > hints::MIN_HINT_CHARS;
    if let Some(text) = row.feedback_text.as_deref().filter(|t| long_enough(t)) {
        return Some(text.trim().to_string());
    }
    if row.reward == Some(-1.0) {
        return row
            .next_state_text
            .as_deref()
            .filter(|t| long_enough(t))
            .map(|t| t.trim().to_string());
    }
    None
}

#[cfg(test)]
mod tests;
