//! `claw serve --upstream URL`: the same API, sessions, feedback and recording in
//! front of another engine that generates (llama.cpp's `llama-server`, vLLM,
//! SGLang, or any OpenAI-compatible server).
//!
//! A chat request is checked by claw exactly as for the local engine (the 400s,
//! the session fields, `--max-tokens-limit`), then sent to the upstream's
//! `/v1/chat/completions` (streamed when the client streams) asking for what a
//! rollout row needs:
//!
//! - `logprobs: true` with `top_logprobs` >= 1 (llama.cpp computes no
//!   probabilities at all with `n_probs` 0), so every generated token comes back
//!   with its log-prob;
//! - `return_token_ids: true`, vLLM's and SGLang's switch for the exact prompt and
//!   completion ids (servers that do not know it ignore it).
//!
//! A streamed request is streamed from the engine piece by piece, and its chunks
//! are folded into one response for the row ([`ChunkFold`]); with tools it is
//! generated whole and sent as one chunk (llama.cpp refuses log-probs for a
//! streamed reply with tools).
//!
//! Where the ids come from, recorded per row in `token_source`
//! ([`TokenSource`]):
//!
//! - `upstream`: prompt and completion ids both came in the engine's response
//!   (vLLM / SGLang with `return_token_ids`);
//! - `upstream-tokenize`: completion ids from the response (llama.cpp's
//!   `logprobs.content[].id`), prompt ids from the engine's own template and
//!   tokenizer (`POST /apply-template`, then `POST /tokenize` with
//!   `add_special`/`parse_special` as llama.cpp's server tokenises a chat prompt),
//!   asked while the engine generates;
//! - `upstream-text`: the engine returned no completion ids: the row has text but
//!   empty id and log-prob lists (not trainable as it is).
//!
//! No local model is loaded in this mode. With `--upstream-adapters` each new
//! checkpoint is loaded into the engine and rows record the adapter it used
//! (`serve/push.rs`); otherwise `policy_version` stays 0.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::request::ChatRequest;
use super::response::Event;
use super::session;
use super::tools::ToolCall;

/// How long to wait for the upstream's TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one upstream call may take in all (a long generation on a slow engine).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the startup probe of `GET /v1/models` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `--upstream URL`, `--upstream-model`, `--upstream-api-key`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL as given (`http://host:port` or `http://host:port/v1`).
    pub url: String,
    /// Model name sent upstream (and recorded); None: asked from `GET /v1/models`.
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// `--upstream-adapters`: how checkpoints reach the engine.
    pub adapters: AdapterPush,
}

/// `--upstream-adapters`: how new checkpoints reach the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AdapterPush {
    /// Do not touch the engine's adapters (rows record policy version 0).
    #[default]
    None,
    /// vLLM's `/v1/load_lora_adapter`; requests name the adapter as `model`.
    Vllm,
    /// SGLang's `/load_lora_adapter`; requests carry `lora_path`.
    Sglang,
    /// llama.cpp's server: GGUF files loaded at its start (`--lora`); claw
    /// writes them and records the one the engine applies.
    #[value(name = "llama-cpp")]
    LlamaCpp,
}

/// How a row's token ids were obtained (the `token_source` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// Prompt and completion ids both in the engine's response.
    Upstream,
    /// Completion ids in the response; prompt ids from the engine's
    /// `/apply-template` + `/tokenize`.
    UpstreamTokenize,
    /// No completion ids from the engine: text only.
    UpstreamText,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Upstream => "upstream",
            TokenSource::UpstreamTokenize => "upstream-tokenize",
            TokenSource::UpstreamText => "upstream-text",
        }
    }
}

/// The upstream engine and how to reach it.
pub struct Upstream {
    /// Without a trailing `/` or `/v1`: `/v1/chat/completions`, `/tokenize` and
    /// `/apply-template` hang off it.
    base: String,
    /// Sent as `model` and recorded.
    pub model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// Set once the engine answered `/apply-template` with 404 (vLLM, SGLang):
    /// later requests do not ask again.
    no_template: AtomicBool,
    /// How adapters reach the engine and how a request names one.
    pub adapters: AdapterPush,
}

/// Why an upstream call failed, as the client sees it.
#[derive(Debug)]
pub struct UpstreamError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        let kind = if e.status.is_client_error() {
            "invalid_request_error"
        } else {
            "upstream_error"
        };
        ApiError::new(e.status, kind, e.message).with_code(e.code)
    }
}

