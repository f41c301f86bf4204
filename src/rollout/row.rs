//! [`RolloutRow`]: one rollout as a plain Rust value, for stages that work row by row
//! (serve records them, collect pairs them) and for tests.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float32Builder, GenericListArray,
    Int32Array, Int32Builder, Int64Array, Int8Array, ListArray, ListBuilder, RecordBatch,
    StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{
    ArrowPrimitiveType, Float32Type, Int32Type, Int64Type, Int8Type, TimestampMillisecondType,
};
use serde::{Deserialize, Serialize};

use super::schema::{normalize_batch_at, schema, CREATED_AT_TZ};

/// One row of `claw.rollout.v1` (docs/ARCHITECTURE.md, "Rollout schema"). Required
/// columns are plain values; columns that a later stage fills in are `Option`s, so
/// "not judged yet" (`None`) stays distinct from a score of 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutRow {
    pub sample_id: String,
    pub session_id: String,
    pub turn: Option<i32>,
    pub turn_type: String,
    /// The request said the session ends with it (`None`: not recorded).
    pub session_done: Option<bool>,
    /// Milliseconds since the Unix epoch, UTC.
    pub created_at: i64,
    pub model: String,
    pub policy_version: i64,
    pub messages_json: String,
    pub tools_json: Option<String>,
    pub prompt_text: String,
    pub response_text: String,
    pub tool_calls_json: Option<String>,
    pub prompt_ids: Vec<i32>,
    pub response_ids: Vec<i32>,
    pub response_logprobs: Vec<f32>,
    pub token_source: String,
    pub finish_reason: String,
    pub next_state_role: Option<String>,
    pub next_state_text: Option<String>,
    pub feedback: Option<i8>,
    pub feedback_text: Option<String>,
    pub reward: Option<f32>,
    pub judge_votes: Option<Vec<i8>>,
    pub judge_invalid: Option<i32>,
    pub judge_source: Option<String>,
    pub judge_raw: Option<String>,
    pub hint: Option<String>,
    pub hint_candidates_json: Option<String>,
    pub teacher_logprobs: Option<Vec<f32>>,
    pub teacher_topk_ids: Option<Vec<Vec<i32>>>,
    pub teacher_topk_logprobs: Option<Vec<Vec<f32>>>,
}

impl RolloutRow {
    /// `messages_json` parsed: the conversation the reply answered.
    pub fn messages(&self) -> Result<Vec<serde_json::Value>> {
        serde_json::from_str(&self.messages_json)
            .context("messages_json is not a JSON array of messages")
    }

    /// `tools_json` parsed; None when the request offered no tools.
    pub fn tools(&self) -> Result<Option<Vec<serde_json::Value>>> {
        match &self.tools_json {
            Some(t) if !t.trim().is_empty() => Ok(Some(
                serde_json::from_str(t).context("tools_json is not a JSON array")?,
            )),
            _ => Ok(None),
        }
    }
}

