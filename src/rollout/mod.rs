//! The `claw.rollout.v1` file format (docs/ARCHITECTURE.md, "Rollout schema" and
//! "Shared directory"), shared by every stage: the schema in one place, validation
//! with errors that name the file and column, streaming reads from files, globs and
//! stdin, atomic writes, and time-ordered segments for daemons.
//!
//! Stages work on Arrow record batches so columns they do not own (including ones
//! claw does not know) pass through untouched; [`RolloutRow`] is the typed view
//! for code that works row by row.

mod read;
mod row;
mod schema;
mod segment;
pub mod stream;
mod write;

pub use read::{
    expand_inputs, schema_tag, schema_tag_warning, FileBatches, Input, RolloutBatch, RolloutFile,
    RolloutReader, DEFAULT_BATCH_SIZE, STDIN_NAME,
};
pub use row::{rows_from_batch, rows_to_batch, RolloutRow};
pub use schema::{
    column, normalize_batch, schema, set_columns, type_name, validate_schema, Column, ColumnType,
    COLUMNS, CREATED_AT_TZ, SCHEMA_TAG, SCHEMA_TAG_KEY,
};
pub use segment::{
    parse_segment_file_name, segment_file_name, validate_writer_id, SegmentWriter,
    DEFAULT_SEGMENT_AGE, DEFAULT_SEGMENT_ROWS,
};
pub use write::RolloutWriter;

/// What a JSON value is ("a string", "an array", ...), for error messages about
/// the messages and fields that serve and import both check.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value as Json;
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
