//! Turning `claw serve`'s raw rows into pairing events, column by column.
//!
//! What serve records (src/serve/chat.rs, routes.rs): one row per answered chat
//! request (`turn_type` `main` or `side`, `messages_json` = the request's
//! messages, `session_done` = the request's X-Session-Done) and one row per
//! feedback event (`turn_type` `feedback`, `feedback`/`feedback_text`, `turn`,
//! and `messages_json` = `{"response_id", "turn", "rating", "text"}`).

use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int8Type, TimestampMillisecondType};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value as Json;

use super::pair::{Event, EventKind, NextState, RowRef};
use crate::rollout::RolloutBatch;

/// The events of one record batch, and the batch itself if any of its rows can
/// become a sample (a main turn with a response). The batch is kept whole rather
/// than filtered: copying out the main turns costs more time than the side and
/// feedback rows cost memory.
pub(crate) struct BatchEvents {
    /// `None` when no row of the batch can become a sample.
    pub kept: Option<RecordBatch>,
    /// `row.batch` is 0 here; the caller sets the held batch's index.
    pub events: Vec<Event>,
    /// `messages_json` values that are not a JSON array of messages (their turn
    /// gets no next state from them).
    pub bad_messages: u64,
}

/// Reads the columns pairing needs. `batch` must be normalised (the reader does
/// that), so claw columns have their canonical types.
pub(crate) fn batch_events(batch: &RolloutBatch) -> Result<BatchEvents> {
    let at = |i: usize| format!("{}: row {}", batch.source, batch.first_row + i as u64 + 1);
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .with_context(|| format!("{}: column `{name}` is missing", batch.source))
    };
    let session = col("session_id")?.as_string::<i32>();
    let turn_type = col("turn_type")?.as_string::<i32>();
    let created = col("created_at")?.as_primitive::<TimestampMillisecondType>();
    let sample_id = col("sample_id")?.as_string::<i32>();
    let messages = col("messages_json")?.as_string::<i32>();
    let response_ids = col("response_ids")?.as_list::<i32>();
    let done = batch.column_by_name("session_done").map(|a| a.as_boolean());
    let fb_rating = batch
        .column_by_name("feedback")
        .map(|a| a.as_primitive::<Int8Type>());
    let fb_text = batch
        .column_by_name("feedback_text")
        .map(|a| a.as_string::<i32>());
    let turn_col = batch
        .column_by_name("turn")
        .map(|a| a.as_primitive::<Int32Type>());

    let n = batch.num_rows();
    let mut events = Vec::with_capacity(n);
    let mut bad_messages = 0;
    let mut kept_rows = 0u32;
    for i in 0..n {
        let is_done = done.is_some_and(|d| d.is_valid(i) && d.value(i));
        let kind = match turn_type.value(i) {
            "main" => {
                let has_response = !response_ids.value(i).is_empty();
                let next_state = match next_state(messages.value(i)) {
                    Ok(m) => m,
                    Err(_) => {
                        bad_messages += 1;
                        None
                    }
                };
                let row = has_response.then(|| {
                    kept_rows += 1;
                    RowRef {
                        batch: 0,
                        row: i as u32,
                    }
                });
                EventKind::Main {
                    sample_id: sample_id.value(i).to_string(),
                    row,
                    next_state,
                }
            }
            "side" => EventKind::Side,
            "feedback" => {
                let event: Json = serde_json::from_str(messages.value(i)).unwrap_or(Json::Null);
                let rating = match fb_rating.filter(|a| a.is_valid(i)) {
                    Some(a) => Some(a.value(i)),
                    None => event["rating"]
                        .as_i64()
                        .and_then(|r| i8::try_from(r.signum()).ok()),
                };
                let text = match fb_text.filter(|a| a.is_valid(i)) {
                    Some(a) => Some(a.value(i).to_string()),
                    None => event["text"].as_str().map(str::to_string),
                };
                let turn = match turn_col.filter(|a| a.is_valid(i)) {
                    Some(a) => Some(a.value(i)),
                    None => event["turn"].as_i64().and_then(|t| i32::try_from(t).ok()),
                };
                let response_id = event["response_id"].as_str().map(str::to_string);
                if rating.is_none() && text.is_none() {
                    crate::debug!("{}: a feedback row with neither rating nor text", at(i));
                }
                EventKind::Feedback {
                    response_id,
                    turn,
                    rating,
                    text,
                }
            }
            _ => EventKind::Unknown,
        };
        events.push(Event {
            time: created.value(i),
            session: Arc::from(session.value(i)),
            done: is_done,
            kind,
        });
    }
    let kept = (kept_rows > 0).then(|| batch.batch.clone());
    Ok(BatchEvents {
        kept,
        events,
        bad_messages,
    })
}

