//! `claw serve --upstream URL --upstream-adapters vllm|sglang`: new checkpoints
//! are loaded into the engine through its LoRA endpoints, against loopback mock
//! engines that answer as vLLM's and SGLang's sources do (the request and
//! response shapes are cited in src/serve/push.rs). Checked: the
//! exact JSON of each call, the order (load the new adapter, switch, wait for
//! the old adapter's requests, unload it), that a failed load keeps the old
//! adapter and is counted, and that every row records the adapter the engine
//! was asked to use.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::llama::{rows, start_claw, stop};
use candle_core::{Device, Tensor};
use claw::adapter::{Adapter, LoraConfig};
use claw::model::Model;
use claw::train::checkpoint::CheckpointDir;
use serde_json::{json, Value as Json};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Vllm,
    Sglang,
}

/// What the mock engine saw and how it should answer.
#[derive(Default)]
struct Engine {
    /// (path, body) of every call, and `("chat-done", model)` when a chat
    /// response was sent, in order.
    log: Vec<(String, Json)>,
    fail_loads: bool,
    /// The next chat answers after this long.
    slow_next: Option<Duration>,
}

type Shared = Arc<Mutex<Engine>>;

/// A one-request-per-connection HTTP/1.1 engine on a loopback port.
fn mock_engine(kind: Kind) -> (String, Shared) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state: Shared = Arc::default();
    let shared = state.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let state = shared.clone();
            std::thread::spawn(move || serve_one(stream, kind, &state));
        }
    });
    (url, state)
}

fn serve_one(stream: TcpStream, kind: Kind, state: &Shared) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let body: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
    let (fail, slow) = {
        let mut s = state.lock().unwrap();
        s.log.push((path.clone(), body.clone()));
        let slow = if path == "/v1/chat/completions" {
            s.slow_next.take()
        } else {
            None
        };
        (s.fail_loads, slow)
    };
    let name = body["lora_name"].as_str().unwrap_or_default().to_string();
    let (status, content_type, text) = match (method.as_str(), path.as_str(), kind) {
        ("GET", "/v1/models", _) => (200, "application/json", json!({"object": "list", "data": [{"id": "base"}]}).to_string()),
        // vllm/entrypoints/serve/lora/api_router.py: 200 with the handler's
        // text; an ErrorResponse as JSON with its code.
        ("POST", "/v1/load_lora_adapter", Kind::Vllm) if fail => (
            400,
            "application/json",
            json!({"object": "error", "message": format!("Loading lora {name} failed"), "type": "BadRequestError", "param": null, "code": 400}).to_string(),
        ),
        ("POST", "/v1/load_lora_adapter", Kind::Vllm) => (200, "text/plain", format!("Success: LoRA adapter '{name}' added successfully.")),
        ("POST", "/v1/unload_lora_adapter", Kind::Vllm) => (200, "text/plain", format!("Success: LoRA adapter '{name}' removed successfully.")),
        // sglang http_server.py: LoRAUpdateOutput, 200 on success, else 400.
        ("POST", "/load_lora_adapter", Kind::Sglang) if fail => (
            400,
            "application/json",
            json!({"success": false, "error_message": format!("Failed to load {name}"), "loaded_adapters": null}).to_string(),
        ),
        ("POST", "/load_lora_adapter" | "/unload_lora_adapter", Kind::Sglang) => (
            200,
            "application/json",
            json!({"success": true, "error_message": null, "loaded_adapters": {}}).to_string(),
        ),
        ("POST", "/v1/chat/completions", _) => {
            if let Some(d) = slow {
                std::thread::sleep(d);
            }
            let model = body["model"].clone();
            (
                200,
                "application/json",
                json!({
                    "id": "chatcmpl-mock", "object": "chat.completion", "created": 1,
                    "model": model,
                    "choices": [{"index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "logprobs": {"content": [{"token": "ok", "logprob": -0.25, "bytes": [111, 107], "top_logprobs": []}]},
                        "finish_reason": "stop",
                        "token_ids": [42]}],
                    "prompt_token_ids": [1, 2, 3],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                })
                .to_string(),
            )
        }
        _ => (404, "application/json", json!({"detail": "Not Found"}).to_string()),
    };
    let mut stream = stream;
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.flush();
    if path == "/v1/chat/completions" {
        let model = if body["lora_path"].is_string() {
            body["lora_path"].clone()
        } else {
            body["model"].clone()
        };
        state.lock().unwrap().log.push(("chat-done".into(), model));
    }
}

