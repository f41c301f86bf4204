//! Models made by claw itself: created from a small JSON config
//! (`claw train --init CONFIG.json`), trained from scratch, and saved as
//! safetensors whose metadata carries everything needed to load them again
//! ([`ModelSpec`] under the key `claw.model`). [`super::Model::load`] takes
//! such a file, or a checkpoint directory (its newest `model-NNNNNN.safetensors`),
//! so `chat`, `serve`, `eval` and `train --base-weights` load them like a GGUF.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::config::{Architecture, ModelConfig, Residual};
use super::decoder::Decoder;
use super::{ChatTemplate, Tokenizer};

/// Safetensors metadata key holding the [`ModelSpec`] JSON.
pub const SPEC_KEY: &str = "claw.model";

/// Where a from-scratch model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// 256 byte tokens + 3 specials ([`Tokenizer::bytes`]), ChatML template.
    Bytes,
    /// The tokenizer and chat template of a GGUF file (read from its metadata
    /// only; the file must stay where it was).
    Gguf(PathBuf),
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSource::Bytes => write!(f, "bytes"),
            TokenizerSource::Gguf(p) => write!(f, "gguf:{}", p.display()),
        }
    }
}

impl std::str::FromStr for TokenizerSource {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bytes" | "byte" => Ok(Self::Bytes),
            _ => match s.strip_prefix("gguf:") {
                Some(p) if !p.is_empty() => Ok(Self::Gguf(PathBuf::from(p))),
                _ => anyhow::bail!("unknown tokenizer `{s}` (bytes, or gguf:PATH)"),
            },
        }
    }
}

impl Serialize for TokenizerSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for TokenizerSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The config a model is created from (`--init`). Unknown keys are an error,
/// so a typo does not silently train the wrong model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    #[serde(default = "default_tokenizer")]
    pub tokenizer: TokenizerSource,
    #[serde(alias = "width")]
    pub hidden_size: usize,
    #[serde(alias = "depth")]
    pub num_layers: usize,
    #[serde(alias = "heads")]
    pub num_heads: usize,
    /// Default: `num_heads` (no GQA).
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    /// SwiGLU width. Default: 8/3 of the hidden size rounded up to 8, which
    /// gives the parameters of a 4x GELU MLP.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "default_context")]
    pub context_length: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// `standard`, `attnres-full` or `attnres-block:S` (S in sublayers).
    #[serde(default)]
    pub residual: Residual,
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Standard deviation of the random initialisation.
    #[serde(default = "default_std")]
    pub init_std: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_tokenizer() -> TokenizerSource {
    TokenizerSource::Bytes
}
fn default_context() -> usize {
    512
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_std() -> f64 {
    0.02
}

/// What a claw-made checkpoint records about its model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    pub config: ModelConfig,
    pub tokenizer: TokenizerSource,
    pub tied_head: bool,
}

impl ModelSpec {
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }
}

impl InitConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid model config", path.display()))
    }

    /// The architecture this config describes, with the vocabulary of its tokenizer.
    pub fn model_config(&self, vocab_size: usize) -> Result<ModelConfig> {
        let h = self.hidden_size;
        anyhow::ensure!(
            h > 0 && self.num_layers > 0,
            "hidden_size and num_layers must be positive"
        );
        anyhow::ensure!(
            self.num_heads > 0 && h.is_multiple_of(self.num_heads),
            "num_heads {} must divide hidden_size {h}",
            self.num_heads
        );
        anyhow::ensure!(
            (h / self.num_heads).is_multiple_of(2),
            "the head size {} must be even (RoPE)",
            h / self.num_heads
        );
        anyhow::ensure!(
            self.context_length >= 2,
            "context_length must be at least 2"
        );
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size: h,
            intermediate_size: self
                .intermediate_size
                .unwrap_or_else(|| (8 * h).div_ceil(3).div_ceil(8) * 8),
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads.unwrap_or(self.num_heads),
            head_dim: h / self.num_heads,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            context_length: self.context_length,
            residual: self.residual,
            rope_scaling: None,
        })
    }
}

/// The tokenizer and chat template a spec names.
pub fn load_tokenizer(source: &TokenizerSource) -> Result<(Tokenizer, ChatTemplate)> {
    match source {
        TokenizerSource::Bytes => {
            let tokenizer = Tokenizer::bytes()?;
            let template = ChatTemplate::chatml(&tokenizer)?;
            Ok((tokenizer, template))
        }
        TokenizerSource::Gguf(path) => {
            let mut file = std::fs::File::open(path)
                .with_context(|| format!("cannot open the tokenizer's GGUF {}", path.display()))?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut file)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
            let tokenizer = Tokenizer::from_gguf(&content)
                .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
            let template = ChatTemplate::from_gguf(&content, &tokenizer)?;
            Ok((tokenizer, template))
        }
    }
}

/// The newest `model-NNNNNN.safetensors` in `dir`.
pub fn latest_model_file(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let step = name
            .strip_prefix("model-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            if best.as_ref().is_none_or(|(s, _)| step > *s) {
                best = Some((step, entry.path()));
            }
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "{} holds no model-NNNNNN.safetensors (written by `claw train --init`)",
            dir.display()
        )
    })
}

/// Reads a claw-made safetensors model: its spec and a float decoder (HF layout).
pub fn load_decoder(path: &Path, device: &candle_core::Device) -> Result<(ModelSpec, Decoder)> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read model file {}", path.display()))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let spec_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(SPEC_KEY))
        .with_context(|| {
            format!(
                "{} has no `{SPEC_KEY}` metadata: not a model written by `claw train --init` \
                 (a fine-tuned GGUF's weights load with --base-weights)",
                path.display()
            )
        })?;
    let spec: ModelSpec = serde_json::from_str(spec_json)
        .with_context(|| format!("{}: unreadable `{SPEC_KEY}` metadata", path.display()))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("cannot read the tensors of {}", path.display()))?;
    let shell = Decoder::new_random(&spec.config, spec.tied_head, 0.0, 0, device)?;
    let decoder = shell.take_parameters(&mut tensors, path)?;
    if let Some(extra) = tensors.keys().next() {
        anyhow::bail!(
            "{}: unexpected tensor {extra}: the file does not match its own config",
            path.display()
        );
    }
    Ok((spec, decoder))
}
