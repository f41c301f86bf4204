//! Command-line flags for an LLM judge, shared by `claw judge` (the PRM) and
//! `claw distill-hints` (the hint judge): which model answers (a local GGUF with
//! an optional adapter, or any OpenAI-compatible URL) and how it is called.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::llm::{CallOptions, ChatBackend, LocalBackend, RemoteBackend};
use crate::model::{resolve_model_path, Model, WeightFormat};

#[derive(Args, Debug, Clone)]
pub struct LlmArgs {
    /// The judge: a GGUF file (default: $CLAW_MODEL or models/'s default), or with
    /// --judge-url the model name the server serves.
    #[arg(long, env = "CLAW_JUDGE_MODEL", value_name = "PATH|NAME")]
    pub judge_model: Option<String>,

    /// A LoRA adapter (PEFT safetensors with its .json config, as `claw train`
    /// writes) applied to a local judge model.
    #[arg(long, value_name = "FILE", conflicts_with = "judge_url")]
    pub judge_adapter: Option<PathBuf>,

    /// How a local judge holds its weights.
    #[arg(long, value_enum, default_value_t = WeightFormat::default())]
    pub judge_weights: WeightFormat,

    /// An OpenAI-compatible server to use as the judge instead of a local model.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,

    /// Bearer token for --judge-url.
    #[arg(
        long,
        env = "CLAW_JUDGE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub judge_api_key: Option<String>,

    /// Sampling temperature of the judge.
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,

    /// Most tokens per judge reply.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_tokens: usize,

    /// Seconds one judge call may take.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub timeout: f64,

    /// Extra attempts for a call that timed out or hit a server error (remote judges).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub retries: usize,

    /// Most judge calls in flight at once (remote judges; a local model runs one).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub concurrency: usize,

    /// Base seed of the judge's sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// CPU threads for a local judge (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl LlmArgs {
    /// Checks the flags and applies --threads; call before any model work.
    pub fn call_options(&self, votes: usize) -> Result<CallOptions> {
        if let Some(threads) = self.threads {
            anyhow::ensure!(threads > 0, "--threads must be at least 1");
            // candle sizes its thread pool from this variable on first use.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
        anyhow::ensure!(
            self.timeout.is_finite() && self.timeout > 0.0,
            "--timeout must be a positive number of seconds"
        );
        anyhow::ensure!(votes >= 1, "--votes must be at least 1");
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        if let Some(url) = &self.judge_url {
            crate::llm::endpoints(url)?; // a bad URL is a usage error: say so now
        }
        Ok(CallOptions {
            votes,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            timeout: Duration::from_secs_f64(self.timeout),
            retries: self.retries,
            concurrency: self.concurrency,
            seed: self.seed,
            ..Default::default()
        })
    }

    /// Connects to the remote judge, or loads the local model (and adapter).
    pub fn connect(&self) -> Result<Box<dyn ChatBackend>> {
        if let Some(url) = &self.judge_url {
            let backend =
                RemoteBackend::connect(url, self.judge_api_key.clone(), self.judge_model.clone())
                    .with_context(|| format!("connecting to the judge at {url}"))?;
            crate::debug!("judge endpoint {}", backend.endpoint());
            return Ok(Box::new(backend));
        }
        let explicit = self
            .judge_model
            .as_ref()
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("CLAW_MODEL").map(PathBuf::from));
        let path = resolve_model_path(explicit.as_deref())?;
        crate::debug!("loading the judge model {}", path.display());
        let mut model = Model::load_with(&path, self.judge_weights)
            .with_context(|| format!("loading the judge model {}", path.display()))?;
        if let Some(adapter_path) = &self.judge_adapter {
            // judge_source names both: prm:<model>+<adapter>
            crate::adapter::apply_file(&mut model, adapter_path).context("the judge's adapter")?;
        }
        Ok(Box::new(LocalBackend::new(model)))
    }
}
