//! Importing other tools' chat logs into `claw.rollout.v1` samples. Their text is
//! tokenised with the model's own tokenizer and chat template (`token_source =
//! retokenized`): the token ids are what the model would have seen for the same
//! messages, not what another model sampled.
//!
//! - OpenAI chat format (`openai`): one conversation per line,
//!   `{"messages": [...], "tools"?, "id"|"session_id"|"conversation_id"?, "model"?,
//!   "created"|"created_at"|"timestamp"?}`. Every assistant message is a turn; its
//!   prompt is the messages before it and its next state is the last message before
//!   the next assistant message (if that is a user or tool message). Messages
//!   follow `claw serve`'s rules (a known role, text content). Ratings as chat
//!   UIs export them, on the assistant message: `rating` (±1, true/false, "up"/
//!   "down", "thumbs_up"...), `feedback` (a rating, a text, or `{rating, text}`),
//!   `annotation: {rating, comment}` (Open WebUI), `feedback_text`/`comment`.
//! - OpenClaw-RL records (`openclaw`): its proxy's `OPENCLAW_RECORD_FILE`, one turn
//!   per line, `{session_id, turn, timestamp, messages, prompt_text, response_text,
//!   tool_calls, next_state}`. Its `response_text` is the template's rendering of
//!   the reply (ending in the end-of-turn token), so the reply is cut there.

mod openai;
mod openclaw;
mod retokenize;
mod row;

use anyhow::{anyhow, Result};
use rayon::prelude::*;
use serde_json::Value as Json;

use crate::rollout::RolloutRow;
pub use retokenize::Retokenizer;
pub use row::ImportContext;
use row::LineRows;

/// Input formats `claw collect` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decide per file: Parquet is `raw`, JSON lines are told apart by their fields.
    Auto,
    /// `claw serve`'s raw event segments (Parquet, claw.rollout.v1).
    Raw,
    /// OpenAI chat-format JSONL: one conversation per line.
    Openai,
    /// OpenClaw-RL's record JSONL: one turn per line.
    Openclaw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Raw => "raw",
            Format::Openai => "openai",
            Format::Openclaw => "openclaw",
        }
    }
}

/// An input that is evidently a chat log (JSON, or text that is not UTF-8) yet
/// cannot be read: it fails the run, where an input that is something else
/// (notes, a CSV) is skipped with a warning.
#[derive(Debug)]
pub struct BrokenLog(pub String);

impl std::fmt::Display for BrokenLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BrokenLog {}

/// The first non-empty line of `bytes` (1-based number, bytes without the line
/// end), and whether it ended (a newline follows it).
pub fn first_line(bytes: &[u8]) -> Option<(usize, &[u8], bool)> {
    let mut start = 0;
    let mut n = 0;
    while start < bytes.len() {
        n += 1;
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| start + p);
        let line = &bytes[start..end.unwrap_or(bytes.len())];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.trim_ascii().is_empty() {
            return Some((n, line, end.is_some()));
        }
        match end {
            Some(e) => start = e + 1,
            None => break,
        }
    }
    None
}

/// Tells the format of a file from its first bytes (Parquet magic) or its first
/// non-empty JSON line, which `head` must hold whole. Errors that are a
/// [`BrokenLog`] mean the input should fail the run rather than be skipped.
pub fn detect(head: &[u8], source: &str) -> Result<Format> {
    if head.starts_with(b"PAR1") {
        return Ok(Format::Raw);
    }
    let Some((n, line, _)) = first_line(head) else {
        return Err(anyhow!(
            "{source}: empty, so its format cannot be told (give --format)"
        ));
    };
    let line = std::str::from_utf8(line).map_err(|e| {
        BrokenLog(format!(
            "{source}: line {n} is not valid UTF-8 (byte {}): chat logs must be UTF-8 JSON lines",
            e.valid_up_to() + 1
        ))
    })?;
    let value: Json = serde_json::from_str(line).map_err(|e| {
        if line.trim_start().starts_with('{') {
            anyhow::Error::new(BrokenLog(format!(
                "{source}: line {n} looks like JSON but does not parse ({e}), so its format \
                 cannot be told; fix the line or give --format"
            )))
        } else {
            anyhow!(
                "{source}: neither Parquet nor JSON lines (line {n}: {e}); give --format if it is one of them"
            )
        }
    })?;
    let has = |k: &str| value.get(k).is_some();
    if has("response_text") || (has("prompt_text") && has("session_id")) {
        return Ok(Format::Openclaw);
    }
    if value.get("messages").is_some_and(Json::is_array) {
        return Ok(Format::Openai);
    }
    if has("score") && has("votes") {
        return Err(anyhow!(
            "{source}: looks like OpenClaw-RL's PRM score file, which has no turns to import (import its record file instead)"
        ));
    }
    Err(anyhow!(
        "{source}: line {n} is JSON but neither OpenAI chat format (a `messages` list) nor an OpenClaw-RL record (`response_text`); give --format"
    ))
}

