//! Driving one agent benchmark run: start `claw up` with the method's stages (or
//! use a running one), play the held-out episodes, the training episodes in rounds
//! paced by training, the held-out episodes again, stop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::episode::{play, Endpoint, EpisodeConfig, Outcome, Reply, ToolRunner, TurnRequest};
use super::metrics::{Episode, HeldOut, RunResult, Signals};
use super::tasks::{self, Task};
use crate::distill::HintPlacement;
use crate::eval::live::{policy_version, run_dir, wait_for_policy, Method, Study, Up};

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub study: Study,
    pub episodes: usize,
    /// Most replies with tool calls in an episode.
    pub tool_rounds: usize,
    /// How long after its turn is resolved a rating still counts (collect's
    /// `--feedback-grace`): an episode's outcome reaches its first turn only
    /// when it ends, so this must cover an episode.
    pub feedback_grace: Duration,
}

/// Where the teacher reads a correction unless told otherwise: last, after the
/// tool's output (a hint on the task, above the call and its output, barely
/// moves a small teacher).
const HINT_AT: HintPlacement = HintPlacement::End;

impl RunConfig {
    fn hint_at(&self) -> HintPlacement {
        self.study.hint_at_or(HINT_AT)
    }

    fn settings(&self, method: Method) -> BTreeMap<String, Value> {
        let mut s = self.study.settings(method, self.hint_at());
        s.insert("tool_rounds".into(), json!(self.tool_rounds));
        s
    }

    /// How the training episodes are played.
    pub fn episode(&self) -> EpisodeConfig {
        EpisodeConfig {
            tool_rounds: self.tool_rounds,
            temperature: self.study.temperature,
            max_tokens: self.study.max_tokens,
        }
    }
}

/// The `claw up` options that make `method` learn from the environment's signals:
/// a failed program is scored by the env rules on its tool message first; the
/// answer's verdict (feedback) scores every other turn.
pub fn up_args(method: Method, cfg: &RunConfig) -> Vec<String> {
    let collect = format!(
        "--feedback-grace {}ms --session-timeout 10m",
        cfg.feedback_grace.as_millis()
    );
    cfg.study
        .up_args(method, cfg.hint_at(), "--sources env,feedback", &collect)
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
        crate::eval::live::feedback(&self.base, session, response_id, rating, text, done)
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
        ..cfg.episode()
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
    // Declared before `up`, so that on an early return `claw up` stops first.
    let mut scratch = None;
    let mut dir = None;
    let (up, base) = match &cfg.study.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let name = format!("agent-{}-seed{}", method.name(), cfg.study.seed);
            let (d, tmp) = run_dir(cfg.study.data_dir.as_deref(), "agent", &name)?;
            scratch = tmp;
            let (up, base) = Up::start(&d, cfg.study.model.as_deref(), &up_args(method, cfg))?;
            dir = Some(d);
            (Some(up), base)
        }
    };
    let serve = Serve { base };
    let held = tasks::heldout(cfg.study.heldout);
    let train = tasks::training(cfg.study.seed, cfg.episodes, &held);
    let tag = format!("agent-{}-{}", method.name(), cfg.study.seed);

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
        if crate::eval::live::stopping(&format!("agent {tag}"), i, train.len()) {
            break;
        }
        let session = format!("{tag}-{}", i + 1);
        let version = policy_version(&serve.base)?;
        let seed = cfg
            .study
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(i as u64);
        let log = play(&serve, tools, task, &session, false, &cfg.episode(), seed)?;
        round_turns += log.turns.len();
        let episode = Episode::new(i + 1, task, &log, version, started.elapsed().as_secs_f64());
        progress(&episode);
        episodes.push(episode);
        // Play at the pace the system learns: after each round, wait until the
        // steps its turns feed have been served.
        let round_over = (i + 1) % cfg.study.batch == 0 || i + 1 == train.len();
        if round_over {
            let round = &episodes[i + 1 - (i % cfg.study.batch + 1)..];
            crate::info!(
                "agent {tag}: episode {}/{}: this round solved {}/{}, {} with a valid call, policy v{version}",
                i + 1,
                train.len(),
                round.iter().filter(|e| e.outcome == Outcome::Correct).count(),
                round.len(),
                round.iter().filter(|e| e.valid_calls > 0).count(),
            );
        }
        if method != Method::Off && cfg.study.url.is_none() && round_over {
            let steps = cfg.study.round_versions(round_turns);
            let timeout = cfg.study.round_timeout * steps as u32;
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
            let retention = cfg.study.retention.as_ref().and_then(|check| {
                crate::eval::live::retention_of(
                    check,
                    cfg.study.model.as_deref(),
                    &d.join("checkpoints"),
                    &format!("agent {tag}"),
                )
            });
            (signals, retention)
        }
        _ => (None, None),
    };
    drop(scratch); // the temporary claw up directory, once retention has read it
    let model = cfg
        .study
        .model
        .as_ref()
        .and_then(|m| m.file_stem())
        .map_or("the default model".into(), |s| {
            s.to_string_lossy().into_owned()
        });
    Ok(RunResult {
        method: match cfg.study.url {
            Some(_) => "external".into(),
            None => method.name().into(),
        },
        seed: cfg.study.seed,
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
            study: Study::for_tests(),
            episodes: 4,
            tool_rounds: 2,
            feedback_grace: Duration::from_secs(90),
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
            // The agent's hints go last, after the tool's output (distill-hints' own default).
            assert!(!stage(&args, "distill-hints")
                .unwrap_or_default()
                .contains("--hint-at"));
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
