//! `claw serve` end to end: the real binary on a tiny random-weight model, on a
//! free loopback port in a temp dir, talked to only on 127.0.0.1.

use crate::common::spawn_server;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use claw::adapter::{Adapter, LoraConfig};
use claw::model::decoder::Decoder;
use claw::model::score::{score, Sequence};
use claw::model::testing::{write_tiny_gguf, TinySpec};
use claw::model::Model;
use claw::rollout::{RolloutReader, RolloutRow};
use claw::train::checkpoint::CheckpointDir;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};

struct Server {
    child: Option<Child>,
    base: String,
    log: Arc<Mutex<String>>,
    data: PathBuf,
    model: PathBuf,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Server {
    fn start(spec: TinySpec, extra: &[&str]) -> Server {
        Self::start_with(spec, extra, |_| {})
    }

    /// Like [`start`](Self::start), with `prepare(data_dir)` run before the server
    /// starts (to put checkpoints in place).
    fn start_with(spec: TinySpec, extra: &[&str], prepare: impl FnOnce(&Path)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_gguf(&model, &spec).unwrap();
        let data = dir.path().join("data");
        prepare(&data);
        let (child, base, log) = spawn_server(&model, &data, extra);
        Server {
            child: Some(child),
            base,
            log,
            data,
            model,
            _dir: dir,
        }
    }

    /// Starts a new server on the same model and directory (the old one must
    /// have exited); the log starts afresh.
    fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "the old server still runs");
        let (child, base, log) = spawn_server(&self.model, &self.data, extra);
        self.child = Some(child);
        self.base = base;
        self.log = log;
    }

    /// kill -9.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("server already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let mut req = ureq::request(method, &format!("{}{path}", self.base))
            .timeout(Duration::from_secs(120));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}\nserver log:\n{}", self.log()),
        };
        let status = response.status();
        let headers = response
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                response
                    .header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_string()))
            })
            .collect();
        let body = response.into_string().unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &Json) -> Reply {
        self.request("POST", path, headers, Some(&body.to_string()))
    }

    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    fn sigterm(&self) {
        let child = self.child.as_ref().expect("server already stopped");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the log thread catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rows(&self) -> Vec<RolloutRow> {
        let raw = self.data.join("raw");
        let mut files: Vec<String> = std::fs::read_dir(&raw)
            .unwrap()
            .map(|e| e.unwrap().path())
            .inspect(|p| {
                assert!(
                    !p.to_string_lossy().ends_with(".tmp"),
                    "left a tmp file: {}",
                    p.display()
                )
            })
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        files.sort();
        if files.is_empty() {
            return Vec::new();
        }
        RolloutReader::new(&files).unwrap().read_all_rows().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn user(text: &str) -> Json {
    json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}])
}

/// Data lines of an SSE body, `[DONE]` included.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

fn assert_openai_error(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.body);
    let body = reply.json();
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(err["type"].is_string(), "{what}: {body}");
    let obj = err.as_object().unwrap();
    assert!(
        obj.contains_key("param") && obj.contains_key("code"),
        "{what}: {body}"
    );
}

/// Text decoded from the recorded ids must be the text the client got. The
/// engine holds back an unfinished UTF-8 sequence at the very end of a reply
/// (random weights produce stray bytes), which `decode` shows as U+FFFD.
fn assert_same_text(decoded: &str, returned: &str) {
    assert_eq!(
        decoded.trim_end_matches('\u{FFFD}'),
        returned.trim_end_matches('\u{FFFD}'),
    );
}

fn load(path: &Path) -> Model {
    Model::load(path).unwrap()
}

