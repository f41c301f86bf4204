//! `claw train`: the CLI face of [`crate::train`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::daemon::{Stage, WatchArgs};
use crate::distill::{HintPlacement, TeacherWeights};
use crate::train::driver::RunSummary;
use crate::train::run::{keep_freed_memory, Run, RunConfig};
use crate::train::{LossConfig, Objective, RewardBaseline, StepMetrics};
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
    /// RL), batch-mean (A = r − the batch's mean reward: only the contrast
    /// between replies teaches, so all-negative batches do not wear the model
    /// down) or recent (A = r − the mean of the last 32 rewards: for batches too
    /// small to hold a contrast).
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
    /// Optimizer updates per batch (PPO's epochs, rl objective): later updates
    /// take their ratio against the first's log-probs, so --eps-low/--eps-high
    /// bound how far one batch moves the policy. Each update is a step and a
    /// policy version; the checkpoint is written after the batch's last.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub updates_per_batch: u16,
    /// Also train each rewarded reply that answered a correction as the reply to
    /// the prompt the corrected reply had (hindsight: what the user accepted in
    /// the end demonstrates what they wanted at first). A row counts when its
    /// messages end with a user message right after an assistant reply, so use
    /// this only where such a message is a correction, not a new question (the
    /// persona benchmark's users).
    #[arg(long)]
    pub hindsight: bool,
    /// Replay each hint on N other prompts: for every sample that carries a
    /// hint (from distill-hints), the current policy answers N other prompts
    /// users opened sessions with, and the policy with the hint in context is
    /// their teacher (on-policy distillation). For hints that state a standing
    /// preference ("keep it short"), never for task-specific ones ("check the
    /// file first"): one correction then teaches N + 1 replies. On SmolLM2's
    /// persona runs it did not speed learning, and made brief replies empty
    /// (BENCHMARKS.md). 0 = off.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub hint_replay: usize,
    /// Where the --hint-replay teacher reads the hint (as distill-hints --hint-at).
    #[arg(long, value_enum, default_value_t = HintPlacement::End, value_name = "WHERE")]
    pub hint_at: HintPlacement,
    /// Longest --hint-replay reply, in tokens.
    #[arg(long, default_value_t = 256, value_name = "TOKENS")]
    pub hint_replay_tokens: usize,
    /// Which weights read the replayed hint: `policy`, the current weights (as
    /// distill-hints --teacher policy), or `base`, the base model, a teacher
    /// that does not move with the student.
    #[arg(long, value_enum, default_value_t = TeacherWeights::Policy, value_name = "WEIGHTS")]
    pub hint_replay_teacher: TeacherWeights,
    /// Keep the base model's answers on N anchor prompts a step: the current
    /// policy answers N prompts from --anchor-prompts and the base model's
    /// log-probs of those replies are their teacher (on-policy distillation
    /// towards the base model). A style learned from users' corrections (shorter,
    /// one paragraph) otherwise spreads to prompts where it costs answers, such
    /// as worked maths; a --beta-kl penalty on the users' own prompts holds
    /// back the style itself. Measured on SmolLM2's persona runs: alone it kept
    /// no more gsm8k than no anchor; with --anchor-topk 8 it kept the answers
    /// and undid the style (BENCHMARKS.md). 0 = off.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub anchor: usize,
    /// The --anchor prompts: a text file, one prompt per line (`#` comments).
    /// Default: a built-in set of worked maths problems, facts and conversions.
    #[arg(long, value_name = "FILE")]
    pub anchor_prompts: Option<PathBuf>,
    /// Longest --anchor reply, in tokens.
    #[arg(long, default_value_t = 256, value_name = "TOKENS")]
    pub anchor_tokens: usize,
    /// Also distill the base model's top-K distribution at every --anchor reply
    /// token (weighted by --w-topk), not only its log-prob of the token sampled:
    /// it names the tokens the base model would have written.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub anchor_topk: usize,
    /// Train N accepted replies of earlier steps again each step (self-imitation):
    /// a reply with a judged reward above 0 is kept (the last 16) and replayed,
    /// the least replayed first, with its reward measured against the same
    /// --reward-baseline as the step's rows, so with `recent` the push fades as
    /// accepted replies become the rule. Rejected replies are not replayed.
    /// Needs --objective rl and --w-rl above 0. On SmolLM2's persona runs (N = 2)
    /// it did not speed learning and raised perplexity on held-out text by 22-57%
    /// (BENCHMARKS.md). 0 = off.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub self_imitation: usize,
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
    /// Also write each adapter as GGUF LoRA (adapter-NNNNNN.gguf beside its
    /// safetensors), the format llama.cpp's server loads with --lora; removed
    /// with its checkpoint by --keep.
    #[arg(long)]
    pub gguf: bool,
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

