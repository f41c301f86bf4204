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

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use rayon::prelude::*;
use serde_json::{json, Map, Value as Json};

use super::raw::content_text;
use crate::model::{ChatTemplate, Tokenizer};
use crate::rollout::json_kind as kind;
use crate::rollout::RolloutRow;

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

/// The model's tokenizer and chat template, read from the GGUF's metadata only
/// (the weights are not loaded).
pub struct Retokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// The served model name (the GGUF file stem), for rows whose log names none.
    pub model_name: String,
    /// The end-of-turn token appended when the template cannot place the reply.
    end_of_turn: Option<u32>,
}

/// Texts that end an assistant turn in common templates; an imported reply that
/// was recorded with its template tail is cut at the first of them.
const END_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
];

impl Retokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let mut file = File::open(path)
            .with_context(|| format!("cannot open model file {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&content)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(&content, &tokenizer)
            .with_context(|| format!("cannot load the chat template of {}", path.display()))?;
        let end_of_turn = ["<|im_end|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .find_map(|t| tokenizer.token_id(t))
            .or_else(|| tokenizer.eos_ids().first().copied());
        let model_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Retokenizer {
            tokenizer,
            template,
            model_name,
            end_of_turn,
        })
    }

    /// Renders and tokenises one turn: the prompt (with the generation prompt) and
    /// the reply as the template writes it after the prompt, up to and including
    /// the end-of-turn token. Templates that rewrite earlier turns (so the prompt is
    /// not a prefix of prompt + reply) fall back to the reply's text plus the
    /// end-of-turn token.
    fn encode(&self, prompt: &[Json], tools: Option<&[Json]>, reply: &Json) -> Result<Encoded> {
        let prompt_text = self
            .template
            .render(prompt, tools, true)
            .context("the chat template rejected the messages")?;
        let prompt_ids = self.ids(&prompt_text)?;
        let content = reply["content"].as_str().unwrap_or_default();
        let mut with_reply = prompt.to_vec();
        with_reply.push(reply.clone());
        let tail = self
            .template
            .render(&with_reply, tools, false)
            .ok()
            .and_then(|full| full.strip_prefix(prompt_text.as_str()).map(str::to_string));
        let (response_text, response_ids) = match tail {
            Some(tail) if !tail.is_empty() => {
                let mut ids = self.ids(&tail)?;
                if let Some(end) = ids.iter().position(|&id| self.tokenizer.is_eos(id as u32)) {
                    ids.truncate(end + 1);
                }
                let body: Vec<u32> = ids
                    .iter()
                    .map(|&i| i as u32)
                    .filter(|&i| !self.tokenizer.is_eos(i))
                    .collect();
                (self.tokenizer.decode(&body)?, ids)
            }
            _ => {
                let mut ids = self.ids(content)?;
                ids.extend(self.end_of_turn.map(|i| i as i32));
                (content.to_string(), ids)
            }
        };
        Ok(Encoded {
            prompt_text,
            prompt_ids,
            response_text,
            response_ids,
        })
    }

    fn ids(&self, text: &str) -> Result<Vec<i32>> {
        Ok(self
            .tokenizer
            .encode(text)?
            .into_iter()
            .map(|i| i as i32)
            .collect())
    }
}

struct Encoded {
    prompt_text: String,
    prompt_ids: Vec<i32>,
    response_text: String,
    response_ids: Vec<i32>,
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

/// Where the defaults of an imported row come from.
pub struct ImportContext<'a> {
    pub retokenizer: &'a Retokenizer,
    /// Shown in messages.
    pub source: &'a str,
    /// The file's name without directories: sessions of logs that name none are
    /// `NAME:LINE`.
    pub file_name: &'a str,
    /// `created_at` for rows whose log has no time: the file's modification time.
    pub default_time: i64,
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
                    Format::Openclaw => openclaw_line(line, n, cx),
                    _ => openai_line(line, n, cx),
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

struct LineRows {
    rows: Vec<RolloutRow>,
    no_response: u64,
}

fn openai_line(line: &str, n: usize, cx: &ImportContext) -> Result<LineRows> {
    let value: Json = serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| anyhow!("expected a JSON object with `messages`"))?;
    let messages = obj
        .get("messages")
        .and_then(Json::as_array)
        .ok_or_else(|| anyhow!("`messages` is missing or not a list"))?;
    for (i, m) in messages.iter().enumerate() {
        check_message(i, m)?;
    }
    let tools = tools_of(obj)?;
    let session_id = ["session_id", "conversation_id", "id"]
        .iter()
        .find_map(|k| id_string(obj.get(*k)))
        .unwrap_or_else(|| format!("{}:{n}", cx.file_name));
    let model = obj
        .get("model")
        .and_then(Json::as_str)
        .unwrap_or(&cx.retokenizer.model_name)
        .to_string();
    let line_time = time_of(obj)?.unwrap_or(cx.default_time);
    let normalized: Vec<Json> = messages.iter().map(template_message).collect();

