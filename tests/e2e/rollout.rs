//! The rollout format end to end: files written by the library, read by the
//! `claw` binary (`claw inspect`), by the library again (pass-through of extra
//! columns) and by pyarrow, plus the errors a user sees for bad inputs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float64Array, ListArray, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Schema};
use claw::rollout::{schema, RolloutReader, RolloutRow, RolloutWriter, SCHEMA_TAG};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

fn claw() -> Command {
    Command::new(env!("CARGO_BIN_EXE_claw"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("the claw binary runs")
}

fn row(i: usize) -> RolloutRow {
    RolloutRow {
        sample_id: format!("sample-{i}"),
        session_id: format!("session-{}", i / 2),
        turn: Some((i % 2) as i32 + 1),
        turn_type: "main".into(),
        created_at: 1_700_000_000_000 + 1000 * i as i64,
        model: "SmolLM2-135M-Instruct".into(),
        policy_version: 0,
        messages_json: r#"[{"role":"user","content":"Wie spät ist es? ⏰"}]"#.into(),
        prompt_text: "<|im_start|>user\nWie spät ist es? ⏰<|im_end|>\n<|im_start|>assistant\n"
            .repeat(5),
        response_text: format!("Es ist {i} Uhr."),
        prompt_ids: (0..200).map(|t| t + i as i32).collect(),
        response_ids: vec![10 + i as i32, 11, 12],
        response_logprobs: vec![-0.25, -1.5, -0.125],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        reward: i.is_multiple_of(3).then_some(1.0),
        ..Default::default()
    }
}

fn write_rows(path: &Path, rows: &[RolloutRow]) {
    let mut w = RolloutWriter::file(path).unwrap();
    w.write_rows(rows).unwrap();
    w.finish().unwrap();
}

/// Writes a Parquet file with plain arrow/parquet, the way another tool would.
fn write_plain(path: &Path, batch: &RecordBatch) {
    let file = File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn inspect_json_reports_rows_columns_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.parquet");
    let rows: Vec<RolloutRow> = (0..5).map(row).collect();
    write_rows(&f, &rows);

    let out = run(claw().args(["inspect", &path_str(&f), "--json", "--rows", "2"]));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let file = &doc["files"][0];
    assert_eq!(file["path"], path_str(&f));
    assert_eq!(file["rows"], 5);
    assert_eq!(file["schema_tag"], SCHEMA_TAG);
    let columns = file["columns"].as_array().unwrap();
    assert_eq!(columns.len(), schema().fields().len());
    assert_eq!(columns[0]["name"], "sample_id");
    assert_eq!(columns[0]["type"], "utf8");
    assert_eq!(columns[0]["nullable"], false);
    assert!(columns.iter().all(|c| c["known"] == true));
    let prompt_ids = columns.iter().find(|c| c["name"] == "prompt_ids").unwrap();
    assert_eq!(prompt_ids["type"], "list<int32>");
    let head = file["head"].as_array().unwrap();
    assert_eq!(head.len(), 2);
    assert_eq!(head[1]["sample_id"], "sample-1");
    assert_eq!(head[0]["response_ids"], serde_json::json!([10, 11, 12]));
    assert_eq!(head[0]["reward"], 1.0);
    assert_eq!(head[1]["reward"], Value::Null);
    assert_eq!(head[0]["created_at"], "2023-11-14T22:13:20.000Z");

    // The readable report says the same things and shortens long values.
    let out = run(claw().args(["inspect", &path_str(&f)]));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("rows: 5"), "{text}");
    assert!(text.contains("claw.schema: claw.rollout.v1"), "{text}");
    assert!(text.contains("(200 items)"), "{text}");
    assert!(text.contains("chars)"), "{text}");
    assert!(text.contains("first 3 of 5 rows"), "{text}");
}

#[test]
fn inspect_reads_stdin_and_globs() {
    let dir = tempfile::tempdir().unwrap();
    write_rows(&dir.path().join("a.parquet"), &[row(0), row(1)]);
    write_rows(&dir.path().join("b.parquet"), &[row(2)]);

    let glob = path_str(&dir.path().join("*.parquet"));
    let out = run(claw().args(["inspect", &glob, "--json", "--rows", "0"]));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<u64> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rows"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, [2, 1]);

    let out = claw()
        .args(["inspect", "-", "--json"])
        .stdin(File::open(dir.path().join("a.parquet")).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["files"][0]["path"], "<stdin>");
    assert_eq!(doc["files"][0]["rows"], 2);
}

fn assert_fails_naming(args: &[&str], needles: &[&str]) {
    let out = run(claw().args(args));
    assert_eq!(
        out.status.code(),
        Some(1),
        "claw {args:?} should fail with exit code 1; stderr: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    for needle in needles {
        assert!(
            err.contains(needle),
            "stderr should mention {needle:?}: {err}"
        );
    }
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    write_rows(&good, &[row(0), row(1), row(2)]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails_naming(&["inspect", &path_str(&cut)], &[&path_str(&cut)]);
}

#[test]
fn not_parquet_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rollouts.parquet");
    std::fs::write(&csv, "sample_id,session_id\ns1,a\ns2,b\n").unwrap();
    assert_fails_naming(&["inspect", &path_str(&csv)], &[&path_str(&csv)]);
    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, "").unwrap();
    assert_fails_naming(
        &["inspect", &path_str(&empty), "--json"],
        &[&path_str(&empty)],
    );
}

