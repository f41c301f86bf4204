//! The generation loop: prefill the prompt in chunks, then decode one token at a
//! time with a per-request KV cache, until EOS, a stop string, or the token limit.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use super::decoder::{Decoder, KvCache};
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::StreamDecoder;
use super::Model;

/// Prompt tokens per prefill forward pass: bounds the attention scores' memory
/// (heads x chunk x context floats) on long prompts.
const PREFILL_CHUNK: usize = 512;

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
    pub prefill_s: f64,
    pub completion_tokens: usize,
    pub decode_s: f64,
}

impl Timing {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
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
        mut on_text: impl FnMut(&str) -> Flow,
    ) -> Result<Generation> {
        params.validate()?;
        anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
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
        let mut cache = KvCache::new();
        let mut timing = Timing {
            prompt_tokens: prompt_ids.len(),
            ..Default::default()
        };

        let start = Instant::now();
        let mut logits = None;
        for chunk in prompt_ids.chunks(PREFILL_CHUNK) {
            let ids = Tensor::new(chunk, &self.device)?.unsqueeze(0)?;
            logits = Some(decoder.forward_last(&ids, &mut cache)?);
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
            logits = decoder
                .forward_last(&ids, &mut cache)?
                .squeeze(0)?
                .to_vec1()?;
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
