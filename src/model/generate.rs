//! The generation loop: prefill the prompt in chunks (after any prefix whose KV
//! the caller already has), then decode one token at a time with a per-request KV
//! cache, until EOS, a stop string, or the token limit.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use super::decoder::{Decoder, KvCache};
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::StreamDecoder;
use super::Model;

/// Prompt tokens per prefill forward pass: bounds the attention scores' memory
/// (heads x chunk x context floats) on long prompts, and is how often a long
/// prefill asks whether to go on.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// max_tokens or the context length was reached.
    Length,
    /// The caller asked to stop (e.g. the client went away).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from a cache (not run through the model).
    pub cached_tokens: usize,
    pub prefill_s: f64,
    pub completion_tokens: usize,
    pub decode_s: f64,
}

impl Timing {
    /// Prompt tokens run through the model.
    pub fn prefilled_tokens(&self) -> usize {
        self.prompt_tokens - self.cached_tokens
    }

    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefilled_tokens() as f64 / self.prefill_s.max(1e-9)
    }

    /// Decode speed counts the tokens after the first: the first comes out of prefill.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Every sampled token, including an EOS or the tokens that formed a stop
    /// string: these ids are the policy's actions, never re-tokenised.
    pub token_ids: Vec<u32>,
    /// Log-prob of each sampled token under the model's unmodified softmax
    /// (before temperature/top-k/top-p), one per entry of `token_ids`.
    pub logprobs: Vec<f32>,
    /// With `top_logprobs > 0`: the most likely tokens at each step, one list per
    /// entry of `token_ids`.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The reply text: special tokens and any stop string (and what follows) removed.
    pub text: String,
    pub finish_reason: FinishReason,
    pub timing: Timing,
}

/// What the streaming callback tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

impl Model {
    /// Generates a reply to `prompt_ids`. `on_text` receives text as it becomes
    /// final (never a piece that might turn out to be part of a stop string) and
    /// may cancel.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> Flow,
    ) -> Result<Generation> {
        self.generate_with(&self.decoder, prompt_ids, params, on_text)
    }

    /// [`generate`](Self::generate) with another decoder for this model's
    /// tokenizer and config: `claw serve` passes the decoder of the policy it
    /// serves (the base decoder with a LoRA adapter on).
    pub fn generate_with(
        &self,
        decoder: &Decoder,
        prompt_ids: &[u32],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> Flow,
    ) -> Result<Generation> {
        let mut cache = KvCache::new();
        self.generate_cached(decoder, prompt_ids, &mut cache, params, || false, on_text)
    }

    /// [`generate_with`](Self::generate_with) after `cache`, which must hold the
    /// KV of the first `cache.len()` tokens of `prompt_ids` computed by this same
    /// `decoder` (a prefix cache hit; empty for none): only the rest of the
    /// prompt is prefilled. `cancelled` is asked before each prefill chunk, so a
    /// long prefill stops soon after the client has gone (decode stops through
    /// `on_text`). On return `cache` holds every token fed to the model: the
    /// prompt (or as much of it as was prefilled before a cancel) and the
    /// sampled tokens but the last.
    pub fn generate_cached(
        &self,
        decoder: &Decoder,
        prompt_ids: &[u32],
        cache: &mut KvCache,
        params: &SamplingParams,
        mut cancelled: impl FnMut() -> bool,
        mut on_text: impl FnMut(&str) -> Flow,
    ) -> Result<Generation> {
        let mut sequence = Sequence::new(
            self,
            prompt_ids.to_vec(),
            std::mem::take(cache),
            params.clone(),
        )?;
        let result = (|| {
            while sequence.is_prefilling() {
                if cancelled() {
                    sequence.cancel();
                    break;
                }
                sequence.prefill_chunk(decoder, &mut on_text)?;
            }
            while let Some(token) = sequence.next_token() {
                let logits = decoder.decode(&[token], &mut [&mut sequence.cache])?;
                sequence.accept(&logits[0], &mut on_text)?;
            }
            anyhow::Ok(())
        })();
        if let Err(e) = result {
            *cache = sequence.cache;
            return Err(e);
        }
        let (generation, kv) = sequence.finish(&mut on_text);
        *cache = kv;
        Ok(generation)
    }
}

/// Where a [`Sequence`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Prompt tokens are left to run through the model.
    Prefill,
    /// `next` was sampled and is fed next.
    Decode {
        next: u32,
    },
    Done(FinishReason),
}

