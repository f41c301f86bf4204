//! `POST /v1/chat/completions`.
//!
//! A request is checked (400s name the field), admitted (429 when `--queue` is
//! full) under the policy serving now (which it keeps to its end, whatever hot
//! reload swaps in meanwhile), rendered and tokenised, then handed to the
//! [`engine`](super::engine), which batches it with the other requests in
//! flight, after the longest prefix of its prompt that the
//! [`prefix`](super::prefix) cache holds for that policy. Text comes back
//! through a channel as it is produced; when the receiving side is gone (the
//! client disconnected) the engine cancels the generation at its next step
//! (between prefill chunks too). A
//! finished generation becomes one [`RolloutRow`] before the client sees the end
//! of the response, so a graceful stop that waits for responses loses no row.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Once};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::engine::Work;
use super::error::ApiError;
use super::fields;
use super::reload::Policy;
use super::request::ChatRequest;
use super::response::{json_response, sse_response, stamp_chat_headers, Event, Meta, Outcome};
use super::session::{self, SessionInfo};
use super::state::AppState;
use super::tools::ToolCall;
use crate::clock::unix_ms;
use crate::model::{FinishReason, Generation, Model, SamplingParams};
use crate::rollout::RolloutRow;

/// From this prompt size on, the prompt is counted in pieces before it is
/// tokenised whole: below it, tokenising whole holds at most ~100 MB.
const PIECEWISE_COUNT_MIN_BYTES: usize = 256 * 1024;

/// Seconds a client is told to wait when the queue is full.
const RETRY_AFTER_S: u64 = 1;

pub use super::fields::POLICY_HEADER;

/// A request ready to generate.
struct Prepared {
    id: String,
    /// Unix milliseconds at arrival (the response's `created`).
    created_ms: i64,
    started: Instant,
    session: SessionInfo,
    request: ChatRequest,
    prompt_text: String,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
    /// The policy this request generates with (and records as policy_version).
    policy: Arc<Policy>,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(state, headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn handle(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // The queue is checked before the body is even read: a full server spends
    // nothing on a request it turns away.
    let permit = state.admission.clone().try_acquire_owned().map_err(|_| {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy: {} request(s) already admitted (--queue); retry shortly",
                state.config.queue
            ),
        )
        .with_code("queue_full");
        e.retry_after = Some(RETRY_AFTER_S);
        e
    })?;
    let body = fields::read_body(body, state.config.max_body_bytes).await?;
    let mut fields = fields::parse_object(&body)?;
    let session = session::extract(&headers, &mut fields, state.config.default_turn_type)?;
    if let Some(n) = fields
        .get("messages")
        .and_then(Json::as_array)
        .map(Vec::len)
        .filter(|&n| n > state.config.max_messages)
    {
        return Err(ApiError::invalid(
            format!(
                "`messages` has {n} entries; this server accepts at most {} (--max-messages)",
                state.config.max_messages
            ),
            "messages",
        ));
    }
    let request = ChatRequest::from_body(&fields)?;
    if let Some(upstream) = state.upstream.clone() {
        return super::upstream_chat::handle(state, upstream, permit, session, request, started)
            .await;
    }

    let policy = state.policies.current();

    let model = state
        .model
        .clone()
        .ok_or_else(|| ApiError::internal("no model is loaded"))?;
    let limit = state.config.max_tokens_limit;
    // Rendering and tokenising a large body takes memory many times its size;
    // a few at a time bound it, whatever the queue admits.
    let (request, prompt_text, prompt_ids, params) = {
        let _preparing = state
            .preparing
            .acquire()
            .await
            .map_err(|_| ApiError::internal("the server is stopping"))?;
        tokio::task::spawn_blocking(move || {
            prepare(&model, &request, limit).map(|(text, ids, params)| (request, text, ids, params))
        })
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??
    };

