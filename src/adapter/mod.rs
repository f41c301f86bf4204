//! The adapter format (docs/ARCHITECTURE.md, "Adapters and checkpoints"): the
//! contract between `claw train`, which writes LoRA checkpoints, and what loads
//! them: `claw serve` (hot reload), `claw distill-hints` (the policy teacher),
//! `claw eval` and the daemon.
//!
//! - [`lora`]: the LoRA adapter (rank, scale, targets, A/B per linear), its PEFT
//!   tensor names and config file, loading, saving, applying it to a decoder.
//! - [`layout`]: the checkpoint directory: file names, `LATEST`, `metrics.jsonl`.
//! - [`gguf`]: the adapter as a GGUF LoRA file, for llama.cpp's `--lora`.

pub mod gguf;
pub mod layout;
pub mod lora;

pub use lora::{Adapter, AdapterFileConfig, LoraConfig, LoraPair};

use std::path::Path;

use anyhow::{Context, Result};

use crate::model::Model;

/// Loads the adapter at `path` onto `model` for serving and names the result
/// `MODEL+STEM` (what eval reports and judge sources record).
pub fn apply_file(model: &mut Model, path: &Path) -> Result<()> {
    let (adapter, _) = Adapter::load(path, &model.device)
        .with_context(|| format!("loading the adapter {}", path.display()))?;
    model.decoder = adapter
        .apply_for_serving(&model.decoder)
        .with_context(|| format!("{} does not fit {}", path.display(), model.name))?;
    if let Some(stem) = path.file_stem() {
        model.name = format!("{}+{}", model.name, stem.to_string_lossy());
    }
    Ok(())
}
