//! `claw eval`: the CLI face of [`crate::eval`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::eval::sandbox::{Limits, Sandbox};
use crate::eval::{facts, gpqa, gsm8k, humaneval, ppl, results, retention, Bench, Outcome, Report};
use crate::llm::{
    CallOptions, ChatBackend, EndpointFlags, LocalBackend, RemoteBackend, VoteRunner,
};
use crate::model::{resolve_model_path, Model, WeightFormat};

const LONG_ABOUT: &str = "\
Score a model on a benchmark: the local GGUF model (optionally with a LoRA
adapter), or any OpenAI-compatible endpoint with --url (claw serve, vLLM,
llama.cpp's server), so the same command compares them. Prompts go to the model
as one chat message each; locally they run one at a time on all cores, against
an endpoint --concurrency at once.

Benchmarks:
  gpqa       --data FILE.csv (the standard GPQA CSV: Question, Correct Answer,
             Incorrect Answer 1..3; the data set is gated, bring your own), or
             --data DIR --subset diamond|main|extended for DIR/gpqa_diamond.csv.
             Each question is asked --repeats times with its four choices
             shuffled by a RNG seeded from --seed, the question and the repeat;
             a zero-shot chain-of-thought prompt asks for a last line
             `Answer: $LETTER`, and the first match of
             (?i)Answer[ \\t]*:[ \\t]*\\$?([A-D])\\$? is the answer (none: invalid).
             Reports accuracy with a 95% interval (by question) and the
             invalid-answer rate.
  humaneval  --data (default data/HumanEval.jsonl.gz, fetched by
             `scripts/fetch-data humaneval`). --samples completions per problem,
             each checked in a sandbox: prompt + completion in one python3
             process, the problem's test + check(entry_point) in another that
             calls it through pipes and compares the plain values it returns;
             both in their own user, PID, mount,
             network and IPC namespaces (it sees only the system directories
             and Python's, read-only, and a private /tmp; no network, no host
             socket; everything it starts dies with it; where the kernel allows
             no namespaces, it refuses unless --unsafe-no-sandbox), with a
             wall-clock timeout (--exec-timeout), CPU, memory (--exec-memory-mb),
             process and file-size limits. A program passes only if check()
             returns (an early exit, even with status 0, fails; so does an
             answer whose __eq__ is always True). Code in ``` fences is taken
             out; a function body is cut at the HumanEval stop sequences (\\ndef,
             \\nclass, \\nif __name__, \\nprint, \\n#). Reports pass@k for --k
             (unbiased estimator). --canonical runs the data file's reference
             solutions instead of a model (all should pass: a sandbox check).
  gsm8k      --data FILE.jsonl with {\"question\", \"answer\"} lines, the answer
             ending in `#### N`. The last number of the reply (commas removed) is
             compared numerically with N. Reports accuracy with a 95% interval.
  ppl        --data FILE.txt: perplexity, bits per byte and NLL per token of the
             text under the local model (teacher forcing, in --window token
             windows, each after the BOS token). No --url.
  facts      short factual questions (capitals, elements, dates, authors):
             --data FILE.jsonl with {\"question\", \"answers\": [...]} lines
             (default: the built-in facts-mini, 42 questions written for claw).
             A reply is right when it contains an accepted answer, ignoring case,
             as whole words (\"Au\" is not found in \"Australia\", \"0\" not in
             \"100\"). Reports accuracy with a 95% interval. Replies: at most
             32 tokens unless --max-tokens.
  retention  does a learned adapter keep what the base model could do? Needs
             --adapter FILE (local model only, no --data): scores the base model
             and base+adapter on the built-in gsm8k-mini (32 problems, at most
             --max-tokens 256), facts-mini (42 questions, at most 32 tokens) and
             the perplexity of ppl-mini, greedy, and prints them side by side
             with the ratio, oriented so higher is better (adapted/base; for
             perplexity, which is lower when better, base/adapted) and a verdict
             per metric: kept (ratio >= 0.95) or LOST, then an overall line.
             --limit N asks only the first N problems and questions (quicker,
             noisier). --fail-under X: the share to keep (default 0.95), and exit
             with status 1 when a metric is LOST. --out FILE.json: the report and
             every item of both models. About 5 minutes per model for SmolLM2
             on two cores.
  persona    does the loop learn? Starts a `claw up` per (--persona, --method)
             with a simulated user who has one rule-checked preference (no-bold,
             brief: under 40 words, direct: no preamble, ask-back: ends with a
             question, no-lists: plain sentences, one-paragraph: no line
             breaks; any reply must also answer: 5+ words, no refusal, on
             topic), holds --sessions sessions, each opening with a task from a
             built-in set: a thumbs up when a reply keeps the preference, else a
             thumbs down and a natural correction as the next message, and the
             model tries again (up to --max-turns replies), while the stages
             train; after each --batch of sessions the user waits for the steps
             those replies feed.
             Reports the sessions until 3 satisfied in a row (OpenClaw-RL's
             measure) and the held-out satisfaction (--heldout tasks, greedy, as
             side turns never trained on) before and after; --report DIR writes
             persona.md, persona.json and persona.png. --fail-under X gates on the
             mean held-out satisfaction after the training runs. With --url it
             drives a running `claw up` instead. Fastest measured on SmolLM2:
             --batch 2 --hindsight --reward-baseline recent --lr 3e-4. The
             teacher reads each correction above the task (--hint-at before).
  agent      does the loop learn to use a tool? Starts a `claw up` per --method
             and plays --episodes episodes: a task whose answer must be computed
             (big-number arithmetic, unit conversions, string manipulation,
             GSM8K-style word problems) with a `python` tool (OpenAI `tools`);
             each call runs in the sandbox (--exec-timeout, --exec-memory-mb) and
             its output is the tool message; up to --tool-rounds replies with
             calls, then the final answer (Answer: X), checked exactly. A
             failed program is scored -1 by judge's env rules; every other turn
             by its own next state (+1: a call that printed the answer, a right
             final answer; -1: a call after it, a wrong program or answer, with
             the correction and the call that computes it as the hint).
             After each --batch of episodes it waits for the steps they feed.
             Reports success per --success-window episodes, held-out success
             (--heldout tasks from a fixed seed, greedy, side turns) before and
             after, tool-call validity and use; --report DIR writes agent.md,
             agent.json and agent.png. Use a model that calls tools (Qwen2.5)
             and --teacher base: the adapter that learned to call would read
             the hint to stop calling as another call.
             persona and agent: Ctrl-C stops the run in progress after its
             session, plays its held-out tasks and writes the report with every
             run so far (exit status 1); a second Ctrl-C quits at once.

Decoding is greedy by default (--temperature 0), so a run is reproducible; with
--temperature > 0 each call's seed comes from --seed, the item and the sample.
The same --seed and greedy decoding give the same score locally and against
`claw serve` on the same model.

Output: a table on stdout (--json: the report as JSON), a progress bar on stderr,
and with --out FILE.parquet or FILE.json every item (prompt, response, extracted
answer, expected, correct, error) for inspection (DuckDB, pandas, jq).
--fail-under X exits with status 1 when the score (the first metric: accuracy,
pass@1) is below X; for ppl, --fail-over X when the perplexity is above X.

Examples:
  claw eval --bench gsm8k --data fixtures/eval/gsm8k-mini.jsonl
  claw eval --bench humaneval --limit 20 --out humaneval.parquet
  claw eval --bench humaneval --samples 10 --k 1,10 --temperature 0.8
  claw eval --bench gpqa --data gpqa/ --subset diamond --url http://127.0.0.1:8000 \\
      --concurrency 8 --json
  claw eval --bench ppl --data README.md --adapter ckpt/adapter-000100.safetensors
  claw eval --bench facts --url http://127.0.0.1:8000
  claw eval --bench retention --adapter ckpt/adapter-000100.safetensors --fail-under 0.95
  claw eval --bench gsm8k --data held-out.jsonl --fail-under 0.3   # a CI gate";

#[derive(Args, Debug)]
#[command(
    about = "Score a model or an OpenAI-compatible endpoint on a benchmark",
    long_about = LONG_ABOUT
)]
pub struct EvalArgs {
    /// The benchmark.
    #[arg(long, value_enum)]
    pub bench: Bench,

    /// The benchmark's data: a file, or for gpqa with --subset a directory.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,

    /// GPQA subset: reads gpqa_SUBSET.csv in the --data directory.
    #[arg(long, value_parser = ["diamond", "main", "extended"])]
    pub subset: Option<String>,

    /// The local GGUF model (default: $CLAW_MODEL, else models/'s default);
    /// unused with --url.
    #[arg(long, env = "CLAW_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// A LoRA adapter (PEFT safetensors with its .json, as `claw train` writes)
    /// applied to the local model.
    #[arg(long, value_name = "FILE", conflicts_with = "url")]
    pub adapter: Option<PathBuf>,

    /// How the local model holds its weights.
    #[arg(long, value_enum, default_value_t = WeightFormat::default())]
    pub weights: WeightFormat,

    /// An OpenAI-compatible server to score instead of the local model: a base
    /// URL with or without /v1, or the full .../chat/completions URL (http only).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,

    /// Bearer token for --url.
    #[arg(
        long,
        env = "CLAW_EVAL_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// The model name to ask --url for (default: the first of GET /v1/models).
    #[arg(long, value_name = "NAME", requires = "url")]
    pub served_model: Option<String>,

    /// Most requests in flight at once against --url.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub concurrency: usize,

    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Most tokens per reply (default: gpqa 1024, gsm8k 512, humaneval 512,
    /// facts 32; retention: its gsm8k replies, 256).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,

    /// Seconds one reply may take.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub timeout: f64,

    /// Extra attempts for a request that timed out or hit a server error (--url).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub retries: usize,

    /// Seed of the GPQA shuffles and of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Only the first N questions or problems of the data.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// GPQA: times each question is asked (each with its own shuffle).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub repeats: usize,

    /// HumanEval: completions per problem.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub samples: usize,

    /// HumanEval: the k of pass@k, comma-separated (default 1,10, those that
    /// --samples allows).
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    pub k: Option<Vec<usize>>,

    /// HumanEval: run the data file's canonical solutions (no model).
    #[arg(long)]
    pub canonical: bool,

    /// HumanEval: seconds each program may run (wall clock).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub exec_timeout: f64,

    /// HumanEval: address-space limit of each program, MiB.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub exec_memory_mb: u64,

    /// HumanEval: programs run at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub exec_workers: Option<usize>,

    /// HumanEval: the Python interpreter.
    #[arg(long, default_value = "python3", value_name = "PATH")]
    pub python: String,

    /// HumanEval: run programs without the sandbox (only rlimits, with this
    /// machine's files and network) when the kernel gives no user namespaces
    /// (only for code you trust).
    #[arg(long, alias = "unsafe-no-netns")]
    pub unsafe_no_sandbox: bool,

    /// ppl: tokens per scored window (default: the context length, at most 2048).
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,

    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Write every item's result to FILE.parquet or FILE.json.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Exit with status 1 when the score is below X (not for ppl; retention:
    /// when a metric keeps less than X of the base score).
    #[arg(long, value_name = "X")]
    pub fail_under: Option<f64>,

    /// ppl: exit with status 1 when the perplexity is above X.
    #[arg(long, value_name = "X")]
    pub fail_over: Option<f64>,

    /// CPU threads for the local model (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    #[command(flatten)]
    pub persona: super::persona::PersonaArgs,

    #[command(flatten)]
    pub agent: super::agent::AgentArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    check(&args)?;
    if let Some(threads) = args.threads {
        // candle sizes its thread pool from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let start = Instant::now();
    let mut outcome = match args.bench {
        Bench::Gpqa => run_gpqa(&args)?,
        Bench::Humaneval => run_humaneval(&args)?,
        Bench::Gsm8k => run_gsm8k(&args)?,
        Bench::Ppl => run_ppl(&args)?,
        Bench::Facts => run_facts(&args)?,
        Bench::Retention => return run_retention(&args),
        Bench::Agent => {
            let results = super::agent::run_all(&args)?;
            // The gate: the mean held-out success after the runs that trained.
            if let Some(min) = args.fail_under {
                let trained: Vec<f64> = results
                    .iter()
                    .filter(|r| r.method != "off")
                    .map(|r| r.heldout_after.rate())
                    .collect();
                let score = trained.iter().sum::<f64>() / trained.len().max(1) as f64;
                if score < min {
                    bail!("held-out success {score:.3} is below --fail-under {min}");
                }
            }
            return Ok(());
        }
        Bench::Persona => {
            let results = super::persona::run_all(
                &args.persona,
                args.model.clone(),
                args.url.clone(),
                args.seed,
                args.max_tokens,
                args.json,
            )?;
            // The gate: the mean held-out satisfaction after the runs that trained.
            if let Some(min) = args.fail_under {
                let trained: Vec<f64> = results
                    .iter()
                    .filter(|r| r.method != "off")
                    .map(|r| r.heldout_after)
                    .collect();
                let score = trained.iter().sum::<f64>() / trained.len().max(1) as f64;
                if score < min {
                    bail!("held-out satisfaction {score:.3} is below --fail-under {min}");
                }
            }
            return Ok(());
        }
    };
    outcome.report.seed = args.seed;
    outcome.report.seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.out {
        results::write(path, &outcome)?;
        crate::info!("wrote {} items to {}", outcome.items.len(), path.display());
    }
    let report = &outcome.report;
    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table(report));
    }
    if let Some(x) = args.fail_under {
        anyhow::ensure!(
            report.score >= x,
            "{} {:.4} is below --fail-under {x}",
            report.score_name,
            report.score
        );
    }
    if let Some(x) = args.fail_over {
        anyhow::ensure!(
            report.score <= x,
            "{} {:.4} is above --fail-over {x}",
            report.score_name,
            report.score
        );
    }
    Ok(())
}

/// Flag checks that need no file or model.
fn check(args: &EvalArgs) -> Result<()> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(args.samples >= 1, "--samples must be at least 1");
    anyhow::ensure!(args.limit != Some(0), "--limit must be at least 1");
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    anyhow::ensure!(
        args.temperature.is_finite() && args.temperature >= 0.0,
        "--temperature must be >= 0"
    );
    anyhow::ensure!(
        args.timeout.is_finite() && args.timeout > 0.0,
        "--timeout must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.exec_timeout.is_finite() && args.exec_timeout > 0.0,
        "--exec-timeout must be a positive number of seconds"
    );
    if let Some(ks) = &args.k {
        anyhow::ensure!(
            !ks.is_empty() && ks.iter().all(|&k| k >= 1),
            "--k takes positive integers, e.g. --k 1,10"
        );
    }
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    if args.bench == Bench::Retention {
        anyhow::ensure!(
            args.adapter.is_some(),
            "--bench retention compares the base model with an adapter: give --adapter FILE"
        );
        anyhow::ensure!(
            args.data.is_none(),
            "--bench retention uses the built-in gsm8k-mini, facts-mini and ppl-mini: drop --data"
        );
        if let Some(x) = args.fail_under {
            anyhow::ensure!(
                x.is_finite() && x > 0.0,
                "--fail-under for retention is the share of the base score to keep, e.g. 0.95"
            );
        }
    }
    if args.fail_under.is_some() && args.bench == Bench::Ppl {
        bail!("--fail-under is for scores where higher is better; for ppl use --fail-over");
    }
    if args.fail_over.is_some() && args.bench != Bench::Ppl {
        bail!(
            "--fail-over is for ppl; use --fail-under for --bench {}",
            args.bench.name()
        );
    }
    if args.url.is_some() && args.bench == Bench::Ppl {
        bail!(
            "--bench ppl scores the local model (teacher forcing needs its log-probs): drop --url"
        );
    }
    if args.url.is_some() && args.bench == Bench::Retention {
        bail!("--bench retention scores the local model with and without --adapter: drop --url");
    }
    if let Some(url) = &args.url {
        crate::llm::endpoints(url)?;
    }
    Ok(())
}

