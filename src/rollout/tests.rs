//! Unit tests for the rollout format: round trips, validation messages, writers
//! and segments. Integration tests that run the binary live in tests/rollout.rs.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, LargeStringArray, ListArray, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema};
use bytes::Bytes;

use super::*;

fn row(i: usize) -> RolloutRow {
    RolloutRow {
        sample_id: format!("s-{i}"),
        session_id: "sess-1".into(),
        turn: Some(i as i32 + 1),
        turn_type: "main".into(),
        created_at: 1_700_000_000_000 + i as i64,
        model: "smollm2".into(),
        policy_version: 3,
        messages_json: r#"[{"role":"user","content":"hi"}]"#.into(),
        tools_json: None,
        prompt_text: "<|im_start|>user\nhi<|im_end|>\n".into(),
        response_text: format!("reply {i}"),
        tool_calls_json: None,
        prompt_ids: vec![1, 2, 3],
        response_ids: vec![4, 5],
        response_logprobs: vec![-0.5, -1.25],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

/// Rows that exercise nulls, empty lists, nested lists and non-ASCII text.
fn tricky_rows() -> Vec<RolloutRow> {
    let mut a = row(0);
    a.prompt_ids = vec![];
    a.response_ids = vec![];
    a.response_logprobs = vec![];
    a.response_text = "héllo wörld — 你好 🦀 \u{0} tab\t".into();
    a.tools_json = Some("[]".into());
    a.feedback = Some(-1);
    a.session_done = Some(true);
    a.feedback_text = Some("".into());
    a.judge_votes = Some(vec![]);
    a.teacher_topk_ids = Some(vec![]);
    let mut b = row(1);
    b.turn = None;
    b.next_state_role = Some("user".into());
    b.next_state_text = Some("no, the other one".into());
    b.reward = Some(-1.0);
    b.judge_votes = Some(vec![-1, 1, -1]);
    b.judge_invalid = Some(0);
    b.judge_source = Some("prm:local".into());
    b.judge_raw = Some("\\boxed{-1}".into());
    b.hint = Some("use the other one".into());
    b.hint_candidates_json = Some("[]".into());
    b.teacher_logprobs = Some(vec![-0.1, -0.2]);
    b.teacher_topk_ids = Some(vec![vec![4, 9], vec![], vec![5]]);
    b.teacher_topk_logprobs = Some(vec![vec![-0.1, -3.0], vec![], vec![-0.2]]);
    b.policy_version = i64::MAX;
    b.created_at = -1; // before the epoch is still an instant
    vec![a, b, row(2)]
}

fn write_file(path: &std::path::Path, rows: &[RolloutRow]) {
    let mut w = RolloutWriter::file(path).unwrap();
    w.write_rows(rows).unwrap();
    assert_eq!(w.finish().unwrap(), rows.len() as u64);
}

#[test]
fn schema_has_every_design_column() {
    let s = schema();
    assert_eq!(s.fields().len(), 32);
    assert_eq!(
        s.metadata().get(SCHEMA_TAG_KEY).map(String::as_str),
        Some(SCHEMA_TAG)
    );
    let required: Vec<&str> = s
        .fields()
        .iter()
        .filter(|f| !f.is_nullable())
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        required,
        [
            "sample_id",
            "session_id",
            "turn_type",
            "created_at",
            "model",
            "policy_version",
            "messages_json",
            "prompt_text",
            "response_text",
            "prompt_ids",
            "response_ids",
            "response_logprobs",
            "token_source",
            "finish_reason"
        ]
    );
    let ty = |n: &str| type_name(s.field_with_name(n).unwrap().data_type());
    assert_eq!(ty("created_at"), "timestamp(ms, UTC)");
    assert_eq!(ty("turn"), "int32");
    assert_eq!(ty("session_done"), "bool");
    assert_eq!(ty("feedback"), "int8");
    assert_eq!(ty("reward"), "float32");
    assert_eq!(ty("judge_votes"), "list<int8>");
    assert_eq!(ty("teacher_topk_ids"), "list<list<int32>>");
    assert_eq!(ty("teacher_topk_logprobs"), "list<list<float32>>");
    assert!(s.field_with_name("turn").unwrap().is_nullable());
}

#[test]
fn rows_round_trip_through_parquet_bytes() {
    let rows = tricky_rows();
    let batch = rows_to_batch(&rows).unwrap();
    assert_eq!(batch.schema(), schema());
    assert_eq!(rows_from_batch(&batch).unwrap(), rows);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.parquet");
    write_file(&path, &rows);
    let bytes = Bytes::from(std::fs::read(&path).unwrap());
    let file = RolloutFile::from_bytes(bytes, "mem").unwrap();
    assert_eq!(file.num_rows(), 3);
    assert_eq!(file.schema_tag(), Some(SCHEMA_TAG));
    assert!(file.schema_tag_warning().is_none());
    let mut back = Vec::new();
    for b in file.batches(2, None).unwrap() {
        back.extend(b.unwrap().rows().unwrap());
    }
    assert_eq!(back, rows);
    // The file schema is exactly the canonical one (tag included).
    assert_eq!(file.schema().fields(), schema().fields());
}

#[test]
fn empty_rows_make_an_empty_batch_and_file() {
    let batch = rows_to_batch(&[]).unwrap();
    assert_eq!(batch.num_rows(), 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.parquet");
    let w = RolloutWriter::file(&path).unwrap();
    assert_eq!(w.finish().unwrap(), 0);
    let file = RolloutFile::open_path(&path).unwrap();
    assert_eq!(file.num_rows(), 0);
    assert_eq!(file.schema().fields(), schema().fields());
}

#[test]
fn wrong_type_error_names_file_column_and_both_types() {
    let mut fields: Vec<Field> = schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let i = fields
        .iter()
        .position(|f| f.name() == "prompt_ids")
        .unwrap();
    fields[i] = Field::new("prompt_ids", DataType::Utf8, false);
    let err = validate_schema(&Schema::new(fields), "data/x.parquet")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data/x.parquet"), "{err}");
    assert!(err.contains("`prompt_ids`"), "{err}");
    assert!(err.contains("expected list<int32>"), "{err}");
    assert!(err.contains("found utf8"), "{err}");
}

#[test]
fn missing_required_column_is_named_and_extra_columns_are_fine() {
    let mut fields: Vec<Field> = schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "response_ids")
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("my_extra", DataType::Binary, true));
    let err = validate_schema(&Schema::new(fields.clone()), "in.parquet")
        .unwrap_err()
        .to_string();
    assert!(err.contains("in.parquet"), "{err}");
    assert!(err.contains("`response_ids`"), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(err.contains("list<int32>"), "{err}");

    // Optional columns may be absent; unknown ones may be present.
    let only_required: Vec<Field> = schema()
        .fields()
        .iter()
        .filter(|f| !f.is_nullable())
        .map(|f| f.as_ref().clone())
        .chain([Field::new("my_extra", DataType::Binary, true)])
        .collect();
    validate_schema(&Schema::new(only_required), "ok.parquet").unwrap();
}

#[test]
fn several_problems_are_all_reported() {
    let fields: Vec<Field> = schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "model")
        .map(|f| {
            if f.name() == "reward" {
                Field::new("reward", DataType::Utf8, true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let err = validate_schema(&Schema::new(fields), "f.parquet")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`model`") && err.contains("`reward`"), "{err}");
}

/// A batch with only the required columns, spelled the way other tools spell
/// them, plus an extra column.
fn foreign_batch() -> RecordBatch {
    let canonical = rows_to_batch(&[row(0), row(1)]).unwrap();
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, c) in canonical.schema().fields().iter().zip(canonical.columns()) {
        if f.is_nullable() {
            continue; // optional columns absent
        }
        let (field, col): (Field, ArrayRef) = match f.name().as_str() {
            "prompt_text" => {
                let a = c.as_string::<i32>();
                (
                    Field::new("prompt_text", DataType::LargeUtf8, true),
                    Arc::new(a.iter().collect::<LargeStringArray>()),
                )
            }
            "created_at" => (
                Field::new(
                    "created_at",
                    DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Microsecond,
                        Some("+00:00".into()),
                    ),
                    true,
                ),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![
                        1_700_000_000_000_123,
                        1_700_000_000_001_999,
                    ])
                    .with_timezone("+00:00"),
                ),
            ),
            "prompt_ids" => {
                // pyarrow/DuckDB style: 64-bit items named "element".
                let item = Arc::new(Field::new("element", DataType::Int64, true));
                let values = Int64Array::from(vec![7, 8, 9]);
                let offsets = arrow::buffer::OffsetBuffer::from_lengths([2, 1]);
                (
                    Field::new("prompt_ids", DataType::List(item.clone()), true),
                    Arc::new(ListArray::new(item, offsets, Arc::new(values), None)),
                )
            }
            _ => (f.as_ref().clone().with_nullable(true), c.clone()),
        };
        fields.push(field);
        cols.push(col);
    }
    fields.push(Field::new("my_extra", DataType::Utf8, true));
    cols.push(Arc::new(StringArray::from(vec![Some("x"), None])));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

#[test]
fn foreign_spellings_are_normalised_and_extras_kept() {
    let batch = foreign_batch();
    let norm = normalize_batch(&batch, "foreign").unwrap();
    let s = norm.schema();
    assert_eq!(
        s.field_with_name("prompt_text").unwrap().data_type(),
        &DataType::Utf8
    );
    assert_eq!(
        s.field_with_name("prompt_ids").unwrap().data_type(),
        &ColumnType::ListInt32.data_type()
    );
    assert_eq!(
        s.field_with_name("created_at").unwrap().data_type(),
        &ColumnType::TimestampMs.data_type()
    );
    assert_eq!(
        s.field_with_name("my_extra").unwrap().data_type(),
        &DataType::Utf8
    );
    let rows = rows_from_batch(&batch).unwrap();
    assert_eq!(rows[0].created_at, 1_700_000_000_000);
    assert_eq!(rows[1].created_at, 1_700_000_000_001);
    assert_eq!(rows[0].prompt_ids, vec![7, 8]);
    assert_eq!(rows[1].prompt_ids, vec![9]);
    assert_eq!(rows[0].reward, None);
    assert_eq!(rows[0].prompt_text, row(0).prompt_text);

    // Written back out: canonical types, required columns non-null, extra kept.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.parquet");
    let mut w = RolloutWriter::file(&path).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    let file = RolloutFile::open_path(&path).unwrap();
    let fs = file.schema();
    assert!(!fs.field_with_name("prompt_text").unwrap().is_nullable());
    assert_eq!(
        fs.field_with_name("prompt_text").unwrap().data_type(),
        &DataType::Utf8
    );
    let b = file.batches(10, None).unwrap().next().unwrap().unwrap();
    let extra = b.column_by_name("my_extra").unwrap().as_string::<i32>();
    assert_eq!(extra.value(0), "x");
    assert!(extra.is_null(1));
}

#[test]
fn out_of_range_numbers_are_errors_not_nulls() {
    let batch = foreign_batch();
    let schema = batch.schema();
    let i = schema.index_of("prompt_ids").unwrap();
    let item = Arc::new(Field::new("element", DataType::Int64, true));
    let big = ListArray::new(
        item.clone(),
        arrow::buffer::OffsetBuffer::from_lengths([1, 0]),
        Arc::new(Int64Array::from(vec![i64::MAX])),
        None,
    );
    let mut cols = batch.columns().to_vec();
    cols[i] = Arc::new(big);
    let bad = RecordBatch::try_new(schema, cols).unwrap();
    let err = format!("{:#}", rows_from_batch(&bad).unwrap_err());
    assert!(err.contains("`prompt_ids`"), "{err}");
}

#[test]
fn null_in_required_column_names_row_and_column() {
    let batch = foreign_batch();
    let schema = batch.schema();
    let i = schema.index_of("model").unwrap();
    let mut cols = batch.columns().to_vec();
    cols[i] = Arc::new(StringArray::from(vec![Some("m"), None]));
    let bad = RecordBatch::try_new(schema, cols).unwrap();
    let err = format!("{:#}", rows_from_batch(&bad).unwrap_err());
    assert!(err.contains("row 2") && err.contains("`model`"), "{err}");
}

#[test]
fn null_list_element_names_row_and_column() {
    let mut rows = vec![row(0), row(1)];
    rows[1].prompt_ids = vec![1];
    let batch = rows_to_batch(&rows).unwrap();
    let schema = batch.schema();
    let i = schema.index_of("response_ids").unwrap();
    let with_null =
        ListArray::from_iter_primitive::<Int32Type, _, _>([Some(vec![Some(1)]), Some(vec![None])]);
    let mut cols = batch.columns().to_vec();
    cols[i] = Arc::new(with_null);
    let bad = RecordBatch::try_new(schema, cols).unwrap();
    let err = format!("{:#}", rows_from_batch(&bad).unwrap_err());
    assert!(
        err.contains("row 2") && err.contains("`response_ids`"),
        "{err}"
    );
}

#[test]
fn writer_dropped_without_finish_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    {
        let mut w = RolloutWriter::file(&path).unwrap();
        w.write_rows(&[row(0)]).unwrap();
        assert!(dir.path().join("x.parquet.tmp").exists());
        assert!(!path.exists());
    }
    assert!(!dir.path().join("x.parquet.tmp").exists());
    assert!(!path.exists());

    write_file(&path, &[row(0)]);
    assert!(path.exists());
    assert!(!dir.path().join("x.parquet.tmp").exists());
}

