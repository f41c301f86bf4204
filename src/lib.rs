//! claw: learn from the conversations people have with a self-hosted model,
//! while it keeps serving them.
//!
//! The crate is organised by concern (docs/ARCHITECTURE.md, "Modules and dependency
//! rules"):
//! - [`rollout`]: the `claw.rollout.v1` schema and its Parquet I/O, shared by every stage.
//! - [`model`]: the model runtime (GGUF loading, tokenizer, chat template, decoder, sampling,
//!   teacher-forced scoring).
//! - [`adapter`]: the LoRA adapter format and checkpoint layout train writes and serve loads.
//! - [`serve`]: the OpenAI-compatible server that records every turn.
//! - [`collect`]: raw events to samples: next state, feedback, sessions; log imports.
//! - [`distill`]: hindsight hints and teacher log-probs under them.
//! - [`train`]: LoRA/full training on candle: the policy loss, AdamW, checkpoints.
//! - [`daemon`]: the stages as workers over a shared directory: ledgers, claims,
//!   quarantine, notifications, status.
//! - [`eval`]: benchmarks (gpqa, humaneval in a sandbox, gsm8k, perplexity).
//! - [`fsutil`]: atomic, durable file writes.
//! - [`store`]: where a shared directory lives: a local folder or an object store
//!   prefix (`s3://`, `gs://`, `az://`), with put-if-absent markers and leases.
//! - [`clock`]: the wall clock in Unix milliseconds; [`date`]: ISO 8601 to and from it.
//! - [`judge`]: rewards from feedback, tool errors and an LLM judge (PRM).
//! - [`llm`]: asking an LLM (local or an endpoint) the same prompts several times:
//!   the client and vote runner that judge, distill and eval share; prompt files.
//! - [`cmd`]: one module per subcommand; each holds its clap `Args` and `run()`.
//! - [`ui`]: verbosity-aware logging to stderr.

pub mod adapter;
pub mod clock;
pub mod cmd;
pub mod collect;
pub mod daemon;
pub mod date;
pub mod distill;
pub mod eval;
pub mod fsutil;
pub mod judge;
pub mod llm;
pub mod model;
pub mod rollout;
pub mod serve;
pub mod store;
pub mod train;
pub mod ui;