    let assistants: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m["role"] == "assistant")
        .map(|(i, _)| i)
        .collect();
    let mut rows = Vec::new();
    let mut no_response = 0;
    for (k, &i) in assistants.iter().enumerate() {
        let msg = &messages[i];
        let m = msg
            .as_object()
            .ok_or_else(|| anyhow!("message {i} is not an object"))?;
        let (rating, text) = feedback_of(m).with_context(|| format!("message {i}"))?;
        if i == 0 {
            continue; // nothing was asked: not a turn
        }
        let tool_calls = m
            .get("tool_calls")
            .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        let content = m.get("content").map(content_text).unwrap_or_default();
        if content.is_empty() && tool_calls.is_none() {
            no_response += 1;
            continue;
        }
        let next = assistants.get(k + 1).copied().unwrap_or(messages.len());
        let next_state = (next > i + 1)
            .then(|| &messages[next - 1])
            .and_then(next_state_of);
        let enc = cx
            .retokenizer
            .encode(&normalized[..i], tools.as_deref(), &normalized[i])
            .with_context(|| format!("message {i}"))?;
        let turn = rows.len() as i32 + 1;
        let created_at = time_of(m)?.unwrap_or(line_time);
        let sample_id = id_string(m.get("id")).unwrap_or_else(|| format!("{session_id}:{turn}"));
        rows.push(turn_row(TurnParts {
            sample_id,
            session_id: session_id.clone(),
            turn,
            created_at,
            model: model.clone(),
            messages: Json::Array(messages[..i].to_vec()),
            tools: tools.clone(),
            tool_calls: tool_calls.cloned(),
            enc,
            next_state,
            rating,
            feedback_text: text,
        }));
    }
    Ok(LineRows { rows, no_response })
}