    let prepared = Prepared {
        id: session::new_id("chatcmpl-"),
        created_ms: unix_ms(),
        started,
        session,
        request,
        prompt_text,
        prompt_ids,
        params,
        policy,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let meta = Meta {
        id: prepared.id.clone(),
        created: prepared.created_ms / 1000,
        model: state.model_name().to_string(),
        prompt_tokens: prepared.prompt_ids.len(),
        stream_tools: (prepared.request.stream && prepared.request.active_tools().is_some())
            .then(|| prepared.request.tool_names()),
        include_usage: prepared.request.include_usage,
        policy_version: prepared.policy.version,
    };
    let stream = prepared.request.stream;
    let session_id = prepared.session.session_id.clone();
    let version = prepared.policy.version;
    tokio::spawn(run_job(state, prepared, permit, tx));

    let mut response = if stream {
        sse_response(meta, rx)
    } else {
        json_response(meta, rx).await?
    };
    stamp_chat_headers(&mut response, &session_id, version);
    Ok(response)
}

/// Renders and tokenises the prompt and fixes the sampling parameters; every
/// limit that depends on the prompt's length is checked here.
fn prepare(
    model: &Model,
    request: &ChatRequest,
    max_tokens_limit: usize,
) -> Result<(String, Vec<u32>, SamplingParams), ApiError> {
    if request.active_tools().is_some() && !model.template.supports_tools() {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            crate::warn!(
                "requests send tools, but this model's chat template does not render them: \
                 the model is not shown the tools (serve one whose template does, e.g. Qwen2.5)"
            )
        });
    }
    let prompt_text = model
        .template
        .render(&request.template_messages, request.active_tools(), true)
        .map_err(|e| {
            ApiError::invalid(
                format!("the model's chat template rejected these messages: {e:#}"),
                "messages",
            )
        })?;
    let context = model.config.context_length;
    let tokenise_error =
        |e: anyhow::Error| ApiError::internal(format!("cannot tokenise the prompt: {e:#}"));
    // A huge prompt is counted in pieces first, so one far over the context is
    // refused before it is tokenised whole; an ordinary one (an agent's 50 kB
    // system prompt) is tokenised once, and the context check below catches it.
    if prompt_text.len() > PIECEWISE_COUNT_MIN_BYTES
        && model
            .tokenizer
            .exceeds(&prompt_text, context)
            .map_err(tokenise_error)?
    {
        return Err(ApiError::invalid(
            format!(
                "this model's maximum context length is {context} tokens, but the messages alone \
                 have more ({} bytes of prompt): shorten the messages",
                prompt_text.len()
            ),
            "messages",
        )
        .with_code("context_length_exceeded"));
    }
    let prompt_ids = model
        .tokenizer
        .encode(&prompt_text)
        .map_err(tokenise_error)?;
    let n = prompt_ids.len();
    let overflow = |wanted: usize| {
        ApiError::invalid(
            format!(
                "this model's maximum context length is {context} tokens, but the request needs \
                 {wanted} ({n} in the messages, {} for the completion): shorten the messages or \
                 lower max_tokens",
                wanted - n
            ),
            "messages",
        )
        .with_code("context_length_exceeded")
    };
    let max_tokens = match request.max_tokens {
        Some(m) if m > max_tokens_limit => {
            let field = request.max_tokens_field;
            return Err(ApiError::invalid(
                format!("`{field}` is {m}, more than this server allows ({max_tokens_limit}, --max-tokens-limit)"),
                field,
            ));
        }
        Some(m) if n.saturating_add(m) > context => return Err(overflow(n + m)),
        Some(m) => m,
        None if n >= context => return Err(overflow(n + 1)),
        None => max_tokens_limit.min(context - n),
    };
    let params = SamplingParams {
        temperature: request.temperature.unwrap_or(1.0),
        top_p: request.top_p.unwrap_or(1.0),
        top_k: request.top_k.unwrap_or(0),
        seed: request.seed,
        max_tokens,
        stop: request.stop.clone(),
        ignore_eos: request.ignore_eos,
        top_logprobs: if request.logprobs {
            request.top_logprobs
        } else {
            0
        },
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(format!("{e:#}"), "temperature"))?;
    Ok((prompt_text, prompt_ids, params))
}

