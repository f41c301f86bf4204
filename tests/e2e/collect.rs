//! `claw collect` end to end: the real binary on raw segments written to temp
//! dirs, on the import fixtures in fixtures/collect/, across cron-style runs with
//! a state file, and on what a real `claw serve` recorded.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use claw::model::testing::{write_tiny_gguf, TinySpec};
use claw::rollout::{rows_to_batch, RolloutReader, RolloutRow, RolloutWriter};
use serde_json::{json, Value as Json};

const T0: i64 = 1_764_000_000_000;

fn claw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(args)
        .env_remove("CLAW_MODEL")
        .stdin(Stdio::null())
        .output()
        .expect("run claw")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "claw failed:\n{}", stderr(&out));
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A chat row as serve records it; `t` in seconds after T0.
fn chat(session: &str, id: &str, t: i64, kind: &str, last: Json, response: &str) -> RolloutRow {
    let messages = json!([{"role": "system", "content": "be brief"}, last]);
    let ids: Vec<i32> = response.bytes().map(|b| b as i32).collect();
    RolloutRow {
        sample_id: id.into(),
        session_id: session.into(),
        turn_type: kind.into(),
        session_done: Some(false),
        created_at: T0 + t * 1000,
        model: "tiny".into(),
        policy_version: 0,
        messages_json: messages.to_string(),
        prompt_text: format!("prompt of {id}"),
        response_text: response.into(),
        prompt_ids: vec![1, 2, 3],
        response_logprobs: vec![-0.5; ids.len()],
        response_ids: ids,
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

fn main_turn(session: &str, id: &str, t: i64, user: &str) -> RolloutRow {
    chat(
        session,
        id,
        t,
        "main",
        json!({"role": "user", "content": user}),
        &format!("reply {id}"),
    )
}

fn done(mut row: RolloutRow) -> RolloutRow {
    row.session_done = Some(true);
    row
}

/// A feedback event as serve records it (see `feedback_row` in src/serve/routes.rs).
fn feedback(
    session: &str,
    t: i64,
    response_id: &str,
    rating: i8,
    text: Option<&str>,
) -> RolloutRow {
    RolloutRow {
        sample_id: format!("fb-{t}"),
        session_id: session.into(),
        turn_type: "feedback".into(),
        created_at: T0 + t * 1000,
        model: "tiny".into(),
        messages_json:
            json!({"response_id": response_id, "turn": null, "rating": rating, "text": text})
                .to_string(),
        token_source: "none".into(),
        finish_reason: "feedback".into(),
        feedback: Some(rating),
        feedback_text: text.map(Into::into),
        ..Default::default()
    }
}

fn write(path: &Path, rows: &[RolloutRow]) {
    let mut w = RolloutWriter::file(path).unwrap();
    w.write_rows(rows).unwrap();
    w.finish().unwrap();
}

fn read(path: &Path) -> Vec<RolloutRow> {
    RolloutReader::new(&[s(path).to_string()])
        .unwrap()
        .read_all_rows()
        .unwrap()
}

fn read_batches(path: &Path) -> Vec<RecordBatch> {
    RolloutReader::new(&[s(path).to_string()])
        .unwrap()
        .map(|b| b.unwrap().into_batch())
        .collect()
}

fn keys(rows: &[RolloutRow]) -> Vec<(String, i32)> {
    rows.iter()
        .map(|r| (r.session_id.clone(), r.turn.unwrap()))
        .collect()
}

fn next(r: &RolloutRow) -> Option<(&str, &str)> {
    r.next_state_role
        .as_deref()
        .zip(r.next_state_text.as_deref())
}

#[test]
fn raw_events_become_numbered_samples_with_next_state_and_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("raw.parquet");
    let tool = json!({"role": "tool", "tool_call_id": "c1", "content": "exit 0"});
    let mut no_response = main_turn("bob", "b1", 5, "hi");
    no_response.response_ids.clear();
    no_response.response_logprobs.clear();
    let mut weird = main_turn("bob", "w1", 7, "?");
    weird.turn_type = "summary".into();
    write(
        &seg,
        &[
            main_turn("alice", "a1", 0, "What's 2+2?"),
            chat(
                "alice",
                "t1",
                1,
                "side",
                json!({"role": "user", "content": "title?"}),
                "Math",
            ),
            feedback("alice", 2, "a1", -1, Some("explain please")),
            no_response,
            main_turn("bob", "b2", 6, "hello?"),
            weird,
            main_turn("alice", "a2", 10, "Explain, please."),
            done(chat("alice", "a3", 20, "main", tool, "done")),
        ],
    );
    let out = dir.path().join("samples.parquet");
    let run = ok(claw(&["collect", s(&seg), "-o", s(&out), "--json"]));
    let rows = read(&out);
    assert_eq!(
        keys(&rows),
        [
            ("alice".to_string(), 1),
            ("alice".to_string(), 2),
            ("alice".to_string(), 3),
            ("bob".to_string(), 1)
        ]
    );
    let ids: Vec<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3", "b2"]);
    assert_eq!(next(&rows[0]), Some(("user", "Explain, please.")));
    assert_eq!(rows[0].feedback, Some(-1));
    assert_eq!(rows[0].feedback_text.as_deref(), Some("explain please"));
    assert_eq!(next(&rows[1]), Some(("tool", "exit 0")));
    assert_eq!(next(&rows[2]), None, "the session's last turn");
    assert_eq!(
        rows[2].session_done,
        Some(true),
        "serve's columns pass through"
    );
    assert_eq!(next(&rows[3]), None);
    assert_eq!(rows[3].response_text, "reply b2");
    assert_eq!(rows[3].response_logprobs.len(), rows[3].response_ids.len());
    assert!(rows
        .iter()
        .all(|r| r.turn_type == "main" && r.token_source == "engine"));

    let stats: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(stats["turns"], 4);
    assert_eq!(stats["sessions"], 2);
    assert_eq!(stats["with_next_state"], 2);
    assert_eq!(stats["next_state_roles"], json!({"tool": 1, "user": 1}));
    assert_eq!(stats["with_feedback"], 1);
    assert_eq!(stats["raw_rows"], 8);
    assert_eq!(stats["dropped"]["side_turn"], 1);
    assert_eq!(stats["dropped"]["no_response"], 1);
    assert_eq!(stats["dropped"]["unknown_turn_type"], 1);
    assert_eq!(stats["dropped"]["feedback_unmatched"], 0);
    let err = stderr(&run);
    assert!(
        err.contains("4 turns in 2 sessions") && err.contains("1 side turns"),
        "{err}"
    );

    // stdout works too, for pipelines (a stream of Parquet segments on a pipe).
    let piped = ok(claw(&["collect", s(&seg)]));
    assert_eq!(segment_rows(&piped.stdout), 4);
}

/// Rows in a stream of Parquet segments (what a claw stage writes to a pipe).
fn segment_rows(bytes: &[u8]) -> u64 {
    let mut split = claw::rollout::stream::SegmentSplitter::new(bytes, "<stdout>");
    let mut rows = 0;
    while let Some(segment) = split.next_segment().unwrap() {
        rows += claw::rollout::RolloutFile::from_bytes(segment, "<stdout>")
            .unwrap()
            .num_rows();
    }
    rows
}

#[test]
fn stdin_may_carry_several_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
    write(&a, &[main_turn("s", "r1", 0, "q1")]);
    write(&b, &[main_turn("s", "r2", 1, "q2")]);
    let mut stream = std::fs::read(&a).unwrap();
    stream.extend(std::fs::read(&b).unwrap());
    let out = dir.path().join("out.parquet");
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["collect", "-", "-o", s(&out)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &stream).unwrap();
    let done = ok(child.wait_with_output().unwrap());
    let rows = read(&out);
    assert_eq!(
        keys(&rows),
        [("s".into(), 1), ("s".into(), 2)],
        "{}",
        stderr(&done)
    );
    assert_eq!(next(&rows[0]), Some(("user", "q2")));
}

