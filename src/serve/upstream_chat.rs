//! `POST /v1/chat/completions` with `--upstream` (called by `chat.rs` after its
//! checks), and the server without a local model: the [`Upstream`] client
//! generates, this records the turn and answers as the local engine would.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::response::Response;
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::error::ApiError;
use super::reload::Policy;
use super::request::ChatRequest;
use super::response::{json_response, sse_response, stamp_chat_headers, Event, Meta, Outcome};
use super::session::{self, SessionInfo};
use super::state::AppState;
use super::tools::ToolCall;
use super::upstream::{Reply, TokenSource, Upstream};
use crate::clock::unix_ms;
use crate::model::generate::Timing;
use crate::model::{FinishReason, Generation};
use crate::rollout::RolloutRow;

/// `POST /v1/chat/completions` in upstream mode: called by the chat handler
/// after the request is checked and admitted.
pub async fn handle(
    state: Arc<AppState>,
    upstream: Arc<Upstream>,
    permit: OwnedSemaphorePermit,
    session: SessionInfo,
    request: ChatRequest,
    started: Instant,
) -> Result<Response, ApiError> {
    let limit = state.config.max_tokens_limit;
    let max_tokens = match request.max_tokens {
        Some(m) if m > limit => {
            let field = request.max_tokens_field;
            return Err(ApiError::invalid(
                format!(
                    "`{field}` is {m}, more than this server allows ({limit}, --max-tokens-limit)"
                ),
                field,
            ));
        }
        Some(m) => m,
        None => limit,
    };
    let turn = Turn {
        id: session::new_id("chatcmpl-"),
        created_ms: unix_ms(),
        started,
        policy: state.policies.current(),
        session,
        request,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let meta = Meta {
        id: turn.id.clone(),
        created: turn.created_ms / 1000,
        model: upstream.model.clone(),
        prompt_tokens: 0,
        stream_tools: (turn.request.stream && turn.request.active_tools().is_some())
            .then(|| turn.request.tool_names()),
        include_usage: turn.request.include_usage,
        policy_version: turn.policy.version,
    };
    let stream = turn.request.stream;
    let session_id = turn.session.session_id.clone();
    let version = turn.policy.version;
    // llama-server gives no log-probs with tools in a streamed reply: those
    // requests are generated whole and sent as one chunk.
    let mut response = if stream && turn.request.active_tools().is_none() {
        let (connected, ready) = oneshot::channel();
        let runtime = tokio::runtime::Handle::current();
        let job_state = state.clone();
        tokio::task::spawn_blocking(move || {
            let adapter = turn.policy.engine_name.as_deref();
            let result = upstream.stream(&turn.request, max_tokens, adapter, &tx, connected);
            let Some(result) = result else {
                return; // the client went away, or the call failed before it began
            };
            match result {
                Ok((reply, prompt_text, source)) => {
                    let (outcome, row) =
                        finish(&job_state, &upstream, &turn, reply, prompt_text, source);
                    runtime.block_on(job_state.recorder.record(row));
                    let _ = tx.send(Event::Done(Ok(Box::new(outcome))));
                }
                Err(e) => {
                    crate::warn!("request {}: {}", turn.id, e.message);
                    let _ = tx.send(Event::Done(Err(e.message)));
                }
            }
            drop(permit);
        });
        match ready.await {
            Ok(Ok(())) => sse_response(meta, rx),
            Ok(Err(e)) => {
                crate::warn!("request {}: {}", meta.id, e.message);
                return Err(e.into());
            }
            Err(_) => return Err(ApiError::internal("the upstream call failed")),
        }
    } else {
        let (turn, result) = {
            let upstream = upstream.clone();
            tokio::task::spawn_blocking(move || {
                let adapter = turn.policy.engine_name.as_deref();
                let result = upstream.complete(&turn.request, max_tokens, adapter);
                (turn, result)
            })
            .await
            .map_err(|e| ApiError::internal(format!("the upstream call failed: {e}")))?
        };
        let (reply, prompt_text, source) = result.map_err(|e| {
            crate::warn!("request {}: {}", turn.id, e.message);
            ApiError::from(e)
        })?;
        let (outcome, row) = finish(&state, &upstream, &turn, reply, prompt_text, source);
        state.recorder.record(row).await;
        let meta = Meta {
            prompt_tokens: outcome.generation.timing.prompt_tokens,
            ..meta
        };
        if !outcome.generation.text.is_empty() {
            let _ = tx.send(Event::Piece(outcome.generation.text.clone()));
        }
        let _ = tx.send(Event::Done(Ok(Box::new(outcome))));
        drop(tx);
        drop(permit);
        if stream {
            sse_response(meta, rx)
        } else {
            json_response(meta, rx).await?
        }
    };
    stamp_chat_headers(&mut response, &session_id, version);
    Ok(response)
}

/// One request in upstream mode, as the row needs it.
struct Turn {
    id: String,
    created_ms: i64,
    started: Instant,
    /// The policy the request was admitted under, held to its end (so the old
    /// adapter is unloaded from the engine only after its last request).
    policy: Arc<Policy>,
    session: SessionInfo,
    request: ChatRequest,
}

/// The reply as the response builders see it, and its row; counts it in the
/// metrics and the session.
fn finish(
    state: &AppState,
    upstream: &Upstream,
    turn: &Turn,
    reply: Reply,
    prompt_text: String,
    source: TokenSource,
) -> (Outcome, RolloutRow) {
    let request = &turn.request;
    // Claw parses tool calls from the text as it does for its own engine, unless
    // the engine already did (its `message.tool_calls`).
    let (content, tool_calls) = if reply.tool_calls.is_empty() {
        request.reply_tool_calls(&reply.content, || session::new_id("call_"))
    } else {
        (reply.content.clone(), reply.tool_calls.clone())
    };
    let finish_reason: &'static str = if !tool_calls.is_empty() {
        "tool_calls"
    } else {
        match reply.finish_reason.as_str() {
            "length" => "length",
            _ => "stop",
        }
    };
    let completion_ids = reply.completion_ids.clone().unwrap_or_default();
    let logprobs = reply.logprobs.clone().unwrap_or_default();
    let prompt_ids = reply.prompt_ids.clone().unwrap_or_default();
    let prompt_tokens = reply.prompt_tokens.unwrap_or(prompt_ids.len());
    let generation = Generation {
        token_ids: completion_ids.clone(),
        logprobs: logprobs.clone(),
        top_logprobs: Vec::new(),
        text: reply.content.clone(),
        finish_reason: if finish_reason == "length" {
            FinishReason::Length
        } else {
            FinishReason::Stop
        },
        timing: Timing {
            prompt_tokens,
            cached_tokens: 0,
            prefill_s: 0.0,
            completion_tokens: reply.completion_tokens.unwrap_or(completion_ids.len()),
            decode_s: turn.started.elapsed().as_secs_f64(),
        },
    };
    let outcome = Outcome {
        generation,
        content,
        tool_calls,
        finish_reason,
        logprobs: request.logprobs.then(|| {
            reply
                .logprobs_json
                .clone()
                .unwrap_or_else(|| json!({"content": []}))
        }),
    };
    let metrics = &state.metrics;
    metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Relaxed);
    metrics
        .completion_tokens
        .fetch_add(outcome.generation.timing.completion_tokens as u64, Relaxed);
    metrics.observe_latency(turn.started.elapsed().as_secs_f64());
    state.sessions.add_response(&turn.session, &turn.id);
    let to_i32 = |ids: &[u32]| ids.iter().map(|&i| i as i32).collect::<Vec<_>>();
    let row = RolloutRow {
        sample_id: turn.id.clone(),
        session_id: turn.session.session_id.clone(),
        turn_type: turn.session.turn_type.as_str().to_string(),
        session_done: Some(turn.session.done),
        created_at: unix_ms(),
        model: upstream.model.clone(),
        policy_version: turn.policy.version,
        messages_json: Json::Array(request.messages.clone()).to_string(),
        tools_json: request
            .tools
            .as_ref()
            .map(|t| Json::Array(t.clone()).to_string()),
        prompt_text,
        response_text: reply.content.clone(),
        tool_calls_json: (!outcome.tool_calls.is_empty()).then(|| {
            Json::Array(outcome.tool_calls.iter().map(ToolCall::to_json).collect()).to_string()
        }),
        prompt_ids: to_i32(&prompt_ids),
        response_ids: to_i32(&completion_ids),
        response_logprobs: if logprobs.len() == completion_ids.len() {
            logprobs
        } else {
            Vec::new()
        },
        token_source: source.as_str().into(),
        finish_reason: outcome.finish_reason.into(),
        ..Default::default()
    };
    (outcome, row)
}
