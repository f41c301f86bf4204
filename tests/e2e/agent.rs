//! The agent benchmark's plumbing at CI size, on the tiny random model: a short
//! `claw eval --bench agent` run through the whole loop with its report; and one
//! scripted episode through a real `claw serve`, `claw collect` and `claw judge`,
//! which shows the tool path the tiny model never takes (it cannot call tools):
//! the sandboxed program's output is the tool message, collect pairs it as the
//! turn's next state, and the rewards come from the environment.

use crate::common::{claw, read_rows, spawn_server, tiny_chat_model};

use std::cell::Cell;
use std::path::{Path, PathBuf};

use claw::eval::agent::episode::{play, Endpoint, EpisodeConfig, Outcome, Reply, TurnRequest};
use claw::eval::agent::run::Serve;
use claw::eval::agent::tasks::{Kind, Task};
use claw::eval::sandbox::{namespaces_available, Limits, Sandbox};
use claw::rollout::RolloutRow;
use serde_json::json;

/// `--unsafe-no-sandbox` where this machine has no user namespaces (the tiny
/// model writes no tool calls, so nothing runs unsandboxed in the eval test).
fn sandbox_flags() -> Vec<&'static str> {
    match namespaces_available() {
        Ok(()) => vec![],
        Err(e) => {
            eprintln!("note: no user namespaces ({e:#}): the python tool runs unsandboxed");
            vec!["--unsafe-no-sandbox"]
        }
    }
}

fn rows_under(dir: &Path) -> Vec<RolloutRow> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| read_rows(f)).collect()
}

