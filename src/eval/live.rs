//! What the learning benchmarks (`persona`, `agent`) share: the method a run
//! learns with and the settings of a study ([`Study`]), a fresh `claw up` started
//! as a child, serve's policy version, and the retention check of the adapter a
//! run leaves.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::distill::hints::HintPlacement;
use crate::distill::TeacherWeights;
use crate::train::RewardBaseline;

/// How the loop learns in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Binary RL: the reward alone (no distill).
    Rl,
    /// On-policy distillation: the hint alone (w_rl = 0).
    Opd,
    /// Both signals.
    Combined,
    /// No training: the control.
    Off,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rl => "rl",
            Method::Opd => "opd",
            Method::Combined => "combined",
            Method::Off => "off",
        }
    }
}

/// The settings persona and agent runs share: the model, how the loop learns,
/// how the study is paced, and where it runs.
#[derive(Clone, Debug)]
pub struct Study {
    pub model: Option<PathBuf>,
    /// Sessions (episodes) per round; also the training batch size.
    pub batch: usize,
    /// Held-out tasks asked greedily before and after each run.
    pub heldout: usize,
    /// Sampling temperature of the training sessions.
    pub temperature: f32,
    pub max_tokens: usize,
    pub lr: f64,
    /// Weight of the KL penalty that keeps the policy near the base model.
    pub beta_kl: f64,
    /// Optimizer updates per training batch (PPO's epochs).
    pub updates_per_batch: usize,
    /// Train accepted retries as demonstrations for the first prompt too.
    pub hindsight: bool,
    pub reward_baseline: RewardBaseline,
    /// Top-K distillation (opd, combined): K ids per token, 0 = off.
    pub topk: usize,
    /// Weight of the top-K distillation in the training loss.
    pub w_topk: f32,
    /// Replay each hint on this many other openings (opd, combined; 0 = off).
    pub hint_replay: usize,
    /// Anchor prompts distilled from the base model per step (opd, combined; 0 = off).
    pub anchor: usize,
    /// The base model's top-K per anchor reply token (0 = sampled tokens only).
    pub anchor_topk: usize,
    /// Accepted replies of earlier steps trained again per step (rl, combined;
    /// 0 = off).
    pub self_imitation: usize,
    /// Which weights read the hint (opd, combined): the policy that wrote the
    /// reply, or always the base model.
    pub teacher: TeacherWeights,
    /// Where the teacher reads the hint (opd, combined); None: the benchmark's own.
    pub hint_at: Option<HintPlacement>,
    pub seed: u64,
    /// Longest wait for a round's training step.
    pub round_timeout: Duration,
    /// Where each run's `claw up` directory goes (kept); default a temporary one.
    pub data_dir: Option<PathBuf>,
    /// Drive this running `claw up` (base URL) instead of starting one.
    pub url: Option<String>,
    /// Score each trained run's final adapter against the base model (gsm8k,
    /// facts, ppl); None skips it.
    pub retention: Option<crate::eval::retention::Check>,
    /// An LLM judge of the held-out replies' helpfulness (persona); None skips it.
    pub helpfulness: Option<crate::eval::helpful::JudgeSpec>,
}