#[test]
fn unknown_columns_pass_through_and_missing_ones_are_null() {
    let dir = tempfile::tempdir().unwrap();
    let with_extra = dir.path().join("a.parquet");
    let rows = [
        main_turn("s", "r1", 0, "one"),
        main_turn("s", "r2", 1, "two"),
    ];
    let base = rows_to_batch(&rows).unwrap();
    let mut fields: Vec<Field> = base
        .schema()
        .fields()
        .iter()
        .map(|f| Field::clone(f))
        .collect();
    fields.push(Field::new("client", DataType::Utf8, true));
    let mut cols: Vec<ArrayRef> = base.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec!["web", "cli"])));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let mut w = RolloutWriter::file(&with_extra).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    let without = dir.path().join("b.parquet");
    write(&without, &[main_turn("t", "r3", 2, "three")]);

    let out = dir.path().join("out.parquet");
    ok(claw(&[
        "collect",
        s(&with_extra),
        s(&without),
        "-o",
        s(&out),
    ]));
    let batches = read_batches(&out);
    let client: Vec<Option<String>> = batches
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("client")
                .expect("the extra column is kept");
            let a = a.as_string::<i32>();
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(client, [Some("web".into()), Some("cli".into()), None]);
}

/// Three segments from cron's point of view: sessions cross segment boundaries,
/// feedback arrives in a later segment, one session ends by X-Session-Done and
/// others by the timeout.
fn three_segments(dir: &Path) -> [PathBuf; 3] {
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let paths = [
        raw.join("0001-seg.parquet"),
        raw.join("0002-seg.parquet"),
        raw.join("0003-seg.parquet"),
    ];
    write(
        &paths[0],
        &[
            main_turn("s1", "s1a", 0, "q1"),
            main_turn("s2", "s2a", 10, "p1"),
            main_turn("s1", "s1b", 20, "q2"),
        ],
    );
    write(
        &paths[1],
        &[
            chat(
                "s1",
                "side",
                30,
                "side",
                json!({"role": "user", "content": "t"}),
                "T",
            ),
            feedback("s1", 40, "s1b", 1, Some("good")),
            main_turn("s3", "s3a", 50, "r1"),
        ],
    );
    write(
        &paths[2],
        &[
            main_turn("s1", "s1c", 60, "q3"),
            done(chat(
                "s3",
                "s3b",
                70,
                "main",
                json!({"role": "tool", "content": "ok"}),
                "fine",
            )),
            main_turn("s4", "s4a", 3000, "x1"),
            main_turn("s4", "s4b", 3010, "x2"),
        ],
    );
    paths
}

