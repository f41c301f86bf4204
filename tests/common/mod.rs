//! Helpers shared by the integration tests: the built binary, the tiny model,
//! the real model (skipped visibly when absent) and rollout files.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

use claw::model::testing::{write_tiny_gguf, TinySpec};
use claw::rollout::{RolloutReader, RolloutRow, RolloutWriter};

/// The `claw` binary under test.
pub fn claw() -> Command {
    Command::new(env!("CARGO_BIN_EXE_claw"))
}

/// Writes the tiny random-weight model into `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    path
}

/// The real default model, or None with a visible message when it is not fetched.
pub fn real_model() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIP: {} is absent (run scripts/fetch-model)",
            path.display()
        );
        None
    }
}

pub fn write_rows(path: &Path, rows: &[RolloutRow]) {
    let mut w = RolloutWriter::file(path).unwrap();
    w.write_rows(rows).unwrap();
    w.finish().unwrap();
}

pub fn read_rows(path: &Path) -> Vec<RolloutRow> {
    RolloutReader::new(&[path.to_string_lossy().into_owned()])
        .unwrap()
        .read_all_rows()
        .unwrap()
}
