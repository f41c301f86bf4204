//! `claw judge` as a user runs it: the real binary on rollout files in temp dirs,
//! with feedback and env rules, a stub OpenAI-compatible judge on loopback (fixed
//! votes, garbage, errors, timeouts), and the tiny local model.

use crate::common::tiny_chat_model;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use claw::rollout::{rows_to_batch, RolloutReader, RolloutRow, RolloutWriter};
use serde_json::{json, Value as Json};

fn claw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(args)
        .env_remove("CLAW_MODEL")
        .env_remove("CLAW_JUDGE_MODEL")
        .env_remove("CLAW_JUDGE_API_KEY")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run claw")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "claw failed: {}", stderr(&out));
    out
}

fn row(id: &str) -> RolloutRow {
    RolloutRow {
        sample_id: id.into(),
        session_id: "s1".into(),
        turn: Some(1),
        turn_type: "main".into(),
        created_at: 1_700_000_000_000,
        model: "policy".into(),
        messages_json: r#"[{"role":"user","content":"hi"}]"#.into(),
        prompt_text: "<|im_start|>user\nhi<|im_end|>\n".into(),
        response_text: format!("the reply of {id}"),
        prompt_ids: vec![1, 2, 3],
        response_ids: vec![4, 5],
        response_logprobs: vec![-0.5, -0.25],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

fn with_next(mut r: RolloutRow, role: &str, text: &str) -> RolloutRow {
    r.next_state_role = Some(role.into());
    r.next_state_text = Some(text.into());
    r
}

fn write_rows(path: &Path, rows: &[RolloutRow]) {
    let mut w = RolloutWriter::file(path).unwrap();
    w.write_rows(rows).unwrap();
    w.finish().unwrap();
}

fn read_rows(path: &Path) -> Vec<RolloutRow> {
    RolloutReader::new(&[path.to_string_lossy().into_owned()])
        .unwrap()
        .read_all_rows()
        .unwrap()
}

fn by_id<'a>(rows: &'a [RolloutRow], id: &str) -> &'a RolloutRow {
    rows.iter()
        .find(|r| r.sample_id == id)
        .unwrap_or_else(|| panic!("no row {id}"))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn help_teaches_the_sources_rules_and_prompt() {
    let out = ok(claw(&["judge", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Reads:",
        "Writes:",
        "Example",
        "--sources",
        "--judge-url",
        "--votes",
        "Traceback (most recent call last)",
        "exit-status",
        "\\boxed{1}",
        "{response}",
        "tie",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
    let out = ok(claw(&["judge", "--print-prompt"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts/judge-prm.txt")
        )
        .unwrap()
    );
}

#[test]
fn feedback_and_env_rules_without_an_llm() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    let output = dir.path().join("judged.parquet");
    let mut thumbs_up = with_next(row("thumbs-up"), "tool", "Error: but the user liked it");
    thumbs_up.feedback = Some(1);
    let mut thumbs_down = row("thumbs-down");
    thumbs_down.feedback = Some(-1);
    let mut side = with_next(row("side"), "tool", "exit code: 1");
    side.turn_type = "side".into();
    let rows = vec![
        thumbs_up,
        thumbs_down,
        with_next(
            row("traceback"),
            "tool",
            "Traceback (most recent call last):\n  File \"a.py\"\nKeyError: 'x'",
        ),
        with_next(
            row("exit"),
            "tool",
            "$ make\nmake: *** [all] Error 2\nexit status 2",
        ),
        with_next(row("clean-tool"), "tool", "exit code: 0\n3 tests passed"),
        with_next(
            row("user-paste"),
            "user",
            "Traceback (most recent call last): why?",
        ),
        row("last"),
        side,
    ];
    write_rows(&input, &rows);
    let out = ok(claw(&[
        "judge",
        p(&input),
        "--sources",
        "feedback,env",
        "-o",
        p(&output),
    ]));
    let log = stderr(&out);
    assert!(log.contains("judged 4 of 8 rows"), "{log}");
    assert!(log.contains("mean reward -0.500"), "{log}");

    let got = read_rows(&output);
    assert_eq!(got.len(), rows.len());
    let expect: &[(&str, Option<f32>, Option<&str>)] = &[
        ("thumbs-up", Some(1.0), Some("feedback")),
        ("thumbs-down", Some(-1.0), Some("feedback")),
        ("traceback", Some(-1.0), Some("env")),
        ("exit", Some(-1.0), Some("env")),
        ("clean-tool", None, None),
        ("user-paste", None, None),
        ("last", None, None),
        ("side", None, None),
    ];
    for (id, reward, source) in expect {
        let r = by_id(&got, id);
        assert_eq!(
            (r.reward, r.judge_source.as_deref()),
            (*reward, *source),
            "{id}"
        );
        assert_eq!(r.judge_votes, None, "{id}: no votes without an LLM");
    }
    assert_eq!(
        by_id(&got, "traceback").judge_raw.as_deref(),
        Some("env rule traceback: Traceback (most recent call last)")
    );
    // every other column is as it was
    for (a, b) in rows.iter().zip(&got) {
        let mut b = b.clone();
        b.reward = None;
        b.judge_source = None;
        b.judge_raw = None;
        assert_eq!(a, &b);
    }
}

#[test]
fn reads_stdin_writes_stdout_and_keeps_unknown_columns() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    // rows plus a column claw does not know
    let mut r = with_next(row("a"), "tool", "fatal: not a git repository");
    r.feedback = None;
    let base = rows_to_batch(&[r, row("b")]).unwrap();
    let mut fields: Vec<Field> = base
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("team_label", DataType::Utf8, true));
    let mut cols = base.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec![Some("keep me"), None])));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let mut w = RolloutWriter::file(&input).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["judge", "--sources", "env", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(&input).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // with the data on stdout, the JSON summary goes to stderr
    let summary: Json = serde_json::from_str(stderr(&out).lines().last().unwrap()).unwrap();
    assert_eq!(summary["rows"], 2);
    assert_eq!(summary["judged"], 1);
    assert_eq!(summary["no_reward"], 1);
    assert_eq!(summary["by_source"]["env"]["-1"], 1);

    let judged = dir.path().join("judged.parquet");
    std::fs::write(&judged, &out.stdout).unwrap();
    let file = claw::rollout::RolloutFile::open_path(&judged).unwrap();
    let names: Vec<&str> = file
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names.last(), Some(&"team_label"));
    let batch = file.batches(100, None).unwrap().next().unwrap().unwrap();
    let labels = batch
        .column_by_name("team_label")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .clone();
    assert_eq!(labels, StringArray::from(vec![Some("keep me"), None]));
    let rows = batch.rows().unwrap();
    assert_eq!(rows[0].reward, Some(-1.0));
    assert_eq!(rows[1].reward, None);
}

