//! Adapters in another engine: a claw adapter written as GGUF LoRA
//! (`claw adapter export --gguf`) and loaded by llama.cpp's own server
//! (`--lora`) gives the replies claw gives with the same adapter, and not the
//! base model's. Skipped with a message when llama-server or the model is absent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::llama::{
    free_port, llama_server, post, rows, start_claw, start_llama, start_llama_on, stop, Killed,
};
use candle_core::{Device, Tensor};
use claw::adapter::gguf::GgufBase;
use claw::adapter::{Adapter, LoraConfig};
use claw::model::Model;
use claw::train::checkpoint::CheckpointDir;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};

/// A rank-8 adapter on every linear of `model` with B uniform in ±`sigma`,
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
    // Seeded, so every run tests the same adapter.
    let mut rng = StdRng::seed_from_u64(step);
    for p in &adapter.pairs {
        let values: Vec<f32> = (0..p.b.elem_count())
            .map(|_| rng.gen_range(-sigma..sigma))
            .collect();
        let b = Tensor::from_vec(values, p.b.shape(), &Device::Cpu).unwrap();
        p.b.set(&b).unwrap();
    }
    checkpoints
        .save(&adapter, "SmolLM2-135M-Instruct", step, None, None)
        .unwrap()
}

/// Greedy replies of an OpenAI-compatible server at `base` to `prompts`, with
/// the prompt's token count. A system message is given, so llama-server's
/// template and the GGUF's (which adds a default system prompt when there is
/// none) render the same prompt.
fn replies(base: &str, prompts: &[&str], max_tokens: usize) -> Vec<(String, u64)> {
    prompts
        .iter()
        .map(|p| {
            let (status, body, _) = post(
                &format!("{base}/v1/chat/completions"),
                &[],
                &json!({
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": p},
                    ],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }),
            );
            assert_eq!(status, 200, "{body}");
            let reply: Json = serde_json::from_str(&body).unwrap();
            (
                reply["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                reply["usage"]["prompt_tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_gguf_lora_export_answers_in_llama_server_as_claw_does() {
    let Some(bin) = llama_server() else { return };
    let Some(model) = crate::common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let adapter = random_adapter(&model, &checkpoints, 0.035);

    // The CLI writes the GGUF beside the adapter.
    let out = crate::common::claw()
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
    // claw's kernels and llama.cpp's round differently (llama.cpp multiplies
    // 8-bit activations), so a long greedy continuation can split where two
    // tokens are near-tied; 8 tokens of three prompts is well clear of that.
    let max_tokens = 8;
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
    let (mut claw, claw_url, log) = crate::common::spawn_server(
        &model,
        &data,
        &["--adapter", &adapter_arg, "--no-reload", "--no-record"],
    );
    let own = replies(&claw_url, &prompts, max_tokens);
    let _ = claw.kill();
    let _ = claw.wait();

    for ((p, e), (o, b)) in prompts.iter().zip(&engine).zip(own.iter().zip(&base)) {
        eprintln!("{p}\n  adapted: {:?}\n  base:    {:?}", e.0, b.0);
        assert_eq!(e.1, o.1, "{p}: the engines rendered different prompts");
        assert_eq!(
            e.0,
            o.0,
            "{p}: llama-server --lora vs claw --adapter\n{}",
            log.lock().unwrap()
        );
        assert_ne!(e.0, b.0, "{p}: the adapter changes nothing");
    }
}

/// The policy version claw reports for one chat.
fn chat_version(base: &str) -> i64 {
    let response = ureq::post(&format!("{base}/v1/chat/completions"))
        .timeout(Duration::from_secs(120))
        .send_json(json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
        .unwrap();
    response
        .header("x-claw-policy-version")
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits for `what` in claw's log.
fn wait_log(log: &std::sync::Mutex<String>, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !log.lock().unwrap().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} in:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// llama-server cannot load an adapter at run time: claw writes the GGUF, says
/// how to restart the engine with it, and records the version the engine
/// applies (its GET /lora-adapters), before and after that restart.
#[test]
fn upstream_llama_cpp_records_the_adapter_the_engine_applies() {
    let Some(bin) = llama_server() else { return };
    let Some(model) = crate::common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let checkpoints = data.join("checkpoints");
    // Step 1 written by train's --gguf path; step 2 left for serve to convert.
    let with_gguf = CheckpointDir::create(&checkpoints)
        .unwrap()
        .with_gguf(GgufBase::from_model_file(&model).unwrap());
    random_checkpoint(&model, &with_gguf, 1, 0.02);
    let step1 = checkpoints.join("adapter-000001.gguf");
    assert!(step1.is_file());

    let port = free_port();
    let step1_arg = step1.to_string_lossy().into_owned();
    let (llama, url) = start_llama_on(&bin, &model, port, &["--lora", &step1_arg]);
    let model_arg = model.to_string_lossy().into_owned();
    let (claw, base, log) = start_claw(
        &url,
        &data,
        &[
            "--upstream-adapters",
            "llama-cpp",
            "--model",
            &model_arg,
            "--reload-poll-ms",
            "200",
            "--segment-age-ms",
            "200",
        ],
    );
    wait_log(&log, "serving policy version 1");
    assert_eq!(chat_version(&base), 1);

    // A new checkpoint: written as GGUF, but the engine still applies step 1.
    random_checkpoint(
        &model,
        &CheckpointDir::create(&checkpoints).unwrap(),
        2,
        0.02,
    );
    let step2 = checkpoints.join("adapter-000002.gguf");
    wait_log(&log, &format!("--lora {}", step2.display()));
    assert!(step2.is_file());
    assert_eq!(chat_version(&base), 1);

    // The engine restarted with step 2 where claw expects it: recorded as 2.
    drop::<Killed>(llama);
    let step2_arg = step2.to_string_lossy().into_owned();
    let (_llama, _) = start_llama_on(&bin, &model, port, &["--lora", &step2_arg]);
    wait_log(&log, "serving policy version 2");
    assert_eq!(chat_version(&base), 2);
    stop(claw, &log);

    let mut versions: Vec<i64> = rows(&data)
        .iter()
        .filter(|r| r.turn_type == "main")
        .map(|r| r.policy_version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, vec![1, 1, 2]);
}
