//! `claw train` as a user runs it: samples in, checkpoints out, resume, pruning,
//! and the adapter's effect on the model; plus the real default model (SFT on a
//! persona fixture lowers the held-out loss; one 16-sample RL step is timed).

use std::path::{Path, PathBuf};

use crate::common::*;
use claw::rollout::RolloutRow;

fn sample(i: usize, reward: Option<f32>) -> RolloutRow {
    RolloutRow {
        sample_id: format!("s{i}"),
        session_id: format!("sess{i}"),
        turn: Some(1),
        turn_type: "main".into(),
        model: "tiny".into(),
        messages_json: "[]".into(),
        prompt_ids: vec![1, 104, 105, 106, 2, 1],
        response_ids: vec![
            if i.is_multiple_of(2) { 120 } else { 121 },
            100 + i as i32,
            2,
        ],
        response_logprobs: vec![-1.0; 3],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        reward,
        ..Default::default()
    }
}

fn run_ok(cmd: &mut std::process::Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "claw failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn trains_writes_checkpoints_resumes_and_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("judged.parquet");
    // 8 with a reward, 3 with reward 0 (no signal), 1 unjudged.
    let mut rows: Vec<RolloutRow> = (0..8)
        .map(|i| sample(i, Some(if i.is_multiple_of(2) { 1.0 } else { -1.0 })))
        .collect();
    rows.extend((8..11).map(|i| sample(i, Some(0.0))));
    rows.push(sample(11, None));
    write_rows(&input, &rows);
    let out = dir.path().join("ckpt");

    let (stdout, stderr) = run_ok(
        claw()
            .args([
                "train",
                "--batch-size",
                "4",
                "--lora-rank",
                "4",
                "--lr",
                "1e-2",
                "--keep",
                "2",
                "--json",
            ])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["steps"], 2, "{stderr}");
    assert_eq!(report["samples_trained"], 8);
    assert_eq!(report["skipped"]["no_signal"], 4);
    assert!(stderr.contains("4 without signal"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("LATEST")).unwrap().trim(),
        "adapter-000002.safetensors"
    );
    for name in [
        "adapter-000002.safetensors",
        "adapter-000002.json",
        "adapter-000002.optim.safetensors",
        "adapter-000001.safetensors",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter-000002.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["claw_step"], 2);
    assert_eq!(config["claw_metrics"]["step"], 2);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);

    // Resume: steps continue at 3 and 4; only the last two checkpoints are kept.
    let (stdout, stderr) = run_ok(
        claw()
            .args([
                "train",
                "--batch-size",
                "4",
                "--resume",
                "--keep",
                "2",
                "--json",
            ])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["first_step"], 2, "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("LATEST")).unwrap().trim(),
        "adapter-000004.safetensors"
    );
    assert!(!out.join("adapter-000002.safetensors").exists(), "pruned");
    assert!(
        !out.join("adapter-000002.optim.safetensors").exists(),
        "pruned"
    );
    assert!(out.join("adapter-000003.safetensors").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter-000004.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4, "the resumed adapter keeps its rank");

    // Stale samples are dropped: the trainer is at step 4, the samples at version 0.
    let (stdout, _) = run_ok(
        claw()
            .args([
                "train",
                "--batch-size",
                "4",
                "--resume",
                "--max-staleness",
                "2",
                "--json",
            ])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["steps"], 0);
    assert_eq!(report["skipped"]["stale"], 8);
}

#[test]
fn reads_samples_from_a_pipe_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("s.parquet");
    write_rows(
        &input,
        &(0..4).map(|i| sample(i, Some(1.0))).collect::<Vec<_>>(),
    );
    let out = dir.path().join("ckpt");
    let file = std::fs::File::open(&input).unwrap();
    let output = claw()
        .args(["train", "--batch-size", "2", "--lora-rank", "2", "--json"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .stdin(file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["steps"], 2);

    // Not a rollout: a clear error naming the file, exit 1.
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"not parquet").unwrap();
    let output = claw()
        .arg("train")
        .arg(&bad)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.parquet"), "{stderr}");

    // A broken LoRA target list is a usage error that says what is allowed.
    let output = claw()
        .args(["train", "--lora-targets", "q,attn"])
        .arg(&input)
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("q,k,v,o,gate,up,down"));
}