/// What one upstream chat completion gave.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reply {
    /// `message.content` (empty when null).
    pub content: String,
    /// `message.tool_calls` as the engine parsed them, if it did.
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: String,
    pub prompt_ids: Option<Vec<u32>>,
    pub completion_ids: Option<Vec<u32>>,
    /// One per completion id when the engine gave them.
    pub logprobs: Option<Vec<f32>>,
    /// The engine's `logprobs` object, passed on when the client asked for it.
    pub logprobs_json: Option<Json>,
    /// `usage.prompt_tokens` / `usage.completion_tokens`.
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
}

impl Upstream {
    /// Checks the URL and settles the model name: `--upstream-model`, else the
    /// first model `GET /v1/models` lists, else `upstream` (an upstream that is
    /// down at startup is not fatal: requests get 502 until it is up).
    pub fn connect(config: &UpstreamConfig) -> anyhow::Result<Self> {
        let url = config.url.trim();
        anyhow::ensure!(
            url.starts_with("http://"),
            "--upstream {url}: give an http:// URL (this build has no TLS; put a local \
             proxy in front of an https:// engine)"
        );
        let base = url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .trim_end_matches('/')
            .to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .build();
        let mut upstream = Upstream {
            base,
            model: String::new(),
            api_key: config.api_key.clone().filter(|k| !k.trim().is_empty()),
            agent,
            no_template: AtomicBool::new(false),
            adapters: config.adapters,
        };
        upstream.model = match &config.model {
            Some(m) => m.clone(),
            None => match upstream.probe_model() {
                Ok(m) => m,
                Err(e) => {
                    crate::warn!(
                        "cannot ask {} for its model ({e}); recording the model as `upstream` \
                         (give --upstream-model)",
                        upstream.base
                    );
                    "upstream".into()
                }
            },
        };
        Ok(upstream)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Names the policy's adapter in a chat body the way the engine expects.
    fn name_adapter(&self, body: &mut Map<String, Json>, adapter: Option<&str>) {
        let Some(name) = adapter else { return };
        match self.adapters {
            AdapterPush::Vllm => {
                body.insert("model".into(), json!(name));
            }
            AdapterPush::Sglang => {
                body.insert("lora_path".into(), json!(name));
            }
            AdapterPush::None | AdapterPush::LlamaCpp => {}
        }
    }

    /// One call whose answer is read as text (the engines' adapter endpoints);
    /// every failure names the upstream URL.
    pub fn call_text(
        &self,
        method: &str,
        path: &str,
        body: Option<&Json>,
        timeout: Duration,
    ) -> Result<String, UpstreamError> {
        let request = self.request(method, path, timeout);
        let answer = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = answer.map_err(|e| self.error(path, e))?;
        response.into_string().map_err(|e| UpstreamError {
            status: StatusCode::BAD_GATEWAY,
            code: "upstream_bad_response",
            message: format!("the upstream {}{path} broke off its answer: {e}", self.base),
        })
    }

    fn request(&self, method: &str, path: &str, timeout: Duration) -> ureq::Request {
        let mut r = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(key) = &self.api_key {
            r = r.set("Authorization", &format!("Bearer {key}"));
        }
        r
    }

    fn probe_model(&self) -> Result<String, String> {
        let body: Json = self
            .request("GET", "/v1/models", PROBE_TIMEOUT)
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())?;
        body.pointer("/data/0/id")
            .and_then(Json::as_str)
            .map(str::to_string)
            .ok_or_else(|| "its /v1/models lists no model".into())
    }

    /// POSTs `body` to `path` and reads a JSON answer; every failure names the
    /// upstream URL.
    fn post(&self, path: &str, body: &Json) -> Result<Json, UpstreamError> {
        let url = format!("{}{path}", self.base);
        match self.request("POST", path, CALL_TIMEOUT).send_json(body) {
            Ok(r) => r.into_json().map_err(|e| UpstreamError {
                status: StatusCode::BAD_GATEWAY,
                code: "upstream_bad_response",
                message: format!("the upstream {url} answered with a body that is not JSON: {e}"),
            }),
            Err(e) => Err(self.error(path, e)),
        }
    }

