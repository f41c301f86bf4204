//! What the import formats share: the context rows take their defaults from,
//! the message rules, the field readers (ids, tools, ratings, times) and the row
//! built from one turn.

use anyhow::{anyhow, Result};
use serde_json::{Map, Value as Json};

use super::retokenize::{Encoded, Retokenizer};
use crate::collect::raw::content_text;
use crate::rollout::json_kind as kind;
use crate::rollout::RolloutRow;

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

pub(super) struct LineRows {
    pub(super) rows: Vec<RolloutRow>,
    pub(super) no_response: u64,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The rules `claw serve` applies to a request's messages: a known role, text
/// content (a string or text parts), tool calls only on an assistant message.
/// An assistant message may hold neither text nor calls (a reply that came
/// back empty; it is counted, not imported).
pub(super) fn check_message(i: usize, m: &Json) -> Result<()> {
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

pub(super) struct TurnParts {
    pub(super) sample_id: String,
    pub(super) session_id: String,
    pub(super) turn: i32,
    pub(super) created_at: i64,
    pub(super) model: String,
    pub(super) messages: Json,
    pub(super) tools: Option<Vec<Json>>,
    pub(super) tool_calls: Option<Json>,
    pub(super) enc: Encoded,
    pub(super) next_state: Option<(String, String)>,
    pub(super) rating: Option<i8>,
    pub(super) feedback_text: Option<String>,
}

pub(super) fn turn_row(p: TurnParts) -> RolloutRow {
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
pub(super) fn template_message(m: &Json) -> Json {
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

pub(super) fn next_state_of(m: &Json) -> Option<(String, String)> {
    let role = m.get("role")?.as_str()?;
    (role == "user" || role == "tool").then(|| {
        (
            role.to_string(),
            m.get("content").map(content_text).unwrap_or_default(),
        )
    })
}

pub(super) fn tools_of(obj: &Map<String, Json>) -> Result<Option<Vec<Json>>> {
    match obj.get("tools") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(a)) if a.is_empty() => Ok(None),
        Some(Json::Array(a)) => Ok(Some(a.clone())),
        Some(other) => Err(anyhow!("`tools` must be a list, got {other}")),
    }
}

pub(super) fn id_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A rating and a text from an assistant message's feedback fields.
pub(super) fn feedback_of(m: &Map<String, Json>) -> Result<(Option<i8>, Option<String>)> {
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
pub(super) fn time_of(obj: &Map<String, Json>) -> Result<Option<i64>> {
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
    use serde_json::json;

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
}