// ---------------------------------------------------------------------------
// A stub OpenAI-compatible judge on loopback.
// ---------------------------------------------------------------------------

/// What the stub does for one call, scripted in the next state text as
/// `script:a|b|c` (call n of a script gets item n, the last item repeats):
/// `b:X` answers "... \boxed{X}", `text:T` answers T, `garbage` answers a
/// non-JSON 200, `500` an HTTP 500, `sleep` answers `\boxed{1}` after 6 s (past the 2 s timeout),
/// `slow` answers `\boxed{1}` after 200 ms.
struct Stub {
    base: String,
    calls: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Json>>>,
}

fn start_stub(api_key: Option<&'static str>) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let counters: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let stub = Stub {
        base,
        calls: calls.clone(),
        max_in_flight: max_in_flight.clone(),
        bodies: bodies.clone(),
    };
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (calls, in_flight, max_in_flight, bodies, counters) = (
                calls.clone(),
                in_flight.clone(),
                max_in_flight.clone(),
                bodies.clone(),
                counters.clone(),
            );
            std::thread::spawn(move || {
                let busy = Busy {
                    now: &in_flight,
                    max: &max_in_flight,
                };
                let _ = serve_one(conn, api_key, &calls, &bodies, &counters, &busy);
            });
        }
    });
    stub
}