fn openclaw_line(line: &str, _n: usize, cx: &ImportContext) -> Result<LineRows> {
    let value: Json = serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| anyhow!("expected a JSON object (an OpenClaw-RL record)"))?;
    let session_id = id_string(obj.get("session_id"))
        .ok_or_else(|| anyhow!("`session_id` is missing or not a string"))?;
    let turn = match obj.get("turn") {
        None | Some(Json::Null) => None,
        Some(t) => Some(
            t.as_i64()
                .filter(|t| *t >= 1)
                .and_then(|t| i32::try_from(t).ok())
                .ok_or_else(|| anyhow!("`turn` must be a positive integer, got {t}"))?,
        ),
    };
    let messages = obj
        .get("messages")
        .and_then(Json::as_array)
        .ok_or_else(|| anyhow!("`messages` is missing or not a list"))?;
    if messages.is_empty() {
        return Err(anyhow!("`messages` is empty: nothing was asked"));
    }
    for (i, m) in messages.iter().enumerate() {
        check_message(i, m)?;
    }
    let recorded = obj
        .get("response_text")
        .and_then(Json::as_str)
        .ok_or_else(|| anyhow!("`response_text` is missing or not a string"))?;
    let content = strip_template_tail(recorded);
    let tool_calls = match obj.get("tool_calls") {
        None | Some(Json::Null) => None,
        Some(Json::Array(a)) if a.is_empty() => None,
        Some(t @ Json::Array(_)) => Some(t.clone()),
        Some(other) => return Err(anyhow!("`tool_calls` must be a list, got {other}")),
    };
    if content.is_empty() && tool_calls.is_none() {
        return Ok(LineRows {
            rows: vec![],
            no_response: 1,
        });
    }
    let next_state = match obj.get("next_state") {
        None | Some(Json::Null) => None,
        Some(m @ Json::Object(_)) => next_state_of(m),
        Some(other) => {
            return Err(anyhow!(
                "`next_state` must be a message or null, got {other}"
            ))
        }
    };
    let tools = tools_of(obj)?;
    let normalized: Vec<Json> = messages.iter().map(template_message).collect();
    let mut reply = json!({"role": "assistant", "content": content});
    if let Some(t) = &tool_calls {
        reply["tool_calls"] = t.clone();
    }
    let enc = cx
        .retokenizer
        .encode(&normalized, tools.as_deref(), &reply)?;
    let created_at = time_of(obj)?.unwrap_or(cx.default_time);
    let model = obj
        .get("model")
        .and_then(Json::as_str)
        .unwrap_or(&cx.retokenizer.model_name)
        .to_string();
    let sample_id = turn
        .map(|t| format!("{session_id}:{t}"))
        .unwrap_or_default();
    let row = turn_row(TurnParts {
        sample_id,
        session_id,
        turn: turn.unwrap_or(0),
        created_at,
        model,
        messages: Json::Array(messages.clone()),
        tools,
        tool_calls,
        enc,
        next_state,
        rating: None,
        feedback_text: None,
    });
    let mut row = row;
    if turn.is_none() {
        row.turn = None; // numbered in file order by the caller
    }
    Ok(LineRows {
        rows: vec![row],
        no_response: 0,
    })
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The rules `claw serve` applies to a request's messages: a known role, text
/// content (a string or text parts), tool calls only on an assistant message.
/// An assistant message may hold neither text nor calls (a reply that came
/// back empty; it is counted, not imported).
fn check_message(i: usize, m: &Json) -> Result<()> {
    let at = format!("messages[{i}]");
    let obj = m.as_object().ok_or_else(|| {
        anyhow!(
            "`{at}` must be an object with `role` and `content`, got {}",
            kind(m)
        )
    })?;
    let role = match obj.get("role") {
        Some(Json::String(r)) => r.as_str(),
        Some(other) => return Err(anyhow!("`{at}.role` must be a string, got {}", kind(other))),
        None => return Err(anyhow!("`{at}` has no `role`")),
    };
    if !ROLES.contains(&role) {
        return Err(anyhow!(
            "`{at}.role` {role:?} is not one of system, user, assistant, tool (or developer)"
        ));
    }
    let has_text = match obj.get("content") {
        None | Some(Json::Null) => false,
        Some(Json::String(_)) => true,
        Some(Json::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let p = format!("{at}.content[{j}]");
                match (part.get("type").and_then(Json::as_str), part.get("text")) {
                    (Some("text") | None, Some(Json::String(_))) => {}
                    (Some(other), _) if other != "text" => {
                        return Err(anyhow!(
                            "`{p}.type` {other:?} is not supported: claw trains on text only"
                        ))
                    }
                    _ => {
                        return Err(anyhow!(
                            "`{p}` must be a text part {{\"type\": \"text\", \"text\": \"...\"}}"
                        ))
                    }
                }
            }
            true
        }
        Some(other) => {
            return Err(anyhow!(
                "`{at}.content` must be a string or an array of text parts, got {}",
                kind(other)
            ))
        }
    };
    let has_calls = match obj.get("tool_calls") {
        None | Some(Json::Null) => false,
        Some(Json::Array(_)) if role == "assistant" => true,
        Some(_) => {
            return Err(anyhow!(
                "`{at}.tool_calls` must be an array on an assistant message"
            ))
        }
    };
    if !has_text && !has_calls && role != "assistant" {
        return Err(anyhow!(
            "`{at}.content` is missing (only an assistant message with tool_calls may omit it)"
        ));
    }
    Ok(())
}

struct TurnParts {
    sample_id: String,
    session_id: String,
    turn: i32,
    created_at: i64,
    model: String,
    messages: Json,
    tools: Option<Vec<Json>>,
    tool_calls: Option<Json>,
    enc: Encoded,
    next_state: Option<(String, String)>,
    rating: Option<i8>,
    feedback_text: Option<String>,
}

