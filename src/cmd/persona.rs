//! `claw eval --bench persona`: its options and the runs over personas × methods.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::distill::hints::HintPlacement;
use crate::distill::TeacherWeights;
use crate::eval::live::Study;
use crate::eval::persona::metrics::{report, satisfaction_chart, RunResult};
use crate::eval::persona::plot::render_png;
use crate::eval::persona::run::{run, Method, RunConfig};
use crate::eval::persona::{persona, Persona, PERSONAS};
use crate::train::RewardBaseline;

/// Options of `--bench persona` (the others: --model, --url, --seed, --max-tokens,
/// --json).
#[derive(Args, Debug, Clone)]
pub struct PersonaArgs {
    /// persona: simulated users to run, comma-separated: no-bold, brief, direct,
    /// ask-back, no-lists, one-paragraph, or all.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all",
        help_heading = "Persona benchmark"
    )]
    pub persona: Vec<String>,

    /// persona, agent: how the loop learns, comma-separated: rl, opd, combined, off
    /// (off trains nothing: the control).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "combined,off",
        help_heading = "Persona benchmark"
    )]
    pub method: Vec<Method>,

    /// persona: training sessions per run (one task; the user's verdict on each
    /// reply, and a correction while one disappoints, up to --max-turns).
    #[arg(
        long,
        default_value_t = 48,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub sessions: usize,

    /// persona, agent: sessions (episodes) per round, and the training batch size; after each
    /// round the user waits until the steps its replies feed are served.
    #[arg(
        long,
        default_value_t = 4,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub batch: usize,

    /// persona: most replies per session. After a reply that breaks the
    /// preference the user says so (a thumbs down and the correction as the next
    /// message) and the model tries again; the first reply is what is measured.
    #[arg(
        long,
        default_value_t = 3,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub max_turns: usize,

    /// persona, agent: held-out tasks asked greedily before and after each run (0 = skip).
    #[arg(
        long,
        default_value_t = 20,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub heldout: usize,

    /// persona, agent: sampling temperature of the training sessions.
    #[arg(long, default_value_t = 0.7, help_heading = "Persona benchmark")]
    pub session_temperature: f32,

    /// persona, agent: learning rate of the LoRA steps.
    #[arg(long, default_value_t = 2e-4, help_heading = "Persona benchmark")]
    pub lr: f64,

    /// persona, agent: weight of the KL penalty (k3, against the base model) in the
    /// training loss: it keeps a policy that finds what the user rewards from
    /// drifting into nonsense that no longer answers.
    #[arg(long, default_value_t = 0.1, help_heading = "Persona benchmark")]
    pub beta_kl: f64,

    /// persona, agent: optimizer updates per training batch (`claw train
    /// --updates-per-batch`, PPO's epochs): more learning from each round, with
    /// the PPO clip bounding how far one batch moves the policy.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16), help_heading = "Persona benchmark")]
    pub updates_per_batch: u16,

    /// persona: also train each accepted retry as the reply to the session's
    /// first prompt (`claw train --hindsight`): the user's correction told the
    /// model what they wanted, and the retry they accepted shows it.
    #[arg(long, help_heading = "Persona benchmark")]
    pub hindsight: bool,

    /// persona, agent: the baseline of the binary reward (see `claw train
    /// --reward-baseline`).
    #[arg(long, value_enum, default_value_t = RewardBaseline::BatchMean, help_heading = "Persona benchmark")]
    pub reward_baseline: RewardBaseline,

    /// persona, agent: with opd and combined, also distill the teacher's top-K
    /// distribution per token (`claw distill-hints --topk K`, weighted by
    /// `claw train --w-topk`): it can teach tokens the model never sampled.
    /// 0 = off.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "K",
        help_heading = "Persona benchmark"
    )]
    pub topk: usize,

    /// persona, agent: with --topk, the weight of the top-K distillation in
    /// the training loss (`claw train --w-topk`).
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "W",
        help_heading = "Persona benchmark"
    )]
    pub w_topk: f32,

    /// persona, agent: with opd and combined, replay each correction on N other
    /// prompts of the run (`claw train --hint-replay`): the policy answers them
    /// and reads the correction as their teacher (the base model with --teacher
    /// base). For standing preferences (the personas), not for the agent's
    /// task-specific hints. 0 = off.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub hint_replay: usize,

    /// persona, agent: with opd and combined, keep the base model's answers on
    /// N anchor prompts a training step (`claw train --anchor`: worked maths,
    /// facts and conversions, none from the retention check), so a learned
    /// style does not cost the model its answers elsewhere. 0 = off.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub anchor: usize,

    /// persona, agent: with --anchor, also distill the base model's top-K
    /// distribution at every anchor reply token (`claw train --anchor-topk`).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "K",
        help_heading = "Persona benchmark"
    )]
    pub anchor_topk: usize,

    /// persona, agent: with rl and combined, train N accepted replies of
    /// earlier steps again each step (`claw train --self-imitation`), measured
    /// against the same reward baseline as the step's rows. 0 = off.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Persona benchmark"
    )]
    pub self_imitation: usize,

    /// persona, agent: with opd and combined, which weights read the hint
    /// (`claw distill-hints --teacher`): `policy`, the adapter that wrote the
    /// reply (OpenClaw-RL's self-distillation), or `base`, the base model, whose
    /// reading of the hint does not drift with what the policy has learned. Use
    /// `base` where few replies are accepted: with none, a policy teacher fed
    /// its own drift back and drove Qwen2.5-0.5B's ask-back runs into
    /// collapse (BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = TeacherWeights::Policy, help_heading = "Persona benchmark")]
    pub teacher: TeacherWeights,

    /// persona, agent: with opd and combined, where the teacher reads the hint
    /// (`claw distill-hints --hint-at`). Default: persona `before` (above the
    /// user's message: appended after it, a correction is what the policy
    /// teacher answers, echoing "That's too long." instead of answering), agent
    /// `end` (after the tool's output, right before the reply).
    #[arg(long, value_enum, help_heading = "Persona benchmark")]
    pub hint_at: Option<HintPlacement>,

    /// persona, agent: seconds to wait for each training step a round feeds before going on.
    #[arg(
        long,
        default_value_t = 300.0,
        value_name = "SECONDS",
        help_heading = "Persona benchmark"
    )]
    pub round_timeout: f64,

    /// persona, agent: keep each run's `claw up` directory under DIR (default: a
    /// temporary one, removed after the run).
    #[arg(long, value_name = "DIR", help_heading = "Persona benchmark")]
    pub keep_data: Option<PathBuf>,

    /// persona, agent: skip the retention check (each trained run's final adapter
    /// against the base model on gsm8k-mini, facts-mini and ppl-mini, as
    /// `claw eval --bench retention` does; a few minutes per run on SmolLM2).
    #[arg(long, help_heading = "Persona benchmark")]
    pub no_retention: bool,

    /// persona, agent: the retention check asks only the first N gsm8k-mini problems and
    /// facts-mini questions (a quicker, noisier check).
    #[arg(long, value_name = "N", help_heading = "Persona benchmark")]
    pub retention_limit: Option<usize>,

    /// persona: an LLM judge that reads each held-out question and reply and says
    /// whether the reply answers it (3 votes): a local GGUF (a model larger than
    /// the one trained, e.g. Qwen2.5-0.5B for SmolLM2) or an OpenAI-compatible
    /// URL (http://...). The report's Helpfulness section then shows the share
    /// of helpful replies before and after training.
    #[arg(
        long,
        value_name = "MODEL.gguf|URL",
        help_heading = "Persona benchmark"
    )]
    pub helpfulness_judge: Option<String>,

    /// persona, agent: write the report into DIR: persona.md, persona.json
    /// (every session) and persona.png (satisfaction over sessions); for agent,
    /// agent.md, agent.json (every episode) and agent.png (success over episodes).
    #[arg(long, value_name = "DIR", help_heading = "Persona benchmark")]
    pub report: Option<PathBuf>,
}

