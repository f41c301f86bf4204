//! Teacher forcing: the log-prob of each given response token under a given
//! prompt, for a batch of sequences in one forward pass. Used by `train`
//! (logp_old, logp_new, reference), by `distill-hints` (teacher log-probs) and by
//! `eval ppl`.
//!
//! Sequences are right-padded. Under a causal mask a real token never attends to
//! a later pad, so padding changes no real position's output and needs no
//! attention mask; the pads are simply not read. The LM head (the largest
//! matmul, 49k outputs) runs only on the rows that predict response tokens.
//!
//! A sequence longer than the token budget (an agent's turn after a 10k-token
//! system prompt) runs alone and in parts, so memory follows the budget rather
//! than the length: see [`long_sequence_logits`].

use anyhow::{Context, Result};
use candle_core::{Module, Tensor};

use crate::model::decoder::{Decoder, Kernels};
use crate::model::ops::TokenLogProbs;
use crate::model::KvCache;

/// One prompt and the response tokens to score after it.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    pub prompt: &'a [u32],
    pub response: &'a [u32],
}

/// Positions read per forward when a long sequence is read into a KV cache.
const CACHE_CHUNK: usize = 512;

/// Log-probs of every response token, one 1-D tensor per sequence. If the
/// decoder holds trainable `Var`s and uses differentiable kernels, the tensors
/// carry the graph for `backward`. A single sequence of more than `max_tokens`
/// tokens runs in parts ([`long_sequence_logits`]).
pub fn response_logprobs(
    decoder: &Decoder,
    seqs: &[Sequence],
    max_tokens: usize,
) -> Result<Vec<Tensor>> {
    let (logits, targets, spans) = response_logits(decoder, seqs, max_tokens)?;
    let picked = logits
        .apply_op2(&targets.unsqueeze(1)?, TokenLogProbs)?
        .squeeze(1)?;
    spans
        .iter()
        .map(|&(start, len)| Ok(picked.narrow(0, start, len)?))
        .collect()
}

/// Like [`response_logprobs`], and for each sequence given `extra` ids per
/// response position ((tokens, K) u32), the log-probs of those ids as well
/// ((tokens, K)): the student's side of top-K distillation. The target and the
/// extra ids go through one [`TokenLogProbs`], so the graph holds the logits
/// only, never a (tokens, vocab) log-softmax and its gradient (on Qwen's 152k
/// vocabulary 600 MB each per 1,000 tokens).
pub fn response_logprobs_and(
    decoder: &Decoder,
    seqs: &[Sequence],
    extra: &[Option<Tensor>],
    max_tokens: usize,
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    anyhow::ensure!(
        extra.len() == seqs.len(),
        "one entry of extra ids per sequence"
    );
    let widths = extra
        .iter()
        .map(|ids| ids.as_ref().map(|t| t.dim(1)).transpose())
        .collect::<candle_core::Result<Vec<Option<usize>>>>()?;
    let Some(k) = widths.iter().flatten().copied().max() else {
        let picked = response_logprobs(decoder, seqs, max_tokens)?;
        return Ok(picked.into_iter().map(|t| (t, None)).collect());
    };
    let (logits, targets, spans) = response_logits(decoder, seqs, max_tokens)?;
    // Per response position: its target, then its extra ids, padded to the
    // widest K by repeating the target (columns that are never read).
    let mut ids = Vec::with_capacity(spans.len());
    for ((&(start, len), more), own) in spans.iter().zip(extra).zip(&widths) {
        let target = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let mut row = vec![target.clone()];
        if let Some(more) = more {
            anyhow::ensure!(
                more.dim(0)? == len,
                "extra ids for {} positions, the response has {len}",
                more.dim(0)?
            );
            row.push(more.to_dtype(candle_core::DType::U32)?);
        }
        let own = own.unwrap_or(0);
        if own < k {
            row.push(target.repeat((1, k - own))?);
        }
        ids.push(Tensor::cat(&row, 1)?);
    }
    let ids = Tensor::cat(&ids, 0)?.contiguous()?;
    let picked = logits.apply_op2(&ids, TokenLogProbs)?;
    spans
        .iter()
        .zip(&widths)
        .map(|(&(start, len), own)| {
            let rows = picked.narrow(0, start, len)?;
            let extra = match own {
                Some(own) => Some(rows.narrow(1, 1, *own)?),
                None => None,
            };
            Ok((rows.narrow(1, 0, 1)?.squeeze(1)?, extra))
        })
        .collect()
}

