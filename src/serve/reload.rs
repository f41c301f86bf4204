//! Hot reload of LoRA adapters (docs/ARCHITECTURE.md, "Serving runtime" and
//! "Shared directory": checkpoints and LATEST).
//!
//! The serving policy is an `Arc<Policy>` behind a lock: a chat request takes a
//! clone of it when it is admitted and generates with that policy to the end,
//! so a swap never touches a request in flight, and the request's row records
//! the version that produced it. A swap only replaces the `Arc` (a pointer
//! write under the lock); the old policy is dropped when its last request
//! finishes.
//!
//! A background thread follows `DIR/checkpoints/LATEST` (the trainer replaces it
//! atomically after the adapter files are durable). It wakes on filesystem
//! notifications (`notify`: inotify, FSEvents, ...) and also every
//! `--reload-poll-ms`, because notifications do not cross network filesystems
//! and cannot be installed before the directory exists. On each wake-up it
//! compares a fingerprint of `LATEST` and the files it names with the last one it
//! acted on; on a change it loads the adapter, applies it to the base decoder
//! (y = Wx + s·B(Ax) on the quantized weights), runs one probe token through it,
//! and swaps it in. A checkpoint that fails any of that is logged and ignored
//! (the old policy keeps serving) until its files change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::metrics::Metrics;
use crate::adapter::layout::{config_path_for, latest_in, LATEST};
use crate::adapter::Adapter;
use crate::clock::unix_ms;
use crate::model::decoder::{Decoder, KvCache};
use crate::model::Model;

/// Distinct for every adapter ever loaded (0 is the base model): the prefix
/// cache's key, since two loads may carry the same step with different weights.
static NEXT_POLICY_ID: AtomicU64 = AtomicU64::new(1);

/// One servable policy: the base model, or the base model with an adapter on.
pub struct Policy {
    /// The adapter's step (`claw_step` in its config); 0 for the base model.
    pub version: i64,
    /// What computed a KV cache: equal ids, identical decoders.
    pub id: u64,
    /// The adapter file, `None` for the base model.
    pub adapter: Option<PathBuf>,
    /// The base decoder with the adapter's deltas on; `None`: the model's own.
    decoder: Option<Decoder>,
    /// `--upstream-adapters`: the name the upstream engine loaded this adapter
    /// under (`None`: the engine's base model, or an adapter it applies to every
    /// request, as llama.cpp's server does).
    pub engine_name: Option<String>,
    /// Unix milliseconds this policy started serving.
    pub since_ms: i64,
}

impl Policy {
    pub fn base() -> Self {
        Policy {
            version: 0,
            id: 0,
            adapter: None,
            decoder: None,
            engine_name: None,
            since_ms: unix_ms(),
        }
    }

    /// An adapter another engine serves (`claw serve --upstream-adapters`): no
    /// local decoder; `engine_name` is what requests name it by, if anything.
    pub fn remote(version: i64, adapter: Option<PathBuf>, engine_name: Option<String>) -> Self {
        Policy {
            version,
            id: NEXT_POLICY_ID.fetch_add(1, Relaxed),
            adapter,
            decoder: None,
            engine_name,
            since_ms: unix_ms(),
        }
    }

    /// The decoder to generate with.
    pub fn decoder<'a>(&'a self, model: &'a Model) -> &'a Decoder {
        self.decoder.as_ref().unwrap_or(&model.decoder)
    }

    /// The adapter's file name, for logs and `/healthz`.
    pub fn adapter_name(&self) -> Option<String> {
        self.adapter
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// Loads the adapter at `path`, applies it to `model`'s decoder and checks
    /// that one probe token gives finite logits.
    pub fn load(model: &Model, path: &Path) -> Result<Self> {
        let (adapter, file_config) = Adapter::load(path, &model.device)?;
        let version = i64::try_from(file_config.claw_step).with_context(|| {
            format!(
                "{}: claw_step {} is too large",
                path.display(),
                file_config.claw_step
            )
        })?;
        let decoder = adapter
            .apply_for_serving(&model.decoder)
            .with_context(|| format!("{} does not fit {}", path.display(), model.name))?;
        probe(&decoder)
            .with_context(|| format!("{}: the adapted model is broken", path.display()))?;
        Ok(Policy {
            version,
            id: NEXT_POLICY_ID.fetch_add(1, Relaxed),
            adapter: Some(path.to_path_buf()),
            decoder: Some(decoder),
            engine_name: None,
            since_ms: unix_ms(),
        })
    }
}

/// One forward pass over a single token: shapes line up and the logits are finite
/// (an adapter full of NaN or inf would otherwise serve garbage).
fn probe(decoder: &Decoder) -> Result<()> {
    let ids = Tensor::new(&[0u32], decoder.device())?.unsqueeze(0)?;
    let logits: Vec<f32> = decoder
        .forward_last(&ids, &mut KvCache::new())?
        .flatten_all()?
        .to_vec1()?;
    anyhow::ensure!(
        logits.iter().all(|x| x.is_finite()),
        "it produces non-finite logits"
    );
    Ok(())
}

/// The policy serving new requests.
pub struct Policies {
    current: RwLock<Arc<Policy>>,
}

impl Policies {
    pub fn new(policy: Policy) -> Self {
        Policies {
            current: RwLock::new(Arc::new(policy)),
        }
    }

