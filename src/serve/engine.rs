//! The generation engine: one thread that runs every admitted request, with
//! continuous batching.
//!
//! Requests wait in FIFO order; up to `--parallel` of them are active at once.
//! Each step of the engine
//! 1. admits waiting requests into free places (a request joins between steps,
//!    starting from the longest prefix the [`PrefixCache`] holds for its policy),
//! 2. drops requests whose client went away (streaming or not),
//! 3. runs one prompt chunk (512 tokens) of the requests still prefilling,
//!    oldest first, so a long prompt delays the others' next tokens by one chunk
//!    at a time, not by its whole prefill,
//! 4. decodes one token for every other active request in one batched forward
//!    pass per policy ([`Decoder::decode`]: each weight is read once for the
//!    batch, which is what a memory-bound decode step costs),
//! 5. and hands back the finished ones (a request leaves between steps), storing
//!    their KV in the prefix cache.
//!
//! A request keeps the policy it was admitted under; requests of different
//! policies (an adapter swap while some are in flight) decode in separate
//! passes. Every request samples with its own parameters and sampler, and its
//! numbers do not depend on its batch (see [`crate::model::decoder`]'s step), so
//! the recorded ids and log-probs are those of an unbatched run.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc as std_mpsc, Arc};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use super::prefix::PrefixCache;
use super::reload::{Policies, Policy};
use super::response::Event;
use crate::model::generate::{Flow, Sequence, PREFILL_CHUNK};
use crate::model::{Decoder, Generation, KvCache, Model, SamplingParams};

/// One request for the engine.
pub struct Work {
    pub policy: Arc<Policy>,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Text pieces go here as they become final; a closed channel cancels.
    pub events: mpsc::UnboundedSender<Event>,
    /// The finished generation (a cancelled one too), or why it failed.
    pub done: oneshot::Sender<Result<Generation>>,
}

/// The handle the HTTP side submits work through.
pub struct Engine {
    submit: std_mpsc::Sender<Work>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts the engine thread, decoding up to `parallel` requests together.
    pub fn start(
        model: Arc<Model>,
        policies: Arc<Policies>,
        prefix_cache: PrefixCache,
        metrics: Arc<Metrics>,
        parallel: usize,
    ) -> Result<Self> {
        let (submit, incoming) = std_mpsc::channel();
        let worker = Worker {
            model,
            policies,
            prefix_cache,
            metrics: metrics.clone(),
            parallel: parallel.max(1),
        };
        std::thread::Builder::new()
            .name("claw-engine".into())
            .spawn(move || worker.run(incoming))
            .context("cannot start the generation engine thread")?;
        Ok(Self { submit, metrics })
    }

    /// Queues `work`; its result arrives on `work.done`.
    pub fn submit(&self, work: Work) {
        self.metrics.queue_waiting.fetch_add(1, Relaxed);
        if let Err(std_mpsc::SendError(work)) = self.submit.send(work) {
            self.metrics.queue_waiting.fetch_sub(1, Relaxed);
            let _ = work
                .done
                .send(Err(anyhow::anyhow!("the generation engine has stopped")));
        }
    }
}

struct Worker {
    model: Arc<Model>,
    policies: Arc<Policies>,
    prefix_cache: PrefixCache,
    metrics: Arc<Metrics>,
    parallel: usize,
}

/// An admitted request.
struct Active<'m> {
    sequence: Sequence<'m>,
    policy: Arc<Policy>,
    events: mpsc::UnboundedSender<Event>,
    done: oneshot::Sender<Result<Generation>>,
    /// Set when a step failed: the request ends with this error.
    failed: Option<anyhow::Error>,
}

impl Active<'_> {
    fn on_text(events: &mpsc::UnboundedSender<Event>) -> impl FnMut(&str) -> Flow + '_ {
        move |piece| match events.send(Event::Piece(piece.to_string())) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Cancel,
        }
    }

    fn finished(&self) -> bool {
        self.failed.is_some() || self.sequence.is_done()
    }
}

impl Worker {
    fn run(self, incoming: std_mpsc::Receiver<Work>) {
        let model = self.model.clone();
        let mut waiting: VecDeque<Work> = VecDeque::new();
        let mut active: Vec<Active<'_>> = Vec::new();
        loop {
            // Block only when there is nothing to do.
            if active.is_empty() && waiting.is_empty() {
                match incoming.recv() {
                    Ok(work) => waiting.push_back(work),
                    Err(_) => return,
                }
            }
            waiting.extend(incoming.try_iter());
            while active.len() < self.parallel {
                let Some(work) = waiting.pop_front() else {
                    break;
                };
                self.metrics.queue_waiting.fetch_sub(1, Relaxed);
                if let Some(admitted) = self.admit(&model, work) {
                    active.push(admitted);
                }
            }
            self.metrics.running.store(active.len() as u64, Relaxed);

            let step = catch_unwind(AssertUnwindSafe(|| self.step(&model, &mut active)));
            if step.is_err() {
                crate::warn!(
                    "a generation step panicked; failing its {} request(s)",
                    active.len()
                );
                for a in &mut active {
                    a.failed = Some(anyhow::anyhow!("generation failed (internal error)"));
                }
            }
            let mut i = 0;
            while i < active.len() {
                if active[i].finished() {
                    let done = active.swap_remove(i);
                    self.complete(done);
                } else {
                    i += 1;
                }
            }
            self.metrics.running.store(active.len() as u64, Relaxed);
        }
    }

