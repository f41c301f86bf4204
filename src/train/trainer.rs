//! One optimisation step over a batch of samples: logp_old (no grad), the loss
//! of the chosen objective over micro-batches (gradients summed), grad-norm
//! clipping and AdamW.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use serde::Serialize;

use super::loss::{self, LossConfig, RecentRewards, SampleSignal, SampleStats};
use super::optim::{AdamW, AdamWConfig, GradSum};
use super::replay::ReplaySource;
use crate::adapter::{Adapter, LoraConfig};
use crate::model::decoder::{Decoder, Kernels};
use crate::model::linear::LoraDelta;
use crate::model::score::{self, Sequence};

/// What the step optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Policy gradient from rewards and teacher log-probs (docs/ARCHITECTURE.md,
    /// "Training").
    Rl,
    /// Next-token loss on the responses (supervised fine-tuning).
    Sft,
    /// Next-token loss on plain text (language modelling).
    Lm,
}

/// One training sample: the token ids exactly as served, and its signal.
#[derive(Debug, Clone, Default)]
pub struct TrainSample {
    pub sample_id: String,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    pub reward: Option<f32>,
    pub teacher_logprobs: Option<Vec<f32>>,
    /// The teacher's top-K distribution per response token: (ids, log-probs),
    /// the same K for every token.
    pub teacher_topk: Option<Vec<(Vec<u32>, Vec<f32>)>>,
    pub policy_version: i64,
    /// With `--hint-replay`: the row's opening prompt and hint ([`super::replay`]).
    pub replay: Option<Arc<ReplaySource>>,
    /// Made by training itself (a hint replay, an anchor, a self-imitation), not
    /// an input row: its loss adds to the batch's instead of taking a share of
    /// the rows' weight.
    pub auxiliary: bool,
}

impl TrainSample {
    /// Whether the sample moves the RL loss: reward 0 and no teacher means no signal.
    pub fn has_rl_signal(&self) -> bool {
        self.reward.is_some_and(|r| r != 0.0)
            || self.teacher_logprobs.is_some()
            || self.teacher_topk.is_some()
    }

    /// The teacher's top-K ids as a (tokens, K) tensor for gathering, after
    /// checking that they line up with the response.
    fn topk_ids(&self, device: &candle_core::Device) -> Result<Option<Tensor>> {
        let Some(topk) = &self.teacher_topk else {
            return Ok(None);
        };
        let k = topk.first().map_or(0, |(ids, _)| ids.len());
        anyhow::ensure!(
            topk.len() == self.response_ids.len()
                && k > 0
                && topk.iter().all(|(ids, lps)| ids.len() == k && lps.len() == k),
            "sample {}: the teacher's top-K has {} rows for {} response tokens (or rows of unequal K)",
            self.sample_id,
            topk.len(),
            self.response_ids.len()
        );
        let flat: Vec<u32> = topk
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        Ok(Some(Tensor::from_vec(flat, (topk.len(), k), device)?))
    }

    fn sequence(&self) -> Sequence<'_> {
        Sequence {
            prompt: &self.prompt_ids,
            response: &self.response_ids,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainerConfig {
    pub objective: Objective,
    pub loss: LossConfig,
    pub optim: AdamWConfig,
    /// Global grad-norm clip (0 = off).
    pub grad_clip: f64,
    /// LoRA settings; None trains every weight.
    pub lora: Option<LoraConfig>,
    pub seed: u64,
    /// Padded tokens per forward/backward pass (memory bound); the step's
    /// gradient is the same for any value.
    pub micro_batch_tokens: usize,
    /// Optimizer updates per batch (PPO's epochs): every update after the first
    /// measures its ratio against the log-probs of the first, so the clip bounds
    /// how far one batch moves the policy. Each update is one step (one policy
    /// version).
    pub updates_per_batch: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Rl,
            loss: LossConfig::default(),
            optim: AdamWConfig::default(),
            grad_clip: 1.0,
            lora: Some(LoraConfig::default()),
            seed: 0,
            micro_batch_tokens: 2048,
            updates_per_batch: 1,
        }
    }
}