#[test]
fn lm_objective_trains_on_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let text = dir.path().join("corpus.txt");
    std::fs::write(&text, "hello there, the cat sat on the mat. ".repeat(20)).unwrap();
    let (stdout, _) = run_ok(
        claw()
            .args([
                "train",
                "--objective",
                "lm",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
            ])
            .args(["--lr", "1e-2", "--epochs", "3", "--json"])
            .arg(&text)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.path().join("ckpt")),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (first, last) = (
        report["first_loss"].as_f64().unwrap(),
        report["last_loss"].as_f64().unwrap(),
    );
    assert!(last < first, "lm loss {first} -> {last}");
}

/// On the real model: SFT on a persona fixture (imported with `claw collect`)
/// lowers the loss on held-out conversations of the same persona.
#[test]
fn real_model_sft_lowers_held_out_loss() {
    let Some(model) = real_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/train");
    let mut parquet = Vec::new();
    for name in ["pirate-train", "pirate-heldout"] {
        let out = dir.path().join(format!("{name}.parquet"));
        run_ok(
            claw()
                .arg("collect")
                .arg(fixtures.join(format!("{name}.jsonl")))
                .arg("--model")
                .arg(&model)
                .arg("-o")
                .arg(&out),
        );
        parquet.push(out);
    }
    let (stdout, stderr) = run_ok(
        claw()
            .args([
                "train",
                "--objective",
                "sft",
                "--batch-size",
                "14",
                "--lr",
                "1e-3",
            ])
            .args(["--max-steps", "3", "--json"])
            .arg(&parquet[0])
            .arg("--eval")
            .arg(&parquet[1])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.path().join("ckpt")),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let before = report["eval_loss_before"].as_f64().unwrap();
    let after = report["eval_loss_after"].as_f64().unwrap();
    eprintln!("real model SFT: held-out loss {before:.3} -> {after:.3}\n{stderr}");
    assert!(after < before * 0.8, "held-out loss {before} -> {after}");
}

/// On the real model: one RL step of 16 samples runs; its time and peak RSS are
/// printed (the numbers for BENCHMARKS.md come from scripts/bench-train).
#[test]
fn real_model_rl_step_of_16_samples() {
    let Some(model) = real_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/train");
    let samples = dir.path().join("samples.parquet");
    run_ok(
        claw()
            .arg("collect")
            .arg(fixtures.join("pirate-train.jsonl"))
            .arg("--model")
            .arg(&model)
            .arg("-o")
            .arg(&samples),
    );
    // Reward alternates +1 / -1.
    let mut rows = claw::rollout::RolloutReader::new(&[samples.to_string_lossy().into_owned()])
        .unwrap()
        .read_all_rows()
        .unwrap();
    rows.truncate(16);
    for (i, row) in rows.iter_mut().enumerate() {
        row.reward = Some(if i.is_multiple_of(2) { 1.0 } else { -1.0 });
    }
    let judged = dir.path().join("judged.parquet");
    write_rows(&judged, &rows);
    let (stdout, stderr) = run_ok(
        claw()
            .args(["train", "--batch-size", "16", "--json"])
            .arg(&judged)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.path().join("ckpt")),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["steps"], 1, "{stderr}");
    eprintln!(
        "real model RL step: 16 samples, {} response tokens, {:.1} s, peak RSS {:.0} MB",
        report["tokens_trained"],
        report["train_seconds"].as_f64().unwrap(),
        report["peak_rss_mb"].as_f64().unwrap_or(0.0)
    );
}

