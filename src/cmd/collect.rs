//! `claw collect`: the CLI face of [`crate::collect`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::collect::{self, parse_duration_ms, CollectConfig, Format, PairConfig};
use crate::daemon::{Stage, WatchArgs};

const LONG_ABOUT: &str = "\
Pair each main turn with its next state and any explicit feedback: raw events in,
samples out, one per main turn.

Reads: claw serve's raw event segments (Parquet; files, quoted globs such as
'DIR/raw/*.parquet', directories, or - for stdin), or other tools' chat logs as
JSON lines: OpenAI chat format (one conversation per line, with per-message
`rating`/`feedback`/`annotation` fields as chat UIs export them) and OpenClaw-RL's
record file (session_id, turn, messages, response_text, next_state). --format auto
tells them apart per file. Imported text is tokenised with the model's tokenizer and
chat template (--model) and marked token_source = retokenized.
Writes: samples (Parquet, schema claw.rollout.v1) to -o FILE or stdout, sorted by
session and turn; statistics on stderr (and as JSON on stdout with --json).

The rules (docs/ARCHITECTURE.md, \"Sessions and next state\"):
  - Only main turns become samples, numbered 1, 2, ... within their session; side
    turns and turns without a response are dropped and counted.
  - A turn's next state is what the next main request in the same session has
    after its last assistant message, if those are user or tool messages: the
    user's reply, or every result of the turn's tool calls, joined by a blank line
    (next_state_role: the last one's role, user/tool). OpenClaw's own runtime
    context (<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> blocks) is left out.
  - Feedback (POST /v1/feedback) attaches to the turn it names (response id, else
    turn number), else to the session's latest main turn. It must arrive before
    the turn is final: when the next turn arrives or the session ends, plus
    --feedback-grace. A turn with no next state but with feedback text gets that
    text as its next state (next_state_role feedback).
  - A session ends with X-Session-Done, or after --session-timeout without events.
    Time is event time (created_at), never the clock on the wall, so a batch run
    gives the same result whenever it runs. A request in a session that has ended
    starts it over at turn 1 (as claw serve's feedback numbering does).
  - At the end of the inputs, sessions still open are ended (--flush), or carried
    in --state FILE to the next run: run from cron over new segments, no turn is
    lost or written twice, and inputs already collected are skipped. Without
    --state, open sessions are always flushed.

Memory: every main-turn row is held until the output is written (it is sorted);
about the decoded size of those rows.

Example:
  claw collect claw-data/raw -o samples.parquet
  claw collect 'claw-data/raw/*.parquet' --state claw-data/state/collect.json \\
      -o claw-data/samples/$(date +%s).parquet        # cron: only new segments
  claw collect --watch claw-data        # daemon: claw-data/raw -> claw-data/samples
  claw collect chats.jsonl --model models/SmolLM2-135M-Instruct.Q4_1.gguf | claw inspect -";

/// Pair each turn with its next state and feedback.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT)]
pub struct CollectArgs {
    /// Raw segments or chat logs: files, glob patterns, directories, or - for stdin
    /// (no input means stdin).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// Write samples here (default: stdout, which must not be a terminal).
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    pub output: String,

    /// Input format: auto decides per file.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    pub format: Format,

    /// GGUF model whose tokenizer and chat template retokenise imported logs.
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,

    /// A session with no event for this long has ended (event time; 90s, 30m, 2h;
    /// a plain number is minutes).
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    pub session_timeout: String,

    /// How long a final turn (next turn arrived, or session ended) still accepts
    /// feedback, in event time.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub feedback_grace: String,

    /// End every session still open at the end of the inputs (their last turns get
    /// no next state).
    #[arg(long)]
    pub flush: bool,

    /// Carry open sessions and the list of collected inputs from run to run in this
    /// JSON file (created if missing; pending rows go beside it).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,

    /// Fail on the first malformed line or unreadable input instead of skipping it.
    #[arg(long)]
    pub strict: bool,

    /// Print the statistics as one JSON object on stdout (needs -o FILE).
    #[arg(long)]
    pub json: bool,

    /// The --segment-age-ms of the claw serve that writes DIR/raw/: an event can
    /// reach raw/ that long (plus a second) after it happened, so the clock that
    /// ends quiet sessions stays that far behind the wall clock, and feedback or a
    /// next turn still in serve's open segment never finds its session ended.
    /// `claw up` passes serve's value.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = crate::rollout::DEFAULT_SEGMENT_AGE.as_millis() as u64,
        requires = "watch",
        help_heading = "Daemon mode"
    )]
    pub segment_age_ms: u64,

    #[command(flatten)]
    pub daemon: WatchArgs,
}

pub fn run(args: CollectArgs) -> Result<()> {
    let daemon = args.daemon.config(Stage::Collect, &args.inputs)?;
    anyhow::ensure!(
        daemon.is_none() || (args.state.is_none() && args.output == "-" && !args.json),
        "--watch keeps its state in DIR/state/collect/ and writes DIR/samples/: drop --state, -o and --json"
    );
    if args.json && args.output == "-" {
        bail!("--json prints statistics on stdout, so the samples need -o FILE");
    }
    let cfg = CollectConfig {
        format: args.format,
        model: args.model,
        pair: PairConfig {
            session_timeout: parse_duration_ms(&args.session_timeout)
                .context("--session-timeout")?,
            feedback_grace: parse_duration_ms(&args.feedback_grace).context("--feedback-grace")?,
        },
        flush: args.flush,
        state: args.state,
        strict: args.strict,
        advance_clock_to: None,
    };
    if let Some(daemon) = daemon {
        let lag = crate::daemon::collect::writer_lag(Duration::from_millis(args.segment_age_ms));
        return crate::daemon::collect::run(&daemon, &cfg, lag);
    }
    let stats = collect::collect(&args.inputs, &args.output, &cfg)?;
    crate::info!("{}", stats.summary());
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &stats).context("writing JSON to stdout")?;
        writeln!(out)?;
    }
    Ok(())
}
