//! `claw serve --upstream URL --upstream-adapters ENGINE` (the engine's client is
//! [`super::upstream`]): each new checkpoint
//! `DIR/checkpoints/LATEST` names is loaded into the upstream engine, and the
//! rows record the adapter the engine generated with (docs/ARCHITECTURE.md,
//! "Serving through another engine").
//!
//! The order, for engines that load adapters at run time (vLLM, SGLang):
//!
//! 1. the checkpoint is laid out as a PEFT directory the engine can read
//!    (`DIR/checkpoints/peft/adapter-NNNNNN/adapter_config.json` and
//!    `adapter_model.safetensors`, a hard link to claw's file when possible);
//! 2. the engine is asked to load it under a new name (`claw-NNNNNN-<ms>`:
//!    unique, so a name is never reused for other weights);
//! 3. only after the engine answered success does the serving policy switch:
//!    requests admitted from then on name the new adapter and record its step;
//! 4. once the requests admitted under the old adapter have finished, the old
//!    one is unloaded (and its PEFT directory removed).
//!
//! A failed load keeps the old adapter serving and is counted
//! (`claw_adapter_load_errors_total`) and logged; a failed unload is logged.
//!
//! The engines' contracts, from their sources:
//!
//! - vLLM (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `--enable-lora`;
//!   vllm/entrypoints/serve/lora/api_router.py and
//!   vllm/entrypoints/openai/serving_models.py): `POST /v1/load_lora_adapter`
//!   `{"lora_name", "lora_path"}` answers 200 with the plain text
//!   `Success: LoRA adapter '<name>' added successfully.`, or an error JSON with
//!   400/404; `POST /v1/unload_lora_adapter` `{"lora_name"}` likewise. A request
//!   uses the adapter by naming it as its `model`.
//! - SGLang (`--enable-lora`; python/sglang/srt/entrypoints/http_server.py,
//!   `LoadLoRAAdapterReqInput` / `LoRAUpdateOutput` in managers/io_struct.py):
//!   `POST /load_lora_adapter` `{"lora_name", "lora_path"}` answers
//!   `{"success": bool, "error_message", "loaded_adapters"}`, 200 on success and
//!   400 otherwise; `POST /unload_lora_adapter` `{"lora_name"}` likewise. A chat
//!   request names the adapter in its `lora_path` field (`model` stays the
//!   base model's).
//! - llama.cpp's server (tools/server in the vendored llama.cpp): adapters are
//!   GGUF files given with `--lora FILE` at start; at run time it can only list
//!   them (`GET /lora-adapters`: `[{"id", "path", "scale", ...}]`) and change
//!   their scales (`POST /lora-adapters`). It cannot load a new file. So claw
//!   writes `adapter-NNNNNN.gguf` (from `--model`, the GGUF the engine serves,
//!   unless `claw train --gguf` already did), logs the command to restart the
//!   engine with it, and records the version the engine actually applies: the
//!   claw adapter with a non-zero scale in `GET /lora-adapters`, asked on every
//!   `--reload-poll-ms` tick.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::http::StatusCode;
use serde_json::{json, Map, Value as Json};

use super::metrics::Metrics;
use super::reload::{install, Fingerprint, Follower, Policies, Policy};
use super::upstream::{AdapterPush, Upstream, UpstreamError, CALL_TIMEOUT};
use crate::adapter::gguf::{export_file, gguf_path_for, gguf_step};
use crate::adapter::layout::{config_path_for, parse_adapter_step};
use crate::adapter::AdapterFileConfig;

/// One adapter llama.cpp's server holds (`GET /lora-adapters`).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLora {
    pub id: i64,
    pub path: String,
    pub scale: f64,
}

/// Asks the engine to load the PEFT directory `path` as `name`; Ok only when
/// the engine said it succeeded.
pub fn load_adapter(upstream: &Upstream, name: &str, path: &Path) -> Result<(), UpstreamError> {
    let body = json!({"lora_name": name, "lora_path": path.to_string_lossy()});
    adapter_call(upstream, load_path(upstream.adapters), &body)
}

/// Asks the engine to drop the adapter `name`.
pub fn unload_adapter(upstream: &Upstream, name: &str) -> Result<(), UpstreamError> {
    adapter_call(
        upstream,
        unload_path(upstream.adapters),
        &json!({"lora_name": name}),
    )
}

fn load_path(kind: AdapterPush) -> &'static str {
    match kind {
        AdapterPush::Vllm => "/v1/load_lora_adapter",
        _ => "/load_lora_adapter",
    }
}

fn unload_path(kind: AdapterPush) -> &'static str {
    match kind {
        AdapterPush::Vllm => "/v1/unload_lora_adapter",
        _ => "/unload_lora_adapter",
    }
}

