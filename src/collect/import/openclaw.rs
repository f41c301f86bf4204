//! OpenClaw-RL records (`openclaw`): one turn per line.

use anyhow::{anyhow, Result};
use serde_json::{json, Value as Json};

use super::row::{
    check_message, id_string, next_state_of, template_message, time_of, tools_of, turn_row,
    ImportContext, LineRows, TurnParts,
};

/// Texts that end an assistant turn in common templates; an imported reply that
/// was recorded with its template tail is cut at the first of them.
const END_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
];

/// One record as one row.
pub(super) fn line(line: &str, _n: usize, cx: &ImportContext) -> Result<LineRows> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_tails_are_cut() {
        assert_eq!(strip_template_tail("Hello<|im_end|>\n"), "Hello");
        assert_eq!(strip_template_tail("Hi\n<|eot_id|>"), "Hi");
        assert_eq!(strip_template_tail("plain reply\n"), "plain reply\n");
    }
}