#[test]
fn cron_runs_with_a_state_file_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let segs = three_segments(dir.path());
    // The state's directory is created on the first run.
    let state = dir.path().join("state").join("collect.json");
    let grace = ["--feedback-grace", "5s"];

    // One run over everything.
    let all = dir.path().join("all.parquet");
    let mut args = vec![
        "collect",
        s(&segs[0]),
        s(&segs[1]),
        s(&segs[2]),
        "--flush",
        "-o",
        s(&all),
    ];
    args.extend(grace);
    ok(claw(&args));
    let all_rows = read(&all);

    // Cron: run 1 sees two segments and carries the open sessions.
    let out1 = dir.path().join("out1.parquet");
    let mut args = vec![
        "collect",
        s(&segs[0]),
        s(&segs[1]),
        "--state",
        s(&state),
        "-o",
        s(&out1),
    ];
    args.extend(grace);
    let run1 = ok(claw(&args));
    let state1: Json = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(state1["sessions"].as_array().unwrap().len(), 3, "{state1}");
    let pending1 = state
        .parent()
        .unwrap()
        .join(state1["pending_rows"].as_str().unwrap());
    assert!(pending1.exists());
    assert!(
        stderr(&run1).contains("carried to the next run"),
        "{}",
        stderr(&run1)
    );

    // Run 2 is given the whole directory: the first two segments are skipped.
    let out2 = dir.path().join("out2.parquet");
    let raw_dir = dir.path().join("raw");
    let mut args = vec![
        "collect",
        s(&raw_dir),
        "--state",
        s(&state),
        "--flush",
        "-o",
        s(&out2),
    ];
    args.extend(grace);
    let run2 = ok(claw(&args));
    assert!(
        stderr(&run2).contains("already collected"),
        "{}",
        stderr(&run2)
    );
    let state2: Json = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(state2["sessions"], json!([]));
    assert_eq!(state2["consumed"].as_array().unwrap().len(), 3);
    assert!(!pending1.exists(), "the old pending rows are removed");

    let rows1 = read(&out1);
    let rows2 = read(&out2);
    assert!(!rows1.is_empty() && !rows2.is_empty());
    let mut union: Vec<RolloutRow> = rows1.into_iter().chain(rows2).collect();
    union.sort_by(|a, b| (&a.session_id, a.turn).cmp(&(&b.session_id, b.turn)));
    assert_eq!(union, all_rows, "two runs give exactly the samples of one");
    let ids: HashSet<&str> = union.iter().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(ids.len(), union.len(), "no duplicates");

    let s1b = all_rows.iter().find(|r| r.sample_id == "s1b").unwrap();
    assert_eq!(s1b.turn, Some(2));
    assert_eq!(next(s1b), Some(("user", "q3")), "next state from segment 3");
    assert_eq!(s1b.feedback, Some(1));
    let s3a = all_rows.iter().find(|r| r.sample_id == "s3a").unwrap();
    assert_eq!(next(s3a), Some(("tool", "ok")));
    assert_eq!(keys(&all_rows).len(), 8);

    // A third run with nothing new writes nothing and changes nothing.
    let out3 = dir.path().join("out3.parquet");
    let run3 = ok(claw(&[
        "collect",
        s(&raw_dir),
        "--state",
        s(&state),
        "-o",
        s(&out3),
    ]));
    assert_eq!(read(&out3).len(), 0, "{}", stderr(&run3));
}

