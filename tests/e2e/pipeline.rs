//! The loop's first stages end to end: `claw serve` (tiny random-weight model, on
//! a free loopback port) records a scripted multi-session conversation with tool
//! results and feedback, then `claw collect DIR/raw/*.parquet | claw judge
//! --sources feedback,env` scores it, and every sample's reward is checked against
//! what the script did.

use crate::common::{spawn_server, tiny_chat_model};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claw::rollout::{RolloutReader, RolloutRow};
use serde_json::{json, Value as Json};

struct Server {
    child: Option<Child>,
    base: String,
    log: Arc<Mutex<String>>,
    data: PathBuf,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let model = tiny_chat_model(dir);
        let data = dir.join("data");
        let (child, base, log) = spawn_server(&model, &data, &[]);
        Server {
            child: Some(child),
            base,
            log,
            data,
        }
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &Json) -> Json {
        let mut req = ureq::post(&format!("{}{path}", self.base)).timeout(Duration::from_secs(120));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        match req.send_json(body.clone()) {
            Ok(r) => r.into_json().unwrap(),
            Err(e) => panic!(
                "POST {path}: {e}\nserver log:\n{}",
                self.log.lock().unwrap()
            ),
        }
    }

    /// One main turn of `session`; returns the response id (the sample_id).
    fn turn(&self, session: &str, messages: &Json, done: bool) -> (String, String) {
        let mut headers = vec![("X-Session-Id", session), ("X-Turn-Type", "main")];
        if done {
            headers.push(("X-Session-Done", "1"));
        }
        // ignore_eos: a random-weight model may stop at once, and a turn with no
        // response is not a sample.
        let reply = self.post(
            "/v1/chat/completions",
            &headers,
            &json!({"messages": messages, "max_tokens": 4, "ignore_eos": true, "seed": 1}),
        );
        let id = reply["id"].as_str().unwrap().to_string();
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (id, text)
    }

    fn feedback(&self, body: Json) {
        let reply = self.post("/v1/feedback", &[], &body);
        assert_eq!(reply["object"], "feedback", "{reply}");
    }

    /// SIGTERM and wait: the recorder closes its segments.
    fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "server did not stop:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Json {
    json!({"role": "assistant", "content": text})
}

fn tool_call(id: &str, command: &str) -> Json {
    json!({"role": "assistant", "content": "", "tool_calls": [{"id": id, "type": "function",
        "function": {"name": "shell", "arguments": json!({"command": command}).to_string()}}]})
}

fn tool_result(id: &str, text: &str) -> Json {
    json!({"role": "tool", "tool_call_id": id, "content": text})
}

