//! `claw serve`: an OpenAI-compatible HTTP server over one local model that records
//! every turn (docs/ARCHITECTURE.md, "Serving runtime" and "Sessions and next state").
//!
//! - [`error`]: the OpenAI error body ([`error::ApiError`]).
//! - [`fields`]: request fields, read one way for every route: the body under its
//!   size limit, typed getters whose 400s name the field, the session fields
//!   (header or body).
//! - [`request`]: the checked chat request; [`messages`]: its messages and tools.
//! - [`chat`]: `POST /v1/chat/completions`: admission, JSON or SSE responses,
//!   the recorded row.
//! - [`engine`]: the thread that generates, batching the requests in flight.
//! - [`response`]: the JSON body and the SSE chunk stream.
//! - [`routes`]: the router, auth, metrics counting, the small endpoints.
//! - [`session`]: session id / turn type / session end, and the session registry.
//! - [`state`]: the configuration and what every handler shares.
//! - [`record`]: the writer thread that turns rows into segments in `DIR/raw/`.
//! - [`metrics`]: Prometheus text.
//! - [`reload`]: the serving policy (base or base + LoRA adapter) and its hot
//!   reload from `DIR/checkpoints/LATEST`.
//! - [`tools`]: `<tool_call>` parsing.
//! - [`upstream`], [`upstream_chat`]: `--upstream URL`: another engine
//!   generates (the client; the chat route); claw checks, records and keeps
//!   sessions (docs/ARCHITECTURE.md, "Serving through another
//!   engine"); [`push`]: `--upstream-adapters`, checkpoints loaded into it.
//! - [`prefix`]: the prefix cache (KV of recent requests, per policy, LRU under
//!   `--prefix-cache-mb`).
//!
//! Concurrency: `--queue` bounds the chat requests admitted (generating or waiting);
//! one more gets 429 with Retry-After. Admitted requests wait in FIFO order for
//! one of `--parallel` places in the engine's batch (continuous batching: a
//! request joins and leaves between decode steps); text streams back through a
//! channel, and a closed channel (the client went away) cancels the request at
//! the next step, between prefill chunks too. An admitted request holds the
//! policy it was admitted under to its end; adapter swaps affect later requests.

pub mod chat;
pub mod engine;
pub mod error;
pub mod fields;
pub mod messages;
pub mod metrics;
pub mod prefix;
pub mod push;
pub mod record;
pub mod reload;
pub mod request;
pub mod response;
pub mod routes;
pub mod session;
pub mod state;
pub mod store_sync;
pub mod tools;
pub mod upstream;
pub mod upstream_chat;
pub mod wal;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;

use crate::model::Model;
use metrics::Metrics;
use record::Recorder;
use reload::{Policies, Policy, Reloader};
use session::Registry;
pub use state::{AppState, ServeConfig};

/// Requests rendered and tokenised at once: tokenising a 4 MiB body holds
/// hundreds of MiB for a moment.
const PREPARING: usize = 2;

