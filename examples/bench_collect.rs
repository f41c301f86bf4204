//! Writes synthetic raw event segments for `claw collect`'s throughput benchmark
//! (driven by `scripts/bench-collect`): ROWS rows as `claw serve` records them,
//! in 1024-row segments named like serve's.
//!
//! Each session has 8 main turns whose `messages_json` is the conversation so far
//! (up to ~3 KB), a 300-token prompt and a 100-token response with log-probs, plus
//! one side turn and one feedback event: 10 rows. 64 sessions are interleaved at a
//! time; half end with X-Session-Done, the rest by the timeout or at the end; 1 in
//! 50 main turns has no response.
//!
//!   cargo run --example bench_collect -- ROWS DIR

use anyhow::{Context, Result};
use claw::rollout::{segment_file_name, RolloutRow, RolloutWriter};
use serde_json::json;

const ROWS_PER_SESSION: usize = 10;
const MAIN_TURNS: usize = 8;
const CONCURRENT: usize = 64;
const SEGMENT_ROWS: usize = 1024;
const T0: i64 = 1_764_000_000_000;

fn sentence(seed: usize, words: usize) -> String {
    (0..words)
        .map(|w| format!("word{}", (seed * 31 + w * 7) % 997))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Row `k` (0..10) of session `s`: turns 0..8 are main, 8 is a side turn, 9 is
/// feedback on the session's latest main turn.
fn row(s: usize, k: usize, t: i64) -> RolloutRow {
    let session = format!("sess-{s:07}");
    let base = RolloutRow {
        session_id: session.clone(),
        created_at: t,
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        session_done: Some(false),
        ..Default::default()
    };
    if k == ROWS_PER_SESSION - 1 {
        return RolloutRow {
            sample_id: format!("fb-{s}"),
            turn_type: "feedback".into(),
            messages_json: json!({"response_id": format!("chatcmpl-{s}-{}", MAIN_TURNS - 1),
                "turn": null, "rating": -1, "text": "too long"})
            .to_string(),
            feedback: Some(-1),
            feedback_text: Some("too long".into()),
            token_source: "none".into(),
            finish_reason: "feedback".into(),
            session_done: None,
            ..base
        };
    }
    let side = k == MAIN_TURNS;
    let turn = k.min(MAIN_TURNS - 1);
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for j in 0..=turn {
        messages.push(json!({"role": "user", "content": sentence(s + j, 30)}));
        if j < turn {
            messages.push(json!({"role": "assistant", "content": sentence(s * 3 + j, 40)}));
        }
    }
    let no_response = !side && (s * MAIN_TURNS + k).is_multiple_of(50);
    let response_ids: Vec<i32> = if no_response {
        vec![]
    } else {
        (0..100).map(|i| ((s * 3 + k + i) % 49152) as i32).collect()
    };
    RolloutRow {
        sample_id: format!("chatcmpl-{s}-{k}"),
        turn_type: if side { "side" } else { "main" }.into(),
        session_done: Some(k == MAIN_TURNS - 1 && s.is_multiple_of(2)),
        messages_json: serde_json::Value::Array(messages).to_string(),
        prompt_text: format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            sentence(s + k, 200)
        ),
        response_text: sentence(s * 3 + k, 40),
        prompt_ids: (0..300).map(|i| ((s + k + i) % 49152) as i32).collect(),
        response_logprobs: response_ids
            .iter()
            .map(|&i| -((i % 17) as f32) * 0.1)
            .collect(),
        response_ids,
        ..base
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = std::path::PathBuf::from(args.get(2).context("usage: bench_collect ROWS DIR")?);
    std::fs::create_dir_all(&dir)?;
    // Sessions run CONCURRENT at a time, their rows interleaved round-robin, one
    // event every 100 ms of event time.
    let sessions = rows.div_ceil(ROWS_PER_SESSION);
    let mut written = 0usize;
    let mut seq = 0u64;
    let mut buf: Vec<RolloutRow> = Vec::with_capacity(SEGMENT_ROWS);
    let flush = |buf: &mut Vec<RolloutRow>, seq: &mut u64| -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let ms = (buf[0].created_at) as u64;
        let mut w = RolloutWriter::file(dir.join(segment_file_name(ms, "bench", *seq)))?;
        w.write_rows(buf)?;
        w.finish()?;
        *seq += 1;
        buf.clear();
        Ok(())
    };
    'outer: for group in (0..sessions).step_by(CONCURRENT) {
        let members = group..(group + CONCURRENT).min(sessions);
        for k in 0..ROWS_PER_SESSION {
            for s in members.clone() {
                if written == rows {
                    break 'outer;
                }
                let t = T0 + written as i64 * 100;
                buf.push(row(s, k, t));
                written += 1;
                if buf.len() == SEGMENT_ROWS {
                    flush(&mut buf, &mut seq)?;
                }
            }
        }
    }
    flush(&mut buf, &mut seq)?;
    println!("{{\"rows\": {written}, \"segments\": {seq}, \"sessions\": {sessions}}}");
    Ok(())
}
