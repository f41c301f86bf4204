//! What `claw serve` is configured with, and what every handler shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::engine;
use super::metrics::Metrics;
use super::record::Recorder;
use super::reload::Policies;
use super::session::{Registry, TurnType};
use crate::model::{Model, WeightFormat};

/// Everything `claw serve` is configured with (the CLI fills it in).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_path: PathBuf,
    pub weights: WeightFormat,
    /// The shared directory; rows go to `DIR/raw/`. With `store`, the local
    /// spool instead (see [`super::store_sync`]).
    pub dir: PathBuf,
    /// `--dir s3://...`: the object store the spool is kept in step with.
    pub store: Option<std::sync::Arc<crate::store::Remote>>,
    pub host: String,
    pub port: u16,
    pub record: bool,
    /// fsync each answered turn to `DIR/wal/` before the reply completes.
    pub durable_log: bool,
    pub api_key: Option<String>,
    pub default_turn_type: TurnType,
    pub max_tokens_limit: usize,
    pub max_body_bytes: usize,
    /// Most messages in one chat request.
    pub max_messages: usize,
    /// Chat requests admitted at once (generating plus waiting).
    pub queue: usize,
    /// Generations run at once.
    pub parallel: usize,
    /// A session idle this long is forgotten (feedback for it then gets 404).
    pub session_timeout: Duration,
    /// An adapter to serve from the start (`--adapter`).
    pub adapter: Option<PathBuf>,
    /// Follow `DIR/checkpoints/LATEST` (off with `--no-reload`).
    pub reload: bool,
    /// How often the reload thread looks at `LATEST` besides notifications.
    pub reload_poll: Duration,
    /// KV bytes the prefix cache may hold (0: no prefix cache).
    pub prefix_cache_bytes: usize,
    /// A recorded segment is closed at this many rows...
    pub segment_rows: usize,
    /// ...or at this age.
    pub segment_age: Duration,
    /// `--upstream URL`: another engine generates; no local model is loaded.
    pub upstream: Option<super::upstream::UpstreamConfig>,
}

impl ServeConfig {
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
}

/// What every handler shares.
pub struct AppState {
    /// The local model (None with `--upstream`).
    pub model: Option<Arc<Model>>,
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub sessions: Registry,
    /// `--queue` permits: held from admission until the generation has finished.
    pub admission: Arc<Semaphore>,
    /// Requests being rendered and tokenised at once (a memory bound).
    pub preparing: Semaphore,
    /// Runs the generations, `--parallel` of them batched together (None with
    /// `--upstream`).
    pub engine: Option<engine::Engine>,
    /// Unix seconds the server started (the model's `created`).
    pub started: u64,
    /// The policy serving new requests (swapped by hot reload).
    pub policies: Arc<Policies>,
    /// `--upstream`: the engine chat requests go to.
    pub upstream: Option<Arc<super::upstream::Upstream>>,
}

impl AppState {
    /// The model name served (`/v1/models`) and recorded.
    pub fn model_name(&self) -> &str {
        match (&self.upstream, &self.model) {
            (Some(u), _) => &u.model,
            (None, Some(m)) => &m.name,
            (None, None) => "",
        }
    }
}