#[test]
fn the_session_timeout_is_measured_in_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("raw.parquet");
    // 40 minutes between two requests of one session (event time; the files are
    // written now, which does not matter).
    write(
        &seg,
        &[
            main_turn("s", "r1", 0, "q1"),
            main_turn("s", "r2", 2400, "q2"),
        ],
    );
    let out = dir.path().join("out.parquet");
    ok(claw(&["collect", s(&seg), "-o", s(&out)]));
    let rows = read(&out);
    assert_eq!(
        rows.iter()
            .map(|r| (r.turn, next(r).is_some()))
            .collect::<Vec<_>>(),
        [(Some(1), false), (Some(1), false)],
        "after the 30 min default the session had ended; the next request starts over"
    );
    ok(claw(&[
        "collect",
        s(&seg),
        "-o",
        s(&out),
        "--session-timeout",
        "1h",
    ]));
    let rows = read(&out);
    assert_eq!(rows[0].turn, Some(1));
    assert_eq!(next(&rows[0]), Some(("user", "q2")));
    assert_eq!(rows[1].turn, Some(2));

    let bad = claw(&[
        "collect",
        s(&seg),
        "-o",
        s(&out),
        "--session-timeout",
        "soon",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("--session-timeout"),
        "{}",
        stderr(&bad)
    );
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/collect/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    path
}

