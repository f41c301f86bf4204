//! Daemon mode (docs/ARCHITECTURE.md, "Shared directory") as a user runs it: the
//! stages with `--watch DIR` over one shared directory, killed with SIGKILL at random
//! moments while input flows, two workers of one stage sharing a folder, corrupt
//! inputs going to quarantine, and `claw status` reading it all back.

use crate::common::shared::{ids_in, local, s3_shared, Shared};
use crate::common::{claw, read_rows, run_ok, tiny_model, write_rows};

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw::adapter::layout::parse_adapter_step;
use claw::rollout::{segment_file_name, RolloutRow};
use rand::{Rng, SeedableRng};
use serde_json::json;

const T0: i64 = 1_767_225_600_000; // 2026-01-01, event time of the scripted traffic

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A main turn as serve records it: `t` in seconds after T0.
fn turn(session: &str, id: &str, t: i64, done: bool) -> RolloutRow {
    let response = format!("reply {id}");
    let ids: Vec<i32> = response.bytes().map(i32::from).collect();
    RolloutRow {
        sample_id: id.into(),
        session_id: session.into(),
        turn_type: "main".into(),
        session_done: Some(done),
        created_at: T0 + t * 1000,
        model: "tiny".into(),
        messages_json: json!([{"role": "user", "content": format!("question {id}")}]).to_string(),
        prompt_text: format!("question {id}"),
        response_text: response,
        prompt_ids: vec![1, 2, 3, 4],
        response_logprobs: vec![-0.5; ids.len()],
        response_ids: ids,
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

/// Thumbs up/down with a correction, on the turn `response_id`.
fn feedback(session: &str, t: i64, response_id: &str, rating: i8) -> RolloutRow {
    let text = (rating < 0).then(|| "please answer in one word".to_string());
    RolloutRow {
        sample_id: format!("fb-{response_id}"),
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
        feedback_text: text,
        ..Default::default()
    }
}

/// Raw segment `i` of the scripted traffic: session `i` starts (turn 1),
/// session i-1 has turn 2, session i-2 its last turn, so every session spans
/// three segments; every turn gets feedback right after it. Returns the segment's
/// rows and the ids of the main turns in it.
fn raw_segment(i: i64) -> (Vec<RolloutRow>, Vec<String>) {
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for (k, session) in [(1, i), (2, i - 1), (3, i - 2)] {
        if session < 0 {
            continue;
        }
        let sid = format!("s{session}");
        let id = format!("s{session}-t{k}");
        let t = i * 100 + k * 10;
        rows.push(turn(&sid, &id, t, k == 3));
        rows.push(feedback(
            &sid,
            t + 1,
            &id,
            if (session + k) % 2 == 0 { 1 } else { -1 },
        ));
        ids.push(id);
    }
    (rows, ids)
}

/// Segment `i` plus the trailing segments that finish every session up to `n`.
fn all_turn_ids(n: i64) -> Vec<String> {
    (0..n + 2)
        .flat_map(|i| raw_segment(i).1)
        .filter(|id| {
            let session: i64 = id[1..id.find('-').unwrap()].parse().unwrap();
            session < n
        })
        .collect()
}

/// Event time moves only with events: a last, late side turn (not a sample)
/// lets the final turns' feedback grace pass.
fn write_clock_segment(dir: &Shared, i: i64) {
    let mut row = turn("clock", "clock", i * 100 + 1000, true);
    row.turn_type = "side".into();
    let name = segment_file_name((T0 + i * 100_000) as u64, "feeder", i as u64);
    dir.write_rows(&format!("raw/{name}"), &[row]);
}

fn write_raw_segment(dir: &Shared, i: i64, n: i64) {
    let (rows, _) = raw_segment(i);
    // Past the last session only the finishing turns of earlier sessions remain.
    let rows: Vec<RolloutRow> = rows
        .into_iter()
        .filter(|r| r.session_id[1..].parse::<i64>().unwrap() < n)
        .collect();
    let name = segment_file_name((T0 + i * 100_000) as u64, "feeder", i as u64);
    dir.write_rows(&format!("raw/{name}"), &rows);
}

fn assert_exactly_once(stage: &str, found: &BTreeMap<String, usize>, expected: &[String]) {
    let dups: Vec<_> = found.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "{stage}: duplicated samples {dups:?}");
    let want: HashSet<&String> = expected.iter().collect();
    let got: HashSet<&String> = found.keys().collect();
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{stage}: missing {missing:?}, unexpected {extra:?}"
    );
}