/// Loads the model, binds, serves until SIGINT/SIGTERM, then drains: stops
/// accepting, lets requests in flight finish, writes and closes the open segment.
pub fn run(config: ServeConfig) -> Result<()> {
    anyhow::ensure!(config.queue >= 1, "--queue must be at least 1");
    anyhow::ensure!(config.parallel >= 1, "--parallel must be at least 1");
    anyhow::ensure!(
        config.max_tokens_limit >= 1,
        "--max-tokens-limit must be at least 1"
    );
    anyhow::ensure!(
        config.max_messages >= 1,
        "--max-messages must be at least 1"
    );
    anyhow::ensure!(
        config.segment_rows >= 1,
        "--segment-rows must be at least 1"
    );
    anyhow::ensure!(
        !config.reload_poll.is_zero(),
        "--reload-poll-ms must be at least 1"
    );
    // Over an object store: the spool is synced first, so serve starts on the
    // store's LATEST (and uploads what a previous server left in the spool).
    let sync = match &config.store {
        Some(remote) if config.record || config.reload => Some(store_sync::StoreSync::start(
            remote.clone(),
            &config.dir,
            config.reload_poll,
        )?),
        _ => None,
    };
    if let Some(upstream) = &config.upstream {
        return run_upstream(config.clone(), upstream.clone(), sync);
    }
    let model = Model::load_with(&config.model_path, config.weights)?;
    crate::info!(
        "loaded {} ({} layers, context {})",
        model.name,
        model.config.num_layers,
        model.config.context_length
    );
    let metrics = Arc::new(Metrics::default());
    let checkpoints = config.checkpoints_dir();
    // What LATEST says now; the reload thread acts only on changes after it.
    let seen = reload::fingerprint(&checkpoints);
    let started = Instant::now();
    let initial = match (&config.adapter, &seen) {
        (Some(path), _) => Some(
            Policy::load(&model, path)
                .with_context(|| format!("cannot serve --adapter {}", path.display()))?,
        ),
        (None, Some(latest)) if config.reload => match latest.load(&model) {
            Ok(policy) => Some(policy),
            Err(e) => {
                metrics.adapter_load_errors.fetch_add(1, Relaxed);
                crate::warn!(
                    "ignoring the checkpoint {} names (serving the base model): {e:#}",
                    checkpoints.join(crate::adapter::layout::LATEST).display()
                );
                None
            }
        },
        _ => None,
    };
    let policies = Arc::new(Policies::new(Policy::base()));
    if let Some(policy) = initial {
        reload::install(&policies, &metrics, policy, started.elapsed());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("claw-serve")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(
        config,
        Some(model),
        metrics,
        policies,
        seen,
        None,
        sync,
    ))
}

