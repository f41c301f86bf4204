//! A `POST /v1/chat/completions` body checked field by field, so every 400 names
//! the field at fault; the messages and tools are checked in [`super::messages`].

use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::fields::{boolean, count, number, opt, string};
use super::messages::{check_message, check_tool_choice, check_tools};
use super::tools::{parse_tool_calls, ToolCall};
use crate::rollout::json_kind as kind;

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
    /// The field `max_tokens` came from (`max_completion_tokens` or `max_tokens`),
    /// so that a limit error names what the client sent.
    pub max_tokens_field: &'static str,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Alternatives per token in `logprobs` (0-20).
    pub top_logprobs: usize,
    pub ignore_eos: bool,
    /// False with `parallel_tool_calls: false`: the reply carries at most one call.
    pub parallel_tool_calls: bool,
}

const MAX_STOPS: usize = 16;
/// Longest stop string: each is searched for after every token.
const MAX_STOP_BYTES: usize = 1024;

/// Reasoning-effort levels OpenAI and OpenClaw send. The model does not reason
/// before answering, so every level is honoured as it stands: the effort is an
/// upper bound on reasoning, and no reasoning meets all of them.
const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];

/// Fields that change what a reply says but that this server cannot honour: a
/// 400 naming the field, rather than a 200 that silently ignores it. Each is
/// accepted at its neutral value (what sending nothing means).
fn refuse_unhonoured(body: &Map<String, Json>) -> Result<(), ApiError> {
    for field in ["frequency_penalty", "presence_penalty"] {
        match number(body, field)? {
            None => {}
            Some(0.0) => {}
            Some(p) => {
                return Err(ApiError::invalid(
                    format!("`{field}` is not supported by this server (only 0), got {p}"),
                    field,
                ))
            }
        }
    }
    match opt(body, "logit_bias") {
        None => {}
        Some(Json::Object(m)) if m.is_empty() => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "`logit_bias` is not supported by this server",
                "logit_bias",
            ))
        }
    }
    match opt(body, "response_format") {
        None => {}
        Some(f) if f.get("type").and_then(Json::as_str) == Some("text") => {}
        Some(f) => {
            let what = match f.get("type").and_then(Json::as_str) {
                Some(t) => format!("{t:?}"),
                None => f.to_string(),
            };
            return Err(ApiError::invalid(
                format!(
                    "`response_format` {what} is not supported: this server does not constrain \
                     the reply to JSON (only {{\"type\": \"text\"}})"
                ),
                "response_format",
            ));
        }
    }
    match opt(body, "modalities") {
        None => {}
        Some(Json::Array(m)) if m.iter().all(|x| x.as_str() == Some("text")) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "`modalities` other than [\"text\"] are not supported: this model writes text only",
                "modalities",
            ))
        }
    }
    for (field, why) in [
        ("functions", "send them as `tools`"),
        ("function_call", "use `tool_choice`"),
        ("audio", "this model writes text only"),
        ("prediction", "predicted outputs are not implemented"),
        ("web_search_options", "this server has no web search"),
    ] {
        if opt(body, field).is_some() {
            return Err(ApiError::invalid(
                format!("`{field}` is not supported by this server: {why}"),
                field,
            ));
        }
    }
    Ok(())
}

/// Fields that do not change the reply: accepted (and checked for their type,
/// so a malformed request is still a 400). `store`: this server records every
/// turn to its own directory whatever the client asks (that is what it is for);
/// OpenAI's stored-completions API does not exist here. `prompt_cache_key` and
/// `prompt_cache_retention`: hints for prompt caching, which keys on the tokens.
fn check_hints(body: &Map<String, Json>) -> Result<(), ApiError> {
    for field in [
        "model",
        "user",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
    ] {
        string(body, field)?;
    }
    boolean(body, "store")?;
    if let Some(v) = opt(body, "metadata") {
        if !v.is_object() {
            return Err(ApiError::invalid(
                format!("`metadata` must be an object, got {}", kind(v)),
                "metadata",
            ));
        }
    }
    match opt(body, "reasoning_effort") {
        None => {}
        Some(Json::String(e)) if REASONING_EFFORTS.contains(&e.as_str()) => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!(
                    "`reasoning_effort` must be one of {}, got {other}",
                    REASONING_EFFORTS.join(", ")
                ),
                "reasoning_effort",
            ))
        }
    }
    Ok(())
}

