//! OpenAI chat format (`openai`): one conversation per line.

use anyhow::{anyhow, Context, Result};
use serde_json::Value as Json;

use super::row::{
    check_message, feedback_of, id_string, next_state_of, template_message, time_of, tools_of,
    turn_row, ImportContext, LineRows, TurnParts,
};
use crate::collect::raw::content_text;

/// Every assistant message of one conversation as a row.
pub(super) fn line(line: &str, n: usize, cx: &ImportContext) -> Result<LineRows> {
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
