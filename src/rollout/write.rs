//! [`RolloutWriter`]: one rollout file (atomically renamed into place; written
//! in place when the path is a device or a FIFO) or a stream on stdout.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory,
};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use rayon::prelude::*;

use super::row::{rows_to_batch, RolloutRow};
use super::schema::{
    column, normalize_batch, schema, type_name, validate_schema, SCHEMA_TAG, SCHEMA_TAG_KEY,
};
use crate::fsutil::{open_in_place, sync_parent_dir, tmp_path};

/// Rows per Parquet row group at most. Readers hold a row group's column chunks
/// in memory, so groups stay bounded in rows and in bytes.
const MAX_ROW_GROUP_ROWS: usize = 64 * 1024;
const MAX_ROW_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Text columns written without dictionary encoding or statistics (nearly every
/// value is distinct, and long); list columns neither.
const NO_DICTIONARY: [&str; 9] = [
    "messages_json",
    "tools_json",
    "prompt_text",
    "response_text",
    "tool_calls_json",
    "next_state_text",
    "judge_raw",
    "hint",
    "hint_candidates_json",
];

enum Target {
    /// Written to `tmp`, renamed to `path` by `finish`.
    File {
        path: PathBuf,
        tmp: PathBuf,
    },
    /// An existing device or FIFO (/dev/null, a named pipe): written in place,
    /// as one Parquet file.
    InPlace {
        path: PathBuf,
    },
    Stdout,
}

enum Sink {
    File(File),
    Stdout(io::Stdout),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Stdout(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Stdout(s) => s.flush(),
        }
    }
}

/// Writes one rollout file: Parquet, zstd, tagged `claw.schema = claw.rollout.v1`.
///
/// The output schema is taken from the first batch, so a stage can add its columns
/// to the batches it read (keeping any unknown ones) and write them straight back.
/// A file target is written as `NAME.tmp` and only renamed to `NAME` by
/// [`finish`](Self::finish) after an fsync, so a reader (or a daemon after a crash)
/// never sees a partial file; dropping the writer without `finish` removes the
/// `.tmp`. Stdout streams as it goes (parquet buffers internally).
pub struct RolloutWriter {
    target: Target,
    /// The opened destination, until the first batch fixes the schema.
    sink: Option<Sink>,
    writer: Option<Encoder>,
    schema: Option<SchemaRef>,
    rows: u64,
    /// Stdout is a pipe: end a Parquet segment after every batch so the next
    /// stage can start on it (see [`super::stream`]).
    segments: bool,
}

impl RolloutWriter {
    /// `-` means stdout, anything else a file path (the usual `-o` convention).
    pub fn create(dest: &str) -> Result<Self> {
        if dest == "-" {
            Self::stdout()
        } else {
            Self::file(dest)
        }
    }