/// The daemon command line of `stage` over `dir`.
fn stage_cmd(stage: &str, dir: &Shared, model: &Path, once: bool) -> Command {
    let mut cmd = claw();
    dir.env(&mut cmd);
    cmd.arg(stage)
        .args(["--watch", &dir.arg(), "--poll-interval", "100ms"])
        .env("CLAW_MODEL", model)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match stage {
        "judge" => {
            cmd.args(["--sources", "feedback,env"]);
        }
        "distill-hints" => {
            cmd.args(["--hint-source", "feedback"]);
        }
        "train" => {
            cmd.args([
                "--batch-size",
                "4",
                "--partial-after",
                "1s",
                "--keep",
                "100000",
            ]);
        }
        _ => {}
    }
    if once {
        cmd.arg("--once");
    }
    cmd
}

fn kill9(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// Each daemon is SIGKILLed at random moments (at least 50 times per stage) while
/// raw segments keep arriving; afterwards each stage drains with --once, and every
/// stage's output holds every turn exactly once, with no partial file anywhere.
#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(dir.join("raw")).unwrap();
    sigkill_exactly_once(tmp.path(), Shared::Local(dir));
}

/// The same over `s3://` on a local S3 server (moto): claims are leases,
/// markers put-if-absent, LATEST a conditional update, and waking is polling.
#[test]
fn sigkill_at_random_moments_over_s3_loses_and_duplicates_nothing() {
    let Some(s3) = crate::common::s3::server("sigkill_at_random_moments_over_s3") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    sigkill_exactly_once(tmp.path(), s3_shared(&s3, "kill9", tmp.path()));
}

fn sigkill_exactly_once(tmp: &Path, shared: Shared) {
    let model = tiny_model(tmp);
    const SESSIONS: i64 = 40;
    const KILLS: usize = 50;
    let stages = ["collect", "judge", "distill-hints", "train"];
    let started = Instant::now();

    // One thread per stage: start, wait a random while, SIGKILL, again.
    let feeder_dir = shared.clone();
    let feeder = std::thread::spawn(move || {
        for i in 0..SESSIONS + 2 {
            write_raw_segment(&feeder_dir, i, SESSIONS);
            std::thread::sleep(Duration::from_millis(150));
        }
        write_clock_segment(&feeder_dir, SESSIONS + 2);
    });
    let killers: Vec<_> = stages
        .iter()
        .enumerate()
        .map(|(k, &stage)| {
            let (dir, model) = (shared.clone(), model.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(k as u64);
                for _ in 0..KILLS {
                    let mut child = stage_cmd(stage, &dir, &model, false)
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(rng.gen_range(10..400)));
                    kill9(&mut child);
                }
            })
        })
        .collect();
    feeder.join().unwrap();
    for k in killers {
        k.join().unwrap();
    }
    eprintln!(
        "{} kills per stage in {:.1} s",
        KILLS,
        started.elapsed().as_secs_f64()
    );
    // Drain: each stage once more, uninterrupted, in pipeline order.
    for stage in stages {
        run_ok(stage_cmd(stage, &shared, &model, true).stderr(Stdio::piped()));
    }

    let expected = all_turn_ids(SESSIONS);
    assert_eq!(expected.len(), 3 * SESSIONS as usize);
    let mut status = claw();
    status.args(["status", "--dir", &shared.arg()]);
    shared.env(&mut status);
    let status = run_ok(&mut status);
    eprintln!("{}", String::from_utf8_lossy(&status.stdout));
    if let Shared::Local(dir) = &shared {
        let q = dir.join("quarantine");
        if q.exists() {
            for e in walk(&q) {
                eprintln!(
                    "{}: {}",
                    e.display(),
                    std::fs::read_to_string(&e).unwrap_or_default()
                );
            }
        }
    }
    for folder in ["samples", "judged", "distilled"] {
        assert_exactly_once(folder, &shared.ids_in(folder), &expected);
    }
    // Train: the checkpoints' ledgers name every sample trained on, once each.
    let latest = String::from_utf8(shared.read("checkpoints/LATEST").unwrap()).unwrap();
    let last_step = parse_adapter_step(latest.trim()).unwrap();
    let mut trained = BTreeMap::new();
    for step in 1..=last_step {
        let json = shared
            .read(&format!("checkpoints/adapter-{step:06}.json"))
            .unwrap_or_else(|| panic!("checkpoint {step} is missing"));
        let config: serde_json::Value = serde_json::from_slice(&json).unwrap();
        for id in config["claw_ledger"]["samples"].as_array().unwrap() {
            *trained.entry(id.as_str().unwrap().to_string()).or_insert(0) += 1;
        }
    }
    assert_exactly_once("train", &trained, &expected);
    assert!(shared
        .names("checkpoints")
        .iter()
        .all(|n| !n.ends_with(".tmp")));
    assert!(
        shared.names("quarantine/raw").is_empty(),
        "nothing should be quarantined"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.to_string_lossy().ends_with(".err") {
            out.push(p);
        }
    }
    out
}