#[test]
fn writer_rejects_a_batch_with_different_columns() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = RolloutWriter::file(dir.path().join("x.parquet")).unwrap();
    w.write(&foreign_batch()).unwrap();
    let err = w
        .write(&rows_to_batch(&[row(0)]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("my_extra"), "{err}");
}

#[test]
fn writer_accepts_batches_differing_only_in_metadata_and_nullability() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    let mut w = RolloutWriter::file(&path).unwrap();
    w.write_rows(&[row(0)]).unwrap();
    let b = rows_to_batch(&[row(1)]).unwrap();
    let relaxed = Schema::new(
        b.schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    );
    w.write(&RecordBatch::try_new(Arc::new(relaxed), b.columns().to_vec()).unwrap())
        .unwrap();
    assert_eq!(w.finish().unwrap(), 2);
    let rows = RolloutReader::new(&[path.display().to_string()])
        .unwrap()
        .read_all_rows()
        .unwrap();
    assert_eq!(rows, vec![row(0), row(1)]);
}

#[test]
fn reader_streams_files_and_globs_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<RolloutRow> = (0..10).map(row).collect();
    write_file(&dir.path().join("a.parquet"), &rows[..7]);
    write_file(&dir.path().join("b.parquet"), &rows[7..]);
    let pattern = dir.path().join("*.parquet").display().to_string();
    let reader = RolloutReader::new(&[pattern]).unwrap().with_batch_size(3);
    let mut sizes = Vec::new();
    let mut back = Vec::new();
    for b in reader {
        let b = b.unwrap();
        sizes.push((
            b.source.rsplit('/').next().unwrap().to_string(),
            b.first_row,
            b.num_rows(),
        ));
        back.extend(b.rows().unwrap());
    }
    assert_eq!(back, rows);
    let a = "a.parquet".to_string();
    let bn = "b.parquet".to_string();
    assert_eq!(
        sizes,
        vec![(a.clone(), 0, 3), (a.clone(), 3, 3), (a, 6, 1), (bn, 0, 3)]
    );

    // A directory means its *.parquet files.
    let n = RolloutReader::new(&[dir.path().display().to_string()])
        .unwrap()
        .read_all_rows()
        .unwrap()
        .len();
    assert_eq!(n, 10);
}