impl PersonaArgs {
    /// The settings persona and agent runs share, from these options and
    /// `claw eval`'s (--model, --url, --seed, --max-tokens).
    pub fn study(
        &self,
        model: Option<PathBuf>,
        url: Option<String>,
        seed: u64,
        max_tokens: usize,
    ) -> Result<Study> {
        anyhow::ensure!(
            self.retention_limit != Some(0),
            "--retention-limit must be at least 1"
        );
        // A running `claw up` (--url) keeps its adapters to itself.
        let retention = match self.no_retention || url.is_some() {
            true => None,
            false => {
                let mut settings = crate::eval::retention::Settings::builtin()?;
                if let Some(n) = self.retention_limit {
                    settings = settings.limit(n);
                }
                settings.seed = seed;
                Some(crate::eval::retention::Check::new(settings))
            }
        };
        Ok(Study {
            model,
            batch: self.batch,
            heldout: self.heldout,
            temperature: self.session_temperature,
            max_tokens,
            lr: self.lr,
            beta_kl: self.beta_kl,
            updates_per_batch: self.updates_per_batch.into(),
            hindsight: self.hindsight,
            reward_baseline: self.reward_baseline,
            topk: self.topk,
            w_topk: self.w_topk,
            hint_replay: self.hint_replay,
            anchor: self.anchor,
            anchor_topk: self.anchor_topk,
            self_imitation: self.self_imitation,
            teacher: self.teacher,
            hint_at: self.hint_at,
            seed,
            round_timeout: Duration::from_secs_f64(self.round_timeout.max(1.0)),
            data_dir: self.keep_data.clone(),
            url,
            retention,
            helpfulness: self
                .helpfulness_judge
                .as_deref()
                .map(crate::eval::helpful::JudgeSpec::parse),
        })
    }
}