impl Study {
    /// What a report states about how `method` ran: sampling always, the
    /// training settings unless it is the control.
    pub fn settings(&self, method: Method, hint_at: HintPlacement) -> BTreeMap<String, Value> {
        let mut s = BTreeMap::new();
        // f32 -> f64 would print 0.7 as 0.699999988.
        let shortest = |x: f32| -> f64 { x.to_string().parse().unwrap_or_default() };
        let temperature = shortest(self.temperature);
        s.insert("temperature".into(), json!(temperature));
        s.insert("max_tokens".into(), json!(self.max_tokens));
        if method != Method::Off {
            s.insert("batch".into(), json!(self.batch));
            s.insert("lr".into(), json!(self.lr));
            s.insert("beta_kl".into(), json!(self.beta_kl));
            s.insert("reward_baseline".into(), json!(self.reward_baseline.name()));
            if self.updates_per_batch > 1 {
                s.insert("updates_per_batch".into(), json!(self.updates_per_batch));
            }
            if self.hindsight {
                s.insert("hindsight".into(), json!(true));
            }
        }
        if matches!(method, Method::Opd | Method::Combined) && self.topk > 0 {
            s.insert("topk".into(), json!(self.topk));
            if self.w_topk != 1.0 {
                s.insert("w_topk".into(), json!(shortest(self.w_topk)));
            }
        }
        if matches!(method, Method::Opd | Method::Combined) && self.hint_replay > 0 {
            s.insert("hint_replay".into(), json!(self.hint_replay));
        }
        if matches!(method, Method::Opd | Method::Combined) && self.anchor > 0 {
            s.insert("anchor".into(), json!(self.anchor));
            if self.anchor_topk > 0 {
                s.insert("anchor_topk".into(), json!(self.anchor_topk));
            }
        }
        if matches!(method, Method::Rl | Method::Combined) && self.self_imitation > 0 {
            s.insert("self_imitation".into(), json!(self.self_imitation));
        }
        if matches!(method, Method::Opd | Method::Combined) && self.teacher == TeacherWeights::Base
        {
            s.insert("teacher".into(), json!("base"));
        }
        if matches!(method, Method::Opd | Method::Combined) && hint_at != HintPlacement::End {
            s.insert("hint_at".into(), json!(placement_name(hint_at)));
        }
        s
    }

    /// The hint placement a benchmark whose own is `default` runs with.
    pub fn hint_at_or(&self, default: HintPlacement) -> HintPlacement {
        self.hint_at.unwrap_or(default)
    }

    /// How far serve's policy version moves once a round's `samples` training
    /// samples are trained: a step per batch, times the updates per batch.
    pub fn round_versions(&self, samples: usize) -> u64 {
        samples.div_ceil(self.batch.max(1)).max(1) as u64 * self.updates_per_batch.max(1) as u64
    }

    /// Small settings for unit tests.
    #[cfg(test)]
    pub fn for_tests() -> Study {
        Study {
            model: None,
            batch: 2,
            heldout: 1,
            temperature: 0.7,
            max_tokens: 32,
            lr: 2e-4,
            beta_kl: 0.1,
            updates_per_batch: 1,
            hindsight: false,
            reward_baseline: RewardBaseline::BatchMean,
            topk: 0,
            w_topk: 1.0,
            hint_replay: 0,
            anchor: 0,
            anchor_topk: 0,
            self_imitation: 0,
            teacher: TeacherWeights::Policy,
            hint_at: None,
            seed: 0,
            round_timeout: Duration::from_secs(1),
            data_dir: None,
            url: None,
            retention: None,
            helpfulness: None,
        }
    }