#[test]
fn bad_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.parquet").display().to_string();
    let err = RolloutReader::new(std::slice::from_ref(&missing))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&missing), "{err}");

    let pattern = dir.path().join("*.none").display().to_string();
    let err = RolloutReader::new(std::slice::from_ref(&pattern))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&pattern), "{err}");

    let text = dir.path().join("text.parquet");
    std::fs::write(&text, "sample_id,model\n1,x\n").unwrap();
    let err = RolloutFile::open_path(&text).err().unwrap().to_string();
    assert!(err.contains(&text.display().to_string()), "{err}");

    let good = dir.path().join("good.parquet");
    write_file(&good, &[row(0), row(1)]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = RolloutFile::open_path(&cut).err().unwrap().to_string();
    assert!(
        err.contains("cut.parquet") && err.contains("truncated"),
        "{err}"
    );

    // The reader reports the bad file and carries on with the next one.
    let inputs = [cut.display().to_string(), good.display().to_string()];
    let results: Vec<_> = RolloutReader::new(&inputs).unwrap().collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_err());
    assert_eq!(results[1].as_ref().unwrap().num_rows(), 2);

    assert!(expand_inputs(&["-".into(), "-".into()]).is_err());
    assert_eq!(expand_inputs(&[]).unwrap(), vec![Input::Stdin]);
}

