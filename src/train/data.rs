//! Training data: rollout rows as [`TrainSample`]s (token ids checked against the
//! model's vocabulary), plain text as language-modelling windows, and the held-out
//! loss over a set of samples.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::replay::ReplaySource;
use super::trainer::{TrainSample, Trainer};
use crate::model::score::{self, Sequence};
use crate::model::Model;
use crate::rollout::{RolloutBatch, RolloutFile, RolloutReader, RolloutRow};

/// Whether `inputs` (as `RolloutReader` takes them) read standard input.
pub fn reads_stdin(inputs: &[String]) -> bool {
    inputs.is_empty() || inputs.iter().any(|i| i == "-")
}

/// `FILE: row N (sample ID)`, for errors about one row (`index` from 0).
fn sample_at(source: &str, index: u64, row: &RolloutRow) -> String {
    format!("{source}: row {} (sample {})", index + 1, row.sample_id)
}

/// The training view of a rollout row; every token id must be one of the
/// model's `vocab` (else the error names the field and the id).
pub fn train_sample(row: &RolloutRow, vocab: usize) -> Result<TrainSample> {
    let to_ids = |v: &[i32], field: &str| -> Result<Vec<u32>> {
        v.iter()
            .enumerate()
            .map(|(k, &id)| match u32::try_from(id) {
                Ok(u) if (u as usize) < vocab => Ok(u),
                Ok(_) => anyhow::bail!(
                    "`{field}`[{k}] = {id} is outside the model's vocabulary ({vocab} tokens): \
                     were these ids made with another model's tokenizer?"
                ),
                Err(_) => anyhow::bail!("`{field}`[{k}] = {id} is a negative token id"),
            })
            .collect()
    };
    Ok(TrainSample {
        sample_id: row.sample_id.clone(),
        prompt_ids: to_ids(&row.prompt_ids, "prompt_ids")?,
        response_ids: to_ids(&row.response_ids, "response_ids")?,
        reward: row.reward,
        teacher_logprobs: row.teacher_logprobs.clone(),
        teacher_topk: match (&row.teacher_topk_ids, &row.teacher_topk_logprobs) {
            (Some(ids), Some(lps)) => Some(
                ids.iter()
                    .zip(lps)
                    .enumerate()
                    .map(|(t, (ids, lps))| {
                        Ok((to_ids(ids, &format!("teacher_topk_ids[{t}]"))?, lps.clone()))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => None,
        },
        policy_version: row.policy_version,
        replay: None,
        auxiliary: false,
    })
}

/// How rollout rows become training samples.
#[derive(Clone, Copy)]
pub struct RowSamples<'a> {
    /// The model's vocabulary size: every token id must be below it.
    pub vocab: usize,
    /// `--hindsight`: the model whose template and tokenizer render a rewarded
    /// retry's earlier prompt ([`hindsight_sample`]).
    pub hindsight: Option<&'a Model>,
    /// `--hint-replay`: keep each row's opening prompt and hint on its sample.
    pub replay: bool,
}

impl RowSamples<'_> {
    /// The samples of one row: its own, and its hindsight demonstration if any.
    fn of(&self, row: &RolloutRow) -> Result<Vec<TrainSample>> {
        let mut sample = train_sample(row, self.vocab)?;
        if self.replay {
            sample.replay = ReplaySource::of(row)?.map(Arc::new);
        }
        let demo = match self.hindsight {
            Some(model) => hindsight_sample(model, row, &sample)?,
            None => None,
        };
        Ok(std::iter::once(sample).chain(demo).collect())
    }
}

/// A rewarded reply that answered a correction, as the reply to the prompt the
/// corrected reply had (hindsight: what the user accepted in the end is a
/// demonstration for what they asked first). The row's messages must end with a
/// user message right after an assistant reply, the correction; both are left out
/// of the demonstration's prompt, which is rendered with the model's chat template
/// (and the row's tools). None for any other row. Use only where a user's message
/// after a reply is a correction, not a new question.
pub fn hindsight_sample(
    model: &Model,
    row: &RolloutRow,
    sample: &TrainSample,
) -> Result<Option<TrainSample>> {
    if row.reward.is_none_or(|r| r <= 0.0) || sample.response_ids.is_empty() {
        return Ok(None);
    }
    let messages = row.messages()?;
    let role = |i: usize| messages[i].get("role").and_then(serde_json::Value::as_str);
    let n = messages.len();
    if n < 3 || role(n - 1) != Some("user") || role(n - 2) != Some("assistant") {
        return Ok(None);
    }
    if !(0..n - 2).any(|i| role(i) == Some("user")) {
        return Ok(None);
    }
    let earlier = crate::serve::messages::for_template(&messages[..n - 2])
        .context("messages_json cannot be rendered as serve rendered it")?;
    let tools = row.tools()?;
    let text = model.template.render(&earlier, tools.as_deref(), true)?;
    Ok(Some(TrainSample {
        sample_id: format!("{}#hindsight", sample.sample_id),
        prompt_ids: model.tokenizer.encode(&text)?,
        response_ids: sample.response_ids.clone(),
        reward: sample.reward,
        teacher_logprobs: None,
        teacher_topk: None,
        policy_version: sample.policy_version,
        replay: None,
        auxiliary: false,
    }))
}

/// Row `i` of `batch` as training samples; an error names the file and row.
pub fn batch_row_samples(
    batch: &RolloutBatch,
    i: usize,
    row: &RolloutRow,
    how: RowSamples,
) -> Result<Vec<TrainSample>> {
    how.of(row)
        .with_context(|| sample_at(&batch.source, batch.first_row + i as u64, row))
}

/// Every row of `batch` as training samples; any bad row fails the batch.
fn batch_samples(batch: &RolloutBatch, how: RowSamples) -> Result<Vec<TrainSample>> {
    let mut out = Vec::new();
    for (i, row) in batch.rows()?.iter().enumerate() {
        out.extend(batch_row_samples(batch, i, row, how)?);
    }
    Ok(out)
}

/// Every row of `inputs` (files, globs, directories, `-`) as training samples.
pub fn read_samples(inputs: &[String], how: RowSamples) -> Result<Vec<TrainSample>> {
    let mut out = Vec::new();
    for batch in RolloutReader::new(inputs)? {
        out.extend(batch_samples(&batch?, how)?);
    }
    Ok(out)
}

/// Every row of one rollout file as training samples; any bad row fails the file.
pub fn file_samples(path: &Path, how: RowSamples) -> Result<Vec<TrainSample>> {
    let file = RolloutFile::open_path(path)?;
    let mut out = Vec::new();
    for batch in file.batches(4096, None)? {
        out.extend(batch_samples(&batch?, how)?);
    }
    Ok(out)
}

/// Mean over samples of the per-token NLL of the response under the current policy.
pub fn mean_nll(trainer: &Trainer, samples: &[TrainSample]) -> Result<f64> {
    let seqs: Vec<Sequence> = samples
        .iter()
        .filter(|s| !s.prompt_ids.is_empty() && !s.response_ids.is_empty())
        .map(|s| Sequence {
            prompt: &s.prompt_ids,
            response: &s.response_ids,
        })
        .collect();
    anyhow::ensure!(
        !seqs.is_empty(),
        "--eval: no sample with prompt and response ids"
    );
    let scores = score::score(
        &trainer.frozen_policy()?,
        &seqs,
        trainer.config.micro_batch_tokens,
    )?;
    let per_sample: Vec<f64> = scores
        .iter()
        .map(|lp| -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64)
        .collect();
    Ok(per_sample.iter().sum::<f64>() / per_sample.len() as f64)
}

/// Plain text as language-modelling samples: the tokens of each file in windows
/// of `seq_len` (the first token is the prompt, the rest are predicted).
pub fn text_samples(model: &Model, inputs: &[String], seq_len: usize) -> Result<Vec<TrainSample>> {
    anyhow::ensure!(seq_len >= 2, "--seq-len must be at least 2");
    anyhow::ensure!(
        seq_len < model.config.context_length,
        "--seq-len {seq_len} must be below the model's context length {}",
        model.config.context_length
    );
    anyhow::ensure!(
        !inputs.is_empty(),
        "--objective lm needs text files to read"
    );
    let mut out = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("cannot read text file {input}"))?;
        let ids = model
            .tokenizer
            .encode(&text)
            .with_context(|| format!("{input}: tokenizing"))?;
        for (i, window) in ids.chunks(seq_len).enumerate() {
            if window.len() < 2 {
                continue;
            }
            out.push(TrainSample {
                sample_id: format!("{input}#{i}"),
                prompt_ids: window[..1].to_vec(),
                response_ids: window[1..].to_vec(),
                ..Default::default()
            });
        }
    }
    Ok(out)
}
