//! Helpers shared by the integration tests: the built binary, the tiny model,
//! the real model (skipped visibly when absent) and rollout files.

pub mod llama;
pub mod s3;
pub mod shared;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use claw::model::testing::{write_tiny_gguf, TinySpec};
use claw::rollout::{RolloutReader, RolloutRow, RolloutWriter};

/// Runs `cmd` to its end, failing the test with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

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

/// The tiny model with a 1024-token context: room for chat prompts with their
/// template, for tests that serve or judge conversations.
pub fn tiny_chat_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(
        &path,
        &TinySpec {
            context: 1024,
            ..Default::default()
        },
    )
    .unwrap();
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

/// The Qwen2.5-Coder-0.5B model (`scripts/fetch-model --qwen`), or None with a
/// visible message when it is not fetched.
pub fn qwen_model() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIP: {} is absent (run scripts/fetch-model --qwen)",
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

/// Starts `claw serve` on `model` and `data`; returns the child, its base URL
/// (from the "listening on" line) and the log being collected.
pub fn spawn_server(
    model: &Path,
    data: &Path,
    extra: &[&str],
) -> (Child, String, Arc<Mutex<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["serve", "--model"])
        .arg(model)
        .arg("--dir")
        .arg(data)
        .args(["--host", "127.0.0.1", "--port", "0", "-v"])
        .args(extra)
        .env_remove("CLAW_API_KEY")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start claw serve");
    let (base, log) = wait_until_listening(&mut child);
    (child, base, log)
}

/// Collects `child`'s stderr (serve's, or `claw up`'s) into a log and waits for
/// serve's "listening on" line; returns its base URL (no /v1) and the log. Kills
/// the child and panics with the log if serve does not start within 60 s.
pub fn wait_until_listening(child: &mut Child) -> (String, Arc<Mutex<String>>) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let thread_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find("listening on http://") {
                let rest = &line[at + "listening on ".len()..];
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
            let mut log = thread_log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let base = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(base) => base,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!("server did not start:\n{}", log.lock().unwrap());
        }
    };
    (base, log)
}