    /// A file written atomically at `path` (see the type docs); a path that
    /// names a device or a FIFO is written in place instead.
    pub fn file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(file) = open_in_place(&path)? {
            return Ok(RolloutWriter {
                target: Target::InPlace { path },
                sink: Some(Sink::File(file)),
                writer: None,
                schema: None,
                rows: 0,
                segments: false,
            });
        }
        let tmp = tmp_path(&path);
        let file =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(RolloutWriter {
            target: Target::File { path, tmp },
            sink: Some(Sink::File(file)),
            writer: None,
            schema: None,
            rows: 0,
            segments: false,
        })
    }

    /// A stream on stdout, for pipelines. Refuses a terminal: binary Parquet there
    /// helps nobody and garbles the screen.
    pub fn stdout() -> Result<Self> {
        let stdout = io::stdout();
        if stdout.is_terminal() {
            bail!("refusing to write binary Parquet to a terminal: pipe stdout into another command, redirect it, or use -o FILE");
        }
        let segments = stdout_is_pipe();
        Ok(RolloutWriter {
            target: Target::Stdout,
            sink: Some(Sink::Stdout(stdout)),
            writer: None,
            schema: None,
            rows: 0,
            segments,
        })
    }

    /// The final path of a file target (`None` for stdout).
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::File { path, .. } | Target::InPlace { path } => Some(path),
            Target::Stdout => None,
        }
    }

    /// The destination's name for messages.
    pub fn name(&self) -> String {
        self.path()
            .map_or_else(|| "<stdout>".to_string(), |p| p.display().to_string())
    }

    /// The output schema, once the first batch has fixed it.
    pub fn schema(&self) -> Option<&SchemaRef> {
        self.schema.as_ref()
    }

    /// Rows written so far.
    pub fn rows_written(&self) -> u64 {
        self.rows
    }

    /// Appends typed rows (canonical columns only).
    pub fn write_rows(&mut self, rows: &[RolloutRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = rows_to_batch(rows)?;
        self.write(&batch)
    }

    /// Appends a batch. The first batch fixes the output columns; later batches
    /// must have the same columns and types (metadata and nullability may differ).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let name = self.name();
        let batch = normalize_batch(batch, &name)?;
        if self.writer.is_none() {
            let schema = match &self.schema {
                Some(s) => s.clone(), // later segments of a stream keep the first schema
                None => output_schema(&batch.schema()),
            };
            self.open(schema)?;
        }
        let schema = self
            .schema
            .clone()
            .expect("schema is set when the writer opens");
        let conformed = conform(&batch, &schema, &name)?;
        let writer = self.writer.as_mut().expect("writer was just opened");
        writer
            .write(&conformed)
            .with_context(|| format!("{name}: writing rows"))?;
        self.rows += conformed.num_rows() as u64;
        if self.segments {
            self.end_segment()?;
        }
        Ok(())
    }

    /// Finishes the current Parquet file on the pipe and flushes it, so the
    /// reader at the other end can use it now.
    fn end_segment(&mut self) -> Result<()> {
        let name = self.name();
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let mut sink = writer
            .into_inner()
            .with_context(|| format!("{name}: writing the Parquet footer"))?;
        sink.flush().with_context(|| format!("{name}: flush"))?;
        self.sink = Some(sink);
        Ok(())
    }

    fn open(&mut self, schema: SchemaRef) -> Result<()> {
        let name = self.name();
        validate_schema(&schema, &name)?;
        let sink = self
            .sink
            .take()
            .ok_or_else(|| anyhow!("{name}: writer already closed"))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                SCHEMA_TAG_KEY.to_string(),
                SCHEMA_TAG.to_string(),
            )]));
        // Dictionary encoding hashes every value: for token ids, log-probs and long
        // texts that halves write throughput for a few % of file size (zstd finds
        // the repeats anyway). Short repetitive columns (session_id, model, ...)
        // keep it. Min/max statistics of those columns serve no query and cost
        // comparisons of kilobyte strings (and footer space): off too. Measured in
        // BENCHMARKS.md (claw collect).
        let leaves = ArrowSchemaConverter::new()
            .convert(&schema)
            .with_context(|| format!("{name}: converting the schema to Parquet"))?;
        for leaf in leaves.columns() {
            let root = leaf.path().parts().first().map(String::as_str);
            if leaf.max_rep_level() > 0 || root.is_some_and(|r| NO_DICTIONARY.contains(&r)) {
                props = props
                    .set_column_dictionary_enabled(leaf.path().clone(), false)
                    .set_column_statistics_enabled(leaf.path().clone(), EnabledStatistics::None);
            }
        }
        let props = props.build();
        let writer = Encoder::new(sink, schema.clone(), props)
            .with_context(|| format!("{name}: starting the Parquet writer"))?;
        self.writer = Some(writer);
        self.schema = Some(schema);
        Ok(())
    }

    /// Writes the footer and makes the output durable: for a file, fsyncs it,
    /// renames `NAME.tmp` to `NAME` and fsyncs the directory, so once this returns
    /// the file survives a crash. With no rows written, the result is a valid empty
    /// rollout with the canonical schema. Returns the number of rows written.
    pub fn finish(mut self) -> Result<u64> {
        let name = self.name();
        if self.segments && self.rows > 0 {
            // Every segment is already complete and flushed.
            self.end_segment()?;
            self.target = Target::Stdout;
            return Ok(self.rows);
        }
        if self.writer.is_none() {
            self.open(schema())?;
        }
        let writer = self.writer.take().expect("writer is open");
        let sink = writer
            .into_inner()
            .with_context(|| format!("{name}: writing the Parquet footer"))?;
        match (sink, &self.target) {
            (Sink::File(file), Target::File { path, tmp }) => {
                file.sync_all()
                    .with_context(|| format!("{}: fsync", tmp.display()))?;
                drop(file);
                std::fs::rename(tmp, path)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
                sync_parent_dir(path)?;
            }
            // a device or FIFO: written through, nothing to rename (and fsync
            // means nothing there)
            (mut sink, _) => sink.flush().with_context(|| format!("{name}: flush"))?,
        }
        // Nothing left to clean up in Drop.
        self.target = Target::Stdout;
        Ok(self.rows)
    }
}

