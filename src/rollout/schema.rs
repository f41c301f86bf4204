//! The `claw.rollout.v1` column table (docs/ARCHITECTURE.md, "Rollout schema"), kept
//! in one place so every stage, the validator and `claw inspect` agree on names,
//! types and nullability.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, TimestampMillisecondArray,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{
    DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};

/// Version tag stored in every file we write, so readers can tell our files (and
/// future incompatible versions) from arbitrary Parquet.
pub const SCHEMA_TAG: &str = "claw.rollout.v1";

/// Parquet key-value metadata key holding [`SCHEMA_TAG`].
pub const SCHEMA_TAG_KEY: &str = "claw.schema";

/// The time zone of `created_at`; rows are instants, never wall-clock times.
pub const CREATED_AT_TZ: &str = "UTC";

/// The logical type of a claw column. A closed set (rather than raw `DataType`s) so
/// the table below can be a `const` and error messages use the type names of the
/// column table in docs/ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Utf8,
    Bool,
    Int8,
    Int32,
    Int64,
    Float32,
    /// timestamp(ms, UTC)
    TimestampMs,
    ListInt8,
    ListInt32,
    ListFloat32,
    ListListInt32,
    ListListFloat32,
}

impl ColumnType {
    /// The exact Arrow type we write and that readers normalise to.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Int8 => DataType::Int8,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::TimestampMs => {
                DataType::Timestamp(TimeUnit::Millisecond, Some(CREATED_AT_TZ.into()))
            }
            ColumnType::ListInt8 => list_of(DataType::Int8),
            ColumnType::ListInt32 => list_of(DataType::Int32),
            ColumnType::ListFloat32 => list_of(DataType::Float32),
            ColumnType::ListListInt32 => list_of(list_of(DataType::Int32)),
            ColumnType::ListListFloat32 => list_of(list_of(DataType::Float32)),
        }
    }

    /// Whether a column of type `found` can be read as this type without changing
    /// its meaning. Other tools spell the same data differently (pyarrow/polars use
    /// large or view strings, DuckDB writes microsecond timestamps and names list
    /// items `element`, pandas widens ints), and rejecting those would make the
    /// format claw-only. Numeric narrowing is checked value by value when read.
    pub fn accepts(self, found: &DataType) -> bool {
        match self {
            ColumnType::Utf8 => is_string(found),
            ColumnType::Bool => *found == DataType::Boolean,
            ColumnType::Int8 | ColumnType::Int32 | ColumnType::Int64 => found.is_integer(),
            ColumnType::Float32 => found.is_floating(),
            ColumnType::TimestampMs => matches!(found, DataType::Timestamp(_, _)),
            ColumnType::ListInt8 | ColumnType::ListInt32 => {
                list_item(found).is_some_and(DataType::is_integer)
            }
            ColumnType::ListFloat32 => list_item(found).is_some_and(DataType::is_floating),
            ColumnType::ListListInt32 => list_item(found)
                .and_then(list_item)
                .is_some_and(DataType::is_integer),
            ColumnType::ListListFloat32 => list_item(found)
                .and_then(list_item)
                .is_some_and(DataType::is_floating),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&type_name(&self.data_type()))
    }
}

/// One column of `claw.rollout.v1`.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    /// Required columns must be present and hold no nulls; the rest are filled in
    /// by later stages and may be absent altogether.
    pub required: bool,
    /// The stage that writes it (for `claw inspect` and error messages).
    pub written_by: &'static str,
}

const fn col(name: &'static str, ty: ColumnType, required: bool, by: &'static str) -> Column {
    Column {
        name,
        ty,
        required,
        written_by: by,
    }
}

use ColumnType as T;

/// Every column of `claw.rollout.v1` in file order (docs/ARCHITECTURE.md, "Rollout
/// schema").
pub const COLUMNS: &[Column] = &[
    col("sample_id", T::Utf8, true, "serve/collect"),
    col("session_id", T::Utf8, true, "serve"),
    col("turn", T::Int32, false, "collect"),
    col("turn_type", T::Utf8, true, "serve"),
    // X-Session-Done / session_done of the request (null where unknown): collect
    // ends the session there instead of waiting for --session-timeout.
    col("session_done", T::Bool, false, "serve"),
    col("created_at", T::TimestampMs, true, "serve"),
    col("model", T::Utf8, true, "serve"),
    col("policy_version", T::Int64, true, "serve"),
    col("messages_json", T::Utf8, true, "serve"),
    col("tools_json", T::Utf8, false, "serve"),
    col("prompt_text", T::Utf8, true, "serve"),
    col("response_text", T::Utf8, true, "serve"),
    col("tool_calls_json", T::Utf8, false, "serve"),
    col("prompt_ids", T::ListInt32, true, "serve"),
    col("response_ids", T::ListInt32, true, "serve"),
    col("response_logprobs", T::ListFloat32, true, "serve"),
    col("token_source", T::Utf8, true, "serve/collect"),
    col("finish_reason", T::Utf8, true, "serve"),
    col("next_state_role", T::Utf8, false, "collect"),
    col("next_state_text", T::Utf8, false, "collect"),
    col("feedback", T::Int8, false, "collect"),
    col("feedback_text", T::Utf8, false, "collect"),
    col("reward", T::Float32, false, "judge"),
    col("judge_votes", T::ListInt8, false, "judge"),
    col("judge_invalid", T::Int32, false, "judge"),
    col("judge_source", T::Utf8, false, "judge"),
    col("judge_raw", T::Utf8, false, "judge"),
    col("hint", T::Utf8, false, "distill-hints"),
    col("hint_candidates_json", T::Utf8, false, "distill-hints"),
    col("teacher_logprobs", T::ListFloat32, false, "distill-hints"),
    col("teacher_topk_ids", T::ListListInt32, false, "distill-hints"),
    col(
        "teacher_topk_logprobs",
        T::ListListFloat32,
        false,
        "distill-hints",
    ),
];