    /// The policy a new request generates with (held to its end).
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves `policy` from now on; returns the one it replaces.
    pub fn swap(&self, policy: Policy) -> Arc<Policy> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, Arc::new(policy))
    }
}

/// What identifies one state of `LATEST` and the files it names: a change in any
/// of them is worth a (re)load; an unchanged broken checkpoint is not retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pointer: String,
    /// The adapter `LATEST` names (`Err`: what is wrong with `LATEST`).
    adapter: Result<PathBuf, String>,
    files: Vec<Option<(u64, Option<SystemTime>)>>,
}

fn file_stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

/// `LATEST`'s content and the size and mtime of `LATEST`, the adapter and its
/// config; `None` when there is no `LATEST`.
pub fn fingerprint(checkpoints: &Path) -> Option<Fingerprint> {
    let pointer_path = checkpoints.join(LATEST);
    let pointer = std::fs::read_to_string(&pointer_path).ok()?;
    let mut files = vec![file_stamp(&pointer_path)];
    let adapter = match latest_in(checkpoints) {
        Ok(Some(adapter)) => {
            files.push(file_stamp(&adapter));
            files.push(file_stamp(&config_path_for(&adapter)));
            Ok(adapter)
        }
        // Removed between the two reads: the next check sees the new state.
        Ok(None) => return None,
        Err(e) => Err(format!("{e:#}")),
    };
    Some(Fingerprint {
        pointer,
        adapter,
        files,
    })
}