#[test]
fn serve_collect_judge_rewards_follow_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());

    // Session alpha: the tool the assistant ran fails (env -1); the user rates the
    // second turn up (feedback +1); the last turn gets nothing (no reward).
    let a1_msgs = json!([user("Run the tests.")]);
    let (a1, _) = server.turn("alpha", &a1_msgs, false);
    let a2_msgs = json!([
        user("Run the tests."),
        tool_call("c1", "pytest"),
        tool_result(
            "c1",
            "Traceback (most recent call last):\n  File \"t.py\", line 1\nImportError: no module"
        ),
    ]);
    let (a2, r2) = server.turn("alpha", &a2_msgs, false);
    server.feedback(json!({"session_id": "alpha", "response_id": a2, "rating": 1}));
    let a3_msgs = json!([
        user("Run the tests."),
        tool_call("c1", "pytest"),
        tool_result("c1", "Traceback (most recent call last): ..."),
        assistant(&r2),
        user("Thanks, that fixed it."),
    ]);
    let (a3, _) = server.turn("alpha", &a3_msgs, true);

    // Session beta: a thumbs-up on turn 1 wins over the tool error that follows it;
    // a thumbs-down with text on the last turn (named by turn number) is its reward.
    let (b1, _) = server.turn("beta", &json!([user("List my files.")]), false);
    server.feedback(json!({"session_id": "beta", "response_id": b1, "rating": 1}));
    let b2_msgs = json!([
        user("List my files."),
        tool_call("c2", "ls x"),
        tool_result("c2", "ls: cannot access 'x': No such file or directory"),
    ]);
    let (b2, _) = server.turn("beta", &b2_msgs, true);
    server.feedback(json!({"session_id": "beta", "turn": 2, "rating": -1,
        "text": "wrong directory"}));

    // Session gamma: a side request (not a sample), a clean tool result (no
    // verdict without the LLM judge), and a last turn with a non-zero exit.
    server.post(
        "/v1/chat/completions",
        &[("X-Session-Id", "gamma"), ("X-Turn-Type", "side")],
        &json!({"messages": [user("Summarise the chat")], "max_tokens": 2, "ignore_eos": true}),
    );
    let (g1, _) = server.turn("gamma", &json!([user("How many files?")]), false);
    let g2_msgs = json!([
        user("How many files?"),
        tool_call("c3", "ls | wc -l"),
        tool_result("c3", "3"),
    ]);
    let (g2, _) = server.turn("gamma", &g2_msgs, false);
    let g3_msgs = json!([
        user("How many files?"),
        tool_call("c3", "ls | wc -l"),
        tool_result("c3", "3"),
        tool_call("c4", "make"),
        tool_result(
            "c4",
            "make: *** No rule to make target 'all'.\nexit code: 2"
        ),
    ]);
    let (g3, _) = server.turn("gamma", &g3_msgs, true);
    server.stop();

    // claw collect DIR/raw/*.parquet | claw judge --sources feedback,env -o judged.parquet
    let raw = server.data.join("raw").join("*.parquet");
    let judged = dir.path().join("judged.parquet");
    let mut collect = Command::new(env!("CARGO_BIN_EXE_claw"))
        .arg("collect")
        .arg(&raw)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run claw collect");
    let judge = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["judge", "--sources", "feedback,env", "--json", "-o"])
        .arg(&judged)
        .stdin(collect.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run claw judge");
    let collected = collect.wait_with_output().unwrap();
    assert!(
        collected.status.success(),
        "collect: {}",
        String::from_utf8_lossy(&collected.stderr)
    );
    assert!(
        judge.status.success(),
        "judge: {}",
        String::from_utf8_lossy(&judge.stderr)
    );

    let rows: Vec<RolloutRow> = RolloutReader::new(&[judged.to_string_lossy().into_owned()])
        .unwrap()
        .read_all_rows()
        .unwrap();
    // (session, sample id, turn, reward, judge source)
    type Expected<'a> = (&'a str, &'a str, i32, Option<f32>, Option<&'a str>);
    let expected: &[Expected] = &[
        ("alpha", &a1, 1, Some(-1.0), Some("env")),
        ("alpha", &a2, 2, Some(1.0), Some("feedback")),
        ("alpha", &a3, 3, None, None),
        ("beta", &b1, 1, Some(1.0), Some("feedback")),
        ("beta", &b2, 2, Some(-1.0), Some("feedback")),
        ("gamma", &g1, 1, None, None),
        ("gamma", &g2, 2, Some(-1.0), Some("env")),
        ("gamma", &g3, 3, None, None),
    ];
    let summary = |rows: &[RolloutRow]| -> Vec<String> {
        rows.iter()
            .map(|r| {
                format!(
                    "{} turn {:?} {}: reward {:?} from {:?} (next {:?}: {:?}, feedback {:?})",
                    r.session_id,
                    r.turn,
                    r.sample_id,
                    r.reward,
                    r.judge_source,
                    r.next_state_role,
                    r.next_state_text,
                    r.feedback
                )
            })
            .collect()
    };
    assert_eq!(
        rows.len(),
        expected.len(),
        "samples:\n{}",
        summary(&rows).join("\n")
    );
    for (session, id, turn, reward, source) in expected {
        let r = rows
            .iter()
            .find(|r| r.sample_id == *id)
            .unwrap_or_else(|| panic!("no sample {id}:\n{}", summary(&rows).join("\n")));
        let what = format!("{session} turn {turn}:\n{}", summary(&rows).join("\n"));
        assert_eq!(r.session_id, *session, "{what}");
        assert_eq!(r.turn, Some(*turn), "{what}");
        assert_eq!(r.reward, *reward, "{what}");
        assert_eq!(r.judge_source.as_deref(), *source, "{what}");
        assert_eq!(r.judge_votes, None, "{what}");
    }
    let env_raw = rows.iter().find(|r| r.sample_id == a1).unwrap();
    assert_eq!(
        env_raw.judge_raw.as_deref(),
        Some("env rule traceback: Traceback (most recent call last)")
    );
    // feedback text stays in its column, next to the reward it explains
    let b2_row = rows.iter().find(|r| r.sample_id == b2).unwrap();
    assert_eq!(b2_row.feedback_text.as_deref(), Some("wrong directory"));

    let stats: Json = serde_json::from_slice(&judge.stdout).unwrap();
    assert_eq!(stats["rows"], 8);
    assert_eq!(stats["judged"], 5);
    assert_eq!(stats["no_reward"], 3);
    assert_eq!(stats["by_source"]["feedback"]["+1"], 2);
    assert_eq!(stats["by_source"]["feedback"]["-1"], 1);
    assert_eq!(stats["by_source"]["env"]["-1"], 2);
    assert_eq!(stats["votes"], 0);
}