/// Looks up a claw column by name; `None` means the column is an extra one that
/// stages pass through untouched.
pub fn column(name: &str) -> Option<&'static Column> {
    COLUMNS.iter().find(|c| c.name == name)
}

/// The canonical Arrow schema of `claw.rollout.v1`, tagged with [`SCHEMA_TAG`].
/// Built once: every writer of fresh rows shares it.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let fields: Vec<Field> = COLUMNS
                .iter()
                .map(|c| Field::new(c.name, c.ty.data_type(), !c.required))
                .collect();
            let metadata = HashMap::from([(SCHEMA_TAG_KEY.to_string(), SCHEMA_TAG.to_string())]);
            Arc::new(Schema::new_with_metadata(fields, metadata))
        })
        .clone()
}

/// Checks that `found` can be read as a rollout: every required column present,
/// every claw column of an acceptable type. Extra columns are fine (they pass
/// through). `source` (a file name, or `<stdin>`) goes into the error so a user
/// with many inputs knows which one to fix.
///
/// Required columns declared nullable are accepted (pyarrow and DuckDB mark every
/// column nullable); actual nulls in them are caught when batches are read.
pub fn validate_schema(found: &Schema, source: &str) -> Result<()> {
    let mut problems = Vec::new();
    for c in COLUMNS {
        let matches: Vec<&FieldRef> = found
            .fields()
            .iter()
            .filter(|f| f.name() == c.name)
            .collect();
        match matches.as_slice() {
            [] if c.required => problems.push(format!(
                "required column `{}` is missing (expected {})",
                c.name, c.ty
            )),
            [] => {}
            [f] if !c.ty.accepts(f.data_type()) => problems.push(format!(
                "column `{}` has the wrong type: expected {}, found {}",
                c.name,
                c.ty,
                type_name(f.data_type())
            )),
            [_] => {}
            _ => problems.push(format!(
                "column `{}` appears {} times",
                c.name,
                matches.len()
            )),
        }
    }
    match problems.len() {
        0 => Ok(()),
        1 => bail!("{source}: not a {SCHEMA_TAG} rollout: {}", problems[0]),
        _ => bail!(
            "{source}: not a {SCHEMA_TAG} rollout:\n  {}",
            problems.join("\n  ")
        ),
    }
}

/// Returns `batch` with every claw column converted to its exact canonical type,
/// after checking that required columns hold no nulls. Extra columns, the column
/// order and field/schema metadata are kept, so a stage can add its columns and
/// write the batch back out. Cheap when the types already match (the usual case):
/// no data is copied.
///
/// This is what lets the rest of the crate downcast known columns without caring
/// whether a file came from claw, pyarrow or DuckDB.
pub fn normalize_batch(batch: &RecordBatch, source: &str) -> Result<RecordBatch> {
    normalize_batch_at(batch, source, 0)
}

/// [`normalize_batch`] for a batch whose first row is row `first_row` (0-based) of
/// its file, so errors give the row number within the file.
pub(crate) fn normalize_batch_at(
    batch: &RecordBatch,
    source: &str,
    first_row: u64,
) -> Result<RecordBatch> {
    let schema = batch.schema();
    validate_schema(&schema, source)?;
    let mut changed = false;
    let mut fields: Vec<FieldRef> = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let Some(c) = column(field.name()) else {
            fields.push(field.clone());
            columns.push(array.clone());
            continue;
        };
        if c.required && array.null_count() > 0 {
            let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
            bail!(
                "{source}: row {}: required column `{}` is null",
                first_row + row as u64 + 1,
                c.name
            );
        }
        let want = c.ty.data_type();
        if *array.data_type() == want {
            fields.push(field.clone());
            columns.push(array.clone());
            continue;
        }
        changed = true;
        let converted = convert(array, c.ty, &want).with_context(|| {
            format!(
                "{source}: column `{}`: cannot read {} as {}",
                c.name,
                type_name(array.data_type()),
                c.ty
            )
        })?;
        fields.push(Arc::new(
            Field::new(c.name, want, field.is_nullable()).with_metadata(field.metadata().clone()),
        ));
        columns.push(converted);
    }
    if !changed {
        return Ok(batch.clone());
    }
    let new_schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(new_schema, columns, &options)
        .with_context(|| format!("{source}: rebuilding batch with canonical column types"))
}

