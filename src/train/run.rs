//! One `claw train` run as a library call: the model (loaded, or new with
//! `--init`), the trainer (new, or resumed from `LATEST`), the held-out loss
//! before and after, and the epoch loop over rollout files or text windows.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use super::anchor::{self, Anchor, AnchorConfig};
use super::checkpoint::{self, CheckpointDir};
use super::data::{
    batch_row_samples, mean_nll, read_samples, reads_stdin, text_samples, RowSamples,
};
use super::driver::{Driver, DriverConfig, RunSummary};
use super::imitation::SelfImitation;
use super::optim::AdamWConfig;
use super::replay::{HintReplay, ReplayConfig};
use super::{LossConfig, Objective, StepMetrics, TrainSample, Trainer, TrainerConfig};
use crate::adapter::gguf::GgufBase;
use crate::adapter::{Adapter, LoraConfig};
use crate::distill::{HintPlacement, TeacherWeights};
use crate::model::sampling::SamplingParams;
use crate::model::{resolve_model_path, Model, WeightFormat};
use crate::rollout::RolloutReader;
use crate::{info, warn};

/// What to train, from `claw train`'s flags.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Rollout files (globs, directories, `-`); with [`Objective::Lm`] text files.
    pub inputs: Vec<String>,
    /// GGUF base model (resolved as `--model` / `CLAW_MODEL` are).
    pub model: Option<PathBuf>,
    /// Float weights to start from instead of the GGUF's own.
    pub base_weights: Option<PathBuf>,
    /// A JSON config for a new model trained from scratch.
    pub init: Option<PathBuf>,
    /// Checkpoint directory.
    pub out: PathBuf,
    pub objective: Objective,
    /// Samples per gradient batch.
    pub batch_size: usize,
    /// Batches per optimizer step.
    pub grad_accum: usize,
    /// Learning rate; `None`: 1e-3 with `init`, 1e-5 full, 1e-4 LoRA.
    pub lr: Option<f64>,
    /// Train every weight (also implied by `init`).
    pub full: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Linears to adapt, as `--lora-targets` takes them.
    pub lora_targets: String,
    pub loss: LossConfig,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub micro_batch_tokens: usize,
    pub updates_per_batch: usize,
    /// Also train each rewarded reply to a correction as the reply to the
    /// corrected turn's prompt ([`super::data::hindsight_sample`]).
    pub hindsight: bool,
    /// `--hint-replay`: other openings distilled per hinted sample (0 = off).
    pub hint_replay: usize,
    /// Where the replay teacher reads the hint.
    pub hint_at: HintPlacement,
    /// Longest replay reply, in tokens.
    pub hint_replay_tokens: usize,
    /// Which weights read the replayed hint.
    pub hint_replay_teacher: TeacherWeights,
    /// `--anchor`: anchor prompts answered and distilled from the base model per
    /// step (0 = off).
    pub anchor: usize,
    /// The anchor prompts (one per line); None: the built-in set.
    pub anchor_prompts: Option<PathBuf>,
    /// Longest anchor reply, in tokens.
    pub anchor_tokens: usize,
    /// The base model's top-K per anchor reply token (0 = sampled tokens only).
    pub anchor_topk: usize,
    /// `--self-imitation`: accepted replies of earlier steps trained again per
    /// step (0 = off).
    pub self_imitation: usize,
    pub max_steps: Option<u64>,
    pub max_staleness: Option<i64>,
    /// Passes over the input.
    pub epochs: usize,
    pub save_every: u64,
    pub keep: usize,
    /// Continue from `out/LATEST`.
    pub resume: bool,
    /// Token window for [`Objective::Lm`].
    pub seq_len: usize,
    /// Held-out rollout file.
    pub eval: Option<String>,
    pub seed: u64,
    /// Also write each adapter as GGUF LoRA (`adapter-NNNNNN.gguf`) for the base
    /// GGUF, which llama.cpp's server loads with `--lora`.
    pub gguf: bool,
}

/// How a run with `config` reads rollout rows: token ids below `model`'s
/// vocabulary size, and `--hindsight` demonstrations rendered with its template.
pub fn row_samples<'a>(config: &RunConfig, model: &'a Model) -> RowSamples<'a> {
    RowSamples {
        vocab: model.config.vocab_size,
        hindsight: config.hindsight.then_some(model),
        replay: config.hint_replay > 0,
    }
}

/// A run ready to train: the model, and the driver around its trainer.
pub struct Run {
    pub config: RunConfig,
    pub model: Arc<Model>,
    pub driver: Driver,
    pub trainable_parameters: usize,
    eval_samples: Option<Vec<TrainSample>>,
    /// Held-out loss before training.
    pub eval_loss_before: Option<f64>,
}

