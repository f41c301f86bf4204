//! `claw serve`: the CLI face of [`crate::serve`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::model::{resolve_model_path, WeightFormat};
use crate::serve::session::TurnType;
use crate::serve::{self, ServeConfig};

/// Serve the model over an OpenAI-compatible API and record every turn.
#[derive(Args, Debug)]
#[command(long_about = "\
Serve a local GGUF model over an OpenAI-compatible HTTP API and record every turn.

Reads: a GGUF model (--model, $CLAW_MODEL, or the default SmolLM2-135M-Instruct in
models/). Writes: one rollout row (schema claw.rollout.v1) per answered chat request
and per feedback event into DIR/raw/*.parquet, segments that roll every 1024 rows or
5 s and are closed on SIGINT/SIGTERM (a graceful stop loses nothing). --no-record
writes nothing.

Endpoints: POST /v1/chat/completions (JSON or SSE streaming, tools, logprobs),
GET /v1/models, POST /v1/feedback ({session_id, turn or response_id, rating: 1|-1,
text}), GET /healthz, GET /metrics (Prometheus).

Sessions: send X-Session-Id (or a session_id body field) to group turns, X-Turn-Type:
main|side (missing = main, or --default-turn-type), X-Session-Done: 1 on the last
turn. Every response carries X-Session-Id and a unique id (chatcmpl-...) that
feedback can name.

Adapters: serves the LoRA adapter DIR/checkpoints/LATEST names (as written by
claw train) and hot-swaps each new one: loaded and checked in the background, then
used by requests admitted after the swap; requests in flight finish on the version
they started with, and each row's policy_version is the adapter step that produced
it (0 = base model). A checkpoint that fails to load is logged and ignored.
--adapter PATH serves PATH from the start (and still follows later LATEST changes
unless --no-reload). The version is in /healthz, /metrics (claw_policy_version),
/v1/models, the X-Claw-Policy-Version response header and system_fingerprint.

Prefix cache: the KV of recent requests (prompt and reply) is kept, up to
--prefix-cache-mb, per policy version; a request that starts with a cached token
prefix prefills only the rest (usage.prompt_tokens_details.cached_tokens says how
many were reused; /metrics has claw_prefix_cache_*). -v logs each request's prompt,
cached and prefilled tokens and its prefill and decode times.

Continuous batching: up to --parallel requests decode together, one forward pass
per token for all of them (each weight is read once for the batch); a request joins
and leaves between steps, and a long prompt is prefilled one 512-token chunk per
step so the others keep streaming. A request's tokens and log-probs are the same
as if it ran alone.

Example:
  claw serve --model models/SmolLM2-135M-Instruct.Q4_1.gguf --dir ./claw-data

  # any OpenAI SDK: base_url http://127.0.0.1:8080/v1, any api_key unless --api-key
  from openai import OpenAI
  client = OpenAI(base_url=\"http://127.0.0.1:8080/v1\", api_key=\"unused\")
  client.chat.completions.create(model=\"claw\", messages=[{\"role\": \"user\", \"content\": \"hi\"}],
      extra_headers={\"X-Session-Id\": \"chat-42\"})

  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")]
pub struct ServeArgs {
    /// GGUF model file.
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,
    /// How to hold the weights: as stored in the GGUF (quantized), or dequantized.
    #[arg(long, value_enum, default_value_t = WeightFormat::default())]
    pub weights: WeightFormat,
    /// Shared directory; rows are recorded to DIR/raw/. An object store URL
    /// (s3://bucket/prefix, gs://, az://; credentials from the environment)
    /// records through --spool and follows the store's checkpoints/LATEST.
    #[arg(long, default_value = "./claw-data")]
    pub dir: String,
    /// With --dir URL: the local folder where turns are recorded (and logged
    /// durably) before their segment is uploaded, and checkpoints are copied
    /// to be loaded. Keep it across restarts: a new server uploads what a
    /// killed one left there.
    #[arg(long, default_value = "./claw-spool", value_name = "DIR")]
    pub spool: PathBuf,
    /// Address to listen on (loopback by default; anything else exposes the model).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the log line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Record nothing.
    #[arg(long)]
    pub no_record: bool,
    /// Do not fsync each answered turn to DIR/wal/ before its reply completes
    /// (then a kill -9 loses the turns of the open segment; for benchmarks).
    #[arg(long)]
    pub no_durable_log: bool,
    /// Require `Authorization: Bearer KEY` on every route but /healthz.
    #[arg(long, env = "CLAW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Turn type of requests that do not say (X-Turn-Type / turn_type).
    #[arg(long, value_enum, default_value_t = TurnType::Main)]
    pub default_turn_type: TurnType,
    /// Largest max_tokens a request may ask for (also the default).
    #[arg(long, default_value_t = 2048)]
    pub max_tokens_limit: usize,
    /// Largest request body in bytes (larger gets 413).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most messages in one chat request (more gets 400). Prompts are also bounded
    /// by the model's context length.
    #[arg(long, default_value_t = 2048)]
    pub max_messages: usize,
    /// Chat requests admitted at once, generating or waiting (more get 429 + Retry-After).
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Requests generated at once, decoded together in one batch (continuous
    /// batching; the rest of the queue waits, first come first served). Each holds
    /// its own KV cache, up to the context length.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// How long an idle session is remembered (feedback for it afterwards gets
    /// 404), with a unit: 90s, 30m, 2h.
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    pub session_timeout: String,
    /// CPU threads for the model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// LoRA adapter (adapter-NNNNNN.safetensors + its .json, or a PEFT adapter) to
    /// serve from the start; its claw_step is the policy version.
    #[arg(long, value_name = "PATH")]
    pub adapter: Option<PathBuf>,
    /// Do not follow DIR/checkpoints/LATEST: serve the base model (or --adapter) only.
    #[arg(long)]
    pub no_reload: bool,
    /// How often to look at DIR/checkpoints/LATEST besides filesystem
    /// notifications (which network filesystems do not deliver).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub reload_poll_ms: u64,
    /// Memory for the prefix cache, in MiB: the KV of recent requests, so that a
    /// prompt that starts like an earlier one (an agent's next turn) prefills
    /// only the new part. Least recently used entries go first; 0 disables it.
    #[arg(long, default_value_t = 1024, value_name = "MB")]
    pub prefix_cache_mb: usize,
    /// Close a recorded segment after this many rows...
    #[arg(long, default_value_t = crate::rollout::DEFAULT_SEGMENT_ROWS)]
    pub segment_rows: usize,
    /// ...or this many milliseconds after its first row (a kill -9 loses at most
    /// the open segment).
    #[arg(long, default_value_t = crate::rollout::DEFAULT_SEGMENT_AGE.as_millis() as u64, value_name = "MS")]
    pub segment_age_ms: u64,
    /// Generate with another engine instead of a local model: an OpenAI-compatible
    /// server (llama.cpp's llama-server, vLLM, SGLang) at this http:// base URL
    /// (with or without /v1). claw keeps its own API checks, sessions, feedback and
    /// recording; it asks the engine for per-token log-probs and token ids
    /// (llama.cpp: logprobs ids plus /apply-template and /tokenize; vLLM/SGLang:
    /// return_token_ids) and records how it got them in token_source. No local
    /// model is loaded (--model only names the GGUF for --upstream-adapters
    /// llama-cpp); checkpoints reach the engine with --upstream-adapters.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Model name to send to the upstream and record (default: the first model
    /// its GET /v1/models lists).
    #[arg(long, value_name = "NAME", requires = "upstream")]
    pub upstream_model: Option<String>,
    /// Load each new checkpoint (DIR/checkpoints/LATEST) into the upstream engine
    /// and record the adapter it used: vllm (POST /v1/load_lora_adapter, needs
    /// VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora; requests name the
    /// adapter as model), sglang (POST /load_lora_adapter, --enable-lora;
    /// requests carry lora_path), llama-cpp (llama-server loads GGUF adapters only
    /// at start: claw writes adapter-NNNNNN.gguf, using --model, logs the
    /// --lora command to restart it with, and records the adapter
    /// GET /lora-adapters says it applies). The engine must read the checkpoint
    /// directory at the same path. none: leave the engine's adapters alone.
    #[arg(
        long,
        value_enum,
        value_name = "ENGINE",
        default_value_t = serve::upstream::AdapterPush::None,
        requires = "upstream"
    )]
    pub upstream_adapters: serve::upstream::AdapterPush,
    /// Sent to the upstream as `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "CLAW_UPSTREAM_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub upstream_api_key: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        // candle sizes its thread pool from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // An empty key (often an unset variable in an env file) must not quietly
    // turn authentication off.
    anyhow::ensure!(
        args.api_key.as_ref().is_none_or(|k| !k.trim().is_empty()),
        "--api-key (or CLAW_API_KEY) is empty: give a key, or leave it out to serve without one"
    );
    let model_path = match &args.upstream {
        Some(_) => args.model.clone().unwrap_or_default(),
        None => resolve_model_path(args.model.as_deref())?,
    };
    let upstream = args.upstream.map(|url| serve::upstream::UpstreamConfig {
        url,
        model: args.upstream_model,
        api_key: args.upstream_api_key,
        adapters: args.upstream_adapters,
    });
    let (dir, store) = match crate::store::Root::parse(&args.dir).context("--dir")? {
        crate::store::Root::Local(dir) => (dir, None),
        crate::store::Root::Remote(remote) => (args.spool, Some(remote)),
    };
    serve::run(ServeConfig {
        model_path,
        weights: args.weights,
        dir,
        store,
        host: args.host,
        port: args.port,
        record: !args.no_record,
        durable_log: !args.no_durable_log,
        api_key: args.api_key,
        default_turn_type: args.default_turn_type,
        max_tokens_limit: args.max_tokens_limit,
        max_body_bytes: args.max_body_bytes,
        max_messages: args.max_messages,
        queue: args.queue,
        parallel: args.parallel,
        session_timeout: Duration::from_millis(
            crate::collect::parse_duration_ms(&args.session_timeout)
                .context("--session-timeout")?
                .max(0) as u64,
        ),
        adapter: args.adapter,
        reload: !args.no_reload,
        reload_poll: Duration::from_millis(args.reload_poll_ms),
        prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
        segment_rows: args.segment_rows,
        segment_age: Duration::from_millis(args.segment_age_ms),
        upstream,
    })
}
