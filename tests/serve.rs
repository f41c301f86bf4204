//! `claw serve` end to end: the real binary on a tiny random-weight model, on a
//! free loopback port in a temp dir, talked to only on 127.0.0.1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use claw::model::testing::{write_tiny_gguf, TinySpec};
use claw::model::Model;
use claw::rollout::{RolloutReader, RolloutRow};
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
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_gguf(&model, &spec).unwrap();
        let data = dir.path().join("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
            .args(["serve", "--model"])
            .arg(&model)
            .arg("--dir")
            .arg(&data)
            .args(["--host", "127.0.0.1", "--port", "0", "-v"])
            .args(extra)
            .env_remove("CLAW_API_KEY")
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start claw serve");
        let stderr = child.stderr.take().unwrap();
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
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child: Some(child),
            base,
            log,
            data,
            model,
            _dir: dir,
        }
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
        &json!({"session_id": "sess-a", "rating": -1, "text": "too vague"}),
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
    let event: Json = serde_json::from_str(&f.messages_json).unwrap();
    assert_eq!(event["response_id"], id1.as_str());
    assert!(f.response_ids.is_empty());
}

#[test]
fn bad_inputs_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(
        TinySpec::default(),
        &["--api-key", "sekrit", "--max-body-bytes", "65536"],
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
    assert!(metrics.contains("status=\"401\"} 2"), "{metrics}");
    assert!(
        metrics.contains("claw_requests_total{route=\"/v1/chat/completions\",status=\"413\"} 1"),
        "{metrics}"
    );
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
    let long = ureq::post(&format!("{}/v1/chat/completions", server.base))
        .send_string(
            &json!({"messages": user("go on"), "max_tokens": 4000, "ignore_eos": true,
                    "stream": true, "temperature": 1.0})
            .to_string(),
        )
        .unwrap();
    let mut reader = BufReader::new(long.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
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
    let long = ureq::post(&format!("{}/v1/chat/completions", server.base))
        .send_string(
            &json!({"messages": user("last one"), "max_tokens": 300, "ignore_eos": true,
                    "stream": true})
            .to_string(),
        )
        .unwrap();
    let mut reader = BufReader::new(long.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
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
