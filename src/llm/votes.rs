//! Sending prompts to a [`ChatBackend`] several times each (see the module docs of
//! [`crate::llm`]): seeds per vote, timeouts, retries with backoff, bounded
//! concurrency, counters.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value as Json;

use super::client::{CallError, ChatBackend, ChatRequest, Reply};

/// How to call the judge.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// Calls per prompt (m).
    pub votes: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    /// Per call (one attempt).
    pub timeout: Duration,
    /// Extra attempts after a transient failure.
    pub retries: usize,
    /// Wait before the first retry; doubled for each further one (at most 30 s).
    pub backoff: Duration,
    /// Most calls in flight at once (also bounded by the backend).
    pub concurrency: usize,
    /// Base seed; each vote's seed mixes it with the item's key and the vote index.
    pub seed: u64,
    /// Stop strings sent with every call (none by default).
    pub stop: Vec<String>,
    /// What the backend is to the user ("judge", "model"), in messages.
    pub role: &'static str,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            votes: 3,
            temperature: 0.6,
            max_tokens: 1024,
            timeout: Duration::from_secs(120),
            retries: 2,
            backoff: Duration::from_millis(500),
            concurrency: 4,
            seed: 0,
            stop: Vec::new(),
            role: "judge",
        }
    }
}

/// Counters over a [`VoteRunner::run`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallStats {
    /// Calls that were made (votes), retries not counted.
    pub calls: u64,
    /// Calls that gave no reply after all retries.
    pub failed: u64,
    /// Retry attempts.
    pub retries: u64,
    /// Tokens generated, over the replies that reported a count.
    pub completion_tokens: u64,
    /// Replies with no token count (a server that sends no `usage`).
    pub replies_without_tokens: u64,
    /// Wall time spent in [`VoteRunner::run`].
    pub seconds: f64,
}

impl CallStats {
    pub fn add(&mut self, other: &CallStats) {
        self.calls += other.calls;
        self.failed += other.failed;
        self.retries += other.retries;
        self.completion_tokens += other.completion_tokens;
        self.replies_without_tokens += other.replies_without_tokens;
        self.seconds += other.seconds;
    }

    /// Generated tokens per wall-clock second, when any reply reported tokens.
    pub fn tokens_per_s(&self) -> Option<f64> {
        (self.completion_tokens > 0 && self.seconds > 0.0)
            .then(|| self.completion_tokens as f64 / self.seconds)
    }
}

/// The replies to one item's calls, in vote order: the text, or why the call failed.
pub type Replies = Vec<Result<String, String>>;

/// A finished call: job index, outcome, retries it took.
type Finished = (usize, Result<Reply, String>, u64);

/// One prompt to send `votes` times; `key` (a sample id) seeds its votes.
pub struct VoteItem {
    pub key: String,
    pub messages: Vec<Json>,
}

/// Sends prompts to a backend, `votes` times each (see the module docs).
pub struct VoteRunner {
    backend: Box<dyn ChatBackend>,
    options: CallOptions,
}

impl VoteRunner {
    pub fn new(backend: Box<dyn ChatBackend>, options: CallOptions) -> Result<Self> {
        anyhow::ensure!(options.votes >= 1, "--votes must be at least 1");
        anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(options.max_tokens >= 1, "--max-tokens must be at least 1");
        anyhow::ensure!(
            options.temperature.is_finite() && options.temperature >= 0.0,
            "--temperature must be >= 0"
        );
        Ok(VoteRunner { backend, options })
    }

    pub fn backend(&self) -> &dyn ChatBackend {
        self.backend.as_ref()
    }

    pub fn options(&self) -> &CallOptions {
        &self.options
    }

    /// Changes the most tokens per reply (one backend, benchmarks with different
    /// reply lengths).
    pub fn set_max_tokens(&mut self, max_tokens: usize) -> Result<()> {
        anyhow::ensure!(max_tokens >= 1, "--max-tokens must be at least 1");
        self.options.max_tokens = max_tokens;
        Ok(())
    }

