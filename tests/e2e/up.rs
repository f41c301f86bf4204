//! `claw up` as a user runs it: the whole loop in one command over a shared
//! directory (a local folder, or a bucket on the test S3 server), driven by a
//! scripted client with feedback until serve hot-loads what train wrote; then
//! one Ctrl-C stops every stage.

use crate::common::shared::{local, s3_shared, Shared};
use crate::common::{claw, run_ok, tiny_chat_model, wait_until_listening};

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

#[test]
fn claw_up_runs_the_loop_until_serve_loads_a_trained_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = local(&tmp.path().join("data"));
    up_until_a_checkpoint_is_served(tmp.path(), &shared);
}

/// The same with the shared directory in a bucket: serve records through its
/// spool into the bucket's raw/, the stages claim with leases, train moves the
/// bucket's `LATEST`, and serve follows it to the new adapter.
#[test]
fn claw_up_over_s3_runs_the_loop_until_serve_loads_a_trained_checkpoint() {
    let Some(s3) = crate::common::s3::server("claw_up_over_s3_runs_the_loop") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shared = s3_shared(&s3, "up", tmp.path());
    up_until_a_checkpoint_is_served(tmp.path(), &shared);
    // What serve loaded came from the bucket: train wrote it there.
    let latest = shared
        .read("checkpoints/LATEST")
        .expect("checkpoints/LATEST in the bucket");
    let latest = String::from_utf8(latest).unwrap();
    let names = shared.names("checkpoints");
    assert!(
        names.iter().any(|n| latest.trim().ends_with(n.as_str())),
        "LATEST ({latest:?}) names no adapter in the bucket: {names:?}"
    );
    assert!(
        shared.names("raw").iter().any(|n| n.ends_with(".parquet")),
        "serve's recorded turns are in the bucket's raw/"
    );
}

fn up_until_a_checkpoint_is_served(tmp: &Path, shared: &Shared) {
    let model = tiny_chat_model(tmp);
    let started = Instant::now();
    let mut cmd = claw();
    cmd.current_dir(tmp) // serve's spool (./claw-spool) over a bucket
        .args(["up", "--dir", &shared.arg(), "--port", "0"])
        .args(["--poll-interval", "200ms"])
        .arg("--model")
        .arg(&model)
        .args(["--with", "serve=--segment-age-ms 300 --reload-poll-ms 200"])
        // Feedback comes right after each reply here, so a short grace suffices.
        .args(["--with", "collect=--feedback-grace 1s"])
        .args(["--with", "judge=--sources feedback,env"])
        .args(["--with", "distill-hints=--hint-source feedback"])
        .args(["--with", "train=--batch-size 2 --partial-after 1s"])
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    shared.env(&mut cmd);
    let mut up = cmd.spawn().unwrap();
    // A failing assertion must not leave the process tree running.
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            // SAFETY: signalling our own child (a no-op once it has exited).
            unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        }
    }
    let _guard = StopOnDrop(up.id());
    let (base, log) = wait_until_listening(&mut up);
    let log_text = || log.lock().unwrap().clone();

    // Three sessions of two turns, each reply thumbed down with a correction.
    for session in 0..3 {
        let sid = format!("user-{session}");
        for turn in 0..2 {
            let mut req = ureq::post(&format!("{base}/v1/chat/completions"))
                .timeout(Duration::from_secs(60))
                .set("X-Session-Id", &sid);
            if turn == 1 {
                req = req.set("X-Session-Done", "1");
            }
            let reply: serde_json::Value = req
                .send_json(json!({
                    "messages": [{"role": "user", "content": format!("question {session}.{turn}")}],
                    "max_tokens": 6, "temperature": 0
                }))
                .unwrap_or_else(|e| panic!("chat: {e}\n{}", log_text()))
                .into_json()
                .unwrap();
            ureq::post(&format!("{base}/v1/feedback"))
                .send_json(json!({
                    "session_id": sid, "response_id": reply["id"],
                    "rating": -1, "text": "please answer in one word"
                }))
                .unwrap_or_else(|e| panic!("feedback: {e}\n{}", log_text()));
        }
    }
    // serve hot-loads what train wrote.
    let deadline = Instant::now() + Duration::from_secs(180);
    let version = loop {
        let health: serde_json::Value = ureq::get(&format!("{base}/healthz"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if let Some(v) = health["policy_version"].as_u64().filter(|&v| v >= 1) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint was loaded: {health}\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "policy version {version} served {:.1} s after start",
        started.elapsed().as_secs_f64()
    );
    let mut status = claw();
    status.args(["status", "--dir", &shared.arg(), "--json"]);
    shared.env(&mut status);
    let status: serde_json::Value = serde_json::from_slice(&run_ok(&mut status).stdout).unwrap();
    for stage in status["stages"].as_array().unwrap() {
        assert_eq!(stage["workers_alive"], 1, "{stage}");
    }
    assert!(status["checkpoint"]["policy_version"].as_u64().unwrap() >= 1);

    // One Ctrl-C stops everything cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = up.try_wait().unwrap() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "claw up did not stop:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let log = log_text();
    assert!(code.success(), "{code}\n{log}");
    for stage in ["collect", "judge", "distill-hints", "train"] {
        assert!(
            log.contains(&format!("{stage}: stopped")),
            "{stage} did not stop cleanly:\n{log}"
        );
    }
    assert!(log.contains("[        train] step 1 "), "{log}");
}