/// (logits (tokens, vocab), target ids (tokens), per-sequence (start, len)).
type Distributions = (Tensor, Tensor, Vec<(usize, usize)>);

/// The logits at every response position, stacked for all sequences: (total
/// response tokens, vocab), with the target ids and each sequence's (start,
/// len) span in it.
fn response_logits(
    decoder: &Decoder,
    seqs: &[Sequence],
    max_tokens: usize,
) -> Result<Distributions> {
    anyhow::ensure!(!seqs.is_empty(), "nothing to score");
    let context = decoder.config.context_length;
    // Input i is prompt ++ response[..len-1]: position p+j-1 predicts response[j].
    let mut lengths = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        anyhow::ensure!(!s.prompt.is_empty(), "sequence {i}: empty prompt");
        anyhow::ensure!(!s.response.is_empty(), "sequence {i}: empty response");
        let n = s.prompt.len() + s.response.len() - 1;
        anyhow::ensure!(
            n < context,
            "sequence {i}: {} prompt + {} response tokens exceed the model's context of {context}",
            s.prompt.len(),
            s.response.len()
        );
        lengths.push(n);
    }
    if let ([s], [n]) = (seqs, lengths.as_slice()) {
        if *n > max_tokens.max(1) {
            return long_sequence_logits(decoder, s, max_tokens.max(1));
        }
    }
    let width = *lengths.iter().max().context("no sequences")?;
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut spans = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        ids.extend_from_slice(s.prompt);
        ids.extend_from_slice(&s.response[..s.response.len() - 1]);
        ids.resize((i + 1) * width, 0);
        spans.push((rows.len(), s.response.len()));
        let first = i * width + s.prompt.len() - 1;
        rows.extend((first..first + s.response.len()).map(|r| r as u32));
        targets.extend_from_slice(s.response);
    }
    let device = decoder.device();
    let ids = Tensor::from_vec(ids, (seqs.len(), width), device)?;
    let hidden = decoder.hidden_sequences(&ids)?;
    let hidden = hidden.reshape((seqs.len() * width, decoder.config.hidden_size))?;
    let rows = Tensor::from_vec(rows, targets.len(), device)?;
    let picked = hidden.index_select(&rows, 0)?;
    let logits = decoder.head().forward(&picked)?;
    let targets = Tensor::from_vec(targets, spans.iter().map(|s| s.1).sum::<usize>(), device)?;
    Ok((logits, targets, spans))
}

/// One sequence longer than `max_tokens`, in parts. The positions before the
/// last `max_tokens` (or before the response, when it is longer) are read into
/// a KV cache with no graph, `max_tokens` (at most [`CACHE_CHUNK`]) at a time; the rest runs after that
/// cache as a fixed context ([`Decoder::hidden_after`]). The values are those of
/// a whole pass, within float rounding. With differentiable kernels the
/// gradient covers the live part only: the context's keys and values are taken
/// as given, as truncated backpropagation through time does with old steps.
/// Fused kernels (scoring) read the live part through the cache too, so memory
/// stays bounded for any length.
fn long_sequence_logits(
    decoder: &Decoder,
    s: &Sequence,
    max_tokens: usize,
) -> Result<Distributions> {
    let mut ids = Vec::with_capacity(s.prompt.len() + s.response.len() - 1);
    ids.extend_from_slice(s.prompt);
    ids.extend_from_slice(&s.response[..s.response.len() - 1]);
    // Position first + j predicts response[j].
    let first = s.prompt.len() - 1;
    let device = decoder.device();
    let row_tensor = |ids: &[u32]| Tensor::from_slice(ids, (1, ids.len()), device);
    let fused = decoder.clone().with_kernels(Kernels::Fused);
    let chunk_len = max_tokens.min(CACHE_CHUNK);
    let mut cache = KvCache::new();
    let hidden = match decoder.kernels {
        Kernels::Fused => {
            let mut picked = Vec::new();
            for (c, chunk) in ids.chunks(chunk_len).enumerate() {
                let start = c * chunk_len;
                let hidden = fused.hidden_with_cache(&row_tensor(chunk)?, &mut cache)?;
                let end = start + chunk.len();
                if end > first {
                    let from = first.max(start);
                    picked.push(hidden.squeeze(0)?.narrow(0, from - start, end - from)?);
                }
            }
            Tensor::cat(&picked, 0)?
        }
        Kernels::Differentiable => {
            let split = ids.len().saturating_sub(max_tokens).min(first);
            for chunk in ids[..split].chunks(chunk_len) {
                fused.hidden_with_cache(&row_tensor(chunk)?, &mut cache)?;
            }
            let live = decoder.hidden_after(&row_tensor(&ids[split..])?, &cache)?;
            live.squeeze(0)?
                .narrow(0, first - split, ids.len() - first)?
        }
    };
    let logits = decoder.head().forward(&hidden)?;
    let targets = Tensor::from_slice(s.response, s.response.len(), device)?;
    Ok((logits, targets, vec![(0, s.response.len())]))
}

