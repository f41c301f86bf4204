//! `claw collect`'s stage logic (docs/ARCHITECTURE.md, "Sessions and next state"):
//! raw events from `claw serve` (and other tools' chat logs) become samples, one per
//! main turn, numbered within their session and paired with their next state and
//! explicit feedback.
//!
//! - [`pair`]: the pairing rules on plain events (next state, side turns, feedback,
//!   session end in event time), testable without files.
//! - `raw`: serve's rows to events, column by column.
//! - [`import`]: OpenAI chat-format and OpenClaw-RL JSONL, retokenised with the
//!   model's chat template.
//! - `output`: the main-turn rows (every column, unknown ones too) gathered into
//!   output order with Arrow's `interleave`, plus the columns collect owns.
//! - `state`: the `--state` file that carries open sessions between batch runs.
//!
//! A run reads every input, orders the events by (created_at, input order), pairs
//! them, and writes the samples sorted by (session_id, turn). Everything read is
//! held in memory until the output is written (the sort needs it): peak memory is
//! about the decoded size of the main-turn rows (see BENCHMARKS.md).

pub mod import;
pub mod pair;

mod output;
mod raw;
mod state;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;
use bytes::Bytes;
use rayon::prelude::*;
use serde::Serialize;

pub use import::{Format, Retokenizer};
pub use pair::{Event, EventKind, NextState, PairConfig, PairStats, Pairer, Sample};

use self::import::{ImportContext, Imported};
use self::output::{Gather, Held};
use self::pair::{Ms, RowRef};
use self::raw::BatchEvents;
use crate::clock::{unix_ms, unix_ms_of};
use crate::model::resolve_model_path;
use crate::rollout::stream::SegmentSplitter;
use crate::rollout::{expand_inputs, rows_to_batch, Input, RolloutFile, RolloutWriter};

/// Rows per record batch read from raw segments.
const READ_BATCH_ROWS: usize = 4096;
/// Rows per batch handed to the writer.
const WRITE_BATCH_ROWS: usize = 2048;
/// Malformed lines reported one by one before the rest are only counted.
const MAX_LINE_WARNINGS: usize = 10;

/// What `claw collect` was asked to do.
#[derive(Clone, Debug)]
pub struct CollectConfig {
    pub format: Format,
    /// GGUF whose tokenizer and chat template retokenise imported logs.
    pub model: Option<PathBuf>,
    pub pair: PairConfig,
    /// End every open session at the end of the run.
    pub flush: bool,
    /// Carry open sessions (and the list of inputs done) between runs.
    pub state: Option<PathBuf>,
    /// A malformed line or unreadable input fails the run.
    pub strict: bool,
    /// Daemon mode: after the inputs, move the event clock to this time, so
    /// sessions with no new events still end. No inputs then means none (a clock
    /// tick), not stdin.
    pub advance_clock_to: Option<Ms>,
}

/// Counts of one run, printed on stderr and by `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Inputs read in this run.
    pub inputs: u64,
    /// Inputs skipped because the state file lists them as collected.
    pub inputs_already_collected: u64,
    /// Inputs that could not be read (skipped, reported on stderr).
    pub inputs_unreadable: u64,
    /// Rows read from raw segments.
    pub raw_rows: u64,
    /// Non-empty lines read from JSONL imports.
    pub imported_lines: u64,
    /// Distinct sessions among the samples written.
    pub sessions: u64,
    /// Samples written (one per main turn).
    pub turns: u64,
    /// Turns with a next state (any role).
    pub with_next_state: u64,
    /// The same by `next_state_role` (`feedback`: no next request, feedback text).
    pub next_state_roles: std::collections::BTreeMap<String, u64>,
    pub with_feedback: u64,
    /// Turns carried in from the state file.
    pub carried_in: u64,
    /// Turns left open in the state file for the next run.
    pub carried_out: u64,
    pub open_sessions: u64,
    pub feedback_events: u64,
    pub feedback_attached: u64,
    pub dropped: Dropped,
    /// Main requests whose `messages_json` was not a JSON list (no next state from them).
    pub unreadable_messages: u64,
    pub seconds: f64,
    /// Input rows (raw rows + imported lines) per second.
    pub rows_per_s: f64,
}