impl Run {
    /// Loads (or creates) the model, starts or resumes the trainer and measures the
    /// held-out loss.
    pub fn start(config: RunConfig) -> Result<Run> {
        anyhow::ensure!(config.batch_size > 0, "--batch-size must be at least 1");
        anyhow::ensure!(config.grad_accum > 0, "--grad-accum must be at least 1");
        anyhow::ensure!(config.lora_rank > 0, "--lora-rank must be at least 1");
        // Replays and anchors are on-policy distillation: teacher log-probs that
        // only the rl objective's distillation term reads.
        let distills = config.objective == Objective::Rl && config.loss.w_opd != 0.0;
        anyhow::ensure!(
            distills || (config.hint_replay == 0 && config.anchor == 0),
            "--hint-replay and --anchor train by distillation: they need --objective rl \
             (the default) and --w-opd above 0"
        );
        anyhow::ensure!(
            config.self_imitation == 0
                || (config.objective == Objective::Rl && config.loss.w_rl != 0.0),
            "--self-imitation replays accepted replies by their reward: it needs \
             --objective rl (the default) and --w-rl above 0"
        );
        let anchor_prompts = match config.anchor {
            0 => Vec::new(),
            _ => anchor::load_prompts(config.anchor_prompts.as_deref())?,
        };
        // --init: a new model (all weights trained); otherwise the one given.
        let mut gguf_base = None;
        let (mut model, model_spec) = match &config.init {
            Some(init) => super::init::init_model(
                init,
                &config.out,
                config.resume,
                config.base_weights.is_some(),
            )?,
            None => {
                let model_path = resolve_model_path(config.model.as_deref())?;
                if config.gguf {
                    gguf_base = Some(GgufBase::from_model_file(&model_path)?);
                }
                (Model::load_with(&model_path, WeightFormat::F32)?, None)
            }
        };
        let full = config.full || config.init.is_some();
        if let Some(path) = &config.base_weights {
            model.decoder = checkpoint::load_full_weights(&model.decoder, path)?;
            info!("base weights from {}", path.display());
        }
        let lora = match full {
            true => None,
            false => Some(LoraConfig {
                rank: config.lora_rank,
                alpha: config.lora_alpha,
                targets: LoraConfig::parse_targets(&config.lora_targets)?,
            }),
        };
        let trainer_config = TrainerConfig {
            objective: config.objective,
            loss: config.loss,
            optim: AdamWConfig {
                lr: config.lr.unwrap_or(match (config.init.is_some(), full) {
                    (true, _) => 1e-3,
                    (false, true) => 1e-5,
                    (false, false) => 1e-4,
                }),
                weight_decay: config.weight_decay,
                ..Default::default()
            },
            grad_clip: config.grad_clip,
            lora,
            seed: config.seed,
            micro_batch_tokens: config.micro_batch_tokens,
            updates_per_batch: config.updates_per_batch,
        };
        anyhow::ensure!(
            !config.gguf || (!full && config.base_weights.is_none()),
            "--gguf writes LoRA adapters for the GGUF base model: not with --full, --init \
             or --base-weights"
        );
        let mut checkpoints = CheckpointDir::create(&config.out)?;
        if let Some(base) = gguf_base {
            checkpoints = checkpoints.with_gguf(base);
        }
        let trainer = start_trainer(&model, trainer_config, &checkpoints, config.resume)?;
        let trainable_parameters: usize = trainer
            .named_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        info!(
            "training {} ({}, {} trainable parameters) from step {}, objective {:?}, lr {}",
            model.name,
            if full { "full" } else { "LoRA" },
            trainable_parameters,
            trainer.steps(),
            config.objective,
            trainer.config.optim.lr
        );

        let vocab = model.config.vocab_size;
        let eval_samples = match &config.eval {
            Some(path) => {
                let how = RowSamples {
                    vocab,
                    hindsight: None,
                    replay: false,
                };
                Some(read_samples(std::slice::from_ref(path), how)?)
            }
            None => None,
        };
        let eval_loss_before = match &eval_samples {
            Some(s) => Some(mean_nll(&trainer, s)?),
            None => None,
        };

        let mut driver = Driver::new(
            trainer,
            DriverConfig {
                batch_size: config.batch_size * config.grad_accum,
                max_steps: config.max_steps,
                max_staleness: config.max_staleness,
                save_every: config.save_every,
                keep: config.keep,
                max_sequence: model.config.context_length - 1,
                base_model: model.name.clone(),
            },
            Some(checkpoints),
        );
        driver.set_model_spec(model_spec);
        let model = Arc::new(model);
        if config.hint_replay > 0 {
            driver.set_replay(HintReplay::new(
                ReplayConfig {
                    per_hint: config.hint_replay,
                    placement: config.hint_at,
                    teacher: config.hint_replay_teacher,
                    max_tokens: config.hint_replay_tokens,
                    temperature: SamplingParams::default().temperature,
                    seed: config.seed,
                },
                model.clone(),
            ));
        }
        if config.anchor > 0 {
            driver.set_anchor(Anchor::new(
                AnchorConfig {
                    per_step: config.anchor,
                    max_tokens: config.anchor_tokens,
                    topk: config.anchor_topk,
                    temperature: SamplingParams::default().temperature,
                    seed: config.seed,
                },
                model.clone(),
                &anchor_prompts,
            )?);
            info!(
                "anchor: {} prompts, {} a step (--anchor)",
                anchor_prompts.len(),
                config.anchor
            );
        }
        if config.self_imitation > 0 {
            driver.set_imitation(SelfImitation::new(config.self_imitation));
        }
        Ok(Run {
            config,
            model,
            driver,
            trainable_parameters,
            eval_samples,
            eval_loss_before,
        })
    }