/// A Parquet file with the wrong columns.
fn write_wrong_schema(path: &Path) {
    use arrow::array::{Int32Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![1, 2]))]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Judged-ready samples: main turns with feedback already paired in.
fn sample_rows(segment: usize, n: usize) -> Vec<RolloutRow> {
    (0..n)
        .map(|k| {
            let mut row = turn(
                &format!("s{segment}"),
                &format!("g{segment}-{k}"),
                k as i64,
                false,
            );
            row.turn = Some(k as i32 + 1);
            row.feedback = Some(if k % 2 == 0 { 1 } else { -1 });
            row
        })
        .collect()
}

#[test]
fn corrupt_segments_go_to_quarantine_with_their_reason_and_the_rest_flows() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    for i in 0..3 {
        write_rows(
            &samples.join(format!("good-{i}.parquet")),
            &sample_rows(i, 5),
        );
    }
    // Truncated: a valid file cut in half.
    write_rows(&samples.join("src.parquet"), &sample_rows(9, 5));
    let bytes = std::fs::read(samples.join("src.parquet")).unwrap();
    std::fs::remove_file(samples.join("src.parquet")).unwrap();
    std::fs::write(
        samples.join("bad-truncated.parquet"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::write(samples.join("bad-text.parquet"), "session,turn\ns1,1\n").unwrap();
    write_wrong_schema(&samples.join("bad-schema.parquet"));

    let out = run_ok(stage_cmd("judge", &local(&dir), &model, true).stderr(Stdio::piped()));
    let log = String::from_utf8_lossy(&out.stderr);

    let judged = dir.join("judged");
    let mut good: Vec<String> = (0..3)
        .flat_map(|i| (0..5).map(move |k| format!("g{i}-{k}")))
        .collect();
    good.sort();
    assert_exactly_once("judged", &ids_in(&judged), &good);
    for row in (0..3).flat_map(|i| read_rows(&judged.join(format!("good-{i}.parquet")))) {
        assert_eq!(row.reward, row.feedback.map(f32::from), "{}", row.sample_id);
    }
    let q = dir.join("quarantine").join("samples");
    for (name, reason) in [
        ("bad-truncated.parquet", "not a readable Parquet file"),
        ("bad-text.parquet", "not a readable Parquet file"),
        ("bad-schema.parquet", "column"),
    ] {
        assert!(
            q.join(name).is_file(),
            "{name} not quarantined; log:\n{log}"
        );
        assert!(!samples.join(name).exists());
        let err = std::fs::read_to_string(q.join(format!("{name}.err"))).unwrap();
        assert!(
            err.contains(reason) && err.contains("stage: judge"),
            "{name}: {err}"
        );
    }
    assert!(log.contains("quarantined bad-text.parquet"), "{log}");

    // The status report sees the same.
    let out = run_ok(claw().args(["status", "--dir", s(&dir), "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["quarantine"].as_array().unwrap().len(), 3);
    let judge = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "judge")
        .unwrap();
    assert_eq!(judge["backlog_segments"], 0);
    assert_eq!(judge["done_segments"], 3);
    // the last of the three errors, whichever the worker met last (the
    // unreadable ones wait to settle, so the order depends on timing)
    let last = judge["last_error"].as_str().unwrap();
    assert!(
        last.contains("Parquet") || last.contains("column"),
        "{last}"
    );
    let text = run_ok(claw().args(["status", "--dir", s(&dir)]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("quarantine: 3 file(s)"), "{text}");
}

#[test]
fn two_judge_workers_split_the_work_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    const SEGMENTS: usize = 120;
    let mut expected = Vec::new();
    for i in 0..SEGMENTS {
        let rows = sample_rows(i, 3);
        expected.extend(rows.iter().map(|r| r.sample_id.clone()));
        write_rows(&samples.join(format!("seg-{i:04}.parquet")), &rows);
    }
    let workers: Vec<Child> = ["a", "b"]
        .iter()
        .map(|w| {
            stage_cmd("judge", &local(&dir), &model, true)
                .args(["--worker-id", w, "--batch-segments", "1"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    assert_exactly_once("judged", &ids_in(&dir.join("judged")), &expected);
    // Each worker's status file counts what it did: both worked, and the counts
    // add up to the segments (no segment was judged twice).
    let state = dir.join("state").join("judge");
    let done: Vec<u64> = ["a", "b"]
        .iter()
        .map(|w| {
            let v: serde_json::Value = serde_json::from_slice(
                &std::fs::read(state.join(format!("status-{w}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(v["state"], "stopped");
            v["segments_done"].as_u64().unwrap()
        })
        .collect();
    eprintln!("worker a judged {} segments, worker b {}", done[0], done[1]);
    assert_eq!(done[0] + done[1], SEGMENTS as u64);
    assert!(
        done[0] > 0 && done[1] > 0,
        "one worker did everything: {done:?}"
    );
}

#[test]
fn a_standby_collect_worker_waits_for_the_lock_and_sigterm_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let mut first = stage_cmd("collect", &local(&dir), &model, false)
        .args(["--worker-id", "first"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second = stage_cmd("collect", &local(&dir), &model, false)
        .args(["--worker-id", "second", "-v"])
        .arg("-v")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    for child in [&first, &second] {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let out2 = second.wait_with_output().unwrap();
    assert!(out2.status.success());
    let log2 = String::from_utf8_lossy(&out2.stderr);
    assert!(log2.contains("waiting as a standby"), "{log2}");
    assert!(first.wait().unwrap().success());
}

/// Runs `cmd` to its end, failing the test (and killing it) past `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            kill9(&mut child);
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A file that was written long ago (so no daemon waits for it to settle).
fn age(path: &Path) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

#[test]
fn names_as_long_as_the_filesystem_allows_flow_through_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    const SESSIONS: i64 = 3;
    for i in 0..SESSIONS + 2 {
        write_raw_segment(&local(&dir), i, SESSIONS);
    }
    write_clock_segment(&local(&dir), SESSIONS + 2);
    // A segment whose batch makes samples gets a 255-byte name (in the same
    // time order), which its output in samples/ then has too.
    let short = segment_file_name((T0 + 200_000) as u64, "feeder", 2);
    let writer = "w".repeat(255 - short.len() + "feeder".len());
    let long = segment_file_name((T0 + 200_000) as u64, &writer, 2);
    assert_eq!(long.len(), 255);
    std::fs::rename(raw.join(&short), raw.join(&long)).unwrap();
    // and a damaged one beside the others
    let bad = raw.join(segment_file_name((T0 + 150_000) as u64, "feeder", 99));
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    age(&bad);

    let limit = Duration::from_secs(120);
    for stage in ["collect", "judge", "distill-hints"] {
        let mut cmd = stage_cmd(stage, &local(&dir), &model, true);
        cmd.args(["--batch-segments", "2"]);
        run_within(&mut cmd, limit);
    }
    let expected = all_turn_ids(SESSIONS);
    for folder in ["samples", "judged", "distilled"] {
        assert_exactly_once(folder, &ids_in(&dir.join(folder)), &expected);
    }
    assert!(
        dir.join("samples").join(&long).is_file(),
        "the long name's output"
    );
    // only the damaged one is in quarantine, with its reason
    let q = dir.join("quarantine").join("raw");
    let names: Vec<String> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let bad_name = bad.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&bad_name) && names.contains(&format!("{bad_name}.err")));
    let status = run_ok(claw().args(["status", "--dir", s(&dir), "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for stage in status["stages"].as_array().unwrap() {
        if stage["stage"] != "train" {
            assert_eq!(stage["backlog_segments"], 0, "{stage}");
        }
    }
}

#[test]
fn a_long_name_in_quarantine_keeps_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    let long = format!("{}.parquet", "b".repeat(247));
    std::fs::write(samples.join(&long), b"not parquet").unwrap();
    age(&samples.join(&long));
    write_rows(&samples.join("good.parquet"), &sample_rows(0, 3));
    run_within(
        &mut stage_cmd("judge", &local(&dir), &model, true),
        Duration::from_secs(60),
    );
    let q = dir.join("quarantine").join("samples");
    assert!(q.join(&long).is_file());
    let reasons: Vec<_> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "err"))
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    let text = std::fs::read_to_string(&reasons[0]).unwrap();
    assert!(
        text.contains(&long) && text.contains("stage: judge"),
        "{text}"
    );
    assert_eq!(ids_in(&dir.join("judged")).len(), 3);
}

/// Copies `bytes` into `path` slowly, as a non-atomic `cp` over a slow link:
/// empty first, then in three parts with pauses shorter than the settle time.
fn slow_copy(path: &Path, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let path = path.to_path_buf();
    let mut file = std::fs::File::create(&path).unwrap();
    std::thread::spawn(move || {
        for part in bytes.chunks(bytes.len().div_ceil(3)) {
            std::thread::sleep(Duration::from_millis(700));
            file.write_all(part).unwrap();
            file.flush().unwrap();
        }
    })
}

#[test]
fn inputs_still_being_written_are_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let (raw, samples) = (dir.join("raw"), dir.join("samples"));
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::create_dir_all(&samples).unwrap();

    // judge: a good segment, and one arriving slowly beside it
    write_rows(&samples.join("good.parquet"), &sample_rows(0, 3));
    let staged = tmp.path().join("staged.parquet");
    write_rows(&staged, &sample_rows(1, 4));
    let copy = slow_copy(
        &samples.join("slow.parquet"),
        std::fs::read(&staged).unwrap(),
    );
    run_within(
        &mut stage_cmd("judge", &local(&dir), &model, true),
        Duration::from_secs(60),
    );
    copy.join().unwrap();
    assert_eq!(ids_in(&dir.join("judged")).len(), 7);
    assert!(
        !dir.join("quarantine").join("samples").exists(),
        "quarantined"
    );

    // collect: the traffic, one segment arriving slowly
    const SESSIONS: i64 = 2;
    for i in 0..SESSIONS + 2 {
        write_raw_segment(&local(&dir), i, SESSIONS);
    }
    write_clock_segment(&local(&dir), SESSIONS + 2);
    let name = segment_file_name((T0 + 100_000) as u64, "feeder", 1);
    let bytes = std::fs::read(raw.join(&name)).unwrap();
    std::fs::remove_file(raw.join(&name)).unwrap();
    let copy = slow_copy(&raw.join(&name), bytes);
    run_within(
        &mut stage_cmd("collect", &local(&dir), &model, true),
        Duration::from_secs(60),
    );
    copy.join().unwrap();
    assert!(!dir.join("quarantine").join("raw").exists(), "quarantined");
    let expected = all_turn_ids(SESSIONS);
    let mut found = ids_in(&samples);
    found.retain(|id, _| !id.starts_with('g'));
    assert_exactly_once("samples", &found, &expected);
}

/// serve holds an event in its open segment for up to --segment-age-ms (5 s by
/// default) before it reaches raw/, and collect's clock ticks must not end a
/// session before such an event is read. Here the thumbs-down on a session's
/// last turn, 0.5 s after the reply (within --feedback-grace 2s), reaches raw/
/// 5.6 s after the reply, after collect's first clock tick.
#[test]
fn feedback_that_serve_writes_late_still_finds_its_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("data");
    let (raw, samples) = (dir.join("raw"), dir.join("samples"));
    std::fs::create_dir_all(&raw).unwrap();
    let collect = stage_cmd("collect", &local(&dir), &model, false)
        .args(["--feedback-grace", "2s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let replied = now_ms();
    let mut last_turn = turn("live", "live-t1", 0, true);
    last_turn.created_at = replied;
    let name = segment_file_name(replied as u64, "serve", 0);
    write_rows(&raw.join(name), &[last_turn]);

    std::thread::sleep(Duration::from_millis(5_600).saturating_sub(started.elapsed()));
    let mut thumbs_down = feedback("live", 0, "live-t1", -1);
    thumbs_down.created_at = replied + 500;
    let name = segment_file_name((replied + 500) as u64, "serve", 1);
    write_rows(&raw.join(name), &[thumbs_down]);

    let deadline = Instant::now() + Duration::from_secs(40);
    let sample = loop {
        let rows: Vec<RolloutRow> = std::fs::read_dir(&samples)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .flat_map(|p| read_rows(&p))
            .collect();
        if let Some(row) = rows.into_iter().find(|r| r.sample_id == "live-t1") {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "no sample for live-t1 after 40 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(collect.id() as i32, libc::SIGTERM) };
    let out = collect.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        sample.feedback,
        Some(-1),
        "the thumbs-down was lost:\n{log}"
    );
    assert!(!log.contains("older than"), "{log}");
}
