//! The router: routes, the API key check, per-response metrics, and the small
//! endpoints (`/v1/models`, `/healthz`, `/metrics`, `/v1/feedback`, 404/405).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value as Json};

use super::chat::completions;
use super::error::ApiError;
use super::fields::{self, SESSION_HEADER};
use super::session;
use super::state::AppState;
use crate::clock::unix_ms;
use crate::rollout::RolloutRow;

/// Longest free-text feedback accepted, in bytes.
const MAX_FEEDBACK_TEXT: usize = 64 * 1024;

const ROUTES: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/models",
    "/v1/feedback",
    "/healthz",
    "/metrics",
];

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every response by route and status (unknown paths as `other`).
async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let route = ROUTES
        .iter()
        .copied()
        .find(|r| *r == path)
        .unwrap_or("other");
    let response = next.run(request).await;
    state
        .metrics
        .count_request(route, response.status().as_u16());
    response
}

/// With `--api-key`, every route but `/healthz` needs `Authorization: Bearer KEY`.
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        if request.uri().path() != "/healthz" {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                let message = if given.is_some() {
                    "incorrect API key provided"
                } else {
                    "missing API key: send `Authorization: Bearer KEY`"
                };
                let mut response =
                    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
                        .with_code("invalid_api_key")
                        .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "unknown route {} {}: this server has POST /v1/chat/completions, GET /v1/models, \
             POST /v1/feedback, GET /healthz, GET /metrics",
            request.method(),
            request.uri().path()
        ),
    );
    e.code = Some("unknown_url");
    e
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// The policy serving new requests, as `/healthz` and `/v1/models` show it.
fn policy_json(state: &AppState) -> Json {
    let policy = state.policies.current();
    json!({
        "version": policy.version,
        "adapter": policy.adapter_name(),
        "since": policy.since_ms / 1000,
    })
}

/// Liveness plus what is being served; needs no API key (it says nothing
/// about conversations).
async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "status": "ok",
        "policy_version": state.policies.current().version,
    }))
}

async fn models(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name(),
            "object": "model",
            "created": state.started,
            "owned_by": "claw",
            "context_length": state.model.as_ref().map(|m| m.config.context_length),
            "policy": policy_json(&state),
        }],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(state.policies.current().version),
    )
}

/// `POST /v1/feedback`: `{session_id, turn?, response_id?, rating: 1|-1, text?,
/// session_done?}` (the session may come in `X-Session-Id` instead, and
/// `session_done` in `X-Session-Done`: the user is done with the session). Recorded as one row with
/// `turn_type` "feedback" (see [`feedback_row`]).
async fn feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = fields::read_body(body, state.config.max_body_bytes).await?;
    let fields = fields::parse_object(&body)?;
    let session_id = fields::session_id(&headers, fields.get("session_id"))?.ok_or_else(|| {
        ApiError::invalid(
            "`session_id` is required (body field or X-Session-Id header)",
            "session_id",
        )
    })?;
    let rating = match fields.get("rating") {
        Some(v) if v.as_i64() == Some(1) || v.as_i64() == Some(-1) => v.as_i64().unwrap_or(0) as i8,
        Some(v) if v.as_f64() == Some(1.0) || v.as_f64() == Some(-1.0) => {
            v.as_f64().unwrap_or(0.0) as i8
        }
        Some(v) => {
            return Err(ApiError::invalid(
                format!("`rating` must be 1 or -1, got {v}"),
                "rating",
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "`rating` (1 or -1) is required",
                "rating",
            ))
        }
    };
    let turn = match fields.get("turn") {
        None | Some(Json::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|t| *t >= 1)
                .and_then(|t| i32::try_from(t).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("`turn` must be a positive integer, got {v}"),
                        "turn",
                    )
                })?,
        ),
    };
    let response_id = fields::string(&fields, "response_id")?.map(str::to_string);
    let text = match fields::string(&fields, "text")? {
        Some(s) if s.len() > MAX_FEEDBACK_TEXT => {
            return Err(ApiError::invalid(
                format!("`text` is longer than {MAX_FEEDBACK_TEXT} bytes"),
                "text",
            ))
        }
        s => s.map(str::to_string),
    };
    // The user rates the last reply and leaves: collect can end the session now
    // instead of after its timeout.
    let session_done = fields::parse_done(&headers, fields.get("session_done"))?;
    let target = state
        .sessions
        .resolve_feedback(&session_id, response_id.as_deref(), turn)?;
    let id = session::new_id("fb-");
    let event = json!({
        "response_id": target.response_id,
        "turn": target.turn,
        "rating": rating,
        "text": text,
    });
    let mut row = feedback_row(&state, &id, &session_id, &event, target.turn, rating, text);
    row.session_done = Some(session_done);
    state.recorder.record(row).await;
    let mut response = axum::Json(json!({
        "id": id,
        "object": "feedback",
        "session_id": session_id,
        "response_id": event["response_id"],
        "turn": event["turn"],
        "rating": rating,
        "recorded": state.recorder.enabled(),
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&session_id) {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
    Ok(response)
}

/// A feedback event as a `claw.rollout.v1` row, so it travels in the same
/// segments as the turns it is about; `claw collect` joins it to its turn:
/// - `sample_id`: the event's own id (`fb-...`); `turn_type`: `"feedback"`;
/// - `feedback`: the rating (+1/-1); `feedback_text`: the text;
/// - `turn`: the main turn it names (1-based, as the registry counted it), if any;
/// - `messages_json`: the event as JSON, `{"response_id", "turn", "rating", "text"}`,
///   where `response_id` is the `sample_id` of the row the feedback is about
///   (resolved by the server: named, else by turn, else the session's latest);
/// - `finish_reason`: `"feedback"`, `token_source`: `"none"`; text and token
///   columns empty; `model` and `policy_version` as served now.
pub fn feedback_row(
    state: &AppState,
    id: &str,
    session_id: &str,
    event: &Json,
    turn: Option<i32>,
    rating: i8,
    text: Option<String>,
) -> RolloutRow {
    RolloutRow {
        sample_id: id.to_string(),
        session_id: session_id.to_string(),
        turn,
        turn_type: "feedback".into(),
        created_at: unix_ms(),
        model: state.model_name().to_string(),
        policy_version: state.policies.current().version,
        messages_json: event.to_string(),
        token_source: "none".into(),
        finish_reason: "feedback".into(),
        feedback: Some(rating),
        feedback_text: text,
        ..Default::default()
    }
}