/// `claw serve --upstream`: no model and no engine thread; with
/// `--upstream-adapters` the checkpoints `LATEST` names are pushed to the
/// engine (`push.rs`); the rest of the server as usual.
fn run_upstream(
    config: ServeConfig,
    upstream: upstream::UpstreamConfig,
    sync: Option<store_sync::StoreSync>,
) -> Result<()> {
    let engine = Arc::new(upstream::Upstream::connect(&upstream)?);
    crate::info!(
        "generating with the upstream engine {} (model {}); no local model loaded",
        engine.base(),
        engine.model
    );
    if config.adapter.is_some() {
        crate::warn!(
            "--adapter is ignored with --upstream (--upstream-adapters pushes what \
             DIR/checkpoints/LATEST names)"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let policies = Arc::new(Policies::new(Policy::base()));
    let push = upstream.adapters != upstream::AdapterPush::None && config.reload;
    let reloader = if push {
        let checkpoints = config.checkpoints_dir();
        crate::info!(
            "pushing the checkpoints {} names to the upstream ({:?})",
            checkpoints.join(crate::adapter::layout::LATEST).display(),
            upstream.adapters
        );
        let model = Some(config.model_path.clone()).filter(|p| p.is_file());
        let pusher = push::Pusher::new(
            engine.clone(),
            policies.clone(),
            metrics.clone(),
            &checkpoints,
            model,
        );
        Some(Reloader::follow(
            Box::new(pusher),
            policies.clone(),
            metrics.clone(),
            checkpoints,
            config.reload_poll,
            None,
        )?)
    } else {
        None
    };
    let mut config = config;
    config.reload = false;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("claw-serve")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(
        config,
        None,
        metrics,
        policies,
        None,
        Some(engine),
        sync,
    ));
    if let Some(reloader) = reloader {
        reloader.stop();
    }
    result
}

async fn serve(
    config: ServeConfig,
    model: Option<Model>,
    metrics: Arc<Metrics>,
    policies: Arc<Policies>,
    seen: Option<reload::Fingerprint>,
    upstream: Option<Arc<upstream::Upstream>>,
    sync: Option<store_sync::StoreSync>,
) -> Result<()> {
    let raw_dir = config.dir.join("raw");
    let (recorder, writer_thread) = if config.record {
        let writer_id = format!("serve{}", std::process::id());
        let (r, t) = Recorder::start(
            raw_dir.clone(),
            config.durable_log.then(|| wal::wal_dir(&config.dir)),
            &writer_id,
            config.segment_rows,
            config.segment_age,
            metrics.clone(),
        )?;
        (r, Some(t))
    } else {
        (Recorder::disabled(metrics.clone()), None)
    };
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let model = model.map(Arc::new);
    let reloader = if let (Some(model), true) = (&model, config.reload) {
        crate::info!(
            "following {} for new adapters (checked on change and every {} ms)",
            config
                .checkpoints_dir()
                .join(crate::adapter::layout::LATEST)
                .display(),
            config.reload_poll.as_millis()
        );
        Some(Reloader::start(
            model.clone(),
            policies.clone(),
            metrics.clone(),
            config.checkpoints_dir(),
            config.reload_poll,
            seen,
        )?)
    } else {
        None
    };
    let engine = match &model {
        Some(model) => Some(engine::Engine::start(
            model.clone(),
            policies.clone(),
            prefix::PrefixCache::new(config.prefix_cache_bytes),
            metrics.clone(),
            config.parallel,
        )?),
        None => None,
    };
    let state = Arc::new(AppState {
        model,
        metrics: metrics.clone(),
        recorder,
        sessions: Registry::new(config.session_timeout),
        admission: Arc::new(Semaphore::new(config.queue)),
        preparing: Semaphore::new(PREPARING),
        engine,
        started: (crate::clock::unix_ms() / 1000) as u64,
        policies,
        config,
        upstream,
    });
    if state.config.prefix_cache_bytes > 0 {
        crate::debug!(
            "prefix cache: up to {} MiB of KV",
            state.config.prefix_cache_bytes >> 20
        );
    }
    if let (true, Some(remote)) = (state.config.record, &state.config.store) {
        crate::info!(
            "recording every turn to {} (spooled in {})",
            remote.show("raw"),
            raw_dir.display()
        );
    } else if state.config.record {
        crate::info!("recording every turn to {}", raw_dir.display());
    } else {
        crate::info!("not recording (--no-record)");
    }
    if state.config.api_key.is_none() && !addr.ip().is_loopback() {
        crate::warn!("listening on {addr} without --api-key: anyone who can reach it can use it");
    }
    // Idle sessions are forgotten on a timer, not only when a request comes.
    let sessions = Arc::downgrade(&state);
    tokio::spawn(async move {
        let mut every = match sessions.upgrade() {
            Some(state) => tokio::time::interval(state.sessions.prune_every()),
            None => return,
        };
        loop {
            every.tick().await;
            match sessions.upgrade() {
                Some(state) => state.sessions.prune(),
                None => return,
            }
        }
    });
    let stop = shutdown_signal()?;
    // Tests and scripts wait for this line (with --port 0 it is the only way to
    // learn the port).
    crate::info!("listening on http://{addr} (OpenAI base_url: http://{addr}/v1)");

    let app = routes::router(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .context("the HTTP server failed")?;

    if let Some(reloader) = reloader {
        reloader.stop();
    }
    let queue = u32::try_from(state.config.queue).unwrap_or(u32::MAX);
    let busy = state.config.queue - state.admission.available_permits();
    if busy > 0 {
        crate::info!("waiting for {busy} request(s) in flight");
    }
    // Every admitted request holds a permit until its row is queued.
    let _all = state.admission.acquire_many(queue).await;
    if let Some(thread) = writer_thread {
        tokio::task::spawn_blocking(move || thread.shutdown())
            .await
            .context("the recorder thread failed")?;
    }
    if let Some(sync) = sync {
        // The segment the recorder just closed goes up too.
        tokio::task::spawn_blocking(move || sync.stop())
            .await
            .context("the store sync thread failed")?;
    }
    crate::info!(
        "stopped: {} row(s) recorded in {} segment(s)",
        metrics.rows_recorded.load(Relaxed),
        metrics.segments_written.load(Relaxed)
    );
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when this
/// is called (before the "listening" line), so an early signal is never fatal.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        crate::info!("stopping: no new connections; finishing requests in flight");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        crate::info!("stopping: no new connections; finishing requests in flight");
    })
}
