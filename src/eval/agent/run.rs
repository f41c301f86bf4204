//! Driving one agent benchmark run: start `claw up` with the method's stages (or
//! use a running one), play the held-out episodes, the training episodes in rounds
//! paced by training, the held-out episodes again, stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::episode::{play, Endpoint, EpisodeConfig, Outcome, Reply, ToolRunner, TurnRequest};
use super::metrics::{Episode, HeldOut, RunResult, Signals};
use super::tasks::{self, Task};
use crate::eval::live::{policy_version, run_dir, wait_for_policy, Method, Up};
use crate::train::RewardBaseline;

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub model: Option<PathBuf>,
    pub episodes: usize,
    /// Episodes per round; also the training batch size (in turns).
    pub batch: usize,
    pub heldout: usize,
    pub episode: EpisodeConfig,
    pub lr: f64,
    pub beta_kl: f64,
    pub reward_baseline: RewardBaseline,
    /// Top-K distillation (opd, combined): K ids per token, 0 = off.
    pub topk: usize,
    pub seed: u64,
    /// Longest wait for a round's training step.
    pub round_timeout: Duration,
    /// How long after its turn is resolved a rating still counts (collect's
    /// `--feedback-grace`): an episode's outcome reaches its first turn only
    /// when it ends, so this must cover an episode.
    pub feedback_grace: Duration,
    /// Where the run's `claw up` directory goes (kept); default a temporary one.
    pub data_dir: Option<PathBuf>,
    /// Drive this running `claw up` (base URL) instead of starting one.
    pub url: Option<String>,
    pub retention: Option<crate::eval::retention::Check>,
}

impl RunConfig {
    fn settings(&self, method: Method) -> BTreeMap<String, Value> {
        let mut s = BTreeMap::new();
        s.insert("tool_rounds".into(), json!(self.episode.tool_rounds));
        // f32 -> f64 would print 0.7 as 0.699999988.
        let temperature: f64 = self
            .episode
            .temperature
            .to_string()
            .parse()
            .unwrap_or_default();
        s.insert("temperature".into(), json!(temperature));
        s.insert("max_tokens".into(), json!(self.episode.max_tokens));
        if method != Method::Off {
            s.insert("batch".into(), json!(self.batch));
            s.insert("lr".into(), json!(self.lr));
            s.insert("beta_kl".into(), json!(self.beta_kl));
            s.insert("reward_baseline".into(), json!(self.reward_baseline.name()));
        }
        if matches!(method, Method::Opd | Method::Combined) && self.topk > 0 {
            s.insert("topk".into(), json!(self.topk));
        }
        s
    }
}

/// The `claw up` options that make `method` learn from the environment's signals.
pub fn up_args(method: Method, cfg: &RunConfig) -> Vec<String> {
    let (batch, lr, beta_kl) = (cfg.batch, cfg.lr, cfg.beta_kl);
    let baseline = cfg.reward_baseline.name();
    let train = |extra: &str| {
        format!(
            "train=--batch-size {batch} --partial-after 20s --lr {lr} --beta-kl {beta_kl} \
             --reward-baseline {baseline} --keep 3 {extra}"
        )
    };
    let distill = match cfg.topk {
        0 => "distill-hints=--hint-source feedback".to_string(),
        k => format!("distill-hints=--hint-source feedback --topk {k}"),
    };
    let mut stages = match method {
        Method::Off => {
            return vec![
                "--without".into(),
                "collect,judge,distill-hints,train".into(),
            ]
        }
        Method::Rl => vec![train("--w-opd 0")],
        Method::Opd => vec![distill, train("--w-rl 0")],
        Method::Combined => vec![distill, train("")],
    };
    // A failed program is scored by the env rules on its tool message first; the
    // answer's verdict (feedback) scores every other turn.
    stages.push("judge=--sources env,feedback".into());
    stages.push(format!(
        "collect=--feedback-grace {}ms --session-timeout 10m",
        cfg.feedback_grace.as_millis()
    ));
    let mut args: Vec<String> = stages
        .into_iter()
        .flat_map(|s| ["--with".to_string(), s])
        .collect();
    if method == Method::Rl {
        args.extend(["--without".into(), "distill-hints".into()]);
    }
    args
}