    /// A failed call as the client sees it, naming the upstream URL.
    fn error(&self, path: &str, error: ureq::Error) -> UpstreamError {
        let url = format!("{}{path}", self.base);
        match error {
            ureq::Error::Status(status, r) => {
                let text = r.into_string().unwrap_or_default();
                let detail = serde_json::from_str::<Json>(&text)
                    .ok()
                    .and_then(|j| {
                        j.pointer("/error/message")
                            .or_else(|| j.get("message"))
                            .and_then(Json::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| text.chars().take(500).collect());
                // The engine's own 4xx (a prompt over its context, say) is the
                // client's problem; anything else is a bad gateway.
                let client = (400..500).contains(&status) && status != 401 && status != 403;
                UpstreamError {
                    status: if client {
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST)
                    } else {
                        StatusCode::BAD_GATEWAY
                    },
                    code: "upstream_error",
                    message: format!("the upstream {url} answered HTTP {status}: {detail}"),
                }
            }
            e => UpstreamError {
                status: StatusCode::BAD_GATEWAY,
                code: "upstream_unreachable",
                message: format!("cannot reach the upstream {url}: {e}"),
            },
        }
    }

    /// The body sent to the upstream's `/v1/chat/completions`; `adapter` is the
    /// name the engine loaded the serving policy's adapter under, if any.
    pub fn chat_body(
        &self,
        request: &ChatRequest,
        max_tokens: usize,
        adapter: Option<&str>,
    ) -> Json {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        self.name_adapter(&mut body, adapter);
        body.insert("messages".into(), Json::Array(request.messages.clone()));
        if let Some(tools) = request.active_tools() {
            body.insert("tools".into(), Json::Array(tools.to_vec()));
            if !request.parallel_tool_calls {
                body.insert("parallel_tool_calls".into(), json!(false));
            }
        }
        if let Some(t) = request.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            body.insert("top_p".into(), json!(p));
        }
        if let Some(k) = request.top_k {
            body.insert("top_k".into(), json!(k));
        }
        if let Some(seed) = request.seed {
            body.insert("seed".into(), json!(seed));
        }
        if !request.stop.is_empty() {
            body.insert("stop".into(), json!(request.stop));
        }
        if request.ignore_eos {
            body.insert("ignore_eos".into(), json!(true));
        }
        body.insert("max_tokens".into(), json!(max_tokens));
        body.insert("stream".into(), json!(false));
        body.insert("logprobs".into(), json!(true));
        body.insert(
            "top_logprobs".into(),
            json!(if request.logprobs {
                request.top_logprobs.max(1)
            } else {
                1
            }),
        );
        // vLLM (>= 0.10.2) and SGLang: exact prompt and completion ids in the
        // response (`prompt_token_ids`, `choices[].token_ids`).
        body.insert("return_token_ids".into(), json!(true));
        Json::Object(body)
    }

    /// One chat completion, with the prompt's text and ids when the response did
    /// not carry them (llama.cpp: `/apply-template` + `/tokenize`, asked while the
    /// engine generates, so they add no latency).
    pub fn complete(
        &self,
        request: &ChatRequest,
        max_tokens: usize,
        adapter: Option<&str>,
    ) -> Result<(Reply, String, TokenSource), UpstreamError> {
        let body = self.chat_body(request, max_tokens, adapter);
        std::thread::scope(|scope| {
            let prompt = scope.spawn(|| self.engine_prompt(request));
            let response = self.post("/v1/chat/completions", &body)?;
            self.finish_reply(&response, joined(prompt))
        })
    }

    /// The prompt as the engine renders and tokenizes it (llama.cpp's server has
    /// both endpoints; an engine without them gives an empty text and no ids).
    fn engine_prompt(&self, request: &ChatRequest) -> EnginePrompt {
        let mut prompt = EnginePrompt::default();
        if self.no_template.load(Relaxed) {
            return prompt;
        }
        let mut template = Map::new();
        template.insert("messages".into(), Json::Array(request.messages.clone()));
        if let Some(tools) = request.active_tools() {
            template.insert("tools".into(), Json::Array(tools.to_vec()));
        }
        match self.post("/apply-template", &Json::Object(template)) {
            Ok(rendered) => {
                if let Some(text) = rendered.get("prompt").and_then(Json::as_str) {
                    prompt.ids = self.tokenize(text, true).ok();
                    prompt.text = text.to_string();
                }
            }
            Err(e) if e.status == StatusCode::NOT_FOUND => self.no_template.store(true, Relaxed),
            Err(e) => crate::debug!("no prompt text from the upstream: {}", e.message),
        }
        prompt
    }