impl Fingerprint {
    /// The adapter this state of `LATEST` names (`Err`: what is wrong with it).
    pub fn adapter(&self) -> Result<&Path> {
        self.adapter.as_deref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Loads the adapter this state of `LATEST` names.
    pub fn load(&self, model: &Model) -> Result<Policy> {
        match &self.adapter {
            Ok(path) => Policy::load(model, path),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }
}

/// What the watcher does with each new state of `LATEST`: load it into the
/// local model ([`LocalLoad`]), or push it to an upstream engine
/// (`push.rs`).
pub trait Follower: Send {
    /// `LATEST` names a new checkpoint: serve it. An error keeps the current
    /// policy (the watcher counts and logs it; the same state is not retried).
    fn changed(&mut self, latest: &Fingerprint) -> Result<()>;
    /// Called on every wake-up, changed or not (an engine whose adapter can
    /// change behind claw's back is asked again).
    fn tick(&mut self) {}
}

/// Hot reload into the local model: load, apply, probe, swap.
struct LocalLoad {
    model: Arc<Model>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
}

impl Follower for LocalLoad {
    fn changed(&mut self, latest: &Fingerprint) -> Result<()> {
        let started = Instant::now();
        let policy = latest.load(&self.model)?;
        install(&self.policies, &self.metrics, policy, started.elapsed());
        Ok(())
    }
}

/// The running watcher; dropping it (or [`Reloader::stop`]) ends the thread.
pub struct Reloader {
    tx: mpsc::Sender<Wake>,
    handle: JoinHandle<()>,
}

enum Wake {
    Changed,
    Stop,
}

impl Reloader {
    /// Starts following `checkpoints/LATEST`. `seen` is the state already acted
    /// on at start-up (so it is not loaded twice).
    pub fn start(
        model: Arc<Model>,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        checkpoints: PathBuf,
        poll: Duration,
        seen: Option<Fingerprint>,
    ) -> Result<Self> {
        let follower = LocalLoad {
            model,
            policies: policies.clone(),
            metrics: metrics.clone(),
        };
        Self::follow(
            Box::new(follower),
            policies,
            metrics,
            checkpoints,
            poll,
            seen,
        )
    }

    /// Follows `checkpoints/LATEST` with `follower` acting on each change.
    pub fn follow(
        follower: Box<dyn Follower>,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        checkpoints: PathBuf,
        poll: Duration,
        seen: Option<Fingerprint>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let watch_tx = tx.clone();
        let handle = std::thread::Builder::new()
            .name("claw-reload".into())
            .spawn(move || {
                let mut watch = Watch {
                    follower,
                    policies,
                    metrics,
                    checkpoints,
                    seen,
                    watcher: None,
                    tx: watch_tx,
                };
                watch.run(&rx, poll);
            })
            .context("cannot start the adapter reload thread")?;
        Ok(Reloader { tx, handle })
    }

    pub fn stop(self) {
        let _ = self.tx.send(Wake::Stop);
        if self.handle.join().is_err() {
            crate::warn!("the adapter reload thread panicked");
        }
    }
}

struct Watch {
    follower: Box<dyn Follower>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    checkpoints: PathBuf,
    seen: Option<Fingerprint>,
    watcher: Option<notify::RecommendedWatcher>,
    tx: mpsc::Sender<Wake>,
}

impl Watch {
    fn run(&mut self, rx: &mpsc::Receiver<Wake>, poll: Duration) {
        let mut told_polling = false;
        loop {
            if self.watcher.is_none() {
                match self.install_watcher() {
                    Ok(w) => {
                        crate::debug!(
                            "watching {} for new adapters (and polling every {} ms)",
                            self.checkpoints.display(),
                            poll.as_millis()
                        );
                        self.watcher = Some(w);
                    }
                    Err(e) if !told_polling => {
                        crate::debug!(
                            "no filesystem notifications for {} ({e:#}); polling every {} ms",
                            self.checkpoints.display(),
                            poll.as_millis()
                        );
                        told_polling = true;
                    }
                    Err(_) => {}
                }
            }
            self.check();
            match rx.recv_timeout(poll) {
                Ok(Wake::Changed) => {
                    // A trainer writes several files per checkpoint: let the burst
                    // of events settle into one check.
                    std::thread::sleep(Duration::from_millis(20));
                    loop {
                        match rx.try_recv() {
                            Ok(Wake::Changed) => {}
                            Ok(Wake::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                            Err(mpsc::TryRecvError::Empty) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn install_watcher(&self) -> Result<notify::RecommendedWatcher> {
        use notify::Watcher;
        anyhow::ensure!(
            self.checkpoints.is_dir(),
            "the directory does not exist yet"
        );
        let tx = self.tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    // LATEST is replaced by a rename; its tmp file and the adapter
                    // files change too. Any of them is worth a (cheap) check.
                    Ok(e) => !e.kind.is_access(),
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(Wake::Changed);
                }
            })
            .context("cannot create a filesystem watcher")?;
        watcher
            .watch(&self.checkpoints, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", self.checkpoints.display()))?;
        Ok(watcher)
    }

    fn check(&mut self) {
        self.follower.tick();
        let now = fingerprint(&self.checkpoints);
        if now == self.seen {
            return;
        }
        self.seen = now.clone();
        let Some(now) = now else {
            // LATEST was removed: keep serving what we have.
            crate::debug!(
                "{} is gone; keeping the current policy",
                self.checkpoints.join(LATEST).display()
            );
            return;
        };
        match self.follower.changed(&now) {
            Ok(()) => {}
            Err(e) => {
                self.metrics.adapter_load_errors.fetch_add(1, Relaxed);
                crate::warn!(
                    "ignoring the checkpoint {} names (still serving policy version {}): {e:#}",
                    self.checkpoints.join(LATEST).display(),
                    self.policies.current().version
                );
            }
        }
    }
}

/// Swaps `policy` in, counts and logs it; returns the policy it replaced.
pub fn install(
    policies: &Policies,
    metrics: &Metrics,
    policy: Policy,
    load_time: Duration,
) -> Arc<Policy> {
    let name = policy.adapter_name().unwrap_or_else(|| "base".into());
    let version = policy.version;
    let old = policies.swap(policy);
    metrics.adapter_swaps.fetch_add(1, Relaxed);
    metrics
        .adapter_load_us
        .store(load_time.as_micros() as u64, Relaxed);
    crate::info!(
        "serving policy version {version} ({name}, loaded in {:.0} ms; was version {})",
        load_time.as_secs_f64() * 1000.0,
        old.version
    );
    old
}
