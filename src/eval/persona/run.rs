//! Driving one persona benchmark run: start `claw up` with the method's stages (or
//! use a running one), hold the sessions, measure the held-out set before and
//! after, stop.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::metrics::{sessions_to_success, RunResult, Session};
use super::{Persona, Verdict};
use crate::distill::HintPlacement;
use crate::eval::helpful::{Helpfulness, Verdicts};

pub use crate::eval::live::Method;
use crate::eval::live::{policy_version, wait_for_policy, Study, Up};

/// The `claw up` options that make `method` learn from the persona's signals:
/// the user's thumbs are the reward, and feedback comes right after each reply.
/// Sessions end when the user says so; the timeout is a backstop (a reply can
/// take longer than 10 s on a busy machine).
fn up_args(method: Method, cfg: &RunConfig) -> Vec<String> {
    cfg.study.up_args(
        method,
        cfg.hint_at(),
        "--sources feedback",
        "--feedback-grace 2s --session-timeout 2m",
    )
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub study: Study,
    pub sessions: usize,
    /// Most replies in one session: after an unsatisfying reply the user says
    /// what is wrong (the next state) and the model tries again.
    pub max_turns: usize,
}

/// Where the teacher reads a persona's correction unless told otherwise: above
/// the user's message. Appended after it, "That's too long." is what a policy
/// teacher that has begun to learn answers, by echoing it (measured:
/// docs/ARCHITECTURE.md, "Hindsight hints").
const HINT_AT: HintPlacement = HintPlacement::Before;

impl RunConfig {
    fn hint_at(&self) -> HintPlacement {
        self.study.hint_at_or(HINT_AT)
    }

    /// What a report should say about how `method` trained.
    fn settings(&self, method: Method) -> std::collections::BTreeMap<String, Value> {
        let mut s = self.study.settings(method, self.hint_at());
        s.insert("max_turns".into(), json!(self.max_turns));
        s
    }
}

/// The helpfulness judge's verdicts on the held-out replies before and after
/// training, and on its control ([`crate::eval::helpful::empty_replies`]),
/// through the study's `verdicts` (pairs judged in an earlier run are not judged
/// again); a judge that fails is logged and leaves them unmeasured.
fn judge_helpfulness(
    spec: &crate::eval::helpful::JudgeSpec,
    verdicts: &mut Verdicts,
    tasks: &[&str],
    before: &[String],
    after: &[String],
    tag: &str,
) -> JudgedHelpfulness {
    let pairs = |replies: &[String]| -> Vec<(String, String)> {
        tasks
            .iter()
            .zip(replies)
            .map(|(t, r)| (t.to_string(), r.clone()))
            .collect()
    };
    crate::info!("persona {tag}: judging the held-out replies' helpfulness");
    let sets = [
        pairs(before),
        pairs(after),
        crate::eval::helpful::empty_replies(tasks),
    ];
    match verdicts.judge_sets(|| spec.connect(3, 0), &sets) {
        Ok(counts) => {
            let [before, after, empty] = counts.try_into().expect("one count per set");
            JudgedHelpfulness {
                before: Some(before),
                after: Some(after),
                empty: Some(empty),
            }
        }
        Err(e) => {
            crate::warn!("persona {tag}: helpfulness not judged: {e:#}");
            JudgedHelpfulness::default()
        }
    }
}

#[derive(Default)]
struct JudgedHelpfulness {
    before: Option<Helpfulness>,
    after: Option<Helpfulness>,
    /// The control: replies that answer nothing.
    empty: Option<Helpfulness>,
}

/// Talks to serve as the simulated user.
struct Client {
    base: String,
}