    /// Reads a chat completion; the engine's own prompt ids win over `prompt`'s.
    fn finish_reply(
        &self,
        response: &Json,
        prompt: EnginePrompt,
    ) -> Result<(Reply, String, TokenSource), UpstreamError> {
        let mut reply = parse_chat_response(response).map_err(|e| UpstreamError {
            status: StatusCode::BAD_GATEWAY,
            code: "upstream_bad_response",
            message: format!("the upstream {}/v1/chat/completions: {e}", self.base),
        })?;
        let prompt_from_response = reply.prompt_ids.is_some();
        if !prompt_from_response {
            reply.prompt_ids = prompt.ids;
        }
        let source = token_source(&reply, prompt_from_response);
        Ok((reply, prompt.text, source))
    }

    /// llama.cpp's `POST /tokenize` (`add_special`: the BOS its chat prompts get).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, UpstreamError> {
        let answer = self.post(
            "/tokenize",
            &json!({"content": text, "add_special": add_special, "parse_special": true}),
        )?;
        answer
            .get("tokens")
            .and_then(ids)
            .ok_or_else(|| UpstreamError {
                status: StatusCode::BAD_GATEWAY,
                code: "upstream_bad_response",
                message: format!("the upstream {}/tokenize returned no `tokens`", self.base),
            })
    }
}

/// The prompt's text and ids as the engine renders and tokenizes it.
#[derive(Default)]
struct EnginePrompt {
    text: String,
    ids: Option<Vec<u32>>,
}

/// A prompt thread's result; one that panicked gives nothing (the row then has
/// no prompt ids, like an engine without `/tokenize`).
fn joined(handle: std::thread::ScopedJoinHandle<'_, EnginePrompt>) -> EnginePrompt {
    handle.join().unwrap_or_default()
}