/// On the real Qwen2.5-0.5B (Q4_K_M, 151k vocabulary, q/k/v biases): one RL step
/// and one SFT step of `claw train` run and report a finite loss; time and peak
/// RSS are printed for the record.
#[test]
fn qwen_model_trains_one_rl_and_one_sft_step_when_fetched() {
    let Some(model) = qwen_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/train");
    let samples = dir.path().join("samples.parquet");
    run_ok(
        claw()
            .arg("collect")
            .arg(fixtures.join("pirate-train.jsonl"))
            .arg("--model")
            .arg(&model)
            .arg("-o")
            .arg(&samples),
    );
    let mut rows = read_rows(&samples);
    rows.truncate(4);
    for (i, row) in rows.iter_mut().enumerate() {
        row.reward = Some(if i.is_multiple_of(2) { 1.0 } else { -1.0 });
    }
    let judged = dir.path().join("judged.parquet");
    write_rows(&judged, &rows);
    for objective in ["rl", "sft"] {
        let (stdout, stderr) = run_ok(
            claw()
                .args(["train", "--objective", objective, "--batch-size", "4"])
                .args(["--lr", "1e-4", "--max-steps", "1", "--json"])
                .arg(&judged)
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(dir.path().join(format!("ckpt-{objective}"))),
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["steps"], 1, "{objective}: {stderr}");
        assert_eq!(report["samples_trained"], 4, "{objective}: {stderr}");
        let loss = report["last_loss"].as_f64().unwrap();
        assert!(loss.is_finite(), "{objective}: loss {loss}");
        // The adapter's config records the step's metrics: a real gradient.
        let config = dir
            .path()
            .join(format!("ckpt-{objective}"))
            .join("adapter-000001.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let grad_norm = config["claw_metrics"]["grad_norm"].as_f64().unwrap();
        assert!(
            grad_norm.is_finite() && grad_norm > 0.0,
            "{objective}: gradient norm {grad_norm}"
        );
        eprintln!(
            "Qwen2.5-0.5B {objective} step: 4 samples, {} response tokens, loss {loss:.4}, \
             gradient norm {grad_norm:.3}, {:.1} s, peak RSS {:.0} MB",
            report["tokens_trained"],
            report["train_seconds"].as_f64().unwrap(),
            report["peak_rss_mb"].as_f64().unwrap_or(0.0)
        );
    }
}

/// A pipe carries Parquet segments back to back; `claw train` trains on each
/// batch as soon as it is full, while the producer is still writing.
#[test]
fn trains_on_a_stream_as_segments_arrive() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
    write_rows(
        &a,
        &(0..2).map(|i| sample(i, Some(1.0))).collect::<Vec<_>>(),
    );
    write_rows(
        &b,
        &(2..4).map(|i| sample(i, Some(-1.0))).collect::<Vec<_>>(),
    );
    let out = dir.path().join("ckpt");
    let mut child = claw()
        .args(["train", "--batch-size", "2", "--lora-rank", "2", "--json"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&std::fs::read(&a).unwrap()).unwrap();
    stdin.flush().unwrap();
    // The first step happens before the second segment exists.
    let latest = out.join("LATEST");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !latest.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no step on the first segment"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stdin.write_all(&std::fs::read(&b).unwrap()).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["steps"], 2);
    assert_eq!(report["samples_trained"], 4);
}

/// The trainer's log-probs (f32 weights, Hugging Face layout, composed ops)
/// against the serving runtime's recorded ones for the same tokens, on the real
/// model: packed weights are the same function up to float rounding; ggml's
/// 8-bit activations move them more. The gaps are printed for the record.
#[test]
fn real_model_training_logprobs_match_serving() {
    use claw::model::WeightFormat;
    let Some(path) = real_model() else { return };
    training_logprobs_match_serving(
        &path,
        &[
            (WeightFormat::F32, 1e-3),
            (WeightFormat::Packed, 2e-2),
            (WeightFormat::Ggml, 1.0),
        ],
    );
}

/// The same on Qwen2.5-0.5B (q/k/v biases, RoPE on halves, untied head);
/// its k-quants run on candle's 8-bit-activation kernels in `packed` too.
#[test]
fn qwen_model_training_logprobs_match_serving_when_fetched() {
    use claw::model::WeightFormat;
    let Some(path) = qwen_model() else { return };
    training_logprobs_match_serving(
        &path,
        &[(WeightFormat::F32, 1e-3), (WeightFormat::Packed, 0.2)],
    );
}

fn training_logprobs_match_serving(path: &Path, bounds: &[(claw::model::WeightFormat, f32)]) {
    use claw::model::score::{self, Sequence};
    use claw::model::{Model, SamplingParams, WeightFormat};
    use claw::train::{Trainer, TrainerConfig};
    let prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n";
    let trainer_model = Model::load_with(path, WeightFormat::F32).unwrap();
    let trainer = Trainer::new(&trainer_model.decoder, TrainerConfig::default(), None).unwrap();
    let policy = trainer.frozen_policy().unwrap();
    let params = SamplingParams {
        max_tokens: 24,
        ..Default::default()
    };
    for &(format, bound) in bounds {
        let served = Model::load_with(path, format).unwrap();
        let ids = served.tokenizer.encode(prompt).unwrap();
        let generation = served
            .generate(&ids, &params, |_| claw::model::generate::Flow::Continue)
            .unwrap();
        let scored = score::score(
            &policy,
            &[Sequence {
                prompt: &ids,
                response: &generation.token_ids,
            }],
            4096,
        )
        .unwrap()
        .remove(0);
        let gap = scored
            .iter()
            .zip(&generation.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "serving {format:?} vs training f32: max |log-prob gap| {gap:.5} over {} tokens",
            scored.len()
        );
        assert!(gap < bound, "{format:?}: gap {gap}");
    }
}

/// `--full` writes every weight; `--base-weights` starts a new run from them.
#[test]
fn full_finetuning_checkpoint_is_a_base_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("s.parquet");
    write_rows(
        &input,
        &(0..2).map(|i| sample(i, Some(1.0))).collect::<Vec<_>>(),
    );
    let full = dir.path().join("full");
    run_ok(
        claw()
            .args([
                "train",
                "--full",
                "--objective",
                "sft",
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
            ])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&full),
    );
    let weights = full.join("model-000001.safetensors");
    assert!(weights.is_file());
    assert!(!full.join("LATEST").exists(), "LATEST names adapters only");
    let (stdout, stderr) = run_ok(
        claw()
            .args(["train", "--objective", "sft", "--batch-size", "2", "--json"])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--base-weights")
            .arg(&weights)
            .arg("--out")
            .arg(dir.path().join("lora")),
    );
    assert!(stderr.contains("base weights from"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["steps"], 1);
}

