//! The first two phases of a run: resolving the inputs (skipping those already
//! collected, telling each one's format) and reading them, in parallel.

use crate::clock::{unix_ms, unix_ms_of};
use std::collections::HashSet;
use std::io::{BufRead, Read};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use rayon::prelude::*;

use super::import::{self, ImportContext, Imported};
use super::raw::{self, BatchEvents};
use super::{state, CollectConfig, Format, Retokenizer, Stats};
use crate::model::resolve_model_path;
use crate::rollout::stream::SegmentSplitter;
use crate::rollout::{expand_inputs, Input, RolloutFile};

/// Rows per record batch read from raw segments.
const READ_BATCH_ROWS: usize = 4096;

/// One input after reading.
pub(super) enum Loaded {
    Raw {
        batches: Vec<BatchEvents>,
        rows: u64,
    },
    Imported(Imported),
}

/// One input to read, with its format.
pub(super) struct Source {
    input: Input,
    pub name: Arc<str>,
    /// Canonical path, for the state file's list of collected inputs.
    pub key: Option<String>,
    /// stdin's bytes (read once).
    bytes: Option<Bytes>,
    format: Format,
}

/// Resolves `inputs` (files, globs, directories, `-`), skips those already
/// collected and the state's own pending rows, and tells their formats.
pub(super) fn resolve(
    inputs: &[String],
    cfg: &CollectConfig,
    previous: Option<&state::Loaded>,
    stats: &mut Stats,
) -> Result<Vec<Source>> {
    let consumed: HashSet<&str> = previous
        .iter()
        .flat_map(|p| p.state.consumed.iter().map(String::as_str))
        .collect();

    // The state's pending rows are never an input (were they in a raw directory).
    let own_files: HashSet<String> = match (&cfg.state, previous) {
        (Some(path), Some(p)) => p
            .state
            .pending_rows
            .iter()
            .filter_map(|name| std::fs::canonicalize(state::sibling(path, name)).ok())
            .map(|p| p.display().to_string())
            .collect(),
        _ => HashSet::new(),
    };
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
                unreadable(stats, cfg.strict, e)?;
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
    Ok(sources)
}

/// Reads and converts every input; files are independent, so in parallel. An
/// input that cannot be read is an `Err` in its place.
pub(super) fn load(sources: &[Source], cfg: &CollectConfig) -> Result<Vec<Result<Loaded>>> {
    let retokenizer = if sources.iter().any(|s| s.format != Format::Raw) {
        let path = resolve_model_path(cfg.model.as_deref())
            .context("importing chat logs needs the model's tokenizer and chat template")?;
        Some(Retokenizer::load(&path)?)
    } else {
        None
    };

    Ok(sources
        .par_iter()
        .map(|s| load_source(s, retokenizer.as_ref()))
        .collect())
}

/// Reports an input that cannot be read: skipped with a warning, or (`--strict`)
/// the run's error.
pub(super) fn unreadable(stats: &mut Stats, strict: bool, e: anyhow::Error) -> Result<()> {
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