/// One request's generation taken one step at a time: prompt chunks, then one
/// token per step. [`Model::generate_cached`] runs one alone; `claw serve` runs
/// many side by side, feeding the decode steps of all of them to one batched
/// forward pass ([`Decoder::decode`]). Either way the same calls happen in the
/// same order, so the tokens and log-probs are the same.
pub struct Sequence<'m> {
    model: &'m Model,
    prompt: Vec<u32>,
    params: SamplingParams,
    sampler: Sampler,
    max_tokens: usize,
    /// The KV of every token fed so far (public so a batch can lend it out).
    pub cache: KvCache,
    phase: Phase,
    timing: Timing,
    started: Instant,
    decode_started: Option<Instant>,
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    text: StreamDecoder,
    /// Bytes of text already given to `on_text`.
    released: usize,
    stop_at: Option<usize>,
}

impl<'m> Sequence<'m> {
    /// A generation of a reply to `prompt`, after `cache` (the KV of a prefix of
    /// `prompt`, possibly empty). Checks the prompt and the parameters.
    pub fn new(
        model: &'m Model,
        prompt: Vec<u32>,
        cache: KvCache,
        params: SamplingParams,
    ) -> Result<Self> {
        params.validate()?;
        anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
        anyhow::ensure!(
            cache.len() < prompt.len(),
            "the cached prefix ({} tokens) must leave at least one of the prompt's {} tokens \
             to prefill",
            cache.len(),
            prompt.len()
        );
        let context = model.config.context_length;
        anyhow::ensure!(
            prompt.len() < context,
            "the prompt has {} tokens; the model's context length is {context}",
            prompt.len()
        );
        if let Some(&bad) = prompt
            .iter()
            .find(|&&id| id as usize >= model.config.vocab_size)
        {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                model.config.vocab_size
            );
        }
        let max_tokens = params.max_tokens.min(context - prompt.len());
        let timing = Timing {
            prompt_tokens: prompt.len(),
            cached_tokens: cache.len(),
            ..Default::default()
        };
        Ok(Self {
            model,
            sampler: Sampler::new(params.clone()),
            params,
            prompt,
            max_tokens,
            cache,
            phase: Phase::Prefill,
            timing,
            started: Instant::now(),
            decode_started: None,
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text: StreamDecoder::new(),
            released: 0,
            stop_at: None,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn is_prefilling(&self) -> bool {
        self.phase == Phase::Prefill
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    /// The prompt tokens not yet run through the model.
    pub fn prompt_left(&self) -> usize {
        match self.phase {
            Phase::Prefill => self.prompt.len() - self.cache.len(),
            _ => 0,
        }
    }

    /// The sampled token to feed next, while decoding.
    pub fn next_token(&self) -> Option<u32> {
        match self.phase {
            Phase::Decode { next } => Some(next),
            _ => None,
        }
    }

    /// Stops here (the client went away): the reply is not finished.
    pub fn cancel(&mut self) {
        if !self.is_done() {
            self.end(FinishReason::Cancelled);
        }
    }

    /// Runs the next chunk of at most [`PREFILL_CHUNK`] prompt tokens; after the
    /// last one, samples the first token (which may already end the reply).
    pub fn prefill_chunk(
        &mut self,
        decoder: &Decoder,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<()> {
        self.prefill_at_most(PREFILL_CHUNK, decoder, on_text)
    }

    /// [`prefill_chunk`](Self::prefill_chunk) of at most `tokens` (at least 1)
    /// prompt tokens: a batch shares one chunk's worth among its new requests.
    pub fn prefill_at_most(
        &mut self,
        tokens: usize,
        decoder: &Decoder,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<()> {
        anyhow::ensure!(self.is_prefilling(), "the prompt is already prefilled");
        let start = self.cache.len();
        let end = (start + tokens.clamp(1, PREFILL_CHUNK)).min(self.prompt.len());
        let ids = Tensor::new(&self.prompt[start..end], &self.model.device)?.unsqueeze(0)?;
        let logits = decoder.forward_last(&ids, &mut self.cache)?;
        if end < self.prompt.len() {
            return Ok(());
        }
        let logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        self.timing.prefill_s = self.started.elapsed().as_secs_f64();
        self.decode_started = Some(Instant::now());
        if self.max_tokens == 0 {
            self.end(FinishReason::Length);
            return Ok(());
        }
        self.accept(&logits, on_text)
    }

    /// Samples from the logits that followed the last token fed, and releases
    /// the text that became final. Ends the reply at EOS, a stop string, the
    /// token limit, or when `on_text` cancels.
    pub fn accept(&mut self, logits: &[f32], on_text: &mut dyn FnMut(&str) -> Flow) -> Result<()> {
        anyhow::ensure!(!self.is_done(), "the reply is already finished");
        let sampled = self.sampler.sample(logits);
        self.token_ids.push(sampled.token);
        self.logprobs.push(sampled.logprob);
        if self.params.top_logprobs > 0 {
            self.top_logprobs.push(super::sampling::top_logprobs(
                logits,
                self.params.top_logprobs,
            ));
        }
        let tokenizer = &self.model.tokenizer;
        if !self.params.ignore_eos && tokenizer.is_eos(sampled.token) {
            self.end(FinishReason::Stop);
            return Ok(());
        }
        if self.text.push(tokenizer, sampled.token)?.is_some() {
            let full = self.text.text();
            if let Some(pos) = find_stop(full, &self.params.stop, self.released) {
                self.stop_at = Some(pos);
                self.end(FinishReason::Stop);
                return Ok(());
            }
            let safe = full.len() - held_back(full, &self.params.stop);
            if safe > self.released {
                if on_text(&full[self.released..safe]) == Flow::Cancel {
                    self.end(FinishReason::Cancelled);
                    return Ok(());
                }
                self.released = safe;
            }
        }
        self.phase = match self.token_ids.len() >= self.max_tokens {
            true => Phase::Done(FinishReason::Length),
            false => Phase::Decode {
                next: sampled.token,
            },
        };
        Ok(())
    }

    fn end(&mut self, reason: FinishReason) {
        self.phase = Phase::Done(reason);
    }

    /// The reply and the cache (every token fed: the prompt, or as much of it
    /// as was prefilled, and the sampled tokens but the last). Text held back
    /// for a possible stop string is released to `on_text` now.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str) -> Flow) -> (Generation, KvCache) {
        let finish_reason = match self.phase {
            Phase::Done(reason) => reason,
            // Finished early by an error: what was generated, cut off.
            _ => FinishReason::Length,
        };
        if self.decode_started.is_none() {
            self.timing.prefill_s = self.started.elapsed().as_secs_f64();
        }
        let mut reply = self.text.text().to_string();
        if let Some(pos) = self.stop_at {
            reply.truncate(pos);
        }
        if reply.len() > self.released && finish_reason != FinishReason::Cancelled {
            on_text(&reply[self.released..]);
        }
        self.timing.completion_tokens = self.token_ids.len();
        self.timing.decode_s = self
            .decode_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        let generation = Generation {
            token_ids: self.token_ids,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            text: reply,
            finish_reason,
            timing: self.timing,
        };
        (generation, self.cache)
    }
}

/// Byte offset of the earliest stop string in `text`, looking only where a new
/// match can start (a match must end in text not yet released).
fn find_stop(text: &str, stops: &[String], released: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| {
            let mut from = released.saturating_sub(stop.len().saturating_sub(1));
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(stop.as_str()).map(|p| from + p)
        })
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string:
/// that much must be held back, since the next token may complete the stop.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .rev()
                .filter(|&n| stop.is_char_boundary(n))
                .find(|&n| text.ends_with(&stop[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{write_tiny_gguf, TinySpec};

    /// The tiny model with room for prompts longer than one prefill chunk.
    fn tiny_long_model() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = TinySpec {
            context: 2048,
            ..TinySpec::default()
        };
        write_tiny_gguf(&path, &spec).unwrap();
        Model::load(&path).unwrap()
    }

    fn random_ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(3..vocab as u32)).collect()
    }

    fn prefill(decoder: &Decoder, ids: &[u32], cache: &mut KvCache) -> Vec<f32> {
        let mut logits = Vec::new();
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let t = Tensor::new(chunk, decoder.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            logits = decoder
                .forward_last(&t, cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        logits
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A prompt prefilled after a cached prefix (the cache of an earlier, longer
    /// sequence that diverged from it, cut back to the shared part) gives the
    /// same last logits and the same greedy reply as prefilling it whole.
    #[test]
    fn a_cached_prefix_changes_neither_logits_nor_greedy_text() {
        let model = tiny_long_model();
        let vocab = model.config.vocab_size;
        let prompt = random_ids(700, 1, vocab); // crosses a chunk boundary
        let shared = 600;
        // The earlier request: the same first 600 tokens, then something else.
        let mut earlier = prompt[..shared].to_vec();
        earlier.extend(random_ids(150, 2, vocab));
        let mut stored = KvCache::new();
        prefill(&model.decoder, &earlier, &mut stored);
        assert_eq!(stored.len(), 750);
        // An identical earlier prompt (the client re-sent it).
        let mut identical = KvCache::new();
        prefill(&model.decoder, &prompt, &mut identical);

        let whole = prefill(&model.decoder, &prompt, &mut KvCache::new());
        let resume = |reuse: usize| -> Vec<f32> {
            let mut cache = match reuse <= shared {
                true => stored.prefix(reuse),
                false => identical.prefix(reuse),
            };
            assert_eq!(cache.len(), reuse);
            prefill(&model.decoder, &prompt[reuse..], &mut cache)
        };
        // A long rest runs through the same kernels as the whole prefill.
        for reuse in [1, 300, 512, shared, 650] {
            let d = max_diff(&whole, &resume(reuse));
            assert!(d < 1e-5, "reusing {reuse} tokens moved the logits by {d}");
        }
        // A short rest takes other kernels (the decode step for one token, the
        // packed block kernel under 16 rows, GEMM tiles sized by rows), as a
        // whole prefill's short last chunk does: the same products summed in
        // another order, a few 1e-5 of the largest logit (~29 here).
        for reuse in [680, 690, 698, 699] {
            let d = max_diff(&whole, &resume(reuse));
            assert!(d < 1e-3, "reusing {reuse} tokens moved the logits by {d}");
        }

        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let plain = model
            .generate(&prompt, &params, |_| Flow::Continue)
            .unwrap();
        assert_eq!(plain.timing.cached_tokens, 0);
        for (reuse, source) in [(shared, &stored), (699, &identical)] {
            let mut cache = source.prefix(reuse);
            let cached = model
                .generate_cached(
                    &model.decoder,
                    &prompt,
                    &mut cache,
                    &params,
                    || false,
                    |_| Flow::Continue,
                )
                .unwrap();
            assert_eq!(cached.token_ids, plain.token_ids, "reusing {reuse}");
            assert_eq!(cached.text, plain.text);
            assert!(max_diff(&cached.logprobs, &plain.logprobs) < 2e-3);
            assert_eq!(cached.timing.cached_tokens, reuse);
            assert_eq!(cached.timing.prefilled_tokens(), prompt.len() - reuse);
            // The cache now holds the prompt and every sampled token but the last.
            assert_eq!(cache.len(), prompt.len() + 24 - 1);
        }
    }

    #[test]
    fn prefix_and_truncate_keep_the_first_positions() {
        let model = tiny_long_model();
        let ids = random_ids(40, 3, model.config.vocab_size);
        let mut cache = KvCache::new();
        prefill(&model.decoder, &ids, &mut cache);
        let full_bytes = cache.bytes();
        let copy = cache.prefix(10);
        assert_eq!(copy.len(), 10);
        assert!(
            copy.bytes() * 3 < full_bytes,
            "a prefix copies only its positions"
        );
        assert_eq!(cache.prefix(100).len(), 40);
        cache.truncate(10);
        cache.shrink_to_fit();
        assert_eq!(cache.len(), 10);
        assert_eq!(cache.bytes(), copy.bytes());
        // Both continue like a fresh prefill of the same 30 tokens (within the
        // 16-bit rounding by which a 40-row and a 30-row chunk's kernels differ,
        // ~5e-4), and exactly like each other.
        let mut fresh = KvCache::new();
        let want = prefill(&model.decoder, &ids[..30], &mut fresh);
        let mut copy = copy;
        let from_truncated = prefill(&model.decoder, &ids[10..30], &mut cache);
        let from_prefix = prefill(&model.decoder, &ids[10..30], &mut copy);
        assert_eq!(from_truncated, from_prefix);
        let gap = max_diff(&want, &from_prefix);
        assert!(gap < 2e-3, "gap {gap}");
    }

    /// A cancel asked for before a chunk stops the prefill there, keeping what
    /// was computed.
    #[test]
    fn a_cancelled_prefill_stops_between_chunks() {
        let model = tiny_long_model();
        let prompt = random_ids(1200, 4, model.config.vocab_size);
        let mut asked = 0;
        let mut cache = KvCache::new();
        let g = model
            .generate_cached(
                &model.decoder,
                &prompt,
                &mut cache,
                &SamplingParams::default(),
                || {
                    asked += 1;
                    asked > 2
                },
                |_| Flow::Continue,
            )
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert!(g.token_ids.is_empty());
        assert_eq!(cache.len(), 2 * PREFILL_CHUNK);
        assert_eq!(asked, 3);
    }

    /// Requests decoded together get exactly the tokens and log-probs each gets
    /// alone, whatever joins or leaves the batch between steps: continuous
    /// batching must not change what is recorded. Packed (block-quantized) and
    /// f32 weights, greedy and seeded sampling, a late joiner, a stop string.
    #[test]
    fn a_batch_decodes_each_request_as_it_would_alone() {
        use candle_core::quantized::GgmlDType;
        for linear_dtype in [Some(GgmlDType::Q4_0), Some(GgmlDType::Q8_0), None] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            let spec = TinySpec {
                context: 1024,
                linear_dtype,
                ..TinySpec::default()
            };
            write_tiny_gguf(&path, &spec).unwrap();
            let model = Model::load(&path).unwrap();
            let vocab = model.config.vocab_size;
            let requests: Vec<(Vec<u32>, SamplingParams)> = vec![
                (
                    random_ids(40, 1, vocab),
                    SamplingParams {
                        temperature: 0.0,
                        max_tokens: 12,
                        ignore_eos: true,
                        ..Default::default()
                    },
                ),
                (
                    random_ids(700, 2, vocab),
                    SamplingParams {
                        temperature: 0.9,
                        seed: Some(7),
                        max_tokens: 20,
                        ignore_eos: true,
                        top_logprobs: 3,
                        ..Default::default()
                    },
                ),
                (
                    random_ids(9, 3, vocab),
                    SamplingParams {
                        temperature: 0.8,
                        top_p: 0.9,
                        seed: Some(3),
                        max_tokens: 6,
                        ..Default::default()
                    },
                ),
                (
                    random_ids(25, 4, vocab),
                    SamplingParams {
                        temperature: 0.0,
                        max_tokens: 15,
                        stop: vec!["e".into()],
                        ..Default::default()
                    },
                ),
            ];
            let alone: Vec<Generation> = requests
                .iter()
                .map(|(prompt, params)| model.generate(prompt, params, |_| Flow::Continue).unwrap())
                .collect();

            // The last request joins after three steps, as in `claw serve`.
            let decoder = &model.decoder;
            let mut active: Vec<(usize, Sequence)> = Vec::new();
            let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
            let mut on_text = |_: &str| Flow::Continue;
            for step in 0.. {
                for (i, (prompt, params)) in requests.iter().enumerate() {
                    let joins = if i == 3 { step == 3 } else { step == 0 };
                    if joins {
                        let seq =
                            Sequence::new(&model, prompt.clone(), KvCache::new(), params.clone())
                                .unwrap();
                        active.push((i, seq));
                    }
                }
                for (_, seq) in active.iter_mut().filter(|(_, s)| s.is_prefilling()) {
                    seq.prefill_chunk(decoder, &mut on_text).unwrap();
                }
                let mut decoding: Vec<&mut (usize, Sequence)> = active
                    .iter_mut()
                    .filter(|(_, s)| s.next_token().is_some())
                    .collect();
                let tokens: Vec<u32> = decoding
                    .iter()
                    .map(|(_, s)| s.next_token().unwrap())
                    .collect();
                if !tokens.is_empty() {
                    let mut caches: Vec<&mut KvCache> =
                        decoding.iter_mut().map(|(_, s)| &mut s.cache).collect();
                    let logits = decoder.decode(&tokens, &mut caches).unwrap();
                    for ((_, seq), logits) in decoding.iter_mut().zip(logits) {
                        seq.accept(&logits, &mut on_text).unwrap();
                    }
                }
                for (i, seq) in std::mem::take(&mut active) {
                    if seq.is_done() {
                        done[i] = Some(seq.finish(&mut on_text).0);
                    } else {
                        active.push((i, seq));
                    }
                }
                if active.is_empty() && step > 3 {
                    break;
                }
            }
            for (i, (alone, batched)) in alone.iter().zip(&done).enumerate() {
                let batched = batched.as_ref().unwrap();
                let what = format!("{linear_dtype:?} request {i}");
                assert_eq!(batched.token_ids, alone.token_ids, "{what}: tokens");
                assert_eq!(batched.logprobs, alone.logprobs, "{what}: log-probs");
                assert_eq!(batched.top_logprobs, alone.top_logprobs, "{what}");
                assert_eq!(batched.text, alone.text, "{what}: text");
                assert_eq!(batched.finish_reason, alone.finish_reason, "{what}");
            }
            assert!(alone[1].token_ids.len() == 20 && alone[0].token_ids.len() == 12);
        }
    }

    #[test]
    fn stop_search_and_hold_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc END x", &stops, 0), Some(4));
        assert_eq!(find_stop("a\n\nEND", &stops, 0), Some(1));
        assert_eq!(find_stop("abcEN", &stops, 0), None);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        // a stop string straddling what was already released is still found
        assert_eq!(find_stop("xxEND", &stops, 3), Some(2));
    }
}