    /// Calls the judge `votes` times for every item. Returns, per item, one
    /// `Ok(reply text)` or `Err(reason)` per vote (in vote order), and counters.
    /// `on_call` is told after each finished call (for progress). Fails only on a
    /// [`CallError::Fatal`] reply.
    pub fn run(
        &self,
        items: &[VoteItem],
        on_call: &(dyn Fn() + Sync),
    ) -> Result<(Vec<Replies>, CallStats)> {
        let votes = self.options.votes;
        let jobs = items.len() * votes;
        let start = Instant::now();
        let mut results: Vec<Replies> = items
            .iter()
            .map(|_| (0..votes).map(|_| Err("not run".to_string())).collect())
            .collect();
        if jobs == 0 {
            return Ok((results, CallStats::default()));
        }
        let workers = self
            .options
            .concurrency
            .min(self.backend.max_concurrency())
            .min(jobs)
            .max(1);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let fatal: Mutex<Option<String>> = Mutex::new(None);
        let done: Mutex<Vec<Finished>> = Mutex::new(Vec::with_capacity(jobs));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let job = next.fetch_add(1, Ordering::Relaxed);
                    if job >= jobs {
                        break;
                    }
                    let item = &items[job / votes];
                    let vote = job % votes;
                    let (outcome, retries) = self.call_with_retries(item, vote, &stop);
                    let outcome = match outcome {
                        Err(CallError::Fatal(msg)) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut f = fatal.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(msg);
                            break;
                        }
                        Err(e) => {
                            crate::debug!(
                                "{} call for {} (vote {}) failed: {}",
                                self.options.role,
                                item.key,
                                vote + 1,
                                e.message()
                            );
                            Err(e.message().to_string())
                        }
                        Ok(reply) => Ok(reply),
                    };
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((job, outcome, retries));
                    on_call();
                });
            }
        });
        if let Some(msg) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
            bail!("the {} is misconfigured: {msg}", self.options.role);
        }
        let mut stats = CallStats::default();
        for (job, outcome, retries) in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
            stats.calls += 1;
            stats.retries += retries;
            results[job / votes][job % votes] = match outcome {
                Ok(reply) => {
                    match reply.completion_tokens {
                        Some(n) => stats.completion_tokens += n,
                        None => stats.replies_without_tokens += 1,
                    }
                    Ok(reply.text)
                }
                Err(e) => {
                    stats.failed += 1;
                    Err(e)
                }
            };
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok((results, stats))
    }

    fn call_with_retries(
        &self,
        item: &VoteItem,
        vote: usize,
        stop: &AtomicBool,
    ) -> (Result<Reply, CallError>, u64) {
        let o = &self.options;
        let request = ChatRequest {
            messages: &item.messages,
            temperature: o.temperature,
            max_tokens: o.max_tokens,
            seed: vote_seed(o.seed, &item.key, vote),
            timeout: o.timeout,
            stop: &o.stop,
        };
        let attempts = if self.backend.retries_help() {
            o.retries + 1
        } else {
            1
        };
        let mut retries = 0;
        let mut wait = o.backoff;
        loop {
            let outcome = self.backend.complete(&request);
            match &outcome {
                Err(CallError::Transient(msg)) if (retries as usize) + 1 < attempts => {
                    if stop.load(Ordering::Relaxed) {
                        return (outcome, retries);
                    }
                    crate::debug!(
                        "{} call for {} (vote {}): {msg}; retrying in {:.1} s",
                        o.role,
                        item.key,
                        vote + 1,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(30));
                    retries += 1;
                }
                _ => return (outcome, retries),
            }
        }
    }
}