impl Client {
    /// One turn of `session`: the model's reply to `messages` (its response id and
    /// text). `last` tells collect the session ends with this turn.
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        session: &str,
        messages: &[Value],
        side: bool,
        last: bool,
        temperature: f32,
        max_tokens: usize,
        seed: u64,
    ) -> Result<(String, String)> {
        let body = json!({
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "seed": seed,
        });
        let reply: Value = ureq::post(&format!("{}/chat/completions", self.base))
            .timeout(Duration::from_secs(600))
            .set("X-Session-Id", session)
            .set("X-Session-Done", if last { "1" } else { "0" })
            .set("X-Turn-Type", if side { "side" } else { "main" })
            .send_json(body)
            .with_context(|| format!("chat request of session {session}"))?
            .into_json()
            .context("reading a chat reply")?;
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = reply["id"].as_str().unwrap_or_default().to_string();
        Ok((id, text))
    }

    /// Rates a reply; `done`: the user leaves the session with it.
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

    fn policy_version(&self) -> Result<u64> {
        policy_version(&self.base)
    }

    fn wait_for_policy(&self, at_least: u64, timeout: Duration) -> Result<bool> {
        wait_for_policy(&self.base, at_least, timeout)
    }

    /// Share of held-out tasks answered to the persona's liking (greedy, side
    /// turns), and the replies.
    fn heldout_rate(
        &self,
        persona: &Persona,
        tasks: &[&str],
        max_tokens: usize,
        tag: &str,
    ) -> Result<(f64, Vec<String>)> {
        if tasks.is_empty() {
            return Ok((0.0, Vec::new()));
        }
        let mut ok = 0;
        let mut replies = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            let (_, reply) = self.chat(
                &format!("heldout-{tag}-{i}"),
                &[user_message(task)],
                true,
                true,
                0.0,
                max_tokens,
                0,
            )?;
            ok += usize::from(persona.verdict(task, &reply) == Verdict::Satisfied);
            replies.push(reply);
        }
        Ok((ok as f64 / tasks.len() as f64, replies))
    }
}

