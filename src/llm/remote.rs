//! An OpenAI-compatible chat completions endpoint as a [`ChatBackend`]: the
//! URLs to call, the HTTP request, and reading the reply.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value as Json};

use super::client::{CallError, ChatBackend, ChatRequest, Reply};

/// An OpenAI-compatible chat completions endpoint (vLLM, llama.cpp's server,
/// SGLang, `claw serve`, a hosted API behind a local proxy), over plain HTTP.
pub struct RemoteBackend {
    agent: ureq::Agent,
    endpoint: String,
    api_key: Option<String>,
    model: String,
    flags: EndpointFlags,
}

/// The command-line flags that configure an endpoint, named in error messages
/// so that each command points at its own flags.
#[derive(Clone, Copy, Debug)]
pub struct EndpointFlags {
    pub url: &'static str,
    pub api_key: &'static str,
    pub model: &'static str,
}

/// `claw judge` and `claw distill-hints`' flags.
pub const JUDGE_FLAGS: EndpointFlags = EndpointFlags {
    url: "--judge-url",
    api_key: "--judge-api-key or CLAW_JUDGE_API_KEY",
    model: "--judge-model",
};

impl RemoteBackend {
    /// `url` is a base URL with or without `/v1` (`http://host:8000`,
    /// `http://host:8000/v1`) or the full `.../chat/completions` URL. With no
    /// `model`, the first model listed by `GET {base}/v1/models` is used.
    pub fn connect(url: &str, api_key: Option<String>, model: Option<String>) -> Result<Self> {
        Self::connect_with_flags(url, api_key, model, JUDGE_FLAGS)
    }

    /// [`connect`](Self::connect), naming `flags` in error messages.
    pub fn connect_with_flags(
        url: &str,
        api_key: Option<String>,
        model: Option<String>,
        flags: EndpointFlags,
    ) -> Result<Self> {
        let (endpoint, models_url) = endpoints(url)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .build();
        let api_key = api_key.filter(|k| !k.is_empty());
        let mut backend = RemoteBackend {
            agent,
            endpoint,
            api_key,
            model: model.unwrap_or_default(),
            flags,
        };
        if backend.model.is_empty() {
            backend.model = backend.first_model(&models_url)?;
        }
        Ok(backend)
    }

    /// The chat completions URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn first_model(&self, models_url: &str) -> Result<String> {
        let hint = format!("pass the model name with {}", self.flags.model);
        let mut req = self.agent.get(models_url).timeout(Duration::from_secs(30));
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let body = req
            .call()
            .map_err(|e| anyhow!("GET {models_url}: {}", describe_ureq(e)))
            .and_then(|r| {
                r.into_string()
                    .with_context(|| format!("GET {models_url}: reading the reply"))
            })
            .with_context(|| format!("cannot ask the endpoint for its models ({hint})"))?;
        let json: Json = serde_json::from_str(&body)
            .with_context(|| format!("GET {models_url}: the reply is not JSON ({hint})"))?;
        json.pointer("/data/0/id")
            .and_then(Json::as_str)
            .map(str::to_string)
            .with_context(|| format!("GET {models_url}: no model listed in `data` ({hint})"))
    }
}

/// The chat completions URL and the models URL for a user-given base URL.
pub fn endpoints(url: &str) -> Result<(String, String)> {
    let url = url.trim().trim_end_matches('/');
    if url.starts_with("https://") {
        bail!(
            "{url}: https is not supported by claw's HTTP client; use an \
             http:// endpoint (a local server, or a TLS-terminating proxy in front of a hosted API)"
        );
    }
    if !url.starts_with("http://") {
        bail!("{url}: the endpoint URL must start with http://");
    }
    if let Some(base) = url.strip_suffix("/chat/completions") {
        return Ok((url.to_string(), format!("{base}/models")));
    }
    let base = if url.ends_with("/v1") {
        url.to_string()
    } else {
        format!("{url}/v1")
    };
    Ok((format!("{base}/chat/completions"), format!("{base}/models")))
}

