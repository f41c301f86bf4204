//! The OpenAI wire format: the error body, and a chat request checked field by
//! field so every 400 names the field at fault.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Map, Value as Json};

use super::session::kind;

/// An error answered with the OpenAI error body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about one request field.
    pub fn invalid(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.to_string());
        e
    }

    pub fn not_found(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        e.param = Some(param.to_string());
        e.code = Some("not_found");
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Json {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

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

/// A checked `POST /v1/chat/completions` request (session fields already removed).
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The messages as the client sent them (recorded in `messages_json`).
    pub messages: Vec<Json>,
    /// The messages as the template gets them: content parts joined into one
    /// string, tool call arguments parsed into objects.
    pub template_messages: Vec<Json>,
    pub tools: Option<Vec<Json>>,
    /// False with `tool_choice: "none"`: tools are neither shown nor parsed.
    pub use_tools: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Alternatives per token in `logprobs` (0-20).
    pub top_logprobs: usize,
    pub ignore_eos: bool,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
const MAX_STOPS: usize = 16;

fn opt<'a>(body: &'a Map<String, Json>, field: &str) -> Option<&'a Json> {
    body.get(field).filter(|v| !v.is_null())
}

fn number(body: &Map<String, Json>, field: &str) -> Result<Option<f64>, ApiError> {
    match opt(body, field) {
        None => Ok(None),
        Some(Json::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(
            format!("`{field}` must be a number, got {}", kind(other)),
            field,
        )),
    }
}

fn count(body: &Map<String, Json>, field: &str) -> Result<Option<u64>, ApiError> {
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

fn boolean(body: &Map<String, Json>, field: &str) -> Result<bool, ApiError> {
    match opt(body, field) {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            format!("`{field}` must be a boolean, got {}", kind(other)),
            field,
        )),
    }
}

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

fn check_message(i: usize, message: &Json) -> Result<Json, ApiError> {
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

fn check_tools(tools: &Json) -> Result<Vec<Json>, ApiError> {
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
    }
    Ok(list.clone())
}

impl ChatRequest {
    /// Checks every field the server uses; unknown fields are ignored, as OpenAI-
    /// compatible servers do (clients send vendor extensions).
    pub fn from_body(body: &Map<String, Json>) -> Result<Self, ApiError> {
        let messages = match body.get("messages") {
            None | Some(Json::Null) => {
                return Err(ApiError::invalid("`messages` is required", "messages"))
            }
            Some(Json::Array(m)) if m.is_empty() => {
                return Err(ApiError::invalid(
                    "`messages` must not be empty",
                    "messages",
                ))
            }
            Some(Json::Array(m)) => m.clone(),
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`messages` must be an array, got {}", kind(other)),
                    "messages",
                ))
            }
        };
        let template_messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| check_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;

        if let Some(n) = count(body, "n")? {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("`n` must be 1 (this server returns one choice), got {n}"),
                    "n",
                ));
            }
        }
        let tools = match opt(body, "tools") {
            None => None,
            Some(t) => Some(check_tools(t)?),
        };
        let use_tools = match opt(body, "tool_choice") {
            None => true,
            Some(Json::String(s)) if s == "none" => false,
            Some(Json::String(s)) if s == "auto" || s == "required" => true,
            Some(Json::Object(_)) => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`tool_choice` must be \"none\", \"auto\", \"required\" or an object, got {other}"),
                    "tool_choice",
                ))
            }
        };

        let temperature = number(body, "temperature")?.map(|t| t as f32);
        if let Some(t) = temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    format!("`temperature` must be between 0 and 2, got {t}"),
                    "temperature",
                ));
            }
        }
        let top_p = number(body, "top_p")?.map(|t| t as f32);
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    format!("`top_p` must be in (0, 1], got {p}"),
                    "top_p",
                ));
            }
        }
        let top_k = count(body, "top_k")?.map(|k| k as usize);
        let max_tokens = match count(body, "max_completion_tokens")? {
            Some(n) => Some(("max_completion_tokens", n)),
            None => count(body, "max_tokens")?.map(|n| ("max_tokens", n)),
        };
        if let Some((field, 0)) = max_tokens {
            return Err(ApiError::invalid(
                format!("`{field}` must be at least 1"),
                field,
            ));
        }
        let max_tokens = max_tokens.map(|(_, n)| usize::try_from(n).unwrap_or(usize::MAX));

        let stop = match opt(body, "stop") {
            None => Vec::new(),
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(list)) => list
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::invalid("`stop` must be a string or a list of strings", "stop")
                })?,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "`stop` must be a string or a list of strings, got {}",
                        kind(other)
                    ),
                    "stop",
                ))
            }
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                format!("`stop` takes at most {MAX_STOPS} non-empty strings"),
                "stop",
            ));
        }
        let seed = match opt(body, "seed") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_i64().map(|s| s as u64))
                    .ok_or_else(|| {
                        ApiError::invalid(format!("`seed` must be an integer, got {v}"), "seed")
                    })?,
            ),
        };
        let stream = boolean(body, "stream")?;
        let include_usage = match opt(body, "stream_options") {
            None => false,
            Some(Json::Object(o)) => match o.get("include_usage") {
                None | Some(Json::Null) => false,
                Some(Json::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!(
                            "`stream_options.include_usage` must be a boolean, got {}",
                            kind(other)
                        ),
                        "stream_options.include_usage",
                    ))
                }
            },
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`stream_options` must be an object, got {}", kind(other)),
                    "stream_options",
                ))
            }
        };
        let logprobs = boolean(body, "logprobs")?;
        let top_logprobs = match count(body, "top_logprobs")? {
            Some(k) if k > 20 => {
                return Err(ApiError::invalid(
                    format!("`top_logprobs` must be between 0 and 20, got {k}"),
                    "top_logprobs",
                ));
            }
            Some(k) => k as usize,
            None => 0,
        };
        Ok(ChatRequest {
            messages,
            template_messages,
            tools,
            use_tools,
            temperature,
            top_p,
            top_k,
            max_tokens,
            stop,
            seed,
            stream,
            include_usage,
            logprobs,
            top_logprobs,
            ignore_eos: boolean(body, "ignore_eos")?,
        })
    }

    /// The tools the template sees and the output parser looks for.
    pub fn active_tools(&self) -> Option<&[Json]> {
        match &self.tools {
            Some(t) if self.use_tools && !t.is_empty() => Some(t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Json) -> Result<ChatRequest, ApiError> {
        ChatRequest::from_body(v.as_object().unwrap())
    }

    #[test]
    fn accepts_a_full_request() {
        let r = req(json!({
            "model": "x",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "temperature": 0, "top_p": 0.9, "max_completion_tokens": 5, "stop": "\n", "seed": 7,
            "n": 1, "stream": true, "stream_options": {"include_usage": true}, "logprobs": true,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        }))
        .unwrap();
        assert_eq!(r.template_messages[1]["content"], "hi there");
        assert_eq!(
            r.template_messages[2]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        assert_eq!(r.messages[1]["content"][0]["text"], "hi ");
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.stop, ["\n"]);
        assert!(r.stream && r.include_usage && r.logprobs);
        assert_eq!(r.active_tools().map(<[Json]>::len), Some(1));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stop": [1]}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}),
                "tools[0].function.name",
            ),
        ];
        for (body, param) in cases {
            let err = req(body.clone()).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            assert!(
                err.message
                    .contains(param.split('.').next().unwrap().split('[').next().unwrap()),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn invalid_json_is_a_400() {
        let err = parse_object(b"{not json").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.body()["error"]["type"], "invalid_request_error");
        assert!(parse_object(b"[1]").is_err());
    }
}