/// Metrics of one step (also a line of the metrics file).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f32,
    pub pg_loss: f32,
    pub kl: f32,
    pub mean_reward: f32,
    pub mean_abs_advantage: f32,
    pub clip_fraction: f32,
    pub grad_norm: f64,
    pub samples: usize,
    /// `--hint-replay` samples trained besides `samples` (their tokens count in `tokens`).
    pub replayed: usize,
    /// `--anchor` samples trained besides `samples` (their tokens count in `tokens`).
    pub anchored: usize,
    /// `--self-imitation` samples trained besides `samples` (their tokens count in `tokens`).
    pub imitated: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub max_staleness: i64,
}

enum Trainable {
    Lora(Adapter),
    /// Every parameter is a Var inside `decoder`.
    Full {
        decoder: Box<Decoder>,
        vars: Vec<(String, Var)>,
    },
}

/// What the first update of a batch computed for the later ones.
#[derive(Default)]
struct PassInputs {
    /// logp_old: the policy's log-probs before the batch's first update.
    old: Option<Vec<Vec<f32>>>,
    /// The reference model's log-probs (for the KL penalty).
    reference: Option<Vec<Vec<f32>>>,
    /// The batch's rewards against the baseline, fixed for all its updates.
    rewards: Vec<Option<f32>>,
}

pub struct Trainer {
    pub config: TrainerConfig,
    /// Float weights in the Hugging Face layout; with LoRA also the reference.
    base: Decoder,
    trainable: Trainable,
    optim: AdamW,
    /// The rewards of the last batches, for `--reward-baseline recent`.
    recent_rewards: RecentRewards,
}

impl Trainer {
    /// A trainer for `decoder` (any weight format: it is dequantized to f32 and
    /// put in the HF layout). With `adapter`, training continues from it.
    pub fn new(decoder: &Decoder, config: TrainerConfig, adapter: Option<Adapter>) -> Result<Self> {
        let base = decoder
            .to_float()?
            .to_hf_layout()?
            .without_lora()
            .with_kernels(Kernels::Differentiable);
        let (trainable, named_vars) = match &config.lora {
            Some(lora) => {
                let adapter = match adapter {
                    Some(a) => a,
                    None => Adapter::new(&base, lora.clone(), config.seed)?,
                };
                let vars = adapter.named_vars();
                (Trainable::Lora(adapter), vars)
            }
            None => {
                anyhow::ensure!(
                    adapter.is_none(),
                    "full fine-tuning does not take a LoRA adapter"
                );
                let mut vars = Vec::new();
                let decoder = base.map_parameters(|name, t| {
                    let var = Var::from_tensor(t)?;
                    let tensor = var.as_tensor().clone();
                    vars.push((name.to_string(), var));
                    Ok(tensor)
                })?;
                (
                    Trainable::Full {
                        decoder: Box::new(decoder),
                        vars: vars.clone(),
                    },
                    vars,
                )
            }
        };
        let optim = AdamW::new(named_vars, config.optim)?;
        Ok(Self {
            config,
            base,
            trainable,
            optim,
            recent_rewards: RecentRewards::default(),
        })
    }

    /// Steps taken (the policy version of the current weights).
    pub fn steps(&self) -> u64 {
        self.optim.steps()
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optim
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        match &self.trainable {
            Trainable::Lora(a) => Some(a),
            Trainable::Full { .. } => None,
        }
    }

