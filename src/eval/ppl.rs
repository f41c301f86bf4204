//! Perplexity and bits per byte of a text file under the local model.
//!
//! The whole text is tokenised once and cut into windows of `window` tokens;
//! each window is scored by teacher forcing after the model's BOS token (so
//! every token of the text is predicted, the first of each window from BOS
//! alone). Perplexity is `exp(total NLL / tokens)`; bits per byte is
//! `total NLL / ln 2 / UTF-8 bytes`, which, unlike perplexity, compares models
//! with different tokenizers.

use std::path::Path;

use anyhow::{Context, Result};

use super::{Bench, ItemResult, Metric, Outcome, Report};
use crate::model::score::{score, Sequence};
use crate::model::{Decoder, Model};

/// fixtures/eval/ppl-mini.txt, built in (the retention check's held-out text).
pub const BUILTIN: &str = include_str!("../../fixtures/eval/ppl-mini.txt");

/// Padded tokens per scoring forward pass (bounds memory).
const SCORE_TOKENS: usize = 2048;

/// The perplexity of `text` under `decoder` (the model's own, or one with an
/// adapter on), in windows of `window` tokens; `on_window(done, total)` after each.
pub fn run(
    model: &Model,
    decoder: &Decoder,
    text: &str,
    window: usize,
    data: &str,
    on_window: &dyn Fn(usize, usize),
) -> Result<Outcome> {
    anyhow::ensure!(!text.is_empty(), "{data} is empty");
    let context = model.config.context_length;
    anyhow::ensure!(
        window >= 2 && window < context,
        "--window must be between 2 and {} (the context length less one), got {window}",
        context - 1
    );
    let ids = model
        .tokenizer
        .encode(text)
        .context("tokenising the text")?;
    anyhow::ensure!(!ids.is_empty(), "{data} has no tokens");
    let bos = model
        .tokenizer
        .bos_token()
        .and_then(|t| model.tokenizer.token_id(t));
    let mut total_nll = 0f64;
    let mut scored = 0usize;
    let mut items = Vec::new();
    let chunks: Vec<&[u32]> = ids.chunks(window).collect();
    for (w, chunk) in chunks.iter().enumerate() {
        // With no BOS, the window's first token is context only (not scored).
        let (prompt, response): (Vec<u32>, &[u32]) = match bos {
            Some(b) => (vec![b], chunk),
            None if chunk.len() > 1 => (chunk[..1].to_vec(), &chunk[1..]),
            None => continue,
        };
        let logprobs = score(
            decoder,
            &[Sequence {
                prompt: &prompt,
                response,
            }],
            SCORE_TOKENS,
        )
        .with_context(|| format!("scoring window {w}"))?;
        let nll: f64 = logprobs[0].iter().map(|&lp| -f64::from(lp)).sum();
        total_nll += nll;
        scored += response.len();
        let window_text = model.tokenizer.decode(chunk).unwrap_or_default();
        items.push(ItemResult {
            id: format!("window-{w}"),
            sample: 0,
            prompt: window_text,
            response: String::new(),
            extracted: Some(format!("{:.6}", nll / response.len() as f64)),
            expected: String::new(),
            correct: None,
            error: None,
        });
        on_window(w + 1, chunks.len());
    }
    anyhow::ensure!(scored > 0, "no token could be scored");
    let bytes = text.len();
    let metrics = vec![
        Metric::new("perplexity", (total_nll / scored as f64).exp()),
        Metric::new(
            "bits_per_byte",
            total_nll / std::f64::consts::LN_2 / bytes as f64,
        ),
        Metric::new("nll_per_token", total_nll / scored as f64),
        Metric::count("tokens", scored),
        Metric::count("bytes", bytes),
    ];
    let report = Report::new(Bench::Ppl, &model.name, data, items.len(), metrics);
    Ok(Outcome { report, items })
}

/// Reads the text file.
pub fn load(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the text file {} (UTF-8 text expected)",
            path.display()
        )
    })
}