    /// The `claw up` options that make `method` learn: train with the signals
    /// the method uses, distill-hints turning the feedback into hints (opd,
    /// combined), and `judge` and `collect` with the benchmark's own options.
    pub fn up_args(
        &self,
        method: Method,
        hint_at: HintPlacement,
        judge: &str,
        collect: &str,
    ) -> Vec<String> {
        let signals = match method {
            Method::Off => {
                return vec![
                    "--without".into(),
                    "collect,judge,distill-hints,train".into(),
                ]
            }
            Method::Rl => " --w-opd 0",
            Method::Opd => " --w-rl 0",
            Method::Combined => "",
        };
        let hindsight = if self.hindsight { " --hindsight" } else { "" };
        let distills = matches!(method, Method::Opd | Method::Combined);
        let w_topk = if distills && self.topk > 0 && self.w_topk != 1.0 {
            format!(" --w-topk {}", self.w_topk)
        } else {
            String::new()
        };
        // The replay teacher reads the hint where and with the weights
        // distill-hints' teacher does.
        let replay = if distills && self.hint_replay > 0 {
            let base = match self.teacher {
                TeacherWeights::Base => " --hint-replay-teacher base",
                TeacherWeights::Policy => "",
            };
            format!(
                " --hint-replay {} --hint-at {} --hint-replay-tokens {}{base}",
                self.hint_replay,
                placement_name(hint_at),
                self.max_tokens
            )
        } else {
            String::new()
        };
        // The anchor is a distillation term: rl's --w-opd 0 would void it.
        let anchor = match distills && self.anchor > 0 {
            true if self.anchor_topk > 0 => {
                format!(
                    " --anchor {} --anchor-topk {}",
                    self.anchor, self.anchor_topk
                )
            }
            true => format!(" --anchor {}", self.anchor),
            false => String::new(),
        };
        // Self-imitation replays by reward: opd's --w-rl 0 would void it.
        let imitation = match matches!(method, Method::Rl | Method::Combined) {
            true if self.self_imitation > 0 => {
                format!(" --self-imitation {}", self.self_imitation)
            }
            _ => String::new(),
        };
        let train = format!(
            "train=--batch-size {} --partial-after 20s --lr {} --beta-kl {} \
             --reward-baseline {} --updates-per-batch {} --keep 3\
             {hindsight}{w_topk}{replay}{anchor}{imitation}{signals}",
            self.batch,
            self.lr,
            self.beta_kl,
            self.reward_baseline.name(),
            self.updates_per_batch
        );
        let mut distill = "distill-hints=--hint-source feedback".to_string();
        if self.topk > 0 {
            distill.push_str(&format!(" --topk {}", self.topk));
        }
        if self.teacher == TeacherWeights::Base {
            distill.push_str(" --teacher base");
        }
        if hint_at != HintPlacement::End {
            distill.push_str(&format!(" --hint-at {}", placement_name(hint_at)));
        }
        let mut stages = match method {
            Method::Rl => vec![train],
            _ => vec![distill, train],
        };
        stages.push(format!("judge={judge}"));
        stages.push(format!("collect={collect}"));
        let mut args: Vec<String> = stages
            .into_iter()
            .flat_map(|s| ["--with".to_string(), s])
            .collect();
        if method == Method::Rl {
            args.extend(["--without".into(), "distill-hints".into()]);
        }
        args
    }
}