/// Counts calls that are being worked on (sleeping), not connections, so a
/// client's next call that connects before the previous thread has exited does not
/// look like extra concurrency.
struct Busy<'a> {
    now: &'a AtomicUsize,
    max: &'a AtomicUsize,
}

impl Busy<'_> {
    fn during(&self, ms: u64) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_one(
    conn: TcpStream,
    api_key: Option<&str>,
    calls: &AtomicUsize,
    bodies: &Mutex<Vec<Json>>,
    counters: &Mutex<HashMap<String, usize>>,
    busy: &Busy,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let mut conn = conn;
    let respond = |conn: &mut TcpStream, status: u16, body: &str| {
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes())?;
        conn.write_all(body.as_bytes())
    };
    if let Some(key) = api_key {
        if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {key}")) {
            return respond(&mut conn, 401, r#"{"error":{"message":"invalid api key"}}"#);
        }
    }
    if request_line.starts_with("GET /v1/models") {
        return respond(
            &mut conn,
            200,
            r#"{"object":"list","data":[{"id":"stub-judge"}]}"#,
        );
    }
    if !request_line.starts_with("POST /v1/chat/completions") {
        return respond(&mut conn, 404, r#"{"error":{"message":"no such route"}}"#);
    }
    calls.fetch_add(1, Ordering::SeqCst);
    let body: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
    bodies.lock().unwrap().push(body.clone());
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let script: Vec<String> = match prompt.find("script:") {
        Some(at) => prompt[at + 7..]
            .lines()
            .next()
            .unwrap_or("")
            .split('|')
            .map(str::to_string)
            .collect(),
        None => vec!["b:1".into()],
    };
    let step = {
        let mut c = counters.lock().unwrap();
        let n = c.entry(prompt.clone()).or_default();
        let step = script[(*n).min(script.len() - 1)].clone();
        *n += 1;
        step
    };
    let completion = |text: &str| {
        json!({
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}
        })
        .to_string()
    };
    match step.as_str() {
        "garbage" => respond(&mut conn, 200, "<html>definitely not json</html>"),
        "500" => respond(&mut conn, 500, r#"{"error":{"message":"overloaded"}}"#),
        "sleep" | "slow" => {
            busy.during(if step == "sleep" { 6000 } else { 200 });
            respond(&mut conn, 200, &completion("late but sure: \\boxed{1}"))
        }
        s => {
            let text = match s.strip_prefix("b:") {
                Some(v) => format!("The user moved on. \\boxed{{{v}}}"),
                None => s.strip_prefix("text:").unwrap_or(s).to_string(),
            };
            respond(&mut conn, 200, &completion(&text))
        }
    }
}

