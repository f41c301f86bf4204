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
        params.validate()?;
        anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
        anyhow::ensure!(
            cache.len() < prompt_ids.len(),
            "the cached prefix ({} tokens) must leave at least one of the prompt's {} tokens \
             to prefill",
            cache.len(),
            prompt_ids.len()
        );
        let context = self.config.context_length;
        anyhow::ensure!(
            prompt_ids.len() < context,
            "the prompt has {} tokens; the model's context length is {context}",
            prompt_ids.len()
        );
        if let Some(&bad) = prompt_ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            anyhow::bail!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            );
        }
        let max_tokens = params.max_tokens.min(context - prompt_ids.len());
        let mut sampler = Sampler::new(params.clone());
        let mut timing = Timing {
            prompt_tokens: prompt_ids.len(),
            cached_tokens: cache.len(),
            ..Default::default()
        };

        let start = Instant::now();
        let mut logits = None;
        for chunk in prompt_ids[cache.len()..].chunks(PREFILL_CHUNK) {
            if cancelled() {
                timing.prefill_s = start.elapsed().as_secs_f64();
                return Ok(Generation {
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    top_logprobs: Vec::new(),
                    text: String::new(),
                    finish_reason: FinishReason::Cancelled,
                    timing,
                });
            }
            let ids = Tensor::new(chunk, &self.device)?.unsqueeze(0)?;
            logits = Some(decoder.forward_last(&ids, cache)?);
        }
        let mut logits: Vec<f32> = match logits {
            Some(l) => l.squeeze(0)?.to_vec1()?,
            None => unreachable!("prompt checked non-empty"),
        };
        timing.prefill_s = start.elapsed().as_secs_f64();

        let decode_start = Instant::now();
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        let mut text = StreamDecoder::new();
        let mut released = 0; // bytes of text already given to on_text
        let mut finish = FinishReason::Length;
        let mut stop_at = None;
        while token_ids.len() < max_tokens {
            let sampled = sampler.sample(&logits);
            token_ids.push(sampled.token);
            logprobs.push(sampled.logprob);
            if params.top_logprobs > 0 {
                top_logprobs.push(super::sampling::top_logprobs(&logits, params.top_logprobs));
            }
            if !params.ignore_eos && self.tokenizer.is_eos(sampled.token) {
                finish = FinishReason::Stop;
                break;
            }
            if text.push(&self.tokenizer, sampled.token)?.is_some() {
                let full = text.text();
                if let Some(pos) = find_stop(full, &params.stop, released) {
                    stop_at = Some(pos);
                    finish = FinishReason::Stop;
                    break;
                }
                let safe = full.len() - held_back(full, &params.stop);
                if safe > released {
                    if on_text(&full[released..safe]) == Flow::Cancel {
                        finish = FinishReason::Cancelled;
                        break;
                    }
                    released = safe;
                }
            }
            if token_ids.len() == max_tokens {
                break;
            }
            let ids = Tensor::new(&[sampled.token], &self.device)?.unsqueeze(0)?;
            logits = decoder.forward_last(&ids, cache)?.squeeze(0)?.to_vec1()?;
        }
        let mut reply = text.text().to_string();
        if let Some(pos) = stop_at {
            reply.truncate(pos);
        }
        if reply.len() > released && finish != FinishReason::Cancelled {
            on_text(&reply[released..]);
        }
        timing.completion_tokens = token_ids.len();
        timing.decode_s = decode_start.elapsed().as_secs_f64();
        Ok(Generation {
            token_ids,
            logprobs,
            top_logprobs,
            text: reply,
            finish_reason: finish,
            timing,
        })
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
        // Both continue exactly like a fresh prefill of the same 30 tokens.
        let mut fresh = KvCache::new();
        let want = prefill(&model.decoder, &ids[..30], &mut fresh);
        let mut copy = copy;
        for c in [&mut cache, &mut copy] {
            let got = prefill(&model.decoder, &ids[10..30], c);
            assert!(max_diff(&want, &got) < 1e-5);
        }
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
