//! The durable log of answered turns: a row is appended to `DIR/wal/WRITER.jsonl`
//! and fsynced before its reply completes, so a kill -9 loses no answered turn,
//! even one that was still waiting for its segment to close.
//!
//! The log holds exactly the rows of the open segment: the recorder appends each
//! batch of rows (one fsync for the batch: group commit, so a crowd of replies
//! pays one disk flush), and when segments close it rewrites the log with only
//! the rows still open. A server starting on the directory replays the logs of
//! dead servers into segments of its own (skipping rows a dead server's closed
//! segments already hold: it may have died between closing a segment and
//! trimming its log), then deletes them. A torn last line (a crash mid-write)
//! was never acknowledged and is dropped.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::rollout::{RolloutReader, RolloutRow, SegmentWriter};

/// The log of one writer.
pub struct Wal {
    path: PathBuf,
    file: File,
    /// The lines of the rows in the open segment, oldest first.
    open: VecDeque<String>,
}

/// The folder of the servers' logs in data directory `data_dir`.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

impl Wal {
    /// Starts an empty log for `writer_id` in `dir`.
    pub fn create(dir: &Path, writer_id: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the log directory", dir.display()))?;
        let path = dir.join(format!("{writer_id}.jsonl"));
        let file = File::create(&path)
            .with_context(|| format!("{}: cannot create the log", path.display()))?;
        sync_dir(dir)?;
        Ok(Self {
            path,
            file,
            open: VecDeque::new(),
        })
    }

    /// Appends `rows` and waits until they are on disk.
    pub fn append(&mut self, rows: &[RolloutRow]) -> Result<()> {
        let mut buffer = Vec::new();
        for row in rows {
            let line = serde_json::to_string(row).context("cannot encode a row for the log")?;
            buffer.extend_from_slice(line.as_bytes());
            buffer.push(b'\n');
            self.open.push_back(line);
        }
        self.file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("{}: cannot write the log", self.path.display()))
    }

    /// After the segment writer took the appended rows: `open_rows` of them are
    /// still in the open segment; when `closed` some segment was completed, so
    /// the log is cut down to those rows (written aside, then renamed over it).
    pub fn settle(&mut self, open_rows: usize, closed: bool) -> Result<()> {
        while self.open.len() > open_rows {
            self.open.pop_front();
        }
        if !closed {
            return Ok(());
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let context = || format!("{}: cannot rewrite the log", self.path.display());
        let mut file = File::create(&tmp).with_context(context)?;
        for line in &self.open {
            writeln!(file, "{line}").with_context(context)?;
        }
        file.sync_data().with_context(context)?;
        std::fs::rename(&tmp, &self.path).with_context(context)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(context)?;
        Ok(())
    }

    /// The open segment was closed at shutdown: nothing is left to replay.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path)
            .with_context(|| format!("{}: cannot remove the log", self.path.display()))
    }
}

/// Replays the logs in `dir` that `is_dead(writer)` says no live server owns
/// into segments of `writer` (closed before returning), then deletes them.
/// Returns the rows recovered.
pub fn recover(
    dir: &Path,
    raw_dir: &Path,
    writer: &mut SegmentWriter,
    is_dead: impl Fn(&str) -> bool,
) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut recovered = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(dead_writer) = name.strip_suffix(".jsonl") else {
            if name.ends_with(".jsonl.tmp") {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        if !is_dead(dead_writer) {
            continue;
        }
        let rows = read_log(&path)?;
        let closed = closed_sample_ids(raw_dir, dead_writer)?;
        let missing: Vec<RolloutRow> = rows
            .into_iter()
            .filter(|r| !closed.contains(&r.sample_id))
            .collect();
        if !missing.is_empty() {
            writer
                .write_rows(&missing)
                .and_then(|_| writer.roll())
                .with_context(|| format!("{}: cannot replay the log", path.display()))?;
            recovered += missing.len();
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("{}: cannot remove the replayed log", path.display()))?;
    }
    Ok(recovered)
}