/// Scores without gradients, as plain vectors, in groups of at most
/// `max_tokens` padded tokens per forward (memory stays bounded on long
/// inputs). Uses the fused kernels: the fastest path, same function.
pub fn score(decoder: &Decoder, seqs: &[Sequence], max_tokens: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    let fused = decoder.clone().with_kernels(Kernels::Fused);
    for group in token_groups(seqs, max_tokens) {
        for t in response_logprobs(&fused, &seqs[group], max_tokens)? {
            out.push(t.to_vec1()?);
        }
    }
    Ok(out)
}

/// The top-`k` of the distribution at each response position: per sequence,
/// per token, (ids, log-probs) sorted by log-prob, highest first.
pub type TopK = Vec<Vec<TokenTopK>>;

/// One position's top-`k`: (ids, log-probs), highest first.
pub type TokenTopK = (Vec<i32>, Vec<f32>);

/// Like [`score`], also returning the top-`k` distribution per token. Reads
/// the logits in place (a row's log-softmax is its logits less their
/// log-sum-exp, which keeps the order), so a group costs one (tokens, vocab)
/// tensor, not three.
pub fn score_with_topk(
    decoder: &Decoder,
    seqs: &[Sequence],
    k: usize,
    max_tokens: usize,
) -> Result<(Vec<Vec<f32>>, TopK)> {
    use rayon::prelude::*;
    let mut logprobs = Vec::with_capacity(seqs.len());
    let mut topk = Vec::with_capacity(seqs.len());
    let fused = decoder.clone().with_kernels(Kernels::Fused);
    for group in token_groups(seqs, max_tokens) {
        let (logits, targets, spans) = response_logits(&fused, &seqs[group], max_tokens)?;
        let logits = logits.contiguous()?;
        let vocab = logits.dim(1)?;
        let targets: Vec<u32> = targets.to_vec1()?;
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!("response id {bad} is outside the vocabulary of {vocab}");
        }
        let view = crate::model::ops::f32_view(&logits, "score-topk")?;
        let per_token: Vec<(f32, TokenTopK)> = view
            .par_chunks(vocab)
            .zip(&targets)
            .map(|(row, &target)| {
                let lse = TokenLogProbs::log_sum_exp(row);
                let (ids, top) = top_k(row, k);
                let top = top.into_iter().map(|l| l - lse).collect();
                (row[target as usize] - lse, (ids, top))
            })
            .collect();
        for (start, len) in spans {
            let (lp, tk) = per_token[start..start + len].iter().cloned().unzip();
            logprobs.push(lp);
            topk.push(tk);
        }
    }
    Ok((logprobs, topk))
}

fn top_k(row: &[f32], k: usize) -> (Vec<i32>, Vec<f32>) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    (
        idx.iter().map(|&i| i as i32).collect(),
        idx.iter().map(|&i| row[i]).collect(),
    )
}

