//! `claw serve --upstream URL` end to end: in front of llama.cpp's own server
//! (built from the llama.cpp vendored in the llama-cpp-python sdist by
//! `scripts/build-llama-server`; skipped with a message when it is not built),
//! and in front of a dead port.

use std::time::{Duration, Instant};

use crate::common::llama::{free_port, llama_server, post, rows, start_claw, start_llama, stop};
use claw::rollout::RolloutRow;
use serde_json::{json, Value as Json};

fn ids_of(v: &Json) -> Vec<i32> {
    v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens: {v}"))
        .iter()
        .map(|t| t.as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn upstream_llama_server_records_the_engines_token_ids() {
    let Some(bin) = llama_server() else { return };
    let Some(model) = crate::common::real_model() else {
        return;
    };
    let (_llama, llama) = start_llama(&bin, &model, &[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (claw, base, log) = start_claw(&llama, &data, &["--segment-age-ms", "200"]);

    // /v1/models names the engine's model.
    let models: Json = ureq::get(&format!("{base}/v1/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    assert!(name.contains("SmolLM2"), "{models}");

    // The official shape, with a session.
    let (status, body, session) = post(
        &format!("{base}/v1/chat/completions"),
        &[("X-Session-Id", "up-1")],
        &json!({
            "model": "whatever",
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 24,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 2,
        }),
    );
    assert_eq!(status, 200, "{body}\n{}", log.lock().unwrap());
    assert_eq!(session.as_deref(), Some("up-1"));
    let reply: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], name.as_str());
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{reply}");
    let lp = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!lp.is_empty() && lp[0]["top_logprobs"].as_array().unwrap().len() <= 2);
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    // Streaming: SSE chunks ending with [DONE].
    let (status, sse, _) = post(
        &format!("{base}/v1/chat/completions"),
        &[("X-Session-Id", "up-1")],
        &json!({
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": "Now count to three."},
            ],
            "max_tokens": 16,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    );
    assert_eq!(status, 200, "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let chunks: Vec<Json> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // Token by token from the engine: several content chunks.
    let pieces = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(pieces > 1, "{sse}");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10, "{sse}");
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1, "{sse}");

    // Feedback on the session's latest turn.
    let (status, fb, _) = post(
        &format!("{base}/v1/feedback"),
        &[],
        &json!({"session_id": "up-1", "rating": 1, "text": "nice"}),
    );
    assert_eq!(status, 200, "{fb}");
    stop(claw, &log);

    let rows = rows(&data);
    let main: Vec<&RolloutRow> = rows.iter().filter(|r| r.turn_type == "main").collect();
    assert_eq!(main.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .any(|r| r.turn_type == "feedback" && r.feedback == Some(1) && r.session_id == "up-1"));
    for row in &main {
        assert_eq!(row.token_source, "upstream-tokenize", "{row:?}");
        assert_eq!(row.session_id, "up-1");
        assert_eq!(row.model, name);
        assert!(row.prompt_text.contains("Say hi"), "{}", row.prompt_text);
        // The prompt ids are the engine's tokenisation of the prompt it rendered.
        let tokens: Json = ureq::post(&format!("{llama}/tokenize"))
            .send_json(
                json!({"content": row.prompt_text, "add_special": true, "parse_special": true}),
            )
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(row.prompt_ids, ids_of(&tokens));
        // The completion ids are the engine's, one finite log-prob each, and
        // they spell the reply (plus the EOS that ended it).
        assert!(!row.response_ids.is_empty());
        assert_eq!(row.response_ids.len(), row.response_logprobs.len());
        assert!(row
            .response_logprobs
            .iter()
            .all(|l| l.is_finite() && *l <= 0.0));
        let text: Json = ureq::post(&format!("{llama}/detokenize"))
            .send_json(json!({"tokens": row.response_ids}))
            .unwrap()
            .into_json()
            .unwrap();
        let text = text["content"].as_str().unwrap();
        assert!(
            text.starts_with(&row.response_text),
            "{text:?} vs {:?}",
            row.response_text
        );
    }
    assert_eq!(main[0].response_text, content);
}

#[test]
fn upstream_dead_port_is_a_502_naming_the_upstream() {
    let dead = free_port();
    let upstream = format!("http://127.0.0.1:{dead}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (claw, base, log) = start_claw(&upstream, &data, &["--upstream-model", "elsewhere"]);
    let models: Json = ureq::get(&format!("{base}/v1/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "elsewhere");
    let started = Instant::now();
    let (status, body, _) = post(
        &format!("{base}/v1/chat/completions"),
        &[],
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status, 502, "{body}");
    let error: Json = serde_json::from_str(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("127.0.0.1:{dead}")), "{message}");
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    // A streamed request too: the status, not a broken stream.
    let (status, body, _) = post(
        &format!("{base}/v1/chat/completions"),
        &[],
        &json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
    );
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{dead}")), "{body}");
    // claw's own checks still come first.
    let (status, body, _) = post(
        &format!("{base}/v1/chat/completions"),
        &[],
        &json!({"messages": []}),
    );
    assert_eq!(status, 400, "{body}");
    stop(claw, &log);
    assert!(rows(&data).iter().all(|r| r.turn_type != "main"));
}
