//! `claw inspect`: what is in a rollout file, without reading all of it.

use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use clap::Args;
use serde::ser::SerializeMap;
use serde::Serialize;
use serde_json::{json, Value};

use crate::rollout::{column, expand_inputs, type_name, Input, RolloutFile, SCHEMA_TAG_KEY};

const LONG_ABOUT: &str = "\
Show what is in rollout files: the schema (each column's type, nullability and
whether it is a claw.rollout.v1 column or an extra one), the claw.schema tag, the
row count (from the Parquet footer, without reading the rows) and the first few
rows with long texts and lists shortened.

Reads Parquet rollout files, glob patterns (quoted, e.g. 'DIR/judged/*.parquet'),
directories (their *.parquet files) or - for stdin. Writes a readable report to
stdout, or one JSON object with --json:
  {\"files\": [{\"path\", \"schema_tag\", \"rows\", \"columns\": [{\"name\", \"type\",
   \"nullable\", \"known\"}], \"head\": [{column: value, ...}]}]}
Files that are not Parquet, are truncated, or lack a required column (or have one
of the wrong type) are reported on stderr naming the file and column; the exit code
is then 1.

Example:
  claw inspect DIR/samples/*.parquet --rows 1
  claw collect DIR/raw | claw inspect - --json | jq '.files[0].rows'";

/// Show the schema, row count and first rows of rollout files.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT)]
pub struct InspectArgs {
    /// Rollout files, glob patterns, directories, or - for stdin.
    #[arg(value_name = "FILE", required = true)]
    pub inputs: Vec<String>,

    /// How many rows to show from each file (0 shows none).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rows: usize,

    /// Print one JSON object (for scripts) instead of the readable report.
    #[arg(long)]
    pub json: bool,
}

/// Longest string shown whole in the readable report.
const MAX_TEXT_CHARS: usize = 80;
/// Most list items shown in the readable report.
const MAX_LIST_ITEMS: usize = 8;

/// Reports every input; a bad input is reported and skipped so one broken file
/// does not hide what is in the others, but the command still fails.
pub fn run(args: InspectArgs) -> Result<()> {
    if args.inputs.iter().filter(|a| *a == "-").count() > 1 {
        anyhow::bail!("`-` (stdin) given more than once: stdin can only be read once");
    }
    let mut out = BufWriter::new(io::stdout().lock());
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    let mut inputs = Vec::new();
    for arg in &args.inputs {
        match expand_inputs(std::slice::from_ref(arg)) {
            Ok(found) => inputs.extend(found),
            Err(e) => errors.push(e),
        }
    }
    for (n, input) in inputs.iter().enumerate() {
        match inspect_one(input, args.rows) {
            Ok(report) if args.json => reports.push(report),
            Ok(report) => {
                if n > 0 {
                    writeln!(out)?;
                }
                write_text(&mut out, &report)?;
                out.flush()?;
            }
            Err(e) => errors.push(e),
        }
    }
    if args.json {
        let doc = JsonDoc {
            files: reports.iter().map(FileReport::to_json).collect(),
        };
        serde_json::to_writer_pretty(&mut out, &doc).context("writing JSON to stdout")?;
        writeln!(out)?;
    }
    out.flush()?;
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            for e in &errors {
                eprintln!("claw: error: {e:#}");
            }
            anyhow::bail!("{n} inputs could not be read")
        }
    }
}

struct ColumnInfo {
    name: String,
    ty: String,
    nullable: bool,
    /// "required", "optional" (claw columns) or "extra".
    kind: &'static str,
}

struct FileReport {
    path: String,
    schema_tag: Option<String>,
    rows: u64,
    columns: Vec<ColumnInfo>,
    head: Option<RecordBatch>,
}

// JSON output keeps file and column order (serde_json's `Value` maps are sorted),
// so these small types serialise it field by field.
#[derive(Serialize)]
struct JsonDoc<'a> {
    files: Vec<JsonFile<'a>>,
}

#[derive(Serialize)]
struct JsonFile<'a> {
    path: &'a str,
    schema_tag: Option<&'a str>,
    rows: u64,
    columns: Vec<JsonColumn<'a>>,
    head: Vec<JsonRow>,
}

#[derive(Serialize)]
struct JsonColumn<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    nullable: bool,
    known: bool,
}

/// One row as a JSON object whose keys follow the file's column order.
struct JsonRow(Vec<(String, Value)>);

impl Serialize for JsonRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl FileReport {
    fn to_json(&self) -> JsonFile<'_> {
        let columns = self
            .columns
            .iter()
            .map(|c| JsonColumn {
                name: &c.name,
                ty: &c.ty,
                nullable: c.nullable,
                known: c.kind != "extra",
            })
            .collect();
        let head = match &self.head {
            Some(batch) => (0..batch.num_rows())
                .map(|i| {
                    let schema = batch.schema();
                    JsonRow(
                        schema
                            .fields()
                            .iter()
                            .zip(batch.columns())
                            .map(|(f, c)| (f.name().clone(), json_value(c.as_ref(), i)))
                            .collect(),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        JsonFile {
            path: &self.path,
            schema_tag: self.schema_tag.as_deref(),
            rows: self.rows,
            columns,
            head,
        }
    }
}

fn inspect_one(input: &Input, head_rows: usize) -> Result<FileReport> {
    let file = RolloutFile::open(input)?;
    let columns = file
        .schema()
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            ty: type_name(f.data_type()),
            nullable: f.is_nullable(),
            kind: match column(f.name()) {
                Some(c) if c.required => "required",
                Some(_) => "optional",
                None => "extra",
            },
        })
        .collect();
    let head = if head_rows > 0 {
        file.batches(head_rows, Some(head_rows))?
            .next()
            .transpose()?
            .map(|b| b.into_batch())
    } else {
        None
    };
    Ok(FileReport {
        path: file.source().to_string(),
        schema_tag: file.schema_tag().map(str::to_string),
        rows: file.num_rows(),
        columns,
        head,
    })
}

fn write_text(out: &mut impl Write, r: &FileReport) -> Result<()> {
    writeln!(out, "{}", r.path)?;
    match &r.schema_tag {
        Some(tag) => writeln!(out, "  {SCHEMA_TAG_KEY}: {tag}")?,
        None => writeln!(out, "  {SCHEMA_TAG_KEY}: (missing: not written by claw)")?,
    }
    writeln!(out, "  rows: {}", r.rows)?;
    writeln!(out, "  columns ({}):", r.columns.len())?;
    let name_w = r.columns.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let ty_w = r.columns.iter().map(|c| c.ty.len()).max().unwrap_or(0);
    for c in &r.columns {
        let null = if c.nullable { "nullable" } else { "not null" };
        let kind = match c.kind {
            "extra" => "extra",
            "required" => "claw, required",
            _ => "claw",
        };
        writeln!(
            out,
            "    {:name_w$}  {:ty_w$}  {null:8}  {kind}",
            c.name, c.ty
        )?;
    }
    let Some(batch) = &r.head else {
        return Ok(());
    };
    if batch.num_rows() == 0 {
        return Ok(());
    }
    writeln!(out, "  first {} of {} rows:", batch.num_rows(), r.rows)?;
    let schema = batch.schema();
    let name_w = schema
        .fields()
        .iter()
        .map(|f| f.name().len())
        .max()
        .unwrap_or(0);
    for i in 0..batch.num_rows() {
        writeln!(out, "  row {}:", i + 1)?;
        let mut nulls = Vec::new();
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            if col.is_null(i) {
                nulls.push(field.name().as_str());
                continue;
            }
            let value = short_value(col.as_ref(), i);
            writeln!(out, "    {:name_w$}  {value}", field.name())?;
        }
        if !nulls.is_empty() {
            writeln!(out, "    (null: {})", nulls.join(", "))?;
        }
    }
    Ok(())
}

/// A one-line rendering of a value for people: long strings and lists shortened,
/// with their full size.
fn short_value(array: &dyn Array, i: usize) -> String {
    if array.is_null(i) {
        return "null".into();
    }
    match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            short_text(&string_at(array, i))
        }
        DataType::List(_) | DataType::LargeList(_) => {
            let items = list_at(array, i);
            let n = items.len();
            let shown: Vec<String> = (0..n.min(MAX_LIST_ITEMS))
                .map(|j| short_value(items.as_ref(), j))
                .collect();
            if n > MAX_LIST_ITEMS {
                format!("[{}, …] ({n} items)", shown.join(", "))
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
        _ => match json_value(array, i) {
            Value::String(s) => s,
            v => v.to_string(),
        },
    }
}

fn short_text(s: &str) -> String {
    let n = s.chars().count();
    if n <= MAX_TEXT_CHARS {
        return Value::String(s.to_string()).to_string();
    }
    let head: String = s.chars().take(MAX_TEXT_CHARS - 1).collect();
    format!("{}… ({n} chars)", Value::String(head))
}

fn string_at(array: &dyn Array, i: usize) -> String {
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => array.as_string_view().value(i).to_string(),
        _ => String::new(),
    }
}

fn list_at(array: &dyn Array, i: usize) -> arrow::array::ArrayRef {
    match array.data_type() {
        DataType::LargeList(_) => array.as_list::<i64>().value(i),
        _ => array.as_list::<i32>().value(i),
    }
}

/// A value as JSON, for any Arrow type a rollout file may hold (extra columns
/// included); types without a natural JSON form use Arrow's own display.
fn json_value(array: &dyn Array, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            json!(array.as_primitive::<$t>().value(i))
        };
    }
    match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            Value::String(string_at(array, i))
        }
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::Timestamp(unit, _) => {
            let ms = match unit {
                TimeUnit::Second => array
                    .as_primitive::<TimestampSecondType>()
                    .value(i)
                    .saturating_mul(1000),
                TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().value(i),
                TimeUnit::Microsecond => array
                    .as_primitive::<TimestampMicrosecondType>()
                    .value(i)
                    .div_euclid(1000),
                TimeUnit::Nanosecond => array
                    .as_primitive::<TimestampNanosecondType>()
                    .value(i)
                    .div_euclid(1_000_000),
            };
            Value::String(crate::date::format_utc_ms(ms))
        }
        DataType::List(_) | DataType::LargeList(_) => {
            let items = list_at(array, i);
            Value::Array(
                (0..items.len())
                    .map(|j| json_value(items.as_ref(), j))
                    .collect(),
            )
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), json_value(c.as_ref(), i)))
                    .collect(),
            )
        }
        _ => match ArrayFormatter::try_new(array, &FormatOptions::default()) {
            Ok(f) => Value::String(f.value(i).to_string()),
            Err(_) => Value::String(format!("<{}>", type_name(array.data_type()))),
        },
    }
}

/// JSON has no NaN or infinity; keep them visible as strings rather than null.
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or_else(|| Value::String(x.to_string()), Value::Number)
}
