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
//! - `sources`: resolving the inputs and reading them (the first two phases).
//! - `stats`: the run's counts and their summary.
//!
//! A run ([`collect`]) goes through six phases: resolve the inputs, read them,
//! hold their rows and events, pair the events in order of (created_at, input
//! order), write the samples sorted by (session_id, turn), and save the state. Everything read is
//! held in memory until the output is written (the sort needs it): peak memory is
//! about the decoded size of the main-turn rows (see BENCHMARKS.md).

pub mod import;
pub mod pair;

mod output;
mod raw;
mod sources;
mod state;
mod stats;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::RecordBatch;

pub use import::{Format, Retokenizer};
pub use pair::{Event, EventKind, NextState, PairConfig, PairStats, Pairer, Sample};
pub use stats::{Dropped, Stats};

use self::output::{Gather, Held};
use self::pair::{Ms, OpenSession, RowRef};
use self::sources::{Loaded, Source};
use crate::rollout::{rows_to_batch, RolloutWriter};

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

    // 1. Resolve the inputs, skip those already collected, tell their formats.
    let sources = sources::resolve(inputs, cfg, previous.as_ref(), &mut stats)?;
    // 2. Read and convert every input (in parallel).
    let loaded = sources::load(&sources, cfg)?;
    // 3. Hold their rows; take their events and imported samples.
    let held = hold(&sources, loaded, previous.as_ref(), cfg, &mut stats)?;
    crate::debug!(
        "collect: read {} inputs, {} events in {:.2} s; holding {} MiB of rows",
        stats.inputs,
        held.events.len(),
        started.elapsed().as_secs_f64(),
        held.rows
            .iter()
            .map(|h| h.batch.get_array_memory_size())
            .sum::<usize>()
            >> 20
    );
    // 4. Pair, in event time order; sort the samples.
    let (clock, open, out, pstats) =
        pair_events(held.events, held.imported, held.clock, held.carried, cfg);
    crate::debug!(
        "collect: paired and sorted {} samples at {:.2} s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    // 5. Write the samples.
    let name = writer.name();
    let gather = write_samples(writer, &held.rows, &out)?;
    crate::debug!(
        "collect: wrote {name} at {:.2} s",
        started.elapsed().as_secs_f64()
    );
    // 6. Then the state: the output is durable before the inputs count as collected.
    stats.open_sessions = open.len() as u64;
    stats.carried_out = open.iter().map(|s| s.pending.len() as u64).sum();
    if let Some(path) = &cfg.state {
        save_state(
            path,
            previous.as_ref(),
            clock,
            held.done_keys,
            open,
            &gather,
        )?;
    }

    // The counts.
    stats.count_samples(&out, &pstats);
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

/// What the inputs hold for the output: their rows, the events to pair, the
/// samples imported whole, and the open sessions carried in.
struct Holding {
    /// The carried pending turns' rows first, then each input's, in order.
    rows: Vec<Held>,
    events: Vec<Event>,
    imported: Vec<Sample>,
    /// Inputs read (canonical paths), for the state's list of collected inputs.
    done_keys: Vec<String>,
    /// The event clock and the open sessions of the state file.
    clock: Option<Ms>,
    carried: Vec<OpenSession>,
}

/// Holds every loaded input's rows (raw batches as they are, imported rows as
/// batches) and takes their events and samples, counting what was read.
fn hold(
    sources: &[Source],
    loaded: Vec<Result<Loaded>>,
    previous: Option<&state::Loaded>,
    cfg: &CollectConfig,
    stats: &mut Stats,
) -> Result<Holding> {
    // Held rows: the carried pending turns first, then each input's, in order.
    let mut held: Vec<Held> = Vec::new();
    let mut carried = Vec::new();
    let mut clock = None;
    if let Some(prev) = previous {
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
                sources::unreadable(stats, cfg.strict, e)?;
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

    Ok(Holding {
        rows: held,
        events,
        imported,
        done_keys,
        clock,
        carried,
    })
}

/// Pairs the events in event time order (the sort is stable: ties keep input
/// order), ends sessions as the config says, and sorts every sample (paired and
/// imported) by (session, turn). Returns the clock, the sessions left open, the
/// samples and the pairing's counts.
fn pair_events(
    mut events: Vec<Event>,
    imported: Vec<Sample>,
    clock: Option<Ms>,
    carried: Vec<OpenSession>,
    cfg: &CollectConfig,
) -> (Option<Ms>, Vec<OpenSession>, Vec<Sample>, PairStats) {
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
    (clock, open, out, pstats)
}

/// Writes the samples' rows, gathered from the held ones, and returns the gather
/// (the state's pending rows come from it too).
fn write_samples(writer: RolloutWriter, held: &[Held], samples: &[Sample]) -> Result<Gather> {
    let schema = output::output_schema(held)?;
    let gather = Gather::new(schema, held)?;
    let name = writer.name();
    write_pipelined(writer, &gather, samples)
        .with_context(|| format!("{name}: writing the samples"))?;
    Ok(gather)
}

/// Saves the state after the output: the output is durable before the inputs
/// count as collected.
fn save_state(
    path: &Path,
    previous: Option<&state::Loaded>,
    clock: Option<Ms>,
    done_keys: Vec<String>,
    open: Vec<OpenSession>,
    gather: &Gather,
) -> Result<()> {
    let mut all: BTreeSet<String> = previous
        .iter()
        .flat_map(|p| p.state.consumed.iter().cloned())
        .filter(|k| Path::new(k).exists())
        .collect();
    all.extend(done_keys);
    state::save(
        path,
        previous.map(|p| &p.state),
        clock,
        all.into_iter().collect(),
        open,
        gather,
    )
    .with_context(|| format!("{}: saving the collect state", path.display()))
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
