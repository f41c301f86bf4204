//! Asking an LLM the same question several times: the part of judging that
//! `claw judge` (the PRM) and `claw distill-hints` (the hint judge) share, and
//! that `claw eval` uses to put benchmark prompts to a model or an endpoint.
//!
//! A [`ChatBackend`] answers one chat request: [`LocalBackend`] generates with a
//! GGUF model in this process, [`RemoteBackend`] POSTs to any OpenAI-compatible
//! `/chat/completions` endpoint. [`VoteRunner`] sends every prompt `votes` times
//! (each vote with its own seed, derived from the item's key, so a re-run gives the
//! same votes on the local model), with a per-call timeout, bounded retries with
//! exponential backoff, and at most `concurrency` calls in flight. A call that
//! still fails is an `Err` in its slot (an invalid vote for the caller), never a
//! crash; only a misconfigured judge (HTTP 401, 403, 404: wrong key, URL or model
//! name) stops the run, since every later call would fail the same way.
//!
//! Parsing the replies is the caller's business (see [`super::votes`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value as Json};

use crate::model::generate::Flow;
use crate::model::{FinishReason, Model, SamplingParams};

/// One chat request.
#[derive(Clone, Debug)]
pub struct ChatRequest<'a> {
    pub messages: &'a [Json],
    pub temperature: f32,
    pub max_tokens: usize,
    pub seed: u64,
    pub timeout: Duration,
    /// Generation stops before the first of these strings (none: sent as absent).
    pub stop: &'a [String],
}

/// A reply's text and, when the backend reports it, how many tokens it generated.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub text: String,
    pub completion_tokens: Option<u64>,
}

/// Why a call gave no reply.
#[derive(Debug)]
pub enum CallError {
    /// May work on another try: a timeout, a connection error, HTTP 408, 429 or 5xx.
    Transient(String),
    /// Will fail the same way again: a malformed reply, HTTP 400, a prompt longer
    /// than the model's context.
    Failed(String),
    /// The judge is misconfigured (wrong key, URL or model): stop the run.
    Fatal(String),
}

impl CallError {
    fn message(&self) -> &str {
        match self {
            CallError::Transient(m) | CallError::Failed(m) | CallError::Fatal(m) => m,
        }
    }
}

/// Something that answers chat requests.
pub trait ChatBackend: Send + Sync {
    /// The judge model's name (`judge_source` is `prm:<name>`).
    fn name(&self) -> &str;
    /// How many calls may usefully run at once (a local model uses every core for
    /// one generation, so 1).
    fn max_concurrency(&self) -> usize;
    /// Whether a failed call is worth retrying at all (a local model with a fixed
    /// seed would only fail again).
    fn retries_help(&self) -> bool;
    /// One attempt, bounded by `req.timeout`.
    fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError>;
}

/// A GGUF model in this process, prompted through its own chat template.
pub struct LocalBackend {
    model: Model,
}