impl ChatRequest {
    /// Checks every field the server uses; refuses the OpenAI fields that would
    /// change the reply but are not implemented ([`refuse_unhonoured`]); other
    /// unknown fields are ignored, as OpenAI-compatible servers do (clients send
    /// vendor extensions).
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
        let use_tools = check_tool_choice(body, tools.as_deref())?;
        let parallel_tool_calls = match opt(body, "parallel_tool_calls") {
            None => true,
            Some(_) => boolean(body, "parallel_tool_calls")?,
        };
        refuse_unhonoured(body)?;
        check_hints(body)?;

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
        let max_tokens_field = max_tokens.map_or("max_tokens", |(field, _)| field);
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
        if stop.len() > MAX_STOPS
            || stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::invalid(
                format!(
                    "`stop` takes at most {MAX_STOPS} non-empty strings of at most \
                     {MAX_STOP_BYTES} bytes"
                ),
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
            Some(k) if k > 0 && !logprobs => {
                return Err(ApiError::invalid(
                    "`top_logprobs` needs `logprobs: true`",
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
            max_tokens_field,
            stop,
            seed,
            stream,
            include_usage,
            logprobs,
            top_logprobs,
            ignore_eos: boolean(body, "ignore_eos")?,
            parallel_tool_calls,
        })
    }

    /// The reply's content and tool calls from the generated text: calls are
    /// parsed only when tools were shown, and `parallel_tool_calls: false` keeps
    /// the first (the recorded row still holds the whole generated text).
    pub fn reply_tool_calls(
        &self,
        text: &str,
        new_id: impl FnMut() -> String,
    ) -> (String, Vec<ToolCall>) {
        if self.active_tools().is_none() {
            return (text.to_string(), Vec::new());
        }
        let (content, mut calls) = parse_tool_calls(text, &self.tool_names(), new_id);
        if !self.parallel_tool_calls {
            calls.truncate(1);
        }
        (content, calls)
    }

    /// The names of the functions among the active tools.
    pub fn tool_names(&self) -> Vec<String> {
        self.active_tools()
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t.get("function")?.get("name")?.as_str().map(str::to_string))
            .collect()
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
    use axum::http::StatusCode;
    use serde_json::json;

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

    /// Real requests OpenClaw 2026.9.6 sent (fixtures/openclaw/README.md).
    const OPENCLAW_TURN: &str = include_str!("../../fixtures/openclaw/session-turn2.json");
    const OPENCLAW_COMPAT: &str = include_str!("../../fixtures/openclaw/compat-tool-round.json");

    #[test]
    fn accepts_what_openclaw_sends() {
        let body: Json = serde_json::from_str(OPENCLAW_TURN).unwrap();
        let r = req(body.clone()).unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(
            (r.max_tokens, r.max_tokens_field),
            (Some(2048), "max_completion_tokens")
        );
        assert_eq!(r.active_tools().map(<[Json]>::len), Some(12));
        let roles: Vec<&str> = r
            .template_messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            [
                "system",
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant",
                "user",
                "user"
            ]
        );
        // The parallel calls of the assistant turn, arguments as objects in the
        // client's key order; its `content: null` as an empty string.
        let calls = &r.template_messages[2]["tool_calls"];
        assert_eq!(
            calls[1]["function"]["arguments"].to_string(),
            r#"{"path":"AGENTS.md","limit":5}"#
        );
        assert_eq!(r.template_messages[2]["content"], "");
        // The trailing content-parts message, joined.
        assert!(r.template_messages[7]["content"]
            .as_str()
            .unwrap()
            .starts_with("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"));
        // Recorded as sent.
        assert_eq!(Json::Array(r.messages.clone()), body["messages"]);
        assert_eq!(r.messages[7]["content"][0]["type"], "text");

        // With OpenClaw's compat flags on: `developer`, tools with `strict: false`,
        // `prompt_cache_key`, `reasoning_effort`, temperature and top_p.
        let body: Json = serde_json::from_str(OPENCLAW_COMPAT).unwrap();
        for field in [
            "prompt_cache_key",
            "reasoning_effort",
            "temperature",
            "top_p",
        ] {
            assert!(body.get(field).is_some(), "the fixture has no {field}");
        }
        assert_eq!(body["tools"][0]["function"]["strict"], false);
        let r = req(body.clone()).unwrap();
        assert_eq!(body["messages"][0]["role"], "developer");
        assert_eq!(r.template_messages[0]["role"], "system");
        assert_eq!(r.messages[0]["role"], "developer");
        assert_eq!((r.temperature, r.top_p), (Some(0.7), Some(0.9)));
    }

