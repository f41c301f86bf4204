//! Rollouts through a pipe, as they are produced.
//!
//! Parquet keeps its index in a footer, so one Parquet file cannot be read
//! until its writer has finished it. Between claw stages a pipe therefore
//! carries a *stream of segments*: complete Parquet files written back to back,
//! one per batch the producer writes (`claw judge | claw train` trains on the
//! first judged rows while later ones are still being judged). A single file is
//! the one-segment case, so `claw train < file.parquet` works the same.
//!
//! A reader finds the end of a segment without help from the writer: a Parquet
//! file ends with a 4-byte footer length and the magic `PAR1`, and its footer is
//! a Thrift structure that must decode and whose column chunks must lie inside
//! the segment. A `PAR1` inside compressed data passing all of that by chance
//! is not a practical concern.

use std::io::Read;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use parquet::file::metadata::ParquetMetaDataReader;

const MAGIC: &[u8; 4] = b"PAR1";
/// Magic at the start, footer length and magic at the end.
const MIN_FILE: usize = 12;

/// Splits a byte stream of concatenated Parquet files into whole files, as soon
/// as each one is complete.
pub struct SegmentSplitter<R> {
    source: R,
    name: String,
    buf: Vec<u8>,
    /// Positions before this were already checked for a segment end.
    scanned: usize,
    eof: bool,
}

impl<R: Read> SegmentSplitter<R> {
    pub fn new(source: R, name: &str) -> Self {
        Self {
            source,
            name: name.to_string(),
            buf: Vec::new(),
            scanned: 0,
            eof: false,
        }
    }

    /// The next whole segment, blocking until it is complete; None at the end
    /// of the stream. A stream that ends inside a segment is an error.
    pub fn next_segment(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(end) = self.find_end()? {
                let rest = self.buf.split_off(end);
                let segment = std::mem::replace(&mut self.buf, rest);
                self.scanned = 0;
                return Ok(Some(Bytes::from(segment)));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!(
                    "{}: the stream ends inside a Parquet file ({} bytes after the last complete one): \
                     the writer stopped early, or this is not a rollout",
                    self.name,
                    self.buf.len()
                );
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = vec![0u8; 256 * 1024];
        let n = loop {
            match self.source.read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("{}: reading", self.name)),
            }
        };
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The end offset of the first complete segment in the buffer, if any.
    fn find_end(&mut self) -> Result<Option<usize>> {
        if self.buf.len() >= 4 && &self.buf[..4] != MAGIC {
            bail!(
                "{}: not a Parquet rollout (it does not start with PAR1)",
                self.name
            );
        }
        let from = self.scanned.max(MIN_FILE);
        for end in from..=self.buf.len() {
            if &self.buf[end - 4..end] == MAGIC && is_file_end(&self.buf[..end]) {
                return Ok(Some(end));
            }
        }
        self.scanned = self.buf.len() + 1;
        Ok(None)
    }
}

/// Whether `data` (starting with PAR1 and ending with PAR1) is exactly one
/// Parquet file: its footer decodes and its column chunks lie inside it.
fn is_file_end(data: &[u8]) -> bool {
    let n = data.len();
    let footer_len =
        u32::from_le_bytes([data[n - 8], data[n - 7], data[n - 6], data[n - 5]]) as usize;
    let Some(footer_start) = n.checked_sub(8 + footer_len) else {
        return false;
    };
    if footer_start < 4 {
        return false;
    }
    let Ok(meta) = ParquetMetaDataReader::decode_metadata(&data[footer_start..n - 8]) else {
        return false;
    };
    meta.row_groups().iter().all(|rg| {
        rg.columns().iter().all(|c| {
            let (start, len) = c.byte_range();
            start >= 4 && (start + len) as usize <= footer_start
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{RolloutRow, RolloutWriter};

    fn file_bytes(rows: usize, tag: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.parquet");
        let mut w = RolloutWriter::file(&path).unwrap();
        let rows: Vec<RolloutRow> = (0..rows)
            .map(|i| RolloutRow {
                sample_id: format!("{tag}{i}"),
                session_id: "s".into(),
                turn_type: "main".into(),
                model: "m".into(),
                messages_json: "[]".into(),
                token_source: "engine".into(),
                finish_reason: "stop".into(),
                response_text: "PAR1".repeat(50),
                ..Default::default()
            })
            .collect();
        w.write_rows(&rows).unwrap();
        w.finish().unwrap();
        std::fs::read(path).unwrap()
    }

    /// A reader that hands out a few bytes at a time, like a slow pipe.
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(7).min(self.0.len() - self.1);
            out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn splits_concatenated_files_read_in_small_pieces() {
        let (a, b) = (file_bytes(3, "a"), file_bytes(5, "b"));
        let stream = [a.clone(), b.clone()].concat();
        let mut splitter = SegmentSplitter::new(Trickle(stream, 0), "<test>");
        assert_eq!(splitter.next_segment().unwrap().unwrap().as_ref(), &a[..]);
        assert_eq!(splitter.next_segment().unwrap().unwrap().as_ref(), &b[..]);
        assert!(splitter.next_segment().unwrap().is_none());
    }

    #[test]
    fn truncated_and_foreign_streams_are_errors() {
        let a = file_bytes(2, "a");
        let mut splitter = SegmentSplitter::new(&a[..a.len() - 3], "<test>");
        let err = splitter.next_segment().unwrap_err().to_string();
        assert!(err.contains("ends inside a Parquet file"), "{err}");
        let mut splitter = SegmentSplitter::new(&b"hello world, not parquet"[..], "<test>");
        assert!(splitter.next_segment().is_err());
        let mut empty = SegmentSplitter::new(&b""[..], "<test>");
        assert!(empty.next_segment().unwrap().is_none());
    }
}
