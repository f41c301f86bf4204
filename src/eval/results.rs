//! The per-item results file of `claw eval --out`: Parquet (one row per item,
//! for `claw inspect`, DuckDB, pandas) or JSON (the report and the items).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{ArrayRef, BooleanArray, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{ItemResult, Outcome};
use crate::fsutil::write_output;

/// Writes `outcome` to `path`: `.parquet` or `.json` by extension.
pub fn write(path: &Path, outcome: &Outcome) -> Result<()> {
    let mut ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    // /dev/stdout, a FIFO: JSON unless named otherwise
    if ext.is_empty() && std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        ext = "json".into();
    }
    let bytes = match ext.as_str() {
        "parquet" => to_parquet(outcome)?,
        "json" => {
            let doc = serde_json::json!({"report": outcome.report, "items": outcome.items});
            let mut s = serde_json::to_vec_pretty(&doc)?;
            s.push(b'\n');
            s
        }
        _ => bail!("{}: --out must end in .parquet or .json", path.display()),
    };
    write_output(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The Arrow schema of the results file.
pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new("bench", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("sample", DataType::UInt32, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response", DataType::Utf8, false),
        Field::new("extracted", DataType::Utf8, true),
        Field::new("expected", DataType::Utf8, false),
        Field::new("correct", DataType::Boolean, true),
        Field::new("error", DataType::Utf8, true),
    ])
}

fn to_parquet(outcome: &Outcome) -> Result<Vec<u8>> {
    let items: &[ItemResult] = &outcome.items;
    let n = items.len();
    let strs = |f: &dyn Fn(&ItemResult) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(items.iter().map(f)))
    };
    let opt = |f: &dyn Fn(&ItemResult) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(items.iter().map(f).collect::<Vec<_>>()))
    };
    let bench = outcome.report.bench.name();
    let target = outcome.report.target.as_str();
    let schema = Arc::new(schema());
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(bench, n))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            target, n,
        ))),
        strs(&|i| &i.id),
        Arc::new(UInt32Array::from_iter_values(
            items.iter().map(|i| i.sample),
        )),
        strs(&|i| &i.prompt),
        strs(&|i| &i.response),
        opt(&|i| i.extracted.as_deref()),
        strs(&|i| &i.expected),
        Arc::new(BooleanArray::from(
            items.iter().map(|i| i.correct).collect::<Vec<_>>(),
        )),
        opt(&|i| i.error.as_deref()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(buf)
}