impl LocalBackend {
    pub fn new(model: Model) -> Self {
        LocalBackend { model }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl ChatBackend for LocalBackend {
    fn name(&self) -> &str {
        &self.model.name
    }

    fn max_concurrency(&self) -> usize {
        1
    }

    fn retries_help(&self) -> bool {
        false
    }

    fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
        let failed = |e: anyhow::Error| CallError::Failed(format!("{e:#}"));
        let prompt = self
            .model
            .template
            .render(req.messages, None, true)
            .map_err(failed)?;
        let ids = self.model.tokenizer.encode(&prompt).map_err(failed)?;
        let params = SamplingParams {
            temperature: req.temperature,
            seed: Some(req.seed),
            max_tokens: req.max_tokens,
            stop: req.stop.to_vec(),
            ..Default::default()
        };
        let start = Instant::now();
        let timeout = req.timeout;
        let generation = self
            .model
            .generate(&ids, &params, |_| {
                if start.elapsed() > timeout {
                    Flow::Cancel
                } else {
                    Flow::Continue
                }
            })
            .map_err(failed)?;
        if generation.finish_reason == FinishReason::Cancelled {
            return Err(CallError::Failed(format!(
                "timed out after {:.1} s ({} tokens generated)",
                timeout.as_secs_f64(),
                generation.token_ids.len()
            )));
        }
        Ok(Reply {
            text: generation.text,
            completion_tokens: Some(generation.token_ids.len() as u64),
        })
    }
}

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

/// How to call the judge.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// Calls per prompt (m).
    pub votes: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    /// Per call (one attempt).
    pub timeout: Duration,
    /// Extra attempts after a transient failure.
    pub retries: usize,
    /// Wait before the first retry; doubled for each further one (at most 30 s).
    pub backoff: Duration,
    /// Most calls in flight at once (also bounded by the backend).
    pub concurrency: usize,
    /// Base seed; each vote's seed mixes it with the item's key and the vote index.
    pub seed: u64,
    /// Stop strings sent with every call (none by default).
    pub stop: Vec<String>,
    /// What the backend is to the user ("judge", "model"), in messages.
    pub role: &'static str,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            votes: 3,
            temperature: 0.6,
            max_tokens: 1024,
            timeout: Duration::from_secs(120),
            retries: 2,
            backoff: Duration::from_millis(500),
            concurrency: 4,
            seed: 0,
            stop: Vec::new(),
            role: "judge",
        }
    }
}

/// Counters over a [`VoteRunner::run`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallStats {
    /// Calls that were made (votes), retries not counted.
    pub calls: u64,
    /// Calls that gave no reply after all retries.
    pub failed: u64,
    /// Retry attempts.
    pub retries: u64,
    /// Tokens generated, over the replies that reported a count.
    pub completion_tokens: u64,
    /// Replies with no token count (a server that sends no `usage`).
    pub replies_without_tokens: u64,
    /// Wall time spent in [`VoteRunner::run`].
    pub seconds: f64,
}

impl CallStats {
    pub fn add(&mut self, other: &CallStats) {
        self.calls += other.calls;
        self.failed += other.failed;
        self.retries += other.retries;
        self.completion_tokens += other.completion_tokens;
        self.replies_without_tokens += other.replies_without_tokens;
        self.seconds += other.seconds;
    }

    /// Generated tokens per wall-clock second, when any reply reported tokens.
    pub fn tokens_per_s(&self) -> Option<f64> {
        (self.completion_tokens > 0 && self.seconds > 0.0)
            .then(|| self.completion_tokens as f64 / self.seconds)
    }
}

/// The replies to one item's calls, in vote order: the text, or why the call failed.
pub type Replies = Vec<Result<String, String>>;

/// A finished call: job index, outcome, retries it took.
type Finished = (usize, Result<Reply, String>, u64);

/// One prompt to send `votes` times; `key` (a sample id) seeds its votes.
pub struct VoteItem {
    pub key: String,
    pub messages: Vec<Json>,
}

/// Sends prompts to a backend, `votes` times each (see the module docs).
pub struct VoteRunner {
    backend: Box<dyn ChatBackend>,
    options: CallOptions,
}

impl VoteRunner {
    pub fn new(backend: Box<dyn ChatBackend>, options: CallOptions) -> Result<Self> {
        anyhow::ensure!(options.votes >= 1, "--votes must be at least 1");
        anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(options.max_tokens >= 1, "--max-tokens must be at least 1");
        anyhow::ensure!(
            options.temperature.is_finite() && options.temperature >= 0.0,
            "--temperature must be >= 0"
        );
        Ok(VoteRunner { backend, options })
    }

    pub fn backend(&self) -> &dyn ChatBackend {
        self.backend.as_ref()
    }

    pub fn options(&self) -> &CallOptions {
        &self.options
    }

