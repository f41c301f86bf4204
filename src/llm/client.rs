//! One chat request and what answers it: a [`ChatBackend`] answers one request;
//! [`LocalBackend`] generates with a GGUF model in this process (the HTTP one is
//! [`super::remote::RemoteBackend`]).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value as Json;

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
    pub(super) fn message(&self) -> &str {
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