/// The next state a request carries: what came after its last assistant message
/// (the user's reply, or the results of the turn's tool calls, all of them when
/// the calls were parallel), if those are user or tool messages: their texts
/// joined by a blank line, with the role of the last one. Errors if
/// `messages_json` is not a JSON array.
///
/// Runtime context that the client itself appends is no one's answer to the turn
/// and is left out: OpenClaw ends every request with a user message holding only
/// an `<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>` block ("runtime-generated, not
/// user-authored", as OpenClaw strips it itself before comparing messages).
///
/// Only that tail is parsed: the earlier messages are skipped as raw JSON (no
/// strings are unescaped or copied), which matters because `messages_json` holds
/// the whole conversation so far.
pub(crate) fn next_state(messages_json: &str) -> Result<Option<NextState>> {
    let Elements(all) = serde_json::from_str(messages_json)?;
    let mut role = None;
    let mut texts = Vec::new();
    for raw in all.iter().rev() {
        let m: Message = serde_json::from_str(raw.get())?;
        let Some(r) = m.role.filter(|r| r == "user" || r == "tool") else {
            break;
        };
        let text = m.content.as_ref().map(content_text).unwrap_or_default();
        let answer = strip_runtime_context(&text);
        if answer.len() < text.len() && answer.trim().is_empty() {
            continue;
        }
        role.get_or_insert(r);
        texts.push(answer);
    }
    texts.reverse();
    Ok(role.map(|role| NextState {
        role,
        text: texts.join("\n\n"),
    }))
}

const RUNTIME_CONTEXT_BEGIN: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";
const RUNTIME_CONTEXT_END: &str = "<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";

/// `text` without OpenClaw's internal runtime context blocks (an unterminated
/// block runs to the end), trimmed when there was one.
fn strip_runtime_context(text: &str) -> String {
    if !text.contains(RUNTIME_CONTEXT_BEGIN) {
        return text.to_string();
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(RUNTIME_CONTEXT_BEGIN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + RUNTIME_CONTEXT_BEGIN.len()..];
        rest = after
            .find(RUNTIME_CONTEXT_END)
            .map_or("", |end| &after[end + RUNTIME_CONTEXT_END.len()..]);
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// A message's text: a string as is, a list of parts as their texts joined by
/// newlines (multimodal and Responses-style content), null as empty.
pub(crate) fn content_text(content: &Json) -> String {
    match content {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        Json::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| match p {
                    Json::String(s) => Some(s.as_str()),
                    Json::Object(o) => o.get("text").and_then(Json::as_str),
                    _ => None,
                })
                .collect();
            texts.join("\n")
        }
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Json>,
}

/// The elements of a JSON array, as raw JSON borrowed from the input.
struct Elements<'a>(Vec<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Elements<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Elements<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elements<'a>, A::Error> {
                let mut all = Vec::new();
                while let Some(m) = seq.next_element::<&'de RawValue>()? {
                    all.push(m);
                }
                Ok(Elements(all))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_state_is_what_followed_the_last_assistant_message() {
        let ns = |j: &str| next_state(j).unwrap().map(|n| (n.role, n.text));
        assert_eq!(
            ns(r#"[{"role":"system","content":"s"},{"role":"user","content":"hi"}]"#),
            Some(("user".into(), "hi".into()))
        );
        assert_eq!(
            ns(
                r#"[{"role":"tool","tool_call_id":"c1","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#
            ),
            Some(("tool".into(), "a\nb".into()))
        );
        assert_eq!(
            ns(r#"[{"role":"user","content":"q"},{"role":"assistant","content":"prefill"}]"#),
            None
        );
        assert_eq!(ns("[]"), None);
        assert!(next_state("{\"not\": \"a list\"}").is_err());
        assert!(next_state("[{\"role\":").is_err());
        // The results of parallel tool calls, all of them.
        assert_eq!(
            ns(
                r#"[{"role":"user","content":"q"},{"role":"assistant","content":null,"tool_calls":[]},{"role":"tool","content":"a"},{"role":"tool","content":"b"}]"#
            ),
            Some(("tool".into(), "a\n\nb".into()))
        );
        assert_eq!(
            ns(
                r#"[{"role":"assistant","content":"x"},{"role":"user","content":"one"},{"role":"user","content":"two"}]"#
            ),
            Some(("user".into(), "one\n\ntwo".into()))
        );
    }

    #[test]
    fn openclaw_runtime_context_is_not_the_next_state() {
        let ns = |j: &str| next_state(j).unwrap().map(|n| (n.role, n.text));
        // What OpenClaw sends (fixtures/openclaw): the turn's tool results, then
        // its runtime context as a content-parts user message.
        let body: Json = serde_json::from_str(include_str!(
            "../../fixtures/openclaw/compat-tool-round.json"
        ))
        .unwrap();
        let (role, text) = ns(&body["messages"].to_string()).unwrap();
        assert_eq!(role, "tool");
        assert!(text.starts_with("\".git/\"\n\"AGENTS.md\""), "{text}");
        assert!(text.contains("\n\n# AGENTS.md - Your Workspace"), "{text}");
        assert!(!text.contains("OPENCLAW_INTERNAL_CONTEXT"), "{text}");
        // The user's next message of a session.
        let body: Json =
            serde_json::from_str(include_str!("../../fixtures/openclaw/session-turn2.json"))
                .unwrap();
        assert_eq!(
            ns(&body["messages"].to_string()),
            Some((
                "user".into(),
                "[Thu 2026-12-03 12:53 UTC] Thanks. And what is 3+3?".into()
            ))
        );
        // Context inside a message is cut out of it; a message of context only,
        // with nothing else after the assistant, is no next state.
        assert_eq!(
            ns(
                r#"[{"role":"assistant","content":"x"},{"role":"user","content":"ok\n<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nctx\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>"}]"#
            ),
            Some(("user".into(), "ok".into()))
        );
        assert_eq!(
            ns(
                r#"[{"role":"assistant","content":"x"},{"role":"user","content":"<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>ctx<<<END_OPENCLAW_INTERNAL_CONTEXT>>>"}]"#
            ),
            None
        );
    }
}
