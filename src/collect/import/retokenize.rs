//! The model's tokenizer and chat template, which imported turns are tokenised
//! with (`token_source = retokenized`).

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value as Json;

use crate::model::{ChatTemplate, Tokenizer};

/// The model's tokenizer and chat template, read from the GGUF's metadata only
/// (the weights are not loaded).
pub struct Retokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// The served model name (the GGUF file stem), for rows whose log names none.
    pub model_name: String,
    /// The end-of-turn token appended when the template cannot place the reply.
    end_of_turn: Option<u32>,
}

impl Retokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let mut file = File::open(path)
            .with_context(|| format!("cannot open model file {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&content)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(&content, &tokenizer)
            .with_context(|| format!("cannot load the chat template of {}", path.display()))?;
        let end_of_turn = ["<|im_end|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .find_map(|t| tokenizer.token_id(t))
            .or_else(|| tokenizer.eos_ids().first().copied());
        let model_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Retokenizer {
            tokenizer,
            template,
            model_name,
            end_of_turn,
        })
    }

    /// Renders and tokenises one turn: the prompt (with the generation prompt) and
    /// the reply as the template writes it after the prompt, up to and including
    /// the end-of-turn token. Templates that rewrite earlier turns (so the prompt is
    /// not a prefix of prompt + reply) fall back to the reply's text plus the
    /// end-of-turn token.
    pub(super) fn encode(
        &self,
        prompt: &[Json],
        tools: Option<&[Json]>,
        reply: &Json,
    ) -> Result<Encoded> {
        let prompt_text = self
            .template
            .render(prompt, tools, true)
            .context("the chat template rejected the messages")?;
        let prompt_ids = self.ids(&prompt_text)?;
        let content = reply["content"].as_str().unwrap_or_default();
        let mut with_reply = prompt.to_vec();
        with_reply.push(reply.clone());
        let tail = self
            .template
            .render(&with_reply, tools, false)
            .ok()
            .and_then(|full| full.strip_prefix(prompt_text.as_str()).map(str::to_string));
        let (response_text, response_ids) = match tail {
            Some(tail) if !tail.is_empty() => {
                let mut ids = self.ids(&tail)?;
                if let Some(end) = ids.iter().position(|&id| self.tokenizer.is_eos(id as u32)) {
                    ids.truncate(end + 1);
                }
                let body: Vec<u32> = ids
                    .iter()
                    .map(|&i| i as u32)
                    .filter(|&i| !self.tokenizer.is_eos(i))
                    .collect();
                (self.tokenizer.decode(&body)?, ids)
            }
            _ => {
                let mut ids = self.ids(content)?;
                ids.extend(self.end_of_turn.map(|i| i as i32));
                (content.to_string(), ids)
            }
        };
        Ok(Encoded {
            prompt_text,
            prompt_ids,
            response_text,
            response_ids,
        })
    }

    fn ids(&self, text: &str) -> Result<Vec<i32>> {
        Ok(self
            .tokenizer
            .encode(text)?
            .into_iter()
            .map(|i| i as i32)
            .collect())
    }
}

pub(super) struct Encoded {
    pub(super) prompt_text: String,
    pub(super) prompt_ids: Vec<i32>,
    pub(super) response_text: String,
    pub(super) response_ids: Vec<i32>,
}