/// `--hint-at`'s name for `placement`.
fn placement_name(placement: HintPlacement) -> String {
    clap::ValueEnum::to_possible_value(&placement)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// A `claw up` a run started; stopped (SIGINT, then SIGKILL) when dropped.
pub struct Up {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Starts `claw up --dir DIR` on `model` with `args` (the method's stages), on
    /// a free loopback port; returns it and serve's base URL (`.../v1`).
    pub fn start(dir: &Path, model: Option<&Path>, args: &[String]) -> Result<(Up, String)> {
        let exe = crate::daemon::claw_executable()?;
        let mut cmd = Command::new(exe);
        cmd.arg("up")
            .arg("--dir")
            .arg(dir)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--poll-interval",
                "300ms",
            ])
            .args(["--with", "serve=--segment-age-ms 500 --reload-poll-ms 300"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(model) = model {
            cmd.arg("--model").arg(model);
        }
        crate::daemon::wake::stop_when_parent_dies(&mut cmd);
        // Its own process group: a Ctrl-C in the terminal reaches the study, which
        // stops the run it is in (`stopping`), not the `claw up` under it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().context("starting claw up")?;
        let stderr = child.stderr.take().context("claw up's stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let thread_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                crate::debug!("{line}");
                if let Some(at) = line.find("listening on http://") {
                    let addr = line[at + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(addr);
                }
                let mut log = thread_log.lock().unwrap_or_else(|e| e.into_inner());
                log.push(line);
                let excess = log.len().saturating_sub(200);
                log.drain(..excess);
            }
        });
        let up = Up { child, log };
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(addr) => Ok((up, format!("{addr}/v1"))),
            Err(_) => bail!("claw up did not start serving:\n{}", up.tail()),
        }
    }

    fn tail(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Routes Ctrl-C (and SIGTERM) to a stop request: the run in progress plays no
/// more training sessions, plays its held-out tasks, skips the retention check and
/// is reported; no further run starts. A second Ctrl-C exits at once (the report
/// then holds the runs finished before).
pub fn stop_on_ctrl_c() {
    crate::daemon::wake::install_stop_handler();
}

/// Whether the user asked the study to stop, said once per `tag`ged run.
pub fn stopping(tag: &str, done: usize, of: usize) -> bool {
    if !crate::daemon::wake::stop_requested() {
        return false;
    }
    crate::warn!(
        "{tag}: stopped after {done} of {of} training sessions; playing the held-out \
         tasks for the report (Ctrl-C again quits at once)"
    );
    true
}

/// The policy version serve answers with now (`/healthz`); `base` ends in `/v1`.
/// A run lasts an hour and asks this hundreds of times: a connection that fails
/// or times out (a machine too busy to answer in 30 s) is tried again twice,
/// 10 s apart, before the run gives up.
pub fn policy_version(base: &str) -> Result<u64> {
    policy_version_tries(base, 3, Duration::from_secs(10))
}

fn policy_version_tries(base: &str, tries: usize, pause: Duration) -> Result<u64> {
    let health_url = match base.strip_suffix("/v1") {
        Some(root) => format!("{root}/healthz"),
        None => format!("{base}/healthz"),
    };
    let mut tried = 1;
    let response = loop {
        match ureq::get(&health_url)
            .timeout(Duration::from_secs(30))
            .call()
        {
            Err(ureq::Error::Transport(e)) if tried < tries => {
                crate::warn!("GET {health_url} failed ({e}); trying again in {pause:?}");
                std::thread::sleep(pause);
                tried += 1;
            }
            other => break other.with_context(|| format!("GET {health_url}"))?,
        }
    };
    let health: Value = response
        .into_json()
        .with_context(|| format!("GET {health_url}: not JSON"))?;
    Ok(health["policy_version"].as_u64().unwrap_or(0))
}

/// Waits until serve answers with policy version `at_least` or newer; false on
/// Rates the reply `response_id` of `session` through serve's `/v1/feedback`
/// (`base` ends in `/v1`); `done` ends the session.
pub fn feedback(
    base: &str,
    session: &str,
    response_id: &str,
    rating: i8,
    text: Option<&str>,
    done: bool,
) -> Result<()> {
    ureq::post(&format!("{base}/feedback"))
        .timeout(Duration::from_secs(60))
        .send_json(json!({
            "session_id": session, "response_id": response_id,
            "rating": rating, "text": text, "session_done": done,
        }))
        .with_context(|| format!("feedback for session {session}"))?;
    Ok(())
}

/// timeout.
pub fn wait_for_policy(base: &str, at_least: u64, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if policy_version(base)? >= at_least {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(false)
}

/// Where a run's `claw up` directory goes: under `keep` (kept), else a temporary
/// one (returned second: it goes when the guard drops, however the run ends).
/// Refuses a directory that holds an earlier run.
pub fn run_dir(
    keep: Option<&Path>,
    bench: &str,
    name: &str,
) -> Result<(PathBuf, Option<ScratchDir>)> {
    let (dir, scratch) = match keep {
        Some(d) => (d.join(name), None),
        None => {
            let base = std::env::temp_dir();
            sweep_abandoned(&base, bench);
            let d = base
                .join(format!("claw-{bench}-{}", std::process::id()))
                .join(name);
            (d.clone(), Some(ScratchDir(d)))
        }
    };
    anyhow::ensure!(
        !dir.join("raw").exists(),
        "{}: holds an earlier run (remove it, or pick another --keep-data)",
        dir.display()
    );
    Ok((dir, scratch))
}

/// A run's temporary `claw up` directory. Dropping it removes the directory, and
/// its `claw-BENCH-PID` parent once that is empty, so a run that fails half-way
/// leaves nothing behind either. Drop it after the `claw up` writing into it.
pub struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent); // fails, harmlessly, while not empty
        }
    }
}

