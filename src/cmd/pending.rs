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
    EvalArgs,
    "eval",
    "#7",
    "Score a model or an OpenAI-compatible endpoint on a benchmark",
    "Reads: a benchmark data file (gpqa CSV, gsm8k JSONL, text for ppl). Writes: a score table, \
     --json, or per-item results.\n\nExample:\n  claw eval --bench gsm8k --data gsm8k.jsonl --limit 100"
);