/// The loop closed: an adapter written by `claw train` is hot-loaded by a
/// running `claw serve`, which then answers differently (here: what the SFT
/// data taught it) and records the new policy version.
#[test]
fn a_trained_adapter_is_hot_loaded_by_serve_and_changes_its_answers() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model(dir.path());
    let data = dir.path().join("data");
    let (mut server, base, _log) = spawn_server(&model_path, &data, &["--reload-poll-ms", "100"]);
    let ask = || -> String {
        let reply: serde_json::Value = ureq::post(&format!("{base}/v1/chat/completions"))
            .send_json(serde_json::json!({
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0, "max_tokens": 6,
            }))
            .unwrap()
            .into_json()
            .unwrap();
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = ask();

    // SFT data: this prompt should be answered with "hello".
    let model = claw::model::Model::load(&model_path).unwrap();
    let prompt = model
        .template
        .render(
            &[serde_json::json!({"role": "user", "content": "hi"})],
            None,
            true,
        )
        .unwrap();
    let prompt_ids: Vec<i32> = model
        .tokenizer
        .encode(&prompt)
        .unwrap()
        .iter()
        .map(|&i| i as i32)
        .collect();
    let mut response_ids: Vec<i32> = model
        .tokenizer
        .encode("hello")
        .unwrap()
        .iter()
        .map(|&i| i as i32)
        .collect();
    response_ids.push(2);
    let rows: Vec<RolloutRow> = (0..4)
        .map(|i| RolloutRow {
            prompt_ids: prompt_ids.clone(),
            response_ids: response_ids.clone(),
            ..sample(i, None)
        })
        .collect();
    let input = dir.path().join("sft.parquet");
    write_rows(&input, &rows);
    let (stdout, stderr) = run_ok(
        claw()
            .args([
                "train",
                "--objective",
                "sft",
                "--batch-size",
                "4",
                "--epochs",
                "40",
            ])
            .args([
                "--lr",
                "1e-2",
                "--lora-rank",
                "8",
                "--save-every",
                "100",
                "--json",
            ])
            .arg(&input)
            .arg("--model")
            .arg(&model_path)
            .arg("--out")
            .arg(data.join("checkpoints")),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let steps = report["steps"].as_u64().unwrap();
    assert!(report["last_loss"].as_f64().unwrap() < 0.5, "{stderr}");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health: serde_json::Value = ureq::get(&format!("{base}/healthz"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if health["policy_version"].as_u64() == Some(steps) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not load step {steps}: {health}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = ask();
    let _ = server.kill();
    let _ = server.wait();
    assert_ne!(before, after, "the adapter did not change the answer");
    assert_eq!(
        after, "hello",
        "serve answers what the adapter was trained on"
    );
}

#[test]
fn an_out_of_vocabulary_id_names_the_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("foreign.parquet");
    let mut rows: Vec<RolloutRow> = (0..3).map(|i| sample(i, Some(1.0))).collect();
    rows[1].response_ids[1] = 999_999;
    write_rows(&input, &rows);
    let output = claw()
        .args(["train", "--batch-size", "2", "--lora-rank", "2"])
        .arg(&input)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("ckpt"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "foreign.parquet",
        "row 2",
        "sample s1",
        "`response_ids`[1] = 999999",
        "vocabulary",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    assert!(!stderr.contains("index-select"), "{stderr}");

    // a negative id, in the prompt
    let mut rows: Vec<RolloutRow> = (0..2).map(|i| sample(i, Some(1.0))).collect();
    rows[0].prompt_ids[2] = -5;
    write_rows(&input, &rows);
    let output = claw()
        .arg("train")
        .arg(&input)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("ckpt"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("row 1") && stderr.contains("`prompt_ids`[2] = -5"),
        "{stderr}"
    );
}

#[test]
fn hindsight_adds_a_demonstration_for_each_rewarded_retry_and_updates_per_batch_counts_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("judged.parquet");
    let retry = serde_json::json!([
        {"role": "user", "content": "What is DNA?"},
        {"role": "assistant", "content": "A long answer."},
        {"role": "user", "content": "Too long."},
    ])
    .to_string();
    // Two rewarded retries (each also becomes a demonstration), one retry
    // judged -1 and one first reply (neither does).
    let mut rows: Vec<RolloutRow> = (0..4)
        .map(|i| sample(i, Some(if i < 3 { 1.0 } else { -1.0 })))
        .collect();
    for row in &mut rows[..3] {
        row.messages_json = retry.clone();
    }
    rows[2].reward = Some(-1.0);
    write_rows(&input, &rows);
    let train = |extra: &[&str], out: &str| -> serde_json::Value {
        let (stdout, _) = run_ok(
            claw()
                .args(["train", "--batch-size", "2", "--lora-rank", "4", "--json"])
                .args(extra)
                .arg(&input)
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(dir.path().join(out)),
        );
        serde_json::from_str(&stdout).unwrap()
    };
    let plain = train(&[], "plain");
    assert_eq!(plain["samples_trained"], 4);
    let hindsight = train(
        &[
            "--hindsight",
            "--updates-per-batch",
            "3",
            "--reward-baseline",
            "recent",
        ],
        "hindsight",
    );
    assert_eq!(hindsight["samples_trained"], 6, "{hindsight}");
    // 3 batches of 2, 3 updates each; the last checkpoint is the last step's.
    assert_eq!(hindsight["steps"], 9, "{hindsight}");
    assert!(dir
        .path()
        .join("hindsight/adapter-000009.safetensors")
        .is_file());
}

#[test]
fn hint_replay_distills_each_hint_on_other_openings() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("distilled.parquet");
    let ask = |q: &str| serde_json::json!([{"role": "user", "content": q}]).to_string();
    // Four sessions' first replies: two corrected (a hint and its teacher
    // log-probs), two without a signal, which are not trained on but whose
    // openings are replayed.
    let mut rows: Vec<RolloutRow> = (0..4).map(|i| sample(i, None)).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        row.messages_json = ask(&format!("Question number {i}?"));
        if i < 2 {
            row.reward = Some(-1.0);
            row.hint = Some("That's too long.".into());
            row.teacher_logprobs = Some(vec![-0.5; 3]);
        }
    }
    rows.rotate_left(2);
    write_rows(&input, &rows);
    let out = dir.path().join("ckpt");
    let (stdout, stderr) = run_ok(
        claw()
            .args(["train", "--batch-size", "2", "--lora-rank", "4", "--json"])
            .args(["--hint-replay", "2", "--hint-at", "before"])
            .args(["--hint-replay-tokens", "8"])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["samples_trained"], 2, "{summary}");
    assert_eq!(summary["samples_replayed"], 4, "{summary}");
    assert!(stderr.contains("4 replay samples"), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(
        (step["samples"].as_u64(), step["replayed"].as_u64()),
        (Some(2), Some(4))
    );

    // Off by default: the same input trains its two samples and nothing else.
    let (stdout, _) = run_ok(
        claw()
            .args(["train", "--batch-size", "2", "--lora-rank", "4", "--json"])
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.path().join("plain")),
    );
    let plain: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plain["samples_replayed"], 0, "{plain}");
}