    /// Every trainable tensor with its checkpoint name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        match &self.trainable {
            Trainable::Lora(a) => a.named_vars(),
            Trainable::Full { vars, .. } => vars.clone(),
        }
    }

    fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// The policy with gradients flowing to the trainable tensors.
    pub fn policy(&self) -> Result<Decoder> {
        match &self.trainable {
            Trainable::Lora(adapter) => adapter.apply(&self.base),
            Trainable::Full { decoder, .. } => Ok(decoder.as_ref().clone()),
        }
    }

    /// The current policy's values with no graph (for logp_old and serving-like use).
    pub fn frozen_policy(&self) -> Result<Decoder> {
        match &self.trainable {
            Trainable::Lora(adapter) => {
                let mut out = self.base.clone();
                let scale = adapter.config.scale();
                for p in &adapter.pairs {
                    let delta =
                        LoraDelta::new(p.a.as_tensor().detach(), p.b.as_tensor().detach(), scale)?;
                    out.set_lora(p.layer, p.name, Some(delta))?;
                }
                Ok(out)
            }
            Trainable::Full { decoder, .. } => decoder.map_parameters(|_, t| Ok(t.detach())),
        }
    }

    /// The reference policy for the KL term: the base weights (adapter off).
    pub fn reference(&self) -> &Decoder {
        &self.base
    }

    /// A batch's first pass: its rewards against the baseline (`recent` holds
    /// the batch's own rewards already).
    fn pass_inputs(&self, batch: &[TrainSample], recent: &RecentRewards) -> PassInputs {
        let rewards: Vec<Option<f32>> = batch.iter().map(|s| s.reward).collect();
        let baseline = self.config.loss.reward_baseline;
        PassInputs {
            rewards: baseline.apply_to(&rewards, &row_rewards(batch), recent),
            ..Default::default()
        }
    }

    /// Loss and summed gradients of `batch` (per-sample token mean, then batch
    /// mean), without updating anything.
    pub fn gradients(&self, batch: &[TrainSample]) -> Result<(GradSum, StepMetrics)> {
        // Not a step: the batch is all the recent baseline sees.
        let mut seen = RecentRewards::default();
        seen.push(&row_rewards(batch));
        let mut inputs = self.pass_inputs(batch, &seen);
        let (grads, metrics, _) = self.update_gradients(batch, &mut inputs)?;
        Ok((grads, metrics))
    }

    /// [`Trainer::gradients`] for one of a batch's updates. The first update
    /// fills `inputs` (logp_old, the reference's log-probs) for the later ones,
    /// and returns the detached log-probs it computed.
    fn update_gradients(
        &self,
        batch: &[TrainSample],
        inputs: &mut PassInputs,
    ) -> Result<(GradSum, StepMetrics, Vec<Vec<f32>>)> {
        anyhow::ensure!(!batch.is_empty(), "empty batch");
        let seqs: Vec<Sequence> = batch.iter().map(TrainSample::sequence).collect();
        let budget = self.config.micro_batch_tokens;
        let rl = self.config.objective == Objective::Rl;
        // logp_old is the policy's log-prob before the batch's first update. For
        // that update it is exactly the value of the grad-tracking pass below
        // (detached): a separate no-grad forward would cost a third of the step
        // for the same numbers. The ratio is then 1 with the gradient of
        // logp_new. Later updates keep the first one's values.
        if inputs.reference.is_none() && rl && self.config.loss.beta_kl > 0.0 {
            inputs.reference = Some(score::score(&self.base, &seqs, budget)?);
        }
        let reference = inputs.reference.as_ref();
        for sample in batch {
            if let Some(t) = &sample.teacher_logprobs {
                anyhow::ensure!(
                    t.len() == sample.response_ids.len(),
                    "sample {}: {} teacher log-probs for {} response tokens",
                    sample.sample_id,
                    t.len(),
                    sample.response_ids.len()
                );
            }
        }

        let policy = self.policy()?;
        let vars = self.vars();
        let mut grads = GradSum::default();
        let mut metrics = StepMetrics {
            samples: batch.len(),
            tokens: batch.iter().map(|s| s.response_ids.len()).sum(),
            ..Default::default()
        };
        // Each input row weighs 1/rows; auxiliary samples weigh as much as a
        // row and add to the loss, so turning on --anchor or --hint-replay does
        // not shrink the rows' own step.
        let rows = batch.iter().filter(|s| !s.auxiliary).count().max(1);
        let inv_batch = 1.0 / rows as f64;
        let mut computed = vec![Vec::new(); batch.len()];
        let rewards = &inputs.rewards;
        let topk_ids = batch
            .iter()
            .map(|s| match rl && self.config.loss.w_topk != 0.0 {
                true => s.topk_ids(self.base.device()),
                false => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        for group in score::token_groups(&seqs, budget) {
            let new = score::response_logprobs_and(
                &policy,
                &seqs[group.clone()],
                &topk_ids[group.clone()],
                budget,
            )?;
            let mut total: Option<Tensor> = None;
            for (offset, (new_i, student_topk)) in new.iter().enumerate() {
                let i = group.start + offset;
                let sample = &batch[i];
                computed[i] = new_i.to_vec1()?;
                let (loss_i, stats) = if rl {
                    let old = match &inputs.old {
                        Some(old) => &old[i],
                        None => &computed[i],
                    };
                    let signal = SampleSignal {
                        reward: rewards[i],
                        teacher: sample.teacher_logprobs.as_deref(),
                        old,
                        reference: reference.map(|r| r[i].as_slice()),
                    };
                    let (pg, stats) = loss::policy_loss(&self.config.loss, new_i, &signal)?;
                    match (student_topk, &sample.teacher_topk) {
                        (Some(student), Some(teacher)) => {
                            let teacher: Vec<Vec<f32>> =
                                teacher.iter().map(|(_, lps)| lps.clone()).collect();
                            let distill = loss::topk_distill_loss(student, &teacher)?;
                            let weighted = (distill * f64::from(self.config.loss.w_topk))?;
                            ((pg + weighted)?, stats)
                        }
                        _ => (pg, stats),
                    }
                } else {
                    let l = loss::nll_loss(new_i)?;
                    let stats = SampleStats {
                        pg_loss: l.to_scalar()?,
                        ..Default::default()
                    };
                    (l, stats)
                };
                metrics.loss += loss_i.to_scalar::<f32>()? / rows as f32;
                metrics.pg_loss += stats.pg_loss / batch.len() as f32;
                metrics.kl += stats.kl / batch.len() as f32;
                metrics.mean_abs_advantage += stats.mean_abs_advantage / batch.len() as f32;
                metrics.clip_fraction += stats.clip_fraction / batch.len() as f32;
                let scaled = (loss_i * inv_batch)?;
                total = Some(match total {
                    Some(t) => (t + scaled)?,
                    None => scaled,
                });
            }
            let total = total.context("empty micro-batch")?;
            let store = total.backward()?;
            grads.add(&store, &vars)?;
        }
        let rewards: Vec<f32> = row_rewards(batch).into_iter().flatten().collect();
        if !rewards.is_empty() {
            metrics.mean_reward = rewards.iter().sum::<f32>() / rewards.len() as f32;
        }
        Ok((grads, metrics, computed))
    }

    /// Trains on `batch`: `updates_per_batch` optimisation steps. The metrics are
    /// the first update's (the batch as the policy found it), with the last
    /// update's clip fraction (how far the batch moved the policy).
    pub fn step(&mut self, batch: &[TrainSample]) -> Result<StepMetrics> {
        let started = Instant::now();
        let before = self.steps() as i64;
        self.recent_rewards.push(&row_rewards(batch));
        let mut inputs = self.pass_inputs(batch, &self.recent_rewards);
        let mut first: Option<StepMetrics> = None;
        for _ in 0..self.config.updates_per_batch.max(1) {
            let (mut grads, mut metrics, logps) = self.update_gradients(batch, &mut inputs)?;
            metrics.grad_norm = grads.clip(self.config.grad_clip)?;
            anyhow::ensure!(
                metrics.grad_norm.is_finite(),
                "the gradient norm is {} at step {}: refusing to update (lower --lr?)",
                metrics.grad_norm,
                self.steps() + 1
            );
            self.optim.step(&grads)?;
            inputs.old.get_or_insert(logps);
            match &mut first {
                Some(first) => first.clip_fraction = metrics.clip_fraction,
                None => first = Some(metrics),
            }
        }
        let mut metrics = first.context("no update ran")?;
        metrics.step = self.steps();
        metrics.max_staleness = batch
            .iter()
            .filter(|s| !s.auxiliary)
            .map(|s| before - s.policy_version)
            .max()
            .unwrap_or(0);
        metrics.seconds = started.elapsed().as_secs_f64();
        metrics.tokens_per_s = metrics.tokens as f64 / metrics.seconds.max(1e-9);
        Ok(metrics)
    }

    /// Full fine-tuning: every parameter under its Hugging Face name, for a
    /// checkpoint (Q/K already in the HF layout).
    pub fn full_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.trainable {
            Trainable::Full { decoder, .. } => decoder.parameters(),
            Trainable::Lora(_) => anyhow::bail!("a LoRA trainer has no full parameters"),
        }
    }
}

/// The judged rewards of a batch's input rows, in order (None: no reward);
/// auxiliary samples are left out: they are not new judgements.
fn row_rewards(batch: &[TrainSample]) -> Vec<Option<f32>> {
    batch
        .iter()
        .filter(|s| !s.auxiliary)
        .map(|s| s.reward)
        .collect()
}
