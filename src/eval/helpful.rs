//! Helpfulness by an LLM judge: does a reply actually answer its question? The
//! persona benchmark's rules check a style (brief, no lists, ...) and that a
//! reply is on topic, which a short but empty reply passes; a judge model
//! reading question and reply catches that loss. Each reply gets `votes` calls
//! (majority of the valid verdicts; a tie or no valid verdict counts as not
//! judged).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::llm::boxed::{last_boxed, parse_score};
use crate::llm::{vote_seed, ChatBackend, VoteItem, VoteRunner};
use crate::llm::{CallOptions, LocalBackend, RemoteBackend};
use crate::model::{Model, WeightFormat};

/// The judge's instructions; `{question}` and `{reply}` are filled in.
pub const PROMPT: &str = "You check whether an assistant's reply helps the person \
who asked.\n\nQuestion:\n{question}\n\nReply:\n{reply}\n\nA helpful reply answers \
the question with correct, useful content. A reply that is on topic but says \
nothing of substance, dodges, refuses, or is wrong is not helpful; style and \
length do not matter. Think in one or two sentences, then give your verdict as \
\\boxed{1} (helpful) or \\boxed{0} (not helpful).";

/// Where the judge runs: a local GGUF file, or an OpenAI-compatible URL.
#[derive(Clone, Debug, PartialEq)]
pub enum JudgeSpec {
    Local(PathBuf),
    Url(String),
}

impl JudgeSpec {
    /// `http://...` is a server; anything else a GGUF path.
    pub fn parse(text: &str) -> JudgeSpec {
        match text.starts_with("http://") || text.starts_with("https://") {
            true => JudgeSpec::Url(text.to_string()),
            false => JudgeSpec::Local(PathBuf::from(text)),
        }
    }

    /// Loads the model (or connects), `votes` calls per reply.
    pub fn connect(&self, votes: usize, seed: u64) -> Result<HelpfulnessJudge> {
        let backend: Box<dyn ChatBackend> = match self {
            JudgeSpec::Url(url) => Box::new(
                RemoteBackend::connect(url, None, None)
                    .with_context(|| format!("connecting to the helpfulness judge at {url}"))?,
            ),
            JudgeSpec::Local(path) => Box::new(LocalBackend::new(
                Model::load_with(path, WeightFormat::default())
                    .with_context(|| format!("loading the helpfulness judge {}", path.display()))?,
            )),
        };
        HelpfulnessJudge::new(backend, votes, seed)
    }
}

/// The verdicts a study's judge has reached, by (question, reply): the runs of a
/// study share their base model's held-out replies and the control, which are
/// then judged once. A pair's votes are seeded by its own text, so a kept
/// verdict is the one judging the pair again would give.
#[derive(Default)]
pub struct Verdicts {
    judge: Option<String>,
    by_pair: HashMap<(String, String), Option<bool>>,
}

impl Verdicts {
    /// Counts each set of (question, reply) pairs, asking the judge only about
    /// pairs not judged before (`connect` loads it only if there is one).
    pub fn judge_sets(
        &mut self,
        connect: impl FnOnce() -> Result<HelpfulnessJudge>,
        sets: &[Vec<(String, String)>],
    ) -> Result<Vec<Helpfulness>> {
        let mut new: Vec<(String, String)> = sets
            .iter()
            .flatten()
            .filter(|pair| !self.by_pair.contains_key(*pair))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        if !new.is_empty() {
            let judge = connect()?;
            let verdicts = judge.verdicts(&new)?;
            self.judge = Some(judge.runner.backend().name().to_string());
            self.by_pair.extend(new.into_iter().zip(verdicts));
        }
        let judge = self.judge.clone().unwrap_or_default();
        Ok(sets
            .iter()
            .map(|set| Helpfulness::count(&judge, set.iter().map(|pair| self.by_pair[pair])))
            .collect())
    }
}

/// The judge's control: each question with a reply that answers nothing, a
/// pleasantry and the question asked back (what a learned ask-back said to every
/// question on Qwen2.5-0.5B). A judge that can tell calls these unhelpful; the
/// share it calls helpful says how far its other verdicts can be trusted.
pub fn empty_replies(questions: &[&str]) -> Vec<(String, String)> {
    questions
        .iter()
        .map(|q| (q.to_string(), format!("Sure, I'd be happy to help! {q}")))
        .collect()
}