#[test]
fn missing_required_column_is_an_error_naming_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let full = claw::rollout::rows_to_batch(&[row(0)]).unwrap();
    let keep: Vec<usize> = (0..full.num_columns())
        .filter(|&i| full.schema().field(i).name() != "response_logprobs")
        .collect();
    let batch = full.project(&keep).unwrap();
    let f = dir.path().join("no_logprobs.parquet");
    write_plain(&f, &batch);
    assert_fails_naming(
        &["inspect", &path_str(&f)],
        &[&path_str(&f), "response_logprobs"],
    );

    // A wrong type is reported with both types.
    let mut fields: Vec<Field> = full
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols = full.columns().to_vec();
    let i = full.schema().index_of("policy_version").unwrap();
    fields[i] = Field::new("policy_version", DataType::Utf8, false);
    cols[i] = Arc::new(StringArray::from(vec!["v0"]));
    let wrong = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let g = dir.path().join("wrong_type.parquet");
    write_plain(&g, &wrong);
    assert_fails_naming(
        &["inspect", &path_str(&g)],
        &[&path_str(&g), "policy_version", "int64", "utf8"],
    );

    // With several inputs the good one is still reported, and the run still fails.
    let good = dir.path().join("good.parquet");
    write_rows(&good, &[row(0)]);
    let out = run(claw().args(["inspect", &path_str(&good), &path_str(&f), &path_str(&g)]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("good.parquet"));
    let err = stderr(&out);
    assert!(
        err.contains("no_logprobs.parquet") && err.contains("wrong_type.parquet"),
        "{err}"
    );
}

#[test]
fn missing_input_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let nope = path_str(&dir.path().join("nope.parquet"));
    assert_fails_naming(&["inspect", &nope], &[&nope]);
}

/// A rollout as a third-party tool might leave it: only the required columns
/// (nullable, as pyarrow and DuckDB declare them) plus columns claw does not know.
fn batch_with_extras() -> RecordBatch {
    let base = claw::rollout::rows_to_batch(&[row(0), row(1), row(2)]).unwrap();
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, c) in base.schema().fields().iter().zip(base.columns()) {
        if !f.is_nullable() {
            fields.push(f.as_ref().clone().with_nullable(true));
            cols.push(c.clone());
        }
    }
    fields.push(Field::new("annotator_score", DataType::Float64, true));
    cols.push(Arc::new(Float64Array::from(vec![
        Some(0.5),
        None,
        Some(-2.25),
    ])));
    let tags = ListArray::from_iter_primitive::<Int32Type, _, _>([
        Some(vec![Some(7)]),
        Some(vec![]),
        None,
    ]);
    fields.push(Field::new("tag_ids", tags.data_type().clone(), true));
    cols.push(Arc::new(tags));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