impl TrainArgs {
    /// The run's settings (after `--watch` has set out, resume and save-every).
    fn run_config(mut self) -> RunConfig {
        self.inputs.append(&mut self.data);
        RunConfig {
            inputs: self.inputs,
            model: self.model,
            base_weights: self.base_weights,
            init: self.init,
            out: self.out,
            objective: self.objective,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            full: self.full,
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            lora_targets: self.lora_targets,
            loss: LossConfig {
                w_rl: self.w_rl,
                w_opd: self.w_opd,
                teacher_clip: self.teacher_clip,
                eps_low: self.eps_low,
                eps_high: self.eps_high,
                beta_kl: self.beta_kl,
                reward_baseline: self.reward_baseline,
                w_topk: self.w_topk,
            },
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            micro_batch_tokens: self.micro_batch_tokens,
            updates_per_batch: self.updates_per_batch.into(),
            hindsight: self.hindsight,
            hint_replay: self.hint_replay,
            hint_at: self.hint_at,
            hint_replay_tokens: self.hint_replay_tokens,
            hint_replay_teacher: self.hint_replay_teacher,
            anchor: self.anchor,
            anchor_prompts: self.anchor_prompts,
            anchor_tokens: self.anchor_tokens,
            anchor_topk: self.anchor_topk,
            self_imitation: self.self_imitation,
            max_steps: self.max_steps,
            max_staleness: self.max_staleness,
            epochs: self.epochs,
            save_every: self.save_every,
            keep: self.keep,
            resume: self.resume,
            seq_len: self.seq_len,
            eval: self.eval,
            seed: self.seed,
            gguf: self.gguf,
        }
    }
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
    // On an object store the trainer works in a local copy of checkpoints/,
    // resumed from the store's LATEST (taken only once the stage lease is held,
    // inside the daemon loop's start: see TrainDaemon::run).
    let scratch = match daemon.as_ref().map(|cfg| cfg.root().is_remote()) {
        Some(true) => Some(crate::store::ScratchDir::new("train")?),
        _ => None,
    };
    let mirror = match (daemon.as_ref().map(|cfg| cfg.root()), &scratch) {
        (Some(crate::store::Root::Remote(remote)), Some(local)) => {
            let mut mirror = crate::store::checkpoints::Mirror::new(remote, local.path())?;
            mirror.pull(true)?;
            args.out = local.path().to_path_buf();
            Some(std::cell::RefCell::new(mirror))
        }
        _ => None,
    };
    let keep = args.keep;
    let checkpoints = args.out.clone();
    let json = args.json;
    let partial_after = args.partial_after.clone();
    let mut run = Run::start(args.run_config())?;
    if let Some(cfg) = &daemon {
        let partial_after =
            crate::collect::parse_duration_ms(&partial_after).context("--partial-after")?;
        let on_step = |m: &StepMetrics| info!("{}", step_line(m));
        crate::daemon::train::TrainDaemon {
            cfg,
            partial_after: std::time::Duration::from_millis(partial_after.max(0) as u64),
            samples: crate::train::run::row_samples(&run.config, &run.model),
            on_step: &on_step,
            checkpoints,
            mirror: mirror.map(|m| (m, keep)),
        }
        .run(&mut run.driver)?;
        return Ok(());
    }
    let bar = crate::ui::progress_bar(run.config.max_steps, "train");
    let on_step = |m: &StepMetrics| {
        let line = step_line(m);
        if bar.is_hidden() {
            info!("{line}");
        } else {
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", m.loss));
            bar.println(line);
        }
    };
    run.train(&on_step)?;
    bar.finish_and_clear();

    let eval_loss_before = run.eval_loss_before;
    let eval_loss_after = run.eval_loss()?;
    let summary = run.summary();
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
    if summary.samples_replayed > 0 {
        info!(
            "{} replay samples: hints distilled on other openings (--hint-replay)",
            summary.samples_replayed
        );
    }
    if summary.samples_anchored > 0 {
        info!(
            "{} anchor samples: the base model's answers kept on anchor prompts (--anchor)",
            summary.samples_anchored
        );
    }
    if summary.samples_imitated > 0 {
        info!(
            "{} self-imitation samples: accepted replies trained again (--self-imitation)",
            summary.samples_imitated
        );
    }
    if let (Some(before), Some(after)) = (eval_loss_before, eval_loss_after) {
        info!("held-out loss {before:.4} -> {after:.4}");
    }
    match &summary.last_checkpoint {
        Some(path) => info!("checkpoint: {}", path.display()),
        None if summary.steps == 0 => warn!("no step taken: no input sample carried a signal"),
        None => {}
    }
    if json {
        let report = Report {
            run: summary,
            objective: run.config.objective,
            trainable_parameters: run.trainable_parameters,
            eval_loss_before,
            eval_loss_after,
            peak_rss_mb: crate::ui::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            checkpoint_dir: run.config.out.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// One line per optimizer step.
fn step_line(m: &StepMetrics) -> String {
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