#[test]
fn chat_streaming_feedback_and_exact_recording() {
    let mut server = Server::start(TinySpec::default(), &[]);

    let health = server.get("/healthz");
    assert_eq!(health.status, 200);
    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");

    // Non-streaming, with logprobs and a session.
    let reply = server.post(
        "/v1/chat/completions",
        &[("X-Session-Id", "sess-a")],
        &json!({"model": "whatever", "messages": user("hello there"), "max_tokens": 24,
                "temperature": 0.9, "seed": 5, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.headers.get("x-session-id").map(String::as_str),
        Some("sess-a")
    );
    let body = reply.json();
    let id1 = body["id"].as_str().unwrap().to_string();
    assert!(id1.starts_with("chatcmpl-"), "{id1}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny");
    assert!(body["created"].as_i64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let text1 = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let lps = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len() as u64, completion);
    assert!(lps
        .iter()
        .all(|l| l["logprob"].as_f64().unwrap() <= 0.0 && l["top_logprobs"].is_array()));
    // top_logprobs: 2 alternatives per token, most likely first, the best at least
    // as likely as the sampled token.
    for l in lps {
        let top = l["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{l}");
        let (a, b) = (
            top[0]["logprob"].as_f64().unwrap(),
            top[1]["logprob"].as_f64().unwrap(),
        );
        assert!(a >= b && a >= l["logprob"].as_f64().unwrap() - 1e-6, "{l}");
        assert!(top[0]["token"].is_string() && top[0]["bytes"].is_array());
    }

    // Streaming, with usage; session and turn type from the body, stripped before templating.
    let reply = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("tell me more"), "max_completion_tokens": 30, "stream": true,
                "stream_options": {"include_usage": true}, "session_id": "sess-b",
                "turn_type": "side", "session_done": true, "stop": ["\u{1}never"]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").map(String::as_str),
        Some("text/event-stream")
    );
    assert_eq!(
        reply.headers.get("x-session-id").map(String::as_str),
        Some("sess-b")
    );
    let events = sse_events(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Json> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id2 = chunks[0]["id"].as_str().unwrap().to_string();
    assert!(id2.starts_with("chatcmpl-") && id2 != id1);
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id2.as_str() && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert!(["stop", "length"].contains(&finish));
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let stream_completion = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap();

    // Feedback on the first session's latest turn.
    let fb = server.post(
        "/v1/feedback",
        &[],
        &json!({"session_id": "sess-a", "rating": -1, "text": "too vague", "session_done": true}),
    );
    assert_eq!(fb.status, 200, "{}", fb.body);
    let fb = fb.json();
    assert_eq!(fb["response_id"], id1.as_str());
    assert_eq!(fb["turn"], 1);
    let fb_id = fb["id"].as_str().unwrap().to_string();

    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("claw_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "claw_tokens_generated_total {}",
            completion + stream_completion
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("claw_request_latency_seconds_count 2"),
        "{metrics}"
    );
    assert!(metrics.contains("claw_queue_depth 0"), "{metrics}");

    let status = server.stop();
    assert!(status.success(), "{status}\n{}", server.log());
    assert!(
        server.log().contains("3 row(s) recorded"),
        "{}",
        server.log()
    );

    let rows = server.rows();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let model = load(&server.model);
    let by_id = |id: &str| {
        rows.iter()
            .find(|r| r.sample_id == id)
            .unwrap_or_else(|| panic!("no row {id}"))
    };

    let r1 = by_id(&id1);
    assert_eq!(r1.session_id, "sess-a");
    assert_eq!(r1.turn_type, "main");
    assert_eq!(r1.model, "tiny");
    assert_eq!(r1.policy_version, 0);
    assert_eq!(r1.token_source, "engine");
    assert_eq!(r1.finish_reason, choice["finish_reason"].as_str().unwrap());
    assert_eq!(r1.response_text, text1);
    assert_eq!(r1.response_ids.len() as u64, completion);
    assert_eq!(r1.response_logprobs.len(), r1.response_ids.len());
    for (lp, api) in r1.response_logprobs.iter().zip(lps) {
        assert!((f64::from(*lp) - api["logprob"].as_f64().unwrap()).abs() < 1e-5);
    }
    let ids: Vec<u32> = r1.response_ids.iter().map(|&i| i as u32).collect();
    assert_same_text(&model.tokenizer.decode(&ids).unwrap(), &text1);
    let prompt: Vec<u32> = r1.prompt_ids.iter().map(|&i| i as u32).collect();
    assert_eq!(model.tokenizer.encode(&r1.prompt_text).unwrap(), prompt);
    assert!(r1.prompt_text.contains("hello there") && r1.prompt_text.ends_with("assistant\n"));
    let messages: Json = serde_json::from_str(&r1.messages_json).unwrap();
    assert_eq!(messages, user("hello there"));
    assert!(r1.created_at > 1_600_000_000_000);

    let r2 = by_id(&id2);
    assert_eq!(r2.session_id, "sess-b");
    assert_eq!(r2.turn_type, "side");
    assert_eq!(r2.response_text, streamed);
    assert_eq!(r2.response_ids.len() as u64, stream_completion);
    let ids: Vec<u32> = r2.response_ids.iter().map(|&i| i as u32).collect();
    assert_same_text(&model.tokenizer.decode(&ids).unwrap(), &streamed);
    assert!(!r2.prompt_text.contains("sess-b") && !r2.messages_json.contains("sess-b"));

    let f = by_id(&fb_id);
    assert_eq!(f.turn_type, "feedback");
    assert_eq!(f.session_id, "sess-a");
    assert_eq!(f.feedback, Some(-1));
    assert_eq!(f.feedback_text.as_deref(), Some("too vague"));
    assert_eq!(f.turn, Some(1));
    assert_eq!(
        f.session_done,
        Some(true),
        "the user left with this feedback"
    );
    let event: Json = serde_json::from_str(&f.messages_json).unwrap();
    assert_eq!(event["response_id"], id1.as_str());
    assert!(f.response_ids.is_empty());
}

#[test]
fn bad_inputs_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(
        TinySpec::default(),
        &[
            "--api-key",
            "sekrit",
            "--max-body-bytes",
            "65536",
            "--max-messages",
            "8",
            "--max-tokens-limit",
            "252",
        ],
    );
    let auth = [("Authorization", "Bearer sekrit")];
    let good = json!({"messages": user("hi"), "max_tokens": 4});
    let ok = |what: &str| {
        let r = server.post("/v1/chat/completions", &auth, &good);
        assert_eq!(r.status, 200, "after {what}: {}", r.body);
    };
    ok("start");

    let r = server.post("/v1/chat/completions", &[], &good);
    assert_openai_error(&r, 401, "no key");
    let r = server.post(
        "/v1/chat/completions",
        &[("Authorization", "Bearer wrong")],
        &good,
    );
    assert_openai_error(&r, 401, "wrong key");
    assert_eq!(server.get("/healthz").status, 200, "healthz needs no key");

    let r = server.request(
        "POST",
        "/v1/chat/completions",
        &auth,
        Some("{\"messages\": [}"),
    );
    assert_openai_error(&r, 400, "invalid JSON");
    ok("invalid JSON");

    let r = server.post("/v1/chat/completions", &auth, &json!({"model": "x"}));
    assert_openai_error(&r, 400, "missing messages");
    assert_eq!(r.json()["error"]["param"], "messages");

    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": [{"role": "wizard", "content": "x"}]}),
    );
    assert_openai_error(&r, 400, "unknown role");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("wizard"));

    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user("hi"), "n": 2}),
    );
    assert_openai_error(&r, 400, "n=2");
    assert_eq!(r.json()["error"]["param"], "n");

    let big = json!({"messages": user(&"x".repeat(100_000))});
    let r = server.post("/v1/chat/completions", &auth, &big);
    assert_openai_error(&r, 413, "oversized body");
    ok("oversized body");

    // The tiny model's context is 256 tokens.
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user("hi"), "max_tokens": 250}),
    );
    assert_openai_error(&r, 400, "context overflow");
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user(&"word ".repeat(300))}),
    );
    assert_openai_error(&r, 400, "prompt alone overflows");

    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user("hi"), "temperature": "hot"}),
    );
    assert_openai_error(&r, 400, "bad temperature");
    assert_eq!(r.json()["error"]["param"], "temperature");

    let r = server.request("POST", "/v1/chat/completions", &auth, Some("[1, 2]"));
    assert_openai_error(&r, 400, "body not an object");
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": (0..9).map(|_| json!({"role": "user", "content": "x"})).collect::<Vec<_>>()}),
    );
    assert_openai_error(&r, 400, "too many messages");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-messages"));
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user("hi"), "max_tokens": 253}),
    );
    assert_openai_error(&r, 400, "max_tokens over --max-tokens-limit");
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": user("hi"), "tools": [{"type": "function",
                "function": {"name": "f", "parameters": "not a schema"}}]}),
    );
    assert_openai_error(&r, 400, "bad tool schema");
    assert_eq!(r.json()["error"]["param"], "tools[0].function.parameters");
    let r = server.post(
        "/v1/chat/completions",
        &auth,
        &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    );
    assert_openai_error(&r, 400, "image content");
    let r = server.post(
        "/v1/feedback",
        &[],
        &json!({"session_id": "x", "rating": 1}),
    );
    assert_openai_error(&r, 401, "feedback without a key");
    assert_eq!(server.get("/metrics").status, 401, "metrics need the key");

    let r = server.request("GET", "/v1/nope", &auth, None);
    assert_openai_error(&r, 404, "unknown route");

    let r = server.post(
        "/v1/feedback",
        &auth,
        &json!({"session_id": "never-seen", "rating": 1}),
    );
    assert_openai_error(&r, 404, "feedback for an unknown session");
    let r = server.post(
        "/v1/feedback",
        &auth,
        &json!({"session_id": "x", "rating": 5}),
    );
    assert_openai_error(&r, 400, "bad rating");

    ok("all of the above");
    let metrics = server.request("GET", "/metrics", &auth, None).body;
    assert!(
        metrics.contains("claw_requests_total{route=\"/v1/chat/completions\",status=\"401\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("claw_requests_total{route=\"/v1/chat/completions\",status=\"413\"} 1"),
        "{metrics}"
    );
}

/// Sends a streaming chat request and reads its first SSE line: the reply is
/// then being generated, and the rest of it can be read (or dropped) from the
/// returned reader.
fn start_stream(server: &Server, body: Json) -> (BufReader<Box<dyn Read + Send>>, String) {
    let long = ureq::post(&format!("{}/v1/chat/completions", server.base))
        .send_string(&body.to_string())
        .unwrap();
    let mut reader = BufReader::new(Box::new(long.into_reader()) as Box<dyn Read + Send>);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    (reader, first)
}

/// A model slow enough that a long generation is still running when the next
/// request arrives.
fn slow_spec() -> TinySpec {
    TinySpec {
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ffn: 512,
        context: 4096,
        ..TinySpec::default()
    }
}

#[test]
fn full_queue_gets_429_and_a_disconnect_cancels() {
    let mut server = Server::start(slow_spec(), &["--queue", "1", "--max-tokens-limit", "4000"]);
    // A long streaming generation holds the only queue slot...
    let (mut reader, first) = start_stream(
        &server,
        json!({"messages": user("go on"), "max_tokens": 4000, "ignore_eos": true,
                    "stream": true, "temperature": 1.0}),
    );
    assert!(first.starts_with("data: {"), "{first}");
    // ...so the next request is turned away at once, with Retry-After.
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("me too"), "max_tokens": 2}),
    );
    assert_openai_error(&r, 429, "queue full");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    // The long generation is still streaming (it was not hurt by the 429).
    let mut more = [0u8; 256];
    assert!(reader.read(&mut more).unwrap() > 0);

    // Hanging up cancels it and frees the slot.
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = server.post(
            "/v1/chat/completions",
            &[],
            &json!({"messages": user("again"), "max_tokens": 2}),
        );
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "the slot was never freed:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("claw_generations_cancelled_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"429\"}"), "{metrics}");

    // SIGTERM while a reply is streaming: the reply finishes and is recorded.
    let (mut reader, first) = start_stream(
        &server,
        json!({"messages": user("last one"), "max_tokens": 300, "ignore_eos": true,
                    "stream": true}),
    );
    server.sigterm();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let body = first + &rest;
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let events = sse_events(&body);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Json>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(server.wait_exit().success(), "{}", server.log());

    let rows = server.rows();
    assert_eq!(
        rows.len(),
        2,
        "the cancelled request is not recorded: {rows:#?}"
    );
    assert_eq!(rows[0].response_ids.len(), 2);
    assert_eq!(rows[1].response_ids.len(), 300);
    assert_eq!(rows[1].finish_reason, "length");
    assert_eq!(rows[1].response_text, streamed);
}

