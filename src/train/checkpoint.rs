//! Writing the checkpoint directory (docs/ARCHITECTURE.md, "Shared directory" and
//! "Training"), in the layout [`crate::adapter::layout`] defines: adapters with
//! their config and optimizer state, full-weight `model-NNNNNN.safetensors`,
//! `metrics.jsonl`, keep-last-K pruning, and loading for `--resume`.
//!
//! Every file is written atomically and `LATEST` is replaced last, so a reader
//! (`claw serve`) following `LATEST` only ever sees complete checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;

use super::optim::AdamW;
use super::trainer::StepMetrics;
use crate::adapter::gguf::{gguf_path_for, write_gguf_lora, GgufBase};
use crate::adapter::layout::{adapter_file_name, latest_in, optim_path, LATEST, METRICS};
use crate::adapter::Adapter;
use crate::fsutil::write_atomic;

pub struct CheckpointDir {
    dir: PathBuf,
    /// `claw train --gguf`: also write each adapter as GGUF for this base model
    /// (`adapter-NNNNNN.gguf`, for llama.cpp's `--lora`).
    gguf: Option<GgufBase>,
}

impl CheckpointDir {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            gguf: None,
        })
    }

    /// Also writes every adapter as GGUF LoRA for `base`, before `LATEST` moves.
    pub fn with_gguf(mut self, base: GgufBase) -> Self {
        self.gguf = Some(base);
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes adapter, config and optimizer state for `step`, then points
    /// `LATEST` at it. Returns the adapter's path.
    pub fn save(
        &self,
        adapter: &Adapter,
        base_model: &str,
        step: u64,
        metrics: Option<&StepMetrics>,
        optim: Option<&AdamW>,
    ) -> Result<PathBuf> {
        self.save_with_ledger(adapter, base_model, step, metrics, optim, None)
    }

    /// [`save`](Self::save), recording `ledger` (what the daemon had consumed) in
    /// the config, so it becomes current with `LATEST` in one atomic step.
    pub fn save_with_ledger(
        &self,
        adapter: &Adapter,
        base_model: &str,
        step: u64,
        metrics: Option<&StepMetrics>,
        optim: Option<&AdamW>,
        ledger: Option<&serde_json::Value>,
    ) -> Result<PathBuf> {
        let name = adapter_file_name(step);
        let path = self.dir.join(&name);
        write_atomic(&path, &adapter.to_safetensors()?)?;
        if let Some(optim) = optim {
            let state = optim.state_tensors();
            let bytes = safetensors::serialize(state.iter().map(|(k, v)| (k.as_str(), v)), None)?;
            write_atomic(&optim_path(&path), &bytes)?;
        }
        let mut config = adapter.file_config(base_model, step);
        if let Some(m) = metrics {
            config.claw_metrics = serde_json::to_value(m)?;
        }
        if let Some(ledger) = ledger {
            config.claw_ledger = ledger.clone();
        }
        write_atomic(
            &path.with_extension("json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        if let Some(base) = &self.gguf {
            write_gguf_lora(adapter, base, step, &gguf_path_for(&path))?;
        }
        write_atomic(&self.dir.join(LATEST), format!("{name}\n").as_bytes())?;
        Ok(path)
    }

    /// Full fine-tuning: every weight under its Hugging Face name in
    /// `model-NNNNNN.safetensors` (Q/K in the HF layout). `LATEST` is left alone:
    /// it names adapters, which is what `claw serve` hot-loads. With `spec` (a
    /// model created by `--init`), the file also records its config and
    /// tokenizer, so `Model::load` can load it on its own.
    pub fn save_full(
        &self,
        parameters: &[(String, candle_core::Tensor)],
        step: u64,
        spec: Option<&str>,
    ) -> Result<PathBuf> {
        let path = self.dir.join(format!("model-{step:06}.safetensors"));
        let mut metadata =
            std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        if let Some(spec) = spec {
            metadata.insert(
                crate::model::scratch::SPEC_KEY.to_string(),
                spec.to_string(),
            );
        }
        let bytes = safetensors::serialize(
            parameters.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
        )?;
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// The adapter `LATEST` names, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        latest_in(&self.dir)
    }

    /// Deletes all but the newest `keep` checkpoints (never the one `LATEST` names).
    pub fn prune(&self, keep: usize) -> Result<Vec<u64>> {
        let latest = self.latest()?;
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut removed = Vec::new();
        for prefix in ["adapter-", "model-"] {
            let mut steps: Vec<u64> = names
                .iter()
                .filter_map(|n| {
                    n.strip_prefix(prefix)?
                        .strip_suffix(".safetensors")?
                        .parse()
                        .ok()
                })
                .collect();
            steps.sort_unstable();
            let excess = steps.len().saturating_sub(keep.max(1));
            for &step in &steps[..excess] {
                let path = self.dir.join(format!("{prefix}{step:06}.safetensors"));
                if self.remove_checkpoint(&path, latest.as_deref())? {
                    removed.push(step);
                }
            }
        }
        Ok(removed)
    }

    /// Removes one checkpoint's files unless it is the one `LATEST` names.
    fn remove_checkpoint(&self, path: &Path, latest: Option<&Path>) -> Result<bool> {
        if latest == Some(path) {
            return Ok(false);
        }
        for p in [
            optim_path(path),
            path.with_extension("json"),
            gguf_path_for(path),
            path.to_path_buf(),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Ok(true)
    }

    /// Appends one JSON line to `metrics.jsonl`.
    pub fn append_metrics(&self, metrics: &StepMetrics) -> Result<()> {
        let path = self.dir.join(METRICS);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(metrics)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Loads an adapter and, when present, its optimizer state into `optim`.
/// Returns the adapter and the step it was saved at.
pub fn load_optimizer_state(adapter_path: &Path, optim: &mut AdamW, step: u64) -> Result<bool> {
    let path = optim_path(adapter_path);
    if !path.is_file() {
        return Ok(false);
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
    optim
        .load_state(&tensors, step)
        .with_context(|| format!("{}", path.display()))?;
    Ok(true)
}

/// `decoder` with its weights replaced by a safetensors file of Hugging Face
/// names (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`,
/// …): a full fine-tuning checkpoint of `claw train --full`, or a float
/// checkpoint of the same architecture. Returns the decoder in the HF layout.
/// Every parameter must be present with its shape; extra tensors are an error
/// too (they would mean a different architecture).
pub fn load_full_weights(
    decoder: &crate::model::Decoder,
    path: &Path,
) -> Result<crate::model::Decoder> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read weights {}", path.display()))?;
    let base = decoder.to_float()?.to_hf_layout()?;
    let loaded = base.take_parameters(&mut tensors, path)?;
    // A tied model's head is the embedding; an untied checkpoint's lm_head would
    // be left over.
    tensors.remove("lm_head.weight");
    if let Some(extra) = tensors.keys().next() {
        anyhow::bail!(
            "{}: unexpected tensor {extra} (and {} more): not this model's architecture",
            path.display(),
            tensors.len() - 1
        );
    }
    Ok(loaded)
}