#[test]
fn openai_chat_logs_are_retokenized_with_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.parquet");
    let input = fixture("openai_chats.jsonl");
    let run = ok(claw(&[
        "collect",
        &input,
        "--model",
        s(&model),
        "-o",
        s(&out),
        "--json",
    ]));
    let err = stderr(&run);
    // The broken lines are named, and the rest still converts.
    assert!(err.contains("openai_chats.jsonl:4: not JSON"), "{err}");
    assert!(
        err.contains("openai_chats.jsonl:5: message 1: `rating`"),
        "{err}"
    );
    let stats: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(stats["dropped"]["malformed_line"], 2);
    assert_eq!(stats["imported_lines"], 5);

    let rows = read(&out);
    assert_eq!(
        keys(&rows),
        [
            ("42".to_string(), 1),
            ("conv-1".to_string(), 1),
            ("conv-1".to_string(), 2),
            ("openai_chats.jsonl:2".to_string(), 1),
            ("openai_chats.jsonl:2".to_string(), 2),
        ]
    );
    for r in &rows {
        assert_eq!(r.token_source, "retokenized");
        assert_eq!(r.turn_type, "main");
        assert!(!r.prompt_ids.is_empty());
        assert_eq!(r.response_ids.last(), Some(&2), "ends with <|im_end|>");
        assert!(
            r.prompt_text.ends_with("<|im_start|>assistant\n"),
            "{}",
            r.prompt_text
        );
        assert!(
            r.response_logprobs.is_empty(),
            "no sampling policy for imported text"
        );
    }
    // The tokenizer really produced the ids of the rendered prompt.
    let (french, c1a, c1b, tools_a, tools_b) = (&rows[0], &rows[1], &rows[2], &rows[3], &rows[4]);
    assert_eq!(
        french.prompt_text,
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(french.response_text, "Bonjour !");
    assert_eq!(next(french), Some(("user", "Merci, au revoir.")));
    assert_eq!(french.created_at, 1_700_000_100_000);
    assert_eq!(c1a.model, "gpt-4o-mini");
    assert_eq!(c1a.created_at, 1_700_000_000_000);
    assert_eq!(c1a.response_text, "The capital of France is **Paris**.");
    assert_eq!(next(c1a), Some(("user", "Please don't use bold.")));
    assert_eq!(c1a.feedback, Some(1));
    assert_eq!(c1b.feedback, Some(-1));
    assert_eq!(c1b.feedback_text.as_deref(), Some("still too formal"));
    assert_eq!(next(c1b), Some(("feedback", "still too formal")));
    let msgs: Json = serde_json::from_str(&c1b.messages_json).unwrap();
    assert_eq!(
        msgs.as_array().unwrap().len(),
        4,
        "the prompt: messages before the reply"
    );
    assert_eq!(tools_a.finish_reason, "tool_calls");
    assert!(tools_a
        .tool_calls_json
        .as_deref()
        .unwrap()
        .contains("call_1"));
    assert_eq!(next(tools_a), Some(("tool", "a.txt b.txt")));
    assert_eq!(tools_b.feedback, Some(-1), "\"thumbs_down\"");
    assert_eq!(
        tools_b.model, "tiny",
        "the --model's name when the log names none"
    );

    // --strict: the first malformed line fails the run, naming file and line.
    let strict = claw(&[
        "collect",
        &input,
        "--model",
        s(&model),
        "-o",
        s(&out),
        "--strict",
    ]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(
        stderr(&strict).contains("openai_chats.jsonl:4"),
        "{}",
        stderr(&strict)
    );

    // Without a model there is nothing to tokenise with: a clear error.
    let no_model = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args([
            "collect",
            &input,
            "-o",
            s(&out),
            "--model",
            "/nonexistent/m.gguf",
        ])
        .output()
        .unwrap();
    assert_eq!(no_model.status.code(), Some(1));
    assert!(
        stderr(&no_model).contains("tokenizer"),
        "{}",
        stderr(&no_model)
    );
}

#[test]
fn openclaw_rl_records_are_imported() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.parquet");
    let input = fixture("openclaw_record.jsonl");
    let run = ok(claw(&[
        "collect",
        &input,
        "--model",
        s(&model),
        "-o",
        s(&out),
    ]));
    assert!(
        stderr(&run).contains("openclaw_record.jsonl:3: `turn` must be a positive integer"),
        "{}",
        stderr(&run)
    );
    let rows = read(&out);
    assert_eq!(
        keys(&rows),
        [
            ("oc-1".to_string(), 1),
            ("oc-1".to_string(), 2),
            ("oc-2".to_string(), 1)
        ]
    );
    assert_eq!(
        rows[0].response_text, "Hi! How can I help?",
        "template tail cut"
    );
    assert_eq!(rows[0].sample_id, "oc-1:1");
    assert_eq!(next(&rows[0]), Some(("user", "tell me a joke")));
    assert_eq!(
        rows[0].created_at, 1_767_607_200_000,
        "2026-01-05 10:00:00 UTC"
    );
    assert_eq!(rows[1].next_state_role, None);
    assert_eq!(next(&rows[2]), Some(("tool", "error: 2 tests failed")));
    assert_eq!(rows[2].finish_reason, "tool_calls");
    assert!(rows.iter().all(|r| r.token_source == "retokenized"));
    // --format openclaw on a Parquet file is refused with a reason.
    let seg = dir.path().join("raw.parquet");
    write(&seg, &[main_turn("s", "r1", 0, "q")]);
    let wrong = claw(&[
        "collect",
        s(&seg),
        "--format",
        "openclaw",
        "--strict",
        "-o",
        s(&out),
    ]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("reads JSON lines"),
        "{}",
        stderr(&wrong)
    );
}