#[test]
fn schema_tag_absence_is_only_a_warning() {
    let w = schema_tag_warning(None, "duck.parquet").unwrap();
    assert!(w.contains("duck.parquet") && w.contains(SCHEMA_TAG_KEY));
    assert!(schema_tag_warning(Some(SCHEMA_TAG), "x").is_none());
    assert!(schema_tag_warning(Some("claw.rollout.v9"), "x")
        .unwrap()
        .contains("v9"));
}

#[test]
fn segment_names_sort_by_time_then_sequence() {
    let mut names = vec![
        segment_file_name(1_700_000_000_001, "serve-a", 2),
        segment_file_name(999, "serve-a", 0),
        segment_file_name(1_700_000_000_001, "serve-a", 10),
        segment_file_name(1_700_000_000_000, "serve-a", 1),
        segment_file_name(10_000, "serve-a", 999),
    ];
    assert_eq!(names[1], "0000000000999-serve-a-000000.parquet");
    let by_time = {
        let mut v: Vec<(u64, &str, u64)> = names
            .iter()
            .map(|n| parse_segment_file_name(n).unwrap())
            .collect();
        v.sort();
        v.into_iter()
            .map(|(ms, id, seq)| segment_file_name(ms, id, seq))
            .collect::<Vec<_>>()
    };
    names.sort();
    assert_eq!(names, by_time);
    assert_eq!(
        parse_segment_file_name("1700000000000-judge-2-000007.parquet"),
        Some((1_700_000_000_000, "judge-2", 7))
    );
    assert_eq!(
        parse_segment_file_name("1700000000000-judge-000007.parquet.tmp"),
        None
    );
    assert_eq!(parse_segment_file_name("notes.parquet"), None);
    assert!(validate_writer_id("a/b").is_err());
    assert!(validate_writer_id("").is_err());
    assert!(validate_writer_id("serve-1.host_a").is_ok());
}