fn turn_row(p: TurnParts) -> RolloutRow {
    let (next_state_role, next_state_text) = match p.next_state {
        Some((role, text)) => (Some(role), Some(text)),
        None => match p.feedback_text.clone() {
            Some(t) => (Some("feedback".to_string()), Some(t)),
            None => (None, None),
        },
    };
    RolloutRow {
        sample_id: p.sample_id,
        session_id: p.session_id,
        turn: Some(p.turn),
        turn_type: "main".into(),
        created_at: p.created_at,
        model: p.model,
        policy_version: 0,
        messages_json: p.messages.to_string(),
        tools_json: p.tools.map(|t| Json::Array(t).to_string()),
        prompt_text: p.enc.prompt_text,
        response_text: p.enc.response_text,
        finish_reason: if p.tool_calls.is_some() {
            "tool_calls".into()
        } else {
            "stop".into()
        },
        tool_calls_json: p.tool_calls.map(|t| t.to_string()),
        prompt_ids: p.enc.prompt_ids,
        response_ids: p.enc.response_ids,
        // No sampling policy is known for imported text: the trainer recomputes
        // log-probs under the current policy.
        response_logprobs: Vec::new(),
        token_source: "retokenized".into(),
        next_state_role,
        next_state_text,
        feedback: p.rating,
        feedback_text: p.feedback_text,
        ..Default::default()
    }
}

/// A message as the chat template expects it: `developer` is `system`, content
/// is a string (lists of parts joined, null empty).
fn template_message(m: &Json) -> Json {
    let mut m = m.clone();
    if let Some(obj) = m.as_object_mut() {
        if obj.get("role").and_then(Json::as_str) == Some("developer") {
            obj.insert("role".into(), Json::String("system".into()));
        }
        let text = obj.get("content").map(content_text).unwrap_or_default();
        obj.insert("content".into(), Json::String(text));
    }
    m
}

fn next_state_of(m: &Json) -> Option<(String, String)> {
    let role = m.get("role")?.as_str()?;
    (role == "user" || role == "tool").then(|| {
        (
            role.to_string(),
            m.get("content").map(content_text).unwrap_or_default(),
        )
    })
}

/// Cuts a reply recorded with its template tail (`Hello<|im_end|>\n`) at the
/// end-of-turn marker.
fn strip_template_tail(text: &str) -> &str {
    let end = END_MARKERS
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    let cut = &text[..end];
    if end < text.len() {
        cut.trim_end_matches(['\n', '\r'])
    } else {
        cut
    }
}

fn tools_of(obj: &Map<String, Json>) -> Result<Option<Vec<Json>>> {
    match obj.get("tools") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(a)) if a.is_empty() => Ok(None),
        Some(Json::Array(a)) => Ok(Some(a.clone())),
        Some(other) => Err(anyhow!("`tools` must be a list, got {other}")),
    }
}

fn id_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A rating and a text from an assistant message's feedback fields.
fn feedback_of(m: &Map<String, Json>) -> Result<(Option<i8>, Option<String>)> {
    let mut rating = None;
    let mut texts: Vec<String> = Vec::new();
    let mut take_rating = |v: &Json, field: &str| -> Result<()> {
        if let Some(r) = rating_of(v).map_err(|e| anyhow!("`{field}`: {e}"))? {
            rating = Some(r);
        }
        Ok(())
    };
    if let Some(v) = m.get("rating") {
        take_rating(v, "rating")?;
    }
    match m.get("feedback") {
        None | Some(Json::Null) => {}
        Some(Json::Object(o)) => {
            if let Some(v) = o.get("rating") {
                take_rating(v, "feedback.rating")?;
            }
            texts.extend(
                ["text", "comment"]
                    .iter()
                    .filter_map(|k| text_field(o.get(*k))),
            );
        }
        Some(Json::String(s)) if thumbs(s).is_none() => {
            texts.extend(text_field(Some(&Json::String(s.clone()))))
        }
        Some(v) => take_rating(v, "feedback")?,
    }
    match m.get("annotation") {
        None | Some(Json::Null) => {}
        Some(Json::Object(o)) => {
            if let Some(v) = o.get("rating") {
                take_rating(v, "annotation.rating")?;
            }
            texts.extend(
                ["comment", "text"]
                    .iter()
                    .filter_map(|k| text_field(o.get(*k))),
            );
        }
        Some(other) => return Err(anyhow!("`annotation` must be an object, got {other}")),
    }
    texts.extend(
        ["feedback_text", "comment"]
            .iter()
            .filter_map(|k| text_field(m.get(*k))),
    );
    let text = (!texts.is_empty()).then(|| texts.join("\n"));
    Ok((rating, text))
}

