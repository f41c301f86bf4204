//! Hint replay (`claw train --hint-replay N`): a correction that states a standing
//! preference ("That's too long.") holds for every prompt, not only the one it
//! followed. For each trained sample that carries a hint, the current policy
//! answers N other prompts the user opened sessions with, and the same policy
//! with the hint in its context scores those fresh replies: on-policy
//! distillation, as `claw distill-hints` does for the corrected turn itself, over
//! prompts the user will ask again. One correction teaches N + 1 replies.
//! `--hint-replay-teacher base` makes the base model read the hint instead.
//!
//! Only for hints that hold everywhere (a persona's style); a hint about one task
//! ("check the file first") replayed on other tasks would teach the wrong thing.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value as Json;

use super::trainer::{TrainSample, Trainer};
use crate::distill::hints::teacher_messages;
use crate::distill::{HintPlacement, TeacherWeights};
use crate::model::generate::Flow;
use crate::model::sampling::SamplingParams;
use crate::model::score::{self, Sequence};
use crate::model::{Decoder, Model};
use crate::rollout::RolloutRow;

/// Openings remembered for replay; older ones are forgotten first.
const POOL_LIMIT: usize = 256;

/// What a row offers replay: the prompt its session opened with, and its hint.
#[derive(Debug)]
pub struct ReplaySource {
    /// The messages up to and including the first user message.
    pub opening: Vec<Json>,
    pub tools: Option<Vec<Json>>,
    /// The hindsight hint distill-hints accepted for this row, if any.
    pub hint: Option<String>,
    /// The opening as JSON text: identifies it (two rows of one session share it).
    key: String,
}