#[test]
fn an_unreadable_input_is_reported_and_skipped_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("raw.parquet");
    write(&seg, &[main_turn("s", "r1", 0, "q")]);
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "just some notes\n").unwrap();
    let out = dir.path().join("out.parquet");
    let run = ok(claw(&[
        "collect",
        s(&notes),
        s(&seg),
        "-o",
        s(&out),
        "--json",
    ]));
    assert!(stderr(&run).contains("notes.txt"), "{}", stderr(&run));
    let stats: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(stats["inputs_unreadable"], 1);
    assert_eq!(read(&out).len(), 1);

    let strict = claw(&["collect", s(&notes), s(&seg), "-o", s(&out), "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(stderr(&strict).contains("notes.txt"), "{}", stderr(&strict));

    let json_to_stdout = claw(&["collect", s(&seg), "--json"]);
    assert_eq!(json_to_stdout.status.code(), Some(1));
    assert!(stderr(&json_to_stdout).contains("-o FILE"));
}

/// `claw serve` on the tiny model records a short session; collect pairs it.
#[test]
fn what_serve_records_is_collected() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw"))
        .args(["serve", "--model", s(&model), "--dir", s(&data)])
        .args(["--host", "127.0.0.1", "--port", "0", "-v"])
        .env_remove("CLAW_API_KEY")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("serve exited early").unwrap();
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on ".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let post = |path: &str, headers: &[(&str, &str)], body: Json| -> Json {
        let mut req = ureq::post(&format!("{base}{path}")).timeout(Duration::from_secs(120));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        req.send_json(body).unwrap().into_json().unwrap()
    };
    let ask = |text: &str, kind: &str, done: &str| -> String {
        let reply = post(
            "/v1/chat/completions",
            &[
                ("X-Session-Id", "e2e"),
                ("X-Turn-Type", kind),
                ("X-Session-Done", done),
            ],
            json!({"messages": [{"role": "user", "content": text}], "max_tokens": 4}),
        );
        reply["id"].as_str().unwrap().to_string()
    };
    let first = ask("hi", "main", "0");
    post(
        "/v1/feedback",
        &[],
        json!({"session_id": "e2e", "rating": -1, "text": "too short"}),
    );
    ask("summarise", "side", "0");
    let second = ask("tell me more", "main", "0");
    let third = ask("thanks, bye", "main", "1");
    // SIGTERM: serve closes its open segment.
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(child.wait().unwrap().success());

    let out = dir.path().join("samples.parquet");
    let raw = data.join("raw");
    ok(claw(&["collect", s(&raw), "-o", s(&out)]));
    let rows = read(&out);
    assert_eq!(
        keys(&rows),
        [("e2e".into(), 1), ("e2e".into(), 2), ("e2e".into(), 3)]
    );
    assert_eq!(
        rows.iter()
            .map(|r| r.sample_id.as_str())
            .collect::<Vec<_>>(),
        [first.as_str(), second.as_str(), third.as_str()]
    );
    assert_eq!(next(&rows[0]), Some(("user", "tell me more")));
    assert_eq!(rows[0].feedback, Some(-1));
    assert_eq!(rows[0].feedback_text.as_deref(), Some("too short"));
    assert_eq!(next(&rows[1]), Some(("user", "thanks, bye")));
    assert_eq!(next(&rows[2]), None);
    assert_eq!(
        rows[2].session_done,
        Some(true),
        "serve records X-Session-Done"
    );
    assert_eq!(rows[1].session_done, Some(false));
    assert!(rows.iter().all(|r| !r.response_ids.is_empty()
        && r.response_logprobs.len() == r.response_ids.len()
        && r.token_source == "engine"));
}