/// A load or unload call: any 2xx from vLLM (its success body is plain text);
/// for SGLang also `"success": true` in the JSON answer.
fn adapter_call(upstream: &Upstream, path: &str, body: &Json) -> Result<(), UpstreamError> {
    let text = upstream.call_text("POST", path, Some(body), CALL_TIMEOUT)?;
    if upstream.adapters == AdapterPush::Sglang {
        let answer: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        if answer.get("success").and_then(Json::as_bool) != Some(true) {
            let why = answer
                .get("error_message")
                .and_then(Json::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(500).collect());
            return Err(UpstreamError {
                status: StatusCode::BAD_GATEWAY,
                code: "upstream_error",
                message: format!(
                    "the upstream {}{path} did not succeed: {why}",
                    upstream.base()
                ),
            });
        }
    }
    Ok(())
}

/// llama.cpp's `GET /lora-adapters`.
pub fn lora_adapters(upstream: &Upstream) -> Result<Vec<EngineLora>, UpstreamError> {
    let path = "/lora-adapters";
    let bad = |m: String| UpstreamError {
        status: StatusCode::BAD_GATEWAY,
        code: "upstream_bad_response",
        message: format!("the upstream {}{path}: {m}", upstream.base()),
    };
    let text = upstream.call_text("GET", path, None, Duration::from_secs(10))?;
    let list: Json = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let entries = list.as_array().ok_or_else(|| bad("not a list".into()))?;
    Ok(entries
        .iter()
        .map(|e| EngineLora {
            id: e.get("id").and_then(Json::as_i64).unwrap_or(-1),
            path: e
                .get("path")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            scale: e.get("scale").and_then(Json::as_f64).unwrap_or(0.0),
        })
        .collect())
}

/// The checkpoint step an adapter's config records (`claw_step`), else its
/// file name's.
fn checkpoint_step(adapter: &Path) -> Result<i64> {
    let config_path = config_path_for(adapter);
    let step = match std::fs::read_to_string(&config_path) {
        Ok(text) => {
            let config: AdapterFileConfig = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a LoRA adapter config", config_path.display()))?;
            config.claw_step
        }
        Err(_) => adapter
            .file_name()
            .and_then(|n| parse_adapter_step(&n.to_string_lossy()))
            .with_context(|| format!("{}: no adapter config", adapter.display()))?,
    };
    i64::try_from(step).context("the checkpoint's step is too large")
}

/// Lays `adapter` out as the PEFT directory vLLM and SGLang load:
/// `root/<stem>/adapter_model.safetensors` (a hard link, else a copy) and
/// `adapter_config.json` (PEFT's keys only).
pub fn peft_dir(adapter: &Path, root: &Path) -> Result<PathBuf> {
    let stem = adapter
        .file_stem()
        .context("the adapter has no file name")?
        .to_string_lossy()
        .into_owned();
    let dir = root.join(stem);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = config_path_for(adapter);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: Map<String, Json> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", config_path.display()))?;
    config.retain(|k, _| !k.starts_with("claw_"));
    crate::fsutil::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let weights = dir.join("adapter_model.safetensors");
    let _ = std::fs::remove_file(&weights);
    if std::fs::hard_link(adapter, &weights).is_err() {
        std::fs::copy(adapter, &weights).with_context(|| {
            format!("cannot copy {} to {}", adapter.display(), weights.display())
        })?;
    }
    Ok(dir)
}

/// The [`Follower`] that pushes checkpoints to the upstream engine.
pub struct Pusher {
    upstream: Arc<Upstream>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    /// Where PEFT directories are laid out (`DIR/checkpoints/peft`).
    peft_root: PathBuf,
    /// The base GGUF (`--model`), to write llama.cpp's GGUF adapters.
    model: Option<PathBuf>,
    /// The checkpoint llama.cpp was last told to restart with.
    told: Option<PathBuf>,
}

impl Pusher {
    pub fn new(
        upstream: Arc<Upstream>,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        checkpoints: &Path,
        model: Option<PathBuf>,
    ) -> Self {
        Pusher {
            upstream,
            policies,
            metrics,
            peft_root: checkpoints.join("peft"),
            model,
            told: None,
        }
    }

    /// vLLM / SGLang: load, switch, drain the old adapter's requests, unload.
    fn push(&mut self, adapter: &Path) -> Result<()> {
        let started = Instant::now();
        let step = checkpoint_step(adapter)?;
        let dir = peft_dir(adapter, &self.peft_root)?;
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let name = format!("claw-{step:06}-{}", crate::clock::unix_ms());
        if let Err(e) = load_adapter(&self.upstream, &name, &dir) {
            if self.policies.current().adapter.as_deref() != Some(adapter) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            anyhow::bail!("the engine did not load {}: {}", dir.display(), e.message);
        }
        let policy = Policy::remote(step, Some(adapter.to_path_buf()), Some(name));
        let old = install(&self.policies, &self.metrics, policy, started.elapsed());
        self.retire(old, adapter);
        Ok(())
    }

