//! `claw train --init CONFIG.json`: a new model from a small JSON config
//! ([`crate::model::scratch::InitConfig`]), trained in full from random weights.
//! Its checkpoints record the config and tokenizer in their metadata, so
//! `claw chat/serve/eval --model DIR` load them directly.

use std::path::Path;

use anyhow::{Context, Result};

use crate::fsutil::write_atomic;
use crate::model::scratch::InitConfig;
use crate::model::Model;

/// File in the checkpoint directory recording what `--init` created.
pub const INIT_FILE: &str = "model.json";

/// The new model and the spec its checkpoints must carry (JSON).
pub fn init_model(
    config_path: &Path,
    out: &Path,
    resume: bool,
    base_weights: bool,
) -> Result<(Model, Option<String>)> {
    anyhow::ensure!(
        !resume && !base_weights,
        "--init creates a new model: it does not combine with --resume or --base-weights \
         (continue a from-scratch model with --base-weights DIR/model-NNNNNN.safetensors \
         --model DIR)"
    );
    let config = InitConfig::from_file(config_path)?;
    let (model, spec) = Model::from_init(&config)
        .with_context(|| format!("cannot create a model from {}", config_path.display()))?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create checkpoint directory {}", out.display()))?;
    let record = serde_json::json!({ "init": config, "spec": spec });
    write_atomic(
        &out.join(INIT_FILE),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    let params: usize = model
        .decoder
        .parameters()?
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    crate::info!(
        "new model: {} layers, width {}, {} heads, residual {}, tokenizer {}, {params} parameters",
        spec.config.num_layers,
        spec.config.hidden_size,
        spec.config.num_heads,
        spec.config.residual,
        spec.tokenizer
    );
    Ok((model, Some(spec.to_json()?)))
}