/// Hands the request to the engine (which batches it with the others), then
/// records and reports.
async fn run_job(
    state: Arc<AppState>,
    job: Prepared,
    admission: OwnedSemaphorePermit,
    tx: mpsc::UnboundedSender<Event>,
) {
    let metrics = &state.metrics;
    let (Some(model), Some(engine)) = (state.model.as_deref(), state.engine.as_ref()) else {
        let _ = tx.send(Event::Done(Err("no generation engine".into())));
        return;
    };
    let (done, result) = oneshot::channel();
    engine.submit(Work {
        policy: job.policy.clone(),
        prompt_ids: job.prompt_ids.clone(),
        params: job.params.clone(),
        events: tx.clone(),
        done,
    });
    let result = result.await;

    let generation = match result {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            crate::warn!("request {}: generation failed: {e:#}", job.id);
            let _ = tx.send(Event::Done(Err(format!("generation failed: {e:#}"))));
            return;
        }
        Err(_) => {
            crate::warn!("request {}: the generation engine dropped it", job.id);
            let _ = tx.send(Event::Done(Err("generation failed".into())));
            return;
        }
    };
    let t = &generation.timing;
    crate::debug!(
        "request {}: {} prompt tokens ({} cached, {} prefilled in {:.3} s, {:.1} tok/s), \
         {} generated in {:.3} s ({:.1} tok/s), {}",
        job.id,
        t.prompt_tokens,
        t.cached_tokens,
        t.prefilled_tokens(),
        t.prefill_s,
        t.prefill_tokens_per_s(),
        t.completion_tokens,
        t.decode_s,
        t.decode_tokens_per_s(),
        generation.finish_reason.as_str()
    );
    if generation.finish_reason == FinishReason::Cancelled {
        // The client went away mid-reply: it never saw a complete turn, so the
        // turn is not recorded.
        metrics.generations_cancelled.fetch_add(1, Relaxed);
        crate::debug!("request {}: cancelled (client disconnected)", job.id);
        return;
    }

    let outcome = finish(model, &job, generation);
    metrics
        .prompt_tokens
        .fetch_add(job.prompt_ids.len() as u64, Relaxed);
    metrics
        .completion_tokens
        .fetch_add(outcome.generation.token_ids.len() as u64, Relaxed);
    metrics.observe_latency(job.started.elapsed().as_secs_f64());
    state.sessions.add_response(&job.session, &job.id);
    state
        .recorder
        .record(chat_row(&state, &job, &outcome))
        .await;
    let _ = tx.send(Event::Done(Ok(Box::new(outcome))));
    drop(admission);
}

fn finish(model: &Model, job: &Prepared, generation: Generation) -> Outcome {
    let (content, tool_calls) = job
        .request
        .reply_tool_calls(&generation.text, || session::new_id("call_"));
    let finish_reason = if !tool_calls.is_empty() {
        "tool_calls"
    } else {
        generation.finish_reason.as_str()
    };
    let logprobs = job
        .request
        .logprobs
        .then(|| logprobs_json(model, &generation));
    Outcome {
        generation,
        content,
        tool_calls,
        finish_reason,
        logprobs,
    }
}

/// OpenAI `logprobs`: one entry per generated token (the EOS that ended the reply
/// included, as it is in `usage.completion_tokens` and the recorded row).
/// `top_logprobs` lists the request's `top_logprobs` most likely tokens per step.
fn logprobs_json(model: &Model, generation: &Generation) -> Json {
    let token_text = |id: u32| match model.tokenizer.decode(&[id]) {
        Ok(t) if !t.is_empty() => t,
        _ => model.tokenizer.token(id).unwrap_or_default(),
    };
    let content: Vec<Json> = generation
        .token_ids
        .iter()
        .zip(&generation.logprobs)
        .enumerate()
        .map(|(i, (&id, &lp))| {
            let text = token_text(id);
            let top: Vec<Json> = generation
                .top_logprobs
                .get(i)
                .map(|alternatives| {
                    alternatives
                        .iter()
                        .map(|&(alt, alt_lp)| {
                            let t = token_text(alt);
                            json!({"token": t, "logprob": alt_lp, "bytes": t.as_bytes()})
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "token": text,
                "logprob": lp,
                "bytes": text.as_bytes(),
                "top_logprobs": top,
            })
        })
        .collect();
    json!({ "content": content })
}

fn chat_row(state: &AppState, job: &Prepared, outcome: &Outcome) -> RolloutRow {
    let to_i32 = |ids: &[u32]| ids.iter().map(|&i| i as i32).collect::<Vec<_>>();
    RolloutRow {
        sample_id: job.id.clone(),
        session_id: job.session.session_id.clone(),
        turn_type: job.session.turn_type.as_str().to_string(),
        session_done: Some(job.session.done),
        // When the reply was complete: the user can react (feedback, next turn)
        // only from then on, and collect's --feedback-grace counts from here, so
        // a long generation or a wait in the queue never eats into it.
        created_at: unix_ms(),
        model: state.model_name().to_string(),
        policy_version: job.policy.version,
        messages_json: Json::Array(job.request.messages.clone()).to_string(),
        tools_json: job
            .request
            .tools
            .as_ref()
            .map(|t| Json::Array(t.clone()).to_string()),
        prompt_text: job.prompt_text.clone(),
        response_text: outcome.generation.text.clone(),
        tool_calls_json: (!outcome.tool_calls.is_empty()).then(|| {
            Json::Array(outcome.tool_calls.iter().map(ToolCall::to_json).collect()).to_string()
        }),
        prompt_ids: to_i32(&job.prompt_ids),
        response_ids: to_i32(&outcome.generation.token_ids),
        response_logprobs: outcome.generation.logprobs.clone(),
        token_source: "engine".into(),
        finish_reason: outcome.finish_reason.into(),
        ..Default::default()
    }
}
