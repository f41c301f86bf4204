//! The model runtime: one decoder for the Llama (1-3), Qwen2 and Qwen3 family
//! (docs/ARCHITECTURE.md, "Model runtime").
//!
//! - [`config`]: architecture facts read from GGUF metadata.
//! - [`gguf`]: names the tensor of a type claw cannot read.
//! - [`tokenizer`]: byte-level BPE built from the GGUF's own vocabulary and merges.
//! - [`template`]: the GGUF's chat template rendered with minijinja.
//! - [`linear`], [`decoder`]: the network, with quantized or float weights.
//! - [`sampling`], [`generate`]: token selection and the generation loop.
//! - [`score`]: teacher-forced log-probs of given responses, batched (train,
//!   distill-hints' teacher, `eval ppl`).
//! - [`attnres`]: Attention Residuals (depth attention, two-phase Block inference).
//! - [`scratch`]: models created from a JSON config and saved as safetensors.
//! - [`testing`]: a tiny random-weight GGUF for tests that must not need a download.

pub mod attention;
pub mod attnres;
pub mod config;
pub mod decoder;
pub mod flash;
pub mod gemm;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod linear;
pub mod ops;
pub mod pool;
pub mod sampling;
pub mod score;
pub mod scratch;
pub mod template;
pub mod testing;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;

pub use config::{ModelConfig, Residual};
pub use decoder::{Decoder, KvCache};
pub use generate::{FinishReason, Generation, Timing};
pub use sampling::SamplingParams;
pub use template::ChatTemplate;
pub use tokenizer::Tokenizer;

/// File name of the default model that `scripts/fetch-model` places in `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// How the linear weights are held and multiplied once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// GGUF blocks in memory (4-8 bits a weight), multiplied exactly with f32
    /// activations by claw's kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
    /// Q6_K; other formats use `ggml`).
    /// Same results as `f32`, a fraction of the memory traffic.
    #[default]
    Packed,
    /// GGUF blocks multiplied by candle's quantized matmul, which (like llama.cpp)
    /// rounds activations to 8 bits first: identical logits to candle-transformers'
    /// quantized models, but SmolLM2-135M's greedy answers shift measurably.
    Ggml,
    /// Dequantized to f16.
    F16,
    /// Dequantized to f32: the exact function of the stored weights.
    F32,
}

/// A loaded model: weights, tokenizer and chat template, ready to generate.
pub struct Model {
    pub path: PathBuf,
    /// Served model name: the GGUF file stem.
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub decoder: Decoder,
    pub device: Device,
}

impl Model {
    /// Loads a model on the CPU with its weights as stored: a GGUF file, or a
    /// model made by `claw train --init` (its safetensors file, or the
    /// checkpoint directory, whose newest `model-NNNNNN.safetensors` is used).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, WeightFormat::default())
    }

    /// Like [`load`](Self::load), holding the linear weights as `weights`
    /// (a float safetensors model has no packed form: `packed`/`ggml` keep f32).
    pub fn load_with(path: &Path, weights: WeightFormat) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        if path.is_dir() || is_safetensors {
            return Self::load_safetensors(path, weights);
        }
        let device = Device::Cpu;
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open model file {}", path.display()))?;
        let content = match gguf_file::Content::read(&mut file) {
            Ok(content) => content,
            Err(e) => {
                if let Ok(Some((tensor, ty))) = gguf::unreadable_tensor(path) {
                    anyhow::bail!(
                        "{}: tensor {tensor} has type {} (ggml type {ty}), which claw cannot load \
                         (it loads {})",
                        path.display(),
                        gguf::type_name(ty),
                        gguf::readable_types()
                    );
                }
                return Err(anyhow::Error::from(e))
                    .with_context(|| format!("{} is not a readable GGUF file", path.display()));
            }
        };
        let config = ModelConfig::from_gguf(&content)
            .with_context(|| format!("unsupported model {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&content)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(&content, &tokenizer)
            .with_context(|| format!("cannot load the chat template of {}", path.display()))?;
        let mut decoder = Decoder::from_gguf(&content, &mut file, &config, &device)
            .with_context(|| format!("cannot load the weights of {}", path.display()))?;
        decoder = decoder.with_weights(weights)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string());
        Ok(Self {
            path: path.to_path_buf(),
            name,
            config,
            tokenizer,
            template,
            decoder,
            device,
        })
    }
}

impl Model {
    fn load_safetensors(path: &Path, weights: WeightFormat) -> Result<Self> {
        let file = match path.is_dir() {
            true => scratch::latest_model_file(path)?,
            false => path.to_path_buf(),
        };
        let device = Device::Cpu;
        let (spec, decoder) = scratch::load_decoder(&file, &device)?;
        let (tokenizer, template) = scratch::load_tokenizer(&spec.tokenizer)
            .with_context(|| format!("loading the tokenizer of {}", file.display()))?;
        let decoder = match weights {
            // Re-quantizing a float model is a choice the user makes explicitly.
            WeightFormat::F16 => decoder.with_weights(weights)?,
            _ => decoder,
        };
        Ok(Self {
            path: file.clone(),
            name: model_name(path),
            config: spec.config,
            tokenizer,
            template,
            decoder,
            device,
        })
    }

    /// A new random-weight model from an `--init` config, with the spec to
    /// save beside its weights.
    pub fn from_init(config: &scratch::InitConfig) -> Result<(Self, scratch::ModelSpec)> {
        let device = Device::Cpu;
        let tokenizer_source = match &config.tokenizer {
            scratch::TokenizerSource::Gguf(p) => scratch::TokenizerSource::Gguf(
                // Absolute, so the checkpoint loads from any working directory.
                p.canonicalize()
                    .with_context(|| format!("tokenizer GGUF {} not found", p.display()))?,
            ),
            other => other.clone(),
        };
        let (tokenizer, template) = scratch::load_tokenizer(&tokenizer_source)?;
        let model_config = config.model_config(tokenizer.vocab_size())?;
        let decoder = Decoder::new_random(
            &model_config,
            config.tie_embeddings,
            config.init_std,
            config.seed,
            &device,
        )?;
        let spec = scratch::ModelSpec {
            config: model_config.clone(),
            tokenizer: tokenizer_source,
            tied_head: config.tie_embeddings,
        };
        let model = Self {
            path: PathBuf::new(),
            name: format!("claw-{}", model_config.residual),
            config: model_config,
            tokenizer,
            template,
            decoder,
            device,
        };
        Ok((model, spec))
    }
}

/// Served model name: a file's stem, or a checkpoint directory's name.
fn model_name(path: &Path) -> String {
    let name = match path.is_dir() {
        true => path.file_name(),
        false => path.file_stem(),
    };
    name.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// Finds the model to use: an explicit path, else `$CLAW_MODEL` (handled by clap),
/// else the default model in `./models/` or next to the repository the binary was
/// built in. The error says how to get one.
pub fn resolve_model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(
            path.is_file() || path.is_dir(),
            "model file {} does not exist (run scripts/fetch-model, or pass --model PATH)",
            path.display()
        );
        return Ok(path.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from("models").join(DEFAULT_MODEL_FILE)];
    // target/{debug,release}/claw -> repository root
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join("models").join(DEFAULT_MODEL_FILE));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no model given and the default {DEFAULT_MODEL_FILE} is not in ./models/: \
             run scripts/fetch-model, or pass --model PATH (or set CLAW_MODEL)"
            )
        })
}
