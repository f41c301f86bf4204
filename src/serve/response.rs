//! The two shapes of a chat completion response: one JSON body, or SSE chunks in
//! OpenAI's `chat.completion.chunk` format ending with `data: [DONE]`.
//!
//! Streaming: a first chunk with the role, one chunk per text piece, a
//! `tool_calls` delta when the reply held calls (their markup is never streamed as
//! content), a final chunk with `finish_reason` (and, with `logprobs`, the whole
//! `logprobs.content` list: the engine reports text pieces, not tokens), then the
//! usage chunk with `stream_options.include_usage`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::fields::{POLICY_HEADER, SESSION_HEADER};
use super::session;
use super::tools::{ToolCall, ToolStreamFilter};
use crate::model::Generation;

/// A finished generation, as the response and the row need it.
pub struct Outcome {
    pub generation: Generation,
    /// Content without tool call markup (all of the text when there are no tools).
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: &'static str,
    pub logprobs: Option<Json>,
}

/// What a generation job tells the response side: text as it is produced, then the end.
pub enum Event {
    Piece(String),
    Done(Result<Box<Outcome>, String>),
}

/// What the response builders need besides the outcome.
pub struct Meta {
    pub id: String,
    pub created: i64,
    pub model: String,
    pub prompt_tokens: usize,
    /// Streamed with tools offered: their names (the filter holds calls back).
    pub stream_tools: Option<Vec<String>>,
    pub include_usage: bool,
    /// The policy (adapter step) answering: sent as `system_fingerprint`.
    pub policy_version: i64,
}

impl Meta {
    /// OpenAI's `usage`, with the prompt tokens the prefix cache served.
    pub fn usage(&self, generation: &Generation) -> Json {
        let completion_tokens = generation.token_ids.len();
        // An upstream stream learns its prompt's size only at the end.
        let prompt_tokens = self.prompt_tokens.max(generation.timing.prompt_tokens);
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": generation.timing.cached_tokens},
        })
    }

    /// OpenAI's field for "the backend configuration that answered".
    fn fingerprint(&self) -> String {
        format!("claw-policy-{}", self.policy_version)
    }

    fn chunk(&self, choices: Json) -> Json {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint(),
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Json::Null;
        }
        chunk
    }
}

pub async fn json_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let outcome = loop {
        match rx.recv().await {
            Some(Event::Piece(_)) => {}
            Some(Event::Done(Ok(outcome))) => break outcome,
            Some(Event::Done(Err(message))) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the generation ended without a result")),
        }
    };
    // OpenAI sends `content: null` on a reply that is only tool calls.
    let content = if outcome.content.is_empty() && !outcome.tool_calls.is_empty() {
        Json::Null
    } else {
        Json::String(outcome.content.clone())
    };
    let mut message = json!({"role": "assistant", "content": content});
    if !outcome.tool_calls.is_empty() {
        message["tool_calls"] = outcome.tool_calls.iter().map(ToolCall::to_json).collect();
    }
    let body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint(),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": outcome.logprobs,
            "finish_reason": outcome.finish_reason,
        }],
        "usage": meta.usage(&outcome.generation),
    });
    Ok(axum::Json(body).into_response())
}

fn sse(value: &Json) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The streaming state: SSE frames ready to send, the tool markup filter.
struct SseState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    frames: VecDeque<Bytes>,
    filter: Option<ToolStreamFilter>,
    done: bool,
}

impl SseState {
    fn content(&mut self, text: &str) {
        if !text.is_empty() {
            let chunk = self.meta.chunk(json!([{
                "index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
            }]));
            self.frames.push_back(sse(&chunk));
        }
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Piece(piece)) => {
                let text = match &mut self.filter {
                    Some(f) => f.push(&piece),
                    None => piece,
                };
                self.content(&text);
            }
            Some(Event::Done(Ok(outcome))) => {
                let mut calls = Vec::new();
                if let Some(filter) = self.filter.take() {
                    // Reuse the ids of the calls already parsed for the row.
                    let mut ids = outcome.tool_calls.iter().map(|c| c.id.clone());
                    let (rest, parsed) =
                        filter.finish(|| ids.next().unwrap_or_else(|| session::new_id("call_")));
                    self.content(&rest);
                    calls = parsed;
                    // As many as the reply has (`parallel_tool_calls: false` keeps one).
                    calls.truncate(outcome.tool_calls.len());
                }
                if !calls.is_empty() {
                    let deltas: Vec<Json> = calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| c.to_delta_json(i))
                        .collect();
                    let chunk = self.meta.chunk(json!([{
                        "index": 0, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null,
                    }]));
                    self.frames.push_back(sse(&chunk));
                }
                let chunk = self.meta.chunk(json!([{
                    "index": 0, "delta": {}, "logprobs": outcome.logprobs, "finish_reason": outcome.finish_reason,
                }]));
                self.frames.push_back(sse(&chunk));
                if self.meta.include_usage {
                    let mut chunk = self.meta.chunk(json!([]));
                    chunk["usage"] = self.meta.usage(&outcome.generation);
                    self.frames.push_back(sse(&chunk));
                }
                self.end();
            }
            Some(Event::Done(Err(message))) => {
                let err = ApiError::internal(message);
                self.frames.push_back(sse(&err.body()));
                self.end();
            }
            None => {
                let err = ApiError::internal("the generation ended without a result");
                self.frames.push_back(sse(&err.body()));
                self.end();
            }
        }
    }

    fn end(&mut self) {
        self.frames
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }
}

pub fn sse_response(meta: Meta, rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let first = meta.chunk(json!([{
        "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null,
    }]));
    let filter = meta.stream_tools.clone().map(ToolStreamFilter::new);
    let state = SseState {
        frames: VecDeque::from([sse(&first)]),
        meta,
        rx,
        filter,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.frames.pop_front() {
                return Some((Ok::<_, Infallible>(frame), st));
            }
            if st.done {
                return None;
            }
            let event = st.rx.recv().await;
            st.on_event(event);
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A chat response's own headers: its session (when it is a valid header
/// value) and the policy version that answered.
pub fn stamp_chat_headers(response: &mut Response, session_id: &str, version: i64) {
    if let Ok(v) = HeaderValue::from_str(session_id) {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
    response
        .headers_mut()
        .insert(POLICY_HEADER, HeaderValue::from(version));
}