/// How many of a set of replies the judge found helpful.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Helpfulness {
    /// The judge model's name.
    pub judge: String,
    pub helpful: usize,
    /// Replies with a majority verdict (helpful or not).
    pub judged: usize,
    /// Replies the judge gave no majority for (no valid box, or a tie).
    pub unjudged: usize,
}

impl Helpfulness {
    /// Counts majority verdicts (None: no majority).
    fn count(judge: &str, verdicts: impl Iterator<Item = Option<bool>>) -> Helpfulness {
        let mut out = Helpfulness {
            judge: judge.to_string(),
            ..Helpfulness::default()
        };
        for verdict in verdicts {
            match verdict {
                Some(helpful) => {
                    out.judged += 1;
                    out.helpful += usize::from(helpful);
                }
                None => out.unjudged += 1,
            }
        }
        out
    }

    /// Helpful share of the judged replies (None when none was judged).
    pub fn rate(&self) -> Option<f64> {
        (self.judged > 0).then(|| self.helpful as f64 / self.judged as f64)
    }
}

pub struct HelpfulnessJudge {
    runner: VoteRunner,
}

impl HelpfulnessJudge {
    pub fn new(backend: Box<dyn ChatBackend>, votes: usize, seed: u64) -> Result<Self> {
        let runner = VoteRunner::new(
            backend,
            CallOptions {
                votes,
                temperature: 0.6,
                max_tokens: 256,
                timeout: Duration::from_secs(300),
                seed,
                ..CallOptions::default()
            },
        )?;
        Ok(HelpfulnessJudge { runner })
    }

    /// Each pair's majority verdict (None: a tie or no valid vote). A pair's key,
    /// which seeds its votes, comes from its text, not its place in `pairs`.
    fn verdicts(&self, pairs: &[(String, String)]) -> Result<Vec<Option<bool>>> {
        let items: Vec<VoteItem> = pairs
            .iter()
            .map(|(question, reply)| VoteItem {
                key: format!(
                    "helpful-{:016x}",
                    vote_seed(0, &format!("{question}\0{reply}"), 0)
                ),
                messages: vec![json!({
                    "role": "user",
                    "content": PROMPT.replace("{question}", question).replace("{reply}", reply),
                })],
            })
            .collect();
        let (replies, _) = self.runner.run(&items, &|| {})?;
        Ok(replies
            .iter()
            .map(|votes| {
                let verdicts: Vec<Option<i8>> = votes
                    .iter()
                    .map(|v| v.as_ref().ok().and_then(|text| verdict(text)))
                    .collect();
                majority(&verdicts)
            })
            .collect())
    }
}

/// A reply's verdict: its last `\boxed{0|1}`, or a reply that is only `0` or
/// `1` (small judges answer so, box or not).
fn verdict(text: &str) -> Option<i8> {
    let bare = || text.trim().trim_end_matches('.');
    last_boxed(text).map_or_else(|| parse_score(bare(), &[0, 1]), |b| parse_score(b, &[0, 1]))
}