const EVAL_FLAGS: EndpointFlags = EndpointFlags {
    url: "--url",
    api_key: "--api-key or CLAW_EVAL_API_KEY",
    model: "--served-model",
};

/// The local model with its adapter on.
fn load_model(args: &EvalArgs) -> Result<Model> {
    load_model_with(args, args.adapter.as_deref())
}

/// The local model with `adapter` on, if any.
fn load_model_with(args: &EvalArgs, adapter: Option<&Path>) -> Result<Model> {
    let path = resolve_model_path(args.model.as_deref())?;
    crate::info!("loading {}", path.display());
    let mut model = Model::load_with(&path, args.weights)
        .with_context(|| format!("loading the model {}", path.display()))?;
    if let Some(adapter_path) = adapter {
        crate::adapter::apply_file(&mut model, adapter_path)?;
    }
    Ok(model)
}

/// The model the prompts go to: --url, or the local model.
fn runner(
    args: &EvalArgs,
    default_max_tokens: usize,
    votes: usize,
    stop: &[&str],
) -> Result<VoteRunner> {
    let backend: Box<dyn ChatBackend> = match &args.url {
        Some(url) => {
            let backend = RemoteBackend::connect_with_flags(
                url,
                args.api_key.clone(),
                args.served_model.clone(),
                EVAL_FLAGS,
            )
            .with_context(|| format!("connecting to {url}"))?;
            crate::info!("scoring {} at {}", backend.name(), backend.endpoint());
            Box::new(backend)
        }
        None => Box::new(LocalBackend::new(load_model(args)?)),
    };
    VoteRunner::new(
        backend,
        CallOptions {
            votes,
            temperature: args.temperature,
            max_tokens: args.max_tokens.unwrap_or(default_max_tokens),
            timeout: Duration::from_secs_f64(args.timeout),
            retries: args.retries,
            backoff: Duration::from_millis(500),
            concurrency: args.concurrency,
            seed: args.seed,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            role: "model",
        },
    )
}

