//! Architecture facts of a decoder, read from GGUF metadata.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

/// Which Llama-family variant a GGUF holds; decides biases and the RoPE layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama, SmolLM2: no attention biases; GGUF stores Q/K permuted for interleaved RoPE.
    Llama,
    /// Qwen2, Qwen2.5: q/k/v biases; RoPE on halves (NeoX layout), weights not permuted.
    Qwen2,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub context_length: usize,
}

impl ModelConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch_name = content
            .metadata
            .get("general.architecture")
            .context("GGUF metadata has no general.architecture")?
            .to_string()?
            .clone();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("architecture `{other}` is not supported (llama and qwen2 are)"),
        };
        let get = |key: &str| -> Result<&gguf_file::Value> {
            let full = format!("{arch_name}.{key}");
            content
                .metadata
                .get(&full)
                .with_context(|| format!("GGUF metadata has no {full}"))
        };
        let get_usize = |key: &str| -> Result<usize> {
            let v = get(key)?;
            let n = v
                .to_u32()
                .map(u64::from)
                .or_else(|_| v.to_u64())
                .with_context(|| format!("{arch_name}.{key} is not an integer"))?;
            Ok(n as usize)
        };
        let hidden_size = get_usize("embedding_length")?;
        let num_heads = get_usize("attention.head_count")?;
        let num_kv_heads = get_usize("attention.head_count_kv").unwrap_or(num_heads);
        anyhow::ensure!(
            num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
            "head counts {num_heads}/{num_kv_heads} are not a valid GQA layout"
        );
        let head_dim = get_usize("rope.dimension_count").unwrap_or(hidden_size / num_heads);
        anyhow::ensure!(
            head_dim * num_heads == hidden_size,
            "partial RoPE (head_dim {head_dim} x {num_heads} heads != hidden {hidden_size}) is not supported"
        );
        let vocab_size = match get_usize("vocab_size") {
            Ok(n) => n,
            Err(_) => content
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
                .context("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")?,
        };
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: get_usize("feed_forward_length")?,
            num_layers: get_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: get("rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(1e-5) as f64,
            context_length: get_usize("context_length").unwrap_or(4096),
        })
    }
}
