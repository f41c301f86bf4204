//! Request fields, read one way for every route that takes a body
//! (`/v1/chat/completions`, `/v1/feedback`): the body read under its size limit
//! and parsed as a JSON object, typed getters whose 400s name the field, and the
//! session fields, where a header (`X-Session-Id`, `X-Session-Done`) wins over
//! the body field (`session_id`, `session_done`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use futures_util::StreamExt;
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use crate::rollout::json_kind as kind;

pub const SESSION_HEADER: &str = "x-session-id";

/// Response header naming the policy version (adapter step) that answered.
pub const POLICY_HEADER: &str = "x-claw-policy-version";
pub const TURN_TYPE_HEADER: &str = "x-turn-type";
pub const SESSION_DONE_HEADER: &str = "x-session-done";

/// Longest accepted session id (it goes into every row and into log lines).
const MAX_SESSION_ID_LEN: usize = 256;

/// Bytes of an oversized body read and dropped before answering 413: a client
/// that is still sending when the server closes the connection sees a broken
/// pipe instead of the 413, so the server drains a bounded amount first.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// Longest wait for the next piece of a body.
const BODY_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a request body of at most `limit` bytes; larger gets 413 (after draining
/// up to [`DRAIN_LIMIT`] more so the client reads the answer).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    loop {
        let next = tokio::time::timeout(BODY_CHUNK_TIMEOUT, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    "timed out reading the request body",
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("cannot read the request body: {e}"),
            )
        })?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > limit.saturating_add(DRAIN_LIMIT) {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is {} bytes or more; this server accepts at most {limit} (--max-body-bytes)",
                total.min(limit.saturating_add(DRAIN_LIMIT))
            ),
        )
        .with_code("request_too_large"));
    }
    Ok(Bytes::from(buf))
}

/// Parses a request body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Json>, ApiError> {
    let value: Json = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not valid JSON: {e}"),
        )
        .with_code("invalid_json")
    })?;
    match value {
        Json::Object(map) => Ok(map),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "the request body must be a JSON object, got {}",
                kind(&other)
            ),
        )
        .with_code("invalid_json")),
    }
}

/// A field that is present and not null.
pub fn opt<'a>(body: &'a Map<String, Json>, field: &str) -> Option<&'a Json> {
    body.get(field).filter(|v| !v.is_null())
}

/// A number field (absent or null: `None`).
pub fn number(body: &Map<String, Json>, field: &str) -> Result<Option<f64>, ApiError> {
    match opt(body, field) {
        None => Ok(None),
        Some(Json::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(
            format!("`{field}` must be a number, got {}", kind(other)),
            field,
        )),
    }
}

/// A non-negative integer field (absent or null: `None`).
pub fn count(body: &Map<String, Json>, field: &str) -> Result<Option<u64>, ApiError> {
    match opt(body, field) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid(
                format!("`{field}` must be a non-negative integer, got {v}"),
                field,
            )
        }),
    }
}

/// A boolean field (absent or null: false).
pub fn boolean(body: &Map<String, Json>, field: &str) -> Result<bool, ApiError> {
    match opt(body, field) {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            format!("`{field}` must be a boolean, got {}", kind(other)),
            field,
        )),
    }
}

/// A string field (absent or null: `None`).
pub fn string<'a>(body: &'a Map<String, Json>, field: &str) -> Result<Option<&'a str>, ApiError> {
    string_value(body.get(field), field)
}

/// [`string`] on a value already taken out of the body.
pub fn string_value<'a>(value: Option<&'a Json>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::invalid(
            format!("`{field}` must be a string, got {}", kind(other)),
            field,
        )),
    }
}

/// The session id: the `X-Session-Id` header, else the body's `session_id`,
/// checked by [`validate_session_id`]; `None` when neither is there.
pub fn session_id(headers: &HeaderMap, body: Option<&Json>) -> Result<Option<String>, ApiError> {
    let id = match header(headers, SESSION_HEADER)? {
        Some(id) => id,
        None => match string_value(body, "session_id")? {
            Some(id) => id.to_string(),
            None => return Ok(None),
        },
    };
    validate_session_id(id).map(Some)
}

/// Whether the user is done with the session: the `X-Session-Done` header
/// (`1`, `true`, `yes`, `on`), else the body's `session_done` (a boolean, or
/// the same words or 1). One rule for chat requests and feedback.
pub fn parse_done(headers: &HeaderMap, body: Option<&Json>) -> Result<bool, ApiError> {
    if let Some(v) = header(headers, SESSION_DONE_HEADER)? {
        return Ok(truthy(&v));
    }
    match body {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(Json::String(s)) => Ok(truthy(s)),
        Some(Json::Number(n)) => Ok(n.as_f64() == Some(1.0)),
        Some(other) => Err(ApiError::invalid(
            format!("`session_done` must be a boolean, got {}", kind(other)),
            "session_done",
        )),
    }
}

/// `1`, `true`, `yes`, `on` (any case) mean yes.
fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// A session id, trimmed: 1 to 256 visible ASCII characters.
fn validate_session_id(id: String) -> Result<String, ApiError> {
    let id = id.trim().to_string();
    // It is echoed in the X-Session-Id response header, so it must be what a
    // header may carry: visible ASCII and spaces.
    if id.is_empty()
        || id.len() > MAX_SESSION_ID_LEN
        || !id.bytes().all(|b| (b' '..=b'~').contains(&b))
    {
        return Err(ApiError::invalid(
            format!("session id must be 1-{MAX_SESSION_ID_LEN} visible ASCII characters"),
            "session_id",
        ));
    }
    Ok(id)
}

/// A header's text; a 400 naming the header when it is not visible ASCII.
pub fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| ApiError::invalid(format!("header {name} is not visible ASCII"), name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn invalid_json_is_a_400() {
        let err = parse_object(b"{not json").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.body()["error"]["type"], "invalid_request_error");
        assert!(parse_object(b"[1]").is_err());
    }

    #[test]
    fn session_fields_header_first() {
        let mut headers = HeaderMap::new();
        assert_eq!(session_id(&headers, None).unwrap(), None);
        let body = json!("b1");
        assert_eq!(
            session_id(&headers, Some(&body)).unwrap().as_deref(),
            Some("b1")
        );
        let err = session_id(&headers, Some(&json!(5))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("session_id"));
        assert!(
            err.message.contains("must be a string, got a number"),
            "{}",
            err.message
        );
        assert!(session_id(&headers, Some(&json!(""))).is_err());
        headers.insert(SESSION_HEADER, " h1 ".parse().unwrap());
        assert_eq!(
            session_id(&headers, Some(&body)).unwrap().as_deref(),
            Some("h1")
        );
        assert!(!parse_done(&headers, None).unwrap());
        assert!(parse_done(&headers, Some(&json!("on"))).unwrap());
        assert!(parse_done(&headers, Some(&json!(1))).unwrap());
        assert!(parse_done(&headers, Some(&json!([]))).is_err());
        headers.insert(SESSION_DONE_HEADER, "no".parse().unwrap());
        assert!(!parse_done(&headers, Some(&json!(true))).unwrap());
    }
}
