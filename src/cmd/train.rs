//! `claw train`: the CLI face of [`crate::train`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::adapter::{Adapter, LoraConfig};
use crate::daemon::{Stage, WatchArgs};
use crate::model::score::{self, Sequence};
use crate::model::{resolve_model_path, Model, WeightFormat};
use crate::rollout::{RolloutReader, RolloutRow};
use crate::train::checkpoint::{self, CheckpointDir};
use crate::train::driver::{Driver, DriverConfig, RunSummary};
use crate::train::optim::AdamWConfig;
use crate::train::{LossConfig, Objective, RewardBaseline, TrainSample, Trainer, TrainerConfig};
use crate::{info, warn};

/// Update the model (LoRA or full) from judged or distilled samples.
#[derive(Args, Debug)]
#[command(long_about = "\
Update the model from samples: LoRA adapters (default) or every weight (--full).

Reads: rollout files (claw.rollout.v1; files, globs, directories, or - / a pipe for
stdin) with prompt_ids, response_ids and a signal: `reward` from `claw judge`
and/or `teacher_logprobs` from `claw distill-hints`. With --objective lm: plain
text files. Writes: DIR/adapter-NNNNNN.safetensors (PEFT tensor names) with
adapter-NNNNNN.json (PEFT config + step metrics) and .optim.safetensors (AdamW
state for --resume), then DIR/LATEST, which `claw serve` hot-loads; one JSON line
per step in DIR/metrics.jsonl. Every file is written atomically.

Objectives:
  rl   (default) per token A = w_rl*reward + w_opd*clip(teacher - old, ±c);
       PPO-clipped ratio (eps 0.2 / 0.28) and optional k3 KL to the base model.
       Samples with reward 0 and no teacher log-probs carry no signal and are
       skipped, as are samples older than --max-staleness steps.
  sft  next-token loss on the recorded responses.
  lm   next-token loss on plain text, in windows of --seq-len tokens.