fn user_message(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// One session: the user asks `task`; while a reply disappoints them (and turns
/// are left) they say why, with a thumbs down, and the model tries again; a
/// reply they like gets a thumbs up and ends it. Returns the first reply (what the
/// benchmark measures, as OpenClaw-RL does), its verdict and the number of turns.
/// What one session showed: the first reply and its verdict (the measure), how
/// many replies it took, and whether a retry was accepted in the end.
struct Held {
    first_reply: String,
    first_verdict: Verdict,
    turns: usize,
    accepted_retry: bool,
}

fn hold_session(
    client: &Client,
    persona: &Persona,
    task: &str,
    session_id: &str,
    cfg: &RunConfig,
    seed: u64,
    rng: &mut impl Rng,
) -> Result<Held> {
    let mut messages = vec![user_message(task)];
    let mut first = None;
    let max_turns = cfg.max_turns.max(1);
    for turn in 0..max_turns {
        let last = turn + 1 == max_turns;
        let (id, reply) = client.chat(
            session_id,
            &messages,
            false,
            last,
            cfg.study.temperature,
            cfg.study.max_tokens,
            seed.wrapping_add(turn as u64 * 7_919),
        )?;
        let verdict = persona.verdict(task, &reply);
        let complaints = match verdict {
            Verdict::Satisfied => None,
            Verdict::Unsatisfied => Some(persona.feedback),
            Verdict::NoAnswer => Some(super::NO_ANSWER_FEEDBACK),
        };
        let first = first.get_or_insert_with(|| (reply.clone(), verdict));
        let Some(texts) = complaints else {
            // A satisfied user moves on, and says the session is over.
            client.feedback(session_id, &id, 1, None, true)?;
            return Ok(Held {
                first_reply: first.0.clone(),
                first_verdict: first.1,
                turns: turn + 1,
                accepted_retry: turn > 0,
            });
        };
        let text = texts[rng.gen_range(0..texts.len())];
        client.feedback(session_id, &id, -1, Some(text), last)?;
        messages.push(json!({"role": "assistant", "content": reply}));
        messages.push(user_message(text));
    }
    let (first_reply, first_verdict) = first.expect("at least one turn");
    Ok(Held {
        first_reply,
        first_verdict,
        turns: max_turns,
        accepted_retry: false,
    })
}

/// One run of `persona` with `method`. `progress` is told about each session;
/// `verdicts` keeps the helpfulness judge's verdicts across a study's runs.
pub fn run(
    persona: &Persona,
    method: Method,
    cfg: &RunConfig,
    verdicts: &mut Verdicts,
    progress: &dyn Fn(&Session),
) -> Result<RunResult> {
    let started = Instant::now();
    // Declared before `up`, so that on an early return `claw up` stops first.
    let mut scratch = None;
    let mut run_dir = None;
    let (up, base) = match &cfg.study.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let name = format!("{}-{}-seed{}", persona.name, method.name(), cfg.study.seed);
            let (dir, tmp) =
                crate::eval::live::run_dir(cfg.study.data_dir.as_deref(), "persona", &name)?;
            scratch = tmp;
            let (up, base) = Up::start(&dir, cfg.study.model.as_deref(), &up_args(method, cfg))?;
            run_dir = Some(dir);
            (Some(up), base)
        }
    };
    let client = Client { base };
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.study.seed);
    let mut tasks = super::tasks();
    tasks.shuffle(&mut rng);
    let heldout: Vec<&str> = super::heldout()
        .into_iter()
        .take(cfg.study.heldout)
        .collect();
    let tag = format!("{}-{}-{}", persona.name, method.name(), cfg.study.seed);

    let (heldout_before, replies_before) = client.heldout_rate(
        persona,
        &heldout,
        cfg.study.max_tokens,
        &format!("{tag}-before"),
    )?;
    let mut sessions = Vec::with_capacity(cfg.sessions);
    let mut round_version = client.policy_version()?;
    let mut round_samples = 0;
    for i in 0..cfg.sessions {
        if crate::eval::live::stopping(&format!("persona {tag}"), i, cfg.sessions) {
            break;
        }
        let task = tasks[i % tasks.len()];
        let session_id = format!("{tag}-{}", i + 1);
        let version = client.policy_version()?;
        let seed = cfg
            .study
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(i as u64);
        let held = hold_session(&client, persona, task, &session_id, cfg, seed, &mut rng)?;
        let (reply, verdict, turns) = (held.first_reply, held.first_verdict, held.turns);
        let satisfied = verdict == Verdict::Satisfied;
        // With --hindsight an accepted retry is also a demonstration: one more sample.
        round_samples += turns + usize::from(cfg.study.hindsight && held.accepted_retry);
        let session = Session {
            index: i + 1,
            task: task.to_string(),
            reply,
            satisfied,
            no_answer: verdict == Verdict::NoAnswer,
            turns,
            policy_version: version,
            seconds_since_start: started.elapsed().as_secs_f64(),
        };
        progress(&session);
        sessions.push(session);
        // A user who chats at the pace the system learns: after each batch of
        // sessions, wait until the steps their replies feed have been served.
        let round_over = (i + 1) % cfg.study.batch == 0 || i + 1 == cfg.sessions;
        if method != Method::Off && round_over {
            let steps = cfg.study.round_versions(round_samples);
            let timeout = cfg.study.round_timeout * steps as u32;
            if !client.wait_for_policy(round_version + steps, timeout)? {
                crate::warn!(
                    "persona {}: {steps} training steps not served within {timeout:?} after session {}",
                    persona.name,
                    i + 1
                );
            }
            round_version = client.policy_version()?;
            round_samples = 0;
        }
    }
    let final_policy_version = client.policy_version()?;
    let (heldout_after, replies_after) = client.heldout_rate(
        persona,
        &heldout,
        cfg.study.max_tokens,
        &format!("{tag}-after"),
    )?;
    drop(up); // stops claw up before its directory goes
    let helpful = match &cfg.study.helpfulness {
        Some(spec) => judge_helpfulness(
            spec,
            verdicts,
            &heldout,
            &replies_before,
            &replies_after,
            &tag,
        ),
        None => JudgedHelpfulness::default(),
    };
    let retention = match (&cfg.study.retention, &run_dir) {
        (Some(check), Some(dir)) if method != Method::Off => crate::eval::live::retention_of(
            check,
            cfg.study.model.as_deref(),
            &dir.join("checkpoints"),
            &format!("persona {tag}"),
        ),
        _ => None,
    };
    drop(scratch); // the temporary claw up directory, once retention has read it
    let satisfied: Vec<bool> = sessions.iter().map(|s| s.satisfied).collect();
    Ok(RunResult {
        persona: persona.name.into(),
        method: match cfg.study.url {
            Some(_) => "external".into(),
            None => method.name().into(),
        },
        seed: cfg.study.seed,
        sessions_to_success: sessions_to_success(&satisfied),
        sessions,
        heldout_before,
        heldout_after,
        heldout_prompts: heldout.len(),
        helpful_before: helpful.before,
        helpful_after: helpful.after,
        helpful_empty: helpful.empty,
        final_policy_version,
        seconds: started.elapsed().as_secs_f64(),
        settings: cfg.settings(method),
        retention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(topk: usize) -> RunConfig {
        RunConfig {
            study: Study {
                topk,
                ..Study::for_tests()
            },
            sessions: 4,
            max_turns: 3,
        }
    }

    /// The value of `--with STAGE=...` in `claw up` arguments.
    fn stage_args(args: &[String], stage: &str) -> Option<String> {
        let prefix = format!("{stage}=");
        args.windows(2)
            .find(|w| w[0] == "--with" && w[1].starts_with(&prefix))
            .map(|w| w[1][prefix.len()..].to_string())
    }

    #[test]
    fn topk_reaches_distill_hints_for_the_distilling_methods_only() {
        for method in [Method::Opd, Method::Combined] {
            let args = up_args(method, &config(8));
            let distill = stage_args(&args, "distill-hints").unwrap();
            assert!(distill.contains("--topk 8"), "{method:?}: {distill}");
            assert_eq!(config(8).settings(method)["topk"], json!(8));
            let plain = stage_args(&up_args(method, &config(0)), "distill-hints").unwrap();
            assert!(!plain.contains("--topk"), "{method:?}: {plain}");
            assert!(!config(0).settings(method).contains_key("topk"));
        }
        let rl = up_args(Method::Rl, &config(8));
        assert_eq!(stage_args(&rl, "distill-hints"), None);
        assert!(!config(8).settings(Method::Rl).contains_key("topk"));
    }

    #[test]
    fn a_topk_weight_reaches_train_only_where_topk_is_distilled() {
        let weighted = |topk, w_topk| RunConfig {
            study: Study {
                topk,
                w_topk,
                ..Study::for_tests()
            },
            ..config(topk)
        };
        let train = stage_args(&up_args(Method::Combined, &weighted(8, 3.0)), "train").unwrap();
        assert!(train.contains("--w-topk 3"), "{train}");
        assert_eq!(
            weighted(8, 3.0).settings(Method::Combined)["w_topk"],
            json!(3.0)
        );
        // The default weight, no top-K, or rl (no distillation): nothing to pass.
        for (method, topk, w_topk) in [
            (Method::Combined, 8, 1.0),
            (Method::Combined, 0, 3.0),
            (Method::Rl, 8, 3.0),
        ] {
            let train = stage_args(&up_args(method, &weighted(topk, w_topk)), "train").unwrap();
            assert!(
                !train.contains("--w-topk"),
                "{method:?} {topk} {w_topk}: {train}"
            );
            assert!(!weighted(topk, w_topk)
                .settings(method)
                .contains_key("w_topk"));
        }
    }

    #[test]
    fn a_hint_replay_reaches_train_with_the_teachers_placement_only_where_hints_are_distilled() {
        let replaying = RunConfig {
            study: Study {
                hint_replay: 3,
                max_tokens: 96,
                ..Study::for_tests()
            },
            ..config(0)
        };
        for method in [Method::Opd, Method::Combined] {
            let train = stage_args(&up_args(method, &replaying), "train").unwrap();
            assert!(
                train.contains("--hint-replay 3 --hint-at before --hint-replay-tokens 96"),
                "{method:?}: {train}"
            );
            assert_eq!(replaying.settings(method)["hint_replay"], json!(3));
        }
        let rl = stage_args(&up_args(Method::Rl, &replaying), "train").unwrap();
        assert!(!rl.contains("--hint-replay"), "{rl}");
        assert!(!replaying.settings(Method::Rl).contains_key("hint_replay"));
        let plain = stage_args(&up_args(Method::Combined, &config(0)), "train").unwrap();
        assert!(!plain.contains("--hint-replay"), "{plain}");
        assert!(!stage_args(&up_args(Method::Opd, &replaying), "train")
            .unwrap()
            .contains("--hint-replay-teacher"));
        let base = RunConfig {
            study: Study {
                teacher: crate::distill::TeacherWeights::Base,
                ..replaying.study.clone()
            },
            ..config(0)
        };
        let train = stage_args(&up_args(Method::Opd, &base), "train").unwrap();
        assert!(train.contains("--hint-replay-teacher base"), "{train}");
    }

    #[test]
    fn the_anchor_reaches_train_only_where_the_distillation_term_is_on() {
        let anchored = RunConfig {
            study: Study {
                anchor: 2,
                ..Study::for_tests()
            },
            ..config(0)
        };
        for method in [Method::Opd, Method::Combined] {
            let train = stage_args(&up_args(method, &anchored), "train").unwrap();
            assert!(train.contains(" --anchor 2"), "{method:?}: {train}");
            assert_eq!(anchored.settings(method)["anchor"], json!(2));
        }
        // rl trains with --w-opd 0, where an anchor would do nothing (train refuses it).
        let rl = stage_args(&up_args(Method::Rl, &anchored), "train").unwrap();
        assert!(!rl.contains("--anchor"), "{rl}");
        assert!(!anchored.settings(Method::Rl).contains_key("anchor"));
        let plain = stage_args(&up_args(Method::Combined, &config(0)), "train").unwrap();
        assert!(!plain.contains("--anchor"), "{plain}");
        let topk = RunConfig {
            study: Study {
                anchor_topk: 8,
                ..anchored.study.clone()
            },
            ..config(0)
        };
        let train = stage_args(&up_args(Method::Opd, &topk), "train").unwrap();
        assert!(train.contains(" --anchor 2 --anchor-topk 8"), "{train}");
        assert_eq!(topk.settings(Method::Opd)["anchor_topk"], json!(8));
    }

    #[test]
    fn self_imitation_reaches_train_only_where_the_reward_term_is_on() {
        let imitating = RunConfig {
            study: Study {
                self_imitation: 2,
                ..Study::for_tests()
            },
            ..config(0)
        };
        for method in [Method::Rl, Method::Combined] {
            let train = stage_args(&up_args(method, &imitating), "train").unwrap();
            assert!(train.contains(" --self-imitation 2"), "{method:?}: {train}");
            assert_eq!(imitating.settings(method)["self_imitation"], json!(2));
        }
        // opd trains with --w-rl 0, where replaying by reward does nothing.
        let opd = stage_args(&up_args(Method::Opd, &imitating), "train").unwrap();
        assert!(!opd.contains("--self-imitation"), "{opd}");
        assert!(!imitating
            .settings(Method::Opd)
            .contains_key("self_imitation"));
        let plain = stage_args(&up_args(Method::Combined, &config(0)), "train").unwrap();
        assert!(!plain.contains("--self-imitation"), "{plain}");
    }

    #[test]
    fn a_persona_teacher_reads_the_correction_above_the_message_unless_told() {
        let mut cfg = config(0);
        for method in [Method::Opd, Method::Combined] {
            let distill = stage_args(&up_args(method, &cfg), "distill-hints").unwrap();
            assert!(
                distill.contains("--hint-at before"),
                "{method:?}: {distill}"
            );
            assert_eq!(cfg.settings(method)["hint_at"], json!("before"));
        }
        assert!(!cfg.settings(Method::Rl).contains_key("hint_at"));
        cfg.study.hint_at = Some(HintPlacement::End);
        let distill = stage_args(&up_args(Method::Combined, &cfg), "distill-hints").unwrap();
        assert!(
            !distill.contains("--hint-at"),
            "end is distill-hints' own: {distill}"
        );
        assert!(!cfg.settings(Method::Combined).contains_key("hint_at"));
    }

    #[test]
    fn a_base_teacher_reaches_distill_hints_and_the_report() {
        let mut cfg = config(0);
        let plain = stage_args(&up_args(Method::Combined, &cfg), "distill-hints").unwrap();
        assert!(!plain.contains("--teacher"), "{plain}");
        assert!(!cfg.settings(Method::Combined).contains_key("teacher"));
        cfg.study.teacher = crate::distill::TeacherWeights::Base;
        for method in [Method::Opd, Method::Combined] {
            let distill = stage_args(&up_args(method, &cfg), "distill-hints").unwrap();
            assert!(distill.contains("--teacher base"), "{method:?}: {distill}");
            assert_eq!(cfg.settings(method)["teacher"], json!("base"));
        }
        assert!(!cfg.settings(Method::Rl).contains_key("teacher"));
    }

    #[test]
    fn a_round_waits_for_every_update_of_every_batch() {
        let mut cfg = config(0);
        cfg.study.batch = 4;
        assert_eq!(cfg.study.round_versions(0), 1);
        assert_eq!(cfg.study.round_versions(9), 3);
        cfg.study.updates_per_batch = 4;
        assert_eq!(cfg.study.round_versions(9), 12);
    }

    #[test]
    fn updates_per_batch_and_hindsight_reach_train_and_the_report() {
        let mut cfg = config(0);
        let plain = stage_args(&up_args(Method::Combined, &cfg), "train").unwrap();
        assert!(plain.contains("--updates-per-batch 1"), "{plain}");
        assert!(!plain.contains("--hindsight"), "{plain}");
        cfg.study.updates_per_batch = 4;
        cfg.study.hindsight = true;
        let train = stage_args(&up_args(Method::Rl, &cfg), "train").unwrap();
        assert!(train.contains("--updates-per-batch 4"), "{train}");
        assert!(train.contains("--hindsight"), "{train}");
        let settings = cfg.settings(Method::Rl);
        assert_eq!(settings["updates_per_batch"], json!(4));
        assert_eq!(settings["hindsight"], json!(true));
        assert!(!cfg.settings(Method::Off).contains_key("hindsight"));
    }
}
