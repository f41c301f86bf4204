//! One module per subcommand: its clap `Args` (with the `--help` text) and `run()`.
//! The stage logic itself lives in the library modules, free of CLI concerns.

pub mod chat;
pub mod collect;
pub mod distill_hints;
pub mod inspect;
pub mod judge;
pub mod llm;
pub mod pending;
pub mod serve;
pub mod train;
