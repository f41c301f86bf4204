//! Reading rollout files: inputs (paths, globs, `-`), one file's footer and
//! batches, and [`RolloutReader`] streaming over many inputs.
//!
//! Everything streams one record batch at a time through parquet's
//! `ParquetRecordBatchReader`. Stdin is read one Parquet segment at a time (see
//! [`super::stream`]): each is buffered whole, because Parquet keeps its index in
//! a footer at the end and a pipe cannot seek.

use std::collections::VecDeque;
use std::fs::File;
use std::io::IsTerminal;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::file::metadata::ParquetMetaData;

use super::row::{rows_from_batch_at, RolloutRow};
use super::schema::{normalize_batch_at, validate_schema, SCHEMA_TAG, SCHEMA_TAG_KEY};
use super::stream::SegmentSplitter;

/// Rows per record batch when reading. Rollout rows carry whole prompts and token
/// lists (kilobytes each), so batches stay small enough to bound memory while
/// still amortising per-batch overhead.
pub const DEFAULT_BATCH_SIZE: usize = 1024;

/// The name errors and `claw inspect` use for standard input.
pub const STDIN_NAME: &str = "<stdin>";

/// One resolved input: a file on disk or standard input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Path(PathBuf),
    Stdin,
}

impl Input {
    /// The name to show in messages.
    pub fn name(&self) -> String {
        match self {
            Input::Path(p) => p.display().to_string(),
            Input::Stdin => STDIN_NAME.to_string(),
        }
    }
}

/// Resolves command-line inputs into files, in order: `-` is stdin (at most once),
/// a pattern with `*`, `?` or `[` that is not an existing file is a glob (sorted,
/// must match something), a directory means its `*.parquet` files (sorted; so
/// `claw inspect DIR/judged` works and `.parquet.tmp` files in flight are skipped),
/// anything else is a file that must exist. An empty list means stdin, so stages
/// compose in a pipeline without a `-`.
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<Input>> {
    if inputs.is_empty() {
        return Ok(vec![Input::Stdin]);
    }
    let mut out = Vec::new();
    let mut saw_stdin = false;
    for arg in inputs {
        if arg == "-" {
            if saw_stdin {
                bail!("`-` (stdin) given more than once: stdin can only be read once");
            }
            saw_stdin = true;
            out.push(Input::Stdin);
            continue;
        }
        let path = Path::new(arg);
        if path.is_dir() {
            let pattern = path.join("*.parquet");
            let found = glob_files(&pattern.to_string_lossy())
                .with_context(|| format!("{arg}: listing the directory"))?;
            out.extend(found.into_iter().map(Input::Path));
            continue;
        }
        if !path.exists() && arg.contains(['*', '?', '[']) {
            let found = glob_files(arg)?;
            if found.is_empty() {
                bail!("{arg}: no files match this pattern");
            }
            out.extend(found.into_iter().map(Input::Path));
            continue;
        }
        if !path.exists() {
            bail!("{arg}: no such file");
        }
        out.push(Input::Path(path.to_path_buf()));
    }
    Ok(out)
}

fn glob_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let paths =
        glob::glob(pattern).with_context(|| format!("{pattern}: not a valid glob pattern"))?;
    let mut files = Vec::new();
    for entry in paths {
        let path = entry.with_context(|| format!("{pattern}: reading a matching path"))?;
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The `claw.schema` value in a Parquet footer's key-value metadata, if any.
pub fn schema_tag(meta: &ParquetMetaData) -> Option<String> {
    meta.file_metadata()
        .key_value_metadata()?
        .iter()
        .find(|kv| kv.key == SCHEMA_TAG_KEY)
        .and_then(|kv| kv.value.clone())
}

/// A warning to show for a file whose `claw.schema` tag is missing or different.
/// Not an error: files written by DuckDB, pyarrow or pandas carry no tag but are
/// fine rollouts when their columns validate.
pub fn schema_tag_warning(tag: Option<&str>, source: &str) -> Option<String> {
    match tag {
        Some(SCHEMA_TAG) => None,
        Some(other) => Some(format!(
            "{source}: {SCHEMA_TAG_KEY} is `{other}`, reading it as {SCHEMA_TAG}"
        )),
        None => Some(format!(
            "{source}: no {SCHEMA_TAG_KEY} tag (not written by claw); reading it as {SCHEMA_TAG} since its columns match"
        )),
    }
}

/// Stdin, unless it is a terminal (nobody types Parquet).
fn stdin_checked() -> Result<std::io::Stdin> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("`-` means read a rollout from stdin, but stdin is a terminal: pipe a file in or name it");
    }
    Ok(stdin)
}

/// The bytes behind an open file: a file handle (read lazily, with seeks) or the
/// buffered contents of stdin.
enum Data {
    File(File),
    Bytes(Bytes),
}

