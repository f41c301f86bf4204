//! `claw distill-hints` as a user runs it: feedback hints without a judge, a
//! stub OpenAI-compatible hint judge on loopback, and the output feeding
//! `claw train` through a pipe.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use std::process::Stdio;

use crate::common::*;
use claw::rollout::RolloutRow;
use serde_json::json;

fn row(id: &str, next_state: Option<&str>, feedback_text: Option<&str>) -> RolloutRow {
    RolloutRow {
        sample_id: id.into(),
        session_id: format!("session-{id}"),
        turn: Some(1),
        turn_type: "main".into(),
        model: "tiny".into(),
        messages_json: json!([{"role": "user", "content": "how far is it?"}]).to_string(),
        response_text: format!("It is 3 miles ({id})."),
        prompt_ids: vec![1, 104, 105],
        response_ids: vec![110, 111, 112, 2],
        response_logprobs: vec![-1.0; 4],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        next_state_role: next_state.map(|_| "user".into()),
        next_state_text: next_state.map(str::to_string),
        feedback_text: feedback_text.map(str::to_string),
        ..Default::default()
    }
}

/// A one-thread HTTP server that answers every chat completion by looking at
/// the prompt: "kilometres" in the next state gets a hint, anything else -1.
fn stub_judge() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body);
            let answer = if body.contains("kilometres") {
                "\\boxed{1} [HINT_START]Give distances in kilometres, not miles.[HINT_END]"
            } else {
                "\\boxed{-1}"
            };
            let reply = json!({
                "id": "x", "object": "chat.completion", "model": "stub",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
            })
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    url
}

#[test]
fn feedback_hints_then_train_through_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("judged.parquet");
    write_rows(
        &input,
        &[
            row("a", None, Some("Please use kilometres, always.")),
            row("b", Some("thanks"), None),
        ],
    );
    let mut distill = claw()
        // With the teacher's top-3 too: train reads it and distills it.
        .args(["distill-hints", "--hint-source", "feedback", "--topk", "3"])
        .arg(&input)
        .arg("--model")
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let train = claw()
        .args(["train", "--batch-size", "1", "--lora-rank", "2", "--json"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("ckpt"))
        .stdin(distill.stdout.take().unwrap())
        .output()
        .unwrap();
    let distill_out = distill.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&distill_out.stderr);
    assert!(distill_out.status.success(), "{stderr}");
    assert!(stderr.contains("1 hints accepted"), "{stderr}");
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&train.stdout).unwrap();
    // Only the row with teacher log-probs carries a signal (no rewards here).
    assert_eq!(report["samples_trained"], 1);
    assert_eq!(report["skipped"]["no_signal"], 1);
}

#[test]
fn a_remote_hint_judge_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("judged.parquet");
    let rows = [
        row("a", Some("No - in kilometres please."), None),
        row("b", Some("Great, thanks."), None),
        row("c", None, None),
    ];
    write_rows(&input, &rows);
    let output = dir.path().join("distilled.parquet");
    let url = stub_judge();
    let out = claw()
        .args(["distill-hints", "--votes", "2", "--topk", "2", "--json"])
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--model")
        .arg(&model)
        .args(["--judge-url", &url, "--judge-model", "stub"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted_from_judge"], 1, "{summary}");
    assert_eq!(summary["rejected_negative"], 1);
    assert_eq!(summary["no_hint_source"], 1);
    assert_eq!(summary["judge_calls"], 4);
    let got = read_rows(&output);
    assert_eq!(
        got[0].hint.as_deref(),
        Some("Give distances in kilometres, not miles.")
    );
    assert_eq!(got[0].teacher_logprobs.as_ref().unwrap().len(), 4);
    assert_eq!(got[0].teacher_topk_ids.as_ref().unwrap()[0].len(), 2);
    assert_eq!(got[1], rows[1]);
    assert_eq!(got[2], rows[2]);
}