/// `n` rows, accepted and rejected in turn, in DIR/judged.parquet.
fn alternating_rows(dir: &Path, n: usize) -> PathBuf {
    let input = dir.join("judged.parquet");
    write_rows(
        &input,
        &(0..n)
            .map(|i| sample(i, Some(if i % 2 == 0 { 1.0 } else { -1.0 })))
            .collect::<Vec<_>>(),
    );
    input
}

/// `claw train --batch-size 2 --lora-rank 4 --json EXTRA INPUT` into DIR/OUT.
fn train_pairs(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    claw()
        .args(["train", "--batch-size", "2", "--lora-rank", "4", "--json"])
        .args(extra)
        .arg(input)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn the_anchor_adds_base_model_distillation_on_its_prompts_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = alternating_rows(dir.path(), 4);
    let prompts = dir.path().join("anchor.txt");
    std::fs::write(&prompts, "# mine\nWhat is 2 + 2?\nName a colour.\n").unwrap();
    let train =
        |extra: &[&str], out: &str| train_pairs(&model, &input, &dir.path().join(out), extra);
    let mut cmd = claw();
    let (stdout, stderr) = run_ok(
        cmd.args(["train", "--batch-size", "2", "--lora-rank", "4", "--json"])
            .args(["--anchor", "3", "--anchor-tokens", "4", "--anchor-prompts"])
            .arg(&prompts)
            .arg(&input)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.path().join("mine")),
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // Two steps of 2 rows, each with 3 anchor samples; only rows count as trained.
    assert_eq!(summary["samples_trained"], 4, "{summary}");
    assert_eq!(summary["samples_anchored"], 6, "{summary}");
    assert!(stderr.contains("anchor: 2 prompts, 3 a step"), "{stderr}");
    assert!(stderr.contains("6 anchor samples"), "{stderr}");
    let metrics = std::fs::read_to_string(dir.path().join("mine/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let step: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (step["samples"].as_u64(), step["anchored"].as_u64()),
            (Some(2), Some(3)),
            "{step}"
        );
    }

    // The built-in set needs no file.
    let out = train(&["--anchor", "1", "--anchor-tokens", "4"], "builtin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["samples_anchored"], 2, "{summary}");

    // Refused where it would do nothing, or with a file that is not there.
    let out = train(&["--anchor", "1", "--w-opd", "0"], "no-opd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--w-opd above 0"), "{stderr}");
    let missing = dir.path().join("missing.txt");
    let out = train(
        &[
            "--anchor",
            "1",
            "--anchor-prompts",
            missing.to_str().unwrap(),
        ],
        "missing",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read the anchor prompts") && stderr.contains("missing.txt"),
        "{stderr}"
    );
}