/// The seed of vote `vote` on the item `key`: FNV-1a over both, mixed with `base`.
/// Stable across runs and platforms (unlike std's hasher), so a re-run on the
/// local model gives the same votes, whatever the order the items come in.
pub fn vote_seed(base: u64, key: &str, vote: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ base;
    for b in key.bytes().chain((vote as u64).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use serde_json::json;

    #[test]
    fn seeds_differ_per_vote_and_item_and_are_stable() {
        assert_ne!(vote_seed(0, "a", 0), vote_seed(0, "a", 1));
        assert_ne!(vote_seed(0, "a", 0), vote_seed(0, "b", 0));
        assert_ne!(vote_seed(0, "a", 0), vote_seed(1, "a", 0));
        assert_eq!(vote_seed(7, "sample-1", 2), vote_seed(7, "sample-1", 2));
    }

    #[derive(Default)]
    struct Counters {
        calls: AtomicU64,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    /// Answers from a script keyed by the message text; counts calls.
    struct Scripted(Arc<Counters>);

    impl ChatBackend for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn max_concurrency(&self) -> usize {
            usize::MAX
        }
        fn retries_help(&self) -> bool {
            true
        }
        fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
            let c = &self.0;
            let n = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_in_flight.fetch_max(n, Ordering::SeqCst);
            let call = c.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
            let text = req.messages[0]["content"].as_str().unwrap_or("");
            match text {
                "flaky" if call.is_multiple_of(2) => Err(CallError::Transient("503".into())),
                "broken" => Err(CallError::Failed("bad json".into())),
                "auth" => Err(CallError::Fatal("HTTP 401".into())),
                _ => Ok(Reply {
                    text: format!("{text} {}", req.seed % 2),
                    completion_tokens: Some(3),
                }),
            }
        }
    }

    fn runner_with(concurrency: usize, retries: usize) -> (VoteRunner, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let runner = VoteRunner::new(
            Box::new(Scripted(counters.clone())),
            CallOptions {
                votes: 3,
                retries,
                backoff: Duration::from_millis(1),
                concurrency,
                ..Default::default()
            },
        )
        .unwrap();
        (runner, counters)
    }

    fn runner(concurrency: usize, retries: usize) -> VoteRunner {
        runner_with(concurrency, retries).0
    }

    fn item(key: &str, text: &str) -> VoteItem {
        VoteItem {
            key: key.into(),
            messages: vec![json!({"role": "user", "content": text})],
        }
    }

    #[test]
    fn every_vote_lands_in_its_slot_and_is_counted() {
        let r = runner(2, 0);
        let calls = AtomicUsize::new(0);
        let items = [item("a", "fine"), item("b", "broken"), item("c", "fine")];
        let (out, stats) = r
            .run(&items, &|| {
                calls.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 9);
        assert_eq!(out.len(), 3);
        assert!(out[0]
            .iter()
            .all(|v| v.as_ref().is_ok_and(|t| t.starts_with("fine"))));
        assert!(out[1]
            .iter()
            .all(|v| v.as_ref().is_err_and(|e| e == "bad json")));
        assert_eq!((stats.calls, stats.failed, stats.retries), (9, 3, 0));
        assert_eq!(stats.completion_tokens, 18);
    }

    #[test]
    fn transient_failures_are_retried_within_the_bound() {
        // every other call fails: with 2 retries every vote gets through
        let (out, stats) = runner(1, 2).run(&[item("a", "flaky")], &|| {}).unwrap();
        assert!(out[0].iter().all(Result::is_ok), "{out:?}");
        assert!(stats.retries >= 1);
        // without retries the failures stay failures
        let (out, stats) = runner(1, 0).run(&[item("a", "flaky")], &|| {}).unwrap();
        assert_eq!(out[0].iter().filter(|v| v.is_err()).count(), 2);
        assert_eq!((stats.failed, stats.retries), (2, 0));
    }

    #[test]
    fn concurrency_is_bounded() {
        let (r, counters) = runner_with(3, 0);
        let items: Vec<VoteItem> = (0..8).map(|i| item(&i.to_string(), "fine")).collect();
        r.run(&items, &|| {}).unwrap();
        assert_eq!(counters.calls.load(Ordering::SeqCst), 24);
        let max = counters.max_in_flight.load(Ordering::SeqCst);
        assert!((2..=3).contains(&max), "max in flight {max}");
    }

    #[test]
    fn a_misconfigured_judge_stops_the_run() {
        let err = runner(2, 2)
            .run(&[item("a", "fine"), item("b", "auth")], &|| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("misconfigured") && err.contains("401"),
            "{err}"
        );
    }
}