fn describe_ureq(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => {
            let body = r.into_string().unwrap_or_default();
            format!("HTTP {code}: {}", excerpt(&body))
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.trim();
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

impl ChatBackend for RemoteBackend {
    fn name(&self) -> &str {
        &self.model
    }

    fn max_concurrency(&self) -> usize {
        usize::MAX
    }

    fn retries_help(&self) -> bool {
        true
    }

    fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
        let mut body = json!({
            "model": self.model,
            "messages": req.messages,
            // f32 -> shortest decimal -> f64, so 0.6 is sent as 0.6, not 0.6000000238
            "temperature": format!("{}", req.temperature).parse::<f64>().unwrap_or(0.0),
            "max_tokens": req.max_tokens,
            "seed": req.seed,
            "stream": false,
        });
        if !req.stop.is_empty() {
            body["stop"] = json!(req.stop);
        }
        let mut http = self
            .agent
            .post(&self.endpoint)
            .timeout(req.timeout)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            http = http.set("Authorization", &format!("Bearer {key}"));
        }
        let response = match http.send_string(&body.to_string()) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = excerpt(&r.into_string().unwrap_or_default());
                let msg = format!("POST {}: HTTP {code}: {text}", self.endpoint);
                return Err(match code {
                    401 | 403 => CallError::Fatal(format!("{msg} (check {})", self.flags.api_key)),
                    404 => CallError::Fatal(format!(
                        "{msg} (check {} and the model name `{}`, {})",
                        self.flags.url, self.model, self.flags.model
                    )),
                    408 | 429 | 500..=599 => CallError::Transient(msg),
                    _ => CallError::Failed(msg),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(CallError::Transient(format!("POST {}: {t}", self.endpoint)))
            }
        };
        // A body cut off by the timeout is an io error here: worth another try.
        let text = response
            .into_string()
            .map_err(|e| CallError::Transient(format!("reading the reply: {e}")))?;
        parse_completion(&text).map_err(|e| CallError::Failed(format!("{e:#}")))
    }
}

/// The text of an OpenAI chat completion: `choices[0].message.content`, or the
/// separate `reasoning_content` some servers use when the content is empty.
pub fn parse_completion(body: &str) -> Result<Reply> {
    let json: Json = serde_json::from_str(body)
        .map_err(|e| anyhow!("the reply is not JSON ({e}): {}", excerpt(body)))?;
    let message = json
        .pointer("/choices/0/message")
        .with_context(|| format!("the reply has no choices[0].message: {}", excerpt(body)))?;
    let content = message.get("content").and_then(Json::as_str).unwrap_or("");
    // A whitespace-only content stays as it is (eval compares replies exactly)
    // unless there is a reasoning_content to use instead.
    let reasoning = message
        .get("reasoning_content")
        .and_then(Json::as_str)
        .filter(|r| !r.trim().is_empty());
    let text = match reasoning {
        Some(r) if content.trim().is_empty() => r,
        _ => content,
    };
    Ok(Reply {
        text: text.to_string(),
        completion_tokens: json
            .pointer("/usage/completion_tokens")
            .and_then(Json::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = |u: &str| endpoints(u).unwrap();
        assert_eq!(
            e("http://h:8000"),
            (
                "http://h:8000/v1/chat/completions".into(),
                "http://h:8000/v1/models".into()
            )
        );
        assert_eq!(
            e("http://h:8000/v1/").0,
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            e("http://h/api/v1/chat/completions"),
            (
                "http://h/api/v1/chat/completions".into(),
                "http://h/api/v1/models".into()
            )
        );
        assert!(endpoints("https://api.example.com/v1")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(endpoints("h:8000").is_err());
    }

    #[test]
    fn completion_bodies() {
        let r = parse_completion(
            r#"{"choices":[{"message":{"role":"assistant","content":"ok \\boxed{1}"}}],"usage":{"completion_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(r.text, "ok \\boxed{1}");
        assert_eq!(r.completion_tokens, Some(7));
        let r = parse_completion(
            r#"{"choices":[{"message":{"content":null,"reasoning_content":"\\boxed{-1}"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            (r.text.as_str(), r.completion_tokens),
            ("\\boxed{-1}", None)
        );
        assert!(parse_completion("<html>bad gateway</html>").is_err());
        assert!(parse_completion(r#"{"choices":[]}"#).is_err());
    }
}