/// Saves a rank-2 adapter for `model` with random B as checkpoint `step`.
fn save_checkpoint(model: &Model, checkpoints: &Path, step: u64) {
    let adapter = Adapter::new(
        &model.decoder.to_float().unwrap().to_hf_layout().unwrap(),
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..Default::default()
        },
        step,
    )
    .unwrap();
    for p in &adapter.pairs {
        p.b.set(&Tensor::randn(0f32, 0.1, p.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    CheckpointDir::create(checkpoints)
        .unwrap()
        .save(&adapter, "tiny", step, None, None)
        .unwrap();
}

/// Waits until the engine's log has an entry `pred` accepts; its index.
fn wait_for(state: &Shared, what: &str, pred: impl Fn(&(String, Json)) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = state.lock().unwrap().log.iter().position(&pred) {
            return i;
        }
        assert!(Instant::now() < deadline, "the engine never saw {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until claw serves `version` (its /healthz).
fn wait_version(base: &str, version: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: Json = ureq::get(&format!("{base}/healthz"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if health["policy_version"] == version {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never served {version}: {health}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One chat through claw; the policy version it reports.
fn chat(base: &str) -> i64 {
    let response = ureq::post(&format!("{base}/v1/chat/completions"))
        .timeout(Duration::from_secs(60))
        .send_json(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .unwrap();
    let version = response
        .header("x-claw-policy-version")
        .unwrap()
        .parse()
        .unwrap();
    let body: Json = response.into_json().unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    version
}

/// The models (vLLM) or lora_paths (SGLang) the engine's chats named, in order.
fn chat_models(state: &Shared, kind: Kind) -> Vec<String> {
    state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|(p, _)| p == "/v1/chat/completions")
        .map(|(_, b)| match kind {
            Kind::Vllm => b["model"].as_str().unwrap().to_string(),
            Kind::Sglang => b["lora_path"].as_str().unwrap_or("base").to_string(),
        })
        .collect()
}

fn load_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Vllm => "/v1/load_lora_adapter",
        Kind::Sglang => "/load_lora_adapter",
    }
}

fn unload_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Vllm => "/v1/unload_lora_adapter",
        Kind::Sglang => "/unload_lora_adapter",
    }
}

fn loaded_name(state: &Shared, kind: Kind, step: u64) -> (usize, String) {
    let prefix = format!("claw-{step:06}-");
    let at = wait_for(state, &format!("a load of step {step}"), |(p, b)| {
        p == load_path(kind)
            && b["lora_name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&prefix))
    });
    let name = state.lock().unwrap().log[at].1["lora_name"]
        .as_str()
        .unwrap()
        .to_string();
    (at, name)
}

fn push_scenario(kind: Kind, engine_flag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&crate::common::tiny_model(dir.path())).unwrap();
    let data = dir.path().join("data");
    let checkpoints = data.join("checkpoints");
    let (url, engine) = mock_engine(kind);
    let (claw, base, log) = start_claw(
        &url,
        &data,
        &[
            "--upstream-adapters",
            engine_flag,
            "--reload-poll-ms",
            "100",
            "--segment-age-ms",
            "200",
        ],
    );

    // No checkpoint yet: the base model.
    assert_eq!(chat(&base), 0);

    // Step 1: loaded with exactly the documented body, then used.
    save_checkpoint(&model, &checkpoints, 1);
    let (_, first) = loaded_name(&engine, kind, 1);
    let load_body = engine
        .lock()
        .unwrap()
        .log
        .iter()
        .find(|(p, _)| p == load_path(kind))
        .unwrap()
        .1
        .clone();
    let peft = std::fs::canonicalize(checkpoints.join("peft/adapter-000001")).unwrap();
    assert_eq!(
        load_body,
        json!({"lora_name": first, "lora_path": peft.to_string_lossy()})
    );
    assert!(peft.join("adapter_model.safetensors").is_file());
    assert!(peft.join("adapter_config.json").is_file());
    wait_version(&base, 1);
    assert_eq!(chat(&base), 1);

    // Step 2 while a request admitted under step 1 is still generating: the new
    // adapter is loaded and used at once; the old one is unloaded only after
    // that request has finished.
    engine.lock().unwrap().slow_next = Some(Duration::from_millis(1500));
    let slow_base = base.clone();
    let slow = std::thread::spawn(move || chat(&slow_base));
    let deadline = Instant::now() + Duration::from_secs(30);
    while chat_models(&engine, kind).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the slow chat never reached the engine"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    save_checkpoint(&model, &checkpoints, 2);
    let (load_at, second) = loaded_name(&engine, kind, 2);
    wait_version(&base, 2);
    assert_eq!(chat(&base), 2);
    assert_eq!(slow.join().unwrap(), 1, "the slow request keeps its policy");
    let unload_at = wait_for(&engine, "the unload of step 1", |(p, b)| {
        p == unload_path(kind) && b == &json!({"lora_name": first})
    });
    let slow_done = engine
        .lock()
        .unwrap()
        .log
        .iter()
        .rposition(|(p, b)| p == "chat-done" && b == &json!(first))
        .unwrap();
    assert!(
        load_at < unload_at,
        "load the new adapter before unloading the old"
    );
    assert!(
        slow_done < unload_at,
        "the old adapter was unloaded while a request used it"
    );
    // serve removes the exported copy once the engine has answered the unload:
    // on a busy machine a moment after the engine logged it.
    let exported = checkpoints.join("peft/adapter-000001");
    let deadline = Instant::now() + Duration::from_secs(30);
    while exported.exists() {
        assert!(
            Instant::now() < deadline,
            "the exported copy of step 1 was never removed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Step 3 fails to load: step 2 keeps serving, and the failure is counted.
    engine.lock().unwrap().fail_loads = true;
    save_checkpoint(&model, &checkpoints, 3);
    loaded_name(&engine, kind, 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log
        .lock()
        .unwrap()
        .contains("still serving policy version 2")
    {
        assert!(Instant::now() < deadline, "{}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(chat(&base), 2);
    let metrics = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("claw_adapter_load_errors_total 1"),
        "{metrics}"
    );
    assert!(
        !engine
            .lock()
            .unwrap()
            .log
            .iter()
            .any(|(p, b)| p == unload_path(kind) && b == &json!({"lora_name": second})),
        "the serving adapter was unloaded"
    );
    stop(claw, &log);

    // Every row records the adapter its request named.
    let names = chat_models(&engine, kind);
    assert_eq!(
        names,
        vec![
            "base".to_string(),
            first.clone(),
            first.clone(),
            second.clone(),
            second.clone()
        ]
    );
    let mut versions: Vec<i64> = rows(&data)
        .iter()
        .filter(|r| r.turn_type == "main")
        .map(|r| r.policy_version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, vec![0, 1, 1, 2, 2]);
}

#[test]
fn upstream_push_vllm_loads_switches_and_unloads_in_order() {
    push_scenario(Kind::Vllm, "vllm");
}

#[test]
fn upstream_push_sglang_loads_switches_and_unloads_in_order() {
    push_scenario(Kind::Sglang, "sglang");
}

#[test]
fn upstream_adapters_needs_upstream() {
    let out = crate::common::claw()
        .args(["serve", "--upstream-adapters", "vllm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