    /// Waits for the requests admitted under `old` to finish, then unloads it.
    fn retire(&self, old: Arc<Policy>, current: &Path) {
        let Some(name) = old.engine_name.clone() else {
            return;
        };
        let deadline = Instant::now() + CALL_TIMEOUT;
        // Each request holds a clone of its policy until its row is recorded.
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        match unload_adapter(&self.upstream, &name) {
            Ok(()) => crate::debug!("unloaded {name} from the upstream"),
            Err(e) => crate::warn!("cannot unload the old adapter {name}: {}", e.message),
        }
        if let Some(stem) = old.adapter.as_ref().and_then(|a| a.file_stem()) {
            if Some(stem) != current.file_stem() {
                let _ = std::fs::remove_dir_all(self.peft_root.join(stem));
            }
        }
    }

    /// llama.cpp: make sure the GGUF exists, tell the user how to serve it, and
    /// record whatever the engine applies.
    fn offer_gguf(&mut self, adapter: &Path) -> Result<()> {
        let gguf = gguf_path_for(adapter);
        if !gguf.is_file() {
            let model = self.model.as_ref().with_context(|| {
                format!(
                    "{} has no GGUF beside it: train with `claw train --gguf`, or give \
                     claw serve --model (the GGUF llama-server serves) to write it",
                    adapter.display()
                )
            })?;
            export_file(adapter, model, &gguf)?;
            crate::info!("wrote {}", gguf.display());
        }
        self.refresh();
        let serving = self.policies.current();
        let same = |a: &Path| {
            std::fs::canonicalize(a)
                .ok()
                .is_some_and(|a| std::fs::canonicalize(&gguf).ok() == Some(a))
        };
        if !serving.adapter.as_deref().is_some_and(same) && self.told.as_ref() != Some(&gguf) {
            crate::warn!(
                "llama-server loads LoRA adapters only when it starts: restart it with \
                 `--lora {}` to serve this checkpoint; rows record the version it applies \
                 (now {})",
                std::path::absolute(&gguf)
                    .unwrap_or_else(|_| gguf.clone())
                    .display(),
                serving.version
            );
            self.told = Some(gguf);
        }
        Ok(())
    }

    /// llama.cpp: the policy the engine applies now, from `GET /lora-adapters`.
    fn refresh(&mut self) {
        let list = match lora_adapters(&self.upstream) {
            Ok(list) => list,
            Err(e) => {
                crate::debug!("cannot ask the upstream for its adapters: {}", e.message);
                return;
            }
        };
        let (version, path, note) = applied(&list);
        let current = self.policies.current();
        if current.version != version || current.adapter != path {
            if let Some(note) = note {
                crate::warn!("{note}");
            }
            let policy = Policy::remote(version, path, None);
            install(&self.policies, &self.metrics, policy, Duration::ZERO);
        }
    }
}

/// The claw adapter llama.cpp applies to every request: the one entry with a
/// non-zero scale (its step from `claw.step`, else its name); none: the base
/// model (0). Adapters that are not claw's, or several at once, count as the
/// base model's version, with a note saying so: claw cannot name them.
pub fn applied(list: &[EngineLora]) -> (i64, Option<PathBuf>, Option<String>) {
    let active: Vec<&EngineLora> = list.iter().filter(|l| l.scale != 0.0).collect();
    match active.as_slice() {
        [] => (0, None, None),
        [one] => {
            let path = PathBuf::from(&one.path);
            let step = gguf_step(&path).or_else(|| {
                let name = path.file_name()?.to_string_lossy().into_owned();
                name.strip_prefix("adapter-")?
                    .strip_suffix(".gguf")?
                    .parse()
                    .ok()
            });
            match step.and_then(|s| i64::try_from(s).ok()) {
                Some(step) => (step, Some(path), None),
                None => {
                    let note = format!(
                        "the upstream applies {}, which is not a claw checkpoint: recording \
                         policy version 0",
                        one.path
                    );
                    (0, Some(path), Some(note))
                }
            }
        }
        many => {
            let note = format!(
                "the upstream applies {} adapters at once: recording policy version 0",
                many.len()
            );
            (0, None, Some(note))
        }
    }
}

impl Follower for Pusher {
    fn changed(&mut self, latest: &Fingerprint) -> Result<()> {
        let adapter = latest.adapter()?.to_path_buf();
        match self.upstream.adapters {
            AdapterPush::None => Ok(()),
            AdapterPush::Vllm | AdapterPush::Sglang => self.push(&adapter),
            AdapterPush::LlamaCpp => self.offer_gguf(&adapter),
        }
    }

    fn tick(&mut self) {
        if self.upstream.adapters == AdapterPush::LlamaCpp {
            self.refresh();
        }
    }
}
