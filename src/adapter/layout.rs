//! The checkpoint directory's file layout, the contract between `claw train`
//! (which writes it, src/train/checkpoint.rs) and `claw serve` (which follows
//! `LATEST`) (docs/ARCHITECTURE.md, "Shared directory" and "Training"):
//!
//! ```text
//! adapter-000012.safetensors        LoRA tensors, PEFT names
//! adapter-000012.json               PEFT adapter config + claw_step + step metrics
//! adapter-000012.optim.safetensors  AdamW moments, for --resume
//! LATEST                            the newest adapter's file name
//! metrics.jsonl                     one line per step
//! ```
//! (`claw train --full` also writes `model-NNNNNN.safetensors`, which `LATEST`
//! never names.)

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const LATEST: &str = "LATEST";
pub const METRICS: &str = "metrics.jsonl";

/// `adapter-000012.safetensors`.
pub fn adapter_file_name(step: u64) -> String {
    format!("adapter-{step:06}.safetensors")
}

/// The step of an `adapter-NNNNNN.safetensors` name.
pub fn parse_adapter_step(name: &str) -> Option<u64> {
    name.strip_prefix("adapter-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// The adapter `DIR/LATEST` names, if `LATEST` exists.
pub fn latest_in(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join(LATEST);
    match std::fs::read_to_string(&pointer) {
        Ok(text) => {
            let name = text.trim();
            anyhow::ensure!(
                !name.is_empty() && !name.contains('/') && !name.contains(".."),
                "{}: expected a checkpoint file name, found {name:?}",
                pointer.display()
            );
            Ok(Some(dir.join(name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", pointer.display())),
    }
}

/// `adapter-000012.safetensors` → `adapter-000012.optim.safetensors`.
pub fn optim_path(adapter: &Path) -> PathBuf {
    adapter.with_extension("optim.safetensors")
}

/// `adapter-000012.safetensors` → `adapter-000012.json`; falls back to PEFT's
/// `adapter_config.json` in the same directory.
pub fn config_path_for(path: &Path) -> PathBuf {
    let own = path.with_extension("json");
    if own.is_file() {
        return own;
    }
    let peft = path.with_file_name("adapter_config.json");
    if peft.is_file() {
        return peft;
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(adapter_file_name(12), "adapter-000012.safetensors");
        assert_eq!(parse_adapter_step("adapter-000012.safetensors"), Some(12));
        assert_eq!(parse_adapter_step("adapter-000012.optim.safetensors"), None);
        assert_eq!(
            optim_path(Path::new("d/adapter-000003.safetensors")),
            Path::new("d/adapter-000003.optim.safetensors")
        );
    }

    #[test]
    fn latest_rejects_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_in(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(LATEST), "../etc/passwd\n").unwrap();
        assert!(latest_in(dir.path()).is_err());
    }
}
