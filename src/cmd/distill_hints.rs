//! `claw distill-hints`: the CLI face of [`crate::distill`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::llm::LlmArgs;
use crate::daemon::{self, Stage, WatchArgs};
use crate::distill::hints::{HintPlacement, Select};
use crate::distill::{
    DistillConfig, DistillStats, Distiller, HintJudge, HintSource, TeacherWeights,
    DEFAULT_HINT_PROMPT, HINT_PROMPT_VARS,
};
use crate::llm::prompt::PromptTemplate;
use crate::llm::VoteRunner;
use crate::model::{resolve_model_path, Model, WeightFormat};
use crate::rollout::{RolloutReader, RolloutWriter};

/// Extract hindsight hints and compute teacher log-probs under them.
#[derive(Args, Debug)]
#[command(long_about = "\
Extract hindsight hints from what followed each turn, and score the student's own
response under a context that includes the hint (on-policy distillation).

Reads: samples (Parquet, claw.rollout.v1; files, globs, directories, or - for
stdin), usually from `claw judge`. Writes: the same rows, in the same order, with
hint, hint_candidates_json and teacher_logprobs (one per response token; and with
--topk K, teacher_topk_ids / teacher_topk_logprobs) on the rows that got a hint.
Every other row and column passes through unchanged.

For each row with a next state (docs/ARCHITECTURE.md, \"Hindsight hints and distillation\"):
  1. Hint: with --hint-source judge (default), the hint judge reads the response
     and the next state and answers \\boxed{1} with a 1-3 sentence hint in
     [HINT_START]...[HINT_END], or \\boxed{-1}. Hints from positive votes longer
     than 10 characters are kept and one is chosen (--select). With feedback,
     the user's own words are the hint: feedback_text, else the next state of a
     turn the judge scored -1 (useful when the judge model is as small as the
     served one). `both` prefers feedback and asks the judge elsewhere.
  2. Teacher context: the turn's messages with
     \"\\n\\n[user's hint / instruction]\\n\" + hint appended to the last user
     message, rendered with the chat template.
  3. Teacher log-probs: the same model scores the student's response_ids under
     that context in one teacher-forced pass, with the adapter that produced
     the response (policy_version, from --checkpoints) or the base (--teacher base).

Examples:
  claw judge samples.parquet | claw distill-hints -o distilled.parquet
  claw distill-hints judged.parquet --hint-source feedback -o distilled.parquet
  claw distill-hints judged.parquet --judge-url http://127.0.0.1:8000/v1 --votes 3
  claw distill-hints --watch claw-data   # daemon: claw-data/judged -> claw-data/distilled")]
pub struct DistillHintsArgs {
    /// Sample files, glob patterns, directories, or - for stdin (the default).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// Output file (written atomically); - or nothing means stdout.
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    pub output: String,

    /// Where hints come from.
    #[arg(long, value_enum, default_value_t = HintSource::Judge)]
    pub hint_source: HintSource,

    /// Which accepted hint to use.
    #[arg(long, value_enum, default_value_t = Select::Longest)]
    pub select: Select,

    /// Where the teacher reads the hint: `end` puts it last, right before the reply
    /// (on the last message if the user wrote it, else in a new user message after
    /// a tool result); `last-user` appends it to the last user message wherever it
    /// is (OpenClaw-RL's placement). They differ only for turns that answer a tool.
    /// `before` puts it at the start of the last user message, above what the
    /// user asked: a conversational correction placed after the message is what
    /// a small policy teacher answers (it echoes "That's too long." instead of
    /// answering); `claw eval --bench persona` uses it.
    #[arg(long, value_enum, default_value_t = HintPlacement::End)]
    pub hint_at: HintPlacement,

    /// Hint-judge calls per turn (m).
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub votes: usize,

    /// The hint-judge prompt file (default: the built-in prompts/hint-judge.txt).
    #[arg(long, value_name = "FILE")]
    pub prompt: Option<PathBuf>,

    /// Print the built-in hint-judge prompt and exit.
    #[arg(long)]
    pub print_prompt: bool,

    /// The model whose log-probs are the teacher's (the served base model).
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,

    /// Score with the adapter that produced each response, or the base model.
    #[arg(long, value_enum, default_value_t = TeacherWeights::Policy)]
    pub teacher: TeacherWeights,

    /// How the teacher holds its weights: packed GGUF blocks (serve's kernels,
    /// the same log-probs as f32 up to the order of additions, about a fifth of
    /// the memory) or f32.
    #[arg(long, value_enum, default_value_t = WeightFormat::default())]
    pub weights: WeightFormat,

    /// Where `claw train` writes adapters (adapter-NNNNNN.safetensors); default
    /// ./claw-data/checkpoints, or DIR/checkpoints with --watch DIR.
    #[arg(long, value_name = "DIR")]
    pub checkpoints: Option<PathBuf>,

    /// Also store the teacher's top-K distribution per token; `claw train`
    /// then distills it too (KL to the student, weighted by --w-topk), which
    /// teaches tokens the student did not sample.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub topk: usize,

    /// Recompute rows that already have teacher log-probs.
    #[arg(long)]
    pub redo: bool,

    /// Longest response or next state shown to the hint judge (characters; the
    /// middle is cut).
    #[arg(long, default_value_t = 4000)]
    pub max_judge_chars: usize,

    #[command(flatten)]
    pub llm: LlmArgs,

    /// Print the summary as one JSON object: on stdout with -o FILE, else on stderr.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub daemon: WatchArgs,
}

#[derive(Serialize)]
struct Summary<'a> {
    #[serde(flatten)]
    stats: &'a DistillStats,
    accepted: u64,
    judge_calls: u64,
    judge_failed_calls: u64,
    judge_tokens_per_s: Option<f64>,
    teacher_tokens_per_s: Option<f64>,
    seconds: f64,
}

