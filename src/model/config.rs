//! Architecture facts of a decoder, read from GGUF metadata or from the JSON
//! config a from-scratch model is created from and saved with.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

/// Which Llama-family variant a GGUF holds; decides biases and the RoPE layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama, SmolLM2: no attention biases; GGUF stores Q/K permuted for interleaved RoPE.
    Llama,
    /// Qwen2, Qwen2.5: q/k/v biases; RoPE on halves (NeoX layout), weights not permuted.
    Qwen2,
}

/// How each sublayer's input is formed from what came before it (DESIGN.md
/// section 9). Written `standard`, `attnres-full` or `attnres-block:S` (S in
/// sublayers: attention and MLP each count as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    /// PreNorm residual: h_l = h_{l-1} + f_{l-1}(h_{l-1}).
    #[default]
    Standard,
    /// Attention Residuals over the embedding and every earlier sublayer output.
    Full,
    /// Block AttnRes: sources are the embedding, the sums of finished blocks of
    /// `size` sublayers, and the current block's partial sum.
    Block { size: usize },
}

impl Residual {
    pub fn is_attnres(self) -> bool {
        self != Residual::Standard
    }
}

impl std::fmt::Display for Residual {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Residual::Standard => write!(f, "standard"),
            Residual::Full => write!(f, "attnres-full"),
            Residual::Block { size } => write!(f, "attnres-block:{size}"),
        }
    }
}

impl std::str::FromStr for Residual {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(Residual::Standard),
            "attnres-full" => Ok(Residual::Full),
            _ => {
                let size = s
                    .strip_prefix("attnres-block:")
                    .with_context(|| {
                        format!(
                            "unknown residual `{s}` (standard, attnres-full or attnres-block:S)"
                        )
                    })?
                    .parse::<usize>()
                    .with_context(|| format!("`{s}`: the block size is not a number"))?;
                anyhow::ensure!(size >= 1, "`{s}`: the block size must be at least 1");
                Ok(Residual::Block { size })
            }
        }
    }
}

impl serde::Serialize for Residual {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Residual {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// GGUF models are always standard; a from-scratch model records its choice.
    #[serde(default)]
    pub residual: Residual,
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
            residual: Residual::Standard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_names_round_trip() {
        for r in [
            Residual::Standard,
            Residual::Full,
            Residual::Block { size: 4 },
        ] {
            assert_eq!(r.to_string().parse::<Residual>().unwrap(), r);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Residual>(&json).unwrap(), r);
        }
        assert!("attnres-block:0".parse::<Residual>().is_err());
        assert!("attnres-block".parse::<Residual>().is_err());
        assert!("mhc".parse::<Residual>().is_err());
    }
}