impl Drop for RolloutWriter {
    fn drop(&mut self) {
        if let Target::File { tmp, .. } = &self.target {
            // Close the handle first, then remove the partial file; errors are moot
            // here (the caller is already unwinding or abandoning the output).
            self.writer = None;
            self.sink = None;
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Batches with fewer rows are encoded on the calling thread: serve's recorder
/// writes a few rows at a time and should not wake the thread pool the model uses.
const PARALLEL_MIN_ROWS: usize = 1024;

/// One Parquet file being encoded, a row group at a time. The columns of a large
/// batch are encoded in parallel (rayon): zstd-compressing the few wide columns
/// (messages, prompt text, token ids) is most of the time a write takes, and
/// ArrowWriter encodes them one after the other.
struct Encoder {
    file: SerializedFileWriter<Sink>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The open row group's column writers (one per leaf column).
    group: Option<Vec<ArrowColumnWriter>>,
    group_rows: usize,
    groups: usize,
}

impl Encoder {
    fn new(sink: Sink, schema: SchemaRef, props: WriterProperties) -> Result<Self> {
        // ArrowWriter sets up the file (footer metadata with the Arrow schema);
        // its lower-level halves are then driven column by column.
        let (file, factory) =
            ArrowWriter::try_new(sink, schema.clone(), Some(props))?.into_serialized_writer()?;
        Ok(Encoder {
            file,
            factory,
            schema,
            group: None,
            group_rows: 0,
            groups: 0,
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (MAX_ROW_GROUP_ROWS - self.group_rows).min(batch.num_rows() - offset);
            self.write_part(&batch.slice(offset, take))?;
            offset += take;
            let bytes: usize = self
                .group
                .iter()
                .flatten()
                .map(ArrowColumnWriter::get_estimated_total_bytes)
                .sum();
            if self.group_rows >= MAX_ROW_GROUP_ROWS || bytes >= MAX_ROW_GROUP_BYTES {
                self.flush_group()?;
            }
        }
        Ok(())
    }

    fn write_part(&mut self, part: &RecordBatch) -> Result<()> {
        if self.group.is_none() {
            self.group = Some(self.factory.create_column_writers(self.groups)?);
        }
        let writers = self.group.as_mut().expect("the row group was just opened");
        let mut leaves = Vec::with_capacity(writers.len());
        for (field, column) in self.schema.fields().iter().zip(part.columns()) {
            leaves.extend(compute_leaves(field, column)?);
        }
        if part.num_rows() >= PARALLEL_MIN_ROWS {
            writers
                .par_iter_mut()
                .zip(leaves.par_iter())
                .try_for_each(|(w, leaf)| w.write(leaf))?;
        } else {
            for (w, leaf) in writers.iter_mut().zip(&leaves) {
                w.write(leaf)?;
            }
        }
        self.group_rows += part.num_rows();
        Ok(())
    }

    /// Finishes the open row group (its last pages are compressed in parallel too).
    fn flush_group(&mut self) -> Result<()> {
        let Some(writers) = self.group.take() else {
            return Ok(());
        };
        let chunks: Vec<ArrowColumnChunk> = writers
            .into_par_iter()
            .map(ArrowColumnWriter::close)
            .collect::<Result<_, _>>()?;
        let mut row_group = self.file.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        self.groups += 1;
        self.group_rows = 0;
        Ok(())
    }

    /// Writes the last row group and the footer; returns the sink.
    fn into_inner(mut self) -> Result<Sink> {
        self.flush_group()?;
        Ok(self.file.into_inner()?)
    }
}

/// Whether stdout is a pipe (FIFO) rather than a file or a socket.
fn stdout_is_pipe() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.file_type().is_fifo())
}

/// The first batch's schema as the file's schema: tagged, and with required claw
/// columns marked non-null (the batch was checked to hold no nulls there), so the
/// output is canonical even when the input came from a tool that marks every
/// column nullable.
fn output_schema(first: &Schema) -> SchemaRef {
    let fields: Vec<FieldRef> = first
        .fields()
        .iter()
        .map(|f| match column(f.name()) {
            Some(c) if c.required && f.is_nullable() => {
                Arc::new(Field::clone(f).with_nullable(false))
            }
            _ => f.clone(),
        })
        .collect();
    let mut metadata = first.metadata().clone();
    metadata.insert(SCHEMA_TAG_KEY.to_string(), SCHEMA_TAG.to_string());
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Rebuilds `batch` on the writer's schema, or explains how they differ.
fn conform(batch: &RecordBatch, schema: &SchemaRef, name: &str) -> Result<RecordBatch> {
    let found = batch.schema();
    if Arc::ptr_eq(&found, schema) {
        return Ok(batch.clone());
    }
    let names =
        |s: &Schema| -> Vec<String> { s.fields().iter().map(|f| f.name().clone()).collect() };
    if names(&found) != names(schema) {
        let want = names(schema);
        let got = names(&found);
        let missing: Vec<&String> = want.iter().filter(|n| !got.contains(n)).collect();
        let extra: Vec<&String> = got.iter().filter(|n| !want.contains(n)).collect();
        bail!(
            "{name}: a batch's columns differ from the first batch's (which fixed the output schema): missing {missing:?}, extra {extra:?}{}",
            if missing.is_empty() && extra.is_empty() { " (same columns, different order)" } else { "" }
        );
    }
    for (want, got) in schema.fields().iter().zip(found.fields()) {
        if want.data_type() != got.data_type() {
            bail!(
                "{name}: column `{}` is {} in this batch but {} in the first batch (which fixed the output schema)",
                want.name(),
                type_name(got.data_type()),
                type_name(want.data_type())
            );
        }
    }
    RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
        .with_context(|| format!("{name}: batch does not fit the output schema"))
}
