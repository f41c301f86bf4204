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
                let next_state = match last_message(messages.value(i)) {
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

/// The next state a request carries: its last message, if that is a user or tool
/// message, as (role, text). Errors if `messages_json` is not a JSON array.
///
/// Only the last message is parsed: the others are skipped as raw JSON (no
/// strings are unescaped or copied), which matters because `messages_json` holds
/// the whole conversation so far.
pub(crate) fn last_message(messages_json: &str) -> Result<Option<NextState>> {
    let LastOf(last) = serde_json::from_str(messages_json)?;
    let Some(raw) = last else {
        return Ok(None);
    };
    let m: Message = serde_json::from_str(raw.get())?;
    Ok(m.role.and_then(|role| {
        if role != "user" && role != "tool" {
            return None;
        }
        let text = m.content.as_ref().map(content_text).unwrap_or_default();
        Some(NextState { role, text })
    }))
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

/// The last element of a JSON array, as raw JSON borrowed from the input.
struct LastOf<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for LastOf<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = LastOf<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LastOf<'a>, A::Error> {
                let mut last = None;
                while let Some(m) = seq.next_element::<&'de RawValue>()? {
                    last = Some(m);
                }
                Ok(LastOf(last))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_state_is_the_last_user_or_tool_message() {
        let ns = |j: &str| last_message(j).unwrap().map(|n| (n.role, n.text));
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
        assert!(last_message("{\"not\": \"a list\"}").is_err());
        assert!(last_message("[{\"role\":").is_err());
    }
}