#[test]
fn segment_writer_rolls_by_rows_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let seg_dir = dir.path().join("raw");
    let mut w = SegmentWriter::new(&seg_dir, "t").unwrap().with_max_rows(2);
    let rows: Vec<RolloutRow> = (0..5).map(row).collect();
    let done = w.write_rows(&rows).unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(w.pending_rows(), 1);
    let last = w.finish().unwrap().unwrap();
    let mut all = done.clone();
    all.push(last);
    let mut listed: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    listed.sort();
    assert_eq!(listed, all, "segments sort in writing order, no .tmp left");
    let back = RolloutReader::new(&[seg_dir.display().to_string()])
        .unwrap()
        .read_all_rows()
        .unwrap();
    assert_eq!(back, rows);

    let mut w = SegmentWriter::new(&seg_dir, "t2")
        .unwrap()
        .with_max_age(Duration::ZERO);
    assert!(w.write_rows(&rows[..1]).unwrap().is_empty());
    let rolled = w.roll_if_due().unwrap();
    assert!(rolled.is_some());
    assert!(w.finish().unwrap().is_none());
}

#[test]
fn typed_rows_from_a_batch_ignore_extra_columns() {
    let batch = foreign_batch();
    let n = batch.num_rows();
    let rows = rows_from_batch(&batch).unwrap();
    assert_eq!(rows.len(), n);
    // Json round trip of the typed row (serde derive) keeps every field.
    let json = serde_json::to_string(&tricky_rows()).unwrap();
    let back: Vec<RolloutRow> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, tricky_rows());
}

#[test]
fn large_batches_are_encoded_in_parallel_and_split_into_row_groups() {
    // 70,000 rows in batches of 30,000 (the parallel path), then a few rows (the
    // sequential one): two row groups of at most 64 Ki rows, every row back in
    // order, nulls and nested lists included.
    let mut rows: Vec<RolloutRow> = (0..70_000).map(row).collect();
    for (i, r) in rows.iter_mut().enumerate().step_by(7) {
        r.teacher_topk_ids = Some(vec![vec![i as i32], vec![]]);
        r.reward = Some(1.0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.parquet");
    let mut w = RolloutWriter::file(&path).unwrap();
    for chunk in rows.chunks(30_000) {
        w.write_rows(chunk).unwrap();
    }
    let tail = tricky_rows();
    w.write_rows(&tail).unwrap();
    assert_eq!(w.finish().unwrap(), 70_003);
    let file = RolloutFile::open_path(&path).unwrap();
    let groups: Vec<i64> = file
        .parquet_metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert_eq!(groups, [65_536, 4_467]);
    let back = RolloutReader::new(&[path.display().to_string()])
        .unwrap()
        .read_all_rows()
        .unwrap();
    rows.extend(tail);
    assert_eq!(back.len(), rows.len());
    assert!(back == rows, "rows differ after a parallel write");
}