/// serve (its base URL, ending in `/v1`), as the episodes' endpoint.
pub struct Serve {
    pub base: String,
}

impl Endpoint for Serve {
    fn chat(&self, turn: &TurnRequest<'_>) -> Result<Reply> {
        let body = json!({
            "messages": turn.messages,
            "tools": turn.tools,
            "temperature": turn.temperature,
            "max_tokens": turn.max_tokens,
            "seed": turn.seed,
        });
        let reply: Value = ureq::post(&format!("{}/chat/completions", self.base))
            .timeout(Duration::from_secs(600))
            .set("X-Session-Id", turn.session)
            .set("X-Turn-Type", if turn.side { "side" } else { "main" })
            .send_json(body)
            .with_context(|| format!("chat request of session {}", turn.session))?
            .into_json()
            .context("reading a chat reply")?;
        let message = &reply["choices"][0]["message"];
        Ok(Reply {
            id: reply["id"].as_str().unwrap_or_default().to_string(),
            content: message["content"].as_str().unwrap_or_default().to_string(),
            tool_calls: message["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        })
    }

    fn feedback(
        &self,
        session: &str,
        response_id: &str,
        rating: i8,
        text: Option<&str>,
        done: bool,
    ) -> Result<()> {
        ureq::post(&format!("{}/feedback", self.base))
            .timeout(Duration::from_secs(60))
            .send_json(json!({
                "session_id": session, "response_id": response_id,
                "rating": rating, "text": text, "session_done": done,
            }))
            .with_context(|| format!("feedback for session {session}"))?;
        Ok(())
    }
}

/// Plays the held-out `tasks` greedily as side turns.
fn heldout(
    serve: &Serve,
    tools: &dyn ToolRunner,
    tasks: &[Task],
    cfg: &RunConfig,
    tag: &str,
) -> Result<HeldOut> {
    let greedy = EpisodeConfig {
        temperature: 0.0,
        ..cfg.episode.clone()
    };
    let mut out = HeldOut::default();
    for (i, task) in tasks.iter().enumerate() {
        let session = format!("heldout-{tag}-{i}");
        let log = play(serve, tools, task, &session, true, &greedy, 0)?;
        out.add(task.kind, &log);
    }
    Ok(out)
}

/// One run with `method`. `progress` is told about each training episode.
pub fn run(
    method: Method,
    cfg: &RunConfig,
    tools: &dyn ToolRunner,
    progress: &dyn Fn(&Episode),
) -> Result<RunResult> {
    let started = Instant::now();
    let mut scratch = None;
    let mut dir = None;
    let (up, base) = match &cfg.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let name = format!("agent-{}-seed{}", method.name(), cfg.seed);
            let (d, tmp) = run_dir(cfg.data_dir.as_deref(), "agent", &name)?;
            scratch = tmp;
            let (up, base) = Up::start(&d, cfg.model.as_deref(), &up_args(method, cfg))?;
            dir = Some(d);
            (Some(up), base)
        }
    };
    let serve = Serve { base };
    let held = tasks::heldout(cfg.heldout);
    let train = tasks::training(cfg.seed, cfg.episodes, &held);
    let tag = format!("agent-{}-{}", method.name(), cfg.seed);

    let heldout_before = heldout(&serve, tools, &held, cfg, &format!("{tag}-before"))?;
    crate::info!(
        "agent {tag}: held-out before {}/{}",
        heldout_before.correct,
        heldout_before.episodes
    );
    let mut episodes = Vec::with_capacity(cfg.episodes);
    let mut round_version = policy_version(&serve.base)?;
    let mut round_turns = 0;
    for (i, task) in train.iter().enumerate() {
        let session = format!("{tag}-{}", i + 1);
        let version = policy_version(&serve.base)?;
        let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let log = play(&serve, tools, task, &session, false, &cfg.episode, seed)?;
        round_turns += log.turns.len();
        let episode = Episode::new(i + 1, task, &log, version, started.elapsed().as_secs_f64());
        progress(&episode);
        episodes.push(episode);
        // Play at the pace the system learns: after each round, wait until the
        // steps its turns feed have been served.
        let round_over = (i + 1) % cfg.batch == 0 || i + 1 == train.len();
        if round_over {
            let round = &episodes[i + 1 - (i % cfg.batch + 1)..];
            crate::info!(
                "agent {tag}: episode {}/{}: this round solved {}/{}, {} with a valid call, policy v{version}",
                i + 1,
                train.len(),
                round.iter().filter(|e| e.outcome == Outcome::Correct).count(),
                round.len(),
                round.iter().filter(|e| e.valid_calls > 0).count(),
            );
        }
        if method != Method::Off && cfg.url.is_none() && round_over {
            let steps = round_turns.div_ceil(cfg.batch).max(1) as u64;
            let timeout = cfg.round_timeout * steps as u32;
            if !wait_for_policy(&serve.base, round_version + steps, timeout)? {
                crate::warn!(
                    "agent {tag}: {steps} training steps not served within {timeout:?} after episode {}",
                    i + 1
                );
            }
            round_version = policy_version(&serve.base)?;
            round_turns = 0;
        }
    }
    let final_policy_version = policy_version(&serve.base)?;
    let heldout_after = heldout(&serve, tools, &held, cfg, &format!("{tag}-after"))?;
    drop(up); // stops claw up before its directory is read or removed
    let (signals, retention) = match &dir {
        Some(d) if method != Method::Off => {
            let signals = Signals::read(d)
                .map_err(|e| crate::warn!("agent {tag}: signals not counted: {e:#}"))
                .ok();
            let retention = cfg.retention.as_ref().and_then(|check| {
                crate::eval::live::retention_of(
                    check,
                    cfg.model.as_deref(),
                    &d.join("checkpoints"),
                    &format!("agent {tag}"),
                )
            });
            (signals, retention)
        }
        _ => (None, None),
    };
    if let Some(d) = scratch {
        let _ = std::fs::remove_dir_all(&d);
    }
    let model = cfg
        .model
        .as_ref()
        .and_then(|m| m.file_stem())
        .map_or("the default model".into(), |s| {
            s.to_string_lossy().into_owned()
        });
    Ok(RunResult {
        method: match cfg.url {
            Some(_) => "external".into(),
            None => method.name().into(),
        },
        seed: cfg.seed,
        model,
        episodes,
        heldout_before,
        heldout_after,
        final_policy_version,
        seconds: started.elapsed().as_secs_f64(),
        settings: cfg.settings(method),
        signals,
        retention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        RunConfig {
            model: None,
            episodes: 4,
            batch: 2,
            heldout: 1,
            episode: EpisodeConfig {
                tool_rounds: 2,
                temperature: 0.7,
                max_tokens: 32,
            },
            lr: 2e-4,
            beta_kl: 0.1,
            reward_baseline: RewardBaseline::BatchMean,
            topk: 0,
            seed: 0,
            round_timeout: Duration::from_secs(1),
            feedback_grace: Duration::from_secs(90),
            data_dir: None,
            url: None,
            retention: None,
        }
    }

    fn stage(args: &[String], stage: &str) -> Option<String> {
        let prefix = format!("{stage}=");
        args.windows(2)
            .find(|w| w[0] == "--with" && w[1].starts_with(&prefix))
            .map(|w| w[1][prefix.len()..].to_string())
    }

    #[test]
    fn methods_judge_with_env_first_and_cover_an_episode_with_the_grace() {
        for m in [Method::Rl, Method::Opd, Method::Combined] {
            let args = up_args(m, &config());
            assert_eq!(
                stage(&args, "judge").as_deref(),
                Some("--sources env,feedback")
            );
            let collect = stage(&args, "collect").unwrap();
            assert!(collect.contains("--feedback-grace 90000ms"), "{collect}");
            assert_eq!(stage(&args, "distill-hints").is_some(), m != Method::Rl);
        }
        assert!(stage(&up_args(Method::Rl, &config()), "train")
            .unwrap()
            .contains("--w-opd 0"));
        assert!(stage(&up_args(Method::Opd, &config()), "train")
            .unwrap()
            .contains("--w-rl 0"));
        let off = up_args(Method::Off, &config());
        assert_eq!(off, ["--without", "collect,judge,distill-hints,train"]);
    }
}