    /// Calls the judge `votes` times for every item. Returns, per item, one
    /// `Ok(reply text)` or `Err(reason)` per vote (in vote order), and counters.
    /// `on_call` is told after each finished call (for progress). Fails only on a
    /// [`CallError::Fatal`] reply.
    pub fn run(
        &self,
        items: &[VoteItem],
        on_call: &(dyn Fn() + Sync),
    ) -> Result<(Vec<Replies>, CallStats)> {
        let votes = self.options.votes;
        let jobs = items.len() * votes;
        let start = Instant::now();
        let mut results: Vec<Replies> = items
            .iter()
            .map(|_| (0..votes).map(|_| Err("not run".to_string())).collect())
            .collect();
        if jobs == 0 {
            return Ok((results, CallStats::default()));
        }
        let workers = self
            .options
            .concurrency
            .min(self.backend.max_concurrency())
            .min(jobs)
            .max(1);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let fatal: Mutex<Option<String>> = Mutex::new(None);
        let done: Mutex<Vec<Finished>> = Mutex::new(Vec::with_capacity(jobs));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let job = next.fetch_add(1, Ordering::Relaxed);
                    if job >= jobs {
                        break;
                    }
                    let item = &items[job / votes];
                    let vote = job % votes;
                    let (outcome, retries) = self.call_with_retries(item, vote, &stop);
                    let outcome = match outcome {
                        Err(CallError::Fatal(msg)) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut f = fatal.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(msg);
                            break;
                        }
                        Err(e) => {
                            crate::debug!(
                                "{} call for {} (vote {}) failed: {}",
                                self.options.role,
                                item.key,
                                vote + 1,
                                e.message()
                            );
                            Err(e.message().to_string())
                        }
                        Ok(reply) => Ok(reply),
                    };
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((job, outcome, retries));
                    on_call();
                });
            }
        });
        if let Some(msg) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
            bail!("the {} is misconfigured: {msg}", self.options.role);
        }
        let mut stats = CallStats::default();
        for (job, outcome, retries) in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
            stats.calls += 1;
            stats.retries += retries;
            results[job / votes][job % votes] = match outcome {
                Ok(reply) => {
                    match reply.completion_tokens {
                        Some(n) => stats.completion_tokens += n,
                        None => stats.replies_without_tokens += 1,
                    }
                    Ok(reply.text)
                }
                Err(e) => {
                    stats.failed += 1;
                    Err(e)
                }
            };
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok((results, stats))
    }

    fn call_with_retries(
        &self,
        item: &VoteItem,
        vote: usize,
        stop: &AtomicBool,
    ) -> (Result<Reply, CallError>, u64) {
        let o = &self.options;
        let request = ChatRequest {
            messages: &item.messages,
            temperature: o.temperature,
            max_tokens: o.max_tokens,
            seed: vote_seed(o.seed, &item.key, vote),
            timeout: o.timeout,
            stop: &o.stop,
        };
        let attempts = if self.backend.retries_help() {
            o.retries + 1
        } else {
            1
        };
        let mut retries = 0;
        let mut wait = o.backoff;
        loop {
            let outcome = self.backend.complete(&request);
            match &outcome {
                Err(CallError::Transient(msg)) if (retries as usize) + 1 < attempts => {
                    if stop.load(Ordering::Relaxed) {
                        return (outcome, retries);
                    }
                    crate::debug!(
                        "{} call for {} (vote {}): {msg}; retrying in {:.1} s",
                        o.role,
                        item.key,
                        vote + 1,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(30));
                    retries += 1;
                }
                _ => return (outcome, retries),
            }
        }
    }
}