/// Consecutive index ranges whose padded size (count × longest) stays within
/// `max_tokens` (a single longer sequence gets a group of its own).
pub fn token_groups(seqs: &[Sequence], max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut longest = 0;
    for (i, s) in seqs.iter().enumerate() {
        let len = s.prompt.len() + s.response.len();
        let widened = longest.max(len);
        if i > start && widened * (i - start + 1) > max_tokens {
            groups.push(start..i);
            start = i;
            longest = len;
        } else {
            longest = widened;
        }
    }
    if start < seqs.len() {
        groups.push(start..seqs.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_respect_the_token_budget() {
        let p = [1u32; 10];
        let r = [2u32; 10];
        let seqs = vec![
            Sequence {
                prompt: &p,
                response: &r
            };
            5
        ];
        // 20 tokens each: 3 fit in 64.
        assert_eq!(token_groups(&seqs, 64), vec![0..3, 3..5]);
        assert_eq!(token_groups(&seqs, 10), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
    }

    /// The reference: the full log-softmax at every response position.
    fn response_distributions(
        decoder: &Decoder,
        seqs: &[Sequence],
        max_tokens: usize,
    ) -> Result<Distributions> {
        let (logits, targets, spans) = response_logits(decoder, seqs, max_tokens)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        Ok((log_probs, targets, spans))
    }

    /// The target and extra ids through one fused op give what the full
    /// log-softmax gives, for sequences with extras of different K and none.
    #[test]
    fn extra_ids_score_as_the_full_log_softmax_does() {
        use crate::model::testing::{write_tiny_gguf, TinySpec};
        use crate::model::{Model, WeightFormat};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).unwrap();
        let model = Model::load_with(&path, WeightFormat::F32).unwrap();
        let decoder = &model.decoder;
        let device = decoder.device();
        let (p1, r1, p2, r2, p3, r3) = (
            [1u32, 104, 105],
            [110u32, 111, 2],
            [1u32, 120],
            [121u32, 2],
            [1u32, 130, 131, 132],
            [133u32, 134, 135, 2],
        );
        let seqs = [
            Sequence {
                prompt: &p1,
                response: &r1,
            },
            Sequence {
                prompt: &p2,
                response: &r2,
            },
            Sequence {
                prompt: &p3,
                response: &r3,
            },
        ];
        let ids =
            |v: Vec<u32>, k: usize| Tensor::from_vec(v.clone(), (v.len() / k, k), device).unwrap();
        let extra = [
            Some(ids(vec![5, 6, 7, 8, 9, 10], 2)),
            None,
            Some(ids(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 3)),
        ];
        let got = response_logprobs_and(decoder, &seqs, &extra, 4096).unwrap();
        let (full, targets, spans) = response_distributions(decoder, &seqs, 4096).unwrap();
        let picked = full
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        for (i, ((lp, more), &(start, len))) in got.iter().zip(&spans).enumerate() {
            let want = picked.narrow(0, start, len).unwrap();
            let d = crate::model::testing::max_abs_diff(lp, &want);
            assert!(d < 1e-5, "sequence {i}: target log-probs differ by {d}");
            match (&extra[i], more) {
                (Some(ids), Some(more)) => {
                    let want = full.narrow(0, start, len).unwrap().gather(ids, 1).unwrap();
                    assert_eq!(more.dims(), want.dims(), "sequence {i}");
                    let d = crate::model::testing::max_abs_diff(more, &want);
                    assert!(d < 1e-5, "sequence {i}: extra log-probs differ by {d}");
                }
                (None, None) => {}
                (want, got) => panic!("sequence {i}: extras {want:?}, got {got:?}"),
            }
        }

        // Scoring's top-K, read from the logits in place, is the full
        // log-softmax's top-K.
        let (lps, topk) = score_with_topk(decoder, &seqs, 4, 4096).unwrap();
        let full: Vec<Vec<f32>> = full.to_vec2().unwrap();
        let picked: Vec<f32> = picked.to_vec1().unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        let (lps, topk): (Vec<f32>, Vec<_>) = (lps.concat(), topk.concat());
        assert_eq!((lps.len(), topk.len()), (full.len(), full.len()));
        assert!(close(&lps, &picked));
        for (row, (ids, top)) in full.iter().zip(&topk) {
            let (want_ids, want_top) = top_k(row, 4);
            assert_eq!(ids, &want_ids);
            assert!(close(top, &want_top), "{top:?} vs {want_top:?}");
        }
    }

    #[test]
    fn an_id_outside_the_vocabulary_is_an_error_not_a_panic() {
        use crate::model::testing::{write_tiny_gguf, TinySpec};
        use crate::model::{Model, WeightFormat};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).unwrap();
        let model = Model::load_with(&path, WeightFormat::F32).unwrap();
        let seq = [Sequence {
            prompt: &[1, 104],
            response: &[105, 9_999_999],
        }];
        let err = score_with_topk(&model.decoder, &seq, 2, 4096).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn top_k_is_sorted() {
        let (ids, lps) = top_k(&[0.1, 0.5, -1.0, 0.3], 2);
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(lps, vec![0.5, 0.3]);
    }
}
