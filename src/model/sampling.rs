//! Choosing the next token from the model's logits.
//!
//! The log-prob recorded for a sampled token is always taken from the model's own
//! distribution, `log_softmax(logits)[token]`, before temperature, top-k or top-p
//! reshape it. That is the policy's probability of the action, which is what
//! training (importance ratios, KL) needs; the sampling knobs only change how we
//! explore.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Seed for reproducible sampling; None draws one from the OS.
    pub seed: Option<u64>,
    /// Upper bound on generated tokens (the context length also bounds it).
    pub max_tokens: usize,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Also report this many most likely tokens (and log-probs) at each step.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be >= 0, got {}",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1], got {}",
            self.top_p
        );
        anyhow::ensure!(self.max_tokens > 0, "max_tokens must be at least 1");
        anyhow::ensure!(
            self.stop.iter().all(|s| !s.is_empty()),
            "stop strings must not be empty"
        );
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// A sampled token and its log-prob under the unmodified model distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_tempered(logits)
        };
        Sampled {
            token: token as u32,
            logprob: log_softmax_at(logits, token),
        }
    }

    fn sample_tempered(&mut self, logits: &[f32]) -> usize {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates sorted by probability only when a filter needs the order.
        let mut candidates: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l - max) * inv_t).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(k);
        }
        if self.params.top_p < 1.0 {
            candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let total: f32 = candidates.iter().map(|c| c.1).sum();
            let threshold = self.params.top_p * total;
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1;
                if cumulative >= threshold {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.gen::<f32>() * total;
        for &(i, p) in &candidates {
            if draw < p {
                return i;
            }
            draw -= p;
        }
        // Rounding left a sliver of mass: the last candidate takes it.
        candidates
            .last()
            .map(|c| c.0)
            .unwrap_or_else(|| argmax(logits))
    }
}

pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// `log_softmax(logits)[index]`, stable, with the normaliser summed in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[index] - max) - sum.ln()) as f32
}

/// The `k` most likely tokens of `logits` with their log-probs (untempered),
/// most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .map(|i| (i as u32, logits[i] - log_sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_untempered_logprob() {
        let logits = [1.0, 3.0, 2.0];
        let s = Sampler::new(params(0.0, 1.0, 0, 0)).sample(&logits);
        assert_eq!(s.token, 1);
        let expected = 3.0 - (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((f64::from(s.logprob) - expected).abs() < 1e-6);
    }

    #[test]
    fn top_logprobs_are_sorted_log_softmax_values() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let top = top_logprobs(&logits, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 - log_softmax_at(&logits, 1)).abs() < 1e-6);
        assert!((top[1].1 - log_softmax_at(&logits, 2)).abs() < 1e-6);
        assert!(top_logprobs(&logits, 0).is_empty());
        assert_eq!(top_logprobs(&logits, 9).len(), 4);
    }

    #[test]
    fn logprob_ignores_temperature() {
        let logits = [0.5, 0.2, 0.1, -1.0];
        let mut hot = Sampler::new(params(5.0, 1.0, 0, 7));
        for _ in 0..50 {
            let s = hot.sample(&logits);
            assert!((s.logprob - log_softmax_at(&logits, s.token as usize)).abs() < 1e-7);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, 3, seed));
            (0..200)
                .map(|_| s.sample(&logits).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        let mut top3: Vec<usize> = (0..100).collect();
        top3.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let allowed: Vec<u32> = top3[..3].iter().map(|&i| i as u32).collect();
        assert!(draw(1).iter().all(|t| allowed.contains(t)));
        assert!(
            allowed.iter().all(|t| draw(1).contains(t)),
            "all of top-3 should appear"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p = [0.7, 0.2, 0.1]: top_p 0.75 keeps the first two tokens only.
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(params(1.0, 0.75, 0, 3));
        let seen: std::collections::BTreeSet<u32> =
            (0..500).map(|_| s.sample(&logits).token).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(params(-1.0, 1.0, 0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0, 0).validate().is_err());
        assert!(SamplingParams {
            stop: vec![String::new()],
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