fn text_field(v: Option<&Json>) -> Option<String> {
    v.and_then(Json::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A thumbs word as a rating.
fn thumbs(s: &str) -> Option<i8> {
    match s.trim().to_ascii_lowercase().as_str() {
        "up" | "thumbs_up" | "thumbsup" | "thumbs-up" | "good" | "positive" | "like" | "+1"
        | "1" | "true" | "yes" => Some(1),
        "down" | "thumbs_down" | "thumbsdown" | "thumbs-down" | "bad" | "negative" | "dislike"
        | "-1" | "false" | "no" => Some(-1),
        _ => None,
    }
}

/// A rating value: 1 or -1 (0: none), true/false, or a thumbs word. Other
/// numbers (a 7, a 4-star score) are refused rather than read as a sign.
fn rating_of(v: &Json) -> std::result::Result<Option<i8>, String> {
    match v {
        Json::Null => Ok(None),
        Json::Bool(b) => Ok(Some(if *b { 1 } else { -1 })),
        Json::Number(n) => match n.as_f64() {
            Some(1.0) => Ok(Some(1)),
            Some(-1.0) => Ok(Some(-1)),
            Some(0.0) => Ok(None),
            _ => Err(format!(
                "{n} is not a rating (use 1/-1, true/false, up/down)"
            )),
        },
        Json::String(s) if s.trim().is_empty() => Ok(None),
        Json::String(s) => thumbs(s)
            .map(Some)
            .ok_or_else(|| format!("{s:?} is not a rating (use 1/-1, true/false, up/down)")),
        other => Err(format!(
            "{other} is not a rating (use 1/-1, true/false, up/down)"
        )),
    }
}

/// The first time field of an object, in Unix milliseconds.
fn time_of(obj: &Map<String, Json>) -> Result<Option<i64>> {
    for key in ["created_at", "created", "timestamp", "create_time", "time"] {
        match obj.get(key) {
            None | Some(Json::Null) => continue,
            Some(v) => {
                return parse_time(v).map(Some).ok_or_else(|| {
                    anyhow!("`{key}`: {v} is not a time (Unix seconds/ms or ISO 8601)")
                })
            }
        }
    }
    Ok(None)
}

/// Unix seconds, milliseconds, microseconds or nanoseconds (told apart by size),
/// or an ISO 8601 / `YYYY-MM-DD HH:MM:SS` text (without a zone: UTC).
pub(crate) fn parse_time(v: &Json) -> Option<i64> {
    match v {
        Json::Number(n) => epoch_number(n.as_f64()?),
        Json::String(s) => {
            let s = s.trim();
            if let Ok(x) = s.parse::<f64>() {
                return epoch_number(x);
            }
            crate::date::parse_iso_ms(s)
        }
        _ => None,
    }
}

fn epoch_number(x: f64) -> Option<i64> {
    if !x.is_finite() {
        return None;
    }
    let ms = match x.abs() {
        a if a < 1e11 => x * 1e3,
        a if a < 1e14 => x,
        a if a < 1e17 => x / 1e3,
        _ => x / 1e6,
    };
    Some(ms.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_common_spelling() {
        let t = |v: Json| parse_time(&v);
        assert_eq!(t(json!(1_700_000_000)), Some(1_700_000_000_000));
        assert_eq!(t(json!(1_700_000_000.5)), Some(1_700_000_000_500));
        assert_eq!(t(json!(1_700_000_000_123i64)), Some(1_700_000_000_123));
        assert_eq!(t(json!("2023-11-14T22:13:20Z")), Some(1_700_000_000_000));
        assert_eq!(t(json!("2023-11-14 22:13:20")), Some(1_700_000_000_000));
        assert_eq!(
            t(json!("2023-11-14T23:13:20.250+01:00")),
            Some(1_700_000_000_250)
        );
        assert_eq!(t(json!("1970-01-01")), Some(0));
        assert_eq!(t(json!("2000-02-29T00:00:00Z")), Some(951_782_400_000));
        assert_eq!(t(json!("yesterday")), None);
        assert_eq!(t(json!("2023-13-01")), None);
        assert_eq!(t(json!(true)), None);
    }

    #[test]
    fn ratings_as_chat_uis_export_them() {
        let fb = |v: Json| feedback_of(v.as_object().unwrap());
        assert_eq!(fb(json!({"rating": 1})).unwrap(), (Some(1), None));
        assert_eq!(fb(json!({"rating": -1.0})).unwrap(), (Some(-1), None));
        assert_eq!(fb(json!({"rating": 0})).unwrap(), (None, None));
        let err = fb(json!({"rating": 7})).unwrap_err().to_string();
        assert!(err.contains("`rating`") && err.contains('7'), "{err}");
        assert!(fb(json!({"rating": -5})).is_err());
        assert!(fb(json!({"annotation": {"rating": 0.5}})).is_err());
        assert_eq!(
            fb(json!({"rating": "thumbs_down"})).unwrap(),
            (Some(-1), None)
        );
        assert_eq!(fb(json!({"feedback": true})).unwrap(), (Some(1), None));
        assert_eq!(
            fb(json!({"feedback": "too verbose"})).unwrap(),
            (None, Some("too verbose".into()))
        );
        assert_eq!(
            fb(json!({"annotation": {"rating": -1, "comment": "wrong"}})).unwrap(),
            (Some(-1), Some("wrong".into()))
        );
        assert_eq!(
            fb(json!({"feedback": {"rating": "up", "text": "nice"}})).unwrap(),
            (Some(1), Some("nice".into()))
        );
        assert!(fb(json!({"rating": "meh"})).is_err());
        assert!(fb(json!({"rating": [1]})).is_err());
        assert_eq!(fb(json!({"content": "x"})).unwrap(), (None, None));
    }

    #[test]
    fn template_tails_are_cut() {
        assert_eq!(strip_template_tail("Hello<|im_end|>\n"), "Hello");
        assert_eq!(strip_template_tail("Hi\n<|eot_id|>"), "Hi");
        assert_eq!(strip_template_tail("plain reply\n"), "plain reply\n");
    }

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
    fn messages_follow_serves_rules() {
        let check = |m: Json| check_message(3, &m).map_err(|e| e.to_string());
        assert!(check(json!({"role": "user", "content": "hi"})).is_ok());
        assert!(
            check(json!({"role": "developer", "content": [{"type": "text", "text": "x"}]})).is_ok()
        );
        assert!(check(json!({"role": "assistant", "content": null, "tool_calls": []})).is_ok());
        let err = check(json!({"role": "hacker", "content": "hi"})).unwrap_err();
        assert!(err.contains("`messages[3].role` \"hacker\""), "{err}");
        let err = check(json!({"role": "user", "content": 5})).unwrap_err();
        assert!(
            err.contains("`messages[3].content`") && err.contains("a number"),
            "{err}"
        );
        let err = check(json!({"role": "user", "content": [{"type": "image_url"}]})).unwrap_err();
        assert!(err.contains("`messages[3].content[0].type`"), "{err}");
        let err = check(json!({"role": "user", "tool_calls": []})).unwrap_err();
        assert!(err.contains("tool_calls"), "{err}");
        let err = check(json!({"role": "tool"})).unwrap_err();
        assert!(err.contains("`messages[3].content` is missing"), "{err}");
        assert!(check(json!({"role": 1}))
            .unwrap_err()
            .contains("must be a string"));
    }

    #[test]
    fn first_lines_are_found_whole() {
        assert_eq!(first_line(b"\n \r\nab\r\ncd"), Some((3, &b"ab"[..], true)));
        assert_eq!(first_line(b"abc"), Some((1, &b"abc"[..], false)));
        assert_eq!(first_line(b"\n\n"), None);
    }
}