/// The majority of the valid verdicts (1: helpful); None on a tie or none valid.
fn majority(verdicts: &[Option<i8>]) -> Option<bool> {
    let yes = verdicts.iter().filter(|v| **v == Some(1)).count();
    let no = verdicts.iter().filter(|v| **v == Some(0)).count();
    (yes != no).then_some(yes > no)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{CallError, ChatRequest, Reply};

    /// Calls a reply helpful when it holds a number, not when it holds none,
    /// and gives no verdict on "???".
    #[derive(Default)]
    struct Scripted {
        /// Calls answered.
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ChatBackend for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn max_concurrency(&self) -> usize {
            1
        }
        fn retries_help(&self) -> bool {
            false
        }
        fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let prompt = req.messages[0]["content"].as_str().unwrap_or_default();
            let reply = prompt.split("Reply:\n").nth(1).unwrap_or_default();
            let text = if reply.starts_with("???") {
                "I cannot decide."
            } else if reply.chars().take(20).any(|c| c.is_ascii_digit()) {
                "It gives the number. \\boxed{1}"
            } else {
                "It says nothing. \\boxed{0}"
            };
            Ok(Reply {
                text: text.to_string(),
                completion_tokens: None,
            })
        }
    }

    /// One set of pairs judged by a fresh scripted judge.
    fn judge_once(pairs: &[(String, String)]) -> Helpfulness {
        let connect = || HelpfulnessJudge::new(Box::new(Scripted::default()), 3, 0);
        Verdicts::default()
            .judge_sets(connect, &[pairs.to_vec()])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn replies_are_counted_by_their_majority_verdict() {
        let pairs: Vec<(String, String)> = [
            ("What is 6 * 7?", "42."),
            ("Capital of France?", "Good question!"),
            ("How far is the moon?", "About 384400 km."),
            ("Why?", "???"),
        ]
        .iter()
        .map(|(q, r)| (q.to_string(), r.to_string()))
        .collect();
        let got = judge_once(&pairs);
        let want = Helpfulness {
            judge: "scripted".into(),
            helpful: 2,
            judged: 3,
            unjudged: 1,
        };
        assert_eq!(got, want);
        assert_eq!(got.rate(), Some(2.0 / 3.0));
        assert_eq!(Helpfulness::default().rate(), None);
    }

    #[test]
    fn a_study_judges_each_pair_once_and_counts_as_if_judged_again() {
        let pairs = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items
                .iter()
                .map(|(q, r)| (q.to_string(), r.to_string()))
                .collect()
        };
        let before = pairs(&[("What is 6 * 7?", "42."), ("Capital of France?", "Hm.")]);
        let control = empty_replies(&["What is 6 * 7?", "Capital of France?"]);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connect = || {
            let judge = Scripted {
                calls: calls.clone(),
            };
            HelpfulnessJudge::new(Box::new(judge), 3, 0)
        };
        let mut verdicts = Verdicts::default();

        // the first run: before, after (one reply the same as before), control
        let after = pairs(&[
            ("What is 6 * 7?", "42."),
            ("Capital of France?", "Paris, 1 city."),
        ]);
        let first = verdicts
            .judge_sets(connect, &[before.clone(), after.clone(), control.clone()])
            .unwrap();
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::Relaxed),
            5 * 3,
            "5 distinct pairs, 3 votes"
        );
        let helpful: Vec<usize> = first.iter().map(|h| h.helpful).collect();
        assert_eq!(helpful, [1, 2, 0]);
        assert!(first.iter().all(|h| h.judge == "scripted" && h.judged == 2));

        // a second run of the study: the same before and control, nothing new
        let again = verdicts
            .judge_sets(
                || panic!("nothing new to judge, so no judge to load"),
                &[before.clone(), before.clone(), control.clone()],
            )
            .unwrap();
        assert_eq!(again[0], first[0]);
        assert_eq!(again[2], first[2]);
        // and what a fresh judge says of the same pairs
        assert_eq!(again[0], judge_once(&before));
    }

    #[test]
    fn the_control_replies_ask_each_question_back_and_answer_nothing() {
        let control = empty_replies(&["How do tides work?", "What is DNA?"]);
        assert_eq!(control.len(), 2);
        for (question, reply) in &control {
            assert!(reply.ends_with(question.as_str()), "{reply}");
            // the persona rule, which the judge should agree with, calls it no answer
            assert!(!crate::eval::persona::answers(question, reply), "{reply}");
        }
        // the scripted judge calls them unhelpful: no digit near the start
        assert_eq!(judge_once(&control).helpful, 0);
    }

    #[test]
    fn a_verdict_is_the_last_box_or_a_bare_digit() {
        assert_eq!(verdict("Fine. \\boxed{0} then \\boxed{1}"), Some(1));
        assert_eq!(verdict(" 0.\n"), Some(0));
        assert_eq!(verdict("1"), Some(1));
        assert_eq!(verdict("\\boxed{2}"), None);
        assert_eq!(verdict("I give it a 1 out of 10"), None);
    }

    #[test]
    fn the_majority_ignores_invalid_votes_and_a_tie_is_no_verdict() {
        assert_eq!(majority(&[Some(1), None, Some(1)]), Some(true));
        assert_eq!(majority(&[Some(0), Some(1), Some(0)]), Some(false));
        assert_eq!(majority(&[Some(0), None, Some(1)]), None);
        assert_eq!(majority(&[None, None]), None);
    }

    #[test]
    fn the_prompt_holds_question_and_reply_and_urls_are_servers() {
        let text = PROMPT.replace("{question}", "Q?").replace("{reply}", "R.");
        assert!(text.contains("Question:\nQ?") && text.contains("Reply:\nR."));
        assert_eq!(
            JudgeSpec::parse("http://127.0.0.1:8081/v1"),
            JudgeSpec::Url("http://127.0.0.1:8081/v1".into())
        );
        assert_eq!(
            JudgeSpec::parse("models/qwen.gguf"),
            JudgeSpec::Local("models/qwen.gguf".into())
        );
    }
}