#[test]
fn self_imitation_trains_accepted_replies_of_earlier_steps_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Three steps of two rows: one accepted, one rejected each.
    let input = alternating_rows(dir.path(), 6);
    let train =
        |extra: &[&str], out: &str| train_pairs(&model, &input, &dir.path().join(out), extra);
    let out = train(
        &["--self-imitation", "2", "--reward-baseline", "batch-mean"],
        "imitating",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Step 1 has nothing to replay, step 2 the one accepted reply of step 1,
    // step 3 both earlier ones; only rows count as trained.
    assert_eq!(summary["samples_trained"], 6, "{summary}");
    assert_eq!(summary["samples_imitated"], 3, "{summary}");
    assert!(stderr.contains("3 self-imitation samples"), "{stderr}");
    let metrics = std::fs::read_to_string(dir.path().join("imitating/metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let imitated: Vec<_> = steps.iter().map(|s| s["imitated"].as_u64()).collect();
    assert_eq!(imitated, [Some(0), Some(1), Some(2)], "{metrics}");
    // The replays are not new judgements: each step's mean reward is its rows'.
    assert!(steps.iter().all(|s| s["mean_reward"] == 0.0), "{metrics}");

    // Refused where it would do nothing.
    let out = train(&["--self-imitation", "1", "--w-rl", "0"], "no-rl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--w-rl above 0"), "{stderr}");
}