/// One opened rollout file: its footer is parsed and its schema validated, but no
/// row data has been read yet. Cheap to keep around; `claw inspect` uses it to
/// show the schema and row count without reading rows.
pub struct RolloutFile {
    source: Arc<str>,
    data: Data,
    meta: ArrowReaderMetadata,
    tag: Option<String>,
}

impl RolloutFile {
    /// Opens `input`, parses the Parquet footer and validates the schema.
    pub fn open(input: &Input) -> Result<Self> {
        match input {
            Input::Path(path) => Self::open_path(path),
            Input::Stdin => {
                let mut segments = SegmentSplitter::new(stdin_checked()?, STDIN_NAME);
                let first = segments.next_segment()?.with_context(|| {
                    format!("{STDIN_NAME}: empty input (expected a Parquet rollout)")
                })?;
                if segments.next_segment()?.is_some() {
                    bail!(
                        "{STDIN_NAME}: holds several Parquet segments (a claw pipe stream); \
                         this command reads one file: write the stream to a file with -o, \
                         or read it with a stage (judge, distill-hints, train)"
                    );
                }
                Self::from_bytes(first, STDIN_NAME)
            }
        }
    }

    /// Opens a file on disk.
    pub fn open_path(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let file = File::open(path).with_context(|| format!("{source}: cannot open"))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| not_parquet(&source, e))?;
        Self::new(source, Data::File(file), meta)
    }

    /// Opens a rollout held in memory (stdin, or bytes from elsewhere); `source`
    /// names it in errors.
    pub fn from_bytes(bytes: Bytes, source: &str) -> Result<Self> {
        let meta = ArrowReaderMetadata::load(&bytes, ArrowReaderOptions::new())
            .map_err(|e| not_parquet(source, e))?;
        Self::new(source.to_string(), Data::Bytes(bytes), meta)
    }

    fn new(source: String, data: Data, meta: ArrowReaderMetadata) -> Result<Self> {
        validate_schema(meta.schema(), &source)?;
        let tag = schema_tag(meta.metadata());
        Ok(RolloutFile {
            source: source.into(),
            data,
            meta,
            tag,
        })
    }

    /// The file name used in messages (`<stdin>` for stdin).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The Arrow schema as stored in the file, extra columns included (types as
    /// written; batches are normalised to the claw types when read).
    pub fn schema(&self) -> &SchemaRef {
        self.meta.schema()
    }

    /// The `claw.schema` tag from the footer, if any.
    pub fn schema_tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// See [`schema_tag_warning`].
    pub fn schema_tag_warning(&self) -> Option<String> {
        schema_tag_warning(self.schema_tag(), &self.source)
    }

    /// Row count from the footer: free, no data pages are read.
    pub fn num_rows(&self) -> u64 {
        self.meta.metadata().file_metadata().num_rows().max(0) as u64
    }

    /// The raw Parquet footer, for callers that want row groups or statistics.
    pub fn parquet_metadata(&self) -> &Arc<ParquetMetaData> {
        self.meta.metadata()
    }

    /// Streams the file's rows, `batch_size` at a time, at most `limit` rows in all.
    pub fn batches(&self, batch_size: usize, limit: Option<usize>) -> Result<FileBatches> {
        let batch_size = batch_size.max(1);
        let reader = match &self.data {
            Data::File(file) => {
                // parquet seeks before every read, so a handle sharing the offset is fine.
                let file = file
                    .try_clone()
                    .with_context(|| format!("{}: reopening", self.source))?;
                let mut b =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
                        .with_batch_size(batch_size);
                if let Some(limit) = limit {
                    b = b.with_limit(limit);
                }
                b.build()
            }
            Data::Bytes(bytes) => {
                let mut b = ParquetRecordBatchReaderBuilder::new_with_metadata(
                    bytes.clone(),
                    self.meta.clone(),
                )
                .with_batch_size(batch_size);
                if let Some(limit) = limit {
                    b = b.with_limit(limit);
                }
                b.build()
            }
        }
        .with_context(|| format!("{}: preparing to read", self.source))?;
        Ok(FileBatches {
            source: self.source.clone(),
            inner: reader,
            next_row: 0,
        })
    }
}

fn not_parquet(source: &str, err: parquet::errors::ParquetError) -> anyhow::Error {
    anyhow!("{source}: not a readable Parquet file (not Parquet, or truncated): {err}")
}

/// A record batch together with where it came from, so a stage can name the file
/// and row in any error about its contents.
#[derive(Clone, Debug)]
pub struct RolloutBatch {
    /// File name (or `<stdin>`).
    pub source: Arc<str>,
    /// 0-based index in its file of the batch's first row.
    pub first_row: u64,
    /// All the file's columns, extra ones included; claw columns have their exact
    /// canonical types and required ones hold no nulls.
    pub batch: RecordBatch,
}

