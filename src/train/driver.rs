//! The training loop around [`Trainer`]: takes samples one at a time (from files
//! or a pipe), drops those without a signal or too stale, steps whenever a batch
//! is full, and writes checkpoints and metrics.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::anchor::Anchor;
use super::checkpoint::CheckpointDir;
use super::imitation::SelfImitation;
use super::replay::HintReplay;
use super::trainer::{Objective, StepMetrics, TrainSample, Trainer};

/// Loop settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Stop after this many steps (counting from the resumed step).
    pub max_steps: Option<u64>,
    /// Drop samples generated more than this many steps before the current weights.
    pub max_staleness: Option<i64>,
    /// Write a checkpoint every N steps (and always after the last).
    pub save_every: u64,
    /// Checkpoints to keep.
    pub keep: usize,
    /// Longest prompt + response a sample may have (longer ones are skipped).
    pub max_sequence: usize,
    /// Name recorded as the adapter's base model.
    pub base_model: String,
}

/// Why samples were not trained on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Skipped {
    /// reward 0 (or none) and no teacher log-probs: nothing to learn (RL only).
    pub no_signal: u64,
    /// policy_version lags the trainer by more than --max-staleness.
    pub stale: u64,
    /// empty prompt or response ids.
    pub empty: u64,
    /// longer than the model's context.
    pub too_long: u64,
}

/// What a run did, for the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub first_step: u64,
    pub samples_seen: u64,
    pub samples_trained: u64,
    /// `--hint-replay` samples made and trained on (not in samples_trained).
    pub samples_replayed: u64,
    /// `--anchor` samples made and trained on (not in samples_trained).
    pub samples_anchored: u64,
    /// `--self-imitation` replays of accepted replies (not in samples_trained).
    pub samples_imitated: u64,
    pub tokens_trained: u64,
    pub skipped: Skipped,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub last_checkpoint: Option<PathBuf>,
}

pub struct Driver {
    pub trainer: Trainer,
    config: DriverConfig,
    checkpoints: Option<CheckpointDir>,
    pending: Vec<TrainSample>,
    pub summary: RunSummary,
    last_saved_step: u64,
    /// Daemon mode: the consumption ledger the next checkpoint records.
    ledger: Option<serde_json::Value>,
    /// Sample ids trained on since the last checkpoint (recorded with the ledger).
    trained_since_save: Vec<String>,
    /// The model's spec (JSON) for full checkpoints of a from-scratch model.
    model_spec: Option<String>,
    /// `--hint-replay`: more distilled samples for each hinted one.
    replay: Option<HintReplay>,
    /// `--anchor`: the base model's answers kept on a fixed prompt set.
    anchor: Option<Anchor>,
    /// `--self-imitation`: accepted replies of earlier steps, trained again.
    imitation: Option<SelfImitation>,
}

impl Driver {
    pub fn new(trainer: Trainer, config: DriverConfig, checkpoints: Option<CheckpointDir>) -> Self {
        let first = trainer.steps();
        Self {
            trainer,
            config,
            checkpoints,
            pending: Vec::new(),
            summary: RunSummary {
                first_step: first,
                ..Default::default()
            },
            last_saved_step: first,
            ledger: None,
            trained_since_save: Vec::new(),
            model_spec: None,
            replay: None,
            anchor: None,
            imitation: None,
        }
    }

    /// Every step also distills each hinted sample's hint on other openings.
    pub fn set_replay(&mut self, replay: HintReplay) {
        self.replay = Some(replay);
    }

    /// Every step also distills the base model onto the policy's answers to
    /// anchor prompts.
    pub fn set_anchor(&mut self, anchor: Anchor) {
        self.anchor = Some(anchor);
    }

    /// Every step also trains accepted replies of earlier steps again.
    pub fn set_imitation(&mut self, imitation: SelfImitation) {
        self.imitation = Some(imitation);
    }

    /// Full checkpoints will record this model spec (`claw train --init`), so
    /// they load on their own with `Model::load`.
    pub fn set_model_spec(&mut self, spec: Option<String>) {
        self.model_spec = spec;
    }

    /// Sets what the next checkpoint records as consumed (daemon mode); the ids
    /// of the samples trained since the previous checkpoint are added as `samples`.
    pub fn set_ledger(&mut self, ledger: serde_json::Value) {
        self.ledger = Some(ledger);
    }

    /// Samples waiting for a batch to fill.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Trains on the samples waiting, even if fewer than a batch (daemon mode,
    /// when input has gone quiet).
    pub fn step_partial(&mut self) -> Result<Option<StepMetrics>> {
        match self.pending.is_empty() || self.done() {
            true => Ok(None),
            false => self.step().map(Some),
        }
    }

    /// Whether `--max-steps` is reached (the caller stops reading).
    pub fn done(&self) -> bool {
        self.config
            .max_steps
            .is_some_and(|max| self.summary.steps >= max)
    }