/// Runs every (persona, method) pair; prints the table (or JSON) and writes the report.
pub fn run_all(
    args: &PersonaArgs,
    model: Option<PathBuf>,
    url: Option<String>,
    seed: u64,
    max_tokens: Option<usize>,
    json: bool,
) -> Result<Vec<RunResult>> {
    let personas: Vec<&'static Persona> = match args.persona.iter().any(|p| p == "all") {
        true => PERSONAS.iter().collect(),
        false => args
            .persona
            .iter()
            .map(|name| {
                persona(name).with_context(|| {
                    format!(
                        "--persona {name}: unknown (choose from {}, or all)",
                        PERSONAS.map(|p| p.name).join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    anyhow::ensure!(
        args.sessions > 0 && args.batch > 0 && args.max_turns > 0,
        "--sessions, --batch and --max-turns must be at least 1"
    );
    let methods: Vec<Method> = match &url {
        // A running `claw up` trains however it was started: one run per persona.
        Some(_) => vec![Method::Combined],
        None => args.method.clone(),
    };
    let cfg = RunConfig {
        study: args.study(model, url, seed, max_tokens.unwrap_or(128))?,
        sessions: args.sessions,
        max_turns: args.max_turns,
    };
    crate::eval::live::stop_on_ctrl_c();
    let mut results = Vec::new();
    let mut verdicts = crate::eval::helpful::Verdicts::default();
    for p in &personas {
        for &m in &methods {
            if crate::daemon::wake::stop_requested() {
                break;
            }
            crate::info!(
                "persona {} ({}), method {}: {} sessions",
                p.name,
                p.preference,
                m.name(),
                cfg.sessions
            );
            let bar = crate::ui::progress_bar(
                Some(cfg.sessions as u64),
                &format!("{} {}", p.name, m.name()),
            );
            let satisfied = std::cell::Cell::new(0usize);
            let result = run(p, m, &cfg, &mut verdicts, &|s| {
                satisfied.set(satisfied.get() + usize::from(s.satisfied));
                let line = format!(
                    "session {:>3} policy v{:<3} {} {}",
                    s.index,
                    s.policy_version,
                    if s.satisfied {
                        "satisfied  "
                    } else {
                        "unsatisfied"
                    },
                    s.task
                );
                if bar.is_hidden() {
                    crate::debug!("{line}");
                } else {
                    bar.inc(1);
                    bar.set_message(format!("{} satisfied", satisfied.get()));
                }
            })
            .with_context(|| format!("persona {} with method {}", p.name, m.name()))?;
            bar.finish_and_clear();
            crate::info!(
                "persona {} {}: 3-in-a-row at session {}, held-out {:.0}% -> {:.0}%, policy v{}, {:.1} min",
                result.persona,
                result.method,
                result
                    .sessions_to_success
                    .map_or("never".into(), |k| k.to_string()),
                100.0 * result.heldout_before,
                100.0 * result.heldout_after,
                result.final_policy_version,
                result.seconds / 60.0
            );
            results.push(result);
            if let Some(dir) = &args.report {
                // Written after every run: an interrupted study keeps what it finished.
                write_report(dir, &results, &super::command_line())?;
            }
        }
    }
    let table = report(&results, &super::command_line(), None);
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let mut out = std::io::stdout().lock();
        for line in table.lines().filter(|l| l.starts_with('|')) {
            if line.starts_with("| persona | method | metric |") {
                writeln!(out)?; // the retention table
            }
            writeln!(out, "{line}")?;
        }
    }
    anyhow::ensure!(
        !crate::daemon::wake::stop_requested(),
        "stopped by a signal: the table and the report hold the runs as far as they went"
    );
    Ok(results)
}

/// Writes persona.md, persona.json and persona.png for `results` into `dir`;
/// `command` is the command line the report names.
pub fn write_report(dir: &std::path::Path, results: &[RunResult], command: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let png = render_png(&satisfaction_chart(results))?;
    crate::fsutil::write_atomic(&dir.join("persona.png"), &png)?;
    crate::fsutil::write_atomic(
        &dir.join("persona.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    crate::fsutil::write_atomic(
        &dir.join("persona.md"),
        report(results, command, Some("persona.png")).as_bytes(),
    )?;
    Ok(())
}
