//! One module per subcommand: its clap `Args` (with the `--help` text) and `run()`,
//! which turns the flags into the stage's config, calls the library and prints.
//! The stage logic itself lives in the library modules, free of CLI concerns.

pub mod adapter;
pub mod agent;
pub mod chat;
pub mod collect;
pub mod distill_hints;
pub mod eval;
pub mod inspect;
pub mod judge;
pub mod llm;
pub mod persona;
pub mod serve;
pub mod status;
pub mod train;
pub mod up;

/// This process's command line as a report states it (`claw ARGS...`).
pub(crate) fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = "claw".into();
    }
    args.join(" ")
}