#[test]
fn no_record_writes_nothing() {
    let mut server = Server::start(TinySpec::default(), &["--no-record"]);
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("hi"), "max_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(server.stop().success());
    assert!(!server.data.join("raw").exists() || server.rows().is_empty());
}

/// The official `openai` Python client against the server (skips, loudly, when
/// python3 or PyPI is not available).
#[test]
fn official_openai_python_client() {
    let venv = tempfile::tempdir().unwrap();
    let venv_path = venv.path().join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv_path)
        .output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: official_openai_python_client: cannot create a python3 venv");
        return;
    }
    let python = venv_path.join("bin").join("python");
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ])
        .output()
        .unwrap();
    if !pip.status.success() {
        eprintln!(
            "SKIP: official_openai_python_client: pip install openai failed: {}",
            String::from_utf8_lossy(&pip.stderr)
        );
        return;
    }
    let mut server = Server::start(TinySpec::default(), &["--api-key", "k-123"]);
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="k-123", max_retries=0)
msgs = [{"role": "user", "content": "hello"}]
r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, seed=1,
        logprobs=True, extra_headers={"X-Session-Id": "py-1"})
out = {"id": r.id, "text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
       "completion_tokens": r.usage.completion_tokens, "n_logprobs": len(r.choices[0].logprobs.content)}
parts, sid = [], None
stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Session-Id": "py-1"},
        tools=[{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}])
usage = None
for chunk in stream:
    sid = chunk.id
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
out["stream_id"] = sid
out["stream_text"] = "".join(parts)
out["stream_tokens"] = usage
print(json.dumps(out))
"#;
    let run = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&server.base)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "python client failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        server.log()
    );
    let out: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(out["completion_tokens"], out["n_logprobs"]);
    assert!(server.stop().success());
    let rows = server.rows();
    assert_eq!(rows.len(), 2);
    let model = load(&server.model);
    for (id, text, tokens) in [
        ("id", "text", "completion_tokens"),
        ("stream_id", "stream_text", "stream_tokens"),
    ] {
        let row = rows
            .iter()
            .find(|r| out[id] == r.sample_id.as_str())
            .expect("row for response");
        assert_eq!(row.session_id, "py-1");
        assert_eq!(out[text], row.response_text.as_str());
        assert_eq!(out[tokens], row.response_ids.len());
        let ids: Vec<u32> = row.response_ids.iter().map(|&i| i as u32).collect();
        assert_same_text(
            &model.tokenizer.decode(&ids).unwrap(),
            out[text].as_str().unwrap(),
        );
    }
    assert!(rows.iter().any(|r| r
        .tools_json
        .as_deref()
        .is_some_and(|t| t.contains("get_time"))));
}

// ---------------------------------------------------------------- hot reload

/// A rank-4 adapter whose B is random (seeded), so it visibly changes outputs.
fn distinct_adapter(model: &Model, seed: u64) -> Adapter {
    let adapter = Adapter::new(
        &model.decoder,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        },
        seed,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for pair in &adapter.pairs {
        let shape = pair.b.dims().to_vec();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.8f32..0.8)).collect();
        pair.b
            .set(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
    adapter
}

/// Teacher-forced log-probs of a recorded row's response under `decoder`.
fn rescore(decoder: &Decoder, row: &RolloutRow) -> Vec<f32> {
    let prompt: Vec<u32> = row.prompt_ids.iter().map(|&i| i as u32).collect();
    let response: Vec<u32> = row.response_ids.iter().map(|&i| i as u32).collect();
    let seq = Sequence {
        prompt: &prompt,
        response: &response,
    };
    score(decoder, &[seq], 4096).unwrap().remove(0)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn wait_for(what: &str, server: &Server, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn healthz_version(server: &Server) -> i64 {
    server.get("/healthz").json()["policy_version"]
        .as_i64()
        .unwrap()
}

/// One client's outcome: (status, response id, X-Claw-Policy-Version).
type Answer = (u16, String, i64);

/// `n` client threads sending chat requests back to back (half of them
/// streaming, alternately short and long) until `stop` is set.
fn load_clients(
    base: &str,
    n: usize,
    stop: &Arc<AtomicBool>,
    answers: &Arc<Mutex<Vec<Answer>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|client| {
            let url = format!("{base}/v1/chat/completions");
            let stop = stop.clone();
            let answers = answers.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(120))
                    .build();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let stream = client % 2 == 1;
                    let body = json!({
                        "messages": user(&format!("client {client} request {i}")),
                        "max_tokens": if i.is_multiple_of(2) { 8 } else { 40 },
                        "ignore_eos": true, "temperature": 1.0, "seed": i,
                        "stream": stream,
                    });
                    let response = match agent
                        .post(&url)
                        .set("X-Session-Id", &format!("load-{client}"))
                        .send_string(&body.to_string())
                    {
                        Ok(r) => r,
                        Err(ureq::Error::Status(code, r)) => {
                            let text = r.into_string().unwrap_or_default();
                            answers.lock().unwrap().push((code, text, -1));
                            continue;
                        }
                        // The server stopped listening (graceful stop): done.
                        Err(_) => break,
                    };
                    let status = response.status();
                    let version = response
                        .header("x-claw-policy-version")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(-1);
                    let Ok(text) = response.into_string() else {
                        break;
                    };
                    let id = if stream {
                        let events = sse_events(&text);
                        if events.last().map(String::as_str) != Some("[DONE]") {
                            answers.lock().unwrap().push((599, text, version));
                            continue;
                        }
                        let first: Json = serde_json::from_str(&events[0]).unwrap();
                        first["id"].as_str().unwrap().to_string()
                    } else {
                        let body: Json = serde_json::from_str(&text).unwrap();
                        assert_eq!(
                            body["system_fingerprint"],
                            format!("claw-policy-{version}").as_str()
                        );
                        body["id"].as_str().unwrap().to_string()
                    };
                    answers.lock().unwrap().push((status, id, version));
                }
            })
        })
        .collect()
}