    /// Trains on the inputs for the configured epochs (or until `max_steps`),
    /// then on the final partial batch; `on_step` sees every step's metrics.
    pub fn train(&mut self, on_step: &dyn Fn(&StepMetrics)) -> Result<()> {
        let config = &self.config;
        let how = row_samples(config, &self.model);
        let driver = &mut self.driver;
        for epoch in 0..config.epochs.max(1) {
            if driver.done() {
                break;
            }
            if epoch > 0 {
                anyhow::ensure!(
                    !reads_stdin(&config.inputs),
                    "--epochs > 1 needs file inputs (stdin can be read once)"
                );
            }
            match config.objective {
                Objective::Lm => {
                    for sample in text_samples(&self.model, &config.inputs, config.seq_len)? {
                        if let Some(m) = driver.push(sample)? {
                            on_step(&m);
                        }
                        if driver.done() {
                            break;
                        }
                    }
                }
                _ => {
                    for batch in RolloutReader::new(&config.inputs)? {
                        let batch = batch?;
                        for (i, row) in batch.rows()?.into_iter().enumerate() {
                            for sample in batch_row_samples(&batch, i, &row, how)? {
                                if let Some(m) = driver.push(sample)? {
                                    on_step(&m);
                                }
                                if driver.done() {
                                    break;
                                }
                            }
                            if driver.done() {
                                break;
                            }
                        }
                        if driver.done() {
                            break;
                        }
                    }
                }
            }
        }
        if let Some(m) = driver.finish()? {
            on_step(&m);
        }
        Ok(())
    }

    /// Held-out loss under the current weights (`None` without held-out samples).
    pub fn eval_loss(&self) -> Result<Option<f64>> {
        match &self.eval_samples {
            Some(s) => Ok(Some(mean_nll(&self.driver.trainer, s)?)),
            None => Ok(None),
        }
    }

    /// What the run did.
    pub fn summary(&self) -> &RunSummary {
        &self.driver.summary
    }
}

/// Tells glibc to keep freed memory in the process. A step frees and reallocates
/// the same gigabytes of activations; by default glibc hands large blocks back to
/// the OS and the next step faults them in again, zero-filled by the kernel:
/// `perf` put 38% of a step there, and these settings made the step 1.6x faster
/// (BENCHMARKS.md, training step).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before training allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

/// A new trainer, or with --resume the one LATEST names (adapter + optimizer state).
fn start_trainer(
    model: &Model,
    config: TrainerConfig,
    checkpoints: &CheckpointDir,
    resume: bool,
) -> Result<Trainer> {
    if !resume {
        return Trainer::new(&model.decoder, config, None);
    }
    anyhow::ensure!(
        config.lora.is_some(),
        "--resume continues a LoRA adapter; it does not apply to --full"
    );
    let Some(path) = checkpoints.latest()? else {
        warn!(
            "--resume: {} has no LATEST checkpoint yet; starting a new adapter",
            checkpoints.path().display()
        );
        return Trainer::new(&model.decoder, config, None);
    };
    let (adapter, file_config) = Adapter::load(&path, &model.device)?;
    let mut config = config;
    // The adapter's own shape wins over the command line's.
    config.lora = Some(adapter.config.clone());
    let mut trainer = Trainer::new(&model.decoder, config, Some(adapter))?;
    let restored =
        checkpoint::load_optimizer_state(&path, trainer.optimizer_mut(), file_config.claw_step)?;
    if !restored {
        warn!(
            "{}: no optimizer state beside it; AdamW moments start from zero",
            path.display()
        );
        trainer.optimizer_mut().set_steps(file_config.claw_step);
    }
    info!(
        "resuming from {} (step {})",
        path.display(),
        file_config.claw_step
    );
    Ok(trainer)
}