/// The seed of vote `vote` on the item `key`: FNV-1a over both, mixed with `base`.
/// Stable across runs and platforms (unlike std's hasher), so a re-run on the
/// local model gives the same votes, whatever the order the items come in.
pub fn vote_seed(base: u64, key: &str, vote: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ base;
    for b in key.bytes().chain((vote as u64).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

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

    #[test]
    fn seeds_differ_per_vote_and_item_and_are_stable() {
        assert_ne!(vote_seed(0, "a", 0), vote_seed(0, "a", 1));
        assert_ne!(vote_seed(0, "a", 0), vote_seed(0, "b", 0));
        assert_ne!(vote_seed(0, "a", 0), vote_seed(1, "a", 0));
        assert_eq!(vote_seed(7, "sample-1", 2), vote_seed(7, "sample-1", 2));
    }

    #[derive(Default)]
    struct Counters {
        calls: AtomicU64,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    /// Answers from a script keyed by the message text; counts calls.
    struct Scripted(Arc<Counters>);

    impl ChatBackend for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn max_concurrency(&self) -> usize {
            usize::MAX
        }
        fn retries_help(&self) -> bool {
            true
        }
        fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
            let c = &self.0;
            let n = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_in_flight.fetch_max(n, Ordering::SeqCst);
            let call = c.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
            let text = req.messages[0]["content"].as_str().unwrap_or("");
            match text {
                "flaky" if call.is_multiple_of(2) => Err(CallError::Transient("503".into())),
                "broken" => Err(CallError::Failed("bad json".into())),
                "auth" => Err(CallError::Fatal("HTTP 401".into())),
                _ => Ok(Reply {
                    text: format!("{text} {}", req.seed % 2),
                    completion_tokens: Some(3),
                }),
            }
        }
    }

    fn runner_with(concurrency: usize, retries: usize) -> (VoteRunner, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let runner = VoteRunner::new(
            Box::new(Scripted(counters.clone())),
            CallOptions {
                votes: 3,
                retries,
                backoff: Duration::from_millis(1),
                concurrency,
                ..Default::default()
            },
        )
        .unwrap();
        (runner, counters)
    }

    fn runner(concurrency: usize, retries: usize) -> VoteRunner {
        runner_with(concurrency, retries).0
    }

    fn item(key: &str, text: &str) -> VoteItem {
        VoteItem {
            key: key.into(),
            messages: vec![json!({"role": "user", "content": text})],
        }
    }

    #[test]
    fn every_vote_lands_in_its_slot_and_is_counted() {
        let r = runner(2, 0);
        let calls = AtomicUsize::new(0);
        let items = [item("a", "fine"), item("b", "broken"), item("c", "fine")];
        let (out, stats) = r
            .run(&items, &|| {
                calls.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 9);
        assert_eq!(out.len(), 3);
        assert!(out[0]
            .iter()
            .all(|v| v.as_ref().is_ok_and(|t| t.starts_with("fine"))));
        assert!(out[1]
            .iter()
            .all(|v| v.as_ref().is_err_and(|e| e == "bad json")));
        assert_eq!((stats.calls, stats.failed, stats.retries), (9, 3, 0));
        assert_eq!(stats.completion_tokens, 18);
    }

    #[test]
    fn transient_failures_are_retried_within_the_bound() {
        // every other call fails: with 2 retries every vote gets through
        let (out, stats) = runner(1, 2).run(&[item("a", "flaky")], &|| {}).unwrap();
        assert!(out[0].iter().all(Result::is_ok), "{out:?}");
        assert!(stats.retries >= 1);
        // without retries the failures stay failures
        let (out, stats) = runner(1, 0).run(&[item("a", "flaky")], &|| {}).unwrap();
        assert_eq!(out[0].iter().filter(|v| v.is_err()).count(), 2);
        assert_eq!((stats.failed, stats.retries), (2, 0));
    }

    #[test]
    fn concurrency_is_bounded() {
        let (r, counters) = runner_with(3, 0);
        let items: Vec<VoteItem> = (0..8).map(|i| item(&i.to_string(), "fine")).collect();
        r.run(&items, &|| {}).unwrap();
        assert_eq!(counters.calls.load(Ordering::SeqCst), 24);
        let max = counters.max_in_flight.load(Ordering::SeqCst);
        assert!((2..=3).contains(&max), "max in flight {max}");
    }

    #[test]
    fn a_misconfigured_judge_stops_the_run() {
        let err = runner(2, 2)
            .run(&[item("a", "fine"), item("b", "auth")], &|| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("misconfigured") && err.contains("401"),
            "{err}"
        );
    }
}