/// `batch` with the claw columns in `replacements` replaced (keeping each
/// field's metadata), or inserted at their place in the [`COLUMNS`] order when
/// missing. Every other column, unknown ones included, passes through untouched:
/// this is how a stage writes only the columns it owns.
pub fn set_columns(batch: &RecordBatch, replacements: &[(&str, ArrayRef)]) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut fields: Vec<FieldRef> = schema.fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for (name, array) in replacements {
        let spec = column(name).with_context(|| format!("{name} is not a claw column"))?;
        anyhow::ensure!(
            array.len() == batch.num_rows(),
            "column {name}: {} values for {} rows",
            array.len(),
            batch.num_rows()
        );
        let field = Field::new(*name, spec.ty.data_type(), true);
        if let Some(k) = fields.iter().position(|f| f.name() == name) {
            fields[k] = Arc::new(field.with_metadata(fields[k].metadata().clone()));
            columns[k] = array.clone();
            continue;
        }
        let k = insert_position(&fields, name);
        fields.insert(k, Arc::new(field));
        columns.insert(k, array.clone());
    }
    let out = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    RecordBatch::try_new(out, columns).context("replacing columns")
}

/// Where a missing claw column goes: before the first claw column that follows it
/// in [`COLUMNS`] order, else right after the last claw column (so unknown
/// columns at the end stay at the end).
fn insert_position(fields: &[FieldRef], name: &str) -> usize {
    let rank = |n: &str| COLUMNS.iter().position(|c| c.name == n);
    let me = rank(name).unwrap_or(usize::MAX);
    if let Some(k) = fields
        .iter()
        .position(|f| rank(f.name()).is_some_and(|r| r > me))
    {
        return k;
    }
    fields
        .iter()
        .rposition(|f| rank(f.name()).is_some())
        .map_or(fields.len(), |k| k + 1)
}

fn convert(array: &ArrayRef, ty: ColumnType, want: &DataType) -> Result<ArrayRef> {
    if ty == ColumnType::TimestampMs {
        return timestamp_to_ms(array);
    }
    let options = CastOptions {
        safe: false, // an out-of-range value is an error, not a silent null
        ..Default::default()
    };
    Ok(cast_with_options(array, want, &options)?)
}

/// Converts any timestamp array to epoch milliseconds in UTC. Done by hand because
/// arrow's cast needs the chrono-tz feature to understand the zone name "UTC".
/// Naive timestamps (no zone) are taken to be UTC, as pandas and DuckDB mean them.
fn timestamp_to_ms(array: &ArrayRef) -> Result<ArrayRef> {
    let ms: TimestampMillisecondArray = match array.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => {
            array.as_primitive::<TimestampSecondType>().try_unary(|v| {
                v.checked_mul(1000).ok_or_else(|| {
                    arrow::error::ArrowError::ComputeError(format!("{v}s overflows"))
                })
            })?
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => array
            .as_primitive::<TimestampMillisecondType>()
            .unary(|v| v),
        DataType::Timestamp(TimeUnit::Microsecond, _) => array
            .as_primitive::<TimestampMicrosecondType>()
            .unary(|v| v.div_euclid(1000)),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => array
            .as_primitive::<TimestampNanosecondType>()
            .unary(|v| v.div_euclid(1_000_000)),
        other => bail!("not a timestamp: {}", type_name(other)),
    };
    Ok(Arc::new(ms.with_timezone(CREATED_AT_TZ)))
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(item, true)))
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn list_item(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::List(f) | DataType::LargeList(f) => Some(f.data_type()),
        _ => None,
    }
}

/// A short lower-case type name in the style of docs/ARCHITECTURE.md's column table
/// (`utf8`, `list<int32>`, `timestamp(ms, UTC)`), so errors read like the spec.
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "utf8".into(),
        DataType::LargeUtf8 => "large_utf8".into(),
        DataType::Utf8View => "utf8_view".into(),
        DataType::Boolean => "bool".into(),
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Binary => "binary".into(),
        DataType::Timestamp(unit, tz) => {
            let unit = match unit {
                TimeUnit::Second => "s",
                TimeUnit::Millisecond => "ms",
                TimeUnit::Microsecond => "us",
                TimeUnit::Nanosecond => "ns",
            };
            match tz {
                Some(tz) => format!("timestamp({unit}, {tz})"),
                None => format!("timestamp({unit})"),
            }
        }
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        DataType::LargeList(f) => format!("large_list<{}>", type_name(f.data_type())),
        other => other.to_string().to_lowercase(),
    }
}