/// Builds a batch with exactly [`schema()`]'s columns, so rows created in Rust
/// (serve's recorder, tests) produce a canonical, fully tagged file.
pub fn rows_to_batch(rows: &[RolloutRow]) -> Result<RecordBatch> {
    fn strs<'a>(rows: &'a [RolloutRow], f: impl Fn(&'a RolloutRow) -> &'a str) -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(f(r))).collect::<StringArray>())
    }
    fn opt_strs(rows: &[RolloutRow], f: impl Fn(&RolloutRow) -> Option<&str>) -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    }
    fn list<T: ArrowPrimitiveType>(
        rows: &[RolloutRow],
        f: impl Fn(&RolloutRow) -> Option<&[T::Native]>,
    ) -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<T, _, _>(
            rows.iter()
                .map(|r| f(r).map(|v| v.iter().map(|x| Some(*x)))),
        ))
    }

    let nested_i32 = {
        let mut b = ListBuilder::new(ListBuilder::new(Int32Builder::new()));
        for r in rows {
            match &r.teacher_topk_ids {
                Some(outer) => {
                    for inner in outer {
                        b.values().values().append_slice(inner);
                        b.values().append(true);
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    };
    let nested_f32 = {
        let mut b = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
        for r in rows {
            match &r.teacher_topk_logprobs {
                Some(outer) => {
                    for inner in outer {
                        b.values().values().append_slice(inner);
                        b.values().append(true);
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    };

    // Same order as COLUMNS; RecordBatch::try_new checks every type against schema().
    let columns: Vec<ArrayRef> = vec![
        strs(rows, |r| &r.sample_id),
        strs(rows, |r| &r.session_id),
        Arc::new(rows.iter().map(|r| r.turn).collect::<Int32Array>()),
        strs(rows, |r| &r.turn_type),
        Arc::new(
            rows.iter()
                .map(|r| r.session_done)
                .collect::<BooleanArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.created_at))
                .collect::<TimestampMillisecondArray>()
                .with_timezone(CREATED_AT_TZ),
        ),
        strs(rows, |r| &r.model),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.policy_version))
                .collect::<Int64Array>(),
        ),
        strs(rows, |r| &r.messages_json),
        opt_strs(rows, |r| r.tools_json.as_deref()),
        strs(rows, |r| &r.prompt_text),
        strs(rows, |r| &r.response_text),
        opt_strs(rows, |r| r.tool_calls_json.as_deref()),
        list::<Int32Type>(rows, |r| Some(&r.prompt_ids)),
        list::<Int32Type>(rows, |r| Some(&r.response_ids)),
        list::<Float32Type>(rows, |r| Some(&r.response_logprobs)),
        strs(rows, |r| &r.token_source),
        strs(rows, |r| &r.finish_reason),
        opt_strs(rows, |r| r.next_state_role.as_deref()),
        opt_strs(rows, |r| r.next_state_text.as_deref()),
        Arc::new(rows.iter().map(|r| r.feedback).collect::<Int8Array>()),
        opt_strs(rows, |r| r.feedback_text.as_deref()),
        Arc::new(rows.iter().map(|r| r.reward).collect::<Float32Array>()),
        list::<Int8Type>(rows, |r| r.judge_votes.as_deref()),
        Arc::new(rows.iter().map(|r| r.judge_invalid).collect::<Int32Array>()),
        opt_strs(rows, |r| r.judge_source.as_deref()),
        opt_strs(rows, |r| r.judge_raw.as_deref()),
        opt_strs(rows, |r| r.hint.as_deref()),
        opt_strs(rows, |r| r.hint_candidates_json.as_deref()),
        list::<Float32Type>(rows, |r| r.teacher_logprobs.as_deref()),
        nested_i32,
        nested_f32,
    ];
    RecordBatch::try_new(schema(), columns).context("building a rollout record batch")
}

/// Reads the claw columns of `batch` into rows. Extra columns are ignored and
/// absent optional columns read as `None`, so this works on any stage's output
/// and on files written by other tools. Errors name the column and the 1-based row.
pub fn rows_from_batch(batch: &RecordBatch) -> Result<Vec<RolloutRow>> {
    rows_from_batch_at(batch, "record batch", 0)
}

/// [`rows_from_batch`] for a batch that starts at row `first_row` (0-based) of
/// `source`, so errors point into the file.
pub(crate) fn rows_from_batch_at(
    batch: &RecordBatch,
    source: &str,
    first_row: u64,
) -> Result<Vec<RolloutRow>> {
    let batch = normalize_batch_at(batch, source, first_row)?;
    let mut rows = vec![RolloutRow::default(); batch.num_rows()];
    // Column by column: one lookup and downcast per column, not per row.
    let f = Filler {
        batch: &batch,
        source,
        first_row,
    };
    f.string("sample_id", &mut rows, |r, v| r.sample_id = v)?;
    f.string("session_id", &mut rows, |r, v| r.session_id = v)?;
    f.prim::<Int32Type>("turn", &mut rows, |r, v| r.turn = Some(v))?;
    f.string("turn_type", &mut rows, |r, v| r.turn_type = v)?;
    if let Some(a) = batch.column_by_name("session_done") {
        let a = a.as_boolean();
        for (i, row) in rows.iter_mut().enumerate() {
            if a.is_valid(i) {
                row.session_done = Some(a.value(i));
            }
        }
    }
    f.prim::<TimestampMillisecondType>("created_at", &mut rows, |r, v| r.created_at = v)?;
    f.string("model", &mut rows, |r, v| r.model = v)?;
    f.prim::<Int64Type>("policy_version", &mut rows, |r, v| r.policy_version = v)?;
    f.string("messages_json", &mut rows, |r, v| r.messages_json = v)?;
    f.string("tools_json", &mut rows, |r, v| r.tools_json = Some(v))?;
    f.string("prompt_text", &mut rows, |r, v| r.prompt_text = v)?;
    f.string("response_text", &mut rows, |r, v| r.response_text = v)?;
    f.string("tool_calls_json", &mut rows, |r, v| {
        r.tool_calls_json = Some(v)
    })?;
    f.list::<Int32Type>("prompt_ids", &mut rows, |r, v| r.prompt_ids = v)?;
    f.list::<Int32Type>("response_ids", &mut rows, |r, v| r.response_ids = v)?;
    f.list::<Float32Type>("response_logprobs", &mut rows, |r, v| {
        r.response_logprobs = v
    })?;
    f.string("token_source", &mut rows, |r, v| r.token_source = v)?;
    f.string("finish_reason", &mut rows, |r, v| r.finish_reason = v)?;
    f.string("next_state_role", &mut rows, |r, v| {
        r.next_state_role = Some(v)
    })?;
    f.string("next_state_text", &mut rows, |r, v| {
        r.next_state_text = Some(v)
    })?;
    f.prim::<Int8Type>("feedback", &mut rows, |r, v| r.feedback = Some(v))?;
    f.string("feedback_text", &mut rows, |r, v| r.feedback_text = Some(v))?;
    f.prim::<Float32Type>("reward", &mut rows, |r, v| r.reward = Some(v))?;
    f.list::<Int8Type>("judge_votes", &mut rows, |r, v| r.judge_votes = Some(v))?;
    f.prim::<Int32Type>("judge_invalid", &mut rows, |r, v| r.judge_invalid = Some(v))?;
    f.string("judge_source", &mut rows, |r, v| r.judge_source = Some(v))?;
    f.string("judge_raw", &mut rows, |r, v| r.judge_raw = Some(v))?;
    f.string("hint", &mut rows, |r, v| r.hint = Some(v))?;
    f.string("hint_candidates_json", &mut rows, |r, v| {
        r.hint_candidates_json = Some(v)
    })?;
    f.list::<Float32Type>("teacher_logprobs", &mut rows, |r, v| {
        r.teacher_logprobs = Some(v)
    })?;
    f.nested::<Int32Type>("teacher_topk_ids", &mut rows, |r, v| {
        r.teacher_topk_ids = Some(v)
    })?;
    f.nested::<Float32Type>("teacher_topk_logprobs", &mut rows, |r, v| {
        r.teacher_topk_logprobs = Some(v)
    })?;
    Ok(rows)
}

/// Copies one column of a normalised batch into rows. Nulls leave the field at its
/// default (`None` for optional fields); required columns hold no nulls once the
/// batch is normalised, and are present because the schema was validated.
struct Filler<'a> {
    batch: &'a RecordBatch,
    source: &'a str,
    first_row: u64,
}

impl Filler<'_> {
    fn at(&self, i: usize) -> String {
        format!("{}: row {}", self.source, self.first_row + i as u64 + 1)
    }

    fn string(
        &self,
        name: &str,
        rows: &mut [RolloutRow],
        set: impl Fn(&mut RolloutRow, String),
    ) -> Result<()> {
        if let Some(a) = self.batch.column_by_name(name) {
            let a = a.as_string::<i32>();
            for (i, row) in rows.iter_mut().enumerate() {
                if a.is_valid(i) {
                    set(row, a.value(i).to_string());
                }
            }
        }
        Ok(())
    }

    fn prim<T: ArrowPrimitiveType>(
        &self,
        name: &str,
        rows: &mut [RolloutRow],
        set: impl Fn(&mut RolloutRow, T::Native),
    ) -> Result<()> {
        if let Some(a) = self.batch.column_by_name(name) {
            let a = a.as_primitive::<T>();
            for (i, row) in rows.iter_mut().enumerate() {
                if a.is_valid(i) {
                    set(row, a.value(i));
                }
            }
        }
        Ok(())
    }

    fn list<T: ArrowPrimitiveType>(
        &self,
        name: &str,
        rows: &mut [RolloutRow],
        set: impl Fn(&mut RolloutRow, Vec<T::Native>),
    ) -> Result<()> {
        if let Some(a) = self.batch.column_by_name(name) {
            let a = a.as_list::<i32>();
            for (i, row) in rows.iter_mut().enumerate() {
                if a.is_valid(i) {
                    let v = prim_values::<T>(a, i)
                        .with_context(|| format!("{}: column `{name}`", self.at(i)))?;
                    set(row, v);
                }
            }
        }
        Ok(())
    }

    fn nested<T: ArrowPrimitiveType>(
        &self,
        name: &str,
        rows: &mut [RolloutRow],
        set: impl Fn(&mut RolloutRow, Vec<Vec<T::Native>>),
    ) -> Result<()> {
        if let Some(a) = self.batch.column_by_name(name) {
            let a = a.as_list::<i32>();
            for (i, row) in rows.iter_mut().enumerate() {
                if a.is_null(i) {
                    continue;
                }
                let inner = a.value(i);
                let inner = inner.as_list::<i32>();
                let v = (0..inner.len())
                    .map(|j| {
                        if inner.is_null(j) {
                            return Err(anyhow!("entry {j} is null"));
                        }
                        prim_values::<T>(inner, j).with_context(|| format!("entry {j}"))
                    })
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("{}: column `{name}`", self.at(i)))?;
                set(row, v);
            }
        }
        Ok(())
    }
}

/// The values of list entry `i`, refusing null elements: a token id or log-prob
/// that is "unknown" has no meaning for training.
fn prim_values<T: ArrowPrimitiveType>(
    a: &GenericListArray<i32>,
    i: usize,
) -> Result<Vec<T::Native>> {
    let v = a.value(i);
    let p = v.as_primitive::<T>();
    if let Some(j) = (0..p.len()).find(|&j| p.is_null(j)) {
        return Err(anyhow!("element {j} of the list is null"));
    }
    Ok(p.values().to_vec())
}
