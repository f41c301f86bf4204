//! The anchor (`claw train --anchor N`): a style learned from a few users'
//! corrections spreads to prompts no one corrected, and on a small model it
//! costs answers there first (a persona adapter answered GSM8K problems in 7
//! words where the base model reasoned for 50). Each step, the current policy
//! answers N prompts from a fixed set where the base model's answers are the
//! ones to keep (worked maths, facts), and the base model scores those replies:
//! on-policy distillation towards the base model on prompts outside the
//! users', the reverse KL where it matters instead of a KL penalty on the
//! users' own prompts (which slows the style it is meant to allow).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::replay::OnPolicy;
use super::trainer::{TrainSample, Trainer};
use crate::model::sampling::SamplingParams;
use crate::model::Model;

/// fixtures/train/anchor.txt: worked maths, facts and conversions, none of
/// them in the retention check's sets.
pub const BUILTIN: &str = include_str!("../../fixtures/train/anchor.txt");

/// Prompts of a text file: one per line; blank lines and `#` comments skipped
/// (also the persona benchmark's task files).
pub fn parse_prompts(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The prompts of `path`, or the built-in set.
pub fn load_prompts(path: Option<&Path>) -> Result<Vec<String>> {
    let (text, name) = match path {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the anchor prompts {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (BUILTIN.to_string(), "the built-in anchor set".to_string()),
    };
    let prompts: Vec<String> = parse_prompts(&text).into_iter().map(String::from).collect();
    anyhow::ensure!(
        !prompts.is_empty(),
        "{name} holds no prompts (one per line; `#` starts a comment)"
    );
    Ok(prompts)
}

#[derive(Debug, Clone)]
pub struct AnchorConfig {
    /// Anchor prompts answered and distilled per step.
    pub per_step: usize,
    /// Longest anchor reply, in tokens.
    pub max_tokens: usize,
    /// Sampling temperature of the anchor replies.
    pub temperature: f32,
    /// Also distill the base model's top-K distribution at every reply token
    /// (0: only its log-probs of the sampled tokens).
    pub topk: usize,
    pub seed: u64,
}

/// The anchor prompts, in a shuffled order that every prompt goes through
/// before any repeats.
pub struct Anchor {
    config: AnchorConfig,
    model: Arc<Model>,
    /// Each prompt as a single user message, rendered and tokenized.
    prompts: Vec<Vec<u32>>,
    order: Vec<usize>,
    next: usize,
    rng: StdRng,
    /// Anchor samples made (for the summary).
    pub made: u64,
}

impl Anchor {
    /// `model` gives the tokenizer and chat template (the weights are the trainer's).
    pub fn new(config: AnchorConfig, model: Arc<Model>, prompts: &[String]) -> Result<Self> {
        anyhow::ensure!(!prompts.is_empty(), "no anchor prompts");
        let prompts = prompts
            .iter()
            .map(|p| {
                let messages = [serde_json::json!({"role": "user", "content": p})];
                let text = model.template.render(&messages, None, true)?;
                model.tokenizer.encode(&text)
            })
            .collect::<Result<Vec<_>>>()
            .context("rendering the anchor prompts with the model's chat template")?;
        let rng = StdRng::seed_from_u64(config.seed ^ 0xA4C4);
        Ok(Self {
            config,
            model,
            order: Vec::new(),
            next: 0,
            prompts,
            rng,
            made: 0,
        })
    }

    /// The next prompt's index, reshuffling after a full pass.
    fn next_prompt(&mut self) -> usize {
        if self.next >= self.order.len() {
            self.order = (0..self.prompts.len()).collect();
            self.order.shuffle(&mut self.rng);
            self.next = 0;
        }
        self.next += 1;
        self.order[self.next - 1]
    }

    /// This step's anchor samples: the trainer's current policy answers
    /// `per_step` prompts and the base model scores the replies.
    pub fn samples(&mut self, trainer: &Trainer, max_sequence: usize) -> Result<Vec<TrainSample>> {
        if self.config.per_step == 0 {
            return Ok(Vec::new());
        }
        let policy = trainer.frozen_policy()?;
        let model = self.model.clone();
        let distill = OnPolicy {
            model: &model,
            student: &policy,
            teacher: trainer.reference(),
            trainer,
            max_sequence,
            topk: self.config.topk,
        };
        let mut out = Vec::new();
        for _ in 0..self.config.per_step {
            let index = self.next_prompt();
            let prompt_ids = self.prompts[index].clone();
            let params = SamplingParams {
                temperature: self.config.temperature,
                max_tokens: self.config.max_tokens,
                seed: Some(rand::Rng::gen(&mut self.rng)),
                ..SamplingParams::default()
            };
            let teacher_ids = prompt_ids.clone();
            let made = distill
                .sample(
                    format!("anchor-{}#{index}", trainer.steps()),
                    prompt_ids,
                    &teacher_ids,
                    &params,
                )
                .with_context(|| format!("answering anchor prompt {index}"))?;
            out.extend(made);
        }
        self.made += out.len() as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_lines_without_comments_and_the_builtin_set_avoids_the_retention_sets() {
        assert_eq!(
            parse_prompts("# heading\n\n  first  \n# note\nsecond\n"),
            vec!["first", "second"]
        );
        let builtin = load_prompts(None).unwrap();
        assert!(builtin.len() >= 40, "{}", builtin.len());
        // The anchor must not train on what the retention check asks.
        let retention = [
            crate::eval::gsm8k::BUILTIN,
            include_str!("../../fixtures/eval/facts-mini.jsonl"),
        ]
        .concat();
        for line in retention.lines() {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            let question = json["question"].as_str().unwrap();
            assert!(
                builtin.iter().all(|p| !p.contains(question)),
                "the anchor set holds the retention question {question:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("anchor.txt");
        std::fs::write(&empty, "# nothing\n").unwrap();
        let err = load_prompts(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("anchor.txt holds no prompts"), "{err}");
        let err = load_prompts(Some(&dir.path().join("missing.txt")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the anchor prompts"), "{err}");
    }
}