    #[test]
    fn accepts_hints_and_neutral_values() {
        let r = req(json!({
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "strict": false}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "store": false, "prompt_cache_key": "s2:0", "prompt_cache_retention": "24h",
            "reasoning_effort": "high", "metadata": {"k": "v"}, "user": "u", "service_tier": "auto",
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "modalities": ["text"],
            "parallel_tool_calls": false, "top_logprobs": 0,
            "chat_template_kwargs": {"enable_thinking": false}
        }))
        .unwrap();
        assert!(!r.parallel_tool_calls);
        assert!(r.active_tools().is_some());
        let r = req(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert!(r.parallel_tool_calls);
        assert_eq!(r.max_tokens_field, "max_tokens");
    }

    #[test]
    fn parallel_tool_calls_false_keeps_one_call() {
        let text = "<tool_call>{\"name\": \"ls\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"read\", \"arguments\": {\"path\": \"a\"}}</tool_call>";
        let tools = json!([{"type": "function", "function": {"name": "ls"}}, {"type": "function", "function": {"name": "read"}}]);
        let names = |extra: Json| {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}], "tools": tools});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let mut n = 0;
            let (content, calls) = req(body).unwrap().reply_tool_calls(text, || {
                n += 1;
                format!("call_{n}")
            });
            (
                content,
                calls.into_iter().map(|c| c.name).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            names(json!({})),
            (String::new(), vec!["ls".to_string(), "read".to_string()])
        );
        assert_eq!(
            names(json!({"parallel_tool_calls": true})).1,
            ["ls", "read"]
        );
        assert_eq!(names(json!({"parallel_tool_calls": false})).1, ["ls"]);
        // Tools hidden: the markup is plain text.
        assert_eq!(
            names(json!({"tool_choice": "none"})),
            (text.to_string(), vec![])
        );
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let cases = [
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1}), "frequency_penalty"),
            (json!({"logit_bias": {"42": 100}}), "logit_bias"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
                "response_format",
            ),
            (json!({"response_format": "garbage"}), "response_format"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"audio": {"voice": "alloy"}}), "audio"),
            (
                json!({"prediction": {"type": "content", "content": "x"}}),
                "prediction",
            ),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tool_choice": "required", "tools": []}),
                "tool_choice",
            ),
            (
                json!({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": tools}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true}}]}),
                "tools[0].function.strict",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": "no"}}]}),
                "tools[0].function.strict",
            ),
            (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
            (json!({"store": "yes"}), "store"),
            (json!({"prompt_cache_key": 7}), "prompt_cache_key"),
            (json!({"metadata": []}), "metadata"),
            (json!({"parallel_tool_calls": "no"}), "parallel_tool_calls"),
        ];
        for (extra, param) in cases {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let err = req(body.clone()).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            let field = param.split(['.', '[']).next().unwrap();
            assert!(err.message.contains(field), "{body}: {}", err.message);
        }
    }
}