/// What importing one file gave.
#[derive(Default)]
pub struct Imported {
    /// Samples, with `turn`, next state and feedback filled in.
    pub rows: Vec<RolloutRow>,
    pub lines: u64,
    /// `FILE:LINE: reason` for each line that could not be converted.
    pub malformed: Vec<String>,
    /// Assistant messages with neither text nor tool calls.
    pub no_response: u64,
}

/// Converts every line of a JSONL file; lines are independent, so they are
/// converted in parallel and kept in file order.
pub fn import_lines(text: &str, format: Format, cx: &ImportContext) -> Imported {
    import_bytes(text.as_bytes(), format, cx)
}

/// [`import_lines`] on bytes: a line that is not valid UTF-8 is malformed (not
/// decoded with replacement characters).
pub fn import_bytes(bytes: &[u8], format: Format, cx: &ImportContext) -> Imported {
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.trim_ascii().is_empty())
        .collect();
    let results: Vec<(usize, Result<LineRows>)> = lines
        .par_iter()
        .map(|&(n, line)| {
            let r = match std::str::from_utf8(line) {
                Err(e) => Err(anyhow!(
                    "not valid UTF-8 (byte {} of the line)",
                    e.valid_up_to() + 1
                )),
                Ok(line) => match format {
                    Format::Openclaw => openclaw::line(line, n, cx),
                    _ => openai::line(line, n, cx),
                },
            };
            (n, r)
        })
        .collect();
    let mut out = Imported {
        lines: lines.len() as u64,
        ..Default::default()
    };
    // OpenClaw-RL records without a turn number are numbered in file order.
    let mut counters: std::collections::HashMap<String, i32> = Default::default();
    for (n, r) in results {
        match r {
            Ok(mut l) => {
                out.no_response += l.no_response;
                for row in &mut l.rows {
                    let c = counters.entry(row.session_id.clone()).or_insert(0);
                    match row.turn {
                        Some(t) => *c = (*c).max(t),
                        None => {
                            *c += 1;
                            row.turn = Some(*c);
                            if row.sample_id.is_empty() {
                                row.sample_id = format!("{}:{}", row.session_id, *c);
                            }
                        }
                    }
                }
                out.rows.extend(l.rows);
            }
            Err(e) => out.malformed.push(format!("{}:{n}: {e:#}", cx.source)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected() {
        assert_eq!(detect(b"PAR1....", "x").unwrap(), Format::Raw);
        assert_eq!(
            detect(
                b"\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
                "x"
            )
            .unwrap(),
            Format::Openai
        );
        assert_eq!(
            detect(
                b"{\"session_id\": \"s\", \"turn\": 1, \"messages\": [], \"response_text\": \"x\"}",
                "x"
            )
            .unwrap(),
            Format::Openclaw
        );
        let err = detect(
            b"{\"session_id\": \"s\", \"turn\": 1, \"score\": 1, \"votes\": []}",
            "f.jsonl",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("PRM"), "{err}");
        let err = detect(b"hello", "f.txt").unwrap_err().to_string();
        assert!(err.contains("f.txt") && err.contains("--format"), "{err}");
        assert!(!err_is_broken(&detect(b"hello", "f.txt").unwrap_err()));
        // evidently a log, yet unreadable: errors that fail the run
        let err = detect(b"\n{\"messages\": [\xff]}\n", "f.jsonl").unwrap_err();
        assert!(err_is_broken(&err), "{err}");
        assert!(
            err.to_string().contains("line 2 is not valid UTF-8"),
            "{err}"
        );
        let err = detect(b"{\"messages\": [", "f.jsonl").unwrap_err();
        assert!(
            err_is_broken(&err) && err.to_string().contains("line 1"),
            "{err}"
        );
    }

    fn err_is_broken(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<BrokenLog>())
    }
    #[test]
    fn first_lines_are_found_whole() {
        assert_eq!(first_line(b"\n \r\nab\r\ncd"), Some((3, &b"ab"[..], true)));
        assert_eq!(first_line(b"abc"), Some((1, &b"abc"[..], false)));
        assert_eq!(first_line(b"\n\n"), None);
    }
}