#[test]
fn outputs_to_devices_and_fifos_are_written_in_place() {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("raw.parquet");
    write(
        &seg,
        &[
            main_turn("alice", "a1", 0, "hi"),
            main_turn("alice", "a2", 5, "more"),
        ],
    );
    let is_char_device = |p: &str| std::fs::metadata(p).unwrap().file_type().is_char_device();
    // a full device: the write error is the run's failure, and the device stays
    let out = claw(&["collect", s(&seg), "-o", "/dev/full"]);
    assert!(!out.status.success(), "claw collect -o /dev/full succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("/dev/full") && err.contains("No space"),
        "{err}"
    );
    assert!(is_char_device("/dev/full"), "/dev/full was replaced");
    assert!(!Path::new("/dev/full.tmp").exists());
    ok(claw(&["collect", s(&seg), "-o", "/dev/null"]));
    assert!(is_char_device("/dev/null"), "/dev/null was replaced");

    // a FIFO: the reader at the other end gets the rollout
    let fifo = dir.path().join("samples.fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: plain system call on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            bytes
        })
    };
    ok(claw(&["collect", s(&seg), "-o", s(&fifo)]));
    let bytes = reader.join().unwrap();
    let file = claw::rollout::RolloutFile::from_bytes(bytes.into(), "fifo").unwrap();
    assert_eq!(file.num_rows(), 2);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(!dir.path().join("samples.fifo.tmp").exists());

    // a regular file: replaced atomically, as before
    let regular = dir.path().join("samples.parquet");
    std::fs::write(&regular, b"old").unwrap();
    ok(claw(&["collect", s(&seg), "-o", s(&regular)]));
    assert_eq!(read(&regular).len(), 2);
    assert!(!dir.path().join("samples.parquet.tmp").exists());
    // a directory is refused with its name
    let out = claw(&["collect", s(&seg), "-o", s(dir.path())]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));
}

/// One OpenAI chat-format line: a question, an answer, and extra fields.
fn chat_line(id: &str, extra_message: Json, extra: Json) -> String {
    let mut line = json!({
        "id": id,
        "messages": [
            {"role": "user", "content": format!("question {id}")},
            {"role": "assistant", "content": format!("answer {id}")},
            extra_message,
        ],
    });
    for (k, v) in extra.as_object().unwrap() {
        line[k] = v.clone();
    }
    line.to_string()
}