impl ReplaySource {
    /// The opening and hint of `row`; None when its messages hold no user message.
    pub fn of(row: &RolloutRow) -> Result<Option<Self>> {
        let messages = row.messages()?;
        let Some(first_user) = messages
            .iter()
            .position(|m| m.get("role").and_then(Json::as_str) == Some("user"))
        else {
            return Ok(None);
        };
        let opening = crate::serve::messages::for_template(&messages[..=first_user])
            .context("messages_json cannot be rendered as serve rendered it")?;
        let tools = row.tools()?;
        let hint = row.hint.clone().filter(|h| !h.trim().is_empty());
        let key = Json::Array(opening.clone()).to_string();
        Ok(Some(Self {
            opening,
            tools,
            hint,
            key,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Other openings answered and distilled per hinted sample.
    pub per_hint: usize,
    /// Where the teacher reads the hint.
    pub placement: HintPlacement,
    /// Which weights read it: the current policy, or the base model (a teacher
    /// that does not move with the student, so a preference with no natural
    /// end, such as "shorter", is not pushed further with every step).
    pub teacher: TeacherWeights,
    /// Longest replay reply, in tokens.
    pub max_tokens: usize,
    /// Sampling temperature of the replay replies (serve's default: what users see).
    pub temperature: f32,
    pub seed: u64,
}

/// The openings seen so far and the replay samples made from them.
pub struct HintReplay {
    config: ReplayConfig,
    model: Arc<Model>,
    pool: Vec<Arc<ReplaySource>>,
    keys: HashSet<String>,
    rng: StdRng,
    /// Replay samples made (for the summary).
    pub made: u64,
}

impl HintReplay {
    /// `model` gives the tokenizer and chat template (the weights are the trainer's).
    pub fn new(config: ReplayConfig, model: Arc<Model>) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self {
            config,
            model,
            pool: Vec::new(),
            keys: HashSet::new(),
            rng,
            made: 0,
        }
    }

    /// Adds a sample's opening to the pool (once per distinct opening).
    pub fn remember(&mut self, source: &Arc<ReplaySource>) {
        if !self.keys.insert(source.key.clone()) {
            return;
        }
        if self.pool.len() >= POOL_LIMIT {
            let old = self.pool.remove(0);
            self.keys.remove(&old.key);
        }
        self.pool.push(source.clone());
    }

    pub fn config(&self) -> &ReplayConfig {
        &self.config
    }

    /// Openings remembered.
    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// Replay samples for the hinted samples of `batch`: the trainer's current
    /// policy answers other openings, and reads the hint as their teacher.
    /// Samples longer than `max_sequence` tokens are left out.
    pub fn samples(
        &mut self,
        trainer: &Trainer,
        batch: &[TrainSample],
        max_sequence: usize,
    ) -> Result<Vec<TrainSample>> {
        let hinted: Vec<(&TrainSample, &ReplaySource, &str)> = batch
            .iter()
            .filter_map(|s| {
                let source = s.replay.as_deref()?;
                Some((s, source, source.hint.as_deref()?))
            })
            .collect();
        if hinted.is_empty() || self.config.per_hint == 0 {
            return Ok(Vec::new());
        }
        let policy = trainer.frozen_policy()?;
        let teacher_weights = match self.config.teacher {
            TeacherWeights::Policy => &policy,
            TeacherWeights::Base => trainer.reference(),
        };
        let distill = OnPolicy {
            model: &self.model,
            student: &policy,
            teacher: teacher_weights,
            trainer,
            max_sequence,
            topk: 0,
        };
        let mut out = Vec::new();
        for (sample, source, hint) in hinted {
            let own = &source.key;
            let mut others: Vec<&Arc<ReplaySource>> =
                self.pool.iter().filter(|o| &o.key != own).collect();
            others.shuffle(&mut self.rng);
            for (k, other) in others.into_iter().take(self.config.per_hint).enumerate() {
                let tools = other.tools.as_deref();
                let prompt_ids = distill.render(&other.opening, tools)?;
                let teacher_ids = distill.render(
                    &teacher_messages(&other.opening, hint, self.config.placement)?,
                    tools,
                )?;
                let params = SamplingParams {
                    temperature: self.config.temperature,
                    max_tokens: self.config.max_tokens,
                    seed: Some(rand::Rng::gen(&mut self.rng)),
                    ..SamplingParams::default()
                };
                let made = distill
                    .sample(
                        format!("{}#replay{k}", sample.sample_id),
                        prompt_ids,
                        &teacher_ids,
                        &params,
                    )
                    .with_context(|| {
                        format!("replaying the hint of sample {}", sample.sample_id)
                    })?;
                out.extend(made);
            }
        }
        self.made += out.len() as u64;
        Ok(out)
    }
}

/// On-policy distillation outside the input rows (hint replay, the anchor): the
/// student's current weights answer a prompt, and a teacher scores that reply
/// in its own context.
pub(super) struct OnPolicy<'a> {
    /// The tokenizer and chat template.
    pub model: &'a Model,
    pub student: &'a Decoder,
    pub teacher: &'a Decoder,
    pub trainer: &'a Trainer,
    /// Longest prompt + reply a sample may have.
    pub max_sequence: usize,
    /// Also the teacher's top-K distribution per reply token (0: only the
    /// log-probs of the sampled tokens).
    pub topk: usize,
}

impl OnPolicy<'_> {
    /// `messages` as the model reads them before its reply.
    pub fn render(&self, messages: &[Json], tools: Option<&[Json]>) -> Result<Vec<u32>> {
        let text = self.model.template.render(messages, tools, true)?;
        self.model.tokenizer.encode(&text)
    }

    /// The student answers `prompt_ids` (at most `params.max_tokens`, less where
    /// the context is short) and the teacher scores the reply after
    /// `teacher_ids`. None when there is no room for a reply or it is empty.
    pub fn sample(
        &self,
        sample_id: String,
        prompt_ids: Vec<u32>,
        teacher_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<Option<TrainSample>> {
        let room = self
            .max_sequence
            .saturating_sub(prompt_ids.len().max(teacher_ids.len()));
        let params = SamplingParams {
            max_tokens: params.max_tokens.min(room),
            ..params.clone()
        };
        if params.max_tokens == 0 {
            return Ok(None);
        }
        let reply = self
            .model
            .generate_with(self.student, &prompt_ids, &params, |_| Flow::Continue)?;
        if reply.token_ids.is_empty() {
            return Ok(None);
        }
        let seq = [Sequence {
            prompt: teacher_ids,
            response: &reply.token_ids,
        }];
        let budget = self.trainer.config.micro_batch_tokens;
        let (teacher, teacher_topk) = match self.topk {
            0 => (score::score(self.teacher, &seq, budget)?.pop(), None),
            k => {
                let (mut lps, mut topk) = score::score_with_topk(self.teacher, &seq, k, budget)?;
                let topk = topk.pop().map(|rows| {
                    rows.into_iter()
                        .map(|(ids, lps)| (ids.into_iter().map(|i| i as u32).collect(), lps))
                        .collect()
                });
                (lps.pop(), topk)
            }
        };
        Ok(Some(TrainSample {
            sample_id,
            prompt_ids,
            response_ids: reply.token_ids,
            reward: None,
            teacher_logprobs: Some(teacher.context("no teacher log-probs")?),
            teacher_topk,
            policy_version: self.trainer.steps() as i64,
            replay: None,
            auxiliary: true,
        }))
    }
}