    /// Starts `work` after the longest prefix of its prompt cached for its policy.
    fn admit<'m>(&self, model: &'m Model, work: Work) -> Option<Active<'m>> {
        if work.events.is_closed() {
            self.metrics.generations_cancelled.fetch_add(1, Relaxed);
            return None;
        }
        let cache = self
            .prefix_cache
            .lookup(work.policy.id, &work.prompt_ids)
            .map(|hit| hit.cache)
            .unwrap_or_default();
        match Sequence::new(model, work.prompt_ids, cache, work.params) {
            Ok(sequence) => Some(Active {
                sequence,
                policy: work.policy,
                events: work.events,
                done: work.done,
                failed: None,
            }),
            Err(e) => {
                let _ = work.done.send(Err(e));
                None
            }
        }
    }

    /// One engine step over the active requests: cancels, one prefill chunk,
    /// one batched decode per policy.
    fn step(&self, model: &Model, active: &mut [Active<'_>]) {
        for a in active.iter_mut() {
            if a.events.is_closed() {
                a.sequence.cancel();
            }
        }
        // One chunk's worth of prompt tokens per step, oldest request first: a
        // long prompt takes it all, many short remainders (prefix-cache hits)
        // share it, so a crowd of new requests starts decoding together.
        let mut budget = PREFILL_CHUNK;
        for a in active.iter_mut() {
            if budget == 0 {
                break;
            }
            if !a.sequence.is_prefilling() || a.failed.is_some() {
                continue;
            }
            let tokens = a.sequence.prompt_left().min(budget);
            budget -= tokens;
            let decoder = a.policy.decoder(model);
            let mut on_text = Active::on_text(&a.events);
            if let Err(e) = a.sequence.prefill_at_most(tokens, decoder, &mut on_text) {
                a.failed = Some(e.context("prefill failed"));
            }
        }
        let mut decoding: Vec<&mut Active<'_>> = active
            .iter_mut()
            .filter(|a| a.failed.is_none() && a.sequence.next_token().is_some())
            .collect();
        while !decoding.is_empty() {
            let policy = decoding[0].policy.clone();
            let (mut group, rest): (Vec<_>, Vec<_>) =
                decoding.into_iter().partition(|a| a.policy.id == policy.id);
            decoding = rest;
            self.metrics.decode_steps.fetch_add(1, Relaxed);
            self.metrics
                .decode_rows
                .fetch_add(group.len() as u64, Relaxed);
            if let Err(e) = decode_together(policy.decoder(model), &mut group) {
                let message = format!("{e:#}");
                for a in group {
                    a.failed = Some(anyhow::anyhow!("decode failed: {message}"));
                }
            }
        }
    }

    /// Hands a finished request back and keeps its KV for the next turn.
    fn complete(&self, active: Active<'_>) {
        let Active {
            sequence,
            policy,
            events,
            done,
            failed,
        } = active;
        if let Some(e) = failed {
            let _ = done.send(Err(e));
            return;
        }
        let prompt = sequence.prompt().to_vec();
        let mut on_text = Active::on_text(&events);
        let (generation, cache) = sequence.finish(&mut on_text);
        self.store_prefix(&policy, &prompt, &generation, cache);
        let _ = done.send(Ok(generation));
    }

    fn store_prefix(
        &self,
        policy: &Policy,
        prompt: &[u32],
        generation: &Generation,
        cache: KvCache,
    ) {
        let metrics = &self.metrics;
        let cached = generation.timing.cached_tokens;
        // The tokens whose KV the cache holds: the prompt (all of it unless
        // cancelled in prefill), then the reply but its last token.
        let mut fed: Vec<u32> = prompt[..cache.len().min(prompt.len())].to_vec();
        let replied = cache.len().saturating_sub(fed.len());
        fed.extend(generation.token_ids.iter().take(replied));
        metrics.prefix_hit_tokens.fetch_add(cached as u64, Relaxed);
        metrics
            .prefix_miss_tokens
            .fetch_add((cache.len().min(prompt.len()) - cached) as u64, Relaxed);
        let live = self.policies.current().id;
        let stored = self.prefix_cache.store(live, policy.id, fed, cache);
        metrics
            .prefix_evictions
            .fetch_add(stored.evicted as u64, Relaxed);
        metrics
            .prefix_bytes
            .store(self.prefix_cache.bytes() as u64, Relaxed);
        metrics
            .prefix_entries
            .store(self.prefix_cache.entries() as u64, Relaxed);
    }
}

/// One decode step of every request in `group` (all of one policy) in one
/// forward pass, then each samples its next token.
fn decode_together(decoder: &Decoder, group: &mut [&mut Active<'_>]) -> Result<()> {
    let tokens: Vec<u32> = group
        .iter()
        .filter_map(|a| a.sequence.next_token())
        .collect();
    let mut caches: Vec<&mut KvCache> = group.iter_mut().map(|a| &mut a.sequence.cache).collect();
    let logits = decoder.decode(&tokens, &mut caches)?;
    for (a, logits) in group.iter_mut().zip(logits) {
        let mut on_text = Active::on_text(&a.events);
        if let Err(e) = a.sequence.accept(&logits, &mut on_text) {
            a.failed = Some(e.context("sampling failed"));
        }
    }
    Ok(())
}