/// Ten adapter swaps (plus one broken checkpoint) while 8 clients send requests:
/// no request fails, and every recorded row's response log-probs are exactly
/// those of the adapter its policy_version names, so each generation ran from
/// start to end on the policy it was admitted under.
#[test]
fn adapters_hot_swap_under_load_with_exact_policy_versions() {
    let mut server = Server::start_with(
        TinySpec::default(),
        &[
            "--reload-poll-ms",
            "200",
            "--queue",
            "64",
            "--parallel",
            "2",
        ],
        |data| {
            // A checkpoint already in place is served from the start.
            let model_dir = tempfile::tempdir().unwrap();
            let path = model_dir.path().join("m.gguf");
            write_tiny_gguf(&path, &TinySpec::default()).unwrap();
            let model = load(&path);
            CheckpointDir::create(&data.join("checkpoints"))
                .unwrap()
                .save(&distinct_adapter(&model, 1), "tiny", 1, None, None)
                .unwrap();
        },
    );
    let model = load(&server.model);
    let adapters: HashMap<i64, Adapter> = (1..=11)
        .map(|v| (v, distinct_adapter(&model, v as u64)))
        .collect();
    assert_eq!(healthz_version(&server), 1, "{}", server.log());
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["policy"]["version"], 1);
    assert_eq!(
        models["data"][0]["policy"]["adapter"],
        "adapter-000001.safetensors"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients = load_clients(&server.base, 8, &stop, &answers);
    let served_by = |v: i64| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.2 == v && a.0 == 200)
            .count()
    };
    wait_for("requests on version 1", &server, || served_by(1) >= 8);

    let ckpt = CheckpointDir::create(&server.data.join("checkpoints")).unwrap();
    for v in 2..=11 {
        if v == 6 {
            // A broken checkpoint: LATEST names a file that is not safetensors.
            let bad = ckpt.path().join("adapter-000099.safetensors");
            std::fs::write(&bad, b"not a safetensors file").unwrap();
            std::fs::copy(
                ckpt.path().join("adapter-000005.json"),
                ckpt.path().join("adapter-000099.json"),
            )
            .unwrap();
            claw::fsutil::write_atomic(
                &ckpt.path().join("LATEST"),
                b"adapter-000099.safetensors\n",
            )
            .unwrap();
            wait_for("the broken checkpoint to be rejected", &server, || {
                server
                    .get("/metrics")
                    .body
                    .contains("claw_adapter_load_errors_total 1\n")
            });
            assert_eq!(healthz_version(&server), 5, "still serving version 5");
            let before = served_by(5);
            wait_for("more requests on version 5", &server, || {
                served_by(5) >= before + 4
            });
        }
        ckpt.save(&adapters[&v], "tiny", v as u64, None, None)
            .unwrap();
        wait_for(&format!("version {v} in /healthz"), &server, || {
            healthz_version(&server) == v
        });
        wait_for(&format!("requests on version {v}"), &server, || {
            served_by(v) >= 8
        });
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("claw_policy_version 11\n"), "{metrics}");
    assert!(
        metrics.contains("claw_adapter_swaps_total 11\n"),
        "{metrics}"
    );
    assert!(server.stop().success(), "{}", server.log());
    let log = server.log();
    assert!(
        log.contains("serving policy version 7 (adapter-000007.safetensors, loaded in"),
        "{log}"
    );
    assert!(log.contains("ignoring the checkpoint"), "{log}");
    assert!(log.contains("watching"), "notifications in use: {log}");

    let answers = answers.lock().unwrap().clone();
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.0 != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let rows = server.rows();
    assert_eq!(rows.len(), answers.len(), "one row per answered request");
    let version_of: HashMap<&str, i64> = answers.iter().map(|a| (a.1.as_str(), a.2)).collect();

    let decoders: HashMap<i64, Decoder> = adapters
        .iter()
        .map(|(&v, a)| (v, a.apply_for_serving(&model.decoder).unwrap()))
        .collect();
    let mut versions = std::collections::BTreeSet::new();
    let (mut worst_own, mut closest_other) = (0f32, f32::MAX);
    for row in &rows {
        let v = row.policy_version;
        versions.insert(v);
        assert_eq!(
            version_of.get(row.sample_id.as_str()),
            Some(&v),
            "row {} was answered under another version",
            row.sample_id
        );
        let own = rescore(&decoders[&v], row);
        let d = max_abs_diff(&own, &row.response_logprobs);
        worst_own = worst_own.max(d);
        // Serving rounds activations to 16 bits (decode steps and prompt chunks
        // under 16 tokens) and sums in another order than teacher-forced f32
        // scoring; these random adapters make log-probs of magnitude ~10, so
        // 3e-2 is ~3e-3 relative (0.0106 was seen), still far below the
        // smallest gap between neighbouring versions (typically ~1 or more).
        assert!(
            d < 3e-2,
            "row {} (version {v}): recorded log-probs differ from adapter {v}'s by {d}",
            row.sample_id
        );
        // ...and not those of the neighbouring version (the test can tell them apart).
        let other = if v == 11 { 10 } else { v + 1 };
        let d = max_abs_diff(&rescore(&decoders[&other], row), &row.response_logprobs);
        closest_other = closest_other.min(d);
        assert!(
            d > 0.1,
            "versions {v} and {other} are indistinguishable ({d})"
        );
    }
    eprintln!(
        "{} rows: log-probs within {worst_own:.1e} of their own version's, \
         at least {closest_other:.1e} from the next version's",
        rows.len()
    );
    assert_eq!(
        versions,
        (1..=11).collect(),
        "every version served requests"
    );
}

/// Without notifications (here: the checkpoint directory does not exist when the
/// server starts), polling finds new adapters.
#[test]
fn reload_polls_when_notifications_are_unavailable() {
    let server = Server::start(TinySpec::default(), &["--reload-poll-ms", "100"]);
    assert_eq!(healthz_version(&server), 0);
    let model = load(&server.model);
    let ckpt = CheckpointDir::create(&server.data.join("checkpoints")).unwrap();
    ckpt.save(&distinct_adapter(&model, 9), "tiny", 9, None, None)
        .unwrap();
    wait_for("version 9", &server, || healthz_version(&server) == 9);
    assert!(
        server.log().contains("polling every 100 ms"),
        "{}",
        server.log()
    );
    // A LATEST that names nothing usable is ignored.
    std::fs::write(ckpt.path().join("LATEST"), "../../etc/passwd\n").unwrap();
    wait_for("the bad LATEST to be rejected", &server, || {
        server
            .get("/metrics")
            .body
            .contains("claw_adapter_load_errors_total 1\n")
    });
    assert_eq!(healthz_version(&server), 9);
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("hi"), "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn adapter_flag_serves_it_and_a_broken_one_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model_path, &TinySpec::default()).unwrap();
    let model = load(&model_path);
    let ckpt = CheckpointDir::create(&dir.path().join("elsewhere")).unwrap();
    let path = ckpt
        .save(&distinct_adapter(&model, 3), "tiny", 42, None, None)
        .unwrap();

    let path_arg = path.to_string_lossy().into_owned();
    let mut server = Server::start(
        TinySpec::default(),
        &["--adapter", &path_arg, "--no-reload"],
    );
    assert_eq!(healthz_version(&server), 42);
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("hi"), "max_tokens": 6, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers.get("x-claw-policy-version").map(String::as_str),
        Some("42")
    );
    assert!(server.stop().success());
    let rows = server.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].policy_version, 42);
    let served = distinct_adapter(&model, 3)
        .apply_for_serving(&model.decoder)
        .unwrap();
    assert!(max_abs_diff(&rescore(&served, &rows[0]), &rows[0].response_logprobs) < 2e-3);

    // An --adapter that does not load is an error at start, naming the file.
    let bad = dir.path().join("adapter-000007.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    std::fs::copy(path.with_extension("json"), bad.with_extension("json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["serve", "--model"])
        .arg(&model_path)
        .arg("--dir")
        .arg(dir.path().join("data"))
        .args(["--port", "0", "--adapter"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--adapter") && err.contains("adapter-000007.safetensors"),
        "{err}"
    );
}

// ---------------------------------------------------------------- prefix cache

/// The tiny model with room for an agent-like prompt longer than a prefill chunk.
fn long_context_spec() -> TinySpec {
    TinySpec {
        context: 2048,
        ..TinySpec::default()
    }
}

/// A conversation whose system prompt alone is over 1,000 tokens.
fn long_conversation(turns: &[&str]) -> Vec<Json> {
    let system: String = (0..25)
        .map(|i| format!("Rule {i}: answer briefly and cite the tool you used. "))
        .collect();
    let mut messages = vec![json!({"role": "system", "content": system})];
    for (i, text) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text}));
    }
    messages
}