#[test]
fn a_short_agent_run_goes_through_the_whole_loop_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let report = tmp.path().join("report");
    let data = tmp.path().join("runs");
    let out = claw()
        .args(["eval", "--bench", "agent", "--method", "combined,off"])
        .args(["--episodes", "6", "--batch", "3", "--heldout", "2"])
        .args(["--max-tokens", "8", "--round-timeout", "120"])
        // the base model reads the hints (distill-hints --teacher base)
        .args(["--teacher", "base"])
        .args([
            "--success-window",
            "3",
            // the retention check of the combined run's adapter, at CI size
            "--retention-limit",
            "2",
            "--feedback-grace",
            "2",
        ])
        .args(sandbox_flags())
        .arg("--model")
        .arg(&model)
        .arg("--report")
        .arg(&report)
        .arg("--keep-data")
        .arg(&data)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| combined | 0 | 6 |"), "{stdout}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("agent.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["episodes"].as_array().unwrap().len(), 6);
        assert_eq!(run["heldout_before"]["episodes"], 2);
        assert_eq!(run["heldout_after"]["episodes"], 2);
        assert_eq!(run["settings"]["tool_rounds"], 2);
        let kinds: Vec<&str> = run["episodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(&kinds[..4], ["arithmetic", "units", "strings", "word"]);
    }
    let (combined, off) = (&runs[0], &runs[1]);
    assert_eq!(combined["method"], "combined");
    assert!(
        combined["final_policy_version"].as_u64().unwrap() >= 1,
        "{combined}"
    );
    assert_eq!(off["method"], "off");
    assert_eq!(off["final_policy_version"], 0);
    assert!(off.get("signals").is_none());
    // The trained run's final adapter was checked against the base; the control
    // (the base itself) was not.
    let rows: Vec<&str> = combined["retention"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no retention rows: {combined}"))
        .iter()
        .map(|r| r["metric"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ["gsm8k accuracy", "facts accuracy", "perplexity"]);
    assert!(off.get("retention").is_none());

    // Every turn of every training episode was judged from the environment's
    // verdict (the tiny model never solves one: all -1, each with its hint).
    let turns: u64 = combined["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["turns"].as_u64().unwrap())
        .sum();
    let signals = &combined["signals"];
    assert_eq!(signals["samples"].as_u64().unwrap(), turns, "{signals}");
    assert_eq!(
        signals["rewards"]["feedback -1"].as_u64().unwrap(),
        turns,
        "{signals}"
    );
    assert_eq!(signals["hinted"].as_u64().unwrap(), turns, "{signals}");
    let run_dir = data.join("agent-combined-seed0");
    let judged = rows_under(&run_dir.join("judged"));
    assert!(judged.iter().all(|r| r
        .tools_json
        .as_deref()
        .is_some_and(|t| t.contains("\"python\""))));
    let hint = rows_under(&run_dir.join("distilled"))[0]
        .hint
        .clone()
        .unwrap();
    // The tiny model never calls the tool: it is told the call to make.
    assert!(hint.contains("Your reply must be this tool call"), "{hint}");
    assert_eq!(combined["settings"]["teacher"], "base", "{combined}");
    assert!(run_dir.join("checkpoints").join("LATEST").is_file());

    let md = std::fs::read_to_string(report.join("agent.md")).unwrap();
    for part in [
        "| combined | 0 | 6 |",
        "| off | 0 | 6 |",
        "## Signals",
        "## Retention",
        "| seed 0 | combined | perplexity |",
        "agent.png",
        "held-out before",
        "valid calls",
    ] {
        assert!(md.contains(part), "{part}: {md}");
    }
    let png = std::fs::read(report.join("agent.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}

/// The tiny model's reply, with a scripted tool call on the first turn (the
/// tiny model cannot write one), and a right answer after it.
struct ScriptedCalls {
    serve: Serve,
    code: &'static str,
    turn: Cell<usize>,
}

impl Endpoint for ScriptedCalls {
    fn chat(&self, turn: &TurnRequest<'_>) -> anyhow::Result<Reply> {
        let mut reply = self.serve.chat(turn)?;
        let n = self.turn.get();
        self.turn.set(n + 1);
        if n == 0 {
            reply.content = String::new();
            reply.tool_calls = vec![json!({
                "id": "call_1", "type": "function",
                "function": {"name": "python", "arguments": json!({"code": self.code}).to_string()},
            })];
        } else {
            reply.content = "Answer: 42".into();
        }
        Ok(reply)
    }

    fn feedback(
        &self,
        session: &str,
        id: &str,
        rating: i8,
        text: Option<&str>,
        done: bool,
    ) -> anyhow::Result<()> {
        self.serve.feedback(session, id, rating, text, done)
    }
}

#[test]
fn tool_results_are_next_states_and_the_environment_gives_the_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let data = tmp.path().join("data");
    let (mut server, base, log) = spawn_server(&model, &data, &["--segment-age-ms", "200"]);
    let sandbox = Sandbox::new(
        "python3",
        Limits::default(),
        namespaces_available().is_err(),
    )
    .unwrap();
    let task = Task {
        kind: Kind::Arithmetic,
        prompt: "What is 6 * 7?".into(),
        answer: "42".into(),
        decimals: Some(0),
        program: "print(6 * 7)".into(),
    };
    let cfg = EpisodeConfig {
        tool_rounds: 2,
        temperature: 0.7,
        max_tokens: 4,
    };
    // One episode whose program fails, one whose program prints the answer.
    for (session, code) in [("fails", "print(6 * 7 / 0)"), ("works", "print(6 * 7)")] {
        let endpoint = ScriptedCalls {
            serve: Serve {
                base: format!("{base}/v1"),
            },
            code,
            turn: Cell::new(0),
        };
        let episode = play(&endpoint, &sandbox, &task, session, false, &cfg, 1)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", log.lock().unwrap()));
        assert_eq!(episode.outcome, Outcome::Correct);
        assert_eq!(episode.turns.len(), 2);
        assert_eq!(episode.tool_errors(), usize::from(session == "fails"));
    }
    // Let serve close its segment, then stop it (a graceful stop loses nothing).
    std::thread::sleep(std::time::Duration::from_millis(500));
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGINT) };
    server.wait().unwrap();

    let samples = tmp.path().join("samples.parquet");
    let judged = tmp.path().join("judged.parquet");
    let raw = data.join("raw");
    let run = |args: &[&str]| {
        let out = claw()
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "collect",
        raw.to_str().unwrap(),
        "-o",
        samples.to_str().unwrap(),
    ]);
    run(&[
        "judge",
        samples.to_str().unwrap(),
        "--sources",
        "env,feedback",
        "-o",
        judged.to_str().unwrap(),
    ]);
    let rows = read_rows(&judged);
    assert_eq!(rows.len(), 4, "two turns per episode");
    let turn = |session: &str, t: i32| {
        rows.iter()
            .find(|r| r.session_id == session && r.turn == Some(t))
            .unwrap_or_else(|| panic!("{session} turn {t}"))
    };
    // The failing program's traceback is the first turn's next state: env -1.
    let failed = turn("fails", 1);
    assert_eq!(failed.next_state_role.as_deref(), Some("tool"));
    let text = failed.next_state_text.as_deref().unwrap();
    assert!(text.contains("ZeroDivisionError"), "{text}");
    assert_eq!(
        (failed.reward, failed.judge_source.as_deref()),
        (Some(-1.0), Some("env"))
    );
    // The working program's output is the next state; the right answer rates
    // the turn that called it +1, and the answer itself.
    let worked = turn("works", 1);
    assert_eq!(worked.next_state_role.as_deref(), Some("tool"));
    assert_eq!(worked.next_state_text.as_deref(), Some("42"));
    assert_eq!(
        (worked.reward, worked.judge_source.as_deref()),
        (Some(1.0), Some("feedback"))
    );
    for session in ["fails", "works"] {
        assert_eq!(turn(session, 2).reward, Some(1.0));
    }
}

/// Ctrl-C during a study stops the run in progress after its episode, plays the
/// held-out tasks, writes the report with what ran, starts no further run, and
/// exits with an error.
#[test]
fn ctrl_c_stops_the_study_and_keeps_a_report_of_what_ran() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let report = tmp.path().join("report");
    let mut child = claw()
        .args(["eval", "--bench", "agent", "--method", "combined,off"])
        .args(["--episodes", "400", "--batch", "2", "--heldout", "1"])
        .args(["--max-tokens", "4", "--round-timeout", "120"])
        .args(["--feedback-grace", "1", "--retention-limit", "1"])
        .args(sandbox_flags())
        .arg("--model")
        .arg(&model)
        .arg("--report")
        .arg(&report)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("episode 4/400") {
            // SAFETY: signalling the child this test started.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            break;
        }
        line.clear();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert!(!status.success(), "{seen}");
    assert!(seen.contains("stopped after"), "{seen}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("agent.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    assert_eq!(runs.len(), 1, "the control did not start: {results}");
    let played = runs[0]["episodes"].as_array().unwrap().len();
    assert!((4..400).contains(&played), "{played} episodes");
    assert_eq!(runs[0]["heldout_after"]["episodes"], 1);
    assert!(runs[0].get("retention").is_none_or(|r| r.is_null()));
}