/// A JSON list of non-negative integers (token ids).
fn ids(v: &Json) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// Reads a `/v1/chat/completions` response in the shapes the engines document:
///
/// - OpenAI: `choices[0].message.{content,tool_calls}`, `finish_reason`,
///   `logprobs.content[].logprob`, `usage`.
/// - llama.cpp server: `logprobs.content[].id` next to each `logprob`
///   (tools/server/server-task.cpp, `completion_token_output::probs_vector_to_json`).
/// - vLLM, with `return_token_ids: true` (vLLM >= 0.10.2, `ChatCompletionResponse`):
///   top-level `prompt_token_ids`, and `choices[].token_ids`.
/// - SGLang, with `return_token_ids: true` (sgl-project/sglang#30917): per choice
///   `prompt_token_ids` and `token_ids`; or in the response-level `sglext`
///   (`prompt_token_ids`, `completion_token_ids`, sgl-project/sglang#34488); or,
///   with `return_meta_info`, `meta_info.output_token_logprobs` as
///   `[logprob, token_id, text]` triples; `logprobs.content[].token_id`
///   (sgl-project/sglang#7069).
pub fn parse_chat_response(response: &Json) -> Result<Reply, String> {
    let choice = response
        .pointer("/choices/0")
        .ok_or("the response has no `choices[0]`")?;
    let message = choice.get("message").unwrap_or(&Json::Null);
    let content = match message.get("content") {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(other) => return Err(format!("`message.content` is not a string: {other}")),
    };
    let tool_calls = message
        .get("tool_calls")
        .and_then(Json::as_array)
        .map(|calls| {
            calls
                .iter()
                .filter_map(|c| {
                    let f = c.get("function")?;
                    let arguments = match f.get("arguments") {
                        Some(Json::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => "{}".into(),
                    };
                    Some(ToolCall {
                        id: c
                            .get("id")
                            .and_then(Json::as_str)
                            .map(str::to_string)
                            .unwrap_or_else(|| session::new_id("call_")),
                        name: f.get("name")?.as_str()?.to_string(),
                        arguments,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Json::as_str)
        .unwrap_or("stop")
        .to_string();

    let sglext = response.get("sglext");
    let prompt_ids = choice
        .get("prompt_token_ids")
        .or_else(|| response.get("prompt_token_ids"))
        .or_else(|| sglext.and_then(|s| s.get("prompt_token_ids")))
        .and_then(|v| ids(v).or_else(|| v.get(0).and_then(ids)));

    let logprobs_json = choice.get("logprobs").filter(|v| !v.is_null()).cloned();
    let entries = logprobs_json
        .as_ref()
        .and_then(|l| l.get("content"))
        .and_then(Json::as_array);
    let entry_logprobs: Option<Vec<f32>> = entries.and_then(|e| {
        e.iter()
            .map(|x| x.get("logprob").and_then(Json::as_f64).map(|f| f as f32))
            .collect()
    });
    let entry_ids: Option<Vec<u32>> = entries.and_then(|e| {
        e.iter()
            .map(|x| {
                x.get("id")
                    .or_else(|| x.get("token_id"))
                    .and_then(Json::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            })
            .collect()
    });
    let meta = choice
        .pointer("/meta_info/output_token_logprobs")
        .or_else(|| response.pointer("/meta_info/output_token_logprobs"))
        .and_then(Json::as_array);
    let meta_ids: Option<Vec<u32>> = meta.and_then(|m| {
        m.iter()
            .map(|t| t.get(1)?.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    });
    let meta_logprobs: Option<Vec<f32>> = meta.and_then(|m| {
        m.iter()
            .map(|t| t.get(0)?.as_f64().map(|f| f as f32))
            .collect()
    });
    let completion_ids = choice
        .get("token_ids")
        .and_then(ids)
        .or_else(|| {
            sglext
                .and_then(|s| s.get("completion_token_ids"))
                .and_then(|v| ids(v).or_else(|| v.get(0).and_then(ids)))
        })
        .or_else(|| meta_ids.clone())
        .or_else(|| entry_ids.clone());
    // The log-probs line up with the ids only when they count the same tokens.
    let logprobs = completion_ids.as_ref().and_then(|c| {
        [entry_logprobs, meta_logprobs]
            .into_iter()
            .flatten()
            .find(|l| l.len() == c.len())
    });
    let usage = |field: &str| {
        response
            .pointer(&format!("/usage/{field}"))
            .and_then(Json::as_u64)
            .map(|n| n as usize)
    };
    Ok(Reply {
        content,
        tool_calls,
        finish_reason,
        prompt_ids,
        completion_ids,
        logprobs,
        logprobs_json,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
    })
}

/// Which source the ids of a reply count as.
pub fn token_source(reply: &Reply, prompt_from_response: bool) -> TokenSource {
    match (&reply.completion_ids, &reply.prompt_ids) {
        (None, _) | (_, None) => TokenSource::UpstreamText,
        (Some(_), Some(_)) if prompt_from_response => TokenSource::Upstream,
        (Some(_), Some(_)) => TokenSource::UpstreamTokenize,
    }
}

/// Folds streamed `chat.completion.chunk`s into the shape of one
/// `chat.completion`, so [`parse_chat_response`] reads both: content and
/// `logprobs.content` concatenated, `token_ids` (vLLM streams them per chunk)
/// concatenated, the first `prompt_token_ids`, the last `finish_reason` and
/// `usage`.
#[derive(Default)]
pub struct ChunkFold {
    content: String,
    entries: Vec<Json>,
    token_ids: Vec<Json>,
    prompt_ids: Option<Json>,
    finish_reason: Option<Json>,
    usage: Option<Json>,
}

impl ChunkFold {
    /// Takes one chunk; returns the content it adds.
    pub fn add(&mut self, chunk: &Json) -> String {
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        if self.prompt_ids.is_none() {
            self.prompt_ids = chunk.get("prompt_token_ids").cloned();
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return String::new();
        };
        if self.prompt_ids.is_none() {
            self.prompt_ids = choice.get("prompt_token_ids").cloned();
        }
        if let Some(ids) = choice.get("token_ids").and_then(Json::as_array) {
            self.token_ids.extend(ids.iter().cloned());
        }
        if let Some(e) = choice.pointer("/logprobs/content").and_then(Json::as_array) {
            self.entries.extend(e.iter().cloned());
        }
        if let Some(f) = choice.get("finish_reason").filter(|f| !f.is_null()) {
            self.finish_reason = Some(f.clone());
        }
        let piece = choice
            .pointer("/delta/content")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        self.content.push_str(&piece);
        piece
    }

    /// The chunks as one `chat.completion` body.
    pub fn response(self) -> Json {
        let mut choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": self.content},
            "finish_reason": self.finish_reason.unwrap_or(json!("stop")),
        });
        if !self.entries.is_empty() {
            choice["logprobs"] = json!({"content": self.entries});
        }
        if !self.token_ids.is_empty() {
            choice["token_ids"] = Json::Array(self.token_ids);
        }
        let mut response = json!({"choices": [choice]});
        if let Some(p) = self.prompt_ids {
            response["prompt_token_ids"] = p;
        }
        if let Some(u) = self.usage {
            response["usage"] = u;
        }
        response
    }
}

impl Upstream {
    /// A streamed chat completion: content pieces go to `events` as they come;
    /// `connected` learns whether the engine accepted the request (so its error
    /// can still be the HTTP status). None when the call failed before it began
    /// or the client went away (nothing to record); else the whole reply.
    pub fn stream(
        &self,
        request: &ChatRequest,
        max_tokens: usize,
        adapter: Option<&str>,
        events: &mpsc::UnboundedSender<Event>,
        connected: oneshot::Sender<Result<(), UpstreamError>>,
    ) -> Option<Result<(Reply, String, TokenSource), UpstreamError>> {
        std::thread::scope(|scope| {
            let prompt = scope.spawn(|| self.engine_prompt(request));
            let reply = self.stream_reply(request, max_tokens, adapter, events, connected)?;
            Some(reply.and_then(|response| self.finish_reply(&response, joined(prompt))))
        })
    }

    /// The streamed call itself: the folded `chat.completion` body, or None (see
    /// [`Upstream::stream`]).
    fn stream_reply(
        &self,
        request: &ChatRequest,
        max_tokens: usize,
        adapter: Option<&str>,
        events: &mpsc::UnboundedSender<Event>,
        connected: oneshot::Sender<Result<(), UpstreamError>>,
    ) -> Option<Result<Json, UpstreamError>> {
        use std::io::BufRead;
        let url = format!("{}/v1/chat/completions", self.base);
        let mut body = self.chat_body(request, max_tokens, adapter);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let mut answer = self.post_raw("/v1/chat/completions", &body);
        // SGLang refuses `return_token_ids` on a stream: ask again without it.
        if let Err(e) = &answer {
            if e.status == StatusCode::BAD_REQUEST && e.message.contains("return_token_ids") {
                if let Some(b) = body.as_object_mut() {
                    b.remove("return_token_ids");
                }
                answer = self.post_raw("/v1/chat/completions", &body);
            }
        }
        let response = match answer {
            Ok(r) => {
                let _ = connected.send(Ok(()));
                r
            }
            Err(e) => {
                let _ = connected.send(Err(e));
                return None;
            }
        };
        let mut fold = ChunkFold::default();
        for line in std::io::BufReader::new(response.into_reader()).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(UpstreamError {
                        status: StatusCode::BAD_GATEWAY,
                        code: "upstream_error",
                        message: format!("the upstream {url} broke off its stream: {e}"),
                    }))
                }
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Json = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(e) => {
                    return Some(Err(UpstreamError {
                        status: StatusCode::BAD_GATEWAY,
                        code: "upstream_bad_response",
                        message: format!("the upstream {url} sent a chunk that is not JSON: {e}"),
                    }))
                }
            };
            if let Some(message) = chunk.pointer("/error/message").and_then(Json::as_str) {
                return Some(Err(UpstreamError {
                    status: StatusCode::BAD_GATEWAY,
                    code: "upstream_error",
                    message: format!("the upstream {url} failed mid-stream: {message}"),
                }));
            }
            let piece = fold.add(&chunk);
            // A closed channel: the client went away; dropping the response
            // closes the connection, which cancels the engine's generation.
            if events.is_closed() {
                return None;
            }
            if !piece.is_empty() && events.send(Event::Piece(piece)).is_err() {
                return None;
            }
        }
        Some(Ok(fold.response()))
    }

    /// POSTs `body` and returns the response unread (for a stream).
    fn post_raw(&self, path: &str, body: &Json) -> Result<ureq::Response, UpstreamError> {
        self.request("POST", path, CALL_TIMEOUT)
            .send_json(body)
            .map_err(|e| self.error(path, e))
    }
}

#[cfg(test)]
mod tests;