#[test]
fn imports_refuse_what_serve_refuses_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let log = dir.path().join("chats.jsonl");
    let user = json!({"role": "user", "content": "thanks"});
    let lines = [
        chat_line("good", user.clone(), json!({})),
        chat_line(
            "hacker",
            json!({"role": "hacker", "content": "rm -rf"}),
            json!({}),
        ),
        chat_line("five", json!({"role": "user", "content": 5}), json!({})),
        json!({"id": "seven", "messages": [
            {"role": "user", "content": "rate this"},
            {"role": "assistant", "content": "ok", "rating": 7},
        ]})
        .to_string(),
    ];
    std::fs::write(&log, lines.join("\n")).unwrap();
    let out = dir.path().join("out.parquet");
    let args = [
        "collect",
        s(&log),
        "--model",
        s(&model),
        "-o",
        s(&out),
        "--json",
    ];
    let run = ok(claw(&args));
    let err = stderr(&run);
    for needle in [
        "chats.jsonl:2: `messages[2].role` \"hacker\" is not one of",
        "chats.jsonl:3: `messages[2].content` must be a string or an array of text parts, got a number",
        "chats.jsonl:4: message 1: `rating`: 7 is not a rating",
    ] {
        assert!(err.contains(needle), "no {needle:?} in:\n{err}");
    }
    let stats: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(stats["dropped"]["malformed_line"], 3);
    let rows = read(&out);
    let sessions: Vec<&str> = rows.iter().map(|r| r.session_id.as_str()).collect();
    assert_eq!(sessions, ["good"], "only the good line is stored");
    assert!(rows.iter().all(|r| r.feedback.is_none()));
    // --strict: the first of them fails the run
    let strict = claw(&[&args[..], &["--strict"]].concat());
    assert_eq!(strict.status.code(), Some(1));
    assert!(
        stderr(&strict).contains("chats.jsonl:2:"),
        "{}",
        stderr(&strict)
    );
}

#[test]
fn a_long_or_undecodable_first_line_is_not_a_silent_skip() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.parquet");
    let user = json!({"role": "user", "content": "thanks"});
    let collect = |input: &Path| {
        claw(&[
            "collect",
            s(input),
            "--model",
            s(&model),
            "-o",
            s(&out),
            "--json",
        ])
    };

    // a first conversation over 1 MiB (a long attachment kept beside it) is imported
    let long = dir.path().join("long.jsonl");
    let big = chat_line(
        "big",
        user.clone(),
        json!({"metadata": "x".repeat(3 << 20)}),
    );
    assert!(big.len() > 3 << 20);
    std::fs::write(
        &long,
        [big, chat_line("small", user.clone(), json!({}))].join("\n"),
    )
    .unwrap();
    let run = ok(collect(&long));
    let stats: Json = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(stats["inputs_unreadable"], 0, "{}", stderr(&run));
    let mut sessions: Vec<String> = read(&out).into_iter().map(|r| r.session_id).collect();
    sessions.sort();
    assert_eq!(sessions, ["big", "small"]);

    // invalid UTF-8 on the first line: a clear error, exit 1
    let latin1 = dir.path().join("latin1.jsonl");
    let mut bytes = chat_line("cafe", user.clone(), json!({})).into_bytes();
    let at = bytes.windows(6).position(|w| w == b"answer").unwrap();
    bytes[at] = 0xe9;
    bytes.push(b'\n');
    bytes.extend(chat_line("ok", user.clone(), json!({})).into_bytes());
    std::fs::write(&latin1, &bytes).unwrap();
    let run = collect(&latin1);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("latin1.jsonl: line 1 is not valid UTF-8"),
        "{err}"
    );

    // on a later line: that line is named and skipped, not stored with U+FFFD
    let later = dir.path().join("later.jsonl");
    let mut bytes = chat_line("ok", user.clone(), json!({})).into_bytes();
    bytes.push(b'\n');
    let mut bad = chat_line("bad", user, json!({})).into_bytes();
    let at = bad.windows(6).position(|w| w == b"answer").unwrap();
    bad[at] = 0xff;
    bytes.extend(bad);
    std::fs::write(&later, &bytes).unwrap();
    let run = ok(collect(&later));
    assert!(
        stderr(&run).contains("later.jsonl:2: not valid UTF-8"),
        "{}",
        stderr(&run)
    );
    let rows = read(&out);
    assert_eq!(rows.len(), 1);
    assert!(rows.iter().all(|r| !r.response_text.contains('\u{fffd}')));
}