/// The rows of a log; a last line that does not parse is a torn write (never
/// acknowledged) and is dropped, a bad line before it is an error.
fn read_log(path: &Path) -> Result<Vec<RolloutRow>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut rows = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<RolloutRow>(line) {
            Ok(row) => rows.push(row),
            Err(_) if i + 1 == lines.len() => {
                crate::warn!("{}: dropped a torn last line", path.display())
            }
            Err(e) => anyhow::bail!("{}: line {}: not a row: {e}", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// Sample ids in the closed segments `writer` left in `raw_dir`.
fn closed_sample_ids(raw_dir: &Path, writer: &str) -> Result<HashSet<String>> {
    let Ok(entries) = std::fs::read_dir(raw_dir) else {
        return Ok(HashSet::new());
    };
    let files: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            crate::rollout::parse_segment_file_name(name).is_some_and(|(_, w, _)| w == writer)
        })
        .map(|name| raw_dir.join(name).to_string_lossy().into_owned())
        .collect();
    if files.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = RolloutReader::new(&files)?.read_all_rows()?;
    Ok(rows.into_iter().map(|r| r.sample_id).collect())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync the directory", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> RolloutRow {
        RolloutRow {
            sample_id: id.into(),
            session_id: "s".into(),
            turn_type: "main".into(),
            ..Default::default()
        }
    }

    fn ids(rows: &[RolloutRow]) -> Vec<&str> {
        rows.iter().map(|r| r.sample_id.as_str()).collect()
    }

    #[test]
    fn the_log_holds_exactly_the_open_rows_and_replays_them_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, raw) = (tmp.path().join("wal"), tmp.path().join("raw"));
        let mut dead = SegmentWriter::new(&raw, "serve1").unwrap().with_max_rows(3);
        let mut log = Wal::create(&wal, "serve1").unwrap();
        let batch = [row("a"), row("b"), row("c"), row("d")];
        log.append(&batch).unwrap();
        let closed = dead.write_rows(&batch).unwrap();
        assert_eq!(closed.len(), 1, "a, b and c fill a segment");
        log.settle(dead.pending_rows(), true).unwrap();
        let path = wal.join("serve1.jsonl");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        log.append(&[row("e")]).unwrap();
        dead.write_rows(&[row("e")]).unwrap();
        log.settle(dead.pending_rows(), false).unwrap();
        // A torn write after e (the server died mid-append).
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"sample_id\": \"e").unwrap();
        drop(f);
        std::mem::forget(dead); // killed: d and e never reached a closed segment

        let mut next = SegmentWriter::new(&raw, "serve2").unwrap();
        let n = recover(&wal, &raw, &mut next, |w| w == "serve1").unwrap();
        assert_eq!(n, 2);
        assert!(!path.exists());
        let files: Vec<String> = std::fs::read_dir(&raw)
            .unwrap()
            .flatten()
            .map(|e| e.path().to_string_lossy().into_owned())
            .filter(|p| p.ends_with(".parquet"))
            .collect();
        let rows = RolloutReader::new(&files).unwrap().read_all_rows().unwrap();
        let mut got = ids(&rows);
        got.sort_unstable();
        assert_eq!(got, ["a", "b", "c", "d", "e"], "each answered row once");
    }

    #[test]
    fn rows_already_in_a_closed_segment_are_not_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, raw) = (tmp.path().join("wal"), tmp.path().join("raw"));
        let mut dead = SegmentWriter::new(&raw, "serve1").unwrap().with_max_rows(2);
        let mut log = Wal::create(&wal, "serve1").unwrap();
        log.append(&[row("a"), row("b")]).unwrap();
        dead.write_rows(&[row("a"), row("b")]).unwrap();
        // Died before `settle` trimmed the log.
        let mut next = SegmentWriter::new(&raw, "serve2").unwrap();
        assert_eq!(recover(&wal, &raw, &mut next, |_| true).unwrap(), 0);
    }
}