    /// Offers one sample; returns the step's metrics when it completed a batch.
    pub fn push(&mut self, sample: TrainSample) -> Result<Option<StepMetrics>> {
        self.summary.samples_seen += 1;
        // Every row's opening counts for replay, trained on or not.
        if let (Some(replay), Some(source)) = (&mut self.replay, &sample.replay) {
            replay.remember(source);
        }
        let skipped = &mut self.summary.skipped;
        if sample.prompt_ids.is_empty() || sample.response_ids.is_empty() {
            skipped.empty += 1;
            return Ok(None);
        }
        if sample.prompt_ids.len() + sample.response_ids.len() > self.config.max_sequence {
            skipped.too_long += 1;
            return Ok(None);
        }
        if self.trainer.config.objective == Objective::Rl {
            if !sample.has_rl_signal() {
                skipped.no_signal += 1;
                return Ok(None);
            }
            if let Some(max) = self.config.max_staleness {
                if self.trainer.steps() as i64 - sample.policy_version > max {
                    skipped.stale += 1;
                    return Ok(None);
                }
            }
        }
        self.pending.push(sample);
        if self.pending.len() >= self.config.batch_size && !self.done() {
            return self.step().map(Some);
        }
        Ok(None)
    }

    /// Trains on what is left (a partial batch) and writes the final checkpoint.
    pub fn finish(&mut self) -> Result<Option<StepMetrics>> {
        let last = match !self.pending.is_empty() && !self.done() {
            true => Some(self.step()?),
            false => None,
        };
        if self.trainer.steps() > self.last_saved_step {
            self.save(last.as_ref())?;
        }
        if self.summary.train_seconds > 0.0 {
            self.summary.tokens_per_s =
                self.summary.tokens_trained as f64 / self.summary.train_seconds;
        }
        Ok(last)
    }

    fn step(&mut self) -> Result<StepMetrics> {
        let mut batch = std::mem::take(&mut self.pending);
        let pushed = batch.len();
        let max = self.config.max_sequence;
        // Replays, anchors and imitations train with the batch but were never
        // input rows.
        let replayed = match &mut self.replay {
            Some(replay) => replay.samples(&self.trainer, &batch, max)?,
            None => Vec::new(),
        };
        let anchored = match &mut self.anchor {
            Some(anchor) => anchor.samples(&self.trainer, max)?,
            None => Vec::new(),
        };
        let imitated = self
            .imitation
            .as_mut()
            .map(SelfImitation::samples)
            .unwrap_or_default();
        let extra = (replayed.len(), anchored.len(), imitated.len());
        batch.extend(replayed.into_iter().chain(anchored).chain(imitated));
        let mut metrics = self.trainer.step(&batch)?;
        let batch = &batch[..pushed];
        if let Some(imitation) = &mut self.imitation {
            imitation.remember(batch);
        }
        metrics.samples = pushed;
        (metrics.replayed, metrics.anchored, metrics.imitated) = extra;
        self.summary.samples_replayed += metrics.replayed as u64;
        self.summary.samples_anchored += metrics.anchored as u64;
        self.summary.samples_imitated += metrics.imitated as u64;
        if self.ledger.is_some() {
            self.trained_since_save
                .extend(batch.iter().map(|s| s.sample_id.clone()));
        }
        let s = &mut self.summary;
        s.steps += self.trainer.config.updates_per_batch.max(1) as u64;
        s.samples_trained += batch.len() as u64;
        s.tokens_trained += metrics.tokens as u64;
        s.train_seconds += metrics.seconds;
        s.first_loss.get_or_insert(metrics.loss);
        s.last_loss = Some(metrics.loss);
        if let Some(dir) = &self.checkpoints {
            dir.append_metrics(&metrics)?;
        }
        if metrics.step - self.last_saved_step >= self.config.save_every.max(1) {
            self.save(Some(&metrics))?;
        }
        Ok(metrics)
    }

    fn save(&mut self, metrics: Option<&StepMetrics>) -> Result<()> {
        let Some(dir) = &self.checkpoints else {
            return Ok(());
        };
        let step = self.trainer.steps();
        let ledger = self.ledger.as_ref().map(|l| {
            let mut l = l.clone();
            l["samples"] = serde_json::json!(self.trained_since_save);
            l
        });
        let path = match self.trainer.adapter() {
            Some(adapter) => dir.save_with_ledger(
                adapter,
                &self.config.base_model,
                step,
                metrics,
                Some(self.trainer.optimizer()),
                ledger.as_ref(),
            )?,
            None => dir.save_full(
                &self.trainer.full_parameters()?,
                step,
                self.model_spec.as_deref(),
            )?,
        };
        dir.prune(self.config.keep)?;
        self.trained_since_save.clear();
        self.last_saved_step = step;
        self.summary.last_checkpoint = Some(path);
        Ok(())
    }
}
