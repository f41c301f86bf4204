//! The adapter format (docs/ARCHITECTURE.md, "Adapters and checkpoints"): the
//! contract between `claw train`, which writes LoRA checkpoints, and what loads
//! them: `claw serve` (hot reload), `claw distill-hints` (the policy teacher),
//! `claw eval` and the daemon.
//!
//! - [`lora`]: the LoRA adapter (rank, scale, targets, A/B per linear), its PEFT
//!   tensor names and config file, loading, saving, applying it to a decoder.
//! - [`layout`]: the checkpoint directory: file names, `LATEST`, `metrics.jsonl`.

pub mod layout;
pub mod lora;

pub use lora::{Adapter, AdapterFileConfig, LoraConfig, LoraPair};