fn limit<T>(mut items: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        items.truncate(n);
    }
    items
}

fn required_data<'a>(args: &'a EvalArgs, what: &str) -> Result<&'a Path> {
    args.data
        .as_deref()
        .with_context(|| format!("--bench {} needs --data {what}", args.bench.name()))
}

/// Runs `f` with a progress bar of `total` calls on stderr.
fn with_progress<T>(
    total: usize,
    what: &str,
    f: impl FnOnce(&(dyn Fn() + Sync)) -> Result<T>,
) -> Result<T> {
    let bar = crate::ui::progress_bar(Some(total as u64), what);
    let out = f(&|| bar.inc(1));
    bar.finish_and_clear();
    out
}

fn run_gpqa(args: &EvalArgs) -> Result<Outcome> {
    let data = required_data(args, "FILE.csv (or --data DIR --subset diamond)")?;
    let path = match &args.subset {
        Some(subset) => {
            anyhow::ensure!(
                data.is_dir(),
                "--subset {subset} reads gpqa_{subset}.csv in a directory, but --data {} is not one",
                data.display()
            );
            gpqa::subset_file(data, subset)
        }
        None => data.to_path_buf(),
    };
    let questions = limit(gpqa::load(&path)?, args.limit);
    let runner = runner(args, 1024, 1, &[])?;
    let calls = questions.len() * args.repeats;
    crate::info!(
        "gpqa: {} questions x {} repeats = {calls} prompts to {}",
        questions.len(),
        args.repeats,
        runner.backend().name()
    );
    let name = path.display().to_string();
    with_progress(calls, "gpqa", |tick| {
        gpqa::run(&runner, &questions, args.repeats, args.seed, &name, tick)
    })
}