pub fn run(args: DistillHintsArgs) -> Result<()> {
    if args.print_prompt {
        print!("{DEFAULT_HINT_PROMPT}");
        return Ok(());
    }
    let daemon = args.daemon.config(Stage::Distill, &args.inputs)?;
    anyhow::ensure!(
        daemon.is_none() || args.output == "-",
        "--watch writes DIR/distilled/; drop -o"
    );
    let options = args.llm.call_options(args.votes)?;
    let judge = match args.hint_source {
        HintSource::Feedback => None,
        HintSource::Judge | HintSource::Both => {
            let prompt = match &args.prompt {
                Some(path) => PromptTemplate::load(path, &HINT_PROMPT_VARS)?,
                None => PromptTemplate::parse(
                    DEFAULT_HINT_PROMPT,
                    "built-in prompt",
                    &HINT_PROMPT_VARS,
                )?,
            };
            let runner = VoteRunner::new(args.llm.connect()?, options)?;
            crate::info!("hint judge: {}", runner.backend().name());
            Some(HintJudge { runner, prompt })
        }
    };
    let model_path = resolve_model_path(args.model.as_deref())?;
    let model = Arc::new(
        Model::load_with(&model_path, args.weights)
            .with_context(|| format!("loading the teacher model {}", model_path.display()))?,
    );
    // On an object store: a private local copy of the adapters it needs.
    let scratch = match (&args.checkpoints, &daemon) {
        (None, Some(cfg)) if cfg.root().is_remote() => {
            Some(crate::store::ScratchDir::new("distill-checkpoints")?)
        }
        _ => None,
    };
    let teacher_dir = match (&args.checkpoints, &daemon, &scratch) {
        (Some(dir), _, _) => dir.clone(),
        (None, _, Some(local)) => local.path().to_path_buf(),
        (None, Some(cfg), None) => cfg.layout.checkpoints(),
        (None, None, _) => PathBuf::from("./claw-data/checkpoints"),
    };
    let config = DistillConfig {
        source: args.hint_source,
        select: args.select,
        placement: args.hint_at,
        topk: args.topk,
        redo: args.redo,
        teacher: args.teacher,
        checkpoints: Some(teacher_dir.clone()),
        max_tokens: 4096,
        max_judge_chars: args.max_judge_chars,
    };
    let mut distiller = Distiller::new(config, model, judge)?;
    let start = Instant::now();
    if let Some(cfg) = daemon {
        // On an object store the teacher adapters are fetched into a local copy
        // of checkpoints/ as the turns name them.
        let fetch = match (&args.checkpoints, cfg.root()) {
            (None, crate::store::Root::Remote(r)) => Some((r.clone(), teacher_dir.clone())),
            _ => None,
        };
        return daemon::segments::run(&cfg, &mut |batch| {
            if let Some((remote, dir)) = &fetch {
                crate::store::checkpoints::fetch_adapters(remote, dir, &batch.batch)?;
            }
            distiller.process(&batch.batch, &batch.source)
        });
    }
    let mut writer = RolloutWriter::create(&args.output)?;
    for batch in RolloutReader::new(&args.inputs)? {
        let batch = batch?;
        let out = distiller.process(&batch, &batch.source)?;
        writer.write(&out)?;
    }
    writer.finish()?;
    let stats = &distiller.stats;
    let summary = Summary {
        stats,
        accepted: stats.accepted(),
        judge_calls: stats.calls.calls,
        judge_failed_calls: stats.calls.failed,
        judge_tokens_per_s: stats.calls.tokens_per_s(),
        teacher_tokens_per_s: (stats.teacher_seconds > 0.0)
            .then(|| stats.teacher_tokens as f64 / stats.teacher_seconds),
        seconds: start.elapsed().as_secs_f64(),
    };
    if args.json {
        let json = serde_json::to_string(&summary)?;
        match args.output.as_str() {
            "-" => eprintln!("{json}"),
            _ => println!("{json}"),
        }
    } else {
        crate::info!(
            "distill-hints: {} rows, {} hints accepted ({} from the judge, {} from feedback); \
             rejected: {} negative, {} too short, {} invalid; {} without a next state, {} already \
             distilled, {} too long; {} judge calls ({} failed) in {:.1} s",
            stats.rows,
            stats.accepted(),
            stats.accepted_from_judge,
            stats.accepted_from_feedback,
            stats.rejected_negative,
            stats.rejected_short,
            stats.rejected_invalid,
            stats.no_hint_source,
            stats.already_distilled,
            stats.too_long,
            stats.calls.calls,
            stats.calls.failed,
            summary.seconds
        );
    }
    Ok(())
}
