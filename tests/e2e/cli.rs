//! The `claw` binary as a user runs it: exit codes, help texts, and `claw chat`
//! on a tiny random-weight model written to a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use claw::model::testing::{write_tiny_gguf, TinySpec};

fn claw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(args)
        .env_remove("CLAW_MODEL")
        .output()
        .expect("run claw")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    path
}

/// `claw chat` without a prompt, fed `input` on stdin.
fn interactive_chat(model: &Path, max_tokens: &str, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            max_tokens,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for cmd in [
        "chat",
        "inspect",
        "serve",
        "collect",
        "judge",
        "distill-hints",
        "train",
        "eval",
        "up",
        "status",
    ] {
        let out = claw(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "{cmd} --help has no example:\n{help}"
        );
        assert!(
            help.contains("Reads") || help.contains("reads"),
            "{cmd} --help does not say what it reads"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    assert_eq!(claw(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(
        claw(&["chat", "--temperature", "warm", "hi"]).status.code(),
        Some(2)
    );
    assert_eq!(
        claw(&["eval"]).status.code(),
        Some(2),
        "--bench is required"
    );
    let out = claw(&["status", "--dir", "/nonexistent/claw-data"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_or_broken_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let out = claw(&["chat", "--model", missing.to_str().unwrap(), "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nope.gguf") && stderr(&out).contains("fetch-model"),
        "{}",
        stderr(&out)
    );

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file").unwrap();
    let out = claw(&["chat", "--model", junk.to_str().unwrap(), "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("junk.gguf"), "{}", stderr(&out));
}

#[test]
fn chat_json_reports_token_ids_and_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let sampled_chat = || {
        claw(&[
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--json",
            "--max-tokens",
            "7",
            "--ignore-eos",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "hello there",
        ])
    };
    let out = sampled_chat();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let ids = report["response_ids"].as_array().unwrap();
    let logprobs = report["response_logprobs"].as_array().unwrap();
    assert_eq!(ids.len(), 7);
    assert_eq!(logprobs.len(), 7);
    assert!(logprobs.iter().all(|lp| lp.as_f64().unwrap() <= 0.0));
    assert_eq!(report["finish_reason"], "length");
    assert!(report["prompt_text"]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    assert_eq!(
        report["prompt_ids"][0], 1,
        "the template starts with <|im_start|>"
    );
    assert_eq!(report["timing"]["completion_tokens"], 7);

    // Same seed, same reply; the quantized weights give a reply as well.
    let again = sampled_chat();
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["response_ids"], report["response_ids"]);
    let native = claw(&[
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--weights",
        "ggml",
        "--max-tokens",
        "3",
        "hi",
    ]);
    assert!(native.status.success(), "{}", stderr(&native));
}

#[test]
fn chat_reads_an_interactive_session_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = interactive_chat(&model, "4", b"first\nsecond\n");
    assert!(out.status.success(), "{}", stderr(&out));
    // a prompt for each message and one more before EOF
    assert_eq!(stderr(&out).matches("> ").count(), 3, "{}", stderr(&out));
    assert!(!out.stdout.is_empty());
}

#[test]
fn real_model_answers_the_capital_of_france() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.is_file() {
        eprintln!(
            "SKIP: {} is absent (run scripts/fetch-model)",
            model.display()
        );
        return;
    }
    let out = claw(&[
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("Paris"), "reply: {reply}");
}

#[test]
fn interactive_chat_survives_a_turn_that_overflows_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path()); // context length 256
    let long = "word ".repeat(400);
    let out = interactive_chat(&model, "3", format!("{long}\nshort\n").as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("context length"), "{}", stderr(&out));
    assert!(!out.stdout.is_empty(), "the next turn still got a reply");
}