/// Removes the `claw-BENCH-PID` directories under `base` whose process is gone: a
/// run killed by a signal cannot remove its own. Linux only (it asks /proc
/// whether the process lives); elsewhere nothing is removed.
fn sweep_abandoned(base: &Path, bench: &str) {
    let proc_fs = Path::new("/proc");
    if !proc_fs.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let prefix = format!("claw-{bench}-");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || proc_fs.join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        if std::fs::remove_dir_all(&path).is_ok() {
            crate::info!(
                "removed {}, left by a {bench} run that was killed",
                path.display()
            );
        }
    }
}

/// The retention check of the run's final adapter (`checkpoints/LATEST`); None,
/// with a warning, when there is none or the check fails (the run's own results
/// stand either way).
pub fn retention_of(
    check: &crate::eval::retention::Check,
    model: Option<&Path>,
    checkpoints: &Path,
    tag: &str,
) -> Option<crate::eval::retention::RetentionReport> {
    if crate::daemon::wake::stop_requested() {
        crate::warn!("{tag}: stopped: retention not measured");
        return None;
    }
    let adapter = match crate::adapter::layout::latest_in(checkpoints) {
        Ok(Some(adapter)) => adapter,
        Ok(None) => {
            crate::warn!(
                "{tag}: no adapter in {}: retention not measured",
                checkpoints.display()
            );
            return None;
        }
        Err(e) => {
            crate::warn!("{tag}: retention not measured: {e:#}");
            return None;
        }
    };
    crate::info!("{tag}: retention of {}", adapter.display());
    let progress = |what: &str| crate::info!("retention: {what}");
    match check.adapter(model, &adapter, &progress) {
        Ok(report) => {
            crate::info!("{tag}: retention {}", report.overall());
            Some(report)
        }
        Err(e) => {
            crate::warn!("{tag}: retention of {} failed: {e:#}", adapter.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_scratch_dir_goes_when_its_run_ends_and_takes_its_empty_parent() {
        let base = tempfile::tempdir().unwrap();
        let parent = base.path().join("claw-persona-1");
        let (a, b) = (parent.join("brief"), parent.join("no-bold"));
        std::fs::create_dir_all(a.join("raw")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        drop(ScratchDir(a.clone()));
        assert!(!a.exists());
        assert!(parent.exists(), "another run's directory is still in it");
        drop(ScratchDir(b.clone()));
        assert!(!parent.exists());
    }

    #[test]
    fn directories_of_killed_runs_are_swept_and_live_ones_kept() {
        if !Path::new("/proc/self").exists() {
            eprintln!("skipped: no /proc on this system");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("claw-persona-999999999"); // above any pid_max
        let mine = base
            .path()
            .join(format!("claw-persona-{}", std::process::id()));
        let other_bench = base.path().join("claw-agent-999999999");
        let unrelated = base.path().join("claw-persona-notes");
        for d in [&dead, &mine, &other_bench, &unrelated] {
            std::fs::create_dir_all(d.join("run/raw")).unwrap();
        }
        sweep_abandoned(base.path(), "persona");
        assert!(!dead.exists());
        assert!(mine.exists() && other_bench.exists() && unrelated.exists());
    }

    #[test]
    fn a_failed_health_check_is_tried_again_before_the_run_gives_up() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            // The first connection is dropped unanswered; the second gets a version.
            drop(listener.accept().unwrap());
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap();
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /healthz "));
            let body = r#"{"status":"ok","policy_version":3}"#;
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let version = policy_version_tries(&base, 2, Duration::from_millis(10)).unwrap();
        assert_eq!(version, 3);
        server.join().unwrap();
        // With nothing listening, the error names the URL after the last try.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err =
            policy_version_tries(&format!("http://{closed}/v1"), 2, Duration::from_millis(10))
                .unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("{closed}/healthz")),
            "{err:#}"
        );
    }
}