/// (text, prompt_tokens, cached_tokens) of a greedy reply, streamed or not.
fn greedy(server: &Server, messages: &[Json], stream: bool) -> (String, u64, u64) {
    let mut body = json!({"messages": messages, "max_tokens": 12, "temperature": 0.0,
                          "ignore_eos": true, "stream": stream});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = server.post("/v1/chat/completions", &[], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let (text, usage) = if stream {
        let chunks: Vec<Json> = sse_events(&r.body)
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        (text, chunks.last().unwrap()["usage"].clone())
    } else {
        let body = r.json();
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        (text, body["usage"].clone())
    };
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {usage}"));
    (text, usage["prompt_tokens"].as_u64().unwrap(), cached)
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = server.get("/metrics").body;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// The same long conversation twice, then its next turn: the repeats reuse the
/// cached prefix (cached_tokens, /metrics, the -v log) and every reply, and its
/// log-probs, are those of a server without the cache.
#[test]
fn prefix_cache_reuses_a_long_prefix_with_identical_replies() {
    let mut cached = Server::start(long_context_spec(), &[]);
    let mut plain = Server::start(long_context_spec(), &["--prefix-cache-mb", "0"]);
    let turn1 = long_conversation(&["What is in the repository?"]);

    let (text1, prompt1, hit) = greedy(&cached, &turn1, false);
    assert!(prompt1 > 1000, "{prompt1}");
    assert_eq!(hit, 0, "nothing is cached yet");
    let (again, prompt, hit) = greedy(&cached, &turn1, true);
    assert_eq!(prompt, prompt1);
    assert_eq!(hit, prompt1 - 1, "all but the last prompt token");
    assert_eq!(again, text1);

    let turn2 = long_conversation(&["What is in the repository?", &text1, "And in src/?"]);
    let (text2, prompt2, hit2) = greedy(&cached, &turn2, false);
    assert!(
        hit2 >= prompt1,
        "turn 2 reuses at least turn 1's prompt: {hit2} of {prompt2}"
    );

    let (plain1, _, none) = greedy(&plain, &turn1, false);
    assert_eq!((plain1.as_str(), none), (text1.as_str(), 0));
    let (plain2, _, none) = greedy(&plain, &turn2, true);
    assert_eq!((plain2.as_str(), none), (text2.as_str(), 0));

    let hits = metric(&cached, "claw_prefix_cache_hit_tokens_total");
    assert_eq!(hits as u64, prompt1 - 1 + hit2);
    let misses = metric(&cached, "claw_prefix_cache_miss_tokens_total");
    assert_eq!(misses as u64, 2 * prompt1 + prompt2 - hits as u64);
    assert!(metric(&cached, "claw_prefix_cache_bytes") > 0.0);
    assert!(metric(&cached, "claw_prefix_cache_entries") >= 1.0);
    assert_eq!(metric(&plain, "claw_prefix_cache_bytes"), 0.0);
    assert_eq!(metric(&plain, "claw_prefix_cache_hit_tokens_total"), 0.0);
    let line = format!(
        "{prompt2} prompt tokens ({hit2} cached, {} prefilled",
        prompt2 - hit2
    );
    assert!(
        cached.log().contains(&line),
        "no {line:?} in\n{}",
        cached.log()
    );

    assert!(cached.stop().success());
    assert!(plain.stop().success());
    let (with, without) = (cached.rows(), plain.rows());
    assert_eq!(with.len(), 3);
    assert_eq!(without.len(), 2);
    for (a, b) in [(&with[0], &without[0]), (&with[2], &without[1])] {
        assert_eq!(a.prompt_ids, b.prompt_ids);
        assert_eq!(a.response_ids, b.response_ids);
        assert!(max_abs_diff(&a.response_logprobs, &b.response_logprobs) < 2e-3);
    }
}

/// A prefix cached under one policy is never served under the adapter swapped
/// in after it: the first request after the swap prefills everything, and its
/// log-probs are the adapter's.
#[test]
fn an_adapter_swap_never_reuses_a_stale_prefix() {
    let mut server = Server::start(long_context_spec(), &["--reload-poll-ms", "100"]);
    let model = load(&server.model);
    let messages = long_conversation(&["Summarise the rules."]);
    let ask = |want_version: i64| -> u64 {
        let r = server.post(
            "/v1/chat/completions",
            &[],
            &json!({"messages": messages, "max_tokens": 8, "temperature": 0.0,
                    "ignore_eos": true}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.headers.get("x-claw-policy-version"),
            Some(&want_version.to_string())
        );
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(ask(0), 0);
    let reused = ask(0);
    assert!(reused > 1000, "{reused}");

    let adapter = distinct_adapter(&model, 5);
    CheckpointDir::create(&server.data.join("checkpoints"))
        .unwrap()
        .save(&adapter, "tiny", 1, None, None)
        .unwrap();
    wait_for("version 1 in /healthz", &server, || {
        healthz_version(&server) == 1
    });
    assert_eq!(
        ask(1),
        0,
        "the base model's prefix must not serve the adapter"
    );
    assert_eq!(ask(1), reused, "the adapter's own prefix is reused");
    assert!(metric(&server, "claw_prefix_cache_evictions_total") >= 1.0);
    assert_eq!(metric(&server, "claw_prefix_cache_entries"), 1.0);

    assert!(server.stop().success());
    let rows = server.rows();
    assert_eq!(rows.len(), 4);
    let served = adapter.apply_for_serving(&model.decoder).unwrap();
    for (row, decoder) in rows
        .iter()
        .zip([&model.decoder, &model.decoder, &served, &served])
    {
        let d = max_abs_diff(&rescore(decoder, row), &row.response_logprobs);
        assert!(d < 2e-3, "version {}: off by {d}", row.policy_version);
    }
    assert!(
        max_abs_diff(&rows[0].response_logprobs, &rows[2].response_logprobs) > 0.1,
        "the adapter changes the replies"
    );
}

// ---------------------------------------------------------------- durability

/// Segment files in DIR/raw: (complete `.parquet`, abandoned `.parquet.tmp`).
fn segment_files(data: &Path) -> (Vec<String>, Vec<PathBuf>) {
    let mut done = Vec::new();
    let mut tmp = Vec::new();
    for entry in std::fs::read_dir(data.join("raw")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            done.push(name);
        } else if name.ends_with(".parquet.tmp") {
            tmp.push(path);
        } else {
            panic!("unexpected file {name}");
        }
    }
    done.sort();
    (done, tmp)
}

/// Reads every complete segment one by one: each must be a whole Parquet file.
fn read_segments(files: &[String]) -> Vec<RolloutRow> {
    let mut rows = Vec::new();
    for f in files {
        let reader = RolloutReader::new(std::slice::from_ref(f))
            .unwrap_or_else(|e| panic!("{f} is not a complete segment: {e:#}"));
        rows.extend(
            reader
                .read_all_rows()
                .unwrap_or_else(|e| panic!("{f} is not a complete segment: {e:#}")),
        );
    }
    rows
}

/// kill -9 loses no answered turn: with 4-row segments and 22 requests answered,
/// the 20 rows of the 5 closed segments are complete `.parquet` files and the 2
/// of the open segment are in the durable log, which the next server replays
/// (and it removes the abandoned `.tmp`). Then a kill -9 in the middle of
/// concurrent traffic: after the restart every answered request is recorded,
/// none twice.
#[test]
fn kill_9_loses_no_answered_turn() {
    let extra = ["--segment-rows", "4", "--segment-age-ms", "600000"];
    let mut server = Server::start(TinySpec::default(), &extra);
    let mut answered = Vec::new();
    for i in 0..22 {
        let r = server.post(
            "/v1/chat/completions",
            &[],
            &json!({"messages": user(&format!("request {i}")), "max_tokens": 3}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        answered.push(r.json()["id"].as_str().unwrap().to_string());
    }
    // No pause: a reply is complete only once its row is durable.
    server.kill9();
    let (files, tmp) = segment_files(&server.data);
    assert_eq!(files.len(), 5, "{files:?}");
    assert_eq!(tmp.len(), 1, "the open segment stays a .tmp: {tmp:?}");
    let rows = read_segments(&files);
    let ids: Vec<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(
        ids,
        answered[..20],
        "the first 20 rows, in order, once each"
    );

    // A new server cleans up the dead one's partial segment and replays its log.
    server.restart(&["--segment-rows", "4", "--segment-age-ms", "200"]);
    let log = server.log();
    assert!(log.contains("removed 1 partial segment(s)"), "{log}");
    assert!(log.contains("recovered 2 answered turn(s)"), "{log}");
    assert!(!tmp[0].exists());
    let (files, _) = segment_files(&server.data);
    let mut ids: Vec<String> = read_segments(&files)
        .into_iter()
        .map(|r| r.sample_id)
        .collect();
    ids.sort_unstable();
    let mut expected = answered.clone();
    expected.sort_unstable();
    assert_eq!(ids, expected, "all 22 answered turns, once each");

    // kill -9 at an arbitrary moment of concurrent traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients = load_clients(&server.base, 8, &stop, &answers);
    wait_for("some traffic", &server, || {
        answers.lock().unwrap().len() >= 40
    });
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    server.restart(&["--segment-rows", "4", "--segment-age-ms", "200"]);
    assert!(server.stop().success(), "{}", server.log());
    let (files, tmp) = segment_files(&server.data);
    assert!(tmp.is_empty(), "{tmp:?}");
    let logs: Vec<_> = std::fs::read_dir(server.data.join("wal"))
        .unwrap()
        .collect();
    assert!(logs.is_empty(), "a graceful stop leaves no log: {logs:?}");
    let rows = read_segments(&files);
    let mut seen = std::collections::HashSet::new();
    for r in &rows {
        assert!(
            seen.insert(r.sample_id.clone()),
            "duplicate row {}",
            r.sample_id
        );
    }
    let answers = answers.lock().unwrap().clone();
    let lost: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.0 == 200 && !seen.contains(&a.1))
        .collect();
    assert!(
        lost.is_empty(),
        "{} answered requests were lost: {lost:?}",
        lost.len()
    );
    assert!(answers.len() >= 40);
}

/// SIGTERM in the middle of concurrent traffic: every answered request is
/// recorded, none twice, and nothing else.
#[test]
fn graceful_stop_under_load_loses_nothing() {
    let mut server = Server::start(TinySpec::default(), &["--queue", "64", "--parallel", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients = load_clients(&server.base, 8, &stop, &answers);
    wait_for("some traffic", &server, || {
        answers.lock().unwrap().len() >= 40
    });
    server.sigterm();
    // Clients stop when the server stops answering.
    for c in clients {
        c.join().unwrap();
    }
    assert!(server.wait_exit().success(), "{}", server.log());
    let answers = answers.lock().unwrap().clone();
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    let rows = server.rows();
    let mut recorded: Vec<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    let mut ids: Vec<&str> = answers.iter().map(|a| a.1.as_str()).collect();
    recorded.sort_unstable();
    ids.sort_unstable();
    assert_eq!(recorded, ids);
    assert!(
        server
            .log()
            .contains(&format!("{} row(s) recorded", rows.len())),
        "{}",
        server.log()
    );
}

// ---------------------------------------------------------------- OpenClaw

/// A request OpenClaw 2026.9.6 really sent (fixtures/openclaw/README.md).
fn openclaw_fixture(name: &str) -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/openclaw")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The fixture cut to fit the tiny model: the ~42 kB system prompt shortened and
/// a short completion; the tools, every message and every other field as sent.
fn openclaw_trimmed(name: &str) -> Json {
    let mut body = openclaw_fixture(name);
    let system: String = body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .chars()
        .take(1500)
        .collect();
    body["messages"][0]["content"] = Json::String(system);
    body["max_completion_tokens"] = json!(8);
    body
}

#[test]
fn openclaw_requests_stream_and_are_recorded_as_sent() {
    let tiny = TinySpec {
        context: 8192,
        ..Default::default()
    };
    let mut server = Server::start(tiny, &["--api-key", "KEY"]);
    // OpenClaw's own headers (OpenAI JS SDK), less those of the connection.
    let sent = openclaw_fixture("headers.json");
    let headers: Vec<(String, String)> = sent["default"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| {
            !["host", "content-length", "connection", "accept-encoding"].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    let turn = openclaw_trimmed("session-turn2.json");
    let reply = server.post("/v1/chat/completions", &headers, &turn);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.headers["x-session-id"], "openclaw-main");
    assert!(reply.headers["content-type"].starts_with("text/event-stream"));
    let events = sse_events(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Json> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // stream_options.include_usage: `usage: null` on every chunk but the last,
    // which has no choices and the counts.
    let (usage, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c["usage"].is_null()), "{chunks:?}");
    assert_eq!(usage["choices"], json!([]));
    let prompt_tokens = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1500, "{usage}");
    assert!(rest
        .last()
        .is_some_and(|c| c["choices"][0]["finish_reason"].is_string()));

    // With OpenClaw's compat flags: developer role, strict: false tools,
    // prompt_cache_key, reasoning_effort, temperature, top_p; no session header.
    let compat = openclaw_trimmed("compat-tool-round.json");
    let auth = [("authorization", "Bearer KEY")];
    let reply = server.post("/v1/chat/completions", &auth, &compat);
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The tiny model's ChatML template has no tools section: said, once.
    let warning = "does not render them";
    wait_for("the tools warning", &server, || {
        server.log().contains(warning)
    });
    assert_eq!(server.log().matches(warning).count(), 1);

    // A field OpenClaw sends only when configured to, and that this server
    // cannot honour, is refused by name rather than ignored.
    let mut json_mode = openclaw_trimmed("session-turn2.json");
    json_mode["response_format"] = json!({"type": "json_object"});
    let reply = server.post("/v1/chat/completions", &auth, &json_mode);
    assert_openai_error(&reply, 400, "response_format");
    assert_eq!(reply.json()["error"]["param"], "response_format");

    assert!(server.stop().success());
    let rows = server.rows();
    assert_eq!(rows.len(), 2);
    let (main, other): (Vec<_>, Vec<_>) =
        rows.iter().partition(|r| r.session_id == "openclaw-main");
    let (main, other) = (main[0], other[0]);
    for (body, row) in [(&turn, main), (&compat, other)] {
        // Recorded exactly as sent: messages (content parts, null content, tool
        // call ids) and the tool schemas, keys in the client's order.
        assert_eq!(row.messages_json, body["messages"].to_string());
        assert_eq!(
            row.tools_json.as_deref(),
            Some(body["tools"].to_string().as_str())
        );
        assert_eq!(row.turn_type, "main");
    }
    // The client's key order, not sorted ("content" < "role").
    assert!(
        main.messages_json.contains(
            r#"{"role":"assistant","content":null,"tool_calls":[{"id":"callls1","type":"function","#
        ),
        "{}",
        main.messages_json
    );
    assert_eq!(main.prompt_ids.len() as u64, prompt_tokens);
    // `developer` is rendered as the system turn.
    assert!(other.prompt_text.starts_with("<|im_start|>system\n"));
    assert!(other.messages_json.starts_with(r#"[{"role":"developer""#));
}

#[test]
fn openclaw_prompt_renders_as_hugging_face_renders_it() {
    use candle_core::quantized::gguf_file;
    use claw::model::{ChatTemplate, Tokenizer};
    use claw::serve::request::ChatRequest;

    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if !path.is_file() {
        eprintln!(
            "SKIP: openclaw_prompt_renders_as_hugging_face_renders_it: {} is absent",
            path.display()
        );
        return;
    }
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tokenizer = Tokenizer::from_gguf(&content).unwrap();
    let template = ChatTemplate::from_gguf(&content, &tokenizer).unwrap();
    let body = openclaw_fixture("session-turn2.json");
    let request = ChatRequest::from_body(body.as_object().unwrap()).unwrap();
    let prompt = template
        .render(&request.template_messages, request.active_tools(), true)
        .unwrap();
    // scripts/hf_chat_template.py: tool schemas as json.dumps writes them (key
    // order kept, ", " and ": ", nothing HTML-escaped), the parallel calls'
    // arguments likewise.
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/openclaw/session-turn2.qwen2.5.txt"),
    )
    .unwrap();
    if prompt != expected {
        let at = prompt
            .bytes()
            .zip(expected.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(prompt.len().min(expected.len()));
        let from = at.saturating_sub(80);
        panic!(
            "the prompt differs from Hugging Face's at byte {at}:\n claw: {:?}\n   hf: {:?}",
            &prompt.get(from..(at + 80).min(prompt.len())),
            &expected.get(from..(at + 80).min(expected.len())),
        );
    }
    assert!(prompt.contains(r#"{"name": "read", "arguments": {"path": "AGENTS.md", "limit": 5}}"#));
}

/// Concurrent requests decode together in batches (continuous batching: they
/// join and leave at different steps) and each records exactly the token ids
/// and log-probs it gets when it runs alone.
#[test]
fn concurrent_requests_batch_and_record_their_unbatched_numbers() {
    let spec = TinySpec {
        linear_dtype: Some(candle_core::quantized::GgmlDType::Q4_0),
        ..slow_spec()
    };
    let mut server = Server::start(spec, &["--parallel", "4", "--prefix-cache-mb", "0"]);
    let request = |i: usize| {
        json!({
            "messages": user(&format!("request number {i}: tell me something")),
            "max_tokens": 10 + 7 * i,
            "ignore_eos": true,
            "temperature": if i.is_multiple_of(2) { 0.0 } else { 0.9 },
            "seed": i,
            "logprobs": true,
        })
    };
    let content = |reply: &Reply| reply.json()["choices"][0]["logprobs"]["content"].clone();
    let alone: Vec<Json> = (0..4)
        .map(|i| content(&server.post("/v1/chat/completions", &[], &request(i))))
        .collect();
    assert_eq!(
        metric(&server, "claw_decode_steps_total"),
        metric(&server, "claw_decode_rows_total")
    );

    let steps_before = metric(&server, "claw_decode_steps_total");
    let rows_before = metric(&server, "claw_decode_rows_total");
    let together: Vec<Json> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                let body = request(i);
                scope.spawn(move || content(&server.post("/v1/chat/completions", &[], &body)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps = metric(&server, "claw_decode_steps_total") - steps_before;
    let rows = metric(&server, "claw_decode_rows_total") - rows_before;
    assert!(
        rows / steps > 1.5,
        "requests did not decode together: {rows} tokens in {steps} passes\n{}",
        server.log()
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.as_array().unwrap().len(), 10 + 7 * i);
        assert_eq!(a, t, "request {i}: batched tokens or log-probs differ");
    }
    server.sigterm();
    assert!(server.wait_exit().success(), "{}", server.log());
    let rows = server.rows();
    assert_eq!(rows.len(), 8);
    for i in 0..4 {
        let mine: Vec<&RolloutRow> = rows
            .iter()
            .filter(|r| r.prompt_text.contains(&format!("request number {i}:")))
            .collect();
        assert_eq!(mine.len(), 2);
        assert_eq!(mine[0].response_ids, mine[1].response_ids, "request {i}");
        assert_eq!(
            mine[0].response_logprobs, mine[1].response_logprobs,
            "request {i}"
        );
    }
}

/// The serve contract says no where it used to say yes: sessions expire on
/// their timer, a session id must fit the header it is echoed in, huge stop
/// strings are refused, chat and feedback read `session_done` alike, and a
/// full queue turns a request away before reading its body.
#[test]
fn serve_refuses_what_it_cannot_honour() {
    let server = Server::start(
        slow_spec(),
        &[
            "--session-timeout",
            "1s",
            "--queue",
            "1",
            "--max-body-bytes",
            "100000",
        ],
    );
    let chat = |body: Json| server.post("/v1/chat/completions", &[], &body);
    let ok = chat(json!({"messages": user("hi"), "max_tokens": 2, "session_id": "sess-t"}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let fb = server.post(
        "/v1/feedback",
        &[],
        &json!({"session_id": "sess-t", "rating": 1, "session_done": "true"}),
    );
    assert_eq!(
        fb.status, 200,
        "a string session_done, as chat takes it: {}",
        fb.body
    );
    // Past the timeout, with no chat request in between, the session is gone.
    std::thread::sleep(Duration::from_millis(2500));
    let late = server.post(
        "/v1/feedback",
        &[],
        &json!({"session_id": "sess-t", "rating": 1}),
    );
    assert_eq!(late.status, 404, "{}", late.body);
    assert!(late.body.contains("expired"), "{}", late.body);

    let r = chat(json!({"messages": user("hi"), "session_id": "séance"}));
    assert_openai_error(&r, 400, "session_id");
    assert!(r.body.contains("visible ASCII"), "{}", r.body);
    let r = chat(json!({"messages": user("hi"), "stop": ["x".repeat(2000)]}));
    assert_openai_error(&r, 400, "stop");
    // A header that is not ASCII (sent raw: HTTP clients refuse to) is a 400
    // naming it, on feedback as on chat, not silently "false".
    let body = json!({"session_id": "sess-t", "rating": 1}).to_string();
    let mut raw = format!(
        "POST /v1/feedback HTTP/1.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nX-Session-Done: ",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(b"oui \xe9\r\n\r\n");
    raw.extend_from_slice(body.as_bytes());
    let answer = raw_http(&server, &raw);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("x-session-done is not visible ASCII"),
        "{answer}"
    );

    // A streaming generation holds the only queue place; an oversized body is
    // then turned away with 429 (its size is never looked at), not 413.
    let (reader, _first) = start_stream(
        &server,
        json!({"messages": user("go on"), "max_tokens": 2000, "ignore_eos": true,
                    "stream": true}),
    );
    // Only the headers of a 200 kB body are sent: the answer comes without it.
    let answer = raw_http(
        &server,
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n\
          Content-Length: 200000\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("queue_full"), "{answer}");
    drop(reader);
}

/// Sends `request` (everything but the Host header and `Connection: close`)
/// as raw bytes and reads the response until the server closes.
fn raw_http(server: &Server, request: &[u8]) -> String {
    use std::io::Write;
    let host = server.base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (line, rest) = request.split_at(request.iter().position(|&b| b == b'\n').unwrap() + 1);
    tcp.write_all(line).unwrap();
    write!(tcp, "Host: {host}\r\nConnection: close\r\n").unwrap();
    tcp.write_all(rest).unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn an_empty_api_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["serve", "--port", "0", "--api-key", "", "--model"])
        .arg(&model)
        .arg("--dir")
        .arg(dir.path().join("data"))
        .env_remove("CLAW_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key (or CLAW_API_KEY) is empty"),
        "{err}"
    );
    // the same through the environment (whitespace is empty too)
    for key in ["", "  "] {
        let mut out = Command::new(env!("CARGO_BIN_EXE_claw"))
            .args(["serve", "--port", "0", "--model"])
            .arg(&model)
            .arg("--dir")
            .arg(dir.path().join("data"))
            .env("CLAW_API_KEY", key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that starts (with no auth) would listen forever.
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                out.kill().unwrap();
                let out = out.wait_with_output().unwrap();
                panic!(
                    "CLAW_API_KEY={key:?}: the server started:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = out.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "CLAW_API_KEY={key:?}: {err}");
        assert!(
            err.contains("--api-key (or CLAW_API_KEY) is empty"),
            "{err}"
        );
    }
}

/// The server's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(server: &Server) -> u64 {
    let pid = server.child.as_ref().expect("server stopped").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"));
    kb << 10
}

/// Issue 21: six concurrent 3.9 MB bodies (under --max-body-bytes, far over the
/// context) raised RSS to 3.9 GB before each got its 400. Each is refused by
/// its token count before it is tokenised whole, a few prepared at a time,
/// and the server's peak memory stays bounded.
#[test]
fn huge_prompts_are_refused_before_the_expensive_work_within_a_memory_bound() {
    let server = Server::start(
        TinySpec::default(),
        &["--max-body-bytes", "8000000", "--queue", "16"],
    );
    let words: String = (0..600_000).map(|i| format!("w{i} ")).collect();
    let body = json!({"messages": user(&words[..3_900_000]), "max_tokens": 4}).to_string();
    assert!(body.len() > 3_900_000);
    let before = peak_rss(&server);
    let start = Instant::now();
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let sends: Vec<_> = (0..6)
            .map(|_| s.spawn(|| server.request("POST", "/v1/chat/completions", &[], Some(&body))))
            .collect();
        sends.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let took = start.elapsed();
    let grown = peak_rss(&server).saturating_sub(before);
    eprintln!(
        "6 x {:.1} MB bodies refused in {took:.1?}; peak RSS grew by {} MB",
        body.len() as f64 / 1e6,
        grown >> 20
    );
    assert!(
        grown < 1 << 30,
        "peak RSS grew by {} MB for six refused bodies",
        grown >> 20
    );
    for r in &replies {
        assert_openai_error(r, 400, "a prompt far over the context");
        assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
        assert!(r.body.contains("messages alone"), "{}", r.body);
    }
    assert_eq!(
        server
            .post(
                "/v1/chat/completions",
                &[],
                &json!({"messages": user("hi"), "max_tokens": 2})
            )
            .status,
        200
    );
}

/// Issue 21: a client that drops during a long prefill kept its slot busy to
/// the end. The engine stops between prefill chunks: the prompt is not
/// prefilled whole, and the only queue place is free again.
#[test]
fn a_client_gone_during_prefill_frees_its_slot_between_chunks() {
    use std::io::Write;
    let spec = TinySpec {
        context: 16384,
        ..slow_spec()
    };
    let server = Server::start(
        spec,
        &[
            "--queue",
            "1",
            "--prefix-cache-mb",
            "0",
            "--max-tokens-limit",
            "16384",
        ],
    );
    let words: String = (0..2000).map(|i| format!("w{i} ")).collect();
    // The prompt's size in tokens, from the refusal of a request that cannot fit.
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user(&words), "max_tokens": 16384}),
    );
    assert_openai_error(&r, 400, "overflow");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    let prompt_tokens: f64 = message
        .split_once(" (")
        .and_then(|(_, rest)| rest.split_once(" in the messages"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no prompt size in {message}"));
    assert!(
        (4096.0..16000.0).contains(&prompt_tokens),
        "{prompt_tokens} prompt tokens: eight chunks or more, and room for the reply"
    );

    let body = json!({"messages": user(&words), "max_tokens": 1}).to_string();
    let host = server.base.trim_start_matches("http://").to_string();
    let mut tcp = std::net::TcpStream::connect(&host).unwrap();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for("the prefill to start", &server, || {
        metric(&server, "claw_requests_running") >= 1.0
    });
    let started = Instant::now();
    drop(tcp);
    wait_for("the prefill to be cancelled", &server, || {
        metric(&server, "claw_generations_cancelled_total") >= 1.0
    });
    let prefilled = metric(&server, "claw_prefix_cache_miss_tokens_total");
    eprintln!(
        "cancelled after {prefilled} of {prompt_tokens} prompt tokens, {:.1?} after the hang-up",
        started.elapsed()
    );
    assert!(
        prefilled < prompt_tokens / 2.0,
        "{prefilled} of {prompt_tokens} prompt tokens prefilled for a client that had gone"
    );
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("next"), "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "the slot is free again: {}", r.body);
}

/// Issue 21: parameters the server cannot honour are a 400 naming them, the
/// same through the streaming and the plain route (they used to be a 200 that
/// silently ignored them).
#[test]
fn unhonoured_parameters_are_a_400_naming_them_streamed_or_not() {
    let server = Server::start(TinySpec::default(), &[]);
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let cases = [
        (json!({"presence_penalty": 0.5}), "presence_penalty"),
        (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
        (json!({"logit_bias": {"42": 100}}), "logit_bias"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
            "response_format",
        ),
        (json!({"response_format": "garbage"}), "response_format"),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "absent"}}, "tools": tools}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"stop": "x".repeat(1 << 20)}), "stop"),
    ];
    for stream in [false, true] {
        for (extra, param) in &cases {
            let mut body = json!({"messages": user("hi"), "max_tokens": 2, "stream": stream});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let r = server.post("/v1/chat/completions", &[], &body);
            assert_openai_error(&r, 400, param);
            let error = &r.json()["error"];
            assert_eq!(error["param"], *param, "stream {stream}: {}", r.body);
            let field = param.split(['.', '[']).next().unwrap();
            assert!(
                error["message"].as_str().unwrap().contains(field),
                "stream {stream}: {}",
                r.body
            );
        }
    }
    // and the neutral values of the same parameters are fine
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({"messages": user("hi"), "max_tokens": 2, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
                "logprobs": true, "top_logprobs": 2, "tools": tools, "tool_choice": "auto"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Issue 21: chat and feedback disagreed on the types `session_done` takes. One
/// rule now: a boolean, 1, or the words `true`/`yes`/`on` (any case), in the body
/// or the `X-Session-Done` header, on both routes, and what the rule says is
/// what is recorded; anything else is a 400 naming the field on both routes.
#[test]
fn chat_and_feedback_read_session_done_alike() {
    let mut server = Server::start(TinySpec::default(), &[]);
    let chat = |session: &str, done: Json| {
        let r = server.post(
            "/v1/chat/completions",
            &[],
            &json!({"messages": user("hi"), "max_tokens": 2, "session_id": session,
                    "session_done": done}),
        );
        assert_eq!(r.status, 200, "chat session_done {done}: {}", r.body);
    };
    let feedback = |session: &str, done: Json| {
        server.post(
            "/v1/feedback",
            &[],
            &json!({"session_id": session, "rating": 1, "session_done": done}),
        )
    };
    let values = [
        (json!(true), true),
        (json!("true"), true),
        (json!("Yes"), true),
        (json!(1), true),
        (json!(false), false),
        (json!("false"), false),
        (json!(0), false),
        (json!(null), false),
    ];
    for (i, (value, _)) in values.iter().enumerate() {
        let session = format!("s{i}");
        chat(&session, value.clone());
        let r = feedback(&session, value.clone());
        assert_eq!(r.status, 200, "feedback session_done {value}: {}", r.body);
    }
    for bad in [json!([true]), json!({"done": true})] {
        let r = server.post(
            "/v1/chat/completions",
            &[],
            &json!({"messages": user("hi"), "max_tokens": 2, "session_done": bad}),
        );
        assert_openai_error(&r, 400, "chat session_done");
        assert_eq!(r.json()["error"]["param"], "session_done", "{}", r.body);
        let r = feedback("s0", bad);
        assert_openai_error(&r, 400, "feedback session_done");
        assert_eq!(r.json()["error"]["param"], "session_done", "{}", r.body);
    }
    assert!(server.stop().success(), "{}", server.log());
    let rows = server.rows();
    for (i, (value, done)) in values.iter().enumerate() {
        let session = format!("s{i}");
        let recorded: Vec<(&str, Option<bool>)> = rows
            .iter()
            .filter(|r| r.session_id == session)
            .map(|r| (r.turn_type.as_str(), r.session_done))
            .collect();
        assert_eq!(
            recorded,
            [("main", Some(*done)), ("feedback", Some(*done))],
            "session_done {value}"
        );
    }
}
