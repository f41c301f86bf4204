//! Rollout Parquet I/O throughput (rows/s): write, streaming read, typed read and
//! read→write pass-through, on realistic rows (a 300-token prompt, a 100-token
//! response with log-probs, ~2 KB of text). Run by `scripts/bench-rollout`, which
//! also times pyarrow on the same file for a peer comparison.
//!
//!   cargo run --release --example bench_rollout -- ROWS DIR

use std::time::Instant;

use anyhow::{Context, Result};
use claw::rollout::{RolloutReader, RolloutRow, RolloutWriter};

fn row(i: usize) -> RolloutRow {
    let text: String = (0..40)
        .map(|w| format!("word{} ", (i * 7 + w) % 997))
        .collect();
    RolloutRow {
        sample_id: format!("chatcmpl-{i:012}"),
        session_id: format!("session-{}", i / 8),
        turn: Some((i % 8) as i32 + 1),
        turn_type: "main".into(),
        created_at: 1_764_000_000_000 + i as i64,
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        policy_version: (i / 1000) as i64,
        messages_json: format!(r#"[{{"role":"user","content":"{text}"}}]"#),
        prompt_text: format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"),
        response_text: text.clone(),
        prompt_ids: (0..300).map(|t| ((i + t) % 49152) as i32).collect(),
        response_ids: (0..100).map(|t| ((i * 3 + t) % 49152) as i32).collect(),
        response_logprobs: (0..100).map(|t| -((t % 17) as f32) * 0.1).collect(),
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

fn rate(rows: usize, seconds: f64) -> f64 {
    rows as f64 / seconds.max(1e-9)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let dir = std::path::PathBuf::from(args.get(2).context("usage: bench_rollout ROWS DIR")?);
    let source = dir.join("bench.parquet");
    let copy = dir.join("bench-copy.parquet");
    let batch_rows = 4096;

    // Only the writer is timed: making the test rows (string formatting) is not.
    let mut write_s = 0.0;
    let mut writer = RolloutWriter::file(&source)?;
    for chunk_start in (0..rows).step_by(batch_rows) {
        let chunk: Vec<RolloutRow> = (chunk_start..(chunk_start + batch_rows).min(rows))
            .map(row)
            .collect();
        let start = Instant::now();
        writer.write_rows(&chunk)?;
        write_s += start.elapsed().as_secs_f64();
    }
    let start = Instant::now();
    writer.finish()?;
    write_s += start.elapsed().as_secs_f64();

    let input = [source.to_string_lossy().into_owned()];
    let start = Instant::now();
    let mut read = 0;
    for batch in RolloutReader::new(&input)? {
        read += batch?.num_rows();
    }
    let read_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut typed = 0;
    for batch in RolloutReader::new(&input)? {
        typed += batch?.rows()?.len();
    }
    let typed_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut writer = RolloutWriter::file(&copy)?;
    for batch in RolloutReader::new(&input)? {
        writer.write(&batch?.into_batch())?;
    }
    let copied = writer.finish()?;
    let copy_s = start.elapsed().as_secs_f64();

    anyhow::ensure!(
        read == rows && typed == rows && copied as usize == rows,
        "row count mismatch"
    );
    let report = serde_json::json!({
        "rows": rows,
        "file_bytes": std::fs::metadata(&source)?.len(),
        "write_rows_per_s": rate(rows, write_s),
        "read_batches_rows_per_s": rate(rows, read_s),
        "read_typed_rows_per_s": rate(rows, typed_s),
        "pass_through_rows_per_s": rate(rows, copy_s),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