fn run_gsm8k(args: &EvalArgs) -> Result<Outcome> {
    let path = required_data(args, "FILE.jsonl")?;
    let problems = limit(gsm8k::load(path)?, args.limit);
    let runner = runner(args, 512, 1, &[])?;
    crate::info!(
        "gsm8k: {} problems to {}",
        problems.len(),
        runner.backend().name()
    );
    let name = path.display().to_string();
    with_progress(problems.len(), "gsm8k", |tick| {
        gsm8k::run(&runner, &problems, &name, tick)
    })
}

fn run_facts(args: &EvalArgs) -> Result<Outcome> {
    let (questions, name) = match &args.data {
        Some(path) => (facts::load(path)?, path.display().to_string()),
        None => (facts::builtin()?, facts::BUILTIN_NAME.to_string()),
    };
    let questions = limit(questions, args.limit);
    let runner = runner(args, 32, 1, &[])?;
    crate::info!(
        "facts: {} questions to {}",
        questions.len(),
        runner.backend().name()
    );
    with_progress(questions.len(), "facts", |tick| {
        facts::run(&runner, &questions, &name, tick)
    })
}

/// `--bench retention`: the base model and the base with --adapter, side by side.
fn run_retention(args: &EvalArgs) -> Result<()> {
    let adapter = args
        .adapter
        .as_deref()
        .context("--bench retention needs --adapter FILE")?;
    let mut settings = retention::Settings::builtin()?;
    if let Some(n) = args.limit {
        settings = settings.limit(n);
    }
    if let Some(n) = args.max_tokens {
        settings.gsm8k_max_tokens = n;
    }
    if let Some(x) = args.fail_under {
        settings.keep = x;
    }
    settings.window = args.window;
    settings.seed = args.seed;
    settings.timeout = args.timeout;
    let base = load_model_with(args, None)?;
    let adapted = load_model(args)?;
    let progress = |what: &str| crate::info!("retention: {what}");
    let mut report = retention::compare(base, adapted, &settings, &progress)?;
    report.adapter = Some(adapter.display().to_string());
    if let Some(path) = &args.out {
        anyhow::ensure!(
            path.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"))
                || std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()),
            "{}: --out for --bench retention must end in .json",
            path.display()
        );
        let items = |s: &retention::Scores| -> serde_json::Value {
            s.outcomes
                .iter()
                .map(|o| {
                    (
                        o.report.bench.name().to_string(),
                        serde_json::json!(o.items),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let doc = serde_json::json!({
            "report": report,
            "items": {"base": items(&report.base), "adapted": items(&report.adapted)},
        });
        let mut bytes = serde_json::to_vec_pretty(&doc)?;
        bytes.push(b'\n');
        crate::fsutil::write_output(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        crate::info!("wrote every item to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if args.fail_under.is_some() && !report.kept {
        bail!("{}", report.overall());
    }
    Ok(())
}

fn run_humaneval(args: &EvalArgs) -> Result<Outcome> {
    let path = match &args.data {
        Some(p) => p.clone(),
        None => humaneval::default_data_path().with_context(|| {
            format!(
                "no --data given and {} is absent: run `scripts/fetch-data humaneval`",
                humaneval::DEFAULT_DATA
            )
        })?,
    };
    let problems = limit(humaneval::load(&path)?, args.limit);
    let limits = Limits {
        timeout: Duration::from_secs_f64(args.exec_timeout),
        memory_bytes: args.exec_memory_mb.saturating_mul(1 << 20),
        ..Limits::default()
    };
    let sandbox = Sandbox::new(&args.python, limits, args.unsafe_no_sandbox)?;
    let workers = args
        .exec_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let (ks, explicit) = match &args.k {
        Some(ks) => (ks.clone(), true),
        None => (
            [1, 10].into_iter().filter(|&k| k <= args.samples).collect(),
            false,
        ),
    };
    let name = path.display().to_string();
    let settings = humaneval::Settings {
        samples: args.samples,
        ks: &ks,
        workers,
        data: &name,
    };
    if args.canonical {
        crate::info!("humaneval: running {} canonical solutions", problems.len());
        return with_progress(problems.len(), "humaneval", |tick| {
            humaneval::run_canonical(&sandbox, &problems, &settings, tick)
        });
    }
    let runner = runner(args, 512, args.samples, &[])?;
    crate::info!(
        "humaneval: {} problems x {} samples to {}",
        problems.len(),
        args.samples,
        runner.backend().name()
    );
    let mut outcome = with_progress(problems.len() * args.samples, "humaneval", |tick| {
        humaneval::run(&runner, &sandbox, &problems, &settings, tick)
    })?;
    if !explicit {
        outcome.report.notes.retain(|n| !n.starts_with("pass@"));
    }
    if !sandbox.isolated() {
        outcome
            .report
            .notes
            .push("programs ran WITHOUT the sandbox (--unsafe-no-sandbox)".into());
    }
    Ok(outcome)
}

fn run_ppl(args: &EvalArgs) -> Result<Outcome> {
    let path = required_data(args, "FILE.txt")?;
    let text = ppl::load(path)?;
    let model = load_model(args)?;
    let window = args
        .window
        .unwrap_or_else(|| (model.config.context_length - 1).min(2048));
    let bar = crate::ui::progress_bar(None, "ppl");
    let name = path.display().to_string();
    let out = ppl::run(
        &model,
        &model.decoder,
        &text,
        window,
        &name,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    out
}

/// The report as a small table.
pub fn table(report: &Report) -> String {
    let mut s = format!(
        "{}  {}  ({})\n{} items, {} calls ({} failed), {:.1} s, seed {}\n\n",
        report.bench.name(),
        report.target,
        report.data,
        report.items,
        report.calls,
        report.failed_calls,
        report.seconds,
        report.seed
    );
    let width = report
        .metrics
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    s.push_str(&format!("{:<width$}  {:>10}  95% CI\n", "metric", "value"));
    for m in &report.metrics {
        let value = if m.is_count {
            format!("{}", m.value as u64)
        } else {
            format!("{:.4}", m.value)
        };
        let ci = m
            .ci95
            .map(|(lo, hi)| format!("[{lo:.4}, {hi:.4}]"))
            .unwrap_or_default();
        s.push_str(&format!("{:<width$}  {value:>10}  {ci}\n", m.name));
    }
    for note in &report.notes {
        s.push_str(&format!("note: {note}\n"));
    }
    s
}
