//! Segments: a long-running writer's output as a series of small, complete files in
//! one directory (docs/ARCHITECTURE.md, "Rollout schema" and "Shared directory").
//! Parquet cannot be appended to, so a writer rolls to a new file every so many rows
//! or seconds; names sort by time so a watcher handles them in order.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;

use super::row::{rows_to_batch, RolloutRow};
use super::write::RolloutWriter;

/// Default rows per segment.
pub const DEFAULT_SEGMENT_ROWS: usize = 1024;
/// Default age after which an open segment is closed, so rows reach the next stage
/// promptly even when traffic is light.
pub const DEFAULT_SEGMENT_AGE: Duration = Duration::from_secs(5);

/// `<unix-ms, 13 digits>-<writer-id>-<seq, 6 digits>.parquet`: zero padding makes
/// the lexical order the time order (13 digits last until the year 2286), and the
/// writer id keeps concurrent writers from colliding.
pub fn segment_file_name(unix_ms: u64, writer_id: &str, seq: u64) -> String {
    format!("{unix_ms:013}-{writer_id}-{seq:06}.parquet")
}

/// Splits a segment name into `(unix_ms, writer_id, seq)`; `None` if the name
/// was not made by [`segment_file_name`] (a watcher ignores such files).
pub fn parse_segment_file_name(name: &str) -> Option<(u64, &str, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (ms, rest) = stem.split_once('-')?;
    let (writer_id, seq) = rest.rsplit_once('-')?;
    if ms.len() < 13 || seq.len() < 6 || writer_id.is_empty() {
        return None;
    }
    if !ms.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ms.parse().ok()?, writer_id, seq.parse().ok()?))
}

/// Checks a writer id is safe inside a file name: letters, digits, `_`, `.`, `-`.
pub fn validate_writer_id(writer_id: &str) -> Result<()> {
    let ok = !writer_id.is_empty()
        && !writer_id.starts_with('.')
        && writer_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        bail!("writer id `{writer_id}` must be non-empty and use only letters, digits, `_`, `.` and `-` (it goes into file names)");
    }
    Ok(())
}

struct OpenSegment {
    writer: RolloutWriter,
    opened: Instant,
    rows: usize,
}

/// Writes rows into a directory as a series of segments, each complete and
/// durable once renamed into place (see [`RolloutWriter`]). A segment is closed
/// when it reaches `max_rows`, or when it is older than `max_age` at the next
/// `write` or [`roll_if_due`](Self::roll_if_due) call (call that from a timer so
/// quiet periods still flush). Dropping the writer without [`finish`](Self::finish)
/// abandons the open segment (its `.tmp` is removed).
pub struct SegmentWriter {
    dir: PathBuf,
    writer_id: String,
    next_seq: u64,
    last_ms: u64,
    max_rows: usize,
    max_age: Duration,
    current: Option<OpenSegment>,
}

impl SegmentWriter {
    /// Segments go into `dir` (created if missing), named with `writer_id`.
    pub fn new(dir: impl Into<PathBuf>, writer_id: &str) -> Result<Self> {
        let dir = dir.into();
        validate_writer_id(writer_id)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        Ok(SegmentWriter {
            dir,
            writer_id: writer_id.to_string(),
            next_seq: 0,
            last_ms: 0,
            max_rows: DEFAULT_SEGMENT_ROWS,
            max_age: DEFAULT_SEGMENT_AGE,
            current: None,
        })
    }

    /// Rows per segment (default [`DEFAULT_SEGMENT_ROWS`]).
    pub fn with_max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.max(1);
        self
    }

    /// Age at which an open segment is closed (default [`DEFAULT_SEGMENT_AGE`]).
    pub fn with_max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The sequence number of the next segment (default 0); a restarted writer
    /// may continue its numbering.
    pub fn with_first_seq(mut self, seq: u64) -> Self {
        self.next_seq = seq;
        self
    }

    /// The directory segments go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rows in the open segment (not yet durable).
    pub fn pending_rows(&self) -> usize {
        self.current.as_ref().map_or(0, |s| s.rows)
    }

    /// Appends typed rows; returns the segments completed by this call.
    pub fn write_rows(&mut self, rows: &[RolloutRow]) -> Result<Vec<PathBuf>> {
        if rows.is_empty() {
            return self.roll_if_due().map(|p| p.into_iter().collect());
        }
        self.write(&rows_to_batch(rows)?)
    }

    /// Appends a batch, splitting it across segments as needed; returns the
    /// segments completed by this call, in order.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<Vec<PathBuf>> {
        let mut done: Vec<PathBuf> = self.roll_if_due()?.into_iter().collect();
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open()?;
            }
            let seg = self.current.as_mut().expect("segment was just opened");
            let take = (self.max_rows - seg.rows).min(batch.num_rows() - offset);
            seg.writer.write(&batch.slice(offset, take))?;
            seg.rows += take;
            offset += take;
            if seg.rows >= self.max_rows {
                done.extend(self.roll()?);
            }
        }
        Ok(done)
    }

    /// Closes the open segment if it is older than `max_age`.
    pub fn roll_if_due(&mut self) -> Result<Option<PathBuf>> {
        match &self.current {
            Some(seg) if seg.opened.elapsed() >= self.max_age => self.roll(),
            _ => Ok(None),
        }
    }

    /// Closes the open segment now (if any rows are pending) and returns its path.
    pub fn roll(&mut self) -> Result<Option<PathBuf>> {
        let Some(seg) = self.current.take() else {
            return Ok(None);
        };
        let path = seg.writer.path().map(Path::to_path_buf);
        seg.writer.finish()?;
        Ok(path)
    }

    /// Closes the open segment; call this on shutdown so no rows are lost.
    pub fn finish(mut self) -> Result<Option<PathBuf>> {
        self.roll()
    }

    fn open(&mut self) -> Result<()> {
        // Never go back in time, even if the clock does: names must keep sorting.
        let ms = (crate::clock::unix_ms().max(0) as u64).max(self.last_ms);
        self.last_ms = ms;
        let name = segment_file_name(ms, &self.writer_id, self.next_seq);
        self.next_seq += 1;
        let writer = RolloutWriter::file(self.dir.join(name))?;
        self.current = Some(OpenSegment {
            writer,
            opened: Instant::now(),
            rows: 0,
        });
        Ok(())
    }
}
