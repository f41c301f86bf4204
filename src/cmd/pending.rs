//! Subcommands whose stage is not built yet. Each has its real `--help` (what it will
//! read and write) and fails clearly instead of doing nothing.

use anyhow::{bail, Result};
use clap::Args;

macro_rules! pending_command {
    ($name:ident, $cmd:literal, $issue:literal, $about:literal, $long:literal) => {
        #[derive(Args)]
        #[command(about = $about, long_about = concat!($about, "\n\n", $long, "\n\nNot built yet: see issue ", $issue, "."))]
        pub struct $name {
            /// Arguments for the finished command (ignored until it lands).
            #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
            args: Vec<String>,
        }

        impl $name {
            pub fn run(self) -> Result<()> {
                bail!(concat!("`claw ", $cmd, "` is not built yet (issue ", $issue, "); see `claw ", $cmd, " --help` for what it will do"))
            }
        }
    };
}

pending_command!(
    CollectArgs,
    "collect",
    "#4",
    "Pair each turn with its next state and feedback",
    "Reads: raw event segments from `claw serve` (files, globs or - for stdin), or other tools' \
     chat logs. Writes: one sample row per main turn (Parquet, -o FILE or stdout).\n\nExample:\n  claw collect claw-data/raw/*.parquet -o samples.parquet"
);
pending_command!(
    JudgeArgs,
    "judge",
    "#4",
    "Score turns +1/0/-1 from feedback, environment outcome or an LLM judge",
    "Reads: samples (Parquet). Writes: the same rows with reward, judge_votes, judge_source.\n\nExample:\n  claw judge samples.parquet -o judged.parquet"
);
pending_command!(
    DistillHintsArgs,
    "distill-hints",
    "#5",
    "Extract hindsight hints and compute teacher log-probs under them",
    "Reads: judged samples (Parquet). Writes: the same rows with hint and teacher_logprobs.\n\nExample:\n  claw distill-hints judged.parquet -o distilled.parquet"
);
pending_command!(
    TrainArgs,
    "train",
    "#5",
    "Update the model (LoRA or full) from judged or distilled samples",
    "Reads: samples with reward and/or teacher log-probs (Parquet). Writes: adapter checkpoints \
     and a LATEST pointer that `claw serve` hot-loads.\n\nExample:\n  claw train distilled.parquet --out claw-data/checkpoints"
);
pending_command!(
    EvalArgs,
    "eval",
    "#7",
    "Score a model or an OpenAI-compatible endpoint on a benchmark",
    "Reads: a benchmark data file (gpqa CSV, gsm8k JSONL, text for ppl). Writes: a score table, \
     --json, or per-item results.\n\nExample:\n  claw eval --bench gsm8k --data gsm8k.jsonl --limit 100"
);