A batch is --batch-size samples; the gradient is the batch mean of per-sample
token means, computed in micro-batches of --micro-batch-tokens padded tokens
(memory), then clipped to --grad-clip and applied by AdamW (weight decay on
matrices only). A final partial batch is trained on too. A sample longer than
--micro-batch-tokens (an agent's turn after a 12k-token system prompt) runs alone:
its earlier positions are read without a graph as fixed context (keys and
values), and the gradient flows through its last --micro-batch-tokens positions
(all of the response, if longer), so memory follows the budget, not the length.

Examples:
  claw collect claw-data/raw/*.parquet | claw judge | claw train --out claw-data/checkpoints
  claw train distilled.parquet --out ckpt --max-steps 100 --save-every 10
  claw train --objective sft chats.parquet --eval held-out.parquet --lr 2e-4
  claw train --resume --out claw-data/checkpoints judged/*.parquet
  claw train --watch claw-data          # daemon: claw-data/distilled -> claw-data/checkpoints")]
pub struct TrainArgs {
    /// Input samples (rollout files, globs, directories; - or nothing for stdin).
    /// With --objective lm: text files.
    pub inputs: Vec<String>,
    /// GGUF base model.
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,
    /// Float weights (safetensors, Hugging Face names) to start from instead of the
    /// GGUF's own: a `model-NNNNNN.safetensors` of `--full`, or a float checkpoint
    /// of the same architecture. The GGUF still gives the tokenizer and shapes.
    #[arg(long, value_name = "FILE")]
    pub base_weights: Option<PathBuf>,
    /// Create a new model from this JSON config and train every weight from
    /// scratch (e.g. `--objective lm`). Keys: tokenizer ("bytes" or "gguf:PATH"),
    /// hidden_size, num_layers, num_heads, [num_kv_heads, intermediate_size,
    /// context_length 512, rope_theta, rms_norm_eps 1e-6, init_std 0.02, seed,
    /// tie_embeddings, residual: "standard" | "attnres-full" | "attnres-block:S"].
    /// Checkpoints carry the config: `claw chat/serve/eval --model OUT` load them.
    #[arg(long, value_name = "CONFIG.json")]
    pub init: Option<PathBuf>,
    /// Text files to train on (the same as listing them as inputs).
    #[arg(long, value_name = "TEXT")]
    pub data: Vec<String>,
    /// Checkpoint directory (LATEST, adapters, metrics.jsonl).
    #[arg(long, default_value = "./claw-data/checkpoints")]
    pub out: PathBuf,
    /// What to optimise.
    #[arg(long, value_enum, default_value_t = Objective::Rl)]
    pub objective: Objective,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Batches whose gradients are summed before one optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Learning rate [default: 1e-4 with LoRA, 1e-5 with --full].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Train every weight instead of a LoRA adapter (writes model-NNNNNN.safetensors;
    /// `claw serve` hot-loads adapters only).
    #[arg(long)]
    pub full: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Linears to adapt: some of q,k,v,o,gate,up,down, or all.
    #[arg(long, default_value = "all")]
    pub lora_targets: String,
    /// Weight of the reward in the advantage.
    #[arg(long, default_value_t = 1.0)]
    pub w_rl: f32,
    /// Weight of the teacher gap (on-policy distillation) in the advantage.
    #[arg(long, default_value_t = 1.0)]
    pub w_opd: f32,
    /// Weight of top-K distillation (KL from the teacher's top-K distribution
    /// to the student, per token) for samples that carry one (`claw
    /// distill-hints --topk K`); 0 ignores it.
    #[arg(long, default_value_t = 1.0)]
    pub w_topk: f32,
    /// Clip of the per-token teacher gap.
    #[arg(long, default_value_t = 1.0)]
    pub teacher_clip: f32,
    /// PPO ratio clip below 1.
    #[arg(long, default_value_t = 0.2)]
    pub eps_low: f32,
    /// PPO ratio clip above 1.
    #[arg(long, default_value_t = 0.28)]
    pub eps_high: f32,
    /// Weight of the k3 KL penalty to the base model (0 = off, and no reference pass).
    #[arg(long, default_value_t = 0.0)]
    pub beta_kl: f32,
    /// Baseline subtracted from the rewards: none (A = r, OpenClaw-RL's binary
    /// RL) or batch-mean (A = r − the batch's mean reward: only the contrast
    /// between replies teaches, so all-negative batches do not wear the model down).
    #[arg(long, value_enum, default_value_t = RewardBaseline::None)]
    pub reward_baseline: RewardBaseline,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Padded tokens per forward/backward pass, and the positions of a longer
    /// sample that carry gradient: lower it if memory is short.
    #[arg(long, default_value_t = 2048)]
    pub micro_batch_tokens: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Drop samples whose policy_version lags the current step by more than this.
    #[arg(long)]
    pub max_staleness: Option<i64>,
    /// Passes over the input (sft and lm with file inputs).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Write a checkpoint every N steps (the last step is always saved).
    #[arg(long, default_value_t = 1)]
    pub save_every: u64,
    /// Checkpoints to keep in --out.
    #[arg(long, default_value_t = 5)]
    pub keep: usize,
    /// Continue from the adapter and optimizer state that --out/LATEST names.
    #[arg(long)]
    pub resume: bool,
    /// Token window for --objective lm.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Held-out samples (rollout file): report their mean response NLL before and
    /// after training.
    #[arg(long)]
    pub eval: Option<String>,
    /// Seed of the adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the run summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Daemon mode: the folder of DIR to train from (distilled, or judged when
    /// distill-hints does not run).
    #[arg(
        long,
        value_name = "FOLDER",
        default_value = "distilled",
        help_heading = "Daemon mode"
    )]
    pub from: String,
    /// Daemon mode: train on a partial batch once no new input came for this long
    /// (so a quiet deployment still learns).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        help_heading = "Daemon mode"
    )]
    pub partial_after: String,
    #[command(flatten)]
    pub daemon: WatchArgs,
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    run: &'a RunSummary,
    objective: Objective,
    trainable_parameters: usize,
    eval_loss_before: Option<f64>,
    eval_loss_after: Option<f64>,
    peak_rss_mb: Option<f64>,
    checkpoint_dir: PathBuf,
}

pub fn run(mut args: TrainArgs) -> Result<()> {
    keep_freed_memory();
    let daemon = args
        .daemon
        .config(Stage::Train, &args.inputs)?
        .map(|mut cfg| {
            cfg.input = args.from.clone();
            cfg
        });
    if let Some(cfg) = &daemon {
        anyhow::ensure!(
            !args.full && args.objective == Objective::Rl,
            "--watch trains LoRA adapters with the rl objective (what serve hot-loads); \
             --full, sft and lm are for runs over files"
        );
        crate::rollout::validate_writer_id(&args.from).context("--from")?;
        // The daemon continues from DIR/checkpoints/LATEST and saves every step:
        // each checkpoint is both a new policy for serve and the ledger of its inputs.
        args.out = cfg.output_dir();
        args.resume = true;
        args.save_every = 1;
    }
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.grad_accum > 0, "--grad-accum must be at least 1");
    anyhow::ensure!(args.lora_rank > 0, "--lora-rank must be at least 1");
    // --init: a new model (all weights trained); otherwise the one given.
    let (mut model, model_spec) = match &args.init {
        Some(init) => crate::train::init::init_model(
            init,
            &args.out,
            args.resume,
            args.base_weights.is_some(),
        )?,
        None => {
            let model_path = resolve_model_path(args.model.as_deref())?;
            (Model::load_with(&model_path, WeightFormat::F32)?, None)
        }
    };
    args.inputs.append(&mut args.data);
    let full = args.full || args.init.is_some();
    if let Some(path) = &args.base_weights {
        model.decoder = checkpoint::load_full_weights(&model.decoder, path)?;
        info!("base weights from {}", path.display());
    }
    let lora = match full {
        true => None,
        false => Some(LoraConfig {
            rank: args.lora_rank,
            alpha: args.lora_alpha,
            targets: LoraConfig::parse_targets(&args.lora_targets)?,
        }),
    };
    let config = TrainerConfig {
        objective: args.objective,
        loss: LossConfig {
            w_rl: args.w_rl,
            w_opd: args.w_opd,
            teacher_clip: args.teacher_clip,
            eps_low: args.eps_low,
            eps_high: args.eps_high,
            beta_kl: args.beta_kl,
            reward_baseline: args.reward_baseline,
            w_topk: args.w_topk,
        },
        optim: AdamWConfig {
            lr: args.lr.unwrap_or(match (args.init.is_some(), full) {
                (true, _) => 1e-3,
                (false, true) => 1e-5,
                (false, false) => 1e-4,
            }),
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        grad_clip: args.grad_clip,
        lora,
        seed: args.seed,
        micro_batch_tokens: args.micro_batch_tokens,
    };
    let checkpoints = CheckpointDir::create(&args.out)?;
    let trainer = start_trainer(&model, config, &checkpoints, args.resume)?;
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
        args.objective,
        trainer.config.optim.lr
    );

    let vocab = model.config.vocab_size;
    let eval_samples = match &args.eval {
        Some(path) => Some(read_samples(std::slice::from_ref(path), vocab)?),
        None => None,
    };
    let eval_loss_before = match &eval_samples {
        Some(s) => Some(mean_nll(&trainer, s)?),
        None => None,
    };

    let mut driver = Driver::new(
        trainer,
        DriverConfig {
            batch_size: args.batch_size * args.grad_accum,
            max_steps: args.max_steps,
            max_staleness: args.max_staleness,
            save_every: args.save_every,
            keep: args.keep,
            max_sequence: model.config.context_length - 1,
            base_model: model.name.clone(),
        },
        Some(checkpoints),
    );
    driver.set_model_spec(model_spec);
    if let Some(cfg) = &daemon {
        let partial_after =
            crate::collect::parse_duration_ms(&args.partial_after).context("--partial-after")?;
        let on_step = |m: &crate::train::StepMetrics| info!("{}", step_line(m));
        crate::daemon::train::TrainDaemon {
            cfg,
            partial_after: std::time::Duration::from_millis(partial_after.max(0) as u64),
            to_sample: &|row| train_sample(row, vocab),
            on_step: &on_step,
        }
        .run(&mut driver)?;
        return Ok(());
    }
    let bar = crate::ui::progress_bar(args.max_steps, "train");
    let on_step = |m: &crate::train::StepMetrics| {
        let line = step_line(m);
        if bar.is_hidden() {
            info!("{line}");
        } else {
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", m.loss));
            bar.println(line);
        }
    };
    for epoch in 0..args.epochs.max(1) {
        if driver.done() {
            break;
        }
        if epoch > 0 {
            anyhow::ensure!(
                !reads_stdin(&args.inputs),
                "--epochs > 1 needs file inputs (stdin can be read once)"
            );
        }
        match args.objective {
            Objective::Lm => {
                for sample in text_samples(&model, &args.inputs, args.seq_len)? {
                    if let Some(m) = driver.push(sample)? {
                        on_step(&m);
                    }
                    if driver.done() {
                        break;
                    }
                }
            }
            _ => {
                for batch in RolloutReader::new(&args.inputs)? {
                    let batch = batch?;
                    for (i, row) in batch.rows()?.into_iter().enumerate() {
                        let sample = train_sample(&row, vocab).with_context(|| {
                            sample_at(&batch.source, batch.first_row + i as u64, &row)
                        })?;
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
            }
        }
    }
    if let Some(m) = driver.finish()? {
        on_step(&m);
    }
    bar.finish_and_clear();

    let eval_loss_after = match &eval_samples {
        Some(s) => Some(mean_nll(&driver.trainer, s)?),
        None => None,
    };
    let summary = &driver.summary;
    let skipped = &summary.skipped;
    info!(
        "{} steps on {} of {} samples ({} tokens, {:.0} tok/s); skipped: {} without signal, {} stale, {} empty, {} too long",
        summary.steps,
        summary.samples_trained,
        summary.samples_seen,
        summary.tokens_trained,
        summary.tokens_per_s,
        skipped.no_signal,
        skipped.stale,
        skipped.empty,
        skipped.too_long
    );
    if let (Some(before), Some(after)) = (eval_loss_before, eval_loss_after) {
        info!("held-out loss {before:.4} -> {after:.4}");
    }
    match &summary.last_checkpoint {
        Some(path) => info!("checkpoint: {}", path.display()),
        None if summary.steps == 0 => warn!("no step taken: no input sample carried a signal"),
        None => {}
    }
    if args.json {
        let report = Report {
            run: summary,
            objective: args.objective,
            trainable_parameters,
            eval_loss_before,
            eval_loss_after,
            peak_rss_mb: crate::ui::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            checkpoint_dir: args.out.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Tells glibc to keep freed memory in the process. A step frees and reallocates
/// the same gigabytes of activations; by default glibc hands large blocks back to
/// the OS and the next step faults them in again, zero-filled by the kernel:
/// `perf` put 38% of a step there, and these settings made the step 1.6x faster
/// (BENCHMARKS.md, training step).
fn keep_freed_memory() {
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

/// One line per optimizer step.
fn step_line(m: &crate::train::StepMetrics) -> String {
    format!(
        "step {} loss {:.4} reward {:+.2} |A| {:.3} clip {:.2} grad {:.3} {} tok in {:.1}s ({:.0} tok/s)",
        m.step,
        m.loss,
        m.mean_reward,
        m.mean_abs_advantage,
        m.clip_fraction,
        m.grad_norm,
        m.tokens,
        m.seconds,
        m.tokens_per_s
    )
}

fn reads_stdin(inputs: &[String]) -> bool {
    inputs.is_empty() || inputs.iter().any(|i| i == "-")
}

/// `FILE: row N (sample ID)`, for errors about one row (`index` from 0).
fn sample_at(source: &str, index: u64, row: &RolloutRow) -> String {
    format!("{source}: row {} (sample {})", index + 1, row.sample_id)
}

/// The training view of a rollout row; every token id must be one of the
/// model's `vocab` (else the error names the field and the id).
fn train_sample(row: &RolloutRow, vocab: usize) -> Result<TrainSample> {
    let to_ids = |v: &[i32], field: &str| -> Result<Vec<u32>> {
        v.iter()
            .enumerate()
            .map(|(k, &id)| match u32::try_from(id) {
                Ok(u) if (u as usize) < vocab => Ok(u),
                Ok(_) => anyhow::bail!(
                    "`{field}`[{k}] = {id} is outside the model's vocabulary ({vocab} tokens): \
                     were these ids made with another model's tokenizer?"
                ),
                Err(_) => anyhow::bail!("`{field}`[{k}] = {id} is a negative token id"),
            })
            .collect()
    };
    Ok(TrainSample {
        sample_id: row.sample_id.clone(),
        prompt_ids: to_ids(&row.prompt_ids, "prompt_ids")?,
        response_ids: to_ids(&row.response_ids, "response_ids")?,
        reward: row.reward,
        teacher_logprobs: row.teacher_logprobs.clone(),
        teacher_topk: match (&row.teacher_topk_ids, &row.teacher_topk_logprobs) {
            (Some(ids), Some(lps)) => Some(
                ids.iter()
                    .zip(lps)
                    .enumerate()
                    .map(|(t, (ids, lps))| {
                        Ok((to_ids(ids, &format!("teacher_topk_ids[{t}]"))?, lps.clone()))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => None,
        },
        policy_version: row.policy_version,
    })
}

fn read_samples(inputs: &[String], vocab: usize) -> Result<Vec<TrainSample>> {
    let mut out = Vec::new();
    for batch in RolloutReader::new(inputs)? {
        let batch = batch?;
        for (i, row) in batch.rows()?.into_iter().enumerate() {
            out.push(
                train_sample(&row, vocab)
                    .with_context(|| sample_at(&batch.source, batch.first_row + i as u64, &row))?,
            );
        }
    }
    Ok(out)
}

/// Mean over samples of the per-token NLL of the response under the current policy.
fn mean_nll(trainer: &Trainer, samples: &[TrainSample]) -> Result<f64> {
    let seqs: Vec<Sequence> = samples
        .iter()
        .filter(|s| !s.prompt_ids.is_empty() && !s.response_ids.is_empty())
        .map(|s| Sequence {
            prompt: &s.prompt_ids,
            response: &s.response_ids,
        })
        .collect();
    anyhow::ensure!(
        !seqs.is_empty(),
        "--eval: no sample with prompt and response ids"
    );
    let scores = score::score(
        &trainer.frozen_policy()?,
        &seqs,
        trainer.config.micro_batch_tokens,
    )?;
    let per_sample: Vec<f64> = scores
        .iter()
        .map(|lp| -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64)
        .collect();
    Ok(per_sample.iter().sum::<f64>() / per_sample.len() as f64)
}

/// Plain text as language-modelling samples: the tokens of each file in windows
/// of `seq_len` (the first token is the prompt, the rest are predicted).
fn text_samples(model: &Model, inputs: &[String], seq_len: usize) -> Result<Vec<TrainSample>> {
    anyhow::ensure!(seq_len >= 2, "--seq-len must be at least 2");
    anyhow::ensure!(
        seq_len < model.config.context_length,
        "--seq-len {seq_len} must be below the model's context length {}",
        model.config.context_length
    );
    anyhow::ensure!(
        !inputs.is_empty(),
        "--objective lm needs text files to read"
    );
    let mut out = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("cannot read text file {input}"))?;
        let ids = model
            .tokenizer
            .encode(&text)
            .with_context(|| format!("{input}: tokenizing"))?;
        for (i, window) in ids.chunks(seq_len).enumerate() {
            if window.len() < 2 {
                continue;
            }
            out.push(TrainSample {
                sample_id: format!("{input}#{i}"),
                prompt_ids: window[..1].to_vec(),
                response_ids: window[1..].to_vec(),
                ..Default::default()
            });
        }
    }
    Ok(out)
}