#[test]
fn extra_columns_survive_a_read_write_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_plain(&input, &batch_with_extras());

    // A stage: read batches, add the column it owns, write them on.
    let output = dir.path().join("out.parquet");
    let mut writer = RolloutWriter::file(&output).unwrap();
    for batch in RolloutReader::new(&[path_str(&input)])
        .unwrap()
        .with_batch_size(2)
    {
        let batch = batch.unwrap();
        let reward: Float32Array = (0..batch.num_rows()).map(|_| Some(1.0f32)).collect();
        let mut fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("reward", DataType::Float32, true));
        let mut cols = batch.columns().to_vec();
        cols.push(Arc::new(reward));
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        writer.write(&out).unwrap();
    }
    assert_eq!(writer.finish().unwrap(), 3);

    let batches: Vec<RecordBatch> = RolloutReader::new(&[path_str(&output)])
        .unwrap()
        .map(|b| b.unwrap().into_batch())
        .collect();
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let score = batch.column_by_name("annotator_score").unwrap();
    assert_eq!(score.data_type(), &DataType::Float64);
    let score = score.as_primitive::<Float64Type>();
    assert_eq!(score.value(0), 0.5);
    assert!(score.is_null(1));
    assert_eq!(score.value(2), -2.25);
    let tags = batch.column_by_name("tag_ids").unwrap().as_list::<i32>();
    assert_eq!(tags.value(0).as_primitive::<Int32Type>().values(), &[7]);
    assert_eq!(tags.value(1).len(), 0);
    assert!(tags.is_null(2));

    let rows = claw::rollout::rows_from_batch(&batch).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.reward == Some(1.0)));
    assert_eq!(rows[2].prompt_ids, row(2).prompt_ids);

    // And the binary sees them as extra columns.
    let out = run(claw().args(["inspect", &path_str(&output), "--json", "--rows", "1"]));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cols = doc["files"][0]["columns"].as_array().unwrap();
    let extra = cols
        .iter()
        .find(|c| c["name"] == "annotator_score")
        .unwrap();
    assert_eq!(extra["known"], false);
    assert_eq!(
        doc["files"][0]["head"][0]["tag_ids"],
        serde_json::json!([7])
    );
}

/// A python3 that can `import pyarrow`: the system one, or a cached throw-away
/// venv under the temp dir with pyarrow installed from PyPI. `Err` says why not.
fn python_with_pyarrow() -> Result<PathBuf, String> {
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import pyarrow"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let system = PathBuf::from("python3");
    if works(&system) {
        return Ok(system);
    }
    let venv = std::env::temp_dir().join("claw-pyarrow-venv");
    let py = venv.join("bin").join("python");
    if works(&py) {
        return Ok(py);
    }
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    if !out.status.success() {
        return Err(format!("python3 -m venv failed: {}", stderr(&out).trim()));
    }
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--retries", "1", "--timeout", "30", "pyarrow"])
        .output()
        .map_err(|e| format!("pip not runnable: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip install pyarrow failed: {}",
            stderr(&out).trim()
        ));
    }
    if works(&py) {
        Ok(py)
    } else {
        Err("pyarrow installed but does not import".into())
    }
}

#[test]
fn pyarrow_reads_claw_files() {
    let py = match python_with_pyarrow() {
        Ok(py) => py,
        Err(reason) => {
            eprintln!("SKIP: pyarrow unavailable: {reason}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.parquet");
    write_rows(&f, &(0..4).map(row).collect::<Vec<_>>());
    let script = r#"
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
meta = pq.read_metadata(sys.argv[1]).metadata
print(t.num_rows)
print(meta[b"claw.schema"].decode())
print(t.column("response_ids")[3].as_py()[0])
print(t.schema.field("response_ids").type)
print(t.column("created_at").type)
"#;
    let out = Command::new(&py)
        .args(["-c", script])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "pyarrow failed: {}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "4");
    assert_eq!(lines[1], SCHEMA_TAG);
    assert_eq!(lines[2], "13");
    assert!(
        lines[3].starts_with("list<") && lines[3].contains("int32"),
        "{stdout}"
    );
    assert_eq!(lines[4], "timestamp[ms, tz=UTC]", "{stdout}");

    // And the other way: a file pyarrow writes (no claw.schema tag) loads in claw.
    let g = dir.path().join("from_pyarrow.parquet");
    let script = r#"
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
pq.write_table(t.replace_schema_metadata(None), sys.argv[2])
"#;
    let out = Command::new(&py)
        .args(["-c", script])
        .arg(&f)
        .arg(&g)
        .output()
        .unwrap();
    assert!(out.status.success(), "pyarrow failed: {}", stderr(&out));
    let rows = RolloutReader::new(&[path_str(&g)])
        .unwrap()
        .read_all_rows()
        .unwrap();
    assert_eq!(rows, (0..4).map(row).collect::<Vec<_>>());
    let out = run(claw().args(["inspect", &path_str(&g), "--json"]));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["files"][0]["schema_tag"], Value::Null);
    assert_eq!(doc["files"][0]["rows"], 4);
}