/// Why events did not become samples (or did not reach one).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dropped {
    pub side_turn: u64,
    pub no_response: u64,
    pub unknown_turn_type: u64,
    pub feedback_unmatched: u64,
    pub malformed_line: u64,
}

impl Stats {
    /// The one-paragraph summary for stderr.
    pub fn summary(&self) -> String {
        let mut read = Vec::new();
        if self.raw_rows > 0 || self.imported_lines == 0 {
            read.push(format!("{} raw rows", self.raw_rows));
        }
        if self.imported_lines > 0 {
            read.push(format!("{} imported lines", self.imported_lines));
        }
        let roles: Vec<String> = self
            .next_state_roles
            .iter()
            .map(|(role, n)| format!("{n} {role}"))
            .collect();
        let mut s = format!(
            "collect: {} from {} input(s) -> {} turns in {} sessions ({} with next state{}, {} with feedback)",
            read.join(" + "),
            self.inputs,
            self.turns,
            self.sessions,
            self.with_next_state,
            if roles.is_empty() {
                String::new()
            } else {
                format!(": {}", roles.join(", "))
            },
            self.with_feedback
        );
        let d = &self.dropped;
        let dropped: Vec<String> = [
            (d.side_turn, "side turns"),
            (d.no_response, "turns without a response"),
            (d.unknown_turn_type, "rows of unknown turn_type"),
            (
                d.feedback_unmatched,
                "feedback events whose turn was final, a side turn or unknown",
            ),
            (d.malformed_line, "malformed lines"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if !dropped.is_empty() {
            s.push_str(&format!("; dropped {}", dropped.join(", ")));
        }
        if self.carried_in > 0 {
            s.push_str(&format!("; {} turns carried in", self.carried_in));
        }
        if self.carried_out > 0 || self.open_sessions > 0 {
            s.push_str(&format!(
                "; {} turns in {} open sessions carried to the next run",
                self.carried_out, self.open_sessions
            ));
        }
        if self.inputs_already_collected > 0 {
            s.push_str(&format!(
                "; {} inputs skipped (already collected)",
                self.inputs_already_collected
            ));
        }
        s.push_str(&format!(
            " [{:.2} s, {:.0} rows/s]",
            self.seconds, self.rows_per_s
        ));
        s
    }
}

/// One input after reading.
enum Loaded {
    Raw {
        batches: Vec<BatchEvents>,
        rows: u64,
    },
    Imported(Imported),
}

struct Source {
    input: Input,
    name: Arc<str>,
    /// Canonical path, for the state file's list of collected inputs.
    key: Option<String>,
    /// stdin's bytes (read once).
    bytes: Option<Bytes>,
    format: Format,
}

/// Runs collect over `inputs` (files, globs, directories, `-`), writing samples to
/// `output` (`-` for stdout). Returns the run's counts.
pub fn collect(inputs: &[String], output: &str, cfg: &CollectConfig) -> Result<Stats> {
    let started = Instant::now();
    let mut stats = Stats::default();
    // Opened first: refusing a terminal on stdout should not wait for the work.
    let writer = RolloutWriter::create(output)?;

    let previous = match &cfg.state {
        Some(path) => state::load(path)?,
        None => None,
    };
    let consumed: HashSet<&str> = previous
        .iter()
        .flat_map(|p| p.state.consumed.iter().map(String::as_str))
        .collect();

    // The state's pending rows are never an input (were they in a raw directory).
    let own_files: HashSet<String> = match (&cfg.state, &previous) {
        (Some(path), Some(p)) => p
            .state
            .pending_rows
            .iter()
            .filter_map(|name| std::fs::canonicalize(state::sibling(path, name)).ok())
            .map(|p| p.display().to_string())
            .collect(),
        _ => HashSet::new(),
    };
    // Resolve inputs, skip those already collected, and tell their formats.
    let mut sources = Vec::new();
    let inputs = match inputs.is_empty() && cfg.advance_clock_to.is_some() {
        true => Vec::new(),
        false => expand_inputs(inputs)?,
    };
    for input in inputs {
        let key = match &input {
            Input::Path(p) => Some(
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string(),
            ),
            Input::Stdin => None,
        };
        if key.as_deref().is_some_and(|k| own_files.contains(k)) {
            crate::debug!(
                "{}: the state's own pending rows, not an input",
                input.name()
            );
            continue;
        }
        if key.as_deref().is_some_and(|k| consumed.contains(k)) {
            crate::debug!("{}: already collected, skipped", input.name());
            stats.inputs_already_collected += 1;
            continue;
        }
        let name: Arc<str> = input.name().into();
        let (format, bytes) = match open_source(&input, cfg.format) {
            Ok(x) => x,
            // a chat log that cannot be read is not "something else": no skip
            Err(e) if e.chain().any(|c| c.is::<import::BrokenLog>()) => return Err(e),
            Err(e) => {
                unreadable(&mut stats, cfg.strict, e)?;
                continue;
            }
        };
        sources.push(Source {
            input,
            name,
            key,
            bytes,
            format,
        });
    }
    if stats.inputs_already_collected > 0 {
        crate::info!(
            "skipping {} input(s) already collected (listed in {})",
            stats.inputs_already_collected,
            cfg.state
                .as_deref()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    let retokenizer = if sources.iter().any(|s| s.format != Format::Raw) {
        let path = resolve_model_path(cfg.model.as_deref())
            .context("importing chat logs needs the model's tokenizer and chat template")?;
        Some(Retokenizer::load(&path)?)
    } else {
        None
    };

    // Read and convert every input; files are independent, so in parallel.
    let loaded: Vec<Result<Loaded>> = sources
        .par_iter()
        .map(|s| load_source(s, retokenizer.as_ref()))
        .collect();

    // Held rows: the carried pending turns first, then each input's, in order.
    let mut held: Vec<Held> = Vec::new();
    let mut carried = Vec::new();
    let mut clock = None;
    if let Some(prev) = &previous {
        clock = prev.state.clock_ms;
        carried = prev.state.sessions.clone();
        if let Some(rows) = &prev.rows {
            state::rebase(&mut carried, 0);
            held.push(Held {
                source: "<pending turns of the state file>".into(),
                batch: rows.clone(),
            });
        }
        stats.carried_in = carried.iter().map(|s| s.pending.len() as u64).sum();
    }
    let mut events: Vec<Event> = Vec::new();
    let mut imported: Vec<Sample> = Vec::new();
    let mut done_keys: Vec<String> = Vec::new();
    let mut line_warnings = 0;
    for (source, result) in sources.iter().zip(loaded) {
        let loaded = match result {
            Ok(l) => l,
            Err(e) => {
                unreadable(&mut stats, cfg.strict, e)?;
                continue;
            }
        };
        stats.inputs += 1;
        match loaded {
            Loaded::Raw { batches, rows } => {
                stats.raw_rows += rows;
                for b in batches {
                    stats.unreadable_messages += b.bad_messages;
                    let index = held.len() as u32;
                    if let Some(kept) = b.kept {
                        held.push(Held {
                            source: source.name.clone(),
                            batch: kept,
                        });
                    }
                    events.extend(b.events.into_iter().map(|mut e| {
                        if let EventKind::Main { row: Some(r), .. } = &mut e.kind {
                            r.batch = index;
                        }
                        e
                    }));
                }
            }
            Loaded::Imported(im) => {
                stats.imported_lines += im.lines;
                stats.dropped.no_response += im.no_response;
                stats.dropped.malformed_line += im.malformed.len() as u64;
                if cfg.strict {
                    if let Some(first) = im.malformed.first() {
                        bail!(
                            "{first}{} (--strict)",
                            match im.malformed.len() {
                                1 => String::new(),
                                n => format!(" (and {} more malformed lines)", n - 1),
                            }
                        );
                    }
                }
                for m in &im.malformed {
                    if line_warnings < MAX_LINE_WARNINGS {
                        crate::warn!("{m} (line skipped)");
                    }
                    line_warnings += 1;
                }
                for chunk in im.rows.chunks(WRITE_BATCH_ROWS) {
                    let index = held.len() as u32;
                    for (i, row) in chunk.iter().enumerate() {
                        imported.push(Sample {
                            session: row.session_id.as_str().into(),
                            turn: row.turn.unwrap_or(0),
                            row: RowRef {
                                batch: index,
                                row: i as u32,
                            },
                            next_state: match (&row.next_state_role, &row.next_state_text) {
                                (Some(role), Some(text)) => Some(NextState {
                                    role: role.clone(),
                                    text: text.clone(),
                                }),
                                _ => None,
                            },
                            feedback: row.feedback,
                            feedback_text: row.feedback_text.clone(),
                        });
                    }
                    held.push(Held {
                        source: source.name.clone(),
                        batch: rows_to_batch(chunk)?,
                    });
                }
            }
        }
        if let Some(k) = &source.key {
            done_keys.push(k.clone());
        }
    }
    if line_warnings > MAX_LINE_WARNINGS {
        crate::warn!(
            "{} more malformed lines skipped (use --strict to fail on the first)",
            line_warnings - MAX_LINE_WARNINGS
        );
    }

    crate::debug!(
        "collect: read {} inputs, {} events in {:.2} s; holding {} MiB of rows",
        stats.inputs,
        events.len(),
        started.elapsed().as_secs_f64(),
        held.iter()
            .map(|h| h.batch.get_array_memory_size())
            .sum::<usize>()
            >> 20
    );
    // Pair, in event time order (the sort is stable: ties keep input order).
    events.sort_by_key(|e| e.time);
    let mut pairer = Pairer::new(cfg.pair).with_open_sessions(clock, carried);
    for e in events {
        pairer.push(e);
    }
    if let Some(now) = cfg.advance_clock_to {
        pairer.advance(now);
    }
    let flush = cfg.flush || cfg.state.is_none();
    if flush {
        pairer.flush();
    }
    let (clock, open, mut out, pstats) = pairer.into_open_sessions();
    out.extend(imported);
    out.sort_by(|a, b| (&a.session, a.turn, a.row).cmp(&(&b.session, b.turn, b.row)));

    crate::debug!(
        "collect: paired and sorted {} samples at {:.2} s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    // Write the samples.
    let schema = output::output_schema(&held)?;
    let gather = Gather::new(schema, &held)?;
    let name = writer.name();
    write_pipelined(writer, &gather, &out)
        .with_context(|| format!("{name}: writing the samples"))?;

    crate::debug!(
        "collect: wrote {name} at {:.2} s",
        started.elapsed().as_secs_f64()
    );
    // Then the state: the output is durable before the inputs count as collected.
    stats.open_sessions = open.len() as u64;
    stats.carried_out = open.iter().map(|s| s.pending.len() as u64).sum();
    if let Some(path) = &cfg.state {
        let mut all: BTreeSet<String> = previous
            .iter()
            .flat_map(|p| p.state.consumed.iter().cloned())
            .filter(|k| Path::new(k).exists())
            .collect();
        all.extend(done_keys);
        state::save(
            path,
            previous.as_ref().map(|p| &p.state),
            clock,
            all.into_iter().collect(),
            open,
            &gather,
        )
        .with_context(|| format!("{}: saving the collect state", path.display()))?;
    }

    stats.turns = out.len() as u64;
    stats.sessions = {
        let mut n = 0;
        let mut last: Option<&Arc<str>> = None;
        for s in &out {
            if last != Some(&s.session) {
                n += 1;
                last = Some(&s.session);
            }
        }
        n
    };
    for n in out.iter().filter_map(|s| s.next_state.as_ref()) {
        stats.with_next_state += 1;
        *stats.next_state_roles.entry(n.role.clone()).or_default() += 1;
    }
    stats.with_feedback = out
        .iter()
        .filter(|s| s.feedback.is_some() || s.feedback_text.is_some())
        .count() as u64;
    stats.feedback_events = pstats.feedback_events;
    stats.feedback_attached = pstats.feedback_attached;
    stats.dropped.side_turn = pstats.side_turns;
    stats.dropped.no_response += pstats.no_response;
    stats.dropped.unknown_turn_type = pstats.unknown_turn_type;
    stats.dropped.feedback_unmatched = pstats.feedback_unmatched;
    if pstats.late_events > 0 {
        crate::warn!(
            "{} events were older than events of an earlier run (segments out of order?); they were handled as if they came then",
            pstats.late_events
        );
    }
    stats.seconds = started.elapsed().as_secs_f64();
    stats.rows_per_s = (stats.raw_rows + stats.imported_lines) as f64 / stats.seconds.max(1e-9);
    Ok(stats)
}

/// Gathers output batches on this thread while another encodes and compresses
/// the previous one (the two halves of writing take about the same time).
fn write_pipelined(mut writer: RolloutWriter, gather: &Gather, samples: &[Sample]) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
        let encoder = scope.spawn(move || -> Result<RolloutWriter> {
            let mut busy = std::time::Duration::ZERO;
            for batch in rx {
                let t = Instant::now();
                writer.write(&batch)?;
                busy += t.elapsed();
            }
            crate::debug!("collect: encoding took {:.2} s", busy.as_secs_f64());
            Ok(writer)
        });
        let mut gathered = Ok(());
        let mut busy = std::time::Duration::ZERO;
        for chunk in samples.chunks(WRITE_BATCH_ROWS) {
            let t = Instant::now();
            let batch = gather.batch(chunk);
            busy += t.elapsed();
            match batch {
                Ok(batch) => {
                    if tx.send(batch).is_err() {
                        break; // the encoder failed; its error is reported below
                    }
                }
                Err(e) => {
                    gathered = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        crate::debug!("collect: gathering took {:.2} s", busy.as_secs_f64());
        let writer = encoder
            .join()
            .map_err(|_| anyhow!("the Parquet writer thread panicked"))??;
        gathered?;
        writer.finish()?;
        Ok(())
    })
}

/// Reports an input that cannot be read: skipped with a warning, or (`--strict`)
/// the run's error.
fn unreadable(stats: &mut Stats, strict: bool, e: anyhow::Error) -> Result<()> {
    if strict {
        return Err(e.context("--strict: an input cannot be read"));
    }
    stats.inputs_unreadable += 1;
    crate::warn!("{e:#} (input skipped; it is not marked collected)");
    Ok(())
}

/// The most of a file read to tell its format: its first non-empty line must
/// end within this.
const MAX_FIRST_LINE: u64 = 64 << 20;

/// The start of a file, up to the end of its first non-empty line (however
/// long: a chat log's first conversation may be megabytes), for [`import::detect`].
fn read_head(file: std::fs::File, name: &str) -> Result<Vec<u8>> {
    let mut reader = std::io::BufReader::new(file.take(MAX_FIRST_LINE));
    let start = reader
        .fill_buf()
        .with_context(|| format!("{name}: cannot read"))?;
    if start.starts_with(b"PAR1") {
        return Ok(b"PAR1".to_vec());
    }
    let mut head = Vec::new();
    loop {
        let n = reader
            .read_until(b'\n', &mut head)
            .with_context(|| format!("{name}: cannot read"))?;
        match import::first_line(&head) {
            Some((_, _, true)) => return Ok(head),
            Some((line, _, false)) if n > 0 && head.len() as u64 >= MAX_FIRST_LINE => {
                return Err(anyhow::Error::new(import::BrokenLog(format!(
                    "{name}: line {line} is longer than {} MiB, so its format cannot be told; \
                     give --format",
                    MAX_FIRST_LINE >> 20
                ))))
            }
            _ if n == 0 => return Ok(head), // the end of the file
            _ => {}
        }
    }
}

/// Tells an input's format (reading stdin whole, since Parquet needs to seek).
fn open_source(input: &Input, format: Format) -> Result<(Format, Option<Bytes>)> {
    let name = input.name();
    let (head, bytes) = match input {
        Input::Stdin => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!("no input given, so collect reads stdin, but stdin is a terminal: name the raw segments or chat logs, or pipe them in");
            }
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("<stdin>: reading standard input")?;
            let bytes = Bytes::from(buf);
            (bytes.clone(), Some(bytes))
        }
        Input::Path(p) => {
            let file = std::fs::File::open(p).with_context(|| format!("{name}: cannot open"))?;
            (Bytes::from(read_head(file, &name)?), None)
        }
    };
    let detected = match format {
        Format::Auto => import::detect(&head, &name)?,
        f => f,
    };
    if detected == Format::Raw && !head.starts_with(b"PAR1") {
        bail!("{name}: not a Parquet file, but --format raw reads claw serve's Parquet segments");
    }
    if detected != Format::Raw && head.starts_with(b"PAR1") {
        bail!(
            "{name}: a Parquet file, but --format {} reads JSON lines",
            detected.name()
        );
    }
    Ok((detected, bytes))
}

fn load_source(source: &Source, retokenizer: Option<&Retokenizer>) -> Result<Loaded> {
    match source.format {
        Format::Raw => {
            // A pipe from another claw stage carries several Parquet segments back
            // to back (see `rollout::stream`); a file is one.
            let files = match &source.bytes {
                Some(b) => {
                    let mut split = SegmentSplitter::new(&b[..], &source.name);
                    let mut files = Vec::new();
                    while let Some(segment) = split.next_segment()? {
                        files.push(RolloutFile::from_bytes(segment, &source.name)?);
                    }
                    files
                }
                None => vec![RolloutFile::open(&source.input)?],
            };
            let mut batches = Vec::new();
            let mut rows = 0;
            for file in files {
                if let Some(w) = file.schema_tag_warning() {
                    crate::debug!("{w}");
                }
                for batch in file.batches(READ_BATCH_ROWS, None)? {
                    let batch = batch?;
                    rows += batch.num_rows() as u64;
                    batches.push(raw::batch_events(&batch)?);
                }
            }
            Ok(Loaded::Raw { batches, rows })
        }
        format => {
            let retokenizer =
                retokenizer.ok_or_else(|| anyhow!("internal: no tokenizer for an import"))?;
            let (text, default_time) = match (&source.bytes, &source.input) {
                (Some(b), _) => (b.to_vec(), unix_ms()),
                (None, Input::Path(p)) => {
                    let raw = std::fs::read(p)
                        .with_context(|| format!("{}: cannot read", source.name))?;
                    let mtime = std::fs::metadata(p)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(unix_ms_of)
                        .unwrap_or_else(unix_ms);
                    (raw, mtime)
                }
                (None, Input::Stdin) => bail!("internal: stdin was not read"),
            };
            let file_name = match &source.input {
                Input::Path(p) => p.file_name().map_or_else(
                    || source.name.to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                Input::Stdin => "stdin".to_string(),
            };
            let cx = ImportContext {
                retokenizer,
                source: &source.name,
                file_name: &file_name,
                default_time,
            };
            Ok(Loaded::Imported(import::import_bytes(&text, format, &cx)))
        }
    }
}

/// Parses a duration with its unit: `90s`, `30m`, `2h`, `500ms`, `1d`; a bare
/// number other than 0 is refused (it was ambiguous).
pub fn parse_duration_ms(text: &str) -> Result<Ms> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| anyhow!("`{text}` is not a duration (examples: 90s, 30m, 2h)"))?;
    let scale = match unit.trim() {
        // A bare number is ambiguous (`--partial-after 60` once meant an hour).
        "" if value == 0.0 => 1.0,
        "" => bail!("`{text}` needs a unit: {num}s, {num}m or {num}h (also ms and d)"),
        "m" | "min" => 60_000.0,
        "ms" => 1.0,
        "s" | "sec" => 1000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        other => bail!("`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"),
    };
    let ms = value * scale;
    if !ms.is_finite() || !(0.0..=1e15).contains(&ms) {
        bail!("`{text}` is not a usable duration");
    }
    Ok(ms.round() as Ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30m").unwrap(), 1_800_000);
        let bare = parse_duration_ms("30").unwrap_err().to_string();
        assert!(bare.contains("needs a unit: 30s, 30m or 30h"), "{bare}");
        assert_eq!(parse_duration_ms("90s").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("1.5h").unwrap(), 5_400_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("0").unwrap(), 0);
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("5w").is_err());
    }
}
