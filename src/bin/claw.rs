//! The `claw` command line: parses arguments, dispatches to `claw::cmd`, and maps
//! errors to exit codes (0 ok, 1 failure, 2 usage error).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use claw::cmd;

const LONG_ABOUT: &str = "\
claw lets a self-hosted language model learn from the conversations people have with
it, while it keeps serving them. Each stage is a subcommand that reads and writes
Parquet rollout files (schema claw.rollout.v1), so they compose as a Unix pipeline:

  claw collect DIR/raw/*.parquet | claw judge | claw distill-hints | claw train --out ckpt/

Everything runs on this machine: no API keys, no data leaves it.";

#[derive(Parser)]
#[command(name = "claw", version, about = "Learn from conversations with a self-hosted model while serving it", long_about = LONG_ABOUT)]
struct Cli {
    /// Only print errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print more detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Chat(cmd::chat::ChatArgs),
    Inspect(cmd::inspect::InspectArgs),
    Serve(cmd::serve::ServeArgs),
    Collect(cmd::collect::CollectArgs),
    Judge(cmd::judge::JudgeArgs),
    #[command(name = "distill-hints")]
    DistillHints(cmd::distill_hints::DistillHintsArgs),
    Train(cmd::train::TrainArgs),
    Eval(cmd::eval::EvalArgs),
    Up(cmd::up::UpArgs),
    Status(cmd::status::StatusArgs),
    Adapter(cmd::adapter::AdapterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits with 2 on a usage error
    claw::ui::set_verbosity(if cli.quiet {
        -1
    } else {
        cli.verbose.min(100) as i8
    });
    let result = match cli.command {
        Command::Chat(args) => cmd::chat::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Collect(args) => cmd::collect::run(args),
        Command::Judge(args) => cmd::judge::run(args),
        Command::DistillHints(args) => cmd::distill_hints::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Up(args) => cmd::up::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Adapter(args) => cmd::adapter::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed stdout (`claw inspect x | head`) is not a failure worth reporting.
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("claw: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
