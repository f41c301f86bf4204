//! `claw judge`: the CLI face of [`crate::judge`].

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::llm::LlmArgs;
use crate::daemon::{self, Stage, WatchArgs};
use crate::judge::{
    env, Judge, JudgeConfig, PrmFactory, PrmJudge, Source, DEFAULT_PRM_PROMPT, MAX_FIELD_CHARS,
    PRM_VARS,
};
use crate::llm::prompt::PromptTemplate;
use crate::llm::VoteRunner;
use crate::rollout::{RolloutReader, RolloutWriter};

fn long_about() -> String {
    let mut rules = String::new();
    for r in env::RULES {
        rules.push_str(&hanging(&format!("  {:<16}", r.name), r.describe, 80));
    }
    format!(
        "\
Score each main turn +1, 0 or -1, from the first source (in --sources order) that
can say something about it:

  feedback  explicit feedback on the turn (the `feedback` column, thumbs +1/-1)
            is the reward.
  env       the next state is a tool result that reports an error caused by the
            action: -1 (rules below). A tool result without an error is not
            scored here: it goes on to the next source.
  prm       an LLM judge reads the response and the next state (with its role)
            and answers, thinking step by step, \\boxed{{1}} (progress), \\boxed{{-1}}
            (correction, redo, rephrase, or an error caused by the action) or
            \\boxed{{0}} (ambiguous). It is asked --votes times (temperature 0.6); the
            last \\boxed{{}} of a reply is its vote, a reply without one (or a call
            that failed after its retries) is an invalid vote; the majority wins, a
            tie or no valid vote gives 0.

A turn with no feedback and no next state (the last turn of a session) gets no
reward (null, not 0), and training skips it. Rows that already have a reward or a
judge_source pass through unchanged unless --rejudge, and so do rows that are not
main turns.

Reads: rollout samples from `claw collect` (Parquet files, globs, directories, or
stdin when none or - is given). Writes: the same rows with reward, judge_votes (the
valid votes), judge_invalid (how many were invalid), judge_source (feedback, env or
prm:<judge model>) and judge_raw (one judge reply that agrees with the reward, or
the env rule that fired) to -o FILE or stdout; every other column, including ones
claw does not know, is kept as it is. A summary goes to stderr: rewards by source,
mean reward, invalid-vote rate, judge tokens/s.

The env rules (only for next states with role `tool`; \"edge line\" means one of
the first or last {edge} non-empty lines, where programs print their errors):
{rules}
The LLM judge is the local model by default (--judge-model, $CLAW_JUDGE_MODEL,
else $CLAW_MODEL, else the default model in models/), run in this process,
optionally with a LoRA adapter (--judge-adapter; judge_source is then
prm:<model>+<adapter>). With
--judge-url it is any OpenAI-compatible server instead (vLLM, llama.cpp, SGLang,
another `claw serve`): a base URL with or without /v1 (http://host:8000,
http://host:8000/v1) or the full .../chat/completions URL; --judge-model then
names the served model (default: the first one GET /v1/models lists), and
--judge-api-key or $CLAW_JUDGE_API_KEY is sent as a bearer token. Only http:// is
supported: put a TLS-terminating proxy in front of a hosted https API. Each call
has a --timeout; timeouts, connection errors, HTTP 408, 429 and 5xx are retried
--retries times with exponential backoff; at most --concurrency calls are in
flight. HTTP 401, 403 and 404 stop the run (wrong key, URL or model).

The prompt is prompts/judge-prm.txt, built into the binary; print it with
--print-prompt, edit it, and pass it back with --prompt FILE. A prompt file has
[system] and [user] sections; {{response}}, {{next_state_role}} and
{{next_state_text}} are replaced by the turn's values (each cut to {max_chars}
characters by removing its middle). Each vote has its own seed, derived from
--seed, the sample_id and the vote number, so a re-run on the local model gives
the same votes.

Examples:
  claw collect claw-data/raw/*.parquet | claw judge -o judged.parquet
  claw judge samples.parquet --sources feedback,env -o judged.parquet
  claw judge samples.parquet --judge-url http://127.0.0.1:8000/v1 \\
      --judge-model Qwen2.5-7B-Instruct --votes 5 --concurrency 8 -o judged.parquet
  claw judge --print-prompt > my-judge.txt   # edit, then: claw judge --prompt my-judge.txt
  claw judge --watch claw-data                # daemon: claw-data/samples -> claw-data/judged",
        edge = env::EDGE_LINES,
        max_chars = MAX_FIELD_CHARS,
    )
}

/// `text` wrapped at `width` columns after `lead`, continuation lines indented to
/// line up with it (clap would re-wrap long lines without the indent).
fn hanging(lead: &str, text: &str, width: usize) -> String {
    let indent = " ".repeat(lead.len());
    let mut out = String::new();
    let mut line = lead.to_string();
    for word in text.split_whitespace() {
        if line.len() > indent.len() && line.len() + 1 + word.len() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// Score turns +1/0/-1 from feedback, environment outcome or an LLM judge.
#[derive(Args, Debug)]
#[command(long_about = long_about())]
pub struct JudgeArgs {
    /// Sample files, glob patterns, directories, or - for stdin (the default).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// Output file (written atomically); - or nothing means stdout.
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    pub output: String,

    /// Reward sources, in priority order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "feedback,env,prm"
    )]
    pub sources: Vec<Source>,

    /// Judge rows that already have a reward or judge_source again.
    #[arg(long)]
    pub rejudge: bool,

    /// The judge prompt file (default: the built-in prompts/judge-prm.txt).
    #[arg(long, value_name = "FILE")]
    pub prompt: Option<PathBuf>,

    /// Print the built-in judge prompt and exit.
    #[arg(long)]
    pub print_prompt: bool,

    /// Judge calls per turn (m); the majority of the valid votes is the reward.
    #[arg(long, default_value_t = 3, value_name = "M")]
    pub votes: usize,

    #[command(flatten)]
    pub llm: LlmArgs,

    /// Print the summary as one JSON object: on stdout with -o FILE, else on stderr.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub daemon: WatchArgs,
}

pub fn run(args: JudgeArgs) -> Result<()> {
    if args.print_prompt {
        print!("{DEFAULT_PRM_PROMPT}");
        return Ok(());
    }
    let daemon = args.daemon.config(Stage::Judge, &args.inputs)?;
    anyhow::ensure!(
        daemon.is_none() || args.output == "-",
        "--watch writes DIR/judged/; drop -o"
    );
    // Check the prompt and the options before reading any input.
    let prompt = match &args.prompt {
        Some(path) => PromptTemplate::load(path, &PRM_VARS)?,
        None => PromptTemplate::parse(DEFAULT_PRM_PROMPT, "built-in prompt", &PRM_VARS)?,
    };
    let prm: Option<PrmFactory> = if args.sources.contains(&Source::Prm) {
        let options = args.llm.call_options(args.votes)?;
        let spec = args.llm.clone();
        Some(Box::new(move || {
            let backend = spec.connect()?;
            let runner = VoteRunner::new(backend, options)?;
            let judge = PrmJudge::new(runner, prompt);
            crate::info!("LLM judge: {}", judge.source());
            Ok(judge)
        }))
    } else {
        None
    };
    let mut judge = Judge::new(
        JudgeConfig {
            sources: args.sources.clone(),
            rejudge: args.rejudge,
        },
        prm,
    )?;

    if let Some(cfg) = daemon {
        daemon::segments::run(&cfg, &mut |batch| judge.judge_batch(batch, &|| {}))?;
        crate::info!("{}", judge.summary().render());
        return Ok(());
    }

    let reader = RolloutReader::new(&args.inputs)?;
    let mut writer = RolloutWriter::create(&args.output)?;
    // Judge calls can take minutes: a spinner counting them, with the rows read
    // and judged (on a terminal only, see ui::progress_bar).
    let progress = crate::ui::progress_bar(None, "judge");
    progress.set_message("calls");
    let start = Instant::now();
    for batch in reader {
        let batch = batch?;
        let out = judge.judge_batch(&batch, &|| progress.inc(1))?;
        writer.write(&out)?;
        let summary = judge.summary();
        progress.set_message(format!(
            "calls, {} rows read, {} judged",
            summary.rows, summary.judged
        ));
    }
    let name = writer.name();
    let written = writer.finish()?;
    progress.finish_and_clear();
    let summary = judge.summary();
    crate::debug!(
        "wrote {written} rows to {name} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    if args.json {
        let json = serde_json::to_string(summary).context("serialising the summary")?;
        if args.output == "-" {
            eprintln!("{json}");
        } else {
            println!("{json}");
        }
    } else {
        crate::info!("{}", summary.render());
    }
    Ok(())
}
