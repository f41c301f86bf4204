//! Adapters in another engine: a claw adapter written as GGUF LoRA
//! (`claw adapter export --gguf`) and loaded by llama.cpp's own server
//! (`--lora`) gives the replies claw gives with the same adapter, and not the
//! base model's. Skipped with a message when llama-server or the model is absent.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use claw::adapter::{Adapter, LoraConfig};
use claw::model::Model;
use claw::train::checkpoint::CheckpointDir;
use common::llama::{llama_server, post, start_llama, Killed};
use serde_json::{json, Value as Json};

/// A rank-8 adapter on every linear of `model` with random B (std `sigma`),
/// saved as checkpoint step 1 in `dir`; returns the safetensors path.
fn random_adapter(model: &Path, dir: &Path, sigma: f32) -> PathBuf {
    random_checkpoint(model, &CheckpointDir::create(dir).unwrap(), 1, sigma)
}

/// [`random_adapter`] as checkpoint `step` of `checkpoints` (which may also
/// write the GGUF).
fn random_checkpoint(model: &Path, checkpoints: &CheckpointDir, step: u64, sigma: f32) -> PathBuf {
    let model = Model::load(model).unwrap();
    let adapter = Adapter::new(
        &model.decoder.to_float().unwrap().to_hf_layout().unwrap(),
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            ..Default::default()
        },
        3,
    )
    .unwrap();
    for p in &adapter.pairs {
        let b = Tensor::randn(0f32, sigma, p.b.shape(), &Device::Cpu).unwrap();
        p.b.set(&b).unwrap();
    }
    checkpoints
        .save(&adapter, "SmolLM2-135M-Instruct", step, None, None)
        .unwrap()
}

/// Greedy replies of an OpenAI-compatible server at `base` to `prompts`.
fn replies(base: &str, prompts: &[&str], max_tokens: usize) -> Vec<String> {
    prompts
        .iter()
        .map(|p| {
            let (status, body, _) = post(
                &format!("{base}/v1/chat/completions"),
                &[],
                &json!({
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }),
            );
            assert_eq!(status, 200, "{body}");
            let reply: Json = serde_json::from_str(&body).unwrap();
            reply["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_gguf_lora_export_answers_in_llama_server_as_claw_does() {
    let Some(bin) = llama_server() else { return };
    let Some(model) = common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let adapter = random_adapter(&model, &checkpoints, 0.02);

    // The CLI writes the GGUF beside the adapter.
    let out = common::claw()
        .args(["adapter", "export"])
        .arg(&adapter)
        .arg("--gguf")
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gguf = checkpoints.join("adapter-000001.gguf");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        gguf.display().to_string()
    );

    let prompts = [
        "What is the capital of France?",
        "Write one sentence about the sea.",
        "Name three colours.",
    ];
    let max_tokens = 12;
    let gguf_arg = gguf.to_string_lossy().into_owned();
    let (llama_lora, with_lora) = start_llama(&bin, &model, &["--lora", &gguf_arg]);
    let engine = replies(&with_lora, &prompts, max_tokens);
    // The adapter the engine loaded is the file claw wrote.
    let loaded: Json = ureq::get(&format!("{with_lora}/lora-adapters"))
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(loaded[0]["path"], gguf_arg.as_str(), "{loaded}");
    assert_eq!(loaded[0]["scale"], 1.0, "{loaded}");
    drop::<Killed>(llama_lora);

    let (llama_base, base_url) = start_llama(&bin, &model, &[]);
    let base = replies(&base_url, &prompts, max_tokens);
    drop::<Killed>(llama_base);

    let data = dir.path().join("data");
    let adapter_arg = adapter.to_string_lossy().into_owned();
    let (mut claw, claw_url, log) = common::spawn_server(
        &model,
        &data,
        &["--adapter", &adapter_arg, "--no-reload", "--no-record"],
    );
    let own = replies(&claw_url, &prompts, max_tokens);
    let _ = claw.kill();
    let _ = claw.wait();

    for ((p, e), (o, b)) in prompts.iter().zip(&engine).zip(own.iter().zip(&base)) {
        eprintln!("{p}\n  adapted: {e:?}\n  base:    {b:?}");
        assert_eq!(
            e,
            o,
            "{p}: llama-server --lora vs claw --adapter\n{}",
            log.lock().unwrap()
        );
        assert_ne!(e, b, "{p}: the adapter changes nothing");
    }
}