fn judge_with_stub(stub: &Stub, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let url = format!("{}/v1", stub.base);
    let mut args = vec![
        "judge",
        p(input),
        "-o",
        p(output),
        "--judge-url",
        &url,
        "--timeout",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    claw(&args)
}

#[test]
fn remote_judge_votes_garbage_errors_and_timeouts() {
    let stub = start_stub(None);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    let output = dir.path().join("judged.parquet");
    let rows = vec![
        with_next(row("unanimous"), "user", "script:b:1"),
        with_next(row("plus-sign"), "user", "script:b:+1|b:-1|b:+1"),
        with_next(
            row("several-boxes"),
            "user",
            "script:text:\\boxed{1} wait, no: \\boxed{-1}",
        ),
        with_next(row("tie"), "user", "script:b:1|b:-1|garbage"),
        with_next(
            row("all-invalid"),
            "user",
            "script:garbage|text:no box at all|b:2",
        ),
        // a 500 is retried (with --retries 1) and then answered
        with_next(row("retried"), "user", "script:500|b:-1"),
        // a call that times out twice (first try and its one retry) is invalid
        // (the three first calls arrive together and take items 1-3; the retry,
        // 2.5 s later, takes item 4)
        with_next(row("timeout"), "user", "script:sleep|b:-1|b:-1|sleep|b:-1"),
        with_next(row("tool"), "tool", "script:b:0"),
        row("no-next-state"),
    ];
    write_rows(&input, &rows);
    let out = judge_with_stub(
        &stub,
        &input,
        &output,
        &["--retries", "1", "--concurrency", "8"],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let got = read_rows(&output);
    let check = |id: &str, reward: Option<f32>, votes: &[i8], invalid: i32| {
        let r = by_id(&got, id);
        assert_eq!(r.reward, reward, "{id} reward");
        let mut v = r.judge_votes.clone().unwrap_or_default();
        v.sort();
        let mut want = votes.to_vec();
        want.sort();
        assert_eq!(v, want, "{id} votes");
        assert_eq!(r.judge_invalid, Some(invalid), "{id} invalid");
        assert_eq!(r.judge_source.as_deref(), Some("prm:stub-judge"), "{id}");
    };
    check("unanimous", Some(1.0), &[1, 1, 1], 0);
    check("plus-sign", Some(1.0), &[1, 1, -1], 0);
    check("several-boxes", Some(-1.0), &[-1, -1, -1], 0);
    check("tie", Some(0.0), &[1, -1], 1);
    check("all-invalid", Some(0.0), &[], 3);
    check("retried", Some(-1.0), &[-1, -1, -1], 0);
    // the first call sleeps past its timeout, then sleeps again on its retry;
    // the other two get -1 straight away
    check("timeout", Some(-1.0), &[-1, -1], 1);
    check("tool", Some(0.0), &[0, 0, 0], 0);
    let r = by_id(&got, "no-next-state");
    assert_eq!(
        (r.reward, &r.judge_source, r.judge_invalid),
        (None, &None, None)
    );

    let raw = by_id(&got, "unanimous").judge_raw.clone().unwrap();
    assert_eq!(raw, "The user moved on. \\boxed{1}");
    assert_eq!(by_id(&got, "tie").judge_raw, None);

    // what the judge was sent
    let bodies = stub.bodies.lock().unwrap();
    let first = bodies
        .iter()
        .find(|b| b.to_string().contains("script:b:0"))
        .unwrap();
    assert_eq!(
        first["model"], "stub-judge",
        "model name from GET /v1/models"
    );
    assert_eq!(first["temperature"], 0.6);
    let user = first["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("## Assistant output\nthe reply of tool"),
        "{user}"
    );
    assert!(
        user.contains("## Next state [role: tool]\nscript:b:0"),
        "{user}"
    );
    assert!(first["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("process reward model"));
    let seeds: std::collections::HashSet<u64> = bodies
        .iter()
        .filter(|b| {
            b["messages"][1]["content"]
                .as_str()
                .is_some_and(|c| c.contains("script:b:1\n"))
        })
        .map(|b| b["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds.len(), 3, "each vote has its own seed");

    // the summary: 8 rows sent to the judge, 24 votes, 5 of them invalid
    let summary: Json = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["judged"], 8);
    assert_eq!(summary["no_reward"], 1);
    assert_eq!(summary["votes"], 24);
    assert_eq!(summary["invalid_votes"], 5);
    assert_eq!(
        summary["failed_calls"], 3,
        "two garbage replies and the timeout"
    );
    assert!(summary["retries"].as_u64().unwrap() >= 2);
    assert_eq!(summary["by_source"]["prm:stub-judge"]["+1"], 2);
    assert_eq!(summary["by_source"]["prm:stub-judge"]["-1"], 3);
    assert_eq!(summary["by_source"]["prm:stub-judge"]["0"], 3);
    assert!(summary["judge_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!((summary["invalid_rate"].as_f64().unwrap() - 5.0 / 24.0).abs() < 1e-9);
}

#[test]
fn remote_judge_respects_the_concurrency_limit() {
    let stub = start_stub(None);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    let output = dir.path().join("judged.parquet");
    let rows: Vec<RolloutRow> = (0..4)
        .map(|i| with_next(row(&format!("r{i}")), "user", "script:slow"))
        .collect();
    write_rows(&input, &rows);
    let out = judge_with_stub(
        &stub,
        &input,
        &output,
        &[
            "--concurrency",
            "2",
            "--votes",
            "2",
            "--judge-model",
            "named",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 8);
    assert_eq!(stub.max_in_flight.load(Ordering::SeqCst), 2);
    let got = read_rows(&output);
    assert!(got.iter().all(|r| r.reward == Some(1.0)
        && r.judge_votes == Some(vec![1, 1])
        && r.judge_source.as_deref() == Some("prm:named")));
}

#[test]
fn remote_judge_api_key_and_a_wrong_key() {
    let stub = start_stub(Some("sekrit"));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    let output = dir.path().join("judged.parquet");
    write_rows(&input, &[with_next(row("a"), "user", "thanks")]);

    let out = judge_with_stub(&stub, &input, &output, &["--judge-api-key", "wrong"]);
    assert_eq!(out.status.code(), Some(1));
    let log = stderr(&out);
    assert!(log.contains("401") && log.contains("models"), "{log}");
    assert!(!output.exists() && !dir.path().join("judged.parquet.tmp").exists());
    // with the model named, the chat call itself is refused: the run stops
    let out = judge_with_stub(
        &stub,
        &input,
        &output,
        &["--judge-api-key", "wrong", "--judge-model", "m"],
    );
    assert_eq!(out.status.code(), Some(1));
    let log = stderr(&out);
    assert!(
        log.contains("misconfigured") && log.contains("401") && log.contains("CLAW_JUDGE_API_KEY"),
        "{log}"
    );
    assert!(!output.exists());

    // the key may also come from the environment
    let out = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args([
            "judge",
            p(&input),
            "-o",
            p(&output),
            "--judge-url",
            &stub.base,
        ])
        .env("CLAW_JUDGE_API_KEY", "sekrit")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_rows(&output)[0].reward, Some(1.0));
}

#[test]
fn already_judged_rows_pass_through_unless_rejudge() {
    let stub = start_stub(None);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    let once = dir.path().join("once.parquet");
    let twice = dir.path().join("twice.parquet");
    write_rows(
        &input,
        &[
            with_next(row("a"), "user", "script:b:-1"),
            with_next(row("b"), "tool", "exit code: 2"),
        ],
    );
    ok(judge_with_stub(&stub, &input, &once, &[]));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3);
    let first = read_rows(&once);
    assert_eq!(by_id(&first, "a").reward, Some(-1.0));

    // again on its own output: nothing to do, the rows are kept as they are
    let out = ok(judge_with_stub(&stub, &once, &twice, &[]));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3, "no new judge calls");
    assert_eq!(read_rows(&twice), first);
    let summary: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            summary["already_judged"].as_u64(),
            summary["judged"].as_u64()
        ),
        (Some(2), Some(0))
    );

    // --rejudge asks again (the script now repeats its last answer)
    ok(judge_with_stub(
        &stub,
        &once,
        &twice,
        &["--rejudge", "--sources", "prm"],
    ));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 9);
    let again = read_rows(&twice);
    assert_eq!(
        by_id(&again, "b").judge_source.as_deref(),
        Some("prm:stub-judge")
    );
}

#[test]
fn bad_arguments_and_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("samples.parquet");
    write_rows(&input, &[with_next(row("a"), "user", "ok")]);
    let out_path = dir.path().join("o.parquet");
    let o = p(&out_path);

    let out = claw(&["judge", p(&input), "-o", o, "--sources", "feedback,vibes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = claw(&[
        "judge",
        p(&input),
        "-o",
        o,
        "--judge-url",
        "https://api.example.com/v1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("https"), "{}", stderr(&out));

    let bad_prompt = dir.path().join("prompt.txt");
    std::fs::write(&bad_prompt, "[user]\nGrade this.\n").unwrap();
    let out = claw(&["judge", p(&input), "-o", o, "--prompt", p(&bad_prompt)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("prompt.txt") && stderr(&out).contains("{response}"),
        "{}",
        stderr(&out)
    );

    let missing = dir.path().join("nope.gguf");
    let out = claw(&["judge", p(&input), "-o", o, "--judge-model", p(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope.gguf"), "{}", stderr(&out));

    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet").unwrap();
    let out = claw(&["judge", p(&junk), "-o", o, "--sources", "env"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("junk.parquet"), "{}", stderr(&out));
    assert!(!out_path.exists());
}

#[test]
fn local_judge_on_the_tiny_model_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(dir.path());
    let prompt: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/judge/short-prompt.txt");
    let input = dir.path().join("samples.parquet");
    write_rows(
        &input,
        &[
            with_next(row("a"), "user", "thanks"),
            with_next(row("b"), "tool", "ok"),
            row("c"),
        ],
    );
    let run = |out: &Path| {
        ok(claw(&[
            "judge",
            p(&input),
            "-o",
            p(out),
            "--judge-model",
            p(&model),
            "--prompt",
            p(&prompt),
            "--max-tokens",
            "12",
            "--json",
        ]))
    };
    let (one, two) = (dir.path().join("1.parquet"), dir.path().join("2.parquet"));
    let out = run(&one);
    run(&two);
    let rows = read_rows(&one);
    for id in ["a", "b"] {
        let r = by_id(&rows, id);
        assert_eq!(r.judge_source.as_deref(), Some("prm:tiny"), "{id}");
        let votes = r.judge_votes.as_ref().unwrap().len() as i32;
        assert_eq!(votes + r.judge_invalid.unwrap(), 3, "{id}: 3 votes in all");
        assert!([-1.0, 0.0, 1.0].contains(&r.reward.unwrap()));
    }
    assert_eq!(by_id(&rows, "c").reward, None);
    assert_eq!(rows, read_rows(&two), "same seed, same votes");
    let summary: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["votes"], 6);
    assert!(summary["judge_tokens"].as_u64().unwrap() > 0);
    assert!(summary["judge_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn local_judge_with_a_lora_adapter() {
    use claw::adapter::{Adapter, LoraConfig};
    use claw::model::Model;

    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_chat_model(dir.path());
    let model = Model::load(&model_path).unwrap();
    let config = LoraConfig {
        rank: 2,
        ..Default::default()
    };
    let adapter = Adapter::new(&model.decoder, config, 7).unwrap();
    let adapter_path = dir.path().join("adapter-000003.safetensors");
    std::fs::write(&adapter_path, adapter.to_safetensors().unwrap()).unwrap();
    std::fs::write(
        adapter_path.with_extension("json"),
        serde_json::to_string(&adapter.file_config("tiny", 3)).unwrap(),
    )
    .unwrap();

    let prompt = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/judge/short-prompt.txt");
    let input = dir.path().join("samples.parquet");
    let output = dir.path().join("judged.parquet");
    write_rows(&input, &[with_next(row("a"), "user", "thanks")]);
    let args = |adapter: &Path| {
        claw(&[
            "judge",
            p(&input),
            "-o",
            p(&output),
            "--judge-model",
            p(&model_path),
            "--judge-adapter",
            p(adapter),
            "--prompt",
            p(&prompt),
            "--max-tokens",
            "4",
        ])
    };
    ok(args(&adapter_path));
    let r = &read_rows(&output)[0];
    assert_eq!(r.judge_source.as_deref(), Some("prm:tiny+adapter-000003"));
    assert_eq!(
        r.judge_votes.as_ref().unwrap().len() as i32 + r.judge_invalid.unwrap(),
        3
    );

    let missing = dir.path().join("nope.safetensors");
    let out = args(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}