impl RolloutBatch {
    /// The claw columns as typed rows; errors name the file and the row.
    pub fn rows(&self) -> Result<Vec<RolloutRow>> {
        rows_from_batch_at(&self.batch, &self.source, self.first_row)
    }

    /// Drops the provenance and returns the plain Arrow batch.
    pub fn into_batch(self) -> RecordBatch {
        self.batch
    }
}

impl Deref for RolloutBatch {
    type Target = RecordBatch;
    fn deref(&self) -> &RecordBatch {
        &self.batch
    }
}

/// The batches of one file. See [`RolloutFile::batches`].
pub struct FileBatches {
    source: Arc<str>,
    inner: ParquetRecordBatchReader,
    next_row: u64,
}

impl Iterator for FileBatches {
    type Item = Result<RolloutBatch>;

    fn next(&mut self) -> Option<Result<RolloutBatch>> {
        let batch = match self.inner.next()? {
            Ok(b) => b,
            Err(e) => {
                return Some(Err(anyhow!(
                    "{}: reading rows after row {}: {e}",
                    self.source,
                    self.next_row
                )))
            }
        };
        let first_row = self.next_row;
        self.next_row += batch.num_rows() as u64;
        Some(
            normalize_batch_at(&batch, &self.source, first_row).map(|batch| RolloutBatch {
                source: self.source.clone(),
                first_row,
                batch,
            }),
        )
    }
}

/// Streams rollout batches from a list of inputs (files, globs, directories, `-`),
/// one file after another and one batch at a time, so memory stays bounded however
/// large the inputs are.
///
/// Each file's schema is validated when it is opened; a file without the
/// `claw.schema` tag gets a warning on stderr, not an error. After an error the
/// reader moves on to the next file, so a caller that wants to skip bad files
/// (a daemon quarantining them) can keep iterating; one that stops at the first
/// error just uses `?`.
pub struct RolloutReader {
    pending: VecDeque<Input>,
    current: Option<FileBatches>,
    /// Stdin, read segment by segment as they arrive.
    stdin: Option<SegmentSplitter<std::io::Stdin>>,
    stdin_segments: usize,
    batch_size: usize,
}

impl RolloutReader {
    /// Resolves `inputs` (see [`expand_inputs`]); files are opened lazily.
    pub fn new(inputs: &[String]) -> Result<Self> {
        Ok(Self::from_inputs(expand_inputs(inputs)?))
    }

    /// A reader over inputs that are already resolved.
    pub fn from_inputs(inputs: Vec<Input>) -> Self {
        RolloutReader {
            pending: inputs.into(),
            current: None,
            stdin: None,
            stdin_segments: 0,
            batch_size: DEFAULT_BATCH_SIZE,
        }
    }

    /// Rows per batch (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Reads every remaining row into memory: for tests and small inputs only;
    /// stages should iterate batches instead.
    pub fn read_all_rows(self) -> Result<Vec<RolloutRow>> {
        let mut rows = Vec::new();
        for batch in self {
            rows.extend(batch?.rows()?);
        }
        Ok(rows)
    }
}

impl Iterator for RolloutReader {
    type Item = Result<RolloutBatch>;

    fn next(&mut self) -> Option<Result<RolloutBatch>> {
        loop {
            if let Some(current) = &mut self.current {
                match current.next() {
                    Some(Ok(batch)) => return Some(Ok(batch)),
                    Some(Err(e)) => {
                        self.current = None;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            if let Some(stream) = &mut self.stdin {
                match stream.next_segment() {
                    Ok(Some(bytes)) => {
                        self.stdin_segments += 1;
                        let name = match self.stdin_segments {
                            1 => STDIN_NAME.to_string(),
                            n => format!("{STDIN_NAME} segment {n}"),
                        };
                        let opened = RolloutFile::from_bytes(bytes, &name)
                            .and_then(|file| file.batches(self.batch_size, None));
                        match opened {
                            Ok(batches) => {
                                self.current = Some(batches);
                                continue;
                            }
                            Err(e) => return Some(Err(e)),
                        }
                    }
                    Ok(None) => {
                        self.stdin = None;
                        if self.stdin_segments == 0 {
                            return Some(Err(anyhow!(
                                "{STDIN_NAME}: empty input (expected a Parquet rollout)"
                            )));
                        }
                    }
                    Err(e) => {
                        self.stdin = None;
                        return Some(Err(e));
                    }
                }
            }
            let input = self.pending.pop_front()?;
            if input == Input::Stdin {
                match stdin_checked() {
                    Ok(stdin) => self.stdin = Some(SegmentSplitter::new(stdin, STDIN_NAME)),
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let opened = RolloutFile::open(&input).and_then(|file| {
                if let Some(warning) = file.schema_tag_warning() {
                    crate::warn!("{warning}");
                }
                file.batches(self.batch_size, None)
            });
            match opened {
                Ok(batches) => self.current = Some(batches),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
