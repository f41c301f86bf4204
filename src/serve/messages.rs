//! The messages and tools of a chat request, checked (a 400 names the field at
//! fault) and made ready for the chat template.

use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::fields::opt;
use crate::rollout::json_kind as kind;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The text of a message's `content`: a string, or an array of parts whose
/// `text` parts are joined. Non-text parts (images, audio) are refused.
fn content_text(content: &Json, at: &str) -> Result<Option<String>, ApiError> {
    match content {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                let p = format!("{at}[{i}]");
                match (part.get("type").and_then(Json::as_str), part.get("text")) {
                    (Some("text") | None, Some(Json::String(t))) => text.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(
                            format!(
                                "`{p}.type` {other:?} is not supported: this model reads text only"
                            ),
                            &p,
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            format!(
                            "`{p}` must be a text part {{\"type\": \"text\", \"text\": \"...\"}}"
                        ),
                            &p,
                        ))
                    }
                }
            }
            Ok(Some(text))
        }
        other => Err(ApiError::invalid(
            format!(
                "`{at}` must be a string or an array of text parts, got {}",
                kind(other)
            ),
            at,
        )),
    }
}

pub fn check_message(i: usize, message: &Json) -> Result<Json, ApiError> {
    let at = format!("messages[{i}]");
    let obj = message.as_object().ok_or_else(|| {
        ApiError::invalid(
            format!(
                "`{at}` must be an object with `role` and `content`, got {}",
                kind(message)
            ),
            &at,
        )
    })?;
    let role = match obj.get("role") {
        Some(Json::String(r)) => r.as_str(),
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`{at}.role` must be a string, got {}", kind(other)),
                &format!("{at}.role"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("`{at}` has no `role`"),
                &format!("{at}.role"),
            ))
        }
    };
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(
            format!(
                "`{at}.role` {role:?} is not one of system, user, assistant, tool (or developer)"
            ),
            &format!("{at}.role"),
        ));
    }
    let content = content_text(
        obj.get("content").unwrap_or(&Json::Null),
        &format!("{at}.content"),
    )?;
    let tool_calls = match obj.get("tool_calls") {
        None | Some(Json::Null) => None,
        Some(Json::Array(calls)) if role == "assistant" => Some(calls),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("`{at}.tool_calls` must be an array on an assistant message"),
                &format!("{at}.tool_calls"),
            ))
        }
    };
    if content.is_none() && tool_calls.is_none() {
        return Err(ApiError::invalid(
            format!(
                "`{at}.content` is missing (only an assistant message with tool_calls may omit it)"
            ),
            &format!("{at}.content"),
        ));
    }
    // Templates (Qwen, Hermes, SmolLM) concatenate `content` as a string and read
    // tool call arguments as an object.
    let mut out = obj.clone();
    let role = if role == "developer" { "system" } else { role };
    out.insert("role".into(), Json::String(role.into()));
    out.insert("content".into(), Json::String(content.unwrap_or_default()));
    if let Some(calls) = tool_calls {
        let mut fixed = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            let mut call = call.clone();
            let args = call.pointer_mut("/function/arguments").ok_or_else(|| {
                ApiError::invalid(
                    format!("`{at}.tool_calls[{j}]` needs function.name and function.arguments"),
                    &format!("{at}.tool_calls[{j}]"),
                )
            })?;
            if let Json::String(s) = args {
                if let Ok(parsed) = serde_json::from_str::<Json>(s) {
                    *args = parsed;
                }
            }
            fixed.push(call);
        }
        out.insert("tool_calls".into(), Json::Array(fixed));
    }
    Ok(Json::Object(out))
}

/// Recorded messages (`messages_json`: what the client sent) made ready for the
/// chat template exactly as serve made them for the policy: a stage that renders
/// a recorded turn again (distill-hints' teacher) must see the prompt the policy
/// saw, e.g. tool call arguments as objects, not as the JSON strings OpenAI
/// clients send (which the template would print quoted and escaped).
pub fn for_template(messages: &[Json]) -> anyhow::Result<Vec<Json>> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| check_message(i, m).map_err(|e| anyhow::anyhow!("{}", e.message)))
        .collect()
}

pub fn check_tools(tools: &Json) -> Result<Vec<Json>, ApiError> {
    let list = tools.as_array().ok_or_else(|| {
        ApiError::invalid(
            format!("`tools` must be an array, got {}", kind(tools)),
            "tools",
        )
    })?;
    for (i, tool) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        if tool.get("type").and_then(Json::as_str) != Some("function") {
            return Err(ApiError::invalid(
                format!("`{at}.type` must be \"function\""),
                &format!("{at}.type"),
            ));
        }
        let name = tool.pointer("/function/name").and_then(Json::as_str);
        if name.is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                format!("`{at}.function.name` must be a non-empty string"),
                &format!("{at}.function.name"),
            ));
        }
        if let Some(params) = tool.pointer("/function/parameters") {
            if !params.is_object() {
                return Err(ApiError::invalid(
                    format!("`{at}.function.parameters` must be a JSON Schema object"),
                    &format!("{at}.function.parameters"),
                ));
            }
        }
        // OpenClaw sends `strict: false` (when told its endpoint "supports strict
        // mode"); `true` promises arguments that match the schema exactly, which
        // needs constrained decoding.
        match tool.pointer("/function/strict") {
            None | Some(Json::Null) | Some(Json::Bool(false)) => {}
            Some(Json::Bool(true)) => {
                return Err(ApiError::invalid(
                    format!(
                        "`{at}.function.strict: true` is not supported: this server does not \
                         constrain tool call arguments to the schema (send false or omit it)"
                    ),
                    &format!("{at}.function.strict"),
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "`{at}.function.strict` must be a boolean, got {}",
                        kind(other)
                    ),
                    &format!("{at}.function.strict"),
                ))
            }
        }
    }
    Ok(list.clone())
}

/// `tool_choice`: whether the tools are shown at all ("none" hides them). A
/// named function must be one of `tools`; "required" or a named function needs
/// tools to choose from. (Neither forces a call: the model is shown the tools and
/// decides, as with "auto".)
pub fn check_tool_choice(
    body: &Map<String, Json>,
    tools: Option<&[Json]>,
) -> Result<bool, ApiError> {
    let has_tools = tools.is_some_and(|t| !t.is_empty());
    let needs_tools = |what: &str| {
        if has_tools {
            Ok(true)
        } else {
            Err(ApiError::invalid(
                format!("`tool_choice` {what} needs a non-empty `tools` list"),
                "tool_choice",
            ))
        }
    };
    match opt(body, "tool_choice") {
        None => Ok(true),
        Some(Json::String(s)) if s == "none" => Ok(false),
        Some(Json::String(s)) if s == "auto" => Ok(true),
        Some(Json::String(s)) if s == "required" => needs_tools("\"required\""),
        Some(Json::Object(choice)) => {
            let Some(name) = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Json::as_str)
            else {
                // Other object forms (e.g. `allowed_tools`) only restrict choice.
                return Ok(true);
            };
            let known = tools
                .unwrap_or_default()
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Json::as_str) == Some(name));
            if !known {
                return Err(ApiError::invalid(
                    format!("`tool_choice` names the function {name:?}, which is not in `tools`"),
                    "tool_choice.function.name",
                ));
            }
            needs_tools("naming a function")
        }
        Some(other) => Err(ApiError::invalid(
            format!(
                "`tool_choice` must be \"none\", \"auto\", \"required\" or an object, got {other}"
            ),
            "tool_choice",
        )),
    }
}
